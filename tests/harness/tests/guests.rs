//! The harness on real guests: each kit kernel boots to its init, the
//! bystander's data verifies, and a crash from a child is observed exactly
//! as the guest itself reports it.

use harness::{Error, Guest, GuestConfig, Kernel};
use std::time::Duration;

fn boot(cfg: GuestConfig) -> Guest {
    Guest::boot(&cfg).unwrap_or_else(|e| panic!("boot {:?}: {e}", cfg.kernel))
}

#[test]
fn debian_kernel_boots_to_init_and_sysrq_c_panics() {
    let mut g = boot(GuestConfig::new(Kernel::Debian));
    let release = g.run("uname -r", Duration::from_secs(30)).unwrap();
    assert_eq!(release.status, 0);
    assert!(release.output[0].contains("cloud-amd64"), "{:?}", release.output);

    // The bystander runs and its file verifies before any crash.
    let v = g.verify_bystander().unwrap();
    assert!(v.ok, "bystander data bad before any crash: {v:?}");
    assert!(v.records > 0);

    let crash = g.crash("sysrq-c").unwrap();
    let p = g.wait_panic(Duration::from_secs(60)).unwrap();
    assert_eq!(p.message, "sysrq triggered crash");
    assert_eq!(p.pid, crash.pid, "panic report names the crashing child");
    assert_eq!(p.comm, "sh");
    assert!(p.cpu < 2);
    assert!(p.call_trace.iter().any(|f| f == "sysrq_handle_crash"), "{:?}", p.call_trace);
}

#[test]
fn lkdtm_kernel_boots_and_an_exception_panics_with_oops_panic() {
    let mut g = boot(GuestConfig::new(Kernel::Lkdtm).append("oops=panic"));
    let types = g
        .run("ls /sys/kernel/debug/provoke-crash", Duration::from_secs(30))
        .unwrap();
    assert!(types.output.iter().any(|l| l.contains("DIRECT")), "{types:?}");
    assert!(g.verify_bystander().unwrap().ok);

    let crash = g.crash("EXCEPTION").unwrap();
    let p = g.wait_panic(Duration::from_secs(60)).unwrap();
    assert_eq!(p.message, "Fatal exception");
    assert_eq!(p.pid, crash.pid);
    assert_eq!(p.comm, "sh");
    // LKDTM's debugfs write handler is on the oopsing task's stack.
    assert!(p.call_trace.iter().any(|f| f == "direct_entry"), "{:?}", p.call_trace);
}

#[test]
fn a_missing_kit_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    // A kit directory with nothing in it: the error names the missing file.
    let mut cfg = GuestConfig::new(Kernel::Debian);
    cfg.kit_dir = Some(dir.path().to_path_buf());
    let err = Guest::boot(&cfg).unwrap_err();
    match &err {
        Error::KitMissing(p) => assert!(p.ends_with("debian/vmlinuz"), "{p:?}"),
        other => panic!("expected KitMissing, got {other}"),
    }
    assert!(err.to_string().contains("scripts/guest-kit"));
}

#[test]
fn a_qemu_error_is_reported_with_its_stderr() {
    let mut cfg = GuestConfig::new(Kernel::Debian);
    cfg.qemu_args = vec!["-no-such-option".into()];
    let err = Guest::boot(&cfg).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, Error::QemuExited { .. }), "{text}");
    assert!(text.contains("no-such-option"), "{text}");
}
