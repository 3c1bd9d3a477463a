//! The guest-access trait: everything the repair flow needs from a guest,
//! whatever runs it (QEMU's gdbstub, in-process KVM, an in-memory test
//! guest). The flow is written once over [`GuestAccess`].
//!
//! ```no_run
//! use loader::access::{BpKind, GuestAccess, Gva, VcpuId};
//! use loader::gdb::GdbGuest;
//! # fn main() -> Result<(), loader::access::AccessError> {
//! let mut g = GdbGuest::connect("unix:/tmp/gdb.sock".parse()?)?;
//! g.set_breakpoint(Gva(0xffff_ffff_8100_0000), BpKind::Hardware)?;
//! g.resume()?;
//! let stop = loop {
//!     if let Some(s) = g.wait_stop(Some(std::time::Duration::from_millis(200)))? {
//!         break s;
//!     }
//! };
//! let regs = g.get_regs(stop.vcpu)?;
//! # let _ = regs; Ok(()) }
//! ```

use std::time::Duration;

pub use repair_kernel::contract::CpuState;

/// Guest-physical and guest-virtual addresses: the repair kernel's own
/// newtypes, so host and guest code speak of the same things.
pub use repair_kernel::mem::{Gpa, Gva};

/// A vCPU, by its 0-based index (Linux's CPU number on x86 guests with
/// QEMU's default topology; the gdbstub's thread id is index + 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct VcpuId(pub u32);

impl std::fmt::Display for VcpuId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "vCPU {}", self.0)
    }
}

/// Breakpoint flavour. Under TCG both are unlimited and behave the same;
/// under KVM hardware breakpoints use the 4 debug registers and leave
/// guest memory untouched, software ones patch `int3` into guest text.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum BpKind {
    /// `Z0`
    Software,
    /// `Z1`
    Hardware,
}

/// Why the guest stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// A breakpoint or single step (SIGTRAP).
    Trap,
    /// Stopped on request ([`GuestAccess::pause`], SIGINT).
    Interrupted,
    /// Any other signal number the stub reported.
    Signal(u8),
}

/// A stop of the guest: every vCPU is stopped; `vcpu` is the one that
/// caused it, at `rip`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StopEvent {
    pub vcpu: VcpuId,
    pub rip: Gva,
    pub reason: StopReason,
}

/// How [`GuestAccess::run_vcpu_until`] ended. In every case the guest is
/// stopped again when it returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunOutcome {
    /// The vCPU reached the requested address.
    Reached(StopEvent),
    /// It stopped elsewhere first (another breakpoint, a signal).
    StoppedElsewhere(StopEvent),
    /// The timeout expired; the vCPU was interrupted where it was.
    TimedOut(StopEvent),
}

/// Errors of guest access. Each message says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error("bad guest address `{0}`: use unix:PATH or tcp:HOST:PORT")]
    BadAddress(String),
    #[error("cannot connect to {what} at {addr}: {source}; is QEMU running with {hint}?")]
    Connect {
        what: &'static str,
        addr: String,
        hint: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("I/O error talking to {what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("the guest went away ({0}); QEMU exited or closed the connection")]
    GuestGone(String),
    #[error("{what} did not answer within {after:?}; the guest or QEMU is wedged (check QEMU's CPU usage, or raise the timeout)")]
    Timeout { what: String, after: Duration },
    #[error("unexpected reply from {what} to `{request}`: {reply}")]
    Protocol { what: &'static str, request: String, reply: String },
    #[error("the gdbstub refused `{request}` with error E{code:02x}{}", explain_errno(*.code))]
    Remote { request: String, code: u8 },
    #[error("QMP command `{command}` failed: {class}: {desc}")]
    Qmp { command: String, class: String, desc: String },
    #[error("{0} is not supported by this backend")]
    Unsupported(String),
    #[error("{vcpu} does not exist (the guest has {count} vCPUs)")]
    NoSuchVcpu { vcpu: VcpuId, count: usize },
    #[error("guest-physical range {gpa}+{len:#x} is outside guest RAM")]
    OutOfRam { gpa: Gpa, len: usize },
    #[error("guest-virtual address {0} is not mapped on that vCPU")]
    NotMapped(Gva),
    #[error("the guest is running; pause it first (this operation needs every vCPU stopped)")]
    Running,
    #[error("the guest is already stopped; nothing to wait for (resume it first)")]
    NotRunning,
    #[error("{0}")]
    Other(String),
}

fn explain_errno(code: u8) -> &'static str {
    match code {
        // QEMU writes errno in decimal digits ("E14" is EFAULT).
        0x0e | 0x14 => " (bad address: not mapped, or outside RAM)",
        0x16 | 0x22 => " (invalid argument: request too large for the stub, or malformed)",
        0x01 => " (operation not permitted)",
        _ => "",
    }
}

/// Everything the repair flow needs from a guest. Methods other than
/// [`GuestAccess::wait_stop`], [`GuestAccess::pause`] and
/// [`GuestAccess::is_running`] require the guest to be stopped.
pub trait GuestAccess {
    /// Reads guest-physical memory.
    fn read_phys(&mut self, gpa: Gpa, buf: &mut [u8]) -> Result<(), AccessError>;
    /// Writes guest-physical memory.
    fn write_phys(&mut self, gpa: Gpa, data: &[u8]) -> Result<(), AccessError>;
    /// Writes guest-physical memory that no vCPU has executed as code since
    /// it was last written through [`GuestAccess::write_phys`] (page tables,
    /// data, a region reserved for us). A backend may take a faster path
    /// that bypasses an emulator's translated-code invalidation (QEMU TCG's
    /// code cache does not see writes made straight into a RAM file).
    fn write_phys_data(&mut self, gpa: Gpa, data: &[u8]) -> Result<(), AccessError> {
        self.write_phys(gpa, data)
    }
    /// Reads through `vcpu`'s current page tables.
    fn read_virt(&mut self, vcpu: VcpuId, gva: Gva, buf: &mut [u8]) -> Result<(), AccessError>;
    /// Writes through `vcpu`'s current page tables.
    fn write_virt(&mut self, vcpu: VcpuId, gva: Gva, data: &[u8]) -> Result<(), AccessError>;

    /// The vCPUs, in index order.
    fn vcpus(&mut self) -> Result<Vec<VcpuId>, AccessError>;
    fn get_regs(&mut self, vcpu: VcpuId) -> Result<CpuState, AccessError>;
    /// Sets the registers of `vcpu`. Backends write only the registers
    /// that differ from the current ones: rewriting a segment selector
    /// would reload its descriptor from the guest's GDT.
    fn set_regs(&mut self, vcpu: VcpuId, regs: &CpuState) -> Result<(), AccessError>;

    /// Stops every vCPU (no-op when stopped). Returns the stop, if one
    /// was produced by this call.
    fn pause(&mut self) -> Result<Option<StopEvent>, AccessError>;
    /// Continues every vCPU. A vCPU sitting on one of our breakpoints
    /// steps over it first instead of trapping again at once.
    fn resume(&mut self) -> Result<(), AccessError>;
    /// True between [`GuestAccess::resume`] and the next stop.
    fn is_running(&self) -> bool;
    /// After [`GuestAccess::resume`]: waits for the next stop. `Ok(None)`
    /// when `timeout` passed with the guest still running; an error when
    /// the guest went away. `None` waits forever.
    fn wait_stop(&mut self, timeout: Option<Duration>) -> Result<Option<StopEvent>, AccessError>;

    /// Continues only `vcpu` (the others stay stopped) until it executes
    /// the instruction at `stop_at`, stops elsewhere, or `timeout` passes.
    /// A breakpoint at `stop_at` is set for the run and removed after,
    /// unless one was already set there.
    fn run_vcpu_until(&mut self, vcpu: VcpuId, stop_at: Gva, timeout: Duration) -> Result<RunOutcome, AccessError>;
    /// Executes one instruction on `vcpu` (the others stay stopped).
    fn step_vcpu(&mut self, vcpu: VcpuId) -> Result<StopEvent, AccessError>;

    fn set_breakpoint(&mut self, addr: Gva, kind: BpKind) -> Result<(), AccessError>;
    fn clear_breakpoint(&mut self, addr: Gva, kind: BpKind) -> Result<(), AccessError>;

    /// A stop reported to us that someone else made (an operator's pause):
    /// leave the guest as it is and listen for the next stop, sending
    /// nothing. Backends whose every stop is their own (in-process KVM, the
    /// in-memory guest) have nothing to do.
    fn release_stop(&mut self) {}
    /// The guest was stopped by someone else without a stop reported to us
    /// (QEMU 10's gdbstub reports no QMP `stop`): requests may be served.
    fn assume_stopped(&mut self) {}
}

/// Plain physical memory, for backends that have no CPU (a RAM file).
pub trait PhysAccess {
    fn read_phys(&mut self, gpa: Gpa, buf: &mut [u8]) -> Result<(), AccessError>;
    fn write_phys(&mut self, gpa: Gpa, data: &[u8]) -> Result<(), AccessError>;
    /// First guest-physical address past the last RAM byte it reaches.
    fn ram_end(&self) -> u64;
}

/// Reads a little-endian `u64` of guest-physical memory.
pub fn read_phys_u64<A: GuestAccess + ?Sized>(a: &mut A, gpa: Gpa) -> Result<u64, AccessError> {
    let mut b = [0u8; 8];
    a.read_phys(gpa, &mut b)?;
    Ok(u64::from_le_bytes(b))
}

/// Translates `gva` through the page tables at `cr3` (4- or 5-level by
/// `cr4.LA57`), reading entries with `read_u64`: `Ok(None)` when not mapped
/// or not canonical, the reader's error when a table cannot be read. The
/// walk itself is the repair kernel's (`repair_kernel::arch::x86_64::pgtable`).
pub fn translate<F>(read_u64: &mut F, cr3: u64, cr4: u64, gva: Gva) -> Result<Option<Gpa>, AccessError>
where
    F: FnMut(Gpa) -> Result<u64, AccessError>,
{
    use repair_kernel::arch::x86_64::pgtable::{self, Paging};
    use repair_kernel::mem::{Error as MemError, PhysMem};
    use std::cell::RefCell;

    /// The walker's memory trait over the reader; keeps the reader's error.
    struct Entries<'a, F> {
        read: RefCell<&'a mut F>,
        failed: RefCell<Option<AccessError>>,
    }
    impl<F: FnMut(Gpa) -> Result<u64, AccessError>> PhysMem for Entries<'_, F> {
        fn read_phys(&self, gpa: Gpa, buf: &mut [u8]) -> Result<(), MemError> {
            if buf.len() != 8 {
                return Err(MemError::Backend);
            }
            match (self.read.borrow_mut())(gpa) {
                Ok(v) => {
                    buf.copy_from_slice(&v.to_le_bytes());
                    Ok(())
                }
                Err(e) => {
                    *self.failed.borrow_mut() = Some(e);
                    Err(MemError::Backend)
                }
            }
        }
        fn write_phys(&mut self, _: Gpa, _: &[u8]) -> Result<(), MemError> {
            Err(MemError::Backend)
        }
        fn ram_end(&self) -> u64 {
            u64::MAX
        }
    }

    let mem = Entries { read: RefCell::new(read_u64), failed: RefCell::new(None) };
    match pgtable::translate(&mem, Paging::from_regs(cr3, cr4), gva) {
        Ok(t) => Ok(Some(t.gpa)),
        Err(_) => match mem.failed.into_inner() {
            Some(e) => Err(e),
            None => Ok(None),
        },
    }
}

/// Where a QEMU socket is: `unix:PATH` or `tcp:HOST:PORT`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Unix(std::path::PathBuf),
    Tcp(String),
}

impl std::str::FromStr for Endpoint {
    type Err = AccessError;
    fn from_str(s: &str) -> Result<Self, AccessError> {
        if let Some(p) = s.strip_prefix("unix:") {
            if !p.is_empty() {
                return Ok(Self::Unix(p.into()));
            }
        } else if let Some(hp) = s.strip_prefix("tcp:") {
            if let Some((h, p)) = hp.rsplit_once(':') {
                if !h.is_empty() && p.parse::<u16>().is_ok() {
                    return Ok(Self::Tcp(hp.to_string()));
                }
            }
        }
        Err(AccessError::BadAddress(s.to_string()))
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unix(p) => write!(f, "unix:{}", p.display()),
            Self::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

/// A connected socket to QEMU, either kind.
#[derive(Debug)]
#[cfg(feature = "qemu")]
pub(crate) enum Stream {
    Unix(std::os::unix::net::UnixStream),
    Tcp(std::net::TcpStream),
}

#[cfg(feature = "qemu")]
impl Stream {
    pub(crate) fn connect(ep: &Endpoint, timeout: Duration) -> std::io::Result<Self> {
        Ok(match ep {
            Endpoint::Unix(p) => Self::Unix(std::os::unix::net::UnixStream::connect(p)?),
            Endpoint::Tcp(a) => {
                use std::net::ToSocketAddrs;
                let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "no address");
                let mut found = None;
                for sa in a.to_socket_addrs()? {
                    match std::net::TcpStream::connect_timeout(&sa, timeout) {
                        Ok(s) => {
                            found = Some(s);
                            break;
                        }
                        Err(e) => last = e,
                    }
                }
                let s = found.ok_or(last)?;
                s.set_nodelay(true)?;
                Self::Tcp(s)
            }
        })
    }

    pub(crate) fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        match self {
            Self::Unix(s) => s.set_read_timeout(t),
            Self::Tcp(s) => s.set_read_timeout(t),
        }
    }

    /// Reads what has arrived, waiting at most until `deadline` (`None`:
    /// forever): `Ok(None)` at the deadline, `Ok(Some(n))` for `n` bytes. A
    /// closed or reset connection is [`AccessError::GuestGone`]; `what`
    /// names the peer in errors.
    pub(crate) fn read_until_deadline(
        &mut self,
        buf: &mut [u8],
        deadline: Option<std::time::Instant>,
        what: &'static str,
    ) -> Result<Option<usize>, AccessError> {
        use std::io::{ErrorKind, Read};
        loop {
            let wait = match deadline {
                Some(d) => {
                    let now = std::time::Instant::now();
                    if now >= d {
                        return Ok(None);
                    }
                    Some((d - now).max(Duration::from_millis(1)))
                }
                None => None,
            };
            self.set_read_timeout(wait).map_err(|source| AccessError::Io { what, source })?;
            match self.read(buf) {
                Ok(0) => return Err(AccessError::GuestGone(format!("{what} closed the connection"))),
                Ok(n) => return Ok(Some(n)),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => {}
                Err(e) if e.kind() == ErrorKind::ConnectionReset => {
                    return Err(AccessError::GuestGone(format!("{what} connection: {e}")))
                }
                Err(source) => return Err(AccessError::Io { what, source }),
            }
        }
    }

    pub(crate) fn set_write_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        match self {
            Self::Unix(s) => s.set_write_timeout(t),
            Self::Tcp(s) => s.set_write_timeout(t),
        }
    }
}

#[cfg(feature = "qemu")]
impl std::io::Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Self::Unix(s) => s.read(buf),
            Self::Tcp(s) => s.read(buf),
        }
    }
}

#[cfg(feature = "qemu")]
impl std::io::Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Self::Unix(s) => s.write(buf),
            Self::Tcp(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_endpoints() {
        assert_eq!("unix:/tmp/x".parse::<Endpoint>().unwrap(), Endpoint::Unix("/tmp/x".into()));
        assert_eq!("tcp:localhost:1234".parse::<Endpoint>().unwrap(), Endpoint::Tcp("localhost:1234".into()));
        assert_eq!("tcp:[::1]:1234".parse::<Endpoint>().unwrap(), Endpoint::Tcp("[::1]:1234".into()));
        for bad in ["", "unix:", "tcp:host", "tcp::1", "tcp:h:99999", "/tmp/x", "localhost:1234"] {
            assert!(bad.parse::<Endpoint>().is_err(), "{bad}");
        }
    }

    #[test]
    fn translates_4_level_with_large_pages() {
        use std::collections::HashMap;
        let mut mem: HashMap<u64, u64> = HashMap::new();
        // cr3 = 0x1000; PML4[511] -> 0x2000; PDPT[510] -> 0x3000; PD[0] 2 MiB page at 0x20_0000.
        mem.insert(0x1000 + 511 * 8, 0x2003);
        mem.insert(0x2000 + 510 * 8, 0x3003);
        mem.insert(0x3000, 0x20_0083);
        // PD[1] -> PT at 0x4000; PT[5] -> 0x9000.
        mem.insert(0x3008, 0x4003);
        mem.insert(0x4000 + 5 * 8, 0x9003);
        let mut rd = |g: Gpa| Ok(*mem.get(&g.0).unwrap_or(&0));
        let t = |rd: &mut dyn FnMut(Gpa) -> Result<u64, AccessError>, va: u64| {
            translate(&mut |g| rd(g), 0x1000, 0, Gva(va)).unwrap()
        };
        assert_eq!(t(&mut rd, 0xffff_ffff_8001_2345), Some(Gpa(0x21_2345)));
        assert_eq!(t(&mut rd, 0xffff_ffff_8020_5abc), Some(Gpa(0x9abc)));
        assert_eq!(t(&mut rd, 0xffff_ffff_8040_0000), None);
        assert_eq!(t(&mut rd, 0x8000_0000_0000_0000), None);
    }
}
