//! The daemon's life: start-up checks, the mount, then a wait for a signal
//! (Ctrl-C, SIGTERM, SIGHUP) or an unmount by someone else, and a clean
//! exit either way: waiting reads answered, captures stopped, nothing left
//! in the mount table.
//!
//! Where fusermount3 can do it, the mount uses FUSE's auto-unmount: a small
//! fusermount3 process that outlives a killed daemon and removes the mount,
//! so even SIGKILL leaves no "Transport endpoint is not connected" behind.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crossbeam_channel::select;
use fuser::{Config, MountOption, Session, SessionACL};
use log::{debug, info, warn};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::capture::source::CaptureSettings;
use crate::cli::Cli;
use crate::fs::{FsOptions, NetstatFs};
use crate::inventory::containers::RuntimeOptions;
use crate::stream::quota::StreamLimits;
use crate::stream::table::StreamTable;

/// How long an exit waits for the kernel to finish the unmount.
const UNMOUNT_WAIT: Duration = Duration::from_secs(3);
/// How soon after the mount left the table its session ends if it was a
/// plain unmount (no file held it).
const PLAIN_UNMOUNT_WAIT: Duration = Duration::from_millis(300);

/// Runs netstatfs until it is stopped. Err is one line for the user.
///
/// `on_mounted` gets one friendly line once the mount is up (where, how
/// many processes and sockets, how to stop it).
pub fn run(cli: &Cli, on_mounted: impl FnOnce(&str)) -> Result<(), String> {
    let mountpoint = cli.mountpoint();
    check_mountpoint(&mountpoint)?;
    // Held until exit; checked again once held, since a daemon that held it
    // a moment ago may have mounted since.
    let claim = claim_mountpoint(&mountpoint)?;
    check_mountpoint(&mountpoint)?;
    check_dev_fuse()?;
    check_interface(&cli.interface)?;
    crate::memory::configure();
    if cli.allow_other && !nix::unistd::geteuid().is_root() && !user_allow_other() {
        return Err(
            "--allow-other needs user_allow_other in /etc/fuse.conf for a user who is not root \
             (as root: echo user_allow_other >> /etc/fuse.conf)"
                .into(),
        );
    }

    let streams = StreamTable::new(StreamLimits {
        per_user: cli.max_streams_per_user as usize,
        total: cli.max_streams as usize,
    });
    let options = FsOptions {
        cache_ttl: cli.cache_ttl,
        all_processes: cli.all_processes,
        capture: CaptureSettings {
            interface: cli.interface.clone(),
            snaplen: cli.snaplen,
            kernel_buffer: cli.kernel_buffer,
            max_delay: cli.max_delay,
        },
        stream_buffer: cli.buffer,
        format: cli.format.into(),
        allow_other: cli.allow_other,
        kernel_events: !cli.no_kernel_events,
        unix: cli.unix,
        runtimes: RuntimeOptions {
            docker_root: cli.docker_root.clone(),
            containerd_state: Some(cli.containerd_state.clone()),
        },
    };
    let fs = NetstatFs::new(options, streams.clone());
    let (processes, sockets) = {
        let tree = fs.tree();
        // What the root lists: processes holding a socket (every one with
        // --all-processes), and their sockets.
        let listed = tree.dirs.iter().filter(|dir| dir.listed);
        (
            listed.clone().count(),
            listed.map(|dir| dir.files.len()).sum::<usize>(),
        )
    };
    let mut signals = Signals::new([SIGINT, SIGTERM, SIGHUP])
        .map_err(|err| format!("cannot install signal handlers: {err}"))?;
    let signals_handle = signals.handle();
    // Resolved before mounting: afterwards the path leads into the mount,
    // which answers nothing until the session runs.
    let canonical = mountpoint
        .canonicalize()
        .unwrap_or_else(|_| mountpoint.clone());
    let session = mount(fs, &mountpoint, cli.allow_other)?;
    let (detached_tx, detached_rx) = crossbeam_channel::bounded(1);
    let mount_watch = MountWatch::start(&canonical, detached_tx);
    crate::privileges::report_missing();
    // Before any thread starts: threads inherit their creator's capabilities.
    if let Err(err) = crate::privileges::drop_unused() {
        warn!("{err}");
    }
    let watchdog = streams
        .spawn_watchdog()
        .map_err(|err| format!("cannot start a thread: {err}"))?;
    let captures = crate::capture::service::Service::start()
        .map_err(|err| format!("cannot start a thread: {err}"))?;
    let servers =
        crate::stream::Servers::start().map_err(|err| format!("cannot start a thread: {err}"))?;
    let trackers = crate::stream::tracking::Trackers::start()
        .map_err(|err| format!("cannot start a thread: {err}"))?;

    let (ended_tx, ended_rx) = crossbeam_channel::bounded(1);
    std::thread::Builder::new()
        .name("fuse".into())
        .spawn(move || {
            let _ = ended_tx.send(session.run());
        })
        .map_err(|err| format!("cannot start a thread: {err}"))?;
    let (signal_tx, signal_rx) = crossbeam_channel::bounded(4);
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for signal in signals.forever() {
                if signal_tx.send(signal).is_err() {
                    break;
                }
            }
        })
        .map_err(|err| format!("cannot start a thread: {err}"))?;

    on_mounted(&format!(
        "mounted at {}: {processes} processes, {sockets} sockets. Stop with Ctrl-C or umount {}",
        mountpoint.display(),
        mountpoint.display()
    ));
    select! {
        recv(ended_rx) -> ended => {
            if let Ok(Err(err)) = ended {
                warn!("the FUSE session ended with an error: {err}");
            }
            info!("{} was unmounted; exiting", mountpoint.display());
            streams.shutdown();
        }
        recv(detached_rx) -> _ => {
            // The mount left the mount table. A plain unmount ends the
            // session at once; `umount -l` with files open leaves the mount
            // (and this daemon's session) to the kernel until the last of
            // them closes: readers get EOF and close, the session then ends.
            if ended_rx.recv_timeout(PLAIN_UNMOUNT_WAIT).is_ok() {
                info!("{} was unmounted; exiting", mountpoint.display());
                streams.shutdown();
            } else {
                info!(
                    "{} was detached (umount -l) with files open; ending their streams and exiting",
                    mountpoint.display()
                );
                streams.shutdown();
                if ended_rx.recv_timeout(UNMOUNT_WAIT).is_err() {
                    debug!("a process still holds the detached mount; exiting all the same");
                }
            }
        }
        recv(signal_rx) -> signal => {
            let name = signal.ok().and_then(signal_name).unwrap_or("a signal");
            info!("{name}: unmounting {}", mountpoint.display());
            // Answer waiting reads first: the unmount cannot finish while a
            // reader is stuck in the file system.
            streams.shutdown();
            unmount(&mountpoint);
            if ended_rx.recv_timeout(UNMOUNT_WAIT).is_err() {
                debug!("a reader still holds a file open; exiting with the mount detached");
            }
        }
    }
    // The mountpoint is free for the next daemon now; what is left is this
    // one's own winding down.
    drop(claim);
    debug!("winding down");
    signals_handle.close();
    let _ = watchdog.join();
    captures.stop();
    trackers.stop();
    servers.stop();
    if let Some(watch) = mount_watch {
        watch.stop();
    }
    crate::stream::closings::say_held();
    debug!("wound down");
    Ok(())
}

/// Takes an exclusive lock on the mountpoint directory, so that of several
/// daemons started at once on one directory exactly one mounts: the others
/// find it taken (or, once mounted, find the mount). A daemon whose mount
/// has just gone gives the lock back within moments (`umount m && mount m`
/// must work): the lock is waited for up to [`CLAIM_WAIT`].
fn claim_mountpoint(mountpoint: &Path) -> Result<std::fs::File, String> {
    use rustix::fs::{FlockOperation, flock};
    let shown = mountpoint.display();
    let dir =
        std::fs::File::open(mountpoint).map_err(|err| format!("mountpoint {shown}: {err}"))?;
    let deadline = std::time::Instant::now() + CLAIM_WAIT;
    loop {
        match flock(&dir, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => return Ok(dir),
            Err(rustix::io::Errno::WOULDBLOCK) if std::time::Instant::now() < deadline => {
                // The holder may have mounted meanwhile: that is the answer.
                check_mountpoint(mountpoint)?;
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(rustix::io::Errno::WOULDBLOCK) => {
                let holder = lock_holder(&dir)
                    .map(|pid| format!(" (pid {pid})"))
                    .unwrap_or_default();
                return Err(format!(
                    "another netstatfs{holder} is starting on {shown};                      wait for it to mount, or stop it"
                ));
            }
            Err(err) => return Err(format!("cannot lock mountpoint {shown}: {err}")),
        }
    }
}

/// How long a daemon waits for the mountpoint's lock.
const CLAIM_WAIT: Duration = Duration::from_secs(1);

/// The process holding the flock on `dir`, from /proc/locks.
fn lock_holder(dir: &std::fs::File) -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    let metadata = dir.metadata().ok()?;
    let (major, minor) = (
        nix::libc::major(metadata.dev()),
        nix::libc::minor(metadata.dev()),
    );
    let file = format!("{major:02x}:{minor:02x}:{}", metadata.ino());
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    lock_holder_in(&locks, &file)
}

/// The pid holding an flock on `file` ("major:minor:inode" as /proc/locks
/// writes it), from the text of /proc/locks (pure).
fn lock_holder_in(locks: &str, file: &str) -> Option<u32> {
    locks.lines().find_map(|line| {
        // "1: FLOCK  ADVISORY  WRITE 14506 fe:00:10027106 0 EOF"
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.contains(&"->") {
            // Waiting for the lock, not holding it.
            return None;
        }
        let at = fields.iter().position(|field| *field == "FLOCK")?;
        let pid = fields.get(at + 3)?;
        (fields.get(at + 4) == Some(&file)).then(|| pid.parse().ok())?
    })
}

/// Watches the mount table for this daemon's mount to leave it (a lazy
/// unmount, `umount -l`, which ends no FUSE session while files are open).
struct MountWatch {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl MountWatch {
    /// None where the mount cannot be found in /proc/self/mountinfo (it is
    /// then not watched: a plain unmount still ends the session).
    fn start(mountpoint: &Path, detached: crossbeam_channel::Sender<()>) -> Option<MountWatch> {
        use std::sync::atomic::{AtomicBool, Ordering};
        let mount_id = own_mount_id(mountpoint)?;
        let table = std::fs::File::open("/proc/self/mountinfo").ok()?;
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let stopped = std::sync::Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("mount-watch".into())
            .spawn(move || {
                use rustix::event::{PollFd, PollFlags, Timespec, poll};
                let tick = Timespec {
                    tv_sec: 0,
                    tv_nsec: 200_000_000,
                };
                while !stopped.load(Ordering::SeqCst) {
                    // POLLPRI: the mount table changed since the last poll.
                    let mut fds = [PollFd::new(&table, PollFlags::PRI)];
                    if !matches!(poll(&mut fds, Some(&tick)), Ok(n) if n > 0) {
                        continue;
                    }
                    if !mount_ids().contains(&mount_id) {
                        let _ = detached.send(());
                        return;
                    }
                }
            })
            .ok()?;
        Some(MountWatch { stop, thread })
    }

    fn stop(self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = self.thread.join();
    }
}

/// The id of the netstatfs mount at `canonical` (the topmost one).
fn own_mount_id(canonical: &Path) -> Option<i32> {
    procfs::process::Process::myself()
        .ok()?
        .mountinfo()
        .ok()?
        .into_iter()
        .rfind(|mount| {
            mount.mount_point == canonical && mount.mount_source.as_deref() == Some("netstatfs")
        })
        .map(|mount| mount.mnt_id)
}

fn mount_ids() -> Vec<i32> {
    procfs::process::Process::myself()
        .and_then(|me| me.mountinfo())
        .map(|mounts| mounts.into_iter().map(|mount| mount.mnt_id).collect())
        .unwrap_or_default()
}

/// Runs netstatfs in the background, as mount(8) expects of a FUSE file
/// system: the process forks (before any thread exists), the parent waits
/// until the child has mounted, then returns; the child serves until
/// unmounted. A start-up error reaches the parent and its caller.
pub fn run_in_background(cli: &Cli) -> Result<(), String> {
    use nix::unistd::{ForkResult, fork, pipe2, setsid};
    use std::io::{BufRead, Write};
    // Close-on-exec: the fusermount3 helper the child starts must not hold
    // the parent's end open.
    let (report_read, report_write) =
        pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|err| format!("cannot make a pipe: {err}"))?;
    // SAFETY: no other thread exists yet (nothing has been started), so
    // the child may run any code.
    match unsafe { fork() }.map_err(|err| format!("cannot fork: {err}"))? {
        ForkResult::Parent { .. } => {
            drop(report_write);
            // One line: "ok", or the reason it did not mount.
            let mut report = String::new();
            let _ =
                std::io::BufReader::new(std::fs::File::from(report_read)).read_line(&mut report);
            match report.strip_prefix("ok") {
                Some(_) => Ok(()),
                None if report.is_empty() => Err("netstatfs stopped before mounting".into()),
                None => Err(report.trim().to_owned()),
            }
        }
        ForkResult::Child => {
            drop(report_read);
            let _ = setsid();
            let mut report = Some(std::fs::File::from(report_write));
            let result = run(cli, |line| {
                crate::logging::detaching();
                info!("{line}");
                if let Some(mut report) = report.take() {
                    let _ = report.write_all(b"ok\n");
                }
                detach_from_terminal();
            });
            match (&result, report.take()) {
                (Err(message), Some(mut report)) => {
                    let _ = writeln!(report, "{message}");
                }
                // Detached: the caller has gone, syslog hears it.
                (Err(message), None) => log::error!("{message}"),
                _ => {}
            }
            result
        }
    }
}

/// Points stdin, stdout and stderr at /dev/null: the caller's terminal is
/// not the daemon's any more.
fn detach_from_terminal() {
    if let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        let _ = nix::unistd::dup2_stdin(&null);
        let _ = nix::unistd::dup2_stdout(&null);
        let _ = nix::unistd::dup2_stderr(&null);
    }
}

fn signal_name(signal: i32) -> Option<&'static str> {
    match signal {
        SIGINT => Some("SIGINT"),
        SIGTERM => Some("SIGTERM"),
        SIGHUP => Some("SIGHUP"),
        _ => None,
    }
}

/// The mountpoint must be an existing directory that nothing is mounted on.
fn check_mountpoint(mountpoint: &Path) -> Result<(), String> {
    let shown = mountpoint.display();
    match std::fs::metadata(mountpoint) {
        Ok(metadata) if metadata.is_dir() => {}
        Ok(_) => return Err(format!("mountpoint {shown} is not a directory")),
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            return Err(format!(
                "mountpoint {shown} does not exist (create it with: mkdir {shown})"
            ));
        }
        Err(err) if err.raw_os_error() == Some(nix::libc::ENOTCONN) => {
            return Err(format!(
                "mountpoint {shown} is a dead FUSE mount (its daemon is gone); clear it with: fusermount3 -u {shown}"
            ));
        }
        Err(err) => return Err(format!("mountpoint {shown}: {err}")),
    }
    // Another FUSE file system there (another netstatfs, mostly) is a
    // mistake; any other mount is a place to mount on, as mount(8) takes
    // it: in a container the mount point is the bind of the node's
    // directory that carries the mount out.
    if let Some(fs_type) = mounted_fs_type(mountpoint)
        && (fs_type == "fuse" || fs_type.starts_with("fuse."))
    {
        return Err(format!(
            "{shown} is already a mount point ({fs_type}); unmount it first (umount {shown})"
        ));
    }
    Ok(())
}

fn check_dev_fuse() -> Result<(), String> {
    use nix::unistd::{AccessFlags, access};
    let path = Path::new("/dev/fuse");
    if !path.exists() {
        return Err("/dev/fuse is missing: load the fuse module (modprobe fuse), or in a container pass the device in (--device /dev/fuse)".into());
    }
    // fusermount3 opens it as the user: the fuse3 package's udev rule makes
    // it 0666, which machines without udev never apply.
    if access(path, AccessFlags::R_OK | AccessFlags::W_OK).is_err() {
        return Err("/dev/fuse is not open to this user (the fuse3 package makes it mode 0666; as root: chmod 0666 /dev/fuse)".into());
    }
    Ok(())
}

/// `--interface` must name an interface here (or be `any`): a name that
/// exists nowhere would fail every read later.
fn check_interface(name: &str) -> Result<(), String> {
    if name == "any" || nix::net::if_::if_nametoindex(name).is_ok() {
        return Ok(());
    }
    let here: Vec<String> = nix::net::if_::if_nameindex()
        .map(|interfaces| {
            interfaces
                .iter()
                .map(|interface| interface.name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    Err(format!(
        "no interface {name:?} here (there are: {}); --interface takes one of them, or any",
        here.join(", ")
    ))
}

/// The file system type mounted at `path`, if something is.
fn mounted_fs_type(path: &Path) -> Option<String> {
    let canonical: PathBuf = path.canonicalize().ok()?;
    let mounts = procfs::process::Process::myself().ok()?.mountinfo().ok()?;
    mounts
        .into_iter()
        .rfind(|mount| mount.mount_point == canonical)
        .map(|mount| match mount.fs_type.as_str() {
            "fuse" => format!("fuse.{}", mount.mount_source.unwrap_or_default()),
            other => other.to_owned(),
        })
}

/// Unmounts, or where a file is still open (EBUSY), detaches the mount: it
/// leaves the tree now and the kernel when the last open file closes.
///
/// fuser's own unmount is not used: with auto-unmount it only closes the
/// socket to fusermount3, which then unmounts nothing while the daemon is
/// still answering.
fn unmount(path: &Path) {
    use nix::mount::{MntFlags, umount2};
    let unmounted = if nix::unistd::geteuid().is_root() {
        umount2(path, MntFlags::empty()).is_ok() || umount2(path, MntFlags::MNT_DETACH).is_ok()
    } else {
        let fusermount = |lazy: bool| {
            let mut command = std::process::Command::new("fusermount3");
            command.arg("-u").arg("-q");
            if lazy {
                command.arg("-z");
            }
            command
                .arg("--")
                .arg(path)
                .status()
                .is_ok_and(|status| status.success())
        };
        fusermount(false) || fusermount(true)
    };
    if !unmounted {
        warn!(
            "could not unmount {}; run: fusermount3 -u -z {}",
            path.display(),
            path.display()
        );
    }
}

/// Mounts read-only, private to the mounting user (and root) unless
/// `allow_other`, with auto-unmount where fusermount3 can provide it.
fn mount(
    fs: NetstatFs,
    mountpoint: &Path,
    allow_other: bool,
) -> Result<Session<NetstatFs>, String> {
    let auto_unmount = auto_unmount_available(allow_other);
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::RO,
        MountOption::FSName("netstatfs".into()),
        MountOption::Subtype("netstatfs".into()),
        MountOption::DefaultPermissions,
        MountOption::NoSuid,
        MountOption::NoDev,
        MountOption::NoExec,
        MountOption::NoAtime,
    ];
    config.acl = match (allow_other, auto_unmount) {
        (true, _) => SessionACL::All,
        // auto_unmount needs the kernel's allow_other; fuser then refuses
        // other users itself, so the mount stays private.
        (false, true) => SessionACL::RootAndOwner,
        (false, false) => SessionACL::Owner,
    };
    if auto_unmount {
        config.mount_options.push(MountOption::AutoUnmount);
    }
    let session = Session::new(fs, mountpoint, &config)
        .map_err(|err| format!("cannot mount on {}: {err}", mountpoint.display()))?;
    if !auto_unmount {
        warn!(
            "fusermount3 cannot auto-unmount here: if netstatfs is killed, clear the mount with fusermount3 -u"
        );
    }
    Ok(session)
}

/// Auto-unmount goes through fusermount3, and needs the kernel's
/// allow_other: always allowed for root, for others only where
/// /etc/fuse.conf says user_allow_other.
fn auto_unmount_available(allow_other: bool) -> bool {
    // In PATH, or where fuser also looks: mount(8) may start us with none.
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect())
        .unwrap_or_default();
    dirs.extend(["/bin", "/sbin"].map(PathBuf::from));
    let has_fusermount3 = dirs.iter().any(|dir| dir.join("fusermount3").is_file());
    if !has_fusermount3 {
        return false;
    }
    nix::unistd::geteuid().is_root() || allow_other || user_allow_other()
}

/// Whether /etc/fuse.conf lets users other than root mount with allow_other.
fn user_allow_other() -> bool {
    std::fs::read_to_string("/etc/fuse.conf")
        .is_ok_and(|conf| conf.lines().any(|line| line.trim() == "user_allow_other"))
}

#[cfg(test)]
mod tests {
    use super::lock_holder_in;

    #[test]
    fn the_holder_of_a_mountpoints_lock_is_read_from_proc_locks() {
        let locks = "1: POSIX  ADVISORY  WRITE 700 fe:00:10027106 0 EOF\n\
                     2: FLOCK  ADVISORY  WRITE 14506 fe:00:10027106 0 EOF\n\
                     3: FLOCK  ADVISORY  WRITE 99 fe:00:5 0 EOF\n";
        assert_eq!(lock_holder_in(locks, "fe:00:10027106"), Some(14506));
        assert_eq!(lock_holder_in(locks, "fe:00:5"), Some(99));
        assert_eq!(lock_holder_in(locks, "fe:00:6"), None);
        // A waiting lock ("->") is not the holder.
        assert_eq!(
            lock_holder_in("1: -> FLOCK  ADVISORY  WRITE 5 fe:00:7 0 EOF\n", "fe:00:7"),
            None
        );
    }
}
