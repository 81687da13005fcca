//! Wireshark's capture list: the real tshark runs `netstatfs-extcap` from a
//! personal extcap folder, lists it, captures a socket and a process through
//! it with and without a capture filter, and stops when the process exits;
//! the extcap run by hand ends on SIGTERM and when its FIFO's reader goes,
//! and says clearly what is wrong when there is no mount, no process or no
//! permission.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::common::cgroup::{CONTAINER_ID, Cgroup};
use crate::common::mount::Mount;
use crate::common::packets::{Seen, payloads, read_pcap_file};
use crate::common::peer::Peer;
use crate::common::{ScratchDir, wait_for, wait_until};

const EXTCAP: &str = env!("CARGO_BIN_EXE_netstatfs-extcap");
const WAIT: Duration = Duration::from_secs(10);
/// What tshark prints for the interface in `tshark -D`.
const LISTED: &str = "netstatfs (Processes and sockets (netstatfs))";

/// A Wireshark personal configuration whose extcap folder holds the
/// extcap, as a user who installs it by hand has (README).
struct Wireshark {
    config: ScratchDir,
}

impl Wireshark {
    fn new() -> Wireshark {
        let config = ScratchDir::new("wireshark");
        let folder = config.0.join("wireshark/extcap");
        std::fs::create_dir_all(&folder).unwrap();
        std::os::unix::fs::symlink(EXTCAP, folder.join("netstatfs-extcap")).unwrap();
        Wireshark { config }
    }

    fn tshark(&self) -> Command {
        let mut command = Command::new("tshark");
        command.env("XDG_CONFIG_HOME", &self.config.0);
        command
    }

    /// tshark capturing from netstatfs into `out` with these `-o` settings
    /// (and a safety bound: it is expected to stop long before).
    fn capture(
        &self,
        mount: &Mount,
        settings: &[String],
        filter: Option<&str>,
        out: &Path,
    ) -> Child {
        let mut command = self.tshark();
        command
            .args(["-i", "netstatfs", "-a", "duration:60", "-w"])
            .arg(out)
            .arg("-o")
            .arg(format!("extcap.netstatfs.mount:{}", mount.path.display()));
        for setting in settings {
            command.arg("-o").arg(setting);
        }
        if let Some(filter) = filter {
            command.args(["-f", filter]);
        }
        // A group of its own: on a timeout the test ends tshark with the
        // dumpcap and extcap it started.
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        command
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("tshark starts")
    }
}

/// The extcap process that has `stream` open, once it has (its capture is
/// running from then on).
fn extcap_reading(stream: &Path) -> u32 {
    wait_for(
        WAIT,
        &format!("the extcap to open {}", stream.display()),
        || {
            std::fs::read_dir("/proc").ok()?.find_map(|entry| {
                let pid: u32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
                if !String::from_utf8_lossy(&cmdline).contains("netstatfs-extcap") {
                    return None;
                }
                std::fs::read_dir(format!("/proc/{pid}/fd"))
                    .ok()?
                    .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
                    .any(|target| target == stream)
                    .then_some(pid)
            })
        },
    )
}

/// Waits for tshark to stop by itself; its stderr.
fn stops_by_itself(tshark: Child, within: Duration) -> Output {
    let pid = tshark.id();
    let started = Instant::now();
    let (done_tx, done_rx) = crossbeam_channel::bounded(1);
    std::thread::spawn(move || {
        let _ = done_tx.send(tshark.wait_with_output());
    });
    match done_rx.recv_timeout(within) {
        Ok(output) => output.unwrap(),
        Err(_) => {
            let _ = kill(Pid::from_raw(-(pid as i32)), Signal::SIGKILL);
            panic!("tshark did not stop within {within:?} of {started:?}");
        }
    }
}

fn extcap(args: &[&str]) -> Output {
    Command::new("timeout")
        .arg("10")
        .arg(EXTCAP)
        .args(args)
        .output()
        .unwrap()
}

/// The base name of a process's program, as its command line starts.
fn program_of(pid: u32) -> String {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let first = cmdline.split(|byte| *byte == 0).next().unwrap_or_default();
    let first = String::from_utf8_lossy(first).into_owned();
    first.rsplit('/').next().unwrap_or_default().to_owned()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Every packet is between `a` and `b`, either way.
fn all_between(packets: &[Seen], a: &str, b: &str) {
    let (a, b) = (a.parse().unwrap(), b.parse().unwrap());
    for packet in packets {
        assert!(
            packet.is(a, b) || packet.is(b, a),
            "a packet of another connection: {packet:?}"
        );
    }
}

#[test]
fn tshark_lists_netstatfs_and_its_processes_and_streams() {
    // Wireshark asks every extcap this at start: it answers from its own
    // text, mount or none.
    let listed = extcap(&["--extcap-interfaces", "--extcap-version=4.0"]);
    assert!(listed.status.success());
    let lines: Vec<String> = text(&listed.stdout).lines().map(str::to_owned).collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(lines[0].starts_with("extcap {version="), "{lines:?}");
    assert_eq!(
        lines[1],
        "interface {value=netstatfs}{display=Processes and sockets (netstatfs)}"
    );

    let wireshark = Wireshark::new();
    let devices = wireshark.tshark().arg("-D").output().unwrap();
    assert!(devices.status.success(), "{}", text(&devices.stderr));
    assert!(
        text(&devices.stdout)
            .lines()
            .any(|line| line.ends_with(LISTED)),
        "tshark -D:\n{}",
        text(&devices.stdout)
    );

    // The configuration: the mount's processes, and a chosen one's streams.
    let mount = Mount::start(&[]);
    let container = Cgroup::docker_like();
    let mut peer = Peer::spawn();
    peer.cmd("comm ext-list");
    container.enter(peer.pid);
    let listener = peer.cmd("tcp-listen 127.0.0.1:0");
    let socket = format!("tcp_{}_0.0.0.0:0", listener[1]);
    wait_until(WAIT, "the peer's socket file", || {
        mount.dir(peer.pid, "ext-list").join(&socket).exists()
    });
    let mount_arg = mount.path.to_str().unwrap();
    let config = extcap(&[
        "--extcap-interface",
        "netstatfs",
        "--extcap-config",
        "--mount",
        mount_arg,
    ]);
    assert!(config.status.success(), "{}", text(&config.stderr));
    let config = text(&config.stdout);
    // Labelled with the command line (several "python3" are told apart by
    // it) and the container.
    let line = config
        .lines()
        .find(|line| line.contains(&format!("{{value={}}}", peer.pid)))
        .unwrap_or_else(|| panic!("no value for the peer: {config}"));
    assert!(
        line.contains(&format!(
            "{{display={} ext-list: {} ",
            peer.pid,
            program_of(peer.pid)
        )) && line.contains(&format!("(docker {})}}", &CONTAINER_ID[..12])),
        "{line}"
    );
    let pid = peer.pid.to_string();
    let reload = extcap(&[
        "--extcap-interface",
        "netstatfs",
        "--extcap-config",
        "--extcap-reload-option",
        "stream",
        "--pid",
        &pid,
        "--mount",
        mount_arg,
    ]);
    let streams: Vec<String> = text(&reload.stdout)
        .lines()
        .map(|line| {
            line.split("{value=")
                .nth(1)
                .unwrap()
                .split('}')
                .next()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(
        streams,
        ["all", "tree", &socket],
        "{}",
        text(&reload.stdout)
    );
    // A socket with its state.
    assert!(
        text(&reload.stdout).contains(&format!("{{display={socket} (LISTEN)}}")),
        "{}",
        text(&reload.stdout)
    );

    // Without --mount, the default is the first netstatfs mount root can
    // read, as findmnt lists them (a dead daemon's mount is skipped).
    let mounts = Command::new("findmnt")
        .args(["-rn", "-t", "fuse.netstatfs", "-o", "TARGET"])
        .output()
        .unwrap();
    let first = text(&mounts.stdout)
        .lines()
        .find(|target| std::fs::read_dir(target).is_ok())
        .unwrap()
        .to_owned();
    let config = extcap(&["--extcap-interface", "netstatfs", "--extcap-config"]);
    assert!(
        text(&config.stdout).contains(&format!("{{default={first}}}")),
        "{}",
        text(&config.stdout)
    );

    // The link type, from the mount's root.
    let dlts = extcap(&[
        "--extcap-interface",
        "netstatfs",
        "--extcap-dlts",
        "--mount",
        mount_arg,
    ]);
    assert_eq!(
        text(&dlts.stdout).trim(),
        "dlt {number=113}{name=LINUX_SLL}{display=Linux cooked v1}"
    );
    drop(mount);
    let on_lo = Mount::start(&["--interface", "lo"]);
    let dlts = extcap(&[
        "--extcap-interface",
        "netstatfs",
        "--extcap-dlts",
        "--mount",
        on_lo.path.to_str().unwrap(),
    ]);
    assert_eq!(
        text(&dlts.stdout).trim(),
        "dlt {number=1}{name=EN10MB}{display=Ethernet}"
    );
}

#[test]
fn tshark_captures_exactly_one_socket_and_stops_when_it_closes() {
    let mount = Mount::start(&[]);
    let mut peer = Peer::spawn();
    peer.cmd("comm ext-socket");
    let listener = peer.cmd("tcp-listen 127.0.0.1:0");
    let client = peer.cmd(&format!("tcp-connect {}", listener[1]));
    let server = peer.cmd(&format!("tcp-accept {}", listener[0]));
    // Another connection of the same process, busy at the same time.
    let other_client = peer.cmd(&format!("tcp-connect {}", listener[1]));
    let other_server = peer.cmd(&format!("tcp-accept {}", listener[0]));
    let name = format!("tcp_{}_{}", client[1], client[2]);
    let stream = mount.dir(peer.pid, "ext-socket").join(&name);
    wait_until(WAIT, "the socket file", || stream.exists());

    let wireshark = Wireshark::new();
    let out = mount.scratch().join("socket.pcapng");
    let tshark = wireshark.capture(
        &mount,
        &[
            format!("extcap.netstatfs.pid:{}", peer.pid),
            format!("extcap.netstatfs.stream:{name}"),
        ],
        None,
        &out,
    );
    extcap_reading(&stream);
    let mut sent = Vec::new();
    for i in 0..5 {
        peer.cmd(&format!("send {} to-server-{i}", client[0]));
        peer.cmd(&format!("send {} to-client-{i}", server[0]));
        peer.cmd(&format!("send {} other-{i}", other_client[0]));
        peer.cmd(&format!("send {} other-back-{i}", other_server[0]));
        sent.extend([format!("to-server-{i}"), format!("to-client-{i}")]);
    }
    // Each side reads what it was sent, so every byte is acknowledged.
    peer.cmd(&format!(
        "recv {} {}",
        server[0],
        sent.iter().step_by(2).map(String::len).sum::<usize>()
    ));
    peer.cmd(&format!(
        "recv {} {}",
        client[0],
        sent.iter()
            .skip(1)
            .step_by(2)
            .map(String::len)
            .sum::<usize>()
    ));
    peer.cmd(&format!("close {}", client[0]));
    peer.cmd(&format!("close {}", server[0]));

    let output = stops_by_itself(tshark, WAIT);
    assert!(output.status.success(), "tshark: {}", text(&output.stderr));
    let (_, packets) = read_pcap_file(&out);
    all_between(&packets, &client[1], &client[2]);
    assert_eq!(payloads(&packets), sent);
    let (client_addr, server_addr) = (client[1].parse().unwrap(), client[2].parse().unwrap());
    for (from, to) in [(client_addr, server_addr), (server_addr, client_addr)] {
        assert!(
            packets
                .iter()
                .any(|p| p.is(from, to) && p.tcp_flags.contains('F')),
            "no FIN from {from}: {packets:?}"
        );
    }
}

#[test]
fn a_process_capture_names_the_process_and_ends_when_it_exits() {
    let mount = Mount::start(&["--format", "pcapng"]);
    let mut peer = Peer::spawn();
    peer.cmd("comm ext-all");
    let dir = mount.dir(peer.pid, "ext-all");
    // A socket makes the process a directory of the mount.
    peer.cmd("udp-bind 127.0.0.1:0");
    wait_until(WAIT, "the process directory", || dir.exists());

    let wireshark = Wireshark::new();
    let out = mount.scratch().join("all.pcapng");
    let tshark = wireshark.capture(
        &mount,
        &[
            format!("extcap.netstatfs.pid:{}", peer.pid),
            "extcap.netstatfs.stream:all".to_owned(),
        ],
        None,
        &out,
    );
    extcap_reading(&dir.join("all"));
    // A connection made while the capture runs: from its SYN.
    let listener = peer.cmd("tcp-listen 127.0.0.1:0");
    let client = peer.cmd(&format!("tcp-connect {}", listener[1]));
    let server = peer.cmd(&format!("tcp-accept {}", listener[0]));
    peer.cmd(&format!("send {} hello-from-all", client[0]));
    peer.cmd(&format!("recv {} 14", server[0]));
    let exited = Instant::now();
    peer.kill();

    let output = stops_by_itself(tshark, WAIT);
    assert!(output.status.success(), "tshark: {}", text(&output.stderr));
    assert!(exited.elapsed() < WAIT);
    let (_, packets) = read_pcap_file(&out);
    all_between(&packets, &client[1], &client[2]);
    assert_eq!(
        packets[0].tcp_flags, "S",
        "the first packet: {:?}",
        packets[0]
    );
    assert_eq!(payloads(&packets), ["hello-from-all"]);
    // The process's end closed both ends: their FINs or resets are there.
    assert!(
        packets
            .iter()
            .any(|p| p.tcp_flags.contains('F') || p.tcp_flags.contains('R'))
    );

    let comments = wireshark
        .tshark()
        .args(["-r"])
        .arg(&out)
        .args(["-T", "fields", "-e", "frame.comment"])
        .output()
        .unwrap();
    let comments = text(&comments.stdout);
    assert_eq!(comments.lines().count(), packets.len());
    for comment in comments.lines() {
        assert!(
            comment.contains(&format!("pid={}", peer.pid)) && comment.contains("comm=ext-all"),
            "comment {comment:?}"
        );
    }
}

#[test]
fn a_capture_filter_keeps_only_its_packets_and_a_bad_one_is_refused() {
    let mount = Mount::start(&[]);
    let mut peer = Peer::spawn();
    peer.cmd("comm ext-filter");
    let kept = peer.cmd("tcp-listen 127.0.0.1:0");
    let dropped = peer.cmd("tcp-listen 127.0.0.1:0");
    let kept_client = peer.cmd(&format!("tcp-connect {}", kept[1]));
    let kept_server = peer.cmd(&format!("tcp-accept {}", kept[0]));
    let dropped_client = peer.cmd(&format!("tcp-connect {}", dropped[1]));
    let dropped_server = peer.cmd(&format!("tcp-accept {}", dropped[0]));
    let dir = mount.dir(peer.pid, "ext-filter");
    wait_until(WAIT, "the process directory", || dir.exists());
    let port = kept[1].rsplit(':').next().unwrap().to_owned();

    let wireshark = Wireshark::new();
    let settings = [
        format!("extcap.netstatfs.pid:{}", peer.pid),
        "extcap.netstatfs.stream:all".to_owned(),
    ];
    let out = mount.scratch().join("filtered.pcapng");
    let tshark = wireshark.capture(&mount, &settings, Some(&format!("tcp port {port}")), &out);
    extcap_reading(&dir.join("all"));
    for i in 0..3 {
        peer.cmd(&format!("send {} kept-{i}", kept_client[0]));
        peer.cmd(&format!("send {} dropped-{i}", dropped_client[0]));
        peer.cmd(&format!("send {} kept-back-{i}", kept_server[0]));
        peer.cmd(&format!("send {} dropped-back-{i}", dropped_server[0]));
    }
    peer.cmd(&format!("recv {} 18", kept_server[0]));
    peer.kill();
    let output = stops_by_itself(tshark, WAIT);
    assert!(output.status.success(), "tshark: {}", text(&output.stderr));
    let (_, packets) = read_pcap_file(&out);
    all_between(&packets, &kept_client[1], &kept_client[2]);
    let mut seen = payloads(&packets);
    seen.sort();
    assert_eq!(
        seen,
        [
            "kept-0",
            "kept-1",
            "kept-2",
            "kept-back-0",
            "kept-back-1",
            "kept-back-2"
        ]
    );

    // A filter libpcap cannot compile: tshark shows libpcap's message and
    // fails; Wireshark's own check gets the message on stdout.
    let mut peer = Peer::spawn();
    peer.cmd("comm ext-badfilter");
    peer.cmd("udp-bind 127.0.0.1:0");
    wait_until(WAIT, "the process directory", || {
        mount.dir(peer.pid, "ext-badfilter").exists()
    });
    let settings = [format!("extcap.netstatfs.pid:{}", peer.pid)];
    let out = mount.scratch().join("bad.pcapng");
    let tshark = wireshark.capture(&mount, &settings, Some("tcp port nonsense"), &out);
    let output = stops_by_itself(tshark, WAIT);
    assert!(!output.status.success());
    assert!(
        text(&output.stderr).contains("unknown port 'nonsense'"),
        "{}",
        text(&output.stderr)
    );
    let check = extcap(&[
        "--extcap-interface",
        "netstatfs",
        "--extcap-capture-filter",
        "tcp port nonsense",
    ]);
    assert!(check.status.success());
    assert!(
        text(&check.stdout).contains("unknown port 'nonsense'"),
        "{}",
        text(&check.stdout)
    );
    let check = extcap(&[
        "--extcap-interface",
        "netstatfs",
        "--extcap-capture-filter",
        "tcp port 80",
    ]);
    assert!(check.status.success());
    assert_eq!(text(&check.stdout), "");
}

/// The extcap as Wireshark runs it, writing to a FIFO that `cat` drains.
struct FifoCapture {
    extcap: Child,
    reader: Child,
    saved: PathBuf,
}

impl FifoCapture {
    fn start(scratch: &Path, tag: &str, mount: &Mount, pid: u32) -> FifoCapture {
        let fifo = scratch.join(format!("{tag}.fifo"));
        let saved = scratch.join(format!("{tag}.pcap"));
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let reader = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "exec cat '{}' > '{}'",
                fifo.display(),
                saved.display()
            ))
            .spawn()
            .unwrap();
        let extcap = Command::new(EXTCAP)
            .args(["--capture", "--extcap-interface", "netstatfs", "--fifo"])
            .arg(&fifo)
            .arg("--pid")
            .arg(pid.to_string())
            .args(["--stream", "all", "--mount"])
            .arg(&mount.path)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        FifoCapture {
            extcap,
            reader,
            saved,
        }
    }

    /// Waits for the extcap to exit; how long it took.
    fn exits_within(&mut self, bound: Duration) -> Duration {
        let started = Instant::now();
        wait_until(bound, "the extcap to exit", || {
            self.extcap.try_wait().unwrap().is_some()
        });
        let status = self.extcap.wait().unwrap();
        assert!(status.success(), "extcap exited with {status}");
        started.elapsed()
    }
}

impl Drop for FifoCapture {
    fn drop(&mut self) {
        for child in [&mut self.extcap, &mut self.reader] {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[test]
fn sigterm_or_a_vanished_reader_ends_the_extcap_with_whole_records() {
    let mount = Mount::start(&[]);
    let mut sender = Peer::spawn();
    sender.cmd("comm ext-term");
    let mut receiver = Peer::spawn();
    let listener = receiver.cmd("tcp-listen 127.0.0.1:0");
    let client = sender.cmd(&format!("tcp-connect {}", listener[1]));
    let server = receiver.cmd(&format!("tcp-accept {}", listener[0]));
    let dir = mount.dir(sender.pid, "ext-term");
    wait_until(WAIT, "the process directory", || dir.exists());
    // A steady flow for the whole test: 256 KiB/s in 16 KiB writes.
    sender.cmd(&format!("pace {} 16777216 256", client[0]));
    std::thread::spawn(move || {
        let _ = receiver.try_cmd(&format!("drain {} 16777216", server[0]));
    });

    let scratch = ScratchDir::new("extcap-fifo");
    let mut capture = FifoCapture::start(&scratch.0, "term", &mount, sender.pid);
    extcap_reading(&dir.join("all"));
    wait_until(WAIT, "packets in the FIFO's copy", || {
        std::fs::metadata(&capture.saved).is_ok_and(|m| m.len() > 64 * 1024)
    });
    kill(Pid::from_raw(capture.extcap.id() as i32), Signal::SIGTERM).unwrap();
    let took = capture.exits_within(WAIT);
    assert!(took < Duration::from_secs(1), "SIGTERM took {took:?}");
    assert!(capture.reader.wait().unwrap().success());
    // Whole records only: libpcap and tshark read the copy to its end.
    let (_, packets) = read_pcap_file(&capture.saved);
    assert!(packets.len() > 4, "{} packets", packets.len());
    all_between(&packets, &client[1], &client[2]);
    let tshark = Command::new("tshark")
        .arg("-r")
        .arg(&capture.saved)
        .output()
        .unwrap();
    assert!(tshark.status.success(), "{}", text(&tshark.stderr));

    // Wireshark gone: the FIFO's reader closes, the extcap follows.
    let mut capture = FifoCapture::start(&scratch.0, "gone", &mount, sender.pid);
    extcap_reading(&dir.join("all"));
    capture.reader.kill().unwrap();
    capture.reader.wait().unwrap();
    let took = capture.exits_within(WAIT);
    assert!(took < Duration::from_secs(1), "a gone reader took {took:?}");
}

#[test]
fn errors_say_what_is_wrong_and_nothing_hangs() {
    // No mount at all: a mount namespace of its own without any.
    let no_mount = Command::new("timeout")
        .args([
            "10",
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
        ])
        .arg(format!(
            "findmnt -rn -t fuse.netstatfs -o TARGET | xargs -r -n1 umount -l; \
             exec '{EXTCAP}' --capture --extcap-interface netstatfs --fifo /nonexistent --pid 1"
        ))
        .output()
        .unwrap();
    assert_eq!(no_mount.status.code(), Some(1), "{no_mount:?}");
    let message = text(&no_mount.stderr);
    assert!(
        message.contains("no netstatfs mount") && message.contains("netstatfs /run/netstatfs"),
        "{message}"
    );

    // A process that has exited.
    let mount = Mount::start(&["--allow-other"]);
    let mut gone = Command::new("true").spawn().unwrap();
    gone.wait().unwrap();
    let gone_pid = gone.id().to_string();
    let mount_arg = mount.path.to_str().unwrap();
    let output = extcap(&[
        "--capture",
        "--extcap-interface",
        "netstatfs",
        "--fifo",
        "/nonexistent",
        "--pid",
        &gone_pid,
        "--mount",
        mount_arg,
    ]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        text(&output.stderr).contains(&format!("process {gone_pid} is not in")),
        "{}",
        text(&output.stderr)
    );

    // Someone else's stream: root's process, read by nobody, through a
    // mount every user may enter.
    let mut peer = Peer::spawn();
    peer.cmd("comm ext-root");
    peer.cmd("udp-bind 127.0.0.1:0");
    wait_until(WAIT, "the process directory", || {
        mount.dir(peer.pid, "ext-root").exists()
    });
    let scratch = ScratchDir::new("extcap-user");
    let copy = scratch.0.join("netstatfs-extcap");
    std::fs::copy(EXTCAP, &copy).unwrap();
    let fifo = scratch.0.join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o666)).unwrap();
    let output = Command::new("timeout")
        .args([
            "10",
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
        ])
        .args(["--bounding-set=-all", "sh", "-c"])
        .arg(format!(
            "exec '{}' --capture --extcap-interface netstatfs --fifo '{}' --pid {} --mount '{}'",
            copy.display(),
            fifo.display(),
            peer.pid,
            mount_arg
        ))
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    assert!(
        text(&output.stderr).contains("permission denied"),
        "{}",
        text(&output.stderr)
    );
}

/// A plain user with two mounts: root's private one, listed first, and one
/// with --allow-other. The extcap picks the one the user can read, and
/// tshark, run by the user, captures from it without being told where.
/// With only the private one, the configuration says which mount it found
/// and why it skipped it.
#[test]
fn a_plain_user_gets_the_mount_they_can_read_and_is_told_why_not() {
    use crate::common::users::TestUser;
    use std::os::unix::fs::PermissionsExt;
    let private = Mount::start(&[]);
    let shared = Mount::start(&["--allow-other"]);
    let user = TestUser::new("wsu");
    let mut peer = user.peer();
    peer.cmd("comm user-peer");
    let receiver = peer.cmd("udp-bind 127.0.0.1:0");
    let sender = peer.cmd("udp-bind 127.0.0.1:0");
    let dir = shared.dir(peer.pid, "user-peer");
    wait_until(WAIT, "the user's process in the shared mount", || {
        dir.join("all").exists()
    });
    let as_user = |args: &[&str]| {
        let mut all = vec!["timeout", "10", EXTCAP];
        all.extend_from_slice(args);
        user.run(&all)
    };
    let config = as_user(&["--extcap-interface", "netstatfs", "--extcap-config"]);
    let config = text(&config.stdout);
    assert!(
        config.contains(&format!("{{default={}}}", shared.path.display())),
        "the default is the mount the user can read: {config}"
    );
    assert!(
        config.contains(&format!(
            "{{value={0}}}{{display={0} user-peer: {1}",
            peer.pid,
            program_of(peer.pid)
        )),
        "{config}"
    );

    // tshark as the user, with the default mount: the user's own datagram.
    let home = ScratchDir::new("wsu-home");
    std::fs::set_permissions(&home.0, std::fs::Permissions::from_mode(0o777)).unwrap();
    let folder = home.0.join("wireshark/extcap");
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::set_permissions(
        home.0.join("wireshark"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    std::fs::set_permissions(&folder, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink(EXTCAP, folder.join("netstatfs-extcap")).unwrap();
    let out = home.0.join("user.pcapng");
    let mut tshark = user.command(&[
        "tshark",
        "-i",
        "netstatfs",
        "-c",
        "1",
        "-a",
        "duration:30",
        "-w",
        out.to_str().unwrap(),
        "-o",
        &format!("extcap.netstatfs.pid:{}", peer.pid),
        "-o",
        "extcap.netstatfs.stream:all",
    ]);
    tshark.env("XDG_CONFIG_HOME", &home.0).env("HOME", &home.0);
    std::os::unix::process::CommandExt::process_group(&mut tshark, 0);
    let tshark = tshark
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    extcap_reading(&dir.join("all"));
    peer.cmd(&format!(
        "sendto {} {} for-the-user",
        sender[0], receiver[1]
    ));
    let output = stops_by_itself(tshark, WAIT);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let packets = read_pcap_file(&out).1;
    assert_eq!(payloads(&packets), ["for-the-user"]);

    // Only root's private mount left: the configuration says why not.
    drop(shared);
    let config = as_user(&["--extcap-interface", "netstatfs", "--extcap-config"]);
    let config = text(&config.stdout);
    let said = format!(
        "{}: private to uid 0 (mounted without --allow-other)",
        private.path.display()
    );
    assert!(
        config.contains("{value=none}{display=no netstatfs mount uid ") && config.contains(&said),
        "{config}"
    );
    let capture = as_user(&[
        "--capture",
        "--fifo",
        "/dev/null",
        "--pid",
        &peer.pid.to_string(),
    ]);
    assert!(!capture.status.success());
    assert!(
        text(&capture.stderr).contains(&said),
        "{}",
        text(&capture.stderr)
    );
}
