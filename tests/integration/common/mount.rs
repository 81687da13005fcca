//! A real netstatfs mount of the built binary in a scratch directory.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::{ScratchDir, mounted_at, wait_until};

pub const BINARY: &str = env!("CARGO_BIN_EXE_netstatfs");

pub struct Mount {
    scratch: ScratchDir,
    pub path: PathBuf,
    log_path: PathBuf,
    child: Option<Child>,
}

impl Mount {
    /// Mounts with a short cache TTL (tests wait for changes to show) plus
    /// `args`, and waits until the mount answers.
    pub fn start(args: &[&str]) -> Mount {
        let mut all = vec!["--cache-ttl", "100ms"];
        all.extend_from_slice(args);
        Self::start_exact(&all)
    }

    /// Mounts with exactly `args` (before the mountpoint).
    pub fn start_exact(args: &[&str]) -> Mount {
        Self::start_wrapped(&[], args)
    }

    /// Mounts with the daemon started through `wrapper` (e.g. setpriv).
    pub fn start_wrapped(wrapper: &[&str], args: &[&str]) -> Mount {
        Self::start_launched(wrapper, Path::new(BINARY), None, args)
    }

    /// Mounts as another user, with `binary` (a copy that may carry file
    /// capabilities), on a mountpoint that user owns.
    pub fn start_as(uid: u32, gid: u32, binary: &Path, args: &[&str]) -> Mount {
        let wrapper = [
            "setpriv".to_owned(),
            format!("--reuid={uid}"),
            format!("--regid={gid}"),
            "--clear-groups".to_owned(),
        ];
        let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
        let mut all = vec!["--cache-ttl", "100ms"];
        all.extend_from_slice(args);
        Self::start_launched(&wrapper, binary, Some((uid, gid)), &all)
    }

    fn start_launched(
        wrapper: &[&str],
        binary: &Path,
        owner: Option<(u32, u32)>,
        args: &[&str],
    ) -> Mount {
        let mut mount = Self::spawn_launched(wrapper, binary, owner, args);
        wait_until(Duration::from_secs(15), "the mount to appear", || {
            let exited = mount
                .child
                .as_mut()
                .and_then(|child| child.try_wait().unwrap());
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
    fn spawn_launched(
        wrapper: &[&str],
        binary: &Path,
        owner: Option<(u32, u32)>,
        args: &[&str],
    ) -> Mount {
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
            .env("RUST_LOG", "netstatfs=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("netstatfs starts");
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

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
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
