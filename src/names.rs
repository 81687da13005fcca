//! The naming scheme, both ways.
//!
//! Process directories are `<pid>_<comm>` and socket files are
//! `<proto>_<local>_<remote>`, with a `~<socket inode>` suffix where two
//! sockets of one process would otherwise share a name. Everything here is
//! pure: it knows nothing of /proc, FUSE or capture, so it is tested with
//! plain unit tests and reused by scripts (see `examples/netstat.rs`).

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

/// The socket tables netstatfs lists, one per /proc/net file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    Tcp,
    Tcp6,
    Udp,
    Udp6,
    Raw,
    Raw6,
    Icmp,
    Icmp6,
}

impl Proto {
    pub const ALL: [Proto; 8] = [
        Proto::Tcp,
        Proto::Tcp6,
        Proto::Udp,
        Proto::Udp6,
        Proto::Raw,
        Proto::Raw6,
        Proto::Icmp,
        Proto::Icmp6,
    ];

    /// The name used in file names, which is also the /proc/net table's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Tcp6 => "tcp6",
            Proto::Udp => "udp",
            Proto::Udp6 => "udp6",
            Proto::Raw => "raw",
            Proto::Raw6 => "raw6",
            Proto::Icmp => "icmp",
            Proto::Icmp6 => "icmp6",
        }
    }

    /// Whether the table holds AF_INET6 sockets (whose addresses are IPv6,
    /// possibly IPv4-mapped).
    pub fn is_ipv6(self) -> bool {
        matches!(self, Proto::Tcp6 | Proto::Udp6 | Proto::Raw6 | Proto::Icmp6)
    }

    pub fn is_tcp(self) -> bool {
        matches!(self, Proto::Tcp | Proto::Tcp6)
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Proto {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Proto::ALL
            .into_iter()
            .find(|proto| proto.as_str() == s)
            .ok_or(())
    }
}

/// Used for a process whose comm is empty, so a directory name never ends
/// in a bare `_`.
const EMPTY_COMM: &str = "unnamed";

/// The comm made safe for a file name: '/' and control characters become
/// '_', and an empty comm becomes `unnamed`.
pub fn safe_comm(comm: &str) -> String {
    if comm.is_empty() {
        return EMPTY_COMM.to_owned();
    }
    comm.chars()
        .map(|c| if c == '/' || c.is_control() { '_' } else { c })
        .collect()
}

/// `<pid>_<comm>`, with the comm made safe by [`safe_comm`].
pub fn process_dir_name(pid: i32, comm: &str) -> String {
    format!("{pid}_{}", safe_comm(comm))
}

/// Splits a process directory name into its pid and comm part. The caller
/// still compares the whole name with the live process's name: a pid alone
/// never resolves.
pub fn parse_process_dir_name(name: &str) -> Option<(i32, &str)> {
    let (pid, comm) = name.split_once('_')?;
    if pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) || pid.starts_with('0') {
        return None;
    }
    Some((pid.parse().ok()?, comm))
}

/// A socket file name, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SocketFileName {
    pub proto: Proto,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// Present only where the name needed disambiguating.
    pub inode: Option<u64>,
}

impl fmt::Display for SocketFileName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // SocketAddr's Display writes IPv6 in brackets, compressed as RFC 5952
        // says (IPv4-mapped addresses in dotted form), and never a scope id
        // here: /proc/net tables do not carry one.
        write!(f, "{}_{}_{}", self.proto, self.local, self.remote)?;
        if let Some(inode) = self.inode {
            write!(f, "~{inode}")?;
        }
        Ok(())
    }
}

impl FromStr for SocketFileName {
    type Err = ();

    /// Parses exactly what `Display` writes and nothing else: the result
    /// prints back to the same string.
    fn from_str(name: &str) -> Result<Self, ()> {
        let mut parts = name.splitn(3, '_');
        let proto: Proto = parts.next().ok_or(())?.parse()?;
        let local = parse_endpoint(parts.next().ok_or(())?, proto)?;
        let rest = parts.next().ok_or(())?;
        let (remote, inode) = match rest.split_once('~') {
            Some((remote, inode)) => {
                if inode.is_empty() || !inode.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(());
                }
                (remote, Some(inode.parse().map_err(|_| ())?))
            }
            None => (rest, None),
        };
        let remote = parse_endpoint(remote, proto)?;
        let parsed = SocketFileName {
            proto,
            local,
            remote,
            inode,
        };
        // Reject spellings that parse but are not canonical ("[::0001]:80").
        if parsed.to_string() != name {
            return Err(());
        }
        Ok(parsed)
    }
}

fn parse_endpoint(text: &str, proto: Proto) -> Result<SocketAddr, ()> {
    let addr: SocketAddr = text.parse().map_err(|_| ())?;
    match (addr.ip(), proto.is_ipv6()) {
        (IpAddr::V4(_), false) | (IpAddr::V6(_), true) => Ok(addr),
        _ => Err(()),
    }
}

/// `<proto>_<local>_<remote>`.
pub fn socket_file_name(proto: Proto, local: SocketAddr, remote: SocketAddr) -> String {
    SocketFileName {
        proto,
        local,
        remote,
        inode: None,
    }
    .to_string()
}

/// The prefix of every unix socket file's name.
pub const UNIX_PREFIX: &str = "unix_";

/// A unix socket file's name: `unix_<path>` for a socket bound to a path,
/// `unix_@<name>` for an abstract one (`path` as `/proc/net/unix` shows it,
/// abstract names with their leading `@`), `unix_<inode>` for an unnamed
/// one; '/' and control characters become '_', as in process names.
pub fn unix_file_name(path: Option<&str>, inode: u64) -> String {
    match path {
        Some(path) if !path.is_empty() => format!("{UNIX_PREFIX}{}", safe_comm(path)),
        _ => format!("{UNIX_PREFIX}{inode}"),
    }
}

/// A process's socket file names (`plain`, in the order given, `inodes[i]`
/// being the socket of `plain[i]`) made unique within its directory: every
/// socket whose plain name is shared by another gets the `~<inode>`
/// suffix, so the result does not depend on the order.
pub fn unique_names(plain: Vec<String>, inodes: &[u64]) -> Vec<String> {
    let mut sorted: Vec<&str> = plain.iter().map(String::as_str).collect();
    sorted.sort_unstable();
    let shared = |name: &str| {
        let first = sorted.partition_point(|other| *other < name);
        sorted.get(first + 1) == Some(&name)
    };
    plain
        .iter()
        .zip(inodes)
        .map(|(name, inode)| {
            if shared(name) {
                format!("{name}~{inode}")
            } else {
                name.clone()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    #[test]
    fn process_names_are_safe() {
        assert_eq!(process_dir_name(812, "sshd"), "812_sshd");
        assert_eq!(process_dir_name(7, "a/b c"), "7_a_b c");
        assert_eq!(process_dir_name(7, "tab\there\n"), "7_tab_here_");
        assert_eq!(process_dir_name(7, ""), "7_unnamed");
        assert_eq!(process_dir_name(7, "kworker/0:1"), "7_kworker_0:1");
    }

    #[test]
    fn process_names_parse_back() {
        assert_eq!(parse_process_dir_name("812_sshd"), Some((812, "sshd")));
        assert_eq!(parse_process_dir_name("7_a_b c"), Some((7, "a_b c")));
        assert_eq!(parse_process_dir_name("7_"), Some((7, "")));
        for bad in [
            "sshd",
            "_sshd",
            "0812_sshd",
            "-1_x",
            "+1_x",
            "99999999999_x",
            "",
            "1",
        ] {
            assert_eq!(parse_process_dir_name(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn unix_names_are_safe_and_unique() {
        assert_eq!(
            unix_file_name(Some("/run/dbus/system_bus_socket"), 9),
            "unix__run_dbus_system_bus_socket"
        );
        assert_eq!(
            unix_file_name(Some("@/tmp/.X11-unix/X0"), 9),
            "unix_@_tmp_.X11-unix_X0"
        );
        assert_eq!(unix_file_name(Some("@a\nb"), 9), "unix_@a_b");
        assert_eq!(unix_file_name(None, 31337), "unix_31337");
        // A listener and the connection it accepted share the path.
        let plain = vec![
            unix_file_name(Some("/run/x.sock"), 10),
            unix_file_name(Some("/run/x.sock"), 11),
            unix_file_name(None, 12),
        ];
        assert_eq!(
            unique_names(plain, &[10, 11, 12]),
            ["unix__run_x.sock~10", "unix__run_x.sock~11", "unix_12"]
        );
    }

    #[test]
    fn socket_names_follow_the_scheme() {
        let cases = [
            (
                Proto::Tcp,
                "127.0.0.1:41234",
                "127.0.0.1:8080",
                "tcp_127.0.0.1:41234_127.0.0.1:8080",
            ),
            (
                Proto::Tcp6,
                "[::1]:8080",
                "[::]:0",
                "tcp6_[::1]:8080_[::]:0",
            ),
            (
                Proto::Udp,
                "0.0.0.0:5353",
                "0.0.0.0:0",
                "udp_0.0.0.0:5353_0.0.0.0:0",
            ),
            (
                Proto::Tcp6,
                "[::ffff:127.0.0.1]:8080",
                "[::ffff:127.0.0.1]:51000",
                "tcp6_[::ffff:127.0.0.1]:8080_[::ffff:127.0.0.1]:51000",
            ),
            (
                Proto::Udp6,
                "[2001:db8:0:0:1:0:0:1]:53",
                "[fe80:0:0:0:0:0:0:1]:9",
                "udp6_[2001:db8::1:0:0:1]:53_[fe80::1]:9",
            ),
            (
                Proto::Raw,
                "0.0.0.0:1",
                "0.0.0.0:0",
                "raw_0.0.0.0:1_0.0.0.0:0",
            ),
        ];
        for (proto, local, remote, expected) in cases {
            let name = socket_file_name(proto, addr(local), addr(remote));
            assert_eq!(name, expected);
            let parsed: SocketFileName = name.parse().unwrap();
            assert_eq!(
                parsed,
                SocketFileName {
                    proto,
                    local: addr(local),
                    remote: addr(remote),
                    inode: None
                }
            );
        }
    }

    #[test]
    fn rfc5952_compression() {
        // Longest run of zeros compressed, a single zero field not, lower case.
        let name = socket_file_name(
            Proto::Tcp6,
            addr("[2001:DB8:0:1:1:1:1:1]:1"),
            addr("[2001:0:0:1:0:0:0:1]:2"),
        );
        assert_eq!(name, "tcp6_[2001:db8:0:1:1:1:1:1]:1_[2001:0:0:1::1]:2");
    }

    #[test]
    fn socket_names_reject_what_they_never_write() {
        for bad in [
            "",
            "tcp",
            "tcp_127.0.0.1:1",
            "sctp_127.0.0.1:1_127.0.0.1:2",
            "tcp_[::1]:1_[::1]:2",
            "tcp6_127.0.0.1:1_127.0.0.1:2",
            "tcp6_[::0001]:1_[::]:0",
            "tcp_127.0.0.1:1_127.0.0.1:2~",
            "tcp_127.0.0.1:1_127.0.0.1:2~x",
            "tcp_127.0.0.1:1_127.0.0.1:2~+1",
            "tcp_127.0.0.1:01_127.0.0.1:2",
            "tcp_127.0.0.1:70000_127.0.0.1:2",
            "all",
            "..",
        ] {
            assert!(bad.parse::<SocketFileName>().is_err(), "{bad:?}");
        }
        let with_inode: SocketFileName = "tcp_127.0.0.1:1_0.0.0.0:0~4242".parse().unwrap();
        assert_eq!(with_inode.inode, Some(4242));
    }

    fn unique_socket_names(sockets: &[(Proto, SocketAddr, SocketAddr, u64)]) -> Vec<String> {
        let plain = sockets
            .iter()
            .map(|&(proto, local, remote, _)| socket_file_name(proto, local, remote))
            .collect();
        let inodes: Vec<u64> = sockets.iter().map(|&(_, _, _, inode)| inode).collect();
        unique_names(plain, &inodes)
    }

    #[test]
    fn shared_names_get_the_inode_suffix_whatever_the_order() {
        let listener = (Proto::Tcp6, addr("[::]:80"), addr("[::]:0"), 11);
        let twin = (Proto::Tcp6, addr("[::]:80"), addr("[::]:0"), 12);
        let other = (Proto::Udp, addr("0.0.0.0:53"), addr("0.0.0.0:0"), 13);
        assert_eq!(
            unique_socket_names(&[listener, other, twin]),
            [
                "tcp6_[::]:80_[::]:0~11",
                "udp_0.0.0.0:53_0.0.0.0:0",
                "tcp6_[::]:80_[::]:0~12"
            ]
        );
        assert_eq!(
            unique_socket_names(&[twin, listener]),
            ["tcp6_[::]:80_[::]:0~12", "tcp6_[::]:80_[::]:0~11"]
        );
        assert_eq!(unique_socket_names(&[listener]), ["tcp6_[::]:80_[::]:0"]);
    }

    mod fuzz {
        use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6};

        use proptest::prelude::*;

        use super::super::*;

        fn proto_and_endpoints() -> impl Strategy<Value = (Proto, SocketAddr, SocketAddr)> {
            let v4 = (any::<u32>(), any::<u16>())
                .prop_map(|(ip, port)| SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(ip), port)));
            let v6 =
                (any::<u128>(), any::<u16>(), prop::bool::ANY).prop_map(|(ip, port, mapped)| {
                    // Mapped addresses are common in /proc: make them likely.
                    let ip = if mapped {
                        Ipv4Addr::from(ip as u32).to_ipv6_mapped()
                    } else {
                        Ipv6Addr::from(ip)
                    };
                    SocketAddr::V6(SocketAddrV6::new(ip, port, 0, 0))
                });
            prop_oneof![
                (
                    prop::sample::select(vec![Proto::Tcp, Proto::Udp, Proto::Raw, Proto::Icmp]),
                    v4.clone(),
                    v4
                ),
                (
                    prop::sample::select(vec![Proto::Tcp6, Proto::Udp6, Proto::Raw6, Proto::Icmp6]),
                    v6.clone(),
                    v6
                ),
            ]
        }

        proptest! {
            #[test]
            fn socket_names_round_trip((proto, local, remote) in proto_and_endpoints(), inode in prop::option::of(any::<u64>())) {
                let name = SocketFileName { proto, local, remote, inode };
                let text = name.to_string();
                prop_assert!(!text.contains('/') && text.len() < 255);
                prop_assert_eq!(text.parse::<SocketFileName>(), Ok(name));
            }

            #[test]
            fn socket_name_parsing_never_panics(text in ".{0,80}") {
                if let Ok(parsed) = text.parse::<SocketFileName>() {
                    prop_assert_eq!(parsed.to_string(), text);
                }
            }

            #[test]
            fn socket_name_parsing_of_near_misses_never_panics(
                text in "(tcp6?|udp6?|raw|icmp)_[\\[\\]0-9a-f:.]{0,45}_[\\[\\]0-9a-f:.~]{0,50}"
            ) {
                let _ = text.parse::<SocketFileName>();
            }

            #[test]
            fn comms_become_safe_names(comm in any::<String>(), pid in 1..i32::MAX) {
                let safe = safe_comm(&comm);
                prop_assert!(!safe.is_empty());
                prop_assert!(!safe.contains('/') && !safe.chars().any(char::is_control));
                let name = process_dir_name(pid, &comm);
                prop_assert_eq!(parse_process_dir_name(&name), Some((pid, safe.as_str())));
            }

            #[test]
            fn process_name_parsing_never_panics(text in any::<String>()) {
                let _ = parse_process_dir_name(&text);
            }
        }
    }
}
