//! The command line (clap): every option, its default and its help text.

use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgAction, Parser};

const ABOUT: &str = "Mount the machine's network connections as files.";

const LONG_ABOUT: &str = "\
Mount the machine's network connections as files.

Every process that holds an inet socket is a directory, <pid>_<comm>; every
socket it holds is a file, <proto>_<local>_<remote> (tcp, tcp6, udp, udp6,
raw, raw6, icmp, icmp6). getfattr -d shows a socket's state, queues, fds and
namespace. Reading a socket file streams that socket's live traffic as pcap:

    tcpdump -r m/<pid>_<comm>/<socket>
    wireshark -k -i <(cat m/<pid>_<comm>/<socket>)

Started by hand (netstatfs MOUNTPOINT) it runs in the foreground; Ctrl-C,
SIGTERM or an unmount (umount m, fusermount3 -u m) stops it. Started the way
mount(8) starts FUSE file systems (netstatfs SOURCE MOUNTPOINT -o OPTIONS,
from `mount -t fuse.netstatfs netstatfs /mnt/net` or an fstab line), it
returns once the mount is up and serves in the background, until umount;
-f keeps it in the foreground.";

#[derive(Parser, Debug, Clone)]
#[command(name = "netstatfs", version, about = ABOUT, long_about = LONG_ABOUT, args_override_self = true)]
pub struct Cli {
    /// Directory to mount on. mount(8) passes a source first (any word,
    /// such as "netstatfs"), then the mountpoint.
    #[arg(value_name = "MOUNTPOINT", num_args = 1..=2, required_unless_present = "mount")]
    pub mountpoint: Vec<PathBuf>,

    /// Directory to mount on (the original netstatfs's spelling of MOUNTPOINT).
    #[arg(long = "mount", value_name = "DIR", conflicts_with = "mountpoint")]
    pub mount: Option<PathBuf>,

    /// Mount options, comma-separated, as mount(8) passes them:
    /// allow_other, all_processes, cache_ttl=DURATION, interface=NAME,
    /// snaplen=BYTES, buffer=SIZE, kernel_buffer=SIZE, max_delay=DURATION,
    /// format=pcap|pcapng, no_kernel_events, unix, max_streams_per_user=N,
    /// max_streams=N, log=stderr|syslog, syslog_socket=PATH, docker_root=DIR,
    /// containerd_state=DIR (and the generic ones, rw, nosuid, noauto, ..., which change nothing).
    #[arg(short = 'o', value_name = "OPTIONS", action = ArgAction::Append)]
    pub options: Vec<String>,

    /// Stay in the foreground when started with a SOURCE (by mount(8)).
    #[arg(short = 'f', long)]
    pub foreground: bool,

    /// List every process, not only those holding an inet socket.
    #[arg(long)]
    pub all_processes: bool,

    /// List unix sockets too, as `unix_<path>`, `unix_@<abstract name>` or
    /// `unix_<inode>` files with their peer in attributes (they cannot be
    /// read: libpcap does not see them). Off by default: a desktop holds
    /// hundreds.
    #[arg(long)]
    pub unix: bool,

    /// How long one /proc snapshot answers listings and lookups (and how
    /// long the kernel may cache what it said), e.g. 1s, 250ms, 0.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_duration, allow_hyphen_values = true)]
    pub cache_ttl: Duration,

    /// Let every user list the tree, as /proc does. A socket's stream stays
    /// readable only by the socket's owner and root.
    #[arg(long)]
    pub allow_other: bool,

    /// Capture on this interface of the socket's network namespace instead
    /// of all of them.
    #[arg(long, value_name = "NAME", default_value = "any")]
    pub interface: String,

    /// Bytes of each packet to keep.
    #[arg(long, value_name = "BYTES", default_value_t = 262_144, value_parser = clap::value_parser!(u32).range(64..=262_144))]
    pub snaplen: u32,

    /// Bytes a stream queues for a reader that falls behind; beyond it
    /// packets are dropped (and counted in the log), e.g. 4MiB, 512K.
    #[arg(long, value_name = "SIZE", default_value = "4MiB", value_parser = parse_size)]
    pub buffer: usize,

    /// Bytes of the kernel's packet ring per stream once packets come (what
    /// absorbs a burst, or a stalled daemon, before the daemon picks it
    /// up), e.g. 8MiB, 32MiB. Until then a stream holds no ring on the
    /// `any` device (a packet socket's queue) and 1 MiB on another.
    #[arg(long, value_name = "SIZE", default_value = "8MiB", value_parser = parse_size)]
    pub kernel_buffer: usize,

    /// The longest the kernel holds a packet before handing it to a stream
    /// (its block timeout; 8ms by default, for a live view). The ring rides
    /// out a stalled daemon for this times its 256 KiB blocks at a trickle
    /// (256 ms for 8 MiB); a longer delay rides out longer, a shorter one
    /// less (1ms: 32 ms, which a busy small machine overruns; give it a
    /// larger --kernel-buffer).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, allow_hyphen_values = true)]
    pub max_delay: Option<Duration>,

    /// The streams' file format: pcap, or pcapng with a comment on each
    /// packet naming its process and socket.
    #[arg(long, value_enum, default_value_t = StreamFormat::Pcap)]
    pub format: StreamFormat,

    /// Streams a user who is not root may hold open at once; beyond, open
    /// fails with EMFILE. Each costs a kernel ring and a queue.
    #[arg(long, value_name = "N", default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_streams_per_user: u32,

    /// Streams everyone together may hold open at once; beyond, open fails
    /// with ENFILE.
    #[arg(long, value_name = "N", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_streams: u32,

    /// Attribute the flows of `all` and `tree` streams by following /proc
    /// only, without kernel events (tracepoints): for a host where they are
    /// unwanted, or to compare. Flows shorter than about 10 ms are then
    /// mostly missed.
    #[arg(long)]
    pub no_kernel_events: bool,

    /// docker's data root, where its containers' names are
    /// (`<DIR>/containers/<id>/config.v2.json`). By default /var/lib/docker
    /// and any running dockerd's --data-root.
    #[arg(long, value_name = "DIR")]
    pub docker_root: Option<PathBuf>,

    /// containerd's state directory, where Kubernetes' CRI keeps each
    /// container's bundle with its container and pod names.
    #[arg(long, value_name = "DIR", default_value = crate::inventory::runtimes::CONTAINERD_STATE)]
    pub containerd_state: PathBuf,

    /// Where log lines go: stderr, or syslog (/dev/log, ident netstatfs).
    /// By default stderr, and syslog once a daemon started by mount(8)
    /// detaches from the terminal.
    #[arg(long, value_enum, value_name = "WHERE")]
    pub log: Option<crate::logging::LogTo>,

    /// The syslog socket to send log lines to.
    #[arg(long, value_name = "PATH", default_value = crate::logging::DEV_LOG)]
    pub syslog_socket: PathBuf,

    /// More log output (-v debug, -vv trace). RUST_LOG overrides.
    #[arg(short, long, action = ArgAction::Count, conflicts_with = "quiet")]
    pub verbose: u8,

    /// Less log output (-q warnings and errors only, -qq errors only).
    #[arg(short, long, action = ArgAction::Count)]
    pub quiet: u8,
}

/// `--format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum StreamFormat {
    Pcap,
    Pcapng,
}

impl From<StreamFormat> for crate::stream::Format {
    fn from(format: StreamFormat) -> Self {
        match format {
            StreamFormat::Pcap => crate::stream::Format::Pcap,
            StreamFormat::Pcapng => crate::stream::Format::PcapNg,
        }
    }
}

/// The mount options netstatfs takes (`-o`): each name and what value it
/// takes, if any. Errors, the man page and the shell completions list
/// them from here.
pub const MOUNT_OPTIONS: &[(&str, Option<&str>)] = &[
    ("allow_other", None),
    ("all_processes", None),
    ("cache_ttl", Some("DURATION")),
    ("interface", Some("NAME")),
    ("snaplen", Some("BYTES")),
    ("buffer", Some("SIZE")),
    ("kernel_buffer", Some("SIZE")),
    ("max_delay", Some("DURATION")),
    ("format", Some("pcap|pcapng")),
    ("no_kernel_events", None),
    ("unix", None),
    ("max_streams_per_user", Some("N")),
    ("max_streams", Some("N")),
    ("log", Some("stderr|syslog")),
    ("syslog_socket", Some("PATH")),
    ("docker_root", Some("DIR")),
    ("containerd_state", Some("DIR")),
];

/// Mount options mount(8) or mount.fuse3 may pass that mean nothing here
/// (the mount is always read-only, nosuid and nodev).
const GENERIC_OPTIONS: &[&str] = &[
    "defaults",
    "rw",
    "ro",
    "suid",
    "nosuid",
    "dev",
    "nodev",
    "exec",
    "noexec",
    "atime",
    "noatime",
    "relatime",
    "strictatime",
    "nodiratime",
    "async",
    "sync",
    "auto",
    "noauto",
    "user",
    "nouser",
    "users",
    "owner",
    "group",
    "nofail",
    "_netdev",
];

impl Cli {
    /// Parses the command line, `-o` options included; a bad `-o` option
    /// exits like a bad flag, naming it.
    pub fn parse_all() -> Cli {
        let mut cli = <Cli as Parser>::parse();
        if let Err(message) = cli.apply_mount_options() {
            use clap::CommandFactory;
            Cli::command()
                .error(clap::error::ErrorKind::InvalidValue, message)
                .exit();
        }
        cli
    }

    /// Folds the `-o` options into the flags they stand for.
    pub fn apply_mount_options(&mut self) -> Result<(), String> {
        let options: Vec<String> = self
            .options
            .iter()
            .flat_map(|list| list.split(','))
            .filter(|option| !option.is_empty())
            .map(str::to_owned)
            .collect();
        for option in options {
            let (key, value) = match option.split_once('=') {
                Some((key, value)) => (key, Some(value)),
                None => (option.as_str(), None),
            };
            let needs =
                || value.ok_or_else(|| format!("mount option {key} needs a value ({key}=...)"));
            let bad = |err: String| format!("mount option {option}: {err}");
            match key {
                "allow_other" => self.allow_other = true,
                "all_processes" => self.all_processes = true,
                "no_kernel_events" => self.no_kernel_events = true,
                "unix" => self.unix = true,
                "cache_ttl" => self.cache_ttl = parse_duration(needs()?).map_err(bad)?,
                "interface" => self.interface = needs()?.to_owned(),
                "snaplen" => {
                    self.snaplen = needs()?
                        .parse::<u32>()
                        .ok()
                        .filter(|n| (64..=262_144).contains(n))
                        .ok_or_else(|| bad("not a byte count from 64 to 262144".into()))?
                }
                "buffer" => self.buffer = parse_size(needs()?).map_err(bad)?,
                "max_streams_per_user" => {
                    self.max_streams_per_user = parse_count(needs()?).map_err(bad)?
                }
                "max_streams" => self.max_streams = parse_count(needs()?).map_err(bad)?,
                "kernel_buffer" => self.kernel_buffer = parse_size(needs()?).map_err(bad)?,
                "max_delay" => self.max_delay = Some(parse_duration(needs()?).map_err(bad)?),
                "format" => {
                    self.format = match needs()? {
                        "pcap" => StreamFormat::Pcap,
                        "pcapng" => StreamFormat::Pcapng,
                        _ => return Err(bad("use pcap or pcapng".into())),
                    }
                }
                "log" => {
                    self.log = Some(match needs()? {
                        "stderr" => crate::logging::LogTo::Stderr,
                        "syslog" => crate::logging::LogTo::Syslog,
                        _ => return Err(bad("use stderr or syslog".into())),
                    })
                }
                "syslog_socket" => self.syslog_socket = PathBuf::from(needs()?),
                "docker_root" => self.docker_root = Some(PathBuf::from(needs()?)),
                "containerd_state" => self.containerd_state = PathBuf::from(needs()?),
                "fsname" | "subtype" => {}
                generic if GENERIC_OPTIONS.contains(&generic) || generic.starts_with("x-") => {}
                unknown => {
                    let known: Vec<&str> = MOUNT_OPTIONS.iter().map(|(name, _)| *name).collect();
                    return Err(format!(
                        "unknown mount option '{unknown}' (netstatfs takes {})",
                        known.join(", ")
                    ));
                }
            }
        }
        Ok(())
    }

    pub fn mountpoint(&self) -> PathBuf {
        self.mountpoint
            .last()
            .cloned()
            .or_else(|| self.mount.clone())
            .unwrap_or_default()
    }

    /// Started as mount(8) starts a FUSE file system (with a SOURCE): it then
    /// returns once mounted and serves in the background, unless -f.
    pub fn background(&self) -> bool {
        self.mountpoint.len() == 2 && !self.foreground
    }

    /// The log filter the flags ask for (RUST_LOG, if set, wins).
    pub fn log_filter(&self) -> &'static str {
        match (self.verbose, self.quiet) {
            (0, 0) => "netstatfs=info,warn",
            (0, 1) => "warn",
            (0, _) => "error",
            (1, _) => "netstatfs=debug,info",
            _ => "trace",
        }
    }
}

/// "1s", "250ms", "1m30s" (humantime), or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    const VALID: &str = "a duration is a number of seconds (0.5) or a number with \
                         a unit (250ms, 1s, 1m30s), not negative";
    if let Ok(seconds) = text.trim().parse::<f64>() {
        return Duration::try_from_secs_f64(seconds).map_err(|_| format!("{text:?}: {VALID}"));
    }
    humantime::parse_duration(text).map_err(|_| format!("{text:?}: {VALID}"))
}

/// A positive count, for the stream limits.
fn parse_count(text: &str) -> Result<u32, String> {
    text.parse::<u32>()
        .ok()
        .filter(|n| *n >= 1)
        .ok_or_else(|| format!("{text:?} is not a count of 1 or more"))
}

/// A byte count: "4096", "512K", "4M", "4MiB", "1G" (binary multiples).
pub fn parse_size(text: &str) -> Result<usize, String> {
    let text = text.trim();
    let digits_end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(digits_end);
    let number: usize = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size (try 4MiB or 65536)"))?;
    let multiplier: usize = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        other => return Err(format!("unknown size unit {other:?} (use K, M or G)")),
    };
    number
        .checked_mul(multiplier)
        .ok_or_else(|| format!("{text:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn mountpoint_by_position_or_flag() {
        let cli = Cli::try_parse_from(["netstatfs", "m"]).unwrap();
        assert_eq!(cli.mountpoint(), PathBuf::from("m"));
        assert!(!cli.background());
        let cli = Cli::try_parse_from(["netstatfs", "--mount", "x"]).unwrap();
        assert_eq!(cli.mountpoint(), PathBuf::from("x"));
        assert!(Cli::try_parse_from(["netstatfs"]).is_err());
        assert!(Cli::try_parse_from(["netstatfs", "a", "--mount", "b"]).is_err());
        assert!(Cli::try_parse_from(["netstatfs", "a", "b", "c"]).is_err());
    }

    #[test]
    fn the_mount_helper_form() {
        let mut cli = Cli::try_parse_from([
            "netstatfs",
            "netstatfs",
            "/mnt/net",
            "-o",
            "rw,nosuid,allow_other,cache_ttl=2s,interface=lo",
            "-o",
            "snaplen=1500,all_processes,format=pcapng,x-systemd.automount",
            "-o",
            "max_streams_per_user=8,max_streams=100,max_delay=20ms,unix",
        ])
        .unwrap();
        cli.apply_mount_options().unwrap();
        assert_eq!((cli.max_streams_per_user, cli.max_streams), (8, 100));
        assert_eq!(cli.max_delay, Some(Duration::from_millis(20)));
        assert!(cli.unix);
        assert_eq!(cli.mountpoint(), PathBuf::from("/mnt/net"));
        assert!(cli.background());
        assert!(cli.allow_other && cli.all_processes);
        assert_eq!(cli.cache_ttl, Duration::from_secs(2));
        assert_eq!((cli.interface.as_str(), cli.snaplen), ("lo", 1500));
        assert_eq!(cli.format, StreamFormat::Pcapng);
        let foreground = Cli::try_parse_from(["netstatfs", "src", "/mnt/net", "-f"]).unwrap();
        assert!(!foreground.background());
        for (bad, named) in [
            ("colour=blue", "colour"),
            ("cache_ttl", "cache_ttl"),
            ("max_streams=0", "max_streams=0"),
            ("snaplen=9", "snaplen=9"),
        ] {
            let mut cli = Cli::try_parse_from(["netstatfs", "m", "-o", bad]).unwrap();
            let err = cli.apply_mount_options().unwrap_err();
            assert!(err.contains(named), "{err}");
        }
    }

    /// Every option MOUNT_OPTIONS lists is taken (with an example value)
    /// and named in `-o`'s help; nothing else is taken.
    #[test]
    fn the_mount_options_list_is_what_is_taken() {
        let help = Cli::command()
            .get_arguments()
            .find(|arg| arg.get_short() == Some('o'))
            .and_then(|arg| arg.get_help().map(ToString::to_string))
            .unwrap_or_default();
        for (name, value) in MOUNT_OPTIONS {
            let example = match *value {
                None => (*name).to_owned(),
                Some("DURATION") => format!("{name}=2s"),
                Some("SIZE") | Some("BYTES") | Some("N") => format!("{name}=1500"),
                Some(choices) if choices.contains('|') => {
                    format!("{name}={}", choices.split('|').next().unwrap_or(""))
                }
                Some(_) => format!("{name}=lo"),
            };
            let mut cli = Cli::try_parse_from(["netstatfs", "m", "-o", &example]).unwrap();
            assert_eq!(cli.apply_mount_options(), Ok(()), "{example}");
            let said = match value {
                None => (*name).to_owned(),
                Some(value) => format!("{name}={value}"),
            };
            assert!(help.contains(&said), "-o's help lacks {said}: {help}");
        }
    }

    #[test]
    fn durations_and_sizes() {
        assert_eq!(parse_duration("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("-1").is_err());
        assert_eq!(parse_size("4MiB"), Ok(4 << 20));
        assert_eq!(parse_size("512K"), Ok(512 << 10));
        assert_eq!(parse_size("65536"), Ok(65536));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("4X").is_err());
        assert!(parse_size("99999999999999999999G").is_err());
    }
}
