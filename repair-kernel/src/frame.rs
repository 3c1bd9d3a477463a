//! One frame of the kernel's stack, unwound by a rule the builder read from
//! the vmlinux's call-frame information (`.debug_frame`, DWARF CFI) at a
//! call site: where the caller's frame starts (the CFA) and where the
//! function saved the callee-saved registers it uses. The System V ABI makes
//! `rbx`, `rbp` and `r12`-`r15` the caller's to keep; with them restored
//! and `rsp` at the CFA, execution may go on at the return address as if
//! the call had returned.
//!
//! A rule is packed into one layout value ([`crate::layout::Kind::CallFrame`]):
//!
//! | byte | meaning |
//! |---|---|
//! | 0 | the CFA's base register, DWARF numbering: 7 `rsp`, 6 `rbp` |
//! | 1 | the CFA's offset from it, in 8-byte words |
//! | 2..8 | `rbx`, `rbp`, `r12`, `r13`, `r14`, `r15`: 0 when the function does not change it, else `k` when it is saved at CFA - 8k |
//!
//! The return address is at CFA - 8 (the `call` pushed it there).

use crate::contract::CpuState;
use crate::kmem::Kernel;
use crate::mem::{Error, Gva, PhysMem};

/// DWARF register numbers of x86_64 (System V ABI, figure 3.36).
pub const DW_RBX: u16 = 3;
pub const DW_RBP: u16 = 6;
pub const DW_RSP: u16 = 7;
pub const DW_R12: u16 = 12;

/// The callee-saved registers a rule restores, in the order of bytes 2..8.
pub const SAVED: [u16; 6] = [DW_RBX, DW_RBP, DW_R12, DW_R12 + 1, DW_R12 + 2, DW_R12 + 3];

/// Largest stack distance one unwound frame may span: the functions this is
/// used for (`panic`, `check_panic_on_warn`) keep a few hundred bytes.
pub const MAX_FRAME: u64 = 4096;

/// A call site's frame rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameRule {
    /// [`DW_RSP`] or [`DW_RBP`].
    pub cfa_reg: u16,
    /// CFA = base + 8 * `cfa_words`.
    pub cfa_words: u8,
    /// Per [`SAVED`] register: 0 unchanged, `k` saved at CFA - 8k.
    pub saved: [u8; 6],
}

impl FrameRule {
    /// The packed layout value.
    pub fn pack(&self) -> u64 {
        let mut b = [0u8; 8];
        b[0] = self.cfa_reg as u8;
        b[1] = self.cfa_words;
        b[2..].copy_from_slice(&self.saved);
        u64::from_le_bytes(b)
    }

    /// A packed value back, `None` when it is not one [`FrameRule::pack`]
    /// could have written.
    pub fn unpack(v: u64) -> Option<Self> {
        let b = v.to_le_bytes();
        let cfa_reg = u16::from(b[0]);
        if (cfa_reg != DW_RSP && cfa_reg != DW_RBP) || b[1] == 0 {
            return None;
        }
        let mut saved = [0u8; 6];
        saved.copy_from_slice(&b[2..]);
        // The return address is at CFA - 8: nothing else is saved there;
        // with the CFA at rsp + 8n, every slot lies within those n words.
        if saved.iter().any(|&k| k == 1 || (cfa_reg == DW_RSP && k > b[1])) {
            return None;
        }
        Some(Self { cfa_reg, cfa_words: b[1], saved })
    }
}

impl core::fmt::Display for FrameRule {
    /// `CFA = rsp + 0x58; rbp at CFA-16`.
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let base = if self.cfa_reg == DW_RSP { "rsp" } else { "rbp" };
        write!(f, "CFA = {base} + {:#x}", 8 * u32::from(self.cfa_words))?;
        let names = ["rbx", "rbp", "r12", "r13", "r14", "r15"];
        for (name, &k) in names.iter().zip(self.saved.iter()) {
            if k != 0 {
                write!(f, "; {name} at CFA-{}", 8 * u32::from(k))?;
            }
        }
        Ok(())
    }
}

/// The registers an unwind carries from frame to frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame {
    /// Where execution goes on: the return address.
    pub rip: u64,
    /// The stack pointer after the return (the CFA).
    pub rsp: u64,
    /// `rbx`, `rbp`, `r12`..`r15`.
    pub saved: [u64; 6],
}

impl Frame {
    /// The registers of `regs` an unwind restores, at `rip`/`rsp`.
    pub fn of(regs: &CpuState) -> Self {
        Self { rip: regs.rip, rsp: regs.rsp, saved: [regs.rbx, regs.rbp, regs.r12, regs.r13, regs.r14, regs.r15] }
    }

    /// The state at a function's first instruction, returned from: the
    /// return address is at `rsp`, nothing is saved yet.
    pub fn return_from_entry<M: PhysMem + ?Sized>(&self, k: &Kernel<'_, M>) -> Result<Self, Error> {
        let rip = k.read_u64(Gva(self.rsp))?;
        let rsp = self.rsp.checked_add(8).ok_or(Error::Absurd("stack pointer", self.rsp))?;
        Ok(Self { rip, rsp, saved: self.saved })
    }

    /// The caller's state, this frame stopped at a call site whose rule is
    /// `rule`. Errors when the CFA is not above `rsp` within [`MAX_FRAME`]
    /// or a saved word cannot be read.
    pub fn unwind<M: PhysMem + ?Sized>(&self, k: &Kernel<'_, M>, rule: &FrameRule) -> Result<Self, Error> {
        let base = if rule.cfa_reg == DW_RSP { self.rsp } else { self.saved[1] };
        let cfa = base
            .checked_add(8 * u64::from(rule.cfa_words))
            .ok_or(Error::Absurd("frame base", base))?;
        if cfa <= self.rsp || cfa - self.rsp > MAX_FRAME {
            return Err(Error::Absurd("caller's frame address", cfa));
        }
        let mut saved = self.saved;
        for (i, &slot) in rule.saved.iter().enumerate() {
            if slot != 0 {
                saved[i] = k.read_u64(Gva(cfa - 8 * u64::from(slot)))?;
            }
        }
        let rip = k.read_u64(Gva(cfa - 8))?;
        Ok(Self { rip, rsp: cfa, saved })
    }

    /// `regs` with this frame's registers: `rip`, `rsp` and the
    /// callee-saved ones; the rest (caller-saved, dead across a call) and
    /// every system register as in `regs`.
    pub fn apply(&self, regs: &CpuState) -> CpuState {
        let mut r = *regs;
        r.rip = self.rip;
        r.rsp = self.rsp;
        [r.rbx, r.rbp, r.r12, r.r13, r.r14, r.r15] = self.saved;
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_pack_and_unpack() {
        let r = FrameRule { cfa_reg: DW_RSP, cfa_words: 12, saved: [0, 2, 0, 0, 0, 0] };
        assert_eq!(FrameRule::unpack(r.pack()), Some(r));
        let r = FrameRule { cfa_reg: DW_RBP, cfa_words: 2, saved: [3, 2, 4, 0, 0, 0] };
        assert_eq!(FrameRule::unpack(r.pack()), Some(r));
        // Not a base register; a zero-sized frame; rbx saved where the
        // return address is.
        assert_eq!(FrameRule::unpack(0x0105), None);
        assert_eq!(FrameRule::unpack(0x0007), None);
        assert_eq!(FrameRule::unpack(FrameRule { cfa_reg: DW_RSP, cfa_words: 2, saved: [1, 0, 0, 0, 0, 0] }.pack()), None);
        assert_eq!(FrameRule::unpack(u64::MAX), None);
    }
}
