//! Stack capture. The user-stack step is its own function so the CFI
//! unwinder can replace it for on-CPU samples and off-CPU switches alike.

use aya_ebpf::{bindings::BPF_F_USER_STACK, helpers::bpf_get_stack, EbpfContext};
use profiler_common::{Stat, MAX_STACK_DEPTH};

use crate::maps::count;

const STACK_BYTES: u32 = (MAX_STACK_DEPTH * 8) as u32;

/// Outcome of one stack capture: valid frames and whether the buffer filled.
pub struct Captured {
    pub frames: u32,
    pub truncated: bool,
}

/// Kernel stack of the interrupted context, innermost first. Empty when the
/// sample hit user mode.
#[inline(always)]
pub fn kernel_stack<C: EbpfContext>(ctx: &C, buf: &mut [u64; MAX_STACK_DEPTH]) -> Captured {
    capture(ctx, buf, 0, Stat::KernelStackError)
}

/// User stack of the current task, innermost first, walked by the kernel
/// along frame pointers.
#[inline(always)]
pub fn user_stack<C: EbpfContext>(ctx: &C, buf: &mut [u64; MAX_STACK_DEPTH]) -> Captured {
    capture(ctx, buf, BPF_F_USER_STACK as u64, Stat::UserStackError)
}

#[inline(always)]
fn capture<C: EbpfContext>(ctx: &C, buf: &mut [u64; MAX_STACK_DEPTH], flags: u64, on_error: Stat) -> Captured {
    let ret = unsafe { bpf_get_stack(ctx.as_ptr(), buf.as_mut_ptr().cast(), STACK_BYTES, flags) };
    if ret < 0 {
        count(on_error);
        return Captured { frames: 0, truncated: false };
    }
    let bytes = ret as u32;
    Captured { frames: bytes / 8, truncated: bytes >= STACK_BYTES }
}
