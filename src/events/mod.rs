//! Kernel events that tell who owns a flow, read without eBPF: tracepoints
//! through `perf_event_open`, their layouts from tracefs.
//!
//! - [`format`] (pure): a tracepoint's `format` file → field offsets.
//! - [`decode`] (pure): a raw record → an [`decode::Event`].
//! - [`perf`]: the rings (the only unsafe, system-call side).
//! - [`KernelEvents`]: one reader thread that feeds a shared
//!   [`FlowOwners`], running only while some `all` or `tree` stream holds
//!   a [`Subscription`]; when the last one is dropped the thread is joined
//!   and the perf descriptors closed, which disables the tracepoints.
//!
//! Needs tracefs (mounted here at /sys/kernel/tracing when it is not, which
//! takes CAP_SYS_ADMIN) and CAP_PERFMON or CAP_SYS_ADMIN for system-wide
//! tracepoints. Where either is missing, [`KernelEvents::subscribe`] says
//! why and the streams fall back to following /proc.

pub mod decode;
pub mod format;
pub mod perf;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use log::{debug, info, warn};

use crate::capture::attribution::{FlowOwners, Sample};
use decode::{Decoder, Tracepoint};
use format::Layout;
use perf::{Record, Ring};

/// Where tracefs is looked for, in order.
const TRACEFS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];
/// How long the reader sleeps between looks when the rings are quiet
/// (about a capture block's timeout: packets wait no longer for events).
const POLL_INTERVAL: Duration = Duration::from_millis(2);
/// How often old claims are forgotten.
const PRUNE_INTERVAL: Duration = Duration::from_secs(5);

/// Tracepoints a subscription cannot do without; the others add recall.
const REQUIRED: [Tracepoint; 2] = [Tracepoint::FibLookup, Tracepoint::SetState];

/// The daemon's one source of kernel events.
#[derive(Default)]
pub struct KernelEvents {
    running: Mutex<Weak<Running>>,
}

/// What a stream holds while it uses the events.
pub type Subscription = Arc<Running>;

impl KernelEvents {
    /// The running reader, started if none runs. Err: why events cannot be
    /// had here (the caller falls back to /proc and says so).
    pub fn subscribe(&self) -> Result<Subscription, String> {
        let mut slot = self.running.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(running) = slot.upgrade() {
            return Ok(running);
        }
        let running = Arc::new(Running::start()?);
        *slot = Arc::downgrade(&running);
        Ok(running)
    }
}

/// The reader thread and what it learns.
pub struct Running {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

struct Shared {
    owners: RwLock<FlowOwners>,
    stop: AtomicBool,
    lost: AtomicU64,
    /// Wall-clock nanoseconds before which every event has been applied.
    applied_until_ns: AtomicU64,
}

impl Running {
    fn start() -> Result<Running, String> {
        let tracefs = tracefs()?;
        let mut decoder = Decoder::default();
        let mut ids = Vec::new();
        for point in Tracepoint::ALL {
            match read_tracepoint(&tracefs, point)
                .and_then(|(id, layout)| decoder.learn(point, id, &layout).map(|()| id))
            {
                Ok(id) => ids.push(u64::from(id)),
                Err(err) if REQUIRED.contains(&point) => {
                    return Err(format!("tracepoint {} cannot be read: {err}", point.path()));
                }
                Err(err) => debug!("tracepoint {} left out: {err}", point.path()),
            }
        }
        let cpus = perf::online_cpus().map_err(|err| format!("cannot list CPUs: {err}"))?;
        let rings = cpus
            .iter()
            .map(|&cpu| Ring::open(cpu, &ids))
            .collect::<std::io::Result<Vec<Ring>>>()
            .map_err(|err| match err.raw_os_error() {
                Some(nix::libc::EACCES | nix::libc::EPERM) => format!(
                    "perf_event_open refused ({err}): system-wide tracepoints need CAP_PERFMON or CAP_SYS_ADMIN"
                ),
                _ => format!("perf_event_open failed: {err}"),
            })?;
        let shared = Arc::new(Shared {
            owners: RwLock::new(FlowOwners::ignoring(std::process::id())),
            stop: AtomicBool::new(false),
            lost: AtomicU64::new(0),
            applied_until_ns: AtomicU64::new(0),
        });
        let reader_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("kernel-events".into())
            .spawn(move || read(rings, &decoder, &reader_shared))
            .map_err(|err| format!("cannot start a thread: {err}"))?;
        info!(
            "kernel events: {} tracepoints on {} CPUs from {}",
            ids.len(),
            cpus.len(),
            tracefs.display()
        );
        Ok(Running {
            shared,
            thread: Some(thread),
        })
    }

    /// The time before which every event has been applied to
    /// [`Running::owners`]: what they do not say of a packet older than
    /// this, no event yet to be read will say.
    pub fn applied_until(&self) -> SystemTime {
        SystemTime::UNIX_EPOCH
            + Duration::from_nanos(self.shared.applied_until_ns.load(Ordering::Acquire))
    }

    /// What the events have told so far.
    pub fn owners(&self) -> RwLockReadGuard<'_, FlowOwners> {
        self.shared
            .owners
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let lost = self.shared.lost.load(Ordering::Relaxed);
        if lost > 0 {
            warn!("kernel events: {lost} events were lost (the rings overflowed)");
        }
        debug!("kernel events: stopped, tracepoints disabled");
    }
}

/// The reader: drains every ring, applies what it decodes in time order,
/// sleeps on poll.
///
/// Each CPU has its ring, so one drain sees each CPU's events in order but
/// not the CPUs' interleaving; and the kernel reuses a closed socket's
/// address at once. Applied ring by ring, an old connection's last state
/// change from one CPU could land after a new socket's events from the
/// other at the same address, and be credited to the new socket's process.
/// So the events of every ring are merged and applied by time, up to the
/// moment the drain began: any event older than that was already in its
/// ring; newer ones wait for the next round.
fn read(mut rings: Vec<Ring>, decoder: &Decoder, shared: &Shared) {
    // (monotonic ns, pid, event), not yet applied.
    let mut pending: Vec<(u64, u32, decode::Decoded)> = Vec::new();
    let mut pruned = Instant::now();
    while !shared.stop.load(Ordering::SeqCst) {
        {
            use rustix::event::{PollFd, PollFlags, Timespec, poll};
            let mut fds: Vec<PollFd<'_>> = rings
                .iter()
                .map(|ring| PollFd::new(ring.poll_fd(), PollFlags::IN))
                .collect();
            let timeout = Timespec {
                tv_sec: 0,
                tv_nsec: POLL_INTERVAL.as_nanos() as i64,
            };
            let _ = poll(&mut fds, Some(&timeout));
        }
        let clock = Clock::now();
        let mut lost = 0;
        for ring in &mut rings {
            ring.drain(|record| match perf::parse_record(record) {
                Some(Record::Sample { pid, time, raw }) => {
                    if let Some(decoded) = decoder.decode(raw) {
                        pending.push((time, pid, decoded));
                    }
                }
                Some(Record::Lost(count)) => lost += count,
                Some(Record::Other) | None => {}
            });
        }
        if lost > 0 {
            shared.lost.fetch_add(lost, Ordering::Relaxed);
            shared
                .owners
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .forget_sockets();
        }
        pending.sort_by_key(|(time, _, _)| *time);
        let ready = pending.partition_point(|(time, _, _)| *time <= clock.monotonic_ns);
        if ready > 0 || pruned.elapsed() >= PRUNE_INTERVAL {
            let mut owners = shared
                .owners
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            for (time, pid, decoded) in pending.drain(..ready) {
                owners.apply(&Sample {
                    at: clock.wall(time),
                    pid,
                    decoded,
                });
            }
            if pruned.elapsed() >= PRUNE_INTERVAL {
                owners.prune();
                pruned = Instant::now();
            }
        }
        // Every event before the drain began was in its ring by then.
        let until = clock
            .wall
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |since| {
                u64::try_from(since.as_nanos()).unwrap_or(u64::MAX)
            });
        shared.applied_until_ns.store(until, Ordering::Release);
    }
}

/// Turns the events' CLOCK_MONOTONIC times into wall-clock times, as
/// packets carry.
struct Clock {
    monotonic_ns: u64,
    wall: SystemTime,
}

impl Clock {
    fn now() -> Clock {
        let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
        Clock {
            monotonic_ns: (now.tv_sec as u64) * 1_000_000_000 + now.tv_nsec as u64,
            wall: SystemTime::now(),
        }
    }

    fn wall(&self, monotonic_ns: u64) -> SystemTime {
        let before = Duration::from_nanos(self.monotonic_ns.saturating_sub(monotonic_ns));
        let after = Duration::from_nanos(monotonic_ns.saturating_sub(self.monotonic_ns));
        self.wall - before + after
    }
}

/// Where tracefs is, mounting it where it is not (and we may).
fn tracefs() -> Result<PathBuf, String> {
    let mounted = |dir: &Path| dir.join("events").is_dir();
    if let Some(found) = TRACEFS.iter().map(Path::new).find(|dir| mounted(dir)) {
        return Ok(found.to_path_buf());
    }
    let target = Path::new(TRACEFS[0]);
    nix::mount::mount(
        Some("nodev"),
        target,
        Some("tracefs"),
        nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV | nix::mount::MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(|err| {
        format!(
            "tracefs is not mounted and cannot be ({err}); mount it with: mount -t tracefs nodev {}",
            target.display()
        )
    })?;
    info!("mounted tracefs at {}", target.display());
    Ok(target.to_path_buf())
}

/// A tracepoint's id and layout.
fn read_tracepoint(tracefs: &Path, point: Tracepoint) -> Result<(u16, Layout), String> {
    let dir = tracefs.join("events").join(point.path());
    let read = |name: &str| {
        std::fs::read_to_string(dir.join(name))
            .map_err(|err| format!("{}: {err}", dir.join(name).display()))
    };
    let id = read("id")?
        .trim()
        .parse()
        .map_err(|err| format!("{}/id: {err}", dir.display()))?;
    Ok((id, Layout::parse(&read("format")?)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_maps_monotonic_to_wall_time() {
        let clock = Clock {
            monotonic_ns: 10_000_000_000,
            wall: SystemTime::UNIX_EPOCH + Duration::from_secs(1_000),
        };
        assert_eq!(
            clock.wall(9_000_000_000),
            SystemTime::UNIX_EPOCH + Duration::from_secs(999)
        );
        assert_eq!(
            clock.wall(10_000_000_500),
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_000) + Duration::from_nanos(500)
        );
    }
}
