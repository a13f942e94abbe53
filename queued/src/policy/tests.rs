use super::*;
use std::path::Path;
use tambo_common::aliases::{Aliases, Target};
use tambo_common::domains::Domain;
use tambo_common::users::UserDb;

const ALIASES: &str = "# role accounts
postmaster: ann
sales.team: bob, carol@partner.example
bob+invoices: accounting
fwd: fwd@elsewhere.example
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
    let users = UserDb::parse(
        "ann !\nbob !\naccounting !\nself !\nfwd !\n",
        Path::new("users"),
    )
    .unwrap();
    let aliases = Aliases::parse(ALIASES, Path::new("aliases"), "example.org", ".", "+").unwrap();
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
        match self.check_rcpt(to, auth, false) {
            RcptCheck::Done(v) => v,
            RcptCheck::Unknown { dovecot: None, .. } => RcptVerdict::NoSuchUser,
            other => panic!("{to}: {other:?}"),
        }
    }
}

/// Answers from Dovecot only; the alias-resolve hook has no entries.
fn dovecot_only<'a>(dovecot: &'a dyn Fn(&str) -> Option<bool>) -> Oracles<'a> {
    Oracles {
        dovecot,
        hook: &|_| Some(Vec::new()),
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
    // A user whose own name is an alias forwarding elsewhere still sends
    // as their own address.
    let fwd = Authenticated::after_check("fwd@example.org".into());
    assert!(p.may_send_as("fwd@example.org", &fwd));
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
    let ask = |id: &str| Some(id.to_string());
    let asks = |to: &str| match p.check_rcpt(to, None, false) {
        RcptCheck::Unknown { dovecot, .. } => dovecot,
        other => panic!("{to}: {other:?}"),
    };
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
    assert_eq!(asks("D.ave+x@Plain.Example"), ask("dave@plain.example"));
    // Local domains without a users file; but not domain-less
    // recipients, which only AUTH sends to Dovecot.
    assert_eq!(asks("root@localhost"), ask("root@localhost"));
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
        p.resolve_with("dave@example.org", &dovecot_only(&|_| None)),
        Err(Unresolved::AskDovecot("dave@example.org".into()))
    );
    let rs = p
        .resolve_with("Da.ve+x@example.org", &dovecot_only(&dave))
        .unwrap();
    assert_eq!(addrs(&rs), ["dave@example.org"]);
    assert!(rs[0].local);
    let rs = p
        .resolve_with("nobody@example.org", &dovecot_only(&dave))
        .unwrap();
    assert_eq!(addrs(&rs), ["ann@example.org"]);
    // Without a catch-all the answer changes nothing: not asked.
    let rs = p
        .resolve_with("dave@plain.example", &dovecot_only(&|_| None))
        .unwrap();
    assert_eq!(addrs(&rs), ["dave@plain.example"]);
    // Users and aliases in the files are never asked about.
    let rs = p
        .resolve_with("postmaster@example.org", &dovecot_only(&|_| None))
        .unwrap();
    assert_eq!(addrs(&rs), ["ann@example.org"]);
    // An alias naming itself delivers to a Dovecot user too.
    let rs = p
        .resolve_with("dovey@example.org", &dovecot_only(&dave))
        .unwrap();
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

#[test]
fn the_alias_resolve_hook_adds_to_the_files_exact_form_first() {
    let (cfg, domains) = setup();
    let p = Policy {
        cfg: &cfg,
        domains: &domains,
    };
    let asked = std::cell::RefCell::new(Vec::new());
    let hook = |addr: &str| -> Option<Vec<Target>> {
        asked.borrow_mut().push(addr.to_string());
        match addr {
            "sales+eu@example.org" => Some(vec![Target::Email("eu@partner.example".into())]),
            "list@example.org" => Some(vec![Target::Email("bob@elsewhere.example".into())]),
            _ => Some(Vec::new()),
        }
    };
    let oracles = Oracles {
        dovecot: &|_| Some(false),
        hook: &hook,
    };
    // The exact form's entry wins; the clean form is not looked up.
    let rs = p.resolve_with("sales+eu@example.org", &oracles).unwrap();
    assert_eq!(addrs(&rs), ["eu@partner.example"]);
    assert_eq!(*asked.borrow(), ["sales+eu@example.org"]);
    // Nothing for the exact form: the clean form's, hook and file merged.
    asked.borrow_mut().clear();
    let rs = p.resolve_with("list+x@example.org", &oracles).unwrap();
    assert_eq!(addrs(&rs), ["bob@elsewhere.example"]);
    assert_eq!(*asked.borrow(), ["list+x@example.org", "list@example.org"]);
    // Nothing anywhere: the catch-all, which the hook is never asked about.
    asked.borrow_mut().clear();
    let rs = p.resolve_with("nobody@example.org", &oracles).unwrap();
    assert_eq!(addrs(&rs), ["ann@example.org"]);
    assert!(!asked.borrow().iter().any(|a| a.starts_with('*')));
    // An address not answered yet is a question.
    let unknown = Oracles {
        dovecot: &|_| Some(false),
        hook: &|_| None,
    };
    assert_eq!(
        p.resolve_with("ann@example.org", &unknown),
        Err(Unresolved::AskHook("ann@example.org".into()))
    );
}

#[test]
fn trusted_networks_relay_and_unknown_local_addresses_go_to_the_hooks() {
    let (cfg, domains) = setup();
    let p = Policy {
        cfg: &cfg,
        domains: &domains,
    };
    assert_eq!(
        p.check_rcpt("x@elsewhere.example", None, true),
        RcptCheck::Done(RcptVerdict::Accepted)
    );
    assert_eq!(
        p.check_rcpt("x@elsewhere.example", None, false),
        RcptCheck::Done(RcptVerdict::RelayDenied)
    );
    assert_eq!(
        p.check_rcpt("D.ave+x@Plain.Example", None, false),
        RcptCheck::Unknown {
            exact: "dave+x@plain.example".into(),
            clean: "dave@plain.example".into(),
            dovecot: None,
        }
    );
}

/// Found by fuzzing: an address with no domain, or whose user part is
/// all suffix, resolved to an empty (or `@domain`) recipient.
#[test]
fn an_address_that_names_no_mailbox_does_not_resolve() {
    let (cfg, domains) = setup();
    let p = Policy {
        cfg: &cfg,
        domains: &domains,
    };
    let hook = |_: &str| Some(vec![Target::Email("bob@example.org".into())]);
    let o = Oracles {
        dovecot: &|_| Some(false),
        hook: &hook,
    };
    for rcpt in ["+ot", "ann", "+tag@example.org", "+@plain.example"] {
        // Refused at RCPT already, catch-all or not.
        assert_eq!(p.rcpt(rcpt, None), RcptVerdict::NoSuchUser, "{rcpt}");
        match p.resolve_with(rcpt, &o) {
            Err(Unresolved::Failed(e)) => assert!(e.contains("not a mailbox"), "{rcpt}: {e}"),
            other => panic!("{rcpt}: {other:?}"),
        }
    }
}
