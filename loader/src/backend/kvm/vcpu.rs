//! One vCPU over `kvm-ioctls`: its state as the flow sees it
//! ([`CpuState`]), its whole state for save/restore ([`VcpuSnapshot`]),
//! hardware breakpoints, and `KVM_RUN` with a deadline.
//!
//! Each method wraps one ioctl and names it in its error.

use super::{Caps, KvmError};
use crate::access::CpuState;
use kvm_bindings::{
    kvm_debugregs, kvm_fpu, kvm_guest_debug, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_xcrs, kvm_xsave, Msrs,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use std::time::{Duration, Instant};

pub const MSR_EFER: u32 = 0xc000_0080;
pub const MSR_STAR: u32 = 0xc000_0081;
pub const MSR_LSTAR: u32 = 0xc000_0082;
pub const MSR_CSTAR: u32 = 0xc000_0083;
pub const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
pub const MSR_FS_BASE: u32 = 0xc000_0100;
pub const MSR_GS_BASE: u32 = 0xc000_0101;
pub const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
pub const MSR_TSC_AUX: u32 = 0xc000_0103;
pub const MSR_IA32_SYSENTER_CS: u32 = 0x174;
pub const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
pub const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
pub const MSR_IA32_PAT: u32 = 0x277;

/// The MSRs a snapshot keeps: the syscall entry (LSTAR: also a KASLR
/// witness), the swapped GS base, and the rest of what a kernel programs
/// once at boot and a repair must not lose.
pub const SNAPSHOT_MSRS: [u32; 11] = [
    MSR_EFER,
    MSR_STAR,
    MSR_LSTAR,
    MSR_CSTAR,
    MSR_SYSCALL_MASK,
    MSR_KERNEL_GS_BASE,
    MSR_TSC_AUX,
    MSR_IA32_SYSENTER_CS,
    MSR_IA32_SYSENTER_ESP,
    MSR_IA32_SYSENTER_EIP,
    MSR_IA32_PAT,
];

/// The I/O port the repair kernel writes its run status to on completion.
pub const COMPLETION_PORT: u16 = 0x501;

/// Hardware breakpoint slots (DR0-DR3).
pub const HW_BREAKPOINTS: usize = 4;

/// The FPU/SSE/AVX state: the full XSAVE area where the host has it.
#[derive(Debug)]
pub enum FpuState {
    /// `fpu` too: `KVM_SET_XSAVE` leaves the legacy area's bytes as they
    /// were for components the XSAVE header marks as in their initial
    /// state, and `KVM_GET_FPU` reads those bytes; restoring `fpu` first
    /// keeps both views equal to the snapshot.
    Xsave { xsave: Box<kvm_xsave>, xcrs: Option<Box<kvm_xcrs>>, fpu: Box<kvm_fpu> },
    Legacy(Box<kvm_fpu>),
}

/// Everything of a vCPU a repair may change, to put back byte for byte.
#[derive(Debug)]
pub struct VcpuSnapshot {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    /// `(index, value)` for each of [`SNAPSHOT_MSRS`] this host reads.
    pub msrs: Vec<(u32, u64)>,
    pub fpu: FpuState,
    pub debugregs: Option<kvm_debugregs>,
}

/// How one `KVM_RUN` loop ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunExit {
    /// `hlt` with nothing to wake it (no in-kernel irqchip): `rip` is past
    /// the `hlt`. `completion` is the byte the repair kernel wrote to
    /// [`COMPLETION_PORT`] before, if it did.
    Hlt { rip: u64, completion: Option<u8> },
    /// A breakpoint or single step (`KVM_EXIT_DEBUG`).
    Debug { pc: u64, dr6: u64, exception: u32, completion: Option<u8> },
    /// The deadline passed (the vCPU was kicked out of `KVM_RUN`).
    TimedOut { completion: Option<u8> },
    /// Triple fault.
    Shutdown,
    /// `KVM_EXIT_FAIL_ENTRY`: the state is not one the CPU accepts.
    FailEntry(u64),
    /// `KVM_EXIT_INTERNAL_ERROR` or another exit this backend does not serve.
    Other(String),
}

/// One vCPU fd and what the backend keeps about it.
#[derive(Debug)]
pub struct KvmVcpu {
    pub fd: VcpuFd,
    pub index: u32,
    /// DR0-DR3 as programmed through `KVM_SET_GUEST_DEBUG`.
    hw_bps: [Option<u64>; HW_BREAKPOINTS],
}

fn kernel_errno(e: &kvm_ioctls::Error) -> i32 {
    e.errno()
}

impl KvmVcpu {
    pub fn new(fd: VcpuFd, index: u32) -> KvmVcpu {
        KvmVcpu { fd, index, hw_bps: [None; HW_BREAKPOINTS] }
    }

    /// `KVM_GET_REGS`
    pub fn regs(&self) -> Result<kvm_regs, KvmError> {
        self.fd.get_regs().map_err(KvmError::ioctl("KVM_GET_REGS"))
    }
    /// `KVM_SET_REGS`
    pub fn set_regs(&self, r: &kvm_regs) -> Result<(), KvmError> {
        self.fd.set_regs(r).map_err(KvmError::ioctl("KVM_SET_REGS"))
    }
    /// `KVM_GET_SREGS`
    pub fn sregs(&self) -> Result<kvm_sregs, KvmError> {
        self.fd.get_sregs().map_err(KvmError::ioctl("KVM_GET_SREGS"))
    }
    /// `KVM_SET_SREGS`
    pub fn set_sregs(&self, s: &kvm_sregs) -> Result<(), KvmError> {
        self.fd.set_sregs(s).map_err(KvmError::ioctl("KVM_SET_SREGS"))
    }

    /// `KVM_GET_MSRS` of `indices`; an MSR the host does not have is left
    /// out of the result (KVM stops at the first one it refuses).
    pub fn msrs(&self, indices: &[u32]) -> Result<Vec<(u32, u64)>, KvmError> {
        let entries: Vec<kvm_msr_entry> =
            indices.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|e| KvmError::Other(format!("MSR list: {e:?}")))?;
        let n = self.fd.get_msrs(&mut msrs).map_err(KvmError::ioctl("KVM_GET_MSRS"))?;
        Ok(msrs.as_slice()[..n].iter().map(|e| (e.index, e.data)).collect())
    }

    /// `KVM_SET_MSRS`; fails unless every entry was taken.
    pub fn set_msrs(&self, values: &[(u32, u64)]) -> Result<(), KvmError> {
        let entries: Vec<kvm_msr_entry> =
            values.iter().map(|&(index, data)| kvm_msr_entry { index, data, ..Default::default() }).collect();
        let msrs = Msrs::from_entries(&entries).map_err(|e| KvmError::Other(format!("MSR list: {e:?}")))?;
        let n = self.fd.set_msrs(&msrs).map_err(KvmError::ioctl("KVM_SET_MSRS"))?;
        if n != values.len() {
            return Err(KvmError::Other(format!(
                "KVM_SET_MSRS took {n} of {} MSRs; MSR {:#x} was refused",
                values.len(),
                values[n].0
            )));
        }
        Ok(())
    }

    /// `KVM_GET_FPU`
    pub fn fpu(&self) -> Result<kvm_fpu, KvmError> {
        self.fd.get_fpu().map_err(KvmError::ioctl("KVM_GET_FPU"))
    }
    /// `KVM_SET_FPU`
    pub fn set_fpu(&self, f: &kvm_fpu) -> Result<(), KvmError> {
        self.fd.set_fpu(f).map_err(KvmError::ioctl("KVM_SET_FPU"))
    }
    /// `KVM_GET_XSAVE` (the legacy 4 KiB area; see [`KvmVcpu::snapshot`]
    /// for when it is used).
    pub fn xsave(&self) -> Result<Box<kvm_xsave>, KvmError> {
        self.fd.get_xsave().map(Box::new).map_err(KvmError::ioctl("KVM_GET_XSAVE"))
    }
    /// `KVM_SET_XSAVE`
    ///
    /// # Safety
    /// `x` must come from [`KvmVcpu::xsave`] of a vCPU of a VM whose XSAVE
    /// state fits the legacy 4 KiB area (`KVM_CAP_XSAVE2` <= 4096), so the
    /// kernel reads no byte past the struct.
    pub unsafe fn set_xsave(&self, x: &kvm_xsave) -> Result<(), KvmError> {
        // SAFETY: the caller guarantees the state fits the 4 KiB struct.
        unsafe { self.fd.set_xsave(x) }.map_err(KvmError::ioctl("KVM_SET_XSAVE"))
    }
    /// `KVM_GET_XCRS`
    pub fn xcrs(&self) -> Result<kvm_xcrs, KvmError> {
        self.fd.get_xcrs().map_err(KvmError::ioctl("KVM_GET_XCRS"))
    }
    /// `KVM_SET_XCRS`
    pub fn set_xcrs(&self, x: &kvm_xcrs) -> Result<(), KvmError> {
        self.fd.set_xcrs(x).map_err(KvmError::ioctl("KVM_SET_XCRS"))
    }
    /// `KVM_GET_DEBUGREGS`
    pub fn debugregs(&self) -> Result<kvm_debugregs, KvmError> {
        self.fd.get_debug_regs().map_err(KvmError::ioctl("KVM_GET_DEBUGREGS"))
    }
    /// `KVM_SET_DEBUGREGS`
    pub fn set_debugregs(&self, d: &kvm_debugregs) -> Result<(), KvmError> {
        self.fd.set_debug_regs(d).map_err(KvmError::ioctl("KVM_SET_DEBUGREGS"))
    }
    /// `KVM_SET_GUEST_DEBUG`
    pub fn set_guest_debug(&self, d: &kvm_guest_debug) -> Result<(), KvmError> {
        self.fd.set_guest_debug(d).map_err(KvmError::ioctl("KVM_SET_GUEST_DEBUG"))
    }
    /// `KVM_KVMCLOCK_CTRL`: marks the guest's pvclock "stopped by the host"
    /// so its soft-lockup watchdog forgives the pause. `EINVAL` means the
    /// guest has not registered a kvmclock page (not an error worth
    /// stopping a repair for: callers treat this as best effort).
    pub fn kvmclock_ctrl(&self) -> Result<(), KvmError> {
        self.fd.kvmclock_ctrl().map_err(KvmError::ioctl("KVM_KVMCLOCK_CTRL"))
    }

    /// Saves regs, sregs, the [`SNAPSHOT_MSRS`], the FPU/XSAVE state and
    /// the debug registers, degrading to what `caps` says the host has.
    pub fn snapshot(&self, caps: &Caps, legacy_xsave_ok: bool) -> Result<VcpuSnapshot, KvmError> {
        let fpu = if caps.xsave && legacy_xsave_ok {
            let xcrs = if caps.xcrs { Some(Box::new(self.xcrs()?)) } else { None };
            FpuState::Xsave { xsave: self.xsave()?, xcrs, fpu: Box::new(self.fpu()?) }
        } else {
            FpuState::Legacy(Box::new(self.fpu()?))
        };
        Ok(VcpuSnapshot {
            regs: self.regs()?,
            sregs: self.sregs()?,
            msrs: self.msrs(&SNAPSHOT_MSRS)?,
            fpu,
            debugregs: if caps.debugregs { Some(self.debugregs()?) } else { None },
        })
    }

    /// Puts a [`VcpuSnapshot`] of this vCPU back.
    pub fn restore(&self, s: &VcpuSnapshot) -> Result<(), KvmError> {
        self.set_sregs(&s.sregs)?;
        self.set_msrs(&s.msrs)?;
        match &s.fpu {
            FpuState::Xsave { xsave, xcrs, fpu } => {
                self.set_fpu(fpu)?;
                if let Some(x) = xcrs {
                    self.set_xcrs(x)?;
                }
                // SAFETY: `xsave` was read from this vCPU by `snapshot`,
                // which only takes the legacy area when the state fits it.
                unsafe { self.set_xsave(xsave)? };
            }
            FpuState::Legacy(f) => self.set_fpu(f)?,
        }
        if let Some(d) = &s.debugregs {
            self.set_debugregs(d)?;
        }
        self.set_regs(&s.regs)
    }

    /// The flow's view of the registers.
    pub fn cpu_state(&self) -> Result<CpuState, KvmError> {
        let r = self.regs()?;
        let s = self.sregs()?;
        let kgs = self.msrs(&[MSR_KERNEL_GS_BASE])?.first().map_or(0, |m| m.1);
        Ok(to_cpu_state(&r, &s, kgs))
    }

    /// Sets the flow's view of the registers, writing only what differs.
    /// A changed segment selector would need its descriptor loaded from the
    /// guest's GDT: refused (the flow never changes one).
    pub fn set_cpu_state(&self, st: &CpuState) -> Result<(), KvmError> {
        let mut r = self.regs()?;
        let mut s = self.sregs()?;
        let cur = to_cpu_state(&r, &s, 0);
        for (name, a, b) in [
            ("cs", cur.cs, st.cs),
            ("ss", cur.ss, st.ss),
            ("ds", cur.ds, st.ds),
            ("es", cur.es, st.es),
            ("fs", cur.fs, st.fs),
            ("gs", cur.gs, st.gs),
        ] {
            if a != b {
                return Err(KvmError::Other(format!(
                    "changing the {name} selector ({a:#x} -> {b:#x}) needs a descriptor load from the guest GDT, which the KVM backend does not do"
                )));
            }
        }
        let new_r = kvm_regs {
            rax: st.rax,
            rbx: st.rbx,
            rcx: st.rcx,
            rdx: st.rdx,
            rsi: st.rsi,
            rdi: st.rdi,
            rbp: st.rbp,
            rsp: st.rsp,
            r8: st.r8,
            r9: st.r9,
            r10: st.r10,
            r11: st.r11,
            r12: st.r12,
            r13: st.r13,
            r14: st.r14,
            r15: st.r15,
            rip: st.rip,
            rflags: st.rflags,
        };
        if new_r != r {
            r = new_r;
            self.set_regs(&r)?;
        }
        let before = s;
        s.fs.base = st.fs_base;
        s.gs.base = st.gs_base;
        s.cr0 = st.cr0;
        s.cr2 = st.cr2;
        s.cr3 = st.cr3;
        s.cr4 = st.cr4;
        s.efer = st.efer;
        if s != before {
            self.set_sregs(&s)?;
        }
        let kgs = self.msrs(&[MSR_KERNEL_GS_BASE])?.first().map_or(0, |m| m.1);
        if kgs != st.kernel_gs_base {
            self.set_msrs(&[(MSR_KERNEL_GS_BASE, st.kernel_gs_base)])?;
        }
        Ok(())
    }

    /// The hardware breakpoints programmed.
    pub fn hw_breakpoints(&self) -> &[Option<u64>; HW_BREAKPOINTS] {
        &self.hw_bps
    }

    /// Programs DR0-DR3 (execute, length 1) with `bps` through
    /// `KVM_SET_GUEST_DEBUG`; all `None` turns guest debugging off.
    pub fn program_breakpoints(&mut self, bps: [Option<u64>; HW_BREAKPOINTS]) -> Result<(), KvmError> {
        self.set_guest_debug(&super::guest::debug_control(&bps, false))?;
        self.hw_bps = bps;
        Ok(())
    }

    /// Runs until a stop worth reporting or `deadline`. Port I/O other than
    /// [`COMPLETION_PORT`] and MMIO are served as absent devices (reads
    /// return all ones), so a stray access does not wedge the run.
    pub fn run_until(&mut self, deadline: Instant) -> Result<RunExit, KvmError> {
        let _kick = Kicker::arm(deadline)?;
        let mut completion = None;
        loop {
            if Instant::now() >= deadline {
                return Ok(RunExit::TimedOut { completion });
            }
            match self.fd.run() {
                Ok(VcpuExit::IoOut(port, data)) => {
                    if port == COMPLETION_PORT {
                        completion = data.first().copied();
                    }
                }
                Ok(VcpuExit::IoIn(_, data)) => data.fill(0xff),
                Ok(VcpuExit::MmioRead(_, data)) => data.fill(0xff),
                Ok(VcpuExit::MmioWrite(..)) => {}
                Ok(VcpuExit::Hlt) => {
                    let rip = self.regs()?.rip;
                    return Ok(RunExit::Hlt { rip, completion });
                }
                Ok(VcpuExit::Debug(d)) => {
                    return Ok(RunExit::Debug { pc: d.pc, dr6: d.dr6, exception: d.exception, completion })
                }
                Ok(VcpuExit::Intr) => {}
                Ok(VcpuExit::Shutdown) => return Ok(RunExit::Shutdown),
                Ok(VcpuExit::FailEntry(reason, _)) => return Ok(RunExit::FailEntry(reason)),
                Ok(VcpuExit::InternalError) => {
                    let run = self.fd.get_kvm_run();
                    // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so
                    // the kernel filled the `internal` member of the union.
                    let internal = unsafe { run.__bindgen_anon_1.internal };
                    let n = (internal.ndata as usize).min(internal.data.len());
                    let rip = self.regs()?.rip;
                    return Ok(RunExit::Other(format!(
                        "KVM_EXIT_INTERNAL_ERROR suberror {} at rip {rip:#x}, data {:x?}",
                        internal.suberror,
                        &internal.data[..n]
                    )));
                }
                Ok(other) => return Ok(RunExit::Other(format!("{other:?}"))),
                Err(e) if kernel_errno(&e) == libc::EINTR || kernel_errno(&e) == libc::EAGAIN => {}
                Err(e) => return Err(KvmError::Ioctl { what: "KVM_RUN", source: e }),
            }
        }
    }
}

/// Register state in the flow's terms.
pub fn to_cpu_state(r: &kvm_regs, s: &kvm_sregs, kernel_gs_base: u64) -> CpuState {
    CpuState {
        rax: r.rax,
        rbx: r.rbx,
        rcx: r.rcx,
        rdx: r.rdx,
        rsi: r.rsi,
        rdi: r.rdi,
        rbp: r.rbp,
        rsp: r.rsp,
        r8: r.r8,
        r9: r.r9,
        r10: r.r10,
        r11: r.r11,
        r12: r.r12,
        r13: r.r13,
        r14: r.r14,
        r15: r.r15,
        rip: r.rip,
        rflags: r.rflags,
        cs: s.cs.selector.into(),
        ss: s.ss.selector.into(),
        ds: s.ds.selector.into(),
        es: s.es.selector.into(),
        fs: s.fs.selector.into(),
        gs: s.gs.selector.into(),
        fs_base: s.fs.base,
        gs_base: s.gs.base,
        kernel_gs_base,
        cr0: s.cr0,
        cr2: s.cr2,
        cr3: s.cr3,
        cr4: s.cr4,
        efer: s.efer,
    }
}

/// Kicks the calling thread out of `KVM_RUN` at a deadline: a watchdog
/// thread sends it [`kick_signal`] (a no-op handler, so the ioctl returns
/// `EINTR`) every few milliseconds from the deadline until dropped. The
/// repetition covers a signal landing just before the thread entered the
/// ioctl.
struct Kicker {
    done: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// The real-time signal used to kick vCPU threads: `SIGRTMIN + 3`. A VMM
/// that uses that signal for something else runs the repair on a thread of
/// its own.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN() + 3
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

impl Kicker {
    fn arm(deadline: Instant) -> Result<Kicker, KvmError> {
        static REGISTERED: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
        REGISTERED
            .get_or_init(|| {
                vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick)
                    .map_err(|e| format!("cannot install the vCPU kick signal handler: {e}"))
            })
            .clone()
            .map_err(KvmError::Other)?;
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("kvm-kick".into())
            .spawn(move || {
                let mut wait = deadline.saturating_duration_since(Instant::now());
                loop {
                    match rx.recv_timeout(wait) {
                        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                            // SAFETY: `me` is the thread that owns the Kicker,
                            // alive until the Kicker's drop joins this thread;
                            // the signal's handler is a no-op.
                            unsafe { libc::pthread_kill(me, kick_signal()) };
                            wait = Duration::from_millis(5);
                        }
                        _ => return,
                    }
                }
            })
            .map_err(|e| KvmError::Other(format!("cannot start the kick thread: {e}")))?;
        Ok(Kicker { done: Some(tx), thread: Some(thread) })
    }
}

impl Drop for Kicker {
    fn drop(&mut self) {
        drop(self.done.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
