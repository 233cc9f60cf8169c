//! User-stack unwinding with CFI tables, for code built without frame
//! pointers (Debian's glibc, python3, anything `-O2`).
//!
//! The agent derives compact tables from each file's `.eh_frame` (one table
//! per file, shared by every process mapping it) into `UNWIND_ROWS`, and
//! each process's executable mappings into `PROCESSES`. Per frame: find the
//! mapping of the pc, binary-search its table, compute the CFA, read the
//! return address at CFA-8 and, where the row says so, the caller's rbp.
//! Where no table covers a pc the step falls back to the frame pointer and
//! the stack is flagged partial.
//!
//! The frame loop runs under `bpf_loop`, so the verifier checks one step
//! instead of every unrolled frame (a plain 127-frame loop around two
//! binary searches exceeds its complexity limit).

use core::ffi::c_void;

use aya_ebpf::{
    helpers::{bpf_get_current_task_btf, bpf_loop, bpf_probe_read_kernel, bpf_probe_read_user, bpf_task_pt_regs},
    macros::{btf_tracepoint, map, raw_tracepoint},
    maps::{Array, HashMap, PerCpuArray},
    programs::{BtfTracePointContext, RawTracePointContext},
};
use profiler_common::{
    unwind::{
        Mapping, ProcessEntry, UnwindRow, INDEX_PAGE_SHIFT, MAPPING_SEARCH_STEPS, MAPPING_SLOTS, MAX_UNWIND_FRAMES,
        ROWS_ANON, ROW_CFA_RBP, ROW_CFA_RSP, ROW_END, ROW_NONE, ROW_PLT, ROW_SEARCH_STEPS, ROW_SIGNAL, SIGFRAME_RBP,
        SIGFRAME_RIP, SIGFRAME_RSP,
    },
    Stat, MAX_STACK_DEPTH, SAMPLE_FLAG_UNKNOWN_MAPPING, SAMPLE_FLAG_USER_PARTIAL,
};

use crate::{maps::count, python};

/// Set by the agent: non-zero to unwind user stacks with CFI tables; 0
/// leaves them to the kernel's frame-pointer walk (`bpf_get_stack`).
#[no_mangle]
static CFI_UNWINDING: u32 = 0;

/// Whether the agent has loaded `tgid`'s mappings (its tables), so the
/// off-CPU program can tell a stack walked before they were loaded.
#[inline(always)]
pub fn known(tgid: u32) -> bool {
    unsafe { PROCESSES.get(&tgid).is_some() }
}

#[inline(always)]
pub fn cfi_enabled() -> bool {
    unsafe { core::ptr::read_volatile(&CFI_UNWINDING) != 0 }
}

/// Rows of every loaded table, back to back. The agent sizes it at load
/// time from its table memory budget, allocates ranges in it, and writes
/// rows through a shared mapping of the array (one syscall per row would
/// cost ~30k syscalls for libc alone).
#[map]
static UNWIND_ROWS: Array<UnwindRow> = Array::with_max_entries(1, BPF_F_MMAPABLE);

/// Where each process's executable mappings are in `MAPPINGS`; the agent
/// inserts and removes.
#[map]
static PROCESSES: HashMap<u32, ProcessEntry> = HashMap::with_max_entries(16_384, 0);

/// Executable mappings of every process, a sorted range per process. An
/// array rather than a per-process value: the binary search then indexes
/// through map lookups the verifier does not need to track, where pointer
/// arithmetic into one big value made it follow every search path (a
/// second of load time, or over its limit).
#[map]
static MAPPINGS: Array<Mapping> = Array::with_max_entries(MAPPING_SLOTS, BPF_F_MMAPABLE);

/// The frames of the unwind in progress: too big for the BPF stack.
#[map]
static FRAMES: PerCpuArray<[u64; FRAME_SLOTS]> = PerCpuArray::with_max_entries(1, 0);
const FRAME_SLOTS: usize = 128;

/// The bounds of the binary search in progress (`lo`, `hi`), kept in map
/// memory rather than registers: the verifier forgets what it knew of a
/// value stored there, so the two halves of every step reach the next step
/// in the same state and are checked once. With the bounds in registers
/// each step's refined ranges kept the paths apart, and on Linux 6.18.44
/// the on-CPU program went past the verifier's one million instructions
/// (it had loaded on earlier 6.18 kernels); costs two loads and a store
/// per step.
#[map]
static SEARCH: PerCpuArray<[u32; 2]> = PerCpuArray::with_max_entries(1, 0);

/// Runs a binary search of at most `steps` steps over `lo..hi` for the first
/// index whose `before(index)` is false (`None`: a lookup failed), with
/// its bounds in [`SEARCH`].
#[inline(always)]
fn search(lo: u32, hi: u32, steps: u32, mut before: impl FnMut(u32) -> Option<bool>) -> Option<u32> {
    let b = SEARCH.get_ptr_mut(0)?;
    unsafe {
        core::ptr::write_volatile(&mut (*b)[0], lo);
        core::ptr::write_volatile(&mut (*b)[1], hi);
    }
    for _ in 0..steps {
        let (lo, hi) = unsafe { (core::ptr::read_volatile(&(*b)[0]), core::ptr::read_volatile(&(*b)[1])) };
        if lo >= hi {
            break;
        }
        let mid = lo + (hi - lo) / 2;
        if before(mid)? {
            unsafe { core::ptr::write_volatile(&mut (*b)[0], mid + 1) };
        } else {
            unsafe { core::ptr::write_volatile(&mut (*b)[1], mid) };
        }
    }
    Some(unsafe { core::ptr::read_volatile(&(*b)[0]) })
}
const _: () = assert!(FRAME_SLOTS.is_power_of_two() && FRAME_SLOTS >= MAX_UNWIND_FRAMES as usize);

const BPF_F_MMAPABLE: u32 = 1 << 10;

/// A mapping without a table, for the cache below.
const NO_ROWS: u32 = 0;

/// Unwinder registers and bookkeeping, on the caller's stack and handed to
/// every `step`.
#[repr(C)]
struct State {
    tgid: u32,
    frames: u32,
    pc: u64,
    sp: u64,
    bp: u64,
    /// `pc` is exact (the first frame, or restored from a signal frame)
    /// rather than a return address, which points past its call.
    exact: u32,
    /// `SAMPLE_FLAG_*` bits to add to the sample.
    flags: u32,
    /// Set when a step ended the walk, so a walk that ran out of
    /// iterations is told from one that ended on the last.
    stopped: u32,
    _pad: u32,
    /// The mapping the last pc fell in, so frames in the same file skip
    /// the mapping search.
    cached: Mapping,
}

/// How one unwind went.
pub struct Unwound {
    pub frames: u32,
    pub flags: u32,
    pub truncated: bool,
}

/// Unwinds the current task's user stack into `out`, innermost first.
/// `None` when the task has no user context (kernel threads).
#[inline(always)]
pub fn unwind_user(tgid: u32, out: &mut [u64; MAX_STACK_DEPTH]) -> Option<Unwound> {
    let regs = unsafe { bpf_task_pt_regs(bpf_get_current_task_btf()) } as *const u8;
    if regs.is_null() {
        return None;
    }
    // x86-64 `struct pt_regs` (stable ABI): bp at 32, ip 128, cs 136, sp 152.
    let bp = unsafe { bpf_probe_read_kernel(regs.add(32) as *const u64) }.ok()?;
    let tail = unsafe { bpf_probe_read_kernel(regs.add(128) as *const [u64; 4]) }.ok()?;
    let (pc, cs, sp) = (tail[0], tail[1], tail[3]);
    if cs & 3 != 3 || pc == 0 {
        return None; // a kernel thread: its pt_regs hold no user state
    }
    let mut st =
        State { tgid, frames: 0, pc, sp, bp, exact: 1, flags: 0, stopped: 0, _pad: 0, cached: Mapping::default() };
    // The CPython walk (python.rs) puts Python frames in place of the
    // interpreter loop's native frames.
    python::begin(tgid);
    unsafe {
        bpf_loop(MAX_UNWIND_FRAMES, step as *mut c_void, (&mut st as *mut State).cast(), 0);
    }
    let buf = FRAMES.get_ptr(0)?;
    let n = st.frames.min(MAX_STACK_DEPTH as u32);
    for i in 0..MAX_STACK_DEPTH {
        if i as u32 >= n {
            break;
        }
        out[i] = unsafe { (*buf)[i] };
    }
    let truncated = st.stopped == 0;
    if truncated {
        count(Stat::UnwindDepthLimit);
    }
    if st.flags & SAMPLE_FLAG_USER_PARTIAL != 0 {
        count(Stat::UnwindPartial);
    }
    Some(Unwound { frames: n, flags: st.flags, truncated })
}

/// Outcome of one step: go on to the next frame or stop.
const CONTINUE: i64 = 0;
const STOP: i64 = 1;

/// One frame: records the pc, then finds the caller's registers.
///
/// The frame slot comes from bpf_loop's index, not from a counter in
/// `State`: the verifier checks a callback again for every distinct state
/// it is entered with, and a counter it must track exactly (it indexes the
/// buffer) would make every iteration distinct.
#[inline(never)]
extern "C" fn step(index: u32, ctx: *mut c_void) -> i64 {
    let st = unsafe { &mut *(ctx as *mut State) };
    let mut r = step_frame(index, st);
    if r == STOP && python::defer_stop() {
        // The interpreter call's remaining Python frames still go out,
        // one per iteration, before the walk ends.
        r = CONTINUE;
    }
    if r == STOP {
        st.stopped = 1;
    }
    r
}

#[inline(always)]
fn step_frame(index: u32, st: &mut State) -> i64 {
    let Some(buf) = FRAMES.get_ptr_mut(0) else { return STOP };
    // bpf_loop keeps the index below MAX_UNWIND_FRAMES; the mask into a
    // power-of-two buffer is for the verifier, which loses a plain bounds
    // check across LLVM's register copies.
    let slot = index as usize & (FRAME_SLOTS - 1);
    // Python frames of an interpreter call take one iteration each; the
    // registers already hold the caller of its native frame.
    match python::pending() {
        python::Pending::Frame(frame, last) => {
            unsafe { (*buf)[slot] = frame };
            st.frames = index + 1;
            return if last { STOP } else { CONTINUE };
        }
        python::Pending::Done => return STOP,
        python::Pending::None => {}
    }
    unsafe { (*buf)[slot] = st.pc };
    st.frames = index + 1;
    // A return address points after its call, which may be the last
    // instruction of the function (a call to a noreturn function), so it is
    // looked up one byte earlier.
    let lookup_pc = if st.exact != 0 { st.pc } else { st.pc - 1 };
    st.exact = 0;
    if let Some(frame) = python::at_frame(lookup_pc) {
        unsafe { (*buf)[slot] = frame };
    }

    if !in_cached(st, lookup_pc) && !find_mapping(st, lookup_pc) {
        count(Stat::UnwindNoMapping);
        st.flags |= SAMPLE_FLAG_UNKNOWN_MAPPING | SAMPLE_FLAG_USER_PARTIAL;
        return frame_pointer_step(st);
    }
    if st.cached.rows_len == NO_ROWS {
        if st.cached.rows_start == ROWS_ANON {
            return jit_step(st);
        }
        return no_table(st);
    }
    let Some(row) = find_row(&st.cached, lookup_pc) else { return no_table(st) };
    let cfa = match row.kind {
        ROW_CFA_RSP => st.sp + row.cfa_offset as u64,
        ROW_CFA_RBP => st.bp + row.cfa_offset as u64,
        ROW_PLT => {
            let extra = if (st.pc & 15) as i8 >= row.rbp_offset { 8 } else { 0 };
            st.sp + row.cfa_offset as u64 + extra
        }
        ROW_NONE => return no_table(st),
        ROW_END => {
            count(Stat::UnwindComplete);
            return STOP;
        }
        ROW_SIGNAL => return signal_step(st),
        _ => {
            count(Stat::UnwindUnsupported);
            return STOP;
        }
    };
    let Ok(ra) = (unsafe { bpf_probe_read_user((cfa - 8) as *const u64) }) else {
        count(Stat::UnwindReadFault);
        return STOP;
    };
    if row.rbp_offset != 0 && row.kind != ROW_PLT {
        let at = cfa.wrapping_add((row.rbp_offset as i64 * 8) as u64);
        match unsafe { bpf_probe_read_user(at as *const u64) } {
            Ok(bp) => st.bp = bp,
            Err(_) => {
                count(Stat::UnwindReadFault);
                return STOP;
            }
        }
    }
    st.sp = cfa;
    next_pc(st, ra)
}

#[inline(always)]
fn next_pc(st: &mut State, pc: u64) -> i64 {
    if pc == 0 {
        count(Stat::UnwindComplete);
        return STOP;
    }
    st.pc = pc;
    CONTINUE
}

#[inline(always)]
fn no_table(st: &mut State) -> i64 {
    count(Stat::UnwindNoTable);
    st.flags |= SAMPLE_FLAG_USER_PARTIAL;
    frame_pointer_step(st)
}

/// JIT code has no CFI; V8, and HotSpot with `-XX:+PreserveFramePointer`,
/// keep frame pointers in it. The walk stops are counted apart from native
/// ones, since their cause (a runtime flag) is not a native one. Native
/// code called from JIT code (V8's `Math.sin` in libm) is walked by its CFI
/// table, which restores the JIT frame's rbp, so the walk reaches the JIT
/// caller and continues from there.
///
/// CPython 3.12+'s perf trampolines (`-X perf`, `-X perf_jit`) are the
/// exception: copies of `sub $8,%rsp; call *%rcx; add $8,%rsp; ret` that
/// keep no frame pointer, in an interpreter built without them, so rbp
/// there is whatever the C code left and the walk ended at the innermost
/// trampoline (tests/tests/jit_python.rs). A return address right after
/// that exact call is stepped by the template's fixed frame instead: the
/// caller's return address at sp+8, CFA sp+16, rbp untouched. One 16-byte
/// read of the code per JIT frame.
#[inline(always)]
fn jit_step(st: &mut State) -> i64 {
    count(Stat::UnwindJitFrames);
    st.flags |= SAMPLE_FLAG_USER_PARTIAL;
    if let Ok(code) = unsafe { bpf_probe_read_user((st.pc.wrapping_sub(6)) as *const [u64; 2]) } {
        if code[0] == CPYTHON_TRAMPOLINE_HEAD && code[1] & 0xff_ffff == CPYTHON_TRAMPOLINE_TAIL {
            let Ok(ra) = (unsafe { bpf_probe_read_user((st.sp + 8) as *const u64) }) else {
                count(Stat::UnwindJitReadFault);
                return STOP;
            };
            st.sp += 16;
            return next_pc(st, ra);
        }
    }
    if st.bp == 0 {
        count(Stat::UnwindJitEnd);
        return STOP;
    }
    let Ok(pair) = (unsafe { bpf_probe_read_user(st.bp as *const [u64; 2]) }) else {
        count(Stat::UnwindJitReadFault);
        return STOP;
    };
    st.sp = st.bp + 16;
    st.bp = pair[0];
    next_pc(st, pair[1])
}

/// Bytes 48 83 ec 08 ff d1 48 83 (`sub $8,%rsp; call *%rcx`, and the
/// first two of the `add`), little-endian, read from 6 bytes before the
/// return address.
const CPYTHON_TRAMPOLINE_HEAD: u64 = 0x8348_d1ff_08ec_8348;
/// The rest from 2 bytes after it: c4 08 c3 (`add $8,%rsp; ret`).
const CPYTHON_TRAMPOLINE_TAIL: u64 = 0x00c3_08c4;

/// The frame-pointer convention: [bp] is the caller's bp, [bp+8] the
/// return address. A zero bp ends the chain (the ABI's outermost frame).
#[inline(always)]
fn frame_pointer_step(st: &mut State) -> i64 {
    if st.bp == 0 {
        count(Stat::UnwindComplete);
        return STOP;
    }
    let Ok(pair) = (unsafe { bpf_probe_read_user(st.bp as *const [u64; 2]) }) else {
        count(Stat::UnwindReadFault);
        return STOP;
    };
    st.sp = st.bp + 16;
    st.bp = pair[0];
    next_pc(st, pair[1])
}

/// `__restore_rt`: rsp points at the `ucontext_t` the kernel saved, whose
/// registers are the interrupted frame's, pc exact.
#[inline(always)]
fn signal_step(st: &mut State) -> i64 {
    let base = st.sp;
    let regs = unsafe {
        (
            bpf_probe_read_user((base + SIGFRAME_RBP) as *const u64),
            bpf_probe_read_user((base + SIGFRAME_RSP) as *const u64),
            bpf_probe_read_user((base + SIGFRAME_RIP) as *const u64),
        )
    };
    let (Ok(bp), Ok(sp), Ok(pc)) = regs else {
        count(Stat::UnwindReadFault);
        return STOP;
    };
    st.bp = bp;
    st.sp = sp;
    st.exact = 1;
    next_pc(st, pc)
}

#[inline(always)]
fn in_cached(st: &State, pc: u64) -> bool {
    st.cached.end != 0 && pc >= st.cached.start && pc < st.cached.end
}

/// Binary search of the process's mappings (sorted by start) for `pc`;
/// caches the hit in `st`.
#[inline(always)]
fn find_mapping(st: &mut State, pc: u64) -> bool {
    let Some(p) = (unsafe { PROCESSES.get(&st.tgid) }) else { return false };
    // The last mapping with start <= pc.
    let first = p.start;
    let found =
        search(first, first.wrapping_add(p.len), MAPPING_SEARCH_STEPS, |mid| MAPPINGS.get(mid).map(|m| m.start <= pc));
    let Some(lo) = found else { return false };
    if lo == first {
        return false;
    }
    let Some(m) = MAPPINGS.get(lo - 1) else { return false };
    if pc >= m.end {
        return false;
    }
    st.cached.start = m.start;
    st.cached.end = m.end;
    st.cached.bias = m.bias;
    st.cached.rows_start = m.rows_start;
    st.cached.rows_len = m.rows_len;
    st.cached.index_start = m.index_start;
    st.cached.index_len = m.index_len;
    true
}

/// The row covering `pc` in the mapping's table: the last row whose pc is
/// at or below it.
#[inline(always)]
fn find_row(m: &Mapping, pc: u64) -> Option<UnwindRow> {
    if pc < m.bias {
        return None;
    }
    let rel = pc - m.bias;
    if rel > u32::MAX as u64 {
        return None;
    }
    let rel = rel as u32;
    let (mut lo, mut hi) = (m.rows_start, m.rows_start.wrapping_add(m.rows_len));
    // Narrow the search to the rows of the pc's page: ~6 steps instead of
    // ~16 in python3's 65k rows, each step a likely cache miss. Two python3
    // processes in a busy loop, 8 interleaved 4 s rounds against the search
    // over the whole table on a noisy 2-CPU VM: median BPF time per sample
    // 13.9 -> 12.5 us (paired ratios 0.76-1.22, median 0.92). `cargo xtask
    // bench unwind` reports the per-frame cost on python3 and on a C stack.
    let page = rel >> INDEX_PAGE_SHIFT;
    if page.wrapping_add(1) < m.index_len {
        let first = UNWIND_ROWS.get(m.index_start.wrapping_add(page))?.pc;
        let last = UNWIND_ROWS.get(m.index_start.wrapping_add(page + 1))?.pc;
        if first <= last && last < m.rows_len {
            lo = m.rows_start + first;
            hi = m.rows_start + last + 1;
        }
    }
    let start = lo;
    let lo = search(lo, hi, ROW_SEARCH_STEPS, |mid| UNWIND_ROWS.get(mid).map(|row| row.pc <= rel))?;
    if lo == start {
        // Not even the range's first row covers the pc: only possible
        // before the table's first row.
        return None;
    }
    UNWIND_ROWS.get(lo - 1).copied()
}

/// An exec replaces every mapping: forget the old ones so the next sample
/// asks the agent for the new ones instead of unwinding with stale tables.
#[btf_tracepoint(function = "sched_process_exec")]
pub fn sched_process_exec(_ctx: BtfTracePointContext) -> u32 {
    forget_process();
    0
}

#[raw_tracepoint(tracepoint = "sched_process_exec")]
pub fn sched_process_exec_raw(_ctx: RawTracePointContext) -> i32 {
    forget_process();
    0
}

#[inline(always)]
fn forget_process() {
    let tgid = (aya_ebpf::helpers::bpf_get_current_pid_tgid() >> 32) as u32;
    let _ = PROCESSES.remove(&tgid);
    python::forget(tgid);
}
