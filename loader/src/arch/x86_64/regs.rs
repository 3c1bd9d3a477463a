//! The x86_64 register file as QEMU's gdbstub numbers it.
//!
//! QEMU describes its registers in a target description
//! (`qXfer:features:read:target.xml`, which includes `i386-64bit.xml`).
//! [`RegLayout::from_target_xml`] reads it at run time, so a QEMU that
//! adds or reorders registers still works; [`RegLayout::qemu_x86_64`] is
//! the layout of QEMU 7.2 (measured), used when the stub has no XML.
//!
//! QEMU 7.2 numbering: rax..r15 0-15, rip 16, eflags 17 (32 bits), cs ss ds
//! es fs gs 18-23 (32 bits), fs_base 24, gs_base 25, k_gs_base 26, cr0 27,
//! cr2 28, cr3 29, cr4 30, cr8 31, efer 32, st0-7 33-40 (80 bits), fctrl..fop
//! 41-48, xmm0-15 49-64, mxcsr 65. IDTR, GDTR and other MSRs are absent.

use crate::access::AccessError;
use repair_kernel::contract::CpuState;

/// One register of the remote target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegDesc {
    pub name: String,
    /// Register number for `p`/`P`.
    pub regnum: u32,
    pub bitsize: u32,
    /// Byte offset in the `g`/`G` block.
    pub offset: usize,
}

/// The registers of a target, in `g` order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegLayout {
    pub regs: Vec<RegDesc>,
}

/// The registers [`CpuState`] holds, by their target-description names.
pub const CPU_STATE_REGS: [&str; 32] = [
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11", "r12", "r13",
    "r14", "r15", "rip", "eflags", "cs", "ss", "ds", "es", "fs", "gs", "fs_base", "gs_base",
    "k_gs_base", "cr0", "cr2", "cr3", "cr4", "efer",
];

/// The [`CpuState`] field holding the register named `name` (target
/// description spelling: `eflags` is `rflags`, `k_gs_base` is
/// `kernel_gs_base`).
pub fn field_mut<'a>(s: &'a mut CpuState, name: &str) -> Option<&'a mut u64> {
    Some(match name {
        "rax" => &mut s.rax,
        "rbx" => &mut s.rbx,
        "rcx" => &mut s.rcx,
        "rdx" => &mut s.rdx,
        "rsi" => &mut s.rsi,
        "rdi" => &mut s.rdi,
        "rbp" => &mut s.rbp,
        "rsp" => &mut s.rsp,
        "r8" => &mut s.r8,
        "r9" => &mut s.r9,
        "r10" => &mut s.r10,
        "r11" => &mut s.r11,
        "r12" => &mut s.r12,
        "r13" => &mut s.r13,
        "r14" => &mut s.r14,
        "r15" => &mut s.r15,
        "rip" => &mut s.rip,
        "eflags" => &mut s.rflags,
        "cs" => &mut s.cs,
        "ss" => &mut s.ss,
        "ds" => &mut s.ds,
        "es" => &mut s.es,
        "fs" => &mut s.fs,
        "gs" => &mut s.gs,
        "fs_base" => &mut s.fs_base,
        "gs_base" => &mut s.gs_base,
        "k_gs_base" => &mut s.kernel_gs_base,
        "cr0" => &mut s.cr0,
        "cr2" => &mut s.cr2,
        "cr3" => &mut s.cr3,
        "cr4" => &mut s.cr4,
        "efer" => &mut s.efer,
        _ => return None,
    })
}

/// Read-only twin of [`field_mut`].
pub fn field(s: &CpuState, name: &str) -> Option<u64> {
    let mut c = *s;
    field_mut(&mut c, name).map(|v| *v)
}

impl RegLayout {
    /// QEMU 7.2's x86_64 layout (from its `i386-64bit.xml`).
    pub fn qemu_x86_64() -> Self {
        let mut regs: Vec<(String, u32)> = Vec::new();
        for n in CPU_STATE_REGS[..27].iter().copied() {
            let bits = if n == "eflags" || ["cs", "ss", "ds", "es", "fs", "gs"].contains(&n) { 32 } else { 64 };
            regs.push((n.into(), bits));
        }
        for n in ["cr0", "cr2", "cr3", "cr4", "cr8", "efer"] {
            regs.push((n.into(), 64));
        }
        for i in 0..8 {
            regs.push((format!("st{i}"), 80));
        }
        for n in ["fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff", "fop"] {
            regs.push((n.into(), 32));
        }
        for i in 0..16 {
            regs.push((format!("xmm{i}"), 128));
        }
        regs.push(("mxcsr".into(), 32));
        Self::from_list(regs.into_iter().map(|(n, b)| (n, None, b)))
    }

    fn from_list(list: impl IntoIterator<Item = (String, Option<u32>, u32)>) -> Self {
        let mut regs = Vec::new();
        let (mut next, mut offset) = (0u32, 0usize);
        for (name, regnum, bitsize) in list {
            let regnum = regnum.unwrap_or(next);
            regs.push(RegDesc { name, regnum, bitsize, offset });
            next = regnum + 1;
            offset += (bitsize as usize).div_ceil(8);
        }
        Self { regs }
    }

    /// Parses a target description. `fetch` returns the text of an
    /// annex (`target.xml`, then each `xi:include href`). Registers are
    /// numbered in document order unless a `regnum` attribute says
    /// otherwise; commented-out registers are skipped.
    pub fn from_target_xml(
        fetch: &mut dyn FnMut(&str) -> Result<String, AccessError>,
    ) -> Result<Self, TargetXmlError> {
        let mut list = Vec::new();
        collect_regs(fetch, "target.xml", &mut list, 0)?;
        if list.is_empty() {
            return Err(TargetXmlError::Malformed("it names no registers".into()));
        }
        Ok(Self::from_list(list))
    }

    pub fn get(&self, name: &str) -> Option<&RegDesc> {
        self.regs.iter().find(|r| r.name == name)
    }

    /// Size in bytes of the `g` block.
    pub fn g_size(&self) -> usize {
        self.regs.last().map_or(0, |r| r.offset + (r.bitsize as usize).div_ceil(8))
    }

    /// Names of [`CPU_STATE_REGS`] this target lacks.
    pub fn missing(&self) -> Vec<&'static str> {
        CPU_STATE_REGS.iter().copied().filter(|n| self.get(n).is_none()).collect()
    }

    /// A [`CpuState`] from the bytes of a `g` reply (little endian).
    pub fn decode_g(&self, bytes: &[u8]) -> CpuState {
        let mut s = CpuState::default();
        for r in &self.regs {
            if let Some(f) = field_mut(&mut s, &r.name) {
                let n = (r.bitsize as usize / 8).min(8);
                if let Some(b) = bytes.get(r.offset..r.offset + n) {
                    let mut v = [0u8; 8];
                    v[..n].copy_from_slice(b);
                    *f = u64::from_le_bytes(v);
                }
            }
        }
        s
    }
}

fn strip_comments(xml: &str) -> String {
    let mut out = String::with_capacity(xml.len());
    let mut rest = xml;
    while let Some(i) = rest.find("<!--") {
        out.push_str(&rest[..i]);
        match rest[i..].find("-->") {
            Some(j) => rest = &rest[i + j + 3..],
            None => return out,
        }
    }
    out.push_str(rest);
    out
}

fn attr<'a>(tag: &'a str, name: &str) -> Option<&'a str> {
    let mut search = tag;
    loop {
        let i = search.find(name)?;
        let before_ok = i == 0 || search.as_bytes()[i - 1].is_ascii_whitespace();
        let after = &search[i + name.len()..];
        let after_trim = after.trim_start();
        if before_ok && after_trim.starts_with('=') {
            let v = after_trim[1..].trim_start();
            let q = v.chars().next()?;
            if q == '"' || q == '\'' {
                let end = v[1..].find(q)?;
                return Some(&v[1..1 + end]);
            }
            return None;
        }
        search = after;
    }
}

/// Why a gdbstub's target description cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TargetXmlError {
    #[error("reading its {annex}: {source}")]
    Fetch {
        annex: String,
        #[source]
        source: AccessError,
    },
    #[error("{0}")]
    Malformed(String),
}

fn collect_regs(
    fetch: &mut dyn FnMut(&str) -> Result<String, AccessError>,
    annex: &str,
    out: &mut Vec<(String, Option<u32>, u32)>,
    depth: u32,
) -> Result<(), TargetXmlError> {
    let bad = TargetXmlError::Malformed;
    if depth > 8 {
        return Err(bad(format!("includes nest too deep at {annex}")));
    }
    let text = fetch(annex).map_err(|source| TargetXmlError::Fetch { annex: annex.to_string(), source })?;
    let xml = strip_comments(&text);
    let mut rest = xml.as_str();
    while let Some(i) = rest.find('<') {
        rest = &rest[i + 1..];
        let end = rest.find('>').ok_or_else(|| bad(format!("unterminated tag in {annex}")))?;
        let tag = &rest[..end];
        rest = &rest[end + 1..];
        if let Some(t) = tag.strip_prefix("reg").filter(|t| t.starts_with(char::is_whitespace)) {
            let name = attr(t, "name").ok_or_else(|| bad(format!("<reg> without name in {annex}")))?;
            let bits = attr(t, "bitsize")
                .and_then(|b| b.parse().ok())
                .ok_or_else(|| bad(format!("<reg name={name}> without a valid bitsize in {annex}")))?;
            let regnum = attr(t, "regnum").and_then(|b| b.parse().ok());
            out.push((name.to_string(), regnum, bits));
        } else if let Some(t) = tag.strip_prefix("xi:include").filter(|t| t.starts_with(char::is_whitespace)) {
            let href = attr(t, "href").ok_or_else(|| bad(format!("<xi:include> without href in {annex}")))?;
            collect_regs(fetch, href, out, depth + 1)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOP: &str = r#"<?xml version="1.0"?><!DOCTYPE target SYSTEM "gdb-target.dtd"><target><architecture>i386:x86-64</architecture><xi:include href="i386-64bit.xml"/></target>"#;
    const CORE: &str = r#"<feature name="org.gnu.gdb.i386.core">
  <reg name="rax" bitsize="64" type="int64" regnum="0"/>
  <reg name="rbx" bitsize="64" type="int64"/>
  <reg name="eflags" bitsize="32" type="x64_eflags"/>
  <!--reg name="cs_base" bitsize="64" type="int64"/>
  <reg name="ss_base" bitsize="64" type="int64"/-->
  <reg name="fs_base" bitsize="64" type="int64"/>
  <flags id="x64_cr0" size="8"><field name="PG" start="31" end="31"/></flags>
  <reg name="cr3" bitsize="64" type="x64_cr3"/>
</feature>"#;

    #[test]
    fn parses_target_xml_with_includes_and_comments() {
        let l = RegLayout::from_target_xml(&mut |a| match a {
            "target.xml" => Ok(TOP.into()),
            "i386-64bit.xml" => Ok(CORE.into()),
            _ => Err(AccessError::Other(format!("no {a}"))),
        })
        .unwrap();
        let names: Vec<_> = l.regs.iter().map(|r| (r.name.as_str(), r.regnum, r.offset)).collect();
        assert_eq!(
            names,
            [("rax", 0, 0), ("rbx", 1, 8), ("eflags", 2, 16), ("fs_base", 3, 20), ("cr3", 4, 28)]
        );
    }

    #[test]
    fn builtin_layout_matches_qemu_7_2() {
        let l = RegLayout::qemu_x86_64();
        let n = |s: &str| l.get(s).unwrap().regnum;
        assert_eq!((n("rip"), n("eflags"), n("cs"), n("gs")), (16, 17, 18, 23));
        assert_eq!((n("fs_base"), n("gs_base"), n("k_gs_base")), (24, 25, 26));
        assert_eq!((n("cr0"), n("cr2"), n("cr3"), n("cr4"), n("cr8"), n("efer")), (27, 28, 29, 30, 31, 32));
        assert_eq!((n("st0"), n("xmm0"), n("mxcsr")), (33, 49, 65));
        assert_eq!(l.get("fs_base").unwrap().offset, 16 * 8 + 8 + 4 + 6 * 4);
        assert!(l.missing().is_empty());
    }

    #[test]
    fn decodes_g_block() {
        let l = RegLayout::qemu_x86_64();
        let mut g = vec![0u8; l.g_size()];
        g[16 * 8..16 * 8 + 8].copy_from_slice(&0xffff_ffff_8100_0000u64.to_le_bytes());
        let o = l.get("eflags").unwrap().offset;
        g[o..o + 4].copy_from_slice(&0x246u32.to_le_bytes());
        let o = l.get("efer").unwrap().offset;
        g[o..o + 8].copy_from_slice(&0xd01u64.to_le_bytes());
        let s = l.decode_g(&g);
        assert_eq!((s.rip, s.rflags, s.efer), (0xffff_ffff_8100_0000, 0x246, 0xd01));
    }
}
