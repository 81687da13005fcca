//! Asking a socket its kernel address: the system-call side of
//! [`super::deliveries`].
//!
//! A copy of the socket's fd (pidfd_getfd, as the inventory's live
//! following does) is peeked at with [`PROBE_FLAGS`] into an empty buffer:
//! nothing is taken from the socket and nothing waits, but the kernel's
//! `sock_recv_length` event fires in this thread with the socket's address.

use std::io;
use std::os::fd::OwnedFd;

use rustix::process::{Pid, PidfdFlags, PidfdGetfdFlags, pidfd_getfd, pidfd_open};

pub use super::deliveries::PROBE_FLAGS;

/// A copy of `pid`'s fd `fd`, if it is still socket `inode`.
pub fn copy_of(pid: i32, fd: i32, inode: u64) -> io::Result<OwnedFd> {
    let raw = Pid::from_raw(pid).ok_or(io::ErrorKind::InvalidInput)?;
    let pidfd = pidfd_open(raw, PidfdFlags::empty())?;
    let copy = pidfd_getfd(&pidfd, fd, PidfdGetfdFlags::empty())?;
    // The fd may have been closed and reused since it was listed.
    if rustix::fs::fstat(&copy)?.st_ino != inode {
        return Err(io::ErrorKind::NotFound.into());
    }
    Ok(copy)
}

/// Peeks at the socket; true if the peek reached it (its event fired),
/// false if it failed before (the event did not).
pub fn peek(socket: &OwnedFd) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: msghdr is plain data; all zero is a message of no parts.
    let mut header: nix::libc::msghdr = unsafe { std::mem::zeroed() };
    // SAFETY: a valid fd and an empty message: the kernel writes nothing.
    let result = unsafe { nix::libc::recvmsg(socket.as_raw_fd(), &mut header, PROBE_FLAGS) };
    // Bytes, or the socket's own answer that nothing is queued: either way
    // the protocol was asked, and the event fired.
    result >= 0 || io::Error::last_os_error().raw_os_error() == Some(nix::libc::EAGAIN)
}

/// The calling thread's id, as perf samples name it.
pub fn thread_id() -> u32 {
    rustix::thread::gettid().as_raw_nonzero().get() as u32
}
