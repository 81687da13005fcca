//! Small targeted reads of /proc for live streams: is a socket still held by
//! its process, and is a blocked reader being signalled. Each costs a few
//! system calls, so streams can ask several times a second.

use std::path::PathBuf;

use nix::sys::signal::Signal;
use procfs::process::{FDTarget, Process};

/// Which socket of which process a stream follows (or the whole process,
/// for its `all` stream).
#[derive(Clone, Debug)]
pub struct SocketOwner {
    pub pid: i32,
    pub start_ticks: u64,
    /// None: the stream follows the process, not one socket.
    pub inode: Option<u64>,
    /// The fds that pointed at the socket when the snapshot was taken: tried
    /// first, before a scan of every fd.
    pub fds: Vec<i32>,
    /// The reader's uid, unless root: the stream is theirs only while the
    /// process is (see [`SocketOwner::revoked`]).
    pub reader: Option<u32>,
}

impl SocketOwner {
    /// Whether a reader who is not root has lost the right to the stream:
    /// the process is no longer theirs as /proc/<pid>/fd shows it (it
    /// changed credentials, or execs a setuid, setgid or file-capability
    /// program, which /proc gives to root), or it is gone.
    pub fn revoked(&self) -> bool {
        let Some(reader) = self.reader else {
            return false;
        };
        rustix::fs::stat(format!("/proc/{}/fd", self.pid))
            .map_or(true, |stat| stat.st_uid != reader)
    }

    /// Whether the process (the same one: same start time) still runs and
    /// holds the socket through some fd.
    pub fn still_there(&self) -> bool {
        let Ok(process) = Process::new(self.pid) else {
            return false;
        };
        match process.stat() {
            Ok(stat)
                if stat.starttime == self.start_ticks && stat.state != 'Z' && stat.state != 'X' => {
            }
            _ => return false,
        }
        let Some(inode) = self.inode else {
            return true;
        };
        let wanted = format!("socket:[{inode}]");
        let fd_dir = PathBuf::from(format!("/proc/{}/fd", self.pid));
        let known_fd_holds = self.fds.iter().any(|fd| {
            std::fs::read_link(fd_dir.join(fd.to_string()))
                .is_ok_and(|target| target.as_os_str() == wanted.as_str())
        });
        known_fd_holds
            || process.fd().is_ok_and(|mut fds| {
                fds.any(|fd| matches!(fd, Ok(info) if info.target == FDTarget::Socket(inode)))
            })
    }
}

/// Signals a blocked reader would act on: pending for the thread or its
/// process, not blocked, not ignored, and either caught by a handler or
/// fatal by default. Signals whose default is to be ignored (SIGCHLD,
/// SIGWINCH, SIGURG, SIGCONT) or to stop (SIGTSTP, …) do not count: a
/// terminal resize must not break a `cat`.
pub fn reader_has_actionable_signal(tid: u32) -> bool {
    let Ok(status) = Process::new(tid as i32).and_then(|task| task.status()) else {
        // The reader is gone: nobody waits for the answer any more.
        return true;
    };
    let deliverable = (status.sigpnd | status.shdpnd) & !status.sigblk & !status.sigign;
    deliverable & (status.sigcgt | FATAL_BY_DEFAULT) != 0
}

/// Bit n-1 stands for signal n, as in /proc/<pid>/status.
const fn bit(signal: i32) -> u64 {
    1 << (signal - 1)
}

const NOT_FATAL_BY_DEFAULT: u64 = bit(Signal::SIGCHLD as i32)
    | bit(Signal::SIGCONT as i32)
    | bit(Signal::SIGURG as i32)
    | bit(Signal::SIGWINCH as i32)
    | bit(Signal::SIGSTOP as i32)
    | bit(Signal::SIGTSTP as i32)
    | bit(Signal::SIGTTIN as i32)
    | bit(Signal::SIGTTOU as i32);

/// Standard signals that terminate (or dump core) by default, and every
/// real-time signal (whose default is to terminate).
const FATAL_BY_DEFAULT: u64 = !NOT_FATAL_BY_DEFAULT;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_dispositions() {
        assert_ne!(FATAL_BY_DEFAULT & bit(2), 0, "SIGINT kills");
        assert_ne!(FATAL_BY_DEFAULT & bit(9), 0, "SIGKILL kills");
        assert_ne!(FATAL_BY_DEFAULT & bit(15), 0, "SIGTERM kills");
        assert_eq!(FATAL_BY_DEFAULT & bit(28), 0, "SIGWINCH is ignored");
        assert_eq!(FATAL_BY_DEFAULT & bit(20), 0, "SIGTSTP stops");
    }

    #[test]
    fn a_quiet_thread_has_no_signal_and_a_gone_one_counts() {
        assert!(!reader_has_actionable_signal(std::process::id()));
        assert!(reader_has_actionable_signal(i32::MAX as u32));
    }

    #[test]
    fn the_test_process_holds_its_socket() {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        // A socket's inode is what fstat reports for it.
        let inode = nix::sys::stat::fstat(&socket).unwrap().st_ino;
        let me = Process::myself().unwrap();
        let owner = SocketOwner {
            pid: me.pid,
            start_ticks: me.stat().unwrap().starttime,
            inode: Some(inode),
            fds: vec![],
            reader: None,
        };
        assert!(owner.still_there());
        let gone = SocketOwner {
            inode: Some(u64::MAX),
            ..owner.clone()
        };
        assert!(!gone.still_there());
        let whole_process = SocketOwner {
            inode: None,
            ..owner.clone()
        };
        assert!(whole_process.still_there());
        let reused = SocketOwner {
            start_ticks: owner.start_ticks + 1,
            ..owner.clone()
        };
        assert!(!reused.still_there());
        assert!(!owner.revoked(), "root reads anything");
        let me = nix::unistd::geteuid().as_raw();
        let mine = SocketOwner {
            reader: Some(me),
            ..owner.clone()
        };
        assert!(!mine.revoked());
        let someone_else = SocketOwner {
            reader: Some(me + 4242),
            ..owner
        };
        assert!(someone_else.revoked());
        drop(socket);
    }
}
