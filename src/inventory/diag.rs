//! What the kernel knows of one socket, asked of socket diagnostics
//! (netlink `NETLINK_SOCK_DIAG`, as `ss -tinm` asks): TCP's `tcp_info`,
//! the congestion control, the socket's memory, its timer.
//!
//! One request per socket, for its exact tuple (the kernel's own lookup,
//! not a dump of every socket), on a netlink socket made in the socket's
//! network namespace (a netlink socket answers for the namespace it was
//! made in, whichever thread uses it later). The reply must name the
//! socket's inode, or it is another socket's and nothing is said.
//!
//! [`DiagReply::attributes`] turns a reply into attributes in the units
//! `ss -ti` prints (pure); values the kernel did not send are absent.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd};

use crate::names::Proto;

pub(crate) const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST: u16 = 1;
pub(crate) const NLMSG_ERROR: u16 = 2;
pub(crate) const NLMSG_HEADER_LEN: usize = 16;
const INET_DIAG_REQ_LEN: usize = 56;
const INET_DIAG_MSG_LEN: usize = 72;

// Attribute types of an inet_diag reply.
const INET_DIAG_INFO: u16 = 2;
const INET_DIAG_CONG: u16 = 4;
const INET_DIAG_SKMEMINFO: u16 = 7;

/// The tcp_info fields, as (attribute, byte offset, width, unit).
const TCP_FIELDS: &[(&str, usize, usize, Unit)] = &[
    ("rto", 8, 4, Unit::MicrosAsMillis),
    ("mss", 16, 4, Unit::Plain),
    ("unacked", 24, 4, Unit::Plain),
    ("sacked", 28, 4, Unit::Plain),
    ("lost", 32, 4, Unit::Plain),
    ("retrans", 36, 4, Unit::Plain),
    ("last_send", 44, 4, Unit::Plain),
    ("last_recv", 52, 4, Unit::Plain),
    ("pmtu", 60, 4, Unit::Plain),
    ("rtt", 68, 4, Unit::MicrosAsMillis),
    ("rttvar", 72, 4, Unit::MicrosAsMillis),
    ("ssthresh", 76, 4, Unit::Ssthresh),
    ("cwnd", 80, 4, Unit::Plain),
    ("reordering", 88, 4, Unit::Plain),
    ("total_retrans", 100, 4, Unit::Plain),
    ("pacing_rate", 104, 8, Unit::BytesAsBits),
    ("bytes_acked", 120, 8, Unit::Plain),
    ("bytes_received", 128, 8, Unit::Plain),
    ("segs_out", 136, 4, Unit::Plain),
    ("segs_in", 140, 4, Unit::Plain),
    ("min_rtt", 148, 4, Unit::MicrosAsMillis),
    ("data_segs_in", 152, 4, Unit::Plain),
    ("data_segs_out", 156, 4, Unit::Plain),
    ("delivery_rate", 160, 8, Unit::BytesAsBits),
    ("busy_time", 168, 8, Unit::MicrosAsWholeMillis),
    ("rwnd_limited", 176, 8, Unit::MicrosAsWholeMillis),
    ("sndbuf_limited", 184, 8, Unit::MicrosAsWholeMillis),
    ("bytes_sent", 200, 8, Unit::Plain),
    ("bytes_retrans", 208, 8, Unit::Plain),
];

/// The socket memory counters (`SK_MEMINFO_*`), by index.
const MEM_FIELDS: &[(&str, usize)] = &[
    ("rmem_alloc", 0),
    ("rcvbuf", 1),
    ("wmem_alloc", 2),
    ("sndbuf", 3),
    ("drops", 8),
];

#[derive(Clone, Copy)]
enum Unit {
    Plain,
    /// Microseconds shown as milliseconds with microsecond precision.
    MicrosAsMillis,
    /// Microseconds shown as whole milliseconds (busy and limited times).
    MicrosAsWholeMillis,
    /// Bytes per second shown as bits per second.
    BytesAsBits,
    /// Absent while "infinite" (before the first loss).
    Ssthresh,
}

/// A reply of socket diagnostics, as far as it was parsed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiagReply {
    pub inode: u64,
    /// The kernel's timer (0 none, 1 retransmit, 2 keepalive, 3 TIME_WAIT,
    /// 4 zero-window probe), its expiry in ms and its retransmissions.
    pub timer: (u8, u32, u8),
    pub tcp_info: Option<Vec<u8>>,
    pub congestion: Option<String>,
    pub memory: Option<Vec<u32>>,
}

impl DiagReply {
    /// `(name, value)` pairs, names under `user.netstatfs.`: `tcp.*` for
    /// TCP, `mem.*` for every inet socket.
    pub fn attributes(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if let Some(info) = &self.tcp_info {
            for &(name, offset, width, unit) in TCP_FIELDS {
                let Some(bytes) = info.get(offset..offset + width) else {
                    continue;
                };
                // Host byte order, as the kernel wrote the struct.
                let value = match *bytes {
                    [a, b, c, d] => u64::from(u32::from_ne_bytes([a, b, c, d])),
                    [a, b, c, d, e, f, g, h] => u64::from_ne_bytes([a, b, c, d, e, f, g, h]),
                    _ => continue,
                };
                let shown = match unit {
                    Unit::Plain => Some(value.to_string()),
                    Unit::MicrosAsMillis => Some(format!("{:.3}", value as f64 / 1000.0)),
                    Unit::MicrosAsWholeMillis => Some((value / 1000).to_string()),
                    Unit::BytesAsBits => Some(value.saturating_mul(8).to_string()),
                    Unit::Ssthresh => (value < 0x7fff_ffff).then(|| value.to_string()),
                };
                if let Some(shown) = shown {
                    out.push((format!("tcp.{name}"), shown));
                }
            }
            if let Some(congestion) = &self.congestion {
                out.push(("tcp.congestion".into(), congestion.clone()));
            }
            let (timer, expires, retransmits) = self.timer;
            let timer_name = match timer {
                1 => "on",
                2 => "keepalive",
                3 => "timewait",
                4 => "persist",
                _ => "off",
            };
            out.push((
                "tcp.timer".into(),
                format!("{timer_name},{expires}ms,{retransmits}"),
            ));
        }
        if let Some(memory) = &self.memory {
            for &(name, index) in MEM_FIELDS {
                if let Some(value) = memory.get(index) {
                    out.push((format!("mem.{name}"), value.to_string()));
                }
            }
        }
        out
    }
}

/// The request for one socket: its family, protocol and tuple (network
/// byte order in the socket id, host order elsewhere).
pub fn request(proto: Proto, local: SocketAddr, remote: SocketAddr, sequence: u32) -> Vec<u8> {
    let (family, protocol) = match proto {
        Proto::Tcp => (nix::libc::AF_INET, nix::libc::IPPROTO_TCP),
        Proto::Tcp6 => (nix::libc::AF_INET6, nix::libc::IPPROTO_TCP),
        Proto::Udp => (nix::libc::AF_INET, nix::libc::IPPROTO_UDP),
        _ => (nix::libc::AF_INET6, nix::libc::IPPROTO_UDP),
    };
    let mut out = request_header(INET_DIAG_REQ_LEN, sequence);
    out.push(family as u8);
    out.push(protocol as u8);
    // Extensions: tcp_info, the congestion control, the memory counters.
    let extensions: u8 = (1 << (INET_DIAG_INFO - 1))
        | (1 << (INET_DIAG_CONG - 1))
        | (1 << (INET_DIAG_SKMEMINFO - 1));
    out.push(extensions);
    out.push(0);
    out.extend_from_slice(&u32::MAX.to_ne_bytes()); // every state
    out.extend_from_slice(&local.port().to_be_bytes());
    out.extend_from_slice(&remote.port().to_be_bytes());
    out.extend_from_slice(&address_bytes(local.ip()));
    out.extend_from_slice(&address_bytes(remote.ip()));
    out.extend_from_slice(&0u32.to_ne_bytes()); // any interface
    out.extend_from_slice(&[0xff; 8]); // INET_DIAG_NOCOOKIE
    out
}

/// The netlink header of a socket diagnostics request whose body is
/// `body_len` bytes, with room for the body.
pub(crate) fn request_header(body_len: usize, sequence: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(NLMSG_HEADER_LEN + body_len);
    out.extend_from_slice(&((NLMSG_HEADER_LEN + body_len) as u32).to_ne_bytes());
    out.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    out.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    out.extend_from_slice(&sequence.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes());
    out
}

/// A reply message's body (what follows the netlink header, as long as
/// the header says); None for an error reply, another kind of message or
/// a message shorter than it says.
pub(crate) fn reply_body(message: &[u8]) -> Option<&[u8]> {
    let length = u32::from_ne_bytes(message.get(0..4)?.try_into().ok()?) as usize;
    let kind = u16::from_ne_bytes(message.get(4..6)?.try_into().ok()?);
    // No such socket is an NLMSG_ERROR message; anything else is not ours.
    if kind == NLMSG_ERROR || kind != SOCK_DIAG_BY_FAMILY {
        return None;
    }
    message.get(..length)?.get(NLMSG_HEADER_LEN..)
}

/// The netlink attributes of `body` from byte `from` on, as (type,
/// payload), up to the first that does not fit.
pub(crate) fn attributes(body: &[u8], from: usize) -> impl Iterator<Item = (u16, &[u8])> {
    let mut at = from;
    std::iter::from_fn(move || {
        let header = body.get(at..at + 4)?;
        let length = usize::from(u16::from_ne_bytes([header[0], header[1]]));
        let kind = u16::from_ne_bytes([header[2], header[3]]);
        let payload = body.get(at + 4..at.checked_add(length)?)?;
        if length < 4 {
            return None;
        }
        at += length.div_ceil(4) * 4;
        Some((kind, payload))
    })
}

/// The native-endian u32 at byte `at` of `bytes`.
pub(crate) fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

/// An address as the socket id holds it: 16 bytes, IPv4 in the first 4.
fn address_bytes(ip: IpAddr) -> [u8; 16] {
    let mut out = [0u8; 16];
    match ip {
        IpAddr::V4(v4) => out[..4].copy_from_slice(&v4.octets()),
        IpAddr::V6(v6) => out.copy_from_slice(&v6.octets()),
    }
    out
}

/// Parses one reply message; None for an error reply (no such socket) or
/// anything malformed.
pub fn parse_reply(message: &[u8]) -> Option<DiagReply> {
    let body = reply_body(message)?;
    let head = body.get(..INET_DIAG_MSG_LEN)?;
    let mut reply = DiagReply {
        timer: (head[2], u32_at(head, 52)?, head[3]),
        inode: u64::from(u32_at(head, 68)?),
        ..DiagReply::default()
    };
    for (attribute_type, payload) in attributes(body, INET_DIAG_MSG_LEN) {
        match attribute_type {
            INET_DIAG_INFO => reply.tcp_info = Some(payload.to_vec()),
            INET_DIAG_CONG => {
                let name = payload.split(|&b| b == 0).next().unwrap_or_default();
                reply.congestion = Some(String::from_utf8_lossy(name).into_owned());
            }
            INET_DIAG_SKMEMINFO => {
                reply.memory = Some(
                    payload
                        .chunks_exact(4)
                        .map(|word| u32::from_ne_bytes([word[0], word[1], word[2], word[3]]))
                        .collect(),
                );
            }
            _ => {}
        }
    }
    Some(reply)
}

/// A netlink socket for socket diagnostics, in the calling thread's
/// network namespace.
pub fn open() -> io::Result<OwnedFd> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockProtocol, SockType, socket};
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkSockDiag,
    )?;
    // An answer that never comes must not hold a FUSE request for long.
    let timeout = nix::sys::time::TimeVal::new(1, 0);
    nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::ReceiveTimeout, &timeout)?;
    Ok(fd)
}

/// Asks for one socket, by its tuple, and keeps the reply only if it names
/// `inode`. UDP's lookup takes the tuple as an arriving datagram's (remote
/// first), TCP's as the socket's: both orders are tried.
pub fn query(
    fd: &OwnedFd,
    proto: Proto,
    local: SocketAddr,
    remote: SocketAddr,
    inode: u64,
) -> io::Result<Option<DiagReply>> {
    let orders = [(local, remote), (remote, local)];
    for (sequence, (first, second)) in orders.into_iter().enumerate() {
        let message = request(proto, first, second, sequence as u32 + 1);
        nix::sys::socket::send(
            fd.as_raw_fd(),
            &message,
            nix::sys::socket::MsgFlags::empty(),
        )?;
        let mut buffer = vec![0u8; 16 * 1024];
        let length = nix::sys::socket::recv(
            fd.as_raw_fd(),
            &mut buffer,
            nix::sys::socket::MsgFlags::empty(),
        )?;
        match parse_reply(&buffer[..length]) {
            Some(reply) if reply.inode == inode => return Ok(Some(reply)),
            Some(reply) => log::debug!(
                "socket diagnostics answered for inode {} where {inode} was asked",
                reply.inode
            ),
            // An error reply (no socket with that tuple this way round) or
            // a message that does not parse.
            None => {
                log::debug!("socket diagnostics: no reply for inode {inode} ({length} bytes back)")
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A reply message: `head`, then each attribute (type, payload).
    pub(crate) fn reply_message(head: Vec<u8>, attributes: &[(u16, &[u8])]) -> Vec<u8> {
        let mut body = head;
        for (kind, payload) in attributes {
            body.extend_from_slice(&((payload.len() + 4) as u16).to_ne_bytes());
            body.extend_from_slice(&kind.to_ne_bytes());
            body.extend_from_slice(payload);
            body.resize(body.len().div_ceil(4) * 4, 0);
        }
        let mut message = Vec::new();
        message.extend_from_slice(&((NLMSG_HEADER_LEN + body.len()) as u32).to_ne_bytes());
        message.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        message.extend_from_slice(&[0; 10]);
        message.extend_from_slice(&body);
        message
    }

    /// `message` cut after `cut` bytes, its length field then saying
    /// `length_field` (for fuzzing what a short or lying reply does).
    pub(crate) fn cut_message(mut message: Vec<u8>, cut: usize, length_field: u32) -> Vec<u8> {
        message.truncate(cut.min(message.len()));
        if message.len() >= 4 {
            message[0..4].copy_from_slice(&length_field.to_ne_bytes());
        }
        message
    }

    fn reply_bytes(tcp_info: &[u8], congestion: &str, memory: &[u32]) -> Vec<u8> {
        let mut body = vec![0u8; INET_DIAG_MSG_LEN];
        body[0] = 2; // AF_INET
        body[1] = 1; // ESTABLISHED
        body[2] = 2; // keepalive
        body[3] = 0;
        body[52..56].copy_from_slice(&7_140_000u32.to_ne_bytes());
        body[68..72].copy_from_slice(&4242u32.to_ne_bytes());
        let congestion = format!("{congestion}\0");
        let memory: Vec<u8> = memory.iter().flat_map(|w| w.to_ne_bytes()).collect();
        reply_message(
            body,
            &[
                (INET_DIAG_INFO, tcp_info),
                (INET_DIAG_CONG, congestion.as_bytes()),
                (INET_DIAG_SKMEMINFO, &memory),
            ],
        )
    }

    #[test]
    fn a_reply_reads_in_the_units_ss_prints() {
        let mut info = vec![0u8; 232];
        let mut put = |offset: usize, value: u64, width: usize| {
            let bytes = if width == 4 {
                (value as u32).to_ne_bytes().to_vec()
            } else {
                value.to_ne_bytes().to_vec()
            };
            info[offset..offset + width].copy_from_slice(&bytes);
        };
        put(68, 325_512, 4); // rtt µs
        put(8, 1_204_000, 4); // rto µs
        put(76, 0x7fff_ffff, 4); // ssthresh: infinite
        put(80, 10, 4); // cwnd
        put(100, 24, 4); // total_retrans
        put(120, 262_145, 8); // bytes_acked
        put(160, 125_000, 8); // delivery_rate, bytes/s
        put(168, 2_500_000, 8); // busy_time µs
        let reply = parse_reply(&reply_bytes(
            &info,
            "cubic",
            &[0, 212_992, 0, 16_384, 0, 0, 0, 0, 17],
        ))
        .unwrap();
        assert_eq!(reply.inode, 4242);
        let attributes: std::collections::HashMap<String, String> =
            reply.attributes().into_iter().collect();
        assert_eq!(attributes["tcp.rtt"], "325.512");
        assert_eq!(attributes["tcp.rto"], "1204.000");
        assert_eq!(attributes["tcp.cwnd"], "10");
        assert_eq!(attributes["tcp.total_retrans"], "24");
        assert_eq!(attributes["tcp.bytes_acked"], "262145");
        assert_eq!(attributes["tcp.delivery_rate"], "1000000");
        assert_eq!(attributes["tcp.busy_time"], "2500");
        assert_eq!(attributes["tcp.congestion"], "cubic");
        assert_eq!(attributes["tcp.timer"], "keepalive,7140000ms,0");
        assert_eq!(attributes["mem.rcvbuf"], "212992");
        assert_eq!(attributes["mem.drops"], "17");
        assert!(
            !attributes.contains_key("tcp.ssthresh"),
            "infinite is absent"
        );
    }

    #[test]
    fn what_an_older_kernel_does_not_send_is_absent() {
        // A tcp_info that ends before bytes_acked, and a memory array
        // without the drops counter.
        let reply = parse_reply(&reply_bytes(&[0u8; 104], "reno", &[1, 2, 3, 4])).unwrap();
        let attributes: std::collections::HashMap<String, String> =
            reply.attributes().into_iter().collect();
        assert!(attributes.contains_key("tcp.total_retrans"));
        assert!(!attributes.contains_key("tcp.bytes_acked"));
        assert!(!attributes.contains_key("mem.drops"));
        assert_eq!(attributes["mem.sndbuf"], "4");
    }

    proptest::proptest! {
        /// Whatever the kernel (or a bug) hands over, parsing never panics,
        /// and a reply cut anywhere is no reply or a smaller one.
        #[test]
        fn any_bytes_parse_without_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..400)) {
            if let Some(reply) = parse_reply(&bytes) {
                let _ = reply.attributes();
            }
        }

        #[test]
        fn a_truncated_reply_never_panics(cut in 0usize..400, length_field in 0u32..1000) {
            let message = cut_message(
                reply_bytes(&[7u8; 232], "cubic", &[1, 2, 3, 4, 5, 6, 7, 8, 9]),
                cut,
                length_field,
            );
            if let Some(reply) = parse_reply(&message) {
                let _ = reply.attributes();
            }
        }
    }

    #[test]
    fn errors_and_garbage_are_no_reply() {
        let mut error = vec![0u8; 36];
        error[0..4].copy_from_slice(&36u32.to_ne_bytes());
        error[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        assert_eq!(parse_reply(&error), None);
        assert_eq!(parse_reply(b"short"), None);
        let mut truncated = reply_bytes(&[0u8; 8], "cubic", &[]);
        truncated.truncate(40);
        assert_eq!(parse_reply(&truncated), None);
    }
}
