//! One way to attach: a guest description resolved, in one place, to a
//! backend, the guest's RAM map, its name, and the run state it was in
//! before we touched it.
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use loader::attach::QemuGuest;
//! let spec = QemuGuest {
//!     gdb: "unix:/run/vm1-gdb.sock".parse()?,
//!     qmp: Some("unix:/run/vm1-qmp.sock".parse()?),
//!     ram_file: Some("/dev/shm/vm1-ram".into()),
//! };
//! let mut a = spec.connect()?;
//! let image = builder::RepairImage::read("vm1.img".as_ref())?;
//! let mut session = a.session(image, loader::flow::FlowConfig::default())?;
//! # let _ = &mut session; Ok(()) }
//! ```

use crate::access::{AccessError, Endpoint, GuestAccess};
use crate::flow::{FlowConfig, FlowError, Session};
use crate::gdb::GdbGuest;
use crate::qmp::Qmp;
use crate::ram::{RamFile, WithRam};
use std::path::PathBuf;

/// A QEMU guest: its gdbstub, and optionally its QMP monitor and the file
/// backing its RAM (`-object memory-backend-file,...,share=on`).
#[derive(Clone, Debug)]
pub struct QemuGuest {
    pub gdb: Endpoint,
    pub qmp: Option<Endpoint>,
    pub ram_file: Option<PathBuf>,
}

/// The control and memory paths to a QEMU guest.
#[derive(Debug)]
pub enum QemuBackend {
    /// Everything through the gdbstub.
    Gdb(GdbGuest),
    /// Control through the gdbstub, memory through the RAM file.
    GdbRam(WithRam<GdbGuest, RamFile>),
}

impl QemuBackend {
    pub fn guest(&mut self) -> &mut dyn GuestAccess {
        match self {
            QemuBackend::Gdb(g) => g,
            QemuBackend::GdbRam(g) => g,
        }
    }

    /// The gdbstub connection under either path.
    pub fn gdb(&mut self) -> &mut GdbGuest {
        match self {
            QemuBackend::Gdb(g) => g,
            QemuBackend::GdbRam(g) => &mut g.inner,
        }
    }
}

/// A guest we are connected to.
#[derive(Debug)]
pub struct Attached {
    pub backend: QemuBackend,
    /// The QMP connection, kept for the watch (run states and events).
    pub qmp: Option<Qmp>,
    /// The run state before our gdbstub connection stopped the VM.
    pub found_status: Option<String>,
    /// QMP `query-name`, else the gdbstub's address.
    pub name: String,
    /// First guest-physical address past RAM, from QMP or the RAM file;
    /// `None` when neither is given (the flow then probes).
    pub ram_end: Option<u64>,
}

impl QemuGuest {
    /// Connects QMP first (the run state before we touch the gdbstub, the
    /// name, the RAM size), then the gdbstub, which stops the VM. From then
    /// on, dropping the connection removes our breakpoints and resumes the
    /// guest if that stop was ours (see [`Attached::stop_is_ours`]).
    ///
    /// The RAM file is mapped with the layout QEMU reports over QMP
    /// ([`Qmp::ram_layout`]). Without QMP, it is assumed to be the `pc`
    /// machine's ([`RamFile::open_pc_file`]): a `q35` guest of 2.75 GiB or
    /// more (split at 2 GiB, not 3) then needs `--qmp`.
    pub fn connect(&self) -> Result<Attached, AccessError> {
        let mut qmp = match &self.qmp {
            Some(ep) => Some(Qmp::connect(ep)?),
            None => None,
        };
        let mut found_status = None;
        let mut name = None;
        let mut ram_end = None;
        if let Some(q) = &mut qmp {
            found_status = Some(q.query_status()?);
            name = q.execute("query-name", None).ok().and_then(|v| v["name"].as_str().map(str::to_string));
            ram_end = Some(q.ram_size()?);
        }
        let ram = match (&self.ram_file, &mut qmp) {
            // QEMU's own map of the RAM block (any machine, any size),
            // cross-checked against the file.
            (Some(p), Some(q)) => Some(RamFile::open_checked(p, q.ram_layout()?)?),
            // Without QMP, the `pc` machine's split is assumed.
            (Some(p), None) => Some(RamFile::open_pc_file(p)?),
            (None, _) => None,
        };
        let mut gdb = GdbGuest::connect(self.gdb.clone())?;
        gdb.resume_on_drop = stop_is_ours(found_status.as_deref());
        let backend = match ram {
            Some(ram) => {
                // QEMU's RAM size counts only RAM; the map puts the part
                // above the PCI hole at 4 GiB.
                ram_end = Some(crate::access::PhysAccess::ram_end(&ram));
                QemuBackend::GdbRam(WithRam::new(gdb, ram))
            }
            None => QemuBackend::Gdb(gdb),
        };
        Ok(Attached { backend, qmp, found_status, name: name.unwrap_or_else(|| self.gdb.to_string()), ram_end })
    }
}

/// Whether the stop a gdbstub connection makes is ours to undo, from the run
/// state before it: unless someone else had the guest paused already
/// (`debug` is a trap's: a watcher that died left the guest there).
pub fn stop_is_ours(status_before: Option<&str>) -> bool {
    matches!(status_before, None | Some("running") | Some("debug"))
}

impl Attached {
    /// See [`stop_is_ours`].
    pub fn stop_is_ours(&self) -> bool {
        stop_is_ours(self.found_status.as_deref())
    }

    pub fn guest(&mut self) -> &mut dyn GuestAccess {
        self.backend.guest()
    }

    /// Attaches the repair flow with `image` (KASLR found, build checked).
    pub fn session(&mut self, image: builder::RepairImage, mut cfg: FlowConfig) -> Result<Session, FlowError> {
        if cfg.ram_end.is_none() {
            cfg.ram_end = self.ram_end;
        }
        Session::attach(self.backend.guest(), image, cfg)
    }
}
