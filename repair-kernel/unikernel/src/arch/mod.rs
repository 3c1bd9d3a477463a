//! Architecture-specific code: entry, descriptor tables, port I/O and raw
//! memory copies. Only x86_64 exists; a second architecture goes beside it.
pub mod x86_64;
pub use self::x86_64::*;
