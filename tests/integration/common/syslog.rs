//! A syslog socket of a test's own (`/dev/log`, or a private path the
//! daemon is told of): the lines a detached daemon sends.

use std::cell::RefCell;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(10);

/// A syslog socket of the test's own: what a daemon sends there.
pub struct SyslogListener {
    socket: UnixDatagram,
    pub path: PathBuf,
    pub lines: RefCell<Vec<String>>,
}

impl SyslogListener {
    pub fn bind(path: PathBuf) -> SyslogListener {
        let socket = UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        SyslogListener {
            socket,
            path,
            lines: Default::default(),
        }
    }

    /// The first line received that contains `text`, waiting for it.
    pub fn wait_for(&self, text: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(line) = self.lines.borrow().iter().find(|line| line.contains(text)) {
                return line.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no syslog line with {text:?}; got {:#?}",
                self.lines.borrow()
            );
            self.receive();
        }
    }

    /// Takes in the next line, if one comes within the read timeout.
    pub fn receive(&self) {
        let mut buffer = [0u8; 8192];
        if let Ok(n) = self.socket.recv(&mut buffer) {
            let line = String::from_utf8_lossy(&buffer[..n]).into_owned();
            self.lines.borrow_mut().push(line);
        }
    }
}

/// The pid in a syslog line's `netstatfs[pid]:`.
pub fn pid_in(line: &str) -> Option<u32> {
    line.split_once("netstatfs[")
        .and_then(|(_, rest)| rest.split_once(']'))
        .and_then(|(pid, _)| pid.parse().ok())
}

impl Drop for SyslogListener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
