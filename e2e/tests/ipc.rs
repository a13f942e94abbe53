//! A hostile client on queued's sockets: what a compromised smtpd or
//! deliverd could send. Each bad input closes only that connection, is
//! logged and counted, and queued keeps serving.

use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;

use tambo_e2e::*;
use tambo_proto::deliver::{FromDeliverd, Outcome};
use tambo_proto::frame::{encode, read_frame, write_frame};
use tambo_proto::hello::{self, Hello};
use tambo_proto::submit::{RcptVerdict, SubmitReply, SubmitRequest};
use tambo_proto::{PROTOCOL_VERSION, Role};

async fn call(s: &mut UnixStream, req: SubmitRequest) -> SubmitReply {
    write_frame(s, &req).await.unwrap();
    read_frame(s).await.unwrap().expect("a reply")
}

async fn mail(s: &mut UnixStream, from: &str) -> SubmitReply {
    let mail = SubmitRequest::Mail {
        from: from.into(),
        ehlo: "client.test".into(),
        server_name: "mx.example.test".into(),
        spf: None,
    };
    call(s, mail).await
}

async fn rcpt(s: &mut UnixStream, to: &str) -> SubmitReply {
    call(s, SubmitRequest::Rcpt { to: to.into() }).await
}

#[tokio::test(flavor = "current_thread")]
async fn hostile_submit_client() {
    let mut t = Tambo::default_setup();
    t.start("monitord");
    t.start("queued");
    let sock = t.run_dir.join("submit.sock");

    // Relay without authentication: refused by queued itself.
    let mut s = submit_session(&sock).await;
    assert_eq!(mail(&mut s, "spam@remote.example").await, SubmitReply::Ok);
    assert_eq!(
        rcpt(&mut s, "victim@elsewhere.example").await,
        SubmitReply::Rcpt(RcptVerdict::RelayDenied)
    );
    // No recipients accepted, so no DATA.
    assert!(matches!(
        call(&mut s, SubmitRequest::DataBegin).await,
        SubmitReply::BadSequence(_)
    ));
    // More than 100 recipients are refused even if smtpd forgot to count.
    for _ in 0..100 {
        assert_eq!(
            rcpt(&mut s, "ann@example.test").await,
            SubmitReply::Rcpt(RcptVerdict::Accepted)
        );
    }
    assert_eq!(
        rcpt(&mut s, "ann@example.test").await,
        SubmitReply::Rcpt(RcptVerdict::TooMany)
    );
    // Header injection through the envelope is refused here too.
    assert!(matches!(
        mail(&mut s, "a@b.example\r\nBcc: x@y.example").await,
        SubmitReply::BadSequence(_)
    ));
    assert!(matches!(
        rcpt(&mut s, "ann@example.test\r\nX: y").await,
        SubmitReply::BadSequence(_) | SubmitReply::Rcpt(RcptVerdict::Invalid(_))
    ));
    // A body chunk outside DATA: the connection is closed.
    write_frame(&mut s, &SubmitRequest::DataChunk(b"smuggled".to_vec()))
        .await
        .unwrap();
    assert!(closed_by_peer(&mut s).await);

    // Requests before Session are refused.
    let mut s = hello::connect(&sock, Role::Smtpd, Role::Queued, &ids())
        .await
        .unwrap();
    write_frame(
        &mut s,
        &SubmitRequest::Rcpt {
            to: "ann@example.test".into(),
        },
    )
    .await
    .unwrap();
    assert!(closed_by_peer(&mut s).await);

    // Raw garbage, a truncated frame, an oversize length, a wrong version
    // and a wrong role: each is closed.
    let mut bad_inputs: Vec<Vec<u8>> = vec![
        b"EHLO I am not bincode\r\n".to_vec(),
        vec![0xFF, 0xFF, 0xFF, 0xFF, 1, 2, 3],
        encode(&Hello {
            protocol_version: PROTOCOL_VERSION + 7,
            role: Role::Smtpd,
        })
        .unwrap(),
        encode(&Hello {
            protocol_version: PROTOCOL_VERSION,
            role: Role::Deliverd,
        })
        .unwrap(),
    ];
    let mut truncated = encode(&Hello {
        protocol_version: PROTOCOL_VERSION,
        role: Role::Smtpd,
    })
    .unwrap();
    truncated.truncate(truncated.len() - 1);
    bad_inputs.push(truncated);
    for bytes in &bad_inputs {
        let mut s = UnixStream::connect(&sock).await.unwrap();
        s.write_all(bytes).await.unwrap();
        // The truncated frame needs the writer to finish.
        s.shutdown().await.unwrap();
        assert!(
            closed_by_peer(&mut s).await,
            "{bytes:?} did not close the connection"
        );
    }

    // After all that, queued still serves and still decides correctly.
    let mut s = submit_session(&sock).await;
    assert_eq!(mail(&mut s, "a@remote.example").await, SubmitReply::Ok);
    assert_eq!(
        rcpt(&mut s, "ann@example.test").await,
        SubmitReply::Rcpt(RcptVerdict::Accepted)
    );
    assert_eq!(
        call(&mut s, SubmitRequest::DataBegin).await,
        SubmitReply::DataReady
    );
    write_frame(
        &mut s,
        &SubmitRequest::DataChunk(message("ipc", "via the socket\r\n")),
    )
    .await
    .unwrap();
    assert!(matches!(
        call(&mut s, SubmitRequest::DataEnd).await,
        SubmitReply::Queued { .. }
    ));
    let log = t.log("queued");
    assert!(
        log.contains("submit.sock: closing connection: unexpected message DataChunk outside DATA"),
        "{log}"
    );
    // The bad hellos are refused and counted; the log gets one line a
    // second of them (a peer cannot flood it), the first one here.
    assert!(log.contains("submit.sock: refused a connection: "), "{log}");
    t.wait_var("IPC errors and refusals counted", |v| {
        v["tambo/ipc/errors"]["queued"].as_u64() >= Some(2)
            && v["tambo/ipc/refused"]["submit"].as_u64() >= Some(5)
    });
}

#[tokio::test(flavor = "current_thread")]
async fn hostile_deliver_client() {
    let mut t = Tambo::default_setup();
    t.start("monitord");
    t.start("queued");
    let sock = t.run_dir.join("deliver.sock");
    // Results for jobs never handed out close the connection.
    let mut s = hello::connect(&sock, Role::Deliverd, Role::Queued, &ids())
        .await
        .unwrap();
    write_frame(&mut s, &FromDeliverd::Ready { slots: 4 })
        .await
        .unwrap();
    write_frame(
        &mut s,
        &FromDeliverd::Done {
            job: 999,
            outcomes: vec![Outcome::Delivered],
            seen: None,
        },
    )
    .await
    .unwrap();
    assert!(closed_by_peer(&mut s).await);
    // Skipping Ready closes it too.
    let mut s = hello::connect(&sock, Role::Deliverd, Role::Queued, &ids())
        .await
        .unwrap();
    write_frame(
        &mut s,
        &FromDeliverd::Done {
            job: 1,
            outcomes: vec![Outcome::Delivered],
            seen: None,
        },
    )
    .await
    .unwrap();
    assert!(closed_by_peer(&mut s).await);
    // smtpd may not pull jobs.
    assert!(
        hello::connect(&sock, Role::Smtpd, Role::Queued, &ids())
            .await
            .is_err()
    );
    // A real deliverd still works afterwards.
    t.start("deliverd");
    t.start("smtpd");
    assert_eq!(
        t.send(
            "x@remote.example",
            &["ann@example.test"],
            &message("after", "x\r\n")
        )
        .code,
        250
    );
    t.wait_maildir("ann", 1);
}
