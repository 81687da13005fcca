//! The one place that builds file attributes.
//!
//! The kernel checks every access against these (`default_permissions`),
//! even from its own caches, so they are the mount's access control:
//!
//! - Root: the mounting user's, nlink 2 + directories; 0555 with
//!   `--allow-other` (every user may see which pids hold sockets, as /proc
//!   shows every pid), 0500 otherwise (a private mount: nobody else may
//!   even stat a name in it).
//! - Process directories: 0500, owned as /proc/<pid>/fd is (the effective
//!   user, or root while the process is not dumpable), times = process
//!   start. Like /proc/<pid>/fd, another user may see that the pid exists
//!   but not its sockets, namespace or attributes.
//! - Socket files: 0400, owned by the socket's uid (so only that user and
//!   root open its stream), size 0 (a stream), times = when netstatfs first
//!   saw the socket. The `all` and `tree` files: 0400, the process
//!   directory's owner.

use std::time::SystemTime;

use fuser::{FileAttr, FileType, INodeNo};

use super::tree::{FileSocket, Node, ROOT_INO, Tree, Whole};
use super::views::ViewKind;

/// The block size socket files report: readers size their reads by it
/// (cat, and stdio under libpcap's `tcpdump -r`), and one 1 MiB read is one
/// FUSE round trip where 128 KiB reads would be eight.
const STREAM_BLOCK_SIZE: u32 = 1 << 20;

/// Who mounted, and when: the root directory's owner and birth time.
#[derive(Clone, Copy, Debug)]
pub struct MountIdentity {
    pub uid: u32,
    pub gid: u32,
    pub mounted_at: SystemTime,
    /// Whether other users may enter the mount (`--allow-other`).
    pub shared: bool,
}

pub fn attr_of(tree: &Tree, node: Node, mount: &MountIdentity) -> FileAttr {
    match node {
        Node::Root => FileAttr {
            nlink: 2 + u32::try_from(
                tree.dirs.iter().filter(|dir| dir.listed).count() + tree.views.top.len(),
            )
            .unwrap_or(u32::MAX - 2),
            perm: if mount.shared { 0o555 } else { 0o500 },
            ..directory(
                ROOT_INO,
                mount.uid,
                mount.gid,
                mount.mounted_at,
                tree.snapshot.taken_wall,
            )
        },
        Node::Dir(dir_index) => {
            let dir = &tree.dirs[dir_index];
            let process = tree.process_of(dir);
            directory(
                dir.ino,
                process.uid,
                process.gid,
                process.started,
                process.started,
            )
        }
        Node::Whole(dir_index, which) => {
            let dir = &tree.dirs[dir_index];
            let process = tree.process_of(dir);
            let ino = match which {
                Whole::All => dir.all_ino,
                Whole::Tree => dir.tree_ino,
            };
            FileAttr {
                uid: process.uid,
                ..stream_file(ino, process.started, process.gid)
            }
        }
        Node::View(index) => {
            let entry = &tree.views.entries[index];
            match &entry.kind {
                ViewKind::Dir(children) => FileAttr {
                    nlink: 2 + u32::try_from(children.len()).unwrap_or(u32::MAX - 2),
                    perm: if mount.shared && entry.listing {
                        0o555
                    } else {
                        0o500
                    },
                    ..directory(
                        entry.ino,
                        entry.uid,
                        entry.gid,
                        entry.born,
                        tree.snapshot.taken_wall,
                    )
                },
                ViewKind::Link(target) => FileAttr {
                    kind: FileType::Symlink,
                    perm: 0o777,
                    size: target.len() as u64,
                    uid: entry.uid,
                    ..stream_file(entry.ino, entry.born, entry.gid)
                },
                ViewKind::All(_) => FileAttr {
                    uid: entry.uid,
                    ..stream_file(entry.ino, entry.born, entry.gid)
                },
            }
        }
        Node::File(dir_index, file_index) => {
            let dir = &tree.dirs[dir_index];
            let file = &dir.files[file_index];
            let process = tree.process_of(dir);
            // A unix socket's owner is not in /proc/net/unix: its file is
            // its process's.
            let uid = match tree.socket_of(dir, file) {
                FileSocket::Inet(socket) => socket.row.uid,
                FileSocket::Unix(_) => process.uid,
            };
            FileAttr {
                uid,
                ..stream_file(file.ino, file.first_seen, process.gid)
            }
        }
    }
}

/// A stream: a regular file of size 0, readable by its owner only.
fn stream_file(ino: u64, time: SystemTime, gid: u32) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size: 0,
        blocks: 0,
        atime: time,
        mtime: time,
        ctime: time,
        crtime: time,
        kind: FileType::RegularFile,
        perm: 0o400,
        nlink: 1,
        uid: 0,
        gid,
        rdev: 0,
        blksize: STREAM_BLOCK_SIZE,
        flags: 0,
    }
}

fn directory(ino: u64, uid: u32, gid: u32, born: SystemTime, changed: SystemTime) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size: 0,
        blocks: 0,
        atime: changed,
        mtime: changed,
        ctime: changed,
        crtime: born,
        kind: FileType::Directory,
        perm: 0o500,
        nlink: 2,
        uid,
        gid,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

pub fn file_type_of(tree: &Tree, node: Node) -> FileType {
    match node {
        Node::Root | Node::Dir(_) => FileType::Directory,
        Node::File(..) | Node::Whole(..) => FileType::RegularFile,
        Node::View(index) => match tree.views.entries[index].kind {
            ViewKind::Dir(_) => FileType::Directory,
            ViewKind::Link(_) => FileType::Symlink,
            ViewKind::All(_) => FileType::RegularFile,
        },
    }
}
