//! The hooks run for real: shell scripts written to a temporary config
//! directory.

use std::fs::File;
use std::io::{Seek, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tambo_proto::deliver::{HookEnv, HookVerdict, MAX_HOOK_OUTPUT};
use tambo_proto::submit::SpfResult;

use super::*;
use crate::testutil::{read_pid, wait_dead};

struct Setup {
    dir: tempfile::TempDir,
    hooks: Hooks,
}

fn setup(timeout: Duration) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("hooks")).unwrap();
    let hooks = Hooks {
        config_dir: dir.path().to_path_buf(),
        timeout: Some(timeout),
    };
    Setup { dir, hooks }
}

impl Setup {
    /// Installs `hooks/<name>` running `body` under /bin/sh. The file is
    /// written by `cp`, never open for writing in this process, where a
    /// fork by a concurrent test could keep it open and make its exec fail
    /// with ETXTBSY.
    fn hook(&self, name: &str, body: &str) {
        let src = self.dir.path().join(format!(".{name}.src"));
        std::fs::write(&src, format!("#!/bin/sh\n{body}\n")).unwrap();
        let dst = self.dir.path().join("hooks").join(name);
        let _ = std::fs::remove_file(&dst);
        let ok = std::process::Command::new("cp")
            .arg(&src)
            .arg(&dst)
            .status()
            .unwrap();
        assert!(ok.success());
        std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

fn env() -> HookEnv {
    HookEnv {
        remote_addr: "192.0.2.1:4242".into(),
        ehlo: "mail.example.net; rm -rf /".into(),
        mail_from: "ann@example.net".into(),
        rcpt_to: vec!["bob@example.org".into(), "cat@example.org".into()],
        auth_as: String::new(),
        on_tls: true,
        from_local_domain: false,
        spf: Some(SpfResult::Pass),
    }
}

fn message(bytes: &[u8]) -> Arc<File> {
    let mut f = tempfile::tempfile().unwrap();
    f.write_all(bytes).unwrap();
    f.rewind().unwrap();
    Arc::new(f)
}

const MSG: &[u8] = b"Subject: hi\r\nFrom: ann@example.net\r\n\r\nline one\r\nline two\r\n";

async fn post_data(s: &Setup) -> PostDataRun {
    s.hooks.post_data(&env(), b"", message(MSG)).await
}

/// The hook's environment as it was given (not as the shell then adds
/// to it), sorted.
fn dump_env(to: &Path) -> String {
    format!(
        "tr '\\0' '\\n' < /proc/$$/environ | sort > {t}.tmp; mv {t}.tmp {t}",
        t = to.display()
    )
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

fn copied() -> Vec<String> {
    ["USER", "SHELL", "PATH", "PWD"]
        .iter()
        .map(|k| {
            let v = std::env::var_os(k).unwrap_or_default();
            format!("{k}={}", v.to_string_lossy())
        })
        .collect()
}

#[tokio::test]
async fn missing_hooks_are_skipped() {
    let s = setup(Duration::from_secs(10));
    assert_eq!(post_data(&s).await, PostDataRun::Skipped);
    assert_eq!(PostDataRun::Skipped.label(), "post-data:skip");
    let r = s.hooks.rcpt(&env()).await;
    assert_eq!((r.verdict, r.label), (HookVerdict::Accept, "skip"));
    let r = s.hooks.alias_resolve("a@b").await;
    assert_eq!((r.result, r.label), (Ok(String::new()), "resolve:skip"));
    let r = s.hooks.alias_exists("a@b").await;
    assert_eq!((r.exists, r.label), (false, "exists:skip"));
}

#[tokio::test]
async fn post_data_exit_codes() {
    let s = setup(Duration::from_secs(20));
    s.hook(
        "post-data",
        "printf 'X-Checked: yes\\nX-Score: 1\\n\\t(of 10)\\n'",
    );
    let run = post_data(&s).await;
    assert_eq!(run.label(), "post-data:success");
    assert_eq!(
        run.into_parts(),
        (
            "X-Checked: yes\r\nX-Score: 1\r\n\t(of 10)\r\n".to_string(),
            HookVerdict::Accept
        )
    );
    s.hook("post-data", "true");
    assert_eq!(
        post_data(&s).await,
        PostDataRun::Accepted {
            headers: String::new()
        }
    );
    s.hook("post-data", "echo 'this is not a header'; exit 0");
    let run = post_data(&s).await;
    assert_eq!(
        (&run, run.label()),
        (&PostDataRun::BadOutput, "post-data:badoutput")
    );
    assert_eq!(run.into_parts(), (String::new(), HookVerdict::Accept));
    for (code, permanent) in [(20, true), (1, false), (75, false), (21, false)] {
        s.hook(
            "post-data",
            &format!("echo first; echo '  go away, spammer  '; printf partial; exit {code}"),
        );
        let run = post_data(&s).await;
        assert_eq!(run.label(), "post-data:fail");
        assert_eq!(
            run,
            PostDataRun::Rejected {
                permanent,
                text: "go away, spammer".into()
            },
            "exit {code}"
        );
    }
    s.hook("post-data", "kill -9 $$");
    assert_eq!(
        post_data(&s).await,
        PostDataRun::Rejected {
            permanent: false,
            text: String::new()
        }
    );
}

#[tokio::test]
async fn post_data_environment_is_exactly_the_documented_one() {
    let s = setup(Duration::from_secs(20));
    let (out, cwd, args) = (s.path("env"), s.path("cwd"), s.path("args"));
    s.hook(
        "post-data",
        &format!(
            "{}; pwd -P > {}; echo \"$#\" > {}",
            dump_env(&out),
            cwd.display(),
            args.display()
        ),
    );
    assert!(matches!(post_data(&s).await, PostDataRun::Accepted { .. }));
    let mut want = copied();
    want.extend(
        [
            "REMOTE_ADDR=192.0.2.1:4242",
            "EHLO_DOMAIN=mail.example.netrm-rf",
            "EHLO_DOMAIN_RAW=mail.example.net; rm -rf /",
            "MAIL_FROM=ann@example.net",
            "RCPT_TO=bob@example.org cat@example.org",
            "AUTH_AS=",
            "ON_TLS=1",
            "FROM_LOCAL_DOMAIN=0",
            "SPF_PASS=1",
        ]
        .map(String::from),
    );
    want.sort();
    assert_eq!(
        lines(&out),
        want,
        "nothing else (no LD_PRELOAD, no TAMBO_*)"
    );
    let dir = std::fs::canonicalize(s.dir.path()).unwrap();
    assert_eq!(lines(&cwd), [dir.display().to_string()]);
    assert_eq!(lines(&args), ["0"]);
}

#[tokio::test]
async fn rcpt_hook_gets_the_spf_result_too() {
    let s = setup(Duration::from_secs(20));
    let out = s.path("env");
    s.hook("rcpt", &dump_env(&out));
    let mut e = env();
    e.rcpt_to = vec!["bob@example.org".into()];
    e.spf = Some(SpfResult::SoftFail);
    e.auth_as = "ann@example.net".into();
    let r = s.hooks.rcpt(&e).await;
    assert_eq!((r.verdict, r.label), (HookVerdict::Accept, "success"));
    let got = lines(&out);
    for want in [
        "SPF_RESULT=softfail",
        "SPF_PASS=0",
        "RCPT_TO=bob@example.org",
        "AUTH_AS=ann@example.net",
    ] {
        assert!(got.contains(&want.to_string()), "{want} in {got:?}");
    }
    assert_eq!(got.len(), 4 + 10);
    // Without SPF, the variable is there, empty.
    e.spf = None;
    s.hooks.rcpt(&e).await;
    assert!(lines(&out).contains(&"SPF_RESULT=".to_string()));

    for (code, permanent) in [(20, true), (1, false)] {
        s.hook("rcpt", &format!("echo 'not here'; exit {code}"));
        let r = s.hooks.rcpt(&e).await;
        assert_eq!(
            (r.verdict, r.label),
            (
                HookVerdict::Reject {
                    permanent,
                    text: "not here".into()
                },
                "fail"
            )
        );
    }
}

#[tokio::test]
async fn alias_hooks() {
    let s = setup(Duration::from_secs(20));
    let (out, args) = (s.path("env"), s.path("args"));
    s.hook(
        "alias-resolve",
        &format!(
            "{}; printf '%s\\n' \"$#\" \"$1\" > {}; echo \"x@example.org, | /bin/true\"",
            dump_env(&out),
            args.display()
        ),
    );
    let r = s.hooks.alias_resolve("list+tag@example.org").await;
    assert_eq!(
        (r.result, r.label),
        (
            Ok("x@example.org, | /bin/true\n".to_string()),
            "resolve:success"
        )
    );
    let mut want = copied();
    want.sort();
    assert_eq!(lines(&out), want, "the copied variables only");
    assert_eq!(lines(&args), ["1", "list+tag@example.org"]);

    s.hook("alias-resolve", "echo oops >&2; exit 3");
    let r = s.hooks.alias_resolve("a@b").await;
    assert_eq!(
        (r.result, r.label),
        (
            Err("hooks/alias-resolve exited with 3".to_string()),
            "resolve:fail"
        )
    );
    s.hook(
        "alias-resolve",
        &format!("head -c {} /dev/zero | tr '\\0' a", MAX_HOOK_OUTPUT + 1),
    );
    let r = s.hooks.alias_resolve("a@b").await;
    assert_eq!(r.label, "resolve:fail");
    assert!(r.result.unwrap_err().contains("more than"));

    s.hook("alias-exists", "test \"$1\" = yes@example.org");
    let r = s.hooks.alias_exists("yes@example.org").await;
    assert_eq!((r.exists, r.label), (true, "exists:true"));
    let r = s.hooks.alias_exists("no@example.org").await;
    assert_eq!((r.exists, r.label), (false, "exists:false"));
}

#[tokio::test]
async fn output_over_the_limit_is_bad_output() {
    let s = setup(Duration::from_secs(20));
    // Valid headers, but more of them than is kept.
    s.hook(
        "post-data",
        &format!(
            "i=0; while [ $i -lt {} ]; do echo \"X-Line-$i: aaaaaaaaaaaaaaaaaaaa\"; i=$((i+1)); done",
            MAX_HOOK_OUTPUT / 20
        ),
    );
    assert_eq!(post_data(&s).await, PostDataRun::BadOutput);
    // Under the limit, the same is fine.
    s.hook(
        "post-data",
        "i=0; while [ $i -lt 100 ]; do echo \"X-Line-$i: a\"; i=$((i+1)); done",
    );
    assert!(matches!(post_data(&s).await, PostDataRun::Accepted { .. }));
    // A refusal after a flood still shows its last line; stderr floods
    // are drained.
    s.hook(
        "post-data",
        "head -c 1000000 /dev/zero; head -c 1000000 /dev/zero >&2; echo; echo 'the reason'; exit 20",
    );
    assert_eq!(
        post_data(&s).await,
        PostDataRun::Rejected {
            permanent: true,
            text: "the reason".into()
        }
    );
}

#[tokio::test]
async fn stdin_is_the_message_with_lf_line_ends() {
    let s = setup(Duration::from_secs(20));
    let got = s.path("stdin");
    s.hook("post-data", &format!("cat > {}", got.display()));
    let ar = b"Authentication-Results: mx;\n\tdkim=none\n";
    // Longer than a pipe holds, and than one chunk read.
    let mut msg = MSG.to_vec();
    for i in 0..20_000 {
        msg.extend_from_slice(format!("line {i} of the body\r\n").as_bytes());
    }
    let run = s.hooks.post_data(&env(), ar, message(&msg)).await;
    assert!(matches!(run, PostDataRun::Accepted { .. }), "{run:?}");
    let mut want = ar.to_vec();
    want.extend_from_slice(&msg);
    let want = String::from_utf8(want).unwrap().replace("\r\n", "\n");
    assert_eq!(std::fs::read_to_string(&got).unwrap(), want);
}

#[tokio::test]
async fn a_hook_that_does_not_read_its_input_is_fine() {
    let s = setup(Duration::from_secs(20));
    s.hook("post-data", "echo 'X-Early: yes'; exec 0<&-; exit 0");
    let msg = vec![b'x'; 4 * 1024 * 1024];
    let start = Instant::now();
    let run = s.hooks.post_data(&env(), b"", message(&msg)).await;
    assert_eq!(
        run,
        PostDataRun::Accepted {
            headers: "X-Early: yes\r\n".into()
        }
    );
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
    // Nor is one that stops reading and refuses.
    s.hook("post-data", "head -c 10 > /dev/null; echo no; exit 20");
    let run = s.hooks.post_data(&env(), b"", message(&msg)).await;
    assert_eq!(
        run,
        PostDataRun::Rejected {
            permanent: true,
            text: "no".into()
        }
    );
}

#[tokio::test]
async fn a_hook_past_its_timeout_is_killed_with_its_group() {
    let s = setup(Duration::from_secs(1));
    let d = s.dir.path().display();
    s.hook(
        "post-data",
        &format!(
            "sh -c 'echo $$ > {d}/bg.tmp; mv {d}/bg.tmp {d}/bg; exec sleep 1000' &
             echo $$ > {d}/leader.tmp; mv {d}/leader.tmp {d}/leader
             echo 'still thinking'
             sleep 1000"
        ),
    );
    let start = Instant::now();
    let run = post_data(&s).await;
    assert_eq!(
        run,
        PostDataRun::Rejected {
            permanent: false,
            text: "still thinking".into()
        }
    );
    assert!(
        start.elapsed() < Duration::from_secs(8),
        "{:?}",
        start.elapsed()
    );
    let leader = read_pid(&s.path("leader")).await;
    let bg = read_pid(&s.path("bg")).await;
    wait_dead("the timed-out hook", leader).await;
    wait_dead("the sleep it left in the background", bg).await;

    s.hook("alias-exists", "sleep 1000");
    let r = s.hooks.alias_exists("a@b").await;
    assert_eq!((r.exists, r.label), (false, "exists:false"));
    s.hook("alias-resolve", "sleep 1000");
    let r = s.hooks.alias_resolve("a@b").await;
    assert_eq!(
        r.result,
        Err("hooks/alias-resolve timed out after 1s".into())
    );
}

#[tokio::test]
async fn an_argument_with_nul_is_refused() {
    let s = setup(Duration::from_secs(20));
    s.hook("alias-exists", "exit 0");
    let r = s.hooks.alias_exists("a\0b").await;
    assert_eq!((r.exists, r.label), (false, "exists:false"));
}
