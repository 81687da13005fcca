//! A process's `all` stream and its `tree` stream: every packet of every
//! TCP and UDP flow of the process (`all`), or of the process and all its
//! descendants, present and future (`tree`), while the stream is open,
//! each packet once; a capture in each network namespace the members'
//! sockets live in, all feeding one sorter.
//!
//! A kernel filter can only name what is already known, and a new
//! connection's first packets (its handshake, its first datagram) pass
//! before anyone can know its port. So the capture takes every TCP and UDP
//! packet of the namespace, and the sorting happens here. Whose a packet is
//! comes from, in order:
//!
//! 1. a connected socket of the exact flow that a member holds, as its
//!    /proc/<pid>/fd shows (followed by the stream's tracker, [`ProcessWatch`]);
//! 2. kernel events ([`crate::events`]), where they can be had: the process
//!    that routed, connected, read, wrote or closed the flow, as the kernel
//!    saw it happen, however short the flow ([`FlowOwners`]). A flow that an
//!    event gives to another process is not the stream's, whatever port it
//!    uses: a connection accepted by a sibling worker on a shared listener
//!    is the sibling's;
//! 3. a socket bound to the flow's port (a UDP socket; a TCP listener only
//!    where no events can be had: with events an accepted connection is its
//!    acceptor's, not every holder of the listener's).
//!
//! A packet of no known owner waits (up to [`CANDIDATE_TTL`]) for the
//! tracker's next look or the next events, and is dropped if nothing claims
//! it. What is found to be another process's is then kept out in the
//! kernel: a flow whose packets go unclaimed again and again joins the
//! capture's filter as an exclusion ([`process_filter`]); TCP SYNs still
//! pass, so a new connection on an excluded 4-tuple is seen.
//!
//! A reader who is not root gets only packets of sockets of their own uid,
//! and the stream ends as soon as the process is no longer theirs (it
//! changed credentials, or execs a setuid program). When the process (for
//! `tree`: every member) has exited, the stream goes on for
//! [`EXIT_GRACE`], for its flows' last packets, then ends.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock, Weak};
use std::time::{Duration, Instant, SystemTime};

use log::{debug, warn};
use rustc_hash::FxHashMap;

use super::ordering::{Copies, Reorder};
use super::tracking::{self, Poke};
use super::{Format, Miss, Stream, lock};
use crate::attribution::Delivery;
use crate::attribution::deliveries::{self, Io};
use crate::attribution::{self, Claimant};
use crate::attribution::{Subscription, Watcher};
use crate::capture::classify::{
    Bound, ConnectedCache, Flow, KnownSocket, Openings, Owner, ProcessSockets, Transport, Way,
    flow_of, packet_identity,
};
use crate::capture::filter::{
    FilterTarget, ForeignFlow, LocalNetwork, process_filter, rivals_of, taken_from,
};
use crate::capture::source::{
    CaptureFilter, CaptureRequest, CaptureSettings, CaptureStats, Opened, PacketSink, RingStage,
    Timestamp,
};
use crate::inventory::live::{LiveSocket, ProcessWatch, children_of};
use crate::inventory::tables::{read_table, read_table_in_state};
use crate::inventory::{Netns, NetnsId};
use crate::names::{self, Proto};

/// How long the stream goes on after the process exited: as long as a
/// socket file's stream goes on after its socket closed.
const EXIT_GRACE: Duration = super::CLOSE_GRACE;

/// How long a stream whose process stopped being the reader's goes on
/// taking what the kernel captured before that (packets stamped later are
/// cut off): until the block filling then has been handed over.
fn revoke_drain() -> Duration {
    crate::capture::source::LIVE_DELAY + Duration::from_millis(50)
}

/// A capture that delivered nothing for this long has drained its ring.
const DRAIN_QUIET: Duration = Duration::from_millis(30);
/// The longest a stream waits, after its grace, for its capture to catch up.
const DRAIN_LIMIT: Duration = Duration::from_secs(2);

/// How often a member's namespace socket table is read again, for what
/// more specific sockets take from its unconnected ones.
const NEIGHBOURS_RECHECK: Duration = Duration::from_secs(1);
/// The kernel's state number of a listening TCP socket.
const TCP_LISTEN: u8 = 10;

/// A row of a namespace's socket table: local, remote, listening, inode.
type NeighbourRow = (std::net::SocketAddr, std::net::SocketAddr, bool, u64);
/// What names a socket file: protocol, ends (an unconnected socket's
/// remote end unspecified) and inode.
type SocketKey = (Proto, SocketAddr, SocketAddr, u64);
/// A namespace's table rows, when they were read, and whether a fresher
/// read has been asked of the table reader.
type TableRead = (Instant, Arc<Vec<NeighbourRow>>, bool);

/// How long a packet of an unknown flow waits for its owner to show up.
pub const CANDIDATE_TTL: Duration = Duration::from_millis(200);
/// The longest a packet waits for a kernel events reader that lags behind.
const CANDIDATE_TTL_LAGGING: Duration = Duration::from_secs(2);
/// The most bytes of such packets held at once.
const CANDIDATE_BYTES: usize = 4 << 20;
/// How many unclaimed packets make a flow another process's, to exclude.
const FOREIGN_AFTER: u64 = 32;
/// The most flows excluded at once (the kernel takes 4096 instructions).
const MAX_EXCLUDED: usize = 64;

/// How often the tracker looks at the members' fds when nothing prompts it
/// and they have been quiet for [`BUSY_FOR`].
const RESCAN_INTERVAL: Duration = Duration::from_millis(20);
/// How often it looks while they open and close sockets.
const BUSY_INTERVAL: Duration = Duration::from_millis(1);
const BUSY_FOR: Duration = Duration::from_secs(1);
/// The same when kernel events tell whose a flow is: the members' fds are
/// then looked at only for what the events do not say (their unconnected
/// sockets, the namespaces they live in), so far less often; a look at a
/// busy server's hundred fds costs a fifth of a millisecond.
const EVENTS_RESCAN_INTERVAL: Duration = Duration::from_millis(50);
const EVENTS_BUSY_INTERVAL: Duration = Duration::from_millis(10);

/// Which processes a stream follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// The process alone (`all`).
    Process,
    /// The process and its descendants (`tree`).
    Tree,
}

struct Candidate {
    /// The namespace whose capture took it.
    netns: NetnsId,
    seen: Instant,
    timestamp: Timestamp,
    original_length: u32,
    data: Vec<u8>,
    flow: Flow,
}

/// A packet of the stream held for order.
struct Held {
    timestamp: Timestamp,
    original_length: u32,
    data: Vec<u8>,
    comment: Option<String>,
}

/// How much longer than a capture's block timeout a packet is held for
/// order: the time a block takes from the kernel to the sorter.
const ORDER_MARGIN: Duration = Duration::from_millis(20);

/// Packets waiting for their owner. A flow with a waiting packet keeps its
/// later packets waiting behind it, so each flow's packets reach the
/// reader in the order they came (a connection's SYN, waiting for the
/// event that names its process, before its data).
#[derive(Default)]
struct Waiting {
    queue: VecDeque<Candidate>,
    /// How many packets of each flow wait.
    flows: rustc_hash::FxHashMap<ForeignFlow, usize>,
}

impl Waiting {
    fn push(&mut self, candidate: Candidate) {
        *self.flows.entry(foreign(&candidate.flow)).or_insert(0) += 1;
        self.queue.push_back(candidate);
    }
}

/// Whose a packet is, as far as is known now.
enum Verdict {
    /// A member's.
    Ours(Owner),
    /// Another process's, as kernel events told.
    Foreign,
    /// Not known yet.
    Unknown,
    /// To or from a member's socket or one it shares a port with, and
    /// which cannot be told: left out, and counted as missed.
    Missed(Miss),
}

/// A process the stream keeps packets of.
#[derive(Clone, Debug)]
struct Member {
    comm: String,
    /// Its owner as /proc/<pid>/fd shows it.
    uid: u32,
    /// The network namespace it is in: its claims speak of packets there.
    netns: Option<NetnsId>,
}

/// The capture's sink for an `all` or `tree` stream: sorts packets.
pub struct ProcessSink {
    stream: Arc<Stream>,
    root: u32,
    scope: Scope,
    /// The reader's uid, unless root: only packets of that user's sockets
    /// are kept, and the stream ends once the process is not theirs.
    reader: Option<u32>,
    /// Kernel events, where they can be had.
    events: Option<Subscription>,
    /// Tells the events reader which processes and sockets are the
    /// stream's: their events are never left out.
    watcher: Option<Watcher>,
    members: RwLock<HashMap<u32, Member>>,
    linktype: AtomicI32,
    local_networks: Mutex<Vec<LocalNetwork>>,
    /// The members' sockets, by the namespace they live in.
    sockets: RwLock<FxHashMap<NetnsId, ProcessSockets>>,
    /// The namespace of the first capture (the process's own), where
    /// sockets of no known namespace are taken to live.
    first: NetnsId,
    /// Packets held until every capture has handed over what came before
    /// them (while captures run in several namespaces), and copies of one
    /// packet in one namespace, told apart.
    reorder: Mutex<Reorder<Held>>,
    copies: Mutex<Copies>,
    copies_left_out: AtomicU64,
    /// Packets sorted, and of them the stream's (for its share of what the
    /// ring dropped).
    seen: AtomicU64,
    ours: AtomicU64,
    /// How long a packet is held for order: longer than any capture holds
    /// a packet before handing it over.
    order_delay_ns: AtomicU64,
    openings: Mutex<Openings>,
    /// Whose connected socket a flow's packets are, as last worked out.
    connected: Mutex<ConnectedCache>,
    /// Packets waiting for their owner, in the order they came.
    candidates: Mutex<Waiting>,
    /// Members' namespace socket tables, by member pid, with when read.
    neighbour_rows: Mutex<HashMap<i32, TableRead>>,
    /// How many flows more specific sockets take from the members', as
    /// last counted (logged when it changes).
    taken_count: AtomicUsize,
    /// How far the events had been applied at the last look at the
    /// waiting packets: until they go further, another look decides nothing.
    sorted_until_ns: AtomicU64,
    candidate_bytes: AtomicUsize,
    /// Packets that no member claimed.
    unclaimed: AtomicU64,
    /// Packets of members' sockets of another user, not given to the reader.
    withheld: AtomicU64,
    /// Set once the process is no longer the reader's: no packet captured
    /// after this moment is given to them.
    cutoff: Mutex<Option<SystemTime>>,
    revoked: AtomicBool,
    /// Captures run in more than one namespace (packets are held for order).
    several_captures: AtomicBool,
    /// The capture time of the newest packet seen (ns since the epoch), and
    /// when it was handed over: how far behind the captures are.
    newest_packet_ns: AtomicU64,
    last_packet: Mutex<Instant>,
    /// Makes the tracker look now: a packet waits for its owner.
    poke: OnceLock<Poke>,
    /// The members' sockets' plain file names, by what names them: a
    /// process making a thousand connections a second holds thousands of
    /// lingering sockets, all named again at every look that finds a new
    /// one (formatting them was a sixth of the trackers' time).
    plain_names: Mutex<FxHashMap<SocketKey, String>>,
    /// The process's watch, until the capture opens and the tracker starts.
    first_watch: Mutex<Option<ProcessWatch>>,
    /// How captures are opened, for those started in other namespaces.
    settings: CaptureSettings,
    /// The namespaces with a capture: one capture per namespace, however
    /// the namespace was found.
    capturing: Mutex<HashSet<NetnsId>>,
    /// Captures that opened and have not ended; the stream ends with the
    /// last, with their counts summed.
    running: AtomicUsize,
    stats: Mutex<CaptureStats>,
    /// Unclaimed packets by flow, and the flows the kernel filter leaves out.
    unclaimed_flows: Mutex<FxHashMap<ForeignFlow, u64>>,
    excluded: Mutex<Vec<ForeignFlow>>,
    /// When the tracker last looked at the members' fds (wall ns).
    looked_ns: AtomicU64,
    /// Sockets sharing a port with a member's whose holder was looked for.
    rivals_asked: Mutex<HashSet<u64>>,
    /// Members' sockets that could not be asked their kernel address:
    /// said once each (the tracker asks again at every look).
    unaskable: Mutex<HashSet<u64>>,
    /// The namespace tables read since the last update differ from before.
    neighbours_changed: AtomicBool,
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

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}

/// What a stream is opened with.
pub struct ProcessStreamSpec {
    pub scope: Scope,
    /// The opening user, unless root.
    pub reader: Option<u32>,
    pub events: Option<Subscription>,
    pub settings: CaptureSettings,
    /// The namespace the first capture runs in (the process's own).
    pub first: NetnsId,
}

impl ProcessSink {
    /// `watch` follows the process from the moment the capture opens.
    pub fn new(
        stream: Arc<Stream>,
        watch: ProcessWatch,
        spec: ProcessStreamSpec,
    ) -> Arc<ProcessSink> {
        let root = watch.pid() as u32;
        let member = Member {
            comm: watch.comm(),
            uid: watch.owner().unwrap_or(u32::MAX),
            netns: crate::inventory::netns_of(watch.pid()),
        };
        // Its captures take in every TCP and UDP packet of the namespace.
        stream.capture_is_broad();
        Arc::new(ProcessSink {
            stream,
            root,
            scope: spec.scope,
            reader: spec.reader,
            watcher: spec.events.as_ref().map(|events| {
                let watcher = events.watcher();
                watcher.set(vec![root], Vec::new());
                watcher
            }),
            events: spec.events,
            members: RwLock::new(HashMap::from([(root, member)])),
            linktype: AtomicI32::new(-1),
            local_networks: Mutex::new(Vec::new()),
            sockets: RwLock::new(FxHashMap::default()),
            first: spec.first,
            reorder: Mutex::new(Reorder::default()),
            copies: Mutex::new(Copies::default()),
            copies_left_out: AtomicU64::new(0),
            seen: AtomicU64::new(0),
            ours: AtomicU64::new(0),
            order_delay_ns: AtomicU64::new(0),
            openings: Mutex::new(Openings::default()),
            connected: Mutex::new(ConnectedCache::default()),
            candidates: Mutex::new(Waiting::default()),
            neighbour_rows: Mutex::new(HashMap::new()),
            taken_count: AtomicUsize::new(0),
            sorted_until_ns: AtomicU64::new(0),
            candidate_bytes: AtomicUsize::new(0),
            unclaimed: AtomicU64::new(0),
            withheld: AtomicU64::new(0),
            cutoff: Mutex::new(None),
            revoked: AtomicBool::new(false),
            several_captures: AtomicBool::new(false),
            newest_packet_ns: AtomicU64::new(0),
            last_packet: Mutex::new(Instant::now()),
            poke: OnceLock::new(),
            plain_names: Mutex::default(),
            first_watch: Mutex::new(Some(watch)),
            settings: spec.settings,
            capturing: Mutex::new(HashSet::from([spec.first])),
            running: AtomicUsize::new(0),
            stats: Mutex::new(CaptureStats::default()),
            unclaimed_flows: Mutex::default(),
            excluded: Mutex::new(Vec::new()),
            looked_ns: AtomicU64::new(0),
            rivals_asked: Mutex::new(HashSet::new()),
            unaskable: Mutex::new(HashSet::new()),
            neighbours_changed: AtomicBool::new(false),
        })
    }

    pub fn stream(&self) -> &Arc<Stream> {
        &self.stream
    }

    /// A capture hands its packets over within `block_timeout` (twice
    /// that and a margin while its ring grows: see
    /// [`crate::capture::growth`]): packets held for order wait longer.
    fn hold_for(&self, block_timeout: Duration) {
        let delay = block_timeout * 2 + crate::capture::growth::RETIRE_MARGIN + ORDER_MARGIN;
        self.order_delay_ns.fetch_max(
            u64::try_from(delay.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// The capture opened: the stream starts, and the tracker follows the
    /// members (their sockets are known before the first packet is sorted).
    pub fn opened(self: &Arc<Self>, opened: Opened) -> std::io::Result<()> {
        self.running.fetch_add(1, Ordering::SeqCst);
        self.linktype.store(opened.linktype, Ordering::SeqCst);
        self.hold_for(opened.block_timeout);
        *lock(&self.local_networks) = opened.local_networks.clone();
        self.stream.opened(opened);
        let first = lock(&self.first_watch)
            .take()
            .ok_or(std::io::ErrorKind::AlreadyExists)?;
        let mut tracker = Tracker {
            watches: vec![first],
            exited: Vec::new(),
        };
        if self.scope == Scope::Tree {
            tracker.adopt_descendants(self);
        }
        tracker.rescan();
        self.update(&tracker);
        let poke = tracking::follow(Box::new(Following {
            sink: Arc::downgrade(self),
            tracker,
            phase: Phase::Tracking,
            last_change: Instant::now(),
            interval: BUSY_INTERVAL,
            last_adoption: Instant::now(),
            last_rescan: Instant::now(),
        }))?;
        let _ = self.poke.set(poke);
        Ok(())
    }

    /// Takes the members' sockets as the tracker last saw them, and sorts
    /// the packets that waited for them.
    fn update(self: &Arc<Self>, tracker: &Tracker) {
        for watch in tracker.all_watches() {
            for netns in watch.namespaces() {
                let mut capturing = lock(&self.capturing);
                if capturing.insert(netns.id()) {
                    self.several_captures
                        .store(capturing.len() > 1, Ordering::Relaxed);
                    drop(capturing);
                    self.capture_in(netns.clone());
                }
            }
        }
        let mut known: Vec<(KnownSocket, Option<NetnsId>)> = Vec::new();
        let mut plain_names = lock(&self.plain_names);
        let mut named = FxHashMap::default();
        for watch in tracker.all_watches() {
            let sockets: Vec<&LiveSocket> = watch.sockets().collect();
            let (plain, inodes): (Vec<String>, Vec<u64>) = sockets
                .iter()
                .map(|s| {
                    let key = (
                        s.proto,
                        s.local,
                        s.remote.unwrap_or_else(|| unconnected(s.local)),
                        s.inode,
                    );
                    let name = plain_names
                        .remove(&key)
                        .unwrap_or_else(|| names::socket_file_name(key.0, key.1, key.2));
                    named.insert(key, name.clone());
                    (name, s.inode)
                })
                .unzip();
            let names = names::unique_names(plain, &inodes);
            let rows = self.neighbour_rows(watch.pid(), &sockets);
            known.extend(sockets.iter().zip(names).filter_map(|(socket, name)| {
                let target = FilterTarget {
                    proto: socket.proto,
                    local: socket.local,
                    remote: unconnected(socket.local),
                    dual_stack: false,
                };
                let (taken, rivals) = match (&rows, socket.remote) {
                    (Some(rows), None) => (
                        taken_from(&target, socket.inode, rows.iter().copied()),
                        rivals_of(&target, socket.inode, rows.iter().copied()),
                    ),
                    _ => (Vec::new(), Vec::new()),
                };
                if socket.remote.is_none() && Transport::of(socket.proto) == Some(Transport::Udp) {
                    self.probe_rivals(watch.pid(), socket, &rivals);
                }
                Some((
                    KnownSocket {
                        transport: Transport::of(socket.proto)?,
                        local: socket.local,
                        remote: socket.remote,
                        name,
                        uid: socket.uid,
                        pid: watch.pid() as u32,
                        seen: socket.seen,
                        closed: socket.closed,
                        taken,
                        inode: socket.inode,
                        fd: socket.fd,
                        rivals,
                    },
                    socket.netns,
                ))
            }));
        }
        // Only the names of the sockets held or lingering now are kept.
        *plain_names = named;
        drop(plain_names);
        if let Some(watcher) = &self.watcher {
            let pids = tracker
                .all_watches()
                .map(|watch| watch.pid() as u32)
                .collect();
            let inodes = known
                .iter()
                .flat_map(|(socket, _)| {
                    std::iter::once(socket.inode).chain(socket.rivals.iter().copied())
                })
                .collect();
            watcher.set(pids, inodes);
        }
        let taken: usize = known.iter().map(|(socket, _)| socket.taken.len()).sum();
        if self.taken_count.swap(taken, Ordering::Relaxed) != taken {
            debug!(
                "{}: {taken} flows of more specific sockets are not its sockets'",
                self.stream.label()
            );
        }
        let locals = lock(&self.local_networks).clone();
        let mut by_namespace: HashMap<NetnsId, Vec<KnownSocket>> = HashMap::new();
        for (socket, netns) in known {
            by_namespace
                .entry(netns.unwrap_or(self.first))
                .or_default()
                .push(socket);
        }
        let index: FxHashMap<NetnsId, ProcessSockets> = by_namespace
            .into_iter()
            .map(|(netns, sockets)| (netns, ProcessSockets::new(&sockets, locals.clone())))
            .collect();
        *write(&self.sockets) = index;
        self.sort_candidates();
        self.stream.batch_end();
    }

    /// The socket table of member `pid`'s namespace, re-read at most every
    /// [`NEIGHBOURS_RECHECK`], for members holding an unconnected socket
    /// (what more specific sockets take from it is not its own). Read here
    /// the first time; after that the background thread reads it again
    /// (the tracker never waits for a read: thousands of TIME_WAIT rows
    /// take milliseconds to parse, long enough to miss a 10 ms flow in
    /// /proc) and this answers with the last rows meanwhile.
    fn neighbour_rows(
        self: &Arc<Self>,
        pid: i32,
        sockets: &[&LiveSocket],
    ) -> Option<Arc<Vec<NeighbourRow>>> {
        if !sockets.iter().any(|socket| socket.remote.is_none()) {
            return None;
        }
        if let Some((read_at, rows, asked)) = lock(&self.neighbour_rows).get_mut(&pid) {
            if read_at.elapsed() >= NEIGHBOURS_RECHECK && !*asked {
                let sink = Arc::downgrade(self);
                *asked = tracking::in_background(Box::new(move || {
                    let rows = Arc::new(read_neighbour_rows(pid));
                    if let Some(sink) = sink.upgrade() {
                        sink.keep_neighbour_rows(pid, rows);
                    }
                }))
                .is_ok();
            }
            return Some(Arc::clone(rows));
        }
        let rows = Arc::new(read_neighbour_rows(pid));
        self.keep_neighbour_rows(pid, Arc::clone(&rows));
        Some(rows)
    }

    fn keep_neighbour_rows(&self, pid: i32, rows: Arc<Vec<NeighbourRow>>) {
        let mut cache = lock(&self.neighbour_rows);
        cache.retain(|_, (read_at, _, _)| read_at.elapsed() < NEIGHBOURS_RECHECK * 10);
        if let Some((_, before, _)) = cache.insert(pid, (Instant::now(), Arc::clone(&rows), false))
            && *before != *rows
        {
            self.neighbours_changed.store(true, Ordering::Relaxed);
        }
    }

    /// Whether flows are attributed from kernel events (not by following
    /// /proc).
    pub fn follows_events(&self) -> bool {
        self.events.is_some()
    }

    /// Starts one more capture, in another namespace a member holds a
    /// socket in, feeding this same sorter.
    fn capture_in(self: &Arc<Self>, netns: Netns) {
        let label = format!("{} (netns {})", self.stream.label(), netns.id());
        let request = CaptureRequest {
            netns,
            filter: CaptureFilter::TcpAndUdp,
            label: label.clone(),
            prompt: !self.follows_events(),
            stage: RingStage::Sprout,
        };
        let sorter = Arc::clone(self);
        let sink: Arc<dyn PacketSink> = Arc::new(Captured {
            sorter: Arc::clone(self),
            netns: request.netns.id(),
        });
        let failed_label = label.clone();
        let started =
            crate::capture::growth::start(request, &self.settings, sink, move |outcome| {
                match outcome {
                    Ok(opened) => {
                        debug!("{label}: capture running, {}", opened.describe());
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
                        sorter.hold_for(opened.block_timeout);
                        sorter.stream.add_capture(opened.control);
                    }
                    Err(err) => warn!("{label}: cannot capture there: {err:?}"),
                }
            });
        if let Err(err) = started {
            warn!("{failed_label}: cannot start a capture: {err}");
        }
    }

    /// A capture timestamp as wall-clock time.
    fn wall_time(&self, timestamp: Timestamp) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_nanos(self.unix_nanos(timestamp))
    }

    /// A capture timestamp in nanoseconds since the epoch.
    fn unix_nanos(&self, timestamp: Timestamp) -> u64 {
        let fraction = u64::from(timestamp.fraction);
        let fraction = if self.stream.nanoseconds.load(Ordering::Relaxed) {
            fraction
        } else {
            fraction * 1_000
        };
        u64::from(timestamp.seconds) * 1_000_000_000 + fraction
    }

    /// Whose this packet is (see the module docs for the order in which
    /// owners are looked for).
    fn verdict(&self, flow: &Flow, at: SystemTime, openings: &Openings, netns: NetnsId) -> Verdict {
        let by_namespace = read(&self.sockets);
        let none = ProcessSockets::default();
        // Only the members' sockets that live where the packet was
        // captured: a container's packet crossing the host's veth and
        // bridge is the container process's there, not on the host.
        let sockets = by_namespace.get(&netns).unwrap_or(&none);
        let connected = lock(&self.connected).owner(netns.inode(), sockets, flow, at, openings);
        if let Some(owner) = connected {
            return Verdict::Ours(owner);
        }
        if let Some(events) = &self.events {
            let owners = events.owners();
            if flow.transport == Transport::Udp
                && events.applied_until() < owners.settled_after(flow, at)
            {
                // A reply's claim may yet name who got this datagram.
                return Verdict::Unknown;
            }
            let claimants = owners.claimants(flow, at, openings);
            drop(owners);
            if let Some(owner) = claimants
                .iter()
                .find_map(|claimant| self.member_owner(claimant, flow.transport, netns))
            {
                return Verdict::Ours(owner);
            }
            // Ends of the flow on this host whose socket the kernel's
            // deliveries named another's than the members'.
            let mut told_elsewhere: Vec<SocketAddr> = Vec::new();
            if flow.transport == Transport::Udp {
                // A datagram to (or from) a member's unconnected socket on
                // an end of this host no claim names: a receiver that
                // never replies is claimed by nobody, and a sender's claim
                // names only the sender's end.
                for (local, remote, way) in [
                    (flow.dst, flow.src, Way::In),
                    (flow.src, flow.dst, Way::Out),
                ] {
                    if claimants.iter().any(|claimant| claimant.local == local) {
                        continue;
                    }
                    if let Some(bound) = sockets.bound_at(flow.transport, local, remote, at, way) {
                        match self.bound_verdict(&bound, at) {
                            Verdict::Foreign => told_elsewhere.push(local),
                            verdict => return verdict,
                        }
                    }
                }
            }
            if !claimants.is_empty() || !told_elsewhere.is_empty() {
                // Another process's once the events up to the packet are
                // all in: until then an older claim (a port the other
                // process used before) may be about to be superseded.
                if events.applied_until() < at + attribution::SKEW {
                    return Verdict::Unknown;
                }
                // Still another process's, unless its other end is on this
                // host and nobody claimed it yet (a connection's handshake
                // comes before its acceptor's events): then it waits.
                // (For UDP, a datagram can be a member's only through a
                // member's socket on its port: once the members' fds have
                // been looked at after it, one of none is another's.)
                let looked_since = flow.transport == Transport::Udp && self.looked_after(at);
                let unclaimed_local_end = [flow.src, flow.dst].into_iter().any(|end| {
                    !claimants.iter().any(|claimant| claimant.local == end)
                        && !told_elsewhere.contains(&end)
                        && self.is_local(end.ip())
                        && (!looked_since || sockets.ports(flow.transport).contains(&end.port()))
                });
                if unclaimed_local_end {
                    return Verdict::Unknown;
                }
                log::trace!(
                    "{}: {:?} {} > {} at {at:?} claimed by {claimants:?}",
                    self.stream.label(),
                    flow.transport,
                    flow.src,
                    flow.dst
                );
                return Verdict::Foreign;
            }
            if flow.transport == Transport::Tcp {
                // Not claimed yet: a listener's port says nothing of which
                // holder accepted it. The packet waits for the events.
                return Verdict::Unknown;
            }
        }
        match sockets.bound_owner(flow, at) {
            Some(bound) => self.bound_verdict(&bound, at),
            None => Verdict::Unknown,
        }
    }

    /// Whether a datagram a member's unconnected socket may have taken (or
    /// sent) is its: where no other socket of the namespace shares its
    /// port and address, the kernel had no other choice; where some do,
    /// the kernel's events tell which one it went to (see
    /// [`crate::attribution::deliveries`]), or nothing is decided.
    fn bound_verdict(&self, bound: &Bound<'_>, at: SystemTime) -> Verdict {
        let Some(events) = &self.events else {
            return if bound.rivals.is_empty() {
                Verdict::Ours(bound.owner.clone())
            } else {
                Verdict::Missed(Miss::Undecided)
            };
        };
        if bound.rivals.is_empty() {
            // A socket other processes hold too (a prefork server's) is
            // each one's only for what it sent or read: then the claims
            // tell, and the packet waits for them.
            let members = read(&self.members);
            return match events.users(bound.inode, at + deliveries::WINDOW) {
                Some(users) if users.iter().all(|pid| members.contains_key(pid)) => {
                    Verdict::Ours(bound.owner.clone())
                }
                _ => Verdict::Unknown,
            };
        }
        let io = match bound.way {
            Way::In => Io::Received,
            Way::Out => Io::Sent,
        };
        match events.delivery(bound.inode, bound.rivals, at, io) {
            Delivery::Ours => Verdict::Ours(bound.owner.clone()),
            Delivery::Elsewhere => Verdict::Foreign,
            Delivery::Undecided => Verdict::Missed(Miss::Undecided),
            Delivery::Lost => Verdict::Missed(Miss::EventsLost),
            Delivery::Pending => Verdict::Unknown,
        }
    }

    /// Asks the kernel addresses of a member's unconnected UDP socket and of
    /// the sockets sharing its port, so that the events can tell which of
    /// them each datagram went to, and who else uses it: the member's
    /// through its own fd, each rival's through a holder looked for once,
    /// off the tracker.
    fn probe_rivals(&self, pid: i32, socket: &LiveSocket, rivals: &[u64]) {
        let Some(events) = &self.events else {
            return;
        };
        if let Err(err) = events.probe(pid, socket.fd, socket.inode, !rivals.is_empty())
            && {
                let mut unaskable = lock(&self.unaskable);
                // Kept small: a busy client's sockets come and go.
                if unaskable.len() >= 4096 {
                    unaskable.clear();
                }
                unaskable.insert(socket.inode)
            }
        {
            debug!(
                "{}: cannot ask socket {} its kernel address: {err}",
                self.stream.label(),
                socket.inode
            );
        }
        let missing: Vec<u64> = {
            let mut asked = lock(&self.rivals_asked);
            rivals
                .iter()
                .copied()
                .filter(|rival| asked.insert(*rival))
                .collect()
        };
        if missing.is_empty() {
            return;
        }
        let events = Arc::clone(events);
        let label = self.stream.label().to_owned();
        let _ = tracking::in_background(Box::new(move || {
            for rival in missing {
                let asked = crate::inventory::holder_of(rival)
                    .ok_or_else(|| std::io::Error::other("no process holds it"))
                    .and_then(|(pid, fd)| events.probe(pid, fd, rival, true));
                if let Err(err) = asked {
                    debug!("{label}: cannot ask socket {rival} its kernel address: {err}");
                }
            }
        }));
    }

    /// Whether a packet of no known owner yet, captured at `at` and queued
    /// at `seen`, may still get one: for [`CANDIDATE_TTL`] after the events
    /// read reach its time (a loaded reader may lag behind the captures),
    /// and never longer than [`CANDIDATE_TTL_LAGGING`].
    fn may_still_be_claimed(&self, at: SystemTime, seen: Instant) -> bool {
        let waited = seen.elapsed();
        if waited <= CANDIDATE_TTL {
            return true;
        }
        match &self.events {
            Some(events) => {
                waited <= CANDIDATE_TTL_LAGGING
                    && events.applied_until() < at + attribution::SKEW + CANDIDATE_TTL
            }
            None => false,
        }
    }

    /// The capture time of the newest packet seen.
    fn newest_packet(&self) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_nanos(self.newest_packet_ns.load(Ordering::Relaxed))
    }

    /// How long since a capture last handed over a packet.
    fn quiet_for(&self) -> Duration {
        lock(&self.last_packet).elapsed()
    }

    /// Whether the members' fds were looked at after `at`.
    fn looked_after(&self, at: SystemTime) -> bool {
        let looked = self.looked_ns.load(Ordering::Relaxed);
        at.duration_since(SystemTime::UNIX_EPOCH)
            .is_ok_and(|since| since.as_nanos() < u128::from(looked))
    }

    /// Whether an address is one of the namespaces' own (any, if unknown).
    fn is_local(&self, ip: std::net::IpAddr) -> bool {
        let networks = lock(&self.local_networks);
        networks.is_empty() || networks.iter().any(|network| network.contains(ip))
    }

    /// The member's socket a packet belongs to, if it is known to be one,
    /// in any of the namespaces captured.
    fn owner(&self, flow: &Flow, at: SystemTime, openings: &Openings) -> Option<Owner> {
        let namespaces: Vec<NetnsId> = lock(&self.capturing).iter().copied().collect();
        namespaces
            .into_iter()
            .find_map(|netns| self.owner_in(flow, at, openings, netns))
    }

    fn owner_in(
        &self,
        flow: &Flow,
        at: SystemTime,
        openings: &Openings,
        netns: NetnsId,
    ) -> Option<Owner> {
        match self.verdict(flow, at, openings, netns) {
            Verdict::Ours(owner) => Some(owner),
            Verdict::Foreign | Verdict::Unknown | Verdict::Missed(_) => None,
        }
    }

    /// The owner of a datagram that waited for a claim in vain, if a member
    /// holds the only socket it can have gone to, and no other process was
    /// seen using that socket: a receiver that never replies is claimed by
    /// nobody, and its socket's address may not be known yet.
    fn last_resort(&self, flow: &Flow, at: SystemTime, netns: NetnsId) -> Option<Owner> {
        if flow.transport != Transport::Udp {
            return None;
        }
        let by_namespace = read(&self.sockets);
        let bound = by_namespace.get(&netns)?.bound_owner(flow, at)?;
        if !bound.rivals.is_empty() {
            return None;
        }
        let members = read(&self.members);
        let shared = self.events.as_ref().is_some_and(|events| {
            events
                .users(bound.inode, at + deliveries::WINDOW)
                .is_some_and(|users| users.iter().any(|pid| !members.contains_key(pid)))
        });
        (!shared).then(|| bound.owner.clone())
    }

    /// A packet that waited for its owner in vain: a miss if it may have
    /// been the stream's (an end on a member's port, or a time when kernel
    /// events were lost).
    fn unplaced(&self, flow: &Flow, at: SystemTime, netns: NetnsId) {
        let events_lost = self
            .events
            .as_ref()
            .is_some_and(|events| events.lost_around(at));
        let on_our_ports = {
            let by_namespace = read(&self.sockets);
            let ports = by_namespace
                .get(&netns)
                .map(|sockets| sockets.ports(flow.transport))
                .unwrap_or_default();
            [flow.src, flow.dst]
                .iter()
                .any(|end| self.is_local(end.ip()) && ports.binary_search(&end.port()).is_ok())
        };
        if on_our_ports {
            self.stream.missed(if events_lost {
                Miss::EventsLost
            } else {
                Miss::Unplaced
            });
        } else if events_lost {
            self.stream.missed(Miss::EventsLost);
        } else if let Some(events) = &self.events
            && self.is_local(flow.src.ip())
            && self.is_local(flow.dst.ip())
        {
            // Both ends on this host and nobody claimed either: whose it
            // was is unknown, and the claims near it say why.
            debug!(
                "{}: {:?} {} > {} at {at:?}: nobody claimed it ({})",
                self.stream.label(),
                flow.transport,
                flow.src,
                flow.dst,
                events.owners().describe(flow, at)
            );
        }
    }

    /// A packet found to be another process's.
    fn foreign_packet(&self, flow: &Flow) {
        self.unclaimed.fetch_add(1, Ordering::Relaxed);
        *lock(&self.unclaimed_flows)
            .entry(foreign(flow))
            .or_insert(0) += 1;
    }

    /// The owner for a claim by `claimant`, if it is a member (for `tree`,
    /// a process forked by a member since the tracker last looked is one).
    fn member_owner(
        &self,
        claimant: &Claimant,
        transport: Transport,
        netns: NetnsId,
    ) -> Option<Owner> {
        // The lookup's read guard must be gone before a new member may be
        // written below (a read guard held across the write deadlocks).
        let known = read(&self.members).get(&claimant.pid).cloned();
        let member = known.or_else(|| {
            if self.scope != Scope::Tree {
                return None;
            }
            let events = self.events.as_ref()?;
            let (descends, inherited) = {
                let members = read(&self.members);
                let owners = events.owners();
                (
                    owners.descends_from(claimant.pid, |pid| members.contains_key(&pid)),
                    // A process gone already (a worker forked to serve one
                    // request) had the namespace of its nearest known
                    // ancestor, as a fork keeps it: without one, its
                    // claims would speak of every namespace's copies.
                    owners.nearest_ancestor(claimant.pid, |pid| {
                        crate::inventory::netns_of(pid as i32)
                            .or_else(|| members.get(&pid).and_then(|member| member.netns))
                    }),
                )
            };
            if !descends {
                return None;
            }
            let member = Member {
                comm: std::fs::read_to_string(format!("/proc/{}/comm", claimant.pid))
                    .map(|comm| comm.trim_end_matches('\n').to_owned())
                    .unwrap_or_default(),
                // It inherited its parent's credentials at fork; were it not
                // the reader's by now it would have changed them, which the
                // tracker sees at its next look.
                uid: self.reader.unwrap_or(0),
                netns: inherited,
            };
            write(&self.members).insert(claimant.pid, member.clone());
            Some(member)
        })?;
        // Its claims speak of its own namespace's packets (events carry no
        // namespace: a container's flow seen crossing the host is not its
        // there).
        if member.netns.is_some_and(|own| own != netns) {
            return None;
        }
        let proto = match (transport, claimant.local) {
            (Transport::Tcp, SocketAddr::V4(_)) => Proto::Tcp,
            (Transport::Tcp, SocketAddr::V6(_)) => Proto::Tcp6,
            (Transport::Udp, SocketAddr::V4(_)) => Proto::Udp,
            (Transport::Udp, SocketAddr::V6(_)) => Proto::Udp6,
        };
        Some(Owner {
            name: names::socket_file_name(proto, claimant.local, claimant.remote).into(),
            uid: member.uid,
            pid: claimant.pid,
        })
    }

    /// Queues a packet of the member's socket `owner`, unless the reader is
    /// another user than the socket's: a reader who is not root gets only
    /// what the kernel gave to, or sent from, that reader's own sockets.
    /// Each packet goes out once (a second copy, captured on a bridge and
    /// its port, or in two members' namespaces, is left out), and, while
    /// captures run in several namespaces, in time order.
    fn emit(&self, owner: &Owner, timestamp: Timestamp, original_length: u32, data: &[u8]) {
        let at = self.wall_time(timestamp);
        self.ours.fetch_add(1, Ordering::Relaxed);
        let cut_off = self.revoked.load(Ordering::Relaxed)
            && lock(&self.cutoff).is_some_and(|cutoff| at > cutoff);
        if cut_off || self.reader.is_some_and(|reader| reader != owner.uid) {
            self.withheld.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let several = self.several_captures.load(Ordering::Relaxed);
        let linktype = self.linktype.load(Ordering::Relaxed);
        // On loopback a packet is captured once (libpcap leaves out the
        // outgoing copy); elsewhere a bridge and its port, or two
        // namespaces, may each show it.
        if (several || !on_loopback(linktype, data))
            && let Some(identity) = packet_identity(linktype, data)
            && lock(&self.copies).is_copy(identity, at)
        {
            self.copies_left_out.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let comment = (self.stream.format == Format::PcapNg).then(|| {
            let comm = read(&self.members)
                .get(&owner.pid)
                .map(|member| member.comm.clone())
                .unwrap_or_default();
            format!("pid={} comm={comm} socket={}", owner.pid, owner.name)
        });
        if several {
            lock(&self.reorder).push(
                at,
                Held {
                    timestamp,
                    original_length,
                    data: data.to_vec(),
                    comment,
                },
            );
        } else {
            self.stream
                .push(timestamp, original_length, data, comment.as_deref());
        }
    }

    /// Lets out the packets held for order that are due (all of them at
    /// the end).
    fn release_held(&self, all: bool) {
        let due = {
            let mut reorder = lock(&self.reorder);
            if reorder.is_empty() {
                return;
            }
            if all {
                reorder.drain()
            } else {
                let delay = Duration::from_nanos(self.order_delay_ns.load(Ordering::Relaxed));
                // Nothing newer than the oldest packet still waiting for its
                // owner: it may yet be the stream's.
                let waiting = lock(&self.candidates)
                    .queue
                    .iter()
                    .map(|candidate| self.wall_time(candidate.timestamp))
                    .min();
                reorder.due(SystemTime::now(), delay, waiting)
            }
        };
        for held in due {
            self.stream.push(
                held.timestamp,
                held.original_length,
                &held.data,
                held.comment.as_deref(),
            );
        }
    }

    /// Keeps the waiting packets whose owner is now known, in the order
    /// they came (a flow's later packets never overtake its first waiting
    /// one); drops those that waited too long.
    fn sort_candidates(&self) {
        if let Some(events) = &self.events {
            let until = events
                .applied_until()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |since| {
                    u64::try_from(since.as_nanos()).unwrap_or(u64::MAX)
                });
            if self.sorted_until_ns.swap(until, Ordering::Relaxed) == until {
                return;
            }
        }
        let openings = lock(&self.openings);
        let mut waiting = lock(&self.candidates);
        let mut kept = Waiting::default();
        let mut blocked: rustc_hash::FxHashSet<ForeignFlow> = rustc_hash::FxHashSet::default();
        for candidate in std::mem::take(&mut waiting.queue) {
            let key = foreign(&candidate.flow);
            if blocked.contains(&key) {
                kept.push(candidate);
                continue;
            }
            let at = self.wall_time(candidate.timestamp);
            match self.verdict(&candidate.flow, at, &openings, candidate.netns) {
                Verdict::Ours(owner) => {
                    self.candidate_bytes
                        .fetch_sub(candidate.data.len(), Ordering::Relaxed);
                    self.emit(
                        &owner,
                        candidate.timestamp,
                        candidate.original_length,
                        &candidate.data,
                    );
                }
                Verdict::Unknown if self.may_still_be_claimed(at, candidate.seen) => {
                    blocked.insert(key);
                    kept.push(candidate);
                }
                Verdict::Missed(miss) => {
                    self.candidate_bytes
                        .fetch_sub(candidate.data.len(), Ordering::Relaxed);
                    self.stream.missed(miss);
                }
                Verdict::Unknown
                    if let Some(owner) = self.last_resort(&candidate.flow, at, candidate.netns) =>
                {
                    self.candidate_bytes
                        .fetch_sub(candidate.data.len(), Ordering::Relaxed);
                    self.emit(
                        &owner,
                        candidate.timestamp,
                        candidate.original_length,
                        &candidate.data,
                    );
                }
                verdict @ (Verdict::Foreign | Verdict::Unknown) => {
                    if matches!(verdict, Verdict::Unknown) {
                        self.unplaced(&candidate.flow, at, candidate.netns);
                    }
                    log::trace!(
                        "{}: {:?} {} > {} (syn {}) at {at:?}: {} after waiting {:?}",
                        self.stream.label(),
                        candidate.flow.transport,
                        candidate.flow.src,
                        candidate.flow.dst,
                        candidate.flow.opening,
                        if matches!(verdict, Verdict::Foreign) {
                            "another process's"
                        } else {
                            "unclaimed"
                        },
                        candidate.seen.elapsed()
                    );
                    self.candidate_bytes
                        .fetch_sub(candidate.data.len(), Ordering::Relaxed);
                    self.foreign_packet(&candidate.flow);
                }
            }
        }
        *waiting = kept;
    }

    /// Rewrites the kernel filter where the excluded flows should change:
    /// flows often unclaimed join it, flows a member now owns leave it.
    fn narrow(&self) {
        let now = SystemTime::now();
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
            self.owner(&packet, now, &openings).is_some()
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

/// One capture's sink: the stream's sorter, told which namespace the
/// capture runs in.
struct Captured {
    sorter: Arc<ProcessSink>,
    netns: NetnsId,
}

impl PacketSink for Captured {
    fn packet(&self, timestamp: Timestamp, original_length: u32, data: &[u8]) {
        self.sorter
            .packet_in(self.netns, timestamp, original_length, data);
    }

    fn batch_end(&self) {
        *lock(&self.sorter.last_packet) = Instant::now();
        self.sorter.stream.batch_end();
    }

    fn ended(&self, stats: CaptureStats) {
        self.sorter.capture_ended(stats);
    }
}

impl ProcessSink {
    /// The sink of the first capture, in the process's own namespace.
    pub fn first_sink(self: &Arc<Self>) -> Arc<dyn PacketSink> {
        Arc::new(Captured {
            sorter: Arc::clone(self),
            netns: self.first,
        })
    }

    /// A packet the capture in namespace `netns` took.
    fn packet_in(&self, netns: NetnsId, timestamp: Timestamp, original_length: u32, data: &[u8]) {
        let linktype = self.linktype.load(Ordering::Relaxed);
        if passing_by(linktype, data) {
            return;
        }
        let Some(flow) = flow_of(linktype, data) else {
            return;
        };
        self.seen.fetch_add(1, Ordering::Relaxed);
        let nanos = self.unix_nanos(timestamp);
        let at = SystemTime::UNIX_EPOCH + Duration::from_nanos(nanos);
        self.newest_packet_ns.fetch_max(nanos, Ordering::Relaxed);
        let verdict = {
            let mut openings = lock(&self.openings);
            openings.record(&flow, at);
            // Behind a waiting packet of its flow, it waits too.
            // (Nothing waits while no bytes do: the queue's lock is left
            // alone for most packets.)
            let behind = self.candidate_bytes.load(Ordering::Relaxed) > 0 && {
                let waiting = lock(&self.candidates);
                !waiting.queue.is_empty() && waiting.flows.contains_key(&foreign(&flow))
            };
            if behind {
                Verdict::Unknown
            } else {
                self.verdict(&flow, at, &openings, netns)
            }
        };
        match verdict {
            Verdict::Ours(owner) => self.emit(&owner, timestamp, original_length, data),
            Verdict::Missed(miss) => self.stream.missed(miss),
            Verdict::Foreign => {
                log::trace!(
                    "{}: {:?} {} > {} (syn {}) at {at:?}: another process's at once",
                    self.stream.label(),
                    flow.transport,
                    flow.src,
                    flow.dst,
                    flow.opening
                );
                self.foreign_packet(&flow)
            }
            Verdict::Unknown => {
                if self.candidate_bytes.load(Ordering::Relaxed) + data.len() > CANDIDATE_BYTES {
                    // No room to wait: a miss if it may have been ours, and
                    // a flow to leave out in the kernel if it goes on so.
                    self.unplaced(&flow, at, netns);
                    self.foreign_packet(&flow);
                    return;
                }
                self.candidate_bytes
                    .fetch_add(data.len(), Ordering::Relaxed);
                lock(&self.candidates).push(Candidate {
                    netns,
                    seen: Instant::now(),
                    timestamp,
                    original_length,
                    data: data.to_vec(),
                    flow,
                });
                if let Some(poke) = self.poke.get() {
                    poke.poke();
                }
                if let Some(events) = &self.events {
                    events.hurry();
                }
            }
        }
    }

    /// One of the captures ended; the stream ends with the last.
    fn capture_ended(&self, stats: CaptureStats) {
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
        self.release_held(true);
        self.stream.share(
            self.ours.load(Ordering::Relaxed),
            self.seen.load(Ordering::Relaxed),
        );
        debug!(
            "{}: {} packets of the namespace belonged to no member, {} to sockets of another \
             user, {} were second copies of one packet",
            self.stream.label(),
            self.unclaimed.load(Ordering::Relaxed),
            self.withheld.load(Ordering::Relaxed),
            self.copies_left_out.load(Ordering::Relaxed)
        );
        self.stream.ended(stats);
    }
}

/// Whether a frame was captured on a loopback device (a Linux cooked
/// header says which kind of device).
fn on_loopback(linktype: i32, frame: &[u8]) -> bool {
    const ARPHRD_LOOPBACK: u16 = 772;
    let hardware = match linktype {
        113 => frame.get(2..4),
        276 => frame.get(8..10),
        _ => None,
    };
    hardware.is_some_and(|bytes| u16::from_be_bytes([bytes[0], bytes[1]]) == ARPHRD_LOOPBACK)
}

/// Whether a frame only passed through this namespace between two other
/// hosts (a Linux cooked header's packet type PACKET_OTHERHOST: a bridge
/// port's view of two containers talking). No socket of the namespace sent
/// or got it: the kernel gives a socket only frames to this host or from
/// it, and the same packet is taken where its socket lives.
fn passing_by(linktype: i32, frame: &[u8]) -> bool {
    const PACKET_OTHERHOST: u16 = 3;
    let kind = match linktype {
        113 => frame
            .get(0..2)
            .map(|bytes| u16::from_be_bytes([bytes[0], bytes[1]])),
        276 => frame.get(10).map(|kind| u16::from(*kind)),
        _ => None,
    };
    kind == Some(PACKET_OTHERHOST)
}

/// How a socket with no peer is named: `0.0.0.0:0` or `[::]:0`.
fn unconnected(local: std::net::SocketAddr) -> std::net::SocketAddr {
    match local {
        std::net::SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
        std::net::SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    }
}

/// The tracker's view of the members: a watch per live member, and the
/// watches of members that exited (their sockets linger for their last
/// packets until the stream ends).
struct Tracker {
    watches: Vec<ProcessWatch>,
    exited: Vec<ProcessWatch>,
}

impl Tracker {
    fn all_watches(&self) -> impl Iterator<Item = &ProcessWatch> {
        self.watches.iter().chain(&self.exited)
    }

    /// Looks at every live member's fds; true if any socket changed.
    fn rescan(&mut self) -> bool {
        let mut changed = false;
        for watch in &mut self.watches {
            changed |= watch.rescan();
        }
        changed
    }

    /// Moves members that exited aside, their sockets closed as of now;
    /// true if any did.
    fn reap(&mut self) -> bool {
        let (gone, live): (Vec<_>, Vec<_>) = std::mem::take(&mut self.watches)
            .into_iter()
            .partition(ProcessWatch::exited);
        self.watches = live;
        let any = !gone.is_empty();
        for mut watch in gone {
            watch.all_closed();
            self.exited.push(watch);
        }
        any
    }

    /// For a `tree` stream: follows every descendant of the members that
    /// runs now and is not followed yet; true if any was new.
    fn adopt_descendants(&mut self, sink: &ProcessSink) -> bool {
        let mut queue: Vec<i32> = self.watches.iter().map(ProcessWatch::pid).collect();
        let mut known: HashSet<i32> = self.all_watches().map(ProcessWatch::pid).collect();
        let mut adopted = false;
        while let Some(pid) = queue.pop() {
            for child in children_of(pid) {
                if !known.insert(child) {
                    continue;
                }
                queue.push(child);
                let Ok(stat) = procfs::process::Process::new(child).and_then(|p| p.stat()) else {
                    continue;
                };
                let Ok(watch) = ProcessWatch::open(child, stat.starttime) else {
                    continue;
                };
                write(&sink.members).insert(
                    child as u32,
                    Member {
                        comm: watch.comm(),
                        uid: watch.owner().unwrap_or(u32::MAX),
                        netns: crate::inventory::netns_of(child),
                    },
                );
                self.watches.push(watch);
                adopted = true;
            }
        }
        adopted
    }
}

/// Member `pid`'s namespace socket tables, as neighbour rows: what may
/// take flows from an unconnected socket, that is TCP listeners (of TCP
/// only they do: see `taken_from`; the established and TIME_WAIT rows,
/// thousands after a burst of short connections, are never parsed) and
/// every UDP socket.
fn read_neighbour_rows(pid: i32) -> Vec<NeighbourRow> {
    let proc_pid = std::path::PathBuf::from(format!("/proc/{pid}"));
    let mut rows = Vec::new();
    for proto in [Proto::Tcp, Proto::Tcp6, Proto::Udp, Proto::Udp6] {
        let tcp = matches!(proto, Proto::Tcp | Proto::Tcp6);
        let table = if tcp {
            read_table_in_state(&proc_pid, proto, TCP_LISTEN)
        } else {
            read_table(&proc_pid, proto)
        };
        let Ok(table) = table else {
            continue;
        };
        rows.extend(table.rows.into_iter().map(|row| {
            (
                row.local,
                row.remote,
                tcp && row.state == TCP_LISTEN,
                row.inode,
            )
        }));
    }
    rows
}

/// A stream's tracker, stepped by a tracker thread ([`tracking`]): it
/// looks at the members' fds when a packet of an unknown flow comes, and
/// on its own every few milliseconds while they open sockets (so that
/// short-lived ones are seen too), less often when they are quiet. It
/// ends the stream when the members have exited (after [`EXIT_GRACE`]) or
/// the process is no longer the reader's, and itself when the capture is
/// gone.
struct Following {
    sink: Weak<ProcessSink>,
    tracker: Tracker,
    phase: Phase,
    last_change: Instant,
    interval: Duration,
    last_adoption: Instant,
    last_rescan: Instant,
}

enum Phase {
    Tracking,
    /// Sorting on for `grace` (the flows' last packets), then until the
    /// capture has caught up with the moment the stream was to end (a
    /// packet stamped after `decided` came, or none came for
    /// [`DRAIN_QUIET`]: what the kernel's ring held is drained), at most
    /// [`DRAIN_LIMIT`] more; then the stream ends.
    Draining {
        decided: SystemTime,
        started: Instant,
        grace: Duration,
    },
}

impl Phase {
    fn draining(grace: Duration) -> Phase {
        Phase::Draining {
            decided: SystemTime::now(),
            started: Instant::now(),
            grace,
        }
    }
}

impl tracking::Followed for Following {
    fn step(&mut self, _now: Instant) -> Option<Duration> {
        let sink = self.sink.upgrade()?;
        match self.phase {
            Phase::Tracking => Some(self.track(&sink)),
            Phase::Draining {
                decided,
                started,
                grace,
            } => drain(&sink, decided, started, grace),
        }
    }
}

impl Following {
    /// One look at the members; how long until the next.
    fn track(&mut self, sink: &Arc<ProcessSink>) -> Duration {
        if let Some(reader) = sink.reader
            && let Some(root) = self
                .tracker
                .watches
                .iter()
                .find(|w| w.pid() as u32 == sink.root)
            && root.owner() != Some(reader)
        {
            // It changed credentials, or execs a setuid, setgid or
            // file-capability program: /proc closes it to the reader now,
            // and so does its stream: nothing captured from now on is given
            // to the reader; what the kernel holds from before is.
            debug!(
                "{}: the process is no longer the reader's (uid {reader}); ending the stream",
                sink.stream.label()
            );
            *lock(&sink.cutoff) = Some(SystemTime::now());
            sink.revoked.store(true, Ordering::Relaxed);
            self.phase = Phase::draining(revoke_drain());
            return DRAIN_QUIET / 2;
        }
        let started = Instant::now();
        let mut changed = self.tracker.reap();
        if sink.scope == Scope::Tree && self.last_adoption.elapsed() >= RESCAN_INTERVAL {
            changed |= self.tracker.adopt_descendants(sink);
            self.last_adoption = Instant::now();
        }
        if self.tracker.watches.is_empty() {
            debug!(
                "{}: the process exited; the stream ends in {EXIT_GRACE:?}",
                sink.stream.label()
            );
            sink.update(&self.tracker);
            // Its flows' last packets (the peer's FIN, the last ACKs) come
            // after the exit, as they do after a socket file's close.
            self.phase = Phase::draining(EXIT_GRACE);
            return DRAIN_QUIET / 2;
        }
        let (busy_interval, rescan_interval) = if sink.follows_events() {
            (EVENTS_BUSY_INTERVAL, EVENTS_RESCAN_INTERVAL)
        } else {
            (BUSY_INTERVAL, RESCAN_INTERVAL)
        };
        let busy = self.last_change.elapsed() < BUSY_FOR;
        let due = if busy { busy_interval } else { rescan_interval };
        // A poke (a packet waits) looks again at once only following /proc:
        // with events, what the packet waits for is the events.
        if self.last_rescan.elapsed() >= due || !sink.follows_events() {
            let looked = SystemTime::now();
            changed |= self.tracker.rescan();
            self.last_rescan = Instant::now();
            if changed {
                sink.update(&self.tracker);
                self.last_change = Instant::now();
                changed = false;
            }
            sink.looked_ns.store(
                looked
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0, |since| {
                        u64::try_from(since.as_nanos()).unwrap_or(u64::MAX)
                    }),
                Ordering::Relaxed,
            );
        }
        // What the namespace's other sockets take, or share, changed.
        changed |= sink.neighbours_changed.swap(false, Ordering::Relaxed);
        if changed {
            sink.update(&self.tracker);
            self.last_change = Instant::now();
        } else if !lock(&sink.candidates).queue.is_empty() {
            sink.sort_candidates();
            sink.stream.batch_end();
        }
        if let Some(events) = &sink.events
            && !lock(&sink.candidates).queue.is_empty()
        {
            // What still waits may wait for events not read yet.
            events.hurry();
        }
        sink.narrow();
        sink.release_held(false);
        // Never spend more than about a fifth of a core looking.
        self.interval = busy_interval.max(started.elapsed() * 4);
        if self.last_change.elapsed() < BUSY_FOR {
            self.interval
        } else {
            rescan_interval
        }
    }
}

/// One step of [`Phase::Draining`]: how long until the next, or `None`
/// once the stream has been told to end.
fn drain(
    sink: &ProcessSink,
    decided: SystemTime,
    started: Instant,
    grace: Duration,
) -> Option<Duration> {
    sink.sort_candidates();
    sink.release_held(false);
    sink.stream.batch_end();
    let elapsed = started.elapsed();
    let caught_up = sink.newest_packet() >= decided || sink.quiet_for() >= DRAIN_QUIET;
    if (elapsed >= grace && caught_up) || elapsed >= grace + DRAIN_LIMIT {
        sink.sort_candidates();
        sink.stream.stop_capture();
        return None;
    }
    Some(DRAIN_QUIET / 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_a_bridge_port_passes_between_others_is_nobody_s_here() {
        // Linux cooked headers (v1: packet type in bytes 0-1; v2: byte 10).
        let sll = |kind: u16| {
            let mut frame = vec![0u8; 16];
            frame[0..2].copy_from_slice(&kind.to_be_bytes());
            frame
        };
        let sll2 = |kind: u8| {
            let mut frame = vec![0u8; 20];
            frame[10] = kind;
            frame
        };
        assert!(passing_by(113, &sll(3)));
        assert!(passing_by(276, &sll2(3)));
        // To this host, broadcast, multicast, from this host: a socket's.
        for kind in [0, 1, 2, 4] {
            assert!(!passing_by(113, &sll(kind)));
            assert!(!passing_by(276, &sll2(kind as u8)));
        }
        // No cooked header, or too short to say: kept.
        assert!(!passing_by(1, &sll(3)));
        assert!(!passing_by(113, &[0]));
    }
}
