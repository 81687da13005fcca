//! Who owns each flow, from kernel events (pure): the process that routed,
//! connected, read, wrote or closed it, as the kernel saw it happen.
//!
//! /proc shows a socket only while it exists and only when someone looks,
//! so a connection that lives a millisecond, or a connection accepted by one
//! of two workers sharing a listener, cannot be told apart by polling.
//! Kernel events can: each [`Sample`] that ran in a process's own context
//! (never one from interrupt context, whose pid is whoever was running)
//! *claims* an endpoint of a flow (transport, local port, remote address)
//! for that process from that moment. A packet belongs to the latest
//! claimant at its time, or, for packets that come before anyone claimed
//! the flow (a passive connection's handshake, a request a server has not
//! answered yet), to the first claimant shortly after; a TCP claim never
//! reaches across a SYN that opened another connection on the same tuple
//! ([`Openings`]). A UDP datagram goes to a claim just after it rather than
//! an older one before it (`REPLY_WINDOW`): on a socket workers share, the
//! reply's route lookup names the worker that got the request.
//!
//! Events that name a socket but not its tuple (`sock_send_length`) are
//! joined with those that name both (`inet_sock_set_state`) by the socket's
//! kernel address.
//!
//! Known limit: the tuple is not tied to a network namespace (the events do
//! not carry one), so two processes in two namespaces using the same tuple
//! at the same moment would be confused.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use rustc_hash::FxHashMap;

use crate::capture::classify::{Flow, Openings, Transport};
use crate::events::Sample;
use crate::events::decode::{Event, TCP_CLOSE, TCP_SYN_RECV, TCP_SYN_SENT};

/// How far a claim reaches back to packets before it: a passive
/// connection's handshake and first request come before the worker that
/// accepted it reads; a query comes before the server's reply. TCP claims
/// are bounded by the SYN too.
const REACH_BACK: Duration = Duration::from_secs(1);
/// Clock skew allowed between an event and the packet it caused (both are
/// kernel times, of two clocks).
pub const SKEW: Duration = Duration::from_micros(500);
/// For UDP, how soon after a packet a claim takes it over from an older
/// one: a reply's route lookup names who got the request, and workers
/// sharing one socket each get some of its datagrams.
const REPLY_WINDOW: Duration = Duration::from_millis(50);
/// How long after a connect's route lookup its SYN may leave.
const CONNECT_SLACK: Duration = Duration::from_millis(20);
/// How long claims are kept; the latest one of an endpoint is kept longer
/// (see [`FlowOwners::prune`]).
const CLAIMS_KEPT: Duration = Duration::from_secs(30);
/// How long a fork is remembered (for `tree` streams).
const FORKS_KEPT: Duration = Duration::from_secs(60);

type Endpoint = (Transport, u16, SocketAddr);

/// A process that owns a packet, and the end of the flow it holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Claimant {
    pub pid: u32,
    pub local: SocketAddr,
    pub remote: SocketAddr,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Claim {
    at: SystemTime,
    pid: u32,
    /// Made before the packet it speaks for: a UDP route lookup, before
    /// its datagram, or a connect's SYN_SENT, before its SYN (other claims
    /// come after a packet of theirs).
    routed: bool,
    /// The first claim of a socket: a connection that starts where another
    /// on the same tuple ended (a client reconnecting from one port) is
    /// kept apart from it.
    fresh: bool,
}

/// The flows' owners as the events told them.
#[derive(Debug, Default)]
pub struct FlowOwners {
    /// By (transport, local port, remote address): claims in time order.
    claims: FxHashMap<Endpoint, Vec<Claim>>,
    /// TCP sockets' tuples, by kernel address.
    tuples: FxHashMap<u64, (SocketAddr, SocketAddr)>,
    /// TCP sockets' last user in process context, by kernel address (forgotten
    /// at the socket's close, and when a new socket starts at the address).
    users: FxHashMap<u64, u32>,
    /// TCP sockets (kernel addresses) claimed since they started.
    claimed: std::collections::HashSet<u64>,
    /// Processes and threads forked, with their parent and when.
    parents: FxHashMap<u32, (u32, SystemTime)>,
    newest: Option<SystemTime>,
    /// The daemon's own pid: what runs in its context is never a claim. It
    /// asks a process's new sockets what they are through a copy of their
    /// fd (pidfd_getfd), and when the process closes its fd meanwhile, the
    /// daemon's copy is the last: the connection's close (FIN_WAIT1, or
    /// LAST_ACK and CLOSE) then runs in the daemon's context.
    ignored: Option<u32>,
}

impl FlowOwners {
    /// Owners as told by events, except those run by process `pid` (the
    /// daemon's own).
    pub fn ignoring(pid: u32) -> FlowOwners {
        FlowOwners {
            ignored: Some(pid),
            ..FlowOwners::default()
        }
    }

    /// Takes one event into account. Events may come out of order (one
    /// ring per CPU).
    pub fn apply(&mut self, sample: &Sample) {
        let Sample {
            at, pid, decoded, ..
        } = *sample;
        let own_context = !decoded.in_interrupt && Some(pid) != self.ignored;
        self.newest = Some(self.newest.map_or(at, |newest| newest.max(at)));
        match decoded.event {
            Event::Route {
                transport,
                local_port,
                remote,
            } => {
                // Only UDP: a TCP route lookup in process context may be a
                // SYN-ACK's, made by whichever worker held a shared listener
                // when the SYN came (the kernel processes a locked
                // listener's backlog in the context of the process that
                // releases it). TCP connections are claimed by their own
                // socket's events.
                if own_context && transport == Transport::Udp {
                    self.claim((transport, local_port, remote), pid, at, true, false);
                }
            }
            Event::TcpState {
                sock,
                local,
                remote,
                old_state,
                new_state,
            } => {
                // A passive open's transitions run wherever the handshake
                // was processed (softirq, or a listener's backlog in
                // another worker's context): they tell the tuple, never
                // whose it is.
                let passive = new_state == TCP_SYN_RECV || old_state == TCP_SYN_RECV;
                let own_context = own_context && !passive;
                if new_state == TCP_SYN_SENT || new_state == TCP_SYN_RECV {
                    // A socket starting out: whatever was known of an
                    // earlier socket at this kernel address is not its.
                    self.tuples.remove(&sock);
                    self.users.remove(&sock);
                    self.claimed.remove(&sock);
                }
                if local.port() != 0 && remote.port() != 0 {
                    self.tuples.insert(sock, (local, remote));
                }
                if own_context {
                    self.users.insert(sock, pid);
                }
                if let (Some(&(local, remote)), Some(&user)) =
                    (self.tuples.get(&sock), self.users.get(&sock))
                {
                    let fresh = self.claimed.insert(sock);
                    // A connect's SYN_SENT comes before its SYN.
                    let before_its_packet = new_state == TCP_SYN_SENT;
                    self.claim(
                        (Transport::Tcp, local.port(), remote),
                        user,
                        at,
                        before_its_packet,
                        fresh,
                    );
                }
                if new_state == TCP_CLOSE {
                    // The address may be a new socket's next.
                    self.tuples.remove(&sock);
                    self.users.remove(&sock);
                    self.claimed.remove(&sock);
                }
            }
            Event::TcpReceive {
                sock,
                local,
                remote,
            } => {
                if own_context {
                    let fresh = self.claimed.insert(sock);
                    self.claim(
                        (Transport::Tcp, local.port(), remote),
                        pid,
                        at,
                        false,
                        fresh,
                    );
                }
            }
            Event::SocketIo {
                sock, transport, ..
            } => {
                // Only TCP sockets are joined to their tuples this way (a
                // UDP socket never reports a close that would clear it).
                if own_context && transport == Transport::Tcp {
                    self.users.insert(sock, pid);
                    if let Some(&(local, remote)) = self.tuples.get(&sock) {
                        let fresh = self.claimed.insert(sock);
                        self.claim(
                            (Transport::Tcp, local.port(), remote),
                            pid,
                            at,
                            false,
                            fresh,
                        );
                    }
                }
            }
            Event::Fork { child } => {
                if child != pid {
                    self.parents.insert(child, (pid, at));
                }
            }
            // Which socket a datagram went to is told by the deliveries
            // (`super::deliveries`), not by claims on a port.
            Event::Queued { .. } => {}
        }
    }

    fn claim(&mut self, endpoint: Endpoint, pid: u32, at: SystemTime, routed: bool, fresh: bool) {
        let claims = self.claims.entry(endpoint).or_default();
        let index = claims.partition_point(|claim| claim.at <= at);
        // A run of claims by one process on one socket is kept as its
        // first and its latest: those between add nothing. A socket's
        // first claim is never merged into, nor merged into the claims of
        // the socket before: a client reconnecting from one port makes a
        // connection on the same tuple again and again, and each needs a
        // claim of its own between its SYN and the next.
        // (A UDP sender's route lookups, one a datagram, make such runs
        // too: a hundred thousand a second from one flood.)
        let run_end = index >= 2
            && claims[index - 1].pid == pid
            && claims[index - 2].pid == pid
            && !fresh
            && !claims[index - 1].fresh
            && routed == claims[index - 1].routed
            && routed == claims[index - 2].routed;
        if run_end {
            claims[index - 1].at = at;
        } else {
            claims.insert(
                index,
                Claim {
                    at,
                    pid,
                    routed,
                    fresh,
                },
            );
        }
    }

    /// The processes that own this packet, captured at `at`: the sender's
    /// end and the receiver's (both, on loopback). Empty: no event claimed
    /// the flow (yet).
    pub fn owners(&self, flow: &Flow, at: SystemTime, openings: &Openings) -> Vec<u32> {
        let mut pids: Vec<u32> = self
            .claimants(flow, at, openings)
            .into_iter()
            .map(|claimant| claimant.pid)
            .collect();
        pids.dedup();
        pids
    }

    /// The same, with the end of the flow each process holds: one entry per
    /// claimed end (on loopback a process may hold both).
    pub fn claimants(&self, flow: &Flow, at: SystemTime, openings: &Openings) -> Vec<Claimant> {
        let mut owners: Vec<Claimant> = Vec::new();
        for (local, remote) in [(flow.src, flow.dst), (flow.dst, flow.src)] {
            let Some(claims) = self.claims.get(&(flow.transport, local.port(), remote)) else {
                continue;
            };
            // The connection a claim speaks of: the one opened last before
            // it, or, for a connect (claimed just before its own SYN), the
            // first opened after it. (Not simply a little later: a client
            // reconnecting from one port opens the next connection on the
            // tuple within a millisecond.)
            let same_connection = |claim: &Claim| {
                if flow.transport != Transport::Tcp {
                    return true;
                }
                let seen = if claim.routed {
                    openings
                        .first_from(local, remote, claim.at, CONNECT_SLACK)
                        .unwrap_or(claim.at)
                } else {
                    claim.at
                };
                openings.within(local, remote, seen, at)
            };
            // The claim nearest the packet among those up to the skew
            // after it: within the skew a claim after the packet may be
            // the one that speaks for it (a worker's reply route lookup
            // 13 us after the request it got), and the next exchange's,
            // 300 us later, is not (taking the latest there gave a whole
            // exchange to the worker of the next).
            let distance = |claim: &Claim| {
                claim
                    .at
                    .duration_since(at)
                    .or_else(|_| at.duration_since(claim.at))
                    .unwrap_or_default()
            };
            let mut before: Option<&Claim> = None;
            for claim in claims.iter().rev() {
                if claim.at > at + SKEW || !same_connection(claim) {
                    continue;
                }
                if before.is_none_or(|nearest| distance(claim) < distance(nearest)) {
                    before = Some(claim);
                }
                // Older claims are only farther.
                if claim.at <= at {
                    break;
                }
            }
            let after = claims.iter().find(|claim| {
                claim.at > at + SKEW
                    && claim.at.duration_since(at).unwrap_or_default() <= REACH_BACK
                    && same_connection(claim)
            });
            let owner = match (before, after) {
                (Some(before), Some(after))
                    if flow.transport == Transport::Udp
                        && after.at.duration_since(at).unwrap_or_default()
                            < REPLY_WINDOW
                                .min(at.duration_since(before.at).unwrap_or_default()) =>
                {
                    Some(after)
                }
                (Some(before), _) => Some(before),
                (None, after) => after,
            };
            if let Some(claim) = owner {
                owners.push(Claimant {
                    pid: claim.pid,
                    local,
                    remote,
                });
            }
        }
        owners
    }

    /// What the claims of a flow's two ends say around `at`, for a log
    /// line about a packet nobody claimed: each end's claims within a
    /// second of it (pid, offset from the packet, whether a route lookup).
    pub fn describe(&self, flow: &Flow, at: SystemTime) -> String {
        let mut said = Vec::new();
        for (local, remote) in [(flow.src, flow.dst), (flow.dst, flow.src)] {
            let near: Vec<String> = self
                .claims
                .get(&(flow.transport, local.port(), remote))
                .map(|claims| {
                    claims
                        .iter()
                        .filter(|claim| {
                            let distance = claim
                                .at
                                .duration_since(at)
                                .or_else(|_| at.duration_since(claim.at))
                                .unwrap_or_default();
                            distance <= REACH_BACK
                        })
                        .map(|claim| {
                            let offset = match claim.at.duration_since(at) {
                                Ok(after) => format!("+{}us", after.as_micros()),
                                Err(before) => format!("-{}us", before.duration().as_micros()),
                            };
                            format!(
                                "pid {} {offset}{}",
                                claim.pid,
                                if claim.routed { " (route)" } else { "" }
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            said.push(format!(
                "port {}: {}",
                local.port(),
                if near.is_empty() {
                    "no claim".to_owned()
                } else {
                    near.join(", ")
                }
            ));
        }
        said.join("; ")
    }

    /// The time up to which events must have been applied before
    /// [`FlowOwners::claimants`] of this packet is final: for UDP, a claim
    /// up to [`REPLY_WINDOW`] later may still take it over from an older
    /// one (never from one younger than that distance).
    pub fn settled_after(&self, flow: &Flow, at: SystemTime) -> SystemTime {
        let mut wait = Duration::ZERO;
        if flow.transport == Transport::Udp {
            for (local, remote) in [(flow.src, flow.dst), (flow.dst, flow.src)] {
                let latest = self
                    .claims
                    .get(&(flow.transport, local.port(), remote))
                    .and_then(|claims| claims.iter().rev().find(|claim| claim.at <= at + SKEW));
                if let Some(claim) = latest {
                    let age = at.duration_since(claim.at).unwrap_or_default();
                    wait = wait.max(age.min(REPLY_WINDOW));
                }
            }
        }
        at + SKEW + wait
    }

    /// Some events were lost (a ring overflowed): what is known of which
    /// kernel socket address has which tuple and user may be stale (a lost
    /// close, a lost new socket at the same address), and a stale join
    /// would give a flow to the wrong process. Forget it; claims made so
    /// far stay, and direct claims (reads, closes, routes) go on.
    pub fn forget_sockets(&mut self) {
        self.tuples.clear();
        self.users.clear();
        self.claimed.clear();
    }

    /// Whether `pid` is an ancestor (by `is_ancestor`) or descends from one
    /// by forks seen lately.
    pub fn descends_from(&self, pid: u32, is_ancestor: impl Fn(u32) -> bool) -> bool {
        self.nearest_ancestor(pid, |pid| is_ancestor(pid).then_some(()))
            .is_some()
    }

    /// The first of `pid` and its ancestors, as the fork events tell
    /// them, for which `found` says something, nearest first.
    pub fn nearest_ancestor<T>(&self, pid: u32, found: impl Fn(u32) -> Option<T>) -> Option<T> {
        let mut current = pid;
        for _ in 0..64 {
            if let Some(said) = found(current) {
                return Some(said);
            }
            current = self.parents.get(&current)?.0;
        }
        None
    }

    /// Forgets what is too old to matter: claims older than
    /// [`CLAIMS_KEPT`] but the latest of each endpoint (a long connection
    /// stays claimed), endpoints whose latest claim is older than ten times
    /// that, and forks older than [`FORKS_KEPT`].
    pub fn prune(&mut self) {
        let Some(newest) = self.newest else {
            return;
        };
        let old =
            |at: SystemTime, keep: Duration| newest.duration_since(at).unwrap_or_default() > keep;
        self.claims.retain(|_, claims| {
            let last = claims.len() - 1;
            let mut index = 0;
            claims.retain(|claim| {
                let keep = index == last || !old(claim.at, CLAIMS_KEPT);
                index += 1;
                keep
            });
            !claims.is_empty() && !old(claims[claims.len() - 1].at, CLAIMS_KEPT * 10)
        });
        self.parents.retain(|_, (_, at)| !old(*at, FORKS_KEPT));
    }

    /// How many endpoints are claimed (for tests and the log).
    pub fn len(&self) -> usize {
        self.claims.len()
    }

    pub fn is_empty(&self) -> bool {
        self.claims.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::decode::Decoded;
    use crate::events::decode::tests::{decoder, fib_record, set_state_record};

    const T0: Duration = Duration::from_secs(1_700_000_000);

    fn at(micros: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + T0 + Duration::from_micros(micros)
    }

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    /// Replays raw records (as the perf ring hands them over).
    fn replay(owners: &mut FlowOwners, trace: &[(u64, u32, Vec<u8>)]) {
        let decoder = decoder();
        for (micros, pid, raw) in trace {
            if let Some(decoded) = decoder.decode(raw) {
                owners.apply(&Sample {
                    at: at(*micros),
                    pid: *pid,
                    tid: 0,
                    decoded,
                });
            }
        }
    }

    fn tcp(src: &str, dst: &str, syn: bool) -> Flow {
        Flow {
            transport: Transport::Tcp,
            src: addr(src),
            dst: addr(dst),
            opening: syn,
        }
    }

    fn udp(src: &str, dst: &str) -> Flow {
        Flow {
            transport: Transport::Udp,
            src: addr(src),
            dst: addr(dst),
            opening: false,
        }
    }

    const LO: [u8; 4] = [127, 0, 0, 1];
    const ESTABLISHED: i32 = 1;
    const SYN_SENT: i32 = 2;
    const SYN_RECV: i32 = 3;
    const FIN_WAIT1: i32 = 4;
    const SOFTIRQ: u8 = 0x90;

    /// A connection from 127.0.0.1:40000 to :8080 by pid 100 that lives
    /// 300 µs; its close (FIN_WAIT1) runs in the context of `closer`.
    fn short_connection(closer: u32) -> Vec<(u64, u32, Vec<u8>)> {
        vec![
            (
                0,
                100,
                set_state_record(0, 0xa, SYN_SENT, (LO, 0), (LO, 8080)),
            ),
            (5, 100, fib_record(0, 6, 40000, LO, 8080)),
            (
                60,
                100,
                set_state_record(0, 0xa, ESTABLISHED, (LO, 40000), (LO, 8080)),
            ),
            (
                290,
                closer,
                set_state_record(0, 0xa, FIN_WAIT1, (LO, 40000), (LO, 8080)),
            ),
            (
                300,
                closer,
                set_state_record(SOFTIRQ, 0xa, TCP_CLOSE, (LO, 40000), (LO, 8080)),
            ),
        ]
    }

    /// Every packet of [`short_connection`] is pid 100's.
    fn assert_short_connection_is_100s(owners: &FlowOwners) {
        let mut openings = Openings::default();
        let syn = tcp("127.0.0.1:40000", "127.0.0.1:8080", true);
        openings.record(&syn, at(10));
        for (flow, micros) in [
            (syn, 10),
            (tcp("127.0.0.1:8080", "127.0.0.1:40000", false), 40),
            (tcp("127.0.0.1:40000", "127.0.0.1:8080", false), 295),
        ] {
            assert_eq!(
                owners.owners(&flow, at(micros), &openings),
                [100],
                "{flow:?}"
            );
        }
    }

    #[test]
    fn a_sub_millisecond_connection_is_its_connectors() {
        // connect() routes in the client's context with the chosen port; the
        // whole connection lives 300 µs, long before /proc could be read.
        let mut owners = FlowOwners::default();
        replay(&mut owners, &short_connection(100));
        assert_short_connection_is_100s(&owners);
    }

    #[test]
    fn each_of_many_reconnects_from_one_port_is_its_clients_however_late_it_is_sorted() {
        // A client (100) connects 300 times from port 40000 to :8080, each
        // connection's socket at the same kernel address (the kernel reuses
        // a freed socket's memory), each reset at its close. Its packets
        // are sorted only after every event is in (a sorter lagging behind
        // the events reader, as under load).
        let mut owners = FlowOwners::default();
        let mut openings = Openings::default();
        let syn = tcp("127.0.0.1:40000", "127.0.0.1:8080", true);
        for round in 0..300u64 {
            let start = round * 1_000;
            replay(
                &mut owners,
                &[
                    (
                        start,
                        100,
                        set_state_record(0, 0xa, SYN_SENT, (LO, 40000), (LO, 8080)),
                    ),
                    (
                        start + 60,
                        100,
                        set_state_record(0, 0xa, ESTABLISHED, (LO, 40000), (LO, 8080)),
                    ),
                    (
                        start + 300,
                        100,
                        set_state_record(0, 0xa, TCP_CLOSE, (LO, 40000), (LO, 8080)),
                    ),
                ],
            );
            openings.record(&syn, at(start + 10));
        }
        // Then an attempt the server resets at once: its SYN is the
        // client's too.
        replay(
            &mut owners,
            &[
                (
                    400_000,
                    100,
                    set_state_record(0, 0xa, SYN_SENT, (LO, 40000), (LO, 8080)),
                ),
                (
                    400_030,
                    100,
                    set_state_record(SOFTIRQ, 0xa, TCP_CLOSE, (LO, 40000), (LO, 8080)),
                ),
            ],
        );
        openings.record(&syn, at(400_010));
        assert_eq!(owners.owners(&syn, at(400_010), &openings), [100]);
        let reply = tcp("127.0.0.1:8080", "127.0.0.1:40000", false);
        for round in 0..300u64 {
            let start = round * 1_000;
            for (flow, micros) in [(syn, start + 10), (reply, start + 40), (reply, start + 200)] {
                assert_eq!(
                    owners.owners(&flow, at(micros), &openings),
                    [100],
                    "connection {round}: {flow:?} at {micros}"
                );
            }
        }
    }

    #[test]
    fn a_close_run_in_the_daemons_context_claims_nothing() {
        // The daemon (pid 7) asked the connection what it is through a copy
        // of its fd; the client (100) closed its own fd meanwhile, so the
        // daemon's copy was the last and the close ran in the daemon's
        // context. Seen in the accuracy harness: whole connections lost.
        let mut owners = FlowOwners::ignoring(7);
        replay(&mut owners, &short_connection(7));
        assert_short_connection_is_100s(&owners);
    }

    #[test]
    fn an_accepted_connection_is_the_accepting_workers_not_its_siblings() {
        // Two workers (201, 202) share a listener on 8080; the handshake
        // runs in softirq (its pid is whoever ran: here 202); 201 accepts
        // and reads, then closes.
        let mut owners = FlowOwners::default();
        let mut decoder = decoder();
        let send_id = 2284u16;
        decoder
            .learn(
                crate::events::decode::Tracepoint::SendLength,
                send_id,
                &crate::events::format::Layout::parse(
                    "\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:void * sk;\toffset:8;\tsize:8;\tsigned:0;
\tfield:__u16 family;\toffset:16;\tsize:2;\tsigned:0;
\tfield:__u16 protocol;\toffset:18;\tsize:2;\tsigned:0;",
                ),
            )
            .unwrap();
        let mut recv = vec![0u8; 32];
        recv[0..2].copy_from_slice(&send_id.to_ne_bytes());
        recv[8..16].copy_from_slice(&0xbu64.to_ne_bytes());
        recv[16..18].copy_from_slice(&2u16.to_ne_bytes());
        recv[18..20].copy_from_slice(&6u16.to_ne_bytes());
        let trace = [
            (
                0,
                202,
                set_state_record(SOFTIRQ, 0xb, SYN_RECV, (LO, 8080), (LO, 51000)),
            ),
            (
                20,
                202,
                set_state_record(SOFTIRQ, 0xb, ESTABLISHED, (LO, 8080), (LO, 51000)),
            ),
            (400, 201, recv),
            (
                900,
                201,
                set_state_record(0, 0xb, FIN_WAIT1, (LO, 8080), (LO, 51000)),
            ),
        ];
        for (micros, pid, raw) in &trace {
            owners.apply(&Sample {
                at: at(*micros),
                pid: *pid,
                tid: 0,
                decoded: decoder.decode(raw).unwrap(),
            });
        }
        let mut openings = Openings::default();
        let syn = tcp("127.0.0.1:51000", "127.0.0.1:8080", true);
        openings.record(&syn, at(0));
        // The handshake and the request came before the accept: the
        // accepting worker's all the same, and never the sibling's.
        for (flow, micros) in [
            (syn, 0),
            (tcp("127.0.0.1:8080", "127.0.0.1:51000", false), 10),
            (tcp("127.0.0.1:51000", "127.0.0.1:8080", false), 100),
            (tcp("127.0.0.1:8080", "127.0.0.1:51000", false), 950),
        ] {
            assert_eq!(
                owners.owners(&flow, at(micros), &openings),
                [201],
                "{flow:?} at {micros}"
            );
        }
    }

    #[test]
    fn a_kernel_address_reused_by_a_new_socket_keeps_nothing_of_the_old() {
        // A UDP socket of process 900 at address 0xd, freed; the kernel
        // then makes an accepted TCP socket at the same address.
        let mut owners = FlowOwners::default();
        let io = |sock, transport| Decoded {
            event: Event::SocketIo {
                sock,
                transport,
                direction: crate::events::decode::Direction::Send,
                result: 1,
                flags: 0,
            },
            in_interrupt: false,
        };
        owners.apply(&Sample {
            at: at(0),
            pid: 900,
            tid: 0,
            decoded: io(0xd, Transport::Udp),
        });
        owners.apply(&Sample {
            at: at(5),
            pid: 901,
            tid: 0,
            decoded: io(0xe, Transport::Tcp),
        });
        replay(
            &mut owners,
            &[
                (
                    10,
                    1,
                    set_state_record(SOFTIRQ, 0xd, SYN_RECV, (LO, 8080), (LO, 52000)),
                ),
                (
                    20,
                    1,
                    set_state_record(SOFTIRQ, 0xd, ESTABLISHED, (LO, 8080), (LO, 52000)),
                ),
                // 0xe was a TCP socket of 901: a new child there starts clean.
                (
                    30,
                    1,
                    set_state_record(SOFTIRQ, 0xe, SYN_RECV, (LO, 8080), (LO, 52001)),
                ),
            ],
        );
        let mut openings = Openings::default();
        for port in ["127.0.0.1:52000", "127.0.0.1:52001"] {
            let syn = tcp(port, "127.0.0.1:8080", true);
            openings.record(&syn, at(8));
            assert!(owners.owners(&syn, at(8), &openings).is_empty(), "{port}");
        }
    }

    #[test]
    fn a_handshake_processed_in_a_siblings_context_is_not_the_siblings() {
        // Worker 702 held the shared listener when the SYN and the final ACK
        // came: the kernel processed them, and routed the SYN-ACK, in 702's
        // context as it released the listener. Worker 701 accepted.
        let mut owners = FlowOwners::default();
        replay(
            &mut owners,
            &[
                (5, 702, fib_record(0, 6, 8080, LO, 53000)),
                (
                    10,
                    702,
                    set_state_record(0, 0x11, SYN_RECV, (LO, 8080), (LO, 53000)),
                ),
                (
                    20,
                    702,
                    crate::events::decode::tests::transition_record(
                        0,
                        0x11,
                        (SYN_RECV, ESTABLISHED),
                        (LO, 8080),
                        (LO, 53000),
                    ),
                ),
                (
                    300,
                    701,
                    set_state_record(0, 0x11, FIN_WAIT1, (LO, 8080), (LO, 53000)),
                ),
            ],
        );
        let mut openings = Openings::default();
        let syn = tcp("127.0.0.1:53000", "127.0.0.1:8080", true);
        openings.record(&syn, at(0));
        for micros in [0, 15, 100, 310] {
            let flow = tcp("127.0.0.1:8080", "127.0.0.1:53000", false);
            assert_eq!(
                owners.owners(&flow, at(micros), &openings),
                [701],
                "at {micros}"
            );
        }
    }

    #[test]
    fn the_same_worker_serving_a_reused_client_port_again_claims_the_new_connection() {
        let mut owners = FlowOwners::default();
        let mut trace = Vec::new();
        for (start, sock) in [(0u64, 0x20u64), (5000, 0x21)] {
            trace.push((
                start + 100,
                801,
                set_state_record(0, sock, ESTABLISHED, (LO, 8080), (LO, 54000)),
            ));
            trace.push((
                start + 200,
                801,
                set_state_record(0, sock, FIN_WAIT1, (LO, 8080), (LO, 54000)),
            ));
            trace.push((
                start + 300,
                801,
                set_state_record(SOFTIRQ, sock, TCP_CLOSE, (LO, 8080), (LO, 54000)),
            ));
        }
        replay(&mut owners, &trace);
        let mut openings = Openings::default();
        let syn = tcp("127.0.0.1:54000", "127.0.0.1:8080", true);
        openings.record(&syn, at(0));
        openings.record(&syn, at(5000));
        let flow = tcp("127.0.0.1:8080", "127.0.0.1:54000", false);
        for micros in [50, 250, 5050, 5250] {
            assert_eq!(
                owners.owners(&flow, at(micros), &openings),
                [801],
                "at {micros}"
            );
        }
    }

    #[test]
    fn a_port_reused_by_another_process_within_a_millisecond_changes_hands() {
        let mut owners = FlowOwners::default();
        replay(
            &mut owners,
            &[
                (0, 300, fib_record(0, 17, 5353, [127, 0, 0, 53], 53)),
                (1000, 301, fib_record(0, 17, 5353, [127, 0, 0, 53], 53)),
                // A reply's route lookup in softirq says nothing of its pid.
                (
                    1500,
                    999,
                    fib_record(SOFTIRQ, 17, 5353, [127, 0, 0, 53], 53),
                ),
            ],
        );
        let none = Openings::default();
        let query = udp("127.0.0.1:5353", "127.0.0.53:53");
        let reply = udp("127.0.0.53:53", "127.0.0.1:5353");
        assert_eq!(owners.owners(&query, at(10), &none), [300]);
        assert_eq!(owners.owners(&reply, at(400), &none), [300]);
        assert_eq!(owners.owners(&query, at(1010), &none), [301]);
        assert_eq!(owners.owners(&reply, at(1600), &none), [301]);
        // Another destination: nobody's.
        assert!(
            owners
                .owners(&udp("127.0.0.1:5353", "127.0.0.54:53"), at(10), &none)
                .is_empty()
        );
    }

    #[test]
    fn a_datagram_on_a_shared_socket_is_the_replying_workers() {
        // Workers 401 and 402 share a UDP socket on port 5300; a client
        // (500) on port 40000 makes two exchanges 10 ms apart, the first
        // answered by 401, the second by 402: each worker's reply route
        // lookup names who got the request.
        let mut owners = FlowOwners::default();
        replay(
            &mut owners,
            &[
                (0, 500, fib_record(0, 17, 40000, LO, 5300)),
                (100, 401, fib_record(0, 17, 5300, LO, 40000)),
                (10_000, 500, fib_record(0, 17, 40000, LO, 5300)),
            ],
        );
        let none = Openings::default();
        let request = udp("127.0.0.1:40000", "127.0.0.1:5300");
        let reply = udp("127.0.0.1:5300", "127.0.0.1:40000");
        // Before 402's reply is read, the second request looks like 401's:
        // a verdict to wait on, until the events up to 401's claim's age
        // after it (at most the reply window) are in.
        assert_eq!(owners.owners(&request, at(10_050), &none), [500, 401]);
        assert_eq!(
            owners.settled_after(&request, at(10_050)),
            at(10_050) + SKEW + Duration::from_micros(9_950)
        );
        // A claim older than the reply window is taken over only by a
        // reply within it.
        assert_eq!(
            owners.settled_after(&request, at(100_000)),
            at(100_000) + SKEW + REPLY_WINDOW
        );
        replay(
            &mut owners,
            &[(10_300, 402, fib_record(0, 17, 5300, LO, 40000))],
        );
        assert_eq!(owners.owners(&request, at(50), &none), [500, 401]);
        assert_eq!(owners.owners(&reply, at(150), &none), [401, 500]);
        // The second request, before 402's reply: 402's, not 401's of the
        // exchange before.
        assert_eq!(owners.owners(&request, at(10_050), &none), [500, 402]);
        assert_eq!(owners.owners(&reply, at(10_350), &none), [402, 500]);
    }

    #[test]
    fn exchanges_closer_than_the_skew_are_each_their_workers() {
        // Recorded in the accuracy harness: the dialer (8778) on port 43107
        // sent to workers 8767 and 8771 sharing port 40702; 8767 got the
        // first datagram and replied 13 us later, 8771 the second 270 us
        // after the first. Both replies' claims are within the skew of the
        // first request: the first exchange is 8767's, not 8771's.
        let mut owners = FlowOwners::default();
        replay(
            &mut owners,
            &[
                (0, 8778, fib_record(0, 17, 43107, LO, 40702)),
                (17, 8767, fib_record(0, 17, 40702, LO, 43107)),
                (270, 8778, fib_record(0, 17, 43107, LO, 40702)),
                (288, 8771, fib_record(0, 17, 40702, LO, 43107)),
            ],
        );
        let none = Openings::default();
        let request = udp("127.0.0.1:43107", "127.0.0.1:40702");
        let reply = udp("127.0.0.1:40702", "127.0.0.1:43107");
        assert_eq!(owners.owners(&request, at(4), &none), [8778, 8767]);
        assert_eq!(owners.owners(&reply, at(20), &none), [8767, 8778]);
        assert_eq!(owners.owners(&request, at(274), &none), [8778, 8771]);
        assert_eq!(owners.owners(&reply, at(290), &none), [8771, 8778]);
    }

    #[test]
    fn a_fork_then_connect_belongs_to_the_tree() {
        let mut owners = FlowOwners::default();
        owners.apply(&Sample {
            at: at(0),
            pid: 400,
            tid: 0,
            decoded: Decoded {
                event: Event::Fork { child: 401 },
                in_interrupt: false,
            },
        });
        owners.apply(&Sample {
            at: at(1),
            pid: 401,
            tid: 0,
            decoded: Decoded {
                event: Event::Fork { child: 402 },
                in_interrupt: false,
            },
        });
        replay(
            &mut owners,
            &[
                (
                    40,
                    402,
                    set_state_record(0, 0xf, SYN_SENT, (LO, 0), (LO, 80)),
                ),
                (
                    70,
                    402,
                    set_state_record(0, 0xf, ESTABLISHED, (LO, 41000), (LO, 80)),
                ),
            ],
        );
        let root = |pid| pid == 400;
        let mut openings = Openings::default();
        let syn = tcp("127.0.0.1:41000", "127.0.0.1:80", true);
        openings.record(&syn, at(60));
        let owner = owners.owners(&syn, at(60), &openings);
        assert_eq!(owner, [402]);
        assert!(owners.descends_from(402, root));
        assert!(!owners.descends_from(403, root));
        assert!(!owners.descends_from(400, |pid| pid == 401), "not upwards");
        // A worker gone already has its nearest known ancestor's namespace
        // (here 401's, the next one up that says one).
        let namespace_of = |pid| (pid == 401 || pid == 400).then_some(pid * 10);
        assert_eq!(owners.nearest_ancestor(402, namespace_of), Some(4010));
        assert_eq!(owners.nearest_ancestor(403, namespace_of), None);
    }

    #[test]
    fn a_tuple_reopened_by_another_connection_is_not_the_old_owners() {
        let mut owners = FlowOwners::default();
        replay(
            &mut owners,
            &[
                (0, 500, fib_record(0, 6, 42000, LO, 80)),
                (
                    500,
                    500,
                    set_state_record(0, 0xc, TCP_CLOSE, (LO, 42000), (LO, 80)),
                ),
            ],
        );
        let mut openings = Openings::default();
        openings.record(&tcp("127.0.0.1:42000", "127.0.0.1:80", true), at(0));
        // Another process opens the same tuple later, without an event yet.
        openings.record(&tcp("127.0.0.1:42000", "127.0.0.1:80", true), at(30_000));
        let later = tcp("127.0.0.1:80", "127.0.0.1:42000", false);
        assert!(owners.owners(&later, at(30_100), &openings).is_empty());
        assert_eq!(owners.owners(&later, at(100), &openings), [500]);
    }

    #[test]
    fn pruning_keeps_a_long_connections_last_claim() {
        let mut owners = FlowOwners::default();
        replay(
            &mut owners,
            &[
                (
                    0,
                    600,
                    set_state_record(0, 0x10, ESTABLISHED, (LO, 43000), (LO, 80)),
                ),
                (1, 601, fib_record(0, 17, 43001, LO, 53)),
                (2, 602, fib_record(0, 17, 43001, LO, 53)),
            ],
        );
        owners.newest = Some(at(60_000_000));
        owners.prune();
        assert_eq!(owners.len(), 2);
        let flow = tcp("127.0.0.1:80", "127.0.0.1:43000", false);
        assert_eq!(
            owners.owners(&flow, at(59_000_000), &Openings::default()),
            [600]
        );
        assert_eq!(
            owners.owners(
                &udp("127.0.0.1:53", "127.0.0.1:43001"),
                at(59_000_000),
                &Openings::default()
            ),
            [602]
        );
    }
}
