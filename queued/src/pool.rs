//! The bounded pool for CPU-heavy work queued does on a peer's behalf:
//! TLS handshake signatures (and password checks, at ~16 MiB and ~50 ms
//! each for scrypt). However many are asked for at once, at most as many
//! run as the machine has cores, so a flood of handshakes or AUTH attempts
//! slows those down but never starves the queue itself.

use tokio::sync::Semaphore;

pub struct CpuPool {
    permits: Semaphore,
}

impl CpuPool {
    /// A pool as wide as the machine (at least 1).
    pub fn for_this_machine() -> Self {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self::new(n)
    }

    pub fn new(width: usize) -> Self {
        Self {
            permits: Semaphore::new(width.max(1)),
        }
    }

    /// Runs `f` on the blocking pool once a slot is free.
    pub async fn run<T, F>(&self, f: F) -> Result<T, String>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let _slot = self
            .permits
            .acquire()
            .await
            .map_err(|_| "pool closed".to_string())?;
        tokio::task::spawn_blocking(f)
            .await
            .map_err(|e| format!("pool task failed: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn never_more_than_its_width_at_once() {
        let pool = Arc::new(CpuPool::new(2));
        let running = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..16 {
            let (pool, running, peak) = (pool.clone(), running.clone(), peak.clone());
            tasks.push(tokio::spawn(async move {
                pool.run(move || {
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(now, Ordering::SeqCst);
                    std::thread::sleep(std::time::Duration::from_millis(5));
                    running.fetch_sub(1, Ordering::SeqCst);
                })
                .await
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        assert!(peak.load(Ordering::SeqCst) <= 2);
    }
}
