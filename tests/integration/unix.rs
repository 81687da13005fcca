//! Unix sockets with `--unix`: a socketpair, a named listener with a
//! client, an abstract listener; their names, their peers (compared with
//! `ss -xa` on the same sockets), and reading one (EOPNOTSUPP, the daemon
//! serving on). Without `--unix` none is listed.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::common::mount::Mount;
use crate::common::peer::Peer;
use crate::common::{ScratchDir, list, try_list, wait_until, xattr};

const WAIT: Duration = Duration::from_secs(20);

/// `ss -xa`: every unix socket's (state, peer inode) by inode.
fn ss_unix() -> HashMap<String, (String, String)> {
    let output = Command::new("ss").args(["-xaH"]).output().unwrap();
    assert!(output.status.success(), "{output:?}");
    String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .filter_map(|line| {
            // Netid State Recv-Q Send-Q Local Port Peer Port (no spaces in
            // this test's paths).
            let fields: Vec<&str> = line.split_whitespace().collect();
            (fields.len() >= 8).then(|| {
                (
                    fields[5].to_owned(),
                    (fields[1].to_owned(), fields[7].to_owned()),
                )
            })
        })
        .collect()
}

fn attribute(file: &Path, name: &str) -> Option<String> {
    xattr(file, &format!("user.netstatfs.{name}"))
}

#[test]
fn unix_sockets_are_listed_with_their_peers_as_ss_sees_them() {
    let mount = Mount::start(&["--unix"]);
    let scratch = ScratchDir::new("unix");
    // A path with a '/' inside (made '_' in the name).
    let path = scratch.0.join("srv.sock");
    let path_text = path.to_str().unwrap();
    let abstract_name = format!("netstatfs-test-{}", std::process::id());

    let mut server = Peer::spawn();
    server.cmd("comm unix-server");
    let listener = server.cmd(&format!("unix-listen {path_text}"));
    let abstract_listener = server.cmd(&format!("unix-listen @{abstract_name}"));
    let pair = server.cmd("unix-pair");
    let mut client = Peer::spawn();
    client.cmd("comm unix-client");
    let connected = client.cmd(&format!("unix-connect {path_text}"));
    let accepted = server.cmd(&format!("unix-accept {}", listener[0]));
    let (listener_inode, abstract_inode) = (&listener[1], &abstract_listener[1]);
    let (pair_a, pair_b) = (&pair[2], &pair[3]);
    let (client_inode, accepted_inode) = (&connected[1], &accepted[1]);

    let server_dir = mount.dir(server.pid, "unix-server");
    let client_dir = mount.dir(client.pid, "unix-client");
    // The listener and the connection it accepted share the path: both
    // names carry their inode.
    let named = format!("unix_{}", path_text.replace('/', "_"));
    let expected_server = [
        format!("{named}~{listener_inode}"),
        format!("{named}~{accepted_inode}"),
        format!("unix_@{abstract_name}"),
        format!("unix_{pair_a}"),
        format!("unix_{pair_b}"),
    ];
    wait_until(WAIT, "the server's unix sockets listed", || {
        try_list(&server_dir)
            .is_some_and(|names| expected_server.iter().all(|name| names.contains(name)))
    });
    let client_file = client_dir.join(format!("unix_{client_inode}"));
    wait_until(WAIT, "the client's socket listed", || client_file.exists());

    let listener_file = server_dir.join(&expected_server[0]);
    let accepted_file = server_dir.join(&expected_server[1]);
    let abstract_file = server_dir.join(&expected_server[2]);
    let pair_file = server_dir.join(&expected_server[3]);

    // What /proc/net/unix says.
    assert_eq!(attribute(&listener_file, "proto").as_deref(), Some("unix"));
    assert_eq!(attribute(&listener_file, "type").as_deref(), Some("stream"));
    assert_eq!(
        attribute(&listener_file, "state").as_deref(),
        Some("LISTEN")
    );
    assert_eq!(
        attribute(&listener_file, "inode").as_ref(),
        Some(listener_inode)
    );
    assert_eq!(
        attribute(&listener_file, "path").as_deref(),
        Some(path_text)
    );
    assert_eq!(attribute(&listener_file, "peer_inode"), None, "no peer");
    assert_eq!(
        attribute(&abstract_file, "inode").as_ref(),
        Some(abstract_inode)
    );
    assert_eq!(
        attribute(&abstract_file, "path"),
        Some(format!("@{abstract_name}"))
    );
    assert_eq!(
        attribute(&client_file, "state").as_deref(),
        Some("CONNECTED")
    );
    assert_eq!(attribute(&client_file, "path"), None, "unnamed");
    assert_eq!(
        attribute(&accepted_file, "path").as_deref(),
        Some(path_text)
    );

    // The peers, both ways, with who holds them.
    assert_eq!(
        attribute(&client_file, "peer_inode").as_ref(),
        Some(accepted_inode)
    );
    assert_eq!(
        attribute(&client_file, "peer_pid"),
        Some(server.pid.to_string())
    );
    assert_eq!(
        attribute(&client_file, "peer_comm").as_deref(),
        Some("unix-server")
    );
    assert_eq!(
        attribute(&accepted_file, "peer_inode").as_ref(),
        Some(client_inode)
    );
    assert_eq!(
        attribute(&accepted_file, "peer_pid"),
        Some(client.pid.to_string())
    );
    assert_eq!(
        attribute(&accepted_file, "peer_comm").as_deref(),
        Some("unix-client")
    );
    assert_eq!(attribute(&pair_file, "peer_inode").as_ref(), Some(pair_b));
    assert_eq!(
        attribute(&pair_file, "peer_pid"),
        Some(server.pid.to_string())
    );
    assert_eq!(
        attribute(&listener_file, "uid").as_deref(),
        Some("0"),
        "the kernel's owner"
    );

    // Every unix socket file of both processes against ss.
    let ss = ss_unix();
    for dir in [&server_dir, &client_dir] {
        for name in list(dir).iter().filter(|name| name.starts_with("unix_")) {
            let file = dir.join(name);
            let inode = attribute(&file, "inode").unwrap();
            let (ss_state, ss_peer) = ss
                .get(&inode)
                .unwrap_or_else(|| panic!("ss lists inode {inode} ({name})"));
            let peer = attribute(&file, "peer_inode").unwrap_or_else(|| "0".into());
            assert_eq!(&peer, ss_peer, "{name}: peer against ss");
            let state = attribute(&file, "state").unwrap();
            let as_ss = match state.as_str() {
                "LISTEN" => "LISTEN",
                "CONNECTED" => "ESTAB",
                "UNCONNECTED" => "UNCONN",
                other => other,
            };
            assert_eq!(as_ss, ss_state, "{name}: state against ss");
        }
    }

    // Owned as the process's other files are; reading is not supported,
    // with a line that says why, and the daemon serves on.
    let metadata = std::fs::metadata(&client_file).unwrap();
    assert_eq!((metadata.uid(), metadata.mode() & 0o777), (0, 0o400));
    let error = std::fs::read(&client_file).unwrap_err();
    assert_eq!(error.raw_os_error(), Some(nix::libc::EOPNOTSUPP), "{error}");
    wait_until(WAIT, "a log line saying why", || {
        mount
            .log()
            .contains("a unix socket cannot be read: libpcap captures network interfaces")
    });
    assert!(
        list(&server_dir).contains(&expected_server[2]),
        "still serving"
    );

    // A socket that closes leaves the listing.
    client.cmd(&format!("close {}", connected[0]));
    wait_until(WAIT, "the closed socket gone", || !client_file.exists());
}

#[test]
fn without_unix_no_unix_socket_is_listed() {
    let mount = Mount::start(&[]);
    let mut holder = Peer::spawn();
    holder.cmd("comm unix-and-tcp");
    let pair = holder.cmd("unix-pair");
    let listener = holder.cmd("tcp-listen 127.0.0.1:0");
    let mut only_unix = Peer::spawn();
    only_unix.cmd("comm only-unix");
    only_unix.cmd("unix-pair");

    let dir = mount.dir(holder.pid, "unix-and-tcp");
    let tcp = format!("tcp_{}_0.0.0.0:0", listener[1]);
    wait_until(WAIT, "the tcp listener listed", || {
        try_list(&dir).is_some_and(|names| names.contains(&tcp))
    });
    assert_eq!(list(&dir), ["all", tcp.as_str(), "tree"]);
    assert!(!dir.join(format!("unix_{}", pair[2])).exists());
    assert!(
        !list(&mount.path).contains(&format!("{}_only-unix", only_unix.pid)),
        "a process holding only unix sockets is not listed"
    );
    assert_eq!(
        list(&mount.dir(only_unix.pid, "only-unix")),
        ["all", "tree"],
        "found by its exact name, with no unix socket file"
    );
}
