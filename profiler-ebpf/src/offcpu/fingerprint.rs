//! Where a thread entered the kernel, hashed: blocks with the same
//! fingerprint reuse the stacks captured at the first of them.

use aya_ebpf::helpers::{
    bpf_get_current_task_btf, bpf_probe_read_kernel, bpf_probe_read_user, bpf_task_pt_regs, generated,
};

use super::SCRATCH;

/// How far above sp the caller's frame pointer may be for the fingerprint
/// to read its return address: frames between the syscall and the nearest
/// frame-pointer function are small.
const FRAME_POINTER_REACH: u64 = 1 << 20;

/// The widest `[sp, bp + 16)` read in one helper call for both return
/// addresses. A `bpf_probe_read_user` call costs per call far more than per
/// byte: one call copying up to 512 bytes cost less than two 8-byte calls.
/// Under `perf bench sched pipe` pinned to one CPU while `record --off-cpu`
/// ran (bpf_stats, 2-CPU VM, interleaved runs): sched_switch 401-444 ->
/// 365-393 ns per run, while sched_wakeup, which runs next on that CPU,
/// went 66-72 -> 72-85 (the copy's lines likely evict some of its own; not
/// measured): about 30 ns per switch in all. A 128-byte limit missed perf's
/// frames and made it worse (450-463).
const ONE_READ_SPAN: u64 = 512;

/// A hash of where the current thread entered the kernel: user ip, sp, bp,
/// syscall number, and the return addresses at [sp] and [bp+8]. 0 when the
/// registers cannot be read (kernel threads).
///
/// `btf`: read the registers with plain loads. `bpf_task_pt_regs` returns
/// a pointer the verifier knows as `struct pt_regs`, so in a tp_btf
/// program each field is one instruction with a fault fixup, where the
/// helper reads cost two helper calls. Measured with bpf_stats under `perf
/// bench sched pipe` pinned to one CPU while `record --off-cpu` ran (2-CPU
/// VM): the whole fingerprint was about half of sched_switch's time,
/// 487-570 ns per run with it and 251-268 with a constant in its place;
/// 414-434 with plain loads. Of the rest, the read at [bp+8] is most
/// (267-288 without it, 386-400 without only the [sp] read): it tells
/// apart two callers of one blocking helper whose frames have equal sizes,
/// and stays.
#[inline(always)]
pub(super) fn fingerprint(btf: bool) -> u64 {
    let regs = unsafe { bpf_task_pt_regs(bpf_get_current_task_btf()) } as *const u8;
    if regs.is_null() {
        return 0;
    }
    // x86-64 `struct pt_regs`: bp at 32, orig_ax 120, ip 128, cs 136,
    // flags 144, sp 152 (a stable ABI layout).
    let (bp, orig_ax, ip, sp) = if btf {
        let at = |off: usize| unsafe { core::ptr::read_volatile(regs.add(off) as *const u64) };
        (at(32), at(120), at(128), at(152))
    } else {
        let Ok(bp) = (unsafe { bpf_probe_read_kernel(regs.add(32) as *const u64) }) else { return 0 };
        let Ok(tail) = (unsafe { bpf_probe_read_kernel(regs.add(120) as *const [u64; 5]) }) else { return 0 };
        (bp, tail[0], tail[1], tail[4])
    };
    if ip == 0 {
        return 0; // a kernel thread: no user context to tell its blocks apart
    }
    // bp is a frame pointer only in code built with one; elsewhere it holds
    // any value, and a read of an unmapped address takes a page fault that
    // the helper then fixes up. That fault was a third of sched_switch's
    // time where programs block in glibc, which has no frame pointers:
    // 782 -> 517 ns per run on a pipe ping-pong built without them, and
    // 923-1053 -> 858-876 ns on the multi-site load of `cargo xtask bench
    // offcpu` (bpf_stats over `record --off-cpu`, 2-CPU VM). A frame
    // pointer points into the stack just above sp, so only such a bp is
    // read; any other bp still enters the hash by value.
    let (ret_sp, ret_bp) =
        if bp > sp && bp - sp < FRAME_POINTER_REACH { return_addresses(sp, bp) } else { (read_user(sp), 0) };
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for v in [ip, sp, bp, orig_ax, ret_sp, ret_bp] {
        h ^= v;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h | 1
}

#[inline(always)]
fn read_user(addr: u64) -> u64 {
    unsafe { bpf_probe_read_user(addr as *const u64) }.unwrap_or(0)
}

/// The words at `sp` and `bp + 8`, `sp < bp < sp + FRAME_POINTER_REACH`:
/// in one read when they are close, as most are (see `ONE_READ_SPAN`).
/// The per-CPU stack scratch is free here: captures fill it only after the
/// fingerprint is taken.
#[inline(always)]
fn return_addresses(sp: u64, bp: u64) -> (u64, u64) {
    let span = bp - sp + 16;
    if span <= ONE_READ_SPAN && (bp - sp) % 8 == 0 {
        if let Some(buf) = SCRATCH.get_ptr_mut(0) {
            let words = unsafe { &mut (*buf).ips };
            // Bounded again for the verifier, which checks the size
            // against the buffer.
            let n = span as u32;
            if !(16..=ONE_READ_SPAN as u32).contains(&n) {
                return (0, 0);
            }
            let r = unsafe { generated::bpf_probe_read_user(words.as_mut_ptr().cast(), n, sp as *const _) };
            if r != 0 {
                return (0, 0);
            }
            let at_bp = ((bp + 8 - sp) / 8) as usize;
            return (words[0], words[at_bp & (ONE_READ_SPAN as usize / 8 - 1)]);
        }
    }
    (read_user(sp), read_user(bp + 8))
}
