//! Image round trips and rejection of broken images (no vmlinux needed).

use builder::image::{ImageError, KernelId, RepairImage, SnapshotSource, HEADER_LEN, PAGE_SIZE};
use builder::{builtin_unikernel, inspect};
use repair_kernel::integrity::SkipSite;
use repair_kernel::layout::{Item, KernelLayout};

fn sample(pristine: bool) -> RepairImage {
    let mut layout = KernelLayout::default();
    layout.set(Item::SymInitTask, 0xffff_ffff_8261_2940);
    layout.set(Item::TaskPid, 0x5c8);
    let mut image = RepairImage {
        kernel: KernelId {
            build_id: vec![0xde, 0xad, 0xbe, 0xef, 1, 2, 3, 4],
            banner: "Linux version 6.1.0-99-test (x@y) #1 SMP\n".into(),
            release: "6.1.0-99-test".into(),
        },
        profile_json: r#"{"release":"6.1.0-99-test"}"#.into(),
        layout,
        unikernel: builtin_unikernel().expect("the embedded repair kernel parses"),
        snapshot_source: SnapshotSource::VmlinuxFile,
        skips: Vec::new(),
        page_hashes: Default::default(),
        pristine: Default::default(),
    };
    image.skips = vec![
        SkipSite { addr: 0xffff_ffff_8100_0010, len: 5, kind: 1 },
        SkipSite { addr: 0xffff_ffff_8100_1ffe, len: 5, kind: 2 },
    ];
    let pages = (0..8u64).map(|i| {
        let mut p = [0u8; PAGE_SIZE];
        p[0] = i as u8;
        p[100] = 0xcc;
        (0xffff_ffff_8100_0000 + i * PAGE_SIZE as u64, p)
    });
    image.set_snapshot(pages, pristine);
    image
}

#[test]
fn round_trip() {
    let dir = tempfile::tempdir().unwrap();
    for pristine in [false, true] {
        let image = sample(pristine);
        assert_eq!(image.snapshot_source, SnapshotSource::LiveGuest);
        assert_eq!(image.page_hashes.len(), 8);
        assert_eq!(image.pristine.len(), if pristine { 8 } else { 0 });
        let path = dir.path().join("r.img");
        image.write(&path).unwrap();
        let (back, info) = RepairImage::read_with_info(&path).unwrap();
        assert_eq!(back, image);
        assert_eq!(back.skips.len(), 2);
        assert_eq!(info.file_len, std::fs::metadata(&path).unwrap().len());
        let text = inspect::report(&back, &info);
        assert!(text.contains("kernel release:   6.1.0-99-test"), "{text}");
        assert!(text.contains("build-id:         deadbeef01020304"), "{text}");
        assert!(text.contains("page hashes:      8 pages"), "{text}");
        assert!(text.contains("(goal < 256 KiB)"), "{text}");
        assert!(!text.contains("OVER THE GOAL"), "{text}");
    }
}

#[test]
fn not_an_image() {
    let err = RepairImage::from_bytes(b"\x7fELF this is something else entirely, not ours").unwrap_err();
    assert!(matches!(err, ImageError::NotAnImage), "{err}");
    assert!(err.to_string().contains("not a repair image"));
    let err = RepairImage::from_bytes(b"").unwrap_err();
    assert!(matches!(err, ImageError::NotAnImage), "{err}");
}

#[test]
fn corrupt_and_truncated() {
    let bytes = sample(false).to_bytes().unwrap();
    // A flipped bit anywhere after the header.
    for at in [HEADER_LEN + 3, bytes.len() / 2, bytes.len() - 1] {
        let mut b = bytes.clone();
        b[at] ^= 0x40;
        let err = RepairImage::from_bytes(&b).unwrap_err();
        assert!(matches!(err, ImageError::Corrupt), "{err}");
        assert!(err.to_string().contains("corrupt"));
    }
    // A flipped bit in the checksum itself.
    let mut b = bytes.clone();
    b[20] ^= 1;
    assert!(matches!(RepairImage::from_bytes(&b), Err(ImageError::Corrupt)));
    // Truncated anywhere.
    for len in [10, HEADER_LEN, HEADER_LEN + 20, bytes.len() - 1] {
        let err = RepairImage::from_bytes(&bytes[..len]).unwrap_err();
        assert!(matches!(err, ImageError::Truncated { .. } | ImageError::Corrupt), "{len}: {err}");
    }
}

#[test]
fn wrong_version() {
    let mut b = sample(false).to_bytes().unwrap();
    b[8] = 99;
    let err = RepairImage::from_bytes(&b).unwrap_err();
    assert!(matches!(err, ImageError::Version { found: 99 }), "{err}");
    assert!(err.to_string().contains("format version 99"), "{err}");
}

#[test]
fn read_missing_file_names_it() {
    let err = RepairImage::read("/nonexistent/x.img".as_ref()).unwrap_err();
    assert!(err.to_string().contains("/nonexistent/x.img"), "{err}");
}

#[test]
fn kernel_check() {
    let image = sample(false);
    let banner = image.kernel.banner.clone();
    image.check_kernel(Some(&image.kernel.build_id), &banner).unwrap();
    image.check_kernel(None, banner.trim_end()).unwrap();
    let err = image.check_kernel(Some(&[1, 2, 3]), &banner).unwrap_err();
    assert!(matches!(err, ImageError::WrongKernel { .. }));
    let err = image
        .check_kernel(None, "Linux version 6.1.0-12-cloud-amd64 (debian-kernel@lists.debian.org)\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("image built for 6.1.0-99-test"), "{err}");
    assert!(err.contains("guest runs 6.1.0-12-cloud-amd64"), "{err}");
    assert!(err.contains("build-repair-image --vmlinux"), "{err}");
}

#[test]
fn hashes_ignore_skip_sites() {
    // Two pages differing only inside a skip site hash the same.
    let mut a = sample(false);
    let page = 0xffff_ffff_8100_0000u64;
    let mut p = [0u8; PAGE_SIZE];
    a.set_snapshot(std::iter::once((page, p)), false);
    let h1 = a.page_hashes[&page];
    p[0x12] = 0xe9; // inside the site at +0x10, 5 bytes
    a.set_snapshot(std::iter::once((page, p)), false);
    assert_eq!(a.page_hashes[&page], h1);
    p[0x20] = 1; // outside
    a.set_snapshot(std::iter::once((page, p)), false);
    assert_ne!(a.page_hashes[&page], h1);
}
