//! Who owns a flow, told by kernel events: a prefork server's workers each
//! get their own connections, a shell's short-lived children are in its
//! `tree`, and flows shorter than a millisecond are all there. Real
//! programs from Debian (nginx, ab, curl, dnsmasq, dig) on loopback.

use std::collections::{BTreeMap, HashMap};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::mount::Mount;
use crate::common::nginx::Nginx;
use crate::common::packets::{Seen, read_pcap, read_pcap_file};
use crate::common::{ScratchDir, open_stream, wait_for, wait_until};

const WAIT: Duration = Duration::from_secs(20);

/// The TCP connections to `port` in a stream, by client port (a port may
/// be used again by a later connection): each connection's flags in order,
/// a new one starting at each SYN.
fn connections(packets: &[Seen], port: u16) -> BTreeMap<u16, Vec<Vec<String>>> {
    let mut by_client: BTreeMap<u16, Vec<Vec<String>>> = BTreeMap::new();
    for packet in packets.iter().filter(|p| !p.tcp_flags.is_empty()) {
        let client = if packet.dst.port() == port {
            packet.src.port()
        } else if packet.src.port() == port {
            packet.dst.port()
        } else {
            continue;
        };
        let on_port = by_client.entry(client).or_default();
        if packet.tcp_flags == "S" || on_port.is_empty() {
            on_port.push(Vec::new());
        }
        if let Some(connection) = on_port.last_mut() {
            connection.push(packet.tcp_flags.clone());
        }
    }
    by_client
}

/// Whether a connection is whole: opened by a SYN, closed by both FINs.
fn whole(flags: &[String]) -> bool {
    flags.first().map(String::as_str) == Some("S")
        && flags.iter().filter(|f| f.contains('F')).count() == 2
}

/// Every connection whole.
fn assert_whole(connections: &BTreeMap<u16, Vec<Vec<String>>>, what: &str) {
    for (client, on_port) in connections {
        for flags in on_port {
            assert!(
                whole(flags),
                "{what}: connection from port {client}: {flags:?}"
            );
        }
    }
}

#[test]
fn each_prefork_worker_has_exactly_the_connections_it_served() {
    let _heavy = crate::common::heavy();
    let mount = Mount::start(&[]);
    let nginx = Nginx::start(2);
    let mut streams = Vec::new();
    for &pid in std::iter::once(&nginx.master).chain(&nginx.workers) {
        streams.push((pid, open_stream(&mount, pid, "nginx", "all")));
    }
    assert!(
        mount.log().contains("flows attributed from kernel events"),
        "{}",
        mount.log()
    );
    // The same traffic as tcpdump sees it, captured meanwhile.
    let scratch = ScratchDir::new("prefork");
    let truth_path = scratch.0.join("truth.pcap");
    let tcpdump = Command::new("tcpdump")
        // Immediate mode: packets of a last, unfilled buffer block would be
        // lost when SIGINT stops it. Its ring is one frame per packet, each
        // as big as the snapshot length: 2 KiB (an HTTP exchange here is
        // under 1 KiB a packet) makes 64 MiB hold 30,000 packets, more
        // than the whole run (at 256 KiB, 256 frames overflowed under ab).
        .args([
            "-i",
            "lo",
            "-s",
            "2048",
            "-B",
            "65536",
            "--immediate-mode",
            "-U",
            "-w",
        ])
        .arg(&truth_path)
        .args(["tcp", "port", &nginx.port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until(WAIT, "tcpdump to start", || {
        std::fs::metadata(&truth_path).is_ok_and(|meta| meta.len() >= 24)
    });
    let ab = Command::new("ab")
        .args(["-q", "-n", "2000", "-c", "10"])
        .arg(format!("http://127.0.0.1:{}/", nginx.port))
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(ab.success());
    wait_until(WAIT, "2000 requests logged", || {
        nginx.served().values().map(Vec::len).sum::<usize>() == 2000
    });
    let served = nginx.served();
    let port = nginx.port;
    let nginx_master = nginx.master;
    drop(nginx);
    let mut seen_by = Vec::new();
    let mut in_streams: HashMap<Seen, usize> = HashMap::new();
    let mut by_stream: Vec<(u32, Vec<Seen>)> = Vec::new();
    for (pid, (bytes, reader)) in streams {
        wait_until(WAIT, "EOF after nginx stopped", || reader.is_finished());
        reader.join().unwrap();
        let packets = read_pcap(&bytes.lock().unwrap()).1;
        for packet in &packets {
            *in_streams.entry(packet.clone()).or_default() += 1;
        }
        by_stream.push((pid, packets.clone()));
        seen_by.push((pid, connections(&packets, port)));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(tcpdump.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let tcpdump = tcpdump.wait_with_output().unwrap();
    let summary = String::from_utf8_lossy(&tcpdump.stderr);
    assert!(
        summary
            .lines()
            .any(|line| line.trim() == "0 packets dropped by kernel"),
        "{summary}"
    );
    // Packet for packet: the streams together hold nothing tcpdump did not
    // see, and all but at most 0.1% of what it saw.
    let mut truth: HashMap<Seen, usize> = HashMap::new();
    for packet in read_pcap_file(&truth_path).1 {
        *truth.entry(packet).or_default() += 1;
    }
    let total: usize = truth.values().sum();
    for (packet, count) in &in_streams {
        assert!(
            truth.get(packet).is_some_and(|seen| seen >= count),
            "in the streams {count} times, {:?} in tcpdump's capture: {packet:?}; in streams {:?}",
            truth.get(packet),
            by_stream
                .iter()
                .map(|(pid, packets)| (pid, packets.iter().filter(|p| *p == packet).count()))
                .collect::<Vec<_>>()
        );
    }
    let missed: usize = truth
        .iter()
        .map(|(packet, count)| count - in_streams.get(packet).copied().unwrap_or(0).min(*count))
        .sum();
    assert!(
        missed * 1000 <= total,
        "{missed} of tcpdump's {total} packets in no stream"
    );
    // Where a connection went wrong: what each stream saw on its port.
    let story = |client: u16| -> String {
        let servers: Vec<(u32, usize)> = served
            .iter()
            .map(|(pid, ports)| (*pid, ports.iter().filter(|p| **p == client).count()))
            .filter(|(_, count)| *count > 0)
            .collect();
        let seen: Vec<String> = seen_by
            .iter()
            .map(|(pid, seen)| format!("{pid}: {:?}", seen.get(&client)))
            .collect();
        format!("port {client}, served by {servers:?}; seen {seen:?}")
    };
    // Precision, exactly: a worker's stream holds only connections that
    // worker served (ab also opens connections it closes unused at the end:
    // no request, so no log line names their worker; each must be in one
    // worker's stream), and the master's holds none. Recall, as the issue
    // sets it: at least 0.999 of the served connections whole.
    let mut unused: BTreeMap<u16, usize> = BTreeMap::new();
    let mut incomplete = Vec::new();
    for (pid, seen) in &seen_by {
        let mut expected: BTreeMap<u16, usize> = BTreeMap::new();
        for port in served.get(pid).into_iter().flatten() {
            *expected.entry(*port).or_default() += 1;
        }
        for (client, on_port) in seen {
            let requests = on_port
                .iter()
                .filter(|flags| flags.iter().any(|f| f.contains('P')))
                .count();
            let extra = on_port.len() - requests;
            assert!(
                *pid != nginx_master || on_port.is_empty(),
                "the master accepts nothing: {}",
                story(*client)
            );
            *unused.entry(*client).or_default() += extra.saturating_sub(
                expected
                    .get(client)
                    .copied()
                    .unwrap_or(0)
                    .saturating_sub(requests),
            );
            assert!(
                requests <= expected.get(client).copied().unwrap_or(0),
                "nginx {pid} has a connection it did not serve: {}",
                story(*client)
            );
            incomplete.extend(
                on_port
                    .iter()
                    .filter(|flags| !whole(flags))
                    .map(|_| story(*client)),
            );
        }
        for (client, count) in &expected {
            let have = seen.get(client).map_or(0, Vec::len);
            incomplete.extend((have..*count).map(|_| format!("missing: {}", story(*client))));
        }
    }
    assert!(
        unused.values().sum::<usize>() <= 10,
        "at most ab's concurrency in unused connections: {unused:?}"
    );
    assert!(
        incomplete.len() <= 2,
        "more than 0.1% of 2000 connections missing or incomplete: {incomplete:#?}"
    );
    if !incomplete.is_empty() {
        eprintln!("within the 0.999 recall target, but: {incomplete:#?}");
    }
    assert_eq!(served.len(), 2, "both workers served: {served:?}");
}

#[test]
fn a_shell_scripts_curls_are_all_in_its_tree() {
    let _heavy = crate::common::heavy();
    let mount = Mount::start(&["--all-processes"]);
    let nginx = Nginx::start(1);
    let scratch = ScratchDir::new("curls");
    let go = scratch.0.join("go");
    let mut shell = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "while [ ! -e {go} ]; do sleep 0.02; done; \
             for i in $(seq 200); do curl -s -o /dev/null http://127.0.0.1:{port}/; done",
            go = go.display(),
            port = nginx.port
        ))
        .spawn()
        .unwrap();
    let (bytes, reader) = open_stream(&mount, shell.id(), "sh", "tree");
    std::fs::write(&go, b"").unwrap();
    let status = wait_for(Duration::from_secs(120), "the shell's 200 curls", || {
        shell.try_wait().unwrap()
    });
    assert!(status.success());
    wait_until(WAIT, "EOF after the shell exited", || reader.is_finished());
    reader.join().unwrap();
    let packets = read_pcap(&bytes.lock().unwrap()).1;
    let seen = connections(&packets, nginx.port);
    assert_whole(&seen, "the shell's tree");
    let mut served: Vec<u16> = nginx.served().into_values().flatten().collect();
    served.sort_unstable();
    assert_eq!(served.len(), 200);
    let mut ports: Vec<u16> = seen
        .iter()
        .flat_map(|(client, on_port)| std::iter::repeat_n(*client, on_port.len()))
        .collect();
    ports.sort_unstable();
    assert_eq!(ports, served);
}

#[test]
fn two_hundred_dns_lookups_of_one_process_are_all_in_its_all() {
    let _heavy = crate::common::heavy();
    let mount = Mount::start(&["--all-processes"]);
    let scratch = ScratchDir::new("dns");
    // A port free a moment ago may be taken before dnsmasq binds it (it
    // then exits at once): another is tried.
    let (mut dnsmasq, port) = (0..3)
        .find_map(|_| {
            let port = std::net::UdpSocket::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let mut dnsmasq = Command::new("dnsmasq")
                .args([
                    "--no-daemon",
                    "--conf-file=/dev/null",
                    "--listen-address=127.0.0.1",
                    "--bind-interfaces",
                    "--no-resolv",
                    "--no-hosts",
                    "--address=/example.test/127.0.0.9",
                ])
                .arg(format!("--port={port}"))
                .arg(format!("--pid-file={}", scratch.0.join("pid").display()))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("dnsmasq starts (apt-get install dnsmasq-base)");
            // Bounded, and never leaving a dnsmasq behind.
            let deadline = std::time::Instant::now() + WAIT;
            let answers = loop {
                if dnsmasq.try_wait().ok().flatten().is_some() {
                    break false;
                }
                let answered = Command::new("dig")
                    .args(["+short", "+tries=1", "+time=1", "-p", &port.to_string()])
                    .args(["@127.0.0.1", "ready.example.test"])
                    .output()
                    .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains("127.0.0.9"));
                if answered {
                    break true;
                }
                if std::time::Instant::now() >= deadline {
                    let _ = dnsmasq.kill();
                    let _ = dnsmasq.wait();
                    break false;
                }
                std::thread::sleep(Duration::from_millis(20));
            };
            answers.then_some((dnsmasq, port))
        })
        .expect("dnsmasq answers on one of three free ports");
    let _dnsmasq_ends_with_the_test = crate::common::KillOnDrop(vec![dnsmasq.id()]);
    let queries = scratch.0.join("queries");
    let lines: String = (0..200)
        .map(|i| format!("@127.0.0.1 -p {port} +tries=1 +time=2 q{i}.example.test A\n"))
        .collect();
    std::fs::write(&queries, lines).unwrap();
    let go = scratch.0.join("go");
    // One process (a shell that becomes dig) makes all 200 lookups, each
    // from a fresh UDP socket living well under a millisecond.
    let mut dig = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "while [ ! -e {go} ]; do sleep 0.02; done; exec dig -f {queries}",
            go = go.display(),
            queries = queries.display()
        ))
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let (bytes, reader) = open_stream(&mount, dig.id(), "sh", "all");
    std::fs::write(&go, b"").unwrap();
    let status = wait_for(Duration::from_secs(60), "dig's 200 lookups", || {
        dig.try_wait().unwrap()
    });
    assert!(status.success());
    wait_until(WAIT, "EOF after dig exited", || reader.is_finished());
    reader.join().unwrap();
    let _ = dnsmasq.kill();
    let _ = dnsmasq.wait();
    let packets = read_pcap(&bytes.lock().unwrap()).1;
    let queries = packets.iter().filter(|p| p.dst.port() == port).count();
    let answers = packets.iter().filter(|p| p.src.port() == port).count();
    assert_eq!((queries, answers), (200, 200));
    assert!(
        packets
            .iter()
            .all(|p| p.dst.port() == port || p.src.port() == port),
        "nothing but dig's lookups"
    );
}

/// A redis-server of the test's own on a free loopback port, its files in
/// `dir`, answering PING: the server (killed and reaped when dropped) and
/// its port.
fn redis_server(dir: &std::path::Path) -> (testkit::process::Reaped, u16) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let server = testkit::process::Reaped(
        Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--port", &port.to_string()])
            .arg("--dir")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts (apt-get install redis-server)"),
    );
    wait_until(WAIT, "redis to answer", || {
        Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "ping"])
            .output()
            .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains("PONG"))
    });
    (server, port)
}

/// Under load: redis-benchmark at full speed against a real redis-server,
/// with the server's `all` and the `tree` of the shell that runs the
/// benchmark both read. Each holds every packet tcpdump saw on the port,
/// each once (twenty connections opened, used and closed, SYN to last
/// ACK); each stream's closing line says it missed none, and no kernel
/// event was lost. (What it costs the server is the benchmark's:
/// BENCHMARKS.md "Under load".)
#[test]
fn under_load_the_servers_all_and_the_benchmarks_tree_hold_every_packet() {
    use crate::common::tcpdump::Tcpdump;
    let _heavy = crate::common::heavy();
    let mount = Mount::start(&["--all-processes"]);
    let scratch = ScratchDir::new("load");
    let (server, port) = redis_server(&scratch.0);
    let go = scratch.0.join("go");
    // The benchmark runs as the shell's child (the shell waits for it and
    // says so: it is not exec'd, its `tree` has a member that comes later).
    let mut shell = testkit::process::Reaped(
        Command::new("sh")
            .arg("-c")
            .arg(format!(
                "while [ ! -e {go} ]; do sleep 0.02; done; \
                 redis-benchmark -h 127.0.0.1 -p {port} -n 50000 -c 20 -t set,get -q; \
                 echo benchmarked",
                go = go.display()
            ))
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let (all_bytes, all_reader) = open_stream(&mount, server.id(), "redis-server", "all");
    let (tree_bytes, tree_reader) = open_stream(&mount, shell.id(), "sh", "tree");
    let truth = Tcpdump::start(None, "lo", &format!("tcp port {port}"));
    std::fs::write(&go, b"").unwrap();
    let status = wait_for(Duration::from_secs(60), "the benchmark", || {
        shell.0.try_wait().unwrap()
    });
    assert!(status.success());
    let mut said = String::new();
    std::io::Read::read_to_string(&mut shell.0.stdout.take().unwrap(), &mut said).unwrap();
    assert!(said.contains("benchmarked"), "{said}");
    wait_until(WAIT, "the tree's end after the shell exited", || {
        tree_reader.is_finished()
    });
    tree_reader.join().unwrap();
    let server_pid = server.id();
    drop(server);
    wait_until(WAIT, "the server's all to end", || all_reader.is_finished());
    all_reader.join().unwrap();
    let truth = truth.stop();
    let count = |packets: &[Seen]| {
        let mut counts: HashMap<Seen, usize> = HashMap::new();
        for packet in packets {
            *counts.entry(packet.clone()).or_default() += 1;
        }
        counts
    };
    let expected = count(&truth);
    let connections_seen = connections(&truth, port);
    let opened: usize = connections_seen.values().map(Vec::len).sum();
    assert!(
        opened >= 2 * 20,
        "tcpdump saw {opened} connections, not each test's 20"
    );
    assert_whole(&connections_seen, "tcpdump's");
    // read_pcap fails on a record that comes twice.
    for (what, bytes) in [("all", &all_bytes), ("tree", &tree_bytes)] {
        let packets = read_pcap(&bytes.lock().unwrap()).1;
        let got = count(&packets);
        let missing: usize = expected
            .iter()
            .map(|(packet, n)| n.saturating_sub(got.get(packet).copied().unwrap_or(0)))
            .sum();
        let extra: usize = got
            .iter()
            .map(|(packet, n)| n.saturating_sub(expected.get(packet).copied().unwrap_or(0)))
            .sum();
        assert_eq!(
            (missing, extra, packets.len()),
            (0, 0, truth.len()),
            "{what}: of tcpdump's {} packets, {missing} missing and {extra} not tcpdump's",
            truth.len()
        );
    }
    let log = mount.log();
    for label in [
        format!("{server_pid}_redis-server/all"),
        format!("{}_sh/tree", shell.id()),
    ] {
        let closing = log
            .lines()
            .find(|line| line.contains(&format!("{label}: stream closed")))
            .unwrap_or_else(|| panic!("no closing line of {label}:\n{log}"));
        assert!(closing.ends_with("none missed"), "{closing}");
    }
    assert!(
        !log.lines()
            .any(|line| line.contains("kernel events:") && line.contains(" lost ")),
        "kernel events were lost:\n{log}"
    );
}

/// When kernel events are lost anyway (the daemon stopped for a second and
/// a half while a watched process opens connection after connection, more
/// events than its rings hold), the log says so, no packet of the process
/// goes missing silently (each of tcpdump's is in the process's `all` or
/// counted in its closing line), and attribution recovers: the
/// connections the process opens a second after the daemon resumes are
/// all in the stream, whole.
#[test]
fn lost_kernel_events_are_told_and_attribution_recovers_within_a_second() {
    use crate::common::tcpdump::Tcpdump;
    use std::io::{BufRead, Write};
    let _heavy = crate::common::heavy();
    // In a namespace of its own: the flood's thousands of TIME_WAIT sockets
    // go with it, not into the tables the next tests' daemons read.
    let netns = crate::common::netns::Netns::new("loss");
    let mount = Mount::start(&[]);
    let script = r#"
import socket, sys, threading, time
with open("/proc/self/comm", "w") as comm:
    comm.write("loss-target")
server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen(1024)
port = server.getsockname()[1]
def serve():
    while True:
        conn, _ = server.accept()
        while conn.recv(100):
            pass
        conn.close()
threading.Thread(target=serve, daemon=True).start()
print(port, flush=True)
for line in sys.stdin:
    what, arg = line.split()
    if what == "flood":
        # 2,000 connections a second: more kernel events than the rings
        # hold across the stop, fewer packets than the capture's ring.
        start, opened = time.monotonic(), 0
        while time.monotonic() < start + float(arg):
            socket.create_connection(("127.0.0.1", port)).close()
            opened += 1
            time.sleep(max(0.0, start + opened / 2000 - time.monotonic()))
        print(opened, flush=True)
    else:
        for i in range(int(arg)):
            conn = socket.create_connection(("127.0.0.1", port))
            conn.sendall(b"after-%d" % i)
            conn.close()
            time.sleep(0.02)
        print("done", flush=True)
"#;
    let mut target = testkit::process::Reaped(
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &netns.name,
                "/usr/bin/python3",
                "-c",
                script,
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut input = target.0.stdin.take().unwrap();
    let mut lines = std::io::BufReader::new(target.0.stdout.take().unwrap()).lines();
    let port: u16 = lines.next().unwrap().unwrap().parse().unwrap();
    let (bytes, reader) = open_stream(&mount, target.id(), "loss-target", "all");
    let truth = Tcpdump::start(Some(&netns.name), "lo", &format!("tcp port {port}"));
    writeln!(input, "flood 2.5").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let daemon = nix::unistd::Pid::from_raw(mount.pid() as i32);
    nix::sys::signal::kill(daemon, nix::sys::signal::Signal::SIGSTOP).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    nix::sys::signal::kill(daemon, nix::sys::signal::Signal::SIGCONT).unwrap();
    let opened: usize = lines.next().unwrap().unwrap().parse().unwrap();
    wait_until(WAIT, "the loss told in the log", || {
        mount
            .log()
            .lines()
            .any(|line| line.contains("kernel events:") && line.contains(" lost since"))
    });
    // A second after the daemon came back (the flood ended after it did).
    std::thread::sleep(Duration::from_secs(1));
    writeln!(input, "after 20").unwrap();
    assert_eq!(lines.next().unwrap().unwrap(), "done");
    std::thread::sleep(Duration::from_millis(100));
    let pid = target.id();
    drop(input);
    drop(target);
    wait_until(WAIT, "EOF after the target exited", || reader.is_finished());
    reader.join().unwrap();
    let truth = truth.stop();
    // read_pcap fails on a record that comes twice.
    let packets = read_pcap(&bytes.lock().unwrap()).1;
    let mut left: HashMap<&Seen, usize> = HashMap::new();
    for packet in &truth {
        *left.entry(packet).or_default() += 1;
    }
    for packet in &packets {
        let count = left.get_mut(packet).filter(|count| **count > 0);
        *count.unwrap_or_else(|| panic!("not tcpdump's: {packet:?}")) -= 1;
    }
    let label = format!("{pid}_loss-target/all: stream closed: ");
    let log = mount.log();
    let closing = log
        .lines()
        .find_map(|line| line.split_once(&label).map(|(_, said)| said.to_owned()))
        .unwrap_or_else(|| panic!("no closing line:\n{log}"));
    // What the line counts: misses told one by one, and the capture's
    // ring's drops, of the namespace (of which the stream's share is only
    // estimated). Every one of tcpdump's packets is delivered or in them.
    let number_before = |marker: &str| -> usize {
        closing
            .split_once(marker)
            .and_then(|(before, _)| before.rsplit(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    let missed = number_before(" missed");
    let estimated = number_before(" dropped by the kernel (estimated");
    let ring_dropped: usize = closing
        .rsplit_once("the capture's ring dropped ")
        .and_then(|(_, after)| after.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let accounted = packets.len() + (missed - estimated) + ring_dropped;
    assert!(
        accounted >= truth.len(),
        "of tcpdump's {} packets ({opened} connections), {} delivered, {} told missed one by \
         one, {ring_dropped} dropped by the ring: {} missed silently ({closing})",
        truth.len(),
        packets.len(),
        missed - estimated,
        truth.len() - accounted
    );
    assert!(
        missed - estimated > 0 || ring_dropped > 0,
        "the stop lost nothing, so it tested nothing: {closing}"
    );
    // All of them. (Not always in the order sent: a packet that waits for
    // its owner's events goes out after later ones of other flows, and
    // after a loss the reader has a backlog; see the README's limits.)
    let mut sent: Vec<String> = crate::common::packets::payloads(&packets)
        .into_iter()
        .filter(|text| text.starts_with("after-"))
        .collect();
    sent.sort_by_key(|text| text[6..].parse::<u32>().unwrap_or(u32::MAX));
    let expected: Vec<String> = (0..20).map(|i| format!("after-{i}")).collect();
    assert_eq!(sent, expected, "the connections after the loss");
    // Each of them whole, SYN to both FINs (the last connection from its
    // port: a port may have served the flood before).
    let by_client = connections(&packets, port);
    for packet in packets
        .iter()
        .filter(|p| p.payload_text().starts_with("after-"))
    {
        let opened = by_client[&packet.src.port()].last().unwrap();
        assert!(whole(opened), "{}: {opened:?}", packet.payload_text());
    }
}

/// The issue's churning target: a shell that execs `redis-cli -r 100 -i
/// 0.02 ping` while its `all` is read, beside another redis-cli doing the
/// same to the same server. The stream has the target's one connection,
/// whole, each packet once and in order, and nothing of the neighbour's.
#[test]
fn a_shell_that_execs_redis_cli_has_its_one_connection_once_and_nothing_else() {
    let _heavy = crate::common::heavy();
    let mount = Mount::start(&["--all-processes"]);
    let scratch = ScratchDir::new("redis");
    let (server, port) = redis_server(&scratch.0);
    let cli = |args: &str| format!("redis-cli -h 127.0.0.1 -p {port} {args}");
    let go = scratch.0.join("go");
    let pings = cli("-r 100 -i 0.02 ping");
    let mut target = testkit::process::Reaped(
        Command::new("sh")
            .arg("-c")
            .arg(format!(
                "while [ ! -e {go} ]; do sleep 0.02; done; exec {pings}",
                go = go.display()
            ))
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let (bytes, reader) = open_stream(&mount, target.0.id(), "sh", "all");
    let neighbour = testkit::process::Reaped(
        Command::new("sh")
            .args(["-c", &format!("exec {pings}")])
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    std::fs::write(&go, b"").unwrap();
    let status = wait_for(Duration::from_secs(30), "the target's 100 pings", || {
        target.0.try_wait().unwrap()
    });
    assert!(status.success());
    wait_until(WAIT, "EOF after the target exited", || reader.is_finished());
    reader.join().unwrap();
    drop(neighbour);
    drop(server);
    // read_pcap fails on a record that comes twice.
    let packets = read_pcap(&bytes.lock().unwrap()).1;
    let by_client = connections(&packets, port);
    assert_eq!(by_client.len(), 1, "one connection: {by_client:?}");
    assert_whole(&by_client, "the target's");
    let client = *by_client.keys().next().unwrap();
    assert!(
        packets
            .iter()
            .all(|p| (p.src.port(), p.dst.port()) == (client, port)
                || (p.src.port(), p.dst.port()) == (port, client)),
        "nothing but the target's connection"
    );
    let sent: Vec<&Seen> = packets
        .iter()
        .filter(|p| p.src.port() == client && !p.payload.is_empty())
        .collect();
    let answered: usize = packets
        .iter()
        .filter(|p| p.src.port() == port)
        .map(|p| p.payload_text().matches("+PONG").count())
        .sum();
    let asked: usize = sent
        .iter()
        .map(|p| p.payload_text().matches("ping").count())
        .sum();
    assert_eq!((asked, answered), (100, 100));
    // In the order they were sent.
    assert!(
        sent.windows(2).all(|pair| pair[0].seq < pair[1].seq),
        "out of order"
    );
}

#[test]
fn no_tracepoint_stays_enabled_once_the_last_stream_closes() {
    let mount = Mount::start(&[]);
    let nginx = Nginx::start(1);
    let path = mount.dir(nginx.workers[0], "nginx").join("all");
    wait_until(WAIT, "the all file", || path.exists());
    let perf_fds = || {
        std::fs::read_dir(format!("/proc/{}/fd", mount.pid()))
            .unwrap()
            .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
            .filter(|target| target.to_string_lossy().contains("perf_event"))
            .count()
    };
    assert_eq!(perf_fds(), 0, "no events before a stream");
    {
        let _first = std::fs::File::open(&path).unwrap();
        let _second = std::fs::File::open(mount.dir(nginx.master, "nginx").join("all")).unwrap();
        wait_until(WAIT, "the events", || perf_fds() > 0);
    }
    wait_until(WAIT, "every perf event closed", || perf_fds() == 0);
    wait_until(WAIT, "the reader's end in the log", || {
        mount.log().contains("kernel events: stopped")
    });
    assert!(
        mount.log().contains("kernel events: stopped"),
        "{}",
        mount.log()
    );
}

/// The thread ids the daemon's log says it left out of the UDP events.
fn left_out_threads(log: &str) -> Vec<u32> {
    log.lines()
        .filter_map(|line| line.split("UDP events of threads [").nth(1))
        .filter_map(|rest| rest.split(']').next())
        .flat_map(|list| list.split(", ").filter_map(|tid| tid.parse().ok()))
        .collect()
}

/// A process whose forked child floods through the socket they share,
/// beside a flood between two processes nobody watches: the busy
/// bystander's UDP events are left out in the kernel (what keeps the
/// reader's cost with the watched processes' traffic), the sharer's never
/// (its claims are what keep its datagrams out of the parent's `all`),
/// and the parent's `all` holds exactly the parent's datagrams, as tcpdump
/// saw them.
#[test]
fn a_busy_sharer_of_a_watched_socket_is_read_and_a_flood_beside_it_is_left_out() {
    use crate::common::peer::Peer;
    use crate::common::tcpdump::Tcpdump;
    use crate::common::{KillOnDrop, packets::payloads};
    use std::io::{BufRead, Write};

    let mount = Mount::start(&[]);
    let mut sinks = Peer::spawn();
    sinks.cmd("comm flood-sinks");
    let to_sharer = sinks.cmd("udp-bind 127.0.0.1:0");
    let to_parent = sinks.cmd("udp-bind 127.0.0.1:0");
    let port =
        |answer: &[String]| -> u16 { answer[1].rsplit(':').next().unwrap().parse().unwrap() };
    let mut bystander = Peer::spawn();
    bystander.cmd("comm bystander");
    let from = bystander.cmd("udp-bind 127.0.0.1:0");
    let into = bystander.cmd("udp-bind 127.0.0.1:0");
    let script = r#"
import os, socket, sys, time
to_sharer = ("127.0.0.1", int(sys.argv[1]))
to_parent = ("127.0.0.1", int(sys.argv[2]))
shared = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
shared.bind(("127.0.0.1", 0))
go_read, go_write = os.pipe()
child = os.fork()
if child == 0:
    with open("/proc/self/comm", "w") as comm:
        comm.write("sharer")
    os.read(go_read, 1)
    start, sent = time.monotonic(), 0
    while time.monotonic() - start < 1.5:
        due = int((time.monotonic() - start) * 4000)
        while sent < due:
            shared.sendto(b"flood-%d" % sent, to_sharer)
            sent += 1
        time.sleep(0.0005)
    os._exit(0)
with open("/proc/self/comm", "w") as comm:
    comm.write("sock-parent")
print(child, flush=True)
sys.stdin.readline()
os.write(go_write, b"g")
start = time.monotonic()
for i in range(60):
    time.sleep(max(0.0, start + i * 0.025 - time.monotonic()))
    shared.sendto(b"mine-%d" % i, to_parent)
os.waitpid(child, 0)
print("done", flush=True)
sys.stdin.readline()
"#;
    let mut parent = Command::new("/usr/bin/python3")
        .args(["-c", script])
        .args([port(&to_sharer).to_string(), port(&to_parent).to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(parent.stdout.take().unwrap()).lines();
    let sharer: u32 = lines.next().unwrap().unwrap().parse().unwrap();
    let _cleanup = KillOnDrop(vec![parent.id(), sharer]);
    let stream = open_stream(&mount, parent.id(), "sock-parent", "all");
    let truth = Tcpdump::start(None, "lo", &format!("udp port {}", port(&to_parent)));
    let flood = format!("udp-pace {} {} 6000 4000", from[0], into[1]);
    std::thread::scope(|scope| {
        let flooding = scope.spawn(|| bystander.cmd(&flood));
        writeln!(parent.stdin.as_mut().unwrap(), "go").unwrap();
        assert_eq!(lines.next().unwrap().unwrap(), "done");
        flooding.join().unwrap();
    });
    writeln!(parent.stdin.as_mut().unwrap(), "exit").unwrap();
    assert!(parent.wait().unwrap().success());
    let expected = payloads(&truth.stop());
    let mine: Vec<String> = (0..60).map(|i| format!("mine-{i}")).collect();
    assert_eq!(expected, mine, "tcpdump saw the parent's datagrams");
    let (bytes, reader) = stream;
    wait_until(WAIT, "the parent's all to end", || reader.is_finished());
    reader.join().unwrap();
    let got = payloads(&read_pcap(&bytes.lock().unwrap()).1);
    let log = mount.log();
    assert_eq!(
        got, mine,
        "the parent's all, exactly\nthe daemon's log:\n{log}"
    );
    let left_out = left_out_threads(&log);
    let threads_of = |pid: u32| -> Vec<u32> {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .map(|tasks| {
                tasks
                    .filter_map(|task| task.ok()?.file_name().to_str()?.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    };
    let flooding_threads = threads_of(bystander.pid);
    assert!(
        left_out.iter().any(|tid| flooding_threads.contains(tid)),
        "the bystander's flood (threads {flooding_threads:?}) is left out: {left_out:?}"
    );
    assert!(
        !left_out.contains(&sharer) && !left_out.contains(&parent.id()),
        "the sharer ({sharer}) and the parent are always read: {left_out:?}"
    );
}

/// Every send and receive on the machine hits the socket I/O tracepoints,
/// so they are read only while a stream asks about a socket's kernel
/// address (a UDP socket's): not for a process with TCP sockets only, on
/// for one with a UDP socket, off again once that stream has ended while
/// another still runs. Both streams hold exactly their own packets.
#[test]
fn sends_and_receives_are_read_only_while_a_stream_asks_about_a_udp_socket() {
    use crate::common::packets::payloads;
    use crate::common::peer::Peer;
    const ON: &str = "kernel events: sends and receives read";
    const OFF: &str = "kernel events: sends and receives no longer read";
    let mount = Mount::start(&[]);
    let mut server = Peer::spawn();
    server.cmd("comm sio-tcp");
    let listener = server.cmd("tcp-listen 127.0.0.1:0");
    let mut client = Peer::spawn();
    let (tcp_bytes, tcp_reader) = open_stream(&mount, server.pid, "sio-tcp", "all");
    let connection = client.cmd(&format!("tcp-connect {}", listener[1]));
    let served = server.cmd(&format!("tcp-accept {}", listener[0]));
    let exchange = |client: &mut Peer, server: &mut Peer, round: usize| {
        client.cmd(&format!("send {} tcp-{round}", connection[0]));
        server.cmd(&format!("recv {} 5", served[0]));
        server.cmd(&format!("send {} ack-{round}", served[0]));
        client.cmd(&format!("recv {} 5", connection[0]));
    };
    for round in 0..3 {
        exchange(&mut client, &mut server, round);
    }
    wait_until(WAIT, "the exchanges in the TCP stream", || {
        payloads(&read_pcap(&tcp_bytes.lock().unwrap()).1).len() == 6
    });
    assert!(!mount.log().contains(ON), "{}", mount.log());

    let mut udp = Peer::spawn();
    udp.cmd("comm sio-udp");
    let socket = udp.cmd("udp-bind 127.0.0.1:0");
    let (udp_bytes, udp_reader) = open_stream(&mount, udp.pid, "sio-udp", "all");
    wait_until(WAIT, "the sends and receives read", || {
        mount.log().contains(ON)
    });
    let sender = client.cmd("udp-bind 127.0.0.1:0");
    client.cmd(&format!("sendto {} {} datagram", sender[0], socket[1]));
    wait_until(WAIT, "the datagram in the UDP stream", || {
        payloads(&read_pcap(&udp_bytes.lock().unwrap()).1) == ["datagram"]
    });
    udp.kill();
    wait_until(WAIT, "the UDP stream's end", || udp_reader.is_finished());
    udp_reader.join().unwrap();
    wait_until(WAIT, "the sends and receives no longer read", || {
        mount.log().contains(OFF)
    });

    for round in 3..6 {
        exchange(&mut client, &mut server, round);
    }
    client.cmd(&format!("close {}", connection[0]));
    server.cmd(&format!("close {}", served[0]));
    std::thread::sleep(Duration::from_millis(100));
    server.kill();
    wait_until(WAIT, "the TCP stream's end", || tcp_reader.is_finished());
    tcp_reader.join().unwrap();
    // read_pcap fails on a record that comes twice.
    let packets = read_pcap(&tcp_bytes.lock().unwrap()).1;
    let expected: Vec<String> = (0..6)
        .flat_map(|round| [format!("tcp-{round}"), format!("ack-{round}")])
        .collect();
    assert_eq!(payloads(&packets), expected);
    let port: u16 = listener[1].rsplit(':').next().unwrap().parse().unwrap();
    let by_client = connections(&packets, port);
    assert_eq!(by_client.len(), 1, "{by_client:?}");
    assert_whole(&by_client, "the one connection");
    // Off stays off: the TCP stream alone never asked for them again.
    assert_eq!(mount.log().matches(ON).count(), 1, "{}", mount.log());
}
