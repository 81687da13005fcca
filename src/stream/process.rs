//! A process's `all` stream: every packet of every TCP and UDP socket the
//! process holds while the stream is open, sockets opened after it started
//! included, until the process exits; a capture in each network namespace
//! its sockets live in (found with SIOCGSKNS), all feeding one sorter.
//!
//! A kernel filter can only name what is already known, and a new
//! connection's first packets (its handshake, its first datagram) pass
//! before anyone can know its port: /proc shows a socket only once it
//! exists, and a look at /proc comes milliseconds after the packet. So the
//! capture takes every TCP and UDP packet of the process's network
//! namespace, and the sorting happens here: each packet's headers are read
//! and matched against the process's sockets ([`ProcessSockets`]); a packet
//! of no known socket waits (up to [`CANDIDATE_TTL`]) while the tracker
//! thread looks at /proc again, and is kept if a socket of the process turns
//! out to own it, dropped otherwise. A connection that opens and closes
//! before the tracker's look (under about a millisecond) cannot be told from
//! another process's, and is dropped: precision over recall.
//!
//! What is found to be another process's is then kept out in the kernel:
//! a flow whose packets go unclaimed again and again joins the capture's
//! filter as an exclusion ([`process_filter`]), so a busy neighbour costs a
//! few dozen packets, not all of its traffic. TCP SYNs still pass, so a new
//! connection on an excluded 4-tuple is seen; an exclusion is dropped when
//! a socket of the process comes to own the flow.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicI32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{Receiver, Sender};
use log::{debug, warn};

use super::{Format, Stream, lock};
use crate::capture::classify::{Flow, KnownSocket, Openings, ProcessSockets, Transport, flow_of};
use crate::capture::filter::{ForeignFlow, LocalNetwork, process_filter};
use crate::capture::source::{
    self, CaptureFilter, CaptureRequest, CaptureSettings, CaptureStats, Opened, PacketSink,
    Timestamp,
};
use crate::inventory::NetnsId;
use crate::inventory::live::{LiveSocket, ProcessWatch};
use crate::names;

/// How long a packet of an unknown flow waits for its socket to show up.
pub const CANDIDATE_TTL: Duration = Duration::from_millis(200);
/// The most bytes of such packets held at once.
const CANDIDATE_BYTES: usize = 4 << 20;
/// How many unclaimed packets make a flow another process's, to exclude.
const FOREIGN_AFTER: u64 = 32;
/// The most flows excluded at once (the kernel takes 4096 instructions).
const MAX_EXCLUDED: usize = 64;

/// How often the tracker looks at the process's fds when nothing prompts it
/// and the process has been quiet for [`BUSY_FOR`].
const RESCAN_INTERVAL: Duration = Duration::from_millis(20);
/// How often it looks while the process opens and closes sockets.
const BUSY_INTERVAL: Duration = Duration::from_millis(1);
const BUSY_FOR: Duration = Duration::from_secs(1);

struct Candidate {
    seen: Instant,
    timestamp: Timestamp,
    original_length: u32,
    data: Vec<u8>,
    flow: Flow,
}

/// The capture's sink for an `all` stream: sorts packets by socket.
pub struct ProcessSink {
    stream: Arc<Stream>,
    pid: i32,
    start_ticks: u64,
    comm: String,
    linktype: AtomicI32,
    local_networks: Mutex<Vec<LocalNetwork>>,
    sockets: RwLock<ProcessSockets>,
    openings: Mutex<Openings>,
    candidates: Mutex<VecDeque<Candidate>>,
    candidate_bytes: AtomicUsize,
    /// Packets that no socket of the process claimed.
    unclaimed: AtomicU64,
    poke: Sender<()>,
    pokes: Mutex<Option<Receiver<()>>>,
    /// How captures are opened, for those started in other namespaces.
    settings: CaptureSettings,
    own_netns: Option<NetnsId>,
    /// The namespaces with a capture, the process's own first.
    capturing: Mutex<HashSet<NetnsId>>,
    /// Captures that opened and have not ended; the stream ends with the
    /// last, with their counts summed.
    running: AtomicUsize,
    stats: Mutex<CaptureStats>,
    /// Unclaimed packets by flow, and the flows the kernel filter leaves out.
    unclaimed_flows: Mutex<HashMap<ForeignFlow, u64>>,
    excluded: Mutex<Vec<ForeignFlow>>,
}

fn foreign(flow: &Flow) -> ForeignFlow {
    let (a, b) = if flow.src <= flow.dst {
        (flow.src, flow.dst)
    } else {
        (flow.dst, flow.src)
    };
    ForeignFlow {
        tcp: flow.transport == Transport::Tcp,
        a,
        b,
    }
}

impl ProcessSink {
    /// `netns` is the process's own namespace (where the first capture
    /// runs), `own_netns` the daemon's.
    pub fn new(
        stream: Arc<Stream>,
        pid: i32,
        start_ticks: u64,
        comm: String,
        settings: CaptureSettings,
        netns: Option<NetnsId>,
        own_netns: Option<NetnsId>,
    ) -> Arc<ProcessSink> {
        let (poke, pokes) = crossbeam_channel::bounded(1);
        Arc::new(ProcessSink {
            stream,
            pid,
            start_ticks,
            comm,
            linktype: AtomicI32::new(-1),
            local_networks: Mutex::new(Vec::new()),
            sockets: RwLock::new(ProcessSockets::default()),
            openings: Mutex::new(Openings::default()),
            candidates: Mutex::new(VecDeque::new()),
            candidate_bytes: AtomicUsize::new(0),
            unclaimed: AtomicU64::new(0),
            poke,
            pokes: Mutex::new(Some(pokes)),
            settings,
            own_netns,
            capturing: Mutex::new(netns.into_iter().collect()),
            running: AtomicUsize::new(0),
            stats: Mutex::new(CaptureStats::default()),
            unclaimed_flows: Mutex::new(HashMap::new()),
            excluded: Mutex::new(Vec::new()),
        })
    }

    pub fn stream(&self) -> &Arc<Stream> {
        &self.stream
    }

    /// The capture opened: the stream starts, and the tracker follows the
    /// process (its sockets are known before the first packet is sorted).
    pub fn opened(self: &Arc<Self>, opened: Opened) -> std::io::Result<()> {
        self.running.fetch_add(1, Ordering::SeqCst);
        self.linktype.store(opened.linktype, Ordering::SeqCst);
        *lock(&self.local_networks) = opened.local_networks.clone();
        self.stream.opened(opened);
        let mut watch = ProcessWatch::open(self.pid, self.start_ticks)?;
        watch.rescan();
        self.update(&watch);
        let pokes = lock(&self.pokes)
            .take()
            .ok_or(std::io::ErrorKind::AlreadyExists)?;
        let sink = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("tracker".into())
            .spawn(move || track(&sink, watch, &pokes))?;
        Ok(())
    }

    /// Takes the process's sockets as the watch last saw them, and sorts
    /// the packets that waited for them.
    fn update(self: &Arc<Self>, watch: &ProcessWatch) {
        for (netns, handle) in watch.namespaces() {
            if lock(&self.capturing).insert(netns) {
                self.capture_in(netns, handle);
            }
        }
        let sockets: Vec<&LiveSocket> = watch.sockets().collect();
        let endpoints: Vec<_> = sockets
            .iter()
            .map(|s| {
                (
                    s.proto,
                    s.local,
                    s.remote.unwrap_or_else(|| unconnected(s.local)),
                    s.inode,
                )
            })
            .collect();
        let names = names::unique_socket_names(&endpoints);
        let known: Vec<KnownSocket> = sockets
            .iter()
            .zip(names)
            .filter_map(|(socket, name)| {
                Some(KnownSocket {
                    transport: Transport::of(socket.proto)?,
                    local: socket.local,
                    remote: socket.remote,
                    name,
                    seen: socket.seen,
                    closed: socket.closed,
                })
            })
            .collect();
        let index = ProcessSockets::new(&known, lock(&self.local_networks).clone());
        *self
            .sockets
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = index;
        self.sort_candidates();
        self.stream.batch_end();
    }

    /// Starts one more capture, in another namespace the process holds a
    /// socket in, feeding this same sorter.
    fn capture_in(self: &Arc<Self>, netns: NetnsId, handle: std::os::fd::BorrowedFd<'_>) {
        let label = format!("{} (netns {netns})", self.stream.label());
        let entered = if Some(netns) == self.own_netns {
            None
        } else {
            match handle.try_clone_to_owned() {
                Ok(owned) => Some(owned),
                Err(err) => return warn!("{label}: cannot hold the namespace: {err}"),
            }
        };
        let request = CaptureRequest {
            netns: entered,
            filter: CaptureFilter::TcpAndUdp,
            label: label.clone(),
        };
        let sorter = Arc::clone(self);
        let sink: Arc<dyn PacketSink> = sorter.clone();
        let failed_label = label.clone();
        let started = source::start(
            request,
            &self.settings,
            sink,
            move |outcome| match outcome {
                Ok(opened) => {
                    debug!("{label}: capture running");
                    sorter.running.fetch_add(1, Ordering::SeqCst);
                    if opened.linktype != sorter.linktype.load(Ordering::SeqCst) {
                        warn!(
                            "{label}: another link type ({}) than the stream's; not captured",
                            opened.linktype
                        );
                        opened.control.stop();
                        return;
                    }
                    lock(&sorter.local_networks).extend(opened.local_networks);
                    sorter.stream.add_capture(opened.control);
                }
                Err(err) => warn!("{label}: cannot capture there: {err:?}"),
            },
        );
        if let Err(err) = started {
            warn!("{failed_label}: cannot start a capture thread: {err}");
        }
    }

    /// A capture timestamp as wall-clock time.
    fn wall_time(&self, timestamp: Timestamp) -> SystemTime {
        let fraction = if self.stream.nanoseconds.load(Ordering::Relaxed) {
            Duration::from_nanos(u64::from(timestamp.fraction))
        } else {
            Duration::from_micros(u64::from(timestamp.fraction))
        };
        SystemTime::UNIX_EPOCH + Duration::from_secs(u64::from(timestamp.seconds)) + fraction
    }

    fn emit(&self, name: &str, timestamp: Timestamp, original_length: u32, data: &[u8]) {
        let comment = (self.stream.format == Format::PcapNg)
            .then(|| format!("pid={} comm={} socket={name}", self.pid, self.comm));
        self.stream
            .push(timestamp, original_length, data, comment.as_deref());
    }

    /// Keeps the waiting packets whose socket is now known, in the order
    /// they came; drops those that waited too long.
    fn sort_candidates(&self) {
        let sockets = self
            .sockets
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let openings = lock(&self.openings);
        let mut candidates = lock(&self.candidates);
        let mut kept = VecDeque::with_capacity(candidates.len());
        for candidate in candidates.drain(..) {
            let at = self.wall_time(candidate.timestamp);
            if let Some(name) = sockets.owner_of(&candidate.flow, at, &openings) {
                self.candidate_bytes
                    .fetch_sub(candidate.data.len(), Ordering::Relaxed);
                self.emit(
                    name,
                    candidate.timestamp,
                    candidate.original_length,
                    &candidate.data,
                );
            } else if candidate.seen.elapsed() > CANDIDATE_TTL {
                self.candidate_bytes
                    .fetch_sub(candidate.data.len(), Ordering::Relaxed);
                self.unclaimed.fetch_add(1, Ordering::Relaxed);
                *lock(&self.unclaimed_flows)
                    .entry(foreign(&candidate.flow))
                    .or_insert(0) += 1;
            } else {
                kept.push_back(candidate);
            }
        }
        *candidates = kept;
    }

    /// Rewrites the kernel filter where the excluded flows should change:
    /// flows often unclaimed join it, flows the process now owns leave it.
    fn narrow(&self) {
        let now = SystemTime::now();
        let sockets = self
            .sockets
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let openings = lock(&self.openings);
        let owned = |flow: &ForeignFlow| {
            let transport = if flow.tcp {
                Transport::Tcp
            } else {
                Transport::Udp
            };
            let packet = Flow {
                transport,
                src: flow.a,
                dst: flow.b,
                opening: false,
            };
            sockets.owner_of(&packet, now, &openings).is_some()
        };
        let mut excluded = lock(&self.excluded);
        let before = excluded.len();
        excluded.retain(|flow| !owned(flow));
        let mut changed = excluded.len() != before;
        let mut counts = lock(&self.unclaimed_flows);
        let mut often: Vec<(ForeignFlow, u64)> = counts
            .iter()
            .filter(|(flow, count)| {
                **count >= FOREIGN_AFTER && !excluded.contains(flow) && !owned(flow)
            })
            .map(|(flow, count)| (*flow, *count))
            .collect();
        often.sort_by_key(|(_, count)| std::cmp::Reverse(*count));
        let room = MAX_EXCLUDED.saturating_sub(excluded.len());
        for (flow, _) in often.into_iter().take(room) {
            excluded.push(flow);
            counts.remove(&flow);
            changed = true;
        }
        if counts.len() > 4 * MAX_EXCLUDED {
            counts.retain(|_, count| *count >= FOREIGN_AFTER / 2);
        }
        if changed {
            let filter = process_filter(&excluded);
            debug!(
                "{}: {} flows of other processes left out; filter: {filter}",
                self.stream.label(),
                excluded.len()
            );
            self.stream.set_filter(&filter);
        }
    }
}

impl PacketSink for ProcessSink {
    fn packet(&self, timestamp: Timestamp, original_length: u32, data: &[u8]) {
        let Some(flow) = flow_of(self.linktype.load(Ordering::Relaxed), data) else {
            return;
        };
        let at = self.wall_time(timestamp);
        let owner = {
            let mut openings = lock(&self.openings);
            openings.record(&flow, at);
            self.sockets
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .owner_of(&flow, at, &openings)
                .map(str::to_owned)
        };
        match owner {
            Some(name) => self.emit(&name, timestamp, original_length, data),
            None => {
                if self.candidate_bytes.load(Ordering::Relaxed) + data.len() > CANDIDATE_BYTES {
                    self.unclaimed.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                self.candidate_bytes
                    .fetch_add(data.len(), Ordering::Relaxed);
                lock(&self.candidates).push_back(Candidate {
                    seen: Instant::now(),
                    timestamp,
                    original_length,
                    data: data.to_vec(),
                    flow,
                });
                let _ = self.poke.try_send(());
            }
        }
    }

    fn batch_end(&self) {
        self.stream.batch_end();
    }

    fn ended(&self, stats: CaptureStats) {
        {
            let mut total = lock(&self.stats);
            total.received += stats.received;
            total.dropped_by_kernel += stats.dropped_by_kernel;
            total.dropped_by_interface += stats.dropped_by_interface;
        }
        if self.running.fetch_sub(1, Ordering::SeqCst) > 1 {
            return;
        }
        let stats = *lock(&self.stats);
        debug!(
            "{}: {} packets of the namespace belonged to no socket of the process",
            self.stream.label(),
            self.unclaimed.load(Ordering::Relaxed)
        );
        self.stream.ended(stats);
    }
}

/// How a socket with no peer is named: `0.0.0.0:0` or `[::]:0`.
fn unconnected(local: std::net::SocketAddr) -> std::net::SocketAddr {
    match local {
        std::net::SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
        std::net::SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    }
}

/// The tracker thread: looks at the process's fds when a packet of an
/// unknown flow comes, and on its own every few milliseconds while the
/// process opens sockets (so that short-lived ones are seen too), less
/// often when it is quiet. It ends the stream when the process exits, and
/// itself when the capture is gone.
fn track(sink: &Weak<ProcessSink>, mut watch: ProcessWatch, pokes: &Receiver<()>) {
    let mut last_change = Instant::now();
    let mut interval = BUSY_INTERVAL;
    loop {
        let wait = if last_change.elapsed() < BUSY_FOR {
            interval
        } else {
            RESCAN_INTERVAL
        };
        let _ = pokes.recv_timeout(wait);
        let Some(sink) = sink.upgrade() else {
            return;
        };
        if watch.exited() {
            debug!(
                "{}: the process exited, ending the stream",
                sink.stream.label()
            );
            sink.sort_candidates();
            sink.stream.stop_capture();
            return;
        }
        let started = Instant::now();
        if watch.rescan() {
            sink.update(&watch);
            last_change = Instant::now();
        } else if !lock(&sink.candidates).is_empty() {
            sink.sort_candidates();
            sink.stream.batch_end();
        }
        sink.narrow();
        // Never spend more than about a fifth of a core looking.
        interval = BUSY_INTERVAL.max(started.elapsed() * 4);
    }
}
