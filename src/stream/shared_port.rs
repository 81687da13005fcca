//! The socket file of an unconnected UDP socket whose port and address
//! other sockets of its namespace share (its *rivals*, see
//! [`crate::capture::filter::rivals_of`]): two users' wildcard sockets with
//! SO_REUSEADDR, a SO_REUSEPORT group. The kernel gives each datagram to
//! one of them and no address on the wire says which, so the capture's
//! filter cannot: this sink holds each datagram until the kernel's events
//! tell which socket it went to or came from
//! ([`crate::attribution::deliveries`]), keeps the socket's own, and
//! withholds (and counts) what they cannot tell. Another user's datagrams
//! never reach the reader.
//!
//! While no socket shares the port, packets pass straight through (the
//! filter is exact then). The rivals are looked at again with the
//! namespace's table ([`super::neighbours`]); a socket that starts sharing
//! the port in between shows up at that look, within a second.

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant, SystemTime};

use log::debug;

use super::tracking::{self, Poke};
use super::{Miss, Stream, lock};
use crate::attribution::deliveries::Io;
use crate::attribution::{Delivery, KernelEvents, Subscription, Watcher};
use crate::capture::classify::{Transport, flow_of};
use crate::capture::source::{CaptureStats, PacketSink, Timestamp};

/// The longest a datagram waits for the events that tell whose it is.
const LONGEST_WAIT: Duration = Duration::from_secs(2);
/// How often the gate looks at waiting datagrams when nothing pokes it.
const LOOK_INTERVAL: Duration = Duration::from_millis(5);
/// How often it looks while nothing waits.
const IDLE_INTERVAL: Duration = Duration::from_millis(200);

struct Waiting {
    queued: Instant,
    at: SystemTime,
    io: Io,
    timestamp: Timestamp,
    original_length: u32,
    data: Vec<u8>,
}

pub struct SharedPortGate {
    stream: Arc<Stream>,
    /// The socket, its address and who holds it as which fd.
    inode: u64,
    local: SocketAddr,
    holder: (i32, i32),
    linktype: AtomicI32,
    /// Events, subscribed once rivals appear.
    source: Arc<KernelEvents>,
    events: Mutex<Option<Subscription>>,
    /// Keeps the holder's and the rivals' events read.
    watcher: Mutex<Option<Watcher>>,
    rivals: Mutex<Vec<u64>>,
    rivals_asked: Mutex<HashSet<u64>>,
    waiting: Mutex<VecDeque<Waiting>>,
    poke: OnceLock<Poke>,
    /// The capture ended (with these counts): the stream ends once nothing
    /// waits.
    ended: Mutex<Option<CaptureStats>>,
    /// Itself, kept from the capture's end until the stream has been told
    /// (the capture lets go of its sink once it ended).
    me: Weak<SharedPortGate>,
    keep: Mutex<Option<Arc<SharedPortGate>>>,
}

impl SharedPortGate {
    /// A gate in front of `stream` for socket `inode` bound at `local`,
    /// held by process `holder.0` as fd `holder.1`, with `rivals` now.
    pub fn start(
        stream: Arc<Stream>,
        inode: u64,
        local: SocketAddr,
        holder: (i32, i32),
        source: Arc<KernelEvents>,
        rivals: Vec<u64>,
    ) -> std::io::Result<Arc<SharedPortGate>> {
        let gate = Arc::new_cyclic(|me| SharedPortGate {
            stream,
            inode,
            local,
            holder,
            linktype: AtomicI32::new(-1),
            source,
            events: Mutex::new(None),
            watcher: Mutex::new(None),
            rivals: Mutex::new(Vec::new()),
            rivals_asked: Mutex::new(HashSet::new()),
            waiting: Mutex::new(VecDeque::new()),
            poke: OnceLock::new(),
            ended: Mutex::new(None),
            me: me.clone(),
            keep: Mutex::new(None),
        });
        gate.stream.gated_by(&gate);
        gate.set_rivals(rivals);
        let poke = tracking::follow(Box::new(Looking {
            gate: Arc::downgrade(&gate),
        }))?;
        let _ = gate.poke.set(poke);
        Ok(gate)
    }

    /// The capture opened, with this link type.
    pub fn opened(&self, linktype: i32) {
        self.linktype.store(linktype, Ordering::SeqCst);
    }

    /// The sockets sharing the port changed: their addresses are asked
    /// for, and the events subscribed to (a subscription that cannot be
    /// had leaves every shared datagram undecided).
    pub fn set_rivals(&self, rivals: Vec<u64>) {
        if !rivals.is_empty() {
            let events = {
                let mut slot = lock(&self.events);
                if slot.is_none() {
                    match self.source.subscribe() {
                        Ok(events) => *slot = Some(events),
                        Err(why) => debug!(
                            "{}: kernel events cannot be had ({why}): datagrams the sockets sharing \
                             its port may have taken are withheld",
                            self.stream.label()
                        ),
                    }
                }
                slot.clone()
            };
            if let Some(events) = events {
                let mut watcher = lock(&self.watcher);
                let watcher = watcher.get_or_insert_with(|| events.watcher());
                let inodes = std::iter::once(self.inode).chain(rivals.iter().copied());
                watcher.set(vec![self.holder.0 as u32], inodes.collect());
                self.probe(&events, &rivals);
            }
        }
        *lock(&self.rivals) = rivals;
    }

    fn probe(&self, events: &Subscription, rivals: &[u64]) {
        let (pid, fd) = self.holder;
        if let Err(err) = events.probe(pid, fd, self.inode, true) {
            debug!(
                "{}: cannot ask the socket its kernel address: {err}",
                self.stream.label()
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

    /// Which way a datagram went, seen from the socket; None for one that
    /// is not to or from its port (not the filter's).
    fn way(&self, data: &[u8]) -> Option<(Io, Transport)> {
        let flow = flow_of(self.linktype.load(Ordering::Relaxed), data)?;
        if flow.dst.port() == self.local.port() {
            Some((Io::Received, flow.transport))
        } else if flow.src.port() == self.local.port() {
            Some((Io::Sent, flow.transport))
        } else {
            None
        }
    }

    /// Passes on the waiting datagrams whose socket is known now, in the
    /// order they came; withholds those the events cannot tell.
    fn look(&self) {
        let rivals = lock(&self.rivals).clone();
        let events = lock(&self.events).clone();
        let mut waiting = lock(&self.waiting);
        while let Some(next) = waiting.front() {
            let delivery = match &events {
                _ if rivals.is_empty() => Delivery::Ours,
                Some(events) => events.delivery(self.inode, &rivals, next.at, next.io),
                None => Delivery::Undecided,
            };
            let delivery = match delivery {
                Delivery::Pending if next.queued.elapsed() < LONGEST_WAIT => {
                    // It waits for events the reader has yet to read.
                    if let Some(events) = &events {
                        events.hurry();
                    }
                    break;
                }
                other => other,
            };
            let Some(datagram) = waiting.pop_front() else {
                break;
            };
            match delivery {
                Delivery::Ours => {
                    self.stream
                        .packet(datagram.timestamp, datagram.original_length, &datagram.data)
                }
                Delivery::Elsewhere => {}
                Delivery::Undecided => self.stream.missed(Miss::Undecided),
                Delivery::Lost => self.stream.missed(Miss::EventsLost),
                Delivery::Pending => self.stream.missed(Miss::Unplaced),
            }
        }
    }

    fn wall_time(timestamp: Timestamp, nanoseconds: bool) -> SystemTime {
        let fraction = if nanoseconds {
            Duration::from_nanos(u64::from(timestamp.fraction))
        } else {
            Duration::from_micros(u64::from(timestamp.fraction))
        };
        SystemTime::UNIX_EPOCH + Duration::from_secs(u64::from(timestamp.seconds)) + fraction
    }

    /// One look; whether the gate is done (the capture ended and nothing
    /// waits: the stream has been told).
    fn step(&self) -> bool {
        self.look();
        self.stream.batch_end();
        let ended = *lock(&self.ended);
        match ended {
            Some(stats) if lock(&self.waiting).is_empty() => {
                self.stream.ended(stats);
                lock(&self.keep).take();
                true
            }
            _ => false,
        }
    }
}

impl PacketSink for SharedPortGate {
    fn packet(&self, timestamp: Timestamp, original_length: u32, data: &[u8]) {
        let shared = !lock(&self.rivals).is_empty();
        let mut waiting = lock(&self.waiting);
        let Some((io, transport)) = self.way(data).filter(|_| shared || !waiting.is_empty()) else {
            drop(waiting);
            return self.stream.packet(timestamp, original_length, data);
        };
        if transport != Transport::Udp {
            drop(waiting);
            return self.stream.packet(timestamp, original_length, data);
        }
        waiting.push_back(Waiting {
            queued: Instant::now(),
            at: Self::wall_time(timestamp, self.stream.nanoseconds.load(Ordering::Relaxed)),
            io,
            timestamp,
            original_length,
            data: data.to_vec(),
        });
    }

    fn batch_end(&self) {
        if lock(&self.waiting).is_empty() {
            self.stream.batch_end();
        } else if let Some(poke) = self.poke.get() {
            poke.poke();
        }
    }

    fn ended(&self, stats: CaptureStats) {
        *lock(&self.ended) = Some(stats);
        match self.poke.get() {
            Some(poke) => {
                *lock(&self.keep) = self.me.upgrade();
                poke.poke();
            }
            None => self.stream.ended(stats),
        }
    }
}

/// The gate's look, stepped by a tracker thread; ends with the gate, or
/// once the stream has been told its end.
struct Looking {
    gate: Weak<SharedPortGate>,
}

impl tracking::Followed for Looking {
    fn step(&mut self, _now: Instant) -> Option<Duration> {
        let gate = self.gate.upgrade()?;
        if gate.step() {
            return None;
        }
        Some(if lock(&gate.waiting).is_empty() {
            IDLE_INTERVAL
        } else {
            LOOK_INTERVAL
        })
    }
}
