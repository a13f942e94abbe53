//! Traces (REFERENCE §7.5): what one SMTP session, one queue put, one
//! delivery did, with times, recorded where it happens and pushed to
//! monitord with the counters, which keeps a sample to show at
//! `/debug/traces`.
//!
//! Recording never waits and never grows without bound: a trace keeps at
//! most [`MAX_EVENTS`] events (the first ones and the last one), each cut
//! to [`MAX_TEXT`] bytes; finished traces wait for the pusher in a buffer
//! of [`MAX_PENDING`], the oldest dropped beyond it.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::{Deserialize, Serialize};

/// Events one trace keeps (REFERENCE §7.5: at most 100; the first ones and
/// the last are kept).
pub const MAX_EVENTS: usize = 100;

/// Longest event text or title, in bytes.
pub const MAX_TEXT: usize = 120;

/// Finished traces waiting for the pusher at most.
pub const MAX_PENDING: usize = 256;

/// Traces in one push frame at most: at the limits, a frame stays under
/// [`crate::monitor::MAX_MONITOR_FRAME`].
pub const MAX_PER_FRAME: usize = 8;

/// A finished trace, as pushed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceRecord {
    pub family: String,
    pub title: String,
    /// Unix time of the start, milliseconds.
    pub start_ms: i64,
    pub duration_us: u64,
    pub error: bool,
    /// (microseconds since the start, text).
    pub events: Vec<(u64, String)>,
    /// Events left out between the first ones and the last.
    pub dropped: u32,
}

/// A trace being recorded; it is sent when dropped. While it runs, the
/// pusher can show it (`/debug/traces`, "active"): its record sits behind
/// a lock only the trace itself and that snapshot take.
pub struct Trace {
    rec: Shared,
    started: Instant,
    id: u64,
}

/// A running trace's record, shared with the snapshots of [`active`].
type Shared = Arc<Mutex<TraceRecord>>;

/// Traces running now, by when they started.
static ACTIVE: Mutex<BTreeMap<u64, (Instant, Shared)>> = Mutex::new(BTreeMap::new());
static NEXT: AtomicU64 = AtomicU64::new(0);

/// Running traces shown at most per process: the ones running longest.
pub const MAX_ACTIVE: usize = MAX_PER_FRAME;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn cut(mut s: String) -> String {
    if s.len() > MAX_TEXT {
        let mut end = MAX_TEXT;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

impl Trace {
    pub fn new(family: &'static str, title: impl Into<String>) -> Self {
        let start_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let rec = Arc::new(Mutex::new(TraceRecord {
            family: family.to_string(),
            title: cut(title.into()),
            start_ms,
            duration_us: 0,
            error: false,
            events: Vec::new(),
            dropped: 0,
        }));
        let started = Instant::now();
        let id = NEXT.fetch_add(1, Ordering::Relaxed);
        lock(&ACTIVE).insert(id, (started, rec.clone()));
        Trace { rec, started, id }
    }

    /// Records an event. Past [`MAX_EVENTS`], the last slot holds the
    /// latest event and the ones in between are counted.
    pub fn event(&mut self, text: impl Into<String>) {
        let at = self.started.elapsed().as_micros() as u64;
        let e = (at, cut(text.into()));
        let mut rec = lock(&self.rec);
        if rec.events.len() < MAX_EVENTS {
            rec.events.push(e);
        } else {
            rec.dropped += 1;
            if let Some(last) = rec.events.last_mut() {
                *last = e;
            }
        }
    }

    /// Records an event and marks the trace as errored.
    pub fn error(&mut self, text: impl Into<String>) {
        lock(&self.rec).error = true;
        self.event(text);
    }

    /// Changes the title (once it is known, e.g. the queue ID).
    pub fn set_title(&mut self, title: impl Into<String>) {
        lock(&self.rec).title = cut(title.into());
    }
}

impl Drop for Trace {
    fn drop(&mut self) {
        lock(&ACTIVE).remove(&self.id);
        let mut rec = std::mem::replace(
            &mut *lock(&self.rec),
            TraceRecord {
                family: String::new(),
                title: String::new(),
                start_ms: 0,
                duration_us: 0,
                error: false,
                events: Vec::new(),
                dropped: 0,
            },
        );
        rec.duration_us = self.started.elapsed().as_micros() as u64;
        let mut p = PENDING.lock().unwrap_or_else(|e| e.into_inner());
        if p.len() >= MAX_PENDING {
            p.pop_front();
        }
        p.push_back(rec);
    }
}

static PENDING: Mutex<VecDeque<TraceRecord>> = Mutex::new(VecDeque::new());

/// Snapshots of the traces running now (at most [`MAX_ACTIVE`], the ones
/// running longest), each with its duration so far.
pub fn active() -> Vec<TraceRecord> {
    let running: Vec<(Instant, Shared)> =
        lock(&ACTIVE).values().take(MAX_ACTIVE).cloned().collect();
    running
        .into_iter()
        .map(|(started, rec)| {
            let mut r = lock(&rec).clone();
            r.duration_us = started.elapsed().as_micros() as u64;
            r
        })
        .collect()
}

/// Takes up to [`MAX_PER_FRAME`] finished traces, oldest first.
pub fn take() -> Vec<TraceRecord> {
    let mut p = PENDING.lock().unwrap_or_else(|e| e.into_inner());
    let n = p.len().min(MAX_PER_FRAME);
    p.drain(..n).collect()
}

/// Puts back traces that could not be sent (at the front, oldest first).
pub fn restore(traces: Vec<TraceRecord>) {
    let mut p = PENDING.lock().unwrap_or_else(|e| e.into_inner());
    for t in traces.into_iter().rev() {
        if p.len() >= MAX_PENDING {
            break;
        }
        p.push_front(t);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::encode;
    use crate::monitor::{MAX_MONITOR_FRAME, MonitorMessage};

    #[test]
    fn a_long_trace_keeps_its_first_events_and_its_last() {
        let mut t = Trace::new("Test.Long", "x".repeat(500));
        for i in 0..150 {
            t.event(format!("e{i}"));
        }
        let rec = lock(&t.rec).clone();
        assert_eq!(rec.events.len(), MAX_EVENTS);
        assert_eq!(rec.events[0].1, "e0");
        assert_eq!(rec.events[MAX_EVENTS - 2].1, "e98");
        assert_eq!(rec.events[MAX_EVENTS - 1].1, "e149");
        assert_eq!(rec.dropped, 50);
        assert!(rec.title.len() <= MAX_TEXT + '…'.len_utf8());
    }

    #[test]
    fn a_running_trace_is_active_until_it_ends() {
        let mut t = Trace::new("Test.Active", "still running");
        t.event("first");
        let seen = active().into_iter().find(|r| r.title == "still running");
        assert_eq!(seen.map(|r| r.events.len()), Some(1));
        drop(t);
        assert!(!active().iter().any(|r| r.title == "still running"));
    }

    #[test]
    fn a_full_frame_of_full_traces_fits() {
        let rec = TraceRecord {
            family: "f".repeat(MAX_TEXT),
            title: "t".repeat(MAX_TEXT + 3),
            start_ms: i64::MAX,
            duration_us: u64::MAX,
            error: true,
            events: vec![(u64::MAX, "e".repeat(MAX_TEXT + 3)); MAX_EVENTS],
            dropped: u32::MAX,
        };
        let msg = MonitorMessage::Traces(vec![rec; MAX_PER_FRAME]);
        assert!(encode(&msg).unwrap().len() - 4 <= MAX_MONITOR_FRAME);
    }
}
