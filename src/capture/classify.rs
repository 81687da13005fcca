//! Which socket of a process a captured packet belongs to (pure).
//!
//! A process's `all` stream captures more than it keeps: the kernel filter
//! can only name the ports known so far, and a new connection's first
//! packets come before anyone knows its port. Each packet's headers are read
//! here (etherparse; the Linux cooked header by hand, because etherparse
//! rejects loopback packets from the "any" device) and matched against the
//! process's sockets; packets of no socket of the process are dropped.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use etherparse::{EtherType, NetSlice, SlicedPacket, TransportSlice};
use rustc_hash::FxHashMap;

use super::filter::{LocalNetwork, Taken};
use crate::names::Proto;

/// The transports an `all` stream follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Transport {
    Tcp,
    Udp,
}

impl Transport {
    pub fn of(proto: Proto) -> Option<Transport> {
        match proto {
            Proto::Tcp | Proto::Tcp6 => Some(Transport::Tcp),
            Proto::Udp | Proto::Udp6 => Some(Transport::Udp),
            _ => None,
        }
    }
}

/// A packet's flow, addresses as on the wire (IPv4-mapped made IPv4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flow {
    pub transport: Transport,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    /// A TCP SYN without ACK: a connection being opened.
    pub opening: bool,
}

const LINKTYPE_ETHERNET: i32 = 1;
const LINKTYPE_RAW: i32 = 101;
const DLT_RAW: i32 = 12;
const LINKTYPE_LINUX_SLL: i32 = 113;
const LINKTYPE_LINUX_SLL2: i32 = 276;

/// The TCP or UDP flow of a captured frame; None for anything else.
///
/// Read by hand for the plain cases (IPv4, IPv6 without extension
/// headers: nearly every packet, and this runs for every packet of a
/// namespace), by etherparse for the rest (VLAN tags, IPv6 extension
/// headers).
pub fn flow_of(linktype: i32, frame: &[u8]) -> Option<Flow> {
    let (ethertype, ip) = match linktype {
        LINKTYPE_LINUX_SLL => (
            u16::from_be_bytes([*frame.get(14)?, *frame.get(15)?]),
            frame.get(16..)?,
        ),
        LINKTYPE_LINUX_SLL2 => (
            u16::from_be_bytes([*frame.first()?, *frame.get(1)?]),
            frame.get(20..)?,
        ),
        LINKTYPE_ETHERNET => (
            u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]),
            frame.get(14..)?,
        ),
        LINKTYPE_RAW | DLT_RAW => match frame.first()? >> 4 {
            4 => (0x0800, frame),
            6 => (0x86dd, frame),
            _ => return None,
        },
        _ => return None,
    };
    match ethertype {
        0x0800 => ipv4_flow(ip),
        0x86dd => ipv6_flow(ip).or_else(|| sliced_flow(linktype, frame)),
        _ => sliced_flow(linktype, frame),
    }
}

/// An IPv4 packet's flow, read by hand.
fn ipv4_flow(ip: &[u8]) -> Option<Flow> {
    let header = usize::from(ip.first()? & 0x0f) * 4;
    if ip.first()? >> 4 != 4 || header < 20 {
        return None;
    }
    // A fragment after the first carries no ports.
    let fragment = u16::from_be_bytes([*ip.get(6)?, *ip.get(7)?]) & 0x1fff;
    if fragment != 0 {
        return None;
    }
    let src: [u8; 4] = ip.get(12..16)?.try_into().ok()?;
    let dst: [u8; 4] = ip.get(16..20)?.try_into().ok()?;
    transport_flow(
        *ip.get(9)?,
        ip.get(header..)?,
        IpAddr::from(src),
        IpAddr::from(dst),
    )
}

/// An IPv6 packet's flow, read by hand when TCP or UDP follows the fixed
/// header at once; None otherwise (etherparse reads the extension
/// headers).
fn ipv6_flow(ip: &[u8]) -> Option<Flow> {
    if ip.first()? >> 4 != 6 {
        return None;
    }
    let src: [u8; 16] = ip.get(8..24)?.try_into().ok()?;
    let dst: [u8; 16] = ip.get(24..40)?.try_into().ok()?;
    transport_flow(
        *ip.get(6)?,
        ip.get(40..)?,
        on_the_wire(IpAddr::from(src)),
        on_the_wire(IpAddr::from(dst)),
    )
}

/// The flow of a TCP (6) or UDP (17) header.
fn transport_flow(protocol: u8, header: &[u8], src: IpAddr, dst: IpAddr) -> Option<Flow> {
    let ports = (
        u16::from_be_bytes([*header.first()?, *header.get(1)?]),
        u16::from_be_bytes([*header.get(2)?, *header.get(3)?]),
    );
    let (transport, opening) = match protocol {
        6 => {
            let flags = *header.get(13)?;
            (Transport::Tcp, flags & 0x02 != 0 && flags & 0x10 == 0)
        }
        17 if header.len() >= 8 => (Transport::Udp, false),
        _ => return None,
    };
    Some(Flow {
        transport,
        src: SocketAddr::new(on_the_wire(src), ports.0),
        dst: SocketAddr::new(on_the_wire(dst), ports.1),
        opening,
    })
}

/// The flow as etherparse reads it (VLAN tags, IPv6 extension headers).
fn sliced_flow(linktype: i32, frame: &[u8]) -> Option<Flow> {
    let sliced = match linktype {
        LINKTYPE_LINUX_SLL => {
            let protocol = u16::from_be_bytes([*frame.get(14)?, *frame.get(15)?]);
            SlicedPacket::from_ether_type(EtherType(protocol), frame.get(16..)?)
        }
        LINKTYPE_LINUX_SLL2 => {
            let protocol = u16::from_be_bytes([*frame.first()?, *frame.get(1)?]);
            SlicedPacket::from_ether_type(EtherType(protocol), frame.get(20..)?)
        }
        LINKTYPE_ETHERNET => SlicedPacket::from_ethernet(frame),
        LINKTYPE_RAW | DLT_RAW => SlicedPacket::from_ip(frame),
        _ => return None,
    }
    .ok()?;
    let (src_ip, dst_ip): (IpAddr, IpAddr) = match sliced.net? {
        NetSlice::Ipv4(ip) => (
            ip.header().source_addr().into(),
            ip.header().destination_addr().into(),
        ),
        NetSlice::Ipv6(ip) => (
            ip.header().source_addr().into(),
            ip.header().destination_addr().into(),
        ),
        NetSlice::Arp(_) => return None,
    };
    let (transport, src_port, dst_port, opening) = match sliced.transport? {
        TransportSlice::Tcp(tcp) => (
            Transport::Tcp,
            tcp.source_port(),
            tcp.destination_port(),
            tcp.syn() && !tcp.ack(),
        ),
        TransportSlice::Udp(udp) => (
            Transport::Udp,
            udp.source_port(),
            udp.destination_port(),
            false,
        ),
        _ => return None,
    };
    Some(Flow {
        transport,
        src: SocketAddr::new(on_the_wire(src_ip), src_port),
        dst: SocketAddr::new(on_the_wire(dst_ip), dst_port),
        opening,
    })
}

/// What one IP packet is, whichever interface it was captured on: a hash
/// of its bytes from the IP header on, the fields routing changes (the
/// TTL or hop limit, the IPv4 header checksum) left out. A packet crossing
/// a bridge port and the bridge, or routed in and out of a namespace, is
/// captured twice on `any` with one identity; a retransmission has another
/// (a new IPv4 id, new TCP timestamps).
pub fn packet_identity(linktype: i32, frame: &[u8]) -> Option<u64> {
    let ip = match linktype {
        LINKTYPE_LINUX_SLL => frame.get(16..)?,
        LINKTYPE_LINUX_SLL2 => frame.get(20..)?,
        LINKTYPE_ETHERNET => frame.get(14..)?,
        LINKTYPE_RAW | DLT_RAW => frame,
        _ => return None,
    };
    // The header without what routing changes, the transport's first 24
    // bytes (ports, sequence numbers, a datagram's first bytes) and the
    // length, mixed eight bytes at a time: cheap per packet, and two
    // packets alike in all of that within half a millisecond are one.
    let mut bytes = [0u8; 64];
    let (header, skipped): (usize, &[usize]) = match ip.first()? >> 4 {
        4 => (usize::from(ip[0] & 0x0f) * 4, &[8, 10, 11]),
        6 => (40, &[7]),
        _ => return None,
    };
    let taken = ip.len().min(header + 24).min(bytes.len());
    bytes[..taken].copy_from_slice(&ip[..taken]);
    for index in skipped {
        bytes[*index] = 0;
    }
    let mut hash = ip.len() as u64 ^ 0x9e37_79b9_7f4a_7c15;
    for chunk in bytes.chunks_exact(8) {
        let word = u64::from_ne_bytes(chunk.try_into().ok()?);
        hash = (hash ^ word)
            .wrapping_mul(0xff51_afd7_ed55_8ccd)
            .rotate_left(29);
    }
    Some(hash ^ (hash >> 32))
}

/// IPv4-mapped IPv6 addresses travel as IPv4.
pub fn on_the_wire(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// One socket of the process, as the matcher needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KnownSocket {
    pub transport: Transport,
    pub local: SocketAddr,
    /// None for a listener or an unconnected socket.
    pub remote: Option<SocketAddr>,
    /// Its file name, for pcapng comments.
    pub name: String,
    /// Its owner (the socket's uid), for streams read by another user.
    pub uid: u32,
    /// The process holding it.
    pub pid: u32,
    /// When it was first seen, and when it was found closed.
    pub seen: SystemTime,
    pub closed: Option<SystemTime>,
    /// For a listener or an unconnected socket: the flows more specific
    /// sockets of its namespace take from it (see
    /// [`crate::capture::filter::taken_from`]).
    pub taken: Vec<Taken>,
    /// Its inode, and the fd its process holds it as.
    pub inode: u64,
    pub fd: i32,
    /// For an unconnected UDP socket: the other sockets of its namespace
    /// bound to the same port and address (inodes), any of which the
    /// kernel may give a datagram to (see
    /// [`crate::capture::filter::rivals_of`]).
    pub rivals: Vec<u64>,
}

/// The time a socket may claim packets in: from a little before it was
/// first seen (its first packets come before anyone can look) to a little
/// after it was found closed (its last ones are sorted after). Outside it, a
/// port is not enough to say whose a packet is: another process may hold it
/// by then.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Lifetime {
    seen: SystemTime,
    from: SystemTime,
    until: Option<SystemTime>,
}

/// How long before a socket is first seen its packets may come: the time
/// the tracker takes to look (a kernel block's 2 ms, then the look). Longer
/// lets a port another process used just before be taken for this one's.
const EARLY: Duration = Duration::from_millis(20);
/// How long after a socket was found closed packets of its exact
/// connection (its 4-tuple) are still its own: a FIN, its ACK, a late
/// retransmission. Nobody else can have that 4-tuple meanwhile.
const LATE_CONNECTED: Duration = Duration::from_secs(2);
/// The same for a listener's or an unconnected socket's port, which another
/// process may take right after the close.
const LATE_BOUND: Duration = Duration::from_millis(20);

impl Lifetime {
    fn of(socket: &KnownSocket) -> Lifetime {
        let late = if socket.remote.is_some() {
            LATE_CONNECTED
        } else {
            LATE_BOUND
        };
        Lifetime {
            seen: socket.seen,
            from: socket
                .seen
                .checked_sub(EARLY)
                .unwrap_or(SystemTime::UNIX_EPOCH),
            until: socket.closed.map(|closed| closed + late),
        }
    }

    fn covers(&self, at: SystemTime) -> bool {
        self.from <= at && self.until.is_none_or(|until| at <= until)
    }
}

/// Which socket of which process a packet belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    /// The socket's file name (shared: an owner is cloned for every packet
    /// it owns).
    pub name: std::sync::Arc<str>,
    /// The socket's uid.
    pub uid: u32,
    /// The process holding it.
    pub pid: u32,
}

/// A listener or unconnected socket of the process.
#[derive(Debug)]
struct BoundSocket {
    /// None: a wildcard.
    ip: Option<IpAddr>,
    owner: Owner,
    lifetime: Lifetime,
    taken: Vec<Taken>,
    inode: u64,
    fd: i32,
    rivals: Vec<u64>,
}

/// Which way a datagram went, seen from a socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Way {
    /// To it.
    In,
    /// From it.
    Out,
}

/// A listener or unconnected socket of the process that takes one end of
/// a flow.
#[derive(Clone, Copy, Debug)]
pub struct Bound<'a> {
    pub owner: &'a Owner,
    pub inode: u64,
    pub fd: i32,
    /// Sockets the kernel may have given the datagram to instead.
    pub rivals: &'a [u64],
    pub way: Way,
}

/// When TCP connections were opened (their SYNs), by 4-tuple: a closed
/// connection's 4-tuple can be opened again at once by another socket
/// (loopback reuses TIME_WAIT tuples), and the SYN is where one connection
/// ends and the next begins. Kept across updates of [`ProcessSockets`].
#[derive(Debug, Default)]
pub struct Openings {
    /// Looked up for every packet of the namespace: a hash for speed, as
    /// [`ProcessSockets`]' are.
    by_tuple: FxHashMap<(SocketAddr, SocketAddr), Vec<SystemTime>>,
    /// Changes with every change above (what [`ConnectedCache`] rests on).
    generation: u64,
}

/// How long an opening is remembered.
const OPENINGS_KEPT: Duration = Duration::from_secs(10);

impl Openings {
    fn key(a: SocketAddr, b: SocketAddr) -> (SocketAddr, SocketAddr) {
        if a <= b { (a, b) } else { (b, a) }
    }

    /// Notes a packet; only TCP SYNs matter.
    pub fn record(&mut self, flow: &Flow, at: SystemTime) {
        if !flow.opening || flow.transport != Transport::Tcp {
            return;
        }
        self.generation += 1;
        let times = self
            .by_tuple
            .entry(Self::key(flow.src, flow.dst))
            .or_default();
        times.retain(|t| at.duration_since(*t).unwrap_or_default() < OPENINGS_KEPT);
        times.push(at);
        if self.by_tuple.len() > 4096 {
            self.by_tuple.retain(|_, times| {
                times
                    .iter()
                    .any(|t| at.duration_since(*t).unwrap_or_default() < OPENINGS_KEPT)
            });
        }
    }

    /// When the first connection on this 4-tuple opened at or after
    /// `from`, if within `slack` of it.
    pub fn first_from(
        &self,
        a: SocketAddr,
        b: SocketAddr,
        from: SystemTime,
        slack: Duration,
    ) -> Option<SystemTime> {
        self.by_tuple
            .get(&Self::key(a, b))?
            .iter()
            .filter(|t| **t >= from && t.duration_since(from).unwrap_or_default() <= slack)
            .min()
            .copied()
    }

    /// Whether a packet at `at` of the connection on this 4-tuple that was
    /// open when first seen at `seen` belongs to it: not before the SYN that
    /// opened it, not after a later SYN that opened another.
    pub fn within(&self, a: SocketAddr, b: SocketAddr, seen: SystemTime, at: SystemTime) -> bool {
        let (opened, reopened) = self.around(a, b, seen);
        opened.is_none_or(|opened| at >= opened) && reopened.is_none_or(|reopened| at < reopened)
    }

    /// The SYNs on this 4-tuple around a connection first seen at `seen`:
    /// the last at or before it, the first after it.
    fn around(
        &self,
        a: SocketAddr,
        b: SocketAddr,
        seen: SystemTime,
    ) -> (Option<SystemTime>, Option<SystemTime>) {
        let Some(times) = self.by_tuple.get(&Self::key(a, b)) else {
            return (None, None);
        };
        let opened = times.iter().filter(|t| **t <= seen).max().copied();
        let reopened = times.iter().filter(|t| **t > seen).min().copied();
        (opened, reopened)
    }
}

/// [`ProcessSockets::connected_owner`]'s answers, kept per flow: a busy
/// connection's packets then cost one hash lookup each, not three. An
/// answer is kept only where one socket could hold the flow, as the span
/// of capture times it holds it (its lifetime, between the SYNs around
/// it), and only while the sockets and the SYNs it was worked out from
/// are the ones now: the same answer, sooner.
#[derive(Debug, Default)]
pub struct ConnectedCache {
    entries: FxHashMap<(u64, Transport, SocketAddr, SocketAddr), Cached>,
}

#[derive(Debug)]
struct Cached {
    /// The [`ProcessSockets::id`] and [`Openings`] generation it rests on.
    basis: (u64, u64),
    answer: Connected,
}

#[derive(Debug)]
enum Connected {
    /// No connected socket of this flow, either way.
    Nobody,
    /// One socket, for packets from `from` to `until` (inclusive) and
    /// before `before`.
    One {
        owner: Owner,
        from: SystemTime,
        until: Option<SystemTime>,
        before: Option<SystemTime>,
    },
    /// More than one (a tuple reused, or a connection to itself): asked
    /// each time.
    Several,
}

/// Entries kept at most (a burst of short connections would otherwise
/// grow it without end); past it the cache starts over.
const CONNECTED_CACHE_ENTRIES: usize = 4096;

impl ConnectedCache {
    /// What `sockets.connected_owner(flow, at, openings)` answers, for a
    /// packet captured in namespace `space`.
    pub fn owner(
        &mut self,
        space: u64,
        sockets: &ProcessSockets,
        flow: &Flow,
        at: SystemTime,
        openings: &Openings,
    ) -> Option<Owner> {
        let key = (space, flow.transport, flow.src, flow.dst);
        let basis = (sockets.id, openings.generation);
        if self.entries.len() >= CONNECTED_CACHE_ENTRIES && !self.entries.contains_key(&key) {
            self.entries.clear();
        }
        // One lookup a packet: the key is hashed once.
        let cached = self.entries.entry(key).or_insert_with(|| Cached {
            basis,
            answer: sockets.connected_answer(flow, openings),
        });
        if cached.basis != basis {
            *cached = Cached {
                basis,
                answer: sockets.connected_answer(flow, openings),
            };
        }
        match &cached.answer {
            Connected::Nobody => None,
            Connected::One {
                owner,
                from,
                until,
                before,
            } => (*from <= at
                && until.is_none_or(|until| at <= until)
                && before.is_none_or(|before| at < before))
            .then(|| owner.clone()),
            Connected::Several => sockets.connected_owner(flow, at, openings).cloned(),
        }
    }
}

/// A process's sockets, indexed for per-packet lookups (looked up for
/// every packet of a namespace: a hash meant for speed, not for keys an
/// attacker picks, which these are not).
#[derive(Debug, Default)]
pub struct ProcessSockets {
    /// Which index this is (every index has its own), for
    /// [`ConnectedCache`]; the empty default is 0.
    id: u64,
    connected: FxHashMap<(Transport, SocketAddr, SocketAddr), Vec<(Owner, Lifetime)>>,
    bound: FxHashMap<(Transport, u16), Vec<BoundSocket>>,
    locals: Vec<LocalNetwork>,
}

impl ProcessSockets {
    pub fn new(sockets: &[KnownSocket], locals: Vec<LocalNetwork>) -> ProcessSockets {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        let mut index = ProcessSockets {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            locals,
            ..ProcessSockets::default()
        };
        for socket in sockets {
            let owner = Owner {
                name: socket.name.as_str().into(),
                uid: socket.uid,
                pid: socket.pid,
            };
            let local = SocketAddr::new(on_the_wire(socket.local.ip()), socket.local.port());
            match socket.remote {
                Some(remote) => {
                    let remote = SocketAddr::new(on_the_wire(remote.ip()), remote.port());
                    index
                        .connected
                        .entry((socket.transport, local, remote))
                        .or_default()
                        .push((owner, Lifetime::of(socket)));
                }
                None => {
                    let ip = (!local.ip().is_unspecified()).then_some(local.ip());
                    index
                        .bound
                        .entry((socket.transport, local.port()))
                        .or_default()
                        .push(BoundSocket {
                            ip,
                            owner,
                            lifetime: Lifetime::of(socket),
                            taken: socket.taken.clone(),
                            inode: socket.inode,
                            fd: socket.fd,
                            rivals: socket.rivals.clone(),
                        });
                }
            }
        }
        index
    }

    pub fn is_empty(&self) -> bool {
        self.connected.is_empty() && self.bound.is_empty()
    }

    /// The process's socket this packet, captured at `at`, belongs to: a
    /// connected socket of its exact flow, else a bound one of its port.
    pub fn owner_of(&self, flow: &Flow, at: SystemTime, openings: &Openings) -> Option<&Owner> {
        self.connected_owner(flow, at, openings)
            .or_else(|| self.bound_owner(flow, at).map(|bound| bound.owner))
    }

    /// The connected socket of this exact flow, while it could hold it.
    pub fn connected_owner(
        &self,
        flow: &Flow,
        at: SystemTime,
        openings: &Openings,
    ) -> Option<&Owner> {
        for (local, remote) in [(flow.src, flow.dst), (flow.dst, flow.src)] {
            if let Some(sockets) = self.connected.get(&(flow.transport, local, remote)) {
                let found = sockets.iter().find(|(_, lifetime)| {
                    lifetime.covers(at) && openings.within(local, remote, lifetime.seen, at)
                });
                if let Some((owner, _)) = found {
                    return Some(owner);
                }
            }
        }
        None
    }

    /// What [`Self::connected_owner`] answers for this flow at any time,
    /// in one piece where one socket could hold it.
    fn connected_answer(&self, flow: &Flow, openings: &Openings) -> Connected {
        let forward = self.connected.get(&(flow.transport, flow.src, flow.dst));
        let backward = self.connected.get(&(flow.transport, flow.dst, flow.src));
        let (local, remote, sockets) = match (forward, backward) {
            (None, None) => return Connected::Nobody,
            (Some(sockets), None) => (flow.src, flow.dst, sockets),
            (None, Some(sockets)) => (flow.dst, flow.src, sockets),
            (Some(_), Some(_)) => return Connected::Several,
        };
        let [(owner, lifetime)] = sockets.as_slice() else {
            return Connected::Several;
        };
        let (opened, before) = openings.around(local, remote, lifetime.seen);
        Connected::One {
            owner: owner.clone(),
            from: opened.map_or(lifetime.from, |opened| opened.max(lifetime.from)),
            until: lifetime.until,
            before,
        }
    }

    /// A listener or unconnected socket bound to one of the flow's ports
    /// (and address, or a wildcard of the namespace's own addresses).
    pub fn bound_owner(&self, flow: &Flow, at: SystemTime) -> Option<Bound<'_>> {
        self.bound_at(flow.transport, flow.src, flow.dst, at, Way::Out)
            .or_else(|| self.bound_at(flow.transport, flow.dst, flow.src, at, Way::In))
    }

    /// The listener or unconnected socket that takes end `local` of a flow
    /// with `remote`, unless a more specific socket takes it.
    pub fn bound_at(
        &self,
        transport: Transport,
        local: SocketAddr,
        remote: SocketAddr,
        at: SystemTime,
        way: Way,
    ) -> Option<Bound<'_>> {
        let bound = self.bound.get(&(transport, local.port()))?;
        bound
            .iter()
            .find(|socket| {
                let matches = match socket.ip {
                    Some(ip) => ip == local.ip(),
                    None => self.is_local(local.ip()),
                };
                // What a more specific socket takes is not this one's.
                let taken_away = socket.taken.iter().any(|taken| match *taken {
                    Taken::Address(address) => address == local,
                    Taken::Flow(a, b) => (a, b) == (local, remote),
                });
                matches && !taken_away && socket.lifetime.covers(at)
            })
            .map(|socket| Bound {
                owner: &socket.owner,
                inode: socket.inode,
                fd: socket.fd,
                rivals: &socket.rivals,
                way,
            })
    }

    /// Whether an address is the namespace's own (any, if unknown).
    fn is_local(&self, ip: IpAddr) -> bool {
        self.locals.is_empty() || self.locals.iter().any(|network| network.contains(ip))
    }

    /// The local ports of the process's TCP and UDP sockets, sorted.
    pub fn ports(&self, transport: Transport) -> Vec<u16> {
        let mut ports: Vec<u16> = self
            .connected
            .keys()
            .filter(|(t, _, _)| *t == transport)
            .map(|(_, local, _)| local.port())
            .chain(
                self.bound
                    .keys()
                    .filter(|(t, _)| *t == transport)
                    .map(|(_, port)| *port),
            )
            .collect();
        ports.sort_unstable();
        ports.dedup();
        ports
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    fn sll_frame(ethertype: u16, ip_packet: &[u8]) -> Vec<u8> {
        let mut frame = vec![0u8; 16];
        frame[2..4].copy_from_slice(&772u16.to_be_bytes()); // ARPHRD_LOOPBACK
        frame[14..16].copy_from_slice(&ethertype.to_be_bytes());
        frame.extend_from_slice(ip_packet);
        frame
    }

    fn tcp_v4(src: SocketAddr, dst: SocketAddr, syn: bool) -> Vec<u8> {
        let (SocketAddr::V4(src), SocketAddr::V4(dst)) = (src, dst) else {
            panic!("v4 only");
        };
        let builder = etherparse::PacketBuilder::ipv4(src.ip().octets(), dst.ip().octets(), 64)
            .tcp(src.port(), dst.port(), 1, 1024);
        let builder = if syn { builder.syn() } else { builder.ack(1) };
        let mut packet = Vec::new();
        builder.write(&mut packet, b"hi").unwrap();
        packet
    }

    #[test]
    fn the_hand_reading_agrees_with_etherparse() {
        let v6 = {
            let builder = etherparse::PacketBuilder::ipv6(
                "::1".parse::<std::net::Ipv6Addr>().unwrap().octets(),
                "::ffff:127.0.0.1"
                    .parse::<std::net::Ipv6Addr>()
                    .unwrap()
                    .octets(),
                64,
            )
            .udp(5353, 53);
            let mut packet = Vec::new();
            builder.write(&mut packet, b"query").unwrap();
            packet
        };
        let frames = [
            sll_frame(
                0x0800,
                &tcp_v4(addr("127.0.0.1:5000"), addr("127.0.0.2:80"), true),
            ),
            sll_frame(
                0x0800,
                &tcp_v4(addr("10.0.0.1:80"), addr("10.0.0.2:6000"), false),
            ),
            sll_frame(0x86dd, &v6),
        ];
        for frame in frames {
            assert_eq!(
                flow_of(LINKTYPE_LINUX_SLL, &frame),
                sliced_flow(LINKTYPE_LINUX_SLL, &frame)
            );
            assert!(flow_of(LINKTYPE_LINUX_SLL, &frame).is_some());
        }
        // A later fragment has no ports.
        let mut fragment = tcp_v4(addr("10.0.0.1:80"), addr("10.0.0.2:6000"), false);
        fragment[7] = 8;
        assert_eq!(flow_of(LINKTYPE_RAW, &fragment), None);
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_read_by_hand_never_panic_and_agree_when_both_read(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..80)
        ) {
            let mut frame = vec![0u8; 14];
            frame.extend_from_slice(&[0x08, 0x00]);
            frame.extend_from_slice(&bytes);
            let by_hand = flow_of(LINKTYPE_LINUX_SLL, &frame);
            if let (Some(hand), Some(sliced)) = (by_hand, sliced_flow(LINKTYPE_LINUX_SLL, &frame)) {
                proptest::prop_assert_eq!(hand, sliced);
            }
            let _ = packet_identity(LINKTYPE_LINUX_SLL, &frame);
        }
    }

    #[test]
    fn a_packet_is_itself_whatever_its_ttl_and_another_is_another() {
        let packet = tcp_v4(addr("10.0.0.1:5000"), addr("10.0.0.2:80"), false);
        let frame = sll_frame(0x0800, &packet);
        let mut routed = packet.clone();
        routed[8] -= 1; // TTL
        routed[10] ^= 0xff; // header checksum
        let identity = packet_identity(LINKTYPE_LINUX_SLL, &frame);
        assert!(identity.is_some());
        assert_eq!(
            identity,
            packet_identity(LINKTYPE_LINUX_SLL, &sll_frame(0x0800, &routed))
        );
        assert_eq!(identity, packet_identity(LINKTYPE_RAW, &packet));
        let mut other = packet.clone();
        other[5] ^= 1; // IPv4 id
        assert_ne!(identity, packet_identity(LINKTYPE_RAW, &other));
        assert_eq!(packet_identity(LINKTYPE_LINUX_SLL, &[0; 10]), None);
    }

    #[test]
    fn reads_cooked_loopback_frames() {
        let packet = tcp_v4(addr("127.0.0.1:5000"), addr("127.0.0.2:80"), true);
        let flow = flow_of(LINKTYPE_LINUX_SLL, &sll_frame(0x0800, &packet)).unwrap();
        assert_eq!(flow.transport, Transport::Tcp);
        assert_eq!(
            (flow.src, flow.dst, flow.opening),
            (addr("127.0.0.1:5000"), addr("127.0.0.2:80"), true)
        );
        assert_eq!(flow_of(LINKTYPE_RAW, &packet), Some(flow));
        for garbage in [
            &[][..],
            &[1, 2, 3],
            &[0; 16],
            &sll_frame(0x0800, &[0x45, 0, 0]),
        ] {
            assert_eq!(flow_of(LINKTYPE_LINUX_SLL, garbage), None);
        }
        assert_eq!(flow_of(LINKTYPE_LINUX_SLL2, &[0; 10]), None);
    }

    fn known(
        transport: Transport,
        local: &str,
        remote: Option<&str>,
        name: &str,
        closed: Option<SystemTime>,
    ) -> KnownSocket {
        KnownSocket {
            transport,
            local: addr(local),
            remote: remote.map(addr),
            name: name.into(),
            uid: 0,
            pid: 1,
            seen: SystemTime::now() - Duration::from_secs(10),
            closed,
            taken: Vec::new(),
            inode: 1,
            fd: 3,
            rivals: Vec::new(),
        }
    }

    /// Asks as of one moment.
    struct Checker {
        index: ProcessSockets,
        now: SystemTime,
    }

    impl Checker {
        fn owner_of(&self, flow: &Flow) -> Option<&str> {
            self.index
                .owner_of(flow, self.now, &Openings::default())
                .map(|owner| &*owner.name)
        }
        fn ports(&self, transport: Transport) -> Vec<u16> {
            self.index.ports(transport)
        }
    }

    #[test]
    fn a_port_is_claimed_only_while_the_socket_could_hold_it() {
        let now = SystemTime::now();
        let closed = now - Duration::from_secs(1);
        let index = ProcessSockets::new(
            &[
                known(
                    Transport::Udp,
                    "127.0.0.1:5000",
                    None,
                    "gone-udp",
                    Some(closed),
                ),
                known(
                    Transport::Tcp,
                    "127.0.0.1:6000",
                    Some("127.0.0.1:80"),
                    "gone-tcp",
                    Some(closed),
                ),
            ],
            Vec::new(),
        );
        let udp = Flow {
            transport: Transport::Udp,
            src: addr("127.0.0.1:5000"),
            dst: addr("127.0.0.1:53"),
            opening: false,
        };
        let none = Openings::default();
        // Before the close: its own. A second after: another's, maybe.
        let name = |owner: Option<&Owner>| owner.map(|owner| owner.name.to_string());
        assert_eq!(
            name(index.owner_of(&udp, closed - Duration::from_millis(5), &none)).as_deref(),
            Some("gone-udp")
        );
        assert_eq!(index.owner_of(&udp, now, &none), None);
        // An exact TCP 4-tuple stays its own for the close's last packets.
        let fin = Flow {
            transport: Transport::Tcp,
            src: addr("127.0.0.1:80"),
            dst: addr("127.0.0.1:6000"),
            opening: false,
        };
        assert_eq!(
            name(index.owner_of(&fin, now, &none)).as_deref(),
            Some("gone-tcp")
        );
        // Unless another connection opened the same 4-tuple since.
        let mut openings = Openings::default();
        let reopening = Flow {
            transport: Transport::Tcp,
            src: addr("127.0.0.1:6000"),
            dst: addr("127.0.0.1:80"),
            opening: true,
        };
        openings.record(&reopening, closed + Duration::from_millis(10));
        assert_eq!(index.owner_of(&fin, now, &openings), None);
        assert_eq!(
            name(index.owner_of(&fin, closed, &openings)).as_deref(),
            Some("gone-tcp")
        );
        // Long before it was first seen: not its own.
        assert_eq!(
            index.owner_of(&udp, now - Duration::from_secs(60), &none),
            None
        );
    }

    #[test]
    fn the_connected_cache_answers_as_the_sockets_do() {
        let base = SystemTime::now() - Duration::from_secs(5);
        let ms = |n: u64| base + Duration::from_millis(n);
        // A client reconnecting from one port: the first connection closed
        // at 100 ms, the second seen at 300 ms; and a flow held by one
        // socket, opened at 40 ms.
        let mut first = known(
            Transport::Tcp,
            "127.0.0.1:40000",
            Some("127.0.0.1:80"),
            "first",
            Some(ms(100)),
        );
        first.seen = ms(50);
        let mut second = first.clone();
        second.name = "second".into();
        second.seen = ms(300);
        second.closed = None;
        let mut lone = known(
            Transport::Tcp,
            "127.0.0.1:40001",
            Some("127.0.0.1:80"),
            "lone",
            None,
        );
        lone.seen = ms(60);
        let tcp = |src: &str, dst: &str, opening| Flow {
            transport: Transport::Tcp,
            src: addr(src),
            dst: addr(dst),
            opening,
        };
        let flows = [
            tcp("127.0.0.1:40000", "127.0.0.1:80", false),
            tcp("127.0.0.1:80", "127.0.0.1:40001", false),
            tcp("127.0.0.1:40002", "127.0.0.1:80", false),
        ];
        let mut openings = Openings::default();
        openings.record(&tcp("127.0.0.1:40001", "127.0.0.1:80", true), ms(40));
        let mut cache = ConnectedCache::default();
        let mut check = |index: &ProcessSockets, openings: &Openings| {
            for flow in &flows {
                for at in (0..3000).step_by(7).map(ms) {
                    assert_eq!(
                        cache.owner(1, index, flow, at, openings),
                        index.connected_owner(flow, at, openings).cloned(),
                        "{flow:?} at {at:?}"
                    );
                }
            }
        };
        let only_first = ProcessSockets::new(&[first.clone(), lone.clone()], Vec::new());
        check(&only_first, &openings);
        // The lone connection's tuple opened again at 1 s: packets after
        // it are no longer its.
        openings.record(&tcp("127.0.0.1:40001", "127.0.0.1:80", true), ms(1000));
        check(&only_first, &openings);
        // A new look at the sockets finds the second connection.
        let both = ProcessSockets::new(&[first, second, lone], Vec::new());
        check(&both, &openings);
        assert_eq!(
            cache
                .owner(1, &both, &flows[1], ms(500), &openings)
                .map(|owner| owner.name.to_string())
                .as_deref(),
            Some("lone")
        );
        assert_eq!(cache.owner(1, &both, &flows[1], ms(1500), &openings), None);
    }

    #[test]
    fn matches_connected_and_bound_sockets_only() {
        let sockets = [
            known(
                Transport::Tcp,
                "127.0.0.1:40000",
                Some("127.0.0.1:80"),
                "client",
                None,
            ),
            known(Transport::Tcp, "[::]:8080", None, "listener", None),
            known(
                Transport::Udp,
                "[::ffff:127.0.0.1]:5353",
                None,
                "mapped",
                None,
            ),
        ];
        let locals = vec![LocalNetwork {
            ip: "127.0.0.0".parse().unwrap(),
            prefix_len: 8,
        }];
        let index = Checker {
            index: ProcessSockets::new(&sockets, locals),
            now: SystemTime::now(),
        };
        let flow = |transport, src, dst| Flow {
            transport,
            src: addr(src),
            dst: addr(dst),
            opening: false,
        };
        assert_eq!(
            index.owner_of(&flow(Transport::Tcp, "127.0.0.1:80", "127.0.0.1:40000")),
            Some("client")
        );
        assert_eq!(
            index.owner_of(&flow(Transport::Tcp, "127.0.0.1:40001", "127.0.0.1:80")),
            None
        );
        assert_eq!(
            index.owner_of(&flow(Transport::Tcp, "127.0.0.9:6000", "127.0.0.9:8080")),
            Some("listener")
        );
        // Another host's port 8080, reached from here: not the listener's.
        assert_eq!(
            index.owner_of(&flow(Transport::Tcp, "127.0.0.1:6000", "10.0.0.1:8080")),
            None
        );
        assert_eq!(
            index.owner_of(&flow(Transport::Udp, "127.0.0.1:9", "127.0.0.1:5353")),
            Some("mapped")
        );
        assert_eq!(
            index.owner_of(&flow(Transport::Udp, "127.0.0.2:9", "127.0.0.2:5353")),
            None
        );
        assert_eq!(index.ports(Transport::Tcp), [8080, 40000]);
    }

    #[test]
    fn a_wildcard_socket_does_not_own_what_a_more_specific_socket_takes() {
        let mut wildcard = known(
            Transport::Udp,
            "0.0.0.0:15353",
            None,
            "udp_0.0.0.0:15353_0.0.0.0:0",
            None,
        );
        wildcard.taken = vec![Taken::Address(addr("127.0.0.1:15353"))];
        let sockets = ProcessSockets::new(&[wildcard], Vec::new());
        let now = SystemTime::now();
        let to = |dst: &str| Flow {
            transport: Transport::Udp,
            src: addr("127.0.0.1:40000"),
            dst: addr(dst),
            opening: false,
        };
        assert!(sockets.bound_owner(&to("127.0.0.1:15353"), now).is_none());
        assert!(sockets.bound_owner(&to("127.0.0.2:15353"), now).is_some());
    }
}
