//! `/debug/pprof/`: each process's CPU and heap profiles, for `go tool
//! pprof`. monitord asks the process over its monitor.sock connection
//! ([`tambo_proto::monitor::ProfileRequest`]) and hands back what it
//! answers, unread: monitord cannot take a profile itself, nor read more
//! of a process than its profiles say (which code ran or holds memory, as
//! addresses in the executable files, never this run's addresses, nor
//! any data).

use std::fmt::Write;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Response, StatusCode};
use tokio::sync::{mpsc, oneshot};

use tambo_proto::monitor::{MAX_PROFILE_SECONDS, ProfileKind};

use crate::collector::{Totals, lock};
use crate::http::Site;
use crate::text::escape;

/// A profile, or why the process gave none.
pub type Answer = Result<Vec<u8>, String>;
/// Where the answer goes.
pub type Reply = oneshot::Sender<Answer>;
/// A profile asked of a process's connection.
pub type Ask = (ProfileKind, Reply);

/// Go's default length of a CPU profile.
const DEFAULT_SECONDS: u32 = 30;

/// Serves `/debug/pprof/…` (`path` is what follows it).
pub async fn serve(site: &Site, path: &str, query: &str) -> Response<Full<Bytes>> {
    let mut process = None;
    let mut seconds = None;
    for kv in query.split('&') {
        match kv.split_once('=') {
            Some(("process", v)) => process = Some(v.to_string()),
            Some(("seconds", v)) => seconds = Some(v.to_string()),
            _ => {}
        }
    }
    let kind = match path {
        "" => return html(StatusCode::OK, index(&lock(&site.totals))),
        "profile" => {
            let s = match seconds.as_deref().map(str::parse::<u32>) {
                None => DEFAULT_SECONDS,
                Some(Ok(s)) if (1..=MAX_PROFILE_SECONDS).contains(&s) => s,
                Some(_) => {
                    return text(
                        StatusCode::BAD_REQUEST,
                        format!("seconds must be a number from 1 to {MAX_PROFILE_SECONDS}\n"),
                    );
                }
            };
            ProfileKind::Cpu { seconds: s }
        }
        "heap" => ProfileKind::Heap,
        _ => return text(StatusCode::NOT_FOUND, "no such profile\n".into()),
    };
    let Some(process) = process else {
        return text(
            StatusCode::BAD_REQUEST,
            format!(
                "say which process: ?process=smtpd, queued, deliverd or a pid (see /debug/pprof/)\n{}",
                list(&lock(&site.totals))
            ),
        );
    };
    let (who, tx) = match find(&lock(&site.totals), &process) {
        Ok(found) => found,
        Err((status, why)) => return text(status, why),
    };
    let (reply, answer) = oneshot::channel();
    if let Err(e) = tx.try_send((kind, reply)) {
        let why = match e {
            mpsc::error::TrySendError::Full(_) => {
                "a profile of this process is being taken; try again when it is done\n"
            }
            mpsc::error::TrySendError::Closed(_) => "the process went away\n",
        };
        return text(StatusCode::SERVICE_UNAVAILABLE, why.into());
    }
    // The profile's own time, then symbolising, then the transfer.
    let limit = match kind {
        ProfileKind::Cpu { seconds } => Duration::from_secs(u64::from(seconds) + 60),
        ProfileKind::Heap => Duration::from_secs(60),
    };
    match tokio::time::timeout(limit, answer).await {
        Ok(Ok(Ok(profile))) => {
            let name = match kind {
                ProfileKind::Cpu { .. } => "profile",
                ProfileKind::Heap => "heap",
            };
            let mut r = Response::new(Full::new(Bytes::from(profile)));
            let headers = r.headers_mut();
            headers.insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("application/octet-stream"),
            );
            if let Ok(v) = format!("attachment; filename=\"{who}.{name}.pb\"").parse() {
                headers.insert(hyper::header::CONTENT_DISPOSITION, v);
            }
            r
        }
        Ok(Ok(Err(why))) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{who}: {}\n", escape(&why)),
        ),
        Ok(Err(_)) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{who} went away before it answered\n"),
        ),
        Err(_) => text(
            StatusCode::GATEWAY_TIMEOUT,
            format!("{who} did not answer within {}s\n", limit.as_secs()),
        ),
    }
}

/// The connected process named by a role (if it is the only one) or pid.
fn find(t: &Totals, which: &str) -> Result<(String, mpsc::Sender<Ask>), (StatusCode, String)> {
    let live = t
        .processes
        .iter()
        .filter(|p| p.connected)
        .filter_map(|p| p.profiler.as_ref().map(|tx| (p, tx)));
    let found: Vec<_> = match which.parse::<u32>() {
        Ok(pid) => live.filter(|(p, _)| p.pid == pid).collect(),
        Err(_) => live.filter(|(p, _)| p.role.name() == which).collect(),
    };
    match found.as_slice() {
        [(p, tx)] => Ok((format!("{}-{}", p.role.name(), p.pid), (*tx).clone())),
        [] => Err((
            StatusCode::NOT_FOUND,
            format!("no connected process {}\n{}", escape(which), list(t)),
        )),
        _ => Err((
            StatusCode::BAD_REQUEST,
            format!(
                "more than one {}: say which by pid\n{}",
                escape(which),
                list(t)
            ),
        )),
    }
}

/// The processes that can be profiled, one per line.
fn list(t: &Totals) -> String {
    let mut out = String::new();
    for p in t
        .processes
        .iter()
        .filter(|p| p.connected && p.profiler.is_some())
    {
        let _ = writeln!(out, "  {} pid {}", p.role.name(), p.pid);
    }
    out
}

fn index(t: &Totals) -> String {
    let mut out = String::from(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>tambo profiles</title>\n<style>body { font: 15px/1.5 system-ui, sans-serif; max-width: 60em; margin: 2em auto; padding: 0 1em; color: #222; } td, th { padding: 0.2em 0.9em 0.2em 0; text-align: left; } code { background: #f4f4f4; padding: 0 0.2em; } a { color: #0645ad; }</style></head><body>\n<h1>Profiles</h1>\n<p><a href=\"/\">index</a> · <a href=\"/debug/tasks\">tasks and threads</a></p>\n<p>In the pprof format: read them with <code>go tool pprof</code>, e.g. <code>go tool pprof -top 'http://HOST:PORT/debug/pprof/profile?process=smtpd&amp;seconds=30'</code>. A CPU profile samples the process's stacks 100 times a second of CPU for the seconds asked (30 unless <code>seconds</code> says, at most 60); the heap profile shows the memory still in use, estimated from one allocation in about 512 KiB.</p>\n<table>\n<tr><th>process</th><th>pid</th><th>CPU</th><th>heap</th></tr>\n",
    );
    let mut any = false;
    for p in t
        .processes
        .iter()
        .filter(|p| p.connected && p.profiler.is_some())
    {
        any = true;
        let _ = writeln!(
            out,
            "<tr><td>{role}</td><td>{pid}</td><td><a href=\"/debug/pprof/profile?process={pid}&amp;seconds=30\">profile, 30 s</a></td><td><a href=\"/debug/pprof/heap?process={pid}\">heap</a></td></tr>",
            role = p.role.name(),
            pid = p.pid
        );
    }
    out.push_str("</table>\n");
    if !any {
        out.push_str("<p>No process connected.</p>\n");
    }
    out.push_str("</body></html>\n");
    out
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    reply(status, "text/plain; charset=utf-8", body)
}

fn html(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    reply(status, "text/html; charset=utf-8", body)
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    r
}
