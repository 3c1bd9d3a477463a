//! Numbers the kernel's DWARF and BTF do not carry because they are
//! preprocessor constants, read from the kernel's own machine code instead
//! ([`Kind::ThreadFlagBit`] items).
//!
//! `TIF_SIGPENDING` was bit 2 of x86's `thread_info.flags` up to 6.x and is
//! bit 1 since the generic TIF bits (7.x). `signal_wake_up_state()` sets it
//! first thing (`set_tsk_thread_flag(t, TIF_SIGPENDING)`): a locked `or` (or
//! `bts`) of one bit into the task's flags word, whose base register is the
//! task pointer in `rdi`. GCC inlines it at -O2 (Debian's kernels) and calls
//! a constant-propagated `set_ti_thread_flag` clone at -Os (the kit's
//! tinyconfig kernels): both are followed, one call deep.

use repair_kernel::layout::{Item, KernelLayout, Kind, ITEMS};

/// Bytes of a function decoded at most.
const WINDOW: usize = 96;

/// Fills every [`Kind::ThreadFlagBit`] item of `layout` that the code
/// gives. `read(addr, len)` gives code bytes at a link-time address,
/// `sym(name)` a symbol's link-time address. Returns one line per item left
/// absent, saying why.
pub fn fill_thread_flag_bits(
    layout: &mut KernelLayout,
    read: &dyn Fn(u64, usize) -> Option<Vec<u8>>,
    sym: &dyn Fn(&str) -> Option<u64>,
) -> Vec<String> {
    let mut absent = Vec::new();
    let flags = layout.get(Item::TaskThreadInfoFlags);
    let fentry = sym("__fentry__");
    for (i, spec) in ITEMS.iter().enumerate() {
        if spec.kind != Kind::ThreadFlagBit {
            continue;
        }
        let what = format!("the thread flag {} sets", spec.ty);
        let (Some(flags), Some(f)) = (flags, sym(spec.ty)) else {
            absent.push(format!("{what}: no task_struct.thread_info.flags or no symbol {}", spec.ty));
            continue;
        };
        match bit_set_by(read, f, flags, fentry, 1) {
            Some(bit) => layout.values[i] = u64::from(bit),
            None => absent.push(format!("{what}: no locked or/bts on the task's flags found in its code")),
        }
    }
    absent
}

/// The bit the code at `addr` sets in the flags word at `rdi + flags`, by
/// the first locked `or`/`bts` on it; else in the first function it calls
/// (other than `__fentry__`), `depth` calls deep.
fn bit_set_by(
    read: &dyn Fn(u64, usize) -> Option<Vec<u8>>,
    addr: u64,
    flags: u64,
    fentry: Option<u64>,
    depth: u32,
) -> Option<u32> {
    let code = read(addr, WINDOW)?;
    let mut callee = None;
    for i in 0..code.len() {
        if code[i] == 0xf0 {
            if let Some(bit) = locked_set_bit(&code[i + 1..], flags) {
                return Some(bit);
            }
        }
        if code[i] == 0xe8 && callee.is_none() && i + 5 <= code.len() {
            let rel = i32::from_le_bytes([code[i + 1], code[i + 2], code[i + 3], code[i + 4]]);
            let target = (addr + i as u64 + 5).wrapping_add(rel as i64 as u64);
            if Some(target) != fentry {
                callee = Some(target);
            }
        }
        // The end of the function.
        if code[i] == 0xc3 && callee.is_some() {
            break;
        }
    }
    if depth == 0 {
        return None;
    }
    bit_set_by(read, callee?, flags, fentry, depth - 1)
}

/// After a `lock` prefix: `or $imm8, disp8(%rdi)` (opcodes 80 and 83, any
/// operand size) or `bts $imm8, disp8(%rdi)` (0f ba /5) on the flags word
/// at `flags`: the bit number.
fn locked_set_bit(b: &[u8], flags: u64) -> Option<u32> {
    let mut i = 0;
    let mut rex = 0u8;
    if let Some(&r) = b.first() {
        if (0x40..=0x4f).contains(&r) {
            rex = r;
            i = 1;
        }
    }
    if rex & 0x1 != 0 {
        return None; // rm extended: r8-r15, not rdi.
    }
    let (bts, modrm_at) = match (b.get(i)?, b.get(i + 1)?) {
        (0x80 | 0x83, _) => (false, i + 1),
        (0x0f, 0xba) => (true, i + 2),
        _ => return None,
    };
    let modrm = *b.get(modrm_at)?;
    let (md, reg, rm) = (modrm >> 6, (modrm >> 3) & 7, modrm & 7);
    if rm != 7 || reg != if bts { 5 } else { 1 } {
        return None;
    }
    let (disp, imm_at) = match md {
        0 => (0u64, modrm_at + 1),
        1 => (u64::from(*b.get(modrm_at + 1)?), modrm_at + 2),
        _ => return None,
    };
    let imm = *b.get(imm_at)?;
    let byte = disp.checked_sub(flags).filter(|&d| d < 8)?;
    let bit = if bts {
        u32::from(imm)
    } else {
        if imm == 0 || !imm.is_power_of_two() || (imm & 0x80 != 0 && b[i] == 0x83) {
            return None;
        }
        imm.trailing_zeros()
    };
    let bit = byte as u32 * 8 + bit;
    (bit < 64).then_some(bit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locked_ors_and_bts_give_their_bit() {
        // lock orb $0x4,(%rdi): Debian 6.x's TIF_SIGPENDING.
        assert_eq!(locked_set_bit(&[0x80, 0x0f, 0x04], 0), Some(2));
        // lock orb $0x2,(%rdi): 7.x.
        assert_eq!(locked_set_bit(&[0x80, 0x0f, 0x02], 0), Some(1));
        // lock orb $0x40,0x1(%rdi): bit 14.
        assert_eq!(locked_set_bit(&[0x80, 0x4f, 0x01, 0x40], 0), Some(14));
        // lock orq $0x4,(%rdi).
        assert_eq!(locked_set_bit(&[0x48, 0x83, 0x0f, 0x04], 0), Some(2));
        // lock btsq $0x2,(%rdi).
        assert_eq!(locked_set_bit(&[0x48, 0x0f, 0xba, 0x2f, 0x02], 0), Some(2));
        // Another register (rsi), an AND, two bits, a word past the flags.
        assert_eq!(locked_set_bit(&[0x80, 0x0e, 0x04], 0), None);
        assert_eq!(locked_set_bit(&[0x80, 0x27, 0x04], 0), None);
        assert_eq!(locked_set_bit(&[0x80, 0x0f, 0x06], 0), None);
        assert_eq!(locked_set_bit(&[0x80, 0x4f, 0x10, 0x04], 0), None);
        assert_eq!(locked_set_bit(&[0x80], 0), None);
    }

    #[test]
    fn the_bit_is_found_inline_or_one_call_deep() {
        // 0x1000: endbr64; call __fentry__ (0x9000); call 0x2000; ret
        // 0x2000: lock orb $0x4,(%rdi); ret
        let mut f = vec![0xf3, 0x0f, 0x1e, 0xfa, 0xe8];
        f.extend_from_slice(&((0x9000i64 - 0x1009) as i32).to_le_bytes());
        f.push(0xe8);
        f.extend_from_slice(&((0x2000i64 - 0x100e) as i32).to_le_bytes());
        f.push(0xc3);
        let g = vec![0xf0, 0x80, 0x0f, 0x04, 0xc3];
        let read = |a: u64, _n: usize| match a {
            0x1000 => Some(f.clone()),
            0x2000 => Some(g.clone()),
            _ => Some(vec![0xc3]),
        };
        assert_eq!(bit_set_by(&read, 0x1000, 0, Some(0x9000), 1), Some(2));
        assert_eq!(bit_set_by(&read, 0x1000, 0, Some(0x9000), 0), None);
        assert_eq!(bit_set_by(&read, 0x2000, 0, None, 0), Some(2));
    }
}
