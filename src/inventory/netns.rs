//! Network namespaces: one identity ([`NetnsId`], the nsfs inode number that
//! `/proc/<pid>/ns/net` links to and that SIOCGSKNS hands back for a
//! socket) and one open handle ([`Netns`]) that a thread enters explicitly.
//!
//! Every path that finds a namespace (a process's `/proc/<pid>/ns/net`, a
//! socket's SIOCGSKNS, the daemon's own) names it by the same [`NetnsId`],
//! so two paths to one namespace can never start two captures there.
//!
//! A capture must be opened in the socket's namespace. The thread that
//! opens it never relies on where it already is (the capture opener has
//! entered whichever namespace it opened the last capture in): it calls
//! [`Netns::enter`] for every capture, including for the daemon's own
//! namespace.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;

/// A network namespace's identity: the inode number of its nsfs file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NetnsId(u64);

impl NetnsId {
    pub const fn from_inode(inode: u64) -> NetnsId {
        NetnsId(inode)
    }

    pub const fn inode(self) -> u64 {
        self.0
    }

    /// Parses the target of a `/proc/<pid>/ns/net` link, `net:[4026531840]`.
    pub fn from_link_text(text: &str) -> Option<NetnsId> {
        text.strip_prefix("net:[")?
            .strip_suffix(']')?
            .parse()
            .ok()
            .map(NetnsId)
    }
}

impl fmt::Display for NetnsId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// An open network namespace: its identity and a handle to enter it by.
/// Cheap to clone (the handle is shared).
#[derive(Clone, Debug)]
pub struct Netns {
    id: NetnsId,
    handle: Arc<OwnedFd>,
}

impl Netns {
    /// The namespace `pid` lives in.
    pub fn of_process(pid: i32) -> io::Result<Netns> {
        Self::open(Path::new(&format!("/proc/{pid}/ns/net")))
    }

    /// The namespace of the calling thread (the daemon's own, when called
    /// from the main thread at start-up).
    pub fn of_current_thread() -> io::Result<Netns> {
        Self::open(Path::new("/proc/thread-self/ns/net"))
    }

    fn open(path: &Path) -> io::Result<Netns> {
        Self::from_handle(OwnedFd::from(File::open(path)?))
    }

    /// A namespace handle (from SIOCGSKNS, or an open nsfs file).
    pub fn from_handle(handle: OwnedFd) -> io::Result<Netns> {
        let id = NetnsId(rustix::fs::fstat(&handle)?.st_ino);
        Ok(Netns {
            id,
            handle: Arc::new(handle),
        })
    }

    pub fn id(&self) -> NetnsId {
        self.id
    }

    /// Puts the calling thread in this namespace. A thread already there
    /// stays (setns needs CAP_SYS_ADMIN even for the namespace one is in,
    /// which a capability-granted daemon run by a user does not have).
    pub fn enter(&self) -> io::Result<()> {
        let current = rustix::fs::stat("/proc/thread-self/ns/net")?.st_ino;
        if current == self.id.0 {
            return Ok(());
        }
        nix::sched::setns(self.handle.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(io::Error::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_identity_whichever_way_the_namespace_is_found() {
        let own = Netns::of_current_thread().unwrap();
        let by_pid = Netns::of_process(std::process::id() as i32).unwrap();
        assert_eq!(own.id(), by_pid.id());
        let link = std::fs::read_link("/proc/self/ns/net").unwrap();
        assert_eq!(
            NetnsId::from_link_text(link.to_str().unwrap()),
            Some(own.id())
        );
        assert_eq!(NetnsId::from_link_text("mnt:[1]"), None);
        assert_eq!(NetnsId::from_link_text("net:[x]"), None);
        // Entering the namespace one is in needs no privilege.
        own.enter().unwrap();
        assert_eq!(own.id().to_string(), own.id().inode().to_string());
    }
}
