//! A capture that starts small and grows with its traffic.
//!
//! A stream's kernel ring is memory the kernel commits when the capture
//! opens, whether a packet ever comes or not. A stream opened on a quiet
//! socket (most are) starts without a ring ([`RingStage::Sprout`]: a
//! packet socket and its queue, [`super::queue`], on the `any` device; a
//! ring of four blocks on another); once its first capture has handed over
//! packets, a capture with the full ring
//! ([`RingStage::Grown`]: what rides out a stalled daemon) is opened with
//! the same filter in the same namespace, and the small one is stopped.
//! Both capture what passes in between: the new capture's copy of a packet
//! the old one already delivered has its bytes, stamped within a moment
//! (each packet socket may stamp its copy itself), and is left out. The new
//! capture's packets wait until the old one has handed over its last, so
//! the stream keeps its order. The stream sees one capture throughout: its
//! [`CaptureControl`] reaches whichever runs, and its end comes once, with
//! both captures' counts.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use log::debug;

use super::service::{self, CaptureControl};
use super::source::{
    CaptureError, CaptureFilter, CaptureRequest, CaptureSettings, CaptureStats, Opened, PacketSink,
    RingStage, Timestamp, grows,
};

/// Opens a capture as [`service::start`] does, small first, growing once
/// packets come (where the full ring is larger than the small one).
pub fn start(
    mut request: CaptureRequest,
    settings: &CaptureSettings,
    sink: Arc<dyn PacketSink>,
    on_ready: impl FnOnce(Result<Opened, CaptureError>) + Send + 'static,
) -> std::io::Result<()> {
    if !grows(&request, settings) {
        request.stage = RingStage::Grown;
        return service::start(request, settings, sink, on_ready);
    }
    let recipe = CaptureRequest {
        netns: request.netns.clone(),
        filter: request.filter.clone(),
        label: request.label.clone(),
        prompt: request.prompt,
        stage: RingStage::Grown,
    };
    request.stage = RingStage::Sprout;
    let growth = Arc::new(Growth {
        label: request.label.clone(),
        sink,
        recipe: Mutex::new(Some((recipe, settings.clone()))),
        control: OnceLock::new(),
        first_timeout: OnceLock::new(),
        state: Mutex::new(State::default()),
        grown: AtomicBool::new(false),
        first_last: AtomicU64::new(0),
        nanoseconds: AtomicBool::new(true),
        linktype: AtomicI32::new(0),
    });
    let front: Arc<dyn PacketSink> = Arc::new(Front {
        growth: Arc::clone(&growth),
        first: true,
    });
    service::start(request, settings, front, move |outcome| {
        if let Ok(opened) = &outcome {
            let _ = growth.control.set(opened.control.clone());
            let _ = growth.first_timeout.set(opened.block_timeout);
            growth
                .nanoseconds
                .store(opened.nanosecond_timestamps, Ordering::Relaxed);
            growth.linktype.store(opened.linktype, Ordering::Relaxed);
        }
        on_ready(outcome);
    })
}

struct Growth {
    /// The stream's, for log lines.
    label: String,
    sink: Arc<dyn PacketSink>,
    /// How to open the grown capture; taken once it is asked for.
    recipe: Mutex<Option<(CaptureRequest, CaptureSettings)>>,
    /// The stream's control (the first capture's), and the first capture's
    /// block timeout.
    control: OnceLock<CaptureControl>,
    first_timeout: OnceLock<std::time::Duration>,
    state: Mutex<State>,
    /// The first capture has ended and everything held was let through:
    /// the grown capture's packets stamped after the first's last pass
    /// straight on.
    grown: AtomicBool,
    /// The stamp of the first capture's last packet.
    first_last: AtomicU64,
    /// Whether stamps are in nanoseconds (as the first capture said).
    nanoseconds: AtomicBool,
    /// The first capture's link type (both captures have the same).
    linktype: AtomicI32,
}

/// A packet the grown capture took before the first had ended.
struct Held {
    timestamp: Timestamp,
    original_length: u32,
    data: Vec<u8>,
}

#[derive(Default)]
struct State {
    /// The first capture handed over packets.
    traffic: bool,
    /// The grown capture is open: the first capture's packets from now on
    /// are remembered, to tell the grown one's copies.
    overlapping: bool,
    /// The first capture's packets since, by their bytes: when stamped.
    delivered: HashMap<PacketKey, Vec<u64>>,
    /// The first capture ended, with these counts.
    first_ended: Option<CaptureStats>,
    /// The grown capture runs (its packets are the stream's from the
    /// first's end on).
    second_running: bool,
    held: Vec<Held>,
    /// The stream was told its end (by the first capture, which never
    /// grew): a late grown capture's end is not told again.
    end_told: bool,
}

/// What makes two captures' packets one: their length and bytes (the
/// headers and the payload's first bytes), stamped less than
/// [`SAME_PACKET`] apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct PacketKey(u32, u64);

/// How far apart two packet sockets stamp their copies of one packet.
const SAME_PACKET: u64 = 2_000_000;

fn key(linktype: i32, original_length: u32, data: &[u8]) -> PacketKey {
    // A Linux cooked header's link-layer address field has eight bytes;
    // the kernel writes only the address's own (six of them for Ethernet
    // and loopback) and the rest is whatever the ring held there before:
    // two captures of one packet differ in them once a ring has wrapped
    // around. Left out of the key.
    let unwritten = match linktype {
        LINKTYPE_LINUX_SLL => 6..14,
        LINKTYPE_LINUX_SLL2 => 12..20,
        _ => 0..0,
    };
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for (index, byte) in data.iter().enumerate().take(128) {
        if unwritten.contains(&index) {
            continue;
        }
        hash = (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3);
    }
    PacketKey(original_length, hash)
}

const LINKTYPE_LINUX_SLL: i32 = 113;
const LINKTYPE_LINUX_SLL2: i32 = 276;

/// A stamp in nanoseconds (or microseconds: both captures of a stream
/// stamp alike).
fn units(timestamp: Timestamp, nanoseconds: bool) -> u64 {
    let per_second = if nanoseconds {
        1_000_000_000
    } else {
        1_000_000
    };
    u64::from(timestamp.seconds) * per_second + u64::from(timestamp.fraction)
}

impl State {
    /// Whether the first capture delivered this packet (and forgets that
    /// it did: each of its packets is one of the grown capture's).
    fn delivered_before(&mut self, key: PacketKey, at: u64, nanoseconds: bool) -> bool {
        let slack = if nanoseconds {
            SAME_PACKET
        } else {
            SAME_PACKET / 1000
        };
        let Some(stamps) = self.delivered.get_mut(&key) else {
            return false;
        };
        match stamps.iter().position(|stamp| stamp.abs_diff(at) <= slack) {
            Some(index) => {
                stamps.swap_remove(index);
                true
            }
            None => false,
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Growth {
    /// Opens the grown capture, once.
    fn grow(self: &Arc<Self>) {
        let Some(control) = self.control.get() else {
            return;
        };
        if control.stopped() {
            return;
        }
        let Some((mut request, settings)) = lock(&self.recipe).take() else {
            return;
        };
        // The filter the stream has now (it narrows as it goes).
        let opened_with = control.filter();
        if let Some(filter) = &opened_with {
            request.filter = CaptureFilter::Exact(filter.clone());
        }
        let label = request.label.clone();
        // From now on the first capture's packets are remembered: the grown
        // one takes its first packets as soon as its socket is bound,
        // before it is said to run.
        lock(&self.state).overlapping = true;
        let growth = Arc::clone(self);
        let front: Arc<dyn PacketSink> = Arc::new(Front {
            growth: Arc::clone(self),
            first: false,
        });
        let started = service::start(request, &settings, front, move |outcome| match outcome {
            Ok(opened) => {
                {
                    let mut state = lock(&growth.state);
                    if state.end_told {
                        // The stream ended meanwhile.
                        drop(state);
                        opened.control.stop();
                        return;
                    }
                    state.second_running = true;
                }
                debug!(
                    "{label}: traffic came: the capture grew to {}",
                    opened.describe()
                );
                if let Some(control) = growth.control.get() {
                    control.join(&opened.control);
                    // A filter set while the grown capture opened reached
                    // only the first: set it on both.
                    let latest = control.filter();
                    if latest != opened_with
                        && let Some(latest) = latest
                    {
                        control.set_filter(latest);
                    }
                    // The first capture's block being filled is handed
                    // over only when its timeout fires: it stops once that
                    // has, meanwhile both capture.
                    let retiring = control.clone();
                    let delay = growth.first_timeout() + RETIRE_MARGIN;
                    let _ = crate::stream::tracking::follow(Box::new(Retire {
                        control: retiring,
                        at: std::time::Instant::now() + delay,
                    }));
                }
            }
            Err(err) => debug!("{label}: the capture's ring cannot grow: {err:?}"),
        });
        if let Err(err) = started {
            debug!("{}: the capture's ring cannot grow: {err}", self.label());
        }
    }

    fn nanoseconds(&self) -> bool {
        self.nanoseconds.load(Ordering::Relaxed)
    }

    fn linktype(&self) -> i32 {
        self.linktype.load(Ordering::Relaxed)
    }

    /// The first capture's block timeout.
    fn first_timeout(&self) -> std::time::Duration {
        *self
            .first_timeout
            .get()
            .unwrap_or(&super::source::LIVE_DELAY)
    }

    fn label(&self) -> &str {
        &self.label
    }
}

/// How much longer than its block timeout the first capture runs beside
/// the grown one. A stream's packet may reach it up to twice the first
/// capture's block timeout and this late while it grows (held until the
/// first capture has handed over its last).
pub const RETIRE_MARGIN: std::time::Duration = std::time::Duration::from_millis(10);

/// Stops the first capture once its last block has been handed over.
struct Retire {
    control: CaptureControl,
    at: std::time::Instant,
}

impl crate::stream::tracking::Followed for Retire {
    fn step(&mut self, now: std::time::Instant) -> Option<std::time::Duration> {
        if now < self.at {
            return Some(self.at - now);
        }
        self.control.retire_first();
        None
    }
}

/// One of the two captures' sink.
struct Front {
    growth: Arc<Growth>,
    /// The first (small) capture, or the grown one.
    first: bool,
}

impl PacketSink for Front {
    fn packet(&self, timestamp: Timestamp, original_length: u32, data: &[u8]) {
        let growth = &self.growth;
        if self.first {
            let mut state = lock(&growth.state);
            state.traffic = true;
            if state.overlapping {
                state
                    .delivered
                    .entry(key(growth.linktype(), original_length, data))
                    .or_default()
                    .push(units(timestamp, growth.nanoseconds()));
            }
            growth
                .first_last
                .fetch_max(units(timestamp, growth.nanoseconds()), Ordering::AcqRel);
            drop(state);
            growth.sink.packet(timestamp, original_length, data);
            return;
        }
        if growth.grown.load(Ordering::Acquire)
            && units(timestamp, growth.nanoseconds())
                > growth.first_last.load(Ordering::Acquire) + SAME_PACKET
        {
            growth.sink.packet(timestamp, original_length, data);
            return;
        }
        let mut state = lock(&growth.state);
        if state.first_ended.is_none() {
            state.held.push(Held {
                timestamp,
                original_length,
                data: data.to_vec(),
            });
        } else if !state.delivered_before(
            key(growth.linktype(), original_length, data),
            units(timestamp, growth.nanoseconds()),
            growth.nanoseconds(),
        ) {
            growth.sink.packet(timestamp, original_length, data);
        }
    }

    fn batch_end(&self) {
        let growth = &self.growth;
        if self.first {
            let traffic = lock(&growth.state).traffic;
            growth.sink.batch_end();
            if traffic && lock(&growth.recipe).is_some() {
                growth.grow();
            }
        } else {
            growth.sink.batch_end();
        }
    }

    fn ended(&self, stats: CaptureStats) {
        let growth = &self.growth;
        if self.first {
            let mut state = lock(&growth.state);
            state.first_ended = Some(stats);
            if !state.second_running {
                // It never grew (or it stopped first): this is the end.
                state.end_told = true;
                drop(state);
                growth.sink.ended(stats);
                return;
            }
            // Its copies of what the first one delivered are left out; the
            // rest goes on, in order.
            let nanoseconds = growth.nanoseconds();
            for held in std::mem::take(&mut state.held) {
                let copy = state.delivered_before(
                    key(growth.linktype(), held.original_length, &held.data),
                    units(held.timestamp, nanoseconds),
                    nanoseconds,
                );
                if !copy {
                    growth
                        .sink
                        .packet(held.timestamp, held.original_length, &held.data);
                }
            }
            growth.grown.store(true, Ordering::Release);
            drop(state);
            growth.sink.batch_end();
        } else {
            let first = {
                let mut state = lock(&growth.state);
                if state.end_told {
                    return;
                }
                state.end_told = true;
                state.first_ended.unwrap_or_default()
            };
            debug!(
                "{}: capture ended: the first ring's counts {first:?}, the grown ring's {stats:?}",
                self.growth.label()
            );
            growth.sink.ended(CaptureStats {
                received: stats.received.saturating_add(first.received),
                dropped_by_kernel: stats
                    .dropped_by_kernel
                    .saturating_add(first.dropped_by_kernel),
                dropped_by_interface: stats
                    .dropped_by_interface
                    .saturating_add(first.dropped_by_interface),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{LINKTYPE_LINUX_SLL, LINKTYPE_LINUX_SLL2, key};

    /// A loopback packet as two rings hand it over: the cooked header's
    /// unwritten address bytes differ (one ring had wrapped around).
    #[test]
    fn two_captures_of_a_packet_have_one_key_whatever_the_unwritten_address_bytes() {
        let ip = [0x45, 0, 0, 0x34, 0xda, 0xe4, 0x40, 0, 0x40, 6];
        let sll = |pkttype: u8, leftover: [u8; 2]| {
            let mut frame = vec![0, pkttype, 3, 4, 0, 6, 0, 0, 0, 0, 0, 0];
            frame.extend_from_slice(&leftover);
            frame.extend_from_slice(&[8, 0]);
            frame.extend_from_slice(&ip);
            frame
        };
        let fresh = sll(0, [0, 0]);
        let reused = sll(0, [0xc1, 0x90]);
        assert_eq!(
            key(LINKTYPE_LINUX_SLL, 52, &fresh),
            key(LINKTYPE_LINUX_SLL, 52, &reused)
        );
        // The written fields still tell packets apart: its way (incoming
        // or outgoing), and of course its bytes.
        assert_ne!(
            key(LINKTYPE_LINUX_SLL, 52, &fresh),
            key(LINKTYPE_LINUX_SLL, 52, &sll(4, [0, 0]))
        );
        let mut other = fresh.clone();
        *other.last_mut().unwrap() = 17;
        assert_ne!(
            key(LINKTYPE_LINUX_SLL, 52, &fresh),
            key(LINKTYPE_LINUX_SLL, 52, &other)
        );

        // SLL2: protocol, reserved, ifindex, hatype, pkttype, halen, then
        // the eight address bytes.
        let sll2 = |leftover: [u8; 2]| {
            let mut frame = vec![8, 0, 0, 0, 0, 0, 0, 1, 3, 4, 0, 6, 0, 0, 0, 0, 0, 0];
            frame.extend_from_slice(&leftover);
            frame.extend_from_slice(&ip);
            frame
        };
        assert_eq!(
            key(LINKTYPE_LINUX_SLL2, 52, &sll2([0, 0])),
            key(LINKTYPE_LINUX_SLL2, 52, &sll2([0xdc, 0xb0]))
        );
        // Other link types keep every byte.
        assert_ne!(key(1, 52, &fresh), key(1, 52, &reused));
    }
}
