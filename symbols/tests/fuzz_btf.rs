//! Bounded mutation fuzz runs in plain `cargo test` for the readers that
//! take input from a crashed guest's memory or a user's file: BTF,
//! kallsyms (both table orders), and bzImage payloads (gzip, xz, zstd,
//! LZ4). Thousands of deterministic corruptions each (bit flips, byte
//! stores, 32-bit stores of boundary values, truncations), weighted
//! towards the tables; every input must give a result or an error, never a
//! panic or a hang. The unmutated inputs must decode to what was encoded.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use symbols::btf::{Btf, BtfWriter};
use symbols::kallsyms::Kallsyms;
use symbols::{profile_from_btf, vmlinuz, BtfSources};

const ITERATIONS: u64 = 4000;
const BUDGET: Duration = Duration::from_secs(25);

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

fn mutate(rng: &mut Rng, data: &[u8], regions: &[std::ops::Range<usize>]) -> Vec<u8> {
    let mut d = data.to_vec();
    for _ in 0..1 + rng.below(4) {
        let r = &regions[rng.below(regions.len())];
        if r.is_empty() || d.len() <= r.start {
            continue;
        }
        let at = (r.start + rng.below(r.len())).min(d.len() - 1);
        match rng.below(12) {
            0..=3 => d[at] ^= 1 << rng.below(8),
            4..=6 => d[at] = rng.next() as u8,
            7..=9 => {
                let v: u32 = [0, 1, 0x7f, 0x80, 0xff, 0xffff, 0x7fff_ffff, 0xffff_ffff, 0x8000_0000][rng.below(9)];
                let end = (at + 4).min(d.len());
                d[at..end].copy_from_slice(&v.to_le_bytes()[..end - at]);
            }
            _ => d.truncate(at),
        }
    }
    d
}

/// Runs `check` on mutations of `inputs` in a thread, reporting a panic
/// (with the input saved) or 10 s without progress (a hang).
fn fuzz(
    name: &'static str,
    seed: u64,
    inputs: Vec<(Vec<u8>, Vec<std::ops::Range<usize>>)>,
    check: fn(&[u8]) -> String,
) -> BTreeMap<String, u64> {
    let (tx, rx) = mpsc::channel();
    let start = Instant::now();
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    std::thread::spawn(move || {
        let mut rng = Rng(seed);
        let mut done = BTreeMap::new();
        for i in 0..ITERATIONS {
            if start.elapsed() > BUDGET {
                break;
            }
            let (data, regions) = &inputs[(i % inputs.len() as u64) as usize];
            let input = mutate(&mut rng, data, regions);
            let _ = tx.send(Err(i));
            match catch_unwind(AssertUnwindSafe(|| check(&input))) {
                Ok(kind) => *done.entry(kind).or_insert(0u64) += 1,
                Err(_) => {
                    let path = std::env::temp_dir().join(format!("symbols-fuzz-{name}-{i}"));
                    let _ = std::fs::write(&path, &input);
                    let _ = tx.send(Ok(Err(format!("{name}: panic at iteration {i}; input saved to {}", path.display()))));
                    return;
                }
            }
        }
        let _ = tx.send(Ok(Ok(done)));
    });
    let mut current = 0;
    let result = loop {
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Err(i)) => current = i,
            Ok(Ok(r)) => break r,
            Err(_) => break Err(format!("{name}: no progress for 10 s at iteration {current}: a hang")),
        }
    };
    std::panic::set_hook(hook);
    let outcomes = result.unwrap_or_else(|e| panic!("{e}"));
    let n: u64 = outcomes.values().sum();
    assert!(n >= 1000, "{name}: only {n} iterations in the time budget");
    eprintln!("{name}: {n} mutated inputs, no panic: {outcomes:?}");
    outcomes
}

fn kind<T, E: std::fmt::Debug>(r: &Result<T, E>) -> String {
    match r {
        Ok(_) => "ok".into(),
        Err(e) => format!("{e:?}").split([' ', '{', '(']).next().unwrap_or("").to_owned(),
    }
}

// ---------------------------------------------------------------- BTF

/// A BTF with the shapes the kernel's has: typedef chains, anonymous
/// unions, bitfields, arrays, nested structs, a per-CPU DATASEC.
fn sample_btf() -> Vec<u8> {
    let mut w = BtfWriter::new();
    let int = w.int("int", 4);
    let long = w.int("long unsigned int", 8);
    let u64_ = w.typedef("u64", long);
    let char_ = w.int("char", 1);
    let comm = w.array(char_, int, 16);
    let list = w.structure("list_head", false, 16, &[("next", 0, 0, 0), ("prev", 0, 64, 0)]);
    let lp = w.ptr(list);
    let _ = lp;
    let thread = w.structure("thread_struct", false, 16, &[("ip", u64_, 0, 0), ("sp", u64_, 64, 0)]);
    let inner = w.structure("", false, 8, &[("a", int, 0, 0), ("b", int, 32, 0)]);
    let un = w.structure("", true, 8, &[("lo", int, 0, 0), ("", inner, 0, 0)]);
    let task = w.structure(
        "task_struct",
        false,
        128,
        &[
            ("__state", int, 0, 0),
            ("flags", int, 32, 0),
            ("on_cpu", int, 64, 3),
            ("", un, 128, 0),
            ("comm", comm, 192, 0),
            ("tasks", list, 320, 0),
            ("thread", thread, 448, 0),
            ("pid", int, 576, 0),
            ("tgid", int, 608, 0),
        ],
    );
    let tp = w.ptr(task);
    w.structure("rq", false, 64, &[("curr", tp, 0, 0), ("nr_switches", u64_, 64, 0)]);
    w.structure("pcpu_hot", false, 64, &[("current_task", tp, 0, 0), ("preempt_count", int, 64, 0)]);
    let rq = w.var("runqueues", long);
    let hot = w.var("pcpu_hot", long);
    w.datasec(".data..percpu", 0x40000, &[(hot, 0x1f000, 64), (rq, 0x2c0c0, 4096)]);
    w.finish()
}

fn btf_check(data: &[u8]) -> String {
    let r = Btf::parse(data);
    if let Ok(btf) = &r {
        let l = btf.layouts(&[
            ("task_struct", vec!["thread.sp", "tasks.next", "comm", "lo.x"]),
            ("rq", vec!["curr"]),
            ("pcpu_hot", vec![]),
        ]);
        let _ = (l.len(), btf.datasec_vars(".data..percpu"));
        let ks = Kallsyms::default();
        let src = BtfSources {
            btf: data,
            kallsyms: &ks,
            slide: 0,
            build_id: None,
            banner: String::new(),
            arch: "x86_64".into(),
            read: None,
        };
        let _ = common::repair_kernel::wanted().with(|w| profile_from_btf(&src, "fuzz".as_ref(), w));
    }
    kind(&r)
}

#[test]
fn mutated_btf_never_panics_or_hangs() {
    let d = sample_btf();
    let btf = Btf::parse(&d).unwrap();
    let l = btf.layouts(&[("task_struct", vec!["thread.sp"])]);
    assert_eq!(l["task_struct"].members["thread.sp"].offset, 64);
    assert_eq!(l["task_struct"].members["b"].offset, 20);
    assert_eq!(btf.datasec_vars(".data..percpu")["runqueues"], 0x2c0c0);
    let regions = vec![0..24, 24..d.len(), 24..d.len() - 100, 0..d.len()];
    let out = fuzz("btf", 0x0b7f_0001, vec![(d, regions)], btf_check);
    assert!(out.contains_key("ok") && out.len() > 1, "{out:?}");
}

// ---------------------------------------------------------------- kallsyms

/// The symbols encoded: a few absolute per-CPU ones, then text and data,
/// sorted by address as scripts/kallsyms sorts them.
fn sample_symbols() -> Vec<(char, String, u64)> {
    let mut v = vec![
        ('D', "fixed_percpu_data".to_owned(), 0),
        ('D', "pcpu_hot".to_owned(), 0x1f000),
        ('D', "runqueues".to_owned(), 0x2c0c0),
        ('T', "_text".to_owned(), 0xffff_ffff_8100_0000),
    ];
    for i in 0..700u64 {
        let k = ['T', 't', 'D', 'd', 'R', 'b'][(i % 6) as usize];
        v.push((k, format!("sym_{i}_{}", "x".repeat((i % 40) as usize)), 0xffff_ffff_8100_1000 + i * 0x30));
    }
    v.push(('T', "panic".to_owned(), 0xffff_ffff_8200_0000));
    v.push(('D', "linux_banner".to_owned(), 0xffff_ffff_8220_0000));
    v
}

fn align(v: &mut Vec<u8>, a: usize) {
    while !v.len().is_multiple_of(a) {
        v.push(0);
    }
}

/// The tables as scripts/kallsyms lays them out: `new_order` for 6.4+
/// (names first, offsets after the token index), else 6.1 (offsets
/// first), with `seqs` between the markers and the tokens (later 6.1
/// stable builds). Returns the image; its base address is 0x1000.
fn encode_kallsyms(syms: &[(char, String, u64)], new_order: bool, seqs: bool) -> Vec<u8> {
    encode_kallsyms_at(syms, new_order, seqs, None)
}

/// With `pcrel = Some(base)`: the 6.15+ form, no relative base, each
/// offset relative to its own place in an image based at `base`.
fn encode_kallsyms_at(syms: &[(char, String, u64)], new_order: bool, seqs: bool, pcrel: Option<u64>) -> Vec<u8> {
    let rb = syms.iter().map(|s| s.2).filter(|&a| a >= 1 << 63).min().unwrap();
    let mut offsets = Vec::new();
    for s in syms {
        let v: i32 = if s.2 < 1 << 32 { s.2 as i32 } else { -1 - (s.2 - rb) as i32 };
        offsets.extend_from_slice(&v.to_le_bytes());
    }
    // Tokens: printable bytes stand for themselves; others are 2-char
    // tokens never used by the names.
    let mut table = Vec::new();
    let mut index = Vec::new();
    for b in 0..=255u8 {
        index.extend_from_slice(&(table.len() as u16).to_le_bytes());
        if (0x21..0x7f).contains(&b) {
            table.push(b);
        } else {
            table.extend_from_slice(&[b'q' + b % 8, b'a' + b % 20]);
        }
        table.push(0);
    }
    let mut names = Vec::new();
    let mut markers = Vec::new();
    for (i, s) in syms.iter().enumerate() {
        if i % 256 == 0 {
            markers.extend_from_slice(&(names.len() as u32).to_le_bytes());
        }
        names.push(1 + s.1.len() as u8);
        names.push(s.0 as u8);
        names.extend_from_slice(s.1.as_bytes());
    }
    let n = (syms.len() as u32).to_le_bytes();
    let mut img = vec![0x5au8; 100];
    align(&mut img, 8);
    let head = |img: &mut Vec<u8>| {
        img.extend_from_slice(&n);
        align(img, 8);
        img.extend_from_slice(&names);
        align(img, 8);
        img.extend_from_slice(&markers);
        align(img, 8);
        if seqs {
            img.extend(std::iter::repeat_n(0x11, 3 * syms.len()));
            align(img, 8);
        }
        img.extend_from_slice(&table);
        align(img, 8);
        img.extend_from_slice(&index);
        align(img, 8);
    };
    if let Some(base) = pcrel {
        head(&mut img);
        let at = img.len() as u64;
        for (i, s) in syms.iter().enumerate() {
            let place = base + at + 4 * i as u64;
            img.extend_from_slice(&(s.2.wrapping_sub(place) as i64 as i32).to_le_bytes());
        }
    } else if new_order {
        head(&mut img);
        img.extend_from_slice(&offsets);
        align(&mut img, 8);
        img.extend_from_slice(&rb.to_le_bytes());
    } else {
        img.extend_from_slice(&offsets);
        align(&mut img, 8);
        img.extend_from_slice(&rb.to_le_bytes());
        head(&mut img);
    }
    img.extend_from_slice(&[0xa5; 64]);
    img
}

fn kallsyms_check(data: &[u8]) -> String {
    let r = Kallsyms::find(data, 0x1000);
    if let Ok(k) = &r {
        let _ = (k.address("panic"), k.size("panic"), k.symbolize(0xffff_ffff_8100_1234));
    }
    kind(&r)
}

#[test]
fn kallsyms_decodes_each_layout_and_mutations_never_panic_or_hang() {
    let syms = sample_symbols();
    let mut inputs = Vec::new();
    for (new_order, seqs) in [(false, false), (false, true), (true, true)] {
        let img = encode_kallsyms(&syms, new_order, seqs);
        let k = Kallsyms::find(&img, 0x1000).unwrap_or_else(|e| panic!("{new_order} {seqs}: {e}"));
        let got: Vec<(char, String, u64)> = k.symbols.iter().map(|s| (s.kind, s.name.clone(), s.address)).collect();
        assert_eq!(got, syms, "new order {new_order}, seqs {seqs}");
        assert_eq!(k.symbolize(0xffff_ffff_8100_1005), Some(("sym_0_", 5, 0x30)));
        assert_eq!(k.size("_text"), Some(0x1000));
        let len = img.len();
        inputs.push((img, vec![0..len, 100..len - 64, 100..len - 64]));
    }
    // 6.15+: place-relative offsets, per-CPU symbols among the others.
    let kernel_only: Vec<_> = syms.iter().filter(|s| s.2 >= 1 << 63).cloned().collect();
    let base = 0xffff_ffff_8300_0000;
    let img = encode_kallsyms_at(&kernel_only, true, true, Some(base));
    let k = Kallsyms::find(&img, base).unwrap_or_else(|e| panic!("6.15+: {e}"));
    let got: Vec<(char, String, u64)> = k.symbols.iter().map(|s| (s.kind, s.name.clone(), s.address)).collect();
    assert_eq!(got, kernel_only, "6.15+ place-relative offsets");
    assert_eq!(k.tables.relative_base_at, 0);
    let out = fuzz("kallsyms", 0x6a11_5e75, inputs, kallsyms_check);
    assert!(out.contains_key("ok") && out.len() > 1, "{out:?}");
}

// ---------------------------------------------------------------- vmlinuz

fn bzimage(payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8; 5 * 512];
    f[0x1f1] = 4;
    f[0x202..0x206].copy_from_slice(b"HdrS");
    f[0x206..0x208].copy_from_slice(&0x20fu16.to_le_bytes());
    f[0x248..0x24c].copy_from_slice(&0u32.to_le_bytes());
    f[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    f.extend_from_slice(payload);
    f
}

fn vmlinuz_check(data: &[u8]) -> String {
    kind(&vmlinuz::decompress(data))
}

#[test]
fn mutated_vmlinuz_never_panics_or_hangs() {
    let mut elf = b"\x7fELF".to_vec();
    elf.extend((0..60_000u32).map(|i| (i * 7 % 13) as u8));
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&elf).unwrap();
    let mut xz = Vec::new();
    liblzma::read::XzEncoder::new(&elf[..], 1).read_to_end(&mut xz).unwrap();
    let zs = zstd::encode_all(&elf[..], 3).unwrap();
    let mut lz = vec![0x02, 0x21, 0x4c, 0x18];
    for chunk in elf.chunks(20_000) {
        let c = lz4_flex::block::compress(chunk);
        lz.extend_from_slice(&(c.len() as u32).to_le_bytes());
        lz.extend_from_slice(&c);
    }
    let mut inputs = Vec::new();
    for mut p in [gz.finish().unwrap(), xz, zs, lz] {
        p.extend_from_slice(&(elf.len() as u32).to_le_bytes());
        let f = bzimage(&p);
        assert_eq!(vmlinuz::decompress(&f).unwrap().0, elf);
        let len = f.len();
        inputs.push((f, vec![0x1f0..0x260, 2560..len, 2560..2600, 2560..len]));
    }
    let out = fuzz("vmlinuz", 0x7a11_7a11, inputs, vmlinuz_check);
    assert!(out.contains_key("ok") && out.len() > 1, "{out:?}");
}
