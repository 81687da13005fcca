//! The tree: names, attributes, extended attributes, read-only-ness,
//! namespaces, vanishing processes and big directories.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, SystemTime};

use crate::common::mount::Mount;
use crate::common::netns::Netns;
use crate::common::peer::Peer;
use crate::common::{list, try_list, wait_for, wait_until, xattr};

const WAIT: Duration = Duration::from_secs(10);

/// Waits until process directory `dir` lists exactly the socket files
/// `expected` (order aside), and its `all` and `tree` files.
fn wait_for_listing(dir: &Path, expected: &[String]) {
    let mut expected = expected.to_vec();
    expected.push("all".to_owned());
    expected.push("tree".to_owned());
    expected.sort();
    let mut last = None;
    let shown = dir.display().to_string();
    wait_until(
        WAIT,
        &format!("{shown} to list {expected:?} (last seen {last:?})"),
        || {
            let now = try_list(dir);
            let done = now.as_deref() == Some(&expected[..]);
            last = now;
            done
        },
    );
}

#[test]
fn sockets_are_files_named_proto_local_remote() {
    let mount = Mount::start(&[]);
    let mut peer = Peer::spawn();
    peer.cmd("comm names-peer");
    let listener = peer.cmd("tcp-listen 127.0.0.1:0");
    let client = peer.cmd(&format!("tcp-connect {}", listener[1]));
    let accepted = peer.cmd(&format!("tcp-accept {}", listener[0]));
    let udp6 = peer.cmd("udp-bind [::1]:0");
    let udp_any = peer.cmd("udp-bind 0.0.0.0:0");
    // A dual-stack listener and an IPv4 client: the accepted socket has
    // IPv4-mapped addresses.
    let dual = peer.cmd("tcp-listen [::]:0");
    let dual_port = dual[1].rsplit(':').next().unwrap().to_owned();
    let v4_client = peer.cmd(&format!("tcp-connect 127.0.0.1:{dual_port}"));
    peer.cmd(&format!("tcp-accept {}", dual[0]));
    let v4_client_port = v4_client[1].rsplit(':').next().unwrap();

    let expected = vec![
        format!("tcp_{}_0.0.0.0:0", listener[1]),
        format!("tcp_{}_{}", client[1], client[2]),
        format!("tcp_{}_{}", accepted[1], accepted[2]),
        format!("udp6_{}_[::]:0", udp6[1]),
        format!("udp_{}_0.0.0.0:0", udp_any[1]),
        format!("tcp6_[::]:{dual_port}_[::]:0"),
        format!("tcp_{}_{}", v4_client[1], v4_client[2]),
        format!("tcp6_[::ffff:127.0.0.1]:{dual_port}_[::ffff:127.0.0.1]:{v4_client_port}"),
    ];
    assert!(expected[3].starts_with("udp6_[::1]:"), "{expected:?}");
    wait_for_listing(&mount.dir(peer.pid, "names-peer"), &expected);
    assert!(list(&mount.path).contains(&format!("{}_names-peer", peer.pid)));
}

#[test]
fn a_comm_with_a_slash_and_a_space_is_made_safe() {
    let mount = Mount::start(&[]);
    let mut peer = Peer::spawn();
    peer.cmd("comm odd/name here");
    let listener = peer.cmd("tcp-listen 127.0.0.1:0");
    let dir = mount.dir(peer.pid, "odd_name here");
    wait_for_listing(&dir, &[format!("tcp_{}_0.0.0.0:0", listener[1])]);
    assert_eq!(
        xattr(&dir, "user.netstatfs.comm").as_deref(),
        Some("odd/name here")
    );
}

#[test]
fn dup_fds_give_one_file_and_xattrs_describe_the_socket() {
    let mount = Mount::start(&[]);
    let mut peer = Peer::spawn();
    peer.cmd("comm xattr-peer");
    let udp = peer.cmd("udp-bind 127.0.0.1:0");
    let fd = peer.cmd(&format!("fd {}", udp[0]))[0].clone();
    let dup_fd = peer.cmd(&format!("dup {}", udp[0]))[1].clone();
    let inode = peer.cmd(&format!("inode {}", udp[0]))[0].clone();
    let dir = mount.dir(peer.pid, "xattr-peer");
    let name = format!("udp_{}_0.0.0.0:0", udp[1]);
    wait_for_listing(&dir, std::slice::from_ref(&name));
    let file = dir.join(&name);

    let netns = std::fs::read_link(format!("/proc/{}/ns/net", peer.pid)).unwrap();
    let netns = netns
        .to_str()
        .unwrap()
        .trim_start_matches("net:[")
        .trim_end_matches(']')
        .to_owned();
    let value = |attr: &str| xattr(&file, &format!("user.netstatfs.{attr}")).unwrap();
    assert_eq!(value("proto"), "udp");
    assert_eq!(value("state"), "UNCONN");
    assert_eq!(value("local"), udp[1]);
    assert_eq!(value("remote"), "0.0.0.0:0");
    assert_eq!(value("inode"), inode);
    assert_eq!(value("uid"), "0");
    assert_eq!(value("rx_queue"), "0");
    assert_eq!(value("tx_queue"), "0");
    assert_eq!(value("fds"), format!("{fd},{dup_fd}"));
    assert_eq!(value("netns"), netns);
    assert_eq!(xattr(&file, "user.netstatfs.nope"), None);

    // getfattr -d shows them all.
    let dump = std::process::Command::new("getfattr")
        .arg("-d")
        .arg(&file)
        .output()
        .unwrap();
    let dump = String::from_utf8(dump.stdout).unwrap();
    for attr in [
        "proto", "state", "inode", "uid", "local", "remote", "rx_queue", "tx_queue", "fds", "netns",
    ] {
        assert!(
            dump.contains(&format!("user.netstatfs.{attr}=")),
            "{attr} missing from:\n{dump}"
        );
    }

    // The size-probe protocol: size 0 asks for the length, a short buffer
    // is ERANGE.
    let path = CString::new(file.as_os_str().as_bytes()).unwrap();
    let attr = CString::new("user.netstatfs.local").unwrap();
    // SAFETY: valid C strings; a null buffer with size 0 is the probe.
    let length =
        unsafe { nix::libc::getxattr(path.as_ptr(), attr.as_ptr(), std::ptr::null_mut(), 0) };
    assert_eq!(length as usize, udp[1].len());
    let mut short = [0u8; 4];
    // SAFETY: the buffer is 4 bytes long, as passed.
    let result = unsafe {
        nix::libc::getxattr(
            path.as_ptr(),
            attr.as_ptr(),
            short.as_mut_ptr().cast(),
            short.len(),
        )
    };
    assert_eq!(result, -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(nix::libc::ERANGE)
    );
    // SAFETY: as above, for listxattr.
    let list_length = unsafe { nix::libc::listxattr(path.as_ptr(), std::ptr::null_mut(), 0) };
    let mut names = vec![0u8; list_length as usize];
    // SAFETY: the buffer has the length just reported.
    let listed =
        unsafe { nix::libc::listxattr(path.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    assert_eq!(listed, list_length);
    // The ten of the table row, and the five memory counters socket
    // diagnostics gives for a UDP socket.
    let listed_names: Vec<&[u8]> = names.split(|&b| b == 0).filter(|n| !n.is_empty()).collect();
    assert_eq!(
        listed_names.len(),
        15,
        "{:?}",
        String::from_utf8_lossy(&names)
    );
    assert_eq!(
        listed_names
            .iter()
            .filter(|name| name.starts_with(b"user.netstatfs.mem."))
            .count(),
        5
    );
    // SAFETY: a 4-byte buffer, as passed.
    let result =
        unsafe { nix::libc::listxattr(path.as_ptr(), short.as_mut_ptr().cast(), short.len()) };
    assert_eq!(result, -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(nix::libc::ERANGE)
    );
}

#[test]
fn attributes_modes_owners_links_and_stable_inodes() {
    let started = SystemTime::now();
    let mount = Mount::start(&[]);
    let mut peer = Peer::spawn();
    peer.cmd("comm attr-peer");
    let listener = peer.cmd("tcp-listen 127.0.0.1:0");
    let udp = peer.cmd("udp-bind 127.0.0.1:0");
    let dir = mount.dir(peer.pid, "attr-peer");
    let tcp_name = format!("tcp_{}_0.0.0.0:0", listener[1]);
    let udp_name = format!("udp_{}_0.0.0.0:0", udp[1]);
    wait_for_listing(&dir, &[tcp_name.clone(), udp_name.clone()]);

    let root = std::fs::metadata(&mount.path).unwrap();
    assert!(root.is_dir());
    // Private: the mounting user's alone (and root's).
    assert_eq!(root.permissions().mode() & 0o7777, 0o500);
    assert_eq!(root.ino(), 1);

    let proc_dir = std::fs::metadata(format!("/proc/{}/fd", peer.pid)).unwrap();
    let dir_meta = std::fs::metadata(&dir).unwrap();
    assert!(dir_meta.is_dir());
    // As /proc/<pid>/fd: its owner's (root's while not dumpable), 0500.
    assert_eq!(dir_meta.permissions().mode() & 0o7777, 0o500);
    assert_eq!(
        (dir_meta.uid(), dir_meta.gid()),
        (proc_dir.uid(), proc_dir.gid())
    );
    assert_eq!(dir_meta.nlink(), 2);
    // The directory's times are the process's start.
    let dir_time = dir_meta.modified().unwrap();
    assert!(dir_time <= SystemTime::now());
    assert!(
        dir_time + Duration::from_secs(2) >= started,
        "{dir_time:?} long before {started:?}"
    );

    let file = std::fs::metadata(dir.join(&tcp_name)).unwrap();
    assert!(file.is_file());
    assert_eq!(file.permissions().mode() & 0o7777, 0o400);
    assert_eq!((file.uid(), file.len(), file.nlink()), (0, 0, 1));
    let udp_file = std::fs::metadata(dir.join(&udp_name)).unwrap();
    assert_ne!(file.ino(), udp_file.ino());
    assert_ne!(file.ino(), dir_meta.ino());

    // Stable across snapshots (the TTL is 100 ms).
    let first = (dir_meta.ino(), file.ino());
    std::thread::sleep(Duration::from_millis(300));
    let again = (
        std::fs::metadata(&dir).unwrap().ino(),
        std::fs::metadata(dir.join(&tcp_name)).unwrap().ino(),
    );
    assert_eq!(first, again);

    // The root's link count counts its directories.
    let root = std::fs::metadata(&mount.path).unwrap();
    let dirs = list(&mount.path).len() as u64;
    assert!(
        root.nlink() >= 2 + dirs.saturating_sub(2) && root.nlink() <= 2 + dirs + 2,
        "nlink {} for {dirs} dirs",
        root.nlink()
    );
}

#[test]
fn the_mount_is_read_only() {
    let mount = Mount::start(&[]);
    let mut peer = Peer::spawn();
    peer.cmd("comm ro-peer");
    let listener = peer.cmd("tcp-listen 127.0.0.1:0");
    let dir = mount.dir(peer.pid, "ro-peer");
    let name = format!("tcp_{}_0.0.0.0:0", listener[1]);
    wait_for_listing(&dir, std::slice::from_ref(&name));
    let file = dir.join(&name);
    let erofs = |result: std::io::Result<()>, what: &str| {
        let err = result.expect_err(what);
        assert_eq!(err.raw_os_error(), Some(nix::libc::EROFS), "{what}: {err}");
    };
    erofs(std::fs::create_dir(mount.path.join("new")), "mkdir");
    erofs(
        std::fs::write(mount.path.join("new"), b"x").map(drop),
        "create",
    );
    erofs(std::fs::write(&file, b"x").map(drop), "write");
    erofs(
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&file)
            .map(drop),
        "open rw",
    );
    erofs(std::fs::remove_file(&file), "unlink");
    erofs(std::fs::remove_dir(&dir), "rmdir");
    erofs(std::fs::rename(&file, dir.join("other")), "rename");
    erofs(
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)),
        "chmod",
    );
    erofs(
        std::os::unix::fs::symlink("x", mount.path.join("link")),
        "symlink",
    );
    let setfattr = std::process::Command::new("setfattr")
        .args(["-n", "user.x", "-v", "1"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(!setfattr.status.success());
    assert!(String::from_utf8_lossy(&setfattr.stderr).contains("Read-only file system"));
    assert!(mount.log().lines().all(|line| !line.contains(": error:")));
}

#[test]
fn a_process_that_exits_between_listing_and_lookup_is_enoent() {
    let mount = Mount::start(&[]);
    let mut peer = Peer::spawn();
    peer.cmd("comm vanishing");
    let listener = peer.cmd("tcp-listen 127.0.0.1:0");
    let udp = peer.cmd("udp-bind 127.0.0.1:0");
    let dir = mount.dir(peer.pid, "vanishing");
    wait_for_listing(
        &dir,
        &[
            format!("tcp_{}_0.0.0.0:0", listener[1]),
            format!("udp_{}_0.0.0.0:0", udp[1]),
        ],
    );
    let udp_file = dir.join(format!("udp_{}_0.0.0.0:0", udp[1]));

    // A socket closes: its file goes.
    peer.cmd(&format!("close {}", udp[0]));
    wait_until(WAIT, "the closed socket's file to go", || {
        std::fs::metadata(&udp_file).is_err_and(|err| err.kind() == std::io::ErrorKind::NotFound)
    });
    // The process exits: its directory goes, lookups are ENOENT.
    let name = dir.file_name().unwrap().to_owned();
    peer.kill();
    wait_until(WAIT, "the exited process's directory to go", || {
        std::fs::metadata(&dir).is_err_and(|err| err.raw_os_error() == Some(nix::libc::ENOENT))
    });
    assert!(!list(&mount.path).iter().any(|entry| entry.as_str() == name));
    assert!(std::fs::read_dir(&dir).is_err());
    assert!(!mount.log().contains(": error:"), "{}", mount.log());
}

#[test]
fn a_name_resolves_only_with_the_live_process_name() {
    let mount = Mount::start(&[]);
    let mut peer = Peer::spawn();
    peer.cmd("comm oldname");
    peer.cmd("tcp-listen 127.0.0.1:0");
    let old = mount.dir(peer.pid, "oldname");
    wait_until(WAIT, "the peer's directory", || old.is_dir());
    // The same pid with another program's name: the old name is gone.
    peer.cmd("comm newname");
    let new = mount.dir(peer.pid, "newname");
    wait_until(WAIT, "the renamed directory", || {
        new.is_dir() && !old.exists()
    });
    for wrong in [
        format!("{}_other", peer.pid),
        format!("0{}_newname", peer.pid),
        format!("{}_", peer.pid),
    ] {
        let err = std::fs::metadata(mount.path.join(&wrong)).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(nix::libc::ENOENT), "{wrong}");
    }
}

#[test]
fn a_reused_pid_does_not_answer_to_the_old_name() {
    let mount = Mount::start(&[]);
    let mut first = Peer::spawn();
    first.cmd("comm first-owner");
    first.cmd("tcp-listen 127.0.0.1:0");
    let pid = first.pid;
    let old = mount.dir(pid, "first-owner");
    wait_until(WAIT, "the first owner's directory", || old.is_dir());
    first.kill();

    // Make the kernel hand the same pid to a new peer: ns_last_pid is the
    // last pid given out. Other processes and threads may take it in
    // between (the other tests run in parallel): retry.
    let second = (0..500).find_map(|_| {
        std::fs::write("/proc/sys/kernel/ns_last_pid", (pid - 1).to_string()).unwrap();
        let peer = Peer::spawn();
        (peer.pid == pid).then_some(peer)
    });
    let Some(mut second) = second else {
        panic!("could not get pid {pid} again in 500 tries");
    };
    second.cmd("comm second-owner");
    second.cmd("tcp-listen 127.0.0.1:0");
    let new = mount.dir(pid, "second-owner");
    wait_until(WAIT, "the new owner's directory", || new.is_dir());
    let err = std::fs::metadata(&old).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(nix::libc::ENOENT));
    assert_ne!(
        std::fs::metadata(&new).unwrap().ino(),
        0,
        "the new process has an inode of its own"
    );
}

#[test]
fn a_process_in_another_network_namespace_shows_its_own_sockets() {
    let netns = Netns::new("tree");
    let mount = Mount::start(&[]);
    let mut peer = Peer::spawn_in_netns(&netns.name);
    peer.cmd("comm in-netns");
    let listener = peer.cmd("tcp-listen 127.0.0.1:0");
    let client = peer.cmd(&format!("tcp-connect {}", listener[1]));
    let accepted = peer.cmd(&format!("tcp-accept {}", listener[0]));
    let dir = mount.dir(peer.pid, "in-netns");
    let listener_name = format!("tcp_{}_0.0.0.0:0", listener[1]);
    wait_for_listing(
        &dir,
        &[
            listener_name.clone(),
            format!("tcp_{}_{}", client[1], client[2]),
            format!("tcp_{}_{}", accepted[1], accepted[2]),
        ],
    );
    let theirs = xattr(&dir.join(&listener_name), "user.netstatfs.netns").unwrap();
    let ours = std::fs::read_link("/proc/self/ns/net").unwrap();
    assert_ne!(format!("net:[{theirs}]"), ours.to_str().unwrap());
    assert_eq!(xattr(&dir, "user.netstatfs.netns").unwrap(), theirs);
}

#[test]
fn reuseport_twins_get_inode_suffixes() {
    let mount = Mount::start(&[]);
    let mut peer = Peer::spawn();
    peer.cmd("comm twins");
    let first = peer.cmd("tcp-listen-reuseport 127.0.0.1:0");
    let second = peer.cmd(&format!("tcp-listen-reuseport {}", first[1]));
    let first_inode = peer.cmd(&format!("inode {}", first[0]))[0].clone();
    let second_inode = peer.cmd(&format!("inode {}", second[0]))[0].clone();
    let base = format!("tcp_{}_0.0.0.0:0", first[1]);
    wait_for_listing(
        &mount.dir(peer.pid, "twins"),
        &[
            format!("{base}~{first_inode}"),
            format!("{base}~{second_inode}"),
        ],
    );
}

#[test]
fn two_thousand_sockets_in_one_directory() {
    let _heavy = crate::common::heavy();
    let mount = Mount::start(&["--cache-ttl", "2s"]);
    let mut peer = Peer::spawn();
    peer.cmd("comm crowded");
    peer.cmd("udp-many 2000 127.0.0.1:0");
    let dir = mount.dir(peer.pid, "crowded");
    let names = wait_for(WAIT, "2000 socket files, all and tree", || {
        try_list(&dir).filter(|names| names.len() == 2002)
    });
    let names: Vec<&String> = names
        .iter()
        .filter(|name| *name != "all" && *name != "tree")
        .collect();
    assert!(
        names
            .iter()
            .all(|name| name.starts_with("udp_127.0.0.1:") && name.ends_with("_0.0.0.0:0"))
    );
    let unique: std::collections::HashSet<_> = names.iter().collect();
    assert_eq!(unique.len(), 2000);
    // ls -l pages through readdirplus replies, with attributes.
    let ls = std::process::Command::new("ls")
        .arg("-l")
        .arg(&dir)
        .output()
        .unwrap();
    assert!(ls.status.success());
    let listing = String::from_utf8(ls.stdout).unwrap();
    assert_eq!(
        listing
            .lines()
            .filter(|line| line.starts_with("-r--------"))
            .count(),
        2002,
        "2000 socket files, all and tree"
    );
}

#[test]
fn all_processes_lists_processes_without_sockets() {
    let mut quiet = Peer::spawn();
    quiet.cmd("comm no-sockets");
    let plain = Mount::start(&[]);
    let everything = Mount::start(&["--all-processes"]);
    let name = format!("{}_no-sockets", quiet.pid);
    wait_until(WAIT, "the socketless process with --all-processes", || {
        try_list(&everything.path).is_some_and(|names| names.contains(&name))
    });
    assert!(everything.path.join(&name).is_dir());
    assert_eq!(
        try_list(&everything.path.join(&name)).unwrap(),
        ["all", "tree"]
    );
    // Without it the listing leaves the process out, yet its exact name
    // finds it: `cat m/$$_bash/tree` before the shell makes any traffic.
    assert!(!list(&plain.path).contains(&name));
    assert!(plain.path.join(&name).is_dir());
    assert_eq!(try_list(&plain.path.join(&name)).unwrap(), ["all", "tree"]);
    // A name that is not the process's (wrong comm, dead pid) stays absent.
    assert!(std::fs::metadata(plain.path.join(format!("{}_other", quiet.pid))).is_err());
}

#[test]
fn names_too_long_or_strange_get_clean_errors() {
    let mount = Mount::start(&[]);
    let long = "x".repeat(256);
    let err = std::fs::metadata(mount.path.join(&long)).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(nix::libc::ENAMETOOLONG));
    for name in [
        "nope",
        "1_",
        "99999999999999_x",
        "-1_x",
        "1_init/..",
        "\u{1}\u{2}",
    ] {
        assert!(std::fs::metadata(mount.path.join(name)).is_err(), "{name}");
    }
    // Still serving.
    assert!(std::fs::read_dir(&mount.path).is_ok());
}

#[test]
fn the_netstat_example_prints_a_table_from_the_mount() {
    let mount = Mount::start(&[]);
    let container = crate::common::cgroup::Cgroup::docker_like();
    let mut peer = Peer::spawn();
    peer.cmd("comm example-peer");
    container.enter(peer.pid);
    let listener = peer.cmd("tcp-listen 127.0.0.1:0");
    let dir = mount.dir(peer.pid, "example-peer");
    wait_for_listing(&dir, &[format!("tcp_{}_0.0.0.0:0", listener[1])]);
    let output = std::process::Command::new(netstat_example())
        .arg(&mount.path)
        .output()
        .unwrap();
    assert!(output.status.success());
    let table = String::from_utf8(output.stdout).unwrap();
    assert!(
        table.starts_with("Netns      Proto  Local Address"),
        "{table}"
    );
    let row = table
        .lines()
        .find(|line| line.contains(&format!("{}/example-peer", peer.pid)))
        .unwrap_or_else(|| panic!("no row for the peer in:\n{table}"));
    let fields: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(
        fields[..5],
        ["-", "tcp", listener[1].as_str(), "0.0.0.0:0", "LISTEN"]
    );
    // rtt and retransmits from socket diagnostics: a listener has them.
    assert!(fields[7].parse::<f64>().is_ok(), "rtt in {row}");
    assert_eq!(fields[8], "0", "retransmits in {row}");
    assert!(
        row.ends_with(&format!(
            "docker {}",
            &crate::common::cgroup::CONTAINER_ID[..12]
        )),
        "{row}"
    );
}

#[test]
fn a_process_directory_says_its_program_user_cgroup_and_container() {
    let mount = Mount::start(&[]);
    let container = crate::common::cgroup::Cgroup::kubernetes_like();
    let mut contained = Peer::spawn();
    contained.cmd("comm in-a-pod");
    container.enter(contained.pid);
    contained.cmd("udp-bind 127.0.0.1:0");
    let mut host = Peer::spawn();
    host.cmd("comm on-the-host");
    host.cmd("udp-bind 127.0.0.1:0");
    let pod_dir = mount.dir(contained.pid, "in-a-pod");
    let host_dir = mount.dir(host.pid, "on-the-host");
    wait_until(WAIT, "both directories", || {
        pod_dir.exists() && host_dir.exists()
    });

    let attribute = |dir: &Path, name: &str| xattr(dir, &format!("user.netstatfs.{name}"));
    let exe = std::env::current_exe().unwrap();
    assert_eq!(attribute(&pod_dir, "exe").as_deref(), exe.to_str());
    let cmdline = attribute(&pod_dir, "cmdline").unwrap();
    assert!(cmdline.starts_with(exe.to_str().unwrap()), "{cmdline}");
    assert_eq!(attribute(&pod_dir, "user").as_deref(), Some("root"));
    assert_eq!(attribute(&pod_dir, "cgroup"), Some(container.path()));
    assert_eq!(
        attribute(&pod_dir, "container.runtime").as_deref(),
        Some("containerd")
    );
    assert_eq!(
        attribute(&pod_dir, "container.id").as_deref(),
        Some(crate::common::cgroup::CONTAINER_ID)
    );
    assert_eq!(
        attribute(&pod_dir, "pod.uid").as_deref(),
        Some(crate::common::cgroup::POD_UID)
    );

    // On the host: no container, and `getfattr -d` lists only what is there.
    assert_eq!(attribute(&host_dir, "container.id"), None);
    let dump = std::process::Command::new("getfattr")
        .args(["-d", "--absolute-names"])
        .arg(&host_dir)
        .output()
        .unwrap();
    assert!(dump.status.success());
    let dump = String::from_utf8_lossy(&dump.stdout);
    assert!(
        dump.contains("user.netstatfs.exe=") && dump.contains("user.netstatfs.cgroup="),
        "{dump}"
    );
    assert!(!dump.contains("container"), "{dump}");
}

/// The netstat example (what a user's script over the mount looks like):
/// `--help` says how to call it; a socket of another network namespace is
/// listed with that namespace's inode, the host's with `-`.
#[test]
fn the_netstat_example_tells_namespaces_apart() {
    let example = netstat_example();
    let help = std::process::Command::new(&example)
        .arg("--help")
        .output()
        .unwrap();
    assert!(help.status.success(), "{help:?}");
    assert!(String::from_utf8_lossy(&help.stdout).contains("Usage: netstat [MOUNTPOINT]"));

    let mount = Mount::start(&[]);
    let netns = Netns::new("nst");
    let mut inside = Peer::spawn_in_netns(&netns.name);
    inside.cmd("comm in-netns");
    let there = inside.cmd("udp-bind 127.0.0.1:0");
    let mut outside = Peer::spawn();
    outside.cmd("comm on-host");
    let here = outside.cmd("udp-bind 127.0.0.1:0");
    let file = mount
        .dir(inside.pid, "in-netns")
        .join(format!("udp_{}_0.0.0.0:0", there[1]));
    wait_until(WAIT, "the namespace's socket listed", || file.exists());
    let inode = xattr(&file, "user.netstatfs.netns").unwrap();
    let output = std::process::Command::new(&example)
        .arg(&mount.path)
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let table = String::from_utf8_lossy(&output.stdout).into_owned();
    let row = |program: &str| {
        table
            .lines()
            .find(|line| line.contains(program))
            .unwrap_or_else(|| panic!("no row of {program}:\n{table}"))
            .to_owned()
    };
    let inside_row = row(&format!("{}/in-netns", inside.pid));
    assert!(inside_row.starts_with(&format!("{inode} ")), "{inside_row}");
    assert!(inside_row.contains(&there[1]), "{inside_row}");
    let outside_row = row(&format!("{}/on-host", outside.pid));
    assert!(outside_row.starts_with("- "), "{outside_row}");
    assert!(outside_row.contains(&here[1]), "{outside_row}");
}

/// The netstat example's binary: `cargo test` builds the examples next to
/// the test binaries' deps/.
pub fn netstat_example() -> std::path::PathBuf {
    std::env::current_exe()
        .unwrap()
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join("examples/netstat"))
        .unwrap()
}
