//! The one place that builds file attributes.
//!
//! Root: 0555, the mounting user's, nlink 2 + directories. Process
//! directories: 0555, owned as /proc/<pid> is, times = process start.
//! Socket files: 0400, owned by the socket's uid (so with
//! `default_permissions` the kernel lets only that user and root open its
//! stream), size 0 (a stream), times = when netstatfs first saw the socket.

use std::time::SystemTime;

use fuser::{FileAttr, FileType, INodeNo};

use super::tree::{Node, ROOT_INO, Tree};

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
}

pub fn attr_of(tree: &Tree, node: Node, mount: &MountIdentity) -> FileAttr {
    match node {
        Node::Root => FileAttr {
            nlink: 2 + u32::try_from(tree.dirs.len()).unwrap_or(u32::MAX - 2),
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
        Node::All(dir_index) => {
            let dir = &tree.dirs[dir_index];
            let process = tree.process_of(dir);
            FileAttr {
                uid: process.uid,
                ..stream_file(dir.all_ino, process.started, process.gid)
            }
        }
        Node::File(dir_index, file_index) => {
            let dir = &tree.dirs[dir_index];
            let file = &dir.files[file_index];
            let process = tree.process_of(dir);
            let socket = tree.socket_of(dir, file);
            FileAttr {
                uid: socket.row.uid,
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
        perm: 0o555,
        nlink: 2,
        uid,
        gid,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

pub fn file_type_of(node: Node) -> FileType {
    match node {
        Node::Root | Node::Dir(_) => FileType::Directory,
        Node::File(..) | Node::All(_) => FileType::RegularFile,
    }
}
