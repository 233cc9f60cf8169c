use std::collections::HashSet;
use std::io::Read as _;
use std::time::SystemTime;

use flate2::read::GzDecoder;
use prost::Message as _;

use super::*;
use crate::export::testutil::{frame, on_cpu_profile, sample, DURATION_NS, PERIOD, START_SECS};
use crate::profile::ValueType;

/// Round-trips through the gzip bytes, the way a consumer reads them.
fn decode_gzip(p: &Profile) -> proto::Profile {
    let gz = to_gzip(p).expect("gzip");
    let mut raw = Vec::new();
    GzDecoder::new(gz.as_slice()).read_to_end(&mut raw).expect("gunzip");
    proto::Profile::decode(raw.as_slice()).expect("decode")
}

fn s(p: &proto::Profile, i: i64) -> &str {
    &p.string_table[usize::try_from(i).expect("non-negative string index")]
}

fn label<'p>(p: &'p proto::Profile, sample: &'p proto::Sample, key: &str) -> &'p proto::Label {
    sample.label.iter().find(|l| s(p, l.key) == key).unwrap_or_else(|| panic!("label {key}"))
}

fn location(p: &proto::Profile, id: u64) -> &proto::Location {
    &p.location[usize::try_from(id - 1).expect("id fits")]
}

/// (function name, line) per line of a location, innermost first.
fn lines(p: &proto::Profile, id: u64) -> Vec<(&str, i64)> {
    location(p, id).line.iter().map(|l| (s(p, p.function[(l.function_id - 1) as usize].name), l.line)).collect()
}

fn mapping_file(p: &proto::Profile, loc: &proto::Location) -> String {
    match loc.mapping_id {
        0 => String::new(),
        id => s(p, p.mapping[(id - 1) as usize].filename).to_owned(),
    }
}

#[test]
fn round_trip_matches_direct_encoding() {
    let (p, _) = on_cpu_profile();
    assert_eq!(decode_gzip(&p), encode(&p));
    assert_eq!(to_bytes(&p), encode(&p).encode_to_vec());
}

#[test]
fn header_fields_and_string_table() {
    let (p, _) = on_cpu_profile();
    let pp = decode_gzip(&p);
    assert_eq!(pp.string_table[0], "");
    let unique: HashSet<&String> = pp.string_table.iter().collect();
    assert_eq!(unique.len(), pp.string_table.len(), "strings are deduplicated");

    let types: Vec<(&str, &str)> = pp.sample_type.iter().map(|t| (s(&pp, t.r#type), s(&pp, t.unit))).collect();
    assert_eq!(types, [("samples", "count"), ("cpu", "nanoseconds")]);
    let period_type = pp.period_type.as_ref().expect("period type");
    assert_eq!((s(&pp, period_type.r#type), s(&pp, period_type.unit)), ("cpu", "nanoseconds"));
    assert_eq!(pp.period, PERIOD as i64);
    assert_eq!(s(&pp, pp.default_sample_type), "cpu");
    assert_eq!(pp.time_nanos, START_SECS as i64 * 1_000_000_000);
    assert_eq!(pp.duration_nanos, DURATION_NS as i64);
}

#[test]
fn every_reference_is_in_range() {
    let (p, _) = on_cpu_profile();
    let pp = decode_gzip(&p);
    let strings = pp.string_table.len() as i64;
    let in_table = |i: i64| (0..strings).contains(&i);

    for (i, m) in pp.mapping.iter().enumerate() {
        assert_eq!(m.id, i as u64 + 1);
        assert!(in_table(m.filename) && in_table(m.build_id));
    }
    for (i, f) in pp.function.iter().enumerate() {
        assert_eq!(f.id, i as u64 + 1);
        assert!(in_table(f.name) && in_table(f.system_name) && in_table(f.filename));
    }
    for (i, l) in pp.location.iter().enumerate() {
        assert_eq!(l.id, i as u64 + 1);
        assert!(l.mapping_id <= pp.mapping.len() as u64);
        assert!(!l.line.is_empty());
        for line in &l.line {
            assert!((1..=pp.function.len() as u64).contains(&line.function_id));
        }
    }
    for sample in &pp.sample {
        assert_eq!(sample.value.len(), pp.sample_type.len());
        for &id in &sample.location_id {
            assert!((1..=pp.location.len() as u64).contains(&id));
        }
        for l in &sample.label {
            assert!(in_table(l.key) && in_table(l.str) && in_table(l.num_unit));
        }
    }
    let ids: HashSet<_> = pp
        .location
        .iter()
        .map(|l| {
            let lines: Vec<(u64, i64)> = l.line.iter().map(|x| (x.function_id, x.line)).collect();
            (l.mapping_id, l.address, lines)
        })
        .collect();
    assert_eq!(ids.len(), pp.location.len(), "locations are deduplicated");
}

#[test]
fn samples_values_and_labels() {
    let (p, _) = on_cpu_profile();
    let pp = decode_gzip(&p);
    assert_eq!(pp.sample.len(), 3, "the zero-value sample is skipped");
    let values: Vec<&[i64]> = pp.sample.iter().map(|s| s.value.as_slice()).collect();
    assert_eq!(values, [&[3, 3 * PERIOD as i64][..], &[2, 2 * PERIOD as i64], &[1, PERIOD as i64]]);
    for sample in &pp.sample {
        assert_eq!(sample.value[1], sample.value[0] * pp.period);
    }

    let (main_thread, worker) = (&pp.sample[0], &pp.sample[1]);
    assert_eq!(label(&pp, main_thread, "pid").num, 100);
    assert_eq!(label(&pp, main_thread, "tid").num, 100);
    assert_eq!(s(&pp, label(&pp, main_thread, "thread_name").str), "app");
    assert_eq!(s(&pp, label(&pp, main_thread, "process_name").str), "app");
    assert_eq!(label(&pp, worker, "pid").num, 100);
    assert_eq!(label(&pp, worker, "tid").num, 101);
    assert_eq!(s(&pp, label(&pp, worker, "thread_name").str), "worker");
    assert_eq!(s(&pp, label(&pp, worker, "process_name").str), "app");
}

#[test]
fn locations_fold_inline_chains_leaf_first() {
    let (p, _) = on_cpu_profile();
    let pp = decode_gzip(&p);

    // inner_inline, mid_inline, outer, main: the chain is one location.
    let ids = &pp.sample[0].location_id;
    assert_eq!(ids.len(), 2);
    assert_eq!(lines(&pp, ids[0]), [("inner_inline", 10), ("mid_inline", 20), ("outer", 30)]);
    assert_eq!(location(&pp, ids[0]).address, 0x1100);
    assert_eq!(mapping_file(&pp, location(&pp, ids[0])), "/usr/bin/app");
    assert_eq!(lines(&pp, ids[1]), [("main", 5)]);

    // do_syscall_64 [k], libc+0x1234, worker_loop, main.
    let ids = &pp.sample[1].location_id;
    let names: Vec<_> = ids.iter().map(|&id| lines(&pp, id)).collect();
    assert_eq!(
        names,
        [vec![("do_syscall_64", 0)], vec![("libc.so.6+0x1234", 0)], vec![("worker_loop", 7)], vec![("main", 5)],]
    );
    assert_eq!(ids[3], pp.sample[0].location_id[1], "main's location is shared");
    let kernel = location(&pp, ids[0]);
    assert_eq!(kernel.address, 0xffff_ffff_8100_0010);
    assert_eq!(mapping_file(&pp, kernel), "[kernel.kallsyms]");
    let libc = location(&pp, ids[1]);
    assert_eq!((libc.address, mapping_file(&pp, libc).as_str()), (0x1234, "/usr/lib/libc.so.6"));

    // [unknown], main: no mapping.
    let unknown = location(&pp, pp.sample[2].location_id[0]);
    assert_eq!(unknown.mapping_id, 0);
    assert_eq!(lines(&pp, unknown.id), [("[unknown]", 0)]);
    assert_eq!(pp.location.len(), 6);
}

#[test]
fn mappings_and_functions() {
    let (p, _) = on_cpu_profile();
    let pp = decode_gzip(&p);
    let m: Vec<_> = pp
        .mapping
        .iter()
        .map(|m| {
            let flags = (m.has_functions, m.has_filenames, m.has_line_numbers, m.has_inline_frames);
            (s(&pp, m.filename), s(&pp, m.build_id), flags)
        })
        .collect();
    assert_eq!(
        m,
        [
            ("[kernel.kallsyms]", "", (true, false, false, false)),
            ("/usr/bin/app", "deadbeef01", (true, true, true, true)),
            ("/usr/lib/libc.so.6", "c0ffee", (false, false, false, false)),
        ]
    );
    let outer = pp.function.iter().find(|f| s(&pp, f.name) == "outer").expect("outer");
    assert_eq!(s(&pp, outer.system_name), "outer");
    assert_eq!(s(&pp, outer.filename), "src/a.rs");
    let unknown = pp.function.iter().find(|f| s(&pp, f.name) == "[unknown]").expect("unknown");
    assert_eq!(s(&pp, unknown.filename), "");
    assert_eq!(pp.function.len(), 8);
}

#[test]
fn exact_profile_has_one_sample_type_and_no_period() {
    let mut p = Profile::new(ValueType::new("off_cpu", "nanoseconds"), None, 0, SystemTime::UNIX_EPOCH);
    p.frames = vec![frame("wait", FrameKind::User, None, 0)];
    p.samples = vec![sample(1, 1, "p", "p", vec![0], 1234)];
    let pp = decode_gzip(&p);
    assert_eq!(pp.sample_type.len(), 1);
    assert_eq!(s(&pp, pp.sample_type[0].r#type), "off_cpu");
    assert_eq!(pp.period_type, None);
    assert_eq!((pp.period, pp.default_sample_type, pp.time_nanos), (0, 0, 0));
    assert_eq!(pp.sample[0].value, [1234]);
}

#[test]
fn malformed_frames_do_not_panic() {
    let mut p = Profile::new(ValueType::new("samples", "count"), None, 0, SystemTime::UNIX_EPOCH);
    // A dangling inline frame (no owner) and an out-of-range index.
    p.frames = vec![frame("inl", FrameKind::Inlined, Some(5), 0x10)];
    p.samples = vec![sample(1, 1, "p", "p", vec![42, 0], 1)];
    let pp = decode_gzip(&p);
    let ids = &pp.sample[0].location_id;
    assert_eq!(lines(&pp, ids[0]), [("[unknown]", 0)]);
    assert_eq!(lines(&pp, ids[1]), [("inl", 0)]);
    assert_eq!(location(&pp, ids[1]).mapping_id, 0, "module index out of range");
}
