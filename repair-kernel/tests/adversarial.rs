//! Hostile guest memory: every case must end, quickly, with a verdict (a
//! decline with a reason) or an error, never a panic or a hang.
mod common;
use common::*;

use std::time::{Duration, Instant};

use repair_kernel::contract::{Action, ContractOut, RunStatus};
use repair_kernel::mem::{Error, Gva, SliceMem};
use repair_kernel::verdict::Reason;
use repair_kernel::{kernel_view, printk, task};

fn run_bounded(g: &mut Guest) -> ContractOut {
    let t0 = Instant::now();
    let out = g.run();
    assert!(t0.elapsed() < Duration::from_secs(5), "run took {:?}", t0.elapsed());
    assert_eq!(out.status, RunStatus::Done as u32);
    out
}

fn declined(out: &ContractOut, reason: Reason) {
    assert_eq!(Action::from_u32(out.action), Some(Action::Decline), "{}", str_of(&out.reason));
    assert_eq!(Reason::from_u32(out.reason_code), Some(reason), "{}", str_of(&out.reason));
}

#[test]
fn cyclic_task_list_is_declined() {
    // crasher -> sh: a cycle that never returns to init_task.
    let mut g = scene();
    let (sh, crasher) = (g.tasks[2], g.tasks[4]);
    g.w64(crasher + T_TASKS, sh + T_TASKS);
    let out = run_bounded(&mut g);
    declined(&out, Reason::DeclineTaskListCorrupt);
    assert!(str_of(&out.reason).contains("corrupt"), "{}", str_of(&out.reason));

    // The same cycle with the prev links made consistent.
    let mut g = scene();
    let (sh, crasher) = (g.tasks[2], g.tasks[4]);
    g.w64(crasher + T_TASKS, sh + T_TASKS);
    g.w64(sh + T_TASKS + 8, crasher + T_TASKS);
    declined(&run_bounded(&mut g), Reason::DeclineTaskListCorrupt);

    // A task pointing at itself.
    let mut g = scene();
    let crasher = g.tasks[4];
    g.w64(crasher + T_TASKS, crasher + T_TASKS);
    g.w64(crasher + T_TASKS + 8, crasher + T_TASKS);
    declined(&run_bounded(&mut g), Reason::DeclineTaskListCorrupt);
}

#[test]
fn a_list_looping_back_into_itself_is_caught() {
    // The last task points back at sh: the walk must stop with an error
    // (the prev check or Brent's cycle detection), not run to the cap.
    let mut g = scene();
    let t: Vec<u64> = g.tasks.clone();
    g.w64(t[5] + T_TASKS, t[2] + T_TASKS);
    let input = g.input();
    let mut mem = SliceMem::new(&mut g.ram);
    let k = kernel_view(&mut mem, &input);
    let r = task::for_each_process(&k, 1_000_000, |_| true);
    assert!(matches!(r, Err(Error::CorruptList(_))), "{r:?}");
}

#[test]
fn iteration_cap_stops_a_huge_list() {
    let mut g = scene();
    for i in 0..60 {
        g.add_task(proc(100 + i, "worker"));
    }
    let mut input = g.input();
    input.max_tasks = 10;
    let mut out = ContractOut::empty();
    repair_kernel::run(&mut SliceMem::new(&mut g.ram), &input, &mut out);
    declined(&out, Reason::DeclineTaskListCorrupt);
    assert!(str_of(&out.reason).contains("iteration cap"), "{}", str_of(&out.reason));
    // With the default cap (0 = 65536) the same list is fine.
    input.max_tasks = 0;
    repair_kernel::run(&mut SliceMem::new(&mut g.ram), &input, &mut out);
    assert_eq!(out.nr_tasks, 65);
}

#[test]
fn pointers_outside_ram_and_non_canonical_are_declined() {
    for bad in [
        PAGE_OFFSET + (64 << 30),   // unmapped
        0x8000_0000_0000_1234,      // non-canonical
        0x0000_7fff_dead_0000,      // a user address
        0,                          // NULL
    ] {
        let mut g = scene();
        let sh = g.tasks[2];
        g.w64(sh + T_TASKS, bad);
        let out = run_bounded(&mut g);
        declined(&out, Reason::DeclineTaskListCorrupt);
    }
    // A page-table entry pointing beyond RAM.
    let mut g = scene();
    let crasher = g.tasks[4];
    let pml4 = g.pml4;
    let idx = (crasher >> 39) & 0x1ff;
    g.pw64(pml4 + idx * 8, (1u64 << 40) | 3);
    let out = run_bounded(&mut g);
    declined(&out, Reason::DeclineUnreadable);
    assert!(str_of(&out.reason).contains("beyond guest RAM"), "{}", str_of(&out.reason));
}

#[test]
fn garbage_current_task_and_cr3_are_declined() {
    let mut g = scene();
    g.set_percpu(0, PCPU_CURRENT_TASK, 0xdead_beef_dead_beef);
    declined(&run_bounded(&mut g), Reason::DeclineUnreadable);

    let mut g = scene();
    g.regs.cr3 = 1 << 45;
    declined(&run_bounded(&mut g), Reason::DeclineUnreadable);

    let mut g = scene();
    g.regs.rdi = 0x8000_0000_0000_0000; // fmt not canonical
    let out = run_bounded(&mut g);
    assert_eq!(str_of(&out.message), "");
    assert_eq!(Action::from_u32(out.action), Some(Action::Kill));

    // A CPU index beyond nr_cpu_ids.
    let mut g = scene();
    g.cpu = 4000;
    declined(&run_bounded(&mut g), Reason::DeclineUnreadable);
}

#[test]
fn self_referential_page_tables_end() {
    let mut g = scene();
    let pml4 = g.pml4;
    for i in 0..512 {
        g.pw64(pml4 + i * 8, pml4 | 3);
    }
    let out = run_bounded(&mut g);
    assert_eq!(Action::from_u32(out.action), Some(Action::Decline));
    // And with large-page bits set everywhere.
    let mut g = scene();
    let pml4 = g.pml4;
    for i in 0..512 {
        g.pw64(pml4 + i * 8, pml4 | 0x83);
    }
    let out = run_bounded(&mut g);
    assert_eq!(Action::from_u32(out.action), Some(Action::Decline));
}

#[test]
fn absurd_printk_geometry_is_an_error() {
    let rb = rt(PRINTK_RB_STATIC);
    let walk = |g: &mut Guest| {
        let input = g.input();
        let mut mem = SliceMem::new(&mut g.ram);
        let k = kernel_view(&mut mem, &input);
        let t0 = Instant::now();
        let mut n = 0;
        let r = printk::prb_for_each_last(&k, u32::MAX, |rec| {
            assert!(rec.text.len() <= printk::RECORD_TEXT_MAX);
            n += 1;
            true
        });
        assert!(t0.elapsed() < Duration::from_secs(5));
        (r, n)
    };
    let mut g = scene();
    g.w32(rb, 63); // count_bits
    assert!(matches!(walk(&mut g).0, Err(Error::Absurd(..))));
    let mut g = scene();
    g.w32(rb + 48, 200); // size_bits
    assert!(matches!(walk(&mut g).0, Err(Error::Absurd(..))));
    let mut g = scene();
    g.w64(rt(PRB), 0);
    assert_eq!(walk(&mut g).0, Err(Error::NullPointer));
    // text_len huge: bounded by the block and by RECORD_TEXT_MAX.
    let mut g = scene();
    g.w16(rt(INFOS) + 7 * PRB_INFO_SIZE + 16, 0xffff);
    let (r, n) = walk(&mut g);
    assert!(r.is_ok() && n == 3);
    // Garbage lpos: the record is skipped, the others still come.
    let mut g = scene();
    g.w64(rt(DESCS) + 6 * PRB_DESC_SIZE + 8, 0x7fff_ffff_ffff_fff0);
    g.w64(rt(DESCS) + 6 * PRB_DESC_SIZE + 16, 0x10);
    let (r, n) = walk(&mut g);
    assert!(r.is_ok() && n == 2, "{r:?} {n}");
    // Descriptors pointing outside RAM.
    let mut g = scene();
    g.w64(rb + 8, PAGE_OFFSET + (1 << 40));
    let (r, n) = walk(&mut g);
    assert!(r.is_ok() && n == 0);
    // Huge head/tail distance with a large ring: bounded by the ring size.
    let mut g = scene();
    g.w32(rb, 20);
    g.w64(rb + 24, 0x3fff_ffff_ffff_ffff);
    g.w64(rb + 32, 0);
    let (r, _) = walk(&mut g);
    assert!(r.is_ok());
}

#[test]
fn format_string_with_many_conversions_is_bounded() {
    let mut g = scene();
    let t = g.tasks[4];
    let fmt = "%s".repeat(100) + &"%999999999d".repeat(10) + "%.*s%*d";
    g.crash_direct(t, &fmt, &[0x8000_0000_0000_0000; 3]);
    let out = run_bounded(&mut g);
    assert!(str_of(&out.message).starts_with("(efault)(efault)"));
}

/// xorshift64*, for reproducible corruption.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

#[test]
fn random_corruption_never_panics() {
    let base = scene();
    // Interesting places: page tables, tasks, per-CPU areas, kernel data
    // (init_task, printk rings), the crashed stack.
    let hot: Vec<(u64, u64)> = vec![
        (g_phys(&base, rt(INIT_TASK)), T_SIZE),
        (SMALL_PAGES_PHYS, 0x20_0000),
        (0x60_0000, 0x10_0000),
        (0x10_0000, base.next_table - 0x10_0000),
        (g_phys(&base, rt(DESCS)), 0x200),
        (g_phys(&base, rt(INFOS)), 0x300),
        (g_phys(&base, rt(TEXT_DATA)), 0x1000),
        (g_phys(&base, rt(PRINTK_RB_STATIC)), 0x60),
    ];
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let t0 = Instant::now();
    for _ in 0..200 {
        let mut g = Guest { ram: base.ram.clone(), ..clone_meta(&base) };
        for _ in 0..(1 + rng.next() % 64) {
            let (start, len) = hot[(rng.next() % hot.len() as u64) as usize];
            let pa = (start + rng.next() % len) as usize;
            let v = rng.next();
            match v % 4 {
                0 => g.ram[pa] = v as u8,
                1 => g.ram[pa] ^= 1 << (v % 8),
                2 if pa + 8 <= g.ram.len() => {
                    g.ram[pa..pa + 8].copy_from_slice(&(PAGE_OFFSET + (v >> 40)).to_le_bytes())
                }
                _ if pa + 8 <= g.ram.len() => g.ram[pa..pa + 8].copy_from_slice(&v.to_le_bytes()),
                _ => {}
            }
        }
        let out = g.run();
        assert_eq!(out.status, RunStatus::Done as u32);
        assert_ne!(out.action, Action::None as u32);
        let input = g.input();
        let mut mem = SliceMem::new(&mut g.ram);
        let k = kernel_view(&mut mem, &input);
        let _ = printk::prb_for_each_last(&k, 64, |_| true);
        let _ = task::for_each_process(&k, 0, |t| {
            let _ = task::TaskInfo::read(&k, t);
            true
        });
        let mut bt = [Gva(0); 32];
        let _ = repair_kernel::backtrace(&k, &input, &mut bt);
    }
    assert!(t0.elapsed() < Duration::from_secs(60));
}

fn g_phys(g: &Guest, va: u64) -> u64 {
    g.phys(va)
}

fn clone_meta(g: &Guest) -> Guest {
    Guest {
        ram: vec![],
        layout: g.layout,
        pml4: g.pml4,
        next_table: g.next_table,
        next_obj: g.next_obj,
        next_big: g.next_big,
        tasks: g.tasks.clone(),
        nr_cpus: g.nr_cpus,
        regs: g.regs,
        cpu: g.cpu,
        next_desc_id: g.next_desc_id,
        head_lpos: g.head_lpos,
        rodata_next: g.rodata_next,
    }
}
