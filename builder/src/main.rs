//! `build-repair-image`: builds a repair image for one kernel build, or
//! shows what an image holds.
//!
//! ```text
//! build-repair-image --vmlinux PATH --output IMAGE [--system-map PATH] [--pristine]
//! build-repair-image --kernel /boot/vmlinuz-VERSION --output IMAGE [--pristine]
//! build-repair-image --vmlinux PATH --emit-profile FILE.json
//! build-repair-image inspect IMAGE
//! ```

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use builder::{build_from_profile, build_from_vmlinuz, profile_from_vmlinux, BuildOptions, RepairImage};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "build-repair-image", version, about = "Builds the repair image for one Linux kernel build")]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// The kernel's vmlinux, with DWARF (from the -dbg package).
    #[arg(long, value_name = "PATH", conflicts_with = "kernel")]
    vmlinux: Option<PathBuf>,
    /// The kernel itself (`/boot/vmlinuz-VERSION`, a bzImage compressed
    /// with gzip, xz, zstd or LZ4): struct layouts from its BTF, symbols
    /// from its kallsyms. No -dbg package needed; the kernel must have
    /// CONFIG_DEBUG_INFO_BTF (every Debian kernel since 5.10 has).
    #[arg(long, value_name = "VMLINUZ")]
    kernel: Option<PathBuf>,
    /// Write the image here.
    #[arg(long, value_name = "IMAGE")]
    output: Option<PathBuf>,
    /// Write the kernel profile (JSON) here.
    #[arg(long, value_name = "FILE.json")]
    emit_profile: Option<PathBuf>,
    /// The kernel's System.map, to cross-check symbol addresses.
    #[arg(long, value_name = "PATH")]
    system_map: Option<PathBuf>,
    /// Carry the pristine text and rodata pages too (lets the repair kernel
    /// restore corrupted pages, not only detect them).
    #[arg(long)]
    pristine: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print what an image holds, with sizes.
    Inspect {
        /// The repair image.
        image: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    if let Some(Command::Inspect { image }) = &cli.command {
        return inspect(image);
    }
    if cli.output.is_none() && cli.emit_profile.is_none() {
        bail!("pass --output IMAGE (a repair image) or --emit-profile FILE.json (the profile only)");
    }
    if let Some(kernel) = &cli.kernel {
        return from_kernel(&cli, kernel);
    }
    let Some(vmlinux) = &cli.vmlinux else {
        bail!("nothing to do: pass --vmlinux PATH (with DWARF) or --kernel VMLINUZ (with BTF), with --output IMAGE or --emit-profile FILE.json, or use `inspect IMAGE`");
    };
    let profile = profile_from_vmlinux(vmlinux)
        .with_context(|| format!("reading the kernel profile from {}", vmlinux.display()))?;
    if let Some(path) = &cli.emit_profile {
        std::fs::write(path, profile.to_json())
            .with_context(|| format!("writing the profile to {}", path.display()))?;
        eprintln!("profile of {} written to {}", profile.release, path.display());
    }
    if let Some(output) = &cli.output {
        let opts = BuildOptions { keep_pristine: cli.pristine, system_map: cli.system_map.clone() };
        let image = build_from_profile(vmlinux, profile, &opts)
            .with_context(|| format!("building a repair image from {}", vmlinux.display()))?;
        image.write(output).with_context(|| format!("writing {}", output.display()))?;
        let (_, info) = RepairImage::read_with_info(output)
            .with_context(|| format!("reading back {}", output.display()))?;
        eprintln!(
            "repair image for {} written to {} ({} KiB, {} page hashes{})",
            image.kernel.release,
            output.display(),
            info.file_len.div_ceil(1024),
            image.page_hashes.len(),
            if image.pristine.is_empty() { String::new() } else { format!(", {} pristine pages", image.pristine.len()) }
        );
    }
    Ok(())
}

/// `--kernel VMLINUZ`: the image (and profile) from the kernel's own BTF
/// and kallsyms.
fn from_kernel(cli: &Cli, kernel: &Path) -> Result<()> {
    let opts = BuildOptions { keep_pristine: cli.pristine, system_map: cli.system_map.clone() };
    let image = build_from_vmlinuz(kernel, &opts)
        .with_context(|| format!("building a repair image from {}", kernel.display()))?;
    if let Some(path) = &cli.emit_profile {
        std::fs::write(path, &image.profile_json)
            .with_context(|| format!("writing the profile to {}", path.display()))?;
        eprintln!("profile of {} written to {}", image.kernel.release, path.display());
    }
    if let Some(output) = &cli.output {
        image.write(output).with_context(|| format!("writing {}", output.display()))?;
        eprintln!(
            "repair image for {} (from its BTF and kallsyms) written to {} ({} page hashes)",
            image.kernel.release,
            output.display(),
            image.page_hashes.len()
        );
    }
    Ok(())
}

fn inspect(path: &Path) -> Result<()> {
    let (image, info) =
        RepairImage::read_with_info(path).with_context(|| format!("reading {}", path.display()))?;
    println!("repair image:     {}", path.display());
    print!("{}", builder::inspect::report(&image, &info));
    Ok(())
}
