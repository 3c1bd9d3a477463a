//! Builds and reads repair images: everything the loader needs to repair one
//! kernel build, in one checksummed file.
//!
//! ```no_run
//! use builder::{build_from_vmlinux, BuildOptions, RepairImage};
//! let image = build_from_vmlinux("vmlinux".as_ref(), &BuildOptions::default())?;
//! image.write("repair.img".as_ref())?;
//! let back = RepairImage::read("repair.img".as_ref())?;
//! back.check_kernel(None, &image.kernel.banner)?;
//! let plan = builder::StagePlan::new(&back, 0x10000, 0x80000, 512 << 20)?;
//! println!("entry {:#x}, cr3 {:#x}", plan.entry_rip, plan.cr3);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! - [`image`]: the container ([`RepairImage`]) and its format;
//! - [`wanted`]: what to extract from a vmlinux, from the repair kernel's
//!   layout table;
//! - [`layout`]: from a `symbols` profile to the repair kernel's layout;
//! - [`elf`]: the embedded repair kernel ELF, and vmlinux pages;
//! - [`stage`]: where everything goes in the guest ([`StagePlan`]).
//!
//! `build.rs` builds the bare-metal repair kernel
//! (`repair-kernel/unikernel`) and this crate embeds it, so one
//! `cargo build` yields a self-contained `build-repair-image`.

pub mod codefacts;
pub mod elf;
pub mod frames;
pub mod image;
pub mod inspect;
pub mod layout;
pub mod skips;
pub mod stage;
pub mod wanted;

use std::path::{Path, PathBuf};

pub use elf::{builtin_unikernel, UNIKERNEL_ELF, UNIKERNEL_LINK_BASE};
pub use image::{FileInfo, ImageError, KernelId, RepairImage, Segment, SnapshotSource, Unikernel};
pub use layout::{layout_from_profile, LayoutError};
pub use skips::KernelSymbols;
pub use stage::{Paging, StageError, StageOptions, StagePlan};

use repair_kernel::layout::{Kind, ITEMS};
use symbols::Profile;

/// Options of [`build_from_vmlinux`].
#[derive(Clone, Debug, Default)]
pub struct BuildOptions {
    /// Also carry the pristine text/rodata pages (restores, not only checks).
    pub keep_pristine: bool,
    /// A `System.map` to cross-check symbol addresses against.
    pub system_map: Option<PathBuf>,
}

/// Why an image could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Profile(#[from] symbols::Error),
    #[error("{path}: {source}")]
    Layout {
        path: PathBuf,
        #[source]
        source: LayoutError,
    },
    #[error("{path}: {msg}")]
    Vmlinux { path: PathBuf, msg: String },
    #[error("{path}: {msg}")]
    SystemMap { path: PathBuf, msg: String },
    #[error(transparent)]
    Image(#[from] ImageError),
}

/// Extracts the profile the repair kernel needs from a vmlinux (missing
/// items are reported by [`layout_from_profile`], not here).
pub fn profile_from_vmlinux(vmlinux: &Path) -> Result<Profile, BuildError> {
    let (profile, _missing) = wanted::wanted().with(|w| Profile::from_vmlinux_lenient(vmlinux, w))?;
    Ok(profile)
}

/// Builds a repair image from the vmlinux alone: profile, layout, the
/// embedded repair kernel, and the text/rodata snapshot as the file has it.
pub fn build_from_vmlinux(vmlinux: &Path, opts: &BuildOptions) -> Result<RepairImage, BuildError> {
    let profile = profile_from_vmlinux(vmlinux)?;
    build_from_profile(vmlinux, profile, opts)
}

/// [`build_from_vmlinux`] with a profile already extracted from `vmlinux`.
pub fn build_from_profile(
    vmlinux: &Path,
    profile: Profile,
    opts: &BuildOptions,
) -> Result<RepairImage, BuildError> {
    let vm_err = |msg: String| BuildError::Vmlinux { path: vmlinux.to_owned(), msg };
    let mut image = image_for_profile(vmlinux, profile.clone(), opts)?;
    let file = std::fs::File::open(vmlinux).map_err(|e| vm_err(e.to_string()))?;
    // SAFETY: a read-only private map, dropped before return; a vmlinux is
    // not expected to change while it is read.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| vm_err(e.to_string()))?;
    let symbols = skips::elf_symbols(&map);
    snapshot_from_elf(&mut image, &map, &symbols, &profile, opts).map_err(vm_err)?;
    // Optional items: a rule the vmlinux cannot give stays absent, and the
    // repair kernel says so where it needed it.
    let _absent = frames::fill_call_frames(&mut image.layout, &map, &profile);
    Ok(image)
}


/// The image of a profile (layout, identity, the repair kernel), its
/// snapshot still empty. `source` names the kernel file in errors.
pub fn image_for_profile(
    vmlinux: &Path,
    mut profile: Profile,
    opts: &BuildOptions,
) -> Result<RepairImage, BuildError> {
    if let Some(map) = &opts.system_map {
        cross_check_system_map(&mut profile, map)?;
    }
    let layout = layout_from_profile(&profile)
        .map_err(|source| BuildError::Layout { path: vmlinux.to_owned(), source })?;
    let vm_err = |msg: String| BuildError::Vmlinux { path: vmlinux.to_owned(), msg };
    let build_id = image::unhex(&profile.build_id)
        .ok_or_else(|| vm_err(format!("build-id {:?} is not hex", profile.build_id)))?;
    let kernel = KernelId {
        build_id,
        banner: profile.banner.clone(),
        release: profile.release.clone(),
    };
    let image = RepairImage {
        kernel,
        profile_json: profile.to_json(),
        layout,
        unikernel: builtin_unikernel()?,
        snapshot_source: SnapshotSource::VmlinuxFile,
        skips: Vec::new(),
        page_hashes: Default::default(),
        pristine: Default::default(),
    };
    Ok(image)
}

/// The text/rodata snapshot of a kernel ELF as the file has it: page
/// hashes (and pristine pages), minus the run-time patch sites found with
/// `symbols` (the ELF's own, or kallsyms for a stripped one).
fn snapshot_from_elf(
    image: &mut RepairImage,
    data: &[u8],
    symbols: &skips::KernelSymbols,
    profile: &Profile,
    opts: &BuildOptions,
) -> Result<(), String> {
    let pages = elf::VmlinuxPages::new(data)?;
    let ranges = [profile.text, profile.rodata];
    if ranges.iter().any(|r| r.end <= r.start) {
        return Err("empty kernel text or rodata range in the profile".into());
    }
    let (skips, _tables) = skips::skip_sites_with(data, &pages, symbols, &skips::TableFormats::from_profile(profile));
    image.skips = skips;
    // Constants only the code has (TIF_SIGPENDING); absent, the repair
    // kernel says what it could not do.
    let sym = |name: &str| symbols.iter().find(|(n, _, _)| n == name).map(|&(_, a, _)| a);
    let read = |a: u64, n: usize| Some(pages.bytes(a, a.checked_add(n as u64)?));
    let _absent = codefacts::fill_thread_flag_bits(&mut image.layout, &read, &sym);
    // Data written during boot is not "expected from the file".
    let excluded = skips::file_only_exclusions_with(data, symbols);
    let all = ranges
        .iter()
        .flat_map(|r| pages.pages(r.start, r.end))
        .filter(|(p, _)| !excluded.iter().any(|&(a, b)| *p < b && p + image::PAGE_SIZE as u64 > a));
    image.set_snapshot_from(all, opts.keep_pristine, SnapshotSource::VmlinuxFile);
    Ok(())
}

/// Builds a repair image from a vmlinuz (`/boot/vmlinuz-VERSION`, a
/// bzImage) alone: its payload decompressed, the profile from the kernel's
/// own BTF and kallsyms (no DWARF, no `-dbg` package), and the snapshot
/// from the ELF it holds. Also takes a vmlinux (stripped or not) with BTF.
pub fn build_from_vmlinuz(vmlinuz: &Path, opts: &BuildOptions) -> Result<RepairImage, BuildError> {
    let elf = symbols::read_vmlinuz(vmlinuz)?;
    let (profile, _missing, kallsyms) =
        wanted::wanted().with(|w| symbols::profile_from_kernel_elf(&elf.data, vmlinuz, w))?;
    let mut image = image_for_profile(vmlinuz, profile.clone(), opts)?;
    let syms: skips::KernelSymbols = kallsyms
        .symbols
        .iter()
        .map(|s| (s.name.clone(), s.address, matches!(s.kind, 'T' | 't' | 'W' | 'w')))
        .collect();
    snapshot_from_elf(&mut image, &elf.data, &syms, &profile, opts)
        .map_err(|msg| BuildError::Vmlinux { path: vmlinuz.to_owned(), msg })?;
    Ok(image)
}

/// Checks that the profile's symbols agree with `System.map`; fills symbols
/// the profile lacks from it.
fn cross_check_system_map(profile: &mut Profile, path: &Path) -> Result<(), BuildError> {
    let err = |msg: String| BuildError::SystemMap { path: path.to_owned(), msg };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let map = symbols::parse_system_map(&text);
    if map.is_empty() {
        return Err(err("no symbols found (is this a System.map?)".into()));
    }
    let mut wrong = Vec::new();
    for spec in ITEMS.iter().filter(|s| s.kind == Kind::Symbol) {
        match (profile.symbol(spec.ty), map.get(spec.ty)) {
            (Some(a), Some(&b)) if a != b => {
                wrong.push(format!("{} is {a:#x} in the vmlinux, {b:#x} here", spec.ty))
            }
            (None, Some(&b)) => {
                profile.symbols.insert(spec.ty.to_owned(), symbols::Symbol { address: b, size: 0 });
            }
            _ => {}
        }
    }
    if !wrong.is_empty() {
        return Err(err(format!(
            "does not match the vmlinux ({}); pass the System.map of the same kernel build",
            wrong.join("; ")
        )));
    }
    Ok(())
}
