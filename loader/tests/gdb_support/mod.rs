//! A bare QEMU (no kernel, no firmware run: `-S`) for protocol tests,
//! through the one launcher, [`harness::Guest`]
//! ([`harness::GuestConfig::without_kernel`]); killed when the test ends,
//! even on panic.
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

use harness::{Guest, GuestConfig, Kernel};
use loader::access::Endpoint;

pub struct Qemu {
    pub guest: Guest,
    pub gdb: Endpoint,
    pub qmp: Endpoint,
    pub ram_file: Option<PathBuf>,
}

pub struct Opts {
    pub smp: u32,
    pub mem_mb: u32,
    /// Back RAM with a shared file (`memory-backend-file`).
    pub ram_file: bool,
    /// gdbstub on TCP instead of a Unix socket.
    pub gdb_tcp: bool,
    /// More QEMU arguments.
    pub extra: Vec<&'static str>,
}

impl Default for Opts {
    fn default() -> Self {
        Self { smp: 2, mem_mb: 64, ram_file: false, gdb_tcp: false, extra: Vec::new() }
    }
}

impl Qemu {
    pub fn start(o: Opts) -> Self {
        // The kernel is unused without one.
        let mut cfg = GuestConfig::new(Kernel::Debian).without_kernel();
        cfg.cpus = o.smp;
        cfg.mem_mib = o.mem_mb;
        cfg.ram_file = o.ram_file;
        cfg.gdb_tcp = o.gdb_tcp;
        cfg.qemu_args = o.extra.iter().map(|a| a.to_string()).collect();
        let guest = Guest::boot(&cfg).unwrap_or_else(|e| panic!("starting QEMU: {e}"));
        let gdb = guest.gdb_addr().parse().unwrap();
        let qmp = guest.qmp_addr().parse().unwrap();
        let ram_file = guest.ram_file();
        Self { guest, gdb, qmp, ram_file }
    }

    /// A file in a scratch directory that lives as long as QEMU.
    pub fn path(&self, name: &str) -> PathBuf {
        self.guest.dir().join(name)
    }

    pub fn wait_exit(&mut self, within: Duration) -> bool {
        self.guest.wait_exit(within).unwrap().is_some()
    }

    pub fn pid(&self) -> u32 {
        self.guest.qemu_pid()
    }
}
