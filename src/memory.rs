//! The daemon's memory, given back when streams close.
//!
//! A stream's queue holds chunks of up to a megabyte, and glibc, left to
//! itself, raises its mmap threshold each time such a chunk is freed, then
//! serves the next ones from its heap and keeps them after they are freed:
//! a thousand streams opened and closed left two gigabytes resident. So big
//! allocations are always their own mappings, returned to the system when
//! freed ([`configure`]), and once streams stop closing the rest of the
//! arenas' free memory is given back too ([`give_back`]).

/// Allocations this large or larger are mapped, and unmapped when freed.
#[cfg(target_env = "gnu")]
const MMAP_THRESHOLD: i32 = 128 * 1024;

/// Sets the allocator up (once, at start).
pub fn configure() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only changes glibc's tunables; called before the
    // daemon starts its threads.
    unsafe {
        nix::libc::mallopt(nix::libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
    }
}

/// Gives the memory freed since to the system.
pub fn give_back() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free memory; any thread may call it.
    unsafe {
        nix::libc::malloc_trim(0);
    }
}
