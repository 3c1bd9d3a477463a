//! Struct layouts and per-CPU offsets from the kernel's own BTF
//! (`CONFIG_DEBUG_INFO_BTF`): the `.BTF` section of a vmlinux (stripped
//! or not, so also the ELF inside a vmlinuz), or the bytes between
//! `__start_BTF` and `__stop_BTF` in a running kernel's memory.
//!
//! The format (the kernel's `include/uapi/linux/btf.h`, documented in
//! `Documentation/bpf/btf.rst`): a header, a type section of `btf_type`
//! records (type ids count from 1, 0 is void) each followed by data that
//! depends on its kind, and a string section. Layouts follow the same
//! rules as the DWARF reader (`dwarf.rs`), so the two profiles compare
//! member by member: members of anonymous structs and unions under their
//! own names, bitfields as `pahole` prints them, dotted paths resolved.
//!
//! Why not a crate: `btf-rs` (the maintained Rust reader) builds every
//! type of the whole section up front and indexes its input without
//! bounds checks in places; here the input may be a crashed guest's
//! memory, the reader needs the few types the repair kernel walks, and
//! the format is small. Every read is bounds-checked, chains are followed
//! at most [`MAX_HOPS`] times, and corrupt input gives a [`BtfError`] or
//! a missing item, never a panic or an endless loop.

use std::collections::{BTreeMap, HashMap};

use crate::profile::{Member, TypeLayout};

const MAGIC: u16 = 0xeb9f;
/// Longest typedef/qualifier chain or anonymous-member nesting followed.
const MAX_HOPS: usize = 64;
/// Most members (at all nesting levels) visited for one struct.
const MAX_MEMBERS: usize = 1 << 16;
/// Most types accepted (Debian's 6.12 vmlinux: ~150k).
const MAX_TYPES: usize = 4 << 20;

/// Why BTF could not be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BtfError {
    #[error("no BTF: bad magic {0:#06x} (expected 0xeb9f little-endian; is CONFIG_DEBUG_INFO_BTF set?)")]
    Magic(u16),
    #[error("BTF version {0} is not 1")]
    Version(u8),
    #[error("BTF header is truncated or its sections lie outside the {0} bytes given")]
    Header(usize),
    #[error("BTF type {id} at byte {at:#x}: {what}")]
    Type { id: u32, at: usize, what: &'static str },
    #[error("BTF has more than {MAX_TYPES} types")]
    TooMany,
}

// Kinds (BTF_KIND_*).
const INT: u8 = 1;
const PTR: u8 = 2;
const ARRAY: u8 = 3;
const STRUCT: u8 = 4;
const UNION: u8 = 5;
const ENUM: u8 = 6;
const FWD: u8 = 7;
const TYPEDEF: u8 = 8;
const VOLATILE: u8 = 9;
const CONST: u8 = 10;
const RESTRICT: u8 = 11;
const FUNC: u8 = 12;
const FUNC_PROTO: u8 = 13;
const VAR: u8 = 14;
const DATASEC: u8 = 15;
const FLOAT: u8 = 16;
const DECL_TAG: u8 = 17;
const TYPE_TAG: u8 = 18;
const ENUM64: u8 = 19;

/// One `btf_type` record: where its extra data starts.
#[derive(Clone, Copy, Debug)]
struct Ty {
    name_off: u32,
    kind: u8,
    vlen: u16,
    kflag: bool,
    /// `size` or `type`, by kind.
    size_type: u32,
    /// Offset of the kind-specific data in the type section.
    extra: usize,
}

/// A parsed BTF blob: the type records indexed by id, the strings.
#[derive(Debug)]
pub struct Btf<'a> {
    types: Vec<Ty>,
    type_sec: &'a [u8],
    strings: &'a [u8],
}

fn u32_at(d: &[u8], at: usize) -> Option<u32> {
    let b = d.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

impl<'a> Btf<'a> {
    /// Parses the header and indexes every type record (not their
    /// contents).
    pub fn parse(data: &'a [u8]) -> Result<Btf<'a>, BtfError> {
        let hdr = BtfError::Header(data.len());
        let magic = data.get(0..2).map(|b| u16::from_le_bytes([b[0], b[1]])).ok_or(hdr.clone())?;
        if magic != MAGIC {
            return Err(BtfError::Magic(magic));
        }
        let version = *data.get(2).ok_or(hdr.clone())?;
        if version != 1 {
            return Err(BtfError::Version(version));
        }
        let field = |i: usize| u32_at(data, 4 + 4 * i).map(|v| v as usize).ok_or(hdr.clone());
        let (hdr_len, type_off, type_len, str_off, str_len) =
            (field(0)?, field(1)?, field(2)?, field(3)?, field(4)?);
        let section = |off: usize, len: usize| {
            let s = hdr_len.checked_add(off)?;
            data.get(s..s.checked_add(len)?)
        };
        let type_sec = section(type_off, type_len).ok_or(hdr.clone())?;
        let strings = section(str_off, str_len).ok_or(hdr)?;
        let mut types = vec![Ty { name_off: 0, kind: 0, vlen: 0, kflag: false, size_type: 0, extra: 0 }];
        let mut at = 0usize;
        while at < type_sec.len() {
            if types.len() > MAX_TYPES {
                return Err(BtfError::TooMany);
            }
            let id = types.len() as u32;
            let bad = |what| BtfError::Type { id, at, what };
            let (Some(name_off), Some(info), Some(size_type)) =
                (u32_at(type_sec, at), u32_at(type_sec, at + 4), u32_at(type_sec, at + 8))
            else {
                return Err(bad("record truncated"));
            };
            let kind = ((info >> 24) & 0x1f) as u8;
            let vlen = (info & 0xffff) as u16;
            let n = usize::from(vlen);
            let extra_len = match kind {
                INT | VAR | DECL_TAG => 4,
                ARRAY => 12,
                STRUCT | UNION | DATASEC | ENUM64 => 12 * n,
                ENUM | FUNC_PROTO => 8 * n,
                PTR | FWD | TYPEDEF | VOLATILE | CONST | RESTRICT | FUNC | FLOAT | TYPE_TAG => 0,
                _ => return Err(bad("unknown kind")),
            };
            let extra = at + 12;
            let next = extra + extra_len;
            if next > type_sec.len() {
                return Err(bad("data runs past the type section"));
            }
            types.push(Ty { name_off, kind, vlen, kflag: info >> 31 != 0, size_type, extra });
            at = next;
        }
        Ok(Btf { types, type_sec, strings })
    }

    /// Number of type ids, void included.
    pub fn len(&self) -> usize {
        self.types.len()
    }

    /// Whether only void is there.
    pub fn is_empty(&self) -> bool {
        self.types.len() <= 1
    }

    fn ty(&self, id: u32) -> Option<&Ty> {
        self.types.get(id as usize).filter(|_| id != 0)
    }

    fn name(&self, off: u32) -> &'a [u8] {
        let Some(rest) = self.strings.get(off as usize..) else { return b"" };
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        &rest[..end]
    }

    fn word(&self, ty: &Ty, i: usize) -> u32 {
        u32_at(self.type_sec, ty.extra + 4 * i).unwrap_or(0)
    }

    /// Strips typedefs, qualifiers and type tags.
    fn peel(&self, mut id: u32) -> Option<(u32, &Ty)> {
        for _ in 0..MAX_HOPS {
            let t = self.ty(id)?;
            match t.kind {
                TYPEDEF | VOLATILE | CONST | RESTRICT | TYPE_TAG => id = t.size_type,
                _ => return Some((id, t)),
            }
        }
        None
    }

    /// Size in bytes of a type; `None` for void, functions, or a chain that
    /// does not resolve.
    fn size_of(&self, id: u32, depth: usize) -> Option<u64> {
        if depth > MAX_HOPS {
            return None;
        }
        let (_, t) = self.peel(id)?;
        match t.kind {
            INT | STRUCT | UNION | ENUM | ENUM64 | FLOAT | DATASEC => Some(u64::from(t.size_type)),
            PTR => Some(8),
            ARRAY => {
                let elem = self.size_of(self.word(t, 0), depth + 1)?;
                Some(elem.saturating_mul(u64::from(self.word(t, 2))))
            }
            _ => None,
        }
    }

    /// The ids of the complete structs and unions (or typedefs of one)
    /// named in `names`: the first with members or a size wins.
    fn find_types(&self, names: &[&str]) -> HashMap<String, u32> {
        let wanted: HashMap<&[u8], &str> = names.iter().map(|n| (n.as_bytes(), *n)).collect();
        let mut out = HashMap::new();
        for (id, t) in self.types.iter().enumerate().skip(1) {
            if !matches!(t.kind, STRUCT | UNION | TYPEDEF) {
                continue;
            }
            let Some(&name) = wanted.get(self.name(t.name_off)) else { continue };
            if out.contains_key(name) {
                continue;
            }
            let Some((sid, s)) = self.peel(id as u32) else { continue };
            if matches!(s.kind, STRUCT | UNION) && (s.vlen > 0 || s.size_type > 0) {
                out.insert(name.to_owned(), sid);
            }
        }
        out
    }

    /// The layouts of the wanted types: every named member (anonymous
    /// structs and unions flattened), plus the dotted `paths` asked for.
    pub fn layouts(&self, wanted: &[(&str, Vec<&str>)]) -> BTreeMap<String, TypeLayout> {
        let names: Vec<&str> = wanted.iter().map(|(n, _)| *n).collect();
        let ids = self.find_types(&names);
        let mut out = BTreeMap::new();
        for (name, paths) in wanted {
            let Some(&id) = ids.get(*name) else { continue };
            let Some(t) = self.ty(id) else { continue };
            let mut members = BTreeMap::new();
            let mut types = HashMap::new();
            self.collect(id, 0, 0, &mut members, &mut types, &mut MAX_MEMBERS.clone());
            for path in paths {
                if !members.contains_key(*path) && path.contains('.') {
                    if let Some(m) = self.resolve_path(id, path) {
                        members.insert((*path).to_owned(), m);
                    }
                }
            }
            out.insert((*name).to_owned(), TypeLayout { size: u64::from(t.size_type), members });
        }
        out
    }

    fn collect(
        &self,
        id: u32,
        base: u64,
        depth: usize,
        out: &mut BTreeMap<String, Member>,
        types: &mut HashMap<String, u32>,
        budget: &mut usize,
    ) {
        if depth > MAX_HOPS {
            return;
        }
        let Some(t) = self.ty(id) else { return };
        if !matches!(t.kind, STRUCT | UNION) {
            return;
        }
        for i in 0..usize::from(t.vlen) {
            if *budget == 0 {
                return;
            }
            *budget -= 1;
            let (name_off, mty, off) = (self.word(t, 3 * i), self.word(t, 3 * i + 1), self.word(t, 3 * i + 2));
            let (bit_off, bits) = if t.kflag { (off & 0xff_ffff, off >> 24) } else { (off, 0) };
            let size = self.size_of(mty, 0).unwrap_or(0);
            let m = if bits == 0 {
                Member { offset: base.saturating_add(u64::from(bit_off / 8)), size, bit_offset: None, bit_size: None }
            } else {
                let abs = u64::from(bit_off);
                let unit_bits = size.saturating_mul(8).max(8);
                let unit_off = abs / unit_bits * (unit_bits / 8);
                Member {
                    offset: base.saturating_add(unit_off),
                    size,
                    bit_offset: Some(abs - unit_off * 8),
                    bit_size: Some(u64::from(bits)),
                }
            };
            let name = self.name(name_off);
            if !name.is_empty() {
                let name = String::from_utf8_lossy(name).into_owned();
                types.insert(name.clone(), mty);
                out.insert(name, m);
            } else if bits == 0 {
                if let Some((inner, it)) = self.peel(mty) {
                    if matches!(it.kind, STRUCT | UNION) {
                        self.collect(inner, m.offset, depth + 1, out, types, budget);
                    }
                }
            }
        }
    }

    fn resolve_path(&self, id: u32, path: &str) -> Option<Member> {
        let mut cur = id;
        let mut base = 0u64;
        let mut parts = path.split('.').peekable();
        while let Some(part) = parts.next() {
            let mut members = BTreeMap::new();
            let mut types = HashMap::new();
            self.collect(cur, 0, 0, &mut members, &mut types, &mut MAX_MEMBERS.clone());
            let (m, &ty) = (members.get(part)?, types.get(part)?);
            if parts.peek().is_none() {
                return Some(Member { offset: base.saturating_add(m.offset), ..m.clone() });
            }
            base = base.saturating_add(m.offset);
            let (next, t) = self.peel(ty)?;
            if !matches!(t.kind, STRUCT | UNION) {
                return None;
            }
            cur = next;
        }
        None
    }

    /// The variables of a DATASEC (`.data..percpu`): name -> offset in the
    /// section.
    pub fn datasec_vars(&self, section: &str) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        for t in &self.types[1..] {
            if t.kind != DATASEC || self.name(t.name_off) != section.as_bytes() {
                continue;
            }
            for i in 0..usize::from(t.vlen) {
                let (var, off) = (self.word(t, 3 * i), self.word(t, 3 * i + 1));
                let Some(v) = self.ty(var).filter(|v| v.kind == VAR) else { continue };
                let name = String::from_utf8_lossy(self.name(v.name_off)).into_owned();
                out.entry(name).or_insert(u64::from(off));
            }
        }
        out
    }
}

/// A minimal BTF writer for tests (of this crate and of its users): types
/// are added in order, ids from 1.
#[doc(hidden)]
#[derive(Debug, Default)]
pub struct BtfWriter {
    types: Vec<u8>,
    strings: Vec<u8>,
    next: u32,
}

#[doc(hidden)]
impl BtfWriter {
    pub fn new() -> Self {
        BtfWriter { types: Vec::new(), strings: vec![0], next: 1 }
    }
    pub fn str(&mut self, s: &str) -> u32 {
        if s.is_empty() {
            return 0;
        }
        let off = self.strings.len() as u32;
        self.strings.extend_from_slice(s.as_bytes());
        self.strings.push(0);
        off
    }
    fn rec(&mut self, name: &str, kind: u8, vlen: u16, kflag: bool, st: u32, extra: &[u32]) -> u32 {
        let n = self.str(name);
        let info = u32::from(vlen) | u32::from(kind) << 24 | u32::from(kflag) << 31;
        for w in [n, info, st].iter().chain(extra) {
            self.types.extend_from_slice(&w.to_le_bytes());
        }
        self.next += 1;
        self.next - 1
    }
    pub fn int(&mut self, name: &str, size: u32) -> u32 {
        self.rec(name, INT, 0, false, size, &[size * 8])
    }
    pub fn ptr(&mut self, to: u32) -> u32 {
        self.rec("", PTR, 0, false, to, &[])
    }
    pub fn array(&mut self, elem: u32, index: u32, n: u32) -> u32 {
        self.rec("", ARRAY, 0, false, 0, &[elem, index, n])
    }
    pub fn typedef(&mut self, name: &str, to: u32) -> u32 {
        self.rec(name, TYPEDEF, 0, false, to, &[])
    }
    /// Members: (name, type, bit offset, bitfield size).
    pub fn structure(&mut self, name: &str, union: bool, size: u32, members: &[(&str, u32, u32, u32)]) -> u32 {
        let kflag = members.iter().any(|m| m.3 != 0);
        let mut extra = Vec::new();
        for (n, t, off, bits) in members {
            extra.push(self.str(n));
            extra.push(*t);
            extra.push(if kflag { bits << 24 | off } else { *off });
        }
        let kind = if union { UNION } else { STRUCT };
        self.rec(name, kind, members.len() as u16, kflag, size, &extra)
    }
    pub fn var(&mut self, name: &str, ty: u32) -> u32 {
        self.rec(name, VAR, 0, false, ty, &[1])
    }
    /// Vars: (var id, offset, size).
    pub fn datasec(&mut self, name: &str, size: u32, vars: &[(u32, u32, u32)]) -> u32 {
        let extra: Vec<u32> = vars.iter().flat_map(|v| [v.0, v.1, v.2]).collect();
        self.rec(name, DATASEC, vars.len() as u16, false, size, &extra)
    }
    pub fn finish(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&MAGIC.to_le_bytes());
        out.extend_from_slice(&[1, 0]);
        for w in [24u32, 0, self.types.len() as u32, self.types.len() as u32, self.strings.len() as u32] {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out.extend_from_slice(&self.types);
        out.extend_from_slice(&self.strings);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_follow_the_dwarf_rules() {
        let mut w = BtfWriter::new();
        let int = w.int("int", 4);
        let long = w.int("long unsigned int", 8);
        let p = w.ptr(0);
        let char_ = w.int("char", 1);
        let arr = w.array(char_, int, 16);
        let thread = w.structure("thread_struct", false, 16, &[("ip", long, 0, 0), ("sp", long, 64, 0)]);
        let anon = w.structure("", false, 8, &[("inner_a", int, 0, 0), ("inner_b", int, 32, 0)]);
        let u = w.structure("", true, 8, &[("lo", int, 0, 0), ("", anon, 0, 0)]);
        let task = w.structure(
            "task_struct",
            false,
            64,
            &[
                ("__state", int, 0, 0),
                ("flags", int, 36, 3),
                ("", u, 64, 0),
                ("comm", arr, 128, 0),
                ("stack", p, 256, 0),
                ("thread", thread, 320, 0),
            ],
        );
        let td = w.typedef("task_t", task);
        let v = w.var("runqueues", long);
        w.datasec(".data..percpu", 64, &[(v, 0x2c0, 8)]);
        let _ = td;
        let data = w.finish();
        let btf = Btf::parse(&data).unwrap();
        let l = btf.layouts(&[("task_struct", vec!["thread.sp"]), ("task_t", vec![]), ("nope", vec![])]);
        let t = &l["task_struct"];
        assert_eq!(t.size, 64);
        assert_eq!(t.members["__state"], Member { offset: 0, size: 4, bit_offset: None, bit_size: None });
        assert_eq!(t.members["flags"], Member { offset: 4, size: 4, bit_offset: Some(4), bit_size: Some(3) });
        assert_eq!(t.members["lo"].offset, 8);
        assert_eq!(t.members["inner_b"].offset, 12);
        assert_eq!(t.members["comm"], Member { offset: 16, size: 16, bit_offset: None, bit_size: None });
        assert_eq!(t.members["stack"].size, 8);
        assert_eq!(t.members["thread.sp"].offset, 48);
        assert_eq!(l["task_t"].members.len() + 1, t.members.len(), "the same but for the path");
        assert!(!l.contains_key("nope"));
        assert_eq!(btf.datasec_vars(".data..percpu")["runqueues"], 0x2c0);
    }

    #[test]
    fn corrupt_headers_are_errors() {
        assert!(matches!(Btf::parse(b""), Err(BtfError::Header(_))));
        assert!(matches!(Btf::parse(&[0, 0, 1, 0]), Err(BtfError::Magic(0))));
        let mut d = BtfWriter::new().finish();
        d[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(Btf::parse(&d), Err(BtfError::Header(_))));
    }
}
