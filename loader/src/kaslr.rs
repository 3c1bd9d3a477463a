//! KASLR: where the running kernel's text is, relative to its link address.
//!
//! The kernel maps its image in the 1 GiB at `__START_KERNEL_map`
//! (0xffffffff80000000) with 2 MiB pages, and `cleanup_highmap` clears every
//! entry below `_text`. So the first present 2 MiB page there is `_text` at run
//! time; the slide is its distance from the link-time `_text`. The guess is
//! confirmed by reading `linux_banner` at its slid address: only the right
//! slide and the right kernel build give the image's banner there. If the
//! page-table guess fails (an unusual layout), every 2 MiB slide in the range
//! is tried against the banner.

use repair_kernel::arch::x86_64::pgtable::{translate, Paging};
use repair_kernel::layout::{Item, KernelLayout};
use repair_kernel::mem::{Gva, PhysMem};

/// Start of the kernel image mapping (`__START_KERNEL_map`).
pub const START_KERNEL_MAP: u64 = 0xffff_ffff_8000_0000;
/// Size of the kernel image mapping (`KERNEL_IMAGE_SIZE`, 1 GiB with KASLR).
pub const KERNEL_IMAGE_SIZE: u64 = 1 << 30;
const PMD_SIZE: u64 = 2 << 20;

#[derive(Debug, thiserror::Error)]
pub enum KaslrError {
    #[error("the layout lacks {0:?}; rebuild the image with build-repair-image")]
    MissingSymbol(Item),
    #[error("nothing is mapped in the kernel image range through CR3 {cr3:#x}: the vCPU is not running a 64-bit Linux kernel's page tables (was it stopped during early boot?)")]
    NothingMapped { cr3: u64 },
    #[error("the running kernel is not the image's build: at linux_banner the guest has {found:?}, the image was built for {expected:?}; rebuild the image from this guest's vmlinux (build-repair-image --vmlinux PATH)")]
    BannerMismatch { expected: String, found: String },
}

/// The slide and how it was confirmed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slide {
    /// Run-time minus link-time address (wrapping).
    pub slide: u64,
    /// True when the page tables gave it directly; false when it took the
    /// banner scan.
    pub from_page_tables: bool,
}

impl Slide {
    /// The run-time address of a link-time (vmlinux) address.
    pub fn run_addr(&self, link: u64) -> Gva {
        Gva(link.wrapping_add(self.slide))
    }

    /// The link-time (vmlinux) address of a run-time one, for `addr2line`.
    pub fn link_addr(&self, run: Gva) -> u64 {
        run.0.wrapping_sub(self.slide)
    }
}

impl std::fmt::LowerHex for Slide {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::LowerHex::fmt(&self.slide, f)
    }
}

/// Reads up to `buf.len()` bytes of kernel virtual memory; stops at the first
/// unmapped byte. Returns how many bytes were read.
pub(crate) fn read_virt<M: PhysMem + ?Sized>(mem: &M, paging: Paging, va: u64, buf: &mut [u8]) -> usize {
    let mut done = 0;
    while done < buf.len() {
        let Ok(t) = translate(mem, paging, Gva(va.wrapping_add(done as u64))) else { break };
        let n = (t.bytes_left_in_page() as usize).min(buf.len() - done);
        if mem.read_phys(t.gpa, &mut buf[done..done + n]).is_err() {
            break;
        }
        done += n;
    }
    done
}

/// The banner string at `va`, up to its NUL or 256 bytes.
fn banner_at<M: PhysMem + ?Sized>(mem: &M, paging: Paging, va: u64) -> String {
    let mut buf = [0u8; 256];
    let n = read_virt(mem, paging, va, &mut buf);
    let end = buf[..n].iter().position(|&b| b == 0).unwrap_or(n);
    String::from_utf8_lossy(&buf[..end]).trim_end().to_string()
}

fn banners_match(found: &str, expected: &str) -> bool {
    !expected.is_empty() && found.trim_end() == expected.trim_end()
}

/// Finds the KASLR slide of the kernel running under `paging` and checks
/// that it is the build the layout and banner come from.
pub fn find_slide<M: PhysMem + ?Sized>(
    mem: &M,
    paging: Paging,
    layout: &KernelLayout,
    banner: &str,
) -> Result<Slide, KaslrError> {
    let text = layout.get(Item::SymStartText).ok_or(KaslrError::MissingSymbol(Item::SymStartText))?;
    let banner_sym = layout.get(Item::SymLinuxBanner).ok_or(KaslrError::MissingSymbol(Item::SymLinuxBanner))?;

    let first_mapped = (0..KERNEL_IMAGE_SIZE / PMD_SIZE)
        .map(|i| START_KERNEL_MAP + i * PMD_SIZE)
        .find(|&va| translate(mem, paging, Gva(va)).is_ok());
    let Some(first) = first_mapped else {
        return Err(KaslrError::NothingMapped { cr3: paging.root.0 });
    };
    let guess = first.wrapping_sub(text);
    let found = banner_at(mem, paging, banner_sym.wrapping_add(guess));
    if banners_match(&found, banner) {
        return Ok(Slide { slide: guess, from_page_tables: true });
    }
    // Fall back: every 2 MiB-aligned slide that keeps _text in the range.
    for i in 0..KERNEL_IMAGE_SIZE / PMD_SIZE {
        let slide = (START_KERNEL_MAP + i * PMD_SIZE).wrapping_sub(text);
        if banners_match(&banner_at(mem, paging, banner_sym.wrapping_add(slide)), banner) {
            return Ok(Slide { slide, from_page_tables: false });
        }
    }
    Err(KaslrError::BannerMismatch { expected: banner.to_string(), found: guess_banner(mem, paging, first, &found) })
}

/// For the mismatch message: the guest's own banner if it can be found near
/// its text ("Linux version ..." in the first 64 MiB of the image), else what
/// was read at the image's `linux_banner`.
fn guess_banner<M: PhysMem + ?Sized>(mem: &M, paging: Paging, first: u64, fallback: &str) -> String {
    const NEEDLE: &[u8] = b"Linux version ";
    let mut page = [0u8; 4096];
    for off in (0..64u64 << 20).step_by(4096) {
        let n = read_virt(mem, paging, first + off, &mut page);
        if n < NEEDLE.len() {
            continue;
        }
        if let Some(pos) = page[..n].windows(NEEDLE.len()).position(|w| w == NEEDLE) {
            let s = banner_at(mem, paging, first + off + pos as u64);
            if s.contains('#') {
                return s;
            }
        }
    }
    fallback.to_string()
}
