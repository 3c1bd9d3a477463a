//! Checkpoint rollback with quarantine (`watch --checkpoint-every`), on
//! real guests: the LKDTM kernel with `oops=panic`, the watcher taking
//! checkpoints with QEMU's snapshot-save. Oracles: the guest's own console
//! (its panic report), its process table (`/proc`), the bystander's
//! records as the guest verifies them, and QEMU's run state through a
//! second QMP monitor.

mod support;

use harness::{Guest, GuestConfig, Kernel};
use loader::access::{GuestAccess, Gpa};
use repair_kernel::arch::x86_64::pgtable::Paging;
use repair_kernel::kmem::Kernel as KView;
use std::io::{Read, Seek, SeekFrom, Write};
use std::time::{Duration, Instant};
use support::*;

fn lkdtm() -> GuestConfig {
    let mut cfg = GuestConfig::new(Kernel::Lkdtm).append("oops=panic").with_ram_file().with_second_qmp();
    // Three guests and their snapshots on two loaded cores: boots slow.
    cfg.boot_timeout = Duration::from_secs(300);
    cfg
}

fn count(events: &std::path::Path, what: &str) -> usize {
    std::fs::read_to_string(events).unwrap_or_default().lines().filter(|l| l.contains(what)).count()
}


/// Waits for `n` events containing `what`; on a timeout, fails with the
/// events, the watcher's stderr and the guest's console tail.
fn wait_explained(guest: &Guest, events: &std::path::Path, what: &str, n: usize, timeout: Duration) -> String {
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(events).unwrap_or_default();
        if text.lines().filter(|l| l.contains(what)).count() >= n {
            return text;
        }
        if start.elapsed() > timeout {
            let err = std::fs::read_to_string(events.with_extension("stderr")).unwrap_or_default();
            panic!("no {n} x {what} within {timeout:?}\nevents:\n{text}\nwatcher stderr:\n{err}\nconsole:\n{}", guest.console_tail(40));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits for one more `checkpoint` event than there are now.
fn next_checkpoint(events: &std::path::Path, watcher: &mut std::process::Child) {
    let n = count(events, "\"checkpoint\"");
    wait_event(events, "\"checkpoint\"", n + 1, Duration::from_secs(120), Some(watcher));
}

/// Waits until a checkpoint begun after now has been taken: the second
/// event from now (the first may be of one already under way).
fn checkpoint_begun_after_now(events: &std::path::Path, watcher: &mut std::process::Child) {
    let n = count(events, "\"checkpoint\"");
    wait_event(events, "\"checkpoint\"", n + 2, Duration::from_secs(180), Some(watcher));
}

/// The process `pid` as the guest sees it: its `/proc/PID/stat` state
/// letter, or None when it is gone.
fn proc_state(guest: &mut Guest, pid: u32) -> Option<String> {
    let r = guest.run(&format!("cut -d' ' -f3 /proc/{pid}/stat 2>/dev/null"), Duration::from_secs(60)).unwrap();
    r.output.first().map(|s| s.trim().to_string()).filter(|s| !s.is_empty())
}

/// The bystander's pid: the guest's only awk (its ready line on the
/// console may be cut by kernel messages).
fn bystander_pid(guest: &mut Guest) -> u32 {
    let r = guest.run("pidof awk", Duration::from_secs(60)).unwrap();
    let pids: Vec<u32> = r.output.iter().flat_map(|l| l.split_whitespace()).map(|p| p.parse().unwrap()).collect();
    assert_eq!(pids.len(), 1, "one awk, the bystander: {r:?}");
    pids[0]
}

/// Where `task_struct.files` of process `pid` sits in guest-physical
/// memory, found through the gdbstub and the RAM file before the watcher
/// attaches (a process's task_struct does not move). Also the task's comm.
fn files_pointer_gpa(guest: &Guest, pid: u32) -> (Gpa, String) {
    let image = repair_guest::kit::kit_image(guest.kernel()).unwrap();
    let profile = symbols::Profile::from_json(&image.profile_json).unwrap();
    let off = profile.offset("task_struct", "files").expect("task_struct.files in the profile");
    let (mut g, session) = repair_guest::kit::attach(guest, image, loader::flow::FlowConfig::default()).unwrap();
    let regs = g.get_regs(loader::access::VcpuId(0)).unwrap();
    let layout = session.image.layout;
    let found = {
        let mut mem = loader::guestmem::GuestPhys::new(&mut g, session.ram_end);
        let k = KView::new(&mut mem, Paging::from_regs(regs.cr3, regs.cr4), &layout, session.slide.slide);
        let t = loader::quarantine::find_process(&k, pid as i32).unwrap().unwrap_or_else(|| panic!("no pid {pid}"));
        let info = repair_kernel::task::TaskInfo::read(&k, t).unwrap();
        let gpa = k.translate(t.0.add(off)).unwrap().gpa;
        (Gpa(gpa.0), info.comm_str().to_string())
    };
    g.resume().unwrap();
    found
}

/// Flips bit 62 of the pointer at `gpa` in the RAM file, from outside the
/// guest while it runs: a non-canonical `files` pointer, so the task's
/// next use of it is a general protection fault in the kernel.
fn flip_pointer(guest: &Guest, gpa: Gpa) {
    let mut f = std::fs::OpenOptions::new().read(true).write(true).open(guest.ram_file().unwrap()).unwrap();
    let mut b = [0u8; 8];
    f.seek(SeekFrom::Start(gpa.0)).unwrap();
    f.read_exact(&mut b).unwrap();
    let v = u64::from_le_bytes(b);
    assert_eq!(v >> 47, 0x1ffff, "task_struct.files at {gpa} is not a kernel pointer: {v:#x}");
    f.seek(SeekFrom::Start(gpa.0)).unwrap();
    f.write_all(&(v ^ (1 << 62)).to_le_bytes()).unwrap();
}

fn stop_watcher(mut watcher: std::process::Child) {
    kill(watcher.id(), libc::SIGTERM);
    assert!(wait_exit(&mut watcher, 120).success());
}

#[test]
fn exhaust_stack_is_recovered_by_rollback_and_quarantine_of_its_child() {
    let mut guest = Guest::boot(&lkdtm()).unwrap();
    let events = guest.dir().join("events.jsonl");
    let mut watcher = start_watch(&guest, &events, &["--checkpoint-every", "2"]);
    // The offender exists at the checkpoint, asleep; it crashes later, in
    // a double-fault (NMI) context the repair kernel declines.
    let r = guest
        .run("(sleep 20; echo EXHAUST_STACK > /sys/kernel/debug/provoke-crash/DIRECT) >/dev/null 2>&1 & echo $!", Duration::from_secs(60))
        .unwrap();
    let child: u32 = r.output[0].trim().parse().unwrap();
    checkpoint_begun_after_now(&events, &mut watcher);
    let text = wait_event(&events, "\"quarantined\"", 1, Duration::from_secs(180), Some(&mut watcher));
    let crash = &lines_of(&events, "\"rolled-back\"")[0];
    assert_eq!(crash["pid"], child, "{text}");
    assert!(crash["lost_ms"].as_f64().unwrap() > 0.0, "{text}");
    assert!(text.contains("Fatal exception in interrupt"), "{text}");
    let q = &lines_of(&events, "\"quarantined\"")[0];
    assert_eq!(q["pid"], child, "{text}");
    // The child dies at its wake-up, before it writes to LKDTM again.
    let start = Instant::now();
    while let Some(st) = proc_state(&mut guest, child) {
        if st == "Z" {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(120), "pid {child} still there ({st})");
        std::thread::sleep(Duration::from_millis(500));
    }
    // The rollback took the place of the decline; the crash did not recur.
    assert_eq!(count(&events, "\"declined\""), 0, "{}", std::fs::read_to_string(&events).unwrap());
    assert_eq!(count(&events, "\"rolled-back\""), 1);
    // The guest is alive: it answers, its bystander's records are whole
    // and growing, QEMU runs it.
    let n = guest.ping(Duration::from_secs(60)).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert!(guest.ping(Duration::from_secs(60)).unwrap() > n);
    let v = guest.verify_bystander().unwrap();
    assert!(v.ok, "{v:?}");
    assert_eq!(status(&mut qmp2(&guest)), "running");
    assert!(!guest.console().contains("end Kernel panic"), "{}", guest.console_tail(40));
    stop_watcher(watcher);
}

#[test]
fn a_transient_fault_is_rolled_back_with_no_process_lost_when_rollback_is_preferred() {
    let mut guest = Guest::boot(&lkdtm()).unwrap();
    let victim = bystander_pid(&mut guest);
    let (gpa, comm) = files_pointer_gpa(&guest, victim);
    assert_eq!(comm, "awk");
    let events = guest.dir().join("events.jsonl");
    let mut watcher = start_watch(&guest, &events, &["--checkpoint-every", "5", "--prefer", "rollback"]);
    next_checkpoint(&events, &mut watcher);
    // A bit flipped in a kernel pointer from outside: the innocent
    // bystander crashes the kernel on its next write. Killing it (the
    // repair kernel's verdict) would lose it; the checkpoint predates the
    // flip, so a rollback alone removes the fault.
    flip_pointer(&guest, gpa);
    let text = wait_event(&events, "\"rolled-back\"", 1, Duration::from_secs(120), Some(&mut watcher));
    let rb = &lines_of(&events, "\"rolled-back\"")[0];
    assert_eq!(rb["pid"], victim, "the crash was in the bystander: {text}");
    std::thread::sleep(Duration::from_secs(5));
    let text = std::fs::read_to_string(&events).unwrap();
    assert!(!text.contains("\"repaired\"") && !text.contains("\"declined\"") && !text.contains("\"quarantined\""), "{text}");
    assert_eq!(count(&events, "\"rolled-back\""), 1, "{text}");
    // No process lost: the bystander is the same process, still writing,
    // its records whole (the rolled-back ones rewritten, none corrupt).
    assert_eq!(proc_state(&mut guest, victim).as_deref().map(|s| s != "Z"), Some(true));
    let n = guest.ping(Duration::from_secs(60)).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert!(guest.ping(Duration::from_secs(60)).unwrap() > n);
    let v = guest.verify_bystander().unwrap();
    assert!(v.ok, "{v:?}");
    assert_eq!(status(&mut qmp2(&guest)), "running");
    assert!(!guest.console().contains("end Kernel panic"), "{}", guest.console_tail(40));
    stop_watcher(watcher);
}

#[test]
fn an_init_crash_in_the_checkpoint_is_declined_for_good_after_one_rollback() {
    let mut guest = Guest::boot(&lkdtm()).unwrap();
    let (gpa, comm) = files_pointer_gpa(&guest, 1);
    assert_eq!(comm, "init");
    let events = guest.dir().join("events.jsonl");
    let mut watcher = start_watch(&guest, &events, &["--checkpoint-every", "2"]);
    // The init waits for a child; its files pointer is corrupted while it
    // waits, and a checkpoint is taken of that state: when the child ends,
    // the init's next open() faults, after the rollback too.
    let from = guest.console_len();
    let id = guest.run_start("echo GUEST-KIT init-waits > /dev/kmsg; sleep 25").unwrap();
    // The init forked the child and waits for it (no use of its files
    // until the child ends): only then is its pointer flipped.
    guest.wait_for_console_from(from, "GUEST-KIT init-waits", Duration::from_secs(120)).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    flip_pointer(&guest, gpa);
    checkpoint_begun_after_now(&events, &mut watcher);
    let text = wait_explained(&guest, &events, "came back after a rollback", 1, Duration::from_secs(300));
    let rb = lines_of(&events, "\"rolled-back\"");
    assert_eq!(rb.len(), 1, "{text}");
    assert_eq!(rb[0]["pid"], 1, "{text}");
    assert!(text.contains("not quarantined") && text.contains("init"), "{text}");
    // The guest's own panic completes, as it would have without us.
    let p = guest.wait_panic(Duration::from_secs(120)).unwrap();
    assert_eq!(p.pid, 1, "{p:?}");
    // And no loop: no more rollbacks, the watcher is still there.
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(count(&events, "\"rolled-back\""), 1);
    assert!(watcher.try_wait().unwrap().is_none());
    let _ = id;
    stop_watcher(watcher);
}

#[test]
fn checkpoints_are_refused_on_a_writable_disk_that_cannot_be_snapshotted() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let mut cfg = lkdtm();
    cfg.qemu_args.extend([
        "-drive".to_string(),
        format!("if=none,id=d0,format=raw,file={}", disk.display()),
        "-device".to_string(),
        "virtio-blk-pci,drive=d0".to_string(),
    ]);
    let mut guest = Guest::boot(&cfg).unwrap();
    let image = image_file(guest.kernel(), guest.dir());
    let out = bin()
        .args(["watch", "--gdb", &guest.gdb_addr(), "--qmp", &guest.qmp_addr(), "--restarts", "0"])
        .arg("--ram-file")
        .arg(guest.ram_file().unwrap())
        .arg("--image")
        .arg(&image)
        .args(["--checkpoint-every", "2", "--events", "-"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("(raw, writable) cannot be snapshotted") && err.contains("qcow2"), "{err}");
    // Nothing left behind: the guest runs, untrapped.
    assert_eq!(status(&mut qmp2(&guest)), "running");
    let crash = guest.crash("sysrq-c").unwrap();
    let _ = crash;
    let p = guest.wait_panic(Duration::from_secs(120)).unwrap();
    assert_eq!(p.message, "sysrq triggered crash");
}
