//! A netstat-like table from a netstatfs mount, the way a user's script
//! would make one: walk the directories, parse the file names, read the
//! extended attributes.
//!
//! ```text
//! cargo run --example netstat -- m
//! Proto  Local Address                 Foreign Address               State        Recv-Q  Send-Q    RTT(ms)  Retrans  PID/Program          Container
//! tcp    127.0.0.1:8080                0.0.0.0:0                     LISTEN            0       0      0.000        0  1290/python3         -
//! tcp    10.0.0.5:443                  10.0.0.9:51234                ESTABLISHED       0       0     12.481        3  2211/nginx           docker 3f2a0e57c1d9
//! ```

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use netstatfs::names::{SocketFileName, parse_process_dir_name};

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
    let mount = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| "m".into());
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
        // The container, as `docker ps` shortens its id ("-" on the host).
        let container = match xattr(&process.path(), "user.netstatfs.container.runtime") {
            runtime if runtime == "-" => "-".to_owned(),
            runtime => {
                let id = xattr(&process.path(), "user.netstatfs.container.id");
                let short: String = id.chars().take(12).collect();
                format!("{runtime} {short}")
            }
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
            rows.push((
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
        "{:<6} {:<29} {:<29} {:<12} {:>6}  {:>6}  {:>9}  {:>7}  {:<20} Container",
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
    for (proto, local, remote, state, rx, tx, rtt, retrans, program, container) in rows {
        println!(
            "{proto:<6} {local:<29} {remote:<29} {state:<12} {rx:>6}  {tx:>6}  {rtt:>9}  {retrans:>7}  {program:<20} {container}"
        );
    }
    ExitCode::SUCCESS
}
