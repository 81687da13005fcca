//! /proc → [`Snapshot`]: the live processes, the inet sockets each holds
//! (and, with [`Inventory::with_unix`], the unix sockets), and those
//! sockets' table rows, read once per network namespace.
//!
//! This module owns every read of /proc for the listing. It knows nothing of
//! FUSE: the file system turns a snapshot into a tree (`crate::fs::tree`).
//!
//! Cost: one pass over /proc/<pid>/fd for every process, then each socket
//! table read once per network namespace that holds a socket (through
//! /proc/<pid>/net of one process in it), never once per process or per
//! lookup.

pub mod container;
pub mod containers;
pub mod details;
pub mod diag;
pub mod live;
pub mod netns;
pub mod probe;
pub mod runtimes;
pub mod tables;
pub mod unix;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use log::{debug, warn};
use std::str::FromStr;

use procfs::process::{FDTarget, Process as ProcfsProcess};

use crate::names::Proto;
pub use tables::{SocketRow, state_name};
pub use unix::UnixRow;

pub use netns::{Netns, NetnsId};

/// What /proc said at one moment.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub taken: Instant,
    pub taken_wall: SystemTime,
    /// Every process whose fds could be read, sorted by pid, with or without
    /// inet sockets.
    pub processes: Vec<ProcessInfo>,
}

/// One process (thread group).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessInfo {
    pub pid: i32,
    /// Start time in clock ticks since boot: with the pid, the identity of a
    /// process (a reused pid has a later start).
    pub start_ticks: u64,
    pub started: SystemTime,
    pub comm: String,
    /// The owner of /proc/<pid>/fd: the effective user, or root while the
    /// process is not dumpable.
    pub uid: u32,
    pub gid: u32,
    pub netns: Option<NetnsId>,
    /// The inet sockets it holds, one per socket inode, sorted by inode.
    pub sockets: Vec<SocketInfo>,
    /// The unix sockets it holds, sorted by inode (only where the
    /// inventory lists them, see [`Inventory::with_unix`]).
    pub unix: Vec<UnixSocketInfo>,
}

/// One inet socket as a process holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketInfo {
    pub row: SocketRow,
    /// The process's fds that point at this socket, ascending.
    pub fds: Vec<i32>,
    /// The namespace whose table listed the socket.
    pub netns: Option<NetnsId>,
}

/// One unix socket as a process holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnixSocketInfo {
    pub row: UnixRow,
    /// The process's fds that point at this socket, ascending.
    pub fds: Vec<i32>,
    /// The namespace whose table listed the socket.
    pub netns: Option<NetnsId>,
}

impl SocketInfo {
    pub fn proto(&self) -> Proto {
        self.row.proto
    }
    pub fn local(&self) -> SocketAddr {
        self.row.local
    }
    pub fn remote(&self) -> SocketAddr {
        self.row.remote
    }
    pub fn state_name(&self) -> &'static str {
        state_name(self.row.proto, self.row.state)
    }
}

impl Snapshot {
    pub fn age(&self) -> Duration {
        self.taken.elapsed()
    }

    pub fn process(&self, pid: i32) -> Option<&ProcessInfo> {
        self.processes
            .binary_search_by_key(&pid, |process| process.pid)
            .ok()
            .map(|index| &self.processes[index])
    }

    pub fn socket_count(&self) -> usize {
        self.processes.iter().map(|p| p.sockets.len()).sum()
    }
}

/// Takes snapshots of /proc. It remembers what it has reported, so a
/// malformed line or an unreadable process is logged once, not once per
/// snapshot.
pub struct Inventory {
    proc_root: PathBuf,
    boot_time: SystemTime,
    ticks_per_second: u64,
    reported_lines: HashSet<String>,
    reported_unreadable: HashSet<i32>,
    own_netns: Option<NetnsId>,
    /// Whether unix sockets are listed too.
    unix: bool,
}

/// A process as the fd pass saw it, before the tables are joined in.
struct ScannedProcess {
    info: ProcessInfo,
    /// (socket inode, fd), in fd order.
    socket_fds: Vec<(u64, i32)>,
}

/// Where a namespace's tables are read from: its namespace id when
/// /proc/<pid>/ns/net was readable, else the process alone.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum TableSource {
    Netns(NetnsId),
    Process(i32),
}

impl Default for Inventory {
    fn default() -> Self {
        Self::new()
    }
}

impl Inventory {
    pub fn new() -> Self {
        let boot_secs = procfs::boot_time_secs().unwrap_or(0);
        Inventory {
            proc_root: PathBuf::from("/proc"),
            boot_time: SystemTime::UNIX_EPOCH + Duration::from_secs(boot_secs),
            ticks_per_second: procfs::ticks_per_second().max(1),
            reported_lines: HashSet::new(),
            reported_unreadable: HashSet::new(),
            own_netns: own_netns(),
            unix: false,
        }
    }

    /// Lists unix sockets too (one more table read per namespace).
    pub fn with_unix(mut self, unix: bool) -> Self {
        self.unix = unix;
        self
    }

    /// Reads /proc now. Never fails: what cannot be read is left out (and
    /// logged once).
    pub fn snapshot(&mut self) -> Snapshot {
        let taken = Instant::now();
        let taken_wall = SystemTime::now();
        let clock = (self.boot_time, self.ticks_per_second);
        // The daemon's own namespace (where most sockets live) has its
        // tables read through /proc/self, which cannot exit meanwhile, while
        // the processes are scanned.
        let own_dir = self.proc_root.join("self");
        let unix = self.unix;
        let (outcomes, own_tables) = std::thread::scope(|scope| {
            let own = self
                .own_netns
                .map(|_| scope.spawn(|| read_namespace(std::slice::from_ref(&own_dir), unix)));
            let outcomes = scan_all(&self.proc_root, clock);
            (
                outcomes,
                own.and_then(|handle| handle.join().ok()).flatten(),
            )
        });
        let scanned = self.keep_readable(outcomes);
        let rows = self.read_tables(&scanned, own_tables);
        let processes = scanned
            .into_iter()
            .map(|scanned| join_sockets(scanned, &rows))
            .collect();
        Snapshot {
            taken,
            taken_wall,
            processes,
        }
    }

    /// The processes whose fds could be read, by pid; the others are
    /// reported once each.
    fn keep_readable(&mut self, outcomes: Vec<Scanned>) -> Vec<ScannedProcess> {
        let mut scanned = Vec::with_capacity(outcomes.len());
        for outcome in outcomes {
            match outcome {
                Scanned::Process(process) => scanned.push(process),
                Scanned::Unreadable { pid, comm, error } => {
                    if self.reported_unreadable.insert(pid) {
                        debug!("skipping process {pid} ({comm}): cannot read its fds: {error}");
                    }
                }
                Scanned::Gone => {}
            }
        }
        scanned.sort_unstable_by_key(|process| process.info.pid);
        let live: HashSet<i32> = scanned.iter().map(|p| p.info.pid).collect();
        self.reported_unreadable.retain(|pid| live.contains(pid));
        scanned
    }

    /// Every table of every namespace that holds a socket, keyed by socket
    /// inode (unique across namespaces).
    fn read_tables(
        &mut self,
        scanned: &[ScannedProcess],
        own_tables: Option<NamespaceTables>,
    ) -> Rows {
        // Each namespace's tables can be read through any of its processes;
        // keep them all in case the first exits meanwhile.
        let mut sources: HashMap<TableSource, Vec<PathBuf>> = HashMap::new();
        for process in scanned.iter().filter(|p| !p.socket_fds.is_empty()) {
            let source = match process.info.netns {
                Some(netns) => TableSource::Netns(netns),
                None => TableSource::Process(process.info.pid),
            };
            let dir = self.proc_root.join(process.info.pid.to_string());
            sources.entry(source).or_default().push(dir);
        }
        let mut own_tables = own_tables;
        let mut rows = Rows::default();
        for (source, dirs) in sources {
            let netns = match source {
                TableSource::Netns(netns) => Some(netns),
                TableSource::Process(_) => None,
            };
            let tables = match own_tables.take() {
                Some(own) if netns.is_some() && netns == self.own_netns => Some(own),
                unused => {
                    own_tables = unused;
                    read_namespace(&dirs, self.unix)
                }
            };
            let Some(tables) = tables else {
                continue;
            };
            for (proto, line) in tables.bad_lines {
                if self.reported_lines.insert(format!("{proto}:{line}")) {
                    warn!("skipping a malformed line of /proc/net/{proto}: {line:?}");
                }
            }
            for line in tables.unix_bad_lines {
                if self.reported_lines.insert(format!("unix:{line}")) {
                    warn!("skipping a malformed line of /proc/net/unix: {line:?}");
                }
            }
            for row in tables.rows {
                rows.inet.insert(row.inode, (row, netns));
            }
            for row in tables.unix {
                rows.unix.insert(row.inode, (row, netns));
            }
        }
        rows
    }
}

/// Every namespace's table rows, by socket inode.
#[derive(Default)]
struct Rows {
    inet: HashMap<u64, (SocketRow, Option<NetnsId>)>,
    unix: HashMap<u64, (UnixRow, Option<NetnsId>)>,
}

/// One namespace's socket tables.
struct NamespaceTables {
    rows: Vec<SocketRow>,
    bad_lines: Vec<(Proto, String)>,
    /// Empty unless unix sockets are listed.
    unix: Vec<UnixRow>,
    unix_bad_lines: Vec<String>,
}

/// Reads a namespace's tables (and its unix table, with `unix`) through
/// the first of `proc_dirs` that is still there.
fn read_namespace(proc_dirs: &[PathBuf], unix: bool) -> Option<NamespaceTables> {
    'dirs: for proc_pid in proc_dirs {
        let mut tables = NamespaceTables {
            rows: Vec::new(),
            bad_lines: Vec::new(),
            unix: Vec::new(),
            unix_bad_lines: Vec::new(),
        };
        for proto in Proto::ALL {
            match tables::read_table(proc_pid, proto) {
                Ok(table) => {
                    tables.rows.extend(table.rows);
                    tables
                        .bad_lines
                        .extend(table.bad_lines.into_iter().map(|line| (proto, line)));
                }
                Err(err) => {
                    debug!(
                        "cannot read socket tables through {}: {err}",
                        proc_pid.display()
                    );
                    continue 'dirs;
                }
            }
        }
        if unix {
            match std::fs::read(proc_pid.join("net/unix")) {
                Ok(text) => {
                    let table = unix::parse_table(&text);
                    tables.unix = table.rows;
                    tables.unix_bad_lines = table.bad_lines;
                }
                // A kernel without unix sockets (or a process gone just
                // now: its inet tables were read, so the listing stands).
                Err(err) => debug!(
                    "cannot read the unix socket table through {}: {err}",
                    proc_pid.display()
                ),
            }
        }
        return Some(tables);
    }
    None
}

/// Scans every process on as many threads as there are cores (the cost is
/// system calls, about one per fd).
fn scan_all(proc_root: &Path, clock: (SystemTime, u64)) -> Vec<Scanned> {
    let pids = match list_pids(proc_root) {
        Ok(pids) => pids,
        Err(err) => {
            warn!("cannot list {}: {err}", proc_root.display());
            return Vec::new();
        }
    };
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 8);
    let chunk = pids.len().div_ceil(workers).max(1);
    std::thread::scope(|scope| {
        let handles: Vec<_> = pids
            .chunks(chunk)
            .map(|pids| {
                scope.spawn(move || {
                    pids.iter()
                        .map(|&pid| scan_process(proc_root, pid, clock))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|handle| handle.join().unwrap_or_default())
            .collect()
    })
}

/// What scanning one process found.
enum Scanned {
    Process(ScannedProcess),
    /// Its fds cannot be read (another user's process, without privileges).
    Unreadable {
        pid: i32,
        comm: String,
        error: String,
    },
    /// It exited meanwhile.
    Gone,
}

/// The pids under /proc (thread group leaders only: threads are not listed).
fn list_pids(proc_root: &Path) -> std::io::Result<Vec<i32>> {
    Ok(std::fs::read_dir(proc_root)?
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .collect())
}

/// One process: its identity from /proc/<pid>/stat, its owner, and the
/// socket inodes its fds point at.
fn scan_process(
    proc_root: &Path,
    pid: i32,
    (boot_time, ticks_per_second): (SystemTime, u64),
) -> Scanned {
    let proc_pid = proc_root.join(pid.to_string());
    let Ok(process) = ProcfsProcess::new_with_root(proc_pid.clone()) else {
        return Scanned::Gone;
    };
    let Ok(stat) = process.stat() else {
        return Scanned::Gone;
    };
    // Owned as /proc/<pid>/fd is: by the effective user, or by root while
    // the process is not dumpable (it changed credentials, or runs a
    // setuid, setgid or file-capability program). /proc/<pid> itself shows
    // the effective user even then.
    let Ok(metadata) = std::fs::metadata(proc_pid.join("fd")) else {
        return Scanned::Gone;
    };
    let socket_fds = match socket_fds(&proc_pid) {
        Ok(socket_fds) => socket_fds,
        Err(error) => {
            return Scanned::Unreadable {
                pid,
                comm: stat.comm,
                error: error.to_string(),
            };
        }
    };
    let netns = if socket_fds.is_empty() {
        None
    } else {
        read_netns(&proc_pid)
    };
    let started =
        boot_time + Duration::from_secs_f64(stat.starttime as f64 / ticks_per_second as f64);
    Scanned::Process(ScannedProcess {
        info: ProcessInfo {
            pid,
            start_ticks: stat.starttime,
            started,
            comm: stat.comm,
            uid: metadata.uid(),
            gid: metadata.gid(),
            netns,
            sockets: Vec::new(),
            unix: Vec::new(),
        },
        socket_fds,
    })
}

/// (socket inode, fd) for every fd of the process that is a socket: one
/// readlinkat per fd, relative to the open fd directory (procfs's own fd
/// iterator costs four system calls per fd).
fn socket_fds(proc_pid: &Path) -> std::io::Result<Vec<(u64, i32)>> {
    Ok(socket_fds_at_most(proc_pid, usize::MAX)?.unwrap_or_default())
}

/// The same, or None where the process has more than `most` fds.
fn socket_fds_at_most(proc_pid: &Path, most: usize) -> std::io::Result<Option<Vec<(u64, i32)>>> {
    use std::os::fd::AsFd;
    let fd_dir = std::fs::File::open(proc_pid.join("fd"))?;
    let mut entries = nix::dir::Dir::from_fd(fd_dir.try_clone()?.into())?;
    let mut sockets = Vec::new();
    let mut fds = 0;
    for entry in entries.iter().filter_map(Result::ok) {
        let name = entry.file_name();
        let Some(fd) = name.to_str().ok().and_then(|name| name.parse::<i32>().ok()) else {
            continue;
        };
        fds += 1;
        if fds > most {
            return Ok(None);
        }
        // An fd closed meanwhile is simply not there.
        let Ok(target) = nix::fcntl::readlinkat(fd_dir.as_fd(), name) else {
            continue;
        };
        if let Some(Ok(FDTarget::Socket(inode))) = target.to_str().map(FDTarget::from_str) {
            sockets.push((inode, fd));
        }
    }
    Ok(Some(sockets))
}

/// The sockets (inodes) process `pid` holds; None if it is gone, its fds
/// cannot be read, or it has more than `most` fds.
pub fn socket_inodes(pid: i32, most: usize) -> Option<Vec<u64>> {
    let fds = socket_fds_at_most(&Path::new("/proc").join(pid.to_string()), most).ok()??;
    Some(fds.into_iter().map(|(inode, _)| inode).collect())
}

/// A process holding socket `inode` and its fd there (looked for in every
/// process's fds: for the few sockets whose holder nothing else names).
pub fn holder_of(inode: u64) -> Option<(i32, i32)> {
    let processes = std::fs::read_dir("/proc").ok()?;
    for entry in processes.filter_map(Result::ok) {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(fds) = socket_fds(&entry.path()) else {
            continue;
        };
        if let Some(&(_, fd)) = fds.iter().find(|(held, _)| *held == inode) {
            return Some((pid, fd));
        }
    }
    None
}

/// The network namespace process `pid` is in now.
pub fn netns_of(pid: i32) -> Option<NetnsId> {
    read_netns(&Path::new("/proc").join(pid.to_string()))
}

/// The daemon's own network namespace.
pub fn own_netns() -> Option<NetnsId> {
    read_netns(Path::new("/proc/self"))
}

/// The namespace id from /proc/<pid>/ns/net ("net:[4026531840]").
fn read_netns(proc_pid: &Path) -> Option<NetnsId> {
    let link = std::fs::read_link(proc_pid.join("ns/net")).ok()?;
    NetnsId::from_link_text(link.to_str()?)
}

fn join_sockets(scanned: ScannedProcess, rows: &Rows) -> ProcessInfo {
    let ScannedProcess {
        mut info,
        mut socket_fds,
    } = scanned;
    socket_fds.sort_unstable();
    let mut sockets: Vec<SocketInfo> = Vec::new();
    let mut unix: Vec<UnixSocketInfo> = Vec::new();
    for (inode, fd) in socket_fds {
        if let Some((row, netns)) = rows.inet.get(&inode) {
            match sockets.last_mut() {
                Some(last) if last.row.inode == inode => last.fds.push(fd),
                _ => sockets.push(SocketInfo {
                    row: row.clone(),
                    fds: vec![fd],
                    netns: *netns,
                }),
            }
        } else if let Some((row, netns)) = rows.unix.get(&inode) {
            match unix.last_mut() {
                Some(last) if last.row.inode == inode => last.fds.push(fd),
                _ => unix.push(UnixSocketInfo {
                    row: row.clone(),
                    fds: vec![fd],
                    netns: *netns,
                }),
            }
        }
    }
    info.sockets = sockets;
    info.unix = unix;
    info
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sees_its_own_listener() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let snapshot = Inventory::new().snapshot();
        let me = snapshot
            .process(std::process::id() as i32)
            .expect("own process listed");
        let socket = me
            .sockets
            .iter()
            .find(|s| s.proto() == Proto::Tcp && s.local().port() == port)
            .expect("listener found");
        assert_eq!(socket.state_name(), "LISTEN");
        assert_eq!(socket.fds.len(), 1);
        assert!(me.netns.is_some());
        assert_eq!(socket.netns, me.netns);
    }

    #[test]
    fn dup_fds_share_one_socket() {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let twin = socket.try_clone().unwrap();
        let port = socket.local_addr().unwrap().port();
        let snapshot = Inventory::new().snapshot();
        let me = snapshot.process(std::process::id() as i32).unwrap();
        let found: Vec<_> = me
            .sockets
            .iter()
            .filter(|s| s.proto() == Proto::Udp && s.local().port() == port)
            .collect();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].fds.len(), 2);
        drop(twin);
    }
}
