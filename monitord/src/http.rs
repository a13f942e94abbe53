//! The monitoring HTTP server (only when `monitoring_address` is set;
//! never to be exposed publicly). Read-only: nothing here can change mail
//! flow.

use std::convert::Infallible;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::collector::{Shared, lock};
use crate::{expvar, openmetrics};

pub struct Site {
    pub totals: Shared,
    pub hostname: String,
    pub cmdline: Vec<String>,
    pub started: chrono::DateTime<chrono::Local>,
}

pub async fn run(listener: TcpListener, site: Arc<Site>) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("monitoring accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let site = site.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let site = site.clone();
                async move { Ok::<_, Infallible>(route(&site, &req)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(30))
                .serve_connection(TokioIo::new(stream), svc);
            if let Err(e) = conn.await {
                tracing::debug!("monitoring connection: {e}");
            }
        });
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
        "/debug/flags" => reply(StatusCode::OK, "text/plain; charset=utf-8", flags(site)),
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
    let procs: String = lock(&site.totals)
        .processes
        .iter()
        .filter(|p| p.connected)
        .map(|p| {
            format!(
                "<li>{} (pid {}, version {})</li>\n",
                p.role.name(),
                p.pid,
                html(&p.version)
            )
        })
        .collect();
    format!(
        "<!DOCTYPE html>
<html><head><meta charset=\"utf-8\"><title>tambo @ {host}</title></head>
<body>
<h1>tambo @ {host}</h1>
<p>OS hostname: {os}<br>
version {version}, built {built}<br>
started {started}, up {uptime}</p>
<h2>Processes</h2>
<ul>
{procs}</ul>
<h2>Monitoring</h2>
<ul>
<li><a href=\"/debug/vars\">/debug/vars</a>: exported variables (expvar JSON)</li>
<li><a href=\"/metrics\">/metrics</a>: the same, in OpenMetrics format</li>
<li><a href=\"/debug/flags\">/debug/flags</a>: command-line flags of each process</li>
</ul>
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
fn flags(site: &Site) -> String {
    let mut out = String::new();
    for p in lock(&site.totals).processes.iter().filter(|p| p.connected) {
        out.push_str(&format!("# {} (pid {})\n", p.role.name(), p.pid));
        for (k, v) in &p.flags {
            out.push_str(&format!("-{k}={v}\n"));
        }
        out.push('\n');
    }
    out
}

fn html(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
