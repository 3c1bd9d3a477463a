//! The ELF inside a bzImage (`/boot/vmlinuz-*`).
//!
//! An x86 bzImage is the real-mode setup (`setup_sects` sectors after the
//! boot sector), then the protected-mode decompressor whose payload, at
//! `payload_offset` for `payload_length` bytes (boot protocol 2.08+, setup
//! header fields at 0x248 and 0x24c), is the kernel's `vmlinux.bin`
//! compressed: the vmlinux with its symbols stripped (`objcopy -R .comment
//! -S`: section headers, notes and `.BTF` stay) followed by its relocations.
//! The kernel appends the uncompressed length as a 32-bit word after the
//! compressed stream (`size_append`).
//!
//! Debian compresses its kernels with LZ4 (6.1), zstd or xz; gzip is the
//! kernel's default. Each goes through its field's crate (`flate2`,
//! `liblzma`, `zstd`, `lz4_flex`); the output is bounded by
//! [`MAX_OUTPUT`], so a corrupt or hostile file gives an error, not an
//! exhausted host.

use std::io::Read;

/// The largest decompressed kernel accepted (Debian's 6.12 ELF: 57 MB).
pub const MAX_OUTPUT: u64 = 512 << 20;

/// The kernel's legacy LZ4 frame: magic, then blocks of at most 8 MiB,
/// each preceded by its compressed length.
const LZ4_LEGACY_MAGIC: [u8; 4] = [0x02, 0x21, 0x4c, 0x18];
const LZ4_LEGACY_BLOCK: usize = 8 << 20;

/// How a payload is compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    Gzip,
    Xz,
    Zstd,
    Lz4,
    Lzma,
    Bzip2,
    Lzo,
    /// Not compressed: the file is the ELF itself.
    None,
}

impl Compression {
    /// From the first bytes of a payload.
    pub fn sniff(data: &[u8]) -> Option<Compression> {
        Some(match data {
            [0x1f, 0x8b, ..] => Compression::Gzip,
            [0xfd, b'7', b'z', b'X', b'Z', 0x00, ..] => Compression::Xz,
            [0x28, 0xb5, 0x2f, 0xfd, ..] => Compression::Zstd,
            [0x02, 0x21, 0x4c, 0x18, ..] => Compression::Lz4,
            [0x5d, 0x00, ..] => Compression::Lzma,
            [b'B', b'Z', b'h', ..] => Compression::Bzip2,
            [0x89, b'L', b'Z', b'O', ..] => Compression::Lzo,
            [0x7f, b'E', b'L', b'F', ..] => Compression::None,
            _ => return None,
        })
    }
}

/// Why no ELF came out of a vmlinuz.
#[derive(Debug, thiserror::Error)]
pub enum VmlinuzError {
    #[error("not an x86 bzImage (no \"HdrS\" setup header at 0x202) and not an ELF; pass /boot/vmlinuz-VERSION or a vmlinux")]
    NotBzImage,
    #[error("boot protocol {0:#x} is older than 2.08 and names no payload; this kernel is too old")]
    OldProtocol(u16),
    #[error("the setup header's payload ({offset:#x}+{len:#x}) lies outside the {file_len}-byte file: truncated?")]
    PayloadOutside { offset: u64, len: u64, file_len: usize },
    #[error("the payload's compression is not recognised (first bytes {0})")]
    UnknownCompression(String),
    #[error("{0:?}-compressed kernels are not supported (gzip, xz, zstd and LZ4 are)")]
    Unsupported(Compression),
    #[error("{kind:?} payload is corrupt: {msg}")]
    Corrupt { kind: Compression, msg: String },
    #[error("the payload decompresses to more than {} MiB; not a kernel", MAX_OUTPUT >> 20)]
    TooLarge,
    #[error("the payload decompressed ({0:?}) but is not an ELF: not a Linux x86 kernel?")]
    NotElf(Compression),
}

/// The decompressed kernel ELF of a bzImage (or the file itself when it
/// is already an ELF), and how it was compressed.
pub fn decompress(file: &[u8]) -> Result<(Vec<u8>, Compression), VmlinuzError> {
    if file.starts_with(b"\x7fELF") {
        return Ok((file.to_vec(), Compression::None));
    }
    let payload = payload(file)?;
    let kind = Compression::sniff(payload).ok_or_else(|| {
        let head: String = payload.iter().take(8).map(|b| format!("{b:02x}")).collect();
        VmlinuzError::UnknownCompression(head)
    })?;
    let out = decompress_payload(payload, kind)?;
    if !out.starts_with(b"\x7fELF") {
        return Err(VmlinuzError::NotElf(kind));
    }
    Ok((out, kind))
}

/// The compressed payload of a bzImage.
pub fn payload(file: &[u8]) -> Result<&[u8], VmlinuzError> {
    if file.get(0x202..0x206) != Some(b"HdrS") {
        return Err(VmlinuzError::NotBzImage);
    }
    let u16_at = |o: usize| file.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| {
        file.get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let version = u16_at(0x206).ok_or(VmlinuzError::NotBzImage)?;
    if version < 0x208 {
        return Err(VmlinuzError::OldProtocol(version));
    }
    let sects = match file[0x1f1] {
        0 => 4,
        n => u64::from(n),
    };
    let (Some(off), Some(len)) = (u32_at(0x248), u32_at(0x24c)) else {
        return Err(VmlinuzError::NotBzImage);
    };
    let start = (sects + 1) * 512 + u64::from(off);
    let end = start + u64::from(len);
    let outside = || VmlinuzError::PayloadOutside {
        offset: start,
        len: u64::from(len),
        file_len: file.len(),
    };
    let s = usize::try_from(start).map_err(|_| outside())?;
    let e = usize::try_from(end).map_err(|_| outside())?;
    file.get(s..e).ok_or_else(outside)
}

/// Decompresses one payload, at most [`MAX_OUTPUT`] bytes.
pub fn decompress_payload(payload: &[u8], kind: Compression) -> Result<Vec<u8>, VmlinuzError> {
    let corrupt = |e: std::io::Error| VmlinuzError::Corrupt { kind, msg: e.to_string() };
    let mut out = Vec::new();
    let read_all = |r: &mut dyn Read, out: &mut Vec<u8>| -> Result<(), VmlinuzError> {
        r.take(MAX_OUTPUT + 1).read_to_end(out).map_err(corrupt)?;
        if out.len() as u64 > MAX_OUTPUT {
            return Err(VmlinuzError::TooLarge);
        }
        Ok(())
    };
    match kind {
        Compression::None => out.extend_from_slice(payload),
        Compression::Gzip => read_all(&mut flate2::read::GzDecoder::new(payload), &mut out)?,
        Compression::Xz => read_all(&mut liblzma::read::XzDecoder::new(payload), &mut out)?,
        Compression::Zstd => {
            let mut d = zstd::stream::read::Decoder::with_buffer(payload).map_err(corrupt)?;
            // The kernel compresses with a long window (`zstd --ultra -22`).
            d.window_log_max(31).map_err(corrupt)?;
            // A trailing size word follows the frame: stop after one frame.
            let mut d = d.single_frame();
            read_all(&mut d, &mut out)?
        }
        Compression::Lz4 => lz4_legacy(payload, &mut out)?,
        other => return Err(VmlinuzError::Unsupported(other)),
    }
    Ok(out)
}

/// The kernel's LZ4 legacy format (`lz4 -l`): magic, then blocks, each a
/// little-endian compressed length and at most 8 MiB once decompressed.
/// The stream ends where what is left is no whole block (the appended
/// size word) or where another stream's magic starts.
fn lz4_legacy(data: &[u8], out: &mut Vec<u8>) -> Result<(), VmlinuzError> {
    let corrupt = |msg: String| VmlinuzError::Corrupt { kind: Compression::Lz4, msg };
    let mut rest = data
        .strip_prefix(&LZ4_LEGACY_MAGIC[..])
        .ok_or_else(|| corrupt("no legacy LZ4 magic".into()))?;
    let mut block = vec![0u8; LZ4_LEGACY_BLOCK];
    while rest.len() > 4 {
        let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        if rest[..4] == LZ4_LEGACY_MAGIC {
            rest = &rest[4..];
            continue;
        }
        let Some(src) = rest.get(4..4 + len) else {
            if out.is_empty() {
                return Err(corrupt(format!("first block of {len} bytes runs past the payload")));
            }
            break; // the appended size word, or trailing bytes
        };
        let n = lz4_flex::block::decompress_into(src, &mut block)
            .map_err(|e| corrupt(format!("block at payload offset {}: {e}", data.len() - rest.len())))?;
        if (out.len() + n) as u64 > MAX_OUTPUT {
            return Err(VmlinuzError::TooLarge);
        }
        out.extend_from_slice(&block[..n]);
        rest = &rest[4 + len..];
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bzimage(payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 5 * 512];
        f[0x1f1] = 4;
        f[0x202..0x206].copy_from_slice(b"HdrS");
        f[0x206..0x208].copy_from_slice(&0x20fu16.to_le_bytes());
        f[0x248..0x24c].copy_from_slice(&0x10u32.to_le_bytes());
        f[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        f.extend_from_slice(&[0u8; 0x10]);
        f.extend_from_slice(payload);
        f.extend_from_slice(&[0xaa; 64]);
        f
    }

    fn elf() -> Vec<u8> {
        let mut e = b"\x7fELF".to_vec();
        e.extend((0..200_000u32).map(|i| (i % 251) as u8));
        e
    }

    #[test]
    fn each_supported_compression_round_trips() {
        let want = elf();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &want).unwrap();
        let gz = gz.finish().unwrap();
        let mut xz = Vec::new();
        liblzma::read::XzEncoder::new(&want[..], 1).read_to_end(&mut xz).unwrap();
        let zs = zstd::encode_all(&want[..], 3).unwrap();
        let mut lz = LZ4_LEGACY_MAGIC.to_vec();
        for chunk in want.chunks(LZ4_LEGACY_BLOCK.min(100_000)) {
            let c = lz4_flex::block::compress(chunk);
            lz.extend_from_slice(&(c.len() as u32).to_le_bytes());
            lz.extend_from_slice(&c);
        }
        for (kind, mut p) in [
            (Compression::Gzip, gz),
            (Compression::Xz, xz),
            (Compression::Zstd, zs),
            (Compression::Lz4, lz),
        ] {
            p.extend_from_slice(&(want.len() as u32).to_le_bytes());
            let (got, k) = decompress(&bzimage(&p)).unwrap();
            assert_eq!(k, kind);
            assert_eq!(got, want, "{kind:?}");
        }
    }

    #[test]
    fn bad_files_are_named() {
        assert!(matches!(decompress(b"hello"), Err(VmlinuzError::NotBzImage)));
        let mut f = bzimage(b"BZh91AY");
        assert!(matches!(decompress(&f), Err(VmlinuzError::Unsupported(Compression::Bzip2))));
        f[0x24c..0x250].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(decompress(&f), Err(VmlinuzError::PayloadOutside { .. })));
        let f = bzimage(&[0x1f, 0x8b, 8, 0, 0, 0]);
        assert!(matches!(decompress(&f), Err(VmlinuzError::Corrupt { .. })));
        let f = bzimage(b"\x01\x02\x03\x04");
        assert!(matches!(decompress(&f), Err(VmlinuzError::UnknownCompression(_))));
    }
}
