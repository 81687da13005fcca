//! Opening a live capture: one libpcap handle in the socket's network
//! namespace, its ring sized and timed for the stream, its kernel filter
//! made there (where the namespace's own addresses are known). The handle
//! is then served by the daemon's capture threads ([`super::service`]),
//! which hand each packet to a [`PacketSink`]; other threads talk to a
//! running capture only through its [`CaptureControl`].

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use log::debug;
use pcap::{Active, Capture, Precision};

use super::filter::{FilterTarget, LocalNetwork, Taken, bpf_filter_for, without_taken};
pub use super::service::{CaptureControl, start};
use crate::inventory::Netns;

/// How long a stalled capture (a daemon stopped, starved or swapping) may
/// fall behind a trickle of packets before the kernel drops any.
///
/// Not libpcap's immediate mode: that switches to TPACKET_V2, whose ring on
/// the "any" device holds one snaplen-sized frame per packet (a handful with
/// the default 2 MiB buffer and 256 KiB snaplen), so a burst of a few small
/// packets is dropped. TPACKET_V3 packs packets by their real size into
/// blocks of 256 KiB (libpcap's fixed size) and hands a block over when it
/// is full or when the block timeout fires with packets in it. At a
/// trickle every timeout hands over a nearly empty block, so a ring of N
/// blocks covers N timeouts of stall: the timeout is this span divided by
/// the ring's blocks ([`block_timeout`]). That is also how late a packet of
/// a trickle may reach the reader; a bigger `--kernel-buffer` makes it
/// sooner. (Not for a capture that asks to be [`CaptureRequest::prompt`].)
pub const STALL_SPAN: Duration = Duration::from_millis(1500);
/// libpcap's TPACKET_V3 block: room for one packet of its largest snaplen.
const BLOCK_BYTES: usize = 256 << 10;
/// The block timeout's bounds: soon enough for a live view and for a
/// stream's end ([`crate::stream::CLOSE_GRACE`] must exceed it), and not a
/// wake-up per packet.
const BLOCK_TIMEOUT_BOUNDS: (Duration, Duration) =
    (Duration::from_millis(2), Duration::from_millis(200));

/// A capture's ring size and block timeout.
fn geometry(request: &CaptureRequest, settings: &CaptureSettings) -> (usize, Duration) {
    // A process's stream takes every TCP and UDP packet of the namespace,
    // far more than one socket's: its ring absorbs a longer stall.
    let ring = match request.filter {
        CaptureFilter::Socket(..) => settings.kernel_buffer,
        CaptureFilter::TcpAndUdp => settings.kernel_buffer.max(PROCESS_RING),
    };
    let timeout = match (request.prompt, settings.max_delay) {
        (true, _) => BLOCK_TIMEOUT_BOUNDS.0,
        (false, Some(asked)) => asked.max(Duration::from_millis(1)),
        (false, None) => block_timeout(ring),
    };
    (ring, timeout)
}

/// The block timeout of a ring of `ring` bytes (pure): [`STALL_SPAN`] over
/// its blocks, within [`BLOCK_TIMEOUT_BOUNDS`].
pub fn block_timeout(ring: usize) -> Duration {
    let blocks = u32::try_from((ring / BLOCK_BYTES).max(1)).unwrap_or(u32::MAX);
    let (least, most) = BLOCK_TIMEOUT_BOUNDS;
    (STALL_SPAN / blocks).clamp(least, most)
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
    /// Hand every block over within 2 ms, giving up riding out a stall
    /// (see [`STALL_SPAN`]): for a sorter that must see a flow's packets
    /// while its socket is still in /proc.
    pub prompt: bool,
}

/// Which packets a capture keeps.
#[derive(Clone, Debug)]
pub enum CaptureFilter {
    /// One socket's traffic, but for the flows more specific sockets take.
    Socket(FilterTarget, Vec<Taken>),
    /// Every TCP and UDP packet of the namespace, for a process's `all`
    /// stream to sort in user space.
    TcpAndUdp,
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
    /// The longest the kernel holds a packet before handing it over.
    pub block_timeout: Duration,
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
}

impl Details {
    pub(super) fn with_control(self, control: CaptureControl) -> Opened {
        Opened {
            linktype: self.linktype,
            snaplen: self.snaplen,
            nanosecond_timestamps: self.nanosecond_timestamps,
            control,
            local_networks: self.local_networks,
            block_timeout: self.block_timeout,
        }
    }
}

/// Opens the handle in the request's namespace, which the calling thread
/// enters (and stays in): the capture, with its link type, whether
/// timestamps are in nanoseconds, and the namespace's own addresses.
pub(super) fn open(
    request: CaptureRequest,
    settings: &CaptureSettings,
) -> Result<(Capture<Active>, Details), CaptureError> {
    request.netns.enter().map_err(|err| {
        CaptureError::Namespace(format!(
            "cannot enter network namespace {}: {err}",
            request.netns.id()
        ))
    })?;
    let snaplen = i32::try_from(settings.snaplen).unwrap_or(i32::MAX);
    let (ring, timeout) = geometry(&request, settings);
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
            Err(_) => return Err(classify(first)),
        },
    };
    let local_networks = local_networks();
    let filter = match &request.filter {
        CaptureFilter::Socket(target, taken) => bpf_filter_for(target, &local_networks)
            .map(|filter| without_taken(filter, taken))
            .map_err(|unsupported| CaptureError::Failed(unsupported.0))?,
        CaptureFilter::TcpAndUdp => "tcp or udp".to_owned(),
    };
    debug!("{}: capture filter: {filter}", request.label);
    capture
        .filter(&filter, true)
        .map_err(|err| CaptureError::Failed(format!("filter {filter:?} refused: {err}")))?;
    let linktype = capture.get_datalink().0;
    let details = Details {
        linktype,
        snaplen: settings.snaplen,
        nanosecond_timestamps: nanos,
        local_networks,
        block_timeout: timeout,
    };
    Ok((capture, details))
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

fn classify(err: pcap::Error) -> CaptureError {
    let text = err.to_string();
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
    use super::{BLOCK_TIMEOUT_BOUNDS, PROCESS_RING, STALL_SPAN, block_timeout, linktype_for};
    use std::time::Duration;

    #[test]
    fn a_ring_covers_the_stall_span_at_a_trickle() {
        // A socket file's default ring: 8 blocks.
        assert_eq!(block_timeout(2 << 20), Duration::from_micros(187_500));
        // A 32-block ring.
        assert_eq!(block_timeout(PROCESS_RING), Duration::from_micros(46_875));
        for ring in [1 << 20, 2 << 20, 8 << 20, 32 << 20, 64 << 20] {
            let blocks = (ring / (256 << 10)) as u32;
            let timeout = block_timeout(ring);
            assert!(timeout * blocks >= STALL_SPAN || timeout == BLOCK_TIMEOUT_BOUNDS.1);
        }
        // Bounded both ways: a huge ring is not a wake-up per packet, a
        // tiny one not a reader waiting seconds.
        assert_eq!(block_timeout(4 << 30), BLOCK_TIMEOUT_BOUNDS.0);
        assert_eq!(block_timeout(0), BLOCK_TIMEOUT_BOUNDS.1);
        assert!(BLOCK_TIMEOUT_BOUNDS.1 < crate::stream::CLOSE_GRACE);
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
