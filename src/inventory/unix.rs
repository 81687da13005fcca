//! Unix sockets (listed with `--unix`): one network namespace's table
//! (`/proc/<pid>/net/unix`) and, for one socket at the time of asking, what
//! socket diagnostics says of it (`UNIX_DIAG`, as `ss -x` asks): its peer,
//! its exact name, its owner and its queues.
//!
//! Both parsers are pure and never panic on what they are handed: a line or
//! a message that does not parse is left out, and the caller says so once.
//!
//! A unix socket lives in the network namespace it was made in, and the
//! kernel finds it by inode only there (`unix_lookup_by_ino`), so the
//! netlink socket that asks must have been made in that namespace, as for
//! inet sockets ([`crate::fs::diagnostics`]).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use super::diag::{attributes, reply_body, request_header, u32_at};

/// `__SO_ACCEPTCON`: the socket listens.
const ACCEPTING: u32 = 1 << 16;

/// A unix socket's type, as `socket(2)` was given it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnixType {
    Stream,
    Dgram,
    SeqPacket,
    Other(u16),
}

impl UnixType {
    fn from_number(number: u16) -> UnixType {
        match number {
            1 => UnixType::Stream,
            2 => UnixType::Dgram,
            5 => UnixType::SeqPacket,
            other => UnixType::Other(other),
        }
    }

    pub fn name(self) -> String {
        match self {
            UnixType::Stream => "stream".into(),
            UnixType::Dgram => "dgram".into(),
            UnixType::SeqPacket => "seqpacket".into(),
            UnixType::Other(number) => number.to_string(),
        }
    }
}

/// What a unix socket is bound to.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum UnixName {
    /// A file system path, as bound (absolute or relative).
    Path(String),
    /// An abstract name, without the leading NUL; NULs inside it are shown
    /// as `@`, as the kernel shows them.
    Abstract(String),
    /// Not bound (a socketpair's end, a client's socket).
    Unnamed,
}

/// One row of `/proc/net/unix`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnixRow {
    pub inode: u64,
    pub kind: UnixType,
    /// The `SS_*` state: 1 unconnected, 2 connecting, 3 connected,
    /// 4 disconnecting.
    pub socket_state: u8,
    pub listening: bool,
    pub name: UnixName,
}

impl UnixRow {
    /// The state as the `user.netstatfs.state` attribute says it.
    pub fn state_name(&self) -> &'static str {
        if self.listening {
            return "LISTEN";
        }
        match self.socket_state {
            1 => "UNCONNECTED",
            2 => "CONNECTING",
            3 => "CONNECTED",
            4 => "DISCONNECTING",
            _ => "FREE",
        }
    }

    /// The name as the `user.netstatfs.path` attribute says it: the path,
    /// or `@` and the abstract name; None for an unnamed socket.
    pub fn path(&self) -> Option<String> {
        match &self.name {
            UnixName::Path(path) => Some(path.clone()),
            UnixName::Abstract(name) => Some(format!("@{name}")),
            UnixName::Unnamed => None,
        }
    }
}

/// The rows of one table, and the lines that could not be parsed.
#[derive(Debug, Default)]
pub struct UnixTable {
    pub rows: Vec<UnixRow>,
    pub bad_lines: Vec<String>,
}

/// Parses `/proc/net/unix` (header line included). The kernel writes
/// `Num: RefCount Protocol Flags Type St Inode[ Path]`, the inode padded to
/// five columns and the path, if any, after one space.
pub fn parse_table(text: &[u8]) -> UnixTable {
    let text = String::from_utf8_lossy(text);
    let mut table = UnixTable::default();
    for line in text.lines().skip(1).filter(|line| !line.trim().is_empty()) {
        match parse_line(line) {
            Some(row) => table.rows.push(row),
            None => table.bad_lines.push(line.to_owned()),
        }
    }
    table
}

fn parse_line(line: &str) -> Option<UnixRow> {
    let mut rest = line;
    let mut field = || -> Option<&str> {
        let trimmed = rest.trim_start_matches(' ');
        let end = trimmed.find(' ').unwrap_or(trimmed.len());
        let (value, after) = trimmed.split_at(end);
        rest = after;
        (!value.is_empty()).then_some(value)
    };
    let _slot = field()?.strip_suffix(':')?;
    let _refcount = field()?;
    let _protocol = field()?;
    let flags = u32::from_str_radix(field()?, 16).ok()?;
    let kind = u16::from_str_radix(field()?, 16).ok()?;
    let socket_state = u8::from_str_radix(field()?, 16).ok()?;
    let inode = field()?.parse().ok()?;
    let name = match rest.strip_prefix(' ') {
        None | Some("") => UnixName::Unnamed,
        Some(path) => match path.strip_prefix('@') {
            Some(name) => UnixName::Abstract(name.to_owned()),
            None => UnixName::Path(path.to_owned()),
        },
    };
    Some(UnixRow {
        inode,
        kind: UnixType::from_number(kind),
        socket_state,
        listening: flags & ACCEPTING != 0,
        name,
    })
}

const AF_UNIX: u8 = 1;
const UNIX_DIAG_REQ_LEN: usize = 24;
const UNIX_DIAG_MSG_LEN: usize = 16;
// What to show (`UDIAG_SHOW_*`) and the attributes that carry it.
const UDIAG_SHOW_NAME: u32 = 0x01;
const UDIAG_SHOW_VFS: u32 = 0x02;
const UDIAG_SHOW_PEER: u32 = 0x04;
const UDIAG_SHOW_RQLEN: u32 = 0x10;
const UDIAG_SHOW_UID: u32 = 0x40;
const UNIX_DIAG_NAME: u16 = 0;
const UNIX_DIAG_VFS: u16 = 1;
const UNIX_DIAG_PEER: u16 = 2;
const UNIX_DIAG_RQLEN: u16 = 4;
const UNIX_DIAG_UID: u16 = 7;

/// What socket diagnostics said of one unix socket; each part absent where
/// the kernel did not send it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnixDiag {
    pub inode: u64,
    /// The socket at the other end (a connected socket's).
    pub peer: Option<u64>,
    /// The bound file's inode and device (a path-bound socket's).
    pub vfs: Option<(u32, u32)>,
    /// Bytes waiting to be read and to be sent; for a listener, the
    /// connections waiting to be accepted and the backlog.
    pub queues: Option<(u32, u32)>,
    pub uid: Option<u32>,
    /// The exact name: a path, or a NUL and an abstract name.
    pub name: Option<Vec<u8>>,
}

impl UnixDiag {
    /// `(name, value)` pairs, names under `user.netstatfs.`.
    pub fn attributes(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if let Some(peer) = self.peer {
            out.push(("peer_inode".into(), peer.to_string()));
        }
        if let Some(uid) = self.uid {
            out.push(("uid".into(), uid.to_string()));
        }
        if let Some((read, send)) = self.queues {
            out.push(("rx_queue".into(), read.to_string()));
            out.push(("tx_queue".into(), send.to_string()));
        }
        if let Some((inode, device)) = self.vfs {
            out.push(("vfs_inode".into(), inode.to_string()));
            out.push((
                "vfs_dev".into(),
                format!("{}:{}", device >> 20, device & 0xfffff),
            ));
        }
        out
    }
}

/// The request for the unix socket `inode` (the kernel finds it by inode
/// and a cookie; no cookie is given).
pub fn request(inode: u32, sequence: u32) -> Vec<u8> {
    let mut out = request_header(UNIX_DIAG_REQ_LEN, sequence);
    out.push(AF_UNIX);
    out.push(0); // protocol
    out.extend_from_slice(&[0, 0]); // pad
    out.extend_from_slice(&u32::MAX.to_ne_bytes()); // every state
    out.extend_from_slice(&inode.to_ne_bytes());
    let show =
        UDIAG_SHOW_NAME | UDIAG_SHOW_VFS | UDIAG_SHOW_PEER | UDIAG_SHOW_RQLEN | UDIAG_SHOW_UID;
    out.extend_from_slice(&show.to_ne_bytes());
    out.extend_from_slice(&[0xff; 8]); // no cookie
    out
}

/// Parses one reply message; None for an error reply (no such socket) or
/// anything malformed. An attribute too short for its type is left out.
pub fn parse_reply(message: &[u8]) -> Option<UnixDiag> {
    let body = reply_body(message)?;
    let head = body.get(..UNIX_DIAG_MSG_LEN)?;
    if head[0] != AF_UNIX {
        return None;
    }
    let mut reply = UnixDiag {
        inode: u64::from(u32_at(head, 4)?),
        ..UnixDiag::default()
    };
    for (attribute_type, payload) in attributes(body, UNIX_DIAG_MSG_LEN) {
        match attribute_type {
            UNIX_DIAG_NAME => reply.name = Some(payload.to_vec()),
            UNIX_DIAG_VFS => reply.vfs = u32_at(payload, 0).zip(u32_at(payload, 4)),
            UNIX_DIAG_PEER => reply.peer = u32_at(payload, 0).map(u64::from),
            UNIX_DIAG_RQLEN => reply.queues = u32_at(payload, 0).zip(u32_at(payload, 4)),
            UNIX_DIAG_UID => reply.uid = u32_at(payload, 0),
            _ => {}
        }
    }
    Some(reply)
}

/// Asks for the unix socket `inode` on `fd` (a netlink socket made in the
/// socket's namespace); None if the kernel knows no such socket there.
pub fn query(fd: &OwnedFd, inode: u64) -> io::Result<Option<UnixDiag>> {
    // The kernel's unix inode numbers are 32 bits wide.
    let Ok(short) = u32::try_from(inode) else {
        return Ok(None);
    };
    nix::sys::socket::send(
        fd.as_raw_fd(),
        &request(short, 1),
        nix::sys::socket::MsgFlags::empty(),
    )?;
    let mut buffer = vec![0u8; 8 * 1024];
    let length = nix::sys::socket::recv(
        fd.as_raw_fd(),
        &mut buffer,
        nix::sys::socket::MsgFlags::empty(),
    )?;
    Ok(match parse_reply(&buffer[..length]) {
        Some(reply) if reply.inode == inode => Some(reply),
        Some(reply) => {
            log::debug!(
                "unix socket diagnostics answered for inode {} where {inode} was asked",
                reply.inode
            );
            None
        }
        None => {
            log::debug!(
                "unix socket diagnostics: no reply for inode {inode} ({length} bytes back)"
            );
            None
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::diag::tests::{cut_message, reply_message};
    use crate::inventory::diag::{NLMSG_ERROR, NLMSG_HEADER_LEN};

    const TABLE: &str = "\
Num       RefCount Protocol Flags    Type St Inode Path
0000000000000000: 00000002 00000000 00010000 0001 01 31337 /run/dbus/system_bus_socket
0000000000000000: 00000003 00000000 00000000 0001 03   124
0000000000000000: 00000002 00000000 00010000 0005 01 40001 @/tmp/.X11-unix/X0
0000000000000000: 00000002 00000000 00000000 0002 01 40002 relative path.sock
0000000000000000: 00000003 00000000 00000000 0001 03 40003 /run/dbus/system_bus_socket
garbage line
";

    #[test]
    fn the_kernels_table_parses_row_by_row() {
        let table = parse_table(TABLE.as_bytes());
        assert_eq!(table.bad_lines, vec!["garbage line".to_owned()]);
        assert_eq!(table.rows.len(), 5);
        let listener = &table.rows[0];
        assert_eq!(listener.inode, 31337);
        assert_eq!(listener.kind, UnixType::Stream);
        assert_eq!(listener.state_name(), "LISTEN");
        assert_eq!(
            listener.name,
            UnixName::Path("/run/dbus/system_bus_socket".into())
        );
        let unnamed = &table.rows[1];
        assert_eq!((unnamed.inode, unnamed.state_name()), (124, "CONNECTED"));
        assert_eq!(unnamed.name, UnixName::Unnamed);
        assert_eq!(unnamed.path(), None);
        assert_eq!(table.rows[2].kind, UnixType::SeqPacket);
        assert_eq!(table.rows[2].path().as_deref(), Some("@/tmp/.X11-unix/X0"));
        assert_eq!(table.rows[3].kind, UnixType::Dgram);
        assert_eq!(table.rows[3].state_name(), "UNCONNECTED");
        assert_eq!(
            table.rows[3].name,
            UnixName::Path("relative path.sock".into())
        );
    }

    fn reply_bytes(inode: u32, attributes: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut head = vec![0u8; UNIX_DIAG_MSG_LEN];
        head[0] = AF_UNIX;
        head[1] = 1; // stream
        head[2] = 1; // established
        head[4..8].copy_from_slice(&inode.to_ne_bytes());
        let attributes: Vec<(u16, &[u8])> = attributes
            .iter()
            .map(|(kind, payload)| (*kind, payload.as_slice()))
            .collect();
        reply_message(head, &attributes)
    }

    fn words(values: &[u32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_ne_bytes()).collect()
    }

    #[test]
    fn a_reply_names_the_peer_owner_and_queues() {
        let message = reply_bytes(
            4242,
            &[
                (UNIX_DIAG_NAME, b"/run/x.sock".to_vec()),
                (UNIX_DIAG_PEER, words(&[4243])),
                (UNIX_DIAG_RQLEN, words(&[5, 0])),
                (UNIX_DIAG_UID, words(&[1000])),
                (UNIX_DIAG_VFS, words(&[77, (8 << 20) | 1])),
            ],
        );
        let reply = parse_reply(&message).unwrap();
        assert_eq!(reply.inode, 4242);
        assert_eq!(reply.name.as_deref(), Some(&b"/run/x.sock"[..]));
        let attributes: std::collections::HashMap<String, String> =
            reply.attributes().into_iter().collect();
        assert_eq!(attributes["peer_inode"], "4243");
        assert_eq!(attributes["uid"], "1000");
        assert_eq!(attributes["rx_queue"], "5");
        assert_eq!(attributes["vfs_inode"], "77");
        assert_eq!(attributes["vfs_dev"], "8:1");
    }

    #[test]
    fn a_short_attribute_is_absent_and_errors_are_no_reply() {
        let reply = parse_reply(&reply_bytes(7, &[(UNIX_DIAG_PEER, vec![1, 2])])).unwrap();
        assert_eq!(reply.peer, None);
        assert!(reply.attributes().is_empty());
        let mut error = vec![0u8; 36];
        error[0..4].copy_from_slice(&36u32.to_ne_bytes());
        error[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        assert_eq!(parse_reply(&error), None);
        assert_eq!(parse_reply(b"tiny"), None);
    }

    #[test]
    fn the_request_asks_for_one_inode() {
        let message = request(0x0102_0304, 9);
        assert_eq!(message.len(), NLMSG_HEADER_LEN + UNIX_DIAG_REQ_LEN);
        assert_eq!(message[NLMSG_HEADER_LEN], AF_UNIX);
        assert_eq!(
            &message[NLMSG_HEADER_LEN + 8..NLMSG_HEADER_LEN + 12],
            &0x0102_0304u32.to_ne_bytes()
        );
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_parse_without_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            if let Some(reply) = parse_reply(&bytes) {
                let _ = reply.attributes();
            }
        }

        #[test]
        fn a_truncated_reply_never_panics(cut in 0usize..120, length_field in 0u32..400) {
            let message = cut_message(
                reply_bytes(5, &[(UNIX_DIAG_PEER, words(&[6])), (UNIX_DIAG_NAME, b"@x".to_vec())]),
                cut,
                length_field,
            );
            if let Some(reply) = parse_reply(&message) {
                let _ = reply.attributes();
            }
        }

        #[test]
        fn any_table_text_parses_without_panic(text in "\\PC{0,300}") {
            let _ = parse_table(text.as_bytes());
        }
    }
}
