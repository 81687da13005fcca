//! Which container a process runs in, from its cgroup path as the kernel
//! shows it in `/proc/<pid>/cgroup` (pure). Runtimes name their cgroups
//! after the container; nothing else is asked of them:
//!
//! | runtime | systemd driver | cgroupfs driver |
//! |---|---|---|
//! | docker | `…/docker-<id>.scope` | `/docker/<id>` |
//! | podman | `…/libpod-<id>.scope` | `/libpod_parent/libpod-<id>` |
//! | containerd (CRI) | `…/cri-containerd-<id>.scope` | `/kubepods/<qos>/pod<uid>/<id>` |
//! | CRI-O | `…/crio-<id>.scope` | |
//! | LXC | `/lxc.payload.<name>/…` | `/lxc/<name>/…` |
//!
//! Kubernetes puts a pod's containers under `…pod<uid>…` (`_` for `-` in
//! systemd slice names). cgroup v2's line (`0::`) and v1's lines are all
//! looked at; the innermost container named wins.

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Container {
    /// docker, podman, containerd, cri-o, cri (a Kubernetes pod under the
    /// cgroupfs driver, whose path does not name the runtime) or lxc.
    pub runtime: &'static str,
    /// The runtime's id: 64 hex digits, or an LXC container's name.
    pub id: String,
    /// The Kubernetes pod's uid, where the path has one.
    pub pod_uid: Option<String>,
}

impl Container {
    /// `0123456789ab`: the id as `docker ps` shortens it (an LXC name as
    /// it is).
    pub fn short_id(&self) -> String {
        if is_hex_id(&self.id) {
            self.id.chars().take(12).collect()
        } else {
            self.id.clone()
        }
    }
}

/// The container a process with this `/proc/<pid>/cgroup` runs in.
pub fn container_of(cgroup: &str) -> Option<Container> {
    cgroup
        .lines()
        .filter_map(|line| line.splitn(3, ':').nth(2))
        .filter_map(container_in_path)
        .max_by_key(|(depth, _)| *depth)
        .map(|(_, container)| container)
}

/// The innermost container a path names, with its depth in the path.
fn container_in_path(path: &str) -> Option<(usize, Container)> {
    let parts: Vec<&str> = path.split('/').filter(|part| !part.is_empty()).collect();
    let pod_uid = parts.iter().find_map(|part| pod_uid_in(part));
    let mut found = None;
    for (depth, part) in parts.iter().enumerate() {
        let parent = depth.checked_sub(1).map(|i| parts[i]);
        if let Some((runtime, id)) = named_container(part, parent) {
            found = Some((
                depth,
                Container {
                    runtime,
                    id,
                    pod_uid: pod_uid.clone(),
                },
            ));
        }
    }
    found
}

fn named_container(part: &str, parent: Option<&str>) -> Option<(&'static str, String)> {
    const SCOPES: [(&str, &str); 4] = [
        ("docker-", "docker"),
        ("libpod-", "podman"),
        ("cri-containerd-", "containerd"),
        ("crio-", "cri-o"),
    ];
    let unit = part.strip_suffix(".scope").unwrap_or(part);
    for (prefix, runtime) in SCOPES {
        if let Some(id) = unit.strip_prefix(prefix).filter(|id| is_hex_id(id)) {
            return Some((runtime, id.to_owned()));
        }
    }
    if let Some(name) = part.strip_prefix("lxc.payload.").filter(|n| !n.is_empty()) {
        return Some(("lxc", name.to_owned()));
    }
    match parent {
        Some("docker") if is_hex_id(part) => Some(("docker", part.to_owned())),
        Some("lxc") if !part.is_empty() => Some(("lxc", part.to_owned())),
        Some(pod) if pod_uid_in(pod).is_some() && is_hex_id(part) => Some(("cri", part.to_owned())),
        _ => None,
    }
}

/// `pod<uid>` (cgroupfs) or `kubepods-<qos>-pod<uid_with_underscores>.slice`.
fn pod_uid_in(part: &str) -> Option<String> {
    let unit = part.strip_suffix(".slice").unwrap_or(part);
    let start = unit.rfind("pod")?;
    if start > 0 && !unit[..start].ends_with('-') {
        return None;
    }
    let uid = unit[start + 3..].replace('_', "-");
    let looks_like_uid = uid.len() == 36 && uid.chars().all(|c| c == '-' || c.is_ascii_hexdigit());
    looks_like_uid.then_some(uid)
}

fn is_hex_id(text: &str) -> bool {
    text.len() == 64 && text.chars().all(|c| c.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f2a0e57c1d94b6e8a7f1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f";

    const POD: &str = "5c3b2a1d-0e9f-4a8b-9c7d-6e5f4a3b2c1d";

    fn container(cgroup: &str) -> Option<(&'static str, String, Option<String>)> {
        container_of(cgroup).map(|c| (c.runtime, c.id, c.pod_uid))
    }

    #[test]
    fn docker_under_both_drivers() {
        let systemd = format!("0::/system.slice/docker-{ID}.scope\n");
        assert_eq!(container(&systemd), Some(("docker", ID.into(), None)));
        let cgroupfs = format!("12:memory:/docker/{ID}\n0::/docker/{ID}\n");
        assert_eq!(container(&cgroupfs), Some(("docker", ID.into(), None)));
        assert_eq!(container_of(&systemd).unwrap().short_id(), "3f2a0e57c1d9");
    }

    #[test]
    fn podman_containerd_crio_and_kubernetes_pods() {
        let podman = format!("0::/machine.slice/libpod-{ID}.scope/container\n");
        assert_eq!(container(&podman), Some(("podman", ID.into(), None)));
        let underscored = POD.replace('-', "_");
        let kubelet = format!(
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{underscored}.slice/cri-containerd-{ID}.scope\n"
        );
        assert_eq!(
            container(&kubelet),
            Some(("containerd", ID.into(), Some(POD.into())))
        );
        let crio = format!("0::/kubepods.slice/kubepods-pod{underscored}.slice/crio-{ID}.scope\n");
        assert_eq!(
            container(&crio),
            Some(("cri-o", ID.into(), Some(POD.into())))
        );
        let cgroupfs = format!("0::/kubepods/besteffort/pod{POD}/{ID}\n");
        assert_eq!(
            container(&cgroupfs),
            Some(("cri", ID.into(), Some(POD.into())))
        );
    }

    #[test]
    fn lxc_by_name() {
        assert_eq!(
            container("0::/lxc.payload.web1/system.slice/nginx.service\n"),
            Some(("lxc", "web1".into(), None))
        );
        assert_eq!(
            container("4:cpu:/lxc/db2/init.scope\n"),
            Some(("lxc", "db2".into(), None))
        );
    }

    #[test]
    fn hosts_processes_and_garbage_are_in_no_container() {
        for cgroup in [
            "0::/user.slice/user-1000.slice/session-2.scope\n",
            "0::/system.slice/docker.service\n",
            "0::/init.scope\n",
            "0::/\n",
            "",
            "no colons here",
            "0::/system.slice/docker-notanid.scope\n",
            "0::/kubepods.slice/kubepods-podnotauid.slice\n",
        ] {
            assert_eq!(container(cgroup), None, "{cgroup:?}");
        }
    }
}
