//! Parsing what the guest kernel prints on its console: the oracle no one in
//! this project wrote.

/// The guest's own account of a panic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PanicInfo {
    /// After `Kernel panic - not syncing: `.
    pub message: String,
    /// From the last `CPU: N PID: P Comm: C` line before the panic line.
    pub cpu: u32,
    pub pid: u32,
    pub comm: String,
    /// Function names of the last `Call Trace:` block before the end marker,
    /// innermost first (`sysrq_handle_crash`, ...), `?` entries left out.
    pub call_trace: Vec<String>,
}

/// Parses the last panic report in a console text.
pub fn parse_panic(console: &str) -> Option<PanicInfo> {
    let lines: Vec<&str> = console.lines().map(strip_timestamp).collect();
    let panic_idx = lines.iter().rposition(|l| l.starts_with("Kernel panic - not syncing: "))?;
    let message = lines[panic_idx]["Kernel panic - not syncing: ".len()..].trim().to_string();
    let (cpu, pid, comm, cpu_idx) = lines[..=panic_idx.min(lines.len() - 1)]
        .iter()
        .enumerate()
        .rev()
        .find_map(|(i, l)| parse_cpu_line(l).map(|(c, p, n)| (c, p, n, i)))
        .or_else(|| {
            // A direct panic prints its CPU line after the panic line.
            lines[panic_idx..]
                .iter()
                .enumerate()
                .find_map(|(i, l)| parse_cpu_line(l).map(|(c, p, n)| (c, p, n, panic_idx + i)))
        })?;
    let call_trace = parse_call_trace(&lines[cpu_idx..]);
    Some(PanicInfo { message, cpu, pid, comm, call_trace })
}

/// The last `CPU: N PID: P Comm: C` line of a console text (an oops
/// report prints it before the oops path calls `panic`): (cpu, pid, comm).
pub fn last_cpu_line(console: &str) -> Option<(u32, u32, String)> {
    console.lines().rev().find_map(|l| parse_cpu_line(strip_timestamp(l)))
}

/// `[   12.345678] text` -> `text`.
fn strip_timestamp(line: &str) -> &str {
    let t = line.trim_start();
    if t.starts_with('[') {
        if let Some(end) = t.find("] ") {
            return &t[end + 2..];
        }
    }
    t
}

/// `CPU: 1 PID: 85 Comm: sh Not tainted 6.1.0 ...` -> (1, 85, "sh").
fn parse_cpu_line(line: &str) -> Option<(u32, u32, String)> {
    let rest = line.strip_prefix("CPU: ")?;
    let mut words = rest.split_whitespace();
    let cpu = words.next()?.parse().ok()?;
    let mut w = words.next()?;
    // 6.11+ prints the task's UID between: `CPU: 0 UID: 0 PID: 184 Comm: sh`.
    if w == "UID:" {
        words.next()?;
        w = words.next()?;
    }
    if w != "PID:" {
        return None;
    }
    let pid = words.next()?.parse().ok()?;
    if words.next()? != "Comm:" {
        return None;
    }
    let comm = words.next()?.to_string();
    Some((cpu, pid, comm))
}

/// Function names from the first `Call Trace:` block in `lines`.
fn parse_call_trace(lines: &[&str]) -> Vec<String> {
    let Some(start) = lines.iter().position(|l| l.trim() == "Call Trace:") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for l in &lines[start + 1..] {
        let t = l.trim();
        if t.starts_with("<TASK>") || t.starts_with("<IRQ>") || t.starts_with("</IRQ>") {
            continue;
        }
        if t.starts_with("</TASK>") || t.is_empty() || t.starts_with("RIP:") || t.starts_with("Kernel Offset") {
            break;
        }
        if t.starts_with('?') {
            continue;
        }
        // `sysrq_handle_crash+0x16/0x20` -> `sysrq_handle_crash`
        let name = t.split(['+', ' ']).next().unwrap_or("");
        if name.is_empty() || name.contains(':') {
            break;
        }
        out.push(name.to_string());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SYSRQ: &str = "[   10.1] sysrq: Trigger a crash\n\
[   10.2] Kernel panic - not syncing: sysrq triggered crash\n\
[   10.3] CPU: 1 PID: 85 Comm: sh Not tainted 6.1.0-56-cloud-amd64 #1  Debian 6.1.192-2\n\
[   10.3] Hardware name: QEMU Standard PC (i440FX + PIIX, 1996), BIOS 1.16.2-debian-1.16.2-1 04/01/2014\n\
[   10.3] Call Trace:\n\
[   10.3]  <TASK>\n\
[   10.3]  dump_stack_lvl+0x44/0x5c\n\
[   10.3]  panic+0x118/0x2ed\n\
[   10.3]  ? printk+0x58/0x73\n\
[   10.3]  sysrq_handle_crash+0x16/0x20\n\
[   10.3]  </TASK>\n\
[   10.4] Kernel Offset: 0x1000000 from 0xffffffff81000000\n\
[   10.4] ---[ end Kernel panic - not syncing: sysrq triggered crash ]---\n";

    #[test]
    fn parses_a_direct_panic() {
        let p = parse_panic(SYSRQ).unwrap();
        assert_eq!(p.message, "sysrq triggered crash");
        assert_eq!((p.cpu, p.pid, p.comm.as_str()), (1, 85, "sh"));
        assert_eq!(p.call_trace, ["dump_stack_lvl", "panic", "sysrq_handle_crash"]);
    }

    #[test]
    fn parses_an_oops_then_panic() {
        let text = "[ 5.0] invalid opcode: 0000 [#1] PREEMPT SMP NOPTI\n\
[ 5.0] CPU: 0 PID: 77 Comm: sh Not tainted 6.1.192 #1\n\
[ 5.0] RIP: 0010:lkdtm_BUG+0x5/0x10\n\
[ 5.0] Call Trace:\n\
[ 5.0]  <TASK>\n\
[ 5.0]  lkdtm_do_action+0x10/0x20\n\
[ 5.0]  </TASK>\n\
[ 5.1] Kernel panic - not syncing: Fatal exception\n\
[ 5.1] ---[ end Kernel panic - not syncing: Fatal exception ]---\n";
        let p = parse_panic(text).unwrap();
        assert_eq!(p.message, "Fatal exception");
        assert_eq!((p.cpu, p.pid, p.comm.as_str()), (0, 77, "sh"));
        assert_eq!(p.call_trace, ["lkdtm_do_action"]);
    }

    #[test]
    fn cpu_line_with_the_uid_of_6_11_and_later() {
        let l = "[    9.584638] CPU: 0 UID: 0 PID: 184 Comm: sh Not tainted 7.2.13+deb14-cloud-amd64 #1 PREEMPT(lazy)";
        assert_eq!(last_cpu_line(l), Some((0, 184, "sh".to_string())));
    }

    #[test]
    fn no_panic_no_info() {
        assert!(parse_panic("hello\nworld\n").is_none());
    }
}
