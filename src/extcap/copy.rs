//! `--capture`: copies a stream of the mount to Wireshark's FIFO, record by
//! record, through the capture filter.
//!
//! Three things end a capture, each cleanly (exit 0, the FIFO holding
//! whole records only): SIGTERM or SIGINT (how Wireshark and a terminal
//! stop it), the stream's end (the process exited and its stream drained),
//! and the FIFO's reader going away (dumpcap stopped).
//!
//! The stream is read on a thread of its own, since a read of a quiet
//! stream blocks until a packet comes; the main thread waits on that
//! thread's chunks with a timeout, so it notices a signal or a vanished
//! reader within [`TICK`]. The reading thread ends at the stream's end or
//! when the main thread is gone; a read blocked on a quiet stream ends with
//! the process, which exits as soon as the main thread returns.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crossbeam_channel::RecvTimeoutError;

use super::Failure;
use super::records::RecordSplitter;

/// How often the copy looks at signals and the FIFO's reader when no data
/// comes.
const TICK: Duration = Duration::from_millis(100);

/// How long a failing capture waits for Wireshark to open the FIFO.
const RELEASE_WAIT: Duration = Duration::from_secs(3);

/// One read's worth: what a stream hands out per FUSE read at most.
const READ_SIZE: usize = 1 << 20;

pub struct Job {
    /// `<mount>/<pid>_<comm>/<stream>`.
    pub stream: PathBuf,
    pub fifo: PathBuf,
    pub filter: Option<String>,
    /// The mount's link type, to check the filter before any packet comes.
    pub linktype: u32,
}

/// A capture filter compiled for one link type, or libpcap's message.
pub fn compile(filter: &str, linktype: u32) -> Result<pcap::BpfProgram, String> {
    let dead = pcap::Capture::dead(pcap::Linktype(linktype as i32))
        .map_err(|err| format!("libpcap cannot compile for link type {linktype}: {err}"))?;
    dead.compile(filter, true).map_err(|err| err.to_string())
}

pub fn run(job: &Job) -> Result<(), Failure> {
    let mut filters = Filters::new(job.filter.as_deref(), job.linktype)?;
    let stream = open_stream(job)?;
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, Arc::clone(&stop))
            .map_err(|err| Failure(format!("cannot handle signal {signal}: {err}")))?;
    }
    let Some(mut fifo) = open_fifo(job, &stop)? else {
        return Ok(());
    };
    let chunks = read_on_a_thread(stream)?;
    let mut splitter = RecordSplitter::default();
    let mut whole = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        match chunks.recv_timeout(TICK) {
            Ok(Ok(chunk)) => {
                whole.clear();
                let mut failed = None;
                splitter
                    .feed(&chunk, &mut whole, |linktype, packet| {
                        filters.keeps(linktype, packet).unwrap_or_else(|message| {
                            failed.get_or_insert(message);
                            false
                        })
                    })
                    .map_err(|err| {
                        Failure(format!("{} is not a capture: {err}", job.stream.display()))
                    })?;
                if let Some(message) = failed {
                    return Err(Failure(message));
                }
                match fifo.write_all(&whole) {
                    Ok(()) => {}
                    Err(err) if err.kind() == ErrorKind::BrokenPipe => return Ok(()),
                    Err(err) => {
                        return Err(Failure(format!(
                            "cannot write to {}: {err}",
                            job.fifo.display()
                        )));
                    }
                }
            }
            Ok(Err(err)) => {
                return Err(Failure(format!(
                    "reading {} failed: {err}",
                    job.stream.display()
                )));
            }
            // The stream ended: everything it held was written.
            Err(RecvTimeoutError::Disconnected) => return Ok(()),
            Err(RecvTimeoutError::Timeout) if reader_gone(&fifo) => return Ok(()),
            Err(RecvTimeoutError::Timeout) => {}
        }
    }
    Ok(())
}

fn open_stream(job: &Job) -> Result<File, Failure> {
    File::open(&job.stream).map_err(|err| {
        let path = job.stream.display();
        Failure(match err.kind() {
            ErrorKind::NotFound => format!(
                "{path} does not exist: the socket closed or the process exited \
                 (reload the interface's options)"
            ),
            ErrorKind::PermissionDenied => format!(
                "{path}: permission denied: the stream is another user's \
                 (capture as that user, or as root)"
            ),
            _ => format!("cannot open {path}: {err}"),
        })
    })
}

/// Opens the FIFO for writing without blocking on a reader that never
/// comes: retries while no reader has it open, until a stop signal.
fn open_fifo(job: &Job, stop: &AtomicBool) -> Result<Option<File>, Failure> {
    loop {
        if stop.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let opened = OpenOptions::new()
            .write(true)
            .custom_flags(nix::libc::O_NONBLOCK)
            .open(&job.fifo);
        match opened {
            Ok(fifo) => {
                // Writes block again: a slow reader slows the copy rather
                // than losing a record halfway.
                let flags = rustix::fs::fcntl_getfl(&fifo)
                    .map_err(|err| Failure(format!("fcntl on the FIFO: {err}")))?;
                rustix::fs::fcntl_setfl(&fifo, flags - rustix::fs::OFlags::NONBLOCK)
                    .map_err(|err| Failure(format!("fcntl on the FIFO: {err}")))?;
                return Ok(Some(fifo));
            }
            // ENXIO: no reader yet.
            Err(err) if err.raw_os_error() == Some(nix::libc::ENXIO) => std::thread::sleep(TICK),
            Err(err) => {
                return Err(Failure(format!(
                    "cannot open {}: {err}",
                    job.fifo.display()
                )));
            }
        }
    }
}

/// Lets a reader blocked opening the FIFO go, on a capture that fails
/// before it began: dumpcap waits in open(2) for a writer, and only sees
/// the end of the data (and tshark the extcap's message) once one came.
/// dumpcap may not have opened the FIFO yet: a writer that came and went
/// before it would leave it blocked, so this waits for it a while.
pub fn release_reader(fifo: &std::path::Path) {
    let deadline = std::time::Instant::now() + RELEASE_WAIT;
    loop {
        let opened = OpenOptions::new()
            .write(true)
            .custom_flags(nix::libc::O_NONBLOCK)
            .open(fifo);
        match opened {
            // ENXIO: no reader yet.
            Err(err)
                if err.raw_os_error() == Some(nix::libc::ENXIO)
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            // Opened (and closed at once: the reader sees the end), or no
            // FIFO there, or no reader within the wait.
            _ => return,
        }
    }
}

/// The FIFO's read end is closed (poll says POLLERR on the write end).
fn reader_gone(fifo: &File) -> bool {
    let mut fds = [rustix::event::PollFd::new(
        fifo,
        rustix::event::PollFlags::empty(),
    )];
    let zero = rustix::event::Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    matches!(rustix::event::poll(&mut fds, Some(&zero)), Ok(n) if n > 0)
        && fds[0]
            .revents()
            .intersects(rustix::event::PollFlags::ERR | rustix::event::PollFlags::HUP)
}

type Chunks = crossbeam_channel::Receiver<std::io::Result<Vec<u8>>>;

fn read_on_a_thread(mut stream: File) -> Result<Chunks, Failure> {
    let (sender, receiver) = crossbeam_channel::bounded(8);
    std::thread::Builder::new()
        .name("extcap-read".into())
        .spawn(move || {
            let mut buffer = vec![0u8; READ_SIZE];
            loop {
                let chunk = match stream.read(&mut buffer) {
                    Ok(0) => return,
                    Ok(length) => Ok(buffer[..length].to_vec()),
                    Err(err) if err.kind() == ErrorKind::Interrupted => continue,
                    Err(err) => Err(err),
                };
                let failed = chunk.is_err();
                if sender.send(chunk).is_err() || failed {
                    return;
                }
            }
        })
        .map_err(|err| Failure(format!("cannot start a thread: {err}")))?;
    Ok(receiver)
}

/// The capture filter, compiled once per link type met.
struct Filters {
    text: Option<String>,
    compiled: HashMap<u16, pcap::BpfProgram>,
}

impl Filters {
    /// Checks the filter for the mount's link type at once, so a typo is
    /// told before any packet comes.
    fn new(text: Option<&str>, linktype: u32) -> Result<Filters, Failure> {
        let mut filters = Filters {
            text: text.map(str::to_owned),
            compiled: HashMap::new(),
        };
        if let Some(text) = text {
            let program = compile(text, linktype).map_err(|message| {
                Failure(format!("invalid capture filter {text:?}: {message}"))
            })?;
            if let Ok(linktype) = u16::try_from(linktype) {
                filters.compiled.insert(linktype, program);
            }
        }
        Ok(filters)
    }

    fn keeps(&mut self, linktype: u16, packet: &[u8]) -> Result<bool, String> {
        let Some(text) = &self.text else {
            return Ok(true);
        };
        let program = match self.compiled.entry(linktype) {
            Entry::Occupied(entry) => entry.into_mut(),
            Entry::Vacant(entry) => entry.insert(
                compile(text, u32::from(linktype))
                    .map_err(|message| format!("invalid capture filter {text:?}: {message}"))?,
            ),
        };
        Ok(program.filter(packet))
    }
}
