//! One stream's packets from several captures, in time order and each once
//! (pure).
//!
//! A `tree` whose members live in several network namespaces (a
//! container's processes and the runtime's shim on the host) has a capture
//! in each. Each capture hands its packets over a kernel block at a time,
//! so two captures' packets come interleaved out of order: [`Reorder`]
//! holds them long enough for every capture to have handed over what came
//! before, and lets them out by time. And one namespace sees some packets
//! twice (a bridge port and the bridge, a packet routed in and out), and
//! a packet between members in two namespaces is seen in both:
//! [`Copies`] tells a second copy from a new packet.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::time::{Duration, Instant, SystemTime};

/// Packets held until due, let out by time.
#[derive(Debug)]
pub struct Reorder<T> {
    heap: BinaryHeap<Reverse<(SystemTime, u64)>>,
    items: HashMap<u64, T>,
    next: u64,
}

impl<T> Default for Reorder<T> {
    fn default() -> Self {
        Reorder {
            heap: BinaryHeap::new(),
            items: HashMap::new(),
            next: 0,
        }
    }
}

impl<T> Reorder<T> {
    /// Holds a packet stamped `at`.
    pub fn push(&mut self, at: SystemTime, item: T) {
        let seq = self.next;
        self.next += 1;
        self.heap.push(Reverse((at, seq)));
        self.items.insert(seq, item);
    }

    /// The packets stamped at least `delay` before `now`, oldest first
    /// (those stamped alike in the order they came).
    pub fn due(&mut self, now: SystemTime, delay: Duration) -> Vec<T> {
        let mut out = Vec::new();
        while let Some(Reverse((at, seq))) = self.heap.peek().copied() {
            if now.duration_since(at).unwrap_or_default() < delay {
                break;
            }
            self.heap.pop();
            if let Some(item) = self.items.remove(&seq) {
                out.push(item);
            }
        }
        out
    }

    /// Everything held, oldest first.
    pub fn drain(&mut self) -> Vec<T> {
        let mut out = Vec::with_capacity(self.items.len());
        while let Some(Reverse((_, seq))) = self.heap.pop() {
            if let Some(item) = self.items.remove(&seq) {
                out.push(item);
            }
        }
        out
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

/// How far apart two captures stamp one packet: a bridge and its port, a
/// veth pair's two ends in two namespaces.
const SAME_PACKET: Duration = Duration::from_micros(500);
/// How long a packet is remembered: longer than a capture holds a packet
/// before handing it over (its copy in another capture comes that late).
const REMEMBERED: Duration = Duration::from_millis(300);

/// The packets a stream let out lately, to tell copies.
#[derive(Debug, Default)]
pub struct Copies {
    /// By identity: when it was stamped.
    stamped: HashMap<u64, SystemTime>,
    /// Identities by when they came, to forget them.
    arrivals: VecDeque<(Instant, u64)>,
}

impl Copies {
    /// Whether a packet of `identity` (see
    /// [`crate::capture::classify::packet_identity`]) stamped `at` and
    /// come `now` is a copy of one let out just before, in this namespace
    /// or another; notes it if not.
    pub fn is_copy(&mut self, identity: u64, at: SystemTime, now: Instant) -> bool {
        while let Some(&(came, old)) = self.arrivals.front() {
            if now.duration_since(came) <= REMEMBERED {
                break;
            }
            self.arrivals.pop_front();
            self.stamped.remove(&old);
        }
        if let Some(stamped) = self.stamped.get(&identity) {
            let apart = at
                .duration_since(*stamped)
                .or_else(|err| Ok::<_, ()>(err.duration()))
                .unwrap_or_default();
            if apart <= SAME_PACKET {
                return true;
            }
        }
        self.stamped.insert(identity, at);
        self.arrivals.push_back((now, identity));
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(micros: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000) + Duration::from_micros(micros)
    }

    #[test]
    fn packets_of_two_captures_come_out_in_time_order_once_due() {
        let mut reorder = Reorder::default();
        // The second namespace's block came after the first's, with
        // packets from between.
        for micros in [100, 300, 500] {
            reorder.push(at(micros), micros);
        }
        for micros in [200, 400, 600] {
            reorder.push(at(micros), micros);
        }
        let delay = Duration::from_millis(50);
        assert!(reorder.due(at(40_000), delay).is_empty());
        assert_eq!(reorder.due(at(50_400), delay), [100, 200, 300, 400]);
        assert_eq!(reorder.drain(), [500, 600]);
        assert!(reorder.is_empty());
    }

    #[test]
    fn a_second_capture_of_one_packet_is_a_copy() {
        let mut copies = Copies::default();
        let now = Instant::now();
        assert!(!copies.is_copy(7, at(100), now));
        assert!(copies.is_copy(7, at(140), now), "the bridge after its port");
        assert!(!copies.is_copy(8, at(160), now), "another packet");
        // The other namespace's capture hands its copy over a block later,
        // stamped a little before.
        assert!(copies.is_copy(8, at(120), now + Duration::from_millis(40)));
        assert!(!copies.is_copy(7, at(5_000), now), "long after: sent again");
        // Forgotten once long come.
        assert!(!copies.is_copy(7, at(5_100), now + Duration::from_secs(1)));
    }
}
