//! From a `symbols` profile to the repair kernel's [`KernelLayout`], and the
//! [`Wanted`] table that asks the profile for every layout item.

use std::collections::BTreeMap;

use repair_kernel::layout::{Item, KernelLayout, Kind, ITEMS};
use symbols::{Profile, Wanted, DEFAULT_WANTED};

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

/// The names to extract: [`DEFAULT_WANTED`] merged with every [`ITEMS`]
/// entry (optional items marked `?`), owned, for [`Self::with`].
#[derive(Debug, Clone, Default)]
pub struct WantedNames {
    symbols: Vec<String>,
    percpu: Vec<String>,
    /// type group text (without `?`) -> (optional, member entries)
    types: BTreeMap<String, (bool, Vec<String>)>,
}

impl WantedNames {
    /// `DEFAULT_WANTED` ∪ `ITEMS`.
    pub fn for_repair_kernel() -> Self {
        let mut w = Self::default();
        for s in DEFAULT_WANTED.symbols {
            push_unique(&mut w.symbols, s);
        }
        for s in DEFAULT_WANTED.percpu {
            push_unique(&mut w.percpu, s);
        }
        for (ty, members) in DEFAULT_WANTED.types {
            let (name, optional) = split_optional(ty);
            let e = w.types.entry(name.to_owned()).or_insert((optional, Vec::new()));
            e.0 &= optional;
            for m in *members {
                push_unique(&mut e.1, m);
            }
        }
        for spec in ITEMS {
            let mark = |s: &str| if spec.required { s.to_owned() } else { format!("{s}?") };
            match spec.kind {
                Kind::Symbol | Kind::SymbolSize => push_unique(&mut w.symbols, &mark(spec.ty)),
                Kind::PerCpu => push_unique(&mut w.percpu, &mark(spec.ty)),
                Kind::Size | Kind::Offset | Kind::MemberSize => {
                    let e = w.types.entry(spec.ty.to_owned()).or_insert((true, Vec::new()));
                    e.0 &= !spec.required;
                    if !spec.member.is_empty() {
                        push_unique(&mut e.1, &mark(spec.member));
                    }
                }
            }
        }
        w
    }

    /// Calls `f` with the names as a [`Wanted`].
    pub fn with<R>(&self, f: impl FnOnce(&Wanted<'_>) -> R) -> R {
        let symbols: Vec<&str> = self.symbols.iter().map(String::as_str).collect();
        let percpu: Vec<&str> = self.percpu.iter().map(String::as_str).collect();
        let names: Vec<String> = self
            .types
            .iter()
            .map(|(t, (opt, _))| if *opt { format!("{t}?") } else { t.clone() })
            .collect();
        let members: Vec<Vec<&str>> =
            self.types.values().map(|(_, m)| m.iter().map(String::as_str).collect()).collect();
        let types: Vec<(&str, &[&str])> =
            names.iter().map(String::as_str).zip(members.iter().map(Vec::as_slice)).collect();
        f(&Wanted { symbols: &symbols, percpu: &percpu, types: &types })
    }
}

fn split_optional(s: &str) -> (&str, bool) {
    match s.strip_suffix('?') {
        Some(t) => (t, true),
        None => (s, false),
    }
}

/// Adds `entry` unless an entry for the same name is there; a required
/// entry replaces an optional one.
fn push_unique(list: &mut Vec<String>, entry: &str) {
    let (name, optional) = split_optional(entry);
    if let Some(existing) = list.iter_mut().find(|e| split_optional(e).0 == name) {
        if !optional {
            *existing = name.to_owned();
        }
        return;
    }
    // An alternative group ("a|b") already listing this name covers it.
    if list.iter().any(|e| split_optional(e).0.split('|').any(|a| a.trim() == name)) {
        return;
    }
    list.push(entry.to_owned());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wanted_covers_every_item() {
        let w = WantedNames::for_repair_kernel();
        for spec in ITEMS {
            let covered = |list: &[String]| {
                list.iter().any(|e| split_optional(e).0.split('|').any(|a| a == spec.ty))
            };
            match spec.kind {
                Kind::Symbol | Kind::SymbolSize => assert!(covered(&w.symbols), "{}", spec.ty),
                Kind::PerCpu => assert!(covered(&w.percpu), "{}", spec.ty),
                _ => {
                    let (_, members) = &w.types[spec.ty];
                    if !spec.member.is_empty() {
                        assert!(
                            members.iter().any(|m| split_optional(m)
                                .0
                                .split('|')
                                .any(|a| a == spec.member)),
                            "{}.{}",
                            spec.ty,
                            spec.member
                        );
                    }
                }
            }
        }
        // pcpu_hot is optional as a whole; task_struct is not.
        assert!(w.types["pcpu_hot"].0);
        assert!(!w.types["task_struct"].0);
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
