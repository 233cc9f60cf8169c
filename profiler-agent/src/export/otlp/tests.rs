//! Encoding tests on the shared fixture (kernel frame, inline chain,
//! unsymbolized and unknown frames, build ids) plus a second process and an
//! off-CPU profile, so the dictionary really is shared.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, SystemTime};

use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::profiles::v1development::{self as otlp, ProfilesDictionary};
use proptest::prelude::*;
use prost::Message as _;

use super::*;
use crate::export::testutil::{frame, on_cpu_profile, sample, DURATION_NS, PERIOD, START_SECS};
use crate::profile::{FrameKind, Module, ProcessMeta, Profile, ProfileBuilder, ValueType};

fn meta(pid: u32, name: &str, exe: Option<&str>, container: Option<&str>) -> ProcessMeta {
    ProcessMeta {
        pid,
        name: name.into(),
        exe_path: exe.map(Into::into),
        container_id: container.map(Into::into),
        ..Default::default()
    }
}

/// The fixture's on-CPU profile with a sample of a second process (`db`,
/// pid 200, in a container), and an off-CPU profile of both processes.
fn fixture() -> (Profile, Profile) {
    let (mut cpu, ids) = on_cpu_profile();
    cpu.samples.push(sample(200, 201, "db", "db-io", vec![ids.kernel, ids.main], 4));
    cpu.processes = BTreeMap::from([
        (100, meta(100, "app", Some("/usr/bin/app"), None)),
        (200, meta(200, "db", Some("/opt/db/bin/db (deleted)"), Some("c0ntainer"))),
    ]);

    let start = SystemTime::UNIX_EPOCH + Duration::from_secs(START_SECS);
    let mut off = Profile::new(ValueType::new("off_cpu", "nanoseconds"), None, 0, start);
    off.duration_ns = DURATION_NS;
    let mut b = ProfileBuilder::default();
    // Same modules as the on-CPU profile but in another order: module indices
    // differ per profile, the dictionary must still hold each mapping once.
    let app = b.module(&mut off, Module { path: "/usr/bin/app".into(), build_id: Some("deadbeef01".into()) });
    let kernel = b.module(&mut off, Module { path: "[kernel.kallsyms]".into(), build_id: None });
    let schedule = b.frame(&mut off, frame("schedule", FrameKind::Kernel, Some(kernel), 0xffff_ffff_8100_0200));
    let main = frame("main", FrameKind::User, Some(app), 0x1000);
    let main = b.frame(&mut off, crate::profile::Frame { file: Some("src/main.rs".into()), line: Some(5), ..main });
    off.samples = vec![
        sample(100, 101, "app", "worker", vec![schedule, main], 5_000_000),
        sample(200, 201, "db", "db-io", vec![schedule, main], 7_000_000),
    ];
    off.processes = cpu.processes.clone();
    (cpu, off)
}

fn agent() -> Resource {
    Resource {
        host_name: "host-1".into(),
        service_name_override: None,
        extra_attributes: vec![("deployment.environment".into(), "test".into()), ("process.pid".into(), "1".into())],
    }
}

fn request() -> ExportProfilesServiceRequest {
    let (cpu, off) = fixture();
    encode(&[&cpu, &off], &agent())
}

fn dict(req: &ExportProfilesServiceRequest) -> &ProfilesDictionary {
    req.dictionary.as_ref().expect("dictionary")
}

fn s(d: &ProfilesDictionary, i: i32) -> &str {
    &d.string_table[usize::try_from(i).expect("non-negative")]
}

fn show(v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        other => panic!("unexpected attribute value {other:?}"),
    }
}

/// `key=value` of dictionary attributes.
fn attrs(d: &ProfilesDictionary, indices: &[i32]) -> Vec<String> {
    indices
        .iter()
        .map(|&i| {
            let kv = &d.attribute_table[i as usize];
            format!("{}={}", s(d, kv.key_strindex), show(&kv.value))
        })
        .collect()
}

/// Per location of the sample's stack (leaf first): (function, line) per line.
fn stack(d: &ProfilesDictionary, sample: &otlp::Sample) -> Vec<Vec<(String, i64)>> {
    let locations = &d.stack_table[sample.stack_index as usize].location_indices;
    let line = |l: &otlp::Line| (s(d, d.function_table[l.function_index as usize].name_strindex).to_owned(), l.line);
    locations.iter().map(|&i| d.location_table[i as usize].lines.iter().map(line).collect()).collect()
}

/// Zero value first, no duplicates, every reference in range.
fn check_dictionary(req: &ExportProfilesServiceRequest) {
    let d = dict(req);
    assert_eq!(d.string_table[0], "");
    assert_eq!(d.mapping_table[0], Default::default());
    assert_eq!(d.location_table[0], Default::default());
    assert_eq!(d.function_table[0], Default::default());
    assert_eq!(d.link_table, [Default::default()], "only the zero link");
    assert_eq!(d.attribute_table[0], Default::default());
    assert_eq!(d.stack_table[0], Default::default());

    fn unique<T: prost::Message>(name: &str, items: &[T]) {
        let set: HashSet<Vec<u8>> = items.iter().map(|i| i.encode_to_vec()).collect();
        assert_eq!(set.len(), items.len(), "duplicates in {name}");
    }
    assert_eq!(d.string_table.iter().collect::<HashSet<_>>().len(), d.string_table.len(), "duplicate strings");
    unique("mapping_table", &d.mapping_table);
    unique("location_table", &d.location_table);
    unique("function_table", &d.function_table);
    unique("attribute_table", &d.attribute_table);
    unique("stack_table", &d.stack_table);

    let check = |what: &str, i: i32, len: usize| assert!(usize::try_from(i).is_ok_and(|i| i < len), "{what} {i}");
    let (strings, attributes) = (d.string_table.len(), d.attribute_table.len());
    for m in &d.mapping_table {
        check("mapping filename", m.filename_strindex, strings);
        m.attribute_indices.iter().for_each(|&a| check("mapping attribute", a, attributes));
    }
    for l in &d.location_table {
        check("location mapping", l.mapping_index, d.mapping_table.len());
        l.attribute_indices.iter().for_each(|&a| check("location attribute", a, attributes));
        l.lines.iter().for_each(|x| check("line function", x.function_index, d.function_table.len()));
    }
    for f in &d.function_table {
        for i in [f.name_strindex, f.system_name_strindex, f.filename_strindex] {
            check("function string", i, strings);
        }
    }
    for a in &d.attribute_table {
        check("attribute key", a.key_strindex, strings);
        check("attribute unit", a.unit_strindex, strings);
    }
    for st in &d.stack_table {
        st.location_indices.iter().for_each(|&i| check("stack location", i, d.location_table.len()));
    }
    for p in req.resource_profiles.iter().flat_map(|r| &r.scope_profiles).flat_map(|s| &s.profiles) {
        for t in p.sample_type.iter().chain(&p.period_type) {
            check("value type", t.type_strindex, strings);
            check("value unit", t.unit_strindex, strings);
        }
        for sample in &p.samples {
            check("sample stack", sample.stack_index, d.stack_table.len());
            check("sample link", sample.link_index, d.link_table.len());
            sample.attribute_indices.iter().for_each(|&a| check("sample attribute", a, attributes));
            assert_eq!(sample.values.len(), 1);
        }
    }
}

#[test]
fn dictionary_is_well_formed_and_round_trips() {
    let req = request();
    check_dictionary(&req);
    let bytes = req.encode_to_vec();
    assert_eq!(ExportProfilesServiceRequest::decode(bytes.as_slice()).expect("decode"), req);
}

#[test]
fn one_resource_per_process_with_required_attributes() {
    let req = request();
    let resources: Vec<Vec<String>> = req
        .resource_profiles
        .iter()
        .map(|r| {
            r.resource
                .as_ref()
                .expect("resource")
                .attributes
                .iter()
                .map(|kv| format!("{}={}", kv.key, show(&kv.value)))
                .collect()
        })
        .collect();
    assert_eq!(
        resources,
        [
            vec![
                "service.name=app",
                "process.pid=100",
                "process.executable.name=app",
                "process.executable.path=/usr/bin/app",
                "host.name=host-1",
                "deployment.environment=test",
            ],
            vec![
                "service.name=db",
                "process.pid=200",
                "process.executable.name=db",
                "process.executable.path=/opt/db/bin/db (deleted)",
                "container.id=c0ntainer",
                "host.name=host-1",
                "deployment.environment=test",
            ],
        ],
        "a configured process.pid does not replace the real one"
    );
    for r in &req.resource_profiles {
        assert_eq!(r.scope_profiles.len(), 1);
        let scope = r.scope_profiles[0].scope.as_ref().expect("scope");
        assert_eq!((scope.name.as_str(), scope.version.as_str()), ("profiler-agent", env!("CARGO_PKG_VERSION")));
        assert_eq!(r.scope_profiles[0].profiles.len(), 2, "on-CPU and off-CPU");
    }
}

#[test]
fn service_name_override_and_fallbacks() {
    let (cpu, _) = fixture();
    let mut agent = agent();
    agent.extra_attributes.push(("service.name".into(), "from-extras".into()));
    let service = |req: &ExportProfilesServiceRequest| -> Vec<String> {
        let first = |r: &otlp::ResourceProfiles| show(&r.resource.as_ref().expect("resource").attributes[0].value);
        req.resource_profiles.iter().map(first).collect()
    };
    assert_eq!(service(&encode(&[&cpu], &agent)), ["from-extras", "from-extras"]);
    agent.service_name_override = Some("shop".into());
    assert_eq!(service(&encode(&[&cpu], &agent)), ["shop", "shop"]);

    // No metadata at all: the sample's process name still names the service.
    let mut bare = cpu.clone();
    bare.processes.clear();
    assert_eq!(service(&encode(&[&bare], &Resource::default())), ["app", "db"]);
}

#[test]
fn sample_types_periods_and_times() {
    let req = request();
    let d = dict(&req);
    let profiles = &req.resource_profiles[0].scope_profiles[0].profiles;
    let vt = |t: &Option<otlp::ValueType>| t.map(|t| (s(d, t.type_strindex), s(d, t.unit_strindex)));
    assert_eq!(vt(&profiles[0].sample_type), Some(("samples", "count")));
    assert_eq!(vt(&profiles[0].period_type), Some(("cpu", "nanoseconds")));
    assert_eq!(profiles[0].period, PERIOD as i64);
    assert_eq!(vt(&profiles[1].sample_type), Some(("off_cpu", "nanoseconds")));
    assert_eq!((vt(&profiles[1].period_type), profiles[1].period), (None, 0));
    for p in profiles {
        assert_eq!((p.time_unix_nano, p.duration_nano), (START_SECS * 1_000_000_000, DURATION_NS));
    }
}

#[test]
fn samples_values_threads_and_stacks() {
    let req = request();
    let d = dict(&req);
    let app_cpu = &req.resource_profiles[0].scope_profiles[0].profiles[0];
    assert_eq!(app_cpu.samples.len(), 3, "the zero-value sample is skipped");
    let values: Vec<i64> = app_cpu.samples.iter().map(|s| s.values[0]).collect();
    assert_eq!(values, [3, 2, 1]);
    assert_eq!(
        attrs(d, &app_cpu.samples[0].attribute_indices),
        ["thread.name=app", "thread.id=100", "cpu.logical_number=1"]
    );
    assert_eq!(
        attrs(d, &app_cpu.samples[1].attribute_indices),
        ["thread.name=worker", "thread.id=101", "cpu.logical_number=1"]
    );

    let named = |v: &[(&str, i64)]| v.iter().map(|&(n, l)| (n.to_owned(), l)).collect::<Vec<_>>();
    // The inline chain is one location, innermost first, owner last.
    assert_eq!(
        stack(d, &app_cpu.samples[0]),
        [named(&[("inner_inline", 10), ("mid_inline", 20), ("outer", 30)]), named(&[("main", 5)])]
    );
    assert_eq!(
        stack(d, &app_cpu.samples[1]),
        [
            named(&[("do_syscall_64", 0)]),
            named(&[("libc.so.6+0x1234", 0)]),
            named(&[("worker_loop", 7)]),
            named(&[("main", 5)])
        ]
    );
    assert_eq!(stack(d, &app_cpu.samples[2]), [named(&[("[unknown]", 0)]), named(&[("main", 5)])]);

    let db_off = &req.resource_profiles[1].scope_profiles[0].profiles[1];
    assert_eq!(db_off.samples[0].values, [7_000_000]);
    // The shared fixture gives every sample a CPU; real off-CPU samples have none.
    assert_eq!(
        attrs(d, &db_off.samples[0].attribute_indices),
        ["thread.name=db-io", "thread.id=201", "cpu.logical_number=1"]
    );
    assert_eq!(stack(d, &db_off.samples[0]), [named(&[("schedule", 0)]), named(&[("main", 5)])]);
}

#[test]
fn mappings_build_ids_and_frame_types() {
    let req = request();
    let d = dict(&req);
    let mappings: Vec<(&str, Vec<String>)> =
        d.mapping_table[1..].iter().map(|m| (s(d, m.filename_strindex), attrs(d, &m.attribute_indices))).collect();
    assert_eq!(
        mappings,
        [
            ("/usr/bin/app", vec!["process.executable.build_id.gnu=deadbeef01".to_owned()]),
            ("[kernel.kallsyms]", vec![]),
            ("/usr/lib/libc.so.6", vec!["process.executable.build_id.gnu=c0ffee".to_owned()]),
        ],
        "each module once, though the two profiles number them differently"
    );
    for l in &d.location_table[1..] {
        let mapping = s(d, d.mapping_table[l.mapping_index as usize].filename_strindex);
        let expected =
            if mapping == "[kernel.kallsyms]" { "profile.frame.type=kernel" } else { "profile.frame.type=native" };
        assert_eq!(attrs(d, &l.attribute_indices), [expected], "{mapping}");
    }
    let inline = d.location_table.iter().find(|l| l.lines.len() == 3).expect("inline location");
    assert_eq!(inline.address, 0x1100);
    let unknown = d.location_table.iter().find(|l| l.mapping_index == 0 && !l.lines.is_empty()).expect("unknown");
    assert_eq!(unknown.address, 0);
}

#[test]
fn process_with_only_zero_samples_and_malformed_frames() {
    let mut p = Profile::new(ValueType::new("samples", "count"), None, 0, SystemTime::UNIX_EPOCH);
    // A dangling inline frame (no owner) and an out-of-range index.
    p.frames = vec![frame("inl", FrameKind::Inlined, Some(5), 0x10)];
    p.samples = vec![sample(1, 1, "p", "p", vec![42, 0], 1), sample(2, 2, "q", "q", vec![0], 0)];
    let req = encode(&[&p], &Resource::default());
    check_dictionary(&req);
    assert_eq!(req.resource_profiles.len(), 1, "pid 2 has no weight");
    let d = dict(&req);
    let sample = &req.resource_profiles[0].scope_profiles[0].profiles[0].samples[0];
    assert_eq!(stack(d, sample), [vec![("[unknown]".to_owned(), 0)], vec![("inl".to_owned(), 0)]]);
    assert_eq!(d.mapping_table.len(), 1, "module index out of range: no mapping");
}

#[test]
fn jit_frames_carry_their_runtime_as_frame_type_and_their_source() {
    use crate::profile::JitRuntime;
    let mut p = Profile::new(ValueType::new("samples", "count"), None, 0, SystemTime::UNIX_EPOCH);
    let js = crate::profile::Frame {
        file: Some("/srv/w.js".into()),
        line: Some(3),
        ..frame("JS:*hot", FrameKind::Jit(JitRuntime::V8), None, 0x7f00)
    };
    p.frames = vec![js, frame("Hot.spin()", FrameKind::Jit(JitRuntime::Other), None, 0x8f00)];
    p.samples = vec![sample(1, 1, "p", "p", vec![0, 1], 1)];
    let req = encode(&[&p], &Resource::default());
    check_dictionary(&req);
    let d = dict(&req);
    let types: Vec<Vec<String>> = d.location_table[1..].iter().map(|l| attrs(d, &l.attribute_indices)).collect();
    assert_eq!(types, [vec!["profile.frame.type=v8js".to_owned()], vec!["profile.frame.type=jit".to_owned()]]);
    let f = d.function_table.iter().find(|f| s(d, f.name_strindex) == "JS:*hot").expect("function");
    assert_eq!(s(d, f.filename_strindex), "/srv/w.js");
}

#[test]
fn duplicate_samples_are_merged() {
    let (mut cpu, _) = fixture();
    let dup = cpu.samples[0].clone();
    cpu.samples.push(dup);
    let req = encode(&[&cpu], &Resource::default());
    assert_eq!(req.resource_profiles[0].scope_profiles[0].profiles[0].samples[0].values, [6]);
}

#[test]
fn empty_input_is_an_empty_request() {
    let req = encode(&[], &agent());
    assert!(req.resource_profiles.is_empty());
    check_dictionary(&req);
}

proptest! {
    /// Any mix of frames, modules and samples keeps the dictionary valid.
    #[test]
    fn dictionary_invariants_hold(
        frames in prop::collection::vec((0usize..6, 0u8..3, prop::option::of(0usize..4), 0u64..4), 0..12),
        samples in prop::collection::vec((1u32..4, prop::collection::vec(0usize..14, 0..6), 0u64..5), 0..12),
    ) {
        let mut p = Profile::new(ValueType::new("samples", "count"), None, 0, SystemTime::UNIX_EPOCH);
        p.modules = (0..3).map(|i| Module { path: format!("/m{i}"), build_id: (i > 0).then(|| format!("b{i}")) }).collect();
        p.frames = frames
            .into_iter()
            .map(|(name, kind, module, addr)| {
                let kind = [FrameKind::User, FrameKind::Inlined, FrameKind::Kernel][kind as usize];
                frame(&format!("f{name}"), kind, module, addr)
            })
            .collect();
        p.samples = samples.into_iter().map(|(pid, fr, v)| sample(pid, pid, "p", "t", fr, v)).collect();
        let other = p.clone();
        check_dictionary(&encode(&[&p, &other], &agent()));
    }
}
