//! One process's TCP and UDP sockets, followed cheaply enough to look many
//! times a second: its fds from /proc/<pid>/fd, and each new socket's
//! addresses asked of the socket itself (pidfd_getfd, then getsockname and
//! getpeername) instead of a /proc/net table, which the kernel builds by
//! walking its whole connection hash (6 ms per table here, however few
//! sockets there are).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use rustix::event::{PollFd, PollFlags, poll};
use rustix::net::{AddressFamily, SocketType};
use rustix::process::{Pid, PidfdFlags, PidfdGetfdFlags, pidfd_getfd, pidfd_open};

use super::{Netns, NetnsId};
use crate::names::Proto;

/// A TCP or UDP socket of the followed process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LiveSocket {
    pub inode: u64,
    pub proto: Proto,
    pub local: SocketAddr,
    /// None for a listener or an unconnected socket.
    pub remote: Option<SocketAddr>,
    /// When it was first seen, and when it was first seen gone.
    pub seen: SystemTime,
    pub closed: Option<SystemTime>,
    /// The network namespace it lives in, where known.
    pub netns: Option<NetnsId>,
    /// Its owner (the socket inode's uid, as `ss -e` and /proc/net show it).
    pub uid: u32,
    /// The fd the process held it as when it was first seen.
    pub fd: i32,
    /// A TCP listener (its view never changes again).
    pub listening: bool,
}

/// The most sockets looked into again in one look (see
/// [`LiveSocket::unsettled`]): a process holding many sockets it never
/// connects costs no more than this.
const MOST_LOOKED_AGAIN: usize = 64;

impl LiveSocket {
    /// Whether what it is may still change: not bound yet, or a TCP
    /// socket neither listening nor connected (between socket() and
    /// connect(), or bound to a port before connecting from it).
    pub fn unsettled(&self) -> bool {
        let tcp = matches!(self.proto, Proto::Tcp | Proto::Tcp6);
        self.local.port() == 0 || (tcp && self.remote.is_none() && !self.listening)
    }

    /// What it is: its protocol and ends.
    fn view(&self) -> (Proto, SocketAddr, Option<SocketAddr>, bool) {
        (self.proto, self.local, self.remote, self.listening)
    }
}

/// Follows one process.
pub struct ProcessWatch {
    pid: i32,
    /// Readable once the process has exited; the handle for pidfd_getfd.
    pidfd: OwnedFd,
    proc_pid: PathBuf,
    /// Every socket inode seen, with what it is (None: not TCP or UDP).
    sockets: rustc_hash::FxHashMap<u64, Option<LiveSocket>>,
    /// Sockets closed lately, kept for [`LINGER`]: their last packets (a
    /// FIN, its ACK, a retransmission) come after the close.
    closed: Vec<LiveSocket>,
    /// The network namespaces its sockets live in, each with an open handle
    /// (to capture there).
    namespaces: HashMap<NetnsId, Netns>,
}

/// How long a closed socket is remembered (what it may still claim is
/// decided by time: see `capture::classify`).
pub const LINGER: Duration = Duration::from_secs(2);

impl ProcessWatch {
    /// Starts following `pid`, if it is still the process started at
    /// `start_ticks`.
    pub fn open(pid: i32, start_ticks: u64) -> std::io::Result<ProcessWatch> {
        let raw = Pid::from_raw(pid).ok_or(std::io::ErrorKind::InvalidInput)?;
        let pidfd = pidfd_open(raw, PidfdFlags::empty())?;
        // The pidfd is of whatever holds the pid now: check it is the same
        // process, after opening (so it cannot change under us).
        let stat = procfs::process::Process::new(pid)
            .and_then(|p| p.stat())
            .map_err(std::io::Error::other)?;
        if stat.starttime != start_ticks {
            return Err(std::io::ErrorKind::NotFound.into());
        }
        Ok(ProcessWatch {
            pid,
            pidfd,
            proc_pid: PathBuf::from(format!("/proc/{pid}")),
            sockets: rustc_hash::FxHashMap::default(),
            closed: Vec::new(),
            namespaces: HashMap::new(),
        })
    }

    /// Whether the process has exited.
    pub fn exited(&self) -> bool {
        let mut fds = [PollFd::new(&self.pidfd, PollFlags::IN)];
        let timeout = rustix::event::Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        matches!(poll(&mut fds, Some(&timeout)), Ok(n) if n > 0)
    }

    /// Who owns the process now, as /proc/<pid>/fd shows it: the effective
    /// user, or root while it is not dumpable. None once it is gone.
    pub fn owner(&self) -> Option<u32> {
        rustix::fs::stat(self.proc_pid.join("fd"))
            .ok()
            .map(|stat| stat.st_uid)
    }

    /// Looks again; true if the set of TCP and UDP sockets, or what one of
    /// them is, changed. A socket is looked into when its inode first shows
    /// up, and again at each look while it is [`LiveSocket::unsettled`].
    pub fn rescan(&mut self) -> bool {
        let Ok(fds) = super::socket_fds(&self.proc_pid) else {
            return false;
        };
        let mut changed = false;
        let mut present: Vec<u64> = Vec::with_capacity(fds.len());
        let mut looked_again = 0;
        for (inode, fd) in fds {
            present.push(inode);
            let known = self.sockets.get(&inode);
            // A socket looked into between its socket() and its connect()
            // (or bind) is looked into again until it settles: otherwise
            // its flow is never known (a preempted client, now and then).
            let again = known.is_some_and(|socket| {
                socket.as_ref().is_some_and(LiveSocket::unsettled)
                    && looked_again < MOST_LOOKED_AGAIN
            });
            if known.is_none() || again {
                looked_again += usize::from(again);
                let looked = self.look_into(inode, fd).map(|(socket, namespace)| {
                    if let Some(namespace) = namespace {
                        self.namespaces.entry(namespace.id()).or_insert(namespace);
                    }
                    socket
                });
                match (self.sockets.get(&inode), looked) {
                    // Looked into again and the same (it keeps when it was
                    // first seen), or not to be looked into this time.
                    (Some(Some(before)), Some(now)) if before.view() == now.view() => {}
                    (Some(Some(_)), None) => {}
                    (_, looked) => {
                        changed |= looked.is_some();
                        self.sockets.insert(inode, looked);
                    }
                }
            }
        }
        present.sort_unstable();
        let now = SystemTime::now();
        let closed = &mut self.closed;
        self.sockets.retain(|inode, socket| {
            let kept = present.binary_search(inode).is_ok();
            if !kept && let Some(mut socket) = socket.take() {
                socket.closed = Some(now);
                closed.push(socket);
                changed = true;
            }
            kept
        });
        let lingering = self.closed.len();
        self.closed.retain(|socket| {
            socket
                .closed
                .is_some_and(|at| now.duration_since(at).unwrap_or_default() < LINGER)
        });
        changed || self.closed.len() != lingering
    }

    /// The process exited: every socket it held is closed as of now (they
    /// linger, as closed sockets do, for their last packets).
    pub fn all_closed(&mut self) {
        let now = SystemTime::now();
        for (_, socket) in self.sockets.drain() {
            if let Some(mut socket) = socket {
                socket.closed = Some(now);
                self.closed.push(socket);
            }
        }
    }

    /// A copy of the process's fd, asked what socket it is and in which
    /// namespace.
    fn look_into(&self, inode: u64, fd: i32) -> Option<(LiveSocket, Option<Netns>)> {
        let copy = pidfd_getfd(&self.pidfd, fd, PidfdGetfdFlags::empty()).ok()?;
        // The fd may have been closed and reused since it was listed.
        let stat = rustix::fs::fstat(&copy).ok()?;
        if stat.st_ino != inode {
            return None;
        }
        let v6 = match rustix::net::sockopt::socket_domain(copy.as_fd()).ok()? {
            AddressFamily::INET => false,
            AddressFamily::INET6 => true,
            _ => return None,
        };
        let proto = match (rustix::net::sockopt::socket_type(copy.as_fd()).ok()?, v6) {
            (SocketType::STREAM, false) => Proto::Tcp,
            (SocketType::STREAM, true) => Proto::Tcp6,
            (SocketType::DGRAM, false) => Proto::Udp,
            (SocketType::DGRAM, true) => Proto::Udp6,
            _ => return None,
        };
        // Ping sockets are datagram sockets too, of another protocol.
        if let Ok(Some(protocol)) = rustix::net::sockopt::socket_protocol(copy.as_fd()) {
            let udp = rustix::net::ipproto::UDP;
            let tcp = rustix::net::ipproto::TCP;
            if protocol != udp && protocol != tcp {
                return None;
            }
        }
        let namespace = namespace_of(&copy);
        let netns = namespace.as_ref().map(Netns::id);
        let local = SocketAddr::try_from(rustix::net::getsockname(&copy).ok()?).ok()?;
        let remote = rustix::net::getpeername(&copy)
            .ok()
            .flatten()
            .and_then(|peer| SocketAddr::try_from(peer).ok());
        let listening = matches!(proto, Proto::Tcp | Proto::Tcp6)
            && remote.is_none()
            && rustix::net::sockopt::socket_acceptconn(&copy).unwrap_or(false);
        let socket = LiveSocket {
            inode,
            proto,
            local,
            remote,
            seen: SystemTime::now(),
            closed: None,
            netns,
            uid: stat.st_uid,
            fd,
            listening,
        };
        Some((socket, namespace))
    }

    /// The namespaces the process's sockets live in, with handles.
    pub fn namespaces(&self) -> impl Iterator<Item = &Netns> {
        self.namespaces.values()
    }

    /// The process's TCP and UDP sockets, as last seen, and those closed
    /// within [`LINGER`].
    pub fn sockets(&self) -> impl Iterator<Item = &LiveSocket> {
        self.sockets.values().flatten().chain(&self.closed)
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The process's name now (its comm).
    pub fn comm(&self) -> String {
        std::fs::read_to_string(self.proc_pid.join("comm"))
            .map(|comm| comm.trim_end_matches('\n').to_owned())
            .unwrap_or_default()
    }
}

/// The processes `pid` forked that still run, from each of its threads'
/// `children` file (a thread's children are listed by the thread that
/// forked them).
pub fn children_of(pid: i32) -> Vec<i32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut children = Vec::new();
    for task in tasks.filter_map(Result::ok) {
        let Ok(text) = std::fs::read_to_string(task.path().join("children")) else {
            continue;
        };
        children.extend(
            text.split_whitespace()
                .filter_map(|child| child.parse::<i32>().ok()),
        );
    }
    children
}

/// The namespace a socket lives in: SIOCGSKNS hands over a handle to it,
/// whose inode number names it.
fn namespace_of(socket: &OwnedFd) -> Option<Netns> {
    use std::os::fd::{AsRawFd, FromRawFd};
    const SIOCGSKNS: nix::libc::c_ulong = 0x894C;
    // SAFETY: SIOCGSKNS takes no argument and returns a new fd or -1.
    let raw = unsafe { nix::libc::ioctl(socket.as_raw_fd(), SIOCGSKNS as _) };
    if raw < 0 {
        return None;
    }
    // SAFETY: `raw` is a new fd that nothing else owns.
    let handle = unsafe { OwnedFd::from_raw_fd(raw) };
    Netns::from_handle(handle).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follows_its_own_process() {
        let me = procfs::process::Process::myself().unwrap();
        let mut watch = ProcessWatch::open(me.pid, me.stat().unwrap().starttime).unwrap();
        assert!(!watch.exited());
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let udp = std::net::UdpSocket::bind("[::1]:0").unwrap();
        assert!(watch.rescan());
        let local = listener.local_addr().unwrap();
        assert!(
            watch
                .sockets()
                .any(|s| s.proto == Proto::Tcp && s.local == local && s.remote.is_none())
        );
        let client = std::net::TcpStream::connect(local).unwrap();
        watch.rescan();
        let client_local = client.local_addr().unwrap();
        assert!(
            watch
                .sockets()
                .any(|s| s.local == client_local && s.remote == Some(local))
        );
        assert!(watch.sockets().any(|s| s.proto == Proto::Udp6));
        let own = crate::inventory::own_netns();
        assert!(
            watch.sockets().all(|s| s.netns == own),
            "the test's own namespace"
        );
        assert_eq!(watch.namespaces().count(), 1);
        assert!(
            watch
                .sockets()
                .all(|s| s.uid == nix::unistd::geteuid().as_raw())
        );
        drop(udp);
        watch.rescan();
        assert!(
            watch.sockets().any(|s| s.proto == Proto::Udp6),
            "a closed socket lingers"
        );
        assert!(
            ProcessWatch::open(me.pid, 0).is_err(),
            "another start time is another process"
        );
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        assert!(children_of(me.pid).contains(&(child.id() as i32)));
        let _ = child.kill();
        let _ = child.wait();
    }
}
