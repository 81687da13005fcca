//! A packet socket without a ring: the first capture of a stream on the
//! `any` device until its first packets ([`super::growth`]).
//!
//! A libpcap capture's ring is memory the kernel commits when it opens:
//! four of libpcap's fixed 256 KiB blocks at the least (fewer lose packets
//! the ring has room for: [`super::source::SPROUT_RING`]), a megabyte for a
//! stream that may never see a packet. A packet socket without a ring
//! holds only what waits in its queue: an idle one costs the kernel a
//! socket and its filter, and the daemon a few KiB. It takes the packets
//! the stream's libpcap capture would (the same kernel program, on the
//! same device) and each is made into the record libpcap would give (its
//! Linux cooked header built from the socket address the kernel reports,
//! a VLAN tag put back, its stamp in nanoseconds), so that the grown
//! capture, which takes over at the first packets, continues the same
//! stream and its copies of the packets both took are known as such.
//!
//! The poller reads a queue as soon as packets come (one system call a
//! packet, where a ring hands over blocks: fine for the few packets before
//! the ring grows, not for a busy flow) and holds them as a ring's block
//! would ([`HeldBlock`]).

use std::io;
use std::mem::{size_of, zeroed};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use nix::libc;

use super::source::{CaptureStats, Instruction, PacketSink, Timestamp, attach_socket_filter};

/// The most a queue holds (the kernel's count of the packets' buffers),
/// asked with `SO_RCVBUFFORCE`: memory only while packets wait, and room
/// for a burst of a thousand datagrams or sixty 64 KiB segments before the
/// grown ring opens (a 1 MiB ring holds fifteen of those).
pub const QUEUE_BYTES: usize = 4 << 20;

/// The most packets one read of a queue hands over.
pub const PACKETS_PER_TURN: usize = 256;

/// A Linux cooked (v1) header's length.
const SLL_HDR_LEN: usize = 16;
/// A VLAN tag's length.
const VLAN_TAG_LEN: usize = 4;
const ETH_P_ALL: u16 = 0x0003;
const ETH_P_8021Q: u16 = 0x8100;
const TP_STATUS_VLAN_VALID: u32 = 1 << 4;
const TP_STATUS_VLAN_TPID_VALID: u32 = 1 << 6;
/// `SO_TIMESTAMPNS` (x86 and most others; its 64-bit `timespec` is the
/// one a 64-bit process gets anyway).
const SO_TIMESTAMPNS: libc::c_int = 35;

/// `struct tpacket_auxdata` (linux/if_packet.h).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct AuxData {
    status: u32,
    len: u32,
    snaplen: u32,
    mac: u16,
    net: u16,
    vlan_tci: u16,
    vlan_tpid: u16,
}

/// `struct tpacket_stats` (linux/if_packet.h).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct KernelStats {
    packets: u32,
    drops: u32,
}

/// What the kernel says of one packet besides its bytes: the socket
/// address fields that make its cooked header, and its VLAN tag.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Arrival {
    /// `sll_protocol`, as the kernel gives it (network byte order).
    pub protocol_be: u16,
    pub packet_type: u8,
    pub hardware_type: u16,
    pub address: [u8; 8],
    pub address_len: u8,
    /// (TPID, TCI) of a tag the device took off.
    pub vlan: Option<(u16, u16)>,
}

/// Writes the Linux cooked (v1) header libpcap gives this packet into
/// `header`, as libpcap's ring reader does: the packet and device types,
/// the link-layer address (its own bytes; the rest of the eight zero), and
/// the protocol; with a VLAN tag, the tag's TPID in the protocol field and
/// the tag and the packet's protocol after it. Returns the header's length
/// (pure).
pub fn cooked_header(arrival: &Arrival, header: &mut [u8; SLL_HDR_LEN + VLAN_TAG_LEN]) -> usize {
    header.fill(0);
    header[0..2].copy_from_slice(&u16::from(arrival.packet_type).to_be_bytes());
    header[2..4].copy_from_slice(&arrival.hardware_type.to_be_bytes());
    header[4..6].copy_from_slice(&u16::from(arrival.address_len).to_be_bytes());
    let own = usize::from(arrival.address_len).min(8);
    header[6..6 + own].copy_from_slice(&arrival.address[..own]);
    let protocol = arrival.protocol_be.to_ne_bytes();
    match arrival.vlan {
        None => {
            header[14..16].copy_from_slice(&protocol);
            SLL_HDR_LEN
        }
        Some((tpid, tci)) => {
            header[14..16].copy_from_slice(&tpid.to_be_bytes());
            header[16..18].copy_from_slice(&tci.to_be_bytes());
            header[18..20].copy_from_slice(&protocol);
            SLL_HDR_LEN + VLAN_TAG_LEN
        }
    }
}

/// The VLAN tag the kernel reports in a packet's auxiliary data, as
/// libpcap reads it (pure).
fn vlan_of(aux: &AuxData) -> Option<(u16, u16)> {
    let valid = aux.vlan_tci != 0 || aux.status & TP_STATUS_VLAN_VALID != 0;
    valid.then(|| {
        let tpid = if aux.vlan_tpid != 0 || aux.status & TP_STATUS_VLAN_TPID_VALID != 0 {
            aux.vlan_tpid
        } else {
            ETH_P_8021Q
        };
        (tpid, aux.vlan_tci)
    })
}

/// An open queue capture.
pub struct QueueCapture {
    socket: OwnedFd,
    snaplen: usize,
}

impl AsFd for QueueCapture {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }
}

fn check(result: libc::c_int) -> io::Result<()> {
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Sets an integer socket option.
fn set_int(
    fd: &OwnedFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: an int the kernel copies, with its size.
    check(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            std::ptr::from_ref(&value).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
}

impl QueueCapture {
    /// Opens, in the calling thread's network namespace, a packet socket
    /// on every interface of it that takes what `program` (a kernel
    /// program for packets without a link-layer header: the cooked
    /// capture's, [`super::source::cooked_for_kernel`]) takes, each cut to
    /// `snaplen` bytes with its cooked header. The program is on before
    /// the socket takes its first packet.
    pub fn open(program: &[Instruction], snaplen: u32) -> io::Result<QueueCapture> {
        // Protocol 0: the socket takes nothing until it is bound below,
        // with its filter on.
        // SAFETY: plain socket(2); the descriptor is owned at once.
        let raw = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            )
        };
        check(raw)?;
        // SAFETY: a descriptor just made and owned by nothing else.
        let socket = unsafe { OwnedFd::from_raw_fd(raw) };
        attach_socket_filter(socket.as_raw_fd(), program)?;
        let queue = libc::c_int::try_from(QUEUE_BYTES).unwrap_or(libc::c_int::MAX);
        if set_int(&socket, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, queue).is_err() {
            // Without CAP_NET_ADMIN: as much as net.core.rmem_max allows.
            set_int(&socket, libc::SOL_SOCKET, libc::SO_RCVBUF, queue)?;
        }
        set_int(&socket, libc::SOL_SOCKET, SO_TIMESTAMPNS, 1)?;
        set_int(&socket, libc::SOL_PACKET, libc::PACKET_AUXDATA, 1)?;
        // SAFETY: a zeroed sockaddr_ll is valid; the fields set are plain.
        let mut address: libc::sockaddr_ll = unsafe { zeroed() };
        address.sll_family = libc::AF_PACKET as u16;
        address.sll_protocol = ETH_P_ALL.to_be();
        address.sll_ifindex = 0;
        // SAFETY: a sockaddr_ll with its size.
        check(unsafe {
            libc::bind(
                socket.as_raw_fd(),
                std::ptr::from_ref(&address).cast(),
                size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        })?;
        Ok(QueueCapture {
            socket,
            snaplen: usize::try_from(snaplen).unwrap_or(usize::MAX),
        })
    }

    /// Swaps the kernel program in at once.
    pub fn set_program(&self, program: &[Instruction]) -> io::Result<()> {
        attach_socket_filter(self.socket.as_raw_fd(), program)
    }

    /// Hands what waits in the queue (at most a turn's worth) to `take`,
    /// each packet as one record in `buffer` (the poller's, grown here to
    /// the snaplen), until `take` says it has enough; how many. `Ok(0)`:
    /// nothing waited.
    pub fn read(
        &self,
        buffer: &mut Vec<u8>,
        take: &mut dyn FnMut(Timestamp, u32, &[u8]) -> bool,
    ) -> io::Result<usize> {
        let room = SLL_HDR_LEN + VLAN_TAG_LEN + self.snaplen.min(MAX_PACKET);
        if buffer.len() < room {
            buffer.resize(room, 0);
        }
        let mut read = 0;
        while read < PACKETS_PER_TURN {
            let Some((arrival, timestamp, length)) =
                self.receive(&mut buffer[SLL_HDR_LEN + VLAN_TAG_LEN..room])?
            else {
                break;
            };
            read += 1;
            let mut header = [0u8; SLL_HDR_LEN + VLAN_TAG_LEN];
            let header_len = cooked_header(&arrival, &mut header);
            let start = SLL_HDR_LEN + VLAN_TAG_LEN - header_len;
            buffer[start..SLL_HDR_LEN + VLAN_TAG_LEN].copy_from_slice(&header[..header_len]);
            let original = header_len + length;
            let taken = (room - start).min(original).min(self.snaplen);
            let more = take(
                timestamp,
                u32::try_from(original).unwrap_or(u32::MAX),
                &buffer[start..start + taken],
            );
            if !more {
                break;
            }
        }
        Ok(read)
    }

    /// One packet from the queue into `data`: what the kernel said of it,
    /// its stamp, and its whole length (more than `data` took when cut).
    fn receive(&self, data: &mut [u8]) -> io::Result<Option<(Arrival, Timestamp, usize)>> {
        // SAFETY: zeroed plain C structs are valid.
        let mut from: libc::sockaddr_ll = unsafe { zeroed() };
        // Room for a timespec and an auxdata message, aligned for cmsghdr.
        let mut control = [0u64; 16];
        let mut iov = libc::iovec {
            iov_base: data.as_mut_ptr().cast(),
            iov_len: data.len(),
        };
        // SAFETY: as above.
        let mut message: libc::msghdr = unsafe { zeroed() };
        message.msg_name = std::ptr::from_mut(&mut from).cast();
        message.msg_namelen = size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        message.msg_iov = &raw mut iov;
        message.msg_iovlen = 1;
        message.msg_control = control.as_mut_ptr().cast();
        message.msg_controllen = size_of::<[u64; 16]>();
        // SAFETY: every pointer in `message` is to a live buffer of the
        // length given; MSG_TRUNC makes the result the packet's length.
        let length = unsafe {
            libc::recvmsg(
                self.socket.as_raw_fd(),
                &raw mut message,
                libc::MSG_TRUNC | libc::MSG_DONTWAIT,
            )
        };
        if length < 0 {
            let err = io::Error::last_os_error();
            return match err.kind() {
                io::ErrorKind::WouldBlock => Ok(None),
                io::ErrorKind::Interrupted => Ok(None),
                _ => Err(err),
            };
        }
        let mut timestamp = None;
        let mut aux = AuxData::default();
        // SAFETY: the kernel wrote msg_controllen bytes of control messages
        // into `control`; the CMSG macros walk within them, and each is
        // read unaligned with its type's size checked against its length.
        unsafe {
            let mut cmsg = libc::CMSG_FIRSTHDR(&raw const message);
            while !cmsg.is_null() {
                let header = &*cmsg;
                let data = libc::CMSG_DATA(cmsg);
                let len = header.cmsg_len as usize;
                if header.cmsg_level == libc::SOL_SOCKET
                    && header.cmsg_type == SO_TIMESTAMPNS
                    && len >= libc::CMSG_LEN(size_of::<libc::timespec>() as u32) as usize
                {
                    timestamp = Some(std::ptr::read_unaligned(data.cast::<libc::timespec>()));
                } else if header.cmsg_level == libc::SOL_PACKET
                    && header.cmsg_type == libc::PACKET_AUXDATA
                    && len >= libc::CMSG_LEN(size_of::<AuxData>() as u32) as usize
                {
                    aux = std::ptr::read_unaligned(data.cast::<AuxData>());
                }
                cmsg = libc::CMSG_NXTHDR(&raw const message, cmsg);
            }
        }
        let timestamp = match timestamp {
            Some(stamp) => Timestamp {
                seconds: u32::try_from(stamp.tv_sec).unwrap_or(0),
                fraction: u32::try_from(stamp.tv_nsec).unwrap_or(0),
            },
            None => now(),
        };
        let address_len = from.sll_halen.min(8);
        let arrival = Arrival {
            protocol_be: from.sll_protocol,
            packet_type: from.sll_pkttype,
            hardware_type: from.sll_hatype,
            address: from.sll_addr,
            address_len,
            vlan: vlan_of(&aux),
        };
        Ok(Some((
            arrival,
            timestamp,
            usize::try_from(length).unwrap_or(0),
        )))
    }

    /// The kernel's counts: packets the filter took, and those the full
    /// queue dropped (as libpcap reports a ring's).
    pub fn stats(&self) -> CaptureStats {
        let mut stats = KernelStats::default();
        let mut size = size_of::<KernelStats>() as libc::socklen_t;
        // SAFETY: a tpacket_stats-sized buffer with its size.
        let result = unsafe {
            libc::getsockopt(
                self.socket.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_STATISTICS,
                std::ptr::from_mut(&mut stats).cast(),
                &raw mut size,
            )
        };
        if result < 0 {
            return CaptureStats::default();
        }
        CaptureStats {
            received: stats.packets,
            dropped_by_kernel: stats.drops,
            dropped_by_interface: 0,
        }
    }
}

/// A queue capture's packets as the poller holds them, read from the
/// kernel at once (the queue never fills while the daemon runs) and handed
/// over as a ring's block would be: once the first is a block timeout old,
/// or once they fill a block (pure).
///
/// The first queue captures handed each packet over as it came, and the
/// accuracy harness then gave a forked child's flows to the parent's `all`
/// and missed most of the child's 0.1 ms flows in `tree` (the cause was
/// not pinned down: some timing between the per-packet reads and the
/// kernel events' reader). Held as a ring holds them, a process stream's
/// sorting sees the timing it always has, and a burst costs one hand-over.
#[derive(Default)]
pub struct HeldBlock {
    bytes: Vec<u8>,
    /// Each packet's stamp, length, and where its bytes are.
    records: Vec<(Timestamp, u32, std::ops::Range<usize>)>,
    /// When its first packet was read.
    since: Option<std::time::Instant>,
}

/// A ring's block: what a held block hands over once it holds as much.
pub const BLOCK_BYTES: usize = 256 << 10;

impl HeldBlock {
    pub fn push(
        &mut self,
        timestamp: Timestamp,
        original_length: u32,
        data: &[u8],
        now: std::time::Instant,
    ) {
        let start = self.bytes.len();
        self.bytes.extend_from_slice(data);
        self.records
            .push((timestamp, original_length, start..self.bytes.len()));
        self.since.get_or_insert(now);
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    pub fn full(&self) -> bool {
        self.bytes.len() >= BLOCK_BYTES
    }

    /// When it is to be handed over, `hold` after its first packet.
    pub fn due(&self, hold: std::time::Duration) -> Option<std::time::Instant> {
        self.since.map(|since| since + hold)
    }

    /// Hands every packet to `sink`, in the order read; whether there was
    /// any. The memory is kept for the next block, up to a block's.
    pub fn hand_over(&mut self, sink: &dyn PacketSink) -> bool {
        let handed = !self.records.is_empty();
        for (timestamp, original_length, range) in self.records.drain(..) {
            sink.packet(timestamp, original_length, &self.bytes[range]);
        }
        self.bytes.clear();
        if self.bytes.capacity() > 2 * BLOCK_BYTES {
            self.bytes.shrink_to(BLOCK_BYTES);
        }
        self.since = None;
        handed
    }
}

/// The largest packet a queue takes whole: a loopback GSO packet (64 KiB)
/// with room to spare; larger ones (BIG TCP) are cut, their length kept.
const MAX_PACKET: usize = 256 << 10;

/// The time now, for a packet the kernel gave no stamp (it always does).
fn now() -> Timestamp {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    Timestamp {
        seconds: u32::try_from(since.as_secs()).unwrap_or(0),
        fraction: since.subsec_nanos(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loopback_packet_gets_the_header_libpcap_gives_it() {
        // An incoming IPv4 packet on lo: packet type 0 (host), device type
        // 772, a six-byte all-zero address, protocol 0x0800.
        let arrival = Arrival {
            protocol_be: 0x0800u16.to_be(),
            packet_type: 0,
            hardware_type: 772,
            address: [0xaa; 8],
            address_len: 6,
            vlan: None,
        };
        let mut header = [0xffu8; 20];
        assert_eq!(cooked_header(&arrival, &mut header), 16);
        assert_eq!(
            &header[..16],
            &[
                0, 0, 3, 4, 0, 6, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0, 0, 8, 0
            ]
        );
    }

    #[test]
    fn a_tag_the_device_took_off_is_put_back_before_the_protocol() {
        let arrival = Arrival {
            protocol_be: 0x86ddu16.to_be(),
            packet_type: 4,
            hardware_type: 1,
            address: [1, 2, 3, 4, 5, 6, 7, 8],
            address_len: 6,
            vlan: Some((0x8100, 0x0064)),
        };
        let mut header = [0u8; 20];
        assert_eq!(cooked_header(&arrival, &mut header), 20);
        assert_eq!(
            header,
            [
                0, 4, 0, 1, 0, 6, 1, 2, 3, 4, 5, 6, 0, 0, 0x81, 0, 0, 0x64, 0x86, 0xdd
            ]
        );
    }

    /// Records what it is handed.
    #[derive(Default)]
    struct Collected(std::sync::Mutex<Vec<(u32, u32, Vec<u8>)>>);

    impl PacketSink for Collected {
        fn packet(&self, timestamp: Timestamp, original_length: u32, data: &[u8]) {
            self.0
                .lock()
                .unwrap()
                .push((timestamp.fraction, original_length, data.to_vec()));
        }
        fn batch_end(&self) {}
        fn ended(&self, _stats: CaptureStats) {}
    }

    #[test]
    fn held_packets_go_out_in_order_a_block_timeout_after_the_first_or_once_a_block_is_full() {
        let start = std::time::Instant::now();
        let hold = std::time::Duration::from_millis(8);
        let stamp = |fraction| Timestamp {
            seconds: 1,
            fraction,
        };
        let mut block = HeldBlock::default();
        assert!(block.is_empty() && block.due(hold).is_none());
        block.push(stamp(1), 100, b"first", start);
        block.push(
            stamp(2),
            200,
            b"second",
            start + std::time::Duration::from_millis(5),
        );
        // Due a block timeout after the first packet, not the last.
        assert_eq!(block.due(hold), Some(start + hold));
        assert!(!block.full());
        let sink = Collected::default();
        assert!(block.hand_over(&sink));
        assert_eq!(
            *sink.0.lock().unwrap(),
            vec![(1, 100, b"first".to_vec()), (2, 200, b"second".to_vec())]
        );
        assert!(block.is_empty() && block.due(hold).is_none());
        assert!(!block.hand_over(&sink));
        // A block's worth is full at once.
        let big = vec![7u8; 64 << 10];
        for index in 0..4 {
            assert!(!block.full());
            block.push(stamp(index), big.len() as u32, &big, start);
        }
        assert!(block.full());
    }

    #[test]
    fn the_tag_is_read_as_libpcap_reads_it() {
        let none = AuxData::default();
        assert_eq!(vlan_of(&none), None);
        // A tag of zero said valid; no TPID: 802.1Q.
        let valid = AuxData {
            status: TP_STATUS_VLAN_VALID,
            ..AuxData::default()
        };
        assert_eq!(vlan_of(&valid), Some((0x8100, 0)));
        let qinq = AuxData {
            status: TP_STATUS_VLAN_VALID | TP_STATUS_VLAN_TPID_VALID,
            vlan_tci: 7,
            vlan_tpid: 0x88a8,
            ..AuxData::default()
        };
        assert_eq!(vlan_of(&qinq), Some((0x88a8, 7)));
    }
}
