//! Capturing packets: which ([`filter`], pure: socket → BPF text), whose
//! ([`classify`], pure: packet → the process's socket it belongs to) and how
//! ([`source`]: a libpcap handle opened in the socket's network namespace;
//! [`service`]: the few daemon threads that open, read and close every
//! capture; [`growth`]: no ring or a small one first, the full one once
//! packets come; [`queue`]: the ringless first capture). Knows nothing of FUSE or of the stream format.

pub mod classify;
pub mod filter;
pub mod growth;
pub mod queue;
pub mod service;
pub mod source;
