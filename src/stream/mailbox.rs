//! A queue between the daemon's threads whose receiver, once it finds the
//! queue empty, goes to sleep at once.
//!
//! Not a crossbeam channel for the threads that wake most (the stream
//! servers, at every block a capture hands over, and the trackers, every
//! few milliseconds): crossbeam's receiver spins, then gives up the CPU
//! four times (`sched_yield`) before it sleeps. Beside a busy service on a
//! small machine each of those yields is a switch to the service and back,
//! and they were most of these threads' context switches (a tracker: 1,036
//! yields to 142 sleeps over three seconds of redis-benchmark).

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

/// A multi-producer, multi-consumer queue; closed by [`Mailbox::close`].
pub struct Mailbox<T> {
    state: Mutex<State<T>>,
    ready: Condvar,
}

struct State<T> {
    items: VecDeque<T>,
    closed: bool,
    /// Receivers asleep: a send wakes one only if there is one.
    sleeping: usize,
}

/// What a receive found.
#[derive(Debug, PartialEq, Eq)]
pub enum Received<T> {
    Item(T),
    /// The deadline passed with nothing queued.
    TimedOut,
    /// Closed, and everything sent before was received.
    Closed,
}

impl<T> Default for Mailbox<T> {
    fn default() -> Self {
        Mailbox {
            state: Mutex::new(State {
                items: VecDeque::new(),
                closed: false,
                sleeping: 0,
            }),
            ready: Condvar::new(),
        }
    }
}

impl<T> Mailbox<T> {
    fn state(&self) -> MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `item`; false (and the item dropped) once closed.
    pub fn send(&self, item: T) -> bool {
        let mut state = self.state();
        if state.closed {
            return false;
        }
        state.items.push_back(item);
        let wake = state.sleeping > 0;
        drop(state);
        if wake {
            self.ready.notify_one();
        }
        true
    }

    /// Takes no more items; receivers get what is queued, then
    /// [`Received::Closed`].
    pub fn close(&self) {
        self.state().closed = true;
        self.ready.notify_all();
    }

    /// The next item, waiting for one until `deadline` (for ever if none).
    pub fn recv_until(&self, deadline: Option<Instant>) -> Received<T> {
        let mut state = self.state();
        loop {
            if let Some(item) = state.items.pop_front() {
                return Received::Item(item);
            }
            if state.closed {
                return Received::Closed;
            }
            state.sleeping += 1;
            state = match deadline {
                None => self
                    .ready
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner),
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        state.sleeping -= 1;
                        return Received::TimedOut;
                    }
                    self.ready
                        .wait_timeout(state, left)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
            };
            state.sleeping -= 1;
        }
    }

    /// The next item, waiting for one as long as it takes; `None` once
    /// closed and drained.
    pub fn recv(&self) -> Option<T> {
        match self.recv_until(None) {
            Received::Item(item) => Some(item),
            Received::TimedOut | Received::Closed => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn items_come_in_order_then_the_close_after_them() {
        let mailbox = Mailbox::default();
        assert!(mailbox.send(1));
        assert!(mailbox.send(2));
        mailbox.close();
        assert!(!mailbox.send(3));
        assert_eq!(mailbox.recv(), Some(1));
        assert_eq!(mailbox.recv_until(None), Received::Item(2));
        assert_eq!(mailbox.recv(), None);
    }

    #[test]
    fn a_receive_times_out_when_nothing_comes() {
        let mailbox: Mailbox<u8> = Mailbox::default();
        let started = Instant::now();
        let deadline = started + Duration::from_millis(20);
        assert_eq!(mailbox.recv_until(Some(deadline)), Received::TimedOut);
        assert!(started.elapsed() >= Duration::from_millis(20));
    }

    #[test]
    fn sleeping_receivers_are_woken_by_sends_and_by_the_close() {
        let mailbox = Arc::new(Mailbox::default());
        let receivers: Vec<_> = (0..3)
            .map(|_| {
                let mailbox = Arc::clone(&mailbox);
                std::thread::spawn(move || {
                    let mut got = Vec::new();
                    while let Some(item) = mailbox.recv() {
                        got.push(item);
                    }
                    got
                })
            })
            .collect();
        for item in 0..100 {
            assert!(mailbox.send(item));
            if item % 10 == 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        mailbox.close();
        let mut all: Vec<i32> = receivers
            .into_iter()
            .flat_map(|receiver| receiver.join().unwrap())
            .collect();
        all.sort_unstable();
        assert_eq!(all, (0..100).collect::<Vec<_>>());
    }
}
