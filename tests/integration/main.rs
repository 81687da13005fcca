//! Tests through a real mount: the built binary mounts a scratch directory,
//! peer processes hold sockets and make loopback traffic, and the tests
//! look with the tools a user would (ls, stat, getfattr, tcpdump, tshark).
//!
//! Needs root and /dev/fuse (as the README's test command provides).

mod common;

mod access;
mod attribution;
mod capture;
mod containers;
mod diagnostics;
mod exactness;
mod extcap;
mod lifecycle;
mod package;
mod process_stream;
mod tree;
mod unix;

/// Not a test: the entry point of peer processes (see `common::peer`).
#[test]
fn peer_process() {
    common::peer::serve_if_peer();
}
