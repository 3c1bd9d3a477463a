//! From a `symbols` profile to the repair kernel's [`KernelLayout`] (what
//! to extract for it is [`crate::wanted`]).

use repair_kernel::layout::{Item, KernelLayout, Kind, ITEMS};
use symbols::Profile;

/// Why a profile cannot give the repair kernel its layout.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    /// Required layout items the profile does not have.
    #[error(
        "the kernel profile lacks {} item(s) the repair kernel needs: {}; \
         is this an x86_64 Linux 6.x vmlinux with full DWARF (the -dbg package)?",
        missing.len(), missing.join(", ")
    )]
    Missing {
        /// Each missing item, as `symbol init_task`, `task_struct.pid`, ...
        missing: Vec<String>,
    },
    /// The vmlinux's DWARF does not describe the layout its code uses.
    #[error(
        "this kernel was compiled with GCC's randstruct plugin (DW_AT_producer: ...{plugin}): \
         the plugin shuffles task_struct's randomized members after GCC wrote their declared \
         order to DWARF, so the DWARF (and pahole) give task_struct offsets the kernel does not \
         use (Linux keeps BTF off for such builds for the same reason); a repair kernel working \
         from them would read pid, comm and the task list at the wrong places. Build the kernel \
         with Clang's randstruct (exact DWARF) or without RANDSTRUCT"
    )]
    DwarfNotTheCodesLayout {
        /// The plugin option as the producer names it.
        plugin: String,
    },
}

fn describe(kind: Kind, ty: &str, member: &str) -> String {
    match kind {
        Kind::Symbol => format!("symbol {ty}"),
        Kind::PerCpu => format!("per-CPU variable {ty}"),
        Kind::Size => format!("size of {ty}"),
        Kind::Offset => format!("{ty}.{member}"),
        Kind::MemberSize => format!("size of {ty}.{member}"),
        Kind::SymbolSize => format!("size of symbol {ty}"),
        Kind::CallFrame => format!("call-frame rule of {ty} calling {member}"),
        Kind::ThreadFlagBit => format!("the thread flag {ty} sets"),
    }
}

/// Looks every [`ITEMS`] entry up in the profile (refused outright when the
/// profile's DWARF is known not to match the code, see
/// [`Profile::dwarf_layouts_randomized_after_the_fact`]). Absent optional items are
/// left [`ABSENT`](repair_kernel::layout::ABSENT); every missing required
/// item is listed in one error, as is a drift pair of which neither
/// alternative exists (`task_struct.__state` / `state`, the current task as
/// `pcpu_hot.current_task` / `current_task`).
pub fn layout_from_profile(profile: &Profile) -> Result<KernelLayout, LayoutError> {
    // Offsets are only as good as the DWARF they come from: refuse a build
    // whose DWARF is known not to be its code's layout, rather than walk
    // task lists at the wrong offsets and decline every crash as "corrupt".
    if profile.dwarf_layouts_randomized_after_the_fact() {
        let plugin = profile
            .producer
            .split_whitespace()
            .find(|o| o.ends_with("randomize_layout_plugin.so"))
            .unwrap_or_default()
            .to_owned();
        return Err(LayoutError::DwarfNotTheCodesLayout { plugin });
    }
    let mut layout = KernelLayout::default();
    let mut missing = Vec::new();
    for (i, spec) in ITEMS.iter().enumerate() {
        let value = match spec.kind {
            Kind::Symbol => profile.symbol(spec.ty),
            Kind::PerCpu => profile.percpu_offset(spec.ty),
            Kind::Size => profile.size(spec.ty),
            Kind::Offset => profile.offset(spec.ty, spec.member),
            Kind::MemberSize => profile.member(spec.ty, spec.member).map(|m| m.size),
            Kind::SymbolSize => profile.symbols.get(spec.ty).map(|s| s.size).filter(|&s| s != 0),
            // Filled from the vmlinux's call-frame information
            // (`crate::frames`), which a profile does not carry.
            Kind::CallFrame | Kind::ThreadFlagBit => None,
        };
        match value {
            Some(v) => layout.values[i] = v,
            None if spec.required => missing.push(describe(spec.kind, spec.ty, spec.member)),
            None => {}
        }
    }
    let has = |item: Item| layout.get(item).is_some();
    if !has(Item::TaskStateNew) && !has(Item::TaskStateOld) {
        missing.push("task_struct.__state or task_struct.state".into());
    }
    let hot_current = has(Item::PcpuHot) && has(Item::PcpuHotCurrentTask);
    if !has(Item::PcpuCurrentTask) && !hot_current {
        missing.push("per-CPU current_task or pcpu_hot.current_task".into());
    }
    if missing.is_empty() {
        Ok(layout)
    } else {
        Err(LayoutError::Missing { missing })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wanted_covers_every_item() {
        crate::wanted::wanted().with(|w| {
            let has = |list: &[&str], name: &str, required: bool| {
                list.contains(&name) || (!required && list.contains(&format!("{name}?").as_str()))
            };
            for spec in ITEMS {
                let ok = match spec.kind {
                    Kind::Symbol | Kind::SymbolSize | Kind::ThreadFlagBit => has(w.symbols, spec.ty, spec.required),
                    Kind::PerCpu => has(w.percpu, spec.ty, spec.required),
                    Kind::CallFrame => continue,
                    _ => w.types.iter().any(|(t, members)| {
                        has(&[t], spec.ty, spec.required)
                            && (spec.member.is_empty() || has(members, spec.member, spec.required))
                    }),
                };
                assert!(ok, "{spec:?} is not asked for as it should be");
            }
            // pcpu_hot is optional as a whole; task_struct is not.
            assert!(w.types.iter().any(|(t, _)| *t == "pcpu_hot?"));
            assert!(w.types.iter().any(|(t, _)| *t == "task_struct"));
        });
    }

    #[test]
    fn a_gcc_randstruct_plugin_build_is_refused_with_the_reason() {
        let p = Profile {
            producer: "GNU C11 12.2.0 -m64 -g -gdwarf-5 -Os \
                       -fplugin=./scripts/gcc-plugins/randomize_layout_plugin.so"
                .into(),
            ..Profile::default()
        };
        let err = layout_from_profile(&p).unwrap_err();
        assert_eq!(
            err,
            LayoutError::DwarfNotTheCodesLayout {
                plugin: "-fplugin=./scripts/gcc-plugins/randomize_layout_plugin.so".into()
            }
        );
        assert!(err.to_string().contains("task_struct"), "{err}");
    }

    #[test]
    fn missing_items_are_all_listed() {
        let LayoutError::Missing { missing } = layout_from_profile(&Profile::default()).unwrap_err() else {
            panic!("not a missing-items error");
        };
        assert!(missing.iter().any(|m| m == "symbol init_task"));
        assert!(missing.iter().any(|m| m == "task_struct.pid"));
        assert!(missing.iter().any(|m| m.contains("__state or")));
        let required = ITEMS.iter().filter(|s| s.required).count();
        assert_eq!(missing.len(), required + 2);
    }
}
