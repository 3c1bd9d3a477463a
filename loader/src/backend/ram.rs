//! Guest RAM straight from the host:
//! - [`RamFile`]: guest RAM read and written through a shared mapping of
//!   QEMU's `memory-backend-file`;
//! - [`WithRam`]: a [`GuestAccess`] whose memory goes through a
//!   [`PhysAccess`] (registers and breakpoints through the inner backend).

use std::path::Path;
use std::time::Duration;

use crate::access::{translate, AccessError, BpKind, CpuState, GuestAccess, Gpa, Gva, PhysAccess, RunOutcome, StopEvent, VcpuId};

/// One stretch of guest-physical RAM inside the backing file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamRegion {
    pub gpa: Gpa,
    pub file_offset: u64,
    pub len: u64,
}

/// Guest RAM mapped from the file behind QEMU's
/// `-object memory-backend-file,id=ram0,size=S,mem-path=FILE,share=on
/// -machine memory-backend=ram0`.
///
/// Reads and writes go to the same pages QEMU uses (`MAP_SHARED`), at
/// memory speed. Caveat under TCG: QEMU does not see these writes, so it
/// keeps any code it translated from the old bytes. Write guest code that
/// may already have run (kernel text) through the gdbstub instead; see
/// [`WithRam::write_through`].
#[derive(Debug)]
pub struct RamFile {
    map: memmap2::MmapMut,
    regions: Vec<RamRegion>,
}

impl RamFile {
    /// Maps `path` with an explicit GPA layout.
    pub fn open_with_layout(path: &Path, regions: Vec<RamRegion>) -> Result<Self, AccessError> {
        let file = std::fs::OpenOptions::new().read(true).write(true).open(path).map_err(|source| {
            AccessError::Connect {
                what: "the guest RAM file",
                addr: path.display().to_string(),
                hint: "-object memory-backend-file,mem-path=FILE,share=on,... -machine memory-backend=ID",
                source,
            }
        })?;
        let size = file.metadata().map_err(|source| AccessError::Io { what: "the guest RAM file", source })?.len();
        for r in &regions {
            if r.file_offset.checked_add(r.len).is_none_or(|e| e > size) {
                return Err(AccessError::Other(format!(
                    "the RAM file {} has {size:#x} bytes, too few for region {r:?}; is the size right?",
                    path.display()
                )));
            }
        }
        // SAFETY: the mapping is shared with QEMU, which changes it under
        // us; we only ever copy bytes in and out (never hand out references
        // into it), so concurrent changes cannot break Rust's aliasing
        // rules for any value we hold. The file is not truncated while
        // QEMU runs.
        let map = unsafe { memmap2::MmapOptions::new().len(size as usize).map_mut(&file) }
            .map_err(|source| AccessError::Io { what: "mmap of the guest RAM file", source })?;
        Ok(Self { map, regions })
    }

    /// Maps a PC (`pc` or `q35`) guest's RAM file: RAM below `low_limit`
    /// is at GPA == file offset; the rest is at 4 GiB. QEMU's `low_limit`
    /// is 3.5 GiB (pc, or 3 GiB if RAM >= 3.5 GiB) and 2 GiB for q35 with
    /// RAM >= 2.75 GiB (else 2.75 GiB); guests of 2 GiB or less have it all low.
    pub fn open_pc(path: &Path, low_limit: u64) -> Result<Self, AccessError> {
        let size = std::fs::metadata(path)
            .map_err(|source| AccessError::Connect {
                what: "the guest RAM file",
                addr: path.display().to_string(),
                hint: "-object memory-backend-file,mem-path=FILE,share=on,...",
                source,
            })?
            .len();
        let low = size.min(low_limit);
        let mut regions = vec![RamRegion { gpa: Gpa(0), file_offset: 0, len: low }];
        if size > low {
            regions.push(RamRegion { gpa: Gpa(1 << 32), file_offset: low, len: size - low });
        }
        Self::open_with_layout(path, regions)
    }

    /// Maps the RAM file of a guest of QEMU's default `pc` machine
    /// (i440fx): RAM up to 3.5 GiB is all low; from 3.5 GiB on, the low
    /// part ends at 3 GiB (QEMU's `pc_init1`: `lowmem` 0xe0000000, or
    /// 0xc0000000 when RAM reaches 0xe0000000). Guests of another machine
    /// (`q35` splits lower) need [`RamFile::open_with_layout`].
    pub fn open_pc_file(path: &Path) -> Result<Self, AccessError> {
        let size = std::fs::metadata(path)
            .map_err(|source| AccessError::Connect {
                what: "the guest RAM file",
                addr: path.display().to_string(),
                hint: "-object memory-backend-file,mem-path=FILE,share=on,...",
                source,
            })?
            .len();
        Self::open_pc(path, pc_low_limit(size))
    }

    fn locate(&self, gpa: Gpa, len: usize) -> Result<usize, AccessError> {
        for r in &self.regions {
            if gpa.0 >= r.gpa.0 && gpa.0.checked_add(len as u64).is_some_and(|e| e <= r.gpa.0 + r.len) {
                return Ok((r.file_offset + (gpa.0 - r.gpa.0)) as usize);
            }
        }
        Err(AccessError::OutOfRam { gpa, len })
    }

    pub fn regions(&self) -> &[RamRegion] {
        &self.regions
    }
}

impl PhysAccess for RamFile {
    fn read_phys(&mut self, gpa: Gpa, buf: &mut [u8]) -> Result<(), AccessError> {
        let o = self.locate(gpa, buf.len())?;
        buf.copy_from_slice(&self.map[o..o + buf.len()]);
        Ok(())
    }

    fn write_phys(&mut self, gpa: Gpa, data: &[u8]) -> Result<(), AccessError> {
        let o = self.locate(gpa, data.len())?;
        self.map[o..o + data.len()].copy_from_slice(data);
        Ok(())
    }

    fn ram_end(&self) -> u64 {
        self.regions.iter().map(|r| r.gpa.0 + r.len).max().unwrap_or(0)
    }
}

/// A [`GuestAccess`] whose physical reads (and, by choice, writes) go
/// through a fast [`PhysAccess`], everything else through `inner`.
/// Virtual reads are translated here, over the fast memory, with the
/// vCPU's CR3.
#[derive(Debug)]
pub struct WithRam<A, M> {
    pub inner: A,
    pub mem: M,
    write_through: bool,
}

impl<A: GuestAccess, M: PhysAccess> WithRam<A, M> {
    /// Reads through `mem`; writes through `inner` (safe for code under
    /// TCG, see [`RamFile`]).
    pub fn new(inner: A, mem: M) -> Self {
        Self { inner, mem, write_through: false }
    }

    /// `true`: writes go to `mem` as well (fast; right under KVM, and under
    /// TCG for memory whose old contents never ran as code).
    pub fn write_through(mut self, on: bool) -> Self {
        self.write_through = on;
        self
    }

    fn virt_ranges(&mut self, vcpu: VcpuId, gva: Gva, len: usize) -> Result<Vec<(Gpa, usize, usize)>, AccessError> {
        let c = self.inner.get_regs(vcpu)?;
        let mut out = Vec::new();
        let mut done = 0;
        while done < len {
            let va = Gva(gva.0.wrapping_add(done as u64));
            let mem = &mut self.mem;
            let mut rd = |g: Gpa| {
                let mut b = [0u8; 8];
                mem.read_phys(g, &mut b)?;
                Ok(u64::from_le_bytes(b))
            };
            let pa = translate(&mut rd, c.cr3, c.cr4, va)?.ok_or(AccessError::NotMapped(va))?;
            let n = ((0x1000 - (va.0 & 0xfff)) as usize).min(len - done);
            out.push((pa, done, n));
            done += n;
        }
        Ok(out)
    }
}

impl<A: GuestAccess, M: PhysAccess> GuestAccess for WithRam<A, M> {
    fn read_phys(&mut self, gpa: Gpa, buf: &mut [u8]) -> Result<(), AccessError> {
        self.mem.read_phys(gpa, buf)
    }

    fn write_phys(&mut self, gpa: Gpa, data: &[u8]) -> Result<(), AccessError> {
        if self.write_through { self.mem.write_phys(gpa, data) } else { self.inner.write_phys(gpa, data) }
    }

    fn write_phys_data(&mut self, gpa: Gpa, data: &[u8]) -> Result<(), AccessError> {
        self.mem.write_phys(gpa, data)
    }

    fn read_virt(&mut self, vcpu: VcpuId, gva: Gva, buf: &mut [u8]) -> Result<(), AccessError> {
        if self.inner.is_running() {
            return Err(AccessError::Running);
        }
        for (pa, off, n) in self.virt_ranges(vcpu, gva, buf.len())? {
            self.mem.read_phys(pa, &mut buf[off..off + n])?;
        }
        Ok(())
    }

    fn write_virt(&mut self, vcpu: VcpuId, gva: Gva, data: &[u8]) -> Result<(), AccessError> {
        if self.write_through {
            for (pa, off, n) in self.virt_ranges(vcpu, gva, data.len())? {
                self.mem.write_phys(pa, &data[off..off + n])?;
            }
            Ok(())
        } else {
            self.inner.write_virt(vcpu, gva, data)
        }
    }

    fn vcpus(&mut self) -> Result<Vec<VcpuId>, AccessError> {
        self.inner.vcpus()
    }
    fn get_regs(&mut self, vcpu: VcpuId) -> Result<CpuState, AccessError> {
        self.inner.get_regs(vcpu)
    }
    fn set_regs(&mut self, vcpu: VcpuId, regs: &CpuState) -> Result<(), AccessError> {
        self.inner.set_regs(vcpu, regs)
    }
    fn pause(&mut self) -> Result<Option<StopEvent>, AccessError> {
        self.inner.pause()
    }
    fn resume(&mut self) -> Result<(), AccessError> {
        self.inner.resume()
    }
    fn is_running(&self) -> bool {
        self.inner.is_running()
    }
    fn wait_stop(&mut self, timeout: Option<Duration>) -> Result<Option<StopEvent>, AccessError> {
        self.inner.wait_stop(timeout)
    }
    fn release_stop(&mut self) {
        self.inner.release_stop()
    }
    fn assume_stopped(&mut self) {
        self.inner.assume_stopped()
    }
    fn run_vcpu_until(&mut self, vcpu: VcpuId, stop_at: Gva, timeout: Duration) -> Result<RunOutcome, AccessError> {
        self.inner.run_vcpu_until(vcpu, stop_at, timeout)
    }
    fn step_vcpu(&mut self, vcpu: VcpuId) -> Result<StopEvent, AccessError> {
        self.inner.step_vcpu(vcpu)
    }
    fn set_breakpoint(&mut self, addr: Gva, kind: BpKind) -> Result<(), AccessError> {
        self.inner.set_breakpoint(addr, kind)
    }
    fn clear_breakpoint(&mut self, addr: Gva, kind: BpKind) -> Result<(), AccessError> {
        self.inner.clear_breakpoint(addr, kind)
    }
}

/// Where QEMU's `pc` machine ends low RAM for a guest of `ram_size` bytes.
pub fn pc_low_limit(ram_size: u64) -> u64 {
    const LOWMEM: u64 = 0xe000_0000;
    if ram_size >= LOWMEM { 0xc000_0000 } else { LOWMEM }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pc_machine_splits_low_ram_as_qemu_does() {
        assert_eq!(pc_low_limit(512 << 20), 0xe000_0000);
        assert_eq!(pc_low_limit(0xdfff_ffff), 0xe000_0000);
        assert_eq!(pc_low_limit(0xe000_0000), 0xc000_0000);
        assert_eq!(pc_low_limit(6 << 30), 0xc000_0000);
    }

    #[test]
    fn ram_file_maps_low_and_high_ram() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ram");
        std::fs::write(&p, vec![0u8; 0x3000]).unwrap();
        let mut f = RamFile::open_pc(&p, 0x2000).unwrap();
        assert_eq!(f.regions().len(), 2);
        f.write_phys(Gpa(0x1ffc), b"lowx").unwrap();
        f.write_phys(Gpa(1 << 32), b"high").unwrap();
        assert!(f.write_phys(Gpa(0x1ffe), b"span").is_err());
        assert!(f.write_phys(Gpa(0x2000), b"hole").is_err());
        assert_eq!(f.ram_end(), (1 << 32) + 0x1000);
        drop(f);
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(&bytes[0x1ffc..0x2004], b"lowxhigh");
    }
}
