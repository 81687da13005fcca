//! A hint to the CPU scheduler that the daemon's work is short and due at
//! once.
//!
//! The daemon's threads sleep until a piece of work arrives, do it in well
//! under a millisecond and sleep again: a capture thread copies one kernel
//! block of packets out of the ring, the FUSE thread answers one read. When
//! the traffic being captured keeps every core busy (a loopback flow at full
//! speed does), the scheduler's default slice (several milliseconds on
//! Linux's EEVDF) lets the flow run on while a woken capture thread waits,
//! and the 2 MiB ring overflows in well under a millisecond.
//!
//! Since Linux 6.12 a thread may ask for a shorter slice (the `sched_runtime`
//! of `sched_setattr` for a normal thread). That gives it no more CPU, only
//! earlier turns: a waking thread with a shorter slice than the running one
//! preempts it. It needs no privilege. Measured on a 2-core machine with a
//! 3 GB/s loopback flow (`scripts/bench.sh --only capture`): the share of
//! packets a `cat` of the socket file keeps went from 0.58-0.63 to 0.64-0.72,
//! for the same CPU. Older kernels accept the call and ignore the slice. A
//! daemon started with `nice` keeps its nice value; one started under
//! `chrt` (batch, idle or real-time) is left as the user set it.
//!
//! A process's `all` stream keeps the default slice for its tracker and its
//! capture threads: its packets wait until the tracker has named their
//! socket, and the tracker's scans of /proc/<pid>/fd come in longer bursts.
//! With short slices there the recall of long-lived TCP flows dipped to
//! 0.996-0.998 in 5 of 11 accuracy runs (2 of 5 with only the tracker back at
//! the default); with both at the default, 1.000 in 7 of 7, as before.

use log::debug;

/// The shortest slice Linux allows (it clamps to 0.1-100 ms).
const SLICE_NS: u64 = 100_000;

/// Asks for short slices for the calling thread and every thread it starts
/// from now on (threads inherit it). Best effort: a kernel that refuses is
/// only logged.
pub fn prefer_short_slices() {
    set_slice(SLICE_NS);
}

/// Back to the default slice, for the `all` stream's threads (see above).
pub fn prefer_default_slices() {
    set_slice(0);
}

/// Sets the calling thread's slice; 0 is the kernel's default. A thread
/// that is not a normal one (run under `chrt` as batch, idle or real-time)
/// is left as it is.
fn set_slice(runtime_ns: u64) {
    let size = std::mem::size_of::<libc::sched_attr>() as u32;
    let mut attr = libc::sched_attr {
        size,
        sched_policy: 0,
        sched_flags: 0,
        sched_nice: 0,
        sched_priority: 0,
        sched_runtime: 0,
        sched_deadline: 0,
        sched_period: 0,
    };
    // SAFETY: sched_getattr(2) on the calling thread (pid 0) writes at most
    // `size` bytes into `attr`, which is that large and outlives the call.
    let got = unsafe {
        libc::syscall(
            libc::SYS_sched_getattr,
            0,
            &mut attr as *mut libc::sched_attr,
            size,
            0,
        )
    };
    if got != 0 || attr.sched_policy != libc::SCHED_OTHER as u32 {
        return;
    }
    // Everything else as it was (the nice value in particular).
    attr.size = size;
    attr.sched_flags = 0;
    attr.sched_runtime = runtime_ns;
    // SAFETY: sched_setattr(2) on the calling thread reads a sched_attr
    // whose `size` names its length; `attr` outlives the call.
    let set = unsafe {
        libc::syscall(
            libc::SYS_sched_setattr,
            0,
            &attr as *const libc::sched_attr,
            0,
        )
    };
    if set != 0 {
        debug!(
            "the scheduler kept its slice (asked for {runtime_ns} ns): {}",
            std::io::Error::last_os_error()
        );
    }
}
