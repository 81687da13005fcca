//! Starting and stopping: bad start-up input, signals, unmounts by others,
//! a killed daemon.

use std::process::{Command, Output};
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::common::mount::{BINARY, Mount};
use crate::common::syslog::{SyslogListener, pid_in};
use crate::common::{ScratchDir, mounted_at, wait_for, wait_until};

const EXIT_WAIT: Duration = Duration::from_secs(10);

/// Asserts a failed start: non-zero exit, one clear line, no panic.
fn assert_one_line_error(output: &Output, expected: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "should fail: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|line| !line.trim().is_empty())
        .collect();
    assert_eq!(lines.len(), 1, "one line expected, got:\n{stderr}");
    assert!(lines[0].starts_with("netstatfs: error: "), "{stderr}");
    assert!(lines[0].contains(expected), "{expected:?} not in {stderr}");
}

fn run(args: &[&str]) -> Output {
    Command::new(BINARY).args(args).output().unwrap()
}

#[test]
fn missing_or_wrong_mountpoints_are_one_line_errors() {
    let scratch = ScratchDir::new("startup");
    let missing = scratch.0.join("missing");
    assert_one_line_error(&run(&[missing.to_str().unwrap()]), "does not exist");
    let file = scratch.0.join("file");
    std::fs::write(&file, b"").unwrap();
    assert_one_line_error(&run(&[file.to_str().unwrap()]), "not a directory");
    let usage = run(&[]);
    assert!(!usage.status.success());
    assert!(String::from_utf8_lossy(&usage.stderr).contains("MOUNTPOINT"));
}

#[test]
fn mounting_twice_on_one_directory_is_refused() {
    let mount = Mount::start(&[]);
    let output = run(&[mount.path.to_str().unwrap()]);
    assert_one_line_error(&output, "already a mount point");
    // The first mount still serves.
    assert!(std::fs::read_dir(&mount.path).is_ok());
}

/// Values that cannot work are refused at start, saying what would.
#[test]
fn bad_option_values_are_refused_at_start_saying_what_is_valid() {
    let scratch = ScratchDir::new("values");
    let mountpoint = scratch.0.to_str().unwrap();
    assert_one_line_error(
        &run(&[mountpoint, "--interface", "nosuch0"]),
        "no interface \"nosuch0\" here (there are: lo",
    );
    assert!(!mounted_at(&scratch.0));
    for args in [
        &[mountpoint, "--cache-ttl", "-1"][..],
        &[mountpoint, "-o", "cache_ttl=-1"][..],
        &[mountpoint, "--max-delay", "soon"][..],
    ] {
        let output = run(args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?}");
        assert!(
            stderr.contains("a duration is a number of seconds (0.5) or a number with a unit"),
            "{args:?}: {stderr}"
        );
        // Not clap's guess that -1 was meant as a value after `--`.
        assert!(!stderr.contains("-- -1"), "{args:?}: {stderr}");
    }
}

#[test]
fn a_missing_dev_fuse_is_one_line_error() {
    // In a private mount namespace with an empty /dev.
    let scratch = ScratchDir::new("nodev");
    let script = format!(
        "mount -t tmpfs none /dev && exec {BINARY} {}",
        scratch.0.display()
    );
    let output = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .output()
        .unwrap();
    assert_one_line_error(&output, "/dev/fuse is missing");
}

#[test]
fn a_refused_mount_is_one_line_error() {
    // An unprivileged user may not mount on a directory it cannot write.
    let scratch = ScratchDir::new("refused");
    let target = scratch.0.join("m");
    std::fs::create_dir(&target).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&scratch.0, std::fs::Permissions::from_mode(0o755)).unwrap();
    let output = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", BINARY])
        .arg(&target)
        .output()
        .unwrap();
    assert_one_line_error(&output, "cannot mount on");
    assert!(!mounted_at(&target));
}

#[test]
fn sigterm_and_sigint_unmount_and_exit_zero() {
    for signal in [Signal::SIGTERM, Signal::SIGINT] {
        let mut mount = Mount::start(&[]);
        mount.signal(signal);
        let status = mount.wait_exit(EXIT_WAIT);
        assert!(status.success(), "{signal}: {status}");
        assert!(!mounted_at(&mount.path), "{signal} left a mount behind");
        assert!(!mount.log().contains("panicked"));
    }
}

#[test]
fn an_unmount_by_someone_else_ends_the_daemon_cleanly() {
    for command in [&["umount"][..], &["fusermount3", "-u"][..]] {
        let mut mount = Mount::start(&[]);
        let status = Command::new(command[0])
            .args(&command[1..])
            .arg(&mount.path)
            .status()
            .unwrap();
        assert!(status.success(), "{command:?}");
        let status = mount.wait_exit(EXIT_WAIT);
        assert!(status.success(), "{command:?}: {status}");
        assert!(!mounted_at(&mount.path));
        // Said as what it was: an unmount, not a lazy one.
        let log = mount.log();
        assert!(log.contains("was unmounted; exiting"), "{command:?}: {log}");
        assert!(!log.contains("umount -l"), "{command:?}: {log}");
    }
}

/// Whether process `pid` has exited (gone, or a zombie its reaper has not
/// collected yet).
fn exited(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |stat| {
        stat.rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X'))
    })
}

/// Started as mount(8) starts it (a source, then the mountpoint), the
/// daemon returns once mounted; from then on its stderr is /dev/null, so
/// its lines go to syslog. Unmounted, it gives the mountpoint back at once
/// (`umount m && mount m` works) and exits within a second.
#[test]
fn a_daemon_started_as_mount_does_logs_to_syslog_and_remounts_at_once() {
    let scratch = ScratchDir::new("syslog");
    let mountpoint = scratch.0.join("m");
    std::fs::create_dir(&mountpoint).unwrap();
    let syslog = SyslogListener::bind(scratch.0.join("log"));
    let options = format!("cache_ttl=100ms,syslog_socket={}", syslog.path.display());
    let mount = || run(&["netstatfs", mountpoint.to_str().unwrap(), "-o", &options]);
    let first = mount();
    assert!(first.status.success(), "{first:?}");
    assert!(mounted_at(&mountpoint));
    let line = syslog.wait_for("mounted at");
    assert!(
        line.starts_with("<30>"),
        "facility daemon, severity info: {line}"
    );
    let pid = pid_in(&line).unwrap_or_else(|| panic!("ident and pid in {line:?}"));

    let unmounted = std::time::Instant::now();
    umount(&mountpoint);
    let again = mount();
    assert!(again.status.success(), "mounted again at once: {again:?}");
    assert!(mounted_at(&mountpoint));
    wait_until(EXIT_WAIT, "the first daemon to exit", || exited(pid));
    assert!(
        unmounted.elapsed() < Duration::from_secs(1),
        "the first daemon exited {:?} after the unmount",
        unmounted.elapsed()
    );
    let unmounted_line = format!("{} was unmounted; exiting", mountpoint.display());
    let said = syslog.wait_for(&format!("netstatfs[{pid}]: {unmounted_line}"));
    assert!(said.starts_with("<30>"), "{said}");

    // The second one ends the same way.
    let second = wait_for(EXIT_WAIT, "the second daemon's start line", || {
        syslog.receive();
        syslog
            .lines
            .borrow()
            .iter()
            .filter(|line| line.contains("mounted at"))
            .find_map(|line| pid_in(line).filter(|other| *other != pid))
    });
    umount(&mountpoint);
    syslog.wait_for(&format!("netstatfs[{second}]: {unmounted_line}"));
}

/// While another process holds the mountpoint's start lock (a daemon that
/// is mounting), a daemon waits a moment, then says who holds it.
#[test]
fn a_mountpoint_being_mounted_by_another_daemon_is_refused_naming_it() {
    use std::os::fd::AsFd;
    let scratch = ScratchDir::new("locked");
    let mountpoint = scratch.0.join("m");
    std::fs::create_dir(&mountpoint).unwrap();
    let dir = std::fs::File::open(&mountpoint).unwrap();
    nix::fcntl::Flock::lock(dir, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map(|held| {
            let _ = held.as_fd();
            let output = run(&[mountpoint.to_str().unwrap()]);
            assert_one_line_error(
                &output,
                &format!(
                    "another netstatfs (pid {}) is starting on {}",
                    std::process::id(),
                    mountpoint.display()
                ),
            );
            assert!(!mounted_at(&mountpoint));
        })
        .unwrap_or_else(|(_, err)| panic!("flock: {err}"));
}

#[test]
fn a_killed_daemon_leaves_no_dead_mount() {
    let mut mount = Mount::start(&[]);
    mount.signal(Signal::SIGKILL);
    mount.wait_exit(EXIT_WAIT);
    // fusermount3's auto-unmount removes it once the daemon is gone.
    wait_until(EXIT_WAIT, "the auto-unmount", || !mounted_at(&mount.path));
    assert!(
        std::fs::read_dir(&mount.path).is_ok(),
        "the directory is usable again"
    );
}

#[test]
fn the_mount_flag_of_the_original_works_too() {
    let scratch = ScratchDir::new("flag");
    let target = scratch.0.join("m");
    std::fs::create_dir(&target).unwrap();
    let mut child = Command::new(BINARY)
        .arg("--mount")
        .arg(&target)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_until(EXIT_WAIT, "the mount", || mounted_at(&target));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        Signal::SIGTERM,
    )
    .unwrap();
    wait_until(EXIT_WAIT, "exit", || child.try_wait().unwrap().is_some());
    assert!(!mounted_at(&target));
}

#[test]
fn help_explains_every_option() {
    let help = String::from_utf8(run(&["--help"]).stdout).unwrap();
    for option in [
        "--mount",
        "--all-processes",
        "--cache-ttl",
        "--allow-other",
        "--interface",
        "--snaplen",
        "--buffer",
        "--kernel-buffer",
        "--max-delay",
        "--unix",
        "--format",
        "--verbose",
        "--quiet",
        "--version",
        "MOUNTPOINT",
    ] {
        assert!(
            help.contains(option),
            "{option} missing from --help:\n{help}"
        );
    }
    let version = String::from_utf8(run(&["--version"]).stdout).unwrap();
    assert!(version.starts_with("netstatfs "));
}

#[test]
fn a_lazy_unmount_ends_waiting_reads_and_the_daemon() {
    use crate::common::peer::Peer;
    use std::time::Instant;
    let mut mount = Mount::start(&[]);
    let mut peer = Peer::spawn();
    peer.cmd("comm quiet-lazy");
    let socket = peer.cmd("udp-bind 127.0.0.1:0");
    let file = mount
        .dir(peer.pid, "quiet-lazy")
        .join(format!("udp_{}_0.0.0.0:0", socket[1]));
    wait_until(EXIT_WAIT, "the socket file", || file.exists());
    let mut readers: Vec<std::process::Child> = (0..10)
        .map(|_| {
            Command::new("cat")
                .arg(&file)
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    wait_until(EXIT_WAIT, "ten waiting readers", || {
        mount.log().matches("capture running").count() == 10
    });
    let status = Command::new("umount")
        .arg("-l")
        .arg(&mount.path)
        .status()
        .unwrap();
    assert!(status.success());
    let detached = Instant::now();
    for reader in &mut readers {
        let status = crate::common::wait_for(Duration::from_secs(1), "a reader to end", || {
            reader.try_wait().unwrap()
        });
        assert!(status.success(), "EOF, not an error");
    }
    assert!(
        detached.elapsed() < Duration::from_secs(1),
        "{:?}",
        detached.elapsed()
    );
    let status = mount.wait_exit(EXIT_WAIT);
    assert!(status.success(), "{status}:\n{}", mount.log());
    assert!(!mounted_at(&mount.path));
}

#[test]
fn of_three_daemons_started_at_once_on_one_directory_one_mounts() {
    let scratch = ScratchDir::new("race");
    let mountpoint = scratch.0.join("m");
    std::fs::create_dir(&mountpoint).unwrap();
    let mut daemons: Vec<std::process::Child> = (0..3)
        .map(|_| {
            Command::new(BINARY)
                .arg(&mountpoint)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    wait_until(EXIT_WAIT, "a mount and two refusals", || {
        mounted_at(&mountpoint)
            && daemons
                .iter_mut()
                .map(|daemon| daemon.try_wait().unwrap())
                .filter(Option::is_some)
                .count()
                == 2
    });
    let mut refused = 0;
    let mut running = Vec::new();
    for mut daemon in daemons {
        if daemon.try_wait().unwrap().is_some() {
            let output = daemon.wait_with_output().unwrap();
            assert_one_line_error(&output, "already a mount point");
            refused += 1;
        } else {
            running.push(daemon);
        }
    }
    assert_eq!((refused, running.len()), (2, 1));
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|line| line.split(' ').nth(4) == mountpoint.to_str())
        .count();
    assert_eq!(mounts, 1, "one mount, not stacked ones");
    for mut daemon in running {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(daemon.id() as i32),
            Signal::SIGTERM,
        )
        .unwrap();
        assert!(daemon.wait().unwrap().success());
    }
    assert!(!mounted_at(&mountpoint));
}

/// `umount <path>`, which must succeed.
fn umount(path: &std::path::Path) {
    assert!(
        Command::new("umount").arg(path).status().unwrap().success(),
        "umount {}",
        path.display()
    );
}

/// Processes that exec while holding a stream file (its fd close-on-exec,
/// as every fd a Rust or Python program opens), beside listings of the
/// mount: the mount keeps answering. An exec closes those fds while it
/// holds the process's exec lock; a close that waited for the daemon
/// (FUSE flush) deadlocked it once a listing read that process's /proc
/// stat, which waits for the same lock, on the threads the flush needed.
#[test]
fn processes_execing_while_holding_a_stream_beside_listings_never_hang_the_mount() {
    use crate::common::peer::Peer;
    let mount = Mount::start(&[]);
    let mut peer = Peer::spawn();
    peer.cmd("comm exec-holder");
    let socket = peer.cmd("udp-bind 127.0.0.1:0");
    let path = mount
        .dir(peer.pid, "exec-holder")
        .join(format!("udp_{}_0.0.0.0:0", socket[1]));
    wait_until(Duration::from_secs(20), "the socket file", || path.exists());
    let held = std::fs::File::open(&path).unwrap();
    let root = mount.path.clone();
    let until = std::time::Instant::now() + Duration::from_secs(4);
    let (done, finished) = crossbeam_channel::unbounded();
    for index in 0..6 {
        let (done, root) = (done.clone(), root.clone());
        std::thread::spawn(move || {
            let mut rounds = 0u32;
            while std::time::Instant::now() < until {
                if index % 2 == 0 {
                    // Each child closes its copy of the fd as it execs.
                    let _ = Command::new("/bin/true").status();
                } else {
                    // Names nobody has: each lookup refreshes the listing.
                    let _ = std::fs::read_dir(&root).map(|dir| dir.count());
                    let _ = std::fs::metadata(root.join(format!("{}_nobody", 4_000_000 + rounds)));
                }
                rounds += 1;
            }
            let _ = done.send(rounds);
        });
    }
    drop(done);
    let mut rounds = Vec::new();
    for _ in 0..6 {
        match finished.recv_timeout(Duration::from_secs(30)) {
            Ok(count) => rounds.push(count),
            Err(_) => {
                // The execs wait for a flush no signal ends: the daemon's
                // death ends it (and this test's own close of the file).
                let log = mount.log();
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(mount.pid() as i32),
                    Signal::SIGKILL,
                );
                panic!(
                    "the mount stopped answering (execs and listings hung)\nthe daemon's log:\n{log}"
                )
            }
        }
    }
    drop(held);
    assert!(rounds.iter().all(|count| *count > 0), "{rounds:?}");
}
