//! Struct layouts from `.debug_info`.
//!
//! The scan visits units in order and, in each, only the top-level DIEs
//! (children of the unit DIE): a DIE that is not a wanted struct, union or
//! typedef is stepped over whole, through its `DW_AT_sibling` when it has one.
//! Only the definition of a wanted type (one with `DW_AT_byte_size`, not a
//! `DW_AT_declaration`) is read member by member. The scan stops as soon as
//! every wanted type has been found; the caller is told how far it got so it
//! can drop the pages it no longer needs.
//!
//! Input is untrusted: every reference is bounds-checked by gimli, sibling
//! pointers must move forward, and type chains are followed at most
//! [`MAX_HOPS`] times, so a corrupt file gives an error or a missing item,
//! never a panic or an endless loop.

use std::collections::{BTreeMap, HashMap};

use gimli::{
    constants, Abbreviations, AttributeValue, EndianSlice, RunTimeEndian, UnitHeader, UnitOffset,
};

use crate::profile::{Member, Range, TypeLayout};

pub(crate) type R<'a> = EndianSlice<'a, RunTimeEndian>;

/// Pages of `.debug_info` are handed back in steps of this many bytes.
const RELEASE_STEP: usize = 8 << 20;

/// Most members (at all nesting levels) visited for one struct.
const MAX_MEMBERS: usize = 1 << 16;

/// Most address ranges recorded for one compile unit.
pub const MAX_UNIT_RANGES: usize = 64;

/// Longest typedef/qualifier chain or anonymous-member nesting followed.
const MAX_HOPS: usize = 64;

/// A wanted type: its name and the member paths asked for.
pub(crate) struct TypeRequest<'w> {
    pub name: &'w str,
    pub paths: Vec<&'w str>,
}

/// A DIE anywhere in `.debug_info`: its unit and its offset in the unit.
#[derive(Clone, Copy)]
struct DieRef<'u, 'a> {
    unit: &'u UnitCtx<'a>,
    offset: UnitOffset<usize>,
}

impl<'u, 'a> DieRef<'u, 'a> {
    /// A raw cursor at this DIE, its abbreviation read, attributes next.
    fn entry(&self) -> gimli::Result<(gimli::EntriesRaw<'u, 'u, R<'a>>, &'u gimli::Abbreviation)> {
        let mut raw = self.unit.header.entries_raw(&self.unit.abbrevs, Some(self.offset))?;
        let ab = raw.read_abbreviation()?.ok_or(gimli::Error::NoEntryAtGivenOffset)?;
        Ok((raw, ab))
    }
}

/// One unit with its abbreviations.
struct UnitCtx<'a> {
    header: UnitHeader<R<'a>>,
    abbrevs: std::sync::Arc<Abbreviations>,
    /// `DW_AT_str_offsets_base` of the unit DIE, for `DW_FORM_strx*` names
    /// (Clang's DWARF 5).
    str_offsets_base: Option<gimli::DebugStrOffsetsBase<usize>>,
}

impl<'a> UnitCtx<'a> {
    fn new(header: UnitHeader<R<'a>>, abbrevs: std::sync::Arc<Abbreviations>) -> gimli::Result<Self> {
        let mut str_offsets_base = None;
        let mut raw = header.entries_raw(&abbrevs, None)?;
        if let Some(ab) = raw.read_abbreviation()? {
            for spec in ab.attributes() {
                let attr = raw.read_attribute(*spec)?;
                if let AttributeValue::DebugStrOffsetsBase(b) = attr.value() {
                    str_offsets_base = Some(b);
                }
            }
        }
        Ok(Self { header, abbrevs, str_offsets_base })
    }
}

/// The attributes of a DIE that layouts need.
struct DieAttrs<'a> {
    tag: constants::DwTag,
    name: Option<&'a [u8]>,
    byte_size: Option<u64>,
    bit_size: Option<u64>,
    data_bit_offset: Option<u64>,
    /// DWARF 4 (big-endian numbering) `DW_AT_bit_offset`.
    bit_offset: Option<u64>,
    member_location: Option<u64>,
    ty: Option<UnitOffset<usize>>,
    declaration: bool,
    count: Option<u64>,
    lower_bound: Option<u64>,
    upper_bound: Option<u64>,
}

/// The scanner over one file's DWARF.
pub(crate) struct Scanner<'a> {
    dwarf: gimli::Dwarf<R<'a>>,
    endian: RunTimeEndian,
}

impl<'a> Scanner<'a> {
    pub fn new(dwarf: gimli::Dwarf<R<'a>>, endian: RunTimeEndian) -> Self {
        Self { dwarf, endian }
    }

    /// Finds the wanted types. `release` is given ranges of `.debug_info`
    /// the scan has passed and will not read again, so the caller can drop
    /// their pages.
    pub fn scan(
        &self,
        wanted: &[TypeRequest<'_>],
        release: &mut dyn FnMut(std::ops::Range<usize>),
    ) -> Result<BTreeMap<String, TypeLayout>, (u64, gimli::Error)> {
        let names: Vec<&str> = wanted.iter().map(|w| w.name).collect();
        let present = self.names_present(&names, release);
        let mut by_name: HashMap<&[u8], usize> = HashMap::new();
        for (i, w) in wanted.iter().enumerate() {
            if present[i] {
                by_name.entry(w.name.as_bytes()).or_insert(i);
            }
        }
        let mut released = 0usize;
        let mut found: Vec<Option<TypeLayout>> = wanted.iter().map(|_| None).collect();
        let mut remaining = by_name.len();
        let mut units = self.dwarf.units();
        let mut unit_start = 0usize;
        while remaining > 0 {
            let header = match units.next() {
                Ok(Some(h)) => h,
                Ok(None) => break,
                Err(e) => return Err((unit_start as u64, e)),
            };
            unit_start = header.offset().as_debug_info_offset().map_or(0, |o| o.0);
            let err = |e| (unit_start as u64, e);
            let abbrevs = self.dwarf.abbreviations(&header).map_err(err)?;
            let unit = UnitCtx::new(header, abbrevs).map_err(err)?;
            let hits = self.scan_unit(&unit, &by_name, &found).map_err(err)?;
            for (idx, offset) in hits {
                if found[idx].is_some() {
                    continue;
                }
                let die = DieRef {
                    unit: &unit,
                    offset,
                };
                if let Some(layout) = self.layout(die, &wanted[idx].paths).map_err(err)? {
                    found[idx] = Some(layout);
                    remaining -= 1;
                }
            }
            let next = unit_start + unit.header.length_including_self();
            if next - released >= RELEASE_STEP {
                release(released..next);
                released = next;
            }
        }
        Ok(wanted
            .iter()
            .zip(found)
            .filter_map(|(w, f)| f.map(|f| (w.name.to_owned(), f)))
            .collect())
    }

    /// The code address ranges of the compile units named in `names`
    /// (`"mm/slub.c"`; a unit's `DW_AT_name` matches when it is the name
    /// or ends with `/` and the name, as an out-of-tree build writes it),
    /// from `DW_AT_low_pc`/`DW_AT_high_pc` or `DW_AT_ranges`, sorted, empty
    /// ranges dropped. Looks at the unit DIE only, at most `max_units`
    /// units and [`MAX_UNIT_RANGES`] ranges a unit; stops when every name
    /// is found. A name no unit has is left out.
    pub fn unit_ranges(&self, names: &[&str], max_units: usize) -> BTreeMap<String, Vec<Range>> {
        let mut found: BTreeMap<String, Vec<Range>> = BTreeMap::new();
        let mut units = self.dwarf.units();
        for _ in 0..max_units {
            if found.len() == names.len() {
                break;
            }
            let Ok(Some(header)) = units.next() else { break };
            let Ok(unit) = self.dwarf.unit(header) else { continue };
            let Some(name) = unit.name.map(|n| n.slice()) else { continue };
            let Some(&wanted) = names.iter().find(|w| {
                let w = w.as_bytes();
                name == w || (name.ends_with(w) && name[..name.len() - w.len()].ends_with(b"/"))
            }) else {
                continue;
            };
            if found.contains_key(wanted) {
                continue;
            }
            let Ok(mut it) = self.dwarf.unit_ranges(&unit) else { continue };
            let mut ranges = Vec::new();
            while let Ok(Some(r)) = it.next() {
                if ranges.len() == MAX_UNIT_RANGES {
                    break;
                }
                if r.end > r.begin {
                    ranges.push(Range { start: r.begin, end: r.end });
                }
            }
            ranges.sort_by_key(|r| r.start);
            found.insert(wanted.to_owned(), ranges);
        }
        found
    }

    /// The `DW_AT_producer` of the first compiled-C unit (assembler units,
    /// `GNU AS ...`, are skipped), looking at no more than `max_units`
    /// unit DIEs: the compiler and the options that shaped every layout.
    pub fn c_producer(&self, max_units: usize) -> Option<String> {
        let mut units = self.dwarf.units();
        for _ in 0..max_units {
            let header = units.next().ok()??;
            // `Unit` resolves every string form (`strp`, `line_strp`,
            // Clang's `strx` through the unit's string offsets).
            let Ok(unit) = self.dwarf.unit(header) else { continue };
            let mut entries = unit.entries();
            let Ok(Some((_, die))) = entries.next_dfs() else { continue };
            let Ok(Some(value)) = die.attr_value(constants::DW_AT_producer) else { continue };
            let Ok(p) = self.dwarf.attr_string(&unit, value) else { continue };
            let p = String::from_utf8_lossy(p.slice());
            if !p.starts_with("GNU AS") {
                return Some(p.into_owned());
            }
        }
        None
    }

    /// Whether each name can be the name of a DIE at all. A DIE's name is a
    /// string in `.debug_str` or `.debug_line_str`, or inline in
    /// `.debug_info`; a name whose bytes (with the NUL) occur in none of them
    /// is certainly absent, and the scan need not run to the end to prove it
    /// (an optional type such as `pcpu_hot` on a kernel that lacks it).
    fn names_present(
        &self,
        names: &[&str],
        release: &mut dyn FnMut(std::ops::Range<usize>),
    ) -> Vec<bool> {
        use gimli::Section;
        let needles: Vec<Vec<u8>> = names
            .iter()
            .map(|n| [n.as_bytes(), b"\0"].concat())
            .collect();
        let finders: Vec<memchr::memmem::Finder> =
            needles.iter().map(memchr::memmem::Finder::new).collect();
        let strings = [
            self.dwarf.debug_str.reader().slice(),
            self.dwarf.debug_line_str.reader().slice(),
        ];
        let mut present: Vec<bool> = finders
            .iter()
            .map(|f| strings.iter().any(|s| f.find(s).is_some()))
            .collect();
        let info = self.dwarf.debug_info.reader().slice();
        let longest = needles.iter().map(Vec::len).max().unwrap_or(0);
        let mut start = 0;
        while start < info.len() && present.iter().any(|p| !p) {
            let end = start.saturating_add(RELEASE_STEP).min(info.len());
            let window = &info[start..end.saturating_add(longest).min(info.len())];
            for (p, f) in present.iter_mut().zip(&finders) {
                *p = *p || f.find(window).is_some();
            }
            release(start..end);
            start = end;
        }
        present
    }

    /// The top-level struct/union/typedef DIEs of one unit whose names are
    /// wanted and not found yet: `(request index, offset)`.
    fn scan_unit(
        &self,
        unit: &UnitCtx<'a>,
        by_name: &HashMap<&[u8], usize>,
        found: &[Option<TypeLayout>],
    ) -> gimli::Result<Vec<(usize, UnitOffset<usize>)>> {
        let mut hits = Vec::new();
        let mut raw = unit.header.entries_raw(&unit.abbrevs, None)?;
        // The unit DIE itself.
        match raw.read_abbreviation()? {
            Some(ab) => {
                raw.skip_attributes(ab.attributes())?;
                if !ab.has_children() {
                    return Ok(hits);
                }
            }
            None => return Ok(hits),
        }
        // `raw` now sits on the first child; every iteration reads one
        // top-level DIE and leaves `raw` on the next one.
        while !raw.is_empty() {
            let here = raw.next_offset();
            let Some(ab) = raw.read_abbreviation()? else {
                break; // end of the unit's children
            };
            let tag = ab.tag();
            let interesting = matches!(
                tag,
                constants::DW_TAG_structure_type
                    | constants::DW_TAG_union_type
                    | constants::DW_TAG_typedef
            );
            if !interesting && !ab.has_children() {
                raw.skip_attributes(ab.attributes())?;
                continue;
            }
            let mut sibling = None;
            let mut name = None;
            let mut declaration = false;
            for spec in ab.attributes() {
                let attr = raw.read_attribute(*spec)?;
                match attr.name() {
                    constants::DW_AT_sibling => {
                        if let AttributeValue::UnitRef(o) = attr.value() {
                            sibling = Some(o);
                        }
                    }
                    constants::DW_AT_name if interesting => {
                        name = self.string(unit, attr.value())
                    }
                    constants::DW_AT_declaration => declaration = true,
                    _ => {}
                }
            }
            if let (Some(n), false) = (name, declaration) {
                if let Some(&idx) = by_name.get(n) {
                    if found[idx].is_none() {
                        hits.push((idx, here));
                    }
                }
            }
            if ab.has_children() {
                match sibling {
                    // Only ever jump forward: a corrupt sibling could loop.
                    Some(s) if s.0 > here.0 => {
                        raw = unit.header.entries_raw(&unit.abbrevs, Some(s))?
                    }
                    _ => skip_children(&mut raw)?,
                }
            }
        }
        Ok(hits)
    }

    /// A string attribute's bytes, for the forms a linked vmlinux uses.
    fn string(&self, unit: &UnitCtx<'a>, value: AttributeValue<R<'a>>) -> Option<&'a [u8]> {
        match value {
            AttributeValue::DebugStrOffsetsIndex(i) => {
                let base = unit.str_offsets_base?;
                let o = self
                    .dwarf
                    .debug_str_offsets
                    .get_str_offset(unit.header.format(), base, i)
                    .ok()?;
                self.dwarf.debug_str.get_str(o).ok().map(|s| s.slice())
            }
            AttributeValue::String(s) => Some(s.slice()),
            AttributeValue::DebugStrRef(o) => {
                self.dwarf.debug_str.get_str(o).ok().map(|s| s.slice())
            }
            AttributeValue::DebugLineStrRef(o) => {
                self.dwarf.debug_line_str.get_str(o).ok().map(|s| s.slice())
            }
            _ => None,
        }
    }

    /// Reads the attributes of the DIE at `die`.
    fn attrs(&self, die: DieRef<'_, 'a>) -> gimli::Result<DieAttrs<'a>> {
        let (mut raw, ab) = die.entry()?;
        let mut a = DieAttrs {
            tag: ab.tag(),
            name: None,
            byte_size: None,
            bit_size: None,
            data_bit_offset: None,
            bit_offset: None,
            member_location: None,
            ty: None,
            declaration: false,
            count: None,
            lower_bound: None,
            upper_bound: None,
        };
        for spec in ab.attributes() {
            let attr = raw.read_attribute(*spec)?;
            let value = attr.value();
            match attr.name() {
                constants::DW_AT_name => a.name = self.string(die.unit, value),
                constants::DW_AT_byte_size => a.byte_size = value.udata_value(),
                constants::DW_AT_bit_size => a.bit_size = value.udata_value(),
                constants::DW_AT_data_bit_offset => a.data_bit_offset = value.udata_value(),
                constants::DW_AT_bit_offset => a.bit_offset = value.udata_value(),
                constants::DW_AT_data_member_location => {
                    a.member_location = match value {
                        AttributeValue::Exprloc(e) => plus_uconst(e.0),
                        v => v.udata_value(),
                    }
                }
                constants::DW_AT_type => {
                    // A section-relative reference is followed when it
                    // stays in this unit; GCC and Clang without LTO emit
                    // nothing else for types.
                    a.ty = match value {
                        AttributeValue::UnitRef(o) => Some(o),
                        AttributeValue::DebugInfoRef(o) => o.to_unit_offset(&die.unit.header),
                        _ => None,
                    }
                }
                constants::DW_AT_declaration => a.declaration = true,
                constants::DW_AT_count => a.count = value.udata_value(),
                constants::DW_AT_lower_bound => a.lower_bound = value.udata_value(),
                constants::DW_AT_upper_bound => a.upper_bound = value.udata_value(),
                _ => {}
            }
        }
        Ok(a)
    }

    /// The offsets of the direct children of `die`.
    fn children(&self, die: DieRef<'_, 'a>) -> gimli::Result<Vec<UnitOffset<usize>>> {
        let mut out = Vec::new();
        let (mut raw, ab) = die.entry()?;
        raw.skip_attributes(ab.attributes())?;
        if !ab.has_children() {
            return Ok(out);
        }
        while !raw.is_empty() {
            let here = raw.next_offset();
            let Some(ab) = raw.read_abbreviation()? else {
                break;
            };
            out.push(here);
            raw.skip_attributes(ab.attributes())?;
            if ab.has_children() {
                skip_children(&mut raw)?;
            }
        }
        Ok(out)
    }

    /// Strips typedefs and qualifiers: the DIE that gives a type its shape.
    fn peel<'u>(&self, mut die: DieRef<'u, 'a>) -> gimli::Result<(DieRef<'u, 'a>, DieAttrs<'a>)> {
        for _ in 0..MAX_HOPS {
            let a = self.attrs(die)?;
            match a.tag {
                constants::DW_TAG_typedef
                | constants::DW_TAG_const_type
                | constants::DW_TAG_volatile_type
                | constants::DW_TAG_restrict_type
                | constants::DW_TAG_atomic_type
                | constants::DW_TAG_immutable_type
                | constants::DW_TAG_packed_type => match a.ty {
                    Some(o) => {
                        die = DieRef {
                            unit: die.unit,
                            offset: o,
                        }
                    }
                    _ => return Ok((die, a)),
                },
                _ => return Ok((die, a)),
            }
        }
        // A cycle (only in corrupt input): give back a DIE that is no type
        // shape, so the type is reported missing rather than looped on.
        let a = self.attrs(die)?;
        Ok((
            die,
            DieAttrs {
                tag: constants::DW_TAG_null,
                byte_size: None,
                ..a
            },
        ))
    }

    /// Size in bytes of the type at `die`, or `None` if it has none (void,
    /// functions) or the chain is unresolvable.
    fn type_size(&self, die: DieRef<'_, 'a>) -> gimli::Result<Option<u64>> {
        self.type_size_at(die, 0)
    }

    fn type_size_at(&self, die: DieRef<'_, 'a>, depth: usize) -> gimli::Result<Option<u64>> {
        if depth > MAX_HOPS {
            return Ok(None); // a cycle in corrupt input: size unknown
        }
        let (die, a) = self.peel(die)?;
        if let Some(s) = a.byte_size {
            return Ok(Some(s));
        }
        match a.tag {
            constants::DW_TAG_pointer_type
            | constants::DW_TAG_reference_type
            | constants::DW_TAG_rvalue_reference_type => {
                Ok(Some(u64::from(die.unit.header.address_size())))
            }
            constants::DW_TAG_array_type => {
                let Some(elem) = a.ty else { return Ok(None) };
                let Some(elem_size) = self.type_size_at(
                    DieRef {
                        unit: die.unit,
                        offset: elem,
                    },
                    depth + 1,
                )?
                else {
                    return Ok(None);
                };
                let mut n: u64 = 1;
                for child in self.children(die)? {
                    let c = self.attrs(DieRef {
                        unit: die.unit,
                        offset: child,
                    })?;
                    if c.tag != constants::DW_TAG_subrange_type {
                        continue;
                    }
                    let count = match (c.count, c.upper_bound) {
                        (Some(c), _) => c,
                        (None, Some(u)) => {
                            u.wrapping_sub(c.lower_bound.unwrap_or(0)).wrapping_add(1)
                        }
                        (None, None) => 0, // flexible array member
                    };
                    n = n.saturating_mul(count);
                }
                Ok(Some(elem_size.saturating_mul(n)))
            }
            constants::DW_TAG_enumeration_type => match a.ty {
                Some(o) => self.type_size_at(
                    DieRef {
                        unit: die.unit,
                        offset: o,
                    },
                    depth + 1,
                ),
                _ => Ok(None),
            },
            _ => Ok(None),
        }
    }

    /// The layout of the struct/union (or typedef of one) at `die`: every
    /// named member, members of anonymous structs and unions flattened into
    /// their parent as C does, plus the nested `paths` asked for. Returns the
    /// paths that do not exist. `None` if `die` is not a complete struct.
    fn layout(&self, die: DieRef<'_, 'a>, paths: &[&str]) -> gimli::Result<Option<TypeLayout>> {
        let (die, a) = self.peel(die)?;
        let (Some(size), false) = (a.byte_size, a.declaration) else {
            return Ok(None);
        };
        if !matches!(
            a.tag,
            constants::DW_TAG_structure_type | constants::DW_TAG_union_type
        ) {
            return Ok(None);
        }
        let mut members = BTreeMap::new();
        let mut types = HashMap::new();
        self.collect_members(die, 0, 0, &mut members, &mut types)?;
        for &path in paths {
            if !members.contains_key(path) && path.contains('.') {
                if let Some(m) = self.resolve_path(die, path)? {
                    members.insert(path.to_owned(), m);
                }
            }
        }
        Ok(Some(TypeLayout { size, members }))
    }

    /// Adds the named members of the struct/union at `die` to `out`, offsets
    /// plus `base`; recurses into anonymous struct/union members.
    fn collect_members(
        &self,
        die: DieRef<'_, 'a>,
        base: u64,
        depth: usize,
        out: &mut BTreeMap<String, Member>,
        types: &mut HashMap<String, UnitOffset<usize>>,
    ) -> gimli::Result<()> {
        let mut budget = MAX_MEMBERS;
        self.collect_members_at(die, base, depth, out, types, &mut budget)
    }

    /// [`Self::collect_members`] with a bound on nesting and on the members
    /// visited in all: corrupt input could nest anonymous members in a cycle
    /// or in a tree that doubles at every level.
    fn collect_members_at(
        &self,
        die: DieRef<'_, 'a>,
        base: u64,
        depth: usize,
        out: &mut BTreeMap<String, Member>,
        types: &mut HashMap<String, UnitOffset<usize>>,
        budget: &mut usize,
    ) -> gimli::Result<()> {
        if depth > MAX_HOPS {
            return Ok(());
        }
        for child in self.children(die)? {
            if *budget == 0 {
                return Ok(());
            }
            *budget -= 1;
            let cdie = DieRef {
                unit: die.unit,
                offset: child,
            };
            let c = self.attrs(cdie)?;
            if c.tag != constants::DW_TAG_member {
                continue;
            }
            let Some(ty) = c.ty else { continue };
            let tdie = DieRef {
                unit: die.unit,
                offset: ty,
            };
            let Some(m) = self.member(&c, tdie, base)? else {
                continue;
            };
            match c.name {
                Some(name) => {
                    let name = String::from_utf8_lossy(name).into_owned();
                    types.insert(name.clone(), ty);
                    out.insert(name, m);
                }
                None if c.bit_size.is_none() => {
                    let (inner, ia) = self.peel(tdie)?;
                    if matches!(
                        ia.tag,
                        constants::DW_TAG_structure_type | constants::DW_TAG_union_type
                    ) {
                        self.collect_members_at(inner, m.offset, depth + 1, out, types, budget)?;
                    }
                }
                None => {} // unnamed padding bitfield
            }
        }
        Ok(())
    }

    /// One member's placement. Bitfields are given as pahole does: the
    /// storage unit (the member type's size, aligned) holding the bits, and
    /// the bit offset inside it counted from its least significant bit on
    /// little-endian targets.
    fn member(
        &self,
        c: &DieAttrs<'a>,
        ty: DieRef<'_, 'a>,
        base: u64,
    ) -> gimli::Result<Option<Member>> {
        let size = self.type_size(ty)?.unwrap_or(0);
        let Some(bits) = c.bit_size else {
            // Union members have no location: they sit at 0.
            let off = c.member_location.unwrap_or(0);
            return Ok(Some(Member {
                offset: base.saturating_add(off),
                size,
                bit_offset: None,
                bit_size: None,
            }));
        };
        let loc = c.member_location.unwrap_or(0);
        let abs_bits = match (c.data_bit_offset, c.bit_offset) {
            (Some(d), _) => d,
            (None, Some(b)) => {
                let storage = c.byte_size.unwrap_or(size);
                if self.endian == RunTimeEndian::Little {
                    (loc.saturating_mul(8)
                        .saturating_add(storage.saturating_mul(8)))
                    .saturating_sub(b.saturating_add(bits))
                } else {
                    loc.saturating_mul(8).saturating_add(b)
                }
            }
            (None, None) => loc.saturating_mul(8),
        };
        let unit_bits = size.saturating_mul(8).max(8);
        let unit_off = abs_bits / unit_bits * (unit_bits / 8);
        Ok(Some(Member {
            offset: base.saturating_add(unit_off),
            size,
            bit_offset: Some(abs_bits - unit_off * 8),
            bit_size: Some(bits),
        }))
    }

    /// Resolves a dotted member path (`thread.sp`) from the struct at `die`.
    fn resolve_path(&self, die: DieRef<'_, 'a>, path: &str) -> gimli::Result<Option<Member>> {
        let mut cur = die;
        let mut base = 0u64;
        let mut parts = path.split('.').peekable();
        while let Some(part) = parts.next() {
            let mut members = BTreeMap::new();
            let mut types = HashMap::new();
            self.collect_members(cur, 0, 0, &mut members, &mut types)?;
            let (Some(m), Some(&ty)) = (members.get(part), types.get(part)) else {
                return Ok(None);
            };
            if parts.peek().is_none() {
                return Ok(Some(Member {
                    offset: base.saturating_add(m.offset),
                    ..m.clone()
                }));
            }
            base = base.saturating_add(m.offset);
            let (next, a) = self.peel(DieRef {
                unit: cur.unit,
                offset: ty,
            })?;
            if !matches!(
                a.tag,
                constants::DW_TAG_structure_type | constants::DW_TAG_union_type
            ) {
                return Ok(None);
            }
            cur = DieRef {
                unit: cur.unit,
                offset: next.offset,
            };
        }
        Ok(None)
    }
}

/// Skips the children of the DIE just read (its attributes already consumed).
fn skip_children(raw: &mut gimli::EntriesRaw<'_, '_, R<'_>>) -> gimli::Result<()> {
    let target = raw.next_depth() - 1;
    while raw.next_depth() > target {
        if raw.is_empty() {
            return Err(gimli::Error::UnexpectedEof(gimli::ReaderOffsetId(0)));
        }
        if let Some(ab) = raw.read_abbreviation()? {
            raw.skip_attributes(ab.attributes())?;
        }
    }
    Ok(())
}

/// The constant of a `DW_OP_plus_uconst N` location (old-style member offsets).
fn plus_uconst(expr: R<'_>) -> Option<u64> {
    let mut r = expr;
    use gimli::Reader;
    let op = r.read_u8().ok()?;
    if op != constants::DW_OP_plus_uconst.0 {
        return None;
    }
    r.read_uleb128().ok()
}
