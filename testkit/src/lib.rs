//! What the integration tests (`tests/integration`) and the benchmark
//! harness (`examples/bench`) share, so that both mount, wait and clean up
//! the same way: a real mount of a netstatfs binary ([`Mount`]), scratch
//! directories ([`ScratchDir`]), bounded waits ([`wait_until`],
//! [`wait_for`]), and what /proc says of a process's CPU and memory
//! ([`process`]).
//!
//! Every helper cleans up in `Drop`, so a failure (a test's panic, a
//! benchmark's error) leaves no mount or directory behind.

pub mod mount;
pub mod process;

pub use mount::Mount;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Polls `condition` every 20 ms until it holds; panics after `timeout`
/// with `what` (a wait for an event with a deadline, not a sleep).
pub fn wait_until(timeout: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    wait_for(timeout, what, || condition().then_some(()))
}

/// Like [`wait_until`] for a value.
pub fn wait_for<T>(timeout: Duration, what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether anything is mounted at `path` (by /proc/self/mountinfo).
pub fn mounted_at(path: &Path) -> bool {
    let Some(wanted) = path.to_str() else {
        return false;
    };
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|line| line.split(' ').nth(4) == Some(wanted))
}

/// A unique scratch directory under /tmp, removed on drop.
pub struct ScratchDir(pub PathBuf);

impl ScratchDir {
    pub fn new(tag: &str) -> ScratchDir {
        use std::sync::atomic::{AtomicU32, Ordering};
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "netstatfs-{tag}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).unwrap();
        ScratchDir(path)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
