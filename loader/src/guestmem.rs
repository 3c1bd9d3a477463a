//! A guest, seen by the repair kernel's walkers: [`repair_kernel::mem::PhysMem`]
//! over any [`GuestAccess`], so the host runs the very walkers the unikernel
//! runs (read-only `diagnose`, KASLR discovery, tests).

use crate::access::{self, GuestAccess};
use repair_kernel::mem::{Error as MemError, Gpa, PhysMem};
use std::cell::RefCell;

/// Adapts a guest backend to the walkers' memory trait. Walkers read through
/// `&self`; backends need `&mut` (a socket to talk over), hence the `RefCell`.
#[derive(Debug)]
pub struct GuestPhys<'g, G: GuestAccess + ?Sized> {
    guest: RefCell<&'g mut G>,
    ram_end: u64,
    /// Refuse writes (the read-only `diagnose` promise, enforced here).
    read_only: bool,
}

impl<'g, G: GuestAccess + ?Sized> GuestPhys<'g, G> {
    pub fn new(guest: &'g mut G, ram_end: u64) -> Self {
        Self { guest: RefCell::new(guest), ram_end, read_only: false }
    }

    /// A view that fails every write.
    pub fn read_only(guest: &'g mut G, ram_end: u64) -> Self {
        Self { guest: RefCell::new(guest), ram_end, read_only: true }
    }
}

impl<G: GuestAccess + ?Sized> PhysMem for GuestPhys<'_, G> {
    fn read_phys(&self, gpa: Gpa, buf: &mut [u8]) -> Result<(), MemError> {
        repair_kernel::mem::check_range(gpa, buf.len(), self.ram_end)?;
        self.guest
            .borrow_mut()
            .read_phys(gpa, buf)
            .map_err(|_| MemError::Backend)
    }

    fn write_phys(&mut self, gpa: Gpa, data: &[u8]) -> Result<(), MemError> {
        if self.read_only {
            return Err(MemError::Backend);
        }
        repair_kernel::mem::check_range(gpa, data.len(), self.ram_end)?;
        self.guest
            .get_mut()
            .write_phys(gpa, data)
            .map_err(|_| MemError::Backend)
    }

    fn ram_end(&self) -> u64 {
        self.ram_end
    }
}

/// Finds the end of guest RAM by probing physical reads (a binary search
/// over 4 KiB pages below 4 GiB), for backends that cannot say it.
pub fn probe_ram_end<G: GuestAccess + ?Sized>(guest: &mut G) -> Result<u64, access::AccessError> {
    let mut byte = [0u8; 1];
    let mut readable = |g: &mut G, page: u64| g.read_phys(Gpa(page << 12), &mut byte).is_ok();
    if !readable(guest, 0) {
        return Err(access::AccessError::Other("guest-physical address 0 is not readable".into()));
    }
    // Invariant: page `lo` readable, page `hi` not (or the 4 GiB cap).
    let (mut lo, mut hi) = (0u64, 1u64 << 20);
    if readable(guest, hi - 1) {
        return Ok(hi << 12);
    }
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if readable(guest, mid) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Ok(hi << 12)
}
