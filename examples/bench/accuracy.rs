//! How accurately a process's `all` and `tree` streams follow it.
//!
//! The processes, all on loopback:
//! - an echo server (TCP and UDP);
//! - the target: its own flows to the echo server (active), and, with the
//!   child it forks, two workers sharing one TCP listener and one UDP
//!   socket, as a prefork server's workers do (passive);
//! - the target's child: flows of its own to the echo server, and its share
//!   of the passive flows;
//! - a neighbour making flows to the same echo server ports;
//! - a dialer making the passive flows to the workers' sockets.
//!
//! Each flow lives 0.1 ms (send and close), 1 ms (one exchange), 10 ms or
//! 1 s (two exchanges that far apart). Then the target makes the patterns
//! that once went unseen: a UDP socket that only receives (one bound to the
//! wildcard, one to 127.0.0.1; the dialer sends to them and is never
//! answered), a client reconnecting again and again from one local port,
//! and bursts of datagrams to 200 destinations. Every process reports its flows
//! (ports, start, end), the workers which connections and datagrams each
//! served. The ground truth is this harness's own capture of all the ports
//! involved; each packet goes to the flow that had its ports at its time.
//!
//! Measured: recall (the share of a flow's packets the stream holds) of the
//! target's `all` over the target's flows and of its `tree` over the
//! target's and the child's; packets of anyone else in either (the
//! neighbour's, and in `all` the child's: precision); records twice; the
//! daemon's CPU over the run.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{Error, Helper, unix_nanos, wait_for_path};
use testkit::Mount;

/// How long a flow lives.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Lifetime {
    /// Send, then close at once (no reply awaited).
    Tenth,
    /// One exchange.
    Milli,
    /// Two exchanges 10 ms apart.
    Ten,
    /// Two exchanges 1 s apart.
    Second,
}

impl Lifetime {
    const ALL: [Lifetime; 4] = [
        Lifetime::Tenth,
        Lifetime::Milli,
        Lifetime::Ten,
        Lifetime::Second,
    ];

    fn name(self) -> &'static str {
        match self {
            Lifetime::Tenth => "0.1ms",
            Lifetime::Milli => "1ms",
            Lifetime::Ten => "10ms",
            Lifetime::Second => "1s",
        }
    }

    fn parse(text: &str) -> Option<Lifetime> {
        Lifetime::ALL.into_iter().find(|l| l.name() == text)
    }

    fn label(self) -> &'static str {
        match self {
            Lifetime::Tenth => "about 0.1 ms",
            Lifetime::Milli => "under 1 ms",
            Lifetime::Ten => "10 ms",
            Lifetime::Second => "1 s",
        }
    }

    /// The pause between the two exchanges, for those that have two.
    fn pause(self) -> Option<Duration> {
        match self {
            Lifetime::Tenth | Lifetime::Milli => None,
            Lifetime::Ten => Some(Duration::from_millis(10)),
            Lifetime::Second => Some(Duration::from_secs(1)),
        }
    }
}

/// Who makes, or serves, a flow.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Role {
    Target,
    Child,
    Neighbour,
    Dialer,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Target => "target",
            Role::Child => "child",
            Role::Neighbour => "neighbour",
            Role::Dialer => "dialer",
        }
    }

    fn parse(text: &str) -> Option<Role> {
        [Role::Target, Role::Child, Role::Neighbour, Role::Dialer]
            .into_iter()
            .find(|role| role.name() == text)
    }

    fn comm(self) -> &'static str {
        match self {
            Role::Target => "bench",
            Role::Child => "bench-child",
            Role::Neighbour => "bench-other",
            Role::Dialer => "bench-dialer",
        }
    }
}

/// Which kind of traffic a flow is part of.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Pattern {
    /// The flows of each lifetime, protocol and side.
    Standard,
    /// A datagram to a UDP socket that only receives, bound to the
    /// wildcard address or to 127.0.0.1.
    ReceivedWildcard,
    ReceivedExact,
    /// One of many connections from one local port, each reset at its end.
    Reconnect,
    /// One of a burst of datagrams to 200 destinations.
    Burst,
}

/// Destinations of one burst.
const BURST_DESTINATIONS: u8 = 200;

/// `bench --accuracy-server`: TCP and UDP echo on loopback.
pub fn server() -> Result<(), Error> {
    let tcp = listener_with_room()?;
    let udp = UdpSocket::bind("127.0.0.1:0")?;
    println!(
        "ready {} {}",
        tcp.local_addr()?.port(),
        udp.local_addr()?.port()
    );
    std::io::stdout().flush()?;
    std::thread::spawn(move || echo_udp(&udp, |_, _, _| {}));
    std::thread::spawn(move || echo_tcp(&tcp, |_, _, _| {}));
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    Ok(())
}

/// A loopback listener whose accept queue holds a burst of connects: at
/// std's 128 a saturated machine overflows it, and a dropped SYN is resent
/// a second later, outside what the run measures.
fn listener_with_room() -> Result<TcpListener, Error> {
    use nix::sys::socket::{
        AddressFamily, Backlog, SockFlag, SockType, SockaddrIn, bind, listen, socket,
    };
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    bind(fd.as_raw_fd(), &SockaddrIn::new(127, 0, 0, 1, 0))?;
    listen(&fd, Backlog::new(4096)?)?;
    Ok(TcpListener::from(fd))
}

/// Echoes datagrams, telling `served(client port, received, sent)`.
fn echo_udp(socket: &UdpSocket, served: impl Fn(u16, u128, u128)) {
    // Room for the bursts of a loaded run (the default holds a few hundred).
    let _ = nix::sys::socket::setsockopt(socket, nix::sys::socket::sockopt::RcvBuf, &(8 << 20));
    let mut buffer = [0u8; 2048];
    while let Ok((n, from)) = socket.recv_from(&mut buffer) {
        let received = unix_nanos();
        let _ = socket.send_to(&buffer[..n], from);
        served(from.port(), received, unix_nanos());
    }
}

/// Echoes each accepted connection on a thread of its own, telling
/// `served(client port, accepted, ended)` when it ends.
fn echo_tcp(listener: &TcpListener, served: impl Fn(u16, u128, u128) + Clone + Send + 'static) {
    for stream in listener.incoming().flatten() {
        let accepted = unix_nanos();
        let served = served.clone();
        std::thread::spawn(move || {
            let mut stream = stream;
            let port = stream.peer_addr().map_or(0, |peer| peer.port());
            let mut buffer = [0u8; 2048];
            while let Ok(n) = stream.read(&mut buffer) {
                if n == 0 || stream.write_all(&buffer[..n]).is_err() {
                    break;
                }
            }
            served(port, accepted, unix_nanos());
        });
    }
}

/// Reports for the harness, from any thread, kept until it asks: printed
/// as they came, they could fill the pipe while the harness reads another
/// process, stopping the very workers the others are waiting on.
type Out = Arc<Mutex<Vec<String>>>;

fn say(out: &Out, line: &str) {
    if let Ok(mut out) = out.lock() {
        out.push(line.to_owned());
    }
}

/// Prints the reports kept so far, then `last` (an answer to the harness).
fn print_reports(out: &Out, last: &str) -> Result<(), Error> {
    let lines = std::mem::take(&mut *out.lock().map_err(|_| "poisoned")?);
    let mut stdout = std::io::stdout().lock();
    for line in lines {
        writeln!(stdout, "{line}")?;
    }
    writeln!(stdout, "{last}")?;
    stdout.flush()?;
    Ok(())
}

/// `bench --accuracy-client <role> <count> <tcp port> <udp port> [<listener fd> <udp fd>]`:
/// the target (which forks the child and, with it, serves the shared
/// sockets), the child, or the neighbour. Waits for "go", makes its flows,
/// says "done"; on "report", waits for the last served flows to be told
/// and says "reported".
pub fn client(args: &[String]) -> Result<(), Error> {
    let role = Role::parse(args.first().ok_or("missing role")?).ok_or("unknown role")?;
    let number = |i: usize| -> Result<u64, Error> {
        Ok(args
            .get(i)
            .ok_or("missing argument")?
            .parse::<u64>()
            .map_err(|err| err.to_string())?)
    };
    let count = number(1)? as usize;
    let echo_tcp_at: SocketAddr = format!("127.0.0.1:{}", number(2)?).parse()?;
    let echo_udp_at: SocketAddr = format!("127.0.0.1:{}", number(3)?).parse()?;
    std::fs::write("/proc/self/comm", role.comm())?;
    let out: Out = Arc::default();

    // Sockets that only receive, and drain what comes without answering.
    let receivers = if role == Role::Target {
        let wildcard = UdpSocket::bind("0.0.0.0:0")?;
        let exact = UdpSocket::bind("127.0.0.1:0")?;
        let ports = (wildcard.local_addr()?.port(), exact.local_addr()?.port());
        for socket in [wildcard, exact] {
            let _ = nix::sys::socket::setsockopt(
                &socket,
                nix::sys::socket::sockopt::RcvBuf,
                &(8 << 20),
            );
            std::thread::spawn(move || {
                let mut buffer = [0u8; 2048];
                while socket.recv(&mut buffer).is_ok() {}
            });
        }
        Some(ports)
    } else {
        None
    };
    // The shared sockets: made by the target, inherited by the child.
    let shared = match role {
        Role::Target => {
            let listener = listener_with_room()?;
            let udp = UdpSocket::bind("127.0.0.1:0")?;
            for fd in [listener.as_raw_fd(), udp.as_raw_fd()] {
                nix::fcntl::fcntl(
                    unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) },
                    nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
                )?;
            }
            Some((listener, udp))
        }
        Role::Child => {
            let (listener_fd, udp_fd) = (number(4)? as i32, number(5)? as i32);
            // SAFETY: the target passed these fds, open across the exec,
            // for this process to own.
            unsafe {
                Some((
                    TcpListener::from_raw_fd(listener_fd),
                    UdpSocket::from_raw_fd(udp_fd),
                ))
            }
        }
        Role::Neighbour | Role::Dialer => None,
    };
    let mut child = None;
    let mut ready = "ready".to_owned();
    if let Some((listener, udp)) = &shared {
        if role == Role::Target {
            let mut spawned = Command::new(std::env::current_exe()?)
                .args([
                    "accuracy-client",
                    "child",
                    &count.to_string(),
                    &echo_tcp_at.port().to_string(),
                    &echo_udp_at.port().to_string(),
                    &listener.as_raw_fd().to_string(),
                    &udp.as_raw_fd().to_string(),
                ])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()?;
            let mut lines = BufReader::new(spawned.stdout.take().ok_or("no stdout")?).lines();
            lines.next().ok_or("the child ended")??;
            // The child's reports go to the harness through this process;
            // its "done" and "reported" are answers to this process.
            let (answers_tx, answers) = crossbeam_channel::unbounded();
            let relay = Arc::clone(&out);
            std::thread::spawn(move || {
                for line in lines.map_while(Result::ok) {
                    if line == "done" || line == "reported" {
                        let _ = answers_tx.send(line);
                    } else {
                        say(&relay, &line);
                    }
                }
            });
            child = Some((spawned, answers));
            let (wildcard, exact) = receivers.unwrap_or_default();
            ready = format!(
                "ready {} {} {wildcard} {exact}",
                listener.local_addr()?.port(),
                udp.local_addr()?.port()
            );
        }
        let (listener, udp) = (listener.try_clone()?, udp.try_clone()?);
        let served_out = Arc::clone(&out);
        std::thread::spawn(move || {
            echo_tcp(&listener, move |port, start, end| {
                say(
                    &served_out,
                    &format!("served tcp {port} {} {start} {end}", role.name()),
                );
            });
        });
        let served_out = Arc::clone(&out);
        std::thread::spawn(move || {
            echo_udp(&udp, |port, start, end| {
                say(
                    &served_out,
                    &format!("served udp {port} {} {start} {end}", role.name()),
                );
            });
        });
    }
    print_reports(&Arc::default(), &ready)?;

    let mut stdin = std::io::stdin().lock();
    let mut command = String::new();
    stdin.read_line(&mut command)?;
    let tell_child =
        |child: &mut Option<(std::process::Child, crossbeam_channel::Receiver<String>)>,
         line: &str|
         -> Result<(), Error> {
            if let Some((child, answers)) = child {
                let input = child.stdin.as_mut().ok_or("no stdin")?;
                writeln!(input, "{line}")?;
                input.flush()?;
                answers.recv_timeout(Duration::from_secs(60))?;
            }
            Ok(())
        };
    if let Some((spawned, _)) = &mut child {
        let input = spawned.stdin.as_mut().ok_or("no stdin")?;
        writeln!(input, "go")?;
        input.flush()?;
    }
    make_flows(role, count, echo_tcp_at, echo_udp_at, &out)?;
    if role == Role::Target {
        make_patterns(count, echo_tcp_at, echo_udp_at, &out)?;
    }
    if let Some((_, answers)) = &child {
        answers.recv_timeout(Duration::from_secs(60))?;
    }
    print_reports(&Arc::default(), "done")?;
    command.clear();
    stdin.read_line(&mut command)?;
    // The dialer is done: its last connections end within milliseconds.
    std::thread::sleep(Duration::from_millis(300));
    tell_child(&mut child, "report")?;
    print_reports(&out, "reported")?;
    let mut sink = Vec::new();
    let _ = stdin.read_to_end(&mut sink);
    Ok(())
}

/// `bench --accuracy-dialer <count> <tcp port> <udp port> <receiver ports>...`:
/// the passive flows, to the workers' shared sockets, then `count`
/// datagrams to each of the target's sockets that only receive, told as
/// `received <server port> <client port> <at>`.
pub fn dialer(args: &[String]) -> Result<(), Error> {
    let port = |i: usize| -> Result<u16, Error> {
        Ok(args
            .get(i)
            .ok_or("missing argument")?
            .parse::<u16>()
            .map_err(|err| err.to_string())?)
    };
    let count: usize = args.first().ok_or("missing count")?.parse()?;
    let tcp: SocketAddr = format!("127.0.0.1:{}", port(1)?).parse()?;
    let udp: SocketAddr = format!("127.0.0.1:{}", port(2)?).parse()?;
    std::fs::write("/proc/self/comm", Role::Dialer.comm())?;
    let out: Out = Arc::default();
    print_reports(&out, "ready")?;
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    make_flows(Role::Dialer, count, tcp, udp, &out)?;
    let sender = UdpSocket::bind("127.0.0.1:0")?;
    let client = sender.local_addr()?.port();
    for receiver in args
        .iter()
        .skip(3)
        .filter_map(|port| port.parse::<u16>().ok())
    {
        let to = SocketAddr::from(([127, 0, 0, 1], receiver));
        for i in 0..count {
            let at = unix_nanos();
            sender.send_to(format!("received-{i}").as_bytes(), to)?;
            say(&out, &format!("received {receiver} {client} {at}"));
            // Bursts of ten, as a collector gets them.
            if i % 10 == 9 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
    print_reports(&out, "done")?;
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    Ok(())
}

/// `count` flows of each lifetime and protocol to `tcp` and `udp`, told as
/// `flow <role> tcp|udp <server port> <client port> <lifetime> <start> <end>`.
/// The 1 s flows run on threads of their own, spread over the run.
fn make_flows(
    role: Role,
    count: usize,
    tcp: SocketAddr,
    udp: SocketAddr,
    out: &Out,
) -> Result<(), Error> {
    // A fifth as many 1 s flows, each on a thread (a thousand threads
    // would measure the machine's scheduler, not the streams).
    let mut slow = Vec::new();
    for i in 0..count.div_ceil(5) {
        let out = Arc::clone(out);
        slow.push(std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50) * i as u32);
            for (udp_flow, server) in [(false, tcp), (true, udp)] {
                if let Err(err) = one_flow(role, udp_flow, server, Lifetime::Second, &out) {
                    eprintln!("a 1 s flow failed: {err}");
                }
            }
        }));
    }
    for lifetime in [Lifetime::Tenth, Lifetime::Milli, Lifetime::Ten] {
        for _ in 0..count {
            one_flow(role, false, tcp, lifetime, out)?;
            one_flow(role, true, udp, lifetime, out)?;
        }
    }
    for thread in slow {
        let _ = thread.join();
    }
    Ok(())
}

/// The target's patterns: `count` connections to `tcp` from one local
/// port, each reset at its end, told as `pattern reconnect <server port>
/// <client port> <start> <end>`; then bursts of one datagram to each of
/// 200 destinations (127.0.0.2 and up, `udp`'s port: nobody answers),
/// told as `pattern burst <server port> <client port> <at>`.
fn make_patterns(count: usize, tcp: SocketAddr, udp: SocketAddr, out: &Out) -> Result<(), Error> {
    use nix::sys::socket::{setsockopt, sockopt};
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let local = nix::sys::socket::SockaddrIn::new(127, 0, 0, 1, port);
    let server = nix::sys::socket::SockaddrIn::from(match tcp {
        SocketAddr::V4(v4) => v4,
        SocketAddr::V6(_) => return Err("an IPv4 echo server".into()),
    });
    let mut made = 0;
    let mut attempts = 0;
    while made < count && attempts < count * 20 {
        attempts += 1;
        let fd = nix::sys::socket::socket(
            nix::sys::socket::AddressFamily::Inet,
            nix::sys::socket::SockType::Stream,
            nix::sys::socket::SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        setsockopt(&fd, sockopt::ReuseAddr, &true)?;
        let start = unix_nanos();
        if nix::sys::socket::bind(fd.as_raw_fd(), &local).is_err()
            || nix::sys::socket::connect(fd.as_raw_fd(), &server).is_err()
        {
            // The last connection's tuple is not free yet: again.
            std::thread::sleep(Duration::from_micros(200));
            continue;
        }
        let mut stream = TcpStream::from(fd);
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.write_all(&[b'r'; 100])?;
        stream.read_exact(&mut [0u8; 100])?;
        // Reset at the close: no TIME_WAIT keeps the tuple from the next.
        setsockopt(
            &stream,
            sockopt::Linger,
            &nix::libc::linger {
                l_onoff: 1,
                l_linger: 0,
            },
        )?;
        drop(stream);
        made += 1;
        say(
            out,
            &format!(
                "pattern reconnect {} {port} {start} {}",
                tcp.port(),
                unix_nanos()
            ),
        );
    }
    let socket = UdpSocket::bind("127.0.0.1:0")?;
    let client = socket.local_addr()?.port();
    for _ in 0..count.div_ceil(BURST_DESTINATIONS as usize).max(2) {
        for host in 0..BURST_DESTINATIONS {
            let to = SocketAddr::from(([127, 0, 0, 2 + host], udp.port()));
            let at = unix_nanos();
            socket.send_to(b"burst", to)?;
            say(out, &format!("pattern burst {} {client} {at}", udp.port()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn one_flow(
    role: Role,
    udp: bool,
    server: SocketAddr,
    lifetime: Lifetime,
    out: &Out,
) -> Result<(), Error> {
    let payload = [b'a'; 100];
    let mut reply = [0u8; 100];
    let start = unix_nanos();
    let port = if udp {
        let socket = UdpSocket::bind("127.0.0.1:0")?;
        socket.set_read_timeout(Some(Duration::from_secs(2)))?;
        // A datagram the loaded echo side dropped is no reason to stop:
        // the exchange is reported all the same (the ground truth says
        // which packets there were).
        socket.send_to(&payload, server)?;
        if lifetime != Lifetime::Tenth {
            let _ = socket.recv(&mut reply);
        }
        if let Some(pause) = lifetime.pause() {
            std::thread::sleep(pause);
            socket.send_to(&payload, server)?;
            let _ = socket.recv(&mut reply);
        }
        socket.local_addr()?.port()
    } else {
        let mut stream = TcpStream::connect(server)?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.write_all(&payload)?;
        if lifetime != Lifetime::Tenth {
            stream.read_exact(&mut reply)?;
        }
        if let Some(pause) = lifetime.pause() {
            std::thread::sleep(pause);
            stream.write_all(&payload)?;
            stream.read_exact(&mut reply)?;
        }
        stream.local_addr()?.port()
    };
    say(
        out,
        &format!(
            "flow {} {} {} {port} {} {start} {}",
            role.name(),
            if udp { "udp" } else { "tcp" },
            server.port(),
            lifetime.name(),
            unix_nanos()
        ),
    );
    Ok(())
}

/// One flow as the ground truth knows it.
#[derive(Clone, Debug)]
struct FlowRecord {
    owner: Role,
    udp: bool,
    passive: bool,
    lifetime: Lifetime,
    start: u128,
    end: u128,
    pattern: Pattern,
}

/// Flows by (udp, server port, client port).
type FlowIndex = HashMap<(bool, u16, u16), Vec<usize>>;

/// What the processes said, until each said `until`.
fn lines_until(helper: &mut Helper, until: &str) -> Result<Vec<String>, Error> {
    let mut lines = Vec::new();
    loop {
        let line = helper.read_line()?;
        if line == until {
            return Ok(lines);
        }
        lines.push(line);
    }
}

/// The flows the reports describe: active ones as their makers tell them;
/// passive TCP connections owned by the worker that served them; passive
/// UDP, one flow per datagram served, owned by the worker that got it.
fn flow_records(reports: &[String]) -> Vec<(u16, u16, FlowRecord)> {
    let mut records = Vec::new();
    let mut dialed: Vec<(bool, u16, u16, Lifetime, u128, u128)> = Vec::new();
    let mut served: Vec<(bool, u16, Role, u128, u128)> = Vec::new();
    let mut received: Vec<(u16, u16, u128)> = Vec::new();
    let mut patterns: Vec<(Pattern, u16, u16, u128, u128)> = Vec::new();
    for line in reports {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["flow", role, proto, server, client, lifetime, start, end] => {
                let (Some(role), Some(lifetime), Ok(server), Ok(client), Ok(start), Ok(end)) = (
                    Role::parse(role),
                    Lifetime::parse(lifetime),
                    server.parse::<u16>(),
                    client.parse::<u16>(),
                    start.parse::<u128>(),
                    end.parse::<u128>(),
                ) else {
                    continue;
                };
                let udp = *proto == "udp";
                if role == Role::Dialer {
                    dialed.push((udp, server, client, lifetime, start, end));
                } else {
                    records.push((
                        server,
                        client,
                        FlowRecord {
                            owner: role,
                            udp,
                            passive: false,
                            lifetime,
                            start,
                            end,
                            pattern: Pattern::Standard,
                        },
                    ));
                }
            }
            ["pattern", kind, server, client, start, rest @ ..] => {
                let (Ok(server), Ok(client), Ok(start)) = (
                    server.parse::<u16>(),
                    client.parse::<u16>(),
                    start.parse::<u128>(),
                ) else {
                    continue;
                };
                let end = rest
                    .first()
                    .and_then(|end| end.parse::<u128>().ok())
                    .unwrap_or(start);
                let pattern = match *kind {
                    "reconnect" => Pattern::Reconnect,
                    "burst" => Pattern::Burst,
                    _ => continue,
                };
                patterns.push((pattern, server, client, start, end));
            }
            ["received", server, client, at] => {
                let (Ok(server), Ok(client), Ok(at)) = (
                    server.parse::<u16>(),
                    client.parse::<u16>(),
                    at.parse::<u128>(),
                ) else {
                    continue;
                };
                received.push((server, client, at));
                patterns.push((Pattern::ReceivedWildcard, server, client, at, at));
            }
            ["served", proto, client, role, start, end] => {
                if let (Some(role), Ok(client), Ok(start), Ok(end)) = (
                    Role::parse(role),
                    client.parse::<u16>(),
                    start.parse::<u128>(),
                    end.parse::<u128>(),
                ) {
                    served.push((*proto == "udp", client, role, start, end));
                }
            }
            _ => {}
        }
    }
    let covers = |start: u128, end: u128, at: u128| {
        start.saturating_sub(FLOW_SLACK_NS) <= at && at <= end + FLOW_SLACK_NS
    };
    // A datagram served: one flow of the worker that got it, of the
    // lifetime of the dialer's flow it was part of.
    for (udp, client, role, received, sent) in &served {
        let dialer_flow = dialed
            .iter()
            .filter(|(u, _, port, _, start, end)| {
                *u && *udp && port == client && covers(*start, *end, *received)
            })
            .min_by_key(|(_, _, _, _, start, _)| start.abs_diff(*received));
        if let Some((_, server, _, lifetime, _, _)) = dialer_flow {
            let record = FlowRecord {
                owner: *role,
                udp: true,
                passive: true,
                lifetime: *lifetime,
                start: *received,
                end: *sent,
                pattern: Pattern::Standard,
            };
            records.push((*server, *client, record));
        }
    }
    // A connection dialed: owned by the worker that accepted it.
    for (udp, server, client, lifetime, start, end) in dialed {
        if udp {
            continue;
        }
        let owner = served
            .iter()
            .filter(|(u, port, _, at, _)| !*u && *port == client && covers(start, end, *at))
            .min_by_key(|(_, _, _, at, _)| at.abs_diff(start))
            .map_or(Role::Dialer, |(_, _, role, _, _)| *role);
        let record = FlowRecord {
            owner,
            udp,
            passive: true,
            lifetime,
            start,
            end,
            pattern: Pattern::Standard,
        };
        records.push((server, client, record));
    }
    // The patterns, each one flow per ports (one socket's many datagrams,
    // one port's many connections, a burst's datagrams to one port): their
    // packets come microseconds apart, too close to tell which of them a
    // packet was, so they are counted together. A datagram to a socket
    // that only receives is the target's; the first port told is the
    // wildcard socket's.
    let wildcard_port = received.first().map(|(server, _, _)| *server);
    let mut merged: HashMap<(Pattern, u16, u16), (u128, u128)> = HashMap::new();
    for (pattern, server, client, start, end) in patterns {
        let pattern = match pattern {
            Pattern::ReceivedWildcard if Some(server) != wildcard_port => Pattern::ReceivedExact,
            other => other,
        };
        let span = merged
            .entry((pattern, server, client))
            .or_insert((start, end));
        span.0 = span.0.min(start);
        span.1 = span.1.max(end);
    }
    for ((pattern, server, client), (start, end)) in merged {
        let record = FlowRecord {
            owner: Role::Target,
            udp: pattern != Pattern::Reconnect,
            passive: matches!(pattern, Pattern::ReceivedWildcard | Pattern::ReceivedExact),
            lifetime: Lifetime::Tenth,
            start,
            end,
            pattern,
        };
        records.push((server, client, record));
    }
    records
}

/// How far outside a flow's reported start and end its packets may fall
/// (the close's FIN and ACK come after the client's report).
const FLOW_SLACK_NS: u128 = 100_000_000;

/// How far apart two captures may stamp one packet.
const SAME_PACKET_NS: u128 = 50_000;

/// One packet of a flow, as the missed-flow report describes it: its time,
/// whether it went to the server, whether it was a SYN.
type FlowPacket = (u128, bool, bool);

/// What [`count_flows`] found: packets per flow, each flow's packets, and
/// the records seen twice (same time, same bytes).
struct FlowCounts {
    counts: HashMap<usize, u64>,
    packets: HashMap<usize, Vec<FlowPacket>>,
    twice: u64,
}

/// Packets per flow of a capture; each packet goes to the flow that had
/// its ports at its time (ports are reused over a run, by one process or
/// another).
fn count_flows(
    (linktype, packets): &Packets,
    records: &[FlowRecord],
    index: &FlowIndex,
    server_ports: &HashSet<(bool, u16)>,
) -> FlowCounts {
    let mut counts = HashMap::new();
    let mut flow_packets: HashMap<usize, Vec<FlowPacket>> = HashMap::new();
    let mut seen = HashSet::new();
    let mut twice = 0;
    for (at, data) in packets {
        if !seen.insert((*at, data.as_slice())) {
            twice += 1;
            continue;
        }
        let Some(flow) = netstatfs::capture::classify::flow_of(*linktype, data) else {
            continue;
        };
        let udp = flow.transport == netstatfs::capture::classify::Transport::Udp;
        let (server, client, to_server) = if server_ports.contains(&(udp, flow.dst.port())) {
            (flow.dst.port(), flow.src.port(), true)
        } else if server_ports.contains(&(udp, flow.src.port())) {
            (flow.src.port(), flow.dst.port(), false)
        } else {
            continue;
        };
        let Some(candidates) = index.get(&(udp, server, client)) else {
            continue;
        };
        let owner = candidates
            .iter()
            .filter(|i| {
                let record = &records[**i];
                record.start.saturating_sub(FLOW_SLACK_NS) <= *at
                    && *at <= record.end + FLOW_SLACK_NS
            })
            // The flow whose lifetime holds the packet; else the nearest
            // (a port reused 76 ms after a 1 s flow on it ended gave the
            // old flow's last exchange to the new one's record, whose
            // start was nearer than the old one's).
            .min_by_key(|i| {
                let record = &records[**i];
                if (record.start..=record.end).contains(at) {
                    0
                } else {
                    record.start.abs_diff(*at).min(record.end.abs_diff(*at))
                }
            });
        if let Some(i) = owner {
            *counts.entry(*i).or_insert(0) += 1;
            flow_packets
                .entry(*i)
                .or_default()
                .push((*at, to_server, flow.opening));
        }
    }
    FlowCounts {
        counts,
        packets: flow_packets,
        twice,
    }
}

/// The packets of `truth` that `seen` lacks, as "+<µs from the flow's
/// start> c>s|s>c[ SYN]". Two captures stamp one packet a little apart, so
/// a truth packet is matched by the nearest unmatched packet of the same
/// direction and kind within [`SAME_PACKET_NS`].
fn describe_missing(truth: &[FlowPacket], seen: &[FlowPacket], start: u128) -> String {
    let mut unmatched: Vec<FlowPacket> = seen.to_vec();
    truth
        .iter()
        .filter(|(at, to_server, opening)| {
            let nearest = unmatched
                .iter()
                .enumerate()
                .filter(|(_, (t, d, o))| {
                    d == to_server && o == opening && t.abs_diff(*at) < SAME_PACKET_NS
                })
                .min_by_key(|(_, (t, _, _))| t.abs_diff(*at))
                .map(|(index, _)| index);
            match nearest {
                Some(index) => {
                    unmatched.swap_remove(index);
                    false
                }
                None => true,
            }
        })
        .map(|(at, to_server, opening)| {
            format!(
                "+{}us {}{}",
                at.saturating_sub(start) as i128 / 1000,
                if *to_server { "c>s" } else { "s>c" },
                if *opening { " SYN" } else { "" }
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
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

/// One row of the table: a kind of flow, and the recall of `all` and
/// `tree` over it.
pub struct Row {
    pub label: String,
    pub all: Option<f64>,
    pub tree: Option<f64>,
    /// Flows of 10 ms, the lifetime from which following /proc is held to
    /// catch a process's own flows (its `all`; its child's and 1 s flows
    /// vary with the machine's load: 0.97 to 1.00 measured).
    pub long: bool,
}

pub struct AccuracyReport {
    pub rows: Vec<Row>,
    /// Packets of the neighbour (or of nobody measured) in the target's
    /// `all` and `tree`.
    pub neighbour_in_all: u64,
    pub neighbour_in_tree: u64,
    /// Packets of the child (its own flows, and those it served on the
    /// shared sockets) in the target's `all`.
    pub child_in_all: u64,
    /// Records seen twice in either stream.
    pub duplicates: u64,
    pub cpu: f64,
    pub seconds: f64,
}

/// A stream of the mount read into memory on a thread until it ends.
struct StreamCopy {
    bytes: Arc<Mutex<Vec<u8>>>,
    reader: std::thread::JoinHandle<()>,
}

impl StreamCopy {
    fn open(path: &std::path::Path) -> Result<StreamCopy, Error> {
        wait_for_path(path, Duration::from_secs(10))?;
        let mut file = File::open(path)?;
        let bytes: Arc<Mutex<Vec<u8>>> = Arc::default();
        let sink = Arc::clone(&bytes);
        let reader = std::thread::spawn(move || {
            let mut buffer = vec![0u8; 1 << 20];
            while let Ok(n) = file.read(&mut buffer) {
                if n == 0 {
                    break;
                }
                if let Ok(mut bytes) = sink.lock() {
                    bytes.extend_from_slice(&buffer[..n]);
                }
            }
        });
        Ok(StreamCopy { bytes, reader })
    }

    /// Waits for the end; the stream saved at `path`, read back.
    fn finish(self, path: &std::path::Path) -> Result<Packets, Error> {
        let _ = self.reader.join();
        std::fs::write(path, &*self.bytes.lock().map_err(|_| "poisoned")?)?;
        read_packets(path)
    }
}

/// Runs the measurement with `count` flows of each lifetime, protocol and
/// side for the target (and as many for its child; the neighbour makes a
/// quarter as many).
/// Runs the accuracy workload against `daemon` (`method`: how it
/// attributes flows, for the missed-flow lines on stderr).
pub fn measure(
    daemon: &Mount,
    method: &str,
    scratch: &std::path::Path,
    count: usize,
) -> Result<AccuracyReport, Error> {
    let mut server = Helper::spawn(&["accuracy-server"])?;
    let ports = |line: String| -> Vec<u16> {
        line.split_whitespace()
            .skip(1)
            .filter_map(|p| p.parse().ok())
            .collect()
    };
    let echo = ports(server.read_line()?);
    let (echo_tcp, echo_udp) = (echo[0].to_string(), echo[1].to_string());
    let count_text = count.to_string();
    let neighbour_count = count.div_ceil(4).to_string();
    let mut target = Helper::spawn(&[
        "accuracy-client",
        "target",
        &count_text,
        &echo_tcp,
        &echo_udp,
    ])?;
    let workers = ports(target.read_line()?);
    let (worker_tcp, worker_udp) = (workers[0].to_string(), workers[1].to_string());
    let (receive_wildcard, receive_exact) = (
        workers.get(2).copied().ok_or("no receiver port")?,
        workers.get(3).copied().ok_or("no receiver port")?,
    );
    let mut neighbour = Helper::spawn(&[
        "accuracy-client",
        "neighbour",
        &neighbour_count,
        &echo_tcp,
        &echo_udp,
    ])?;
    neighbour.read_line()?;
    let mut dialer = Helper::spawn(&[
        "accuracy-dialer",
        &count_text,
        &worker_tcp,
        &worker_udp,
        &receive_wildcard.to_string(),
        &receive_exact.to_string(),
    ])?;
    dialer.read_line()?;
    eprintln!(
        "{method}: pids: harness {}, daemon {}, echo server {}, target {}, neighbour {}, dialer {}",
        std::process::id(),
        daemon.pid(),
        server.child.id(),
        target.child.id(),
        neighbour.child.id(),
        dialer.child.id()
    );

    // The ground truth: this harness's own capture of every port involved.
    let truth_path = scratch.join("truth.pcap");
    let mut truth = Helper::spawn(&[
        "accuracy-truth",
        truth_path.to_str().ok_or("path")?,
        &format!(
            "tcp port {echo_tcp} or udp port {echo_udp} or tcp port {worker_tcp} or udp port {worker_udp} \
             or udp port {receive_wildcard} or udp port {receive_exact}"
        ),
    ])?;
    truth.read_line()?;

    let directory = daemon.path.join(format!("{}_bench", target.child.id()));
    let all = StreamCopy::open(&directory.join("all"))?;
    let tree = StreamCopy::open(&directory.join("tree"))?;

    let cpu_before = daemon.cpu_seconds();
    let started = Instant::now();
    for helper in [&mut target, &mut neighbour, &mut dialer] {
        helper.send("go")?;
    }
    let mut reports = lines_until(&mut dialer, "done")?;
    for helper in [&mut neighbour, &mut target] {
        lines_until(helper, "done")?;
    }
    for helper in [&mut neighbour, &mut target] {
        helper.send("report")?;
        reports.extend(lines_until(helper, "reported")?);
    }
    let seconds = started.elapsed().as_secs_f64();
    // Let the last packets through, then end the target: its streams end
    // (the child ends with it).
    std::thread::sleep(Duration::from_millis(500));
    drop(target);
    let all = all.finish(&scratch.join("all.pcap"))?;
    let tree = tree.finish(&scratch.join("tree.pcap"))?;
    let cpu = daemon.cpu_seconds() - cpu_before;
    truth.send("stop")?;
    truth.read_line()?;
    drop((neighbour, dialer, server));

    let described = flow_records(&reports);
    let mut index: FlowIndex = HashMap::new();
    let mut records = Vec::new();
    let mut ports = Vec::new();
    for (i, (server, client, record)) in described.into_iter().enumerate() {
        index
            .entry((record.udp, server, client))
            .or_default()
            .push(i);
        records.push(record);
        ports.push((server, client));
    }
    let server_ports: HashSet<(bool, u16)> = [
        (false, echo[0]),
        (true, echo[1]),
        (false, workers[0]),
        (true, workers[1]),
        (true, receive_wildcard),
        (true, receive_exact),
    ]
    .into_iter()
    .collect();
    let truth_found = count_flows(&read_packets(&truth_path)?, &records, &index, &server_ports);
    let all_found = count_flows(&all, &records, &index, &server_ports);
    let tree_found = count_flows(&tree, &records, &index, &server_ports);
    let truth_counts = &truth_found.counts;
    let (all_counts, all_twice) = (&all_found.counts, all_found.twice);
    let (tree_counts, tree_twice) = (&tree_found.counts, tree_found.twice);
    // What the streams missed, on stderr, to look into.
    let none = Vec::new();
    for (i, record) in records.iter().enumerate() {
        let truth = truth_counts.get(&i).copied().unwrap_or(0);
        for (stream, found, owners) in [
            ("all", &all_found, &[Role::Target][..]),
            ("tree", &tree_found, &[Role::Target, Role::Child][..]),
        ] {
            let seen = found.counts.get(&i).copied().unwrap_or(0);
            if owners.contains(&record.owner) && seen < truth {
                let missing = describe_missing(
                    truth_found.packets.get(&i).unwrap_or(&none),
                    found.packets.get(&i).unwrap_or(&none),
                    record.start,
                );
                let (server, client) = ports[i];
                eprintln!(
                    "{method}: missed in {stream}: {seen} of {truth} packets of the flow from port \
                     {client} to {server}, {record:?}: {missing}"
                );
            }
        }
    }
    let packets_of = |counts: &HashMap<usize, u64>, owners: &[Role]| -> u64 {
        counts
            .iter()
            .filter(|(i, _)| owners.contains(&records[**i].owner))
            .map(|(_, count)| count)
            .sum()
    };
    // None where the owners had no such flow (a worker may have served
    // none of a kind: the other got them all).
    let recall =
        |counts: &HashMap<usize, u64>, owners: &[Role], pick: &dyn Fn(&FlowRecord) -> bool| {
            let (mut seen, mut total) = (0u64, 0u64);
            for (i, record) in records.iter().enumerate() {
                if owners.contains(&record.owner) && pick(record) {
                    let truth = truth_counts.get(&i).copied().unwrap_or(0);
                    total += truth;
                    seen += counts.get(&i).copied().unwrap_or(0).min(truth);
                }
            }
            (total > 0).then(|| seen as f64 / total as f64)
        };
    let mut rows = Vec::new();
    for passive in [false, true] {
        for udp in [false, true] {
            for lifetime in Lifetime::ALL {
                let pick = |record: &FlowRecord| {
                    record.pattern == Pattern::Standard
                        && record.passive == passive
                        && record.udp == udp
                        && record.lifetime == lifetime
                };
                let flows = records
                    .iter()
                    .filter(|r| pick(r) && matches!(r.owner, Role::Target | Role::Child))
                    .count();
                rows.push(Row {
                    label: format!(
                        "{} {} living {} ({flows} flows, target and child)",
                        if udp { "UDP" } else { "TCP" },
                        if passive {
                            if udp { "served" } else { "accepted" }
                        } else if udp {
                            "sent"
                        } else {
                            "connected"
                        },
                        lifetime.label()
                    ),
                    all: recall(all_counts, &[Role::Target], &pick),
                    tree: recall(tree_counts, &[Role::Target, Role::Child], &pick),
                    long: lifetime == Lifetime::Ten,
                });
            }
        }
    }
    for (pattern, label) in [
        (
            Pattern::ReceivedWildcard,
            "UDP received and never answered, socket bound to 0.0.0.0",
        ),
        (
            Pattern::ReceivedExact,
            "UDP received and never answered, socket bound to 127.0.0.1",
        ),
        (Pattern::Reconnect, "TCP reconnecting from one local port"),
        (Pattern::Burst, "UDP bursts to 200 destinations"),
    ] {
        let pick = |record: &FlowRecord| record.pattern == pattern;
        let packets: u64 = records
            .iter()
            .enumerate()
            .filter(|(_, record)| pick(record))
            .map(|(i, _)| truth_counts.get(&i).copied().unwrap_or(0))
            .sum();
        rows.push(Row {
            label: format!("{label} ({packets} packets, target)"),
            all: recall(all_counts, &[Role::Target], &pick),
            tree: recall(tree_counts, &[Role::Target, Role::Child], &pick),
            long: false,
        });
    }
    Ok(AccuracyReport {
        rows,
        neighbour_in_all: packets_of(all_counts, &[Role::Neighbour, Role::Dialer]),
        neighbour_in_tree: packets_of(tree_counts, &[Role::Neighbour, Role::Dialer]),
        child_in_all: packets_of(all_counts, &[Role::Child]),
        duplicates: all_twice + tree_twice,
        cpu,
        seconds,
    })
}

/// `bench --accuracy-truth <file> <filter>`: captures the filter's packets
/// on lo until "stop".
pub fn truth(args: &[String]) -> Result<(), Error> {
    let path = args.first().ok_or("missing file")?;
    let filter = args.get(1).ok_or("missing filter")?;
    let mut capture = pcap::Capture::from_device("lo")?
        .snaplen(256)
        .buffer_size(64 << 20)
        .immediate_mode(false)
        .timeout(10)
        .open()?
        .setnonblock()?;
    capture.filter(filter, true)?;
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
    let stats = capture.stats()?;
    if stats.dropped > 0 {
        return Err(format!("the ground truth lost {} packets", stats.dropped).into());
    }
    println!("stopped");
    std::io::stdout().flush()?;
    Ok(())
}
