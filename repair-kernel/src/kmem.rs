//! A view of the crashed kernel's virtual memory: physical memory, the
//! crashed context's page tables, the kernel layout and the KASLR slide.
//!
//! Walkers read kernel data structures through [`Kernel`], as drgn's helpers
//! read through a `Program`.

use core::cell::Cell;

use crate::arch::x86_64::pgtable::{self, Paging, Translation, PAGE_SIZE};
use crate::layout::{Item, KernelLayout};
use crate::mem::{Error, Gpa, Gva, LinkAddr, PhysMem};

/// Upper bound on CPU indices (the kernel's `NR_CPUS` maximum).
pub const MAX_CPUS: u32 = 8192;

/// The crashed kernel, seen through one CPU's page tables.
#[derive(Debug)]
pub struct Kernel<'m, M: PhysMem + ?Sized> {
    mem: &'m mut M,
    paging: Paging,
    layout: &'m KernelLayout,
    slide: u64,
    /// A one-entry TLB: (virtual page, translation of its first byte).
    tlb: Cell<Option<(u64, Translation)>>,
}

impl<'m, M: PhysMem + ?Sized> Kernel<'m, M> {
    /// A view through `paging` (see [`Paging::from_regs`]).
    pub fn new(mem: &'m mut M, paging: Paging, layout: &'m KernelLayout, slide: u64) -> Self {
        Self { mem, paging, layout, slide, tlb: Cell::new(None) }
    }

    pub fn mem(&self) -> &M {
        self.mem
    }
    pub fn layout(&self) -> &KernelLayout {
        self.layout
    }
    pub fn slide(&self) -> u64 {
        self.slide
    }
    pub fn paging(&self) -> Paging {
        self.paging
    }

    /// Translates a kernel virtual address.
    pub fn translate(&self, va: Gva) -> Result<Translation, Error> {
        if let Some((p, t)) = self.tlb.get() {
            if va.0 & !(t.page_size - 1) == p {
                let off = va.0 & (t.page_size - 1);
                return Ok(Translation { gpa: Gpa(t.gpa.0 + off), ..t });
            }
        }
        let t = pgtable::translate(&*self.mem, self.paging, va)?;
        let mask = !(t.page_size - 1);
        let first = Translation { gpa: Gpa(t.gpa.0 & mask), ..t };
        self.tlb.set(Some((va.0 & mask, first)));
        Ok(t)
    }

    /// Reads `buf.len()` bytes of kernel virtual memory at `va`, crossing
    /// pages as needed.
    pub fn read(&self, va: Gva, buf: &mut [u8]) -> Result<(), Error> {
        let mut done = 0usize;
        while done < buf.len() {
            let cur = va.add(done as u64);
            let t = self.translate(cur)?;
            let in_page = (PAGE_SIZE - (cur.0 & (PAGE_SIZE - 1))) as usize;
            let n = in_page.min(buf.len() - done);
            self.mem.read_phys(t.gpa, &mut buf[done..done + n])?;
            done += n;
        }
        Ok(())
    }

    /// Writes kernel virtual memory (through physical memory, so read-only
    /// mappings such as kernel text are writable here).
    pub fn write(&mut self, va: Gva, data: &[u8]) -> Result<(), Error> {
        let mut done = 0usize;
        while done < data.len() {
            let cur = va.add(done as u64);
            let t = self.translate(cur)?;
            let in_page = (PAGE_SIZE - (cur.0 & (PAGE_SIZE - 1))) as usize;
            let n = in_page.min(data.len() - done);
            self.mem.write_phys(t.gpa, &data[done..done + n])?;
            done += n;
        }
        Ok(())
    }

    pub fn read_u8(&self, va: Gva) -> Result<u8, Error> {
        let mut b = [0u8; 1];
        self.read(va, &mut b)?;
        Ok(b[0])
    }
    pub fn read_u16(&self, va: Gva) -> Result<u16, Error> {
        let mut b = [0u8; 2];
        self.read(va, &mut b)?;
        Ok(u16::from_le_bytes(b))
    }
    pub fn read_u32(&self, va: Gva) -> Result<u32, Error> {
        let mut b = [0u8; 4];
        self.read(va, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }
    pub fn read_i32(&self, va: Gva) -> Result<i32, Error> {
        Ok(self.read_u32(va)? as i32)
    }
    pub fn read_u64(&self, va: Gva) -> Result<u64, Error> {
        let mut b = [0u8; 8];
        self.read(va, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }
    /// Reads a pointer (`T *`), as a [`Gva`].
    pub fn read_ptr(&self, va: Gva) -> Result<Gva, Error> {
        Ok(Gva(self.read_u64(va)?))
    }

    /// Reads a NUL-terminated string of at most `buf.len()` bytes; returns
    /// its length. A string running into an unmapped page is cut there.
    pub fn read_cstr(&self, va: Gva, buf: &mut [u8]) -> Result<usize, Error> {
        let mut n = 0usize;
        while n < buf.len() {
            let cur = va.add(n as u64);
            let t = match self.translate(cur) {
                Ok(t) => t,
                Err(e) if n == 0 => return Err(e),
                Err(_) => break,
            };
            let in_page = (PAGE_SIZE - (cur.0 & (PAGE_SIZE - 1))) as usize;
            let k = in_page.min(buf.len() - n);
            self.mem.read_phys(t.gpa, &mut buf[n..n + k])?;
            if let Some(z) = buf[n..n + k].iter().position(|&b| b == 0) {
                return Ok(n + z);
            }
            n += k;
        }
        Ok(n)
    }

    /// A struct offset, member size or type size from the layout.
    pub fn item(&self, item: Item) -> Result<u64, Error> {
        self.layout.get(item).ok_or(Error::MissingLayout(item))
    }

    /// An optional layout item.
    pub fn opt(&self, item: Item) -> Option<u64> {
        self.layout.get(item)
    }

    /// Run-time address of a symbol item (link-time address plus the slide).
    pub fn sym(&self, item: Item) -> Result<Gva, Error> {
        Ok(self.link(LinkAddr(self.item(item)?)))
    }

    /// Run-time address of a link-time address.
    pub fn link(&self, a: LinkAddr) -> Gva {
        a.slide(self.slide)
    }

    /// `&ptr->member` for a member offset item.
    pub fn member(&self, ptr: Gva, member: Item) -> Result<Gva, Error> {
        Ok(ptr.add(self.item(member)?))
    }

    /// `container_of(ptr, type, member)`.
    pub fn container_of(&self, ptr: Gva, member: Item) -> Result<Gva, Error> {
        Ok(ptr.sub(self.item(member)?))
    }

    /// `__per_cpu_offset[cpu]` (`unsigned long __per_cpu_offset[NR_CPUS]`).
    pub fn per_cpu_offset(&self, cpu: u32) -> Result<u64, Error> {
        if cpu >= MAX_CPUS {
            return Err(Error::Absurd("cpu index", cpu as u64));
        }
        let base = self.sym(Item::SymPerCpuOffset)?;
        self.read_u64(base.add(cpu as u64 * 8))
    }

    /// Run-time start of the per-CPU section the per-CPU items are offsets
    /// into: 0 where the vmlinux links `.data..percpu` at 0 (per-CPU
    /// symbols are offsets there), else `__per_cpu_start` moved by KASLR
    /// (per-CPU symbols are addresses, and `__per_cpu_offset[cpu]` is
    /// relative to that start).
    pub fn per_cpu_start(&self) -> u64 {
        match self.opt(Item::SymPerCpuStart) {
            None | Some(0) => 0,
            Some(a) => self.link(LinkAddr(a)).0,
        }
    }

    /// `per_cpu_ptr(&var, cpu)` for a per-CPU variable item, plus `extra`
    /// bytes (a member offset inside the variable).
    pub fn per_cpu_ptr(&self, var: Item, extra: u64, cpu: u32) -> Result<Gva, Error> {
        let off = self.item(var)?;
        Ok(Gva(self.per_cpu_offset(cpu)?.wrapping_add(self.per_cpu_start()).wrapping_add(off).wrapping_add(extra)))
    }

    /// True when `va` is in kernel text (`[_stext, _etext)`).
    pub fn is_kernel_text(&self, va: Gva) -> bool {
        match (self.sym(Item::SymStext), self.sym(Item::SymEtext)) {
            (Ok(s), Ok(e)) => s <= va && va < e,
            _ => false,
        }
    }
}
