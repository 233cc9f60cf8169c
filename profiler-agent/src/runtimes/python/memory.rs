//! Reading another process's memory: `process_vm_readv`, one syscall per
//! read, no ptrace stop. A seam so the namer is tested on memory a test
//! lays out.

/// Memory of processes, by pid.
pub trait Memory {
    /// Fills `buf` from `addr` in process `pid`; false if any of it could
    /// not be read (unmapped, process gone, no permission).
    fn read(&self, pid: u32, addr: u64, buf: &mut [u8]) -> bool;
}

/// The real thing.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcessMemory;

impl Memory for ProcessMemory {
    fn read(&self, pid: u32, addr: u64, buf: &mut [u8]) -> bool {
        if buf.is_empty() {
            return true;
        }
        let local = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
        let remote = libc::iovec { iov_base: addr as *mut libc::c_void, iov_len: buf.len() };
        // SAFETY: `local` covers exactly `buf`, which outlives the call; the
        // kernel checks the remote range itself.
        let n = unsafe { libc::process_vm_readv(pid as libc::pid_t, &local, 1, &remote, 1, 0) };
        n == buf.len() as isize
    }
}

/// A little-endian integer at `at` in `b`, 0 past its end.
pub fn u64_at(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8).map_or(0, |s| u64::from_le_bytes(s.try_into().expect("8 bytes")))
}

pub fn i32_at(b: &[u8], at: usize) -> i32 {
    b.get(at..at + 4).map_or(0, |s| i32::from_le_bytes(s.try_into().expect("4 bytes")))
}

pub fn u32_at(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4).map_or(0, |s| u32::from_le_bytes(s.try_into().expect("4 bytes")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_memory_and_refuses_unmapped() {
        let value: u64 = 0x1122_3344_5566_7788;
        let mut buf = [0u8; 8];
        assert!(ProcessMemory.read(std::process::id(), &value as *const u64 as u64, &mut buf));
        assert_eq!(u64_at(&buf, 0), value);
        assert!(!ProcessMemory.read(std::process::id(), 8, &mut buf));
        assert_eq!(u64_at(&buf, 4), 0);
    }
}
