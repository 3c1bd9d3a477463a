//! In-process KVM: a [`GuestAccess`](crate::access::GuestAccess) backend over
//! `kvm-ioctls`, for VMMs that hold their guests' memory and vCPU fds
//! (Firecracker, Cloud Hypervisor and their kin) and for crash replay
//! ([`crate::replay`]).
//!
//! - [`memory`]: guest memory as host mappings ([`GuestMemory`]), owned
//!   ([`OwnedMmap`], unmapped on drop) or lent by the VMM.
//! - [`vcpu`]: one vCPU: registers, special registers, MSRs, FPU/XSAVE,
//!   saved and restored as a [`VcpuSnapshot`]; hardware breakpoints through
//!   `KVM_SET_GUEST_DEBUG`; `KVM_RUN` with a deadline.
//! - [`guest`]: [`KvmGuest`], the backend. The repair kernel is staged in an
//!   extra memory slot above guest RAM ([`StagingSlot`]): no guest page is
//!   borrowed.
//! - [`embed`]: [`Repairer`], the embedding API: hand it the VM, its memory and
//!   its vCPUs, arm it, and call it on a `KVM_EXIT_DEBUG` at `panic`.
//! - [`caps`]: what this host's KVM supports, probed once ([`Caps`]).
//!
//! Completion of a run is the repair kernel's `out 0x501` (a `KVM_EXIT_IO`)
//! followed by the `hlt` at `repair_done` (a `KVM_EXIT_HLT`: no in-kernel
//! irqchip is needed), or the hardware breakpoint at `repair_done` where
//! the host has `KVM_CAP_SET_GUEST_DEBUG`, whichever comes first.
//!
//! A VMM that runs each vCPU on its own thread takes them out of the guest
//! ([`KvmGuest::take_vcpu`]) after arming and hands the trapped one back
//! ([`KvmGuest::put_vcpu`]) before [`Repairer::on_trap`].
//!
//! ## Staging and `ram_end`
//! `builder::StagePlan` identity-maps `[0, ram_end)` and wants its range
//! inside it, so the flow is given `ram_end` = the end of the staging slot
//! (2 MiB above the highest guest memory region by default; right above RAM,
//! [`StagingSlot::above_ram`], for replay, whose VM has no devices). The
//! repair kernel's walkers may then read the slot (and any gap below it) as
//! RAM; harmless, reads of a gap return nothing a walker trusts.
//!
//! ## This machine's KVM (measured)
//! `/dev/kvm` here is PVM (software virtualization). It has every
//! capability used (API 12, `SET_GUEST_DEBUG`, `KVMCLOCK_CTRL`, `XSAVE`,
//! `XCRS`, `DEBUGREGS`, `IMMEDIATE_EXIT`, 32764 slots), but: it ignores
//! `RFLAGS.RF` on a `KVM_SET_GUEST_DEBUG` breakpoint (so the backend steps
//! over a breakpoint by single step, as QEMU's gdbstub does); it cannot
//! emulate `cmpxchg16b %gs:(...)` (SLUB's per-CPU fast path), so a
//! resumed Linux guest stops with `KVM_EXIT_INTERNAL_ERROR` (emulation)
//! soon after the repair, in `kmem_cache_free` on the exit path; and the
//! repair kernel runs about 10x slower than under QEMU TCG (tens of ms
//! instead of a few), with ~0.3 ms of fixed cost per run.
//!
//! ```no_run
//! use loader::kvm::{Repairer, KvmGuest};
//! // `guest`: the VMM's memory regions and vCPU fds, as a KvmGuest.
//! fn embed(guest: KvmGuest) -> Result<(), Box<dyn std::error::Error>> {
//! let image = builder::RepairImage::read("guest.img".as_ref())?;
//! let mut repairer = Repairer::new(guest, image, Default::default())?;
//! repairer.arm()?;
//! // In the VMM's vCPU loop, on VcpuExit::Debug:
//! // if repairer.is_trap(&debug) { let outcome = repairer.on_trap(vcpu, Mode::Repair)?; }
//! Ok(())
//! }
//! ```

pub mod caps;
pub mod embed;
pub mod guest;
pub mod memory;
pub mod vcpu;

pub use caps::Caps;
pub use embed::{EmbedConfig, Repairer};
pub use guest::{KvmGuest, StagingSlot};
pub use memory::{GuestMemory, OwnedMmap, Region};
pub use vcpu::{KvmVcpu, VcpuSnapshot};

use crate::access::AccessError;

/// Errors of the KVM backend. Each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    #[error("cannot open /dev/kvm: {0}; load the kvm module and give this user access to /dev/kvm (or set CRASH_REPAIR_SKIP_KVM=1 to skip the KVM tests)")]
    Open(#[source] kvm_ioctls::Error),
    #[error("KVM ioctl {what} failed: {source}")]
    Ioctl {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("mmap of {len:#x} bytes failed: {source}")]
    Mmap {
        len: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("this host's KVM lacks {cap}: {consequence}")]
    MissingCap { cap: &'static str, consequence: &'static str },
    #[error("guest memory regions overlap or are malformed: {0}")]
    BadRegions(String),
    #[error("{0}")]
    Other(String),
}

impl KvmError {
    pub(crate) fn ioctl(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> KvmError {
        move |source| KvmError::Ioctl { what, source }
    }
}

impl From<KvmError> for AccessError {
    fn from(e: KvmError) -> Self {
        match e {
            KvmError::MissingCap { cap, consequence } => {
                AccessError::Unsupported(format!("{cap} (this host's KVM lacks it: {consequence})"))
            }
            other => AccessError::Other(other.to_string()),
        }
    }
}

/// Opens `/dev/kvm`, or explains how to get it.
pub fn open() -> Result<kvm_ioctls::Kvm, KvmError> {
    kvm_ioctls::Kvm::new().map_err(KvmError::Open)
}

/// For KVM tests: `Ok(None)` when `/dev/kvm` works; `Ok(Some(why))` when it
/// does not and `CRASH_REPAIR_SKIP_KVM=1` asks to skip (the caller prints
/// `why` and returns); an error (the test fails) otherwise.
pub fn skip_reason() -> Result<Option<String>, KvmError> {
    match open() {
        Ok(_) => Ok(None),
        Err(e) if std::env::var("CRASH_REPAIR_SKIP_KVM").as_deref() == Ok("1") => {
            Ok(Some(format!("skipped (CRASH_REPAIR_SKIP_KVM=1): {e}")))
        }
        Err(e) => Err(e),
    }
}
