//! One on-CPU stack sample, as the kernel writes it into the ring buffer.

use crate::COMM_LEN;

/// Frames kept per stack, kernel and user each. 127 is the kernel's default
/// `perf_event_max_stack` and what `perf` records; deeper stacks are truncated
/// and counted (see [`crate::Stat::UserStackTruncated`]).
pub const MAX_STACK_DEPTH: usize = 127;

/// The user stack filled the whole buffer, so outer frames may be missing.
pub const SAMPLE_FLAG_USER_TRUNCATED: u32 = 1 << 0;
/// The kernel stack filled the whole buffer, so outer frames may be missing.
pub const SAMPLE_FLAG_KERNEL_TRUNCATED: u32 = 1 << 1;
/// Some user frames were unwound by frame pointer for want of a table, so
/// the stack may miss frames or end early.
pub const SAMPLE_FLAG_USER_PARTIAL: u32 = 1 << 2;
/// The unwinder met a pc in no mapping it knows: the agent should (re)load
/// the process's mappings (new process, exec, `dlopen`).
pub const SAMPLE_FLAG_UNKNOWN_MAPPING: u32 = 1 << 3;

/// A stack sample. Stacks are innermost first, as the kernel returns them;
/// `kernel_len`/`user_len` say how many entries are valid.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Sample {
    /// Process id (thread group id).
    pub tgid: u32,
    /// Thread id.
    pub tid: u32,
    /// CPU the sample was taken on.
    pub cpu: u32,
    /// `SAMPLE_FLAG_*` bits.
    pub flags: u32,
    /// Valid entries in `kernel`.
    pub kernel_len: u32,
    /// Valid entries in `user`.
    pub user_len: u32,
    /// `bpf_ktime_get_ns()` at the sample.
    pub time_ns: u64,
    /// Thread name (`comm`), NUL padded.
    pub comm: [u8; COMM_LEN],
    /// Kernel instruction pointers, innermost first.
    pub kernel: [u64; MAX_STACK_DEPTH],
    /// User instruction pointers, innermost first.
    pub user: [u64; MAX_STACK_DEPTH],
}

const _: () = assert!(core::mem::size_of::<Sample>() == 32 + COMM_LEN + 2 * 8 * MAX_STACK_DEPTH);
const _: () = assert!(core::mem::size_of::<Sample>() == 2080);

impl Sample {
    /// The valid part of the kernel stack, innermost first.
    pub fn kernel_stack(&self) -> &[u64] {
        &self.kernel[..(self.kernel_len as usize).min(MAX_STACK_DEPTH)]
    }

    /// The valid part of the user stack, innermost first.
    pub fn user_stack(&self) -> &[u64] {
        &self.user[..(self.user_len as usize).min(MAX_STACK_DEPTH)]
    }

    /// The thread name up to its first NUL byte.
    pub fn comm_bytes(&self) -> &[u8] {
        let end = self.comm.iter().position(|&b| b == 0).unwrap_or(COMM_LEN);
        &self.comm[..end]
    }
}

#[cfg(feature = "user")]
unsafe impl aya::Pod for Sample {}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;

    #[test]
    fn byte_round_trip_keeps_every_field() {
        let mut s: Sample = unsafe { core::mem::zeroed() };
        s.tgid = 7;
        s.tid = 8;
        s.cpu = 1;
        s.flags = SAMPLE_FLAG_USER_TRUNCATED;
        s.kernel_len = 2;
        s.user_len = 3;
        s.time_ns = 0x0102_0304_0506_0708;
        s.comm[..4].copy_from_slice(b"spin");
        s.kernel[0] = 0xffff_ffff_8100_0000;
        s.kernel[1] = 0xffff_ffff_8100_0010;
        s.user[..3].copy_from_slice(&[0x401000, 0x401100, 0x401200]);
        let bytes: &[u8] =
            unsafe { core::slice::from_raw_parts((&s as *const Sample).cast::<u8>(), core::mem::size_of::<Sample>()) };
        // Offsets the eBPF side relies on.
        assert_eq!(&bytes[0..4], &7u32.to_ne_bytes());
        assert_eq!(&bytes[24..32], &0x0102_0304_0506_0708u64.to_ne_bytes());
        assert_eq!(&bytes[32..36], b"spin");
        let back: Sample = unsafe { core::ptr::read_unaligned(bytes.as_ptr().cast()) };
        assert_eq!(back.kernel_stack(), &[0xffff_ffff_8100_0000, 0xffff_ffff_8100_0010]);
        assert_eq!(back.user_stack(), &[0x401000, 0x401100, 0x401200]);
        assert_eq!(back.comm_bytes(), b"spin");
    }

    #[test]
    fn lengths_beyond_the_buffer_are_clamped() {
        let mut s: Sample = unsafe { core::mem::zeroed() };
        s.user_len = 10_000;
        s.comm = [b'x'; COMM_LEN];
        assert_eq!(s.user_stack().len(), MAX_STACK_DEPTH);
        assert_eq!(s.comm_bytes().len(), COMM_LEN);
    }
}
