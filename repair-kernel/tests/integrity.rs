//! Kernel text/rodata against snapshot hashes, with jump-label sites
//! skipped and pages restored from pristine copies.
mod common;
use common::*;

use std::collections::HashMap;

use repair_kernel::contract::{Action, ContractOut};
use repair_kernel::integrity::{self, IntegrityInput, PageHash, Pristine, SkipKind, SkipSite, PAGE};
use repair_kernel::mem::{LinkAddr, SliceMem};
use repair_kernel::verdict::Reason;
use repair_kernel::{kernel_view, layout::Item};

const PAGES: u64 = 16;

struct Store(HashMap<u64, [u8; PAGE]>);
impl Pristine for Store {
    fn page(&self, page: LinkAddr, buf: &mut [u8; PAGE]) -> bool {
        match self.0.get(&page.0) {
            Some(p) => {
                buf.copy_from_slice(p);
                true
            }
            None => false,
        }
    }
}

/// A guest whose text has content and a `__jump_table` of three entries,
/// and the snapshot (hashes, skips, pristine pages) of its healthy text.
fn snapshot() -> (Guest, Vec<PageHash>, Vec<SkipSite>, Store) {
    let mut g = scene();
    for i in 0..PAGES * PAGE as u64 / 8 {
        g.w64(rt(PANIC) + i * 8, i.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    }
    // struct jump_entry { s32 code; s32 target; long key; }, relative.
    let sites = [PANIC + 0x10, PANIC + 0x1ffe, PANIC + 0x5000];
    for (i, &site) in sites.iter().enumerate() {
        let e = rt(JUMP_TABLE) + 16 * i as u64;
        g.w32(e, site.wrapping_sub(JUMP_TABLE + 16 * i as u64) as u32);
        g.w32(e + 4, 0x100);
        g.w64(e + 8, 0);
    }
    g.layout.set(Item::SymStopJumpTable, JUMP_TABLE + 16 * sites.len() as u64);

    let input = g.input();
    let mut mem = SliceMem::new(&mut g.ram);
    let k = kernel_view(&mut mem, &input);
    let mut skips = vec![];
    let n = integrity::for_each_jump_label(&k, |gva| {
        skips.push(SkipSite { addr: gva.0 - SLIDE, len: integrity::JUMP_LABEL_SITE_LEN, kind: SkipKind::JumpLabel as u32 })
    })
    .unwrap();
    assert_eq!(n, 3);
    skips.sort_by_key(|s| s.addr);
    assert_eq!(skips.iter().map(|s| s.addr).collect::<Vec<_>>(), sites);
    let mut hashes = vec![];
    let mut store = HashMap::new();
    for p in 0..PAGES {
        let page = PANIC + p * PAGE as u64;
        let mut buf = [0u8; PAGE];
        k.read(k.link(LinkAddr(page)), &mut buf).unwrap();
        store.insert(page, buf);
        hashes.push(PageHash { page, sha256: integrity::hash_page(LinkAddr(page), &mut buf, &skips) });
    }
    (g, hashes, skips, Store(store))
}

fn check(g: &mut Guest, ii: &IntegrityInput<'_>, restore: bool) -> (integrity::IntegrityReport, Vec<integrity::Mismatch>) {
    let input = g.input();
    let mut mem = SliceMem::new(&mut g.ram);
    let mut k = kernel_view(&mut mem, &input);
    let mut v = vec![];
    let r = integrity::check_pages(&mut k, ii, restore, |m| v.push(*m));
    (r, v)
}

#[test]
fn healthy_text_matches_and_patched_jump_labels_are_ignored() {
    let (mut g, hashes, skips, _) = snapshot();
    let ii = IntegrityInput { hashes: &hashes, skips: &skips, pristine: None };
    let (r, v) = check(&mut g, &ii, false);
    assert_eq!((r.checked, r.mismatched), (PAGES as u32, 0), "{v:?}");
    // Flip the static keys: a 5-byte jmp at each site, one crossing a page.
    for s in &skips {
        g.wbytes(rt(s.addr), &[0xe9, 1, 2, 3, 4]);
    }
    let (r, _) = check(&mut g, &ii, false);
    assert_eq!(r.mismatched, 0);
}

#[test]
fn corrupted_text_is_found_and_restored_keeping_live_sites() {
    let (mut g, hashes, skips, store) = snapshot();
    g.wbytes(rt(PANIC + 0x10), &[0xe9, 9, 9, 9, 9]); // a legit patch
    g.wbytes(rt(PANIC + 0x3010), b"\xcc\xcc"); // corruption
    let ii = IntegrityInput { hashes: &hashes, skips: &skips, pristine: None };
    let (r, v) = check(&mut g, &ii, true);
    assert_eq!((r.mismatched, r.restored, r.still_corrupt()), (1, 0, 1));
    assert_eq!(v[0].page, LinkAddr(PANIC + 0x3000));
    assert!(!v[0].restorable);

    let ii = IntegrityInput { hashes: &hashes, skips: &skips, pristine: Some(&store) };
    // Not asked to restore: nothing written.
    let before = g.ram.clone();
    let (r, v) = check(&mut g, &ii, false);
    assert_eq!((r.mismatched, r.restored), (1, 0));
    assert!(v[0].restorable && v[0].first_diff == Some(0x10));
    assert!(g.ram == before);
    // Restore.
    let (r, _) = check(&mut g, &ii, true);
    assert_eq!((r.mismatched, r.restored), (1, 1));
    assert_eq!(g.rbytes(rt(PANIC + 0x3010), 2), store.0[&(PANIC + 0x3000)][0x10..0x12]);
    assert_eq!(g.rbytes(rt(PANIC + 0x10), 5), [0xe9, 9, 9, 9, 9]); // live site kept
    let (r, _) = check(&mut g, &ii, true);
    assert_eq!(r.mismatched, 0);
}

#[test]
fn a_forged_pristine_page_is_not_written() {
    let (mut g, hashes, skips, mut store) = snapshot();
    g.wbytes(rt(PANIC + 0x3010), b"\xcc");
    store.0.get_mut(&(PANIC + 0x3000)).unwrap()[0x100] ^= 1;
    let ii = IntegrityInput { hashes: &hashes, skips: &skips, pristine: Some(&store) };
    let (r, v) = check(&mut g, &ii, true);
    assert_eq!((r.mismatched, r.restored), (1, 0));
    assert!(!v[0].restorable);
}

#[test]
fn unreadable_pages_count_as_corrupt() {
    let (mut g, mut hashes, skips, _) = snapshot();
    hashes.push(PageHash { page: 0xffff_ffff_f000_0000, sha256: [0; 32] });
    let ii = IntegrityInput { hashes: &hashes, skips: &skips, pristine: None };
    let (r, v) = check(&mut g, &ii, false);
    assert_eq!((r.mismatched, r.unreadable), (1, 1));
    assert!(v[0].unreadable);
}

#[test]
fn run_with_integrity_restores_or_declines() {
    let (mut g, hashes, skips, store) = snapshot();
    g.wbytes(rt(PANIC + 0x2100), b"\x0f\x0b");
    let input = g.input();
    let mut out = ContractOut::empty();
    let none = IntegrityInput { hashes: &hashes, skips: &skips, pristine: None };
    repair_kernel::run_with(&mut SliceMem::new(&mut g.ram), &input, Some(&none), &mut out);
    assert_eq!(Reason::from_u32(out.reason_code), Some(Reason::DeclineCorruptKernel), "{}", str_of(&out.reason));
    assert!(str_of(&out.reason).starts_with("1 kernel text/rodata pages differ"), "{}", str_of(&out.reason));

    // Read-only with pristine copies: decided as if restored, nothing written.
    let with = IntegrityInput { hashes: &hashes, skips: &skips, pristine: Some(&store) };
    let mut ro = input;
    ro.read_only = 1;
    let before = g.ram.clone();
    repair_kernel::run_with(&mut SliceMem::new(&mut g.ram), &ro, Some(&with), &mut out);
    assert_eq!(Action::from_u32(out.action), Some(Action::Kill));
    assert_eq!(out.pages_restored, 0);
    assert!(g.ram == before);

    repair_kernel::run_with(&mut SliceMem::new(&mut g.ram), &input, Some(&with), &mut out);
    assert_eq!(Action::from_u32(out.action), Some(Action::Kill));
    assert_eq!(out.pages_restored, 1);
    assert_eq!(g.rbytes(rt(PANIC + 0x2100), 2), store.0[&(PANIC + 0x2000)][0x100..0x102]);
}

#[test]
fn jump_table_bytes_from_a_vmlinux() {
    let mut bytes = vec![0u8; 32];
    bytes[0..4].copy_from_slice(&(-0x100i32).to_le_bytes());
    bytes[16..20].copy_from_slice(&0x40i32.to_le_bytes());
    let mut v = vec![];
    assert_eq!(integrity::jump_table_sites(&bytes, 0xffff_ffff_8200_0000, |a| v.push(a)), 2);
    assert_eq!(v, [0xffff_ffff_81ff_ff00, 0xffff_ffff_8200_0050]);
    assert_eq!(std::mem::size_of::<PageHash>(), 40);
    assert_eq!(std::mem::size_of::<SkipSite>(), 16);
}

#[test]
fn streaming_hash_equals_masked_hash() {
    let mut page = [0u8; PAGE];
    for (i, b) in page.iter_mut().enumerate() {
        *b = (i * 7) as u8;
    }
    let base = 0xffff_ffff_8100_0000u64;
    let skips = [
        SkipSite { addr: base - 2, len: 5, kind: 1 },
        SkipSite { addr: base + 0x10, len: 5, kind: 1 },
        SkipSite { addr: base + 0x12, len: 100, kind: 4 }, // overlapping
        SkipSite { addr: base + 0xffe, len: 5, kind: 1 },
        SkipSite { addr: base + 0x1000, len: 5, kind: 1 }, // next page
    ];
    let a = integrity::hash_page_masked(LinkAddr(base), &page, &skips);
    let mut m = page;
    let b = integrity::hash_page(LinkAddr(base), &mut m, &skips);
    assert_eq!(a, b);
    assert_eq!(&m[..3], &[0, 0, 0]);
    assert_eq!(m[3], 21);
    assert!(m[0x10..0x76].iter().all(|&x| x == 0));
    assert_eq!(m[0x76], (0x76 * 7) as u8);
    assert_eq!(&m[0xffe..], &[0, 0]);
}
