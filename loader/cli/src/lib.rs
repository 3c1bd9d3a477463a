//! The `repair-guest` program's library side: what the program does beyond
//! the `loader` library, shared by its binary, its tests and the examples.
//!
//! - [`kit`]: repair images of the guest kit's kernels, built once and cached.
//! - [`demo`]: the main job, a kit guest crashed and repaired live.
//! - [`campaign`]: the crash catalogue over every LKDTM type.
//! - [`hangs`]: the hang watch (sampler and policy) of `watch --hangs` and the campaign.
//! - [`replay`]: `repair-guest replay`, and a crash captured at the trap.
//! - [`render`]: `diagnose`'s report as text.
//! - [`libvirt`]: `--libvirt DOMAIN`, a guest reached through libvirt alone.
//! - [`daemon`]: `repair-guest daemon`, one watcher per opted-in guest of a host.
//! - [`restart`]: `restart-vmm`, a warm restart of QEMU (CPR).
//! - [`rollback`]: the checkpoint and rollback options of `watch`.

pub mod campaign;
pub mod daemon;
pub mod demo;
pub mod hangs;
pub mod kit;
pub mod libvirt;
pub mod render;
pub mod replay;
pub mod restart;
pub mod rollback;
