//! The kernel matrix (`scripts/kit-matrix`): Debian's stock cloud kernel of
//! every supported series, 5.10, 6.1, 6.12 and 7.x, each with its own repair
//! image, judged by the guest itself (its console, its exit statuses, its
//! bystander). One test per series, so a failure names the kernel.

mod support;

use harness::{Guest, GuestConfig, Kernel, Kit, Series};
use loader::access::{GuestAccess, Gva, VcpuId};
use std::time::Duration;
use support::{start_watch, symbol, wait_event};


/// The stock kernels have no LKDTM, so the BUG-style oops and the kernel
/// spinner are made the way the design's fault injection does it: through
/// the gdbstub (which keeps TCG's code cache right), before the watcher
/// attaches, `ud2` (what `BUG()` compiles to) over the first byte of
/// `sysrq_handle_loglevel` and `jmp .` over the first byte of
/// `sysrq_handle_unrt`. A process writing `9` or `n` to
/// /proc/sysrq-trigger then takes the kernel's own invalid-opcode oops
/// (`die`, `oops_end`, and with `oops=panic` `panic("Fatal exception")`),
/// or spins in the kernel with interrupts on, in process context. No other
/// process calls those handlers.
const OOPS_FN: &str = "sysrq_handle_loglevel";
const OOPS_KEY: char = '9';
const SPIN_FN: &str = "sysrq_handle_unrt";
const SPIN_KEY: char = 'n';

fn inject_faults(guest: &Guest, kernel: Kernel) {
    let image = repair_guest::kit::kit_image(kernel).unwrap();
    let (mut g, session) = repair_guest::kit::attach(guest, image, loader::flow::FlowConfig::default())
        .unwrap_or_else(|e| panic!("{kernel:?}: attach to inject faults: {e:#}"));
    let slide = session.slide.slide;
    for (name, bytes) in [(OOPS_FN, &[0x0f_u8, 0x0b][..]), (SPIN_FN, &[0xeb, 0xfe][..])] {
        let at = Gva(symbol(kernel, name).wrapping_add(slide));
        g.write_virt(VcpuId(0), at, bytes).unwrap();
        let mut back = vec![0u8; bytes.len()];
        g.read_virt(VcpuId(0), at, &mut back).unwrap();
        assert_eq!(back, bytes, "{kernel:?}: {name} not written");
    }
    // Leaving resumes the guest (the stop was ours) and keeps no breakpoint.
    drop(g);
}

fn events(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .collect()
}

/// Everything the matrix requires of one series, on one guest with one
/// watcher (`watch --hangs`): a sysrq-c child repaired; a BUG-style oops
/// from a process repaired (`oops=panic`), the event naming the process
/// the guest's own oops report names; a process spinning in the kernel
/// detected and killed. Judged by the guest: exit statuses, its console,
/// its bystander's data, a new process.
fn repairs_on(series: Series) {
    let kernel = Kernel::Matrix(series);
    let mut cfg = GuestConfig::new(kernel).append("oops=panic").with_ram_file();
    cfg.boot_timeout = Duration::from_secs(300); // a loaded host
    let mut guest = Guest::boot(&cfg)
        .unwrap_or_else(|e| panic!("{series}: {e}"));
    inject_faults(&guest, kernel);
    let ev = guest.dir().join("events.jsonl");
    let mut watcher = start_watch(&guest, &ev, &["--hangs", "--hang-kill-after-ms", "3000"]);
    let long = Duration::from_secs(120);

    // 1. sysrq-c.
    let c = guest.crash("sysrq-c").unwrap();
    let status = guest.wait_crash_exit(&c, long);
    assert_eq!(status.unwrap_or_else(|e| panic!("{series}: {e}\n{:#?}", events(&ev))), 137, "{series}");
    wait_event(&ev, "\"repaired\"", 1, Duration::from_secs(30), Some(&mut watcher));
    let e = events(&ev).into_iter().find(|e| e["event"] == "repaired").unwrap();
    assert_eq!(e["pid"], c.pid as i64, "{series}: {e}");
    assert_eq!(e["message"], "sysrq triggered crash", "{series}: {e}");
    assert_eq!(e["action"], "kill", "{series}: {e}");
    // The kernel log read through printk_info as this kernel's DWARF lays
    // it out (7.2 adds caller_id2 and comm[16]): the line the child wrote
    // to /dev/kmsg just before it crashed is there.
    let announce = format!("GUEST-KIT crash {} pid {}", c.id, c.pid);
    assert!(
        e["log_tail"].as_array().is_some_and(|l| l.iter().any(|x| x.as_str().is_some_and(|x| x.contains(&announce)))),
        "{series}: {announce:?} not in the log tail: {e}"
    );
    // Where the kernel's preempt count does not show spinlocks (no
    // CONFIG_PREEMPT_COUNT: Debian's 5.10), the verdict says so.
    let config = std::fs::read_to_string(Kit::locate().unwrap().config(kernel).unwrap()).unwrap();
    let counts = config.lines().any(|l| l == "CONFIG_PREEMPT_COUNT=y");
    assert_eq!(e["reason"].as_str().unwrap().contains("no CONFIG_PREEMPT_COUNT"), !counts, "{series}: {e}");

    // 2. The BUG-style oops from a process.
    let from = guest.console_len();
    let r = guest.run(&format!("echo {OOPS_KEY} > /proc/sysrq-trigger"), long).unwrap();
    assert_eq!(r.status, 137, "{series}: the oopsing process was not killed: {r:?}\n{}", guest.console_tail(40));
    wait_event(&ev, "\"repaired\"", 2, Duration::from_secs(30), Some(&mut watcher));
    let e = events(&ev).into_iter().filter(|e| e["event"] == "repaired").nth(1).unwrap();
    let console = guest.console().get(from..).unwrap_or_default().to_string();
    assert!(console.contains("invalid opcode"), "{series}: no oops on the console:\n{console}");
    assert!(console.contains(OOPS_FN), "{series}: the oops does not name {OOPS_FN}:\n{console}");
    let (cpu, pid, comm) = harness::last_cpu_line(&console).unwrap_or_else(|| panic!("{series}: no CPU line:\n{console}"));
    assert_eq!(e["message"], "Fatal exception", "{series}: {e}");
    assert_eq!(e["kind"], "oops with panic_on_oops", "{series}: {e}");
    assert_eq!((e["cpu"].as_u64(), e["pid"].as_i64(), e["comm"].as_str()), (Some(cpu as u64), Some(pid as i64), Some(comm.as_str())), "{series}: the event is not the guest's own report: {e}\n{console}");
    assert!(!console.contains("Kernel panic"), "{series}: the panic went on:\n{console}");

    // 3. A process spinning in the kernel, started in the background.
    let r = guest.run(&format!("sh -c 'echo {SPIN_KEY} > /proc/sysrq-trigger' & echo $!"), long).unwrap();
    let spinner: i64 = r.output.last().and_then(|l| l.trim().parse().ok()).unwrap_or_else(|| panic!("{series}: {r:?}"));
    let hangs_of = |all: &[serde_json::Value]| -> Vec<serde_json::Value> {
        all.iter().filter(|e| e["event"] == "hang" && e["pid"] == spinner).cloned().collect()
    };
    if preempts_kernel_code(kernel) {
        // A preemptible kernel (7.x: PREEMPT_LAZY by default) preempts the
        // spinner: other tasks still run on its CPU, the kernel sees no
        // soft lockup, and so the watch reports it as a stuck CPU but never
        // as certain, and leaves it alone. Then the test undoes its fault
        // (the watcher gone, through the gdbstub) and the spinner returns.
        wait_event(&ev, &format!("\"pid\":{spinner}"), 3, Duration::from_secs(60), Some(&mut watcher));
        std::thread::sleep(Duration::from_secs(10)); // well past --hang-kill-after-ms
        let all = events(&ev);
        let hangs = hangs_of(&all);
        assert!(hangs.iter().all(|h| h["certain"] == false && h["kind"] == "stuck CPU"), "{series}: {hangs:#?}");
        assert!(!all.iter().any(|e| (e["event"] == "repaired" || e["event"] == "declined") && e["pid"] == spinner), "{series}: {all:#?}");
        support::kill(watcher.id(), libc::SIGINT);
        assert!(support::wait_exit(&mut watcher, 30).success(), "{series}");
        undo_spin_fault(&guest, kernel);
        assert!(wait_gone(&mut guest, spinner), "{series}: the spinner did not return once its fault was undone");
    } else {
        // Without kernel preemption the spinner owns its CPU: the stuck CPU
        // becomes certain and the spinner is killed.
        let text = wait_event(&ev, "\"repaired\"", 3, long, Some(&mut watcher));
        let all: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        let hangs = hangs_of(&all);
        assert!(hangs.iter().any(|h| h["certain"] == true && h["kind"] == "stuck CPU"), "{series}: {all:#?}");
        let rep = all.iter().filter(|e| e["event"] == "repaired").nth(2).unwrap();
        assert_eq!(rep["pid"], spinner, "{series}: {rep}");
        assert!(wait_gone(&mut guest, spinner), "{series}: the spinner {spinner} still runs");
        support::kill(watcher.id(), libc::SIGINT);
        assert!(support::wait_exit(&mut watcher, 30).success(), "{series}");
    }

    // The guest carries on.
    assert!(guest.verify_bystander().unwrap().ok, "{series}");
    assert_eq!(guest.run("echo a new process", long).unwrap().status, 0, "{series}");
    let all = events(&ev);
    assert!(!all.iter().any(|e| e["event"] == "declined" || e["event"] == "error"), "{series}: {all:#?}");
}

/// Whether the kernel preempts kernel code by default: its config, as
/// Debian built it (`CONFIG_PREEMPT_LAZY` or full `CONFIG_PREEMPT`, not
/// voluntary).
fn preempts_kernel_code(kernel: Kernel) -> bool {
    let config = std::fs::read_to_string(Kit::locate().unwrap().config(kernel).unwrap()).unwrap();
    config.lines().any(|l| l == "CONFIG_PREEMPT_LAZY=y" || l == "CONFIG_PREEMPT=y")
        && !config.lines().any(|l| l == "CONFIG_PREEMPT_VOLUNTARY=y")
}

/// Puts the original bytes back over the spinner's `jmp .`.
fn undo_spin_fault(guest: &Guest, kernel: Kernel) {
    let image = repair_guest::kit::kit_image(kernel).unwrap();
    let (mut g, session) = repair_guest::kit::attach(guest, image, loader::flow::FlowConfig::default()).unwrap();
    let link = symbol(kernel, SPIN_FN);
    let vmlinux = std::fs::read(Kit::locate().unwrap().vmlinux(kernel).unwrap()).unwrap();
    let pages = builder::elf::VmlinuxPages::new(&vmlinux).unwrap();
    let orig = pages.bytes(link, link + 2);
    g.write_virt(VcpuId(0), Gva(link.wrapping_add(session.slide.slide)), &orig).unwrap();
    drop(g);
}

/// Waits until `pid` is gone or a zombie.
fn wait_gone(guest: &mut Guest, pid: i64) -> bool {
    let start = std::time::Instant::now();
    // Generous: on a loaded host a TCG guest may take a minute per command.
    while start.elapsed() < Duration::from_secs(300) {
        let r = guest
            .run(&format!("grep -q '^State:.*Z' /proc/{pid}/status 2>/dev/null || ! test -e /proc/{pid}"), Duration::from_secs(240))
            .unwrap_or_else(|e| panic!("the guest did not answer: {e}"));
        if r.status == 0 {
            return true;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    false
}

/// `diagnose --wait-crash` (read-only) on a sysrq-c child, then the panic
/// goes on as it would have: the diagnosis equals the guest's own report
/// (message, CPU, pid, comm, the crashing function in the backtrace).
fn diagnosis_is_the_guests(series: Series) {
    let kernel = Kernel::Matrix(series);
    let mut cfg = GuestConfig::new(kernel);
    cfg.boot_timeout = Duration::from_secs(300); // a loaded host
    let mut guest = Guest::boot(&cfg).unwrap_or_else(|e| panic!("{series}: {e}"));
    let (diag, stderr) = support::spawn_diagnose(&guest, kernel, 120);
    let crash = guest.crash("sysrq-c").unwrap();
    let out = diag.wait_with_output().unwrap();
    assert!(out.status.success(), "{series}: {}", stderr.join().unwrap());
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let p = guest.wait_panic(Duration::from_secs(120)).unwrap_or_else(|e| panic!("{series}: {e}"));
    assert_eq!(p.pid, crash.pid, "{series}");
    assert_eq!(r["message"], p.message.as_str(), "{series}: {r}");
    assert_eq!(r["pid"], p.pid as i64, "{series}: {r}");
    assert_eq!(r["comm"], p.comm.as_str(), "{series}: {r}");
    assert_eq!(r["cpu"], p.cpu as i64, "{series}: {r}");
    assert_eq!(r["verdict"], "kill", "{series}: {r}");
    let functions: Vec<&str> = r["backtrace"].as_array().unwrap().iter().filter_map(|f| f["function"].as_str()).collect();
    assert!(functions.contains(&"sysrq_handle_crash"), "{series}: {functions:?}");
    assert!(p.call_trace.iter().any(|f| f == "sysrq_handle_crash"), "{series}: {:?}", p.call_trace);
}


#[test]
fn v5_10_repairs() {
    repairs_on(Series::V5_10);
}

#[test]
fn v6_1_repairs() {
    repairs_on(Series::V6_1);
}

#[test]
fn v6_12_repairs() {
    repairs_on(Series::V6_12);
}

#[test]
fn v7_repairs() {
    repairs_on(Series::V7);
}

#[test]
fn v5_10_diagnosis() {
    diagnosis_is_the_guests(Series::V5_10);
}

#[test]
fn v6_1_diagnosis() {
    diagnosis_is_the_guests(Series::V6_1);
}

#[test]
fn v6_12_diagnosis() {
    diagnosis_is_the_guests(Series::V6_12);
}

#[test]
fn v7_diagnosis() {
    diagnosis_is_the_guests(Series::V7);
}
