//! Repair images of the guest kit's kernels (`scripts/guest-kit`), built
//! once per vmlinux and cached in the kit directory.

use anyhow::{Context, Result};
use harness::{Kernel, Kit};

/// Builds (or reuses, keyed by the vmlinux's size and mtime) the repair
/// image of a kit kernel, in the kit directory.
pub fn kit_image(kernel: Kernel) -> Result<builder::RepairImage> {
    let kit = Kit::locate()?;
    let vmlinux = kit.vmlinux(kernel)?;
    let meta = std::fs::metadata(&vmlinux)?;
    let mtime = meta.modified()?.duration_since(std::time::UNIX_EPOCH)?.as_secs();
    let path = kit.dir.join(format!("{}/repair-{}-{mtime}-{}.img", kernel.dir_name(), meta.len(), env!("CARGO_PKG_VERSION")));
    if let Ok(img) = builder::RepairImage::read(&path) {
        if img.unikernel.segments == builder::builtin_unikernel()?.segments {
            return Ok(img);
        }
    }
    let img = builder::build_from_vmlinux(&vmlinux, &builder::BuildOptions::default())
        .with_context(|| format!("building the repair image of {}", vmlinux.display()))?;
    img.write(&path).with_context(|| format!("writing {}", path.display()))?;
    Ok(img)
}


/// The one attach of the real-guest tests, benches and the campaign: a kit
/// guest booted `with_ram_file`, its gdbstub for control and its RAM file
/// for memory (`loader::attach`), the flow attached with `image`. The RAM
/// map and size come from the file, never from constants.
pub fn attach(
    guest: &harness::Guest,
    image: builder::RepairImage,
    cfg: loader::flow::FlowConfig,
) -> Result<(loader::ram::WithRam<loader::gdb::GdbGuest, loader::ram::RamFile>, loader::flow::Session)> {
    use loader::attach::{QemuBackend, QemuGuest};
    let ram_file = guest.ram_file().context("the guest was not booted with_ram_file")?;
    let spec = QemuGuest { gdb: Some(guest.gdb_addr().parse()?), qmp: None, ram_file: Some(ram_file) };
    let mut attached = spec.connect().context("connecting to the kit guest")?;
    let session = attached.session(image, cfg).context("attaching the repair flow")?;
    match attached.backend {
        QemuBackend::GdbRam(g) => Ok((g, session)),
        _ => anyhow::bail!("no RAM file path"),
    }
}
