//! What /proc says of one process beyond the snapshot, read when asked (a
//! `getxattr` on its directory): its program, command line, user, cgroup
//! and the container the cgroup names. Fresh at each ask; absent where
//! /proc does not tell (a kernel thread has no program, a process that
//! exited has nothing).

use super::container::{Container, container_of};

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ProcessDetails {
    /// The program's path (`/proc/<pid>/exe`).
    pub exe: Option<String>,
    /// The arguments, joined by spaces.
    pub cmdline: Option<String>,
    /// The name of the user the directory is owned by.
    pub user: Option<String>,
    /// The cgroup v2 path (or the first v1 hierarchy's, on a v1-only host).
    pub cgroup: Option<String>,
    pub container: Option<Container>,
}

impl ProcessDetails {
    /// Reads the details of process `pid`, whose directory is `uid`'s.
    pub fn read(pid: i32, uid: u32) -> ProcessDetails {
        let proc_pid = format!("/proc/{pid}");
        let cgroup_text = std::fs::read_to_string(format!("{proc_pid}/cgroup")).ok();
        ProcessDetails {
            exe: std::fs::read_link(format!("{proc_pid}/exe"))
                .ok()
                .map(|path| path.to_string_lossy().into_owned()),
            cmdline: std::fs::read(format!("{proc_pid}/cmdline"))
                .ok()
                .and_then(|bytes| cmdline_text(&bytes)),
            user: nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
                .ok()
                .flatten()
                .map(|user| user.name),
            cgroup: cgroup_text.as_deref().and_then(cgroup_path),
            container: cgroup_text.as_deref().and_then(container_of),
        }
    }
}

/// `/proc/<pid>/cmdline` (NUL-separated arguments) as one line; None for
/// a process without arguments (a kernel thread, a zombie).
pub fn cmdline_text(bytes: &[u8]) -> Option<String> {
    let arguments: Vec<String> = bytes
        .split(|&b| b == 0)
        .filter(|argument| !argument.is_empty())
        .map(|argument| String::from_utf8_lossy(argument).into_owned())
        .collect();
    (!arguments.is_empty()).then(|| arguments.join(" "))
}

/// The cgroup path of `/proc/<pid>/cgroup`: the v2 line's (`0::path`), else
/// the first line's.
pub fn cgroup_path(text: &str) -> Option<String> {
    let paths: Vec<(&str, &str)> = text
        .lines()
        .filter_map(|line| {
            let mut fields = line.splitn(3, ':');
            let hierarchy = fields.next()?;
            let _controllers = fields.next()?;
            Some((hierarchy, fields.next()?))
        })
        .collect();
    paths
        .iter()
        .find(|(hierarchy, _)| *hierarchy == "0")
        .or(paths.first())
        .map(|(_, path)| (*path).to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_line_reads_as_one_line() {
        assert_eq!(
            cmdline_text(b"nginx: worker process\0\0").as_deref(),
            Some("nginx: worker process")
        );
        assert_eq!(
            cmdline_text(b"python3\0-m\0http.server\0").as_deref(),
            Some("python3 -m http.server")
        );
        assert_eq!(cmdline_text(b""), None);
    }

    #[test]
    fn the_cgroup_is_the_v2_path_where_there_is_one() {
        let mixed = "12:memory:/docker/abc\n0::/system.slice/nginx.service\n";
        assert_eq!(
            cgroup_path(mixed).as_deref(),
            Some("/system.slice/nginx.service")
        );
        assert_eq!(cgroup_path("4:cpu:/lxc/db2\n").as_deref(), Some("/lxc/db2"));
        assert_eq!(cgroup_path("garbage"), None);
    }
}
