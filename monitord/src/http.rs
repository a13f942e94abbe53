//! The monitoring HTTP server (only when `monitoring_address` is set;
//! never to be exposed publicly). Read-only: nothing here can change mail
//! flow.
//!
//! Budgets: at most [`MAX_CONNECTIONS`] connections at once (over it a new
//! one is closed at once); a connection that does not send a whole request
//! head within the idle timeout ([`IDLE_TIMEOUT`]) after connecting or
//! after its last response is closed; so is one whose client stops reading
//! a response for that long. Each closing is counted in
//! `tambo/monitord/httpClosed`.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::time::Sleep;

use tambo_proto::metrics::names;

use crate::collector::{Shared, Totals, lock};
use crate::text::escape;
use crate::{expvar, openmetrics};

/// Most monitoring connections at once: a scraper or two and a few
/// browsers need far fewer.
pub const MAX_CONNECTIONS: usize = 64;

/// How long a connection may wait before sending its (next) request head,
/// and a response may wait for the client to read it. Prometheus scrapes
/// every 15 s by default, so its kept-alive connection stays open.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Site {
    pub totals: Shared,
    pub hostname: String,
    pub cmdline: Vec<String>,
    pub started: chrono::DateTime<chrono::Local>,
    /// monitord's own effective config (it pushes to nobody).
    pub config: String,
}

/// Serves the monitoring listener forever. `idle` is [`IDLE_TIMEOUT`] or
/// its test knob.
pub async fn run(listener: TcpListener, site: Arc<Site>, idle: Duration) {
    let connections = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("monitoring accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Taken here, in accept order, so the cap is exact.
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            lock(&site.totals).count(names::MONITORD_HTTP_CLOSED, Some("max_connections"));
            tracing::debug!("monitoring: refusing a connection: {MAX_CONNECTIONS} already open");
            continue;
        };
        let site = site.clone();
        tokio::spawn(async move {
            let totals = site.totals.clone();
            let svc = hyper::service::service_fn(move |req| {
                let site = site.clone();
                async move {
                    let resp = match pprof_path(&req) {
                        Some(rest) => {
                            let query = req.uri().query().unwrap_or("");
                            crate::pprof::serve(&site, rest, query).await
                        }
                        None => route(&site, &req),
                    };
                    Ok::<_, Infallible>(resp)
                }
            });
            // hyper starts the header read timeout whenever it waits for a
            // request head: right after connecting and after each response
            // on a kept-alive connection, so it is also the idle timeout
            // (e2e/tests/monitoring.rs checks both).
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(idle)
                .serve_connection(TokioIo::new(WriteDeadline::new(stream, idle)), svc);
            if let Err(e) = conn.await {
                let why = if is_write_stall(&e) {
                    Some("write_stalled")
                } else if e.is_timeout() {
                    Some("idle")
                } else {
                    None
                };
                if let Some(why) = why {
                    lock(&totals).count(names::MONITORD_HTTP_CLOSED, Some(why));
                }
                tracing::debug!("monitoring connection: {e}");
            }
            drop(permit);
        });
    }
}

fn is_write_stall(e: &hyper::Error) -> bool {
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        if let Some(io) = c.downcast_ref::<io::Error>() {
            return io.kind() == io::ErrorKind::TimedOut;
        }
        cause = c.source();
    }
    false
}

/// A stream whose writes fail once they have made no progress for `limit`:
/// a client that asks for a large `/metrics` and never reads it would
/// otherwise hold its connection, and the response, for ever.
struct WriteDeadline<T> {
    inner: T,
    limit: Duration,
    /// Armed while a write is pending.
    stalled: Option<Pin<Box<Sleep>>>,
}

impl<T> WriteDeadline<T> {
    fn new(inner: T, limit: Duration) -> Self {
        WriteDeadline {
            inner,
            limit,
            stalled: None,
        }
    }

    fn guard<R>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<R>>) -> Poll<io::Result<R>> {
        if r.is_ready() {
            self.stalled = None;
            return r;
        }
        let limit = self.limit;
        let sleep = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        if sleep.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client stopped reading",
            )));
        }
        Poll::Pending
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for WriteDeadline<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for WriteDeadline<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.guard(cx, r)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.guard(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_flush(cx);
        this.guard(cx, r)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.guard(cx, r)
    }
}

/// What follows `/debug/pprof/` in a GET for it; those are served apart,
/// as they wait for a process's answer. (A HEAD, which would take a
/// profile to throw it away, is not one: it gets the 404 of an unknown
/// path.)
fn pprof_path(req: &Request<Incoming>) -> Option<&str> {
    if req.method() != Method::GET {
        return None;
    }
    match req.uri().path() {
        "/debug/pprof" => Some(""),
        p => p.strip_prefix("/debug/pprof/"),
    }
}

fn route(site: &Site, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "only GET\n".into(),
        );
    }
    match req.uri().path() {
        "/" => reply(StatusCode::OK, "text/html; charset=utf-8", index(site)),
        "/debug/vars" => {
            let body = expvar::render(&lock(&site.totals), &site.cmdline);
            reply(StatusCode::OK, "application/json; charset=utf-8", body)
        }
        "/metrics" => reply(
            StatusCode::OK,
            openmetrics::CONTENT_TYPE,
            openmetrics::render(&lock(&site.totals)),
        ),
        "/debug/flags" => reply(
            StatusCode::OK,
            "text/plain; charset=utf-8",
            flags(&lock(&site.totals)),
        ),
        "/debug/config" => {
            let mut body = format!("# monitord (pid {})\n", std::process::id());
            for line in site.config.lines() {
                body.push_str("  ");
                body.push_str(line);
                body.push('\n');
            }
            body.push('\n');
            body.push_str(&config(&lock(&site.totals)));
            reply(StatusCode::OK, "text/plain; charset=utf-8", body)
        }
        "/debug/traces" => {
            // `?family=<name>&b=<bucket>` or `?family=<name>&errors`.
            let query = req.uri().query().unwrap_or("");
            let mut family = None;
            let mut bucket = None;
            for kv in query.split('&') {
                match kv.split_once('=') {
                    Some(("family", v)) => family = Some(v.to_string()),
                    Some(("b", v)) => bucket = v.parse::<usize>().ok(),
                    _ => {}
                }
            }
            let t = lock(&site.totals);
            // Only the connected: a gone process's traces ended with it.
            let running: Vec<_> = t
                .processes
                .iter()
                .filter(|p| p.connected)
                .map(|p| (p.role, p.pid, p.active.as_slice()))
                .collect();
            let body = crate::traces::page(&t.traces, &running, family.as_deref(), bucket);
            reply(StatusCode::OK, "text/html; charset=utf-8", body)
        }
        "/debug/tasks" => reply(
            StatusCode::OK,
            "text/plain; charset=utf-8",
            tasks(&lock(&site.totals)),
        ),
        "/debug/queue" => reply(
            StatusCode::OK,
            "text/plain; charset=utf-8",
            lock(&site.totals)
                .queue
                .as_deref()
                .map(text_lines)
                .unwrap_or_else(|| "queued has not sent the queue yet\n".into()),
        ),
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "404 not found\n".into(),
        ),
    }
}

fn reply(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

fn index(site: &Site) -> String {
    let now = chrono::Local::now();
    let uptime = (now - site.started).to_std().unwrap_or_default();
    let t = lock(&site.totals);
    let row = |role: &str, pid: u32, version: &str| {
        format!(
            "<tr><td>{role}</td><td>{pid}</td><td>{}</td></tr>\n",
            html(&escape(version))
        )
    };
    let mut procs = row("monitord", std::process::id(), tambo_common::build::VERSION);
    for p in t.processes.iter().filter(|p| p.connected) {
        procs.push_str(&row(p.role.name(), p.pid, &p.version));
    }
    // A few numbers a person looks for first; the rest is in /debug/vars.
    let count = |name: &str| t.counters.get(name).copied().unwrap_or(0);
    let sum = |name: &str| t.maps.get(name).map_or(0, |m| m.values().sum::<u64>());
    let glance = format!(
        "<tr><td>messages queued</td><td>{}</td></tr>\n\
         <tr><td>delivery attempts</td><td>{}</td></tr>\n\
         <tr><td>DSNs sent</td><td>{}</td></tr>\n\
         <tr><td>SMTP commands</td><td>{}</td></tr>",
        count(tambo_proto::metrics::names::QUEUE_PUT_COUNT),
        sum(tambo_proto::metrics::names::QUEUE_DELIVER_ATTEMPTS),
        count(tambo_proto::metrics::names::QUEUE_DSN_QUEUED),
        sum(tambo_proto::metrics::names::SMTP_IN_COMMAND_COUNT),
    );
    drop(t);
    format!(
        "<!DOCTYPE html>
<html><head><meta charset=\"utf-8\"><title>tambo @ {host}</title>
<meta name=\"viewport\" content=\"width=device-width\">
<style>
body {{ font: 15px/1.5 system-ui, sans-serif; max-width: 46em; margin: 2em auto; padding: 0 1em; color: #222; }}
h1 {{ font-size: 1.6em; margin-bottom: 0.2em; }}
h2 {{ font-size: 1.15em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }}
table {{ border-collapse: collapse; }}
td, th {{ padding: 0.15em 1.2em 0.15em 0; text-align: left; }}
th {{ font-weight: 600; color: #555; }}
.muted {{ color: #666; }}
a {{ color: #0645ad; }}
dt {{ font-family: ui-monospace, monospace; }}
dd {{ margin: 0 0 0.5em 1.5em; color: #444; }}
</style></head>
<body>
<h1>tambo @ {host}</h1>
<p class=\"muted\">OS hostname {os} · version {version}, built {built}<br>
monitord started {started}, up {uptime}</p>
<h2>At a glance</h2>
<table>
{glance}
</table>
<h2>Processes</h2>
<table>
<tr><th>role</th><th>pid</th><th>version</th></tr>
{procs}</table>
<h2>Pages</h2>
<dl>
<dt><a href=\"/debug/vars\">/debug/vars</a></dt><dd>every counter, summed over the processes (expvar JSON)</dd>
<dt><a href=\"/metrics\">/metrics</a></dt><dd>the same, in OpenMetrics format, for Prometheus</dd>
<dt><a href=\"/debug/traces\">/debug/traces</a></dt><dd>SMTP sessions, queue puts, deliveries, checks and reloads: the recent ones by latency, the failed, and what runs now</dd>
<dt><a href=\"/debug/queue\">/debug/queue</a></dt><dd>the queue, as queued last sent it</dd>
<dt><a href=\"/debug/pprof/\">/debug/pprof/</a></dt><dd>CPU and heap profiles of each process, for <code>go tool pprof</code></dd>
<dt><a href=\"/debug/tasks\">/debug/tasks</a></dt><dd>each process's runtime: tokio workers and tasks, CPU time, memory</dd>
<dt><a href=\"/debug/config\">/debug/config</a></dt><dd>the effective configuration of each process</dd>
<dt><a href=\"/debug/flags\">/debug/flags</a></dt><dd>command-line flags of each process</dd>
</dl>
</body></html>
",
        host = html(&site.hostname),
        os = html(&tambo_common::config::os_hostname()),
        version = tambo_common::build::VERSION,
        built = tambo_common::build::date_str(),
        started = site.started.format("%Y-%m-%d %H:%M:%S %z"),
        uptime = tambo_common::duration::format(std::time::Duration::from_secs(uptime.as_secs())),
    )
}

/// Each connected process's explicitly set flags, `-name=value` per line.
/// Names and values are the peer's text: escaped, so each flag stays on
/// its one line.
fn flags(t: &Totals) -> String {
    let mut out = String::new();
    for p in t.processes.iter().filter(|p| p.connected) {
        out.push_str(&format!("# {} (pid {})\n", p.role.name(), p.pid));
        for (k, v) in &p.flags {
            out.push_str(&format!("-{}={}\n", escape(k), escape(v)));
        }
        out.push('\n');
    }
    out
}

/// Each connected process's effective config. The text is the peer's:
/// every line of it is indented and escaped, so no process can write a
/// heading that looks like another's.
fn config(t: &Totals) -> String {
    let mut out = String::new();
    for p in t.processes.iter().filter(|p| p.connected) {
        out.push_str(&format!("# {} (pid {})\n", p.role.name(), p.pid));
        for line in p.config.lines() {
            out.push_str("  ");
            out.push_str(&escape(line));
            out.push('\n');
        }
        out.push('\n');
    }
    out
}

/// Each connected process's runtime, as it last said (every 5 s);
/// indented and escaped like the configs.
fn tasks(t: &Totals) -> String {
    let mut out = format!(
        "# monitord (pid {})\n{}\n",
        std::process::id(),
        indent(&tambo_proto::metrics::runtime_state())
    );
    for p in t.processes.iter().filter(|p| p.connected) {
        out.push_str(&format!("# {} (pid {})\n", p.role.name(), p.pid));
        out.push_str(&indent(&p.state));
        out.push('\n');
    }
    out
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("  {}\n", escape(l))).collect()
}

/// Multi-line text from a peer: its lines, each escaped.
fn text_lines(text: &str) -> String {
    text.lines().map(|l| escape(l) + "\n").collect()
}

fn html(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;
    use tambo_proto::Role;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn flags_cannot_forge_lines() {
        let mut t = Totals::new();
        t.register(
            Role::Smtpd,
            7,
            "v".into(),
            vec![
                (
                    "config_dir".into(),
                    "/etc/tambo\n-forged=1\n# ctl (pid 1)".into(),
                ),
                (
                    "evil\r\nname".into(),
                    "tab\there\x1b[2J\u{2028}back\\n".into(),
                ),
            ],
            "hostname = \"x\"\n# queued (pid 1)\nforged = \"\x1b[2J\"".into(),
        );
        let out = flags(&t);
        assert_eq!(
            out,
            "# smtpd (pid 7)\n\
             -config_dir=/etc/tambo\\n-forged=1\\n# ctl (pid 1)\n\
             -evil\\r\\nname=tab\\there\\x1b[2J\\u{2028}back\\\\n\n\n"
        );
        assert_eq!(out.lines().filter(|l| l.starts_with('-')).count(), 2);
        assert_eq!(out.lines().filter(|l| l.starts_with('#')).count(), 1);
        // The config: one heading per process, every line of the peer's
        // text indented and escaped.
        let out = config(&t);
        assert_eq!(
            out,
            "# smtpd (pid 7)\n  hostname = \"x\"\n  # queued (pid 1)\n  forged = \"\\x1b[2J\"\n\n"
        );
        assert_eq!(out.lines().filter(|l| l.starts_with('#')).count(), 1);
    }

    #[tokio::test]
    async fn a_write_the_client_does_not_read_fails_after_the_limit() {
        let (ours, mut theirs) = tokio::io::duplex(64);
        let mut w = WriteDeadline::new(ours, Duration::from_millis(200));
        let start = std::time::Instant::now();
        let err = w.write_all(&[0; 4096]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(start.elapsed() >= Duration::from_millis(200));
        // Reads go straight through.
        theirs.write_all(b"GET").await.unwrap();
        let mut b = [0u8; 3];
        w.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"GET");
    }

    #[tokio::test]
    async fn a_slow_reader_is_not_cut_off() {
        // Each bit of progress restarts the clock.
        let (ours, mut theirs) = tokio::io::duplex(64);
        let mut w = WriteDeadline::new(ours, Duration::from_millis(500));
        let reader = tokio::spawn(async move {
            let mut got = 0;
            let mut b = [0u8; 64];
            loop {
                tokio::time::sleep(Duration::from_millis(20)).await;
                match theirs.read(&mut b).await {
                    Ok(0) | Err(_) => return got,
                    Ok(n) => got += n,
                }
            }
        });
        w.write_all(&[1; 1024]).await.unwrap();
        w.shutdown().await.unwrap();
        drop(w);
        assert_eq!(reader.await.unwrap(), 1024);
    }
}
