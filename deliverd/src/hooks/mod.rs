//! The hooks (REFERENCE §6), which deliverd runs on queued's behalf:
//! `hooks/post-data`, `hooks/alias-resolve`, `hooks/alias-exists`, and
//! tambo's own `hooks/rcpt`. Each runs only if its file exists.
//!
//! - [`run`]: running one, with its timeout and its process group.
//! - [`env`]: the environment, built from typed fields only.
//! - [`output`]: what its stdout means (headers, the refusal line).
//! - [`stdin`]: post-data's input, CRLF turned into LF on the way.
//!
//! Every function here returns what came of the run with the counter
//! label it belongs to; the caller counts, so tests need no global state.

mod env;
mod output;
mod run;
mod stdin;
#[cfg(test)]
mod tests;

use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tambo_common::config::Config;
use tambo_common::duration;
use tambo_proto::deliver::{
    ALIAS_HOOK_TIMEOUT, HookEnv, HookVerdict, POST_DATA_TIMEOUT, RCPT_HOOK_TIMEOUT,
};

pub use output::one_line;
pub use stdin::to_lf;

use run::{Input, Ran, Spec};

/// The exit status that makes a refusal permanent.
const EXIT_PERMANENT: i32 = 20;

/// Where the hooks are and how long each may run.
#[derive(Debug, Clone)]
pub struct Hooks {
    /// The config directory (absolute): the hooks' working directory.
    config_dir: PathBuf,
    /// `[testing] hook_timeout`, which replaces every timeout.
    timeout: Option<Duration>,
}

/// What came of post-data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PostDataRun {
    /// No `hooks/post-data`: accepted.
    Skipped,
    /// Exit 0 with a valid header block (possibly empty), CRLF line ends.
    Accepted {
        headers: String,
    },
    /// Exit 0, but the output is not a header block (or too long): it is
    /// ignored and the message accepted.
    BadOutput,
    Rejected {
        permanent: bool,
        text: String,
    },
}

impl PostDataRun {
    /// Its label in `chasquid/smtpIn/hookResults`.
    pub fn label(&self) -> &'static str {
        match self {
            PostDataRun::Skipped => "post-data:skip",
            PostDataRun::Accepted { .. } => "post-data:success",
            PostDataRun::BadOutput => "post-data:badoutput",
            PostDataRun::Rejected { .. } => "post-data:fail",
        }
    }

    /// The headers to prepend and the verdict.
    pub fn into_parts(self) -> (String, HookVerdict) {
        match self {
            PostDataRun::Accepted { headers } => (headers, HookVerdict::Accept),
            PostDataRun::Skipped | PostDataRun::BadOutput => (String::new(), HookVerdict::Accept),
            PostDataRun::Rejected { permanent, text } => {
                (String::new(), HookVerdict::Reject { permanent, text })
            }
        }
    }
}

/// What came of the rcpt hook: its verdict and its label in
/// `tambo/smtpIn/rcptHookResults` (`skip`, `success`, `fail`: a tambo
/// hook, so not among chasquid's labels).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RcptRun {
    pub verdict: HookVerdict,
    pub label: &'static str,
}

/// What came of alias-resolve: the aliases right-hand side it printed (or
/// why there is none), and its label in `chasquid/aliases/hookResults`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolveRun {
    pub result: Result<String, String>,
    pub label: &'static str,
}

/// What came of alias-exists, and its label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExistsRun {
    pub exists: bool,
    pub label: &'static str,
}

impl Hooks {
    pub fn new(cfg: &Config) -> Self {
        // Absolute, so the path to run does not depend on the working
        // directory the hook is given.
        let config_dir = std::path::absolute(&cfg.config_dir).unwrap_or(cfg.config_dir.clone());
        Hooks {
            config_dir,
            timeout: cfg.testing.hook_timeout,
        }
    }

    fn spec<'a>(
        &'a self,
        name: &'static str,
        path: &'a std::path::Path,
        default: Duration,
    ) -> Spec<'a> {
        Spec {
            name,
            path,
            dir: &self.config_dir,
            arg: None,
            env: Vec::new(),
            input: Input::Nothing,
            timeout: self.timeout.unwrap_or(default),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.config_dir.join("hooks").join(name)
    }

    /// `hooks/post-data` on the message, `auth_results` (LF line ends)
    /// on top.
    pub async fn post_data(
        &self,
        env: &HookEnv,
        auth_results: &[u8],
        message: Arc<File>,
    ) -> PostDataRun {
        let path = self.path("post-data");
        let mut spec = self.spec("post-data", &path, POST_DATA_TIMEOUT);
        spec.env = env::post_data(env);
        spec.input = Input::Message {
            prefix: auth_results,
            file: message,
        };
        match run::run(spec).await {
            Ran::Missing => PostDataRun::Skipped,
            Ran::Exited {
                code: Some(0),
                stdout,
            } => match (stdout.overflow, output::header_block(&stdout.head)) {
                (false, Some(headers)) => PostDataRun::Accepted { headers },
                _ => {
                    tracing::info!("hooks/post-data: its output is not a header block; ignored");
                    PostDataRun::BadOutput
                }
            },
            Ran::Exited { code, stdout } => PostDataRun::Rejected {
                permanent: code == Some(EXIT_PERMANENT),
                text: output::last_line(&stdout),
            },
            // As chasquid: the last line it printed before it was killed.
            Ran::TimedOut { stdout } => PostDataRun::Rejected {
                permanent: false,
                text: output::last_line(&stdout),
            },
            Ran::Failed(_) => PostDataRun::Rejected {
                permanent: false,
                text: String::new(),
            },
        }
    }

    /// `hooks/rcpt` for the one recipient in `env.rcpt_to`.
    pub async fn rcpt(&self, env: &HookEnv) -> RcptRun {
        let path = self.path("rcpt");
        let mut spec = self.spec("rcpt", &path, RCPT_HOOK_TIMEOUT);
        spec.env = env::rcpt(env);
        let reject = |permanent, text| RcptRun {
            verdict: HookVerdict::Reject { permanent, text },
            label: "fail",
        };
        match run::run(spec).await {
            Ran::Missing => RcptRun {
                verdict: HookVerdict::Accept,
                label: "skip",
            },
            Ran::Exited { code: Some(0), .. } => RcptRun {
                verdict: HookVerdict::Accept,
                label: "success",
            },
            Ran::Exited { code, stdout } => {
                reject(code == Some(EXIT_PERMANENT), output::last_line(&stdout))
            }
            Ran::TimedOut { stdout } => reject(false, output::last_line(&stdout)),
            Ran::Failed(_) => reject(false, String::new()),
        }
    }

    /// `hooks/alias-resolve <address>`: its output on exit 0, else why
    /// not. Output over [`tambo_proto::deliver::MAX_HOOK_OUTPUT`] or not
    /// UTF-8 is an error.
    pub async fn alias_resolve(&self, address: &str) -> ResolveRun {
        let path = self.path("alias-resolve");
        let mut spec = self.spec("alias-resolve", &path, ALIAS_HOOK_TIMEOUT);
        spec.arg = Some(address);
        spec.env = env::alias();
        let timeout = spec.timeout;
        let fail = |why: String| ResolveRun {
            result: Err(why),
            label: "resolve:fail",
        };
        match run::run(spec).await {
            Ran::Missing => ResolveRun {
                result: Ok(String::new()),
                label: "resolve:skip",
            },
            Ran::Exited {
                code: Some(0),
                stdout,
            } => {
                if stdout.overflow {
                    return fail(format!(
                        "hooks/alias-resolve printed more than {} bytes",
                        tambo_proto::deliver::MAX_HOOK_OUTPUT
                    ));
                }
                match String::from_utf8(stdout.head) {
                    Ok(text) => ResolveRun {
                        result: Ok(text),
                        label: "resolve:success",
                    },
                    Err(_) => fail("hooks/alias-resolve printed something not UTF-8".into()),
                }
            }
            Ran::Exited { code, .. } => fail(match code {
                Some(c) => format!("hooks/alias-resolve exited with {c}"),
                None => "hooks/alias-resolve was killed by a signal".into(),
            }),
            Ran::TimedOut { .. } => fail(format!(
                "hooks/alias-resolve timed out after {}",
                duration::format(timeout)
            )),
            Ran::Failed(why) => fail(why),
        }
    }

    /// `hooks/alias-exists <address>`: exit 0 is yes; anything else,
    /// a timeout included, no.
    pub async fn alias_exists(&self, address: &str) -> ExistsRun {
        let path = self.path("alias-exists");
        let mut spec = self.spec("alias-exists", &path, ALIAS_HOOK_TIMEOUT);
        spec.arg = Some(address);
        spec.env = env::alias();
        match run::run(spec).await {
            Ran::Missing => ExistsRun {
                exists: false,
                label: "exists:skip",
            },
            Ran::Exited { code: Some(0), .. } => ExistsRun {
                exists: true,
                label: "exists:true",
            },
            _ => ExistsRun {
                exists: false,
                label: "exists:false",
            },
        }
    }
}
