//! Stack capture for on-CPU samples and off-CPU switches alike. User stacks
//! go through the CFI unwinder when the agent turned it on, else through
//! the kernel's frame-pointer walk.

use aya_ebpf::{bindings::BPF_F_USER_STACK, helpers::bpf_get_stack, EbpfContext};
use profiler_common::{Stat, MAX_STACK_DEPTH};

use crate::{maps::count, unwind};

const STACK_BYTES: u32 = (MAX_STACK_DEPTH * 8) as u32;

/// Outcome of one stack capture: valid frames and whether the buffer filled.
pub struct Captured {
    pub frames: u32,
    pub truncated: bool,
    /// `SAMPLE_FLAG_*` bits the unwinder adds (partial, unknown mapping).
    pub flags: u32,
}

/// Kernel stack of the interrupted context, innermost first. Empty when the
/// sample hit user mode.
#[inline(always)]
pub fn kernel_stack<C: EbpfContext>(ctx: &C, buf: &mut [u64; MAX_STACK_DEPTH]) -> Captured {
    capture(ctx, buf, 0, Stat::KernelStackError)
}

/// User stack of the current task (of process `tgid`), innermost first.
#[inline(always)]
pub fn user_stack<C: EbpfContext>(ctx: &C, tgid: u32, buf: &mut [u64; MAX_STACK_DEPTH]) -> Captured {
    if unwind::cfi_enabled() {
        return match unwind::unwind_user(tgid, buf) {
            Some(u) => Captured { frames: u.frames, truncated: u.truncated, flags: u.flags },
            None => Captured { frames: 0, truncated: false, flags: 0 },
        };
    }
    capture(ctx, buf, BPF_F_USER_STACK as u64, Stat::UserStackError)
}

#[inline(always)]
fn capture<C: EbpfContext>(ctx: &C, buf: &mut [u64; MAX_STACK_DEPTH], flags: u64, on_error: Stat) -> Captured {
    let ret = unsafe { bpf_get_stack(ctx.as_ptr(), buf.as_mut_ptr().cast(), STACK_BYTES, flags) };
    if ret < 0 {
        count(on_error);
        return Captured { frames: 0, truncated: false, flags: 0 };
    }
    let bytes = ret as u32;
    Captured { frames: bytes / 8, truncated: bytes >= STACK_BYTES, flags: 0 }
}
