//! Guest RAM as the repair kernel sees it: identity-mapped by the loader's
//! page tables (guest-physical address = virtual address, PML4 slot 0).

use repair_kernel::contract::ContractIn;
use repair_kernel::mem::{Error, Gpa, PhysMem};

/// The loader identity-maps guest RAM below this bound only (PML4 slot 0,
/// 512 GiB: `builder::stage::IDENTITY_LIMIT`).
pub const IDENTITY_LIMIT: u64 = 1 << 39;

/// [`PhysMem`] over the identity map, bounds-checked: reads stop at the end
/// of RAM (and of the identity map); writes also refuse the range the repair
/// kernel itself was staged in (its code, stack and page tables).
#[derive(Debug)]
pub struct IdentityMem {
    end: u64,
    staged: (u64, u64),
}

impl IdentityMem {
    pub fn new(input: &ContractIn) -> Self {
        Self {
            end: input.ram_end.min(IDENTITY_LIMIT),
            staged: (
                input.borrowed_base,
                input.borrowed_base.saturating_add(input.borrowed_size),
            ),
        }
    }

    fn check(&self, gpa: Gpa, len: usize) -> Result<u64, Error> {
        let start = gpa.0;
        match start.checked_add(len as u64) {
            Some(end) if end <= self.end => Ok(start),
            _ => Err(Error::OutOfRam(gpa)),
        }
    }
}

impl PhysMem for IdentityMem {
    fn read_phys(&self, gpa: Gpa, buf: &mut [u8]) -> Result<(), Error> {
        let src = self.check(gpa, buf.len())?;
        // SAFETY: [src, src + len) is below `end`, which the loader
        // identity-mapped; `buf` is an exclusive slice of our own memory.
        unsafe { crate::arch::copy_bytes(src, buf.as_mut_ptr() as u64, buf.len()) };
        Ok(())
    }

    fn write_phys(&mut self, gpa: Gpa, data: &[u8]) -> Result<(), Error> {
        let dst = self.check(gpa, data.len())?;
        let end = dst + data.len() as u64;
        if dst < self.staged.1 && end > self.staged.0 {
            // The repair kernel's own code, stack and page tables.
            return Err(Error::Backend);
        }
        // SAFETY: [dst, end) is identity-mapped guest RAM outside the staged
        // range, so it is none of the repair kernel's own memory and no Rust
        // reference points into it.
        unsafe { crate::arch::copy_bytes(data.as_ptr() as u64, dst, data.len()) };
        Ok(())
    }

    fn ram_end(&self) -> u64 {
        self.end
    }
}
