//! Where CPython keeps what the walk and the namer read, per minor version.
//!
//! 3.10-3.12 come from tables: every number is `offsetof` in the x86-64
//! build of that version's headers (`Include/cpython/pystate.h`,
//! `Include/internal/pycore_frame.h`, `Include/internal/pycore_runtime.h`,
//! `Include/internal/pycore_interp.h`, `Include/cpython/code.h`,
//! `Include/cpython/unicodeobject.h`; 3.10's frame is
//! `Include/cpython/frameobject.h`), compiled with `Py_BUILD_CORE` against
//! 3.10.13, 3.11.2 (Debian 12) and 3.12.1. None of these structs changed
//! within a minor version's releases. 3.13 publishes the same facts in
//! `_Py_DebugOffsets` at the start of `_PyRuntime`
//! (`Include/internal/pycore_runtime.h`), read from the process
//! ([`parse_debug_offsets`]).

use profiler_common::python::{PyOffsets, PY_MODEL_310, PY_MODEL_311, PY_MODEL_312, PY_NO_OFFSET};

/// A minor version, `(3, 11)`.
pub type Version = (u8, u8);

/// What the agent reads of a code object and of the strings and bytes it
/// points at, to name a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CodeLayout {
    pub argcount: u16,
    pub flags: u16,
    pub firstlineno: u16,
    pub name: u16,
    /// `co_qualname`; `None` before 3.11.
    pub qualname: Option<u16>,
    pub filename: u16,
    /// `co_linetable`: the 3.11+ location table, or 3.10's line table.
    pub linetable: u16,
    /// `sizeof(PyASCIIObject)`: where a compact ASCII string's bytes start.
    pub ascii_data: u16,
    /// `sizeof(PyCompactUnicodeObject)`: where other compact strings' start.
    pub compact_data: u16,
    /// How 3.10's table differs from the 3.11+ one.
    pub line_format: LineFormat,
}

/// Which line table a code object carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LineFormat {
    /// 3.10 `co_linetable`: (bytecode delta, line delta) byte pairs.
    Pairs310,
    /// 3.11+ `co_linetable`: the location table of `Objects/locations.md`.
    Locations311,
}

/// `PyVarObject.ob_size` and `PyBytesObject.ob_sval` (every version here).
pub const BYTES_SIZE: u64 = 16;
pub const BYTES_DATA: u64 = 32;
/// `PyASCIIObject.length` and `.state` (every version here).
pub const UNICODE_LENGTH: u64 = 16;
pub const UNICODE_STATE: u64 = 32;

/// Everything about one interpreter build.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub version: Version,
    pub kernel: PyOffsets,
    pub code: CodeLayout,
}

/// The table for `version`; `None` for versions without one (3.13 reads
/// `_Py_DebugOffsets`; others are not supported).
pub fn table(version: Version) -> Option<Layout> {
    let n = PY_NO_OFFSET;
    match version {
        (3, 10) => Some(Layout {
            version,
            kernel: PyOffsets {
                model: PY_MODEL_310,
                runtime_interpreters_head: 32,
                interp_threads_head: 8, // tstate_head
                tstate_next: 8,
                tstate_thread_id: 176,
                tstate_frame: 24, // PyThreadState.frame
                cframe_current_frame: n,
                frame_code: 32,     // PyFrameObject.f_code
                frame_previous: 24, // f_back
                frame_instr: 96,    // f_lasti (int, instruction index)
                frame_marker: n,
                code_bytecode: n,
            },
            code: CodeLayout {
                argcount: 16,
                flags: 36,
                firstlineno: 40,
                name: 112,
                qualname: None,
                filename: 104,
                linetable: 120,
                ascii_data: 48,
                compact_data: 72,
                line_format: LineFormat::Pairs310,
            },
        }),
        (3, 11) => Some(Layout {
            version,
            kernel: PyOffsets {
                model: PY_MODEL_311,
                runtime_interpreters_head: 40,
                interp_threads_head: 16,
                tstate_next: 8,
                tstate_thread_id: 152,
                tstate_frame: 56, // cframe
                cframe_current_frame: 8,
                frame_code: 32,
                frame_previous: 48,
                frame_instr: 56,  // prev_instr
                frame_marker: 68, // is_entry
                code_bytecode: 184,
            },
            code: CodeLayout {
                argcount: 56,
                flags: 48,
                firstlineno: 72,
                name: 120,
                qualname: Some(128),
                filename: 112,
                linetable: 136,
                ascii_data: 48,
                compact_data: 72,
                line_format: LineFormat::Locations311,
            },
        }),
        (3, 12) => Some(Layout {
            version,
            kernel: PyOffsets {
                model: PY_MODEL_312,
                runtime_interpreters_head: 40,
                interp_threads_head: 72,
                tstate_next: 8,
                tstate_thread_id: 136,
                tstate_frame: 56, // cframe
                cframe_current_frame: 0,
                frame_code: 0,
                frame_previous: 8,
                frame_instr: 56,  // prev_instr
                frame_marker: 70, // owner
                code_bytecode: 192,
            },
            code: CodeLayout {
                argcount: 52,
                flags: 48,
                firstlineno: 68,
                name: 120,
                qualname: Some(128),
                filename: 112,
                linetable: 136,
                ascii_data: 40,
                compact_data: 56,
                line_format: LineFormat::Locations311,
            },
        }),
        _ => None,
    }
}

/// Bytes of `_Py_DebugOffsets` read (3.13's layout: 73 u64 fields).
pub const DEBUG_OFFSETS_LEN: usize = 73 * 8;
const DEBUG_COOKIE: &[u8; 8] = b"xdebugpy";

/// Why a `_Py_DebugOffsets` block was not used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DebugOffsetsError {
    #[error("_PyRuntime does not start with the _Py_DebugOffsets cookie")]
    NoCookie,
    #[error("_Py_DebugOffsets is truncated")]
    Truncated,
    #[error("_Py_DebugOffsets describes version {0:#x}, whose layout this agent does not know")]
    UnknownLayout(u64),
    #[error("free-threaded builds are not supported")]
    FreeThreaded,
    #[error("_Py_DebugOffsets field {0} ({1}) is out of range")]
    OutOfRange(&'static str, u64),
}

/// A layout from the `_Py_DebugOffsets` block at the start of `_PyRuntime`
/// (3.13). The block's own layout changes between minor versions (3.14
/// adds fields), so only 3.13's is parsed, by field index: cookie 0,
/// version 1, free_threaded 2, runtime_state 3-5, interpreter_state 6-18,
/// thread_state 19-27, interpreter_frame 28-33, code_object 34-43,
/// pyobject 44-45, type_object 46-49, tuple 50-52, list 53-55, dict 56-58,
/// float 59-60, long 61-63, bytes 64-66, unicode 67-70, gc 71-72.
pub fn parse_debug_offsets(data: &[u8]) -> Result<Layout, DebugOffsetsError> {
    if data.get(..8) != Some(&DEBUG_COOKIE[..]) {
        return Err(DebugOffsetsError::NoCookie);
    }
    if data.len() < DEBUG_OFFSETS_LEN {
        return Err(DebugOffsetsError::Truncated);
    }
    let word = |i: usize| u64::from_le_bytes(data[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    let hex = word(1);
    if hex >> 16 != 0x030d {
        return Err(DebugOffsetsError::UnknownLayout(hex));
    }
    if word(2) != 0 {
        return Err(DebugOffsetsError::FreeThreaded);
    }
    let field = |i: usize, name: &'static str| -> Result<u16, DebugOffsetsError> {
        let v = word(i);
        u16::try_from(v).ok().filter(|&v| v != PY_NO_OFFSET).ok_or(DebugOffsetsError::OutOfRange(name, v))
    };
    let kernel = PyOffsets {
        model: PY_MODEL_312,
        runtime_interpreters_head: field(5, "runtime_state.interpreters_head")?,
        interp_threads_head: field(9, "interpreter_state.threads_head")?,
        tstate_next: field(21, "thread_state.next")?,
        tstate_thread_id: field(24, "thread_state.thread_id")?,
        tstate_frame: field(23, "thread_state.current_frame")?,
        cframe_current_frame: PY_NO_OFFSET,
        frame_code: field(30, "interpreter_frame.executable")?,
        frame_previous: field(29, "interpreter_frame.previous")?,
        frame_instr: field(31, "interpreter_frame.instr_ptr")?,
        frame_marker: field(33, "interpreter_frame.owner")?,
        code_bytecode: field(43, "code_object.co_code_adaptive")?,
    };
    let ascii = field(70, "unicode_object.asciiobject_size")?;
    let code = CodeLayout {
        argcount: field(40, "code_object.argcount")?,
        // Not published; unchanged from 3.12 in 3.13's `Include/cpython/code.h`.
        flags: 48,
        firstlineno: field(39, "code_object.firstlineno")?,
        name: field(36, "code_object.name")?,
        qualname: Some(field(37, "code_object.qualname")?),
        filename: field(35, "code_object.filename")?,
        linetable: field(38, "code_object.linetable")?,
        ascii_data: ascii,
        // PyCompactUnicodeObject adds utf8_length and utf8 to PyASCIIObject.
        compact_data: ascii + 16,
        line_format: LineFormat::Locations311,
    };
    Ok(Layout { version: (3, ((hex >> 16) & 0xff) as u8), kernel, code })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A `_Py_DebugOffsets` block as 3.13.0 lays it out, with the values
    /// its x86-64 build publishes.
    pub(crate) fn debug_block_313() -> Vec<u8> {
        let mut w = [0u64; 73];
        w[0] = u64::from_le_bytes(*b"xdebugpy");
        w[1] = 0x030d_00f0;
        w[5] = 632; // runtime_state.interpreters_head
        w[9] = 7344; // interpreter_state.threads_head
        w[21] = 8; // thread_state.next
        w[23] = 72; // thread_state.current_frame
        w[24] = 152; // thread_state.thread_id
        w[29] = 8; // interpreter_frame.previous
        w[30] = 0; // interpreter_frame.executable
        w[31] = 56; // interpreter_frame.instr_ptr
        w[33] = 70; // interpreter_frame.owner
        w[35] = 112; // code_object.filename
        w[36] = 120; // code_object.name
        w[37] = 128; // code_object.qualname
        w[38] = 136; // code_object.linetable
        w[39] = 68; // code_object.firstlineno
        w[40] = 52; // code_object.argcount
        w[43] = 200; // code_object.co_code_adaptive
        w[70] = 40; // unicode_object.asciiobject_size
        w.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    #[test]
    fn debug_offsets_of_313_give_its_layout() {
        let l = parse_debug_offsets(&debug_block_313()).unwrap();
        assert_eq!(l.version, (3, 13));
        assert_eq!(l.kernel.model, PY_MODEL_312);
        assert_eq!(l.kernel.runtime_interpreters_head, 632);
        assert_eq!(l.kernel.interp_threads_head, 7344);
        assert_eq!(l.kernel.tstate_frame, 72);
        assert_eq!(l.kernel.cframe_current_frame, PY_NO_OFFSET);
        assert_eq!(l.kernel.code_bytecode, 200);
        assert_eq!(l.code.qualname, Some(128));
        assert_eq!(l.code.compact_data, 56);
    }

    #[test]
    fn debug_offsets_refuse_what_they_cannot_trust() {
        let good = debug_block_313();
        assert_eq!(parse_debug_offsets(&good[..100]), Err(DebugOffsetsError::Truncated));
        let mut bad = good.clone();
        bad[0] = b'X';
        assert_eq!(parse_debug_offsets(&bad), Err(DebugOffsetsError::NoCookie));
        let mut v314 = good.clone();
        v314[8..16].copy_from_slice(&0x030e_00f0u64.to_le_bytes());
        assert_eq!(parse_debug_offsets(&v314), Err(DebugOffsetsError::UnknownLayout(0x030e_00f0)));
        let mut ft = good.clone();
        ft[16] = 1;
        assert_eq!(parse_debug_offsets(&ft), Err(DebugOffsetsError::FreeThreaded));
        let mut huge = good;
        huge[9 * 8..10 * 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
        assert!(matches!(parse_debug_offsets(&huge), Err(DebugOffsetsError::OutOfRange(_, _))));
    }

    #[test]
    fn tables_cover_310_to_312_only() {
        for v in [(3, 10), (3, 11), (3, 12)] {
            assert_eq!(table(v).unwrap().version, v);
        }
        for v in [(3, 9), (3, 13), (3, 14), (2, 7)] {
            assert!(table(v).is_none());
        }
        assert_eq!(table((3, 10)).unwrap().code.qualname, None);
        assert_eq!(table((3, 11)).unwrap().kernel.model, PY_MODEL_311);
    }

    proptest! {
        #[test]
        fn debug_offsets_never_panic(data in proptest::collection::vec(any::<u8>(), 0..700)) {
            let _ = parse_debug_offsets(&data);
        }
    }
}
