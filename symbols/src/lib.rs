//! Reads a Linux `vmlinux` (ELF + DWARF) into a compact kernel [`Profile`]:
//! the build identity, the addresses of the symbols the repair kernel needs,
//! per-CPU variable offsets, and the layouts of the structs it walks.
//!
//! ```no_run
//! use symbols::{Profile, Wanted};
//! let wanted = Wanted {
//!     symbols: &["init_task", "panic", "panic_cpu?"],
//!     percpu: &["pcpu_hot|current_task"],
//!     types: &[("task_struct", &["pid", "__state|state", "thread.sp"])],
//! };
//! let p = Profile::from_vmlinux("vmlinux".as_ref(), &wanted)?;
//! let sp = p.offset("task_struct", "thread.sp");
//! let state = p.offset("task_struct", "__state").or(p.offset("task_struct", "state"));
//! println!("{} {:?} {:?}", p.release, sp, state);
//! # Ok::<(), symbols::Error>(())
//! ```
//!
//! Without DWARF (no `-dbg` package), the same profile comes from the
//! kernel's own BTF and kallsyms: [`profile_from_kernel_elf`] reads the ELF
//! inside a vmlinuz ([`read_vmlinuz`], [`vmlinuz`]), [`profile_from_btf`]
//! takes BTF and a decoded [`Kallsyms`] from anywhere (the loader's
//! `--image auto` reads them from guest memory). The readers ([`btf`],
//! [`kallsyms`], [`vmlinuz`]) take hostile input: bounded, fuzzed.
//!
//! What to extract is data, a [`Wanted`] table, or a [`WantedList`] built
//! name by name (the builder derives the repair kernel's from its layout
//! table, `repair_kernel::layout::ITEMS`). Layout drift is decided by which
//! members exist (`__state` versus `state`), never by kernel version.
//!
//! # JSON shape
//!
//! [`Profile::to_json`] writes (field names are stable):
//!
//! ```text
//! {
//!   "build_id": "hex",                      GNU build-id
//!   "banner":   "Linux version ...\n",       linux_banner up to its NUL
//!   "release":  "6.1.0-56-cloud-amd64",      from the banner
//!   "arch":     "x86_64",
//!   "text":     {"start": N, "end": N},      [_stext, _etext)
//!   "rodata":   {"start": N, "end": N},      [__start_rodata, __end_rodata)
//!   "symbols":  {name: {"address": N, "size": N}},   link-time addresses
//!   "percpu":   {name: N},                   offset in the per-CPU area
//!   "producer": "GNU C11 12.2.0 ...",        DW_AT_producer of the first C unit
//!   "types":    {name: {"size": N,
//!                       "members": {path: {"offset": N, "size": N,
//!                                          "bit_offset": N?, "bit_size": N?}}}}
//! }
//! ```
//!
//! Numbers are decimal JSON integers. Member paths are dotted (`thread.sp`);
//! members of anonymous structs and unions appear under their own names, as
//! C spells them. Bitfields give the storage unit in `offset`/`size` and the
//! bits inside it in `bit_offset` (from the least significant bit) and
//! `bit_size`, as `pahole` prints them.
//!
//! # How it is fast
//!
//! The file is mmapped and read zero-copy. `.debug_info` is scanned unit by
//! unit looking only at top-level DIEs, skipping over everything else by
//! sibling pointers, and the scan stops as soon as every wanted type is
//! found; pages it has passed are dropped from the process. See
//! `symbols/DESIGN.md`.

pub mod btf;
mod dwarf;
mod elf;
mod error;
pub mod kallsyms;
mod kernel;
mod profile;
mod system_map;
pub mod vmlinuz;
mod wanted;

pub use error::{Error, Missing};
pub use kallsyms::Kallsyms;
pub use kernel::{
    build_id_from_notes, find_build_id_notes, profile_from_btf, profile_from_kernel_elf, read_vmlinuz,
    BtfSources, KernelElf,
};
pub use profile::{
    from_bytes_strict, producer_has_gcc_randstruct_plugin, read_build_id, read_identity, unit_ranges_from_vmlinux, Identity,
    Member, Profile, Range, Symbol, TypeLayout,
};
pub use system_map::parse_system_map;
pub use wanted::{Wanted, WantedList};
