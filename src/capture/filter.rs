//! Socket → BPF filter text (pure).
//!
//! - A connected socket (remote end known): both directions of exactly that
//!   address/port pair.
//! - An unconnected socket (TCP listener, unconnected UDP): everything to or
//!   from its local address and port. A wildcard address means any address
//!   of the namespace: the filter lists the namespace's own addresses (whole
//!   networks for loopback interfaces, 127.0.0.0/8), so an outgoing
//!   connection to some other host's port of the same number stays out. An
//!   unconnected UDP socket also takes multicast and broadcast datagrams to
//!   its port. Where the addresses are not known, the port alone is matched.
//!   A `[::]` socket that is not IPv6-only also carries IPv4.
//! - IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) travel as IPv4 packets,
//!   so they are matched as IPv4.
//! - Raw sockets match their IP protocol; ping sockets (the icmp tables)
//!   match echo requests and replies carrying their identifier.
//! - What a more specific socket of the namespace takes is not an
//!   unconnected socket's ([`Taken`], [`taken_from`]): the kernel delivers a
//!   unicast datagram to a socket bound to its exact address over one bound
//!   to the wildcard, and to a connected UDP socket over an unconnected one;
//!   a connection to a listener bound to the exact address goes to that
//!   listener. Such flows are left out of the wildcard socket's filter.
//!   Sockets bound alike to one port ([`rivals_of`]: SO_REUSEADDR
//!   wildcards, a SO_REUSEPORT group) cannot be split by a filter: the
//!   kernel picks one per datagram, and only its events tell which
//!   (`crate::stream::shared_port`).

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};

use crate::names::Proto;

/// What a filter is made from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FilterTarget {
    pub proto: Proto,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// For an unconnected socket on `[::]`: whether IPv4 reaches it too
    /// (it is not IPV6_V6ONLY).
    pub dual_stack: bool,
}

/// An address range that is local to the socket's namespace: an interface
/// address, or a loopback interface's whole network.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocalNetwork {
    pub ip: IpAddr,
    pub prefix_len: u8,
}

impl LocalNetwork {
    fn is_host(&self) -> bool {
        match self.ip {
            IpAddr::V4(_) => self.prefix_len >= 32,
            IpAddr::V6(_) => self.prefix_len >= 128,
        }
    }

    fn primitive(&self, direction: &str) -> String {
        if self.is_host() {
            format!("{direction} host {}", self.ip)
        } else {
            format!("{direction} net {}/{}", self.ip, self.prefix_len)
        }
    }

    /// Whether `ip` is in this network.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.ip, ip) {
            (IpAddr::V4(network), IpAddr::V4(ip)) => {
                let bits = u32::from(self.prefix_len.min(32));
                let mask = u32::MAX.checked_shl(32 - bits).unwrap_or(0);
                network.to_bits() & mask == ip.to_bits() & mask
            }
            (IpAddr::V6(network), IpAddr::V6(ip)) => {
                let bits = u32::from(self.prefix_len.min(128));
                let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
                network.to_bits() & mask == ip.to_bits() & mask
            }
            _ => false,
        }
    }

    fn in_family(&self, family: Family) -> bool {
        matches!(
            (family, self.ip),
            (Family::Any, _) | (Family::V4, IpAddr::V4(_)) | (Family::V6, IpAddr::V6(_))
        )
    }
}

/// The socket cannot be captured by a filter (a send-only raw socket, say).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unsupported(pub String);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Family {
    V4,
    V6,
    /// A dual-stack wildcard: either.
    Any,
}

/// An address as it appears on the wire: IPv4-mapped IPv6 becomes IPv4;
/// an unspecified address becomes None (any).
fn wire_ip(ip: IpAddr) -> Option<IpAddr> {
    let ip = match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    };
    (!ip.is_unspecified()).then_some(ip)
}

fn family_of(ip: IpAddr) -> Family {
    match ip {
        IpAddr::V4(_) => Family::V4,
        IpAddr::V6(_) => Family::V6,
    }
}

/// A flow that a more specific socket of the namespace takes from an
/// unconnected one on the same port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Taken {
    /// Everything to or from this exact local address and port.
    Address(SocketAddr),
    /// Both directions between a connected socket's local and remote ends.
    Flow(SocketAddr, SocketAddr),
}

/// The most flows left out of one socket's filter (the kernel takes 4096
/// BPF instructions; each exclusion costs about a dozen).
pub const MAX_TAKEN: usize = 64;

/// What the other sockets of the namespace (`rows`: local, remote,
/// whether it listens, inode) take from the socket `target` (inode
/// `own_inode`), as the kernel's lookup would decide. Sorted, at most
/// [`MAX_TAKEN`].
pub fn taken_from(
    target: &FilterTarget,
    own_inode: u64,
    rows: impl IntoIterator<Item = (SocketAddr, SocketAddr, bool, u64)>,
) -> Vec<Taken> {
    let tcp = matches!(target.proto, Proto::Tcp | Proto::Tcp6);
    let udp = matches!(target.proto, Proto::Udp | Proto::Udp6);
    if !(tcp || udp) || is_connected(target.remote) {
        return Vec::new();
    }
    let own_ip = wire_ip(target.local.ip());
    let mut taken: Vec<Taken> = rows
        .into_iter()
        .filter(|(local, _, _, inode)| *inode != own_inode && local.port() == target.local.port())
        .filter_map(|(local, remote, listening, _)| {
            let local_ip = wire_ip(local.ip());
            let on_our_address = own_ip.is_none() || local_ip == own_ip;
            if udp && is_connected(remote) && on_our_address {
                let on_wire = |end: SocketAddr| {
                    SocketAddr::new(wire_ip(end.ip()).unwrap_or(end.ip()), end.port())
                };
                return Some(Taken::Flow(on_wire(local), on_wire(remote)));
            }
            let unconnected_binding = if tcp {
                listening
            } else {
                !is_connected(remote)
            };
            match local_ip {
                Some(ip) if own_ip.is_none() && unconnected_binding => {
                    Some(Taken::Address(SocketAddr::new(ip, local.port())))
                }
                _ => None,
            }
        })
        .collect();
    taken.sort();
    taken.dedup();
    taken.truncate(MAX_TAKEN);
    taken
}

/// The other sockets of the namespace (`rows`: local, remote, whether it
/// listens, inode) that the kernel may give a datagram to instead of the
/// unconnected UDP socket `target` (inode `own_inode`): unconnected
/// sockets of the same family bound to the same port and address (both a
/// wildcard, or the same one). The kernel's lookup scores them alike and
/// gives each datagram to one: a SO_REUSEPORT group's member by a hash,
/// among sockets sharing a port with SO_REUSEADDR the one bound last, or
/// the one last woken on the receiving CPU. Sorted inodes.
pub fn rivals_of(
    target: &FilterTarget,
    own_inode: u64,
    rows: impl IntoIterator<Item = (SocketAddr, SocketAddr, bool, u64)>,
) -> Vec<u64> {
    if !matches!(target.proto, Proto::Udp | Proto::Udp6) || is_connected(target.remote) {
        return Vec::new();
    }
    let own_ip = wire_ip(target.local.ip());
    let mut rivals: Vec<u64> = rows
        .into_iter()
        .filter(|(local, remote, _, inode)| {
            *inode != own_inode
                && local.port() == target.local.port()
                && local.is_ipv4() == target.local.is_ipv4()
                && !is_connected(*remote)
                && wire_ip(local.ip()) == own_ip
        })
        .map(|(_, _, _, inode)| inode)
        .collect();
    rivals.sort_unstable();
    rivals.dedup();
    rivals
}

/// `filter` without the flows in `taken`.
pub fn without_taken(filter: String, taken: &[Taken]) -> String {
    if taken.is_empty() {
        return filter;
    }
    let end = |direction: &str, at: SocketAddr| {
        format!(
            "{direction} host {} and {direction} port {}",
            at.ip(),
            at.port()
        )
    };
    let clauses: Vec<String> = taken
        .iter()
        .map(|taken| match *taken {
            Taken::Address(at) => format!("({}) or ({})", end("dst", at), end("src", at)),
            Taken::Flow(local, remote) => format!(
                "({} and {}) or ({} and {})",
                end("src", local),
                end("dst", remote),
                end("src", remote),
                end("dst", local)
            ),
        })
        .collect();
    format!("({filter}) and not ({})", clauses.join(" or "))
}

pub fn is_connected(remote: SocketAddr) -> bool {
    remote.port() != 0 || !remote.ip().is_unspecified()
}

/// The BPF filter for one socket's traffic. `local_networks` are the
/// namespace's own addresses, for sockets bound to a wildcard address (an
/// empty list matches any address).
pub fn bpf_filter_for(
    target: &FilterTarget,
    local_networks: &[LocalNetwork],
) -> Result<String, Unsupported> {
    let local_ip = wire_ip(target.local.ip());
    let remote_ip = wire_ip(target.remote.ip());
    let connected = is_connected(target.remote);
    let family = match (local_ip, remote_ip) {
        (Some(ip), _) | (None, Some(ip)) => family_of(ip),
        (None, None) if !target.proto.is_ipv6() => Family::V4,
        (None, None) if target.dual_stack && !connected => Family::Any,
        (None, None) => Family::V6,
    };

    let mut filter = match target.proto {
        Proto::Tcp | Proto::Tcp6 => qualified(family, "tcp"),
        Proto::Udp | Proto::Udp6 => qualified(family, "udp"),
        Proto::Raw | Proto::Raw6 => raw_protocol(family, target.local.port())?,
        Proto::Icmp | Proto::Icmp6 => echo_identifier(family, target.local.port()),
    };
    let ports = matches!(
        target.proto,
        Proto::Tcp | Proto::Tcp6 | Proto::Udp | Proto::Udp6
    );
    let local_hosts = match local_ip {
        Some(ip) => Hosts::Exact(ip),
        None if ports && !connected => {
            let networks: Vec<LocalNetwork> = local_networks
                .iter()
                .filter(|n| n.in_family(family))
                .copied()
                .collect();
            if networks.is_empty() {
                Hosts::Any
            } else {
                let udp = matches!(target.proto, Proto::Udp | Proto::Udp6);
                Hosts::Among {
                    networks,
                    family,
                    groups: udp,
                }
            }
        }
        None => Hosts::Any,
    };
    let local = Endpoint {
        hosts: local_hosts,
        port: ports.then_some(target.local.port()),
    };
    let remote = Endpoint {
        hosts: remote_ip.map_or(Hosts::Any, Hosts::Exact),
        port: ports.then_some(target.remote.port()),
    };

    let clause = if connected {
        let outgoing = [local.clause("src"), remote.clause("dst")].concat();
        let incoming = [remote.clause("src"), local.clause("dst")].concat();
        both_ways(&outgoing, &incoming)
    } else {
        both_ways(&local.clause("src"), &local.clause("dst"))
    };
    if let Some(clause) = clause {
        write!(filter, " and {clause}").expect("writing to a String");
    }
    Ok(filter)
}

/// Which addresses one end of a flow may have.
enum Hosts {
    Any,
    Exact(IpAddr),
    /// A wildcard-bound socket: the namespace's own addresses, and for UDP
    /// also multicast and broadcast destinations.
    Among {
        networks: Vec<LocalNetwork>,
        family: Family,
        groups: bool,
    },
}

/// One end of a flow: its addresses and, for TCP and UDP, a port.
struct Endpoint {
    hosts: Hosts,
    port: Option<u16>,
}

impl Endpoint {
    /// The primitives that pin this end as source or destination.
    fn clause(&self, direction: &str) -> Vec<String> {
        let mut parts = Vec::new();
        match &self.hosts {
            Hosts::Any => {}
            Hosts::Exact(ip) => parts.push(format!("{direction} host {ip}")),
            Hosts::Among {
                networks,
                family,
                groups,
            } => {
                let mut any_of: Vec<String> =
                    networks.iter().map(|n| n.primitive(direction)).collect();
                if *groups && direction == "dst" {
                    if *family != Family::V6 {
                        any_of.push("ip multicast".into());
                        any_of.push("dst host 255.255.255.255".into());
                    }
                    if *family != Family::V4 {
                        any_of.push("ip6 multicast".into());
                    }
                }
                parts.push(format!("({})", any_of.join(" or ")));
            }
        }
        if let Some(port) = self.port {
            parts.push(format!("{direction} port {port}"));
        }
        parts
    }
}

/// `(a and b) or (c and d)`, collapsed where the two directions are one
/// (`port 80` rather than `(src port 80) or (dst port 80)`).
fn both_ways(first: &[String], second: &[String]) -> Option<String> {
    if first.is_empty() || second.is_empty() {
        return None;
    }
    let undirected = |parts: &[String]| -> Vec<String> {
        parts
            .iter()
            .map(|p| {
                p.trim_start_matches("src ")
                    .trim_start_matches("dst ")
                    .to_owned()
            })
            .collect()
    };
    if first.len() == 1 && second.len() == 1 && undirected(first) == undirected(second) {
        return Some(undirected(first).remove(0));
    }
    if first == second {
        return Some(format!("({})", first.join(" and ")));
    }
    Some(format!(
        "(({}) or ({}))",
        first.join(" and "),
        second.join(" and ")
    ))
}

fn qualified(family: Family, transport: &str) -> String {
    match family {
        Family::V4 => format!("ip and {transport}"),
        Family::V6 => format!("ip6 and {transport}"),
        Family::Any => transport.to_owned(),
    }
}

fn raw_protocol(family: Family, protocol: u16) -> Result<String, Unsupported> {
    // IPPROTO_RAW (255) sockets only send, with any protocol; 0 is not a
    // protocol a raw socket can receive.
    if protocol == 0 || protocol >= 255 {
        return Err(Unsupported(format!(
            "a raw socket of protocol {protocol} receives nothing a filter can select"
        )));
    }
    Ok(match family {
        Family::V4 => format!("ip proto {protocol}"),
        Family::V6 | Family::Any => format!("ip6 proto {protocol}"),
    })
}

/// Ping sockets: the table's "port" is the ICMP echo identifier.
fn echo_identifier(family: Family, identifier: u16) -> String {
    match family {
        Family::V4 => format!(
            "icmp and (icmp[icmptype] == icmp-echo or icmp[icmptype] == icmp-echoreply) and icmp[4:2] == {identifier}"
        ),
        // The fixed IPv6 header is 40 bytes; echo request 128, reply 129.
        Family::V6 | Family::Any => {
            format!("icmp6 and (ip6[40] == 128 or ip6[40] == 129) and ip6[44:2] == {identifier}")
        }
    }
}

/// A flow the `all` stream has found to be another process's: its
/// transport (TCP or not) and both ends, as on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ForeignFlow {
    pub tcp: bool,
    pub a: SocketAddr,
    pub b: SocketAddr,
}

/// The kernel filter of a process's `all` stream: every TCP and UDP packet
/// but those of flows known to be other processes'. TCP SYNs always pass:
/// a new connection on a 4-tuple another process used must reach the
/// sorter.
pub fn process_filter(foreign: &[ForeignFlow]) -> String {
    if foreign.is_empty() {
        return "tcp or udp".to_owned();
    }
    let excluded: Vec<String> = foreign
        .iter()
        .map(|flow| {
            let one_way = |from: SocketAddr, to: SocketAddr| {
                format!(
                    "src host {} and src port {} and dst host {} and dst port {}",
                    from.ip(),
                    from.port(),
                    to.ip(),
                    to.port()
                )
            };
            format!(
                "({} and (({}) or ({})))",
                if flow.tcp { "tcp" } else { "udp" },
                one_way(flow.a, flow.b),
                one_way(flow.b, flow.a)
            )
        })
        .collect();
    // libpcap reads TCP flags of IPv4 only; for IPv6 (without extension
    // headers) the flags byte is at 40 + 13.
    format!(
        "(tcp[tcpflags] & tcp-syn != 0) or (ip6 and ip6[6] == 6 and ip6[53] & 2 != 0) or ((tcp or udp) and not ({}))",
        excluded.join(" or ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(proto: Proto, local: &str, remote: &str, dual_stack: bool) -> String {
        filter_with(proto, local, remote, dual_stack, &[])
    }

    fn filter_with(
        proto: Proto,
        local: &str,
        remote: &str,
        dual_stack: bool,
        locals: &[LocalNetwork],
    ) -> String {
        bpf_filter_for(
            &FilterTarget {
                proto,
                local: local.parse().unwrap(),
                remote: remote.parse().unwrap(),
                dual_stack,
            },
            locals,
        )
        .unwrap()
    }

    fn sock(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    #[test]
    fn a_wildcard_udp_socket_leaves_out_what_more_specific_sockets_take() {
        let wildcard = FilterTarget {
            proto: Proto::Udp,
            local: sock("0.0.0.0:15353"),
            remote: sock("0.0.0.0:0"),
            dual_stack: false,
        };
        let rows = [
            // Itself.
            (sock("0.0.0.0:15353"), sock("0.0.0.0:0"), false, 1),
            // Another user's socket on the exact address: its datagrams.
            (sock("127.0.0.1:15353"), sock("0.0.0.0:0"), false, 2),
            // A connected socket on the port: its peer's datagrams.
            (sock("127.0.0.2:15353"), sock("127.0.0.9:53"), false, 3),
            // Another port: nothing.
            (sock("127.0.0.1:5353"), sock("0.0.0.0:0"), false, 4),
        ];
        let taken = taken_from(&wildcard, 1, rows);
        assert_eq!(
            taken,
            [
                Taken::Address(sock("127.0.0.1:15353")),
                Taken::Flow(sock("127.0.0.2:15353"), sock("127.0.0.9:53")),
            ]
        );
        let text = without_taken(
            bpf_filter_for(&wildcard, &namespace_addresses()).unwrap(),
            &taken,
        );
        assert!(text.ends_with(
            " and not ((dst host 127.0.0.1 and dst port 15353) or (src host 127.0.0.1 and src port 15353) \
             or (src host 127.0.0.2 and src port 15353 and dst host 127.0.0.9 and dst port 53) \
             or (src host 127.0.0.9 and src port 53 and dst host 127.0.0.2 and dst port 15353))"
        ), "{text}");
        compiles(&text);

        // A socket on the exact address loses only its connected peers.
        let exact = FilterTarget {
            local: sock("127.0.0.1:15353"),
            ..wildcard
        };
        assert_eq!(taken_from(&exact, 2, rows), []);
        let on_its_address = [(sock("127.0.0.1:15353"), sock("127.0.0.7:99"), false, 5)];
        assert_eq!(
            taken_from(&exact, 2, on_its_address),
            [Taken::Flow(sock("127.0.0.1:15353"), sock("127.0.0.7:99"))]
        );
        // A connected socket's own stream is exact already.
        let connected = FilterTarget {
            remote: sock("127.0.0.9:53"),
            ..exact
        };
        assert_eq!(taken_from(&connected, 3, rows), []);
    }

    #[test]
    fn a_wildcard_listener_leaves_out_only_listeners_on_exact_addresses() {
        let listener = FilterTarget {
            proto: Proto::Tcp,
            local: sock("0.0.0.0:8080"),
            remote: sock("0.0.0.0:0"),
            dual_stack: false,
        };
        let rows = [
            (sock("127.0.0.1:8080"), sock("0.0.0.0:0"), true, 2),
            // A connection it accepted stays in its stream.
            (sock("127.0.0.2:8080"), sock("127.0.0.1:40000"), false, 3),
        ];
        assert_eq!(
            taken_from(&listener, 1, rows),
            [Taken::Address(sock("127.0.0.1:8080"))]
        );
        assert_eq!(without_taken("tcp".into(), &[]), "tcp");
    }

    fn namespace_addresses() -> Vec<LocalNetwork> {
        vec![
            LocalNetwork {
                ip: "127.0.0.0".parse().unwrap(),
                prefix_len: 8,
            },
            LocalNetwork {
                ip: "10.1.2.3".parse().unwrap(),
                prefix_len: 32,
            },
            LocalNetwork {
                ip: "::1".parse().unwrap(),
                prefix_len: 128,
            },
        ]
    }

    /// libpcap itself must accept every filter: compile each on a dead
    /// handle of the link types we capture with.
    fn compiles(text: &str) {
        for linktype in [pcap::Linktype::LINUX_SLL, pcap::Linktype::ETHERNET] {
            let dead = pcap::Capture::dead(linktype).unwrap();
            if let Err(err) = dead.compile(text, true) {
                panic!("{text:?} does not compile: {err}");
            }
        }
    }

    #[test]
    fn connected_tcp_v4_is_exactly_one_pair() {
        let text = filter(Proto::Tcp, "127.0.0.1:41234", "127.0.0.1:8080", true);
        assert_eq!(
            text,
            "ip and tcp and ((src host 127.0.0.1 and src port 41234 and dst host 127.0.0.1 and dst port 8080) \
             or (src host 127.0.0.1 and src port 8080 and dst host 127.0.0.1 and dst port 41234))"
        );
        compiles(&text);
    }

    #[test]
    fn connected_tcp_v6() {
        let text = filter(Proto::Tcp6, "[::1]:5000", "[::1]:6000", true);
        assert_eq!(
            text,
            "ip6 and tcp and ((src host ::1 and src port 5000 and dst host ::1 and dst port 6000) \
             or (src host ::1 and src port 6000 and dst host ::1 and dst port 5000))"
        );
        compiles(&text);
    }

    #[test]
    fn ipv4_mapped_tcp6_is_matched_as_ipv4() {
        let text = filter(
            Proto::Tcp6,
            "[::ffff:127.0.0.1]:8080",
            "[::ffff:127.0.0.1]:51000",
            true,
        );
        assert!(text.starts_with("ip and tcp and "), "{text}");
        assert!(text.contains(
            "src host 127.0.0.1 and src port 8080 and dst host 127.0.0.1 and dst port 51000"
        ));
        assert!(!text.contains("::ffff"));
        compiles(&text);
    }

    #[test]
    fn connected_udp_v4_and_v6() {
        let v4 = filter(Proto::Udp, "127.0.0.1:5000", "127.0.0.2:53", true);
        assert!(v4.starts_with("ip and udp and (("), "{v4}");
        assert!(v4.contains("dst host 127.0.0.2 and dst port 53"));
        compiles(&v4);
        let v6 = filter(Proto::Udp6, "[::1]:5000", "[::1]:53", true);
        assert!(v6.starts_with("ip6 and udp and (("), "{v6}");
        compiles(&v6);
    }

    #[test]
    fn listener_on_a_specific_address() {
        let text = filter(Proto::Tcp, "127.0.0.1:8080", "0.0.0.0:0", true);
        assert_eq!(
            text,
            "ip and tcp and ((src host 127.0.0.1 and src port 8080) or (dst host 127.0.0.1 and dst port 8080))"
        );
        compiles(&text);
    }

    #[test]
    fn wildcard_listeners_match_the_port() {
        assert_eq!(
            filter(Proto::Tcp, "0.0.0.0:22", "0.0.0.0:0", true),
            "ip and tcp and port 22"
        );
        // Dual stack: IPv4 too.
        let dual = filter(Proto::Tcp6, "[::]:22", "[::]:0", true);
        assert_eq!(dual, "tcp and port 22");
        compiles(&dual);
        // IPv6-only.
        assert_eq!(
            filter(Proto::Tcp6, "[::]:22", "[::]:0", false),
            "ip6 and tcp and port 22"
        );
        let udp = filter(Proto::Udp, "0.0.0.0:5353", "0.0.0.0:0", true);
        assert_eq!(udp, "ip and udp and port 5353");
        compiles(&udp);
    }

    #[test]
    fn unconnected_udp6_on_a_specific_address() {
        let text = filter(Proto::Udp6, "[::1]:9999", "[::]:0", true);
        assert_eq!(
            text,
            "ip6 and udp and ((src host ::1 and src port 9999) or (dst host ::1 and dst port 9999))"
        );
        compiles(&text);
    }

    #[test]
    fn raw_and_ping_sockets() {
        let raw = filter(Proto::Raw, "0.0.0.0:1", "0.0.0.0:0", true);
        assert_eq!(raw, "ip proto 1");
        compiles(&raw);
        let raw6 = filter(Proto::Raw6, "[::1]:58", "[::]:0", true);
        assert_eq!(raw6, "ip6 proto 58 and host ::1");
        compiles(&raw6);
        let ping = filter(Proto::Icmp, "127.0.0.1:77", "127.0.0.1:0", true);
        assert!(ping.contains("icmp[4:2] == 77"), "{ping}");
        assert!(
            ping.ends_with("and (src host 127.0.0.1 and dst host 127.0.0.1)"),
            "{ping}"
        );
        compiles(&ping);
        let ping6 = filter(Proto::Icmp6, "[::]:77", "[::]:0", true);
        assert!(ping6.contains("ip6[44:2] == 77"));
        compiles(&ping6);
        let send_only = bpf_filter_for(
            &FilterTarget {
                proto: Proto::Raw,
                local: "0.0.0.0:255".parse().unwrap(),
                remote: "0.0.0.0:0".parse().unwrap(),
                dual_stack: true,
            },
            &[],
        );
        assert!(send_only.is_err());
    }

    #[test]
    fn a_process_filter_leaves_out_foreign_flows_but_not_syns() {
        assert_eq!(process_filter(&[]), "tcp or udp");
        let foreign = [
            ForeignFlow {
                tcp: true,
                a: "127.0.0.1:5000".parse().unwrap(),
                b: "127.0.0.1:80".parse().unwrap(),
            },
            ForeignFlow {
                tcp: false,
                a: "[::1]:5353".parse().unwrap(),
                b: "[::1]:53".parse().unwrap(),
            },
        ];
        let text = process_filter(&foreign);
        assert!(
            text.starts_with("(tcp[tcpflags] & tcp-syn != 0) or "),
            "{text}"
        );
        assert!(
            text.contains("not ((tcp and ((src host 127.0.0.1 and src port 5000"),
            "{text}"
        );
        assert!(
            text.contains(
                "(udp and ((src host ::1 and src port 5353 and dst host ::1 and dst port 53)"
            ),
            "{text}"
        );
        compiles(&text);
        // 64 flows stay within what the kernel takes.
        let many: Vec<ForeignFlow> = (0..64)
            .map(|i| ForeignFlow {
                tcp: i % 2 == 0,
                a: format!("10.0.0.{}:{}", i, 1000 + i).parse().unwrap(),
                b: "10.0.1.1:443".parse().unwrap(),
            })
            .collect();
        let text = process_filter(&many);
        compiles(&text);
        let dead = pcap::Capture::dead(pcap::Linktype::LINUX_SLL).unwrap();
        let program = dead.compile(&text, true).unwrap();
        assert!(
            program.get_instructions().len() <= 4096,
            "the kernel's BPF_MAXINSNS"
        );
    }

    #[test]
    fn wildcard_listeners_with_known_addresses_match_only_local_ends() {
        let locals = namespace_addresses();
        let v4 = filter_with(Proto::Tcp, "0.0.0.0:22", "0.0.0.0:0", true, &locals);
        assert_eq!(
            v4,
            "ip and tcp and (((src net 127.0.0.0/8 or src host 10.1.2.3) and src port 22) \
             or ((dst net 127.0.0.0/8 or dst host 10.1.2.3) and dst port 22))"
        );
        compiles(&v4);
        // Dual stack: both families' addresses.
        let dual = filter_with(Proto::Tcp6, "[::]:22", "[::]:0", true, &locals);
        assert!(dual.starts_with("tcp and "), "{dual}");
        assert!(
            dual.contains("src host ::1") && dual.contains("src net 127.0.0.0/8"),
            "{dual}"
        );
        compiles(&dual);
        // IPv6 only: IPv6 addresses only.
        let v6only = filter_with(Proto::Tcp6, "[::]:22", "[::]:0", false, &locals);
        assert!(!v6only.contains("127.0.0.0"), "{v6only}");
        compiles(&v6only);
        // UDP also takes multicast and broadcast datagrams to its port.
        let udp = filter_with(Proto::Udp, "0.0.0.0:5353", "0.0.0.0:0", true, &locals);
        assert!(
            udp.contains("or ip multicast or dst host 255.255.255.255)"),
            "{udp}"
        );
        assert!(!udp.contains("ip6 multicast"));
        compiles(&udp);
        // A specific address needs no list.
        let specific = filter_with(Proto::Tcp, "127.0.0.1:22", "0.0.0.0:0", true, &locals);
        assert_eq!(
            specific,
            filter(Proto::Tcp, "127.0.0.1:22", "0.0.0.0:0", true)
        );
    }

    #[test]
    fn rivals_share_the_port_the_address_and_the_family() {
        let target = FilterTarget {
            proto: Proto::Udp,
            local: "0.0.0.0:5000".parse().unwrap(),
            remote: "0.0.0.0:0".parse().unwrap(),
            dual_stack: false,
        };
        let row = |local: &str, remote: &str, inode| {
            (
                local.parse().unwrap(),
                remote.parse().unwrap(),
                false,
                inode,
            )
        };
        let rows = [
            row("0.0.0.0:5000", "0.0.0.0:0", 1),
            row("0.0.0.0:5000", "0.0.0.0:0", 2),
            row("0.0.0.0:5000", "0.0.0.0:0", 9),
            row("127.0.0.1:5000", "0.0.0.0:0", 3),
            row("0.0.0.0:5001", "0.0.0.0:0", 4),
            row("0.0.0.0:5000", "127.0.0.1:9", 5),
            row("[::]:5000", "[::]:0", 6),
        ];
        assert_eq!(rivals_of(&target, 1, rows), [2, 9]);
        let exact = FilterTarget {
            local: "127.0.0.1:5000".parse().unwrap(),
            ..target
        };
        assert_eq!(rivals_of(&exact, 3, rows), Vec::<u64>::new());
        let tcp = FilterTarget {
            proto: Proto::Tcp,
            ..target
        };
        assert!(rivals_of(&tcp, 1, rows).is_empty());
    }
}
