//! Which container each process of a snapshot runs in, and the container's
//! names: what the `containers/` and `pods/` directories and the
//! `container.name` and `pod.*` attributes show.
//!
//! A process's cgroup is read once in its life (a container's processes
//! never leave it), a container's names when it is first seen and every
//! [`NAMES_KEPT`] after, so a snapshot costs a read only for what is new.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::container::{Container, container_of};
use super::runtimes::{Names, RuntimeDirs};
use super::{NetnsId, Snapshot};

/// How long a container's names are trusted before they are read again
/// (`docker rename`).
const NAMES_KEPT: Duration = Duration::from_secs(5);

/// Where the runtimes' state is, as the command line says (None: the
/// defaults, and where dockerd runs with another data root, that one).
#[derive(Clone, Debug, Default)]
pub struct RuntimeOptions {
    pub docker_root: Option<PathBuf>,
    pub containerd_state: Option<PathBuf>,
}

/// One container of a snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerInfo {
    pub container: Container,
    pub names: Names,
    /// Its processes, as indices into the snapshot's processes, by pid.
    pub members: Vec<usize>,
    /// The network namespace its processes' sockets live in: the first
    /// member's (a container has one).
    pub netns: Option<NetnsId>,
}

/// The caches behind [`ContainerIndex::containers`].
#[derive(Default)]
pub struct ContainerIndex {
    options: RuntimeOptions,
    /// By (pid, start ticks).
    cgroups: HashMap<(i32, u64), Option<Container>>,
    /// By runtime and id.
    names: HashMap<(&'static str, String), (Names, Instant)>,
}

impl ContainerIndex {
    pub fn new(options: RuntimeOptions) -> ContainerIndex {
        ContainerIndex {
            options,
            ..ContainerIndex::default()
        }
    }

    /// The containers of `snapshot`'s processes, sorted by runtime and id.
    pub fn containers(&mut self, snapshot: &Snapshot) -> Vec<ContainerInfo> {
        let mut live = HashMap::with_capacity(snapshot.processes.len());
        let mut by_container: HashMap<Container, Vec<usize>> = HashMap::new();
        for (index, process) in snapshot.processes.iter().enumerate() {
            let key = (process.pid, process.start_ticks);
            let container = match self.cgroups.remove(&key) {
                Some(known) => known,
                None => std::fs::read_to_string(format!("/proc/{}/cgroup", process.pid))
                    .ok()
                    .and_then(|cgroup| container_of(&cgroup)),
            };
            if let Some(container) = &container {
                by_container
                    .entry(container.clone())
                    .or_default()
                    .push(index);
            }
            live.insert(key, container);
        }
        // Processes that are gone are forgotten.
        self.cgroups = live;
        if by_container.is_empty() {
            self.names.clear();
            return Vec::new();
        }
        let now = Instant::now();
        let live: HashSet<(&'static str, &str)> = by_container
            .keys()
            .map(|container| (container.runtime, container.id.as_str()))
            .collect();
        self.names.retain(|(runtime, id), (_, read)| {
            now.duration_since(*read) < NAMES_KEPT && live.contains(&(*runtime, id.as_str()))
        });
        // Where the runtimes keep their state is looked for only when a
        // name is to be read (a new container, or one kept too long).
        let mut dirs: Option<RuntimeDirs> = None;
        let mut containers = Vec::with_capacity(by_container.len());
        for (container, members) in by_container {
            let key = (container.runtime, container.id.clone());
            let names = match self.names.get(&key) {
                Some((names, _)) => names.clone(),
                None => {
                    let dirs = dirs.get_or_insert_with(|| {
                        RuntimeDirs::find(
                            self.options.docker_root.as_deref(),
                            self.options.containerd_state.as_deref(),
                            snapshot
                                .processes
                                .iter()
                                .map(|process| (process.pid, process.comm.clone())),
                        )
                    });
                    let names = dirs.names(&container);
                    self.names.insert(key, (names.clone(), now));
                    names
                }
            };
            let netns = members
                .iter()
                .find_map(|&index| snapshot.processes[index].netns);
            containers.push(ContainerInfo {
                container,
                names,
                members,
                netns,
            });
        }
        containers.sort_by(|a, b| {
            (a.container.runtime, &a.container.id).cmp(&(b.container.runtime, &b.container.id))
        });
        containers
    }
}
