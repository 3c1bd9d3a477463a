//! Framing of the GDB remote serial protocol: `$payload#cs`, `+`/`-` acks,
//! `}` escapes, `*` run-length encoding, hex.
//!
//! Everything here is pure and tested without a gdbstub.

/// Modulo-256 sum of the payload bytes as sent (after escaping).
pub fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |s, &b| s.wrapping_add(b))
}

/// Frames `payload` as `$...#cs`, escaping `$`, `#`, `}` and `*` (binary
/// data must not look like framing or a run-length marker).
pub fn frame(payload: &[u8]) -> Vec<u8> {
    let mut body = Vec::with_capacity(payload.len() + 8);
    for &b in payload {
        match b {
            b'$' | b'#' | b'}' | b'*' => {
                body.push(b'}');
                body.push(b ^ 0x20);
            }
            _ => body.push(b),
        }
    }
    let cs = checksum(&body);
    let mut out = Vec::with_capacity(body.len() + 4);
    out.push(b'$');
    out.extend_from_slice(&body);
    out.push(b'#');
    out.extend_from_slice(format!("{cs:02x}").as_bytes());
    out
}

/// Undoes `}` escapes and `*` run-length encoding of a received payload
/// (in the order the protocol defines: a run repeats the preceding
/// *decoded* byte; the count byte is `n + 29`).
pub fn decode(body: &[u8]) -> Result<Vec<u8>, DecodeError> {
    let mut out = Vec::with_capacity(body.len());
    let mut i = 0;
    while i < body.len() {
        match body[i] {
            b'}' => {
                let b = *body.get(i + 1).ok_or(DecodeError::TrailingEscape)?;
                out.push(b ^ 0x20);
                i += 2;
            }
            b'*' => {
                let prev = *out.last().ok_or(DecodeError::RunWithoutByte)?;
                let n = *body.get(i + 1).ok_or(DecodeError::TruncatedRun)?;
                if n < 29 {
                    return Err(DecodeError::BadRunLength(n));
                }
                out.extend(std::iter::repeat_n(prev, usize::from(n - 29)));
                i += 2;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    Ok(out)
}

/// A malformed payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("packet ends inside a `}}` escape")]
    TrailingEscape,
    #[error("run-length marker `*` with no byte before it")]
    RunWithoutByte,
    #[error("packet ends inside a run-length marker")]
    TruncatedRun,
    #[error("run-length count byte {0:#x} is below 29")]
    BadRunLength(u8),
}

/// What arrived on the wire.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    Ack,
    Nack,
    /// A packet whose checksum matched; payload still escaped/RLE-encoded.
    Packet(Vec<u8>),
    /// A packet whose checksum did not match (the peer must resend).
    BadChecksum,
    /// An asynchronous `%...#cs` notification (not used by QEMU; skipped).
    Notification(Vec<u8>),
}

/// Incremental parser of the byte stream from the stub.
#[derive(Debug, Default)]
pub struct Deframer {
    buf: Vec<u8>,
}

impl Deframer {
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete frame, if one has arrived. Bytes that cannot
    /// start a frame (noise, a stray `\x03`) are dropped.
    pub fn next_frame(&mut self) -> Option<Frame> {
        loop {
            let first = *self.buf.first()?;
            match first {
                b'+' => {
                    self.buf.remove(0);
                    return Some(Frame::Ack);
                }
                b'-' => {
                    self.buf.remove(0);
                    return Some(Frame::Nack);
                }
                b'$' | b'%' => {
                    // The body cannot contain a raw '#': senders escape it.
                    let hash = self.buf.iter().position(|&b| b == b'#')?;
                    if self.buf.len() < hash + 3 {
                        return None;
                    }
                    let body = self.buf[1..hash].to_vec();
                    let cs = std::str::from_utf8(&self.buf[hash + 1..hash + 3])
                        .ok()
                        .and_then(|s| u8::from_str_radix(s, 16).ok());
                    self.buf.drain(..hash + 3);
                    if first == b'%' {
                        return Some(Frame::Notification(body));
                    }
                    return Some(if cs == Some(checksum(&body)) {
                        Frame::Packet(body)
                    } else {
                        Frame::BadChecksum
                    });
                }
                _ => {
                    self.buf.remove(0);
                }
            }
        }
    }
}

/// Lower-case hex of `bytes`.
pub fn to_hex(bytes: &[u8]) -> String {
    const D: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        s.push(D[usize::from(b >> 4)] as char);
        s.push(D[usize::from(b & 15)] as char);
    }
    s
}

fn nibble(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        // QEMU and gdbserver send `xx` for a register they cannot read.
        b'x' | b'X' => Some(0),
        _ => None,
    }
}

/// Bytes of a hex string; `None` when it is not hex or has odd length.
pub fn from_hex(s: &[u8]) -> Option<Vec<u8>> {
    if s.len() & 1 != 0 {
        return None;
    }
    s.chunks(2).map(|p| Some(nibble(p[0])? << 4 | nibble(p[1])?)).collect()
}

/// A hex number as in `thread:1f` or `PacketSize=1000`.
pub fn parse_hex_u64(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 16 {
        return None;
    }
    std::str::from_utf8(s).ok().and_then(|s| u64::from_str_radix(s, 16).ok())
}

/// `E NN` error reply (`Exx`, exactly three bytes, hex code).
pub fn error_code(reply: &[u8]) -> Option<u8> {
    if reply.len() == 3 && reply[0] == b'E' {
        parse_hex_u64(&reply[1..]).map(|v| v as u8)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_with_checksum() {
        assert_eq!(frame(b"g"), b"$g#67");
        assert_eq!(frame(b"qSupported"), b"$qSupported#37");
        assert_eq!(frame(b""), b"$#00");
    }

    #[test]
    fn escapes_special_bytes_and_round_trips() {
        let data = [b'a', b'$', b'#', b'}', b'*', 0, 0xff];
        let f = frame(&data);
        assert_eq!(&f[..12], b"$a}\x04}\x03}]}\x0a\x00\xff");
        let mut d = Deframer::default();
        d.push(&f);
        let Some(Frame::Packet(body)) = d.next_frame() else { panic!() };
        assert_eq!(decode(&body).unwrap(), data);
    }

    #[test]
    fn run_length_decoding() {
        // "0* " is '0' repeated 1 + (32 - 29) = 4 times.
        assert_eq!(decode(b"0* ").unwrap(), b"0000");
        assert_eq!(decode(b"ab*\"c").unwrap(), b"abbbbbbc");
        assert_eq!(decode(b"*!"), Err(DecodeError::RunWithoutByte));
        assert_eq!(decode(b"a*"), Err(DecodeError::TruncatedRun));
        assert_eq!(decode(b"a*\x01"), Err(DecodeError::BadRunLength(1)));
        assert_eq!(decode(b"}"), Err(DecodeError::TrailingEscape));
    }

    #[test]
    fn deframer_handles_split_input_acks_and_bad_checksums() {
        let mut d = Deframer::default();
        d.push(b"+$O");
        assert_eq!(d.next_frame(), Some(Frame::Ack));
        assert_eq!(d.next_frame(), None);
        d.push(b"K#9");
        assert_eq!(d.next_frame(), None);
        d.push(b"a-$OK#00");
        assert_eq!(d.next_frame(), Some(Frame::Packet(b"OK".to_vec())));
        assert_eq!(d.next_frame(), Some(Frame::Nack));
        assert_eq!(d.next_frame(), Some(Frame::BadChecksum));
        d.push(b"\x03junk%Stop:T05#00");
        assert!(matches!(d.next_frame(), Some(Frame::Notification(_))));
    }

    #[test]
    fn hex_helpers() {
        assert_eq!(to_hex(&[0, 0xab, 0x10]), "00ab10");
        assert_eq!(from_hex(b"00AB10").unwrap(), vec![0, 0xab, 0x10]);
        assert_eq!(from_hex(b"xx").unwrap(), vec![0]);
        assert_eq!(from_hex(b"abc"), None);
        assert_eq!(from_hex(b"zz"), None);
        assert_eq!(parse_hex_u64(b"1000"), Some(0x1000));
        assert_eq!(error_code(b"E22"), Some(0x22));
        assert_eq!(error_code(b"e22"), None);
        assert_eq!(error_code(b"E2"), None);
    }
}
