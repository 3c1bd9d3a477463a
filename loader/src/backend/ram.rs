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

    /// Maps `path` with the layout QEMU reported for it (see
    /// [`parse_mtree_ram`], `Qmp::ram_layout` with the `qemu` feature), cross-checked
    /// against the file: every region inside it, none overlapping another
    /// in the file, and the last region ending exactly at the file's end
    /// (so the layout is of this file's RAM block, all of it mapped).
    pub fn open_checked(path: &Path, regions: Vec<RamRegion>) -> Result<Self, AccessError> {
        let size = file_size(path)?;
        check_layout(&regions, size).map_err(|why| {
            AccessError::Other(format!("QEMU's RAM layout does not fit the RAM file {} ({size:#x} bytes): {why}", path.display()))
        })?;
        Self::open_with_layout(path, regions)
    }

    /// Maps a PC (`pc` or `q35`) guest's RAM file: RAM below `low_limit`
    /// is at GPA == file offset; the rest is at 4 GiB. QEMU's `low_limit`
    /// is 3.5 GiB (pc, or 3 GiB if RAM >= 3.5 GiB) and 2 GiB for q35 with
    /// RAM >= 2.75 GiB (else 2.75 GiB); guests of 2 GiB or less have it all low.
    pub fn open_pc(path: &Path, low_limit: u64) -> Result<Self, AccessError> {
        let size = file_size(path)?;
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
        let size = file_size(path)?;
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

/// Checks a RAM layout against the size of the file behind it: each
/// region non-empty and inside the file, no two overlapping in the file or
/// in guest-physical space, and the one furthest into the file ending at
/// its end.
pub fn check_layout(regions: &[RamRegion], file_size: u64) -> Result<(), String> {
    if regions.is_empty() {
        return Err("no RAM regions".into());
    }
    let mut by_offset: Vec<&RamRegion> = regions.iter().collect();
    by_offset.sort_by_key(|r| r.file_offset);
    for (i, r) in by_offset.iter().enumerate() {
        let end = r.file_offset.checked_add(r.len).filter(|_| r.len > 0);
        if end.is_none_or(|e| e > file_size) {
            return Err(format!("region {r:?} is empty or past the end of the file"));
        }
        if let Some(next) = by_offset.get(i + 1) {
            if r.file_offset + r.len > next.file_offset {
                return Err(format!("regions {r:?} and {next:?} overlap in the file"));
            }
        }
    }
    let last = by_offset[by_offset.len() - 1];
    if last.file_offset + last.len != file_size {
        return Err(format!("the last region {last:?} ends before the file does"));
    }
    let mut by_gpa: Vec<&RamRegion> = regions.iter().collect();
    by_gpa.sort_by_key(|r| r.gpa.0);
    for w in by_gpa.windows(2) {
        if w[0].gpa.0.checked_add(w[0].len).is_none_or(|e| e > w[1].gpa.0) {
            return Err(format!("regions {:?} and {:?} overlap in guest-physical space", w[0], w[1]));
        }
    }
    Ok(())
}

/// Guest RAM's layout from QEMU's own map: the text of HMP `info mtree -f`
/// (QEMU 7.2 to 10.0). In the flat view of the `memory` address space (the
/// CPUs' view of guest-physical memory), the RAM block is the one mapped
/// at GPA 0 (`ram0` for `-machine memory-backend=ram0`, `pc.ram`
/// without); every stretch of it, read-write (`ram`) or made read-only by
/// the chipset (`rom`, the BIOS shadow below 1 MiB), is a region, at the
/// offset into the block QEMU prints after `@` (0 when absent). Adjacent
/// stretches contiguous in both spaces are merged. Lines look like
/// `0000000100000000-00000001bfffffff (prio 0, ram): ram0 @00000000c0000000`.
pub fn parse_mtree_ram(text: &str) -> Result<Vec<RamRegion>, String> {
    struct Line<'a> {
        start: u64,
        end: u64,
        kind: &'a str,
        name: &'a str,
        offset: u64,
    }
    fn line(l: &str) -> Option<Line<'_>> {
        let (range, rest) = l.trim().split_once(' ')?;
        let (start, end) = range.split_once('-')?;
        let start = u64::from_str_radix(start, 16).ok()?;
        let end = u64::from_str_radix(end, 16).ok()?;
        let rest = rest.trim_start().strip_prefix('(')?;
        let (attrs, rest) = rest.split_once("):")?;
        let kind = attrs.rsplit(',').next()?.trim();
        let rest = rest.trim();
        let (name, offset) = match rest.rsplit_once(" @") {
            Some((n, o)) if o.len() == 16 => (n.trim(), u64::from_str_radix(o, 16).ok()?),
            _ => (rest, 0),
        };
        (end >= start).then_some(Line { start, end, kind, name, offset })
    }

    // The flat view whose address-space list names "memory".
    let mut lines = text.lines();
    let mut found = false;
    for l in lines.by_ref() {
        if l.trim_start().starts_with("AS \"memory\"") {
            found = true;
            break;
        }
    }
    if !found {
        return Err("no flat view of address space \"memory\" (is this `info mtree -f`?)".into());
    }
    let entries: Vec<Line> = lines
        .take_while(|l| !l.starts_with("FlatView") && !l.trim().is_empty())
        .filter_map(line)
        .filter(|e| e.kind == "ram" || e.kind == "rom")
        .collect();
    let block = entries
        .iter()
        .find(|e| e.start == 0 && e.kind == "ram")
        .map(|e| e.name)
        .ok_or("no RAM at guest-physical address 0")?;
    let mut out: Vec<RamRegion> = Vec::new();
    for e in entries.iter().filter(|e| e.name == block) {
        let len = e.end - e.start + 1;
        match out.last_mut() {
            Some(r) if r.gpa.0 + r.len == e.start && r.file_offset + r.len == e.offset => r.len += len,
            _ => out.push(RamRegion { gpa: Gpa(e.start), file_offset: e.offset, len }),
        }
    }
    Ok(out)
}

/// The size of a guest RAM file; a missing one is named with the QEMU
/// options that make it.
fn file_size(path: &Path) -> Result<u64, AccessError> {
    std::fs::metadata(path).map(|m| m.len()).map_err(|source| AccessError::Connect {
        what: "the guest RAM file",
        addr: path.display().to_string(),
        hint: "-object memory-backend-file,mem-path=FILE,share=on,...",
        source,
    })
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

    const GIB: u64 = 1 << 30;

    fn region(gpa: u64, file_offset: u64, len: u64) -> RamRegion {
        RamRegion { gpa: Gpa(gpa), file_offset, len }
    }

    /// `info mtree -f` captured from QEMU 7.2 and 10.0 after SeaBIOS ran
    /// (`-machine memory-backend=ram0`): the BIOS shadow below 1 MiB is
    /// partly read-only (`rom`) but still the RAM block, merged in.
    #[test]
    fn parses_qemus_own_ram_map() {
        let cases: [(&str, &str, Vec<RamRegion>); 7] = [
            ("7.2 pc 512M", include_str!("testdata/mtree-7.2-pc-512M.txt"), vec![region(0, 0, GIB / 2)]),
            (
                "7.2 pc 6G",
                include_str!("testdata/mtree-7.2-pc-6G.txt"),
                vec![region(0, 0, 3 * GIB), region(4 * GIB, 3 * GIB, 3 * GIB)],
            ),
            (
                "7.2 q35 6G",
                include_str!("testdata/mtree-7.2-q35-6G.txt"),
                vec![region(0, 0, 2 * GIB), region(4 * GIB, 2 * GIB, 4 * GIB)],
            ),
            (
                "10.0 pc 20G",
                include_str!("testdata/mtree-10.0-pc-20G.txt"),
                vec![region(0, 0, 3 * GIB), region(4 * GIB, 3 * GIB, 17 * GIB)],
            ),
            (
                "10.0 q35 20G",
                include_str!("testdata/mtree-10.0-q35-20G.txt"),
                vec![region(0, 0, 2 * GIB), region(4 * GIB, 2 * GIB, 18 * GIB)],
            ),
            ("10.0 q35 512M", include_str!("testdata/mtree-10.0-q35-512M.txt"), vec![region(0, 0, GIB / 2)]),
            // Before the BIOS ran (`-S`): 768 KiB..1 MiB is QEMU's option
            // ROM and BIOS, not RAM.
            (
                "10.0 q35 6G -S",
                include_str!("testdata/mtree-10.0-q35-6G-before-bios.txt"),
                vec![region(0, 0, 0xc0000), region(0x100000, 0x100000, 2 * GIB - 0x100000), region(4 * GIB, 2 * GIB, 4 * GIB)],
            ),
        ];
        for (what, text, want) in cases {
            let got = parse_mtree_ram(text).unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(got, want, "{what}");
            let size = want.iter().map(|r| r.file_offset + r.len).max().unwrap();
            check_layout(&got, size).unwrap_or_else(|e| panic!("{what}: {e}"));
        }
    }

    #[test]
    fn mtree_parser_picks_the_block_at_zero_and_needs_the_memory_view() {
        let t = "FlatView #0\n AS \"I/O\", root: io\n Root memory region: io\n  0000000000000000-0000000000000007 (prio 0, i/o): dma-chan\n\n\
                 FlatView #1\n AS \"memory\", root: system\n AS \"cpu-memory-0\", root: system\n Root memory region: system\n\
                 \x20 0000000000000000-000000001fffffff (prio 0, ram): pc.ram\n\
                 \x20 00000000fd000000-00000000fdffffff (prio 1, ram): vga.vram\n\
                 \x20 00000000fffc0000-00000000ffffffff (prio 0, rom): pc.bios\n\
                 \x20 0000000100000000-000000013fffffff (prio 0, ram): pc.ram @0000000020000000\n";
        assert_eq!(parse_mtree_ram(t).unwrap(), vec![region(0, 0, GIB / 2), region(4 * GIB, GIB / 2, GIB)]);
        assert!(parse_mtree_ram("FlatView #0\n AS \"I/O\", root: io\n").is_err());
        assert!(parse_mtree_ram("").is_err());
    }

    #[test]
    fn layout_is_checked_against_the_file() {
        let ok = [region(0, 0, 3 * GIB), region(4 * GIB, 3 * GIB, 3 * GIB)];
        check_layout(&ok, 6 * GIB).unwrap();
        // A bigger file: the layout is not all of it (wrong file, or RAM we would not map).
        assert!(check_layout(&ok, 7 * GIB).unwrap_err().contains("ends before"));
        // A smaller file.
        assert!(check_layout(&ok, 5 * GIB).unwrap_err().contains("past the end"));
        let overlap = [region(0, 0, 3 * GIB), region(4 * GIB, 2 * GIB, 4 * GIB)];
        assert!(check_layout(&overlap, 6 * GIB).unwrap_err().contains("overlap in the file"));
        let gpa_overlap = [region(0, 0, 3 * GIB), region(2 * GIB, 3 * GIB, 3 * GIB)];
        assert!(check_layout(&gpa_overlap, 6 * GIB).unwrap_err().contains("guest-physical"));
        assert!(check_layout(&[], 0).is_err());

        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ram");
        std::fs::write(&p, vec![0u8; 0x3000]).unwrap();
        let f = RamFile::open_checked(&p, vec![region(0, 0, 0x1000), region(1 << 32, 0x1000, 0x2000)]).unwrap();
        assert_eq!(f.ram_end(), (1 << 32) + 0x2000);
        let err = RamFile::open_checked(&p, vec![region(0, 0, 0x1000)]).unwrap_err();
        assert!(err.to_string().contains("does not fit the RAM file"), "{err}");
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
