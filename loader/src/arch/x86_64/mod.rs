//! x86_64: the gdbstub register file.
pub mod regs;
