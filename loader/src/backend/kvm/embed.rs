//! The embedding API: a VMM that holds its guest's memory and vCPU fds
//! in-process hands them to a [`Repairer`], arms it, and calls it when a
//! vCPU exits with `KVM_EXIT_DEBUG` at `panic`. The repair kernel runs on
//! that vCPU, from an extra memory slot above guest RAM, and the vCPU comes
//! back either with the verdict applied (the offending task killed) or
//! exactly as it was.
//!
//! The VMM keeps its own run loop (see `examples/` for a minimal one):
//!
//! ```no_run
//! # use loader::kvm::{Repairer, KvmGuest};
//! # use loader::flow::Mode;
//! # use loader::access::VcpuId;
//! # fn f(mut r: Repairer) -> Result<(), Box<dyn std::error::Error>> {
//! r.arm()?;
//! loop {
//!     let exit = r.guest().vcpu_mut(VcpuId(0))?.fd.run()?;
//!     if let kvm_ioctls::VcpuExit::Debug(d) = exit {
//!         if r.is_trap(&d) {
//!             // Every other vCPU of the VMM must be stopped here.
//!             let outcome = r.on_trap(VcpuId(0), Mode::Repair)?;
//!             println!("{:?}: {}", outcome.action(), outcome.reason());
//!         }
//!     }
//! }
//! # }
//! ```

use super::guest::{KvmGuest, StagingSlot};
use crate::access::{AccessError, VcpuId};
use crate::flow::{FlowConfig, FlowError, Mode, Outcome, Session};
use builder::RepairImage;
use kvm_bindings::kvm_debug_exit_arch;
use std::time::Duration;

/// Where the staging slot goes and how long a run may take.
#[derive(Clone, Debug)]
pub struct EmbedConfig {
    /// The staging slot; `None`: 2 MiB above the highest guest memory
    /// region ([`StagingSlot::above`] its end), slot number
    /// `staging_slot_number`: never inside a gap between regions, where a
    /// VMM may have put device MMIO (a VMM that knows a free gap below 4
    /// GiB, e.g. right above RAM, passes it here: the repair kernel's
    /// identity map of guest RAM stops at 4 GiB, its window does not).
    pub staging: Option<StagingSlot>,
    /// KVM slot number for the default staging slot (must be free).
    pub staging_slot_number: u32,
    /// The repair kernel runs about 1000x slower under software
    /// virtualization (PVM) than on hardware: be generous.
    pub run_timeout: Duration,
    pub max_tasks: u32,
}

impl Default for EmbedConfig {
    fn default() -> Self {
        Self { staging: None, staging_slot_number: 31, run_timeout: Duration::from_secs(60), max_tasks: 32768 }
    }
}

/// A guest with the repair kernel staged and its crash trap ready.
#[derive(Debug)]
pub struct Repairer {
    guest: KvmGuest,
    session: Session,
}

impl Repairer {
    /// Adds the staging slot (unless the guest has one), finds the KASLR
    /// slide, checks the image against the guest's kernel, plans the
    /// staging. The guest must be stopped (no vCPU in `KVM_RUN`).
    ///
    /// The staging plan identity-maps guest-physical `[0, ram_end)` and
    /// needs its range inside that, so the flow is given `ram_end` = the
    /// staging slot's end: the repair kernel may then read the slot as if it
    /// were RAM, which is harmless (it is its own memory).
    pub fn new(mut guest: KvmGuest, image: RepairImage, cfg: EmbedConfig) -> Result<Repairer, FlowError> {
        let st = match guest.staging() {
            Some(s) => s,
            None => {
                let s = cfg.staging.unwrap_or_else(|| StagingSlot::above(guest.memory().end(), cfg.staging_slot_number));
                guest.add_staging(s).map_err(AccessError::from)?;
                s
            }
        };
        let flow = FlowConfig {
            borrowed_base: crate::access::Gpa(st.gpa),
            borrowed_size: st.size,
            ram_end: Some(st.gpa + st.size),
            run_timeout: cfg.run_timeout,
            max_tasks: cfg.max_tasks,
            // The staging slot is outside guest RAM and ours alone.
            reserved: true,
            integrity: false,
            // In-process: the VMM and the repair die together.
            journal: None,
            after_stage: None,
        };
        let session = Session::attach(&mut guest, image, flow)?;
        Ok(Repairer { guest, session })
    }

    pub fn session(&self) -> &Session {
        &self.session
    }

    pub fn guest(&mut self) -> &mut KvmGuest {
        &mut self.guest
    }

    pub fn into_guest(self) -> KvmGuest {
        self.guest
    }

    /// Cross-checks the KASLR slide the flow found (from the page tables and
    /// the banner) with `MSR_LSTAR`, the syscall entry, which a booted
    /// kernel points into its own text: `Some(true)` when vCPU 0's LSTAR is
    /// inside `[_stext, _etext)` slid; `None` when LSTAR is not set (a
    /// guest not booted that far, or a replayed dump: QEMU's dump has no
    /// MSRs) or the image lacks the text bounds.
    pub fn lstar_matches_slide(&mut self) -> Result<Option<bool>, FlowError> {
        use repair_kernel::layout::Item;
        let lstar = self
            .guest
            .vcpu(VcpuId(0))?
            .msrs(&[super::vcpu::MSR_LSTAR])
            .map_err(AccessError::from)?
            .first()
            .map_or(0, |m| m.1);
        let (Ok(start), Ok(end)) = (self.session.symbol(Item::SymStext), self.session.symbol(Item::SymEtext)) else {
            return Ok(None);
        };
        Ok((lstar != 0).then_some((start.0..end.0).contains(&lstar)))
    }

    /// Sets the hardware breakpoint at `panic` on every vCPU
    /// (`KVM_SET_GUEST_DEBUG`; fails clearly where the host lacks it).
    pub fn arm(&mut self) -> Result<(), FlowError> {
        self.session.arm(&mut self.guest)
    }

    pub fn disarm(&mut self) -> Result<(), FlowError> {
        self.session.disarm(&mut self.guest)
    }

    /// True when a `KVM_EXIT_DEBUG` is our trap at the entry of `panic`.
    pub fn is_trap(&self, d: &kvm_debug_exit_arch) -> bool {
        self.session.panic_addr().is_ok_and(|p| p.0 == d.pc)
    }

    /// Runs the repair kernel on `vcpu`, stopped at the trap (every other
    /// vCPU stopped too). The vCPU's full state (registers, MSRs, FPU/XSAVE,
    /// debug registers) is saved first; unless a kill verdict is applied it
    /// is put back exactly, and after a kill everything but the registers
    /// the verdict sets is; in the first case the vCPU is then stepped over
    /// the trapped instruction (the first of `panic`), with the trap lifted,
    /// so that running it again does not trap at once. The kvmclock is told
    /// of the pause (best effort). Afterwards the vCPU can simply be run.
    pub fn on_trap(&mut self, vcpu: VcpuId, mode: Mode) -> Result<Outcome, FlowError> {
        let caps = *self.guest.caps();
        let legacy = self.guest.legacy_xsave_ok();
        let snap = self.guest.vcpu(vcpu)?.snapshot(&caps, legacy).map_err(AccessError::from)?;
        self.guest.signal_pause();
        let result = self.session.repair(&mut self.guest, vcpu, mode);
        let v = self.guest.vcpu(vcpu)?;
        match &result {
            Ok(o) if o.applied => {
                // Keep the verdict's registers; put back the rest.
                let mut keep = snap;
                keep.regs = v.regs().map_err(AccessError::from)?;
                keep.sregs = v.sregs().map_err(AccessError::from)?;
                v.restore(&keep).map_err(AccessError::from)?;
            }
            _ => {
                v.restore(&snap).map_err(AccessError::from)?;
                // Running from `panic` again would re-trap at once: execute
                // its first instruction now, with the trap lifted.
                if result.is_ok() {
                    self.guest.step_over_breakpoint(vcpu)?;
                }
            }
        }
        result
    }
}
