//! A real Docker engine of the test's own: Debian's dockerd with its own
//! data root, exec root, socket and containerd namespace, the cgroupfs
//! driver, no iptables changes, and an internal bridge network with a name
//! and subnet of its own (no route out: containers reach only each other).
//! The image is busybox-static's binary imported as a root file system
//! (no registry is reachable). Everything is removed on drop: containers,
//! network, engine, and the mounts it left.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::ScratchDir;

/// Debian's docker client (not another one on PATH: its API must be the
/// engine's).
const DOCKER: &str = "/usr/bin/docker";
const DOCKERD: &str = "/usr/sbin/dockerd";
const BUSYBOX: &str = "/bin/busybox";
pub const IMAGE: &str = "netstatfs-test-busybox:1";

pub struct Dockerd {
    child: Option<Child>,
    scratch: ScratchDir,
    socket: PathBuf,
    pub network: String,
    pub bridge: String,
}

impl Dockerd {
    /// Starts the engine and imports the image, or says why docker cannot
    /// run here at all.
    pub fn start() -> Result<Dockerd, String> {
        for needed in [DOCKER, DOCKERD, BUSYBOX] {
            if !Path::new(needed).exists() {
                return Err(format!(
                    "{needed} is missing (scripts/setup.sh test installs docker.io and busybox-static)"
                ));
            }
        }
        let scratch = ScratchDir::new("docker");
        let socket = scratch.0.join("docker.sock");
        let tag = std::process::id() % 10_000;
        let log = std::fs::File::create(scratch.0.join("dockerd.log")).unwrap();
        let child = Command::new(DOCKERD)
            .arg("--data-root")
            .arg(scratch.0.join("root"))
            .arg("--exec-root")
            .arg(scratch.0.join("exec"))
            .arg("--pidfile")
            .arg(scratch.0.join("dockerd.pid"))
            .arg("--host")
            .arg(format!("unix://{}", socket.display()))
            .args([
                "--iptables=false",
                "--ip6tables=false",
                "--ip-masq=false",
                "--bridge=none",
                "--storage-driver=vfs",
                "--exec-opt",
                "native.cgroupdriver=cgroupfs",
                "--containerd-namespace",
                &format!("netstatfs-test-{tag}"),
                "--containerd-plugins-namespace",
                &format!("netstatfs-test-plugins-{tag}"),
            ])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|err| format!("dockerd cannot start: {err}"))?;
        let mut dockerd = Dockerd {
            child: Some(child),
            scratch,
            socket,
            network: format!("netstatfs-{tag}"),
            bridge: format!("nsfs{tag}"),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while dockerd.try_docker(&["version"]).is_err() {
            if let Some(status) = dockerd
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                return Err(format!(
                    "dockerd exited ({status}): {}",
                    dockerd
                        .log()
                        .lines()
                        .rev()
                        .take(5)
                        .collect::<Vec<_>>()
                        .join(" | ")
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "dockerd did not answer within 60 s: {}",
                    dockerd.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        dockerd.import_busybox();
        let subnet = format!("10.{}.{}.0/24", 200 + tag % 50, tag % 250);
        dockerd.docker(&[
            "network",
            "create",
            "--internal",
            "--subnet",
            &subnet,
            "-o",
            &format!("com.docker.network.bridge.name={}", dockerd.bridge),
            &dockerd.network.clone(),
        ]);
        Ok(dockerd)
    }

    /// The engine's data root (where its containers' names are).
    pub fn data_root(&self) -> PathBuf {
        self.scratch.0.join("root")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.scratch.0.join("dockerd.log")).unwrap_or_default()
    }

    /// Runs a docker command; its output, or why it failed.
    pub fn try_docker(&self, args: &[&str]) -> Result<String, String> {
        let output = Command::new(DOCKER)
            .arg("--host")
            .arg(format!("unix://{}", self.socket.display()))
            .args(args)
            .output()
            .map_err(|err| err.to_string())?;
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
        } else {
            Err(String::from_utf8_lossy(&output.stderr).trim().to_owned())
        }
    }

    /// A container's output, stdout and stderr together.
    pub fn logs(&self, name: &str) -> String {
        let output = Command::new(DOCKER)
            .arg("--host")
            .arg(format!("unix://{}", self.socket.display()))
            .args(["logs", name])
            .output()
            .map(|output| {
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&output.stdout),
                    String::from_utf8_lossy(&output.stderr)
                )
            });
        output.unwrap_or_else(|err| err.to_string())
    }

    pub fn docker(&self, args: &[&str]) -> String {
        self.try_docker(args)
            .unwrap_or_else(|err| panic!("docker {args:?} failed: {err}\n{}", self.log()))
    }

    /// `docker run -d --name NAME` of the busybox image on the test's
    /// network, running `command` with sh.
    pub fn run(&self, name: &str, command: &str) -> String {
        self.docker(&[
            "run",
            "-d",
            "--name",
            name,
            "--network",
            &self.network,
            IMAGE,
            "/bin/sh",
            "-c",
            command,
        ])
    }

    /// The container's first process, as the host sees it.
    pub fn pid_of(&self, name: &str) -> u32 {
        self.docker(&["inspect", "-f", "{{.State.Pid}}", name])
            .parse()
            .unwrap()
    }

    pub fn id_of(&self, name: &str) -> String {
        self.docker(&["inspect", "-f", "{{.Id}}", name])
    }

    pub fn ip_of(&self, name: &str) -> String {
        self.docker(&[
            "inspect",
            "-f",
            &format!(
                "{{{{(index .NetworkSettings.Networks \"{}\").IPAddress}}}}",
                self.network
            ),
            name,
        ])
    }

    /// Imports `root` (a directory) as image `name`, running `entrypoint`
    /// with the arguments `docker run` gives, if set.
    pub fn import(&self, root: &Path, name: &str, entrypoint: Option<&str>) {
        let tar = root.with_extension("tar");
        let status = Command::new("tar")
            .arg("-C")
            .arg(root)
            .arg("-cf")
            .arg(&tar)
            .arg(".")
            .status()
            .unwrap();
        assert!(status.success(), "tar failed");
        let change = entrypoint.map(|entrypoint| format!("ENTRYPOINT [\"{entrypoint}\"]"));
        let mut args = vec!["import"];
        if let Some(change) = &change {
            args.extend(["--change", change]);
        }
        args.extend([tar.to_str().unwrap(), name]);
        self.docker(&args);
    }

    /// A root file system of busybox and its applets' links, imported.
    fn import_busybox(&self) {
        let root = self.scratch.0.join("busybox-root");
        for dir in ["bin", "www", "tmp", "etc"] {
            std::fs::create_dir_all(root.join(dir)).unwrap();
        }
        std::fs::copy(BUSYBOX, root.join("bin/busybox")).unwrap();
        for applet in [
            "sh", "httpd", "wget", "nc", "sleep", "echo", "cat", "seq", "true",
        ] {
            std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
        }
        std::fs::write(root.join("www/index.html"), "hello from web\n").unwrap();
        self.import(&root, IMAGE, None);
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        if let Ok(ids) = self.try_docker(&["ps", "-aq"]) {
            for id in ids.split_whitespace() {
                let _ = self.try_docker(&["rm", "-f", id]);
            }
        }
        let _ = self.try_docker(&["network", "rm", &self.network.clone()]);
        if let Some(mut child) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(20);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        // The engine's own containerd, started under the exec root, ends
        // with it; what it mounted under the scratch directory is undone.
        let scratch = self.scratch.0.to_string_lossy().into_owned();
        if let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") {
            let mut mounts: Vec<&str> = mountinfo
                .lines()
                .filter_map(|line| line.split(' ').nth(4))
                .filter(|target| target.starts_with(scratch.as_str()))
                .collect();
            mounts.sort_by_key(|target| std::cmp::Reverse(target.len()));
            for target in mounts {
                let _ = nix::mount::umount2(target, nix::mount::MntFlags::MNT_DETACH);
            }
        }
        // The bridge goes with the network; make sure.
        let _ = Command::new("ip")
            .args(["link", "delete", &self.bridge])
            .stderr(Stdio::null())
            .status();
    }
}
