//! A real mount of a netstatfs binary in a scratch directory, its log, and
//! its end: SIGTERM, then SIGKILL, then a lazy unmount if one is left.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::{ScratchDir, mounted_at, wait_until};

/// How long a daemon may take to mount.
const MOUNT_WAIT: Duration = Duration::from_secs(15);

/// One daemon and its mount point; both gone when dropped.
pub struct Mount {
    scratch: ScratchDir,
    pub path: PathBuf,
    log_path: PathBuf,
    child: Option<Child>,
}

impl Mount {
    /// Runs `binary` with exactly `args` (the mount point last), through
    /// `wrapper` (e.g. setpriv) if given, on a mount point owned by `owner`
    /// if given, with debug logging to a file; returns once the mount is
    /// there. Panics if the daemon exits or does not mount in 15 s.
    pub fn launch(
        binary: &Path,
        wrapper: &[&str],
        owner: Option<(u32, u32)>,
        args: &[&str],
    ) -> Mount {
        let mut mount = Self::spawn(binary, wrapper, owner, args);
        wait_until(MOUNT_WAIT, "the mount to appear", || {
            let exited = mount
                .child
                .as_mut()
                .and_then(|child| child.try_wait().ok().flatten());
            if let Some(status) = exited {
                panic!("netstatfs exited with {status}:\n{}", mount.log());
            }
            // A private mount of another user is there even if root may
            // not look inside.
            mounted_at(&mount.path)
                && std::fs::metadata(&mount.path).map_or_else(
                    |err| err.kind() == std::io::ErrorKind::PermissionDenied,
                    |_| true,
                )
        });
        mount
    }

    /// Starts the daemon without waiting for the mount.
    fn spawn(binary: &Path, wrapper: &[&str], owner: Option<(u32, u32)>, args: &[&str]) -> Mount {
        let scratch = ScratchDir::new("mount");
        let path = scratch.0.join("m");
        std::fs::create_dir(&path).unwrap();
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&path, Some(uid), Some(gid)).unwrap();
        }
        let log_path = scratch.0.join("daemon.log");
        let log = File::create(&log_path).unwrap();
        let mut command = match wrapper.split_first() {
            Some((program, wrapper_args)) => {
                let mut command = Command::new(program);
                command.args(wrapper_args).arg(binary);
                command
            }
            None => Command::new(binary),
        };
        let child = command
            .args(args)
            .arg(&path)
            // Debug lines are what tests await; NETSTATFS_LOG asks for more
            // (`netstatfs=trace`) when looking into a run.
            .env(
                "RUST_LOG",
                std::env::var("NETSTATFS_LOG").unwrap_or_else(|_| "netstatfs=debug".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start {}: {err}", binary.display()));
        Mount {
            scratch,
            path,
            log_path,
            child: Some(child),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("daemon running").id()
    }

    /// Where the daemon's log is written.
    pub fn log_path(&self) -> PathBuf {
        self.log_path.clone()
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Waits up to `timeout` for `text` in the log written after byte
    /// `since` (a length of [`Mount::log`] taken before); an error says
    /// what did not come.
    pub fn wait_log(&self, since: usize, text: &str, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        while !self.log().get(since..).unwrap_or_default().contains(text) {
            if Instant::now() > deadline {
                return Err(format!("netstatfs did not log {text:?} within {timeout:?}"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    pub fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.pid() as i32), signal).unwrap();
    }

    /// Waits for the daemon to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let child = self.child.as_mut().expect("daemon running");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "daemon did not exit within {timeout:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A process directory's path.
    pub fn dir(&self, pid: u32, comm: &str) -> PathBuf {
        self.path.join(format!("{pid}_{comm}"))
    }

    /// The mount's scratch directory (outside the mount).
    pub fn scratch(&self) -> &Path {
        &self.scratch.0
    }

    /// The daemon's CPU seconds so far.
    pub fn cpu_seconds(&self) -> f64 {
        crate::process::cpu_seconds(self.pid())
    }

    /// The daemon's (current, peak) resident set in KiB.
    pub fn rss_kib(&self) -> (u64, u64) {
        crate::process::rss_kib(self.pid())
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = Pid::from_raw(child.id() as i32);
            let _ = kill(pid, Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(5);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        if mounted_at(&self.path) {
            let _ = nix::mount::umount2(&self.path, nix::mount::MntFlags::MNT_DETACH);
        }
        if std::thread::panicking() {
            eprintln!("--- daemon log ---\n{}", self.log());
        }
    }
}
