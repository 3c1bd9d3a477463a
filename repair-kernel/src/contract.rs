//! The contract between the loader and the repair kernel: one versioned
//! `#[repr(C)]` block in guest memory, defined here once and used by both
//! sides (the loader writes the input half and reads the output half; the
//! bare-metal repair kernel does the opposite).
//!
//! Every field is a plain integer or byte array so that the block has the same
//! bytes on the host and in the guest, whatever the compiler.

use crate::layout::KernelLayout;

/// `"RPRCNTRC"`, little endian.
pub const CONTRACT_MAGIC: u64 = u64::from_le_bytes(*b"RPRCNTRC");
/// Bumped on any change of the block's layout.
pub const CONTRACT_VERSION: u32 = 1;

/// Register state of one x86_64 vCPU as both backends (gdbstub, KVM) see it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuState {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rbp: u64,
    pub rsp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub rip: u64,
    pub rflags: u64,
    pub cs: u64,
    pub ss: u64,
    pub ds: u64,
    pub es: u64,
    pub fs: u64,
    pub gs: u64,
    pub fs_base: u64,
    pub gs_base: u64,
    pub kernel_gs_base: u64,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
}

/// Where the repair kernel's run stands; written by the repair kernel.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunStatus {
    /// Written by the loader before the run.
    NotRun = 0,
    /// The repair kernel is running (set at entry).
    Running = 1,
    /// Finished; `verdict` is valid.
    Done = 2,
    /// A CPU exception ended the run; `fault` is valid.
    Faulted = 3,
}

impl RunStatus {
    pub fn from_u32(v: u32) -> Option<Self> {
        Some(match v {
            0 => Self::NotRun,
            1 => Self::Running,
            2 => Self::Done,
            3 => Self::Faulted,
            _ => return None,
        })
    }
}

/// The action of a verdict.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Nothing decided (no verdict).
    None = 0,
    /// Kill the offending task: resume with `ContractOut::resume`.
    Kill = 1,
    /// Leave the guest as it was: let its panic complete.
    Decline = 2,
    /// Take a warning that `panic_on_warn` made fatal back to the warning
    /// (`crate::warn`): resume with `ContractOut::resume`, at the return
    /// from `check_panic_on_warn`; the offender, if any, has SIGKILL
    /// pending.
    ResumeWarning = 3,
}

impl Action {
    pub fn from_u32(v: u32) -> Option<Self> {
        Some(match v {
            0 => Self::None,
            1 => Self::Kill,
            2 => Self::Decline,
            3 => Self::ResumeWarning,
            _ => return None,
        })
    }

    /// The name events and reports use.
    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Kill => "kill",
            Self::Decline => "decline",
            Self::ResumeWarning => "resume-warning",
        }
    }

    /// True when the verdict resumes the crashed vCPU with
    /// `ContractOut::resume` instead of letting the panic complete.
    pub fn resumes(self) -> bool {
        matches!(self, Self::Kill | Self::ResumeWarning)
    }
}

/// A CPU exception taken by the repair kernel itself.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Fault {
    pub vector: u64,
    pub error_code: u64,
    pub rip: u64,
    pub cr2: u64,
}

/// Bytes of the crash message kept in the block.
pub const MESSAGE_LEN: usize = 256;
/// Bytes of the verdict's explanation kept in the block.
pub const REASON_LEN: usize = 256;

/// The loader's half: what the repair kernel is given.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ContractIn {
    /// The crashed vCPU's registers at the trap (at the entry of `panic`).
    pub crashed: CpuState,
    /// Index of the crashed vCPU.
    pub cpu: u32,
    /// Number of vCPUs of the guest.
    pub nr_vcpus: u32,
    /// Run-time minus link-time address of kernel text (the KASLR slide).
    pub kaslr_slide: u64,
    /// Guest-physical addresses `[0, ram_end)` may be read; nothing above.
    pub ram_end: u64,
    /// Guest-physical address of the borrowed or staged range, and its size.
    pub borrowed_base: u64,
    pub borrowed_size: u64,
    /// Upper bound on tasks walked before the walk is declared corrupt.
    pub max_tasks: u32,
    /// Non-zero: diagnose only, decide nothing that changes the guest.
    pub read_only: u32,
    /// Symbol addresses and struct offsets of the guest's kernel build.
    pub layout: KernelLayout,
}

/// The repair kernel's half: what it found and decided.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ContractOut {
    /// A [`RunStatus`].
    pub status: u32,
    /// An [`Action`].
    pub action: u32,
    /// A `crate::verdict` reason code (why killed, or why declined).
    pub reason_code: u32,
    /// The crashed vCPU's index as the repair kernel saw it.
    pub cpu: u32,
    /// The offending task.
    pub pid: i32,
    pub tgid: i32,
    pub comm: [u8; 16],
    /// A `crate::verdict` crash kind code.
    pub crash_kind: u32,
    /// Number of tasks found by the task-list walk.
    pub nr_tasks: u32,
    /// The panic message (NUL-terminated unless full).
    pub message: [u8; MESSAGE_LEN],
    /// The verdict's explanation for an operator (NUL-terminated unless full).
    pub reason: [u8; REASON_LEN],
    /// The register state to resume the crashed vCPU with, for `Kill` and
    /// `ResumeWarning`.
    pub resume: CpuState,
    /// The exception that ended the run, for `Faulted`.
    pub fault: Fault,
    /// Count of 4 KiB pages of kernel text/rodata restored from the image.
    pub pages_restored: u32,
    pub _pad: u32,
}

/// The whole block.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Contract {
    pub magic: u64,
    pub version: u32,
    /// `size_of::<Contract>()`, so each side can check the other's build.
    pub size: u32,
    pub input: ContractIn,
    pub output: ContractOut,
}

impl Contract {
    /// A block ready for the loader to fill.
    pub fn new(input: ContractIn) -> Self {
        Self {
            magic: CONTRACT_MAGIC,
            version: CONTRACT_VERSION,
            size: core::mem::size_of::<Contract>() as u32,
            input,
            output: ContractOut::empty(),
        }
    }

    /// True when magic, version and size match this build's.
    pub fn is_valid(&self) -> bool {
        self.magic == CONTRACT_MAGIC
            && self.version == CONTRACT_VERSION
            && self.size as usize == core::mem::size_of::<Contract>()
    }

    /// The block as bytes, to write into guest memory.
    pub fn as_bytes(&self) -> &[u8] {
        // SAFETY: `Contract` is `repr(C)`, made only of integers and byte
        // arrays with no padding holes left uninitialised by `new`/`empty`
        // (every field is written), so all its bytes are initialised.
        unsafe {
            core::slice::from_raw_parts(
                (self as *const Self).cast::<u8>(),
                core::mem::size_of::<Self>(),
            )
        }
    }

    /// Reads a block back from bytes (for example read from guest memory).
    /// `None` if too short or not a valid block of this version.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        if bytes.len() < core::mem::size_of::<Self>() {
            return None;
        }
        // SAFETY: the length was checked; `read_unaligned` copes with any
        // alignment; every bit pattern is a valid `Contract` because all its
        // fields are integers or byte arrays.
        let c = unsafe { core::ptr::read_unaligned(bytes.as_ptr().cast::<Self>()) };
        c.is_valid().then_some(c)
    }
}

impl ContractOut {
    /// An output half with nothing decided.
    pub const fn empty() -> Self {
        Self {
            status: RunStatus::NotRun as u32,
            action: Action::None as u32,
            reason_code: 0,
            cpu: 0,
            pid: 0,
            tgid: 0,
            comm: [0; 16],
            crash_kind: 0,
            nr_tasks: 0,
            message: [0; MESSAGE_LEN],
            reason: [0; REASON_LEN],
            resume: CpuState {
                rax: 0, rbx: 0, rcx: 0, rdx: 0, rsi: 0, rdi: 0, rbp: 0, rsp: 0,
                r8: 0, r9: 0, r10: 0, r11: 0, r12: 0, r13: 0, r14: 0, r15: 0,
                rip: 0, rflags: 0, cs: 0, ss: 0, ds: 0, es: 0, fs: 0, gs: 0,
                fs_base: 0, gs_base: 0, kernel_gs_base: 0,
                cr0: 0, cr2: 0, cr3: 0, cr4: 0, efer: 0,
            },
            fault: Fault { vector: 0, error_code: 0, rip: 0, cr2: 0 },
            pages_restored: 0,
            _pad: 0,
        }
    }
}

/// A NUL-terminated byte field as text (lossy: stops at the first NUL or
/// invalid byte).
pub fn field_str(bytes: &[u8]) -> &str {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    match core::str::from_utf8(&bytes[..end]) {
        Ok(s) => s,
        Err(e) => core::str::from_utf8(&bytes[..e.valid_up_to()]).unwrap_or(""),
    }
}

/// Copies text into a fixed byte field, truncating, NUL-terminating if room.
pub fn set_field(dst: &mut [u8], src: &[u8]) {
    let n = src.len().min(dst.len());
    dst[..n].copy_from_slice(&src[..n]);
    for b in &mut dst[n..] {
        *b = 0;
    }
}

/// [`Fault::vector`] of a Rust panic inside the repair kernel (not a CPU
/// exception; the message is in `reason`).
pub const VECTOR_PANIC: u64 = 0x100;
/// [`Fault::vector`] of the repair kernel's own stack overflowing into its
/// guard page.
pub const VECTOR_STACK_OVERFLOW: u64 = 0x101;

/// `"RPRINTEG"`: magic of an [`IntegrityTable`].
pub const INTEGRITY_MAGIC: u64 = u64::from_le_bytes(*b"RPRINTEG");
/// Version of the [`IntegrityTable`] layout.
pub const INTEGRITY_VERSION: u64 = 1;

/// The image's integrity data as the loader stages it for the repair
/// kernel: its virtual address goes in `rsi` at entry (0: none). Every
/// address is in the repair kernel's window, mapped read-only.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IntegrityTable {
    /// [`INTEGRITY_MAGIC`].
    pub magic: u64,
    /// [`INTEGRITY_VERSION`].
    pub version: u64,
    /// `crate::integrity::PageHash` records (40 bytes each), sorted.
    pub hashes: u64,
    pub n_hashes: u64,
    /// `crate::integrity::SkipSite` records (16 bytes each), sorted.
    pub skips: u64,
    pub n_skips: u64,
    /// Sorted `u64` link-time page addresses of the pristine pages...
    pub pristine_index: u64,
    /// ...and the pages themselves, 4 KiB each, in the same order.
    pub pristine_pages: u64,
    pub n_pristine: u64,
}

impl IntegrityTable {
    /// The table's bytes, little endian, as staged in guest memory.
    pub fn to_le_bytes(&self) -> [u8; 72] {
        let words = [
            self.magic,
            self.version,
            self.hashes,
            self.n_hashes,
            self.skips,
            self.n_skips,
            self.pristine_index,
            self.pristine_pages,
            self.n_pristine,
        ];
        let mut out = [0u8; 72];
        for (i, w) in words.iter().enumerate() {
            out[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
        }
        out
    }
}
