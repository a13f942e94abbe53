//! The traces monitord keeps (REFERENCE §7.5): per family, the last 10 of
//! each latency bucket and the last 10 with an error; shown at
//! `/debug/traces`.
//!
//! What a peer can make monitord hold is bounded: only the families its
//! role records ([`family_of`]; anything else is dropped and counted), a
//! fixed number of traces in each, each already bounded by its pusher and
//! checked again here, an errored one held once for both its lists.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write;
use std::sync::Arc;

use tambo_proto::Role;
use tambo_proto::trace::{MAX_EVENTS, MAX_TEXT, TraceRecord};

use crate::text::escape;

/// Latency buckets' lower bounds, in microseconds: ≥0, 5 ms, 10 ms, 50 ms,
/// 100 ms, 300 ms, 1 s, 10 s.
pub const BUCKETS: [u64; 8] = [
    0, 5_000, 10_000, 50_000, 100_000, 300_000, 1_000_000, 10_000_000,
];

const BUCKET_NAMES: [&str; 8] = [
    "≥0", "≥5ms", "≥10ms", "≥50ms", "≥100ms", "≥300ms", "≥1s", "≥10s",
];

/// Traces kept per bucket, and errored ones per family.
pub const KEEP: usize = 10;

/// The families each role may push (REFERENCE §7.5, and tambo's own):
/// a process traces only its own work, so none can fill or fake the
/// others' families.
pub fn family_of(role: Role, family: &str) -> bool {
    let allowed: &[&str] = match role {
        Role::Smtpd => &["SMTP.Conn", "SPF", "Auth.Authenticate"],
        Role::Queued => &[
            "Queue.Put",
            "Queue.SendLoop",
            "Hook.Post-DATA",
            "Authentication",
            "Auth.Reload",
            "DomainInfo.Reload",
            "Alias.Resolve",
            "Alias.Exists",
            "DKIM.Sign",
        ],
        Role::Deliverd => &[
            "Courier.MDA",
            "Courier.SMTP.Deliver",
            "Courier.SMTP.Forward",
            "Courier.LMTP",
            "Courier.Pipe",
            "Courier.Maildir",
            "STSCache.Fetch",
            "STSCache.Refresh",
            "DKIM.Verify",
        ],
        _ => &[],
    };
    allowed.contains(&family)
}

/// A trace and who sent it.
#[derive(Debug, Clone)]
pub struct Entry {
    pub role: Role,
    pub pid: u32,
    pub rec: TraceRecord,
}

#[derive(Debug, Default)]
struct Family {
    count: u64,
    buckets: [VecDeque<Arc<Entry>>; 8],
    errors: VecDeque<Arc<Entry>>,
}

#[derive(Debug, Default)]
pub struct Sampled {
    families: BTreeMap<String, Family>,
}

fn push(q: &mut VecDeque<Arc<Entry>>, e: Arc<Entry>) {
    if q.len() >= KEEP {
        q.pop_front();
    }
    q.push_back(e);
}

/// Whether `role` may send `rec`: one of its families, within the
/// bounds its pusher keeps.
pub fn acceptable(role: Role, rec: &TraceRecord) -> bool {
    family_of(role, &rec.family)
        && rec.title.len() <= MAX_TEXT + 4
        && rec.events.len() <= MAX_EVENTS
        && rec.events.iter().all(|(_, t)| t.len() <= MAX_TEXT + 4)
}

impl Sampled {
    /// Keeps a trace; false if it was refused (a family its role does not
    /// record, or a record over the bounds).
    pub fn add(&mut self, role: Role, pid: u32, rec: TraceRecord) -> bool {
        if !acceptable(role, &rec) {
            return false;
        }
        let f = self.families.entry(rec.family.clone()).or_default();
        f.count += 1;
        let b = BUCKETS
            .iter()
            .rposition(|&lo| rec.duration_us >= lo)
            .unwrap_or(0);
        let e = Arc::new(Entry { role, pid, rec });
        if e.rec.error {
            push(&mut f.errors, e.clone());
        }
        push(&mut f.buckets[b], e);
        true
    }

    /// The traces of one family's bucket (`Some(i)`) or its errors, newest
    /// first.
    pub fn list(&self, family: &str, bucket: Option<usize>) -> Vec<&Arc<Entry>> {
        let Some(f) = self.families.get(family) else {
            return Vec::new();
        };
        let q = match bucket {
            Some(i) if i < BUCKETS.len() => &f.buckets[i],
            Some(_) => return Vec::new(),
            None => &f.errors,
        };
        q.iter().rev().collect()
    }
}

fn html(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Text from a peer, for HTML: escaped twice (control characters, then
/// markup).
fn peer(s: &str) -> String {
    html(&escape(s))
}

fn duration(us: u64) -> String {
    tambo_common::duration::format(std::time::Duration::from_micros(us))
}

const STYLE: &str = "<style>
body { font: 15px/1.5 system-ui, sans-serif; max-width: 60em; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; }
td, th { padding: 0.2em 0.9em 0.2em 0; text-align: left; }
th { color: #555; font-weight: 600; }
.err { color: #b00; }
.trace { border-top: 1px solid #ddd; padding: 0.5em 0; }
pre { margin: 0.3em 0 0 1em; font-size: 13px; white-space: pre-wrap; }
a { color: #0645ad; }
</style>";

/// One trace, as HTML.
fn show(out: &mut String, role: Role, pid: u32, rec: &TraceRecord, running: bool) {
    let start = chrono::DateTime::from_timestamp_millis(rec.start_ms)
        .map(|t| {
            t.with_timezone(&chrono::Local)
                .format("%Y-%m-%d %H:%M:%S%.3f")
                .to_string()
        })
        .unwrap_or_default();
    let class = if rec.error { " err" } else { "" };
    let what = if running { "running for " } else { "" };
    let _ = write!(
        out,
        "<div class=\"trace{class}\"><b>{}</b> · {} · {} (pid {}) · {start} · {what}{}",
        peer(&rec.title),
        peer(&rec.family),
        role.name(),
        pid,
        duration(rec.duration_us)
    );
    out.push_str("<pre>");
    for (i, (at, text)) in rec.events.iter().enumerate() {
        if i + 1 == rec.events.len() && rec.dropped > 0 {
            let _ = writeln!(out, "… {} events left out", rec.dropped);
        }
        let _ = writeln!(out, "{:>10}  {}", duration(*at), peer(text));
    }
    out.push_str("</pre></div>\n");
}

/// `/debug/traces`: the families and what runs now, or one list
/// (`family`, and `bucket`, or the errors when it is `None`).
pub fn page(
    s: &Sampled,
    running: &[(Role, u32, &[TraceRecord])],
    family: Option<&str>,
    bucket: Option<usize>,
) -> String {
    let mut out = format!(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>tambo traces</title>{STYLE}</head><body>\n<h1>Traces</h1>\n<p><a href=\"/\">index</a> · <a href=\"/debug/traces\">all families</a></p>\n"
    );
    match family {
        None => {
            out.push_str("<table>\n<tr><th>family</th><th>seen</th>");
            for n in BUCKET_NAMES {
                let _ = write!(out, "<th>{}</th>", html(n));
            }
            out.push_str("<th>errors</th></tr>\n");
            for (name, f) in &s.families {
                let link = peer(name);
                let _ = write!(out, "<tr><td>{link}</td><td>{}</td>", f.count);
                for (i, q) in f.buckets.iter().enumerate() {
                    if q.is_empty() {
                        out.push_str("<td>0</td>");
                    } else {
                        let _ = write!(
                            out,
                            "<td><a href=\"/debug/traces?family={link}&amp;b={i}\">{}</a></td>",
                            q.len()
                        );
                    }
                }
                let _ = writeln!(
                    out,
                    "<td class=\"err\"><a href=\"/debug/traces?family={link}&amp;errors\">{}</a></td></tr>",
                    f.errors.len()
                );
            }
            out.push_str("</table>\n<h2>Running now</h2>\n");
            let mut any = false;
            for (role, pid, recs) in running {
                for r in recs.iter() {
                    any = true;
                    show(&mut out, *role, *pid, r, true);
                }
            }
            if !any {
                out.push_str("<p>Nothing.</p>\n");
            }
        }
        Some(name) => {
            let which = bucket.map_or("with errors", |b| {
                BUCKET_NAMES.get(b).copied().unwrap_or("?")
            });
            let _ = writeln!(out, "<h2>{} {}</h2>", peer(name), html(which));
            let list = s.list(name, bucket);
            if list.is_empty() {
                out.push_str("<p>None kept.</p>\n");
            }
            for e in list {
                show(&mut out, e.role, e.pid, &e.rec, false);
            }
        }
    }
    out.push_str("</body></html>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(family: &str, us: u64, error: bool) -> TraceRecord {
        TraceRecord {
            family: family.into(),
            title: "<script>x".into(),
            start_ms: 0,
            duration_us: us,
            error,
            events: vec![(1, "MAIL FROM:<a@b>\n<i>".into())],
            dropped: 0,
        }
    }

    #[test]
    fn sampled_by_latency_and_errors_and_bounded() {
        let mut s = Sampled::default();
        for i in 0..25 {
            assert!(s.add(Role::Smtpd, 1, rec("SMTP.Conn", 7_000 + i, i % 5 == 0)));
        }
        assert_eq!(s.list("SMTP.Conn", Some(1)).len(), KEEP);
        assert_eq!(s.list("SMTP.Conn", None).len(), 5);
        assert!(s.list("SMTP.Conn", Some(0)).is_empty());
        // A role keeps to its own families: smtpd cannot fill or fake
        // queued's or deliverd's, and nobody invents one.
        assert!(!s.add(Role::Smtpd, 1, rec("Queue.SendLoop", 1, false)));
        assert!(!s.add(Role::Queued, 2, rec("Made.Up", 1, false)));
        assert!(!s.add(Role::Ctl, 2, rec("SMTP.Conn", 1, false)));
        assert!(s.add(Role::Queued, 2, rec("Queue.Put", 1, false)));
    }

    #[test]
    fn a_peer_cannot_write_markup() {
        let mut s = Sampled::default();
        s.add(Role::Smtpd, 1, rec("SMTP.Conn", 1, true));
        let page = page(&s, &[], Some("SMTP.Conn"), None);
        assert!(
            !page.contains("<script>") && !page.contains("<i>"),
            "{page}"
        );
        assert!(page.contains("&lt;script&gt;x"), "{page}");
        assert!(page.contains("MAIL FROM:&lt;a@b&gt;\\n&lt;i&gt;"), "{page}");
    }

    #[test]
    fn running_traces_are_shown_escaped_on_the_families_page() {
        let s = Sampled::default();
        let page_empty = page(&s, &[], None, None);
        assert!(
            page_empty.contains("Running now</h2>\n<p>Nothing."),
            "{page_empty}"
        );
        let running = [rec("SMTP.Conn", 2_000_000, false)];
        let page = page(&s, &[(Role::Smtpd, 7, &running)], None, None);
        assert!(page.contains("smtpd (pid 7)"), "{page}");
        assert!(page.contains("running for 2s"), "{page}");
        assert!(!page.contains("<script>"), "{page}");
    }
}
