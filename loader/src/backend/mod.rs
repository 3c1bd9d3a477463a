//! The backends of [`GuestAccess`](crate::access::GuestAccess), one folder
//! each:
//! - [`gdb`]: QEMU's gdbstub (GDB remote serial protocol); with `qemu`.
//! - [`qmp`]: QEMU's machine protocol (run states, events, dumps); with `qemu`.
//! - [`kvm`]: an in-process KVM VM over `kvm-ioctls` (a rust-vmm VMM's own).
//! - [`ram`]: guest RAM from the host (QEMU's RAM file), beside any of them.
//! - [`procmem`]: guest RAM in QEMU's own process (`/proc/PID/mem`, or its
//!   shared RAM file through `/proc/PID/fd`), found through QMP; with `qemu`.

#[cfg(feature = "qemu")]
pub mod gdb;
pub mod kvm;
#[cfg(feature = "qemu")]
pub mod procmem;
#[cfg(feature = "qemu")]
pub mod qmp;
pub mod ram;
