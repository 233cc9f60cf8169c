//! Encoding symbolized profiles as one OTLP `ExportProfilesServiceRequest`.
//!
//! Layout, following the conventions of the OpenTelemetry eBPF profiler so
//! Collector processors and Pyroscope read us the same way:
//!
//! - one `ResourceProfiles` per process (pid), whose resource carries
//!   `service.name`, `process.pid`, `process.executable.{name,path}`,
//!   `container.id` and `host.name`; one `ScopeProfiles` (`profiler-agent`);
//! - one OTLP `Profile` per input [`Profile`] with samples of that process,
//!   so on-CPU and off-CPU become two profiles of the same resource;
//! - samples carry `thread.name` and `thread.id`; mappings
//!   `process.executable.build_id.gnu`; locations `profile.frame.type`;
//! - inline chains become one location with several lines, innermost first;
//! - one dictionary for the whole request (see [`super::dictionary`]).
//!
//! We symbolize on the host, so lines and functions are filled in. Frames the
//! symbolizer could not resolve keep its fallback name (`libc.so.6+0x1234`)
//! as function, so every exporter shows the same names; mapping, address and
//! build id still let a backend symbolize them again.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{SystemTime, UNIX_EPOCH};

use opentelemetry_proto::tonic::collector::profiles::v1development::ExportProfilesServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::profiles::v1development as otlp;
use opentelemetry_proto::tonic::resource::v1::Resource as OtlpResource;

use super::dictionary::{AttrValue, Dictionary};
use crate::profile::{Frame, FrameKind, ProcessMeta, Profile, Sample, ValueType};

/// Instrumentation scope name of everything this agent sends.
pub const SCOPE_NAME: &str = "profiler-agent";

/// What the agent adds to every process's resource.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Resource {
    /// `host.name` of the machine the agent runs on; left out when empty.
    pub host_name: String,
    /// `service.name` for every process (as `OTEL_SERVICE_NAME` would set it).
    /// Without it each process is its own service, named after its
    /// executable, because Pyroscope would otherwise file everything under
    /// `unknown_service:<exe>`.
    pub service_name_override: Option<String>,
    /// Further attributes for every process (`deployment.environment`, k8s
    /// attributes, ...). A `service.name` here is used when there is no
    /// override; keys the agent sets from process facts are not replaced.
    pub extra_attributes: Vec<(String, String)>,
}

/// Encodes `profiles` (e.g. the on-CPU and off-CPU profile of one window)
/// as one request with one shared dictionary.
///
/// Processes come in pid order; zero-value samples are left out (they carry
/// no weight), and a process without any other sample gets no resource.
pub fn encode(profiles: &[&Profile], resource: &Resource) -> ExportProfilesServiceRequest {
    encode_pids(profiles, resource, None)
}

/// Every process with a non-zero sample in `profiles`, in pid order.
pub(crate) fn pids(profiles: &[&Profile]) -> Vec<u32> {
    let pids: BTreeSet<u32> =
        profiles.iter().flat_map(|p| p.samples.iter().filter(|s| s.value > 0).map(|s| s.pid)).collect();
    pids.into_iter().collect()
}

/// [`encode`] restricted to the processes in `only` (all when `None`), with
/// a dictionary holding only what they use.
pub(crate) fn encode_pids(
    profiles: &[&Profile],
    resource: &Resource,
    only: Option<&BTreeSet<u32>>,
) -> ExportProfilesServiceRequest {
    // Frame indices that point nowhere should not crash the agent; they are
    // shown as this frame instead, as the pprof exporter does.
    let unknown = Frame::unknown();
    let by_pid: Vec<BTreeMap<u32, Vec<&Sample>>> = profiles.iter().map(|p| samples_by_pid(p)).collect();
    let pids: BTreeSet<u32> =
        by_pid.iter().flat_map(|m| m.keys().copied()).filter(|pid| only.is_none_or(|o| o.contains(pid))).collect();
    let mut encoder = Encoder {
        dict: Dictionary::new(),
        unknown: &unknown,
        mapping_cache: profiles.iter().map(|p| vec![None; p.modules.len()]).collect(),
    };

    let mut resource_profiles = Vec::with_capacity(pids.len());
    for pid in pids {
        let mut messages = Vec::new();
        let mut first_sample = None;
        for (i, (profile, groups)) in profiles.iter().zip(&by_pid).enumerate() {
            if let Some(samples) = groups.get(&pid) {
                first_sample = first_sample.or(samples.first().copied());
                messages.push(encoder.profile(i, profile, samples));
            }
        }
        let meta = process_meta(profiles, pid, first_sample);
        resource_profiles.push(otlp::ResourceProfiles {
            resource: Some(process_resource(&meta, resource)),
            scope_profiles: vec![otlp::ScopeProfiles {
                scope: Some(InstrumentationScope {
                    name: SCOPE_NAME.into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    ..Default::default()
                }),
                profiles: messages,
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        });
    }
    ExportProfilesServiceRequest { resource_profiles, dictionary: Some(encoder.dict.finish()) }
}

/// Non-zero samples of `profile`, grouped by process.
fn samples_by_pid(profile: &Profile) -> BTreeMap<u32, Vec<&Sample>> {
    let mut map: BTreeMap<u32, Vec<&Sample>> = BTreeMap::new();
    for s in profile.samples.iter().filter(|s| s.value > 0) {
        map.entry(s.pid).or_default().push(s);
    }
    map
}

/// What all profiles together know about `pid`: the symbolizer may have read
/// `/proc` for one profile and not for the other (the process exited).
fn process_meta(profiles: &[&Profile], pid: u32, sample: Option<&Sample>) -> ProcessMeta {
    let mut meta = ProcessMeta { pid, ..Default::default() };
    for m in profiles.iter().filter_map(|p| p.processes.get(&pid)) {
        if meta.name.is_empty() {
            meta.name.clone_from(&m.name);
        }
        meta.exe_path = meta.exe_path.or_else(|| m.exe_path.clone());
        meta.container_id = meta.container_id.or_else(|| m.container_id.clone());
        meta.pod_uid = meta.pod_uid.or_else(|| m.pod_uid.clone());
        meta.pod = meta.pod.or_else(|| m.pod.clone());
    }
    if meta.name.is_empty() {
        meta.name = sample.map(|s| s.process_name.clone()).unwrap_or_default();
    }
    meta
}

/// The executable's base name, as semantic conventions define
/// `process.executable.name`; the comm when the path is unknown.
fn executable_name(meta: &ProcessMeta) -> String {
    let from_path = meta.exe_path.as_deref().and_then(|p| {
        // `/proc/PID/exe` of a replaced binary reads `/usr/bin/app (deleted)`.
        let base = p.trim_end_matches(" (deleted)").rsplit('/').next()?;
        (!base.is_empty()).then(|| base.to_owned())
    });
    from_path.unwrap_or_else(|| meta.name.clone())
}

fn process_resource(meta: &ProcessMeta, agent: &Resource) -> OtlpResource {
    let exe_name = executable_name(meta);
    let extra_service = agent.extra_attributes.iter().find(|(k, _)| k == "service.name").map(|(_, v)| v);
    // OTEL_SERVICE_NAME, then the pod's rule, then OTEL_RESOURCE_ATTRIBUTES.
    let pod_service = crate::export::workload::pod_service_name(meta).map(str::to_owned);
    let service = agent.service_name_override.as_ref().or(pod_service.as_ref()).or(extra_service).unwrap_or(&exe_name);

    let mut attrs = Vec::new();
    push_str(&mut attrs, "service.name", service);
    push(&mut attrs, "process.pid", any_value::Value::IntValue(meta.pid.into()));
    push_str(&mut attrs, "process.executable.name", &exe_name);
    push_str(&mut attrs, "process.executable.path", meta.exe_path.as_deref().unwrap_or(""));
    push_str(&mut attrs, "container.id", meta.container_id.as_deref().unwrap_or(""));
    for (k, v) in crate::export::workload::k8s_attributes(meta) {
        push_str(&mut attrs, &k, &v);
    }
    push_str(&mut attrs, "host.name", &agent.host_name);
    for (k, v) in &agent.extra_attributes {
        push_str(&mut attrs, k, v);
    }
    OtlpResource { attributes: attrs, ..Default::default() }
}

/// Adds a string attribute unless it is empty (unknown) or the key is taken:
/// resource attribute keys must be unique, and the first setter wins.
fn push_str(attrs: &mut Vec<KeyValue>, key: &str, value: &str) {
    if !value.is_empty() {
        push(attrs, key, any_value::Value::StringValue(value.to_owned()));
    }
}

fn push(attrs: &mut Vec<KeyValue>, key: &str, value: any_value::Value) {
    if !key.is_empty() && !attrs.iter().any(|kv| kv.key == key) {
        attrs.push(KeyValue {
            key: key.to_owned(),
            value: Some(AnyValue { value: Some(value) }),
            ..Default::default()
        });
    }
}

/// State shared by all profiles of one request.
struct Encoder<'a> {
    dict: Dictionary,
    unknown: &'a Frame,
    /// Per input profile, per module: its mapping index once emitted. Lazy,
    /// so modules only zero-value samples used do not become orphans.
    mapping_cache: Vec<Vec<Option<i32>>>,
}

impl Encoder<'_> {
    /// The OTLP profile for `samples` (all of one process) of input profile
    /// number `which`.
    fn profile(&mut self, which: usize, profile: &Profile, samples: &[&Sample]) -> otlp::Profile {
        let sample_type = Some(self.value_type(&profile.value_type));
        let period_type = profile.period_type.as_ref().map(|t| self.value_type(t));
        let mut out: Vec<otlp::Sample> = Vec::with_capacity(samples.len());
        // Samples with the same stack and attributes SHOULD be one sample;
        // the aggregate is unique per thread and stack already, this only
        // guards against inputs that are not.
        let mut seen: HashMap<(i32, Vec<i32>), usize> = HashMap::new();
        for sample in samples {
            let stack_index = self.stack(which, profile, &sample.frames);
            let mut attribute_indices = vec![
                self.dict.attribute("thread.name", AttrValue::Str(sample.thread_name.clone())),
                self.dict.attribute("thread.id", AttrValue::Int(sample.tid.into())),
            ];
            if let Some(cpu) = sample.cpu {
                attribute_indices.push(self.dict.attribute("cpu.logical_number", AttrValue::Int(cpu.into())));
            }
            for (k, v) in &sample.labels {
                attribute_indices.push(self.dict.attribute(k, AttrValue::Str(v.clone())));
            }
            let value = saturating_i64(sample.value);
            let key = (stack_index, attribute_indices);
            if let Some(&i) = seen.get(&key) {
                out[i].values[0] = out[i].values[0].saturating_add(value);
                continue;
            }
            out.push(otlp::Sample {
                stack_index,
                attribute_indices: key.1.clone(),
                values: vec![value],
                ..Default::default()
            });
            seen.insert(key, out.len() - 1);
        }
        otlp::Profile {
            sample_type,
            samples: out,
            time_unix_nano: unix_nanos(profile.start),
            duration_nano: profile.duration_ns,
            period: if period_type.is_some() { saturating_i64(profile.period) } else { 0 },
            period_type,
            ..Default::default()
        }
    }

    fn value_type(&mut self, t: &ValueType) -> otlp::ValueType {
        otlp::ValueType { type_strindex: self.dict.string(&t.kind), unit_strindex: self.dict.string(&t.unit) }
    }

    /// The stack index for a leaf-first frame list: each run of inlined
    /// frames is folded into the location of the frame it is inlined into.
    fn stack(&mut self, which: usize, profile: &Profile, frames: &[usize]) -> i32 {
        let mut locations = Vec::with_capacity(frames.len());
        let mut chain: Vec<&Frame> = Vec::new();
        for &index in frames {
            let frame = profile.frames.get(index).unwrap_or(self.unknown);
            chain.push(frame);
            if frame.kind != FrameKind::Inlined {
                locations.push(self.location(which, profile, &chain));
                chain.clear();
            }
        }
        if !chain.is_empty() {
            // An inline chain with no owning frame (the stack was truncated
            // inside it); keep what we have rather than drop the frames.
            locations.push(self.location(which, profile, &chain));
        }
        self.dict.stack(locations)
    }

    /// The location for `chain` (innermost first, owner last).
    fn location(&mut self, which: usize, profile: &Profile, chain: &[&Frame]) -> i32 {
        let owner = chain[chain.len() - 1];
        let mapping_index = owner.module.map_or(0, |m| self.mapping(which, profile, m));
        let lines = chain
            .iter()
            .map(|f| otlp::Line {
                function_index: self.dict.function(&f.function, f.file.as_deref()),
                line: f.line.map_or(0, i64::from),
                column: 0,
            })
            .collect();
        let frame_type = match owner.kind {
            FrameKind::Kernel => "kernel",
            FrameKind::Jit(runtime) => runtime.otel_frame_type(),
            FrameKind::Python { .. } => "cpython",
            FrameKind::User | FrameKind::Inlined => "native",
        };
        let attributes = vec![self.dict.attribute("profile.frame.type", AttrValue::Str(frame_type.into()))];
        self.dict.location(mapping_index, owner.address, lines, attributes)
    }

    /// The mapping index of module `module` of input profile `which`; 0 (no
    /// mapping) for an index that points nowhere.
    fn mapping(&mut self, which: usize, profile: &Profile, module: usize) -> i32 {
        let Some(m) = profile.modules.get(module) else {
            return 0;
        };
        if let Some(i) = self.mapping_cache[which][module] {
            return i;
        }
        let attributes = match m.build_id.as_deref().filter(|b| !b.is_empty()) {
            Some(id) => vec![self.dict.attribute("process.executable.build_id.gnu", AttrValue::Str(id.into()))],
            None => Vec::new(),
        };
        let i = self.dict.mapping(&m.path, attributes);
        self.mapping_cache[which][module] = Some(i);
        i
    }
}

/// Proto values are signed; clamp instead of wrapping to a negative value.
fn saturating_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// `time_unix_nano` is unsigned; a clock before 1970 reads as "unset".
fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}
