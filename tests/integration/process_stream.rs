//! A process's `all` stream, pcapng comments, and the accuracy harness.

use std::fs::File;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::mount::{BINARY, Mount};
use crate::common::packets::{Seen, payloads, read_pcap};
use crate::common::peer::Peer;
use crate::common::{read_to_eof, wait_for, wait_until};

const WAIT: Duration = Duration::from_secs(10);

fn addr(text: &str) -> SocketAddr {
    text.parse().unwrap()
}

/// Opens the `all` file of `process` (named `comm`) once it is listed and
/// reads it to EOF on a thread, returning once its capture is running.
fn read_all_file(
    mount: &Mount,
    process: &Peer,
    comm: &str,
) -> (Arc<Mutex<Vec<u8>>>, std::thread::JoinHandle<Instant>) {
    let all = mount.dir(process.pid, comm).join("all");
    wait_until(WAIT, "the all file", || all.exists());
    let reading = read_to_eof(&all);
    wait_until(WAIT, "the capture", || {
        mount.log().contains("all: capture running")
    });
    reading
}

#[test]
fn all_follows_every_socket_of_the_process_new_ones_included_and_ends_with_it() {
    let mount = Mount::start(&[]);
    let mut server = Peer::spawn();
    let listener = server.cmd("tcp-listen 127.0.0.1:0");
    let udp_server = server.cmd("udp-bind 127.0.0.1:0");
    let mut target = Peer::spawn();
    target.cmd("comm all-target");
    target.cmd("udp-bind 127.0.0.1:0");
    let mut other = Peer::spawn();
    let (bytes, reader) = read_all_file(&mount, &target, "all-target");

    // New sockets, after the stream began: a TCP connection and a UDP socket.
    let client = target.cmd(&format!("tcp-connect {}", listener[1]));
    let served = server.cmd(&format!("tcp-accept {}", listener[0]));
    let udp = target.cmd("udp-bind 127.0.0.1:0");
    // The other process talks to the same server meanwhile.
    let other_client = other.cmd(&format!("tcp-connect {}", listener[1]));
    let other_served = server.cmd(&format!("tcp-accept {}", listener[0]));
    let other_udp = other.cmd("udp-bind 127.0.0.1:0");
    for round in 0..3 {
        target.cmd(&format!("send {} target-tcp-{round}", client[0]));
        server.cmd(&format!("recv {} 12", served[0]));
        other.cmd(&format!("send {} other-tcp-{round}", other_client[0]));
        server.cmd(&format!("recv {} 11", other_served[0]));
        target.cmd(&format!(
            "sendto {} {} target-udp-{round}",
            udp[0], udp_server[1]
        ));
        other.cmd(&format!(
            "sendto {} {} other-udp-{round}",
            other_udp[0], udp_server[1]
        ));
        std::thread::sleep(Duration::from_millis(20));
    }
    target.cmd(&format!("close {}", client[0]));
    std::thread::sleep(Duration::from_millis(200));
    // The process exits: the stream ends.
    target.kill();
    let exited = Instant::now();
    wait_until(WAIT, "EOF after the process exited", || {
        reader.is_finished()
    });
    let eof = reader.join().unwrap();
    assert!(
        eof - exited < Duration::from_secs(2),
        "EOF {:?} after exit",
        eof - exited
    );

    let packets = read_pcap(&bytes.lock().unwrap()).1;
    let payloads = payloads(&packets);
    for round in 0..3 {
        assert!(
            payloads.contains(&format!("target-tcp-{round}")),
            "{payloads:?}"
        );
        assert!(
            payloads.contains(&format!("target-udp-{round}")),
            "{payloads:?}"
        );
    }
    assert!(
        payloads.iter().all(|p| p.starts_with("target-")),
        "another process's packets: {payloads:?}"
    );
    // The whole connection: handshake and close included.
    let (local, remote) = (addr(&client[1]), addr(&client[2]));
    let flags: Vec<&str> = packets
        .iter()
        .filter(|p| p.is(local, remote) || p.is(remote, local))
        .map(|p| p.tcp_flags.as_str())
        .collect();
    assert_eq!(flags.first(), Some(&"S"), "{flags:?}");
    assert!(
        flags.iter().filter(|f| f.contains('F')).count() >= 1,
        "{flags:?}"
    );
}

#[test]
fn all_follows_sockets_the_process_holds_in_another_namespace() {
    let netns = crate::common::netns::Netns::new("allns");
    let mount = Mount::start(&[]);
    let mut target = Peer::spawn();
    target.cmd("comm two-spaces");
    let home = target.cmd("udp-bind 127.0.0.1:0");
    let (bytes, reader) = read_all_file(&mount, &target, "two-spaces");
    target.cmd(&format!("sendto {} {} at-home", home[0], home[1]));
    // The process's command thread enters the other namespace; what it
    // opens there lives there, and is captured there.
    target.cmd(&format!("netns {}", netns.name));
    let listener = target.cmd("tcp-listen 127.0.0.1:0");
    let client = target.cmd(&format!("tcp-connect {}", listener[1]));
    let served = target.cmd(&format!("tcp-accept {}", listener[0]));
    wait_until(WAIT, "a second capture, in the other namespace", || {
        mount.log().contains("(netns ") && mount.log().matches("capture running").count() >= 2
    });
    target.cmd(&format!("send {} over-there", client[0]));
    target.cmd(&format!("recv {} 10", served[0]));
    std::thread::sleep(Duration::from_millis(100));
    target.kill();
    wait_until(WAIT, "EOF after the process exited", || {
        reader.is_finished()
    });
    reader.join().unwrap();
    let packets = read_pcap(&bytes.lock().unwrap()).1;
    let payloads = payloads(&packets);
    assert!(payloads.contains(&"at-home".to_owned()), "{payloads:?}");
    assert!(payloads.contains(&"over-there".to_owned()), "{payloads:?}");
}

#[test]
fn a_busy_neighbour_is_left_out_in_the_kernel() {
    let _heavy = crate::common::heavy();
    // A namespace of their own, so that other tests' traffic does not count.
    let netns = crate::common::netns::Netns::new("busy");
    let mount = Mount::start(&[]);
    let mut target = Peer::spawn_in_netns(&netns.name);
    target.cmd("comm quiet-target");
    let own = target.cmd("udp-bind 127.0.0.1:0");
    let (bytes, reader) = read_all_file(&mount, &target, "quiet-target");
    // Another process's steady flow in the same namespace: 24 MiB at
    // 8 MiB/s, about 1,500 segments and their ACKs.
    let mut neighbour = Peer::spawn_in_netns(&netns.name);
    let listener = neighbour.cmd("tcp-listen 127.0.0.1:0");
    let client = neighbour.cmd(&format!("tcp-connect {}", listener[1]));
    let served = neighbour.cmd(&format!("tcp-accept {}", listener[0]));
    let volume = 24 << 20;
    neighbour.cmd(&format!("pace {} {volume} 8192", client[0]));
    target.cmd(&format!("sendto {} {} while-busy", own[0], own[1]));
    neighbour.cmd(&format!("drain {} {volume}", served[0]));
    target.kill();
    wait_until(WAIT, "EOF", || reader.is_finished());
    reader.join().unwrap();
    let packets = read_pcap(&bytes.lock().unwrap()).1;
    assert!(
        packets.iter().any(|p| p.payload == b"while-busy"),
        "the target's own packet"
    );
    assert!(
        packets
            .iter()
            .all(|p| p.payload.is_empty() || p.payload == b"while-busy"),
        "nothing of the neighbour"
    );
    let log = mount.log();
    assert!(log.contains("flows of other processes left out"), "{log}");
    let unclaimed: u64 = log
        .lines()
        .find(|line| line.contains("belonged to no member"))
        .and_then(|line| line.split(": ").nth(3))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count in {log}"));
    assert!(
        unclaimed < 1000,
        "{unclaimed} of the neighbour's ~3,000 packets reached user space"
    );
}

#[test]
fn pcapng_comments_name_the_process_and_the_socket() {
    let mount = Mount::start(&["--format", "pcapng"]);
    let mut peer = Peer::spawn();
    peer.cmd("comm ng-peer");
    let a = peer.cmd("udp-bind 127.0.0.1:0");
    let b = peer.cmd("udp-bind 127.0.0.1:0");
    let dir = mount.dir(peer.pid, "ng-peer");
    let socket_name = format!("udp_{}_0.0.0.0:0", a[1]);
    let socket_file = dir.join(&socket_name);
    wait_until(WAIT, "the socket file", || socket_file.exists());
    let saved_socket = mount.scratch().join("socket.pcapng");
    let saved_all = mount.scratch().join("all.pcapng");
    let readers: Vec<_> = [
        (&socket_file, &saved_socket),
        (&dir.join("all"), &saved_all),
    ]
    .into_iter()
    .map(|(from, to)| {
        Command::new("sh")
            .arg("-c")
            .arg(format!(
                "exec cat '{}' > '{}'",
                from.display(),
                to.display()
            ))
            .spawn()
            .unwrap()
    })
    .collect();
    wait_until(WAIT, "both captures", || {
        mount.log().matches("capture running").count() >= 2
    });
    peer.cmd(&format!("sendto {} {} commented", b[0], a[1]));
    std::thread::sleep(Duration::from_millis(100));
    peer.kill();
    for mut reader in readers {
        wait_for(WAIT, "cat to end", || reader.try_wait().unwrap());
    }
    for saved in [&saved_socket, &saved_all] {
        let output = Command::new("tshark")
            .arg("-r")
            .arg(saved)
            .args(["-T", "fields", "-e", "frame.comment", "-e", "udp.srcport"])
            .stderr(Stdio::null())
            .output()
            .unwrap();
        assert!(output.status.success(), "tshark reads {}", saved.display());
        let out = String::from_utf8(output.stdout).unwrap();
        let expected = format!("pid={} comm=ng-peer socket=", peer.pid);
        assert!(
            out.lines().any(|line| line.contains(&expected)),
            "{}: {out}",
            saved.display()
        );
        assert!(out.contains(&socket_name) || saved == &saved_all, "{out}");
    }
}

#[test]
fn the_accuracy_harness_meets_its_targets_at_small_scale() {
    let _heavy = crate::common::heavy();
    // The benchmark's accuracy section, small: 40 flows of each lifetime
    // (0.1 ms, 1 ms, 10 ms, 1 s), protocol and side, for the target, its
    // child and (passive) the two as workers sharing sockets; --check fails
    // the run below 99% recall of `all` or `tree` for any of them with
    // kernel events (following /proc, of `all` for 10 ms flows), on any
    // packet of another process, or on a record seen twice.
    let example = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples/bench");
    let output = Command::new(&example)
        .args([
            "--netstatfs",
            BINARY,
            "--quick",
            "--only",
            "accuracy",
            "--check",
        ])
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{report}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        report.contains(
            "with kernel events: the neighbour's 0 in `all` and 0 in `tree`, the child's 0 in `all`"
        ),
        "{report}"
    );
    assert!(report.contains("Records seen twice: 0 and 0"), "{report}");
}

/// The TCP flags of the packets of one connection, in stream order.
fn connection_flags(packets: &[Seen], local: SocketAddr, remote: SocketAddr) -> Vec<String> {
    packets
        .iter()
        .filter(|p| p.is(local, remote) || p.is(remote, local))
        .map(|p| p.tcp_flags.clone())
        .collect()
}

/// Closes a connection at both ends (`client` held by `target`, `served`
/// by `server`), lets its last packets be captured, then ends `target`
/// and waits for its stream (read by `reader`) to end.
fn close_and_end(
    target: &mut Peer,
    client: &str,
    server: &mut Peer,
    served: &str,
    reader: std::thread::JoinHandle<Instant>,
) {
    target.cmd(&format!("close {client}"));
    server.cmd(&format!("close {served}"));
    std::thread::sleep(Duration::from_millis(100));
    target.kill();
    wait_until(WAIT, "EOF", || reader.is_finished());
    reader.join().unwrap();
}

#[test]
fn a_process_that_opens_its_first_socket_later_has_each_packet_once() {
    // Opened while the process holds no socket: its namespace is known only
    // from /proc/<pid>/ns/net, its first socket's from the socket itself;
    // both name one namespace, so one capture runs.
    let mount = Mount::start(&["--all-processes"]);
    let mut server = Peer::spawn();
    let listener = server.cmd("tcp-listen 127.0.0.1:0");
    let mut target = Peer::spawn();
    target.cmd("comm late-socket");
    let (bytes, reader) = read_all_file(&mount, &target, "late-socket");
    let client = target.cmd(&format!("tcp-connect {}", listener[1]));
    let served = server.cmd(&format!("tcp-accept {}", listener[0]));
    for round in 0..5 {
        target.cmd(&format!("send {} late-{round}", client[0]));
        server.cmd(&format!("recv {} 6", served[0]));
    }
    close_and_end(&mut target, &client[0], &mut server, &served[0], reader);
    // read_pcap fails on a record that comes twice.
    let packets = read_pcap(&bytes.lock().unwrap()).1;
    assert_eq!(
        payloads(&packets),
        (0..5).map(|r| format!("late-{r}")).collect::<Vec<_>>()
    );
    let flags = connection_flags(&packets, addr(&client[1]), addr(&client[2]));
    assert_eq!(flags.first().map(String::as_str), Some("S"), "{flags:?}");
    assert_eq!(
        flags.iter().filter(|f| f.contains('F')).count(),
        2,
        "{flags:?}"
    );
    let log = mount.log();
    let captures = log
        .lines()
        .filter(|line| line.contains("late-socket/all") && line.contains("capture running"))
        .count();
    assert_eq!(captures, 1, "one capture for one namespace:\n{log}");
}

#[test]
fn sockets_seen_before_their_connect_are_followed_once_connected_without_events() {
    // Following /proc, the tracker looks into each new socket; one it
    // looked into between the client's socket() and its connect() (a
    // client preempted there, on a busy machine) must be looked into again
    // once it is connected, or its flow is never the process's.
    let mount = Mount::start(&["--no-kernel-events", "--all-processes"]);
    let mut server = Peer::spawn();
    let listener = server.cmd("tcp-listen 127.0.0.1:0");
    let udp_server = server.cmd("udp-bind 127.0.0.1:0");
    let mut target = Peer::spawn();
    target.cmd("comm unsettled");
    let tcp = target.cmd("tcp-socket");
    let udp = target.cmd("udp-socket");
    let (bytes, reader) = read_all_file(&mount, &target, "unsettled");
    // A datagram of a socket made after the stream opened is in it only
    // once the tracker looked at the fds, so it looked at the two
    // unconnected sockets too.
    let marker = target.cmd("udp-bind 127.0.0.1:0");
    target.cmd(&format!("sendto {} {} marker", marker[0], udp_server[1]));
    wait_until(WAIT, "the marker datagram in the stream", || {
        payloads(&read_pcap(&bytes.lock().unwrap()).1).contains(&"marker".to_owned())
    });

    let client = target.cmd(&format!("tcp-connect-held {} {}", tcp[0], listener[1]));
    let served = server.cmd(&format!("tcp-accept {}", listener[0]));
    target.cmd(&format!("udp-connect {} {}", udp[0], udp_server[1]));
    for round in 0..3 {
        target.cmd(&format!("send {} late-tcp-{round}", client[0]));
        server.cmd(&format!("recv {} 10", served[0]));
        target.cmd(&format!("send {} late-udp-{round}", udp[0]));
    }
    // Both flows in the stream before the connection closes: a connection
    // of a few milliseconds may end before any look (following /proc has
    // that limit); this one lives until the tracker has seen it connected,
    // which it never does where the socket is not looked into again.
    wait_until(WAIT, "the late flows in the stream", || {
        let got = payloads(&read_pcap(&bytes.lock().unwrap()).1);
        ["late-tcp-2", "late-udp-2"]
            .iter()
            .all(|last| got.iter().any(|payload| payload == last))
    });
    close_and_end(&mut target, &client[0], &mut server, &served[0], reader);

    // read_pcap fails on a record that comes twice.
    let packets = read_pcap(&bytes.lock().unwrap()).1;
    let mut expected = vec!["marker".to_owned()];
    for round in 0..3 {
        expected.push(format!("late-tcp-{round}"));
        expected.push(format!("late-udp-{round}"));
    }
    let mut got = payloads(&packets);
    got.sort();
    expected.sort();
    assert_eq!(got, expected);
    let flags = connection_flags(&packets, addr(&client[1]), addr(&client[2]));
    assert_eq!(flags.first().map(String::as_str), Some("S"), "{flags:?}");
    assert_eq!(
        flags.iter().filter(|f| f.contains('F')).count(),
        2,
        "{flags:?}"
    );
}

#[test]
fn a_socket_left_in_the_daemons_namespace_stays_in_all() {
    // The process lives in a namespace of its own and holds a connection in
    // the daemon's (as after a connect, then unshare(CLONE_NEWNET)): its
    // stream's first capture runs in its namespace, and the connection is
    // captured here, by a thread that enters this namespace itself rather
    // than staying where the thread that started it was.
    let netns = crate::common::netns::Netns::new("moved");
    let mount = Mount::start(&[]);
    let mut server = Peer::spawn();
    let listener = server.cmd("tcp-listen 127.0.0.1:0");
    let mut target = Peer::spawn_in_netns(&netns.name);
    target.cmd("comm moved-away");
    let there = target.cmd("udp-bind 127.0.0.1:0");
    target.cmd(&format!("netns /proc/{}/ns/net", std::process::id()));
    let client = target.cmd(&format!("tcp-connect {}", listener[1]));
    let served = server.cmd(&format!("tcp-accept {}", listener[0]));
    let home_ns = std::fs::read_link("/proc/self/ns/net").unwrap();
    let target_ns = std::fs::read_link(format!("/proc/{}/ns/net", target.pid)).unwrap();
    assert_ne!(
        target_ns, home_ns,
        "the peer lives in a namespace of its own"
    );
    let (bytes, reader) = read_all_file(&mount, &target, "moved-away");
    // Running, not only asked for: what is sent before its packet socket
    // is bound is no capture's.
    wait_until(WAIT, "a capture running in the daemon's namespace", || {
        mount
            .log()
            .lines()
            .any(|line| line.contains("moved-away/all (netns ") && line.contains("capture running"))
    });
    for round in 0..20 {
        target.cmd(&format!("send {} home-{round:02}", client[0]));
        server.cmd(&format!("recv {} 7", served[0]));
    }
    target.cmd(&format!("sendto {} {} over-there", there[0], there[1]));
    std::thread::sleep(Duration::from_millis(100));
    target.kill();
    wait_until(WAIT, "EOF", || reader.is_finished());
    reader.join().unwrap();
    // Two captures feed the stream, each in its own order.
    let mut payloads = payloads(&read_pcap(&bytes.lock().unwrap()).1);
    payloads.sort();
    let mut expected: Vec<String> = (0..20).map(|r| format!("home-{r:02}")).collect();
    expected.push("over-there".into());
    assert_eq!(payloads, expected);
}

#[test]
fn all_keeps_the_last_packets_after_the_process_exits() {
    let mount = Mount::start(&[]);
    let mut server = Peer::spawn();
    let listener = server.cmd("tcp-listen 127.0.0.1:0");
    let mut target = Peer::spawn();
    target.cmd("comm exits-first");
    let client = target.cmd(&format!("tcp-connect {}", listener[1]));
    let served = server.cmd(&format!("tcp-accept {}", listener[0]));
    let (bytes, reader) = read_all_file(&mount, &target, "exits-first");
    target.cmd(&format!("send {} goodbye", client[0]));
    server.cmd(&format!("recv {} 7", served[0]));
    // The process goes first (its FIN), the peer closes after (its FIN,
    // and the orphaned socket's last ACK).
    target.kill();
    let exited = Instant::now();
    server.cmd(&format!("close {}", served[0]));
    wait_until(WAIT, "EOF", || reader.is_finished());
    let eof = reader.join().unwrap();
    assert!(
        eof - exited < Duration::from_secs(2),
        "EOF {:?} after exit",
        eof - exited
    );
    let packets = read_pcap(&bytes.lock().unwrap()).1;
    let (local, remote) = (addr(&client[1]), addr(&client[2]));
    let from_peer_fin = packets
        .iter()
        .position(|p| p.is(remote, local) && p.tcp_flags.contains('F'))
        .unwrap_or_else(|| panic!("the peer's FIN: {packets:?}"));
    assert!(
        packets[from_peer_fin..]
            .iter()
            .any(|p| p.is(local, remote) && p.tcp_flags == "."),
        "the last ACK: {packets:?}"
    );
}

#[test]
fn the_all_file_of_a_process_that_is_gone_is_enoent() {
    let mount = Mount::start(&["--cache-ttl", "10s"]);
    let mut target = Peer::spawn();
    target.cmd("comm soon-gone");
    target.cmd("udp-bind 127.0.0.1:0");
    let all = mount.dir(target.pid, "soon-gone").join("all");
    wait_until(WAIT, "the all file", || all.exists());
    target.kill();
    // The snapshot (10 s) still lists it; opening it is ENOENT all the same.
    let err = File::open(&all).expect_err("the process is gone");
    assert_eq!(err.raw_os_error(), Some(nix::libc::ENOENT), "{err}");
}
