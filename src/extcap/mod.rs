//! `netstatfs-extcap`: netstatfs as a Wireshark capture source (extcap(4)).
//!
//! Wireshark and tshark run every program in their extcap folders: with
//! `--extcap-interfaces` at start (so that answer touches nothing but its
//! own text), then `--extcap-config` for each interface (processes and
//! streams, read from the mount), `--extcap-dlts`, and `--capture --fifo
//! PATH` once a capture starts, stopping it with SIGTERM.
//!
//! The extcap is a reader of the mount like `cat`: it opens
//! `<mount>/<pid>_<comm>/<stream>` with the caller's own rights (so EACCES
//! on another user's stream, as for `cat`), copies it to the FIFO record
//! by record, and drops the records the capture filter rejects. It needs
//! no privilege of its own and is installed without capabilities.
//!
//! This module owns the command line and what each mode reads;
//! [`protocol`] (the text Wireshark parses), [`mounts`] (mountinfo) and
//! [`records`] (whole records out of a byte stream) are pure; [`copy`]
//! moves the bytes.

pub mod copy;
pub mod mounts;
pub mod protocol;
pub mod records;

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;

use protocol::{Argument, ConfigView, ProcessChoice, Stream};

/// Wireshark runs the extcap modes while its window or tshark waits: a
/// mount that does not answer (a stopped daemon) must not hang them.
const MOUNT_DEADLINE: Duration = Duration::from_secs(3);

/// LINUX_SLL: what a capture on the default `any` device gives, and what a
/// daemon too old to say gives.
const DEFAULT_LINKTYPE: u32 = 113;

/// The root directory's attribute saying the streams' link type.
pub const LINKTYPE_ATTRIBUTE: &str = "user.netstatfs.linktype";

/// The arguments Wireshark passes (extcap(4)), and ours, which Wireshark
/// passes back from the configuration (`tshark -o extcap.netstatfs.pid:N`).
#[derive(Debug, Parser)]
#[command(
    name = "netstatfs-extcap",
    version,
    about = "Wireshark's capture source for netstatfs: pick a process or a socket, see its traffic",
    long_about = "Wireshark's capture source for netstatfs (extcap). Put it in Wireshark's \
                  extcap folder (`tshark -G folders` says where) and mount netstatfs; \
                  Wireshark lists the interface \"netstatfs\". From the command line: \
                  tshark -i netstatfs -o extcap.netstatfs.pid:PID -o extcap.netstatfs.stream:all"
)]
pub struct ExtcapArgs {
    /// List the interfaces (Wireshark asks at start).
    #[arg(long)]
    pub extcap_interfaces: bool,
    /// Wireshark's version, given with --extcap-interfaces.
    #[arg(long, value_name = "X.Y")]
    pub extcap_version: Option<String>,
    /// The interface asked about: netstatfs.
    #[arg(long, value_name = "NAME")]
    pub extcap_interface: Option<String>,
    /// List the interface's link types.
    #[arg(long)]
    pub extcap_dlts: bool,
    /// Print the interface's options.
    #[arg(long)]
    pub extcap_config: bool,
    /// With --extcap-config: print only this option's values (pid, stream).
    #[arg(long, value_name = "OPTION")]
    pub extcap_reload_option: Option<String>,
    /// Copy the chosen stream to --fifo until SIGTERM or the stream's end.
    #[arg(long)]
    pub capture: bool,
    /// Where --capture writes.
    #[arg(long, value_name = "PATH")]
    pub fifo: Option<PathBuf>,
    /// A libpcap capture filter; alone, checks it (no output if valid).
    #[arg(long, value_name = "FILTER")]
    pub extcap_capture_filter: Option<String>,
    /// Wireshark's toolbar pipes: netstatfs has no toolbar.
    #[arg(long, value_name = "PATH", hide = true)]
    pub extcap_control_in: Option<PathBuf>,
    #[arg(long, value_name = "PATH", hide = true)]
    pub extcap_control_out: Option<PathBuf>,
    /// Wireshark's debug switches, accepted and ignored.
    #[arg(long, hide = true)]
    pub debug: bool,
    #[arg(long, value_name = "PATH", hide = true)]
    pub debug_file: Option<PathBuf>,
    /// The process to capture: its pid (or its directory's name).
    #[arg(long, value_name = "PID")]
    pub pid: Option<String>,
    /// all, tree, or one of the process's socket files.
    #[arg(long, value_name = "NAME")]
    pub stream: Option<String>,
    /// The netstatfs mount (default: the first in /proc/self/mountinfo
    /// that the user can read).
    #[arg(long, value_name = "DIR")]
    pub mount: Option<PathBuf>,
}

/// What the user is told, on stderr, before a non-zero exit: Wireshark
/// shows it in a dialog.
#[derive(Debug)]
pub struct Failure(pub String);

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Runs one invocation; what it prints for Wireshark goes to `out`.
pub fn run(args: &ExtcapArgs, out: &mut dyn std::io::Write) -> Result<(), Failure> {
    let mut print = |text: &str| {
        out.write_all(text.as_bytes())
            .and_then(|()| out.flush())
            .map_err(|err| Failure(format!("cannot write to standard output: {err}")))
    };
    if args.extcap_interfaces {
        return print(&protocol::interfaces(env!("CARGO_PKG_VERSION")));
    }
    if let Some(interface) = args.extcap_interface.as_deref()
        && interface != protocol::INTERFACE
    {
        return Err(Failure(format!(
            "unknown interface {interface:?}: netstatfs-extcap serves only {:?}",
            protocol::INTERFACE
        )));
    }
    if args.extcap_dlts {
        let linktype = streams_linktype(args);
        let (name, description) = linktype_names(linktype);
        return print(&protocol::dlts(linktype, &name, &description));
    }
    if args.extcap_config {
        let view = config_view(args);
        return match args.extcap_reload_option.as_deref() {
            None => print(&protocol::config(&view)),
            Some(name) => match Argument::from_name(name.trim_start_matches('-')) {
                Some(argument) => print(&protocol::reload(argument, &view)),
                None => Err(Failure(format!("no option {name:?} to reload"))),
            },
        };
    }
    if args.capture {
        let captured = capture(args);
        if captured.is_err()
            && let Some(fifo) = &args.fifo
        {
            copy::release_reader(fifo);
        }
        return captured;
    }
    if let Some(filter) = &args.extcap_capture_filter {
        // Wireshark's filter check: nothing for a valid filter, libpcap's
        // message otherwise, and exit 0 either way (Wireshark ignores the
        // output of a program that fails).
        let linktype = streams_linktype(args);
        return match copy::compile(filter, linktype) {
            Ok(_) => Ok(()),
            Err(message) => print(&format!("{message}\n")),
        };
    }
    Err(Failure(
        "nothing to do: this is Wireshark's capture source for netstatfs \
         (see netstatfs-extcap --help)"
            .into(),
    ))
}

fn capture(args: &ExtcapArgs) -> Result<(), Failure> {
    let fifo = args
        .fifo
        .as_deref()
        .ok_or_else(|| Failure("--capture needs --fifo PATH".into()))?;
    let mount = mount_point(args)?;
    let pid = args
        .pid
        .as_deref()
        .filter(|pid| !pid.is_empty())
        .ok_or_else(|| {
            Failure(
                "no process chosen: pick one in the interface's options \
             (or tshark -o extcap.netstatfs.pid:PID)"
                    .into(),
            )
        })?;
    let directory = {
        let (mount, pid) = (mount.clone(), pid.to_owned());
        with_deadline(move || process_directory(&mount, &pid))?
    };
    let stream = args
        .stream
        .as_deref()
        .filter(|stream| !stream.is_empty())
        .unwrap_or("all");
    if stream.contains('/') || stream == ".." || stream == "." {
        return Err(Failure(format!("{stream:?} is not a stream name")));
    }
    copy::run(&copy::Job {
        stream: directory.join(stream),
        fifo: fifo.to_owned(),
        filter: args
            .extcap_capture_filter
            .clone()
            .filter(|f| !f.trim().is_empty()),
        linktype: mount_linktype(&mount),
    })
}

/// `--mount` if given, else the first netstatfs mount this user can read;
/// where there is none, which were found and why each was skipped.
fn mount_point(args: &ExtcapArgs) -> Result<PathBuf, Failure> {
    if let Some(mount) = args.mount.as_ref().filter(|m| !m.as_os_str().is_empty()) {
        return Ok(mount.clone());
    }
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|err| Failure(format!("cannot read /proc/self/mountinfo: {err}")))?;
    let uid = rustix::process::geteuid().as_raw();
    let mut skipped = Vec::new();
    for mount in mounts::netstatfs_mounts(&mountinfo) {
        let why_not = match mount.closed_to(uid) {
            Some(closed) => Some(closed),
            None => {
                let path = PathBuf::from(&mount.path);
                match with_deadline(move || Ok(std::fs::read_dir(&path).map(drop))) {
                    Ok(Ok(())) => None,
                    // The kernel refuses everyone but the mounting user
                    // when a FUSE mount has no allow_other.
                    Ok(Err(err)) => Some(match (err.kind(), mount.owner) {
                        (std::io::ErrorKind::PermissionDenied, Some(owner)) if owner != uid => {
                            mounts::private_to(owner)
                        }
                        _ => err.to_string(),
                    }),
                    Err(Failure(unanswered)) => Some(unanswered),
                }
            }
        };
        match why_not {
            None => return Ok(PathBuf::from(mount.path)),
            Some(why) => skipped.push(format!("{}: {why}", mount.path)),
        }
    }
    Err(Failure(if skipped.is_empty() {
        "no netstatfs mount: mount one first (as root: `netstatfs /run/netstatfs \
         --allow-other`, or `systemctl start netstatfs` with the package), \
         or give its directory in the interface's options"
            .to_owned()
    } else {
        format!(
            "no netstatfs mount uid {uid} can read; found {}. Mount one with --allow-other \
             (or your own: netstatfs ~/m), or give its directory in the interface's options",
            skipped.join("; ")
        )
    }))
}

/// The streams' link type, as the mount says it in time; LINUX_SLL if
/// there is no mount to ask.
fn streams_linktype(args: &ExtcapArgs) -> u32 {
    let Ok(mount) = mount_point(args) else {
        return DEFAULT_LINKTYPE;
    };
    with_deadline(move || Ok(mount_linktype(&mount))).unwrap_or(DEFAULT_LINKTYPE)
}

/// What the mount's root says of its streams' link type.
fn mount_linktype(mount: &Path) -> u32 {
    let mut value = [0u8; 16];
    rustix::fs::getxattr(mount, LINKTYPE_ATTRIBUTE, &mut value)
        .ok()
        .and_then(|length| std::str::from_utf8(&value[..length]).ok()?.parse().ok())
        .unwrap_or(DEFAULT_LINKTYPE)
}

/// libpcap's name and description of a link type.
fn linktype_names(linktype: u32) -> (String, String) {
    let linktype = pcap::Linktype(linktype as i32);
    let name = linktype
        .get_name()
        .unwrap_or_else(|_| format!("DLT_{}", linktype.0));
    let description = linktype.get_description().unwrap_or_else(|_| name.clone());
    (name, description)
}

/// The mount's directory of process `pid` (`1234` or `1234_nginx`).
fn process_directory(mount: &Path, pid: &str) -> Result<PathBuf, Failure> {
    let wanted: i32 = pid
        .split('_')
        .next()
        .and_then(|pid| pid.parse().ok())
        .filter(|pid| *pid > 0)
        .ok_or_else(|| Failure(format!("{pid:?} is not a process id")))?;
    let found = processes(mount)?
        .into_iter()
        .find(|(pid, _)| *pid == wanted)
        .map(|(_, name)| mount.join(name));
    found.ok_or_else(|| {
        Failure(format!(
            "process {wanted} is not in {}: it has exited, or holds no inet socket \
             (a mount with --all-processes lists every process)",
            mount.display()
        ))
    })
}

/// The mount's process directories as (pid, directory name), by pid.
fn processes(mount: &Path) -> Result<Vec<(i32, String)>, Failure> {
    let entries = std::fs::read_dir(mount)
        .map_err(|err| Failure(format!("cannot list {}: {err}", mount.display())))?;
    let mut found: Vec<(i32, String)> = entries
        .filter_map(|entry| {
            let name = entry.ok()?.file_name().into_string().ok()?;
            let pid = name.split_once('_')?.0.parse().ok()?;
            Some((pid, name))
        })
        .collect();
    found.sort();
    Ok(found)
}

/// The processes and the chosen one's streams, as far as they can be read
/// in time: a configuration with empty lists is still a configuration.
fn config_view(args: &ExtcapArgs) -> ConfigView {
    let (mount, notice) = match mount_point(args) {
        Ok(mount) => (Some(mount), None),
        Err(Failure(why)) => (None, Some(why)),
    };
    let chosen_pid = args
        .pid
        .as_deref()
        .and_then(|pid| pid.split('_').next()?.parse().ok());
    let mut view = ConfigView {
        chosen_pid,
        chosen_stream: args.stream.clone(),
        mount: mount.as_ref().map(|m| m.display().to_string()),
        streams: vec![Stream::named("all"), Stream::named("tree")],
        notice,
        ..ConfigView::default()
    };
    let Some(mount) = mount else {
        return view;
    };
    let listed = with_deadline(move || {
        // The container's label as the mount names it (the daemon knows
        // where the runtimes keep their names), read in time too.
        let processes: Vec<(i32, String, Option<String>)> = processes(&mount)?
            .into_iter()
            .map(|(pid, name)| {
                let label = container_label(&mount.join(&name));
                (pid, name, label)
            })
            .collect();
        let streams = match chosen_pid {
            Some(pid) => streams_of(&process_directory(&mount, &pid.to_string())?)?,
            None => Vec::new(),
        };
        Ok((processes, streams))
    });
    if let Ok((processes, streams)) = listed {
        view.processes = processes
            .into_iter()
            .map(|(pid, name, container)| ProcessChoice {
                pid,
                comm: name.split_once('_').map_or("", |(_, comm)| comm).to_owned(),
                command: std::fs::read(format!("/proc/{pid}/cmdline"))
                    .ok()
                    .and_then(|cmdline| protocol::short_command(&cmdline)),
                container,
            })
            .collect();
        if !streams.is_empty() {
            view.streams = streams;
        }
    }
    view
}

/// `docker web`: a process directory's container, by the runtime's name
/// for it where the mount has one, else by its short id.
fn container_label(directory: &Path) -> Option<String> {
    let runtime = xattr_text(directory, "user.netstatfs.container.runtime")?;
    let name = xattr_text(directory, "user.netstatfs.container.name").or_else(|| {
        xattr_text(directory, "user.netstatfs.container.id").map(|id| id.chars().take(12).collect())
    })?;
    Some(format!("{runtime} {name}"))
}

/// An extended attribute's value as text, if it is there and readable.
fn xattr_text(path: &Path, name: &str) -> Option<String> {
    let mut value = [0u8; 256];
    let length = rustix::fs::getxattr(path, name, &mut value).ok()?;
    std::str::from_utf8(&value[..length])
        .ok()
        .map(str::to_owned)
}

/// A process directory's streams: `all`, `tree`, then its socket files
/// with their state (not its unix sockets, on a mount with `--unix`: they
/// cannot be read).
fn streams_of(directory: &Path) -> Result<Vec<Stream>, Failure> {
    let entries = std::fs::read_dir(directory)
        .map_err(|err| Failure(format!("cannot list {}: {err}", directory.display())))?;
    let mut names: Vec<String> = entries
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .filter(|name| !name.starts_with(crate::names::UNIX_PREFIX))
        .collect();
    names.sort_by_key(|name| (name != "all", name != "tree", name.clone()));
    Ok(names
        .into_iter()
        .map(|name| {
            let state = xattr_text(&directory.join(&name), "user.netstatfs.state");
            Stream { name, state }
        })
        .collect())
}

/// Runs `work` on a thread and waits for it at most [`MOUNT_DEADLINE`].
/// A thread stuck on a mount that does not answer is left behind: the
/// process exits right after, and its open requests end with it.
fn with_deadline<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, Failure> + Send + 'static,
) -> Result<T, Failure> {
    let (sender, receiver) = crossbeam_channel::bounded(1);
    std::thread::Builder::new()
        .name("extcap-mount".into())
        .spawn(move || {
            let _ = sender.send(work());
        })
        .map_err(|err| Failure(format!("cannot start a thread: {err}")))?;
    receiver.recv_timeout(MOUNT_DEADLINE).unwrap_or_else(|_| {
        Err(Failure(format!(
            "the netstatfs mount did not answer within {} s: is its daemon stopped?",
            MOUNT_DEADLINE.as_secs()
        )))
    })
}
