//! Guest memory as host mappings: regions of guest-physical space, each
//! backed by host memory that is either owned here ([`OwnedMmap`], unmapped
//! on drop) or lent by the VMM (its own RAM mapping, which it keeps alive).

use super::KvmError;
use crate::access::{AccessError, Gpa};
use std::ptr::NonNull;

/// An anonymous private mapping, unmapped on drop.
#[derive(Debug)]
pub struct OwnedMmap {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; moving it to
// another thread moves that ownership.
unsafe impl Send for OwnedMmap {}

impl OwnedMmap {
    /// Maps `len` bytes of zeroed memory (rounded up to 4 KiB), reserved
    /// lazily: a 4 GiB replay only costs the pages written.
    pub fn anonymous(len: usize) -> Result<OwnedMmap, KvmError> {
        let len = len.next_multiple_of(4096).max(4096);
        // SAFETY: an anonymous mapping with no address hint touches no
        // existing memory; the result is checked against MAP_FAILED.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(KvmError::Mmap { len, source: std::io::Error::last_os_error() });
        }
        let ptr = NonNull::new(p.cast::<u8>()).ok_or_else(|| KvmError::Other("mmap returned NULL".into()))?;
        Ok(OwnedMmap { ptr, len })
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` maps `len` readable and writable bytes for as long
        // as `self` lives, and `&mut self` makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for OwnedMmap {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly what mmap returned, unmapped once.
        let r = unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
        debug_assert_eq!(r, 0, "munmap failed");
    }
}

/// One region of guest-physical memory and the host memory behind it.
#[derive(Debug)]
pub struct Region {
    pub gpa: Gpa,
    pub len: usize,
    host: *mut u8,
    /// The mapping, when this region owns it.
    owned: Option<OwnedMmap>,
}

// SAFETY: a region is a (pointer, length) into memory that is either owned
// by it or, for lent regions, guaranteed alive and shareable by the caller
// of `Region::lent`; the backend only reads and writes it with the guest
// stopped.
unsafe impl Send for Region {}

impl Region {
    /// A region backed by a mapping it owns.
    pub fn owned(gpa: Gpa, map: OwnedMmap) -> Region {
        Region { gpa, len: map.len(), host: map.as_ptr(), owned: Some(map) }
    }

    /// A region backed by memory the VMM owns (its guest RAM mapping).
    ///
    /// # Safety
    /// `host` must point to `len` bytes readable and writable for the
    /// lifetime of the returned region (and of any [`GuestMemory`] holding
    /// it), and nothing else may create Rust references to those bytes
    /// while the backend reads or writes them (the guest's own accesses,
    /// through KVM, are fine: the backend touches memory only with every
    /// vCPU stopped).
    pub unsafe fn lent(gpa: Gpa, host: *mut u8, len: usize) -> Region {
        Region { gpa, len, host, owned: None }
    }

    pub fn host_addr(&self) -> u64 {
        self.host as u64
    }

    pub fn end(&self) -> u64 {
        self.gpa.0 + self.len as u64
    }

    /// True when the region owns its mapping.
    pub fn is_owned(&self) -> bool {
        self.owned.is_some()
    }

    /// The region's bytes.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `host` maps `len` bytes for the region's lifetime (owned,
        // or promised by the caller of `Region::lent`); `&mut self` makes
        // this the backend's only view.
        unsafe { std::slice::from_raw_parts_mut(self.host, self.len) }
    }
}

/// Guest-physical memory: non-overlapping regions, sorted by address.
#[derive(Debug, Default)]
pub struct GuestMemory {
    regions: Vec<Region>,
}

impl GuestMemory {
    pub fn new(mut regions: Vec<Region>) -> Result<GuestMemory, KvmError> {
        regions.sort_by_key(|r| r.gpa);
        for w in regions.windows(2) {
            if w[0].end() > w[1].gpa.0 {
                return Err(KvmError::BadRegions(format!(
                    "[{}, {:#x}) overlaps [{}, {:#x})",
                    w[0].gpa,
                    w[0].end(),
                    w[1].gpa,
                    w[1].end()
                )));
            }
        }
        if let Some(r) = regions.iter().find(|r| !r.gpa.0.is_multiple_of(4096) || !r.len.is_multiple_of(4096) || r.len == 0) {
            return Err(KvmError::BadRegions(format!("[{}, +{:#x}) is not 4 KiB-aligned", r.gpa, r.len)));
        }
        Ok(GuestMemory { regions })
    }

    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// Adds a region; on error (overlap, misalignment) nothing changes.
    pub fn push(&mut self, region: Region) -> Result<(), KvmError> {
        if !region.gpa.0.is_multiple_of(4096) || !region.len.is_multiple_of(4096) || region.len == 0 {
            return Err(KvmError::BadRegions(format!("[{}, +{:#x}) is not 4 KiB-aligned", region.gpa, region.len)));
        }
        if let Some(r) = self.regions.iter().find(|r| r.gpa.0 < region.end() && region.gpa.0 < r.end()) {
            return Err(KvmError::BadRegions(format!(
                "[{}, {:#x}) overlaps [{}, {:#x})",
                region.gpa,
                region.end(),
                r.gpa,
                r.end()
            )));
        }
        let at = self.regions.partition_point(|r| r.gpa < region.gpa);
        self.regions.insert(at, region);
        Ok(())
    }

    /// Removes and returns the region starting at `gpa`.
    pub fn take(&mut self, gpa: Gpa) -> Option<Region> {
        let i = self.regions.iter().position(|r| r.gpa == gpa)?;
        Some(self.regions.remove(i))
    }

    /// First byte past the highest region.
    pub fn end(&self) -> u64 {
        self.regions.last().map_or(0, |r| r.end())
    }

    /// Calls `f` on each piece of `[gpa, gpa + len)` with the host slice
    /// behind it; fails if any byte of the range is outside every region.
    fn for_each_piece(
        &mut self,
        gpa: Gpa,
        len: usize,
        mut f: impl FnMut(&mut [u8], usize),
    ) -> Result<(), AccessError> {
        let end = gpa.0.checked_add(len as u64).ok_or(AccessError::OutOfRam { gpa, len })?;
        let mut at = gpa.0;
        while at < end {
            let r = self
                .regions
                .iter_mut()
                .find(|r| r.gpa.0 <= at && at < r.end())
                .ok_or(AccessError::OutOfRam { gpa, len })?;
            let off = (at - r.gpa.0) as usize;
            let n = ((end.min(r.end())) - at) as usize;
            let done = (at - gpa.0) as usize;
            f(&mut r.as_mut_slice()[off..off + n], done);
            at += n as u64;
        }
        Ok(())
    }

    pub fn read(&mut self, gpa: Gpa, buf: &mut [u8]) -> Result<(), AccessError> {
        self.for_each_piece(gpa, buf.len(), |host, done| buf[done..done + host.len()].copy_from_slice(host))
    }

    pub fn write(&mut self, gpa: Gpa, data: &[u8]) -> Result<(), AccessError> {
        self.for_each_piece(gpa, data.len(), |host, done| host.copy_from_slice(&data[done..done + host.len()]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_and_writes_across_regions() {
        let a = Region::owned(Gpa(0), OwnedMmap::anonymous(0x2000).unwrap());
        let b = Region::owned(Gpa(0x2000), OwnedMmap::anonymous(0x1000).unwrap());
        let mut m = GuestMemory::new(vec![b, a]).unwrap();
        m.write(Gpa(0x1ffe), &[1, 2, 3, 4]).unwrap();
        let mut buf = [0u8; 4];
        m.read(Gpa(0x1ffe), &mut buf).unwrap();
        assert_eq!(buf, [1, 2, 3, 4]);
        assert!(m.read(Gpa(0x2ffe), &mut buf).is_err());
        assert_eq!(m.end(), 0x3000);
        let c = Region::owned(Gpa(0x1000), OwnedMmap::anonymous(0x1000).unwrap());
        assert!(m.push(c).is_err());
    }
}
