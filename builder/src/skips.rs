//! The bytes of kernel text Linux legitimately patches at run time, from the
//! vmlinux's own patch tables: these sites are zeroed before hashing
//! ([`repair_kernel::integrity::hash_page`]) on both sides, so a healthy
//! kernel matches its snapshot and a corrupted one cannot hide in them
//! (the table comes from the image, not from the crashed guest).
//!
//! x86_64 formats (arch/x86/include/asm/*.h), as in 6.1; where a record's
//! layout drifted, its size and the offset of its length byte come from the
//! vmlinux's DWARF ([`TableFormats`]), never from a version number:
//! - `__jump_table`: `struct jump_entry { s32 code; s32 target; long key; }`,
//!   5-byte sites (static keys);
//! - `__mcount_loc`: `unsigned long` site addresses, 5-byte `call __fentry__`
//!   (ftrace);
//! - `.static_call_sites`: `struct static_call_site { s32 addr; s32 key; }`,
//!   5-byte calls;
//! - `.altinstructions`: `struct alt_instr { s32 instr_offset; s32
//!   repl_offset; u16 cpuid; u8 instrlen; u8 replacementlen; }` (12 bytes,
//!   packed, up to 6.2; 14 since 6.3, which made `cpuid` a 32-bit
//!   `ft_flags`), `instrlen`-byte sites; since 6.8 also every paravirt call
//!   (`call *pv_ops+N(%rip)`);
//! - `.retpoline_sites`, `.return_sites`, `.ibt_endbr_seal`: `s32` offsets to
//!   6-, 5- and 4-byte sites;
//! - `.parainstructions` (gone since 6.8): `struct paravirt_patch_site {
//!   u8 *instr; u8 type; u8 len; }` (16 bytes with padding; the last record
//!   may end without its padding, as 5.10's does);
//! - `.call_sites` (6.2+, call depth tracking): `s32` offsets to 5-byte
//!   calls;
//! - `runtime_ptr_NAME` and `runtime_shift_NAME` (6.11+, runtime
//!   constants): `s32` offsets to the 8-byte immediate of a `mov $imm64` and
//!   the 1-byte immediate of a shift, patched once at boot;
//! - `.smp_locks`: `s32` offsets to `lock` prefixes (1 byte), which Linux
//!   turns into `ds` prefixes while a single CPU is online.
//!
//! A table whose bounds are absent or whose size is not a multiple of its
//! entry size is skipped (and reported), never guessed at.

use object::{Object, ObjectSection, ObjectSymbol};
use repair_kernel::integrity::{jump_table_sites, SkipKind, SkipSite, JUMP_LABEL_SITE_LEN};

use crate::elf::VmlinuxPages;

/// The layouts of the patch records that drifted, from the vmlinux's DWARF
/// (`struct alt_instr`, `struct paravirt_patch_site`); the 6.1 layout where
/// the DWARF lacks a type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableFormats {
    /// `sizeof(struct alt_instr)` and `offsetof(struct alt_instr, instrlen)`.
    pub alt_instr: (u64, u64),
    /// `sizeof(struct paravirt_patch_site)` and `offsetof(.., len)`.
    pub paravirt: (u64, u64),
}

impl Default for TableFormats {
    fn default() -> Self {
        TableFormats { alt_instr: (12, 10), paravirt: (16, 9) }
    }
}

impl TableFormats {
    /// The formats the profile's DWARF describes (types absent from it
    /// keep the 6.1 layout; their tables are then absent too).
    pub fn from_profile(p: &symbols::Profile) -> TableFormats {
        let d = TableFormats::default();
        let get = |ty: &str, member: &str, dflt: (u64, u64)| match (p.size(ty), p.offset(ty, member)) {
            (Some(size), Some(off)) if off < size && size <= 64 => (size, off),
            _ => dflt,
        };
        TableFormats { alt_instr: get("alt_instr", "instrlen", d.alt_instr), paravirt: get("paravirt_patch_site", "len", d.paravirt) }
    }
}

/// One patch table and what came of it, for reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableReport {
    pub name: &'static str,
    /// Sites found, or `None` when the table was absent or malformed.
    pub sites: Option<usize>,
}

struct Table {
    name: &'static str,
    /// Bounding symbols, and the section holding exactly the table (used
    /// when the symbols are absent).
    start: &'static str,
    end: &'static str,
    section: &'static str,
    entry: u64,
}

const TABLES: &[Table] = &[
    Table { name: "jump labels", start: "__start___jump_table", end: "__stop___jump_table", section: "__jump_table", entry: 16 },
    Table { name: "ftrace", start: "__start_mcount_loc", end: "__stop_mcount_loc", section: "__mcount_loc", entry: 8 },
    Table { name: "static calls", start: "__start_static_call_sites", end: "__stop_static_call_sites", section: ".static_call_sites", entry: 8 },
    Table { name: "alternatives", start: "__alt_instructions", end: "__alt_instructions_end", section: ".altinstructions", entry: 12 },
    Table { name: "retpolines", start: "__retpoline_sites", end: "__retpoline_sites_end", section: ".retpoline_sites", entry: 4 },
    Table { name: "return thunks", start: "__return_sites", end: "__return_sites_end", section: ".return_sites", entry: 4 },
    Table { name: "IBT seals", start: "__ibt_endbr_seal", end: "__ibt_endbr_seal_end", section: ".ibt_endbr_seal", entry: 4 },
    Table { name: "paravirt", start: "__parainstructions", end: "__parainstructions_end", section: ".parainstructions", entry: 16 },
    // `lock` prefixes, turned into `ds` prefixes while one CPU is online.
    Table { name: "SMP locks", start: "__smp_locks", end: "__smp_locks_end", section: ".smp_locks", entry: 4 },
    Table { name: "call depth", start: "__call_sites", end: "__call_sites_end", section: ".call_sites", entry: 4 },
];

/// Section name prefixes of the runtime constants (6.11+,
/// arch/x86/include/asm/runtime-const.h) and the bytes each site patches.
const RUNTIME_CONSTS: &[(&str, u32)] = &[("runtime_ptr_", 8), ("runtime_shift_", 1)];

/// Link-time ranges never hashed from the file: `.data..ro_after_init`
/// sits inside `[__start_rodata, __end_rodata)` but is written during boot,
/// and a distribution's debug vmlinux may predate `resolve_btfids` filling
/// `.BTF_ids` (Debian's does: zeros in the file, IDs in the running kernel).
pub fn file_only_exclusions(data: &[u8]) -> Vec<(u64, u64)> {
    file_only_exclusions_with(data, &elf_symbols(data))
}

/// A kernel's symbols as the snapshot needs them: name, address, and
/// whether it is text. From the ELF's `.symtab`, or from kallsyms for a
/// stripped kernel (a vmlinuz's).
pub type KernelSymbols = Vec<(String, u64, bool)>;

/// The `.symtab` of an ELF as [`KernelSymbols`].
pub fn elf_symbols(data: &[u8]) -> KernelSymbols {
    let Ok(file) = object::File::parse(data) else { return Vec::new() };
    file.symbols()
        .filter_map(|s| Some((s.name().ok()?.to_owned(), s.address(), s.kind() == object::SymbolKind::Text)))
        .collect()
}

/// [`file_only_exclusions`] with the symbols given.
pub fn file_only_exclusions_with(data: &[u8], symbols: &KernelSymbols) -> Vec<(u64, u64)> {
    let Ok(file) = object::File::parse(data) else { return Vec::new() };
    let sym = |n: &str| symbols.iter().find(|s| s.0 == n).map(|s| s.1);
    let mut out = Vec::new();
    if let (Some(a), Some(b)) = (sym("__start_ro_after_init"), sym("__end_ro_after_init")) {
        if b > a {
            out.push((a, b));
        }
    }
    if let Some(s) = file.section_by_name(".BTF_ids") {
        out.push((s.address(), s.address() + s.size()));
    }
    out
}

/// Static call trampolines (`__SCT__name`): `static_call_update()`
/// rewrites their first instruction (a `jmp`, `ret` or `nop`, 5 bytes).
const STATIC_CALL_TRAMPOLINE: &str = "__SCT__";

/// Every run-time patch site of the vmlinux, sorted by address.
pub fn skip_sites(data: &[u8], pages: &VmlinuxPages<'_>, formats: &TableFormats) -> (Vec<SkipSite>, Vec<TableReport>) {
    skip_sites_with(data, pages, &elf_symbols(data), formats)
}

/// [`skip_sites`] with the symbols given (kallsyms for a stripped kernel).
pub fn skip_sites_with(
    data: &[u8],
    pages: &VmlinuxPages<'_>,
    symbols: &KernelSymbols,
    formats: &TableFormats,
) -> (Vec<SkipSite>, Vec<TableReport>) {
    let mut sites = Vec::new();
    let mut reports = Vec::new();
    let Ok(file) = object::File::parse(data) else { return (sites, reports) };
    let wanted: Vec<&str> = TABLES.iter().flat_map(|t| [t.start, t.end]).collect();
    let mut addr = std::collections::HashMap::new();
    let mut trampolines = 0;
    for (n, a, text) in symbols {
        let n = n.as_str();
        if wanted.contains(&n) {
            addr.entry(n).or_insert(*a);
        } else if n.starts_with(STATIC_CALL_TRAMPOLINE) && *text {
            sites.push(SkipSite { addr: *a, len: 5, kind: SkipKind::StaticCall as u32 });
            trampolines += 1;
        }
    }
    reports.push(TableReport { name: "static call trampolines", sites: Some(trampolines) });
    for t in TABLES {
        // The records whose layout drifted take their size from DWARF; a
        // padded record's last one may end before its padding.
        let (entry, min_last) = match t.name {
            "alternatives" => (formats.alt_instr.0, formats.alt_instr.0),
            "paravirt" => (formats.paravirt.0, formats.paravirt.1 + 1),
            _ => (t.entry, t.entry),
        };
        let bounds = match (addr.get(t.start), addr.get(t.end)) {
            (Some(&a), Some(&b)) => Some((a, b)),
            _ => file.section_by_name(t.section).map(|s| (s.address(), s.address() + s.size())),
        };
        let Some((start, end)) = bounds else {
            reports.push(TableReport { name: t.name, sites: None });
            continue;
        };
        let tail = if end >= start { (end - start) % entry } else { 0 };
        if end < start || (tail != 0 && tail < min_last) || end - start > 64 << 20 {
            reports.push(TableReport { name: t.name, sites: None });
            continue;
        }
        let mut bytes = pages.bytes(start, end);
        // Pad a short last record so that it reads as a whole one.
        bytes.resize(((end - start).div_ceil(entry) * entry) as usize, 0);
        let before = sites.len();
        let mut push = |a: u64, len: u32, kind: SkipKind| {
            if len > 0 {
                sites.push(SkipSite { addr: a, len, kind: kind as u32 });
            }
        };
        let rel = |i: usize, e: &[u8]| {
            let off = i32::from_le_bytes([e[0], e[1], e[2], e[3]]);
            (start + i as u64 * entry).wrapping_add(off as i64 as u64)
        };
        match t.name {
            "jump labels" => {
                jump_table_sites(&bytes, start, |a| push(a, JUMP_LABEL_SITE_LEN, SkipKind::JumpLabel));
            }
            "ftrace" => {
                for e in bytes.chunks_exact(8) {
                    push(u64::from_le_bytes(e.try_into().expect("8 bytes")), 5, SkipKind::Ftrace);
                }
            }
            "static calls" => {
                for (i, e) in bytes.chunks_exact(8).enumerate() {
                    push(rel(i, e), 5, SkipKind::StaticCall);
                }
            }
            "alternatives" => {
                let len_at = formats.alt_instr.1 as usize;
                for (i, e) in bytes.chunks_exact(entry as usize).enumerate() {
                    push(rel(i, e), e[len_at] as u32, SkipKind::Alternative);
                }
            }
            "call depth" => {
                for (i, e) in bytes.chunks_exact(4).enumerate() {
                    push(rel(i, e), 5, SkipKind::Other);
                }
            }
            "retpolines" => {
                for (i, e) in bytes.chunks_exact(4).enumerate() {
                    push(rel(i, e), 6, SkipKind::Other);
                }
            }
            "return thunks" => {
                for (i, e) in bytes.chunks_exact(4).enumerate() {
                    push(rel(i, e), 5, SkipKind::Other);
                }
            }
            "IBT seals" => {
                for (i, e) in bytes.chunks_exact(4).enumerate() {
                    push(rel(i, e), 4, SkipKind::Other);
                }
            }
            "SMP locks" => {
                for (i, e) in bytes.chunks_exact(4).enumerate() {
                    push(rel(i, e), 1, SkipKind::Other);
                }
            }
            "paravirt" => {
                let len_at = formats.paravirt.1 as usize;
                for e in bytes.chunks_exact(entry as usize) {
                    let instr = u64::from_le_bytes(e[..8].try_into().expect("8 bytes"));
                    push(instr, e[len_at] as u32, SkipKind::Other);
                }
            }
            _ => unreachable!("every table is handled"),
        }
        reports.push(TableReport { name: t.name, sites: Some(sites.len() - before) });
    }
    for (prefix, len) in RUNTIME_CONSTS {
        let mut n = 0;
        for sec in file.sections() {
            let Ok(name) = sec.name() else { continue };
            if !name.starts_with(prefix) || sec.size() % 4 != 0 || sec.size() > 1 << 20 {
                continue;
            }
            let start = sec.address();
            let bytes = pages.bytes(start, start + sec.size());
            for (i, e) in bytes.chunks_exact(4).enumerate() {
                let off = i32::from_le_bytes([e[0], e[1], e[2], e[3]]);
                sites.push(SkipSite { addr: (start + 4 * i as u64).wrapping_add(off as i64 as u64), len: *len, kind: SkipKind::Other as u32 });
                n += 1;
            }
        }
        reports.push(TableReport { name: if *len == 8 { "runtime pointers" } else { "runtime shifts" }, sites: Some(n) });
    }
    sites.sort_by_key(|s| (s.addr, s.len));
    sites.dedup_by(|b, a| a.addr == b.addr && a.len >= b.len);
    (sites, reports)
}
