//! Shared by the integration tests: the guest kit, a fixture compiled at test
//! time, and `pahole`/`nm` as independent references.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use symbols::{Member, Profile};

/// What the builder extracts for the repair kernel: its own source, as the
/// builder (which depends on this crate) cannot be a dependency here.
#[path = "../../../builder/src/wanted.rs"]
pub mod repair_kernel;

/// The guest kit directory (`$CRASH_REPAIR_KIT`, default
/// `~/.cache/crash-repair/kit`).
pub fn kit_dir() -> PathBuf {
    match std::env::var_os("CRASH_REPAIR_KIT") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
            .join(".cache/crash-repair/kit"),
    }
}

/// A file of the guest kit; fails (never skips) when the kit is missing.
pub fn kit_file(rel: &str) -> PathBuf {
    let p = kit_dir().join(rel);
    assert!(
        p.exists(),
        "{} is missing: build the guest kit first with `scripts/guest-kit` \
         (or point CRASH_REPAIR_KIT at one)",
        p.display()
    );
    p
}

/// Runs a command, panicking with its stderr when it fails.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The fixture (tests/fixture/*.c) linked into a small static ELF with DWARF
/// of the given version, built once per test binary.
pub fn fixture(dwarf_version: u8) -> &'static Path {
    static V4: OnceLock<PathBuf> = OnceLock::new();
    static V5: OnceLock<PathBuf> = OnceLock::new();
    let cell = if dwarf_version == 4 { &V4 } else { &V5 };
    cell.get_or_init(|| {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixture");
        let dir = std::env::temp_dir().join(format!("symbols-fixture-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join(format!("fixture-dwarf{dwarf_version}"));
        run(Command::new("gcc")
            .arg(format!("-gdwarf-{dwarf_version}"))
            .args([
                "-g",
                "-O0",
                "-nostdlib",
                "-static",
                "-no-pie",
                "-Wl,--build-id",
                "-Wl,-e,_start",
                "-Wl,--unique=.data..percpu",
            ])
            .arg("-o")
            .arg(&out)
            .arg(src.join("a.c"))
            .arg(src.join("b.c")));
        out
    })
}

/// A type as `pahole -F dwarf --hex -C` prints it.
#[derive(Debug, Default)]
pub struct PaholeType {
    pub size: u64,
    /// Members by path: anonymous struct/union members under their own
    /// names, members of named inline structs as `outer.inner`.
    pub members: BTreeMap<String, Member>,
    /// Member name → its C type as printed (`struct thread_struct`).
    pub member_types: BTreeMap<String, String>,
}

fn num(s: &str) -> u64 {
    match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).unwrap_or_else(|_| panic!("bad number {s}")),
        None => s.parse().unwrap_or_else(|_| panic!("bad number {s}")),
    }
}

/// Parses `/* off size */` or `/* off:bit size */`.
fn placement(comment: &str) -> Option<(u64, Option<u64>, u64)> {
    let c = comment.trim();
    if c.starts_with("---") || c.starts_with("XXX") || c.contains("size:") {
        return None;
    }
    let mut toks = c.split_whitespace();
    let first = toks.next()?;
    if !first.starts_with(|c: char| c.is_ascii_digit()) {
        return None; // "padding: 2", "sum members: ..."
    }
    if let Some(off) = first.strip_suffix(':') {
        let bit = num(toks.next()?);
        return Some((num(off), Some(bit), num(toks.next()?)));
    }
    if let Some((off, bit)) = first.split_once(':') {
        return Some((num(off), Some(num(bit)), num(toks.next()?)));
    }
    Some((num(first), None, num(toks.next()?)))
}

/// The declared name and type in a member declaration (without `;`).
fn decl_name(decl: &str) -> (String, String) {
    let mut d = decl.to_owned();
    while let Some(i) = d.find("__attribute__") {
        // drop `__attribute__((...))` with balanced parentheses
        let rest = &d[i..];
        let mut depth = 0;
        let mut end = rest.len();
        for (j, ch) in rest.char_indices() {
            match ch {
                '(' => depth += 1,
                ')' => {
                    depth -= 1;
                    if depth == 0 {
                        end = j + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        d.replace_range(i..i + end, "");
    }
    let d = d.trim();
    if let Some(i) = d.find("(*") {
        let name = d[i + 2..].split(')').next().unwrap_or("").trim().to_owned();
        return (name, d[..i].trim().to_owned());
    }
    let d = d.split(':').next().unwrap_or(d).trim(); // bitfield width
    let d = d.split('[').next().unwrap_or(d).trim(); // array dims
    let cut = d
        .rfind(|c: char| c.is_whitespace() || c == '*')
        .map_or(0, |i| i + 1);
    (d[cut..].to_owned(), d[..cut].trim().to_owned())
}

/// Parses the output of `pahole -F dwarf --hex -C A,B,...`.
pub fn parse_pahole(text: &str) -> BTreeMap<String, PaholeType> {
    let mut out = BTreeMap::new();
    let mut current: Option<(String, PaholeType)> = None;
    // Open inline blocks: the members seen inside each, with their types.
    let mut blocks: Vec<Vec<(String, Member, String)>> = Vec::new();
    for line in text.lines() {
        let t = line.trim();
        if current.is_none() {
            if let Some(rest) = t
                .strip_prefix("struct ")
                .or_else(|| t.strip_prefix("union "))
            {
                if let Some(name) = rest.strip_suffix(" {") {
                    current = Some((name.trim().to_owned(), PaholeType::default()));
                    blocks.clear();
                    blocks.push(Vec::new());
                }
            }
            continue;
        }
        let (code, comment) = match t.find("/*") {
            Some(i) => (t[..i].trim(), Some(t[i + 2..].trim_end_matches("*/"))),
            None => (t, None),
        };
        if let Some(c) = comment {
            if let Some(rest) = c.trim().strip_prefix("size: ") {
                let n = rest.split(',').next().unwrap();
                current.as_mut().unwrap().1.size = num(n.trim());
            }
        }
        if code.starts_with('}') && blocks.len() == 1 {
            let (name, mut ty) = current.take().unwrap();
            for (n, m, typ) in blocks.pop().unwrap() {
                ty.member_types.insert(n.clone(), typ);
                ty.members.insert(n, m);
            }
            out.entry(name).or_insert(ty);
            continue;
        }
        if code.ends_with('{') {
            blocks.push(Vec::new());
            continue;
        }
        if code.starts_with('}') {
            let inner = blocks.pop().expect("unbalanced pahole output");
            let (name, _) = decl_name(code.trim_start_matches('}').trim_end_matches(';'));
            let parent = blocks.last_mut().expect("unbalanced pahole output");
            let p = comment.and_then(placement);
            if name.is_empty() {
                parent.extend(inner);
            } else {
                for (n, m, typ) in inner {
                    parent.push((format!("{name}.{n}"), m, typ));
                }
                if let Some((off, _, size)) = p {
                    let m = Member {
                        offset: off,
                        size,
                        bit_offset: None,
                        bit_size: None,
                    };
                    parent.push((name, m, String::new()));
                }
            }
            continue;
        }
        let (Some(code), Some((off, bit, size))) =
            (code.strip_suffix(';'), comment.and_then(placement))
        else {
            continue;
        };
        let (name, typ) = decl_name(code);
        if name.is_empty() {
            continue;
        }
        let bit_size = bit.map(|_| {
            let w = code.rsplit(':').next().unwrap().trim();
            num(w.split_whitespace().next().unwrap())
        });
        let m = Member {
            offset: off,
            size,
            bit_offset: bit,
            bit_size,
        };
        blocks.last_mut().unwrap().push((name, m, typ));
    }
    out
}

/// Runs pahole on `path` for `types`: all at once, then one by one for any
/// it missed (pahole 1.24 sometimes drops a type of a list whose other types
/// come from a later unit).
pub fn pahole(path: &Path, types: &[&str]) -> BTreeMap<String, PaholeType> {
    let once = |list: String| {
        let out = Command::new("pahole")
            .args(["-F", "dwarf", "--hex", "-C"])
            .arg(list)
            .arg(path)
            .output()
            .expect("cannot run pahole (Debian package dwarves)");
        parse_pahole(&String::from_utf8_lossy(&out.stdout))
    };
    let mut all = once(types.join(","));
    for t in types {
        if !all.contains_key(*t) {
            all.extend(once(t.to_string()));
        }
    }
    all
}

/// Compares every type of `profile` with pahole, field by field. Member
/// paths pahole does not print inline (`thread.sp`) are checked by summing
/// the outer member's offset and the inner type's member offset.
pub fn compare_with_pahole(path: &Path, profile: &Profile) {
    let names: Vec<&str> = profile.types.keys().map(String::as_str).collect();
    let reference = pahole(path, &names);
    let mut errors = Vec::new();
    let mut nested: Vec<(String, String, String)> = Vec::new(); // (ty, path, inner type)
    for (ty, layout) in &profile.types {
        let Some(r) = reference.get(ty) else {
            errors.push(format!("pahole does not know {ty}"));
            continue;
        };
        if r.size != layout.size {
            errors.push(format!("{ty}: size {} != pahole {}", layout.size, r.size));
        }
        for (path, m) in &layout.members {
            match r.members.get(path) {
                Some(rm) if rm == m => {}
                Some(rm) => errors.push(format!("{ty}.{path}: {m:?} != pahole {rm:?}")),
                None if path.contains('.') => {
                    let first = path.split('.').next().unwrap();
                    let inner = r.member_types.get(first).cloned().unwrap_or_default();
                    nested.push((ty.clone(), path.clone(), inner));
                }
                None => errors.push(format!("{ty}.{path}: not in pahole's output")),
            }
        }
        for path in r.members.keys() {
            if !path.contains('.') && !layout.members.contains_key(path) {
                errors.push(format!("{ty}.{path}: pahole has it, the profile does not"));
            }
        }
    }
    if !nested.is_empty() {
        let inner: Vec<String> = nested
            .iter()
            .map(|(_, _, t)| {
                t.trim_start_matches("struct ")
                    .trim_start_matches("union ")
                    .to_owned()
            })
            .collect();
        let inner_refs: Vec<&str> = inner.iter().map(String::as_str).collect();
        let reference2 = pahole(path, &inner_refs);
        for ((ty, p, _), inner_ty) in nested.iter().zip(&inner) {
            let (first, rest) = p.split_once('.').unwrap();
            let outer = &reference[ty].members[first];
            let Some(im) = reference2.get(inner_ty).and_then(|t| t.members.get(rest)) else {
                errors.push(format!("{ty}.{p}: pahole has no {inner_ty}.{rest}"));
                continue;
            };
            let expect = Member {
                offset: outer.offset + im.offset,
                ..im.clone()
            };
            if profile.types[ty].members[p] != expect {
                errors.push(format!(
                    "{ty}.{p}: {:?} != pahole {expect:?}",
                    profile.types[ty].members[p]
                ));
            }
        }
    }
    assert!(
        errors.is_empty(),
        "{} mismatches with pahole:\n{}",
        errors.len(),
        errors.join("\n")
    );
}

/// `nm` of `path`: name → addresses (a name can occur more than once).
pub fn nm(path: &Path) -> BTreeMap<String, Vec<u64>> {
    let text = run(Command::new("nm").arg(path));
    let mut out: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() == 3 {
            if let Ok(a) = u64::from_str_radix(f[0], 16) {
                out.entry(f[2].to_owned()).or_default().push(a);
            }
        }
    }
    out
}

/// Every symbol and per-CPU offset of the profile is one of `nm`'s values.
pub fn compare_with_nm(path: &Path, profile: &Profile) {
    let reference = nm(path);
    let mut errors = Vec::new();
    let entries = profile
        .symbols
        .iter()
        .map(|(n, s)| (n, s.address))
        .chain(profile.percpu.iter().map(|(n, &o)| (n, o)));
    for (name, addr) in entries {
        match reference.get(name) {
            Some(addrs) if addrs.contains(&addr) => {}
            other => errors.push(format!("{name}: {addr:#x}, nm says {other:x?}")),
        }
    }
    assert!(
        errors.is_empty(),
        "mismatches with nm:\n{}",
        errors.join("\n")
    );
}
