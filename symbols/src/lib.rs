//! Reads a Linux `vmlinux` (ELF + DWARF) into a compact kernel [profile]: the
//! build identity, the addresses of the symbols the repair kernel needs, and
//! the layouts of the structs it walks.
