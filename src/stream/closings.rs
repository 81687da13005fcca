//! The log's "stream closed" lines, summarized in bursts.
//!
//! Each stream says when it closes how many packets it delivered and what
//! it missed. A tool that opens 80 streams in a second (the Wireshark
//! extcap listing, a script over every socket) would write 80 such lines:
//! within a second of the first, the first [`SAID_PER_BURST`] clean
//! closings are said one by one and the rest are held and said as one
//! line once the second is over. A stream that missed packets is always
//! said on its own: that is what the log is read for.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use log::info;

/// How long a burst of closings lasts, from its first.
const BURST: Duration = Duration::from_secs(1);
/// Clean closings said one by one in a burst.
pub const SAID_PER_BURST: u32 = 8;

/// The closings of the current burst (pure: the caller says the time).
#[derive(Default)]
pub struct Closings {
    burst_began: Option<Instant>,
    said: u32,
    held_streams: u64,
    held_packets: u64,
}

impl Closings {
    /// A stream closed with `line`; `clean` if it missed nothing. The lines
    /// to log now: a held burst's summary first if its second is over,
    /// then this line unless it is held.
    pub fn closed(
        &mut self,
        now: Instant,
        line: String,
        clean: bool,
        delivered: u64,
    ) -> Vec<String> {
        let mut lines: Vec<String> = self.due(now).into_iter().collect();
        if self.burst_began.is_none() {
            self.burst_began = Some(now);
        }
        if !clean || self.said < SAID_PER_BURST {
            if clean {
                self.said += 1;
            }
            lines.push(line);
        } else {
            self.held_streams += 1;
            self.held_packets += delivered;
        }
        lines
    }

    /// The summary of a burst whose second is over, once.
    pub fn due(&mut self, now: Instant) -> Option<String> {
        let began = self.burst_began?;
        if now.duration_since(began) < BURST {
            return None;
        }
        let summary = (self.held_streams > 0).then(|| {
            let streams = match self.held_streams {
                1 => "1 more stream".to_owned(),
                n => format!("{n} more streams"),
            };
            format!(
                "{streams} closed within a second: {} packets delivered, none missed",
                self.held_packets
            )
        });
        *self = Closings::default();
        summary
    }

    /// What is held, said now (at exit).
    pub fn flush(&mut self) -> Option<String> {
        let began = self.burst_began?;
        self.due(began + BURST)
    }
}

/// The daemon's closings.
static CLOSINGS: Mutex<Option<Closings>> = Mutex::new(None);

fn with<T>(use_them: impl FnOnce(&mut Closings) -> T) -> T {
    let mut closings = CLOSINGS.lock().unwrap_or_else(PoisonError::into_inner);
    use_them(closings.get_or_insert_with(Closings::default))
}

/// Logs a stream's closing line, or holds it for its burst's summary.
pub fn say(line: String, clean: bool, delivered: u64) {
    for line in with(|closings| closings.closed(Instant::now(), line, clean, delivered)) {
        info!("{line}");
    }
}

/// Logs a held burst's summary once its second is over (the watchdog asks
/// every tick).
pub fn say_due() {
    if let Some(line) = with(|closings| closings.due(Instant::now())) {
        info!("{line}");
    }
}

/// Logs what is held, at exit.
pub fn say_held() {
    if let Some(line) = with(Closings::flush) {
        info!("{line}");
    }
}

#[cfg(test)]
mod tests {
    use super::{Closings, SAID_PER_BURST};
    use std::time::{Duration, Instant};

    fn clean(n: u32) -> String {
        format!("{n}_x/udp: stream closed: 1 packets delivered, none missed")
    }

    #[test]
    fn a_burst_says_its_first_closings_and_sums_up_the_rest() {
        let start = Instant::now();
        let mut closings = Closings::default();
        let mut said = Vec::new();
        for n in 0..80 {
            let at = start + Duration::from_millis(u64::from(n) * 10);
            said.extend(closings.closed(at, clean(n), true, 1));
        }
        assert_eq!(said.len(), SAID_PER_BURST as usize);
        // 80 closings over 0.8 s: the summary comes once the second is over.
        assert_eq!(closings.due(start + Duration::from_millis(900)), None);
        assert_eq!(
            closings.due(start + Duration::from_millis(1000)).as_deref(),
            Some("72 more streams closed within a second: 72 packets delivered, none missed")
        );
        assert_eq!(closings.due(start + Duration::from_secs(5)), None);
    }

    #[test]
    fn a_stream_that_missed_packets_is_always_said() {
        let start = Instant::now();
        let mut closings = Closings::default();
        for n in 0..20 {
            closings.closed(start, clean(n), true, 1);
        }
        let missed =
            "9_x/all: stream closed: 5 packets delivered, 2 missed (2 dropped by the kernel)";
        assert_eq!(
            closings.closed(start, missed.to_owned(), false, 5),
            [missed.to_owned()]
        );
    }

    #[test]
    fn the_next_closing_after_a_burst_says_its_summary_first() {
        let start = Instant::now();
        let mut closings = Closings::default();
        for n in 0..10 {
            closings.closed(start, clean(n), true, 3);
        }
        let later = closings.closed(start + Duration::from_secs(2), clean(99), true, 1);
        assert_eq!(
            later,
            [
                "2 more streams closed within a second: 6 packets delivered, none missed"
                    .to_owned(),
                clean(99)
            ]
        );
        assert_eq!(closings.flush(), None);
        for n in 0..10 {
            closings.closed(start + Duration::from_secs(2), clean(n), true, 1);
        }
        assert!(
            closings
                .flush()
                .is_some_and(|line| line.starts_with("2 more streams closed"))
        );
    }
}
