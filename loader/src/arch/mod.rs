//! Architecture-specific pieces of the loader.
pub mod x86_64;
