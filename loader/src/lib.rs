//! Attaches to a guest, traps its crashes, runs the repair kernel, resumes it.

pub mod access;
pub mod arch;
pub mod gdb;
pub mod memory;
pub mod qmp;
