//! Indices of the per-CPU statistics array. Every early exit of a program
//! increments one of these, so nothing is dropped silently.

/// One counter in the `STATS` per-CPU array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    /// perf event program invocations.
    SampleEvents = 0,
    /// Samples written to the ring buffer.
    SamplesSent = 1,
    /// Samples skipped because the process is not in the `--pid` set.
    SamplesFiltered = 2,
    /// Samples lost because the ring buffer was full (user space too slow).
    RingBufferFull = 3,
    /// `bpf_get_stack` failed for the kernel stack; the sample was kept without it.
    KernelStackError = 4,
    /// `bpf_get_stack` failed for the user stack; the sample was kept without it.
    UserStackError = 5,
    /// The user stack filled all `MAX_STACK_DEPTH` slots and may be truncated.
    UserStackTruncated = 6,
    /// The kernel stack filled all `MAX_STACK_DEPTH` slots and may be truncated.
    KernelStackTruncated = 7,
    /// Samples taken while the CPU ran the idle task (pid 0); not recorded.
    SamplesIdle = 8,
    /// sched_switch events seen (off-CPU programs attached).
    Switches = 9,
    /// Blocked switch-outs whose stacks were captured.
    OffCpuBlocks = 10,
    /// Blocks shorter than `--off-cpu-min-block`; not recorded.
    OffCpuShort = 11,
    /// Scheduler events lost because a thread found no free slot in the
    /// per-thread table (all `THREAD_PROBES` of its slots taken).
    ThreadMapFull = 12,
    /// Blocks lost because the off-CPU aggregate map was full.
    OffCpuAggregateFull = 13,
    /// Stacks recorded without content: the stack map was full, or its
    /// on-demand allocation failed (its per-CPU cache was empty).
    StackMapFull = 14,
    /// Blocks whose stacks were reused from the thread's previous block at
    /// the same place instead of being unwound again.
    StacksReused = 15,
    /// Latencies not recorded because the histogram map was full.
    HistogramMapFull = 16,
    /// User stacks unwound to their outermost frame (`_start`, a thread's
    /// start routine, or a zero frame pointer).
    UnwindComplete = 17,
    /// Frames unwound by frame pointer because their pc is in no mapping
    /// the unwinder knows (a process or `dlopen` not loaded yet, JIT code).
    UnwindNoMapping = 18,
    /// Frames unwound by frame pointer because their file has no table
    /// (no CFI, unreadable, evicted) or no FDE covers the pc.
    UnwindNoTable = 19,
    /// Unwinds stopped at a CFI rule the kernel cannot evaluate.
    UnwindUnsupported = 20,
    /// Unwinds stopped because a user stack read faulted (or the frame
    /// pointer chain led nowhere).
    UnwindReadFault = 21,
    /// Unwinds stopped at the frame limit.
    UnwindDepthLimit = 22,
    /// Stacks with at least one frame unwound by frame pointer.
    UnwindPartial = 23,
    /// Frames in JIT code (anonymous executable memory) walked by frame
    /// pointer.
    UnwindJitFrames = 24,
    /// Walks that met a zero frame pointer in JIT code: a runtime that does
    /// not keep frame pointers there (HotSpot without
    /// `-XX:+PreserveFramePointer`); the stack ends at that frame.
    UnwindJitEnd = 25,
    /// Walks whose frame pointer in JIT code led to unreadable memory.
    UnwindJitReadFault = 26,
    /// Python frames emitted by the CPython walk.
    PythonFrames = 27,
    /// Interpreter frames left native: the thread's `PyThreadState` was not
    /// found (not a Python thread, or past the bounded thread-list search).
    PythonNoThreadState = 28,
    /// Python walks stopped by a faulted read of interpreter memory.
    PythonReadFault = 29,
    /// Interpreter calls met with no Python frame left in the chain (the
    /// walk and the native stack disagree); left native.
    PythonChainEnd = 30,
    /// A block captured before the process's unwind tables were loaded
    /// (walked by frame pointer, not reused; the agent was told).
    OffCpuBeforeTables = 31,
    /// Threads the start scan found already blocked.
    OffCpuFoundBlocked = 32,
    /// Blocks left unsampled by `--off-cpu-sample` (timed, no stacks taken).
    OffCpuUnsampled = 33,
    /// Per-thread exact totals that found the `THREAD_TOTALS` map full; the
    /// thread's stacks are then left as sampled, unscaled.
    ThreadTotalsFull = 34,
}

/// Number of counters; the size of the `STATS` array.
pub const STAT_COUNT: u32 = 35;

impl Stat {
    /// Every counter, in index order.
    pub const ALL: [Stat; STAT_COUNT as usize] = [
        Stat::SampleEvents,
        Stat::SamplesSent,
        Stat::SamplesFiltered,
        Stat::RingBufferFull,
        Stat::KernelStackError,
        Stat::UserStackError,
        Stat::UserStackTruncated,
        Stat::KernelStackTruncated,
        Stat::SamplesIdle,
        Stat::Switches,
        Stat::OffCpuBlocks,
        Stat::OffCpuShort,
        Stat::ThreadMapFull,
        Stat::OffCpuAggregateFull,
        Stat::StackMapFull,
        Stat::StacksReused,
        Stat::HistogramMapFull,
        Stat::UnwindComplete,
        Stat::UnwindNoMapping,
        Stat::UnwindNoTable,
        Stat::UnwindUnsupported,
        Stat::UnwindReadFault,
        Stat::UnwindDepthLimit,
        Stat::UnwindPartial,
        Stat::UnwindJitFrames,
        Stat::UnwindJitEnd,
        Stat::UnwindJitReadFault,
        Stat::PythonFrames,
        Stat::PythonNoThreadState,
        Stat::PythonReadFault,
        Stat::PythonChainEnd,
        Stat::OffCpuBeforeTables,
        Stat::OffCpuFoundBlocked,
        Stat::OffCpuUnsampled,
        Stat::ThreadTotalsFull,
    ];

    /// A stable snake_case name, used in summaries and metric labels.
    pub const fn name(self) -> &'static str {
        match self {
            Stat::SampleEvents => "sample_events",
            Stat::SamplesSent => "samples_sent",
            Stat::SamplesFiltered => "filtered_by_pid",
            Stat::RingBufferFull => "ring_buffer_full",
            Stat::KernelStackError => "kernel_stack_error",
            Stat::UserStackError => "user_stack_error",
            Stat::UserStackTruncated => "user_stack_truncated",
            Stat::KernelStackTruncated => "kernel_stack_truncated",
            Stat::SamplesIdle => "idle",
            Stat::Switches => "switches",
            Stat::OffCpuBlocks => "off_cpu_blocks",
            Stat::OffCpuShort => "off_cpu_below_min_block",
            Stat::ThreadMapFull => "thread_map_full",
            Stat::OffCpuAggregateFull => "off_cpu_aggregate_map_full",
            Stat::StackMapFull => "stack_store_failed",
            Stat::StacksReused => "stacks_reused",
            Stat::HistogramMapFull => "histogram_map_full",
            Stat::UnwindComplete => "unwind_complete",
            Stat::UnwindNoMapping => "unwind_no_mapping",
            Stat::UnwindNoTable => "unwind_no_table",
            Stat::UnwindUnsupported => "unwind_unsupported_rule",
            Stat::UnwindReadFault => "unwind_read_fault",
            Stat::UnwindDepthLimit => "unwind_depth_limit",
            Stat::UnwindPartial => "unwind_partial",
            Stat::UnwindJitFrames => "unwind_jit_frames",
            Stat::UnwindJitEnd => "unwind_jit_zero_frame_pointer",
            Stat::UnwindJitReadFault => "unwind_jit_read_fault",
            Stat::PythonFrames => "python_frames",
            Stat::PythonNoThreadState => "python_no_thread_state",
            Stat::PythonReadFault => "python_read_fault",
            Stat::PythonChainEnd => "python_chain_end",
            Stat::OffCpuBeforeTables => "off_cpu_before_unwind_tables",
            Stat::OffCpuFoundBlocked => "off_cpu_found_blocked",
            Stat::OffCpuUnsampled => "off_cpu_unsampled",
            Stat::ThreadTotalsFull => "thread_totals_full",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_is_in_index_order() {
        for (i, s) in Stat::ALL.iter().enumerate() {
            assert_eq!(*s as u32, i as u32);
        }
    }
}
