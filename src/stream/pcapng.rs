//! The pcapng file format (pure): a section header and one interface
//! description at the start, then one enhanced packet block per packet,
//! each optionally carrying a comment (Wireshark shows it as the packet's
//! comment: `pid=… comm=… socket=…`). Native byte order, as libpcap writes.

use crate::capture::source::Timestamp;

const SECTION_HEADER: u32 = 0x0A0D_0D0A;
const INTERFACE_DESCRIPTION: u32 = 1;
const ENHANCED_PACKET: u32 = 6;
const INTERFACE_STATISTICS: u32 = 5;
const ISB_IFRECV: u16 = 4;
const ISB_IFDROP: u16 = 5;
const ISB_OSDROP: u16 = 7;
const ISB_USRDELIV: u16 = 8;
const BYTE_ORDER_MAGIC: u32 = 0x1A2B_3C4D;
const OPT_END: u16 = 0;
const OPT_COMMENT: u16 = 1;
const IF_TSRESOL: u16 = 9;

fn padded(length: usize) -> usize {
    length.div_ceil(4) * 4
}

fn push_u16(out: &mut Vec<u8>, value: u16) {
    out.extend_from_slice(&value.to_ne_bytes());
}

fn push_u32(out: &mut Vec<u8>, value: u32) {
    out.extend_from_slice(&value.to_ne_bytes());
}

fn push_option(out: &mut Vec<u8>, code: u16, value: &[u8]) {
    push_u16(out, code);
    push_u16(out, u16::try_from(value.len()).unwrap_or(u16::MAX));
    out.extend_from_slice(value);
    out.resize(out.len() + padded(value.len()) - value.len(), 0);
}

/// Writes a block: type, total length, body, total length again.
fn block(out: &mut Vec<u8>, block_type: u32, body: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    push_u32(out, block_type);
    push_u32(out, 0); // patched below
    body(out);
    let total = u32::try_from(out.len() - start + 4).unwrap_or(u32::MAX);
    push_u32(out, total);
    out[start + 4..start + 8].copy_from_slice(&total.to_ne_bytes());
}

/// The section header and the one interface every packet is on.
pub fn file_header(linktype: i32, snaplen: u32, nanosecond_timestamps: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    block(&mut out, SECTION_HEADER, |out| {
        push_u32(out, BYTE_ORDER_MAGIC);
        push_u16(out, 1);
        push_u16(out, 0);
        out.extend_from_slice(&(-1i64).to_ne_bytes()); // section length unknown
    });
    block(&mut out, INTERFACE_DESCRIPTION, |out| {
        push_u16(out, u16::try_from(linktype).unwrap_or(0));
        push_u16(out, 0);
        push_u32(out, snaplen);
        push_option(
            out,
            IF_TSRESOL,
            &[if nanosecond_timestamps { 9 } else { 6 }],
        );
        push_option(out, OPT_END, &[]);
    });
    out
}

/// The length of the block [`append_packet`] writes.
pub fn packet_block_len(data_len: usize, comment: Option<&str>) -> usize {
    let options = comment.map_or(0, |comment| 4 + padded(comment.len()) + 4);
    32 + padded(data_len) + options
}

/// Appends one enhanced packet block, with a comment if given.
pub fn append_packet(
    out: &mut Vec<u8>,
    timestamp: Timestamp,
    nanosecond_timestamps: bool,
    original_length: u32,
    data: &[u8],
    comment: Option<&str>,
) {
    let per_second: u64 = if nanosecond_timestamps {
        1_000_000_000
    } else {
        1_000_000
    };
    let units = u64::from(timestamp.seconds) * per_second + u64::from(timestamp.fraction);
    let captured = u32::try_from(data.len()).unwrap_or(u32::MAX);
    out.reserve(32 + padded(data.len()) + comment.map_or(0, |c| 8 + padded(c.len())) + 8);
    block(out, ENHANCED_PACKET, |out| {
        push_u32(out, 0); // interface 0
        push_u32(out, (units >> 32) as u32);
        push_u32(out, units as u32);
        push_u32(out, captured);
        push_u32(out, original_length.max(captured));
        out.extend_from_slice(data);
        out.resize(out.len() + padded(data.len()) - data.len(), 0);
        if let Some(comment) = comment {
            push_option(out, OPT_COMMENT, comment.as_bytes());
            push_option(out, OPT_END, &[]);
        }
    });
}

/// What an interface statistics block says of a stream at its end.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EndStatistics {
    /// Packets the capture took in (before any sorting).
    pub received: Option<u64>,
    /// Packets of the stream the kernel dropped (its ring overflowed).
    pub dropped_by_interface: Option<u64>,
    /// Packets of the stream left out after the kernel: the queue, and
    /// those the sorting could not place.
    pub dropped_by_us: u64,
    /// Packets the stream delivered.
    pub delivered: u64,
    /// Why, in words.
    pub comment: Option<String>,
}

/// Appends an interface statistics block for interface 0, stamped `units`
/// (in the interface's time resolution): Wireshark shows its drops in the
/// capture file's properties.
pub fn append_statistics(out: &mut Vec<u8>, units: u64, statistics: &EndStatistics) {
    block(out, INTERFACE_STATISTICS, |out| {
        push_u32(out, 0);
        push_u32(out, (units >> 32) as u32);
        push_u32(out, units as u32);
        if let Some(comment) = &statistics.comment {
            push_option(out, OPT_COMMENT, comment.as_bytes());
        }
        if let Some(received) = statistics.received {
            push_option(out, ISB_IFRECV, &received.to_ne_bytes());
        }
        if let Some(dropped) = statistics.dropped_by_interface {
            push_option(out, ISB_IFDROP, &dropped.to_ne_bytes());
        }
        push_option(out, ISB_OSDROP, &statistics.dropped_by_us.to_ne_bytes());
        push_option(out, ISB_USRDELIV, &statistics.delivered.to_ne_bytes());
        push_option(out, OPT_END, &[]);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tshark_reads_packets_and_comments() {
        let mut file = file_header(113, 262_144, true);
        let timestamp = Timestamp {
            seconds: 1_700_000_000,
            fraction: 123_456_789,
        };
        append_packet(
            &mut file,
            timestamp,
            true,
            7,
            b"payload",
            Some("pid=42 comm=x socket=tcp_1"),
        );
        let before = file.len();
        append_packet(&mut file, timestamp, true, 3, b"abc", None);
        assert_eq!(file.len() - before, packet_block_len(3, None));
        let before = file.len();
        append_packet(&mut file, timestamp, true, 3, b"abc", Some("12345"));
        assert_eq!(file.len() - before, packet_block_len(3, Some("12345")));
        assert_eq!(file.len() % 4, 0);
        // libpcap reads pcapng too.
        let path = std::env::temp_dir().join(format!("netstatfs-pcapng-{}", std::process::id()));
        std::fs::write(&path, &file).unwrap();
        let mut offline =
            pcap::Capture::from_file_with_precision(&path, pcap::Precision::Nano).unwrap();
        let first = offline.next_packet().unwrap();
        assert_eq!(first.data, b"payload");
        assert_eq!(first.header.ts.tv_usec, 123_456_789);
        assert_eq!(offline.next_packet().unwrap().data, b"abc");
        assert_eq!(offline.next_packet().unwrap().data, b"abc");
        assert!(offline.next_packet().is_err());
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn tshark_reads_the_end_statistics() {
        let mut file = file_header(113, 262_144, true);
        let timestamp = Timestamp {
            seconds: 1_700_000_000,
            fraction: 5,
        };
        append_packet(&mut file, timestamp, true, 3, b"abc", None);
        append_statistics(
            &mut file,
            1_700_000_001_000_000_000,
            &EndStatistics {
                received: Some(10),
                dropped_by_interface: Some(2),
                dropped_by_us: 3,
                delivered: 1,
                comment: Some("2 dropped by the kernel".into()),
            },
        );
        assert_eq!(file.len() % 4, 0);
        let path = std::env::temp_dir().join(format!("netstatfs-isb-{}", std::process::id()));
        std::fs::write(&path, &file).unwrap();
        // libpcap reads past the statistics block.
        let mut offline =
            pcap::Capture::from_file_with_precision(&path, pcap::Precision::Nano).unwrap();
        assert_eq!(offline.next_packet().unwrap().data, b"abc");
        assert!(offline.next_packet().is_err());
        std::fs::remove_file(&path).unwrap();
    }
}
