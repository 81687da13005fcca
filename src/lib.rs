//! netstatfs: the machine's network connections as a file system.
//!
//! ```text
//! m/<pid>_<comm>/<proto>_<local>_<remote>   one file per inet socket
//! ```
//!
//! Reading a socket file streams that socket's live traffic as pcap.
//!
//! Data flows one way: /proc → [`inventory::Snapshot`] → [`fs::tree::Tree`]
//! for listings; open → [`capture`] → [`stream`] → read reply for traffic.
//! The pure parts ([`names`], [`capture::filter`], [`stream::pcap`]) know
//! nothing of FUSE, /proc or pcap handles; the edges are tested through a
//! real mount.

pub mod attribution;
pub mod capture;
pub mod cli;
pub mod daemon;
pub mod events;
pub mod extcap;
pub mod fs;
pub mod inventory;
pub mod logging;
pub mod memory;
pub mod names;
pub mod privileges;
pub mod stream;
