//! What smtpd foresees of queued's answers holds.

use std::sync::Arc;

use tambo_common::address::mail_answer_is_certain;
use tambo_proto::submit::{Mode, SpfReport, SpfResult, SubmitReply, SubmitRequest};

use super::Session;
use crate::auth;
use crate::pool::CpuPool;

fn session(dir: &std::path::Path) -> Session {
    let auth = Arc::new(auth::Service {
        pool: Arc::new(CpuPool::new(1)),
        budget: auth::FailureBudget::default(),
    });
    Session::new(crate::queue::tests::queue(dir), auth)
}

/// Wherever smtpd answers a MAIL without waiting, queued's answer is Ok.
#[tokio::test]
async fn every_mail_smtpd_answers_for_queued_is_one_queued_takes() {
    let dir = tempfile::tempdir().unwrap();
    let senders = [
        "",
        "a@remote.test",
        "Ann.Example+tag@Remote.Test",
        "ñandú@bücher.example",
        "-opt@remote.test",
        "no-domain",
        "a b@remote.test",
        "a@@remote.test",
    ];
    let spf = |result| SpfReport {
        result,
        domain: "remote.test".into(),
        reason: String::new(),
    };
    let reports = [
        None,
        Some(spf(SpfResult::None)),
        Some(spf(SpfResult::Neutral)),
        Some(spf(SpfResult::Pass)),
        Some(spf(SpfResult::Fail)),
        Some(spf(SpfResult::SoftFail)),
        Some(spf(SpfResult::TempError)),
        Some(spf(SpfResult::PermError)),
    ];
    let mut foreseen = 0;
    for mode in [Mode::Smtp, Mode::Submission, Mode::SubmissionTls] {
        for from in senders {
            for report in &reports {
                if !mail_answer_is_certain(mode, false, from, report.as_ref()) {
                    continue;
                }
                foreseen += 1;
                let mut s = session(dir.path());
                let opened = s
                    .handle(SubmitRequest::Session {
                        client: "192.0.2.1:4444".into(),
                        mode,
                        tls: false,
                    })
                    .await;
                assert_eq!(opened.unwrap(), Some(SubmitReply::Ok));
                let mail = SubmitRequest::Mail {
                    from: from.into(),
                    ehlo: "client.test".into(),
                    server_name: "mx.example.org".into(),
                    spf: report.clone(),
                };
                let answer = s.handle(mail).await;
                assert_eq!(
                    answer.unwrap(),
                    Some(SubmitReply::Ok),
                    "{mode:?} from {from:?} with {report:?}"
                );
            }
        }
    }
    assert!(foreseen >= 20, "only {foreseen} cases foreseen");
}
