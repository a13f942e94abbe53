//! Running local programs: the MDA (`mail_delivery_agent_bin`) and pipe
//! aliases. No shell is involved; the message goes in on stdin straight
//! from the descriptor queued sent, CRLF line ends as stored.

use std::fs::File;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::process::Command;

use tambo_proto::deliver::Outcome;

use crate::template;

/// How long an MDA or pipe may run (REFERENCE §4.2, §4.4).
pub const TIMEOUT: Duration = Duration::from_secs(30);
/// Most output kept for the failure text.
const MAX_OUTPUT: usize = 4096;
/// EX_TEMPFAIL: the program asks to be retried.
const EX_TEMPFAIL: i32 = 75;

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
pub async fn run(name: &str, bin: &str, args: &[String], stdin: File, cwd: &Path) -> Outcome {
    if bin.is_empty() {
        return Outcome::PermFail("empty command".into());
    }
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .stdin(Stdio::from(stdin))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .current_dir(cwd)
        .kill_on_drop(true);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!("cannot run {bin}: {e}");
            return Outcome::TempFail(format!("cannot run the {name}: {e}"));
        }
    };
    let mut out = child.stdout.take();
    let mut err = child.stderr.take();
    let collect = async {
        let mut o = Vec::new();
        let mut e = Vec::new();
        // Keep the first MAX_OUTPUT bytes, and drain the rest: a program
        // blocked on a full pipe would otherwise hang until the timeout.
        let ro = async {
            if let Some(s) = out.as_mut() {
                let _ = s.take(MAX_OUTPUT as u64).read_to_end(&mut o).await;
                let _ = tokio::io::copy(s, &mut tokio::io::sink()).await;
            }
        };
        let re = async {
            if let Some(s) = err.as_mut() {
                let _ = s.take(MAX_OUTPUT as u64).read_to_end(&mut e).await;
                let _ = tokio::io::copy(s, &mut tokio::io::sink()).await;
            }
        };
        tokio::join!(ro, re);
        let status = child.wait().await;
        o.extend_from_slice(&e);
        (status, o)
    };
    match tokio::time::timeout(TIMEOUT, collect).await {
        Err(_) => Outcome::TempFail(format!("the {name} timed out after {}s", TIMEOUT.as_secs())),
        Ok((Err(e), _)) => Outcome::TempFail(format!("waiting for the {name}: {e}")),
        Ok((Ok(status), output)) => {
            let text = String::from_utf8_lossy(&output).trim().to_string();
            match status.code() {
                Some(0) => Outcome::Delivered,
                Some(EX_TEMPFAIL) => Outcome::TempFail(format!(
                    "the {name} exited with 75 (temporary failure): {text}"
                )),
                Some(code) => Outcome::PermFail(format!("the {name} exited with {code}: {text}")),
                None => Outcome::TempFail(format!("the {name} was killed by a signal: {text}")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, Write};

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

    #[tokio::test]
    async fn exit_codes_classify() {
        let dir = std::env::temp_dir();
        let sh = |script: &str| vec!["-c".to_string(), script.to_string()];
        assert_eq!(
            run("MDA", "/bin/sh", &sh("cat >/dev/null"), message(), &dir).await,
            Outcome::Delivered
        );
        assert!(matches!(
            run("MDA", "/bin/sh", &sh("exit 75"), message(), &dir).await,
            Outcome::TempFail(_)
        ));
        match run(
            "MDA",
            "/bin/sh",
            &sh("echo no such mailbox >&2; exit 1"),
            message(),
            &dir,
        )
        .await
        {
            Outcome::PermFail(t) => assert!(t.contains("no such mailbox"), "{t}"),
            o => panic!("{o:?}"),
        }
        assert!(matches!(
            run("MDA", "/nonexistent/mda", &[], message(), &dir).await,
            Outcome::TempFail(_)
        ));
    }

    #[tokio::test]
    async fn chatty_programs_do_not_hang() {
        let dir = std::env::temp_dir();
        // 1 MiB on stdout, far more than a pipe holds.
        let script = "cat >/dev/null; head -c 1048576 /dev/zero; exit 0".to_string();
        let start = std::time::Instant::now();
        assert_eq!(
            run("MDA", "/bin/sh", &["-c".into(), script], message(), &dir).await,
            Outcome::Delivered
        );
        assert!(start.elapsed() < Duration::from_secs(10));
    }

    #[tokio::test]
    async fn stdin_is_the_message() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("got");
        let script = format!("cat > {}", out.display());
        assert_eq!(
            run(
                "MDA",
                "/bin/sh",
                &["-c".into(), script],
                message(),
                dir.path()
            )
            .await,
            Outcome::Delivered
        );
        assert_eq!(std::fs::read(out).unwrap(), b"Subject: t\r\n\r\nbody\r\n");
    }
}
