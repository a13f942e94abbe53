//! What smtpd foresees of queued's answers holds.

use std::sync::Arc;

use tambo_common::address::{is_acceptable_sender, mail_answer_is_certain};
use tambo_proto::submit::{Mode, SpfReport, SpfResult, SubmitReply, SubmitRequest};

use super::Session;
use crate::auth;
use crate::policy::Authenticated;
use crate::pool::CpuPool;
use crate::queue::Queue;

async fn session(q: &Arc<Queue>, mode: Mode, tls: bool, user: Option<&str>) -> Session {
    let service = Arc::new(auth::Service {
        pool: Arc::new(CpuPool::new(1)),
        budget: auth::FailureBudget::default(),
    });
    let mut s = Session::new(q.clone(), service);
    let opened = s
        .handle(SubmitRequest::Session {
            client: "192.0.2.1:4444".into(),
            mode,
            tls,
        })
        .await;
    assert_eq!(opened.unwrap(), Some(SubmitReply::Ok));
    // As a password check that just succeeded leaves it.
    s.auth = user.map(|u| Authenticated::after_check(u.into()));
    s
}

fn mail(from: &str, spf: Option<SpfReport>) -> SubmitRequest {
    SubmitRequest::Mail {
        from: from.into(),
        ehlo: "client.test".into(),
        server_name: "mx.example.org".into(),
        spf,
    }
}

fn spf(result: SpfResult) -> SpfReport {
    SpfReport {
        result,
        domain: "remote.test".into(),
        reason: String::new(),
    }
}

/// Wherever smtpd answers a MAIL without waiting, queued's answer is Ok;
/// and each condition of the rule is needed: dropping any one of them
/// meets a case queued refuses.
#[tokio::test]
async fn every_mail_smtpd_answers_for_queued_is_one_queued_takes() {
    let dir = tempfile::tempdir().unwrap();
    let q = crate::queue::tests::queue(dir.path());
    // remote.test was seen over TLS: an SPF pass for it in plain text is
    // then refused (the incoming security level).
    let mut tls = session(&q, Mode::Smtp, true, None).await;
    let seeded = tls
        .handle(mail("a@remote.test", Some(spf(SpfResult::Pass))))
        .await;
    assert_eq!(seeded.unwrap(), Some(SubmitReply::Ok));

    let senders = [
        "",
        "a@remote.test",
        "Ann.Example+tag@Remote.Test",
        "ñandú@bücher.example",
        "-opt@remote.test",
        "no-domain",
        "a b@remote.test",
    ];
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
    // Refusals where exactly one condition of the rule fails: mode,
    // authentication, sender, SPF.
    let mut needed = [0; 4];
    for mode in [Mode::Smtp, Mode::Submission, Mode::SubmissionTls] {
        for user in [None, Some("ann@example.org")] {
            for from in senders {
                for report in &reports {
                    let conditions = [
                        mode == Mode::Smtp,
                        user.is_none(),
                        is_acceptable_sender(from),
                        report.as_ref().is_none_or(|r| r.result != SpfResult::Pass),
                    ];
                    let certain =
                        mail_answer_is_certain(mode, user.is_some(), from, report.as_ref());
                    assert_eq!(certain, conditions.iter().all(|c| *c));
                    let mut s = session(&q, mode, false, user).await;
                    let answer = s.handle(mail(from, report.clone())).await.unwrap();
                    if certain {
                        foreseen += 1;
                        assert_eq!(
                            answer,
                            Some(SubmitReply::Ok),
                            "{mode:?} from {from:?} with {report:?}"
                        );
                    } else if answer != Some(SubmitReply::Ok)
                        && conditions.iter().filter(|c| !**c).count() == 1
                    {
                        let failed = conditions.iter().position(|c| !*c).unwrap();
                        needed[failed] += 1;
                    }
                }
            }
        }
    }
    assert!(foreseen >= 20, "only {foreseen} cases foreseen");
    assert!(
        needed.iter().all(|n| *n > 0),
        "a condition no refusal needs (mode, auth, sender, SPF): {needed:?}"
    );
}
