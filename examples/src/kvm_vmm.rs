//! A minimal VMM that embeds the repair, the way a rust-vmm VMM
//! (Firecracker, Cloud Hypervisor) would: it owns its guest's RAM and vCPU
//! fds, hands them to a [`Repairer`], arms it, and in its vCPU loop calls
//! [`Repairer::on_trap`] when a vCPU exits with `KVM_EXIT_DEBUG` at `panic`.
//! Its vCPU runs on a thread of its own, lent by the repairer
//! ([`KvmGuest::take_vcpu`]) and handed back at the trap
//! ([`KvmGuest::put_vcpu`]).
//!
//! Linux cannot boot in useful time under this machine's KVM (software
//! virtualization), so the VMM "boots" its guest from a crash dump taken at
//! the trap (QMP `dump-guest-memory`): RAM and vCPU state as they were when
//! the guest crashed. Everything after that is what a VMM does with a live
//! guest: run the vCPU, take the debug exit at `panic`, repair, run on.

use anyhow::{bail, Context, Result};
use kvm_bindings::{kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit};
use loader::access::{Gpa, VcpuId};
use loader::flow::{Mode, Outcome};
use loader::kvm::memory::Region;
use loader::kvm::vcpu::RunExit;
use loader::kvm::{Caps, EmbedConfig, GuestMemory, KvmGuest, Repairer};
use loader::replay::CoreDump;
use std::path::Path;
use std::time::{Duration, Instant};

/// What the VMM saw.
#[derive(Debug)]
pub struct VmmReport {
    /// `KVM_RUN` exits before the trap (the guest's own I/O, if any).
    pub exits_before_trap: u32,
    /// Where the trap hit (`panic`).
    pub trap_rip: u64,
    pub outcome: Outcome,
    /// The crashed vCPU's `rip` right after the repair (for a kill:
    /// `rewind_stack_and_make_dead`).
    pub resumed_at: u64,
    /// How the run after the repair ended (bounded by `run_after`).
    pub after: Option<RunExit>,
    pub caps: Caps,
}

/// The VMM: its guest RAM (owned mappings) and, once embedded, the
/// repairer holding the VM and vCPU fds. Field order is drop order: the
/// repairer (VM, memory slots) goes before the RAM it maps.
pub struct Vmm {
    repairer: Repairer,
    _ram: Vec<memmap2::MmapMut>,
}

impl std::fmt::Debug for Vmm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vmm").field("ram_blocks", &self._ram.len()).finish_non_exhaustive()
    }
}

impl Vmm {
    /// Creates the VM as any VMM does (RAM mappings in memory slots,
    /// vCPUs with the host's CPUID), loads the dumped guest into it, and
    /// embeds the repairer (which adds its staging slot above RAM and finds
    /// the guest kernel's KASLR slide).
    pub fn from_dump(dump: &Path, image: builder::RepairImage) -> Result<Vmm> {
        let dump = CoreDump::open(dump)?;
        let kvm = Kvm::new().context("opening /dev/kvm")?;
        let caps = Caps::probe(&kvm);
        let vm = kvm.create_vm().context("KVM_CREATE_VM")?;
        let _ = vm.set_tss_address(0xfffb_d000);

        // Guest RAM: the VMM's own anonymous mappings, one slot each.
        let mut ram = Vec::new();
        let mut regions = Vec::new();
        for (slot, (start, end)) in dump.ram_ranges().into_iter().enumerate() {
            let mut m = memmap2::MmapMut::map_anon((end - start) as usize).context("mapping guest RAM")?;
            dump.fill(start, &mut m[..])?;
            let mr = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: start,
                memory_size: m.len() as u64,
                userspace_addr: m.as_mut_ptr() as u64,
            };
            // SAFETY: the mapping lives in `Vmm::_ram`, dropped only after
            // the repairer that owns the VM.
            unsafe { vm.set_user_memory_region(mr) }.context("KVM_SET_USER_MEMORY_REGION")?;
            // SAFETY: same mapping, same lifetime; the VMM creates no Rust
            // reference to it while the repairer may touch it.
            regions.push(unsafe { Region::lent(Gpa(start), m.as_mut_ptr(), m.len()) });
            ram.push(m);
        }

        let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).context("KVM_GET_SUPPORTED_CPUID")?;
        let nx = loader::replay::cpuid_nx(&cpuid);
        let mut fds = Vec::new();
        for i in 0..dump.cpus.len() {
            let fd = vm.create_vcpu(i as u64).context("KVM_CREATE_VCPU")?;
            fd.set_cpuid2(&cpuid).context("KVM_SET_CPUID2")?;
            fds.push(fd);
        }

        // Embed: the repairer takes the VM, its memory and its vCPUs.
        let guest = KvmGuest::new(vm, fds, GuestMemory::new(regions)?, caps);
        for (i, c) in dump.cpus.iter().enumerate() {
            loader::replay::set_vcpu_state(guest.vcpu(VcpuId(i as u32))?, c, nx)?;
        }
        let cfg = EmbedConfig { staging_slot_number: ram.len() as u32, ..EmbedConfig::default() };
        let repairer = Repairer::new(guest, image, cfg).context("embedding the repairer")?;
        Ok(Vmm { repairer, _ram: ram })
    }

    pub fn repairer(&mut self) -> &mut Repairer {
        &mut self.repairer
    }

    /// The vCPU at `panic` (the dumped guest's crashed one).
    pub fn crashed_vcpu(&mut self) -> Result<VcpuId> {
        let panic = self.repairer.session().panic_addr()?;
        let n = self.repairer.session().nr_vcpus;
        for i in 0..n {
            if self.repairer.guest().vcpu(VcpuId(i))?.regs()?.rip == panic.0 {
                return Ok(VcpuId(i));
            }
        }
        bail!("no vCPU is at panic ({panic:#x}); the dump was not taken at the trap")
    }

    /// The VMM's vCPU loop for `vcpu`, on a vCPU thread of its own as in
    /// any rust-vmm VMM: the repairer lends it the vCPU, the thread runs it
    /// and serves its exits, and on the debug exit at `panic` hands it back;
    /// the repairer acts; then the guest runs on for `run_after`.
    pub fn run(&mut self, vcpu: VcpuId, mode: Mode, run_after: Duration) -> Result<VmmReport> {
        let caps = *self.repairer.guest().caps();
        self.repairer.arm().context("arming the trap at panic (KVM_SET_GUEST_DEBUG)")?;
        let panic = self.repairer.session().panic_addr()?;
        let mut v = self.repairer.guest().take_vcpu(vcpu)?;
        let thread = std::thread::Builder::new().name(format!("vcpu{}", vcpu.0)).spawn(move || {
            let mut exits = 0u32;
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                if Instant::now() > deadline {
                    bail!("no trap at panic within 60 s");
                }
                let trapped = match v.fd.run().context("KVM_RUN")? {
                    VcpuExit::Debug(d) if d.pc == panic.0 => Some(d.pc),
                    VcpuExit::Debug(d) => bail!("debug exit at {:#x}, not our trap", d.pc),
                    VcpuExit::IoIn(_, data) => {
                        data.fill(0xff);
                        None
                    }
                    VcpuExit::MmioRead(_, data) => {
                        data.fill(0xff);
                        None
                    }
                    VcpuExit::IoOut(..) | VcpuExit::MmioWrite(..) | VcpuExit::Intr => None,
                    other => bail!("unexpected exit before the trap: {other:?}"),
                };
                if let Some(pc) = trapped {
                    // Hand the vCPU back: the repair runs with it stopped.
                    return Ok((v, pc, exits));
                }
                exits += 1;
            }
        })?;
        let (v, trap_rip, exits) = thread.join().map_err(|_| anyhow::anyhow!("the vCPU thread panicked"))??;
        self.repairer.guest().put_vcpu(v)?;

        // All other vCPUs are stopped (this VMM runs only this one).
        let outcome = self.repairer.on_trap(vcpu, mode)?;
        let resumed_at = self.repairer.guest().vcpu(vcpu)?.regs()?.rip;

        // Run on: after a kill, the guest kernel ends the offending task.
        let after = if run_after.is_zero() {
            None
        } else {
            Some(self.repairer.guest().vcpu_mut(vcpu)?.run_until(Instant::now() + run_after)?)
        };
        Ok(VmmReport { exits_before_trap: exits, trap_rip, outcome, resumed_at, after, caps })
    }
}
