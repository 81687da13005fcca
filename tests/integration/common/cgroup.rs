//! Cgroups named as container runtimes name theirs, made for a test in the
//! machine's cgroup v2 hierarchy (what `docker run` or the kubelet would
//! make, without their daemons) and removed after.

use std::path::PathBuf;

pub const CONTAINER_ID: &str = "3f2a0e57c1d94b6e8a7f1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f";
pub const POD_UID: &str = "5c3b2a1d-0e9f-4a8b-9c7d-6e5f4a3b2c1d";

/// Nested cgroups under a top one of this test process. Removed on drop,
/// innermost first, their processes moved back to the root.
pub struct Cgroup {
    root: PathBuf,
    /// From the top one down to the leaf.
    levels: Vec<PathBuf>,
}

impl Cgroup {
    /// As docker's systemd driver names a container's.
    pub fn docker_like() -> Cgroup {
        Self::nested(&[format!("docker-{CONTAINER_ID}.scope")])
    }

    /// As the kubelet (systemd driver) and containerd name a pod's
    /// container.
    pub fn kubernetes_like() -> Cgroup {
        let pod = POD_UID.replace('-', "_");
        Self::nested(&[
            "kubepods-burstable.slice".to_owned(),
            format!("kubepods-burstable-pod{pod}.slice"),
            format!("cri-containerd-{CONTAINER_ID}.scope"),
        ])
    }

    fn nested(names: &[String]) -> Cgroup {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let root = mountinfo
            .lines()
            .find_map(|line| {
                let (before, after) = line.split_once(" - ")?;
                (after.split(' ').next()? == "cgroup2").then(|| before.split(' ').nth(4))?
            })
            .map(PathBuf::from)
            .expect("a cgroup v2 hierarchy");
        let mut at = root.join(format!("netstatfs-test-{}.slice", std::process::id()));
        let mut levels = vec![at.clone()];
        for name in names {
            at = at.join(name);
            levels.push(at.clone());
        }
        std::fs::create_dir_all(&at).unwrap();
        Cgroup { root, levels }
    }

    /// The leaf's path as /proc/<pid>/cgroup shows it.
    pub fn path(&self) -> String {
        let leaf = self.levels.last().unwrap();
        format!("/{}", leaf.strip_prefix(&self.root).unwrap().display())
    }

    pub fn enter(&self, pid: u32) {
        let leaf = self.levels.last().unwrap();
        std::fs::write(leaf.join("cgroup.procs"), pid.to_string()).unwrap();
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        for level in self.levels.iter().rev() {
            if let Ok(procs) = std::fs::read_to_string(level.join("cgroup.procs")) {
                for pid in procs.lines() {
                    let _ = std::fs::write(self.root.join("cgroup.procs"), pid);
                }
            }
            let _ = std::fs::remove_dir(level);
        }
    }
}
