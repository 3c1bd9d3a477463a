//! Crash replay: a QEMU `dump-guest-memory` ELF dump taken at the trap (the
//! crashed vCPU at the entry of `panic`) is loaded into a fresh in-process
//! KVM VM (its RAM from the `PT_LOAD`s, each vCPU's state from the `QEMU`
//! CPU-state notes), and the repair kernel runs there in
//! [`Mode::Diagnose`]: the verdict is reported, not applied.
//!
//! Useful on its own for post-mortem of dumps, and the way the KVM backend
//! is tested on real crash states on a host where Linux cannot boot under
//! KVM.
//!
//! The dump format (QEMU `dump/dump.c`, `target/i386/arch_dump.c`): an
//! `ET_CORE` ELF64; `PT_LOAD` per guest RAM block with `p_paddr` = its
//! guest-physical address; one `PT_NOTE` holding, per vCPU in order, a
//! `CORE`/`NT_PRSTATUS` note, then per vCPU a `QEMU` note (type 0) with
//! `QEMUCPUState`: general registers, the six segments, LDT, TR, GDT, IDT
//! (selector, limit, descriptor flags, base), CR0-CR4 and, in newer QEMUs,
//! `kernel_gs_base`. EFER is not in the dump: it is inferred (long mode
//! from CS.L, SCE, and NXE where this host's CPU has NX), which the
//! repair kernel does not depend on.

use crate::access::{Gpa, VcpuId};
use crate::flow::{FlowError, Mode, Outcome};
use crate::kvm::memory::{OwnedMmap, Region};
use crate::kvm::vcpu::MSR_KERNEL_GS_BASE;
use crate::kvm::{Caps, EmbedConfig, GuestMemory, KvmError, KvmGuest, Repairer, StagingSlot};
use crate::flow::{crash_kind_name, reason_name};
use kvm_bindings::{kvm_dtable, kvm_regs, kvm_segment, kvm_sregs, KVM_MAX_CPUID_ENTRIES};
use repair_kernel::contract::RunStatus;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Errors of reading a dump or replaying it.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("cannot read the dump {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a QEMU x86_64 ELF dump: {why} (make one with QMP `dump-guest-memory` without `format`, i.e. ELF)")]
    NotADump { path: PathBuf, why: String },
    #[error("{path} has no CPU state for vCPU {cpu} ({why}); take the dump with QEMU >= 1.7, which writes QEMU CPU-state notes")]
    NoCpuState { path: PathBuf, cpu: usize, why: String },
    #[error("no vCPU of the dump is at the entry of panic ({panic:#x}; rips: {rips}): replay needs a dump taken at the trap (the loader's breakpoint at panic)")]
    NotAtTrap { panic: u64, rips: String },
    #[error(transparent)]
    Kvm(#[from] KvmError),
    #[error(transparent)]
    Flow(#[from] FlowError),
}

/// One segment register as QEMU keeps it (`QEMUCPUSegment`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct DumpSegment {
    pub selector: u32,
    pub limit: u32,
    /// The descriptor's high dword bits QEMU keeps (`DESC_*_MASK`).
    pub flags: u32,
    pub base: u64,
}

impl DumpSegment {
    /// As `kvm_segment` (QEMU's own `set_seg` in `target/i386/kvm/kvm.c`).
    pub fn to_kvm(self) -> kvm_segment {
        let f = self.flags;
        let present = ((f >> 15) & 1) as u8;
        kvm_segment {
            base: self.base,
            limit: self.limit,
            selector: self.selector as u16,
            type_: ((f >> 8) & 15) as u8,
            present,
            dpl: ((f >> 13) & 3) as u8,
            db: ((f >> 22) & 1) as u8,
            s: ((f >> 12) & 1) as u8,
            l: ((f >> 21) & 1) as u8,
            g: ((f >> 23) & 1) as u8,
            avl: ((f >> 20) & 1) as u8,
            unusable: (present == 0) as u8,
            padding: 0,
        }
    }
}

/// A vCPU's state from the dump's `QEMU` note.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct DumpCpu {
    pub version: u32,
    /// Bytes of the note's `QEMUCPUState` (newer QEMUs append fields).
    pub size: u32,
    /// rax rbx rcx rdx rsi rdi rsp rbp r8..r15, in QEMU's order.
    pub gprs: [u64; 16],
    pub rip: u64,
    pub rflags: u64,
    pub cs: DumpSegment,
    pub ds: DumpSegment,
    pub es: DumpSegment,
    pub fs: DumpSegment,
    pub gs: DumpSegment,
    pub ss: DumpSegment,
    pub ldt: DumpSegment,
    pub tr: DumpSegment,
    pub gdt: DumpSegment,
    pub idt: DumpSegment,
    pub cr: [u64; 5],
    pub kernel_gs_base: Option<u64>,
}

/// Size of `QEMUCPUState` up to and including `cr[5]`.
const QEMU_CPU_STATE_MIN: usize = 8 + 18 * 8 + 10 * 24 + 5 * 8;

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

impl DumpCpu {
    fn parse(desc: &[u8]) -> Option<DumpCpu> {
        if desc.len() < QEMU_CPU_STATE_MIN {
            return None;
        }
        let size = le32(desc, 4);
        let mut gprs = [0u64; 16];
        for (i, g) in gprs.iter_mut().enumerate() {
            *g = le64(desc, 8 + i * 8);
        }
        let seg = |i: usize| {
            let at = 8 + 18 * 8 + i * 24;
            DumpSegment { selector: le32(desc, at), limit: le32(desc, at + 4), flags: le32(desc, at + 8), base: le64(desc, at + 16) }
        };
        let cr_at = 8 + 18 * 8 + 10 * 24;
        let mut cr = [0u64; 5];
        for (i, c) in cr.iter_mut().enumerate() {
            *c = le64(desc, cr_at + i * 8);
        }
        let kgs_at = cr_at + 40;
        let kernel_gs_base =
            (size as usize >= kgs_at + 8 && desc.len() >= kgs_at + 8).then(|| le64(desc, kgs_at));
        Some(DumpCpu {
            version: le32(desc, 0),
            size,
            gprs,
            rip: le64(desc, 8 + 16 * 8),
            rflags: le64(desc, 8 + 17 * 8),
            cs: seg(0),
            ds: seg(1),
            es: seg(2),
            fs: seg(3),
            gs: seg(4),
            ss: seg(5),
            ldt: seg(6),
            tr: seg(7),
            gdt: seg(8),
            idt: seg(9),
            cr,
            kernel_gs_base,
        })
    }

    /// The general registers as `kvm_regs`.
    pub fn kvm_regs(&self) -> kvm_regs {
        let g = &self.gprs;
        kvm_regs {
            rax: g[0],
            rbx: g[1],
            rcx: g[2],
            rdx: g[3],
            rsi: g[4],
            rdi: g[5],
            rsp: g[6],
            rbp: g[7],
            r8: g[8],
            r9: g[9],
            r10: g[10],
            r11: g[11],
            r12: g[12],
            r13: g[13],
            r14: g[14],
            r15: g[15],
            rip: self.rip,
            rflags: self.rflags,
        }
    }

    /// EFER, which the dump does not carry: LME|LMA when in long mode, SCE
    /// (every x86_64 Linux enables syscall), NXE when `nx` (the host CPU has
    /// it: Linux turns it on whenever the CPU does).
    pub fn inferred_efer(&self, nx: bool) -> u64 {
        let long = self.cr[0] & (1 << 31) != 0 && self.cs.flags & (1 << 21) != 0;
        if !long {
            return 0;
        }
        let mut efer = (1 << 0) | (1 << 8) | (1 << 10);
        if nx {
            efer |= 1 << 11;
        }
        efer
    }

    /// The special registers on top of a vCPU's defaults (`base`: its
    /// `KVM_GET_SREGS`, for the APIC base).
    pub fn kvm_sregs(&self, base: &kvm_sregs, nx: bool) -> kvm_sregs {
        let dt = |s: DumpSegment| kvm_dtable { base: s.base, limit: s.limit as u16, padding: [0; 3] };
        kvm_sregs {
            cs: self.cs.to_kvm(),
            ds: self.ds.to_kvm(),
            es: self.es.to_kvm(),
            fs: self.fs.to_kvm(),
            gs: self.gs.to_kvm(),
            ss: self.ss.to_kvm(),
            tr: self.tr.to_kvm(),
            ldt: self.ldt.to_kvm(),
            gdt: dt(self.gdt),
            idt: dt(self.idt),
            cr0: self.cr[0],
            cr2: self.cr[2],
            cr3: self.cr[3],
            cr4: self.cr[4],
            cr8: 0,
            efer: self.inferred_efer(nx),
            apic_base: base.apic_base,
            interrupt_bitmap: [0; 4],
        }
    }
}

/// A `PT_LOAD` of the dump.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Load {
    pub paddr: u64,
    pub offset: u64,
    pub size: u64,
}

/// A QEMU ELF dump, parsed (memory is read from the file on demand).
#[derive(Debug)]
pub struct CoreDump {
    pub path: PathBuf,
    file: File,
    pub loads: Vec<Load>,
    pub cpus: Vec<DumpCpu>,
    /// `NT_PRSTATUS` rip of each vCPU, a cross-check of the QEMU notes.
    pub prstatus_rips: Vec<u64>,
}

/// Largest note segment accepted (a dump has a few KiB of notes per vCPU).
const MAX_NOTES: u64 = 64 << 20;

impl CoreDump {
    pub fn open(path: &Path) -> Result<CoreDump, ReplayError> {
        let io = |source| ReplayError::Io { path: path.to_path_buf(), source };
        let bad = |why: String| ReplayError::NotADump { path: path.to_path_buf(), why };
        let file = File::open(path).map_err(io)?;
        let file_len = file.metadata().map_err(io)?.len();
        let mut eh = [0u8; 64];
        file.read_exact_at(&mut eh, 0).map_err(io)?;
        if &eh[..4] != b"\x7fELF" || eh[4] != 2 || eh[5] != 1 {
            return Err(bad("not a little-endian ELF64 file".into()));
        }
        let e_type = u16::from_le_bytes([eh[16], eh[17]]);
        let machine = u16::from_le_bytes([eh[18], eh[19]]);
        if e_type != 4 || machine != 62 {
            return Err(bad(format!("e_type {e_type} / e_machine {machine}, want ET_CORE (4) / x86_64 (62)")));
        }
        let phoff = le64(&eh, 32);
        let shoff = le64(&eh, 40);
        let phentsize = u16::from_le_bytes([eh[54], eh[55]]) as u64;
        let mut phnum = u16::from_le_bytes([eh[56], eh[57]]) as u64;
        if phentsize < 56 {
            return Err(bad(format!("program header size {phentsize}")));
        }
        if phnum == 0xffff {
            // PN_XNUM: the count is in section header 0's sh_info.
            let mut sh = [0u8; 64];
            file.read_exact_at(&mut sh, shoff).map_err(io)?;
            phnum = le32(&sh, 44) as u64;
        }
        if phoff.checked_add(phnum * phentsize).is_none_or(|e| e > file_len) {
            return Err(bad("program headers past the end of the file".into()));
        }
        let mut ph = vec![0u8; (phnum * phentsize) as usize];
        file.read_exact_at(&mut ph, phoff).map_err(io)?;
        let mut loads = Vec::new();
        let mut notes = Vec::new();
        for i in 0..phnum as usize {
            let p = &ph[i * phentsize as usize..];
            let (ty, offset, paddr, filesz) = (le32(p, 0), le64(p, 8), le64(p, 24), le64(p, 32));
            if offset.checked_add(filesz).is_none_or(|e| e > file_len) {
                return Err(bad(format!("segment {i} [{offset:#x}, +{filesz:#x}) past the end of the file (truncated dump?)")));
            }
            match ty {
                1 if filesz > 0 => loads.push(Load { paddr, offset, size: filesz }),
                4 => {
                    if filesz > MAX_NOTES {
                        return Err(bad(format!("note segment of {filesz} bytes")));
                    }
                    let mut n = vec![0u8; filesz as usize];
                    file.read_exact_at(&mut n, offset).map_err(io)?;
                    notes.push(n);
                }
                _ => {}
            }
        }
        if loads.is_empty() {
            return Err(bad("no PT_LOAD (no guest memory)".into()));
        }
        loads.sort_by_key(|l| l.paddr);
        let mut cpus = Vec::new();
        let mut prstatus_rips = Vec::new();
        for n in &notes {
            for (name, ty, desc) in parse_notes(n) {
                match (name, ty) {
                    (b"CORE", 1) if desc.len() >= 112 + 27 * 8 => prstatus_rips.push(le64(desc, 112 + 16 * 8)),
                    (b"QEMU", 0) => {
                        let cpu = DumpCpu::parse(desc).ok_or_else(|| ReplayError::NoCpuState {
                            path: path.to_path_buf(),
                            cpu: cpus.len(),
                            why: format!("QEMU note of {} bytes, want >= {QEMU_CPU_STATE_MIN}", desc.len()),
                        })?;
                        cpus.push(cpu);
                    }
                    _ => {}
                }
            }
        }
        if cpus.is_empty() {
            return Err(ReplayError::NoCpuState { path: path.to_path_buf(), cpu: 0, why: "no QEMU note".into() });
        }
        for (i, (c, r)) in cpus.iter().zip(&prstatus_rips).enumerate() {
            if c.rip != *r {
                return Err(bad(format!("vCPU {i}: QEMU note rip {:#x} but NT_PRSTATUS rip {r:#x}", c.rip)));
            }
        }
        Ok(CoreDump { path: path.to_path_buf(), file, loads, cpus, prstatus_rips })
    }

    /// Guest RAM as page-aligned contiguous ranges `[start, end)`.
    pub fn ram_ranges(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for l in &self.loads {
            let (s, e) = (l.paddr & !0xfff, (l.paddr + l.size).next_multiple_of(4096));
            match out.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => out.push((s, e)),
            }
        }
        out
    }

    /// Fills `buf` (guest-physical `[start, start + len)`) from the loads
    /// inside it; bytes no load covers are left as they are.
    pub fn fill(&self, start: u64, buf: &mut [u8]) -> Result<(), ReplayError> {
        let end = start + buf.len() as u64;
        for l in self.loads.iter().filter(|l| l.paddr < end && start < l.paddr + l.size) {
            let s = l.paddr.max(start);
            let e = (l.paddr + l.size).min(end);
            let dst = &mut buf[(s - start) as usize..(e - start) as usize];
            self.file
                .read_exact_at(dst, l.offset + (s - l.paddr))
                .map_err(|source| ReplayError::Io { path: self.path.clone(), source })?;
        }
        Ok(())
    }
}

/// `(name, type, desc)` of each ELF note; stops at the first malformed one.
fn parse_notes(mut b: &[u8]) -> Vec<(&[u8], u32, &[u8])> {
    let mut out = Vec::new();
    while b.len() >= 12 {
        let (namesz, descsz, ty) = (le32(b, 0) as usize, le32(b, 4) as usize, le32(b, 8));
        let name_end = 12 + namesz.next_multiple_of(4);
        let Some(desc_end) = name_end.checked_add(descsz.next_multiple_of(4)) else { break };
        if desc_end > b.len() || namesz > b.len() {
            break;
        }
        let name = &b[12..12 + namesz];
        let name = name.strip_suffix(b"\0").unwrap_or(name);
        out.push((name, ty, &b[name_end..name_end + descsz]));
        b = &b[desc_end..];
    }
    out
}

/// What a replay found.
#[derive(Debug)]
pub struct Replay {
    pub outcome: Outcome,
    pub caps: Caps,
    pub slide: u64,
    pub nr_vcpus: usize,
    /// Where guest RAM ends for the repair kernel (the staging slot's base).
    pub ram_end: u64,
    pub staging: StagingSlot,
    /// The dump's memory blocks, `[start, end)`.
    pub ram_ranges: Vec<(u64, u64)>,
}

/// Options of a replay.
#[derive(Clone, Debug)]
pub struct ReplayOptions {
    pub run_timeout: Duration,
}

impl Default for ReplayOptions {
    fn default() -> Self {
        Self { run_timeout: Duration::from_secs(120) }
    }
}

/// True when the host CPU has NX (CPUID 0x8000_0001 EDX bit 20), per the
/// CPUID KVM offers its guests.
pub fn cpuid_nx(cpuid: &kvm_bindings::CpuId) -> bool {
    cpuid.as_slice().iter().any(|e| e.function == 0x8000_0001 && e.edx & (1 << 20) != 0)
}

/// Builds a KVM VM holding the dump: RAM from the loads (one memory slot
/// per contiguous range), one vCPU per QEMU note with its state.
pub fn load_into_kvm(dump: &CoreDump) -> Result<KvmGuest, ReplayError> {
    let kvm = crate::kvm::open()?;
    let caps = Caps::probe(&kvm);
    let vm = kvm.create_vm().map_err(KvmError::ioctl("KVM_CREATE_VM"))?;
    // Intel needs a TSS address for real mode only; harmless elsewhere.
    let _ = vm.set_tss_address(0xfffb_d000);
    let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(KvmError::ioctl("KVM_GET_SUPPORTED_CPUID"))?;
    let nx = cpuid_nx(&cpuid);
    let mut fds = Vec::new();
    for i in 0..dump.cpus.len() {
        let fd = vm.create_vcpu(i as u64).map_err(KvmError::ioctl("KVM_CREATE_VCPU"))?;
        // The guest's CPUID must allow long mode (EFER.LME) and NX.
        fd.set_cpuid2(&cpuid).map_err(KvmError::ioctl("KVM_SET_CPUID2"))?;
        fds.push(fd);
    }
    let mut guest = KvmGuest::new(vm, fds, GuestMemory::default(), caps);
    for (slot, (start, end)) in dump.ram_ranges().into_iter().enumerate() {
        let mut map = OwnedMmap::anonymous((end - start) as usize)?;
        dump.fill(start, map.as_mut_slice())?;
        guest.add_region(slot as u32, Region::owned(Gpa(start), map))?;
    }
    for (i, c) in dump.cpus.iter().enumerate() {
        let v = guest.vcpu(VcpuId(i as u32)).map_err(|e| KvmError::Other(e.to_string()))?;
        set_vcpu_state(v, c, nx)?;
    }
    Ok(guest)
}

/// Gives a vCPU the state of a dumped one (`nx`: [`cpuid_nx`] of the CPUID
/// the vCPU was given, for the inferred EFER).
pub fn set_vcpu_state(v: &crate::kvm::KvmVcpu, c: &DumpCpu, nx: bool) -> Result<(), KvmError> {
    let base = v.sregs()?;
    v.set_sregs(&c.kvm_sregs(&base, nx))?;
    v.set_regs(&c.kvm_regs())?;
    if let Some(kgs) = c.kernel_gs_base {
        v.set_msrs(&[(MSR_KERNEL_GS_BASE, kgs)])?;
    }
    Ok(())
}

/// Replays `dump` with the repair kernel of `image`, in
/// [`Mode::Diagnose`].
pub fn replay(dump: &CoreDump, image: builder::RepairImage, opts: &ReplayOptions) -> Result<Replay, ReplayError> {
    let mut guest = load_into_kvm(dump)?;
    let staging = StagingSlot::above_ram(guest.memory(), dump.ram_ranges().len() as u32);
    let ram_end = staging.gpa;
    let caps = *guest.caps();
    let cfg = EmbedConfig { staging: Some(staging), run_timeout: opts.run_timeout, ..EmbedConfig::default() };
    let mut r = Repairer::new(guest, image, cfg)?;
    let panic = r.session().panic_addr()?;
    let vcpu = dump.cpus.iter().position(|c| c.rip == panic.0).ok_or_else(|| ReplayError::NotAtTrap {
        panic: panic.0,
        rips: dump.cpus.iter().map(|c| format!("{:#x}", c.rip)).collect::<Vec<_>>().join(", "),
    })?;
    let outcome = r.on_trap(VcpuId(vcpu as u32), Mode::Diagnose)?;
    Ok(Replay {
        slide: r.session().slide.slide,
        nr_vcpus: dump.cpus.len(),
        outcome,
        caps,
        ram_end,
        staging,
        ram_ranges: dump.ram_ranges(),
    })
}

/// The verdict and diagnosis, for `--json` and for comparisons.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Verdict {
    pub status: String,
    pub action: String,
    pub reason_code: u32,
    pub reason_name: String,
    pub reason: String,
    pub crash_kind: String,
    pub message: String,
    pub cpu: u32,
    pub pid: i32,
    pub tgid: i32,
    pub comm: String,
    pub nr_tasks: u32,
}

impl Verdict {
    pub fn of(o: &Outcome) -> Verdict {
        Verdict {
            status: match RunStatus::from_u32(o.out.status) {
                Some(RunStatus::NotRun) => "not run".into(),
                Some(RunStatus::Running) => "running".into(),
                Some(RunStatus::Done) => "done".into(),
                Some(RunStatus::Faulted) => "faulted".into(),
                None => format!("unknown ({})", o.out.status),
            },
            action: o.action().name().into(),
            reason_code: o.out.reason_code,
            reason_name: reason_name(o.out.reason_code),
            reason: o.reason().to_string(),
            crash_kind: crash_kind_name(o.out.crash_kind),
            message: o.message().to_string(),
            cpu: o.out.cpu,
            pid: o.out.pid,
            tgid: o.out.tgid,
            comm: o.comm().to_string(),
            nr_tasks: o.out.nr_tasks,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_flags_become_kvm_segments() {
        // A 64-bit kernel code segment: P, DPL 0, S, type 0xb, L.
        let cs = DumpSegment { selector: 0x10, limit: 0xffff_ffff, flags: 0x00a0_9b00, base: 0 };
        let k = cs.to_kvm();
        assert_eq!((k.type_, k.present, k.dpl, k.s, k.l, k.db, k.g, k.unusable), (0xb, 1, 0, 1, 1, 0, 1, 0));
        assert_eq!(DumpSegment::default().to_kvm().unusable, 1);
    }

    #[test]
    fn parses_notes_with_padding() {
        let mut b = Vec::new();
        for (name, ty, desc) in [(&b"CORE\0"[..], 1u32, &[1u8, 2, 3][..]), (&b"QEMU\0"[..], 0, &[9u8; 8][..])] {
            b.extend_from_slice(&(name.len() as u32).to_le_bytes());
            b.extend_from_slice(&(desc.len() as u32).to_le_bytes());
            b.extend_from_slice(&ty.to_le_bytes());
            b.extend_from_slice(name);
            b.resize(b.len().next_multiple_of(4), 0);
            b.extend_from_slice(desc);
            b.resize(b.len().next_multiple_of(4), 0);
        }
        let n = parse_notes(&b);
        assert_eq!(n.len(), 2);
        assert_eq!(n[0], (&b"CORE"[..], 1, &[1u8, 2, 3][..]));
        assert_eq!(n[1].0, b"QEMU");
        assert!(parse_notes(&b[..20]).is_empty());
    }
}
