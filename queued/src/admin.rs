//! The admin commands that ask the running queued (REFERENCE §9;
//! `tambo aliases-resolve`, `domaininfo-remove`, `queue`): one request on
//! a submit.sock connection from the admin CLI (role ctl, which the IPC
//! identity check lets in only as root), one text answer.

use std::fmt::Write;
use std::sync::Arc;

use tambo_proto::submit::AdminRequest;

use crate::item::{Item, Kind, Status};
use crate::queue::Queue;

/// Answers one admin request: the text `tambo` prints, or its error line.
pub async fn answer(q: &Arc<Queue>, req: AdminRequest) -> Result<String, String> {
    match req {
        AdminRequest::AliasesResolve { address } => {
            let mut rs = q
                .resolve_now(&address)
                .await
                .map_err(|e| format!("cannot resolve {address}: {e}"))?;
            // Sorted by type, then address, as chasquid-util prints them.
            rs.sort_by_key(|r| (kind_order(&r.kind), r.address.clone()));
            let mut out = String::new();
            for r in rs {
                let _ = writeln!(out, "{:<10} {}", kind_name(&r.kind), r.address);
            }
            Ok(out)
        }
        AdminRequest::DomaininfoRemove { domain } => {
            let d = tambo_common::address::normalize_domain(&domain)
                .map_err(|e| format!("invalid domain: {e}"))?;
            match q.domaininfo.clear(&d) {
                Ok(true) => Ok(String::new()),
                Ok(false) => Err(format!("no domain information for {d}")),
                Err(e) => Err(format!("cannot remove the domain information of {d}: {e}")),
            }
        }
        AdminRequest::QueueList => {
            let items = q.snapshot();
            Ok(dump(&items, items.len()))
        }
        AdminRequest::QueueFlush { id } => {
            if q.flush(id.as_deref()) {
                Ok(match id {
                    Some(id) => format!("{id}: trying now\n"),
                    None => "every item: trying now\n".into(),
                })
            } else {
                Err(format!("no item {} in the queue", id.unwrap_or_default()))
            }
        }
        AdminRequest::QueueRemove { id, silent } => {
            if q.remove(&id, silent) {
                // Taken out at its loop's next chance: after the delivery
                // attempt under way, if any.
                Ok(if silent {
                    format!("{id}: removing, without a DSN\n")
                } else {
                    format!("{id}: removing; the sender gets a DSN\n")
                })
            } else {
                Err(format!("no item {id} in the queue"))
            }
        }
    }
}

fn kind_name(k: &Kind) -> &'static str {
    match k {
        Kind::Email => "(email)",
        Kind::Pipe => "(pipe)",
        Kind::Forward { .. } => "(forward)",
    }
}

fn kind_order(k: &Kind) -> u8 {
    match k {
        Kind::Email => 0,
        Kind::Pipe => 1,
        Kind::Forward { .. } => 2,
    }
}

/// The queue as text, chasquid's `/debug/queue` layout (REFERENCE §7.4):
/// `items` are the first of `total`.
pub fn dump(items: &[Item], total: usize) -> String {
    let mut s = String::from("# Queue status\n\n");
    let _ = writeln!(
        s,
        "date: {}",
        chrono::Local::now().format("%Y-%m-%d %H:%M:%S %z")
    );
    let _ = writeln!(s, "length: {total}\n");
    s.push_str(&dump_items(items));
    if items.len() < total {
        let _ = writeln!(
            s,
            "… and {} more: `tambo queue` lists every item",
            total - items.len()
        );
    }
    s
}

/// The items part of [`dump`]: what changes when the queue does.
pub fn dump_items(items: &[Item]) -> String {
    let mut s = String::new();
    for item in items {
        let created = chrono::DateTime::from_timestamp_millis(item.created_ms)
            .map(|t| {
                t.with_timezone(&chrono::Local)
                    .format("%Y-%m-%d %H:%M:%S %z")
                    .to_string()
            })
            .unwrap_or_default();
        let _ = writeln!(s, "## Item {}", item.id);
        let _ = writeln!(s, "created at: {created}");
        let _ = writeln!(s, "from: {}", item.from);
        let _ = writeln!(s, "to: [{}]", item.rcpt_to.join(" "));
        for r in &item.recipients {
            let status = match r.status {
                Status::Pending => "PENDING",
                Status::Sent => "SENT",
                Status::Failed => "FAILED",
            };
            let kind = match r.kind {
                Kind::Email => "EMAIL",
                Kind::Pipe => "PIPE",
                Kind::Forward { .. } => "FORWARD",
            };
            let _ = writeln!(s, "{status} {} ({kind})", r.address);
            let _ = writeln!(s, "  original address: {}", r.original_address);
            let _ = writeln!(s, "  last failure: {:?}", r.last_failure);
        }
        s.push('\n');
    }
    s
}
