//! Kernel text and read-only data against the healthy snapshot.
//!
//! The image carries one [`PageHash`] per 4 KiB page of `[_stext, _etext)`
//! and `[__start_rodata, __end_rodata)`: SHA-256 of the page as the healthy
//! kernel had it, with the bytes Linux legitimately patches at run time
//! (jump labels, ftrace call sites, static calls; the [`SkipSite`] table)
//! zeroed first. A cryptographic hash means a corrupted guest cannot forge
//! a match. The skip table comes from the image (the builder's trusted
//! copy), not from the crashed guest, so the guest cannot choose which
//! bytes are ignored either.
//!
//! The builder computes hashes with [`hash_page`], the same function the
//! check uses, so both sides agree byte for byte.

use sha2::{Digest, Sha256};

use crate::arch::x86_64::pgtable::PAGE_SIZE;
use crate::kmem::Kernel;
use crate::mem::{Error, Gva, LinkAddr, PhysMem};

/// Size of a page record's page.
pub const PAGE: usize = PAGE_SIZE as usize;
/// Length of a patched jump-label site (`JUMP_LABEL_NOP_SIZE`; 2-byte
/// sites are covered too).
pub const JUMP_LABEL_SITE_LEN: u32 = 5;
/// Size of a `struct jump_entry` on x86_64.
pub const JUMP_ENTRY_SIZE: u64 = 16;
/// Most `__jump_table` entries walked (Debian's cloud kernel has ~20k).
pub const MAX_JUMP_ENTRIES: u32 = 1 << 20;

/// One page of the healthy snapshot: `#[repr(C)]`, 40 bytes, as the image
/// stores it. Sorted by `page`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageHash {
    /// Link-time address of the page (4 KiB aligned); add the KASLR slide.
    pub page: u64,
    /// SHA-256 of the page with the skip sites zeroed ([`hash_page`]).
    pub sha256: [u8; 32],
}

/// What patches a skipped site at run time.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SkipKind {
    Other = 0,
    /// A `__jump_table` entry's code (static keys).
    JumpLabel = 1,
    /// An `__mcount_loc` / `__patchable_function_entries` site (ftrace).
    Ftrace = 2,
    /// A `.static_call_sites` site.
    StaticCall = 3,
    /// An `.altinstructions` site patched after the snapshot.
    Alternative = 4,
}

/// A byte range ignored by the comparison: `#[repr(C)]`, 16 bytes, as the
/// image stores it. Sorted by `addr`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SkipSite {
    /// Link-time address of the first byte.
    pub addr: u64,
    pub len: u32,
    /// A [`SkipKind`].
    pub kind: u32,
}

/// Zeroes, in `bytes` (the page at link-time address `page`), every byte
/// covered by a site of `skips` (sorted by `addr`).
pub fn mask_page(page: LinkAddr, bytes: &mut [u8; PAGE], skips: &[SkipSite]) {
    for_each_overlap(page, skips, |lo, hi| bytes[lo..hi].fill(0));
}

/// Longest skip site honoured; longer ones are cut to this (a patched
/// site is a few bytes; this bound keeps the lookup a binary search).
pub const MAX_SKIP_LEN: u32 = 0x1_0000;

/// Calls `f(lo, hi)` with the in-page byte range of each site overlapping
/// the page at `page`, in address order (ranges may overlap).
fn for_each_overlap(page: LinkAddr, skips: &[SkipSite], mut f: impl FnMut(usize, usize)) {
    let start = page.0;
    let end = start.saturating_add(PAGE_SIZE);
    // Sorted by addr, so this predicate is monotone.
    let first = skips.partition_point(|s| s.addr < start.saturating_sub(MAX_SKIP_LEN as u64));
    for s in &skips[first..] {
        if s.addr >= end {
            break;
        }
        let s_end = s.addr.saturating_add(s.len.min(MAX_SKIP_LEN) as u64);
        if s_end <= start {
            continue;
        }
        let lo = (s.addr.max(start) - start) as usize;
        let hi = (s_end.min(end) - start) as usize;
        f(lo, hi);
    }
}

/// The hash a [`PageHash`] records: SHA-256 of the page with its skip
/// sites zeroed. `bytes` is left masked.
pub fn hash_page(page: LinkAddr, bytes: &mut [u8; PAGE], skips: &[SkipSite]) -> [u8; 32] {
    mask_page(page, bytes, skips);
    Sha256::digest(&bytes[..]).into()
}

/// [`hash_page`] without touching `bytes`: the skipped ranges are fed to
/// the hash as zeros, so no second page buffer is needed (the unikernel's
/// stack is 16 KiB).
pub fn hash_page_masked(page: LinkAddr, bytes: &[u8; PAGE], skips: &[SkipSite]) -> [u8; 32] {
    let mut h = Sha256::new();
    let mut pos = 0usize;
    const ZEROS: [u8; 64] = [0; 64];
    for_each_overlap(page, skips, |lo, hi| {
        if hi <= pos {
            return;
        }
        let lo = lo.max(pos);
        h.update(&bytes[pos..lo]);
        let mut z = hi - lo;
        while z > 0 {
            let n = z.min(ZEROS.len());
            h.update(&ZEROS[..n]);
            z -= n;
        }
        pos = hi;
    });
    h.update(&bytes[pos..]);
    h.finalize().into()
}

/// Decodes a `struct jump_entry { s32 code; s32 target; long key; }` at
/// `entry`: the address of its patched site (`&entry->code + code`).
pub fn jump_entry_code(entry: u64, code: i32) -> u64 {
    entry.wrapping_add(code as i64 as u64)
}

/// Calls `f` with the code address of each entry of a `__jump_table`
/// section given as bytes at address `table` (the builder's view of a
/// vmlinux or a snapshot). Returns the number of entries.
pub fn jump_table_sites(bytes: &[u8], table: u64, mut f: impl FnMut(u64)) -> usize {
    let mut n = 0;
    for (i, e) in bytes.chunks_exact(JUMP_ENTRY_SIZE as usize).enumerate() {
        let code = i32::from_le_bytes([e[0], e[1], e[2], e[3]]);
        f(jump_entry_code(table.wrapping_add(i as u64 * JUMP_ENTRY_SIZE), code));
        n += 1;
    }
    n
}

/// The same over the guest's own `[__start___jump_table,
/// __stop___jump_table)`: calls `f` with each site's run-time address.
/// For host-side builders reading a healthy snapshot; the check does not
/// trust the crashed guest's table.
pub fn for_each_jump_label<M: PhysMem + ?Sized>(k: &Kernel<'_, M>, mut f: impl FnMut(Gva)) -> Result<u32, Error> {
    use crate::layout::Item;
    let start = k.sym(Item::SymStartJumpTable)?;
    let stop = k.sym(Item::SymStopJumpTable)?;
    let count = stop.0.checked_sub(start.0).ok_or(Error::Absurd("__jump_table bounds", start.0))? / JUMP_ENTRY_SIZE;
    if count > MAX_JUMP_ENTRIES as u64 {
        return Err(Error::Absurd("__jump_table entries", count));
    }
    for i in 0..count {
        let e = start.add(i * JUMP_ENTRY_SIZE);
        f(Gva(jump_entry_code(e.0, k.read_i32(e)?)));
    }
    Ok(count as u32)
}

/// Where pristine copies of pages come from (the image's page store).
pub trait Pristine {
    /// Fills `buf` with the healthy page at link-time address `page`;
    /// false when the image has no copy of it.
    fn page(&self, page: LinkAddr, buf: &mut [u8; PAGE]) -> bool;
}

/// A page that did not match.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mismatch {
    /// Link-time and run-time address of the page.
    pub page: LinkAddr,
    pub gva: Gva,
    /// The page could not be read at all (unmapped, outside RAM).
    pub unreadable: bool,
    /// A pristine copy exists and matches the recorded hash.
    pub restorable: bool,
    /// The page was restored from a pristine copy and now matches.
    pub restored: bool,
    /// First differing in-page offset against the pristine copy, when one
    /// was available.
    pub first_diff: Option<u16>,
}

/// Totals of a check.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IntegrityReport {
    pub checked: u32,
    pub mismatched: u32,
    pub unreadable: u32,
    pub restored: u32,
}

impl IntegrityReport {
    /// Pages still not matching the snapshot.
    pub fn still_corrupt(&self) -> u32 {
        self.mismatched.saturating_sub(self.restored)
    }
}

/// The integrity inputs carried by the repair image.
#[derive(Clone, Copy)]
pub struct IntegrityInput<'a> {
    pub hashes: &'a [PageHash],
    pub skips: &'a [SkipSite],
    pub pristine: Option<&'a dyn Pristine>,
}

impl core::fmt::Debug for IntegrityInput<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("IntegrityInput")
            .field("hashes", &self.hashes.len())
            .field("skips", &self.skips.len())
            .field("pristine", &self.pristine.is_some())
            .finish()
    }
}

/// Checks every page of `input.hashes` against the crashed kernel; when
/// `restore` and a pristine copy exists (and itself matches the recorded
/// hash), rewrites the page, keeping the live bytes at skip sites. `f`
/// sees each mismatching page.
pub fn check_pages<M: PhysMem + ?Sized>(
    k: &mut Kernel<'_, M>,
    input: &IntegrityInput<'_>,
    restore: bool,
    mut f: impl FnMut(&Mismatch),
) -> IntegrityReport {
    let mut rep = IntegrityReport::default();
    // One page buffer: the unikernel's stack is small.
    let mut buf = [0u8; PAGE];
    for h in input.hashes {
        rep.checked += 1;
        let page = LinkAddr(h.page & !(PAGE_SIZE - 1));
        let gva = k.link(page);
        let mut m = Mismatch { page, gva, unreadable: false, restorable: false, restored: false, first_diff: None };
        if k.read(gva, &mut buf).is_err() {
            m.unreadable = true;
            rep.unreadable += 1;
            rep.mismatched += 1;
            f(&m);
            continue;
        }
        if hash_page_masked(page, &buf, input.skips) == h.sha256 {
            continue;
        }
        rep.mismatched += 1;
        if let Some(p) = input.pristine {
            if p.page(page, &mut buf) {
                m.first_diff = first_diff(k, gva, &buf);
                // Keep what the kernel patched since the snapshot: the
                // live bytes at skip sites (the page was readable above).
                let mut ok = true;
                for_each_overlap(page, input.skips, |lo, hi| {
                    ok &= k.read(gva.add(lo as u64), &mut buf[lo..hi]).is_ok();
                });
                m.restorable = ok && hash_page_masked(page, &buf, input.skips) == h.sha256;
                if m.restorable && restore && k.write(gva, &buf).is_ok() {
                    m.restored = true;
                    rep.restored += 1;
                }
            }
        }
        f(&m);
    }
    rep
}

/// First in-page offset where the live page differs from `good`.
fn first_diff<M: PhysMem + ?Sized>(k: &Kernel<'_, M>, gva: Gva, good: &[u8; PAGE]) -> Option<u16> {
    let mut chunk = [0u8; 64];
    for (i, g) in good.chunks_exact(64).enumerate() {
        k.read(gva.add(i as u64 * 64), &mut chunk).ok()?;
        if let Some(d) = chunk.iter().zip(g).position(|(a, b)| a != b) {
            return Some((i * 64 + d) as u16);
        }
    }
    None
}
