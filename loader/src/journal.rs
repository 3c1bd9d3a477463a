//! The repair journal: what a repair changes in the guest, written down
//! before it changes it, so that a watcher killed in the middle of a repair
//! (between staging the repair kernel and restoring the guest, ~20 ms) can
//! be undone by whoever comes next: the restarted watcher, or the
//! supervisor cleaning up (see [`crate::supervise`]).
//!
//! One file: a magic line, the vCPU, its registers at the trap, and the
//! guest-physical range borrowed with its bytes as they were. Written (to a
//! temporary name, then renamed) before anything is staged; removed once
//! the guest is restored.

use crate::access::{AccessError, CpuState, GuestAccess, Gpa, VcpuId};
use crate::arch::x86_64::regs::{field_mut, CPU_STATE_REGS};
use std::io::Write;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 16] = b"repair-journal1\n";

/// A repair in progress, as it must be undone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Journal {
    pub vcpu: VcpuId,
    /// The vCPU's registers at the trap.
    pub regs: CpuState,
    /// Where the borrowed bytes go back.
    pub base: Gpa,
    /// The borrowed range's bytes before staging (empty for a reserved
    /// range, which holds nothing of the guest's).
    pub saved: Vec<u8>,
}

/// Errors of the journal: its file, or the guest while undoing.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("the repair journal {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the repair journal {0} is not one of ours (bad magic or length); remove it")]
    Malformed(PathBuf),
    #[error("undoing the journalled repair: {0}")]
    Guest(#[from] AccessError),
}

impl Journal {
    fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(MAGIC.len() + 8 * 36 + self.saved.len());
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&u64::from(self.vcpu.0).to_le_bytes());
        let mut regs = self.regs;
        for name in CPU_STATE_REGS {
            let v = field_mut(&mut regs, name).map_or(0, |v| *v);
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(&self.base.0.to_le_bytes());
        b.extend_from_slice(&(self.saved.len() as u64).to_le_bytes());
        b.extend_from_slice(&self.saved);
        b
    }

    fn decode(b: &[u8]) -> Option<Journal> {
        let mut rest = b.strip_prefix(MAGIC.as_slice())?;
        let mut word = || -> Option<u64> {
            let (w, r) = rest.split_first_chunk::<8>()?;
            rest = r;
            Some(u64::from_le_bytes(*w))
        };
        let vcpu = VcpuId(u32::try_from(word()?).ok()?);
        let mut regs = CpuState::default();
        for name in CPU_STATE_REGS {
            let v = word()?;
            if let Some(f) = field_mut(&mut regs, name) {
                *f = v;
            }
        }
        let base = Gpa(word()?);
        let len = usize::try_from(word()?).ok()?;
        (rest.len() == len).then(|| Journal { vcpu, regs, base, saved: rest.to_vec() })
    }

    /// Writes the journal to `path` (whole, or not at all).
    pub fn write(&self, path: &Path) -> Result<(), JournalError> {
        let io = |source| JournalError::Io { path: path.to_path_buf(), source };
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(&self.encode()).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }

    /// The journal at `path`, if a repair was left in progress there.
    pub fn read(path: &Path) -> Result<Option<Journal>, JournalError> {
        match std::fs::read(path) {
            Ok(b) => Journal::decode(&b).map(Some).ok_or_else(|| JournalError::Malformed(path.to_path_buf())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(JournalError::Io { path: path.to_path_buf(), source }),
        }
    }

    /// Puts the guest back as it was at the trap: the borrowed bytes, then
    /// the vCPU's registers (the guest must be stopped).
    pub fn undo<G: GuestAccess + ?Sized>(&self, guest: &mut G) -> Result<(), JournalError> {
        if !self.saved.is_empty() {
            // Through the backend's code path: the repair kernel's bytes
            // may sit in an emulator's translated-code cache.
            guest.write_phys(self.base, &self.saved)?;
        }
        guest.set_regs(self.vcpu, &self.regs)?;
        Ok(())
    }
}

/// Removes the journal once the guest is restored.
pub fn clear(path: &Path) {
    let _ = std::fs::remove_file(path);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_what_is_not_whole() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("journal");
        assert_eq!(Journal::read(&p).unwrap(), None);
        let j = Journal {
            vcpu: VcpuId(1),
            regs: CpuState { rip: 0xffff_ffff_8100_0000, rsp: 0x1234, efer: 0xd01, ..Default::default() },
            base: Gpa(0x10000),
            saved: (0..=255u8).cycle().take(5000).collect(),
        };
        j.write(&p).unwrap();
        assert_eq!(Journal::read(&p).unwrap(), Some(j.clone()));
        let b = std::fs::read(&p).unwrap();
        std::fs::write(&p, &b[..b.len() - 1]).unwrap();
        assert!(matches!(Journal::read(&p), Err(JournalError::Malformed(_))));
        std::fs::write(&p, b"garbage").unwrap();
        assert!(matches!(Journal::read(&p), Err(JournalError::Malformed(_))));
        clear(&p);
        assert_eq!(Journal::read(&p).unwrap(), None);
    }

    #[test]
    fn undo_restores_memory_and_registers() {
        let mut g = crate::testing::MemGuest::new(0x40000, 2);
        g.write_phys(Gpa(0x10000), &[0xaa; 64]).unwrap();
        let j = Journal { vcpu: VcpuId(1), regs: CpuState { rip: 0x42, ..Default::default() }, base: Gpa(0x10000), saved: vec![7; 64] };
        j.undo(&mut g).unwrap();
        let mut b = [0u8; 64];
        g.read_phys(Gpa(0x10000), &mut b).unwrap();
        assert_eq!(b, [7; 64]);
        assert_eq!(g.get_regs(VcpuId(1)).unwrap().rip, 0x42);
    }
}
