//! CPython frames in user stacks: the per-process record the agent gives
//! the kernel's Python walk, and how a Python frame is encoded among the
//! native pcs of a stack.

/// Set in a user-stack entry that is a Python frame rather than a pc.
/// User pcs are below 2^47 on x86-64, so the bit is never set in one.
pub const PY_FRAME_TAG: u64 = 1 << 63;
/// Low bits of a Python frame entry: the instruction index (code units from
/// the start of the bytecode), clamped.
pub const PY_LASTI_BITS: u32 = 19;
pub const PY_LASTI_MAX: u64 = (1 << PY_LASTI_BITS) - 1;

/// A user-stack entry for a frame running `code` (the code object's
/// address, 8-byte aligned like every Python object) at instruction index
/// `lasti`. Code objects live below 2^47, so `code >> 3` takes 44 bits,
/// which with the tag and the index fill the 64.
#[inline(always)]
pub const fn encode_py_frame(code: u64, lasti: u64) -> u64 {
    let lasti = if lasti > PY_LASTI_MAX { PY_LASTI_MAX } else { lasti };
    PY_FRAME_TAG | ((code >> 3) << PY_LASTI_BITS) | lasti
}

/// The (code object address, instruction index) of an entry made by
/// [`encode_py_frame`]; `None` for a native pc.
#[inline(always)]
pub const fn decode_py_frame(entry: u64) -> Option<(u64, u64)> {
    if entry & PY_FRAME_TAG == 0 {
        return None;
    }
    let code = ((entry & !PY_FRAME_TAG) >> PY_LASTI_BITS) << 3;
    Some((code, entry & PY_LASTI_MAX))
}

/// How a version chains its frames, which decides where one interpreter
/// call's frames end.
/// 3.10: one `PyFrameObject` per `_PyEval_EvalFrameDefault` call.
pub const PY_MODEL_310: u16 = 1;
/// 3.11: `_PyInterpreterFrame`s; the first of a C call has `is_entry`.
pub const PY_MODEL_311: u16 = 2;
/// 3.12+: the C call pushes a shim frame owned by the C stack
/// (`FRAME_OWNED_BY_CSTACK`) below its first frame.
pub const PY_MODEL_312: u16 = 3;

/// `FRAME_OWNED_BY_CSTACK` (3.12 and 3.13 `enum _frameowner`).
pub const PY_OWNED_BY_CSTACK: u8 = 3;

/// Byte offsets of the fields the kernel reads, for one interpreter build.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PyOffsets {
    /// `PY_MODEL_*`.
    pub model: u16,
    /// `_PyRuntimeState.interpreters.head`.
    pub runtime_interpreters_head: u16,
    /// `PyInterpreterState.threads.head` (`tstate_head` in 3.10).
    pub interp_threads_head: u16,
    /// `PyThreadState.next`.
    pub tstate_next: u16,
    /// `PyThreadState.thread_id` (`pthread_self()`, the thread pointer).
    pub tstate_thread_id: u16,
    /// `PyThreadState.cframe` (3.11, 3.12), `current_frame` (3.13+), `frame` (3.10).
    pub tstate_frame: u16,
    /// `_PyCFrame.current_frame`; [`PY_NO_OFFSET`] when `tstate_frame`
    /// points at the frame itself.
    pub cframe_current_frame: u16,
    /// `_PyInterpreterFrame.f_code` (`f_executable` in 3.13), `PyFrameObject.f_code` in 3.10.
    pub frame_code: u16,
    /// `previous` (`f_back` in 3.10).
    pub frame_previous: u16,
    /// `prev_instr` (`instr_ptr` in 3.13); `f_lasti` (an int) in 3.10.
    pub frame_instr: u16,
    /// `is_entry` (3.11), `owner` (3.12+); unused in 3.10.
    pub frame_marker: u16,
    /// `PyCodeObject.co_code_adaptive`, where the bytecode starts (3.11+).
    pub code_bytecode: u16,
}

/// An offset that does not apply to this version.
pub const PY_NO_OFFSET: u16 = u16::MAX;

const _: () = assert!(core::mem::size_of::<PyOffsets>() == 24);

/// A Python process as the kernel sees it (map value keyed by tgid).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PyProcess {
    /// `_PyEval_EvalFrameDefault` in the process: [start, end).
    pub eval_start: u64,
    pub eval_end: u64,
    /// Its `.cold` part, when the binary's symbols locate one; 0 otherwise.
    pub cold_start: u64,
    pub cold_end: u64,
    /// Address of `_PyRuntime`.
    pub runtime: u64,
    /// `PY_VERSION_HEX >> 16`, e.g. 0x030b for 3.11.
    pub version: u32,
    pub _pad: u32,
    pub offsets: PyOffsets,
}

const _: () = assert!(core::mem::size_of::<PyProcess>() == 72);

/// Python processes the kernel walks at once.
pub const PY_PROCESS_SLOTS: u32 = 4096;
/// Thread states looked at to find the sampled thread's.
pub const PY_THREAD_SEARCH: u32 = 64;

#[cfg(feature = "user")]
unsafe impl aya::Pod for PyProcess {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_pcs_are_not_frames() {
        let code = 0x7f12_3456_7890u64 & !7;
        assert_eq!(decode_py_frame(encode_py_frame(code, 42)), Some((code, 42)));
        assert_eq!(decode_py_frame(encode_py_frame(code, 1 << 30)), Some((code, PY_LASTI_MAX)));
        assert_eq!(decode_py_frame(0x7fff_ffff_f000), None);
        // The highest user address still encodes.
        let top = 0x7fff_ffff_fff8u64;
        assert_eq!(decode_py_frame(encode_py_frame(top, 0)), Some((top, 0)));
    }
}
