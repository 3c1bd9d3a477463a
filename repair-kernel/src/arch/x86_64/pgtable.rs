//! A software x86_64 page-table walker: translates a guest-virtual address
//! through the crashed context's CR3, as the MMU would, with every table
//! read bounds-checked against guest RAM.
//!
//! Supports 4-level and 5-level (CR4.LA57) paging and 1 GiB / 2 MiB pages.
//! A walk is at most five reads, so self-referential tables cannot loop.

use crate::mem::{Error, Gpa, Gva, PhysMem};

/// Present.
pub const PTE_PRESENT: u64 = 1 << 0;
/// Writable.
pub const PTE_RW: u64 = 1 << 1;
/// User-accessible.
pub const PTE_USER: u64 = 1 << 2;
/// Large page (in a PDPTE: 1 GiB; in a PDE: 2 MiB).
pub const PTE_PSE: u64 = 1 << 7;
/// No-execute.
pub const PTE_NX: u64 = 1 << 63;
/// Physical-address bits 12..51 of an entry.
pub const PTE_ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

pub const PAGE_SIZE: u64 = 4096;
pub const PAGE_MASK: u64 = !(PAGE_SIZE - 1);

/// Paging mode of a context.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Paging {
    /// Physical address of the top-level table (CR3 without PCID/flag bits).
    pub root: Gpa,
    /// 5-level paging (CR4.LA57).
    pub la57: bool,
}

impl Paging {
    /// From the CR3 and CR4 of a CPU.
    pub fn from_regs(cr3: u64, cr4: u64) -> Self {
        Self {
            root: Gpa(cr3 & PTE_ADDR_MASK),
            la57: cr4 & super::CR4_LA57 != 0,
        }
    }

    /// Number of virtual-address bits.
    pub fn va_bits(&self) -> u32 {
        if self.la57 { 57 } else { 48 }
    }
}

/// True when `va` is canonical for the given number of address bits.
pub fn is_canonical(va: Gva, bits: u32) -> bool {
    let shift = 64 - bits;
    (((va.0 << shift) as i64) >> shift) as u64 == va.0
}

/// A successful translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    /// The physical address of the byte.
    pub gpa: Gpa,
    /// Size of the page that maps it (4 KiB, 2 MiB or 1 GiB).
    pub page_size: u64,
    /// Writable at every level.
    pub writable: bool,
    /// No-execute at some level.
    pub nx: bool,
    /// User-accessible at every level.
    pub user: bool,
}

impl Translation {
    /// Bytes from the address to the end of its page.
    pub fn bytes_left_in_page(&self) -> u64 {
        self.page_size - (self.gpa.0 & (self.page_size - 1))
    }
}

/// Translates `va` through `paging`, reading the tables from `mem`.
pub fn translate<M: PhysMem + ?Sized>(mem: &M, paging: Paging, va: Gva) -> Result<Translation, Error> {
    if !is_canonical(va, paging.va_bits()) {
        return Err(Error::NonCanonical(va));
    }
    let levels: u32 = if paging.la57 { 5 } else { 4 };
    let mut table = paging.root;
    let (mut writable, mut nx, mut user) = (true, false, true);
    // level 5 = PML5, 4 = PML4, 3 = PDPT, 2 = PD, 1 = PT
    let mut level = levels;
    loop {
        let shift = 12 + 9 * (level - 1);
        let index = (va.0 >> shift) & 0x1ff;
        let entry = mem.read_phys_u64(Gpa(table.0 + index * 8))?;
        if entry & PTE_PRESENT == 0 {
            return Err(Error::NotMapped(va));
        }
        writable &= entry & PTE_RW != 0;
        user &= entry & PTE_USER != 0;
        nx |= entry & PTE_NX != 0;
        let large = entry & PTE_PSE != 0 && (level == 2 || level == 3);
        if level == 1 || large {
            let page_size = 1u64 << shift;
            let base = entry & PTE_ADDR_MASK & !(page_size - 1);
            let gpa = Gpa(base | (va.0 & (page_size - 1)));
            if gpa.0 >= mem.ram_end() {
                return Err(Error::OutOfRam(gpa));
            }
            return Ok(Translation { gpa, page_size, writable, nx, user });
        }
        table = Gpa(entry & PTE_ADDR_MASK);
        level -= 1;
    }
}
