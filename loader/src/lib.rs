//! The library a VMM or a tool embeds to repair a crashed Linux guest:
//! attach to it, trap its crashes, run the repair kernel inside it, resume
//! it. The `repair-guest` program (`loader/cli`) is built on it; see
//! `loader/DESIGN.md` for the data flow.
//!
//! - [`access`]: the guest-access trait every backend implements, and the
//!   address types (`Gpa`, `Gva`, `VcpuId`).
//! - [`backend`]: the backends, one folder each: [`gdb`] (QEMU's gdbstub),
//!   [`qmp`] (QEMU's monitor), [`kvm`] (in-process KVM, with
//!   `kvm::Repairer` for a rust-vmm VMM), [`ram`] (guest RAM from a file).
//! - [`attach`]: one way to attach to a QEMU guest: backend, RAM map, name
//!   and the run state found, resolved in one place.
//! - [`flow`]: the repair flow, written once over the trait: attach
//!   ([`kaslr`]: the slide and the build check), arm, repair, resume.
//! - [`guestmem`]: a guest seen through the repair kernel's memory trait,
//!   so its walkers run on the host too.
//! - [`watch`]: the one watch loop: crashes, hangs, someone else's pauses,
//!   resets; [`supervise`]: the parent that restarts a dead watcher or
//!   removes its trap.
//! - [`libvirt`]: a libvirt domain reached through libvirt alone (its QMP
//!   served from libvirt's passthrough and events).
//! - [`journal`]: each repair written down before it touches the guest, so a
//!   watcher killed mid-repair is undone by the next one.
//! - [`hang`]: hang detection from outside, without stopping the guest.
//! - [`report`]: the read-only diagnosis of a stopped guest;
//!   [`symbolize`]: names for backtrace frames from a vmlinux.
//! - [`snapshot`]: the healthy snapshot of kernel text and rodata.
//! - [`replay`]: a crash dump replayed under in-process KVM.
//! - [`arch`]: x86_64 register layouts.
//! - `testing` (feature `testing`): an in-memory guest for tests.
//!
//! Features: `qemu` (default) builds the QEMU backends and what runs on
//! them (`gdb`, `qmp`, `attach`, `watch`, `supervise`); a VMM that embeds
//! [`kvm::Repairer`] builds with `default-features = false`.
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
#[cfg(feature = "qemu")]
pub mod attach;
pub mod autoimage;
pub mod backend;
#[cfg(feature = "qemu")]
pub mod checkpoint;
#[cfg(feature = "qemu")]
pub mod cpr;
pub mod flow;
pub mod guestmem;
pub mod hang;
pub mod journal;
pub mod kaslr;
#[cfg(feature = "qemu")]
pub mod libvirt;
pub mod quarantine;
pub mod orc;
pub mod replay;
pub mod report;
pub mod snapshot;
#[cfg(feature = "qemu")]
pub mod supervise;
pub mod symbolize;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
#[cfg(feature = "qemu")]
pub mod watch;

#[cfg(feature = "qemu")]
pub use backend::{gdb, qmp};
pub use backend::{kvm, ram};
