//! strata's clients for QEMU's control channels, for the VM manager:
//!
//! - [`qmp`]: the QMP monitor: typed commands and replies, buffered events
//!   waited for with a predicate and a timeout, job helpers;
//! - [`agent`]: the guest agent: sync, ping, exec, fsfreeze, file access;
//! - [`commands`]: the typed QMP commands;
//! - [`cmdline`]: QEMU command-line pieces (disks, agent port, QMP);
//! - [`accel`]: whether KVM is really usable, or TCG must be used;
//! - `testing` (feature `testing`): builds and boots the project's test guest.
//!
//! Both clients are blocking: a CLI that runs one operation per process needs
//! no async runtime. QMP has one reader thread per connection so events that
//! arrive while a command runs are kept; every wait has a deadline and ends as
//! soon as QEMU's socket closes.

pub mod accel;
pub mod agent;
pub mod cmdline;
pub mod commands;
mod error;
pub mod qmp;
#[cfg(feature = "testing")]
pub mod testing;
mod wire;

pub use agent::Agent;
pub use error::{Error, ErrorKind, Result};
pub use qmp::{Event, Qmp};
pub use wire::{Command, Empty};
