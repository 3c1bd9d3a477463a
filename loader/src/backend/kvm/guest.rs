//! [`KvmGuest`]: the guest-access backend over an in-process KVM VM.
//!
//! The guest is "stopped" whenever no `KVM_RUN` is in progress on this
//! thread: [`GuestAccess::resume`] only marks it running, and
//! [`GuestAccess::wait_stop`] runs the vCPUs on the calling thread, one
//! after another in short slices, until one stops on a breakpoint. A VMM
//! that runs its vCPUs on threads of its own uses [`super::Repairer`]
//! instead, which only needs the guest stopped at the trap.

use super::memory::{GuestMemory, OwnedMmap, Region};
use super::vcpu::{KvmVcpu, RunExit, HW_BREAKPOINTS};
use super::{Caps, KvmError};
use crate::access::{
    self, AccessError, BpKind, CpuState, GuestAccess, Gpa, Gva, RunOutcome, StopEvent, StopReason, VcpuId,
};
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use std::time::{Duration, Instant};

/// The extra memory slot the repair kernel is staged in, above guest RAM:
/// the guest never sees it (no e820 entry, no ACPI), so no guest page is
/// borrowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StagingSlot {
    /// KVM memory slot number (must be free in the VM).
    pub slot: u32,
    /// Guest-physical base (4 KiB-aligned, above RAM).
    pub gpa: u64,
    pub size: u64,
}

impl StagingSlot {
    /// 2 MiB at the first 2 MiB boundary at or above `ram_end`.
    pub fn above(ram_end: u64, slot: u32) -> StagingSlot {
        StagingSlot { slot, gpa: ram_end.next_multiple_of(2 << 20), size: 2 << 20 }
    }

    /// 2 MiB just above the lowest block of guest memory that has room
    /// after it: right above RAM on a PC guest, below the PCI hole and the
    /// BIOS (which a QEMU dump carries as a block at 4 GiB - 256 KiB), so
    /// the repair kernel's identity map stays small. Only for a VM without
    /// devices (replay): in a VMM's VM that gap may hold device MMIO.
    pub fn above_ram(memory: &GuestMemory, slot: u32) -> StagingSlot {
        let size = 2u64 << 20;
        let free = |gpa: u64| !memory.regions().iter().any(|r| r.gpa.0 < gpa + size && gpa < r.end());
        let gpa = memory
            .regions()
            .iter()
            .map(|r| r.end().next_multiple_of(size))
            .find(|&g| free(g))
            .unwrap_or_else(|| memory.end().next_multiple_of(size));
        StagingSlot { slot, gpa, size }
    }
}

/// A KVM VM seen through [`GuestAccess`].
#[derive(Debug)]
pub struct KvmGuest {
    // Field order matters for drop: the VM (and its slots) goes after the
    // staging slot is removed in `Drop`, the memory after the VM.
    /// `None`: lent to the VMM ([`KvmGuest::take_vcpu`]).
    vcpus: Vec<Option<KvmVcpu>>,
    vm: VmFd,
    /// The guest-wide hardware breakpoints (DR0-DR3).
    bps: [Option<u64>; HW_BREAKPOINTS],
    memory: GuestMemory,
    staging: Option<StagingSlot>,
    caps: Caps,
    legacy_xsave_ok: bool,
    running: bool,
    /// Vcpu kicked by the last `pause`, for the stop it reports.
    slice: Duration,
}

fn vm_ioctl(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> KvmError {
    KvmError::ioctl(what)
}

impl KvmGuest {
    /// Wraps a VM whose memory slots already map `memory` (a VMM's), with
    /// its vCPUs in index order. `caps` from [`Caps::probe`].
    pub fn new(vm: VmFd, vcpus: Vec<kvm_ioctls::VcpuFd>, memory: GuestMemory, caps: Caps) -> KvmGuest {
        let xsave2 = vm.check_extension_int(kvm_ioctls::Cap::Xsave2);
        KvmGuest {
            vcpus: vcpus.into_iter().enumerate().map(|(i, fd)| Some(KvmVcpu::new(fd, i as u32))).collect(),
            vm,
            bps: [None; HW_BREAKPOINTS],
            memory,
            staging: None,
            caps,
            // KVM_CAP_XSAVE2 gives the XSAVE size; 0 means the legacy 4 KiB.
            legacy_xsave_ok: xsave2 <= 4096,
            running: false,
            slice: Duration::from_millis(20),
        }
    }

    /// Registers `region` with the VM as memory slot `slot` and keeps it.
    pub fn add_region(&mut self, slot: u32, region: Region) -> Result<(), KvmError> {
        let mr = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: region.gpa.0,
            memory_size: region.len as u64,
            userspace_addr: region.host_addr(),
        };
        // SAFETY: the region's host memory stays mapped as long as it is in
        // `self.memory`, and the slot is removed from the VM (Drop,
        // `remove_staging`) before a region it maps is dropped; VM slots
        // never outlive `self.vm`, which `self` owns.
        unsafe { self.vm.set_user_memory_region(mr) }.map_err(vm_ioctl("KVM_SET_USER_MEMORY_REGION"))?;
        if let Err(e) = self.memory.push(region) {
            self.delete_slot(slot, mr.guest_phys_addr);
            return Err(e);
        }
        Ok(())
    }

    fn delete_slot(&mut self, slot: u32, gpa: u64) {
        let mr = kvm_userspace_memory_region { slot, flags: 0, guest_phys_addr: gpa, memory_size: 0, userspace_addr: 0 };
        // SAFETY: a zero-sized region deletes the slot; no memory is lent.
        let _ = unsafe { self.vm.set_user_memory_region(mr) };
    }

    /// Adds the extra slot the repair kernel is staged in (zeroed memory
    /// owned by this guest, removed from the VM and unmapped on drop).
    pub fn add_staging(&mut self, st: StagingSlot) -> Result<(), KvmError> {
        if st.gpa < self.memory.end() && self.memory.regions().iter().any(|r| r.gpa.0 < st.gpa + st.size && st.gpa < r.end()) {
            return Err(KvmError::BadRegions(format!("staging slot {:#x}+{:#x} overlaps guest RAM", st.gpa, st.size)));
        }
        let map = OwnedMmap::anonymous(st.size as usize)?;
        self.add_region(st.slot, Region::owned(Gpa(st.gpa), map))?;
        self.staging = Some(st);
        Ok(())
    }

    pub fn staging(&self) -> Option<StagingSlot> {
        self.staging
    }

    /// End of guest RAM: the end of the highest region that is not the
    /// staging slot.
    pub fn ram_end(&self) -> u64 {
        self.memory
            .regions()
            .iter()
            .filter(|r| self.staging.is_none_or(|s| r.gpa.0 != s.gpa))
            .map(|r| r.end())
            .max()
            .unwrap_or(0)
    }

    pub fn caps(&self) -> &Caps {
        &self.caps
    }

    pub fn vm(&self) -> &VmFd {
        &self.vm
    }

    pub fn memory(&mut self) -> &mut GuestMemory {
        &mut self.memory
    }

    fn lent(v: VcpuId) -> AccessError {
        AccessError::Other(format!("{v} is lent to the VMM (KvmGuest::take_vcpu); put it back (put_vcpu) first"))
    }

    pub fn vcpu(&self, v: VcpuId) -> Result<&KvmVcpu, AccessError> {
        let count = self.vcpus.len();
        self.vcpus.get(v.0 as usize).ok_or(AccessError::NoSuchVcpu { vcpu: v, count })?.as_ref().ok_or_else(|| Self::lent(v))
    }

    pub fn vcpu_mut(&mut self, v: VcpuId) -> Result<&mut KvmVcpu, AccessError> {
        let count = self.vcpus.len();
        self.vcpus.get_mut(v.0 as usize).ok_or(AccessError::NoSuchVcpu { vcpu: v, count })?.as_mut().ok_or_else(|| Self::lent(v))
    }

    /// Lends a vCPU to the VMM, to run on a thread of its own (a rust-vmm
    /// VMM runs each vCPU on its own thread). The guest's breakpoints stay
    /// programmed in it: arm before taking the vCPUs out. While lent, the
    /// backend refuses every operation on it.
    pub fn take_vcpu(&mut self, v: VcpuId) -> Result<KvmVcpu, AccessError> {
        let count = self.vcpus.len();
        self.vcpus.get_mut(v.0 as usize).ok_or(AccessError::NoSuchVcpu { vcpu: v, count })?.take().ok_or_else(|| Self::lent(v))
    }

    /// Takes a lent vCPU back (at a trap, before the repair), bringing its
    /// breakpoints up to date if they changed meanwhile.
    pub fn put_vcpu(&mut self, mut vcpu: KvmVcpu) -> Result<(), AccessError> {
        let id = VcpuId(vcpu.index);
        let count = self.vcpus.len();
        let slot = self.vcpus.get_mut(vcpu.index as usize).ok_or(AccessError::NoSuchVcpu { vcpu: id, count })?;
        if slot.is_some() {
            return Err(AccessError::Other(format!("{id} is not lent: it is already in the guest")));
        }
        if *vcpu.hw_breakpoints() != self.bps && self.caps.guest_debug {
            vcpu.program_breakpoints(self.bps)?;
        }
        *slot = Some(vcpu);
        Ok(())
    }

    /// Whether `KVM_SET_XSAVE` with the legacy area is safe on this VM.
    pub fn legacy_xsave_ok(&self) -> bool {
        self.legacy_xsave_ok
    }

    /// Tells every vCPU's kvmclock that the host paused the guest
    /// (`KVM_KVMCLOCK_CTRL`), best effort: absent the capability, or on a
    /// guest without a registered kvmclock (`EINVAL`), nothing is done.
    /// Returns how many vCPUs took it.
    pub fn signal_pause(&self) -> usize {
        if !self.caps.kvmclock_ctrl {
            return 0;
        }
        self.vcpus.iter().flatten().filter(|v| v.kvmclock_ctrl().is_ok()).count()
    }

    fn hw_breakpoints(&self) -> [Option<u64>; HW_BREAKPOINTS] {
        self.bps
    }

    fn program_all(&mut self, bps: [Option<u64>; HW_BREAKPOINTS]) -> Result<(), AccessError> {
        if !self.caps.guest_debug {
            return Err(KvmError::MissingCap {
                cap: "KVM_CAP_SET_GUEST_DEBUG",
                consequence: "no hardware breakpoint can trap the guest at panic(); replay still works",
            }
            .into());
        }
        for v in self.vcpus.iter_mut().flatten() {
            v.program_breakpoints(bps)?;
        }
        self.bps = bps;
        Ok(())
    }

    /// Resuming a vCPU that sits on one of our breakpoints would trap at
    /// once: execute that one instruction with the breakpoint lifted (a
    /// single step, as QEMU's gdbstub does), then put the breakpoints back.
    /// RF would be the lighter way, but not every KVM honours it with
    /// `KVM_SET_GUEST_DEBUG` (this machine's PVM does not). Fails when the
    /// step ends in anything but a debug exit (or a `hlt`).
    pub fn step_over_breakpoint(&mut self, vcpu: VcpuId) -> Result<(), AccessError> {
        let v = self.vcpu(vcpu)?;
        let bps = *v.hw_breakpoints();
        let rip = v.regs()?.rip;
        if !bps.iter().flatten().any(|&a| a == rip) {
            return Ok(());
        }
        let mut lifted = bps;
        for b in lifted.iter_mut() {
            if *b == Some(rip) {
                *b = None;
            }
        }
        let dbg = debug_control(&lifted, true);
        self.vcpu(vcpu)?.set_guest_debug(&dbg)?;
        let exit = self.vcpu_mut(vcpu)?.run_until(Instant::now() + Duration::from_secs(10));
        self.vcpu_mut(vcpu)?.program_breakpoints(bps)?;
        match exit? {
            RunExit::Debug { .. } | RunExit::Hlt { .. } => Ok(()),
            other => Err(Self::exit_error(vcpu, &other)),
        }
    }

    fn stop_event(&self, vcpu: VcpuId, reason: StopReason) -> Result<StopEvent, AccessError> {
        let rip = self.vcpu(vcpu)?.regs()?.rip;
        Ok(StopEvent { vcpu, rip: Gva(rip), reason })
    }

    fn translate(&mut self, vcpu: VcpuId, gva: Gva) -> Result<Gpa, AccessError> {
        let s = self.vcpu(vcpu)?.sregs()?;
        let mem = &mut self.memory;
        let mut rd = |g: Gpa| {
            let mut b = [0u8; 8];
            mem.read(g, &mut b)?;
            Ok(u64::from_le_bytes(b))
        };
        access::translate(&mut rd, s.cr3, s.cr4, gva)?.ok_or(AccessError::NotMapped(gva))
    }

    fn run_one(&mut self, vcpu: VcpuId, deadline: Instant) -> Result<RunExit, AccessError> {
        self.step_over_breakpoint(vcpu)?;
        Ok(self.vcpu_mut(vcpu)?.run_until(deadline)?)
    }

    fn exit_error(vcpu: VcpuId, e: &RunExit) -> AccessError {
        AccessError::Other(match e {
            RunExit::Shutdown => format!("{vcpu} triple-faulted (KVM_EXIT_SHUTDOWN)"),
            RunExit::FailEntry(r) => format!(
                "{vcpu}: KVM refused to enter the guest (KVM_EXIT_FAIL_ENTRY, reason {r:#x}): the register state is not one this host accepts"
            ),
            other => format!("{vcpu} stopped with an exit the KVM backend does not serve: {other:?}"),
        })
    }
}

/// `KVM_SET_GUEST_DEBUG` argument: hardware execute breakpoints `bps`,
/// single-stepping when `step`.
pub(crate) fn debug_control(bps: &[Option<u64>; HW_BREAKPOINTS], step: bool) -> kvm_bindings::kvm_guest_debug {
    let mut dbg = kvm_bindings::kvm_guest_debug::default();
    let mut dr7 = 0u64;
    for (i, b) in bps.iter().enumerate() {
        if let Some(a) = b {
            dbg.arch.debugreg[i] = *a;
            // Ln (local enable); R/W = 00 (execute), LEN = 00.
            dr7 |= 1 << (2 * i);
        }
    }
    if dr7 != 0 {
        dbg.control = kvm_bindings::KVM_GUESTDBG_ENABLE | kvm_bindings::KVM_GUESTDBG_USE_HW_BP;
        dbg.arch.debugreg[7] = dr7;
    }
    if step {
        dbg.control |= kvm_bindings::KVM_GUESTDBG_ENABLE | kvm_bindings::KVM_GUESTDBG_SINGLESTEP;
    }
    dbg
}

impl Drop for KvmGuest {
    fn drop(&mut self) {
        // Unmap the staging slot from the VM before its memory goes.
        if let Some(st) = self.staging.take() {
            self.delete_slot(st.slot, st.gpa);
        }
    }
}

impl GuestAccess for KvmGuest {
    fn read_phys(&mut self, gpa: Gpa, buf: &mut [u8]) -> Result<(), AccessError> {
        self.memory.read(gpa, buf)
    }

    fn write_phys(&mut self, gpa: Gpa, data: &[u8]) -> Result<(), AccessError> {
        self.memory.write(gpa, data)
    }

    fn read_virt(&mut self, vcpu: VcpuId, gva: Gva, buf: &mut [u8]) -> Result<(), AccessError> {
        let mut done = 0;
        while done < buf.len() {
            let at = Gva(gva.0.wrapping_add(done as u64));
            let n = (4096 - (at.0 & 0xfff) as usize).min(buf.len() - done);
            let gpa = self.translate(vcpu, at)?;
            self.memory.read(gpa, &mut buf[done..done + n])?;
            done += n;
        }
        Ok(())
    }

    fn write_virt(&mut self, vcpu: VcpuId, gva: Gva, data: &[u8]) -> Result<(), AccessError> {
        let mut done = 0;
        while done < data.len() {
            let at = Gva(gva.0.wrapping_add(done as u64));
            let n = (4096 - (at.0 & 0xfff) as usize).min(data.len() - done);
            let gpa = self.translate(vcpu, at)?;
            self.memory.write(gpa, &data[done..done + n])?;
            done += n;
        }
        Ok(())
    }

    fn vcpus(&mut self) -> Result<Vec<VcpuId>, AccessError> {
        Ok((0..self.vcpus.len() as u32).map(VcpuId).collect())
    }

    fn get_regs(&mut self, vcpu: VcpuId) -> Result<CpuState, AccessError> {
        Ok(self.vcpu(vcpu)?.cpu_state()?)
    }

    fn set_regs(&mut self, vcpu: VcpuId, regs: &CpuState) -> Result<(), AccessError> {
        Ok(self.vcpu(vcpu)?.set_cpu_state(regs)?)
    }

    fn pause(&mut self) -> Result<Option<StopEvent>, AccessError> {
        if !self.running {
            return Ok(None);
        }
        self.running = false;
        self.signal_pause();
        match self.vcpus.iter().flatten().next().map(|v| VcpuId(v.index)) {
            Some(v) => Ok(Some(self.stop_event(v, StopReason::Interrupted)?)),
            None => Ok(None),
        }
    }

    fn resume(&mut self) -> Result<(), AccessError> {
        self.running = true;
        Ok(())
    }

    fn is_running(&self) -> bool {
        self.running
    }

    fn wait_stop(&mut self, timeout: Option<Duration>) -> Result<Option<StopEvent>, AccessError> {
        if !self.running {
            return Err(AccessError::NotRunning);
        }
        let end = timeout.map(|t| Instant::now() + t);
        // A lent vCPU runs on the VMM's thread, not here.
        let mut halted: Vec<bool> = self.vcpus.iter().map(Option::is_none).collect();
        loop {
            // Indexing, not iterating: the body needs `&mut self`.
            #[allow(clippy::needless_range_loop)]
            for i in 0..halted.len() {
                if halted[i] {
                    continue;
                }
                let mut slice_end = Instant::now() + self.slice;
                if let Some(e) = end {
                    slice_end = slice_end.min(e);
                }
                let vcpu = VcpuId(i as u32);
                match self.run_one(vcpu, slice_end)? {
                    RunExit::TimedOut { .. } => {}
                    RunExit::Debug { .. } => {
                        self.running = false;
                        self.signal_pause();
                        return Ok(Some(self.stop_event(vcpu, StopReason::Trap)?));
                    }
                    // No interrupt can wake it: this backend has no irqchip.
                    RunExit::Hlt { .. } => halted[i] = true,
                    other => {
                        self.running = false;
                        return Err(Self::exit_error(vcpu, &other));
                    }
                }
            }
            let all_halted = halted.iter().all(|&h| h);
            if end.is_some_and(|e| Instant::now() >= e) || all_halted {
                if all_halted && end.is_none() {
                    self.running = false;
                    return Err(AccessError::GuestGone("every vCPU halted with nothing to wake it".into()));
                }
                if all_halted {
                    if let Some(e) = end {
                        std::thread::sleep(e.saturating_duration_since(Instant::now()));
                    }
                }
                return Ok(None);
            }
        }
    }

    fn run_vcpu_until(&mut self, vcpu: VcpuId, stop_at: Gva, timeout: Duration) -> Result<RunOutcome, AccessError> {
        let deadline = Instant::now() + timeout;
        // A hardware breakpoint at `stop_at` when the host can; a `hlt` at
        // `stop_at` (the repair kernel's `repair_done`) is recognised
        // either way.
        let saved = self.hw_breakpoints();
        let mut use_bp = false;
        if self.caps.guest_debug && !saved.iter().flatten().any(|&a| a == stop_at.0) {
            let mut bps = saved;
            if let Some(free) = bps.iter_mut().find(|b| b.is_none()) {
                *free = Some(stop_at.0);
                let v = self.vcpu_mut(vcpu)?;
                v.program_breakpoints(bps)?;
                use_bp = true;
            }
        }
        let exit = self.run_one(vcpu, deadline);
        if use_bp {
            self.vcpu_mut(vcpu)?.program_breakpoints(saved)?;
        }
        let exit = exit?;
        let outcome = match exit {
            RunExit::Hlt { rip, .. } if rip.wrapping_sub(1) == stop_at.0 => {
                // Report the stop at the `hlt` itself, as a breakpoint would.
                let v = self.vcpu(vcpu)?;
                let mut r = v.regs()?;
                r.rip = stop_at.0;
                v.set_regs(&r)?;
                RunOutcome::Reached(StopEvent { vcpu, rip: stop_at, reason: StopReason::Trap })
            }
            RunExit::Debug { pc, .. } if pc == stop_at.0 => {
                RunOutcome::Reached(StopEvent { vcpu, rip: stop_at, reason: StopReason::Trap })
            }
            RunExit::Debug { .. } => RunOutcome::StoppedElsewhere(self.stop_event(vcpu, StopReason::Trap)?),
            RunExit::Hlt { .. } => RunOutcome::StoppedElsewhere(self.stop_event(vcpu, StopReason::Signal(0))?),
            RunExit::TimedOut { .. } => RunOutcome::TimedOut(self.stop_event(vcpu, StopReason::Interrupted)?),
            other => return Err(Self::exit_error(vcpu, &other)),
        };
        Ok(outcome)
    }

    fn step_vcpu(&mut self, vcpu: VcpuId) -> Result<StopEvent, AccessError> {
        if !self.caps.guest_debug {
            return Err(KvmError::MissingCap { cap: "KVM_CAP_SET_GUEST_DEBUG", consequence: "no single step" }.into());
        }
        let bps = self.hw_breakpoints();
        let mut lifted = bps;
        let rip = self.vcpu(vcpu)?.regs()?.rip;
        for b in lifted.iter_mut() {
            if *b == Some(rip) {
                *b = None;
            }
        }
        let dbg = debug_control(&lifted, true);
        self.vcpu(vcpu)?.set_guest_debug(&dbg)?;
        let exit = self.vcpu_mut(vcpu)?.run_until(Instant::now() + Duration::from_secs(5));
        self.vcpu_mut(vcpu)?.program_breakpoints(bps)?;
        match exit? {
            RunExit::Debug { .. } | RunExit::Hlt { .. } => self.stop_event(vcpu, StopReason::Trap),
            RunExit::TimedOut { .. } => Err(AccessError::Timeout { what: "a single step".into(), after: Duration::from_secs(5) }),
            other => Err(Self::exit_error(vcpu, &other)),
        }
    }

    fn set_breakpoint(&mut self, addr: Gva, kind: BpKind) -> Result<(), AccessError> {
        if kind == BpKind::Software {
            return Err(AccessError::Unsupported(
                "software breakpoints on KVM (they patch int3 into guest text); use a hardware breakpoint".into(),
            ));
        }
        let mut bps = self.hw_breakpoints();
        if bps.iter().flatten().any(|&a| a == addr.0) {
            return Ok(());
        }
        let free = bps.iter_mut().find(|b| b.is_none()).ok_or_else(|| {
            AccessError::Unsupported("a fifth hardware breakpoint (x86 has four: DR0-DR3)".into())
        })?;
        *free = Some(addr.0);
        self.program_all(bps)
    }

    fn clear_breakpoint(&mut self, addr: Gva, _kind: BpKind) -> Result<(), AccessError> {
        let mut bps = self.hw_breakpoints();
        for b in bps.iter_mut() {
            if *b == Some(addr.0) {
                *b = None;
            }
        }
        if bps == self.hw_breakpoints() {
            return Ok(());
        }
        self.program_all(bps)
    }
}
