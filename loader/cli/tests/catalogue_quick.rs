//! The crash catalogue's CI subset: one LKDTM type per outcome class on the
//! kit's LKDTM kernel (`oops=panic`), through the same campaign runner that
//! regenerates docs/crash-catalogue.md (`repair-guest campaign --out docs`).

use repair_guest::campaign::{self, CampaignConfig, Class, QUICK_TYPES};

#[test]
fn quick_catalogue_every_process_context_crash_recovered() {
    let cfg = CampaignConfig {
        types: QUICK_TYPES.iter().map(|s| s.to_string()).collect(),
        verbose: true,
        ..CampaignConfig::default()
    };
    let rep = campaign::run(&cfg, "catalogue_quick test").expect("campaign");
    eprintln!("{}", campaign::markdown(&rep));
    let class = |n: &str| rep.types.iter().find(|t| t.name == n).map(|t| t.class).unwrap_or(Class::Error);
    for n in ["PANIC", "BUG", "EXCEPTION", "ACCESS_NULL", "WRITE_RO", "EXEC_DATA", "CORRUPT_STACK"] {
        assert_eq!(class(n), Class::Recovered, "{n}");
    }
    assert_eq!(class("WARNING"), Class::NotCrashing);
    assert_eq!(class("LOOP"), Class::HangRecovered);
    assert_eq!(class("HUNG_TASK"), Class::HangDeclined);
    assert_eq!(class("EXHAUST_STACK"), Class::Declined);
    for t in &rep.types {
        // Zero guest resets caused by a repair; declines only with a reason.
        assert_ne!(t.class, Class::RepairFailed, "{}: {:?}", t.name, t.notes);
        assert_ne!(t.class, Class::Error, "{}: {:?}", t.name, t.notes);
        if matches!(t.class, Class::Declined | Class::HangDeclined) {
            assert!(t.reason.as_ref().is_some_and(|r| !r.is_empty()), "{} declined without a reason", t.name);
        }
        if t.class == Class::Recovered {
            assert_eq!(t.child_status, Some(137), "{}", t.name);
            assert_eq!(t.offender_pid.map(|p| p as u32), t.child_pid, "{}: the offender is the crashing child", t.name);
        }
    }
}
