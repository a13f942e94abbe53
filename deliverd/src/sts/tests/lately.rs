//! Remembered failures, in-flight fetches that lose their lookups, and
//! the bound on cached policies.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use super::*;

/// Polls `f` once, as a runtime would, without waiting.
fn poll_once<F: Future>(f: Pin<&mut F>) -> Poll<F::Output> {
    f.poll(&mut Context::from_waker(Waker::noop()))
}

#[tokio::test]
async fn a_failed_fetch_is_remembered_for_five_minutes() {
    let t = T::new();
    t.fake.set(D, Err(tls_error()));
    assert!(t.sts.policy(D).await.is_none());
    assert_eq!(t.fake.calls().len(), 1);
    // Within 5 minutes: the same answer, no fetch, and nothing counted
    // but the lookup itself.
    assert!(t.sts.policy(D).await.is_none());
    t.advance(299);
    assert!(t.sts.policy(D).await.is_none());
    assert!(t.sts.refetch(D).await.is_none());
    assert_eq!(t.fake.calls().len(), 1);
    use Counter::*;
    assert_eq!(
        counts(&t.sts.shared.stats),
        [(Fetches, 4), (FailedFetch, 1)]
    );
    // Then it is fetched again; a success is not remembered as a failure.
    t.advance(1);
    t.fake.set(D, Ok(ENFORCE));
    assert!(t.sts.policy(D).await.is_some());
    assert_eq!(t.fake.calls().len(), 2);
    assert!(!t.sts.failed_lately(D));
}

#[tokio::test]
async fn every_kind_of_failure_is_remembered_but_no_record() {
    let t = T::new();
    // No `_mta-sts` record: what most domains answer, quickly.
    assert!(t.sts.policy(D).await.is_none());
    assert!(t.sts.policy(D).await.is_none());
    assert_eq!(t.fake.calls().len(), 2);
    for (domain, answer) in [
        (
            "a.example",
            Err(FetchError::Timeout(Duration::from_secs(55))),
        ),
        ("b.example", Ok("<html>not a policy</html>")),
        ("c.example", Err(FetchError::Status(404))),
    ] {
        t.fake.set(domain, answer);
        assert!(t.sts.policy(domain).await.is_none());
        assert!(t.sts.policy(domain).await.is_none());
    }
    assert_eq!(t.fake.calls().len(), 5);
}

#[tokio::test]
async fn an_unexpired_policy_wins_over_a_remembered_failure() {
    let t = T::new();
    t.fake.set(D, Ok(ENFORCE));
    let p = t.sts.policy(D).await.unwrap();
    t.fake.set(D, Err(tls_error()));
    let kept = t.sts.refetch(D).await.unwrap();
    assert!(Arc::ptr_eq(&p, &kept));
    assert_eq!(t.fake.calls().len(), 2);
    // Remembered: no fetch, and still the cached policy.
    let kept = t.sts.refetch(D).await.unwrap();
    assert!(Arc::ptr_eq(&p, &kept));
    let hit = t.sts.policy(D).await.unwrap();
    assert!(Arc::ptr_eq(&p, &hit));
    assert_eq!(t.fake.calls().len(), 2);
}

#[tokio::test]
async fn a_fetch_that_hangs_times_out_and_is_remembered() {
    let mut t = T::with(Fake::gated());
    Arc::get_mut(&mut t.sts).unwrap().lookup_timeout = Duration::from_millis(20);
    assert!(t.sts.policy(D).await.is_none());
    assert_eq!(t.get(Counter::FailedFetch), 1);
    assert!(t.sts.inflight.lock().unwrap().is_empty());
    assert!(t.sts.failed_lately(D));
}

#[test]
fn a_fetch_ends_before_the_wait_for_it() {
    // The fetch's own timeout fires first, so the failure is counted,
    // logged and remembered, instead of the lookup being dropped.
    assert!(LOOKUP_TIMEOUT < crate::remote::STS_WAIT);
}

#[tokio::test]
async fn lookups_dropped_mid_fetch_leave_no_inflight_entry() {
    let t = T::with(Fake::gated());
    t.fake.set(D, Ok(ENFORCE));
    let refs = || t.sts.inflight.lock().unwrap().get(D).map(Arc::strong_count);
    let mut first = Box::pin(t.sts.policy(D));
    let mut second = Box::pin(t.sts.policy(D));
    // The first runs the fetch (held at the gate), the second waits on it.
    assert!(poll_once(first.as_mut()).is_pending());
    assert!(poll_once(second.as_mut()).is_pending());
    assert_eq!(t.fake.calls(), [D]);
    assert_eq!(refs(), Some(3));
    // The fetching lookup is dropped (its delivery gave up): the entry
    // stays for the one still waiting.
    drop(first);
    assert_eq!(refs(), Some(2));
    drop(second);
    assert_eq!(refs(), None, "the last one out takes the entry");

    // A waiter left alone takes the fetch over, and cleans up after it.
    let mut first = Box::pin(t.sts.policy(D));
    assert!(poll_once(first.as_mut()).is_pending());
    let second = tokio::spawn({
        let sts = t.sts.clone();
        async move { sts.policy(D).await }
    });
    crate::testutil::wait_until("the second lookup to wait", || refs() == Some(3)).await;
    drop(first);
    t.fake.open();
    assert!(second.await.unwrap().is_some());
    assert_eq!(t.fake.calls(), [D, D, D]);
    assert_eq!(refs(), None);
}

#[tokio::test]
async fn the_cache_holds_at_most_its_bound() {
    let mut t = T::new();
    Arc::get_mut(&mut t.sts).unwrap().max_entries = 2;
    // max_age 3600 (ENFORCE) and 7200 (TESTING).
    t.fake.set("a.example", Ok(ENFORCE));
    t.fake.set("b.example", Ok(TESTING));
    t.fake.set("c.example", Ok(ENFORCE));
    for d in ["a.example", "b.example"] {
        t.sts.policy(d).await.unwrap();
    }
    t.advance(10);
    // Full: a expires first, but an unexpired enforce policy is never
    // dropped for room; the testing one goes, in memory and on disk.
    t.sts.policy("c.example").await.unwrap();
    let mut kept: Vec<_> = t.sts.lock_entries().keys().cloned().collect();
    kept.sort();
    assert_eq!(kept, ["a.example", "c.example"]);
    assert!(!path_exists(&cache::path(&t.cache_dir(), "b.example")));
    assert!(path_exists(&cache::path(&t.cache_dir(), "c.example")));
    // A renewal takes no room.
    t.sts.refetch("a.example").await.unwrap();
    assert_eq!(t.sts.lock_entries().len(), 2);
    // Full of enforce policies: a newcomer is used, not cached.
    t.fake.set("d.example", Ok(TESTING));
    assert!(t.sts.policy("d.example").await.is_some());
    assert!(t.sts.cached("d.example").is_none());
    assert!(t.sts.cached("c.example").is_some());
}

#[tokio::test]
async fn unused_policies_are_not_renewed_and_make_room_again() {
    let mut t = T::new();
    Arc::get_mut(&mut t.sts).unwrap().max_entries = 1;
    t.fake.set("a.example", Ok(ENFORCE));
    t.fake.set("b.example", Ok(ENFORCE));
    t.sts.policy("a.example").await.unwrap();
    // Full of an enforce policy in use: b is used, not cached.
    assert!(t.sts.policy("b.example").await.is_some());
    assert!(t.sts.cached("b.example").is_none());
    assert!(!path_exists(&cache::path(&t.cache_dir(), "b.example")));
    // In use, a is renewed by each refresh, whatever its age.
    t.advance(3000);
    t.sts.policy("a.example").await.unwrap();
    t.sts.refresh_once().await;
    // Then nobody asks for it for a week: not renewed, and once expired
    // it is dropped, file and all.
    t.advance(cache::IDLE_AFTER.as_secs());
    t.sts.refresh_once().await;
    assert!(t.sts.cached("a.example").is_none());
    assert!(!path_exists(&cache::path(&t.cache_dir(), "a.example")));
    // b gets the room.
    t.sts.policy("b.example").await.unwrap();
    assert!(t.sts.cached("b.example").is_some());
}
