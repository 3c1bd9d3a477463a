//! The ELF side of a vmlinux: identity, symbol table, DWARF sections.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::path::Path;

use object::{Object, ObjectSection, ObjectSymbol, ObjectSymbolTable, SectionIndex, SymbolSection};

use crate::error::Error;

/// An ELF symbol as the profile needs it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SymInfo {
    pub address: u64,
    pub size: u64,
    pub section: Option<SectionIndex>,
    pub global: bool,
}

/// A parsed vmlinux.
pub(crate) struct Elf<'a> {
    pub file: object::File<'a>,
}

impl<'a> Elf<'a> {
    /// Parses `data`, checking the magic first so a bzImage or a text file
    /// gets a clear message rather than a parser's.
    pub fn parse(data: &'a [u8], path: &Path) -> Result<Self, Error> {
        if !data.starts_with(b"\x7fELF") {
            return Err(Error::NotElf {
                path: path.to_owned(),
            });
        }
        let file = object::File::parse(data).map_err(|source| Error::BadElf {
            path: path.to_owned(),
            source,
        })?;
        Ok(Self { file })
    }

    /// The GNU build-id as lower-case hex.
    pub fn build_id(&self, path: &Path) -> Result<Option<String>, Error> {
        let id = self.file.build_id().map_err(|source| Error::BadElf {
            path: path.to_owned(),
            source,
        })?;
        Ok(id.map(hex))
    }

    /// The architecture, named as `uname -m` does.
    pub fn arch(&self) -> String {
        use object::Architecture as A;
        match self.file.architecture() {
            A::X86_64 => "x86_64".into(),
            A::I386 => "i386".into(),
            A::Aarch64 => "aarch64".into(),
            A::Arm => "arm".into(),
            A::Riscv64 => "riscv64".into(),
            A::PowerPc64 => "ppc64".into(),
            A::S390x => "s390x".into(),
            other => format!("{other:?}").to_lowercase(),
        }
    }

    /// Looks up `names` in `.symtab`. Where a name occurs more than once, a
    /// global symbol wins over a local one, then the first.
    pub fn symbols(
        &self,
        names: &HashSet<&str>,
        path: &Path,
    ) -> Result<HashMap<String, SymInfo>, Error> {
        let table = self
            .file
            .symbol_table()
            .ok_or_else(|| Error::NoSymbolTable {
                path: path.to_owned(),
            })?;
        let mut out: HashMap<String, SymInfo> = HashMap::new();
        for sym in table.symbols() {
            let Ok(name) = sym.name() else { continue };
            if !names.contains(name) {
                continue;
            }
            let info = SymInfo {
                address: sym.address(),
                size: sym.size(),
                section: match sym.section() {
                    SymbolSection::Section(i) => Some(i),
                    _ => None,
                },
                global: sym.is_global(),
            };
            match out.get(name) {
                Some(old) if old.global || !info.global => {}
                _ => {
                    out.insert(name.to_owned(), info);
                }
            }
        }
        Ok(out)
    }

    /// The index and link address of `.data..percpu`, where per-CPU
    /// variables live (it links at 0 in an SMP x86_64 vmlinux).
    pub fn percpu_section(&self) -> Option<(SectionIndex, u64)> {
        self.file
            .section_by_name(".data..percpu")
            .map(|s| (s.index(), s.address()))
    }

    /// The NUL-terminated bytes of a symbol in a section with file data
    /// (`linux_banner` in `.rodata`), at most `size` bytes.
    pub fn symbol_bytes(&self, sym: &SymInfo) -> Option<&'a [u8]> {
        let section = self.file.section_by_index(sym.section?).ok()?;
        let data = section.data().ok()?;
        let start = usize::try_from(sym.address.checked_sub(section.address())?).ok()?;
        let len = usize::try_from(sym.size).ok()?;
        let bytes = data.get(start..start.checked_add(len)?)?;
        let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
        Some(&bytes[..end])
    }

    /// One DWARF section, decompressed if needed; empty when absent.
    pub fn dwarf_section(&self, name: &str, path: &Path) -> Result<Cow<'a, [u8]>, Error> {
        match self.file.section_by_name(name) {
            Some(s) => s.uncompressed_data().map_err(|source| Error::BadElf {
                path: path.to_owned(),
                source,
            }),
            None => Ok(Cow::Borrowed(&[])),
        }
    }

    /// Where `.debug_info` sits in the file, when it is stored uncompressed
    /// (so its pages can be dropped after the scan has passed them).
    pub fn debug_info_file_offset(&self) -> Option<u64> {
        let s = self.file.section_by_name(".debug_info")?;
        let r = s.compressed_file_range().ok()?;
        (r.format == object::CompressionFormat::None).then_some(r.offset)
    }

    pub fn little_endian(&self) -> bool {
        self.file.is_little_endian()
    }

    pub fn has_section(&self, name: &str) -> bool {
        self.file.section_by_name(name).is_some()
    }
}

/// Lower-case hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The release in a banner: `Linux version 6.1.0-56-cloud-amd64 (...)`.
pub(crate) fn release_from_banner(banner: &str) -> Option<String> {
    let rest = banner.strip_prefix("Linux version ")?;
    rest.split_ascii_whitespace().next().map(str::to_owned)
}
