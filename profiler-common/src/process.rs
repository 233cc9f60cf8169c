//! Process lifecycle events (fork, exec, exit), written by the kernel's
//! `sched_process_*` programs into the `PROCESS_EVENTS` ring buffer.

use crate::COMM_LEN;

/// A new process (not a thread): `tgid` is the child, `parent` the forking
/// process. The child runs the parent's image until it execs.
pub const EVENT_FORK: u32 = 1;
/// `tgid` replaced its image (`parent` is 0).
pub const EVENT_EXEC: u32 = 2;
/// `tgid`'s thread-group leader exited (`parent` is 0).
pub const EVENT_EXIT: u32 = 3;

/// One lifecycle event.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcessEvent {
    /// One of the `EVENT_*` kinds.
    pub kind: u32,
    pub tgid: u32,
    /// The forking process for [`EVENT_FORK`], else 0.
    pub parent: u32,
    pub _pad: u32,
    /// `bpf_ktime_get_ns()` at the event, the clock of `Sample::time_ns`,
    /// so samples are ordered against execs.
    pub time_ns: u64,
    /// The task's comm: after an exec, the new program's name.
    pub comm: [u8; COMM_LEN],
}

const _: () = assert!(core::mem::size_of::<ProcessEvent>() == 24 + COMM_LEN);

impl ProcessEvent {
    /// The comm up to its first NUL byte.
    pub fn comm_bytes(&self) -> &[u8] {
        let end = self.comm.iter().position(|&b| b == 0).unwrap_or(COMM_LEN);
        &self.comm[..end]
    }
}

#[cfg(feature = "user")]
unsafe impl aya::Pod for ProcessEvent {}
