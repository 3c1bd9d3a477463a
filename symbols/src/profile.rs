//! The [`Profile`]: what one kernel build looks like to the repair kernel.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::dwarf::{Scanner, TypeRequest, R};
use crate::elf::{release_from_banner, Elf};
use crate::error::{Error, Missing};
use crate::wanted::{Group, Wanted};

/// A half-open range of link-time addresses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Range {
    pub start: u64,
    pub end: u64,
}

/// An ELF symbol: link-time address (add the KASLR slide at run time) and size.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Symbol {
    pub address: u64,
    pub size: u64,
}

/// Where a member sits in its type.
///
/// For a bitfield, `offset` and `size` give the storage unit holding it (the
/// member type's size, aligned to it), and `bit_offset` counts from that
/// unit's least significant bit (little-endian), as `pahole` prints them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub offset: u64,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bit_offset: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bit_size: Option<u64>,
}

/// A struct or union: its size and its members by path.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TypeLayout {
    pub size: u64,
    pub members: BTreeMap<String, Member>,
}

/// A kernel profile. Its JSON form (see the crate docs) has the same field
/// names.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Profile {
    /// GNU build-id, lower-case hex.
    pub build_id: String,
    /// The bytes of `linux_banner` up to its NUL (ends with a newline).
    pub banner: String,
    /// The release from the banner (`6.1.0-56-cloud-amd64`).
    pub release: String,
    /// `uname -m` style architecture (`x86_64`).
    pub arch: String,
    /// Kernel text, `[_stext, _etext)`.
    pub text: Range,
    /// Read-only data, `[__start_rodata, __end_rodata)`.
    pub rodata: Range,
    pub symbols: BTreeMap<String, Symbol>,
    /// Per-CPU variables: offset inside each CPU's per-CPU area.
    pub percpu: BTreeMap<String, u64>,
    pub types: BTreeMap<String, TypeLayout>,
    /// `DW_AT_producer` of the vmlinux's first C unit: the compiler and
    /// its options (empty when the DWARF has none). See
    /// [`Profile::dwarf_layouts_randomized_after_the_fact`].
    #[serde(default)]
    pub producer: String,
    /// Code address ranges (link-time, half open) of compile units by
    /// source name (`"mm/slub.c"`), from DWARF; only those asked for with
    /// [`unit_ranges_from_vmlinux`]. Empty for a BTF profile: BTF has no
    /// compile units.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub units: BTreeMap<String, Vec<Range>>,
}

/// The code address ranges of the compile units `names` (`"mm/slub.c"`)
/// from the vmlinux's DWARF (see [`Profile::units`]); a name no unit has is
/// left out. A file without `.debug_info` is [`Error::NoDebugInfo`].
pub fn unit_ranges_from_vmlinux(path: &Path, names: &[&str]) -> Result<BTreeMap<String, Vec<Range>>, Error> {
    let io = |source| Error::Io { path: path.to_owned(), source };
    let file = File::open(path).map_err(io)?;
    // SAFETY: as in `from_vmlinux_lenient`: read-only map, dropped on return.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
    let elf = Elf::parse(&map, path)?;
    if !elf.has_section(".debug_info") {
        return Err(Error::NoDebugInfo { path: path.to_owned(), section: ".debug_info" });
    }
    let endian = if elf.little_endian() { gimli::RunTimeEndian::Little } else { gimli::RunTimeEndian::Big };
    let sections = gimli::DwarfSections::load(|id| elf.dwarf_section(id.name(), path))?;
    let dwarf = sections.borrow(|s| R::new(s, endian));
    // A kernel has a few thousand units; the cap only bounds a corrupt file.
    Ok(Scanner::new(dwarf, endian).unit_ranges(names, 1 << 20))
}

/// Symbols every profile reads for its identity and ranges.
const IDENTITY: [&str; 5] = [
    "linux_banner",
    "_stext",
    "_etext",
    "__start_rodata",
    "__end_rodata",
];

impl Profile {
    /// Reads `path` and extracts `wanted`; every missing required item is
    /// listed in one [`Error::Missing`].
    pub fn from_vmlinux(path: &Path, wanted: &Wanted<'_>) -> Result<Profile, Error> {
        let (profile, missing) = Self::from_vmlinux_lenient(path, wanted)?;
        check(path, profile, missing)
    }

    /// Like [`Profile::from_vmlinux`], but returns what was found together
    /// with the list of missing required items, for callers that treat some
    /// of them as optional. Malformed input is still an error.
    pub fn from_vmlinux_lenient(
        path: &Path,
        wanted: &Wanted<'_>,
    ) -> Result<(Profile, Vec<Missing>), Error> {
        let io = |source| Error::Io {
            path: path.to_owned(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        // SAFETY: the map is read-only and private to this call; a vmlinux
        // is not expected to change while it is read (if truncated by
        // another process meanwhile, reads may fault, as with any mmap).
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        let mut release = |file_start: usize, range: std::ops::Range<usize>| {
            let page = 4096;
            let from = (file_start + range.start).div_ceil(page) * page;
            let to = (file_start + range.end) / page * page;
            if to > from && to <= map.len() {
                // SAFETY: the mapping is a read-only shared file mapping.
                // MADV_DONTNEED only drops this process's page-table entries;
                // later reads fault the same file contents back in, so every
                // slice borrowed from the map stays valid and unchanged.
                let _ = unsafe {
                    map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, from, to - from)
                };
            }
        };
        extract(&map, path, wanted, &mut release)
    }

    /// Extracts from an in-memory ELF image (tests, fuzzing, callers that
    /// already hold the file).
    pub fn from_bytes(data: &[u8], wanted: &Wanted<'_>) -> Result<(Profile, Vec<Missing>), Error> {
        extract(data, Path::new("<memory>"), wanted, &mut |_, _| {})
    }

    /// The profile as pretty JSON with the documented field names.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a profile always serializes")
    }

    /// Reads a profile back from [`Profile::to_json`] output.
    pub fn from_json(text: &str) -> Result<Profile, Error> {
        Ok(serde_json::from_str(text)?)
    }

    /// Link-time address of a symbol.
    pub fn symbol(&self, name: &str) -> Option<u64> {
        self.symbols.get(name).map(|s| s.address)
    }

    /// Size of a symbol (`st_size`: a function's length, an object's size).
    pub fn symbol_size(&self, name: &str) -> Option<u64> {
        self.symbols.get(name).map(|s| s.size)
    }

    /// The KASLR slide of a running kernel of this build, from its
    /// `/proc/kallsyms` (or a `System.map`) parsed by
    /// [`crate::parse_system_map`]: run-time minus link-time address of
    /// `_text` (wrapping). `None` if `_text` is in neither, or if any other
    /// symbol of the profile found in `map` disagrees (another build, or
    /// kallsyms with addresses hidden as zeros).
    pub fn kaslr_slide(&self, map: &BTreeMap<String, u64>) -> Option<u64> {
        let slide = map.get("_text")?.wrapping_sub(self.symbol("_text")?);
        let consistent = self
            .symbols
            .iter()
            .filter_map(|(n, s)| map.get(n).map(|&a| a.wrapping_sub(s.address)))
            .all(|d| d == slide);
        consistent.then_some(slide)
    }

    /// Offset of a per-CPU variable in the per-CPU area.
    pub fn percpu_offset(&self, name: &str) -> Option<u64> {
        self.percpu.get(name).copied()
    }

    /// Byte offset of a member (dotted path) in a type.
    pub fn offset(&self, ty: &str, member_path: &str) -> Option<u64> {
        self.member(ty, member_path).map(|m| m.offset)
    }

    /// A member's full placement.
    pub fn member(&self, ty: &str, member_path: &str) -> Option<&Member> {
        self.types.get(ty)?.members.get(member_path)
    }

    /// Size in bytes of a type.
    pub fn size(&self, ty: &str) -> Option<u64> {
        self.types.get(ty).map(|t| t.size)
    }

    /// True when the kernel was compiled with GCC's randstruct plugin
    /// (`-fplugin=.../randomize_layout_plugin.so` in `DW_AT_producer`).
    /// The plugin shuffles the members of every `__randomize_layout`
    /// struct (`task_struct`'s randomized part, `mm_struct`, `cred`, ...)
    /// after GCC has written the declared, unshuffled layout to DWARF: the
    /// DWARF (and so `pahole`, and this profile) then gives offsets the
    /// code does not use. Linux's own Kconfig keeps BTF off for this
    /// reason (`DEBUG_INFO_BTF depends on !GCC_PLUGIN_RANDSTRUCT`). Clang's
    /// randstruct shuffles while it builds the type, so its DWARF is exact.
    pub fn dwarf_layouts_randomized_after_the_fact(&self) -> bool {
        producer_has_gcc_randstruct_plugin(&self.producer)
    }
}

/// Whether a `DW_AT_producer` string names GCC's randstruct plugin.
pub fn producer_has_gcc_randstruct_plugin(producer: &str) -> bool {
    producer
        .split_whitespace()
        .any(|opt| opt.starts_with("-fplugin=") && opt.ends_with("randomize_layout_plugin.so"))
}

fn check(path: &Path, profile: Profile, missing: Vec<Missing>) -> Result<Profile, Error> {
    if missing.is_empty() {
        Ok(profile)
    } else {
        Err(Error::Missing {
            path: path.to_owned(),
            missing,
        })
    }
}

/// Strict extraction from memory: [`Profile::from_bytes`] with missing items
/// as an error.
pub fn from_bytes_strict(data: &[u8], wanted: &Wanted<'_>) -> Result<Profile, Error> {
    let (p, m) = Profile::from_bytes(data, wanted)?;
    check(Path::new("<memory>"), p, m)
}

/// The GNU build-id of a vmlinux, without reading its DWARF.
pub fn read_build_id(path: &Path) -> Result<Option<String>, Error> {
    let io = |source| Error::Io {
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(io)?;
    // SAFETY: as in `from_vmlinux_lenient`: read-only map, dropped on return.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
    Elf::parse(&map, path)?.build_id(path)
}

/// Who a vmlinux is, read without its DWARF (milliseconds).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub build_id: String,
    pub banner: String,
    pub release: String,
    pub arch: String,
}

/// The build-id, banner, release and arch of a vmlinux: enough to tell
/// whether a profile or a guest belongs to it. Needs `.symtab`, not DWARF.
pub fn read_identity(path: &Path) -> Result<Identity, Error> {
    let io = |source| Error::Io {
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(io)?;
    // SAFETY: as in `from_vmlinux_lenient`: read-only map, dropped on return.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
    let elf = Elf::parse(&map, path)?;
    let syms = elf.symbols(&HashSet::from(["linux_banner"]), path)?;
    let banner = syms
        .get("linux_banner")
        .and_then(|s| elf.symbol_bytes(s))
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .unwrap_or_default();
    Ok(Identity {
        build_id: elf.build_id(path)?.unwrap_or_default(),
        release: release_from_banner(&banner).unwrap_or_default(),
        banner,
        arch: elf.arch(),
    })
}

fn extract(
    data: &[u8],
    path: &Path,
    wanted: &Wanted<'_>,
    release: &mut dyn FnMut(usize, std::ops::Range<usize>),
) -> Result<(Profile, Vec<Missing>), Error> {
    let elf = Elf::parse(data, path)?;
    if !elf.has_section(".debug_info") {
        return Err(Error::NoDebugInfo {
            path: path.to_owned(),
            section: ".debug_info",
        });
    }
    let mut missing = Vec::new();
    let mut profile = Profile {
        arch: elf.arch(),
        ..Default::default()
    };
    match elf.build_id(path)? {
        Some(id) => profile.build_id = id,
        None => missing.push(Missing::BuildId),
    }

    // Symbols and per-CPU variables: one pass over .symtab.
    let sym_groups: Vec<Group> = wanted.symbols.iter().map(|s| Group::parse(s)).collect();
    let pcpu_groups: Vec<Group> = wanted.percpu.iter().map(|s| Group::parse(s)).collect();
    let mut names: HashSet<&str> = IDENTITY.into_iter().collect();
    for g in sym_groups.iter().chain(&pcpu_groups) {
        names.extend(g.alternatives.iter().copied());
    }
    let syms = elf.symbols(&names, path)?;
    let identity = IDENTITY.map(|n| Group {
        text: n,
        alternatives: vec![n],
        optional: false,
    });
    for g in sym_groups.iter().chain(identity.iter()) {
        let mut any = false;
        for &name in &g.alternatives {
            if let Some(s) = syms.get(name) {
                profile.symbols.insert(
                    name.to_owned(),
                    Symbol {
                        address: s.address,
                        size: s.size,
                    },
                );
                any = true;
            }
        }
        let item = Missing::Symbol(g.text.to_owned());
        if !any && !g.optional && !missing.contains(&item) {
            missing.push(item);
        }
    }
    let percpu = elf.percpu_section();
    for g in &pcpu_groups {
        let mut any = false;
        for &name in &g.alternatives {
            let Some(s) = syms.get(name) else { continue };
            match percpu {
                Some((index, base)) if s.section == Some(index) => {
                    profile
                        .percpu
                        .insert(name.to_owned(), s.address.wrapping_sub(base));
                    any = true;
                }
                _ => {}
            }
        }
        if !any && !g.optional {
            missing.push(Missing::PerCpu(g.text.to_owned()));
        }
    }
    let range = |a: &str, b: &str| match (syms.get(a), syms.get(b)) {
        (Some(a), Some(b)) => Range {
            start: a.address,
            end: b.address,
        },
        _ => Range::default(),
    };
    profile.text = range("_stext", "_etext");
    profile.rodata = range("__start_rodata", "__end_rodata");
    if let Some(bytes) = syms.get("linux_banner").and_then(|s| elf.symbol_bytes(s)) {
        profile.banner = String::from_utf8_lossy(bytes).into_owned();
        profile.release = release_from_banner(&profile.banner).unwrap_or_default();
    }

    // Types: one scan of .debug_info.
    let type_groups: Vec<(Group, Vec<Group>)> = wanted
        .types
        .iter()
        .map(|(t, ms)| {
            (
                Group::parse(t),
                ms.iter().map(|m| Group::parse(m)).collect(),
            )
        })
        .collect();
    // One request per type name, with the paths of every entry naming it.
    let mut requests: Vec<TypeRequest> = Vec::new();
    for (tg, mgs) in &type_groups {
        let paths = mgs.iter().flat_map(|g| g.alternatives.iter().copied());
        for &name in &tg.alternatives {
            match requests.iter_mut().find(|r| r.name == name) {
                Some(r) => r.paths.extend(paths.clone()),
                None => requests.push(TypeRequest {
                    name,
                    paths: paths.clone().collect(),
                }),
            }
        }
    }
    if !requests.is_empty() {
        let endian = if elf.little_endian() {
            gimli::RunTimeEndian::Little
        } else {
            gimli::RunTimeEndian::Big
        };
        let sections = gimli::DwarfSections::load(|id| elf.dwarf_section(id.name(), path))?;
        let dwarf = sections.borrow(|s| R::new(s, endian));
        let info_file_off = elf
            .debug_info_file_offset()
            .and_then(|o| usize::try_from(o).ok());
        let scanner = Scanner::new(dwarf, endian);
        profile.producer = scanner.c_producer(64).unwrap_or_default();
        let mut progress = |range: std::ops::Range<usize>| {
            if let Some(base) = info_file_off {
                release(base, range);
            }
        };
        let found = scanner
            .scan(&requests, &mut progress)
            .map_err(|(offset, source)| Error::Dwarf {
                path: path.to_owned(),
                offset,
                source,
            })?;
        profile.types = found;
    }
    for (tg, mgs) in &type_groups {
        let layouts: Vec<&TypeLayout> = tg
            .alternatives
            .iter()
            .filter_map(|n| profile.types.get(*n))
            .collect();
        if layouts.is_empty() {
            if !tg.optional {
                missing.push(Missing::Type(tg.text.to_owned()));
            }
            continue;
        }
        for mg in mgs {
            let present = layouts
                .iter()
                .any(|l| mg.alternatives.iter().any(|a| l.members.contains_key(*a)));
            if !present && !mg.optional {
                missing.push(Missing::Member {
                    ty: tg.text.to_owned(),
                    path: mg.text.to_owned(),
                });
            }
        }
    }
    Ok((profile, missing))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gcc_randstruct_plugin_is_recognised_in_the_producer() {
        let gcc = "GNU C11 12.2.0 -mno-sse -m64 -g -gdwarf-5 -Os -fstack-protector-strong \
                   -fplugin=./scripts/gcc-plugins/randomize_layout_plugin.so";
        assert!(producer_has_gcc_randstruct_plugin(gcc));
        let p = Profile { producer: gcc.into(), ..Profile::default() };
        assert!(p.dwarf_layouts_randomized_after_the_fact());
        for other in [
            "GNU C11 12.2.0 -mno-sse -m64 -g -gdwarf-5 -Os",
            "GNU C11 12.2.0 -fplugin=./scripts/gcc-plugins/stackleak_plugin.so",
            "Debian clang version 16.0.6 (15~deb12u1)",
            "",
        ] {
            assert!(!producer_has_gcc_randstruct_plugin(other), "{other}");
        }
    }

    #[test]
    fn kaslr_slide_from_kallsyms() {
        let mut p = Profile::default();
        for (n, a) in [
            ("_text", 0xffffffff81000000u64),
            ("panic", 0xffffffff81a00000),
        ] {
            p.symbols.insert(
                n.into(),
                Symbol {
                    address: a,
                    size: 0,
                },
            );
        }
        let kallsyms = "ffffffff9e000000 T _text\nffffffff9ea00000 T panic\n";
        let map = crate::parse_system_map(kallsyms);
        assert_eq!(p.kaslr_slide(&map), Some(0x1d000000));
        let wrong = crate::parse_system_map("ffffffff9e000000 T _text\nffffffff9eb00000 T panic\n");
        assert_eq!(p.kaslr_slide(&wrong), None);
        let hidden =
            crate::parse_system_map("0000000000000000 T _text\n0000000000000000 T panic\n");
        assert_eq!(p.kaslr_slide(&hidden), None);
        assert_eq!(p.kaslr_slide(&BTreeMap::new()), None);
    }
}
