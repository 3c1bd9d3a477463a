//! A profile without DWARF: struct layouts and per-CPU offsets from BTF,
//! symbols from kallsyms, identity from the build-id note and
//! `linux_banner`. Read from a kernel ELF (a vmlinuz's payload, or any
//! vmlinux, stripped or not) or from a running kernel's memory (the
//! loader's `--image auto`), through one function, [`profile_from_btf`].

use std::collections::HashSet;
use std::path::Path;

use object::{Object, ObjectSection, SectionFlags};

use crate::btf::Btf;
use crate::elf::{hex, release_from_banner};
use crate::error::{Error, Missing};
use crate::kallsyms::Kallsyms;
use crate::profile::{Profile, Range, Symbol};
use crate::vmlinuz::{self, Compression};
use crate::wanted::{Group, Wanted};

/// What a BTF profile is made of.
pub struct BtfSources<'a> {
    /// The raw BTF (the `.BTF` section, or `__start_BTF..__stop_BTF`).
    pub btf: &'a [u8],
    pub kallsyms: &'a Kallsyms,
    /// Run-time minus link-time address (wrapping): 0 for a file, the KASLR
    /// slide for a running kernel's memory. Subtracted from every kernel
    /// address kallsyms gives, so the profile holds link-time addresses as
    /// a DWARF one does.
    pub slide: u64,
    /// The GNU build-id, lower-case hex.
    pub build_id: Option<String>,
    /// `linux_banner` up to its NUL.
    pub banner: String,
    pub arch: String,
    /// Reads kernel bytes at an address as kallsyms gives it, to trim the
    /// alignment padding off a function's size (kallsyms knows only where
    /// the next symbol starts; the ELF `st_size` a DWARF profile holds ends
    /// at the last instruction). Without it, sizes run to the next symbol.
    pub read: Option<&'a dyn Fn(u64, usize) -> Option<Vec<u8>>>,
}

impl std::fmt::Debug for BtfSources<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BtfSources")
            .field("btf", &self.btf.len())
            .field("symbols", &self.kallsyms.symbols.len())
            .field("slide", &self.slide)
            .field("build_id", &self.build_id)
            .finish()
    }
}

/// The symbols every profile reads for its identity and ranges.
const IDENTITY: [&str; 5] = ["linux_banner", "_stext", "_etext", "__start_rodata", "__end_rodata"];

/// Whether an address is a kernel virtual address (not an absolute per-CPU
/// offset): only those move with KASLR.
fn is_kernel_va(a: u64) -> bool {
    a >= 0xffff_8000_0000_0000
}

/// Builds a profile from BTF and kallsyms; like
/// [`Profile::from_vmlinux_lenient`], what was found and what is missing.
pub fn profile_from_btf(
    src: &BtfSources<'_>,
    path: &Path,
    wanted: &Wanted<'_>,
) -> Result<(Profile, Vec<Missing>), Error> {
    let btf = Btf::parse(src.btf).map_err(|source| Error::Btf { path: path.to_owned(), source })?;
    let mut missing = Vec::new();
    let mut profile = Profile { arch: src.arch.clone(), ..Default::default() };
    match &src.build_id {
        Some(id) => profile.build_id = id.clone(),
        None => missing.push(Missing::BuildId),
    }
    profile.banner = src.banner.clone();
    profile.release = release_from_banner(&profile.banner).unwrap_or_default();

    let link = |a: u64| if is_kernel_va(a) { a.wrapping_sub(src.slide) } else { a };
    let ks = src.kallsyms;
    let identity = IDENTITY.map(|n| Group { text: n, alternatives: vec![n], optional: false });
    let sym_groups: Vec<Group> = wanted.symbols.iter().map(|s| Group::parse(s)).collect();
    for g in sym_groups.iter().chain(identity.iter()) {
        let mut any = false;
        for &name in &g.alternatives {
            if let Some(s) = ks.get(name) {
                let size = if name == "linux_banner" && !src.banner.is_empty() {
                    src.banner.len() as u64 + 1
                } else {
                    let size = ks.size(name).unwrap_or(0);
                    match (src.read, s.kind) {
                        (Some(read), 'T' | 't' | 'W' | 'w') if size <= 1 << 20 => read(s.address, size as usize)
                            .map_or(size, |code| (code.len() - padding_len(&code)) as u64),
                        _ => size,
                    }
                };
                profile.symbols.insert(name.to_owned(), Symbol { address: link(s.address), size });
                any = true;
            }
        }
        let item = Missing::Symbol(g.text.to_owned());
        if !any && !g.optional && !missing.contains(&item) {
            missing.push(item);
        }
    }
    // Where kallsyms itself is, so a loader can name frames from the guest's
    // own table at run time (`function+offset/size`, as the kernel does).
    let t = &ks.tables;
    for (name, a) in [
        ("kallsyms_offsets", t.offsets),
        ("kallsyms_relative_base", t.relative_base_at),
        ("kallsyms_num_syms", t.num_syms),
        ("kallsyms_names", t.names),
        ("kallsyms_markers", t.markers),
        ("kallsyms_token_table", t.token_table),
        ("kallsyms_token_index", t.token_index),
    ] {
        if a != 0 {
            profile.symbols.entry(name.to_owned()).or_insert(Symbol { address: link(a), size: 0 });
        }
    }
    let percpu = btf.datasec_vars(".data..percpu");
    for g in wanted.percpu.iter().map(|s| Group::parse(s)) {
        let mut any = false;
        for &name in &g.alternatives {
            // BTF's DATASEC first; an absolute kallsyms value (per-CPU
            // symbols are absolute offsets up to 6.14) where BTF lacks it.
            let off = percpu.get(name).copied().or_else(|| {
                ks.get(name)
                    .filter(|s| ks.tables.absolute_percpu && !is_kernel_va(s.address))
                    .map(|s| s.address)
            });
            if let Some(off) = off {
                profile.percpu.insert(name.to_owned(), off);
                any = true;
            }
        }
        if !any && !g.optional {
            missing.push(Missing::PerCpu(g.text.to_owned()));
        }
    }
    let range = |a: &str, b: &str| match (profile.symbol(a), profile.symbol(b)) {
        (Some(a), Some(b)) => Range { start: a, end: b },
        _ => Range::default(),
    };
    let (text, rodata) = (range("_stext", "_etext"), range("__start_rodata", "__end_rodata"));
    profile.text = text;
    profile.rodata = rodata;

    let type_groups: Vec<(Group, Vec<Group>)> = wanted
        .types
        .iter()
        .map(|(t, ms)| (Group::parse(t), ms.iter().map(|m| Group::parse(m)).collect()))
        .collect();
    let mut requests: Vec<(&str, Vec<&str>)> = Vec::new();
    for (tg, mgs) in &type_groups {
        let paths: Vec<&str> = mgs.iter().flat_map(|g| g.alternatives.iter().copied()).collect();
        for &name in &tg.alternatives {
            match requests.iter_mut().find(|r| r.0 == name) {
                Some(r) => r.1.extend(paths.iter().copied()),
                None => requests.push((name, paths.clone())),
            }
        }
    }
    profile.types = btf.layouts(&requests);
    for (tg, mgs) in &type_groups {
        let layouts: Vec<_> = tg.alternatives.iter().filter_map(|n| profile.types.get(*n)).collect();
        if layouts.is_empty() {
            if !tg.optional {
                missing.push(Missing::Type(tg.text.to_owned()));
            }
            continue;
        }
        for mg in mgs {
            let present = layouts.iter().any(|l| mg.alternatives.iter().any(|a| l.members.contains_key(*a)));
            if !present && !mg.optional {
                missing.push(Missing::Member { ty: tg.text.to_owned(), path: mg.text.to_owned() });
            }
        }
    }
    Ok((profile, missing))
}

/// The alignment padding at the end of a function's bytes (up to the next
/// symbol): the NOPs the assembler pads `.p2align` with, or `int3` fill
/// (one `int3` right after a `ret` is the function's own, the
/// straight-line-speculation guard). Only the longest suffix made wholly
/// of padding counts, at most 63 bytes.
pub fn padding_len(code: &[u8]) -> usize {
    const NOPS: [&[u8]; 11] = [
        &[0x90],
        &[0x66, 0x90],
        &[0x0f, 0x1f, 0x00],
        &[0x0f, 0x1f, 0x40, 0x00],
        &[0x0f, 0x1f, 0x44, 0x00, 0x00],
        &[0x66, 0x0f, 0x1f, 0x44, 0x00, 0x00],
        &[0x0f, 0x1f, 0x80, 0x00, 0x00, 0x00, 0x00],
        &[0x0f, 0x1f, 0x84, 0x00, 0x00, 0x00, 0x00, 0x00],
        &[0x66, 0x0f, 0x1f, 0x84, 0x00, 0x00, 0x00, 0x00, 0x00],
        &[0x66, 0x2e, 0x0f, 0x1f, 0x84, 0x00, 0x00, 0x00, 0x00, 0x00],
        &[0x2e, 0x0f, 0x1f, 0x84, 0x00, 0x00, 0x00, 0x00, 0x00],
    ];
    /// Whether `b` is a run of NOPs, each possibly with extra 0x66
    /// prefixes.
    fn all_nops(mut b: &[u8]) -> bool {
        'next: while !b.is_empty() {
            for k in 0..6 {
                if b.len() < k || !b[..k].iter().all(|&x| x == 0x66) {
                    break;
                }
                if let Some(n) = NOPS.iter().filter(|n| b[k..].starts_with(n)).map(|n| n.len()).max() {
                    b = &b[k + n..];
                    continue 'next;
                }
            }
            return false;
        }
        true
    }
    let max = code.len().min(63);
    let mut int3 = code.iter().rev().take(max).take_while(|&&b| b == 0xcc).count();
    if int3 > 0 {
        if int3 < code.len() && code[code.len() - int3 - 1] == 0xc3 {
            int3 -= 1;
        }
        return int3;
    }
    (1..=max.min(code.len().saturating_sub(1)))
        .rev()
        .find(|&l| all_nops(&code[code.len() - l..]))
        .unwrap_or(0)
}

/// A kernel ELF taken out of a vmlinuz (or read as it is).
#[derive(Debug)]
pub struct KernelElf {
    pub data: Vec<u8>,
    pub compression: Compression,
}

/// Reads a vmlinuz (bzImage) and decompresses its kernel ELF; an ELF file
/// is taken as it is.
pub fn read_vmlinuz(path: &Path) -> Result<KernelElf, Error> {
    let file = std::fs::read(path).map_err(|source| Error::Io { path: path.to_owned(), source })?;
    let (data, compression) =
        vmlinuz::decompress(&file).map_err(|source| Error::Vmlinuz { path: path.to_owned(), source })?;
    Ok(KernelElf { data, compression })
}

/// The profile of a kernel ELF from its `.BTF` section and the kallsyms in
/// its data (no `.symtab` or DWARF needed), and the decoded kallsyms.
pub fn profile_from_kernel_elf(
    data: &[u8],
    path: &Path,
    wanted: &Wanted<'_>,
) -> Result<(Profile, Vec<Missing>, Kallsyms), Error> {
    let bad = |source| Error::BadElf { path: path.to_owned(), source };
    if !data.starts_with(b"\x7fELF") {
        return Err(Error::NotElf { path: path.to_owned() });
    }
    let file = object::File::parse(data).map_err(bad)?;
    let btf_sec = file.section_by_name(".BTF").ok_or_else(|| Error::NoBtf { path: path.to_owned() })?;
    let btf = btf_sec.data().map_err(bad)?;
    // kallsyms lives in .rodata; look there first, then in every other
    // allocated section with file data.
    let mut sections: Vec<_> = file
        .sections()
        .filter(|s| matches!(s.flags(), SectionFlags::Elf { sh_flags } if sh_flags & 2 != 0))
        .filter(|s| s.kind() != object::SectionKind::UninitializedData)
        .collect();
    sections.sort_by_key(|s| s.name() != Ok(".rodata"));
    let mut kallsyms = Err(crate::kallsyms::KallsymsError::NoTokenTable);
    for s in &sections {
        let Ok(d) = s.data() else { continue };
        match Kallsyms::find(d, s.address()) {
            Ok(k) => {
                kallsyms = Ok(k);
                break;
            }
            // Keep the furthest a section got (tables found, not decoded).
            Err(crate::kallsyms::KallsymsError::NoTokenTable) => {}
            Err(e) => kallsyms = Err(e),
        }
    }
    let kallsyms = kallsyms.map_err(|source| Error::Kallsyms { path: path.to_owned(), source })?;
    let banner = kallsyms
        .address("linux_banner")
        .and_then(|a| {
            let s = sections.iter().find(|s| s.address() <= a && a < s.address() + s.size())?;
            let d = s.data().ok()?.get(usize::try_from(a - s.address()).ok()?..)?;
            let end = d.iter().take(1024).position(|&b| b == 0)?;
            Some(String::from_utf8_lossy(&d[..end]).into_owned())
        })
        .unwrap_or_default();
    let build_id = file.build_id().map_err(bad)?.map(hex);
    let arch = crate::elf::Elf::parse(data, path)?.arch();
    let read = |a: u64, len: usize| -> Option<Vec<u8>> {
        let s = sections.iter().find(|s| s.address() <= a && a < s.address() + s.size())?;
        let start = usize::try_from(a - s.address()).ok()?;
        s.data().ok()?.get(start..start.checked_add(len)?).map(<[u8]>::to_vec)
    };
    let src = BtfSources { btf, kallsyms: &kallsyms, slide: 0, build_id, banner, arch, read: Some(&read) };
    let (p, m) = profile_from_btf(&src, path, wanted)?;
    Ok((p, m, kallsyms))
}

/// The GNU build-id in a run of ELF notes (`__start_notes..__stop_notes`
/// of a running kernel): lower-case hex.
pub fn build_id_from_notes(notes: &[u8]) -> Option<String> {
    let mut at = 0usize;
    for _ in 0..64 {
        let word = |o: usize| notes.get(o..o + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize);
        let (namesz, descsz, ty) = (word(at)?, word(at + 4)?, word(at + 8)?);
        let name_at = at + 12;
        let desc_at = name_at.checked_add(namesz.checked_add(3)? & !3)?;
        let next = desc_at.checked_add(descsz.checked_add(3)? & !3)?;
        if ty == 3 && notes.get(name_at..name_at + namesz)? == b"GNU\0" {
            return Some(hex(notes.get(desc_at..desc_at + descsz)?));
        }
        at = next;
    }
    None
}

/// Every GNU build-id note (20-byte SHA-1, as Linux's `--build-id` links
/// it) in `bytes`, at most `max`: a kernel image holds its own and those of
/// images it embeds (the vDSO's), so a caller matches them against what it
/// knows.
pub fn find_build_id_notes(bytes: &[u8], max: usize) -> Vec<String> {
    let sig: &[u8] = b"\x04\0\0\0\x14\0\0\0\x03\0\0\0GNU\0";
    memchr::memmem::find_iter(bytes, sig)
        .take(max)
        .filter_map(|at| build_id_from_notes(bytes.get(at..at + 36)?))
        .collect()
}

/// Names a kernel should have in kallsyms for a BTF profile: the identity
/// symbols and `wanted`'s (for callers that read memory by symbol).
pub fn symbol_names<'w>(wanted: &Wanted<'w>) -> HashSet<&'w str> {
    let mut names: HashSet<&str> = IDENTITY.into_iter().collect();
    for s in wanted.symbols {
        names.extend(Group::parse(s).alternatives);
    }
    names
}
