//! Building a repair image without the kernel's `-dbg` package: time and
//! peak RSS of each way, in one run, on the kit's Debian 6.1 kernel (or
//! `BENCH_KERNEL=5.10|6.1|6.12|7`, the matrix's):
//!
//! - `build-repair-image --kernel vmlinuz` (BTF + kallsyms from the
//!   decompressed payload, page hashes from its ELF);
//! - `repair-guest snapshot --image auto`: the image built from a running
//!   guest's memory plus its live snapshot, through the RAM file, and
//!   through the gdbstub alone (no QMP, no RAM file);
//! - beside them, the DWARF path, `build-repair-image --vmlinux`, and drgn
//!   loading the same kernel's debug info (drgn has no BTF type finder,
//!   and its kallsyms loader needs a core with VMCOREINFO: printed as such).
//!
//! Each command runs `BENCH_RUNS` times (default 3) under `/usr/bin/time`;
//! the median wall time and the largest peak RSS are printed.
//! `bench/image-build/run` builds the binaries and runs this.

use std::path::{Path, PathBuf};
use std::process::Command;

use harness::{Guest, GuestConfig, Kernel, Series};

fn release_bin(name: &str) -> PathBuf {
    // target/release/deps/image_build-HASH -> target/release/NAME
    let exe = std::env::current_exe().unwrap();
    let p = exe.parent().and_then(Path::parent).unwrap().join(name);
    assert!(p.exists(), "{} is missing: run bench/image-build/run (it builds it)", p.display());
    p
}

/// Runs `cmd` `runs` times: (median wall s, max RSS MB).
fn measure(name: &str, runs: usize, mut make: impl FnMut(usize) -> Command) -> (f64, f64) {
    let mut walls = Vec::new();
    let mut rss = 0f64;
    for i in 0..runs {
        let out_file = std::env::temp_dir().join(format!("image-build-{}-{name}.time", std::process::id()));
        let c = make(i);
        let mut t = Command::new("/usr/bin/time");
        t.args(["-f", "%e %M", "-o"]).arg(&out_file).arg(c.get_program()).args(c.get_args());
        for (k, v) in c.get_envs() {
            match v {
                Some(v) => t.env(k, v),
                None => t.env_remove(k),
            };
        }
        let out = t.output().unwrap_or_else(|e| panic!("{name}: /usr/bin/time: {e} (apt-get install time)"));
        assert!(out.status.success(), "{name} failed: {}", String::from_utf8_lossy(&out.stderr));
        let text = std::fs::read_to_string(&out_file).unwrap();
        let mut f = text.split_whitespace();
        walls.push(f.next().unwrap().parse::<f64>().unwrap());
        rss = rss.max(f.next().unwrap().parse::<f64>().unwrap() / 1024.0);
        let _ = std::fs::remove_file(&out_file);
    }
    walls.sort_by(f64::total_cmp);
    (walls[walls.len() / 2], rss)
}

fn main() {
    let runs: usize = std::env::var("BENCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    let kernel = match std::env::var("BENCH_KERNEL").as_deref() {
        Ok("5.10") => Kernel::Matrix(Series::V5_10),
        Ok("6.12") => Kernel::Matrix(Series::V6_12),
        Ok("7") => Kernel::Matrix(Series::V7),
        _ => Kernel::Debian,
    };
    let kit = harness::Kit::locate().unwrap();
    let (vmlinuz, vmlinux) = kit.kernel(kernel).unwrap_or_else(|e| panic!("{e}: run scripts/guest-kit"));
    let bri = release_bin("build-repair-image");
    let rg = release_bin("repair-guest");
    let tmp = tempfile::tempdir().unwrap();
    let out = |n: &str| tmp.path().join(n);
    let mut rows: Vec<(String, f64, f64)> = Vec::new();

    let (w, m) = measure("vmlinuz", runs, |_| {
        let mut c = Command::new(&bri);
        c.arg("--kernel").arg(&vmlinuz).arg("--output").arg(out("z.img"));
        c
    });
    rows.push(("build-repair-image --kernel vmlinuz (BTF + kallsyms)".into(), w, m));

    // A running guest: RAM file and QMP given, then the gdbstub alone.
    let mut guest = Guest::boot(&GuestConfig::new(kernel).with_ram_file()).unwrap();
    guest.run("echo up", std::time::Duration::from_secs(120)).unwrap();
    let snapshot = |extra: &[String], i: usize| {
        let mut c = Command::new(&rg);
        c.args(["snapshot", "--gdb", &guest.gdb_addr(), "--image", "auto", "--output"]).arg(out("live.img"));
        c.args(extra);
        // A fresh cache each run: built, never read from the cache.
        c.env("XDG_CACHE_HOME", out(&format!("cache-{i}-{}", extra.len())));
        c
    };
    let ram = ["--qmp".to_string(), guest.qmp_addr(), "--ram-file".into(), guest.ram_file().unwrap().display().to_string()];
    let (w, m) = measure("live-ram", runs, |i| snapshot(&ram, i));
    rows.push(("repair-guest snapshot --image auto (RAM file)".into(), w, m));
    let (w, m) = measure("live-gdb", runs, |i| snapshot(&[], i));
    rows.push(("repair-guest snapshot --image auto (gdbstub only)".into(), w, m));
    guest.run("echo still-up", std::time::Duration::from_secs(120)).expect("the guest runs on after the snapshots");
    drop(guest);

    let (w, m) = measure("dwarf", runs, |_| {
        let mut c = Command::new(&bri);
        c.arg("--vmlinux").arg(&vmlinux).arg("--output").arg(out("x.img"));
        c
    });
    rows.push(("build-repair-image --vmlinux (DWARF; needs the -dbg package)".into(), w, m));

    // drgn, the peer, where it can: its own type loading of the same
    // kernel needs the vmlinux's DWARF (bench/symbols/drgn_profile.py).
    let venv = std::env::var_os("DRGN_VENV").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache/crash-repair/drgn-venv")
    });
    let py = venv.join("bin/python");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../bench/symbols/drgn_profile.py");
    let drgn_version = Command::new(&py).args(["-c", "import drgn; print(drgn.__version__)"]).output().ok().filter(|o| o.status.success());
    let drgn_note = match &drgn_version {
        Some(v) => {
            let v = String::from_utf8_lossy(&v.stdout).trim().to_owned();
            let finders = Command::new(&py)
                .args(["-c", "import drgn; print(sorted(drgn.Program().registered_type_finders()))"])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
                .unwrap_or_default();
            let (w, m) = measure("drgn", runs, |_| {
                let mut c = Command::new(&py);
                c.arg(&script).arg(&vmlinux).arg("task_struct,list_head,mm_struct,rq,printk_ringbuffer,prb_desc_ring,prb_data_ring,prb_desc,prb_data_blk_lpos,printk_info,pt_regs").arg("init_task,panic,oops_end,linux_banner,_text");
                c
            });
            rows.push((format!("drgn {v}: the same types from the vmlinux (DWARF)"), w, m));
            format!(
                "drgn {v}: type finders {finders}: no BTF one, so drgn cannot load these types from a vmlinuz or a \
                 guest without the -dbg vmlinux; its kallsyms loader (load_vmlinux_kallsyms) needs a core with \
                 VMCOREINFO (QEMU -device vmcoreinfo and the guest's fw_cfg driver), not measured"
            )
        }
        None => format!("drgn not installed in {} (bench/symbols/run installs it): not measured", venv.display()),
    };

    println!();
    println!("kernel: {} ({}), {runs} runs each: median wall time, peak RSS", kernel.dir_name(), vmlinuz.display());
    println!("cores: {}, load average: {}", std::thread::available_parallelism().map_or(0, |n| n.get()), std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim());
    println!("| {:<62} | {:>8} | {:>9} |", "how", "wall (s)", "RSS (MB)");
    println!("|{:-<64}|{:->10}|{:->11}|", "", "", "");
    for (n, w, m) in &rows {
        println!("| {n:<62} | {w:>8.2} | {m:>9.1} |");
    }
    println!("{drgn_note}");
}
