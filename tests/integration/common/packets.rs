//! Decoding a stream read from the mount: libpcap's own reader for the
//! file format, etherparse for the headers.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use etherparse::{EtherType, NetSlice, SlicedPacket, TransportSlice};

/// One packet as a test looks at it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Seen {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub tcp_flags: String,
    /// TCP sequence and acknowledgment numbers (0 for UDP).
    pub seq: u32,
    pub ack: u32,
    pub payload: Vec<u8>,
}

impl Seen {
    pub fn is(&self, src: SocketAddr, dst: SocketAddr) -> bool {
        self.src == src && self.dst == dst
    }
    pub fn payload_text(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }
}

/// The payloads of the packets that carry one, as text, in stream order.
pub fn payloads(packets: &[Seen]) -> Vec<String> {
    packets
        .iter()
        .filter(|p| !p.payload.is_empty())
        .map(Seen::payload_text)
        .collect()
}

/// The link type and packets of a pcap stream saved at `path`. Every
/// stream a test reads goes through here, so every stream test checks that
/// no record comes twice: the same capture time and the same bytes are one
/// packet delivered twice (a retransmission has another time).
pub fn read_pcap_file(path: &Path) -> (i32, Vec<Seen>) {
    let mut capture = pcap::Capture::from_file_with_precision(path, pcap::Precision::Nano)
        .expect("a valid pcap file");
    let linktype = capture.get_datalink().0;
    let mut packets = Vec::new();
    let mut records = HashSet::new();
    loop {
        match capture.next_packet() {
            Ok(packet) => {
                let time = (packet.header.ts.tv_sec, packet.header.ts.tv_usec);
                let seen = decode(linktype, packet.data);
                assert!(
                    records.insert((time, packet.data.to_vec())),
                    "a record twice in {}: {seen:?} at {time:?}",
                    path.display()
                );
                packets.push(seen);
            }
            Err(pcap::Error::NoMorePackets) => break,
            Err(err) => panic!("bad record: {err}"),
        }
    }
    (linktype, packets)
}

/// The link type and packets of pcap stream bytes; a record cut short at
/// the end (a stream read mid-way) is left out.
pub fn read_pcap(bytes: &[u8]) -> (i32, Vec<Seen>) {
    let bytes = &bytes[..complete_prefix(bytes)];
    if bytes.is_empty() {
        return (0, Vec::new());
    }
    let scratch = super::ScratchDir::new("pcap");
    let path = scratch.0.join("stream.pcap");
    std::fs::write(&path, bytes).unwrap();
    read_pcap_file(&path)
}

fn decode(linktype: i32, data: &[u8]) -> Seen {
    let sliced = match linktype {
        // LINUX_SLL: a 16-byte cooked header whose last two bytes are the
        // EtherType (etherparse's own SLL reader rejects loopback packets).
        113 => SlicedPacket::from_ether_type(
            EtherType(u16::from_be_bytes([data[14], data[15]])),
            &data[16..],
        ),
        // LINUX_SLL2 (tcpdump's own on `any`): 20 bytes, the EtherType first.
        276 => SlicedPacket::from_ether_type(
            EtherType(u16::from_be_bytes([data[0], data[1]])),
            &data[20..],
        ),
        1 => SlicedPacket::from_ethernet(data),
        other => panic!("unexpected link type {other}"),
    }
    .expect("a parsable packet");
    let (src_ip, dst_ip): (IpAddr, IpAddr) = match sliced.net.expect("an IP packet") {
        NetSlice::Ipv4(ip) => (
            ip.header().source_addr().into(),
            ip.header().destination_addr().into(),
        ),
        NetSlice::Ipv6(ip) => (
            ip.header().source_addr().into(),
            ip.header().destination_addr().into(),
        ),
        NetSlice::Arp(_) => panic!("ARP in a socket stream"),
    };
    match sliced.transport.expect("a transport header") {
        TransportSlice::Tcp(tcp) => {
            let mut flags = String::new();
            for (set, letter) in [
                (tcp.syn(), 'S'),
                (tcp.fin(), 'F'),
                (tcp.rst(), 'R'),
                (tcp.psh(), 'P'),
                (tcp.ack(), '.'),
            ] {
                if set {
                    flags.push(letter);
                }
            }
            Seen {
                src: SocketAddr::new(src_ip, tcp.source_port()),
                dst: SocketAddr::new(dst_ip, tcp.destination_port()),
                tcp_flags: flags,
                seq: tcp.sequence_number(),
                ack: tcp.acknowledgment_number(),
                payload: tcp.payload().to_vec(),
            }
        }
        TransportSlice::Udp(udp) => Seen {
            src: SocketAddr::new(src_ip, udp.source_port()),
            dst: SocketAddr::new(dst_ip, udp.destination_port()),
            tcp_flags: String::new(),
            seq: 0,
            ack: 0,
            payload: udp.payload().to_vec(),
        },
        other => panic!("unexpected transport {other:?}"),
    }
}

/// The length of the longest prefix made of the global header and whole
/// records.
fn complete_prefix(bytes: &[u8]) -> usize {
    let mut end = 24;
    if bytes.len() < end {
        return 0;
    }
    loop {
        let Some(header) = bytes.get(end..end + 16) else {
            return end;
        };
        let captured = u32::from_ne_bytes(header[8..12].try_into().unwrap()) as usize;
        if bytes.len() < end + 16 + captured {
            return end;
        }
        end += 16 + captured;
    }
}

/// The options of the last interface statistics block of a pcapng stream
/// (native byte order, as the daemon writes it): code → value for the
/// 64-bit counters, and the comment.
pub fn pcapng_end_statistics(
    bytes: &[u8],
) -> Option<(std::collections::HashMap<u16, u64>, String)> {
    let u32_at = |at: usize| Some(u32::from_ne_bytes(bytes.get(at..at + 4)?.try_into().ok()?));
    let mut at = 0;
    let mut found = None;
    while let (Some(kind), Some(length)) = (u32_at(at), u32_at(at + 4)) {
        let length = length as usize;
        if length < 12 || at + length > bytes.len() {
            break;
        }
        if kind == 5 {
            found = Some(&bytes[at..at + length]);
        }
        at += length;
    }
    let block = found?;
    // Interface id, timestamp high and low, then options.
    let mut options = 20;
    let mut counters = std::collections::HashMap::new();
    let mut comment = String::new();
    while options + 4 <= block.len() - 4 {
        let code = u16::from_ne_bytes(block[options..options + 2].try_into().ok()?);
        let length = u16::from_ne_bytes(block[options + 2..options + 4].try_into().ok()?) as usize;
        let value = block.get(options + 4..options + 4 + length)?;
        match (code, length) {
            (0, _) => break,
            (1, _) => comment = String::from_utf8_lossy(value).into_owned(),
            (_, 8) => {
                counters.insert(code, u64::from_ne_bytes(value.try_into().ok()?));
            }
            _ => {}
        }
        options += 4 + length.div_ceil(4) * 4;
    }
    Some((counters, comment))
}

/// How `got` differs from `expected` (payloads in order), said briefly:
/// which are missing, which are extra, which came twice, or that the
/// order differs. `None` when they are the same.
pub fn payload_difference(got: &[String], expected: &[String]) -> Option<String> {
    if got == expected {
        return None;
    }
    let wanted: HashSet<&String> = expected.iter().collect();
    let mut seen = HashSet::new();
    let twice: Vec<&String> = got.iter().filter(|p| !seen.insert(*p)).collect();
    let missing: Vec<&String> = expected.iter().filter(|p| !seen.contains(p)).collect();
    let extra: Vec<&String> = got.iter().filter(|p| !wanted.contains(p)).collect();
    let mut said = format!("{} payloads, {} expected", got.len(), expected.len());
    for (what, list) in [("missing", missing), ("extra", extra), ("twice", twice)] {
        if !list.is_empty() {
            let shown: Vec<&String> = list.iter().take(20).copied().collect();
            said.push_str(&format!("; {} {what}: {shown:?}", list.len()));
        }
    }
    if !said.contains(';') {
        said.push_str("; the same payloads in another order");
    }
    Some(said)
}
