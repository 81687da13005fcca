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
        let _ = Command::new("ip").args(["netns", "del", &name]).status();
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
