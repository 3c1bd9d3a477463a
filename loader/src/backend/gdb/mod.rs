//! A client of the GDB remote serial protocol, as QEMU's gdbstub speaks it,
//! and [`GdbGuest`]: the [`GuestAccess`] backend over it.
//!
//! QEMU facts this relies on (QEMU 7.2, measured by `tests/gdb_qemu.rs`):
//! - connecting stops the VM; thread ids are vCPU index + 1;
//! - `Qqemu.PhyMemMode:1` makes `m`/`M` physical (a global switch);
//! - `m` takes at most PacketSize/2 bytes (larger: `E22`);
//! - `vCont;c:<tid>` resumes only that vCPU, the others stay stopped;
//! - any byte sent while the VM runs stops it, so nothing is sent then
//!   except the `0x03` of [`GuestAccess::pause`].

mod packet;

pub use packet::{checksum, decode, frame, DecodeError};

use std::collections::BTreeSet;
use std::io::Write;
use std::time::{Duration, Instant};

use crate::access::{
    AccessError, BpKind, CpuState, Endpoint, GuestAccess, Gpa, Gva, RunOutcome, StopEvent, StopReason, Stream,
    VcpuId,
};
use crate::arch::x86_64::regs::{field, RegLayout, CPU_STATE_REGS};
use packet::{error_code, from_hex, parse_hex_u64, to_hex, Deframer, Frame};

const WHAT: &str = "the gdbstub";

/// A stop reply, as the stub sent it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopReply {
    /// `T`/`S`: stopped with a signal, in `thread` if named.
    Signal { signal: u8, thread: Option<u32> },
    /// `W`: the guest exited with a status.
    Exited(u8),
    /// `X`: the guest was terminated by a signal.
    Terminated(u8),
}

/// Parses a stop reply (`T05thread:p01.02;`, `S05`, `W00`, `X09`).
pub fn parse_stop_reply(r: &[u8]) -> Option<StopReply> {
    let code = r.get(1..3).and_then(parse_hex_u64)? as u8;
    match r[0] {
        b'S' => Some(StopReply::Signal { signal: code, thread: None }),
        b'W' => Some(StopReply::Exited(code)),
        b'X' => Some(StopReply::Terminated(code)),
        b'T' => {
            let mut thread = None;
            for kv in r[3..].split(|&b| b == b';') {
                if let Some(v) = kv.strip_prefix(b"thread:") {
                    thread = parse_thread_id(v);
                }
            }
            Some(StopReply::Signal { signal: code, thread })
        }
        _ => None,
    }
}

/// A thread id, plain (`02`) or multiprocess (`p01.02`).
pub fn parse_thread_id(v: &[u8]) -> Option<u32> {
    let t = match v.strip_prefix(b"p") {
        Some(rest) => rest.split(|&b| b == b'.').nth(1)?,
        None => v,
    };
    parse_hex_u64(t).and_then(|t| u32::try_from(t).ok())
}

/// The packet layer: one connection to a gdbstub.
#[derive(Debug)]
pub struct Client {
    stream: Stream,
    deframer: Deframer,
    pending: std::collections::VecDeque<Frame>,
    no_ack: bool,
    /// The stub's `PacketSize` (QEMU: 4096).
    pub packet_size: usize,
    /// How long a request may take before [`AccessError::Timeout`].
    pub timeout: Duration,
    features: String,
}

impl Client {
    /// Connects and negotiates `qSupported` and no-ack mode.
    pub fn connect(ep: &Endpoint, timeout: Duration) -> Result<Self, AccessError> {
        let stream = Stream::connect(ep, timeout).map_err(|source| AccessError::Connect {
            what: WHAT,
            addr: ep.to_string(),
            hint: "-gdb unix:PATH,server=on,wait=off (or -s for tcp::1234)",
            source,
        })?;
        stream.set_write_timeout(Some(timeout)).map_err(io_err)?;
        let mut c =
            Self { stream, deframer: Deframer::default(), pending: Default::default(), no_ack: false, packet_size: 4096, timeout, features: String::new() };
        // Some stubs want to see an ack before the first packet.
        c.write_raw(b"+")?;
        let mut reply = c.request("qSupported:xmlRegisters=i386;vContSupported+")?;
        // Attaching to a running guest makes QEMU stop it and announce that
        // stop unprompted (`T02thread:..`), ahead of our first reply: skip it.
        let deadline = Instant::now() + timeout;
        while parse_stop_reply(&reply).is_some() {
            reply = c.recv(Some(deadline))?.ok_or_else(|| AccessError::Timeout {
                what: format!("{WHAT} (reply to qSupported)"),
                after: timeout,
            })?;
        }
        c.features = String::from_utf8_lossy(&reply).into_owned();
        for f in c.features.split(';') {
            if let Some(v) = f.strip_prefix("PacketSize=") {
                if let Some(n) = parse_hex_u64(v.as_bytes()) {
                    c.packet_size = (n as usize).clamp(64, 1 << 20);
                }
            }
        }
        // QEMU 7.2 accepts QStartNoAckMode without advertising it.
        if c.request("QStartNoAckMode")? == b"OK" {
            c.no_ack = true;
        }
        Ok(c)
    }

    /// True when the stub announced `feature+` in `qSupported`.
    pub fn supports(&self, feature: &str) -> bool {
        self.features.split(';').any(|f| f.strip_suffix('+') == Some(feature))
    }

    /// True once `QStartNoAckMode` is in effect.
    pub fn no_ack(&self) -> bool {
        self.no_ack
    }

    fn write_raw(&mut self, b: &[u8]) -> Result<(), AccessError> {
        self.stream.write_all(b).map_err(|e| match e.kind() {
            std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset => {
                AccessError::GuestGone(format!("gdbstub connection: {e}"))
            }
            _ => io_err(e),
        })
    }

    /// Reads the next frame; `Ok(None)` at the deadline.
    fn next_frame(&mut self, deadline: Option<Instant>) -> Result<Option<Frame>, AccessError> {
        let mut buf = [0u8; 16384];
        if let Some(f) = self.pending.pop_front() {
            return Ok(Some(f));
        }
        loop {
            if let Some(f) = self.deframer.next_frame() {
                return Ok(Some(f));
            }
            match self.stream.read_until_deadline(&mut buf, deadline, WHAT)? {
                None => return Ok(None),
                Some(n) => self.deframer.push(&buf[..n]),
            }
        }
    }

    /// Sends one packet; in ack mode, waits for its `+` (resending on `-`).
    pub fn send(&mut self, payload: &[u8]) -> Result<(), AccessError> {
        let framed = frame(payload);
        self.write_raw(&framed)?;
        if self.no_ack {
            return Ok(());
        }
        let deadline = Instant::now() + self.timeout;
        let mut tries = 0;
        loop {
            match self.next_frame(Some(deadline))? {
                Some(Frame::Ack) => return Ok(()),
                Some(Frame::Nack) if tries < 5 => {
                    tries += 1;
                    self.write_raw(&framed)?;
                }
                Some(Frame::Nack) => {
                    return Err(protocol(payload, "the stub rejected the packet 5 times (line noise?)"))
                }
                // A reply before the ack: the ack got lost; keep the reply.
                Some(f @ Frame::Packet(_)) => {
                    self.pending.push_back(f);
                    return Ok(());
                }
                Some(_) => {}
                None => {
                    return Err(AccessError::Timeout { what: format!("{WHAT} (ack of `{}`)", show(payload)), after: self.timeout })
                }
            }
        }
    }

    /// Receives the next packet, decoded; `Ok(None)` at the deadline.
    pub fn recv(&mut self, deadline: Option<Instant>) -> Result<Option<Vec<u8>>, AccessError> {
        loop {
            match self.next_frame(deadline)? {
                None => return Ok(None),
                Some(Frame::Packet(body)) => {
                    if !self.no_ack {
                        self.write_raw(b"+")?;
                    }
                    return decode(&body)
                        .map(Some)
                        .map_err(|e| protocol(b"(reply)", &format!("malformed packet: {e}")));
                }
                Some(Frame::BadChecksum) => {
                    if !self.no_ack {
                        self.write_raw(b"-")?;
                    }
                }
                Some(_) => {}
            }
        }
    }

    /// Sends a request and returns its reply (`E NN` becomes
    /// [`AccessError::Remote`]).
    pub fn request(&mut self, payload: &str) -> Result<Vec<u8>, AccessError> {
        self.request_bytes(payload.as_bytes())
    }

    pub fn request_bytes(&mut self, payload: &[u8]) -> Result<Vec<u8>, AccessError> {
        self.send(payload)?;
        let deadline = Instant::now() + self.timeout;
        loop {
            let r = self.recv(Some(deadline))?.ok_or_else(|| AccessError::Timeout {
                what: format!("{WHAT} (reply to `{}`)", show(payload)),
                after: self.timeout,
            })?;
            // Console output packets (`O...`) may come before a reply; QEMU
            // sends them only for `qRcmd`, whose own reply ends in `OK`.
            if r.len() > 1 && r[0] == b'O' && r != b"OK" && !payload.starts_with(b"qRcmd") {
                continue;
            }
            if let Some(code) = error_code(&r) {
                return Err(AccessError::Remote { request: show(payload), code });
            }
            return Ok(r);
        }
    }

    /// Sends up to `reqs.len()` requests back to back, then collects their
    /// replies in order. QEMU's system-mode stub answers each packet as it
    /// parses it and never waits for our ack, so this saves a round trip
    /// per packet; a stub that loses one fails the whole batch.
    pub fn request_pipelined(&mut self, reqs: &[Vec<u8>]) -> Result<Vec<Vec<u8>>, AccessError> {
        let mut wire = Vec::new();
        for r in reqs {
            wire.extend_from_slice(&frame(r));
        }
        self.write_raw(&wire)?;
        let deadline = Instant::now() + self.timeout;
        let mut out = Vec::with_capacity(reqs.len());
        while out.len() < reqs.len() {
            let req = &reqs[out.len()];
            match self.next_frame(Some(deadline))? {
                Some(Frame::Packet(body)) => {
                    if !self.no_ack {
                        self.write_raw(b"+")?;
                    }
                    let r = decode(&body).map_err(|e| protocol(req, &format!("malformed packet: {e}")))?;
                    if let Some(code) = error_code(&r) {
                        // Drain the rest so the stream stays in step.
                        while out.len() + 1 < reqs.len() {
                            if let Some(Frame::Packet(_)) = self.next_frame(Some(deadline))? {
                                if !self.no_ack {
                                    self.write_raw(b"+")?;
                                }
                                out.push(Vec::new());
                            }
                        }
                        return Err(AccessError::Remote { request: show(req), code });
                    }
                    out.push(r);
                }
                Some(Frame::Ack) | Some(Frame::Notification(_)) => {}
                Some(Frame::Nack) | Some(Frame::BadChecksum) => {
                    return Err(protocol(req, "corrupted packet in a pipelined batch"))
                }
                None => {
                    return Err(AccessError::Timeout { what: format!("{WHAT} (reply to `{}`)", show(req)), after: self.timeout })
                }
            }
        }
        Ok(out)
    }

    /// Sends the `0x03` interrupt byte.
    pub fn interrupt(&mut self) -> Result<(), AccessError> {
        self.write_raw(&[0x03])
    }

    /// Reads a whole `qXfer:<object>:read:<annex>` document.
    pub fn qxfer_read(&mut self, object: &str, annex: &str) -> Result<Vec<u8>, AccessError> {
        let mut out = Vec::new();
        let chunk = self.packet_size.saturating_sub(16).max(64);
        loop {
            let req = format!("qXfer:{object}:read:{annex}:{:x},{chunk:x}", out.len());
            let r = self.request(&req)?;
            match r.first() {
                Some(b'm') => out.extend_from_slice(&r[1..]),
                Some(b'l') => {
                    out.extend_from_slice(&r[1..]);
                    return Ok(out);
                }
                _ => return Err(protocol(req.as_bytes(), &String::from_utf8_lossy(&r))),
            }
            if r.len() == 1 {
                return Ok(out);
            }
        }
    }
}

fn show(p: &[u8]) -> String {
    let s = String::from_utf8_lossy(&p[..p.len().min(48)]).into_owned();
    if p.len() > 48 { s + "..." } else { s }
}

fn io_err(source: std::io::Error) -> AccessError {
    AccessError::Io { what: WHAT, source }
}

fn protocol(request: &[u8], reply: &str) -> AccessError {
    AccessError::Protocol { what: WHAT, request: show(request), reply: reply.to_string() }
}

/// The [`GuestAccess`] backend over a QEMU gdbstub.
#[derive(Debug)]
pub struct GdbGuest {
    client: Client,
    layout: RegLayout,
    /// gdb thread ids, index = [`VcpuId`].
    tids: Vec<u32>,
    /// Thread selected for `g`/`p`/`m` (`Hg`), if known.
    selected: Option<u32>,
    /// Whether `m`/`M` are physical, if known.
    phys_mode: Option<bool>,
    breakpoints: BTreeSet<(u64, BpKind)>,
    running: bool,
    vcont: bool,
    /// What [`Drop`] does with the guest after removing our breakpoints:
    /// resume it (we stopped it: connecting alone stops QEMU's VM) or
    /// leave it stopped (someone else had paused it). See [`GdbGuest::leave`].
    pub resume_on_drop: bool,
    /// Set once [`GdbGuest::leave`] ran: nothing more to clean up.
    left: bool,
}

/// How [`GdbGuest::leave`] left the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Left {
    /// Our breakpoints removed, the guest running.
    Resumed,
    /// Our breakpoints removed, the guest still stopped, as asked.
    Stopped,
    /// Our breakpoints removed; the guest was found paused by someone else
    /// (a QMP `stop` we got no stop reply for) and stays paused.
    PausedByOthers,
}

impl GdbGuest {
    /// Connects with a 15 s request timeout: QEMU answers from its main
    /// loop, which a loaded host (many TCG guests on few cores) starves for
    /// seconds at a time; one loaded CI run saw a libvirt guest's stub miss
    /// 5 s on the connect handshake, again and again. QEMU stops the guest
    /// when a debugger connects; [`GuestAccess::resume`] lets it go on.
    pub fn connect(ep: Endpoint) -> Result<Self, AccessError> {
        Self::connect_timeout(ep, Duration::from_secs(15))
    }

    pub fn connect_timeout(ep: Endpoint, timeout: Duration) -> Result<Self, AccessError> {
        let mut client = Client::connect(&ep, timeout)?;
        let layout = if client.supports("qXfer:features:read") {
            let mut fetch = |annex: &str| {
                client.qxfer_read("features", annex).map(|b| String::from_utf8_lossy(&b).into_owned())
            };
            match RegLayout::from_target_xml(&mut fetch) {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!("cannot use the target description ({e}); assuming QEMU 7.2's x86_64 layout");
                    RegLayout::qemu_x86_64()
                }
            }
        } else {
            RegLayout::qemu_x86_64()
        };
        let missing = layout.missing();
        if !missing.is_empty() {
            return Err(AccessError::Unsupported(format!(
                "a gdbstub without registers {missing:?} (is this an x86_64 QEMU, qemu-system-x86_64?)"
            )));
        }
        let vcont = client.request("vCont?").map(|r| r.starts_with(b"vCont") && r.windows(2).any(|w| w == b";c")).unwrap_or(false);
        let mut g = Self {
            client,
            layout,
            tids: Vec::new(),
            selected: None,
            phys_mode: None,
            breakpoints: BTreeSet::new(),
            running: false,
            vcont,
            resume_on_drop: false,
            left: false,
        };
        // The stop QEMU made on connect (or an exit, if the guest is gone).
        let r = g.client.request("?")?;
        match parse_stop_reply(&r) {
            Some(StopReply::Signal { .. }) => {}
            Some(StopReply::Exited(c)) => return Err(AccessError::GuestGone(format!("guest exited with status {c}"))),
            Some(StopReply::Terminated(s)) => return Err(AccessError::GuestGone(format!("guest terminated by signal {s}"))),
            None => return Err(protocol(b"?", &String::from_utf8_lossy(&r))),
        }
        g.tids = g.thread_list()?;
        g.clear_stale_breakpoints()?;
        Ok(g)
    }

    /// Removes every breakpoint a former client left (QEMU keeps them when
    /// a client goes: a watcher killed with SIGKILL leaves its trap). QEMU's
    /// answer to `?` removes the breakpoints of the current vCPU
    /// (`handle_target_halt`), and a `z` stops at the first vCPU that has
    /// none: so each vCPU is made current (`Hc`) and asked `?` in turn.
    fn clear_stale_breakpoints(&mut self) -> Result<(), AccessError> {
        for tid in self.tids.clone() {
            expect_ok(&mut self.client, &format!("Hc{tid:x}"))?;
            let r = self.client.request("?")?;
            if parse_stop_reply(&r).is_none() {
                return Err(protocol(b"?", &String::from_utf8_lossy(&r)));
            }
        }
        Ok(())
    }

    /// The packet layer, for requests this type does not wrap.
    pub fn client(&mut self) -> &mut Client {
        &mut self.client
    }

    /// The register layout in use.
    pub fn layout(&self) -> &RegLayout {
        &self.layout
    }

    fn thread_list(&mut self) -> Result<Vec<u32>, AccessError> {
        let mut tids = Vec::new();
        let mut r = self.client.request("qfThreadInfo")?;
        for _ in 0..4096 {
            match r.first() {
                Some(b'm') => {
                    for t in r[1..].split(|&b| b == b',') {
                        tids.push(parse_thread_id(t).ok_or_else(|| protocol(b"qfThreadInfo", &String::from_utf8_lossy(&r)))?);
                    }
                }
                Some(b'l') => break,
                _ => return Err(protocol(b"qsThreadInfo", &String::from_utf8_lossy(&r))),
            }
            r = self.client.request("qsThreadInfo")?;
        }
        tids.sort_unstable();
        tids.dedup();
        if tids.is_empty() {
            return Err(protocol(b"qfThreadInfo", "no threads"));
        }
        Ok(tids)
    }

    fn tid(&self, vcpu: VcpuId) -> Result<u32, AccessError> {
        self.tids.get(vcpu.0 as usize).copied().ok_or(AccessError::NoSuchVcpu { vcpu, count: self.tids.len() })
    }

    fn vcpu_of(&self, tid: u32) -> VcpuId {
        VcpuId(self.tids.iter().position(|&t| t == tid).unwrap_or(0) as u32)
    }

    fn stopped(&self) -> Result<(), AccessError> {
        if self.running { Err(AccessError::Running) } else { Ok(()) }
    }

    fn select(&mut self, tid: u32) -> Result<(), AccessError> {
        if self.selected != Some(tid) {
            expect_ok(&mut self.client, &format!("Hg{tid:x}"))?;
            self.selected = Some(tid);
        }
        Ok(())
    }

    fn set_phys_mode(&mut self, on: bool) -> Result<(), AccessError> {
        if self.phys_mode != Some(on) {
            let r = self.client.request(&format!("Qqemu.PhyMemMode:{}", u8::from(on)))?;
            if r != b"OK" {
                return Err(AccessError::Unsupported(
                    "physical memory access (Qqemu.PhyMemMode); this needs QEMU's own gdbstub, 4.1 or newer".into(),
                ));
            }
            self.phys_mode = Some(on);
        }
        Ok(())
    }

    /// Largest `m` request: QEMU refuses more than PacketSize/2 bytes.
    fn read_chunk(&self) -> usize {
        (self.client.packet_size / 2).max(16)
    }

    /// Largest `M` request: the whole packet must fit in PacketSize.
    fn write_chunk(&self) -> usize {
        (self.client.packet_size.saturating_sub(48) / 2).max(16)
    }

    fn read_mem(&mut self, addr: u64, buf: &mut [u8]) -> Result<(), AccessError> {
        let chunk = self.read_chunk();
        // Batches of 8 requests in flight (16 KiB with QEMU's packet size).
        for (b, batch) in buf.chunks_mut(chunk * 8).enumerate() {
            let base = addr.wrapping_add((b * chunk * 8) as u64);
            let reqs: Vec<Vec<u8>> = batch
                .chunks(chunk)
                .enumerate()
                .map(|(i, part)| format!("m{:x},{:x}", base.wrapping_add((i * chunk) as u64), part.len()).into_bytes())
                .collect();
            let replies = if reqs.len() == 1 {
                vec![self.client.request_bytes(&reqs[0])?]
            } else {
                self.client.request_pipelined(&reqs)?
            };
            for ((part, r), req) in batch.chunks_mut(chunk).zip(replies).zip(&reqs) {
                let bytes = from_hex(&r).filter(|b| b.len() == part.len()).ok_or_else(|| {
                    protocol(req, &format!("{} hex bytes for {} requested", r.len() / 2, part.len()))
                })?;
                part.copy_from_slice(&bytes);
            }
        }
        Ok(())
    }

    fn write_mem(&mut self, addr: u64, data: &[u8]) -> Result<(), AccessError> {
        let chunk = self.write_chunk();
        for (i, part) in data.chunks(chunk).enumerate() {
            let a = addr.wrapping_add((i * chunk) as u64);
            expect_ok(&mut self.client, &format!("M{a:x},{:x}:{}", part.len(), to_hex(part)))?;
        }
        Ok(())
    }

    fn read_reg(&mut self, tid: u32, name: &str) -> Result<u64, AccessError> {
        let r = self.layout.get(name).cloned().ok_or_else(|| AccessError::Unsupported(format!("register {name}")))?;
        self.select(tid)?;
        let req = format!("p{:x}", r.regnum);
        let reply = self.client.request(&req)?;
        let b = from_hex(&reply).ok_or_else(|| protocol(req.as_bytes(), &String::from_utf8_lossy(&reply)))?;
        let mut v = [0u8; 8];
        let n = b.len().min(8);
        v[..n].copy_from_slice(&b[..n]);
        Ok(u64::from_le_bytes(v))
    }

    fn write_reg(&mut self, tid: u32, name: &str, value: u64) -> Result<(), AccessError> {
        let r = self.layout.get(name).cloned().ok_or_else(|| AccessError::Unsupported(format!("register {name}")))?;
        self.select(tid)?;
        let n = (r.bitsize as usize / 8).min(8);
        expect_ok(&mut self.client, &format!("P{:x}={}", r.regnum, to_hex(&value.to_le_bytes()[..n])))
    }

    /// Reads any register the target describes, by name (`cr8`, `mxcsr`).
    pub fn read_register(&mut self, vcpu: VcpuId, name: &str) -> Result<u64, AccessError> {
        self.stopped()?;
        let tid = self.tid(vcpu)?;
        self.read_reg(tid, name)
    }

    /// Writes one register by name.
    pub fn write_register(&mut self, vcpu: VcpuId, name: &str, value: u64) -> Result<(), AccessError> {
        self.stopped()?;
        let tid = self.tid(vcpu)?;
        self.write_reg(tid, name, value)
    }

    fn insert_bp(&mut self, addr: u64, kind: BpKind) -> Result<(), AccessError> {
        let z = if kind == BpKind::Software { 0 } else { 1 };
        let r = self.client.request(&format!("Z{z},{addr:x},1"))?;
        if r.is_empty() {
            return Err(AccessError::Unsupported(format!("{kind:?} breakpoints (Z{z})")));
        }
        if r != b"OK" {
            return Err(protocol(format!("Z{z}").as_bytes(), &String::from_utf8_lossy(&r)));
        }
        Ok(())
    }

    fn remove_bp(&mut self, addr: u64, kind: BpKind) -> Result<(), AccessError> {
        let z = if kind == BpKind::Software { 0 } else { 1 };
        expect_ok(&mut self.client, &format!("z{z},{addr:x},1"))
    }

    /// Waits for a stop reply and turns it into a [`StopEvent`].
    fn wait_reply(&mut self, deadline: Option<Instant>) -> Result<Option<StopEvent>, AccessError> {
        loop {
            let Some(r) = self.client.recv(deadline)? else { return Ok(None) };
            if r.first() == Some(&b'O') && r.len() > 1 {
                continue; // console output
            }
            self.running = false;
            self.selected = None;
            match parse_stop_reply(&r) {
                Some(StopReply::Signal { signal, thread }) => {
                    let tid = match thread {
                        Some(t) => t,
                        None => {
                            let q = self.client.request("qC")?;
                            q.strip_prefix(b"QC").and_then(parse_thread_id).unwrap_or(self.tids[0])
                        }
                    };
                    let rip = self.read_reg(tid, "rip")?;
                    let reason = match signal {
                        5 => StopReason::Trap,
                        2 => StopReason::Interrupted,
                        s => StopReason::Signal(s),
                    };
                    return Ok(Some(StopEvent { vcpu: self.vcpu_of(tid), rip: Gva(rip), reason }));
                }
                Some(StopReply::Exited(c)) => return Err(AccessError::GuestGone(format!("guest exited with status {c}"))),
                Some(StopReply::Terminated(s)) => {
                    return Err(AccessError::GuestGone(format!("guest terminated by signal {s}")))
                }
                None => return Err(protocol(b"(stop reply)", &String::from_utf8_lossy(&r))),
            }
        }
    }

    /// Addresses of our breakpoints at `addr`, any kind.
    fn bps_at(&self, addr: u64) -> Vec<(u64, BpKind)> {
        self.breakpoints.iter().copied().filter(|&(a, _)| a == addr).collect()
    }

    /// If `tid` sits on one of our breakpoints, single-steps it past it
    /// with the breakpoint lifted (the other vCPUs stay stopped, so none
    /// can run through the gap).
    fn step_over(&mut self, tid: u32) -> Result<(), AccessError> {
        if self.breakpoints.is_empty() {
            return Ok(());
        }
        let rip = self.read_reg(tid, "rip")?;
        let here = self.bps_at(rip);
        if here.is_empty() {
            return Ok(());
        }
        for &(a, k) in &here {
            self.remove_bp(a, k)?;
        }
        let stepped = self.step_tid(tid);
        for &(a, k) in &here {
            self.insert_bp(a, k)?;
        }
        stepped.map(|_| ())
    }

    fn step_tid(&mut self, tid: u32) -> Result<StopEvent, AccessError> {
        let req = if self.vcont { format!("vCont;s:{tid:x}") } else { self.select_c(tid)? };
        self.client.send(req.as_bytes())?;
        self.running = true;
        let deadline = Instant::now() + self.client.timeout;
        match self.wait_reply(Some(deadline))? {
            Some(s) => Ok(s),
            None => {
                self.interrupt_and_wait()?;
                Err(AccessError::Timeout { what: format!("a single step of thread {tid}"), after: self.client.timeout })
            }
        }
    }

    /// Fallback without vCont: `Hc` then `s`.
    fn select_c(&mut self, tid: u32) -> Result<String, AccessError> {
        expect_ok(&mut self.client, &format!("Hc{tid:x}"))?;
        Ok("s".into())
    }

    fn interrupt_and_wait(&mut self) -> Result<StopEvent, AccessError> {
        self.client.interrupt()?;
        let deadline = Instant::now() + self.client.timeout;
        self.wait_reply(Some(deadline))?.ok_or_else(|| AccessError::Timeout {
            what: "the guest to stop after an interrupt (0x03)".into(),
            after: self.client.timeout,
        })
    }

    /// Detaches (`D`): QEMU removes every breakpoint and resumes the guest.
    pub fn detach(mut self) -> Result<(), AccessError> {
        if self.running {
            self.interrupt_and_wait()?;
        }
        self.breakpoints.clear();
        let r = self.client.request("D");
        self.left = true;
        r.map(|_| ())
    }

    /// Stops a guest we believe running. QEMU ignores the `0x03` of a
    /// client whose VM is already paused (by a QMP `stop`, which QEMU 10
    /// does not report to the gdb client): when no stop reply comes, `?`
    /// tells whether the stub is serving packets, i.e. the VM is stopped by
    /// someone else. Returns true when the stop was ours.
    fn stop_for_cleanup(&mut self) -> Result<bool, AccessError> {
        self.client.interrupt()?;
        let deadline = Instant::now() + self.client.timeout.min(Duration::from_secs(3));
        if self.wait_reply(Some(deadline))?.is_some() {
            return Ok(true);
        }
        let r = self.client.request("?")?;
        if parse_stop_reply(&r).is_none() {
            return Err(protocol(b"?", &String::from_utf8_lossy(&r)));
        }
        // That `?` removed the current vCPU's breakpoints; ours are gone
        // from it, so `z` would stop there: clear every vCPU's the same way.
        self.running = false;
        self.selected = None;
        self.clear_stale_breakpoints()?;
        self.breakpoints.clear();
        Ok(false)
    }

    /// Leaves the guest as the first law wants it: every breakpoint of ours
    /// removed; a guest that was running runs on; a stopped one is resumed
    /// when `resume_stopped` (the stop was ours: our trap, or the stop QEMU
    /// makes when a client connects), else left stopped. A guest found
    /// paused by someone else stays paused. Nothing is sent afterwards; the
    /// connection may close (QEMU does nothing when a client goes: see
    /// `loader/DESIGN.md`).
    pub fn leave(&mut self, resume_stopped: bool) -> Result<Left, AccessError> {
        if self.left {
            return Ok(if self.running { Left::Resumed } else { Left::Stopped });
        }
        if self.running && self.breakpoints.is_empty() {
            self.left = true;
            return Ok(Left::Resumed);
        }
        let mut ours = true;
        let mut resume = resume_stopped;
        if self.running {
            ours = self.stop_for_cleanup()?;
            resume = true;
        }
        let mut first_err = None;
        for (a, k) in std::mem::take(&mut self.breakpoints) {
            if let Err(e) = self.remove_bp(a, k) {
                first_err.get_or_insert(e);
            }
        }
        self.left = true;
        if let Some(e) = first_err {
            // Still resume: a guest left stopped is worse than a stray
            // breakpoint (QEMU would stop at it in `debug`).
            if resume && ours {
                let _ = self.continue_all();
            }
            return Err(e);
        }
        match (ours, resume) {
            (false, _) => Ok(Left::PausedByOthers),
            (true, true) => self.continue_all().map(|()| Left::Resumed),
            (true, false) => Ok(Left::Stopped),
        }
    }

    /// `vCont;c` (or `c`), nothing stepped over first.
    fn continue_all(&mut self) -> Result<(), AccessError> {
        self.client.send(if self.vcont { b"vCont;c" } else { b"c" })?;
        self.running = true;
        self.selected = None;
        Ok(())
    }

    /// A stop reported to us that is not ours (an operator's QMP `stop`,
    /// which QEMU 7.2 reports to the gdb client as `T02`): leave the VM as
    /// it is and go back to listening. Nothing is sent: any byte would stop
    /// a running VM. The next stop reply (our trap, once whoever paused the
    /// VM resumes it) is read by [`GuestAccess::wait_stop`].
    pub fn release_stop(&mut self) {
        self.running = true;
        self.selected = None;
    }

    /// The opposite: QMP says the VM is stopped although no stop reply came
    /// (QEMU 10 sends none for a QMP `stop`); the stub serves packets.
    pub fn assume_stopped(&mut self) {
        self.running = false;
        self.selected = None;
    }
}

impl Drop for GdbGuest {
    fn drop(&mut self) {
        // Every way out (an error, a panic unwinding) leaves no trap of
        // ours behind: QEMU keeps a client's breakpoints after it goes, and
        // a panic would then freeze the VM in `debug` with nobody attached.
        if !self.left {
            self.client.timeout = self.client.timeout.min(Duration::from_secs(2));
            let resume = self.resume_on_drop;
            if let Err(e) = self.leave(resume) {
                tracing::warn!("leaving the guest on drop: {e}");
            }
        }
    }
}

fn expect_ok(c: &mut Client, req: &str) -> Result<(), AccessError> {
    let r = c.request(req)?;
    if r == b"OK" {
        Ok(())
    } else if r.is_empty() {
        Err(AccessError::Unsupported(format!("the request `{}`", show(req.as_bytes()))))
    } else {
        Err(protocol(req.as_bytes(), &String::from_utf8_lossy(&r)))
    }
}

impl GuestAccess for GdbGuest {
    fn read_phys(&mut self, gpa: Gpa, buf: &mut [u8]) -> Result<(), AccessError> {
        self.stopped()?;
        self.set_phys_mode(true)?;
        self.read_mem(gpa.0, buf).map_err(|e| match e {
            AccessError::Remote { code: 0x0e | 0x14, .. } => AccessError::OutOfRam { gpa, len: buf.len() },
            e => e,
        })
    }

    fn write_phys(&mut self, gpa: Gpa, data: &[u8]) -> Result<(), AccessError> {
        self.stopped()?;
        self.set_phys_mode(true)?;
        self.write_mem(gpa.0, data).map_err(|e| match e {
            AccessError::Remote { code: 0x0e | 0x14, .. } => AccessError::OutOfRam { gpa, len: data.len() },
            e => e,
        })
    }

    fn read_virt(&mut self, vcpu: VcpuId, gva: Gva, buf: &mut [u8]) -> Result<(), AccessError> {
        self.stopped()?;
        let tid = self.tid(vcpu)?;
        self.set_phys_mode(false)?;
        self.select(tid)?;
        self.read_mem(gva.0, buf).map_err(|e| match e {
            AccessError::Remote { code: 0x0e | 0x14, .. } => AccessError::NotMapped(gva),
            e => e,
        })
    }

    fn write_virt(&mut self, vcpu: VcpuId, gva: Gva, data: &[u8]) -> Result<(), AccessError> {
        self.stopped()?;
        let tid = self.tid(vcpu)?;
        self.set_phys_mode(false)?;
        self.select(tid)?;
        self.write_mem(gva.0, data).map_err(|e| match e {
            AccessError::Remote { code: 0x0e | 0x14, .. } => AccessError::NotMapped(gva),
            e => e,
        })
    }

    fn vcpus(&mut self) -> Result<Vec<VcpuId>, AccessError> {
        Ok((0..self.tids.len() as u32).map(VcpuId).collect())
    }

    fn get_regs(&mut self, vcpu: VcpuId) -> Result<CpuState, AccessError> {
        self.stopped()?;
        let tid = self.tid(vcpu)?;
        self.select(tid)?;
        let r = self.client.request("g")?;
        let b = from_hex(&r).ok_or_else(|| protocol(b"g", &show(&r)))?;
        if b.len() < self.layout.get("efer").map_or(0, |e| e.offset + 8) {
            return Err(protocol(b"g", &format!("{} bytes of registers, fewer than the target description's", b.len())));
        }
        Ok(self.layout.decode_g(&b))
    }

    fn set_regs(&mut self, vcpu: VcpuId, regs: &CpuState) -> Result<(), AccessError> {
        let now = self.get_regs(vcpu)?;
        let tid = self.tid(vcpu)?;
        // Order matters to QEMU (target/i386/gdbstub.c): a write of EFER
        // takes LMA as given and CR0.PG entering paging with EFER.LME sets
        // it, so CR4/CR3/EFER go before CR0; a selector write loads its
        // descriptor from the GDT under the new CR0 and resets the base,
        // so selectors go next and fs_base/gs_base after them; outside
        // 64-bit code QEMU truncates GPR and RIP writes to 32 bits, so
        // those go last, once CS is in place.
        let order = ["cr4", "cr3", "efer", "cr0", "cr2", "cs", "ss", "ds", "es", "fs", "gs", "fs_base", "gs_base", "k_gs_base"]
            .into_iter()
            .chain(CPU_STATE_REGS.iter().copied());
        let mut done = BTreeSet::new();
        for name in order {
            if !done.insert(name) {
                continue;
            }
            let (want, have) = (field(regs, name), field(&now, name));
            if want != have {
                self.write_reg(tid, name, want.unwrap_or(0))?;
            }
        }
        Ok(())
    }

    fn pause(&mut self) -> Result<Option<StopEvent>, AccessError> {
        if !self.running {
            return Ok(None);
        }
        self.interrupt_and_wait().map(Some)
    }

    fn resume(&mut self) -> Result<(), AccessError> {
        self.stopped()?;
        let tids = self.tids.clone();
        for tid in tids {
            self.step_over(tid)?;
        }
        self.continue_all()
    }

    fn is_running(&self) -> bool {
        self.running
    }

    fn release_stop(&mut self) {
        GdbGuest::release_stop(self)
    }

    fn assume_stopped(&mut self) {
        GdbGuest::assume_stopped(self)
    }

    fn wait_stop(&mut self, timeout: Option<Duration>) -> Result<Option<StopEvent>, AccessError> {
        if !self.running {
            return Err(AccessError::NotRunning);
        }
        self.wait_reply(timeout.map(|t| Instant::now() + t))
    }

    fn run_vcpu_until(&mut self, vcpu: VcpuId, stop_at: Gva, timeout: Duration) -> Result<RunOutcome, AccessError> {
        self.stopped()?;
        if !self.vcont {
            return Err(AccessError::Unsupported("running one vCPU alone (the stub lacks vCont)".into()));
        }
        let tid = self.tid(vcpu)?;
        let temp = self.bps_at(stop_at.0).is_empty();
        self.step_over(tid)?;
        if temp {
            self.insert_bp(stop_at.0, BpKind::Hardware)?;
            self.breakpoints.insert((stop_at.0, BpKind::Hardware));
        }
        let run = (|| {
            self.client.send(format!("vCont;c:{tid:x}").as_bytes())?;
            self.running = true;
            self.selected = None;
            match self.wait_reply(Some(Instant::now() + timeout))? {
                Some(s) if s.vcpu == vcpu && s.rip == stop_at && s.reason == StopReason::Trap => Ok(RunOutcome::Reached(s)),
                Some(s) => Ok(RunOutcome::StoppedElsewhere(s)),
                None => self.interrupt_and_wait().map(RunOutcome::TimedOut),
            }
        })();
        if temp && !self.running {
            self.breakpoints.remove(&(stop_at.0, BpKind::Hardware));
            self.remove_bp(stop_at.0, BpKind::Hardware)?;
        }
        run
    }

    fn step_vcpu(&mut self, vcpu: VcpuId) -> Result<StopEvent, AccessError> {
        self.stopped()?;
        let tid = self.tid(vcpu)?;
        let rip = self.read_reg(tid, "rip")?;
        let here = self.bps_at(rip);
        for &(a, k) in &here {
            self.remove_bp(a, k)?;
        }
        let s = self.step_tid(tid);
        for &(a, k) in &here {
            self.insert_bp(a, k)?;
        }
        s
    }

    fn set_breakpoint(&mut self, addr: Gva, kind: BpKind) -> Result<(), AccessError> {
        self.stopped()?;
        if self.breakpoints.contains(&(addr.0, kind)) {
            return Ok(());
        }
        self.insert_bp(addr.0, kind)?;
        self.breakpoints.insert((addr.0, kind));
        Ok(())
    }

    fn clear_breakpoint(&mut self, addr: Gva, kind: BpKind) -> Result<(), AccessError> {
        self.stopped()?;
        if self.breakpoints.remove(&(addr.0, kind)) {
            self.remove_bp(addr.0, kind)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stop_replies() {
        assert_eq!(parse_stop_reply(b"T05thread:p01.02;"), Some(StopReply::Signal { signal: 5, thread: Some(2) }));
        assert_eq!(parse_stop_reply(b"T02thread:01;"), Some(StopReply::Signal { signal: 2, thread: Some(1) }));
        assert_eq!(
            parse_stop_reply(b"T05watch:ffff8000;thread:0a;"),
            Some(StopReply::Signal { signal: 5, thread: Some(10) })
        );
        assert_eq!(parse_stop_reply(b"S05"), Some(StopReply::Signal { signal: 5, thread: None }));
        assert_eq!(parse_stop_reply(b"W00"), Some(StopReply::Exited(0)));
        assert_eq!(parse_stop_reply(b"X0f"), Some(StopReply::Terminated(15)));
        assert_eq!(parse_stop_reply(b"OK"), None);
        assert_eq!(parse_stop_reply(b""), None);
    }
}
