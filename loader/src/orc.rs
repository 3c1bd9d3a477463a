//! The kernel's own unwinder, from outside: ORC (`CONFIG_UNWINDER_ORC`,
//! every Debian x86_64 kernel), so a backtrace has exactly the frames the
//! guest's `Call Trace:` would print, no more (no stale return addresses
//! left on the stack) and no fewer (tail calls, functions without frame
//! pointers).
//!
//! The tables (`arch/x86/include/asm/orc_types.h`, written by objtool):
//! `__start_orc_unwind_ip` holds one `i32` per entry, the address it
//! covers relative to the entry's own place, sorted; `__start_orc_unwind`
//! the matching 6-byte `orc_entry`: `sp_offset: i16`, `bp_offset: i16`,
//! then `sp_reg:4, bp_reg:4`, then the type. The type's encoding changed
//! in 6.4 (`type:2` with CALL = 0, REGS = 1, REGS_PARTIAL = 2, before;
//! `type:3` with UNDEFINED = 0, END_OF_STACK = 1, CALL = 2, REGS = 3,
//! REGS_PARTIAL = 4, since): the entry of the trapped function (a CALL
//! frame) tells which one a kernel uses, and which register numbers.
//!
//! Guest memory is hostile input: lookups are bounded binary searches,
//! the walk stops after [`MAX_FRAMES`] or when the stack pointer stops
//! growing, and any unreadable word ends it.

use repair_kernel::mem::Gva;

/// Most frames walked.
pub const MAX_FRAMES: usize = 64;

const REG_UNDEFINED: u8 = 0;

/// The `ORC_REG_*` numbers a kernel uses. Up to 6.x: PREV_SP 1, BP 4,
/// SP 5, BP_INDIRECT 8, SP_INDIRECT 9. Debian's 7.x renumbers them (SP 3,
/// PREV_SP 8, BP_INDIRECT 10; seen in its tables: the same shapes of
/// entries, counted, as 6.12's). A function's first instruction is always
/// `CFA = SP + 8`, so the trapped function's entry tells which.
#[derive(Clone, Copy, Debug)]
struct Regs {
    prev_sp: u8,
    bp: u8,
    sp: u8,
    bp_indirect: u8,
    sp_indirect: u8,
}

const REGS_6: Regs = Regs { prev_sp: 1, bp: 4, sp: 5, bp_indirect: 8, sp_indirect: 9 };
const REGS_7: Regs = Regs { prev_sp: 8, bp: 4, sp: 3, bp_indirect: 10, sp_indirect: 9 };

/// `struct pt_regs` offsets (x86_64).
const PT_BP: u64 = 32;
const PT_IP: u64 = 128;
const PT_CS: u64 = 136;
const PT_SP: u64 = 152;

/// Where a running kernel's ORC tables are (run-time addresses).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OrcTables {
    pub ip: u64,
    pub entries: u64,
    pub count: u64,
}

impl OrcTables {
    /// From the link-time addresses of `__start_orc_unwind_ip`,
    /// `__stop_orc_unwind_ip` and `__start_orc_unwind`, at `slide`.
    pub fn new(start_ip: u64, stop_ip: u64, start: u64, slide: u64) -> Option<Self> {
        let count = stop_ip.checked_sub(start_ip)? / 4;
        (count > 0 && count < 1 << 24).then_some(Self {
            ip: start_ip.wrapping_add(slide),
            entries: start.wrapping_add(slide),
            count,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Call,
    Regs,
    RegsPartial,
    End,
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    sp_offset: i16,
    bp_offset: i16,
    sp_reg: u8,
    bp_reg: u8,
    /// The raw type byte.
    flags: u8,
}

/// Reads guest kernel memory by virtual address.
pub trait KernelRead {
    fn read(&self, va: Gva, buf: &mut [u8]) -> bool;
    fn u64(&self, va: u64) -> Option<u64> {
        let mut b = [0u8; 8];
        self.read(Gva(va), &mut b).then(|| u64::from_le_bytes(b))
    }
}

impl<M: repair_kernel::mem::PhysMem + ?Sized> KernelRead for repair_kernel::kmem::Kernel<'_, M> {
    fn read(&self, va: Gva, buf: &mut [u8]) -> bool {
        repair_kernel::kmem::Kernel::read(self, va, buf).is_ok()
    }
}

/// The entry covering `ip`: the last whose address is at or below it.
fn lookup<K: KernelRead + ?Sized>(k: &K, t: &OrcTables, ip: u64) -> Option<Entry> {
    let at = |i: u64| -> Option<u64> {
        let place = t.ip.wrapping_add(4 * i);
        let mut b = [0u8; 4];
        k.read(Gva(place), &mut b).then(|| place.wrapping_add(i32::from_le_bytes(b) as i64 as u64))
    };
    let (mut lo, mut hi) = (0u64, t.count);
    // Invariant: entries below lo cover addresses <= ip.
    for _ in 0..64 {
        if lo >= hi {
            break;
        }
        let mid = lo + (hi - lo) / 2;
        if at(mid)? <= ip {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    let i = lo.checked_sub(1)?;
    let mut b = [0u8; 6];
    if !k.read(Gva(t.entries.wrapping_add(6 * i)), &mut b) {
        return None;
    }
    Some(Entry {
        sp_offset: i16::from_le_bytes([b[0], b[1]]),
        bp_offset: i16::from_le_bytes([b[2], b[3]]),
        sp_reg: b[4] & 0xf,
        bp_reg: b[4] >> 4,
        flags: b[5],
    })
}

/// Which register numbers the kernel uses, from a function's entry.
fn regs(entry: &Entry) -> Option<Regs> {
    match (entry.sp_reg, entry.sp_offset) {
        (5, 8) => Some(REGS_6),
        (3, 8) => Some(REGS_7),
        _ => None,
    }
}

/// Which type encoding the kernel uses, from a CALL entry.
fn new_format(call: &Entry) -> Option<bool> {
    if call.flags & 7 == 2 {
        Some(true)
    } else if call.flags & 3 == 0 {
        Some(false)
    } else {
        None
    }
}

fn kind(e: &Entry, new: bool) -> Kind {
    if e.sp_reg == REG_UNDEFINED {
        return Kind::End;
    }
    match (new, if new { e.flags & 7 } else { e.flags & 3 }) {
        (true, 2) | (false, 0) => Kind::Call,
        (true, 3) | (false, 1) => Kind::Regs,
        (true, 4) | (false, 2) => Kind::RegsPartial,
        _ => Kind::End,
    }
}

/// The frames the kernel's unwinder would walk from a vCPU stopped at
/// the entry of a function (`rip`, `rsp`, `rbp`): `rip` first, then each
/// return address (or interrupted kernel address), up to a return to
/// user mode; each with whether it is a return address. `None` when the first lookup fails (no ORC for `rip`): the
/// caller falls back to its own heuristics.
pub fn unwind<K: KernelRead + ?Sized>(k: &K, t: &OrcTables, rip: u64, rsp: u64, rbp: u64) -> Option<Vec<(u64, bool)>> {
    let first = lookup(k, t, rip)?;
    let new = new_format(&first)?;
    let r = regs(&first)?;
    let mut frames = vec![(rip, false)];
    let (mut sp, mut bp) = (rsp, rbp);
    let mut entry = first;
    for _ in 0..MAX_FRAMES {
        let off = entry.sp_offset as i64 as u64;
        let cfa = match entry.sp_reg {
            x if x == r.sp => sp.wrapping_add(off),
            x if x == r.bp => bp.wrapping_add(off),
            x if x == r.sp_indirect => k.u64(sp)?.wrapping_add(off),
            x if x == r.bp_indirect => k.u64(bp.wrapping_add(off))?,
            _ => break,
        };
        let kind = kind(&entry, new);
        let (next_ip, next_sp, regs) = match kind {
            Kind::Call => (k.u64(cfa.wrapping_sub(8))?, cfa, false),
            Kind::Regs => {
                if k.u64(cfa + PT_CS)? & 3 != 0 {
                    break; // back to user mode: the trace ends here
                }
                bp = k.u64(cfa + PT_BP)?;
                (k.u64(cfa + PT_IP)?, k.u64(cfa + PT_SP)?, true)
            }
            Kind::RegsPartial => {
                // An iret frame: ip, cs, flags, sp, ss.
                if k.u64(cfa + 8)? & 3 != 0 {
                    break;
                }
                (k.u64(cfa)?, k.u64(cfa + 24)?, true)
            }
            Kind::End => break,
        };
        if !regs {
            let off = entry.bp_offset as i64 as u64;
            if entry.bp_reg == r.prev_sp {
                bp = k.u64(cfa.wrapping_add(off))?;
            } else if entry.bp_reg == r.bp {
                bp = k.u64(bp.wrapping_add(off))?;
            }
        }
        // The stack only grows towards callers; anything else is corrupt.
        if next_sp <= sp && !regs || next_ip < 0xffff_8000_0000_0000 {
            break;
        }
        sp = next_sp;
        frames.push((next_ip, !regs));
        // A return address points after the call: look up the call's byte.
        let probe = if regs { next_ip } else { next_ip.wrapping_sub(1) };
        entry = match lookup(k, t, probe) {
            Some(e) => e,
            None => break,
        };
    }
    Some(frames)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Kernel memory as a few byte ranges.
    struct Mem(Vec<(u64, Vec<u8>)>);

    impl KernelRead for Mem {
        fn read(&self, va: Gva, buf: &mut [u8]) -> bool {
            for (base, bytes) in &self.0 {
                if let Some(off) = va.0.checked_sub(*base) {
                    if let Some(src) = usize::try_from(off).ok().and_then(|o| bytes.get(o..o + buf.len())) {
                        buf.copy_from_slice(src);
                        return true;
                    }
                }
            }
            false
        }
    }

    const TEXT: u64 = 0xffff_ffff_8100_0000;
    const IPT: u64 = 0xffff_ffff_8200_0000;
    const ENT: u64 = 0xffff_ffff_8210_0000;
    const STACK: u64 = 0xffff_c900_0000_0000;

    /// Three functions a (0x100), b (0x200), c (0x300); at a+0 the CFA is
    /// SP+8; inside b and c after `push rbp` it is SP+16 with BP saved at
    /// CFA-16. `new`: the 6.4+ type encoding.
    fn tables(new: bool, sp: u8) -> (Vec<u8>, Vec<u8>) {
        let call = if new { 2 } else { 0 };
        let rows: [(u64, i16, i16, u8, u8); 6] = [
            (0x100, 8, 0, sp, 0),
            (0x101, 16, -16, sp, if sp == 5 { 1 } else { 8 }),
            (0x200, 8, 0, sp, 0),
            (0x201, 16, -16, sp, if sp == 5 { 1 } else { 8 }),
            (0x300, 8, 0, sp, 0),
            (0x400, 0, 0, 0, 0), // end: undefined
        ];
        let mut ip = Vec::new();
        let mut ent = Vec::new();
        for (i, (off, so, bo, s, b)) in rows.iter().enumerate() {
            let place = IPT + 4 * i as u64;
            ip.extend_from_slice(&((TEXT + off).wrapping_sub(place) as i64 as i32).to_le_bytes());
            ent.extend_from_slice(&so.to_le_bytes());
            ent.extend_from_slice(&bo.to_le_bytes());
            ent.push(s | b << 4);
            ent.push(if *s == 0 { 0 } else { call });
        }
        (ip, ent)
    }

    #[test]
    fn walks_call_frames_in_both_encodings_and_register_numberings() {
        for (new, sp) in [(false, 5), (true, 5), (true, 3)] {
            let (ip, ent) = tables(new, sp);
            // Trapped at a+0; a was called from b+0x40 (b had pushed rbp),
            // b from c+0x10 (c without a frame), c from user entry: a
            // return address outside the kernel ends the walk.
            let mut stack = vec![0u8; 0x100];
            let put = |s: &mut Vec<u8>, at: usize, v: u64| s[at..at + 8].copy_from_slice(&v.to_le_bytes());
            put(&mut stack, 0x00, TEXT + 0x240); // a's return into b
            put(&mut stack, 0x08, 0x1111); // b's saved rbp
            put(&mut stack, 0x10, TEXT + 0x310); // b's return into c
            put(&mut stack, 0x18, 0x7fff_0000); // c's return: user space
            let mem = Mem(vec![(IPT, ip), (ENT, ent), (STACK, stack)]);
            let t = OrcTables::new(IPT, IPT + 24, ENT, 0).unwrap();
            let frames = unwind(&mem, &t, TEXT + 0x100, STACK, 0x2222).unwrap();
            assert_eq!(frames, [(TEXT + 0x100, false), (TEXT + 0x240, true), (TEXT + 0x310, true)], "new {new} sp {sp}");
        }
    }

    #[test]
    fn corrupt_tables_and_stacks_end_the_walk() {
        let (ip, ent) = tables(true, 5);
        let mut seed = 0x1234_5678_9abc_def0u64;
        for _ in 0..3000 {
            let mut rnd = || {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed
            };
            let (mut ip, mut ent) = (ip.clone(), ent.clone());
            let mut stack: Vec<u8> = (0..0x100).map(|_| rnd() as u8).collect();
            for _ in 0..4 {
                let i = rnd() as usize % ip.len();
                ip[i] = rnd() as u8;
                let j = rnd() as usize % ent.len();
                ent[j] = rnd() as u8;
            }
            // Now and then a stack that points at itself.
            if rnd() % 4 == 0 {
                stack[..8].copy_from_slice(&(TEXT + 0x240).to_le_bytes());
            }
            let mem = Mem(vec![(IPT, ip), (ENT, ent), (STACK, stack)]);
            let t = OrcTables::new(IPT, IPT + 24, ENT, 0).unwrap();
            if let Some(f) = unwind(&mem, &t, TEXT + 0x100 + rnd() % 0x300, STACK + rnd() % 0x80, rnd()) {
                assert!(f.len() <= MAX_FRAMES + 1);
            }
        }
    }
}
