//! Build helpers: `cargo run -p xtask -- assets <DIR>` writes the man page
//! (from the clap definition, plus sections on naming, attributes, streams,
//! security and exit status) and the bash, zsh and fish completions that the
//! Debian package installs.

use std::path::{Path, PathBuf};

use clap::CommandFactory;
use clap_complete::{Shell, generate_to};
use netstatfs::cli::{Cli, MOUNT_OPTIONS};
use netstatfs::extcap::ExtcapArgs;
use roff::{Roff, bold, italic, roman};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [command, dir] if command == "assets" => assets(Path::new(dir)),
        _ => Err("usage: cargo run -p xtask -- assets <DIR>".into()),
    }
}

fn assets(dir: &Path) -> Result<(), Box<dyn std::error::Error>> {
    std::fs::create_dir_all(dir.join("completions"))?;
    let mut command = Cli::command();
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        let path = generate_to(shell, &mut command, "netstatfs", dir.join("completions"))?;
        let script = std::fs::read_to_string(&path)?;
        std::fs::write(&path, complete_mount_options(shell, &script)?)?;
    }
    let page = man_page()?;
    let path: PathBuf = dir.join("netstatfs.1");
    std::fs::write(&path, page)?;
    std::fs::write(dir.join("netstatfs-extcap.1"), extcap_man_page()?)?;
    println!(
        "wrote {} and completions in {}",
        path.display(),
        dir.join("completions").display()
    );
    Ok(())
}

/// The mount options as completions offer them: `name` or `name=`.
fn mount_option_words() -> Vec<String> {
    MOUNT_OPTIONS
        .iter()
        .map(|(name, value)| match value {
            Some(_) => format!("{name}="),
            None => (*name).to_owned(),
        })
        .collect()
}

/// clap completes `-o` with file names: offer the mount options instead,
/// in a comma-separated list as mount(8) takes them.
fn complete_mount_options(shell: Shell, script: &str) -> Result<String, String> {
    let words = mount_option_words().join(" ");
    let (generated, ours) = match shell {
        Shell::Bash => (
            "                -o)\n                    COMPREPLY=($(compgen -f \"${cur}\"))\n"
                .to_owned(),
            format!(
                "                -o)\n                    local head=\"\"\n                    \
                 [[ \"${{cur}}\" == *,* ]] && head=\"${{cur%,*}},\"\n                    \
                 COMPREPLY=($(compgen -P \"${{head}}\" -W \"{words}\" -- \"${{cur##*,}}\"))\n                    \
                 compopt -o nospace 2>/dev/null\n"
            ),
        ),
        Shell::Zsh => (
            ":OPTIONS:_default' \\\n".to_owned(),
            format!(":OPTIONS:_sequence compadd - {words}' \\\n"),
        ),
        Shell::Fish => {
            let line = script
                .lines()
                .find(|line| line.starts_with("complete -c netstatfs -s o "))
                .ok_or("fish: no completion of -o")?;
            let lines = words.replace(' ', "\\n");
            (
                format!("{line}\n"),
                format!(
                    "{} -x -a \"(__fish_complete_list , 'printf \\'{lines}\\n\\'')\"\n",
                    line.trim_end_matches(" -r")
                ),
            )
        }
        _ => return Ok(script.to_owned()),
    };
    if !script.contains(&generated) {
        return Err(format!("{shell}: clap's completion of -o has changed"));
    }
    Ok(script.replacen(&generated, &ours, 1))
}

/// The synopsis, each option with its value's name (clap_mangen's leaves
/// them out).
fn synopsis(command: &clap::Command) -> Roff {
    let mut roff = Roff::new();
    roff.control("SH", ["SYNOPSIS"]);
    let mut parts = vec![bold(command.get_name().to_owned())];
    for arg in command.get_arguments() {
        if arg.is_hide_set() {
            continue;
        }
        let value = arg
            .get_value_names()
            .and_then(|names| names.first())
            .map(ToString::to_string);
        let takes_value = arg.get_action().takes_values();
        if arg.is_positional() {
            parts.push(roman(" ["));
            parts.push(italic(value.unwrap_or_default()));
            parts.push(roman("]"));
            continue;
        }
        let flag = match (arg.get_long(), arg.get_short()) {
            (Some(long), _) => format!("--{long}"),
            (None, Some(short)) => format!("-{short}"),
            (None, None) => continue,
        };
        parts.push(roman(" ["));
        parts.push(bold(flag));
        if let (true, Some(value)) = (takes_value, value) {
            parts.push(roman(" "));
            parts.push(italic(value));
        }
        parts.push(roman("]"));
    }
    roff.control("PP", []).text(parts);
    roff
}

/// A clap-generated page: title, name, synopsis, description, options,
/// then `extra`, then the version.
fn page(command: clap::Command, extra: Roff) -> Result<Vec<u8>, std::io::Error> {
    let synopsis = synopsis(&command);
    let man = clap_mangen::Man::new(command)
        .section("1")
        .manual("User Commands");
    let mut out = Vec::new();
    man.render_title(&mut out)?;
    man.render_name_section(&mut out)?;
    synopsis.to_writer(&mut out)?;
    man.render_description_section(&mut out)?;
    man.render_options_section(&mut out)?;
    extra.to_writer(&mut out)?;
    man.render_version_section(&mut out)?;
    Ok(out)
}

/// The daemon's page, with the sections a user needs beyond options.
fn man_page() -> Result<Vec<u8>, std::io::Error> {
    page(Cli::command(), extra_sections())
}

/// The extcap's page: its options, and how Wireshark finds it.
fn extcap_man_page() -> Result<Vec<u8>, std::io::Error> {
    let mut roff = Roff::new();
    section(
        &mut roff,
        "WIRESHARK",
        &[
            "Wireshark and tshark run every program of their extcap folders (tshark -G folders \
             names them): the package installs this one in the global folder; a user may link \
             it into their personal one (~/.config/wireshark/extcap). The interface is called \
             netstatfs; its options are the process (pid), the stream (all, tree or a socket \
             file of that process) and the mount point (default: the first netstatfs mount).",
            "From the command line: tshark -i netstatfs -o extcap.netstatfs.pid:PID \
             -o extcap.netstatfs.stream:all. A capture filter (-f) is applied to each packet \
             by libpcap, compiled for the stream's link type.",
            "The extcap reads the mount with its caller's rights, as cat would: a stream the \
             caller may not read is an error, which Wireshark shows. It holds no capability.",
        ],
    );
    section(
        &mut roff,
        "EXIT STATUS",
        &[
            "0 when the capture ended (SIGTERM, the stream's end, or Wireshark closing the \
           FIFO); 1 with a message on standard error otherwise; 2 for a command line it does \
           not understand.",
        ],
    );
    page(ExtcapArgs::command(), roff)
}

fn section(roff: &mut Roff, title: &str, paragraphs: &[&str]) {
    roff.control("SH", [title]);
    for paragraph in paragraphs {
        roff.control("PP", []).text([roman(*paragraph)]);
    }
}

fn extra_sections() -> Roff {
    let mut roff = Roff::new();
    roff.control("SH", ["MOUNTING"]);
    roff.control("PP", [])
        .text([bold("netstatfs"), roman(" "), italic("MOUNTPOINT")])
        .text([roman(" runs in the foreground. The form mount(8) uses, ")])
        .text([bold("netstatfs"), roman(" "), italic("SOURCE MOUNTPOINT"), roman(" -o "), italic("OPTIONS")])
        .text([roman(
            ", returns once the mount is up and serves in the background until unmounted (-f keeps it in \
             the foreground). So both of these work:",
        )]);
    roff.control("PP", []).text([roman(
        "mount -t fuse.netstatfs netstatfs /mnt/net -o allow_other",
    )]);
    roff.control("PP", []).text([roman(
        "netstatfs /mnt/net fuse.netstatfs allow_other 0 0    (an /etc/fstab line)",
    )]);
    let listed: Vec<String> = MOUNT_OPTIONS
        .iter()
        .map(|(name, value)| match value {
            Some(value) => format!("{name}={value}"),
            None => (*name).to_owned(),
        })
        .collect();
    roff.control("PP", []).text([roman(format!(
        "Mount options, each the option of the same name above: {}. The generic ones (rw, nosuid, \
         noauto, x-..., ...) change nothing; any other option is an error naming it. umount stops the \
         daemon, which gives the mount point back at once. Started this way it logs to syslog (/dev/log, \
         ident netstatfs) once it has detached; log=stderr keeps stderr.",
        listed.join(", ")
    ))]);
    section(
        &mut roff,
        "FILES AND NAMES",
        &[
            "The root holds one directory per process that holds an inet socket (every process with \
             --all-processes), named PID_COMM; the comm has '/' and control characters made '_', and an empty \
             comm is 'unnamed'. A name resolves only while both pid and comm match the live process.",
            "A process directory holds one file per socket, named PROTO_LOCAL_REMOTE: \
             tcp_127.0.0.1:41234_127.0.0.1:8080, tcp6_[::1]:8080_[::]:0, udp_0.0.0.0:5353_0.0.0.0:0. PROTO is \
             tcp, tcp6, udp, udp6, raw, raw6, icmp or icmp6; IPv6 addresses are bracketed and compressed as \
             RFC 5952 says; an unconnected remote end is 0.0.0.0:0 or [::]:0. Two sockets that would share a \
             name each get a ~INODE suffix. The file 'all' streams every TCP and UDP flow of the process, \
             'tree' those of the process and all its descendants, present and future.",
        ],
    );
    section(
        &mut roff,
        "EXTENDED ATTRIBUTES",
        &[
            "Socket files: user.netstatfs.proto, .state (the kernel's TCP state names; UNCONN or ESTABLISHED \
             for datagram sockets), .inode, .uid, .local, .remote, .rx_queue, .tx_queue, .fds (the process's fds \
             for the socket, comma-separated), .netns (the network namespace's inode). Process directories: \
             user.netstatfs.pid, .comm, .uid, .netns, .sockets. Read them with getfattr -d.",
            "What the kernel knows of a socket, asked of socket diagnostics (as ss -tinm asks) for that one \
             socket when the attribute is read (a reply answers for 100 ms): user.netstatfs.tcp.rtt, .rttvar, \
             .min_rtt and .rto in milliseconds with microsecond precision; .cwnd, .ssthresh (absent before the \
             first loss), .mss, .pmtu, .reordering in segments or bytes as ss prints them; .retrans (segments \
             being retransmitted now), .total_retrans, .lost, .unacked, .sacked; .bytes_sent, .bytes_acked \
             (the SYN counts one), .bytes_received, .bytes_retrans; .segs_out, .segs_in, .data_segs_out, \
             .data_segs_in; .delivery_rate and .pacing_rate in bits per second; .busy_time, .rwnd_limited, \
             .sndbuf_limited, .last_send and .last_recv in milliseconds; .congestion (the algorithm's name); \
             .timer as kind,expiry,retransmissions (kind: off, on, keepalive, timewait, persist). Every inet \
             socket: user.netstatfs.mem.rmem_alloc, .rcvbuf, .wmem_alloc, .sndbuf (bytes) and .drops (packets \
             dropped on receipt, UDP's lost datagrams). What the running kernel does not report is absent.",
            "Process directories also say, read from /proc when asked: user.netstatfs.exe, .cmdline, .user, \
             .cgroup, and where the cgroup path names a container, .container.runtime, .container.id and, for \
             a Kubernetes pod, .pod.uid.",
            "With --unix, unix sockets are files too: unix_PATH (with / made _), unix_@NAME for an abstract \
             name, unix_INODE for an unnamed socket, with a ~INODE suffix where a listener and its accepted \
             connections share a path. Attributes: user.netstatfs.proto (unix), .type (stream, dgram, \
             seqpacket), .state (LISTEN, CONNECTED, UNCONNECTED, CONNECTING, DISCONNECTING), .inode, .path \
             (the path, or @ and the abstract name; absent if unnamed), .fds, .netns; and, asked of socket \
             diagnostics (UNIX_DIAG) when read, .peer_inode, .peer_pid and .peer_comm (the processes holding \
             the peer socket, comma-separated), .uid, .rx_queue, .tx_queue, .vfs_inode, .vfs_dev. Reading a \
             unix socket file fails with EOPNOTSUPP: libpcap cannot capture unix sockets.",
        ],
    );
    section(
        &mut roff,
        "STREAMS",
        &[
            "Reading a socket file streams its live traffic as pcap (or pcapng with --format pcapng, each \
             packet commented with its pid, comm and socket): the file header at once, then a record per \
             packet. A connected socket's stream holds both directions of exactly its address and port pair; \
             a listener's or an unconnected socket's holds everything to or from its local address and port, a \
             wildcard address standing for the namespace's own addresses. IPv4-mapped IPv6 sockets carry IPv4 \
             packets. Each packet appears once. The capture runs in the socket's network namespace.",
            "Who owns a flow, for 'all' and 'tree', comes from kernel events (tracepoints read with \
             perf_event_open, no eBPF): the process that routed, connected, read, wrote or closed it, however \
             short the flow; a connection accepted by one of several workers sharing a listener is that \
             worker's alone. This needs tracefs (mounted at /sys/kernel/tracing when missing) and CAP_PERFMON or \
             CAP_SYS_ADMIN; without them the streams follow /proc, which misses flows shorter than about 10 ms, \
             and the log says which method serves each stream. Each flow's packets come in order.",
            "A stream ends (EOF) shortly after its socket closes or its process exits, once the last packets \
             are in; 'all' 300 ms after the process exits, 'tree' after its last member exits. A reader blocked on a quiet socket that gets a \
             signal it would act on (Ctrl-C, SIGKILL, a caught signal) is answered EINTR within about 100 ms. \
             A reader that falls behind costs at most --buffer; beyond it packets are dropped, and the count is \
             logged when the stream closes.",
        ],
    );
    section(
        &mut roff,
        "SECURITY",
        &[
            "The mount is private to the user who mounted it and root (its root directory is mode 0500). \
             --allow-other lets every user see which pids hold sockets, as /proc shows every pid; a process \
             directory is owned as /proc/PID/fd is (the effective user, or root while the process is not \
             dumpable) with mode 0500, so others see neither its sockets nor its attributes. A socket's stream \
             is readable only by the socket's owner and root (mode 0400, owned by the socket's uid). For a \
             reader who is not root, 'all' and 'tree' hold only packets of that reader's own sockets, and every \
             stream ends once its process is no longer the reader's (a credential change, or an exec of a \
             setuid, setgid or file-capability program). The mount is read-only.",
            "Capturing needs CAP_NET_RAW; reading other users' /proc/PID/fd needs CAP_SYS_PTRACE and \
             CAP_DAC_READ_SEARCH; kernel events need CAP_PERFMON; entering another network namespace needs \
             CAP_SYS_ADMIN. Run as root, netstatfs keeps these (and CAP_NET_ADMIN) and drops every other \
             capability. The Debian package grants the binary \
             cap_net_raw,cap_net_admin,cap_sys_ptrace,cap_dac_read_search,cap_perfmon and lets only root and \
             the netstatfs group run it (usermod -aG netstatfs USER), as wireshark-common does for dumpcap; \
             without the capabilities it lists the user's own processes and says at start-up what it cannot do.",
        ],
    );
    section(
        &mut roff,
        "EXIT STATUS",
        &[
            "0 after Ctrl-C, SIGTERM or SIGHUP, or when someone else unmounts it; 1 when it cannot start (a \
             missing mountpoint, an existing mount, no /dev/fuse, a refused mount), with one line saying why; \
             2 for a command line it does not understand.",
        ],
    );
    section(
        &mut roff,
        "FILES",
        &[
            "/dev/fuse: the FUSE device. /etc/fuse.conf: user_allow_other lets a user who is not root \
             mount with --allow-other. /proc: processes, their fds and sockets. /sys/kernel/tracing: the \
             tracepoints that tell who owns a flow. /dev/log: where a daemon started by mount(8) logs. \
             /etc/fstab: a line of type fuse.netstatfs mounts it at boot or with mount MOUNTPOINT.",
        ],
    );
    section(
        &mut roff,
        "EXAMPLES",
        &[
            "mkdir -p m && netstatfs m &    (mount; Ctrl-C or umount m stops it)",
            "ls m; ls m/$(pidof -s nginx)_nginx/    (who holds sockets; one process's sockets)",
            "find m -name 'tcp_*:443_*'    (every socket on port 443, without reading a stream)",
            "getfattr -d m/1234_nginx/tcp_127.0.0.1:80_0.0.0.0:0    (its state, queues, RTT)",
            "tcpdump -n -r m/1234_nginx/tcp_127.0.0.1:80_0.0.0.0:0    (its live traffic)",
            "wireshark -k -i <(cat m/1234_nginx/all)    (everything the process sends and receives)",
            "cat m/$$_bash/tree > shell.pcap &    (then everything the shell's commands do on the network)",
            "mount -t fuse.netstatfs netstatfs /mnt/net -o allow_other    (as mount(8) does)",
        ],
    );
    section(
        &mut roff,
        "CAVEATS",
        &[
            "Streams never end while their socket or process lives, as /sys/kernel/tracing/trace_pipe \
             never does: a tool that reads every file of a tree, grep -r, cp -r, or find m -type f | xargs \
             wc -c, waits forever. Walk the tree without reading the files: ls -R m, find m -name \
             'tcp_*', getfattr -R -d m, tar and du are fine.",
            "Each open stream holds a kernel packet ring (1 MiB until its first packets, then \
             --kernel-buffer) and up to --buffer of queue; limits on open streams per user and in all \
             (--max-streams-per-user, --max-streams) keep a careless script from exhausting memory.",
            "A stream's closing line in the log says how many packets it delivered and what it missed, \
             with why; a pcapng stream ends with a statistics block saying the same.",
        ],
    );
    section(
        &mut roff,
        "SEE ALSO",
        &[
            "netstatfs-extcap(1), ss(8), lsof(8), tcpdump(8), wireshark(1), tshark(1), mount(8), \
             fusermount3(1), fstab(5), getfattr(1), pcap-filter(7)",
        ],
    );
    roff
}
