//! Kernel events that tell who owns a flow, read without eBPF: tracepoints
//! through `perf_event_open`, their layouts from tracefs.
//!
//! - [`format`] (pure): a tracepoint's `format` file → field offsets.
//! - [`decode`] (pure): a raw record → an [`decode::Event`].
//! - [`perf`]: the rings (the only unsafe, system-call side).
//! - [`merge`] (pure): the rings' events in one time order, and the time
//!   up to which that order is final.
//! - [`Reader`]: one thread that drains the rings and hands every
//!   [`Sample`], in time order, to a [`Consumer`]; dropping the reader joins
//!   the thread and closes the perf descriptors, which disables the
//!   tracepoints.
//!
//! What the events mean for flows is not decided here: that is
//! [`crate::attribution`], the consumer.
//!
//! Needs tracefs (mounted here at /sys/kernel/tracing when it is not, which
//! takes CAP_SYS_ADMIN) and CAP_PERFMON or CAP_SYS_ADMIN for system-wide
//! tracepoints. Where either is missing, [`Reader::start`] says why.

pub mod decode;
pub mod format;
pub mod merge;
pub mod perf;

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use log::{debug, info};

use decode::{Decoded, Decoder, Tracepoint};
use format::Layout;
use merge::Merge;
use perf::{Record, Ring};

/// Where tracefs is looked for, in order.
const TRACEFS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];
/// How long the reader sleeps between looks while events come (less than
/// a capture block's timeout: packets wait little for events).
const POLL_INTERVAL: Duration = Duration::from_millis(2);
/// The same once a look found the rings empty. A busy service's steady
/// traffic, its busy sockets' reads left out in the kernel, makes no
/// events, and each wake-up of the reader is a switch away from the
/// service on a small machine (every 2 ms, then every 8 ms, the reader's
/// were most of the daemon's beside redis-benchmark). What waits for events
/// does not wait for this: a packet that needs the events read up to its
/// time hurries the reader ([`Hurry`]), and a ring filling to its
/// watermark wakes it.
const QUIET_POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Tracepoints a reader cannot do without; the others add recall.
const REQUIRED: [Tracepoint; 2] = [Tracepoint::FibLookup, Tracepoint::SetState];

/// One event with its time and the process (thread group) and thread it
/// ran in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sample {
    pub at: SystemTime,
    pub pid: u32,
    pub tid: u32,
    pub decoded: Decoded,
}

/// What the reader hands its events to.
pub trait Consumer: Send + Sync + 'static {
    /// Events, in time order; every event that happened before `until` has
    /// now been handed over (called every round, with or without events).
    fn apply(&self, samples: &[Sample], until: SystemTime);
    /// Some events were lost: a ring overflowed.
    fn lost(&self, count: u64);
}

/// The reader thread; the tracepoints are enabled while it lives.
pub struct Reader {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    hurry: Hurry,
}

/// Makes the reader look at its rings now rather than when due: for a
/// packet that waits for the events up to its time.
#[derive(Clone)]
pub struct Hurry {
    wake: Arc<OwnedFd>,
    /// Set while a wake-up is on its way: a burst of waiting packets
    /// writes the eventfd once.
    asked: Arc<AtomicBool>,
}

impl Hurry {
    fn new() -> std::io::Result<Hurry> {
        use rustix::event::{EventfdFlags, eventfd};
        Ok(Hurry {
            wake: Arc::new(eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?),
            asked: Arc::new(AtomicBool::new(false)),
        })
    }

    pub fn hurry(&self) {
        if !self.asked.swap(true, Ordering::AcqRel) {
            // An eventfd's counter only saturates after 2^64 - 2 writes.
            let _ = rustix::io::write(&*self.wake, &1u64.to_ne_bytes());
        }
    }

    /// The reader woke: a later packet asks again.
    fn answered(&self) {
        if self.asked.swap(false, Ordering::AcqRel) {
            let mut counter = [0u8; 8];
            let _ = rustix::io::read(&*self.wake, &mut counter);
        }
    }
}

/// Changes which events of a tracepoint reach the rings, while the reader
/// runs: asking the kernel for less where the consumer needs less. The
/// kernel takes a filter once per event, so a new filter is a new event
/// into the same ring, and the old one is disabled.
pub struct FilterHandle {
    /// Per tracepoint its id, and on every CPU the ring's first event (to
    /// write into) and the tracepoint's event now.
    events: Vec<(Tracepoint, u64, Vec<FilteredEvent>)>,
}

struct FilteredEvent {
    cpu: i32,
    ring: OwnedFd,
    current: OwnedFd,
}

impl FilterHandle {
    /// Lets only events matching `filter` (an ftrace filter expression) of
    /// `point` into the rings, on every CPU.
    /// [`decode::NOTHING`] disables the event instead: a tracepoint whose
    /// event is enabled costs each of its hits a record and a filter run
    /// (`sk_data_ready` is hit by every TCP segment), a disabled one next
    /// to nothing.
    pub fn set(&mut self, point: Tracepoint, filter: &str) -> std::io::Result<()> {
        for (_, id, events) in self
            .events
            .iter_mut()
            .filter(|(known, _, _)| *known == point)
        {
            for event in events.iter_mut() {
                if filter == decode::NOTHING {
                    perf::disable(&event.current);
                    continue;
                }
                let replacement = perf::open_into(*id, event.cpu, filter, &event.ring)?;
                perf::disable(&event.current);
                event.current = replacement;
            }
        }
        Ok(())
    }

    /// Whether the reader reads `point` at all (this kernel has it).
    pub fn reads(&self, point: Tracepoint) -> bool {
        self.events.iter().any(|(known, _, _)| *known == point)
    }
}

impl Reader {
    /// Opens the tracepoints on every CPU and starts reading them into
    /// `consumer`; the handle changes their filters. Err: why events
    /// cannot be had here.
    pub fn start(consumer: Arc<dyn Consumer>) -> Result<(Reader, FilterHandle), String> {
        let tracefs = tracefs()?;
        let mut decoder = Decoder::default();
        let mut ids = Vec::new();
        let mut points = Vec::new();
        for point in Tracepoint::ALL {
            match read_tracepoint(&tracefs, point)
                .and_then(|(id, layout)| decoder.learn(point, id, &layout).map(|()| id))
            {
                Ok(id) => {
                    ids.push((u64::from(id), point.kernel_filter()));
                    points.push(point);
                }
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
        // The tracepoints a consumer narrows as it goes; the first (the
        // state changes, whose event owns each ring's mapping) never is.
        let mut events = Vec::new();
        for (index, point) in points.iter().enumerate().skip(1) {
            if !point.narrowed() {
                continue;
            }
            let mut on_cpus = Vec::new();
            for (ring, &cpu) in rings.iter().zip(&cpus) {
                let (Some(first), Some(current)) = (ring.event_fd(0), ring.event_fd(index)) else {
                    continue;
                };
                let (Ok(ring), Ok(current)) = (first.try_clone(), current.try_clone()) else {
                    continue;
                };
                on_cpus.push(FilteredEvent { cpu, ring, current });
            }
            events.push((*point, ids[index].0, on_cpus));
        }
        let mut handle = FilterHandle { events };
        for point in &points {
            if point.off_until_asked() {
                // Nothing is wanted yet: not even hit until it is.
                handle
                    .set(*point, decode::NOTHING)
                    .map_err(|err| format!("cannot disable tracepoint {}: {err}", point.path()))?;
            }
        }
        let stop = Arc::new(AtomicBool::new(false));
        let reader_stop = Arc::clone(&stop);
        let hurry = Hurry::new().map_err(|err| format!("cannot make an eventfd: {err}"))?;
        let reader_hurry = hurry.clone();
        let thread = std::thread::Builder::new()
            .name("kernel-events".into())
            .spawn(move || read(rings, &decoder, &*consumer, &reader_stop, &reader_hurry))
            .map_err(|err| format!("cannot start a thread: {err}"))?;
        info!(
            "kernel events: {} tracepoints on {} CPUs from {}",
            ids.len(),
            cpus.len(),
            tracefs.display()
        );
        Ok((
            Reader {
                stop,
                thread: Some(thread),
                hurry,
            },
            handle,
        ))
    }
}

impl Reader {
    /// What makes the reader look now.
    pub fn hurry(&self) -> &Hurry {
        &self.hurry
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        debug!("kernel events: stopped, tracepoints disabled");
    }
}

/// The reader: drains every ring, hands over what it decodes in time
/// order ([`merge`]), sleeps on poll.
fn read(
    mut rings: Vec<Ring>,
    decoder: &Decoder,
    consumer: &dyn Consumer,
    stop: &AtomicBool,
    hurry: &Hurry,
) {
    // By monotonic ns: (pid, tid, event), not yet handed over.
    let mut pending: Merge<(u32, u32, Decoded)> = Merge::default();
    let mut merged = Vec::new();
    let mut ready: Vec<Sample> = Vec::new();
    let mut quiet = false;
    let mut late_told = (0, None);
    while !stop.load(Ordering::SeqCst) {
        {
            use rustix::event::{PollFd, PollFlags, Timespec, poll};
            let mut fds: Vec<PollFd<'_>> = rings
                .iter()
                .map(|ring| PollFd::new(ring.poll_fd(), PollFlags::IN))
                .collect();
            fds.push(PollFd::new(&*hurry.wake, PollFlags::IN));
            let interval = if quiet {
                QUIET_POLL_INTERVAL
            } else {
                POLL_INTERVAL
            };
            let timeout = Timespec {
                tv_sec: 0,
                tv_nsec: interval.as_nanos() as i64,
            };
            let _ = poll(&mut fds, Some(&timeout));
        }
        // Before the drain: a packet that asks from now on gets another.
        hurry.answered();
        let clock = Clock::now();
        let mut lost = 0;
        let mut records = 0usize;
        for ring in &mut rings {
            ring.drain(|record| match perf::parse_record(record) {
                Some(Record::Sample {
                    pid,
                    tid,
                    time,
                    raw,
                }) => {
                    records += 1;
                    if let Some(decoded) = decoder.decode(raw) {
                        pending.push(time, (pid, tid, decoded));
                    }
                }
                Some(Record::Lost(count)) => lost += count,
                Some(Record::Other) | None => {}
            });
        }
        if lost > 0 {
            consumer.lost(lost);
        }
        quiet = records == 0 && lost == 0 && pending.is_empty();
        let covered = pending.take(clock.monotonic_ns, &mut merged);
        ready.clear();
        ready.extend(merged.drain(..).map(|(time, (pid, tid, decoded))| Sample {
            at: clock.wall(time),
            pid,
            tid,
            decoded,
        }));
        consumer.apply(&ready, clock.wall(covered));
        tell_late(&pending, &mut late_told);
    }
}

/// Says, at most once a minute, that events came after the time they were
/// stamped at had been taken as covered: a packet decided meanwhile may
/// have missed what they said. `told` is how many were told of, and when.
fn tell_late<T>(pending: &Merge<T>, told: &mut (u64, Option<std::time::Instant>)) {
    let (late, most_late_ns) = pending.late();
    if late == told.0
        || told
            .1
            .is_some_and(|at| at.elapsed() < Duration::from_secs(60))
    {
        return;
    }
    info!(
        "kernel events: {} events reached the reader after their time had been taken as \
         covered ({late} since the start, at most {:.1} us late): a flow decided meanwhile may \
         have gone to the wrong process",
        late - told.0,
        most_late_ns as f64 / 1_000.0
    );
    *told = (late, Some(std::time::Instant::now()));
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
    for dir in TRACEFS.iter().map(Path::new) {
        match std::fs::metadata(dir.join("events")) {
            Ok(events) if events.is_dir() => return Ok(dir.to_path_buf()),
            Err(err) if err.kind() == std::io::ErrorKind::PermissionDenied => {
                return Err(not_open(dir));
            }
            _ => {}
        }
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

/// Why a tracefs that is mounted cannot be used: its mode keeps this user
/// out (tracefs is mode 0700 by default).
fn not_open(dir: &Path) -> String {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir)
        .map(|metadata| format!("mode {:04o}", metadata.permissions().mode() & 0o7777))
        .unwrap_or_else(|_| "its mode".to_owned());
    format!(
        "tracefs at {} is not open to uid {} ({mode}); grant netstatfs \
         cap_dac_read_search (setcap, as the package does), or as root: chmod 0755 {}",
        dir.display(),
        nix::unistd::geteuid(),
        dir.display()
    )
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
