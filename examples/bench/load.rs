//! Under load: a busy service watched, side by side with tcpdump.
//!
//! - redis-server under `redis-benchmark -n N -c 20 -t set,get` at full
//!   speed, in rounds that alternate: nothing capturing, `tcpdump -w` on
//!   the port, the server's `all` read by `cat`, that plus the
//!   benchmark's `tree` (of a parent that starts it), and an idle
//!   process's `all` beside it (what capturing at all costs the service,
//!   whosever its packets are). Requests a second
//!   (their ratio to nothing capturing in the same round), CPU of the
//!   daemon and its readers against tcpdump's, kernel events lost, and
//!   what each stream's closing line says it missed.
//! - A completeness round: both streams and a tcpdump of the port in one
//!   window, their records counted against tcpdump's.
//! - An idle process's `all` (one, and ten) beside a UDP flood of about
//!   100,000 packets a second between two other processes: the daemon's
//!   CPU over the window.
//! - Memory: 1,000 idle socket-file streams, and 100 idle `all` streams of
//!   a process alone in its namespace; the daemon's RSS five seconds after
//!   the last closed.

use std::io::{Read, Write};
use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{Error, Helper, children_cpu_seconds, wait_for_path};
use testkit::Mount;
use testkit::process::Reaped;

/// `bench load-client <port> <requests>`: holds a socket (so that it is a
/// directory of the mount), says "ready", and on "go" runs redis-benchmark
/// as its child; says the requests a second of SET and GET.
pub fn client(args: &[String]) -> Result<(), Error> {
    let port = args.first().ok_or("missing port")?;
    let requests = args.get(1).ok_or("missing requests")?;
    std::fs::write("/proc/self/comm", "bench-load")?;
    let _held = UdpSocket::bind("127.0.0.1:0")?;
    println!("ready");
    std::io::stdout().flush()?;
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    let output = Command::new("redis-benchmark")
        .args([
            "-p", port, "-n", requests, "-c", "20", "-t", "set,get", "-q",
        ])
        .output()?;
    let text = String::from_utf8_lossy(&output.stdout).replace('\r', "\n");
    let rates: Vec<f64> = text
        .lines()
        .filter(|line| line.starts_with("SET:") || line.starts_with("GET:"))
        .filter_map(|line| line.split_whitespace().nth(1)?.parse().ok())
        .collect();
    if rates.len() != 2 {
        return Err(format!("redis-benchmark said: {text}").into());
    }
    println!("{} {}", rates[0], rates[1]);
    std::io::stdout().flush()?;
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    Ok(())
}

/// `bench flood <port> <rate> <seconds>`: UDP datagrams to a receiver of
/// its own at `rate` a second; says "done".
pub fn flood(args: &[String]) -> Result<(), Error> {
    let rate: f64 = args.get(1).ok_or("missing rate")?.parse()?;
    let seconds: f64 = args.get(2).ok_or("missing seconds")?.parse()?;
    std::fs::write("/proc/self/comm", "bench-flood")?;
    let receiver = UdpSocket::bind("127.0.0.1:0")?;
    let to = receiver.local_addr()?;
    std::thread::spawn(move || {
        let mut buffer = [0u8; 2048];
        while receiver.recv(&mut buffer).is_ok() {}
    });
    let sender = UdpSocket::bind("127.0.0.1:0")?;
    println!("ready");
    std::io::stdout().flush()?;
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    let started = Instant::now();
    let payload = [b'f'; 64];
    let mut sent = 0u64;
    while started.elapsed().as_secs_f64() < seconds {
        // Paced in slices of a millisecond.
        let due = (started.elapsed().as_secs_f64() * rate) as u64;
        while sent < due {
            let _ = sender.send_to(&payload, to);
            sent += 1;
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    println!("done {sent}");
    std::io::stdout().flush()?;
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    Ok(())
}

/// How a round watches the service.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Watch {
    Nothing,
    Tcpdump,
    All,
    AllAndTree,
    /// An idle process's `all` (this harness's), beside: what capturing at
    /// all costs the service, its own packets or not.
    IdleBeside,
}

impl Watch {
    fn label(self) -> &'static str {
        match self {
            Watch::Nothing => "nothing capturing",
            Watch::Tcpdump => "`tcpdump -i lo -w` on the port",
            Watch::All => "the server's `all` read by `cat`",
            Watch::AllAndTree => "`all` and the benchmark's `tree`",
            Watch::IdleBeside => "an idle process's `all` beside it",
        }
    }
}

/// One round's outcome.
struct Round {
    watch: Watch,
    /// Requests a second, SET and GET averaged.
    rate: f64,
    /// CPU seconds of the daemon, and of the readers (cat or tcpdump).
    daemon_cpu: f64,
    reader_cpu: f64,
    /// The streams' closing lines.
    closing: Vec<String>,
    lost_events: u64,
}

/// A redis-server of the round's own, killed and reaped when dropped.
struct Redis {
    child: Reaped,
    port: u16,
}

impl Redis {
    fn start() -> Result<Redis, Error> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let child = Reaped(
            Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?,
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                return Err("redis-server did not start".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Redis { child, port })
    }
}

/// A `cat` of a stream into a file.
fn cat(stream: &Path, out: &Path) -> Result<Child, Error> {
    wait_for_path(stream, Duration::from_secs(10))?;
    Ok(Command::new("cat")
        .arg(stream)
        .stdout(std::fs::File::create(out)?)
        .spawn()?)
}

/// A process's CPU seconds (user and system), once it has exited.
fn reaped_cpu(mut child: Child) -> f64 {
    let before = children_cpu_seconds();
    let _ = child.wait();
    children_cpu_seconds() - before
}

/// The lines of the daemon's log after `from` that say what `stream`
/// missed.
fn closing_lines(daemon: &Mount, from: usize, wanted: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let log = daemon.log();
        let lines: Vec<String> = log[from.min(log.len())..]
            .lines()
            .filter(|line| line.contains("stream closed"))
            .map(|line| {
                line.split("netstatfs: info: ")
                    .last()
                    .unwrap_or(line)
                    .to_owned()
            })
            .collect();
        if lines.len() >= wanted || Instant::now() > deadline {
            return lines;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Kernel events the daemon says were lost, in its log after `from`.
fn lost_events(daemon: &Mount, from: usize) -> u64 {
    let log = daemon.log();
    log[from.min(log.len())..]
        .lines()
        .filter_map(|line| {
            let rest = line.split("kernel events: ").nth(1)?;
            rest.split(" lost since the last report")
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

/// A redis-server of its own, and a client ready to send it `requests`.
fn redis_and_client(requests: usize) -> Result<(Redis, Helper), Error> {
    let redis = Redis::start()?;
    let mut client = Helper::spawn(&[
        "load-client",
        &redis.port.to_string(),
        &requests.to_string(),
    ])?;
    client.read_line()?;
    Ok((redis, client))
}

fn round(daemon: &Mount, watch: Watch, requests: usize, scratch: &Path) -> Result<Round, Error> {
    let (redis, mut client) = redis_and_client(requests)?;
    let log_from = daemon.log().len();
    let mut readers: Vec<Child> = Vec::new();
    let mut tcpdump = None;
    // The idle process's socket (this harness holds it) and its reader,
    // stopped when the round ends.
    let mut idle = None;
    let out = |name: &str| scratch.join(format!("load-{name}.pcap"));
    match watch {
        Watch::Nothing => {}
        Watch::Tcpdump => {
            let child = Command::new("tcpdump")
                .args(["-i", "lo", "-w"])
                .arg(out("tcpdump"))
                .args(["tcp", "port", &redis.port.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?;
            wait_for_path(&out("tcpdump"), Duration::from_secs(10))?;
            std::thread::sleep(Duration::from_millis(300));
            tcpdump = Some(child);
        }
        Watch::All | Watch::AllAndTree | Watch::IdleBeside => {
            if watch == Watch::IdleBeside {
                let socket = UdpSocket::bind("127.0.0.1:0")?;
                let dir = daemon.path.join(format!("{}_bench", std::process::id()));
                idle = Some((socket, cat(&dir.join("all"), &out("idle"))?));
            } else {
                let dir = daemon
                    .path
                    .join(format!("{}_redis-server", redis.child.id()));
                readers.push(cat(&dir.join("all"), &out("all"))?);
            }
            if watch == Watch::AllAndTree {
                let dir = daemon
                    .path
                    .join(format!("{}_bench-load", client.child.id()));
                readers.push(cat(&dir.join("tree"), &out("tree"))?);
            }
            // The captures run before the benchmark starts.
            let deadline = Instant::now() + Duration::from_secs(10);
            let captures = readers.len() + usize::from(idle.is_some());
            while daemon.log()[log_from..].matches("capture running").count() < captures
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    let cpu_before = daemon.cpu_seconds();
    client.send("go")?;
    let rates: Vec<f64> = client
        .read_line()?
        .split_whitespace()
        .filter_map(|rate| rate.parse().ok())
        .collect();
    let daemon_cpu = daemon.cpu_seconds() - cpu_before;
    let rate = rates.iter().sum::<f64>() / rates.len().max(1) as f64;
    // The server's end ends `all`; the client's, `tree`.
    drop(redis);
    drop(client);
    let mut reader_cpu = 0.0;
    if let Some(child) = tcpdump {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        );
        reader_cpu += reaped_cpu(child);
    }
    let mut wanted = readers.len();
    for reader in readers {
        reader_cpu += reaped_cpu(reader);
    }
    if let Some((socket, mut reader)) = idle {
        let _ = reader.kill();
        reader_cpu += reaped_cpu(reader);
        drop(socket);
        wanted += 1;
    }
    let closing = closing_lines(daemon, log_from, wanted);
    Ok(Round {
        watch,
        rate,
        daemon_cpu,
        reader_cpu,
        closing,
        lost_events: lost_events(daemon, log_from),
    })
}

/// Records in a pcap file.
fn records(path: &Path) -> usize {
    let Ok(mut capture) = pcap::Capture::from_file(path) else {
        return 0;
    };
    let mut count = 0;
    while capture.next_packet().is_ok() {
        count += 1;
    }
    count
}

/// Both streams and tcpdump in one window: each stream's records against
/// tcpdump's.
fn completeness(daemon: &Mount, requests: usize, scratch: &Path) -> Result<String, Error> {
    let (redis, mut client) = redis_and_client(requests)?;
    let log_from = daemon.log().len();
    let truth: PathBuf = scratch.join("load-truth.pcap");
    let tcpdump = Command::new("tcpdump")
        .args([
            "-i",
            "lo",
            "-s",
            "256",
            "-B",
            "262144",
            "--immediate-mode",
            "-w",
        ])
        .arg(&truth)
        .args(["tcp", "port", &redis.port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    wait_for_path(&truth, Duration::from_secs(10))?;
    let all = scratch.join("load-all.pcap");
    let tree = scratch.join("load-tree.pcap");
    let readers = [
        cat(
            &daemon
                .path
                .join(format!("{}_redis-server", redis.child.id()))
                .join("all"),
            &all,
        )?,
        cat(
            &daemon
                .path
                .join(format!("{}_bench-load", client.child.id()))
                .join("tree"),
            &tree,
        )?,
    ];
    let deadline = Instant::now() + Duration::from_secs(10);
    while daemon.log()[log_from..].matches("capture running").count() < 2
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    client.send("go")?;
    client.read_line()?;
    drop(redis);
    drop(client);
    for mut reader in readers {
        let _ = reader.wait();
    }
    std::thread::sleep(Duration::from_millis(300));
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(tcpdump.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    );
    let output = tcpdump.wait_with_output()?;
    let dropped = String::from_utf8_lossy(&output.stderr)
        .lines()
        .find(|line| line.contains("dropped by kernel"))
        .unwrap_or("?")
        .trim()
        .to_owned();
    let expected = records(&truth);
    let lost = lost_events(daemon, log_from);
    let (in_all, in_tree) = (records(&all), records(&tree));
    Ok(format!(
        "| {expected} ({dropped}) | {in_all} ({:.4}) | {in_tree} ({:.4}) | {lost} |",
        in_all as f64 / expected.max(1) as f64,
        in_tree as f64 / expected.max(1) as f64
    ))
}

/// An idle process's `all` streams (`streams` of them) beside a flood of
/// `rate` datagrams a second between two other processes: the daemon's
/// CPU over the flood, in cores.
fn beside_a_flood(daemon: &Mount, streams: usize, rate: u32) -> Result<(f64, u64), Error> {
    let idle = UdpSocket::bind("127.0.0.1:0")?;
    let dir = daemon.path.join(format!("{}_bench", std::process::id()));
    let mut readers = Vec::new();
    for _ in 0..streams {
        wait_for_path(&dir.join("all"), Duration::from_secs(10))?;
        readers.push(
            Command::new("cat")
                .arg(dir.join("all"))
                .stdout(Stdio::null())
                .spawn()?,
        );
    }
    std::thread::sleep(Duration::from_millis(500));
    let seconds = 5.0;
    let mut flood = Helper::spawn(&["flood", "0", &rate.to_string(), &seconds.to_string()])?;
    flood.read_line()?;
    let before = daemon.cpu_seconds();
    let started = Instant::now();
    flood.send("go")?;
    let sent: u64 = flood
        .read_line()?
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let cores = (daemon.cpu_seconds() - before) / started.elapsed().as_secs_f64();
    drop(flood);
    for mut reader in readers {
        let _ = reader.kill();
        let _ = reader.wait();
    }
    drop(idle);
    Ok((cores, sent))
}

/// RSS (KiB) of the daemon.
fn rss(daemon: &Mount) -> u64 {
    daemon.rss_kib().0
}

/// 1,000 idle socket-file streams ([`IdleCost`]).
fn idle_streams(daemon: &Mount) -> Result<IdleCost, Error> {
    let socket = UdpSocket::bind("127.0.0.1:0")?;
    let local = socket.local_addr()?;
    let path = daemon
        .path
        .join(format!("{}_bench", std::process::id()))
        .join(format!("udp_{local}_0.0.0.0:0"));
    idle_opens(daemon, &path, 1000)
}

/// 100 idle `all` streams of a process alone in a network namespace of its
/// own (no packet there: they get no ring), as [`idle_streams`].
fn idle_all_streams(daemon: &Mount) -> Result<IdleCost, Error> {
    let netns = format!("nsfs-bench-idle-{}", std::process::id());
    let ip = |args: &[&str]| -> Result<(), Error> {
        let status = Command::new("ip").args(args).status()?;
        if status.success() {
            Ok(())
        } else {
            Err(format!("ip {args:?} failed").into())
        }
    };
    let _ = Command::new("ip")
        .args(["netns", "del", &netns])
        .stderr(Stdio::null())
        .status();
    ip(&["netns", "add", &netns])?;
    let held = Command::new("ip")
        .args(["netns", "exec", &netns, "python3", "-c"])
        .arg(
            "import socket, sys; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); \
             s.bind(('127.0.0.1', 0)); sys.stdin.read()",
        )
        .stdin(Stdio::piped())
        .spawn();
    let outcome = held.map_err(Error::from).and_then(|child| {
        let child = Reaped(child);
        let path = daemon
            .path
            .join(format!("{}_python3", child.0.id()))
            .join("all");
        idle_opens(daemon, &path, 100)
    });
    let _ = ip(&["netns", "del", &netns]);
    outcome
}

/// What `count` idle streams cost: KiB of the daemon's RSS and of the
/// kernel's slab per stream, and the daemon's RSS (KiB) before and five
/// seconds after the last closed.
struct IdleCost {
    rss_per_stream: f64,
    slab_per_stream: f64,
    before: u64,
    after: u64,
}

/// The kernel's slab memory (KiB): where a packet socket and its filter
/// live (a ring is mapped into the daemon and counts in its RSS).
fn slab_kib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|line| line.starts_with("Slab:"))
                .and_then(|line| line.split_whitespace().nth(1))
                .and_then(|kib| kib.parse().ok())
        })
        .unwrap_or(0)
}

/// `count` opens of `path`, each with its header read and nothing since.
fn idle_opens(daemon: &Mount, path: &Path, count: usize) -> Result<IdleCost, Error> {
    wait_for_path(path, Duration::from_secs(10))?;
    std::thread::sleep(Duration::from_secs(1));
    let before = rss(daemon);
    let slab_before = slab_kib();
    let mut files = Vec::new();
    for _ in 0..count {
        let mut file = std::fs::File::open(path)?;
        let mut header = [0u8; 24];
        file.read_exact(&mut header)?;
        files.push(file);
    }
    std::thread::sleep(Duration::from_secs(1));
    let open = rss(daemon);
    let slab_open = slab_kib();
    drop(files);
    std::thread::sleep(Duration::from_secs(5));
    let after = rss(daemon);
    Ok(IdleCost {
        rss_per_stream: open.saturating_sub(before) as f64 / count as f64,
        slab_per_stream: slab_open.saturating_sub(slab_before) as f64 / count as f64,
        before,
        after,
    })
}

/// The first and third quartiles of `values` (the nearest ranks): where
/// the middle half of the rounds fell.
fn middle_half(values: &[f64]) -> (f64, f64) {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let at = |quarter: usize| {
        let last = sorted.len().saturating_sub(1);
        sorted.get((last * quarter + 2) / 4).copied().unwrap_or(0.0)
    };
    (at(1), at(3))
}

/// Runs the section; prints its tables.
pub fn measure(daemon: &Mount, scratch: &Path, quick: bool, rounds: usize) -> Result<(), Error> {
    let requests = if quick { 100_000 } else { 200_000 };
    let order = [
        Watch::Nothing,
        Watch::Tcpdump,
        Watch::All,
        Watch::AllAndTree,
        Watch::IdleBeside,
    ];
    let mut results: Vec<Round> = Vec::new();
    for index in 0..rounds {
        // Rotated each round: no mode always runs first or last.
        for offset in 0..order.len() {
            let watch = order[(index + offset) % order.len()];
            results.push(round(daemon, watch, requests, scratch)?);
        }
    }
    println!("## Under load\n");
    println!(
        "redis-server under `redis-benchmark -n {requests} -c 20 -t set,get` at full speed, \
         {rounds} rounds, the five ways of watching it alternated within each round. Requests a \
         second are SET's and GET's averaged; the ratio is to the same round's run with nothing \
         capturing; CPU is the daemon's and its readers' (`cat`), or tcpdump's.\n"
    );
    println!(
        "| watched by | requests/s (median) | ratio to nothing (median) | ratio, middle half of rounds | daemon CPU s | reader CPU s | kernel events lost |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    let median = |mut values: Vec<f64>| {
        values.sort_by(f64::total_cmp);
        values.get(values.len() / 2).copied().unwrap_or(0.0)
    };
    for watch in order {
        let of: Vec<&Round> = results
            .iter()
            .filter(|round| round.watch == watch)
            .collect();
        let ratios: Vec<f64> = (0..rounds)
            .filter_map(|index| {
                let base = results[index * order.len()..(index + 1) * order.len()]
                    .iter()
                    .find(|round| round.watch == Watch::Nothing)?
                    .rate;
                let this = results[index * order.len()..(index + 1) * order.len()]
                    .iter()
                    .find(|round| round.watch == watch)?
                    .rate;
                Some(this / base)
            })
            .collect();
        let (low, high) = middle_half(&ratios);
        println!(
            "| {} | {:.0} | {:.3} | {low:.3} to {high:.3} | {:.2} | {:.2} | {} |",
            watch.label(),
            median(of.iter().map(|round| round.rate).collect()),
            median(ratios),
            median(of.iter().map(|round| round.daemon_cpu).collect()),
            median(of.iter().map(|round| round.reader_cpu).collect()),
            of.iter().map(|round| round.lost_events).sum::<u64>()
        );
    }
    println!("\nWhat the streams said they missed, every round:\n");
    for round in results.iter().filter(|round| !round.closing.is_empty()) {
        for line in &round.closing {
            println!("- {}: {line}", round.watch.label());
        }
    }
    println!("\nBoth streams and a tcpdump of the port (immediate mode, 256 MiB) in one window:\n");
    println!(
        "| tcpdump's records | the server's `all` (share) | the benchmark's `tree` (share) | kernel events lost |"
    );
    println!("|---:|---:|---:|---:|");
    println!("{}", completeness(daemon, requests, scratch)?);
    println!("\nAn idle process's `all` beside a UDP flood between two other processes:\n");
    println!("| `all` streams | datagrams a second | daemon CPU, cores |");
    println!("|---:|---:|---:|");
    for streams in [1, 10] {
        let rate = 100_000;
        let (cores, sent) = beside_a_flood(daemon, streams, rate)?;
        println!("| {streams} | {:.0} | {cores:.3} |", sent as f64 / 5.0);
    }
    println!("\nMemory of idle streams (opened, header read, nothing since)\n");
    println!(
        "| streams | KiB of the daemon per idle stream | KiB of kernel slab per idle stream | daemon RSS before, MiB | 5 s after the last closed, MiB |"
    );
    println!("|---|---:|---:|---:|---:|");
    for (what, measured) in [
        ("1,000 of a socket file", idle_streams(daemon)?),
        (
            "100 `all` of a process alone in its namespace",
            idle_all_streams(daemon)?,
        ),
    ] {
        println!(
            "| {what} | {:.1} | {:.1} | {:.1} | {:.1} |",
            measured.rss_per_stream,
            measured.slab_per_stream,
            measured.before as f64 / 1024.0,
            measured.after as f64 / 1024.0
        );
    }
    println!();
    Ok(())
}
