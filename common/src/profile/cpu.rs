//! The CPU sampler behind CPU profiles: SIGPROF every 10 ms of the
//! process's CPU time (`setitimer(ITIMER_PROF)`), and a handler that
//! writes the interrupted thread's stack into a fixed table.
//!
//! pprof-rs does the same, but keeps its samples in a temporary file it
//! creates at every start and stop: smtpd and monitord may open no file
//! after their lockdown, so it could profile each process once.
//!
//! # Why this is sound
//!
//! - The handler is async-signal-safe: it reads and writes static atomics
//!   and a thread-local flag (a plain TLS access: no destructor, no lazy
//!   initialisation), unwinds with libgcc's unwinder into a local array
//!   (which allocates nothing; pprof-rs relies on the same), and restores
//!   `errno`, which the unwinder may change under the interrupted code.
//! - It does nothing while no profile runs, or on a thread taking a heap
//!   sample (one unwind inside another).
//! - It is installed once and never removed, with `SA_RESTART`, so a
//!   signal arriving after a profile ends (a timer's last tick) finds it
//!   there and returns, instead of SIGPROF's default, which would end the
//!   process; and a system call it interrupts is restarted.
//! - `setitimer` and `sigaction` are called with valid, fully initialised
//!   arguments; they cannot touch memory of ours otherwise.
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
    let errno = Errno::last_raw();
    let pc = interrupted_pc(context);
    // The frames of this handler and the kernel's trampoline come first:
    // the stack starts at the interrupted instruction (all of it, where
    // it is not known).
    let mut found = pc == 0;
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
            let at = if n == 0 && pc != 0 {
                ip
            } else {
                ip.saturating_sub(1)
            };
            STACKS[i][n].store(at, Ordering::Relaxed);
            n += 1;
            n < DEPTH
        });
    }
    if n == 0 && pc != 0 {
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
        assert!(start().unwrap());
        assert!(!start().unwrap());
        // Half a second of CPU: about 50 samples.
        let t = std::time::Instant::now();
        let mut x = 0u64;
        while t.elapsed() < Duration::from_millis(500) {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
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
}
