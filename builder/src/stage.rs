//! Where the repair kernel goes in the guest: a pure plan of guest-physical
//! writes and the registers to start it with, made from an image and a
//! borrowed guest-physical range. The loader saves the range, performs the
//! writes, fills the contract, sets the registers, runs, and restores.
//!
//! Inside the borrowed range `[base_gpa, base_gpa + size)`, 4 KiB pages are
//! handed out in order: the root table first (so `cr3 == base_gpa`), then
//! the repair kernel's segment pages (with `.bss` and the stack zeroed), the
//! contract pages, and the page tables as the mappings need them.
//!
//! The address space built:
//! - PML4 slot 0: guest RAM identity-mapped, every RAM range (see
//!   [`RamMap`]; by default all of `[0, ram_end)`) rounded out to 2 MiB,
//!   up to [`IDENTITY_LIMIT`] (512 GiB, the slot's reach): 1 GiB pages
//!   where the CPU has them (CPUID `pdpe1gb`) and a whole GiB is RAM, else
//!   2 MiB pages (4 KiB of tables per GiB); supervisor, writable;
//! - the repair kernel's window at its link base (PML4 slot 1): each segment
//!   page with 4 KiB pages (writable only for `PF_W` segments), then one
//!   unmapped guard page, then the contract page(s), writable.
//!
//! No NX bit is used (it would be a reserved bit if the guest runs with
//! `EFER.NXE` clear), and accessed/dirty bits are preset so the CPU has no
//! reason to write to the tables.

use std::collections::BTreeMap;

use repair_kernel::contract::Contract;

use crate::image::{RepairImage, PAGE_SIZE, PF_W};

const PAGE: u64 = PAGE_SIZE as u64;
const MIB2: u64 = 2 << 20;
const GIB: u64 = 1 << 30;
/// The identity map stops here: PML4 slot 0 ends at 512 GiB, and the
/// repair kernel's window is in slot 1. The repair kernel reads no RAM
/// above it (its `IdentityMem` has the same bound).
pub const IDENTITY_LIMIT: u64 = 1 << 39;

/// Guest RAM as the identity map should cover it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RamMap {
    /// Guest-physical RAM ranges `[start, end)`, in any order (QEMU's
    /// `pc`: below 3 GiB and from 4 GiB on; `q35`: below 2 GiB and from
    /// 4 GiB). Mapped rounded out to 2 MiB.
    pub ranges: Vec<(u64, u64)>,
    /// The CPU has 1 GiB pages (CPUID `pdpe1gb`; QEMU's default `qemu64`
    /// model under TCG has not, `-cpu max` has).
    pub gib_pages: bool,
}

impl RamMap {
    /// All of `[0, ram_end)`, holes included, with 2 MiB pages: what is
    /// known when only the end of RAM is.
    pub fn up_to(ram_end: u64) -> Self {
        Self { ranges: vec![(0, ram_end)], gib_pages: false }
    }

    /// The end of RAM: the highest end of a range.
    pub fn end(&self) -> u64 {
        self.ranges.iter().map(|r| r.1).max().unwrap_or(0)
    }

    /// The ranges rounded out to 2 MiB, clipped to [`IDENTITY_LIMIT`],
    /// sorted and merged.
    fn rounded(&self) -> Vec<(u64, u64)> {
        let mut r: Vec<(u64, u64)> = self
            .ranges
            .iter()
            .map(|&(s, e)| (s / MIB2 * MIB2, e.next_multiple_of(MIB2).min(IDENTITY_LIMIT)))
            .filter(|(s, e)| s < e)
            .collect();
        r.sort_unstable();
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (s, e) in r {
            match out.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => out.push((s, e)),
            }
        }
        out
    }
}

/// Page-table entry bits.
pub const PTE_P: u64 = 1 << 0;
pub const PTE_RW: u64 = 1 << 1;
pub const PTE_US: u64 = 1 << 2;
pub const PTE_A: u64 = 1 << 5;
pub const PTE_D: u64 = 1 << 6;
pub const PTE_PS: u64 = 1 << 7;
/// Physical address bits of an entry.
pub const PTE_ADDR: u64 = 0x000f_ffff_ffff_f000;

/// The paging mode the loader will run the repair kernel in: it must match
/// the guest's `CR4.LA57`, which the loader leaves unchanged.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Paging {
    #[default]
    FourLevel,
    FiveLevel,
}

/// What to stage besides the repair kernel itself.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StageOptions {
    pub paging: Paging,
    /// Also stage the image's integrity data (page hashes, skip sites and
    /// pristine pages) for the in-guest text/rodata check. Megabytes for a
    /// distribution kernel: it needs a staged region (`memmap=`, an extra
    /// memory slot), not borrowed low memory.
    pub integrity: bool,
}

pub use repair_kernel::contract::{IntegrityTable, INTEGRITY_MAGIC, INTEGRITY_VERSION};

/// Why a plan could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StageError {
    #[error("borrowed range base {0:#x} is not 4 KiB-aligned")]
    Unaligned(u64),
    #[error("the repair kernel needs {need} KiB of guest memory, the borrowed range [{base:#x}, +{size:#x}) has {} KiB; borrow a larger range", size / 1024)]
    TooSmall { need: u64, base: u64, size: u64 },
    #[error("borrowed range [{base:#x}, +{size:#x}) is not inside guest RAM (which ends at {ram_end:#x})")]
    OutsideRam { base: u64, size: u64, ram_end: u64 },
    #[error("repair kernel window {0:#x} overlaps the identity map of guest RAM (PML4 slot 0) or is not canonical")]
    BadWindow(u64),
    #[error("repair kernel segment at {0:#x} is not page-aligned")]
    UnalignedSegment(u64),
    #[error("repair kernel stack top {0:#x} is not inside a writable segment")]
    BadStack(u64),
}

/// One page of the repair kernel's window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WindowPage {
    pub gva: u64,
    pub gpa: u64,
    pub writable: bool,
}

/// Everything the loader does to start the repair kernel.
#[derive(Clone, Debug)]
pub struct StagePlan {
    /// Guest-physical writes, in ascending address order, all inside the
    /// borrowed range: page tables, segments, zeroed contract pages.
    pub writes: Vec<(u64, Vec<u8>)>,
    /// The root page table (PML4, or PML5 for [`Paging::FiveLevel`]).
    pub cr3: u64,
    /// Where to start: `_start`.
    pub entry_rip: u64,
    /// Initial `rsp` (virtual, 16-byte aligned).
    pub stack_top: u64,
    /// Where the contract block is, virtual (goes in `rdi`) and physical
    /// (where the loader writes the input and reads the output).
    pub contract_gva: u64,
    pub contract_gpa: u64,
    /// `repair_done`: the completion point (breakpoint address).
    pub done_rip: u64,
    /// Virtual address of the integrity table, to pass in `rsi` (0: none,
    /// the repair kernel then skips the text/rodata check). The table is
    /// nine little-endian `u64`s: magic [`INTEGRITY_MAGIC`], version,
    /// hashes (gva, count) as `repair_kernel::integrity::PageHash` (40
    /// bytes each, sorted), skip sites (gva, count) as `SkipSite` (16
    /// bytes, sorted), pristine index gva (sorted `u64` link-time page
    /// addresses), pristine pages gva (4 KiB each, same order), pristine
    /// count. All of it mapped read-only in the window.
    pub integrity_gva: u64,
    /// The identity map ends here: the end of guest RAM rounded up to
    /// 2 MiB, at most [`IDENTITY_LIMIT`] (holes between RAM ranges of a
    /// [`RamMap`] are not mapped).
    pub identity_end: u64,
    /// Bytes of the borrowed range used, from its base.
    pub used: u64,
    /// Every page of the window, for checks and debugging.
    pub window: Vec<WindowPage>,
    pub paging: Paging,
}

/// A bump allocator over the borrowed range that keeps counting past its
/// end, so the error can say how much is needed.
struct Alloc {
    base: u64,
    next: u64,
}

impl Alloc {
    fn page(&mut self) -> u64 {
        let p = self.base + self.next;
        self.next += PAGE;
        p
    }
}

/// Page tables under construction, by guest-physical address.
struct Tables {
    root: u64,
    levels: u32,
    pages: BTreeMap<u64, Box<[u64; 512]>>,
}

impl Tables {
    fn new(alloc: &mut Alloc, levels: u32) -> Self {
        let root = alloc.page();
        let mut pages = BTreeMap::new();
        pages.insert(root, Box::new([0u64; 512]));
        Self { root, levels, pages }
    }

    /// Maps one page of `size` (4 KiB at level 1, 2 MiB at level 2, 1 GiB
    /// at level 3).
    fn map(&mut self, alloc: &mut Alloc, gva: u64, gpa: u64, leaf_level: u32, writable: bool) {
        let mut table = self.root;
        for level in (leaf_level + 1..=self.levels).rev() {
            let idx = ((gva >> (12 + 9 * (level - 1))) & 511) as usize;
            let entry = self.pages[&table][idx];
            table = if entry & PTE_P != 0 {
                entry & PTE_ADDR
            } else {
                let t = alloc.page();
                self.pages.insert(t, Box::new([0u64; 512]));
                self.pages.get_mut(&table).expect("table exists")[idx] = t | PTE_P | PTE_RW | PTE_A;
                t
            };
        }
        let idx = ((gva >> (12 + 9 * (leaf_level - 1))) & 511) as usize;
        let mut leaf = gpa | PTE_P | PTE_A | PTE_D;
        if writable {
            leaf |= PTE_RW;
        }
        if leaf_level > 1 {
            leaf |= PTE_PS;
        }
        self.pages.get_mut(&table).expect("table exists")[idx] = leaf;
    }
}

impl StagePlan {
    /// A plan for 4-level paging without the integrity data (the usual
    /// case for borrowed low memory; see [`StagePlan::with_options`]).
    pub fn new(image: &RepairImage, base_gpa: u64, size: u64, ram_end: u64) -> Result<StagePlan, StageError> {
        Self::with_options(image, base_gpa, size, ram_end, &StageOptions::default())
    }

    /// A plan for the given paging mode, without the integrity data.
    pub fn with_paging(
        image: &RepairImage,
        base_gpa: u64,
        size: u64,
        ram_end: u64,
        paging: Paging,
    ) -> Result<StagePlan, StageError> {
        Self::with_options(image, base_gpa, size, ram_end, &StageOptions { paging, integrity: false })
    }

    /// A plan with the given options; the identity map covers all of
    /// `[0, ram_end)` with 2 MiB pages ([`RamMap::up_to`]).
    pub fn with_options(
        image: &RepairImage,
        base_gpa: u64,
        size: u64,
        ram_end: u64,
        opts: &StageOptions,
    ) -> Result<StagePlan, StageError> {
        Self::with_ram(image, base_gpa, size, &RamMap::up_to(ram_end), opts)
    }

    /// A plan whose identity map covers exactly the RAM ranges of `ram`
    /// (rounded out to 2 MiB), with 1 GiB pages if it says the CPU has
    /// them; `ram_end` is [`RamMap::end`].
    pub fn with_ram(
        image: &RepairImage,
        base_gpa: u64,
        size: u64,
        ram: &RamMap,
        opts: &StageOptions,
    ) -> Result<StagePlan, StageError> {
        let ram_end = ram.end();
        let paging = opts.paging;
        if !base_gpa.is_multiple_of(PAGE) {
            return Err(StageError::Unaligned(base_gpa));
        }
        let size = size / PAGE * PAGE;
        if base_gpa.checked_add(size).is_none_or(|end| end > ram_end) {
            return Err(StageError::OutsideRam { base: base_gpa, size, ram_end });
        }
        let u = &image.unikernel;
        // The window must be in its own PML4 slot, above slot 0, and in the
        // lower canonical half for either paging mode.
        let window_ok = |a: u64| ((1 << 39)..(1 << 47)).contains(&a);
        let contract_pages = (std::mem::size_of::<Contract>() as u64).div_ceil(PAGE);
        let contract_gva = u.end().next_multiple_of(PAGE) + PAGE;
        let integrity = opts.integrity.then(|| integrity_blob(image));
        let integrity_gva = contract_gva + contract_pages * PAGE + PAGE;
        let window_end = match &integrity {
            Some(blob) => integrity_gva + blob.len() as u64,
            None => contract_gva + contract_pages * PAGE,
        };
        if !window_ok(u.link_base) || !window_ok(window_end) {
            return Err(StageError::BadWindow(u.link_base));
        }

        let mut alloc = Alloc { base: base_gpa, next: 0 };
        let levels = match paging {
            Paging::FourLevel => 4,
            Paging::FiveLevel => 5,
        };
        let mut tables = Tables::new(&mut alloc, levels);
        let mut data_pages: Vec<(u64, Vec<u8>)> = Vec::new();
        let mut window = Vec::new();

        // The repair kernel's segments, page by page.
        for seg in &u.segments {
            if seg.vaddr % PAGE != 0 {
                return Err(StageError::UnalignedSegment(seg.vaddr));
            }
            let writable = seg.flags & PF_W != 0;
            for off in (0..seg.memsz.next_multiple_of(PAGE)).step_by(PAGE_SIZE) {
                let mut page = vec![0u8; PAGE_SIZE];
                let lo = (off as usize).min(seg.data.len());
                let hi = (off as usize + PAGE_SIZE).min(seg.data.len());
                page[..hi - lo].copy_from_slice(&seg.data[lo..hi]);
                let gpa = alloc.page();
                let gva = seg.vaddr + off;
                tables.map(&mut alloc, gva, gpa, 1, writable);
                window.push(WindowPage { gva, gpa, writable });
                data_pages.push((gpa, page));
            }
        }
        let stack_ok = window
            .iter()
            .any(|p| p.writable && u.stack_top > p.gva && u.stack_top <= p.gva + PAGE);
        if !stack_ok || !u.stack_top.is_multiple_of(16) {
            return Err(StageError::BadStack(u.stack_top));
        }

        // The contract block, after an unmapped guard page.
        let mut contract_gpa = 0;
        for i in 0..contract_pages {
            let gpa = alloc.page();
            let gva = contract_gva + i * PAGE;
            if i == 0 {
                contract_gpa = gpa;
            }
            tables.map(&mut alloc, gva, gpa, 1, true);
            window.push(WindowPage { gva, gpa, writable: true });
            data_pages.push((gpa, vec![0u8; PAGE_SIZE]));
        }

        // The integrity data, read-only, after another guard page; its
        // table's pointers are fixed up to virtual addresses here.
        if let Some(mut blob) = integrity {
            for word in [2, 4, 6, 7] {
                let at = word * 8;
                let off = u64::from_le_bytes(blob[at..at + 8].try_into().expect("8 bytes"));
                blob[at..at + 8].copy_from_slice(&(integrity_gva + off).to_le_bytes());
            }
            for (i, chunk) in blob.chunks(PAGE_SIZE).enumerate() {
                let gpa = alloc.page();
                let gva = integrity_gva + i as u64 * PAGE;
                tables.map(&mut alloc, gva, gpa, 1, false);
                window.push(WindowPage { gva, gpa, writable: false });
                let mut page = chunk.to_vec();
                page.resize(PAGE_SIZE, 0);
                data_pages.push((gpa, page));
            }
        }

        // Guest RAM, identity-mapped: a 1 GiB page where the CPU has them
        // and the whole GiB is in one (rounded) range, else 2 MiB pages.
        // Ranges are disjoint after rounding, so no 2 MiB page falls under
        // a 1 GiB one.
        let ranges = ram.rounded();
        let identity_end = ranges.last().map_or(0, |r| r.1);
        for (start, end) in ranges {
            let mut gpa = start;
            while gpa < end {
                if ram.gib_pages && gpa.is_multiple_of(GIB) && gpa + GIB <= end {
                    tables.map(&mut alloc, gpa, gpa, 3, true);
                    gpa += GIB;
                } else {
                    tables.map(&mut alloc, gpa, gpa, 2, true);
                    gpa += MIB2;
                }
            }
        }

        if alloc.next > size {
            return Err(StageError::TooSmall { need: alloc.next.div_ceil(1024), base: base_gpa, size });
        }

        let mut writes: Vec<(u64, Vec<u8>)> = data_pages;
        for (gpa, t) in &tables.pages {
            let bytes = t.iter().flat_map(|e| e.to_le_bytes()).collect();
            writes.push((*gpa, bytes));
        }
        writes.sort_by_key(|w| w.0);
        // Coalesce physically contiguous pages into runs.
        let mut merged: Vec<(u64, Vec<u8>)> = Vec::new();
        for (gpa, bytes) in writes {
            match merged.last_mut() {
                Some((g, b)) if *g + b.len() as u64 == gpa => b.extend_from_slice(&bytes),
                _ => merged.push((gpa, bytes)),
            }
        }

        Ok(StagePlan {
            writes: merged,
            cr3: tables.root,
            entry_rip: u.entry,
            stack_top: u.stack_top,
            contract_gva,
            contract_gpa,
            done_rip: u.done,
            integrity_gva: if opts.integrity { integrity_gva } else { 0 },
            identity_end,
            used: alloc.next,
            window,
            paging,
        })
    }

    /// The bytes the plan writes at `gpa` (one byte), if any.
    fn written(&self, gpa: u64) -> Option<u8> {
        let i = self.writes.partition_point(|(g, _)| *g <= gpa).checked_sub(1)?;
        let (g, b) = &self.writes[i];
        b.get((gpa - g) as usize).copied()
    }

    fn entry_at(&self, gpa: u64) -> Option<u64> {
        let mut b = [0u8; 8];
        for (i, byte) in b.iter_mut().enumerate() {
            *byte = self.written(gpa + i as u64)?;
        }
        Some(u64::from_le_bytes(b))
    }

    /// Translates a virtual address through the planned page tables, as the
    /// CPU would: `(gpa, writable)`, or `None` where unmapped. Reads only
    /// the planned writes, so it checks what the guest will actually get.
    pub fn translate(&self, gva: u64) -> Option<(u64, bool)> {
        let levels = match self.paging {
            Paging::FourLevel => 4,
            Paging::FiveLevel => 5,
        };
        let mut table = self.cr3;
        let mut writable = true;
        for level in (1..=levels).rev() {
            let shift = 12 + 9 * (level - 1);
            let entry = self.entry_at(table + ((gva >> shift) & 511) * 8)?;
            if entry & PTE_P == 0 || entry & PTE_US != 0 {
                return None;
            }
            writable &= entry & PTE_RW != 0;
            let is_leaf = level == 1 || (entry & PTE_PS != 0);
            if is_leaf {
                let mask = (1u64 << shift) - 1;
                return Some(((entry & PTE_ADDR & !mask) | (gva & mask), writable));
            }
            table = entry & PTE_ADDR;
        }
        None
    }
}

/// The integrity data as one blob: the table (pointers as offsets from the
/// blob's start, fixed up by the caller), then hashes, skip sites, the
/// pristine index and the pristine pages, each part page-aligned.
fn integrity_blob(image: &RepairImage) -> Vec<u8> {
    let mut blob = vec![0u8; PAGE_SIZE];
    let part = |blob: &mut Vec<u8>, bytes: &mut dyn Iterator<Item = u8>| {
        let at = blob.len() as u64;
        blob.extend(bytes);
        blob.resize(blob.len().next_multiple_of(PAGE_SIZE), 0);
        at
    };
    let hashes = part(
        &mut blob,
        &mut image.page_hashes.iter().flat_map(|(p, h)| p.to_le_bytes().into_iter().chain(*h)),
    );
    let skips = part(
        &mut blob,
        &mut image.skips.iter().flat_map(|k| {
            k.addr.to_le_bytes().into_iter().chain(k.len.to_le_bytes()).chain(k.kind.to_le_bytes())
        }),
    );
    let index = part(&mut blob, &mut image.pristine.keys().flat_map(|p| p.to_le_bytes()));
    let pages = part(&mut blob, &mut image.pristine.values().flat_map(|p| p.iter().copied()));
    let table = IntegrityTable {
        magic: INTEGRITY_MAGIC,
        version: INTEGRITY_VERSION,
        hashes,
        n_hashes: image.page_hashes.len() as u64,
        skips,
        n_skips: image.skips.len() as u64,
        pristine_index: index,
        pristine_pages: pages,
        n_pristine: image.pristine.len() as u64,
    };
    blob[..72].copy_from_slice(&table.to_le_bytes());
    blob
}
