//! The call-frame rules of the repair kernel's layout
//! ([`Kind::CallFrame`] items): for a caller and a callee, the rule that
//! unwinds the caller's frame at its calls to the callee, read from the
//! vmlinux's own call-frame information (`.debug_frame`, which GCC emits
//! with `-g` for every kernel function) with gimli.
//!
//! The call sites are the `call rel32` instructions in the caller's bytes
//! that reach the callee. Every site must have the same rule, and the rule
//! must be one [`FrameRule`] can say (the CFA at `rsp` or `rbp` plus a
//! positive multiple of 8, the return address at CFA - 8, each
//! callee-saved register unchanged or saved in a word below the CFA);
//! otherwise the item stays absent and the repair kernel says it could not
//! unwind there. A vmlinux without `.debug_frame` (a BTF-only image) leaves
//! every such item absent.

use gimli::{
    BaseAddresses, CfaRule, DebugFrame, LittleEndian, Register, RegisterRule, UnwindContext, UnwindSection,
};
use object::{Object, ObjectSection};
use repair_kernel::frame::{FrameRule, DW_RBP, DW_RSP, SAVED};
use repair_kernel::layout::{KernelLayout, Kind, ITEMS};
use symbols::Profile;

/// The x86_64 return-address column.
const DW_RA: u16 = 16;
/// Longest caller scanned for call sites (`panic` and
/// `check_panic_on_warn` are a few hundred bytes).
const MAX_CALLER: u64 = 64 * 1024;

/// Fills every [`Kind::CallFrame`] item of `layout` that the ELF in
/// `data` can give; returns one line per item left absent, saying why.
pub fn fill_call_frames(layout: &mut KernelLayout, data: &[u8], profile: &Profile) -> Vec<String> {
    let mut absent = Vec::new();
    let file = match object::File::parse(data) {
        Ok(f) => f,
        Err(e) => return vec![format!("call-frame rules: the kernel ELF does not parse: {e}")],
    };
    let frame = file.section_by_name(".debug_frame").and_then(|s| s.data().ok());
    for (i, spec) in ITEMS.iter().enumerate() {
        if spec.kind != Kind::CallFrame {
            continue;
        }
        let what = format!("call-frame rule of {} calling {}", spec.ty, spec.member);
        let Some(frame) = frame else {
            absent.push(format!("{what}: the kernel ELF has no .debug_frame"));
            continue;
        };
        match rule_at_calls(&file, frame, profile, spec.ty, spec.member) {
            Ok(rule) => layout.values[i] = rule.pack(),
            Err(why) => absent.push(format!("{what}: {why}")),
        }
    }
    absent
}

/// The one rule of every call from `caller` to `callee`.
fn rule_at_calls(
    file: &object::File<'_>,
    debug_frame: &[u8],
    profile: &Profile,
    caller: &str,
    callee: &str,
) -> Result<FrameRule, String> {
    let target = profile.symbol(callee).ok_or_else(|| format!("no symbol {callee}"))?;
    profile.symbols.get(caller).ok_or_else(|| format!("no symbol {caller}"))?;
    // The function and the `.cold` part GCC moves its unlikely paths to.
    let mut sites = Vec::new();
    for part in [caller.to_owned(), format!("{caller}.cold")] {
        let Some(sym) = profile.symbols.get(&part) else { continue };
        if sym.size == 0 || sym.size > MAX_CALLER {
            return Err(format!("{part} has no usable size ({})", sym.size));
        }
        let code = text_bytes(file, sym.address, sym.size)?;
        sites.extend(call_sites(&code, sym.address, target));
    }
    if sites.is_empty() {
        return Err(format!("no call from {caller} (or {caller}.cold) to {callee} found"));
    }
    let mut frame = DebugFrame::new(debug_frame, LittleEndian);
    frame.set_address_size(8);
    let bases = BaseAddresses::default();
    let mut ctx = Box::new(UnwindContext::new());
    let mut rule: Option<FrameRule> = None;
    for pc in sites {
        let row = frame
            .unwind_info_for_address(&bases, &mut ctx, pc, DebugFrame::cie_from_offset)
            .map_err(|e| format!("no call-frame row at {pc:#x}: {e}"))?;
        let r = to_rule(row.cfa(), |reg| row.register(Register(reg)))
            .map_err(|why| format!("at {pc:#x}: {why}"))?;
        match rule {
            None => rule = Some(r),
            Some(prev) if prev == r => {}
            Some(prev) => return Err(format!("the call sites differ ({prev:?} and {r:?} at {pc:#x})")),
        }
    }
    rule.ok_or_else(|| "no call site".into())
}

/// A row of the call-frame table as a [`FrameRule`], when it is one.
fn to_rule(cfa: &CfaRule<usize>, reg: impl Fn(u16) -> RegisterRule<usize>) -> Result<FrameRule, String> {
    let (base, offset) = match *cfa {
        CfaRule::RegisterAndOffset { register, offset } => (register.0, offset),
        CfaRule::Expression(_) => return Err("the CFA is a DWARF expression".into()),
    };
    if base != DW_RSP && base != DW_RBP {
        return Err(format!("the CFA is based on register {base}, not rsp or rbp"));
    }
    if offset <= 0 || offset % 8 != 0 || offset / 8 > 255 {
        return Err(format!("the CFA offset {offset} is not a small positive multiple of 8"));
    }
    match reg(DW_RA) {
        RegisterRule::Offset(-8) => {}
        other => return Err(format!("the return address is not at CFA - 8 ({other:?})")),
    }
    let mut saved = [0u8; 6];
    for (slot, &r) in saved.iter_mut().zip(SAVED.iter()) {
        *slot = match reg(r) {
            RegisterRule::Undefined | RegisterRule::SameValue => 0,
            RegisterRule::Offset(o) if o <= -16 && o % 8 == 0 && -o / 8 <= 255 => (-o / 8) as u8,
            other => return Err(format!("register {r} has a rule we do not unwind: {other:?}")),
        };
    }
    let rule = FrameRule { cfa_reg: base, cfa_words: (offset / 8) as u8, saved };
    FrameRule::unpack(rule.pack()).ok_or_else(|| format!("{rule:?} does not round-trip"))
}

/// The bytes of `[addr, addr + len)` from the ELF section that holds them.
fn text_bytes(file: &object::File<'_>, addr: u64, len: u64) -> Result<Vec<u8>, String> {
    for s in file.sections() {
        let (start, size) = (s.address(), s.size());
        if start <= addr && addr.saturating_add(len) <= start.saturating_add(size) {
            let data = s.data().map_err(|e| e.to_string())?;
            let from = (addr - start) as usize;
            return data
                .get(from..from + len as usize)
                .map(<[u8]>::to_vec)
                .ok_or_else(|| format!("{addr:#x} lies in a section without file bytes"));
        }
    }
    Err(format!("no section holds {addr:#x}"))
}

/// Addresses of the `call rel32` (`e8`) instructions in `code` (at `base`)
/// whose target is `target`. A byte pattern, not a disassembly: a false
/// match would only add a site whose rule must agree with the others.
fn call_sites(code: &[u8], base: u64, target: u64) -> Vec<u64> {
    let mut sites = Vec::new();
    for i in 0..code.len().saturating_sub(4) {
        if code[i] != 0xe8 || i + 5 > code.len() {
            continue;
        }
        let rel = i32::from_le_bytes([code[i + 1], code[i + 2], code[i + 3], code[i + 4]]);
        let next = base + i as u64 + 5;
        if next.wrapping_add(rel as i64 as u64) == target {
            sites.push(base + i as u64);
        }
    }
    sites
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn call_sites_are_found_by_target() {
        // `call` to the next instruction (0x1005), a nop, a `call` back to 0x1005.
        let mut code = vec![0xe8, 0, 0, 0, 0, 0x90];
        let rel = (0x1005i64 - (0x1000 + 6 + 5)) as i32;
        code.push(0xe8);
        code.extend_from_slice(&rel.to_le_bytes());
        assert_eq!(call_sites(&code, 0x1000, 0x1005), vec![0x1000, 0x1006]);
        assert!(call_sites(&code, 0x1000, 0x2000).is_empty());
        assert!(call_sites(&[0xe8, 0, 0], 0x1000, 0x1005).is_empty());
    }

    #[test]
    fn rows_become_rules_or_reasons() {
        let cfa = CfaRule::RegisterAndOffset { register: Register(DW_RSP), offset: 0x68 };
        let regs = |r: u16| match r {
            DW_RA => RegisterRule::Offset(-8),
            DW_RBP => RegisterRule::Offset(-16),
            _ => RegisterRule::Undefined,
        };
        let rule = to_rule(&cfa, regs).unwrap();
        assert_eq!(rule, FrameRule { cfa_reg: DW_RSP, cfa_words: 13, saved: [0, 2, 0, 0, 0, 0] });
        let odd = CfaRule::RegisterAndOffset { register: Register(DW_RSP), offset: 12 };
        assert!(to_rule(&odd, regs).is_err());
        let r9 = CfaRule::RegisterAndOffset { register: Register(9), offset: 16 };
        assert!(to_rule(&r9, regs).is_err());
        let ra_elsewhere = |r: u16| if r == DW_RA { RegisterRule::Offset(-16) } else { RegisterRule::Undefined };
        assert!(to_rule(&cfa, ra_elsewhere).is_err());
    }
}
