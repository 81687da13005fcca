//! The daemon's tracker threads: a few, shared by every `all` and `tree`
//! stream, so that a stream costs no thread of its own.
//!
//! A stream's tracker is a [`Followed`]: a step that looks at its
//! processes and says when it wants to look again, or that it is done.
//! Each tracker thread runs the steps of its streams when they are due, or
//! at once when a stream is poked (a packet of an unknown flow came). A
//! stream goes to the thread following the fewest. Beside them, one
//! background thread runs the slow reads a step must not wait for (a
//! namespace's socket tables, thousands of rows after a burst of short
//! connections).
//!
//! Started and stopped by the daemon ([`Trackers::start`],
//! [`Trackers::stop`]); every thread is joined.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::mailbox::{Mailbox, Received};

/// One stream's tracker, stepped by a tracker thread.
pub trait Followed: Send {
    /// Looks once; how long after this look to look again (sooner if
    /// poked), or `None` when done (the tracker is then dropped).
    fn step(&mut self, now: Instant) -> Option<Duration>;
}

enum Message {
    Follow(u64, Box<dyn Followed>, Arc<AtomicBool>),
    Poke(u64),
    Shutdown,
}

/// Makes a followed stream's tracker look now rather than when due.
#[derive(Clone)]
pub struct Poke {
    id: u64,
    queue: Arc<Mailbox<Message>>,
    /// Set while a poke is queued: a burst of packets queues one.
    queued: Arc<AtomicBool>,
}

impl Poke {
    pub fn poke(&self) {
        if !self.queued.swap(true, Ordering::SeqCst) {
            self.queue.send(Message::Poke(self.id));
        }
    }
}

struct Pool {
    threads: Vec<(Arc<Mailbox<Message>>, Arc<AtomicUsize>)>,
    background: Arc<Mailbox<Box<dyn FnOnce() + Send>>>,
}

/// What [`follow`] and [`in_background`] reach: the running threads.
static POOL: Mutex<Option<Pool>> = Mutex::new(None);

fn not_running() -> std::io::Error {
    std::io::Error::other("the tracker threads are not running")
}

/// Hands a stream's tracker to the least busy tracker thread, which steps
/// it at once; the returned [`Poke`] makes it look again sooner.
pub fn follow(followed: Box<dyn Followed>) -> std::io::Result<Poke> {
    static NEXT_ID: AtomicU64 = AtomicU64::new(0);
    let pool = POOL.lock().unwrap_or_else(PoisonError::into_inner);
    let (queue, load) = pool
        .as_ref()
        .and_then(|pool| {
            pool.threads
                .iter()
                .min_by_key(|(_, load)| load.load(Ordering::Relaxed))
        })
        .ok_or_else(not_running)?;
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let queued = Arc::new(AtomicBool::new(false));
    load.fetch_add(1, Ordering::Relaxed);
    if !queue.send(Message::Follow(id, followed, Arc::clone(&queued))) {
        return Err(not_running());
    }
    Ok(Poke {
        id,
        queue: Arc::clone(queue),
        queued,
    })
}

/// Runs `job` on the background thread, after the jobs before it.
pub fn in_background(job: Box<dyn FnOnce() + Send>) -> std::io::Result<()> {
    let pool = POOL.lock().unwrap_or_else(PoisonError::into_inner);
    if pool.as_ref().ok_or_else(not_running)?.background.send(job) {
        Ok(())
    } else {
        Err(not_running())
    }
}

/// The running threads.
pub struct Trackers {
    threads: Vec<JoinHandle<()>>,
    queues: Vec<Arc<Mailbox<Message>>>,
    background: Arc<Mailbox<Box<dyn FnOnce() + Send>>>,
}

impl Trackers {
    pub fn start() -> std::io::Result<Trackers> {
        let mut threads = Vec::new();
        let mut queues = Vec::new();
        for index in 0..crate::capture::service::threads_per_kind() {
            let queue = Arc::new(Mailbox::default());
            let received = Arc::clone(&queue);
            let load = Arc::new(AtomicUsize::new(0));
            let thread_load = Arc::clone(&load);
            threads.push(
                thread::Builder::new()
                    .name(format!("tracker-{index}"))
                    .spawn(move || run(&received, &thread_load))?,
            );
            queues.push((queue, load));
        }
        let background = Arc::new(Mailbox::<Box<dyn FnOnce() + Send>>::default());
        let jobs = Arc::clone(&background);
        threads.push(
            thread::Builder::new()
                .name("tables".into())
                .spawn(move || {
                    while let Some(job) = jobs.recv() {
                        job();
                    }
                })?,
        );
        let senders = queues.iter().map(|(queue, _)| Arc::clone(queue)).collect();
        *POOL.lock().unwrap_or_else(PoisonError::into_inner) = Some(Pool {
            threads: queues,
            background: Arc::clone(&background),
        });
        Ok(Trackers {
            threads,
            queues: senders,
            background,
        })
    }

    /// Ends the threads: the trackers still followed are dropped.
    pub fn stop(self) {
        // The background thread ends once its queue is closed and done; a
        // tracker thread is told (a stream's Poke may outlive the pool).
        POOL.lock().unwrap_or_else(PoisonError::into_inner).take();
        self.background.close();
        for queue in &self.queues {
            queue.send(Message::Shutdown);
            queue.close();
        }
        for thread in self.threads {
            let _ = thread.join();
        }
    }
}

struct Entry {
    followed: Box<dyn Followed>,
    queued: Arc<AtomicBool>,
    due: Instant,
}

/// A tracker thread: steps each followed tracker when due or poked.
fn run(messages: &Mailbox<Message>, load: &AtomicUsize) {
    let mut entries: HashMap<u64, Entry> = HashMap::new();
    // Stale entries (a stream stepped early by a poke) are skipped.
    let mut schedule: BinaryHeap<Reverse<(Instant, u64)>> = BinaryHeap::new();
    loop {
        let message = messages.recv_until(schedule.peek().map(|Reverse((due, _))| *due));
        let mut now_due = Vec::new();
        match message {
            Received::Item(Message::Follow(id, followed, queued)) => {
                entries.insert(
                    id,
                    Entry {
                        followed,
                        queued,
                        due: Instant::now(),
                    },
                );
                now_due.push(id);
            }
            Received::Item(Message::Poke(id)) => now_due.push(id),
            Received::TimedOut => {}
            Received::Item(Message::Shutdown) | Received::Closed => return,
        }
        let now = Instant::now();
        while let Some(&Reverse((due, id))) = schedule.peek() {
            if due > now {
                break;
            }
            schedule.pop();
            if entries.get(&id).is_some_and(|entry| entry.due == due) {
                now_due.push(id);
            }
        }
        for id in now_due {
            let Some(entry) = entries.get_mut(&id) else {
                continue;
            };
            entry.queued.store(false, Ordering::SeqCst);
            match entry.followed.step(Instant::now()) {
                Some(wait) => {
                    // The wait runs from the end of the look, so a look that
                    // takes long is not followed at once by the next.
                    entry.due = Instant::now() + wait;
                    schedule.push(Reverse((entry.due, id)));
                }
                None => {
                    entries.remove(&id);
                    load.fetch_sub(1, Ordering::Relaxed);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts its steps; done after `steps`.
    struct Counter {
        steps: Arc<AtomicUsize>,
        last: usize,
        wait: Duration,
    }

    impl Followed for Counter {
        fn step(&mut self, _now: Instant) -> Option<Duration> {
            let done = self.steps.fetch_add(1, Ordering::SeqCst) + 1;
            (done < self.last).then_some(self.wait)
        }
    }

    fn wait_for(what: &str, condition: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !condition() {
            assert!(Instant::now() < deadline, "{what}");
            thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn streams_are_stepped_when_due_and_when_poked_then_dropped_when_done() {
        // The pool is daemon-wide; this is the only test that starts it.
        let trackers = Trackers::start().unwrap();
        let quick = Arc::new(AtomicUsize::new(0));
        follow(Box::new(Counter {
            steps: Arc::clone(&quick),
            last: 5,
            wait: Duration::from_millis(2),
        }))
        .unwrap();
        // Stepped at once, then every 2 ms until done.
        wait_for("five steps", || quick.load(Ordering::SeqCst) == 5);
        thread::sleep(Duration::from_millis(20));
        assert_eq!(quick.load(Ordering::SeqCst), 5, "no step after done");

        // A slow one is stepped early when poked.
        let slow = Arc::new(AtomicUsize::new(0));
        let poke = follow(Box::new(Counter {
            steps: Arc::clone(&slow),
            last: 3,
            wait: Duration::from_secs(60),
        }))
        .unwrap();
        wait_for("the first step", || slow.load(Ordering::SeqCst) == 1);
        poke.poke();
        wait_for("a poked step", || slow.load(Ordering::SeqCst) == 2);
        poke.poke();
        wait_for("the last step", || slow.load(Ordering::SeqCst) == 3);

        let (done, ran) = crossbeam_channel::bounded(1);
        in_background(Box::new(move || {
            let _ = done.send(());
        }))
        .unwrap();
        ran.recv_timeout(Duration::from_secs(5)).unwrap();
        drop(poke);
        trackers.stop();
        assert!(
            follow(Box::new(Counter {
                steps: Arc::new(AtomicUsize::new(0)),
                last: 1,
                wait: Duration::ZERO,
            }))
            .is_err()
        );
    }
}
