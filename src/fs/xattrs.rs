//! Extended attributes: a table of small entries, one per attribute, so
//! adding one is adding a line.
//!
//! Socket files carry `user.netstatfs.{proto,state,inode,uid,local,remote,
//! rx_queue,tx_queue,fds,netns}` and what socket diagnostics says at the
//! time of asking (`tcp.*`, `mem.*`, see `diagnostics.rs`); unix socket
//! files (with `--unix`) carry `user.netstatfs.{proto,type,state,inode,
//! path,fds,netns}` and, asked of the kernel when read,
//! `user.netstatfs.{peer_inode,peer_pid,peer_comm,uid,rx_queue,tx_queue,
//! vfs_inode,vfs_dev}`; process directories carry
//! `user.netstatfs.{pid,comm,uid,netns,sockets}` and, read from /proc when
//! asked, `user.netstatfs.{exe,cmdline,user,cgroup}` and, where the cgroup
//! names one, `user.netstatfs.container.{runtime,id}` and
//! `user.netstatfs.pod.uid`, and where the runtime's state names them,
//! `user.netstatfs.container.name` and `user.netstatfs.pod.{name,namespace}`;
//! the root carries what a
//! reader of the streams needs before opening one,
//! `user.netstatfs.{format,interface,linktype}` (the Wireshark extcap
//! reads the link type). Values are plain text, as `getfattr -d` shows
//! them.

use crate::inventory::containers::ContainerInfo;
use crate::inventory::details::ProcessDetails;
use crate::inventory::runtimes::Names;
use crate::inventory::{ProcessInfo, SocketInfo, UnixSocketInfo};

type SocketGetter = fn(&SocketInfo) -> String;
type ProcessGetter = fn(&ProcessInfo) -> String;
type MountGetter = fn(&MountFacts) -> String;
type UnixGetter = fn(&UnixSocketInfo) -> Option<String>;

/// What the whole mount serves, fixed at mount time.
#[derive(Debug, Clone)]
pub struct MountFacts {
    /// pcap or pcapng.
    pub format: &'static str,
    /// The capture device (`any` unless `--interface`).
    pub interface: String,
    /// The streams' link type, as a number (113: LINUX_SLL).
    pub linktype: u32,
}

const MOUNT_ATTRIBUTES: &[(&str, MountGetter)] = &[
    ("user.netstatfs.format", |m| m.format.to_owned()),
    ("user.netstatfs.interface", |m| m.interface.clone()),
    ("user.netstatfs.linktype", |m| m.linktype.to_string()),
];

const SOCKET_ATTRIBUTES: &[(&str, SocketGetter)] = &[
    ("user.netstatfs.proto", |s| s.proto().to_string()),
    ("user.netstatfs.state", |s| s.state_name().to_owned()),
    ("user.netstatfs.inode", |s| s.row.inode.to_string()),
    ("user.netstatfs.uid", |s| s.row.uid.to_string()),
    ("user.netstatfs.local", |s| s.local().to_string()),
    ("user.netstatfs.remote", |s| s.remote().to_string()),
    ("user.netstatfs.rx_queue", |s| s.row.rx_queue.to_string()),
    ("user.netstatfs.tx_queue", |s| s.row.tx_queue.to_string()),
    ("user.netstatfs.fds", |s| join(&s.fds)),
    ("user.netstatfs.netns", |s| optional(s.netns)),
];

/// A unix socket's, from `/proc/net/unix`; `path` is absent for an
/// unnamed socket.
const UNIX_ATTRIBUTES: &[(&str, UnixGetter)] = &[
    ("user.netstatfs.proto", |_| Some("unix".into())),
    ("user.netstatfs.type", |s| Some(s.row.kind.name())),
    ("user.netstatfs.state", |s| Some(s.row.state_name().into())),
    ("user.netstatfs.inode", |s| Some(s.row.inode.to_string())),
    ("user.netstatfs.path", |s| s.row.path()),
    ("user.netstatfs.fds", |s| Some(join(&s.fds))),
    ("user.netstatfs.netns", |s| Some(optional(s.netns))),
];

const PROCESS_ATTRIBUTES: &[(&str, ProcessGetter)] = &[
    ("user.netstatfs.pid", |p| p.pid.to_string()),
    ("user.netstatfs.comm", |p| p.comm.clone()),
    ("user.netstatfs.uid", |p| p.uid.to_string()),
    ("user.netstatfs.netns", |p| optional(p.netns)),
    ("user.netstatfs.sockets", |p| p.sockets.len().to_string()),
];

type DetailGetter = fn(&ProcessDetails) -> Option<String>;

/// Read from /proc when asked; absent where /proc does not tell.
const DETAIL_ATTRIBUTES: &[(&str, DetailGetter)] = &[
    ("user.netstatfs.exe", |d| d.exe.clone()),
    ("user.netstatfs.cmdline", |d| d.cmdline.clone()),
    ("user.netstatfs.user", |d| d.user.clone()),
    ("user.netstatfs.cgroup", |d| d.cgroup.clone()),
    ("user.netstatfs.container.runtime", |d| {
        d.container.as_ref().map(|c| c.runtime.to_owned())
    }),
    ("user.netstatfs.container.id", |d| {
        d.container.as_ref().map(|c| c.id.clone())
    }),
    ("user.netstatfs.pod.uid", |d| {
        d.container.as_ref().and_then(|c| c.pod_uid.clone())
    }),
];

type NamesGetter = fn(&Names) -> Option<String>;

/// What the container's runtime says of it (see
/// [`crate::inventory::runtimes`]); absent where it says nothing.
const NAME_ATTRIBUTES: &[(&str, NamesGetter)] = &[
    ("user.netstatfs.container.name", |n| n.name.clone()),
    ("user.netstatfs.pod.name", |n| {
        n.pod.as_ref().map(|pod| pod.name.clone())
    }),
    ("user.netstatfs.pod.namespace", |n| {
        n.pod.as_ref().map(|pod| pod.namespace.clone())
    }),
];

fn join(fds: &[i32]) -> String {
    fds.iter().map(i32::to_string).collect::<Vec<_>>().join(",")
}

fn optional(value: Option<crate::inventory::NetnsId>) -> String {
    value.map(|v| v.to_string()).unwrap_or_default()
}

/// Whose attributes are asked for.
pub enum Subject<'a> {
    Root(&'a MountFacts),
    /// `all` and `tree`: no attributes of their own.
    Whole,
    /// A process directory, with the container it runs in.
    Process(&'a ProcessInfo, Option<&'a ContainerInfo>),
    /// A socket file, with what socket diagnostics said of it (names
    /// under `user.netstatfs.`).
    Socket(&'a SocketInfo, &'a [(String, String)]),
    /// A unix socket file, likewise.
    Unix(&'a UnixSocketInfo, &'a [(String, String)]),
}

const PREFIX: &str = "user.netstatfs.";

/// Whether an attribute is one socket diagnostics answers.
pub fn is_kernel_attribute(name: &[u8]) -> bool {
    name.starts_with(b"user.netstatfs.tcp.") || name.starts_with(b"user.netstatfs.mem.")
}

/// The NUL-terminated names, as listxattr returns them.
pub fn list(subject: &Subject<'_>) -> Vec<u8> {
    let names: Vec<&str> = match subject {
        Subject::Root(_) => MOUNT_ATTRIBUTES.iter().map(|(name, _)| *name).collect(),
        Subject::Whole => Vec::new(),
        Subject::Process(process, container) => {
            let details = ProcessDetails::read(process.pid, process.uid);
            let names = container.map(|container| &container.names);
            PROCESS_ATTRIBUTES
                .iter()
                .map(|(name, _)| *name)
                .chain(
                    DETAIL_ATTRIBUTES
                        .iter()
                        .filter(|(_, getter)| getter(&details).is_some())
                        .map(|(name, _)| *name),
                )
                .chain(
                    NAME_ATTRIBUTES
                        .iter()
                        .filter(|(_, getter)| names.and_then(getter).is_some())
                        .map(|(name, _)| *name),
                )
                .collect()
        }
        Subject::Socket(_, _) => SOCKET_ATTRIBUTES.iter().map(|(name, _)| *name).collect(),
        Subject::Unix(socket, _) => UNIX_ATTRIBUTES
            .iter()
            .filter(|(_, getter)| getter(socket).is_some())
            .map(|(name, _)| *name)
            .collect(),
    };
    let mut out = Vec::new();
    for name in names {
        out.extend_from_slice(name.as_bytes());
        out.push(0);
    }
    if let Subject::Socket(_, kernel) | Subject::Unix(_, kernel) = subject {
        for (name, _) in kernel.iter() {
            out.extend_from_slice(PREFIX.as_bytes());
            out.extend_from_slice(name.as_bytes());
            out.push(0);
        }
    }
    out
}

/// One attribute's value, or None if the subject has no such attribute.
pub fn get(subject: &Subject<'_>, name: &[u8]) -> Option<Vec<u8>> {
    let value = match subject {
        Subject::Root(facts) => MOUNT_ATTRIBUTES
            .iter()
            .find(|(known, _)| known.as_bytes() == name)
            .map(|(_, getter)| getter(facts)),
        Subject::Whole => None,
        Subject::Process(process, container) => PROCESS_ATTRIBUTES
            .iter()
            .find(|(known, _)| known.as_bytes() == name)
            .map(|(_, getter)| getter(process))
            .or_else(|| {
                let (_, getter) = NAME_ATTRIBUTES
                    .iter()
                    .find(|(known, _)| known.as_bytes() == name)?;
                getter(&(*container)?.names)
            })
            .or_else(|| {
                let (_, getter) = DETAIL_ATTRIBUTES
                    .iter()
                    .find(|(known, _)| known.as_bytes() == name)?;
                getter(&ProcessDetails::read(process.pid, process.uid))
            }),
        Subject::Socket(socket, kernel) => SOCKET_ATTRIBUTES
            .iter()
            .find(|(known, _)| known.as_bytes() == name)
            .map(|(_, getter)| getter(socket))
            .or_else(|| kernel_value(kernel, name)),
        Subject::Unix(socket, kernel) => UNIX_ATTRIBUTES
            .iter()
            .find(|(known, _)| known.as_bytes() == name)
            .and_then(|(_, getter)| getter(socket))
            .or_else(|| kernel_value(kernel, name)),
    };
    value.map(String::into_bytes)
}

fn kernel_value(kernel: &[(String, String)], name: &[u8]) -> Option<String> {
    let short = name.strip_prefix(PREFIX.as_bytes())?;
    kernel
        .iter()
        .find(|(known, _)| known.as_bytes() == short)
        .map(|(_, value)| value.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::SocketRow;
    use crate::names::Proto;

    #[test]
    fn unix_attributes_read_as_text() {
        let socket = UnixSocketInfo {
            row: crate::inventory::UnixRow {
                inode: 77,
                kind: crate::inventory::unix::UnixType::Stream,
                socket_state: 3,
                listening: false,
                name: crate::inventory::unix::UnixName::Unnamed,
            },
            fds: vec![4],
            netns: None,
        };
        let kernel = [("peer_inode".to_owned(), "78".to_owned())];
        let subject = Subject::Unix(&socket, &kernel);
        let value =
            |name: &str| get(&subject, name.as_bytes()).map(|v| String::from_utf8(v).unwrap());
        assert_eq!(value("user.netstatfs.proto").as_deref(), Some("unix"));
        assert_eq!(value("user.netstatfs.type").as_deref(), Some("stream"));
        assert_eq!(value("user.netstatfs.state").as_deref(), Some("CONNECTED"));
        assert_eq!(value("user.netstatfs.peer_inode").as_deref(), Some("78"));
        assert_eq!(value("user.netstatfs.path"), None, "unnamed: no path");
        let listed = String::from_utf8(list(&subject)).unwrap();
        assert!(!listed.contains("user.netstatfs.path\0"));
        assert!(listed.ends_with("user.netstatfs.peer_inode\0"));
    }

    #[test]
    fn socket_attributes_read_as_text() {
        let socket = SocketInfo {
            row: SocketRow {
                proto: Proto::Tcp6,
                local: "[::1]:8080".parse().unwrap(),
                remote: "[::]:0".parse().unwrap(),
                state: 10,
                uid: 1000,
                rx_queue: 0,
                tx_queue: 128,
                inode: 4242,
            },
            fds: vec![3, 7],
            netns: Some(crate::inventory::NetnsId::from_inode(4026531840)),
        };
        let subject = Subject::Socket(&socket, &[]);
        let value =
            |name: &str| String::from_utf8(get(&subject, name.as_bytes()).unwrap()).unwrap();
        assert_eq!(value("user.netstatfs.proto"), "tcp6");
        assert_eq!(value("user.netstatfs.state"), "LISTEN");
        assert_eq!(value("user.netstatfs.local"), "[::1]:8080");
        assert_eq!(value("user.netstatfs.fds"), "3,7");
        assert_eq!(value("user.netstatfs.netns"), "4026531840");
        assert_eq!(value("user.netstatfs.tx_queue"), "128");
        assert_eq!(get(&subject, b"user.netstatfs.nope"), None);
        let listed = list(&subject);
        assert_eq!(
            listed.iter().filter(|&&b| b == 0).count(),
            SOCKET_ATTRIBUTES.len()
        );
        assert!(listed.ends_with(b"user.netstatfs.netns\0"));
    }
}
