//! Socket files' kernel attributes (`user.netstatfs.tcp.*`, `mem.*`, and a
//! unix socket's peer, owner and queues): asked of socket diagnostics
//! ([`crate::inventory::diag`], [`crate::inventory::unix`]) when a
//! `getxattr` or `listxattr` comes, never for a listing.
//!
//! A netlink socket answers for the namespace it was made in, so one is
//! made per network namespace, on a thread that enters it, and kept. A
//! reply is kept for [`FRESH_FOR`]: `getfattr -d` asks for the list and
//! then each attribute, which is one question to the kernel, not forty.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use log::debug;

use crate::inventory::diag;
use crate::inventory::{Netns, NetnsId, SocketInfo, UnixSocketInfo, unix};
use crate::names::Proto;

/// How long one reply answers for its socket.
const FRESH_FOR: Duration = Duration::from_millis(100);
/// The most replies kept, and netlink sockets (namespaces) kept.
const KEPT: usize = 4096;
const NAMESPACES_KEPT: usize = 64;

type Attributes = Arc<Vec<(String, String)>>;

#[derive(Default)]
pub struct Diagnostics {
    netlink: Mutex<HashMap<NetnsId, Arc<OwnedFd>>>,
    recent: Mutex<HashMap<u64, (Instant, Attributes)>>,
}

impl Diagnostics {
    /// The kernel's attributes of `socket`, held by process `pid`; empty
    /// where there are none (not TCP or UDP, a socket gone, no answer).
    pub fn attributes(&self, pid: i32, socket: &SocketInfo) -> Attributes {
        let proto = socket.proto();
        if !matches!(proto, Proto::Tcp | Proto::Tcp6 | Proto::Udp | Proto::Udp6) {
            return Attributes::default();
        }
        self.cached(socket.row.inode, || {
            self.ask(pid, socket)
                .map(|reply| reply.attributes())
                .unwrap_or_default()
        })
    }

    /// The kernel's attributes of unix socket `socket`, held by `pid`.
    pub fn unix_attributes(&self, pid: i32, socket: &UnixSocketInfo) -> Attributes {
        self.cached(socket.row.inode, || {
            let Some(fd) = socket.netns.and_then(|netns| self.netlink_in(netns, pid)) else {
                return Vec::new();
            };
            match unix::query(&fd, socket.row.inode) {
                Ok(reply) => reply.map(|reply| reply.attributes()).unwrap_or_default(),
                Err(err) => {
                    debug!(
                        "unix socket diagnostics for inode {}: {err}",
                        socket.row.inode
                    );
                    if let Some(netns) = socket.netns {
                        lock(&self.netlink).remove(&netns);
                    }
                    Vec::new()
                }
            }
        })
    }

    /// The reply for socket `inode` asked less than [`FRESH_FOR`] ago, or
    /// `ask`'s.
    fn cached(&self, inode: u64, ask: impl FnOnce() -> Vec<(String, String)>) -> Attributes {
        if let Some((at, attributes)) = lock(&self.recent).get(&inode)
            && at.elapsed() < FRESH_FOR
        {
            return Arc::clone(attributes);
        }
        let attributes: Attributes = Arc::new(ask());
        let mut recent = lock(&self.recent);
        if recent.len() >= KEPT {
            recent.retain(|_, (at, _)| at.elapsed() < FRESH_FOR);
            if recent.len() >= KEPT {
                recent.clear();
            }
        }
        recent.insert(inode, (Instant::now(), Arc::clone(&attributes)));
        attributes
    }

    fn ask(&self, pid: i32, socket: &SocketInfo) -> Option<diag::DiagReply> {
        let netns = socket.netns?;
        let fd = self.netlink_in(netns, pid)?;
        match diag::query(
            &fd,
            socket.proto(),
            socket.local(),
            socket.remote(),
            socket.row.inode,
        ) {
            Ok(reply) => reply,
            Err(err) => {
                debug!("socket diagnostics for inode {}: {err}", socket.row.inode);
                // A broken netlink socket is made again next time.
                lock(&self.netlink).remove(&netns);
                None
            }
        }
    }

    /// The netlink socket of namespace `netns` (that of process `pid`).
    fn netlink_in(&self, netns: NetnsId, pid: i32) -> Option<Arc<OwnedFd>> {
        if let Some(fd) = lock(&self.netlink).get(&netns) {
            return Some(Arc::clone(fd));
        }
        let handle = Netns::of_process(pid)
            .ok()
            .filter(|handle| handle.id() == netns)?;
        let made = std::thread::Builder::new()
            .name("sock-diag".into())
            .spawn(move || {
                handle.enter()?;
                diag::open()
            })
            .ok()?
            .join()
            .ok()?;
        let fd = match made {
            Ok(fd) => Arc::new(fd),
            Err(err) => {
                debug!("no socket diagnostics in network namespace {netns}: {err}");
                return None;
            }
        };
        let mut netlink = lock(&self.netlink);
        if netlink.len() >= NAMESPACES_KEPT {
            netlink.clear();
        }
        netlink.insert(netns, Arc::clone(&fd));
        Some(fd)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
