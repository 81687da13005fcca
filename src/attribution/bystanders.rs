//! Threads whose UDP events the kernel is asked to leave out: busy
//! threads of *bystanders*, processes that are no stream's and hold none
//! of the sockets the streams watch (pure: what a process's fds hold is
//! handed in).
//!
//! Every unconnected UDP datagram costs the events reader a route lookup
//! and a send, and its receiver a read: a flood of 100,000 datagrams a
//! second between two other processes is 300,000 events a second to
//! decode and apply, for streams that watch neither process. Their claims
//! decide nothing for the streams: a packet is a member's by its sockets
//! and its members' own claims, never by a bystander's, and where a
//! bystander's claim would say "not a member's" the packet is only held
//! until its flow is told apart another way (the capture's filter leaves
//! such flows out once they are known to be nobody's). What must never be
//! left out is a claim that takes a packet *away* from a member: of a
//! process that shares a socket with a member, or holds a socket sharing a
//! member's port (a rival, see [`crate::capture::filter::rivals_of`]). So
//! a thread is left out only once its process was seen to hold none of the
//! watched sockets, and the process is looked at again every [`RECHECK`]:
//! one that has come to hold a watched socket, or whose thread ended (its
//! id may be another process's next), is read about again then. A process
//! that becomes a member is read about again at once. (The fds are not
//! looked at each time the watched sockets change: a busy server's change
//! every few milliseconds, and a big process's fds take milliseconds to
//! read, on the events reader's thread.)
//!
//! Known limit: a bystander that comes to share a socket with a member
//! (one hands the other its fd over a unix socket) is read about again
//! only at its next look, up to [`RECHECK`] later; until then its
//! datagrams on that socket may be taken for the member's.

use std::time::{Duration, Instant};

use rustc_hash::{FxHashMap, FxHashSet};

use crate::capture::classify::Transport;
use crate::events::Sample;
use crate::events::decode::Event;

/// A thread with this many UDP events in a window is busy.
pub const BUSY_EVENTS: u32 = 1000;
/// How long events are counted before the counts start over.
const WINDOW: Duration = Duration::from_secs(1);
/// How often a left-out thread's process is looked at again.
pub const RECHECK: Duration = Duration::from_secs(1);
/// How many threads are left out at most (a filter is a few instructions
/// a thread, run for every event).
pub const MAX_QUIET: usize = 32;

/// What the streams watch: their member processes and the sockets (inodes)
/// whose events they need, their rivals included.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Watched {
    pub pids: FxHashSet<u32>,
    pub inodes: FxHashSet<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Quiet {
    tid: u32,
    pid: u32,
    looked: Instant,
}

/// What a review needs to know of the system's processes (the daemon
/// reads /proc; tests answer from a table).
pub trait Processes {
    /// The sockets (inodes) process `pid` holds; None if it is gone or its
    /// fds cannot be looked at (cheaply).
    fn socket_inodes(&mut self, pid: u32) -> Option<Vec<u64>>;
    /// Whether thread `tid` of process `pid` still runs (a thread id comes
    /// back as another process's once the ids wrap).
    fn thread_alive(&mut self, pid: u32, tid: u32) -> bool;
}

/// A table of each process's sockets, whose threads all run.
impl<F: FnMut(u32) -> Option<Vec<u64>>> Processes for F {
    fn socket_inodes(&mut self, pid: u32) -> Option<Vec<u64>> {
        self(pid)
    }

    fn thread_alive(&mut self, _pid: u32, _tid: u32) -> bool {
        true
    }
}

/// How the left-out threads changed at a review.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Change {
    /// The list changed: the filters should follow.
    pub changed: bool,
    /// A thread is read about again: at once, not at the next interval.
    pub urgent: bool,
}

/// The busy threads counted and those left out.
#[derive(Debug)]
pub struct Bystanders {
    own_pid: u32,
    counts: FxHashMap<u32, (u32, u32)>,
    window: Option<Instant>,
    quiet: Vec<Quiet>,
    /// Busy processes found not to be bystanders, and when: not looked at
    /// again before [`RECHECK`] (a busy server's fds are many).
    not_bystanders: FxHashMap<u32, Instant>,
}

impl Bystanders {
    /// `own_pid`: the daemon, whose probes must always be read.
    pub fn new(own_pid: u32) -> Bystanders {
        Bystanders {
            own_pid,
            counts: FxHashMap::default(),
            window: None,
            quiet: Vec::new(),
            not_bystanders: FxHashMap::default(),
        }
    }

    /// Counts the UDP events threads made in their own context.
    pub fn note(&mut self, samples: &[Sample], now: Instant) {
        if self
            .window
            .is_none_or(|start| now.duration_since(start) >= WINDOW)
        {
            self.window = Some(now);
            self.counts.clear();
        }
        for sample in samples {
            let udp = match sample.decoded.event {
                Event::Route { transport, .. } | Event::SocketIo { transport, .. } => {
                    transport == Transport::Udp
                }
                _ => false,
            };
            if udp && !sample.decoded.in_interrupt {
                let entry = self.counts.entry(sample.tid).or_insert((sample.pid, 0));
                entry.1 += 1;
            }
        }
    }

    /// Looks again at the left-out threads that are due, reads again those
    /// of processes that became members, and leaves out the busy threads
    /// of bystanders.
    pub fn review(
        &mut self,
        now: Instant,
        watched: &Watched,
        processes: &mut impl Processes,
    ) -> Change {
        let mut change = Change::default();
        self.not_bystanders
            .retain(|_, looked| now.duration_since(*looked) < RECHECK);
        // A process's fds are looked at once per review, for all its threads.
        let mut looked: FxHashMap<u32, bool> = FxHashMap::default();
        let mut is_bystander = |pid: u32, processes: &mut dyn FnMut(u32) -> Option<Vec<u64>>| {
            *looked.entry(pid).or_insert_with(|| {
                !watched.pids.contains(&pid)
                    && processes(pid).is_some_and(|inodes| {
                        !inodes.iter().any(|inode| watched.inodes.contains(inode))
                    })
            })
        };
        let before = self.quiet.len();
        let mut lifted = Vec::new();
        self.quiet.retain_mut(|quiet| {
            let keep = if watched.pids.contains(&quiet.pid) {
                false
            } else if now.duration_since(quiet.looked) < RECHECK {
                true
            } else {
                quiet.looked = now;
                processes.thread_alive(quiet.pid, quiet.tid)
                    && is_bystander(quiet.pid, &mut |pid| processes.socket_inodes(pid))
            };
            if !keep {
                lifted.push(quiet.tid);
            }
            keep
        });
        // A thread read again proves itself busy again before it is left
        // out again (an ended one never does).
        for tid in lifted {
            self.counts.remove(&tid);
        }
        if self.quiet.len() != before {
            change.changed = true;
            change.urgent = true;
        }
        let mut busy: Vec<(u32, u32)> = self
            .counts
            .iter()
            .filter(|(tid, (pid, count))| {
                *count >= BUSY_EVENTS
                    && *pid != self.own_pid
                    && !self.not_bystanders.contains_key(pid)
                    && !self.quiet.iter().any(|quiet| quiet.tid == **tid)
            })
            .map(|(tid, (pid, _))| (*tid, *pid))
            .collect();
        busy.sort_unstable();
        for (tid, pid) in busy {
            if self.quiet.len() >= MAX_QUIET {
                break;
            }
            if is_bystander(pid, &mut |pid| processes.socket_inodes(pid)) {
                self.quiet.push(Quiet {
                    tid,
                    pid,
                    looked: now,
                });
                change.changed = true;
            } else {
                self.not_bystanders.insert(pid, now);
            }
        }
        change
    }

    /// The threads left out, in the order they were.
    pub fn quiet_threads(&self) -> impl Iterator<Item = u32> + '_ {
        self.quiet.iter().map(|quiet| quiet.tid)
    }

    /// What to add to a filter so that it leaves the quiet threads out
    /// (empty while none is).
    pub fn filter_clause(&self) -> String {
        self.quiet
            .iter()
            .map(|quiet| format!(" && common_pid != {}", quiet.tid))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::events::decode::{Decoded, Direction};

    fn udp_send(pid: u32, tid: u32) -> Sample {
        Sample {
            at: SystemTime::now(),
            pid,
            tid,
            decoded: Decoded {
                event: Event::Route {
                    transport: Transport::Udp,
                    local_port: 5000,
                    remote: "127.0.0.1:6000".parse().unwrap(),
                },
                in_interrupt: false,
            },
        }
    }

    fn udp_read(pid: u32, tid: u32) -> Sample {
        Sample {
            at: SystemTime::now(),
            pid,
            tid,
            decoded: Decoded {
                event: Event::SocketIo {
                    sock: 0xabc0,
                    transport: Transport::Udp,
                    direction: Direction::Receive,
                    result: 64,
                    flags: 0,
                },
                in_interrupt: false,
            },
        }
    }

    fn burst(sample: Sample) -> Vec<Sample> {
        vec![sample; BUSY_EVENTS as usize]
    }

    fn watched(pids: &[u32], inodes: &[u64]) -> Watched {
        Watched {
            pids: pids.iter().copied().collect(),
            inodes: inodes.iter().copied().collect(),
        }
    }

    #[test]
    fn a_flood_between_two_bystanders_is_left_out() {
        let start = Instant::now();
        let mut bystanders = Bystanders::new(1);
        // Members: process 10, socket 100; the flood: 20 sends to 30.
        let members = watched(&[10], &[100]);
        let mut fds = |pid: u32| match pid {
            10 => Some(vec![100]),
            20 => Some(vec![200]),
            30 => Some(vec![300]),
            _ => None,
        };
        let mut samples = burst(udp_send(20, 21));
        samples.extend(burst(udp_read(30, 30)));
        // A member as busy, a quieter bystander and the daemon's own probes.
        samples.extend(burst(udp_read(10, 10)));
        samples.extend(vec![udp_send(40, 40); BUSY_EVENTS as usize - 1]);
        samples.extend(burst(udp_read(1, 1)));
        bystanders.note(&samples, start);
        let change = bystanders.review(start, &members, &mut fds);
        assert_eq!(
            change,
            Change {
                changed: true,
                urgent: false
            }
        );
        assert_eq!(bystanders.quiet_threads().collect::<Vec<_>>(), [21, 30]);
        assert_eq!(
            bystanders.filter_clause(),
            " && common_pid != 21 && common_pid != 30"
        );
        // Nothing new, nothing due: no change.
        assert_eq!(
            bystanders.review(start + Duration::from_millis(50), &members, &mut fds),
            Change::default()
        );
    }

    #[test]
    fn a_bystander_that_takes_a_watched_socket_or_joins_is_read_again_at_once() {
        let start = Instant::now();
        let mut bystanders = Bystanders::new(1);
        let mut samples = burst(udp_send(20, 20));
        samples.extend(burst(udp_send(30, 30)));
        bystanders.note(&samples, start);
        let members = watched(&[10], &[100]);
        bystanders.review(start, &members, &mut |pid: u32| Some(vec![pid.into()]));
        assert_eq!(bystanders.quiet_threads().count(), 2);
        // Process 20 is handed socket 100: seen at its next look.
        let mut looks = |pid: u32| match pid {
            20 => Some(vec![200, 100]),
            other => Some(vec![other.into()]),
        };
        assert_eq!(
            bystanders.review(start + Duration::from_millis(500), &members, &mut looks),
            Change::default(),
            "not due yet"
        );
        let change = bystanders.review(start + RECHECK, &members, &mut looks);
        assert!(change.changed && change.urgent);
        assert_eq!(bystanders.quiet_threads().collect::<Vec<_>>(), [30]);
        // Process 30 becomes a member (a tree adopts it): at once.
        let change = bystanders.review(
            start + RECHECK + Duration::from_millis(1),
            &watched(&[10, 30], &[100]),
            &mut looks,
        );
        assert!(change.changed && change.urgent);
        assert_eq!(bystanders.quiet_threads().count(), 0);
    }

    /// Processes as a table: each one's sockets and running threads; how
    /// often each one's fds were looked at.
    #[derive(Default)]
    struct Table {
        sockets: FxHashMap<u32, Vec<u64>>,
        threads: FxHashMap<u32, Vec<u32>>,
        looks: FxHashMap<u32, u32>,
    }

    impl Processes for Table {
        fn socket_inodes(&mut self, pid: u32) -> Option<Vec<u64>> {
            *self.looks.entry(pid).or_default() += 1;
            self.sockets.get(&pid).cloned()
        }

        fn thread_alive(&mut self, pid: u32, tid: u32) -> bool {
            self.threads
                .get(&pid)
                .is_some_and(|threads| threads.contains(&tid))
        }
    }

    #[test]
    fn a_thread_that_ends_is_read_again_and_a_busy_sharer_is_looked_at_once_a_second() {
        let start = Instant::now();
        let mut bystanders = Bystanders::new(1);
        let mut table = Table::default();
        // 20's thread 21 floods; 60 shares the member's socket 100 and is
        // as busy.
        table.sockets.insert(20, vec![200]);
        table.threads.insert(20, vec![20, 21]);
        table.sockets.insert(60, vec![100]);
        table.threads.insert(60, vec![60]);
        let mut samples = burst(udp_send(20, 21));
        samples.extend(burst(udp_send(60, 60)));
        bystanders.note(&samples, start);
        let members = watched(&[10], &[100]);
        bystanders.review(start, &members, &mut table);
        assert_eq!(bystanders.quiet_threads().collect::<Vec<_>>(), [21]);
        for step in 1..20 {
            // The watched sockets change at every review (a busy server's
            // connections come and go): nobody's fds are read again for it.
            let at = start + Duration::from_millis(50 * step);
            let churning = watched(&[10], &[100, 1000 + step]);
            bystanders.review(at, &churning, &mut table);
        }
        assert_eq!(table.looks[&60], 1, "the sharer's fds, once a second");
        assert_eq!(table.looks[&20], 1, "the bystander's, once a second");
        // Thread 21 ends (its id may be another process's next).
        table.threads.insert(20, vec![20]);
        let change = bystanders.review(start + RECHECK, &members, &mut table);
        assert!(change.changed && change.urgent);
        assert_eq!(bystanders.quiet_threads().count(), 0);
        assert_eq!(table.looks[&60], 2, "and again after a second");
    }

    #[test]
    fn a_bystander_that_exits_is_read_again_and_rivals_are_watched() {
        let start = Instant::now();
        let mut bystanders = Bystanders::new(1);
        let mut samples = burst(udp_send(20, 20));
        // 50 holds a socket sharing a member's port (a rival, 500).
        samples.extend(burst(udp_send(50, 50)));
        bystanders.note(&samples, start);
        let members = watched(&[10], &[100, 500]);
        bystanders.review(start, &members, &mut |pid: u32| match pid {
            50 => Some(vec![500]),
            other => Some(vec![other.into()]),
        });
        assert_eq!(bystanders.quiet_threads().collect::<Vec<_>>(), [20]);
        let change = bystanders.review(start + RECHECK, &members, &mut |_| None);
        assert!(change.changed && change.urgent);
        assert_eq!(bystanders.quiet_threads().count(), 0);
        // A new window starts the counts over.
        bystanders.note(&[], start + RECHECK + WINDOW);
        assert_eq!(
            bystanders.review(
                start + RECHECK + WINDOW,
                &members,
                &mut |_| Some(Vec::new())
            ),
            Change::default()
        );
    }
}
