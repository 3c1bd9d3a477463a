//! Runs the embedded repair kernel for real, under QEMU (TCG), on the page
//! tables of a [`StagePlan`]: a 216-byte multiboot stub enters long mode,
//! loads a stand-in "guest" GDT/IDT and jumps to the plan's entry with the
//! plan's registers. Completion writes the run status to port 0x501, where
//! QEMU's `isa-debug-exit` device turns it into QEMU's exit status
//! `(status << 1) | 1`. This checks entry, descriptor tables, the fault
//! path and completion; the loader's tests run it inside real kernels.
//!
//! Needs `qemu-system-x86_64` (Debian: `qemu-system-x86`); fails without it.

use std::time::Duration;

use builder::image::RepairImage;
use builder::{builtin_unikernel, StagePlan};
use harness::{Guest, GuestConfig, Kernel};
use repair_kernel::contract::{Contract, ContractIn, CpuState, RunStatus};
use repair_kernel::layout::KernelLayout;

/// `tests/qemu-stub.S` assembled at 0x100000 (`as --64`, `ld -Ttext=0x100000
/// --oformat binary`): multiboot header, 32-bit entry at +12 enabling PAE,
/// long mode and paging with `cr3 = params[0]`, a far jump to 64-bit code
/// that loads data segments, `lidt` a fake guest IDT, and jumps to
/// `params[4]` with rsp, rdi, rsi = params[1..4]. `params` is at +0xb0.
const STUB: [u8; 216] = [
    0x02, 0xb0, 0xad, 0x1b, 0x00, 0x00, 0x00, 0x00, 0xfe, 0x4f, 0x52, 0xe4, 0xfa, 0x0f, 0x20, 0xe0, 0x83,
    0xc8, 0x20, 0x0f, 0x22, 0xe0, 0xa1, 0xb0, 0x00, 0x10, 0x00, 0x0f, 0x22, 0xd8, 0xb9, 0x80, 0x00, 0x00,
    0xc0, 0x0f, 0x32, 0x0d, 0x00, 0x01, 0x00, 0x00, 0x0f, 0x30, 0x0f, 0x20, 0xc0, 0x0d, 0x01, 0x00, 0x00,
    0x80, 0x0f, 0x22, 0xc0, 0x0f, 0x01, 0x15, 0x98, 0x00, 0x10, 0x00, 0xea, 0x45, 0x00, 0x10, 0x00, 0x10,
    0x00, 0x66, 0xb8, 0x18, 0x00, 0x8e, 0xd8, 0x8e, 0xc0, 0x8e, 0xd0, 0x0f, 0x01, 0x1d, 0x4a, 0x00, 0x00,
    0x00, 0x48, 0x8b, 0x25, 0x5b, 0x00, 0x00, 0x00, 0x48, 0x8b, 0x3d, 0x5c, 0x00, 0x00, 0x00, 0x48, 0x8b,
    0x35, 0x5d, 0x00, 0x00, 0x00, 0x48, 0x8b, 0x05, 0x5e, 0x00, 0x00, 0x00, 0xff, 0xe0, 0x0f, 0x1f, 0x40,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0xff, 0xff, 0x00, 0x00, 0x00, 0x9a, 0xaf, 0x00, 0xff, 0xff, 0x00, 0x00, 0x00, 0x92, 0xcf, 0x00, 0x1f,
    0x00, 0x78, 0x00, 0x10, 0x00, 0x66, 0x90, 0xff, 0x0f, 0x00, 0x40, 0x23, 0x01, 0x00, 0x00, 0x00, 0x00,
    0x66, 0x0f, 0x1f, 0x44, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
];
const STUB_BASE: u32 = 0x10_0000;
const PARAMS: usize = 0xb0;
const RAM: u64 = 128 << 20;
const BASE: u64 = 0x20_0000;
const SIZE: u64 = 0x8_0000;

/// A minimal ELF32 (EM_386) with one `PT_LOAD` per chunk, loaded by QEMU's
/// multiboot loader at the chunks' physical addresses.
fn elf32(entry: u32, chunks: &[(u64, Vec<u8>)]) -> Vec<u8> {
    let phoff = 52u32;
    let mut off = phoff + 32 * chunks.len() as u32;
    let mut head = Vec::new();
    head.extend_from_slice(b"\x7fELF\x01\x01\x01\0\0\0\0\0\0\0\0\0");
    for v in [2u16, 3] {
        head.extend_from_slice(&v.to_le_bytes()); // ET_EXEC, EM_386
    }
    head.extend_from_slice(&1u32.to_le_bytes());
    head.extend_from_slice(&entry.to_le_bytes());
    head.extend_from_slice(&phoff.to_le_bytes());
    head.extend_from_slice(&0u32.to_le_bytes()); // shoff
    head.extend_from_slice(&0u32.to_le_bytes()); // flags
    for v in [52u16, 32, chunks.len() as u16, 40, 0, 0] {
        head.extend_from_slice(&v.to_le_bytes());
    }
    let mut body = Vec::new();
    for (addr, bytes) in chunks {
        off = off.next_multiple_of(4);
        for v in [1u32, off, *addr as u32, *addr as u32, bytes.len() as u32, bytes.len() as u32, 7, 4] {
            head.extend_from_slice(&v.to_le_bytes());
        }
        off += bytes.len() as u32;
    }
    for (_, bytes) in chunks {
        while (head.len() + body.len()) % 4 != 0 {
            body.push(0);
        }
        body.extend_from_slice(bytes);
    }
    head.extend_from_slice(&body);
    head
}

/// Stages the built-in repair kernel as the loader would, behind the
/// multiboot stub that enters long mode on the plan, and writes it all as
/// one ELF (in a directory that lives as long as the returned handle).
fn stub_elf(contract: &Contract, rsi_override: Option<u64>) -> (StagePlan, tempfile::TempDir, std::path::PathBuf) {
    let image = RepairImage { unikernel: builtin_unikernel().unwrap(), ..RepairImage::default() };
    let plan = StagePlan::new(&image, BASE, SIZE, RAM).unwrap();
    let mut stub = STUB.to_vec();
    let rsi = rsi_override.unwrap_or(plan.integrity_gva);
    for (i, v) in [plan.cr3, plan.stack_top, plan.contract_gva, rsi, plan.entry_rip].iter().enumerate() {
        stub[PARAMS + 8 * i..PARAMS + 8 * i + 8].copy_from_slice(&v.to_le_bytes());
    }
    let mut chunks = vec![(STUB_BASE as u64, stub)];
    chunks.extend(plan.writes.iter().cloned());
    chunks.push((plan.contract_gpa, contract.as_bytes().to_vec()));
    // QEMU's multiboot loader copies [lowest, highest) of the ELF as one
    // block: give it one segment without holes.
    let end = chunks.iter().map(|(a, b)| a + b.len() as u64).max().unwrap();
    let mut flat = vec![0u8; (end - STUB_BASE as u64) as usize];
    for (a, b) in &chunks {
        let at = (a - STUB_BASE as u64) as usize;
        flat[at..at + b.len()].copy_from_slice(b);
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stub.elf");
    std::fs::write(&path, elf32(STUB_BASE + 12, &[(STUB_BASE as u64, flat)])).unwrap();
    (plan, dir, path)
}

/// Boots the stub ELF under the harness's QEMU (TCG, one vCPU, 128 MiB),
/// with `extra` QEMU arguments.
fn boot(path: &std::path::Path, extra: &[&str]) -> Guest {
    let mut cfg = GuestConfig::new(Kernel::Debian).with_image(path, None);
    cfg.cpus = 1;
    cfg.mem_mib = (RAM >> 20) as u32;
    cfg.qemu_args = extra.iter().map(|a| a.to_string()).collect();
    Guest::boot(&cfg).unwrap_or_else(|e| panic!("{e}"))
}

/// Runs the plan under QEMU; returns the run status the repair kernel
/// signalled, or a description of what else happened.
fn run(contract: &Contract, rsi_override: Option<u64>) -> Result<u32, String> {
    let (_plan, _dir, path) = stub_elf(contract, rsi_override);
    let mut guest = boot(&path, &["-device", "isa-debug-exit,iobase=0x501,iosize=1"]);
    match guest.wait_exit(Duration::from_secs(60)).unwrap() {
        Some(st) => {
            let err = guest.qemu_stderr();
            if !err.trim().is_empty() {
                return Err(format!("QEMU failed: {err}"));
            }
            match st.code() {
                Some(c) if c & 1 == 1 => Ok((c as u32) >> 1),
                other => Err(format!("QEMU exited with {other:?} (0: triple fault, the guest reset)")),
            }
        }
        // Dropping the guest kills QEMU.
        None => Err("no completion within 60 s (hung?)".into()),
    }
}

fn contract() -> Contract {
    Contract::new(ContractIn {
        crashed: CpuState::default(),
        cpu: 0,
        nr_vcpus: 1,
        kaslr_slide: 0,
        ram_end: RAM,
        borrowed_base: BASE,
        borrowed_size: SIZE,
        max_tasks: 100,
        read_only: 1,
        layout: KernelLayout::default(),
    })
}

#[test]
fn runs_to_completion() {
    // An empty layout: the run declines, but it runs to the end.
    assert_eq!(run(&contract(), None), Ok(RunStatus::Done as u32));
}

#[test]
fn a_cpu_exception_ends_the_run_as_faulted() {
    // rsi pointing into the window where nothing is mapped: reading the
    // integrity table page-faults inside the repair kernel.
    assert_eq!(run(&contract(), Some(0x0000_0080_1000_0000)), Ok(RunStatus::Faulted as u32));
}

#[test]
fn an_invalid_contract_is_not_run() {
    let mut c = contract();
    c.version = 999;
    assert_eq!(run(&c, None), Ok(RunStatus::NotRun as u32));
}

/// Runs the plan under QEMU with its monitor on stdio, waits until the vCPU
/// sits in `repair_done`, and returns the contract block read back from
/// guest memory and the IDTR base the vCPU ended with.
fn run_and_read_back(contract: &Contract, rsi_override: Option<u64>) -> (Contract, u64) {
    let (plan, dir, path) = stub_elf(contract, rsi_override);
    let dump = dir.path().join("contract.bin");
    // QEMU is killed when the guest drops, whatever happens below.
    let mut guest = boot(&path, &[]);
    let mut qmp = |cmd: serde_json::Value| guest.qmp(&cmd).unwrap_or_else(|e| panic!("{e}"));
    let field = |text: &str, key: &str| -> Option<u64> {
        let at = text.find(key)? + key.len();
        let hex: String = text[at..].trim_start().chars().take_while(|c| c.is_ascii_hexdigit()).collect();
        u64::from_str_radix(&hex, 16).ok()
    };
    let start = std::time::Instant::now();
    let mut idt_base = None;
    while start.elapsed() < Duration::from_secs(60) {
        let r = qmp(serde_json::json!({"execute": "human-monitor-command",
                                        "arguments": {"command-line": "info registers"}}));
        let text = r.as_str().unwrap_or_default();
        if let Some(rip) = field(text, "RIP=") {
            if (plan.done_rip..plan.done_rip + 8).contains(&rip) {
                idt_base = field(text, "IDT=");
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let idt_base = idt_base.expect("the repair kernel reached repair_done within 60 s");
    let size = std::mem::size_of::<Contract>();
    qmp(serde_json::json!({"execute": "pmemsave",
        "arguments": {"val": plan.contract_gpa, "size": size, "filename": dump.to_str().unwrap()}}));
    let bytes = std::fs::read(&dump).unwrap();
    (Contract::from_bytes(&bytes).expect("a valid contract block"), idt_base)
}

#[test]
fn fault_is_recorded_and_guest_idtr_restored() {
    use repair_kernel::contract::{field_str, Action};
    let (c, idt) = run_and_read_back(&contract(), Some(0x0000_0080_1000_0000));
    assert_eq!(idt, 0x123_4000, "the stand-in guest's IDTR is back");
    let out = c.output;
    assert_eq!(out.status, RunStatus::Faulted as u32);
    assert_eq!(out.action, Action::Decline as u32);
    assert_eq!(out.fault.vector, 14, "#PF");
    assert_eq!(out.fault.cr2 & !0xfff, 0x0000_0080_1000_0000, "cr2 {:#x}", out.fault.cr2);
    let reason = field_str(&out.reason);
    assert!(reason.contains("#PF page fault"), "{reason}");

    let (c, idt) = run_and_read_back(&contract(), None);
    assert_eq!(idt, 0x123_4000);
    assert_eq!(c.output.status, RunStatus::Done as u32);
    assert_eq!(c.output.action, Action::Decline as u32, "{}", field_str(&c.output.reason));
}
