//! Walkers over an in-memory crashed guest.
mod common;
use common::*;

use repair_kernel::arch::x86_64::pgtable::{self, Paging};
use repair_kernel::layout::Item;
use repair_kernel::mem::{Error, Gpa, Gva, SliceMem};
use repair_kernel::task::{self, TaskInfo};
use repair_kernel::{percpu, printk, kernel_view};

#[test]
fn translates_2m_4k_and_rejects_bad_addresses() {
    let mut g = scene();
    let mem = SliceMem::new(&mut g.ram);
    let p = Paging::from_regs(g.regs.cr3, g.regs.cr4);
    // Kernel text on a 2 MiB page.
    let t = pgtable::translate(&mem, p, Gva(rt(PANIC) + 5)).unwrap();
    assert_eq!(t.gpa, Gpa(PANIC - KBASE_LINK + KBASE_PHYS + 5));
    assert_eq!(t.page_size, 0x20_0000);
    assert!(t.writable && !t.nx);
    // The 4 KiB stretch, mapped in reverse.
    let t = pgtable::translate(&mem, p, Gva(PAGE_OFFSET + SMALL_PAGES_PHYS + 0x1234)).unwrap();
    assert_eq!(t.gpa, Gpa(SMALL_PAGES_PHYS + 510 * 0x1000 + 0x234));
    assert_eq!(t.page_size, 0x1000);
    assert_eq!(pgtable::translate(&mem, p, Gva(0x0000_8000_0000_0000)), Err(Error::NonCanonical(Gva(0x0000_8000_0000_0000))));
    assert_eq!(pgtable::translate(&mem, p, Gva(0x1000)), Err(Error::NotMapped(Gva(0x1000))));
    assert_eq!(
        pgtable::translate(&mem, p, Gva(PAGE_OFFSET + RAM as u64)),
        Err(Error::NotMapped(Gva(PAGE_OFFSET + RAM as u64)))
    );
}

#[test]
fn translates_1g_pages_nx_and_5_level() {
    let mut ram = vec![0u8; 2 << 20];
    // 5-level: PML5 at 0x1000 -> PML4 0x2000 -> PDPT 0x3000 (1 GiB page, NX).
    let va: u64 = 0xff11_2233_4000_0000 | 0x0000_0000_0012_3456;
    let va = Gva(va);
    let idx = |lvl: u32| ((va.0 >> (12 + 9 * (lvl - 1))) & 0x1ff) as usize;
    let put = |ram: &mut Vec<u8>, pa: usize, v: u64| ram[pa..pa + 8].copy_from_slice(&v.to_le_bytes());
    put(&mut ram, 0x1000 + idx(5) * 8, 0x2000 | 3);
    put(&mut ram, 0x2000 + idx(4) * 8, 0x3000 | 3);
    put(&mut ram, 0x3000 + idx(3) * 8, 0x80 | 1 | (1 << 63)); // 1 GiB at 0, read-only, NX
    let mem = SliceMem::new(&mut ram);
    let la57 = Paging::from_regs(0x1000, 1 << 12);
    let t = pgtable::translate(&mem, la57, va).unwrap();
    assert_eq!(t.gpa, Gpa(0x12_3456 & 0x3fff_ffff));
    assert_eq!(t.page_size, 1 << 30);
    assert!(t.nx && !t.writable);
    // The same address is not canonical under 4-level paging.
    let four = Paging::from_regs(0x1000, 0);
    assert!(matches!(pgtable::translate(&mem, four, va), Err(Error::NonCanonical(_))));
}

#[test]
fn reads_across_physically_discontiguous_pages() {
    let mut g = scene();
    let va = PAGE_OFFSET + SMALL_PAGES_PHYS + 0x1ffc;
    g.wbytes(va, b"abcdefgh");
    let input = g.input();
    let mut mem = SliceMem::new(&mut g.ram);
    let k = kernel_view(&mut mem, &input);
    let mut b = [0u8; 8];
    k.read(Gva(va), &mut b).unwrap();
    assert_eq!(&b, b"abcdefgh");
    assert_eq!(k.sym(Item::SymPanic).unwrap(), Gva(rt(PANIC)));
}

#[test]
fn for_each_process_lists_the_tasks_like_ps() {
    let mut g = scene();
    let input = g.input();
    let mut mem = SliceMem::new(&mut g.ram);
    let k = kernel_view(&mut mem, &input);
    let mut seen = vec![];
    let n = task::for_each_process(&k, 100, |t| {
        let i = TaskInfo::read(&k, t).unwrap();
        seen.push((i.pid, i.comm_str().to_string(), i.state_char(), i.parent_pid));
        true
    })
    .unwrap();
    assert_eq!(n, 5);
    let pids: Vec<_> = seen.iter().map(|s| (s.0, s.1.as_str())).collect();
    assert_eq!(pids, [(1, "init"), (57, "sh"), (60, "ticker"), (73, "crasher"), (2, "kthreadd")]);
    assert!(seen.iter().all(|s| s.2 == 'S' && s.3 == 0));
    // Stopping early.
    let n = task::for_each_process(&k, 100, |_| false).unwrap();
    assert_eq!(n, 1);
}

#[test]
fn task_state_letters() {
    use repair_kernel::task::task_state_to_char as c;
    assert_eq!(c(0, 0), b'R');
    assert_eq!(c(1, 0), b'S');
    assert_eq!(c(2, 0), b'D');
    assert_eq!(c(0x402, 0), b'I');
    assert_eq!(c(0, 0x20), b'Z');
    assert_eq!(c(8, 0), b't');
}

#[test]
fn per_cpu_current_preempt_count_and_runqueue() {
    let mut g = scene();
    g.set_preempt_count(0, 0x10001);
    let crasher = g.tasks[4];
    let input = g.input();
    let mut mem = SliceMem::new(&mut g.ram);
    let k = kernel_view(&mut mem, &input);
    assert_eq!(percpu::current_task(&k, 0).unwrap().0, Gva(crasher));
    assert_eq!(percpu::current_task(&k, 1).unwrap().0, Gva(rt(INIT_TASK)));
    assert_eq!(percpu::preempt_count(&k, 0).unwrap(), 0x10001);
    assert_eq!(percpu::preempt_count_raw(&k, 0).unwrap(), 0x8001_0001);
    assert_eq!(percpu::rq_curr(&k, 0).unwrap().0, Gva(crasher));
    assert_eq!(percpu::rq_nr_switches(&k, 1).unwrap(), 1001);
    assert_eq!(percpu::panic_cpu(&k), Some(Ok(-1)));
    // CPU index beyond nr_cpu_ids.
    assert!(matches!(percpu::current_task(&k, 2), Err(Error::Absurd(..))));
}

#[test]
fn per_cpu_current_via_pcpu_hot() {
    let mut g = scene();
    // A 6.2-style build: pcpu_hot { current_task @0; preempt_count @8 }.
    g.layout.set(Item::PcpuHot, 0x3_8000);
    g.layout.set(Item::PcpuHotCurrentTask, 0);
    g.layout.set(Item::PcpuHotPreemptCount, 8);
    let sh = g.tasks[2];
    g.set_percpu(0, 0x3_8000, sh);
    let a = g.percpu_area(0);
    g.w32(a + 0x3_8008, 0x8000_0200);
    let input = g.input();
    let mut mem = SliceMem::new(&mut g.ram);
    let k = kernel_view(&mut mem, &input);
    assert_eq!(percpu::current_task(&k, 0).unwrap().0, Gva(sh));
    assert_eq!(percpu::preempt_count(&k, 0).unwrap(), 0x200);
}

fn records(g: &mut Guest, n: u32) -> Vec<(u64, String)> {
    let input = g.input();
    let mut mem = SliceMem::new(&mut g.ram);
    let k = kernel_view(&mut mem, &input);
    let mut v = vec![];
    printk::prb_for_each_last(&k, n, |r| {
        v.push((r.seq, String::from_utf8_lossy(r.text).into_owned()));
        true
    })
    .unwrap();
    v
}

#[test]
fn log_tail_yields_the_last_records_oldest_first() {
    let mut g = scene();
    let v = records(&mut g, 2);
    assert_eq!(v, [(106, "Run /init as init process".into()), (107, "sysrq: Trigger a crash".into())]);
    let v = records(&mut g, 100);
    assert_eq!(v.len(), 3);
    assert_eq!(v[0].1, "Linux version 6.1.0-test");
}

#[test]
fn log_tail_across_ring_wraps() {
    let mut g = scene();
    // 40 records of ~100 bytes: the 4 KiB text ring and the 8 descriptors
    // wrap several times.
    for i in 0..40 {
        g.printk(&format!("line {i:02} {}", "x".repeat(90)));
    }
    let v = records(&mut g, 5);
    let texts: Vec<_> = v.iter().map(|r| r.1[..7].to_string()).collect();
    assert_eq!(texts, ["line 35", "line 36", "line 37", "line 38", "line 39"]);
    let all = records(&mut g, 100);
    assert!(all.len() <= 8 && all.len() >= 7, "{}", all.len());
    assert!(all.windows(2).all(|w| w[1].0 == w[0].0 + 1));
    let input = g.input();
    let mut mem = SliceMem::new(&mut g.ram);
    let k = kernel_view(&mut mem, &input);
    let mut buf = [0u8; 64];
    let n = printk::log_tail(&k, 2, &mut buf).unwrap();
    assert_eq!(n, 64);
    assert!(buf.starts_with(b"line 38 xxx"));
}

#[test]
fn panic_message_rendering() {
    use repair_kernel::fmtbuf::FmtBuf;
    use repair_kernel::panic::vsnprintf;
    let render = |fmt: &str, args: &[u64]| {
        let mut out = [0u8; 200];
        let mut w = FmtBuf::new(&mut out);
        vsnprintf(
            fmt.as_bytes(),
            |i| args.get(i).copied().ok_or(Error::Backend),
            |p, buf| {
                let s: &[u8] = if p == 1 { b"eth0" } else { return Err(Error::NotMapped(Gva(p))) };
                let n = s.len().min(buf.len());
                buf[..n].copy_from_slice(&s[..n]);
                Ok(n)
            },
            &mut w,
        );
        String::from_utf8(w.as_bytes().to_vec()).unwrap()
    };
    assert_eq!(render("sysrq triggered crash\n", &[]), "sysrq triggered crash\n");
    assert_eq!(render("%s: %d %u %x %lx %5d|%-4d|%04x %%", &[1, (-3i64) as u64, u64::MAX, 0xab, 0xffff_ffff_8100_0000, 42, 7, 0xa]),
        "eth0: -3 4294967295 ab ffffffff81000000    42|7   |000a %");
    assert_eq!(render("%s %s %.2s", &[0, 2, 1]), "(null) (efault) et");
    assert_eq!(render("at %pS (%llu)", &[0xffff_ffff_8110_0000, 5]), "at 0xffffffff81100000 (5)");
    assert_eq!(render("\x010Kernel panic %c", &[b'!' as u64]), "Kernel panic !");
    assert_eq!(render("bad %q %", &[]), "bad %q ");
}

#[test]
fn panic_message_from_registers_and_stack() {
    let mut g = scene();
    let t = g.tasks[4];
    let name = g.rodata_str("watchdog");
    // Seven arguments: five in registers, two on the stack.
    g.crash_direct(t, "%s: %d %d %d %d %d %lx\n", &[name, 1, 2, 3, 4, 5, 0xfeed]);
    let out = g.run();
    assert_eq!(str_of(&out.message), "watchdog: 1 2 3 4 5 feed");
}

#[test]
fn backtrace_finds_return_addresses_on_the_task_stack() {
    let mut g = scene();
    let t = g.tasks[4];
    g.crash_oops(t);
    let input = g.input();
    let mut mem = SliceMem::new(&mut g.ram);
    let k = kernel_view(&mut mem, &input);
    let mut bt = [Gva(0); 16];
    let n = repair_kernel::backtrace(&k, &input, &mut bt);
    assert_eq!(&bt[..n], &[Gva(rt(OOPS_END + 0x9c)), Gva(rt(SYSRQ_HANDLE_CRASH + 0x40)), Gva(rt(KBASE_LINK + 0x20_0010))]);
}
