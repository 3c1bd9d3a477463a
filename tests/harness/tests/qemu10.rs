//! The kit's QEMU 10 (`scripts/kit-qemu10`: Debian bookworm-backports,
//! unpacked beside the system's 7.2) boots the LKDTM kernel with its RAM in a
//! shared file, answers QMP as 10.x on two monitors at once, and runs guest
//! commands, exactly as the system QEMU does.

use harness::{Error, Guest, GuestConfig, Kernel};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// A bare QMP session: the greeting, then capabilities negotiation.
struct Qmp {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
    greeting: Value,
}

impl Qmp {
    fn connect(addr: &str) -> Qmp {
        let path = addr.strip_prefix("unix:").expect("a unix: address");
        let stream = UnixStream::connect(path).unwrap_or_else(|e| panic!("connect {path}: {e}"));
        stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let reader = BufReader::new(stream.try_clone().unwrap());
        let mut q = Qmp { writer: stream, reader, greeting: Value::Null };
        q.greeting = q.read();
        assert!(q.greeting.get("QMP").is_some(), "not a QMP greeting: {}", q.greeting);
        let r = q.execute("qmp_capabilities", json!({}));
        assert_eq!(r, json!({}), "qmp_capabilities");
        q
    }

    fn read(&mut self) -> Value {
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("a QMP message");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("QMP sent {line:?}: {e}"))
    }

    /// Runs a command; returns its `return`, skipping events.
    fn execute(&mut self, cmd: &str, args: Value) -> Value {
        writeln!(self.writer, "{}", json!({"execute": cmd, "arguments": args})).unwrap();
        loop {
            let m = self.read();
            if m.get("event").is_some() {
                continue;
            }
            return m.get("return").cloned().unwrap_or_else(|| panic!("{cmd}: {m}"));
        }
    }

    /// `(major, minor, micro)` from the greeting.
    fn version(&self) -> (u64, u64, u64) {
        let v = &self.greeting["QMP"]["version"]["qemu"];
        (v["major"].as_u64().unwrap(), v["minor"].as_u64().unwrap(), v["micro"].as_u64().unwrap())
    }
}

#[test]
fn qemu10_boots_the_lkdtm_kernel_with_a_ram_file_and_two_qmp_monitors() {
    let cfg = GuestConfig::new(Kernel::Lkdtm)
        .with_ram_file()
        .with_second_qmp()
        .with_qemu10()
        .unwrap_or_else(|e| panic!("{e}"));
    let mut g = Guest::boot(&cfg).unwrap_or_else(|e| panic!("boot under QEMU 10: {e}"));
    assert!(g.qemu().ends_with("qemu10/bin/qemu-system-x86_64"), "{}", g.qemu());

    // QMP's greeting names QEMU 10, and query-version agrees.
    let mut qmp = Qmp::connect(&g.qmp_addr());
    let (major, minor, micro) = qmp.version();
    assert_eq!(major, 10, "greeting {}", qmp.greeting);
    let v = qmp.execute("query-version", json!({}));
    assert_eq!(v["qemu"]["major"], 10, "{v}");
    assert_eq!(qmp.execute("query-status", json!({}))["status"], "running");

    // A second monitor answers while the first stays connected.
    let addr2 = g.qmp2_addr().expect("booted with_second_qmp");
    let mut qmp2 = Qmp::connect(&addr2);
    assert_eq!(qmp2.version(), (major, minor, micro));
    assert_eq!(qmp2.execute("query-status", json!({}))["status"], "running");

    // The guest runs commands and its bystander's data verifies.
    let r = g.run("uname -r; cat /proc/cmdline", Duration::from_secs(60)).unwrap();
    assert_eq!(r.status, 0, "{r:?}");
    assert!(r.output[0].starts_with("6.1."), "{r:?}");
    assert!(r.output[1].contains("rdinit=/init"), "{r:?}");
    assert!(g.verify_bystander().unwrap().ok);

    // The RAM file is the guest's memory: its size, and the kernel's banner
    // is in it.
    let ram = g.ram_file().expect("booted with_ram_file");
    let bytes = std::fs::read(&ram).unwrap();
    assert_eq!(bytes.len() as u64, u64::from(cfg.mem_mib) << 20);
    let banner = b"Linux version 6.1.";
    assert!(bytes.windows(banner.len()).any(|w| w == banner), "no banner in {}", ram.display());

    // Stopped and resumed from the second monitor; the first sees it.
    qmp2.execute("stop", json!({}));
    assert_eq!(qmp.execute("query-status", json!({}))["status"], "paused");
    qmp2.execute("cont", json!({}));
    assert_eq!(qmp.execute("query-status", json!({}))["status"], "running");
    assert_eq!(g.run("echo alive", Duration::from_secs(60)).unwrap().output, ["alive"]);
}

#[test]
fn a_kit_without_qemu10_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = GuestConfig::new(Kernel::Lkdtm);
    cfg.kit_dir = Some(dir.path().to_path_buf());
    let err = cfg.with_qemu10().unwrap_err();
    match &err {
        Error::KitMissing(p) => assert!(p.ends_with("qemu10/bin/qemu-system-x86_64"), "{p:?}"),
        other => panic!("expected KitMissing, got {other}"),
    }
    assert!(err.to_string().contains("scripts/guest-kit"), "{err}");
}
