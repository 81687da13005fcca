//! Containers and pods as directories: a real Docker engine of the test's
//! own (`web` serving httpd, `cli` fetching from it and talking to itself
//! on its loopback), checked against `docker inspect` and, packet for
//! packet, against `nsenter -t PID -n tcpdump -i any`; and Kubernetes'
//! names from a containerd CRI bundle laid out as containerd writes it.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use crate::common::cgroup::{CONTAINER_ID, Cgroup, POD_UID};
use crate::common::docker::Dockerd;
use crate::common::mount::Mount;
use crate::common::peer::Peer;
use crate::common::tcpdump::Tcpdump;
use crate::common::users::TestUser;
use crate::common::{ScratchDir, heavy, list, read_to_eof, try_list, wait_for, wait_until, xattr};

const WAIT: Duration = Duration::from_secs(30);

/// A capture's records: capture time (µs) and the packet from its network
/// header on (the link headers of our LINUX_SLL and tcpdump's LINUX_SLL2
/// differ; the packets do not).
fn records(path: &Path) -> Vec<(i64, Vec<u8>)> {
    let mut capture = pcap::Capture::from_file_with_precision(path, pcap::Precision::Nano)
        .expect("a valid pcap file");
    let header = match capture.get_datalink().0 {
        113 => 16,
        276 => 20,
        1 => 14,
        other => panic!("unexpected link type {other}"),
    };
    let mut records = Vec::new();
    loop {
        match capture.next_packet() {
            // In microseconds: tcpdump writes them, our streams nanoseconds.
            Ok(packet) => records.push((
                packet.header.ts.tv_sec * 1_000_000 + packet.header.ts.tv_usec / 1000,
                packet.data[header.min(packet.data.len())..].to_vec(),
            )),
            Err(pcap::Error::NoMorePackets) => return records,
            Err(err) => panic!("bad record: {err}"),
        }
    }
}

/// Two captures of one namespace stamp a packet a few microseconds apart
/// (a packet the kernel did not timestamp is stamped as each socket takes
/// it), so packets are matched by their bytes, and the window's edges by
/// time within this.
const STAMPS_APART_US: i64 = 1_000;

/// A stream against tcpdump in the same namespace over the same window:
/// each record once, in time order; each packet once, and one tcpdump saw
/// (nothing of another namespace); and every packet tcpdump saw while the
/// stream ran.
fn assert_same_packets(what: &str, ours: &[(i64, Vec<u8>)], truth: &[(i64, Vec<u8>)]) {
    assert!(ours.len() > 30, "{what}: only {} packets", ours.len());
    assert!(
        ours.windows(2).all(|pair| pair[0].0 <= pair[1].0),
        "{what}: time goes backwards"
    );
    let mut counts: HashMap<&[u8], usize> = HashMap::new();
    for (_, packet) in ours {
        *counts.entry(packet).or_default() += 1;
    }
    let mut truth_counts: HashMap<&[u8], usize> = HashMap::new();
    for (_, packet) in truth {
        *truth_counts.entry(packet).or_default() += 1;
    }
    for (packet, count) in &counts {
        let there = truth_counts.get(packet).copied().unwrap_or(0);
        assert!(
            *count <= there,
            "{what}: {count} copies, {there} in tcpdump's: {packet:02x?}"
        );
    }
    let (first, last) = (ours[0].0, ours[ours.len() - 1].0);
    let missed: Vec<&(i64, Vec<u8>)> = truth
        .iter()
        .filter(|(at, packet)| {
            (first + STAMPS_APART_US..=last - STAMPS_APART_US).contains(at)
                && !counts.contains_key(packet.as_slice())
        })
        .collect();
    assert!(
        missed.is_empty(),
        "{what} lacks {} of tcpdump's packets while it ran, the first at {} us: {:02x?}",
        missed.len(),
        missed.first().map_or(0, |(at, _)| *at),
        missed
            .first()
            .map(|(_, packet)| &packet[..packet.len().min(40)])
    );
    // Whole connections: opened and closed.
    assert!(ours.iter().any(|(_, p)| tcp_flag(p, 0x02)), "{what}: a SYN");
    assert!(ours.iter().any(|(_, p)| tcp_flag(p, 0x01)), "{what}: a FIN");
}

/// The packet types of a LINUX_SLL stream's records (0 to this host, 4
/// sent by it, 3 to another host: what a bridge port sees pass).
fn packet_types(path: &Path) -> Vec<u16> {
    let mut capture = pcap::Capture::from_file(path).expect("a valid pcap file");
    assert_eq!(capture.get_datalink().0, 113, "LINUX_SLL");
    let mut types = Vec::new();
    while let Ok(packet) = capture.next_packet() {
        types.push(u16::from_be_bytes([packet.data[0], packet.data[1]]));
    }
    types
}

/// Each packet's IPv4 source and destination, if it is one.
fn ipv4_ends(packet: &[u8]) -> Option<([u8; 4], [u8; 4])> {
    (packet.len() >= 20 && packet[0] >> 4 == 4).then(|| {
        (
            packet[12..16].try_into().unwrap(),
            packet[16..20].try_into().unwrap(),
        )
    })
}

fn ipv4(text: &str) -> [u8; 4] {
    text.parse::<std::net::Ipv4Addr>().unwrap().octets()
}

/// Whether a TCP packet has `flag` (0x02 SYN, 0x01 FIN).
fn tcp_flag(packet: &[u8], flag: u8) -> bool {
    let header = usize::from(packet[0] & 0x0f) * 4;
    packet.len() > header + 13 && packet[9] == 6 && packet[header + 13] & flag != 0
}

/// The test's own docker engine, or None where docker cannot run here
/// at all, said on stderr.
fn docker_or_why_not() -> Option<Dockerd> {
    Dockerd::start()
        .inspect_err(|why| eprintln!("skipped: docker cannot run here: {why}"))
        .ok()
}

/// `web` serving httpd, and `cli` fetching from it every 50 ms; web's
/// address.
fn web_and_its_client(docker: &Dockerd) -> String {
    docker.run("web", "exec httpd -f -p 80 -h /www");
    let web_ip = docker.ip_of("web");
    docker.run(
        "cli",
        &format!("while true; do wget -q -O /dev/null http://{web_ip}/; sleep 0.05; done"),
    );
    web_ip
}

#[test]
fn a_docker_containers_directory_and_all_are_its_own_packet_for_packet() {
    let _heavy = heavy();
    let Some(docker) = docker_or_why_not() else {
        return;
    };
    docker.run("web", "exec httpd -f -p 80 -h /www");
    let web_ip = docker.ip_of("web");
    // cli: a fetch every 50 ms, a connection held open, and traffic of its
    // own on its loopback (none of which is web's).
    docker.run(
        "cli",
        &format!(
            "httpd -p 127.0.0.1:8080 -h /www; (sleep 3600 | nc {web_ip} 80) & \
             while true; do wget -q -O /dev/null http://{web_ip}/; \
             wget -q -O /dev/null http://127.0.0.1:8080/; sleep 0.05; done"
        ),
    );
    let web_pid = docker.pid_of("web");
    let web_id = docker.id_of("web");

    // No --docker-root: found from the running dockerd's --data-root.
    let mount = Mount::start(&[]);
    let web = mount.path.join("containers/web");
    let link = format!("{web_pid}_httpd");
    wait_until(WAIT, "containers/web with its httpd", || {
        try_list(&web).is_some_and(|names| names.contains(&link))
    });
    assert!(list(&mount.path.join("containers")).contains(&"cli".to_owned()));
    assert_eq!(
        std::fs::read_link(web.join(&link)).unwrap(),
        Path::new(&format!("../../{link}"))
    );
    assert!(
        web.join(&link).join("all").exists(),
        "the link leads to the process"
    );
    let process = mount.dir(web_pid, "httpd");
    assert_eq!(
        xattr(&process, "user.netstatfs.container.name").as_deref(),
        Some("web")
    );
    assert_eq!(
        xattr(&process, "user.netstatfs.container.id"),
        Some(web_id.clone())
    );
    assert_eq!(
        xattr(&process, "user.netstatfs.container.runtime").as_deref(),
        Some("docker")
    );
    // The netstat example names the container.
    let table = std::process::Command::new(crate::tree::netstat_example())
        .arg(&mount.path)
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table
            .lines()
            .any(|row| row.contains(&format!("{web_pid}/httpd")) && row.ends_with("docker web")),
        "{table}"
    );

    // web's all against tcpdump in web's namespace, across a restart: the
    // stream ends with EOF when the container's first process does.
    let truth = Tcpdump::start_in_netns_of(web_pid, "any", "");
    let (bytes, reader) = read_to_eof(&web.join("all"));
    wait_until(WAIT, "the container's capture", || {
        mount.log().contains("containers/web/all: capture running")
    });
    wait_until(WAIT, "some of cli's fetches", || {
        bytes.lock().unwrap().len() > 20_000
    });
    docker.docker(&["restart", "-t", "1", "web"]);
    wait_until(WAIT, "web's all to end with the restart", || {
        reader.is_finished()
    });
    reader.join().unwrap();
    let mut truth = truth;
    let truth = records(&truth.stop_to_file());
    let scratch = ScratchDir::new("container");
    let ours_path = scratch.0.join("web.pcap");
    std::fs::write(&ours_path, &*bytes.lock().unwrap()).unwrap();
    let ours = records(&ours_path);
    // Each record once (the same time and bytes twice is one packet
    // delivered twice).
    let mut distinct = std::collections::HashSet::new();
    for record in &ours {
        assert!(distinct.insert(record), "a record twice: {record:02x?}");
    }
    assert!(ours.len() > 30, "only {} packets", ours.len());
    assert_same_packets("web's all", &ours, &truth);
    let ours_packets: Vec<&[u8]> = ours.iter().map(|(_, packet)| packet.as_slice()).collect();
    let web_address = ipv4(&web_ip);
    // Nothing of cli's own loopback traffic (what else web's namespace
    // sent, multicast joins of its interface coming up, is its own).
    assert!(
        ours_packets
            .iter()
            .filter_map(|packet| ipv4_ends(packet))
            .any(|(src, dst)| src == web_address || dst == web_address),
        "web's own traffic"
    );
    for packet in &ours_packets {
        if let Some((src, dst)) = ipv4_ends(packet) {
            assert!(
                src[0] != 127 && dst[0] != 127,
                "loopback traffic of another namespace: {src:?} > {dst:?}"
            );
        }
    }

    // Restarted: the same directory, its new first process.
    let restarted = docker.pid_of("web");
    assert_ne!(restarted, web_pid);
    let new_link = format!("{restarted}_httpd");
    wait_until(WAIT, "containers/web with the new httpd", || {
        try_list(&web).is_some_and(|names| names.contains(&new_link) && !names.contains(&link))
    });

    // Stopped: its directory goes.
    docker.docker(&["stop", "-t", "1", "web"]);
    wait_until(WAIT, "containers/web to go", || {
        try_list(&mount.path.join("containers"))
            .is_some_and(|names| !names.contains(&"web".to_owned()))
    });
}

/// As containerd's CRI plugin lays out a task's bundle: the shim's state
/// directory `<state>/io.containerd.runtime.v2.task/<namespace>/<id>/`
/// (containerd `runtime/v2/bundle.go`) holding the OCI `config.json`, with
/// the annotations of `pkg/cri/annotations/annotations.go` that
/// `pkg/cri/server/container_create_linux.go` and `sandbox_run_linux.go`
/// set.
fn write_cri_bundle(state: &Path, id: &str, annotations: &[(&str, &str)]) {
    let bundle = state
        .join("io.containerd.runtime.v2.task")
        .join("k8s.io")
        .join(id);
    std::fs::create_dir_all(&bundle).unwrap();
    let annotations: Vec<String> = annotations
        .iter()
        .map(|(key, value)| format!("\"{key}\": \"{value}\""))
        .collect();
    std::fs::write(
        bundle.join("config.json"),
        format!(
            "{{\"ociVersion\": \"1.1.0\", \"process\": {{\"args\": [\"/pause\"]}},\n \"annotations\": {{\n  {}\n }}\n}}",
            annotations.join(",\n  ")
        ),
    )
    .unwrap();
}

#[test]
fn a_kubernetes_pods_containers_are_named_by_their_cri_bundles() {
    let state = ScratchDir::new("containerd-state");
    write_cri_bundle(
        &state.0,
        CONTAINER_ID,
        &[
            ("io.kubernetes.cri.container-type", "container"),
            ("io.kubernetes.cri.container-name", "api"),
            ("io.kubernetes.cri.sandbox-id", "5d0c"),
            ("io.kubernetes.cri.sandbox-name", "shop-7c9f"),
            ("io.kubernetes.cri.sandbox-namespace", "prod"),
            ("io.kubernetes.cri.sandbox-uid", POD_UID),
        ],
    );
    let container = Cgroup::kubernetes_like();
    let mut peer = Peer::spawn();
    peer.cmd("comm pod-api");
    container.enter(peer.pid);
    let listener = peer.cmd("tcp-listen 127.0.0.1:0");
    let mount = Mount::start(&["--containerd-state", state.0.to_str().unwrap()]);
    let process = mount.dir(peer.pid, "pod-api");
    let named = wait_for(WAIT, "the container's name", || {
        xattr(&process, "user.netstatfs.container.name")
    });
    assert_eq!(named, "api");
    assert_eq!(
        xattr(&process, "user.netstatfs.pod.name").as_deref(),
        Some("shop-7c9f")
    );
    assert_eq!(
        xattr(&process, "user.netstatfs.pod.namespace").as_deref(),
        Some("prod")
    );
    assert_eq!(
        xattr(&process, "user.netstatfs.pod.uid").as_deref(),
        Some(POD_UID)
    );
    let pod = mount.path.join("pods/prod/shop-7c9f");
    assert_eq!(list(&pod), ["all", "api"]);
    assert_eq!(
        std::fs::read_link(pod.join("api")).unwrap(),
        Path::new("../../../containers/api")
    );
    let link = format!("{}_pod-api", peer.pid);
    assert_eq!(list(&pod.join("api")), [link.as_str(), "all"]);
    assert!(
        pod.join("api")
            .join(&link)
            .join(format!("tcp_{}_0.0.0.0:0", listener[1]))
            .exists()
    );
    // Without the bundle, no name: the directory is the short id.
    drop(mount);
    let mount = Mount::start(&[]);
    wait_until(WAIT, "the container by its short id", || {
        try_list(&mount.path.join("containers"))
            .is_some_and(|names| names.contains(&CONTAINER_ID[..12].to_owned()))
    });
    assert_eq!(
        xattr(
            &mount.dir(peer.pid, "pod-api"),
            "user.netstatfs.container.name"
        ),
        None
    );
    assert!(list(&mount.path.join("pods")).is_empty());
}

#[test]
fn a_containers_directory_is_its_users_and_the_hosts_network_is_not_its_own() {
    // One id under two runtimes' names: a user's process in a docker-like
    // cgroup, root's in a containerd-like one; both on the host's network.
    let user = TestUser::new("ctr");
    let docker_like = Cgroup::docker_like();
    let mut theirs = user.peer();
    theirs.cmd("comm ctr-user");
    docker_like.enter(theirs.pid);
    theirs.cmd("udp-bind 127.0.0.1:0");
    let kubernetes_like = Cgroup::kubernetes_like();
    let mut roots = Peer::spawn();
    roots.cmd("comm ctr-root");
    kubernetes_like.enter(roots.pid);
    let mount = Mount::start(&["--allow-other"]);
    let short = &CONTAINER_ID[..12];
    let (user_dir, root_dir) = (format!("docker_{short}"), format!("containerd_{short}"));
    let containers = mount.path.join("containers");
    wait_until(WAIT, "both containers, told apart by runtime", || {
        try_list(&containers)
            .is_some_and(|names| names.contains(&user_dir) && names.contains(&root_dir))
    });
    use std::os::unix::fs::MetadataExt;
    let metadata = std::fs::metadata(containers.join(&user_dir)).unwrap();
    assert_eq!((metadata.uid(), metadata.mode() & 0o777), (user.uid, 0o500));
    // The user lists the containers and enters their own, not root's.
    let listed = user.run(&["ls", containers.to_str().unwrap()]);
    assert!(listed.status.success(), "{listed:?}");
    let own = user.run(&["ls", containers.join(&user_dir).to_str().unwrap()]);
    assert!(
        String::from_utf8_lossy(&own.stdout).contains(&format!("{}_ctr-user", theirs.pid)),
        "{own:?}"
    );
    let others = user.run(&["ls", containers.join(&root_dir).to_str().unwrap()]);
    assert!(
        !others.status.success()
            && String::from_utf8_lossy(&others.stderr).contains("Permission denied"),
        "{others:?}"
    );
    // On the host's network, a container's packets cannot be told from
    // everyone else's: its all is refused, and the log says why.
    let opened = std::fs::File::open(containers.join(&root_dir).join("all"));
    assert_eq!(
        opened.map(drop).map_err(|err| err.raw_os_error()),
        Err(Some(nix::libc::EOPNOTSUPP))
    );
    assert!(
        mount.log().contains(&format!(
            "containers/{root_dir}/all: its network namespace is shared with"
        )),
        "{}",
        mount.log()
    );
}

/// The shared libraries `binary` loads, as ldd lists them (the loader
/// included).
fn libraries_of(binary: &Path) -> Vec<std::path::PathBuf> {
    let output = std::process::Command::new("ldd")
        .arg(binary)
        .output()
        .unwrap();
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| {
            let path = match line.split_once("=>") {
                Some((_, after)) => after.split_whitespace().next()?,
                None => line.split_whitespace().next()?,
            };
            path.starts_with('/')
                .then(|| std::path::PathBuf::from(path))
        })
        .collect()
}

/// The file system type mounted at `path` (the topmost), if any.
fn fs_type_at(path: &Path) -> Option<String> {
    let wanted = path.to_str()?;
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .rev()
        .filter(|line| line.split(' ').nth(4) == Some(wanted))
        .find_map(|line| Some(line.split_once(" - ")?.1.split(' ').next()?.to_owned()))
}

/// A mount point of the host's made shared, as the kubelet's /run is, so
/// that a mount made under it inside a container shows on the host.
struct SharedDir {
    scratch: ScratchDir,
}

impl SharedDir {
    fn new() -> SharedDir {
        let scratch = ScratchDir::new("agent-mount");
        use nix::mount::{MsFlags, mount};
        mount(
            Some(&scratch.0),
            &scratch.0,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .unwrap();
        mount(
            None::<&str>,
            &scratch.0,
            None::<&str>,
            MsFlags::MS_SHARED | MsFlags::MS_REC,
            None::<&str>,
        )
        .unwrap();
        SharedDir { scratch }
    }
}

impl Drop for SharedDir {
    fn drop(&mut self) {
        // The agent's mount first, if it is still there, then the bind.
        for _ in 0..2 {
            let _ = nix::mount::umount2(&self.scratch.0, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

#[test]
fn the_node_agent_image_serves_the_node_through_a_shared_mount() {
    let _heavy = heavy();
    let Some(docker) = docker_or_why_not() else {
        return;
    };
    let web_ip = web_and_its_client(&docker);
    // The image, built offline: this build's binary, the libraries it and
    // fusermount3 load (deploy/Dockerfile installs the same from Debian).
    let root = ScratchDir::new("agent-root");
    let binary = Path::new(crate::common::mount::BINARY);
    let fusermount = Path::new("/usr/bin/fusermount3");
    let mut files = vec![
        (binary.to_path_buf(), root.0.join("usr/local/bin/netstatfs")),
        (fusermount.to_path_buf(), root.0.join("usr/bin/fusermount3")),
    ];
    for library in libraries_of(binary)
        .into_iter()
        .chain(libraries_of(fusermount))
    {
        let inside = root.0.join(library.strip_prefix("/").unwrap());
        files.push((library, inside));
    }
    for (from, to) in files {
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(&from, &to).unwrap_or_else(|err| panic!("{}: {err}", from.display()));
    }
    for dir in ["run/netstatfs", "proc", "sys", "dev", "tmp", "etc"] {
        std::fs::create_dir_all(root.0.join(dir)).unwrap();
    }
    std::fs::write(root.0.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    docker.import(
        &root.0,
        "netstatfs-agent:test",
        Some("/usr/local/bin/netstatfs"),
    );

    // Run the way deploy/netstatfs-daemonset.yaml runs it, with the
    // capabilities it lists rather than --privileged (which asks for every
    // capability, and this machine's bounding set lacks CAP_SYS_RESOURCE);
    // Debian 12's docker predates CAP_PERFMON, whose part CAP_SYS_ADMIN
    // holds too.
    let shared = SharedDir::new();
    let host_path = shared.scratch.0.clone();
    let data_root = docker.data_root();
    let data_root = data_root.to_str().unwrap();
    docker.docker(&[
        "run",
        "-d",
        "--name",
        "agent",
        "--cap-add=NET_RAW",
        "--cap-add=NET_ADMIN",
        "--cap-add=SYS_PTRACE",
        "--cap-add=DAC_READ_SEARCH",
        "--cap-add=SYS_ADMIN",
        "--security-opt=apparmor=unconfined",
        "--security-opt=seccomp=unconfined",
        "--device=/dev/fuse",
        "--pid=host",
        "--network=host",
        "-v",
        "/sys/kernel/tracing:/sys/kernel/tracing",
        "-v",
        &format!("{}:/run/netstatfs:rshared", host_path.display()),
        "-v",
        &format!("{data_root}:{data_root}:ro"),
        "netstatfs-agent:test",
        "/run/netstatfs",
        "--allow-other",
        "--log",
        "stderr",
        "--cache-ttl",
        "100ms",
    ]);
    let web = host_path.join("containers/web");
    let deadline = std::time::Instant::now() + WAIT;
    while !try_list(&web).is_some_and(|names| names.contains(&"all".to_owned())) {
        assert!(
            std::time::Instant::now() < deadline,
            "the agent's mount did not show on the node within {WAIT:?}: {}",
            docker.logs("agent")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(fs_type_at(&host_path).as_deref(), Some("fuse.netstatfs"));
    let (bytes, reader) = read_to_eof(&web.join("all"));
    wait_until(WAIT, "web's packets through the agent", || {
        bytes.lock().unwrap().len() > 10_000
    });
    // The agent stops as a pod's container is stopped: reads end with EOF
    // and the node's mount goes.
    docker.docker(&["stop", "-t", "10", "agent"]);
    wait_until(WAIT, "web's all to end", || reader.is_finished());
    reader.join().unwrap();
    let logs = docker.logs("agent");
    let scratch = ScratchDir::new("agent-stream");
    let path = scratch.0.join("web.pcap");
    std::fs::write(&path, &*bytes.lock().unwrap()).unwrap();
    let ours = records(&path);
    let mut distinct = std::collections::HashSet::new();
    for record in &ours {
        assert!(distinct.insert(record), "a record twice: {record:02x?}");
    }
    let web_address = ipv4(&web_ip);
    let webs = ours
        .iter()
        .filter_map(|(_, packet)| ipv4_ends(packet))
        .filter(|(src, dst)| *src == web_address || *dst == web_address)
        .count();
    assert!(webs > 20, "{webs} of web's packets\n{logs}");
    wait_until(WAIT, "the node's mount to go", || {
        fs_type_at(&host_path).as_deref() != Some("fuse.netstatfs")
    });
    assert!(logs.contains("mounted at /run/netstatfs"), "{logs}");
}

#[test]
fn the_daemonset_runs_the_agent_as_the_readme_says() {
    // kubectl cannot check a manifest without a cluster (its client-side
    // dry run still asks the server for its kinds): the manifest is read
    // as YAML and its promises checked.
    let manifest = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/netstatfs-daemonset.yaml"
    );
    let script = r#"
import json, sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
print(json.dumps(docs))
"#;
    let output = std::process::Command::new("/usr/bin/python3")
        .args(["-c", script, manifest])
        .output()
        .expect("Debian's python3 runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout).unwrap();
    let has = |needle: &str| assert!(text.contains(needle), "the manifest lacks {needle}: {text}");
    has(r#""kind": "Namespace""#);
    has(r#""kind": "DaemonSet""#);
    has(r#""apiVersion": "apps/v1""#);
    has(r#""hostPID": true"#);
    has(r#""hostNetwork": true"#);
    has(r#""privileged": true"#);
    for capability in [
        "NET_RAW",
        "NET_ADMIN",
        "SYS_PTRACE",
        "DAC_READ_SEARCH",
        "PERFMON",
        "SYS_ADMIN",
    ] {
        has(&format!("\"{capability}\""));
    }
    has(r#""mountPath": "/run/netstatfs", "mountPropagation": "Bidirectional""#);
    has(r#""path": "/dev/fuse", "type": "CharDevice""#);
    has(r#""args": ["/run/netstatfs", "--allow-other""#);
    has(r#""livenessProbe""#);
    has(r#""limits": {"cpu": "1", "memory": "1Gi"}"#);
    // The command the README gives works against this layout.
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    assert!(
        readme.contains("kubectl exec -n netstatfs"),
        "README's On Kubernetes"
    );
}

/// The parent of process `pid`.
fn parent_of(pid: u32) -> u32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // "pid (comm) state ppid ...": the comm may hold spaces.
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    after.split(' ').nth(1).unwrap().parse().unwrap()
}

#[test]
fn a_containers_shim_tree_holds_each_of_its_packets_once_in_order() {
    // The shim runs in the host's namespace, the container's processes in
    // their own: each packet crosses the container's veth, its host peer
    // and the bridge, and must be in the shim's tree once, as the
    // container's namespace saw it.
    let _heavy = heavy();
    let Some(docker) = docker_or_why_not() else {
        return;
    };
    web_and_its_client(&docker);
    let web_pid = docker.pid_of("web");
    let shim = parent_of(web_pid);
    let shim_comm = std::fs::read_to_string(format!("/proc/{shim}/comm")).unwrap();
    let shim_comm = shim_comm.trim_end();
    assert!(shim_comm.starts_with("containerd-shim"), "{shim_comm}");
    // The shim holds no inet socket: found by its exact name.
    let mount = Mount::start(&[]);
    let truth = Tcpdump::start_in_netns_of(web_pid, "any", "tcp or udp");
    let tree = mount.dir(shim, shim_comm).join("tree");
    wait_until(WAIT, "the shim's directory", || tree.exists());
    let (bytes, reader) = read_to_eof(&tree);
    wait_until(WAIT, "the shim's tree capture", || {
        mount
            .log()
            .contains(&format!("{shim}_{shim_comm}/tree: capture running"))
    });
    wait_until(WAIT, "some of cli's fetches", || {
        bytes.lock().unwrap().len() > 20_000
    });
    // cli stops first, so that web's last packets are whole exchanges;
    // then web, whose shim ends the tree.
    docker.docker(&["stop", "-t", "1", "cli"]);
    docker.docker(&["stop", "-t", "1", "web"]);
    wait_until(WAIT, "the shim's tree to end", || reader.is_finished());
    reader.join().unwrap();
    let mut truth = truth;
    let truth = records(&truth.stop_to_file());
    let scratch = ScratchDir::new("shim-tree");
    let path = scratch.0.join("tree.pcap");
    std::fs::write(&path, &*bytes.lock().unwrap()).unwrap();
    let ours = records(&path);
    assert!(ours.len() > 30, "only {} packets", ours.len());
    assert_same_packets("the shim's tree", &ours, &truth);
    // Taken where web's socket sees them: to it or from it, never as a
    // bridge port on the host sees another host's frames pass.
    let types = packet_types(&path);
    assert!(
        types.iter().all(|kind| matches!(kind, 0 | 4)),
        "packet types {:?}",
        types.iter().collect::<std::collections::BTreeSet<_>>()
    );
}

/// Podman with storage and state of the test's own (the vfs driver: no
/// mounts to leave behind), removed on drop.
struct Podman {
    scratch: ScratchDir,
}

impl Podman {
    fn command(&self, args: &[&str]) -> Result<String, String> {
        let output = std::process::Command::new("podman")
            .arg("--root")
            .arg(self.scratch.0.join("root"))
            .arg("--runroot")
            .arg(self.scratch.0.join("run"))
            .args([
                "--storage-driver",
                "vfs",
                "--cgroup-manager",
                "cgroupfs",
                "--events-backend",
                "none",
            ])
            .args(args)
            .output()
            .map_err(|err| format!("podman cannot run: {err}"))?;
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
        } else {
            Err(String::from_utf8_lossy(&output.stderr).trim().to_owned())
        }
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self.command(&["rm", "--all", "--force"]);
    }
}

#[test]
fn a_podman_container_is_named_as_its_conmon_was_told() {
    if !Path::new("/usr/bin/podman").exists() {
        eprintln!("skipped: podman is not installed (scripts/setup.sh test installs it)");
        return;
    }
    let podman = Podman {
        scratch: ScratchDir::new("podman"),
    };
    let root = podman.scratch.0.join("image");
    for dir in ["bin", "www"] {
        std::fs::create_dir_all(root.join(dir)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    for applet in ["sh", "httpd", "wget"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    std::fs::write(root.join("www/index.html"), "hello from pweb\n").unwrap();
    let tar = podman.scratch.0.join("image.tar");
    let status = std::process::Command::new("tar")
        .arg("-C")
        .arg(&root)
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .status()
        .unwrap();
    assert!(status.success());
    podman
        .command(&["import", tar.to_str().unwrap(), "netstatfs-test-busybox:1"])
        .unwrap();
    // Limits below the machine's: podman's own defaults raise them, which
    // this machine's bounding set (no CAP_SYS_RESOURCE) refuses.
    podman
        .command(&[
            "run",
            "-d",
            "--name",
            "pweb",
            "--network",
            "none",
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=1024:1024",
            "netstatfs-test-busybox:1",
            "/bin/httpd",
            "-f",
            "-p",
            "127.0.0.1:8080",
            "-h",
            "/www",
        ])
        .unwrap();
    let pid: u32 = podman
        .command(&["inspect", "-f", "{{.State.Pid}}", "pweb"])
        .unwrap()
        .parse()
        .unwrap();
    let id = podman
        .command(&["inspect", "-f", "{{.Id}}", "pweb"])
        .unwrap();
    let mount = Mount::start(&[]);
    let pweb = mount.path.join("containers/pweb");
    let link = format!("{pid}_httpd");
    wait_until(WAIT, "containers/pweb with its httpd", || {
        try_list(&pweb).is_some_and(|names| names.contains(&link))
    });
    let process = mount.dir(pid, "httpd");
    assert_eq!(
        xattr(&process, "user.netstatfs.container.name").as_deref(),
        Some("pweb")
    );
    assert_eq!(
        xattr(&process, "user.netstatfs.container.runtime").as_deref(),
        Some("podman")
    );
    assert_eq!(xattr(&process, "user.netstatfs.container.id"), Some(id));
    // Its all holds a fetch made inside it, on its own loopback.
    let (bytes, reader) = read_to_eof(&pweb.join("all"));
    wait_until(WAIT, "pweb's capture", || {
        mount.log().contains("containers/pweb/all: capture running")
    });
    podman
        .command(&[
            "exec",
            "pweb",
            "wget",
            "-q",
            "-O",
            "-",
            "http://127.0.0.1:8080/",
        ])
        .unwrap();
    wait_until(WAIT, "the fetch in pweb's all", || {
        String::from_utf8_lossy(&bytes.lock().unwrap()).contains("hello from pweb")
    });
    podman.command(&["stop", "-t", "1", "pweb"]).unwrap();
    wait_until(WAIT, "pweb's all to end", || reader.is_finished());
}
