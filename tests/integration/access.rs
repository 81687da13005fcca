//! Who may see what, with real users: a private mount by default, socket
//! streams for their owners only, runs granted capabilities by setcap, runs
//! without them, and the capabilities a root daemon keeps.

use std::fs::File;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use crate::common::mount::{BINARY, Mount};
use crate::common::packets::read_pcap_file;
use crate::common::peer::Peer;
use crate::common::users::{TestUser, user_reads};
use crate::common::{ScratchDir, wait_for, wait_until};

const WAIT: Duration = Duration::from_secs(10);

/// A copy of the binary that users may run, with file capabilities or none.
fn binary_copy(scratch: &ScratchDir, capabilities: Option<&str>) -> PathBuf {
    let path = scratch.0.join("netstatfs");
    std::fs::copy(BINARY, &path).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    if let Some(capabilities) = capabilities {
        let status = Command::new("setcap")
            .arg(capabilities)
            .arg(&path)
            .status()
            .unwrap();
        assert!(status.success(), "setcap");
    }
    path
}

/// The capabilities the README tells users to grant.
const GRANTED: &str = "cap_net_raw,cap_net_admin,cap_sys_ptrace,cap_dac_read_search+ep";

/// Serializes the tests that change /etc/fuse.conf, and restores it.
static FUSE_CONF: Mutex<()> = Mutex::new(());

struct UserAllowOther {
    original: Option<String>,
    _lock: std::sync::MutexGuard<'static, ()>,
}

impl UserAllowOther {
    fn set() -> UserAllowOther {
        let lock = FUSE_CONF
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let original = std::fs::read_to_string("/etc/fuse.conf").ok();
        let mut text = original.clone().unwrap_or_default();
        text.push_str("\nuser_allow_other\n");
        std::fs::write("/etc/fuse.conf", text).unwrap();
        UserAllowOther {
            original,
            _lock: lock,
        }
    }
}

impl Drop for UserAllowOther {
    fn drop(&mut self) {
        match &self.original {
            Some(text) => std::fs::write("/etc/fuse.conf", text).unwrap(),
            None => {
                let _ = std::fs::remove_file("/etc/fuse.conf");
            }
        }
    }
}

fn denied(output: &Output) -> bool {
    !output.status.success()
        && String::from_utf8_lossy(&output.stderr).contains("Permission denied")
}

/// Waits until `user` sees `path` listing `name`.
fn wait_user_sees(user: &TestUser, path: &Path, name: &str) {
    let shown = path.display().to_string();
    wait_until(
        WAIT,
        &format!("{} to see {name} in {shown}", user.name),
        || {
            let output = user.run(&["ls", &shown]);
            String::from_utf8_lossy(&output.stdout)
                .lines()
                .any(|line| line == name)
        },
    );
}

#[test]
fn a_user_with_granted_capabilities_sees_as_proc_shows_and_reads_its_own_sockets() {
    let owner = TestUser::new("own");
    let stranger = TestUser::new("str");
    let scratch = ScratchDir::new("granted");
    let binary = binary_copy(&scratch, Some(GRANTED));
    let mount = owner.mount(&binary, &[]);
    let mut mine = owner.peer();
    mine.cmd("comm owners-peer");
    let a = mine.cmd("udp-bind 127.0.0.1:0");
    let b = mine.cmd("udp-bind 127.0.0.1:0");
    let mut roots = Peer::spawn();
    roots.cmd("comm roots-peer");
    let root_socket = roots.cmd("udp-bind 127.0.0.1:0");

    // Every process is listed, root's too, but only its own directories
    // open, as /proc/<pid>/fd does: root's is root's, mode 0500.
    let my_dir = mount.dir(mine.pid, "owners-peer");
    let root_dir = mount.dir(roots.pid, "roots-peer");
    let my_file = format!("udp_{}_0.0.0.0:0", a[1]);
    let root_file = format!("udp_{}_0.0.0.0:0", root_socket[1]);
    wait_user_sees(&owner, &my_dir, &my_file);
    wait_user_sees(
        &owner,
        &mount.path,
        root_dir.file_name().unwrap().to_str().unwrap(),
    );
    assert_not_revealed(&owner, &root_dir, &root_file);

    // Its own socket's stream it reads (capturing with its granted
    // CAP_NET_RAW).
    let saved = scratch.0.join("mine.pcap");
    let mut cat = owner
        .command(&["cat", my_dir.join(&my_file).to_str().unwrap()])
        .stdout(File::create(&saved).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until(WAIT, "the owner's capture to run", || {
        mount.log().contains("capture running")
    });
    mine.cmd(&format!("sendto {} {} for-the-owner", b[0], a[1]));
    mine.cmd(&format!("close {}", a[0]));
    let status = wait_for(WAIT, "cat to end", || cat.try_wait().unwrap());
    assert!(status.success());
    let (_, packets) = read_pcap_file(&saved);
    assert_eq!(packets.len(), 1);
    assert_eq!(packets[0].payload, b"for-the-owner");

    // Root's socket's stream it may not read: the kernel refuses before any
    // capture starts.
    let captures_before = mount.log().matches("opening a capture").count();
    let output = owner.run(&["cat", root_dir.join(&root_file).to_str().unwrap()]);
    assert!(denied(&output), "{output:?}");
    assert_eq!(
        mount.log().matches("opening a capture").count(),
        captures_before
    );

    // Another user cannot even enter the private mount, nor stat a name in
    // it right after its owner looked (the root directory is 0500).
    let output = stranger.run(&["ls", mount.path.to_str().unwrap()]);
    assert!(denied(&output), "{output:?}");
    let output = owner.run(&["ls", "-l", my_dir.to_str().unwrap()]);
    assert!(output.status.success(), "{output:?}");
    let output = stranger.run(&["stat", my_dir.join(&my_file).to_str().unwrap()]);
    assert!(denied(&output), "{output:?}");
    let output = owner.run(&["stat", "-c", "%a %u", mount.path.to_str().unwrap()]);
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        format!("500 {}", owner.uid)
    );
}

/// `user` sees that `dir` exists but neither its sockets nor its
/// attributes, as with another user's /proc/<pid>/fd.
fn assert_not_revealed(user: &TestUser, dir: &Path, file: &str) {
    for program in [
        vec!["ls", dir.to_str().unwrap()],
        vec!["stat", dir.join(file).to_str().unwrap()],
        vec!["getfattr", "-d", dir.to_str().unwrap()],
    ] {
        // getfattr lists the attribute names (the same for every process)
        // and exits 0, but every value is refused.
        let output = user.run(&program);
        assert!(
            String::from_utf8_lossy(&output.stderr).contains("Permission denied"),
            "{program:?}: {output:?}"
        );
        assert!(output.stdout.is_empty(), "{program:?} told: {output:?}");
    }
    let output = user.run(&["stat", "-c", "%a %u", dir.to_str().unwrap()]);
    assert!(output.status.success(), "{output:?}");
}

#[test]
fn allow_other_opens_the_tree_but_not_other_users_streams() {
    let _conf = UserAllowOther::set();
    let owner = TestUser::new("aown");
    let stranger = TestUser::new("astr");
    let scratch = ScratchDir::new("allow-other");
    let binary = binary_copy(&scratch, Some(GRANTED));
    let mut mine = owner.peer();
    mine.cmd("comm shared-peer");
    let socket = mine.cmd("udp-bind 127.0.0.1:0");
    let file = format!("udp_{}_0.0.0.0:0", socket[1]);

    // The default mount: private to its owner, and root.
    {
        let private = owner.mount(&binary, &[]);
        let dir = private.dir(mine.pid, "shared-peer");
        wait_user_sees(&owner, &dir, &file);
        assert!(std::fs::read_dir(&dir).is_ok(), "root may enter");
        let output = stranger.run(&["ls", private.path.to_str().unwrap()]);
        assert!(denied(&output), "{output:?}");
    }

    // --allow-other: everyone sees which pids hold sockets, but only the
    // owner (and root) sees a process's sockets and reads them, as /proc.
    let open = owner.mount(&binary, &["--allow-other"]);
    let dir = open.dir(mine.pid, "shared-peer");
    wait_user_sees(&owner, &dir, &file);
    wait_user_sees(
        &stranger,
        &open.path,
        dir.file_name().unwrap().to_str().unwrap(),
    );
    assert_not_revealed(&stranger, &dir, &file);
    let dir_meta = std::fs::metadata(&dir).unwrap();
    assert_eq!(dir_meta.permissions().mode() & 0o7777, 0o500);
    assert_eq!(dir_meta.uid(), owner.uid);
    let root_meta = std::fs::metadata(&open.path).unwrap();
    assert_eq!(root_meta.permissions().mode() & 0o7777, 0o555);
    let output = stranger.run(&["cat", dir.join(&file).to_str().unwrap()]);
    assert!(denied(&output), "{output:?}");
    assert!(
        !open.log().contains("opening a capture"),
        "no capture for a refused open"
    );
    // Writes stay EROFS for everyone.
    let output = stranger.run(&["mkdir", open.path.join("x").to_str().unwrap()]);
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("Read-only file system"),
        "{output:?}"
    );
}

#[test]
fn without_capabilities_it_lists_its_own_and_says_what_it_cannot_do() {
    let owner = TestUser::new("bare");
    let scratch = ScratchDir::new("bare");
    let binary = binary_copy(&scratch, None);
    let mount = owner.mount(&binary, &[]);
    let mut mine = owner.peer();
    mine.cmd("comm bare-peer");
    let socket = mine.cmd("udp-bind 127.0.0.1:0");
    let mut roots = Peer::spawn();
    roots.cmd("comm bare-roots");
    roots.cmd("udp-bind 127.0.0.1:0");

    let dir = mount.dir(mine.pid, "bare-peer");
    let file = format!("udp_{}_0.0.0.0:0", socket[1]);
    wait_user_sees(&owner, &dir, &file);
    // Root's process is not listed: its fds cannot be read.
    let listing = owner.run(&["ls", mount.path.to_str().unwrap()]);
    let listing = String::from_utf8_lossy(&listing.stdout).into_owned();
    assert!(!listing.contains("bare-roots"), "{listing}");

    // Said once at start-up.
    let log = mount.log();
    assert_eq!(log.matches("without CAP_NET_RAW").count(), 1, "{log}");
    assert!(log.contains("setcap cap_net_raw"), "{log}");

    // Its own socket's stream: EPERM, and a log line naming the capability.
    let output = owner.run(&["cat", dir.join(&file).to_str().unwrap()]);
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("Operation not permitted"),
        "{output:?}"
    );
    wait_until(WAIT, "the log line", || {
        mount
            .log()
            .lines()
            .any(|line| line.contains("capturing needs CAP_NET_RAW") && line.contains("setcap"))
    });
}

#[test]
fn a_root_daemon_keeps_only_the_capabilities_it_uses() {
    let mount = Mount::start(&[]);
    let status = std::fs::read_to_string(format!("/proc/{}/status", mount.pid())).unwrap();
    let mask = |field: &str| {
        let line = status.lines().find(|line| line.starts_with(field)).unwrap();
        u64::from_str_radix(line.split_whitespace().nth(1).unwrap(), 16).unwrap()
    };
    // net_admin 12, net_raw 13, dac_read_search 2, sys_ptrace 19,
    // sys_admin 21, perfmon 38.
    let used = [2u32, 12, 13, 19, 21, 38]
        .iter()
        .map(|bit| 1u64 << bit)
        .sum::<u64>();
    assert_eq!(mask("CapEff:"), used, "{status}");
    assert_eq!(mask("CapPrm:"), used);
    assert_eq!(mask("CapBnd:"), used);
    assert_eq!(mask("CapInh:"), 0);
    // And it still lists and captures.
    let mut peer = Peer::spawn();
    peer.cmd("comm still-works");
    let socket = peer.cmd("udp-bind 127.0.0.1:0");
    let path = mount
        .dir(peer.pid, "still-works")
        .join(format!("udp_{}_0.0.0.0:0", socket[1]));
    wait_until(WAIT, "the socket file", || path.exists());
    let mut file = File::open(&path).unwrap();
    let mut header = [0u8; 24];
    std::io::Read::read_exact(&mut file, &mut header).unwrap();
}

#[test]
fn bad_names_get_clean_errors_and_the_daemon_keeps_serving() {
    use std::os::unix::ffi::OsStrExt;
    let mount = Mount::start(&[]);
    let mut peer = Peer::spawn();
    peer.cmd("comm named");
    peer.cmd("udp-bind 127.0.0.1:0");
    let dir = mount.dir(peer.pid, "named");
    wait_until(WAIT, "the peer's directory", || dir.is_dir());

    let errno = |name: &[u8]| {
        std::fs::metadata(mount.path.join(std::ffi::OsStr::from_bytes(name)))
            .unwrap_err()
            .raw_os_error()
    };
    // Random bytes, control characters, invalid UTF-8.
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for _ in 0..200 {
        let length = (seed % 40) as usize + 1;
        let name: Vec<u8> = (0..length)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                // Any byte but '/' and NUL, which a name cannot hold.
                match (seed % 254) as u8 + 1 {
                    b'/' => b'x',
                    byte => byte,
                }
            })
            .collect();
        if name == b"." || name == b".." {
            continue;
        }
        assert_eq!(errno(&name), Some(nix::libc::ENOENT), "{name:?}");
    }
    // Long names: 255 bytes is a name that does not exist, 256 too long.
    assert_eq!(errno(&[b'7'; 255]), Some(nix::libc::ENOENT));
    assert_eq!(errno(&[b'7'; 256]), Some(nix::libc::ENAMETOOLONG));
    let long_in_dir = dir.join("x".repeat(300));
    assert_eq!(
        std::fs::metadata(long_in_dir).unwrap_err().raw_os_error(),
        Some(nix::libc::ENAMETOOLONG)
    );
    // A valid pid with the wrong comm, a thread's id.
    assert_eq!(
        errno(format!("{}_other", peer.pid).as_bytes()),
        Some(nix::libc::ENOENT)
    );
    let tid = std::fs::read_dir(format!("/proc/{}/task", peer.pid))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .find(|tid| *tid != peer.pid.to_string())
        .expect("the peer has a second thread");
    assert_eq!(
        errno(format!("{tid}_named").as_bytes()),
        Some(nix::libc::ENOENT)
    );
    // '..' stays inside the mount; a file is not a directory.
    let up = std::fs::canonicalize(dir.join("..")).unwrap();
    assert_eq!(up, mount.path);
    let file = std::fs::read_dir(&dir)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    assert_eq!(
        std::fs::metadata(file.join("x"))
            .unwrap_err()
            .raw_os_error(),
        Some(nix::libc::ENOTDIR)
    );
    // Still serving.
    assert!(dir.is_dir());
    assert!(!mount.log().contains("panicked"));
}

/// Owner of /proc/<pid>/fd: the effective user, or root while the process
/// is not dumpable.
fn proc_fd_owner(pid: u32) -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(format!("/proc/{pid}/fd")).unwrap().uid()
}

#[test]
fn a_process_that_drops_to_a_user_after_connecting_stays_roots() {
    let user = TestUser::new("drop");
    let mount = Mount::start(&["--allow-other"]);
    let mut server = Peer::spawn();
    let listener = server.cmd("tcp-listen 127.0.0.1:0");
    let mut target = Peer::spawn();
    target.cmd("comm drops-privs");
    target.cmd(&format!("tcp-connect {}", listener[1]));
    target.cmd(&format!("setuid {} {}", user.uid, user.gid));
    assert_eq!(
        proc_fd_owner(target.pid),
        0,
        "not dumpable: root's in /proc"
    );
    let dir = mount.dir(target.pid, "drops-privs");
    wait_until(WAIT, "the directory to be root's", || {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&dir).is_ok_and(|meta| meta.uid() == 0)
    });
    // As /proc/<pid>/fd is to that user: closed.
    for program in [
        vec!["ls", dir.to_str().unwrap()],
        vec!["cat", dir.join("all").to_str().unwrap()],
    ] {
        let output = user.run(&program);
        assert!(denied(&output), "{program:?}: {output:?}");
    }
    assert!(!mount.log().contains("opening a capture"));
}

#[test]
fn a_users_stream_ends_when_its_process_execs_a_setuid_program() {
    let user = TestUser::new("suid");
    let scratch = ScratchDir::new("suid");
    // A setuid-root copy of this test binary (a peer when so started).
    let setuid_peer = scratch.0.join("setuid-peer");
    std::fs::copy(std::env::current_exe().unwrap(), &setuid_peer).unwrap();
    std::fs::set_permissions(&setuid_peer, std::fs::Permissions::from_mode(0o4755)).unwrap();
    let mount = Mount::start(&["--allow-other"]);
    let mut server = Peer::spawn();
    let listener = server.cmd("tcp-listen 127.0.0.1:0");
    let mut target = user.peer();
    target.cmd("comm suid-exec");
    let own = target.cmd("udp-bind 127.0.0.1:0");
    let dir = mount.dir(target.pid, "suid-exec");
    wait_user_sees(&user, &dir, "all");
    let saved = scratch.0.join("all.pcap");
    let mut cat = user
        .command(&["cat", dir.join("all").to_str().unwrap()])
        .stdout(File::create(&saved).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until(WAIT, "the user's capture", || {
        mount.log().contains("suid-exec/all: capture running")
    });
    target.cmd(&format!("sendto {} {} before-exec", own[0], own[1]));
    // The same process becomes a setuid-root program, which connects.
    target.send(&format!("exec {}", setuid_peer.display()));
    wait_until(WAIT, "the exec", || proc_fd_owner(target.pid) == 0);
    let client = target.cmd(&format!("tcp-connect {}", listener[1]));
    let served = server.cmd(&format!("tcp-accept {}", listener[0]));
    for _ in 0..5 {
        target.cmd(&format!("send {} SUIDROOT_SECRET", client[0]));
        server.cmd(&format!("recv {} 15", served[0]));
    }
    // The stream ended at the exec, as /proc/<pid>/mem stops working.
    let status = wait_for(WAIT, "the user's cat to end", || cat.try_wait().unwrap());
    assert!(status.success(), "EOF, not an error");
    let packets = read_pcap_file(&saved).1;
    let payloads: Vec<String> = packets
        .iter()
        .filter(|p| !p.payload.is_empty())
        .map(|p| p.payload_text())
        .collect();
    assert_eq!(payloads, ["before-exec"]);
    target.kill();
}

/// The lines `child` writes on its piped stdout, as they come.
fn lines_of(child: &mut std::process::Child) -> crossbeam_channel::Receiver<String> {
    let stdout = child.stdout.take().expect("a piped stdout");
    let (tx, rx) = crossbeam_channel::unbounded();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)).map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    rx
}

#[test]
fn a_user_past_the_stream_limit_gets_emfile_and_everyone_past_the_total_enfile() {
    let user = TestUser::new("lim");
    let mount = Mount::start(&[
        "--allow-other",
        "--max-streams-per-user",
        "3",
        "--max-streams",
        "5",
    ]);
    let mut peer = user.peer();
    peer.cmd("comm lim-peer");
    let udp = peer.cmd("udp-bind 127.0.0.1:0");
    let file = mount
        .dir(peer.pid, "lim-peer")
        .join(format!("udp_{}_0.0.0.0:0", udp[1]));
    wait_until(WAIT, "the user's socket file", || file.exists());

    // The user's shell holds three streams of its own socket, tries a
    // fourth, waits for a line, gives one back and tries again.
    let script = r#"
        exec 3<"$0" 4<"$0" 5<"$0"
        echo held
        head -c 24 "$0" | wc -c
        read go
        exec 3<&-
        head -c 24 "$0" | wc -c
    "#;
    let mut shell = user
        .command(&["sh", "-c", script, file.to_str().unwrap()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let rx = lines_of(&mut shell);
    let next = || rx.recv_timeout(WAIT).expect("the shell goes on");
    assert_eq!(next(), "held");
    // The fourth: refused, nothing read.
    assert_eq!(next().trim(), "0");

    // Root has no per-user limit, but the daemon's total (5) binds it:
    // two more, then ENFILE.
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(File::open(&file).expect("root opens within the total"));
    }
    let refused = File::open(&file).expect_err("past the total");
    assert_eq!(refused.raw_os_error(), Some(nix::libc::ENFILE));
    drop(held);

    // A stream given back is one more to open.
    use std::io::Write;
    writeln!(shell.stdin.as_mut().unwrap(), "go").unwrap();
    assert_eq!(next().trim(), "24");
    let status = shell.wait().unwrap();
    assert!(status.success());
    let mut errors = String::new();
    std::io::Read::read_to_string(shell.stderr.as_mut().unwrap(), &mut errors).unwrap();
    assert!(errors.contains("Too many open files"), "{errors}");
    let log = mount.log();
    assert!(
        log.contains(&format!("user {} holds 3 streams", user.uid)) && log.contains("EMFILE"),
        "{log}"
    );
    assert!(
        log.contains("5 streams are open") && log.contains("ENFILE"),
        "{log}"
    );
}

/// A user holding the default limit of streams (32: socket files, `all`
/// and `tree`) on a busy socket of theirs, none of them read for a while:
/// the daemon runs no more threads than with one stream open, and every
/// stream then has every datagram.
#[test]
fn a_users_streams_cost_the_daemon_no_threads() {
    const STREAMS: usize = 32;
    const DATAGRAMS: usize = 200;
    let user = TestUser::new("thr");
    let mount = Mount::start(&["--allow-other"]);
    let mut peer = user.peer();
    peer.cmd("comm thr-peer");
    let udp = peer.cmd("udp-bind 127.0.0.1:0");
    let file = mount
        .dir(peer.pid, "thr-peer")
        .join(format!("udp_{}_0.0.0.0:0", udp[1]));
    wait_until(WAIT, "the user's socket file", || file.exists());
    // One stream open first (root's): the daemon-wide kernel events reader
    // starts with the first `all` or `tree`.
    let dir = mount.dir(peer.pid, "thr-peer");
    let roots = File::open(dir.join("tree")).unwrap();
    let idle = testkit::process::threads(mount.pid());
    let paths: Vec<String> = (0..STREAMS)
        .map(|index| match index % 4 {
            0 => dir.join("all"),
            1 => dir.join("tree"),
            _ => file.clone(),
        })
        .map(|path| path.to_str().unwrap().to_owned())
        .collect();

    // Opens the streams, says so, waits for a line, then reads each until
    // it holds every datagram (counted by record) and prints the count;
    // then tries one stream past the limit.
    let script = r#"
import errno, signal, struct, sys
signal.alarm(30)
datagrams, paths = int(sys.argv[1]), sys.argv[2:]
files = [open(path, "rb", buffering=0) for path in paths]
print("held", flush=True)
sys.stdin.readline()
for f in files:
    data, records = b"", 0
    while records < datagrams:
        data += f.read(1 << 20)
        offset, records = 24, 0
        while offset + 16 <= len(data):
            length = struct.unpack_from("<I", data, offset + 8)[0]
            if offset + 16 + length > len(data):
                break
            offset, records = offset + 16 + length, records + 1
    print(records, flush=True)
try:
    open(paths[-1], "rb")
    print("opened past the limit", flush=True)
except OSError as err:
    print(errno.errorcode[err.errno], flush=True)
"#;
    let datagrams = DATAGRAMS.to_string();
    let mut command = vec!["/usr/bin/python3", "-c", script, &datagrams];
    command.extend(paths.iter().map(String::as_str));
    let mut reader = user
        .command(&command)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let rx = lines_of(&mut reader);
    let next = || {
        rx.recv_timeout(Duration::from_secs(30))
            .expect("the reader goes on")
    };
    assert_eq!(next(), "held");
    // Every datagram goes to the socket itself, so each is its traffic once.
    peer.cmd(&format!("udp-pace {} {} {DATAGRAMS} 2000", udp[0], udp[1]));
    // The small rings the streams grew out of are closed together, each on
    // a thread that ends with its close; then, with every stream running,
    // the daemon runs the threads it ran before.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut busy = testkit::process::threads(mount.pid());
    while busy != idle && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        busy = testkit::process::threads(mount.pid());
    }
    assert_eq!(
        busy, idle,
        "the daemon ran {idle} threads before the first open and {busy} with {STREAMS} streams"
    );
    use std::io::Write;
    writeln!(reader.stdin.as_mut().unwrap(), "go").unwrap();
    for path in &paths {
        assert_eq!(next(), DATAGRAMS.to_string(), "{path}");
    }
    assert_eq!(next(), "EMFILE");
    assert!(reader.wait().unwrap().success());
    drop(roots);
}

#[test]
fn a_wildcard_socket_gets_only_what_the_kernel_delivers_to_it() {
    wildcard_socket_demux(&["--allow-other"]);
}

#[test]
fn a_wildcard_socket_gets_only_what_the_kernel_delivers_to_it_following_proc() {
    wildcard_socket_demux(&["--allow-other", "--no-kernel-events"]);
}

/// B's wildcard socket and C's exact one on the same port: B's socket
/// file and B's process's `all` hold only B's datagrams.
fn wildcard_socket_demux(mount_args: &[&str]) {
    let (b_user, c_user) = (TestUser::new("dmb"), TestUser::new("dmc"));
    let mount = Mount::start(mount_args);
    // B: a wildcard socket, read by B itself from before C comes.
    let mut b = b_user.peer();
    b.cmd("comm demux-b");
    let wildcard = b.cmd("udp-bind-reuse 0.0.0.0:0");
    let port: u16 = wildcard[1].rsplit(':').next().unwrap().parse().unwrap();
    let file = mount
        .dir(b.pid, "demux-b")
        .join(format!("udp_0.0.0.0:{port}_0.0.0.0:0"));
    wait_until(WAIT, "B's socket file", || file.exists());
    let (mut b_reader, b_bytes) = user_reads(&b_user, &file);

    wait_until(WAIT, "B's capture to run", || {
        mount.log().contains("demux-b/udp_0.0.0.0") && mount.log().contains("capture running")
    });
    let since = mount.log().len();
    // C, another user: the same port on 127.0.0.1 (SO_REUSEADDR), so the
    // kernel delivers to C what is sent to 127.0.0.1, and to B the rest.
    let mut c = c_user.peer();
    c.cmd("comm demux-c");
    let exact = c.cmd(&format!("udp-bind-reuse 127.0.0.1:{port}"));
    let c_client = c.cmd("udp-bind 127.0.0.1:0");
    wait_until(WAIT, "B's stream to leave C's address out", || {
        mount.log()[since..].contains("demux-b/udp_0.0.0.0")
            && mount.log()[since..].contains("1 flows of more specific sockets left out")
    });
    // Root opens after C came: left out from the start.
    let (root_bytes, root_reader) = crate::common::read_to_eof(&file);
    // B's process's `all`, read by B: C's exchanges are C's, by the
    // kernel's events.
    let all = mount.dir(b.pid, "demux-b").join("all");
    let (mut all_reader, all_bytes) = user_reads(&b_user, &all);
    wait_until(WAIT, "B's all to run", || {
        mount.log().contains("demux-b/all: capture running")
    });
    // Whoever sorts B's `all` knows C's socket takes 127.0.0.1:P.
    wait_until(WAIT, "B's all to leave C's address out", || {
        mount
            .log()
            .contains("demux-b/all: 1 flows of more specific sockets are not its sockets'")
    });

    let b_client = b.cmd("udp-bind 127.0.0.1:0");
    for i in 0..5 {
        c.cmd(&format!(
            "sendto {} 127.0.0.1:{port} secret-of-c-{i}",
            c_client[0]
        ));
        c.cmd(&format!("recv {} 64", exact[0]));
        c.cmd(&format!(
            "sendto {} {} secret-reply-{i}",
            exact[0], c_client[1]
        ));
        b.cmd(&format!("sendto {} 127.0.0.2:{port} mine-{i}", b_client[0]));
        assert_eq!(
            b.cmd(&format!("recv {} 64", wildcard[0])),
            [format!("mine-{i}")]
        );
    }
    b.cmd(&format!("close {}", wildcard[0]));
    assert!(b_reader.wait().unwrap().success());
    b.kill();
    assert!(all_reader.wait().unwrap().success());
    let (_, in_all) = crate::common::packets::read_pcap(&all_bytes.join().unwrap());
    let in_all: Vec<String> = crate::common::packets::payloads(&in_all)
        .into_iter()
        .filter(|payload| payload.contains("secret"))
        .collect();
    assert!(in_all.is_empty(), "C's datagrams in B's all: {in_all:?}");
    wait_until(WAIT, "root's copy to end", || root_reader.is_finished());
    let expected: Vec<String> = (0..5).map(|i| format!("mine-{i}")).collect();
    for (who, bytes) in [
        ("B", b_bytes.join().unwrap()),
        ("root", root_bytes.lock().unwrap().clone()),
    ] {
        let (_, packets) = crate::common::packets::read_pcap(&bytes);
        assert_eq!(
            crate::common::packets::payloads(&packets),
            expected,
            "{who}'s stream"
        );
    }
}

/// A unix socket's peer names its holder only to a reader who could see
/// that holder's fds in /proc: a user connected to root's listener learns
/// the peer socket, not root's process; root learns both.
#[test]
fn a_users_unix_peer_names_only_what_proc_would_show_them() {
    let user = TestUser::new("uxp");
    let mount = Mount::start(&["--unix", "--allow-other"]);
    let scratch = ScratchDir::new("unix-peer");
    std::fs::set_permissions(&scratch.0, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = scratch.0.join("root.sock");
    let path_text = path.to_str().unwrap();
    let mut server = Peer::spawn();
    server.cmd("comm root-server");
    let listener = server.cmd(&format!("unix-listen {path_text}"));
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777)).unwrap();

    let mut client = user.peer();
    client.cmd("comm user-client");
    let connected = client.cmd(&format!("unix-connect {path_text}"));
    let pair = client.cmd("unix-pair");
    let accepted = server.cmd(&format!("unix-accept {}", listener[0]));
    let dir = mount.dir(client.pid, "user-client");
    let connected_file = dir.join(format!("unix_{}", connected[1]));
    let pair_file = dir.join(format!("unix_{}", pair[2]));
    wait_until(WAIT, "the user's unix sockets listed", || {
        connected_file.exists() && pair_file.exists()
    });
    let as_user = |file: &Path, name: &str| -> Option<String> {
        let output = user.run(&[
            "getfattr",
            "--only-values",
            "-n",
            &format!("user.netstatfs.{name}"),
            file.to_str().unwrap(),
        ]);
        output
            .status
            .success()
            .then(|| String::from_utf8(output.stdout).unwrap())
    };
    assert_eq!(
        as_user(&connected_file, "peer_inode").as_ref(),
        Some(&accepted[1])
    );
    assert_eq!(as_user(&connected_file, "peer_pid"), None, "root's process");
    assert_eq!(as_user(&connected_file, "peer_comm"), None);
    assert_eq!(
        as_user(&pair_file, "peer_pid"),
        Some(client.pid.to_string()),
        "the user's own process"
    );
    assert_eq!(
        crate::common::xattr(&connected_file, "user.netstatfs.peer_pid"),
        Some(server.pid.to_string()),
        "root sees every holder"
    );
}

/// Sets tracefs's mode for a test, and puts the old one back.
struct TracefsMode {
    path: &'static str,
    original: u32,
}

impl TracefsMode {
    fn set(mode: u32) -> TracefsMode {
        let path = "/sys/kernel/tracing";
        let original = std::fs::metadata(path).unwrap().permissions().mode() & 0o7777;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
        TracefsMode { path, original }
    }
}

impl Drop for TracefsMode {
    fn drop(&mut self) {
        let _ = std::fs::set_permissions(self.path, std::fs::Permissions::from_mode(self.original));
    }
}

/// tracefs is mounted but mode 0700 (its default): a daemon that may not
/// read it says that, and how to grant it, instead of "not mounted".
#[test]
fn a_tracefs_closed_to_the_user_is_named_as_such() {
    let _mode = TracefsMode::set(0o700);
    let owner = TestUser::new("closed");
    let scratch = ScratchDir::new("closed");
    let binary = binary_copy(
        &scratch,
        Some("cap_net_raw,cap_net_admin,cap_sys_ptrace+ep"),
    );
    let mount = owner.mount(&binary, &[]);
    let mut mine = owner.peer();
    mine.cmd("comm closed-peer");
    mine.cmd("udp-bind 127.0.0.1:0");
    let dir = mount.dir(mine.pid, "closed-peer");
    wait_user_sees(&owner, &dir, "all");
    let mut reader = owner
        .command(&["cat", dir.join("all").to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let line = wait_for(WAIT, "the log line on kernel events", || {
        mount
            .log()
            .lines()
            .find(|line| line.contains("flows attributed by following /proc"))
            .map(str::to_owned)
    });
    let _ = reader.kill();
    let _ = reader.wait();
    assert!(
        line.contains(&format!(
            "tracefs at /sys/kernel/tracing is not open to uid {} (mode 0700)",
            owner.uid
        )) && line.contains("cap_dac_read_search"),
        "{line}"
    );
    assert!(!line.contains("not mounted"), "{line}");
}
