//! `build-repair-image --kernel VMLINUZ`: the image built from a kit
//! kernel's vmlinuz alone (BTF + kallsyms, no DWARF) is the image built
//! from its debug vmlinux, part by part: identity, every layout item, every
//! run-time patch site and every page hash. Fails, naming
//! `scripts/guest-kit`, when the kit is missing.

use std::path::PathBuf;

use builder::{build_from_vmlinux, build_from_vmlinuz, BuildOptions};

fn kit_file(rel: &str) -> PathBuf {
    let dir = match std::env::var_os("CRASH_REPAIR_KIT") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/crash-repair/kit"),
    };
    let p = dir.join(rel);
    assert!(
        p.exists(),
        "{} is missing: build the guest kit first with `scripts/guest-kit` (or point CRASH_REPAIR_KIT at one)",
        p.display()
    );
    p
}

fn same_image(dir: &str) {
    let opts = BuildOptions::default();
    let z = build_from_vmlinuz(&kit_file(&format!("{dir}/vmlinuz")), &opts).unwrap_or_else(|e| panic!("{e}"));
    let x = build_from_vmlinux(&kit_file(&format!("{dir}/vmlinux")), &opts).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(z.kernel, x.kernel, "{dir}: identity");
    for (i, spec) in repair_kernel::layout::ITEMS.iter().enumerate() {
        if spec.kind == repair_kernel::layout::Kind::CallFrame {
            // Call-frame rules come from .debug_frame, which only the
            // debug vmlinux has: the repair kernel says so where it needs them.
            assert_eq!(z.layout.values[i], repair_kernel::layout::ABSENT, "{dir}: {spec:?} without DWARF");
            continue;
        }
        assert_eq!(z.layout.values[i], x.layout.values[i], "{dir}: layout item {spec:?}");
    }
    assert_eq!(z.skips.len(), x.skips.len(), "{dir}: patch sites");
    assert!(z.skips == x.skips, "{dir}: patch sites differ");
    assert_eq!(z.page_hashes.len(), x.page_hashes.len(), "{dir}: hashed pages");
    let differ: Vec<String> = z
        .page_hashes
        .iter()
        .filter(|(p, h)| x.page_hashes.get(p) != Some(h))
        .map(|(p, _)| format!("{p:#x}"))
        .collect();
    assert!(differ.is_empty(), "{dir}: {} page hashes differ: {differ:?}", differ.len());
}

#[test]
fn debian_6_1_image_from_vmlinuz_equals_image_from_vmlinux() {
    same_image("debian");
}

#[test]
fn a_file_that_is_no_kernel_is_refused_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("not-a-kernel");
    std::fs::write(&p, b"hello").unwrap();
    let e = build_from_vmlinuz(&p, &BuildOptions::default()).unwrap_err().to_string();
    assert!(e.contains("not an x86 bzImage") && e.contains("/boot/vmlinuz"), "{e}");
}

#[test]
fn a_kernel_without_btf_is_refused_naming_the_config_and_the_other_way() {
    // The kit's LKDTM kernel is a tinyconfig build without BTF (xz payload).
    let e = build_from_vmlinuz(&kit_file("lkdtm/bzImage"), &BuildOptions::default()).unwrap_err().to_string();
    assert!(e.contains("no BTF") && e.contains("CONFIG_DEBUG_INFO_BTF") && e.contains("--vmlinux"), "{e}");
}

#[test]
fn matrix_5_10_image_from_vmlinuz_equals_image_from_vmlinux() {
    same_image("matrix/5.10");
}

#[test]
fn matrix_6_12_image_from_vmlinuz_equals_image_from_vmlinux() {
    same_image("matrix/6.12");
}

#[test]
fn matrix_7_image_from_vmlinuz_equals_image_from_vmlinux() {
    same_image("matrix/7");
}
