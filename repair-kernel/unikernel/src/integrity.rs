//! The image's integrity data as the loader staged it (see the builder's
//! `StagePlan::integrity_gva`): a table of nine `u64`s whose virtual address
//! arrives in `rsi`, pointing at page hashes, skip sites and pristine pages
//! mapped read-only in this kernel's window.

use repair_kernel::integrity::{IntegrityInput, PageHash, Pristine, SkipSite, PAGE};
use repair_kernel::mem::LinkAddr;

use repair_kernel::contract::{IntegrityTable as Table, INTEGRITY_MAGIC as MAGIC, INTEGRITY_VERSION as VERSION};
/// The window the loader maps for us starts here (`link.ld`); staged data
/// must lie above it and in the lower half.
const WINDOW_START: u64 = 0x0000_0080_0000_0000;
const WINDOW_END: u64 = 0x0000_8000_0000_0000;
/// Sanity caps: a distribution kernel has ~6k text/rodata pages and ~110k
/// patch sites.
const MAX_PAGES: u64 = 1 << 20;
const MAX_SKIPS: u64 = 1 << 24;


/// Pristine pages: a sorted index of link-time addresses and the pages.
#[derive(Debug)]
pub struct Pages {
    index: &'static [u64],
    pages: &'static [[u8; PAGE]],
}

impl Pristine for Pages {
    fn page(&self, page: LinkAddr, buf: &mut [u8; PAGE]) -> bool {
        match self.index.binary_search(&page.0) {
            Ok(i) => match self.pages.get(i) {
                Some(p) => {
                    buf.copy_from_slice(p);
                    true
                }
                None => false,
            },
            Err(_) => false,
        }
    }
}

fn in_window(addr: u64, count: u64, size: u64) -> bool {
    let Some(len) = count.checked_mul(size) else { return false };
    addr >= WINDOW_START && addr.is_multiple_of(8) && addr.checked_add(len).is_some_and(|e| e <= WINDOW_END)
}

/// The staged data, or `None` if `table` is 0 or not a valid table.
pub fn staged(table: u64) -> Option<(&'static [PageHash], &'static [SkipSite], Pages)> {
    if !in_window(table, 1, core::mem::size_of::<Table>() as u64) {
        return None;
    }
    // SAFETY: the loader passes in `rsi` either 0 or the address of a table
    // it mapped (read-only) in our window for the whole run; the address
    // was checked to be in the window and aligned.
    let t = unsafe { *(table as *const Table) };
    if t.magic != MAGIC
        || t.version != VERSION
        || t.n_hashes > MAX_PAGES
        || t.n_pristine > MAX_PAGES
        || t.n_skips > MAX_SKIPS
        || !in_window(t.hashes, t.n_hashes, 40)
        || !in_window(t.skips, t.n_skips, 16)
        || !in_window(t.pristine_index, t.n_pristine, 8)
        || !in_window(t.pristine_pages, t.n_pristine, PAGE as u64)
    {
        return None;
    }
    // SAFETY: each array lies in the window, where the loader mapped it
    // (with the table) for the whole run and nothing writes to it; the
    // element types are plain `repr(C)` integers valid for any bytes, and
    // the addresses are 8-aligned as their alignment requires.
    unsafe {
        Some((
            core::slice::from_raw_parts(t.hashes as *const PageHash, t.n_hashes as usize),
            core::slice::from_raw_parts(t.skips as *const SkipSite, t.n_skips as usize),
            Pages {
                index: core::slice::from_raw_parts(t.pristine_index as *const u64, t.n_pristine as usize),
                pages: core::slice::from_raw_parts(
                    t.pristine_pages as *const [u8; PAGE],
                    t.n_pristine as usize,
                ),
            },
        ))
    }
}

/// Runs the repair kernel, with the integrity check when data was staged.
pub fn run(
    mem: &mut crate::mem::IdentityMem,
    table: u64,
    input: &repair_kernel::contract::ContractIn,
    out: &mut repair_kernel::contract::ContractOut,
) {
    match staged(table) {
        Some((hashes, skips, pages)) => {
            let pristine: Option<&dyn Pristine> = if pages.index.is_empty() { None } else { Some(&pages) };
            let ii = IntegrityInput { hashes, skips, pristine };
            repair_kernel::run_with(mem, input, Some(&ii), out);
        }
        None => repair_kernel::run(mem, input, out),
    }
}
