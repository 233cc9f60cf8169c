//! pprof export: the model as google/pprof `profile.proto`.
//!
//! The result opens in `go tool pprof`, Pyroscope, Grafana, Polar Signals
//! and similar. Conventions followed:
//!
//! - one sample type per value (`samples/count` on-CPU), plus the period
//!   type (`cpu/nanoseconds`) with value × period when the profile is
//!   sampled, so viewers can show time rather than sample counts;
//! - inline chains become one [`proto::Location`] with several lines,
//!   innermost first, because in pprof a location is one address;
//! - addresses are module-relative (file offsets, or kernel addresses), so
//!   mappings are emitted with `memory_start = file_offset = 0`;
//! - each sample carries `pid`, `tid`, `thread_name` and `process_name`
//!   labels, since pprof has no notion of threads otherwise.

pub mod proto;
pub mod read;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::io::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use flate2::write::GzEncoder;
use flate2::Compression;
use prost::Message as _;

use super::ExportError;
use crate::profile::{Frame, FrameKind, Profile};

/// Encodes `profile` as a pprof message.
///
/// Zero-value samples are left out: they carry no weight in any view.
pub fn encode(profile: &Profile) -> proto::Profile {
    // Frame indices that point nowhere should not crash the agent; they are
    // shown as this frame instead.
    let unknown = Frame::unknown();
    Encoder::new(profile, &unknown).encode()
}

/// Encodes `profile` as uncompressed pprof protobuf bytes.
pub fn to_bytes(profile: &Profile) -> Vec<u8> {
    encode(profile).encode_to_vec()
}

/// Encodes `profile` as gzipped pprof protobuf bytes, the form `.pb.gz`
/// files and pprof HTTP endpoints use.
///
/// # Errors
///
/// [`ExportError::Gzip`] if compression fails (it only writes to memory,
/// so in practice it does not).
pub fn to_gzip(profile: &Profile) -> Result<Vec<u8>, ExportError> {
    let bytes = to_bytes(profile);
    // Profiles compress well; a quarter of the raw size avoids most regrowth.
    let mut gz = GzEncoder::new(Vec::with_capacity(bytes.len() / 4), Compression::default());
    gz.write_all(&bytes).map_err(ExportError::Gzip)?;
    gz.finish().map_err(ExportError::Gzip)
}

/// pprof's string table: index 0 is always `""`, every string appears once.
struct StringTable {
    strings: Vec<String>,
    index: HashMap<String, i64>,
}

impl StringTable {
    fn new() -> Self {
        let mut table = Self { strings: Vec::new(), index: HashMap::new() };
        table.intern("");
        table
    }

    fn intern(&mut self, s: &str) -> i64 {
        if let Some(&i) = self.index.get(s) {
            return i;
        }
        let i = self.strings.len() as i64;
        self.strings.push(s.to_owned());
        self.index.insert(s.to_owned(), i);
        i
    }
}

/// Identifies a location: the same address can only be deduplicated if it
/// resolves to the same inline chain (`(function id, line)` per level).
type LocationKey = (u64, u64, Vec<(u64, i64)>);

/// State while encoding one profile; ids are 1-based positions.
struct Encoder<'a> {
    profile: &'a Profile,
    unknown: &'a Frame,
    strings: StringTable,
    functions: Vec<proto::Function>,
    function_ids: HashMap<(&'a str, Option<&'a str>), u64>,
    locations: Vec<proto::Location>,
    location_ids: HashMap<LocationKey, u64>,
}

impl<'a> Encoder<'a> {
    fn new(profile: &'a Profile, unknown: &'a Frame) -> Self {
        Self {
            profile,
            unknown,
            strings: StringTable::new(),
            functions: Vec::new(),
            function_ids: HashMap::new(),
            locations: Vec::new(),
            location_ids: HashMap::new(),
        }
    }

    fn encode(mut self) -> proto::Profile {
        let profile = self.profile;
        let mut sample_type = vec![self.value_type(&profile.value_type)];
        let period_type = profile.period_type.as_ref().map(|t| self.value_type(t));
        let mut default_sample_type = 0;
        if let Some(pt) = &period_type {
            sample_type.push(pt.clone());
            default_sample_type = pt.r#type;
        }
        let mapping = self.mappings();

        let pid = self.strings.intern("pid");
        let tid = self.strings.intern("tid");
        let thread_name = self.strings.intern("thread_name");
        let process_name = self.strings.intern("process_name");
        let mut samples = Vec::with_capacity(profile.samples.len());
        for sample in profile.samples.iter().filter(|s| s.value > 0) {
            let mut value = vec![saturating_i64(sample.value)];
            if period_type.is_some() {
                value.push(saturating_i64(sample.value.saturating_mul(profile.period)));
            }
            let mut label = vec![
                num_label(pid, sample.pid.into()),
                num_label(tid, sample.tid.into()),
                str_label(thread_name, self.strings.intern(&sample.thread_name)),
                str_label(process_name, self.strings.intern(&sample.process_name)),
            ];
            for (k, v) in &sample.labels {
                label.push(str_label(self.strings.intern(k), self.strings.intern(v)));
            }
            samples.push(proto::Sample { location_id: self.locations_of(&sample.frames), value, label });
        }

        proto::Profile {
            sample_type,
            sample: samples,
            mapping,
            location: self.locations,
            function: self.functions,
            string_table: self.strings.strings,
            time_nanos: unix_nanos(profile.start),
            duration_nanos: saturating_i64(profile.duration_ns),
            period: if period_type.is_some() { saturating_i64(profile.period) } else { 0 },
            period_type,
            default_sample_type,
            ..Default::default()
        }
    }

    fn value_type(&mut self, t: &crate::profile::ValueType) -> proto::ValueType {
        proto::ValueType { r#type: self.strings.intern(&t.kind), unit: self.strings.intern(&t.unit) }
    }

    /// One mapping per module, id = index + 1, with the `has_*` flags
    /// derived from what symbolization actually found in that module (pprof
    /// uses them to decide whether to re-symbolize).
    fn mappings(&mut self) -> Vec<proto::Mapping> {
        let mut mappings: Vec<proto::Mapping> = Vec::with_capacity(self.profile.modules.len());
        for (i, module) in self.profile.modules.iter().enumerate() {
            mappings.push(proto::Mapping {
                id: i as u64 + 1,
                filename: self.strings.intern(&module.path),
                build_id: self.strings.intern(module.build_id.as_deref().unwrap_or("")),
                ..Default::default()
            });
        }
        for frame in self.profile.frames.iter().filter(|f| !f.unsymbolized) {
            let Some(m) = frame.module.and_then(|m| mappings.get_mut(m)) else {
                continue;
            };
            m.has_functions = true;
            m.has_filenames |= frame.file.is_some();
            m.has_line_numbers |= frame.line.is_some();
            m.has_inline_frames |= frame.kind == FrameKind::Inlined;
        }
        mappings
    }

    /// Location ids for a leaf-first frame list: each run of inlined frames
    /// is folded together with the frame it is inlined into.
    fn locations_of(&mut self, frames: &[usize]) -> Vec<u64> {
        let mut ids = Vec::with_capacity(frames.len());
        let mut chain: Vec<&'a Frame> = Vec::new();
        for &index in frames {
            let frame = self.profile.frames.get(index).unwrap_or(self.unknown);
            chain.push(frame);
            if frame.kind != FrameKind::Inlined {
                ids.push(self.location(&chain));
                chain.clear();
            }
        }
        if !chain.is_empty() {
            // An inline chain with no owning frame (the stack was truncated
            // inside it); keep what we have rather than drop the frames.
            ids.push(self.location(&chain));
        }
        ids
    }

    /// The id of the location for `chain` (innermost first, owner last),
    /// adding it if new.
    fn location(&mut self, chain: &[&'a Frame]) -> u64 {
        let owner = chain[chain.len() - 1];
        let mapping_id = owner.module.filter(|&m| m < self.profile.modules.len()).map_or(0, |m| m as u64 + 1);
        let lines: Vec<(u64, i64)> = chain.iter().map(|f| (self.function(f), f.line.map_or(0, i64::from))).collect();
        let key = (mapping_id, owner.address, lines);
        if let Some(&id) = self.location_ids.get(&key) {
            return id;
        }
        let id = self.locations.len() as u64 + 1;
        self.locations.push(proto::Location {
            id,
            mapping_id,
            address: owner.address,
            line: key.2.iter().map(|&(function_id, line)| proto::Line { function_id, line, column: 0 }).collect(),
            is_folded: false,
        });
        self.location_ids.insert(key, id);
        id
    }

    /// The id of the function `(name, file)` of `frame`, adding it if new.
    fn function(&mut self, frame: &'a Frame) -> u64 {
        let key = (frame.function.as_str(), frame.file.as_deref());
        if let Some(&id) = self.function_ids.get(&key) {
            return id;
        }
        let id = self.functions.len() as u64 + 1;
        let name = self.strings.intern(&frame.function);
        self.functions.push(proto::Function {
            id,
            name,
            // We only have demangled names; pprof falls back to `name` anyway.
            system_name: name,
            filename: self.strings.intern(frame.file.as_deref().unwrap_or("")),
            start_line: match frame.kind {
                FrameKind::Python { start_line } => i64::from(start_line),
                _ => 0,
            },
        });
        self.function_ids.insert(key, id);
        id
    }
}

fn num_label(key: i64, num: i64) -> proto::Label {
    proto::Label { key, num, ..Default::default() }
}

fn str_label(key: i64, str: i64) -> proto::Label {
    proto::Label { key, str, ..Default::default() }
}

/// pprof values are signed; clamp instead of wrapping to a negative value.
fn saturating_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn unix_nanos(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_nanos()).unwrap_or(i64::MAX),
        Err(e) => i64::try_from(e.duration().as_nanos()).map_or(i64::MIN, |n| -n),
    }
}
