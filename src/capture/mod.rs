//! Capturing one socket's packets: which packets ([`filter`], pure: socket
//! → BPF text) and how ([`source`]: a libpcap handle on its own thread, in
//! the socket's network namespace). Knows nothing of FUSE or of the stream
//! format.

pub mod filter;
pub mod source;
