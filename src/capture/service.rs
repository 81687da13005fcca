//! The daemon's capture threads: a fixed few, whatever the number of open
//! streams, so that a user opening many streams costs the daemon file
//! descriptors and memory (both bounded by the stream quotas), never
//! threads.
//!
//! - The **opener** opens each capture in turn: it enters the capture's
//!   network namespace explicitly (the packet socket stays bound to the
//!   namespace it was made in, so it can be read from any thread later)
//!   and hands the non-blocking handle to the least loaded poller.
//! - Each **poller** (one per core, at most four) waits with epoll on the
//!   packet sockets of its captures; when the kernel hands over a block it
//!   dispatches the block's packets to the capture's sink, then calls
//!   `batch_end` once. It also applies the captures' commands (stop, a new
//!   filter), which reach it through a channel and an eventfd.
//! - The **closer** closes spent handles: closing a packet socket waits for
//!   an RCU grace period (seconds on a loaded machine), which must stall no
//!   poller and no FUSE request.
//!
//! The service is started and stopped by the daemon ([`Service::start`],
//! [`Service::stop`]); every capture thread is one of these, and joined.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};

use crossbeam_channel::{Receiver, Sender};
use log::{debug, warn};
use rustix::event::{EventfdFlags, epoll, eventfd};

use super::queue::HeldBlock;
use super::source::{
    CaptureError, CaptureRequest, CaptureSettings, Opened, PacketSink, Source, Timestamp,
};

/// At most this many blocks are dispatched from one capture before the
/// poller looks at its other captures (epoll is level-triggered: the rest
/// follows on the next round).
const BLOCKS_PER_TURN: usize = 8;

/// The epoll token of a poller's own wake-up eventfd.
const WAKE_TOKEN: u64 = u64::MAX;

/// What the opener is asked to do.
struct OpenJob {
    request: CaptureRequest,
    settings: CaptureSettings,
    sink: Arc<dyn PacketSink>,
    on_ready: Box<dyn FnOnce(Result<Opened, CaptureError>) + Send>,
}

/// What a poller is told.
enum Command {
    /// A capture to serve, not yet read from until [`Command::Resume`]:
    /// the caller's `on_ready` runs in between, before any packet.
    Adopt(u64, Box<Running>),
    Resume(u64),
    Stop(u64),
    SetFilter(u64, String),
    /// End every capture and the thread.
    Shutdown,
}

/// A capture a poller serves.
struct Running {
    capture: Source,
    sink: Arc<dyn PacketSink>,
    label: String,
    /// The capture's link type (a new filter is made for it).
    linktype: i32,
    /// How long a queue capture's packets are held from the first one's
    /// arrival: a ring's block timeout.
    hold: std::time::Duration,
    /// A queue capture's packets read and held ([`HeldBlock`]).
    block: HeldBlock,
}

/// The sending side of one poller.
struct PollerHandle {
    commands: Sender<Command>,
    wake: Arc<OwnedFd>,
    /// Captures it serves, for choosing the least loaded.
    load: Arc<AtomicUsize>,
}

impl PollerHandle {
    fn send(&self, command: Command) {
        if self.commands.send(command).is_ok() {
            ring(&self.wake);
        }
    }
}

fn ring(wake: &OwnedFd) {
    // An eventfd's counter only saturates after 2^64 - 2 unread writes.
    let _ = rustix::io::write(wake, &1u64.to_ne_bytes());
}

/// Stops a running capture or changes its filter, from any thread. One
/// control may stand for a capture that was replaced by a larger one
/// ([`super::growth`]): it reaches whichever runs.
#[derive(Clone)]
pub struct CaptureControl {
    shared: Arc<Mutex<ControlState>>,
}

struct ControlState {
    /// The running captures it stands for (two while one replaces another).
    targets: Vec<Target>,
    /// The filter last set, for a capture that replaces this one.
    filter: Option<String>,
    stopped: bool,
}

struct Target {
    id: u64,
    commands: Sender<Command>,
    wake: Arc<OwnedFd>,
}

impl Target {
    fn send(&self, command: Command) {
        if self.commands.send(command).is_ok() {
            ring(&self.wake);
        }
    }
}

impl CaptureControl {
    fn new(target: Target) -> CaptureControl {
        CaptureControl {
            shared: Arc::new(Mutex::new(ControlState {
                targets: vec![target],
                filter: None,
                stopped: false,
            })),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, ControlState> {
        self.shared.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Ends the capture: its poller hands over what the kernel already
    /// gave, then calls [`PacketSink::ended`]. Idempotent.
    pub fn stop(&self) {
        let mut state = self.state();
        state.stopped = true;
        for target in &state.targets {
            target.send(Command::Stop(target.id));
        }
    }

    /// Replaces the kernel filter of the running capture.
    pub fn set_filter(&self, filter: String) {
        let mut state = self.state();
        for target in &state.targets {
            target.send(Command::SetFilter(target.id, filter.clone()));
        }
        state.filter = Some(filter);
    }

    /// The filter last set, if any (else the capture's first).
    pub fn filter(&self) -> Option<String> {
        self.state().filter.clone()
    }

    /// Whether it was told to stop.
    pub fn stopped(&self) -> bool {
        self.state().stopped
    }

    /// From now on it also stands for `other`'s capture (stopped at once
    /// if this one was).
    pub fn join(&self, other: &CaptureControl) {
        let joined: Vec<Target> = std::mem::take(&mut other.state().targets);
        let mut state = self.state();
        for target in joined {
            if state.stopped {
                target.send(Command::Stop(target.id));
            }
            state.targets.push(target);
        }
        // The other now stands for what this one does.
        other.state().targets = Vec::new();
    }

    /// Stops the first capture it stood for, and forgets it: the one that
    /// was replaced.
    pub fn retire_first(&self) {
        let mut state = self.state();
        if state.targets.len() > 1 {
            let first = state.targets.remove(0);
            first.send(Command::Stop(first.id));
        }
    }
}

/// The most packet sockets closed at once.
const CLOSED_AT_ONCE: usize = 64;
/// How long spent captures are gathered before they are closed together.
const GATHERING: std::time::Duration = std::time::Duration::from_millis(5);

/// Closes spent captures. Each close waits for RCU grace periods (about
/// 25 ms here, seconds on a loaded machine), and the kernel frees the
/// ring's memory only then: a thousand streams closed one after the other
/// would hold their rings for half a minute. Closes waiting together share
/// their grace periods, so what is queued is closed at once, each on a
/// thread of its own that ends with its close (at most [`CLOSED_AT_ONCE`]).
fn close_spent(to_close: &Receiver<Source>) {
    while let Ok(first) = to_close.recv() {
        // Streams closing together end their captures one by one: what
        // comes within a few milliseconds is closed together.
        let mut batch = vec![first];
        let gathered = std::time::Instant::now() + GATHERING;
        while batch.len() < CLOSED_AT_ONCE {
            match to_close.recv_deadline(gathered) {
                Ok(capture) => batch.push(capture),
                Err(_) => break,
            }
        }
        if batch.len() == 1 {
            drop(batch);
            continue;
        }
        thread::scope(|scope| {
            for capture in batch {
                let closing = thread::Builder::new()
                    .name("capture-closing".into())
                    .spawn_scoped(scope, move || drop(capture));
                // No thread to be had: closed here instead.
                if let Err(err) = closing {
                    debug!("closing a capture on the closer itself: {err}");
                }
            }
        });
    }
}

/// What [`start`] reaches: the running service, if any.
static SERVICE: Mutex<Option<Sender<OpenJob>>> = Mutex::new(None);

/// Opens a capture on the service's opener thread. `on_ready` gets the
/// outcome (on that thread); the sink gets the packets from then on, on a
/// poller thread. Fails only when the service is not running.
pub fn start(
    request: CaptureRequest,
    settings: &CaptureSettings,
    sink: Arc<dyn PacketSink>,
    on_ready: impl FnOnce(Result<Opened, CaptureError>) + Send + 'static,
) -> std::io::Result<()> {
    let job = OpenJob {
        request,
        settings: settings.clone(),
        sink,
        on_ready: Box::new(on_ready),
    };
    let service = SERVICE.lock().unwrap_or_else(PoisonError::into_inner);
    let opener = service
        .as_ref()
        .ok_or_else(|| std::io::Error::other("the capture service is not running"))?;
    opener
        .send(job)
        .map_err(|_| std::io::Error::other("the capture service has stopped"))
}

/// The running service's threads.
pub struct Service {
    opener: JoinHandle<()>,
    pollers: Vec<(Sender<Command>, Arc<OwnedFd>, JoinHandle<()>)>,
    closer: JoinHandle<()>,
}

/// How many pollers (and stream servers): one per core the daemon may run
/// on, at most four.
pub fn threads_per_kind() -> usize {
    thread::available_parallelism().map_or(2, |cores| cores.get().clamp(1, 4))
}

impl Service {
    pub fn start() -> std::io::Result<Service> {
        let (spent, to_close) = crossbeam_channel::unbounded::<Source>();
        let closer = thread::Builder::new()
            .name("capture-closer".into())
            .spawn(move || close_spent(&to_close))?;
        let mut pollers = Vec::new();
        let mut handles = Vec::new();
        for index in 0..threads_per_kind() {
            let (commands, received) = crossbeam_channel::unbounded();
            let wake = Arc::new(eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?);
            let epoll = epoll::create(epoll::CreateFlags::CLOEXEC)?;
            epoll::add(
                &epoll,
                wake.as_fd(),
                epoll::EventData::new_u64(WAKE_TOKEN),
                epoll::EventFlags::IN,
            )?;
            let load = Arc::new(AtomicUsize::new(0));
            let poller = Poller {
                epoll,
                wake: Arc::clone(&wake),
                commands: received,
                captures: HashMap::new(),
                paused: HashMap::new(),
                held: Vec::new(),
                queue_buffer: Vec::new(),
                load: Arc::clone(&load),
                spent: spent.clone(),
            };
            let thread = thread::Builder::new()
                .name(format!("capture-poller-{index}"))
                .spawn(move || poller.run())?;
            handles.push(PollerHandle {
                commands: commands.clone(),
                wake: Arc::clone(&wake),
                load,
            });
            pollers.push((commands, wake, thread));
        }
        drop(spent);
        let (jobs, received) = crossbeam_channel::unbounded::<OpenJob>();
        let opener = thread::Builder::new()
            .name("capture-opener".into())
            .spawn(move || open_each(&received, &handles))?;
        *SERVICE.lock().unwrap_or_else(PoisonError::into_inner) = Some(jobs);
        Ok(Service {
            opener,
            pollers,
            closer,
        })
    }

    /// Ends every capture (their sinks are told), then the threads.
    pub fn stop(self) {
        SERVICE
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let _ = self.opener.join();
        for (commands, wake, thread) in self.pollers {
            if commands.send(Command::Shutdown).is_ok() {
                ring(&wake);
            }
            let _ = thread.join();
        }
        let _ = self.closer.join();
    }
}

/// The opener thread: opens each asked capture in its namespace, then
/// gives it to the least loaded poller. Ends when the service stops
/// taking jobs.
fn open_each(jobs: &Receiver<OpenJob>, pollers: &[PollerHandle]) {
    static NEXT_ID: AtomicU64 = AtomicU64::new(0);
    for job in jobs {
        let label = job.request.label.clone();
        let (capture, details) = match super::source::open(job.request, &job.settings) {
            Ok(opened) => opened,
            Err(err) => {
                (job.on_ready)(Err(err));
                continue;
            }
        };
        let Some(poller) = pollers
            .iter()
            .min_by_key(|poller| poller.load.load(Ordering::Relaxed))
        else {
            (job.on_ready)(Err(CaptureError::Failed("no capture poller".into())));
            continue;
        };
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        poller.load.fetch_add(1, Ordering::Relaxed);
        poller.send(Command::Adopt(
            id,
            Box::new(Running {
                linktype: details.linktype(),
                hold: details.block_timeout(),
                block: HeldBlock::default(),
                capture,
                sink: job.sink,
                label,
            }),
        ));
        let control = CaptureControl::new(Target {
            id,
            commands: poller.commands.clone(),
            wake: Arc::clone(&poller.wake),
        });
        (job.on_ready)(Ok(details.with_control(control)));
        poller.send(Command::Resume(id));
    }
}

struct Poller {
    epoll: OwnedFd,
    wake: Arc<OwnedFd>,
    commands: Receiver<Command>,
    /// Captures being read, by id (their epoll token).
    captures: HashMap<u64, Running>,
    /// Captures adopted and not yet resumed.
    paused: HashMap<u64, Running>,
    /// Queue captures whose packets wait until then (their hold).
    held: Vec<(std::time::Instant, u64)>,
    /// Where a queue capture's packets are read into, one at a time
    /// (grown at its first packet; one for all the poller's queues).
    queue_buffer: Vec<u8>,
    load: Arc<AtomicUsize>,
    spent: Sender<Source>,
}

impl Poller {
    fn run(mut self) {
        let mut events = Vec::with_capacity(64);
        loop {
            events.clear();
            let timeout = self.held.iter().map(|(due, _)| *due).min().map(|due| {
                let left = due.saturating_duration_since(std::time::Instant::now());
                rustix::event::Timespec {
                    tv_sec: i64::try_from(left.as_secs()).unwrap_or(i64::MAX),
                    tv_nsec: i64::from(left.subsec_nanos()),
                }
            });
            match epoll::wait(
                &self.epoll,
                rustix::buffer::spare_capacity(&mut events),
                timeout.as_ref(),
            ) {
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => continue,
                Err(err) => {
                    warn!("capture poller: epoll failed: {err}; ending its captures");
                    self.end_all();
                    return;
                }
            }
            for event in &events {
                let token = event.data.u64();
                if token == WAKE_TOKEN {
                    let mut counter = [0u8; 8];
                    let _ = rustix::io::read(&*self.wake, &mut counter);
                    if !self.apply_commands() {
                        self.end_all();
                        return;
                    }
                } else {
                    self.serve(token, false);
                    self.hold(token);
                }
            }
            self.release_held();
        }
    }

    /// Remembers when capture `id`'s held packets are due, if it holds any
    /// and that is not known yet.
    fn hold(&mut self, id: u64) {
        let Some(running) = self.captures.get(&id) else {
            return;
        };
        if let Some(due) = running.block.due(running.hold)
            && !self.held.iter().any(|(_, held)| *held == id)
        {
            self.held.push((due, id));
        }
    }

    /// Hands over the held packets that are due.
    fn release_held(&mut self) {
        let now = std::time::Instant::now();
        let mut index = 0;
        while index < self.held.len() {
            if self.held[index].0 > now {
                index += 1;
                continue;
            }
            let (_, id) = self.held.swap_remove(index);
            self.serve(id, true);
        }
    }

    /// Applies queued commands; false on shutdown.
    fn apply_commands(&mut self) -> bool {
        while let Ok(command) = self.commands.try_recv() {
            match command {
                Command::Adopt(id, running) => {
                    self.paused.insert(id, *running);
                }
                Command::Resume(id) => {
                    let Some(running) = self.paused.remove(&id) else {
                        continue;
                    };
                    if let Err(err) = epoll::add(
                        &self.epoll,
                        running.capture.as_fd(),
                        epoll::EventData::new_u64(id),
                        epoll::EventFlags::IN,
                    ) {
                        warn!("{}: cannot wait for its packets: {err}", running.label);
                        self.end(running);
                        continue;
                    }
                    self.captures.insert(id, running);
                }
                Command::Stop(id) => {
                    if let Some(running) = self.paused.remove(&id) {
                        self.end(running);
                    } else if self.captures.contains_key(&id) {
                        // What the kernel already handed over is the stream's.
                        self.serve(id, true);
                        self.held.retain(|(_, held)| *held != id);
                        if let Some(running) = self.captures.remove(&id) {
                            let _ = epoll::delete(&self.epoll, running.capture.as_fd());
                            self.end(running);
                        }
                    }
                }
                Command::SetFilter(id, filter) => {
                    let running = self.captures.get_mut(&id).or(self.paused.get_mut(&id));
                    if let Some(running) = running {
                        debug!("{}: filter now {filter}", running.label);
                        if let Err(err) = running.capture.replace_filter(&filter, running.linktype)
                        {
                            warn!("{}: filter {filter:?} refused: {err}", running.label);
                        }
                    }
                }
                Command::Shutdown => return false,
            }
        }
        true
    }

    /// Dispatches the blocks the kernel has handed over for capture `id`.
    /// A queue capture's packets are read and held ([`HeldBlock`]): handed
    /// over once they fill a block, or with `flush` (their hold is over, or
    /// the capture ends).
    fn serve(&mut self, id: u64, flush: bool) {
        let Some(running) = self.captures.get_mut(&id) else {
            return;
        };
        let sink = running.sink.as_ref();
        let (handed, failed) = match &mut running.capture {
            Source::Ring(capture) => dispatch_blocks(capture, sink),
            Source::Queue(queue) => {
                let failed = read_queue(queue, &mut self.queue_buffer, &mut running.block);
                let handed = if flush || running.block.full() || failed.is_some() {
                    running.block.hand_over(sink)
                } else {
                    false
                };
                (handed, failed)
            }
        };
        if handed {
            running.sink.batch_end();
            if running.block.is_empty() {
                // Its held packets went out: no hold of theirs is due.
                self.held.retain(|(_, held)| *held != id);
            }
        }
        if let Some(message) = failed {
            let message = if message.trim().is_empty() {
                "libpcap gave no reason".to_owned()
            } else {
                message
            };
            warn!("{}: capture failed: {message}", running.label);
            if let Some(running) = self.captures.remove(&id) {
                let _ = epoll::delete(&self.epoll, running.capture.as_fd());
                self.end(running);
            }
        }
    }

    /// Tells the sink the capture ended, with the kernel's counts, and
    /// hands the handle to the closer.
    fn end(&mut self, mut running: Running) {
        self.load.fetch_sub(1, Ordering::Relaxed);
        let stats = running.capture.stats();
        running.sink.ended(stats);
        // Closed here only if the closer has gone (at the very end).
        let _ = self.spent.send(running.capture);
    }

    fn end_all(&mut self) {
        let ids: Vec<u64> = self.captures.keys().copied().collect();
        for id in ids {
            self.serve(id, true);
            if let Some(running) = self.captures.remove(&id) {
                self.end(running);
            }
        }
        let paused: Vec<Running> = self.paused.drain().map(|(_, running)| running).collect();
        for running in paused {
            self.end(running);
        }
    }
}

/// Dispatches up to [`BLOCKS_PER_TURN`] blocks a ring has handed over to
/// `sink`: whether any packet came, and why reading failed, if it did.
fn dispatch_blocks(
    capture: &mut pcap::Capture<pcap::Active>,
    sink: &dyn PacketSink,
) -> (bool, Option<String>) {
    let mut handed = false;
    for _ in 0..BLOCKS_PER_TURN {
        match capture.dispatch(None, |packet| {
            let timestamp = Timestamp {
                seconds: u32::try_from(packet.header.ts.tv_sec).unwrap_or(0),
                fraction: u32::try_from(packet.header.ts.tv_usec).unwrap_or(0),
            };
            sink.packet(timestamp, packet.header.len, packet.data);
        }) {
            Ok(0) => break,
            Ok(_) => handed = true,
            Err(err) => return (handed, Some(err.to_string())),
        }
    }
    (handed, None)
}

/// Reads what waits in a queue capture into `block` (at most
/// [`QUEUE_TURNS`] turns: epoll is level-triggered, the rest follows):
/// why reading failed, if it did.
fn read_queue(
    queue: &super::queue::QueueCapture,
    buffer: &mut Vec<u8>,
    block: &mut HeldBlock,
) -> Option<String> {
    let now = std::time::Instant::now();
    for _ in 0..QUEUE_TURNS {
        if block.full() {
            // The rest waits in the kernel until this block is handed over.
            break;
        }
        let mut take = |timestamp: Timestamp, original_length: u32, data: &[u8]| {
            block.push(timestamp, original_length, data, now);
            !block.full()
        };
        match queue.read(buffer, &mut take) {
            Ok(read) if read < super::queue::PACKETS_PER_TURN => break,
            Ok(_) => {}
            Err(err) => return Some(err.to_string()),
        }
    }
    None
}

/// The most turns of [`super::queue::PACKETS_PER_TURN`] packets read from a
/// queue at once.
const QUEUE_TURNS: usize = 16;
