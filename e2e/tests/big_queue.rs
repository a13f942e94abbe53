//! A queue of 100,000 items: queued loads it at startup in a time this
//! test reports, holds it in bounded memory, keeps answering (new mail gets
//! the "queue full" 451 while it is over `max_queue_items`), and shows its
//! head on `/debug/queue` without copying the whole of it every time.
//!
//! The items are copies of one real item, made by the server itself: a
//! message to `hold@`, whose only recipient is a program that asks to be
//! retried (exit 75). Writing 100,000 messages through SMTP would take
//! minutes in a debug build; copying the files takes seconds and gives
//! queued exactly what a full queue would leave on disk.

use std::time::{Duration, Instant};

use tambo_e2e::*;

const ITEMS: usize = 100_000;
/// What queued may hold with them: 3 KiB an item, runtime included, in a
/// debug build (about 2.5 KiB measured; a release build holds less).
const MAX_KIB: u64 = 3 * ITEMS as u64;

#[test]
fn a_queue_of_100k_items_loads_in_bounded_memory() {
    let (mut t, _program) = Tambo::holding();
    t.start_all();
    let r = t.send(
        "a@remote.test",
        &["hold@example.test"],
        &message("held", "x\r\n"),
    );
    assert_eq!(r.code, 250, "{r:?}");
    // Its first attempt failed; the next is an hour away.
    t.wait_var("the first attempt", |v| {
        v["chasquid/queue/deliverAttempts"]["pipe"].as_u64() >= Some(1)
    });
    // Rewritten after it: an m: file from then on.
    let item_name = wait_for("the item rewritten", || {
        t.queue_files().into_iter().find(|f| f.starts_with("m:"))
    });
    let id = item_name.trim_start_matches("m:").to_string();
    for d in ["smtpd", "deliverd", "queued"] {
        t.stop(d);
    }

    // 100,000 copies, each with its own ID.
    let queue = t.data_dir.join("queue");
    let item = std::fs::read_to_string(queue.join(&item_name)).unwrap();
    assert!(item.contains(&format!("\"{id}\"")), "{item}");
    let started = Instant::now();
    for n in 0..ITEMS {
        let copy = format!("C{n:010}");
        std::fs::write(
            queue.join(format!("m:{copy}")),
            item.replace(&format!("\"{id}\""), &format!("\"{copy}\"")),
        )
        .unwrap();
        // Bodies are hard links, to a fresh copy every 50,000 (ext4 allows
        // 65,000 links to a file).
        let source = queue.join(format!("d:C{:010}", n - n % 50_000));
        if n % 50_000 == 0 {
            std::fs::copy(queue.join(format!("d:{id}")), &source).unwrap();
        } else {
            std::fs::hard_link(&source, queue.join(format!("d:{copy}"))).unwrap();
        }
    }
    eprintln!("{ITEMS} items written in {:?}", started.elapsed());

    // queued alone: with deliverd away, every item waits for it, and the
    // test measures the queue, not 100,000 executions of the program.
    let started = Instant::now();
    t.start("queued");
    let loaded = started.elapsed();
    let log = t.log("queued");
    assert!(
        log.contains(&format!("queue loaded: {} items, 0 unreadable", ITEMS + 1)),
        "{log}"
    );
    let pid = t.pid("queued");
    // Every item is live (waiting for deliverd: the first 5,000 in a
    // round, the others for their turn), and queued has said so to
    // monitord.
    let want = format!("length: {}", ITEMS + 1);
    wait_for("the whole queue on /debug/queue", || {
        let (_, _, page) = t.http_get("/debug/queue");
        page.contains(&want).then_some(())
    });
    let rss = rss_kib(pid);
    eprintln!(
        "queue of {} items: loaded in {loaded:?}, queued's RSS {} MiB ({} bytes an item)",
        ITEMS + 1,
        rss / 1024,
        rss * 1024 / (ITEMS as u64 + 1)
    );
    assert!(loaded < Duration::from_secs(120), "loading took {loaded:?}");
    assert!(rss < MAX_KIB, "queued holds {rss} KiB for {ITEMS} items");

    // Still answering: a new message is refused as the queue is full, not
    // lost in a stall; /debug/queue stays bounded.
    t.start("smtpd");
    let mut c = t.smtp();
    c.expect("EHLO client.test", 250);
    c.expect("MAIL FROM:<a@remote.test>", 250);
    c.expect("RCPT TO:<ann@example.test>", 250);
    c.expect("DATA", 354);
    c.send_raw(b"Subject: x\r\n\r\nx\r\n.\r\n");
    let r = c.reply();
    assert_eq!(r.code, 451, "{r:?}");
    assert!(r.text().contains("4.3.0"), "{r:?}");
    t.wait_log("smtpd", "queue is full");
    let (status, _, page) = t.http_get("/debug/queue");
    assert_eq!(status, 200);
    // The 200 oldest, and a count of the rest.
    assert!(
        page.len() < 128 << 10,
        "/debug/queue is {} bytes",
        page.len()
    );
    assert_eq!(page.matches("## Item ").count(), 200);
    assert!(
        page.contains(&format!("… and {} more", ITEMS + 1 - 200)),
        "{page}"
    );
    assert!(rss_kib(pid) < MAX_KIB);
}
