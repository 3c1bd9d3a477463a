//! Guest physical memory, the one thing every walker reads through.
//!
//! Guest memory is hostile input: every access is bounds-checked against
//! [`PhysMem::ram_end`] and returns an [`Error`]; nothing here can fault or
//! panic on a bad address.

use core::fmt;

/// A guest-physical address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Gpa(pub u64);

/// A guest-virtual address (run-time, as the crashed CPU sees it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Gva(pub u64);

/// A link-time kernel virtual address, as `vmlinux` has it: add the KASLR
/// slide to get a [`Gva`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct LinkAddr(pub u64);

impl Gva {
    /// `self + off`, wrapping like the CPU does.
    pub const fn add(self, off: u64) -> Gva {
        Gva(self.0.wrapping_add(off))
    }
    /// `self - off`, wrapping.
    pub const fn sub(self, off: u64) -> Gva {
        Gva(self.0.wrapping_sub(off))
    }
    pub const fn is_null(self) -> bool {
        self.0 == 0
    }
}

impl LinkAddr {
    /// The run-time address under a KASLR slide.
    pub const fn slide(self, slide: u64) -> Gva {
        Gva(self.0.wrapping_add(slide))
    }
}

impl fmt::Display for Gva {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#018x}", self.0)
    }
}

impl fmt::LowerHex for Gva {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::LowerHex::fmt(&self.0, f)
    }
}

impl fmt::LowerHex for Gpa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::LowerHex::fmt(&self.0, f)
    }
}

impl fmt::Display for Gpa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

/// Why a walk or a read failed. Small and `Copy`, like `gimli::Error`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// A physical read or write reached at or beyond the end of RAM.
    OutOfRam(Gpa),
    /// A virtual address is not canonical for the paging mode.
    NonCanonical(Gva),
    /// A page-table entry on the way to the address is not present.
    NotMapped(Gva),
    /// A kernel pointer is NULL where a valid one is required.
    NullPointer,
    /// A layout item the walker needs is absent from the kernel layout.
    MissingLayout(crate::layout::Item),
    /// A linked list does not come back to its head: a cycle or a broken
    /// `prev` link was found at this element.
    CorruptList(Gva),
    /// A walk reached its iteration cap.
    TooMany(u32),
    /// A value read from the guest is outside what the kernel can have.
    Absurd(&'static str, u64),
    /// The backing memory refused the access (host-side backends).
    Backend,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Error::OutOfRam(a) => write!(f, "physical address {a} is beyond guest RAM"),
            Error::NonCanonical(a) => write!(f, "virtual address {a} is not canonical"),
            Error::NotMapped(a) => write!(f, "virtual address {a} is not mapped"),
            Error::NullPointer => f.write_str("NULL kernel pointer"),
            Error::MissingLayout(i) => {
                let s = crate::layout::KernelLayout::spec(i);
                if s.member.is_empty() {
                    write!(f, "kernel layout lacks {} (rebuild the image with a profile that has it)", s.ty)
                } else {
                    write!(f, "kernel layout lacks {}.{} (rebuild the image with a profile that has it)", s.ty, s.member)
                }
            }
            Error::CorruptList(a) => write!(f, "corrupt linked list at {a} (cycle or broken prev link)"),
            Error::TooMany(n) => write!(f, "walk stopped after {n} elements (iteration cap)"),
            Error::Absurd(what, v) => write!(f, "absurd {what} ({v:#x}) read from guest memory"),
            Error::Backend => f.write_str("the memory backend refused the access"),
        }
    }
}

/// Guest physical memory.
pub trait PhysMem {
    /// Reads `buf.len()` bytes at `gpa`. Must fail, not panic, beyond RAM.
    fn read_phys(&self, gpa: Gpa, buf: &mut [u8]) -> Result<(), Error>;
    /// Writes `data` at `gpa`. Must fail, not panic, beyond RAM.
    fn write_phys(&mut self, gpa: Gpa, data: &[u8]) -> Result<(), Error>;
    /// First guest-physical address that is not RAM.
    fn ram_end(&self) -> u64;

    /// Reads a little-endian `u64`.
    fn read_phys_u64(&self, gpa: Gpa) -> Result<u64, Error> {
        let mut b = [0u8; 8];
        self.read_phys(gpa, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }
    /// Reads a little-endian `u32`.
    fn read_phys_u32(&self, gpa: Gpa) -> Result<u32, Error> {
        let mut b = [0u8; 4];
        self.read_phys(gpa, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }
}

/// Checks that `[gpa, gpa + len)` lies inside `[0, ram_end)`.
pub fn check_range(gpa: Gpa, len: usize, ram_end: u64) -> Result<(), Error> {
    match gpa.0.checked_add(len as u64) {
        Some(end) if end <= ram_end => Ok(()),
        _ => Err(Error::OutOfRam(gpa)),
    }
}

/// Guest RAM as a byte slice starting at physical address 0 (host tests,
/// replay of memory dumps, and the unikernel's identity-mapped view).
#[derive(Debug)]
pub struct SliceMem<'a> {
    pub ram: &'a mut [u8],
}

impl<'a> SliceMem<'a> {
    pub fn new(ram: &'a mut [u8]) -> Self {
        Self { ram }
    }
}

impl PhysMem for SliceMem<'_> {
    fn read_phys(&self, gpa: Gpa, buf: &mut [u8]) -> Result<(), Error> {
        check_range(gpa, buf.len(), self.ram_end())?;
        let s = gpa.0 as usize;
        buf.copy_from_slice(&self.ram[s..s + buf.len()]);
        Ok(())
    }
    fn write_phys(&mut self, gpa: Gpa, data: &[u8]) -> Result<(), Error> {
        check_range(gpa, data.len(), self.ram_end())?;
        let s = gpa.0 as usize;
        self.ram[s..s + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn ram_end(&self) -> u64 {
        self.ram.len() as u64
    }
}

/// A [`PhysMem`] clipped to `[0, limit)`: enforces `ContractIn::ram_end`
/// over a backend that could reach further.
#[derive(Debug)]
pub struct Clipped<'m, M: PhysMem + ?Sized> {
    pub inner: &'m mut M,
    pub limit: u64,
}

impl<M: PhysMem + ?Sized> PhysMem for Clipped<'_, M> {
    fn read_phys(&self, gpa: Gpa, buf: &mut [u8]) -> Result<(), Error> {
        check_range(gpa, buf.len(), self.ram_end())?;
        self.inner.read_phys(gpa, buf)
    }
    fn write_phys(&mut self, gpa: Gpa, data: &[u8]) -> Result<(), Error> {
        check_range(gpa, data.len(), self.ram_end())?;
        self.inner.write_phys(gpa, data)
    }
    fn ram_end(&self) -> u64 {
        self.limit.min(self.inner.ram_end())
    }
}
