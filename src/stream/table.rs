//! The open streams by file handle, how many each user holds (the limits
//! of [`quota`](super::quota)), and the watchdog thread that looks after
//! their waiting reads (signals, closed sockets) and ends them all at
//! shutdown.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use log::warn;

use super::quota::{Exceeded, Quota, StreamLimits};
use super::{Stream, lock};

/// How often waiting readers are checked for signals. A reader that gets
/// Ctrl-C or SIGKILL while blocked is answered within about this long.
const WATCH_INTERVAL: Duration = Duration::from_millis(100);

/// How long after the last stream closed its memory is given back.
const MEMORY_GIVEN_BACK_AFTER: Duration = Duration::from_secs(1);

/// How often a refused open is logged at most (a user looping on open
/// must not flood the log).
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Default)]
pub struct StreamTable {
    streams: Mutex<HashMap<u64, (Arc<Stream>, Ticket)>>,
    next_handle: AtomicU64,
    shutting_down: AtomicBool,
    quota: Arc<Mutex<Quota>>,
    /// When a refusal was last logged: a user's, the total's.
    refusal_logged: Mutex<[Option<Instant>; 2]>,
    /// When a stream was last closed, until the memory it held is given
    /// back to the system.
    closed_at: Mutex<Option<Instant>>,
}

/// One stream counted against its user's and the daemon's limits, until
/// dropped (the stream's file closed, or its open failed).
pub struct Ticket {
    quota: Arc<Mutex<Quota>>,
    uid: u32,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        lock(&self.quota).give_back(self.uid);
    }
}

impl StreamTable {
    pub fn new(limits: StreamLimits) -> Arc<StreamTable> {
        Arc::new(StreamTable {
            next_handle: AtomicU64::new(1),
            quota: Arc::new(Mutex::new(Quota::new(limits))),
            ..StreamTable::default()
        })
    }

    /// Counts a stream about to be opened by `uid`; refused past the limits
    /// (logged at most every [`REFUSAL_LOG_INTERVAL`]).
    pub fn reserve(&self, uid: u32) -> Result<Ticket, Exceeded> {
        let taken = lock(&self.quota).take(uid);
        match taken {
            Ok(()) => Ok(Ticket {
                quota: Arc::clone(&self.quota),
                uid,
            }),
            Err(exceeded) => {
                let mut logged = lock(&self.refusal_logged);
                let last = &mut logged[usize::from(matches!(exceeded, Exceeded::Total { .. }))];
                if last.is_none_or(|at| at.elapsed() >= REFUSAL_LOG_INTERVAL) {
                    *last = Some(Instant::now());
                    match exceeded {
                        Exceeded::User { uid, limit } => warn!(
                            "user {uid} holds {limit} streams, the most --max-streams-per-user allows: \
                             opens refused with EMFILE (logged once per {}s)",
                            REFUSAL_LOG_INTERVAL.as_secs()
                        ),
                        Exceeded::Total { limit } => warn!(
                            "{limit} streams are open, the most --max-streams allows: opens refused \
                             with ENFILE (logged once per {}s)",
                            REFUSAL_LOG_INTERVAL.as_secs()
                        ),
                    }
                }
                Err(exceeded)
            }
        }
    }

    /// Registers an opened stream with its ticket; returns its file handle.
    /// After shutdown began, the stream is ended at once (its reader gets
    /// EOF).
    pub fn insert(&self, stream: Arc<Stream>, ticket: Ticket) -> u64 {
        let handle = self.next_handle.fetch_add(1, Ordering::Relaxed);
        if self.shutting_down.load(Ordering::SeqCst) {
            stream.stop_capture();
        }
        lock(&self.streams).insert(handle, (stream, ticket));
        handle
    }

    pub fn get(&self, handle: u64) -> Option<Arc<Stream>> {
        lock(&self.streams)
            .get(&handle)
            .map(|(stream, _)| Arc::clone(stream))
    }

    /// Forgets a stream (its file closed); its ticket is given back.
    pub fn remove(&self, handle: u64) -> Option<Arc<Stream>> {
        *lock(&self.closed_at) = Some(Instant::now());
        lock(&self.streams)
            .remove(&handle)
            .map(|(stream, _)| stream)
    }

    /// A second after streams stopped closing, gives the memory they held
    /// back to the system (glibc keeps freed memory in its arenas).
    fn give_back_memory(&self) {
        let mut closed = lock(&self.closed_at);
        if closed.is_some_and(|at| at.elapsed() >= MEMORY_GIVEN_BACK_AFTER) {
            *closed = None;
            drop(closed);
            crate::memory::give_back();
        }
    }

    pub fn len(&self) -> usize {
        lock(&self.streams).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Ends every stream: captures stop, waiting reads get what is queued
    /// and then EOF.
    pub fn shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
        let streams: Vec<Arc<Stream>> = lock(&self.streams)
            .values()
            .map(|(stream, _)| Arc::clone(stream))
            .collect();
        for stream in streams {
            stream.stop_capture();
        }
    }

    /// Starts the watchdog; it runs until [`StreamTable::shutdown`].
    pub fn spawn_watchdog(self: &Arc<Self>) -> std::io::Result<JoinHandle<()>> {
        let table = Arc::clone(self);
        thread::Builder::new()
            .name("watchdog".into())
            .spawn(move || {
                while !table.shutting_down.load(Ordering::SeqCst) {
                    thread::sleep(WATCH_INTERVAL);
                    let waiting: Vec<Arc<Stream>> = lock(&table.streams)
                        .values()
                        .filter(|(stream, _)| stream.needs_watch())
                        .map(|(stream, _)| Arc::clone(stream))
                        .collect();
                    let now = Instant::now();
                    for stream in waiting {
                        stream.watch(now);
                    }
                    table.give_back_memory();
                    super::closings::say_due();
                }
            })
    }
}
