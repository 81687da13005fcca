//! Network namespaces a test makes for itself (`ip netns add`), with their
//! loopback up, deleted on drop.

use std::process::Command;

pub struct Netns {
    pub name: String,
}

fn ip(args: &[&str]) {
    let status = Command::new("ip").args(args).status().expect("ip runs");
    assert!(status.success(), "ip {args:?} failed");
}

impl Netns {
    pub fn new(tag: &str) -> Netns {
        let name = format!("nsfs-{tag}-{}", std::process::id());
        // A namespace left by a killed run (usually none: say nothing).
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(std::process::Stdio::null())
            .status();
        ip(&["netns", "add", &name]);
        let netns = Netns { name };
        ip(&["-n", &netns.name, "link", "set", "lo", "up"]);
        netns
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Two namespaces joined by a veth pair: 10.77.<n>.1/24 in the first,
/// 10.77.<n>.2/24 in the second (n from the test's tag, so parallel tests
/// do not share addresses; each pair is private anyway).
pub fn linked_pair(tag: &str, n: u8) -> (Netns, Netns) {
    let first = Netns::new(&format!("{tag}a"));
    let second = Netns::new(&format!("{tag}b"));
    let (a, b) = (format!("va{n}"), format!("vb{n}"));
    ip(&[
        "-n",
        &first.name,
        "link",
        "add",
        &a,
        "type",
        "veth",
        "peer",
        "name",
        &b,
        "netns",
        &second.name,
    ]);
    ip(&[
        "-n",
        &first.name,
        "addr",
        "add",
        &format!("10.77.{n}.1/24"),
        "dev",
        &a,
    ]);
    ip(&[
        "-n",
        &second.name,
        "addr",
        "add",
        &format!("10.77.{n}.2/24"),
        "dev",
        &b,
    ]);
    ip(&["-n", &first.name, "link", "set", &a, "up"]);
    ip(&["-n", &second.name, "link", "set", &b, "up"]);
    (first, second)
}

/// A "host" namespace with a bridge (10.78.<n>.1/24) and a "container"
/// namespace joined to it by a veth pair (10.78.<n>.2/24), as a container
/// runtime lays them out: the container's packets cross the veth's host
/// end and the bridge in the host namespace.
pub fn bridged(tag: &str, n: u8) -> (Netns, Netns) {
    let host = Netns::new(&format!("{tag}h"));
    let container = Netns::new(&format!("{tag}c"));
    let (bridge, outside, inside) = (format!("br{n}"), format!("vh{n}"), format!("vc{n}"));
    ip(&["-n", &host.name, "link", "add", &bridge, "type", "bridge"]);
    ip(&[
        "-n",
        &host.name,
        "addr",
        "add",
        &format!("10.78.{n}.1/24"),
        "dev",
        &bridge,
    ]);
    ip(&["-n", &host.name, "link", "set", &bridge, "up"]);
    ip(&[
        "-n",
        &host.name,
        "link",
        "add",
        &outside,
        "type",
        "veth",
        "peer",
        "name",
        &inside,
        "netns",
        &container.name,
    ]);
    ip(&["-n", &host.name, "link", "set", &outside, "master", &bridge]);
    ip(&["-n", &host.name, "link", "set", &outside, "up"]);
    ip(&[
        "-n",
        &container.name,
        "addr",
        "add",
        &format!("10.78.{n}.2/24"),
        "dev",
        &inside,
    ]);
    ip(&["-n", &container.name, "link", "set", &inside, "up"]);
    (host, container)
}
