//! `diagnose`'s report as text for a person.

use loader::report::Report;

/// The report as text for a person.
pub fn render_text(r: &Report) -> String {
    let mut s = String::new();
    use std::fmt::Write;
    let _ = writeln!(s, "kernel:    {} (KASLR slide {})", r.kernel, r.kaslr_slide);
    let _ = writeln!(s, "vCPU:      {} at {}{}", r.cpu, r.rip, if r.at_panic { " (entry of panic)" } else { "" });
    let _ = writeln!(s, "crash:     {}: {}", r.kind, r.message);
    let _ = writeln!(s, "offender:  pid {} (tgid {}) comm {}", r.pid, r.tgid, r.comm);
    let _ = writeln!(s, "verdict:   {} [{}]", r.verdict, r.reason_code);
    let _ = writeln!(s, "           {}", r.reason);
    let _ = writeln!(s, "backtrace:");
    for f in &r.backtrace {
        let _ = writeln!(s, "  {}", f.text);
    }
    let i = &r.integrity;
    let _ = writeln!(s, "integrity: {} of {} text/rodata pages differ from the {} snapshot{}", i.mismatched, i.checked, i.snapshot,
        if i.unreadable > 0 { format!(" ({} unreadable)", i.unreadable) } else { String::new() });
    for p in &i.pages {
        let _ = writeln!(s, "  {p}");
    }
    let _ = writeln!(s, "log tail:");
    for l in &r.log_tail {
        let _ = writeln!(s, "  {l}");
    }
    let _ = writeln!(s, "tasks ({}{}):", r.tasks.len(), r.tasks_error.as_deref().map(|e| format!(", walk stopped: {e}")).unwrap_or_default());
    let _ = writeln!(s, "  {:>6} {:>6} {:>6} S COMM", "PID", "TGID", "PPID");
    for t in &r.tasks {
        let comm = if t.kthread { format!("[{}]", t.comm) } else { t.comm.clone() };
        let _ = writeln!(s, "  {:>6} {:>6} {:>6} {} {}", t.pid, t.tgid, t.ppid, t.state, comm);
    }
    s
}
