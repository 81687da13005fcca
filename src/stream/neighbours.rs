//! An unconnected socket's stream leaves out what more specific sockets of
//! its namespace take (see [`crate::capture::filter::taken_from`]), and
//! knows which sockets share its port and address (its rivals, see
//! [`crate::capture::filter::rivals_of`], for [`super::shared_port`]).
//! Those sockets come and go while the stream runs, so the stream looks at
//! its namespace's socket table again every [`RECHECK`] and changes its
//! capture's filter when what they take changed.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use log::debug;

use super::lock;
use crate::capture::filter::{
    FilterTarget, LocalNetwork, Taken, bpf_filter_for, rivals_of, taken_from, without_taken,
};
use crate::inventory::tables::{read_table, read_table_in_state};
use crate::names::Proto;

/// How often the namespace's table is read again.
const RECHECK: Duration = Duration::from_secs(1);
/// The kernel's state number of a listening TCP socket.
const TCP_LISTEN: u8 = 10;

pub struct Neighbours {
    target: FilterTarget,
    inode: u64,
    /// `/proc/<pid>` of the socket's process: its `net/` shows the
    /// socket's namespace.
    proc_pid: PathBuf,
    state: Mutex<State>,
}

struct State {
    taken: Vec<Taken>,
    rivals: Vec<u64>,
    /// The namespace's own addresses, once the capture has opened there.
    locals: Option<Vec<LocalNetwork>>,
    checked: Instant,
}

impl Neighbours {
    /// For an unconnected TCP or UDP socket: what the other sockets of its
    /// namespace take now. None for a socket that needs no such care.
    pub fn look(target: FilterTarget, inode: u64, pid: i32) -> Option<Neighbours> {
        let neighbours = Neighbours {
            target,
            inode,
            proc_pid: PathBuf::from(format!("/proc/{pid}")),
            state: Mutex::new(State {
                taken: Vec::new(),
                rivals: Vec::new(),
                locals: None,
                checked: Instant::now(),
            }),
        };
        let (taken, rivals) = neighbours.read()?;
        let mut state = lock(&neighbours.state);
        state.taken = taken;
        state.rivals = rivals;
        drop(state);
        Some(neighbours)
    }

    /// What is left out of the capture's filter now.
    pub fn taken(&self) -> Vec<Taken> {
        lock(&self.state).taken.clone()
    }

    /// The sockets sharing the socket's port and address now.
    pub fn rivals(&self) -> Vec<u64> {
        lock(&self.state).rivals.clone()
    }

    /// The capture opened, in a namespace with these addresses.
    pub fn opened(&self, locals: Vec<LocalNetwork>) {
        lock(&self.state).locals = Some(locals);
    }

    /// What changed since the last look (at most every [`RECHECK`]): a new
    /// filter for the capture, when what the other sockets take changed,
    /// and the rivals, when they changed.
    pub fn refresh(&self, label: &str) -> Refreshed {
        let mut refreshed = Refreshed::default();
        {
            let mut state = lock(&self.state);
            if state.checked.elapsed() < RECHECK || state.locals.is_none() {
                return refreshed;
            }
            state.checked = Instant::now();
        }
        let Some((taken, rivals)) = self.read() else {
            return refreshed;
        };
        let mut state = lock(&self.state);
        if rivals != state.rivals {
            debug!("{label}: {} sockets share its port", rivals.len());
            state.rivals = rivals.clone();
            refreshed.rivals = Some(rivals);
        }
        if taken != state.taken {
            state.taken = taken;
            let base = bpf_filter_for(&self.target, state.locals.as_deref().unwrap_or_default());
            if let Ok(base) = base {
                debug!(
                    "{label}: {} flows of more specific sockets left out",
                    state.taken.len()
                );
                refreshed.filter = Some(without_taken(base, &state.taken));
            }
        }
        refreshed
    }

    /// The namespace's sockets of the target's transport, both families:
    /// what they take, and which share the socket's port; None where the
    /// socket needs no such care or the table is gone.
    fn read(&self) -> Option<(Vec<Taken>, Vec<u64>)> {
        let protos = match self.target.proto {
            Proto::Tcp | Proto::Tcp6 => [Proto::Tcp, Proto::Tcp6],
            Proto::Udp | Proto::Udp6 => [Proto::Udp, Proto::Udp6],
            _ => return None,
        };
        if crate::capture::filter::is_connected(self.target.remote) {
            return None;
        }
        let mut rows: Vec<(SocketAddr, SocketAddr, bool, u64)> = Vec::new();
        for proto in protos {
            // Of TCP sockets only listeners take flows from a wildcard one:
            // the rest of the table (thousands of TIME_WAIT rows after a
            // burst) is never parsed.
            let table = match proto {
                Proto::Tcp | Proto::Tcp6 => read_table_in_state(&self.proc_pid, proto, TCP_LISTEN),
                _ => read_table(&self.proc_pid, proto),
            }
            .ok()?;
            rows.extend(table.rows.into_iter().map(|row| {
                let listening =
                    matches!(proto, Proto::Tcp | Proto::Tcp6) && row.state == TCP_LISTEN;
                (row.local, row.remote, listening, row.inode)
            }));
        }
        Some((
            taken_from(&self.target, self.inode, rows.iter().copied()),
            rivals_of(&self.target, self.inode, rows),
        ))
    }
}

/// What [`Neighbours::refresh`] found changed.
#[derive(Debug, Default)]
pub struct Refreshed {
    pub filter: Option<String>,
    pub rivals: Option<Vec<u64>>,
}
