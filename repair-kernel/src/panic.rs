//! The crashed context at the entry of the function that does the panic's
//! work (kernel/panic.c): the message from its arguments, where it was
//! called from, and the stack for a backtrace.
//!
//! That function is `vpanic(const char *fmt, va_list args)` where the
//! kernel has it (6.17, and Debian's 6.12.118+ by backport: `panic` only
//! wraps it, and a few callers call it directly), else
//! `panic(const char *fmt, ...)`. Which one is decided by the symbol's
//! presence in the vmlinux, never by a version number.
//!
//! The trap is at the function's first byte, the first instruction every
//! call executes: a 5-byte `call __fentry__` (a NOP until ftrace patches it)
//! on 5.10/6.1, `endbr64` on IBT builds (6.12+). Direct calls land there;
//! nothing jumps past it.
//!
//! At the first instruction of `panic`, `[rsp]` is the return address into
//! the caller, `rdi` is `fmt`, and the variadic arguments are in `rsi`,
//! `rdx`, `rcx`, `r8`, `r9`, then at `[rsp + 8]`, `[rsp + 16]`, ...
//! At the first instruction of `vpanic`, `rdi` is `fmt` and `rsi` points at
//! the System V `va_list` (`gp_offset`, `fp_offset`, `overflow_arg_area`,
//! `reg_save_area`); when `[rsp]` returns into `panic`, panic's own caller
//! is the word just below `overflow_arg_area` (the variadic arguments on
//! the stack start right above the return address).

use core::fmt::Write;

use crate::contract::CpuState;
use crate::fmtbuf::FmtBuf;
use crate::kmem::Kernel;
use crate::layout::Item;
use crate::mem::{Error, Gva, PhysMem};

/// Longest format string read.
pub const FMT_MAX: usize = 256;
/// Longest `%s` argument read.
pub const STR_ARG_MAX: usize = 128;
/// Most arguments consumed (a corrupt format cannot read far up the stack).
pub const MAX_ARGS: usize = 16;
/// `THREAD_SIZE` on x86_64 without KASAN (16 KiB).
pub const THREAD_SIZE: u64 = 16 * 1024;
/// Used when the layout lacks `oops_end`'s size: `oops_end` is well under
/// this many bytes in every 6.x build seen.
pub const OOPS_END_SIZE_FALLBACK: u64 = 0x200;

/// Run-time address of the trap: `vpanic` where the kernel has it, else
/// `panic`.
pub fn trap_addr<M: PhysMem + ?Sized>(k: &Kernel<'_, M>) -> Result<Gva, Error> {
    k.sym(Item::SymVpanic).or_else(|_| k.sym(Item::SymPanic))
}

/// True when `regs` is stopped at the first instruction of the panic's
/// work ([`trap_addr`]).
pub fn at_panic_entry<M: PhysMem + ?Sized>(k: &Kernel<'_, M>, regs: &CpuState) -> bool {
    trap_addr(k).map(|p| p.0 == regs.rip).unwrap_or(false)
}

/// True when `regs` is stopped at the entry of `vpanic`.
pub fn at_vpanic<M: PhysMem + ?Sized>(k: &Kernel<'_, M>, regs: &CpuState) -> bool {
    k.sym(Item::SymVpanic).map(|p| p.0 == regs.rip).unwrap_or(false)
}

/// Used when the layout lacks `panic`'s size: `panic` as a wrapper of
/// `vpanic` is well under this.
pub const PANIC_WRAPPER_SIZE_FALLBACK: u64 = 0x100;

/// `struct __va_list_tag` of x86_64 at `va`: (gp_offset, overflow_arg_area,
/// reg_save_area).
fn va_list<M: PhysMem + ?Sized>(k: &Kernel<'_, M>, va: Gva) -> Result<(u32, u64, u64), Error> {
    Ok((k.read_u32(va)?, k.read_u64(va.add(8))?, k.read_u64(va.add(16))?))
}

/// Who called `panic` (or `vpanic` directly): `__builtin_return_address(0)`
/// of `panic`, the word at `rsp` at its entry; at `vpanic`'s entry called
/// from `panic`, panic's own return address, just below the `va_list`'s
/// `overflow_arg_area`.
pub fn panic_caller<M: PhysMem + ?Sized>(k: &Kernel<'_, M>, regs: &CpuState) -> Result<Gva, Error> {
    let ret = k.read_ptr(Gva(regs.rsp))?;
    if !at_vpanic(k, regs) {
        return Ok(ret);
    }
    let Ok(panic) = k.sym(Item::SymPanic) else { return Ok(ret) };
    let size = k.opt(Item::SymPanicSize).unwrap_or(PANIC_WRAPPER_SIZE_FALLBACK);
    if !(panic < ret && ret.0 <= panic.0.saturating_add(size)) {
        return Ok(ret);
    }
    let (_, overflow, _) = va_list(k, Gva(regs.rsi))?;
    k.read_ptr(Gva(overflow.wrapping_sub(8)))
}

/// True when `ret` is inside `oops_end` (the panic is the oops path's
/// `panic("Fatal exception")` or `panic("Fatal exception in interrupt")`).
pub fn is_in_oops_end<M: PhysMem + ?Sized>(k: &Kernel<'_, M>, ret: Gva) -> bool {
    let Ok(start) = k.sym(Item::SymOopsEnd) else { return false };
    let size = k.opt(Item::SymOopsEndSize).unwrap_or(OOPS_END_SIZE_FALLBACK);
    start < ret && ret.0 <= start.0.saturating_add(size)
}

/// True when `ret` (the panic's caller) is inside `nmi_panic`, which claims
/// `panic_cpu` for this CPU before it calls `panic`.
pub fn is_in_nmi_panic<M: PhysMem + ?Sized>(k: &Kernel<'_, M>, ret: Gva) -> bool {
    let Ok(start) = k.sym(Item::SymNmiPanic) else { return false };
    let size = k.opt(Item::SymNmiPanicSize).unwrap_or(OOPS_END_SIZE_FALLBACK);
    start < ret && ret.0 <= start.0.saturating_add(size)
}

/// The `i`-th variadic argument of `panic` (or of `vpanic`'s `va_list`) as
/// a 64-bit word.
fn vararg<M: PhysMem + ?Sized>(k: &Kernel<'_, M>, regs: &CpuState, i: usize) -> Result<u64, Error> {
    if at_vpanic(k, regs) {
        // Integer arguments: from the register save area while gp_offset
        // is below the 6 registers' 48 bytes, then from the stack.
        let (gp_offset, overflow, save) = va_list(k, Gva(regs.rsi))?;
        let gp = u64::from(gp_offset.min(48)) / 8;
        let i = i as u64;
        return if gp + i < 6 {
            k.read_u64(Gva(save).add(8 * (gp + i)))
        } else {
            k.read_u64(Gva(overflow).add(8 * (gp + i - 6)))
        };
    }
    match i {
        0 => Ok(regs.rsi),
        1 => Ok(regs.rdx),
        2 => Ok(regs.rcx),
        3 => Ok(regs.r8),
        4 => Ok(regs.r9),
        _ => k.read_u64(Gva(regs.rsp).add(8 * (i as u64 - 4))),
    }
}

/// Renders `panic`'s message (`vsnprintf(fmt, args)`, a useful subset:
/// `%s %c %d %i %u %x %X %o %p%<ext>` with flags, width, precision and
/// length modifiers) into `out`, without a trailing newline. Returns the
/// length. An unreadable `fmt` is an error; an unreadable `%s` argument
/// renders as `(efault)`, as the kernel does.
pub fn panic_message<M: PhysMem + ?Sized>(k: &Kernel<'_, M>, regs: &CpuState, out: &mut [u8]) -> Result<usize, Error> {
    let mut fmt = [0u8; FMT_MAX];
    let n = k.read_cstr(Gva(regs.rdi), &mut fmt)?;
    let mut w = FmtBuf::new(out);
    vsnprintf(&fmt[..n], |i| vararg(k, regs, i), |p, buf| k.read_cstr(Gva(p), buf), &mut w);
    let mut len = w.len();
    while len > 0 && out[len - 1] == b'\n' {
        len -= 1;
    }
    Ok(len)
}

/// The kernel's `vsnprintf`, reduced: `arg(i)` fetches the i-th argument
/// word, `read_str(ptr, buf)` a string argument.
pub fn vsnprintf(
    fmt: &[u8],
    mut arg: impl FnMut(usize) -> Result<u64, Error>,
    mut read_str: impl FnMut(u64, &mut [u8]) -> Result<usize, Error>,
    w: &mut FmtBuf<'_>,
) {
    let mut i = 0usize;
    let mut argn = 0usize;
    let mut next_arg = |argn: &mut usize| -> u64 {
        if *argn >= MAX_ARGS {
            return 0;
        }
        let v = arg(*argn).unwrap_or(0);
        *argn += 1;
        v
    };
    while i < fmt.len() && !w.is_full() {
        let c = fmt[i];
        i += 1;
        // KERN_SOH + level: printk metadata, not text.
        if c == 0x01 && i < fmt.len() {
            i += 1;
            continue;
        }
        if c != b'%' {
            w.push(c);
            continue;
        }
        let (mut left, mut zero, mut plus, mut space, mut alt) = (false, false, false, false, false);
        while i < fmt.len() {
            match fmt[i] {
                b'-' => left = true,
                b'0' => zero = true,
                b'+' => plus = true,
                b' ' => space = true,
                b'#' => alt = true,
                _ => break,
            }
            i += 1;
        }
        let mut width = 0usize;
        if i < fmt.len() && fmt[i] == b'*' {
            width = (next_arg(&mut argn) as i32).unsigned_abs().min(64) as usize;
            i += 1;
        }
        while i < fmt.len() && fmt[i].is_ascii_digit() {
            width = (width * 10 + (fmt[i] - b'0') as usize).min(64);
            i += 1;
        }
        let mut precision: Option<usize> = None;
        if i < fmt.len() && fmt[i] == b'.' {
            i += 1;
            let mut p = 0usize;
            if i < fmt.len() && fmt[i] == b'*' {
                p = (next_arg(&mut argn) as i32).max(0).min(STR_ARG_MAX as i32) as usize;
                i += 1;
            }
            while i < fmt.len() && fmt[i].is_ascii_digit() {
                p = (p * 10 + (fmt[i] - b'0') as usize).min(STR_ARG_MAX);
                i += 1;
            }
            precision = Some(p);
        }
        // Length: hh h l ll z t j L; only 8 vs 4 bytes matters here.
        let mut bits = 32u32;
        while i < fmt.len() {
            match fmt[i] {
                b'l' | b'z' | b't' | b'j' | b'L' => bits = 64,
                b'h' => bits = bits.min(16),
                _ => break,
            }
            i += 1;
        }
        if i >= fmt.len() {
            break;
        }
        let conv = fmt[i];
        i += 1;
        let mut tmp = [0u8; 72];
        let mut t = FmtBuf::new(&mut tmp);
        let trunc = |v: u64| if bits == 64 { v } else if bits == 16 { v & 0xffff } else { v & 0xffff_ffff };
        match conv {
            b'%' => {
                w.push(b'%');
                continue;
            }
            b'd' | b'i' => {
                let v = next_arg(&mut argn);
                let s = match bits { 64 => v as i64, 16 => v as u16 as i16 as i64, _ => v as u32 as i32 as i64 };
                if s >= 0 && plus {
                    t.push(b'+');
                } else if s >= 0 && space {
                    t.push(b' ');
                }
                let _ = write!(t, "{s}");
            }
            b'u' => {
                let _ = write!(t, "{}", trunc(next_arg(&mut argn)));
            }
            b'x' => {
                if alt { t.push_bytes(b"0x") }
                let _ = write!(t, "{:x}", trunc(next_arg(&mut argn)));
            }
            b'X' => {
                if alt { t.push_bytes(b"0X") }
                let _ = write!(t, "{:X}", trunc(next_arg(&mut argn)));
            }
            b'o' => {
                let _ = write!(t, "{:o}", trunc(next_arg(&mut argn)));
            }
            b'c' => t.push(next_arg(&mut argn) as u8),
            b's' => {
                let p = next_arg(&mut argn);
                let max = precision.unwrap_or(STR_ARG_MAX).min(STR_ARG_MAX);
                let mut sb = [0u8; STR_ARG_MAX];
                if p == 0 {
                    t.push_bytes(b"(null)");
                } else {
                    match read_str(p, &mut sb[..max]) {
                        Ok(n) => {
                            pad(w, width, n, left, false);
                            w.push_bytes(&sb[..n]);
                            pad_after(w, width, n, left);
                            continue;
                        }
                        Err(_) => t.push_bytes(b"(efault)"),
                    }
                }
            }
            b'p' => {
                // %pS, %pB, %ps, %pK, ...: print the raw pointer; the host
                // symbolizes. Consume the extension letters.
                while i < fmt.len() && fmt[i].is_ascii_alphanumeric() {
                    i += 1;
                }
                let _ = write!(t, "0x{:016x}", next_arg(&mut argn));
            }
            other => {
                // Unknown conversion: print it verbatim, as text.
                w.push(b'%');
                w.push(other);
                continue;
            }
        }
        let n = t.len();
        let numeric = conv != b's' && conv != b'c';
        pad(w, width, n, left, zero && numeric);
        w.push_bytes(t.as_bytes());
        pad_after(w, width, n, left);
    }
}

fn pad(w: &mut FmtBuf<'_>, width: usize, n: usize, left: bool, zero: bool) {
    if !left {
        for _ in n..width {
            w.push(if zero { b'0' } else { b' ' });
        }
    }
}

fn pad_after(w: &mut FmtBuf<'_>, width: usize, n: usize, left: bool) {
    if left {
        for _ in n..width {
            w.push(b' ');
        }
    }
}

/// Return addresses for a backtrace: the words from `rsp` upwards that
/// point into kernel text, as the kernel's "?"-style stack dump finds them.
/// Stops at `stack_top` (when given), at an unmapped page, after
/// `max_words`, or when `out` is full. Returns how many were stored.
pub fn stack_return_addresses<M: PhysMem + ?Sized>(
    k: &Kernel<'_, M>,
    rsp: Gva,
    stack_top: Option<Gva>,
    max_words: usize,
    out: &mut [Gva],
) -> usize {
    let mut n = 0usize;
    let mut sp = Gva(rsp.0 & !7);
    for _ in 0..max_words {
        if n == out.len() || stack_top.is_some_and(|top| sp >= top) {
            break;
        }
        let Ok(v) = k.read_u64(sp) else { break };
        if k.is_kernel_text(Gva(v)) {
            out[n] = Gva(v);
            n += 1;
        }
        match sp.0.checked_add(8) {
            Some(s) => sp = Gva(s),
            None => break,
        }
    }
    n
}

/// The top of the kernel stack `rsp` is on, when it is `task`'s own
/// (`task->stack + THREAD_SIZE`); `None` on an IRQ or exception stack.
pub fn task_stack_top<M: PhysMem + ?Sized>(k: &Kernel<'_, M>, task: crate::task::Task, rsp: Gva) -> Option<Gva> {
    let base = crate::task::task_stack(k, task).ok()?;
    let top = base.0.checked_add(THREAD_SIZE)?;
    (base.0 <= rsp.0 && rsp.0 < top).then_some(Gva(top))
}
