//! Peer processes: this test binary started again in "peer" mode, holding
//! sockets and making traffic on command, one line per command on stdin,
//! one `PEER ok …` or `PEER err …` line per answer on stdout.
//!
//! A peer is its own process (its own directory on the mount, its own comm)
//! and dies with its `Peer` handle, or when the test process dies (stdin
//! closes).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::Duration;

use crossbeam_channel::Receiver;
use nix::sys::socket::{
    self, AddressFamily, SockFlag, SockProtocol, SockType, SockaddrStorage, sockopt,
};

const PEER_ENV: &str = "NETSTATFS_TEST_PEER";
/// How this test binary runs only the peer entry point.
const PEER_ARGS: [&str; 5] = [
    "peer_process",
    "--exact",
    "--nocapture",
    "--test-threads=1",
    "-q",
];
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// The handle a test holds.
pub struct Peer {
    child: Child,
    stdin: ChildStdin,
    answers: Receiver<String>,
    pub pid: u32,
}

impl Peer {
    pub fn spawn() -> Peer {
        Self::spawn_with(Command::new(std::env::current_exe().unwrap()))
    }

    /// A peer running as another user.
    pub fn spawn_as(uid: u32, gid: u32) -> Peer {
        let mut command = Command::new("setpriv");
        command
            .arg(format!("--reuid={uid}"))
            .arg(format!("--regid={gid}"))
            .arg("--clear-groups")
            .arg(std::env::current_exe().unwrap());
        Self::spawn_with(command)
    }

    /// A peer inside network namespace `netns` (by `ip netns exec`).
    pub fn spawn_in_netns(netns: &str) -> Peer {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", netns])
            .arg(std::env::current_exe().unwrap());
        Self::spawn_with(command)
    }

    fn spawn_with(mut command: Command) -> Peer {
        let mut child = command
            .args(PEER_ARGS)
            .env(PEER_ENV, "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("peer starts");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let (tx, answers) = crossbeam_channel::unbounded();
        std::thread::spawn(move || {
            for line in stdout.lines().map_while(Result::ok) {
                if let Some(answer) = line.strip_prefix("PEER ") {
                    if tx.send(answer.to_owned()).is_err() {
                        break;
                    }
                }
            }
        });
        let mut peer = Peer {
            pid: child.id(),
            child,
            stdin,
            answers,
        };
        // The pid answered by the peer itself (`ip netns exec` execs it, so
        // the two agree; this also waits for the peer to be ready).
        peer.pid = peer.cmd("pid")[0].parse().unwrap();
        peer
    }

    /// Runs one command; returns the answer's fields. Panics on an error.
    pub fn cmd(&mut self, line: &str) -> Vec<String> {
        match self.try_cmd(line) {
            Ok(fields) => fields,
            Err(err) => panic!("peer command {line:?} failed: {err}"),
        }
    }

    pub fn try_cmd(&mut self, line: &str) -> Result<Vec<String>, String> {
        writeln!(self.stdin, "{line}").map_err(|err| err.to_string())?;
        self.stdin.flush().map_err(|err| err.to_string())?;
        let answer = self
            .answers
            .recv_timeout(ANSWER_TIMEOUT)
            .map_err(|_| format!("no answer to {line:?}"))?;
        match answer.strip_prefix("ok") {
            Some(rest) => Ok(rest.split_whitespace().map(str::to_owned).collect()),
            None => Err(answer),
        }
    }

    /// Sends a command that gets no answer (`exec`).
    pub fn send(&mut self, line: &str) {
        writeln!(self.stdin, "{line}").unwrap();
        self.stdin.flush().unwrap();
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Entry point of peer mode: serves commands if this process is a peer.
pub fn serve_if_peer() {
    if std::env::var_os(PEER_ENV).is_none() {
        return;
    }
    let mut state = PeerState::default();
    let stdin = std::io::stdin();
    for line in stdin.lock().lines().map_while(Result::ok) {
        let answer = match state.run(line.trim()) {
            Ok(fields) if fields.is_empty() => "ok".to_owned(),
            Ok(fields) => format!("ok {}", fields.join(" ")),
            Err(err) => format!("err {err}"),
        };
        println!("PEER {answer}");
        if line.trim() == "exit" {
            break;
        }
    }
    std::process::exit(0);
}

enum Held {
    UnixListener(std::os::unix::net::UnixListener),
    Listener(TcpListener),
    Stream(TcpStream),
    Udp(UdpSocket),
    Fd(OwnedFd),
}

impl Held {
    fn raw_fd(&self) -> i32 {
        match self {
            Held::UnixListener(s) => s.as_raw_fd(),
            Held::Listener(s) => s.as_raw_fd(),
            Held::Stream(s) => s.as_raw_fd(),
            Held::Udp(s) => s.as_raw_fd(),
            Held::Fd(fd) => fd.as_raw_fd(),
        }
    }
}

#[derive(Default)]
struct PeerState {
    held: HashMap<usize, Held>,
    next: usize,
}

type Answer = Result<Vec<String>, String>;

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

impl PeerState {
    fn hold(&mut self, held: Held) -> String {
        let id = self.next;
        self.next += 1;
        self.held.insert(id, held);
        id.to_string()
    }

    /// Holds a connected TCP socket; answers its id and its two ends.
    fn hold_connected(&mut self, stream: TcpStream) -> Answer {
        let (local, remote) = (
            stream.local_addr().map_err(err)?,
            stream.peer_addr().map_err(err)?,
        );
        Ok(vec![
            self.hold(Held::Stream(stream)),
            local.to_string(),
            remote.to_string(),
        ])
    }

    fn get(&self, id: &str) -> Result<&Held, String> {
        let id: usize = id.parse().map_err(err)?;
        self.held.get(&id).ok_or_else(|| format!("no object {id}"))
    }

    fn run(&mut self, line: &str) -> Answer {
        let mut words = line.splitn(2, ' ');
        let command = words.next().unwrap_or_default();
        let rest = words.next().unwrap_or_default();
        let args: Vec<&str> = rest.split_whitespace().collect();
        let arg = |i: usize| {
            args.get(i)
                .copied()
                .ok_or_else(|| format!("{command}: argument {i} missing"))
        };
        match command {
            "pid" => Ok(vec![std::process::id().to_string()]),
            "comm" => {
                std::fs::write("/proc/self/comm", rest).map_err(err)?;
                Ok(vec![])
            }
            "tcp-listen" => {
                let listener = TcpListener::bind(arg(0)?).map_err(err)?;
                let local = listener.local_addr().map_err(err)?;
                Ok(vec![self.hold(Held::Listener(listener)), local.to_string()])
            }
            "tcp-listen-reuseport" | "tcp-listen-v6only" => {
                let addr: SocketAddr = arg(0)?.parse().map_err(err)?;
                let fd = socket_for(addr, SockType::Stream, SockProtocol::Tcp)?;
                if command == "tcp-listen-reuseport" {
                    socket::setsockopt(&fd, sockopt::ReusePort, &true).map_err(err)?;
                } else {
                    socket::setsockopt(&fd, sockopt::Ipv6V6Only, &true).map_err(err)?;
                }
                socket::bind(fd.as_raw_fd(), &SockaddrStorage::from(addr)).map_err(err)?;
                socket::listen(&fd, socket::Backlog::new(128).map_err(err)?).map_err(err)?;
                let listener = TcpListener::from(fd);
                let local = listener.local_addr().map_err(err)?;
                Ok(vec![self.hold(Held::Listener(listener)), local.to_string()])
            }
            "tcp-connect" => {
                let stream = TcpStream::connect(arg(0)?).map_err(err)?;
                self.hold_connected(stream)
            }
            // A TCP socket neither bound nor connected yet (as between a
            // client's socket() and its connect()).
            "tcp-socket" => {
                let fd = unbound(SockType::Stream)?;
                Ok(vec![self.hold(Held::Fd(fd))])
            }
            // Connects a socket from `tcp-socket`; answers as `tcp-connect`.
            "tcp-connect-held" => {
                let id: usize = arg(0)?.parse().map_err(err)?;
                let target: SocketAddr = arg(1)?.parse().map_err(err)?;
                let Some(Held::Fd(fd)) = self.held.remove(&id) else {
                    return Err("not a socket from tcp-socket".into());
                };
                socket::connect(fd.as_raw_fd(), &SockaddrStorage::from(target)).map_err(err)?;
                self.hold_connected(TcpStream::from(fd))
            }
            // A UDP socket not bound yet (`udp-connect` binds it).
            "udp-socket" => {
                let fd = unbound(SockType::Datagram)?;
                Ok(vec![self.hold(Held::Udp(UdpSocket::from(fd)))])
            }
            "tcp-accept" => {
                let Held::Listener(listener) = self.get(arg(0)?)? else {
                    return Err("not a listener".into());
                };
                let (stream, _) = listener.accept().map_err(err)?;
                self.hold_connected(stream)
            }
            // Unix sockets: each answer ends with the socket's inode.
            "unix-pair" => {
                let (a, b) = std::os::unix::net::UnixStream::pair().map_err(err)?;
                let (a, b) = (OwnedFd::from(a), OwnedFd::from(b));
                let inodes = [inode_of(&a)?, inode_of(&b)?];
                Ok(vec![
                    self.hold(Held::Fd(a)),
                    self.hold(Held::Fd(b)),
                    inodes[0].to_string(),
                    inodes[1].to_string(),
                ])
            }
            "unix-listen" => {
                let listener = std::os::unix::net::UnixListener::bind_addr(&unix_address(arg(0)?)?)
                    .map_err(err)?;
                let inode = inode_of(&listener)?;
                Ok(vec![
                    self.hold(Held::UnixListener(listener)),
                    inode.to_string(),
                ])
            }
            "unix-connect" => {
                let stream = std::os::unix::net::UnixStream::connect_addr(&unix_address(arg(0)?)?)
                    .map_err(err)?;
                let fd = OwnedFd::from(stream);
                let inode = inode_of(&fd)?;
                Ok(vec![self.hold(Held::Fd(fd)), inode.to_string()])
            }
            "unix-accept" => {
                let Held::UnixListener(listener) = self.get(arg(0)?)? else {
                    return Err("not a unix listener".into());
                };
                let (stream, _) = listener.accept().map_err(err)?;
                let fd = OwnedFd::from(stream);
                let inode = inode_of(&fd)?;
                Ok(vec![self.hold(Held::Fd(fd)), inode.to_string()])
            }
            "udp-bind" => {
                let socket = UdpSocket::bind(arg(0)?).map_err(err)?;
                let local = socket.local_addr().map_err(err)?;
                Ok(vec![self.hold(Held::Udp(socket)), local.to_string()])
            }
            "udp-bind-reuse" => {
                // SO_REUSEADDR: another user's socket may share the port.
                let addr: SocketAddr = arg(0)?.parse().map_err(err)?;
                let fd = socket_for(addr, SockType::Datagram, SockProtocol::Udp)?;
                socket::setsockopt(&fd, sockopt::ReuseAddr, &true).map_err(err)?;
                socket::bind(fd.as_raw_fd(), &SockaddrStorage::from(addr)).map_err(err)?;
                let socket = UdpSocket::from(fd);
                let local = socket.local_addr().map_err(err)?;
                Ok(vec![self.hold(Held::Udp(socket)), local.to_string()])
            }
            "udp-bind-reuseport" => {
                // SO_REUSEADDR and SO_REUSEPORT.
                let addr: SocketAddr = arg(0)?.parse().map_err(err)?;
                let fd = socket_for(addr, SockType::Datagram, SockProtocol::Udp)?;
                socket::setsockopt(&fd, sockopt::ReuseAddr, &true).map_err(err)?;
                socket::setsockopt(&fd, sockopt::ReusePort, &true).map_err(err)?;
                socket::bind(fd.as_raw_fd(), &SockaddrStorage::from(addr)).map_err(err)?;
                let socket = UdpSocket::from(fd);
                let local = socket.local_addr().map_err(err)?;
                Ok(vec![self.hold(Held::Udp(socket)), local.to_string()])
            }
            "udp-burst" => {
                // `count` datagrams "<prefix>-<i>" to `to`, as fast as they go.
                let Held::Udp(socket) = self.get(arg(0)?)? else {
                    return Err("not a udp socket".into());
                };
                let to: SocketAddr = arg(1)?.parse().map_err(err)?;
                let count: usize = arg(2)?.parse().map_err(err)?;
                let prefix = arg(3)?;
                for i in 0..count {
                    socket
                        .send_to(format!("{prefix}-{i}").as_bytes(), to)
                        .map_err(err)?;
                }
                Ok(vec![])
            }
            "udp-collect" => {
                // Every datagram queued, until none came for `quiet` ms:
                // their payloads, comma-separated ("-" for none).
                let Held::Udp(socket) = self.get(arg(0)?)? else {
                    return Err("not a udp socket".into());
                };
                let quiet: u64 = arg(1)?.parse().map_err(err)?;
                socket
                    .set_read_timeout(Some(Duration::from_millis(quiet.max(1))))
                    .map_err(err)?;
                let mut got = Vec::new();
                let mut buffer = [0u8; 2048];
                while let Ok(n) = socket.recv(&mut buffer) {
                    got.push(String::from_utf8_lossy(&buffer[..n]).into_owned());
                }
                socket.set_read_timeout(None).map_err(err)?;
                Ok(vec![if got.is_empty() {
                    "-".into()
                } else {
                    got.join(",")
                }])
            }
            "udp-many" => {
                let count: usize = arg(0)?.parse().map_err(err)?;
                raise_fd_limit();
                let first = self.next;
                for _ in 0..count {
                    let socket = UdpSocket::bind(arg(1)?).map_err(err)?;
                    self.hold(Held::Udp(socket));
                }
                Ok(vec![first.to_string()])
            }
            "udp-connect" => {
                let Held::Udp(socket) = self.get(arg(0)?)? else {
                    return Err("not a udp socket".into());
                };
                socket.connect(arg(1)?).map_err(err)?;
                Ok(vec![socket.local_addr().map_err(err)?.to_string()])
            }
            "send" => {
                let (_, text) = rest.split_once(' ').unwrap_or((rest, ""));
                match self.get(arg(0)?)? {
                    Held::Stream(stream) => {
                        let mut stream: &TcpStream = stream;
                        stream.write_all(text.as_bytes()).map_err(err)?
                    }
                    Held::Udp(socket) => {
                        socket.send(text.as_bytes()).map_err(err)?;
                    }
                    _ => return Err("cannot send on that".into()),
                }
                Ok(vec![])
            }
            "sendto" => {
                let Held::Udp(socket) = self.get(arg(0)?)? else {
                    return Err("not a udp socket".into());
                };
                let text = rest.splitn(3, ' ').nth(2).unwrap_or_default();
                socket.send_to(text.as_bytes(), arg(1)?).map_err(err)?;
                Ok(vec![])
            }
            "recv" => {
                let size: usize = arg(1)?.parse().map_err(err)?;
                let mut buffer = vec![0u8; size];
                let got = match self.get(arg(0)?)? {
                    Held::Stream(stream) => {
                        let mut stream: &TcpStream = stream;
                        stream.read_exact(&mut buffer).map_err(err)?;
                        size
                    }
                    Held::Udp(socket) => socket.recv(&mut buffer).map_err(err)?,
                    _ => return Err("cannot receive on that".into()),
                };
                Ok(vec![String::from_utf8_lossy(&buffer[..got]).into_owned()])
            }
            "congestion" => {
                // setsockopt(TCP_CONGESTION) on a TCP stream.
                let Held::Stream(stream) = self.get(arg(0)?)? else {
                    return Err("not a tcp stream".into());
                };
                socket::setsockopt(
                    stream,
                    sockopt::TcpCongestion,
                    &std::ffi::OsString::from(arg(1)?),
                )
                .map_err(err)?;
                Ok(vec![])
            }
            "sendto-many" => {
                // `count` datagrams of `size` bytes, as fast as they go.
                let Held::Udp(socket) = self.get(arg(0)?)? else {
                    return Err("not a udp socket".into());
                };
                let count: usize = arg(2)?.parse().map_err(err)?;
                let size: usize = arg(3)?.parse().map_err(err)?;
                let payload = vec![b'f'; size];
                for _ in 0..count {
                    socket.send_to(&payload, arg(1)?).map_err(err)?;
                }
                Ok(vec![])
            }
            "pump" => {
                // Writes `bytes` bytes on a TCP stream from a thread; the
                // other end must be drained ("drain").
                let bytes: usize = arg(1)?.parse().map_err(err)?;
                let Held::Stream(stream) = self.get(arg(0)?)? else {
                    return Err("not a tcp stream".into());
                };
                let mut stream = stream.try_clone().map_err(err)?;
                std::thread::spawn(move || {
                    let chunk = vec![b'x'; 64 * 1024];
                    let mut left = bytes;
                    while left > 0 {
                        let n = left.min(chunk.len());
                        if stream.write_all(&chunk[..n]).is_err() {
                            break;
                        }
                        left -= n;
                    }
                });
                Ok(vec![])
            }
            "pace" => {
                // Writes `bytes` bytes at `kib` KiB/s in 16 KiB writes, from
                // a thread; the other end must be drained ("drain").
                let bytes: usize = arg(1)?.parse().map_err(err)?;
                let kib_per_second: f64 = arg(2)?.parse().map_err(err)?;
                let Held::Stream(stream) = self.get(arg(0)?)? else {
                    return Err("not a tcp stream".into());
                };
                let mut stream = stream.try_clone().map_err(err)?;
                std::thread::spawn(move || {
                    let chunk = vec![b'p'; 16 * 1024];
                    let started = std::time::Instant::now();
                    let mut sent = 0;
                    while sent < bytes {
                        let due = started
                            + Duration::from_secs_f64(sent as f64 / 1024.0 / kib_per_second);
                        if let Some(wait) = due.checked_duration_since(std::time::Instant::now()) {
                            std::thread::sleep(wait);
                        }
                        let n = (bytes - sent).min(chunk.len());
                        if stream.write_all(&chunk[..n]).is_err() {
                            break;
                        }
                        sent += n;
                    }
                });
                Ok(vec![])
            }
            "udp-pace" => {
                // Sends `count` datagrams ("pace-<i>") to `to` at `rate` a
                // second, and answers when the last is sent.
                let Held::Udp(socket) = self.get(arg(0)?)? else {
                    return Err("not a udp socket".into());
                };
                let to: SocketAddr = arg(1)?.parse().map_err(err)?;
                let count: usize = arg(2)?.parse().map_err(err)?;
                let rate: f64 = arg(3)?.parse().map_err(err)?;
                let started = std::time::Instant::now();
                for i in 0..count {
                    let due = started + Duration::from_secs_f64(i as f64 / rate);
                    if let Some(wait) = due.checked_duration_since(std::time::Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    socket
                        .send_to(format!("pace-{i}").as_bytes(), to)
                        .map_err(err)?;
                }
                Ok(vec![])
            }
            "drain" => {
                // Reads exactly `bytes` bytes.
                let bytes: usize = arg(1)?.parse().map_err(err)?;
                let Held::Stream(stream) = self.get(arg(0)?)? else {
                    return Err("not a tcp stream".into());
                };
                let mut stream = stream.try_clone().map_err(err)?;
                std::io::copy(&mut (&mut stream).take(bytes as u64), &mut std::io::sink())
                    .map_err(err)?;
                Ok(vec![])
            }
            "dup" => {
                let held = self.get(arg(0)?)?;
                let fd = match held {
                    Held::UnixListener(s) => s.as_fd().try_clone_to_owned(),
                    Held::Listener(s) => s.as_fd().try_clone_to_owned(),
                    Held::Stream(s) => s.as_fd().try_clone_to_owned(),
                    Held::Udp(s) => s.as_fd().try_clone_to_owned(),
                    Held::Fd(fd) => fd.try_clone(),
                }
                .map_err(err)?;
                let raw = fd.as_raw_fd();
                Ok(vec![self.hold(Held::Fd(fd)), raw.to_string()])
            }
            "fd" => Ok(vec![self.get(arg(0)?)?.raw_fd().to_string()]),
            "inode" => {
                // A socket's inode number is what fstat reports for it.
                let fd = self.get(arg(0)?)?.raw_fd();
                let stat =
                    nix::sys::stat::fstat(unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) })
                        .map_err(err)?;
                Ok(vec![stat.st_ino.to_string()])
            }
            "raw" => {
                let protocol: i32 = arg(0)?.parse().map_err(err)?;
                // SAFETY: a plain socket(2) call; the fd is owned at once.
                let raw =
                    unsafe { nix::libc::socket(nix::libc::AF_INET, nix::libc::SOCK_RAW, protocol) };
                if raw < 0 {
                    return Err(std::io::Error::last_os_error().to_string());
                }
                // SAFETY: `raw` is a new, valid fd nobody else owns.
                let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) };
                Ok(vec![self.hold(Held::Fd(fd))])
            }
            "shutdown" => {
                let Held::Stream(stream) = self.get(arg(0)?)? else {
                    return Err("not a tcp stream".into());
                };
                stream.shutdown(std::net::Shutdown::Write).map_err(err)?;
                Ok(vec![])
            }
            "close" => {
                let id: usize = arg(0)?.parse().map_err(err)?;
                self.held.remove(&id).ok_or("no such object")?;
                Ok(vec![])
            }
            "netns" => {
                // Sockets made after this live in that namespace (the
                // command thread enters it; the process stays where it was).
                // A name made by `ip netns add`, or a path such as
                // /proc/<pid>/ns/net.
                let name = arg(0)?;
                let path = if name.starts_with('/') {
                    name.to_owned()
                } else {
                    format!("/run/netns/{name}")
                };
                let handle = std::fs::File::open(path).map_err(err)?;
                nix::sched::setns(handle, nix::sched::CloneFlags::CLONE_NEWNET).map_err(err)?;
                Ok(vec![])
            }
            "setuid" => {
                // Every thread (glibc applies it process-wide): the process
                // is the user's from now on, and not dumpable.
                let (uid, gid): (u32, u32) =
                    (arg(0)?.parse().map_err(err)?, arg(1)?.parse().map_err(err)?);
                nix::unistd::setgroups(&[]).map_err(err)?;
                nix::unistd::setgid(nix::unistd::Gid::from_raw(gid)).map_err(err)?;
                nix::unistd::setuid(nix::unistd::Uid::from_raw(uid)).map_err(err)?;
                Ok(vec![])
            }
            "exec" => {
                // Becomes another program, serving the same stdin and stdout
                // (it is a copy of this test binary, in peer mode); nothing
                // answers this command, the next one is the new program's.
                use std::os::unix::process::CommandExt;
                let error = Command::new(arg(0)?).args(PEER_ARGS).exec();
                Err(format!("exec failed: {error}"))
            }
            "exit" => Ok(vec![]),
            other => Err(format!("unknown command {other:?}")),
        }
    }
}

/// A unix socket address: a path, or `@name` for an abstract name.
/// An IPv4 socket of `kind`, neither bound nor connected.
fn unbound(kind: SockType) -> Result<OwnedFd, String> {
    socket::socket(AddressFamily::Inet, kind, SockFlag::empty(), None).map_err(err)
}

fn unix_address(text: &str) -> Result<std::os::unix::net::SocketAddr, String> {
    use std::os::linux::net::SocketAddrExt;
    match text.strip_prefix('@') {
        Some(name) => std::os::unix::net::SocketAddr::from_abstract_name(name).map_err(err),
        None => std::os::unix::net::SocketAddr::from_pathname(text).map_err(err),
    }
}

/// A socket's inode number, as /proc and the mount name it.
fn inode_of(fd: &impl AsFd) -> Result<u64, String> {
    Ok(nix::sys::stat::fstat(fd.as_fd()).map_err(err)?.st_ino)
}

fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

/// A new socket of `kind` in `addr`'s family, before its options are set.
fn socket_for(
    addr: SocketAddr,
    kind: SockType,
    protocol: SockProtocol,
) -> Result<std::os::fd::OwnedFd, String> {
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    socket::socket(family, kind, SockFlag::SOCK_CLOEXEC, protocol).map_err(|e| e.to_string())
}
