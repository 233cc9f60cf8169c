//! Capturing and storing the stacks of a block: kept by content hash in
//! `STACKS`, so a stack seen by many blocks is stored once.

use aya_ebpf::EbpfContext;
use profiler_common::{offcpu::StackTrace, Stat, MAX_STACK_DEPTH};

use super::{BPF_NOEXIST, SCRATCH, STACKS};
use crate::{maps::count, stack};

/// Stack id of a stack that was captured but could not be stored (the map
/// was full, or its on-demand allocation failed); user space sees no frames.
pub(super) const STACK_LOST: u64 = 0;

/// A stored stack: its id and the unwinder's flags.
pub(super) struct Stored {
    pub id: u64,
    pub flags: u32,
}

/// Captures the current kernel or user stack, stores it in `STACKS` under
/// the hash of its content, and returns the hash (0: no stack).
#[inline(always)]
pub(super) fn capture<C: EbpfContext>(ctx: &C, tgid: u32, user: bool) -> Stored {
    let Some(buf) = SCRATCH.get_ptr_mut(0) else { return Stored { id: 0, flags: 0 } };
    let buf = unsafe { &mut *buf };
    let got = if user { stack::user_stack(ctx, tgid, &mut buf.ips) } else { stack::kernel_stack(ctx, &mut buf.ips) };
    // The flags go through memory before the caller branches on them: a
    // branch on the unwinder's own value makes the verifier track it
    // precisely through every unwind step, and it then never finished.
    unsafe { core::ptr::write_volatile(&mut buf._pad, got.flags) };
    let flags = unsafe { core::ptr::read_volatile(&buf._pad) };
    buf._pad = 0;
    Stored { id: store(buf, got.frames), flags }
}

/// Stores the first `frames` of `buf` in `STACKS`; returns its id.
#[inline(always)]
pub(super) fn store(buf: &mut StackTrace, frames: u32) -> u64 {
    if frames == 0 {
        return 0;
    }
    buf.len = frames;
    let id = hash(&buf.ips, frames);
    if STACKS.insert(&id, buf, BPF_NOEXIST).is_err() && unsafe { STACKS.get(&id) }.is_none() {
        count(Stat::StackMapFull);
        return STACK_LOST;
    }
    id
}

/// FNV-1a over the valid frames, never 0.
#[inline(always)]
fn hash(ips: &[u64; MAX_STACK_DEPTH], len: u32) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for i in 0..MAX_STACK_DEPTH {
        if i as u32 >= len {
            break;
        }
        h ^= ips[i];
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h | 1
}
