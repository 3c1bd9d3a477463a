//! Builds the bare-metal repair kernel (`repair-kernel/unikernel`) for
//! `x86_64-unknown-none` with a nested cargo, so that one `cargo build` at the
//! root builds everything. The ELF lands in `$OUT_DIR/repair-kernel.elf` and
//! is embedded in the builder with `include_bytes!`.
//!
//! The nested cargo runs in the unikernel's directory (so its
//! `.cargo/config.toml` applies), always in release (size, panic = abort),
//! with its own target directory under `OUT_DIR`, and with the environment
//! the outer build sets for build scripts removed: flags meant for the host
//! crates (RUSTFLAGS, a wrapper, the target dir, the jobserver) must not leak
//! into a bare-metal build.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const TARGET: &str = "x86_64-unknown-none";

/// Variables cargo or the user set that would change the nested build.
const CLEARED: &[&str] = &[
    "RUSTFLAGS",
    "CARGO_ENCODED_RUSTFLAGS",
    "CARGO_BUILD_RUSTFLAGS",
    "RUSTDOCFLAGS",
    "CARGO_ENCODED_RUSTDOCFLAGS",
    "CARGO_TARGET_DIR",
    "CARGO_BUILD_TARGET",
    "CARGO_BUILD_TARGET_DIR",
    "RUSTC_WRAPPER",
    "RUSTC_WORKSPACE_WRAPPER",
    "CARGO_BUILD_RUSTC_WRAPPER",
    "CARGO_MAKEFLAGS",
    "MAKEFLAGS",
    "MFLAGS",
    "CARGO_PRIMARY_PACKAGE",
    "CARGO_MANIFEST_DIR",
    "CARGO_MANIFEST_PATH",
    "CARGO_PKG_NAME",
    "OUT_DIR",
    "TARGET",
    "HOST",
    "PROFILE",
    "OPT_LEVEL",
    "DEBUG",
    "NUM_JOBS",
    "RUSTC_LINKER",
    "CARGO_PROFILE_RELEASE_DEBUG",
    "CARGO_PROFILE_RELEASE_LTO",
    "CARGO_PROFILE_RELEASE_OPT_LEVEL",
    "CARGO_PROFILE_RELEASE_PANIC",
    "CARGO_PROFILE_RELEASE_STRIP",
    "CARGO_PROFILE_RELEASE_CODEGEN_UNITS",
];

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let root = manifest_dir.parent().expect("builder/ has a parent").to_path_buf();
    let library = root.join("repair-kernel");
    let unikernel = library.join("unikernel");

    for p in [
        unikernel.join("src"),
        unikernel.join("Cargo.toml"),
        unikernel.join("Cargo.lock"),
        unikernel.join("build.rs"),
        unikernel.join("link.ld"),
        unikernel.join(".cargo/config.toml"),
        library.join("src"),
        library.join("Cargo.toml"),
        root.join("Cargo.toml"),
    ] {
        rerun_if_changed(&p);
    }
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=REPAIR_KERNEL_ELF");

    let dest = out_dir.join("repair-kernel.elf");

    // An escape hatch for a prebuilt ELF (for example from a CI cache).
    if let Some(prebuilt) = env::var_os("REPAIR_KERNEL_ELF") {
        copy(Path::new(&prebuilt), &dest);
        return;
    }

    check_target_installed();

    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let target_dir = out_dir.join("unikernel");
    let mut cmd = Command::new(&cargo);
    cmd.current_dir(&unikernel)
        .args(["build", "--release", "--target", TARGET, "--manifest-path"])
        .arg(unikernel.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir);
    for var in CLEARED {
        cmd.env_remove(var);
    }
    for (key, _) in env::vars_os() {
        if let Some(k) = key.to_str() {
            if k.starts_with("CARGO_FEATURE_") || k.starts_with("CARGO_CFG_") || k.starts_with("DEP_") {
                cmd.env_remove(k);
            }
        }
    }
    let output = cmd.output().unwrap_or_else(|e| {
        fail(&format!("could not run {:?} to build the repair kernel: {e}", cargo))
    });
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        if stderr.contains("can't find crate for `core`") || stderr.contains("target may not be installed") {
            fail(&format!(
                "the {TARGET} target is not installed; run `rustup target add {TARGET}`\n{stderr}"
            ));
        }
        fail(&format!(
            "building the repair kernel ({}) failed:\n{stderr}",
            unikernel.display()
        ));
    }
    let built = target_dir.join(TARGET).join("release").join("repair-unikernel");
    copy(&built, &dest);
}

/// `rerun-if-changed` for `path` and, for a directory, for every file under
/// it: a directory alone is not enough (a merge that edits files in place
/// left a stale repair kernel embedded, whose contract no longer matched).
fn rerun_if_changed(path: &Path) {
    println!("cargo:rerun-if-changed={}", path.display());
    if let Ok(entries) = std::fs::read_dir(path) {
        let mut entries: Vec<_> = entries.flatten().map(|e| e.path()).collect();
        entries.sort();
        for p in entries {
            rerun_if_changed(&p);
        }
    }
}

/// The standard library for the target must be in the sysroot.
fn check_target_installed() {
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let Ok(out) = Command::new(&rustc).args(["--print", "sysroot"]).output() else {
        return; // let the build itself report
    };
    let sysroot = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    let lib = sysroot.join("lib/rustlib").join(TARGET).join("lib");
    if out.status.success() && !lib.is_dir() {
        fail(&format!(
            "the {TARGET} target is not installed in {} (needed to build the repair kernel); \
             run `rustup target add {TARGET}`",
            sysroot.display()
        ));
    }
}

fn copy(from: &Path, to: &Path) {
    if let Err(e) = std::fs::copy(from, to) {
        fail(&format!("copying the repair kernel ELF {} to {}: {e}", from.display(), to.display()));
    }
}

fn fail(msg: &str) -> ! {
    for line in msg.lines() {
        println!("cargo:warning={line}");
    }
    eprintln!("error: {msg}");
    std::process::exit(1);
}
