//! Symbolizing kernel addresses with the vmlinux: `function+0xoff/0xsize`
//! from its ELF symbol table, `file:line` from its DWARF (through
//! `addr2line`, the gimli project's symbolizer).

use object::{Object, ObjectSymbol, SymbolKind};
use std::path::Path;

/// One text symbol.
#[derive(Clone, Debug)]
struct Func {
    addr: u64,
    size: u64,
    name: String,
}

/// A symbolized address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// Run-time address.
    pub addr: u64,
    /// `panic`, ...
    pub function: Option<String>,
    /// Offset into the function and its size.
    pub offset: u64,
    pub size: u64,
    /// `kernel/panic.c:273`.
    pub location: Option<String>,
}

impl Frame {
    /// `panic+0x0/0x2f4 (kernel/panic.c:273)`, like the kernel's `%pS`
    /// plus the source line.
    pub fn display(&self) -> String {
        let mut s = match &self.function {
            Some(f) => format!("{f}+{:#x}/{:#x}", self.offset, self.size),
            None => format!("{:#x}", self.addr),
        };
        if let Some(l) = &self.location {
            s.push_str(&format!(" ({l})"));
        }
        s
    }
}

/// Why a vmlinux cannot be read for symbols.
#[derive(Debug, thiserror::Error)]
pub enum SymbolizeError {
    #[error("cannot read the vmlinux {path}: {source}; pass the guest kernel's debug vmlinux (Debian: the -dbg package)")]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not an ELF file ({source}); pass the guest kernel's vmlinux, not its compressed vmlinuz")]
    NotElf {
        path: std::path::PathBuf,
        #[source]
        source: object::read::Error,
    },
}

/// Text symbols and line tables of one vmlinux.
pub struct Symbolizer {
    funcs: Vec<Func>,
    /// Retpoline and return thunks (`__x86_indirect_thunk_rax`, ...): asm
    /// labels without a symbol type, so not in `funcs`.
    thunks: Vec<u64>,
    lines: Option<addr2line::Loader>,
}

impl std::fmt::Debug for Symbolizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Symbolizer").field("funcs", &self.funcs.len()).finish()
    }
}

impl Symbolizer {
    /// Reads the symbol table now and the DWARF lazily.
    pub fn from_vmlinux(path: &Path) -> Result<Self, SymbolizeError> {
        let read = |source| SymbolizeError::Read { path: path.to_path_buf(), source };
        let file = std::fs::File::open(path).map_err(read)?;
        // SAFETY: the file is mapped read-only and not expected to change
        // while the symbolizer lives (a vmlinux is a build artefact).
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(read)?;
        let obj = object::File::parse(&*map).map_err(|source| SymbolizeError::NotElf { path: path.to_path_buf(), source })?;
        let mut funcs: Vec<Func> = obj
            .symbols()
            .filter(|s| s.kind() == SymbolKind::Text && s.address() != 0)
            .filter_map(|s| Some(Func { addr: s.address(), size: s.size(), name: s.name().ok()?.to_string() }))
            .collect();
        let mut thunks: Vec<u64> = obj
            .symbols()
            .filter(|s| s.name().is_ok_and(|n| n.starts_with("__x86_indirect_thunk") || n.starts_with("__x86_return_thunk")))
            .map(|s| s.address())
            .collect();
        thunks.sort_unstable();
        funcs.sort_by_key(|f| (f.addr, std::cmp::Reverse(f.size)));
        funcs.dedup_by_key(|f| f.addr);
        let lines = addr2line::Loader::new(path).ok();
        Ok(Self { funcs, thunks, lines })
    }

    /// Names from the kernel's own kallsyms (no vmlinux): functions as
    /// `function+offset/size` exactly as the kernel's `%pS` prints them
    /// (the size runs to the next symbol), no `file:line`. `slide` is
    /// run-time minus link-time for the addresses `kallsyms` holds (0 when
    /// it was read from a file, the KASLR slide when read from guest
    /// memory), so the symbolizer works in link-time addresses as the
    /// vmlinux one does.
    pub fn from_kallsyms(kallsyms: &symbols::Kallsyms, slide: u64) -> Self {
        let syms = &kallsyms.symbols;
        let link = |a: u64| a.wrapping_sub(slide);
        let mut funcs = Vec::new();
        let mut thunks = Vec::new();
        for (i, s) in syms.iter().enumerate() {
            if s.name.starts_with("__x86_indirect_thunk") || s.name.starts_with("__x86_return_thunk") {
                thunks.push(link(s.address));
            }
            if !matches!(s.kind, 'T' | 't' | 'W' | 'w') {
                continue;
            }
            let Some(next) = syms[i..].iter().find(|n| n.address > s.address) else { continue };
            funcs.push(Func { addr: link(s.address), size: next.address - s.address, name: s.name.clone() });
        }
        thunks.sort_unstable();
        funcs.sort_by_key(|f| (f.addr, std::cmp::Reverse(f.size)));
        funcs.dedup_by_key(|f| f.addr);
        Self { funcs, thunks, lines: None }
    }

    fn func(&self, link: u64) -> Option<&Func> {
        let i = self.funcs.partition_point(|f| f.addr <= link);
        let f = self.funcs.get(i.checked_sub(1)?)?;
        (link < f.addr + f.size.max(1)).then_some(f)
    }

    /// True for the link-time address of a retpoline or return thunk.
    pub fn is_thunk(&self, link: u64) -> bool {
        self.thunks.binary_search(&link).is_ok()
    }

    /// Name of the function containing `link`, without a compiler suffix
    /// (`__handle_sysrq.cold` -> `__handle_sysrq`).
    pub fn base_name(&self, link: u64) -> Option<&str> {
        self.func(link).map(|f| f.name.split('.').next().unwrap_or(&f.name))
    }

    /// Link-time address of a function by name.
    pub fn address_of(&self, name: &str) -> Option<u64> {
        self.funcs.iter().find(|f| f.name == name).map(|f| f.addr)
    }

    /// Symbolizes a run-time address under `slide`. For a return address,
    /// pass `is_return` so the line is the call's, not the next statement's.
    pub fn frame(&self, addr: u64, slide: u64, is_return: bool) -> Frame {
        let link = addr.wrapping_sub(slide);
        let probe = if is_return { link.wrapping_sub(1) } else { link };
        let (function, offset, size) = match self.func(probe) {
            Some(f) => (Some(f.name.clone()), link - f.addr, f.size),
            None => (None, 0, 0),
        };
        let location = self.lines.as_ref().and_then(|l| l.find_location(probe).ok().flatten()).and_then(|loc| {
            let file = loc.file?;
            // Paths are relative to the kernel tree in a distro build;
            // keep the part from the tree's top directories.
            let short = ["/kernel/", "/arch/", "/drivers/", "/fs/", "/mm/", "/lib/", "/include/", "/net/", "/block/"]
                .iter()
                .find_map(|d| file.find(d).map(|i| &file[i + 1..]))
                .unwrap_or(file);
            Some(match loc.line {
                Some(line) => format!("{short}:{line}"),
                None => short.to_string(),
            })
        });
        Frame { addr, function, offset, size, location }
    }
}
