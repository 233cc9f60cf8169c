//! The CPython walk: when the native unwinder reaches the interpreter loop
//! (`_PyEval_EvalFrameDefault`), the Python frames that call of the loop
//! runs are emitted in its place, as (code object, instruction index)
//! entries the agent names.
//!
//! One call of the loop runs several Python frames since 3.11 (Python to
//! Python calls stay in the loop): the frames from the thread's current
//! frame down to the call's entry frame (`is_entry` in 3.11, the frame
//! above a `FRAME_OWNED_BY_CSTACK` shim in 3.12+) belong to the innermost
//! native interpreter frame, the next run to the next one, and so on, so
//! native code called from Python (C extensions) sits under the Python
//! function that called it, as the OpenTelemetry profiler does. 3.10 runs
//! one frame per call.
//!
//! Offsets come per process from the agent (a table per minor version, or
//! `_Py_DebugOffsets` from 3.13), so this code knows no version.

use core::ffi::c_void;

use aya_ebpf::{
    helpers::{bpf_get_current_task_btf, bpf_loop, bpf_probe_read_kernel, bpf_probe_read_user},
    macros::map,
    maps::{HashMap, PerCpuArray},
};
use profiler_common::{
    python::{
        encode_py_frame, PyOffsets, PyProcess, PY_MODEL_310, PY_MODEL_311, PY_NO_OFFSET, PY_OWNED_BY_CSTACK,
        PY_PROCESS_SLOTS, PY_THREAD_SEARCH,
    },
    Stat,
};

use crate::maps::count;

/// Python processes the agent found, by tgid; it inserts and removes.
#[map]
static PY_PROCESSES: HashMap<u32, PyProcess> = HashMap::with_max_entries(PY_PROCESS_SLOTS, 0);

/// Set by the agent: the offset of `thread.fsbase` in `task_struct` (kernel
/// BTF). A thread's fsbase is its thread pointer, which glibc and musl make
/// `pthread_self()`, which CPython stores as `PyThreadState.thread_id`:
/// that is how a thread state is matched to the sampled thread (3.10 has
/// no `native_thread_id`). 0 turns the walk off.
#[no_mangle]
static TASK_FSBASE_OFFSET: u32 = 0;

/// The walk in progress on this CPU. In a map rather than in the native
/// unwinder's state on the stack: the verifier tracks that state exactly and
/// checks the frame step again for every distinct value, so a few flags
/// there (pending, done, the walk's state) multiplied the step's
/// verification past any reasonable load time; map values are opaque to
/// it. Programs that unwind do not nest on a CPU (sched_switch runs with
/// interrupts off), the same assumption the unwinder's frame buffer makes.
#[map]
static PY_WALK: PerCpuArray<Walk> = PerCpuArray::with_max_entries(1, 0);

/// Starts the walk for a stack of process `tgid`: idle unless it is a
/// Python process the agent registered and the thread's state is found.
#[inline(always)]
pub fn begin(tgid: u32) {
    if let Some(w) = PY_WALK.get_ptr_mut(0) {
        unsafe { Walk::begin(&mut *w, tgid) };
    }
}

/// What the walk has for the next stack slot.
pub enum Pending {
    /// No Python frames pending: unwind the native frame.
    None,
    /// A Python frame; `true` when it is the last and the native walk
    /// already ended.
    Frame(u64, bool),
    /// The pending frames ran out and the native walk already ended.
    Done,
}

/// The next pending Python frame of the interpreter call met last.
#[inline(always)]
pub fn pending() -> Pending {
    let Some(w) = PY_WALK.get_ptr_mut(0) else { return Pending::None };
    let w = unsafe { &mut *w };
    if w.pending == 0 {
        return Pending::None;
    }
    match w.next() {
        Some(frame) => Pending::Frame(frame, w.pending == 0 && w.native_done != 0),
        None if w.native_done != 0 => Pending::Done,
        None => Pending::None,
    }
}

/// The native walk wants to stop: true (and remembered) when Python frames
/// are still pending, which then go out first.
#[inline(always)]
pub fn defer_stop() -> bool {
    let Some(w) = PY_WALK.get_ptr_mut(0) else { return false };
    let w = unsafe { &mut *w };
    if w.pending == 0 {
        return false;
    }
    w.native_done = 1;
    true
}

/// At a native frame whose pc is `pc`: the innermost Python frame of the
/// interpreter call, when `pc` is in the interpreter loop.
#[inline(always)]
pub fn at_frame(pc: u64) -> Option<u64> {
    let w = unsafe { &mut *PY_WALK.get_ptr_mut(0)? };
    if !w.at_interpreter(pc) {
        return None;
    }
    w.enter()
}

/// Whether the last stack begun on this CPU was of a thread running Python
/// code (its current frame was found), whatever the walk then emitted.
#[inline(always)]
pub fn found_frames() -> bool {
    PY_WALK.get(0).is_some_and(|w| w.found != 0)
}

/// Whether `tgid` is a Python process whose frames the walk reads.
#[inline(always)]
pub fn walks(tgid: u32) -> bool {
    let on = unsafe { core::ptr::read_volatile(&TASK_FSBASE_OFFSET) } != 0;
    on && unsafe { PY_PROCESSES.get(&tgid) }.is_some()
}

/// An exec replaced the interpreter (if any): its record is stale.
#[inline(always)]
pub fn forget(tgid: u32) {
    let _ = PY_PROCESSES.remove(&tgid);
}

const IDLE: u32 = 0;
const READY: u32 = 1;
const ACTIVE: u32 = 2;
const OFF: u32 = 3;

/// The walk's state across the native unwind of one stack.
#[repr(C)]
pub struct Walk {
    eval_start: u64,
    eval_end: u64,
    cold_start: u64,
    cold_end: u64,
    runtime: u64,
    /// The next frame to emit.
    cursor: u64,
    offsets: PyOffsets,
    /// `IDLE` (not a Python process), `READY` (thread state not looked up
    /// yet), `ACTIVE`, `OFF` (given up for this stack).
    state: u32,
    /// Non-zero while frames of the current interpreter call remain.
    pending: u32,
    /// The native walk ended while frames were pending.
    native_done: u32,
    /// The thread's current frame was found: it runs Python code.
    found: u32,
}

impl Walk {
    #[inline(always)]
    fn begin(w: &mut Walk, tgid: u32) {
        w.cursor = 0;
        w.state = IDLE;
        w.pending = 0;
        w.native_done = 0;
        w.found = 0;
        if unsafe { core::ptr::read_volatile(&TASK_FSBASE_OFFSET) } == 0 {
            return;
        }
        if let Some(p) = unsafe { PY_PROCESSES.get(&tgid) } {
            w.eval_start = p.eval_start;
            w.eval_end = p.eval_end;
            w.cold_start = p.cold_start;
            w.cold_end = p.cold_end;
            w.runtime = p.runtime;
            w.offsets = p.offsets;
            w.state = READY;
        }
        if w.state == READY {
            // Looked up here, once per stack and in its own bpf_loop,
            // rather than in the frame step: a bounded loop there multiplied
            // the states the verifier explores for the native step after it
            // past its limits.
            match w.current_frame() {
                Some(f) => {
                    w.cursor = f;
                    w.state = ACTIVE;
                    w.found = 1;
                }
                None => w.state = OFF,
            }
        }
    }

    /// Whether `pc` is in the interpreter loop.
    #[inline(always)]
    fn at_interpreter(&self, pc: u64) -> bool {
        self.state == ACTIVE
            && ((pc >= self.eval_start && pc < self.eval_end) || (pc >= self.cold_start && pc < self.cold_end))
    }

    /// The innermost Python frame of the interpreter call whose native
    /// frame was just reached; `None` leaves the native frame as it is.
    #[inline(always)]
    fn enter(&mut self) -> Option<u64> {
        if self.state != ACTIVE {
            return None;
        }
        if self.cursor == 0 {
            count(Stat::PythonChainEnd);
            return None;
        }
        self.pending = 1;
        self.next()
    }

    /// The next Python frame of the current interpreter call; `None` when
    /// the call has no more (the walk then goes on with native frames).
    #[inline(always)]
    fn next(&mut self) -> Option<u64> {
        match self.read_next() {
            Ok(e) => e,
            Err(Fault) => {
                // The chain cannot be trusted past a fault.
                self.pending = 0;
                self.state = OFF;
                None
            }
        }
    }

    #[inline(always)]
    fn read_next(&mut self) -> Result<Option<u64>, Fault> {
        let o = &self.offsets;
        let f = self.cursor;
        if f == 0 {
            self.pending = 0;
            return Ok(None);
        }
        if o.model == PY_MODEL_310 {
            // One frame per call of the loop.
            self.pending = 0;
            let code = read(f + o.frame_code as u64)?;
            let lasti = read_i32(f + o.frame_instr as u64)?;
            self.cursor = read(f + o.frame_previous as u64)?;
            return Ok(self.emit(code, if lasti < 0 { 0 } else { lasti as u64 }));
        }
        let marker = read_u8(f + o.frame_marker as u64)?;
        if o.model != PY_MODEL_311 && marker == PY_OWNED_BY_CSTACK {
            // The shim below a call's first frame: this call's frames are
            // done, and the next call's start past it.
            self.pending = 0;
            self.cursor = read(f + o.frame_previous as u64)?;
            return Ok(None);
        }
        let code = read(f + o.frame_code as u64)?;
        let instr = read(f + o.frame_instr as u64)?;
        self.cursor = read(f + o.frame_previous as u64)?;
        if o.model == PY_MODEL_311 && marker != 0 {
            self.pending = 0; // is_entry: the call's first frame
        }
        let start = code + o.code_bytecode as u64;
        let lasti = if instr > start { (instr - start) / 2 } else { 0 };
        Ok(self.emit(code, lasti))
    }

    #[inline(always)]
    fn emit(&mut self, code: u64, lasti: u64) -> Option<u64> {
        if code == 0 {
            self.pending = 0;
            count(Stat::PythonChainEnd);
            return None;
        }
        count(Stat::PythonFrames);
        Some(encode_py_frame(code, lasti))
    }

    /// The sampled thread's current frame, through its `PyThreadState`,
    /// found by thread pointer in the main interpreter's thread list (a
    /// thread off CPU, or not holding the GIL, is not the runtime's
    /// current thread state).
    #[inline(always)]
    fn current_frame(&self) -> Option<u64> {
        let o = &self.offsets;
        let task = unsafe { bpf_get_current_task_btf() } as *const u8;
        let fs_off = unsafe { core::ptr::read_volatile(&TASK_FSBASE_OFFSET) };
        let fsbase = unsafe { bpf_probe_read_kernel(task.wrapping_add(fs_off as usize) as *const u64) }.ok()?;
        let interp = read(self.runtime + o.runtime_interpreters_head as u64).ok()?;
        let first = read(interp + o.interp_threads_head as u64).ok()?;
        let mut search = Search {
            thread: first,
            fsbase,
            found: 0,
            next_off: o.tstate_next as u64,
            id_off: o.tstate_thread_id as u64,
        };
        unsafe {
            bpf_loop(PY_THREAD_SEARCH, search_step as *mut c_void, (&mut search as *mut Search).cast(), 0);
        }
        if search.found == 0 {
            count(Stat::PythonNoThreadState);
            return None;
        }
        let mut frame = read(search.found + o.tstate_frame as u64).ok()?;
        if o.cframe_current_frame != PY_NO_OFFSET && frame != 0 {
            frame = read(frame + o.cframe_current_frame as u64).ok()?;
        }
        Some(frame)
    }
}

/// The thread-list search's state.
#[repr(C)]
struct Search {
    thread: u64,
    fsbase: u64,
    found: u64,
    next_off: u64,
    id_off: u64,
}

#[inline(never)]
extern "C" fn search_step(_index: u32, ctx: *mut c_void) -> i64 {
    let s = unsafe { &mut *(ctx as *mut Search) };
    if s.thread == 0 {
        return 1;
    }
    let Ok(id) = read(s.thread + s.id_off) else { return 1 };
    if id == s.fsbase {
        s.found = s.thread;
        return 1;
    }
    match read(s.thread + s.next_off) {
        Ok(next) => {
            s.thread = next;
            0
        }
        Err(Fault) => 1,
    }
}

/// A read of interpreter memory faulted (counted).
struct Fault;

#[inline(always)]
fn read(addr: u64) -> Result<u64, Fault> {
    read_as::<u64>(addr)
}

#[inline(always)]
fn read_i32(addr: u64) -> Result<i32, Fault> {
    read_as::<i32>(addr)
}

#[inline(always)]
fn read_u8(addr: u64) -> Result<u8, Fault> {
    read_as::<u8>(addr)
}

#[inline(always)]
fn read_as<T>(addr: u64) -> Result<T, Fault> {
    unsafe { bpf_probe_read_user(addr as *const T) }.map_err(|_| {
        count(Stat::PythonReadFault);
        Fault
    })
}
