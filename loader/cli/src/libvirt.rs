//! `--libvirt DOMAIN`: a libvirt guest reached through libvirt alone.
//!
//! [`link`] resolves a domain to what the one attach takes: a QMP endpoint
//! served from libvirt ([`loader::libvirt::QmpBridge`]: commands through
//! libvirt's monitor passthrough, run-state events from libvirt's own), the
//! QEMU pid (libvirt's pid file) and, for RAM in a memfd or file, QEMU's
//! descriptor of it as the RAM file. The gdbstub is then opened through that
//! QMP at run time (HMP `gdbserver`), as for `--qmp` alone.

use anyhow::{Context, Result};
use loader::access::AccessError;
use loader::libvirt::{Domain, LibvirtError, QmpBridge};
use std::sync::atomic::{AtomicBool, Ordering};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// A domain linked for the attach; keep it for as long as the guest is
/// reached through it (dropping it ends its QMP endpoint).
#[derive(Debug)]
pub struct Link {
    pub bridge: QmpBridge,
    /// QEMU's pid.
    pub pid: u32,
    /// QEMU's descriptor of the RAM block's memfd or file, when RAM is
    /// shared; `None`: RAM is QEMU's private memory (read through the
    /// gdbstub, slowly; no `--hangs`).
    pub ram_file: Option<PathBuf>,
}

impl Link {
    /// `unix:PATH` of the bridge, for `--qmp`.
    pub fn qmp_addr(&self) -> String {
        self.bridge.endpoint().to_string()
    }
}

/// Links `name` on `uri`. With `wait`, a domain whose QEMU does not answer
/// yet is waited for that long (or until `stop`); a domain that is not
/// running (or no longer exists) is the guest gone, at once.
pub fn link(name: &str, uri: Option<&str>, wait: Option<Duration>, stop: &AtomicBool) -> Result<Link> {
    let domain = Domain::new(name, uri.map(str::to_string));
    let deadline = wait.map(|w| Instant::now() + w);
    let bridge = loop {
        match QmpBridge::start(domain.clone()) {
            Ok(b) => break b,
            Err(e @ LibvirtError::NotRunning(_)) => return Err(AccessError::from(e).into()),
            Err(e) if deadline.is_some_and(|d| Instant::now() < d) && !stop.load(Ordering::Relaxed) => {
                tracing::info!("libvirt domain {name:?} not reachable yet ({e}); waiting");
                std::thread::sleep(Duration::from_secs(1));
            }
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("reaching libvirt domain {name:?}{}", uri.map(|u| format!(" on {u}")).unwrap_or_default())
                })
            }
        }
    };
    let pid = domain.qemu_pid()?;
    let ram_file = domain.ram_file(pid).with_context(|| format!("finding the RAM of libvirt domain {name:?}"))?;
    if ram_file.is_none() {
        eprintln!(
            "repair-guest: libvirt domain {name:?} keeps its RAM private: it is read through the gdbstub (slow), \
             and --hangs is not available. Give it shared RAM: <memoryBacking><source type='memfd'/>\
             <access mode='shared'/></memoryBacking>"
        );
    }
    Ok(Link { bridge, pid, ram_file })
}

/// Whether an attach failed because the guest's kernel is not up yet
/// (firmware, boot loader, decompressor): worth trying again.
pub fn kernel_not_up(e: &anyhow::Error) -> bool {
    use loader::access::AccessError;
    use loader::flow::FlowError;
    use loader::kaslr::KaslrError;
    e.chain().any(|c| {
        matches!(
            c.downcast_ref::<FlowError>(),
            Some(FlowError::Kaslr(KaslrError::NothingMapped { .. }))
                | Some(FlowError::Access(AccessError::NotMapped(_) | AccessError::OutOfRam { .. }))
        ) || matches!(c.downcast_ref::<KaslrError>(), Some(KaslrError::NothingMapped { .. }))
            || matches!(c.downcast_ref::<AccessError>(), Some(AccessError::NotMapped(_) | AccessError::OutOfRam { .. }))
    })
}
