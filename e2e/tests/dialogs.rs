//! Runs the SMTP dialogs in tests/dialogs/*.dlg against a real tambo.
//!
//! Each file is one session:
//! - `-> LINE` sends LINE and CRLF;
//! - `~> "bytes"` sends raw bytes (`\r \n \t \\ \"` escapes; `{c*N}` is the
//!   character c repeated N times);
//! - `<- CODE [TEXT]` reads one reply: CODE must match and, if given, the
//!   last line's text must start with TEXT;
//! - `<- closed` expects the server to have closed the connection;
//! - `{repeat N}` before a step runs it N times; `#` starts a comment.

use std::path::Path;

use tambo_e2e::*;

fn unescape(s: &str) -> Vec<u8> {
    let s = s.trim();
    let s = s
        .strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .expect("raw bytes in quotes");
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some('r') => out.push(b'\r'),
                Some('n') => out.push(b'\n'),
                Some('t') => out.push(b'\t'),
                Some('\\') => out.push(b'\\'),
                Some('"') => out.push(b'"'),
                other => panic!("bad escape \\{other:?}"),
            },
            '{' => {
                let spec: String = chars.by_ref().take_while(|&c| c != '}').collect();
                let (ch, n) = spec.split_once('*').expect("{c*N}");
                let n: usize = n.parse().expect("repeat count");
                out.extend(std::iter::repeat_n(ch.as_bytes()[0], n));
            }
            c => {
                let mut b = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut b).as_bytes());
            }
        }
    }
    out
}

fn run_dialog(t: &Tambo, path: &Path) {
    let text = std::fs::read_to_string(path).unwrap();
    let mut c = t.smtp();
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim_end();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (times, step) = match line.strip_prefix("{repeat ") {
            Some(rest) => {
                let (n, step) = rest.split_once('}').expect("{repeat N}");
                (n.parse::<usize>().expect("repeat count"), step)
            }
            None => (1, line),
        };
        let at = format!("{}:{}", path.display(), n + 1);
        for _ in 0..times {
            if let Some(cmd) = step.strip_prefix("-> ") {
                c.send_raw(format!("{cmd}\r\n").as_bytes());
            } else if let Some(raw) = step.strip_prefix("~> ") {
                c.send_raw(&unescape(raw));
            } else if step == "<- closed" {
                assert!(c.is_closed(), "{at}: expected the connection to be closed");
            } else if let Some(want) = step.strip_prefix("<- ") {
                let (code, prefix) = want.split_once(' ').unwrap_or((want, ""));
                let r = c
                    .try_reply()
                    .unwrap_or_else(|| panic!("{at}: connection closed, expected {want}"));
                assert_eq!(r.code.to_string(), code, "{at}: got {r:?}");
                let last = r.lines.last().cloned().unwrap_or_default();
                assert!(
                    last.starts_with(prefix),
                    "{at}: {last:?} does not start with {prefix:?}"
                );
            } else {
                panic!("{at}: cannot parse {line:?}");
            }
        }
    }
}

#[test]
fn dialogs() {
    let mut t = Tambo::new("max_data_size_mb = 1", "", "");
    t.start_all();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/dialogs");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.retain(|p| p.extension().is_some_and(|e| e == "dlg"));
    files.sort();
    assert!(
        files.len() >= 15,
        "dialogs are missing from {}",
        dir.display()
    );
    for f in &files {
        eprintln!("dialog {}", f.display());
        run_dialog(&t, f);
    }
    // Nothing smuggled: the messages refused above never reached a mailbox.
    t.wait_queue_empty();
    for m in t.maildir("ann").iter().chain(t.maildir("bob").iter()) {
        let s = String::from_utf8_lossy(m);
        assert!(
            !s.contains("evil@remote.example") && !s.contains("Subject: big"),
            "{s}"
        );
    }
    t.wait_var("HTTP and unknown verbs counted", |v| {
        v["chasquid/smtpIn/wrongProtoCount"]["GET"] == 1
            && v["chasquid/smtpIn/commandCount"]["unknown\"XYZZY\""].as_u64() >= Some(1)
    });
}
