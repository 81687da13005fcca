//! Where the daemon's log lines go.
//!
//! Started by hand, or with `-f`, netstatfs writes them to stderr. Started
//! by mount(8) or an fstab line it detaches once mounted, with stderr on
//! /dev/null, so from then on it sends them to syslog: `/dev/log`, which
//! journald (or rsyslog) serves, with the ident `netstatfs` and facility
//! daemon, as other FUSE daemons do. `-o log=stderr` keeps stderr even
//! then; `-o log=syslog` sends to syslog from the start, foreground or not.
//! `-o syslog_socket=PATH` names another socket than `/dev/log` (a
//! container's, a test's).
//!
//! The lines are filtered as ever (`-v`, `-q`, `RUST_LOG`); env_logger
//! formats each record once and hands it to [`Router`], which says it in
//! the form of where it goes now.

use std::io::Write;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

/// Where `log=` sends the lines.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogTo {
    Stderr,
    Syslog,
}

/// The default syslog socket.
pub const DEV_LOG: &str = "/dev/log";

/// Where lines go now.
enum Route {
    Stderr,
    Syslog(Syslog),
}

struct Setup {
    route: Route,
    /// `None`: stderr until the daemon detaches, then syslog.
    chosen: Option<LogTo>,
    socket: PathBuf,
}

static SETUP: Mutex<Option<Setup>> = Mutex::new(None);

fn setup() -> std::sync::MutexGuard<'static, Option<Setup>> {
    SETUP.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Installs the logger: `filter` unless `RUST_LOG` says otherwise, lines to
/// stderr, or to syslog at `socket` if `chosen` says so.
pub fn init(filter: &str, chosen: Option<LogTo>, socket: &Path) {
    let route = match chosen {
        Some(LogTo::Syslog) => match Syslog::connect(socket) {
            Ok(syslog) => Route::Syslog(syslog),
            Err(err) => {
                eprintln!(
                    "netstatfs: warning: no syslog at {} ({err}): logging to stderr",
                    socket.display()
                );
                Route::Stderr
            }
        },
        _ => Route::Stderr,
    };
    *setup() = Some(Setup {
        route,
        chosen,
        socket: socket.to_owned(),
    });
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(filter))
        .format(|out, record| {
            // The level, a tab, the message: Router puts it in its form.
            write!(out, "{}\t{}", record.level().as_str(), record.args())
        })
        .target(env_logger::Target::Pipe(Box::new(Router)))
        .init();
}

/// The daemon is about to lose its terminal: unless `log=stderr` was
/// chosen, lines go to syslog from now on. Where there is no syslog it
/// says so on stderr while that is still the user's.
pub fn detaching() {
    let mut setup = setup();
    let Some(setup) = setup.as_mut() else {
        return;
    };
    if setup.chosen.is_some() || matches!(setup.route, Route::Syslog(_)) {
        return;
    }
    match Syslog::connect(&setup.socket) {
        Ok(syslog) => setup.route = Route::Syslog(syslog),
        Err(err) => eprintln!(
            "netstatfs: warning: no syslog at {} ({err}): the daemon's log lines are lost \
             once it detaches (-f -o log=stderr keeps them on stderr)",
            setup.socket.display()
        ),
    }
}

/// Takes each formatted record (level, tab, message) and says it where
/// lines go now.
struct Router;

impl Write for Router {
    fn write(&mut self, record: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(record);
        let (level, message) = text.split_once('\t').unwrap_or(("INFO", &text));
        let mut setup = setup();
        match setup.as_mut().map(|setup| &mut setup.route) {
            Some(Route::Syslog(syslog)) => syslog.send(level, message),
            _ => eprintln!("netstatfs: {}: {message}", level.to_ascii_lowercase()),
        }
        Ok(record.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A connection to the syslog socket.
struct Syslog {
    path: PathBuf,
    socket: UnixDatagram,
    pid: u32,
}

impl Syslog {
    fn connect(path: &Path) -> std::io::Result<Syslog> {
        let socket = UnixDatagram::unbound()?;
        socket.connect(path)?;
        Ok(Syslog {
            path: path.to_owned(),
            socket,
            pid: std::process::id(),
        })
    }

    /// Sends one line; reconnects once if syslog was restarted. A line
    /// that still cannot be sent is lost: there is nowhere else to say so.
    fn send(&mut self, level: &str, message: &str) {
        let line = syslog_line(level, message, self.pid, &local_timestamp());
        if self.socket.send(line.as_bytes()).is_err() {
            if let Ok(again) = Syslog::connect(&self.path) {
                *self = again;
                let _ = self.socket.send(line.as_bytes());
            }
        }
    }
}

/// One syslog datagram, as glibc's syslog(3) writes it (RFC 3164):
/// `<priority>timestamp netstatfs[pid]: message`, facility daemon.
fn syslog_line(level: &str, message: &str, pid: u32, timestamp: &str) -> String {
    const FACILITY_DAEMON: u8 = 3;
    let severity = match level {
        "ERROR" => 3,
        "WARN" => 4,
        "INFO" => 6,
        _ => 7,
    };
    let priority = FACILITY_DAEMON * 8 + severity;
    format!("<{priority}>{timestamp} netstatfs[{pid}]: {message}")
}

/// Now, as syslog writes it: "Dec  5 07:04:09", local time.
fn local_timestamp() -> String {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_secs());
    let seconds = nix::libc::time_t::try_from(now).unwrap_or(0);
    // SAFETY: localtime_r writes only into `tm`, which it is given.
    let mut tm: nix::libc::tm = unsafe { std::mem::zeroed() };
    let converted = unsafe { !nix::libc::localtime_r(&seconds, &mut tm).is_null() };
    if !converted {
        return String::new();
    }
    let month = usize::try_from(tm.tm_mon)
        .ok()
        .and_then(|month| MONTHS.get(month))
        .unwrap_or(&"Jan");
    format!(
        "{month} {:>2} {:02}:{:02}:{:02}",
        tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec
    )
}

#[cfg(test)]
mod tests {
    use super::syslog_line;

    #[test]
    fn lines_are_what_syslog_3_sends() {
        assert_eq!(
            syslog_line("WARN", "m: tracefs is not readable", 42, "Dec  5 07:04:09"),
            "<28>Dec  5 07:04:09 netstatfs[42]: m: tracefs is not readable"
        );
        assert!(syslog_line("ERROR", "x", 1, "t").starts_with("<27>"));
        assert!(syslog_line("INFO", "x", 1, "t").starts_with("<30>"));
        assert!(syslog_line("DEBUG", "x", 1, "t").starts_with("<31>"));
    }
}
