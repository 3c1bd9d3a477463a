//! Hangs detected from outside by sampling guest RAM (no stop), faster than
//! the guest's own detectors (20 s soft lockup, 120 s hung task), and no
//! false hang over a busy workload. `bench/hang/run` runs the same with
//! more repetitions and a longer workload.

use loader::campaign::{self, CampaignConfig, Class, HANG_TYPES};
use std::time::Duration;

#[test]
fn every_hang_type_detected_in_under_a_second() {
    let cfg = CampaignConfig { types: HANG_TYPES.iter().map(|s| s.to_string()).collect(), ..CampaignConfig::default() };
    let rep = campaign::run(&cfg, "catalogue_hang test").expect("campaign");
    eprintln!("{}", campaign::markdown(&rep));
    for t in &rep.types {
        let ms = t.hang_after_trigger_ms.unwrap_or_else(|| panic!("{}: no hang detected: {:?}", t.name, t.notes));
        assert!(ms < 1000.0, "{}: detected {ms:.0} ms after the trigger", t.name);
        let want = if t.name == "HUNG_TASK" { Class::HangDeclined } else { Class::HangRecovered };
        assert_eq!(t.class, want, "{}: {:?} {:?}", t.name, t.reason, t.notes);
    }
}

#[test]
fn busy_workload_raises_no_false_hang() {
    let secs = std::env::var("HANG_BENCH_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(20);
    let cfg = CampaignConfig { repair_hangs: false, ..CampaignConfig::default() };
    let rep = campaign::busy_false_positives(secs, &cfg).expect("busy run");
    eprintln!("{}", serde_json::to_string_pretty(&rep).unwrap());
    assert!(rep.completed, "the workload did not finish");
    assert!(rep.secs >= Duration::from_secs(secs).as_secs_f64());
    assert_eq!(rep.traps, 0);
    assert!(rep.hangs.is_empty(), "false hangs: {:?}", rep.hangs);
}
