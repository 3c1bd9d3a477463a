//! The kernel's own symbol table, kallsyms, decoded from a memory image:
//! guest RAM read at run time, or the `.rodata` of a (stripped) vmlinux.
//!
//! `scripts/kallsyms` emits, as data of the kernel image:
//! - `kallsyms_token_table`: 256 NUL-terminated strings; a byte of a
//!   compressed name stands for its token. A byte value that occurs in
//!   symbol names stands for itself, so the digits `0`..`9` sit in the
//!   table as ten consecutive one-character tokens: that is how the table
//!   is found without a symbol table (the method of `vmlinux-to-elf`).
//! - `kallsyms_token_index`: 256 `u16` offsets of the tokens in the table.
//! - `kallsyms_names`: one entry per symbol, a length (one byte, or two with
//!   the high bit of the first set, the "big symbol" form of 6.1+) then that
//!   many token bytes; the first expanded character is the `nm` type.
//! - `kallsyms_markers`: the offset in `kallsyms_names` of every 256th
//!   entry (`u32`), and `kallsyms_num_syms` (`u32`) before the names.
//! - `kallsyms_offsets` (`CONFIG_KALLSYMS_BASE_RELATIVE`, every Debian kernel
//!   since 4.6): `i32` per symbol, relative to `kallsyms_relative_base`
//!   (`u64`, relocated with the kernel, so a run-time image gives run-time
//!   addresses); with `CONFIG_KALLSYMS_ABSOLUTE_PERCPU` a non-negative
//!   value is an absolute one (per-CPU offsets) and a negative one is
//!   `relative_base - 1 - value`.
//!
//! Their order moved across versions (6.1: offsets, relative base, count,
//! names, markers, [`kallsyms_seqs_of_names` in later 6.1 stable builds],
//! tokens; 6.4+: count, names, markers, tokens, offsets, relative base,
//! seqs), so each table is found by its own shape and checked against the
//! others, not by its place: the names must decode to exactly the markers,
//! and the addresses must come out sorted, as `scripts/kallsyms` sorts them.
//!
//! The image is hostile input (a crashed guest's memory): every read is
//! bounds-checked, every loop is bounded by the image or by the limits
//! below, and a failure is a [`KallsymsError`].

use std::collections::HashMap;

/// The most symbols accepted (Debian's 6.12 kernel: ~200k with
/// `KALLSYMS_ALL`).
pub const MAX_SYMS: u32 = 4 << 20;
/// The longest name accepted once expanded (`KSYM_NAME_LEN` is 512 since
/// 6.1).
const MAX_NAME: usize = 1024;
/// Candidate token tables tried before giving up.
const MAX_CANDIDATES: usize = 64;

/// Why kallsyms could not be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KallsymsError {
    #[error("no kallsyms token table found (is CONFIG_KALLSYMS set? is this the kernel image?)")]
    NoTokenTable,
    #[error("kallsyms token table at {0:#x} found, but no names table and markers that decode consistently before it")]
    NoNames(u64),
    #[error("kallsyms names at {0:#x} decoded, but no offsets or addresses table gives them sorted addresses")]
    NoAddresses(u64),
}

/// One symbol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KSym {
    pub name: String,
    /// The `nm` type letter (`T`, `t`, `D`, `R`, `B`, `A`, ...).
    pub kind: char,
    /// The address as the image has it: run-time in guest memory,
    /// link-time in a vmlinux.
    pub address: u64,
}

/// Where each table was found (image addresses), for reports and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tables {
    pub token_table: u64,
    pub token_index: u64,
    pub markers: u64,
    pub num_syms: u64,
    pub names: u64,
    pub offsets: u64,
    /// Where `kallsyms_relative_base` is (0: none, 6.15+).
    pub relative_base_at: u64,
    /// Its value.
    pub relative_base: u64,
    /// Whether non-negative offsets are absolute (`KALLSYMS_ABSOLUTE_PERCPU`).
    pub absolute_percpu: bool,
}

/// A decoded kallsyms: symbols in the kernel's order (sorted by address).
#[derive(Clone, Debug, Default)]
pub struct Kallsyms {
    pub symbols: Vec<KSym>,
    pub tables: Tables,
    by_name: HashMap<String, usize>,
}

/// A little-endian view of an image at a base address.
struct Img<'a> {
    data: &'a [u8],
}

impl Img<'_> {
    fn u16(&self, at: usize) -> Option<u16> {
        let b = self.data.get(at..at.checked_add(2)?)?;
        Some(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&self, at: usize) -> Option<u32> {
        let b = self.data.get(at..at.checked_add(4)?)?;
        Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&self, at: usize) -> Option<u64> {
        let b = self.data.get(at..at.checked_add(8)?)?;
        Some(u64::from_le_bytes(b.try_into().ok()?))
    }
    /// The NUL-terminated, non-empty string at `at` (at most 256 bytes):
    /// its length without the NUL.
    fn token_len(&self, at: usize) -> Option<usize> {
        let rest = self.data.get(at..)?;
        let n = rest.iter().take(257).position(|&b| b == 0)?;
        (n > 0).then_some(n)
    }
}

impl Kallsyms {
    /// Finds and decodes kallsyms in `image`, whose first byte is at
    /// address `base`.
    pub fn find(image: &[u8], base: u64) -> Result<Kallsyms, KallsymsError> {
        let img = Img { data: image };
        let digits = b"0\x001\x002\x003\x004\x005\x006\x007\x008\x009\x00";
        let finder = memchr::memmem::Finder::new(digits);
        let mut last_err = KallsymsError::NoTokenTable;
        for p in finder.find_iter(image).take(MAX_CANDIDATES) {
            let Some((table, index)) = token_table_at(&img, p) else { continue };
            let tokens = match tokens(&img, table, index) {
                Some(t) => t,
                None => continue,
            };
            let names = match find_names(&img, table) {
                Some(n) => n,
                None => {
                    last_err = KallsymsError::NoNames(base.wrapping_add(table as u64));
                    continue;
                }
            };
            let Some((addrs, offsets, rb_at, rb, abs)) = find_addresses(&img, base, &names, index) else {
                last_err = KallsymsError::NoAddresses(base.wrapping_add(names.names as u64));
                continue;
            };
            let mut symbols = Vec::with_capacity(addrs.len());
            let mut at = names.names;
            for &address in &addrs {
                let (len, hdr) = entry_len(&img, at).unwrap_or((0, 1));
                let data = image.get(at + hdr..at + hdr + len).unwrap_or(&[]);
                let mut name = Vec::with_capacity(32);
                for &b in data {
                    name.extend_from_slice(tokens[b as usize]);
                    if name.len() > MAX_NAME {
                        break;
                    }
                }
                at += hdr + len;
                let Some((&k, rest)) = name.split_first() else { continue };
                symbols.push(KSym {
                    name: String::from_utf8_lossy(rest).into_owned(),
                    kind: k as char,
                    address,
                });
            }
            let at = |o: usize| base.wrapping_add(o as u64);
            let tables = Tables {
                token_table: at(table),
                token_index: at(index),
                markers: at(names.markers),
                num_syms: at(names.num_syms),
                names: at(names.names),
                offsets: at(offsets),
                relative_base_at: rb_at.map_or(0, at),
                relative_base: rb,
                absolute_percpu: abs,
            };
            let mut by_name = HashMap::with_capacity(symbols.len());
            for (i, s) in symbols.iter().enumerate() {
                // The first of a name wins, as kallsyms_lookup_name's does
                // for globals; locals of the same name come later or earlier
                // by address, so prefer a global where both exist.
                match by_name.get(&s.name) {
                    Some(&j) if !is_local(&symbols[j]) || is_local(s) => {}
                    _ => {
                        by_name.insert(s.name.clone(), i);
                    }
                }
            }
            return Ok(Kallsyms { symbols, tables, by_name });
        }
        Err(last_err)
    }

    /// The symbol of a name (a global one where several share it).
    pub fn get(&self, name: &str) -> Option<&KSym> {
        self.by_name.get(name).map(|&i| &self.symbols[i])
    }

    /// Address of a symbol.
    pub fn address(&self, name: &str) -> Option<u64> {
        self.get(name).map(|s| s.address)
    }

    /// The size of a symbol as the kernel computes it
    /// (`kallsyms_lookup_size_offset`): up to the next higher address.
    pub fn size(&self, name: &str) -> Option<u64> {
        let i = *self.by_name.get(name)?;
        let a = self.symbols[i].address;
        let next = self.symbols[i..].iter().find(|s| s.address > a)?;
        Some(next.address - a)
    }

    /// The function containing `addr`: `(name, offset, size)`, as the
    /// kernel's `%pS` prints it. Only text symbols (`T`, `t`, `W`, `w`) are
    /// considered; the size runs to the next symbol of any kind.
    pub fn symbolize(&self, addr: u64) -> Option<(&str, u64, u64)> {
        let i = self.symbols.partition_point(|s| s.address <= addr);
        let sym = self.symbols[..i]
            .iter()
            .rev()
            .take(64)
            .find(|s| matches!(s.kind, 'T' | 't' | 'W' | 'w'))?;
        let next = self.symbols[i..].iter().find(|s| s.address > sym.address)?;
        Some((&sym.name, addr - sym.address, next.address - sym.address))
    }
}

fn is_local(s: &KSym) -> bool {
    s.kind.is_ascii_lowercase()
}

/// Given the position of the `"0\0" .. "9\0"` run, the token table's start
/// and its index's start, if they check.
fn token_table_at(img: &Img<'_>, p: usize) -> Option<(usize, usize)> {
    // Tokens 0x30..=0xff follow from p: walk to the end of token 255.
    let mut e = p;
    for _ in 0x30..0x100 {
        e = e.checked_add(img.token_len(e)? + 1)?;
    }
    // The index follows, aligned (2, 4 or 8 bytes, by version).
    for idx in (e..e + 16).filter(|a| a % 2 == 0) {
        if img.u16(idx)? != 0 {
            continue;
        }
        let Some(table) = p.checked_sub(usize::from(img.u16(idx + 2 * 0x30)?)) else { continue };
        if check_index(img, table, idx, e) {
            return Some((table, idx));
        }
    }
    None
}

/// Every token at its indexed place, each right after the previous one.
fn check_index(img: &Img<'_>, table: usize, idx: usize, end: usize) -> bool {
    let mut expect = 0usize;
    for i in 0..256 {
        let Some(off) = img.u16(idx + 2 * i) else { return false };
        let off = usize::from(off);
        if off != expect {
            return false;
        }
        let Some(len) = img.token_len(table + off) else { return false };
        expect = off + len + 1;
    }
    table + expect == end
}

/// The 256 tokens as byte strings.
fn tokens<'a>(img: &Img<'a>, table: usize, index: usize) -> Option<Vec<&'a [u8]>> {
    (0..256)
        .map(|i| {
            let at = table + usize::from(img.u16(index + 2 * i)?);
            let len = img.token_len(at)?;
            img.data.get(at..at + len)
        })
        .collect()
}

/// The names table and its neighbours.
struct Names {
    names: usize,
    num_syms: usize,
    markers: usize,
    count: u32,
}

/// A names entry's token count and the bytes its length takes.
fn entry_len(img: &Img<'_>, at: usize) -> Option<(usize, usize)> {
    let b0 = *img.data.get(at)?;
    if b0 & 0x80 == 0 {
        return Some((usize::from(b0), 1));
    }
    let b1 = *img.data.get(at + 1)?;
    Some((usize::from(b0 & 0x7f) | usize::from(b1) << 7, 2))
}

/// Finds `kallsyms_markers` before the token table (directly, or with
/// `kallsyms_seqs_of_names` between), then `kallsyms_num_syms` and
/// `kallsyms_names` before the markers, such that the names decode to
/// exactly the markers.
fn find_names(img: &Img<'_>, table: usize) -> Option<Names> {
    // Markers: u32, 0 then increasing by at least 256 (one length byte
    // and one token per entry) and at most 256 * 2 * 513 per block. Look
    // at aligned places up to 32 MiB before the table (seqs_of_names
    // between them is 3 bytes per symbol).
    let lowest = table.saturating_sub(32 << 20) & !3;
    let mut s = table & !3;
    let mut tried = 0;
    while s > lowest && tried < 1 << 22 {
        s -= 4;
        tried += 1;
        if img.u32(s)? != 0 {
            continue;
        }
        let mut m = 1usize;
        let mut prev = 0u32;
        while let Some(v) = img.u32(s + 4 * m) {
            if s + 4 * m >= table || v < prev.saturating_add(512) || v - prev > 256 * 2 * 513 {
                break;
            }
            prev = v;
            m += 1;
        }
        if m < 2 {
            continue;
        }
        if let Some(n) = names_before(img, s, m, prev) {
            return Some(n);
        }
    }
    None
}

/// With markers of `m` entries at `s` (the last being `last`), finds the
/// count and the names whose entries land on every marker.
fn names_before(img: &Img<'_>, s: usize, m: usize, last: u32) -> Option<Names> {
    let last = last as usize;
    // The names end at or just before the markers; the last block holds
    // at most 256 entries of at most 2 + 1026 bytes.
    let hi = s.checked_sub(last)?;
    let lo = hi.saturating_sub(256 * 1028);
    let mut x = hi;
    while x > lo {
        x -= 1;
        for gap in [4usize, 8] {
            let Some(p) = x.checked_sub(gap) else { continue };
            if p % 4 != 0 {
                continue;
            }
            let Some(count) = img.u32(p) else { continue };
            if count == 0 || count > MAX_SYMS || (count as usize).div_ceil(256) != m {
                continue;
            }
            if names_check(img, x, count, s) {
                return Some(Names { names: x, num_syms: p, markers: s, count });
            }
        }
    }
    None
}

/// Whether `count` entries from `x` hit every marker and end within 8
/// bytes before the markers at `s`.
fn names_check(img: &Img<'_>, x: usize, count: u32, s: usize) -> bool {
    let mut at = x;
    for i in 0..count as usize {
        if i % 256 == 0 && img.u32(s + 4 * (i / 256)).map(|v| v as usize) != Some(at - x) {
            return false;
        }
        let Some((len, hdr)) = entry_len(img, at) else { return false };
        if len == 0 {
            return false;
        }
        at += hdr + len;
        if at > s {
            return false;
        }
    }
    s - at < 8
}

/// What [`find_addresses`] found: the addresses, the offsets table's
/// place, the relative base's place (none since 6.15) and value, and
/// whether per-CPU values are absolute.
type Addresses = (Vec<u64>, usize, Option<usize>, u64, bool);

/// `n` addresses decoded from the `i32` offsets at `o`, if they come out
/// sorted and end among kernel addresses.
fn sorted_addresses(img: &Img<'_>, o: usize, n: usize, decode: impl Fn(usize, i32) -> u64) -> Option<Vec<u64>> {
    let mut out: Vec<u64> = Vec::with_capacity(n);
    for i in 0..n {
        let a = decode(i, img.u32(o.checked_add(4 * i)?)? as i32);
        if out.last().is_some_and(|&l| a < l) {
            return None;
        }
        out.push(a);
    }
    out.last().is_some_and(|&l| l >= 0xffff_0000_0000_0000).then_some(out)
}

/// The addresses of every symbol: the `i32` offsets and the relative base
/// either just before the count (6.1) or just after the token index
/// (6.4+), with or without absolute per-CPU values, whichever comes out
/// sorted; or, since 6.15, offsets relative to their own place. `(addresses,
/// offsets table, relative base's place if any, its value, absolute
/// per-CPU)`.
fn find_addresses(
    img: &Img<'_>,
    base: u64,
    names: &Names,
    index: usize,
) -> Option<Addresses> {
    let n = names.count as usize;
    let four_n = n.checked_mul(4)?;
    let mut candidates = Vec::new();
    // 6.1: offsets, relative_base (8-aligned), num_syms.
    if let Some(rb) = names.num_syms.checked_sub(8) {
        for pad in [0usize, 4] {
            if let Some(o) = rb.checked_sub(four_n + pad) {
                candidates.push((o, rb));
            }
        }
    }
    // 6.4+: token_index (512 bytes), offsets, relative_base.
    let after = index + 512;
    for o in [after, (after + 7) & !7] {
        let end = o + four_n;
        for rb in [end, (end + 7) & !7] {
            candidates.push((o, rb));
        }
    }
    for (o, rb_at) in candidates {
        let Some(rb) = img.u64(rb_at) else { continue };
        for abs in [true, false] {
            let decode = |_: usize, v: i32| {
                if abs && v >= 0 {
                    v as u64
                } else if abs {
                    rb.wrapping_sub(1).wrapping_sub(v as i64 as u64)
                } else {
                    rb.wrapping_add(v as u32 as u64)
                }
            };
            if let Some(out) = sorted_addresses(img, o, n, decode) {
                return Some((out, o, Some(rb_at), rb, abs));
            }
        }
    }
    // 6.15+ (Debian's 7.x): no relative base; each offset is relative to
    // its own place (`.long sym - .`), right after the token index.
    for o in [after, (after + 3) & !3] {
        let place = |i: usize| base.wrapping_add((o + 4 * i) as u64);
        let decode = |i: usize, v: i32| place(i).wrapping_add(v as i64 as u64);
        if let Some(out) = sorted_addresses(img, o, n, decode) {
            return Some((out, o, None, 0, false));
        }
    }
    None
}
