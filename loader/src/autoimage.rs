//! `--image auto`: the repair image built at attach time from the running
//! guest itself, with no vmlinux and no `-dbg` package on the host.
//!
//! The kernel image is read from guest memory where the kernel maps it
//! (from the first present 2 MiB page at `__START_KERNEL_map`, which is
//! `_text`, as [`crate::kaslr`] finds it), through whatever backend the
//! attach has (the RAM file, QEMU's process, or the gdbstub alone). In it:
//! kallsyms, found by shape and decoded (`symbols::kallsyms`), then the
//! kernel's BTF (`__start_BTF..__stop_BTF`), its build-id note
//! (`__start_notes..__stop_notes`) and `linux_banner`. The profile comes
//! from those as from a vmlinuz (`symbols::profile_from_btf`); the image
//! has no text snapshot (`repair-guest snapshot` or `--integrity` take one
//! from the live guest).
//!
//! Link-time addresses: kallsyms in memory holds run-time addresses. The
//! profile is written at the x86_64 link address of `_text`,
//! `0xffffffff81000000` (`__START_KERNEL_map + CONFIG_PHYSICAL_START`,
//! 16 MiB in every distribution kernel checked), so it equals the DWARF
//! profile of the same build, and the usual KASLR search at attach finds
//! the slide from it. Should a kernel link elsewhere, the image still
//! works (the slide found at attach is relative to the same address), but
//! `--vmlinux` line numbers would be off: the build-id check keeps a
//! vmlinux of another build out.
//!
//! Images are cached by build-id (`$XDG_CACHE_HOME/crash-repair/images`,
//! default `~/.cache/crash-repair/images`): a later attach to the same
//! build reads the cached file once the build-id is read from the guest.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use builder::{BuildOptions, RepairImage};
use repair_kernel::arch::x86_64::pgtable::{translate, Paging};
use repair_kernel::mem::{Gva, PhysMem};
use symbols::{Kallsyms, Profile};

use crate::access::{AccessError, GuestAccess};
use crate::guestmem::GuestPhys;
use crate::kaslr::{read_virt, KERNEL_IMAGE_SIZE, START_KERNEL_MAP};
use crate::symbolize::Symbolizer;

/// Where x86_64 kernels link `_text`.
pub const LINK_TEXT: u64 = 0xffff_ffff_8100_0000;
/// The most of the kernel image read (text, rodata with kallsyms and BTF).
const MAX_READ: u64 = 128 << 20;
const CHUNK: u64 = 2 << 20;

/// Why an image could not be built from the guest.
#[derive(Debug, thiserror::Error)]
pub enum AutoImageError {
    #[error(transparent)]
    Access(#[from] AccessError),
    #[error("nothing is mapped at the kernel image's addresses through CR3 {0:#x}: the guest is not running a 64-bit Linux kernel yet (stopped in early boot?)")]
    NoKernelMapping(u64),
    #[error("reading the kernel's own symbol table and types from guest memory: {0}; pass --image with an image from build-repair-image --kernel /boot/vmlinuz-VERSION or --vmlinux PATH")]
    Symbols(#[from] symbols::Error),
    #[error("the running kernel's {0} was not found in its memory; pass --image with an image from build-repair-image")]
    Missing(&'static str),
    #[error("building the image from the guest's profile: {0}")]
    Build(#[from] builder::BuildError),
    #[error("the image cache {path}: {source}")]
    Cache {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// How an image was had, for the user and the benchmark.
#[derive(Clone, Debug, Default)]
pub struct AutoStats {
    /// Bytes of kernel image read from the guest.
    pub read_bytes: u64,
    pub read_time: Duration,
    /// Decoding kallsyms, BTF and building the image (zero when cached).
    pub build_time: Duration,
    /// The cached file used, if any.
    pub cached: Option<PathBuf>,
    /// Where the image was saved, if it was built and saved now.
    pub saved: Option<PathBuf>,
    pub release: String,
    pub build_id: String,
}

/// The running kernel's image as mapped: its run-time `_text` and bytes
/// from there on.
#[derive(Debug)]
pub struct LiveKernel {
    pub text: u64,
    pub bytes: Vec<u8>,
}

impl LiveKernel {
    /// The bytes at run-time addresses `[a, b)`.
    pub fn slice(&self, a: u64, b: u64) -> Option<&[u8]> {
        let s = usize::try_from(a.checked_sub(self.text)?).ok()?;
        let e = usize::try_from(b.checked_sub(self.text)?).ok()?;
        self.bytes.get(s..e)
    }
}

/// Reads the kernel image from the vCPU 0's page tables: from `_text` up
/// to the first unmapped 2 MiB or [`MAX_READ`].
pub fn read_kernel<G: GuestAccess + ?Sized>(guest: &mut G, ram_end: u64) -> Result<LiveKernel, AutoImageError> {
    let vcpu = *guest.vcpus()?.first().ok_or_else(|| AccessError::Other("the guest has no vCPUs".into()))?;
    let regs = guest.get_regs(vcpu)?;
    let paging = Paging::from_regs(regs.cr3, regs.cr4);
    let mem = GuestPhys::read_only(guest, ram_end);
    let text = (0..KERNEL_IMAGE_SIZE / CHUNK)
        .map(|i| START_KERNEL_MAP + i * CHUNK)
        .find(|&va| translate(&mem, paging, Gva(va)).is_ok())
        .ok_or(AutoImageError::NoKernelMapping(regs.cr3))?;
    let mut bytes = Vec::new();
    let mut va = text;
    while (bytes.len() as u64) < MAX_READ {
        let mut chunk = vec![0u8; CHUNK as usize];
        let n = read_virt(&mem, paging, va, &mut chunk);
        bytes.extend_from_slice(&chunk[..n]);
        if n < chunk.len() {
            break;
        }
        va += CHUNK;
    }
    Ok(LiveKernel { text, bytes })
}

/// The cache directory for images built from guests.
pub fn cache_dir() -> PathBuf {
    let base = match std::env::var_os("XDG_CACHE_HOME") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cache"),
    };
    base.join("crash-repair/images")
}

/// The build-id of the running kernel, from its notes
/// (`__start_notes..__stop_notes`).
fn build_id(kernel: &LiveKernel, ks: &Kallsyms) -> Option<String> {
    let (a, b) = (ks.address("__start_notes")?, ks.address("__stop_notes")?);
    kernel.slice(a, b).and_then(symbols::build_id_from_notes)
}

/// The repair image of the running kernel: from the cache when one of its
/// build is there, else built from its memory and saved to the cache
/// (`cache` = None: not cached).
pub fn image_from_guest<G: GuestAccess + ?Sized>(
    guest: &mut G,
    ram_end: u64,
    cache: Option<&Path>,
) -> Result<(RepairImage, AutoStats), AutoImageError> {
    let t = Instant::now();
    let kernel = read_kernel(guest, ram_end)?;
    let mut stats = AutoStats { read_bytes: kernel.bytes.len() as u64, read_time: t.elapsed(), ..Default::default() };
    let t = Instant::now();
    // The cache is looked up by every build-id note in the image (the
    // kernel's and the vDSO's), before decoding anything: only kernels'
    // build-ids name cached files, and the banner check at attach refuses
    // an image of another build all the same.
    for id in symbols::find_build_id_notes(&kernel.bytes, 16) {
        let Some(dir) = cache else { break };
        let path = dir.join(format!("{id}.img"));
        if let Ok(image) = RepairImage::read(&path) {
            if builder::image::hex(&image.kernel.build_id) == id {
                stats.cached = Some(path);
                stats.release = image.kernel.release.clone();
                stats.build_id = id;
                stats.build_time = t.elapsed();
                return Ok((image, stats));
            }
        }
    }
    let (profile, ks) = profile_from_live(&kernel)?;
    let mut profile = profile;
    if profile.build_id.is_empty() {
        return Err(AutoImageError::Missing("build-id note"));
    }
    // `layout_from_profile` reports any required item missing.
    profile.producer = format!("BTF and kallsyms of the running kernel ({} symbols)", ks.symbols.len());
    let path = Path::new("<guest memory>");
    let mut image = builder::image_for_profile(path, profile.clone(), &BuildOptions::default())?;
    image.snapshot_source = builder::SnapshotSource::LiveGuest;
    // Constants only the code has (TIF_SIGPENDING), from the running text.
    let read = |a: u64, n: usize| kernel.slice(a, a.checked_add(n as u64)?).map(<[u8]>::to_vec);
    let sym = |name: &str| ks.address(name);
    let _absent = builder::codefacts::fill_thread_flag_bits(&mut image.layout, &read, &sym);
    stats.release = image.kernel.release.clone();
    stats.build_id = profile.build_id.clone();
    stats.build_time = t.elapsed();
    if let Some(dir) = cache {
        let path = dir.join(format!("{}.img", profile.build_id));
        let io = |source| AutoImageError::Cache { path: path.clone(), source };
        std::fs::create_dir_all(dir).map_err(io)?;
        // Written aside and renamed: a reader never sees half a file.
        let tmp = dir.join(format!(".{}.{}.tmp", profile.build_id, std::process::id()));
        image.write(&tmp).map_err(|e| AutoImageError::Cache { path: tmp.clone(), source: std::io::Error::other(e) })?;
        std::fs::rename(&tmp, &path).map_err(io)?;
        stats.saved = Some(path);
    }
    Ok((image, stats))
}

/// The profile of the kernel in `kernel` (BTF + kallsyms), at link-time
/// addresses, and its kallsyms (run-time addresses).
pub fn profile_from_live(kernel: &LiveKernel) -> Result<(Profile, Kallsyms), AutoImageError> {
    let path = Path::new("<guest memory>");
    let ks = Kallsyms::find(&kernel.bytes, kernel.text)
        .map_err(|source| symbols::Error::Kallsyms { path: path.to_owned(), source })?;
    let run_text = ks.address("_text").unwrap_or(kernel.text);
    let slide = run_text.wrapping_sub(LINK_TEXT);
    let (a, b) = match (ks.address("__start_BTF"), ks.address("__stop_BTF")) {
        (Some(a), Some(b)) => (a, b),
        _ => return Err(AutoImageError::Missing("BTF (__start_BTF, __stop_BTF in kallsyms; CONFIG_DEBUG_INFO_BTF)")),
    };
    let btf = kernel.slice(a, b).ok_or(AutoImageError::Missing("BTF bytes (beyond what was read)"))?;
    let banner = ks
        .address("linux_banner")
        .and_then(|a| kernel.slice(a, a + 1024))
        .map(|d| {
            let end = d.iter().position(|&b| b == 0).unwrap_or(d.len());
            String::from_utf8_lossy(&d[..end]).into_owned()
        })
        .ok_or(AutoImageError::Missing("linux_banner"))?;
    let read = |a: u64, len: usize| kernel.slice(a, a.checked_add(len as u64)?).map(<[u8]>::to_vec);
    let src = symbols::BtfSources {
        btf,
        kallsyms: &ks,
        slide,
        build_id: build_id(kernel, &ks),
        banner,
        arch: "x86_64".into(),
        read: Some(&read),
    };
    let wanted = builder::wanted::wanted();
    let (profile, _missing) = wanted.with(|w| symbols::profile_from_btf(&src, path, w))?;
    Ok((profile, ks))
}

/// Frame names from the guest's own kallsyms, for an image whose profile
/// names the kallsyms tables (images built from BTF: `--kernel`, `auto`):
/// the tables' span is read from guest memory at the session's slide.
/// `None` when the profile has no tables or they do not decode.
pub fn kallsyms_symbolizer<M: PhysMem + ?Sized>(
    mem: &M,
    paging: Paging,
    profile_json: &str,
    slide: u64,
) -> Option<Symbolizer> {
    let p = Profile::from_json(profile_json).ok()?;
    let names = [
        "kallsyms_offsets",
        "kallsyms_num_syms",
        "kallsyms_names",
        "kallsyms_markers",
        "kallsyms_token_table",
        "kallsyms_token_index",
    ];
    let mut addrs: Vec<u64> = names.iter().map(|n| p.symbol(n)).collect::<Option<_>>()?;
    // Up to 6.14 a relative base; since 6.15 none (place-relative offsets).
    addrs.extend(p.symbol("kallsyms_relative_base").map(|a| a + 8));
    let mut count = [0u8; 4];
    if read_virt(mem, paging, p.symbol("kallsyms_num_syms")?.wrapping_add(slide), &mut count) != 4 {
        return None;
    }
    let n = u64::from(u32::from_le_bytes(count)).min(u64::from(symbols::kallsyms::MAX_SYMS));
    let start = *addrs.iter().min()?;
    let end = [p.symbol("kallsyms_token_index")? + 512, p.symbol("kallsyms_offsets")? + 4 * n]
        .into_iter()
        .chain(addrs.iter().copied())
        .max()?;
    let len = end.checked_sub(start).filter(|&l| l <= 64 << 20)? as usize;
    let mut buf = vec![0u8; len];
    let run = start.wrapping_add(slide);
    if read_virt(mem, paging, run, &mut buf) != len {
        return None;
    }
    let ks = Kallsyms::find(&buf, run).ok()?;
    Some(Symbolizer::from_kallsyms(&ks, slide))
}
