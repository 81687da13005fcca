//! Reading socket files: the pcap stream, its contents, its end, and the
//! readers (tcpdump, tshark, cat, many, slow, interrupted).

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::common::mount::Mount;
use crate::common::netns::Netns;
use crate::common::packets::{Seen, payloads, read_pcap, read_pcap_file};
use crate::common::peer::Peer;
use crate::common::tcpdump::Tcpdump;
use crate::common::{wait_for, wait_until};

const WAIT: Duration = Duration::from_secs(10);
/// The issue's bound for a stream to end once its socket has closed, and
/// for a signalled reader to be let go.
const END_BOUND: Duration = Duration::from_secs(2);

fn addr(text: &str) -> SocketAddr {
    text.parse().unwrap()
}

/// A socket file's path once the mount lists it.
fn socket_file(mount: &Mount, peer: &Peer, comm: &str, name: &str) -> PathBuf {
    let path = mount.dir(peer.pid, comm).join(name);
    wait_until(WAIT, &format!("{} to appear", path.display()), || {
        path.exists()
    });
    path
}

/// A loopback TCP connection `peer` (named `comm`) holds both ends of:
/// the client's and the server's replies, and the client socket's file.
fn tcp_connection(
    mount: &Mount,
    peer: &mut Peer,
    comm: &str,
) -> (Vec<String>, Vec<String>, PathBuf) {
    let listener = peer.cmd("tcp-listen 127.0.0.1:0");
    let client = peer.cmd(&format!("tcp-connect {}", listener[1]));
    let server = peer.cmd(&format!("tcp-accept {}", listener[0]));
    let path = socket_file(
        mount,
        peer,
        comm,
        &format!("tcp_{}_{}", client[1], client[2]),
    );
    (client, server, path)
}

/// A UDP socket `peer` (named `comm`) binds on loopback: the peer's reply
/// and the socket's file.
fn udp_socket(mount: &Mount, peer: &mut Peer, comm: &str) -> (Vec<String>, PathBuf) {
    let udp = peer.cmd("udp-bind 127.0.0.1:0");
    let path = socket_file(mount, peer, comm, &format!("udp_{}_0.0.0.0:0", udp[1]));
    (udp, path)
}

/// Reads a socket file on a thread, as a user's `cat` would, keeping what
/// it got so far.
struct Reader {
    bytes: Arc<Mutex<Vec<u8>>>,
    thread: Option<JoinHandle<std::io::Result<()>>>,
    ended_at: Arc<Mutex<Option<Instant>>>,
}

impl Reader {
    /// Opens the file (the capture is running once this returns).
    fn open(path: &Path) -> Reader {
        let (opened_tx, opened_rx) = crossbeam_channel::bounded(1);
        let bytes = Arc::new(Mutex::new(Vec::new()));
        let ended_at = Arc::new(Mutex::new(None));
        let (sink, ended, path) = (bytes.clone(), ended_at.clone(), path.to_owned());
        let thread = std::thread::spawn(move || {
            let mut file = match File::open(&path) {
                Ok(file) => {
                    let _ = opened_tx.send(Ok(()));
                    file
                }
                Err(err) => {
                    let _ = opened_tx.send(Err(err.to_string()));
                    return Ok(());
                }
            };
            let mut buffer = vec![0u8; 128 * 1024];
            loop {
                let n = file.read(&mut buffer)?;
                if n == 0 {
                    *ended.lock().unwrap() = Some(Instant::now());
                    return Ok(());
                }
                sink.lock().unwrap().extend_from_slice(&buffer[..n]);
            }
        });
        opened_rx
            .recv_timeout(WAIT)
            .expect("open answered")
            .unwrap_or_else(|err| panic!("open failed: {err}"));
        Reader {
            bytes,
            thread: Some(thread),
            ended_at,
        }
    }

    fn packets(&self) -> Vec<Seen> {
        read_pcap(&self.bytes.lock().unwrap()).1
    }

    /// Waits until the packets read so far satisfy `done`.
    fn wait_packets(&self, what: &str, done: impl Fn(&[Seen]) -> bool) -> Vec<Seen> {
        wait_for(WAIT, what, || {
            let packets = self.packets();
            done(&packets).then_some(packets)
        })
    }

    /// Waits for end of file; returns the whole stream and when it ended.
    fn wait_eof(mut self, timeout: Duration) -> (Vec<u8>, Instant) {
        let thread = self.thread.take().unwrap();
        wait_until(timeout, "end of file", || thread.is_finished());
        thread.join().unwrap().expect("reads succeed");
        let ended = self.ended_at.lock().unwrap().expect("ended by EOF");
        (self.bytes.lock().unwrap().clone(), ended)
    }
}

/// No packet appears twice (loopback traffic is seen once).
fn assert_no_duplicates(packets: &[Seen]) {
    for (i, a) in packets.iter().enumerate() {
        for b in &packets[i + 1..] {
            assert!(a != b || a.tcp_flags.is_empty(), "duplicate packet {a:?}");
        }
    }
}

/// A TCP exchange on a connection whose file is opened after connect:
/// data both ways and the FIN handshake, exactly that connection.
fn tcp_exchange(listen_on: &str) {
    let mount = Mount::start(&[]);
    let mut peer = Peer::spawn();
    peer.cmd("comm tcp-exchange");
    let listener = peer.cmd(&format!("tcp-listen {listen_on}"));
    let listener_file = socket_file(
        &mount,
        &peer,
        "tcp-exchange",
        &format!(
            "tcp{}_{}_{}",
            if listen_on.starts_with('[') { "6" } else { "" },
            listener[1],
            if listen_on.starts_with('[') {
                "[::]:0"
            } else {
                "0.0.0.0:0"
            }
        ),
    );
    let listener_stream = Reader::open(&listener_file);

    let client = peer.cmd(&format!("tcp-connect {}", listener[1]));
    let server = peer.cmd(&format!("tcp-accept {}", listener[0]));
    let (local, remote) = (addr(&client[1]), addr(&client[2]));
    let proto = if local.is_ipv4() { "tcp" } else { "tcp6" };
    let client_file = socket_file(
        &mount,
        &peer,
        "tcp-exchange",
        &format!("{proto}_{local}_{remote}"),
    );
    let stream = Reader::open(&client_file);
    // A second connection on the same listener port must stay out.
    let other = peer.cmd(&format!("tcp-connect {}", listener[1]));
    let other_server = peer.cmd(&format!("tcp-accept {}", listener[0]));

    peer.cmd(&format!("send {} ping-1", client[0]));
    peer.cmd(&format!("recv {} 6", server[0]));
    peer.cmd(&format!("send {} other-connection", other[0]));
    peer.cmd(&format!("recv {} 16", other_server[0]));
    peer.cmd(&format!("send {} pong-1", server[0]));
    peer.cmd(&format!("recv {} 6", client[0]));
    peer.cmd(&format!("close {}", client[0]));
    peer.cmd(&format!("close {}", server[0]));
    let closed = Instant::now();

    let (bytes, ended) = stream.wait_eof(WAIT);
    assert!(
        ended - closed < END_BOUND,
        "EOF {:?} after close",
        ended - closed
    );
    let (linktype, packets) = read_pcap(&bytes);
    assert_eq!(linktype, 113, "LINUX_SLL from the any device");
    assert!(
        packets
            .iter()
            .all(|p| p.is(local, remote) || p.is(remote, local)),
        "only this connection: {packets:#?}"
    );
    assert_eq!(payloads(&packets), ["ping-1", "pong-1"]);
    let ping = packets.iter().find(|p| p.payload == b"ping-1").unwrap();
    assert!(ping.is(local, remote));
    let fins: Vec<&Seen> = packets
        .iter()
        .filter(|p| p.tcp_flags.contains('F'))
        .collect();
    assert_eq!(fins.len(), 2, "a FIN each way: {packets:#?}");
    assert!(fins.iter().any(|p| p.is(local, remote)) && fins.iter().any(|p| p.is(remote, local)));
    assert!(
        packets.last().unwrap().tcp_flags == ".",
        "the last ACK of the close"
    );
    assert_no_duplicates(&packets);

    // The listener's stream saw both handshakes and all the data.
    let listened = listener_stream.wait_packets("both connections on the listener", |packets| {
        payloads(packets).len() >= 3
    });
    let syns: Vec<&Seen> = listened.iter().filter(|p| p.tcp_flags == "S").collect();
    assert_eq!(syns.len(), 2, "{listened:#?}");
    assert!(syns.iter().any(|p| p.src == local));
    assert!(
        listened
            .iter()
            .any(|p| p.tcp_flags == "S." && p.dst == local),
        "the SYN-ACK"
    );
    assert_no_duplicates(&listened);
    peer.cmd(&format!("close {}", listener[0]));
    listener_stream.wait_eof(WAIT);
}

#[test]
fn tcp_v4_stream_holds_exactly_the_connection() {
    tcp_exchange("127.0.0.1:0");
}

#[test]
fn tcp_v6_stream_holds_exactly_the_connection() {
    tcp_exchange("[::1]:0");
}

fn udp_exchange(bind: &str) {
    let mount = Mount::start(&[]);
    let mut peer = Peer::spawn();
    peer.cmd("comm udp-exchange");
    let one = peer.cmd(&format!("udp-bind {bind}"));
    let two = peer.cmd(&format!("udp-bind {bind}"));
    let noise = peer.cmd(&format!("udp-bind {bind}"));
    peer.cmd(&format!("udp-connect {} {}", one[0], two[1]));
    peer.cmd(&format!("udp-connect {} {}", two[0], one[1]));
    let (local, remote) = (addr(&one[1]), addr(&two[1]));
    let proto = if local.is_ipv4() { "udp" } else { "udp6" };
    let file = socket_file(
        &mount,
        &peer,
        "udp-exchange",
        &format!("{proto}_{local}_{remote}"),
    );
    let unconnected_any = if local.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    let noise_file = socket_file(
        &mount,
        &peer,
        "udp-exchange",
        &format!("{proto}_{}_{unconnected_any}", noise[1]),
    );
    let stream = Reader::open(&file);
    let noise_stream = Reader::open(&noise_file);

    peer.cmd(&format!("sendto {} {} noise-to-two", noise[0], two[1]));
    peer.cmd(&format!("send {} hello-udp", one[0]));
    peer.cmd(&format!("recv {} 100", two[0]));
    peer.cmd(&format!("send {} reply-udp", two[0]));
    peer.cmd(&format!("recv {} 100", one[0]));
    peer.cmd(&format!("close {}", one[0]));
    let closed = Instant::now();
    let (bytes, ended) = stream.wait_eof(WAIT);
    assert!(ended - closed < END_BOUND);
    let packets = read_pcap(&bytes).1;
    assert_eq!(packets.len(), 2, "{packets:#?}");
    assert!(packets[0].is(local, remote) && packets[0].payload == b"hello-udp");
    assert!(packets[1].is(remote, local) && packets[1].payload == b"reply-udp");

    // The unconnected socket's stream has its own datagram.
    let noise_packets = noise_stream.wait_packets("the noise datagram", |p| !p.is_empty());
    assert_eq!(payloads(&noise_packets), ["noise-to-two"]);
}

#[test]
fn udp_v4_stream_holds_exactly_the_exchange() {
    udp_exchange("127.0.0.1:0");
}

#[test]
fn udp_v6_stream_holds_exactly_the_exchange() {
    udp_exchange("[::1]:0");
}

#[test]
fn a_dual_stack_listener_sees_ipv4_and_ipv6_clients_and_mapped_sockets_carry_ipv4() {
    let mount = Mount::start(&[]);
    let mut peer = Peer::spawn();
    peer.cmd("comm dual-stack");
    let listener = peer.cmd("tcp-listen [::]:0");
    let port: u16 = addr(&listener[1]).port();
    let listener_stream = Reader::open(&socket_file(
        &mount,
        &peer,
        "dual-stack",
        &format!("tcp6_[::]:{port}_[::]:0"),
    ));
    let v4 = peer.cmd(&format!("tcp-connect 127.0.0.1:{port}"));
    let v4_server = peer.cmd(&format!("tcp-accept {}", listener[0]));
    let v6 = peer.cmd(&format!("tcp-connect [::1]:{port}"));
    peer.cmd(&format!("tcp-accept {}", listener[0]));
    listener_stream.wait_packets("an IPv4 and an IPv6 handshake", |packets| {
        let syns: Vec<_> = packets.iter().filter(|p| p.tcp_flags == "S").collect();
        syns.iter().any(|p| p.src == addr(&v4[1])) && syns.iter().any(|p| p.src == addr(&v6[1]))
    });

    // The accepted IPv4 connection lives on an IPv6 socket with mapped
    // addresses; its stream carries IPv4 packets.
    let v4_client_port = addr(&v4[1]).port();
    let mapped = format!("tcp6_[::ffff:127.0.0.1]:{port}_[::ffff:127.0.0.1]:{v4_client_port}");
    let mapped_stream = Reader::open(&socket_file(&mount, &peer, "dual-stack", &mapped));
    peer.cmd(&format!("send {} mapped-data", v4_server[0]));
    peer.cmd(&format!("recv {} 11", v4[0]));
    let packets =
        mapped_stream.wait_packets("the mapped socket's data", |p| !payloads(p).is_empty());
    assert_eq!(payloads(&packets), ["mapped-data"]);
    assert_eq!(packets[0].src, addr(&format!("127.0.0.1:{port}")));
}

#[test]
fn an_ipv6_only_listener_does_not_take_its_ipv4_twins_traffic() {
    let mount = Mount::start(&[]);
    let mut peer = Peer::spawn();
    peer.cmd("comm v6only");
    let v6 = peer.cmd("tcp-listen-v6only [::]:0");
    let port = addr(&v6[1]).port();
    let v4 = peer.cmd(&format!("tcp-listen 0.0.0.0:{port}"));
    let v6_stream = Reader::open(&socket_file(
        &mount,
        &peer,
        "v6only",
        &format!("tcp6_[::]:{port}_[::]:0"),
    ));
    let v4_stream = Reader::open(&socket_file(
        &mount,
        &peer,
        "v6only",
        &format!("tcp_0.0.0.0:{port}_0.0.0.0:0"),
    ));
    peer.cmd(&format!("tcp-connect 127.0.0.1:{port}"));
    peer.cmd(&format!("tcp-accept {}", v4[0]));
    peer.cmd(&format!("tcp-connect [::1]:{port}"));
    peer.cmd(&format!("tcp-accept {}", v6[0]));
    let v4_packets = v4_stream.wait_packets("the IPv4 handshake", |p| {
        p.iter().any(|p| p.tcp_flags == "S")
    });
    let v6_packets = v6_stream.wait_packets("the IPv6 handshake", |p| {
        p.iter().any(|p| p.tcp_flags == "S")
    });
    assert!(v4_packets.iter().all(|p| p.src.is_ipv4()));
    assert!(
        v6_packets.iter().all(|p| p.src.is_ipv6()),
        "{v6_packets:#?}"
    );
}

#[test]
fn the_header_comes_at_once_and_reads_take_what_is_queued() {
    let mount = Mount::start(&[]);
    let mut peer = Peer::spawn();
    peer.cmd("comm header");
    let (udp, path) = udp_socket(&mount, &mut peer, "header");
    let mut file = File::open(&path).unwrap();
    let mut header = [0u8; 4096];
    // Nothing has been sent: the first read still returns the 24-byte
    // header without waiting.
    assert_eq!(file.read(&mut header).unwrap(), 24);
    assert_eq!(
        u32::from_ne_bytes(header[..4].try_into().unwrap()),
        0xa1b2_3c4d,
        "nanosecond pcap"
    );
    assert_eq!(u32::from_ne_bytes(header[20..24].try_into().unwrap()), 113);
    // Ten datagrams queue up while nobody reads (a second reader tells when
    // they have been captured); big reads then take several at a time.
    let witness = Reader::open(&path);
    let sender = peer.cmd("udp-bind 127.0.0.1:0");
    for i in 0..10 {
        peer.cmd(&format!("sendto {} {} datagram-{i}", sender[0], udp[1]));
    }
    witness.wait_packets("the witness to see all ten", |packets| packets.len() == 10);
    let mut buffer = vec![0u8; 128 * 1024];
    let mut stream = header[..24].to_vec();
    let mut reads = 0;
    while read_pcap(&stream).1.len() < 10 {
        let n = file.read(&mut buffer).unwrap();
        stream.extend_from_slice(&buffer[..n]);
        reads += 1;
    }
    assert!(reads < 10, "{reads} reads for ten queued records");
    // A tiny read gets part of a record; the rest follows.
    peer.cmd(&format!("sendto {} {} split-me", sender[0], udp[1]));
    let mut part = [0u8; 5];
    assert_eq!(file.read(&mut part).unwrap(), 5);
    let rest = file.read(&mut buffer).unwrap();
    stream.extend_from_slice(&part);
    stream.extend_from_slice(&buffer[..rest]);
    assert_eq!(payloads(&read_pcap(&stream).1).last().unwrap(), "split-me");
    // Not seekable, like a pipe.
    use std::io::Seek;
    assert!(file.seek(std::io::SeekFrom::Start(0)).is_err());
}

#[test]
fn tcpdump_reads_live_and_exits_when_the_connection_closes() {
    let mount = Mount::start(&[]);
    let mut peer = Peer::spawn();
    peer.cmd("comm tcpdump-live");
    let (client, server, path) = tcp_connection(&mount, &mut peer, "tcpdump-live");
    let mut tcpdump = Command::new("tcpdump")
        .args(["-nn", "-l", "-A", "-r"])
        .arg(&path)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = lines_of(tcpdump.stdout.take().unwrap());
    // Live: each message shows before the next is sent.
    wait_until(WAIT, "tcpdump's capture to run", || {
        mount.log().contains("capture running")
    });
    for i in 0..3 {
        let text = format!("live-message-{i}");
        peer.cmd(&format!("send {} {text}", client[0]));
        peer.cmd(&format!("recv {} {}", server[0], text.len()));
        await_line(&lines, &format!("tcpdump to show {text}"), |line| {
            line.contains(&text)
        });
    }
    peer.cmd(&format!("close {}", client[0]));
    let closed = Instant::now();
    wait_until(END_BOUND, "tcpdump to exit by itself", || {
        tcpdump.try_wait().unwrap().is_some()
    });
    assert!(tcpdump.wait().unwrap().success());
    assert!(closed.elapsed() < WAIT);
}

#[test]
fn tshark_reads_a_saved_stream_and_a_live_pipe() {
    let mount = Mount::start(&[]);
    let mut peer = Peer::spawn();
    peer.cmd("comm tshark-peer");
    let (client, server, path) = tcp_connection(&mount, &mut peer, "tshark-peer");
    let saved = mount.scratch().join("saved.pcap");
    let mut cat = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "exec cat '{}' > '{}'",
            path.display(),
            saved.display()
        ))
        .spawn()
        .unwrap();
    let mut pipe = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cat '{}' | tshark -l -r - -T fields -e tcp.payload",
            path.display()
        ))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let lines = lines_of(pipe.stdout.take().unwrap());
    wait_until(WAIT, "both readers to open the stream", || {
        mount.log().matches("capture running").count() >= 2
    });
    let hex = |text: &str| text.bytes().map(|b| format!("{b:02x}")).collect::<String>();
    peer.cmd(&format!("send {} through-tshark", client[0]));
    peer.cmd(&format!("recv {} 13", server[0]));
    // tshark shows it while the connection is still open.
    await_line(&lines, "tshark to show the payload live", |line| {
        line.replace(':', "") == hex("through-tshark")
    });
    peer.cmd(&format!("close {}", client[0]));
    wait_until(WAIT, "cat and the pipe to end", || {
        cat.try_wait().unwrap().is_some() && pipe.try_wait().unwrap().is_some()
    });
    let tshark = Command::new("tshark")
        .args(["-r"])
        .arg(&saved)
        .args(["-T", "fields", "-e", "tcp.payload"])
        .output()
        .unwrap();
    assert!(
        tshark.status.success(),
        "{}",
        String::from_utf8_lossy(&tshark.stderr)
    );
    let out = String::from_utf8(tshark.stdout).unwrap();
    assert!(
        out.lines()
            .any(|line| line.replace(':', "") == hex("through-tshark")),
        "{out}"
    );
    let (_, packets) = read_pcap_file(&saved);
    assert!(packets.iter().any(|p| p.tcp_flags.contains('F')));
}

#[test]
fn a_socket_in_another_network_namespace_is_captured_there() {
    let netns = Netns::new("capture");
    let mount = Mount::start(&[]);
    let mut peer = Peer::spawn_in_netns(&netns.name);
    peer.cmd("comm ns-capture");
    let (client, server, path) = tcp_connection(&mount, &mut peer, "ns-capture");
    let stream = Reader::open(&path);
    peer.cmd(&format!("send {} inside-the-namespace", client[0]));
    peer.cmd(&format!("recv {} 20", server[0]));
    peer.cmd(&format!("close {}", client[0]));
    let (bytes, _) = stream.wait_eof(WAIT);
    let packets = read_pcap(&bytes).1;
    assert_eq!(payloads(&packets), ["inside-the-namespace"]);
    assert!(
        packets
            .iter()
            .all(|p| p.is(addr(&client[1]), addr(&client[2]))
                || p.is(addr(&client[2]), addr(&client[1])))
    );
}

#[test]
fn two_readers_of_one_socket_each_get_the_whole_stream() {
    let mount = Mount::start(&[]);
    let mut peer = Peer::spawn();
    peer.cmd("comm two-readers");
    let (a, path) = udp_socket(&mount, &mut peer, "two-readers");
    let b = peer.cmd("udp-bind 127.0.0.1:0");
    let first = Reader::open(&path);
    let second = Reader::open(&path);
    for i in 0..20 {
        peer.cmd(&format!("sendto {} {} message-{i}", b[0], a[1]));
    }
    peer.cmd(&format!("close {}", a[0]));
    let (first, _) = first.wait_eof(WAIT);
    let (second, _) = second.wait_eof(WAIT);
    let expected: Vec<String> = (0..20).map(|i| format!("message-{i}")).collect();
    assert_eq!(payloads(&read_pcap(&first).1), expected);
    assert_eq!(payloads(&read_pcap(&second).1), expected);
}

/// Processes that ended: pid reaped within `bound`.
fn wait_exit(
    child: &mut std::process::Child,
    bound: Duration,
    what: &str,
) -> std::process::ExitStatus {
    wait_for(bound, what, || child.try_wait().unwrap())
}

/// A reader blocked in read() on a quiet socket.
fn blocked_reader(mount: &Mount, program: &[&str], path: &Path) -> std::process::Child {
    let child = Command::new(program[0])
        .args(&program[1..])
        .arg(path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Blocked once it has opened the file and its read waits.
    wait_until(WAIT, "the reader to block", || {
        mount.log().contains("capture running")
            && std::fs::read_to_string(format!("/proc/{}/stat", child.id()))
                .is_ok_and(|stat| stat.contains(") S ") || stat.contains(") D "))
    });
    child
}

#[test]
fn ctrl_c_and_kill_free_a_reader_blocked_on_a_quiet_socket() {
    let mount = Mount::start(&[]);
    let mut peer = Peer::spawn();
    peer.cmd("comm quiet");
    let (udp, path) = udp_socket(&mount, &mut peer, "quiet");

    // timeout -s INT 1 cat: SIGINT after a second, then out within 2 s.
    let started = Instant::now();
    let mut timed = Command::new("timeout")
        .args(["-s", "INT", "1", "cat"])
        .arg(&path)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    wait_exit(
        &mut timed,
        Duration::from_secs(1) + END_BOUND,
        "timeout -s INT 1 cat",
    );
    assert!(started.elapsed() < Duration::from_secs(1) + END_BOUND);

    // kill -9 of a blocked cat.
    let mut cat = blocked_reader(&mount, &["cat"], &path);
    kill(Pid::from_raw(cat.id() as i32), Signal::SIGKILL).unwrap();
    wait_exit(&mut cat, END_BOUND, "a killed cat to go");

    // tcpdump catches SIGINT to print its summary: it runs and exits.
    let mut tcpdump = blocked_reader(&mount, &["tcpdump", "-nn", "-r"], &path);
    kill(Pid::from_raw(tcpdump.id() as i32), Signal::SIGINT).unwrap();
    wait_exit(&mut tcpdump, END_BOUND, "tcpdump to handle SIGINT");

    // A signal the reader ignores by default (a terminal resize) does not
    // break the read.
    let mut patient = blocked_reader(&mount, &["cat"], &path);
    kill(Pid::from_raw(patient.id() as i32), Signal::SIGWINCH).unwrap();
    std::thread::sleep(Duration::from_millis(400));
    assert!(
        patient.try_wait().unwrap().is_none(),
        "SIGWINCH ended the read"
    );
    let sender = peer.cmd("udp-bind 127.0.0.1:0");
    peer.cmd(&format!("sendto {} {} still-reading", sender[0], udp[1]));
    kill(Pid::from_raw(patient.id() as i32), Signal::SIGTERM).unwrap();
    wait_exit(&mut patient, END_BOUND, "cat to end on SIGTERM");
}

#[test]
fn daemon_shutdown_ends_open_streams_and_unmounts() {
    let mut mount = Mount::start(&[]);
    let mut peer = Peer::spawn();
    peer.cmd("comm shutdown-peer");
    let (_a, path_a) = udp_socket(&mount, &mut peer, "shutdown-peer");
    let (_b, path_b) = udp_socket(&mount, &mut peer, "shutdown-peer");
    let mut cat_a = blocked_reader(&mount, &["cat"], &path_a);
    let mut cat_b = blocked_reader(&mount, &["cat"], &path_b);
    mount.signal(Signal::SIGTERM);
    assert!(wait_exit(&mut cat_a, WAIT, "cat a to get EOF").success());
    assert!(wait_exit(&mut cat_b, WAIT, "cat b to get EOF").success());
    assert!(mount.wait_exit(WAIT).success());
    assert!(!crate::common::mounted_at(&mount.path));
}

fn fd_and_thread_counts(pid: u32) -> (usize, usize) {
    let count = |dir: String| std::fs::read_dir(dir).unwrap().count();
    (
        count(format!("/proc/{pid}/fd")),
        count(format!("/proc/{pid}/task")),
    )
}

#[test]
fn closing_readers_leaves_nothing_behind() {
    let _heavy = crate::common::heavy();
    let mount = Mount::start(&[]);
    let mut peer = Peer::spawn();
    peer.cmd("comm leak-check");
    let (_udp, path) = udp_socket(&mount, &mut peer, "leak-check");
    let before = fd_and_thread_counts(mount.pid());
    for _ in 0..201 {
        let mut file = File::open(&path).unwrap();
        let mut header = [0u8; 24];
        file.read_exact(&mut header).unwrap();
    }
    let mut last = (0, 0);
    wait_until(
        WAIT,
        &format!("fds and threads back to {before:?} (now {last:?})"),
        || {
            last = fd_and_thread_counts(mount.pid());
            last == before
        },
    );
    wait_until(WAIT, "each of the 201 streams closed in the log", || {
        closed_in_log(&mount.log()) == 201
    });
}

/// How many streams the log says closed: each one's own line, and those a
/// burst's summary counts ("72 more streams closed within a second").
fn closed_in_log(log: &str) -> usize {
    log.lines()
        .map(|line| {
            if line.contains(": stream closed: ") {
                return 1;
            }
            line.split_once(" more stream")
                .filter(|(_, rest)| rest.contains(" closed within a second"))
                .and_then(|(before, _)| before.rsplit(' ').next())
                .and_then(|count| count.parse().ok())
                .unwrap_or(0)
        })
        .sum()
}

fn vm_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|line| line.starts_with("VmRSS:"))
        .unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn a_stalled_reader_does_not_grow_the_daemon() {
    let _heavy = crate::common::heavy();
    let mount = Mount::start(&["--buffer", "4MiB"]);
    let mut peer = Peer::spawn();
    peer.cmd("comm stalled");
    let (client, server, path) = tcp_connection(&mount, &mut peer, "stalled");
    let baseline = vm_rss_kib(mount.pid());
    // Open, read the header, then read nothing while 100 MB flow.
    let mut file = File::open(&path).unwrap();
    let mut header = [0u8; 24];
    file.read_exact(&mut header).unwrap();
    let volume = 100 * 1024 * 1024;
    peer.cmd(&format!("pump {} {volume}", client[0]));
    peer.cmd(&format!("drain {} {volume}", server[0]));
    let grown = vm_rss_kib(mount.pid()).saturating_sub(baseline);
    assert!(
        grown < 64 * 1024,
        "daemon grew by {grown} KiB for a stalled reader"
    );
    drop(file);
    wait_until(WAIT, "the closing log line", || {
        mount.log().contains("stream closed")
    });
    let log = mount.log();
    let line = log
        .lines()
        .find(|line| line.contains("stream closed"))
        .unwrap();
    // "… N missed (M dropped by the queue (the reader fell behind))".
    let dropped: u64 = line
        .split(" dropped by the queue")
        .next()
        .filter(|before| before.len() < line.len())
        .and_then(|before| before.rsplit(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(dropped > 0, "the queue dropped what did not fit: {line}");
}

/// Memory follows use: streams that carried a flood give their memory
/// back once they close (their rings unmapped, their chunks freed and
/// trimmed). The daemon grows while they run, and its RSS comes back
/// within twice what it was before they opened. (How soon, and the cost of
/// idle streams, are the benchmark's: BENCHMARKS.md "Under load".)
#[test]
fn busy_streams_give_their_memory_back_once_they_close() {
    let _heavy = crate::common::heavy();
    let mount = Mount::start(&[]);
    let mut peer = Peer::spawn();
    peer.cmd("comm busy-memory");
    let (client, server, path) = tcp_connection(&mount, &mut peer, "busy-memory");
    let baseline = vm_rss_kib(mount.pid());
    const STREAMS: usize = 16;
    let readers: Vec<testkit::process::Reaped> = (0..STREAMS)
        .map(|_| {
            testkit::process::Reaped(
                Command::new("cat")
                    .arg(&path)
                    .stdout(Stdio::null())
                    .spawn()
                    .unwrap(),
            )
        })
        .collect();
    let running = |what: &str| {
        mount
            .log()
            .lines()
            .filter(|line| line.contains("busy-memory/tcp_") && line.contains(what))
            .count()
    };
    wait_until(WAIT, "every reader's capture", || {
        running("capture running") == STREAMS
    });
    let volume = 64 << 20;
    peer.cmd(&format!("pump {} {volume}", client[0]));
    peer.cmd(&format!("drain {} {volume}", server[0]));
    wait_until(WAIT, "every stream's ring", || {
        running("the capture grew") == STREAMS
    });
    let busy = vm_rss_kib(mount.pid());
    assert!(
        busy > baseline + 16 * 1024,
        "{STREAMS} busy streams grew the daemon from {baseline} KiB only to {busy} KiB: \
         nothing to give back"
    );
    // Killed and reaped: every stream closes.
    drop(readers);
    wait_until(
        WAIT,
        &format!("the daemon's RSS back within twice its {baseline} KiB (busy: {busy} KiB)"),
        || vm_rss_kib(mount.pid()) <= 2 * baseline,
    );
}

#[test]
fn a_hundred_waiting_readers_do_not_stall_the_mount() {
    let _heavy = crate::common::heavy();
    let mount = Mount::start(&[]);
    let mut peer = Peer::spawn();
    peer.cmd("comm hundred");
    let first: usize = peer.cmd("udp-many 101 127.0.0.1:0")[0].parse().unwrap();
    let dir = mount.dir(peer.pid, "hundred");
    let names = wait_for(WAIT, "101 sockets", || {
        crate::common::try_list(&dir)
            .map(|names| {
                names
                    .into_iter()
                    .filter(|name| name != "all" && name != "tree")
                    .collect::<Vec<_>>()
            })
            .filter(|names| names.len() == 101)
    });
    let readers: Vec<Reader> = names[..100]
        .iter()
        .map(|name| Reader::open(&dir.join(name)))
        .collect();
    // With 100 reads waiting, listing and a fresh stream still answer.
    let started = Instant::now();
    assert_eq!(
        crate::common::list(&dir).len(),
        103,
        "101 sockets, all and tree"
    );
    for listed in [&mount.path, &dir] {
        let ls = Command::new("ls").arg("-l").arg(listed).output().unwrap();
        assert!(
            ls.status.success(),
            "{}",
            String::from_utf8_lossy(&ls.stderr)
        );
    }
    assert!(started.elapsed() < WAIT);
    let last = Reader::open(&dir.join(&names[100]));
    let target = names[100].split('_').nth(1).unwrap().to_owned();
    let sender = peer.cmd("udp-bind 127.0.0.1:0");
    peer.cmd(&format!("sendto {} {target} past-the-crowd", sender[0]));
    last.wait_packets("the 101st stream's datagram", |p| {
        payloads(p) == ["past-the-crowd"]
    });
    drop(readers);
    let _ = first;
}

#[test]
fn a_raw_socket_that_receives_nothing_is_eopnotsupp() {
    let mount = Mount::start(&[]);
    let mut peer = Peer::spawn();
    peer.cmd("comm raw-peer");
    peer.cmd("raw 255");
    let path = socket_file(&mount, &peer, "raw-peer", "raw_0.0.0.0:255_0.0.0.0:0");
    let err = File::open(&path).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(nix::libc::EOPNOTSUPP));
    assert!(std::fs::read_dir(&mount.path).is_ok(), "still serving");
}

#[test]
fn without_cap_net_raw_open_is_eperm_and_the_log_says_how_to_grant_it() {
    let mount = Mount::start_wrapped(
        &["setpriv", "--bounding-set", "-net_raw"],
        &["--cache-ttl", "100ms"],
    );
    let mut peer = Peer::spawn();
    peer.cmd("comm no-net-raw");
    let (_udp, path) = udp_socket(&mount, &mut peer, "no-net-raw");
    let err = File::open(&path).unwrap_err();
    assert!(
        matches!(
            err.raw_os_error(),
            Some(nix::libc::EPERM) | Some(nix::libc::EACCES)
        ),
        "{err}"
    );
    let log = mount.log();
    let line = log
        .lines()
        .find(|line| line.contains("CAP_NET_RAW"))
        .expect("a log line naming CAP_NET_RAW");
    assert!(line.contains("setcap cap_net_raw"), "{line}");
}

#[test]
fn a_pinned_interface_gives_its_link_type() {
    let mount = Mount::start(&["--interface", "lo"]);
    let mut peer = Peer::spawn();
    peer.cmd("comm pinned");
    let (a, path) = udp_socket(&mount, &mut peer, "pinned");
    let b = peer.cmd("udp-bind 127.0.0.1:0");
    let stream = Reader::open(&path);
    peer.cmd(&format!("sendto {} {} on-lo", b[0], a[1]));
    peer.cmd(&format!("close {}", a[0]));
    let (bytes, _) = stream.wait_eof(WAIT);
    let (linktype, packets) = read_pcap(&bytes);
    assert_eq!(linktype, 1, "Ethernet on lo");
    assert_eq!(payloads(&packets), ["on-lo"], "once, not twice");
}

#[test]
fn a_wildcard_listener_leaves_out_outgoing_connections_to_its_port_elsewhere() {
    let (here, there) = crate::common::netns::linked_pair("wild", 1);
    let mount = Mount::start(&[]);
    let mut remote = Peer::spawn_in_netns(&there.name);
    let server = remote.cmd("tcp-listen 0.0.0.0:0");
    let port = addr(&server[1]).port();
    let mut local = Peer::spawn_in_netns(&here.name);
    local.cmd("comm wildcard");
    let listener = local.cmd(&format!("tcp-listen 0.0.0.0:{port}"));
    let stream = Reader::open(&socket_file(
        &mount,
        &local,
        "wildcard",
        &format!("tcp_0.0.0.0:{port}_0.0.0.0:0"),
    ));

    // An outgoing connection to the other host's port of the same number.
    let outgoing = local.cmd(&format!("tcp-connect 10.77.1.2:{port}"));
    let accepted = remote.cmd(&format!("tcp-accept {}", server[0]));
    local.cmd(&format!("send {} outgoing-data", outgoing[0]));
    remote.cmd(&format!("recv {} 13", accepted[0]));
    // An incoming connection to the listener, on loopback and on the veth.
    for target in ["127.0.0.1", "10.77.1.1"] {
        let client = local.cmd(&format!("tcp-connect {target}:{port}"));
        let served = local.cmd(&format!("tcp-accept {}", listener[0]));
        local.cmd(&format!("send {} incoming-{target}", client[0]));
        local.cmd(&format!("recv {} {}", served[0], 9 + target.len()));
    }
    let packets = stream.wait_packets("both incoming connections", |p| payloads(p).len() == 2);
    assert!(
        packets.iter().all(|p| p.src.port() == port
            && p.src.ip() != addr(&format!("10.77.1.2:{port}")).ip()
            || p.dst.port() == port && p.dst.ip() != addr(&format!("10.77.1.2:{port}")).ip()),
        "{packets:#?}"
    );
    assert!(!payloads(&packets).contains(&"outgoing-data".to_owned()));
}

/// The lines a child prints, as they come, from a thread of their own.
fn lines_of(output: impl std::io::Read + Send + 'static) -> crossbeam_channel::Receiver<String> {
    let (lines_tx, lines) = crossbeam_channel::unbounded();
    std::thread::spawn(move || {
        for line in BufReader::new(output).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    lines
}

/// Waits, at most `WAIT`, for a line that `wanted` accepts.
fn await_line(
    lines: &crossbeam_channel::Receiver<String>,
    what: &str,
    wanted: impl Fn(&str) -> bool,
) {
    let deadline = Instant::now() + WAIT;
    loop {
        let line = lines
            .recv_deadline(deadline)
            .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
        if wanted(&line) {
            return;
        }
    }
}

/// The daemon stopped for 200 ms (SIGSTOP, as a starved or swapping
/// machine would stall it) while a socket sends 1,000 datagrams a second:
/// the kernel's rings, grown once the first packets came, hold what came
/// meanwhile, and both the socket's stream and its process's `all` (kernel
/// events) have every datagram, once, in order, with none missed; each
/// packet of the trickle was handed over within 8 ms.
#[test]
fn a_stalled_daemon_loses_nothing_of_a_trickle() {
    stalled_daemon(Duration::from_millis(200));
}

/// Stopped for a second, longer than the ring rides out at 8 ms a block:
/// what the kernel dropped is counted in each stream's closing line, and
/// with what they delivered makes every datagram.
#[test]
fn a_longer_stall_than_the_ring_rides_out_says_what_it_dropped() {
    stalled_daemon(Duration::from_secs(1));
}

fn stalled_daemon(stop: Duration) {
    let mount = Mount::start(&[]);
    let mut peer = Peer::spawn();
    peer.cmd("comm trickle");
    let receiver = peer.cmd("udp-bind 127.0.0.1:0");
    let (sender, file) = udp_socket(&mount, &mut peer, "trickle");
    let stream = Reader::open(&file);
    let all = mount.dir(peer.pid, "trickle").join("all");
    let (all_bytes, all_reader) = crate::common::read_to_eof(&all);
    wait_until(WAIT, "the all stream's capture", || {
        mount.log().contains("trickle/all: capture running")
    });
    assert!(
        mount
            .log()
            .contains("trickle/all: flows attributed from kernel events")
    );

    // Both start without a ring (the namespace is quiet) and get one once
    // packets come; both hand packets over within 8 ms.
    let ringless = "capture running, no ring until its first packets (a queue of up to 4096 KiB), packets handed over within 8ms";
    assert!(
        mount.log().contains(&format!("trickle/all: {ringless}")),
        "{}",
        mount.log()
    );
    assert!(
        mount
            .log()
            .lines()
            .any(|line| line.contains("trickle/udp_") && line.contains(ringless))
    );

    let count = 3000;
    let daemon = Pid::from_raw(mount.pid() as i32);
    let log = mount.log_path();
    let stopper = std::thread::spawn(move || {
        // Into the trickle's second of three, once both rings have grown.
        std::thread::sleep(Duration::from_millis(1000));
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let grown = |line: &str| {
            line.contains(
                "traffic came: the capture grew to a 8192 KiB ring, packets handed over within 8ms",
            )
        };
        assert!(
            text.lines()
                .any(|line| line.contains("trickle/udp_") && grown(line))
                && text
                    .lines()
                    .any(|line| line.contains("trickle/all:") && grown(line)),
            "the socket file's and all's rings grew with the traffic:\n{text}"
        );
        kill(daemon, Signal::SIGSTOP).unwrap();
        std::thread::sleep(stop);
        kill(daemon, Signal::SIGCONT).unwrap();
    });
    peer.cmd(&format!(
        "udp-pace {} {} {count} 1000",
        sender[0], receiver[1]
    ));
    stopper.join().unwrap();
    peer.cmd(&format!("close {}", sender[0]));
    let (bytes, _) = stream.wait_eof(WAIT);
    let expected: Vec<String> = (0..count).map(|i| format!("pace-{i}")).collect();
    let packets = read_pcap(&bytes).1;
    peer.kill();
    wait_until(WAIT, "the all stream's end", || all_reader.is_finished());
    let all_packets = read_pcap(&all_bytes.lock().unwrap()).1;
    for (stream, held) in [
        ("udp_", payloads(&packets)),
        ("all", payloads(&all_packets)),
    ] {
        let line = wait_for(WAIT, &format!("{stream}'s closing line"), || {
            mount
                .log()
                .lines()
                .find(|line| {
                    line.contains(&format!("trickle/{stream}")) && line.contains("stream closed")
                })
                .map(str::to_owned)
        });
        // Each datagram once and in order, whatever was dropped.
        let in_order: Vec<String> = expected
            .iter()
            .filter(|p| held.contains(p))
            .cloned()
            .collect();
        assert_eq!(held, in_order, "{stream}: once each, in order");
        if stop <= Duration::from_millis(200) {
            assert_eq!(held, expected, "{stream}: every datagram");
            assert!(
                line.contains(&format!("{count} packets delivered, none missed")),
                "{line}"
            );
        } else {
            let missed = count - held.len();
            assert!(
                missed > 0,
                "{stream}: a second's stall is longer than the ring"
            );
            assert!(
                line.contains(&format!("{} packets delivered, ", held.len()))
                    && line.contains("dropped by the kernel"),
                "{stream}: {line}"
            );
            // A socket file's count is exact; an `all` stream's is its share
            // of its namespace's drops (all of them here, give or take).
            let said: usize = line
                .split(" missed (")
                .next()
                .and_then(|before| before.rsplit(' ').next())
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("no count in {line}"));
            if stream == "all" {
                assert!(
                    said.abs_diff(missed) <= count / 50,
                    "{stream}: {said} of {missed}: {line}"
                );
            } else {
                assert_eq!(said, missed, "{stream}: {line}");
            }
        }
    }
}

/// `--max-delay` trades the stall span for a live view: the capture hands
/// its blocks over within the asked delay.
#[test]
fn max_delay_sets_how_long_the_kernel_holds_a_packet() {
    let mount = Mount::start(&["--max-delay", "2ms"]);
    let mut peer = Peer::spawn();
    peer.cmd("comm live-view");
    let (sender, file) = udp_socket(&mount, &mut peer, "live-view");
    let receiver = peer.cmd("udp-bind 127.0.0.1:0");
    let stream = Reader::open(&file);
    let said = |what: &str| {
        mount
            .log()
            .lines()
            .any(|line| line.contains("live-view/udp_127.0.0.1:") && line.contains(what))
    };
    wait_until(WAIT, "the capture's geometry in the log", || {
        said("capture running, no ring until its first packets")
            && said("(a queue of up to 4096 KiB), packets handed over within 2ms")
    });
    peer.cmd(&format!("sendto {} {} live", sender[0], receiver[1]));
    let packets = stream.wait_packets("the datagram", |packets| !packets.is_empty());
    assert_eq!(payloads(&packets), ["live"]);
    // The ring that takes over hands its packets over within 2 ms too.
    wait_until(WAIT, "the ring", || {
        said("the capture grew to a 8192 KiB ring, packets handed over within 2ms")
    });
    peer.cmd(&format!("sendto {} {} still-live", sender[0], receiver[1]));
    let packets = stream.wait_packets("the second datagram", |packets| packets.len() == 2);
    assert_eq!(payloads(&packets), ["live", "still-live"]);
}

/// A tool that opens and closes many streams at once (the extcap's list,
/// a script over every socket) leaves a few closing lines and one that
/// sums up the rest, not a line per stream.
#[test]
fn a_burst_of_closed_streams_is_summed_up_in_the_log() {
    let mount = Mount::start(&[]);
    let mut peer = Peer::spawn();
    peer.cmd("comm many-closed");
    let (_, file) = udp_socket(&mount, &mut peer, "many-closed");
    let streams: Vec<File> = (0..40)
        .map(|_| {
            let mut stream = File::open(&file).unwrap();
            let mut header = [0u8; 24];
            stream.read_exact(&mut header).unwrap();
            stream
        })
        .collect();
    drop(streams);
    let summary = wait_for(WAIT, "the burst's summary line", || {
        mount
            .log()
            .lines()
            .find(|line| line.contains("more streams closed within a second"))
            .map(str::to_owned)
    });
    let said = mount
        .log()
        .lines()
        .filter(|line| line.contains("many-closed/udp_") && line.contains("stream closed"))
        .count();
    assert_eq!(said, 8, "{}", mount.log());
    assert!(
        summary
            .ends_with("32 more streams closed within a second: 0 packets delivered, none missed"),
        "{summary}"
    );
}

/// Idle streams of every kind (socket files, `all` and `tree` of a process
/// in a quiet namespace) hold no kernel ring, only a packet socket's
/// queue, empty while nothing comes: a few KiB of the daemon each (the
/// smallest ring was a megabyte, an idle `all` held 8). Once the
/// namespace has traffic each gets its ring, and each stream has its
/// process's datagrams once, in order.
#[test]
fn idle_streams_hold_no_ring_until_traffic_comes() {
    let netns = Netns::new("idle");
    let mount = Mount::start(&[]);
    let mut peer = Peer::spawn_in_netns(&netns.name);
    peer.cmd("comm idle-one");
    let receiver = peer.cmd("udp-bind 127.0.0.1:0");
    let sender = peer.cmd("udp-bind 127.0.0.1:0");
    let dir = mount.dir(peer.pid, "idle-one");
    let socket_file = format!("udp_{}_0.0.0.0:0", receiver[1]);
    wait_until(WAIT, "the process's directory", || {
        dir.join("all").exists() && dir.join(&socket_file).exists()
    });
    let baseline = vm_rss_kib(mount.pid());
    const EACH: usize = 8;
    let names = ["all", "tree", socket_file.as_str()];
    let mut streams = Vec::new();
    for name in names {
        for _ in 0..EACH {
            streams.push(crate::common::read_to_eof(&dir.join(name)));
        }
    }
    // Whether every stream of each kind logged `what` (after its name).
    let each_said = |what: &str| {
        let log = mount.log();
        names.iter().all(|name| {
            let said = format!("idle-one/{name}: {what}");
            log.lines().filter(|line| line.contains(&said)).count() == EACH
        })
    };
    wait_until(WAIT, "every stream's capture", || {
        each_said("capture running, no ring until its first packets")
    });
    let held = vm_rss_kib(mount.pid()).saturating_sub(baseline);
    let streams_held = (names.len() * EACH) as u64;
    assert!(
        held < streams_held * 64,
        "{streams_held} idle streams grew the daemon by {held} KiB"
    );

    let count = 50;
    for index in 0..count {
        peer.cmd(&format!(
            "sendto {} {} idle-{index}",
            sender[0], receiver[1]
        ));
    }
    wait_until(WAIT, "every ring to grow", || {
        each_said("traffic came: the capture grew to a 8192 KiB ring")
    });
    peer.cmd("exit");
    let expected: Vec<String> = (0..count).map(|index| format!("idle-{index}")).collect();
    for (bytes, reader) in streams {
        reader.join().unwrap();
        let packets = read_pcap(&bytes.lock().unwrap()).1;
        assert_eq!(payloads(&packets), expected);
    }
}

/// Every record of a capture file: stamp (ns), length, bytes.
fn raw_records(path: &Path) -> (i32, Vec<(i64, u32, Vec<u8>)>) {
    let mut capture = pcap::Capture::from_file_with_precision(path, pcap::Precision::Nano)
        .expect("a valid pcap file");
    let linktype = capture.get_datalink().0;
    let mut records = Vec::new();
    while let Ok(packet) = capture.next_packet() {
        let stamp = packet.header.ts.tv_sec * 1_000_000_000 + packet.header.ts.tv_usec;
        records.push((stamp, packet.header.len, packet.data.to_vec()));
    }
    (linktype, records)
}

/// The stream's records against tcpdump's of the same traffic, taken at
/// the same time: as many, in the same order, each byte for byte (but for
/// the address bytes the kernel leaves unwritten), with the same length and
/// a stamp within a millisecond.
fn assert_records_are_tcpdumps(stream: &Reader, tcpdump: &mut Tcpdump, count: usize) {
    let truth_path = tcpdump.stop_to_file();
    let (truth_type, truth) = raw_records(&truth_path);
    let scratch = crate::common::ScratchDir::new("first-records");
    let ours_path = scratch.0.join("stream.pcap");
    std::fs::write(&ours_path, &*stream.bytes.lock().unwrap()).unwrap();
    let (ours_type, ours) = raw_records(&ours_path);
    assert_eq!((ours_type, truth_type), (113, 113));
    assert_eq!(truth.len(), count, "tcpdump saw the traffic");
    assert_eq!(ours.len(), count);
    // Bytes 6..14: the eight-byte address field, of which loopback's
    // address has six (written, zero) and two the kernel leaves as its
    // ring or buffer held them.
    let comparable = |data: &[u8]| [&data[..6], &data[14..]].concat();
    for (index, ((stamp, length, data), (truth_stamp, truth_length, truth_data))) in
        ours.iter().zip(&truth).enumerate()
    {
        assert_eq!(length, truth_length, "record {index}");
        assert_eq!(
            comparable(data),
            comparable(truth_data),
            "record {index}: ours {data:02x?}, tcpdump's {truth_data:02x?}"
        );
        assert_eq!(&data[6..12], &[0; 6], "record {index}: loopback's address");
        assert!(
            stamp.abs_diff(*truth_stamp) < 1_000_000,
            "record {index}: stamped {stamp}, tcpdump {truth_stamp}"
        );
    }
}

/// A stream's first packets come from a packet socket without a ring (an
/// idle stream holds none) until its ring opens; either way each record
/// is the one libpcap makes: tcpdump's on `any` with cooked v1 headers, as
/// [`assert_records_are_tcpdumps`] compares them, each once. A burst of
/// datagrams received, and a TCP connection to a listener from its SYN to
/// its last ACK.
#[test]
fn the_packets_before_the_ring_are_the_records_tcpdump_has() {
    let mount = Mount::start(&[]);
    let mut peer = Peer::spawn();
    peer.cmd("comm first-records");
    let (receiver, file) = udp_socket(&mount, &mut peer, "first-records");
    let sender = peer.cmd("udp-bind 127.0.0.1:0");
    let port = receiver[1].rsplit(':').next().unwrap().to_owned();
    let mut tcpdump = Tcpdump::start_cooked_v1(&format!("udp port {port}"));
    let stream = Reader::open(&file);
    wait_until(WAIT, "the ringless capture", || {
        mount
            .log()
            .contains("capture running, no ring until its first packets")
    });
    let count = 300;
    peer.cmd(&format!(
        "udp-burst {} {} {count} first",
        sender[0], receiver[1]
    ));
    stream.wait_packets("the burst", |packets| packets.len() == count);
    wait_until(WAIT, "the ring", || {
        mount.log().contains("first-records/udp_127.0.0.1:")
            && mount.log().contains("the capture grew to")
    });
    assert_records_are_tcpdumps(&stream, &mut tcpdump, count);

    // A listener's stream, open before its first connection.
    let listener = peer.cmd("tcp-listen 127.0.0.1:0");
    let port = listener[1].rsplit(':').next().unwrap().to_owned();
    let listener_file = socket_file(
        &mount,
        &peer,
        "first-records",
        &format!("tcp_{}_0.0.0.0:0", listener[1]),
    );
    let mut tcpdump = Tcpdump::start_cooked_v1(&format!("tcp port {port}"));
    let stream = Reader::open(&listener_file);
    let client = peer.cmd(&format!("tcp-connect {}", listener[1]));
    let server = peer.cmd(&format!("tcp-accept {}", listener[0]));
    peer.cmd(&format!("send {} ping", client[0]));
    peer.cmd(&format!("recv {} 4", server[0]));
    peer.cmd(&format!("send {} pong", server[0]));
    peer.cmd(&format!("recv {} 4", client[0]));
    peer.cmd(&format!("close {}", client[0]));
    peer.cmd(&format!("close {}", server[0]));
    // SYN, SYN-ACK, ACK; two data segments and their ACKs; FIN-ACK and ACK
    // each way (the second FIN may carry the first's ACK).
    let packets = stream.wait_packets("the connection's last ACK", |packets| {
        packets.iter().filter(|p| p.tcp_flags.contains('F')).count() == 2
            && packets.last().is_some_and(|p| p.tcp_flags == ".")
    });
    assert_eq!(packets.first().unwrap().tcp_flags, "S", "{packets:#?}");
    assert_eq!(payloads(&packets), ["ping", "pong"]);
    assert_no_duplicates(&packets);
    // tcpdump has exactly these: none more, none other.
    assert_records_are_tcpdumps(&stream, &mut tcpdump, packets.len());
}
