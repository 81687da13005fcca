//! Ground truth: a real tcpdump capturing the same traffic in the same
//! window as the stream under test, on loopback or inside a test's own
//! network namespace, stopped (SIGINT, its summary checked) and read back.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::ScratchDir;
use super::packets::{Seen, read_pcap_file};

pub struct Tcpdump {
    child: Option<Child>,
    path: PathBuf,
    _scratch: ScratchDir,
}

impl Tcpdump {
    /// Starts capturing `filter` on `interface` (in namespace `netns` if
    /// given), and returns once it is writing. Immediate mode and a ring
    /// of 2 KiB frames: every packet of a test's traffic fits, and none
    /// waits in an unfilled block when it stops.
    pub fn start(netns: Option<&str>, interface: &str, filter: &str) -> Tcpdump {
        match netns {
            Some(netns) => {
                Self::start_through(&["ip", "netns", "exec", netns], interface, filter, &[])
            }
            None => Self::start_through(&[], interface, filter, &[]),
        }
    }

    /// As [`Tcpdump::start`] on the daemon's namespace, with Linux cooked
    /// v1 headers on `any` (the daemon's link type there; tcpdump's own is
    /// v2).
    pub fn start_cooked_v1(filter: &str) -> Tcpdump {
        Self::start_through(&[], "any", filter, &["-y", "LINUX_SLL"])
    }

    /// The same inside process `pid`'s network namespace (a container's),
    /// as `nsenter -t PID -n tcpdump` does.
    pub fn start_in_netns_of(pid: u32, interface: &str, filter: &str) -> Tcpdump {
        let pid = pid.to_string();
        Self::start_through(&["nsenter", "-t", &pid, "-n"], interface, filter, &[])
    }

    fn start_through(wrapper: &[&str], interface: &str, filter: &str, extra: &[&str]) -> Tcpdump {
        let scratch = ScratchDir::new("truth");
        let path = scratch.0.join("truth.pcap");
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg("tcpdump");
                command
            }
            None => Command::new("tcpdump"),
        };
        let child = command
            .args([
                "-i",
                interface,
                "-s",
                "2048",
                "-B",
                "65536",
                "--immediate-mode",
                "-U",
            ])
            .args(extra)
            .arg("-w")
            .arg(&path)
            .args(filter.split_whitespace())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("tcpdump runs");
        super::wait_until(Duration::from_secs(20), "tcpdump to start", || {
            std::fs::metadata(&path).is_ok_and(|meta| meta.len() >= 24)
        });
        Tcpdump {
            child: Some(child),
            path,
            _scratch: scratch,
        }
    }

    /// Stops it; what it captured, checked to be whole (0 dropped by the
    /// kernel).
    pub fn stop(mut self) -> Vec<Seen> {
        read_pcap_file(&self.stop_to_file()).1
    }

    /// Stops it, checked as [`Tcpdump::stop`]; where its capture is (kept
    /// until this is dropped).
    pub fn stop_to_file(&mut self) -> PathBuf {
        let child = self.child.take().expect("running");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        )
        .unwrap();
        let output = child.wait_with_output().unwrap();
        let summary = String::from_utf8_lossy(&output.stderr);
        assert!(
            summary
                .lines()
                .any(|line| line.trim() == "0 packets dropped by kernel"),
            "tcpdump lost packets: {summary}"
        );
        self.path.clone()
    }
}

impl Drop for Tcpdump {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
