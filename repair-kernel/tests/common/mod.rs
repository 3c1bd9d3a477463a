//! An in-memory crashed guest: RAM as a byte vector, page tables built by
//! hand (4-level; the kernel image on 2 MiB pages, the direct map on 2 MiB
//! pages except one 2 MiB stretch on 4 KiB pages), a task list, per-CPU
//! areas, a printk ring buffer, and a vCPU stopped at the entry of `panic`.
#![allow(dead_code)]

use repair_kernel::contract::{ContractIn, ContractOut, CpuState};
use repair_kernel::layout::{Item, KernelLayout};
use repair_kernel::mem::SliceMem;

pub const RAM: usize = 32 << 20;
pub const SLIDE: u64 = 0x2000_0000;
pub const KBASE_LINK: u64 = 0xffff_ffff_8100_0000;
pub const KBASE_PHYS: u64 = 0x100_0000;
pub const PAGE_OFFSET: u64 = 0xffff_8880_0000_0000;
/// Direct-map stretch mapped with 4 KiB pages.
pub const SMALL_PAGES_PHYS: u64 = 0x40_0000;

// Link-time symbols.
pub const STEXT: u64 = KBASE_LINK;
pub const REWIND: u64 = KBASE_LINK + 0x1000;
pub const OOPS_END: u64 = KBASE_LINK + 0x4_0000;
pub const MAKE_TASK_DEAD: u64 = KBASE_LINK + 0x9_0000;
pub const PANIC: u64 = KBASE_LINK + 0x10_0000;
pub const SYSRQ_HANDLE_CRASH: u64 = KBASE_LINK + 0x50_0000;
pub const ETEXT: u64 = KBASE_LINK + 0x80_0000;
pub const START_RODATA: u64 = KBASE_LINK + 0x80_0000;
pub const END_RODATA: u64 = KBASE_LINK + 0xa0_0000;
pub const INIT_TASK: u64 = KBASE_LINK + 0xc0_0000;
pub const PER_CPU_OFFSET: u64 = KBASE_LINK + 0xc1_0000;
pub const PRB: u64 = KBASE_LINK + 0xc2_0000;
pub const PRINTK_RB_STATIC: u64 = KBASE_LINK + 0xc2_0100;
pub const PANIC_CPU: u64 = KBASE_LINK + 0xc3_0000;
pub const NR_CPU_IDS: u64 = KBASE_LINK + 0xc3_0010;
pub const JUMP_TABLE: u64 = KBASE_LINK + 0xc4_0000;
pub const DESCS: u64 = KBASE_LINK + 0xd0_0000;
pub const INFOS: u64 = KBASE_LINK + 0xd1_0000;
pub const TEXT_DATA: u64 = KBASE_LINK + 0xd8_0000;

// Per-CPU variable offsets.
pub const PCPU_CURRENT_TASK: u64 = 0x2_1c40;
pub const PCPU_PREEMPT_COUNT: u64 = 0x2_1c48;
pub const PCPU_RUNQUEUES: u64 = 0x3_0000;
pub const PCPU_AREA: u64 = 0x4_0000;

// struct task_struct.
pub const T_STATE: u64 = 0x18;
pub const T_STACK: u64 = 0x20;
pub const T_FLAGS: u64 = 0x2c;
pub const T_ON_CPU: u64 = 0x34;
pub const T_TASKS: u64 = 0x490;
pub const T_MM: u64 = 0x4e0;
pub const T_EXIT_STATE: u64 = 0x500;
pub const T_PID: u64 = 0x5a0;
pub const T_TGID: u64 = 0x5a4;
pub const T_REAL_PARENT: u64 = 0x5b0;
pub const T_COMM: u64 = 0x768;
pub const T_THREAD_SP: u64 = 0x1748;
pub const T_SIZE: u64 = 0x1800;

pub const RQ_CURR: u64 = 0x9a0;
pub const RQ_NR_SWITCHES: u64 = 0x9b0;

// printk.
pub const PRB_INFO_SIZE: u64 = 88;
pub const PRB_DESC_SIZE: u64 = 24;

pub fn layout() -> KernelLayout {
    use Item::*;
    let mut l = KernelLayout::default();
    let set = |l: &mut KernelLayout, i: Item, v: u64| l.set(i, v);
    for (i, v) in [
        (SymInitTask, INIT_TASK),
        (SymPerCpuOffset, PER_CPU_OFFSET),
        (SymPanic, PANIC),
        (SymOopsEnd, OOPS_END),
        (SymOopsEndSize, 0x120),
        (SymRewindStackAndMakeDead, REWIND),
        (SymMakeTaskDead, MAKE_TASK_DEAD),
        (SymPrb, PRB),
        (SymNrCpuIds, NR_CPU_IDS),
        (SymStext, STEXT),
        (SymEtext, ETEXT),
        (SymStartRodata, START_RODATA),
        (SymEndRodata, END_RODATA),
        (SymStartJumpTable, JUMP_TABLE),
        (SymStopJumpTable, JUMP_TABLE),
        (SymPanicCpu, PANIC_CPU),
        (SymStartText, STEXT),
        (PcpuCurrentTask, PCPU_CURRENT_TASK),
        (PcpuPreemptCount, PCPU_PREEMPT_COUNT),
        (PcpuRunqueues, PCPU_RUNQUEUES),
        (TaskSize, T_SIZE),
        (TaskPid, T_PID),
        (TaskTgid, T_TGID),
        (TaskComm, T_COMM),
        (TaskTasks, T_TASKS),
        (TaskStateNew, T_STATE),
        (TaskFlags, T_FLAGS),
        (TaskExitState, T_EXIT_STATE),
        (TaskStack, T_STACK),
        (TaskMm, T_MM),
        (TaskRealParent, T_REAL_PARENT),
        (TaskOnCpu, T_ON_CPU),
        (TaskThreadSp, T_THREAD_SP),
        (ListNext, 0),
        (ListPrev, 8),
        (RqCurr, RQ_CURR),
        (RqNrSwitches, RQ_NR_SWITCHES),
        (PrbDescRing, 0),
        (PrbTextDataRing, 48),
        (DescRingCountBits, 0),
        (DescRingDescs, 8),
        (DescRingInfos, 16),
        (DescRingHeadId, 24),
        (DescRingTailId, 32),
        (DataRingSizeBits, 0),
        (DataRingData, 8),
        (DescSize, PRB_DESC_SIZE),
        (DescStateVar, 0),
        (DescTextBlkLpos, 8),
        (LposBegin, 0),
        (LposNext, 8),
        (InfoSize, PRB_INFO_SIZE),
        (InfoSeq, 0),
        (InfoTsNsec, 8),
        (InfoTextLen, 16),
        (InfoCallerId, 20),
    ] {
        set(&mut l, i, v);
    }
    l
}

/// One fake task.
#[derive(Clone, Copy, Debug)]
pub struct TaskSpec {
    pub pid: i32,
    pub tgid: i32,
    pub comm: &'static str,
    pub flags: u32,
    pub state: u32,
}

pub fn proc(pid: i32, comm: &'static str) -> TaskSpec {
    TaskSpec { pid, tgid: pid, comm, flags: 0x0040_0100, state: 1 }
}

#[derive(Debug)]
pub struct Guest {
    pub ram: Vec<u8>,
    pub layout: KernelLayout,
    pub pml4: u64,
    /// Bump allocator for page tables (phys 1..4 MiB).
    pub next_table: u64,
    /// Bump allocator for objects in the 4 KiB-mapped stretch (phys 4..6 MiB).
    pub next_obj: u64,
    /// Bump allocator for 2 MiB-mapped objects (phys 6..16 MiB).
    pub next_big: u64,
    /// Tasks (run-time addresses), init_task first.
    pub tasks: Vec<u64>,
    pub nr_cpus: u32,
    pub regs: CpuState,
    pub cpu: u32,
    pub next_desc_id: u64,
    pub head_lpos: u64,
    pub rodata_next: u64,
}

/// Run-time address of a link-time kernel address.
pub const fn rt(link: u64) -> u64 {
    link.wrapping_add(SLIDE)
}

impl Guest {
    /// A guest with `procs` on the task list (after init_task) and 2 CPUs,
    /// crashed at panic entry on CPU 0 while running `procs[current]`.
    pub fn new(procs: &[TaskSpec], current: usize) -> Self {
        let mut g = Guest {
            ram: vec![0; RAM],
            layout: layout(),
            pml4: 0,
            next_table: 0x10_0000,
            next_obj: SMALL_PAGES_PHYS,
            next_big: 0x60_0000,
            tasks: vec![],
            nr_cpus: 2,
            regs: CpuState::default(),
            cpu: 0,
            next_desc_id: 0,
            head_lpos: 0,
            rodata_next: START_RODATA + 0x1000,
        };
        g.pml4 = g.alloc_table();
        // Kernel image: run-time text..data, 2 MiB pages, 16 MiB.
        for i in 0..8u64 {
            g.map(rt(KBASE_LINK) + i * 0x20_0000, KBASE_PHYS + i * 0x20_0000, 0x20_0000);
        }
        // Direct map of all RAM: 2 MiB pages, but 4 KiB pages for one stretch,
        // mapped in reverse physical order so virtual neighbours are not
        // physical neighbours.
        for i in 0..(RAM as u64 / 0x20_0000) {
            let pa = i * 0x20_0000;
            if pa == SMALL_PAGES_PHYS {
                for j in 0..512u64 {
                    g.map(PAGE_OFFSET + pa + j * 0x1000, pa + (511 - j) * 0x1000, 0x1000);
                }
            } else {
                g.map(PAGE_OFFSET + pa, pa, 0x20_0000);
            }
        }
        g.w32(rt(NR_CPU_IDS), g.nr_cpus);
        g.w32(rt(PANIC_CPU), u32::MAX); // -1
        // Per-CPU areas in the direct map.
        for cpu in 0..g.nr_cpus as u64 {
            let area = g.alloc_big(PCPU_AREA);
            g.w64(rt(PER_CPU_OFFSET) + cpu * 8, area);
            g.w32(area + PCPU_PREEMPT_COUNT, 0x8000_0000); // NEED_RESCHED clear
        }
        // init_task (pid 0, swapper/0) and the list.
        let init = rt(INIT_TASK);
        g.init_task_fields(init, TaskSpec { pid: 0, tgid: 0, comm: "swapper/0", flags: 0x0020_0002, state: 0 });
        g.tasks.push(init);
        g.w64(init + T_TASKS, init + T_TASKS);
        g.w64(init + T_TASKS + 8, init + T_TASKS);
        for p in procs {
            g.add_task(*p);
        }
        let cur = if current == usize::MAX { init } else { g.tasks[current + 1] };
        for cpu in 0..g.nr_cpus {
            let t = if cpu == 0 { cur } else { init };
            g.set_percpu(cpu, PCPU_CURRENT_TASK, t);
            g.set_percpu(cpu, PCPU_RUNQUEUES + RQ_CURR, t);
            g.set_percpu(cpu, PCPU_RUNQUEUES + RQ_NR_SWITCHES, 1000 + cpu as u64);
        }
        // printk: prb -> printk_rb_static; 8 descriptors, 4 KiB text ring.
        let rb = rt(PRINTK_RB_STATIC);
        g.w64(rt(PRB), rb);
        g.w32(rb, 3);
        g.w64(rb + 8, rt(DESCS));
        g.w64(rb + 16, rt(INFOS));
        g.w32(rb + 48, 12);
        g.w64(rb + 48 + 8, rt(TEXT_DATA));
        // Start ids just below a multiple of the ring size, so indices wrap.
        g.next_desc_id = 5;
        g.w64(rb + 24, 4);
        g.w64(rb + 32, 5);
        g.crash_direct(cur, "sysrq triggered crash\n", &[]);
        g
    }

    pub fn alloc_table(&mut self) -> u64 {
        let t = self.next_table;
        self.next_table += 0x1000;
        assert!(self.next_table <= SMALL_PAGES_PHYS);
        t
    }

    /// Maps `va` to `pa` with a page of `size` (4 KiB, 2 MiB or 1 GiB).
    pub fn map(&mut self, va: u64, pa: u64, size: u64) {
        let mut table = self.pml4;
        let leaf_level = match size {
            0x1000 => 1,
            0x20_0000 => 2,
            0x4000_0000 => 3,
            _ => panic!("bad page size"),
        };
        for level in (leaf_level + 1..=4).rev() {
            let idx = (va >> (12 + 9 * (level - 1))) & 0x1ff;
            let e = self.p64(table + idx * 8);
            table = if e & 1 == 0 {
                let t = self.alloc_table();
                self.pw64(table + idx * 8, t | 3);
                t
            } else {
                e & 0x000f_ffff_ffff_f000
            };
        }
        let idx = (va >> (12 + 9 * (leaf_level - 1))) & 0x1ff;
        let ps = if leaf_level > 1 { 0x80 } else { 0 };
        self.pw64(table + idx * 8, pa | 3 | ps);
    }

    pub fn alloc_obj(&mut self, size: u64) -> u64 {
        let a = self.next_obj;
        self.next_obj += (size + 0xfff) & !0xfff;
        assert!(self.next_obj <= SMALL_PAGES_PHYS + 0x20_0000);
        PAGE_OFFSET + a
    }

    pub fn alloc_big(&mut self, size: u64) -> u64 {
        let a = self.next_big;
        self.next_big += (size + 0xfff) & !0xfff;
        assert!(self.next_big <= KBASE_PHYS);
        PAGE_OFFSET + a
    }

    // --- physical access ---
    pub fn p64(&self, pa: u64) -> u64 {
        u64::from_le_bytes(self.ram[pa as usize..pa as usize + 8].try_into().unwrap())
    }
    pub fn pw64(&mut self, pa: u64, v: u64) {
        self.ram[pa as usize..pa as usize + 8].copy_from_slice(&v.to_le_bytes());
    }

    /// Software translation for the test's own writes (no checks: the
    /// test built the tables).
    pub fn phys(&self, va: u64) -> u64 {
        if (PAGE_OFFSET..PAGE_OFFSET + RAM as u64).contains(&va) {
            let pa = va - PAGE_OFFSET;
            if (SMALL_PAGES_PHYS..SMALL_PAGES_PHYS + 0x20_0000).contains(&pa) {
                let j = (pa - SMALL_PAGES_PHYS) >> 12;
                return SMALL_PAGES_PHYS + (511 - j) * 0x1000 + (pa & 0xfff);
            }
            return pa;
        }
        let link = va.wrapping_sub(SLIDE);
        assert!((KBASE_LINK..KBASE_LINK + 0x100_0000).contains(&link), "unmapped {va:#x}");
        link - KBASE_LINK + KBASE_PHYS
    }

    /// Writes kernel virtual memory (byte by byte through [`Self::phys`]).
    pub fn wbytes(&mut self, va: u64, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            let pa = self.phys(va + i as u64) as usize;
            self.ram[pa] = *b;
        }
    }
    pub fn rbytes(&self, va: u64, n: usize) -> Vec<u8> {
        (0..n).map(|i| self.ram[self.phys(va + i as u64) as usize]).collect()
    }
    pub fn w64(&mut self, va: u64, v: u64) {
        self.wbytes(va, &v.to_le_bytes());
    }
    pub fn w32(&mut self, va: u64, v: u32) {
        self.wbytes(va, &v.to_le_bytes());
    }
    pub fn w16(&mut self, va: u64, v: u16) {
        self.wbytes(va, &v.to_le_bytes());
    }
    pub fn r64(&self, va: u64) -> u64 {
        u64::from_le_bytes(self.rbytes(va, 8).try_into().unwrap())
    }

    pub fn percpu_area(&self, cpu: u32) -> u64 {
        self.r64(rt(PER_CPU_OFFSET) + cpu as u64 * 8)
    }
    pub fn set_percpu(&mut self, cpu: u32, off: u64, v: u64) {
        let a = self.percpu_area(cpu);
        self.w64(a + off, v);
    }
    pub fn set_preempt_count(&mut self, cpu: u32, pc: u32) {
        let a = self.percpu_area(cpu);
        // x86 keeps PREEMPT_NEED_RESCHED inverted: set = no resched needed.
        self.w32(a + PCPU_PREEMPT_COUNT, pc | 0x8000_0000);
    }

    fn init_task_fields(&mut self, t: u64, s: TaskSpec) {
        self.w32(t + T_PID, s.pid as u32);
        self.w32(t + T_TGID, s.tgid as u32);
        self.w32(t + T_FLAGS, s.flags);
        self.w32(t + T_STATE, s.state);
        let mut comm = [0u8; 16];
        comm[..s.comm.len()].copy_from_slice(s.comm.as_bytes());
        self.wbytes(t + T_COMM, &comm);
        self.w64(t + T_REAL_PARENT, rt(INIT_TASK));
        let stack = self.alloc_big(0x4000);
        self.w64(t + T_STACK, stack);
    }

    /// Allocates a task (in the 4 KiB-mapped stretch, so fields cross
    /// physically discontiguous pages) and appends it to the task list.
    pub fn add_task(&mut self, s: TaskSpec) -> u64 {
        let t = self.alloc_obj(T_SIZE);
        self.init_task_fields(t, s);
        let head = rt(INIT_TASK) + T_TASKS;
        let last = self.r64(head + 8);
        self.w64(t + T_TASKS, head);
        self.w64(t + T_TASKS + 8, last);
        self.w64(last, t + T_TASKS);
        self.w64(head + 8, t + T_TASKS);
        self.tasks.push(t);
        t
    }

    /// Puts a string in rodata; returns its run-time address.
    pub fn rodata_str(&mut self, s: &str) -> u64 {
        let a = rt(self.rodata_next);
        let mut b = s.as_bytes().to_vec();
        b.push(0);
        self.wbytes(a, &b);
        self.rodata_next += (b.len() as u64 + 8) & !7;
        a
    }

    /// Sets the vCPU at the entry of panic(fmt, args...), called from
    /// `caller` (a link-time return address), on `task`'s stack.
    pub fn crash_at(&mut self, task: u64, caller: u64, fmt: &str, args: &[u64]) {
        let stack = self.r64(task + T_STACK);
        let rsp = stack + 0x4000 - 0x200;
        self.w64(rsp, rt(caller));
        for (i, a) in args.iter().skip(5).enumerate() {
            self.w64(rsp + 8 + 8 * i as u64, *a);
        }
        // Some more return addresses deeper in the stack, and noise.
        let deeper = [rt(SYSRQ_HANDLE_CRASH + 0x40), 0x1234, rt(KBASE_LINK + 0x20_0010), PAGE_OFFSET];
        for (i, v) in deeper.iter().enumerate() {
            self.w64(rsp + 0x80 + 8 * i as u64, *v);
        }
        let fmt_va = self.rodata_str(fmt);
        let a = |i: usize| args.get(i).copied().unwrap_or(0xdead_0000 + i as u64);
        self.regs = CpuState {
            rip: rt(PANIC),
            rsp,
            rdi: fmt_va,
            rsi: a(0),
            rdx: a(1),
            rcx: a(2),
            r8: a(3),
            r9: a(4),
            rbp: rsp + 0x100,
            rflags: 0x246,
            cs: 0x10,
            ss: 0x18,
            cr0: 0x8005_0033,
            cr3: self.pml4 | 0x1, // a PCID in the low bits
            cr4: 0x3006f0,
            efer: 0xd01,
            gs_base: self.percpu_area(0),
            ..CpuState::default()
        };
    }

    /// A direct panic (from sysrq_handle_crash).
    pub fn crash_direct(&mut self, task: u64, fmt: &str, args: &[u64]) {
        self.crash_at(task, SYSRQ_HANDLE_CRASH + 0x2b, fmt, args);
    }

    /// panic("Fatal exception") from oops_end, IRQs off.
    pub fn crash_oops(&mut self, task: u64) {
        self.crash_at(task, OOPS_END + 0x9c, "Fatal exception", &[]);
        self.regs.rflags = 0x46;
    }

    /// Appends a finalized printk record.
    pub fn printk(&mut self, text: &str) {
        let rb = rt(PRINTK_RB_STATIC);
        let id = self.next_desc_id;
        self.next_desc_id += 1;
        let count = 8u64;
        let idx = id % count;
        let size_bits = 12u32;
        let dsize = 1u64 << size_bits;
        let blk = (8 + text.len() as u64 + 7) & !7;
        let begin = self.head_lpos;
        let (next, at) = if begin >> size_bits != (begin + blk) >> size_bits {
            let start = ((begin + blk) >> size_bits) << size_bits;
            // Block goes at the start of the ring; the id also at begin.
            if (begin & (dsize - 1)) + 8 <= dsize {
                self.w64(rt(TEXT_DATA) + (begin & (dsize - 1)), id);
            }
            (start + blk, 0)
        } else {
            (begin + blk, begin & (dsize - 1))
        };
        self.head_lpos = next;
        self.w64(rt(TEXT_DATA) + at, id);
        self.wbytes(rt(TEXT_DATA) + at + 8, text.as_bytes());
        let d = rt(DESCS) + idx * PRB_DESC_SIZE;
        self.w64(d, (2u64 << 62) | id);
        self.w64(d + 8, begin);
        self.w64(d + 16, next);
        let info = rt(INFOS) + idx * PRB_INFO_SIZE;
        self.w64(info, id + 100);
        self.w64(info + 8, id * 1_000_000);
        self.w16(info + 16, text.len() as u16);
        self.w32(info + 20, 0x42);
        self.w64(rb + 24, id);
        // Oldest still-valid id: the ring holds `count` descriptors.
        let tail = id.saturating_sub(count - 1).max(5);
        self.w64(rb + 32, tail);
    }

    pub fn input(&self) -> ContractIn {
        ContractIn {
            crashed: self.regs,
            cpu: self.cpu,
            nr_vcpus: self.nr_cpus,
            kaslr_slide: SLIDE,
            ram_end: RAM as u64,
            borrowed_base: 0x1000,
            borrowed_size: 0x9000,
            max_tasks: 1000,
            read_only: 0,
            layout: self.layout,
        }
    }

    pub fn run(&mut self) -> ContractOut {
        let input = self.input();
        let mut out = ContractOut::empty();
        repair_kernel::run(&mut SliceMem::new(&mut self.ram), &input, &mut out);
        out
    }
}

/// The standard scene: init, a shell, a daemon, the crashing writer, a
/// kernel thread.
pub fn scene() -> Guest {
    let procs = [
        TaskSpec { pid: 1, tgid: 1, comm: "init", flags: 0x0040_0100, state: 1 },
        proc(57, "sh"),
        proc(60, "ticker"),
        proc(73, "crasher"),
        TaskSpec { pid: 2, tgid: 2, comm: "kthreadd", flags: 0x0020_8040, state: 1 },
    ];
    // crasher is index 3 in procs.
    let mut g = Guest::new(&procs, 3);
    g.printk("Linux version 6.1.0-test");
    g.printk("Run /init as init process");
    g.printk("sysrq: Trigger a crash");
    g
}

pub fn str_of(b: &[u8]) -> &str {
    repair_kernel::contract::field_str(b)
}
