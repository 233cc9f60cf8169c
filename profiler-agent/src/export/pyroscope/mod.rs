//! Grafana Pyroscope native ingest: profiles as a `push.v1.PushRequest`.
//!
//! For Pyroscope deployments without an OTLP path. Each request carries one
//! series per (process, profile kind): Pyroscope keys everything it stores
//! by label set, and a process is what users select (`service_name`), so a
//! profile is split per process before it is pprof-encoded. Labels:
//!
//! - `service_name`: the override if configured, else the executable's file
//!   name (Pyroscope rejects series without one);
//! - `__name__`: `process_cpu` for on-CPU samples (`samples/count` with a
//!   `cpu` period), `off_cpu` for `off_cpu/nanoseconds` — the names
//!   Pyroscope's own OTLP ingest gives these kinds; any other kind is named
//!   after its value type (e.g. `wall`);
//! - `host_name`, `pid`, `process_name`, `container_id` when known, and the
//!   configured extras.
//!
//! [`client::PyroscopeClient`] sends the request.

pub mod client;
pub mod proto;

#[cfg(test)]
mod tests;

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use super::{pprof, ExportError};
use crate::profile::{ProcessMeta, Profile};
pub use client::{PyroscopeClient, PyroscopeConfig, PyroscopeError};
pub use proto::{LabelPair, PushRequest, RawProfileSeries, RawSample};

/// Labels added to every series, besides those derived from the process.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PushLabels {
    /// `host_name`; left out when empty.
    pub host_name: String,
    /// `service_name` for every process; `None` derives it per process.
    pub service_name_override: Option<String>,
    /// More labels (`env`, `region`, ...). Names are made valid with
    /// [`sanitize_label_name`]; an extra cannot replace a label the agent
    /// derives itself (use `service_name_override` for `service_name`).
    pub extra: Vec<(String, String)>,
}

/// `__name__` of on-CPU profiles.
pub const PROCESS_CPU: &str = "process_cpu";
/// `__name__` of off-CPU profiles.
pub const OFF_CPU: &str = "off_cpu";

/// Builds the push request for `profiles`: one series per process and
/// profile, in argument order and then by pid.
///
/// Processes whose samples add up to zero are left out, since Pyroscope
/// rejects empty profiles and they would carry no weight anyway.
///
/// # Errors
///
/// [`ExportError::Gzip`] if compressing a pprof profile fails.
pub fn encode(profiles: &[&Profile], labels: &PushLabels) -> Result<PushRequest, ExportError> {
    let mut series = Vec::new();
    for &profile in profiles {
        let name = profile_name(profile);
        let mut pids: Vec<u32> = profile.samples.iter().filter(|s| s.value > 0).map(|s| s.pid).collect();
        pids.sort_unstable();
        pids.dedup();
        for pid in pids {
            let sub = process_profile(profile, pid);
            // Samples may name a process that `processes` lacks (e.g. it
            // exited before its metadata was read); the samples still know
            // its comm.
            let meta = profile.processes.get(&pid).cloned().unwrap_or_else(|| ProcessMeta {
                pid,
                name: sub.samples.first().map(|s| s.process_name.clone()).unwrap_or_default(),
                ..Default::default()
            });
            series.push(RawProfileSeries {
                labels: series_labels(&name, &meta, labels),
                samples: vec![RawSample { raw_profile: pprof::to_gzip(&sub)?, id: profile_id() }],
            });
        }
    }
    Ok(PushRequest { series })
}

/// The `__name__` Pyroscope files `profile` under.
pub fn profile_name(profile: &Profile) -> String {
    let vt = &profile.value_type;
    let cpu_period = profile.period_type.as_ref().is_some_and(|p| p.kind == "cpu");
    if vt.kind == "samples" && vt.unit == "count" && cpu_period {
        PROCESS_CPU.to_owned()
    } else if vt.kind == "off_cpu" && vt.unit == "nanoseconds" {
        OFF_CPU.to_owned()
    } else {
        sanitize_label_name(&vt.kind).unwrap_or_else(|| "unknown".to_owned())
    }
}

/// Makes `name` a valid Prometheus label name (`[a-zA-Z_][a-zA-Z0-9_]*`):
/// every other character becomes `_` (as Pyroscope itself does with the
/// dots of OpenTelemetry names like `k8s.pod.name`), and a leading digit
/// gets a `_` in front. `None` for an empty name.
pub fn sanitize_label_name(name: &str) -> Option<String> {
    if name.is_empty() {
        return None;
    }
    let mut out = String::with_capacity(name.len() + 1);
    if name.starts_with(|c: char| c.is_ascii_digit()) {
        out.push('_');
    }
    out.extend(name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' { c } else { '_' }));
    Some(out)
}

/// The sorted, duplicate-free label set of one series.
fn series_labels(name: &str, meta: &ProcessMeta, labels: &PushLabels) -> Vec<LabelPair> {
    // Extras first so that derived labels overwrite them: a stray `pid` or
    // `__name__` extra must not mislabel the data. A BTreeMap yields the
    // names sorted, which Pyroscope expects.
    let mut set: BTreeMap<String, String> = labels
        .extra
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .filter_map(|(k, v)| Some((sanitize_label_name(k)?, v.clone())))
        .collect();
    let mut put = |k: &str, v: &str| {
        // An empty value means "no label" to Prometheus-style stores.
        if !v.is_empty() {
            set.insert(k.to_owned(), v.to_owned());
        }
    };
    put("__name__", name);
    put("service_name", &service_name(meta, labels));
    put("host_name", &labels.host_name);
    put("pid", &meta.pid.to_string());
    put("process_name", &meta.name);
    put("container_id", meta.container_id.as_deref().unwrap_or(""));
    for (k, v) in crate::export::workload::pyroscope_labels(meta) {
        put(k, &v);
    }
    set.into_iter().map(|(name, value)| LabelPair { name, value }).collect()
}

/// The override, else the executable's file name, else the comm: something
/// stable across restarts that users recognise.
fn service_name(meta: &ProcessMeta, labels: &PushLabels) -> String {
    if let Some(s) = labels.service_name_override.as_deref().filter(|s| !s.is_empty()) {
        return s.to_owned();
    }
    if let Some(s) = crate::export::workload::pod_service_name(meta) {
        return s.to_owned();
    }
    let exe = meta.exe_path.as_deref().and_then(|p| p.rsplit('/').next()).filter(|n| !n.is_empty());
    match exe.unwrap_or(&meta.name) {
        "" => format!("unknown_service:{}", meta.pid),
        n => n.to_owned(),
    }
}

/// `profile` with only the samples of `pid`, and only the frames and
/// modules those reference, re-indexed.
///
/// The pprof encoder only emits functions and locations that samples
/// reference, but it emits every module as a mapping; without the subset
/// each series would list every other process's binaries.
pub fn process_profile(profile: &Profile, pid: u32) -> Profile {
    let mut sub = Profile::new(profile.value_type.clone(), profile.period_type.clone(), profile.period, profile.start);
    sub.duration_ns = profile.duration_ns;
    if let Some(meta) = profile.processes.get(&pid) {
        sub.processes.insert(pid, meta.clone());
    }
    let mut frames: HashMap<usize, usize> = HashMap::new();
    let mut modules: HashMap<usize, usize> = HashMap::new();
    for sample in profile.samples.iter().filter(|s| s.pid == pid) {
        let mut s = sample.clone();
        for index in &mut s.frames {
            // An index that points nowhere stays one (past the end), which
            // the pprof encoder shows as `[unknown]` just as it would have.
            let Some(frame) = profile.frames.get(*index) else {
                *index = usize::MAX;
                continue;
            };
            *index = *frames.entry(*index).or_insert_with(|| {
                let mut f = frame.clone();
                f.module = f.module.and_then(|m| {
                    let module = profile.modules.get(m)?;
                    Some(*modules.entry(m).or_insert_with(|| {
                        sub.modules.push(module.clone());
                        sub.modules.len() - 1
                    }))
                });
                sub.frames.push(f);
                sub.frames.len() - 1
            });
        }
        sub.samples.push(s);
    }
    sub
}

/// A random (version 4 format) UUID for [`RawSample::id`].
///
/// Pyroscope only logs it, so std's randomly keyed hasher is random enough
/// and saves a dependency; the counter and clock keep ids distinct even if
/// two hashers ever shared keys.
fn profile_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    // Truncated to the low 64 bits: they are the ones that change.
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    let word = |salt: u64| {
        let mut h = RandomState::new().build_hasher();
        h.write_u64(n);
        h.write_u64(now);
        h.write_u64(salt);
        h.finish()
    };
    let hi = (word(1) & !0xf000) | 0x4000; // version 4
    let lo = (word(2) & !(0b11 << 62)) | (0b10 << 62); // RFC 4122 variant
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        hi >> 32,
        (hi >> 16) & 0xffff,
        hi & 0xffff,
        lo >> 48,
        lo & 0xffff_ffff_ffff
    )
}
