//! How accurately a process's `all` stream follows it.
//!
//! A loopback server (TCP and UDP echo); a target process that makes TCP
//! connections and UDP exchanges to it, half living 10 ms or more, half
//! under a millisecond (connect or bind, send, close); and a second process
//! talking to the same server ports meanwhile. The ground truth is a capture
//! of the server's ports taken by this harness itself; each client reports
//! its flows (local port, start, end). Then:
//!
//! - recall: the share of the target's packets (by the ground truth) that
//!   its `all` stream holds, for long and for short flows;
//! - precision: packets of the second process in the target's stream (must
//!   be none);
//! - what polling /proc once a second (bandwhich's method) would catch: the
//!   flows alive at some poll instant, and their share of the packets;
//! - the daemon's CPU seconds over the run.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{Daemon, Error, Helper, unix_nanos, wait_for_path};

/// `bench --accuracy-server`: TCP and UDP echo on loopback.
pub fn server() -> Result<(), Error> {
    let tcp = TcpListener::bind("127.0.0.1:0")?;
    let udp = UdpSocket::bind("127.0.0.1:0")?;
    println!(
        "ready {} {}",
        tcp.local_addr()?.port(),
        udp.local_addr()?.port()
    );
    std::io::stdout().flush()?;
    std::thread::spawn(move || {
        let mut buffer = [0u8; 2048];
        while let Ok((n, from)) = udp.recv_from(&mut buffer) {
            let _ = udp.send_to(&buffer[..n], from);
        }
    });
    std::thread::spawn(move || {
        for stream in tcp.incoming().flatten() {
            std::thread::spawn(move || {
                let mut stream = stream;
                let mut buffer = [0u8; 2048];
                while let Ok(n) = stream.read(&mut buffer) {
                    if n == 0 || stream.write_all(&buffer[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    Ok(())
}

/// `bench --accuracy-client <tcp> <udp> <tcp port> <udp port>`: waits for
/// "go", then makes its flows one after the other, alternating long (10 ms
/// or more) and short (under 1 ms), and reports each:
/// `flow tcp|udp <local port> long|short <start ns> <end ns>`.
pub fn client(args: &[String]) -> Result<(), Error> {
    let number =
        |i: usize| -> Result<usize, Error> { Ok(args.get(i).ok_or("missing argument")?.parse()?) };
    let (tcp_count, udp_count) = (number(0)?, number(1)?);
    let server_tcp: SocketAddr = format!("127.0.0.1:{}", number(2)?).parse()?;
    let server_udp: SocketAddr = format!("127.0.0.1:{}", number(3)?).parse()?;
    std::fs::write("/proc/self/comm", "bench")?;
    // A socket from the start, so the process has a directory (and an
    // `all` file) on the mount before its flows begin.
    let _idle = UdpSocket::bind("127.0.0.1:0")?;
    println!("ready");
    std::io::stdout().flush()?;
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    let payload = [b'a'; 100];
    let mut reply = [0u8; 100];
    let mut out = std::io::stdout().lock();
    for i in 0..tcp_count {
        let long = i % 2 == 0;
        let start = unix_nanos();
        let mut stream = TcpStream::connect(server_tcp)?;
        let port = stream.local_addr()?.port();
        stream.write_all(&payload)?;
        if long {
            stream.read_exact(&mut reply)?;
            std::thread::sleep(Duration::from_millis(10));
            stream.write_all(&payload)?;
            stream.read_exact(&mut reply)?;
        }
        drop(stream);
        writeln!(
            out,
            "flow tcp {port} {} {start} {}",
            if long { "long" } else { "short" },
            unix_nanos()
        )?;
    }
    for i in 0..udp_count {
        let long = i % 2 == 0;
        let start = unix_nanos();
        let socket = UdpSocket::bind("127.0.0.1:0")?;
        socket.set_read_timeout(Some(Duration::from_secs(2)))?;
        let port = socket.local_addr()?.port();
        socket.send_to(&payload, server_udp)?;
        if long {
            socket.recv(&mut reply)?;
            std::thread::sleep(Duration::from_millis(10));
            socket.send_to(&payload, server_udp)?;
            socket.recv(&mut reply)?;
        }
        drop(socket);
        writeln!(
            out,
            "flow udp {port} {} {start} {}",
            if long { "long" } else { "short" },
            unix_nanos()
        )?;
    }
    writeln!(out, "done")?;
    out.flush()?;
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    Ok(())
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
struct FlowKey {
    udp: bool,
    client_port: u16,
}

struct ClientFlow {
    key: FlowKey,
    long: bool,
    start: u128,
    end: u128,
}

fn flows_of(client: &mut Helper) -> Result<Vec<ClientFlow>, Error> {
    let mut flows = Vec::new();
    loop {
        let line = client.read_line()?;
        if line == "done" {
            return Ok(flows);
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        if let ["flow", proto, port, class, start, end] = words.as_slice() {
            flows.push(ClientFlow {
                key: FlowKey {
                    udp: *proto == "udp",
                    client_port: port.parse()?,
                },
                long: *class == "long",
                start: start.parse()?,
                end: end.parse()?,
            });
        }
    }
}

/// Whose flow a packet is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Owner {
    Target,
    Other,
}

/// How far outside a flow's reported start and end its packets may fall
/// (the close's FIN and ACK come after the client's report).
const FLOW_SLACK_NS: u128 = 100_000_000;

/// Packets per flow of a capture of the server's ports: each packet goes to
/// the flow that had its client port at its time (ports are reused, by one
/// process or the other, over a run).
fn count_flows(
    (linktype, packets): &Packets,
    flows: &HashMap<FlowKey, Vec<(Owner, usize, u128, u128)>>,
    tcp_port: u16,
    udp_port: u16,
) -> HashMap<(Owner, usize), u64> {
    let mut counts = HashMap::new();
    for (at, data) in packets {
        let Some(flow) = netstatfs::capture::classify::flow_of(*linktype, data) else {
            continue;
        };
        let udp = flow.transport == netstatfs::capture::classify::Transport::Udp;
        let server_port = if udp { udp_port } else { tcp_port };
        let client_port = if flow.dst.port() == server_port {
            flow.src.port()
        } else if flow.src.port() == server_port {
            flow.dst.port()
        } else {
            continue;
        };
        let Some(candidates) = flows.get(&FlowKey { udp, client_port }) else {
            continue;
        };
        let owner = candidates
            .iter()
            .filter(|(_, _, start, end)| {
                start.saturating_sub(FLOW_SLACK_NS) <= *at && *at <= end + FLOW_SLACK_NS
            })
            .min_by_key(|(_, _, start, _)| start.abs_diff(*at));
        if let Some((owner, index, _, _)) = owner {
            *counts.entry((*owner, *index)).or_insert(0) += 1;
        }
    }
    counts
}

/// A capture: its link type, and each packet with its time (nanoseconds).
type Packets = (i32, Vec<(u128, Vec<u8>)>);

/// A pcap file's link type and packets with their times.
fn read_packets(path: &std::path::Path) -> Result<Packets, Error> {
    let mut capture = pcap::Capture::from_file_with_precision(path, pcap::Precision::Nano)?;
    let linktype = capture.get_datalink().0;
    let mut packets = Vec::new();
    while let Ok(packet) = capture.next_packet() {
        let at = packet.header.ts.tv_sec as u128 * 1_000_000_000 + packet.header.ts.tv_usec as u128;
        packets.push((at, packet.data.to_vec()));
    }
    Ok((linktype, packets))
}

pub struct AccuracyReport {
    pub rows: Vec<(String, f64, String)>,
    pub precision_violations: u64,
    pub long_tcp_recall: f64,
    pub long_udp_recall: f64,
    pub short_tcp_recall: f64,
    pub short_udp_recall: f64,
}

/// Runs the measurement with `count` TCP connections and `count` UDP
/// exchanges for the target (the second process makes a quarter as many).
pub fn measure(
    daemon: &Daemon,
    scratch: &std::path::Path,
    count: usize,
) -> Result<AccuracyReport, Error> {
    let mut server = Helper::spawn(&["--accuracy-server"])?;
    let ready = server.read_line()?;
    let ports: Vec<u16> = ready
        .split_whitespace()
        .skip(1)
        .filter_map(|p| p.parse().ok())
        .collect();
    let (tcp_port, udp_port) = (ports[0], ports[1]);
    let client_args = |n: usize| {
        vec![
            "--accuracy-client".to_owned(),
            n.to_string(),
            n.to_string(),
            tcp_port.to_string(),
            udp_port.to_string(),
        ]
    };
    let target_args = client_args(count);
    let other_args = client_args(count.div_ceil(4));
    let mut target = Helper::spawn(&target_args.iter().map(String::as_str).collect::<Vec<_>>())?;
    let mut other = Helper::spawn(&other_args.iter().map(String::as_str).collect::<Vec<_>>())?;
    target.read_line()?;
    other.read_line()?;

    // The ground truth: this harness's own capture of the server's ports.
    let truth_path = scratch.join("truth.pcap");
    let mut truth = Helper::spawn(&[
        "--accuracy-truth",
        truth_path.to_str().ok_or("path")?,
        &tcp_port.to_string(),
        &udp_port.to_string(),
    ])?;
    truth.read_line()?;

    // The target's all stream, read into memory.
    let all = daemon
        .mountpoint
        .join(format!("{}_bench", target.child.id()))
        .join("all");
    wait_for_path(&all, Duration::from_secs(10))?;
    let stream_bytes: Arc<Mutex<Vec<u8>>> = Arc::default();
    let mut file = File::open(&all)?;
    let sink = Arc::clone(&stream_bytes);
    let reader = std::thread::spawn(move || {
        let mut buffer = vec![0u8; 1 << 20];
        while let Ok(n) = file.read(&mut buffer) {
            if n == 0 {
                break;
            }
            sink.lock()
                .map(|mut bytes| bytes.extend_from_slice(&buffer[..n]))
                .ok();
        }
    });

    let cpu_before = daemon.cpu_seconds();
    let started = Instant::now();
    target.send("go")?;
    other.send("go")?;
    let target_flows = flows_of(&mut target)?;
    let other_flows = flows_of(&mut other)?;
    let elapsed = started.elapsed();
    // Let the last packets through, then end the target: its stream ends.
    std::thread::sleep(Duration::from_millis(700));
    drop(target);
    let _ = reader.join();
    let cpu = daemon.cpu_seconds() - cpu_before;
    truth.send("stop")?;
    truth.read_line()?;
    drop(other);
    drop(server);

    let stream_path = scratch.join("all.pcap");
    std::fs::write(&stream_path, &*stream_bytes.lock().map_err(|_| "poisoned")?)?;
    let mut flows: HashMap<FlowKey, Vec<(Owner, usize, u128, u128)>> = HashMap::new();
    for (owner, list) in [(Owner::Target, &target_flows), (Owner::Other, &other_flows)] {
        for (index, flow) in list.iter().enumerate() {
            flows
                .entry(flow.key)
                .or_default()
                .push((owner, index, flow.start, flow.end));
        }
    }
    let truth_counts = count_flows(&read_packets(&truth_path)?, &flows, tcp_port, udp_port);
    let stream_counts = count_flows(&read_packets(&stream_path)?, &flows, tcp_port, udp_port);
    let precision_violations: u64 = stream_counts
        .iter()
        .filter(|((owner, _), _)| *owner == Owner::Other)
        .map(|(_, count)| count)
        .sum();
    let mut rows = Vec::new();
    let mut recall_of = |udp: bool, long: bool| -> f64 {
        let flows: Vec<(usize, &ClientFlow)> = target_flows
            .iter()
            .enumerate()
            .filter(|(_, f)| f.key.udp == udp && f.long == long)
            .collect();
        let packets_of = |index: usize, counts: &HashMap<(Owner, usize), u64>| {
            counts.get(&(Owner::Target, index)).copied().unwrap_or(0)
        };
        let (mut seen, mut total) = (0u64, 0u64);
        for (index, _) in &flows {
            let truth = packets_of(*index, &truth_counts);
            total += truth;
            seen += packets_of(*index, &stream_counts).min(truth);
        }
        // Polling /proc once a second: a flow is seen if it is alive at a
        // poll instant (the phase spread over ten offsets).
        let first = target_flows.iter().map(|f| f.start).min().unwrap_or(0);
        let mut caught = 0.0;
        for phase in 0..10u128 {
            let offset = phase * 100_000_000;
            let alive_at_poll = |f: &ClientFlow| {
                let k = (f.start.saturating_sub(first + offset)).div_ceil(1_000_000_000);
                first + offset + k * 1_000_000_000 <= f.end
            };
            let caught_packets: u64 = flows
                .iter()
                .filter(|(_, f)| alive_at_poll(f))
                .map(|(index, _)| packets_of(*index, &truth_counts))
                .sum();
            caught += caught_packets as f64 / total.max(1) as f64 / 10.0;
        }
        let recall = seen as f64 / total.max(1) as f64;
        let label = format!(
            "{} {} ({} flows)",
            if udp {
                "UDP exchanges"
            } else {
                "TCP connections"
            },
            if long {
                "living 10 ms or more"
            } else {
                "living under 1 ms"
            },
            flows.len()
        );
        rows.push((label, recall, format!("{caught:.3}")));
        recall
    };
    let long_tcp_recall = recall_of(false, true);
    let short_tcp_recall = recall_of(false, false);
    let long_udp_recall = recall_of(true, true);
    let short_udp_recall = recall_of(true, false);
    rows.push((
        format!("daemon CPU over the {:.1} s run", elapsed.as_secs_f64()),
        cpu,
        String::new(),
    ));
    Ok(AccuracyReport {
        rows,
        precision_violations,
        long_tcp_recall,
        long_udp_recall,
        short_tcp_recall,
        short_udp_recall,
    })
}

/// `bench --accuracy-truth <file> <tcp port> <udp port>`: captures the
/// server's ports on lo until "stop".
pub fn truth(args: &[String]) -> Result<(), Error> {
    let path = args.first().ok_or("missing file")?;
    let (tcp, udp) = (args.get(1).ok_or("port")?, args.get(2).ok_or("port")?);
    let mut capture = pcap::Capture::from_device("lo")?
        .snaplen(256)
        .buffer_size(64 << 20)
        .immediate_mode(false)
        .timeout(10)
        .open()?
        .setnonblock()?;
    capture.filter(&format!("tcp port {tcp} or udp port {udp}"), true)?;
    let mut savefile = capture.savefile(path)?;
    println!("ready");
    std::io::stdout().flush()?;
    let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(1);
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
        let _ = stop_tx.send(());
    });
    loop {
        match capture.next_packet() {
            Ok(packet) => savefile.write(&packet),
            Err(pcap::Error::TimeoutExpired) => {
                if stop_rx.try_recv().is_ok() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(err) => return Err(err.into()),
        }
    }
    savefile.flush()?;
    println!("stopped");
    std::io::stdout().flush()?;
    Ok(())
}
