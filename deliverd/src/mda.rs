//! Running local programs: the MDA (`mail_delivery_agent_bin`) and pipe
//! aliases. No shell is involved; the message goes in on stdin straight
//! from the descriptor queued sent, CRLF line ends as stored.
//!
//! Each program starts clean: an environment of its own (see
//! [`environment`]), `/` as working directory, and its own process group,
//! killed whole on a timeout. deliverd waits for the program's exit, not
//! for the end of its output, which anything it left running may hold
//! open forever.

use std::fs::File;
use std::process::{ExitStatus, Stdio};
use std::sync::LazyLock;
use std::time::Duration;

use tokio::process::Command;

use tambo_common::duration;
use tambo_proto::deliver::Outcome;

use crate::supervise::{self, Limits, Waited};
use crate::template;

/// How long an MDA or pipe may run (REFERENCE §4.2, §4.4).
/// `[testing] mda_timeout` replaces it.
pub const TIMEOUT: Duration = Duration::from_secs(30);
/// Most output kept for the failure text.
const MAX_OUTPUT: usize = 4096;
/// EX_TEMPFAIL: the program asks to be retried.
const EX_TEMPFAIL: i32 = 75;
/// The only PATH a program sees: system directories, none of them from
/// deliverd's own environment.
pub const PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// The whole environment of an MDA or pipe command. Nothing is inherited:
/// deliverd's own environment holds NOTIFY_SOCKET (through which a child
/// could speak to the supervisor for deliverd), socket-activation and
/// `TAMBO_*` variables, and whatever the shell that started it had; a
/// program run on behalf of a stranger's message sees only this:
///
/// - `PATH`: fixed, so a command given by name is found in the system
///   directories and nowhere else.
/// - `HOME=/`: MDAs find the recipient's own files (`.mailfilter`,
///   `.procmailrc`) by looking the recipient up; the home of deliverd's
///   account would point them at the wrong ones. `/` is neutral, and
///   writable by no one but root.
/// - `SHELL=/bin/sh`: what MDAs (procmail, maildrop) run their recipes'
///   commands with; the account's login shell is often nologin.
/// - `USER`, `LOGNAME`: the account the program really runs as (deliverd's,
///   not the recipient's, who is on the command line), for programs that
///   log or pick their configuration by name.
/// - `LANG=C`: unlocalised ASCII messages, since the output goes into logs
///   and into DSNs to strangers, and byte handling that does not depend on
///   the locales installed.
pub fn environment() -> &'static [(&'static str, String)] {
    static ENV: LazyLock<Vec<(&'static str, String)>> = LazyLock::new(|| {
        let uid = nix::unistd::geteuid();
        let user = match nix::unistd::User::from_uid(uid) {
            Ok(Some(u)) => u.name,
            _ => uid.to_string(),
        };
        vec![
            ("PATH", PATH.to_string()),
            ("HOME", "/".to_string()),
            ("SHELL", "/bin/sh".to_string()),
            ("USER", user.clone()),
            ("LOGNAME", user),
            ("LANG", "C".to_string()),
        ]
    });
    &ENV
}

/// Removes what must never reach an MDA's argument list from an address:
/// whitespace, control characters and shell/path metacharacters.
pub fn sanitize(addr: &str) -> String {
    if addr.is_empty() {
        return "<>".into();
    }
    addr.chars()
        .filter(|c| !c.is_whitespace() && !c.is_control() && !"/;\"'\\|*&$%()[]{}`!".contains(*c))
        .collect()
}

/// Substitutes `%from%`, `%from_user%`, `%from_domain%`, `%to%`,
/// `%to_user%`, `%to_domain%` inside each argument, in one pass. An
/// argument that only an address made start with `-` is refused: the MDA
/// would read it as an option (`-oQ…`, `-C…`), so the sender would choose
/// its options. Arguments written with a leading `-` are the operator's.
pub fn expand_args(args: &[String], from: &str, to: &str) -> Result<Vec<String>, String> {
    let from = sanitize(from);
    let to = sanitize(to);
    let split = |a: &str| -> (String, String) {
        match a.rsplit_once('@') {
            Some((u, d)) => (u.to_string(), d.to_string()),
            None => (a.to_string(), String::new()),
        }
    };
    let (fu, fd) = split(&from);
    let (tu, td) = split(&to);
    let vars = [
        ("from", from.as_str()),
        ("from_user", fu.as_str()),
        ("from_domain", fd.as_str()),
        ("to", to.as_str()),
        ("to_user", tu.as_str()),
        ("to_domain", td.as_str()),
    ];
    args.iter()
        .map(|a| {
            let expanded = template::expand(a, &vars);
            if expanded.starts_with('-') && !a.starts_with('-') {
                return Err(format!(
                    "the MDA was not run: an address would be read as its option {expanded:?}"
                ));
            }
            Ok(expanded)
        })
        .collect()
}

/// Runs `bin args…` with the message on stdin and classifies the result:
/// exit 0 delivered, 75 or a timeout temporary, anything else permanent
/// with the program's output. `name` is how failure texts (which reach the
/// sender in a DSN) call the program: pipe commands are never shown.
pub async fn run(
    name: &str,
    bin: &str,
    args: &[String],
    stdin: File,
    timeout: Duration,
) -> Outcome {
    if bin.is_empty() {
        return Outcome::PermFail("empty command".into());
    }
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .env_clear()
        .envs(environment().iter().map(|(k, v)| (k, v)))
        // Not the config directory REFERENCE §4.4 names: it holds private
        // keys and the users' password hashes, and a program's relative
        // paths must not reach them. Pipe commands are given with absolute
        // paths.
        .current_dir("/")
        .stdin(Stdio::from(stdin))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let (mut child, mut group) = match supervise::spawn(&mut cmd) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!("cannot run {bin}: {e}");
            return Outcome::TempFail(format!("cannot run the {name}: {e}"));
        }
    };
    // The message descriptor: the child has its own copy now.
    drop(cmd);
    let limits = Limits {
        stdout: MAX_OUTPUT,
        stderr: MAX_OUTPUT,
    };
    let waited = supervise::wait(
        &mut child,
        &mut group,
        timeout,
        limits,
        std::future::ready(()),
    )
    .await;
    // A group whose leader has exited stays listed while anything it left
    // behind lives, so deliverd's exit still kills that.
    drop(group);
    outcome(name, waited, timeout)
}

/// The outcome of a run, from how the wait for it ended.
fn outcome(name: &str, waited: Waited, timeout: Duration) -> Outcome {
    match waited {
        Waited::Exited(status, mut output, stderr) => {
            output.head.extend_from_slice(&stderr.head);
            classify(name, status, &output.head)
        }
        Waited::TimedOut(_) => Outcome::TempFail(format!(
            "the {name} timed out after {}",
            duration::format(timeout)
        )),
        Waited::Unstoppable => Outcome::TempFail(format!(
            "the {name} timed out after {} and could not be stopped",
            duration::format(timeout)
        )),
        Waited::Failed(e) => Outcome::TempFail(format!("waiting for the {name}: {e}")),
    }
}

/// Exit 0 delivered, 75 temporary, a signal temporary, anything else
/// permanent; the output goes into the failure text.
fn classify(name: &str, status: ExitStatus, output: &[u8]) -> Outcome {
    let text = String::from_utf8_lossy(output).trim().to_string();
    match status.code() {
        Some(0) => Outcome::Delivered,
        Some(EX_TEMPFAIL) => Outcome::TempFail(format!(
            "the {name} exited with 75 (temporary failure): {text}"
        )),
        Some(code) => Outcome::PermFail(format!("the {name} exited with {code}: {text}")),
        None => Outcome::TempFail(format!("the {name} was killed by a signal: {text}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::supervise::{KILL_WAIT, OUTPUT_GRACE};
    use crate::testutil::{WAIT, read_pid, wait_dead};
    use std::io::{Seek, Write};
    use std::time::Instant;

    fn strings(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn placeholders_and_sanitising() {
        let args = strings(&[
            "-f",
            "%from%",
            "-d",
            "%to_user%",
            "%to_domain%",
            "x%from_user%",
        ]);
        assert_eq!(
            expand_args(&args, "ann@mars.example", "bob@venus.example").unwrap(),
            [
                "-f",
                "ann@mars.example",
                "-d",
                "bob",
                "venus.example",
                "xann"
            ]
        );
        assert_eq!(sanitize("a;rm -rf /$(x)@d"), "arm-rfx@d");
        assert_eq!(sanitize(""), "<>");
    }

    #[test]
    fn expansion_is_one_pass() {
        // sanitize() strips `%` already; the expansion must not depend on
        // it: %from_user% and %to% side by side, each expanded once.
        let args = strings(&["%from_user%%to%", "%to_user%@%from_domain%", "%%to%%"]);
        assert_eq!(
            expand_args(&args, "ann@mars", "bob@venus").unwrap(),
            ["annbob@venus", "bob@mars", "%bob@venus%"]
        );
        assert_eq!(
            expand_args(&strings(&["%to_user%"]), "x@y", "%to_domain%@venus").unwrap(),
            ["to_domain"],
            "the `%` are stripped and nothing is expanded twice"
        );
    }

    #[test]
    fn addresses_cannot_become_options() {
        for (from, to) in [
            ("ann@mars", "-oQ/tmp/x@venus"),
            ("-C/etc/evil@mars", "bob@venus"),
            ("ann@-x", "bob@venus"),
        ] {
            let args = strings(&["-f", "%from%", "%from_domain%", "-d", "%to_user%"]);
            let err = expand_args(&args, from, to).unwrap_err();
            assert!(err.contains("option"), "{err}");
        }
        // The operator's own options, and a `-` inside an argument, are fine.
        assert_eq!(
            expand_args(&strings(&["-d%to_user%", "x%to_user%"]), "a@b", "-c@d").unwrap(),
            ["-d-c", "x-c"]
        );
    }

    fn message() -> File {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(b"Subject: t\r\n\r\nbody\r\n").unwrap();
        f.rewind().unwrap();
        f
    }

    fn sh(script: &str) -> Vec<String> {
        vec!["-c".to_string(), script.to_string()]
    }

    async fn run_sh(script: &str, timeout: Duration) -> Outcome {
        run("MDA", "/bin/sh", &sh(script), message(), timeout).await
    }

    #[tokio::test]
    async fn exit_codes_classify() {
        assert_eq!(run_sh("cat >/dev/null", TIMEOUT).await, Outcome::Delivered);
        assert!(matches!(
            run_sh("exit 75", TIMEOUT).await,
            Outcome::TempFail(_)
        ));
        match run_sh("echo no such mailbox >&2; exit 1", TIMEOUT).await {
            Outcome::PermFail(t) => assert!(t.contains("no such mailbox"), "{t}"),
            o => panic!("{o:?}"),
        }
        assert!(matches!(
            run("MDA", "/nonexistent/mda", &[], message(), TIMEOUT).await,
            Outcome::TempFail(_)
        ));
    }

    #[tokio::test]
    async fn chatty_programs_do_not_hang() {
        // 1 MiB on stdout, far more than a pipe holds.
        let script = "cat >/dev/null; head -c 1048576 /dev/zero; exit 0";
        let start = Instant::now();
        assert_eq!(run_sh(script, TIMEOUT).await, Outcome::Delivered);
        assert!(start.elapsed() < Duration::from_secs(10));
    }

    #[tokio::test]
    async fn stdin_is_the_message() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("got");
        let script = format!("cat > {}", out.display());
        assert_eq!(run_sh(&script, TIMEOUT).await, Outcome::Delivered);
        assert_eq!(std::fs::read(out).unwrap(), b"Subject: t\r\n\r\nbody\r\n");
    }

    #[tokio::test]
    async fn environment_and_directory_are_clean() {
        let dir = tempfile::tempdir().unwrap();
        let (env, cwd) = (dir.path().join("env"), dir.path().join("cwd"));
        // /proc/$$/environ is what the shell was given, before it adds PWD
        // and the like of its own.
        let script = format!(
            "tr '\\0' '\\n' < /proc/$$/environ > {}; pwd -P > {}",
            env.display(),
            cwd.display()
        );
        assert_eq!(run_sh(&script, TIMEOUT).await, Outcome::Delivered);
        let mut got: Vec<String> = std::fs::read_to_string(&env)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect();
        got.sort();
        let me = nix::unistd::User::from_uid(nix::unistd::geteuid())
            .unwrap()
            .unwrap()
            .name;
        let mut want = vec![
            "PATH=/usr/local/bin:/usr/bin:/bin".to_string(),
            "HOME=/".to_string(),
            "SHELL=/bin/sh".to_string(),
            format!("USER={me}"),
            format!("LOGNAME={me}"),
            "LANG=C".to_string(),
        ];
        want.sort();
        assert_eq!(
            got, want,
            "only the documented variables, nothing inherited"
        );
        assert_eq!(std::fs::read_to_string(&cwd).unwrap(), "/\n");
    }

    #[tokio::test]
    async fn exit_is_not_held_up_by_background_children() {
        let dir = tempfile::tempdir().unwrap();
        let bg = dir.path().join("bg");
        // The background sleep inherits stdout and stderr and keeps both
        // pipes open for 30 s after the script exits.
        let script = format!(
            "cat >/dev/null; echo on the way out; sleep 30 & echo $! > {bg}.tmp; mv {bg}.tmp {bg}; exit {{}}",
            bg = bg.display()
        );
        let start = Instant::now();
        assert_eq!(
            run_sh(&script.replace("{}", "0"), TIMEOUT).await,
            Outcome::Delivered
        );
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "took {:?}: waited for the pipe's end, not the exit",
            start.elapsed()
        );
        let first = read_pid(&bg).await;
        // What was written before the exit still makes the failure text.
        std::fs::remove_file(&bg).unwrap();
        match run_sh(&script.replace("{}", "1"), TIMEOUT).await {
            Outcome::PermFail(t) => assert!(t.contains("on the way out"), "{t}"),
            o => panic!("{o:?}"),
        }
        let second = read_pid(&bg).await;
        for pid in [first, second] {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }

    #[tokio::test]
    async fn a_program_that_cannot_be_stopped_is_a_temporary_failure() {
        // Given up on, the delivery is retried later, and says why.
        match outcome("MDA", Waited::Unstoppable, Duration::from_secs(30)) {
            Outcome::TempFail(t) => {
                assert_eq!(t, "the MDA timed out after 30s and could not be stopped")
            }
            o => panic!("{o:?}"),
        }
    }

    #[tokio::test]
    async fn a_program_that_leaves_its_group_is_given_up_on() {
        // The program moves into the test's own process group, where the
        // kill on a timeout (sent to the group deliverd gave it) misses
        // it: the wait for it would last until it ends by itself.
        if !std::path::Path::new("/usr/bin/perl").exists() {
            eprintln!("skipped: no /usr/bin/perl to call setpgid with");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pid");
        let script = format!(
            "setpgrp(0, getpgrp(getppid())) or die $!; \
             open(my $f, '>', '{f}.tmp') or die $!; print $f $$; close $f; \
             rename('{f}.tmp', '{f}') or die $!; exec('sleep', '60')",
            f = f.display()
        );
        let timeout = Duration::from_secs(1);
        let start = Instant::now();
        let args = strings(&["-e", &script]);
        match run("MDA", "/usr/bin/perl", &args, message(), timeout).await {
            Outcome::TempFail(t) => {
                assert_eq!(t, "the MDA timed out after 1s and could not be stopped")
            }
            o => panic!("{o:?}"),
        }
        let took = start.elapsed();
        assert!(
            took < timeout + KILL_WAIT + OUTPUT_GRACE + Duration::from_secs(3),
            "took {took:?}"
        );
        // Dropping the child killed it by pid, which does reach it.
        wait_dead("the escaped program", read_pid(&f).await).await;
    }

    /// A script that leaves a background child and then hangs, both of
    /// which write their pids to files in `dir`.
    fn hanging_script(dir: &std::path::Path) -> String {
        let d = dir.display();
        format!(
            "sh -c 'echo $$ > {d}/bg.tmp; mv {d}/bg.tmp {d}/bg; exec sleep 60' &
             echo $$ > {d}/leader.tmp; mv {d}/leader.tmp {d}/leader; sleep 60"
        )
    }

    #[tokio::test]
    async fn timeout_kills_the_whole_group() {
        let dir = tempfile::tempdir().unwrap();
        let timeout = Duration::from_secs(2);
        let start = Instant::now();
        match run_sh(&hanging_script(dir.path()), timeout).await {
            Outcome::TempFail(t) => assert!(t.contains("timed out after 2s"), "{t}"),
            o => panic!("{o:?}"),
        }
        assert!(start.elapsed() < timeout + OUTPUT_GRACE + Duration::from_secs(3));
        let leader = read_pid(&dir.path().join("leader")).await;
        let bg = read_pid(&dir.path().join("bg")).await;
        wait_dead("the timed-out MDA", leader).await;
        wait_dead("its background child", bg).await;
    }

    #[tokio::test]
    async fn abandoned_delivery_kills_the_whole_group() {
        let dir = tempfile::tempdir().unwrap();
        let script = hanging_script(dir.path());
        let task = tokio::spawn(async move { run_sh(&script, WAIT * 2).await });
        let leader = read_pid(&dir.path().join("leader")).await;
        let bg = read_pid(&dir.path().join("bg")).await;
        // What jobs::serve does when queued goes away.
        task.abort();
        assert!(task.await.unwrap_err().is_cancelled());
        wait_dead("the abandoned MDA", leader).await;
        wait_dead("its background child", bg).await;
    }
}
