//! An open socket file: the capture's packets as a pcap byte stream.
//!
//! The capture's poller encodes each packet as a pcap record into a chunk of
//! up to 1 MiB; full chunks go through a crossbeam channel. The queue is
//! bounded in bytes (`--buffer`): beyond it packets are dropped and counted.
//! A read takes as many whole or partial records as are queued, up to the
//! size asked for (a whole chunk is handed over without a copy); with
//! nothing queued it waits, and is answered later from another thread: one
//! of the daemon's stream servers ([`Servers`], shared by every stream),
//! called once per kernel block of packets, or the watchdog (`table.rs`)
//! when the reader is signalled, the socket has closed, or the daemon shuts
//! down. Neither the FUSE session loop nor a capture poller ever waits on a
//! reader, and no stream has a thread of its own.
//!
//! End of stream: once the capture has ended (the socket closed and a short
//! grace period passed for its last packets, or shutdown), reads drain the
//! queue and then return EOF.

pub mod closings;
pub mod mailbox;
pub mod neighbours;
pub mod ordering;
pub mod pcap;
pub mod pcapng;
pub mod process;
pub mod quota;
pub mod shared_port;
pub mod table;
pub mod tracking;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use crate::capture::source::{CaptureControl, CaptureStats, Opened, PacketSink, Timestamp};
use crate::inventory::probe::{SocketOwner, reader_has_actionable_signal};

/// The file format of every stream.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Format {
    /// Classic pcap: what every tool reads.
    #[default]
    Pcap,
    /// pcapng, with a comment on each packet naming its process and socket.
    PcapNg,
}

/// Why a packet a stream should hold is not in it, beside the kernel's
/// ring overflowing and the queue filling (counted by the capture and the
/// queue themselves).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Miss {
    /// Several sockets share its port, and the kernel's events did not tell
    /// which one it went to (or came from): withheld.
    Undecided,
    /// It waited for its owner to be known, on a port of the stream's own
    /// sockets, and none came.
    Unplaced,
    /// The kernel's events that would have told whose it was were lost.
    EventsLost,
}

/// Counts of [`Miss`]es.
#[derive(Debug, Default)]
struct Misses {
    undecided: AtomicU64,
    unplaced: AtomicU64,
    events_lost: AtomicU64,
}

impl Misses {
    fn counter(&self, miss: Miss) -> &AtomicU64 {
        match miss {
            Miss::Undecided => &self.undecided,
            Miss::Unplaced => &self.unplaced,
            Miss::EventsLost => &self.events_lost,
        }
    }
}

/// How a waiting read is answered.
pub enum Answer<'a> {
    /// Bytes of the stream; empty means end of file.
    Data(&'a [u8]),
    /// The reader has a signal to act on: answer EINTR.
    Interrupted,
}

/// Answers one read, from whichever thread has the answer.
pub type Responder = Box<dyn for<'a> FnOnce(Answer<'a>) + Send>;

/// How often a stream with a waiting reader checks that its socket is still
/// held by its process.
const LIVENESS_INTERVAL: Duration = Duration::from_millis(400);
/// How long a closed socket's capture keeps running, for the last packets
/// (FIN, RST, final ACK) still on their way through the kernel.
pub const CLOSE_GRACE: Duration = Duration::from_millis(300);

struct PendingRead {
    id: u64,
    size: usize,
    /// The thread blocked in read(), watched for signals.
    caller: u32,
    respond: Responder,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Lifecycle {
    /// The socket is (as far as we know) open.
    Open { checked: Instant },
    /// The socket was found closed; the capture runs a little longer.
    Closing { since: Instant },
    /// The capture was told to stop.
    Stopping,
}

/// The most a chunk of records holds: the size readers ask for (socket
/// files report it as their block size).
const CHUNK_BYTES: usize = 1 << 20;

/// How many spent chunk buffers a stream keeps for reuse.
const SPARE_CHUNKS: usize = 2;
/// The sizes a chunk's buffer grows through.
const GROWTH_STEPS: [usize; 3] = [64 << 10, 256 << 10, CHUNK_BYTES];
/// The least buffer kept for reuse: a busy stream's chunk of the second
/// step or more (mapped by the allocator of its own, see crate::memory,
/// and faulted in page by page when made anew).
const RECYCLED_BYTES: usize = 256 << 10;

/// Whole pcap records, queued together.
#[derive(Default)]
struct Chunk {
    bytes: Vec<u8>,
    records: u64,
    /// The latest records' offsets and stamps, in time order: where a
    /// record stamped earlier than they are goes.
    recent: VecDeque<(usize, Timestamp)>,
}

/// How many of the latest records a record stamped before them may still
/// be put in front of. Two CPUs capturing at once write one ring: a packet
/// stamped first may get its place after one stamped a few microseconds
/// later (a container's `all` went back in time so, now and then).
const REORDER_DEPTH: usize = 16;

impl Chunk {
    /// Appends the record `append` writes, stamped `at`, in front of the
    /// latest records of this chunk stamped after it (up to
    /// [`REORDER_DEPTH`] back): records come in time order where they
    /// came out of order by a little.
    fn append_in_order(&mut self, at: Timestamp, append: impl FnOnce(&mut Vec<u8>)) {
        let key = |stamp: &Timestamp| (stamp.seconds, stamp.fraction);
        let start = self.bytes.len();
        append(&mut self.bytes);
        let len = self.bytes.len() - start;
        let later = self
            .recent
            .iter()
            .rev()
            .take_while(|(_, stamp)| key(stamp) > key(&at))
            .count();
        if later == 0 {
            self.recent.push_back((start, at));
        } else {
            let index = self.recent.len() - later;
            let offset = self.recent[index].0;
            self.bytes[offset..].rotate_right(len);
            for entry in self.recent.iter_mut().skip(index) {
                entry.0 += len;
            }
            self.recent.insert(index, (offset, at));
        }
        if self.recent.len() > REORDER_DEPTH {
            self.recent.pop_front();
        }
        self.records += 1;
    }

    /// Appends bytes that are no record (a statistics block): nothing goes
    /// in front of them.
    fn append_other(&mut self, bytes: &[u8]) {
        self.bytes.extend_from_slice(bytes);
        self.recent.clear();
    }
}

struct ReadState {
    /// Bytes due before the next queued chunk: the global header at first,
    /// later the rest of a chunk a read could only take part of.
    carry: Vec<u8>,
    carry_from: usize,
    /// The buffer replies are put together in, kept between reads: a
    /// fresh one each read would be mapped and its pages faulted in anew.
    scratch: Vec<u8>,
    pending: VecDeque<PendingRead>,
    next_read_id: u64,
    lifecycle: Lifecycle,
}

/// One open socket file.
pub struct Stream {
    label: String,
    owner: SocketOwner,
    queue_limit: usize,
    format: Format,
    /// The pcapng comment of every packet of a one-socket stream.
    comment: Option<String>,
    /// Whether the capture's timestamps are in nanoseconds (pcapng units).
    nanoseconds: AtomicBool,
    chunks_in: Sender<Chunk>,
    chunks_out: Receiver<Chunk>,
    /// The chunk the capture's poller is filling. Full chunks are sent while
    /// this lock is held, so a reader that holds it sees them in order.
    building: Mutex<Chunk>,
    /// The stream itself, for the servers' queue.
    me: Weak<Stream>,
    /// Queued for a server to answer its waiting reads (at most once).
    rung: AtomicBool,
    /// Chunk buffers handed back by readers, so a busy stream does not
    /// allocate (and fault in) a fresh megabyte per chunk.
    spare_in: Sender<Vec<u8>>,
    spare_out: Receiver<Vec<u8>>,
    queued_bytes: AtomicUsize,
    dropped_by_queue: AtomicU64,
    /// Records queued, and records handed to the reader.
    pushed: AtomicU64,
    delivered: AtomicU64,
    /// What the stream should hold and does not, beside the kernel's and
    /// the queue's drops.
    misses: Misses,
    /// The capture takes in more than the stream's packets (an `all` or
    /// `tree` stream's takes its namespaces' TCP and UDP, and sorts): what
    /// the kernel dropped may be anyone's.
    broad: AtomicBool,
    /// Of the packets a broad capture took in, how many were the stream's.
    share: Mutex<(u64, u64)>,
    /// The capture ended: what is queued is all there will be.
    capture_ended: AtomicBool,
    has_pending: AtomicBool,
    state: Mutex<ReadState>,
    /// The captures feeding the stream (an `all` stream has one per
    /// network namespace of its process's sockets).
    controls: Mutex<Vec<CaptureControl>>,
    /// For an unconnected socket: what more specific sockets take, kept
    /// out of its filter.
    neighbours: Mutex<Option<Arc<neighbours::Neighbours>>>,
    /// For an unconnected UDP socket: what sorts its datagrams by the
    /// socket the kernel gave them to (it feeds this stream).
    gate: Mutex<Weak<shared_port::SharedPortGate>>,
    /// Set once the stream is to end: a capture added later stops at once.
    stopping: AtomicBool,
    /// Set once released and once ended; the closing log line is written by
    /// whichever comes second, when both the counts and stats are final.
    closing_report: Mutex<(bool, Option<CaptureStats>)>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Stream {
    /// A stream, its reads answered by the daemon's [`Servers`].
    pub fn start(
        label: String,
        owner: SocketOwner,
        queue_limit: usize,
        format: Format,
        comment: Option<String>,
    ) -> Arc<Stream> {
        let (chunks_in, chunks_out) = crossbeam_channel::unbounded();
        let (spare_in, spare_out) = crossbeam_channel::bounded(SPARE_CHUNKS);
        Arc::new_cyclic(|me| Stream {
            label,
            owner,
            queue_limit,
            format,
            comment,
            nanoseconds: AtomicBool::new(true),
            chunks_in,
            chunks_out,
            building: Mutex::new(Chunk::default()),
            me: me.clone(),
            rung: AtomicBool::new(false),
            spare_in,
            spare_out,
            queued_bytes: AtomicUsize::new(0),
            dropped_by_queue: AtomicU64::new(0),
            pushed: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            misses: Misses::default(),
            broad: AtomicBool::new(false),
            share: Mutex::new((0, 0)),
            capture_ended: AtomicBool::new(false),
            has_pending: AtomicBool::new(false),
            state: Mutex::new(ReadState {
                carry: Vec::new(),
                carry_from: 0,
                scratch: Vec::new(),
                pending: VecDeque::new(),
                next_read_id: 0,
                lifecycle: Lifecycle::Open {
                    checked: Instant::now(),
                },
            }),
            controls: Mutex::new(Vec::new()),
            neighbours: Mutex::new(None),
            gate: Mutex::new(Weak::new()),
            stopping: AtomicBool::new(false),
            closing_report: Mutex::new((false, None)),
        })
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    /// The capture opened: the stream starts with the file header.
    pub fn opened(&self, opened: Opened) {
        self.nanoseconds
            .store(opened.nanosecond_timestamps, Ordering::SeqCst);
        let header = match self.format {
            Format::Pcap => pcap::global_header,
            Format::PcapNg => pcapng::file_header,
        };
        lock(&self.state).carry = header(
            opened.linktype,
            opened.snaplen,
            opened.nanosecond_timestamps,
        );
        if let Some(neighbours) = lock(&self.neighbours).as_ref() {
            neighbours.opened(opened.local_networks.clone());
        }
        self.add_capture(opened.control);
    }

    /// Keeps out of this stream what more specific sockets take, from now
    /// on (the capture's first filter already leaves out what they take at
    /// open).
    pub fn follow_neighbours(&self, neighbours: Arc<neighbours::Neighbours>) {
        *lock(&self.neighbours) = Some(neighbours);
    }

    /// Tells the neighbours' changes of rivals to `gate`.
    pub fn gated_by(&self, gate: &Arc<shared_port::SharedPortGate>) {
        *lock(&self.gate) = Arc::downgrade(gate);
    }

    /// A read of up to `size` bytes by thread `caller`.
    pub fn read(&self, size: u32, caller: u32, respond: Responder) {
        let mut state = lock(&self.state);
        if state.pending.is_empty() {
            let bytes = self.take(&mut state, size as usize);
            if !bytes.is_empty() {
                drop(state);
                respond(Answer::Data(&bytes));
                self.recycle(bytes);
                return;
            }
            if self.finished(&state) {
                drop(state);
                respond(Answer::Data(&[]));
                return;
            }
        }
        let id = state.next_read_id;
        state.next_read_id += 1;
        state.pending.push_back(PendingRead {
            id,
            size: size as usize,
            caller,
            respond,
        });
        // Publish the waiting read before looking at the queue once more: a
        // packet queued meanwhile either sees the flag or is found here.
        self.has_pending.store(true, Ordering::SeqCst);
        self.serve(&mut state);
    }

    /// Answers waiting reads for which there is data or an end.
    pub fn serve_pending(&self) {
        let mut state = lock(&self.state);
        self.serve(&mut state);
    }

    fn serve(&self, state: &mut ReadState) {
        while let Some(size) = state.pending.front().map(|read| read.size) {
            // What is carried answers the read alone: straight from it.
            if state.carry.len() - state.carry_from >= size {
                let from = state.carry_from;
                if let Some(read) = state.pending.pop_front() {
                    (read.respond)(Answer::Data(&state.carry[from..from + size]));
                }
                self.consume_carry(state, size);
                continue;
            }
            let bytes = self.take(state, size);
            if bytes.is_empty() && !self.finished(state) {
                state.scratch = bytes;
                break;
            }
            if let Some(read) = state.pending.pop_front() {
                (read.respond)(Answer::Data(&bytes));
            }
            self.give_back(state, bytes, size);
        }
        self.has_pending
            .store(!state.pending.is_empty(), Ordering::SeqCst);
    }

    /// Up to `size` bytes: the carry first, then queued chunks, the last
    /// one split if it does not fit. A chunk that fits whole while nothing
    /// is carried is handed over as it is, without a copy; pieces are put
    /// together in the reply buffer.
    fn take(&self, state: &mut ReadState, size: usize) -> Vec<u8> {
        let mut out = std::mem::take(&mut state.scratch);
        out.clear();
        loop {
            let room = size - out.len();
            if room == 0 {
                break;
            }
            let carried = state.carry.len() - state.carry_from;
            if carried > 0 {
                let part = room.min(carried);
                out.extend_from_slice(&state.carry[state.carry_from..state.carry_from + part]);
                self.consume_carry(state, part);
                continue;
            }
            let Some(chunk) = self.next_chunk() else {
                break;
            };
            if out.is_empty() && chunk.bytes.len() <= room {
                state.scratch = std::mem::replace(&mut out, chunk.bytes);
            } else {
                state.carry = chunk.bytes;
            }
        }
        out
    }

    /// `bytes` of the carry have gone out.
    fn consume_carry(&self, state: &mut ReadState, bytes: usize) {
        state.carry_from += bytes;
        if state.carry_from == state.carry.len() {
            self.recycle(std::mem::take(&mut state.carry));
            state.carry_from = 0;
        }
    }

    /// A reply's buffer, sent: kept as the reply buffer where that has no
    /// room for a read of `size`, else given back to the poller.
    fn give_back(&self, state: &mut ReadState, bytes: Vec<u8>, size: usize) {
        if state.scratch.capacity() < size && bytes.capacity() >= size {
            let old = std::mem::replace(&mut state.scratch, bytes);
            self.recycle(old);
        } else {
            self.recycle(bytes);
        }
    }

    /// Keeps a spent buffer for the capture's poller to refill.
    fn recycle(&self, mut bytes: Vec<u8>) {
        // Any buffer the allocator maps of its own (see crate::memory):
        // made anew, each of its pages would be faulted in again.
        if bytes.capacity() >= RECYCLED_BYTES {
            bytes.clear();
            let _ = self.spare_in.try_send(bytes);
        }
    }

    /// The oldest queued chunk: a full one, else the one being filled.
    fn next_chunk(&self) -> Option<Chunk> {
        let chunk = match self.chunks_out.try_recv() {
            Ok(chunk) => chunk,
            Err(_) => {
                let mut building = lock(&self.building);
                // A chunk sent since the channel was looked at is older.
                match self.chunks_out.try_recv() {
                    Ok(chunk) => chunk,
                    Err(_) if building.bytes.is_empty() => return None,
                    Err(_) => std::mem::take(&mut *building),
                }
            }
        };
        self.queued_bytes
            .fetch_sub(chunk.bytes.len(), Ordering::Relaxed);
        self.delivered.fetch_add(chunk.records, Ordering::Relaxed);
        Some(chunk)
    }

    fn finished(&self, state: &ReadState) -> bool {
        self.capture_ended.load(Ordering::SeqCst)
            && state.carry.is_empty()
            && self.queued_bytes.load(Ordering::SeqCst) == 0
    }

    pub fn has_pending(&self) -> bool {
        self.has_pending.load(Ordering::SeqCst)
    }

    /// Whether the watchdog must look at this stream now: it has waiting
    /// reads, or its reader is not root (whose right to it is checked on
    /// every round, busy or not).
    pub fn needs_watch(&self) -> bool {
        self.has_pending() || self.owner.reader.is_some() || lock(&self.neighbours).is_some()
    }

    /// The watchdog's periodic look at a stream with waiting reads:
    /// answers readers that have a signal to act on, and ends the stream
    /// once its socket has closed.
    pub fn watch(&self, now: Instant) {
        let callers: Vec<(u64, u32)> = lock(&self.state)
            .pending
            .iter()
            .map(|read| (read.id, read.caller))
            .collect();
        let interrupted: Vec<u64> = callers
            .into_iter()
            .filter(|&(_, caller)| reader_has_actionable_signal(caller))
            .map(|(id, _)| id)
            .collect();
        if !interrupted.is_empty() {
            let mut state = lock(&self.state);
            let (answer, keep): (VecDeque<_>, VecDeque<_>) = std::mem::take(&mut state.pending)
                .into_iter()
                .partition(|read| interrupted.contains(&read.id));
            state.pending = keep;
            self.has_pending
                .store(!state.pending.is_empty(), Ordering::SeqCst);
            drop(state);
            for read in answer {
                (read.respond)(Answer::Interrupted);
            }
        }
        self.follow_socket(now);
        let neighbours = lock(&self.neighbours).clone();
        if let Some(neighbours) = neighbours {
            let refreshed = neighbours.refresh(&self.label);
            if let Some(filter) = refreshed.filter {
                for control in lock(&self.controls).iter() {
                    control.set_filter(filter.clone());
                }
            }
            if let (Some(rivals), Some(gate)) = (refreshed.rivals, lock(&self.gate).upgrade()) {
                gate.set_rivals(rivals);
            }
        }
        self.serve_pending();
    }

    fn follow_socket(&self, now: Instant) {
        let lifecycle = lock(&self.state).lifecycle;
        if lifecycle != Lifecycle::Stopping && self.owner.revoked() {
            // No grace: what comes after the credential change is not the
            // reader's.
            log::debug!(
                "{}: the process is no longer the reader's; ending the stream",
                self.label
            );
            self.stop_capture();
            lock(&self.state).lifecycle = Lifecycle::Stopping;
            return;
        }
        let next = match lifecycle {
            Lifecycle::Open { checked } if now.duration_since(checked) >= LIVENESS_INTERVAL => {
                if self.owner.still_there() {
                    Lifecycle::Open { checked: now }
                } else {
                    log::debug!("{}: socket closed, ending the stream", self.label);
                    Lifecycle::Closing { since: now }
                }
            }
            Lifecycle::Closing { since } if now.duration_since(since) >= CLOSE_GRACE => {
                self.stop_capture();
                Lifecycle::Stopping
            }
            unchanged => unchanged,
        };
        lock(&self.state).lifecycle = next;
    }

    /// One more capture feeds the stream.
    pub fn add_capture(&self, control: CaptureControl) {
        let mut controls = lock(&self.controls);
        if self.stopping.load(Ordering::SeqCst) {
            control.stop();
        }
        controls.push(control);
    }

    /// Replaces the kernel filter of every capture feeding the stream.
    pub fn set_filter(&self, filter: &str) {
        for control in lock(&self.controls).iter() {
            control.set_filter(filter.to_owned());
        }
    }

    /// Stops the captures; the stream ends once they have.
    pub fn stop_capture(&self) {
        let controls = lock(&self.controls);
        self.stopping.store(true, Ordering::SeqCst);
        for control in controls.iter() {
            control.stop();
        }
    }

    /// The reader closed the file: stop capturing.
    pub fn release(&self) {
        self.stop_capture();
        let mut report = lock(&self.closing_report);
        report.0 = true;
        if let Some(stats) = report.1 {
            self.log_closing(stats);
        }
    }

    /// A packet the stream should hold is left out, for `miss`.
    pub fn missed(&self, miss: Miss) {
        self.misses.counter(miss).fetch_add(1, Ordering::Relaxed);
    }

    /// The capture takes in more than the stream's packets (see `broad`).
    pub fn capture_is_broad(&self) {
        self.broad.store(true, Ordering::Relaxed);
    }

    /// What the stream missed, by reason, as `(count, what)`, nonzero ones
    /// only; and the kernel's drops when they may be anyone's.
    fn miss_report(&self, stats: CaptureStats) -> (Vec<(u64, &'static str)>, u64) {
        let kernel = u64::from(stats.dropped_by_kernel) + u64::from(stats.dropped_by_interface);
        let broad = self.broad.load(Ordering::Relaxed);
        let count = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        // A broad capture's ring drops are the namespace's: this stream's
        // share of them is taken to be its share of what the ring took.
        let (kernel_ours, kernel_what) = if broad {
            let (ours, seen) = *lock(&self.share);
            let estimate = if seen == 0 {
                kernel
            } else {
                (kernel as f64 * ours as f64 / seen as f64).round() as u64
            };
            (
                estimate,
                "dropped by the kernel (estimated: the capture's ring dropped packets of the \
                 namespace, and these are this stream's share of what it took)",
            )
        } else {
            (kernel, "dropped by the kernel")
        };
        let reasons = [
            (kernel_ours, kernel_what),
            (
                count(&self.dropped_by_queue),
                "dropped by the queue (the reader fell behind)",
            ),
            (
                count(&self.misses.undecided),
                "withheld: several sockets share the port and the kernel did not tell which got it",
            ),
            (
                count(&self.misses.unplaced),
                "unplaced: on the stream's ports, but no owner was ever told",
            ),
            (
                count(&self.misses.events_lost),
                "unplaced while the kernel events that would have told whose were lost",
            ),
        ];
        let missed = reasons.into_iter().filter(|(n, _)| *n > 0).collect();
        (missed, if broad { kernel } else { 0 })
    }

    /// Of the packets a broad capture took in, how many were the stream's
    /// (for its share of the ring's drops).
    pub fn share(&self, ours: u64, seen: u64) {
        *lock(&self.share) = (ours, seen);
    }

    fn log_closing(&self, stats: CaptureStats) {
        let (missed, anyones) = self.miss_report(stats);
        let total: u64 = missed.iter().map(|(n, _)| n).sum();
        let mut line = format!(
            "{}: stream closed: {} packets delivered, ",
            self.label,
            self.delivered.load(Ordering::Relaxed)
        );
        if total == 0 {
            line.push_str("none missed");
        } else {
            let parts: Vec<String> = missed
                .iter()
                .map(|(n, what)| format!("{n} {what}"))
                .collect();
            line.push_str(&format!("{total} missed ({})", parts.join("; ")));
        }
        if anyones > 0 {
            line.push_str(&format!(
                "; the capture's ring dropped {anyones} packets of the namespace in all"
            ));
        }
        closings::say(
            line,
            total == 0 && anyones == 0,
            self.delivered.load(Ordering::Relaxed),
        );
    }

    /// The pcapng statistics block the stream ends with.
    fn end_statistics(&self, stats: CaptureStats) -> pcapng::EndStatistics {
        let (missed, anyones) = self.miss_report(stats);
        let kernel_ours: u64 = missed
            .iter()
            .filter(|(_, what)| what.starts_with("dropped by the kernel"))
            .map(|(n, _)| n)
            .sum();
        let ours_after_kernel: u64 = missed
            .iter()
            .filter(|(_, what)| !what.starts_with("dropped by the kernel"))
            .map(|(n, _)| n)
            .sum();
        let mut comment: Vec<String> = missed
            .iter()
            .map(|(n, what)| format!("{n} {what}"))
            .collect();
        if anyones > 0 {
            comment.push(format!(
                "the capture's ring dropped {anyones} packets of the namespace in all"
            ));
        }
        pcapng::EndStatistics {
            received: Some(u64::from(stats.received)),
            dropped_by_interface: Some(kernel_ours),
            dropped_by_us: ours_after_kernel,
            delivered: self.pushed.load(Ordering::Relaxed),
            comment: (!comment.is_empty()).then(|| comment.join("; ")),
        }
    }
}

/// What [`PacketSink::batch_end`] reaches: the running servers, if any.
static SERVERS: Mutex<Option<Arc<mailbox::Mailbox<Weak<Stream>>>>> = Mutex::new(None);

/// The daemon's stream servers: a few threads that answer the waiting
/// reads of every stream when its capture has handed over packets. Off the
/// capture pollers, so a reader's copy of a megabyte runs beside the
/// capture (on another core) rather than in its way.
pub struct Servers {
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Servers {
    pub fn start() -> std::io::Result<Servers> {
        let queue = Arc::new(mailbox::Mailbox::<Weak<Stream>>::default());
        let mut threads = Vec::new();
        for index in 0..crate::capture::service::threads_per_kind() {
            let queued = Arc::clone(&queue);
            threads.push(
                std::thread::Builder::new()
                    .name(format!("stream-server-{index}"))
                    .spawn(move || {
                        while let Some(stream) = queued.recv() {
                            if let Some(stream) = stream.upgrade() {
                                stream.rung.store(false, Ordering::SeqCst);
                                stream.serve_pending();
                            }
                        }
                    })?,
            );
        }
        *lock(&SERVERS) = Some(queue);
        Ok(Servers { threads })
    }

    /// Answers what is queued, then ends the threads.
    pub fn stop(self) {
        if let Some(queue) = lock(&SERVERS).take() {
            queue.close();
        }
        for thread in self.threads {
            let _ = thread.join();
        }
    }
}

impl Stream {
    /// Queues one packet as a record of the stream's format, with a pcapng
    /// comment where given (pcap has no place for one).
    pub fn push(
        &self,
        timestamp: Timestamp,
        original_length: u32,
        data: &[u8],
        comment: Option<&str>,
    ) {
        let record_len = match self.format {
            Format::Pcap => pcap::RECORD_HEADER_LEN + data.len(),
            Format::PcapNg => pcapng::packet_block_len(data.len(), comment),
        };
        if self.queued_bytes.load(Ordering::Relaxed) + record_len > self.queue_limit {
            self.dropped_by_queue.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let mut building = lock(&self.building);
        if building.bytes.len() + record_len > CHUNK_BYTES && !building.bytes.is_empty() {
            let full = std::mem::take(&mut *building);
            let _ = self.chunks_in.send(full);
        }
        // A buffer the reader gave back where there is one (its pages are
        // in already: a new one's would be mapped and faulted in, each
        // time); else small at first (a quiet socket's chunk goes out with
        // one record), growing fast to a whole chunk.
        let filled = building.bytes.len();
        let needed = filled + record_len;
        if building.bytes.capacity() < needed {
            let spare = self
                .spare_out
                .try_recv()
                .ok()
                .filter(|spare| spare.capacity() >= needed);
            match spare {
                Some(mut spare) => {
                    spare.extend_from_slice(&building.bytes);
                    building.bytes = spare;
                }
                None => {
                    // Four times larger each step: a stream that keeps up
                    // stays in small chunks, a busy one reaches a whole
                    // chunk in two steps (of sizes a reader gives back).
                    let target = GROWTH_STEPS
                        .into_iter()
                        .find(|&step| step >= needed)
                        .unwrap_or(needed);
                    building.bytes.reserve_exact(target - filled);
                }
            }
        }
        let nanoseconds = self.nanoseconds.load(Ordering::Relaxed);
        building.append_in_order(timestamp, |bytes| match self.format {
            Format::Pcap => pcap::append_record(bytes, timestamp, original_length, data),
            Format::PcapNg => pcapng::append_packet(
                bytes,
                timestamp,
                nanoseconds,
                original_length,
                data,
                comment,
            ),
        });
        self.pushed.fetch_add(1, Ordering::Relaxed);
        self.queued_bytes.fetch_add(record_len, Ordering::SeqCst);
    }
}

impl PacketSink for Stream {
    fn packet(&self, timestamp: Timestamp, original_length: u32, data: &[u8]) {
        self.push(timestamp, original_length, data, self.comment.as_deref());
    }

    fn batch_end(&self) {
        if self.has_pending.load(Ordering::SeqCst) && !self.rung.swap(true, Ordering::SeqCst) {
            let servers = lock(&SERVERS);
            let queued = servers
                .as_ref()
                .is_some_and(|queue| queue.send(self.me.clone()));
            drop(servers);
            if !queued {
                // No servers (unit tests, or the daemon's very end).
                self.rung.store(false, Ordering::SeqCst);
                self.serve_pending();
            }
        }
    }

    fn ended(&self, stats: CaptureStats) {
        if self.format == Format::PcapNg {
            // Its drops, for Wireshark's capture file properties.
            let now = std::time::SystemTime::now()
                .duration_since(std::time::SystemTime::UNIX_EPOCH)
                .unwrap_or_default();
            let units = if self.nanoseconds.load(Ordering::Relaxed) {
                now.as_nanos()
            } else {
                now.as_micros()
            };
            let mut block = Vec::new();
            pcapng::append_statistics(
                &mut block,
                u64::try_from(units).unwrap_or(u64::MAX),
                &self.end_statistics(stats),
            );
            let mut building = lock(&self.building);
            if building.bytes.len() + block.len() > CHUNK_BYTES && !building.bytes.is_empty() {
                let full = std::mem::take(&mut *building);
                let _ = self.chunks_in.send(full);
            }
            building.append_other(&block);
            self.queued_bytes.fetch_add(block.len(), Ordering::SeqCst);
        }
        self.capture_ended.store(true, Ordering::SeqCst);
        self.serve_pending();
        let mut report = lock(&self.closing_report);
        report.1 = Some(stats);
        if report.0 {
            self.log_closing(stats);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    /// A stream as just opened (header queued), without a capture behind it.
    fn stream(queue_limit: usize) -> Arc<Stream> {
        let owner = SocketOwner {
            pid: 0,
            start_ticks: 0,
            inode: Some(0),
            fds: Vec::new(),
            reader: None,
        };
        let stream = Stream::start("test".into(), owner, queue_limit, Format::Pcap, None);
        lock(&stream.state).carry = pcap::global_header(113, 65535, true);
        stream
    }

    #[test]
    fn records_a_little_out_of_order_are_put_in_time_order() {
        let stamp = |fraction| Timestamp {
            seconds: 7,
            fraction,
        };
        let mut chunk = Chunk::default();
        // Records of different lengths, named by their stamp.
        let append = |chunk: &mut Chunk, fraction: u32, other: bool| {
            let record = vec![fraction as u8; 1 + fraction as usize % 3];
            if other {
                chunk.append_other(&record);
            } else {
                chunk.append_in_order(stamp(fraction), |bytes| bytes.extend_from_slice(&record));
            }
        };
        for fraction in [1, 3, 5, 2, 4, 9, 6] {
            append(&mut chunk, fraction, false);
        }
        // A statistics block: nothing goes in front of it.
        append(&mut chunk, 8, true);
        append(&mut chunk, 7, false);
        let order: Vec<u8> = chunk
            .bytes
            .iter()
            .copied()
            .fold(Vec::new(), |mut order, b| {
                if order.last() != Some(&b) {
                    order.push(b);
                }
                order
            });
        assert_eq!(order, [1, 2, 3, 4, 5, 6, 9, 8, 7]);
        assert_eq!(chunk.records, 8);
        // Only the latest REORDER_DEPTH records are reached back to.
        let mut long = Chunk::default();
        for fraction in 10..(10 + REORDER_DEPTH as u32 + 5) {
            append(&mut long, fraction, false);
        }
        append(&mut long, 0, false);
        let first_late = long.bytes.iter().position(|b| *b == 0).unwrap();
        let before: usize = (10..15).map(|f: u32| 1 + f as usize % 3).sum();
        assert_eq!(first_late, before);
    }

    /// A waiting read's answer, once the server thread has given it.
    fn answered(slot: &Arc<Mutex<Option<Vec<u8>>>>) -> Vec<u8> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(bytes) = lock(slot).take() {
                return bytes;
            }
            assert!(
                Instant::now() < deadline,
                "the waiting read was not answered"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn packet(stream: &Stream, payload: &[u8]) {
        let timestamp = Timestamp {
            seconds: 1,
            fraction: 2,
        };
        stream.packet(timestamp, payload.len() as u32, payload);
        stream.batch_end();
    }

    /// Reads `size` bytes; None if the read had to wait. The bytes of a
    /// waiting read land in the returned slot when it is answered.
    fn read(stream: &Stream, size: u32) -> Arc<Mutex<Option<Vec<u8>>>> {
        let slot = Arc::new(Mutex::new(None));
        let answer_slot = Arc::clone(&slot);
        stream.read(
            size,
            0,
            Box::new(move |answer| {
                *lock(&answer_slot) = Some(match answer {
                    Answer::Data(bytes) => bytes.to_vec(),
                    Answer::Interrupted => b"EINTR".to_vec(),
                })
            }),
        );
        slot
    }

    fn taken(slot: &Arc<Mutex<Option<Vec<u8>>>>) -> Option<Vec<u8>> {
        lock(slot).take()
    }

    #[test]
    fn one_read_takes_everything_queued() {
        let stream = stream(1 << 20);
        for i in 0..10u8 {
            packet(&stream, &[i; 100]);
        }
        let bytes = taken(&read(&stream, 128 * 1024)).unwrap();
        assert_eq!(bytes.len(), 24 + 10 * (16 + 100));
    }

    #[test]
    fn a_short_read_splits_a_record_and_the_rest_follows() {
        let stream = stream(1 << 20);
        packet(&stream, b"abcdef");
        let first = taken(&read(&stream, 30)).unwrap();
        assert_eq!(first.len(), 30);
        let rest = taken(&read(&stream, 1000)).unwrap();
        assert_eq!(rest.len(), 24 + 16 + 6 - 30);
        assert!(rest.ends_with(b"abcdef"));
    }

    #[test]
    fn a_waiting_read_is_answered_by_the_next_packet_and_eof_follows_the_end() {
        let stream = stream(1 << 20);
        assert_eq!(taken(&read(&stream, 24)).unwrap().len(), 24);
        let waiting = read(&stream, 1000);
        assert!(
            taken(&waiting).is_none(),
            "nothing to read yet: the read waits"
        );
        assert!(stream.has_pending());
        packet(&stream, b"late");
        assert_eq!(answered(&waiting).len(), 16 + 4);
        assert!(!stream.has_pending());

        let at_end = read(&stream, 1000);
        packet(&stream, b"last");
        assert_eq!(answered(&at_end).len(), 16 + 4);
        stream.ended(CaptureStats::default());
        assert_eq!(
            taken(&read(&stream, 1000)).unwrap(),
            Vec::<u8>::new(),
            "EOF"
        );
    }

    #[test]
    fn megabyte_reads_drain_many_chunks() {
        let stream = stream(8 << 20);
        assert_eq!(taken(&read(&stream, 24)).unwrap().len(), 24);
        // 3 MiB of 1000-byte packets: three full chunks and a partial one.
        let count = 3 * CHUNK_BYTES / 1016 + 10;
        for _ in 0..count {
            packet(&stream, &[7; 1000]);
        }
        let mut total = 0;
        loop {
            let bytes = taken(&read(&stream, CHUNK_BYTES as u32)).unwrap_or_default();
            if bytes.is_empty() {
                break;
            }
            assert!(bytes.len() <= CHUNK_BYTES);
            total += bytes.len();
        }
        assert_eq!(total, count * 1016);
        assert_eq!(stream.delivered.load(Ordering::Relaxed), count as u64);
    }

    #[test]
    fn a_busy_stream_refills_the_buffers_its_reader_gave_back() {
        let stream = stream(8 << 20);
        assert_eq!(taken(&read(&stream, 24)).unwrap().len(), 24);
        let mut sent = Vec::new();
        let mut received = Vec::new();
        for round in 0..4u8 {
            // More than the first step: the chunk grows to the second.
            for index in 0..100u8 {
                let payload = [round.wrapping_mul(100).wrapping_add(index); 1000];
                packet(&stream, &payload);
                sent.extend_from_slice(&payload);
            }
            // Read in pieces smaller than the chunk: straight from what is
            // carried, then put together.
            let due = received.len() + 100 * (16 + 1000);
            while received.len() < due {
                let size = (due - received.len()).min(40_000) as u32;
                received.extend_from_slice(&taken(&read(&stream, size)).unwrap());
            }
            if round > 0 {
                // The next chunk starts in a buffer given back: nothing new
                // is allocated (and faulted in) for it.
                packet(&stream, &[0; 1]);
                sent.extend_from_slice(&[0; 1]);
                assert!(
                    lock(&stream.building).bytes.capacity() >= GROWTH_STEPS[1],
                    "round {round}: a spent buffer was not reused"
                );
                received.extend_from_slice(&taken(&read(&stream, 17)).unwrap());
            }
        }
        // Every record once, in order: headers of 16 bytes, then the bytes.
        let payloads: Vec<u8> = {
            let mut out = Vec::new();
            let mut at = 0;
            while at < received.len() {
                let length =
                    u32::from_le_bytes(received[at + 8..at + 12].try_into().unwrap()) as usize;
                out.extend_from_slice(&received[at + 16..at + 16 + length]);
                at += 16 + length;
            }
            out
        };
        assert_eq!(payloads, sent);
    }

    #[test]
    fn the_queue_is_bounded_in_bytes_and_drops_are_counted() {
        let stream = stream(3 * (16 + 100));
        for _ in 0..10 {
            packet(&stream, &[0; 100]);
        }
        assert_eq!(stream.dropped_by_queue.load(Ordering::Relaxed), 7);
        let bytes = taken(&read(&stream, 1 << 20)).unwrap();
        assert_eq!(bytes.len(), 24 + 3 * 116);
        // Reading frees room.
        packet(&stream, &[0; 100]);
        assert_eq!(taken(&read(&stream, 1 << 20)).unwrap().len(), 116);
    }
}
