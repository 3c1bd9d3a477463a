//! The printk ring buffer (`struct printk_ringbuffer *prb`), after
//! kernel/printk/printk_ringbuffer.{h,c} in Linux 6.1: a descriptor ring
//! (`struct prb_desc` + `struct printk_info` arrays) and a text data ring
//! whose blocks are `struct prb_data_block { unsigned long id; char data[]; }`.
//!
//! Every number read from the guest is checked before use: `count_bits`
//! and `size_bits` are bounded, block positions must describe a block
//! inside the ring, and record text is copied into a fixed buffer.

use crate::layout::Item;
use crate::mem::{Error, Gva, PhysMem};
use crate::kmem::Kernel;

/// Record text kept per record (`PRINTKRB_RECORD_MAX` is 1024 in 6.1).
pub const RECORD_TEXT_MAX: usize = 1024;
/// Bound on `count_bits` (the kernel's is at most `LOG_BUF_SHIFT` 25 - 5).
pub const MAX_COUNT_BITS: u32 = 26;
/// Bound on `size_bits` (`LOG_BUF_SHIFT` is at most 25; the dynamic buffer
/// from `log_buf_len=` can be larger, 1 GiB is plenty).
pub const MAX_SIZE_BITS: u32 = 30;

const DESC_FLAGS_SHIFT: u32 = 62;
const DESC_ID_MASK: u64 = !(3u64 << DESC_FLAGS_SHIFT);
/// `desc_committed`.
const DESC_COMMITTED: u64 = 1;
/// `desc_finalized`.
const DESC_FINALIZED: u64 = 2;

/// One log record, with its text borrowed from the walker's buffer.
#[derive(Clone, Copy, Debug)]
pub struct Record<'a> {
    /// `printk_info.seq`.
    pub seq: u64,
    /// `printk_info.ts_nsec`: nanoseconds since boot.
    pub ts_nsec: u64,
    /// `printk_info.caller_id`: `T<pid>` or `C<cpu>` (bit 31 set).
    pub caller_id: u32,
    /// The text, without a trailing newline; cut at [`RECORD_TEXT_MAX`].
    pub text: &'a [u8],
    /// The record's text was longer than what was kept.
    pub truncated: bool,
}

/// The rings' geometry, read once and checked.
#[derive(Clone, Copy, Debug)]
pub struct Prb {
    pub count_bits: u32,
    pub descs: Gva,
    pub infos: Gva,
    pub head_id: u64,
    pub tail_id: u64,
    pub size_bits: u32,
    pub data: Gva,
}

/// Reads and checks `*prb`.
pub fn prb<M: PhysMem + ?Sized>(k: &Kernel<'_, M>) -> Result<Prb, Error> {
    let rb = k.read_ptr(k.sym(Item::SymPrb)?)?;
    if rb.is_null() {
        return Err(Error::NullPointer);
    }
    let dr = k.member(rb, Item::PrbDescRing)?;
    let tr = k.member(rb, Item::PrbTextDataRing)?;
    let count_bits = k.read_u32(k.member(dr, Item::DescRingCountBits)?)?;
    if count_bits > MAX_COUNT_BITS {
        return Err(Error::Absurd("prb desc_ring.count_bits", count_bits as u64));
    }
    let size_bits = k.read_u32(k.member(tr, Item::DataRingSizeBits)?)?;
    if !(4..=MAX_SIZE_BITS).contains(&size_bits) {
        return Err(Error::Absurd("prb text_data_ring.size_bits", size_bits as u64));
    }
    Ok(Prb {
        count_bits,
        descs: k.read_ptr(k.member(dr, Item::DescRingDescs)?)?,
        infos: k.read_ptr(k.member(dr, Item::DescRingInfos)?)?,
        head_id: k.read_u64(k.member(dr, Item::DescRingHeadId)?)? & DESC_ID_MASK,
        tail_id: k.read_u64(k.member(dr, Item::DescRingTailId)?)? & DESC_ID_MASK,
        size_bits,
        data: k.read_ptr(k.member(tr, Item::DataRingData)?)?,
    })
}

impl Prb {
    fn desc(&self, k: &Kernel<'_, impl PhysMem + ?Sized>, id: u64) -> Result<Gva, Error> {
        let idx = id & ((1u64 << self.count_bits) - 1);
        Ok(self.descs.add(idx * k.item(Item::DescSize)?))
    }

    fn info(&self, k: &Kernel<'_, impl PhysMem + ?Sized>, id: u64) -> Result<Gva, Error> {
        let idx = id & ((1u64 << self.count_bits) - 1);
        Ok(self.infos.add(idx * k.item(Item::InfoSize)?))
    }

    /// True when descriptor `id` holds a readable record with that id.
    fn is_record(&self, k: &Kernel<'_, impl PhysMem + ?Sized>, id: u64) -> bool {
        let sv = match self
            .desc(k, id)
            .and_then(|d| k.member(d, Item::DescStateVar))
            .and_then(|a| k.read_u64(a))
        {
            Ok(sv) => sv,
            Err(_) => return false,
        };
        let state = sv >> DESC_FLAGS_SHIFT;
        sv & DESC_ID_MASK == id && (state == DESC_COMMITTED || state == DESC_FINALIZED)
    }

    /// `get_data()`: the data block of a descriptor, as (address of the
    /// text, bytes available).
    fn get_data(&self, k: &Kernel<'_, impl PhysMem + ?Sized>, id: u64) -> Result<Option<(Gva, u64)>, Error> {
        let d = self.desc(k, id)?;
        let lp = k.member(d, Item::DescTextBlkLpos)?;
        let begin = k.read_u64(k.member(lp, Item::LposBegin)?)?;
        let next = k.read_u64(k.member(lp, Item::LposNext)?)?;
        // BLK_DATALESS: both lpos have bit 0 set (FAILED_LPOS, NO_LPOS).
        if begin & 1 == 1 && next & 1 == 1 {
            return Ok(None);
        }
        let size = 1u64 << self.size_bits;
        let wraps = |lpos: u64| lpos >> self.size_bits;
        let index = |lpos: u64| lpos & (size - 1);
        let (block, len) = if wraps(begin) == wraps(next) && begin < next {
            (self.data.add(index(begin)), next - begin)
        } else if wraps(begin.wrapping_add(size)) == wraps(next) {
            // Wrapped: the block was written at the start of the ring.
            (self.data, index(next))
        } else {
            return Err(Error::Absurd("printk block lpos", begin));
        };
        if len < 8 || len > size {
            return Err(Error::Absurd("printk block length", len));
        }
        let blk_id = k.read_u64(block)?;
        if blk_id & DESC_ID_MASK != id {
            return Ok(None);
        }
        Ok(Some((block.add(8), len - 8)))
    }
}

/// Calls `f` with each of the last `n` records of the log, oldest first
/// (`f` returns false to stop). Returns the number of records yielded.
///
/// Records being written (`desc_reserved`) and overwritten descriptors are
/// skipped; at most `min(n, ring size)` descriptors are looked at.
pub fn prb_for_each_last<M: PhysMem + ?Sized>(
    k: &Kernel<'_, M>,
    n: u32,
    mut f: impl FnMut(&Record<'_>) -> bool,
) -> Result<u32, Error> {
    let p = prb(k)?;
    let ring = 1u64 << p.count_bits;
    // Walk back from the head to find the oldest of the last n records.
    let mut start = p.head_id;
    let mut found = 0u32;
    let mut steps = 0u64;
    let mut id = p.head_id;
    loop {
        if found >= n || steps >= ring {
            break;
        }
        if p.is_record(k, id) {
            found += 1;
            start = id;
        } else if id != p.head_id {
            // An overwritten or garbage descriptor: older ones are gone.
            break;
        }
        steps += 1;
        if id == p.tail_id {
            break;
        }
        id = id.wrapping_sub(1) & DESC_ID_MASK;
    }
    if found == 0 {
        return Ok(0);
    }
    // Forward from the oldest, oldest first.
    let mut buf = [0u8; RECORD_TEXT_MAX];
    let mut yielded = 0u32;
    let mut id = start;
    for _ in 0..ring {
        if p.is_record(k, id) {
            // A record that cannot be read is skipped, not fatal.
            if let Ok(Some(m)) = read_record(k, &p, id, &mut buf) {
                let RecordMeta { seq, ts_nsec, caller_id, len, truncated } = m;
                let mut text = &buf[..len];
                while let [rest @ .., b'\n'] = text {
                    text = rest;
                }
                yielded += 1;
                if !f(&Record { seq, ts_nsec, caller_id, text, truncated }) {
                    break;
                }
            }
        }
        if id == p.head_id {
            break;
        }
        id = id.wrapping_add(1) & DESC_ID_MASK;
    }
    Ok(yielded)
}

struct RecordMeta {
    seq: u64,
    ts_nsec: u64,
    caller_id: u32,
    len: usize,
    truncated: bool,
}

/// Reads one record's info and text into `buf`.
fn read_record<M: PhysMem + ?Sized>(
    k: &Kernel<'_, M>,
    p: &Prb,
    id: u64,
    buf: &mut [u8; RECORD_TEXT_MAX],
) -> Result<Option<RecordMeta>, Error> {
    let info = p.info(k, id)?;
    let seq = k.read_u64(k.member(info, Item::InfoSeq)?)?;
    let ts = k.read_u64(k.member(info, Item::InfoTsNsec)?)?;
    let text_len = k.read_u16(k.member(info, Item::InfoTextLen)?)? as u64;
    let caller = k.read_u32(k.member(info, Item::InfoCallerId)?)?;
    let (text, avail) = match p.get_data(k, id) {
        Ok(Some(d)) => d,
        // A record whose text was lost (dataless) still has a sequence
        // number; a garbage block position is skipped.
        Ok(None) | Err(Error::Absurd(..)) => return Ok(None),
        Err(e) => return Err(e),
    };
    let want = text_len.min(avail);
    let len = (want as usize).min(RECORD_TEXT_MAX);
    k.read(text, &mut buf[..len])?;
    Ok(Some(RecordMeta { seq, ts_nsec: ts, caller_id: caller, len, truncated: len < text_len as usize }))
}

/// Copies the last `n` records' text, newline-separated, into `out`
/// (oldest first, cut when full). Returns the bytes written.
pub fn log_tail<M: PhysMem + ?Sized>(k: &Kernel<'_, M>, n: u32, out: &mut [u8]) -> Result<usize, Error> {
    let mut w = 0usize;
    prb_for_each_last(k, n, |r| {
        for &b in r.text.iter().chain(b"\n") {
            if w == out.len() {
                return false;
            }
            out[w] = b;
            w += 1;
        }
        true
    })?;
    Ok(w)
}
