//! What the tests share: a real mount of the built binary, peer processes
//! that hold sockets on command, network namespaces, bounded waits, and a
//! decoder for the pcap streams.
//!
//! Every helper cleans up in `Drop`, so a failing test leaves no mount,
//! process or namespace behind.

pub mod cgroup;
pub mod docker;
pub mod mount;
pub mod netns;
pub mod nginx;
pub mod packets;
pub mod peer;
pub mod syslog;
pub mod tcpdump;
pub mod users;

use std::path::Path;
use std::time::Instant;

/// Processes a test started outside [`peer::Peer`] (a script's children),
/// killed however the test ends.
pub use testkit::process::KillOnDrop;
pub use testkit::{ScratchDir, mounted_at, wait_for, wait_until};

/// Held by tests that saturate this 2-core machine (hundreds of streams,
/// ab against nginx, the accuracy harness): they run one at a time, so that
/// neither they nor the timing of the others suffer from each other.
pub static HEAVY: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Takes [`HEAVY`] (a test that panicked while holding it is no reason to
/// fail the next).
pub fn heavy() -> std::sync::MutexGuard<'static, ()> {
    HEAVY
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The names in a directory, sorted.
pub fn list(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|err| panic!("cannot list {}: {err}", dir.display()))
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

/// The names in a directory, or None if it cannot be listed (yet).
pub fn try_list(dir: &Path) -> Option<Vec<String>> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .collect();
    names.sort();
    Some(names)
}

/// An extended attribute as text.
pub fn xattr(path: &Path, name: &str) -> Option<String> {
    let output = std::process::Command::new("getfattr")
        .args(["--only-values", "--absolute-names", "-n", name])
        .arg(path)
        .output()
        .expect("getfattr runs");
    output
        .status
        .success()
        .then(|| String::from_utf8(output.stdout).unwrap())
}

/// Reads a file on a thread until EOF; returns the bytes so far and the
/// thread, which returns when EOF came.
pub fn read_to_eof(
    path: &Path,
) -> (
    std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    std::thread::JoinHandle<Instant>,
) {
    use std::io::Read;
    let mut file = std::fs::File::open(path)
        .unwrap_or_else(|err| panic!("cannot open {}: {err}", path.display()));
    let bytes = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = std::sync::Arc::clone(&bytes);
    let thread = std::thread::spawn(move || {
        let mut buffer = vec![0u8; 1 << 20];
        loop {
            let n = file.read(&mut buffer).unwrap();
            if n == 0 {
                return Instant::now();
            }
            sink.lock().unwrap().extend_from_slice(&buffer[..n]);
        }
    });
    (bytes, thread)
}

/// How long a stream test waits for the daemon.
const STREAM_WAIT: std::time::Duration = std::time::Duration::from_secs(20);

/// Opens `<pid>_<comm>/<file>` once listed, reads it to EOF on a thread,
/// and returns once its capture runs.
pub fn open_stream(
    mount: &mount::Mount,
    pid: u32,
    comm: &str,
    file: &str,
) -> (
    std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    std::thread::JoinHandle<Instant>,
) {
    let path = mount.dir(pid, comm).join(file);
    wait_until(STREAM_WAIT, &format!("{}", path.display()), || {
        path.exists()
    });
    let label = format!("{pid}_{comm}/{file}: capture running");
    let reading = read_to_eof(&path);
    wait_until(STREAM_WAIT, &label, || mount.log().contains(&label));
    reading
}
