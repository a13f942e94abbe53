//! The hook link: a second deliver.sock connection on which queued asks
//! deliverd to run hooks, apart from deliveries so a client waiting at
//! RCPT or after DATA never queues behind them.
//!
//! After the hello, deliverd says `HookReady` with its slots; queued then
//! sends `Hook` calls, never more than the slots at once, a post-data
//! call with a read-only descriptor of the message. Every call runs in its
//! own task and is answered with `HookDone` as soon as it ends, in any
//! order; `Heartbeat`s fill the silences. A call that breaks the protocol
//! (no descriptor with post-data, one with another call, a frame over its
//! limit, a delivery job, more calls than slots) ends the connection, and
//! the hooks still running with it: queued treats them as failed.
//!
//! Descriptors are paired with post-data calls in order. A descriptor
//! sent with another call cannot always be told from the next post-data's,
//! which the same read may bring along (the kernel hands over a
//! descriptor with the first byte of its frame, and one read can end in
//! the middle of the next frame), so only one that arrives with no
//! post-data call left to claim it is caught, at the end of the
//! connection.

use std::sync::Arc;

use tokio::io::BufWriter;
use tokio::net::UnixStream;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;

use tambo_proto::Error;
use tambo_proto::deliver::{
    FromDeliverd, HookOutcome, IDLE_TIMEOUT, MAX_HOOK_CALL_FRAME, ToDeliverd,
};
use tambo_proto::fd::FdReader;
use tambo_proto::frame::write_frame;

use crate::calls::{self, Call, Ctx};

/// Hook calls run at once. Each holds at most a capped header section
/// (DKIM), a hook's capped output and a hook process; queued, which knows
/// the number, keeps the rest waiting.
pub const SLOTS: u32 = 32;

/// Serves one hook connection until it closes or breaks the protocol.
pub async fn serve(
    ctx: Arc<Ctx>,
    stream: UnixStream,
    idle: Option<std::time::Duration>,
) -> Result<(), Error> {
    let (r, w) = stream.into_split();
    let mut writer = BufWriter::new(w);
    write_frame(&mut writer, &FromDeliverd::HookReady { slots: SLOTS }).await?;
    let (tx, mut rx) = mpsc::unbounded_channel::<(u64, HookOutcome)>();
    let heartbeat = tambo_proto::keepalive_every(idle.unwrap_or(IDLE_TIMEOUT));
    let results = tokio::spawn(async move {
        loop {
            let msg = match tokio::time::timeout(heartbeat, rx.recv()).await {
                Ok(Some((call, outcome))) => FromDeliverd::HookDone { call, outcome },
                Ok(None) => break,
                Err(_) => FromDeliverd::Heartbeat,
            };
            write_frame(&mut writer, &msg).await?;
        }
        Ok::<(), Error>(())
    });
    let slots = Arc::new(Semaphore::new(SLOTS as usize));
    let mut reader = FdReader::new(r);
    let mut running = JoinSet::new();
    let result = loop {
        let msg = match reader.read_frame::<ToDeliverd>(MAX_HOOK_CALL_FRAME).await {
            Ok(Some(m)) => m,
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        };
        let ToDeliverd::Hook(hc) = msg else {
            break Err(Error::Unexpected("a delivery job on the hook connection"));
        };
        let fd = match &hc.hook {
            tambo_proto::deliver::Hook::PostData(_) => reader.take_fd(),
            _ => None,
        };
        let call = match Call::new(hc.hook, fd) {
            Ok(c) => c,
            Err(why) => break Err(Error::Unexpected(why)),
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            break Err(Error::Unexpected("more hook calls than slots"));
        };
        let (ctx, tx, id) = (ctx.clone(), tx.clone(), hc.call);
        running.spawn(async move {
            // A call that panics still gets an answer (a temporary
            // failure), so queued's slot comes back. The inner task dies
            // with this one, and its hook's process group with it.
            let failure = call.failure();
            let inner = tokio::spawn(async move { calls::run(&ctx, call).await });
            let _abort = AbortOnDrop(inner.abort_handle());
            let outcome = match inner.await {
                Ok(o) => o,
                Err(e) => {
                    tracing::error!("a hook call failed inside deliverd: {e}");
                    failure
                }
            };
            // Freed before the answer goes out: queued may send the next
            // call as soon as it reads it.
            drop(permit);
            let _ = tx.send((id, outcome));
        });
        // Reap finished tasks so the set does not grow.
        while running.try_join_next().is_some() {}
    };
    let result = match (result, reader.take_fd()) {
        (Ok(()), Some(_)) => Err(Error::Unexpected("a descriptor no post-data call claimed")),
        (r, _) => r,
    };
    // Dropping a task kills its hook's process group.
    running.abort_all();
    results.abort();
    result
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Seek, Write};
    use std::os::fd::AsFd;
    use std::os::unix::fs::PermissionsExt;
    use std::time::Duration;

    use tambo_proto::deliver::{
        Hook, HookCall, HookEnv, HookVerdict, Job, MAX_HOOK_RESULT_FRAME, PostData, Target,
    };
    use tambo_proto::frame::{encode, read_frame_max};
    use tokio::io::AsyncWriteExt;

    use super::*;
    use crate::hooks::Hooks;

    /// deliverd's side of a hook connection, with hooks from `dir`.
    fn start(dir: &std::path::Path) -> (UnixStream, tokio::task::JoinHandle<Result<(), Error>>) {
        let mut cfg = tambo_common::config::Config::defaults(dir);
        cfg.testing.hook_timeout = Some(Duration::from_secs(20));
        cfg.testing.dns_server = Some("127.0.0.1:9".parse().unwrap());
        let ctx = Arc::new(Ctx {
            hooks: Hooks::new(&cfg),
            auth: Arc::new(mail_auth::MessageAuthenticator(
                tambo_common::dns::resolver(&cfg).unwrap(),
            )),
        });
        let (queued, deliverd) = UnixStream::pair().unwrap();
        let task = tokio::spawn(serve(ctx, deliverd, None));
        (queued, task)
    }

    /// The next frame from deliverd that is not a heartbeat; `None` once
    /// it closed the connection.
    async fn recv(s: &mut UnixStream) -> Option<FromDeliverd> {
        loop {
            match read_frame_max(s, MAX_HOOK_RESULT_FRAME).await {
                Ok(Some(FromDeliverd::Heartbeat)) => continue,
                Ok(other) => return other,
                Err(_) => return None,
            }
        }
    }

    fn env() -> HookEnv {
        HookEnv {
            remote_addr: "192.0.2.1:25".into(),
            ehlo: "client.example".into(),
            mail_from: "ann@example.net".into(),
            rcpt_to: vec!["bob@example.org".into()],
            auth_as: String::new(),
            on_tls: false,
            from_local_domain: false,
            spf: None,
        }
    }

    fn post_data(call: u64) -> Vec<u8> {
        encode(&ToDeliverd::Hook(HookCall {
            call,
            hook: Hook::PostData(PostData {
                queue_id: "q1".into(),
                env: env(),
                run_hook: true,
                auth_results: Some(tambo_proto::deliver::AuthResultsRequest {
                    authserv_id: "mx.example.org".into(),
                    spf: None,
                }),
            }),
        }))
        .unwrap()
    }

    fn message() -> std::fs::File {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(b"Subject: t\r\n\r\nbody\r\n").unwrap();
        f.rewind().unwrap();
        f
    }

    fn install(dir: &std::path::Path, name: &str, body: &str) {
        let src = dir.join(format!(".{name}"));
        std::fs::write(&src, format!("#!/bin/sh\n{body}\n")).unwrap();
        let dst = dir.join("hooks").join(name);
        // cp writes it: never open for writing here (ETXTBSY on exec).
        assert!(
            std::process::Command::new("cp")
                .arg(&src)
                .arg(&dst)
                .status()
                .unwrap()
                .success()
        );
        std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[tokio::test]
    async fn calls_are_answered_as_they_end() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("hooks")).unwrap();
        // Held until the test has both other answers: the order is the
        // test's doing, not a race of timings.
        install(
            dir.path(),
            "alias-exists",
            "while [ ! -e release ]; do sleep 0.05; done; exit 0",
        );
        install(
            dir.path(),
            "post-data",
            "cat >/dev/null; echo 'X-Seen: yes'",
        );
        let (mut q, task) = start(dir.path());
        assert_eq!(
            recv(&mut q).await,
            Some(FromDeliverd::HookReady { slots: SLOTS })
        );

        let slow = ToDeliverd::Hook(HookCall {
            call: 1,
            hook: Hook::AliasExists {
                address: "a@example.org".into(),
            },
        });
        write_frame(&mut q, &slow).await.unwrap();
        let m = message();
        tambo_proto::fd::send_with_fd(&q, &post_data(2), m.as_fd())
            .await
            .unwrap();
        let rcpt = ToDeliverd::Hook(HookCall {
            call: 3,
            hook: Hook::Rcpt(env()),
        });
        write_frame(&mut q, &rcpt).await.unwrap();

        let mut got = Vec::new();
        for i in 0..3 {
            if i == 2 {
                // The two later calls were answered while the first runs.
                std::fs::write(dir.path().join("release"), "").unwrap();
            }
            let Some(FromDeliverd::HookDone { call, outcome }) = recv(&mut q).await else {
                panic!("no answer");
            };
            got.push((call, outcome));
        }
        assert_eq!(got[2].0, 1, "the slow call is answered last: {got:?}");
        assert_eq!(got[2].1, HookOutcome::Exists(true));
        let post = got.iter().find(|(c, _)| *c == 2).unwrap();
        assert_eq!(
            post.1,
            HookOutcome::PostData {
                headers: "X-Seen: yes\r\n".into(),
                auth_results: "Authentication-Results: mx.example.org;\r\n\tdkim=none\r\n".into(),
                verdict: HookVerdict::Accept,
            }
        );
        let rcpt = got.iter().find(|(c, _)| *c == 3).unwrap();
        assert_eq!(
            rcpt.1,
            HookOutcome::Rcpt(HookVerdict::Accept),
            "no hooks/rcpt"
        );

        drop(q);
        assert!(task.await.unwrap().is_ok());
    }

    async fn broken_by(send: impl AsyncFnOnce(&mut UnixStream)) -> Error {
        let dir = tempfile::tempdir().unwrap();
        broken_by_in(dir.path(), send).await
    }

    /// Sends what `send` sends, and returns the error deliverd closed the
    /// connection with.
    async fn broken_by_in(dir: &std::path::Path, send: impl AsyncFnOnce(&mut UnixStream)) -> Error {
        let (mut q, task) = start(dir);
        assert!(matches!(
            recv(&mut q).await,
            Some(FromDeliverd::HookReady { .. })
        ));
        send(&mut q).await;
        let err = tokio::time::timeout(Duration::from_secs(20), task)
            .await
            .unwrap()
            .unwrap()
            .unwrap_err();
        // The connection is closed: queued reads its end.
        assert!(recv(&mut q).await.is_none());
        err
    }

    #[tokio::test]
    async fn protocol_errors_close_the_connection() {
        let err = broken_by(async |q| {
            q.write_all(&post_data(1)).await.unwrap();
        })
        .await;
        assert!(matches!(err, Error::Unexpected(w) if w.contains("without its message")));

        let err = broken_by(async |q| {
            let job = ToDeliverd::Job(Job {
                job: 1,
                queue_id: "q".into(),
                from: String::new(),
                to: vec!["a@b".into()],
                target: Target::Local,
                security: None,
                maybe_delivered: false,
                positions: Vec::new(),
            });
            tambo_proto::fd::send_with_fd(q, &encode(&job).unwrap(), message().as_fd())
                .await
                .unwrap();
        })
        .await;
        assert!(matches!(err, Error::Unexpected(w) if w.contains("delivery job")));

        let err = broken_by(async |q| {
            let huge = ToDeliverd::Hook(HookCall {
                call: 1,
                hook: Hook::AliasResolve {
                    address: "x".repeat(MAX_HOOK_CALL_FRAME),
                },
            });
            let _ = write_frame(q, &huge).await;
        })
        .await;
        assert!(matches!(err, Error::FrameTooLarge { .. }), "{err}");

        let err = broken_by(async |q| {
            // A descriptor with an alias call, and no post-data to claim it.
            let call = ToDeliverd::Hook(HookCall {
                call: 1,
                hook: Hook::AliasExists {
                    address: "a@b".into(),
                },
            });
            tambo_proto::fd::send_with_fd(q, &encode(&call).unwrap(), message().as_fd())
                .await
                .unwrap();
            let _ = recv(q).await;
            q.shutdown().await.unwrap();
        })
        .await;
        assert!(matches!(err, Error::Unexpected(w) if w.contains("no post-data call claimed")));
    }

    #[tokio::test]
    async fn more_calls_than_slots_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("hooks")).unwrap();
        install(dir.path(), "alias-exists", "sleep 30");
        let err = broken_by_in(dir.path(), async |q| {
            for call in 0..=u64::from(SLOTS) {
                let c = ToDeliverd::Hook(HookCall {
                    call,
                    hook: Hook::AliasExists {
                        address: "a@b".into(),
                    },
                });
                write_frame(q, &c).await.unwrap();
            }
        })
        .await;
        assert!(matches!(err, Error::Unexpected(w) if w.contains("more hook calls than slots")));
    }
}
