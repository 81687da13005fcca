//! Which socket a UDP datagram was delivered to, or sent from (pure).
//!
//! Several unconnected sockets may share a port: two users' wildcard
//! sockets with SO_REUSEADDR, a SO_REUSEPORT group of workers. The kernel
//! hands each datagram to one of them, and no address on the wire says
//! which. Its events do: a datagram queued to a socket wakes
//! `sock:sk_data_ready` with the socket's kernel address (in whatever
//! context received it), and a send returns through `sock:sock_send_length`
//! with it (in the sender's). Nothing names the socket behind an address,
//! so the daemon asks: a *probe* peeks at the socket through a copy of its
//! fd (`MSG_PEEK | MSG_DONTWAIT | MSG_TRUNC` into no buffer: nothing is
//! taken, nothing waits), and that peek's own `sock_recv_length` event, in
//! the daemon's thread, carries the address. A thread's probes are matched
//! to its peek events in order ([`Deliveries::asked`] before each peek).
//!
//! Only the activity of sockets whose address is known is kept, and only
//! for as long as a packet may wait for its verdict. A datagram captured at
//! `t` went to (or came from) the socket with activity of that kind in
//! [`t - SKEW`, `t + WINDOW`]: the capture stamps a packet as it enters the
//! receive path (or leaves the sender) and the socket's event follows it
//! within microseconds on the same CPU, milliseconds when softirq work is
//! deferred under load. When the window holds activity of the socket and
//! of a rival both, or of neither, nothing is decided: the packet is
//! withheld and counted ([`Delivery::Undecided`]).

use std::collections::VecDeque;
use std::time::{Duration, SystemTime};

use rustc_hash::FxHashMap;

use crate::capture::classify::Transport;
use crate::events::Sample;
use crate::events::decode::{Direction, Event};

/// The flags of a probe's peek: MSG_PEEK | MSG_TRUNC | MSG_DONTWAIT, a mix
/// nothing but a probe asks for with an empty buffer.
pub const PROBE_FLAGS: i32 = 0x02 | 0x20 | 0x40;
/// Clock skew allowed between a packet's stamp and its socket's event.
pub const SKEW: Duration = Duration::from_micros(500);
/// How long after a packet's stamp the socket's event may come.
pub const WINDOW: Duration = Duration::from_millis(10);
/// How long activity is kept (packets wait at most 2 s for a verdict).
const KEPT: Duration = Duration::from_secs(3);
/// How long a socket whose address was just learned counts as needed,
/// whether or not a stream names it yet (see [`Deliveries::needed_by`]).
const KNOWN_GRACE: Duration = Duration::from_secs(5);
/// How long a probe waits for its event before it is given up.
const PROBE_KEPT: Duration = Duration::from_secs(2);

/// What a known socket did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Io {
    /// A datagram was queued to it.
    Received,
    /// It sent one.
    Sent,
}

/// Where a datagram went, as far as the events tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// To (or from) the socket asked about.
    Ours,
    /// To (or from) one of its rivals.
    Elsewhere,
    /// The events cannot tell: activity of both, or of neither, in the
    /// window.
    Undecided,
    /// Events were lost then: what they would have told is not known.
    Lost,
    /// Not yet known: the socket's address is not known from before the
    /// packet, or the events up to its window are not all in.
    Pending,
}

#[derive(Clone, Copy, Debug)]
struct Known {
    address: u64,
    /// When the probe's event came: activity is known from then on.
    since: SystemTime,
}

/// Which socket has which kernel address, and what each did lately.
#[derive(Debug)]
pub struct Deliveries {
    own_pid: u32,
    /// Probes asked and not yet seen, by thread, oldest first: the socket
    /// (inode) each asks about, and when.
    probes: FxHashMap<u32, VecDeque<(u64, SystemTime)>>,
    /// Known sockets by inode, and the inode at each address.
    known: FxHashMap<u64, Known>,
    inode_at: FxHashMap<u64, u64>,
    /// Each known socket's activity, by inode, in time order.
    activity: FxHashMap<u64, VecDeque<(SystemTime, Io)>>,
    /// The processes that sent or read on each known socket, by inode,
    /// and when they last did: a socket several processes hold (a
    /// prefork server's) is each one's only for what it sent or read.
    users: FxHashMap<u64, FxHashMap<u32, SystemTime>>,
    /// Addresses whose data-ready events the kernel sends, and since when
    /// (it is asked to, socket by socket, as streams need them).
    watched: FxHashMap<u64, SystemTime>,
    /// Spans in which events were lost: activity there is incomplete.
    lost: Vec<(SystemTime, SystemTime)>,
    /// The newest event time applied.
    newest: SystemTime,
}

impl Deliveries {
    /// `own_pid`: the daemon's, whose peeks are probes.
    pub fn new(own_pid: u32) -> Deliveries {
        Deliveries {
            own_pid,
            probes: FxHashMap::default(),
            known: FxHashMap::default(),
            inode_at: FxHashMap::default(),
            activity: FxHashMap::default(),
            users: FxHashMap::default(),
            watched: FxHashMap::default(),
            lost: Vec::new(),
            newest: SystemTime::UNIX_EPOCH,
        }
    }

    /// Thread `tid` is about to probe socket `inode`.
    pub fn asked(&mut self, tid: u32, inode: u64, at: SystemTime) {
        self.probes.entry(tid).or_default().push_back((inode, at));
    }

    /// The probe just asked by `tid` fired no event (the peek failed before
    /// reaching the socket).
    pub fn withdrawn(&mut self, tid: u32) {
        if let Some(queue) = self.probes.get_mut(&tid) {
            queue.pop_back();
        }
    }

    /// Whether anything here is still needed: a probe waits for its
    /// answer, or a socket whose address is known is one of `watched`
    /// (the sockets the streams now watch) or was learned within
    /// [`KNOWN_GRACE`] before `now` (a stream probes its sockets before it
    /// names them as watched).
    pub fn needed_by(&self, watched: &rustc_hash::FxHashSet<u64>, now: SystemTime) -> bool {
        let recent = |known: &Known| {
            now.duration_since(known.since)
                .map_or(true, |age| age < KNOWN_GRACE)
        };
        !self.probes.is_empty()
            || self
                .known
                .iter()
                .any(|(inode, known)| watched.contains(inode) || recent(known))
    }

    /// Forgets every socket's address and what it did: the sends and
    /// receives are no longer read, so what sockets do from now on is not
    /// known (a socket asked about later is probed again).
    pub fn forget(&mut self) {
        self.probes.clear();
        self.known.clear();
        self.inode_at.clear();
        self.activity.clear();
        self.users.clear();
    }

    /// Whether socket `inode`'s address is known or asked for.
    pub fn probed(&self, inode: u64) -> bool {
        self.known.contains_key(&inode)
            || self
                .probes
                .values()
                .any(|queue| queue.iter().any(|(asked, _)| *asked == inode))
    }

    /// The kernel sends the data-ready events of `addresses` from `since`
    /// on (and of no other).
    pub fn watching(&mut self, addresses: &[u64], since: SystemTime) {
        self.watched
            .retain(|address, _| addresses.contains(address));
        for address in addresses {
            self.watched.entry(*address).or_insert(since);
        }
    }

    /// Socket `inode`'s kernel address, if known.
    pub fn address_of(&self, inode: u64) -> Option<u64> {
        self.known.get(&inode).map(|known| known.address)
    }

    /// Since when socket `inode`'s activity is known.
    pub fn known_since(&self, inode: u64) -> Option<SystemTime> {
        self.known.get(&inode).map(|known| known.since)
    }

    /// Takes one event into account (in time order).
    pub fn apply(&mut self, sample: &Sample) {
        self.newest = self.newest.max(sample.at);
        match sample.decoded.event {
            Event::SocketIo {
                sock,
                transport: Transport::Udp,
                direction: Direction::Receive,
                flags: PROBE_FLAGS,
                ..
            } if sample.pid == self.own_pid => self.probe_seen(sample.tid, sock, sample.at),
            Event::Queued {
                sock,
                transport: Transport::Udp,
            } => self.record(sock, sample.at, Io::Received),
            Event::SocketIo {
                sock,
                transport: Transport::Udp,
                direction,
                result,
                ..
            } if result >= 0 && !sample.decoded.in_interrupt => {
                if direction == Direction::Send {
                    self.record(sock, sample.at, Io::Sent);
                }
                if let Some(&inode) = self.inode_at.get(&sock) {
                    self.users
                        .entry(inode)
                        .or_default()
                        .insert(sample.pid, sample.at);
                }
            }
            _ => {}
        }
    }

    fn probe_seen(&mut self, tid: u32, address: u64, at: SystemTime) {
        let Some(queue) = self.probes.get_mut(&tid) else {
            return;
        };
        // A probe asked long ago whose event never came is not this one's.
        while queue
            .front()
            .is_some_and(|(_, asked)| at.duration_since(*asked).unwrap_or_default() > PROBE_KEPT)
        {
            queue.pop_front();
        }
        let Some((inode, _)) = queue.pop_front() else {
            return;
        };
        if queue.is_empty() {
            self.probes.remove(&tid);
        }
        // Whatever was at this address before is gone (the kernel reuses a
        // freed socket's memory); a socket probed again where it was keeps
        // what it did.
        if let Some(&previous) = self.inode_at.get(&address)
            && previous != inode
        {
            self.known.remove(&previous);
            self.activity.remove(&previous);
            self.users.remove(&previous);
        }
        if let Some(old) = self.known.get(&inode)
            && old.address != address
        {
            self.inode_at.remove(&old.address);
            self.known.remove(&inode);
        }
        self.inode_at.insert(address, inode);
        self.known
            .entry(inode)
            .or_insert(Known { address, since: at });
    }

    fn record(&mut self, address: u64, at: SystemTime, io: Io) {
        if let Some(&inode) = self.inode_at.get(&address) {
            self.activity.entry(inode).or_default().push_back((at, io));
        }
    }

    /// The processes that sent or read on socket `inode` since its address
    /// was known: None while it is not known.
    pub fn users(&self, inode: u64) -> Option<Vec<u32>> {
        self.known.get(&inode)?;
        let mut pids: Vec<u32> = self
            .users
            .get(&inode)
            .map(|users| users.keys().copied().collect())
            .unwrap_or_default();
        pids.sort_unstable();
        Some(pids)
    }

    /// Events were lost between `from` and `until`: what known sockets did
    /// then is incomplete, and a probe's event may be among the lost
    /// (probes asked are given up: they are asked again).
    pub fn lost(&mut self, from: SystemTime, until: SystemTime) {
        self.lost.push((from, until));
        self.probes.clear();
    }

    /// Where a datagram of socket `ours` (an inode), stamped `at`, went,
    /// with `rivals` the other sockets that could have taken it, and the
    /// events applied up to `applied_until`. `io`: Received for a datagram
    /// to the sockets' port, Sent for one from it.
    pub fn delivery(
        &self,
        ours: u64,
        rivals: &[u64],
        at: SystemTime,
        io: Io,
        applied_until: SystemTime,
    ) -> Delivery {
        let from = at.checked_sub(SKEW).unwrap_or(at);
        let until = at + WINDOW;
        if applied_until < until {
            return Delivery::Pending;
        }
        match self.known.get(&ours) {
            Some(known) if known.since <= from => {
                // What was queued to it is told only once the kernel sends
                // its data-ready events.
                if io == Io::Received
                    && self
                        .watched
                        .get(&known.address)
                        .is_none_or(|since| *since > from)
                {
                    return if self.watched.contains_key(&known.address) {
                        Delivery::Undecided
                    } else {
                        Delivery::Pending
                    };
                }
            }
            Some(_) => return Delivery::Undecided,
            None => return Delivery::Pending,
        }
        if self
            .lost
            .iter()
            .any(|&(lost_from, lost_until)| lost_from <= until && from <= lost_until)
        {
            return Delivery::Lost;
        }
        let active = |inode: u64| {
            self.activity.get(&inode).is_some_and(|activity| {
                let start = activity.partition_point(|(when, _)| *when < from);
                activity
                    .iter()
                    .skip(start)
                    .take_while(|(when, _)| *when <= until)
                    .any(|(_, what)| *what == io)
            })
        };
        let ours_active = active(ours);
        let rival_active = rivals
            .iter()
            .filter(|rival| **rival != ours)
            .any(|rival| active(*rival));
        match (ours_active, rival_active) {
            (true, false) => Delivery::Ours,
            (false, true) => Delivery::Elsewhere,
            _ => Delivery::Undecided,
        }
    }

    /// Forgets activity and loss spans older than [`KEPT`], and sockets
    /// not among `alive` (the inodes some stream still asks about).
    pub fn prune(&mut self, alive: impl Fn(u64) -> bool) {
        let newest = self.newest;
        let old = |at: SystemTime| newest.duration_since(at).unwrap_or_default() > KEPT;
        for activity in self.activity.values_mut() {
            while activity.front().is_some_and(|(at, _)| old(*at)) {
                activity.pop_front();
            }
        }
        self.activity.retain(|_, activity| !activity.is_empty());
        self.lost.retain(|(_, until)| !old(*until));
        let gone: Vec<u64> = self
            .known
            .keys()
            .copied()
            .filter(|inode| !alive(*inode))
            .collect();
        for inode in gone {
            if let Some(known) = self.known.remove(&inode) {
                self.inode_at.remove(&known.address);
            }
            self.activity.remove(&inode);
            self.users.remove(&inode);
        }
        self.probes.retain(|_, queue| {
            queue.retain(|(_, asked)| !old(*asked));
            !queue.is_empty()
        });
    }

    /// Whether events were lost around `at` (within the window).
    pub fn lost_around(&self, at: SystemTime) -> bool {
        let from = at.checked_sub(SKEW).unwrap_or(at);
        let until = at + WINDOW;
        self.lost
            .iter()
            .any(|&(lost_from, lost_until)| lost_from <= until && from <= lost_until)
    }

    /// How many sockets' addresses are known (for tests and the log).
    pub fn known_count(&self) -> usize {
        self.known.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::decode::Decoded;
    use rustc_hash::FxHashSet;

    const OWN: u32 = 7;

    fn at(micros: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000) + Duration::from_micros(micros)
    }

    fn sample(micros: u64, pid: u32, tid: u32, event: Event, in_interrupt: bool) -> Sample {
        Sample {
            at: at(micros),
            pid,
            tid,
            decoded: Decoded {
                event,
                in_interrupt,
            },
        }
    }

    fn peek(micros: u64, tid: u32, sock: u64) -> Sample {
        sample(
            micros,
            OWN,
            tid,
            Event::SocketIo {
                sock,
                transport: Transport::Udp,
                direction: Direction::Receive,
                result: -11,
                flags: PROBE_FLAGS,
            },
            false,
        )
    }

    fn queued(micros: u64, sock: u64) -> Sample {
        sample(
            micros,
            999,
            999,
            Event::Queued {
                sock,
                transport: Transport::Udp,
            },
            true,
        )
    }

    fn sent(micros: u64, pid: u32, sock: u64) -> Sample {
        sample(
            micros,
            pid,
            pid,
            Event::SocketIo {
                sock,
                transport: Transport::Udp,
                direction: Direction::Send,
                result: 10,
                flags: 0,
            },
            false,
        )
    }

    /// Sockets 100 (at 0xa) and 200 (at 0xb) share a port; both probed
    /// by one thread at 0 µs.
    fn two_known() -> Deliveries {
        let mut deliveries = Deliveries::new(OWN);
        deliveries.asked(50, 100, at(0));
        deliveries.asked(50, 200, at(0));
        deliveries.apply(&peek(1, 50, 0xa));
        deliveries.apply(&peek(2, 50, 0xb));
        deliveries.watching(&[0xa, 0xb], at(3));
        deliveries
    }

    #[test]
    fn probes_name_addresses_in_the_order_a_thread_asked() {
        let deliveries = two_known();
        assert_eq!(deliveries.known_count(), 2);
        assert_eq!(deliveries.known_since(100), Some(at(1)));
        assert_eq!(deliveries.known_since(200), Some(at(2)));
        assert!(deliveries.probed(100));
        assert!(!deliveries.probed(300));
    }

    #[test]
    fn what_is_known_is_needed_while_a_stream_watches_it_or_a_probe_waits() {
        let watching = |inodes: &[u64]| inodes.iter().copied().collect::<FxHashSet<u64>>();
        let later = at(1) + KNOWN_GRACE;
        let mut deliveries = Deliveries::new(OWN);
        assert!(!deliveries.needed_by(&watching(&[]), at(0)));
        // A probe waits for its answer: needed, whoever watches.
        deliveries.asked(50, 100, at(0));
        assert!(deliveries.needed_by(&watching(&[]), later));
        deliveries.apply(&peek(1, 50, 0xa));
        // Known: needed while a stream watches the socket, and for a while
        // after its address was learned (the stream names it just after),
        // however quiet the events are meanwhile.
        assert!(deliveries.needed_by(&watching(&[100, 7]), later));
        assert!(deliveries.needed_by(&watching(&[7]), at(2)));
        assert!(!deliveries.needed_by(&watching(&[7]), later));
        // Forgotten: asked about again from scratch.
        deliveries.forget();
        assert!(!deliveries.probed(100));
        assert_eq!(deliveries.users(100), None);
        assert!(!deliveries.needed_by(&watching(&[100]), later));
    }

    #[test]
    fn a_peek_of_another_process_or_with_other_flags_is_no_probe() {
        let mut deliveries = Deliveries::new(OWN);
        deliveries.asked(50, 100, at(0));
        let mut other = peek(1, 50, 0xa);
        other.pid = 8;
        deliveries.apply(&other);
        let Event::SocketIo { .. } = other.decoded.event else {
            unreachable!()
        };
        let mut plain = peek(2, 50, 0xa);
        plain.decoded.event = Event::SocketIo {
            sock: 0xa,
            transport: Transport::Udp,
            direction: Direction::Receive,
            result: 5,
            flags: 0x40,
        };
        deliveries.apply(&plain);
        assert_eq!(deliveries.known_count(), 0);
        deliveries.apply(&peek(3, 50, 0xa));
        assert_eq!(deliveries.known_since(100), Some(at(3)));
    }

    #[test]
    fn each_datagram_goes_to_the_socket_that_was_woken_for_it() {
        let mut deliveries = two_known();
        // Datagrams stamped at 1 ms (to 100) and 30 ms (to 200).
        deliveries.apply(&queued(1_008, 0xa));
        deliveries.apply(&queued(30_006, 0xb));
        let until = at(100_000);
        let ask = |d: &Deliveries, ours, rival, micros| {
            d.delivery(ours, &[rival], at(micros), Io::Received, until)
        };
        assert_eq!(ask(&deliveries, 100, 200, 1_000), Delivery::Ours);
        assert_eq!(ask(&deliveries, 200, 100, 1_000), Delivery::Elsewhere);
        assert_eq!(ask(&deliveries, 200, 100, 30_000), Delivery::Ours);
        assert_eq!(ask(&deliveries, 100, 200, 30_000), Delivery::Elsewhere);
        // Dropped (nothing woken): neither's.
        assert_eq!(ask(&deliveries, 100, 200, 60_000), Delivery::Undecided);
        // Before the events are in: wait.
        assert_eq!(
            deliveries.delivery(100, &[200], at(1_000), Io::Received, at(5_000)),
            Delivery::Pending
        );
    }

    #[test]
    fn both_woken_within_the_window_is_undecided() {
        let mut deliveries = two_known();
        deliveries.apply(&queued(1_000, 0xa));
        deliveries.apply(&queued(1_050, 0xb));
        assert_eq!(
            deliveries.delivery(100, &[200], at(1_000), Io::Received, at(50_000)),
            Delivery::Undecided
        );
    }

    #[test]
    fn sends_are_told_apart_by_the_sending_socket() {
        let mut deliveries = two_known();
        deliveries.apply(&sent(2_010, 301, 0xb));
        let until = at(50_000);
        assert_eq!(
            deliveries.delivery(200, &[100], at(2_000), Io::Sent, until),
            Delivery::Ours
        );
        assert_eq!(
            deliveries.delivery(100, &[200], at(2_000), Io::Sent, until),
            Delivery::Elsewhere
        );
        // A receive is not a send.
        assert_eq!(
            deliveries.delivery(200, &[100], at(2_000), Io::Received, until),
            Delivery::Undecided
        );
    }

    #[test]
    fn before_the_probe_or_across_lost_events_nothing_is_decided() {
        let mut deliveries = two_known();
        deliveries.apply(&queued(5, 0xa));
        assert_eq!(
            deliveries.delivery(100, &[200], at(0), Io::Received, at(50_000)),
            Delivery::Undecided,
            "stamped before the address was known"
        );
        deliveries.apply(&queued(20_005, 0xa));
        deliveries.lost(at(19_000), at(21_000));
        assert_eq!(
            deliveries.delivery(100, &[200], at(20_000), Io::Received, at(50_000)),
            Delivery::Lost
        );
        assert_eq!(
            deliveries.delivery(300, &[200], at(20_000), Io::Received, at(50_000)),
            Delivery::Pending,
            "never probed"
        );
    }

    #[test]
    fn an_address_taken_by_a_new_socket_forgets_the_old_one() {
        let mut deliveries = two_known();
        deliveries.apply(&queued(1_000, 0xa));
        // Socket 100 closed; socket 300 is made at its address.
        deliveries.asked(50, 300, at(2_000));
        deliveries.apply(&peek(2_001, 50, 0xa));
        deliveries.watching(&[0xa, 0xb], at(2_002));
        assert_eq!(deliveries.known_since(100), None);
        assert_eq!(deliveries.known_since(300), Some(at(2_001)));
        deliveries.apply(&queued(3_000, 0xa));
        assert_eq!(
            deliveries.delivery(300, &[200], at(2_995), Io::Received, at(50_000)),
            Delivery::Ours
        );
    }

    #[test]
    fn a_withdrawn_probe_does_not_shift_the_next() {
        let mut deliveries = Deliveries::new(OWN);
        deliveries.asked(50, 100, at(0));
        deliveries.withdrawn(50);
        deliveries.asked(50, 200, at(1));
        deliveries.apply(&peek(2, 50, 0xb));
        assert_eq!(deliveries.known_since(200), Some(at(2)));
        assert_eq!(deliveries.known_since(100), None);
    }

    #[test]
    fn pruning_forgets_old_activity_and_sockets_no_one_asks_about() {
        let mut deliveries = two_known();
        deliveries.apply(&queued(10, 0xa));
        deliveries.apply(&queued(10_000_000, 0xb));
        deliveries.prune(|inode| inode == 200);
        assert_eq!(deliveries.known_count(), 1);
        assert!(!deliveries.activity.contains_key(&100));
        assert_eq!(deliveries.activity[&200].len(), 1);
    }

    #[test]
    fn the_processes_that_use_a_socket_are_told() {
        let mut deliveries = two_known();
        assert_eq!(deliveries.users(100), Some(vec![]));
        deliveries.apply(&sent(10, 301, 0xa));
        let mut read = sent(20, 302, 0xa);
        read.decoded.event = Event::SocketIo {
            sock: 0xa,
            transport: Transport::Udp,
            direction: Direction::Receive,
            result: 4,
            flags: 0,
        };
        deliveries.apply(&read);
        // The daemon's probes are not uses.
        deliveries.asked(50, 100, at(30));
        deliveries.apply(&peek(31, 50, 0xa));
        assert_eq!(deliveries.users(100), Some(vec![301, 302]));
        assert_eq!(deliveries.users(300), None);
    }
}
