//! Who may be on the other end of a channel: the uid each role runs as.
//!
//! A peer's `Hello` says which role it claims; the kernel says which uid it
//! runs as (SO_PEERCRED), and that cannot be forged. A connection is taken
//! only if the claimed role's configured user is that uid, in both
//! directions: a server checks its client, a client checks its server (a
//! deliverd that took jobs from an impostor queued would run the impostor's
//! pipe commands).
//!
//! uid 0 is accepted for every role: root can already read every socket,
//! file and process memory, so refusing it would stop nothing and would
//! forbid running a daemon as root, which `tambo run` still does for queued
//! and deliverd until privilege separation lands.
//!
//! In development (every process runs as one normal user who is none of the
//! configured users), every role is that uid, and the check cannot separate
//! roles; [`Identities::describe`] says so.

use std::fmt;

use crate::Role;

/// The user names of the four daemons (`[tambo] *_user`).
#[derive(Debug, Clone, Copy)]
pub struct RoleUsers<'a> {
    pub smtpd: &'a str,
    pub queued: &'a str,
    pub deliverd: &'a str,
    pub monitord: &'a str,
}

impl<'a> RoleUsers<'a> {
    fn all(&self) -> [(Role, &'a str, &'static str); 4] {
        [
            (Role::Smtpd, self.smtpd, "tambo.smtpd_user"),
            (Role::Queued, self.queued, "tambo.queued_user"),
            (Role::Deliverd, self.deliverd, "tambo.deliverd_user"),
            (Role::Monitord, self.monitord, "tambo.monitord_user"),
        ]
    }
}

/// A configured user that does not exist.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("key {key}: user {user:?} does not exist (create it, or set {key} to an existing user)")]
pub struct NoSuchUser {
    /// The config key, e.g. `tambo.smtpd_user`.
    pub key: &'static str,
    pub user: String,
}

/// A user as the system knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Account {
    pub uid: u32,
    /// Primary group.
    pub gid: u32,
}

/// The uid (and primary gid) of each daemon role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identities {
    accounts: [(Role, Account); 4],
    /// Set in development: every role is this one (non-root) uid.
    development: Option<u32>,
    /// Whether uid 0 may play every role (always, outside tests).
    root_is_anyone: bool,
}

impl Identities {
    /// Resolves the configured users for a process playing `me` (the
    /// supervisor and the CLI pass [`Role::Ctl`]).
    ///
    /// Running as root, or as `me`'s own configured user, means a real
    /// installation: every user must exist. Running as anyone else means
    /// development: every role is the current uid.
    pub fn resolve(users: &RoleUsers<'_>, me: Role) -> Result<Self, NoSuchUser> {
        let uid = nix::unistd::geteuid().as_raw();
        let gid = nix::unistd::getegid().as_raw();
        Self::decide(users, me, Account { uid, gid }, lookup)
    }

    /// [`Identities::resolve`] with the current account and the user
    /// lookup given, so the rule can be tested.
    pub fn decide(
        users: &RoleUsers<'_>,
        me: Role,
        current: Account,
        lookup: impl Fn(&str) -> Option<Account>,
    ) -> Result<Self, NoSuchUser> {
        let mine = users
            .all()
            .iter()
            .find(|(r, _, _)| *r == me)
            .and_then(|(_, user, _)| lookup(user));
        let production = current.uid == 0 || mine.is_some_and(|a| a.uid == current.uid);
        if !production {
            return Ok(Self::development(current));
        }
        let mut accounts = [(Role::Smtpd, current); 4];
        for (slot, (role, user, key)) in accounts.iter_mut().zip(users.all()) {
            let account = lookup(user).ok_or_else(|| NoSuchUser {
                key,
                user: user.to_string(),
            })?;
            *slot = (role, account);
        }
        Ok(Self {
            accounts,
            development: None,
            root_is_anyone: true,
        })
    }

    /// Every role runs as `current` (development, and tests).
    pub fn development(current: Account) -> Self {
        Self {
            accounts: [
                (Role::Smtpd, current),
                (Role::Queued, current),
                (Role::Deliverd, current),
                (Role::Monitord, current),
            ],
            development: Some(current.uid),
            root_is_anyone: true,
        }
    }

    /// The same map without the root exception, so tests running as root
    /// can see a refusal.
    pub fn without_root_exception(mut self) -> Self {
        self.root_is_anyone = false;
        self
    }

    /// The account a daemon role runs as; `None` for [`Role::Ctl`].
    pub fn account(&self, role: Role) -> Option<Account> {
        self.accounts
            .iter()
            .find(|(r, _)| *r == role)
            .map(|(_, a)| *a)
    }

    /// Whether a peer running as `uid` may speak as `role`. The CLI
    /// ([`Role::Ctl`]) must be root (or, in development, the one user).
    pub fn allows(&self, role: Role, uid: u32) -> bool {
        if uid == 0 && self.root_is_anyone {
            return true;
        }
        match (role, self.development) {
            (_, Some(dev)) => uid == dev,
            (Role::Ctl, None) => false,
            (role, None) => self.account(role).is_some_and(|a| a.uid == uid),
        }
    }

    /// Whether a peer running as `uid` may play any of `roles`: checked
    /// at accept, before the connection takes a slot or a hello timeout,
    /// so a stranger costs a server nothing.
    pub fn allows_any(&self, roles: &[Role], uid: u32) -> bool {
        roles.iter().any(|r| self.allows(*r, uid))
    }

    pub fn is_development(&self) -> bool {
        self.development.is_some()
    }

    /// Pairs of roles the uid check cannot tell apart (same uid).
    pub fn shared(&self) -> Vec<(Role, Role)> {
        let mut out = Vec::new();
        for (i, (a, x)) in self.accounts.iter().enumerate() {
            for (b, y) in &self.accounts[i + 1..] {
                if x.uid == y.uid {
                    out.push((*a, *b));
                }
            }
        }
        out
    }

    /// The one startup line describing the model, saying plainly when the
    /// uid check cannot separate roles.
    pub fn describe(&self) -> String {
        if let Some(uid) = self.development {
            return format!(
                "development: every process runs as uid {uid}, so the IPC uid check cannot tell the roles apart"
            );
        }
        let mut s = format!("IPC identity: {self}");
        let shared = self.shared();
        if !shared.is_empty() {
            let pairs: Vec<String> = shared
                .iter()
                .map(|(a, b)| format!("{}/{}", a.name(), b.name()))
                .collect();
            s.push_str(&format!(
                "; the uid check cannot tell {} apart (same user)",
                pairs.join(", ")
            ));
        }
        s
    }
}

impl fmt::Display for Identities {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (role, a)) in self.accounts.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{}=uid {}", role.name(), a.uid)?;
        }
        f.write_str(" (and root)")
    }
}

/// Looks a user up by name (getpwnam_r).
pub fn lookup(name: &str) -> Option<Account> {
    match nix::unistd::User::from_name(name) {
        Ok(Some(u)) => Some(Account {
            uid: u.uid.as_raw(),
            gid: u.gid.as_raw(),
        }),
        _ => None,
    }
}

/// Looks a group up by name.
pub fn lookup_group(name: &str) -> Option<u32> {
    match nix::unistd::Group::from_name(name) {
        Ok(Some(g)) => Some(g.gid.as_raw()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const USERS: RoleUsers<'static> = RoleUsers {
        smtpd: "tambo-smtpd",
        queued: "tambo-queue",
        deliverd: "tambo-deliver",
        monitord: "tambo-monitor",
    };

    fn acct(uid: u32) -> Account {
        Account { uid, gid: uid }
    }

    fn system(name: &str) -> Option<Account> {
        match name {
            "tambo-smtpd" => Some(acct(101)),
            "tambo-queue" => Some(acct(102)),
            "tambo-deliver" => Some(acct(103)),
            "tambo-monitor" => Some(acct(104)),
            _ => None,
        }
    }

    #[test]
    fn production_maps_each_role_to_its_user() {
        let ids = Identities::decide(&USERS, Role::Queued, acct(102), system).unwrap();
        assert!(!ids.is_development());
        assert!(ids.allows(Role::Smtpd, 101));
        assert!(!ids.allows(Role::Smtpd, 103), "deliverd is not smtpd");
        assert!(!ids.allows(Role::Deliverd, 101), "smtpd is not deliverd");
        assert!(ids.allows(Role::Deliverd, 0), "root may be anyone");
        assert!(!ids.allows(Role::Ctl, 1000), "the CLI must be root");
        assert!(ids.allows_any(&[Role::Smtpd, Role::Ctl], 101));
        assert!(!ids.allows_any(&[Role::Smtpd, Role::Ctl], 103));
        assert!(ids.shared().is_empty());
        assert!(
            ids.describe().contains("smtpd=uid 101"),
            "{}",
            ids.describe()
        );
    }

    #[test]
    fn root_is_production_and_needs_every_user() {
        assert!(
            !Identities::decide(&USERS, Role::Ctl, acct(0), system)
                .unwrap()
                .is_development()
        );
        let missing = |name: &str| {
            if name == "tambo-monitor" {
                None
            } else {
                system(name)
            }
        };
        let e = Identities::decide(&USERS, Role::Ctl, acct(0), missing).unwrap_err();
        assert_eq!(e.key, "tambo.monitord_user");
        assert!(
            e.to_string().contains("\"tambo-monitor\" does not exist"),
            "{e}"
        );
    }

    #[test]
    fn anyone_else_is_development() {
        // A developer (uid 1000) on a machine with or without the users.
        for lookup in [system as fn(&str) -> Option<Account>, |_: &str| None] {
            let ids = Identities::decide(&USERS, Role::Smtpd, acct(1000), lookup).unwrap();
            assert!(ids.is_development());
            assert!(ids.allows(Role::Deliverd, 1000));
            assert!(ids.allows(Role::Ctl, 1000));
            assert!(!ids.allows(Role::Smtpd, 1001));
            assert!(ids.describe().contains("cannot tell the roles apart"));
        }
    }

    #[test]
    fn shared_users_are_reported() {
        let users = RoleUsers {
            monitord: "tambo-smtpd",
            ..USERS
        };
        let ids = Identities::decide(&users, Role::Ctl, acct(0), system).unwrap();
        assert_eq!(ids.shared(), vec![(Role::Smtpd, Role::Monitord)]);
        assert!(ids.describe().contains("cannot tell smtpd/monitord apart"));
    }
}
