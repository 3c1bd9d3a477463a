//! Test doubles: [`MemGuest`], a whole guest in host memory (RAM,
//! registers, recorded breakpoints, a scripted run), to test the repair flow
//! without QEMU. Built for the crate's own tests, and for other crates'
//! with the `testing` feature.

use std::collections::{BTreeSet, VecDeque};
use std::time::Duration;

use crate::access::{
    translate, AccessError, BpKind, CpuState, GuestAccess, Gpa, Gva, RunOutcome, StopEvent, StopReason, VcpuId,
};

fn check(gpa: Gpa, len: usize, end: u64) -> Result<usize, AccessError> {
    match gpa.0.checked_add(len as u64) {
        Some(e) if e <= end => Ok(gpa.0 as usize),
        _ => Err(AccessError::OutOfRam { gpa, len }),
    }
}

/// What a scripted run did; see [`MemGuest::on_run`].
pub type RunScript = Box<dyn FnMut(&mut Vec<u8>, &mut [CpuState], VcpuId, Gva) -> RunOutcome + Send>;

/// One call the repair flow made, recorded by [`MemGuest`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    WritePhys(Gpa, usize),
    SetRegs(VcpuId),
    Pause,
    Resume,
    Run(VcpuId, Gva),
    Step(VcpuId),
    SetBp(Gva, BpKind),
    ClearBp(Gva, BpKind),
}

/// A guest held in host memory. RAM starts at GPA 0.
pub struct MemGuest {
    pub ram: Vec<u8>,
    pub cpus: Vec<CpuState>,
    pub breakpoints: BTreeSet<(Gva, BpKind)>,
    /// Every state-changing call, in order.
    pub log: Vec<Op>,
    /// Stops [`GuestAccess::wait_stop`] returns after a resume, in order.
    pub pending_stops: VecDeque<StopEvent>,
    /// Makes [`GuestAccess::wait_stop`] fail as if QEMU exited, once the
    /// pending stops are used up.
    pub gone: bool,
    running: bool,
    script: Option<RunScript>,
}

impl std::fmt::Debug for MemGuest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemGuest")
            .field("ram_len", &self.ram.len())
            .field("cpus", &self.cpus.len())
            .field("breakpoints", &self.breakpoints)
            .field("running", &self.running)
            .finish_non_exhaustive()
    }
}

impl MemGuest {
    pub fn new(ram_size: usize, nr_vcpus: usize) -> Self {
        Self {
            ram: vec![0; ram_size],
            cpus: vec![CpuState::default(); nr_vcpus],
            breakpoints: BTreeSet::new(),
            log: Vec::new(),
            pending_stops: VecDeque::new(),
            gone: false,
            running: false,
            script: None,
        }
    }

    /// Sets what [`GuestAccess::run_vcpu_until`] does: the closure gets
    /// RAM, every vCPU's registers, the vCPU run and the target address,
    /// and returns the outcome (e.g. write a verdict, set `rip` to
    /// `stop_at`, return [`RunOutcome::Reached`]). Without a script a run
    /// jumps straight to `stop_at`.
    pub fn on_run(&mut self, script: RunScript) {
        self.script = Some(script);
    }

    /// Queues a stop for [`GuestAccess::wait_stop`] at `rip` on `vcpu`,
    /// and moves that vCPU there, as a breakpoint hit would.
    pub fn push_breakpoint_hit(&mut self, vcpu: VcpuId, rip: Gva) {
        self.pending_stops.push_back(StopEvent { vcpu, rip, reason: StopReason::Trap });
    }

    fn cpu(&mut self, vcpu: VcpuId) -> Result<&mut CpuState, AccessError> {
        let count = self.cpus.len();
        self.cpus.get_mut(vcpu.0 as usize).ok_or(AccessError::NoSuchVcpu { vcpu, count })
    }

    fn stopped(&self) -> Result<(), AccessError> {
        if self.running { Err(AccessError::Running) } else { Ok(()) }
    }

    fn virt_to_phys(&mut self, vcpu: VcpuId, gva: Gva) -> Result<Gpa, AccessError> {
        let c = *self.cpu(vcpu)?;
        let ram = &self.ram;
        let mut rd = |g: Gpa| {
            let s = check(g, 8, ram.len() as u64)?;
            Ok(u64::from_le_bytes(ram[s..s + 8].try_into().unwrap_or([0; 8])))
        };
        translate(&mut rd, c.cr3, c.cr4, gva)?.ok_or(AccessError::NotMapped(gva))
    }

    /// Page by page, so a range crossing pages maps each on its own.
    fn virt_ranges(&mut self, vcpu: VcpuId, gva: Gva, len: usize) -> Result<Vec<(Gpa, usize, usize)>, AccessError> {
        let mut out = Vec::new();
        let mut done = 0;
        while done < len {
            let va = Gva(gva.0.wrapping_add(done as u64));
            let pa = self.virt_to_phys(vcpu, va)?;
            let n = ((0x1000 - (va.0 & 0xfff)) as usize).min(len - done);
            out.push((pa, done, n));
            done += n;
        }
        Ok(out)
    }
}

impl GuestAccess for MemGuest {
    fn read_phys(&mut self, gpa: Gpa, buf: &mut [u8]) -> Result<(), AccessError> {
        let s = check(gpa, buf.len(), self.ram.len() as u64)?;
        buf.copy_from_slice(&self.ram[s..s + buf.len()]);
        Ok(())
    }

    fn write_phys(&mut self, gpa: Gpa, data: &[u8]) -> Result<(), AccessError> {
        let s = check(gpa, data.len(), self.ram.len() as u64)?;
        self.ram[s..s + data.len()].copy_from_slice(data);
        self.log.push(Op::WritePhys(gpa, data.len()));
        Ok(())
    }

    fn read_virt(&mut self, vcpu: VcpuId, gva: Gva, buf: &mut [u8]) -> Result<(), AccessError> {
        for (pa, off, n) in self.virt_ranges(vcpu, gva, buf.len())? {
            GuestAccess::read_phys(self, pa, &mut buf[off..off + n])?;
        }
        Ok(())
    }

    fn write_virt(&mut self, vcpu: VcpuId, gva: Gva, data: &[u8]) -> Result<(), AccessError> {
        for (pa, off, n) in self.virt_ranges(vcpu, gva, data.len())? {
            GuestAccess::write_phys(self, pa, &data[off..off + n])?;
        }
        Ok(())
    }

    fn vcpus(&mut self) -> Result<Vec<VcpuId>, AccessError> {
        Ok((0..self.cpus.len() as u32).map(VcpuId).collect())
    }

    fn get_regs(&mut self, vcpu: VcpuId) -> Result<CpuState, AccessError> {
        self.stopped()?;
        self.cpu(vcpu).copied()
    }

    fn set_regs(&mut self, vcpu: VcpuId, regs: &CpuState) -> Result<(), AccessError> {
        self.stopped()?;
        *self.cpu(vcpu)? = *regs;
        self.log.push(Op::SetRegs(vcpu));
        Ok(())
    }

    fn pause(&mut self) -> Result<Option<StopEvent>, AccessError> {
        self.log.push(Op::Pause);
        if !self.running {
            return Ok(None);
        }
        self.running = false;
        let rip = Gva(self.cpus.first().map_or(0, |c| c.rip));
        Ok(Some(StopEvent { vcpu: VcpuId(0), rip, reason: StopReason::Interrupted }))
    }

    fn resume(&mut self) -> Result<(), AccessError> {
        self.stopped()?;
        self.log.push(Op::Resume);
        self.running = true;
        Ok(())
    }

    fn is_running(&self) -> bool {
        self.running
    }

    fn wait_stop(&mut self, _timeout: Option<Duration>) -> Result<Option<StopEvent>, AccessError> {
        if !self.running {
            return Err(AccessError::NotRunning);
        }
        match self.pending_stops.pop_front() {
            Some(s) => {
                self.running = false;
                self.cpu(s.vcpu)?.rip = s.rip.0;
                Ok(Some(s))
            }
            None if self.gone => Err(AccessError::GuestGone("the in-memory guest was told to go away".into())),
            None => Ok(None),
        }
    }

    fn run_vcpu_until(&mut self, vcpu: VcpuId, stop_at: Gva, _timeout: Duration) -> Result<RunOutcome, AccessError> {
        self.stopped()?;
        self.cpu(vcpu)?;
        self.log.push(Op::Run(vcpu, stop_at));
        match self.script.as_mut() {
            Some(f) => Ok(f(&mut self.ram, &mut self.cpus, vcpu, stop_at)),
            None => {
                self.cpu(vcpu)?.rip = stop_at.0;
                Ok(RunOutcome::Reached(StopEvent { vcpu, rip: stop_at, reason: StopReason::Trap }))
            }
        }
    }

    fn step_vcpu(&mut self, vcpu: VcpuId) -> Result<StopEvent, AccessError> {
        self.stopped()?;
        self.log.push(Op::Step(vcpu));
        let rip = Gva(self.cpu(vcpu)?.rip);
        Ok(StopEvent { vcpu, rip, reason: StopReason::Trap })
    }

    fn set_breakpoint(&mut self, addr: Gva, kind: BpKind) -> Result<(), AccessError> {
        self.stopped()?;
        self.breakpoints.insert((addr, kind));
        self.log.push(Op::SetBp(addr, kind));
        Ok(())
    }

    fn clear_breakpoint(&mut self, addr: Gva, kind: BpKind) -> Result<(), AccessError> {
        self.stopped()?;
        self.breakpoints.remove(&(addr, kind));
        self.log.push(Op::ClearBp(addr, kind));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_guest_memory_regs_and_bounds() {
        let mut g = MemGuest::new(0x10000, 2);
        g.write_phys(Gpa(0x100), b"hello").unwrap();
        let mut b = [0u8; 5];
        g.read_phys(Gpa(0x100), &mut b).unwrap();
        assert_eq!(&b, b"hello");
        assert!(matches!(g.read_phys(Gpa(0xfffe), &mut b), Err(AccessError::OutOfRam { .. })));
        assert!(matches!(g.read_phys(Gpa(u64::MAX), &mut b), Err(AccessError::OutOfRam { .. })));
        let r = CpuState { rip: 0x1234, ..Default::default() };
        g.set_regs(VcpuId(1), &r).unwrap();
        assert_eq!(g.get_regs(VcpuId(1)).unwrap().rip, 0x1234);
        assert!(matches!(g.get_regs(VcpuId(2)), Err(AccessError::NoSuchVcpu { .. })));
    }

    #[test]
    fn mem_guest_virtual_access_walks_page_tables() {
        let mut g = MemGuest::new(0x40000, 1);
        // cr3 = 0x1000: PML4[0] -> 0x2000 -> PDPT[0] -> 0x3000 -> PD[0] -> PT 0x4000;
        // PT[0x10] -> 0x20000, PT[0x11] -> 0x30000 (non-contiguous).
        for (at, v) in [(0x1000u64, 0x2003u64), (0x2000, 0x3003), (0x3000, 0x4003), (0x4080, 0x20003), (0x4088, 0x30003)] {
            g.write_phys(Gpa(at), &v.to_le_bytes()).unwrap();
        }
        g.cpus[0].cr3 = 0x1000;
        g.write_virt(VcpuId(0), Gva(0x10ffe), b"abcd").unwrap();
        let mut b = [0u8; 2];
        g.read_phys(Gpa(0x20ffe), &mut b).unwrap();
        assert_eq!(&b, b"ab");
        g.read_phys(Gpa(0x30000), &mut b).unwrap();
        assert_eq!(&b, b"cd");
        let mut b4 = [0u8; 4];
        g.read_virt(VcpuId(0), Gva(0x10ffe), &mut b4).unwrap();
        assert_eq!(&b4, b"abcd");
        assert!(matches!(g.read_virt(VcpuId(0), Gva(0x12000), &mut b4), Err(AccessError::NotMapped(_))));
    }

    #[test]
    fn mem_guest_scripted_run_and_stops() {
        let mut g = MemGuest::new(0x1000, 2);
        g.on_run(Box::new(|ram, cpus, v, at| {
            ram[0] = 0xaa;
            cpus[v.0 as usize].rip = at.0;
            RunOutcome::Reached(StopEvent { vcpu: v, rip: at, reason: StopReason::Trap })
        }));
        let out = g.run_vcpu_until(VcpuId(1), Gva(0x500), Duration::from_secs(1)).unwrap();
        assert!(matches!(out, RunOutcome::Reached(s) if s.rip == Gva(0x500)));
        assert_eq!((g.ram[0], g.cpus[1].rip), (0xaa, 0x500));

        g.set_breakpoint(Gva(0x800), BpKind::Hardware).unwrap();
        g.resume().unwrap();
        assert!(matches!(g.get_regs(VcpuId(0)), Err(AccessError::Running)));
        assert_eq!(g.wait_stop(Some(Duration::ZERO)).unwrap(), None);
        g.push_breakpoint_hit(VcpuId(1), Gva(0x800));
        let s = g.wait_stop(None).unwrap().unwrap();
        assert_eq!((s.vcpu, s.rip, g.cpus[1].rip), (VcpuId(1), Gva(0x800), 0x800));
        g.resume().unwrap();
        g.gone = true;
        assert!(matches!(g.wait_stop(None), Err(AccessError::GuestGone(_))));
        assert_eq!(g.log.iter().filter(|o| matches!(o, Op::Resume)).count(), 2);
    }
}
