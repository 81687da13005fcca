//! Directories beside the process directories that group them (pure):
//!
//! - `containers/<name>/`: a container's processes, as symlinks to
//!   `../../<pid>_<comm>` (so every tool and the process directories keep
//!   working), and `all`, every packet of the container's network
//!   namespace, captured once inside it (what `nsenter -t PID -n tcpdump
//!   -i any` shows).
//! - `pods/<namespace>/<pod>/`: a Kubernetes pod's `all` (its containers
//!   share one network namespace), and per container a symlink to its
//!   `containers/` directory.
//!
//! A container is named as its runtime names it (see
//! [`crate::inventory::runtimes`]), or by its short id where the runtime
//! leaves nothing readable; '/' and control characters become '_' as in
//! process names. Where two runtimes use one name, each is prefixed with
//! its runtime (`docker_web`, `lxc_web`); where one runtime uses it twice
//! (Kubernetes' containers are named within their pod), each gets
//! `~<short id>`.
//!
//! The file system knows a view only as a [`Views`] node: a directory, a
//! symlink or a group's stream. Another kind of grouping is another
//! builder here, not new branches through the file system.

use std::collections::{BTreeMap, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::time::SystemTime;

use super::tree::{InodeTable, NodeKey};
use crate::inventory::container::Container;
use crate::inventory::containers::ContainerInfo;
use crate::inventory::runtimes::Pod;
use crate::inventory::{NetnsId, Snapshot};
use crate::names;

/// One entry of the views.
#[derive(Debug)]
pub struct ViewEntry {
    pub ino: u64,
    pub name: String,
    pub kind: ViewKind,
    /// Whose it is: the members' user where they all have one, else root.
    pub uid: u32,
    pub gid: u32,
    /// Its oldest member's start, or the snapshot's time for a directory
    /// of directories.
    pub born: SystemTime,
    /// A directory of directories (`containers/`, `pods/<namespace>/`):
    /// open to every user of a shared mount, as the root is. A group's own
    /// directory is its members' user's alone, as their process
    /// directories are.
    pub listing: bool,
}

#[derive(Debug)]
pub enum ViewKind {
    /// Entries (indices into [`Views::entries`]), sorted by name.
    Dir(Vec<usize>),
    /// A symlink, relative to its directory.
    Link(String),
    /// A group's `all`: every packet of its network namespace.
    All(Group),
}

/// The processes a group's stream speaks for.
#[derive(Debug, Clone)]
pub struct Group {
    /// `containers/web`, for log lines.
    pub label: String,
    /// Indices into the snapshot's processes, oldest first: the first one
    /// ending ends the stream, as a container's first process ending stops
    /// it.
    pub members: Vec<usize>,
    pub netns: Option<NetnsId>,
}

/// The views of one snapshot.
#[derive(Debug, Default)]
pub struct Views {
    pub entries: Vec<ViewEntry>,
    /// The entries the mount's root shows (`containers`, `pods`).
    pub top: Vec<usize>,
}

/// The top directories' names.
pub const CONTAINERS: &str = "containers";
pub const PODS: &str = "pods";

impl Views {
    /// Builds `containers/` and `pods/` for `containers` of `snapshot`;
    /// `owner` owns the directories of directories (the mount's user).
    pub fn build(
        snapshot: &Snapshot,
        containers: &[ContainerInfo],
        inodes: &mut InodeTable,
        owner: (u32, u32),
    ) -> Views {
        let mut views = Views::default();
        let now = snapshot.taken_wall;
        let names = container_dir_names(containers);
        let mut container_dirs = Vec::new();
        for (info, dir_name) in containers.iter().zip(&names) {
            let group = key_of(&(info.container.runtime, &info.container.id));
            let mut members = info.members.clone();
            members.sort_by_key(|&index| {
                let process = &snapshot.processes[index];
                (process.start_ticks, process.pid)
            });
            let (uid, gid, born) = members_owner(snapshot, &members, owner, now);
            let mut children = Vec::new();
            for &index in &members {
                let process = &snapshot.processes[index];
                let link = names::process_dir_name(process.pid, &process.comm);
                children.push(views.push(
                    inodes,
                    NodeKey::View {
                        group,
                        pid: process.pid,
                        start_ticks: process.start_ticks,
                    },
                    ViewEntry {
                        ino: 0,
                        kind: ViewKind::Link(format!("../../{link}")),
                        name: link,
                        uid,
                        gid,
                        born: process.started,
                        listing: false,
                    },
                ));
            }
            children.push(views.all(
                inodes,
                group,
                Group {
                    label: format!("{CONTAINERS}/{dir_name}"),
                    members: members.clone(),
                    netns: info.netns,
                },
                Whose::group((uid, gid), born),
            ));
            let dir = views.dir(
                inodes,
                group,
                dir_name.clone(),
                children,
                Whose::group((uid, gid), born),
            );
            container_dirs.push(dir);
        }
        let containers_dir = views.dir(
            inodes,
            key_of(&CONTAINERS),
            CONTAINERS.to_owned(),
            container_dirs.clone(),
            Whose::listing(owner, now),
        );
        views.top.push(containers_dir);

        // Pods: by namespace, then name.
        let mut pods: BTreeMap<&Pod, Vec<usize>> = BTreeMap::new();
        for (index, info) in containers.iter().enumerate() {
            if let Some(pod) = &info.names.pod {
                pods.entry(pod).or_default().push(index);
            }
        }
        let mut by_namespace: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for (pod, indices) in pods {
            let group = key_of(&("pod", &pod.namespace, &pod.name));
            let mut members: Vec<usize> = indices
                .iter()
                .flat_map(|&index| containers[index].members.iter().copied())
                .collect();
            members.sort_by_key(|&index| {
                let process = &snapshot.processes[index];
                (process.start_ticks, process.pid)
            });
            let (uid, gid, born) = members_owner(snapshot, &members, owner, now);
            let mut children = Vec::new();
            for &index in &indices {
                let info = &containers[index];
                let name = info
                    .names
                    .name
                    .as_deref()
                    .map_or_else(|| short_id(&info.container), names::safe_comm);
                children.push(views.push(
                    inodes,
                    NodeKey::View {
                        group,
                        pid: LINK_TO_CONTAINER,
                        start_ticks: key_of(&(info.container.runtime, &info.container.id)),
                    },
                    ViewEntry {
                        ino: 0,
                        name,
                        kind: ViewKind::Link(format!("../../../{CONTAINERS}/{}", names[index])),
                        uid,
                        gid,
                        born,
                        listing: false,
                    },
                ));
            }
            let netns = indices.iter().find_map(|&index| containers[index].netns);
            let label = format!(
                "{PODS}/{}/{}",
                names::safe_comm(&pod.namespace),
                names::safe_comm(&pod.name)
            );
            children.push(views.all(
                inodes,
                group,
                Group {
                    label,
                    members,
                    netns,
                },
                Whose::group((uid, gid), born),
            ));
            let pod_dir = views.dir(
                inodes,
                group,
                names::safe_comm(&pod.name),
                children,
                Whose::group((uid, gid), born),
            );
            by_namespace
                .entry(&pod.namespace)
                .or_default()
                .push(pod_dir);
        }
        let mut namespace_dirs = Vec::new();
        for (namespace, pod_dirs) in by_namespace {
            namespace_dirs.push(views.dir(
                inodes,
                key_of(&("namespace", namespace)),
                names::safe_comm(namespace),
                pod_dirs,
                Whose::listing(owner, now),
            ));
        }
        let pods_dir = views.dir(
            inodes,
            key_of(&PODS),
            PODS.to_owned(),
            namespace_dirs,
            Whose::listing(owner, now),
        );
        views.top.push(pods_dir);
        views
    }

    /// Adds `entry` with the inode number its key has.
    fn push(&mut self, inodes: &mut InodeTable, key: NodeKey, mut entry: ViewEntry) -> usize {
        entry.ino = inodes.assign(key, entry.born).ino;
        self.entries.push(entry);
        self.entries.len() - 1
    }

    /// Adds a group's `all`.
    fn all(&mut self, inodes: &mut InodeTable, group: u64, of: Group, whose: Whose) -> usize {
        self.push(
            inodes,
            NodeKey::View {
                group,
                pid: ALL_FILE,
                start_ticks: 0,
            },
            ViewEntry {
                ino: 0,
                name: "all".to_owned(),
                kind: ViewKind::All(of),
                uid: whose.ids.0,
                gid: whose.ids.1,
                born: whose.born,
                listing: whose.listing,
            },
        )
    }

    /// Adds a directory of `children`, sorted by name.
    fn dir(
        &mut self,
        inodes: &mut InodeTable,
        group: u64,
        name: String,
        mut children: Vec<usize>,
        whose: Whose,
    ) -> usize {
        let Whose {
            ids: (uid, gid),
            born,
            listing,
        } = whose;
        children.sort_by(|&a, &b| self.entries[a].name.cmp(&self.entries[b].name));
        self.push(
            inodes,
            NodeKey::View {
                group,
                pid: DIRECTORY,
                start_ticks: 0,
            },
            ViewEntry {
                ino: 0,
                name,
                kind: ViewKind::Dir(children),
                uid,
                gid,
                born,
                listing,
            },
        )
    }

    /// The entry `name` of the views' directory `dir`.
    pub fn child(&self, dir: usize, name: &str) -> Option<usize> {
        let ViewKind::Dir(children) = &self.entries.get(dir)?.kind else {
            return None;
        };
        children
            .binary_search_by(|&child| self.entries[child].name.as_str().cmp(name))
            .ok()
            .map(|at| children[at])
    }

    /// The top entry named `name`.
    pub fn top_named(&self, name: &str) -> Option<usize> {
        self.top
            .iter()
            .copied()
            .find(|&top| self.entries[top].name == name)
    }
}

/// Whose a directory is: a group's is its members', a directory of
/// directories the mount's and open to every user of a shared mount.
struct Whose {
    ids: (u32, u32),
    born: SystemTime,
    listing: bool,
}

impl Whose {
    fn group(ids: (u32, u32), born: SystemTime) -> Whose {
        Whose {
            ids,
            born,
            listing: false,
        }
    }

    fn listing(ids: (u32, u32), born: SystemTime) -> Whose {
        Whose {
            ids,
            born,
            listing: true,
        }
    }
}

/// What a view key's `pid` says when the entry is not a process's link.
const DIRECTORY: i32 = -1;
const ALL_FILE: i32 = -2;
const LINK_TO_CONTAINER: i32 = -3;

fn key_of(value: &impl Hash) -> u64 {
    let mut hasher = DefaultHasher::new();
    value.hash(&mut hasher);
    hasher.finish()
}

/// The members' user and group where they all share one (else `owner`'s),
/// and the oldest member's start.
fn members_owner(
    snapshot: &Snapshot,
    members: &[usize],
    owner: (u32, u32),
    now: SystemTime,
) -> (u32, u32, SystemTime) {
    let mut ids = members.iter().map(|&index| {
        let process = &snapshot.processes[index];
        (process.uid, process.gid)
    });
    let first = ids.next();
    let shared = match first {
        Some(first) if ids.all(|ids| ids == first) => first,
        _ => owner,
    };
    let born = members
        .first()
        .map_or(now, |&index| snapshot.processes[index].started);
    (shared.0, shared.1, born)
}

/// A container named by its id, for want of a name: made safe as a name.
fn short_id(container: &Container) -> String {
    names::safe_comm(&container.short_id())
}

/// Each container's directory name, unique (see the module's docs).
fn container_dir_names(containers: &[ContainerInfo]) -> Vec<String> {
    let plain: Vec<String> = containers
        .iter()
        .map(|info| {
            info.names
                .name
                .as_deref()
                .map_or_else(|| short_id(&info.container), names::safe_comm)
        })
        .collect();
    let mut runtimes_of: HashMap<&str, Vec<&'static str>> = HashMap::new();
    for (name, info) in plain.iter().zip(containers) {
        let runtimes = runtimes_of.entry(name).or_default();
        if !runtimes.contains(&info.container.runtime) {
            runtimes.push(info.container.runtime);
        }
    }
    let prefixed: Vec<String> = plain
        .iter()
        .zip(containers)
        .map(|(name, info)| {
            if runtimes_of[name.as_str()].len() > 1 {
                format!("{}_{name}", info.container.runtime)
            } else {
                name.clone()
            }
        })
        .collect();
    let mut uses: HashMap<&str, usize> = HashMap::new();
    for name in &prefixed {
        *uses.entry(name).or_default() += 1;
    }
    prefixed
        .iter()
        .zip(containers)
        .map(|(name, info)| {
            if uses[name.as_str()] > 1 {
                format!("{name}~{}", short_id(&info.container))
            } else {
                name.clone()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::inventory::ProcessInfo;
    use crate::inventory::container::Container;
    use crate::inventory::runtimes::Names;

    fn process(pid: i32, comm: &str, uid: u32, netns: u64) -> ProcessInfo {
        ProcessInfo {
            pid,
            start_ticks: pid as u64,
            started: SystemTime::UNIX_EPOCH,
            comm: comm.into(),
            uid,
            gid: uid,
            netns: Some(NetnsId::from_inode(netns)),
            sockets: Vec::new(),
            unix: Vec::new(),
        }
    }

    fn container(
        runtime: &'static str,
        id: &str,
        name: Option<&str>,
        pod: Option<(&str, &str)>,
        members: Vec<usize>,
        netns: u64,
    ) -> ContainerInfo {
        ContainerInfo {
            container: Container {
                runtime,
                id: id.to_owned(),
                pod_uid: None,
            },
            names: Names {
                name: name.map(str::to_owned),
                pod: pod.map(|(namespace, name)| Pod {
                    namespace: namespace.into(),
                    name: name.into(),
                }),
            },
            members,
            netns: Some(NetnsId::from_inode(netns)),
        }
    }

    fn id(digit: char) -> String {
        std::iter::repeat_n(digit, 64).collect()
    }

    fn snapshot() -> Snapshot {
        Snapshot {
            taken: Instant::now(),
            taken_wall: SystemTime::now(),
            processes: vec![
                process(10, "httpd", 0, 7),
                process(11, "sh", 0, 8),
                process(12, "wget", 1000, 8),
                process(20, "nginx", 101, 9),
                process(21, "pause", 65535, 9),
            ],
        }
    }

    fn names_in(views: &Views, dir: usize) -> Vec<&str> {
        let ViewKind::Dir(children) = &views.entries[dir].kind else {
            panic!("not a directory");
        };
        children
            .iter()
            .map(|&child| views.entries[child].name.as_str())
            .collect()
    }

    #[test]
    fn containers_are_named_by_their_runtime_with_links_and_all() {
        let containers = vec![
            container("docker", &id('a'), Some("web"), None, vec![0], 7),
            container("docker", &id('b'), None, None, vec![1, 2], 8),
        ];
        let mut inodes = InodeTable::default();
        let views = Views::build(&snapshot(), &containers, &mut inodes, (0, 0));
        let top = views.top_named(CONTAINERS).unwrap();
        assert_eq!(names_in(&views, top), ["bbbbbbbbbbbb", "web"]);
        let web = views.child(top, "web").unwrap();
        assert_eq!(names_in(&views, web), ["10_httpd", "all"]);
        let link = views.child(web, "10_httpd").unwrap();
        assert!(
            matches!(&views.entries[link].kind, ViewKind::Link(target) if target == "../../10_httpd")
        );
        let all = views.child(web, "all").unwrap();
        assert!(
            matches!(&views.entries[all].kind, ViewKind::All(group) if group.members == [0] && group.label == "containers/web")
        );
        // Members of two users: the directory is root's.
        let unnamed = views.child(top, "bbbbbbbbbbbb").unwrap();
        assert_eq!(views.entries[web].uid, 0);
        assert_eq!(views.entries[unnamed].uid, 0);
        assert_eq!(names_in(&views, unnamed), ["11_sh", "12_wget", "all"]);
        // No pods: an empty pods directory.
        assert!(names_in(&views, views.top_named(PODS).unwrap()).is_empty());
    }

    #[test]
    fn names_collide_across_runtimes_and_within_one() {
        let containers = vec![
            container("docker", &id('a'), Some("web"), None, vec![0], 7),
            container("lxc", "web", Some("web"), None, vec![1], 8),
            container(
                "cri",
                &id('c'),
                Some("app"),
                Some(("prod", "shop")),
                vec![3],
                9,
            ),
            container(
                "cri",
                &id('d'),
                Some("app"),
                Some(("dev", "shop")),
                vec![4],
                9,
            ),
        ];
        assert_eq!(
            container_dir_names(&containers),
            [
                "docker_web",
                "lxc_web",
                "app~cccccccccccc",
                "app~dddddddddddd"
            ]
        );
    }

    #[test]
    fn pods_group_their_containers_by_namespace() {
        let containers = vec![
            container(
                "cri",
                &id('c'),
                Some("nginx"),
                Some(("prod", "shop/1")),
                vec![3],
                9,
            ),
            container(
                "cri",
                &id('d'),
                Some("POD"),
                Some(("prod", "shop/1")),
                vec![4],
                9,
            ),
        ];
        let mut inodes = InodeTable::default();
        let views = Views::build(&snapshot(), &containers, &mut inodes, (0, 0));
        let pods = views.top_named(PODS).unwrap();
        assert_eq!(names_in(&views, pods), ["prod"]);
        let prod = views.child(pods, "prod").unwrap();
        assert_eq!(names_in(&views, prod), ["shop_1"]);
        let shop = views.child(prod, "shop_1").unwrap();
        assert_eq!(names_in(&views, shop), ["POD", "all", "nginx"]);
        let nginx = views.child(shop, "nginx").unwrap();
        assert!(
            matches!(&views.entries[nginx].kind, ViewKind::Link(target) if target == "../../../containers/nginx")
        );
        let all = views.child(shop, "all").unwrap();
        let ViewKind::All(group) = &views.entries[all].kind else {
            panic!("not a stream");
        };
        // Both containers' processes, oldest first; two users: root's.
        assert_eq!(group.members, [3, 4]);
        assert_eq!(group.label, "pods/prod/shop_1");
        assert_eq!(views.entries[shop].uid, 0);
    }

    #[test]
    fn numbers_stay_while_the_container_lives() {
        let containers = vec![container("docker", &id('a'), Some("web"), None, vec![0], 7)];
        let mut inodes = InodeTable::default();
        let first = Views::build(&snapshot(), &containers, &mut inodes, (0, 0));
        let second = Views::build(&snapshot(), &containers, &mut inodes, (0, 0));
        let inos = |views: &Views| {
            views
                .entries
                .iter()
                .map(|entry| entry.ino)
                .collect::<Vec<_>>()
        };
        assert_eq!(inos(&first), inos(&second));
    }
}
