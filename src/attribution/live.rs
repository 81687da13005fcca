//! The daemon's one kernel events reader and what it has learned, shared
//! by every stream that subscribes: started with the first subscription,
//! stopped (tracepoints disabled) when the last is dropped.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard, Weak};
use std::time::{Duration, Instant, SystemTime};

use log::{debug, warn};

use super::bystanders::{Bystanders, Processes, Watched};
use super::deliveries::{Deliveries, Delivery, Io};
use super::owners::FlowOwners;
use super::probe;
use crate::events::decode::{Event, NOTHING, TCP_CLOSE, TCP_SYN_RECV, TCP_SYN_SENT, Tracepoint};
use crate::events::{Consumer, FilterHandle, Reader, Sample};

/// How often old claims and activity are forgotten.
const PRUNE_INTERVAL: Duration = Duration::from_secs(5);
/// How long a socket's address is kept after a stream last asked about it.
const INTEREST_KEPT: Duration = Duration::from_secs(60);
/// How often lost events are told in the log, at most.
const LOSS_REPORT_INTERVAL: Duration = Duration::from_secs(10);
/// A TCP socket that has been read this many times in a window, and so
/// claimed, is no longer read about: its later reads add nothing.
const BUSY_READS: u32 = 16;
/// How many such sockets the kernel filter leaves out at most (a filter
/// is a few instructions a socket).
const MAX_QUIET: usize = 64;
/// How often the filters change at most, and how long reads are counted.
const NARROWING_INTERVAL: Duration = Duration::from_millis(50);
/// How soon a socket leaving the quiet list is read about again (its
/// address taken by a new socket would hide the new one's first reads).
const URGENT_NARROWING_INTERVAL: Duration = Duration::from_millis(2);
const READS_WINDOW: Duration = Duration::from_secs(1);

/// The daemon's one source of kernel events.
#[derive(Default)]
pub struct KernelEvents {
    running: Mutex<Weak<Live>>,
}

/// What a stream holds while it uses the events.
pub type Subscription = Arc<Live>;

impl KernelEvents {
    /// The running reader, started if none runs. Err: why events cannot be
    /// had here (the caller falls back to /proc and says so).
    pub fn subscribe(&self) -> Result<Subscription, String> {
        let mut slot = self.running.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(running) = slot.upgrade() {
            return Ok(running);
        }
        let shared = Arc::new(Shared {
            owners: RwLock::new(FlowOwners::ignoring(std::process::id())),
            deliveries: RwLock::new(Deliveries::new(std::process::id())),
            applied_until_ns: AtomicU64::new(0),
            lost: AtomicU64::new(0),
            housekeeping: Mutex::new(Housekeeping {
                pruned: Instant::now(),
                reported: None,
                reported_lost: 0,
            }),
            interest: Mutex::new(HashMap::new()),
            narrowing: Mutex::new(Narrowing::new(std::process::id())),
            watched: Mutex::new(Registry::default()),
            wants_deliveries: Mutex::new(std::collections::HashSet::new()),
        });
        let (reader, filters) = Reader::start(Arc::clone(&shared) as Arc<dyn Consumer>)?;
        lock(&shared.narrowing).handle = Some(filters);
        let running = Arc::new(Live {
            shared,
            reader: Some(reader),
        });
        *slot = Arc::downgrade(&running);
        Ok(running)
    }
}

/// The running reader and what it learned.
pub struct Live {
    shared: Arc<Shared>,
    reader: Option<Reader>,
}

struct Shared {
    owners: RwLock<FlowOwners>,
    deliveries: RwLock<Deliveries>,
    /// Wall-clock nanoseconds before which every event has been applied.
    applied_until_ns: AtomicU64,
    lost: AtomicU64,
    housekeeping: Mutex<Housekeeping>,
    /// Sockets streams asked about, and when they last did.
    interest: Mutex<HashMap<u64, Instant>>,
    /// What the kernel is asked for, narrowed as the streams' needs go.
    narrowing: Mutex<Narrowing>,
    /// Sockets (inodes) whose deliveries a stream needs: their data-ready
    /// events are read.
    wants_deliveries: Mutex<std::collections::HashSet<u64>>,
    /// What each stream watches: its processes' UDP events are never left
    /// out (see [`super::bystanders`]).
    watched: Mutex<Registry>,
}

/// Processes as /proc shows them, for the bystanders' review.
struct OnProc;

/// A process with more fds than this is not looked at (the events reader
/// does the looking, and must not stall): its threads are always read.
const MOST_FDS_LOOKED_AT: usize = 4096;

impl Processes for OnProc {
    fn socket_inodes(&mut self, pid: u32) -> Option<Vec<u64>> {
        crate::inventory::socket_inodes(pid as i32, MOST_FDS_LOOKED_AT)
    }

    fn thread_alive(&mut self, pid: u32, tid: u32) -> bool {
        std::path::Path::new(&format!("/proc/{pid}/task/{tid}")).exists()
    }
}

/// The streams' watched processes and sockets, by watcher.
#[derive(Default)]
struct Registry {
    next: u64,
    by_watcher: HashMap<u64, (Vec<u32>, Vec<u64>)>,
    /// The processes changed since the bystanders were last reviewed: a
    /// new member is read about at once (its sockets, changing every few
    /// milliseconds on a busy server, wait for the next review).
    members_changed: bool,
}

impl Registry {
    fn union(&self) -> Watched {
        let mut watched = Watched::default();
        for (pids, inodes) in self.by_watcher.values() {
            watched.pids.extend(pids);
            watched.inodes.extend(inodes);
        }
        watched
    }
}

/// A stream's say in which processes' events are read: while it lives,
/// the processes and sockets it last named ([`Watcher::set`]) are never
/// taken for bystanders.
pub struct Watcher {
    live: Subscription,
    id: u64,
}

impl Watcher {
    /// The stream's processes now, and the sockets whose events it needs
    /// (its own and their rivals).
    pub fn set(&self, pids: Vec<u32>, inodes: Vec<u64>) {
        let mut registry = lock(&self.live.shared.watched);
        let entry = registry.by_watcher.entry(self.id).or_default();
        let members_changed = entry.0 != pids;
        *entry = (pids, inodes);
        registry.members_changed |= members_changed;
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        let mut registry = lock(&self.live.shared.watched);
        registry.by_watcher.remove(&self.id);
    }
}

/// Events the kernel is asked not to send: each busy TCP socket's reads
/// once it is claimed (a redis connection reads tens of thousands of times
/// a second, and its first read already told whose it is), and data-ready
/// events of every socket no stream needs the deliveries of.
struct Narrowing {
    handle: Option<FilterHandle>,
    /// Sockets (kernel addresses) whose reads are left out.
    quiet: Vec<u64>,
    /// Reads per socket in the current window.
    reads: HashMap<u64, u32>,
    window: Option<Instant>,
    /// Addresses whose data-ready events are read.
    delivered: Vec<u64>,
    changed: bool,
    /// A socket left the quiet list: its address may be a new socket's
    /// next, whose first reads must be told at once, not at the next
    /// interval.
    urgent: bool,
    applied: Option<Instant>,
    /// Busy threads of processes no stream watches: their UDP events are
    /// left out.
    bystanders: Bystanders,
    /// When they were last reviewed.
    reviewed: Option<Instant>,
    /// The clause leaving them out, as the filters have it now.
    bystanders_clause: String,
    /// Whether the send and receive lengths are read (see
    /// [`Narrowing::socket_io`]).
    socket_io: bool,
    /// When it was last asked whether they are still needed.
    socket_io_reviewed: Option<Instant>,
}

/// The tracepoints read only while a socket's kernel address is known or
/// asked for: what they tell is of such sockets only.
const SOCKET_IO: [Tracepoint; 2] = [Tracepoint::SendLength, Tracepoint::RecvLength];
/// How often the reader asks whether they are still needed.
const SOCKET_IO_REVIEW: Duration = Duration::from_secs(1);

impl Narrowing {
    fn new(own_pid: u32) -> Narrowing {
        Narrowing {
            handle: None,
            quiet: Vec::new(),
            reads: HashMap::new(),
            window: None,
            delivered: Vec::new(),
            changed: false,
            urgent: false,
            applied: None,
            bystanders: Bystanders::new(own_pid),
            reviewed: None,
            bystanders_clause: String::new(),
            socket_io: false,
            socket_io_reviewed: None,
        }
    }

    /// Turns the send and receive lengths on or off. They tell which
    /// process used a socket whose kernel address is known (a UDP socket
    /// of a stream's, and its rivals), and carry the probes' answers; every
    /// send and receive on the machine hits them, so they are on only while
    /// some address is known or asked for. Off, nothing is known of what
    /// sockets did meanwhile: the caller forgets what it knew.
    fn socket_io(&mut self, on: bool) {
        if self.socket_io == on {
            return;
        }
        let Some(handle) = self.handle.as_mut() else {
            return;
        };
        for point in SOCKET_IO {
            if !handle.reads(point) {
                continue;
            }
            let filter = match point.kernel_filter() {
                Some(base) if on => format!("{base}{}", self.bystanders_clause),
                _ => NOTHING.to_owned(),
            };
            if let Err(err) = handle.set(point, &filter) {
                debug!("kernel events: cannot filter {}: {err}", point.path());
            }
        }
        debug!(
            "kernel events: sends and receives {}",
            if on {
                "read (a socket's address is asked for)"
            } else {
                "no longer read (no stream asks about a socket's address)"
            }
        );
        self.socket_io = on;
    }

    /// Whether to ask now if the send and receive lengths are still needed.
    fn socket_io_review_due(&mut self) -> bool {
        let due = self.socket_io
            && self
                .socket_io_reviewed
                .is_none_or(|at| at.elapsed() >= SOCKET_IO_REVIEW);
        if due {
            self.socket_io_reviewed = Some(Instant::now());
        }
        due
    }

    /// Looks at the bystanders again where due (at once where the streams'
    /// processes changed).
    fn review_bystanders(&mut self, registry: &Mutex<Registry>) {
        let now = Instant::now();
        let watched = {
            let mut registry = lock(registry);
            let due = registry.members_changed
                || self
                    .reviewed
                    .is_none_or(|at| now.duration_since(at) >= NARROWING_INTERVAL);
            if !due {
                return;
            }
            registry.members_changed = false;
            registry.union()
        };
        self.reviewed = Some(now);
        let change = self.bystanders.review(now, &watched, &mut OnProc);
        if change.changed {
            let quiet: Vec<u32> = self.bystanders.quiet_threads().collect();
            if quiet.is_empty() {
                debug!("kernel events: every thread's UDP events are read again");
            } else {
                debug!(
                    "kernel events: UDP events of threads {quiet:?} left out (busy, and \
                     holding no socket a stream watches)"
                );
            }
        }
        self.changed |= change.changed;
        self.urgent |= change.urgent;
    }

    /// Takes the events just applied into account.
    fn note(&mut self, samples: &[Sample]) {
        self.bystanders.note(samples, Instant::now());
        if self
            .window
            .is_none_or(|start| start.elapsed() >= READS_WINDOW)
        {
            self.window = Some(Instant::now());
            self.reads.clear();
        }
        for sample in samples {
            match sample.decoded.event {
                Event::TcpReceive { sock, .. } if !sample.decoded.in_interrupt => {
                    let reads = self.reads.entry(sock).or_insert(0);
                    *reads += 1;
                    if *reads >= BUSY_READS
                        && self.quiet.len() < MAX_QUIET
                        && !self.quiet.contains(&sock)
                    {
                        self.quiet.push(sock);
                        self.changed = true;
                    }
                }
                // A socket starting or ending: its address may be a new
                // socket's next, whose first read must be told.
                Event::TcpState {
                    sock,
                    new_state: TCP_SYN_SENT | TCP_SYN_RECV | TCP_CLOSE,
                    ..
                } => {
                    if let Some(at) = self.quiet.iter().position(|quiet| *quiet == sock) {
                        self.quiet.swap_remove(at);
                        self.changed = true;
                        self.urgent = true;
                    }
                }
                _ => {}
            }
        }
    }

    /// The data-ready events wanted are those of `addresses`.
    fn deliver_for(&mut self, mut addresses: Vec<u64>) {
        addresses.sort_unstable();
        if addresses != self.delivered {
            self.delivered = addresses;
            self.changed = true;
        }
    }

    /// Whether the filters should change now, `since_applied` after they
    /// last did: what is wanted changed, and the interval passed (the short
    /// one when a socket left the quiet list).
    fn due(&self, since_applied: Option<Duration>) -> bool {
        let wait = if self.urgent {
            URGENT_NARROWING_INTERVAL
        } else {
            NARROWING_INTERVAL
        };
        self.changed && since_applied.is_none_or(|since| since >= wait)
    }

    /// Asks the kernel for what is wanted now, if it changed (at most every
    /// [`NARROWING_INTERVAL`]); the addresses whose data-ready events are
    /// read from now on, when that changed.
    fn apply(&mut self) -> Option<Vec<u64>> {
        if !self.due(self.applied.map(|at| at.elapsed())) {
            return None;
        }
        self.urgent = false;
        let handle = self.handle.as_mut()?;
        self.changed = false;
        self.applied = Some(Instant::now());
        let reads = if self.quiet.is_empty() {
            "skaddr != 0".to_owned()
        } else {
            self.quiet
                .iter()
                .map(|sock| format!("skaddr != {sock:#x}"))
                .collect::<Vec<_>>()
                .join(" && ")
        };
        let delivered = if self.delivered.is_empty() {
            NOTHING.to_owned()
        } else {
            format!(
                "protocol == 17 && ({})",
                self.delivered
                    .iter()
                    .map(|sock| format!("skaddr == {sock:#x}"))
                    .collect::<Vec<_>>()
                    .join(" || ")
            )
        };
        let mut watched = None;
        let mut filters = vec![
            (Tracepoint::RcvSpaceAdjust, reads),
            (Tracepoint::DataReady, delivered),
        ];
        let clause = self.bystanders.filter_clause();
        if clause != self.bystanders_clause {
            let points = [Tracepoint::FibLookup, Tracepoint::Fib6Lookup]
                .into_iter()
                .chain(self.socket_io.then_some(SOCKET_IO).into_iter().flatten());
            for point in points {
                if let Some(base) = point.kernel_filter() {
                    filters.push((point, format!("{base}{clause}")));
                }
            }
            self.bystanders_clause = clause;
        }
        for (point, filter) in filters {
            if !handle.reads(point) {
                continue;
            }
            match handle.set(point, &filter) {
                Ok(()) if point == Tracepoint::DataReady => watched = Some(self.delivered.clone()),
                Ok(()) => {}
                Err(err) => debug!("kernel events: cannot filter {}: {err}", point.path()),
            }
        }
        watched
    }
}

struct Housekeeping {
    pruned: Instant,
    reported: Option<Instant>,
    reported_lost: u64,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn nanos(at: SystemTime) -> u64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |since| {
            u64::try_from(since.as_nanos()).unwrap_or(u64::MAX)
        })
}

impl Shared {
    fn applied_until(&self) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_nanos(self.applied_until_ns.load(Ordering::Acquire))
    }
}

impl Consumer for Shared {
    fn apply(&self, samples: &[Sample], until: SystemTime) {
        {
            let mut narrowing = lock(&self.narrowing);
            narrowing.note(samples);
            narrowing.review_bystanders(&self.watched);
            if narrowing.socket_io_review_due() {
                let watched = lock(&self.watched).union();
                let mut deliveries = self
                    .deliveries
                    .write()
                    .unwrap_or_else(PoisonError::into_inner);
                if !deliveries.needed_by(&watched.inodes, SystemTime::now()) {
                    deliveries.forget();
                    narrowing.socket_io(false);
                }
            }
            let wanted: Vec<u64> = lock(&self.wants_deliveries).iter().copied().collect();
            if !wanted.is_empty() || !narrowing.delivered.is_empty() {
                let deliveries = self
                    .deliveries
                    .read()
                    .unwrap_or_else(PoisonError::into_inner);
                let addresses = wanted
                    .iter()
                    .filter_map(|inode| deliveries.address_of(*inode))
                    .collect();
                drop(deliveries);
                narrowing.deliver_for(addresses);
            }
            if let Some(watched) = narrowing.apply() {
                self.deliveries
                    .write()
                    .unwrap_or_else(PoisonError::into_inner)
                    .watching(&watched, SystemTime::now());
            }
        }
        if !samples.is_empty() {
            let mut owners = self.owners.write().unwrap_or_else(PoisonError::into_inner);
            for sample in samples {
                owners.apply(sample);
            }
            drop(owners);
            let mut deliveries = self
                .deliveries
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            for sample in samples {
                deliveries.apply(sample);
            }
        }
        let mut housekeeping = lock(&self.housekeeping);
        if housekeeping.pruned.elapsed() >= PRUNE_INTERVAL {
            housekeeping.pruned = Instant::now();
            self.owners
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .prune();
            let interest = {
                let mut interest = lock(&self.interest);
                interest.retain(|_, asked| asked.elapsed() < INTEREST_KEPT);
                interest.clone()
            };
            lock(&self.wants_deliveries).retain(|inode| interest.contains_key(inode));
            self.deliveries
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .prune(|inode| interest.contains_key(&inode));
        }
        let lost = self.lost.load(Ordering::Relaxed);
        if lost > housekeeping.reported_lost
            && housekeeping
                .reported
                .is_none_or(|at| at.elapsed() >= LOSS_REPORT_INTERVAL)
        {
            warn!(
                "kernel events: {} lost since the last report ({lost} in all): the rings \
                 overflowed while the daemon was busy; packets of `all` and `tree` streams \
                 whose owner those events would have told are counted as missed in each \
                 stream's closing line. If it recurs, the daemon lacks CPU time: fewer \
                 `all`/`tree` streams, or a higher priority (renice -n -5 -p PID)",
                lost - housekeeping.reported_lost
            );
            housekeeping.reported = Some(Instant::now());
            housekeeping.reported_lost = lost;
        }
        drop(housekeeping);
        self.applied_until_ns.store(nanos(until), Ordering::Release);
    }

    fn lost(&self, count: u64) {
        self.lost.fetch_add(count, Ordering::Relaxed);
        // What is known of which kernel socket address has which tuple and
        // user may be stale (a lost close, a lost new socket at the same
        // address), and a stale join would give a flow to the wrong
        // process: forget it. Claims made so far stay.
        self.owners
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .forget_sockets();
        // The lost events happened since the last round was applied.
        let from = self.applied_until();
        self.deliveries
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .lost(from, SystemTime::now());
    }
}

impl Live {
    /// A stream's say in whose events are read (see [`Watcher`]).
    pub fn watcher(self: &Arc<Self>) -> Watcher {
        let mut registry = lock(&self.shared.watched);
        registry.next += 1;
        Watcher {
            live: Arc::clone(self),
            id: registry.next,
        }
    }

    /// The time before which every event has been applied: what they do
    /// not say of a packet older than this, no event yet to be read will
    /// say.
    pub fn applied_until(&self) -> SystemTime {
        self.shared.applied_until()
    }

    /// Who owns which flow, as the events told so far.
    pub fn owners(&self) -> RwLockReadGuard<'_, FlowOwners> {
        self.shared
            .owners
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Makes the reader look now: a packet waits for the events up to its
    /// time (the reader otherwise sleeps long while no event comes).
    pub fn hurry(&self) {
        if let Some(reader) = &self.reader {
            reader.hurry().hurry();
        }
    }

    /// How many events were lost since the reader started.
    pub fn lost(&self) -> u64 {
        self.shared.lost.load(Ordering::Relaxed)
    }

    /// Learns socket `inode`'s kernel address (held by process `pid` as
    /// fd `fd`), unless it is known or asked for already, and, if
    /// `deliveries`, reads which datagrams the kernel queues to it from
    /// now on. The answer comes with the events; Err: the socket cannot be
    /// asked.
    pub fn probe(&self, pid: i32, fd: i32, inode: u64, deliveries: bool) -> std::io::Result<()> {
        lock(&self.shared.interest).insert(inode, Instant::now());
        if deliveries {
            lock(&self.shared.wants_deliveries).insert(inode);
        }
        if self.deliveries().probed(inode) {
            return Ok(());
        }
        let copy = probe::copy_of(pid, fd, inode)?;
        let tid = probe::thread_id();
        {
            // The peek's answer comes as a receive: they are read from
            // before it, and the probe is asked under the lock the reader
            // turns them off under, so they stay on until it is answered.
            let mut narrowing = lock(&self.shared.narrowing);
            narrowing.socket_io(true);
            self.shared
                .deliveries
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .asked(tid, inode, SystemTime::now());
        }
        if !probe::peek(&copy) {
            self.shared
                .deliveries
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .withdrawn(tid);
            return Err(std::io::Error::other("the socket cannot be peeked at"));
        }
        debug!("socket {inode} (pid {pid}, fd {fd}) asked for its kernel address");
        Ok(())
    }

    /// Where a datagram of socket `ours`, stamped `at`, went (see
    /// [`Deliveries::delivery`]).
    pub fn delivery(&self, ours: u64, rivals: &[u64], at: SystemTime, io: Io) -> Delivery {
        let applied_until = self.applied_until();
        {
            let mut interest = lock(&self.shared.interest);
            let now = Instant::now();
            for inode in std::iter::once(&ours).chain(rivals) {
                interest.insert(*inode, now);
            }
        }
        self.deliveries()
            .delivery(ours, rivals, at, io, applied_until)
    }

    /// The processes that sent or read on socket `inode` since its address
    /// was learned, once the events up to `until` are in; None until then,
    /// or while its address is not known.
    pub fn users(&self, inode: u64, until: SystemTime) -> Option<Vec<u32>> {
        if self.applied_until() < until {
            return None;
        }
        lock(&self.shared.interest).insert(inode, Instant::now());
        self.deliveries().users(inode)
    }

    /// Whether events were lost around `at`: what they would have told of
    /// a packet then is not known.
    pub fn lost_around(&self, at: SystemTime) -> bool {
        self.shared.lost.load(Ordering::Relaxed) > 0 && self.deliveries().lost_around(at)
    }

    fn deliveries(&self) -> RwLockReadGuard<'_, Deliveries> {
        self.shared
            .deliveries
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        // Joins the reader: no more events are applied after this.
        self.reader.take();
        let lost = self.shared.lost.load(Ordering::Relaxed);
        if lost > 0 {
            debug!("kernel events: stopped; {lost} were lost while they ran");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::decode::{Decoded, Event, TCP_CLOSE};

    fn sample(event: Event) -> Sample {
        Sample {
            at: SystemTime::now(),
            pid: 10,
            tid: 10,
            decoded: Decoded {
                event,
                in_interrupt: false,
            },
        }
    }

    #[test]
    fn a_quiet_socket_that_closes_is_read_about_again_at_once() {
        // A socket busy enough to be left out of the read events closes;
        // its kernel address may be the next socket's, whose first reads
        // say whose it is.
        let mut narrowing = Narrowing {
            quiet: vec![0xabc0],
            ..Narrowing::new(1)
        };
        narrowing.deliver_for(vec![7]);
        assert!(
            !narrowing.due(Some(Duration::from_millis(10))),
            "another change waits for the interval"
        );
        let end = "127.0.0.1:80".parse().unwrap();
        narrowing.note(&[sample(Event::TcpState {
            sock: 0xabc0,
            local: end,
            remote: end,
            old_state: 1,
            new_state: TCP_CLOSE,
        })]);
        assert!(narrowing.quiet.is_empty());
        assert!(narrowing.due(Some(URGENT_NARROWING_INTERVAL)));
        assert!(narrowing.due(None));
    }
}
