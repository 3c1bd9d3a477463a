//! What to extract: a table of names, not code per type.
//!
//! Every name may list alternatives separated by `|` (`"__state|state"`):
//! the item is present if any alternative is, and every alternative that
//! exists is recorded, so the caller decides layout drift by which one it
//! finds, never by version numbers. A trailing `?` (`"pcpu_hot?"`) marks an
//! item optional: it is recorded when present and never reported missing.

/// The items to extract from a vmlinux.
#[derive(Clone, Copy, Debug)]
pub struct Wanted<'a> {
    /// ELF symbols: link-time addresses and sizes.
    pub symbols: &'a [&'a str],
    /// Per-CPU variables: offsets in each CPU's per-CPU area.
    pub percpu: &'a [&'a str],
    /// Types and the member paths (`"thread.sp"`) wanted in each. Every
    /// named member of a found type is recorded too; the paths listed here
    /// are the ones reported when missing, and nested paths are resolved.
    pub types: &'a [(&'a str, &'a [&'a str])],
}

/// What the repair kernel needs (issue 3 and `repair-kernel/src/layout.rs`).
pub const DEFAULT_WANTED: Wanted<'static> = Wanted {
    symbols: &[
        "init_task",
        "__per_cpu_offset",
        "panic",
        "oops_end",
        "rewind_stack_and_make_dead",
        "make_task_dead",
        "page_offset_base",
        "phys_base",
        "prb",
        "nr_cpu_ids",
        "__cpu_online_mask",
        "__start___jump_table",
        "__stop___jump_table",
        "linux_banner",
        "_text",
        "_stext",
        "_etext",
        "__start_rodata",
        "__end_rodata",
        "panic_cpu?",
        "init_top_pgt?",
    ],
    percpu: &[
        "pcpu_hot|current_task",
        "__preempt_count|pcpu_hot",
        "runqueues",
    ],
    types: &[
        (
            "task_struct",
            &[
                "pid",
                "tgid",
                "comm",
                "tasks",
                "__state|state",
                "flags",
                "exit_state",
                "stack",
                "mm",
                "real_parent",
                "on_cpu",
                "thread.sp",
                "utime",
                "stime",
                "nvcsw",
                "nivcsw",
            ],
        ),
        ("list_head", &["next", "prev"]),
        ("mm_struct", &["pgd"]),
        ("rq", &["curr", "nr_switches"]),
        ("pcpu_hot?", &["current_task", "preempt_count"]),
        ("printk_ringbuffer", &["desc_ring", "text_data_ring"]),
        (
            "prb_desc_ring",
            &["count_bits", "descs", "infos", "head_id", "tail_id"],
        ),
        ("prb_data_ring", &["size_bits", "data"]),
        ("prb_desc", &["state_var", "text_blk_lpos"]),
        ("prb_data_blk_lpos", &["begin", "next"]),
        ("printk_info", &["seq", "ts_nsec", "text_len", "caller_id"]),
        ("pt_regs", &["ip", "sp", "cs", "flags"]),
    ],
};

/// One entry parsed: its alternatives and whether it is optional.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Group<'a> {
    pub text: &'a str,
    pub alternatives: Vec<&'a str>,
    pub optional: bool,
}

impl<'a> Group<'a> {
    pub fn parse(entry: &'a str) -> Self {
        let (text, optional) = match entry.strip_suffix('?') {
            Some(t) => (t, true),
            None => (entry, false),
        };
        let alternatives = text
            .split('|')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        Group {
            text,
            alternatives,
            optional,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_parse() {
        let g = Group::parse("__state|state");
        assert_eq!(g.alternatives, ["__state", "state"]);
        assert!(!g.optional);
        let g = Group::parse("pcpu_hot?");
        assert_eq!((g.text, g.optional), ("pcpu_hot", true));
    }

    #[test]
    fn default_covers_repair_kernel_items() {
        use repair_kernel::layout::{Kind, ITEMS};
        let alts = |list: &[&'static str]| -> Vec<&'static str> {
            list.iter()
                .flat_map(|e| Group::parse(e).alternatives)
                .collect()
        };
        let symbols = alts(DEFAULT_WANTED.symbols);
        let percpu = alts(DEFAULT_WANTED.percpu);
        for item in ITEMS {
            let ok = match item.kind {
                Kind::Symbol | Kind::SymbolSize => symbols.contains(&item.ty),
                Kind::PerCpu => percpu.contains(&item.ty),
                Kind::Size | Kind::Offset | Kind::MemberSize => {
                    DEFAULT_WANTED.types.iter().any(|(t, members)| {
                        Group::parse(t).alternatives.contains(&item.ty)
                            && (item.kind == Kind::Size || alts(members).contains(&item.member))
                    })
                }
            };
            assert!(ok, "repair-kernel item {item:?} is not in DEFAULT_WANTED");
        }
    }
}
