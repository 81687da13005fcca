//! The fuser `Filesystem`: inode numbers, attributes, extended attributes,
//! directory listings, and open/read/release of socket files.
//!
//! Requests are answered from one [`Tree`] (one /proc snapshot) for as long
//! as the snapshot is valid (`--cache-ttl`), and the kernel is told it may
//! cache entries and attributes for that long too. A directory listing is
//! pinned to the tree it started with, so its pages never shift under a
//! refresh. A name that is not in the tree triggers a fresh snapshot (at
//! most every [`MISS_REFRESH`]), so a process started a moment ago can be
//! entered at once.
//!
//! Beside the process directories, [`views`] groups them (`containers/`,
//! `pods/`): its directories, symlinks and group streams are one kind of
//! node here ([`Node::View`]), whatever the grouping.
//!
//! The mount is read-only: everything that would modify it is EROFS.
//! Streams (open/read/release) are handed to `crate::stream`; this module
//! only maps them to file handles and errors to errno. A unix socket's file
//! (`--unix`) has attributes but no stream: opening it is EOPNOTSUPP.

pub mod attrs;
pub mod diagnostics;
pub mod tree;
pub mod views;
pub mod xattrs;

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenAccMode, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyWrite,
    ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use log::{debug, info, warn};

use crate::attribution::KernelEvents;
use crate::capture::filter::{FilterTarget, bpf_filter_for, is_connected};
use crate::capture::source::{
    CaptureError, CaptureFilter, CaptureRequest, CaptureSettings, Opened, PacketSink, RingStage,
};
use crate::inventory::containers::{ContainerIndex, RuntimeOptions};
use crate::inventory::live::ProcessWatch;
use crate::inventory::probe::SocketOwner;
use crate::inventory::{Inventory, Netns, NetnsId, ProcessInfo, SocketInfo, UnixSocketInfo};
use crate::names::Proto;
use crate::stream::neighbours::Neighbours;
use crate::stream::process::{ProcessSink, ProcessStreamSpec, Scope};
use crate::stream::quota::Exceeded;
use crate::stream::shared_port::SharedPortGate;
use crate::stream::table::StreamTable;
use crate::stream::table::Ticket;
use crate::stream::{Answer, Format, Stream};
use attrs::{MountIdentity, attr_of, file_type_of};
use tree::{FileSocket, InodeTable, Node, ROOT_INO, Tree, Whole};
use views::{Group, ViewKind};
use xattrs::{MountFacts, Subject};

/// The shortest interval between snapshots that a lookup miss may force.
pub const MISS_REFRESH: Duration = Duration::from_millis(100);

/// How the file system behaves (from the command line).
#[derive(Clone, Debug)]
pub struct FsOptions {
    pub cache_ttl: Duration,
    pub all_processes: bool,
    pub capture: CaptureSettings,
    /// Bytes a stream may queue for a reader that is not reading.
    pub stream_buffer: usize,
    pub format: Format,
    /// Other users may enter the mount (`--allow-other`).
    pub allow_other: bool,
    /// `all` and `tree` streams use kernel events where they can be had.
    pub kernel_events: bool,
    /// Unix sockets are listed too (`--unix`).
    pub unix: bool,
    /// Where the container runtimes keep their names.
    pub runtimes: RuntimeOptions,
}

/// What makes snapshots and gives inode numbers; one at a time.
struct Refresher {
    inventory: Inventory,
    inodes: InodeTable,
    containers: ContainerIndex,
}

impl Refresher {
    /// A new snapshot's tree; the views' directories of directories are
    /// `owner`'s.
    fn tree(&mut self, all_processes: bool, owner: (u32, u32)) -> Tree {
        let snapshot = self.inventory.snapshot();
        let containers = self.containers.containers(&snapshot);
        Tree::build(snapshot, &mut self.inodes, all_processes, containers, owner)
    }
}

pub struct NetstatFs {
    options: FsOptions,
    /// What the root's attributes say of the streams.
    facts: MountFacts,
    /// Socket diagnostics for socket files' kernel attributes.
    diagnostics: diagnostics::Diagnostics,
    identity: MountIdentity,
    /// The daemon's own network namespace, opened at start-up.
    home: Option<Netns>,
    current: RwLock<Arc<Tree>>,
    refresher: Mutex<Refresher>,
    /// Open directories, each pinned to the tree it was opened on.
    dir_handles: Mutex<HashMap<u64, Arc<Tree>>>,
    next_dir_handle: AtomicU64,
    streams: Arc<StreamTable>,
    /// Kernel events for `all` and `tree` streams, read while any is open.
    events: Arc<KernelEvents>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl NetstatFs {
    /// Takes the first snapshot, so the first `ls` is already answered.
    pub fn new(options: FsOptions, streams: Arc<StreamTable>) -> NetstatFs {
        let shared = options.allow_other;
        let mut refresher = Refresher {
            inventory: Inventory::new().with_unix(options.unix),
            inodes: InodeTable::default(),
            containers: ContainerIndex::new(options.runtimes.clone()),
        };
        let identity = MountIdentity {
            uid: nix::unistd::getuid().as_raw(),
            gid: nix::unistd::getgid().as_raw(),
            mounted_at: SystemTime::now(),
            shared,
        };
        let first = refresher.tree(options.all_processes, (identity.uid, identity.gid));
        let facts = MountFacts {
            format: match options.format {
                Format::Pcap => "pcap",
                Format::PcapNg => "pcapng",
            },
            interface: options.capture.interface.clone(),
            linktype: options.capture.expected_linktype(),
        };
        NetstatFs {
            facts,
            diagnostics: diagnostics::Diagnostics::default(),
            options,
            identity,
            home: Netns::of_current_thread()
                .inspect_err(|err| warn!("cannot open the daemon's own network namespace: {err}"))
                .ok(),
            current: RwLock::new(Arc::new(first)),
            refresher: Mutex::new(refresher),
            dir_handles: Mutex::new(HashMap::new()),
            next_dir_handle: AtomicU64::new(1),
            streams,
            events: Arc::new(KernelEvents::default()),
        }
    }

    /// The tree as of now: the current one while its snapshot is valid.
    pub fn tree(&self) -> Arc<Tree> {
        self.tree_younger_than(self.options.cache_ttl)
    }

    fn tree_younger_than(&self, max_age: Duration) -> Arc<Tree> {
        let current = self.current_tree();
        if current.snapshot.age() < max_age {
            return current;
        }
        let mut refresher = lock(&self.refresher);
        // Another request may have refreshed while this one waited.
        let current = self.current_tree();
        if current.snapshot.age() < max_age {
            return current;
        }
        let tree = Arc::new(refresher.tree(
            self.options.all_processes,
            (self.identity.uid, self.identity.gid),
        ));
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::clone(&tree);
        tree
    }

    fn current_tree(&self) -> Arc<Tree> {
        Arc::clone(&self.current.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// How long the kernel may trust what this tree says.
    fn ttl(&self, tree: &Tree) -> Duration {
        self.options.cache_ttl.saturating_sub(tree.snapshot.age())
    }

    /// Finds `name` in `parent`. A name that is not in the tree but could
    /// name something new (a live process, a socket name) triggers one
    /// fresh snapshot; a miss is then answered as a negative entry the
    /// kernel keeps for the snapshot's life, so asking again for a missing
    /// name costs nothing here.
    fn lookup_node(&self, parent: u64, name: &OsStr) -> Result<Lookup, Errno> {
        if name.len() > 255 {
            return Err(Errno::ENAMETOOLONG);
        }
        let mut tree = self.tree();
        for attempt in 0..2 {
            let parent_node = tree.node(parent).ok_or(Errno::ENOENT)?;
            if !tree.is_dir(parent_node) {
                return Err(Errno::ENOTDIR);
            }
            if let Some(node) = tree.lookup(parent_node, name) {
                return Ok(Lookup::Found(tree, node));
            }
            if attempt == 0 && could_be_new(parent_node, name, self.options.unix) {
                debug!(
                    "lookup of {name:?} missed a snapshot {:?} old; refreshing",
                    tree.snapshot.age()
                );
                tree = self.tree_younger_than(MISS_REFRESH.min(self.options.cache_ttl));
            } else {
                break;
            }
        }
        Ok(Lookup::Missing(tree))
    }

    /// Whose attributes a node has, as `reader` (None for root) may see
    /// them; `kernel` holds a socket's diagnostics (asked for only where
    /// `with_kernel` says they are wanted).
    fn subject<'t>(
        &'t self,
        tree: &'t Tree,
        node: Node,
        reader: Option<u32>,
        with_kernel: bool,
        kernel: &'t mut Arc<Vec<(String, String)>>,
    ) -> Subject<'t> {
        match node {
            Node::Root => Subject::Root(&self.facts),
            Node::Dir(dir) => {
                let dir = &tree.dirs[dir];
                Subject::Process(tree.process_of(dir), tree.container_of(dir))
            }
            Node::File(dir, file) => {
                let dir = &tree.dirs[dir];
                let pid = tree.process_of(dir).pid;
                match tree.socket_of(dir, &dir.files[file]) {
                    FileSocket::Inet(socket) => {
                        if with_kernel {
                            *kernel = self.diagnostics.attributes(pid, socket);
                        }
                        Subject::Socket(socket, kernel.as_slice())
                    }
                    // Most of a unix socket's attributes are the kernel's.
                    FileSocket::Unix(socket) => {
                        *kernel = self.unix_kernel_attributes(tree, pid, socket, reader);
                        Subject::Unix(socket, kernel.as_slice())
                    }
                }
            }
            Node::Whole(..) | Node::View(_) => Subject::Whole,
        }
    }

    /// What socket diagnostics says of a unix socket, and who holds its
    /// peer (`peer_pid`, `peer_comm`: every process holding the peer
    /// socket, ascending, comma-separated), found in the snapshot or, if
    /// it is not there, in one fresh snapshot. A `reader` who is not root
    /// learns only of holders whose fds /proc would show them (their own
    /// processes): who holds a socket is what /proc/<pid>/fd tells.
    fn unix_kernel_attributes(
        &self,
        tree: &Tree,
        pid: i32,
        socket: &UnixSocketInfo,
        reader: Option<u32>,
    ) -> Arc<Vec<(String, String)>> {
        let kernel = self.diagnostics.unix_attributes(pid, socket);
        let Some(peer) = kernel
            .iter()
            .find(|(name, _)| name == "peer_inode")
            .and_then(|(_, value)| value.parse::<u64>().ok())
        else {
            return kernel;
        };
        let holders = |tree: &Tree| -> Vec<(i32, String)> {
            tree.snapshot
                .processes
                .iter()
                .filter(|process| reader.is_none_or(|uid| process.uid == uid))
                .filter(|process| process.unix.iter().any(|s| s.row.inode == peer))
                .map(|process| (process.pid, process.comm.clone()))
                .collect()
        };
        let mut found = holders(tree);
        if found.is_empty() {
            found = holders(&self.tree_younger_than(MISS_REFRESH.min(self.options.cache_ttl)));
        }
        if found.is_empty() {
            return kernel;
        }
        let mut with_peer = kernel.as_ref().clone();
        let (pids, comms): (Vec<String>, Vec<String>) = found
            .into_iter()
            .map(|(pid, comm)| (pid.to_string(), comm))
            .unzip();
        with_peer.push(("peer_pid".into(), pids.join(",")));
        with_peer.push(("peer_comm".into(), comms.join(",")));
        Arc::new(with_peer)
    }

    /// The entries of a directory as (ino, name, node), "." and ".." first.
    fn entries(tree: &Tree, dir: Node) -> Vec<(u64, &str, Node)> {
        match dir {
            Node::Root => {
                let mut entries = vec![(ROOT_INO, ".", Node::Root), (ROOT_INO, "..", Node::Root)];
                entries.extend(
                    tree.dirs
                        .iter()
                        .enumerate()
                        .filter(|(_, d)| d.listed)
                        .map(|(index, d)| (d.ino, d.name.as_str(), Node::Dir(index))),
                );
                entries.extend(tree.views.top.iter().map(|&top| {
                    let entry = &tree.views.entries[top];
                    (entry.ino, entry.name.as_str(), Node::View(top))
                }));
                entries
            }
            Node::View(index) => {
                let ViewKind::Dir(children) = &tree.views.entries[index].kind else {
                    return Vec::new();
                };
                let mut entries = vec![
                    (tree.views.entries[index].ino, ".", dir),
                    (ROOT_INO, "..", Node::Root),
                ];
                entries.extend(children.iter().map(|&child| {
                    let entry = &tree.views.entries[child];
                    (entry.ino, entry.name.as_str(), Node::View(child))
                }));
                entries
            }
            Node::Dir(dir_index) => {
                let d = &tree.dirs[dir_index];
                let mut entries = vec![
                    (d.ino, ".", dir),
                    (ROOT_INO, "..", Node::Root),
                    (
                        d.all_ino,
                        Whole::All.file_name(),
                        Node::Whole(dir_index, Whole::All),
                    ),
                    (
                        d.tree_ino,
                        Whole::Tree.file_name(),
                        Node::Whole(dir_index, Whole::Tree),
                    ),
                ];
                entries.extend(
                    d.files
                        .iter()
                        .enumerate()
                        .map(|(index, f)| (f.ino, f.name.as_str(), Node::File(dir_index, index))),
                );
                entries
            }
            Node::File(..) | Node::Whole(..) => Vec::new(),
        }
    }

    fn dir_tree(&self, fh: FileHandle) -> Arc<Tree> {
        lock(&self.dir_handles)
            .get(&fh.0)
            .cloned()
            .unwrap_or_else(|| self.tree())
    }

    /// Whether an unconnected `[::]` socket also takes IPv4: not if an IPv4
    /// socket of the same kind holds the same port in the same namespace
    /// (it could not, unless the IPv6 one is IPV6_V6ONLY).
    fn dual_stack(tree: &Tree, socket: &SocketInfo) -> bool {
        let v4_twin = match socket.proto() {
            Proto::Tcp6 => Proto::Tcp,
            Proto::Udp6 => Proto::Udp,
            _ => return true,
        };
        !tree
            .snapshot
            .processes
            .iter()
            .flat_map(|p| &p.sockets)
            .any(|other| {
                other.proto() == v4_twin
                    && other.local().port() == socket.local().port()
                    && other.netns == socket.netns
                    && !is_connected(other.remote())
            })
    }

    /// The namespace a process's socket lives in (`netns`, from the
    /// snapshot), or where the snapshot did not say, the process's own.
    fn netns_of(&self, pid: i32, netns: Option<NetnsId>) -> Result<Netns, Errno> {
        if let Some(home) = &self.home
            && netns == Some(home.id())
        {
            return Ok(home.clone());
        }
        Netns::of_process(pid).map_err(|err| {
            debug!("cannot open the network namespace of process {pid}: {err}");
            Errno::ENOENT
        })
    }

    /// A stream file's open, counted by `ticket` until its file closes;
    /// `reader`: the opening user, unless root.
    fn open_stream(&self, ino: u64, reader: Option<u32>, ticket: Ticket, reply: ReplyOpen) {
        let tree = self.tree();
        match tree.node(ino) {
            Some(Node::File(dir, file)) => {
                self.open_socket(&tree, dir, file, reader, ticket, reply)
            }
            Some(Node::Whole(dir, which)) => {
                self.open_process(&tree, dir, which, reader, ticket, reply)
            }
            Some(Node::View(index)) => match &tree.views.entries[index].kind {
                ViewKind::All(group) => self.open_group(&tree, group, reader, ticket, reply),
                ViewKind::Dir(_) => reply.error(Errno::EISDIR),
                // The kernel follows a symlink before it opens.
                ViewKind::Link(_) => reply.error(Errno::ELOOP),
            },
            Some(_) => reply.error(Errno::EISDIR),
            None => reply.error(Errno::ENOENT),
        }
    }

    /// A socket file: a capture of that socket's traffic.
    fn open_socket(
        &self,
        tree: &Tree,
        dir_index: usize,
        file_index: usize,
        reader: Option<u32>,
        ticket: Ticket,
        reply: ReplyOpen,
    ) {
        let dir = &tree.dirs[dir_index];
        let file = &dir.files[file_index];
        let process = tree.process_of(dir);
        let label = format!("{}/{}", dir.name, file.name);
        let socket = match tree.socket_of(dir, file) {
            FileSocket::Inet(socket) => socket,
            FileSocket::Unix(_) => {
                info!(
                    "{label}: a unix socket cannot be read: libpcap captures network \
                     interfaces, and unix sockets never pass through one"
                );
                return reply.error(Errno::EOPNOTSUPP);
            }
        };
        let target = FilterTarget {
            proto: socket.proto(),
            local: socket.local(),
            remote: socket.remote(),
            dual_stack: Self::dual_stack(tree, socket),
        };
        // Whether a filter can be made at all does not depend on the
        // namespace's addresses; the capture opener makes the real one there.
        if let Err(unsupported) = bpf_filter_for(&target, &[]) {
            warn!("{label}: cannot be captured: {}", unsupported.0);
            reply.error(Errno::EOPNOTSUPP);
            return;
        }
        let netns = match self.netns_of(process.pid, socket.netns) {
            Ok(netns) => netns,
            Err(errno) => return reply.error(errno),
        };
        let owner = SocketOwner {
            pid: process.pid,
            start_ticks: process.start_ticks,
            inode: Some(socket.row.inode),
            fds: socket.fds.clone(),
            reader,
        };
        let comment = (self.options.format == Format::PcapNg).then(|| {
            format!(
                "pid={} comm={} socket={}",
                process.pid, process.comm, file.name
            )
        });
        // An unconnected socket: not what the namespace's more specific
        // sockets take, now and as they come and go.
        let neighbours = Neighbours::look(target, socket.row.inode, process.pid).map(Arc::new);
        let taken = neighbours
            .as_ref()
            .map(|neighbours| neighbours.taken())
            .unwrap_or_default();
        let stream = Stream::start(
            label.clone(),
            owner,
            self.options.stream_buffer,
            self.options.format,
            comment,
        );
        // An unconnected UDP socket: what sockets sharing its port got is
        // not its (told by kernel events, where they can be had).
        let gate = match (&neighbours, socket.fds.first()) {
            (Some(neighbours), Some(&fd))
                if self.options.kernel_events
                    && matches!(target.proto, Proto::Udp | Proto::Udp6) =>
            {
                match SharedPortGate::start(
                    Arc::clone(&stream),
                    socket.row.inode,
                    socket.local(),
                    (process.pid, fd),
                    Arc::clone(&self.events),
                    neighbours.rivals(),
                ) {
                    Ok(gate) => Some(gate),
                    Err(err) => {
                        warn!("{label}: cannot start the stream: {err}");
                        return reply.error(Errno::EAGAIN);
                    }
                }
            }
            _ => None,
        };
        if let Some(neighbours) = neighbours {
            stream.follow_neighbours(neighbours);
        }
        let sink: Arc<dyn PacketSink> = match &gate {
            Some(gate) => gate.clone(),
            None => stream.clone(),
        };
        let opened_stream = Arc::clone(&stream);
        let request = CaptureRequest {
            netns,
            filter: CaptureFilter::Socket(target, taken),
            label,
            prompt: false,
            stage: RingStage::Sprout,
        };
        self.launch(
            request,
            sink,
            stream,
            move |opened| {
                if let Some(gate) = gate {
                    gate.opened(opened.linktype);
                }
                opened_stream.opened(opened);
                Ok(())
            },
            ticket,
            reply,
        );
    }

    /// A directory's `all` file (every TCP and UDP packet of the process)
    /// or `tree` file (of the process and its descendants).
    fn open_process(
        &self,
        tree: &Tree,
        dir_index: usize,
        which: Whole,
        reader: Option<u32>,
        ticket: Ticket,
        reply: ReplyOpen,
    ) {
        let dir = &tree.dirs[dir_index];
        let process = tree.process_of(dir);
        let label = format!("{}/{}", dir.name, which.file_name());
        // Followed from now on; a process that is gone is ENOENT, as its
        // directory would be on the next snapshot.
        let watch = match ProcessWatch::open(process.pid, process.start_ticks) {
            Ok(watch) => watch,
            Err(err) => {
                debug!("{label}: the process is gone ({err})");
                return reply.error(Errno::ENOENT);
            }
        };
        // The namespace the process is in now (the snapshot's may be older,
        // or unknown for a process that held no socket then).
        let netns = match self.netns_of(process.pid, None) {
            Ok(netns) => netns,
            Err(errno) => return reply.error(errno),
        };
        let owner = SocketOwner {
            pid: process.pid,
            start_ticks: process.start_ticks,
            inode: None,
            fds: Vec::new(),
            reader,
        };
        let stream = Stream::start(
            label.clone(),
            owner,
            self.options.stream_buffer,
            self.options.format,
            None,
        );
        // Who owns which flow, from kernel events where they can be had;
        // said once per stream, with why not where they cannot.
        let subscribed = if self.options.kernel_events {
            self.events.subscribe()
        } else {
            Err("--no-kernel-events".to_owned())
        };
        let events = match subscribed {
            Ok(events) => {
                info!("{label}: flows attributed from kernel events");
                Some(events)
            }
            Err(why) => {
                info!("{label}: flows attributed by following /proc ({why})");
                None
            }
        };
        let sorter = ProcessSink::new(
            Arc::clone(&stream),
            watch,
            ProcessStreamSpec {
                scope: match which {
                    Whole::All => Scope::Process,
                    Whole::Tree => Scope::Tree,
                },
                reader,
                events,
                settings: self.options.capture.clone(),
                first: netns.id(),
            },
        );
        let sink: Arc<dyn PacketSink> = sorter.first_sink();
        // Following /proc, the sorter must see a flow's packets while its
        // socket is still there (measured: 10 ms flows kept fell from 0.996
        // to 0.81 with the stall-proof block timeout); with kernel events
        // it can wait for them.
        let prompt = !sorter.follows_events();
        let request = CaptureRequest {
            netns,
            filter: CaptureFilter::TcpAndUdp,
            label,
            prompt,
            stage: RingStage::Sprout,
        };
        self.launch(
            request,
            sink,
            stream,
            move |opened| sorter.opened(opened),
            ticket,
            reply,
        );
    }

    /// A group's `all` (a container's, a pod's): every packet of its
    /// network namespace, captured there, until its oldest member ends.
    /// A reader who is not root must own every member, as they would need
    /// to for each member's own `all`.
    fn open_group(
        &self,
        tree: &Tree,
        group: &Group,
        reader: Option<u32>,
        ticket: Ticket,
        reply: ReplyOpen,
    ) {
        let members: Vec<&ProcessInfo> = group
            .members
            .iter()
            .map(|&index| &tree.snapshot.processes[index])
            .collect();
        if let Some(reader) = reader
            && members.iter().any(|member| member.uid != reader)
        {
            return reply.error(Errno::EACCES);
        }
        let Some(first) = members.first() else {
            return reply.error(Errno::ENOENT);
        };
        // The namespace's packets are the group's only where no process
        // outside it holds a socket there (a container on the host's
        // network shares the host's with everything else).
        let netns_id = group
            .netns
            .or(first.netns)
            .or_else(|| crate::inventory::netns_of(first.pid));
        let outsiders: Vec<String> = tree
            .snapshot
            .processes
            .iter()
            .enumerate()
            .filter(|(index, process)| {
                !group.members.contains(index)
                    && process.netns == netns_id
                    && !process.sockets.is_empty()
            })
            .map(|(_, process)| process.pid.to_string())
            .collect();
        if !outsiders.is_empty() {
            info!(
                "{}/all: its network namespace is shared with {} processes outside it (pid {}{}), \
                 as on the host's network: its packets cannot be told from theirs; read its \
                 processes' own all files instead",
                group.label,
                outsiders.len(),
                outsiders[..outsiders.len().min(3)].join(", "),
                if outsiders.len() > 3 { ", ..." } else { "" }
            );
            return reply.error(Errno::EOPNOTSUPP);
        }
        // Followed from now on, as a process's `all` is: gone is ENOENT.
        if let Err(err) = ProcessWatch::open(first.pid, first.start_ticks) {
            debug!("{}/all: its first process is gone ({err})", group.label);
            return reply.error(Errno::ENOENT);
        }
        let netns = match self.netns_of(first.pid, netns_id) {
            Ok(netns) => netns,
            Err(errno) => return reply.error(errno),
        };
        let label = format!("{}/all", group.label);
        let owner = SocketOwner {
            pid: first.pid,
            start_ticks: first.start_ticks,
            inode: None,
            fds: Vec::new(),
            reader,
        };
        let comment = (self.options.format == Format::PcapNg).then(|| label.clone());
        let stream = Stream::start(
            label.clone(),
            owner,
            self.options.stream_buffer,
            self.options.format,
            comment,
        );
        let sink: Arc<dyn PacketSink> = stream.clone();
        let opened_stream = Arc::clone(&stream);
        let request = CaptureRequest {
            netns,
            filter: CaptureFilter::Everything,
            label,
            prompt: false,
            stage: RingStage::Sprout,
        };
        self.launch(
            request,
            sink,
            stream,
            move |opened| {
                opened_stream.opened(opened);
                Ok(())
            },
            ticket,
            reply,
        );
    }

    /// Starts the capture; once it runs, the stream gets a file handle and
    /// the open is answered (from the capture opener: the session loop does
    /// not wait for libpcap).
    fn launch(
        &self,
        request: CaptureRequest,
        sink: Arc<dyn PacketSink>,
        stream: Arc<Stream>,
        on_opened: impl FnOnce(Opened) -> std::io::Result<()> + Send + 'static,
        ticket: Ticket,
        reply: ReplyOpen,
    ) {
        debug!("{}: opening a capture", request.label);
        let label = request.label.clone();
        let streams = Arc::clone(&self.streams);
        let started =
            crate::capture::growth::start(request, &self.options.capture, sink, move |outcome| {
                match outcome {
                    Ok(opened) => {
                        debug!("{label}: capture running, {}", opened.describe());
                        let control = opened.control.clone();
                        if let Err(err) = on_opened(opened) {
                            warn!("{label}: cannot start the stream: {err}");
                            control.stop();
                            return reply.error(Errno::EAGAIN);
                        }
                        let handle = streams.insert(stream, ticket);
                        reply.opened(
                            FileHandle(handle),
                            FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_NONSEEKABLE,
                        );
                    }
                    Err(err) => reply.error(capture_errno(&label, &err)),
                }
            });
        if let Err(err) = started {
            warn!("cannot start a capture: {err}");
        }
    }
}

/// What a lookup found.
enum Lookup {
    Found(Arc<Tree>, Node),
    /// Not there, as of this tree.
    Missing(Arc<Tree>),
}

/// The user a request comes from, unless root.
fn reader_of(req: &Request) -> Option<u32> {
    (req.uid() != 0).then_some(req.uid())
}

/// Whether a name missing from `tree` may name something that appeared
/// since: a process directory of a live pid under its current comm (not in
/// the tree, or under another name), or a well-formed socket file name.
/// Other names (typos, guesses of dead pids) cost no snapshot.
fn could_be_new(parent: Node, name: &OsStr, unix: bool) -> bool {
    let Some(name) = name.to_str() else {
        return false;
    };
    match parent {
        Node::Root => {
            let Some((pid, comm)) = crate::names::parse_process_dir_name(name) else {
                return false;
            };
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|live| crate::names::safe_comm(live.trim_end_matches('\n')) == comm)
        }
        Node::Dir(_) => {
            name.parse::<crate::names::SocketFileName>().is_ok()
                || (unix
                    && name.len() > crate::names::UNIX_PREFIX.len()
                    && name.starts_with(crate::names::UNIX_PREFIX))
        }
        // A container that started a moment ago.
        Node::View(_) => true,
        Node::File(..) | Node::Whole(..) => false,
    }
}

/// Logs why a capture did not open, in words a user can act on, and picks
/// the errno.
fn capture_errno(label: &str, err: &CaptureError) -> Errno {
    match err {
        CaptureError::Permission(detail) => {
            warn!(
                "{label}: capturing needs CAP_NET_RAW, which netstatfs lacks ({detail}); grant it with: {}",
                crate::privileges::setcap_command()
            );
            Errno::EPERM
        }
        CaptureError::Namespace(detail) => {
            warn!(
                "{label}: {detail}; entering another network namespace needs CAP_SYS_ADMIN \
                 (run netstatfs as root, or add cap_sys_admin to its file capabilities)"
            );
            Errno::EPERM
        }
        CaptureError::Failed(detail) => {
            warn!("{label}: cannot capture: {detail}");
            Errno::EIO
        }
    }
}

impl Filesystem for NetstatFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Listings carry each entry's attributes: one round trip per page
        // instead of one lookup per entry.
        if let Err(unsupported) = config.add_capabilities(InitFlags::FUSE_DO_READDIRPLUS) {
            debug!("kernel lacks {unsupported:?}: listings fall back to plain readdir");
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.lookup_node(parent.0, name) {
            Ok(Lookup::Found(tree, node)) => reply.entry(
                &self.ttl(&tree),
                &attr_of(&tree, node, &self.identity),
                Generation(0),
            ),
            // Inode number 0: a negative entry, cached for the snapshot's
            // remaining life (FUSE's way of saying ENOENT cacheably).
            Ok(Lookup::Missing(tree)) => reply.entry(
                &self.ttl(&tree),
                &FileAttr {
                    ino: INodeNo(0),
                    ..attr_of(&tree, Node::Root, &self.identity)
                },
                Generation(0),
            ),
            Err(errno) => reply.error(errno),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let tree = self.tree();
        match tree.node(ino.0) {
            Some(node) => reply.attr(&self.ttl(&tree), &attr_of(&tree, node, &self.identity)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let tree = self.tree();
        match tree.node(ino.0) {
            Some(node) if !tree.is_dir(node) => reply.error(Errno::ENOTDIR),
            Some(_) => {
                let handle = self.next_dir_handle.fetch_add(1, Ordering::Relaxed);
                lock(&self.dir_handles).insert(handle, tree);
                reply.opened(FileHandle(handle), FopenFlags::empty());
            }
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let tree = self.dir_tree(fh);
        let Some(dir) = tree.node(ino.0) else {
            reply.error(Errno::ENOENT);
            return;
        };
        for (index, (entry_ino, name, node)) in Self::entries(&tree, dir)
            .into_iter()
            .enumerate()
            .skip(offset as usize)
        {
            if reply.add(
                INodeNo(entry_ino),
                index as u64 + 1,
                file_type_of(&tree, node),
                name,
            ) {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let tree = self.dir_tree(fh);
        let Some(dir) = tree.node(ino.0) else {
            reply.error(Errno::ENOENT);
            return;
        };
        let ttl = self.ttl(&tree);
        for (index, (entry_ino, name, node)) in Self::entries(&tree, dir)
            .into_iter()
            .enumerate()
            .skip(offset as usize)
        {
            let attr = attr_of(&tree, node, &self.identity);
            if reply.add(
                INodeNo(entry_ino),
                index as u64 + 1,
                name,
                &ttl,
                &attr,
                Generation(0),
            ) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        lock(&self.dir_handles).remove(&fh.0);
        reply.ok();
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.acc_mode() != OpenAccMode::O_RDONLY {
            reply.error(Errno::EROFS);
            return;
        }
        let reader = reader_of(req);
        let ticket = match self.streams.reserve(req.uid()) {
            Ok(ticket) => ticket,
            Err(Exceeded::User { .. }) => return reply.error(Errno::EMFILE),
            Err(Exceeded::Total { .. }) => return reply.error(Errno::ENFILE),
        };
        self.open_stream(ino.0, reader, ticket, reply);
    }

    fn read(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some(stream) = self.streams.get(fh.0) else {
            reply.error(Errno::EBADF);
            return;
        };
        stream.read(
            size,
            req.pid(),
            Box::new(move |answer| match answer {
                Answer::Data(bytes) => reply.data(bytes),
                Answer::Interrupted => reply.error(Errno::EINTR),
            }),
        );
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        if let Some(stream) = self.streams.remove(fh.0) {
            stream.release();
        }
        reply.ok();
    }

    // A stream has nothing to write back: flush (every close) and fsync
    // succeed quietly.
    /// A stream has nothing to write back, and a close must not wait for
    /// the daemon: ENOSYS tells the kernel to send no more flushes (every
    /// later close succeeds without asking; only the mount's first close
    /// asks). A close that waits for the daemon can deadlock it: a process
    /// execing closes its close-on-exec fds while it holds its exec lock,
    /// and a listing meanwhile reads that process's /proc stat, which
    /// waits for that lock, on the FUSE threads the flush waits for.
    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let tree = self.tree();
        match tree.node(ino.0) {
            Some(Node::View(index)) => match &tree.views.entries[index].kind {
                ViewKind::Link(target) => reply.data(target.as_bytes()),
                _ => reply.error(Errno::EINVAL),
            },
            Some(_) => reply.error(Errno::EINVAL),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getxattr(&self, req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let tree = self.tree();
        let Some(node) = tree.node(ino.0) else {
            reply.error(Errno::ENOENT);
            return;
        };
        let mut kernel = Arc::default();
        let wanted = xattrs::is_kernel_attribute(name.as_bytes());
        match xattrs::get(
            &self.subject(&tree, node, reader_of(req), wanted, &mut kernel),
            name.as_bytes(),
        ) {
            Some(value) => reply_sized(reply, size, &value),
            None => reply.error(Errno::NO_XATTR),
        }
    }

    fn listxattr(&self, req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let tree = self.tree();
        match tree.node(ino.0) {
            Some(node) => {
                let mut kernel = Arc::default();
                let subject = self.subject(&tree, node, reader_of(req), true, &mut kernel);
                reply_sized(reply, size, &xattrs::list(&subject))
            }
            None => reply.error(Errno::ENOENT),
        }
    }

    // A read-only file system: every change is EROFS (the mount is `ro`
    // too, so the kernel usually answers before asking).

    fn setattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        _size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        reply.error(Errno::EROFS);
    }

    fn mknod(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn mkdir(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn unlink(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn rmdir(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn symlink(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _link_name: &OsStr,
        _target: &std::path::Path,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn rename(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _newparent: INodeNo,
        _newname: &OsStr,
        _flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }

    fn link(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _newparent: INodeNo,
        _newname: &OsStr,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        reply.error(Errno::EROFS);
    }

    fn create(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        reply.error(Errno::EROFS);
    }

    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }
}

/// The getxattr/listxattr size protocol: size 0 asks for the length; a
/// buffer too small is ERANGE.
fn reply_sized(reply: ReplyXattr, size: u32, value: &[u8]) {
    let length = u32::try_from(value.len()).unwrap_or(u32::MAX);
    if size == 0 {
        reply.size(length);
    } else if length > size {
        reply.error(Errno::ERANGE);
    } else {
        reply.data(value);
    }
}
