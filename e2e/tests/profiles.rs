//! `/debug/pprof`: CPU and heap profiles of each process, fetched through
//! monitord and read by Go's own `go tool pprof` (Debian `golang-go`,
//! installed by scripts/test.sh).

use std::process::Command;

use tambo_e2e::*;

/// Runs `go tool pprof` on a profile (`-top` unless `args` say); its
/// output. pprof names the addresses from the files the profile points
/// into: the binaries under test.
fn pprof(t: &Tambo, name: &str, profile: &[u8], args: &[&str]) -> String {
    let path = t.dir.path().join(name);
    std::fs::write(&path, profile).unwrap();
    let home = t.dir.path().join("gohome");
    std::fs::create_dir_all(&home).unwrap();
    let out = Command::new("go")
        .args(["tool", "pprof"])
        .args(if args.is_empty() { &["-top"][..] } else { args })
        .arg(&path)
        .env("HOME", &home)
        .env("GOCACHE", home.join("cache"))
        .output()
        .expect("go (golang-go) runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "go tool pprof failed: {text}");
    text
}

/// A CPU profile of smtpd taken while it works, and heap profiles of each
/// daemon, are read by `go tool pprof`, with our functions' names.
#[test]
fn profiles_are_read_by_go_tool_pprof() {
    // A sample every 4 KiB allocated, not 512: the daemons hold too little
    // for the default to be sure of a sample.
    let mut t = Tambo::new("", "", "heap_profile_rate = 4096\n");
    t.start_all();
    let index = wait_for("every daemon on the profiles page", || {
        let (status, _, body) = t.http_get("/debug/pprof/");
        (status == 200
            && ["smtpd", "queued", "deliverd"]
                .iter()
                .all(|r| body.contains(&format!("<td>{r}</td>"))))
        .then_some(body)
    });
    assert!(index.contains("heap?process="), "{index}");
    let (_, _, home) = t.http_get("/");
    assert!(home.contains("href=\"/debug/pprof/\""), "{home}");

    // Work for smtpd while it is profiled: sessions one after another.
    let addr = t.http_addr();
    let profiling = std::thread::spawn(move || {
        http_get_bytes(addr, "/debug/pprof/profile?process=smtpd&seconds=3")
    });
    let started = std::time::Instant::now();
    let mut sent = 0;
    while started.elapsed() < std::time::Duration::from_secs(3) {
        let r = t.send(
            "a@remote.test",
            &["ann@example.test"],
            &message(&format!("p{sent}"), "x\r\n"),
        );
        assert_eq!(r.code, 250);
        sent += 1;
    }
    let (status, head, profile) = profiling.join().unwrap();
    assert_eq!(status, 200, "{head} {}", String::from_utf8_lossy(&profile));
    assert!(head.contains("application/octet-stream"), "{head}");
    let traces = pprof(&t, "cpu.pb", &profile, &["-traces"]);
    assert!(
        traces.contains("File: tambo-smtpd") && traces.contains("Type: cpu"),
        "{traces}"
    );
    // Named from the binary: the sessions ran on tokio's workers.
    assert!(traces.contains("enter_runtime"), "{traces}");

    // queued's heap, named; smtpd's and deliverd's read (naming each
    // 150 MB debug binary takes go several seconds).
    let (status, head, profile) = http_get_bytes(t.http_addr(), "/debug/pprof/heap?process=queued");
    assert_eq!(status, 200, "{head}");
    let traces = pprof(&t, "queued.heap.pb", &profile, &["-traces"]);
    assert!(
        traces.contains("File: tambo-queued") && traces.contains("Type: inuse_space"),
        "{traces}"
    );
    // Some memory is held (its runtime, its buffers), and its stacks
    // have names from the binary.
    assert!(traces.contains("-----------+"), "{traces}");
    assert!(
        traces
            .lines()
            .any(|l| l.starts_with("             ") && !l.trim().starts_with('[')),
        "{traces}"
    );
    for role in ["smtpd", "deliverd"] {
        let (status, head, profile) =
            http_get_bytes(t.http_addr(), &format!("/debug/pprof/heap?process={role}"));
        assert_eq!(status, 200, "{role}: {head}");
        let top = pprof(
            &t,
            &format!("{role}.heap.pb"),
            &profile,
            &["-top", "-symbolize=none"],
        );
        assert!(top.contains("Type: inuse_space"), "{role}: {top}");
    }
}

/// Wrong requests get a clear answer, and a second profile of the same
/// process while one is taken is refused, not queued.
#[test]
fn profile_requests_are_checked() {
    let mut t = Tambo::default_setup();
    t.start_all();
    wait_for("smtpd on the profiles page", || {
        let (_, _, body) = t.http_get("/debug/pprof/");
        body.contains("<td>smtpd</td>").then_some(())
    });
    let (status, _, body) = t.http_get("/debug/pprof/profile?seconds=1");
    assert_eq!(status, 400);
    assert!(
        body.contains("say which process") && body.contains("smtpd pid"),
        "{body}"
    );
    for bad in ["0", "61", "x"] {
        let (status, _, body) =
            t.http_get(&format!("/debug/pprof/profile?process=smtpd&seconds={bad}"));
        assert_eq!(status, 400, "{bad}: {body}");
    }
    let (status, _, body) = t.http_get("/debug/pprof/heap?process=nosuch");
    assert_eq!(status, 404, "{body}");
    let (status, _, _) = t.http_get("/debug/pprof/goroutine?process=smtpd");
    assert_eq!(status, 404);

    // Two at once: one is taken, the other refused.
    let addr = t.http_addr();
    let ask = move || {
        std::thread::spawn(move || {
            let (status, _, body) =
                http_get_bytes(addr, "/debug/pprof/profile?process=queued&seconds=3");
            (status, String::from_utf8_lossy(&body).into_owned())
        })
    };
    let (a, b) = (ask(), ask());
    let mut got = [a.join().unwrap(), b.join().unwrap()];
    got.sort_by_key(|(status, _)| *status);
    assert_eq!(got[0].0, 200, "{got:?}");
    assert_eq!(got[1].0, 503, "{got:?}");
    assert!(got[1].1.contains("being taken"), "{got:?}");
    // And when it is done, the next one is taken.
    let (status, _, body) = t.http_get("/debug/pprof/heap?process=queued");
    assert_eq!(status, 200, "{body}");
}
