//! Guest RAM read in QEMU's own address space, for a QEMU started without a
//! RAM file the user can name:
//! - [`ProcMem`]: `/proc/PID/mem` at the host address of QEMU's RAM block
//!   (anonymous RAM, QEMU's default), at memory speed;
//! - a shared RAM block (`memory-backend-file` or `memory-backend-memfd`
//!   with `share=on`) is reopened through `/proc/PID/fd/N` and mapped as a
//!   [`RamFile`].
//!
//! [`open_qemu_ram`] finds the block from QMP alone: QEMU's pid from the QMP
//! socket's peer ([`Qmp::peer_pid`]), the block from HMP `info ramblock`
//! (name, offset, used length; its host address too on QEMU 10, not on
//! 7.2), the mapping from `/proc/PID/maps` (matched with the block's length
//! when QEMU does not print the address), the guest-physical map from HMP
//! `info mtree -f` ([`Qmp::ram_layout`]), checked against HMP `xp`.
//!
//! Caveat, as for [`RamFile`]: under TCG QEMU does not see writes made
//! here, and keeps code it translated from the old bytes; write guest code
//! through the gdbstub ([`WithRam`](crate::ram::WithRam) does by default).
//!
//! Needs the right to trace QEMU (same user and Yama's `ptrace_scope` at 0
//! or 1 with QEMU our descendant, or `CAP_SYS_PTRACE`): the kernel's check
//! for `/proc/PID/mem`.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use crate::access::{AccessError, Gpa, PhysAccess};
use crate::qmp::Qmp;
use crate::ram::{pc_low_limit, RamFile, RamRegion};

/// One RAM block as HMP `info ramblock` lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RamBlock {
    pub name: String,
    /// Offset in QEMU's ram_addr space (not a guest-physical address).
    pub offset: u64,
    /// Bytes in use.
    pub used: u64,
    /// Host virtual address in QEMU (the `HVA` column: QEMU 10, not 7.2).
    pub host: Option<u64>,
}

/// Parses HMP `info ramblock`: a header line, then one block a line
/// (`NAME PSIZE UNIT OFFSET USED TOTAL [HVA RO]`, numbers in `0x` hex).
pub fn parse_info_ramblock(text: &str) -> Vec<RamBlock> {
    let mut out = Vec::new();
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let Some(name) = words.first() else { continue };
        let hex: Vec<u64> = words[1..]
            .iter()
            .filter_map(|w| w.strip_prefix("0x"))
            .filter_map(|h| u64::from_str_radix(h, 16).ok())
            .collect();
        if hex.len() < 3 {
            continue; // the header, or something else
        }
        out.push(RamBlock { name: name.to_string(), offset: hex[0], used: hex[1], host: hex.get(3).copied() });
    }
    out
}

/// One line of `/proc/PID/maps`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapsEntry {
    pub start: u64,
    pub end: u64,
    /// `rw-p`, `rw-s`, ...
    pub perms: String,
    /// Offset in the mapped file.
    pub offset: u64,
    pub inode: u64,
    /// The file, `[heap]`, or empty for anonymous memory.
    pub path: String,
}

impl MapsEntry {
    pub fn len(&self) -> u64 {
        self.end - self.start
    }
    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }
    fn writable(&self) -> bool {
        self.perms.starts_with("rw")
    }
    fn shared(&self) -> bool {
        self.perms.as_bytes().get(3) == Some(&b's')
    }
}

/// Parses `/proc/PID/maps`.
pub fn parse_maps(text: &str) -> Vec<MapsEntry> {
    let mut out = Vec::new();
    for line in text.lines() {
        let mut w = line.splitn(6, ' ');
        let (Some(range), Some(perms), Some(offset), Some(_dev), Some(inode)) = (w.next(), w.next(), w.next(), w.next(), w.next())
        else {
            continue;
        };
        let path = w.next().unwrap_or("").trim().to_string();
        let Some((s, e)) = range.split_once('-') else { continue };
        let (Ok(start), Ok(end), Ok(offset), Ok(inode)) =
            (u64::from_str_radix(s, 16), u64::from_str_radix(e, 16), u64::from_str_radix(offset, 16), inode.parse())
        else {
            continue;
        };
        out.push(MapsEntry { start, end, perms: perms.to_string(), offset, inode, path });
    }
    out
}

/// The PC machine's map of one RAM block: the low part at GPA 0, the rest
/// at 4 GiB (QEMU's `pc` split, see [`pc_low_limit`]); `file_offset` is the
/// offset in the block.
pub fn pc_regions(size: u64) -> Vec<RamRegion> {
    let low = size.min(pc_low_limit(size));
    let mut regions = vec![RamRegion { gpa: Gpa(0), file_offset: 0, len: low }];
    if size > low {
        regions.push(RamRegion { gpa: Gpa(1 << 32), file_offset: low, len: size - low });
    }
    regions
}

fn locate(regions: &[RamRegion], gpa: Gpa, len: usize) -> Result<u64, AccessError> {
    for r in regions {
        if gpa.0 >= r.gpa.0 && gpa.0.checked_add(len as u64).is_some_and(|e| e <= r.gpa.0 + r.len) {
            return Ok(r.file_offset + (gpa.0 - r.gpa.0));
        }
    }
    Err(AccessError::OutOfRam { gpa, len })
}

/// Guest RAM through `/proc/PID/mem` of the QEMU process: a `pread` or
/// `pwrite` at the RAM block's host address per access.
#[derive(Debug)]
pub struct ProcMem {
    mem: File,
    pid: u32,
    /// Host virtual address of the block's first byte.
    host: u64,
    regions: Vec<RamRegion>,
}

impl ProcMem {
    /// Opens `/proc/PID/mem` of QEMU, whose RAM block starts at host address
    /// `host`; `regions` maps guest-physical ranges to offsets in the block.
    pub fn open(pid: u32, host: u64, regions: Vec<RamRegion>) -> Result<Self, AccessError> {
        let path = format!("/proc/{pid}/mem");
        let mem = std::fs::OpenOptions::new().read(true).write(true).open(&path).map_err(|source| {
            AccessError::Connect {
                what: "QEMU's memory",
                addr: path.clone(),
                hint: "the right to trace it (same user; Yama ptrace_scope 0, or root/CAP_SYS_PTRACE), or a RAM file \
                       given with --ram-file (-object memory-backend-file,...,share=on)",
                source,
            }
        })?;
        Ok(Self { mem, pid, host, regions })
    }

    /// QEMU's pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The block's host address in QEMU.
    pub fn host_address(&self) -> u64 {
        self.host
    }

    pub fn regions(&self) -> &[RamRegion] {
        &self.regions
    }

    fn io_err(&self, source: std::io::Error) -> AccessError {
        match source.raw_os_error() {
            // The process is gone (ESRCH) or its memory with it (EIO on an
            // address no longer mapped: QEMU exited).
            Some(libc::ESRCH) => AccessError::GuestGone(format!("QEMU (pid {}) exited", self.pid)),
            _ => AccessError::Io { what: "QEMU's memory (/proc/PID/mem)", source },
        }
    }
}

impl PhysAccess for ProcMem {
    fn read_phys(&mut self, gpa: Gpa, buf: &mut [u8]) -> Result<(), AccessError> {
        let o = locate(&self.regions, gpa, buf.len())?;
        self.mem.read_exact_at(buf, self.host + o).map_err(|e| self.io_err(e))
    }

    fn write_phys(&mut self, gpa: Gpa, data: &[u8]) -> Result<(), AccessError> {
        let o = locate(&self.regions, gpa, data.len())?;
        self.mem.write_all_at(data, self.host + o).map_err(|e| self.io_err(e))
    }

    fn ram_end(&self) -> u64 {
        self.regions.iter().map(|r| r.gpa.0 + r.len).max().unwrap_or(0)
    }
}

/// Guest RAM found in QEMU's process by [`open_qemu_ram`].
#[derive(Debug)]
pub enum QemuRam {
    /// Anonymous RAM, through `/proc/PID/mem`.
    Mem(ProcMem),
    /// A shared RAM file or memfd, reopened through `/proc/PID/fd/N`.
    Shared(RamFile),
}

impl QemuRam {
    /// How the RAM is reached, for messages: `/proc/PID/mem at 0x...` or
    /// the file.
    pub fn describe(&self) -> String {
        match self {
            QemuRam::Mem(m) => format!("/proc/{}/mem at {:#x}", m.pid, m.host),
            QemuRam::Shared(_) => "QEMU's shared RAM file (through /proc/PID/fd)".into(),
        }
    }
}

impl PhysAccess for QemuRam {
    fn read_phys(&mut self, gpa: Gpa, buf: &mut [u8]) -> Result<(), AccessError> {
        match self {
            QemuRam::Mem(m) => m.read_phys(gpa, buf),
            QemuRam::Shared(f) => f.read_phys(gpa, buf),
        }
    }
    fn write_phys(&mut self, gpa: Gpa, data: &[u8]) -> Result<(), AccessError> {
        match self {
            QemuRam::Mem(m) => m.write_phys(gpa, data),
            QemuRam::Shared(f) => f.write_phys(gpa, data),
        }
    }
    fn ram_end(&self) -> u64 {
        match self {
            QemuRam::Mem(m) => m.ram_end(),
            QemuRam::Shared(f) => f.ram_end(),
        }
    }
}

/// The block that is the guest's main RAM: the one whose length is the RAM
/// size QMP reports (`pc.ram`, or the `memory-backend` object's), else the
/// largest.
pub fn main_ram_block(blocks: &[RamBlock], ram_size: u64) -> Option<&RamBlock> {
    blocks.iter().find(|b| b.used == ram_size).or_else(|| blocks.iter().max_by_key(|b| b.used))
}

fn other(msg: String) -> AccessError {
    AccessError::Other(msg)
}

/// Finds guest RAM in the QEMU process behind `qmp` (a Unix socket) and
/// opens the fastest path to it: the shared file when the block is shared,
/// else `/proc/PID/mem`. Guest RAM must be one block; its guest-physical
/// map is QEMU's ([`Qmp::ram_layout`]).
pub fn open_qemu_ram(qmp: &mut Qmp) -> Result<QemuRam, AccessError> {
    let pid = qmp.peer_pid().ok_or_else(|| {
        other("QEMU's process is unknown (QMP over TCP?): give QMP as a unix: socket, or --ram-file".into())
    })?;
    let ram_size = qmp.ram_size()?;
    let text = qmp.hmp("info ramblock")?;
    let blocks = parse_info_ramblock(&text);
    let block = main_ram_block(&blocks, ram_size)
        .ok_or_else(|| other(format!("no RAM block in HMP `info ramblock`: {text:?}")))?
        .clone();
    if block.used != ram_size {
        return Err(other(format!(
            "guest RAM ({ram_size:#x} bytes) is not one block (largest: {} of {:#x}); NUMA or hotplugged \
             memory is not supported without --ram-file",
            block.name, block.used
        )));
    }
    let maps_path = format!("/proc/{pid}/maps");
    let maps = parse_maps(
        &std::fs::read_to_string(&maps_path).map_err(|source| AccessError::Io { what: "QEMU's /proc/PID/maps", source })?,
    );
    let page = 4096u64;
    let len = block.used.div_ceil(page) * page;
    // The mapping that holds the block: at the address QEMU gives, else
    // every writable one of exactly the block's length (QEMU maps each
    // block on its own, with a guard page after it).
    let candidates: Vec<(u64, &MapsEntry)> = match block.host {
        Some(h) => maps.iter().filter(|m| m.start <= h && h + len <= m.end).map(|m| (h, m)).collect(),
        None => maps.iter().filter(|m| m.writable() && m.len() == len).map(|m| (m.start, m)).collect(),
    };
    if candidates.is_empty() {
        return Err(other(format!(
            "no mapping of QEMU (pid {pid}) holds RAM block {} ({:#x} bytes{})",
            block.name,
            block.used,
            block.host.map(|h| format!(" at {h:#x}")).unwrap_or_default()
        )));
    }
    // QEMU's own map of the block (any machine); the `pc` split if it
    // cannot be read.
    let regions = match qmp.ram_layout() {
        Ok(r) if r.iter().all(|r| r.file_offset + r.len <= block.used) => r,
        other => {
            tracing::warn!("QEMU's RAM map ({other:?}) is unusable; assuming the pc machine's");
            pc_regions(block.used)
        }
    };
    let mut tried = Vec::new();
    for (host, m) in &candidates {
        let mut ram = open_at(pid, *host, m, regions.clone())?;
        match verify(qmp, &mut ram, &regions) {
            Ok(()) => return Ok(ram),
            Err(why) => tried.push(format!("{host:#x}: {why}")),
        }
    }
    Err(other(format!("no mapping of QEMU (pid {pid}) reads as guest RAM (HMP xp disagrees): {}", tried.join("; "))))
}

/// Opens the block at host address `host` inside mapping `m`: through the
/// file when the mapping is a shared file, else `/proc/PID/mem`.
fn open_at(pid: u32, host: u64, m: &MapsEntry, regions: Vec<RamRegion>) -> Result<QemuRam, AccessError> {
    if m.shared() && m.inode != 0 {
        if let Some(fd) = fd_of(pid, m) {
            let base = m.offset + (host - m.start);
            let shifted = regions.iter().map(|r| RamRegion { file_offset: r.file_offset + base, ..*r }).collect();
            match RamFile::open_with_layout(&fd, shifted) {
                Ok(f) => return Ok(QemuRam::Shared(f)),
                Err(e) => tracing::warn!("QEMU's RAM file {}: {e}; reading /proc/{pid}/mem instead", fd.display()),
            }
        }
    }
    ProcMem::open(pid, host, regions).map(QemuRam::Mem)
}

/// The `/proc/PID/fd/N` of QEMU's open file mapped by `m` (same inode).
fn fd_of(pid: u32, m: &MapsEntry) -> Option<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let dir = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    dir.flatten().map(|e| e.path()).find(|p| std::fs::metadata(p).is_ok_and(|md| md.ino() == m.inode))
}

/// Checks `ram` against QEMU's own view (HMP `xp`) at a few places in the
/// largest RAM region: of the samples not zero on either side, most must agree (the guest
/// runs meanwhile); all-zero samples tell nothing.
fn verify(qmp: &mut Qmp, ram: &mut QemuRam, regions: &[RamRegion]) -> Result<(), String> {
    let Some(big) = regions.iter().max_by_key(|r| r.len) else { return Err("no RAM regions".into()) };
    let (mut nonzero, mut agree) = (0, 0);
    for i in 1..=16u64 {
        let gpa = (big.gpa.0 + big.len / 17 * i) & !0xfff;
        if gpa < 0x10_0000 {
            continue; // below 1 MiB: ROM shadows and holes, not plain RAM
        }
        let text = qmp.hmp(&format!("xp /4gx {gpa:#x}")).map_err(|e| e.to_string())?;
        let theirs: Vec<u64> = text
            .split_once(':')
            .map(|(_, r)| r)
            .unwrap_or("")
            .split_whitespace()
            .filter_map(|w| w.strip_prefix("0x").and_then(|h| u64::from_str_radix(h, 16).ok()))
            .collect();
        let mut b = [0u8; 32];
        ram.read_phys(Gpa(gpa), &mut b).map_err(|e| e.to_string())?;
        let ours: Vec<u64> = b.chunks(8).map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect();
        if theirs.len() < 2 {
            return Err(format!("cannot read HMP `xp` output {text:?}"));
        }
        let n = theirs.len().min(ours.len());
        if theirs[..n].iter().chain(&ours[..n]).all(|&w| w == 0) {
            continue;
        }
        nonzero += 1;
        if theirs[..n] == ours[..n] {
            agree += 1;
        }
    }
    if agree * 2 >= nonzero {
        Ok(())
    } else {
        Err(format!("{agree} of {nonzero} samples agree"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_info_ramblock_of_qemu_7_2_and_10() {
        let q72 = "              Block Name    PSize              Offset               Used              Total\n\
                   \x20                 pc.ram    4 KiB  0x0000000000000000 0x0000000020000000 0x0000000020000000\n\
                   \x20   /rom@etc/acpi/tables    4 KiB  0x0000000020080000 0x0000000000020000 0x0000000000200000\n";
        let b = parse_info_ramblock(q72);
        assert_eq!(b.len(), 2);
        assert_eq!(b[0], RamBlock { name: "pc.ram".into(), offset: 0, used: 0x2000_0000, host: None });
        let q10 = "              Block Name    PSize              Offset               Used              Total                HVA  RO\n\
                   \x20                 pc.ram    4 KiB  0x0000000000000000 0x0000000020000000 0x0000000020000000 0x00007f50b7e00000  rw\n\
                   \x20                pc.bios    4 KiB  0x0000000020000000 0x0000000000040000 0x0000000000040000 0x00007f50df600000  ro\n";
        let b = parse_info_ramblock(q10);
        assert_eq!(b[0].host, Some(0x7f50_b7e0_0000));
        assert_eq!(main_ram_block(&b, 0x2000_0000).unwrap().name, "pc.ram");
    }

    #[test]
    fn parses_maps_and_splits_pc_ram() {
        let m = parse_maps(
            "7f50b7e00000-7f50d7e00000 rw-p 00000000 00:00 0 \n\
             7f50d7e00000-7f50d7e01000 ---p 00000000 00:00 0 \n\
             7f0000000000-7f0020000000 rw-s 00000000 00:1a 1234                       /dev/shm/guest-ram-x/ram\n",
        );
        assert_eq!(m.len(), 3);
        assert_eq!(m[0].len(), 0x2000_0000);
        assert!(m[0].writable() && !m[0].shared() && m[0].path.is_empty());
        assert!(m[2].shared() && m[2].inode == 1234 && m[2].path == "/dev/shm/guest-ram-x/ram");
        let r = pc_regions(6 << 30);
        assert_eq!(r[0].len, 0xc000_0000);
        assert_eq!(r[1], RamRegion { gpa: Gpa(1 << 32), file_offset: 0xc000_0000, len: (6 << 30) - 0xc000_0000 });
        assert_eq!(locate(&r, Gpa(1 << 32), 8).unwrap(), 0xc000_0000);
        assert!(locate(&r, Gpa(0xc000_0000), 8).is_err());
    }

    #[test]
    fn proc_mem_reads_and_writes_our_own_memory() {
        let mut block = vec![0u8; 0x3000];
        block[0x1000..0x1004].copy_from_slice(b"ramb");
        let host = block.as_ptr() as u64;
        let mut m = ProcMem::open(std::process::id(), host, pc_regions(0x3000)).unwrap();
        let mut b = [0u8; 4];
        m.read_phys(Gpa(0x1000), &mut b).unwrap();
        assert_eq!(&b, b"ramb");
        m.write_phys(Gpa(0x2000), b"done").unwrap();
        m.read_phys(Gpa(0x2000), &mut b).unwrap();
        assert_eq!(&b, b"done");
        assert!(m.read_phys(Gpa(0x2ffe), &mut b).is_err());
    }
}
