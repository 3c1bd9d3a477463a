//! Extracts the repair kernel's profile from a vmlinux (what
//! `build-repair-image --emit-profile` writes) and prints it as JSON.
//!
//! `cargo run --release -p symbols --example profile -- VMLINUX [OUT.json]`
//! (the benchmark in `bench/symbols/run` times this binary).

use std::process::ExitCode;

/// What the builder extracts (its source, included: the builder depends on
/// this crate).
#[path = "../../builder/src/wanted.rs"]
mod repair_kernel;

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let Some(path) = args.next() else {
        eprintln!("usage: profile VMLINUX [OUT.json]");
        return ExitCode::from(2);
    };
    let out = args.next();
    let start = std::time::Instant::now();
    let profile = repair_kernel::wanted().with(|w| symbols::Profile::from_vmlinux(path.as_ref(), w)).and_then(|mut p| {
        p.units = symbols::unit_ranges_from_vmlinux(path.as_ref(), &repair_kernel::units())?;
        Ok(p)
    });
    match profile {
        Ok(p) => {
            let json = p.to_json();
            eprintln!(
                "{}: {} symbols, {} per-cpu, {} types in {:.3} s",
                p.release,
                p.symbols.len(),
                p.percpu.len(),
                p.types.len(),
                start.elapsed().as_secs_f64()
            );
            match out {
                Some(o) => {
                    if let Err(e) = std::fs::write(&o, json) {
                        eprintln!("cannot write {}: {e}", o.to_string_lossy());
                        return ExitCode::FAILURE;
                    }
                }
                None => println!("{json}"),
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
