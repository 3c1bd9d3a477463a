//! Where the guest kit lives and what is in it (see `scripts/guest-kit`).

use crate::{Error, Result};
use std::path::PathBuf;

/// The kernels of the kit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// Debian's stock `linux-image-6.1.0-N-cloud-amd64`.
    Debian,
    /// 6.1 from `linux-source-6.1` with LKDTM (`guest/lkdtm.config`).
    Lkdtm,
    /// The LKDTM kernel hardened: structure layout randomization
    /// (`RANDSTRUCT_FULL`, GCC plugin) and full `PREEMPT`
    /// (`guest/lkdtm.config` + `guest/randstruct.config`).
    Randstruct,
    /// 6.12 from `linux-source-6.12` with LKDTM and the hardening, debug and
    /// preemption options of Debian's 6.12 cloud config
    /// (`guest/lkdtm.config` + `guest/lkdtm-6.12.config`).
    Lkdtm612,
    /// Debian's stock cloud kernel of one series of the kernel matrix
    /// (`scripts/kit-matrix`: `$kit/matrix/<series>/`), with the kit's
    /// busybox initramfs.
    Matrix(Series),
}

/// A series of the kit's kernel matrix: Debian's stock `cloud-amd64` kernel
/// and its `-dbg` vmlinux, pinned in `scripts/kit-matrix`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Series {
    /// Debian 11 bullseye, `linux-image-5.10.0-N-cloud-amd64`.
    V5_10,
    /// Debian 12 bookworm, `linux-image-6.1.0-N-cloud-amd64` (the same
    /// kernel as [`Kernel::Debian`]).
    V6_1,
    /// Debian 13 trixie, `linux-image-6.12.N+deb13-cloud-amd64`.
    V6_12,
    /// Debian sid, `linux-image-7.N.M+deb14-cloud-amd64`.
    V7,
    /// Debian 13 trixie's `PREEMPT_RT` kernel,
    /// `linux-image-6.12.N+deb13-rt-amd64` (not in [`Series::ALL`]: a drift
    /// of the verdict, not a series of the matrix).
    V6_12Rt,
}

impl Series {
    /// Every series, oldest first.
    pub const ALL: [Series; 4] = [Series::V5_10, Series::V6_1, Series::V6_12, Series::V7];

    /// The directory under `$kit/matrix/`: `5.10`, `6.1`, `6.12`, `7`.
    pub fn dir_name(self) -> &'static str {
        match self {
            Series::V5_10 => "5.10",
            Series::V6_1 => "6.1",
            Series::V6_12 => "6.12",
            Series::V7 => "7",
            Series::V6_12Rt => "6.12-rt",
        }
    }
}

impl std::fmt::Display for Series {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.dir_name())
    }
}

impl Kernel {
    /// Every kernel of the kit, for tests that run over all of them.
    pub const ALL: [Kernel; 3] = [Kernel::Debian, Kernel::Lkdtm, Kernel::Randstruct];

    /// The kernel's directory inside the kit.
    pub fn dir_name(self) -> String {
        match self {
            Kernel::Debian => "debian".into(),
            Kernel::Lkdtm => "lkdtm".into(),
            Kernel::Randstruct => "randstruct".into(),
            Kernel::Lkdtm612 => "lkdtm-6.12".into(),
            Kernel::Matrix(s) => format!("matrix/{}", s.dir_name()),
        }
    }

    /// The kernels of the matrix, oldest first.
    pub fn matrix() -> [Kernel; 4] {
        Series::ALL.map(Kernel::Matrix)
    }

    /// Whether the kernel has LKDTM (`/sys/kernel/debug/provoke-crash`).
    pub fn has_lkdtm(self) -> bool {
        matches!(self, Kernel::Lkdtm | Kernel::Randstruct | Kernel::Lkdtm612)
    }
}

/// The kit directory: `$CRASH_REPAIR_KIT`, else
/// `${XDG_CACHE_HOME:-~/.cache}/crash-repair/kit`.
#[derive(Clone, Debug)]
pub struct Kit {
    pub dir: PathBuf,
}

impl Kit {
    pub fn locate() -> Result<Kit> {
        let dir = if let Some(d) = std::env::var_os("CRASH_REPAIR_KIT") {
            PathBuf::from(d)
        } else {
            let cache = std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
                .unwrap_or_else(|| PathBuf::from("/tmp"));
            cache.join("crash-repair").join("kit")
        };
        Ok(Kit { dir })
    }

    fn file(&self, rel: &str) -> Result<PathBuf> {
        let p = self.dir.join(rel);
        if p.is_file() {
            Ok(p)
        } else {
            Err(Error::KitMissing(p))
        }
    }

    /// The bootable image and the debug vmlinux of a kernel.
    pub fn kernel(&self, k: Kernel) -> Result<(PathBuf, PathBuf)> {
        let boot = match k {
            Kernel::Debian | Kernel::Matrix(_) => format!("{}/vmlinuz", k.dir_name()),
            Kernel::Lkdtm | Kernel::Randstruct | Kernel::Lkdtm612 => format!("{}/bzImage", k.dir_name()),
        };
        Ok((self.file(&boot)?, self.vmlinux(k)?))
    }

    /// The debug vmlinux (ELF + DWARF) of a kernel.
    pub fn vmlinux(&self, k: Kernel) -> Result<PathBuf> {
        self.file(&format!("{}/vmlinux", k.dir_name()))
    }

    /// The System.map of a kernel.
    pub fn system_map(&self, k: Kernel) -> Result<PathBuf> {
        self.file(&format!("{}/System.map", k.dir_name()))
    }

    /// A link-time symbol address from the kernel's System.map; `None` when
    /// the map does not name it.
    pub fn symbol(&self, k: Kernel, name: &str) -> Result<Option<u64>> {
        let text = std::fs::read_to_string(self.system_map(k)?)?;
        Ok(text.lines().find_map(|l| {
            let mut it = l.split_whitespace();
            let (a, _, n) = (it.next()?, it.next()?, it.next()?);
            (n == name).then(|| u64::from_str_radix(a, 16).ok()).flatten()
        }))
    }

    /// The kernel's `.config`.
    pub fn config(&self, k: Kernel) -> Result<PathBuf> {
        self.file(&format!("{}/config", k.dir_name()))
    }

    pub fn initramfs(&self) -> Result<PathBuf> {
        self.file("initramfs.cpio.gz")
    }

    /// The Debian 13 systemd root filesystem of `scripts/kit-distro`, booted
    /// as an initramfs ([`crate::GuestConfig::distro`]).
    pub fn distro_initramfs(&self) -> Result<PathBuf> {
        self.file("distro/rootfs.cpio.gz")
    }
}
