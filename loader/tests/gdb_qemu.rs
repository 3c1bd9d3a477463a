//! The GDB client against a real QEMU (TCG, 2 vCPUs, no kernel): a few
//! bytes of real-mode code written into guest RAM and run under the
//! gdbstub, checked against QEMU's own view through QMP/HMP.

#[path = "gdb_support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use loader::access::{AccessError, BpKind, GuestAccess, Gpa, Gva, PhysAccess, RunOutcome, StopReason, VcpuId};
use loader::gdb::GdbGuest;
use loader::ram::{RamFile, WithRam};
use loader::qmp::{hmp_register, Qmp};
use support::{Opts, Qemu};

/// 16-bit code at 0x1000: `inc word [0x2000]; jmp 0x1000`.
const LOOP_AT: u64 = 0x1000;
const JMP_AT: u64 = 0x1004;
const COUNTER: u64 = 0x2000;
const LOOP_CODE: [u8; 6] = [0xff, 0x06, 0x00, 0x20, 0xeb, 0xfa];

fn counter(g: &mut impl GuestAccess) -> u16 {
    let mut b = [0u8; 2];
    g.read_phys(Gpa(COUNTER), &mut b).unwrap();
    u16::from_le_bytes(b)
}

/// Puts the loop in RAM and points `vcpu` at it (real mode, CS = 0).
fn load_loop(g: &mut impl GuestAccess, vcpu: VcpuId) {
    g.write_phys(Gpa(LOOP_AT), &LOOP_CODE).unwrap();
    g.write_phys(Gpa(COUNTER), &[0, 0]).unwrap();
    let mut r = g.get_regs(vcpu).unwrap();
    r.cs = 0;
    r.rip = LOOP_AT;
    g.set_regs(vcpu, &r).unwrap();
    let back = g.get_regs(vcpu).unwrap();
    assert_eq!((back.cs, back.rip), (0, LOOP_AT));
}

#[test]
fn registers_match_qemu_and_control_registers_are_writable() {
    let q = Qemu::start(Opts::default());
    let mut g = GdbGuest::connect(q.gdb.clone()).unwrap();
    let mut qmp = Qmp::connect(&q.qmp).unwrap();
    assert_eq!(g.vcpus().unwrap(), [VcpuId(0), VcpuId(1)]);
    // `-S`: never started; a running VM would be "debug" (stopped on connect).
    assert_eq!(qmp.query_status().unwrap(), "prelaunch");

    let r = g.get_regs(VcpuId(0)).unwrap();
    // x86 reset state.
    assert_eq!((r.rip, r.cs, r.cr0), (0xfff0, 0xf000, 0x6000_0010));
    let info = qmp.hmp("info registers").unwrap();
    assert_eq!(Some(r.cr3), hmp_register(&info, "CR3"));
    assert_eq!(Some(r.efer), hmp_register(&info, "EFER"));
    // Outside long mode HMP prints the 32-bit names (EFL, EAX).
    assert_eq!(Some(r.rflags), hmp_register(&info, "EFL"));

    let mut w = r;
    w.cr3 = 0x5000;
    w.efer = 0x100; // LME, legal with paging off
    w.rax = 0x1122_3344;
    g.set_regs(VcpuId(0), &w).unwrap();
    assert_eq!(g.get_regs(VcpuId(0)).unwrap(), w, "every written register reads back");
    let info = qmp.hmp("info registers").unwrap();
    assert_eq!(hmp_register(&info, "CR3"), Some(0x5000));
    assert_eq!(hmp_register(&info, "EFER"), Some(0x100));
    assert_eq!(hmp_register(&info, "EAX"), Some(0x1122_3344));
    // Single registers by name, incl. ones CpuState lacks.
    assert_eq!(g.read_register(VcpuId(0), "cr8").unwrap(), 0);
    // (r8-r15 read as 0 and ignore writes outside 64-bit mode.)
    g.write_register(VcpuId(1), "rbx", 77).unwrap();
    assert_eq!(g.get_regs(VcpuId(1)).unwrap().rbx, 77);
    assert_eq!(g.get_regs(VcpuId(0)).unwrap().rbx, 0, "vCPUs are distinct");
}

#[test]
fn physical_memory_matches_pmemsave_and_xp() {
    let q = Qemu::start(Opts::default());
    let mut g = GdbGuest::connect(q.gdb.clone()).unwrap();
    let mut qmp = Qmp::connect(&q.qmp).unwrap();
    // Crosses packet-size chunks and pages; includes bytes that need escaping.
    let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 + (i >> 8)) as u8).collect();
    g.write_phys(Gpa(0x10_0ff0), &data).unwrap();
    let mut back = vec![0u8; data.len()];
    g.read_phys(Gpa(0x10_0ff0), &mut back).unwrap();
    assert_eq!(back, data);

    let f = q.path("pmem");
    qmp.pmemsave(0x10_0ff0, data.len() as u64, &f).unwrap();
    assert_eq!(std::fs::read(&f).unwrap(), data);
    let xp = qmp.hmp("xp /1gx 0x100ff0").unwrap();
    let word = u64::from_le_bytes(data[..8].try_into().unwrap());
    assert!(xp.contains(&format!("{word:016x}")), "{xp}");

    // Virtual mode in real mode is linear == physical; switching back and
    // forth keeps both right.
    let mut v = [0u8; 16];
    g.read_virt(VcpuId(0), Gva(0x10_0ff0), &mut v).unwrap();
    assert_eq!(&v, &data[..16]);
    g.read_phys(Gpa(0x10_0ff0), &mut v).unwrap();
    assert_eq!(&v, &data[..16]);
}

#[test]
fn run_one_vcpu_until_breakpoint_others_stay_stopped() {
    let q = Qemu::start(Opts::default());
    let mut g = GdbGuest::connect(q.gdb.clone()).unwrap();
    load_loop(&mut g, VcpuId(0));
    let ap_before = g.get_regs(VcpuId(1)).unwrap();

    // One loop iteration, to the jmp.
    let out = g.run_vcpu_until(VcpuId(0), Gva(JMP_AT), Duration::from_secs(5)).unwrap();
    let RunOutcome::Reached(s) = out else { panic!("{out:?}") };
    assert_eq!((s.vcpu, s.rip, s.reason), (VcpuId(0), Gva(JMP_AT), StopReason::Trap));
    assert_eq!(counter(&mut g), 1);
    // Again from the stop address: it steps over and comes round once more.
    g.set_breakpoint(Gva(JMP_AT), BpKind::Hardware).unwrap();
    let out = g.run_vcpu_until(VcpuId(0), Gva(JMP_AT), Duration::from_secs(5)).unwrap();
    assert!(matches!(out, RunOutcome::Reached(_)), "{out:?}");
    assert_eq!(counter(&mut g), 2);
    g.clear_breakpoint(Gva(JMP_AT), BpKind::Hardware).unwrap();
    assert_eq!(g.get_regs(VcpuId(1)).unwrap(), ap_before, "vCPU 1 did not move");

    // Continue only vCPU 1 (the AP, halted waiting for SIPI): vCPU 0,
    // whose loop would bump the counter, must stay stopped.
    let out = g.run_vcpu_until(VcpuId(1), Gva(0x7777), Duration::from_millis(500)).unwrap();
    let RunOutcome::TimedOut(s) = out else { panic!("{out:?}") };
    assert_eq!(s.reason, StopReason::Interrupted);
    assert_eq!(counter(&mut g), 2, "vCPU 0 ran while only vCPU 1 was continued");
    assert_eq!(g.get_regs(VcpuId(0)).unwrap().rip, JMP_AT);

    // A step is one instruction.
    let s = g.step_vcpu(VcpuId(0)).unwrap();
    assert_eq!(s.rip, Gva(LOOP_AT));
    let s = g.step_vcpu(VcpuId(0)).unwrap();
    assert_eq!(s.rip, Gva(JMP_AT));
    assert_eq!(counter(&mut g), 3);
}

#[test]
fn resume_wait_stop_pause_and_breakpoint_kinds() {
    let q = Qemu::start(Opts::default());
    let mut g = GdbGuest::connect(q.gdb.clone()).unwrap();
    load_loop(&mut g, VcpuId(0));
    for kind in [BpKind::Software, BpKind::Hardware] {
        g.set_breakpoint(Gva(JMP_AT), kind).unwrap();
        let before = counter(&mut g);
        g.resume().unwrap();
        assert!(g.is_running());
        let s = g.wait_stop(Some(Duration::from_secs(5))).unwrap().expect("breakpoint hit");
        assert_eq!((s.vcpu, s.rip, s.reason), (VcpuId(0), Gva(JMP_AT), StopReason::Trap), "{kind:?}");
        // Resuming from the breakpoint steps over it: exactly one more lap.
        g.resume().unwrap();
        let s = g.wait_stop(Some(Duration::from_secs(5))).unwrap().expect("breakpoint hit again");
        assert_eq!(s.rip, Gva(JMP_AT));
        assert_eq!(counter(&mut g), before.wrapping_add(2), "{kind:?}");
        g.clear_breakpoint(Gva(JMP_AT), kind).unwrap();
    }
    // No breakpoint: it runs until paused.
    g.resume().unwrap();
    assert!(matches!(g.get_regs(VcpuId(0)), Err(AccessError::Running)));
    assert_eq!(g.wait_stop(Some(Duration::from_millis(300))).unwrap(), None);
    let s = g.pause().unwrap().expect("a stop");
    assert_eq!(s.reason, StopReason::Interrupted);
    // The loop ran freely: on a loaded host QEMU may get little CPU in
    // 300 ms, so let it run in further slices (bounded) until it shows.
    let mut laps = counter(&mut g);
    let deadline = Instant::now() + Duration::from_secs(60);
    while laps <= 1000 && Instant::now() < deadline {
        g.resume().unwrap();
        std::thread::sleep(Duration::from_millis(300));
        g.pause().unwrap().expect("a stop");
        laps = counter(&mut g);
    }
    assert!(laps > 1000, "the loop ran freely ({laps} laps)");
    assert_eq!(g.pause().unwrap(), None, "pausing a stopped guest is a no-op");
}

#[test]
fn guest_going_away_is_an_error_not_a_hang() {
    let mut q = Qemu::start(Opts::default());
    let mut g = GdbGuest::connect(q.gdb.clone()).unwrap();
    let mut qmp = Qmp::connect(&q.qmp).unwrap();
    load_loop(&mut g, VcpuId(0));
    g.resume().unwrap();
    let _ = qmp.execute("quit", None);
    let t = Instant::now();
    let mut r = Ok(None);
    while t.elapsed() < Duration::from_secs(10) {
        r = g.wait_stop(Some(Duration::from_millis(200)));
        if !matches!(r, Ok(None)) {
            break;
        }
    }
    assert!(matches!(r, Err(AccessError::GuestGone(_))), "{r:?}");
    assert!(q.wait_exit(Duration::from_secs(5)));
    // Connecting to nothing tells the user what to start.
    let e = GdbGuest::connect(q.gdb.clone()).unwrap_err();
    assert!(e.to_string().contains("-gdb unix:PATH"), "{e}");
}

#[test]
fn tcp_endpoint_works() {
    let q = Qemu::start(Opts { gdb_tcp: true, ..Default::default() });
    let mut g = GdbGuest::connect(q.gdb.clone()).unwrap();
    // QEMU 7.2 answers QStartNoAckMode with an empty reply: acks stay on.
    eprintln!("no-ack mode: {}", g.client().no_ack());
    assert_eq!(g.client().packet_size, 4096);
    assert_eq!(g.vcpus().unwrap().len(), 2);
    g.write_phys(Gpa(0x3000), b"tcp").unwrap();
    let mut b = [0u8; 3];
    g.read_phys(Gpa(0x3000), &mut b).unwrap();
    assert_eq!(&b, b"tcp");
}

fn time_per_call(n: u32, mut f: impl FnMut()) -> Duration {
    f();
    let t = Instant::now();
    for _ in 0..n {
        f();
    }
    t.elapsed() / n
}

#[test]
fn ram_file_backend_sees_the_same_ram_and_is_faster() {
    let q = Qemu::start(Opts { ram_file: true, ..Default::default() });
    let gdb = GdbGuest::connect(q.gdb.clone()).unwrap();
    let ram = RamFile::open_pc_file(q.ram_file.as_ref().unwrap()).unwrap();
    let mut g = WithRam::new(gdb, ram);

    // Written through the gdbstub, read from the file, and back.
    g.inner.write_phys(Gpa(0x8000), b"via gdbstub").unwrap();
    let mut b = [0u8; 11];
    g.read_phys(Gpa(0x8000), &mut b).unwrap();
    assert_eq!(&b, b"via gdbstub");
    let mut fast = WithRam::new(g.inner, g.mem).write_through(true);
    fast.write_phys(Gpa(0x9000), b"via the file").unwrap();
    let mut b = [0u8; 12];
    fast.inner.read_phys(Gpa(0x9000), &mut b).unwrap();
    assert_eq!(&b, b"via the file");

    // The loop runs from code written by the combinator (through gdb).
    let mut g = WithRam::new(fast.inner, fast.mem);
    load_loop(&mut g, VcpuId(0));
    let out = g.run_vcpu_until(VcpuId(0), Gva(JMP_AT), Duration::from_secs(5)).unwrap();
    assert!(matches!(out, RunOutcome::Reached(_)));
    assert_eq!(counter(&mut g), 1);

    let mut page = vec![0u8; 4096];
    let via_gdb = time_per_call(50, || g.inner.read_phys(Gpa(0x10_0000), &mut page).unwrap());
    let via_file = time_per_call(50, || g.mem_read(Gpa(0x10_0000), &mut page));
    let wr_gdb = time_per_call(50, || g.inner.write_phys(Gpa(0x20_0000), &page).unwrap());
    let regs = time_per_call(50, || {
        g.get_regs(VcpuId(0)).unwrap();
    });
    eprintln!(
        "4 KiB phys read: gdbstub {via_gdb:?}, RAM file {via_file:?}; 4 KiB phys write via gdbstub {wr_gdb:?}; get_regs {regs:?}"
    );
    assert!(via_file < via_gdb);

    // 1 MiB through the gdbstub (pipelined `m`) equals the file's bytes.
    let pattern: Vec<u8> = (0..1u32 << 20).map(|i| (i ^ (i >> 9)) as u8).collect();
    g.mem.write_phys(Gpa(0x10_0000), &pattern).unwrap();
    let mut big = vec![0u8; 1 << 20];
    let t = Instant::now();
    g.inner.read_phys(Gpa(0x10_0000), &mut big).unwrap();
    eprintln!("1 MiB phys read via gdbstub: {:?}", t.elapsed());
    assert!(big == pattern);
}

trait MemRead {
    fn mem_read(&mut self, gpa: Gpa, buf: &mut [u8]);
}

impl<A: GuestAccess> MemRead for WithRam<A, RamFile> {
    fn mem_read(&mut self, gpa: Gpa, buf: &mut [u8]) {
        self.read_phys(gpa, buf).unwrap()
    }
}

/// Long mode set up from outside, as the repair flow's vCPU state is:
/// GDT at 0 (GDTR's reset base), identity map of the first 2 MiB plus the
/// same 2 MiB at the kernel's -2 GiB, all through `set_regs`.
#[test]
fn long_mode_state_64_bit_registers_and_virtual_reads() {
    let q = Qemu::start(Opts::default());
    let mut g = GdbGuest::connect(q.gdb.clone()).unwrap();
    let mut qmp = Qmp::connect(&q.qmp).unwrap();
    let gdt: [u64; 3] = [0, 0x00af_9a00_0000_ffff, 0x00cf_9200_0000_ffff];
    for (i, d) in gdt.iter().enumerate() {
        g.write_phys(Gpa(i as u64 * 8), &d.to_le_bytes()).unwrap();
    }
    // PML4 0x10000: [0] and [511] -> PDPT 0x11000 ([0] and [510] -> PD 0x12000: 2 MiB page at 0).
    for (at, v) in [(0x10000u64, 0x11003u64), (0x10000 + 511 * 8, 0x11003), (0x11000, 0x12003), (0x11000 + 510 * 8, 0x12003), (0x12000, 0x83)] {
        g.write_phys(Gpa(at), &v.to_le_bytes()).unwrap();
    }
    // 64-bit: inc qword [0x2000]; jmp back.
    let code = [0x48, 0xff, 0x04, 0x25, 0x00, 0x20, 0x00, 0x00, 0xeb, 0xf6];
    g.write_phys(Gpa(0x1000), &code).unwrap();
    g.write_phys(Gpa(0x2000), &[0; 8]).unwrap();

    let mut w = g.get_regs(VcpuId(0)).unwrap();
    w.cr4 = 0x20; // PAE
    w.cr3 = 0x10000;
    w.efer = 0x100; // LME; CR0.PG then sets LMA
    w.cr0 = 0x8000_0011;
    w.cs = 0x08;
    w.ss = 0x10;
    w.ds = 0x10;
    w.es = 0x10;
    w.rip = 0xffff_ffff_8000_1000;
    w.rsp = 0xffff_ffff_8010_0000;
    w.fs_base = 0xdead_beef_0000;
    w.gs_base = 0xffff_8880_1234_5000;
    w.kernel_gs_base = 0xffff_8880_0000_1000;
    w.r15 = 0x0123_4567_89ab_cdef;
    w.rflags = 0x2;
    g.set_regs(VcpuId(0), &w).unwrap();
    let back = g.get_regs(VcpuId(0)).unwrap();
    let mut expect = w;
    expect.efer = 0x500; // LMA
    assert_eq!(back, expect);
    let info = qmp.hmp("info registers").unwrap();
    assert_eq!(hmp_register(&info, "RIP"), Some(0xffff_ffff_8000_1000), "{info}");
    assert_eq!(hmp_register(&info, "EFER"), Some(0x500));
    assert_eq!(hmp_register(&info, "CR3"), Some(0x10000));
    assert_eq!(hmp_register(&info, "R15"), Some(0x0123_4567_89ab_cdef));

    let out = g.run_vcpu_until(VcpuId(0), Gva(0xffff_ffff_8000_1008), Duration::from_secs(5)).unwrap();
    assert!(matches!(out, RunOutcome::Reached(_)), "{out:?}");
    let mut b = [0u8; 8];
    g.read_virt(VcpuId(0), Gva(0xffff_ffff_8000_2000), &mut b).unwrap();
    assert_eq!(u64::from_le_bytes(b), 1);
    g.read_virt(VcpuId(0), Gva(0x2000), &mut b).unwrap();
    assert_eq!(u64::from_le_bytes(b), 1);
    // Unmapped: an error naming the address, not garbage.
    let e = g.read_virt(VcpuId(0), Gva(0xffff_ffff_c000_0000), &mut b).unwrap_err();
    assert!(matches!(e, AccessError::NotMapped(_)), "{e}");
    // The same through the RAM-less page walk of the trait helper.
    let mut rd = |a: Gpa| loader::access::read_phys_u64(&mut g, a);
    let pa = loader::access::translate(&mut rd, 0x10000, 0x20, Gva(0xffff_ffff_8000_2000)).unwrap();
    assert_eq!(pa, Some(Gpa(0x2000)));
}
