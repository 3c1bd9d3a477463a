//! The staging plan's page tables map exactly what they should.

use builder::image::{RepairImage, PF_W};
use builder::stage::{Paging, RamMap, StageError, StageOptions, StagePlan, IDENTITY_LIMIT};
use builder::builtin_unikernel;
use repair_kernel::contract::Contract;

fn image() -> RepairImage {
    RepairImage { unikernel: builtin_unikernel().unwrap(), ..RepairImage::default() }
}

fn check(plan: &StagePlan, image: &RepairImage, base: u64, size: u64, ram_end: u64) {
    let u = &image.unikernel;
    assert_eq!(plan.cr3, base);
    assert_eq!(plan.entry_rip, u.entry);
    assert_eq!(plan.done_rip, u.done);
    assert_eq!(plan.stack_top % 16, 0);
    assert!(plan.used <= size);
    // Every write lies in the borrowed range.
    for (gpa, bytes) in &plan.writes {
        assert!(*gpa >= base && gpa + bytes.len() as u64 <= base + size, "{gpa:#x}");
    }
    // Identity map: every 2 MiB of RAM below ram_end (rounded up), writable.
    let end = ram_end.next_multiple_of(2 << 20).min(IDENTITY_LIMIT);
    assert_eq!(plan.identity_end, end);
    for gpa in (0..end).step_by(1 << 20).chain([0x1234, end - 1]) {
        assert_eq!(plan.translate(gpa), Some((gpa, true)), "{gpa:#x}");
    }
    assert_eq!(plan.translate(end), None);
    // The window: each segment page maps to a written copy of its bytes,
    // writable exactly for PF_W segments; .bss and the stack are zero.
    let read = |gpa: u64, len: usize| -> Vec<u8> {
        (0..len as u64)
            .map(|i| {
                let a = gpa + i;
                let (g, b) = plan.writes.iter().rfind(|(g, _)| *g <= a).expect("written");
                b[(a - g) as usize]
            })
            .collect()
    };
    for seg in &u.segments {
        for off in (0..seg.memsz).step_by(4096) {
            let gva = seg.vaddr + off;
            let (gpa, w) = plan.translate(gva).unwrap_or_else(|| panic!("{gva:#x} unmapped"));
            assert_eq!(w, seg.flags & PF_W != 0, "{gva:#x}");
            assert!(gpa >= base && gpa < base + size);
            let len = 4096.min(seg.memsz - off) as usize;
            let want: Vec<u8> = (0..len)
                .map(|i| seg.data.get(off as usize + i).copied().unwrap_or(0))
                .collect();
            assert_eq!(read(gpa, len), want, "{gva:#x}");
        }
    }
    let (stack_gpa, w) = plan.translate(plan.stack_top - 8).unwrap();
    assert!(w && stack_gpa >= base);
    // Guard page before the contract; the contract writable and zeroed.
    assert_eq!(plan.translate(plan.contract_gva - 4096), None);
    let csize = std::mem::size_of::<Contract>() as u64;
    for off in (0..csize).step_by(4096).chain([csize - 1]) {
        let (gpa, w) = plan.translate(plan.contract_gva + off).unwrap();
        assert!(w);
        assert_eq!(gpa, plan.contract_gpa + off);
    }
    assert_eq!(read(plan.contract_gpa, csize as usize), vec![0; csize as usize]);
    // Nothing else in the window, and nothing in the user half's other slots.
    let mapped = plan.window.len() as u64;
    let want = u.segments.iter().map(|s| s.memsz.div_ceil(4096)).sum::<u64>() + csize.div_ceil(4096);
    assert_eq!(mapped, want);
    assert_eq!(plan.translate(u.link_base - 4096), None);
    assert_eq!(plan.translate(plan.contract_gva + csize.next_multiple_of(4096)), None);
    assert_eq!(plan.translate(0xffff_ffff_8100_0000), None);
}

#[test]
fn plan_maps_what_it_should() {
    let image = image();
    for ram_end in [512 << 20, (3 << 30) + (1 << 20), 8 << 30] {
        let plan = StagePlan::new(&image, 0x10000, 0x80000, ram_end).unwrap();
        check(&plan, &image, 0x10000, 0x80000, ram_end);
        assert_eq!(plan.paging, Paging::FourLevel);
    }
    let plan = StagePlan::with_paging(&image, 0x10000, 0x80000, 1 << 30, Paging::FiveLevel).unwrap();
    check(&plan, &image, 0x10000, 0x80000, 1 << 30);
}

const GIB: u64 = 1 << 30;

/// Every RAM range of a large guest is identity-mapped, holes are not,
/// with 1 GiB pages where asked (fewer tables) and 2 MiB pages elsewhere.
#[test]
fn identity_map_covers_every_ram_range() {
    let image = image();
    let probe = |plan: &StagePlan, ranges: &[(u64, u64)]| {
        for &(s, e) in ranges {
            for gpa in (s..e).step_by(256 << 20).chain([s, s + 0x1234, e - 1, (s + e) / 2]) {
                assert_eq!(plan.translate(gpa), Some((gpa, true)), "{gpa:#x}");
            }
        }
    };
    // QEMU's pc (RAM split at 3 GiB) and q35 (at 2 GiB), 20 GiB guests.
    for ranges in [vec![(0, 3 * GIB), (4 * GIB, 21 * GIB)], vec![(0, 2 * GIB), (4 * GIB, 22 * GIB)]] {
        let mut used = Vec::new();
        for gib_pages in [false, true] {
            let ram = RamMap { ranges: ranges.clone(), gib_pages };
            let plan = StagePlan::with_ram(&image, 0x10000, 0x80000, &ram, &StageOptions::default()).unwrap();
            probe(&plan, &ranges);
            let low_end = ranges[0].1;
            for hole in [low_end, low_end + 0x1000, 3 * GIB + (GIB / 2), 4 * GIB - 1] {
                assert_eq!(plan.translate(hole), None, "hole {hole:#x}");
            }
            assert_eq!(plan.identity_end, ram.end());
            assert_eq!(plan.translate(ram.end()), None);
            used.push(plan.used);
        }
        // 2 MiB pages: one page directory per GiB; 1 GiB pages: none.
        let gibs = ranges.iter().map(|r| (r.1 - r.0) / GIB).sum::<u64>();
        assert_eq!(used[0] - used[1], gibs * 4096, "{ranges:x?}");
    }
    // RAM ending off a GiB (and off 2 MiB): the last part in 2 MiB pages,
    // rounded up; a 1 GiB page only over a whole GiB of RAM.
    let ranges = [(0, 3 * GIB + 0x12_3000)];
    let plan =
        StagePlan::with_ram(&image, 0x10000, 0x80000, &RamMap { ranges: ranges.to_vec(), gib_pages: true }, &StageOptions::default())
            .unwrap();
    probe(&plan, &ranges);
    assert_eq!(plan.identity_end, 3 * GIB + (2 << 20));
    assert_eq!(plan.translate(3 * GIB + (2 << 20)), None);
    // The old 4 GiB bound is gone; slot 0's 512 GiB is the limit.
    let plan = StagePlan::new(&image, 0x10000, 0x80000, 40 * GIB).unwrap();
    assert_eq!(plan.translate(40 * GIB - 8), Some((40 * GIB - 8, true)));
    let huge = RamMap { ranges: vec![(0, 2 * GIB), (4 * GIB, 1 << 40)], gib_pages: true };
    let plan = StagePlan::with_ram(&image, 0x10000, 0x80000, &huge, &StageOptions::default()).unwrap();
    assert_eq!(plan.identity_end, IDENTITY_LIMIT);
    assert_eq!(plan.translate(IDENTITY_LIMIT - 8), Some((IDENTITY_LIMIT - 8, true)));
    // 512 GiB in 2 MiB pages needs 2 MiB of tables: the range says so.
    let err = StagePlan::new(&image, 0x10000, 0x80000, 1 << 40).unwrap_err();
    assert!(matches!(err, StageError::TooSmall { .. }), "{err}");
}

#[test]
fn plan_walked_by_the_repair_kernels_own_walker() {
    use repair_kernel::arch::x86_64::pgtable::{translate, Paging as RkPaging};
    use repair_kernel::mem::{Error, Gpa, Gva, PhysMem};
    struct Writes<'a>(&'a StagePlan);
    impl PhysMem for Writes<'_> {
        fn read_phys(&self, gpa: Gpa, buf: &mut [u8]) -> Result<(), Error> {
            for (i, b) in buf.iter_mut().enumerate() {
                let a = gpa.0 + i as u64;
                let (g, bytes) = self.0.writes.iter().rfind(|(g, _)| *g <= a).ok_or(Error::OutOfRam(gpa))?;
                *b = *bytes.get((a - g) as usize).ok_or(Error::OutOfRam(gpa))?;
            }
            Ok(())
        }
        fn write_phys(&mut self, gpa: Gpa, _: &[u8]) -> Result<(), Error> {
            Err(Error::OutOfRam(gpa))
        }
        fn ram_end(&self) -> u64 {
            1 << 40
        }
    }
    let image = image();
    let big = [(0, 3 * GIB), (4 * GIB, 21 * GIB)];
    for (plan, high) in [
        (StagePlan::new(&image, 0x10000, 0x80000, 1 << 30).unwrap(), vec![]),
        (
            StagePlan::with_ram(&image, 0x10000, 0x80000, &RamMap { ranges: big.to_vec(), gib_pages: false }, &StageOptions::default())
                .unwrap(),
            vec![5 * GIB + 0x1238, 21 * GIB - 8],
        ),
        (
            StagePlan::with_ram(&image, 0x10000, 0x80000, &RamMap { ranges: big.to_vec(), gib_pages: true }, &StageOptions::default())
                .unwrap(),
            vec![5 * GIB + 0x1238, 21 * GIB - 8],
        ),
    ] {
        let mem = Writes(&plan);
        let paging = RkPaging { root: Gpa(plan.cr3), la57: false };
        let fixed = [plan.entry_rip, plan.done_rip, plan.stack_top - 8, plan.contract_gva, 0x9f000, (1 << 30) - 1];
        for gva in fixed.into_iter().chain(high) {
            let t = translate(&mem, paging, Gva(gva)).unwrap_or_else(|e| panic!("{gva:#x}: {e:?}"));
            assert_eq!(Some((t.gpa.0, t.writable)), plan.translate(gva), "{gva:#x}");
            assert_eq!(t.gpa.0 & 0xfff, gva & 0xfff);
            assert!(!t.user && !t.nx);
        }
    }
}

#[test]
fn refuses_what_does_not_fit() {
    let image = image();
    let err = StagePlan::new(&image, 0x10000, 0x8000, 1 << 30).unwrap_err();
    assert!(matches!(err, StageError::TooSmall { .. }), "{err}");
    assert!(err.to_string().contains("borrow a larger range"), "{err}");
    assert!(matches!(StagePlan::new(&image, 0x10800, 0x80000, 1 << 30), Err(StageError::Unaligned(_))));
    assert!(matches!(StagePlan::new(&image, 0x10000, 0x80000, 0x20000), Err(StageError::OutsideRam { .. })));
}

#[test]
fn integrity_data_is_staged_read_only() {
    use builder::stage::INTEGRITY_MAGIC;
    use repair_kernel::integrity::SkipSite;
    let mut image = image();
    image.skips = vec![SkipSite { addr: 0xffff_ffff_8100_0010, len: 5, kind: 1 }];
    let pages = (0..3u64).map(|i| (0xffff_ffff_8100_0000 + i * 4096, [i as u8 + 1; 4096]));
    image.set_snapshot(pages, true);

    let opts = StageOptions { integrity: true, ..Default::default() };
    let plan = StagePlan::with_options(&image, 0x100000, 0x100000, 1 << 30, &opts).unwrap();
    check_integrity(&plan, &image, INTEGRITY_MAGIC);
    // Without the option, nothing is staged and rsi is 0.
    assert_eq!(StagePlan::new(&image, 0x10000, 0x80000, 1 << 30).unwrap().integrity_gva, 0);
}

fn check_integrity(plan: &StagePlan, image: &RepairImage, magic: u64) {
    let read = |gva: u64, len: usize| -> Vec<u8> {
        (0..len as u64)
            .map(|i| {
                let (gpa, w) = plan.translate(gva + i).expect("mapped");
                assert!(!w, "integrity data is read-only");
                let (g, b) = plan.writes.iter().rfind(|(g, _)| *g <= gpa).expect("written");
                b[(gpa - g) as usize]
            })
            .collect()
    };
    let word = |gva: u64| u64::from_le_bytes(read(gva, 8).try_into().unwrap());
    let t = plan.integrity_gva;
    assert!(t > plan.contract_gva);
    assert_eq!(word(t), magic);
    assert_eq!(word(t + 8), 1);
    let (hashes, n_hashes) = (word(t + 16), word(t + 24));
    assert_eq!(n_hashes, 3);
    for (i, (page, h)) in image.page_hashes.iter().enumerate() {
        let rec = read(hashes + 40 * i as u64, 40);
        assert_eq!(u64::from_le_bytes(rec[..8].try_into().unwrap()), *page);
        assert_eq!(&rec[8..], h);
    }
    let (skips, n_skips) = (word(t + 32), word(t + 40));
    assert_eq!(n_skips, 1);
    assert_eq!(word(skips), 0xffff_ffff_8100_0010);
    let (index, pages, n) = (word(t + 48), word(t + 56), word(t + 64));
    assert_eq!(n, 3);
    for (i, (page, bytes)) in image.pristine.iter().enumerate() {
        assert_eq!(word(index + 8 * i as u64), *page);
        assert_eq!(read(pages + 4096 * i as u64, 4096), bytes.to_vec());
    }
}
