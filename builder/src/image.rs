//! The repair image: one file holding everything the loader needs to repair
//! one kernel build. The format is described in `builder/DESIGN.md`.
//!
//! ```text
//! offset  size  field
//! 0       8     magic "RPRIMAGE"
//! 8       4     format version (u32 LE) = FORMAT_VERSION
//! 12      4     header size (u32 LE) = 48
//! 16      32    SHA-256 of every byte from offset 48 to the end
//! 48      8     uncompressed payload size (u64 LE)
//! 56      ..    the payload, one zstd frame
//! ```
//!
//! The payload is a sequence of sections, each `tag: [u8; 4]`,
//! `len: u64 LE`, `len` bytes; unknown tags are skipped.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use repair_kernel::integrity::{hash_page, SkipSite};
use repair_kernel::layout::{KernelLayout, ITEM_COUNT};
use repair_kernel::mem::LinkAddr;
use sha2::{Digest, Sha256};

/// First bytes of every repair image.
pub const MAGIC: [u8; 8] = *b"RPRIMAGE";
/// Bumped on any incompatible change of the container or of a section.
pub const FORMAT_VERSION: u32 = 1;
/// Bytes before the compressed payload.
pub const HEADER_LEN: usize = 48;
/// Size of a snapshot page.
pub const PAGE_SIZE: usize = 4096;
/// zstd levels: images are built once and read often, so compress hard,
/// except for big payloads (pristine pages) where level 19 takes ~15 s for
/// a distribution kernel and level 9 a second, for a few percent.
const ZSTD_LEVEL: i32 = 19;
const ZSTD_LEVEL_BIG: i32 = 9;
const BIG_PAYLOAD: usize = 4 << 20;
/// Refuse payloads claiming more than this (a corrupt or hostile header).
const MAX_PAYLOAD: u64 = 4 << 30;

/// ELF segment flags (`p_flags`).
pub const PF_X: u32 = 1;
pub const PF_W: u32 = 2;
pub const PF_R: u32 = 4;

/// Why an image could not be read, written or used.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("not a repair image (bad magic); build one with build-repair-image --vmlinux PATH --output IMAGE")]
    NotAnImage,
    #[error("repair image is truncated ({len} bytes, the header alone is {HEADER_LEN}); copy it again or rebuild it")]
    Truncated { len: usize },
    #[error("repair image is corrupt (checksum mismatch); copy it again or rebuild it")]
    Corrupt,
    #[error("repair image has format version {found}, this build reads version {FORMAT_VERSION}; rebuild it with this build-repair-image")]
    Version { found: u32 },
    #[error("repair image is malformed: {0}; rebuild it with this build-repair-image")]
    Malformed(String),
    #[error("repair image's kernel layout has {found} items, this build has {ITEM_COUNT}; rebuild it with this build-repair-image")]
    LayoutItems { found: usize },
    #[error("image built for {image}, guest runs {guest}; rebuild with build-repair-image --vmlinux <the guest kernel's vmlinux> --output IMAGE")]
    WrongKernel { image: String, guest: String },
    #[error("repair kernel ELF: {0}")]
    Elf(String),
}

/// Which build of which kernel the image is for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelId {
    /// GNU build-id bytes (empty if the vmlinux had none).
    pub build_id: Vec<u8>,
    /// `linux_banner` (`Linux version 6.1.0-... \n`).
    pub banner: String,
    /// `uname -r` (`6.1.0-56-cloud-amd64`).
    pub release: String,
}

impl KernelId {
    /// The build-id as lower-case hex.
    pub fn build_id_hex(&self) -> String {
        hex(&self.build_id)
    }
}

/// Where the snapshot of kernel text and read-only data came from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SnapshotSource {
    /// The bytes of the vmlinux file: before boot-time patching (alternatives,
    /// jump labels, ftrace), so run-time patch sites differ.
    #[default]
    VmlinuxFile,
    /// Pages read from the healthy running guest.
    LiveGuest,
}

impl SnapshotSource {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::VmlinuxFile => "vmlinux file",
            Self::LiveGuest => "live guest",
        }
    }
    fn code(self) -> u32 {
        match self {
            Self::VmlinuxFile => 0,
            Self::LiveGuest => 1,
        }
    }
    fn from_code(c: u32) -> Result<Self, ImageError> {
        match c {
            0 => Ok(Self::VmlinuxFile),
            1 => Ok(Self::LiveGuest),
            _ => Err(ImageError::Malformed(format!("unknown snapshot source {c}"))),
        }
    }
}

/// One `PT_LOAD` segment of the repair kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Virtual address (page-aligned) in the repair kernel's window.
    pub vaddr: u64,
    /// Size in memory; bytes past `data.len()` are zero (`.bss`, the stack).
    pub memsz: u64,
    /// `PF_R | PF_W | PF_X`.
    pub flags: u32,
    /// The file bytes.
    pub data: Vec<u8>,
}

/// The bare-metal repair kernel as the loader needs it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Unikernel {
    /// Fixed virtual base the ELF was linked at.
    pub link_base: u64,
    /// `_start`.
    pub entry: u64,
    /// `repair_done`: the completion point (a `hlt` loop) for a breakpoint.
    pub done: u64,
    /// Initial `rsp` (`__repair_stack_top`, inside the last segment's memsz).
    pub stack_top: u64,
    pub segments: Vec<Segment>,
}

impl Unikernel {
    /// Bytes of code and data carried (file bytes of all segments).
    pub fn file_size(&self) -> u64 {
        self.segments.iter().map(|s| s.data.len() as u64).sum()
    }
    /// Bytes occupied once loaded (including `.bss` and the stack).
    pub fn mem_size(&self) -> u64 {
        self.segments.iter().map(|s| s.memsz).sum()
    }
    /// First address past the highest segment.
    pub fn end(&self) -> u64 {
        self.segments.iter().map(|s| s.vaddr + s.memsz).max().unwrap_or(self.link_base)
    }
}

/// A repair image in memory. `Default` is an image of no kernel, with no
/// repair kernel (tests set the fields they need).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RepairImage {
    pub kernel: KernelId,
    /// The `symbols` profile as JSON (host side: reports, diagnosis).
    pub profile_json: String,
    /// The numbers the repair kernel works from (goes into `ContractIn`).
    pub layout: KernelLayout,
    pub unikernel: Unikernel,
    pub snapshot_source: SnapshotSource,
    /// Run-time patch sites of kernel text (jump labels, ftrace, ...),
    /// sorted by address: zeroed before hashing, on both sides.
    pub skips: Vec<SkipSite>,
    /// SHA-256 of each 4 KiB page of kernel text and read-only data with
    /// the skip sites zeroed ([`hash_page`]), by page-aligned link-time
    /// address.
    pub page_hashes: BTreeMap<u64, [u8; 32]>,
    /// Healthy copies of those pages, when the image carries them.
    pub pristine: BTreeMap<u64, Box<[u8; PAGE_SIZE]>>,
}

/// Sizes of an image file, for `inspect`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FileInfo {
    /// The whole file.
    pub file_len: u64,
    /// The payload before compression.
    pub payload_len: u64,
}

/// Section tags of the payload.
const TAG_KERNEL: [u8; 4] = *b"KERN";
const TAG_PROFILE: [u8; 4] = *b"PROF";
const TAG_LAYOUT: [u8; 4] = *b"LAYT";
const TAG_UNIKERNEL: [u8; 4] = *b"UNIK";
const TAG_HASHES: [u8; 4] = *b"HASH";
const TAG_PRISTINE: [u8; 4] = *b"PRIS";
const TAG_SKIPS: [u8; 4] = *b"SKIP";

impl RepairImage {
    /// Writes the image to `path` (through a temporary file and a rename, so
    /// a reader never sees half an image).
    pub fn write(&self, path: &Path) -> Result<(), ImageError> {
        let bytes = self.to_bytes()?;
        let err = |source| ImageError::Write { path: path.to_owned(), source };
        // A temporary name of this writer's own, so that concurrent writers
        // of the same image (parallel tests) each rename a whole file.
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = path.with_extension(format!("tmp-{}-{n}", std::process::id()));
        let mut f = std::fs::File::create(&tmp).map_err(err)?;
        f.write_all(&bytes).map_err(err)?;
        f.sync_all().map_err(err)?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(err)
    }

    /// Reads and verifies an image file.
    pub fn read(path: &Path) -> Result<RepairImage, ImageError> {
        Self::read_with_info(path).map(|(i, _)| i)
    }

    /// [`RepairImage::read`], also returning the file's sizes.
    pub fn read_with_info(path: &Path) -> Result<(RepairImage, FileInfo), ImageError> {
        let bytes = std::fs::read(path)
            .map_err(|source| ImageError::Read { path: path.to_owned(), source })?;
        Self::from_bytes_with_info(&bytes)
    }

    /// The image file's bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>, ImageError> {
        let payload = self.encode_payload();
        let level = if payload.len() > BIG_PAYLOAD { ZSTD_LEVEL_BIG } else { ZSTD_LEVEL };
        let compressed = zstd::bulk::compress(&payload, level)
            .map_err(|e| ImageError::Malformed(format!("zstd compression failed: {e}")))?;
        let mut out = Vec::with_capacity(HEADER_LEN + compressed.len());
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&(HEADER_LEN as u32).to_le_bytes());
        out.extend_from_slice(&[0; 32]);
        out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        out.extend_from_slice(&compressed);
        let sum = Sha256::digest(&out[HEADER_LEN..]);
        out[16..48].copy_from_slice(&sum);
        Ok(out)
    }

    /// Parses and verifies an image from its bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<RepairImage, ImageError> {
        Self::from_bytes_with_info(bytes).map(|(i, _)| i)
    }

    fn from_bytes_with_info(bytes: &[u8]) -> Result<(RepairImage, FileInfo), ImageError> {
        if bytes.len() < MAGIC.len() || bytes[..MAGIC.len()] != MAGIC {
            return Err(ImageError::NotAnImage);
        }
        if bytes.len() < HEADER_LEN + 8 {
            return Err(ImageError::Truncated { len: bytes.len() });
        }
        let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
        if version != FORMAT_VERSION {
            return Err(ImageError::Version { found: version });
        }
        let header_len = u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes"));
        if header_len as usize != HEADER_LEN {
            return Err(ImageError::Malformed(format!("header size {header_len}")));
        }
        if Sha256::digest(&bytes[HEADER_LEN..])[..] != bytes[16..48] {
            return Err(ImageError::Corrupt);
        }
        let payload_len = u64::from_le_bytes(bytes[48..56].try_into().expect("8 bytes"));
        if payload_len > MAX_PAYLOAD {
            return Err(ImageError::Malformed(format!("payload size {payload_len}")));
        }
        let payload = zstd::bulk::decompress(&bytes[HEADER_LEN + 8..], payload_len as usize)
            .map_err(|e| ImageError::Malformed(format!("zstd: {e}")))?;
        if payload.len() as u64 != payload_len {
            return Err(ImageError::Malformed(format!(
                "payload is {} bytes, header says {payload_len}",
                payload.len()
            )));
        }
        let image = Self::decode_payload(&payload)?;
        Ok((image, FileInfo { file_len: bytes.len() as u64, payload_len }))
    }

    /// Refuses a guest whose kernel is not the one the image was built for.
    /// `build_id` is the guest's GNU build-id where known (`None` skips that
    /// check); `banner` is its `linux_banner` as read from guest memory.
    pub fn check_kernel(&self, build_id: Option<&[u8]>, banner: &str) -> Result<(), ImageError> {
        let id_differs = match build_id {
            Some(id) => !self.kernel.build_id.is_empty() && id != self.kernel.build_id.as_slice(),
            None => false,
        };
        let norm = |s: &str| s.trim_end_matches(['\0', '\n', ' ']).to_owned();
        let banner_differs = norm(banner) != norm(&self.kernel.banner);
        if !id_differs && !banner_differs {
            return Ok(());
        }
        let describe = |release: &str, id: Option<&[u8]>| {
            let mut s = release.to_owned();
            if let Some(id) = id {
                let _ = write!(s, " (build-id {})", hex(id));
            }
            s
        };
        let guest_release = release_from_banner(banner).unwrap_or_else(|| norm(banner));
        Err(ImageError::WrongKernel {
            image: describe(&self.kernel.release, Some(&self.kernel.build_id)),
            guest: describe(&guest_release, build_id),
        })
    }

    /// Replaces the snapshot with pages read from the healthy live guest:
    /// `(page-aligned link-time address, page bytes)`. With `keep_pristine`
    /// the pages themselves are kept too, so the repair kernel can restore
    /// corrupted ones. Hashes skip the image's [`Self::skips`], so set those
    /// first (the vmlinux build does).
    pub fn set_snapshot(
        &mut self,
        pages: impl Iterator<Item = (u64, [u8; PAGE_SIZE])>,
        keep_pristine: bool,
    ) {
        self.set_snapshot_from(pages, keep_pristine, SnapshotSource::LiveGuest);
    }

    pub(crate) fn set_snapshot_from(
        &mut self,
        pages: impl Iterator<Item = (u64, [u8; PAGE_SIZE])>,
        keep_pristine: bool,
        source: SnapshotSource,
    ) {
        self.page_hashes.clear();
        self.pristine.clear();
        self.snapshot_source = source;
        for (gva, page) in pages {
            let mut masked = page;
            self.page_hashes.insert(gva, hash_page(LinkAddr(gva), &mut masked, &self.skips));
            if keep_pristine {
                self.pristine.insert(gva, Box::new(page));
            }
        }
    }

    fn encode_payload(&self) -> Vec<u8> {
        let mut p = Enc::default();

        let mut s = Enc::default();
        s.bytes(&self.kernel.build_id);
        s.bytes(self.kernel.banner.as_bytes());
        s.bytes(self.kernel.release.as_bytes());
        s.u32(self.snapshot_source.code());
        p.section(TAG_KERNEL, &s.0);

        p.section(TAG_PROFILE, self.profile_json.as_bytes());

        let mut s = Enc::default();
        s.u32(ITEM_COUNT as u32);
        for v in self.layout.values {
            s.u64(v);
        }
        p.section(TAG_LAYOUT, &s.0);

        let u = &self.unikernel;
        let mut s = Enc::default();
        for v in [u.link_base, u.entry, u.done, u.stack_top] {
            s.u64(v);
        }
        s.u32(u.segments.len() as u32);
        for seg in &u.segments {
            s.u64(seg.vaddr);
            s.u64(seg.memsz);
            s.u32(seg.flags);
            s.bytes(&seg.data);
        }
        p.section(TAG_UNIKERNEL, &s.0);

        let mut s = Enc::default();
        s.u64(self.page_hashes.len() as u64);
        for (gva, h) in &self.page_hashes {
            s.u64(*gva);
            s.0.extend_from_slice(h);
        }
        p.section(TAG_HASHES, &s.0);

        let mut s = Enc::default();
        s.u64(self.skips.len() as u64);
        for k in &self.skips {
            s.u64(k.addr);
            s.u32(k.len);
            s.u32(k.kind);
        }
        p.section(TAG_SKIPS, &s.0);

        if !self.pristine.is_empty() {
            let mut s = Enc::default();
            s.u64(self.pristine.len() as u64);
            for (gva, page) in &self.pristine {
                s.u64(*gva);
                s.0.extend_from_slice(&page[..]);
            }
            p.section(TAG_PRISTINE, &s.0);
        }
        p.0
    }

    fn decode_payload(payload: &[u8]) -> Result<RepairImage, ImageError> {
        let mut d = Dec::new(payload);
        let mut sections: BTreeMap<[u8; 4], &[u8]> = BTreeMap::new();
        while !d.done() {
            let tag: [u8; 4] = d.take(4)?.try_into().expect("4 bytes");
            let len = d.u64()?;
            let body = d.take(usize::try_from(len).map_err(|_| malformed("section length"))?)?;
            sections.insert(tag, body);
        }
        let section = |tag: [u8; 4]| {
            sections.get(&tag).copied().ok_or_else(|| {
                malformed(&format!("section {} missing", String::from_utf8_lossy(&tag)))
            })
        };

        let mut d = Dec::new(section(TAG_KERNEL)?);
        let kernel = KernelId {
            build_id: d.bytes()?.to_vec(),
            banner: d.string()?,
            release: d.string()?,
        };
        let snapshot_source = SnapshotSource::from_code(d.u32()?)?;

        let profile_json = String::from_utf8(section(TAG_PROFILE)?.to_vec())
            .map_err(|_| malformed("profile is not UTF-8"))?;

        let mut d = Dec::new(section(TAG_LAYOUT)?);
        let n = d.u32()? as usize;
        if n != ITEM_COUNT {
            return Err(ImageError::LayoutItems { found: n });
        }
        let mut layout = KernelLayout::default();
        for v in layout.values.iter_mut() {
            *v = d.u64()?;
        }

        let mut d = Dec::new(section(TAG_UNIKERNEL)?);
        let mut unikernel = Unikernel {
            link_base: d.u64()?,
            entry: d.u64()?,
            done: d.u64()?,
            stack_top: d.u64()?,
            segments: Vec::new(),
        };
        let nseg = d.u32()?;
        for _ in 0..nseg {
            let vaddr = d.u64()?;
            let memsz = d.u64()?;
            let flags = d.u32()?;
            let data = d.bytes()?.to_vec();
            if data.len() as u64 > memsz {
                return Err(malformed("segment file size exceeds its memory size"));
            }
            unikernel.segments.push(Segment { vaddr, memsz, flags, data });
        }

        let mut d = Dec::new(section(TAG_HASHES)?);
        let n = d.u64()?;
        let mut page_hashes = BTreeMap::new();
        for _ in 0..n {
            let gva = d.u64()?;
            let h: [u8; 32] = d.take(32)?.try_into().expect("32 bytes");
            page_hashes.insert(gva, h);
        }

        let mut d = Dec::new(section(TAG_SKIPS)?);
        let n = d.u64()?;
        let mut skips = Vec::new();
        for _ in 0..n {
            skips.push(SkipSite { addr: d.u64()?, len: d.u32()?, kind: d.u32()? });
        }
        if !skips.is_sorted_by_key(|s| s.addr) {
            return Err(malformed("skip sites are not sorted"));
        }

        let mut pristine = BTreeMap::new();
        if let Some(body) = sections.get(&TAG_PRISTINE) {
            let mut d = Dec::new(body);
            let n = d.u64()?;
            for _ in 0..n {
                let gva = d.u64()?;
                let page: [u8; PAGE_SIZE] = d.take(PAGE_SIZE)?.try_into().expect("a page");
                pristine.insert(gva, Box::new(page));
            }
        }

        Ok(RepairImage {
            kernel,
            profile_json,
            layout,
            unikernel,
            snapshot_source,
            skips,
            page_hashes,
            pristine,
        })
    }
}

/// `6.1.0-56-cloud-amd64` from `Linux version 6.1.0-56-cloud-amd64 (...`.
pub fn release_from_banner(banner: &str) -> Option<String> {
    banner.strip_prefix("Linux version ")?.split_whitespace().next().map(str::to_owned)
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Bytes from lower-case or upper-case hex; `None` if not hex.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    let s = s.trim();
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

fn malformed(what: &str) -> ImageError {
    ImageError::Malformed(what.to_owned())
}

/// Little-endian encoder.
#[derive(Default)]
struct Enc(Vec<u8>);

impl Enc {
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    /// Length-prefixed (u64) bytes.
    fn bytes(&mut self, b: &[u8]) {
        self.u64(b.len() as u64);
        self.0.extend_from_slice(b);
    }
    fn section(&mut self, tag: [u8; 4], body: &[u8]) {
        self.0.extend_from_slice(&tag);
        self.bytes(body);
    }
}

/// Bounds-checked little-endian decoder.
struct Dec<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Dec<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }
    fn done(&self) -> bool {
        self.pos >= self.buf.len()
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], ImageError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        let end = end.ok_or_else(|| malformed("a section ends early"))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u32(&mut self) -> Result<u32, ImageError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Result<u64, ImageError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    fn bytes(&mut self) -> Result<&'a [u8], ImageError> {
        let n = self.u64()?;
        self.take(usize::try_from(n).map_err(|_| malformed("length"))?)
    }
    fn string(&mut self) -> Result<String, ImageError> {
        String::from_utf8(self.bytes()?.to_vec()).map_err(|_| malformed("text is not UTF-8"))
    }
}
