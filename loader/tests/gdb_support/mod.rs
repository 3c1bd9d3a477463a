//! A bare QEMU (no kernel, no firmware run: `-S`) for protocol tests,
//! killed when the test ends, even on panic.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use loader::access::Endpoint;

pub struct Qemu {
    child: Child,
    pub dir: tempfile::TempDir,
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

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Qemu {
    pub fn start(o: Opts) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let gdb_sock = dir.path().join("gdb.sock");
        let qmp_sock = dir.path().join("qmp.sock");
        let (gdb_arg, gdb) = if o.gdb_tcp {
            let port = free_port();
            (format!("tcp:127.0.0.1:{port},server=on,wait=off"), Endpoint::Tcp(format!("127.0.0.1:{port}")))
        } else {
            (format!("unix:{},server=on,wait=off", gdb_sock.display()), Endpoint::Unix(gdb_sock.clone()))
        };
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-accel", "tcg", "-S", "-display", "none", "-nodefaults", "-no-user-config"])
            .args(["-smp", &o.smp.to_string(), "-m", &format!("{}M", o.mem_mb)])
            .args(["-gdb", &gdb_arg])
            .args(["-qmp", &format!("unix:{},server=on,wait=off", qmp_sock.display())])
            .args(["-pidfile", &dir.path().join("qemu.pid").display().to_string()]);
        let ram_file = o.ram_file.then(|| dir.path().join("ram"));
        if let Some(f) = &ram_file {
            cmd.args([
                "-object",
                &format!("memory-backend-file,id=ram0,size={}M,mem-path={},share=on", o.mem_mb, f.display()),
                "-machine",
                "memory-backend=ram0",
            ]);
        }
        cmd.args(&o.extra);
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        // SAFETY: prctl is async-signal-safe; the closure touches no
        // memory of the parent.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd.spawn().expect("qemu-system-x86_64 must be installed (apt-get install qemu-system-x86)");
        let mut q = Self { child, dir, gdb, qmp: Endpoint::Unix(qmp_sock.clone()), ram_file };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !(qmp_sock.exists() && (o.gdb_tcp || gdb_sock.exists())) {
            if let Ok(Some(st)) = q.child.try_wait() {
                let mut err = String::new();
                use std::io::Read;
                q.child.stderr.take().map(|mut e| e.read_to_string(&mut err));
                panic!("QEMU exited at start ({st}): {err}");
            }
            assert!(Instant::now() < deadline, "QEMU did not create its sockets in 20 s");
            std::thread::sleep(Duration::from_millis(20));
        }
        if o.gdb_tcp {
            std::thread::sleep(Duration::from_millis(200));
        }
        q
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn has_exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    pub fn wait_exit(&mut self, within: Duration) -> bool {
        let d = Instant::now() + within;
        while Instant::now() < d {
            if self.has_exited() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    pub fn pid_file(&self) -> PathBuf {
        self.dir.path().join("qemu.pid")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn exists(p: &Path) -> bool {
    p.exists()
}
