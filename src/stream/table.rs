//! The open streams by file handle, and the watchdog thread that looks
//! after their waiting reads (signals, closed sockets) and ends them all at
//! shutdown.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::{Stream, lock};

/// How often waiting readers are checked for signals. A reader that gets
/// Ctrl-C or SIGKILL while blocked is answered within about this long.
const WATCH_INTERVAL: Duration = Duration::from_millis(100);

#[derive(Default)]
pub struct StreamTable {
    streams: Mutex<HashMap<u64, Arc<Stream>>>,
    next_handle: AtomicU64,
    shutting_down: AtomicBool,
}

impl StreamTable {
    pub fn new() -> Arc<StreamTable> {
        Arc::new(StreamTable {
            next_handle: AtomicU64::new(1),
            ..StreamTable::default()
        })
    }

    /// Registers an opened stream; returns its file handle. After shutdown
    /// began, the stream is ended at once (its reader gets EOF).
    pub fn insert(&self, stream: Arc<Stream>) -> u64 {
        let handle = self.next_handle.fetch_add(1, Ordering::Relaxed);
        if self.shutting_down.load(Ordering::SeqCst) {
            stream.stop_capture();
        }
        lock(&self.streams).insert(handle, stream);
        handle
    }

    pub fn get(&self, handle: u64) -> Option<Arc<Stream>> {
        lock(&self.streams).get(&handle).cloned()
    }

    pub fn remove(&self, handle: u64) -> Option<Arc<Stream>> {
        lock(&self.streams).remove(&handle)
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
        let streams: Vec<Arc<Stream>> = lock(&self.streams).values().cloned().collect();
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
                        .filter(|stream| stream.needs_watch())
                        .cloned()
                        .collect();
                    let now = Instant::now();
                    for stream in waiting {
                        stream.watch(now);
                    }
                }
            })
    }
}
