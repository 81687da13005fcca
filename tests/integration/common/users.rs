//! Real local users a test makes for itself (useradd), deleted with
//! their processes afterwards, and what they run.

use std::path::Path;
use std::process::{Command, Output, Stdio};

use super::mount::Mount;
use super::peer::Peer;

/// An unprivileged user made for one test, deleted afterwards.
pub struct TestUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

impl TestUser {
    pub fn new(tag: &str) -> TestUser {
        // Unique within the run too: two tests of one helper (one tag) run
        // side by side.
        static MADE: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let made = MADE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("nsfs{tag}{}x{made}", std::process::id() % 100_000);
        let _ = Command::new("userdel").arg(&name).output();
        let status = Command::new("useradd")
            .args([
                "--system",
                "--no-create-home",
                "--user-group",
                "--shell",
                "/usr/sbin/nologin",
            ])
            .arg(&name)
            .status()
            .unwrap();
        assert!(status.success(), "useradd {name}");
        let id = |flag: &str| -> u32 {
            let output = Command::new("id").arg(flag).arg(&name).output().unwrap();
            String::from_utf8(output.stdout)
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        };
        let (uid, gid) = (id("-u"), id("-g"));
        TestUser { name, uid, gid }
    }

    /// Runs a command as this user.
    pub fn run(&self, program: &[&str]) -> Output {
        self.command(program).output().unwrap()
    }

    pub fn command(&self, program: &[&str]) -> Command {
        let mut command = Command::new("setpriv");
        command
            .arg(format!("--reuid={}", self.uid))
            .arg(format!("--regid={}", self.gid))
            .arg("--clear-groups")
            .args(program);
        command
    }

    pub fn mount(&self, binary: &Path, args: &[&str]) -> Mount {
        Mount::start_as(self.uid, self.gid, binary, args)
    }

    pub fn peer(&self) -> Peer {
        Peer::spawn_as(self.uid, self.gid)
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        // Its processes first (peers are killed by their own guards).
        let _ = Command::new("pkill")
            .args(["-KILL", "-u", &self.name])
            .status();
        let _ = Command::new("userdel").arg(&self.name).output();
    }
}

/// `user`'s `cat` of a stream file, and a thread that returns what it
/// read once the stream ends.
pub fn user_reads(
    user: &TestUser,
    path: &Path,
) -> (std::process::Child, std::thread::JoinHandle<Vec<u8>>) {
    let mut reader = user
        .command(&["sh", "-c", "exec cat \"$0\"", path.to_str().unwrap()])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = reader.stdout.take().unwrap();
    let bytes = std::thread::spawn(move || {
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut out, &mut bytes).unwrap();
        bytes
    });
    (reader, bytes)
}
