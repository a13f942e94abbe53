//! The CPU sampler behind CPU profiles: SIGPROF every 10 ms of the
//! process's CPU time (`setitimer(ITIMER_PROF)`), and a handler that
//! writes the interrupted thread's stack into a fixed static table.
//!
//! pprof-rs does the same, but keeps its samples in a temporary file it
//! creates at every start and stop: smtpd and monitord may open no file
//! after their lockdown, so it could profile each process once.
//!
//! # Why this is sound
//!
//! - The handler unwinds only when the signal interrupted this program's
//!   own code (the executable's text, noted by [`set_own_code`] at
//!   startup). Interrupted inside libc, the dynamic loader, libgcc or the
//!   vDSO, it records the instruction alone: those may hold the state the
//!   unwinder itself uses (an older libgcc's `dl_iterate_phdr` cache, a
//!   loader lock), which pprof-rs avoids the same way (its block list).
//!   The unwinder is libgcc's, which allocates nothing; with glibc 2.35
//!   and libgcc 12 (Debian 12) it finds unwind tables with
//!   `_dl_find_object`, which takes no lock at all.
//! - Otherwise the handler reads and writes static atomics and a
//!   thread-local flag (a plain TLS access: no destructor, no lazy
//!   initialisation), and restores `errno`, which the unwinder may change
//!   under the interrupted code.
//! - It does nothing while no profile runs, or on a thread taking a heap
//!   sample (one unwind inside another).
//! - It is installed once and never removed, so a signal arriving after a
//!   profile ends (a timer's last tick) finds it there and returns,
//!   instead of SIGPROF's default, which would end the process.
//!   `SA_RESTART` restarts the calls that can be; the others (`epoll_wait`,
//!   `nanosleep`…) return `EINTR`, which tokio and std retry.
//! - `setitimer` and `sigaction` are called with valid, fully initialised
//!   arguments; they cannot touch memory of ours otherwise.
//!
//! What the unwinder cannot protect against is unwind tables that lie:
//! hand-written assembly (ring's) in this executable carries its own
//! CFI, as it must for panics to cross it.
//!
//! A sample being written when the profile is read is skipped: its length
//! is published last.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use nix::errno::Errno;
use nix::libc;
use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};

/// Samples a second of CPU time.
pub const HZ: u64 = 100;

/// Frames kept per sample, innermost first.
pub const DEPTH: usize = 48;

/// Samples kept per profile: a minute on 2 busy cores, and more; beyond,
/// samples are counted and left out.
const SLOTS: usize = 16 * 1024;

static RUNNING: AtomicBool = AtomicBool::new(false);
/// The executable's own code, where unwinding from the handler is safe
/// (0..0: nowhere, so nothing is unwound).
static OWN_START: AtomicUsize = AtomicUsize::new(0);
static OWN_LIMIT: AtomicUsize = AtomicUsize::new(0);

/// Notes where this program's own code is (at startup).
pub fn set_own_code(start: usize, limit: usize) {
    OWN_START.store(start, Ordering::Relaxed);
    OWN_LIMIT.store(limit, Ordering::Release);
}
static NEXT: AtomicUsize = AtomicUsize::new(0);
static DROPPED: AtomicUsize = AtomicUsize::new(0);
static LENS: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(0) }; SLOTS];
static STACKS: [[AtomicUsize; DEPTH]; SLOTS] =
    [const { [const { AtomicUsize::new(0) }; DEPTH] }; SLOTS];

/// Whether the handler is installed (once, for the process's life).
static INSTALLED: Mutex<bool> = Mutex::new(false);

extern "C" fn on_sigprof(_: libc::c_int, _: *mut libc::siginfo_t, context: *mut libc::c_void) {
    if !RUNNING.load(Ordering::Relaxed) || super::heap::sampling() {
        return;
    }
    let i = NEXT.fetch_add(1, Ordering::Relaxed);
    if i >= SLOTS {
        DROPPED.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let pc = interrupted_pc(context);
    let own = (OWN_START.load(Ordering::Relaxed)..OWN_LIMIT.load(Ordering::Acquire)).contains(&pc);
    if !own {
        // Time spent elsewhere (libc, the loader, the vDSO, or an unknown
        // instruction): counted, where it was, without unwinding.
        STACKS[i][0].store(pc, Ordering::Relaxed);
        LENS[i].store(usize::from(pc != 0), Ordering::Release);
        return;
    }
    let errno = Errno::last_raw();
    // The frames of this handler and the kernel's trampoline come first:
    // the stack starts at the interrupted instruction.
    let mut found = false;
    let mut n = 0;
    // SAFETY: see the module's comment: libgcc's unwinder, writing into
    // static atomics.
    unsafe {
        backtrace::trace_unsynchronized(|frame| {
            let ip = frame.ip() as usize;
            if !found {
                found = ip == pc;
                if !found {
                    return true;
                }
            }
            // The interrupted instruction itself, then return addresses,
            // less one to fall inside their calls.
            let at = if n == 0 { ip } else { ip.saturating_sub(1) };
            STACKS[i][n].store(at, Ordering::Relaxed);
            n += 1;
            n < DEPTH
        });
    }
    if n == 0 {
        // The unwinder did not get past the signal frame: the instruction
        // alone still says where the time went.
        STACKS[i][0].store(pc, Ordering::Relaxed);
        n = 1;
    }
    LENS[i].store(n, Ordering::Release);
    Errno::set_raw(errno);
}

/// The instruction the signal interrupted, from the context the kernel
/// passes to an `SA_SIGINFO` handler; 0 where it is not known.
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
fn interrupted_pc(context: *mut libc::c_void) -> usize {
    if context.is_null() {
        return 0;
    }
    // SAFETY: for an SA_SIGINFO handler the kernel passes a valid
    // ucontext_t, alive for the handler's run.
    unsafe {
        (*(context as *const libc::ucontext_t)).uc_mcontext.gregs[libc::REG_RIP as usize] as usize
    }
}

#[cfg(all(target_os = "linux", target_arch = "aarch64"))]
fn interrupted_pc(context: *mut libc::c_void) -> usize {
    if context.is_null() {
        return 0;
    }
    // SAFETY: as above.
    unsafe { (*(context as *const libc::ucontext_t)).uc_mcontext.pc as usize }
}

#[cfg(not(all(
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
)))]
fn interrupted_pc(_: *mut libc::c_void) -> usize {
    0
}

fn set_timer(every: Duration) -> Result<(), String> {
    let tv = libc::timeval {
        tv_sec: every.as_secs() as libc::time_t,
        tv_usec: every.subsec_micros() as libc::suseconds_t,
    };
    let timer = libc::itimerval {
        it_interval: tv,
        it_value: tv,
    };
    // SAFETY: a valid itimerval; the old value is not asked for.
    let r = unsafe { libc::setitimer(libc::ITIMER_PROF, &timer, std::ptr::null_mut()) };
    if r == 0 {
        Ok(())
    } else {
        Err(format!("setitimer: {}", Errno::last()))
    }
}

/// Starts sampling; false if a profile is already being taken.
pub fn start() -> Result<bool, String> {
    {
        let mut installed = INSTALLED.lock().unwrap_or_else(|e| e.into_inner());
        if !*installed {
            let action = SigAction::new(
                SigHandler::SigAction(on_sigprof),
                SaFlags::SA_RESTART | SaFlags::SA_SIGINFO,
                SigSet::empty(),
            );
            // SAFETY: the handler is async-signal-safe (module comment).
            unsafe { sigaction(Signal::SIGPROF, &action) }
                .map_err(|e| format!("sigaction(SIGPROF): {e}"))?;
            *installed = true;
        }
    }
    if RUNNING
        .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
        .is_err()
    {
        return Ok(false);
    }
    for l in &LENS {
        l.store(0, Ordering::Relaxed);
    }
    DROPPED.store(0, Ordering::Relaxed);
    NEXT.store(0, Ordering::Release);
    if let Err(e) = set_timer(Duration::from_micros(1_000_000 / HZ)) {
        RUNNING.store(false, Ordering::Release);
        return Err(e);
    }
    Ok(true)
}

/// Stops sampling and calls `f` with each sample's stack (the
/// interrupted instruction, then return addresses less one); gives the
/// samples left out.
pub fn stop(mut f: impl FnMut(&[usize])) -> usize {
    let _ = set_timer(Duration::ZERO);
    let taken = NEXT.load(Ordering::Acquire).min(SLOTS);
    let mut stack = [0usize; DEPTH];
    for i in 0..taken {
        let n = LENS[i].load(Ordering::Acquire).min(DEPTH);
        if n == 0 {
            continue;
        }
        for (d, s) in STACKS[i][..n].iter().enumerate() {
            stack[d] = s.load(Ordering::Relaxed);
        }
        f(&stack[..n]);
    }
    let dropped = DROPPED.load(Ordering::Relaxed);
    RUNNING.store(false, Ordering::Release);
    dropped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_code_is_sampled_and_a_second_start_refused() {
        // This test's own code is where stacks are unwound.
        let own = busy as *const () as usize;
        set_own_code(own.saturating_sub(1 << 26), own + (1 << 26));
        assert!(start().unwrap());
        assert!(!start().unwrap());
        // Until 20 samples are in (10 ms of CPU each), whatever the load.
        let t = std::time::Instant::now();
        while NEXT.load(Ordering::Relaxed) < 20 {
            assert!(t.elapsed() < Duration::from_secs(60), "no samples");
            busy();
        }
        let mut samples = 0;
        let mut deepest = 0;
        stop(|s| {
            samples += 1;
            deepest = deepest.max(s.len());
        });
        assert!(samples >= 20, "{samples}");
        assert!(deepest >= 3, "{deepest}");
        // And again, once it is done.
        assert!(start().unwrap());
        stop(|_| {});
    }

    #[inline(never)]
    fn busy() {
        let mut x = 0u64;
        for _ in 0..100_000 {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
    }
}
