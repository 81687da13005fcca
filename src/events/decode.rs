//! Raw tracepoint records → [`Event`]s (pure).
//!
//! Which kernel events say who owns a flow, seen on this kernel (6.18):
//!
//! | tracepoint | what it tells | context |
//! |---|---|---|
//! | `fib:fib_table_lookup`, `fib6:fib6_table_lookup` | an outgoing flow's protocol, local port and destination (the source address may still be unset) | the sender's, for a `connect` and every unconnected `sendto`; softirq for received packets; for a SYN-ACK, whichever process held the listener |
//! | `sock:inet_sock_set_state` | a TCP socket (by its kernel address) and its 4-tuple | the process's for connect and close; softirq for the passive handshake |
//! | `tcp:tcp_rcv_space_adjust` | a TCP 4-tuple | the reader's (recvmsg) |
//! | `sock:sock_send_length`, `sock:sock_recv_length` | a socket by its kernel address, the bytes or error, the flags | the sender's or reader's |
//! | `sock:sk_data_ready` | a socket by its kernel address: something was queued to it (for UDP, one datagram) | whichever context received it (softirq) |
//! | `sched:sched_process_fork` | a new process or thread and its parent | the parent's |
//!
//! An event names its process only when it ran in the process's context:
//! `common_flags` tells interrupt context (hard irq, softirq, NMI), where
//! `common_pid` is whoever happened to run. Such events still tell which
//! socket has which tuple; they never tell whose it is.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use rustc_hash::FxHashMap;

use super::format::{Field, Layout};
use crate::capture::classify::{Transport, on_the_wire};

/// The tracepoints netstatfs reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Tracepoint {
    FibLookup,
    Fib6Lookup,
    SetState,
    RcvSpaceAdjust,
    SendLength,
    RecvLength,
    DataReady,
    ProcessFork,
}

impl Tracepoint {
    /// The first owns each CPU's ring (its filter never changes).
    pub const ALL: [Tracepoint; 8] = [
        Tracepoint::SetState,
        Tracepoint::FibLookup,
        Tracepoint::Fib6Lookup,
        Tracepoint::RcvSpaceAdjust,
        Tracepoint::SendLength,
        Tracepoint::RecvLength,
        Tracepoint::DataReady,
        Tracepoint::ProcessFork,
    ];

    /// What the kernel lets into the ring of this tracepoint's events at
    /// first (an ftrace filter), where not all of them are wanted: every
    /// TCP segment queued to a socket would wake the data-ready event too,
    /// and only UDP route lookups in a process's own context claim. TCP
    /// sends and receives are told by `tcp_rcv_space_adjust` and state
    /// changes, with their tuple; the socket-only events are read for UDP.
    /// The consumer may narrow them further as it goes
    /// ([`FilterHandle::set`]).
    pub fn kernel_filter(self) -> Option<&'static str> {
        match self {
            Tracepoint::SendLength | Tracepoint::RecvLength => Some("protocol == 17"),
            // Nothing until a socket sharing its port is asked about.
            Tracepoint::DataReady => Some(NOTHING),
            Tracepoint::FibLookup | Tracepoint::Fib6Lookup => {
                Some("proto == 17 && !(common_flags & 0x58)")
            }
            _ => None,
        }
    }

    /// Whether it is off until a consumer turns it on ([`FilterHandle::set`]
    /// with a filter): nothing is wanted of it before. `sk_data_ready` until
    /// a socket sharing its port is asked about; the send and receive
    /// lengths until a socket's kernel address is asked for (every send and
    /// receive on the machine, of every kind of socket, hits them, and an
    /// enabled tracepoint builds its record before its filter drops it).
    pub fn off_until_asked(self) -> bool {
        matches!(
            self,
            Tracepoint::DataReady | Tracepoint::SendLength | Tracepoint::RecvLength
        )
    }

    /// Whether a consumer may change its filter while it is read.
    pub fn narrowed(self) -> bool {
        !matches!(self, Tracepoint::SetState | Tracepoint::ProcessFork)
    }

    /// `events/<system>/<name>` under tracefs.
    pub fn path(self) -> &'static str {
        match self {
            Tracepoint::FibLookup => "fib/fib_table_lookup",
            Tracepoint::Fib6Lookup => "fib6/fib6_table_lookup",
            Tracepoint::SetState => "sock/inet_sock_set_state",
            Tracepoint::RcvSpaceAdjust => "tcp/tcp_rcv_space_adjust",
            Tracepoint::SendLength => "sock/sock_send_length",
            Tracepoint::RecvLength => "sock/sock_recv_length",
            Tracepoint::DataReady => "sock/sk_data_ready",
            Tracepoint::ProcessFork => "sched/sched_process_fork",
        }
    }
}

/// A filter no event passes: a tracepoint read only when the consumer asks.
pub const NOTHING: &str = "common_pid == -1";

/// What one event says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// An outgoing flow was routed: its local port and its destination.
    Route {
        transport: Transport,
        local_port: u16,
        remote: SocketAddr,
    },
    /// A TCP socket changed state; its 4-tuple as of then (the local port
    /// is 0 before a connect has chosen one).
    TcpState {
        sock: u64,
        local: SocketAddr,
        remote: SocketAddr,
        old_state: i32,
        new_state: i32,
    },
    /// TCP data was read on this 4-tuple.
    TcpReceive {
        sock: u64,
        local: SocketAddr,
        remote: SocketAddr,
    },
    /// A socket sent or received (a send or recv system call returned
    /// `result`: bytes, or a negative errno; `flags`: the recv flags).
    SocketIo {
        sock: u64,
        transport: Transport,
        direction: Direction,
        result: i32,
        flags: i32,
    },
    /// Something was queued to a socket for its reader: for UDP, one
    /// datagram delivered to it.
    Queued { sock: u64, transport: Transport },
    /// A process or thread was forked.
    Fork { child: u32 },
}

/// Which way a [`Event::SocketIo`] went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Send,
    Receive,
}

/// An event with its context.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decoded {
    pub event: Event,
    /// It ran in interrupt context: its pid is not the owner's.
    pub in_interrupt: bool,
}

/// TRACE_FLAG_HARDIRQ | TRACE_FLAG_SOFTIRQ | TRACE_FLAG_NMI.
const INTERRUPT_FLAGS: u8 = 0x08 | 0x10 | 0x40;
/// TCP states (include/net/tcp_states.h).
pub const TCP_SYN_SENT: i32 = 2;
pub const TCP_SYN_RECV: i32 = 3;
pub const TCP_CLOSE: i32 = 7;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;

/// The fields one tracepoint's events are read by.
#[derive(Clone, Debug)]
enum Reader {
    Route {
        v6: bool,
        proto: Field,
        dst: Field,
        sport: Field,
        dport: Field,
    },
    Tuple {
        /// None for tcp_rcv_space_adjust (no state, and not needed).
        states: Option<(Field, Field)>,
        skaddr: Field,
        family: Field,
        sport: Field,
        dport: Field,
        saddr: Field,
        daddr: Field,
        saddr_v6: Field,
        daddr_v6: Field,
    },
    SocketIo {
        direction: Direction,
        sk: Field,
        protocol: Field,
        /// Absent on kernels before 6.3 (then 0).
        ret: Option<Field>,
        flags: Option<Field>,
    },
    Queued {
        sk: Field,
        protocol: Field,
    },
    Fork {
        child_pid: Field,
    },
}

/// Decodes the records of the tracepoints it was given layouts for.
#[derive(Clone, Debug, Default)]
pub struct Decoder {
    common_type: Option<Field>,
    common_flags: Option<Field>,
    /// By tracepoint id (the record's common_type).
    readers: FxHashMap<u16, Reader>,
}

impl Decoder {
    /// Learns one tracepoint's layout; Err says why it cannot be read on
    /// this kernel.
    pub fn learn(&mut self, point: Tracepoint, id: u16, layout: &Layout) -> Result<(), String> {
        self.common_type = Some(layout.field("common_type", 2)?);
        self.common_flags = Some(layout.field("common_flags", 1)?);
        let reader = match point {
            Tracepoint::FibLookup | Tracepoint::Fib6Lookup => {
                let v6 = point == Tracepoint::Fib6Lookup;
                let width = if v6 { 16 } else { 4 };
                Reader::Route {
                    v6,
                    proto: layout.field("proto", 1)?,
                    dst: layout.field("dst", width)?,
                    sport: layout.field("sport", 2)?,
                    dport: layout.field("dport", 2)?,
                }
            }
            Tracepoint::SetState | Tracepoint::RcvSpaceAdjust => Reader::Tuple {
                states: if point == Tracepoint::SetState {
                    Some((layout.field("oldstate", 4)?, layout.field("newstate", 4)?))
                } else {
                    None
                },
                skaddr: layout.field("skaddr", 8)?,
                family: layout.field("family", 2)?,
                sport: layout.field("sport", 2)?,
                dport: layout.field("dport", 2)?,
                saddr: layout.field("saddr", 4)?,
                daddr: layout.field("daddr", 4)?,
                saddr_v6: layout.field("saddr_v6", 16)?,
                daddr_v6: layout.field("daddr_v6", 16)?,
            },
            Tracepoint::SendLength | Tracepoint::RecvLength => Reader::SocketIo {
                direction: if point == Tracepoint::SendLength {
                    Direction::Send
                } else {
                    Direction::Receive
                },
                sk: layout.field("sk", 8)?,
                protocol: layout.field("protocol", 2)?,
                ret: layout.field("ret", 4).ok(),
                flags: layout.field("flags", 4).ok(),
            },
            Tracepoint::DataReady => Reader::Queued {
                sk: layout.field("skaddr", 8)?,
                protocol: layout.field("protocol", 2)?,
            },
            Tracepoint::ProcessFork => Reader::Fork {
                child_pid: layout.field("child_pid", 4)?,
            },
        };
        self.readers.insert(id, reader);
        Ok(())
    }

    /// The event in a raw record; None for records it does not know, that
    /// are cut short, or that say nothing about TCP or UDP flows.
    pub fn decode(&self, raw: &[u8]) -> Option<Decoded> {
        let id = u16::from_ne_bytes(bytes(raw, self.common_type?)?);
        let flags = bytes::<1>(raw, self.common_flags?)?[0];
        let event = match self.readers.get(&id)? {
            Reader::Route {
                v6,
                proto,
                dst,
                sport,
                dport,
            } => {
                let transport = transport_of(bytes::<1>(raw, *proto)?[0])?;
                let local_port = u16_at(raw, *sport)?;
                let ip = if *v6 {
                    IpAddr::V6(Ipv6Addr::from(bytes::<16>(raw, *dst)?))
                } else {
                    IpAddr::V4(Ipv4Addr::from(bytes::<4>(raw, *dst)?))
                };
                if local_port == 0 || ip.is_unspecified() {
                    return None;
                }
                Event::Route {
                    transport,
                    local_port,
                    remote: SocketAddr::new(on_the_wire(ip), u16_at(raw, *dport)?),
                }
            }
            Reader::Tuple {
                states,
                skaddr,
                family,
                sport,
                dport,
                saddr,
                daddr,
                saddr_v6,
                daddr_v6,
            } => {
                let (local_ip, remote_ip) = match u16_at(raw, *family)? {
                    AF_INET => (
                        IpAddr::V4(Ipv4Addr::from(bytes::<4>(raw, *saddr)?)),
                        IpAddr::V4(Ipv4Addr::from(bytes::<4>(raw, *daddr)?)),
                    ),
                    AF_INET6 => (
                        IpAddr::V6(Ipv6Addr::from(bytes::<16>(raw, *saddr_v6)?)),
                        IpAddr::V6(Ipv6Addr::from(bytes::<16>(raw, *daddr_v6)?)),
                    ),
                    _ => return None,
                };
                let local = SocketAddr::new(on_the_wire(local_ip), u16_at(raw, *sport)?);
                let remote = SocketAddr::new(on_the_wire(remote_ip), u16_at(raw, *dport)?);
                match states {
                    Some((old_state, new_state)) => Event::TcpState {
                        sock: u64::from_ne_bytes(bytes(raw, *skaddr)?),
                        local,
                        remote,
                        old_state: i32::from_ne_bytes(bytes(raw, *old_state)?),
                        new_state: i32::from_ne_bytes(bytes(raw, *new_state)?),
                    },
                    None => Event::TcpReceive {
                        sock: u64::from_ne_bytes(bytes(raw, *skaddr)?),
                        local,
                        remote,
                    },
                }
            }
            Reader::SocketIo {
                direction,
                sk,
                protocol,
                ret,
                flags,
            } => {
                let protocol = u16_at(raw, *protocol)?;
                let int = |field: &Option<Field>| match field {
                    Some(field) => bytes(raw, *field).map(i32::from_ne_bytes),
                    None => Some(0),
                };
                Event::SocketIo {
                    sock: u64::from_ne_bytes(bytes(raw, *sk)?),
                    transport: transport_of(u8::try_from(protocol).ok()?)?,
                    direction: *direction,
                    result: int(ret)?,
                    flags: int(flags)?,
                }
            }
            Reader::Queued { sk, protocol } => Event::Queued {
                sock: u64::from_ne_bytes(bytes(raw, *sk)?),
                transport: transport_of(u8::try_from(u16_at(raw, *protocol)?).ok()?)?,
            },
            Reader::Fork { child_pid } => Event::Fork {
                child: u32::from_ne_bytes(bytes(raw, *child_pid)?),
            },
        };
        Some(Decoded {
            event,
            in_interrupt: flags & INTERRUPT_FLAGS != 0,
        })
    }
}

fn transport_of(proto: u8) -> Option<Transport> {
    match proto {
        IPPROTO_TCP => Some(Transport::Tcp),
        IPPROTO_UDP => Some(Transport::Udp),
        _ => None,
    }
}

fn bytes<const N: usize>(raw: &[u8], field: Field) -> Option<[u8; N]> {
    raw.get(field.offset..field.offset.checked_add(N)?)?
        .try_into()
        .ok()
}

fn u16_at(raw: &[u8], field: Field) -> Option<u16> {
    Some(u16::from_ne_bytes(bytes(raw, field)?))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Layouts as this machine's kernel (6.18) has them.
    pub const FIB: &str = "\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;
\tfield:u8 proto;\toffset:24;\tsize:1;\tsigned:0;
\tfield:__u8 src[4];\toffset:28;\tsize:4;\tsigned:0;
\tfield:__u8 dst[4];\toffset:32;\tsize:4;\tsigned:0;
\tfield:u16 sport;\toffset:56;\tsize:2;\tsigned:0;
\tfield:u16 dport;\toffset:58;\tsize:2;\tsigned:0;";
    pub const SET_STATE: &str = "\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;
\tfield:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:int oldstate;\toffset:16;\tsize:4;\tsigned:1;
\tfield:int newstate;\toffset:20;\tsize:4;\tsigned:1;
\tfield:__u16 sport;\toffset:24;\tsize:2;\tsigned:0;
\tfield:__u16 dport;\toffset:26;\tsize:2;\tsigned:0;
\tfield:__u16 family;\toffset:28;\tsize:2;\tsigned:0;
\tfield:__u16 protocol;\toffset:30;\tsize:2;\tsigned:0;
\tfield:__u8 saddr[4];\toffset:32;\tsize:4;\tsigned:0;
\tfield:__u8 daddr[4];\toffset:36;\tsize:4;\tsigned:0;
\tfield:__u8 saddr_v6[16];\toffset:40;\tsize:16;\tsigned:0;
\tfield:__u8 daddr_v6[16];\toffset:56;\tsize:16;\tsigned:0;";

    pub const FIB_ID: u16 = 2264;
    pub const SET_STATE_ID: u16 = 2287;

    pub fn decoder() -> Decoder {
        let mut decoder = Decoder::default();
        decoder
            .learn(Tracepoint::FibLookup, FIB_ID, &Layout::parse(FIB))
            .unwrap();
        decoder
            .learn(
                Tracepoint::SetState,
                SET_STATE_ID,
                &Layout::parse(SET_STATE),
            )
            .unwrap();
        decoder
    }

    /// A fib_table_lookup record.
    pub fn fib_record(flags: u8, proto: u8, sport: u16, dst: [u8; 4], dport: u16) -> Vec<u8> {
        let mut raw = vec![0u8; 80];
        raw[0..2].copy_from_slice(&FIB_ID.to_ne_bytes());
        raw[2] = flags;
        raw[24] = proto;
        raw[32..36].copy_from_slice(&dst);
        raw[56..58].copy_from_slice(&sport.to_ne_bytes());
        raw[58..60].copy_from_slice(&dport.to_ne_bytes());
        raw
    }

    /// An inet_sock_set_state record of an IPv4 socket.
    pub fn set_state_record(
        flags: u8,
        sock: u64,
        new_state: i32,
        local: ([u8; 4], u16),
        remote: ([u8; 4], u16),
    ) -> Vec<u8> {
        transition_record(flags, sock, (0, new_state), local, remote)
    }

    /// The same, from a given state.
    pub fn transition_record(
        flags: u8,
        sock: u64,
        (old_state, new_state): (i32, i32),
        local: ([u8; 4], u16),
        remote: ([u8; 4], u16),
    ) -> Vec<u8> {
        let mut raw = vec![0u8; 72];
        raw[16..20].copy_from_slice(&old_state.to_ne_bytes());
        raw[0..2].copy_from_slice(&SET_STATE_ID.to_ne_bytes());
        raw[2] = flags;
        raw[8..16].copy_from_slice(&sock.to_ne_bytes());
        raw[20..24].copy_from_slice(&new_state.to_ne_bytes());
        raw[24..26].copy_from_slice(&local.1.to_ne_bytes());
        raw[26..28].copy_from_slice(&remote.1.to_ne_bytes());
        raw[28..30].copy_from_slice(&AF_INET.to_ne_bytes());
        raw[30..32].copy_from_slice(&6u16.to_ne_bytes());
        raw[32..36].copy_from_slice(&local.0);
        raw[36..40].copy_from_slice(&remote.0);
        raw
    }

    #[test]
    fn a_udp_send_names_its_port_and_destination() {
        let raw = fib_record(0, IPPROTO_UDP, 40000, [127, 0, 0, 53], 53);
        assert_eq!(
            decoder().decode(&raw),
            Some(Decoded {
                event: Event::Route {
                    transport: Transport::Udp,
                    local_port: 40000,
                    remote: "127.0.0.53:53".parse().unwrap()
                },
                in_interrupt: false
            })
        );
        // In softirq (a received packet's lookup): said, but not the pid's.
        let softirq = fib_record(0x90, IPPROTO_UDP, 40000, [127, 0, 0, 53], 53);
        assert!(decoder().decode(&softirq).unwrap().in_interrupt);
        // Not yet a port, another protocol: nothing to say.
        assert_eq!(
            decoder().decode(&fib_record(0, 17, 0, [1, 2, 3, 4], 53)),
            None
        );
        assert_eq!(
            decoder().decode(&fib_record(0, 1, 9, [1, 2, 3, 4], 0)),
            None
        );
    }

    #[test]
    fn a_state_change_names_the_socket_and_its_tuple() {
        let raw = set_state_record(
            0x10,
            0xffff_8880_1234_5678,
            1,
            ([127, 0, 0, 1], 8080),
            ([127, 0, 0, 1], 51000),
        );
        let decoded = decoder().decode(&raw).unwrap();
        assert!(decoded.in_interrupt);
        assert_eq!(
            decoded.event,
            Event::TcpState {
                sock: 0xffff_8880_1234_5678,
                local: "127.0.0.1:8080".parse().unwrap(),
                remote: "127.0.0.1:51000".parse().unwrap(),
                old_state: 0,
                new_state: 1
            }
        );
    }

    #[test]
    fn short_or_unknown_records_are_nothing() {
        let decoder = decoder();
        let raw = set_state_record(0, 1, 1, ([127, 0, 0, 1], 1), ([127, 0, 0, 1], 2));
        // (An IPv4 record needs no more than its IPv4 addresses.)
        for cut in [0, 1, 3, 20, 39] {
            assert_eq!(decoder.decode(&raw[..cut]), None, "cut at {cut}");
        }
        let mut unknown = raw.clone();
        unknown[0..2].copy_from_slice(&9u16.to_ne_bytes());
        assert_eq!(decoder.decode(&unknown), None);
        assert_eq!(Decoder::default().decode(&raw), None);
    }
}
