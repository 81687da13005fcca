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
use std::collections::{BinaryHeap, HashMap};
use std::time::{Duration, SystemTime};

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

    /// The packets stamped at least `delay` before `now`, and before
    /// `before` if given (a packet still waiting to be placed may come
    /// later with that stamp), oldest first (those stamped alike in the
    /// order they came).
    pub fn due(&mut self, now: SystemTime, delay: Duration, before: Option<SystemTime>) -> Vec<T> {
        let mut out = Vec::new();
        while let Some(Reverse((at, seq))) = self.heap.peek().copied() {
            if now.duration_since(at).unwrap_or_default() < delay
                || before.is_some_and(|before| at >= before)
            {
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

/// The packets a stream let out lately, to tell copies: two generations
/// of identities, the older forgotten as a whole when the newer is
/// [`REMEMBERED`] old (no per-packet bookkeeping beyond one lookup and one
/// insert).
#[derive(Debug, Default)]
pub struct Copies {
    current: HashMap<u64, SystemTime, BuildIdentity>,
    previous: HashMap<u64, SystemTime, BuildIdentity>,
    /// The newest stamp of the current generation's first packet.
    began: Option<SystemTime>,
}

/// Identities are hashes already: used as they are.
#[derive(Clone, Copy, Debug, Default)]
pub struct BuildIdentity;

impl std::hash::BuildHasher for BuildIdentity {
    type Hasher = IdentityHasher;
    fn build_hasher(&self) -> IdentityHasher {
        IdentityHasher(0)
    }
}

#[derive(Clone, Copy, Debug, Default)]
pub struct IdentityHasher(u64);

impl std::hash::Hasher for IdentityHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 = (self.0 << 8) ^ u64::from(*byte) ^ (self.0 >> 56);
        }
    }
    fn write_u64(&mut self, value: u64) {
        self.0 = value;
    }
}

impl Copies {
    /// Whether a packet of `identity` (see
    /// [`crate::capture::classify::packet_identity`]) stamped `at` is a
    /// copy of one let out just before, in this namespace or another;
    /// notes it if not. Generations turn by the packets' stamps (another
    /// capture's come up to a block late, so older stamps keep coming).
    pub fn is_copy(&mut self, identity: u64, at: SystemTime) -> bool {
        match self.began {
            Some(began) if at.duration_since(began).unwrap_or_default() <= REMEMBERED => {}
            _ => {
                let room = self.current.len();
                self.previous = std::mem::replace(
                    &mut self.current,
                    HashMap::with_capacity_and_hasher(room, BuildIdentity),
                );
                self.began = Some(at);
            }
        }
        let seen = self
            .current
            .get(&identity)
            .or_else(|| self.previous.get(&identity));
        if let Some(stamped) = seen {
            let apart = at
                .duration_since(*stamped)
                .unwrap_or_else(|err| err.duration());
            if apart <= SAME_PACKET {
                return true;
            }
        }
        self.current.insert(identity, at);
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
        assert!(reorder.due(at(40_000), delay, None).is_empty());
        // A packet stamped 250 µs still waits for its owner.
        assert_eq!(reorder.due(at(50_400), delay, Some(at(250))), [100, 200]);
        assert_eq!(reorder.due(at(50_400), delay, None), [300, 400]);
        assert_eq!(reorder.drain(), [500, 600]);
        assert!(reorder.is_empty());
    }

    #[test]
    fn a_second_capture_of_one_packet_is_a_copy() {
        let mut copies = Copies::default();
        assert!(!copies.is_copy(7, at(100)));
        assert!(copies.is_copy(7, at(140)), "the bridge after its port");
        assert!(!copies.is_copy(8, at(160)), "another packet");
        // The other namespace's capture hands its copy over a block later,
        // stamped a little before.
        assert!(copies.is_copy(8, at(120)));
        assert!(!copies.is_copy(7, at(5_000)), "long after: sent again");
        // Forgotten two generations on.
        assert!(!copies.is_copy(9, at(400_000)));
        assert!(!copies.is_copy(10, at(800_000)));
        assert!(!copies.is_copy(8, at(800_100)));
    }
}
