//! A QMP (QEMU Machine Protocol) client: greeting, `qmp_capabilities`,
//! commands, and the events that arrive between replies.
//!
//! ```no_run
//! # fn main() -> Result<(), loader::access::AccessError> {
//! let mut q = loader::qmp::Qmp::connect(&"unix:/tmp/qmp.sock".parse()?)?;
//! let status = q.query_status()?; // "running", "paused", "debug", ...
//! let regs = q.hmp("info registers")?;
//! # let _ = (status, regs); Ok(()) }
//! ```

use std::collections::VecDeque;
use std::io::Write;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::access::{AccessError, Endpoint, Stream};

const WHAT: &str = "QMP";

/// An asynchronous QMP event (`GUEST_PANICKED`, `STOP`, `RESUME`,
/// `SHUTDOWN`, ...).
#[derive(Clone, Debug, PartialEq)]
pub struct QmpEvent {
    pub name: String,
    pub data: Value,
    /// QEMU's timestamp, in microseconds since the epoch.
    pub timestamp_us: u64,
}

/// A QMP connection.
#[derive(Debug)]
pub struct Qmp {
    stream: Stream,
    buf: Vec<u8>,
    events: VecDeque<QmpEvent>,
    next_id: u64,
    /// How long a command may take before [`AccessError::Timeout`].
    pub timeout: Duration,
    /// QEMU's version from the greeting, `(major, minor, micro)`.
    pub version: (u64, u64, u64),
}

impl Qmp {
    pub fn connect(ep: &Endpoint) -> Result<Self, AccessError> {
        Self::connect_timeout(ep, Duration::from_secs(10))
    }

    /// Connects, reads the greeting and leaves capabilities-negotiation
    /// mode.
    pub fn connect_timeout(ep: &Endpoint, timeout: Duration) -> Result<Self, AccessError> {
        let stream = Stream::connect(ep, timeout).map_err(|source| AccessError::Connect {
            what: WHAT,
            addr: ep.to_string(),
            hint: "-qmp unix:PATH,server=on,wait=off",
            source,
        })?;
        stream.set_write_timeout(Some(timeout)).map_err(io_err)?;
        let mut q = Self { stream, buf: Vec::new(), events: VecDeque::new(), next_id: 1, timeout, version: (0, 0, 0) };
        let deadline = Instant::now() + timeout;
        let greeting = q.read_message(Some(deadline))?.ok_or_else(|| AccessError::Timeout {
            what: "the QMP greeting (is another client already connected? QMP serves one at a time)".into(),
            after: timeout,
        })?;
        let v = &greeting["QMP"]["version"]["qemu"];
        if greeting.get("QMP").is_none() {
            return Err(AccessError::Protocol { what: WHAT, request: "(greeting)".into(), reply: greeting.to_string() });
        }
        q.version = (
            v["major"].as_u64().unwrap_or(0),
            v["minor"].as_u64().unwrap_or(0),
            v["micro"].as_u64().unwrap_or(0),
        );
        q.execute("qmp_capabilities", None)?;
        Ok(q)
    }

    /// Reads one JSON message (QMP sends one per line); `Ok(None)` at the
    /// deadline.
    fn read_message(&mut self, deadline: Option<Instant>) -> Result<Option<Value>, AccessError> {
        let mut tmp = [0u8; 8192];
        loop {
            if let Some(nl) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=nl).collect();
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return serde_json::from_slice(&line).map(Some).map_err(|e| AccessError::Protocol {
                    what: WHAT,
                    request: "(message)".into(),
                    reply: format!("{e}: {}", String::from_utf8_lossy(&line)),
                });
            }
            match self.stream.read_until_deadline(&mut tmp, deadline, WHAT)? {
                None => return Ok(None),
                Some(n) => self.buf.extend_from_slice(&tmp[..n]),
            }
        }
    }

    fn queue_event(&mut self, m: &Value) -> bool {
        let Some(name) = m.get("event").and_then(Value::as_str) else { return false };
        let ts = &m["timestamp"];
        let timestamp_us = ts["seconds"].as_u64().unwrap_or(0) * 1_000_000 + ts["microseconds"].as_u64().unwrap_or(0);
        self.events.push_back(QmpEvent { name: name.to_string(), data: m["data"].clone(), timestamp_us });
        true
    }

    /// Runs a command and returns its `return` value. Events that arrive
    /// meanwhile are queued for [`Qmp::next_event`].
    pub fn execute(&mut self, command: &str, args: Option<Value>) -> Result<Value, AccessError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({ "execute": command, "id": id });
        if let Some(a) = args {
            msg["arguments"] = a;
        }
        let mut line = msg.to_string();
        line.push('\n');
        self.stream.write_all(line.as_bytes()).map_err(|e| match e.kind() {
            std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset => {
                AccessError::GuestGone(format!("QMP connection: {e}"))
            }
            _ => io_err(e),
        })?;
        let deadline = Instant::now() + self.timeout;
        loop {
            let m = self.read_message(Some(deadline))?.ok_or_else(|| AccessError::Timeout {
                what: format!("QMP reply to `{command}`"),
                after: self.timeout,
            })?;
            if self.queue_event(&m) {
                continue;
            }
            if m.get("id").and_then(Value::as_u64) != Some(id) {
                continue; // a reply to an earlier, timed-out command
            }
            if let Some(r) = m.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = m.get("error") {
                return Err(AccessError::Qmp {
                    command: command.to_string(),
                    class: e["class"].as_str().unwrap_or("?").to_string(),
                    desc: e["desc"].as_str().unwrap_or("?").to_string(),
                });
            }
            return Err(AccessError::Protocol { what: WHAT, request: command.to_string(), reply: m.to_string() });
        }
    }

    /// The next event: a queued one, or one read within `timeout`
    /// (`None` waits forever). `Ok(None)` when none came.
    pub fn next_event(&mut self, timeout: Option<Duration>) -> Result<Option<QmpEvent>, AccessError> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            if let Some(e) = self.events.pop_front() {
                return Ok(Some(e));
            }
            match self.read_message(deadline)? {
                None => return Ok(None),
                Some(m) => {
                    self.queue_event(&m);
                }
            }
        }
    }

    /// Events already received, without reading more.
    pub fn take_events(&mut self) -> Vec<QmpEvent> {
        self.events.drain(..).collect()
    }

    /// Waits for an event named `name`, keeping the others queued.
    pub fn wait_event(&mut self, name: &str, timeout: Duration) -> Result<Option<QmpEvent>, AccessError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(i) = self.events.iter().position(|e| e.name == name) {
                return Ok(self.events.remove(i));
            }
            match self.read_message(Some(deadline))? {
                None => return Ok(None),
                Some(m) => {
                    self.queue_event(&m);
                }
            }
        }
    }

    /// Pauses every vCPU (`stop`).
    pub fn stop(&mut self) -> Result<(), AccessError> {
        self.execute("stop", None).map(drop)
    }

    /// Resumes (`cont`).
    pub fn cont(&mut self) -> Result<(), AccessError> {
        self.execute("cont", None).map(drop)
    }

    /// The run state: `running`, `paused`, `debug` (held by the gdbstub),
    /// `guest-panicked`, `shutdown`, ...
    pub fn query_status(&mut self) -> Result<String, AccessError> {
        let r = self.execute("query-status", None)?;
        r["status"].as_str().map(str::to_string).ok_or_else(|| AccessError::Protocol {
            what: WHAT,
            request: "query-status".into(),
            reply: r.to_string(),
        })
    }

    /// Runs an HMP command (`info registers`, `xp /4gx 0x1000`) and
    /// returns its text.
    pub fn hmp(&mut self, command_line: &str) -> Result<String, AccessError> {
        let r = self.execute("human-monitor-command", Some(json!({ "command-line": command_line })))?;
        Ok(r.as_str().unwrap_or_default().to_string())
    }

    /// Saves `size` bytes of guest-physical memory at `gpa` to `file`
    /// (a path QEMU can write).
    pub fn pmemsave(&mut self, gpa: u64, size: u64, file: &std::path::Path) -> Result<(), AccessError> {
        let args = json!({ "val": gpa, "size": size, "filename": file.to_string_lossy() });
        self.execute("pmemsave", Some(args)).map(drop)
    }

    /// Writes an ELF core of the guest (`dump-guest-memory`, paging off,
    /// synchronous) to `file`.
    pub fn dump_guest_memory(&mut self, file: &std::path::Path) -> Result<(), AccessError> {
        let args = json!({ "paging": false, "protocol": format!("file:{}", file.display()) });
        let saved = self.timeout;
        self.timeout = self.timeout.max(Duration::from_secs(120));
        let r = self.execute("dump-guest-memory", Some(args)).map(drop);
        self.timeout = saved;
        r
    }

    /// Guest RAM size in bytes (`query-memory-size-summary`).
    pub fn ram_size(&mut self) -> Result<u64, AccessError> {
        let r = self.execute("query-memory-size-summary", None)?;
        r["base-memory"].as_u64().ok_or_else(|| AccessError::Protocol {
            what: WHAT,
            request: "query-memory-size-summary".into(),
            reply: r.to_string(),
        })
    }

    /// Guest RAM's layout in guest-physical space and in its RAM block
    /// (the file of `-object memory-backend-file`), from QEMU's own memory
    /// map (HMP `info mtree -f`; QMP has no structured equivalent): see
    /// [`crate::ram::parse_mtree_ram`]. Taken now: the BIOS shadow below
    /// 1 MiB changes as the firmware runs, the rest does not.
    pub fn ram_layout(&mut self) -> Result<Vec<crate::ram::RamRegion>, AccessError> {
        let text = self.hmp("info mtree -f")?;
        crate::ram::parse_mtree_ram(&text).map_err(|why| AccessError::Protocol {
            what: WHAT,
            request: "human-monitor-command info mtree -f".into(),
            reply: format!("{why}: {}", text.chars().take(400).collect::<String>()),
        })
    }

    /// Whether the first vCPU has CPUID feature `feature` (QEMU's property
    /// name: `pdpe1gb` for 1 GiB pages, `la57`, ...), read with `qom-get`
    /// on the CPU object. QEMU's default model (`qemu64`, TCG) has no
    /// `pdpe1gb`; `-cpu max` or `-cpu host` (KVM) do.
    pub fn cpu_feature(&mut self, feature: &str) -> Result<bool, AccessError> {
        let cpus = self.execute("query-cpus-fast", None)?;
        let path = cpus[0]["qom-path"].as_str().ok_or_else(|| AccessError::Protocol {
            what: WHAT,
            request: "query-cpus-fast".into(),
            reply: cpus.to_string(),
        })?;
        let r = self.execute("qom-get", Some(json!({ "path": path, "property": feature })))?;
        r.as_bool().ok_or_else(|| AccessError::Protocol {
            what: WHAT,
            request: format!("qom-get {path} {feature}"),
            reply: r.to_string(),
        })
    }

    /// PID of the QEMU process, when connected over a Unix socket
    /// (`SO_PEERCRED`).
    pub fn peer_pid(&self) -> Option<u32> {
        match &self.stream {
            Stream::Unix(s) => peer_pid(s),
            Stream::Tcp(_) => None,
        }
    }
}

fn peer_pid(s: &std::os::unix::net::UnixStream) -> Option<u32> {
    use std::os::fd::AsRawFd;
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writes of the sizes given;
    // the fd is owned by `s`, alive for the call.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (rc == 0 && cred.pid > 0).then_some(cred.pid as u32)
}

fn io_err(source: std::io::Error) -> AccessError {
    AccessError::Io { what: WHAT, source }
}

/// The value of `NAME=hex` in HMP `info registers` text (`CR3`, `EFER`,
/// `RIP`, ...); the first occurrence (the first CPU listed).
pub fn hmp_register(info_registers: &str, name: &str) -> Option<u64> {
    let key = format!("{name}=");
    let mut from = 0;
    while let Some(i) = info_registers[from..].find(&key) {
        let at = from + i;
        let boundary = at == 0 || !info_registers.as_bytes()[at - 1].is_ascii_alphanumeric();
        if boundary {
            let v: String = info_registers[at + key.len()..].chars().take_while(char::is_ascii_hexdigit).collect();
            return u64::from_str_radix(&v, 16).ok();
        }
        from = at + key.len();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_hmp_registers() {
        let t = "RAX=0000000000000000 RBX=0000000000000001\nRIP=000000000000fff0 RFL=00000002 [-------] CPL=0\n\
                 CR0=60000010 CR2=0000000000000000 CR3=0000000000001000 CR4=00000000\nEFER=0000000000000d01\n";
        assert_eq!(hmp_register(t, "CR3"), Some(0x1000));
        assert_eq!(hmp_register(t, "EFER"), Some(0xd01));
        assert_eq!(hmp_register(t, "RIP"), Some(0xfff0));
        assert_eq!(hmp_register(t, "CR0"), Some(0x6000_0010));
        assert_eq!(hmp_register(t, "R8"), None);
    }
}
