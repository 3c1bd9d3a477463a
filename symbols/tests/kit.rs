//! The profiles of the guest kit's real kernels (Debian 6.1 cloud and the
//! LKDTM 6.1 build), checked field by field against pahole and nm. These
//! fail, with a message saying to run `scripts/guest-kit`, when the kit is
//! missing.

mod common;

use common::{compare_with_nm, compare_with_pahole, kit_file};
use symbols::{parse_system_map, Profile};

fn check_kernel(dir: &str) {
    let vmlinux = kit_file(&format!("{dir}/vmlinux"));
    let p = common::repair_kernel::wanted()
        .with(|w| Profile::from_vmlinux(&vmlinux, w))
        .unwrap_or_else(|e| panic!("{e}"));

    assert!(p.banner.starts_with("Linux version "), "{}", p.banner);
    assert!(p.release.starts_with("6.1"), "{}", p.release);
    assert_eq!(p.arch, "x86_64");
    assert_eq!(p.build_id.len(), 40);
    assert_eq!(
        symbols::read_build_id(&vmlinux).unwrap().as_deref(),
        Some(&*p.build_id)
    );
    assert!(p.text.start < p.text.end && p.rodata.start < p.rodata.end);
    assert_eq!(p.symbols["linux_banner"].size as usize, p.banner.len() + 1);

    // Drift is decided by which members exist: exactly one task state field,
    // and the current task either in pcpu_hot or on its own.
    let states = ["__state", "state"].map(|m| p.offset("task_struct", m).is_some());
    assert!(states[0] ^ states[1], "{states:?}");
    assert!(p.percpu_offset("pcpu_hot").is_some() || p.percpu_offset("current_task").is_some());
    assert_eq!(
        p.types.contains_key("pcpu_hot"),
        p.percpu_offset("pcpu_hot").is_some()
    );
    assert!(p.offset("task_struct", "thread.sp").is_some());

    // Every item of the repair kernel's table resolves; required ones exist.
    for item in repair_kernel::layout::ITEMS {
        use repair_kernel::layout::Kind;
        let value = match item.kind {
            Kind::Symbol => p.symbol(item.ty),
            Kind::SymbolSize => p.symbol_size(item.ty),
            Kind::PerCpu => p.percpu_offset(item.ty),
            Kind::Size => p.size(item.ty),
            Kind::Offset => p.offset(item.ty, item.member),
            Kind::MemberSize => p.member(item.ty, item.member).map(|m| m.size),
            // From the call-frame information, by the builder, not the profile.
            Kind::CallFrame | Kind::ThreadFlagBit => continue,
        };
        assert!(
            value.is_some() || !item.required,
            "required repair-kernel item {item:?} missing"
        );
    }

    let back = Profile::from_json(&p.to_json()).unwrap();
    assert_eq!(back, p);

    compare_with_pahole(&vmlinux, &p);
    compare_with_nm(&vmlinux, &p);

    // System.map agrees with the ELF symbol table. Debian ships a one-line
    // stub ("The real System.map is in the linux-image-<version>-dbg
    // package"); there the nm comparison above stands alone.
    let map =
        parse_system_map(&std::fs::read_to_string(kit_file(&format!("{dir}/System.map"))).unwrap());
    if map.len() < 100 {
        eprintln!(
            "{dir}/System.map is a stub ({} entries): checked against nm only",
            map.len()
        );
        return;
    }
    for (name, s) in &p.symbols {
        if let Some(&a) = map.get(name) {
            assert_eq!(a, s.address, "{name} in System.map");
        }
    }
    for name in ["init_task", "panic", "linux_banner", "_stext"] {
        assert_eq!(map.get(name).copied(), p.symbol(name), "{name}");
    }
    for (name, &off) in &p.percpu {
        assert_eq!(
            map.get(name).copied(),
            Some(off),
            "per-CPU {name} in System.map"
        );
    }
}

#[test]
fn debian_cloud_kernel_matches_pahole_and_nm() {
    check_kernel("debian");
}

#[test]
fn lkdtm_kernel_matches_pahole_and_nm() {
    check_kernel("lkdtm");
}
