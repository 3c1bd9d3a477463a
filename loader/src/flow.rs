//! The repair flow, written once over [`GuestAccess`]: attach (find KASLR,
//! check the build, plan the staging), arm the trap at `panic`, and on each
//! trap: save, stage, run the repair kernel on the crashed vCPU, read its
//! verdict, restore, apply, resume. Every step is timed.

use crate::access::{self, AccessError, BpKind, GuestAccess, Gpa, Gva, RunOutcome, VcpuId};
use crate::guestmem::{probe_ram_end, GuestPhys};
use crate::kaslr::{self, KaslrError};
use builder::{RepairImage, StageError, StageOptions, StagePlan};
use repair_kernel::arch::x86_64::pgtable::Paging as WalkPaging;
use repair_kernel::contract::{
    field_str, Action, Contract, ContractIn, ContractOut, CpuState, RunStatus,
};
use repair_kernel::layout::Item;
use repair_kernel::verdict::{CrashKind, Reason};
use std::time::{Duration, Instant};

/// Errors of the flow. Each says what failed and what to do.
#[derive(Debug, thiserror::Error)]
pub enum FlowError {
    #[error(transparent)]
    Access(#[from] AccessError),
    #[error(transparent)]
    Kaslr(#[from] KaslrError),
    #[error("cannot stage the repair kernel: {0}")]
    Stage(#[from] StageError),
    #[error("staging the integrity data (megabytes of hashes and pages) needs a range reserved for the repair kernel: boot the guest with memmap=SIZE$BASE and pass that range as reserved (repair-guest --reserve BASE:SIZE)")]
    IntegrityNeedsReservedRange,
    #[error("the image's layout lacks {0:?}; rebuild it with build-repair-image")]
    Layout(Item),
    #[error("the repair kernel did not finish within {0:?} (it stopped at {1:#x}); the guest was restored as it was at the trap")]
    RunTimeout(Duration, u64),
    #[error("the repair kernel stopped at {rip:#x} instead of its completion point {done:#x}; the guest was restored as it was at the trap")]
    RunStray { rip: u64, done: u64 },
    #[error("the repair kernel left no valid contract block (status {0}); the guest was restored as it was at the trap")]
    BadContract(String),
    #[error("the repair kernel's resume state is not a sound kill ({0}); refusing to apply it")]
    UnsoundResume(String),
}

/// Where to put the repair kernel and how long it may run.
#[derive(Clone, Debug)]
pub struct FlowConfig {
    /// Guest-physical range borrowed for the repair kernel, saved and
    /// restored byte for byte around each run. Default: 0x10000..0x90000,
    /// in the first MiB that Linux reserves and does not use at run time.
    pub borrowed_base: Gpa,
    pub borrowed_size: u64,
    /// End of guest RAM; `None` probes it.
    pub ram_end: Option<u64>,
    pub run_timeout: Duration,
    pub max_tasks: u32,
    /// The range is reserved for the repair kernel (the guest was booted
    /// with `memmap=SIZE$BASE`): it is staged once, when the trap is armed,
    /// and never saved or restored. Required for `integrity`, whose
    /// megabytes do not fit borrowed low memory.
    pub reserved: bool,
    /// Stage the image's text/rodata hashes (and pristine pages, if it has
    /// them) so the repair kernel checks kernel text and restores what is
    /// corrupted. Needs `reserved`.
    pub integrity: bool,
    /// Where to journal each repair before touching the guest (see
    /// [`crate::journal`]), so a watcher killed mid-repair can be undone.
    pub journal: Option<std::path::PathBuf>,
    /// Called once the repair kernel is staged, before it runs: a fault
    /// injection point for tests of the journal (the CLI's
    /// `REPAIR_GUEST_TEST_ABORT_ONCE`); `None` in use.
    pub after_stage: Option<fn()>,
}

impl Default for FlowConfig {
    fn default() -> Self {
        Self {
            borrowed_base: Gpa(0x10000),
            borrowed_size: 0x80000,
            ram_end: None,
            run_timeout: Duration::from_secs(10),
            max_tasks: 32768,
            reserved: false,
            integrity: false,
            journal: None,
            after_stage: None,
        }
    }
}

/// Per-step wall times of one repair, in milliseconds.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Timings {
    pub save: f64,
    pub stage: f64,
    pub run: f64,
    pub verdict: f64,
    pub restore: f64,
    pub total: f64,
}

/// What one run of the repair kernel found and what was done.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub out: ContractOut,
    /// The crashed vCPU's registers at the trap.
    pub crashed: CpuState,
    pub vcpu: VcpuId,
    /// True when the verdict was applied (a kill): the vCPU now has
    /// `out.resume`.
    pub applied: bool,
    pub timings: Timings,
}

impl Outcome {
    pub fn action(&self) -> Action {
        Action::from_u32(self.out.action).unwrap_or(Action::None)
    }
    pub fn message(&self) -> &str {
        field_str(&self.out.message)
    }
    pub fn reason(&self) -> &str {
        field_str(&self.out.reason)
    }
    pub fn comm(&self) -> &str {
        field_str(&self.out.comm)
    }
}

/// Whether the verdict may change the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Apply a kill verdict.
    Repair,
    /// Run the repair kernel read-only; restore everything whatever it says.
    Diagnose,
}

/// One guest, attached: the image checked against its kernel, the slide
/// known, the staging planned (pre-staged: everything to write is ready).
#[derive(Debug)]
pub struct Session {
    pub image: RepairImage,
    /// The KASLR slide of the running kernel, and how it was found.
    pub slide: kaslr::Slide,
    pub ram_end: u64,
    pub plan: StagePlan,
    pub cfg: FlowConfig,
    pub nr_vcpus: u32,
    armed: bool,
    /// The plan's writes, split by how they may be written.
    staging: Staging,
    /// In a reserved range: everything but the per-run pages is in place.
    prestaged: bool,
    /// A repair a killed watcher left half done, undone at attach from the
    /// journal: the vCPU it was on (taken by whoever reports it).
    pub undone_repair: Option<VcpuId>,
    /// Frame names from the guest's own kallsyms, read at attach, for an
    /// image built from BTF (no vmlinux to name them): see
    /// [`crate::autoimage::kallsyms_symbolizer`].
    pub kallsyms: Option<Box<crate::symbolize::Symbolizer>>,
}

/// A staging plan's writes, split by what they hold: the repair kernel's
/// code goes through the backend's ordinary (code-cache invalidating) path,
/// everything else may take the fast data path.
#[derive(Debug, Default)]
struct Staging {
    code: Vec<(u64, Vec<u8>)>,
    data: Vec<(u64, Vec<u8>)>,
    /// The writable pages (data, bss, stack, contract): rewritten for every
    /// run, so each starts as the image says.
    per_run: Vec<(u64, Vec<u8>)>,
}

impl Staging {
    fn new(image: &RepairImage, plan: &StagePlan) -> Self {
        const PAGE: u64 = 4096;
        let code_pages: std::collections::BTreeSet<u64> = plan
            .window
            .iter()
            .filter(|w| {
                image.unikernel.segments.iter().any(|s| {
                    s.flags & builder::image::PF_X != 0 && (s.vaddr..s.vaddr + s.memsz).contains(&w.gva)
                })
            })
            .map(|w| w.gpa)
            .collect();
        let writable: std::collections::BTreeSet<u64> = plan.window.iter().filter(|w| w.writable).map(|w| w.gpa).collect();
        let mut st = Staging::default();
        for (gpa, bytes) in &plan.writes {
            for (i, page) in bytes.chunks(PAGE as usize).enumerate() {
                let at = gpa + i as u64 * PAGE;
                let list = if code_pages.contains(&at) { &mut st.code } else { &mut st.data };
                push_run(list, at, page);
                if writable.contains(&at) {
                    push_run(&mut st.per_run, at, page);
                }
            }
        }
        st
    }
}

/// Appends a page to a list of runs, extending the last run when contiguous.
fn push_run(list: &mut Vec<(u64, Vec<u8>)>, gpa: u64, bytes: &[u8]) {
    match list.last_mut() {
        Some((g, b)) if *g + b.len() as u64 == gpa => b.extend_from_slice(bytes),
        _ => list.push((gpa, bytes.to_vec())),
    }
}

/// The staging plan of `image` in the configured range, and its writes
/// split by kind.
fn plan_staging(
    image: &RepairImage,
    cfg: &FlowConfig,
    ram_end: u64,
    paging: builder::stage::Paging,
) -> Result<(StagePlan, Staging), FlowError> {
    let plan = StagePlan::with_options(
        image,
        cfg.borrowed_base.0,
        cfg.borrowed_size,
        ram_end,
        &StageOptions { paging, integrity: cfg.integrity },
    )?;
    let staging = Staging::new(image, &plan);
    Ok((plan, staging))
}

/// Undoes the repair journalled at `path`, if one was left; returns its vCPU.
fn undo_journal<G: GuestAccess + ?Sized>(guest: &mut G, path: &std::path::Path) -> Result<Option<VcpuId>, FlowError> {
    use crate::journal::{self, Journal, JournalError};
    let undone = match Journal::read(path) {
        Ok(None) => return Ok(None),
        Ok(Some(j)) => match j.undo(guest) {
            Ok(()) => Some(j.vcpu),
            Err(JournalError::Guest(e)) => return Err(e.into()),
            Err(e) => {
                tracing::warn!("{e}");
                None
            }
        },
        Err(e) => {
            tracing::warn!("{e}; ignored");
            None
        }
    };
    journal::clear(path);
    Ok(undone)
}

/// Wall time since `t` in ms.
fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

impl Session {
    /// Attaches to a stopped guest: finds the KASLR slide, refuses an image
    /// of another kernel build, plans the staging.
    pub fn attach<G: GuestAccess + ?Sized>(
        guest: &mut G,
        image: RepairImage,
        cfg: FlowConfig,
    ) -> Result<Session, FlowError> {
        guest.pause()?;
        // First of all: a watcher killed mid-repair left the repair kernel
        // staged and a vCPU pointed at it; put the guest back as it was at
        // the trap before reading anything from it.
        let undone_repair = match &cfg.journal {
            Some(path) => undo_journal(guest, path)?,
            None => None,
        };
        let vcpus = guest.vcpus()?;
        let first = *vcpus.first().ok_or_else(|| AccessError::Other("the guest has no vCPUs".into()))?;
        let regs = guest.get_regs(first)?;
        let ram_end = match cfg.ram_end {
            Some(e) => e,
            None => probe_ram_end(guest)?,
        };
        let paging = WalkPaging::from_regs(regs.cr3, regs.cr4);
        let slide = {
            let mem = GuestPhys::read_only(guest, ram_end);
            kaslr::find_slide(&mem, paging, &image.layout, &image.kernel.banner)?
        };
        let kallsyms = {
            let mem = GuestPhys::read_only(guest, ram_end);
            crate::autoimage::kallsyms_symbolizer(&mem, paging, &image.profile_json, slide.slide).map(Box::new)
        };
        let paging = if paging.la57 { builder::stage::Paging::FiveLevel } else { builder::stage::Paging::FourLevel };
        if cfg.integrity && !cfg.reserved {
            return Err(FlowError::IntegrityNeedsReservedRange);
        }
        let (plan, staging) = plan_staging(&image, &cfg, ram_end, paging)?;
        Ok(Session {
            image,
            slide,
            ram_end,
            plan,
            cfg,
            nr_vcpus: vcpus.len() as u32,
            armed: false,
            staging,
            prestaged: false,
            undone_repair,
            kallsyms,
        })
    }

    /// After a guest reset or reboot: the same image, a new kernel
    /// instance. Finds the new KASLR slide (the banner check refuses
    /// another kernel), forgets the trap (QEMU's breakpoint must already
    /// be gone: the caller cleared it at the reset) and any pre-staging (a
    /// reboot reuses the memory). The guest must be stopped.
    pub fn reattach<G: GuestAccess + ?Sized>(&mut self, guest: &mut G) -> Result<(), FlowError> {
        let vcpus = guest.vcpus()?;
        let first = *vcpus.first().ok_or_else(|| AccessError::Other("the guest has no vCPUs".into()))?;
        let regs = guest.get_regs(first)?;
        let paging = WalkPaging::from_regs(regs.cr3, regs.cr4);
        let slide = {
            let mem = GuestPhys::read_only(guest, self.ram_end);
            kaslr::find_slide(&mem, paging, &self.image.layout, &self.image.kernel.banner)?
        };
        self.slide = slide;
        self.armed = false;
        self.prestaged = false;
        Ok(())
    }

    /// Forgets the trap without touching the guest: the breakpoint is
    /// known gone (a reset was handled by removing it already).
    pub fn forget_trap(&mut self) {
        self.armed = false;
    }

    /// True while the trap is set.
    pub fn is_armed(&self) -> bool {
        self.armed
    }

    /// Replans the staging after the image changed (a live snapshot taken
    /// into it): the next [`Session::arm`] stages it again.
    pub fn replan(&mut self) -> Result<(), FlowError> {
        (self.plan, self.staging) = plan_staging(&self.image, &self.cfg, self.ram_end, self.plan.paging)?;
        self.prestaged = false;
        Ok(())
    }

    /// In a reserved range, writes the repair kernel, its tables and its
    /// data once (the guest must be stopped).
    pub fn prestage<G: GuestAccess + ?Sized>(&mut self, guest: &mut G) -> Result<(), FlowError> {
        if self.cfg.reserved && !self.prestaged {
            self.write_staging(guest, true)?;
            self.prestaged = true;
        }
        Ok(())
    }

    fn write_staging<G: GuestAccess + ?Sized>(&self, guest: &mut G, all: bool) -> Result<(), FlowError> {
        if all {
            for (gpa, bytes) in &self.staging.code {
                guest.write_phys(access::Gpa(*gpa), bytes)?;
            }
            for (gpa, bytes) in &self.staging.data {
                guest.write_phys_data(access::Gpa(*gpa), bytes)?;
            }
        } else {
            for (gpa, bytes) in &self.staging.per_run {
                guest.write_phys_data(access::Gpa(*gpa), bytes)?;
            }
        }
        Ok(())
    }

    /// Run-time address of a layout symbol.
    pub fn symbol(&self, item: Item) -> Result<Gva, FlowError> {
        self.image.layout.get(item).map(|a| self.slide.run_addr(a)).ok_or(FlowError::Layout(item))
    }

    /// Where the trap goes: the entry of the function that does the
    /// panic's work, `vpanic` where the vmlinux has it, else `panic`
    /// (`repair_kernel::panic::trap_addr`: the same choice inside the
    /// guest).
    pub fn panic_addr(&self) -> Result<Gva, FlowError> {
        self.symbol(Item::SymVpanic).or_else(|_| self.symbol(Item::SymPanic))
    }

    /// Sets the trap at the entry of `panic` (a hardware breakpoint: no
    /// guest byte changes), after pre-staging a reserved range.
    pub fn arm<G: GuestAccess + ?Sized>(&mut self, guest: &mut G) -> Result<(), FlowError> {
        self.prestage(guest)?;
        if !self.armed {
            guest.set_breakpoint(self.panic_addr()?, BpKind::Hardware)?;
            self.armed = true;
        }
        Ok(())
    }

    pub fn disarm<G: GuestAccess + ?Sized>(&mut self, guest: &mut G) -> Result<(), FlowError> {
        if self.armed {
            guest.clear_breakpoint(self.panic_addr()?, BpKind::Hardware)?;
            self.armed = false;
        }
        Ok(())
    }

    /// The contract input for a run on `vcpu` with these registers.
    pub fn contract_input(&self, vcpu: VcpuId, crashed: &CpuState, mode: Mode) -> ContractIn {
        ContractIn {
            crashed: *crashed,
            cpu: vcpu.0,
            nr_vcpus: self.nr_vcpus,
            kaslr_slide: self.slide.slide,
            ram_end: self.ram_end,
            borrowed_base: self.cfg.borrowed_base.0,
            borrowed_size: self.cfg.borrowed_size,
            max_tasks: self.cfg.max_tasks,
            read_only: (mode == Mode::Diagnose) as u32,
            layout: self.image.layout,
        }
    }

    /// The registers the repair kernel starts with on the crashed vCPU:
    /// its page tables, its entry and stack, the contract in `rdi`, the
    /// integrity table (or 0) in `rsi`, IF=0.
    /// Everything else (CR0, CR4, EFER, segments) stays the guest's.
    fn run_regs(&self, crashed: &CpuState) -> CpuState {
        CpuState {
            rip: self.plan.entry_rip,
            rsp: self.plan.stack_top,
            rdi: self.plan.contract_gva,
            rsi: self.plan.integrity_gva,
            rflags: 0x2,
            cr3: self.plan.cr3,
            ..*crashed
        }
    }

    /// Runs the repair kernel on `vcpu` of a guest stopped at the trap, and
    /// in [`Mode::Repair`] applies a kill verdict. Whatever happens, the
    /// borrowed memory is restored byte for byte and the vCPU gets either the
    /// verdict's resume state or its registers as they were at the trap. The
    /// guest is left stopped; the caller resumes it.
    pub fn repair<G: GuestAccess + ?Sized>(
        &self,
        guest: &mut G,
        vcpu: VcpuId,
        mode: Mode,
    ) -> Result<Outcome, FlowError> {
        let start = Instant::now();
        let mut t = Timings::default();

        // Save: the crashed registers and the bytes we are about to borrow.
        let step = Instant::now();
        let crashed = guest.get_regs(vcpu)?;
        let mut saved = Vec::new();
        if !self.cfg.reserved {
            saved = vec![0u8; self.plan.used as usize];
            guest.read_phys(self.cfg.borrowed_base, &mut saved)?;
        }
        t.save = ms(step);
        if let Some(path) = &self.cfg.journal {
            let j = crate::journal::Journal { vcpu, regs: crashed, base: self.cfg.borrowed_base, saved };
            // Without a journal a repair still beats letting the crash take
            // the guest: go on, and say so.
            if let Err(e) = j.write(path) {
                tracing::warn!("{e}; repairing without a journal");
            }
            saved = j.saved;
        }

        let result = self.stage_and_run(guest, vcpu, &crashed, mode, &mut t);

        // Restore, whatever the run did (a reserved range needs nothing).
        // Not code the guest runs: the fast path is sound.
        let step = Instant::now();
        let restore_mem = if self.cfg.reserved {
            Ok(())
        } else {
            guest.write_phys_data(self.cfg.borrowed_base, &saved)
        };
        let out = match result {
            Ok(out) => out,
            Err(e) => {
                guest.set_regs(vcpu, &crashed)?;
                restore_mem?;
                self.clear_journal();
                return Err(e);
            }
        };
        restore_mem?;
        let kill = mode == Mode::Repair
            && out.status == RunStatus::Done as u32
            && Action::from_u32(out.action).is_some_and(Action::resumes);
        let applied = if kill {
            let action = Action::from_u32(out.action).unwrap_or(Action::None);
            if let Err(e) = self.check_resume(action, &crashed, &out.resume) {
                guest.set_regs(vcpu, &crashed)?;
                self.clear_journal();
                return Err(e);
            }
            guest.set_regs(vcpu, &out.resume)?;
            true
        } else {
            guest.set_regs(vcpu, &crashed)?;
            false
        };
        self.clear_journal();
        t.restore = ms(step);
        t.total = ms(start);
        Ok(Outcome { out, crashed, vcpu, applied, timings: t })
    }

    fn clear_journal(&self) {
        if let Some(path) = &self.cfg.journal {
            crate::journal::clear(path);
        }
    }

    fn stage_and_run<G: GuestAccess + ?Sized>(
        &self,
        guest: &mut G,
        vcpu: VcpuId,
        crashed: &CpuState,
        mode: Mode,
        t: &mut Timings,
    ) -> Result<ContractOut, FlowError> {
        let step = Instant::now();
        // Borrowed memory is staged whole every time; a reserved range only
        // needs its per-run pages once pre-staged.
        self.write_staging(guest, !(self.cfg.reserved && self.prestaged))?;
        let contract = Contract::new(self.contract_input(vcpu, crashed, mode));
        guest.write_phys_data(access::Gpa(self.plan.contract_gpa), contract.as_bytes())?;
        guest.set_regs(vcpu, &self.run_regs(crashed))?;
        t.stage = ms(step);
        if let Some(hook) = self.cfg.after_stage {
            hook();
        }

        let step = Instant::now();
        let outcome = guest.run_vcpu_until(vcpu, access::Gva(self.plan.done_rip), self.cfg.run_timeout)?;
        t.run = ms(step);
        match outcome {
            RunOutcome::Reached(_) => {}
            RunOutcome::TimedOut(ev) => return Err(FlowError::RunTimeout(self.cfg.run_timeout, ev.rip.0)),
            RunOutcome::StoppedElsewhere(ev) => {
                return Err(FlowError::RunStray { rip: ev.rip.0, done: self.plan.done_rip })
            }
        }

        let step = Instant::now();
        let mut bytes = vec![0u8; std::mem::size_of::<Contract>()];
        guest.read_phys(access::Gpa(self.plan.contract_gpa), &mut bytes)?;
        let back = Contract::from_bytes(&bytes)
            .ok_or_else(|| FlowError::BadContract("magic, version or size wrong".into()))?;
        t.verdict = ms(step);
        match RunStatus::from_u32(back.output.status) {
            Some(RunStatus::Done) => Ok(back.output),
            Some(RunStatus::Faulted) => {
                let f = back.output.fault;
                Err(FlowError::BadContract(format!(
                    "the repair kernel faulted: vector {} at rip {:#x}, error code {:#x}, cr2 {:#x}",
                    f.vector, f.rip, f.error_code, f.cr2
                )))
            }
            other => Err(FlowError::BadContract(format!("{other:?}"))),
        }
    }

    /// The loader trusts the repair kernel, not the guest memory it read: a
    /// kill may only send the vCPU to `rewind_stack_and_make_dead` with the
    /// crashed context's address space and CPU modes.
    fn check_resume(&self, action: Action, crashed: &CpuState, resume: &CpuState) -> Result<(), FlowError> {
        if action == Action::ResumeWarning {
            // The return into check_panic_on_warn's caller: kernel text, on
            // the same stack a few frames above the trap.
            let (stext, etext) = (self.symbol(Item::SymStext)?, self.symbol(Item::SymEtext)?);
            if !(stext.0 <= resume.rip && resume.rip < etext.0) {
                return Err(FlowError::UnsoundResume(format!("rip {:#x} is not kernel text", resume.rip)));
            }
            let up = resume.rsp.wrapping_sub(crashed.rsp);
            if resume.rsp <= crashed.rsp || up > 3 * repair_kernel::frame::MAX_FRAME {
                return Err(FlowError::UnsoundResume(format!(
                    "rsp {:#x} is not a few frames above the trap's {:#x}",
                    resume.rsp, crashed.rsp
                )));
            }
        } else {
            let rewind = self.symbol(Item::SymRewindStackAndMakeDead)?;
            if resume.rip != rewind.0 {
                return Err(FlowError::UnsoundResume(format!(
                    "rip {:#x} is not rewind_stack_and_make_dead ({rewind})",
                    resume.rip
                )));
            }
        }
        let same = |what: &str, a: u64, b: u64| {
            if a == b {
                Ok(())
            } else {
                Err(FlowError::UnsoundResume(format!("{what} changed: {a:#x} -> {b:#x}")))
            }
        };
        same("cr3", crashed.cr3, resume.cr3)?;
        same("cr0", crashed.cr0, resume.cr0)?;
        same("cr4", crashed.cr4, resume.cr4)?;
        same("efer", crashed.efer, resume.efer)?;
        same("cs", crashed.cs, resume.cs)?;
        same("ss", crashed.ss, resume.ss)?;
        same("gs_base", crashed.gs_base, resume.gs_base)?;
        Ok(())
    }
}

/// Name of a crash kind code, for events and reports.
pub fn crash_kind_name(code: u32) -> String {
    match CrashKind::from_u32(code) {
        Some(k) => format!("{k}"),
        None => format!("unknown ({code})"),
    }
}

/// Name of a reason code.
pub fn reason_name(code: u32) -> String {
    match Reason::from_u32(code) {
        Some(r) => format!("{r}"),
        None => format!("unknown ({code})"),
    }
}
