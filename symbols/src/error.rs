//! The crate's error type: every message names the file and says what to do.

use std::fmt;
use std::path::PathBuf;

/// One item a [`crate::Wanted`] asked for that the vmlinux does not have.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Missing {
    /// An ELF symbol (link-time address). Alternatives (`a|b`) are kept as written.
    Symbol(String),
    /// A per-CPU variable (a symbol in `.data..percpu`).
    PerCpu(String),
    /// A struct, union or typedef with a complete definition in the DWARF.
    Type(String),
    /// A member path of a type that was found (`task_struct` `thread.sp`).
    Member { ty: String, path: String },
    /// The GNU build-id note.
    BuildId,
}

impl fmt::Display for Missing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Missing::Symbol(s) => write!(f, "symbol {s}"),
            Missing::PerCpu(s) => write!(f, "per-CPU variable {s}"),
            Missing::Type(t) => write!(f, "type {t}"),
            Missing::Member { ty, path } => write!(f, "member {ty}.{path}"),
            Missing::BuildId => write!(f, "GNU build-id note"),
        }
    }
}

/// Lists missing items as `a, b, c` for an error message.
fn list(items: &[Missing]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Why a profile could not be built.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not an ELF file (no \\x7fELF magic); pass the uncompressed vmlinux, not a bzImage or vmlinuz")]
    NotElf { path: PathBuf },
    #[error("{path} is a truncated or malformed ELF file: {source}")]
    BadElf {
        path: PathBuf,
        #[source]
        source: object::Error,
    },
    #[error("{path} has no DWARF ({section} missing); install the kernel's -dbg package (e.g. linux-image-<release>-dbg) and pass its vmlinux")]
    NoDebugInfo {
        path: PathBuf,
        section: &'static str,
    },
    #[error("{path} has no symbol table (.symtab missing; stripped?); pass the unstripped vmlinux from the kernel's -dbg package")]
    NoSymbolTable { path: PathBuf },
    #[error("{path}: malformed DWARF in .debug_info near offset {offset:#x}: {source}")]
    Dwarf {
        path: PathBuf,
        offset: u64,
        #[source]
        source: gimli::Error,
    },
    #[error("{path}: {} required item(s) missing: {}", missing.len(), list(missing))]
    Missing {
        path: PathBuf,
        missing: Vec<Missing>,
    },
    #[error("{path}: {source}")]
    Btf {
        path: PathBuf,
        #[source]
        source: crate::btf::BtfError,
    },
    #[error("{path} has no BTF (.BTF section missing); the kernel needs CONFIG_DEBUG_INFO_BTF=y (every Debian kernel since 5.10 has it), else pass its vmlinux with DWARF (--vmlinux)")]
    NoBtf { path: PathBuf },
    #[error("{path}: {source}")]
    Kallsyms {
        path: PathBuf,
        #[source]
        source: crate::kallsyms::KallsymsError,
    },
    #[error("{path}: {source}")]
    Vmlinuz {
        path: PathBuf,
        #[source]
        source: crate::vmlinuz::VmlinuzError,
    },
    #[error("invalid profile JSON: {0}")]
    Json(#[from] serde_json::Error),
}
