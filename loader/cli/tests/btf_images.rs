//! Repairs with images made without DWARF, on real guests: one built from
//! the kit kernel's vmlinuz (`build-repair-image --kernel`), and one built
//! by `watch --image auto` from the running guest's own memory. Each kills
//! the crashing child (sysrq-c), and the crash's backtrace, named from the
//! guest's kallsyms, is the guest's own Call Trace, function+offset/size,
//! as the same crash prints it when no one repairs it (a read-only
//! `diagnose --image auto` of that crash gives the same frames).

mod support;

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::Duration;

use harness::{Guest, GuestConfig, Kernel, Series};
use support::{bin, wait_event, wait_exit};

fn kit_vmlinuz(kernel: Kernel) -> std::path::PathBuf {
    let kit = harness::Kit::locate().unwrap_or_else(|e| panic!("{e}"));
    kit.kernel(kernel).unwrap_or_else(|e| panic!("{e} (scripts/guest-kit builds the kit)")).0
}

/// `watch` with `image` (a path or `auto`), the image cache in `cache`.
fn watch(guest: &Guest, image: &str, events: &Path, cache: &Path) -> Child {
    let mut w = bin()
        .args(["watch", "--gdb", &guest.gdb_addr(), "--qmp", &guest.qmp_addr()])
        .arg("--ram-file")
        .arg(guest.ram_file().unwrap())
        .args(["--image", image, "--max-repairs", "1", "--events"])
        .arg(events)
        .env("XDG_CACHE_HOME", cache)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(events.with_extension("stderr")).unwrap())
        .spawn()
        .unwrap();
    wait_event(events, "\"attached\"", 1, Duration::from_secs(180), Some(&mut w));
    w
}

/// One sysrq-c crash of a child, repaired under `watcher`: the child is
/// killed (status 137), and the `repaired` event's backtrace comes back.
fn crash_and_repair(guest: &mut Guest, mut watcher: Child, events: &Path) -> Vec<String> {
    let c = guest.crash("sysrq-c").unwrap();
    assert_eq!(guest.wait_crash_exit(&c, Duration::from_secs(120)).unwrap(), 137, "{}", guest.console_tail(30));
    let text = wait_event(events, "\"repaired\"", 1, Duration::from_secs(60), Some(&mut watcher));
    assert!(wait_exit(&mut watcher, 60).success(), "{}", std::fs::read_to_string(events.with_extension("stderr")).unwrap_or_default());
    let e: serde_json::Value = text.lines().map(|l| serde_json::from_str(l).unwrap()).find(|e: &serde_json::Value| e["event"] == "repaired").unwrap();
    assert_eq!(e["pid"], c.pid as i64, "{e}");
    assert_eq!(e["action"], "kill", "{e}");
    assert_eq!(e["message"], "sysrq triggered crash", "{e}");
    e["backtrace"].as_array().unwrap_or_else(|| panic!("no backtrace: {e}")).iter().map(|f| f.as_str().unwrap().to_owned()).collect()
}

/// The guest's own `Call Trace:` frames (`function+0xoff/0xsize`), the
/// unreliable `?` ones left out, from the console text after `from`.
fn guest_call_trace(console: &str) -> Vec<String> {
    let lines: Vec<&str> = console.lines().collect();
    let start = lines.iter().rposition(|l| l.trim_end().ends_with("Call Trace:")).expect("a Call Trace on the console");
    let mut out = Vec::new();
    for l in &lines[start + 1..] {
        let t = l.split_once(']').map_or(*l, |(_, r)| r).trim();
        if t.starts_with('<') && !t.starts_with("</") {
            continue;
        }
        if t.starts_with("</TASK>") || t.is_empty() || t.contains(':') {
            break;
        }
        if !t.starts_with('?') {
            out.push(t.split_whitespace().next().unwrap().to_owned());
        }
    }
    out
}

/// From `panic`'s caller on: ours starts at panic's entry (the trap), the
/// guest's inside it (dump_stack_lvl, panic+...).
fn after_panic(frames: &[String]) -> Vec<String> {
    frames.iter().skip_while(|f| !f.starts_with("panic+")).skip(1).cloned().collect()
}

fn repairs_with_btf_images(kernel: Kernel) {
    let mut guest = Guest::boot(&GuestConfig::new(kernel).with_ram_file()).unwrap();
    let dir = guest.dir().to_owned();
    let cache = dir.join("cache");

    // 1. An image from the vmlinuz alone.
    let image = builder::build_from_vmlinuz(&kit_vmlinuz(kernel), &builder::BuildOptions::default()).unwrap_or_else(|e| panic!("{e}"));
    let img = dir.join("vmlinuz.img");
    image.write(&img).unwrap();
    let ev1 = dir.join("vmlinuz-events.jsonl");
    let w = watch(&guest, img.to_str().unwrap(), &ev1, &cache);
    let bt_file = crash_and_repair(&mut guest, w, &ev1);

    // 2. --image auto: built from the guest's memory, then cached.
    let ev2 = dir.join("auto-events.jsonl");
    let w = watch(&guest, "auto", &ev2, &cache);
    let bt_auto = crash_and_repair(&mut guest, w, &ev2);
    let err = std::fs::read_to_string(ev2.with_extension("stderr")).unwrap();
    assert!(err.contains("built from the guest's BTF and kallsyms"), "{err}");
    let cached = cache.join("crash-repair/images").join(format!("{}.img", builder::image::hex(&image.kernel.build_id)));
    let auto = builder::RepairImage::read(&cached).unwrap_or_else(|e| panic!("{}: {e}", cached.display()));
    assert_eq!(auto.kernel, image.kernel, "the image built from memory is for the same build");
    assert_eq!(auto.layout, image.layout, "and has the same layout, item by item");
    // The profile read from guest memory equals the DWARF one of the same
    // build: every item of the repair kernel, every member of every type.
    let kit = harness::Kit::locate().unwrap();
    let dwarf = builder::profile_from_vmlinux(&kit.vmlinux(kernel).unwrap()).unwrap_or_else(|e| panic!("{e}"));
    let live = symbols::Profile::from_json(&auto.profile_json).unwrap();
    // The whole DWARF image: the profile's items, and those the builder
    // reads from the vmlinux's code (TIF_SIGPENDING) and call frames.
    let dwarf_layout = builder::build_from_vmlinux(&kit.vmlinux(kernel).unwrap(), &Default::default())
        .unwrap_or_else(|e| panic!("{e}"))
        .layout;
    for (i, spec) in repair_kernel::layout::ITEMS.iter().enumerate() {
        use repair_kernel::layout::Kind;
        if matches!(spec.kind, Kind::UnitRange | Kind::CallFrame) {
            // Compile units (the slab allocator's code ranges) and
            // call-frame rules (.debug_frame) are DWARF's alone: absent
            // from a BTF image, whose verdicts say so.
            assert_eq!(auto.layout.values[i], u64::MAX, "{spec:?} in an image from guest memory");
            continue;
        }
        assert_eq!(auto.layout.values[i], dwarf_layout.values[i], "{spec:?}: from guest memory vs DWARF");
    }
    assert_eq!(live.types, dwarf.types, "types from the guest's BTF vs DWARF");
    assert_eq!(live.percpu, dwarf.percpu);
    assert_eq!((live.build_id.as_str(), live.banner.as_str()), (dwarf.build_id.as_str(), dwarf.banner.as_str()));
    // A second attach takes it from the cache.
    let ev3 = dir.join("auto2-events.jsonl");
    let mut w = watch(&guest, "auto", &ev3, &cache);
    let err = std::fs::read_to_string(ev3.with_extension("stderr")).unwrap();
    assert!(err.contains("from the cache"), "{err}");
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(w.id() as i32, libc::SIGINT) };
    assert!(wait_exit(&mut w, 60).success());

    // 3. The same crash under a read-only `diagnose --image auto` (from
    // the cache): reported, then the panic completes as without us and
    // the guest prints its own report.
    let diag_err = dir.join("diagnose.stderr");
    let mut diag = bin()
        .args(["diagnose", "--json", "--wait-crash", "120", "--gdb", &guest.gdb_addr(), "--qmp", &guest.qmp_addr()])
        .arg("--ram-file")
        .arg(guest.ram_file().unwrap())
        .args(["--image", "auto"])
        .env("XDG_CACHE_HOME", &cache)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&diag_err).unwrap())
        .spawn()
        .unwrap();
    let t = std::time::Instant::now();
    while !std::fs::read_to_string(&diag_err).unwrap_or_default().contains("trap armed") {
        assert!(t.elapsed() < Duration::from_secs(180), "diagnose never armed: {}", std::fs::read_to_string(&diag_err).unwrap_or_default());
        assert!(diag.try_wait().unwrap().is_none(), "diagnose exited: {}", std::fs::read_to_string(&diag_err).unwrap_or_default());
        std::thread::sleep(Duration::from_millis(100));
    }
    let before = guest.console_len();
    let _ = guest.crash("sysrq-c").unwrap();
    let out = diag.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", std::fs::read_to_string(&diag_err).unwrap_or_default());
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["verdict"], "kill", "{report}");
    let bt_diag: Vec<String> =
        report["backtrace"].as_array().unwrap().iter().map(|f| f["text"].as_str().unwrap().to_owned()).collect();
    // (Read here, not with Guest::wait_panic: 6.12+ print `UID: 0` in the
    // CPU line, which the harness's parser predates.)
    guest.wait_for_console_from(before, "---[ end Kernel panic", Duration::from_secs(120)).unwrap();
    let console = guest.console()[before..].to_owned();
    assert!(console.contains("Kernel panic - not syncing: sysrq triggered crash"), "{console}");
    let theirs = after_panic(&guest_call_trace(&console));
    assert!(theirs.len() >= 4, "guest trace: {theirs:?}");
    for (what, bt) in [("--kernel vmlinuz image", &bt_file), ("--image auto", &bt_auto), ("diagnose --image auto", &bt_diag)] {
        assert!(bt[0].contains("panic+0x"), "{what}: the trap's frame: {bt:?}");
        let ours = after_panic(bt);
        assert_eq!(ours, theirs, "{what}: our frames vs the guest's Call Trace");
    }
    eprintln!("frames, equal to the guest's own: {theirs:?}");
}

#[test]
fn debian_6_1_repairs_with_a_vmlinuz_image_and_with_image_auto() {
    repairs_with_btf_images(Kernel::Debian);
}

#[test]
fn matrix_5_10_repairs_with_a_vmlinuz_image_and_with_image_auto() {
    repairs_with_btf_images(Kernel::Matrix(Series::V5_10));
}

#[test]
fn matrix_6_12_repairs_with_a_vmlinuz_image_and_with_image_auto() {
    repairs_with_btf_images(Kernel::Matrix(Series::V6_12));
}

#[test]
fn matrix_7_repairs_with_a_vmlinuz_image_and_with_image_auto() {
    repairs_with_btf_images(Kernel::Matrix(Series::V7));
}
