//! The admin commands that ask the running queued (REFERENCE §9):
//! `aliases-resolve`, `domaininfo-remove`, and tambo's `queue` (list,
//! flush, remove). One request over submit.sock as the admin role, which
//! queued accepts only from root (or, in development, the one user).

use std::path::Path;
use std::time::Duration;

use tambo_common::config::Config;
use tambo_common::sockets::IpcSocket;
use tambo_proto::frame::{read_frame_max, write_frame};
use tambo_proto::identity::Identities;
use tambo_proto::submit::{AdminRequest, SubmitReply, SubmitRequest};
use tambo_proto::{Role, hello};

/// Largest answer read (a queue listing of many items).
const MAX_ANSWER: usize = 64 << 20;

/// How long queued may take to answer (an alias-resolve hook included).
const TIMEOUT: Duration = Duration::from_secs(60);

/// Sends `req` to the queued that serves `config_dir`; its text answer.
pub fn ask(config_dir: &Path, req: AdminRequest) -> Result<String, String> {
    let cfg = Config::load(config_dir, None)
        .map_err(|e| e.to_string())?
        .resolve_paths();
    let ids = Identities::resolve(&cfg.role_users(), Role::Ctl)
        .map_err(|e| format!("{}: {e}", cfg.file_path().display()))?;
    let socket = IpcSocket::Submit.path(&cfg);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    let unreachable = |e: String| {
        format!(
            "cannot reach the running queued at {}: {e}",
            socket.display()
        )
    };
    let reply = rt.block_on(async {
        tokio::time::timeout(TIMEOUT, async {
            let mut s = hello::connect(&socket, Role::Ctl, Role::Queued, &ids)
                .await
                .map_err(|e| unreachable(e.to_string()))?;
            write_frame(&mut s, &SubmitRequest::Admin(req))
                .await
                .map_err(|e| unreachable(e.to_string()))?;
            read_frame_max::<_, SubmitReply>(&mut s, MAX_ANSWER)
                .await
                .map_err(|e| format!("queued's answer: {e}"))?
                .ok_or_else(|| "queued closed the connection without an answer".to_string())
        })
        .await
        .map_err(|_| format!("queued did not answer within {}s", TIMEOUT.as_secs()))?
    })?;
    match reply {
        SubmitReply::Admin(answer) => answer,
        other => Err(format!("unexpected answer from queued: {other:?}")),
    }
}
