//! Cutting a pcap or pcapng byte stream into whole records (pure), so the
//! extcap can filter packets one by one and never hand Wireshark half a
//! record: whatever stops the copy (SIGTERM, the stream's end), the FIFO
//! holds a file that reads to its end without error.
//!
//! Both formats, either byte order (a stream is in its writer's order:
//! netstatfs writes native, but a pcapng section says its own). Blocks that
//! carry no packet (section headers, interface descriptions, statistics)
//! always pass; a packet passes when `keep(linktype, bytes)` says so.

/// How many bytes one record may claim before the input is taken for
/// garbage rather than waited for (libpcap's own limit for a record is
/// 256 KiB of data; a pcapng block with a long comment is still far below).
const MAX_RECORD: usize = 16 << 20;

const PCAP_HEADER_LEN: usize = 24;
const PCAP_RECORD_HEADER_LEN: usize = 16;
const PCAP_MAGICS: [u32; 2] = [0xa1b2_c3d4, 0xa1b2_3c4d];

const PCAPNG_SECTION_HEADER: u32 = 0x0A0D_0D0A;
const PCAPNG_INTERFACE_DESCRIPTION: u32 = 1;
const PCAPNG_SIMPLE_PACKET: u32 = 3;
const PCAPNG_ENHANCED_PACKET: u32 = 6;
const PCAPNG_BYTE_ORDER_MAGIC: u32 = 0x1A2B_3C4D;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileFormat {
    Pcap,
    PcapNg,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Order {
    Little,
    Big,
}

impl Order {
    fn u16(self, bytes: &[u8]) -> u16 {
        let bytes = [bytes[0], bytes[1]];
        match self {
            Order::Little => u16::from_le_bytes(bytes),
            Order::Big => u16::from_be_bytes(bytes),
        }
    }

    fn u32(self, bytes: &[u8]) -> u32 {
        let bytes = [bytes[0], bytes[1], bytes[2], bytes[3]];
        match self {
            Order::Little => u32::from_le_bytes(bytes),
            Order::Big => u32::from_be_bytes(bytes),
        }
    }
}

/// What was learnt from the headers so far.
#[derive(Debug)]
enum Layout {
    /// Not enough bytes yet to tell the format.
    Unknown,
    Pcap {
        order: Order,
        linktype: u16,
    },
    /// `linktypes[i]` is interface i's of the current section.
    PcapNg {
        order: Order,
        linktypes: Vec<u16>,
    },
}

/// The input is neither pcap nor pcapng, or a record in it is impossible.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed(pub String);

impl std::fmt::Display for Malformed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// One complete record found in the input.
struct Next {
    length: usize,
    /// The pcap global header, which is no packet and always passes.
    file_header: bool,
}

/// Bytes in, whole kept records out.
#[derive(Debug)]
pub struct RecordSplitter {
    pending: Vec<u8>,
    layout: Layout,
}

impl Default for RecordSplitter {
    fn default() -> Self {
        RecordSplitter {
            pending: Vec::new(),
            layout: Layout::Unknown,
        }
    }
}

impl RecordSplitter {
    /// The format, once the first bytes told it.
    pub fn format(&self) -> Option<FileFormat> {
        match self.layout {
            Layout::Unknown => None,
            Layout::Pcap { .. } => Some(FileFormat::Pcap),
            Layout::PcapNg { .. } => Some(FileFormat::PcapNg),
        }
    }

    /// Bytes held back because their record is not complete yet.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Takes `input`, appends to `out` every record it completes that is
    /// kept, and holds back the incomplete rest for the next call.
    pub fn feed(
        &mut self,
        input: &[u8],
        out: &mut Vec<u8>,
        mut keep: impl FnMut(u16, &[u8]) -> bool,
    ) -> Result<(), Malformed> {
        self.pending.extend_from_slice(input);
        let mut at = 0;
        while let Some(next) = self.next_record(at)? {
            let record = &self.pending[at..at + next.length];
            if next.file_header || self.keeps(record, &mut keep) {
                out.extend_from_slice(record);
            }
            at += next.length;
        }
        self.pending.drain(..at);
        Ok(())
    }

    /// The record starting at `at`, if it is all there; learns the layout
    /// from headers on the way.
    fn next_record(&mut self, at: usize) -> Result<Option<Next>, Malformed> {
        let rest = &self.pending[at..];
        if let Layout::Unknown = self.layout {
            // Both formats start with at least this much (a pcapng section
            // header is 28 bytes or more).
            if rest.len() < PCAP_HEADER_LEN {
                return Ok(None);
            }
            self.layout = detect(rest)?;
            if let Layout::Pcap { .. } = self.layout {
                return Ok(Some(Next {
                    length: PCAP_HEADER_LEN,
                    file_header: true,
                }));
            }
        }
        if rest.len() < 12 {
            return Ok(None);
        }
        let length = match &self.layout {
            Layout::Unknown => unreachable!("detected above"),
            Layout::Pcap { order, .. } => {
                if rest.len() < PCAP_RECORD_HEADER_LEN {
                    return Ok(None);
                }
                PCAP_RECORD_HEADER_LEN + order.u32(&rest[8..12]) as usize
            }
            Layout::PcapNg { order, .. } => {
                let block_type = order.u32(&rest[0..4]);
                let order = if block_type == PCAPNG_SECTION_HEADER {
                    // A new section may change the byte order.
                    section_order(&rest[8..12])?
                } else {
                    *order
                };
                let length = order.u32(&rest[4..8]) as usize;
                if length < 12 || length % 4 != 0 {
                    return Err(Malformed(format!(
                        "a pcapng block of type {block_type:#x} claims {length} bytes"
                    )));
                }
                length
            }
        };
        if length > MAX_RECORD {
            return Err(Malformed(format!("a record claims {length} bytes")));
        }
        if rest.len() < length {
            return Ok(None);
        }
        if let Layout::PcapNg { .. } = self.layout {
            self.learn_pcapng(at, length)?;
        }
        Ok(Some(Next {
            length,
            file_header: false,
        }))
    }

    fn learn_pcapng(&mut self, at: usize, length: usize) -> Result<(), Malformed> {
        let block = &self.pending[at..at + length];
        let Layout::PcapNg { order, linktypes } = &mut self.layout else {
            return Ok(());
        };
        match order.u32(&block[0..4]) {
            PCAPNG_SECTION_HEADER => {
                *order = section_order(&block[8..12])?;
                linktypes.clear();
            }
            PCAPNG_INTERFACE_DESCRIPTION if length >= 20 => {
                linktypes.push(order.u16(&block[8..10]));
            }
            _ => {}
        }
        Ok(())
    }

    fn keeps(&self, record: &[u8], keep: &mut impl FnMut(u16, &[u8]) -> bool) -> bool {
        match &self.layout {
            Layout::Unknown => true,
            Layout::Pcap { linktype, .. } => keep(*linktype, &record[PCAP_RECORD_HEADER_LEN..]),
            Layout::PcapNg { order, linktypes } => {
                let Some((interface, data)) = pcapng_packet(*order, record) else {
                    return true;
                };
                match linktypes.get(interface as usize) {
                    Some(linktype) => keep(*linktype, data),
                    // A packet on an interface never described: nothing
                    // can filter it, and Wireshark would reject the file.
                    None => false,
                }
            }
        }
    }
}

fn detect(start: &[u8]) -> Result<Layout, Malformed> {
    let magic = u32::from_le_bytes([start[0], start[1], start[2], start[3]]);
    let pcap_order = if PCAP_MAGICS.contains(&magic) {
        Some(Order::Little)
    } else if PCAP_MAGICS.contains(&magic.swap_bytes()) {
        Some(Order::Big)
    } else {
        None
    };
    if let Some(order) = pcap_order {
        // The link type is the low 16 bits of the header's last field (the
        // high bits carry FCS flags).
        let linktype = (order.u32(&start[20..24]) & 0xffff) as u16;
        return Ok(Layout::Pcap { order, linktype });
    }
    if magic == PCAPNG_SECTION_HEADER {
        return Ok(Layout::PcapNg {
            order: section_order(&start[8..12])?,
            linktypes: Vec::new(),
        });
    }
    Err(Malformed(format!(
        "the stream starts with {magic:#010x}, neither pcap nor pcapng"
    )))
}

fn section_order(magic: &[u8]) -> Result<Order, Malformed> {
    match Order::Little.u32(magic) {
        PCAPNG_BYTE_ORDER_MAGIC => Ok(Order::Little),
        other if other.swap_bytes() == PCAPNG_BYTE_ORDER_MAGIC => Ok(Order::Big),
        other => Err(Malformed(format!(
            "a pcapng section header with byte-order magic {other:#010x}"
        ))),
    }
}

/// A packet block's interface and captured bytes; None for other blocks.
fn pcapng_packet(order: Order, block: &[u8]) -> Option<(u32, &[u8])> {
    match order.u32(&block[0..4]) {
        PCAPNG_ENHANCED_PACKET if block.len() >= 32 => {
            let captured = order.u32(&block[20..24]) as usize;
            let data = block.get(28..28 + captured)?;
            Some((order.u32(&block[8..12]), data))
        }
        PCAPNG_SIMPLE_PACKET if block.len() >= 16 => {
            let original = order.u32(&block[8..12]) as usize;
            let data = &block[12..block.len() - 4];
            Some((0, &data[..original.min(data.len())]))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::source::Timestamp;
    use crate::stream::{pcap, pcapng};

    fn at(seconds: u32) -> Timestamp {
        Timestamp {
            seconds,
            fraction: 0,
        }
    }

    fn pcap_file(packets: &[&[u8]]) -> Vec<u8> {
        let mut file = pcap::global_header(113, 65535, true);
        for (i, packet) in packets.iter().enumerate() {
            pcap::append_record(&mut file, at(i as u32), packet.len() as u32, packet);
        }
        file
    }

    fn pcapng_file(packets: &[&[u8]]) -> Vec<u8> {
        let mut file = pcapng::file_header(113, 65535, true);
        for (i, packet) in packets.iter().enumerate() {
            let comment = format!("pid={i}");
            pcapng::append_packet(
                &mut file,
                at(i as u32),
                true,
                packet.len() as u32,
                packet,
                Some(&comment),
            );
        }
        file
    }

    /// Feeds `file` in pieces of `step` bytes, keeping packets `keep` likes.
    fn split(file: &[u8], step: usize, keep: impl Fn(&[u8]) -> bool) -> (Vec<u8>, Vec<u16>) {
        let mut splitter = RecordSplitter::default();
        let mut out = Vec::new();
        let mut linktypes = Vec::new();
        for piece in file.chunks(step) {
            splitter
                .feed(piece, &mut out, |linktype, data| {
                    linktypes.push(linktype);
                    keep(data)
                })
                .unwrap();
        }
        assert_eq!(splitter.pending(), 0, "a record left incomplete");
        (out, linktypes)
    }

    #[test]
    fn pcap_passes_whole_whatever_the_pieces() {
        let file = pcap_file(&[b"one", b"second packet", b""]);
        for step in [1, 3, 16, 17, 1000] {
            let (out, linktypes) = split(&file, step, |_| true);
            assert_eq!(out, file, "pieces of {step}");
            assert_eq!(linktypes, [113, 113, 113]);
        }
    }

    #[test]
    fn pcap_filter_drops_whole_records() {
        let file = pcap_file(&[b"keep 1", b"drop", b"keep 2"]);
        let (out, _) = split(&file, 5, |data| data.starts_with(b"keep"));
        assert_eq!(out, pcap_file_with(&file, &[0, 2]));
    }

    /// The file `file` would be with only packets `indices` (pcap).
    fn pcap_file_with(file: &[u8], indices: &[usize]) -> Vec<u8> {
        let mut records = Vec::new();
        let mut at = PCAP_HEADER_LEN;
        while at < file.len() {
            let length = PCAP_RECORD_HEADER_LEN
                + u32::from_ne_bytes(file[at + 8..at + 12].try_into().unwrap()) as usize;
            records.push(&file[at..at + length]);
            at += length;
        }
        let mut out = file[..PCAP_HEADER_LEN].to_vec();
        for &i in indices {
            out.extend_from_slice(records[i]);
        }
        out
    }

    #[test]
    fn pcapng_keeps_headers_and_filters_packets_by_interface_linktype() {
        let file = pcapng_file(&[b"keep", b"drop", b"keep too"]);
        for step in [1, 7, 64, 4096] {
            let (out, linktypes) = split(&file, step, |data| data.starts_with(b"keep"));
            assert_eq!(linktypes, [113, 113, 113]);
            let expected = {
                let mut expected = pcapng::file_header(113, 65535, true);
                for (i, packet) in [(0, b"keep".as_slice()), (2, b"keep too")] {
                    let comment = format!("pid={i}");
                    pcapng::append_packet(
                        &mut expected,
                        at(i),
                        true,
                        packet.len() as u32,
                        packet,
                        Some(&comment),
                    );
                }
                expected
            };
            assert_eq!(out, expected, "pieces of {step}");
        }
    }

    #[test]
    fn big_endian_pcap_is_read_in_its_order() {
        let mut file = Vec::new();
        file.extend_from_slice(&0xa1b2_c3d4u32.to_be_bytes());
        file.extend_from_slice(&[0, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]);
        file.extend_from_slice(&1u32.to_be_bytes()); // EN10MB
        file.extend_from_slice(&[0; 8]);
        file.extend_from_slice(&3u32.to_be_bytes());
        file.extend_from_slice(&3u32.to_be_bytes());
        file.extend_from_slice(b"abc");
        let (out, linktypes) = split(&file, 2, |data| data == b"abc");
        assert_eq!((out, linktypes), (file, vec![1]));
    }

    #[test]
    fn garbage_is_refused_not_waited_for() {
        let mut splitter = RecordSplitter::default();
        let error = splitter
            .feed(
                b"HTTP/1.1 200 OK\r\nServer: nginx\r\n",
                &mut Vec::new(),
                |_, _| true,
            )
            .unwrap_err();
        assert!(error.0.contains("neither pcap nor pcapng"), "{error}");

        let mut file = pcap::global_header(113, 65535, true);
        file.extend_from_slice(&[0; 8]);
        file.extend_from_slice(&u32::MAX.to_ne_bytes());
        file.extend_from_slice(&[0; 4]);
        let mut splitter = RecordSplitter::default();
        let error = splitter
            .feed(&file, &mut Vec::new(), |_, _| true)
            .unwrap_err();
        assert!(error.0.contains("claims"), "{error}");
    }

    #[test]
    fn a_packet_on_an_undescribed_interface_is_dropped() {
        let mut file = pcapng_file(&[]);
        let mut block = Vec::new();
        pcapng::append_packet(&mut block, at(0), true, 3, b"abc", None);
        block[8..12].copy_from_slice(&5u32.to_ne_bytes());
        file.extend_from_slice(&block);
        let (out, _) = split(&file, 10, |_| true);
        assert_eq!(out, pcapng_file(&[]));
    }
}
