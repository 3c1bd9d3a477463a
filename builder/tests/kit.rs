//! Images built from the guest kit's real kernels (Debian's cloud kernel and
//! the LKDTM build). These tests fail, never skip, when the kit is missing:
//! build it with `scripts/guest-kit` (or point CRASH_REPAIR_KIT at one).

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use builder::image::{ImageError, RepairImage, SnapshotSource, PAGE_SIZE};
use builder::{build_from_vmlinux, BuildOptions, StagePlan};
use harness::{Guest, GuestConfig, Kernel};
use repair_kernel::integrity::hash_page;
use repair_kernel::layout::{Item, ITEMS};
use repair_kernel::mem::LinkAddr;

fn kit_dir() -> PathBuf {
    match std::env::var_os("CRASH_REPAIR_KIT") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/crash-repair/kit"),
    }
}

fn vmlinux(kernel: &str) -> PathBuf {
    let p = kit_dir().join(kernel).join("vmlinux");
    assert!(
        p.exists(),
        "{} is missing: build the guest kit first with `scripts/guest-kit` \
         (or point CRASH_REPAIR_KIT at one)",
        p.display()
    );
    p
}

fn image(kernel: &'static str) -> &'static RepairImage {
    static DEBIAN: OnceLock<RepairImage> = OnceLock::new();
    static LKDTM: OnceLock<RepairImage> = OnceLock::new();
    let cell = if kernel == "debian" { &DEBIAN } else { &LKDTM };
    cell.get_or_init(|| {
        build_from_vmlinux(&vmlinux(kernel), &BuildOptions::default())
            .unwrap_or_else(|e| panic!("building an image for the {kernel} kit kernel: {e}"))
    })
}

fn check_one(kernel: &'static str) {
    let img = image(kernel);
    assert!(img.kernel.release.starts_with("6.1"), "{}", img.kernel.release);
    assert_eq!(img.kernel.build_id.len(), 20);
    assert_eq!(img.snapshot_source, SnapshotSource::VmlinuxFile);
    // Every required item, and one of each drift pair, was found.
    for (i, spec) in ITEMS.iter().enumerate() {
        if spec.required {
            assert_ne!(img.layout.values[i], u64::MAX, "{kernel}: {} {}", spec.ty, spec.member);
        }
    }
    assert!(img.layout.get(Item::TaskStateNew).is_some() || img.layout.get(Item::TaskStateOld).is_some());
    // Hashes cover [_stext, _etext) page by page and agree with the
    // repair kernel's own hash of the file's bytes.
    let stext = img.layout.get(Item::SymStext).unwrap();
    let etext = img.layout.get(Item::SymEtext).unwrap();
    let first = stext & !0xfff;
    for p in (first..etext).step_by(PAGE_SIZE) {
        assert!(img.page_hashes.contains_key(&p), "{kernel}: text page {p:#x} not hashed");
    }
    assert!(img.skips.len() > 500, "{kernel}: only {} skip sites", img.skips.len());
    assert!(img.skips.windows(2).all(|w| w[0].addr <= w[1].addr));
    // The round trip keeps everything.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(format!("{kernel}.img"));
    img.write(&path).unwrap();
    let (back, info) = RepairImage::read_with_info(&path).unwrap();
    assert_eq!(&back, img);
    let report = builder::inspect::report(&back, &info);
    assert!(!report.contains("OVER THE GOAL"), "{report}");
    assert!(builder::inspect::kernel_plus_profile(&back) < builder::inspect::SIZE_GOAL);
    // Its own kernel is accepted; and it stages in 512 KiB of low memory.
    back.check_kernel(Some(&img.kernel.build_id), &img.kernel.banner).unwrap();
    StagePlan::new(&back, 0x10000, 0x80000, 512 << 20).unwrap();
}

#[test]
fn debian_image() {
    check_one("debian");
}

#[test]
fn lkdtm_image() {
    check_one("lkdtm");
}

#[test]
fn image_for_one_kit_kernel_refused_by_the_other() {
    let deb = image("debian");
    let lk = image("lkdtm");
    assert_ne!(deb.kernel.build_id, lk.kernel.build_id);
    for (img, other) in [(deb, lk), (lk, deb)] {
        let e = img.check_kernel(Some(&other.kernel.build_id), &other.kernel.banner).unwrap_err();
        assert!(matches!(e, ImageError::WrongKernel { .. }));
        let msg = e.to_string();
        assert!(msg.contains(&format!("image built for {}", img.kernel.release)), "{msg}");
        assert!(msg.contains(&format!("guest runs {}", other.kernel.release)), "{msg}");
        assert!(msg.contains("rebuild with build-repair-image --vmlinux"), "{msg}");
        // The banner alone (no build-id known) is enough to refuse.
        assert!(img.check_kernel(None, &other.kernel.banner).is_err());
    }
}

#[test]
fn file_hash_matches_the_library_hash() {
    let img = image("debian");
    let path = vmlinux("debian");
    let data = std::fs::read(&path).unwrap();
    let pages = builder::elf::VmlinuxPages::new(&data).unwrap();
    let stext = img.layout.get(Item::SymStext).unwrap() & !0xfff;
    for p in [stext, stext + 0x10_0000] {
        let mut page = pages.page(p);
        assert_eq!(hash_page(LinkAddr(p), &mut page, &img.skips), img.page_hashes[&p]);
    }
}

#[test]
fn cli_builds_and_inspects() {
    let exe = env!("CARGO_BIN_EXE_build-repair-image");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("deb.img");
    let prof = dir.path().join("deb.json");
    let st = Command::new(exe)
        .args(["--vmlinux"])
        .arg(vmlinux("debian"))
        .arg("--output")
        .arg(&out)
        .arg("--emit-profile")
        .arg(&prof)
        .output()
        .unwrap();
    assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
    let json = std::fs::read_to_string(&prof).unwrap();
    assert!(json.contains("\"init_task\""));
    let st = Command::new(exe).arg("inspect").arg(&out).output().unwrap();
    assert!(st.status.success());
    let text = String::from_utf8_lossy(&st.stdout);
    assert!(text.contains("(goal < 256 KiB)"), "{text}");
    assert!(text.contains("kernel release:   6.1"), "{text}");
    // Clear errors, no backtraces.
    let st = Command::new(exe).arg("inspect").arg(&prof).output().unwrap();
    assert!(!st.status.success());
    let err = String::from_utf8_lossy(&st.stderr);
    assert!(err.contains("not a repair image") && err.contains("deb.json"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let st = Command::new(exe).args(["--vmlinux", "/nonexistent/vmlinux", "--output"]).arg(&out).output().unwrap();
    let err = String::from_utf8_lossy(&st.stderr);
    assert!(!st.status.success() && err.contains("/nonexistent/vmlinux") && !err.contains("panicked"), "{err}");
}

/// Boots the kit kernel under QEMU (TCG, `nokaslr`), dumps its text and
/// rodata once booted, and returns the pages `(link address, bytes)`.
fn live_pages(kernel: &'static str, img: &RepairImage) -> Vec<(u64, [u8; PAGE_SIZE])> {
    let which = if kernel == "debian" { Kernel::Debian } else { Kernel::Lkdtm };
    let mut cfg = GuestConfig::new(which).append("nokaslr");
    cfg.cpus = 1;
    // Booted when the kit's init says it is ready.
    let mut guest = Guest::boot(&cfg).unwrap_or_else(|e| panic!("{kernel}: {e}"));
    let dir = tempfile::tempdir().unwrap();
    let dump = dir.path().join("text.bin");
    let mut qmp = |cmd: serde_json::Value| guest.qmp(&cmd).unwrap_or_else(|e| panic!("{e}"));
    qmp(serde_json::json!({"execute": "stop"}));
    let lo = *img.page_hashes.keys().next().unwrap();
    let hi = *img.page_hashes.keys().last().unwrap() + PAGE_SIZE as u64;
    // nokaslr: loaded at its link address minus __START_KERNEL_map.
    let phys = lo - 0xffff_ffff_8000_0000;
    qmp(serde_json::json!({"execute": "pmemsave",
        "arguments": {"val": phys, "size": hi - lo, "filename": dump.to_str().unwrap()}}));
    drop(guest);
    let bytes = std::fs::read(&dump).unwrap();
    if let Some(d) = std::env::var_os("KEEP_LIVE_DUMP") {
        std::fs::write(PathBuf::from(d.clone()).join(format!("live-{kernel}.bin")), &bytes).unwrap();
        let skips: String = img.skips.iter().map(|k| format!("{:x} {} {}\n", k.addr, k.len, k.kind)).collect();
        std::fs::write(PathBuf::from(d).join(format!("skips-{kernel}.txt")), skips).unwrap();
    }
    img.page_hashes
        .keys()
        .map(|&p| {
            let at = (p - lo) as usize;
            (p, bytes[at..at + PAGE_SIZE].try_into().unwrap())
        })
        .collect()
}

/// How far the snapshot "expected from the file" is from a healthy booted
/// kernel (one vCPU, QEMU's default CPU model): every page that differs
/// would look corrupted to the repair kernel. With every run-time patch
/// site skipped, none may differ.
fn file_snapshot_vs_live(kernel: &'static str) -> (usize, usize, usize) {
    let img = image(kernel);
    let live = live_pages(kernel, img);
    let etext = img.layout.get(Item::SymEtext).unwrap();
    let (mut text_bad, mut ro_bad) = (0, 0);
    let mut examples = Vec::new();
    for (p, mut page) in live {
        if hash_page(LinkAddr(p), &mut page, &img.skips) != img.page_hashes[&p] {
            if p < etext { text_bad += 1 } else { ro_bad += 1 }
            if examples.len() < 8 {
                examples.push(format!("{p:#x}"));
            }
        }
    }
    eprintln!(
        "{kernel}: {} pages hashed; differing from the booted kernel: text {text_bad}, rodata {ro_bad} (e.g. {})",
        img.page_hashes.len(),
        examples.join(" ")
    );
    (img.page_hashes.len(), text_bad, ro_bad)
}

#[test]
fn file_snapshot_matches_a_booted_kernel() {
    for kernel in ["lkdtm", "debian"] {
        let (total, text_bad, ro_bad) = file_snapshot_vs_live(kernel);
        assert!(total > 1000);
        assert_eq!(
            (text_bad, ro_bad),
            (0, 0),
            "{kernel}: pages of the file snapshot differ from the booted kernel: a run-time patch \
             table is missing from builder/src/skips.rs (KEEP_LIVE_DUMP=DIR keeps the dump)"
        );
    }
}
