//! The rings' events merged into one time order, and the time up to which
//! the order is final (pure).
//!
//! Each CPU has its ring, so one drain sees each CPU's events in order but
//! not the CPUs' interleaving; and the kernel reuses a closed socket's
//! address at once. Applied ring by ring, an old connection's last state
//! change from one CPU could land after a new socket's events from the
//! other at the same address, and be credited to the new socket's process.
//! So the events of every ring are merged and handed over by time, up to a
//! moment just before the drain began ([`COVER_MARGIN`]): every event
//! older than that was in its ring by then; newer ones wait for the next
//! round. The consumer takes that moment as the time its events cover, and
//! decides packets up to it: an event that turns up later stamped before it
//! ([`Merge::late`]) came too late for them.

/// How long before a drain began its events are taken to cover. An event
/// is stamped before the kernel writes it into its ring, and the stamp's
/// clock (each CPU's) and the reader's differ by a little: without a
/// margin, the accuracy harness saw about one event a thousand flows turn
/// up a drain late, stamped up to 281 ns before the time the drain before
/// had covered. A quarter of a millisecond is a thousand times that, and
/// half the [`crate::attribution::SKEW`] packets wait for anyway.
pub const COVER_MARGIN_NS: u64 = 250_000;

/// Events drained and not yet handed over, by the time they were stamped.
#[derive(Debug)]
pub struct Merge<T> {
    pending: Vec<(u64, T)>,
    /// The time the events handed over so far cover.
    covered_ns: u64,
    /// Events that came stamped before `covered_ns`, and the most late.
    late: u64,
    most_late_ns: u64,
}

impl<T> Default for Merge<T> {
    fn default() -> Self {
        Merge {
            pending: Vec::new(),
            covered_ns: 0,
            late: 0,
            most_late_ns: 0,
        }
    }
}

impl<T> Merge<T> {
    /// An event drained from a ring, stamped `time_ns` (CLOCK_MONOTONIC).
    pub fn push(&mut self, time_ns: u64, event: T) {
        if time_ns < self.covered_ns {
            self.late += 1;
            self.most_late_ns = self.most_late_ns.max(self.covered_ns - time_ns);
        }
        self.pending.push((time_ns, event));
    }

    /// Moves the events stamped up to [`COVER_MARGIN_NS`] before
    /// `drain_began_ns` into `ready`, in time order (those stamped alike in
    /// the order they were drained); the time they cover.
    pub fn take(&mut self, drain_began_ns: u64, ready: &mut Vec<(u64, T)>) -> u64 {
        let covered = drain_began_ns
            .saturating_sub(COVER_MARGIN_NS)
            .max(self.covered_ns);
        self.pending.sort_by_key(|(time, _)| *time);
        let count = self.pending.partition_point(|(time, _)| *time <= covered);
        ready.extend(self.pending.drain(..count));
        self.covered_ns = covered;
        covered
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// How many events came stamped before the time already covered, and
    /// the most late of them, in nanoseconds.
    pub fn late(&self) -> (u64, u64) {
        (self.late, self.most_late_ns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn events_of_two_rings_come_out_in_time_order_up_to_the_margin() {
        let mut merge = Merge::default();
        // One ring's, then the other's.
        merge.push(10 * MS, "a1");
        merge.push(30 * MS, "a2");
        merge.push(20 * MS, "b1");
        merge.push(40 * MS - COVER_MARGIN_NS / 2, "b2");
        let mut ready = Vec::new();
        let covered = merge.take(40 * MS, &mut ready);
        assert_eq!(covered, 40 * MS - COVER_MARGIN_NS);
        let names: Vec<&str> = ready.iter().map(|(_, name)| *name).collect();
        assert_eq!(names, ["a1", "b1", "a2"]);
        // Within the margin: the next round's.
        assert!(!merge.is_empty());
        ready.clear();
        merge.push(45 * MS, "a3");
        merge.take(50 * MS, &mut ready);
        let names: Vec<&str> = ready.iter().map(|(_, name)| *name).collect();
        assert_eq!(names, ["b2", "a3"]);
        assert!(merge.is_empty());
        assert_eq!(merge.late(), (0, 0));
    }

    #[test]
    fn an_event_stamped_before_the_time_covered_is_counted_late() {
        let mut merge = Merge::default();
        let mut ready = Vec::new();
        let covered = merge.take(40 * MS, &mut ready);
        merge.push(covered - 300, "behind");
        merge.push(covered + 1, "in time");
        assert_eq!(merge.late(), (1, 300));
        // Still handed over (in its order), not dropped.
        merge.take(50 * MS, &mut ready);
        let names: Vec<&str> = ready.iter().map(|(_, name)| *name).collect();
        assert_eq!(names, ["behind", "in time"]);
    }

    #[test]
    fn the_time_covered_never_goes_back() {
        let mut merge: Merge<()> = Merge::default();
        let mut ready = Vec::new();
        assert_eq!(merge.take(50 * MS, &mut ready), 50 * MS - COVER_MARGIN_NS);
        // A clock read earlier than the last (a drain's start is taken
        // before the rings are read; never earlier, but a clock may step).
        assert_eq!(merge.take(40 * MS, &mut ready), 50 * MS - COVER_MARGIN_NS);
        // At boot, before the margin has passed.
        let mut fresh: Merge<()> = Merge::default();
        assert_eq!(fresh.take(100, &mut ready), 0);
    }
}
