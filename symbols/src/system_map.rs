//! Symbols from `System.map` or `/proc/kallsyms` text.

use std::collections::BTreeMap;

/// Parses `System.map` or `/proc/kallsyms` text (`ADDRESS TYPE NAME [module]`)
/// into name → address. Lines that do not parse are skipped. Where a name
/// appears more than once (static symbols), a global (upper-case type) wins
/// over a local one; otherwise the first is kept. Module symbols
/// (`[module]`) are skipped: they are not part of the vmlinux.
pub fn parse_system_map(text: &str) -> BTreeMap<String, u64> {
    let mut out: BTreeMap<String, (u64, bool)> = BTreeMap::new();
    for line in text.lines() {
        let mut it = line.split_ascii_whitespace();
        let (Some(addr), Some(ty), Some(name)) = (it.next(), it.next(), it.next()) else {
            continue;
        };
        if it.next().is_some() {
            continue; // "[module]" column
        }
        let Ok(addr) = u64::from_str_radix(addr, 16) else {
            continue;
        };
        let global = ty.chars().next().is_some_and(|c| c.is_ascii_uppercase());
        match out.get(name) {
            Some(&(_, true)) => {}
            Some(&(_, false)) if !global => {}
            _ => {
                out.insert(name.to_owned(), (addr, global));
            }
        }
    }
    out.into_iter().map(|(k, (a, _))| (k, a)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_system_map_and_kallsyms() {
        let text = "ffffffff81000000 T _text\n\
                    ffffffff82a622c0 d prb\n\
                    ffffffff82b00000 D prb\n\
                    000000000001fb80 D current_task\n\
                    garbage line\n\
                    zzzz T bad\n\
                    ffffffffc0000000 t foo_init\t[foo]\n";
        let m = parse_system_map(text);
        assert_eq!(m["_text"], 0xffffffff81000000);
        assert_eq!(m["prb"], 0xffffffff82b00000);
        assert_eq!(m["current_task"], 0x1fb80);
        assert!(!m.contains_key("bad") && !m.contains_key("foo_init"));
        assert_eq!(m.len(), 3);
    }
}
