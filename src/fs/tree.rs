//! Snapshot → tree: which directories and files the mount shows, their
//! names and their inode numbers.
//!
//! A [`Tree`] is immutable once built; the file system swaps in a new one
//! when the snapshot expires. Inode numbers come from an [`InodeTable`] that
//! outlives trees, so an object keeps its number while it lives and a number
//! is never given to a second object.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::time::SystemTime;

use super::views::{ViewKind, Views};
use crate::inventory::containers::ContainerInfo;
use crate::inventory::{ProcessInfo, Snapshot, SocketInfo, UnixSocketInfo};
use crate::names;

/// Inode number of the mount's root directory.
pub const ROOT_INO: u64 = 1;

/// What a directory entry is, independent of snapshots.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NodeKey {
    Process {
        pid: i32,
        start_ticks: u64,
    },
    Socket {
        pid: i32,
        start_ticks: u64,
        inode: u64,
    },
    /// A process's `all` or `tree` file.
    Whole {
        pid: i32,
        start_ticks: u64,
        which: Whole,
    },
    /// An entry of the views beside the process directories
    /// ([`super::views`]): its group (a hash of what it groups) and, for a
    /// link to a process, that process.
    View {
        group: u64,
        pid: i32,
        start_ticks: u64,
    },
}

#[derive(Clone, Copy, Debug)]
pub(super) struct Assigned {
    pub(super) ino: u64,
    first_seen: SystemTime,
    /// The build that last saw the object alive.
    generation: u64,
}

/// Inode numbers by object, kept across snapshots. Numbers only grow, so a
/// stale number held by the kernel can never name a different object.
#[derive(Debug)]
pub struct InodeTable {
    by_key: HashMap<NodeKey, Assigned>,
    next_ino: u64,
    generation: u64,
}

impl Default for InodeTable {
    fn default() -> Self {
        InodeTable {
            by_key: HashMap::new(),
            next_ino: ROOT_INO + 1,
            generation: 0,
        }
    }
}

impl InodeTable {
    pub(super) fn assign(&mut self, key: NodeKey, now: SystemTime) -> Assigned {
        let generation = self.generation;
        let next_ino = &mut self.next_ino;
        let assigned = self.by_key.entry(key).or_insert_with(|| {
            let ino = *next_ino;
            *next_ino += 1;
            Assigned {
                ino,
                first_seen: now,
                generation,
            }
        });
        assigned.generation = generation;
        *assigned
    }

    fn start_build(&mut self) {
        self.generation += 1;
    }

    /// Forgets every object the last build did not see alive.
    fn finish_build(&mut self) {
        let generation = self.generation;
        self.by_key
            .retain(|_, assigned| assigned.generation == generation);
    }

    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }
}

/// A node of the tree, by position.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Node {
    Root,
    /// Index into [`Tree::dirs`].
    Dir(usize),
    /// Directory index, file index within it.
    File(usize, usize),
    /// A directory's `all` or `tree` file.
    Whole(usize, Whole),
    /// An entry of the views beside the process directories (index into
    /// [`Views::entries`]).
    View(usize),
}

/// The files of a process directory that stream more than one socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Whole {
    /// `all`: every flow of the process.
    All,
    /// `tree`: every flow of the process and of its descendants.
    Tree,
}

impl Whole {
    pub const BOTH: [Whole; 2] = [Whole::All, Whole::Tree];

    pub fn file_name(self) -> &'static str {
        match self {
            Whole::All => "all",
            Whole::Tree => "tree",
        }
    }

    fn of_name(name: &str) -> Option<Whole> {
        Whole::BOTH
            .into_iter()
            .find(|which| which.file_name() == name)
    }
}

/// One process directory.
#[derive(Debug)]
pub struct ProcessDir {
    pub ino: u64,
    /// The inode numbers of its `all` and `tree` files.
    pub all_ino: u64,
    pub tree_ino: u64,
    pub name: String,
    /// Index into the snapshot's processes.
    pub process: usize,
    /// Sorted by name.
    pub files: Vec<SocketFile>,
    /// Whether the root lists it: a process that holds no socket (and the
    /// mount does not list every process) is found by its exact name only
    /// (`cat m/$$_bash/tree` before the shell's children make traffic).
    pub listed: bool,
}

/// One socket file.
#[derive(Debug)]
pub struct SocketFile {
    pub ino: u64,
    pub name: String,
    pub socket: SocketRef,
    pub first_seen: SystemTime,
}

/// Which of its process's sockets a socket file is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SocketRef {
    /// Index into the process's inet sockets.
    Inet(usize),
    /// Index into the process's unix sockets.
    Unix(usize),
}

/// The socket a socket file shows.
#[derive(Clone, Copy, Debug)]
pub enum FileSocket<'t> {
    Inet(&'t SocketInfo),
    Unix(&'t UnixSocketInfo),
}

/// What the mount shows for one snapshot.
#[derive(Debug)]
pub struct Tree {
    pub snapshot: Snapshot,
    /// Sorted by pid.
    pub dirs: Vec<ProcessDir>,
    /// The containers of the snapshot's processes.
    pub containers: Vec<ContainerInfo>,
    /// By process index: the container it runs in.
    container_of: HashMap<usize, usize>,
    pub views: Views,
    by_ino: HashMap<u64, Node>,
}

impl Tree {
    /// Builds the tree: one directory per process of the snapshot, listed
    /// if it holds a socket (every one with `all_processes`), found by its
    /// exact name either way; and the views of `containers`, whose
    /// directories of directories are `owner`'s.
    pub fn build(
        snapshot: Snapshot,
        inodes: &mut InodeTable,
        all_processes: bool,
        containers: Vec<ContainerInfo>,
        owner: (u32, u32),
    ) -> Tree {
        inodes.start_build();
        let now = snapshot.taken_wall;
        let mut dirs = Vec::new();
        for (process_index, process) in snapshot.processes.iter().enumerate() {
            let key = NodeKey::Process {
                pid: process.pid,
                start_ticks: process.start_ticks,
            };
            let whole = |which| NodeKey::Whole {
                pid: process.pid,
                start_ticks: process.start_ticks,
                which,
            };
            let listed = all_processes || !process.sockets.is_empty() || !process.unix.is_empty();
            let ino = inodes.assign(key, now).ino;
            let all_ino = inodes.assign(whole(Whole::All), now).ino;
            let tree_ino = inodes.assign(whole(Whole::Tree), now).ino;
            dirs.push(ProcessDir {
                ino,
                all_ino,
                tree_ino,
                name: names::process_dir_name(process.pid, &process.comm),
                process: process_index,
                files: socket_files(process, inodes, now),
                listed,
            });
        }
        let views = Views::build(&snapshot, &containers, inodes, owner);
        inodes.finish_build();

        let mut by_ino = HashMap::with_capacity(dirs.len() + snapshot.socket_count());
        for (dir_index, dir) in dirs.iter().enumerate() {
            by_ino.insert(dir.ino, Node::Dir(dir_index));
            by_ino.insert(dir.all_ino, Node::Whole(dir_index, Whole::All));
            by_ino.insert(dir.tree_ino, Node::Whole(dir_index, Whole::Tree));
            for (file_index, file) in dir.files.iter().enumerate() {
                by_ino.insert(file.ino, Node::File(dir_index, file_index));
            }
        }
        for (index, entry) in views.entries.iter().enumerate() {
            by_ino.insert(entry.ino, Node::View(index));
        }
        by_ino.insert(ROOT_INO, Node::Root);
        let container_of = containers
            .iter()
            .enumerate()
            .flat_map(|(container, info)| {
                info.members.iter().map(move |&member| (member, container))
            })
            .collect();
        Tree {
            snapshot,
            dirs,
            containers,
            container_of,
            views,
            by_ino,
        }
    }

    pub fn node(&self, ino: u64) -> Option<Node> {
        self.by_ino.get(&ino).copied()
    }

    /// The entry `name` of directory `parent`.
    pub fn lookup(&self, parent: Node, name: &OsStr) -> Option<Node> {
        let name = name.to_str()?;
        match parent {
            Node::Root if let Some(top) = self.views.top_named(name) => Some(Node::View(top)),
            Node::View(dir) => self.views.child(dir, name).map(Node::View),
            Node::Root => {
                let (pid, _) = names::parse_process_dir_name(name)?;
                let index = self
                    .dirs
                    .binary_search_by_key(&pid, |dir| self.process_of(dir).pid)
                    .ok()?;
                (self.dirs[index].name == name).then_some(Node::Dir(index))
            }
            Node::Dir(dir_index) if Whole::of_name(name).is_some() => {
                Whole::of_name(name).map(|which| Node::Whole(dir_index, which))
            }
            Node::Dir(dir_index) => {
                let files = &self.dirs[dir_index].files;
                let index = files
                    .binary_search_by(|file| file.name.as_str().cmp(name))
                    .ok()?;
                Some(Node::File(dir_index, index))
            }
            Node::File(..) | Node::Whole(..) => None,
        }
    }

    /// The container a process directory's process runs in.
    pub fn container_of(&self, dir: &ProcessDir) -> Option<&ContainerInfo> {
        self.container_of
            .get(&dir.process)
            .map(|&index| &self.containers[index])
    }

    /// Whether a node is a directory.
    pub fn is_dir(&self, node: Node) -> bool {
        match node {
            Node::Root | Node::Dir(_) => true,
            Node::File(..) | Node::Whole(..) => false,
            Node::View(index) => matches!(self.views.entries[index].kind, ViewKind::Dir(_)),
        }
    }

    pub fn process_of(&self, dir: &ProcessDir) -> &ProcessInfo {
        &self.snapshot.processes[dir.process]
    }

    pub fn socket_of(&self, dir: &ProcessDir, file: &SocketFile) -> FileSocket<'_> {
        let process = self.process_of(dir);
        match file.socket {
            SocketRef::Inet(index) => FileSocket::Inet(&process.sockets[index]),
            SocketRef::Unix(index) => FileSocket::Unix(&process.unix[index]),
        }
    }
}

fn socket_files(
    process: &ProcessInfo,
    inodes: &mut InodeTable,
    now: SystemTime,
) -> Vec<SocketFile> {
    let inet = process.sockets.iter().enumerate().map(|(index, socket)| {
        let name = names::socket_file_name(socket.proto(), socket.local(), socket.remote());
        (name, socket.row.inode, SocketRef::Inet(index))
    });
    let unix = process.unix.iter().enumerate().map(|(index, socket)| {
        let name = names::unix_file_name(socket.row.path().as_deref(), socket.row.inode);
        (name, socket.row.inode, SocketRef::Unix(index))
    });
    let (plain, found): (Vec<String>, Vec<(u64, SocketRef)>) = inet
        .chain(unix)
        .map(|(name, inode, socket)| (name, (inode, socket)))
        .unzip();
    let socket_inodes: Vec<u64> = found.iter().map(|&(inode, _)| inode).collect();
    let mut files: Vec<SocketFile> = names::unique_names(plain, &socket_inodes)
        .into_iter()
        .zip(found)
        .map(|(name, (inode, socket))| {
            let assigned = inodes.assign(
                NodeKey::Socket {
                    pid: process.pid,
                    start_ticks: process.start_ticks,
                    inode,
                },
                now,
            );
            SocketFile {
                ino: assigned.ino,
                name,
                socket,
                first_seen: assigned.first_seen,
            }
        })
        .collect();
    files.sort_unstable_by(|a, b| a.name.cmp(&b.name));
    files
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::inventory::SocketRow;
    use crate::names::Proto;

    fn process(pid: i32, start_ticks: u64, comm: &str, sockets: &[(u64, &str)]) -> ProcessInfo {
        ProcessInfo {
            pid,
            start_ticks,
            started: SystemTime::UNIX_EPOCH,
            comm: comm.into(),
            uid: 0,
            gid: 0,
            netns: Some(crate::inventory::NetnsId::from_inode(1)),
            sockets: sockets
                .iter()
                .map(|&(inode, local)| SocketInfo {
                    row: SocketRow {
                        proto: Proto::Tcp,
                        local: local.parse().unwrap(),
                        remote: "0.0.0.0:0".parse().unwrap(),
                        state: 10,
                        uid: 0,
                        rx_queue: 0,
                        tx_queue: 0,
                        inode,
                    },
                    fds: vec![3],
                    netns: Some(crate::inventory::NetnsId::from_inode(1)),
                })
                .collect(),
            unix: Vec::new(),
        }
    }

    /// A tree without containers.
    fn build(snapshot: Snapshot, inodes: &mut InodeTable, all_processes: bool) -> Tree {
        Tree::build(snapshot, inodes, all_processes, Vec::new(), (0, 0))
    }

    fn snapshot(processes: Vec<ProcessInfo>) -> Snapshot {
        Snapshot {
            taken: Instant::now(),
            taken_wall: SystemTime::now(),
            processes,
        }
    }

    #[test]
    fn lists_only_processes_with_sockets_unless_asked() {
        let mut inodes = InodeTable::default();
        let processes = vec![
            process(10, 1, "quiet", &[]),
            process(20, 1, "server", &[(500, "127.0.0.1:80")]),
        ];
        let tree = build(snapshot(processes.clone()), &mut inodes, false);
        let listed: Vec<&str> = tree
            .dirs
            .iter()
            .filter(|dir| dir.listed)
            .map(|dir| dir.name.as_str())
            .collect();
        assert_eq!(listed, ["20_server"]);
        // Found by its exact name all the same.
        assert!(matches!(
            tree.lookup(Node::Root, std::ffi::OsStr::new("10_quiet")),
            Some(Node::Dir(_))
        ));
        let all = build(snapshot(processes), &mut inodes, true);
        assert!(all.dirs.iter().all(|dir| dir.listed));
    }

    #[test]
    fn unix_sockets_are_files_beside_inet_ones() {
        use crate::inventory::unix::{UnixName, UnixType};
        let unix = |inode, name| UnixSocketInfo {
            row: crate::inventory::UnixRow {
                inode,
                kind: UnixType::Stream,
                socket_state: 3,
                listening: false,
                name,
            },
            fds: vec![5],
            netns: None,
        };
        let mut with_unix = process(30, 1, "agent", &[(500, "127.0.0.1:80")]);
        with_unix.unix = vec![
            unix(700, UnixName::Path("/run/a.sock".into())),
            unix(701, UnixName::Unnamed),
        ];
        let mut only_unix = process(31, 1, "dbus", &[]);
        only_unix.unix = vec![unix(702, UnixName::Abstract("bus".into()))];
        let mut inodes = InodeTable::default();
        let tree = build(snapshot(vec![with_unix, only_unix]), &mut inodes, false);
        let names: Vec<&str> = tree.dirs[0].files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(
            names,
            ["tcp_127.0.0.1:80_0.0.0.0:0", "unix_701", "unix__run_a.sock"]
        );
        let dir = &tree.dirs[0];
        assert!(matches!(
            tree.socket_of(dir, &dir.files[2]),
            FileSocket::Unix(socket) if socket.row.inode == 700
        ));
        assert_eq!(tree.dirs[1].name, "31_dbus", "listed for its unix socket");
        assert_eq!(tree.dirs[1].files[0].name, "unix_@bus");
    }

    #[test]
    fn lookup_needs_pid_and_name() {
        let mut inodes = InodeTable::default();
        let tree = build(
            snapshot(vec![process(20, 1, "a/b c", &[(500, "127.0.0.1:80")])]),
            &mut inodes,
            false,
        );
        let dir = tree.lookup(Node::Root, OsStr::new("20_a_b c")).unwrap();
        assert_eq!(dir, Node::Dir(0));
        assert_eq!(tree.lookup(Node::Root, OsStr::new("20_other")), None);
        assert_eq!(tree.lookup(Node::Root, OsStr::new("21_a_b c")), None);
        assert_eq!(
            tree.lookup(dir, OsStr::new("tcp_127.0.0.1:80_0.0.0.0:0")),
            Some(Node::File(0, 0))
        );
        assert_eq!(
            tree.lookup(dir, OsStr::new("tcp_127.0.0.1:81_0.0.0.0:0")),
            None
        );
    }

    #[test]
    fn inodes_are_stable_and_never_reused() {
        let mut inodes = InodeTable::default();
        let first = build(
            snapshot(vec![process(20, 1, "server", &[(500, "127.0.0.1:80")])]),
            &mut inodes,
            false,
        );
        let (dir_ino, file_ino) = (first.dirs[0].ino, first.dirs[0].files[0].ino);
        // Same objects: same numbers.
        let second = build(
            snapshot(vec![process(20, 1, "server", &[(500, "127.0.0.1:80")])]),
            &mut inodes,
            false,
        );
        assert_eq!(
            (second.dirs[0].ino, second.dirs[0].files[0].ino),
            (dir_ino, file_ino)
        );
        // The pid reused by a new process: new numbers, old ones forgotten.
        let third = build(
            snapshot(vec![process(20, 99, "server", &[(501, "127.0.0.1:80")])]),
            &mut inodes,
            false,
        );
        assert!(third.dirs[0].ino > file_ino);
        assert!(third.node(dir_ino).is_none());
        assert_eq!(
            inodes.len(),
            6,
            "the directory, its all and tree files, the socket, containers/ and pods/"
        );
    }

    #[test]
    fn a_process_between_sockets_keeps_its_number() {
        let mut inodes = InodeTable::default();
        let with = snapshot(vec![process(20, 1, "s", &[(500, "127.0.0.1:80")])]);
        let ino = build(with, &mut inodes, false).dirs[0].ino;
        build(snapshot(vec![process(20, 1, "s", &[])]), &mut inodes, false);
        let again = snapshot(vec![process(20, 1, "s", &[(600, "127.0.0.1:81")])]);
        assert_eq!(build(again, &mut inodes, false).dirs[0].ino, ino);
    }
}
