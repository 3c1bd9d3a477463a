//! The text `build-repair-image inspect` prints.

use std::fmt::Write as _;

use repair_kernel::integrity::SkipKind;
use repair_kernel::layout::ABSENT;

use crate::image::{FileInfo, RepairImage, PAGE_SIZE, PF_R, PF_W, PF_X};

/// The size goal of the repair kernel plus its profile (uncompressed).
pub const SIZE_GOAL: u64 = 256 * 1024;

fn kib(n: u64) -> String {
    format!("{:.1} KiB", n as f64 / 1024.0)
}

/// Bytes of the repair kernel (file bytes of its segments) plus the profile
/// and layout it is given: what the size goal is about.
pub fn kernel_plus_profile(image: &RepairImage) -> u64 {
    image.unikernel.file_size() + image.profile_json.len() as u64 + 8 * image.layout.values.len() as u64
}

/// What an image holds, with sizes, as `inspect` prints it.
pub fn report(image: &RepairImage, info: &FileInfo) -> String {
    let mut s = String::new();
    let k = &image.kernel;
    let u = &image.unikernel;
    let _ = writeln!(s, "format version:   {}", crate::image::FORMAT_VERSION);
    let _ = writeln!(s, "kernel release:   {}", k.release);
    let _ = writeln!(s, "build-id:         {}", k.build_id_hex());
    let _ = writeln!(s, "banner:           {}", k.banner.trim_end());
    let _ = writeln!(s, "snapshot source:  {}", image.snapshot_source.as_str());
    let _ = writeln!(
        s,
        "repair kernel:    link base {:#x}, entry {:#x}, repair_done {:#x}, stack top {:#x}",
        u.link_base, u.entry, u.done, u.stack_top
    );
    for seg in &u.segments {
        let flag = |bit, c| if seg.flags & bit != 0 { c } else { '-' };
        let _ = writeln!(
            s,
            "  segment {:#x} {}{}{}  file {:>10}  mem {:>10}",
            seg.vaddr,
            flag(PF_R, 'r'),
            flag(PF_W, 'w'),
            flag(PF_X, 'x'),
            kib(seg.data.len() as u64),
            kib(seg.memsz)
        );
    }
    let _ = writeln!(
        s,
        "repair kernel code: {} (file bytes; {} loaded, with .bss and stack)",
        kib(u.file_size()),
        kib(u.mem_size())
    );
    let _ = writeln!(s, "profile:          {} (JSON)", kib(image.profile_json.len() as u64));
    let absent = image.layout.values.iter().filter(|&&v| v == ABSENT).count();
    let _ = writeln!(
        s,
        "layout:           {} items, {} bytes ({} absent in this kernel)",
        image.layout.values.len(),
        8 * image.layout.values.len(),
        absent
    );
    for (i, spec) in repair_kernel::layout::ITEMS.iter().enumerate() {
        if spec.kind != repair_kernel::layout::Kind::CallFrame {
            continue;
        }
        let rule = match repair_kernel::frame::FrameRule::unpack(image.layout.values[i]) {
            Some(r) => r.to_string(),
            None => "absent (no such call in this kernel, or no .debug_frame rule the repair kernel can follow)".into(),
        };
        let _ = writeln!(s, "call frame:       {} calling {}: {rule}", spec.ty, spec.member);
    }
    match image.layout.get(repair_kernel::layout::Item::TifSigpending) {
        Some(bit) => {
            let _ = writeln!(s, "TIF_SIGPENDING:   bit {bit} (read from signal_wake_up_state's code)");
        }
        None => {
            let _ = writeln!(s, "TIF_SIGPENDING:   unknown (signal_wake_up_state's code did not show it): no pending SIGKILL can be given");
        }
    }
    let _ = writeln!(
        s,
        "page hashes:      {} pages of text + rodata ({} covered)",
        image.page_hashes.len(),
        kib((image.page_hashes.len() * PAGE_SIZE) as u64)
    );
    let mut by_kind = [0usize; 5];
    for k in &image.skips {
        let kind = if k.kind <= 4 { k.kind as usize } else { SkipKind::Other as usize };
        by_kind[kind] += 1;
    }
    let _ = writeln!(
        s,
        "skip sites:       {} (run-time patch sites, zeroed before hashing: jump labels {}, ftrace {}, \
         static calls {}, alternatives {}, other {})",
        image.skips.len(),
        by_kind[SkipKind::JumpLabel as usize],
        by_kind[SkipKind::Ftrace as usize],
        by_kind[SkipKind::StaticCall as usize],
        by_kind[SkipKind::Alternative as usize],
        by_kind[SkipKind::Other as usize]
    );
    let _ = writeln!(
        s,
        "pristine pages:   {} ({})",
        image.pristine.len(),
        kib((image.pristine.len() * PAGE_SIZE) as u64)
    );
    let _ = writeln!(
        s,
        "payload:          {} uncompressed, {} compressed (file {})",
        kib(info.payload_len),
        kib(info.file_len.saturating_sub(crate::image::HEADER_LEN as u64 + 8)),
        kib(info.file_len)
    );
    let total = kernel_plus_profile(image);
    let _ = writeln!(
        s,
        "repair kernel + profile: {} KiB (goal < 256 KiB){}",
        total.div_ceil(1024),
        if total < SIZE_GOAL { "" } else { "  OVER THE GOAL" }
    );
    s
}
