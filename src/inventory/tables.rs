//! One network namespace's socket tables (/proc/<pid>/net/{tcp,tcp6,udp,…}),
//! read through procfs's parsers but one bad line never loses the table.
//!
//! procfs fails a whole table on any line it cannot parse (its UDP parser
//! even on an unknown state value), so when a table does not parse whole it
//! is parsed again line by line and the lines that fail are returned to the
//! caller, which reports each once.

use std::io;
use std::net::SocketAddr;
use std::path::Path;

use procfs::FromBufReadSI;
use procfs::net::{TcpNetEntries, UdpNetEntries};

use crate::names::Proto;

/// One row of a socket table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SocketRow {
    pub proto: Proto,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// The kernel's state number (TCP_ESTABLISHED = 1, …, TCP_CLOSE = 7).
    pub state: u8,
    pub uid: u32,
    pub rx_queue: u32,
    pub tx_queue: u32,
    pub inode: u64,
}

/// The rows of one table, and the lines that could not be parsed.
#[derive(Debug, Default)]
pub struct Table {
    pub rows: Vec<SocketRow>,
    pub bad_lines: Vec<String>,
}

/// Reads `<proc_pid>/net/<proto>`. A table the kernel does not have (IPv6
/// disabled, say) is empty, not an error; but a process that is exiting
/// loses its whole net directory while /proc/<pid> stays, so an absent table
/// counts as absent only while the IPv4 TCP table, which every namespace
/// has, is still there.
pub fn read_table(proc_pid: &Path, proto: Proto) -> io::Result<Table> {
    Ok(read_text(proc_pid, proto)?
        .map(|text| parse_table(&text, proto))
        .unwrap_or_default())
}

/// A table's text; None for a table the kernel does not have.
fn read_text(proc_pid: &Path, proto: Proto) -> io::Result<Option<Vec<u8>>> {
    match std::fs::read(proc_pid.join("net").join(proto.as_str())) {
        Ok(text) => Ok(Some(text)),
        Err(err)
            if err.kind() == io::ErrorKind::NotFound
                && proto != Proto::Tcp
                && proc_pid.join("net/tcp").exists() =>
        {
            Ok(None)
        }
        Err(err) => Err(err),
    }
}

/// Reads `<proc_pid>/net/<proto>` keeping only the rows in state `state`
/// (the kernel's number), which are picked from the text before anything
/// is parsed: a namespace's listeners cost the same with or without
/// thousands of TIME_WAIT rows beside them.
pub fn read_table_in_state(proc_pid: &Path, proto: Proto, state: u8) -> io::Result<Table> {
    Ok(read_text(proc_pid, proto)?
        .map(|text| parse_table(&lines_in_state(&text, state), proto))
        .unwrap_or_default())
}

/// The header and the lines of a table whose state field (the fourth,
/// two hex digits) is `state` (pure).
pub fn lines_in_state(text: &[u8], state: u8) -> Vec<u8> {
    let wanted = format!("{state:02X}");
    let mut lines = text.split(|&b| b == b'\n');
    let mut out = Vec::with_capacity(text.len().min(64 * 1024));
    if let Some(header) = lines.next() {
        out.extend_from_slice(header);
        out.push(b'\n');
    }
    for line in lines {
        let state_field = line
            .split(|b| b.is_ascii_whitespace())
            .filter(|field| !field.is_empty())
            .nth(3);
        if state_field == Some(wanted.as_bytes()) {
            out.extend_from_slice(line);
            out.push(b'\n');
        }
    }
    out
}

/// Parses a whole table's text (header line included).
pub fn parse_table(text: &[u8], proto: Proto) -> Table {
    if let Some(rows) = parse_rows(text, proto) {
        return Table {
            rows,
            bad_lines: Vec::new(),
        };
    }
    // Some line is bad: parse each one alone, behind the header, and keep
    // the rest.
    let mut lines = text.split(|&b| b == b'\n');
    let header = lines.next().unwrap_or_default();
    let mut table = Table::default();
    let mut one = Vec::new();
    for line in lines.filter(|line| !line.iter().all(u8::is_ascii_whitespace)) {
        one.clear();
        one.extend_from_slice(header);
        one.push(b'\n');
        one.extend_from_slice(line);
        match parse_rows(&one, proto) {
            Some(rows) => table.rows.extend(rows),
            None => table
                .bad_lines
                .push(String::from_utf8_lossy(line).trim().to_owned()),
        }
    }
    table
}

/// procfs's TCP and UDP entries have the same fields and no common trait.
macro_rules! socket_rows {
    ($entries:expr, $proto:expr) => {
        $entries
            .0
            .into_iter()
            .map(|entry| SocketRow {
                proto: $proto,
                local: entry.local_address,
                remote: entry.remote_address,
                state: entry.state.to_u8(),
                uid: entry.uid,
                rx_queue: entry.rx_queue,
                tx_queue: entry.tx_queue,
                inode: entry.inode,
            })
            .collect()
    };
}

fn parse_rows(text: &[u8], proto: Proto) -> Option<Vec<SocketRow>> {
    let system = procfs::current_system_info();
    Some(if proto.is_tcp() {
        socket_rows!(TcpNetEntries::from_buf_read(text, system).ok()?, proto)
    } else {
        // udp, raw and icmp (ping) tables share one layout; for raw sockets
        // the "port" is the IP protocol number.
        socket_rows!(UdpNetEntries::from_buf_read(text, system).ok()?, proto)
    })
}

/// The name `ss` and netstat users know for a state. TCP states are the
/// kernel's names; datagram sockets are `UNCONN` or `ESTABLISHED`.
pub fn state_name(proto: Proto, state: u8) -> &'static str {
    if !proto.is_tcp() {
        return match state {
            1 => "ESTABLISHED",
            7 => "UNCONN",
            _ => "UNKNOWN",
        };
    }
    match state {
        1 => "ESTABLISHED",
        2 => "SYN_SENT",
        3 => "SYN_RECV",
        4 => "FIN_WAIT1",
        5 => "FIN_WAIT2",
        6 => "TIME_WAIT",
        7 => "CLOSE",
        8 => "CLOSE_WAIT",
        9 => "LAST_ACK",
        10 => "LISTEN",
        11 => "CLOSING",
        12 => "NEW_SYN_RECV",
        _ => "UNKNOWN",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 100 0 0 10 0
   1: 0100007F:A0D2 0100007F:1F90 01 00000010:00000002 00:00000000 00000000  1000        0 4243 1 0000000000000000 20 4 30 10 -1
";

    #[test]
    fn picks_the_rows_of_one_state_before_parsing() {
        let listeners = parse_table(&lines_in_state(TCP.as_bytes(), 10), Proto::Tcp);
        assert_eq!(listeners.rows.len(), 1);
        assert_eq!(listeners.rows[0].inode, 4242);
        assert!(listeners.bad_lines.is_empty());
        let established = parse_table(&lines_in_state(TCP.as_bytes(), 1), Proto::Tcp);
        assert_eq!(established.rows.len(), 1);
        assert_eq!(established.rows[0].inode, 4243);
        assert!(
            parse_table(&lines_in_state(TCP.as_bytes(), 6), Proto::Tcp)
                .rows
                .is_empty()
        );
    }

    #[test]
    fn parses_a_tcp_table() {
        let table = parse_table(TCP.as_bytes(), Proto::Tcp);
        assert!(table.bad_lines.is_empty());
        assert_eq!(table.rows.len(), 2);
        let row = &table.rows[1];
        assert_eq!(row.local, "127.0.0.1:41170".parse().unwrap());
        assert_eq!(row.remote, "127.0.0.1:8080".parse().unwrap());
        assert_eq!((row.state, row.uid, row.inode), (1, 1000, 4243));
        assert_eq!((row.tx_queue, row.rx_queue), (16, 2));
        assert_eq!(state_name(Proto::Tcp, table.rows[0].state), "LISTEN");
    }

    #[test]
    fn a_bad_line_is_skipped_and_returned() {
        let text = format!(
            "{TCP}   2: garbage here\n   3: 0100007F:0035 00000000:0000 4F 00000000:00000000 00:00000000 00000000 0 0 99 2\n"
        );
        let table = parse_table(text.as_bytes(), Proto::Tcp);
        assert_eq!(table.rows.len(), 2);
        assert_eq!(table.bad_lines.len(), 2, "{:?}", table.bad_lines);
        assert!(table.bad_lines[0].contains("garbage"));
    }

    #[test]
    fn a_udp_state_procfs_does_not_know_loses_only_its_line() {
        let text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  10: 00000000:14E9 00000000:0000 07 00000000:00000000 00:00000000 00000000   104        0 5001 2 0000000000000000 0
  11: 00000000:14EA 00000000:0000 0B 00000000:00000000 00:00000000 00000000   104        0 5002 2 0000000000000000 0
";
        let table = parse_table(text.as_bytes(), Proto::Udp);
        assert_eq!(table.rows.len(), 1);
        assert_eq!(table.rows[0].inode, 5001);
        assert_eq!(state_name(Proto::Udp, table.rows[0].state), "UNCONN");
        assert_eq!(table.bad_lines.len(), 1);
    }

    #[test]
    fn empty_and_truncated_input_never_panics() {
        for text in ["", "\n", "header only", "h\n0:", "h\n\u{0}\u{1}"] {
            let _ = parse_table(text.as_bytes(), Proto::Tcp6);
            let _ = parse_table(text.as_bytes(), Proto::Udp6);
        }
    }

    mod fuzz {
        use proptest::prelude::*;

        use super::super::*;

        const HEADER: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n";

        proptest! {
            #[test]
            fn any_bytes_never_panic(text in prop::collection::vec(any::<u8>(), 0..600)) {
                for proto in Proto::ALL {
                    let _ = parse_table(&text, proto);
                }
            }

            #[test]
            fn lines_shaped_like_the_kernels_never_panic(
                lines in prop::collection::vec(
                    "[ 0-9]{0,4}: [0-9A-F]{0,33}:[0-9A-F]{0,5} [0-9A-F]{0,33}:[0-9A-F]{0,5} [0-9A-F]{0,3} [0-9A-F:]{0,18} [0-9A-F:]{0,12} [0-9A-F]{0,9} [0-9 ]{0,6} [0-9]{0,3} [0-9]{0,21}.{0,20}",
                    0..8,
                )
            ) {
                let text = format!("{HEADER}{}", lines.join("\n"));
                for proto in Proto::ALL {
                    let table = parse_table(text.as_bytes(), proto);
                    prop_assert!(table.rows.len() + table.bad_lines.len() <= lines.len());
                }
            }
        }
    }
}
