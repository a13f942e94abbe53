//! Running one hook: no shell, the environment [`super::env`] built, the
//! config directory as working directory, its own process group killed
//! whole at the timeout (through [`crate::supervise`], as the MDA), stdout
//! kept up to [`MAX_HOOK_OUTPUT`], stderr logged.

use std::fs::File;
use std::io;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tokio::process::Command;

use tambo_common::duration;
use tambo_proto::deliver::MAX_HOOK_OUTPUT;

use super::env::Var;
use super::output::one_line;
use super::stdin::{FeedError, feed};
use crate::supervise::{self, Captured, Limits, Waited};

/// Most of a hook's stderr that reaches deliverd's log.
const MAX_STDERR_LOGGED: usize = 1024;

/// What a hook gets on stdin.
pub enum Input<'a> {
    /// Nothing (/dev/null).
    Nothing,
    /// `prefix`, then the message with LF line ends.
    Message { prefix: &'a [u8], file: Arc<File> },
}

/// One hook to run.
pub struct Spec<'a> {
    /// The hook's name, for logs and texts.
    pub name: &'static str,
    pub path: &'a Path,
    /// The working directory: the config directory.
    pub dir: &'a Path,
    pub arg: Option<&'a str>,
    pub env: Vec<Var>,
    pub input: Input<'a>,
    pub timeout: Duration,
}

/// How a run ended.
#[derive(Debug)]
pub enum Ran {
    /// No such file: the hook is not configured.
    Missing,
    /// The exit code (`None`: killed by a signal) and stdout.
    Exited { code: Option<i32>, stdout: Captured },
    /// Killed at its timeout (or could not be stopped after it), and
    /// what stdout said until then.
    TimedOut { stdout: Captured },
    /// It could not run, or not to its end (the text says why; it goes to
    /// logs and to queued, never to a client).
    Failed(String),
}

/// Runs the hook in `spec` if its file exists.
pub async fn run(spec: Spec<'_>) -> Ran {
    let Spec {
        name,
        path,
        dir,
        arg,
        env,
        input,
        timeout,
    } = spec;
    match tokio::fs::metadata(path).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ran::Missing,
        // Present but not statable (permissions): let the spawn say why.
        Err(_) => {}
    }
    let mut cmd = Command::new(path);
    if let Some(a) = arg {
        if a.contains('\0') {
            return Ran::Failed(format!("hooks/{name}: its argument holds a NUL byte"));
        }
        cmd.arg(a);
    }
    cmd.env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir(dir)
        .stdin(match input {
            Input::Nothing => Stdio::null(),
            Input::Message { .. } => Stdio::piped(),
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let (mut child, mut group) = match supervise::spawn(&mut cmd) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!("cannot run hooks/{name}: {e}");
            return Ran::Failed(format!("cannot run hooks/{name}: {e}"));
        }
    };
    let stdin = child.stdin.take();
    let mut unreadable: Option<io::Error> = None;
    let feeding = async {
        if let (Some(stdin), Input::Message { prefix, file }) = (stdin, input) {
            match feed(stdin, prefix, file).await {
                Ok(()) | Err(FeedError::Closed) => {}
                Err(FeedError::Read(e)) => unreadable = Some(e),
            }
        }
    };
    let limits = Limits {
        stdout: MAX_HOOK_OUTPUT,
        stderr: MAX_STDERR_LOGGED,
    };
    let waited = supervise::wait(&mut child, &mut group, timeout, limits, feeding).await;
    drop(group);
    let ran = match waited {
        Waited::Exited(status, stdout, stderr) => {
            log_stderr(name, &stderr);
            Ran::Exited {
                code: status.code(),
                stdout,
            }
        }
        Waited::TimedOut(stdout) => {
            tracing::info!(
                "hooks/{name} timed out after {}; killed",
                duration::format(timeout)
            );
            Ran::TimedOut { stdout }
        }
        Waited::Unstoppable => Ran::TimedOut {
            stdout: Captured::default(),
        },
        Waited::Failed(e) => Ran::Failed(format!("waiting for hooks/{name}: {e}")),
    };
    match unreadable {
        // The hook judged part of the message: its verdict counts for
        // nothing.
        Some(e) => {
            tracing::warn!("hooks/{name}: cannot read the message: {e}");
            Ran::Failed(format!("hooks/{name}: cannot read the message: {e}"))
        }
        None => ran,
    }
}

fn log_stderr(name: &str, stderr: &Captured) {
    if stderr.head.is_empty() {
        return;
    }
    let text = one_line(&String::from_utf8_lossy(&stderr.head), MAX_STDERR_LOGGED);
    let more = if stderr.overflow { " […]" } else { "" };
    tracing::info!("hooks/{name} stderr: {text:?}{more}");
}
