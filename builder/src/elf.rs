//! ELF reading: the repair kernel's own ELF into a [`Unikernel`], and pages of
//! a vmlinux's text and read-only data for the snapshot.

use object::{Object, ObjectSegment, ObjectSymbol, SegmentFlags};

use crate::image::{ImageError, Segment, Unikernel, PAGE_SIZE};

/// Link base the unikernel is built at (`repair-kernel/unikernel/link.ld`).
pub const UNIKERNEL_LINK_BASE: u64 = 0x0000_0080_0000_0000;

/// The repair kernel ELF built by `build.rs` for this builder.
pub const UNIKERNEL_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/repair-kernel.elf"));

fn elf_err(msg: impl Into<String>) -> ImageError {
    ImageError::Elf(msg.into())
}

/// Reads the repair kernel's ELF: a static x86_64 executable whose
/// `PT_LOAD` segments are page-aligned, with `repair_done` and
/// `__repair_stack_top` in its symbol table.
pub fn unikernel_from_elf(data: &[u8]) -> Result<Unikernel, ImageError> {
    let file = object::File::parse(data).map_err(|e| elf_err(format!("not an ELF file: {e}")))?;
    if file.architecture() != object::Architecture::X86_64 {
        return Err(elf_err(format!("built for {:?}, not x86_64", file.architecture())));
    }
    if file.kind() != object::ObjectKind::Executable {
        return Err(elf_err(format!("is {:?}, not a static executable", file.kind())));
    }
    let symbol = |name: &str| {
        file.symbols()
            .find(|s| s.name() == Ok(name))
            .map(|s| s.address())
            .ok_or_else(|| elf_err(format!("symbol {name} missing (was it stripped?)")))
    };
    let mut segments = Vec::new();
    for seg in file.segments() {
        let SegmentFlags::Elf { p_flags } = seg.flags() else { continue };
        let bytes = seg.data().map_err(|e| elf_err(format!("segment data: {e}")))?;
        if seg.address() % PAGE_SIZE as u64 != 0 {
            return Err(elf_err(format!("segment at {:#x} is not page-aligned", seg.address())));
        }
        segments.push(Segment {
            vaddr: seg.address(),
            memsz: seg.size(),
            flags: p_flags,
            data: bytes.to_vec(),
        });
    }
    if segments.is_empty() {
        return Err(elf_err("no loadable segments"));
    }
    segments.sort_by_key(|s| s.vaddr);
    for w in segments.windows(2) {
        let end = (w[0].vaddr + w[0].memsz).next_multiple_of(PAGE_SIZE as u64);
        if end > w[1].vaddr {
            return Err(elf_err(format!("segments at {:#x} and {:#x} share a page", w[0].vaddr, w[1].vaddr)));
        }
    }
    let u = Unikernel {
        link_base: symbol("__repair_image_start")?,
        entry: file.entry(),
        done: symbol("repair_done")?,
        stack_top: symbol("__repair_stack_top")?,
        segments,
    };
    let inside = |a: u64| u.segments.iter().any(|s| a >= s.vaddr && a <= s.vaddr + s.memsz);
    if !inside(u.entry) || !inside(u.done) || !inside(u.stack_top) {
        return Err(elf_err("entry, repair_done or the stack lies outside the loadable segments"));
    }
    Ok(u)
}

/// The repair kernel built with this builder.
pub fn builtin_unikernel() -> Result<Unikernel, ImageError> {
    unikernel_from_elf(UNIKERNEL_ELF)
}

/// The `PT_LOAD` segments of a vmlinux, for reading pages by link-time
/// address.
#[derive(Debug)]
pub struct VmlinuxPages<'a> {
    /// (vaddr, memsz, file bytes)
    segments: Vec<(u64, u64, &'a [u8])>,
}

impl<'a> VmlinuxPages<'a> {
    pub fn new(data: &'a [u8]) -> Result<Self, String> {
        let file = object::File::parse(data).map_err(|e| format!("not an ELF file: {e}"))?;
        let mut segments = Vec::new();
        for seg in file.segments() {
            let bytes = seg.data().map_err(|e| format!("segment at {:#x}: {e}", seg.address()))?;
            segments.push((seg.address(), seg.size(), bytes));
        }
        Ok(Self { segments })
    }

    /// The 4 KiB page at link-time address `page` (page-aligned) as the
    /// file has it: bytes no segment covers read as zero, as `.bss` does.
    pub fn page(&self, page: u64) -> [u8; PAGE_SIZE] {
        let mut out = [0u8; PAGE_SIZE];
        let end = page + PAGE_SIZE as u64;
        for &(vaddr, memsz, bytes) in &self.segments {
            let lo = page.max(vaddr);
            let hi = end.min(vaddr + bytes.len().min(memsz as usize) as u64);
            if lo < hi {
                let src = &bytes[(lo - vaddr) as usize..(hi - vaddr) as usize];
                out[(lo - page) as usize..(hi - page) as usize].copy_from_slice(src);
            }
        }
        out
    }

    /// The bytes of `[start, end)` as the file has them (zero where no
    /// segment has file bytes).
    pub fn bytes(&self, start: u64, end: u64) -> Vec<u8> {
        let mut out = vec![0u8; end.saturating_sub(start) as usize];
        for &(vaddr, memsz, bytes) in &self.segments {
            let lo = start.max(vaddr);
            let hi = end.min(vaddr + bytes.len().min(memsz as usize) as u64);
            if lo < hi {
                out[(lo - start) as usize..(hi - start) as usize]
                    .copy_from_slice(&bytes[(lo - vaddr) as usize..(hi - vaddr) as usize]);
            }
        }
        out
    }

    /// Every page overlapping `[start, end)`, by page-aligned address.
    pub fn pages(&self, start: u64, end: u64) -> impl Iterator<Item = (u64, [u8; PAGE_SIZE])> + '_ {
        let first = start & !(PAGE_SIZE as u64 - 1);
        (first..end).step_by(PAGE_SIZE).map(move |p| (p, self.page(p)))
    }
}
