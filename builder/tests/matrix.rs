//! The text snapshot of every series of the kit's kernel matrix
//! (`scripts/kit-matrix`): the pages the image expects, hashed from the
//! vmlinux file with the run-time patch sites skipped
//! (`builder/src/skips.rs`), equal page for page to the text of the same
//! kernel booted under QEMU. A table read in the wrong format (an
//! `alt_instr` of 12 bytes where the kernel has 14, a missing call-depth
//! table) shows up here as differing pages. Fails, never skips, without
//! the kit: `scripts/guest-kit`.

use builder::image::{RepairImage, PAGE_SIZE};
use builder::{build_from_vmlinux, BuildOptions};
use harness::{Guest, GuestConfig, Kernel, Kit, Series};
use repair_kernel::integrity::hash_page;
use repair_kernel::layout::Item;
use repair_kernel::mem::LinkAddr;

/// Boots the kernel (one vCPU, `nokaslr`), dumps its text once booted,
/// and counts the text pages whose skip-aware hash differs from the
/// image's. Returns (pages hashed, text pages differing, examples).
fn text_vs_booted(series: Series) -> (usize, usize, Vec<String>) {
    let kernel = Kernel::Matrix(series);
    let vmlinux = Kit::locate().unwrap().vmlinux(kernel).unwrap_or_else(|e| panic!("{series}: {e}"));
    let img: RepairImage = build_from_vmlinux(&vmlinux, &BuildOptions::default())
        .unwrap_or_else(|e| panic!("{series}: building the image: {e}"));
    let mut cfg = GuestConfig::new(kernel).append("nokaslr");
    cfg.cpus = 1;
    cfg.boot_timeout = std::time::Duration::from_secs(300); // a loaded host
    let mut guest = Guest::boot(&cfg).unwrap_or_else(|e| panic!("{series}: {e}"));
    let dir = tempfile::tempdir().unwrap();
    let dump = dir.path().join("text.bin");
    let mut qmp = |cmd: serde_json::Value| guest.qmp(&cmd).unwrap_or_else(|e| panic!("{e}"));
    qmp(serde_json::json!({"execute": "stop"}));
    let etext = img.layout.get(Item::SymEtext).unwrap();
    let text: Vec<u64> = img.page_hashes.keys().copied().filter(|&p| p < etext).collect();
    let lo = text[0];
    let hi = *text.last().unwrap() + PAGE_SIZE as u64;
    // nokaslr: loaded at its link address minus __START_KERNEL_map.
    qmp(serde_json::json!({"execute": "pmemsave",
        "arguments": {"val": lo - 0xffff_ffff_8000_0000u64, "size": hi - lo, "filename": dump.to_str().unwrap()}}));
    drop(guest);
    let bytes = std::fs::read(&dump).unwrap();
    if let Some(d) = std::env::var_os("KEEP_LIVE_DUMP") {
        let d = std::path::PathBuf::from(d);
        std::fs::write(d.join(format!("live-{series}.bin")), &bytes).unwrap();
        let skips: String = img.skips.iter().map(|k| format!("{:x} {} {}\n", k.addr, k.len, k.kind)).collect();
        std::fs::write(d.join(format!("skips-{series}.txt")), skips).unwrap();
    }
    let mut bad = Vec::new();
    for &p in &text {
        let at = (p - lo) as usize;
        let mut page: [u8; PAGE_SIZE] = bytes[at..at + PAGE_SIZE].try_into().unwrap();
        if hash_page(LinkAddr(p), &mut page, &img.skips) != img.page_hashes[&p] {
            bad.push(format!("{p:#x}"));
        }
    }
    eprintln!("{series}: {} text pages hashed, {} differ from the booted kernel (e.g. {:?})", text.len(), bad.len(), &bad[..bad.len().min(8)]);
    (text.len(), bad.len(), bad)
}

fn snapshot_matches(series: Series) {
    let (total, bad, examples) = text_vs_booted(series);
    assert!(total > 1000, "{series}: only {total} text pages");
    assert_eq!(
        bad, 0,
        "{series}: text pages of the file snapshot differ from the booted kernel ({:?}): a run-time \
         patch table is missing or misread in builder/src/skips.rs (KEEP_LIVE_DUMP=DIR keeps the dump)",
        &examples[..examples.len().min(8)]
    );
}

#[test]
fn v5_10_text_snapshot_is_the_booted_text() {
    snapshot_matches(Series::V5_10);
}

#[test]
fn v6_1_text_snapshot_is_the_booted_text() {
    snapshot_matches(Series::V6_1);
}

#[test]
fn v6_12_text_snapshot_is_the_booted_text() {
    snapshot_matches(Series::V6_12);
}

#[test]
fn v7_text_snapshot_is_the_booted_text() {
    snapshot_matches(Series::V7);
}

#[test]
fn v6_12_rt_text_snapshot_is_the_booted_text() {
    snapshot_matches(Series::V6_12Rt);
}
