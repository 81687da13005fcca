//! The perf edge: tracepoint events opened with `perf_event_open`, one
//! ring per CPU that every tracepoint of that CPU writes into, read without
//! system calls (the kernel's head, our tail, in shared memory).
//!
//! Only this module touches perf file descriptors and the mapped ring; what
//! a record says is parsed by [`parse_sample`] (pure) and decoded elsewhere.
//! Closing the descriptors (dropping a [`Ring`]) disables the tracepoints.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering, fence};

use perf_event_open_sys as sys;

/// Pages of ring per CPU (besides the header page): 1 MiB, some ten
/// thousand events, about 100 ms of `ab -c 10` on loopback (every send and
/// receive is an event) should the reader be kept off the CPU.
const RING_PAGES: usize = 256;
/// Bytes of events after which the kernel wakes a poll.
const WAKEUP_BYTES: u32 = 16 * 1024;

/// One CPU's ring and the events that write into it.
pub struct Ring {
    /// The first event's fd (which owns the mapping), then the others.
    fds: Vec<OwnedFd>,
    base: *mut u8,
    mapped: usize,
    page: usize,
    /// Reassembles a record that wraps around the ring's end.
    scratch: Vec<u8>,
}

// SAFETY: the mapping is only touched through `&mut self` (one thread at a
// time), and the kernel's side of it is designed for concurrent access.
unsafe impl Send for Ring {}

impl Ring {
    /// Opens every tracepoint in `ids` on `cpu`, system-wide, into one
    /// ring, each with its kernel filter if it has one (an ftrace filter
    /// expression: events it rejects never reach the ring), and enables
    /// them.
    pub fn open(cpu: i32, ids: &[(u64, Option<&str>)]) -> io::Result<Ring> {
        let page = rustix::param::page_size();
        let mut fds: Vec<OwnedFd> = Vec::with_capacity(ids.len());
        for &(id, filter) in ids {
            let fd = open_event(id, cpu)?;
            if let Some(filter) = filter {
                set_filter(&fd, filter)?;
            }
            fds.push(fd);
        }
        let first = fds.first().ok_or(io::ErrorKind::InvalidInput)?;
        let mapped = (1 + RING_PAGES) * page;
        // SAFETY: a fresh shared mapping of the perf fd, of the size the
        // perf ABI expects (one header page plus a power of two of pages).
        let base = unsafe {
            nix::libc::mmap(
                std::ptr::null_mut(),
                mapped,
                nix::libc::PROT_READ | nix::libc::PROT_WRITE,
                nix::libc::MAP_SHARED,
                first.as_raw_fd(),
                0,
            )
        };
        if base == nix::libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ring = Ring {
            fds,
            base: base.cast(),
            mapped,
            page,
            scratch: Vec::new(),
        };
        let first = ring.fds[0].as_raw_fd();
        for fd in &ring.fds[1..] {
            // SAFETY: both are perf fds of the same CPU.
            if unsafe { sys::ioctls::SET_OUTPUT(fd.as_raw_fd(), first) } != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        for fd in &ring.fds {
            // SAFETY: a perf fd; ENABLE takes no argument.
            if unsafe { sys::ioctls::ENABLE(fd.as_raw_fd(), 0) } != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(ring)
    }

    /// The fd to poll for data.
    pub fn poll_fd(&self) -> &OwnedFd {
        &self.fds[0]
    }

    /// The `index`th tracepoint's event, to change its filter through.
    pub fn event_fd(&self, index: usize) -> Option<&OwnedFd> {
        self.fds.get(index)
    }

    /// Hands every record in the ring to `each` (the record's bytes, header
    /// included), oldest first, and frees their room.
    pub fn drain(&mut self, mut each: impl FnMut(&[u8])) {
        let data = RING_PAGES * self.page;
        // SAFETY: the header page is mapped; data_head and data_tail are
        // naturally aligned u64s the kernel reads and writes concurrently.
        let (head_ptr, tail_ptr) = unsafe {
            let header = self.base.cast::<sys::bindings::perf_event_mmap_page>();
            (
                &*(std::ptr::addr_of!((*header).data_head).cast::<AtomicU64>()),
                &*(std::ptr::addr_of!((*header).data_tail).cast::<AtomicU64>()),
            )
        };
        let head = head_ptr.load(Ordering::Acquire);
        let mut tail = tail_ptr.load(Ordering::Relaxed);
        // SAFETY: the data area follows the header page.
        let ring = unsafe { std::slice::from_raw_parts(self.base.add(self.page), data) };
        while tail < head {
            let start = (tail % data as u64) as usize;
            let size = {
                let mut header = [0u8; 8];
                copy_wrapped(ring, start, &mut header);
                usize::from(u16::from_ne_bytes([header[6], header[7]]))
            };
            if size < 8 || size as u64 > head - tail {
                // Not a record: skip what is there rather than loop on it.
                break;
            }
            if start + size <= data {
                each(&ring[start..start + size]);
            } else {
                self.scratch.resize(size, 0);
                copy_wrapped(ring, start, &mut self.scratch);
                each(&self.scratch);
            }
            tail += size as u64;
        }
        fence(Ordering::Release);
        tail_ptr.store(head, Ordering::Release);
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `open`, not used after this.
        unsafe {
            nix::libc::munmap(self.base.cast(), self.mapped);
        }
    }
}

fn copy_wrapped(ring: &[u8], start: usize, out: &mut [u8]) {
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = ring[(start + i) % ring.len()];
    }
}

/// Opens tracepoint `id` on `cpu` with `filter`, writing into the ring
/// of `ring` (a ring's first event), and enables it: how a tracepoint's
/// filter is changed (the kernel takes a filter once per event).
pub fn open_into(id: u64, cpu: i32, filter: &str, ring: &OwnedFd) -> io::Result<OwnedFd> {
    let fd = open_event(id, cpu)?;
    set_filter(&fd, filter)?;
    // SAFETY: both are perf fds of the same CPU.
    if unsafe { sys::ioctls::SET_OUTPUT(fd.as_raw_fd(), ring.as_raw_fd()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a perf fd; ENABLE takes no argument.
    if unsafe { sys::ioctls::ENABLE(fd.as_raw_fd(), 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// Stops an event writing into its ring.
pub fn disable(fd: &OwnedFd) {
    // SAFETY: a perf fd; DISABLE takes no argument.
    unsafe {
        sys::ioctls::DISABLE(fd.as_raw_fd(), 0);
    }
}

/// Lets only the events matching `filter` (an ftrace filter expression)
/// into the ring.
pub fn set_filter(fd: &OwnedFd, filter: &str) -> io::Result<()> {
    let text = std::ffi::CString::new(filter).map_err(|_| io::ErrorKind::InvalidInput)?;
    // SAFETY: a perf fd and a NUL-terminated string the kernel only reads.
    if unsafe { sys::ioctls::SET_FILTER(fd.as_raw_fd(), text.as_ptr().cast_mut()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn open_event(id: u64, cpu: i32) -> io::Result<OwnedFd> {
    let mut attr = sys::bindings::perf_event_attr {
        type_: sys::bindings::PERF_TYPE_TRACEPOINT,
        size: std::mem::size_of::<sys::bindings::perf_event_attr>() as u32,
        config: id,
        sample_type: u64::from(
            sys::bindings::PERF_SAMPLE_TID
                | sys::bindings::PERF_SAMPLE_TIME
                | sys::bindings::PERF_SAMPLE_RAW,
        ),
        clockid: nix::libc::CLOCK_MONOTONIC,
        ..Default::default()
    };
    attr.__bindgen_anon_1.sample_period = 1;
    attr.__bindgen_anon_2.wakeup_watermark = WAKEUP_BYTES;
    attr.set_disabled(1);
    attr.set_watermark(1);
    attr.set_use_clockid(1);
    // SAFETY: a valid attr; pid -1 with a cpu is one CPU, system-wide.
    let fd = unsafe {
        sys::perf_event_open(
            &mut attr,
            -1,
            cpu,
            -1,
            sys::bindings::PERF_FLAG_FD_CLOEXEC as _,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// What a ring record holds.
#[derive(Debug, PartialEq, Eq)]
pub enum Record<'a> {
    /// One event: its process and thread, CLOCK_MONOTONIC time in ns, and
    /// the tracepoint's raw record.
    Sample {
        pid: u32,
        tid: u32,
        time: u64,
        raw: &'a [u8],
    },
    /// The ring overflowed: this many events were lost.
    Lost(u64),
    Other,
}

/// Parses one record (header included) of the layout `open_event` asks
/// for: PERF_SAMPLE_TID | TIME | RAW.
pub fn parse_record(record: &[u8]) -> Option<Record<'_>> {
    let kind = u32::from_ne_bytes(record.get(0..4)?.try_into().ok()?);
    let u32_at = |at: usize| Some(u32::from_ne_bytes(record.get(at..at + 4)?.try_into().ok()?));
    let u64_at = |at: usize| Some(u64::from_ne_bytes(record.get(at..at + 8)?.try_into().ok()?));
    match kind {
        sys::bindings::PERF_RECORD_SAMPLE => {
            let pid = u32_at(8)?;
            let tid = u32_at(12)?;
            let time = u64_at(16)?;
            let size = u32_at(24)? as usize;
            let raw = record.get(28..28usize.checked_add(size)?)?;
            Some(Record::Sample {
                pid,
                tid,
                time,
                raw,
            })
        }
        sys::bindings::PERF_RECORD_LOST => Some(Record::Lost(u64_at(16)?)),
        _ => Some(Record::Other),
    }
}

/// The CPUs that are online (/sys/devices/system/cpu/online: "0-3,5").
pub fn online_cpus() -> io::Result<Vec<i32>> {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/online")?;
    parse_cpu_list(text.trim())
        .ok_or_else(|| io::Error::other(format!("cannot read CPU list {text:?}")))
}

fn parse_cpu_list(text: &str) -> Option<Vec<i32>> {
    let mut cpus = Vec::new();
    for part in text.split(',').filter(|part| !part.is_empty()) {
        match part.split_once('-') {
            Some((first, last)) => cpus.extend(first.parse::<i32>().ok()?..=last.parse().ok()?),
            None => cpus.push(part.parse().ok()?),
        }
    }
    (!cpus.is_empty()).then_some(cpus)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(pid: u32, time: u64, raw: &[u8]) -> Vec<u8> {
        let mut record = Vec::new();
        record.extend_from_slice(&sys::bindings::PERF_RECORD_SAMPLE.to_ne_bytes());
        record.extend_from_slice(&0u16.to_ne_bytes());
        let size = (28 + raw.len()).next_multiple_of(8);
        record.extend_from_slice(&(size as u16).to_ne_bytes());
        record.extend_from_slice(&pid.to_ne_bytes());
        record.extend_from_slice(&(pid + 1).to_ne_bytes());
        record.extend_from_slice(&time.to_ne_bytes());
        record.extend_from_slice(&(raw.len() as u32).to_ne_bytes());
        record.extend_from_slice(raw);
        record.resize(size, 0);
        record
    }

    #[test]
    fn samples_and_losses_parse_and_garbage_does_not() {
        let record = sample(42, 123_456, b"raw bytes");
        assert_eq!(
            parse_record(&record),
            Some(Record::Sample {
                pid: 42,
                tid: 43,
                time: 123_456,
                raw: b"raw bytes"
            })
        );
        let mut lost = vec![0u8; 24];
        lost[0..4].copy_from_slice(&sys::bindings::PERF_RECORD_LOST.to_ne_bytes());
        lost[16..24].copy_from_slice(&7u64.to_ne_bytes());
        assert_eq!(parse_record(&lost), Some(Record::Lost(7)));
        for cut in [0, 3, 10, 27, 30] {
            assert_eq!(parse_record(&record[..cut]), None, "cut at {cut}");
        }
        let mut lying = record.clone();
        lying[24..28].copy_from_slice(&u32::MAX.to_ne_bytes());
        assert_eq!(parse_record(&lying), None);
    }

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0-1"), Some(vec![0, 1]));
        assert_eq!(parse_cpu_list("0,2-3,7"), Some(vec![0, 2, 3, 7]));
        assert_eq!(parse_cpu_list(""), None);
        assert_eq!(parse_cpu_list("x"), None);
        assert!(!online_cpus().unwrap().is_empty());
    }

    #[test]
    fn a_record_across_the_end_reads_whole() {
        let ring = [5u8, 6, 7, 1, 2, 3, 4];
        let mut out = [0u8; 5];
        copy_wrapped(&ring, 3, &mut out);
        assert_eq!(out, [1, 2, 3, 4, 5]);
    }
}
