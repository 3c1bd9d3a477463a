//! Crashes from a worker thread of a user process (`PF_USER_WORKER`,
//! `PF_IO_WORKER`: io_uring's `iou-wrk-*`), on Debian's stock cloud kernels
//! of the matrix (`CONFIG_IO_URING=y`): 6.12 and 7.x, whose workers are
//! `PF_IO_WORKER | PF_USER_WORKER`, and 5.10 and 6.1, whose workers are
//! `PF_IO_WORKER` only (Debian's 5.10 has 5.15's io_uring, io threads
//! included: the vmlinux's `kernel_clone_args.io_thread` says so, its
//! version number would not). The guest runs
//! `guest/uring-crash.c`, built static here, which submits one
//! `IORING_OP_WRITE` with `IOSQE_ASYNC` so that an io-wq worker performs it.
//!
//! The verdict declines such a crash (repair-kernel/src/verdict.rs,
//! `user_worker`): the kernel's own oops path skips the worker's exit
//! bookkeeping and its owner can then never finish exiting. The second test
//! shows that premise on the guest itself, without our tool: with
//! `panic_on_oops=0`, the kernel kills an oopsing worker, and its owner,
//! killed in turn, stays in the process table.

mod support;

use harness::{Guest, GuestConfig, Kernel, Kit, Series};
use loader::access::{GuestAccess, Gva, VcpuId};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use support::{start_watch, wait_event};

const KERNEL: Kernel = Kernel::Matrix(Series::V6_12);
const LONG: Duration = Duration::from_secs(240);

/// `guest/uring-crash.c`, compiled static into `dir`.
fn uring_crash(dir: &Path) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../guest/uring-crash.c");
    let out = dir.join("uring-crash");
    let st = std::process::Command::new("gcc")
        .args(["-static", "-O2", "-o"])
        .arg(&out)
        .arg(&src)
        .status()
        .unwrap_or_else(|e| panic!("gcc: {e}: run scripts/guest-kit (it installs build-essential)"));
    assert!(st.success(), "gcc -static {} failed: run scripts/guest-kit (it installs build-essential)", src.display());
    out
}

fn boot(kernel: Kernel, dir: &Path, oops_panic: bool) -> Guest {
    // no_timer_check: on a loaded host TCG may miss the early-boot check
    // of the IO-APIC timer, and the kernel panics before init ("IO-APIC +
    // timer doesn't work!", seen once here under two CPU hogs).
    let mut cfg = GuestConfig::new(kernel)
        .with_ram_file()
        .with_file(uring_crash(dir), "/bin/uring-crash")
        .append("no_timer_check");
    if oops_panic {
        cfg = cfg.append("oops=panic");
    }
    cfg.boot_timeout = Duration::from_secs(300); // a loaded host
    Guest::boot(&cfg).unwrap_or_else(|e| panic!("{e}"))
}

fn count(events: &Path, what: &str) -> usize {
    std::fs::read_to_string(events).unwrap_or_default().lines().filter(|l| l.contains(what)).count()
}

/// With checkpoints (`watch --checkpoint-every`), the declined crash of a
/// worker is rolled back and its *process* is quarantined: the owner exists
/// at the checkpoint (it sleeps before it submits), dies there of the
/// pending SIGKILL before its request exists, and the crash never comes
/// back. Judged by the guest's process table, its bystander, QEMU's run
/// state through a second QMP, and the absence of a panic on its console.
#[test]
fn with_checkpoints_a_worker_crash_is_rolled_back_and_its_process_quarantined() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = GuestConfig::new(KERNEL)
        .with_ram_file()
        .with_second_qmp()
        .with_file(uring_crash(tmp.path()), "/bin/uring-crash")
        .append("no_timer_check");
    cfg.boot_timeout = Duration::from_secs(300);
    let mut guest = Guest::boot(&cfg).unwrap_or_else(|e| panic!("{e}"));
    let ev = guest.dir().join("events.jsonl");
    let mut watcher = start_watch(&guest, &ev, &["--checkpoint-every", "2"]);
    let owner = start_uring_crash(&mut guest, "/proc/sysrq-trigger", "c 20");
    // A checkpoint begun after the owner started holds it asleep.
    let n = count(&ev, "\"checkpoint\"");
    wait_event(&ev, "\"checkpoint\"", n + 2, Duration::from_secs(180), Some(&mut watcher));
    let text = wait_event(&ev, "\"quarantined\"", 1, LONG, Some(&mut watcher));
    let all = events(&ev);
    let rb = all.iter().find(|e| e["event"] == "rolled-back").unwrap_or_else(|| panic!("{text}"));
    assert_eq!(rb["comm"], format!("iou-wrk-{owner}"), "{text}");
    assert!(rb["reason"].as_str().unwrap().contains("io_uring thread (PF_IO_WORKER)"), "{text}");
    let q = all.iter().find(|e| e["event"] == "quarantined").unwrap();
    assert_eq!(q["pid"], owner, "the owner, not its worker, is quarantined: {text}");
    // The owner dies at its wake-up, before it submits again.
    let start = Instant::now();
    loop {
        let r = guest.run(&format!("cut -d' ' -f3 /proc/{owner}/stat 2>/dev/null"), LONG).unwrap();
        match r.output.first().map(|s| s.trim().to_string()).filter(|s| !s.is_empty()) {
            None => break,
            Some(st) if st == "Z" => break,
            Some(st) => assert!(start.elapsed() < Duration::from_secs(120), "owner {owner} still there ({st})"),
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    std::thread::sleep(Duration::from_secs(25)); // past the owner's delay
    let all = events(&ev);
    assert_eq!(all.iter().filter(|e| e["event"] == "rolled-back").count(), 1, "{all:#?}");
    assert!(!all.iter().any(|e| e["event"] == "declined" || e["event"] == "error"), "{all:#?}");
    assert!(guest.verify_bystander().unwrap().ok);
    assert_eq!(guest.run("echo a new process", LONG).unwrap().status, 0);
    assert_eq!(support::status(&mut support::qmp2(&guest)), "running");
    assert!(!guest.console().contains("end Kernel panic"), "{}", guest.console_tail(40));
    support::kill(watcher.id(), libc::SIGINT);
    assert!(support::wait_exit(&mut watcher, 60).success());
}

fn events(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .collect()
}

/// Starts `uring-crash PATH DATA` in the background; its pid.
fn start_uring_crash(guest: &mut Guest, path: &str, data: &str) -> i64 {
    let r = guest.run(&format!("uring-crash {path} {data} >/dev/console 2>&1 & echo $!"), LONG).unwrap();
    r.output.last().and_then(|l| l.trim().parse().ok()).unwrap_or_else(|| panic!("{r:?}"))
}

/// sysrq-c written by an io_uring worker, with the watcher attached: the
/// verdict declines, naming the worker and its process, and the panic goes
/// on exactly as it would have; the guest's own report names the same
/// task, an `iou-wrk-<owner>` thread of the owner's thread group.
fn declined_on(series: Series) {
    let tmp = tempfile::tempdir().unwrap();
    let mut guest = boot(Kernel::Matrix(series), tmp.path(), false);
    let ev = guest.dir().join("events.jsonl");
    let mut watcher = start_watch(&guest, &ev, &[]);
    let from = guest.console_len();
    let owner = start_uring_crash(&mut guest, "/proc/sysrq-trigger", "c");
    wait_event(&ev, "\"declined\"", 1, LONG, Some(&mut watcher));
    let e = events(&ev).into_iter().find(|e| e["event"] == "declined").unwrap();
    let p = guest.wait_panic(LONG).unwrap_or_else(|err| panic!("{series}: {err}\n{e}\n{}", guest.console_tail(40)));
    let console = guest.console().get(from..).unwrap_or_default().to_string();
    assert!(console.contains(&format!("uring-crash pid {owner}")), "{series}: {console}");
    // The guest's own report: the write ran in the owner's io-wq worker.
    assert_eq!(p.message, "sysrq triggered crash", "{series}: {console}");
    assert_eq!(p.comm, format!("iou-wrk-{owner}"), "{series}: {console}");
    assert!(p.call_trace.iter().any(|f| f == "sysrq_handle_crash"), "{series}: {:?}", p.call_trace);
    assert!(p.call_trace.iter().any(|f| f.starts_with("io_wq_") || f.starts_with("io_worker")), "{series}: {:?}", p.call_trace);
    // Our event is that report, and says why it let it go on.
    assert_eq!((e["pid"].as_i64(), e["comm"].as_str()), (Some(p.pid as i64), Some(p.comm.as_str())), "{series}: {e}\n{console}");
    assert_eq!(e["action"], "decline", "{series}: {e}");
    let why = e["reason"].as_str().unwrap();
    assert!(
        why.starts_with(&format!("{} (pid {}) is an io_uring thread (PF_IO_WORKER) of process {owner}", p.comm, p.pid)),
        "{series}: {why}"
    );
    assert!(why.contains("io_worker_exit") && why.ends_with("letting the panic complete"), "{series}: {why}");
    assert!(!events(&ev).iter().any(|e| e["event"] == "repaired" || e["event"] == "error"), "{:#?}", events(&ev));
    support::kill(watcher.id(), libc::SIGINT);
    let _ = support::wait_exit(&mut watcher, 60);
}

#[test]
fn a_crash_in_an_io_uring_worker_is_declined_and_the_panic_completes_5_10() {
    declined_on(Series::V5_10);
}

#[test]
fn a_crash_in_an_io_uring_worker_is_declined_and_the_panic_completes_6_1() {
    declined_on(Series::V6_1);
}

#[test]
fn a_crash_in_an_io_uring_worker_is_declined_and_the_panic_completes_6_12() {
    declined_on(Series::V6_12);
}

#[test]
fn a_crash_in_an_io_uring_worker_is_declined_and_the_panic_completes_7() {
    declined_on(Series::V7);
}

/// The kernel's own behaviour that the decline rests on, seen in the guest
/// with no watcher: an oops (`ud2`, what `BUG()` is, put over
/// `sysrq_handle_loglevel` through the gdbstub as the matrix test does) in
/// an io_uring worker, `panic_on_oops=0`. The kernel kills the worker
/// (`make_task_dead`), the guest lives on, but the owner, killed with
/// SIGKILL, never finishes its exit: it stays in the process table, not a
/// zombie, holding everything it had.
#[test]
fn without_us_an_oops_in_an_io_uring_worker_leaves_its_owner_unable_to_exit() {
    let tmp = tempfile::tempdir().unwrap();
    let mut guest = boot(KERNEL, tmp.path(), false);
    inject_ud2(&guest, "sysrq_handle_loglevel");
    let from = guest.console_len();
    let owner = start_uring_crash(&mut guest, "/proc/sysrq-trigger", "9");
    guest.wait_for_console_from(from, "---[ end trace", LONG).unwrap_or_else(|e| panic!("{e}\n{}", guest.console_tail(60)));
    let console = guest.console().get(from..).unwrap_or_default().to_string();
    assert!(console.contains("invalid opcode"), "{console}");
    let (_, _, comm) = harness::last_cpu_line(&console).unwrap_or_else(|| panic!("no CPU line:\n{console}"));
    assert_eq!(comm, format!("iou-wrk-{owner}"), "{console}");
    assert!(!console.contains("Kernel panic"), "{console}");
    // The guest lives on; the owner is killed and should go.
    assert_eq!(guest.run("echo a new process", LONG).unwrap().status, 0);
    assert_eq!(guest.run(&format!("kill -9 {owner}"), LONG).unwrap().status, 0);
    let start = Instant::now();
    let mut last = String::new();
    while start.elapsed() < Duration::from_secs(60) {
        let r = guest.run(&format!("grep State /proc/{owner}/status 2>&1 || echo gone"), LONG).unwrap();
        last = r.output.join(" ");
        assert!(!last.contains("gone") && !last.contains("zombie"), "the owner exited after all ({last}): the kernel now cleans up an oopsed io_uring worker, so the verdict's user_worker decline should be revisited");
        std::thread::sleep(Duration::from_secs(5));
    }
    // Stuck in its exit, uninterruptibly, on the io-wq the dead worker
    // never left (io_wq_put_and_exit waits for its workers' references).
    let r = guest.run(&format!("cat /proc/{owner}/stack"), LONG).unwrap();
    eprintln!("owner {owner} after 60 s: {last}; {:?}", r.output);
    assert!(last.contains("D (disk sleep)"), "{last}");
    assert!(r.output.iter().any(|l| l.contains("do_exit")) && r.output.iter().any(|l| l.contains("io_wq_put_and_exit") || l.contains("io_uring_cancel_generic")), "{:?}", r.output);
    assert!(guest.verify_bystander().unwrap().ok);
}

/// Puts `ud2` over the first bytes of `function` through the gdbstub.
fn inject_ud2(guest: &Guest, function: &str) {
    let map = std::fs::read_to_string(Kit::locate().unwrap().system_map(KERNEL).unwrap()).unwrap();
    let link = map
        .lines()
        .find_map(|l| {
            let mut it = l.split_whitespace();
            let (a, _, n) = (it.next()?, it.next()?, it.next()?);
            (n == function).then(|| u64::from_str_radix(a, 16).ok()).flatten()
        })
        .unwrap_or_else(|| panic!("{function} is not in the System.map"));
    let image = repair_guest::kit::kit_image(KERNEL).unwrap();
    let (mut g, session) = repair_guest::kit::attach(guest, image, loader::flow::FlowConfig::default()).unwrap();
    let at = Gva(link.wrapping_add(session.slide.slide));
    g.write_virt(VcpuId(0), at, &[0x0f, 0x0b]).unwrap();
    let mut back = [0u8; 2];
    g.read_virt(VcpuId(0), at, &mut back).unwrap();
    assert_eq!(back, [0x0f, 0x0b]);
    drop(g);
}

/// The same on Debian's PREEMPT_RT kernel, whose workers are the same
/// threads: the user-worker decline comes before any RT note.
#[test]
fn a_crash_in_an_io_uring_worker_is_declined_and_the_panic_completes_6_12_rt() {
    declined_on(Series::V6_12Rt);
}
