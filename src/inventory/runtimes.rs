//! Containers' names, as their runtimes keep them on disk: read from the
//! runtime's own state files, never by asking its API socket (which may
//! hang, needs a group the daemon need not be in, and differs per runtime).
//!
//! | runtime | where | what |
//! |---|---|---|
//! | docker | `<data root>/containers/<id>/config.v2.json` | `"Name":"/web"` |
//! | containerd (Kubernetes' CRI) | `<state>/io.containerd.runtime.v2.task/<namespace>/<id>/config.json` | the OCI annotations `io.kubernetes.cri.container-name`, `…sandbox-name`, `…sandbox-namespace` |
//! | Podman, CRI-O | the command line of the container's `conmon` | `-n NAME` (`--name`), for the id of `-c` (`--cid`); CRI-O's is the kubelet's `k8s_<container>_<pod>_<namespace>_<uid>_<attempt>` |
//! | LXC | the cgroup path | the name itself |
//!
//! The data root is `/var/lib/docker` unless `--docker-root` says, or a
//! running dockerd's `--data-root`; the state directory `/run/containerd`
//! unless `--containerd-state` says. (Podman keeps its names in a
//! database, `bolt_state.db` or `db.sql`; its monitor process says them.)
//!
//! Parsing is pure (the `*_names` functions); [`RuntimeDirs::names`] reads.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::container::Container;

/// docker's default data root.
pub const DOCKER_ROOT: &str = "/var/lib/docker";
/// containerd's default state directory.
pub const CONTAINERD_STATE: &str = "/run/containerd";

/// The annotations containerd's CRI plugin writes into each container's
/// OCI bundle (containerd `pkg/cri/annotations/annotations.go`).
const CRI_CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
const CRI_CONTAINER_NAME: &str = "io.kubernetes.cri.container-name";
const CRI_SANDBOX_NAME: &str = "io.kubernetes.cri.sandbox-name";
const CRI_SANDBOX_NAMESPACE: &str = "io.kubernetes.cri.sandbox-namespace";

/// Where the runtimes keep their state.
#[derive(Clone, Debug)]
pub struct RuntimeDirs {
    /// docker's data roots, in the order tried: the one given, or the
    /// default and those running dockerds were started with.
    pub docker_roots: Vec<PathBuf>,
    pub containerd_state: PathBuf,
    /// Names by container id, as running conmons were told them (podman's
    /// and CRI-O's).
    pub conmon_names: HashMap<String, String>,
}

impl Default for RuntimeDirs {
    fn default() -> RuntimeDirs {
        RuntimeDirs {
            docker_roots: vec![PathBuf::from(DOCKER_ROOT)],
            containerd_state: PathBuf::from(CONTAINERD_STATE),
            conmon_names: HashMap::new(),
        }
    }
}

/// A container's names, where its runtime says them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Names {
    pub name: Option<String>,
    pub pod: Option<Pod>,
}

/// A Kubernetes pod, as its CRI annotations name it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
}

impl RuntimeDirs {
    /// The roots given (`--docker-root`), or the default root and every
    /// running dockerd's `--data-root`; and the names running conmons were
    /// given: found among `processes` (pid and comm).
    pub fn find(
        docker_root: Option<&Path>,
        containerd_state: Option<&Path>,
        processes: impl IntoIterator<Item = (i32, String)>,
    ) -> RuntimeDirs {
        let mut docker_roots = match docker_root {
            Some(root) => vec![root.to_path_buf()],
            None => vec![PathBuf::from(DOCKER_ROOT)],
        };
        let mut conmon_names = HashMap::new();
        for (pid, comm) in processes {
            let wanted = (comm == "dockerd" && docker_root.is_none()) || comm == "conmon";
            if !wanted {
                continue;
            }
            let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                continue;
            };
            if comm == "conmon" {
                if let Some((id, name)) = conmon_name(&cmdline) {
                    conmon_names.insert(id, name);
                }
            } else if let Some(root) = docker_data_root(&cmdline)
                && !docker_roots.contains(&root)
            {
                docker_roots.push(root);
            }
        }
        RuntimeDirs {
            docker_roots,
            containerd_state: containerd_state
                .map_or_else(|| PathBuf::from(CONTAINERD_STATE), Path::to_path_buf),
            conmon_names,
        }
    }

    /// What the runtime's state files say of `container`; nothing where
    /// they are missing or unreadable.
    pub fn names(&self, container: &Container) -> Names {
        match container.runtime {
            "docker" => self
                .docker_roots
                .iter()
                .find_map(|root| {
                    std::fs::read_to_string(
                        root.join("containers")
                            .join(&container.id)
                            .join("config.v2.json"),
                    )
                    .ok()
                })
                .map(|config| Names {
                    name: docker_name(&config),
                    pod: None,
                })
                .unwrap_or_default(),
            "containerd" | "cri" => {
                let tasks = self.containerd_state.join("io.containerd.runtime.v2.task");
                let Ok(namespaces) = std::fs::read_dir(&tasks) else {
                    return Names::default();
                };
                namespaces
                    .flatten()
                    .find_map(|namespace| {
                        std::fs::read_to_string(
                            namespace.path().join(&container.id).join("config.json"),
                        )
                        .ok()
                    })
                    .map(|config| cri_names(&config))
                    .unwrap_or_default()
            }
            "lxc" => Names {
                name: Some(container.id.clone()),
                pod: None,
            },
            "podman" => Names {
                name: self.conmon_names.get(&container.id).cloned(),
                pod: None,
            },
            "cri-o" => self
                .conmon_names
                .get(&container.id)
                .map(|name| kubelet_names(name))
                .unwrap_or_default(),
            _ => Names::default(),
        }
    }
}

/// dockerd's `--data-root DIR` or `--data-root=DIR` (or the old `-g`), from
/// its NUL-separated command line.
pub fn docker_data_root(cmdline: &[u8]) -> Option<PathBuf> {
    let arguments: Vec<&str> = cmdline
        .split(|&b| b == 0)
        .filter_map(|argument| std::str::from_utf8(argument).ok())
        .collect();
    arguments.iter().enumerate().find_map(|(i, argument)| {
        let value = match *argument {
            "--data-root" | "-g" | "--graph" => arguments.get(i + 1).copied(),
            _ => argument
                .strip_prefix("--data-root=")
                .or_else(|| argument.strip_prefix("--graph=")),
        }?;
        (!value.is_empty()).then(|| PathBuf::from(value))
    })
}

/// The container id (`-c`, `--cid`) and name (`-n`, `--name`) a conmon
/// monitors, from its NUL-separated command line.
pub fn conmon_name(cmdline: &[u8]) -> Option<(String, String)> {
    let arguments: Vec<&str> = cmdline
        .split(|&b| b == 0)
        .filter_map(|argument| std::str::from_utf8(argument).ok())
        .collect();
    let value = |short: &str, long: &str| {
        arguments.iter().enumerate().find_map(|(i, argument)| {
            if *argument == short || *argument == long {
                arguments.get(i + 1).map(|value| (*value).to_owned())
            } else {
                argument
                    .strip_prefix(long)
                    .and_then(|rest| rest.strip_prefix('='))
                    .map(str::to_owned)
            }
        })
    };
    let id = value("-c", "--cid").filter(|id| !id.is_empty())?;
    let name = value("-n", "--name").filter(|name| !name.is_empty())?;
    Some((id, name))
}

/// A container named as the kubelet names it for CRI-O,
/// `k8s_<container>_<pod>_<namespace>_<uid>_<attempt>` (the pod's sandbox
/// is the container `POD`); any other name as it is.
pub fn kubelet_names(name: &str) -> Names {
    let parts: Vec<&str> = name.split('_').collect();
    match parts.as_slice() {
        ["k8s", container, pod, namespace, _uid, _attempt]
            if !container.is_empty() && !pod.is_empty() && !namespace.is_empty() =>
        {
            Names {
                name: Some((*container).to_owned()),
                pod: Some(Pod {
                    namespace: (*namespace).to_owned(),
                    name: (*pod).to_owned(),
                }),
            }
        }
        _ => Names {
            name: Some(name.to_owned()),
            pod: None,
        },
    }
}

/// The `"Name":"/web-1"` of docker's config.v2.json, without its slash.
pub fn docker_name(config: &str) -> Option<String> {
    let name = json_string(config, "Name")?;
    let name = name.trim_start_matches('/');
    (!name.is_empty()).then(|| name.to_owned())
}

/// A CRI container's names from its bundle's config.json: the container's
/// name and its pod. A pod's sandbox (its pause container) has the pod but
/// no container name of its own: it is named `POD`, as the kubelet calls
/// it.
pub fn cri_names(config: &str) -> Names {
    let pod = match (
        json_string(config, CRI_SANDBOX_NAMESPACE),
        json_string(config, CRI_SANDBOX_NAME),
    ) {
        (Some(namespace), Some(name)) if !namespace.is_empty() && !name.is_empty() => {
            Some(Pod { namespace, name })
        }
        _ => None,
    };
    let name = match json_string(config, CRI_CONTAINER_TYPE).as_deref() {
        Some("sandbox") => pod.as_ref().map(|_| "POD".to_owned()),
        _ => json_string(config, CRI_CONTAINER_NAME).filter(|name| !name.is_empty()),
    };
    Names { name, pod }
}

/// The string value of the first `"key": "…"` in a JSON text, unescaped.
/// (A search, not a parser: the files read here are the runtimes' own,
/// and a key's first occurrence is the one meant.)
fn json_string(text: &str, key: &str) -> Option<String> {
    let quoted = format!("\"{key}\"");
    let mut rest = text;
    loop {
        let at = rest.find(&quoted)?;
        rest = &rest[at + quoted.len()..];
        let after_colon = rest.trim_start().strip_prefix(':')?;
        if let Some(value) = after_colon.trim_start().strip_prefix('"') {
            return unescape(value);
        }
    }
}

/// The JSON string starting at `text` (after its opening quote), up to its
/// closing quote.
fn unescape(text: &str) -> Option<String> {
    let mut value = String::new();
    let mut chars = text.chars();
    loop {
        match chars.next()? {
            '"' => return Some(value),
            '\\' => match chars.next()? {
                'n' => value.push('\n'),
                't' => value.push('\t'),
                'r' => value.push('\r'),
                'b' => value.push('\u{8}'),
                'f' => value.push('\u{c}'),
                'u' => {
                    let hex: String = chars.by_ref().take(4).collect();
                    let code = u32::from_str_radix(&hex, 16).ok()?;
                    value.push(char::from_u32(code).unwrap_or('\u{fffd}'));
                }
                other => value.push(other),
            },
            other => value.push(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dockers_config_names_the_container() {
        let config = r#"{"StreamConfig":{},"State":{"Running":true},"ID":"3f2a","Name":"/web-1","Driver":"overlay2"}"#;
        assert_eq!(docker_name(config).as_deref(), Some("web-1"));
        assert_eq!(docker_name(r#"{"Name":""}"#), None);
        assert_eq!(docker_name("{}"), None);
        assert_eq!(docker_name(r#"{"Name": "/a\"b"}"#).as_deref(), Some("a\"b"));
    }

    /// As containerd's CRI plugin writes a bundle's annotations (abridged:
    /// `pkg/cri/server/container_create_linux.go` and
    /// `sandbox_run_linux.go` set them through `pkg/cri/annotations`).
    const CRI_CONTAINER: &str = r#"{"ociVersion":"1.0.2-dev","process":{"args":["nginx"]},
      "annotations":{"io.kubernetes.cri.container-name":"web","io.kubernetes.cri.container-type":"container",
      "io.kubernetes.cri.image-name":"docker.io/library/nginx:1.25","io.kubernetes.cri.sandbox-id":"5d0c",
      "io.kubernetes.cri.sandbox-name":"shop-7c9f","io.kubernetes.cri.sandbox-namespace":"prod",
      "io.kubernetes.cri.sandbox-uid":"5c3b2a1d-0e9f-4a8b-9c7d-6e5f4a3b2c1d"}}"#;
    const CRI_SANDBOX: &str = r#"{"annotations":{"io.kubernetes.cri.container-type":"sandbox",
      "io.kubernetes.cri.sandbox-id":"5d0c","io.kubernetes.cri.sandbox-log-directory":"/var/log/pods/x",
      "io.kubernetes.cri.sandbox-name":"shop-7c9f","io.kubernetes.cri.sandbox-namespace":"prod"}}"#;

    #[test]
    fn cri_bundles_name_the_container_and_its_pod() {
        let pod = Pod {
            namespace: "prod".into(),
            name: "shop-7c9f".into(),
        };
        assert_eq!(
            cri_names(CRI_CONTAINER),
            Names {
                name: Some("web".into()),
                pod: Some(pod.clone())
            }
        );
        assert_eq!(
            cri_names(CRI_SANDBOX),
            Names {
                name: Some("POD".into()),
                pod: Some(pod)
            }
        );
        assert_eq!(cri_names(r#"{"annotations":{}}"#), Names::default());
        assert_eq!(cri_names("not json at all"), Names::default());
    }

    #[test]
    fn dockerds_data_root_from_its_command_line() {
        assert_eq!(
            docker_data_root(b"/usr/sbin/dockerd\0--data-root\0/srv/docker\0-H\0fd://\0"),
            Some(PathBuf::from("/srv/docker"))
        );
        assert_eq!(
            docker_data_root(b"dockerd\0--data-root=/tmp/d\0"),
            Some(PathBuf::from("/tmp/d"))
        );
        assert_eq!(docker_data_root(b"dockerd\0-H\0fd://\0"), None);
        assert_eq!(docker_data_root(b"dockerd\0--data-root\0"), None);
    }

    #[test]
    fn conmon_says_podmans_and_cri_os_names() {
        // As podman starts it (libpod/oci_conmon_linux.go).
        let podman = b"/usr/bin/conmon\0--api-version\x001\0-c\0abc123\0-u\0abc123\0-r\0/usr/bin/crun\0-n\0web\0--exit-dir\0/run/libpod/exits\0";
        assert_eq!(
            conmon_name(podman),
            Some(("abc123".to_owned(), "web".to_owned()))
        );
        assert_eq!(
            conmon_name(b"conmon\0--cid=abc\0--name=db\0"),
            Some(("abc".to_owned(), "db".to_owned()))
        );
        assert_eq!(conmon_name(b"conmon\0-c\0abc\0"), None);
        // CRI-O's container names are the kubelet's.
        assert_eq!(
            kubelet_names("k8s_web_shop-7c9f_prod_5c3b2a1d-0e9f-4a8b-9c7d-6e5f4a3b2c1d_0"),
            Names {
                name: Some("web".into()),
                pod: Some(Pod {
                    namespace: "prod".into(),
                    name: "shop-7c9f".into()
                })
            }
        );
        assert_eq!(
            kubelet_names("plain"),
            Names {
                name: Some("plain".into()),
                pod: None
            }
        );
    }

    #[test]
    fn json_strings_are_unescaped_and_other_values_skipped() {
        assert_eq!(
            json_string(r#"{"a":1,"b":{"a":"x\u00e9\n"}}"#, "a").as_deref(),
            Some("xé\n")
        );
        assert_eq!(json_string(r#"{"a":"unterminated"#, "a"), None);
        assert_eq!(json_string(r#"{"a""#, "a"), None);
    }
}
