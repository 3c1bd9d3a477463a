//! `repair-guest watch --qmp ADDR` alone, on a QEMU started with neither
//! `-gdb` nor a RAM file: the watcher opens QEMU's gdbstub through QMP on a
//! private socket, reads guest RAM in QEMU's process (`/proc/PID/mem`),
//! repairs crashes, and leaves no gdbstub behind, however it ends:
//! - SIGTERM: the worker closes it;
//! - the worker killed (SIGKILL) and restarted: the new worker takes over
//!   the one its predecessor left;
//! - the worker killed with `--restarts 0`: the supervisor removes the trap
//!   and closes it;
//! - worker and supervisor killed together (SIGKILL): it stays open, with
//!   the trap; the next `repair-guest watch --qmp` takes it over (clearing
//!   the stale trap) and closes it when it goes.
//!
//! Oracle: a second QMP monitor the watcher does not use (`info chardev`
//! lists QEMU's gdbstub as the chardev `gdb`).
//!
//! `read_speed_of_each_memory_path` (ignored; `bench/ram-read`) measures
//! reading 64 MiB of guest RAM through the gdbstub, `/proc/PID/mem`, the
//! RAM file and QEMU's RAM file reopened through `/proc/PID/fd`.

mod support;

use harness::{Guest, GuestConfig, Kernel};
use std::process::Child;
use std::time::{Duration, Instant};
use support::*;

fn qmp_only(cfg: GuestConfig) -> GuestConfig {
    cfg.without_gdb().with_second_qmp()
}

/// Starts `watch --qmp` alone and waits for its `n`th `attached` event.
fn start(guest: &Guest, image: &std::path::Path, events: &std::path::Path, extra: &[&str]) -> Child {
    let n = std::fs::read_to_string(events).unwrap_or_default().lines().filter(|l| l.contains("\"attached\"")).count();
    let stderr = std::fs::OpenOptions::new().create(true).append(true).open(events.with_extension("stderr")).unwrap();
    let mut w = bin()
        .args(["watch", "--qmp", &guest.qmp_addr()])
        .arg("--image")
        .arg(image)
        .arg("--events")
        .arg(events)
        .args(extra)
        .stderr(stderr)
        .spawn()
        .unwrap();
    wait_event(events, "\"attached\"", n + 1, Duration::from_secs(90), Some(&mut w));
    w
}

/// QEMU's gdbstub as the oracle monitor sees it: the `gdb` chardev's line.
fn gdbstub(q: &mut loader::qmp::Qmp) -> Option<String> {
    q.hmp("info chardev").unwrap().lines().find(|l| l.starts_with("gdb:")).map(str::to_string)
}

fn assert_no_gdbstub(q: &mut loader::qmp::Qmp, when: &str) {
    assert_eq!(gdbstub(q), None, "QEMU still has a gdbstub open {when}");
}

fn socket_of(line: &str) -> std::path::PathBuf {
    let f = line.split("unix:").nth(1).expect("a unix socket");
    f.split(',').next().unwrap().into()
}

fn crash_is_repaired(guest: &mut Guest) {
    let crash = guest.crash("sysrq-c").unwrap();
    assert_eq!(guest.wait_crash_exit(&crash, Duration::from_secs(120)).unwrap(), 137);
}

fn qmp_alone_repairs_and_leaves_no_gdbstub(cfg: GuestConfig) {
    let mut guest = Guest::boot(&qmp_only(cfg)).unwrap();
    let image = image_file(guest.kernel(), guest.dir());
    let events = guest.dir().join("events.jsonl");
    let mut q = qmp2(&guest);
    assert_no_gdbstub(&mut q, "before any watcher");

    // 1. --restarts 0, a crash repaired, the worker killed: the supervisor
    //    removes the trap and closes the gdbstub.
    let mut w = start(&guest, &image, &events, &["--restarts", "0"]);
    let err = std::fs::read_to_string(events.with_extension("stderr")).unwrap();
    assert!(err.contains("guest memory through /proc/"), "not read in QEMU's process: {err}");
    let line = gdbstub(&mut q).expect("the watcher opened a gdbstub");
    assert!(line.contains("repair-guest-gdbstub-"), "{line}");
    crash_is_repaired(&mut guest);
    kill(worker_of(&w), libc::SIGKILL);
    let st = wait_exit(&mut w, 60);
    assert!(!st.success());
    let text = std::fs::read_to_string(&events).unwrap();
    assert!(text.contains("the gdbstub the watcher opened"), "{text}");
    assert_no_gdbstub(&mut q, "after the supervisor gave up");
    assert!(!socket_of(&line).exists());
    assert_eq!(status(&mut q), "running");

    // 2. Worker and supervisor killed together: the gdbstub (and the trap)
    //    stay; written down here, taken over by the next watcher below.
    let mut w = start(&guest, &image, &events, &[]);
    let worker = worker_of(&w);
    kill(w.id(), libc::SIGSTOP);
    kill(worker, libc::SIGKILL);
    kill(w.id(), libc::SIGKILL);
    let _ = w.wait();
    let left = gdbstub(&mut q).expect("a watcher killed with its supervisor leaves its gdbstub");

    // 3. The next watcher takes it over; a killed worker is restarted and
    //    the new one takes it over again; SIGTERM closes it.
    let mut w = start(&guest, &image, &events, &[]);
    assert_eq!(socket_of(&gdbstub(&mut q).unwrap()), socket_of(&left), "the leftover gdbstub was not reused");
    crash_is_repaired(&mut guest);
    let n = std::fs::read_to_string(&events).unwrap().lines().filter(|l| l.contains("\"attached\"")).count();
    kill(worker_of(&w), libc::SIGKILL);
    wait_event(&events, "restarting it", 1, Duration::from_secs(30), Some(&mut w));
    wait_event(&events, "\"attached\"", n + 1, Duration::from_secs(90), Some(&mut w));
    crash_is_repaired(&mut guest);
    kill(w.id(), libc::SIGTERM);
    assert!(wait_exit(&mut w, 60).success());
    assert_no_gdbstub(&mut q, "after SIGTERM");
    assert!(!socket_of(&left).exists());
    assert_eq!(status(&mut q), "running");
    assert!(guest.verify_bystander().unwrap().ok);
}

#[test]
fn qmp_alone_on_qemu_7_2() {
    qmp_alone_repairs_and_leaves_no_gdbstub(GuestConfig::new(Kernel::Debian));
}

#[test]
fn qmp_alone_on_qemu_10() {
    qmp_alone_repairs_and_leaves_no_gdbstub(GuestConfig::new(Kernel::Debian).with_qemu10().unwrap());
}

#[test]
fn neither_gdb_nor_qmp_is_bad_input_naming_both() {
    let out = bin().args(["watch", "--image", "/nonexistent.img"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--gdb") && err.contains("--qmp"), "{err}");
    let spec = loader::attach::QemuGuest { gdb: None, qmp: None, ram_file: None };
    let e = spec.connect().unwrap_err().to_string();
    assert!(e.contains("--gdb") && e.contains("--qmp"), "{e}");
}

/// Reads `len` bytes from `gpa` on in 1 MiB requests; MiB/s and the bytes.
fn timed(mut read: impl FnMut(u64, &mut [u8]), gpa: u64, len: usize) -> (f64, Vec<u8>) {
    let mut out = vec![0u8; len];
    let t = Instant::now();
    for (i, chunk) in out.chunks_mut(1 << 20).enumerate() {
        read(gpa + (i << 20) as u64, chunk);
    }
    ((len >> 20) as f64 / t.elapsed().as_secs_f64(), out)
}

/// The read speed of each memory path, in the same run, on the same
/// stopped guest (the bytes must agree): `bench/ram-read`.
fn read_speed(cfg: GuestConfig, label: &str) {
    use loader::access::{GuestAccess, Gpa, PhysAccess};
    use loader::backend::procmem;
    let len: usize = std::env::var("BENCH_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(64) << 20;
    let gpa = 0x100_0000u64; // 16 MiB on: plain RAM, the kernel's
    let guest = Guest::boot(&cfg.with_ram_file()).unwrap();
    let file = guest.ram_file().unwrap();
    let mut q = loader::qmp::Qmp::connect(&guest.qmp_addr().parse().unwrap()).unwrap();
    let pid = q.peer_pid().unwrap();
    // The gdbstub stops the VM: every path then reads the same bytes.
    let mut gdb = loader::gdb::GdbGuest::connect(guest.gdb_addr().parse().unwrap()).unwrap();
    gdb.resume_on_drop = true;
    let size = q.ram_size().unwrap();
    let maps = procmem::parse_maps(&std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap());
    let host = maps.iter().find(|m| std::path::Path::new(&m.path) == file).expect("the RAM file's mapping").start;
    let mut mem = procmem::ProcMem::open(pid, host, procmem::pc_regions(size)).unwrap();
    let mut ram = loader::ram::RamFile::open_pc_file(&file).unwrap();
    let mut via_fd = procmem::open_qemu_ram(&mut q).unwrap();
    assert!(matches!(via_fd, procmem::QemuRam::Shared(_)), "{}", via_fd.describe());

    let (s_gdb, b_gdb) = timed(|a, b| gdb.read_phys(Gpa(a), b).unwrap(), gpa, len);
    let (s_mem, b_mem) = timed(|a, b| mem.read_phys(Gpa(a), b).unwrap(), gpa, len);
    let (s_ram, b_ram) = timed(|a, b| ram.read_phys(Gpa(a), b).unwrap(), gpa, len);
    let (s_fd, b_fd) = timed(|a, b| via_fd.read_phys(Gpa(a), b).unwrap(), gpa, len);
    // Small reads, as the flow's page walks make them (8 bytes each).
    let small = |r: &mut dyn FnMut(u64, &mut [u8])| {
        let t = Instant::now();
        let mut b = [0u8; 8];
        for i in 0..20_000u64 {
            r(gpa + i * 4096 % (len as u64), &mut b);
        }
        t.elapsed().as_secs_f64() * 1e6 / 20_000.0
    };
    let u_gdb = small(&mut |a, b| gdb.read_phys(Gpa(a), b).unwrap());
    let u_mem = small(&mut |a, b| mem.read_phys(Gpa(a), b).unwrap());
    let u_ram = small(&mut |a, b| ram.read_phys(Gpa(a), b).unwrap());
    assert!(b_gdb == b_mem && b_mem == b_ram && b_ram == b_fd, "the paths read different bytes");
    assert!(b_ram.iter().any(|&b| b != 0), "read only zeros");
    println!("\nguest RAM read speed, QEMU {label} (TCG), {} MiB from GPA {gpa:#x}, guest stopped:", len >> 20);
    println!("| path | MiB/s | 64 MiB takes | 8-byte read |");
    println!("|---|---:|---:|---:|");
    for (name, s, u) in [
        ("gdbstub `m` packets", s_gdb, Some(u_gdb)),
        ("/proc/PID/mem (pread)", s_mem, Some(u_mem)),
        ("RAM file (mmap)", s_ram, Some(u_ram)),
        ("RAM file via /proc/PID/fd (mmap)", s_fd, None),
    ] {
        let us = u.map_or("-".to_string(), |u| format!("{u:.2} us"));
        println!("| {name} | {s:.0} | {:.3} s | {us} |", 64.0 / s);
    }
    println!("/proc/PID/mem is {:.0}x the gdbstub", s_mem / s_gdb);
    drop(gdb);
}

#[test]
#[ignore = "a benchmark: bench/ram-read"]
fn read_speed_of_each_memory_path() {
    read_speed(GuestConfig::new(Kernel::Debian), "7.2");
    read_speed(GuestConfig::new(Kernel::Debian).with_qemu10().unwrap(), "10.0");
}
