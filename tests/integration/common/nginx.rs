//! A real nginx on loopback, prefork (a master and two workers sharing one
//! listener), logging which worker served which client port. Stopped and
//! its files removed on drop.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{ScratchDir, wait_for};

pub struct Nginx {
    pub port: u16,
    pub master: u32,
    pub workers: Vec<u32>,
    scratch: ScratchDir,
    child: Child,
}

impl Nginx {
    pub fn start(workers: usize) -> Nginx {
        let scratch = ScratchDir::new("nginx");
        let dir = scratch.0.display().to_string();
        let port = free_port();
        let config = format!(
            "worker_processes {workers};
daemon off;
master_process on;
pid {dir}/nginx.pid;
error_log {dir}/error.log;
events {{ worker_connections 1024; }}
http {{
    log_format who '$pid $remote_port';
    access_log {dir}/access.log who;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    server {{
        listen 127.0.0.1:{port};
        location / {{ return 200 \"hello\\n\"; }}
    }}
}}
"
        );
        let conf = scratch.0.join("nginx.conf");
        std::fs::write(&conf, config).unwrap();
        let child = Command::new("nginx")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nginx starts (apt-get install nginx-light)");
        let master = child.id();
        let pids = wait_for(Duration::from_secs(10), "nginx's workers", || {
            let children: Vec<u32> =
                std::fs::read_to_string(format!("/proc/{master}/task/{master}/children"))
                    .ok()?
                    .split_whitespace()
                    .filter_map(|pid| pid.parse().ok())
                    .collect();
            (children.len() == workers).then_some(children)
        });
        wait_for(Duration::from_secs(10), "nginx to listen", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok()
        });
        Nginx {
            port,
            master,
            workers: pids,
            scratch,
            child,
        }
    }

    /// The client port of each request each worker served, from the
    /// access log (a port may come twice: ports are reused).
    pub fn served(&self) -> HashMap<u32, Vec<u16>> {
        let log = std::fs::read_to_string(self.scratch.0.join("access.log")).unwrap_or_default();
        let mut served: HashMap<u32, Vec<u16>> = HashMap::new();
        for line in log.lines() {
            let mut words = line.split_whitespace();
            if let (Some(Ok(pid)), Some(Ok(port))) = (
                words.next().map(str::parse::<u32>),
                words.next().map(str::parse::<u16>),
            ) {
                served.entry(pid).or_default().push(port);
            }
        }
        served
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGQUIT would wait for connections; SIGTERM is a fast stop.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.master as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

/// A loopback TCP port that nothing listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
