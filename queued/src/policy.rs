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

/// The RCPT decision, or the questions left for the hooks and Dovecot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RcptCheck {
    Done(RcptVerdict),
    /// A local address no alias, catch-all or users file knows. It exists
    /// if `hooks/alias-resolve` has an entry for `exact` (then `clean`),
    /// if `hooks/alias-exists` says yes for `clean`, or if Dovecot knows
    /// `dovecot` (when it is on); else `NoSuchUser`. Any of them failing
    /// is a `TempError` (451 4.4.3), never a 550.
    Unknown {
        exact: String,
        clean: String,
        dovecot: Option<String>,
    },
}

/// Why [`Policy::resolve_with`] gave no recipients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unresolved {
    /// The alias files cannot resolve it (a loop, a bad target).
    Failed(String),
    /// Whether this id is a Dovecot user decides where the mail goes: ask,
    /// then resolve again with the answer.
    AskDovecot(String),
    /// `hooks/alias-resolve` must be asked about this address: ask, then
    /// resolve again with its answer.
    AskHook(String),
}

/// What the resolution knows beyond the files: Dovecot's answers (id →
/// is a user) and the alias-resolve hook's (address → its targets). None:
/// not asked yet.
pub struct Oracles<'a> {
    pub dovecot: &'a dyn Fn(&str) -> Option<bool>,
    pub hook: &'a dyn Fn(&str) -> Option<Vec<Target>>,
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

    /// Decides one RCPT, as far as tambo's files can. Mail to another
    /// domain needs an authenticated session, or a client in
    /// `relay_networks` (`trusted_network`).
    pub fn check_rcpt(
        &self,
        to: &str,
        auth: Option<&Authenticated>,
        trusted_network: bool,
    ) -> RcptCheck {
        let (_, raw_domain) = address::split(to);
        let domain = match address::normalize_domain(raw_domain) {
            Ok(d) => d,
            Err(e) => return RcptCheck::Done(RcptVerdict::Invalid(e.to_string())),
        };
        if !self.domains.is_local(&domain) {
            return RcptCheck::Done(if auth.is_some() || trusted_network {
                RcptVerdict::Accepted
            } else {
                RcptVerdict::RelayDenied
            });
        }
        let a = match self.parse(to) {
            Ok(a) => a,
            Err(e) => return RcptCheck::Done(RcptVerdict::Invalid(e)),
        };
        // No mailbox to name (see `resolve_into`): no such user, whatever
        // a catch-all or a hook would say.
        if a.domain.is_empty() || self.clean(&a.user).is_empty() {
            return RcptCheck::Done(RcptVerdict::NoSuchUser);
        }
        let unknown = |dovecot| RcptCheck::Unknown {
            exact: join(&self.exact_key(&a.user), &a.domain),
            clean: join(&self.clean(&a.user), &a.domain),
            dovecot,
        };
        match self.exists(&a) {
            Lookup::Yes => RcptCheck::Done(RcptVerdict::Accepted),
            Lookup::No => unknown(None),
            Lookup::AskDovecot(id) => unknown(Some(id)),
        }
    }

    /// Whether an authenticated user may send as `from` when the sender is
    /// bound to the login: the null sender, their own address (and any
    /// suffix or drop characters on it, unless an alias is written for that
    /// exact spelling), or an alias whose expansion includes them (a team
    /// alias lets each member send as the team).
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
        let key = self.exact_key(&a.user);
        let exact = domain.is_some_and(|d| d.aliases.get(&key).is_some());
        // The login's own address is always theirs, even if an alias of
        // that name forwards it elsewhere; another spelling of it (suffix,
        // drop characters) is theirs unless an alias is written for it.
        if join(&clean, &a.domain) == me && (key == clean || !exact) {
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
        let oracles = Oracles {
            dovecot: &|_| Some(false),
            hook: &|_| Some(Vec::new()),
        };
        self.resolve_with(rcpt, &oracles).map_err(|e| match e {
            Unresolved::Failed(e) => e,
            Unresolved::AskDovecot(id) => format!("{id}: Dovecot was not asked"),
            Unresolved::AskHook(a) => format!("{a}: the alias-resolve hook was not asked"),
        })
    }

    /// Expands one accepted RCPT into final recipients. `oracles` hold
    /// the answers so far beyond the files; a question they have no answer
    /// for, when the answer matters, ends the resolution with
    /// [`Unresolved::AskDovecot`] or [`Unresolved::AskHook`].
    pub fn resolve_with(
        &self,
        rcpt: &str,
        oracles: &Oracles<'_>,
    ) -> Result<Vec<Recipient>, Unresolved> {
        let mut out = Vec::new();
        self.resolve_into(rcpt, rcpt, 0, oracles, &mut out)?;
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
        oracles: &Oracles<'_>,
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
            uncertain: false,
        };
        if !self.domains.is_local(&a.domain) {
            out.push(email(join(&a.user, &a.domain), false));
            return Ok(());
        }
        let clean = self.clean(&a.user);
        // A domain-less address (other than postmaster, qualified at
        // RCPT) or a user part that is all suffix (`+tag@`) names no
        // mailbox: found by fuzzing, it became an empty or `@domain`
        // recipient.
        if a.domain.is_empty() || clean.is_empty() {
            return Err(Unresolved::Failed(format!(
                "{addr}: not a mailbox (no {})",
                if a.domain.is_empty() {
                    "domain"
                } else {
                    "user part"
                }
            )));
        }
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
                Lookup::AskDovecot(id) => (oracles.dovecot)(&id).ok_or(Unresolved::AskDovecot(id)),
                Lookup::Yes => Ok(true),
                Lookup::No => Ok(false),
            }
        };
        // REFERENCE §5.3 steps 2 and 3: the file's entry plus the hook's,
        // for the exact form, then for the clean form. Never the hook for
        // the catch-all.
        let hook = |user: &str| -> Result<Vec<Target>, Unresolved> {
            let addr = join(user, &a.domain);
            (oracles.hook)(&addr).ok_or(Unresolved::AskHook(addr))
        };
        let exact = self.exact_key(&a.user);
        let entry = |key: &str| -> Result<Vec<Target>, Unresolved> {
            let mut t: Vec<Target> = d
                .aliases
                .get(key)
                .map(<[Target]>::to_vec)
                .unwrap_or_default();
            t.extend(hook(key)?);
            Ok(t)
        };
        let mut found = entry(&exact)?;
        if found.is_empty() && clean != exact {
            found = entry(&clean)?;
        }
        let targets = match (!found.is_empty()).then_some(&found[..]) {
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
                    self.resolve_into(&target, original, depth + 1, oracles, out)?;
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
mod tests;
