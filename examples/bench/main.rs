//! The benchmark harness: netstatfs side by side with the tools users would
//! otherwise reach for, on the same workload, in the same run.
//!
//! ```text
//! scripts/bench.sh            (installs what it needs, builds, runs this)
//! cargo run --release --example bench -- --netstatfs target/release/netstatfs [--quick]
//!     [--only SECTION,...] [--daemon-args 'NETSTATFS OPTIONS']
//! ```
//!
//! Timings on shared machines are noisy, so it reports medians of runs that
//! alternate between the tools, and ratios taken within this run, never a
//! lone absolute time. It cleans up every process and mount it makes.
//!
//! 1. Workload: P processes each holding C established loopback TCP
//!    connections (both ends) and a listener.
//! 2. Listing: a cold walk of the mount (`find m -type f`) and `ls -l m/*/`
//!    against `ss -tanp`, `netstat -tanp`, `lsof -iTCP -n -P`, with a check
//!    that each saw the workload's sockets.
//! 3. Scaling: the walk at three workload sizes.
//! 4. Capture: one loopback TCP flow at full speed, once through
//!    `cat <socket file> > out.pcap`, once through `tcpdump -w` with the same
//!    filter: packets written against segments sent, drops, throughput, CPU;
//!    then through a cat of our own that times its reads and writes, to
//!    show where a reader's time goes.
//! 5. Latency: send() to readable from the stream, 1,000 small messages.
//! 6. Memory: the daemon's peak RSS after walking the big workload, and with
//!    10 streams running.
//! 7. Accuracy of a process's `all` and `tree` streams (see `accuracy.rs`):
//!    flows of 0.1 ms to 1 s, active and passive (two workers sharing
//!    sockets), a child, a neighbour; with kernel events and with
//!    `--no-kernel-events`, in one run. With `--check`, a packet of the
//!    neighbour (or, with events, of the child in `all`), a record twice, a
//!    row's recall under 99% with events, or, following /proc, an `all`
//!    under 99% for 10 ms flows, fails the run (the test suite runs
//!    `--quick --only accuracy --check`).
//! 8. Under load (see `load.rs`): redis-benchmark watched by nothing, by
//!    tcpdump, by `all`, by `all` and `tree`, alternated; completeness
//!    against tcpdump; an idle `all` beside a flood; idle streams' memory.

mod accuracy;
mod load;

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use testkit::Mount;

type Error = Box<dyn std::error::Error>;

// ---------------------------------------------------------------- workers

/// `bench --worker C`: a listener and C connections to it (both ends held),
/// "ready <port>" on stdout, then holds them until stdin closes.
fn worker(connections: usize) -> Result<(), Error> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    let mut held = Vec::with_capacity(connections * 2);
    for _ in 0..connections {
        held.push(TcpStream::connect(("127.0.0.1", port))?);
        held.push(listener.accept()?.0);
    }
    println!("ready {port}");
    std::io::stdout().flush()?;
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    drop(held);
    Ok(())
}

/// Reads `bytes` from `drain` on a thread of its own (or until the peer
/// closes); the thread's result is how many bytes arrived.
fn spawn_drain(mut drain: TcpStream, bytes: usize) -> std::thread::JoinHandle<usize> {
    std::thread::spawn(move || {
        let mut buffer = vec![0u8; 1 << 20];
        let mut total = 0;
        while total < bytes {
            match drain.read(&mut buffer) {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
        total
    })
}

/// `bench --timed-cat IN OUT [GATE]`: what `cat IN > OUT` does with a
/// socket file (1 MiB reads, its block size, each written out whole),
/// timing every call. Prints "reads <ms> writes <ms> full <count>": the
/// median time of a read that returned a whole MiB (the stream had it
/// queued) and of the write of that MiB. With GATE, it opens IN (which
/// starts the capture) and reads only once GATE exists.
fn timed_cat(input: &Path, output: &Path, gate: Option<&Path>) -> Result<(), Error> {
    let mut input = File::open(input)?;
    let mut output = File::create(output)?;
    if let Some(gate) = gate {
        wait_for_path(gate, Duration::from_secs(60))?;
    }
    let mut buffer = vec![0u8; 1 << 20];
    let (mut reads, mut writes) = (Vec::new(), Vec::new());
    loop {
        let started = Instant::now();
        let n = input.read(&mut buffer)?;
        let read = started.elapsed().as_secs_f64() * 1e3;
        if n == 0 {
            break;
        }
        let started = Instant::now();
        output.write_all(&buffer[..n])?;
        if n == buffer.len() {
            reads.push(read);
            writes.push(started.elapsed().as_secs_f64() * 1e3);
        }
    }
    println!(
        "reads {} writes {} full {}",
        median(&mut reads),
        median(&mut writes),
        reads.len()
    );
    Ok(())
}

/// `bench --flow`: a connected pair; "ready <sender local port> <receiver
/// port>"; on "send <bytes>" the sender writes that many bytes and closes,
/// the receiver drains; "done <seconds>" when the receiver has it all.
/// On "ping <count> <gap-us>" it sends small numbered messages.
fn flow() -> Result<(), Error> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let mut sender = TcpStream::connect(listener.local_addr()?)?;
    let (mut receiver, _) = listener.accept()?;
    sender.set_nodelay(true)?;
    println!(
        "ready {} {}",
        sender.local_addr()?.port(),
        listener.local_addr()?.port()
    );
    std::io::stdout().flush()?;
    let stdin = std::io::stdin();
    for line in stdin.lock().lines() {
        let line = line?;
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["send", bytes] => {
                let bytes: usize = bytes.parse()?;
                let reader = spawn_drain(receiver.try_clone()?, bytes);
                let started = Instant::now();
                let chunk = vec![b'x'; 256 * 1024];
                let mut left = bytes;
                while left > 0 {
                    let n = left.min(chunk.len());
                    sender.write_all(&chunk[..n])?;
                    left -= n;
                }
                let received = reader.join().map_err(|_| "reader panicked")?;
                println!("done {} {received}", started.elapsed().as_secs_f64());
            }
            ["pace", bytes, mib_per_second] => {
                // Sends `bytes` in 64 KiB writes at a steady rate.
                let (bytes, rate): (usize, f64) = (bytes.parse()?, mib_per_second.parse()?);
                let reader = spawn_drain(receiver.try_clone()?, bytes);
                let started = Instant::now();
                let chunk = vec![b'y'; 64 * 1024];
                let mut sent = 0;
                while sent < bytes {
                    let due =
                        started + Duration::from_secs_f64(sent as f64 / (rate * (1 << 20) as f64));
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    let n = (bytes - sent).min(chunk.len());
                    sender.write_all(&chunk[..n])?;
                    sent += n;
                }
                reader.join().map_err(|_| "reader panicked")?;
                println!("done {}", started.elapsed().as_secs_f64());
            }
            ["ping", count, gap_us] => {
                let (count, gap): (usize, u64) = (count.parse()?, gap_us.parse()?);
                let mut buffer = [0u8; 64];
                let mut sent_at = Vec::with_capacity(count);
                for i in 0..count {
                    let message = format!("m{i:06}");
                    sent_at.push(unix_nanos());
                    sender.write_all(message.as_bytes())?;
                    receiver.read_exact(&mut buffer[..message.len()])?;
                    std::thread::sleep(Duration::from_micros(gap));
                }
                let times: Vec<String> = sent_at.iter().map(u128::to_string).collect();
                println!("sent {}", times.join(","));
            }
            ["close"] => break,
            _ => println!("error unknown command"),
        }
        std::io::stdout().flush()?;
    }
    Ok(())
}

fn unix_nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

/// A child of this harness speaking the line protocol above.
struct Helper {
    child: Child,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
}

impl Helper {
    fn spawn(args: &[&str]) -> Result<Helper, Error> {
        let mut child = Command::new(std::env::current_exe()?)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let lines = BufReader::new(child.stdout.take().ok_or("no stdout")?).lines();
        Ok(Helper { child, lines })
    }

    fn read_line(&mut self) -> Result<String, Error> {
        Ok(self.lines.next().ok_or("helper ended")??)
    }

    fn send(&mut self, line: &str) -> Result<(), Error> {
        let stdin = self.child.stdin.as_mut().ok_or("no stdin")?;
        writeln!(stdin, "{line}")?;
        stdin.flush()?;
        Ok(())
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `--flow` helper and its sender's socket file on the mount.
struct Flow {
    helper: Helper,
    sender: u16,
    receiver: u16,
    file: PathBuf,
}

impl Flow {
    fn start(daemon: &Mount) -> Result<Flow, Error> {
        let mut helper = Helper::spawn(&["flow"])?;
        let ready = helper.read_line()?;
        let ports: Vec<u16> = ready
            .split_whitespace()
            .skip(1)
            .filter_map(|p| p.parse().ok())
            .collect();
        let [sender, receiver] = ports[..] else {
            return Err(format!("flow helper said {ready:?}").into());
        };
        let file = daemon
            .path
            .join(format!("{}_bench", helper.child.id()))
            .join(format!("tcp_127.0.0.1:{sender}_127.0.0.1:{receiver}"));
        wait_for_path(&file, Duration::from_secs(10))?;
        Ok(Flow {
            helper,
            sender,
            receiver,
            file,
        })
    }
}

fn wait_for_path(path: &Path, timeout: Duration) -> Result<(), Error> {
    let deadline = Instant::now() + timeout;
    while !path.exists() {
        if Instant::now() > deadline {
            return Err(format!("{} did not appear", path.display()).into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// P worker processes, all connected.
struct Workload {
    /// Held to keep the processes (and their sockets) alive.
    _workers: Vec<Helper>,
    ports: HashSet<u16>,
    processes: usize,
    connections: usize,
}

impl Workload {
    fn start(processes: usize, connections: usize) -> Result<Workload, Error> {
        let mut workers = Vec::with_capacity(processes);
        for _ in 0..processes {
            workers.push(Helper::spawn(&["worker", &connections.to_string()])?);
        }
        let mut ports = HashSet::new();
        for worker in &mut workers {
            let line = worker.read_line()?;
            let port = line
                .strip_prefix("ready ")
                .ok_or("worker failed")?
                .parse()?;
            ports.insert(port);
        }
        Ok(Workload {
            _workers: workers,
            ports,
            processes,
            connections,
        })
    }

    /// Sockets the workload holds: a listener and both ends of each
    /// connection, per process.
    fn sockets(&self) -> usize {
        self.processes * (2 * self.connections + 1)
    }

    fn label(&self) -> String {
        format!(
            "{}x{} ({} sockets)",
            self.processes,
            self.connections,
            self.sockets()
        )
    }
}

// ---------------------------------------------------------------- daemon

/// How long the daemon may take to log what a step awaits.
const LOG_WAIT: Duration = Duration::from_secs(10);

/// Mounts `binary` with `options` (the mount and its end are testkit's,
/// shared with the integration tests).
fn mount(binary: &Path, options: &[String]) -> Mount {
    let options: Vec<&str> = options.iter().map(String::as_str).collect();
    Mount::launch(binary, &[], None, &options)
}

/// CPU seconds used by finished children so far.
fn children_cpu_seconds() -> f64 {
    use nix::sys::resource::{UsageWho, getrusage};
    getrusage(UsageWho::RUSAGE_CHILDREN).map_or(0.0, |usage| {
        let seconds = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
        seconds(usage.user_time()) + seconds(usage.system_time())
    })
}

// ---------------------------------------------------------------- listing

/// One timed run of a shell command: (seconds, CPU seconds of the command,
/// its stdout).
fn timed(script: &str) -> Result<(f64, f64, String), Error> {
    let cpu_before = children_cpu_seconds();
    let started = Instant::now();
    let output = Command::new("sh").arg("-c").arg(script).output()?;
    let elapsed = started.elapsed().as_secs_f64();
    Ok((
        elapsed,
        children_cpu_seconds() - cpu_before,
        String::from_utf8_lossy(&output.stdout).into_owned(),
    ))
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// Counts the workload's sockets in a tool's output: lines (or file names)
/// naming one of its ports, as local or remote end, held by a process
/// (ss and netstat also list TIME_WAIT leftovers that no process holds).
fn count_workload_sockets(output: &str, ports: &HashSet<u16>, tool: &str) -> usize {
    let port_of = |end: &str| {
        end.rsplit(':')
            .next()
            .and_then(|p| p.trim_end_matches(']').parse::<u16>().ok())
    };
    output
        .lines()
        .filter(|line| match tool {
            "ss" => line.contains("users:"),
            "netstat" => !line.trim_end().ends_with('-'),
            _ => true,
        })
        .filter(|line| {
            let ends: Vec<&str> = match tool {
                "netstatfs" => line
                    .rsplit('/')
                    .next()
                    .unwrap_or("")
                    .split('_')
                    .skip(1)
                    .collect(),
                "ss" => line.split_whitespace().skip(3).take(2).collect(),
                "netstat" => line.split_whitespace().skip(3).take(2).collect(),
                "lsof" => line
                    .split_whitespace()
                    .find(|field| field.contains(':'))
                    .map(|name| name.split("->").collect())
                    .unwrap_or_default(),
                _ => Vec::new(),
            };
            ends.iter()
                .filter_map(|end| port_of(end))
                .any(|port| ports.contains(&port))
        })
        .count()
}

struct ToolRun {
    name: &'static str,
    script: String,
    seconds: Vec<f64>,
    cpu: Vec<f64>,
    counted: usize,
}

fn listing(
    daemon: &Mount,
    workload: &Workload,
    runs: usize,
    ttl: Duration,
) -> Result<Vec<ToolRun>, Error> {
    let m = daemon.path.display();
    let mut tools = vec![
        ToolRun {
            name: "netstatfs: find (cold)",
            script: format!("find {m} -type f"),
            seconds: vec![],
            cpu: vec![],
            counted: 0,
        },
        ToolRun {
            name: "netstatfs: ls -l m/*/ (cold)",
            script: format!("ls -l {m}/*/"),
            seconds: vec![],
            cpu: vec![],
            counted: 0,
        },
        ToolRun {
            name: "ss -tanp",
            script: "ss -tanp".into(),
            seconds: vec![],
            cpu: vec![],
            counted: 0,
        },
        ToolRun {
            name: "netstat -tanp",
            script: "netstat -tanp 2>/dev/null".into(),
            seconds: vec![],
            cpu: vec![],
            counted: 0,
        },
        ToolRun {
            name: "lsof -iTCP -n -P",
            script: "lsof -iTCP -n -P 2>/dev/null".into(),
            seconds: vec![],
            cpu: vec![],
            counted: 0,
        },
    ];
    for _ in 0..runs {
        for tool in &mut tools {
            let is_walk = tool.name.starts_with("netstatfs");
            if is_walk {
                // Cold: the snapshot and the kernel's cached entries expired.
                std::thread::sleep(ttl + Duration::from_millis(50));
            }
            let daemon_cpu = daemon.cpu_seconds();
            let (seconds, cpu, output) = timed(&tool.script)?;
            let cpu = if is_walk {
                cpu + daemon.cpu_seconds() - daemon_cpu
            } else {
                cpu
            };
            tool.seconds.push(seconds);
            tool.cpu.push(cpu);
            let kind = match tool.name {
                name if name.starts_with("netstatfs: find") => "netstatfs",
                name if name.starts_with("netstatfs") => "ls",
                "ss -tanp" => "ss",
                "netstat -tanp" => "netstat",
                _ => "lsof",
            };
            tool.counted = if kind == "ls" {
                output
                    .lines()
                    // Socket files; each directory's `all` is not a socket.
                    .filter(|line| line.starts_with('-') && !line.ends_with(" all"))
                    .count()
            } else {
                count_workload_sockets(&output, &workload.ports, kind)
            };
        }
    }
    Ok(tools)
}

// ---------------------------------------------------------------- capture

/// What writes the capture to out.pcap.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Capturer {
    /// `cat <socket file> > out.pcap`
    Cat,
    /// The same through `bench --timed-cat`, which times its reads and
    /// writes.
    TimedCat,
    /// `tcpdump -i any -w out.pcap <the socket's filter>`
    Tcpdump,
}

struct CaptureResult {
    name: &'static str,
    /// From `Capturer::TimedCat`: (read ms, write ms) per whole MiB.
    reader_steps: Option<(f64, f64)>,
    packets: u64,
    segments_sent: u64,
    dropped: String,
    seconds: f64,
    cpu: f64,
    bytes: usize,
}

impl CaptureResult {
    /// Packets written against segments sent.
    fn share(&self) -> f64 {
        self.packets as f64 / self.segments_sent.max(1) as f64
    }
}

/// Waits for a reader (a plain cat's output is empty) and returns what a
/// `bench --timed-cat` printed, if it was one.
fn finish_timed_cat(reader: &mut Child) -> Result<Option<(f64, f64)>, Error> {
    let mut said = String::new();
    if let Some(mut stdout) = reader.stdout.take() {
        stdout.read_to_string(&mut said)?;
    }
    reader.wait()?;
    Ok(parse_timed_cat(&said))
}

/// (read ms, write ms) from what `bench --timed-cat` printed.
fn parse_timed_cat(said: &str) -> Option<(f64, f64)> {
    let words: Vec<&str> = said.split_whitespace().collect();
    match words.as_slice() {
        ["reads", read, "writes", write, "full", full] if *full != "0" => {
            Some((read.parse().ok()?, write.parse().ok()?))
        }
        _ => None,
    }
}

fn tcp_out_segments() -> u64 {
    let snmp = std::fs::read_to_string("/proc/net/snmp").unwrap_or_default();
    let mut tcp = snmp.lines().filter(|line| line.starts_with("Tcp:"));
    let (Some(names), Some(values)) = (tcp.next(), tcp.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(name, _)| *name == "OutSegs")
        .and_then(|(_, value)| value.parse().ok())
        .unwrap_or(0)
}

fn count_pcap_packets(path: &Path) -> u64 {
    let Ok(mut capture) = pcap::Capture::from_file(path) else {
        return 0;
    };
    let mut packets = 0;
    while capture.next_packet().is_ok() {
        packets += 1;
    }
    packets
}

fn wait_for_text(path: &Path, text: &str, timeout: Duration) -> Result<(), Error> {
    let deadline = Instant::now() + timeout;
    while !std::fs::read_to_string(path)
        .unwrap_or_default()
        .contains(text)
    {
        if Instant::now() > deadline {
            return Err(format!("{text:?} did not appear in {}", path.display()).into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

fn capture_run(
    daemon: &Mount,
    scratch: &Path,
    volume: usize,
    capturer: Capturer,
) -> Result<CaptureResult, Error> {
    let with_tcpdump = capturer == Capturer::Tcpdump;
    let Flow {
        helper: mut flow,
        sender,
        receiver,
        file,
    } = Flow::start(daemon)?;
    let out = scratch.join("out.pcap");
    let _ = std::fs::remove_file(&out);
    let log_before = daemon.log().len();
    // The filter netstatfs writes for this socket, for tcpdump to use too.
    let filter = format!(
        "ip and tcp and ((src host 127.0.0.1 and src port {sender} and dst host 127.0.0.1 and dst port {receiver}) \
         or (src host 127.0.0.1 and src port {receiver} and dst host 127.0.0.1 and dst port {sender}))"
    );
    let tcpdump_err = scratch.join("tcpdump.err");
    let daemon_cpu = daemon.cpu_seconds();
    let cpu_before = children_cpu_seconds();
    let mut reader = if with_tcpdump {
        let child = Command::new("tcpdump")
            .args(["-i", "any", "-s", "262144", "-w"])
            .arg(&out)
            .arg(&filter)
            .stderr(File::create(&tcpdump_err)?)
            .spawn()?;
        wait_for_text(&tcpdump_err, "listening on", Duration::from_secs(10))?;
        child
    } else {
        let child = if capturer == Capturer::TimedCat {
            Command::new(std::env::current_exe()?)
                .arg("timed-cat")
                .args([&file, &out])
                .stdout(Stdio::piped())
                .spawn()?
        } else {
            Command::new("sh")
                .arg("-c")
                .arg(format!(
                    "exec cat '{}' > '{}'",
                    file.display(),
                    out.display()
                ))
                .spawn()?
        };
        daemon.wait_log(log_before, "capture running", LOG_WAIT)?;
        child
    };
    let segments_before = tcp_out_segments();
    flow.send(&format!("send {volume}"))?;
    let done = flow.read_line()?;
    let seconds: f64 = done
        .split_whitespace()
        .nth(1)
        .ok_or("flow failed")?
        .parse()?;
    let segments_sent = tcp_out_segments() - segments_before;
    // The helper lives on (reaped only at the end) so that its CPU, the
    // flow's own, stays out of the children's CPU counted below.
    flow.send("close")?;
    let mut reader_steps = None;
    let dropped = if with_tcpdump {
        std::thread::sleep(Duration::from_millis(500));
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(reader.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        )?;
        reader.wait()?;
        let err = std::fs::read_to_string(&tcpdump_err)?;
        err.lines()
            .find(|line| line.contains("dropped by kernel"))
            .and_then(|line| line.split_whitespace().next())
            .unwrap_or("?")
            .to_owned()
            + " by the kernel"
    } else {
        // The socket closed: the stream ends by itself.
        reader_steps = finish_timed_cat(&mut reader)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !daemon.log()[log_before..].contains("stream closed") && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let log = daemon.log();
        log[log_before..]
            .lines()
            .find(|line| line.contains("stream closed"))
            .and_then(|line| line.split("delivered, ").nth(1))
            .unwrap_or("?")
            .to_owned()
    };
    let cpu = children_cpu_seconds() - cpu_before
        + if with_tcpdump {
            0.0
        } else {
            daemon.cpu_seconds() - daemon_cpu
        };
    drop(flow);
    let packets = count_pcap_packets(&out);
    let bytes = std::fs::metadata(&out).map_or(0, |m| m.len() as usize);
    let _ = std::fs::remove_file(&out);
    Ok(CaptureResult {
        name: match capturer {
            Capturer::Cat => "cat <socket file> >",
            Capturer::TimedCat => "timed cat <socket file> >",
            Capturer::Tcpdump => "tcpdump -i any -w",
        },
        reader_steps,
        packets,
        segments_sent,
        dropped,
        seconds,
        cpu,
        bytes,
    })
}

/// The timed reader's (read ms, write ms) per MiB with no flow competing
/// for the cores: a daemon with room for the whole flow (`volume` bytes)
/// queues it first, and the reader starts once the flow is over.
fn quiet_reader_steps(
    binary: &Path,
    scratch: &Path,
    volume: usize,
) -> Result<Option<(f64, f64)>, Error> {
    let scratch = scratch.join("quiet");
    std::fs::create_dir_all(&scratch)?;
    let room = format!("{}MiB", (volume >> 20) * 2);
    let options = [
        "--cache-ttl",
        "500ms",
        "--buffer",
        &room,
        "--kernel-buffer",
        "32MiB",
    ]
    .map(str::to_owned);
    let daemon = mount(binary, &options);
    let Flow {
        helper: mut flow,
        file,
        ..
    } = Flow::start(&daemon)?;
    let gate = scratch.join("go");
    let mut reader = Command::new(std::env::current_exe()?)
        .arg("timed-cat")
        .args([&file, &scratch.join("out.pcap"), &gate])
        .stdout(Stdio::piped())
        .spawn()?;
    if let Err(err) = daemon.wait_log(0, "capture running", LOG_WAIT) {
        let _ = reader.kill();
        return Err(err.into());
    }
    flow.send(&format!("send {volume}"))?;
    flow.read_line()?;
    // The last kernel blocks reach the queue within milliseconds.
    std::thread::sleep(Duration::from_millis(500));
    File::create(&gate)?;
    flow.send("close")?;
    let steps = finish_timed_cat(&mut reader)?;
    let _ = std::fs::remove_file(scratch.join("out.pcap"));
    Ok(steps)
}

/// Where the time of a reader like cat goes: it reads a MiB from the socket
/// file, then writes it out, in turn, while the flow goes on; and the same
/// two steps with the flow over.
fn reader_steps_table(timed: &[CaptureResult], quiet: Option<(f64, f64)>, volume: usize) {
    let steps: Vec<(f64, f64)> = timed.iter().filter_map(|r| r.reader_steps).collect();
    if steps.is_empty() {
        println!("(the timed reader never read a whole MiB)\n");
        return;
    }
    let read = median(&mut steps.iter().map(|s| s.0).collect::<Vec<_>>());
    let write = median(&mut steps.iter().map(|s| s.1).collect::<Vec<_>>());
    let flow = median(
        &mut timed
            .iter()
            .map(|r| r.seconds * 1e3 / (volume >> 20) as f64)
            .collect::<Vec<_>>(),
    );
    let kept = median(&mut timed.iter().map(CaptureResult::share).collect::<Vec<_>>());
    println!(
        "### Where a reader's time goes ({} timed runs)\n",
        timed.len()
    );
    println!("| step | median ms per MiB |");
    println!("|---|---:|");
    println!("| read() from the socket file (the MiB already queued) | {read:.3} |");
    println!("| write() of that MiB to out.pcap | {write:.3} |");
    println!("| the flow sending a MiB | {flow:.3} |");
    if let Some((quiet_read, quiet_write)) = quiet {
        println!("| read() of a queued MiB, the flow over | {quiet_read:.3} |");
        println!("| write() of that MiB, the flow over | {quiet_write:.3} |");
    }
    println!(
        "\nA reader that reads and writes in turn at these speeds keeps up with about {:.2} \
         of the flow (the kernel ring and the stream's queue absorb a little more); these \
         runs kept {kept:.3} of the segments.",
        (flow / (read + write)).min(1.0)
    );
    if let Some((quiet_read, quiet_write)) = quiet {
        println!(
            "With the cores to itself, the same reader would keep up with about {:.2} of it.",
            (flow / (quiet_read + quiet_write)).min(1.0)
        );
    }
    println!();
}

// ---------------------------------------------------------------- latency

/// send() to readable from the stream, for `count` small messages.
fn latency(daemon: &Mount, count: usize) -> Result<(f64, f64, f64), Error> {
    let (p50, p99, received, _) = trickle(daemon, count, 2000, None)?;
    Ok((p50, p99, received))
}

/// A trickle of `count` messages `gap_us` apart, the daemon stopped
/// (SIGSTOP) for `stall` a second into it: the messages seen, and what the
/// stream's closing line said.
fn stalled(
    daemon: &Mount,
    count: usize,
    gap_us: u64,
    stall: Duration,
) -> Result<(f64, String), Error> {
    let since = daemon.log().len();
    let (_, _, received, _) = trickle(daemon, count, gap_us, Some(stall))?;
    let closing = (0..200)
        .find_map(|_| {
            let log = daemon.log();
            let line = log
                .get(since..)
                .unwrap_or_default()
                .lines()
                .find(|line| line.contains("stream closed"))
                .map(|line| {
                    line.split_once(": stream closed: ")
                        .map_or(line, |(_, said)| said)
                        .to_owned()
                });
            if line.is_none() {
                std::thread::sleep(Duration::from_millis(50));
            }
            line
        })
        .unwrap_or_else(|| "(no closing line)".to_owned());
    Ok((received, closing))
}

/// Sends the messages, the daemon stopped for `stall` a second in if
/// given; the delays' p50 and p99 (ms), the messages seen, and how many
/// were sent.
fn trickle(
    daemon: &Mount,
    count: usize,
    gap_us: u64,
    stall: Option<Duration>,
) -> Result<(f64, f64, f64, usize), Error> {
    let Flow {
        helper: mut flow,
        file,
        ..
    } = Flow::start(daemon)?;
    let arrivals: Arc<Mutex<Vec<(usize, u128)>>> = Arc::default();
    let mut stream = File::open(&file)?;
    let seen = Arc::clone(&arrivals);
    let reader = std::thread::spawn(move || {
        let mut buffer = vec![0u8; 128 * 1024];
        let mut pending: Vec<u8> = Vec::new();
        while let Ok(n) = stream.read(&mut buffer) {
            if n == 0 {
                break;
            }
            let now = unix_nanos();
            pending.extend_from_slice(&buffer[..n]);
            // Each message "mNNNNNN" appears once in the client→server
            // direction: find them in what has been read.
            let mut from = 0;
            while let Some(at) = pending[from..]
                .windows(7)
                .position(|w| w[0] == b'm' && w[1..].iter().all(u8::is_ascii_digit))
            {
                let start = from + at;
                if let Ok(index) = std::str::from_utf8(&pending[start + 1..start + 7])
                    .unwrap_or("x")
                    .parse::<usize>()
                {
                    seen.lock().unwrap().push((index, now));
                }
                from = start + 7;
            }
            pending.drain(..from.min(pending.len()));
        }
    });
    std::thread::sleep(Duration::from_millis(200));
    let stopper = stall.map(|stall| {
        let pid = nix::unistd::Pid::from_raw(daemon.pid() as i32);
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(1));
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP);
            std::thread::sleep(stall);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT);
        })
    });
    flow.send(&format!("ping {count} {gap_us}"))?;
    let sent = flow.read_line()?;
    if let Some(stopper) = stopper {
        let _ = stopper.join();
    }
    let sent_at: Vec<u128> = sent
        .strip_prefix("sent ")
        .ok_or("ping failed")?
        .split(',')
        .filter_map(|t| t.parse().ok())
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    flow.send("close")?;
    drop(flow);
    let _ = reader.join();
    let arrivals = arrivals.lock().unwrap();
    let mut delays: Vec<f64> = arrivals
        .iter()
        .filter_map(|&(index, at)| {
            sent_at
                .get(index)
                .map(|&sent| (at.saturating_sub(sent)) as f64 / 1e6)
        })
        .collect();
    let received = delays.len() as f64;
    delays.sort_by(f64::total_cmp);
    let at = |q: f64| {
        delays
            .get(((delays.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    Ok((at(0.5), at(0.99), received, sent_at.len()))
}

/// Ten streams read by cat while their connections carry `command`
/// ("send <bytes>" at full speed, or "pace <bytes> <MiB/s>"); the highest
/// RSS of the daemon seen meanwhile.
fn memory_with_streams(daemon: &Mount, command: &str) -> Result<u64, Error> {
    let mut flows = Vec::new();
    let mut readers = Vec::new();
    for _ in 0..10 {
        let Flow {
            helper: flow, file, ..
        } = Flow::start(daemon)?;
        readers.push(
            Command::new("sh")
                .arg("-c")
                .arg(format!("exec cat '{}' > /dev/null", file.display()))
                .spawn()?,
        );
        flows.push(flow);
    }
    std::thread::sleep(Duration::from_millis(300));
    for flow in &mut flows {
        flow.send(command)?;
    }
    // Sample the RSS while the flows run.
    let sampling = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let pid = daemon.pid();
    let sampler = {
        let sampling = Arc::clone(&sampling);
        std::thread::spawn(move || {
            let mut peak = 0;
            while sampling.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(testkit::process::rss_kib(pid).0);
                std::thread::sleep(Duration::from_millis(20));
            }
            peak
        })
    };
    for flow in &mut flows {
        flow.read_line()?;
    }
    sampling.store(false, std::sync::atomic::Ordering::Relaxed);
    let peak = sampler.join().map_err(|_| "sampler panicked")?;
    for flow in &mut flows {
        flow.send("close")?;
    }
    drop(flows);
    for mut reader in readers {
        let _ = reader.wait();
    }
    Ok(peak.max(daemon.rss_kib().0))
}

/// What the daemon costs at one moment: threads, resident MiB, CPU over
/// the next `window`, and root's `ls -l` of every process directory.
struct Cost {
    threads: u64,
    rss_mib: f64,
    cpu_per_second: f64,
    ls_seconds: f64,
}

fn cost_now(daemon: &Mount, runs: usize, ttl: Duration, window: Duration) -> Result<Cost, Error> {
    let threads = testkit::process::threads(daemon.pid());
    let before = daemon.cpu_seconds();
    std::thread::sleep(window);
    let cpu_per_second = (daemon.cpu_seconds() - before) / window.as_secs_f64();
    let mut ls = Vec::new();
    for _ in 0..runs {
        // Cold: the snapshot and the kernel's cached entries expired.
        std::thread::sleep(ttl + Duration::from_millis(50));
        ls.push(timed(&format!("ls -l {}/*/ > /dev/null", daemon.path.display()))?.0);
    }
    Ok(Cost {
        threads,
        rss_mib: daemon.rss_kib().0 as f64 / 1024.0,
        cpu_per_second,
        ls_seconds: median(&mut ls),
    })
}

/// The daemon idle, then with `streams` streams of one busy socket (10
/// MiB/s) held open and never read, as one user at the per-user limit
/// would: (idle, loaded).
fn streams_held(
    daemon: &Mount,
    streams: usize,
    runs: usize,
    ttl: Duration,
) -> Result<(Cost, Cost), Error> {
    let Flow {
        helper: mut flow,
        file,
        ..
    } = Flow::start(daemon)?;
    let window = Duration::from_secs(2);
    let idle = cost_now(daemon, runs, ttl, window)?;
    let held: Vec<File> = (0..streams)
        .map(|_| File::open(&file))
        .collect::<Result<_, _>>()?;
    flow.send(&format!("pace {} 10", 200usize << 20))?;
    std::thread::sleep(Duration::from_secs(1));
    let loaded = cost_now(daemon, runs, ttl, window)?;
    drop(held);
    flow.send("close")?;
    Ok((idle, loaded))
}

// ---------------------------------------------------------------- report

/// The harness's command line.
#[derive(clap::Parser)]
#[command(
    name = "bench",
    about = "netstatfs side by side with ss, netstat, lsof and tcpdump, on the same workload in one run"
)]
struct Args {
    /// The netstatfs binary to measure.
    #[arg(long, value_name = "PATH", default_value = "target/release/netstatfs")]
    netstatfs: PathBuf,
    /// Fewer runs and smaller workloads (what the test suite runs).
    #[arg(long)]
    quick: bool,
    /// Run only these sections (comma-separated); all by default.
    #[arg(long, value_enum, value_delimiter = ',', value_name = "SECTION,...")]
    only: Vec<Section>,
    /// Mount netstatfs with these options too, to compare settings
    /// ('--kernel-buffer 8MiB ...').
    #[arg(long, value_name = "OPTIONS", allow_hyphen_values = true)]
    daemon_args: Option<String>,
    /// Fail the run where the accuracy of `all` and `tree` falls short.
    #[arg(long)]
    check: bool,
    /// Rounds of the load section (each runs the five ways of watching
    /// once); 9 by default, 2 with --quick. A round's requests a second
    /// move by a tenth on this kind of machine: the median of many rounds
    /// is what compares.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    rounds: Option<u32>,
    /// Keep the daemons' debug logs in this directory (`daemon.log`, and
    /// `following-proc.log` for the accuracy section's second daemon), to
    /// look into what a run missed.
    #[arg(long, value_name = "DIR")]
    keep_logs: Option<PathBuf>,
    /// What a child of the harness runs (the harness starts them itself).
    #[command(subcommand)]
    helper: Option<HelperRole>,
}

/// The sections of a run, in the order they print.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Section {
    Listing,
    Memory,
    Streams,
    Diagnostics,
    Capture,
    Latency,
    Accuracy,
    Load,
}

/// The harness's own children: each speaks the line protocol of [`Helper`].
#[derive(clap::Subcommand)]
enum HelperRole {
    /// A listener and CONNECTIONS connections to it, held.
    #[command(hide = true)]
    Worker { connections: usize },
    /// One loopback TCP flow, sent on command.
    #[command(hide = true)]
    Flow,
    /// A cat that times its reads and writes.
    #[command(hide = true)]
    TimedCat {
        input: PathBuf,
        output: PathBuf,
        gate: Option<PathBuf>,
    },
    /// The accuracy run's echo server.
    #[command(hide = true)]
    AccuracyServer,
    /// The accuracy run's target, child or neighbour.
    #[command(hide = true)]
    AccuracyClient {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The accuracy run's ground truth capture.
    #[command(hide = true)]
    AccuracyTruth {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The accuracy run's dialer of the shared workers.
    #[command(hide = true)]
    AccuracyDialer {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The load run's parent of redis-benchmark.
    #[command(hide = true)]
    LoadClient {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The load run's UDP flood.
    #[command(hide = true)]
    Flood {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> Result<(), Error> {
    let args = <Args as clap::Parser>::parse();
    match args.helper {
        Some(HelperRole::Worker { connections }) => return worker(connections),
        Some(HelperRole::Flow) => {
            std::fs::write("/proc/self/comm", "bench")?;
            return flow();
        }
        Some(HelperRole::TimedCat {
            input,
            output,
            gate,
        }) => return timed_cat(&input, &output, gate.as_deref()),
        Some(HelperRole::AccuracyServer) => return accuracy::server(),
        Some(HelperRole::AccuracyClient { args }) => return accuracy::client(&args),
        Some(HelperRole::AccuracyTruth { args }) => return accuracy::truth(&args),
        Some(HelperRole::AccuracyDialer { args }) => return accuracy::dialer(&args),
        Some(HelperRole::LoadClient { args }) => return load::client(&args),
        Some(HelperRole::Flood { args }) => return load::flood(&args),
        None => {}
    }
    let daemon_args: Vec<String> = args
        .daemon_args
        .iter()
        .flat_map(|list| list.split_whitespace().map(str::to_owned))
        .collect();
    raise_fd_limit();
    let scratch = testkit::ScratchDir::new("bench");
    run(&args, &daemon_args, &scratch.0)
}

/// Copies a daemon's log to `dir/name`, where logs are kept.
fn keep_log(daemon: &Mount, dir: Option<&Path>, name: &str) -> Result<(), Error> {
    if let Some(dir) = dir {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join(name), daemon.log())?;
    }
    Ok(())
}

fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

fn run(args: &Args, daemon_args: &[String], scratch: &Path) -> Result<(), Error> {
    let (binary, quick, only, check) = (&args.netstatfs, args.quick, &args.only, args.check);
    let keep_logs = args.keep_logs.as_deref();
    let load_rounds = args
        .rounds
        .map_or(if quick { 2 } else { 9 }, |rounds| rounds as usize);
    let wanted = |section: Section| only.is_empty() || only.contains(&section);
    let ttl = Duration::from_millis(500);
    let mut options = vec!["--cache-ttl".to_owned(), "500ms".to_owned()];
    options.extend_from_slice(daemon_args);
    let daemon = mount(binary, &options);
    let runs = if quick { 3 } else { 7 };
    let sizes: &[(usize, usize)] = if quick {
        &[(10, 5), (20, 10), (40, 10)]
    } else {
        &[(10, 10), (50, 20), (200, 25)]
    };

    println!("# netstatfs benchmarks\n");
    println!(
        "Machine: {} cores, {}, kernel {}",
        cores(),
        memory(),
        kernel()
    );
    println!("netstatfs options: {}", options.join(" "));
    println!(
        "Medians of {runs} alternating runs; ratios are to netstatfs's cold walk in the same run.\n"
    );

    // Listing at each size; the full comparison at the largest.
    let mut scaling = Vec::new();
    let mut walked_peak_kib = 0;
    let sizes = if wanted(Section::Listing) || wanted(Section::Memory) {
        sizes
    } else {
        &[]
    };
    for (index, &(processes, connections)) in sizes.iter().enumerate() {
        let workload = Workload::start(processes, connections)?;
        let tools = listing(&daemon, &workload, runs, ttl)?;
        scaling.push((
            workload.label(),
            workload.sockets(),
            workload.processes,
            median(&mut tools[0].seconds.clone()),
        ));
        walked_peak_kib = daemon.rss_kib().1;
        if index + 1 == sizes.len() {
            println!("## Listing, workload {}\n", workload.label());
            println!(
                "| tool | median s | ratio to netstatfs walk | CPU s | workload sockets seen |"
            );
            println!("|---|---:|---:|---:|---:|");
            let base = median(&mut tools[0].seconds.clone());
            for tool in &tools {
                let seconds = median(&mut tool.seconds.clone());
                let cpu = median(&mut tool.cpu.clone());
                let expected = workload.sockets();
                let mark = if tool.counted == expected { "" } else { " (!)" };
                println!(
                    "| {} | {seconds:.3} | {:.2}x | {cpu:.3} | {} of {expected}{mark} |",
                    tool.name,
                    seconds / base,
                    tool.counted
                );
            }
            println!();
        }
    }

    if !scaling.is_empty() {
        println!("## Scaling of the cold walk\n");
        println!("| workload | sockets | processes | median s | s per 1,000 sockets |");
        println!("|---|---:|---:|---:|---:|");
        for (label, sockets, processes, walk) in &scaling {
            println!(
                "| {label} | {sockets} | {processes} | {walk:.3} | {:.4} |",
                walk / *sockets as f64 * 1000.0
            );
        }
        println!();
    }

    if wanted(Section::Streams) {
        let streams = 32;
        let (idle, loaded) = streams_held(&daemon, streams, runs, ttl)?;
        println!("## One user at the stream limit\n");
        println!(
            "{streams} streams (`--max-streams-per-user`'s default) of one socket carrying 10 MiB/s, \
             opened and never read, against the same daemon idle, in one run.\n"
        );
        println!("| | idle | {streams} unread streams | ratio |");
        println!("|---|---:|---:|---:|");
        let rows = [
            (
                "daemon threads",
                idle.threads as f64,
                loaded.threads as f64,
                0,
            ),
            ("daemon RSS MiB", idle.rss_mib, loaded.rss_mib, 1),
            (
                "daemon CPU (cores)",
                idle.cpu_per_second,
                loaded.cpu_per_second,
                3,
            ),
            (
                "root's ls -l m/*/ (s, median)",
                idle.ls_seconds,
                loaded.ls_seconds,
                3,
            ),
        ];
        for (label, before, after, digits) in rows {
            let ratio = if before > 1e-3 {
                format!("{:.2}x", after / before)
            } else {
                "–".to_owned()
            };
            println!("| {label} | {before:.digits$} | {after:.digits$} | {ratio} |");
        }
        println!();
    }

    if wanted(Section::Diagnostics) {
        // What the kernel knows of every socket: getfattr -d on every
        // socket file against ss -tinm, on a workload of about 5,000.
        let (processes, connections) = if quick { (20, 10) } else { (100, 25) };
        let workload = Workload::start(processes, connections)?;
        let m = daemon.path.display();
        // The mount lists the whole workload before anything is timed.
        let deadline = Instant::now() + Duration::from_secs(60);
        while timed(&format!("find {m} -mindepth 2 -name 'tcp_*' | wc -l"))?
            .2
            .trim()
            .parse::<usize>()
            .unwrap_or(0)
            < workload.sockets()
        {
            if Instant::now() > deadline {
                return Err("the mount did not list the workload".into());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let every_file =
            format!("find {m} -mindepth 2 -type f ! -name all ! -name tree -print0 | xargs -0");
        let scripts = [
            (
                "getfattr -d on every socket file (all 50 attributes)",
                format!("{every_file} getfattr -d --absolute-names 2>/dev/null | grep -c tcp.rtt="),
            ),
            (
                "getfattr -n user.netstatfs.tcp.rtt on every socket file",
                format!(
                    "{every_file} getfattr -n user.netstatfs.tcp.rtt --absolute-names 2>/dev/null \
                     | grep -c tcp.rtt="
                ),
            ),
            ("ss -tinm", "ss -tinmH | grep -c rtt:".to_owned()),
        ];
        let mut seconds = [Vec::new(), Vec::new(), Vec::new()];
        let mut counted = [0usize; 3];
        for _ in 0..runs {
            for (index, (_, script)) in scripts.iter().enumerate() {
                let daemon_cpu = daemon.cpu_seconds();
                let (elapsed, _, output) = timed(script)?;
                let _ = daemon.cpu_seconds() - daemon_cpu;
                seconds[index].push(elapsed);
                counted[index] = output.trim().parse().unwrap_or(0);
            }
        }
        println!(
            "## Kernel attributes of every socket, workload {}\n",
            workload.label()
        );
        println!("| tool | median s | ratio to ss | sockets with an rtt |");
        println!("|---|---:|---:|---:|");
        let base = median(&mut seconds[2].clone());
        for (index, (name, _)) in scripts.iter().enumerate() {
            let value = median(&mut seconds[index].clone());
            println!(
                "| {name} | {value:.3} | {:.2}x | {} |",
                value / base,
                counted[index]
            );
        }
        println!();
    }

    if wanted(Section::Capture) {
        // Capture.
        let volume = if quick { 128 << 20 } else { 1 << 30 };
        println!(
            "## Capture: one loopback TCP flow of {} MiB\n",
            volume >> 20
        );
        println!(
            "| capturing with | packets written | segments sent | written/sent | dropped | flow MiB/s | CPU s |"
        );
        println!("|---|---:|---:|---:|---|---:|---:|");
        let mut captured = Vec::new();
        let rounds = if quick { 2 } else { 5 };
        for capturer in [Capturer::Cat, Capturer::Tcpdump].repeat(rounds) {
            captured.push(capture_run(&daemon, scratch, volume, capturer)?);
        }
        let mut timed = Vec::new();
        for _ in 0..rounds {
            timed.push(capture_run(&daemon, scratch, volume, Capturer::TimedCat)?);
        }
        for result in &captured {
            println!(
                "| {} | {} | {} | {:.3} | {} | {:.0} | {:.2} |",
                result.name,
                result.packets,
                result.segments_sent,
                result.share(),
                result.dropped,
                volume as f64 / (1 << 20) as f64 / result.seconds,
                result.cpu
            );
            let _ = result.bytes;
        }
        let ours: Vec<&CaptureResult> = captured
            .iter()
            .filter(|r| r.name.starts_with("cat"))
            .collect();
        let theirs: Vec<&CaptureResult> = captured
            .iter()
            .filter(|r| r.name.starts_with("tcpdump"))
            .collect();
        let cpu_ratio = median(&mut ours.iter().map(|r| r.cpu).collect::<Vec<_>>())
            / median(&mut theirs.iter().map(|r| r.cpu).collect::<Vec<_>>());
        let share = |runs: &[&CaptureResult]| {
            median(&mut runs.iter().map(|r| r.share()).collect::<Vec<_>>())
        };
        println!(
            "\nCPU of netstatfs + cat against tcpdump: {cpu_ratio:.2}x; share kept: {:.3} against {:.3}\n",
            share(&ours),
            share(&theirs)
        );
        let quiet = quiet_reader_steps(binary, scratch, if quick { 64 << 20 } else { 128 << 20 })?;
        reader_steps_table(&timed, quiet, volume);
    }

    if wanted(Section::Latency) {
        let (p50, p99, received) = latency(&daemon, 1000)?;
        println!("## Latency: send() to readable from the stream, 1,000 messages\n");
        println!("| p50 ms | p99 ms | messages seen |");
        println!("|---:|---:|---:|");
        println!("| {p50:.3} | {p99:.3} | {received} |\n");
        println!(
            "A trickle of 3,000 messages at 1,000 a second, the daemon stopped (SIGSTOP) a \
             second into it, as a starved machine would stall it:\n"
        );
        println!("| daemon stopped | messages seen of 3000 | the stream's closing line |");
        println!("|---:|---:|---|");
        for stall in [Duration::from_millis(200), Duration::from_secs(1)] {
            let (received, closing) = stalled(&daemon, 3000, 1000, stall)?;
            println!("| {} ms | {received} | {closing} |", stall.as_millis());
        }
        println!();
    }

    if wanted(Section::Memory) {
        let steady = memory_with_streams(&daemon, &format!("pace {} 20", 40 << 20))?;
        let flooded = memory_with_streams(&daemon, &format!("send {}", 256 << 20))?;
        println!("## Memory of the daemon (peak RSS)\n");
        println!("| case | RSS MiB |");
        println!("|---|---:|");
        println!(
            "| after walking {} | {:.1} |",
            scaling.last().map_or("", |s| s.0.as_str()),
            walked_peak_kib as f64 / 1024.0
        );
        println!(
            "| 10 streams running, 20 MiB/s each | {:.1} |",
            steady as f64 / 1024.0
        );
        println!(
            "| 10 streams, each flooded at full speed (every queue and ring full) | {:.1} |",
            flooded as f64 / 1024.0
        );
        println!();
    }
    if wanted(Section::Load) {
        load::measure(&daemon, scratch, quick, load_rounds)?;
    }

    if wanted(Section::Accuracy) {
        // Enough flows in the quick run that one flow is under 1% of a row.
        let count = if quick { 150 } else { 250 };
        let report = accuracy::measure(&daemon, "kernel events", scratch, count)?;
        // The same run against a daemon that follows /proc only: what a
        // host without tracefs or CAP_PERFMON gets.
        let fallback_scratch = scratch.join("fallback");
        std::fs::create_dir_all(&fallback_scratch)?;
        let mut fallback_options = options.clone();
        fallback_options.push("--no-kernel-events".to_owned());
        let fallback = {
            let fallback_daemon = mount(binary, &fallback_options);
            let measured = accuracy::measure(
                &fallback_daemon,
                "following /proc",
                &fallback_scratch,
                count,
            )?;
            keep_log(&fallback_daemon, keep_logs, "following-proc.log")?;
            measured
        };
        keep_log(&daemon, keep_logs, "daemon.log")?;
        println!("## Accuracy of a process's `all` and `tree` streams\n");
        println!(
            "The target makes {count} flows of each kind to an echo server (active) and, with a \
             child it forked, serves as many on a TCP listener and a UDP socket the two share, as \
             prefork workers do (passive: the flows a dialer makes to them, each owned by the worker \
             that accepted or received it); the child makes as many flows of its own; a neighbour \
             process talks to the same echo server meanwhile. Recall of the target's `all` over the \
             target's flows, and of its `tree` over the target's and the child's, with kernel events \
             (the default) and with `--no-kernel-events` (following /proc only), in one run.\n"
        );
        println!(
            "| flows | `all`, kernel events | `tree`, kernel events | `all`, following /proc | `tree`, following /proc |"
        );
        println!("|---|---:|---:|---:|---:|");
        let shown = |recall: Option<f64>| recall.map_or("–".to_owned(), |r| format!("{r:.3}"));
        for (row, fallback_row) in report.rows.iter().zip(&fallback.rows) {
            println!(
                "| {} | {} | {} | {} | {} |",
                row.label,
                shown(row.all),
                shown(row.tree),
                shown(fallback_row.all),
                shown(fallback_row.tree)
            );
        }
        println!(
            "| daemon CPU seconds over the run ({:.1} s, {:.1} s) | {:.2} | | {:.2} | |",
            report.seconds, fallback.seconds, report.cpu, fallback.cpu
        );
        println!(
            "\nPackets of another process in the target's streams, with kernel events: the neighbour's \
             {} in `all` and {} in `tree`, the child's {} in `all`. Following /proc: {}, {} and {} (a \
             socket shared by two processes is both's to /proc). Records seen twice: {} and {}.\n",
            report.neighbour_in_all,
            report.neighbour_in_tree,
            report.child_in_all,
            fallback.neighbour_in_all,
            fallback.neighbour_in_tree,
            fallback.child_in_all,
            report.duplicates,
            fallback.duplicates
        );
        let low = |recall: Option<f64>| recall.is_some_and(|r| r < 0.99);
        // Every target missed, named, so that a failed check says which.
        let mut missed = Vec::new();
        if report.neighbour_in_all + report.neighbour_in_tree + report.child_in_all > 0 {
            missed.push("another process's packets in a stream, with kernel events".to_owned());
        }
        if fallback.neighbour_in_all + fallback.neighbour_in_tree > 0 {
            missed.push("the neighbour's packets in a stream, following /proc".to_owned());
        }
        if report.duplicates + fallback.duplicates > 0 {
            missed.push("records seen twice".to_owned());
        }
        for row in &report.rows {
            if low(row.all) || low(row.tree) {
                missed.push(format!(
                    "recall under 0.99 with kernel events: {}",
                    row.label
                ));
            }
        }
        for row in fallback.rows.iter().filter(|row| row.long) {
            if low(row.all) {
                missed.push(format!(
                    "`all` recall under 0.99 following /proc: {}",
                    row.label
                ));
            }
        }
        if check && !missed.is_empty() {
            return Err(format!("accuracy below target: {}", missed.join("; ")).into());
        }
    }
    Ok(())
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn memory() -> String {
    use procfs::Current;
    procfs::Meminfo::current().map_or_else(
        |_| "? GiB RAM".into(),
        |meminfo| {
            format!(
                "{:.0} GiB RAM",
                meminfo.mem_total as f64 / (1u64 << 30) as f64
            )
        },
    )
}

fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned()
}
