//! A bounded mutation fuzz run in plain `cargo test`: thousands of
//! deterministic corruptions (bit flips, byte stores, 32-bit stores of
//! boundary values, truncations) of a small real ELF with DWARF 4 and 5,
//! weighted towards `.debug_info` and `.debug_abbrev`. Every input must give
//! a profile or an error: no panic and no hang.

mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use object::{Object, ObjectSection};
use symbols::{Profile, Wanted};

const ITERATIONS: u64 = 6000;
const BUDGET: Duration = Duration::from_secs(20);

const WANTED: Wanted<'static> = Wanted {
    symbols: &["panic", "prb", "init_task", "linux_banner"],
    percpu: &["percpu_a", "runqueues"],
    types: &[
        (
            "task_struct",
            &[
                "__state|state",
                "thread.sp",
                "lo",
                "named_anon.inner_b",
                "wide",
                "grid",
            ],
        ),
        ("later", &["b"]),
        ("anon_t", &["y"]),
        ("absent?", &["x"]),
    ],
};

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn ranges(data: &[u8]) -> Vec<std::ops::Range<usize>> {
    let file = object::File::parse(data).unwrap();
    let mut out = Vec::new();
    for name in [
        ".debug_info",
        ".debug_info",
        ".debug_info",
        ".debug_abbrev",
        ".debug_str",
        ".symtab",
    ] {
        let s = file.section_by_name(name).unwrap();
        let (off, len) = s.file_range().unwrap();
        out.push(off as usize..(off + len) as usize);
    }
    out.push(0..64); // ELF header
    out.push(0..data.len());
    out
}

fn mutate(rng: &mut Rng, data: &[u8], regions: &[std::ops::Range<usize>]) -> Vec<u8> {
    let mut d = data.to_vec();
    let edits = 1 + rng.below(4);
    for _ in 0..edits {
        let r = &regions[rng.below(regions.len())];
        let at = r.start + rng.below(r.len());
        match rng.below(10) {
            0..=3 => d[at] ^= 1 << rng.below(8),
            4..=6 => d[at] = rng.next() as u8,
            7..=8 => {
                let v: u32 =
                    [0, 1, 0x7f, 0x80, 0xff, 0xffff, 0x7fff_ffff, 0xffff_ffff][rng.below(8)];
                let end = (at + 4).min(d.len());
                d[at..end].copy_from_slice(&v.to_le_bytes()[..end - at]);
            }
            _ => d.truncate(at),
        }
        if d.len() <= at {
            break;
        }
    }
    d
}

/// Outcomes of a run: profiles built, then errors by kind.
type Outcomes = std::collections::BTreeMap<String, u64>;

fn outcome(r: &Result<(Profile, Vec<symbols::Missing>), symbols::Error>) -> String {
    match r {
        Ok((_, m)) if m.is_empty() => "profile".into(),
        Ok(_) => "profile with missing items".into(),
        Err(e) => format!("{e:?}")
            .split([' ', '{', '('])
            .next()
            .unwrap_or("")
            .to_owned(),
    }
}

fn run_fuzz(seed: u64, inputs: Vec<Vec<u8>>) -> Result<Outcomes, String> {
    let (tx, rx) = mpsc::channel();
    let start = Instant::now();
    std::thread::spawn(move || {
        let mut rng = Rng(seed);
        let regions: Vec<_> = inputs.iter().map(|d| ranges(d)).collect();
        let mut done = Outcomes::new();
        let repair_kernel = common::repair_kernel::wanted();
        for i in 0..ITERATIONS {
            if start.elapsed() > BUDGET {
                break;
            }
            let k = (i % inputs.len() as u64) as usize;
            let input = mutate(&mut rng, &inputs[k], &regions[k]);
            let _ = tx.send(Err(i)); // "working on i", for the hang report
            let r = catch_unwind(AssertUnwindSafe(|| {
                let r = if i % 8 == 0 {
                    repair_kernel.with(|w| Profile::from_bytes(&input, w))
                } else {
                    Profile::from_bytes(&input, &WANTED)
                };
                if let Ok((p, _)) = &r {
                    let _ = Profile::from_json(&p.to_json());
                }
                outcome(&r)
            }));
            let Ok(kind) = r else {
                let path = std::env::temp_dir().join(format!("symbols-fuzz-crash-{i}"));
                let _ = std::fs::write(&path, &input);
                let _ = tx.send(Ok(Err(format!(
                    "panic at iteration {i}; input saved to {}",
                    path.display()
                ))));
                return;
            };
            *done.entry(kind).or_default() += 1;
        }
        let _ = tx.send(Ok(Ok(done)));
    });
    let mut current = 0;
    loop {
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Err(i)) => current = i,
            Ok(Ok(result)) => return result,
            Err(_) => {
                return Err(format!(
                    "no progress for 10 s at iteration {current}: a hang"
                ))
            }
        }
    }
}

#[test]
fn mutated_elf_and_dwarf_never_panic_or_hang() {
    let inputs: Vec<Vec<u8>> = [4, 5]
        .iter()
        .map(|&v| std::fs::read(common::fixture(v)).unwrap())
        .collect();
    // The unmutated inputs parse.
    for d in &inputs {
        Profile::from_bytes(d, &WANTED).unwrap();
    }
    // Quiet the default hook: a panic is reported by the test itself.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let result = run_fuzz(0x5eed_cafe_f00d_0001, inputs);
    std::panic::set_hook(hook);
    let outcomes = result.unwrap_or_else(|e| panic!("{e}"));
    let done: u64 = outcomes.values().sum();
    assert!(done >= 1000, "only {done} iterations in the time budget");
    eprintln!("fuzz: {done} mutated inputs, no panic: {outcomes:?}");
}
