//! Who may send where: the RCPT decision (is the domain ours, does the
//! address exist, may this session relay) and alias resolution at queue
//! time (REFERENCE §2.7, §5.3).
//!
//! Relaying needs an [`Authenticated`], which only a successful password
//! check can create; a session without one can only reach local addresses,
//! whatever a compromised smtpd claims.
//!
//! Everything here is synchronous and reads only tambo's own files. When
//! they do not know an address and Dovecot is on (REFERENCE §5.4 lookup
//! order, §5.5), the answer is a question instead ([`Lookup::AskDovecot`],
//! [`RcptCheck::AskDovecot`], [`Unresolved::AskDovecot`]): the async
//! caller asks Dovecot and, for resolution, runs it again with the answer.

use tambo_common::address;
use tambo_common::aliases::Target;
use tambo_common::config::Config;
use tambo_common::domains::Domains;
use tambo_proto::submit::RcptVerdict;

use crate::item::{Kind, Recipient, Status};

/// Proof that a session authenticated. Only the session's AUTH path
/// makes one ([`Authenticated::after_check`]), after the password checked
/// out; relay (and later DKIM signing) needs one, so a session without it
/// can only reach local addresses, whatever a compromised smtpd claims.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authenticated {
    /// `user@domain`, normalised.
    user: String,
}

impl Authenticated {
    /// Only for a password that was just checked.
    pub(crate) fn after_check(user: String) -> Self {
        Self { user }
    }

    pub fn user(&self) -> &str {
        &self.user
    }
}

/// Deepest alias chain followed.
pub const MAX_ALIAS_DEPTH: usize = 10;

/// Whether a local address is a user (or, for existence, anything that
/// takes mail), as far as tambo's files can tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    Yes,
    No,
    /// The files do not know it and Dovecot is on: Dovecot's userdb
    /// answer for this id (`user@domain`, or a bare `user`) decides.
    AskDovecot(String),
}

/// The RCPT decision, or the one question left for Dovecot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RcptCheck {
    Done(RcptVerdict),
    /// A local address no alias, catch-all or users file knows: accepted
    /// if Dovecot knows this id, `NoSuchUser` if not, `TempError`
    /// (451 4.4.3) if Dovecot cannot be asked.
    AskDovecot(String),
}

/// Why [`Policy::resolve_with`] gave no recipients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unresolved {
    /// The alias files cannot resolve it (a loop, a bad target).
    Failed(String),
    /// Whether this id is a Dovecot user decides where the mail goes: ask,
    /// then resolve again with the answer.
    AskDovecot(String),
}

pub struct Policy<'a> {
    pub cfg: &'a Config,
    pub domains: &'a Domains,
}

/// An address split and normalised.
struct Addr {
    user: String,
    domain: String,
}

impl Policy<'_> {
    fn parse(&self, addr: &str) -> Result<Addr, String> {
        let (user, domain) = address::split(addr);
        let domain = address::normalize_domain(domain).map_err(|e| e.to_string())?;
        let user = address::normalize_user(user).map_err(|e| e.to_string())?;
        Ok(Addr { user, domain })
    }

    fn clean(&self, user: &str) -> String {
        address::clean_user(user, &self.cfg.drop_characters, &self.cfg.suffix_separators)
    }

    fn exact_key(&self, user: &str) -> String {
        address::remove_drops(user, &self.cfg.drop_characters, &self.cfg.suffix_separators)
    }

    /// Gives a domain-less RCPT its domain: `postmaster` (any case) is
    /// ours at the host name if that is a local domain, else at the first
    /// local domain (RFC 5321 §4.5.1 requires accepting it). Other
    /// domain-less addresses are left alone (and are unknown).
    pub fn qualify(&self, to: &str) -> String {
        if to.contains('@') || !to.eq_ignore_ascii_case("postmaster") {
            return to.to_string();
        }
        let host = address::normalize_domain(&self.cfg.hostname).unwrap_or_default();
        let domain = if self.domains.get(&host).is_some() {
            host
        } else {
            self.domains.first().unwrap_or("localhost").to_string()
        };
        format!("postmaster@{domain}")
    }

    /// Decides one RCPT, as far as tambo's files can.
    pub fn check_rcpt(&self, to: &str, auth: Option<&Authenticated>) -> RcptCheck {
        let (_, raw_domain) = address::split(to);
        let domain = match address::normalize_domain(raw_domain) {
            Ok(d) => d,
            Err(e) => return RcptCheck::Done(RcptVerdict::Invalid(e.to_string())),
        };
        if !self.domains.is_local(&domain) {
            return RcptCheck::Done(if auth.is_some() {
                RcptVerdict::Accepted
            } else {
                RcptVerdict::RelayDenied
            });
        }
        let a = match self.parse(to) {
            Ok(a) => a,
            Err(e) => return RcptCheck::Done(RcptVerdict::Invalid(e)),
        };
        match self.exists(&a) {
            Lookup::Yes => RcptCheck::Done(RcptVerdict::Accepted),
            Lookup::No => RcptCheck::Done(RcptVerdict::NoSuchUser),
            Lookup::AskDovecot(id) => RcptCheck::AskDovecot(id),
        }
    }

    /// Whether an authenticated user may send as `from` when the sender is
    /// bound to the login: the null sender, their own address (any suffix
    /// or drop characters, unless an alias is written for that exact
    /// address), or an alias whose expansion includes them (a team alias
    /// lets each member send as the team).
    pub fn may_send_as(&self, from: &str, auth: &Authenticated) -> bool {
        if from.is_empty() {
            return true;
        }
        let Ok(me) = self.parse(auth.user()) else {
            return false;
        };
        let me = join(&self.clean(&me.user), &me.domain);
        let Ok(a) = self.parse(from) else {
            return false;
        };
        if !self.domains.is_local(&a.domain) {
            return false;
        }
        let clean = self.clean(&a.user);
        let domain = self.domains.get(&a.domain);
        // An alias written for the address exactly (`bob+invoices:
        // accounting`) decides, as it does for delivery: the suffix rule
        // must not let bob send as what delivers to accounting.
        let exact = domain.is_some_and(|d| d.aliases.get(&self.exact_key(&a.user)).is_some());
        if !exact && join(&clean, &a.domain) == me {
            return true;
        }
        // Only an alias written for this address counts, not the catch-all:
        // owning `*` must not let a user send as every address of the domain.
        let explicit = exact || domain.is_some_and(|d| d.aliases.get(&clean).is_some());
        explicit
            && self
                .resolve(from)
                .is_ok_and(|rs| rs.iter().any(|r| r.kind == Kind::Email && r.address == me))
    }

    /// Whether mail to `addr` may be queued by queued itself (a DSN): the
    /// RCPT rule for local addresses (an alias, a catch-all or a user),
    /// and any remote address.
    pub fn deliverable(&self, addr: &str) -> Lookup {
        let (_, raw_domain) = address::split(addr);
        match address::normalize_domain(raw_domain) {
            Ok(d) if !self.domains.is_local(&d) => Lookup::Yes,
            Ok(_) => match self.parse(addr) {
                Ok(a) => self.exists(&a),
                Err(_) => Lookup::No,
            },
            Err(_) => Lookup::No,
        }
    }

    /// Whether a resolved local address is a user of its domain (clean
    /// form), i.e. has a mailbox: in the users file, else Dovecot's call.
    pub fn is_user(&self, addr: &str) -> Lookup {
        let Ok(a) = self.parse(addr) else {
            return Lookup::No;
        };
        let clean = self.clean(&a.user);
        if self
            .domains
            .get(&a.domain)
            .is_some_and(|d| d.users.contains(&clean))
        {
            return Lookup::Yes;
        }
        self.beyond_the_files(&clean, &a.domain)
    }

    /// REFERENCE §5.3 Exists: an exact or clean-form alias, a catch-all,
    /// or the clean form is a user (users file, then Dovecot).
    fn exists(&self, a: &Addr) -> Lookup {
        let clean = self.clean(&a.user);
        if let Some(d) = self.domains.get(&a.domain)
            && (d.aliases.get(&self.exact_key(&a.user)).is_some()
                || d.aliases.get(&clean).is_some()
                || d.aliases.get("*").is_some()
                || d.users.contains(&clean))
        {
            return Lookup::Yes;
        }
        self.beyond_the_files(&clean, &a.domain)
    }

    /// The answer for a user the files do not have (REFERENCE §5.4: the
    /// file said "no"): Dovecot's, if it is on, local domains without a
    /// directory (`localhost`) included.
    ///
    /// A recipient without a domain stays unknown (docs/design-notes.md,
    /// "`postmaster` without a domain"): a yes would send mail to a
    /// mailbox path with an empty domain. Bare names reach Dovecot at AUTH
    /// only, which does not come through here.
    fn beyond_the_files(&self, clean_user: &str, domain: &str) -> Lookup {
        if self.cfg.dovecot_auth && !domain.is_empty() {
            Lookup::AskDovecot(join(clean_user, domain))
        } else {
            Lookup::No
        }
    }

    /// Expands one accepted RCPT into final recipients, counting every
    /// address the files do not know as no user (without asking Dovecot:
    /// a conservative answer, for the checks that cannot wait for it).
    pub fn resolve(&self, rcpt: &str) -> Result<Vec<Recipient>, String> {
        self.resolve_with(rcpt, &|_| Some(false))
            .map_err(|e| match e {
                Unresolved::Failed(e) => e,
                Unresolved::AskDovecot(id) => format!("{id}: Dovecot was not asked"),
            })
    }

    /// Expands one accepted RCPT into final recipients. `dovecot` holds
    /// Dovecot's answers so far (id → is a user); an id it has no answer
    /// for, when the answer matters, ends the resolution with
    /// [`Unresolved::AskDovecot`].
    pub fn resolve_with(
        &self,
        rcpt: &str,
        dovecot: &dyn Fn(&str) -> Option<bool>,
    ) -> Result<Vec<Recipient>, Unresolved> {
        let mut out = Vec::new();
        self.resolve_into(rcpt, rcpt, 0, dovecot, &mut out)?;
        // The same final address reached twice gets one delivery.
        let mut seen = std::collections::HashSet::new();
        out.retain(|r| seen.insert((r.address.clone(), format!("{:?}", r.kind))));
        Ok(out)
    }

    fn resolve_into(
        &self,
        addr: &str,
        original: &str,
        depth: usize,
        dovecot: &dyn Fn(&str) -> Option<bool>,
        out: &mut Vec<Recipient>,
    ) -> Result<(), Unresolved> {
        if depth > MAX_ALIAS_DEPTH {
            return Err(Unresolved::Failed(format!(
                "alias recursion deeper than {MAX_ALIAS_DEPTH} levels resolving {original}"
            )));
        }
        let a = self
            .parse(addr)
            .map_err(|e| Unresolved::Failed(format!("{addr}: {e}")))?;
        let email = |address: String, local: bool| Recipient {
            address,
            kind: Kind::Email,
            local,
            status: Status::Pending,
            last_failure: String::new(),
            permanent: false,
            original_address: original.to_string(),
        };
        if !self.domains.is_local(&a.domain) {
            out.push(email(join(&a.user, &a.domain), false));
            return Ok(());
        }
        let clean = self.clean(&a.user);
        let clean_addr = join(&clean, &a.domain);
        let Some(d) = self.domains.get(&a.domain) else {
            out.push(email(clean_addr, true));
            return Ok(());
        };
        // Step 4's "the clean form is a user": the users file, then
        // Dovecot. Asked only where the answer changes the result.
        let is_user = || -> Result<bool, Unresolved> {
            if d.users.contains(&clean) {
                return Ok(true);
            }
            match self.beyond_the_files(&clean, &a.domain) {
                Lookup::AskDovecot(id) => dovecot(&id).ok_or(Unresolved::AskDovecot(id)),
                Lookup::Yes => Ok(true),
                Lookup::No => Ok(false),
            }
        };
        let targets = match d
            .aliases
            .get(&self.exact_key(&a.user))
            .or_else(|| d.aliases.get(&clean))
        {
            Some(t) => t,
            // A user beats the catch-all; without a catch-all, user or
            // not, the clean form is the result (a non-user fails later).
            None => match d.aliases.get("*") {
                Some(t) if !is_user()? => t,
                _ => {
                    out.push(email(clean_addr, true));
                    return Ok(());
                }
            },
        };
        for t in targets {
            match t {
                Target::Pipe(cmd) => out.push(Recipient {
                    kind: Kind::Pipe,
                    ..email(cmd.clone(), true)
                }),
                Target::Forward { address, via } => out.push(Recipient {
                    kind: Kind::Forward { via: via.clone() },
                    ..email(address.clone(), false)
                }),
                Target::Email(target) => {
                    let (tuser, tdomain) = address::split(target);
                    // `*` stands for the user as given at RCPT (drops and
                    // suffix kept).
                    let target = if tuser == "*" {
                        join(&a.user, tdomain)
                    } else {
                        target.clone()
                    };
                    // An alias that names itself (`ann: ann, copy@x`) means
                    // "also deliver here", not a loop.
                    let t = self
                        .parse(&target)
                        .map_err(|e| Unresolved::Failed(format!("{target}: {e}")))?;
                    if t.domain == a.domain && self.clean(&t.user) == clean && is_user()? {
                        out.push(email(clean_addr.clone(), true));
                        continue;
                    }
                    self.resolve_into(&target, original, depth + 1, dovecot, out)?;
                }
            }
        }
        Ok(())
    }
}

fn join(user: &str, domain: &str) -> String {
    if domain.is_empty() {
        user.to_string()
    } else {
        format!("{user}@{domain}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use tambo_common::aliases::Aliases;
    use tambo_common::domains::Domain;
    use tambo_common::users::UserDb;

    const ALIASES: &str = "# role accounts
postmaster: ann
sales.team: bob, carol@partner.example
bob+invoices: accounting
archive: | /usr/local/bin/store-copy --folder inbox
backup: dave via mx1.backup.example/mx2.backup.example
loop1: loop2
loop2: loop1
self: ann, self
dovey: dovey, bob
*: ann
";

    fn setup() -> (Config, Domains) {
        let cfg = Config::defaults(Path::new("/etc/tambo"));
        let users =
            UserDb::parse("ann !\nbob !\naccounting !\nself !\n", Path::new("users")).unwrap();
        let aliases =
            Aliases::parse(ALIASES, Path::new("aliases"), "example.org", ".", "+").unwrap();
        let plain = Domain {
            users: UserDb::parse("zed !\n", Path::new("users")).unwrap(),
            aliases: Aliases::default(),
        };
        let domains = Domains::from_parts([
            ("example.org".to_string(), Domain { users, aliases }),
            ("plain.example".to_string(), plain),
        ]);
        (cfg, domains)
    }

    impl Policy<'_> {
        /// The RCPT verdict from the files alone.
        fn rcpt(&self, to: &str, auth: Option<&Authenticated>) -> RcptVerdict {
            match self.check_rcpt(to, auth) {
                RcptCheck::Done(v) => v,
                other => panic!("{to}: {other:?}"),
            }
        }
    }

    fn yes(l: Lookup) -> bool {
        match l {
            Lookup::Yes => true,
            Lookup::No => false,
            Lookup::AskDovecot(id) => panic!("asks Dovecot about {id}"),
        }
    }

    fn addrs(rs: &[Recipient]) -> Vec<String> {
        rs.iter().map(|r| r.address.clone()).collect()
    }

    #[test]
    fn rcpt_verdicts() {
        let (cfg, domains) = setup();
        let p = Policy {
            cfg: &cfg,
            domains: &domains,
        };
        assert_eq!(p.rcpt("ann@example.org", None), RcptVerdict::Accepted);
        assert_eq!(
            p.rcpt("Z.E.D+tag@Plain.Example", None),
            RcptVerdict::Accepted
        );
        assert_eq!(
            p.rcpt("nobody@plain.example", None),
            RcptVerdict::NoSuchUser
        );
        assert_eq!(
            p.rcpt("nobody@example.org", None),
            RcptVerdict::Accepted,
            "catch-all"
        );
        assert_eq!(
            p.rcpt("x@elsewhere.example", None),
            RcptVerdict::RelayDenied
        );
        let auth = Authenticated::after_check("ann@example.org".into());
        assert_eq!(
            p.rcpt("x@elsewhere.example", Some(&auth)),
            RcptVerdict::Accepted
        );
        assert!(matches!(p.rcpt("x@xn--zz", None), RcptVerdict::Invalid(_)));
    }

    #[test]
    fn internal_mail_follows_the_rcpt_rule() {
        let (cfg, domains) = setup();
        let p = Policy {
            cfg: &cfg,
            domains: &domains,
        };
        assert!(yes(p.deliverable("ann@example.org")));
        assert!(yes(p.deliverable("anyone@example.org")), "catch-all");
        assert!(yes(p.deliverable("someone@remote.example")));
        assert!(!yes(p.deliverable("nobody@plain.example")));
        assert!(
            !yes(p.deliverable("root@localhost")),
            "localhost has no users"
        );
        assert!(!yes(p.deliverable("x@xn--zz")));
        assert!(yes(p.is_user("ann@example.org")));
        assert!(yes(p.is_user("Z.E.D+x@plain.example")));
        assert!(
            !yes(p.is_user("postmaster@example.org")),
            "an alias, not a mailbox"
        );
        assert!(!yes(p.is_user("root@localhost")));
    }

    #[test]
    fn the_sender_is_bound_to_the_login() {
        let (cfg, domains) = setup();
        let p = Policy {
            cfg: &cfg,
            domains: &domains,
        };
        let ann = Authenticated::after_check("ann@example.org".into());
        assert!(p.may_send_as("", &ann), "the null sender");
        assert!(p.may_send_as("ann@example.org", &ann));
        assert!(
            p.may_send_as("A.nn+lists@Example.ORG", &ann),
            "drops and suffix"
        );
        assert!(
            p.may_send_as("postmaster@example.org", &ann),
            "an alias to ann"
        );
        assert!(!p.may_send_as("bob@example.org", &ann));
        assert!(
            !p.may_send_as("sales.team@example.org", &ann),
            "expands to others"
        );
        // A member of a team alias may send as the team.
        let bob = Authenticated::after_check("bob@example.org".into());
        assert!(p.may_send_as("sales.team@example.org", &bob));
        // An alias for the exact address beats the suffix rule.
        assert!(p.may_send_as("bob+news@example.org", &bob));
        assert!(
            !p.may_send_as("bob+invoices@example.org", &bob),
            "delivers to accounting"
        );
        let accounting = Authenticated::after_check("accounting@example.org".into());
        assert!(p.may_send_as("bob+invoices@example.org", &accounting));
        assert!(!p.may_send_as("ann@elsewhere.example", &ann));
        assert!(!p.may_send_as("zed@plain.example", &ann));
        assert!(
            !p.may_send_as("nobody@example.org", &ann),
            "the catch-all does not count"
        );
    }

    #[test]
    fn bare_postmaster_is_ours() {
        let (cfg, domains) = setup();
        let p = Policy {
            cfg: &cfg,
            domains: &domains,
        };
        let q = p.qualify("PostMaster");
        assert_eq!(q, "postmaster@example.org", "first local domain");
        assert_eq!(p.rcpt(&q, None), RcptVerdict::Accepted);
        assert_eq!(p.qualify("bob"), "bob");
        assert_eq!(p.rcpt("bob", None), RcptVerdict::NoSuchUser);
    }

    #[test]
    fn resolution_follows_the_reference_table() {
        let (cfg, domains) = setup();
        let p = Policy {
            cfg: &cfg,
            domains: &domains,
        };
        assert_eq!(
            addrs(&p.resolve("postmaster@example.org").unwrap()),
            ["ann@example.org"]
        );
        assert_eq!(
            addrs(&p.resolve("Sales.Team+q3@example.org").unwrap()),
            ["bob@example.org", "carol@partner.example"]
        );
        assert_eq!(
            addrs(&p.resolve("bob+invoices@example.org").unwrap()),
            ["accounting@example.org"]
        );
        assert_eq!(
            addrs(&p.resolve("bob+other@example.org").unwrap()),
            ["bob@example.org"]
        );
        let pipe = p.resolve("archive@example.org").unwrap();
        assert_eq!(pipe[0].kind, Kind::Pipe);
        assert_eq!(pipe[0].address, "/usr/local/bin/store-copy --folder inbox");
        let fwd = p.resolve("backup@example.org").unwrap();
        assert_eq!(
            fwd[0].kind,
            Kind::Forward {
                via: vec!["mx1.backup.example".into(), "mx2.backup.example".into()]
            }
        );
        assert_eq!(
            addrs(&p.resolve("nobody@example.org").unwrap()),
            ["ann@example.org"]
        );
        assert_eq!(
            addrs(&p.resolve("x@remote.example").unwrap()),
            ["x@remote.example"]
        );
        assert!(!p.resolve("x@remote.example").unwrap()[0].local);
        assert_eq!(
            p.resolve("postmaster@example.org").unwrap()[0].original_address,
            "postmaster@example.org"
        );
    }

    #[test]
    fn dovecot_is_asked_only_when_the_files_say_no() {
        let (mut cfg, domains) = setup();
        cfg.dovecot_auth = true;
        let p = Policy {
            cfg: &cfg,
            domains: &domains,
        };
        let ask = |id: &str| RcptCheck::AskDovecot(id.to_string());
        // The files know these: Dovecot is never asked.
        assert_eq!(p.rcpt("ann@example.org", None), RcptVerdict::Accepted);
        assert_eq!(
            p.rcpt("nobody@example.org", None),
            RcptVerdict::Accepted,
            "catch-all"
        );
        assert_eq!(p.rcpt("zed@plain.example", None), RcptVerdict::Accepted);
        assert_eq!(
            p.rcpt("x@elsewhere.example", None),
            RcptVerdict::RelayDenied
        );
        // The clean form, users file first.
        assert_eq!(
            p.check_rcpt("D.ave+x@Plain.Example", None),
            ask("dave@plain.example")
        );
        // Local domains without a users file; but not domain-less
        // recipients, which only AUTH sends to Dovecot.
        assert_eq!(p.check_rcpt("root@localhost", None), ask("root@localhost"));
        assert_eq!(p.rcpt("Dave", None), RcptVerdict::NoSuchUser);
        assert_eq!(p.is_user("dave"), Lookup::No);
        assert_eq!(p.is_user("zed@plain.example"), Lookup::Yes);
        assert_eq!(
            p.is_user("Dave+x@plain.example"),
            Lookup::AskDovecot("dave@plain.example".into())
        );
        assert_eq!(p.is_user("x@xn--zz"), Lookup::No);
        assert_eq!(
            p.deliverable("dave@plain.example"),
            Lookup::AskDovecot("dave@plain.example".into())
        );
        assert_eq!(p.deliverable("dave@remote.example"), Lookup::Yes);
        assert_eq!(p.deliverable("anyone@example.org"), Lookup::Yes);
    }

    #[test]
    fn a_dovecot_user_beats_the_catch_all() {
        let (mut cfg, domains) = setup();
        cfg.dovecot_auth = true;
        let p = Policy {
            cfg: &cfg,
            domains: &domains,
        };
        let dave = |id: &str| Some(id == "dave@example.org" || id == "dovey@example.org");
        // example.org has a catch-all: whether dave is a user decides.
        assert_eq!(
            p.resolve_with("dave@example.org", &|_| None),
            Err(Unresolved::AskDovecot("dave@example.org".into()))
        );
        let rs = p.resolve_with("Da.ve+x@example.org", &dave).unwrap();
        assert_eq!(addrs(&rs), ["dave@example.org"]);
        assert!(rs[0].local);
        let rs = p.resolve_with("nobody@example.org", &dave).unwrap();
        assert_eq!(addrs(&rs), ["ann@example.org"]);
        // Without a catch-all the answer changes nothing: not asked.
        let rs = p.resolve_with("dave@plain.example", &|_| None).unwrap();
        assert_eq!(addrs(&rs), ["dave@plain.example"]);
        // Users and aliases in the files are never asked about.
        let rs = p.resolve_with("postmaster@example.org", &|_| None).unwrap();
        assert_eq!(addrs(&rs), ["ann@example.org"]);
        // An alias naming itself delivers to a Dovecot user too.
        let rs = p.resolve_with("dovey@example.org", &dave).unwrap();
        assert_eq!(addrs(&rs), ["dovey@example.org", "bob@example.org"]);
        // `resolve` counts what only Dovecot could know as no user.
        assert_eq!(
            addrs(&p.resolve("dave@example.org").unwrap()),
            ["ann@example.org"]
        );
    }

    #[test]
    fn loops_fail_and_self_reference_delivers() {
        let (cfg, domains) = setup();
        let p = Policy {
            cfg: &cfg,
            domains: &domains,
        };
        assert!(
            p.resolve("loop1@example.org")
                .unwrap_err()
                .contains("recursion")
        );
        assert_eq!(
            addrs(&p.resolve("self@example.org").unwrap()),
            ["ann@example.org", "self@example.org"]
        );
    }
}
