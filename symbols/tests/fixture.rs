//! Profiles of a small ELF compiled at test time (tests/fixture/*.c), checked
//! against pahole and nm, plus the bad-input errors.

mod common;

use std::process::Command;

use common::{compare_with_nm, compare_with_pahole, fixture, run};
use symbols::{Error, Missing, Profile, Wanted};

const WANTED: Wanted<'static> = Wanted {
    symbols: &["panic", "prb", "init_task", "linux_banner", "not_here?"],
    percpu: &["percpu_a", "runqueues"],
    types: &[
        (
            "task_struct",
            &[
                "__state|state",
                "thread.sp",
                "lo",
                "named_anon.inner_b",
                "sched_migrated",
                "wide",
            ],
        ),
        ("list_head", &["next", "prev"]),
        ("later", &["b"]),
        ("anon_t", &["y"]),
        ("absent_optional?", &["x"]),
        // A type named twice: the paths of both entries are resolved.
        ("task_struct", &["thread.sp0", "tasks.prev"]),
    ],
};

fn profile(v: u8) -> Profile {
    Profile::from_vmlinux(fixture(v), &WANTED).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn fixture_layouts_match_pahole_dwarf4_and_dwarf5() {
    for v in [4, 5] {
        let mut p = profile(v);
        p.types.remove("anon_t"); // a typedef name: pahole -C knows only tags
        compare_with_pahole(fixture(v), &p);
    }
}

#[test]
fn fixture_symbols_match_nm() {
    for v in [4, 5] {
        let p = profile(v);
        // per-CPU offsets are relative to .data..percpu (which links at 0 in
        // a vmlinux, not here), so compare symbols only.
        let mut syms = p.clone();
        syms.percpu.clear();
        compare_with_nm(fixture(v), &syms);
    }
}

#[test]
fn fixture_profile_contents() {
    let p = profile(5);
    assert_eq!(p.release, "6.1.0-fixture");
    assert_eq!(p.banner, "Linux version 6.1.0-fixture (t@h) (gcc) #1 SMP\n");
    assert_eq!(p.arch, "x86_64");
    assert_eq!(p.build_id.len(), 40, "{}", p.build_id);
    let readelf = run(Command::new("readelf").arg("-n").arg(fixture(5)));
    assert!(readelf.contains(&p.build_id), "{readelf}");
    assert_eq!(p.text.start, p.symbol("_stext").unwrap());
    assert_eq!(p.rodata.end, p.symbol("__end_rodata").unwrap());
    // Drift: __state exists, state does not; alternatives record what exists.
    assert!(p.offset("task_struct", "__state").is_some());
    assert!(p.offset("task_struct", "state").is_none());
    // Nested path, anonymous union/struct members, named inline struct.
    assert_eq!(p.offset("task_struct", "thread.sp"), Some(0x50 + 8));
    assert_eq!(p.offset("task_struct", "thread.sp0"), Some(0x50));
    assert_eq!(p.offset("task_struct", "tasks.prev"), Some(0x40 + 8));
    assert_eq!(
        p.offset("task_struct", "lo"),
        p.offset("task_struct", "on_cpu")
    );
    assert_eq!(p.offset("task_struct", "hi"), Some(0x16));
    assert_eq!(p.offset("task_struct", "named_anon.inner_b"), Some(0x98));
    // Bitfields, qualifiers, arrays, flexible array.
    let m = p.member("task_struct", "sched_migrated").unwrap();
    assert_eq!(
        (m.offset, m.size, m.bit_offset, m.bit_size),
        (0x18, 4, Some(1), Some(1))
    );
    let m = p.member("task_struct", "wide").unwrap();
    assert_eq!(
        (m.offset, m.size, m.bit_offset, m.bit_size),
        (0x20, 8, Some(0), Some(40))
    );
    assert_eq!(p.member("task_struct", "qualified").unwrap().size, 4);
    assert_eq!(p.member("task_struct", "grid").unwrap().size, 24);
    assert_eq!(p.member("task_struct", "flex").unwrap().size, 0);
    assert_eq!(p.size("task_struct"), Some(160));
    // Declared in the first unit, defined in the second.
    assert_eq!(p.size("later"), Some(16));
    // A typedef of an anonymous struct.
    assert_eq!(p.size("anon_t"), Some(16));
    assert_eq!(p.offset("anon_t", "y"), Some(8));
    // Per-CPU offsets are relative to .data..percpu.
    let a = p.percpu_offset("percpu_a").unwrap();
    let rq = p.percpu_offset("runqueues").unwrap();
    assert!(a < 0x100 && rq < 0x100 && a != rq, "{a:#x} {rq:#x}");
    // A static (local) symbol is found too.
    assert!(p.symbol("prb").is_some());
    assert!(p.symbol("not_here").is_none());
    assert!(!p.types.contains_key("absent_optional"));
}

#[test]
fn json_round_trip_and_shape() {
    let p = profile(5);
    let json = p.to_json();
    assert_eq!(Profile::from_json(&json).unwrap(), p);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    for key in [
        "build_id", "banner", "release", "arch", "text", "rodata", "symbols", "percpu", "types",
    ] {
        assert!(v.get(key).is_some(), "missing {key}");
    }
    assert!(v["symbols"]["panic"]["address"].is_u64());
    assert!(v["symbols"]["panic"]["size"].is_u64());
    let m = &v["types"]["task_struct"]["members"];
    assert!(m["pid"]["offset"].is_u64() && m["pid"]["size"].is_u64());
    assert!(m["pid"].get("bit_offset").is_none());
    assert_eq!(m["sched_migrated"]["bit_size"], 1);
    assert!(v["types"]["task_struct"]["size"].is_u64());
    assert!(matches!(Profile::from_json("{"), Err(Error::Json(_))));
}

#[test]
fn missing_items_are_listed_together() {
    let wanted = Wanted {
        symbols: &["panic", "no_such_symbol", "nor_this|nor_that"],
        percpu: &["panic", "no_such_percpu"],
        types: &[
            (
                "task_struct",
                &["pid", "no_member", "thread.nope", "__state|state"],
            ),
            ("no_such_type", &["x"]),
        ],
    };
    let err = Profile::from_vmlinux(fixture(5), &wanted).unwrap_err();
    let Error::Missing { missing, .. } = &err else {
        panic!("{err}")
    };
    assert_eq!(
        missing,
        &[
            Missing::Symbol("no_such_symbol".into()),
            Missing::Symbol("nor_this|nor_that".into()),
            Missing::PerCpu("panic".into()), // exists, but not a per-CPU variable
            Missing::PerCpu("no_such_percpu".into()),
            Missing::Member {
                ty: "task_struct".into(),
                path: "no_member".into()
            },
            Missing::Member {
                ty: "task_struct".into(),
                path: "thread.nope".into()
            },
            Missing::Type("no_such_type".into()),
        ]
    );
    let msg = err.to_string();
    for part in [
        "7 required item(s) missing",
        "symbol no_such_symbol",
        "type no_such_type",
        "member task_struct.thread.nope",
    ] {
        assert!(msg.contains(part), "{msg}");
    }
    // Lenient: the same list, and the profile of what was found.
    let (p, m) = Profile::from_vmlinux_lenient(fixture(5), &wanted).unwrap();
    assert_eq!(&m, missing);
    assert!(p.symbol("panic").is_some() && p.size("task_struct").is_some());
}

#[test]
fn no_debug_info_names_the_section_and_the_dbg_package() {
    let dir = tempfile::tempdir().unwrap();
    let stripped = dir.path().join("stripped");
    run(Command::new("objcopy")
        .arg("--strip-debug")
        .arg(fixture(5))
        .arg(&stripped));
    let err = Profile::from_vmlinux(&stripped, &WANTED).unwrap_err();
    assert!(matches!(err, Error::NoDebugInfo { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains(".debug_info") && msg.contains("-dbg"), "{msg}");

    let all = dir.path().join("stripped-all");
    run(Command::new("objcopy")
        .arg("--strip-all")
        .arg("--keep-section=.debug_*")
        .arg(fixture(5))
        .arg(&all));
    let err = Profile::from_vmlinux(&all, &WANTED).unwrap_err();
    assert!(err.to_string().contains(".symtab"), "{err}");
}

#[test]
fn non_elf_truncated_and_unreadable_files_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("text");
    std::fs::write(&text, "this is not a kernel\n").unwrap();
    let err = Profile::from_vmlinux(&text, &WANTED).unwrap_err();
    assert!(matches!(err, Error::NotElf { .. }), "{err:?}");
    assert!(err.to_string().contains("not an ELF file"), "{err}");

    let empty = dir.path().join("empty");
    std::fs::write(&empty, "").unwrap();
    assert!(matches!(
        Profile::from_vmlinux(&empty, &WANTED),
        Err(Error::NotElf { .. })
    ));

    let data = std::fs::read(fixture(5)).unwrap();
    for len in [4, 20, 64, 200, data.len() / 2, data.len() - 1] {
        let cut = dir.path().join(format!("cut{len}"));
        std::fs::write(&cut, &data[..len]).unwrap();
        let err = Profile::from_vmlinux(&cut, &WANTED).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains(&*cut.to_string_lossy()), "{msg}");
        assert!(
            matches!(
                err,
                Error::BadElf { .. }
                    | Error::NoDebugInfo { .. }
                    | Error::Dwarf { .. }
                    | Error::Missing { .. }
                    | Error::NoSymbolTable { .. }
            ),
            "{len}: {err:?}"
        );
    }
    let err = Profile::from_vmlinux(&dir.path().join("nope"), &WANTED).unwrap_err();
    assert!(
        matches!(err, Error::Io { .. }) && err.to_string().contains("nope"),
        "{err}"
    );
}

#[test]
fn read_build_id_and_identity_match_profile() {
    let p = profile(5);
    let id = symbols::read_build_id(fixture(5)).unwrap().unwrap();
    assert_eq!(id, p.build_id);
    let ident = symbols::read_identity(fixture(5)).unwrap();
    assert_eq!(
        (ident.build_id, ident.banner, ident.release, ident.arch),
        (p.build_id, p.banner, p.release, p.arch)
    );
}

#[test]
fn compressed_debug_sections_give_the_same_profile() {
    let dir = tempfile::tempdir().unwrap();
    let plain = profile(5);
    for (i, kind) in ["zlib", "zstd"].iter().enumerate() {
        let out = dir.path().join(format!("compressed-{kind}"));
        let status = Command::new("objcopy")
            .arg(format!("--compress-debug-sections={kind}"))
            .arg(fixture(5))
            .arg(&out)
            .status()
            .unwrap();
        if !status.success() {
            // objcopy without zstd support; zlib (i == 0) must work
            assert!(i > 0, "objcopy --compress-debug-sections=zlib failed");
            continue;
        }
        let data = std::fs::read(&out).unwrap();
        let file = object::File::parse(&*data).unwrap();
        use object::{Object, ObjectSection};
        let info = file.section_by_name(".debug_info").unwrap();
        assert_ne!(
            info.compressed_file_range().unwrap().format,
            object::CompressionFormat::None
        );
        let p = Profile::from_vmlinux(&out, &WANTED).unwrap_or_else(|e| panic!("{kind}: {e}"));
        assert_eq!(p, plain, "{kind}");
    }
}
