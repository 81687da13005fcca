//! Socket files' kernel attributes (`user.netstatfs.tcp.*`, `mem.*`)
//! against `ss` on the same sockets: a bulk transfer queued behind a slow
//! tbf in a namespace of the test's own (a long round trip, and drops),
//! the congestion control, a UDP receiver flooded past its buffer.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::common::mount::Mount;
use crate::common::netns::Netns;
use crate::common::peer::Peer;
use crate::common::{wait_until, xattr};

const WAIT: Duration = Duration::from_secs(20);

fn in_netns(netns: &Netns, program: &[&str]) -> String {
    let output = Command::new("ip")
        .args(["netns", "exec", &netns.name])
        .args(program)
        .output()
        .unwrap();
    assert!(output.status.success(), "{program:?}: {output:?}");
    String::from_utf8(output.stdout).unwrap()
}

/// `ss -tin` of the one socket from `local` to `remote`: its `key:value`
/// fields (rtt as ss prints it, `rtt:325.5/12.3`, is split in two).
fn ss_info(netns: &Netns, local: &str, remote: &str) -> HashMap<String, String> {
    let output = in_netns(netns, &["ss", "-tinH", "src", local, "dst", remote]);
    let mut fields = HashMap::new();
    for word in output.split_whitespace() {
        if let Some((key, value)) = word.split_once(':') {
            fields.insert(key.to_owned(), value.to_owned());
        }
    }
    fields
}

fn kernel(file: &Path, name: &str) -> Option<String> {
    xattr(file, &format!("user.netstatfs.{name}"))
}

#[test]
fn a_slow_connections_numbers_are_what_ss_says() {
    let mount = Mount::start(&[]);
    let netns = Netns::new("tbf");
    // tbf drops a packet larger than its burst: loopback's 64 KiB packets
    // must come down to Ethernet's size first.
    in_netns(&netns, &["ip", "link", "set", "lo", "mtu", "1500"]);
    in_netns(
        &netns,
        &[
            "tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate", "2mbit", "burst", "10kb",
            "latency", "300ms",
        ],
    );
    let mut peer = Peer::spawn_in_netns(&netns.name);
    peer.cmd("comm slow-peer");
    let listener = peer.cmd("tcp-listen 127.0.0.1:0");
    let client = peer.cmd(&format!("tcp-connect {}", listener[1]));
    let server = peer.cmd(&format!("tcp-accept {}", listener[0]));
    let sent = 256 * 1024;
    peer.cmd(&format!("pump {} {sent}", client[0]));
    peer.cmd(&format!("drain {} {sent}", server[0]));
    let file = mount
        .dir(peer.pid, "slow-peer")
        .join(format!("tcp_{}_{}", client[1], client[2]));
    wait_until(WAIT, "the client's socket file", || file.exists());

    // Once every byte is acknowledged the numbers stand still.
    wait_until(WAIT, "every byte acknowledged", || {
        !ss_info(&netns, &client[1], &client[2]).contains_key("unacked")
    });
    let ss = ss_info(&netns, &client[1], &client[2]);
    let (ss_rtt, _) = ss["rtt"].split_once('/').unwrap();
    let rtt: f64 = kernel(&file, "tcp.rtt").unwrap().parse().unwrap();
    assert!(
        (rtt - ss_rtt.parse::<f64>().unwrap()).abs() < 0.001,
        "rtt {rtt} against ss {ss:?}"
    );
    assert!(
        rtt > 20.0,
        "a round trip behind tbf is tens of ms, not loopback's: {rtt}"
    );
    assert_eq!(kernel(&file, "tcp.cwnd").unwrap(), ss["cwnd"]);
    let bytes_acked = kernel(&file, "tcp.bytes_acked").unwrap();
    assert_eq!(bytes_acked, ss["bytes_acked"]);
    // The SYN counts as one byte acknowledged.
    assert!(
        [sent, sent + 1].contains(&bytes_acked.parse::<usize>().unwrap()),
        "{bytes_acked}"
    );
    let total_retrans = kernel(&file, "tcp.total_retrans").unwrap();
    let (_, ss_total) = ss["retrans"].split_once('/').unwrap();
    assert_eq!(total_retrans, ss_total);
    assert_ne!(total_retrans, "0", "tbf's drops make retransmissions");

    // The congestion control: the namespace's default, then what the
    // socket set for itself.
    let default = in_netns(&netns, &["sysctl", "-n", "net.ipv4.tcp_congestion_control"]);
    assert_eq!(kernel(&file, "tcp.congestion").unwrap(), default.trim());
    peer.cmd(&format!("congestion {} reno", client[0]));
    wait_until(Duration::from_secs(2), "reno", || {
        kernel(&file, "tcp.congestion").as_deref() == Some("reno")
    });
}

#[test]
fn a_flooded_udp_receiver_counts_its_drops() {
    let mount = Mount::start(&[]);
    let mut peer = Peer::spawn();
    peer.cmd("comm flooded");
    let receiver = peer.cmd("udp-bind 127.0.0.1:0");
    let sender = peer.cmd("udp-bind 127.0.0.1:0");
    let file = mount
        .dir(peer.pid, "flooded")
        .join(format!("udp_{}_0.0.0.0:0", receiver[1]));
    wait_until(WAIT, "the receiver's socket file", || file.exists());
    assert_eq!(kernel(&file, "mem.drops").as_deref(), Some("0"));
    // Never read: a few hundred datagrams fill the receive buffer.
    peer.cmd(&format!(
        "sendto-many {} {} 2000 1000",
        sender[0], receiver[1]
    ));
    wait_until(Duration::from_secs(2), "drops counted", || {
        kernel(&file, "mem.drops").is_some_and(|drops| drops.parse::<u64>().unwrap() > 0)
    });
    let rcvbuf: u64 = kernel(&file, "mem.rcvbuf").unwrap().parse().unwrap();
    assert!(rcvbuf > 0);
    // No TCP numbers for a UDP socket, and `getfattr -d` still works.
    assert_eq!(kernel(&file, "tcp.rtt"), None);
    let dump = Command::new("getfattr")
        .args(["-d", "--absolute-names"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(dump.status.success());
    assert!(String::from_utf8_lossy(&dump.stdout).contains("user.netstatfs.mem.drops="));
}

#[test]
fn an_ipv6_connection_and_socket_answer_as_ss_says() {
    let mount = Mount::start(&[]);
    let mut peer = Peer::spawn();
    peer.cmd("comm six-peer");
    let listener = peer.cmd("tcp-listen [::1]:0");
    let client = peer.cmd(&format!("tcp-connect {}", listener[1]));
    let server = peer.cmd(&format!("tcp-accept {}", listener[0]));
    let sent = 64 * 1024;
    peer.cmd(&format!("pump {} {sent}", client[0]));
    peer.cmd(&format!("drain {} {sent}", server[0]));
    let receiver = peer.cmd("udp-bind [::1]:0");
    let dir = mount.dir(peer.pid, "six-peer");
    let file = dir.join(format!("tcp6_{}_{}", client[1], client[2]));
    let udp_file = dir.join(format!("udp6_{}_[::]:0", receiver[1]));
    wait_until(WAIT, "the IPv6 socket files", || {
        file.exists() && udp_file.exists()
    });

    let output = Command::new("ss")
        .args(["-tinH", "src", &client[1], "dst", &client[2]])
        .output()
        .unwrap();
    let ss: HashMap<String, String> = String::from_utf8(output.stdout)
        .unwrap()
        .split_whitespace()
        .filter_map(|word| word.split_once(':'))
        .map(|(key, value)| (key.to_owned(), value.to_owned()))
        .collect();
    let bytes_acked = kernel(&file, "tcp.bytes_acked").unwrap();
    assert_eq!(bytes_acked, ss["bytes_acked"], "{ss:?}");
    assert!(
        [sent, sent + 1].contains(&bytes_acked.parse::<usize>().unwrap()),
        "{bytes_acked}"
    );
    assert_eq!(kernel(&file, "tcp.mss").unwrap(), ss["mss"]);
    assert!(kernel(&file, "tcp.rtt").is_some());
    assert!(kernel(&udp_file, "mem.rcvbuf").is_some_and(|rcvbuf| rcvbuf != "0"));
    assert_eq!(kernel(&udp_file, "mem.drops").as_deref(), Some("0"));
}
