//! The kernel layout the repair kernel works from: symbol addresses and
//! struct member offsets of one kernel build, as a flat table of numbers.
//!
//! The table of [`ITEMS`] is the single list of what the repair kernel needs
//! from a vmlinux: adding an item is one line below. The builder asks
//! `symbols` to extract exactly these names, looks every item up in the
//! resulting profile and fills a [`KernelLayout`]; the repair kernel reads it
//! back by [`Item`]. An
//! item the kernel build does not have is [`ABSENT`]; layout drift (for
//! example `task_struct.__state` versus `state`) is handled by asking for both
//! and using whichever is present.

/// Value of an item the kernel build does not have.
pub const ABSENT: u64 = u64::MAX;

/// What kind of number an item is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Link-time virtual address of a symbol (add the KASLR slide at run time).
    Symbol,
    /// Offset of a per-CPU variable inside each CPU's per-CPU area.
    PerCpu,
    /// Size in bytes of a type.
    Size,
    /// Byte offset of a member (a dotted path for nested members) in a type.
    Offset,
    /// Size in bytes of a member.
    MemberSize,
    /// Size in bytes of a symbol (`st_size` of a function or object), named
    /// by `ty`.
    SymbolSize,
    /// The frame rule ([`crate::frame::FrameRule`], packed) at every call
    /// from the function `ty` to the function `member`, read by the builder
    /// from the vmlinux's call-frame information; absent where the vmlinux
    /// has none (a BTF-only image) or the call sites' rules differ.
    CallFrame,
    /// The bit of `thread_info.flags` the function `ty` sets first (a
    /// preprocessor constant, read by the builder from the function's
    /// machine code: `builder::codefacts`).
    ThreadFlagBit,
    /// Link-time address bounding one code range of a compile unit, from
    /// DWARF (`DW_AT_low_pc`/`DW_AT_high_pc` or `DW_AT_ranges` of the unit
    /// DIE): `ty` is the unit's source name (`mm/slub.c`), `member` is
    /// `N.start` or `N.end` (half open) of its N-th range, largest first,
    /// ranges that only padding separates merged. BTF has no compile
    /// units: absent from a BTF-only image.
    UnitRange,
}

/// One entry of the table: what to look up, and whether the repair kernel can
/// work without it.
#[derive(Clone, Copy, Debug)]
pub struct ItemSpec {
    pub kind: Kind,
    /// The type (`task_struct`), or the symbol name for `Symbol`/`PerCpu`.
    pub ty: &'static str,
    /// The member path (`thread.sp`); empty for symbols and sizes.
    pub member: &'static str,
    /// False where an alternative item exists (`__state` or `state`) or the
    /// repair kernel degrades gracefully without it.
    pub required: bool,
}

macro_rules! items {
    ($( $name:ident = $kind:ident($ty:literal $(, $member:literal)?) $(, $opt:ident)? ;)*) => {
        /// Index into [`ITEMS`] and [`KernelLayout::values`].
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        #[repr(u16)]
        #[allow(non_camel_case_types)]
        pub enum Item { $($name,)* }

        /// Every item the repair kernel reads, in [`Item`] order.
        pub const ITEMS: &[ItemSpec] = &[
            $(ItemSpec {
                kind: Kind::$kind,
                ty: $ty,
                member: items!(@member $($member)?),
                required: items!(@req $($opt)?),
            },)*
        ];
    };
    (@member) => { "" };
    (@member $m:literal) => { $m };
    (@req) => { true };
    (@req optional) => { false };
}

items! {
    // --- symbols (link-time addresses) ---
    SymInitTask = Symbol("init_task");
    SymPerCpuOffset = Symbol("__per_cpu_offset");
    SymPanic = Symbol("panic");
    SymOopsEnd = Symbol("oops_end");
    SymRewindStackAndMakeDead = Symbol("rewind_stack_and_make_dead");
    SymMakeTaskDead = Symbol("make_task_dead");
    SymPageOffsetBase = Symbol("page_offset_base");
    SymPhysBase = Symbol("phys_base");
    SymPrb = Symbol("prb");
    SymNrCpuIds = Symbol("nr_cpu_ids");
    SymCpuOnlineMask = Symbol("__cpu_online_mask");
    SymLinuxBanner = Symbol("linux_banner");
    SymStext = Symbol("_stext");
    SymEtext = Symbol("_etext");
    SymStartRodata = Symbol("__start_rodata");
    SymEndRodata = Symbol("__end_rodata");
    SymStartJumpTable = Symbol("__start___jump_table");
    SymStopJumpTable = Symbol("__stop___jump_table");
    SymPanicCpu = Symbol("panic_cpu"), optional;
    SymStartText = Symbol("_text");
    // --- per-CPU variables (offsets in the per-CPU area) ---
    PcpuHot = PerCpu("pcpu_hot"), optional;
    PcpuCurrentTask = PerCpu("current_task"), optional;
    PcpuPreemptCount = PerCpu("__preempt_count"), optional;
    PcpuRunqueues = PerCpu("runqueues");
    // --- struct task_struct ---
    TaskSize = Size("task_struct");
    TaskPid = Offset("task_struct", "pid");
    TaskTgid = Offset("task_struct", "tgid");
    TaskComm = Offset("task_struct", "comm");
    TaskTasks = Offset("task_struct", "tasks");
    TaskStateNew = Offset("task_struct", "__state"), optional;
    TaskStateOld = Offset("task_struct", "state"), optional;
    TaskFlags = Offset("task_struct", "flags");
    TaskExitState = Offset("task_struct", "exit_state");
    TaskStack = Offset("task_struct", "stack");
    TaskMm = Offset("task_struct", "mm");
    TaskRealParent = Offset("task_struct", "real_parent");
    TaskOnCpu = Offset("task_struct", "on_cpu");
    TaskThreadSp = Offset("task_struct", "thread.sp");
    // --- struct list_head ---
    ListNext = Offset("list_head", "next");
    ListPrev = Offset("list_head", "prev");
    // --- struct rq ---
    RqCurr = Offset("rq", "curr");
    RqNrSwitches = Offset("rq", "nr_switches");
    // --- struct pcpu_hot (6.2+, backported to some 6.1 builds) ---
    PcpuHotCurrentTask = Offset("pcpu_hot", "current_task"), optional;
    PcpuHotPreemptCount = Offset("pcpu_hot", "preempt_count"), optional;
    // --- printk ring buffer ---
    PrbDescRing = Offset("printk_ringbuffer", "desc_ring");
    PrbTextDataRing = Offset("printk_ringbuffer", "text_data_ring");
    DescRingCountBits = Offset("prb_desc_ring", "count_bits");
    DescRingDescs = Offset("prb_desc_ring", "descs");
    DescRingInfos = Offset("prb_desc_ring", "infos");
    DescRingHeadId = Offset("prb_desc_ring", "head_id");
    DescRingTailId = Offset("prb_desc_ring", "tail_id");
    DataRingSizeBits = Offset("prb_data_ring", "size_bits");
    DataRingData = Offset("prb_data_ring", "data");
    DescSize = Size("prb_desc");
    DescStateVar = Offset("prb_desc", "state_var");
    DescTextBlkLpos = Offset("prb_desc", "text_blk_lpos");
    LposBegin = Offset("prb_data_blk_lpos", "begin");
    LposNext = Offset("prb_data_blk_lpos", "next");
    InfoSize = Size("printk_info");
    InfoSeq = Offset("printk_info", "seq");
    InfoTsNsec = Offset("printk_info", "ts_nsec");
    InfoTextLen = Offset("printk_info", "text_len");
    InfoCallerId = Offset("printk_info", "caller_id");
    // --- struct pt_regs ---
    PtRegsSize = Size("pt_regs");
    PtRegsIp = Offset("pt_regs", "ip");
    PtRegsSp = Offset("pt_regs", "sp");
    PtRegsCs = Offset("pt_regs", "cs");
    PtRegsFlags = Offset("pt_regs", "flags");
    // --- appended by the repair-kernel library ---
    // Bounds `oops_end` so a panic's return address can be placed in it.
    SymOopsEndSize = SymbolSize("oops_end"), optional;
    // --- the watcher's hang detection (loader/src/hang.rs), from the image ---
    // The kernel's own top-level page table, walked while processes come
    // and go; CPU time counters that tell progress from spinning.
    SymInitTopPgt = Symbol("init_top_pgt"), optional;
    TaskUtime = Offset("task_struct", "utime"), optional;
    TaskStime = Offset("task_struct", "stime"), optional;
    TaskNvcsw = Offset("task_struct", "nvcsw"), optional;
    TaskNivcsw = Offset("task_struct", "nivcsw"), optional;
    // The kernel's own soft-lockup limit (2 x this, in seconds): a spinning
    // task is killed no sooner than the kernel itself would act.
    SymWatchdogThresh = Symbol("watchdog_thresh"), optional;
    // --- struct mm_struct: a process's own page table (`mm->pgd`), in every
    // profile since the first; the repair kernel works on the crashed CPU's
    // CR3 and does not read it ---
    MmPgd = Offset("mm_struct", "pgd"), optional;
    // --- drift across Debian's 5.10 to 7.x, decided by what the vmlinux has ---
    // Per-CPU symbols are offsets into each CPU's area while the vmlinux
    // links `.data..percpu` at 0 (`__per_cpu_start` == 0, up to 6.14); since
    // 6.15 they are virtual addresses moved by KASLR like any other.
    SymPerCpuStart = Symbol("__per_cpu_start"), optional;
    // `vpanic(fmt, va_list)` does the panic's work where it exists (6.17,
    // Debian 6.12.118+): `panic` calls it, some callers call it directly.
    SymVpanic = Symbol("vpanic"), optional;
    SymPanicSize = SymbolSize("panic"), optional;
    // `nmi_panic` claims `panic_cpu` before it calls `panic`: a panic it
    // called is not a panic within a panic, and a kill must release it.
    SymNmiPanic = Symbol("nmi_panic"), optional;
    SymNmiPanicSize = SymbolSize("nmi_panic"), optional;
    // 6.12+: `__warn` (and other emergency printers) enter a per-CPU nbcon
    // emergency section before they may panic; a kill abandons it.
    PcpuNbconEmergencyNesting = PerCpu("nbcon_pcpu_emergency_nesting"), optional;
    // Whether `preempt_count` counts spinlocks and preempt_disable():
    // only with CONFIG_PREEMPT_COUNT, which CONFIG_PREEMPTION
    // (`preempt_schedule`) or CONFIG_DEBUG_ATOMIC_SLEEP (`__might_resched`,
    // `___might_sleep` before 5.17) brings. Debian's 5.10 has neither.
    SymPreemptSchedule = Symbol("preempt_schedule"), optional;
    SymMightResched = Symbol("__might_resched"), optional;
    SymMightSleepOld = Symbol("___might_sleep"), optional;
    // --- quarantine after a rollback (loader/src/quarantine.rs): SIGKILL
    // made pending (`task->pending.signal`, a `sigset_t`) and
    // `TIF_SIGPENDING` set in `task->thread_info.flags`, as
    // `signal_wake_up()` would; the repair kernel does not read them ---
    TaskPendingSignal = Offset("task_struct", "pending.signal"), optional;
    TaskThreadInfoFlags = Offset("task_struct", "thread_info.flags"), optional;
    // --- a warning that panic_on_warn made fatal (crate::warn) ---
    // `check_panic_on_warn(origin)` calls `panic` when `panic_on_warn` is
    // set (or `warn_limit` is reached); returning from it into its caller
    // (`__warn`, KASAN's, KFENCE's, UBSAN's reports) goes on as the kernel
    // does without panic_on_warn. The frames in between are unwound with
    // the vmlinux's own call-frame rules at those call sites.
    SymCheckPanicOnWarn = Symbol("check_panic_on_warn"), optional;
    SymCheckPanicOnWarnSize = SymbolSize("check_panic_on_warn"), optional;
    // GCC's -O2 moves the unlikely panic calls to a separate `.cold` part.
    SymCheckPanicOnWarnCold = Symbol("check_panic_on_warn.cold"), optional;
    SymCheckPanicOnWarnColdSize = SymbolSize("check_panic_on_warn.cold"), optional;
    FramePanicCallsVpanic = CallFrame("panic", "vpanic"), optional;
    FrameWarnCallsPanic = CallFrame("check_panic_on_warn", "panic"), optional;
    // `TIF_SIGPENDING`: 2 on x86 up to 6.x, 1 with the generic TIF bits
    // (7.x); what `signal_wake_up_state` sets.
    TifSigpending = ThreadFlagBit("signal_wake_up_state"), optional;
    // --- the slab allocator's own code (repair-kernel/src/slab.rs): an oops
    // whose faulting RIP is in it means a corrupt heap, which killing the
    // task that allocated next cannot repair. The code ranges of the unit
    // mm/slub.c: its text, its cold and its init parts (three ranges on
    // every kit kernel); a fourth slot for a build that splits further ---
    SlubCode0Start = UnitRange("mm/slub.c", "0.start"), optional;
    SlubCode0End = UnitRange("mm/slub.c", "0.end"), optional;
    SlubCode1Start = UnitRange("mm/slub.c", "1.start"), optional;
    SlubCode1End = UnitRange("mm/slub.c", "1.end"), optional;
    SlubCode2Start = UnitRange("mm/slub.c", "2.start"), optional;
    SlubCode2End = UnitRange("mm/slub.c", "2.end"), optional;
    SlubCode3Start = UnitRange("mm/slub.c", "3.start"), optional;
    SlubCode3End = UnitRange("mm/slub.c", "3.end"), optional;
    // --- threads that are neither user processes nor kernel threads ---
    // `create_io_thread` (5.12+) sets `kernel_clone_args.io_thread`, which
    // makes the thread `PF_IO_WORKER`; since 6.4 `user_worker` makes io_uring
    // and vhost workers `PF_USER_WORKER`. Where a member exists, its flag
    // means what it says; only their presence is read.
    KcaIoThread = Offset("kernel_clone_args", "io_thread"), optional;
    KcaUserWorker = Offset("kernel_clone_args", "user_worker"), optional;
    // --- PREEMPT_RT: bottom halves are disabled per task
    // (`task->softirq_disable_cnt`, the RT `softirq_count()`), not in
    // `preempt_count`; the member exists only with CONFIG_PREEMPT_RT ---
    TaskSoftirqDisableCnt = Offset("task_struct", "softirq_disable_cnt"), optional;
}

/// Number of items in the table.
pub const ITEM_COUNT: usize = ITEMS.len();

/// The filled table: one `u64` per [`Item`], [`ABSENT`] where missing.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelLayout {
    pub values: [u64; ITEM_COUNT],
}

impl Default for KernelLayout {
    fn default() -> Self {
        Self { values: [ABSENT; ITEM_COUNT] }
    }
}

impl KernelLayout {
    /// The item's value, or `None` where the kernel build lacks it.
    pub fn get(&self, item: Item) -> Option<u64> {
        match self.values[item as usize] {
            ABSENT => None,
            v => Some(v),
        }
    }

    /// Sets an item (used by the builder and by tests).
    pub fn set(&mut self, item: Item, value: u64) {
        self.values[item as usize] = value;
    }

    /// The spec of an item.
    pub fn spec(item: Item) -> &'static ItemSpec {
        &ITEMS[item as usize]
    }
}
