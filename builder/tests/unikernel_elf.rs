//! The embedded repair kernel is what the loader expects: a static x86_64
//! executable linked at the fixed base, with `repair_done`.

use builder::image::{PF_W, PF_X};
use builder::{builtin_unikernel, UNIKERNEL_ELF, UNIKERNEL_LINK_BASE};
use object::{Object, ObjectSymbol};

#[test]
fn static_elf_at_fixed_base() {
    let file = object::File::parse(UNIKERNEL_ELF).unwrap();
    assert_eq!(file.architecture(), object::Architecture::X86_64);
    assert_eq!(file.kind(), object::ObjectKind::Executable, "ET_EXEC, not PIE");
    assert!(file.dynamic_relocations().is_none_or(|mut r| r.next().is_none()), "no relocations");
    assert!(file.section_by_name(".dynamic").is_none());
    assert!(file.section_by_name(".interp").is_none());
    let sym = |n: &str| file.symbols().find(|s| s.name() == Ok(n)).map(|s| s.address());
    assert_eq!(sym("_start"), Some(UNIKERNEL_LINK_BASE));
    assert_eq!(file.entry(), UNIKERNEL_LINK_BASE);
    assert!(sym("repair_done").is_some());

    let u = builtin_unikernel().unwrap();
    assert_eq!(u.link_base, UNIKERNEL_LINK_BASE);
    assert_eq!(u.entry, UNIKERNEL_LINK_BASE);
    assert_eq!(Some(u.done), sym("repair_done"));
    // W^X: code is not writable, data is not executable.
    for s in &u.segments {
        assert!(s.flags & PF_W == 0 || s.flags & PF_X == 0, "{:#x}", s.vaddr);
        assert_eq!(s.vaddr % 4096, 0);
    }
    // The stack (16 KiB) lives in the writable segment's .bss.
    let data = u.segments.iter().find(|s| s.flags & PF_W != 0).unwrap();
    assert!(u.stack_top <= data.vaddr + data.memsz && u.stack_top >= data.vaddr + 16384);
    // `repair_done` is a `hlt; jmp repair_done` loop.
    let text = u.segments.iter().find(|s| s.flags & PF_X != 0).unwrap();
    let off = (u.done - text.vaddr) as usize;
    assert_eq!(&text.data[off..off + 2], &[0xf4, 0xe9], "hlt; jmp rel32");
    // Completion is preceded by `out dx, al` (port 0x501).
    assert_eq!(text.data[off - 1], 0xee);
}

#[test]
fn size_goal() {
    let u = builtin_unikernel().unwrap();
    assert!(u.file_size() < 128 * 1024, "repair kernel is {} bytes", u.file_size());
}
