//! Every traffic pattern exact, or the miss said: a UDP server that only
//! receives, from this host and from another, sockets of two users that
//! share a port, reconnects from one port, bursts to many destinations,
//! and `tree` across network namespaces. Each stream is checked packet for
//! packet against tcpdump capturing the same traffic in the same window.

use std::time::Duration;

use crate::common::mount::Mount;
use crate::common::netns::linked_pair;
use crate::common::packets::{Seen, payloads, read_pcap};
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
        assert_eq!(payloads(&finished(what, reading)), expected, "{what}");
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
        assert_eq!(payloads(&finished(what, reading)), expected, "{what}");
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
