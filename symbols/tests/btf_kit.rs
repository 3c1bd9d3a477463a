//! The BTF + kallsyms profile of each kit kernel's vmlinuz equals its DWARF
//! profile for every item the repair kernel reads, item by item; and its
//! kallsyms equals the vmlinux's own symbol table (`nm`) for every symbol.
//! These fail, naming `scripts/guest-kit`, when the kit is missing.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::kit_file;
use repair_kernel::layout::{Kind, ITEMS};
use symbols::{profile_from_kernel_elf, read_vmlinuz, Profile};

/// Every item of the repair kernel's table as the profile gives it.
fn items(p: &Profile) -> Vec<(String, Option<u64>)> {
    ITEMS
        .iter()
        .map(|item| {
            let value = match item.kind {
                Kind::Symbol => p.symbol(item.ty),
                Kind::SymbolSize => p.symbol_size(item.ty),
                Kind::PerCpu => p.percpu_offset(item.ty),
                Kind::Size => p.size(item.ty),
                Kind::Offset => p.offset(item.ty, item.member),
                Kind::MemberSize => p.member(item.ty, item.member).map(|m| m.size),
                // From the call-frame information, by the builder: not in a profile.
                Kind::CallFrame | Kind::ThreadFlagBit => None,
            };
            (format!("{:?} {} {}", item.kind, item.ty, item.member), value)
        })
        .collect()
}

fn compare(dir: &str) {
    let vmlinuz = kit_file(&format!("{dir}/vmlinuz"));
    let vmlinux = kit_file(&format!("{dir}/vmlinux"));
    let t = std::time::Instant::now();
    let elf = read_vmlinuz(&vmlinuz).unwrap_or_else(|e| panic!("{e}"));
    let (btf, missing, ks) = common::repair_kernel::wanted()
        .with(|w| profile_from_kernel_elf(&elf.data, &vmlinuz, w))
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "{dir}: {:?} vmlinuz, {} MB ELF, {} kallsyms symbols, {:?}, profile in {:?}",
        elf.compression,
        elf.data.len() >> 20,
        ks.symbols.len(),
        ks.tables,
        t.elapsed()
    );
    assert!(missing.is_empty(), "{dir}: missing from BTF+kallsyms: {missing:?}");
    let dwarf = common::repair_kernel::wanted()
        .with(|w| Profile::from_vmlinux(&vmlinux, w))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(btf.build_id, dwarf.build_id);
    assert_eq!(btf.banner, dwarf.banner);
    assert_eq!(btf.release, dwarf.release);
    assert_eq!((btf.text, btf.rodata), (dwarf.text, dwarf.rodata));
    let (a, b) = (items(&btf), items(&dwarf));
    let diffs: Vec<String> = a
        .iter()
        .zip(&b)
        .filter(|(x, y)| x.1 != y.1)
        .map(|(x, y)| format!("{}: BTF {:x?} DWARF {:x?}", x.0, x.1, y.1))
        .collect();
    assert!(diffs.is_empty(), "{dir}: {} items differ:\n{}", diffs.len(), diffs.join("\n"));
    // Every member of every type, not only the items.
    for (name, t) in &dwarf.types {
        assert_eq!(btf.types.get(name), Some(t), "{dir}: type {name}");
    }
    assert_eq!(btf.percpu, dwarf.percpu);

    // kallsyms against the vmlinux's symbol table, symbol by symbol.
    let nm = nm(&vmlinux);
    let mut checked = 0;
    for s in &ks.symbols {
        let want = nm.get(&s.name).unwrap_or_else(|| panic!("{dir}: kallsyms has {} that nm lacks", s.name));
        assert!(want.contains(&s.address), "{dir}: {} at {:#x}, nm: {want:x?}", s.name, s.address);
        checked += 1;
    }
    assert!(checked > 10_000, "{dir}: only {checked} symbols");
}

/// `nm` of the vmlinux: every address of every name.
fn nm(vmlinux: &Path) -> BTreeMap<String, Vec<u64>> {
    let out = common::run(std::process::Command::new("nm").arg(vmlinux));
    let mut map: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for line in out.lines() {
        let mut f = line.split_whitespace();
        let (Some(a), Some(_), Some(n)) = (f.next(), f.next(), f.next()) else { continue };
        if let Ok(a) = u64::from_str_radix(a, 16) {
            map.entry(n.to_owned()).or_default().push(a);
        }
    }
    map
}

#[test]
fn debian_6_1_btf_profile_equals_dwarf() {
    compare("debian");
}

#[test]
fn matrix_5_10_btf_profile_equals_dwarf() {
    compare("matrix/5.10");
}

#[test]
fn matrix_6_1_btf_profile_equals_dwarf() {
    compare("matrix/6.1");
}

#[test]
fn matrix_6_12_btf_profile_equals_dwarf() {
    compare("matrix/6.12");
}

#[test]
fn matrix_7_btf_profile_equals_dwarf() {
    compare("matrix/7");
}
