//! What the extcap prints for Wireshark (pure): the interface list, the
//! link types, the configuration and its reloads, in the line format of
//! extcap(4): `keyword {key=value}{key=value}…`, one item per line.

use std::fmt::Write;

/// The one interface, as `tshark -D` lists it.
pub const INTERFACE: &str = "netstatfs";
const INTERFACE_DISPLAY: &str = "Processes and sockets (netstatfs)";
/// The README the package installs; its "Wireshark" section says how.
const HELP: &str = "file:///usr/share/doc/netstatfs/README.md";

/// The configuration's arguments, in Wireshark's numbering. Wireshark makes
/// each a preference `extcap.netstatfs.<name>` (what `tshark -o` sets) and
/// passes it back as `--<name> VALUE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Argument {
    Pid = 0,
    Stream = 1,
    Mount = 2,
}

impl Argument {
    pub fn name(self) -> &'static str {
        match self {
            Argument::Pid => "pid",
            Argument::Stream => "stream",
            Argument::Mount => "mount",
        }
    }

    pub fn from_name(name: &str) -> Option<Argument> {
        [Argument::Pid, Argument::Stream, Argument::Mount]
            .into_iter()
            .find(|argument| argument.name() == name)
    }
}

/// One process of the mount, as the process selector shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessChoice {
    pub pid: i32,
    pub comm: String,
    /// Its command line, shortened ([`short_command`]): several "python3"
    /// are told apart by what they run.
    pub command: Option<String>,
    /// "docker web-1" (or "docker 0123456789ab"), where the cgroup tells.
    pub container: Option<String>,
}

/// One stream of the chosen process, as the stream selector shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stream {
    /// `all`, `tree`, or a socket file's name.
    pub name: String,
    /// A socket's state (LISTEN, ESTABLISHED, UNCONN...).
    pub state: Option<String>,
}

impl Stream {
    pub fn named(name: &str) -> Stream {
        Stream {
            name: name.to_owned(),
            state: None,
        }
    }
}

/// Everything the configuration shows; what could not be read is empty.
#[derive(Debug, Clone, Default)]
pub struct ConfigView {
    pub processes: Vec<ProcessChoice>,
    /// The chosen process's streams (`all`, `tree`, then its socket files),
    /// or just `all` and `tree` before a process is chosen.
    pub streams: Vec<Stream>,
    pub chosen_pid: Option<i32>,
    pub chosen_stream: Option<String>,
    /// The mount point to offer as the default.
    pub mount: Option<String>,
    /// Why there is no mount to list (which were found, why each was
    /// skipped): shown in place of the processes.
    pub notice: Option<String>,
}

/// The longest command line the process selector shows.
const COMMAND_WIDTH: usize = 60;

/// A process's command line from `/proc/<pid>/cmdline` (NUL-separated),
/// shortened for a selector: the program's base name, then its arguments,
/// cut at [`COMMAND_WIDTH`] characters. `None` for an empty one (a kernel
/// thread, or a process gone).
pub fn short_command(cmdline: &[u8]) -> Option<String> {
    let mut words = cmdline
        .split(|byte| *byte == 0)
        .filter(|word| !word.is_empty())
        .map(String::from_utf8_lossy);
    let program = words.next()?;
    let program = program.rsplit('/').next().unwrap_or(&program).to_owned();
    let line = std::iter::once(program)
        .chain(words.map(|word| word.into_owned()))
        .collect::<Vec<_>>()
        .join(" ");
    Some(if line.chars().count() > COMMAND_WIDTH {
        let cut: String = line.chars().take(COMMAND_WIDTH - 1).collect();
        format!("{cut}…")
    } else {
        line
    })
}

/// Wireshark's values end at the first `}`, and a line at its newline:
/// neither may come through from a process's name.
fn clean(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            '{' => '(',
            '}' => ')',
            c if c.is_control() => ' ',
            c => c,
        })
        .collect()
}

/// `--extcap-interfaces`.
pub fn interfaces(version: &str) -> String {
    format!(
        "extcap {{version={}}}{{help={HELP}}}\ninterface {{value={INTERFACE}}}{{display={INTERFACE_DISPLAY}}}\n",
        clean(version)
    )
}

/// `--extcap-dlts`: the one link type the mount's streams carry.
pub fn dlts(number: u32, name: &str, description: &str) -> String {
    format!(
        "dlt {{number={number}}}{{name={}}}{{display={}}}\n",
        clean(name),
        clean(description)
    )
}

/// `--extcap-config`: every argument, each followed by its values.
pub fn config(view: &ConfigView) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "arg {{number={}}}{{call=--{}}}{{display=Process}}{{type=selector}}{{required=true}}\
         {{reload=true}}{{placeholder=Reload processes}}\
         {{tooltip=The process whose traffic to capture (a directory of the mount)}}",
        Argument::Pid as u8,
        Argument::Pid.name()
    );
    out.push_str(&process_values(view));
    let _ = writeln!(
        out,
        "arg {{number={}}}{{call=--{}}}{{display=Stream}}{{type=selector}}\
         {{reload=true}}{{placeholder=Reload streams}}\
         {{tooltip=all: the process's packets; tree: with its descendants; or one socket}}",
        Argument::Stream as u8,
        Argument::Stream.name()
    );
    out.push_str(&stream_values(view));
    let _ = write!(
        out,
        "arg {{number={}}}{{call=--{}}}{{display=Mount point}}{{type=string}}\
         {{tooltip=Where netstatfs is mounted (empty: the first netstatfs mount)}}",
        Argument::Mount as u8,
        Argument::Mount.name()
    );
    if let Some(mount) = &view.mount {
        let _ = write!(out, "{{default={}}}", clean(mount));
    }
    if let Some(notice) = &view.notice {
        let _ = write!(out, "{{placeholder={}}}", clean(notice));
    }
    out.push('\n');
    out
}

/// `--extcap-config --extcap-reload-option NAME`: that argument's values.
pub fn reload(argument: Argument, view: &ConfigView) -> String {
    match argument {
        Argument::Pid => process_values(view),
        Argument::Stream => stream_values(view),
        Argument::Mount => String::new(),
    }
}

fn process_values(view: &ConfigView) -> String {
    let mut out = String::new();
    if view.processes.is_empty()
        && let Some(notice) = &view.notice
    {
        let _ = writeln!(
            out,
            "value {{arg={}}}{{value=none}}{{display={}}}{{default=true}}",
            Argument::Pid as u8,
            clean(notice)
        );
    }
    for process in &view.processes {
        let mut display = format!("{} {}", process.pid, process.comm);
        if let Some(command) = &process.command {
            let _ = write!(display, ": {command}");
        }
        if let Some(container) = &process.container {
            let _ = write!(display, " ({container})");
        }
        let _ = writeln!(
            out,
            "value {{arg={}}}{{value={}}}{{display={}}}{{default={}}}",
            Argument::Pid as u8,
            process.pid,
            clean(&display),
            view.chosen_pid == Some(process.pid)
        );
    }
    out
}

fn stream_values(view: &ConfigView) -> String {
    let mut out = String::new();
    let chosen = view.chosen_stream.as_deref().unwrap_or("all");
    for stream in &view.streams {
        let display = match &stream.state {
            Some(state) => format!("{} ({state})", stream.name),
            None => stream.name.clone(),
        };
        let _ = writeln!(
            out,
            "value {{arg={}}}{{value={}}}{{display={}}}{{default={}}}",
            Argument::Stream as u8,
            clean(&stream.name),
            clean(&display),
            stream.name == chosen
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_interface_list_names_one_interface() {
        assert_eq!(
            interfaces("0.1.0"),
            "extcap {version=0.1.0}{help=file:///usr/share/doc/netstatfs/README.md}\n\
             interface {value=netstatfs}{display=Processes and sockets (netstatfs)}\n"
        );
    }

    #[test]
    fn config_lists_processes_streams_and_the_mount() {
        let view = ConfigView {
            processes: vec![
                ProcessChoice {
                    pid: 7,
                    comm: "nginx".into(),
                    command: Some("nginx -g daemon off;".into()),
                    container: Some("docker web-1".into()),
                },
                ProcessChoice {
                    pid: 9,
                    comm: "evil}{value=1".into(),
                    command: None,
                    container: None,
                },
            ],
            streams: vec![
                Stream::named("all"),
                Stream::named("tree"),
                Stream {
                    name: "tcp_127.0.0.1:1_127.0.0.1:2".into(),
                    state: Some("ESTABLISHED".into()),
                },
            ],
            chosen_pid: Some(9),
            ..ConfigView::default()
        };
        let view = ConfigView {
            mount: Some("/run/netstatfs".into()),
            ..view
        };
        let text = config(&view);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("arg {number=0}{call=--pid}{display=Process}{type=selector}"));
        assert!(lines[0].contains("{reload=true}"));
        assert_eq!(
            lines[1],
            "value {arg=0}{value=7}{display=7 nginx: nginx -g daemon off; (docker web-1)}{default=false}"
        );
        assert_eq!(
            lines[2],
            "value {arg=0}{value=9}{display=9 evil)(value=1}{default=true}"
        );
        assert!(lines[3].starts_with("arg {number=1}{call=--stream}"));
        assert_eq!(
            lines[4],
            "value {arg=1}{value=all}{display=all}{default=true}"
        );
        assert_eq!(
            lines[6],
            "value {arg=1}{value=tcp_127.0.0.1:1_127.0.0.1:2}{display=tcp_127.0.0.1:1_127.0.0.1:2 (ESTABLISHED)}{default=false}"
        );
        assert!(lines[7].starts_with("arg {number=2}{call=--mount}"));
        assert!(lines[7].ends_with("{default=/run/netstatfs}"));
        assert_eq!(lines.len(), 8);
    }

    #[test]
    fn without_a_mount_the_process_list_says_why() {
        let view = ConfigView {
            notice: Some("no netstatfs mount uid 1000 can read; found /run/n: private".into()),
            ..ConfigView::default()
        };
        let text = config(&view);
        assert!(text.contains(
            "value {arg=0}{value=none}{display=no netstatfs mount uid 1000 can read; found /run/n: private}{default=true}"
        ));
        assert!(text.contains("{placeholder=no netstatfs mount uid 1000 can read"));
    }

    #[test]
    fn command_lines_are_shortened_for_the_selector() {
        assert_eq!(
            short_command(b"/usr/bin/python3\0-m\0http.server\08000\0").as_deref(),
            Some("python3 -m http.server 8000")
        );
        assert_eq!(short_command(b""), None);
        let long = [b"/bin/sh\0-c\0".as_slice(), &[b'x'; 100]].concat();
        let short = short_command(&long).unwrap();
        assert_eq!(short.chars().count(), 60);
        assert!(short.starts_with("sh -c xxx") && short.ends_with('…'));
    }

    #[test]
    fn a_reload_prints_only_that_arguments_values() {
        let view = ConfigView {
            streams: vec![
                Stream::named("all"),
                Stream::named("udp_0.0.0.0:53_0.0.0.0:0"),
            ],
            chosen_stream: Some("udp_0.0.0.0:53_0.0.0.0:0".into()),
            ..ConfigView::default()
        };
        assert_eq!(
            reload(Argument::Stream, &view),
            "value {arg=1}{value=all}{display=all}{default=false}\n\
             value {arg=1}{value=udp_0.0.0.0:53_0.0.0.0:0}{display=udp_0.0.0.0:53_0.0.0.0:0}{default=true}\n"
        );
        assert_eq!(reload(Argument::Pid, &view), "");
        assert_eq!(Argument::from_name("stream"), Some(Argument::Stream));
        assert_eq!(Argument::from_name("nope"), None);
    }
}
