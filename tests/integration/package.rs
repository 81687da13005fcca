//! The Debian package: install it, use it the way mount(8) and fstab do,
//! remove it, and leave the machine as it was.
//!
//! The package is built by scripts/package.sh (scripts/test.sh runs it
//! before the tests): building it here would wait on cargo's lock.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;
use std::time::Duration;

use crate::common::syslog::{SyslogListener, pid_in};
use crate::common::{ScratchDir, mounted_at, try_list, wait_until};

const DEV_LOG: &str = "/dev/log";

const WAIT: Duration = Duration::from_secs(15);

/// One test installs packages at a time.
static DPKG: Mutex<()> = Mutex::new(());

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|err| panic!("{program} runs: {err}"))
}

/// `mount -t fuse.netstatfs netstatfs <at> -o <options>`, as mount(8) and
/// fstab run it.
fn mount_by_type(at: &Path, options: &str) -> Output {
    run(
        "mount",
        &[
            "-t",
            "fuse.netstatfs",
            "netstatfs",
            at.to_str().unwrap(),
            "-o",
            options,
        ],
    )
}

fn the_package() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/debian");
    std::fs::read_dir(&dir)
        .ok()
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "deb"))
        .max_by_key(|path| std::fs::metadata(path).and_then(|m| m.modified()).ok())
        .unwrap_or_else(|| {
            panic!(
                "no .deb in {}: build it with scripts/package.sh",
                dir.display()
            )
        })
}

/// Removes the package (and any mount of it) however the test ends.
struct Installed {
    mounts: Vec<PathBuf>,
}

impl Drop for Installed {
    fn drop(&mut self) {
        for mount in &self.mounts {
            if mounted_at(mount) {
                let _ = run("umount", &["-l", mount.to_str().unwrap()]);
            }
        }
        let _ = run("dpkg", &["--purge", "netstatfs"]);
    }
}

#[test]
fn the_debian_package_installs_mounts_and_removes_cleanly() {
    let _serial = DPKG.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let deb = the_package();
    assert!(
        run("dpkg-query", &["-W", "netstatfs"]).stdout.is_empty(),
        "netstatfs is already installed: the test would not leave the machine as it found it"
    );
    let scratch = ScratchDir::new("package");
    let by_type = scratch.0.join("by-type");
    let by_fstab = scratch.0.join("by-fstab");
    std::fs::create_dir(&by_type).unwrap();
    std::fs::create_dir(&by_fstab).unwrap();
    let mut installed = Installed {
        mounts: vec![by_type.clone(), by_fstab.clone()],
    };

    let install = run("dpkg", &["-i", deb.to_str().unwrap()]);
    assert!(
        install.status.success(),
        "{}",
        String::from_utf8_lossy(&install.stderr)
    );

    let version = run("/usr/bin/netstatfs", &["--version"]);
    assert_eq!(
        String::from_utf8_lossy(&version.stdout).trim(),
        format!("netstatfs {}", env!("CARGO_PKG_VERSION"))
    );
    let man = run("man", &["-w", "netstatfs"]);
    assert!(
        man.status.success(),
        "man -w: {}",
        String::from_utf8_lossy(&man.stderr)
    );
    assert!(String::from_utf8_lossy(&man.stdout).contains("/usr/share/man/man1/netstatfs.1"));
    // The installed page itself: man-db's cache of formatted pages may
    // hold an older install's (the package's files have a fixed mtime).
    let page = run("man", &["-l", "/usr/share/man/man1/netstatfs.1.gz"]);
    let page = String::from_utf8_lossy(&page.stdout);
    for section in [
        "OPTIONS",
        "MOUNTING",
        "FILES AND NAMES",
        "EXTENDED ATTRIBUTES",
        "STREAMS",
        "SECURITY",
        "EXIT STATUS",
        "FILES",
        "EXAMPLES",
        "CAVEATS",
        "SEE ALSO",
    ] {
        assert!(page.contains(section), "the man page lacks {section}");
    }
    // Options with their values' names; every mount option in MOUNTING.
    let flat = page.split_whitespace().collect::<Vec<_>>().join(" ");
    for said in [
        "[--cache-ttl DURATION]",
        "[-o OPTIONS]",
        "[--kernel-buffer SIZE]",
    ] {
        assert!(flat.contains(said), "the synopsis lacks {said}");
    }
    for said in [
        "max_delay=DURATION",
        "max_streams_per_user=N",
        "log=stderr|syslog",
        "no_kernel_events",
    ] {
        assert!(flat.contains(said), "MOUNTING lacks {said}");
    }
    assert!(
        flat.contains("grep -r"),
        "CAVEATS warns of recursive readers"
    );
    // Only root and the netstatfs group may run the capability-granted
    // binary, as wireshark-common does for dumpcap.
    let group = String::from_utf8_lossy(&run("getent", &["group", "netstatfs"]).stdout)
        .trim()
        .to_owned();
    let gid = group
        .split(':')
        .nth(2)
        .expect("a netstatfs group")
        .to_owned();
    let stat = run("stat", &["-c", "%a %U %G", "/usr/bin/netstatfs"]);
    assert_eq!(
        String::from_utf8_lossy(&stat.stdout).trim(),
        "754 root netstatfs"
    );
    // (Through a shell: setpriv itself still holds its capabilities when
    // it execs, and would pass the exec permission check as root does.)
    let as_nobody = |groups: &str| {
        run(
            "setpriv",
            &[
                "--reuid=65534",
                "--regid=65534",
                groups,
                "sh",
                "-c",
                "exec /usr/bin/netstatfs --version",
            ],
        )
    };
    let outsider = as_nobody("--clear-groups");
    assert!(
        !outsider.status.success()
            && String::from_utf8_lossy(&outsider.stderr).contains("Permission denied"),
        "{outsider:?}"
    );
    let member = as_nobody(&format!("--groups={gid}"));
    assert!(member.status.success(), "{member:?}");
    let caps = run("getcap", &["/usr/bin/netstatfs"]);
    let caps = String::from_utf8_lossy(&caps.stdout);
    for cap in [
        "cap_net_raw",
        "cap_net_admin",
        "cap_sys_ptrace",
        "cap_dac_read_search",
        "cap_perfmon",
    ] {
        assert!(caps.contains(cap), "getcap: {caps}");
    }
    for completion in [
        "/usr/share/bash-completion/completions/netstatfs",
        "/usr/share/zsh/vendor-completions/_netstatfs",
        "/usr/share/fish/vendor_completions.d/netstatfs.fish",
    ] {
        let text = std::fs::read_to_string(completion).unwrap_or_default();
        assert!(
            text.contains("cache-ttl") && text.contains("kernel_buffer= max_delay=")
                || text.contains("kernel_buffer=\\nmax_delay="),
            "{completion} completes the options and the mount options"
        );
    }
    // bash offers the mount options after -o, in a comma-separated list.
    let complete = |words: &str| {
        let script = format!(
            "source /usr/share/bash-completion/completions/netstatfs; \
             COMP_WORDS=(netstatfs -o {words}); COMP_CWORD=2; \
             _netstatfs netstatfs {words} -o; echo \"${{COMPREPLY[*]}}\""
        );
        String::from_utf8_lossy(&run("bash", &["-c", &script]).stdout)
            .trim()
            .to_owned()
    };
    assert_eq!(complete("all"), "allow_other all_processes");
    assert_eq!(complete("allow_other,kern"), "allow_other,kernel_buffer=");
    let verify = run(
        "systemd-analyze",
        &["verify", "/usr/lib/systemd/system/netstatfs.service"],
    );
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );

    // Detached, the daemon logs to syslog: /dev/log, unless this machine
    // has a syslog of its own there (then a private socket, named in the
    // options, stands in for it).
    let (syslog, log_option) = if Path::new(DEV_LOG).exists() {
        let listener = SyslogListener::bind(scratch.0.join("log"));
        let option = format!(",syslog_socket={}", listener.path.display());
        (listener, option)
    } else {
        (SyslogListener::bind(PathBuf::from(DEV_LOG)), String::new())
    };

    // mount -t fuse.netstatfs: returns once mounted, serves in the
    // background, stops on umount.
    let options = format!("allow_other,cache_ttl=2s{log_option}");
    let mount = mount_by_type(&by_type, &options);
    assert!(
        mount.status.success(),
        "{}",
        String::from_utf8_lossy(&mount.stderr)
    );
    assert!(mounted_at(&by_type), "mounted when mount returns");
    let started = syslog.wait_for(&format!("mounted at {}", by_type.display()));
    let first = pid_in(&started).expect("the daemon's pid in its syslog line");
    assert!(try_list(&by_type).is_some(), "lists");
    // Wireshark lists the extcap from its own folder, unprivileged, and
    // the extcap reads this mount.
    let folders = String::from_utf8_lossy(&run("tshark", &["-G", "folders"]).stdout).into_owned();
    let extcap_folder = folders
        .lines()
        .find_map(|line| line.strip_prefix("Extcap path:"))
        .expect("tshark names its extcap folder")
        .trim()
        .to_owned();
    let extcap = format!("{extcap_folder}/netstatfs-extcap");
    let stat = run("stat", &["-c", "%a %U", &extcap]);
    assert_eq!(String::from_utf8_lossy(&stat.stdout).trim(), "755 root");
    assert!(
        run("getcap", &[&extcap]).stdout.is_empty(),
        "the extcap holds no capability"
    );
    let devices = run("tshark", &["-D"]);
    assert!(
        String::from_utf8_lossy(&devices.stdout)
            .lines()
            .any(|line| line.ends_with("netstatfs (Processes and sockets (netstatfs))")),
        "tshark -D: {}",
        String::from_utf8_lossy(&devices.stdout)
    );
    let config = run(
        &extcap,
        &[
            "--extcap-interface",
            "netstatfs",
            "--extcap-config",
            "--mount",
            by_type.to_str().unwrap(),
        ],
    );
    assert!(
        String::from_utf8_lossy(&config.stdout).contains("{call=--pid}"),
        "{config:?}"
    );
    assert!(run("man", &["-w", "netstatfs-extcap"]).status.success());
    // umount && mount: the old daemon gives the mountpoint back at once.
    let umount = run("umount", &[by_type.to_str().unwrap()]);
    assert!(umount.status.success());
    assert!(!mounted_at(&by_type));
    let again = mount_by_type(&by_type, &options);
    assert!(
        again.status.success(),
        "mounting again at once: {}",
        String::from_utf8_lossy(&again.stderr)
    );
    syslog.wait_for(&format!(
        "netstatfs[{first}]: {} was unmounted",
        by_type.display()
    ));
    assert!(run("umount", &[by_type.to_str().unwrap()]).status.success());
    assert!(!mounted_at(&by_type));
    let daemons = || {
        String::from_utf8_lossy(&run("pgrep", &["-f", "^netstatfs netstatfs"]).stdout)
            .trim()
            .to_owned()
    };
    wait_until(WAIT, "the background daemon to exit after umount", || {
        daemons().is_empty()
    });

    // An fstab line, from an alternative fstab.
    let fstab = scratch.0.join("fstab");
    std::fs::write(
        &fstab,
        format!(
            "netstatfs {} fuse.netstatfs allow_other,noauto 0 0\n",
            by_fstab.display()
        ),
    )
    .unwrap();
    let mount = run(
        "mount",
        &[
            "--fstab",
            fstab.to_str().unwrap(),
            by_fstab.to_str().unwrap(),
        ],
    );
    assert!(
        mount.status.success(),
        "{}",
        String::from_utf8_lossy(&mount.stderr)
    );
    assert!(mounted_at(&by_fstab));
    assert!(try_list(&by_fstab).is_some());
    assert!(
        run("umount", &[by_fstab.to_str().unwrap()])
            .status
            .success()
    );
    wait_until(WAIT, "the fstab daemon to exit", || daemons().is_empty());

    // An unknown mount option is an error naming it.
    let bad = mount_by_type(&by_type, "colour=blue");
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("colour"),
        "{bad:?}"
    );
    assert!(!mounted_at(&by_type));

    // Removed, nothing of it is left.
    installed.mounts.clear();
    drop(installed);
    assert!(
        run("dpkg-query", &["-W", "netstatfs"]).stdout.is_empty()
            || !Path::new("/usr/bin/netstatfs").exists()
    );
    assert!(
        run("getent", &["group", "netstatfs"]).stdout.is_empty(),
        "the netstatfs group left behind"
    );
    assert!(
        !run("dpkg-statoverride", &["--list", "/usr/bin/netstatfs"])
            .status
            .success(),
        "the stat override left behind"
    );
    for path in [
        "/usr/bin/netstatfs",
        "/usr/share/man/man1/netstatfs.1.gz",
        "/usr/share/bash-completion/completions/netstatfs",
        "/usr/lib/systemd/system/netstatfs.service",
    ] {
        assert!(!Path::new(path).exists(), "{path} left behind");
    }
}
