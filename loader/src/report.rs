//! `repair-guest diagnose`: a read-only report of a stopped guest, made on
//! the host with the repair kernel's own walkers over [`GuestPhys`]: the crash
//! and its message, the offending task, a symbolized backtrace, the log tail,
//! the task list. Nothing is written to the guest (the memory view refuses
//! writes, and registers are only read).

use crate::access::{GuestAccess, VcpuId};
use crate::flow::{Mode, Session};
use crate::guestmem::GuestPhys;
use crate::symbolize::{Frame, Symbolizer};
use crate::flow::{crash_kind_name, reason_name};
use repair_kernel::contract::{field_str, Action, ContractOut};
use repair_kernel::mem::{Gva, PhysMem};
use repair_kernel::task::{self, TaskInfo};
use serde::Serialize;

/// One task of the task list.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct TaskLine {
    pub pid: i32,
    pub tgid: i32,
    pub ppid: i32,
    pub state: String,
    pub comm: String,
    pub kthread: bool,
}

/// One frame of the backtrace.
#[derive(Clone, Debug, Serialize)]
pub struct FrameLine {
    pub addr: String,
    pub function: Option<String>,
    pub text: String,
}

/// The whole report.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub kernel: String,
    pub kaslr_slide: String,
    pub cpu: u32,
    pub rip: String,
    pub at_panic: bool,
    pub kind: String,
    pub message: String,
    pub pid: i32,
    pub tgid: i32,
    pub comm: String,
    pub verdict: String,
    pub reason_code: String,
    pub reason: String,
    pub backtrace: Vec<FrameLine>,
    pub log_tail: Vec<String>,
    pub tasks: Vec<TaskLine>,
    pub tasks_error: Option<String>,
    pub integrity: Integrity,
}

/// Kernel text and rodata against the image's snapshot hashes.
#[derive(Clone, Debug, Serialize, Default)]
pub struct Integrity {
    /// `vmlinux file` or `live guest`: what the hashes were taken from.
    pub snapshot: String,
    pub checked: u32,
    pub mismatched: u32,
    pub unreadable: u32,
    /// The differing pages, link-time, with the function at the page's start.
    pub pages: Vec<String>,
}

/// Picks the vCPU to report on: the one stopped at `panic`, else vCPU 0.
pub fn crashed_vcpu<G: GuestAccess + ?Sized>(guest: &mut G, panic_addr: Gva) -> Result<VcpuId, crate::access::AccessError> {
    let vcpus = guest.vcpus()?;
    for v in &vcpus {
        if guest.get_regs(*v)?.rip == panic_addr.0 {
            return Ok(*v);
        }
    }
    Ok(vcpus.first().copied().unwrap_or(VcpuId(0)))
}

/// Makes the report. `symbolizer` (from the vmlinux) names the frames.
pub fn diagnose<G: GuestAccess + ?Sized>(
    guest: &mut G,
    session: &Session,
    vcpu: VcpuId,
    symbolizer: Option<&Symbolizer>,
    log_lines: u32,
) -> Result<Report, crate::flow::FlowError> {
    let symbolizer = symbolizer.or(session.kallsyms.as_deref());
    let regs = guest.get_regs(vcpu)?;
    let input = session.contract_input(vcpu, &regs, Mode::Diagnose);
    let mut mem = GuestPhys::read_only(guest, session.ram_end);

    // The repair kernel's walk and decision, run on the host, read-only.
    let mut out = ContractOut::empty();
    repair_kernel::run(&mut mem, &input, &mut out);

    let k = repair_kernel::kernel_view(&mut mem, &input);
    let mut addrs = [Gva(0); 256];
    let n = repair_kernel::backtrace(&k, &input, &mut addrs);
    // The kernel's own unwinder where the image knows its ORC tables: the
    // very frames the guest's Call Trace prints. Else return addresses
    // found on the stack, checked against their call sites.
    let orc = orc_tables(session).and_then(|t| crate::orc::unwind(&k, &t, regs.rip, regs.rsp, regs.rbp));
    let backtrace = match orc {
        Some(frames) if frames.len() > 1 => frames
            .iter()
            .map(|&(a, is_return)| frame_line(symbolizer.map(|s| s.frame(a, session.slide.slide, is_return)), a))
            .collect(),
        _ => build_backtrace(&k, regs.rip, &addrs[..n], session.slide.slide, symbolizer),
    };

    let mut log = vec![0u8; 64 * 1024];
    let log_len = repair_kernel::printk::log_tail(&k, log_lines, &mut log).unwrap_or(0);
    let log_tail = String::from_utf8_lossy(&log[..log_len]).lines().map(str::to_string).collect();

    let mut tasks = Vec::new();
    let walk = task::for_each_process(&k, session.cfg.max_tasks, |t| {
        if let Ok(info) = TaskInfo::read(&k, t) {
            tasks.push(task_line(&info));
        }
        true
    });
    let tasks_error = walk.err().map(|e| e.to_string());
    let integrity = check_integrity(&mut mem, &input, session, symbolizer);

    let action = Action::from_u32(out.action).unwrap_or(Action::None);
    Ok(Report {
        kernel: session.image.kernel.release.clone(),
        kaslr_slide: format!("{:#x}", session.slide),
        cpu: vcpu.0,
        rip: format!("{:#x}", regs.rip),
        at_panic: regs.rip == session.panic_addr()?.0,
        kind: crash_kind_name(out.crash_kind),
        message: field_str(&out.message).to_string(),
        pid: out.pid,
        tgid: out.tgid,
        comm: field_str(&out.comm).to_string(),
        verdict: action.name().into(),
        reason_code: reason_name(out.reason_code),
        reason: field_str(&out.reason).to_string(),
        backtrace,
        log_tail,
        tasks,
        tasks_error,
        integrity,
    })
}

/// The ORC tables of the session's kernel, from its profile.
fn orc_tables(session: &Session) -> Option<crate::orc::OrcTables> {
    let p = symbols::Profile::from_json(&session.image.profile_json).ok()?;
    crate::orc::OrcTables::new(
        p.symbol("__start_orc_unwind_ip")?,
        p.symbol("__stop_orc_unwind_ip")?,
        p.symbol("__start_orc_unwind")?,
        session.slide.slide,
    )
}

/// Hashes the live text and rodata pages (read-only, nothing restored).
fn check_integrity<M: PhysMem + ?Sized>(
    mem: &mut M,
    input: &repair_kernel::contract::ContractIn,
    session: &Session,
    sym: Option<&Symbolizer>,
) -> Integrity {
    use repair_kernel::integrity::{check_pages, IntegrityInput, PageHash};
    let image = &session.image;
    let hashes: Vec<PageHash> = image.page_hashes.iter().map(|(&page, &sha256)| PageHash { page, sha256 }).collect();
    let mut k = repair_kernel::kernel_view(mem, input);
    let mut pages = Vec::new();
    let rep = check_pages(&mut k, &IntegrityInput { hashes: &hashes, skips: &image.skips, pristine: None }, false, |m| {
        if pages.len() < 64 {
            let name = sym
                .map(|s| s.frame(m.gva.0, session.slide.slide, false).display())
                .unwrap_or_else(|| format!("{:#x}", m.gva.0));
            pages.push(format!("{:#x}{} {name}", m.page.0, if m.unreadable { " (unreadable)" } else { "" }));
        }
    });
    Integrity {
        snapshot: image.snapshot_source.as_str().to_string(),
        checked: rep.checked,
        mismatched: rep.mismatched,
        unreadable: rep.unreadable,
        pages,
    }
}

fn task_line(t: &TaskInfo) -> TaskLine {
    TaskLine {
        pid: t.pid,
        tgid: t.tgid,
        ppid: t.parent_pid,
        state: (task::task_state_to_char(t.state, t.exit_state) as char).to_string(),
        comm: t.comm_str().to_string(),
        kthread: t.flags & task::PF_KTHREAD != 0,
    }
}

/// Keeps the stack words that are real return addresses: the instruction
/// before each must be a call, and a direct call's target must be the
/// function of the frame above (or a retpoline thunk). What stays is the
/// reliable part of the trace, the one the kernel's unwinder prints without
/// `?`.
fn build_backtrace<M: PhysMem + ?Sized>(
    k: &repair_kernel::kmem::Kernel<'_, M>,
    rip: u64,
    candidates: &[Gva],
    slide: u64,
    sym: Option<&Symbolizer>,
) -> Vec<FrameLine> {
    let mut frames = vec![frame_line(sym.map(|s| s.frame(rip, slide, false)), rip)];
    let Some(sym) = sym else {
        frames.extend(candidates.iter().map(|a| frame_line(None, a.0)));
        return frames;
    };
    // The function the next (outer) frame must have called.
    let mut callee = sym.base_name(rip.wrapping_sub(slide)).map(str::to_string);
    for &ret in candidates {
        let Some(target) = call_target(k, ret.0) else { continue };
        let ok = match target {
            CallTarget::Direct(t) => {
                let t_link = t.wrapping_sub(slide);
                sym.is_thunk(t_link) || (callee.is_some() && sym.base_name(t_link) == callee.as_deref())
            }
            CallTarget::Indirect => true,
        };
        if !ok {
            continue;
        }
        let ret_link = ret.0.wrapping_sub(slide).wrapping_sub(1);
        callee = sym.base_name(ret_link).map(str::to_string);
        frames.push(frame_line(Some(sym.frame(ret.0, slide, true)), ret.0));
    }
    frames
}

fn frame_line(f: Option<Frame>, addr: u64) -> FrameLine {
    match f {
        Some(f) => FrameLine { addr: format!("{addr:#x}"), function: f.function.clone(), text: f.display() },
        None => FrameLine { addr: format!("{addr:#x}"), function: None, text: format!("{addr:#x}") },
    }
}

enum CallTarget {
    Direct(u64),
    Indirect,
}

/// Decodes the call instruction that ends just before `ret`, if any.
fn call_target<M: PhysMem + ?Sized>(k: &repair_kernel::kmem::Kernel<'_, M>, ret: u64) -> Option<CallTarget> {
    let mut b = [0u8; 7];
    k.read(Gva(ret.wrapping_sub(7)), &mut b).ok()?;
    // e8 rel32
    if b[2] == 0xe8 {
        let rel = i32::from_le_bytes([b[3], b[4], b[5], b[6]]);
        return Some(CallTarget::Direct(ret.wrapping_add(rel as i64 as u64)));
    }
    // ff /2 forms: ff d0+r (2 bytes), ff 50+r disp8 (3), ff 14 24 / ff 55 xx (3),
    // ff 15 disp32 (6), ff 90+r disp32 (6), ff 94 sib disp32 (7)
    let modrm_is_call = |m: u8| (m >> 3) & 7 == 2;
    if b[5] == 0xff && modrm_is_call(b[6]) && b[6] >> 6 == 3 {
        return Some(CallTarget::Indirect);
    }
    if b[4] == 0xff && modrm_is_call(b[5]) && b[5] >> 6 == 1 {
        return Some(CallTarget::Indirect);
    }
    if b[1] == 0xff && modrm_is_call(b[2]) && (b[2] >> 6 == 2 || b[2] & 0xc7 == 0x05) {
        return Some(CallTarget::Indirect);
    }
    if b[0] == 0xff && modrm_is_call(b[1]) && b[1] >> 6 == 2 && b[1] & 7 == 4 {
        return Some(CallTarget::Indirect);
    }
    None
}

