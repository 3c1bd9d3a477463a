//! The call-frame rules in the repair image (`Kind::CallFrame`: how the
//! repair kernel unwinds `panic` and `check_panic_on_warn` to take a
//! panic_on_warn warning back to the warning) against binutils, on every
//! kit kernel: `objdump -d` finds the call sites, `readelf
//! --debug-dump=frames-interp` interprets the vmlinux's `.debug_frame` at
//! them, and the image's rule must say the same (the CFA, and where each
//! callee-saved register is saved).

use builder::{build_from_vmlinux, BuildOptions};
use repair_kernel::frame::FrameRule;
use repair_kernel::layout::{Kind, ITEMS};
use std::path::{Path, PathBuf};
use std::process::Command;

fn kit_file(rel: &str) -> PathBuf {
    let dir = match std::env::var_os("CRASH_REPAIR_KIT") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/crash-repair/kit"),
    };
    let p = dir.join(rel);
    assert!(p.exists(), "{} is missing: build the guest kit first with `scripts/guest-kit`", p.display());
    p
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e} (binutils is installed by scripts/setup)"));
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `nm -S`: name -> (address, size).
fn symbols(vmlinux: &Path, names: &[String]) -> Vec<(String, u64, u64)> {
    run(Command::new("nm").arg("-S").arg(vmlinux))
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 4 && names.iter().any(|n| n == f[3])).then(|| {
                (f[3].to_owned(), u64::from_str_radix(f[0], 16).unwrap(), u64::from_str_radix(f[1], 16).unwrap())
            })
        })
        .collect()
}

/// Addresses of `call ... <callee>` in `[start, start + size)`, by objdump.
fn call_sites(vmlinux: &Path, start: u64, size: u64, callee: &str) -> Vec<u64> {
    let text = run(Command::new("objdump")
        .args(["-d", "--no-show-raw-insn"])
        .arg(format!("--start-address={start:#x}"))
        .arg(format!("--stop-address={:#x}", start + size))
        .arg(vmlinux));
    text.lines()
        .filter(|l| l.contains("call") && l.trim_end().ends_with(&format!("<{callee}>")))
        .filter_map(|l| u64::from_str_radix(l.trim().split(':').next()?, 16).ok())
        .collect()
}

/// The last interpreted row at or below `pc` of the entry (CIE or FDE)
/// whose header line is at `lines[at]`: the CFA (`rsp+8`) and each
/// register column (`rbp` -> `c-16`); `None` when the entry has no rows.
fn rows(lines: &[&str], at: usize, pc: u64) -> Option<(String, Vec<(String, String)>)> {
    let header = lines.get(at + 1).filter(|h| h.trim_start().starts_with("LOC"))?;
    let header: Vec<&str> = header.split_whitespace().collect();
    let mut row = None;
    for r in lines[at + 2..].iter().take_while(|r| !r.trim().is_empty()) {
        let cols: Vec<&str> = r.split_whitespace().collect();
        if u64::from_str_radix(cols[0], 16).unwrap() <= pc || row.is_none() {
            row = Some(cols);
        }
    }
    let row = row?;
    let regs = header[2..].iter().zip(row[2..].iter()).map(|(h, v)| (h.to_string(), v.to_string())).collect();
    Some((row[1].to_owned(), regs))
}

/// readelf's interpreted row at `pc`: the FDE's own rows, or, for an FDE
/// without instructions, its CIE's initial row.
fn readelf_row(frames: &str, pc: u64) -> (String, Vec<(String, String)>) {
    let lines: Vec<&str> = frames.lines().collect();
    for (i, l) in lines.iter().enumerate() {
        let Some(range) = l.split("pc=").nth(1) else { continue };
        let (a, b) = range.trim().split_once("..").unwrap();
        let (a, b) = (u64::from_str_radix(a, 16).unwrap(), u64::from_str_radix(b, 16).unwrap());
        if !(a <= pc && pc < b) {
            continue;
        }
        if let Some(r) = rows(&lines, i, pc) {
            return r;
        }
        let cie = l.split("cie=").nth(1).and_then(|c| c.split_whitespace().next()).unwrap();
        let at = lines
            .iter()
            .position(|c| c.starts_with(cie) && c.contains(" CIE "))
            .unwrap_or_else(|| panic!("CIE {cie} not found"));
        return rows(&lines, at, 0).unwrap_or_else(|| panic!("CIE {cie} has no rows"));
    }
    panic!("no FDE covers {pc:#x}");
}

/// The rule as readelf would print it, in [`FrameRule`]'s words.
fn expected(cfa: &str, regs: &[(String, String)]) -> String {
    let (base, off) = cfa.split_once('+').unwrap();
    let mut s = format!("CFA = {base} + {:#x}", off.parse::<u64>().unwrap());
    for name in ["rbx", "rbp", "r12", "r13", "r14", "r15"] {
        if let Some((_, v)) = regs.iter().find(|(n, _)| n == name) {
            if let Some(k) = v.strip_prefix("c-") {
                s.push_str(&format!("; {name} at CFA-{k}"));
            }
        }
    }
    s
}

fn rules_match_binutils(dir: &str) {
    let vmlinux = kit_file(&format!("{dir}/vmlinux"));
    let image = build_from_vmlinux(&vmlinux, &BuildOptions::default()).unwrap_or_else(|e| panic!("{e}"));
    let frames = run(Command::new("readelf").arg("--debug-dump=frames-interp").arg(&vmlinux));
    let mut checked = 0;
    for (i, spec) in ITEMS.iter().enumerate().filter(|(_, s)| s.kind == Kind::CallFrame) {
        let names = [spec.ty.to_owned(), format!("{}.cold", spec.ty), spec.member.to_owned()];
        let syms = symbols(&vmlinux, &names);
        let callee_present = syms.iter().any(|(n, _, _)| n == spec.member);
        let sites: Vec<u64> = syms
            .iter()
            .filter(|(n, _, _)| *n != spec.member)
            .flat_map(|(_, a, s)| call_sites(&vmlinux, *a, *s, spec.member))
            .collect();
        let ours = FrameRule::unpack(image.layout.values[i]);
        if !callee_present || sites.is_empty() {
            assert_eq!(ours, None, "{dir}: {spec:?}: no call in this kernel, yet a rule");
            continue;
        }
        let want: Vec<String> = sites
            .iter()
            .map(|&pc| {
                let (cfa, regs) = readelf_row(&frames, pc);
                expected(&cfa, &regs)
            })
            .collect();
        let ours = ours.unwrap_or_else(|| panic!("{dir}: {spec:?}: no rule; readelf says {want:?}"));
        for w in &want {
            assert_eq!(&ours.to_string(), w, "{dir}: {} calling {}", spec.ty, spec.member);
        }
        eprintln!("{dir}: {} calling {} at {} site(s): {ours}", spec.ty, spec.member, sites.len());
        checked += 1;
    }
    assert!(checked >= 1, "{dir}: no call-frame rule was checked");
}

#[test]
fn lkdtm_6_1() {
    rules_match_binutils("lkdtm");
}

#[test]
fn lkdtm_6_12() {
    rules_match_binutils("lkdtm-6.12");
}

#[test]
fn matrix_5_10() {
    rules_match_binutils("matrix/5.10");
}

#[test]
fn matrix_6_1() {
    rules_match_binutils("matrix/6.1");
}

#[test]
fn matrix_6_12() {
    rules_match_binutils("matrix/6.12");
}

#[test]
fn matrix_7() {
    rules_match_binutils("matrix/7");
}

/// The `lock or $imm,disp(%rdi)` (objdump's words) at `addr`, or in the
/// first function it calls that has one (the -Os kernels call a constant-
/// propagated `set_ti_thread_flag` clone): the bit it sets.
fn objdump_flag_bit(vmlinux: &Path, addr: u64, depth: u32) -> Option<u32> {
    let text = run(Command::new("objdump")
        .args(["-d", "--no-show-raw-insn"])
        .arg(format!("--start-address={addr:#x}"))
        .arg(format!("--stop-address={:#x}", addr + 0x60))
        .arg(vmlinux));
    let mut calls = Vec::new();
    for l in text.lines() {
        if let Some(rest) = l.split("lock or").nth(1) {
            if let Some(mem) = rest.trim_end().strip_suffix("(%rdi)") {
                let (imm, disp) = mem.split_once(',')?;
                let imm = u64::from_str_radix(imm.split('$').nth(1)?.trim_start_matches("0x"), 16).ok()?;
                let disp = if disp.is_empty() { 0 } else { u64::from_str_radix(disp.trim_start_matches("0x"), 16).ok()? };
                return Some(disp as u32 * 8 + imm.trailing_zeros());
            }
        }
        if l.contains("call") && !l.contains("__fentry__") {
            if let Some(t) = l.split_whitespace().rev().nth(1).and_then(|a| u64::from_str_radix(a, 16).ok()) {
                calls.push(t);
            }
        }
        if l.trim_end().ends_with("ret") || l.contains("__x86_return_thunk") {
            break;
        }
    }
    if depth == 0 {
        return None;
    }
    calls.into_iter().find_map(|t| objdump_flag_bit(vmlinux, t, depth - 1))
}

fn tif_sigpending_matches_objdump(dir: &str) {
    let vmlinux = kit_file(&format!("{dir}/vmlinux"));
    let image = build_from_vmlinux(&vmlinux, &BuildOptions::default()).unwrap_or_else(|e| panic!("{e}"));
    let ours = image.layout.get(repair_kernel::layout::Item::TifSigpending);
    let (_, addr, _) = symbols(&vmlinux, &["signal_wake_up_state".to_owned()])[0].clone();
    let want = objdump_flag_bit(&vmlinux, addr, 1).map(u64::from);
    assert!(want.is_some(), "{dir}: objdump shows no lock or in signal_wake_up_state");
    assert_eq!(ours, want, "{dir}: TIF_SIGPENDING");
    eprintln!("{dir}: TIF_SIGPENDING is bit {}", want.unwrap());
}

#[test]
fn tif_sigpending_of_every_kit_kernel() {
    for dir in ["lkdtm", "lkdtm-6.12", "matrix/5.10", "matrix/6.1", "matrix/6.12", "matrix/7"] {
        tif_sigpending_matches_objdump(dir);
    }
}
