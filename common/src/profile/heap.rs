//! The sampling allocator behind heap profiles: the system allocator, plus
//! the stack of about one allocation per [`RATE`] bytes allocated, kept
//! until that allocation is freed.
//!
//! # Why this is sound
//!
//! Memory is the system allocator's, passed through unchanged: every
//! `alloc`, `realloc` and `dealloc` is [`System`]'s with the caller's own
//! layout, so [`GlobalAlloc`]'s contract is [`System`]'s. The sampler adds
//! only bookkeeping, which never allocates through this allocator and
//! never blocks:
//!
//! - the samples live in fixed static tables of atomics; a slot is taken
//!   with a compare-and-swap, so no lock is held, and a full bucket just
//!   skips the sample;
//! - a thread-local flag keeps a sample from being taken while one is
//!   being taken on the same thread (an allocation inside the unwinder);
//! - the stack is read with `backtrace::trace_unsynchronized`, unsafe
//!   only because it is not serialised with other `backtrace` calls,
//!   which on Linux (libgcc's unwinder) need no serialising; it writes
//!   into a local array, allocating nothing;
//! - an address is forgotten before [`System`] frees it, so it cannot be
//!   handed out again and recorded while its old sample still stands.
//!
//! What it costs: an allocation decrements a thread-local count; a free
//! reads one cache line of the table (8 addresses); a sampled allocation
//! (one per 512 KiB, on average) unwinds its stack, a few microseconds.
//! The tables take 0.5 MiB of address space, touched only where used.
//!
//! A profile read while other threads allocate may see a slot half
//! rewritten (a size with another sample's stack): a statistical profile
//! can afford that, and nothing is read through those addresses.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Average bytes allocated between two samples (Go's default).
pub const RATE: usize = 512 * 1024;

/// The average in force: [`RATE`] unless a test set another at startup.
static RATE_NOW: AtomicUsize = AtomicUsize::new(RATE);

/// Sets the average distance between samples (`[testing]
/// heap_profile_rate`), at startup: samples taken before keep the weight
/// of the rate they were taken at, which the profile does not know.
pub fn set_rate(bytes: u64) {
    RATE_NOW.store(
        usize::try_from(bytes).unwrap_or(usize::MAX).max(1),
        Ordering::Relaxed,
    );
}

/// The average distance between samples now.
pub fn rate() -> usize {
    RATE_NOW.load(Ordering::Relaxed)
}

/// Slots are grouped in buckets of [`WAYS`], one cache line of addresses.
const WAYS: usize = 8;
const BUCKETS: usize = 256;
const SLOTS: usize = BUCKETS * WAYS;
/// Frames kept per sample, from the allocation up.
const DEPTH: usize = 32;

/// A free slot; [`BUSY`] is one being written; anything else is the
/// address of a sampled allocation still in use.
const FREE: usize = 0;
const BUSY: usize = 1;

static ADDRS: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(FREE) }; SLOTS];
static SIZES: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(0) }; SLOTS];
static STACKS: [[AtomicUsize; DEPTH]; SLOTS] =
    [const { [const { AtomicUsize::new(0) }; DEPTH] }; SLOTS];
/// Samples left out: their bucket was full, or their stack unknown.
static MISSED: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// Bytes this thread may still allocate before its next sample. Zero
    /// at first: a thread's first allocation draws its first distance from
    /// the rate in force then, not from [`RATE`] (a thread started after
    /// [`set_rate`] would otherwise wait [`RATE`] bytes for its first
    /// sample).
    static LEFT: Cell<isize> = const { Cell::new(0) };
    /// Set while this thread takes a sample.
    static SAMPLING: Cell<bool> = const { Cell::new(false) };
    /// This thread's random state, for the distance to the next sample.
    static SEED: Cell<u64> = const { Cell::new(0) };
}

/// The global allocator of the daemons built with profiling.
pub struct Sampler;

// SAFETY: see the module's comment: the memory is System's, with the
// caller's layouts; the sampler only reads the returned addresses.
unsafe impl GlobalAlloc for Sampler {
    // Never inlined: a sample's stack starts after its frame.
    #[inline(never)]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract is System's.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            maybe_sample(p as usize, layout.size());
        }
        p
    }

    // Never inlined: a sample's stack starts after its frame.
    #[inline(never)]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as above.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            maybe_sample(p as usize, layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        forget(ptr as usize);
        // SAFETY: `ptr` and `layout` are the caller's, from this allocator,
        // which is System's.
        unsafe { System.dealloc(ptr, layout) }
    }

    // Never inlined: a sample's stack starts after its frame.
    #[inline(never)]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // Forgotten first: once System moved it, the old address may be
        // handed to another thread. If the realloc fails the block stays
        // the caller's, unsampled: one sample lost, nothing unsound.
        forget(ptr as usize);
        // SAFETY: as above.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            maybe_sample(p as usize, new_size);
        }
        p
    }
}

fn bucket(addr: usize) -> usize {
    let h = (addr as u64 >> 4).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (h >> (64 - BUCKETS.trailing_zeros())) as usize
}

#[inline]
fn maybe_sample(addr: usize, size: usize) {
    let due = LEFT
        .try_with(|left| {
            let l = left.get() - size as isize;
            left.set(l);
            l <= 0
        })
        .unwrap_or(false);
    if due {
        sample(addr, size);
    }
}

/// Set by the first sample: this allocator is the process's.
static INSTALLED: AtomicBool = AtomicBool::new(false);

/// Whether this allocator is the process's global one (it has sampled).
pub fn installed() -> bool {
    INSTALLED.load(Ordering::Relaxed)
}

#[cold]
fn sample(addr: usize, size: usize) {
    INSTALLED.store(true, Ordering::Relaxed);
    // A thread's first allocation only starts its count (its random state
    // is still unset): sampling it would weigh every thread's first
    // allocation as a whole distance.
    let first = SEED.try_with(|s| s.get() == 0).unwrap_or(false);
    if first {
        let _ = LEFT.try_with(|left| left.set(next_distance()));
        return;
    }
    if SAMPLING.try_with(|s| s.replace(true)).unwrap_or(true) {
        return;
    }
    let _ = LEFT.try_with(|left| left.set(next_distance()));
    // The allocator's own frames come first: the stack starts after the
    // entry point's (symbol_address is the start of the function a frame
    // is in, from the unwind tables: no symbols are read).
    let entries = [
        <Sampler as GlobalAlloc>::alloc as unsafe fn(&Sampler, Layout) -> *mut u8 as usize,
        <Sampler as GlobalAlloc>::alloc_zeroed as unsafe fn(&Sampler, Layout) -> *mut u8 as usize,
        <Sampler as GlobalAlloc>::realloc as unsafe fn(&Sampler, *mut u8, Layout, usize) -> *mut u8
            as usize,
    ];
    let mut stack = [0usize; DEPTH];
    let mut n = 0;
    let mut skipped = 0;
    let mut inside = true;
    let mut entered = false;
    // SAFETY: libgcc's unwinder is thread-safe; the closure writes only
    // into locals and allocates nothing.
    unsafe {
        backtrace::trace_unsynchronized(|frame| {
            if inside {
                // Up to the entry point. What called it comes next: the
                // `__rust_alloc` shim where it has a frame of its own (a
                // debug build; the profile's drop_frames hides it), else
                // the code that allocated (a release build, where the
                // shim jumps to the entry point).
                let entry = entries.contains(&(frame.symbol_address() as usize));
                if entered && !entry {
                    inside = false;
                } else {
                    entered |= entry;
                    skipped += 1;
                    // Not found near the top (an unwinder that cannot
                    // tell functions apart): no sample rather than a
                    // wrong one.
                    return skipped < 16;
                }
            }
            // Return addresses, less one to fall inside their calls.
            stack[n] = (frame.ip() as usize).saturating_sub(1);
            n += 1;
            n < DEPTH
        });
    }
    if n == 0 {
        MISSED.fetch_add(1, Ordering::Relaxed);
    } else {
        record(addr, size, &stack[..n]);
    }
    let _ = SAMPLING.try_with(|s| s.set(false));
}

/// An exponentially distributed distance of mean [`RATE`], so that the
/// samples do not beat with a program's allocation pattern.
fn next_distance() -> isize {
    let x = SEED
        .try_with(|s| {
            let mut x = s.get();
            if x == 0 {
                // Any odd value per thread will do: the address of this
                // thread's state.
                x = (s as *const Cell<u64> as u64) | 1;
            }
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            s.set(x);
            x
        })
        .unwrap_or(0x2545_F491_4F6C_DD1D);
    // Uniform in (0, 1], then the exponential's inverse.
    let u = ((x >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
    let rate = rate() as f64;
    let d = -u.ln() * rate;
    d.clamp(1.0, 16.0 * rate) as isize
}

fn record(addr: usize, size: usize, stack: &[usize]) {
    let b = bucket(addr) * WAYS;
    for i in b..b + WAYS {
        if ADDRS[i]
            .compare_exchange(FREE, BUSY, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
        {
            SIZES[i].store(size, Ordering::Relaxed);
            for (d, s) in STACKS[i].iter().enumerate() {
                s.store(stack.get(d).copied().unwrap_or(0), Ordering::Relaxed);
            }
            ADDRS[i].store(addr, Ordering::Release);
            return;
        }
    }
    MISSED.fetch_add(1, Ordering::Relaxed);
}

#[inline]
fn forget(addr: usize) {
    let b = bucket(addr) * WAYS;
    for slot in &ADDRS[b..b + WAYS] {
        if slot.load(Ordering::Relaxed) == addr {
            let _ = slot.compare_exchange(addr, FREE, Ordering::Release, Ordering::Relaxed);
            return;
        }
    }
}

/// Calls `f` with the size and stack (return addresses, innermost first)
/// of every sampled allocation still in use.
pub fn for_each_live(mut f: impl FnMut(usize, &[usize])) {
    let mut stack = [0usize; DEPTH];
    for i in 0..SLOTS {
        let a = ADDRS[i].load(Ordering::Acquire);
        if a == FREE || a == BUSY {
            continue;
        }
        let size = SIZES[i].load(Ordering::Relaxed);
        let mut n = 0;
        for (d, s) in STACKS[i].iter().enumerate() {
            stack[d] = s.load(Ordering::Relaxed);
            if stack[d] != 0 {
                n = d + 1;
            }
        }
        f(size, &stack[..n]);
    }
}

/// Whether this thread is taking a heap sample (the CPU sampler's signal
/// handler then leaves it alone).
pub(super) fn sampling() -> bool {
    SAMPLING.try_with(|s| s.get()).unwrap_or(true)
}

/// Samples left out since start: their bucket was full, or their stack
/// unknown.
pub fn missed() -> usize {
    MISSED.load(Ordering::Relaxed)
}

// The unit tests of `profile` need the sampler as their allocator.
#[cfg(test)]
#[global_allocator]
static TEST_ALLOCATOR: Sampler = Sampler;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_freed_allocation_is_forgotten() {
        // Over the largest distance between samples: sampled for sure.
        let size = 16 * RATE + 1;
        let big = vec![1u8; size];
        let addr = big.as_ptr() as usize;
        // This allocation's sample: its address and its size (another
        // test may get the address back once it is freed).
        let live = |a: usize| {
            (0..SLOTS).any(|i| {
                ADDRS[i].load(Ordering::Relaxed) == a && SIZES[i].load(Ordering::Relaxed) == size
            })
        };
        assert!(live(addr));
        let mut stacks = 0;
        for_each_live(|s, stack| {
            if s == size {
                stacks += 1;
                assert!(!stack.is_empty());
            }
        });
        assert!(stacks >= 1);
        drop(big);
        assert!(!live(addr));
    }

    #[test]
    fn distances_average_the_rate() {
        let n = 20_000;
        let sum: f64 = (0..n).map(|_| next_distance() as f64).sum();
        let mean = sum / n as f64;
        assert!(
            (0.9 * RATE as f64..1.1 * RATE as f64).contains(&mean),
            "{mean}"
        );
    }

    #[test]
    fn buckets_spread_addresses() {
        let mut seen = std::collections::HashSet::new();
        for i in 0..4096usize {
            seen.insert(bucket(0x5555_0000_0000 + i * 64));
        }
        assert!(seen.len() > BUCKETS * 3 / 4, "{}", seen.len());
    }
}
