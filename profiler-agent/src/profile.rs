//! The symbolized profile model: what every exporter reads.
//!
//! A [`Profile`] is one recording window of one kind of value (on-CPU
//! samples, off-CPU nanoseconds, ...). Frames are interned in a table so
//! stacks are short index lists; the exporters (folded, pprof, SVG, OTLP)
//! each turn this into their own format and never look at BPF or
//! symbolization internals.

use std::collections::{BTreeMap, HashMap};
use std::time::SystemTime;

/// What a frame is, which decides how exporters mark it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FrameKind {
    /// A user-space function (the outermost of an inline chain, or not inlined).
    User,
    /// A function inlined into the next frame out; folded output marks it `_[i]`.
    Inlined,
    /// A kernel function; folded output marks it `_[k]`.
    Kernel,
    /// JIT-compiled code named from the runtime's perf map or jitdump;
    /// folded output marks it `_[j]`.
    Jit(JitRuntime),
    /// A CPython function (runtimes/python): `function` is its qualified
    /// name, `file` and `line` the source position of the running
    /// instruction.
    Python {
        /// The function's first line (`co_firstlineno`).
        start_line: u32,
    },
}

/// The runtime that compiled a JIT frame, for exporters that name it
/// (OTLP `profile.frame.type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum JitRuntime {
    V8,
    Jvm,
    Dotnet,
    CPython,
    /// A runtime the agent does not tell apart (LuaJIT, Julia, Wasmtime...).
    Other,
}

impl JitRuntime {
    /// The OpenTelemetry `profile.frame.type` value: the well-known one
    /// where it exists (the conventions require it then), else `jit`.
    pub fn otel_frame_type(self) -> &'static str {
        match self {
            JitRuntime::V8 => "v8js",
            JitRuntime::Jvm => "jvm",
            JitRuntime::Dotnet => "dotnet",
            JitRuntime::CPython => "cpython",
            JitRuntime::Other => "jit",
        }
    }
}

/// The binary (or kernel) a frame's address belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default)]
pub struct Module {
    /// Path of the file as mapped (`/usr/lib/x86_64-linux-gnu/libc.so.6`), or `[kernel.kallsyms]`.
    pub path: String,
    /// GNU build id as lowercase hex, when the ELF has one.
    pub build_id: Option<String>,
}

/// One symbolized frame.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Frame {
    /// Function name, demangled. For unsymbolized frames this is
    /// `module+0xOFFSET`, or `[unknown]` when even the mapping is unknown.
    pub function: String,
    /// Source file, when debug info had it.
    pub file: Option<String>,
    /// Source line, when debug info had it.
    pub line: Option<u32>,
    /// Index into [`Profile::modules`], when the mapping is known.
    pub module: Option<usize>,
    /// Address relative to the module (file offset for user code, kernel
    /// address for the kernel); 0 when unknown.
    pub address: u64,
    pub kind: FrameKind,
    /// No symbol was found for this address.
    pub unsymbolized: bool,
}

impl Frame {
    /// A frame with only a name: synthetic frames (a thread in the wall
    /// view) and `[unknown]` stand-ins.
    pub fn named(function: impl Into<String>, unsymbolized: bool) -> Self {
        Frame {
            function: function.into(),
            file: None,
            line: None,
            module: None,
            address: 0,
            kind: FrameKind::User,
            unsymbolized,
        }
    }

    /// What exporters show for a frame index that points nowhere, rather
    /// than crash the agent.
    pub fn unknown() -> Self {
        Self::named("[unknown]", true)
    }
}

/// One unique stack of one thread, with its aggregated value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sample {
    /// Process id.
    pub pid: u32,
    /// Thread id.
    pub tid: u32,
    /// Process name: comm of the thread-group leader.
    pub process_name: String,
    /// Thread name (comm of the thread).
    pub thread_name: String,
    /// CPU the samples were taken on (on-CPU profiles only).
    pub cpu: Option<u32>,
    /// Indices into [`Profile::frames`], innermost (leaf) first.
    pub frames: Vec<usize>,
    /// Number of samples (on-CPU) or nanoseconds (off-CPU), per [`Profile::value_type`].
    pub value: u64,
    /// Further (key, value) labels: `state=still_blocked` on off-CPU time of
    /// a thread still blocked when the interval ended.
    pub labels: Vec<(String, String)>,
}

/// The label of off-CPU time counted up to the end of an interval for a
/// thread that was still blocked then (it may be hung).
pub const STILL_BLOCKED_LABEL: (&str, &str) = ("state", "still_blocked");

impl Sample {
    /// Whether the sample carries the still-blocked label.
    pub fn still_blocked(&self) -> bool {
        self.labels.iter().any(|(k, v)| k == STILL_BLOCKED_LABEL.0 && v == STILL_BLOCKED_LABEL.1)
    }
}

/// What is known about a process that has samples in a profile; exporters
/// turn it into resource attributes and labels.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProcessMeta {
    pub pid: u32,
    /// comm of the thread-group leader.
    pub name: String,
    /// Path of the executable (`/proc/PID/exe`), when it could be read.
    pub exe_path: Option<String>,
    /// Container id from the process's cgroup path, when it runs in one.
    pub container_id: Option<String>,
    /// Kubernetes pod uid from the process's cgroup path.
    pub pod_uid: Option<String>,
    /// The pod and container it runs in, when Kubernetes metadata is on and
    /// the pod is known.
    pub pod: Option<std::sync::Arc<PodMeta>>,
}

/// The Kubernetes pod and container of a process, as exporters label it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodMeta {
    pub name: String,
    pub uid: String,
    pub namespace: String,
    pub node: String,
    /// The container's name within the pod.
    pub container: Option<String>,
    /// The configured pod labels the pod has, by label key.
    pub labels: Vec<(String, String)>,
    /// `service.name` by the configured rule, when a pod-side step had a
    /// value (else exporters name the service after the executable).
    pub service_name: Option<String>,
}

/// A (type, unit) pair as pprof and OTLP name them, e.g. `samples`/`count`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValueType {
    pub kind: String,
    pub unit: String,
}

impl ValueType {
    pub fn new(kind: &str, unit: &str) -> Self {
        Self { kind: kind.to_owned(), unit: unit.to_owned() }
    }
}

/// A symbolized profile for one window.
#[derive(Clone, Debug)]
pub struct Profile {
    /// What [`Sample::value`] counts.
    pub value_type: ValueType,
    /// For sampled profiles, what one sample stands for (`cpu`/`nanoseconds`)
    /// and how much (`period`, 1e9/Hz). `None` for exactly measured values.
    pub period_type: Option<ValueType>,
    pub period: u64,
    /// Start of the window.
    pub start: SystemTime,
    /// Length of the window in nanoseconds.
    pub duration_ns: u64,
    pub modules: Vec<Module>,
    pub frames: Vec<Frame>,
    pub samples: Vec<Sample>,
    /// Every process with samples here, by pid.
    pub processes: BTreeMap<u32, ProcessMeta>,
}

impl Profile {
    /// An empty profile of the given value type.
    pub fn new(value_type: ValueType, period_type: Option<ValueType>, period: u64, start: SystemTime) -> Self {
        Self {
            value_type,
            period_type,
            period,
            start,
            duration_ns: 0,
            modules: Vec::new(),
            frames: Vec::new(),
            samples: Vec::new(),
            processes: BTreeMap::new(),
        }
    }

    /// Sum of all sample values.
    pub fn total(&self) -> u64 {
        self.samples.iter().map(|s| s.value).sum()
    }
}

/// Interns modules and frames while a profile is being built.
#[derive(Default)]
pub struct ProfileBuilder {
    modules: HashMap<Module, usize>,
    frames: HashMap<Frame, usize>,
}

impl ProfileBuilder {
    /// The index of `module` in `profile.modules`, adding it if new.
    pub fn module(&mut self, profile: &mut Profile, module: Module) -> usize {
        if let Some(&i) = self.modules.get(&module) {
            return i;
        }
        profile.modules.push(module.clone());
        self.modules.insert(module, profile.modules.len() - 1);
        profile.modules.len() - 1
    }

    /// The index of `frame` in `profile.frames`, adding it if new.
    pub fn frame(&mut self, profile: &mut Profile, frame: Frame) -> usize {
        // Looked up before cloning: most frames are already there.
        if let Some(&i) = self.frames.get(&frame) {
            return i;
        }
        profile.frames.push(frame.clone());
        self.frames.insert(frame, profile.frames.len() - 1);
        profile.frames.len() - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(name: &str) -> Frame {
        Frame {
            function: name.into(),
            file: None,
            line: None,
            module: None,
            address: 0,
            kind: FrameKind::User,
            unsymbolized: false,
        }
    }

    #[test]
    fn jit_frame_types_use_the_well_known_otel_values() {
        let types: Vec<&str> =
            [JitRuntime::V8, JitRuntime::Jvm, JitRuntime::Dotnet, JitRuntime::CPython, JitRuntime::Other]
                .iter()
                .map(|r| r.otel_frame_type())
                .collect();
        assert_eq!(types, ["v8js", "jvm", "dotnet", "cpython", "jit"]);
    }

    #[test]
    fn builder_interns_frames_and_modules_once() {
        let mut p = Profile::new(ValueType::new("samples", "count"), None, 0, SystemTime::UNIX_EPOCH);
        let mut b = ProfileBuilder::default();
        let a = b.frame(&mut p, frame("a"));
        let c = b.frame(&mut p, frame("c"));
        assert_eq!(b.frame(&mut p, frame("a")), a);
        assert_ne!(a, c);
        assert_eq!(p.frames.len(), 2);
        let m = Module { path: "/bin/x".into(), build_id: None };
        assert_eq!(b.module(&mut p, m.clone()), b.module(&mut p, m));
        assert_eq!(p.modules.len(), 1);
    }
}
