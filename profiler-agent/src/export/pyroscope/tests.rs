//! Encoding: series per process and kind, labels as Pyroscope validates
//! them, pprof that holds only its own process, and the wire tags.

use std::collections::HashSet;
use std::io::Read as _;
use std::time::{Duration, SystemTime};

use flate2::read::GzDecoder;
use prost::Message as _;

use super::*;
use crate::export::pprof::proto as pp;
use crate::export::testutil::{frame, sample, PERIOD};
use crate::profile::{FrameKind, Module, ProfileBuilder, ValueType};

/// A profile of `app` (pid 10, two threads) and `db` (pid 20, in a
/// container), each with its own binary, plus a pid 30 whose only sample
/// is zero and a pid 40 missing from `processes`.
fn two_process_profile(value_type: ValueType, period_type: Option<ValueType>) -> Profile {
    let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let mut p = Profile::new(value_type, period_type, PERIOD, start);
    p.duration_ns = 10_000_000_000;
    let mut b = ProfileBuilder::default();
    let app = b.module(&mut p, Module { path: "/usr/bin/app".into(), build_id: Some("aa".into()) });
    let db = b.module(&mut p, Module { path: "/usr/sbin/db".into(), build_id: None });
    let kernel = b.module(&mut p, Module { path: "[kernel.kallsyms]".into(), build_id: None });
    let mut f = |name: &str, kind, module| b.frame(&mut p, frame(name, kind, Some(module), 0x10));
    let (app_main, app_spin) = (f("app_main", FrameKind::User, app), f("app_spin", FrameKind::User, app));
    let (db_main, db_io) = (f("db_main", FrameKind::User, db), f("db_io", FrameKind::User, db));
    let read = f("ksys_read", FrameKind::Kernel, kernel);
    p.samples = vec![
        sample(10, 10, "app", "app", vec![app_spin, app_main], 5),
        sample(20, 21, "db", "io", vec![read, db_io, db_main], 7),
        sample(10, 11, "app", "w1", vec![app_main], 2),
        sample(30, 30, "idle", "idle", vec![app_main], 0),
        sample(40, 40, "gone", "gone", vec![99, db_main], 1),
    ];
    for (pid, name, exe, container) in [
        (10, "app", Some("/usr/bin/app"), None),
        (20, "db", Some("/usr/sbin/db"), Some("c0ffee")),
        (30, "idle", None, None),
    ] {
        let meta = ProcessMeta {
            pid,
            name: name.into(),
            exe_path: exe.map(Into::into),
            container_id: container.map(Into::into),
            ..Default::default()
        };
        p.processes.insert(pid, meta);
    }
    p
}

fn cpu() -> Profile {
    two_process_profile(ValueType::new("samples", "count"), Some(ValueType::new("cpu", "nanoseconds")))
}

fn off_cpu() -> Profile {
    two_process_profile(ValueType::new("off_cpu", "nanoseconds"), None)
}

fn host() -> PushLabels {
    PushLabels { host_name: "node-1".into(), ..Default::default() }
}

fn label<'s>(series: &'s RawProfileSeries, name: &str) -> Option<&'s str> {
    series.labels.iter().find(|l| l.name == name).map(|l| l.value.as_str())
}

fn pprof_of(series: &RawProfileSeries) -> pp::Profile {
    assert_eq!(series.samples.len(), 1);
    let mut raw = Vec::new();
    GzDecoder::new(series.samples[0].raw_profile.as_slice()).read_to_end(&mut raw).expect("gzipped");
    pp::Profile::decode(raw.as_slice()).expect("pprof")
}

fn is_valid_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[test]
fn one_series_per_process_and_kind() {
    let (on, off) = (cpu(), off_cpu());
    let req = encode(&[&on, &off], &host()).expect("encode");
    let keys: Vec<(&str, &str, &str)> = req
        .series
        .iter()
        .map(|s| (label(s, "__name__").unwrap(), label(s, "pid").unwrap(), label(s, "service_name").unwrap()))
        .collect();
    assert_eq!(
        keys,
        [
            ("process_cpu", "10", "app"),
            ("process_cpu", "20", "db"),
            ("process_cpu", "40", "gone"),
            ("off_cpu", "10", "app"),
            ("off_cpu", "20", "db"),
            ("off_cpu", "40", "gone"),
        ],
        "pid 30 has only a zero sample"
    );
    let ids: HashSet<&str> = req.series.iter().map(|s| s.samples[0].id.as_str()).collect();
    assert_eq!(ids.len(), req.series.len(), "profile ids are unique");
    assert!(ids.iter().all(|id| id.len() == 36 && id.as_bytes()[14] == b'4'), "{ids:?}");
}

#[test]
fn labels_are_valid_sorted_and_complete() {
    let labels = PushLabels {
        extra: vec![
            ("k8s.pod.name".into(), "pod-1".into()),
            ("1zone".into(), "a".into()),
            ("pid".into(), "spoofed".into()),
            ("__name__".into(), "spoofed".into()),
            ("empty".into(), String::new()),
            (String::new(), "nameless".into()),
        ],
        ..host()
    };
    let req = encode(&[&cpu()], &labels).expect("encode");
    for s in &req.series {
        let names: Vec<&str> = s.labels.iter().map(|l| l.name.as_str()).collect();
        assert!(names.windows(2).all(|w| w[0] < w[1]), "sorted and unique: {names:?}");
        assert!(names.iter().all(|n| is_valid_label_name(n)), "{names:?}");
        assert!(s.labels.iter().all(|l| !l.value.is_empty()), "{:?}", s.labels);
    }
    let db = &req.series[1];
    let pairs: Vec<(&str, &str)> = db.labels.iter().map(|l| (l.name.as_str(), l.value.as_str())).collect();
    assert_eq!(
        pairs,
        [
            ("_1zone", "a"),
            ("__name__", "process_cpu"),
            ("container_id", "c0ffee"),
            ("host_name", "node-1"),
            ("k8s_pod_name", "pod-1"),
            ("pid", "20"),
            ("process_name", "db"),
            ("service_name", "db"),
        ]
    );
    assert_eq!(label(&req.series[0], "container_id"), None, "app runs on the host");
}

#[test]
fn service_name_override_and_fallbacks() {
    let labels = PushLabels { service_name_override: Some("checkout".into()), ..Default::default() };
    let req = encode(&[&cpu()], &labels).expect("encode");
    assert!(req.series.iter().all(|s| label(s, "service_name") == Some("checkout")));
    assert!(req.series.iter().all(|s| label(s, "host_name").is_none()), "empty host name is left out");

    let mut p = cpu();
    p.processes.get_mut(&10).unwrap().exe_path = Some("/opt/bin/app-server".into());
    p.processes.get_mut(&20).unwrap().exe_path = None;
    p.processes.get_mut(&20).unwrap().name = String::new();
    let req = encode(&[&p], &host()).expect("encode");
    let names: Vec<_> = req.series.iter().map(|s| label(s, "service_name").unwrap()).collect();
    assert_eq!(names, ["app-server", "unknown_service:20", "gone"]);
}

#[test]
fn each_pprof_holds_only_its_process() {
    let req = encode(&[&cpu()], &host()).expect("encode");
    let leaves = |p: &pp::Profile| -> Vec<String> {
        let name = |loc: u64| {
            let f = p.location[(loc - 1) as usize].line[0].function_id;
            p.string_table[p.function[(f - 1) as usize].name as usize].clone()
        };
        p.sample.iter().map(|s| name(s.location_id[0])).collect()
    };
    let strings = |p: &pp::Profile| -> HashSet<String> { p.string_table.iter().cloned().collect() };

    let app = pprof_of(&req.series[0]);
    let types: Vec<(&str, &str)> = app
        .sample_type
        .iter()
        .map(|t| (&*app.string_table[t.r#type as usize], &*app.string_table[t.unit as usize]))
        .collect();
    assert_eq!(types, [("samples", "count"), ("cpu", "nanoseconds")]);
    assert_eq!(app.period, PERIOD as i64);
    assert_eq!(leaves(&app), ["app_spin", "app_main"]);
    assert_eq!(app.sample.iter().map(|s| s.value[0]).sum::<i64>(), 7);
    assert_eq!(app.mapping.len(), 1, "only app's own binary");
    assert!(!strings(&app).contains("db_main") && !strings(&app).contains("/usr/sbin/db"));

    let db = pprof_of(&req.series[1]);
    assert_eq!(leaves(&db), ["ksys_read"]);
    let files: HashSet<&str> = db.mapping.iter().map(|m| &*db.string_table[m.filename as usize]).collect();
    assert_eq!(files, HashSet::from(["/usr/sbin/db", "[kernel.kallsyms]"]));
    assert!(!strings(&db).contains("app_main"));

    // A dangling frame index still shows as unknown rather than as another frame.
    let gone = pprof_of(&req.series[2]);
    assert_eq!(leaves(&gone), ["[unknown]"]);
    assert_eq!(gone.location.len(), 2);
}

#[test]
fn process_profile_remaps_indices() {
    let p = cpu();
    let sub = process_profile(&p, 20);
    assert_eq!(sub.samples.len(), 1);
    assert_eq!(sub.frames.len(), 3);
    let names: Vec<&str> = sub.samples[0].frames.iter().map(|&i| sub.frames[i].function.as_str()).collect();
    assert_eq!(names, ["ksys_read", "db_io", "db_main"]);
    let modules: Vec<&str> = sub.frames.iter().map(|f| sub.modules[f.module.unwrap()].path.as_str()).collect();
    assert_eq!(modules, ["[kernel.kallsyms]", "/usr/sbin/db", "/usr/sbin/db"]);
    assert_eq!((sub.period, sub.duration_ns, sub.start), (p.period, p.duration_ns, p.start));
    assert_eq!(sub.processes.keys().copied().collect::<Vec<_>>(), [20]);
    assert!(process_profile(&p, 12345).samples.is_empty());
}

#[test]
fn profile_names_follow_pyroscope() {
    assert_eq!(profile_name(&cpu()), PROCESS_CPU);
    assert_eq!(profile_name(&off_cpu()), OFF_CPU);
    // Counted samples without a CPU period are not CPU time.
    assert_eq!(profile_name(&two_process_profile(ValueType::new("samples", "count"), None)), "samples");
    assert_eq!(profile_name(&two_process_profile(ValueType::new("wall", "nanoseconds"), None)), "wall");
    assert_eq!(profile_name(&two_process_profile(ValueType::new("", "x"), None)), "unknown");
}

#[test]
fn label_name_sanitizing() {
    let cases = [
        ("service_name", Some("service_name")),
        ("k8s.namespace.name", Some("k8s_namespace_name")),
        ("9lives", Some("_9lives")),
        ("héllo-world", Some("h_llo_world")),
        ("_", Some("_")),
        ("", None),
    ];
    for (input, want) in cases {
        let got = sanitize_label_name(input);
        assert_eq!(got.as_deref(), want, "{input}");
        assert!(got.is_none_or(|n| is_valid_label_name(&n)));
    }
}

#[test]
fn wire_tags_match_upstream() {
    let req = PushRequest {
        series: vec![RawProfileSeries {
            labels: vec![LabelPair::new("a", "b")],
            samples: vec![RawSample { raw_profile: vec![7], id: "i".into() }],
        }],
    };
    // series=1 { labels=1 { name=1 "a", value=2 "b" }, samples=2 { raw_profile=1 [7], ID=2 "i" } }
    let label = [0x0a, 1, b'a', 0x12, 1, b'b'];
    let raw = [0x0a, 1, 7, 0x12, 1, b'i'];
    let mut series = vec![0x0a, label.len() as u8];
    series.extend(label);
    series.extend([0x12, raw.len() as u8]);
    series.extend(raw);
    let mut want = vec![0x0a, series.len() as u8];
    want.extend(series);
    assert_eq!(req.encode_to_vec(), want);
    assert!(proto::PushResponse::default().encode_to_vec().is_empty());
}

#[test]
fn nothing_to_push() {
    let empty = Profile::new(ValueType::new("samples", "count"), None, 0, SystemTime::UNIX_EPOCH);
    assert!(encode(&[&empty], &host()).expect("encode").series.is_empty());
    assert!(encode(&[], &host()).expect("encode").series.is_empty());
}
