//! CPU and heap profiles in the pprof format `go tool pprof` reads
//! (`/debug/pprof/profile` and `/debug/pprof/heap`, asked by monitord over
//! monitor.sock; see [`tambo_proto::monitor::ProfileRequest`]).
//!
//! - CPU: [`cpu`] samples the running thread's stack every 10 ms of the
//!   process's CPU time (SIGPROF) for the seconds asked.
//! - Heap: [`heap::Sampler`], the daemons' global allocator, keeps the
//!   stack of about one allocation per 512 KiB allocated, as Go does, and
//!   forgets it when it is freed; the profile is what is still in use,
//!   scaled to an estimate of the whole.
//!
//! Stacks are code addresses in the executable files, which `go tool
//! pprof` names from the files (see [`encode`]): no process parses debug
//! information, and no runtime address leaves it. The files mapped are
//! read from /proc/self/maps by [`prepare`], before the lockdown forbids
//! it.

use std::sync::OnceLock;
use std::time::Duration;

use tambo_proto::monitor::{ProfileFuture, ProfileKind};

#[allow(unsafe_code)]
pub mod cpu;
mod encode;
#[allow(unsafe_code)]
pub mod heap;

use encode::{Builder, Mapping, Meta, ValueType};

static MAPPINGS: OnceLock<Vec<Mapping>> = OnceLock::new();

/// Notes which files are mapped as code, and where, while /proc and the
/// files may still be read (before the lockdown). Without it, profiles
/// have no files to name their addresses from.
pub fn prepare() {
    let maps = match std::fs::read_to_string("/proc/self/maps") {
        Ok(text) => text,
        Err(e) => {
            tracing::warn!("profiles will have no function names: /proc/self/maps: {e}");
            return;
        }
    };
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .map_or(4096, |p| p as u64);
    let found = encode::mappings(&maps, page, |file| {
        use std::io::Read;
        // The ELF header and program headers are in the first pages.
        let mut head = Vec::new();
        std::fs::File::open(file)
            .and_then(|f| f.take(64 * 1024).read_to_end(&mut head))
            .ok()?;
        encode::elf_segments(&head)
    });
    // The executable's own text: where the CPU sampler may unwind.
    if let Some(m) = std::env::current_exe()
        .ok()
        .and_then(|exe| found.iter().find(|m| std::path::Path::new(&m.file) == exe))
    {
        cpu::set_own_code(m.start as usize, m.limit as usize);
    }
    let _ = MAPPINGS.set(found);
}

fn mappings() -> &'static [Mapping] {
    MAPPINGS.get().map_or(&[], Vec::as_slice)
}

/// Takes the profile asked for ([`tambo_proto::monitor::Profiler`]).
pub fn run(kind: ProfileKind) -> ProfileFuture {
    Box::pin(async move {
        // Encoding takes a while: not on the runtime's workers.
        let encoded = match kind {
            ProfileKind::Cpu { seconds } => {
                if !cpu::start()? {
                    return Err("a CPU profile is being taken already".into());
                }
                let running = Running;
                tokio::time::sleep(Duration::from_secs(seconds.into())).await;
                std::mem::forget(running);
                tokio::task::spawn_blocking(move || cpu_profile(seconds)).await
            }
            ProfileKind::Heap => {
                if !heap::installed() {
                    return Err("this process does not sample its allocations (not built with the `profile` feature)".into());
                }
                tokio::task::spawn_blocking(heap_profile).await
            }
        };
        encoded.map_err(|e| format!("the profile failed: {e}"))
    })
}

/// Stops the CPU sampler should a profile be abandoned half-way (its
/// task cancelled), so the next one can start.
struct Running;

impl Drop for Running {
    fn drop(&mut self) {
        cpu::stop(|_| {});
    }
}

/// The allocator's entry points, as Rust names them: they and the frames
/// they call are the profiler's, not the program's.
const ALLOCATOR_FRAMES: &str =
    "(__rustc::)?__(rust|rg)_(alloc|alloc_zeroed|realloc)|.*profile::heap::.*";

/// Ends the CPU profile begun `seconds` ago.
fn cpu_profile(seconds: u32) -> Vec<u8> {
    let mut b = Builder::new(mappings());
    let period = 1_000_000_000 / cpu::HZ as i64;
    let dropped = cpu::stop(|stack| b.add(stack, &[1, period]));
    let comment =
        (dropped > 0).then(|| format!("{dropped} samples left out: more than the profiler keeps"));
    b.finish(&Meta {
        types: &[
            ValueType("samples", "count"),
            ValueType("cpu", "nanoseconds"),
        ],
        period_of: 1,
        period,
        duration_ns: i64::from(seconds) * 1_000_000_000,
        drop_frames: None,
        comment: comment.as_deref(),
    })
}

/// The sampled allocations still in use.
fn heap_profile() -> Vec<u8> {
    let rate = heap::rate();
    let mut b = Builder::new(mappings());
    heap::for_each_live(|size, stack| {
        // Each sample stands for the allocations of its size that the
        // sampling skipped (Go's scaling).
        let weight = 1.0 / (1.0 - (-(size as f64) / rate as f64).exp());
        b.add(
            stack,
            &[weight.round() as i64, (weight * size as f64).round() as i64],
        );
    });
    let missed = heap::missed();
    let comment = (missed > 0)
        .then(|| format!("{missed} samples left out since start (table full, or stack unknown)"));
    b.finish(&Meta {
        types: &[
            ValueType("inuse_objects", "count"),
            ValueType("inuse_space", "bytes"),
        ],
        period_of: 1,
        period: rate as i64,
        duration_ns: 0,
        drop_frames: Some(ALLOCATOR_FRAMES),
        comment: comment.as_deref(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contains(hay: &[u8], needle: &str) -> bool {
        hay.windows(needle.len()).any(|w| w == needle.as_bytes())
    }

    #[test]
    fn a_heap_profile_names_the_files_and_types() {
        prepare();
        // Far over the sampling rate: certainly sampled, many times.
        #[inline(never)]
        fn hold_a_lot() -> Vec<Vec<u8>> {
            (0..64).map(|_| vec![7u8; 256 * 1024]).collect()
        }
        let held = hold_a_lot();
        assert!(heap::installed());
        let mut samples = 0;
        heap::for_each_live(|size, stack| {
            if size == 256 * 1024 {
                samples += 1;
                assert!(!stack.is_empty());
            }
        });
        assert!(samples > 0);
        let p = heap_profile();
        assert!(contains(&p, "inuse_space"));
        // The test binary itself is a mapping the stacks point into.
        let me = std::env::current_exe().unwrap();
        assert!(contains(&p, &me.display().to_string()));
        drop(held);
    }
}
