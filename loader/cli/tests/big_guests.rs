//! Any RAM size and memory map: sysrq-c crashes repaired in guests of
//! 512 MiB, 6 GiB and 20 GiB, on QEMU's `pc` (RAM split at 3 GiB) and `q35`
//! (at 2 GiB) machines. The RAM file is mapped with the layout QEMU reports
//! (`info mtree -f` over QMP), and the repair kernel's identity map covers
//! all of RAM, so in the big guests the crashing task's `task_struct`,
//! above 4 GiB, is found and killed.
//!
//! The oracle for "above 4 GiB": at the trap, the crashing CPU's current
//! task (the child that announced its pid) is read with the repair kernel's
//! walkers on the host, and its address translated twice, through the
//! guest's page tables over the RAM file and by QEMU itself (HMP `gva2gpa`).
//!
//! One guest at a time (a lock): two cores, and up to 20 GiB of sparse
//! RAM file in /dev/shm.

mod support;

use std::sync::Mutex;
use std::time::{Duration, Instant};

use harness::{Guest, GuestConfig, Kernel};
use loader::attach::{QemuBackend, QemuGuest};
use loader::flow::{FlowConfig, Mode};
use loader::guestmem::GuestPhys;
use repair_kernel::task::TaskInfo;

const GIB: u64 = 1 << 30;
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn boot(machine: &str, mem_mib: u32, qemu10: bool) -> Guest {
    let mut cfg = GuestConfig::new(Kernel::Debian).with_ram_file();
    if qemu10 {
        cfg = cfg.with_qemu10().unwrap();
    }
    cfg.mem_mib = mem_mib;
    cfg.qemu_args = vec!["-machine".into(), machine.into()];
    cfg.boot_timeout = Duration::from_secs(600);
    let shm_free = free_bytes("/dev/shm");
    assert!(
        shm_free > u64::from(mem_mib) << 20 || mem_mib <= 1024,
        "/dev/shm has {} MiB free, the guest's RAM file may need up to {mem_mib} MiB",
        shm_free >> 20
    );
    let t = Instant::now();
    let guest = Guest::boot(&cfg).unwrap();
    eprintln!("[{machine} {mem_mib} MiB] booted in {:.1} s", t.elapsed().as_secs_f64());
    guest
}

fn free_bytes(path: &str) -> u64 {
    let c = std::ffi::CString::new(path).unwrap();
    // SAFETY: `st` is a valid out-pointer for statvfs, `c` a NUL-terminated path.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return u64::MAX;
    }
    st.f_bavail as u64 * st.f_frsize as u64
}

/// Where QEMU puts RAM: `[0, low)` and, past the PCI hole, `[4 GiB, ..)`.
fn expected_layout(machine: &str, mem: u64) -> (u64, u64) {
    let low = match machine {
        "pc" if mem >= 0xe000_0000 => 0xc000_0000,
        "pc" => 0xe000_0000,
        _ if mem >= 0xb000_0000 => 0x8000_0000,
        _ => 0xb000_0000,
    }
    .min(mem);
    let ram_end = if mem > low { 4 * GIB + (mem - low) } else { low };
    (low, ram_end)
}

/// Boots a guest, attaches through the library (QMP, gdbstub, RAM file),
/// traps a sysrq-c crash, checks where the crashing task's `task_struct`
/// is, repairs, and checks the child died of SIGKILL and the guest lives.
fn crash_repaired(machine: &str, mem_mib: u32, qemu10: bool) {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mem = u64::from(mem_mib) << 20;
    let big = mem > 4 * GIB;
    let mut guest = boot(machine, mem_mib, qemu10);
    let tag = format!("[{machine} {mem_mib} MiB{}]", if qemu10 { ", QEMU 10" } else { "" });

    // Attach: the RAM map comes from QEMU.
    let image = repair_guest::kit::kit_image(guest.kernel()).unwrap();
    let t = Instant::now();
    let spec = QemuGuest {
        gdb: Some(guest.gdb_addr().parse().unwrap()),
        qmp: Some(guest.qmp_addr().parse().unwrap()),
        ram_file: guest.ram_file(),
    };
    let mut attached = spec.connect().unwrap();
    let (low, ram_end) = expected_layout(machine, mem);
    match &attached.backend {
        QemuBackend::GdbRam(g) => {
            let r = g.mem.regions();
            assert_eq!(r.first().map(|r| (r.gpa.0, r.file_offset)), Some((0, 0)), "{tag} {r:x?}");
            let top = r.last().unwrap();
            assert_eq!(top.gpa.0 + top.len, ram_end, "{tag} {r:x?}");
            if big {
                assert_eq!((top.gpa.0, top.file_offset, top.len), (4 * GIB, low, mem - low), "{tag} {r:x?}");
            }
        }
        _ => panic!("{tag}: not attached through the RAM file"),
    }
    assert_eq!(attached.ram_end, Some(ram_end), "{tag}");
    let mut session = attached.session(image, FlowConfig::default()).unwrap();
    assert_eq!(session.ram_end, ram_end);
    eprintln!("{tag} attached in {:.0} ms (RAM end {ram_end:#x}, low RAM {low:#x})", t.elapsed().as_secs_f64() * 1e3);
    session.arm(attached.guest()).unwrap();
    attached.guest().resume().unwrap();

    // Crash; the trap stops the guest at panic.
    let crash = guest.crash("sysrq-c").unwrap();
    let stop = attached.guest().wait_stop(Some(Duration::from_secs(120))).unwrap().expect("a stop at panic");
    let vcpu = stop.vcpu;
    let regs = attached.guest().get_regs(vcpu).unwrap();
    assert_eq!(regs.rip, session.panic_addr().unwrap().0, "{tag}: stopped at panic");

    // The oracle: the crashing CPU's current task is the child, and where
    // its task_struct is in guest-physical memory.
    let (task_gva, task_gpa) = {
        let input = session.contract_input(vcpu, &regs, Mode::Diagnose);
        let mut mem = GuestPhys::read_only(attached.guest(), session.ram_end);
        let k = repair_kernel::kernel_view(&mut mem, &input);
        let task = repair_kernel::percpu::current_task(&k, vcpu.0).unwrap();
        let info = TaskInfo::read(&k, task).unwrap();
        assert_eq!(info.pid as u32, crash.pid, "{tag}: the current task is the crashing child");
        (task.0 .0, k.translate(task.0).unwrap().gpa.0)
    };
    let qemu_says = attached.qmp.as_mut().unwrap().hmp(&format!("gva2gpa {task_gva:#x}")).unwrap();
    let qemu_gpa = qemu_says.trim().strip_prefix("gpa: 0x").and_then(|h| u64::from_str_radix(h, 16).ok());
    assert_eq!(qemu_gpa, Some(task_gpa), "{tag}: QEMU's translation of {task_gva:#x}: {qemu_says}");
    eprintln!("{tag} crashing task pid {} task_struct at {task_gva:#x} = GPA {task_gpa:#x}", crash.pid);
    if big {
        assert!(task_gpa >= 4 * GIB, "{tag}: the crashing task's task_struct is at {task_gpa:#x}, below 4 GiB");
    }

    // Repair: the repair kernel itself finds the task and kills it.
    let outcome = session.repair(attached.guest(), vcpu, Mode::Repair).unwrap();
    assert!(outcome.applied, "{tag}: {}", outcome.reason());
    assert_eq!(outcome.out.pid as u32, crash.pid, "{tag}: {}", outcome.reason());
    eprintln!(
        "{tag} repaired in {:.1} ms (stage {:.1}, run {:.1}): {}",
        outcome.timings.total,
        outcome.timings.stage,
        outcome.timings.run,
        outcome.reason()
    );
    attached.guest().resume().unwrap();
    assert_eq!(guest.wait_crash_exit(&crash, Duration::from_secs(120)).unwrap(), 137, "{tag}");

    // Detach (dropping the connection removes the trap, the guest runs on)
    // and check the guest carries on.
    drop(attached);
    let r = guest.run("echo alive", Duration::from_secs(60)).unwrap();
    assert_eq!((r.status, r.output), (0, vec!["alive".to_string()]), "{tag}");
    guest.shutdown().unwrap();
}

/// The `repair-guest watch` program on a big `q35` guest: its attach maps
/// the RAM file from QEMU's layout (the `pc` guess would put 2 GiB of RAM
/// at the wrong addresses), and a crash is repaired.
fn watch_repairs(machine: &str, mem_mib: u32) {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut guest = boot(machine, mem_mib, false);
    let tag = format!("[watch, {machine} {mem_mib} MiB]");
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("events.jsonl");
    let t = Instant::now();
    let mut watcher = support::start_watch(&guest, &events, &[]);
    eprintln!("{tag} watching {:.0} ms after start", t.elapsed().as_secs_f64() * 1e3);
    let crash = guest.crash("sysrq-c").unwrap();
    assert_eq!(guest.wait_crash_exit(&crash, Duration::from_secs(120)).unwrap(), 137, "{tag}");
    let text = support::wait_event(&events, "\"repaired\"", 1, Duration::from_secs(30), Some(&mut watcher));
    let repaired = text.lines().find(|l| l.contains("\"repaired\"")).unwrap();
    assert!(repaired.contains(&format!("\"pid\":{}", crash.pid)), "{tag}: {repaired}");
    eprintln!("{tag} {repaired}");
    support::kill(watcher.id(), libc::SIGTERM);
    assert!(support::wait_exit(&mut watcher, 30).success(), "{tag}");
    let r = guest.run("echo alive", Duration::from_secs(60)).unwrap();
    assert_eq!(r.status, 0, "{tag}");
    guest.shutdown().unwrap();
}

#[test]
fn pc_512m() {
    crash_repaired("pc", 512, false);
}

#[test]
fn q35_512m() {
    crash_repaired("q35", 512, false);
}

#[test]
fn pc_6g_task_above_4g() {
    crash_repaired("pc", 6 << 10, false);
}

#[test]
fn q35_6g_task_above_4g() {
    crash_repaired("q35", 6 << 10, false);
}

#[test]
fn pc_20g_task_above_4g() {
    crash_repaired("pc", 20 << 10, false);
}

#[test]
fn q35_20g_task_above_4g() {
    crash_repaired("q35", 20 << 10, false);
}

#[test]
fn q35_6g_task_above_4g_qemu10() {
    crash_repaired("q35", 6 << 10, true);
}

#[test]
fn q35_6g_watch_cli() {
    watch_repairs("q35", 6 << 10);
}
