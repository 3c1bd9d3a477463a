//! What this host's KVM supports, probed once per VM with
//! `KVM_CHECK_EXTENSION`, so each missing piece degrades with a clear
//! message instead of an opaque `EINVAL` in the middle of a repair.

use kvm_ioctls::{Cap, Kvm};

/// The capabilities the backend uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Caps {
    /// `KVM_GET_API_VERSION` (12 on every Linux since 2.6.22).
    pub api_version: i32,
    /// `KVM_CAP_SET_GUEST_DEBUG`: hardware breakpoints (the trap at
    /// `panic`). Without it the embedding API cannot arm; replay still works.
    pub guest_debug: bool,
    /// `KVM_CAP_KVMCLOCK_CTRL`: tell a paused guest's kvmclock it was paused
    /// (no false soft lockup after the repair). Best effort.
    pub kvmclock_ctrl: bool,
    /// `KVM_CAP_XSAVE`: full extended state; else the legacy FPU/SSE state
    /// (`KVM_GET_FPU`) is saved instead.
    pub xsave: bool,
    /// `KVM_CAP_XCRS`: XCR0.
    pub xcrs: bool,
    /// `KVM_CAP_DEBUGREGS`: the guest's own DR0-7, saved around a run.
    pub debugregs: bool,
    /// `KVM_CAP_NR_MEMSLOTS`: slots per VM (the staging slot needs one free).
    pub nr_memslots: i32,
    /// `KVM_CAP_IMMEDIATE_EXIT`.
    pub immediate_exit: bool,
}

impl Caps {
    pub fn probe(kvm: &Kvm) -> Caps {
        Caps {
            api_version: kvm.get_api_version(),
            guest_debug: kvm.check_extension(Cap::SetGuestDebug),
            kvmclock_ctrl: kvm.check_extension(Cap::KvmclockCtrl),
            xsave: kvm.check_extension(Cap::Xsave),
            xcrs: kvm.check_extension(Cap::Xcrs),
            debugregs: kvm.check_extension(Cap::Debugregs),
            nr_memslots: kvm.get_nr_memslots() as i32,
            immediate_exit: kvm.check_extension(Cap::ImmediateExit),
        }
    }
}

impl std::fmt::Display for Caps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let yn = |b: bool| if b { "yes" } else { "NO" };
        write!(
            f,
            "KVM API {}: SET_GUEST_DEBUG {}, KVMCLOCK_CTRL {}, XSAVE {}, XCRS {}, DEBUGREGS {}, IMMEDIATE_EXIT {}, {} memslots",
            self.api_version,
            yn(self.guest_debug),
            yn(self.kvmclock_ctrl),
            yn(self.xsave),
            yn(self.xcrs),
            yn(self.debugregs),
            yn(self.immediate_exit),
            self.nr_memslots
        )
    }
}
