//! The healthy snapshot: kernel text and read-only data read from the running
//! guest once it has booted, so after Linux's own boot-time patching
//! (alternatives, jump labels, ftrace, static calls). Their hashes, and
//! optionally the pristine pages, go into the repair image, so the integrity
//! check compares against what this very guest ran when it was healthy.

use crate::access::GuestAccess;
use crate::flow::{FlowError, Session};
use crate::guestmem::GuestPhys;
use repair_kernel::arch::x86_64::pgtable::{translate, Paging};
use repair_kernel::layout::Item;
use repair_kernel::mem::{Gva, PhysMem};

const PAGE: u64 = 4096;

/// What a snapshot read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotStats {
    pub pages: usize,
    pub unmapped: usize,
}

/// Reads every page of `[_stext, _etext)` and `[__start_rodata,
/// __end_rodata)` of the stopped guest through `vcpu`'s page tables, keyed by
/// link-time page address, and puts them in the session's image (hashes,
/// plus the pages themselves with `keep_pristine`). `progress` is called
/// with (done, total) pages.
pub fn take_live_snapshot<G: GuestAccess + ?Sized>(
    guest: &mut G,
    session: &mut Session,
    keep_pristine: bool,
    mut progress: impl FnMut(usize, usize),
) -> Result<SnapshotStats, FlowError> {
    let vcpu = *guest.vcpus()?.first().ok_or_else(|| crate::access::AccessError::Other("no vCPU".into()))?;
    let regs = guest.get_regs(vcpu)?;
    let paging = Paging::from_regs(regs.cr3, regs.cr4);
    let layout = session.image.layout;
    let get = |i: Item| layout.get(i).ok_or(FlowError::Layout(i));
    let ranges = [(get(Item::SymStext)?, get(Item::SymEtext)?), (get(Item::SymStartRodata)?, get(Item::SymEndRodata)?)];
    let total: usize = ranges.iter().map(|(s, e)| (e.saturating_sub(*s) / PAGE + 1) as usize).sum();
    let slide = session.slide.slide;
    let mem = GuestPhys::read_only(guest, session.ram_end);
    let mut pages = Vec::with_capacity(total);
    let mut unmapped = 0;
    for (start, end) in ranges {
        let mut link = start & !(PAGE - 1);
        while link < end {
            let mut page = [0u8; PAGE as usize];
            match translate(&mem, paging, Gva(link.wrapping_add(slide))) {
                Ok(t) if mem.read_phys(t.gpa, &mut page).is_ok() => pages.push((link, page)),
                _ => unmapped += 1,
            }
            link += PAGE;
            if pages.len() % 256 == 0 {
                progress(pages.len() + unmapped, total);
            }
        }
    }
    progress(total, total);
    let n = pages.len();
    session.image.set_snapshot(pages.into_iter(), keep_pristine);
    Ok(SnapshotStats { pages: n, unmapped })
}
