//! A live capture: one libpcap handle on its own thread, opened in the
//! socket's network namespace, handing each packet to a [`PacketSink`].
//!
//! The thread owns the handle (`pcap::Capture` is `Send`, not `Sync`); other
//! threads talk to it only through a [`CaptureControl`], which wakes a
//! blocked `next_packet` with `pcap_breakloop` and then stops the loop or
//! swaps the filter. Setup happens on the thread too (a thread, not the
//! process, enters the namespace with setns), and its outcome is handed to
//! the caller's `on_ready` callback, so the caller never blocks on it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use log::{debug, warn};
use pcap::{Active, Capture, Precision};

use super::filter::{FilterTarget, LocalNetwork, Taken, bpf_filter_for, without_taken};
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

/// Where packets go. Called on the capture thread.
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

enum Command {
    Stop,
    SetFilter(String),
}

/// Stops a running capture or changes its filter, from any thread.
#[derive(Clone)]
pub struct CaptureControl {
    commands: Sender<Command>,
    wake: Arc<pcap::BreakLoop>,
}

impl CaptureControl {
    /// Ends the capture; the thread exits within tens of milliseconds and
    /// calls [`PacketSink::ended`]. Idempotent.
    pub fn stop(&self) {
        let _ = self.commands.send(Command::Stop);
        wake(&self.wake);
    }

    /// Replaces the kernel filter of the running capture.
    pub fn set_filter(&self, filter: String) {
        let _ = self.commands.send(Command::SetFilter(filter));
        wake(&self.wake);
    }
}

/// Wakes a capture thread blocked in libpcap, from the one waker thread.
///
/// `BreakLoop::breakloop` holds the pcap handle for a moment: if the woken
/// capture thread exits meanwhile, the last reference is the caller's, and
/// the caller closes the packet socket, which waits for an RCU grace period
/// (seconds on a loaded machine). Called on the FUSE session thread (a
/// release), that stalled every request of the mount; on the waker thread
/// it stalls nothing that matters. Before [`Waker::start`] (and in unit
/// tests) the caller wakes the capture itself.
fn wake(handle: &Arc<pcap::BreakLoop>) {
    let waker = WAKER
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    match waker.as_ref() {
        Some(wakes) => {
            let _ = wakes.send(Arc::clone(handle));
        }
        None => handle.breakloop(),
    }
}

static WAKER: Mutex<Option<Sender<Arc<pcap::BreakLoop>>>> = Mutex::new(None);

/// The daemon's capture waker thread: started with the daemon, joined at
/// its end.
pub struct Waker {
    thread: thread::JoinHandle<()>,
}

impl Waker {
    pub fn start() -> std::io::Result<Waker> {
        let (wakes, woken) = crossbeam_channel::unbounded::<Arc<pcap::BreakLoop>>();
        let thread = thread::Builder::new()
            .name("capture-waker".into())
            .spawn(move || {
                for handle in woken {
                    handle.breakloop();
                }
            })?;
        *WAKER
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(wakes);
        Ok(Waker { thread })
    }

    /// Wakes what is still queued, then ends the thread.
    pub fn stop(self) {
        WAKER
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        let _ = self.thread.join();
    }
}

/// Starts a capture thread. `on_ready` gets the outcome of opening it; the
/// sink gets the packets from then on.
pub fn start(
    request: CaptureRequest,
    settings: &CaptureSettings,
    sink: Arc<dyn PacketSink>,
    on_ready: impl FnOnce(Result<Opened, CaptureError>) + Send + 'static,
) -> std::io::Result<()> {
    let settings = settings.clone();
    thread::Builder::new()
        .name("capture".into())
        .spawn(move || {
            let label = request.label.clone();
            let (_, block_timeout) = geometry(&request, &settings);
            let (commands_tx, commands_rx) = crossbeam_channel::unbounded();
            match open(request, &settings) {
                Ok((mut capture, linktype, nanosecond_timestamps, local_networks)) => {
                    let control = CaptureControl {
                        commands: commands_tx,
                        wake: Arc::new(capture.breakloop_handle()),
                    };
                    on_ready(Ok(Opened {
                        linktype,
                        snaplen: settings.snaplen,
                        nanosecond_timestamps,
                        control,
                        local_networks,
                        block_timeout,
                    }));
                    let stats = run(&mut capture, &commands_rx, sink.as_ref(), &label);
                    sink.ended(stats);
                }
                Err(err) => on_ready(Err(err)),
            }
        })
        .map(|_| ())
}

/// Opens the handle in the request's namespace: the capture, its link
/// type, whether timestamps are in nanoseconds, and the namespace's own
/// addresses.
fn open(
    request: CaptureRequest,
    settings: &CaptureSettings,
) -> Result<(Capture<Active>, i32, bool, Vec<LocalNetwork>), CaptureError> {
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
    Ok((capture, linktype, nanos, local_networks))
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

fn run(
    capture: &mut Capture<Active>,
    commands: &Receiver<Command>,
    sink: &dyn PacketSink,
    label: &str,
) -> CaptureStats {
    loop {
        // One kernel block per call: every packet in it, then one wake-up.
        let handed = capture.dispatch(None, |packet| {
            let timestamp = Timestamp {
                seconds: u32::try_from(packet.header.ts.tv_sec).unwrap_or(0),
                fraction: u32::try_from(packet.header.ts.tv_usec).unwrap_or(0),
            };
            sink.packet(timestamp, packet.header.len, packet.data);
        });
        match handed {
            Ok(0) => {}
            Ok(_) => sink.batch_end(),
            // pcap_breakloop (only a command calls it) makes dispatch fail
            // with PCAP_ERROR_BREAK, which carries no message; a wake-up whose
            // command an earlier wake-up already applied carries none either.
            Err(err) if is_break(&err) => {
                sink.batch_end();
                if !apply_commands(capture, commands, label) {
                    break;
                }
            }
            Err(err) => {
                sink.batch_end();
                warn!("{label}: capture failed: {err}");
                break;
            }
        }
    }
    let stats = capture.stats().ok();
    stats
        .map(|stat| CaptureStats {
            received: stat.received,
            dropped_by_kernel: stat.dropped,
            dropped_by_interface: stat.if_dropped,
        })
        .unwrap_or_default()
}

/// Whether dispatch failed only because pcap_breakloop woke it: libpcap
/// reports that as an error with an empty message.
fn is_break(err: &pcap::Error) -> bool {
    matches!(err, pcap::Error::PcapError(message) if message.trim().is_empty())
}

/// Applies queued commands; false when the capture must stop.
fn apply_commands(
    capture: &mut Capture<Active>,
    commands: &Receiver<Command>,
    label: &str,
) -> bool {
    let mut keep_running = true;
    for command in commands.try_iter() {
        match command {
            Command::Stop => keep_running = false,
            Command::SetFilter(filter) => {
                debug!("{label}: filter now {filter}");
                if let Err(err) = capture.filter(&filter, true) {
                    warn!("{label}: filter {filter:?} refused: {err}");
                }
            }
        }
    }
    // A disconnected command channel means every control was dropped.
    keep_running
        && !matches!(
            commands.try_recv(),
            Err(crossbeam_channel::TryRecvError::Disconnected)
        )
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
