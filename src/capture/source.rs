//! Opening a live capture: one libpcap handle in the socket's network
//! namespace, its ring sized and timed for the stream, its kernel filter
//! made there (where the namespace's own addresses are known). The handle
//! is then served by the daemon's capture threads ([`super::service`]),
//! which hand each packet to a [`PacketSink`]; other threads talk to a
//! running capture only through its [`CaptureControl`].

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::time::Duration;

use log::debug;
use pcap::{Active, Capture, Precision};

use super::filter::{FilterTarget, LocalNetwork, Taken, bpf_filter_for, without_taken};
use super::queue::QueueCapture;
pub use super::service::{CaptureControl, start};
use crate::inventory::Netns;

/// How late a trickle's packet may reach the reader: the block timeout, by
/// default (a live view, `wireshark -k -i <(cat …)`, sees each packet
/// within it).
///
/// Not libpcap's immediate mode: that switches to TPACKET_V2, whose ring on
/// the "any" device holds one snaplen-sized frame per packet (a handful with
/// a few MiB and a 256 KiB snaplen), so a burst of a few small packets is
/// dropped. TPACKET_V3 packs packets by their real size into blocks of 256
/// KiB (libpcap's fixed size) and hands a block over when it is full or when
/// the block timeout fires with packets in it. At a trickle every timeout
/// hands over a nearly empty block, so a ring of N blocks rides out N
/// timeouts of a stalled daemon (stopped, starved, swapping): 32 blocks
/// (the grown ring of 8 MiB) at 8 ms, 256 ms; a busy flow fills its blocks
/// long before their timeout, and the ring holds 8 MiB of it. A stream
/// opens without a ring on the `any` device ([`super::queue`]), with one
/// of [`SPROUT_RING`] on another, and gets its full ring once packets come
/// ([`super::growth`]; [`grows`] says which streams do).
pub const LIVE_DELAY: Duration = Duration::from_millis(8);
/// libpcap's TPACKET_V3 block: room for one packet of its largest snaplen.
const BLOCK_BYTES: usize = 256 << 10;
/// A stream's ring until its first packets, where it cannot start
/// without one (a device other than `any`): four blocks, the fewest the
/// kernel fills without losing packets it has room for. Before it takes a
/// packet, the kernel checks without a lock whether the block a quarter of
/// the ring ahead is free (`__packet_rcv_has_room`); with fewer than four
/// blocks that is the block being filled itself, which for a moment, while
/// it is handed over (its timeout fired or it is full), is the reader's:
/// a packet arriving on another CPU just then is dropped, and counted. With
/// three blocks a 1,000-datagram burst lost one or two packets in about one
/// stream of five (no freeze of the ring: the kernel said so); with four,
/// none in the same runs.
pub const SPROUT_RING: usize = 4 * BLOCK_BYTES;

/// The shortest block timeout (a prompt capture's): not a wake-up per
/// packet.
const SHORTEST_TIMEOUT: Duration = Duration::from_millis(2);

/// How a capture's ring is sized: small until the stream's first packets,
/// then grown ([`super::growth`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RingStage {
    Sprout,
    Grown,
}

/// A capture's full ring size (pure).
fn full_ring(request: &CaptureRequest, settings: &CaptureSettings) -> usize {
    // A process's stream takes every TCP and UDP packet of the namespace,
    // far more than one socket's.
    match request.filter {
        CaptureFilter::TcpAndUdp | CaptureFilter::Everything => {
            settings.kernel_buffer.max(PROCESS_RING)
        }
        CaptureFilter::Socket(..) | CaptureFilter::Exact(_) => settings.kernel_buffer,
    }
}

/// Whether a capture starts small and grows: any whose full ring is
/// larger, so that an idle stream holds a megabyte of kernel ring, not its
/// full size (an idle `all` held 8 MiB). An `all` or `tree` capture takes
/// in its namespace's traffic, so it grows as soon as the namespace has
/// some, its process's or not. Not a prompt capture's (following /proc):
/// its 2 ms blocks would let the small ring ride out only 8 ms of a
/// stalled daemon before the full one takes over, and it starts full.
pub fn grows(request: &CaptureRequest, settings: &CaptureSettings) -> bool {
    let small_first = match request.filter {
        CaptureFilter::Socket(..) => true,
        CaptureFilter::TcpAndUdp | CaptureFilter::Everything => !request.prompt,
        CaptureFilter::Exact(_) => false,
    };
    small_first && full_ring(request, settings) > SPROUT_RING
}

/// A capture's ring size and block timeout (pure).
fn geometry(request: &CaptureRequest, settings: &CaptureSettings) -> (usize, Duration) {
    let full = full_ring(request, settings);
    let ring = match request.stage {
        RingStage::Sprout => SPROUT_RING.min(full),
        RingStage::Grown => full,
    };
    let timeout = match (request.prompt, settings.max_delay) {
        (true, _) => SHORTEST_TIMEOUT,
        (false, Some(asked)) => asked.max(Duration::from_millis(1)),
        (false, None) => LIVE_DELAY,
    };
    (ring, timeout)
}

/// How long a stalled daemon a ring of `ring` bytes rides out at a trickle
/// with block timeout `timeout` (pure): a block a timeout.
pub fn stall_span(ring: usize, timeout: Duration) -> Duration {
    timeout * u32::try_from((ring / BLOCK_BYTES).max(1)).unwrap_or(u32::MAX)
}

/// The least kernel ring of an `all` or `tree` stream's captures.
pub const PROCESS_RING: usize = 8 << 20;

/// How every capture is opened (from the command line).
#[derive(Clone, Debug)]
pub struct CaptureSettings {
    /// "any" by default: every interface of the namespace.
    pub interface: String,
    pub snaplen: u32,
    /// Bytes of the kernel's packet ring per capture.
    pub kernel_buffer: usize,
    /// The block timeout asked for (`--max-delay`), instead of the ring's
    /// stall-proof one.
    pub max_delay: Option<Duration>,
}

impl CaptureSettings {
    /// The link type the streams will carry, as far as the daemon's own
    /// namespace tells (a socket's namespace may name the interface for a
    /// device of another kind; the stream's own header is what counts).
    pub fn expected_linktype(&self) -> u32 {
        let arphrd = std::fs::read_to_string(format!("/sys/class/net/{}/type", self.interface))
            .ok()
            .and_then(|text| text.trim().parse().ok());
        linktype_for(&self.interface, arphrd)
    }
}

/// The link type libpcap gives a capture on `interface`, from the device's
/// ARPHRD type (pure): `any` is Linux cooked mode; libpcap falls back to
/// cooked mode for device kinds it has no header for.
pub fn linktype_for(interface: &str, arphrd: Option<u16>) -> u32 {
    const LINUX_SLL: u32 = 113;
    if interface == "any" {
        return LINUX_SLL;
    }
    match arphrd {
        // Ethernet, and loopback, which libpcap shows as Ethernet.
        Some(1 | 772) => 1,
        // A device without link-layer header (tun, wireguard): raw IP.
        Some(65534) => 12,
        Some(801) => 105,
        Some(803) => 127,
        _ => LINUX_SLL,
    }
}

/// What to capture.
pub struct CaptureRequest {
    /// The namespace to capture in (the daemon's own included: the capture
    /// thread enters it whatever its spawner was in).
    pub netns: Netns,
    /// What to keep; the filter is made inside the namespace, where its own
    /// addresses are known.
    pub filter: CaptureFilter,
    /// For log lines: which file this capture feeds.
    pub label: String,
    /// Hand every block over within 2 ms (riding out a quarter of the
    /// stall): for a sorter that must see a flow's packets while its socket
    /// is still in /proc.
    pub prompt: bool,
    /// The ring's stage (a new capture starts small: [`super::growth`]).
    pub stage: RingStage,
}

/// Which packets a capture keeps.
#[derive(Clone, Debug)]
pub enum CaptureFilter {
    /// One socket's traffic, but for the flows more specific sockets take.
    Socket(FilterTarget, Vec<Taken>),
    /// Every TCP and UDP packet of the namespace, for a process's `all`
    /// stream to sort in user space.
    TcpAndUdp,
    /// This filter, as a capture that replaces another had it last.
    Exact(String),
    /// Every packet of the namespace: a container's or a pod's `all`.
    Everything,
}

/// A packet's capture time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timestamp {
    pub seconds: u32,
    /// Nanoseconds when [`Opened::nanosecond_timestamps`], else microseconds.
    pub fraction: u32,
}

/// Where packets go. Called on a capture poller thread, one capture's
/// calls never at once.
pub trait PacketSink: Send + Sync + 'static {
    fn packet(&self, timestamp: Timestamp, original_length: u32, data: &[u8]);
    /// A batch of packets (one kernel block) has been handed over: the
    /// moment to wake readers, once per batch rather than per packet.
    fn batch_end(&self);
    /// The capture ended (stopped, or failed after starting).
    fn ended(&self, stats: CaptureStats);
}

/// The kernel's counts at the end of a capture.
#[derive(Clone, Copy, Debug, Default)]
pub struct CaptureStats {
    pub received: u32,
    pub dropped_by_kernel: u32,
    pub dropped_by_interface: u32,
}

/// A capture that opened.
pub struct Opened {
    /// The DLT/LINKTYPE of every record.
    pub linktype: i32,
    pub snaplen: u32,
    pub nanosecond_timestamps: bool,
    pub control: CaptureControl,
    /// The namespace's own addresses, as the capture found them there.
    pub local_networks: Vec<LocalNetwork>,
    /// The longest the kernel holds a packet before handing it over (a
    /// queue's: the ring's that takes over from it).
    pub block_timeout: Duration,
    /// The kernel ring's size, in bytes: 0 for a queue without a ring
    /// ([`super::queue`]).
    pub ring_bytes: usize,
}

impl Opened {
    /// The capture's ring and delay, as a log line says them.
    pub fn describe(&self) -> String {
        if self.ring_bytes == 0 {
            return format!(
                "no ring until its first packets (a queue of up to {} KiB), packets handed over within {:?}",
                super::queue::QUEUE_BYTES >> 10,
                self.block_timeout
            );
        }
        format!(
            "a {} KiB ring, packets handed over within {:?}",
            self.ring_bytes >> 10,
            self.block_timeout
        )
    }
}

/// Why a capture did not open.
#[derive(Clone, Debug)]
pub enum CaptureError {
    /// The daemon lacks the capability to capture (CAP_NET_RAW).
    Permission(String),
    /// The socket's namespace could not be entered (CAP_SYS_ADMIN).
    Namespace(String),
    /// The filter was refused, the device is missing, or libpcap failed.
    Failed(String),
}

/// What an opened capture is, before a poller takes it.
pub(super) struct Details {
    linktype: i32,
    snaplen: u32,
    nanosecond_timestamps: bool,
    local_networks: Vec<LocalNetwork>,
    block_timeout: Duration,
    ring_bytes: usize,
}

impl Details {
    pub(super) fn linktype(&self) -> i32 {
        self.linktype
    }

    pub(super) fn block_timeout(&self) -> Duration {
        self.block_timeout
    }

    pub(super) fn with_control(self, control: CaptureControl) -> Opened {
        Opened {
            linktype: self.linktype,
            snaplen: self.snaplen,
            nanosecond_timestamps: self.nanosecond_timestamps,
            control,
            local_networks: self.local_networks,
            block_timeout: self.block_timeout,
            ring_bytes: self.ring_bytes,
        }
    }
}

/// An open capture, as a poller reads it: libpcap's, with its ring, or a
/// stream's first one on the `any` device, a packet socket without a ring
/// ([`super::queue`]).
pub(super) enum Source {
    Ring(Capture<Active>),
    Queue(QueueCapture),
}

impl AsFd for Source {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Source::Ring(capture) => capture.as_fd(),
            Source::Queue(queue) => queue.as_fd(),
        }
    }
}

impl Source {
    /// The kernel's counts, as the capture ends.
    pub(super) fn stats(&mut self) -> CaptureStats {
        match self {
            Source::Ring(capture) => capture
                .stats()
                .map(|stat| CaptureStats {
                    received: stat.received,
                    dropped_by_kernel: stat.dropped,
                    dropped_by_interface: stat.if_dropped,
                })
                .unwrap_or_default(),
            Source::Queue(queue) => queue.stats(),
        }
    }

    /// Replaces a running capture's filter ([`replace_filter`]).
    pub(super) fn replace_filter(
        &mut self,
        filter: &str,
        linktype: i32,
    ) -> Result<(), pcap::Error> {
        match self {
            Source::Ring(capture) => replace_filter(capture, filter, linktype),
            Source::Queue(queue) => {
                let program = queue_program(filter)?.ok_or_else(|| {
                    pcap::Error::PcapError("the kernel cannot run this filter".into())
                })?;
                queue
                    .set_program(&program)
                    .map_err(|err| pcap::Error::PcapError(err.to_string()))
            }
        }
    }
}

/// The kernel program a queue capture runs for `filter`: the cooked
/// capture's ([`kernel_program`]), or `None` where the kernel cannot run
/// it.
fn queue_program(filter: &str) -> Result<Option<Vec<Instruction>>, pcap::Error> {
    let cooked = Capture::dead(pcap::Linktype(LINKTYPE_LINUX_SLL))?;
    kernel_program(&cooked, filter, LINKTYPE_LINUX_SLL)
}

/// Opens the capture in the request's namespace, which the calling thread
/// enters (and stays in): the capture, with its link type, whether
/// timestamps are in nanoseconds, and the namespace's own addresses. A
/// stream's first capture on the `any` device is a queue without a ring:
/// an idle stream holds no ring at all.
pub(super) fn open(
    request: CaptureRequest,
    settings: &CaptureSettings,
) -> Result<(Source, Details), CaptureError> {
    request.netns.enter().map_err(|err| {
        CaptureError::Namespace(format!(
            "cannot enter network namespace {}: {err}",
            request.netns.id()
        ))
    })?;
    let local_networks = local_networks();
    let filter = match &request.filter {
        CaptureFilter::Socket(target, taken) => bpf_filter_for(target, &local_networks)
            .map(|filter| without_taken(filter, taken))
            .map_err(|unsupported| CaptureError::Failed(unsupported.0))?,
        CaptureFilter::TcpAndUdp => "tcp or udp".to_owned(),
        CaptureFilter::Exact(filter) => filter.clone(),
        CaptureFilter::Everything => String::new(),
    };
    debug!("{}: capture filter: {filter:?}", request.label);
    let (ring, timeout) = geometry(&request, settings);
    if request.stage == RingStage::Sprout && settings.interface == "any" {
        let program = queue_program(&filter)
            .map_err(|err| CaptureError::Failed(format!("filter {filter:?} refused: {err}")))?;
        // A filter the kernel cannot run (none of ours) gets a ring.
        if let Some(program) = program {
            let queue = QueueCapture::open(&program, settings.snaplen).map_err(|err| {
                let text = format!("cannot open a packet socket: {err}");
                if err.kind() == std::io::ErrorKind::PermissionDenied {
                    CaptureError::Permission(text)
                } else {
                    CaptureError::Failed(text)
                }
            })?;
            let details = Details {
                linktype: LINKTYPE_LINUX_SLL,
                snaplen: settings.snaplen,
                nanosecond_timestamps: true,
                local_networks,
                // As a ring's: the poller reads the queue that long after
                // its first packet, and the grown ring hands over within it.
                block_timeout: timeout,
                ring_bytes: 0,
            };
            return Ok((Source::Queue(queue), details));
        }
    }
    let snaplen = i32::try_from(settings.snaplen).unwrap_or(i32::MAX);
    let timeout_ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    let inactive = || {
        Capture::from_device(settings.interface.as_str())
            .map(|capture| {
                capture
                    .snaplen(snaplen)
                    .promisc(false)
                    .immediate_mode(false)
                    .timeout(timeout_ms)
                    .buffer_size(i32::try_from(ring).unwrap_or(i32::MAX))
            })
            .map_err(|err| {
                CaptureError::Failed(format!("no capture device {:?}: {err}", settings.interface))
            })
    };
    // Nanosecond timestamps where the kernel gives them, else microseconds.
    let (mut capture, nanos) = match inactive()?.precision(Precision::Nano).open() {
        Ok(capture) => (capture, true),
        Err(first) => match inactive()?.open() {
            Ok(capture) => (capture, false),
            Err(_) => {
                return Err(classify(first, &settings.interface, &request.netns.id()));
            }
        },
    };
    let linktype = capture.get_datalink().0;
    attach_filter(&mut capture, &filter, linktype)
        .map_err(|err| CaptureError::Failed(format!("filter {filter:?} refused: {err}")))?;
    let capture = capture
        .setnonblock()
        .map_err(|err| CaptureError::Failed(format!("cannot read without blocking: {err}")))?;
    let details = Details {
        linktype,
        snaplen: settings.snaplen,
        nanosecond_timestamps: nanos,
        local_networks,
        block_timeout: timeout,
        ring_bytes: ring,
    };
    Ok((Source::Ring(capture), details))
}

/// Sets a new capture's filter, in its kernel. On the `any` device (Linux
/// cooked headers) the kernel also leaves out there the outgoing copy of
/// each loopback packet: the kernel hands a packet socket both copies of a
/// loopback packet, and libpcap drops the outgoing one only once it has
/// taken room in the ring and been counted, so each loopback packet cost
/// two frames and a full ring counted each lost packet twice. libpcap
/// itself cannot say that in the kernel for cooked headers (it runs any
/// filter that reads the header's device type in user space, every packet
/// copied first), so once libpcap has set the stream's filter, the program
/// it compiles with that clause is given to the kernel here, its reads of
/// the cooked header turned into the kernel's own fields.
pub(super) fn attach_filter(
    capture: &mut Capture<Active>,
    filter: &str,
    linktype: i32,
) -> Result<(), pcap::Error> {
    // libpcap first: it also filters, in user space, what the ring took
    // before the kernel had this filter (a new socket takes everything
    // until then).
    capture.filter(filter, true)?;
    if linktype == LINKTYPE_LINUX_SLL {
        if let Some(kernel) = kernel_program(capture, filter, linktype)? {
            // If the kernel refuses it, libpcap's filter stays: the same
            // packets, the loopback copies dropped in user space.
            let _ = attach_socket_filter(capture.as_raw_fd(), &kernel);
        }
    }
    Ok(())
}

/// Replaces a running capture's filter with one the kernel swaps in at
/// once. Not libpcap's `pcap_setfilter`: to keep packets of the old filter
/// out, it first puts a filter that takes nothing on the socket and drains
/// it, and whatever arrives until the new filter is on is lost without
/// being counted: a packet missed silently. A packet the old filter took
/// that is still in the ring reaches the stream, which sorts each packet
/// itself anyway.
pub(super) fn replace_filter(
    capture: &mut Capture<Active>,
    filter: &str,
    linktype: i32,
) -> Result<(), pcap::Error> {
    if let Some(kernel) = kernel_program(capture, filter, linktype)? {
        if attach_socket_filter(capture.as_raw_fd(), &kernel).is_ok() {
            return Ok(());
        }
    }
    debug!("filter {filter:?} set through libpcap: the kernel took no program of ours");
    capture.filter(filter, true)
}

/// The cooked ("any" device) link type, whose header the kernel makes up.
const LINKTYPE_LINUX_SLL: i32 = 113;

/// The program for `filter` as the capture's kernel runs it: libpcap's own
/// on a device with real link headers, rewritten for the kernel's fields
/// (and leaving out loopback's outgoing copies) on the cooked `any`;
/// `None` where libpcap's program cannot run there.
fn kernel_program<T: pcap::Activated + ?Sized>(
    capture: &Capture<T>,
    filter: &str,
    linktype: i32,
) -> Result<Option<Vec<Instruction>>, pcap::Error> {
    let cooked = linktype == LINKTYPE_LINUX_SLL;
    let text = if cooked {
        // Packet type 4 is outgoing; device type 772 loopback.
        let loopback_copy = "outbound and link[2:2] == 772";
        if filter.is_empty() {
            format!("not ({loopback_copy})")
        } else {
            format!("({filter}) and not ({loopback_copy})")
        }
    } else {
        filter.to_owned()
    };
    let program = capture.compile(&text, true)?;
    let instructions: Option<Vec<Instruction>> = program
        .get_instructions()
        .iter()
        .map(|instruction| parse_instruction(&instruction.to_string()))
        .collect();
    Ok(match instructions {
        Some(program) if cooked => cooked_for_kernel(&program),
        other => other,
    })
}

/// One classic BPF instruction: code, jump if true, jump if false, k.
pub type Instruction = (u16, u8, u8, u32);

/// An instruction as the pcap crate prints it ("code jt jf k").
fn parse_instruction(text: &str) -> Option<Instruction> {
    let mut fields = text.split_whitespace();
    let instruction = (
        fields.next()?.parse().ok()?,
        fields.next()?.parse().ok()?,
        fields.next()?.parse().ok()?,
        fields.next()?.parse().ok()?,
    );
    fields.next().is_none().then_some(instruction)
}

/// A program compiled for Linux cooked (v1) headers, as the kernel runs it
/// on a packet without one (pure): reads of the header's packet type,
/// device type and protocol become the kernel's ancillary fields, reads
/// past it move back by its 16 bytes. None if it reads another part of the
/// header (the kernel has no such field).
pub fn cooked_for_kernel(program: &[Instruction]) -> Option<Vec<Instruction>> {
    const BPF_LD: u16 = 0x00;
    const BPF_LDX: u16 = 0x01;
    const BPF_ABS: u16 = 0x20;
    const BPF_IND: u16 = 0x40;
    const BPF_MSH: u16 = 0xa0;
    const SKF_AD_OFF: u32 = (-0x1000i32) as u32;
    const SKF_AD_PROTOCOL: u32 = 0;
    const SKF_AD_PKTTYPE: u32 = 4;
    const SKF_AD_HATYPE: u32 = 28;
    const SLL_HDR_LEN: u32 = 16;
    program
        .iter()
        .map(|&(code, jt, jf, k)| {
            let loads = matches!(code & 0x07, BPF_LD | BPF_LDX)
                && matches!(code & 0xe0, BPF_ABS | BPF_IND | BPF_MSH);
            if !loads || k >= SKF_AD_OFF {
                return Some((code, jt, jf, k));
            }
            let k = match k {
                0 => SKF_AD_OFF + SKF_AD_PKTTYPE,
                2 => SKF_AD_OFF + SKF_AD_HATYPE,
                14 => SKF_AD_OFF + SKF_AD_PROTOCOL,
                k if k >= SLL_HDR_LEN => k - SLL_HDR_LEN,
                _ => return None,
            };
            Some((code, jt, jf, k))
        })
        .collect()
}

/// Attaches a classic BPF program to a socket (SO_ATTACH_FILTER).
pub(super) fn attach_socket_filter(
    fd: std::os::fd::RawFd,
    program: &[Instruction],
) -> std::io::Result<()> {
    let mut filter: Vec<nix::libc::sock_filter> = program
        .iter()
        .map(|&(code, jt, jf, k)| nix::libc::sock_filter { code, jt, jf, k })
        .collect();
    let fprog = nix::libc::sock_fprog {
        len: u16::try_from(filter.len()).map_err(|_| std::io::ErrorKind::InvalidInput)?,
        filter: filter.as_mut_ptr(),
    };
    // SAFETY: a valid program that outlives the call; the kernel copies it.
    let result = unsafe {
        nix::libc::setsockopt(
            fd,
            nix::libc::SOL_SOCKET,
            nix::libc::SO_ATTACH_FILTER,
            std::ptr::from_ref(&fprog).cast(),
            std::mem::size_of::<nix::libc::sock_fprog>() as nix::libc::socklen_t,
        )
    };
    if result == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The current namespace's own addresses: each interface address, and a
/// loopback interface's whole network (every 127.0.0.0/8 address is local).
fn local_networks() -> Vec<LocalNetwork> {
    let Ok(interfaces) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    let mut networks = Vec::new();
    for interface in interfaces {
        let loopback = interface
            .flags
            .contains(nix::net::if_::InterfaceFlags::IFF_LOOPBACK);
        let (Some(address), Some(netmask)) = (interface.address, interface.netmask) else {
            continue;
        };
        let network =
            if let (Some(ip), Some(mask)) = (address.as_sockaddr_in(), netmask.as_sockaddr_in()) {
                let (ip, mask) = (ip.ip(), mask.ip());
                let prefix_len = mask.to_bits().count_ones() as u8;
                if loopback {
                    LocalNetwork {
                        ip: IpAddr::V4(Ipv4Addr::from_bits(ip.to_bits() & mask.to_bits())),
                        prefix_len,
                    }
                } else {
                    LocalNetwork {
                        ip: IpAddr::V4(ip),
                        prefix_len: 32,
                    }
                }
            } else if let (Some(ip), Some(mask)) =
                (address.as_sockaddr_in6(), netmask.as_sockaddr_in6())
            {
                let (ip, mask) = (ip.ip(), mask.ip());
                let prefix_len = mask.to_bits().count_ones() as u8;
                if loopback {
                    LocalNetwork {
                        ip: IpAddr::V6(Ipv6Addr::from_bits(ip.to_bits() & mask.to_bits())),
                        prefix_len,
                    }
                } else {
                    LocalNetwork {
                        ip: IpAddr::V6(ip),
                        prefix_len: 128,
                    }
                }
            } else {
                continue;
            };
        if !networks.contains(&network) {
            networks.push(network);
        }
    }
    networks
}

fn classify(err: pcap::Error, interface: &str, netns: &dyn std::fmt::Display) -> CaptureError {
    let text = err.to_string();
    if matches!(err, pcap::Error::PcapError(_)) && text.contains("No such device") {
        // libpcap says no more than that.
        return CaptureError::Failed(format!(
            "no interface {interface:?} in network namespace {netns} (--interface names one there, or any)"
        ));
    }
    let denied = matches!(err, pcap::Error::PcapError(_) | pcap::Error::IoError(_))
        && (text.contains("Operation not permitted")
            || text.contains("Permission denied")
            || text.contains("permission"));
    if denied {
        CaptureError::Permission(text)
    } else {
        CaptureError::Failed(text)
    }
}

#[cfg(test)]
mod tests {
    use super::{LIVE_DELAY, PROCESS_RING, SPROUT_RING, linktype_for, stall_span};
    use std::time::Duration;

    #[test]
    fn a_grown_ring_rides_out_a_stall_at_a_live_views_delay() {
        // The default: 8 MiB, 32 blocks, handed over within 8 ms.
        assert_eq!(stall_span(8 << 20, LIVE_DELAY), Duration::from_millis(256));
        assert!(LIVE_DELAY <= Duration::from_millis(10));
        assert!(stall_span(PROCESS_RING, LIVE_DELAY) >= Duration::from_millis(200));
        // An idle stream's ring: a megabyte, four blocks (the fewest the
        // kernel fills without a lost packet), riding out 32 ms.
        assert_eq!(SPROUT_RING, 1 << 20);
        assert_eq!(
            stall_span(SPROUT_RING, LIVE_DELAY),
            Duration::from_millis(32)
        );
        assert!(LIVE_DELAY < crate::stream::CLOSE_GRACE);
    }

    #[test]
    fn cooked_header_reads_become_the_kernels_fields() {
        use super::cooked_for_kernel;
        const AD: u32 = (-0x1000i32) as u32;
        // ldh [14]; jeq #0x800; ldh [0]; jeq #4; ldh [2]; jeq #772; ldb [25]; ret
        let program = [
            (0x28, 0, 0, 14),
            (0x15, 0, 3, 0x800),
            (0x28, 0, 0, 0),
            (0x15, 0, 1, 4),
            (0x28, 0, 0, 2),
            (0x15, 1, 0, 772),
            (0x30, 0, 0, 25),
            (0x06, 0, 0, 262_144),
        ];
        let kernel = cooked_for_kernel(&program).unwrap();
        assert_eq!(kernel[0].3, AD);
        assert_eq!(kernel[2].3, AD + 4);
        assert_eq!(kernel[4].3, AD + 28);
        assert_eq!(kernel[6].3, 9, "the IPv4 protocol, past the cooked header");
        assert_eq!(kernel[1], program[1], "jumps are left as they are");
        // The link-layer address has no kernel field.
        assert_eq!(cooked_for_kernel(&[(0x20, 0, 0, 6)]), None);
    }

    #[test]
    fn link_types_follow_libpcap() {
        assert_eq!(linktype_for("any", Some(1)), 113);
        assert_eq!(linktype_for("lo", Some(772)), 1);
        assert_eq!(linktype_for("eth0", Some(1)), 1);
        assert_eq!(linktype_for("tun0", Some(65534)), 12);
        assert_eq!(linktype_for("ppp0", Some(512)), 113);
        assert_eq!(linktype_for("gone0", None), 113);
    }
}
