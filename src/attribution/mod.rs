//! Who owns a flow, and which socket a datagram went to: what the kernel's
//! events ([`crate::events`]) mean for packets, between the events and the
//! streams that sort packets by it ([`crate::stream::process`], and the
//! socket files of ports several sockets share).
//!
//! - [`owners`] (pure): which process routed, connected, read, wrote or
//!   closed each flow, as the kernel saw it happen ([`FlowOwners`]).
//! - [`deliveries`] (pure): which socket, by its kernel address, a UDP
//!   datagram was queued to or sent from, and which socket (inode) has
//!   which kernel address ([`Deliveries`]).
//! - [`bystanders`] (pure): the busy threads of processes no stream
//!   watches, whose UDP events the kernel is asked to leave out.
//! - [`probe`]: the one system call this needs of its own: asking a socket
//!   its kernel address (a peek through a copy of its fd that takes
//!   nothing, whose own event names the address).
//! - [`KernelEvents`]: the daemon's one events reader, started for the
//!   first [`Subscription`] and stopped with the last, feeding both.
//!
//! Nothing here knows of FUSE, captures or streams.

pub mod bystanders;
pub mod deliveries;
mod live;
pub mod owners;
pub mod probe;

pub use deliveries::{Deliveries, Delivery};
pub use live::{KernelEvents, Subscription, Watcher};
pub use owners::{Claimant, FlowOwners, SKEW};
