//! Attaches to a guest, traps its crashes, runs the repair kernel inside it,
//! resumes it.
//!
//! - [`access`]: the guest-access trait every backend implements; [`gdb`]
//!   (QEMU's gdbstub), [`qmp`], [`memory`] (in-memory guest, RAM file).
//! - [`flow`]: the repair flow, written once over the trait: attach
//!   ([`kaslr`], image check, staging plan), arm, repair, resume.
//! - [`watch`]: the event loop of `repair-guest watch`; [`report`]: the
//!   read-only `diagnose`; [`symbolize`]: names for backtrace frames.
//!
//! ```no_run
//! use loader::{access::GuestAccess, flow::{FlowConfig, Mode, Session}, gdb::GdbGuest};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mut guest = GdbGuest::connect("unix:/tmp/gdb.sock".parse()?)?;
//! let image = builder::RepairImage::read("guest.img".as_ref())?;
//! let mut session = Session::attach(&mut guest, image, FlowConfig::default())?;
//! session.arm(&mut guest)?;
//! guest.resume()?;
//! if let Some(stop) = guest.wait_stop(None)? {
//!     let outcome = session.repair(&mut guest, stop.vcpu, Mode::Repair)?;
//!     println!("{}: {}", outcome.comm(), outcome.reason());
//!     guest.resume()?;
//! }
//! # Ok(()) }
//! ```

pub mod access;
pub mod arch;
pub mod campaign;
pub mod demo;
pub mod flow;
pub mod gdb;
pub mod guestmem;
pub mod hang;
pub mod kaslr;
pub mod memory;
pub mod qmp;
pub mod report;
pub mod snapshot;
pub mod supervise;
pub mod symbolize;
pub mod watch;
pub mod kvm;
pub mod replay;
