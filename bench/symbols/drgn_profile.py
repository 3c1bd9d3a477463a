"""drgn's side of the benchmark: load a vmlinux's debug info and look up the
same types, member paths and symbols as the repair kernel's item table
(repair-kernel/src/layout.rs), which the symbols crate extracts."""
import sys

import drgn

path, types, symbols = sys.argv[1], sys.argv[2].split(","), sys.argv[3].split(",")
prog = drgn.Program(drgn.host_platform)
# drgn >= 0.0.31 matches files to modules; with no core dump, add the
# vmlinux as an extra module (what `drgn -s vmlinux` without a core does).
prog.extra_module(path, create=True).try_file(path)
out = {}
for name in types:
    try:
        t = prog.type("struct " + name)
    except LookupError:
        continue
    members = {m.name: m.bit_offset for m in t.members if m.name}
    out[name] = (t.size, members)
out["thread.sp"] = drgn.offsetof(prog.type("struct task_struct"), "thread.sp")
for s in symbols:
    try:
        prog.symbol(s)
    except LookupError:
        pass
print(len(out), "types", file=sys.stderr)
