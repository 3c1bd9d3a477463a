//! What to extract: a table of names, not code per type.
//!
//! Every name may list alternatives separated by `|` (`"__state|state"`):
//! the item is present if any alternative is, and every alternative that
//! exists is recorded, so the caller decides layout drift by which one it
//! finds, never by version numbers. A trailing `?` (`"pcpu_hot?"`) marks an
//! item optional: it is recorded when present and never reported missing.

use std::collections::BTreeMap;

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

/// A [`Wanted`] built name by name, for callers whose list is kept as data
/// of their own (the builder derives the repair kernel's from its layout
/// table, `repair-kernel/src/layout.rs`). Each name is listed once; one
/// required request for a name makes it required.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WantedList {
    symbols: Vec<String>,
    percpu: Vec<String>,
    /// type name -> (optional, member entries)
    types: BTreeMap<String, (bool, Vec<String>)>,
}

impl WantedList {
    /// Asks for an ELF symbol.
    pub fn symbol(&mut self, name: &str, optional: bool) -> &mut Self {
        push(&mut self.symbols, name, optional);
        self
    }

    /// Asks for a per-CPU variable.
    pub fn percpu(&mut self, name: &str, optional: bool) -> &mut Self {
        push(&mut self.percpu, name, optional);
        self
    }

    /// Asks for a type, and for a member path (`"thread.sp"`) in it unless
    /// `member` is empty. The type itself is optional only while every
    /// request naming it is.
    pub fn member(&mut self, ty: &str, member: &str, optional: bool) -> &mut Self {
        let e = self.types.entry(ty.to_owned()).or_insert((true, Vec::new()));
        e.0 &= optional;
        if !member.is_empty() {
            push(&mut e.1, member, optional);
        }
        self
    }

    /// Calls `f` with the list as a [`Wanted`] (optional names marked `?`).
    pub fn with<R>(&self, f: impl FnOnce(&Wanted<'_>) -> R) -> R {
        let symbols: Vec<&str> = self.symbols.iter().map(String::as_str).collect();
        let percpu: Vec<&str> = self.percpu.iter().map(String::as_str).collect();
        let names: Vec<String> = self
            .types
            .iter()
            .map(|(t, (opt, _))| if *opt { format!("{t}?") } else { t.clone() })
            .collect();
        let members: Vec<Vec<&str>> = self
            .types
            .values()
            .map(|(_, m)| m.iter().map(String::as_str).collect())
            .collect();
        let types: Vec<(&str, &[&str])> = names
            .iter()
            .map(String::as_str)
            .zip(members.iter().map(Vec::as_slice))
            .collect();
        f(&Wanted {
            symbols: &symbols,
            percpu: &percpu,
            types: &types,
        })
    }
}

/// Adds `name` (`name?` when optional) unless it is listed; a required
/// request turns an optional entry required.
fn push(list: &mut Vec<String>, name: &str, optional: bool) {
    match list
        .iter_mut()
        .find(|e| e.strip_suffix('?').unwrap_or(e) == name)
    {
        Some(e) if !optional => *e = name.to_owned(),
        Some(_) => {}
        None if optional => list.push(format!("{name}?")),
        None => list.push(name.to_owned()),
    }
}

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
    fn list_names_each_once_and_required_wins() {
        let mut l = WantedList::default();
        l.symbol("panic_cpu", true)
            .symbol("panic", false)
            .symbol("panic_cpu", true)
            .percpu("pcpu_hot", true)
            .member("pcpu_hot", "current_task", true)
            .member("task_struct", "", false)
            .member("task_struct", "utime", true)
            .member("task_struct", "utime", false)
            .member("task_struct", "thread.sp", false);
        l.with(|w| {
            assert_eq!(w.symbols, ["panic_cpu?", "panic"]);
            assert_eq!(w.percpu, ["pcpu_hot?"]);
            assert_eq!(
                w.types,
                [
                    ("pcpu_hot?", &["current_task?"][..]),
                    ("task_struct", &["utime", "thread.sp"][..]),
                ]
            );
        });
    }
}
