//! Reading pprof back into the [`Profile`] model: the inverse of
//! [`super::encode`], for `profiler-agent diff`.
//!
//! Input is untrusted (any `.pb.gz` a user points at), so every index and id
//! is checked and a bad one is an error, never a panic. The mapping back
//! follows the writer's conventions: the last line of a location owns the
//! address and the ones before it are inlined into it; frames of the
//! `[kernel.kallsyms]` mapping are kernel frames; the `pid`, `tid`,
//! `process_name` and `thread_name` labels name the thread. Profiles from
//! other tools without those labels read as process `[unknown]`.

use std::collections::HashMap;
use std::io::Read as _;
use std::time::{Duration, UNIX_EPOCH};

use flate2::read::GzDecoder;
use prost::Message as _;

use super::proto;
use crate::profile::{Frame, FrameKind, Module, Profile, ProfileBuilder, Sample, ValueType};

/// Largest decompressed profile accepted, so a small gzip bomb cannot
/// exhaust memory. Our own 10 s system-wide profiles are well under 10 MiB.
pub const MAX_DECODED_BYTES: u64 = 512 << 20;

/// Why a pprof profile could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("not gzip or corrupt gzip data: {0}")]
    Gzip(#[source] std::io::Error),
    #[error("decompressed profile is larger than {} MiB", MAX_DECODED_BYTES >> 20)]
    TooLarge,
    #[error("not a pprof profile: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("corrupt pprof profile: {0}")]
    Invalid(String),
}

fn invalid(what: impl Into<String>) -> ReadError {
    ReadError::Invalid(what.into())
}

/// Decodes plain or gzipped pprof bytes (gzip is recognised by its magic).
pub fn decode_bytes(bytes: &[u8]) -> Result<proto::Profile, ReadError> {
    if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut raw = Vec::new();
        GzDecoder::new(bytes).take(MAX_DECODED_BYTES + 1).read_to_end(&mut raw).map_err(ReadError::Gzip)?;
        if raw.len() as u64 > MAX_DECODED_BYTES {
            return Err(ReadError::TooLarge);
        }
        Ok(proto::Profile::decode(raw.as_slice())?)
    } else {
        Ok(proto::Profile::decode(bytes)?)
    }
}

/// Reads plain or gzipped pprof bytes into a [`Profile`] whose values are
/// those of the first sample type (`samples/count` for our on-CPU profiles).
pub fn read(bytes: &[u8]) -> Result<Profile, ReadError> {
    to_profile(&decode_bytes(bytes)?)
}

/// Converts a decoded pprof message to the model, checking every reference.
pub fn to_profile(p: &proto::Profile) -> Result<Profile, ReadError> {
    let strings = &p.string_table;
    if strings.first().is_some_and(|s| !s.is_empty()) {
        return Err(invalid("string table does not start with \"\""));
    }
    let s = |i: i64| -> Result<&str, ReadError> {
        usize::try_from(i)
            .ok()
            .and_then(|i| if i == 0 && strings.is_empty() { Some("") } else { strings.get(i).map(String::as_str) })
            .ok_or_else(|| invalid(format!("string index {i} outside the table of {}", strings.len())))
    };
    let value_type =
        |t: &proto::ValueType| -> Result<ValueType, ReadError> { Ok(ValueType::new(s(t.r#type)?, s(t.unit)?)) };
    let first = p.sample_type.first().ok_or_else(|| invalid("no sample type"))?;
    let period_type = p.period_type.as_ref().map(value_type).transpose()?;
    let start = UNIX_EPOCH + Duration::from_nanos(u64::try_from(p.time_nanos).unwrap_or(0));
    let mut profile = Profile::new(value_type(first)?, period_type, u64::try_from(p.period).unwrap_or(0), start);
    profile.duration_ns = u64::try_from(p.duration_nanos).unwrap_or(0);

    let mut b = ProfileBuilder::default();
    let mut mappings: HashMap<u64, (usize, bool)> = HashMap::new();
    for m in &p.mapping {
        let path = s(m.filename)?;
        let build_id = Some(s(m.build_id)?).filter(|b| !b.is_empty()).map(str::to_owned);
        let index = b.module(&mut profile, Module { path: path.to_owned(), build_id });
        mappings.insert(m.id, (index, path.starts_with("[kernel")));
    }
    let mut functions: HashMap<u64, (&str, &str)> = HashMap::new();
    for f in &p.function {
        functions.insert(f.id, (s(f.name)?, s(f.filename)?));
    }
    // Frames of each location, leaf first, interned once.
    let mut locations: HashMap<u64, Vec<usize>> = HashMap::new();
    for loc in &p.location {
        let (module, kernel) = match loc.mapping_id {
            0 => (None, false),
            id => {
                let &(m, k) = mappings
                    .get(&id)
                    .ok_or_else(|| invalid(format!("location {} has unknown mapping {id}", loc.id)))?;
                (Some(m), k)
            }
        };
        let mut frames = Vec::with_capacity(loc.line.len().max(1));
        for (i, line) in loc.line.iter().enumerate() {
            let &(name, file) = functions
                .get(&line.function_id)
                .ok_or_else(|| invalid(format!("location {} has unknown function {}", loc.id, line.function_id)))?;
            let owner = i + 1 == loc.line.len();
            let kind = match (owner, kernel) {
                (false, _) => FrameKind::Inlined,
                (true, true) => FrameKind::Kernel,
                (true, false) => FrameKind::User,
            };
            let frame = Frame {
                function: name.to_owned(),
                file: Some(file).filter(|f| !f.is_empty()).map(str::to_owned),
                line: u32::try_from(line.line).ok().filter(|&l| l > 0),
                module,
                address: loc.address,
                kind,
                unsymbolized: false,
            };
            frames.push(b.frame(&mut profile, frame));
        }
        if frames.is_empty() {
            // A location without symbols: name it by address, as pprof does.
            let mut frame = Frame::named(format!("0x{:x}", loc.address), true);
            frame.module = module;
            frame.address = loc.address;
            if kernel {
                frame.kind = FrameKind::Kernel;
            }
            frames.push(b.frame(&mut profile, frame));
        }
        locations.insert(loc.id, frames);
    }

    for (n, sample) in p.sample.iter().enumerate() {
        if sample.value.len() != p.sample_type.len() {
            return Err(invalid(format!(
                "sample {n} has {} values for {} sample types",
                sample.value.len(),
                p.sample_type.len()
            )));
        }
        let value = u64::try_from(sample.value[0]).map_err(|_| invalid(format!("sample {n} has a negative value")))?;
        let mut frames = Vec::new();
        for id in &sample.location_id {
            let loc = locations.get(id).ok_or_else(|| invalid(format!("sample {n} has unknown location {id}")))?;
            frames.extend_from_slice(loc);
        }
        let (mut pid, mut tid, mut process_name, mut thread_name) = (0, 0, None, None);
        let mut labels = Vec::new();
        for l in &sample.label {
            match s(l.key)? {
                "pid" => pid = u32::try_from(l.num).unwrap_or(0),
                "tid" => tid = u32::try_from(l.num).unwrap_or(0),
                "process_name" => process_name = Some(s(l.str)?.to_owned()),
                "thread_name" => thread_name = Some(s(l.str)?.to_owned()),
                // Other string labels (`state = still_blocked`) are kept.
                key if l.str != 0 => labels.push((key.to_owned(), s(l.str)?.to_owned())),
                _ => {}
            }
        }
        profile.samples.push(Sample {
            pid,
            tid,
            process_name: process_name.unwrap_or_else(|| "[unknown]".to_owned()),
            thread_name: thread_name.unwrap_or_default(),
            cpu: None,
            frames,
            value,
            labels,
        });
    }
    Ok(profile)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::testutil::on_cpu_profile;
    use crate::export::{folded, pprof};
    use proptest::prelude::*;

    #[test]
    fn round_trip_keeps_the_folded_view() {
        let (p, _) = on_cpu_profile();
        let back = read(&pprof::to_gzip(&p).unwrap()).unwrap();
        assert_eq!(folded::encode(&back), folded::encode(&p));
        assert_eq!(back.value_type, p.value_type);
        assert_eq!(back.period_type, p.period_type);
        assert_eq!(back.period, p.period);
        assert_eq!(back.total(), p.total());
        // Plain (not gzipped) bytes read the same.
        assert_eq!(folded::encode(&read(&pprof::to_bytes(&p)).unwrap()), folded::encode(&p));
    }

    #[test]
    fn bad_references_are_errors() {
        let (p, _) = on_cpu_profile();
        let good = pprof::encode(&p);
        let mut bad = good.clone();
        bad.sample[0].location_id.push(999);
        assert!(read(&bad.encode_to_vec()).unwrap_err().to_string().contains("unknown location 999"));
        let mut bad = good.clone();
        bad.function[0].name = 10_000;
        assert!(read(&bad.encode_to_vec()).unwrap_err().to_string().contains("string index 10000"));
        let mut bad = good.clone();
        bad.sample[0].value.pop();
        assert!(read(&bad.encode_to_vec()).unwrap_err().to_string().contains("values for 2 sample types"));
        let mut bad = good.clone();
        bad.sample[0].value[0] = -1;
        assert!(read(&bad.encode_to_vec()).unwrap_err().to_string().contains("negative"));
        let mut bad = good;
        bad.sample_type.clear();
        assert!(read(&bad.encode_to_vec()).is_err());
        assert!(matches!(read(&[0x1f, 0x8b, 1, 2, 3]), Err(ReadError::Gzip(_))));
        assert!(read(b"\xff\xff\xff garbage").is_err());
    }

    proptest! {
        #[test]
        fn never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = read(&bytes);
        }

        #[test]
        fn never_panics_on_mutated_profiles(flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8)) {
            let (p, _) = on_cpu_profile();
            let mut bytes = pprof::to_bytes(&p);
            for (at, v) in flips {
                let i = at % bytes.len();
                bytes[i] ^= v;
            }
            let _ = read(&bytes);
        }

        #[test]
        fn never_panics_on_arbitrary_messages(
            ids in proptest::collection::vec(0u64..6, 0..6),
            strs in proptest::collection::vec(-2i64..12, 0..6),
            values in proptest::collection::vec(-3i64..5, 0..4),
        ) {
            let (p, _) = on_cpu_profile();
            let mut m = pprof::encode(&p);
            for (i, id) in ids.iter().enumerate() {
                if let Some(s) = m.sample.get_mut(i) { s.location_id.push(*id); }
                if let Some(l) = m.location.get_mut(i) { l.mapping_id = *id; }
            }
            for (i, st) in strs.iter().enumerate() {
                if let Some(f) = m.function.get_mut(i) { f.name = *st; }
                if let Some(l) = m.sample.get_mut(i).and_then(|s| s.label.first_mut()) { l.key = *st; l.str = *st; }
            }
            if let Some(s) = m.sample.first_mut() { s.value = values; }
            let _ = to_profile(&m);
        }
    }
}
