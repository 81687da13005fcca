//! Every traffic pattern exact, or the miss said: a UDP server that only
//! receives, from this host and from another, sockets of two users that
//! share a port, reconnects from one port, bursts to many destinations,
//! and `tree` across network namespaces. Each stream is checked packet for
//! packet against tcpdump capturing the same traffic in the same window.

use std::time::Duration;

use crate::common::mount::Mount;
use crate::common::netns::linked_pair;
use crate::common::packets::{Seen, payload_difference, payloads, read_pcap};
use crate::common::peer::Peer;
use crate::common::tcpdump::Tcpdump;
use crate::common::users::{TestUser, user_reads};
use crate::common::{open_stream, wait_for, wait_until};

const WAIT: Duration = Duration::from_secs(20);

type Reading = (
    std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    std::thread::JoinHandle<std::time::Instant>,
);

/// The port of an address a peer answered with.
fn port_of(address: &str) -> u16 {
    address.rsplit(':').next().unwrap().parse().unwrap()
}

/// A stream read to its end (its process exited or its socket closed).
fn finished(what: &str, (bytes, reader): Reading) -> Vec<Seen> {
    wait_until(WAIT, &format!("{what} to end"), || reader.is_finished());
    reader.join().unwrap();
    read_pcap(&bytes.lock().unwrap()).1
}

/// A receiver bound to `bind` that never replies, 1,000 datagrams from
/// another process on this host: the receiver's socket file, its `all`
/// and the sender's `all` each hold every datagram once, in order, as
/// tcpdump saw them.
fn receive_only_from_this_host(bind: &str) {
    let mount = Mount::start(&[]);
    let mut receiver = Peer::spawn();
    receiver.cmd("comm rx-only");
    let socket = receiver.cmd(&format!("udp-bind {bind}"));
    let port = port_of(&socket[1]);
    let mut sender = Peer::spawn();
    sender.cmd("comm tx-only");
    let from = sender.cmd("udp-bind 127.0.0.1:0");
    let truth = Tcpdump::start(None, "lo", &format!("udp port {port}"));
    let file = format!("udp_{}_0.0.0.0:0", socket[1]);
    let streams = [
        (
            "the receiver's all",
            open_stream(&mount, receiver.pid, "rx-only", "all"),
        ),
        (
            "the receiver's socket file",
            open_stream(&mount, receiver.pid, "rx-only", &file),
        ),
        (
            "the sender's all",
            open_stream(&mount, sender.pid, "tx-only", "all"),
        ),
    ];
    sender.cmd(&format!("udp-burst {} 127.0.0.1:{port} 1000 rx", from[0]));
    receiver.cmd(&format!("udp-collect {} 100", socket[0]));
    sender.kill();
    receiver.kill();
    let expected = payloads(&truth.stop());
    assert_eq!(expected.len(), 1000, "tcpdump saw every datagram");
    for (what, reading) in streams {
        let got = payloads(&finished(what, reading));
        if let Some(difference) = payload_difference(&got, &expected) {
            panic!("{what}: {difference}\nthe daemon's log:\n{}", mount.log());
        }
    }
}

#[test]
fn a_udp_server_that_only_receives_has_every_datagram_in_its_all() {
    receive_only_from_this_host("0.0.0.0:0");
}

#[test]
fn a_udp_server_on_an_exact_address_that_only_receives_has_every_datagram_in_its_all() {
    receive_only_from_this_host("127.0.0.1:0");
}

/// The same with the sender on "another host": a network namespace reached
/// over a veth pair. The receiver's streams hold every datagram that
/// reached its host, as tcpdump there saw them.
fn receive_only_from_another_host(wildcard: bool) {
    let mount = Mount::start(&[]);
    let (here, there) = linked_pair("rxo", if wildcard { 41 } else { 42 });
    let host = if wildcard { "10.77.41.1" } else { "10.77.42.1" };
    let mut receiver = Peer::spawn_in_netns(&here.name);
    receiver.cmd("comm rx-remote");
    let bind = if wildcard {
        "0.0.0.0:0".to_owned()
    } else {
        format!("{host}:0")
    };
    let socket = receiver.cmd(&format!("udp-bind {bind}"));
    let port = port_of(&socket[1]);
    let mut sender = Peer::spawn_in_netns(&there.name);
    sender.cmd("comm tx-remote");
    let from = sender.cmd("udp-bind 0.0.0.0:0");
    let truth = Tcpdump::start(Some(&here.name), "any", &format!("udp port {port}"));
    let file = format!("udp_{}_0.0.0.0:0", socket[1]);
    let streams = [
        (
            "the receiver's all",
            open_stream(&mount, receiver.pid, "rx-remote", "all"),
        ),
        (
            "the receiver's socket file",
            open_stream(&mount, receiver.pid, "rx-remote", &file),
        ),
    ];
    sender.cmd(&format!("udp-burst {} {host}:{port} 500 remote", from[0]));
    receiver.cmd(&format!("udp-collect {} 100", socket[0]));
    sender.kill();
    receiver.kill();
    let expected = payloads(&truth.stop());
    assert_eq!(expected.len(), 500, "tcpdump saw every datagram");
    for (what, reading) in streams {
        let got = payloads(&finished(what, reading));
        if let Some(difference) = payload_difference(&got, &expected) {
            panic!("{what}: {difference}\nthe daemon's log:\n{}", mount.log());
        }
    }
}

#[test]
fn a_udp_server_that_only_receives_from_another_host_has_every_datagram_in_its_all() {
    receive_only_from_another_host(true);
}

#[test]
fn an_exact_address_udp_server_that_only_receives_from_another_host_has_them_all() {
    receive_only_from_another_host(false);
}

/// A stream's closing line, once written.
fn closing_line(mount: &Mount, label: &str) -> String {
    wait_for(WAIT, &format!("{label}'s closing line"), || {
        mount
            .log()
            .lines()
            .find(|line| line.contains(&format!("{label}: stream closed")))
            .map(str::to_owned)
    })
}

/// How many packets a closing line says were missed.
fn missed_in(line: &str) -> usize {
    if line.contains("none missed") {
        return 0;
    }
    line.split(" missed (")
        .next()
        .and_then(|before| before.rsplit(' ').next())
        .and_then(|count| count.parse().ok())
        .unwrap_or_else(|| panic!("no count of misses in {line:?}"))
}

/// Two users each bind a wildcard UDP socket to one port (`first` and
/// `second` are the peers' bind commands: SO_REUSEADDR, with or without
/// SO_REUSEPORT), and a third process sends to the port: the kernel gives
/// each datagram to one of the two. Each user's socket file and `all`,
/// read by that user, hold only datagrams that user's socket received (as
/// the receiver itself says), never one of the other's; whatever of its
/// own a stream lacks, its closing line counts as missed.
fn two_users_share_a_port(tag: &str, first: &str, second: &str) {
    let users = [
        TestUser::new(&format!("{tag}a")),
        TestUser::new(&format!("{tag}b")),
    ];
    let mount = Mount::start(&["--allow-other"]);
    let mut a = users[0].peer();
    a.cmd("comm share-a");
    let a_socket = a.cmd(&format!("{first} 0.0.0.0:0"));
    let port = port_of(&a_socket[1]);
    let mut b = users[1].peer();
    b.cmd("comm share-b");
    let b_socket = b.cmd(&format!("{second} 0.0.0.0:{port}"));
    let file = format!("udp_0.0.0.0:{port}_0.0.0.0:0");
    let mut readers = Vec::new();
    for (user, peer, comm) in [(&users[0], &a, "share-a"), (&users[1], &b, "share-b")] {
        for name in [file.as_str(), "all"] {
            let path = mount.dir(peer.pid, comm).join(name);
            wait_until(WAIT, &format!("{}", path.display()), || path.exists());
            let label = format!("{}_{comm}/{name}", peer.pid);
            let (child, bytes) = user_reads(user, &path);
            wait_until(WAIT, &format!("{label}'s capture"), || {
                mount.log().contains(&format!("{label}: capture running"))
            });
            readers.push((label, comm, child, bytes));
        }
    }
    // Both sockets' kernel addresses are known before anything is sent.
    wait_until(WAIT, "both sockets probed", || {
        mount.log().matches("asked for its kernel address").count() >= 2
    });
    let truth = Tcpdump::start(None, "lo", &format!("udp port {port}"));
    let mut sender = Peer::spawn();
    sender.cmd("comm share-tx");
    let from = sender.cmd("udp-bind 127.0.0.1:0");
    sender.cmd(&format!("udp-burst {} 127.0.0.1:{port} 10 share", from[0]));
    sender.cmd(&format!("udp-pace {} 127.0.0.1:{port} 20 200", from[0]));
    let received = [
        a.cmd(&format!("udp-collect {} 200", a_socket[0]))[0].clone(),
        b.cmd(&format!("udp-collect {} 200", b_socket[0]))[0].clone(),
    ];
    let received: Vec<Vec<String>> = received
        .iter()
        .map(|list| {
            list.split(',')
                .filter(|payload| *payload != "-")
                .map(str::to_owned)
                .collect()
        })
        .collect();
    let sent = payloads(&truth.stop());
    assert_eq!(sent.len(), 30, "tcpdump saw every datagram");
    let mut both: Vec<String> = received.concat();
    both.sort();
    let mut all_sent = sent.clone();
    all_sent.sort();
    assert_eq!(both, all_sent, "each datagram went to one socket");
    a.cmd(&format!("close {}", a_socket[0]));
    b.cmd(&format!("close {}", b_socket[0]));
    a.kill();
    b.kill();
    for (label, comm, mut child, bytes) in readers {
        assert!(child.wait().unwrap().success(), "{label}'s reader");
        let (own, other) = if comm == "share-a" {
            (&received[0], &received[1])
        } else {
            (&received[1], &received[0])
        };
        let held: Vec<String> = payloads(&read_pcap(&bytes.join().unwrap()).1)
            .into_iter()
            .filter(|payload| payload.starts_with("share-") || payload.starts_with("pace-"))
            .collect();
        let leaked: Vec<&String> = held
            .iter()
            .filter(|payload| other.contains(payload))
            .collect();
        assert!(
            leaked.is_empty(),
            "{label} holds the other user's {leaked:?}"
        );
        let in_order: Vec<String> = own.iter().filter(|p| held.contains(p)).cloned().collect();
        assert_eq!(held, in_order, "{label}: its own datagrams, once, in order");
        let line = closing_line(&mount, &label);
        assert_eq!(
            missed_in(&line),
            own.len() - held.len(),
            "{label}: every datagram of its own it lacks is counted: {line}"
        );
    }
}

#[test]
fn two_users_sharing_a_port_with_reuseaddr_each_see_only_their_datagrams() {
    two_users_share_a_port("spr", "udp-bind-reuse", "udp-bind-reuse");
}

#[test]
fn a_reuseport_socket_and_a_reuseaddr_socket_sharing_a_port_each_see_only_theirs() {
    two_users_share_a_port("spp", "udp-bind-reuseport", "udp-bind-reuse");
}

#[test]
fn a_reuseaddr_socket_and_a_reuseport_socket_sharing_a_port_each_see_only_theirs() {
    two_users_share_a_port("spq", "udp-bind-reuse", "udp-bind-reuseport");
}

/// A reader that falls behind: what its socket file missed is said in the
/// closing line, by reason, and in the pcapng stream's last block, where
/// Wireshark's capture file properties show it (isb_osdrop), and what it
/// holds plus what it missed is every datagram tcpdump saw.
#[test]
fn what_a_stream_misses_is_counted_by_reason_in_its_log_line_and_its_pcapng_end() {
    use std::io::Read;
    let mount = Mount::start(&["--format", "pcapng", "--buffer", "64KiB"]);
    let mut peer = Peer::spawn();
    peer.cmd("comm behind");
    let receiver = peer.cmd("udp-bind 127.0.0.1:0");
    let port = port_of(&receiver[1]);
    let sender = peer.cmd("udp-bind 127.0.0.1:0");
    let file = format!("udp_{}_0.0.0.0:0", receiver[1]);
    let path = mount.dir(peer.pid, "behind").join(&file);
    wait_until(WAIT, "the socket file", || path.exists());
    let mut stream = std::fs::File::open(&path).unwrap();
    let mut bytes = vec![0u8; 1 << 20];
    let n = stream.read(&mut bytes).unwrap();
    bytes.truncate(n);
    let label = format!("{}_behind/{file}", peer.pid);
    wait_until(WAIT, "the capture", || {
        mount.log().contains(&format!("{label}: capture running"))
    });
    let truth = Tcpdump::start(None, "lo", &format!("udp dst port {port}"));
    // 2,000 datagrams of 500 bytes while the reader reads nothing: the
    // 64 KiB queue holds a hundred.
    peer.cmd(&format!(
        "sendto-many {} {} 2000 500",
        sender[0], receiver[1]
    ));
    std::thread::sleep(Duration::from_millis(500));
    peer.cmd(&format!("close {}", receiver[0]));
    stream.read_to_end(&mut bytes).unwrap();
    drop(stream);
    let sent = truth.stop().len() as u64;
    assert_eq!(sent, 2000);
    let line = closing_line(&mount, &label);
    let dropped: u64 = line
        .split(" dropped by the queue")
        .next()
        .and_then(|before| before.rsplit(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no queue drops in {line:?}"));
    let (counters, comment) =
        crate::common::packets::pcapng_end_statistics(&bytes).expect("a statistics block");
    const IFDROP: u16 = 5;
    const OSDROP: u16 = 7;
    const USRDELIV: u16 = 8;
    assert_eq!(counters.get(&OSDROP), Some(&dropped), "{counters:?}");
    assert_eq!(counters.get(&IFDROP), Some(&0), "{counters:?}");
    assert!(comment.contains("dropped by the queue"), "{comment}");
    let delivered = counters[&USRDELIV];
    assert_eq!(delivered + dropped, sent, "{line}");
    assert!(dropped > 1000, "{line}");
    // tshark reads the whole stream, statistics block and all.
    let scratch = crate::common::ScratchDir::new("isb");
    let saved = scratch.0.join("stream.pcapng");
    std::fs::write(&saved, &bytes).unwrap();
    let tshark = std::process::Command::new("tshark")
        .arg("-r")
        .arg(&saved)
        .output()
        .unwrap();
    assert!(tshark.status.success(), "{tshark:?}");
    assert_eq!(
        String::from_utf8_lossy(&tshark.stdout).lines().count() as u64,
        delivered
    );
}

/// The runtime's side of a container, as a script: in the "host"
/// namespace it holds a socket and starts the container's server (a child
/// that enters the container's namespace), then, on "go", talks to it
/// itself; both ends of those connections are the tree's.
const SHIM: &str = r#"
import socket, subprocess, sys
keep = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
keep.bind(("127.0.0.1", 0))
server = subprocess.Popen(["ip", "netns", "exec", sys.argv[1], "python3", sys.argv[2], sys.argv[3]],
                          stdout=subprocess.PIPE)
server.stdout.readline()
print(server.pid, flush=True)
sys.stdin.readline()
for i in range(5):
    c = socket.create_connection((sys.argv[4], int(sys.argv[3])))
    c.sendall(b"from-the-shim-%d" % i)
    c.recv(100)
    c.close()
print("done", flush=True)
sys.stdin.readline()
server.kill()
"#;

/// The container's server: echoes one message per connection.
const SERVER: &str = r#"
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(64)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    c.sendall(c.recv(100))
    c.close()
"#;

/// A tree whose members live in two namespaces joined by a bridge (a
/// container's server, and the runtime's process on the host that started
/// it): each of its packets once, in time order, exactly the packets the
/// container's interface carried, whether the other end is a member (the
/// host process) or not (a client on the host).
#[test]
fn a_tree_across_two_namespaces_holds_each_packet_once_in_time_order() {
    use std::io::{BufRead, Write};
    let mount = Mount::start(&[]);
    let (host, container) = crate::common::netns::bridged("tns", 51);
    let scratch = crate::common::ScratchDir::new("tree-ns");
    let (shim_path, server_path) = (scratch.0.join("shim.py"), scratch.0.join("server.py"));
    std::fs::write(&shim_path, SHIM).unwrap();
    std::fs::write(&server_path, SERVER).unwrap();
    let port = crate::common::nginx::free_port();
    let mut shim = std::process::Command::new("ip")
        .args(["netns", "exec", &host.name, "python3"])
        .arg(&shim_path)
        .arg(&container.name)
        .arg(&server_path)
        .arg(port.to_string())
        .arg("10.78.51.2")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let shim_pid = shim.id();
    let mut started = crate::common::KillOnDrop(vec![shim_pid]);
    let mut lines = std::io::BufReader::new(shim.stdout.take().unwrap()).lines();
    let server: u32 = lines.next().unwrap().unwrap().trim().parse().unwrap();
    started.0.push(server);
    let truth = Tcpdump::start(Some(&container.name), "any", &format!("tcp port {port}"));
    let tree = open_stream(&mount, shim_pid, "python3", "tree");
    // Both namespaces are captured before the traffic starts.
    wait_until(WAIT, "a capture in the container's namespace", || {
        mount.log().lines().any(|line| {
            line.contains(&format!("{shim_pid}_python3/tree (netns"))
                && line.contains("capture running")
        })
    });
    let mut client = Peer::spawn_in_netns(&host.name);
    for i in 0..5 {
        let connection = client.cmd(&format!("tcp-connect 10.78.51.2:{port}"));
        client.cmd(&format!("send {} from-a-client-{i}", connection[0]));
        client.cmd(&format!("recv {} 15", connection[0]));
        client.cmd(&format!("close {}", connection[0]));
    }
    let mut input = shim.stdin.take().unwrap();
    writeln!(input, "go").unwrap();
    assert_eq!(lines.next().unwrap().unwrap().trim(), "done");
    std::thread::sleep(Duration::from_millis(300));
    writeln!(input, "exit").unwrap();
    drop(input);
    shim.wait().unwrap();
    drop(client);
    let expected = truth.stop();
    let (bytes, reader) = tree;
    wait_until(WAIT, "the tree to end", || reader.is_finished());
    let scratch_file = scratch.0.join("tree.pcap");
    std::fs::write(&scratch_file, &*bytes.lock().unwrap()).unwrap();
    // In time order.
    let mut capture =
        pcap::Capture::from_file_with_precision(&scratch_file, pcap::Precision::Nano).unwrap();
    let mut last = (0, 0);
    while let Ok(packet) = capture.next_packet() {
        let stamp = (packet.header.ts.tv_sec, packet.header.ts.tv_usec);
        assert!(stamp >= last, "out of order: {stamp:?} after {last:?}");
        last = stamp;
    }
    // Each packet once (read_pcap_file fails on a record twice), and
    // exactly the container's interface's.
    let held = crate::common::packets::read_pcap_file(&scratch_file).1;
    let mut held_sorted = held.clone();
    held_sorted.sort_by_key(|p| format!("{p:?}"));
    let mut expected_sorted = expected.clone();
    expected_sorted.sort_by_key(|p| format!("{p:?}"));
    assert_eq!(
        held_sorted.len(),
        expected_sorted.len(),
        "the tree: {} packets, the container's interface: {}",
        held.len(),
        expected.len()
    );
    assert_eq!(held_sorted, expected_sorted);
    assert_eq!(
        payloads(&held)
            .iter()
            .filter(|p| p.starts_with("from-the-shim"))
            .count(),
        10,
        "the shim's messages and their echoes, once each"
    );
}
