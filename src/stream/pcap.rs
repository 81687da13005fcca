//! The classic pcap file format (pure): the 24-byte global header and one
//! 16-byte record header per packet, in native byte order as libpcap writes
//! them. Readers tell nanosecond from microsecond files by the magic.

use crate::capture::source::Timestamp;

const MAGIC_MICROSECONDS: u32 = 0xa1b2_c3d4;
const MAGIC_NANOSECONDS: u32 = 0xa1b2_3c4d;

pub const GLOBAL_HEADER_LEN: usize = 24;
pub const RECORD_HEADER_LEN: usize = 16;

/// The file header: version 2.4, no time zone offset, the snap length and
/// link type of every record that follows.
pub fn global_header(linktype: i32, snaplen: u32, nanosecond_timestamps: bool) -> Vec<u8> {
    let magic = if nanosecond_timestamps {
        MAGIC_NANOSECONDS
    } else {
        MAGIC_MICROSECONDS
    };
    let mut header = Vec::with_capacity(GLOBAL_HEADER_LEN);
    header.extend_from_slice(&magic.to_ne_bytes());
    header.extend_from_slice(&2u16.to_ne_bytes());
    header.extend_from_slice(&4u16.to_ne_bytes());
    header.extend_from_slice(&0i32.to_ne_bytes()); // thiszone
    header.extend_from_slice(&0u32.to_ne_bytes()); // sigfigs
    header.extend_from_slice(&snaplen.to_ne_bytes());
    header.extend_from_slice(&(linktype as u32).to_ne_bytes());
    header
}

/// Appends one record: header then the captured bytes.
pub fn append_record(out: &mut Vec<u8>, timestamp: Timestamp, original_length: u32, data: &[u8]) {
    let captured = u32::try_from(data.len()).unwrap_or(u32::MAX);
    out.reserve(RECORD_HEADER_LEN + data.len());
    out.extend_from_slice(&timestamp.seconds.to_ne_bytes());
    out.extend_from_slice(&timestamp.fraction.to_ne_bytes());
    out.extend_from_slice(&captured.to_ne_bytes());
    out.extend_from_slice(&original_length.max(captured).to_ne_bytes());
    out.extend_from_slice(data);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libpcap_reads_what_we_write() {
        let mut file = global_header(113, 262_144, true);
        assert_eq!(file.len(), GLOBAL_HEADER_LEN);
        let payloads: [&[u8]; 2] = [b"first packet", b"second"];
        for (i, payload) in payloads.iter().enumerate() {
            let timestamp = Timestamp {
                seconds: 1_700_000_000 + i as u32,
                fraction: 123_456_789,
            };
            append_record(&mut file, timestamp, payload.len() as u32 + 10, payload);
        }
        let dir = std::env::temp_dir().join(format!("netstatfs-pcap-{}", std::process::id()));
        std::fs::write(&dir, &file).unwrap();
        let mut offline =
            pcap::Capture::from_file_with_precision(&dir, pcap::Precision::Nano).unwrap();
        std::fs::remove_file(&dir).unwrap();
        assert_eq!(offline.get_datalink(), pcap::Linktype::LINUX_SLL);
        for (i, payload) in payloads.iter().enumerate() {
            let packet = offline.next_packet().unwrap();
            assert_eq!(packet.data, *payload);
            assert_eq!(packet.header.len as usize, payload.len() + 10);
            assert_eq!(packet.header.ts.tv_sec, 1_700_000_000 + i as i64);
            assert_eq!(packet.header.ts.tv_usec, 123_456_789);
        }
        assert!(offline.next_packet().is_err());
    }
}
