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
        // Every name of repair-kernel/src/layout.rs ITEMS, kept in step by hand:
        // a name added there must be resolvable here.
        let syms = [
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
            "linux_banner",
            "_stext",
            "_etext",
            "__start_rodata",
            "__end_rodata",
            "__start___jump_table",
            "__stop___jump_table",
            "panic_cpu",
            "_text",
        ];
        let all = |list: &[&str]| -> Vec<String> {
            list.iter()
                .flat_map(|e| Group::parse(e).alternatives)
                .map(str::to_owned)
                .collect()
        };
        let have = all(DEFAULT_WANTED.symbols);
        for s in syms {
            assert!(have.iter().any(|h| h == s), "{s}");
        }
        let pcpu = all(DEFAULT_WANTED.percpu);
        for s in ["pcpu_hot", "current_task", "__preempt_count", "runqueues"] {
            assert!(pcpu.iter().any(|h| h == s), "{s}");
        }
        let types: Vec<(&str, Vec<String>)> = DEFAULT_WANTED
            .types
            .iter()
            .map(|(t, m)| (Group::parse(t).alternatives[0], all(m)))
            .collect();
        let need = [
            ("task_struct", "pid"),
            ("task_struct", "tgid"),
            ("task_struct", "comm"),
            ("task_struct", "tasks"),
            ("task_struct", "__state"),
            ("task_struct", "state"),
            ("task_struct", "flags"),
            ("task_struct", "exit_state"),
            ("task_struct", "stack"),
            ("task_struct", "mm"),
            ("task_struct", "real_parent"),
            ("task_struct", "on_cpu"),
            ("task_struct", "thread.sp"),
            ("list_head", "next"),
            ("list_head", "prev"),
            ("rq", "curr"),
            ("rq", "nr_switches"),
            ("pcpu_hot", "current_task"),
            ("pcpu_hot", "preempt_count"),
            ("printk_ringbuffer", "desc_ring"),
            ("printk_ringbuffer", "text_data_ring"),
            ("prb_desc_ring", "count_bits"),
            ("prb_desc_ring", "descs"),
            ("prb_desc_ring", "infos"),
            ("prb_desc_ring", "head_id"),
            ("prb_desc_ring", "tail_id"),
            ("prb_data_ring", "size_bits"),
            ("prb_data_ring", "data"),
            ("prb_desc", "state_var"),
            ("prb_desc", "text_blk_lpos"),
            ("prb_data_blk_lpos", "begin"),
            ("prb_data_blk_lpos", "next"),
            ("printk_info", "seq"),
            ("printk_info", "ts_nsec"),
            ("printk_info", "text_len"),
            ("printk_info", "caller_id"),
            ("pt_regs", "ip"),
            ("pt_regs", "sp"),
            ("pt_regs", "cs"),
            ("pt_regs", "flags"),
        ];
        for (t, m) in need {
            let (_, ms) = types
                .iter()
                .find(|(n, _)| *n == t)
                .unwrap_or_else(|| panic!("{t}"));
            assert!(ms.iter().any(|h| h == m), "{t}.{m}");
        }
        for t in ["prb_desc", "printk_info", "pt_regs"] {
            assert!(types.iter().any(|(n, _)| *n == t), "{t}");
        }
    }
}
