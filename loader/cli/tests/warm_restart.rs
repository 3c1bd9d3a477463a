//! Warm restart of QEMU (`repair-guest restart-vmm`, QEMU 10's
//! cpr-transfer) under a watcher, on a real guest. Oracles: the guest's
//! own `/proc/uptime`, its bystander's records as the guest verifies them,
//! the exit status of a crashed process, QEMU's run state through a
//! second QMP monitor, and the processes on the host.

mod support;

use harness::{Guest, GuestConfig, Kernel};
use std::time::Duration;
use support::*;

fn uptime(guest: &mut Guest) -> f64 {
    let r = guest.run("cat /proc/uptime", Duration::from_secs(60)).unwrap();
    r.output[0].split_whitespace().next().unwrap().parse().unwrap()
}

#[test]
fn the_guest_moves_to_a_new_qemu_without_noticing_and_the_watcher_follows() {
    let mut cfg = GuestConfig::new(Kernel::Lkdtm)
        .with_qemu10()
        .expect("the kit's QEMU 10: run scripts/guest-kit (scripts/kit-qemu10)")
        .with_ram_file()
        .with_second_qmp();
    cfg.qemu_args.extend(["-machine".to_string(), "aux-ram-share=on".to_string()]);
    cfg.boot_timeout = Duration::from_secs(300);
    let mut guest = Guest::boot(&cfg).unwrap();
    let events = guest.dir().join("events.jsonl");
    let mut watcher = start_watch(&guest, &events, &[]);
    let up_before = uptime(&mut guest);
    let records_before = guest.ping(Duration::from_secs(60)).unwrap();
    let old_pid = guest.qemu_pid();

    let out = bin()
        .args(["restart-vmm", "--qmp", &guest.qmp2_addr().unwrap()])
        .arg("--dir")
        .arg(guest.dir().join("cpr"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "restart-vmm failed: {}\n{stdout}", String::from_utf8_lossy(&out.stderr));
    let line: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(line["event"], "restarted", "{line}");
    let new_pid = line["new_pid"].as_u64().unwrap() as u32;
    assert_ne!(new_pid, old_pid);
    eprintln!("warm restart: downtime {} ms (QEMU's own figure {} ms)", line["downtime_ms"], line["qemu_downtime_ms"]);
    guest.follow_restart(new_pid).unwrap();
    // The old QEMU is gone; the new one runs the guest.
    assert!(!std::path::Path::new(&format!("/proc/{old_pid}/cmdline")).exists() || std::fs::read(format!("/proc/{old_pid}/cmdline")).unwrap().is_empty());
    assert_eq!(status(&mut qmp2(&guest)), "running");

    // The watcher followed it and armed its trap there.
    wait_event(&events, "\"attached\"", 2, Duration::from_secs(180), Some(&mut watcher));
    // Not a reboot: the guest's clock went on, its bystander wrote through
    // the restart with no gap and no bad record.
    let up_after = uptime(&mut guest);
    assert!(up_after > up_before, "uptime {up_before} -> {up_after}");
    std::thread::sleep(Duration::from_secs(2));
    let v = guest.verify_bystander().unwrap();
    assert!(v.ok, "{v:?}");
    assert!(v.records > records_before, "{v:?} after {records_before}");
    assert!(!guest.console().contains("GUEST-KIT READY kernel=6.1.192 bystander=") || guest.console().matches("GUEST-KIT READY").count() == 1);

    // A crash after the restart is repaired by the watcher, in the new QEMU.
    let crash = guest.crash("sysrq-c").unwrap();
    assert_eq!(guest.wait_crash_exit(&crash, Duration::from_secs(120)).unwrap(), 137);
    let text = wait_event(&events, "\"repaired\"", 1, Duration::from_secs(60), Some(&mut watcher));
    assert!(text.contains("following the guest"), "{text}");
    assert_eq!(status(&mut qmp2(&guest)), "running");
    assert!(guest.verify_bystander().unwrap().ok);
    kill(watcher.id(), libc::SIGTERM);
    assert!(wait_exit(&mut watcher, 60).success());
}
