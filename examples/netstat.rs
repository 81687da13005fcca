//! A netstat-like table from a netstatfs mount, the way a user's script
//! would make one: walk the directories, parse the file names, read the
//! extended attributes.
//!
//! ```text
//! cargo run --example netstat -- m
//! ```
//!
//! Sockets of other network namespaces (containers, `ip netns`) are listed
//! with their namespace's inode in the Netns column; the host's (this
//! program's own namespace) with `-`.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;
use netstatfs::names::{SocketFileName, parse_process_dir_name};

/// Print a netstat-like table of every socket in a netstatfs mount.
#[derive(Parser)]
#[command(name = "netstat")]
struct Args {
    /// The netstatfs mount point.
    #[arg(value_name = "MOUNTPOINT", default_value = "m")]
    mount: PathBuf,
}

/// The inode of this program's own network namespace: the host's, as the
/// table calls it.
fn own_netns() -> Option<String> {
    let link = std::fs::read_link("/proc/self/ns/net").ok()?;
    // "net:[4026531833]"
    let text = link.to_string_lossy().into_owned();
    text.strip_prefix("net:[")?
        .strip_suffix(']')
        .map(str::to_owned)
}

/// One extended attribute as text, or "-" where it cannot be read (the
/// socket closed meanwhile, say).
fn xattr(path: &Path, name: &str) -> String {
    let (Ok(path), Ok(name)) = (
        CString::new(path.as_os_str().as_bytes()),
        CString::new(name),
    ) else {
        return "-".into();
    };
    let mut buffer = vec![0u8; 256];
    // SAFETY: valid C strings and a buffer of the length passed.
    let length = unsafe {
        nix::libc::getxattr(
            path.as_ptr(),
            name.as_ptr(),
            buffer.as_mut_ptr().cast(),
            buffer.len(),
        )
    };
    match usize::try_from(length) {
        Ok(length) => String::from_utf8_lossy(&buffer[..length]).into_owned(),
        Err(_) => "-".into(),
    }
}

fn main() -> ExitCode {
    let mount = Args::parse().mount;
    let host = own_netns();
    let processes = match std::fs::read_dir(&mount) {
        Ok(entries) => entries,
        Err(err) => {
            eprintln!("netstat: cannot list {}: {err}", mount.display());
            return ExitCode::FAILURE;
        }
    };
    let mut rows = Vec::new();
    for process in processes.flatten() {
        let dir_name = process.file_name();
        let Some((pid, comm)) = dir_name.to_str().and_then(parse_process_dir_name) else {
            continue;
        };
        // The container by its runtime's name for it, else as `docker ps`
        // shortens its id ("-" on the host).
        let container = match xattr(&process.path(), "user.netstatfs.container.runtime") {
            runtime if runtime == "-" => "-".to_owned(),
            runtime => match xattr(&process.path(), "user.netstatfs.container.name") {
                name if name != "-" => format!("{runtime} {name}"),
                _ => {
                    let id = xattr(&process.path(), "user.netstatfs.container.id");
                    let short: String = id.chars().take(12).collect();
                    format!("{runtime} {short}")
                }
            },
        };
        // Processes and sockets come and go while we walk: skip what vanished.
        let Ok(sockets) = std::fs::read_dir(process.path()) else {
            continue;
        };
        for socket in sockets.flatten() {
            let Some(name) = socket
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<SocketFileName>().ok())
            else {
                continue;
            };
            let path = socket.path();
            let netns = match xattr(&path, "user.netstatfs.netns") {
                netns if Some(&netns) == host.as_ref() => "-".to_owned(),
                netns => netns,
            };
            rows.push((
                netns,
                name.proto.to_string(),
                name.local.to_string(),
                name.remote.to_string(),
                xattr(&path, "user.netstatfs.state"),
                xattr(&path, "user.netstatfs.rx_queue"),
                xattr(&path, "user.netstatfs.tx_queue"),
                xattr(&path, "user.netstatfs.tcp.rtt"),
                xattr(&path, "user.netstatfs.tcp.total_retrans"),
                format!("{pid}/{comm}"),
                container.clone(),
            ));
        }
    }
    rows.sort();
    println!(
        "{:<10} {:<6} {:<29} {:<29} {:<12} {:>6}  {:>6}  {:>9}  {:>7}  {:<20} Container",
        "Netns",
        "Proto",
        "Local Address",
        "Foreign Address",
        "State",
        "Recv-Q",
        "Send-Q",
        "RTT(ms)",
        "Retrans",
        "PID/Program"
    );
    for (netns, proto, local, remote, state, rx, tx, rtt, retrans, program, container) in rows {
        println!(
            "{netns:<10} {proto:<6} {local:<29} {remote:<29} {state:<12} {rx:>6}  {tx:>6}  {rtt:>9}  {retrans:>7}  {program:<20} {container}"
        );
    }
    ExitCode::SUCCESS
}
