//! The repair kernel's brain, as a `#![no_std]` library: walkers over a
//! crashed Linux kernel's memory and the decision of what to do about it.
//!
//! The same code runs in two places: on the host (tests, the loader's
//! read-only `diagnose`) over any [`mem::PhysMem`], and inside the crashed
//! guest as the bare-metal unikernel (`repair-kernel/unikernel`), over the
//! guest's RAM mapped by page tables the loader built.
#![no_std]

pub mod contract;
pub mod layout;
