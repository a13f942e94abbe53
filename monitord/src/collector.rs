//! Sums the counter increases every process pushes on monitor.sock.
//!
//! Counters only go up and are summed over all processes, so a process that
//! restarts simply keeps adding. What a peer can make monitord hold is
//! bounded, so a misbehaving one cannot make monitord grow without limit or
//! crowd out the others: names under `chasquid/` or `tambo/` (never one of
//! monitord's own: its `tambo/monitord/…` counters and the entries of
//! [`crate::expvar::FIXED`]), names and labels of at most
//! [`MAX_NAME`] bytes, at most [`MAX_NEW_KEYS_PER_CONNECTION`] new keys per
//! connection, [`MAX_KEYS_PER_ROLE`] per role and [`MAX_KEYS`] in all. An
//! increase over a budget is dropped and counted
//! (`tambo/monitord/droppedDeltas`); the rest of its batch still applies.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use tambo_proto::Role;
use tambo_proto::metrics::{Kind, VARIABLES, names};
use tambo_proto::monitor::{
    Delta, MAX_KEYS_PER_ROLE, MAX_NAME, MAX_NEW_KEYS_PER_CONNECTION, bounded_flags,
};

/// Most distinct (variable, label) pairs peers may add, all together.
pub const MAX_KEYS: usize = 20_000;

// smtpd, queued, deliverd and ctl may push: even if each fills its own
// budget, there is room for all of them.
const _: () = assert!(4 * MAX_KEYS_PER_ROLE <= MAX_KEYS);

/// Disconnected processes remembered for the index page; older ones are
/// forgotten, so restarts cannot grow the list.
const MAX_GONE_PROCESSES: usize = 64;

/// A registered process.
#[derive(Debug, Clone)]
pub struct Process {
    /// Tells apart registrations, which come and go in any order.
    id: u64,
    pub role: Role,
    pub pid: u32,
    pub version: String,
    pub flags: Vec<(String, String)>,
    /// Its effective config (`/debug/config`).
    pub config: String,
    /// How its runtime was when it last said (`/debug/tasks`).
    pub state: String,
    /// Its traces running when it last said (`/debug/traces`).
    pub active: Vec<tambo_proto::trace::TraceRecord>,
    /// Where to ask it for a profile (`/debug/pprof`) while connected.
    pub profiler: Option<tokio::sync::mpsc::Sender<crate::pprof::Ask>>,
    pub connected: bool,
}

/// Process runs whose counts monitord has taken, remembered so that a
/// reconnection's baseline is not counted twice; past this many the
/// oldest are forgotten (a run that old reconnecting is counted again).
const MAX_INSTANCES: usize = 1024;

/// Why a pushed increase was dropped: the label it is counted under in
/// `tambo/monitord/droppedDeltas`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dropped {
    /// An empty variable name, or a name or label over [`MAX_NAME`] bytes.
    BadName,
    /// A name under neither `chasquid/` nor `tambo/`
    /// ([`names::PUSHED_PREFIXES`]).
    BadPrefix,
    /// A variable under `tambo/monitord/`, which only monitord counts, or
    /// an entry monitord writes itself ([`crate::expvar::FIXED`]).
    Reserved,
    /// A label on a plain counter, or none on a map.
    KindMismatch,
    /// The connection used up [`MAX_NEW_KEYS_PER_CONNECTION`].
    ConnectionKeys,
    /// The peer's role used up [`MAX_KEYS_PER_ROLE`].
    RoleKeys,
    /// monitord holds [`MAX_KEYS`] keys.
    MaxKeys,
}

impl Dropped {
    pub fn label(self) -> &'static str {
        match self {
            Dropped::BadName => "bad_name",
            Dropped::BadPrefix => "bad_prefix",
            Dropped::Reserved => "reserved",
            Dropped::KindMismatch => "kind_mismatch",
            Dropped::ConnectionKeys => "connection_keys",
            Dropped::RoleKeys => "role_keys",
            Dropped::MaxKeys => "max_keys",
        }
    }
}

/// What one monitor.sock connection has added so far.
#[derive(Debug)]
pub struct Budget {
    role: Role,
    new_keys: usize,
}

impl Budget {
    pub fn new(role: Role) -> Self {
        Budget { role, new_keys: 0 }
    }
}

#[derive(Debug, Default)]
pub struct Totals {
    pub counters: BTreeMap<String, u64>,
    pub maps: BTreeMap<String, BTreeMap<String, u64>>,
    pub processes: Vec<Process>,
    /// Keys added by peers, all together and by role.
    keys: usize,
    role_keys: HashMap<Role, usize>,
    next_process: u64,
    /// Each role's process runs counted, oldest first: one list per role,
    /// so no role can push another's out.
    instances: HashMap<Role, std::collections::VecDeque<u64>>,
    /// queued's last queue snapshot (`/debug/queue`).
    pub queue: Option<String>,
    /// The traces kept (`/debug/traces`).
    pub traces: crate::traces::Sampled,
}

impl Totals {
    /// Every known variable starts at zero (or as an empty map), so
    /// dashboards see them before anything happens.
    pub fn new() -> Self {
        let mut t = Totals::default();
        for (name, kind, _) in VARIABLES {
            match kind {
                Kind::Counter => {
                    t.counters.insert(name.to_string(), 0);
                }
                Kind::Map => {
                    t.maps.insert(name.to_string(), BTreeMap::new());
                }
            }
        }
        t
    }

    /// Adds one pushed increase, or drops and counts it.
    pub fn apply(&mut self, budget: &mut Budget, d: &Delta) {
        if let Err(why) = self.try_apply(budget, d) {
            self.count(names::MONITORD_DROPPED_DELTAS, Some(why.label()));
            self.count(names::MONITORD_DROPPED_KEYS, None);
        }
    }

    fn try_apply(&mut self, budget: &mut Budget, d: &Delta) -> Result<(), Dropped> {
        if d.var.is_empty()
            || d.var.len() > MAX_NAME
            || d.label.as_ref().is_some_and(|l| l.len() > MAX_NAME)
        {
            return Err(Dropped::BadName);
        }
        if !names::is_pushable(&d.var) {
            return Err(Dropped::BadPrefix);
        }
        if d.var.starts_with(names::MONITORD_PREFIX) || crate::expvar::FIXED.contains(&&*d.var) {
            return Err(Dropped::Reserved);
        }
        match &d.label {
            None => {
                if let Some(v) = self.counters.get_mut(&d.var) {
                    *v = v.saturating_add(d.value);
                    return Ok(());
                }
                if self.maps.contains_key(&d.var) {
                    return Err(Dropped::KindMismatch);
                }
                self.new_key(budget)?;
                self.counters.insert(d.var.clone(), d.value);
            }
            Some(label) => {
                if self.counters.contains_key(&d.var) {
                    return Err(Dropped::KindMismatch);
                }
                if let Some(v) = self.maps.get_mut(&d.var).and_then(|m| m.get_mut(label)) {
                    *v = v.saturating_add(d.value);
                    return Ok(());
                }
                self.new_key(budget)?;
                self.maps
                    .entry(d.var.clone())
                    .or_default()
                    .insert(label.clone(), d.value);
            }
        }
        Ok(())
    }

    /// Takes one key from every budget it counts against, or none.
    fn new_key(&mut self, budget: &mut Budget) -> Result<(), Dropped> {
        if budget.new_keys >= MAX_NEW_KEYS_PER_CONNECTION {
            return Err(Dropped::ConnectionKeys);
        }
        let role = self.role_keys.entry(budget.role).or_default();
        if *role >= MAX_KEYS_PER_ROLE {
            return Err(Dropped::RoleKeys);
        }
        if self.keys >= MAX_KEYS {
            return Err(Dropped::MaxKeys);
        }
        *role += 1;
        self.keys += 1;
        budget.new_keys += 1;
        Ok(())
    }

    /// Counts one of monitord's own events. These are fixed variables of
    /// [`VARIABLES`] with fixed labels, so they take no peer's budget.
    pub fn count(&mut self, var: &str, label: Option<&str>) {
        match label {
            None => {
                if let Some(v) = self.counters.get_mut(var) {
                    *v = v.saturating_add(1);
                }
            }
            Some(label) => {
                if let Some(map) = self.maps.get_mut(var) {
                    let v = map.entry(label.to_string()).or_default();
                    *v = v.saturating_add(1);
                }
            }
        }
    }

    /// Records a registration, keeping a version of at most [`MAX_NAME`]
    /// bytes and the flags [`bounded_flags`] keeps; what is left out is
    /// counted.
    /// Returns the id to give [`Totals::unregister`].
    pub fn register(
        &mut self,
        role: Role,
        pid: u32,
        version: String,
        flags: Vec<(String, String)>,
        config: String,
    ) -> u64 {
        let mut dropped = 0;
        let version = if version.len() <= MAX_NAME {
            version
        } else {
            dropped += 1;
            "unknown".to_string()
        };
        let kept = bounded_flags(&flags);
        dropped += flags.len() - kept.len();
        let flags = kept;
        for _ in 0..dropped {
            self.count(names::MONITORD_DROPPED_REGISTER_FIELDS, None);
        }
        self.next_process += 1;
        let id = self.next_process;
        let config = if config.len() <= tambo_proto::monitor::MAX_CONFIG {
            config
        } else {
            self.count(names::MONITORD_DROPPED_REGISTER_FIELDS, None);
            String::new()
        };
        self.processes.push(Process {
            id,
            role,
            pid,
            version,
            flags,
            config,
            state: String::new(),
            active: Vec::new(),
            profiler: None,
            connected: true,
        });
        id
    }

    /// Records the traces a process has running, those its role may
    /// record and within the bounds; false if any was left out.
    pub fn set_active(&mut self, id: u64, traces: Vec<tambo_proto::trace::TraceRecord>) -> bool {
        let Some(p) = self.processes.iter_mut().find(|p| p.id == id) else {
            return true;
        };
        let n = traces.len();
        let role = p.role;
        p.active = traces
            .into_iter()
            .filter(|r| crate::traces::acceptable(role, r))
            .take(tambo_proto::trace::MAX_ACTIVE)
            .collect();
        p.active.len() == n
    }

    /// Where to ask a process for its profiles.
    pub fn set_profiler(&mut self, id: u64, tx: tokio::sync::mpsc::Sender<crate::pprof::Ask>) {
        if let Some(p) = self.processes.iter_mut().find(|p| p.id == id) {
            p.profiler = Some(tx);
        }
    }

    /// Records what a process said of its runtime.
    pub fn set_state(&mut self, id: u64, state: String) {
        if let Some(p) = self.processes.iter_mut().find(|p| p.id == id) {
            p.state = state;
        }
    }

    /// Whether this run of a process is new to this monitord (its
    /// baseline counts); remembers it.
    pub fn first_time(&mut self, role: Role, instance: u64) -> bool {
        let seen = self.instances.entry(role).or_default();
        if seen.contains(&instance) {
            return false;
        }
        if seen.len() >= MAX_INSTANCES {
            seen.pop_front();
        }
        seen.push_back(instance);
        true
    }

    /// Marks a registered process as gone.
    pub fn unregister(&mut self, id: u64) {
        if let Some(p) = self.processes.iter_mut().find(|p| p.id == id) {
            p.connected = false;
            p.profiler = None;
        }
        let gone = self.processes.iter().filter(|p| !p.connected).count();
        if gone > MAX_GONE_PROCESSES {
            let mut extra = gone - MAX_GONE_PROCESSES;
            // The oldest go first.
            self.processes.retain(|p| {
                if !p.connected && extra > 0 {
                    extra -= 1;
                    false
                } else {
                    true
                }
            });
        }
    }

    /// How many increases were dropped for `why`.
    #[cfg(test)]
    pub fn dropped(&self, why: Dropped) -> u64 {
        self.maps[names::MONITORD_DROPPED_DELTAS]
            .get(why.label())
            .copied()
            .unwrap_or(0)
    }
}

pub type Shared = Arc<Mutex<Totals>>;

pub fn lock(t: &Shared) -> std::sync::MutexGuard<'_, Totals> {
    t.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_is_counted_once_and_no_role_pushes_out_anothers() {
        let mut t = Totals::new();
        assert!(t.first_time(Role::Queued, 7));
        assert!(!t.first_time(Role::Queued, 7), "a reconnection");
        // smtpd registering many runs does not make queued's new again.
        for i in 0..2 * MAX_INSTANCES as u64 {
            t.first_time(Role::Smtpd, i);
        }
        assert!(!t.first_time(Role::Queued, 7));
        assert!(t.first_time(Role::Deliverd, 7), "another role's run");
    }
    use tambo_proto::monitor::{MAX_FLAG_VALUE, MAX_FLAGS};

    fn d(var: &str, label: Option<&str>, value: u64) -> Delta {
        Delta {
            var: var.into(),
            label: label.map(String::from),
            value,
        }
    }

    #[test]
    fn sums_counters_and_maps() {
        let mut t = Totals::new();
        let mut b = Budget::new(Role::Smtpd);
        assert_eq!(t.counters["chasquid/queue/putCount"], 0);
        t.apply(&mut b, &d("chasquid/queue/putCount", None, 2));
        t.apply(&mut b, &d("chasquid/queue/putCount", None, 3));
        t.apply(&mut b, &d("chasquid/smtpIn/commandCount", Some("EHLO"), 1));
        t.apply(&mut b, &d("chasquid/smtpIn/commandCount", Some("EHLO"), 1));
        assert_eq!(t.counters["chasquid/queue/putCount"], 5);
        assert_eq!(t.maps["chasquid/smtpIn/commandCount"]["EHLO"], 2);
        // A label on a plain counter is refused, not mixed in; so is a
        // plain increase of a map.
        t.apply(&mut b, &d("chasquid/queue/putCount", Some("x"), 1));
        t.apply(&mut b, &d("chasquid/smtpIn/commandCount", None, 1));
        assert_eq!(t.dropped(Dropped::KindMismatch), 2);
        assert_eq!(t.counters[names::MONITORD_DROPPED_KEYS], 2);
        assert_eq!(t.counters["chasquid/queue/putCount"], 5);
    }

    #[test]
    fn long_or_empty_names_are_dropped_and_the_batch_goes_on() {
        let mut t = Totals::new();
        let mut b = Budget::new(Role::Smtpd);
        let long = "x".repeat(MAX_NAME + 1);
        let limit = format!("tambo/{}", "y".repeat(MAX_NAME - "tambo/".len()));
        for delta in [
            d(&long, None, 1),
            d("tambo/e", Some(&long), 1),
            d("", None, 1),
            d(&limit, Some(&limit), 7),
            d("chasquid/queue/putCount", None, 1),
        ] {
            t.apply(&mut b, &delta);
        }
        assert_eq!(t.dropped(Dropped::BadName), 3);
        assert!(!t.counters.contains_key(&long));
        assert!(!t.maps.contains_key("tambo/e"));
        assert!(!t.counters.contains_key(""));
        assert_eq!(t.maps[&limit][&limit], 7, "names at the limit are kept");
        assert_eq!(t.counters["chasquid/queue/putCount"], 1);
    }

    #[test]
    fn monitord_own_variables_cannot_be_pushed() {
        let mut t = Totals::new();
        let mut b = Budget::new(Role::Smtpd);
        t.apply(&mut b, &d(names::MONITORD_DROPPED_KEYS, None, 1_000_000));
        t.apply(&mut b, &d("tambo/monitord/new", Some("x"), 1));
        assert_eq!(t.dropped(Dropped::Reserved), 2);
        assert_eq!(t.counters[names::MONITORD_DROPPED_KEYS], 2);
        assert!(!t.maps.contains_key("tambo/monitord/new"));
    }

    #[test]
    fn fixed_entries_cannot_be_pushed() {
        let mut t = Totals::new();
        let mut b = Budget::new(Role::Smtpd);
        for name in crate::expvar::FIXED {
            t.apply(&mut b, &d(name, None, 1));
            t.apply(&mut b, &d(name, Some("x"), 1));
        }
        // `cmdline` is under no pushed prefix; the others are reserved.
        assert_eq!(t.dropped(Dropped::BadPrefix), 2);
        assert_eq!(
            t.dropped(Dropped::Reserved),
            2 * (crate::expvar::FIXED.len() as u64 - 1)
        );
        for name in crate::expvar::FIXED {
            assert!(!t.counters.contains_key(name), "{name}");
            assert!(!t.maps.contains_key(name), "{name}");
        }
    }

    #[test]
    fn names_outside_chasquid_and_tambo_are_dropped() {
        let mut t = Totals::new();
        let mut b = Budget::new(Role::Smtpd);
        for var in [
            "other/x", "tambo", "tambo/", "chasquid", "tambo_x", "/tambo/x", "Tambo/x",
        ] {
            t.apply(&mut b, &d(var, None, 1));
            t.apply(&mut b, &d(var, Some("l"), 1));
        }
        assert_eq!(t.dropped(Dropped::BadPrefix), 14);
        assert_eq!(t.counters[names::MONITORD_DROPPED_KEYS], 14);
        t.apply(&mut b, &d("tambo/x", None, 1));
        t.apply(&mut b, &d("chasquid/x", Some("l"), 1));
        assert_eq!(t.counters["tambo/x"], 1);
        assert_eq!(t.maps["chasquid/x"]["l"], 1);
    }

    #[test]
    fn each_connection_has_a_key_budget() {
        let mut t = Totals::new();
        let mut hog = Budget::new(Role::Smtpd);
        for i in 0..MAX_NEW_KEYS_PER_CONNECTION + 5 {
            t.apply(&mut hog, &d("tambo/x", Some(&i.to_string()), 1));
        }
        assert_eq!(t.maps["tambo/x"].len(), MAX_NEW_KEYS_PER_CONNECTION);
        assert_eq!(t.dropped(Dropped::ConnectionKeys), 5);
        // A plain counter is a key too.
        t.apply(&mut hog, &d("tambo/y", None, 1));
        assert!(!t.counters.contains_key("tambo/y"));
        assert_eq!(t.dropped(Dropped::ConnectionKeys), 6);
        // Increases to keys that exist still apply, the connection's own
        // and the known ones.
        t.apply(&mut hog, &d("tambo/x", Some("0"), 4));
        t.apply(&mut hog, &d("chasquid/queue/putCount", None, 1));
        t.apply(
            &mut hog,
            &d("chasquid/smtpIn/commandCount", Some("EHLO"), 1),
        );
        assert_eq!(t.maps["tambo/x"]["0"], 5);
        assert_eq!(t.counters["chasquid/queue/putCount"], 1);
        assert_eq!(t.dropped(Dropped::ConnectionKeys), 7, "EHLO is a new key");
        // Another connection, even of the same role, has its own budget.
        let mut other = Budget::new(Role::Smtpd);
        t.apply(
            &mut other,
            &d("chasquid/smtpIn/commandCount", Some("EHLO"), 1),
        );
        t.apply(&mut other, &d("tambo/x", Some("new"), 1));
        assert_eq!(t.maps["chasquid/smtpIn/commandCount"]["EHLO"], 1);
        assert_eq!(t.maps["tambo/x"]["new"], 1);
        assert_eq!(t.dropped(Dropped::ConnectionKeys), 7);
    }

    #[test]
    fn each_role_has_a_key_budget() {
        let mut t = Totals::new();
        // Many connections of one role cannot take more than its share.
        let mut added = 0;
        for c in 0..MAX_KEYS_PER_ROLE / MAX_NEW_KEYS_PER_CONNECTION + 1 {
            let mut b = Budget::new(Role::Smtpd);
            for i in 0..MAX_NEW_KEYS_PER_CONNECTION {
                t.apply(&mut b, &d("tambo/x", Some(&format!("{c}.{i}")), 1));
            }
            added += MAX_NEW_KEYS_PER_CONNECTION;
        }
        assert_eq!(t.maps["tambo/x"].len(), MAX_KEYS_PER_ROLE);
        assert_eq!(
            t.dropped(Dropped::RoleKeys),
            (added - MAX_KEYS_PER_ROLE) as u64
        );
        // Other roles still add theirs.
        let mut q = Budget::new(Role::Queued);
        t.apply(&mut q, &d("tambo/q", Some("a"), 1));
        assert_eq!(t.maps["tambo/q"]["a"], 1);
    }

    #[test]
    fn keys_are_bounded_in_all() {
        let mut t = Totals::new();
        // Past what every role's budget adds up to, with more roles than
        // there are (only possible here).
        let roles = MAX_KEYS / MAX_KEYS_PER_ROLE + 1;
        let all = [
            Role::Smtpd,
            Role::Queued,
            Role::Deliverd,
            Role::Ctl,
            Role::Monitord,
        ];
        assert!(roles <= all.len());
        for role in &all[..roles] {
            for c in 0..MAX_KEYS_PER_ROLE / MAX_NEW_KEYS_PER_CONNECTION {
                let mut b = Budget::new(*role);
                for i in 0..MAX_NEW_KEYS_PER_CONNECTION {
                    t.apply(&mut b, &d("tambo/x", Some(&format!("{role:?}{c}.{i}")), 1));
                }
            }
        }
        assert_eq!(t.maps["tambo/x"].len(), MAX_KEYS);
        assert_eq!(
            t.dropped(Dropped::MaxKeys),
            (roles * MAX_KEYS_PER_ROLE - MAX_KEYS) as u64
        );
    }

    #[test]
    fn registrations_are_bounded() {
        let mut t = Totals::new();
        let mut flags: Vec<(String, String)> = (0..MAX_FLAGS + 3)
            .map(|i| (format!("f{i}"), "v".into()))
            .collect();
        flags.insert(0, ("long".into(), "v".repeat(MAX_FLAG_VALUE + 1)));
        flags.insert(1, ("k".repeat(MAX_NAME + 1), "v".into()));
        flags.insert(2, ("config_overrides".into(), "v".repeat(MAX_FLAG_VALUE)));
        let id = t.register(
            Role::Smtpd,
            1,
            "9".repeat(MAX_NAME + 1),
            flags,
            String::new(),
        );
        let p = &t.processes[0];
        assert_eq!(p.version, "unknown");
        assert_eq!(p.flags.len(), MAX_FLAGS);
        assert_eq!(p.flags[0].0, "config_overrides");
        // The version, two over-long flags and the four past MAX_FLAGS.
        assert_eq!(t.counters[names::MONITORD_DROPPED_REGISTER_FIELDS], 7);
        t.unregister(id);
        assert!(!t.processes[0].connected);
    }

    #[test]
    fn gone_processes_are_forgotten_oldest_first() {
        let mut t = Totals::new();
        let live = t.register(Role::Queued, 1, "v".into(), vec![], String::new());
        for pid in 2..MAX_GONE_PROCESSES as u32 + 12 {
            let id = t.register(Role::Smtpd, pid, "v".into(), vec![], String::new());
            t.unregister(id);
        }
        assert_eq!(t.processes.len(), MAX_GONE_PROCESSES + 1);
        assert!(t.processes[0].connected);
        assert_eq!(t.processes[1].pid, 12);
        // Ids stay valid whatever was removed before them.
        t.unregister(live);
        assert!(!t.processes[0].connected);
    }
}
