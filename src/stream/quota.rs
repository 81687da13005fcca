//! How many streams may be open at once (pure): each costs a capture (a
//! kernel ring and threads) and a queue, so one user must not be able to
//! exhaust the daemon for everyone.
//!
//! A user who is not root may hold at most `per_user` streams (EMFILE
//! beyond, as a process past its own fd limit gets); everyone together at
//! most `total` (ENFILE, as for the system's file table). Root has no
//! per-user limit but counts toward the total.

use std::collections::HashMap;

/// The limits, from `--max-streams-per-user` and `--max-streams`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamLimits {
    pub per_user: usize,
    pub total: usize,
}

impl Default for StreamLimits {
    fn default() -> Self {
        StreamLimits {
            per_user: 32,
            total: 1024,
        }
    }
}

/// Why a stream may not be opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exceeded {
    /// This user holds `limit` streams already.
    User { uid: u32, limit: usize },
    /// The daemon holds `limit` streams already.
    Total { limit: usize },
}

/// The streams held, by user.
#[derive(Debug, Default)]
pub struct Quota {
    limits: StreamLimits,
    held: HashMap<u32, usize>,
    total: usize,
}

impl Quota {
    pub fn new(limits: StreamLimits) -> Quota {
        Quota {
            limits,
            ..Quota::default()
        }
    }

    /// Counts one more stream for `uid`, if the limits allow.
    pub fn take(&mut self, uid: u32) -> Result<(), Exceeded> {
        if self.total >= self.limits.total {
            return Err(Exceeded::Total {
                limit: self.limits.total,
            });
        }
        let held = self.held.entry(uid).or_insert(0);
        if uid != 0 && *held >= self.limits.per_user {
            return Err(Exceeded::User {
                uid,
                limit: self.limits.per_user,
            });
        }
        *held += 1;
        self.total += 1;
        Ok(())
    }

    /// One stream of `uid` closed (or never opened after all).
    pub fn give_back(&mut self, uid: u32) {
        if let Some(held) = self.held.get_mut(&uid) {
            *held = held.saturating_sub(1);
            if *held == 0 {
                self.held.remove(&uid);
            }
            self.total = self.total.saturating_sub(1);
        }
    }

    pub fn held_by(&self, uid: u32) -> usize {
        self.held.get(&uid).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_past_their_limit_is_refused_and_others_are_not() {
        let mut quota = Quota::new(StreamLimits {
            per_user: 2,
            total: 5,
        });
        assert_eq!(quota.take(1000), Ok(()));
        assert_eq!(quota.take(1000), Ok(()));
        assert_eq!(
            quota.take(1000),
            Err(Exceeded::User {
                uid: 1000,
                limit: 2
            })
        );
        assert_eq!(quota.take(1001), Ok(()));
        quota.give_back(1000);
        assert_eq!(quota.take(1000), Ok(()));
        assert_eq!(quota.held_by(1000), 2);
    }

    #[test]
    fn the_total_binds_everyone_root_included() {
        let mut quota = Quota::new(StreamLimits {
            per_user: 1,
            total: 3,
        });
        for _ in 0..3 {
            assert_eq!(quota.take(0), Ok(()), "root has no per-user limit");
        }
        assert_eq!(quota.take(0), Err(Exceeded::Total { limit: 3 }));
        assert_eq!(quota.take(1000), Err(Exceeded::Total { limit: 3 }));
        quota.give_back(0);
        assert_eq!(quota.take(1000), Ok(()));
        // Giving back what was never taken changes nothing.
        quota.give_back(4242);
        assert_eq!(quota.take(1001), Err(Exceeded::Total { limit: 3 }));
    }
}
