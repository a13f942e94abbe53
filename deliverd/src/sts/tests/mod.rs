//! The cache's logic over a scripted fetcher: no DNS, no network, a clock
//! turned by hand.
//!
//! - `lately`: remembered failures, in-flight fetches, the bound.

mod lately;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::UNIX_EPOCH;

use super::fetch::fake::Fake;
use super::*;

const D: &str = "example.com";
const ENFORCE: &str = "version: STSv1\nmode: enforce\nmx: mx.example.com\nmax_age: 3600\n";
const TESTING: &str = "version: STSv1\nmode: testing\nmx: *.example.com\nmax_age: 7200\n";

struct T {
    sts: Arc<Sts>,
    fake: Arc<Fake>,
    clock: Arc<Mutex<SystemTime>>,
    dir: tempfile::TempDir,
}

impl T {
    fn new() -> T {
        T::with(Fake::new())
    }

    fn with(fake: Fake) -> T {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(Mutex::new(UNIX_EPOCH + Duration::from_secs(1_700_000_000)));
        let fake = Arc::new(fake);
        let sts = Arc::new(over(&dir.path().join("sts-cache"), &fake, &clock));
        T {
            sts,
            fake,
            clock,
            dir,
        }
    }

    fn cache_dir(&self) -> PathBuf {
        self.dir.path().join("sts-cache")
    }

    /// Another cache over the same directory (deliverd restarted), with
    /// a fetcher that knows nothing.
    fn restart(&self) -> (Sts, Arc<Fake>) {
        let fake = Arc::new(Fake::new());
        (over(&self.cache_dir(), &fake, &self.clock), fake)
    }

    fn advance(&self, secs: u64) {
        *self.clock.lock().unwrap() += Duration::from_secs(secs);
    }

    fn get(&self, c: Counter) -> u64 {
        self.sts.shared.stats.get(c)
    }
}

fn over(dir: &Path, fake: &Arc<Fake>, clock: &Arc<Mutex<SystemTime>>) -> Sts {
    Sts::build(
        dir.to_path_buf(),
        Fetcher::Fake(fake.clone()),
        Clock::Manual(clock.clone()),
    )
}

fn counts(stats: &Stats) -> Vec<(Counter, u64)> {
    Counter::EVERY
        .into_iter()
        .map(|c| (c, stats.get(c)))
        .filter(|(_, n)| *n > 0)
        .collect()
}

fn tls_error() -> FetchError {
    FetchError::Tls {
        host: format!("mta-sts.{D}"),
        error: "invalid peer certificate: UnknownIssuer".into(),
    }
}

#[tokio::test]
async fn a_fresh_policy_is_a_hit() {
    let t = T::new();
    t.fake.set(D, Ok(ENFORCE));
    let p = t.sts.policy(D).await.unwrap();
    assert_eq!(p.mode, Mode::Enforce);
    assert_eq!(p.mx, ["mx.example.com"]);
    let again = t.sts.policy(D).await.unwrap();
    assert!(Arc::ptr_eq(&p, &again));
    assert_eq!(t.fake.calls(), [D]);
    use Counter::*;
    assert_eq!(counts(&t.sts.shared.stats), [(Fetches, 2), (Hits, 1)]);
}

#[tokio::test]
async fn lookups_use_the_normalized_domain() {
    let t = T::new();
    t.fake.set(D, Ok(ENFORCE));
    assert!(t.sts.policy("Example.COM.").await.is_some());
    assert!(t.sts.policy(D).await.is_some());
    assert_eq!(t.fake.calls(), [D]);
    t.fake.set("xn--aca-6ma.example", Ok(ENFORCE));
    assert!(t.sts.policy("ñaca.example").await.is_some());
    // An address literal is no domain: no policy, and nothing fetched.
    assert!(t.sts.policy("[192.0.2.1]").await.is_none());
    assert_eq!(t.fake.calls(), [D, "xn--aca-6ma.example"]);
    assert_eq!(t.get(Counter::FailedFetch), 1);
}

#[tokio::test]
async fn an_expired_policy_is_fetched_again() {
    let t = T::new();
    t.fake.set(D, Ok(ENFORCE));
    t.sts.policy(D).await.unwrap();
    t.advance(3599);
    assert_eq!(t.sts.policy(D).await.unwrap().mode, Mode::Enforce);
    assert_eq!(t.fake.calls().len(), 1, "still fresh a second before");
    t.fake.set(D, Ok(TESTING));
    t.advance(1);
    assert_eq!(t.sts.policy(D).await.unwrap().mode, Mode::Testing);
    assert_eq!(t.fake.calls().len(), 2);
    use Counter::*;
    assert_eq!(
        counts(&t.sts.shared.stats),
        [(Fetches, 3), (Hits, 1), (Expired, 1)]
    );
}

#[tokio::test]
async fn no_policy_or_a_failed_fetch_is_none() {
    let t = T::new();
    // No TXT record: the fake's default.
    assert!(t.sts.policy(D).await.is_none());
    t.fake.set(D, Err(tls_error()));
    assert!(t.sts.policy(D).await.is_none());
    t.fake.set(
        D,
        Ok("version: STSv1\nmode: enforce\nmax_age: 0\nmx: a.b\n"),
    );
    // Past the memory of that failure (see `lately`).
    t.advance(300);
    assert!(t.sts.policy(D).await.is_none());
    // Nothing was cached: each lookup fetched.
    assert_eq!(t.fake.calls().len(), 3);
    use Counter::*;
    assert_eq!(
        counts(&t.sts.shared.stats),
        [(Fetches, 3), (FailedFetch, 3), (Invalid, 1)]
    );
    assert!(!path_exists(&cache::path(&t.cache_dir(), D)));
}

#[tokio::test]
async fn a_failed_fetch_keeps_an_unexpired_cached_policy() {
    let t = T::new();
    t.fake.set(D, Ok(ENFORCE));
    let p = t.sts.policy(D).await.unwrap();
    // An attacker blocks the policy host, or it serves junk.
    for failure in [
        Err(tls_error()),
        Err(FetchError::NoRecord),
        Ok("<html>not found</html>"),
    ] {
        t.fake.set(D, failure);
        let kept = t.sts.refetch(D).await.unwrap();
        assert!(Arc::ptr_eq(&p, &kept));
        // Past the memory of the failure: the next one fetches.
        t.advance(300);
    }
    assert_eq!(t.get(Counter::FailedFetch), 3);
    assert_eq!(t.fake.calls().len(), 4);
    // Expired, it no longer applies (and the junk is still served).
    t.advance(3600);
    assert!(t.sts.policy(D).await.is_none());
    // That failure is remembered: no fetch, the same answer.
    assert!(t.sts.refetch(D).await.is_none());
    assert_eq!(t.fake.calls().len(), 5);
    use Counter::*;
    assert_eq!(
        counts(&t.sts.shared.stats),
        [(Fetches, 6), (Expired, 1), (FailedFetch, 4), (Invalid, 2)]
    );
}

#[tokio::test]
async fn refetch_bypasses_the_cache() {
    let t = T::new();
    t.fake.set(D, Ok(ENFORCE));
    t.sts.policy(D).await.unwrap();
    t.fake.set(D, Ok(TESTING));
    assert_eq!(t.sts.refetch(D).await.unwrap().mode, Mode::Testing);
    assert_eq!(t.sts.policy(D).await.unwrap().mode, Mode::Testing);
    assert_eq!(t.fake.calls().len(), 2);
    assert_eq!(t.get(Counter::Hits), 1);
}

#[tokio::test]
async fn policies_survive_a_restart() {
    let t = T::new();
    t.fake.set(D, Ok(ENFORCE));
    let p = t.sts.policy(D).await.unwrap();
    let file = cache::path(&t.cache_dir(), D);
    let mode = std::fs::metadata(&file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let mode = std::fs::metadata(t.cache_dir())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700);
    assert_eq!(
        std::fs::read_to_string(&file).unwrap(),
        r#"{"version":"STSv1","mode":"enforce","max_age":3600,"mx":["mx.example.com"],"fetched":1700000000}"#
    );

    let (sts, fake) = t.restart();
    assert_eq!(*sts.policy(D).await.unwrap(), *p);
    assert!(fake.calls().is_empty());
    assert_eq!(sts.shared.stats.get(Counter::Hits), 1);
    // It expires when it would have without the restart.
    t.advance(3600);
    assert!(sts.policy(D).await.is_none());
    assert_eq!(fake.calls(), [D]);
    assert_eq!(sts.shared.stats.get(Counter::Expired), 1);
}

#[tokio::test]
async fn bad_files_are_ignored_and_counted() {
    let t = T::new();
    let dir = t.cache_dir();
    std::fs::write(cache::path(&dir, D), "garbage").unwrap();
    std::fs::write(
        cache::path(&dir, "example.org"),
        r#"{"version":"STSv1","mode":"enforce","max_age":0,"mx":["a.b"],"fetched":1}"#,
    )
    .unwrap();
    std::fs::write(dir.join("pol:Upper.example"), "{}").unwrap();
    std::fs::write(dir.join("README"), "not ours").unwrap();
    // A write cut short by a crash: removed.
    std::fs::write(dir.join(".pol:example.com0a1b2c"), "{").unwrap();
    std::fs::write(dir.join(".keep"), "").unwrap();
    std::fs::write(cache::path(&dir, "big.example"), vec![b' '; 65 * 1024]).unwrap();

    let (sts, fake) = t.restart();
    use Counter::*;
    assert_eq!(
        counts(&sts.shared.stats),
        [(Invalid, 1), (UnmarshalErrors, 2)]
    );
    assert!(!path_exists(&dir.join(".pol:example.com0a1b2c")));
    assert!(path_exists(&dir.join(".keep")));
    assert!(sts.lock_entries().is_empty());
    // The domain is fetched as if never cached, and its file replaced.
    fake.set(D, Ok(ENFORCE));
    assert!(sts.policy(D).await.is_some());
    assert_eq!(fake.calls(), [D]);
    let (again, _) = t.restart();
    assert_eq!(again.lock_entries().len(), 1);
}

#[tokio::test]
async fn a_failed_store_does_not_stop_the_policy() {
    let t = T::new();
    // A non-empty directory where the file goes: the rename fails.
    let file = cache::path(&t.cache_dir(), D);
    std::fs::create_dir(&file).unwrap();
    std::fs::write(file.join("x"), "").unwrap();
    t.fake.set(D, Ok(ENFORCE));
    assert!(t.sts.policy(D).await.is_some());
    assert!(t.sts.policy(D).await.is_some());
    assert_eq!(t.get(Counter::IoErrors), 1);
    assert_eq!(t.get(Counter::Hits), 1);
    // Nothing of the failed write is left behind.
    let left: Vec<_> = std::fs::read_dir(t.cache_dir()).unwrap().collect();
    assert_eq!(left.len(), 1);
}

#[tokio::test]
async fn an_unusable_directory_leaves_a_memory_cache() {
    let dir = tempfile::tempdir().unwrap();
    let not_a_dir = dir.path().join("file");
    std::fs::write(&not_a_dir, "").unwrap();
    let fake = Arc::new(Fake::new());
    let clock = Arc::new(Mutex::new(SystemTime::now()));
    let sts = over(&not_a_dir.join("sts-cache"), &fake, &clock);
    assert_eq!(sts.shared.stats.get(Counter::IoErrors), 1);
    fake.set(D, Ok(ENFORCE));
    assert!(sts.policy(D).await.is_some());
    assert!(sts.policy(D).await.is_some());
    assert_eq!(fake.calls().len(), 1);
    assert_eq!(sts.shared.stats.get(Counter::IoErrors), 2, "the write");
}

#[tokio::test]
async fn a_refresh_renews_keeps_and_drops() {
    let t = T::new();
    for d in ["a.example", "b.example", "c.example"] {
        t.fake.set(d, Ok(ENFORCE));
        t.sts.policy(d).await.unwrap();
    }
    t.advance(1800);
    // a: renewed with a new policy; b: fails but is still fresh; c: no
    // longer publishes one.
    t.fake.set("a.example", Ok(TESTING));
    t.fake.set("b.example", Err(tls_error()));
    t.fake.set("c.example", Err(FetchError::NoRecord));
    t.sts.refresh_once().await;
    use Counter::*;
    assert_eq!(t.get(Refreshes), 3);
    assert_eq!(t.get(RefreshErrors), 2);
    assert_eq!(t.get(RefreshCycles), 1);
    let a = t.sts.cached("a.example").unwrap();
    assert_eq!(a.policy.mode, Mode::Testing);
    assert_eq!(a.fetched, *t.clock.lock().unwrap());
    assert_eq!(t.sts.lock_entries().len(), 3);
    let (restarted, _) = t.restart();
    assert_eq!(
        restarted.cached("a.example").unwrap().policy.mode,
        Mode::Testing,
        "the renewal reached the disk"
    );

    // Past their expiry, b and c are dropped, from memory and disk; a
    // (renewed) is not expired.
    t.advance(1800);
    t.sts.refresh_once().await;
    assert_eq!(t.get(Refreshes), 6);
    assert_eq!(t.get(RefreshErrors), 4);
    assert_eq!(t.get(RefreshCycles), 2);
    let mut left: Vec<_> = t.sts.lock_entries().keys().cloned().collect();
    left.sort();
    assert_eq!(left, ["a.example"]);
    assert!(!path_exists(&cache::path(&t.cache_dir(), "b.example")));
    assert!(path_exists(&cache::path(&t.cache_dir(), "a.example")));
    // A refresh is no lookup.
    assert_eq!(t.get(Fetches), 3);
    assert_eq!(t.get(FailedFetch), 0);
}

#[tokio::test]
async fn refresh_forever_runs_passes() {
    let t = T::new();
    t.fake.set(D, Ok(ENFORCE));
    t.sts.policy(D).await.unwrap();
    let task = tokio::spawn(t.sts.clone().refresh_forever(Duration::from_millis(5)));
    let sts = t.sts.clone();
    crate::testutil::wait_until("two refresh passes", || {
        sts.shared.stats.get(Counter::RefreshCycles) >= 2
    })
    .await;
    task.abort();
    assert!(t.get(Counter::Refreshes) >= 2);
    assert_eq!(t.get(Counter::RefreshErrors), 0);
}

#[tokio::test]
async fn concurrent_lookups_share_one_fetch() {
    for answer in [Ok(ENFORCE), Err(tls_error())] {
        let t = T::with(Fake::gated());
        t.fake.set(D, answer.clone());
        const N: usize = 5;
        let tasks: Vec<_> = (0..N)
            .map(|_| {
                let sts = t.sts.clone();
                tokio::spawn(async move { sts.policy(D).await })
            })
            .collect();
        // Until every lookup waits on the one cell (the map holds one
        // reference, each lookup another).
        let mut spins = 0;
        loop {
            let refs = t.sts.inflight.lock().unwrap().get(D).map(Arc::strong_count);
            if refs == Some(1 + N) {
                break;
            }
            spins += 1;
            assert!(spins < 100_000, "lookups never lined up: {refs:?}");
            tokio::task::yield_now().await;
        }
        t.fake.open();
        for task in tasks {
            assert_eq!(task.await.unwrap().is_some(), answer.is_ok());
        }
        assert_eq!(t.fake.calls(), [D]);
        assert!(t.sts.inflight.lock().unwrap().is_empty());
        assert_eq!(t.get(Counter::Fetches), N as u64);
        let failed = if answer.is_ok() { 0 } else { N as u64 };
        assert_eq!(t.get(Counter::FailedFetch), failed);
    }
}

#[tokio::test]
async fn a_fetch_that_hangs_times_out() {
    let mut t = T::with(Fake::gated());
    t.fake.set(D, Ok(ENFORCE));
    Arc::get_mut(&mut t.sts).unwrap().lookup_timeout = Duration::from_millis(20);
    assert!(t.sts.policy(D).await.is_none());
    assert_eq!(t.get(Counter::FailedFetch), 1);
    assert!(t.sts.inflight.lock().unwrap().is_empty());
}

#[test]
fn warnings_are_limited_per_domain() {
    let t = T::new();
    assert!(t.sts.warn("a.example", "x"));
    assert!(!t.sts.warn("a.example", "x"));
    assert!(t.sts.warn("b.example", "x"));
    // An old warning no longer holds the next back.
    let long_ago = Instant::now()
        .checked_sub(LOG_INTERVAL)
        .expect("a monotonic clock older than a minute");
    t.sts
        .warned
        .lock()
        .unwrap()
        .insert("a.example".into(), long_ago);
    assert!(t.sts.warn("a.example", "x"));
}

fn path_exists(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok()
}
