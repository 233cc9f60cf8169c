//! Output files: the gzip pprof profile, the flame graph, and `--format`.

use std::time::Duration;

use profiler_integration_tests::agent::{run_command, RECORD_TIMEOUT};
use profiler_integration_tests::pprof;
use profiler_integration_tests::workload::{C_FP_FLAGS, FP_RATIO_C};
use profiler_integration_tests::{agent_bin, record, require_root, RecordOutput, Workload};

/// The few pprof messages (profile.proto) the checks need.
/// Records the fp_ratio workload for 3 s with the given extra arguments.
fn record_fp_ratio(extra: &[&str]) -> (Workload, RecordOutput) {
    require_root();
    let mut w = Workload::c("fp_ratio", FP_RATIO_C, C_FP_FLAGS);
    w.warm_up();
    let pid = w.pid_arg();
    let mut args = vec!["--pid", pid.as_str(), "--duration", "3"];
    args.extend_from_slice(extra);
    let out = record(&args);
    out.assert_success();
    (w, out)
}

fn decode_pprof(out: &RecordOutput) -> pprof::Profile {
    let gz = out.read("cpu.pb.gz");
    assert!(gz.starts_with(&[0x1f, 0x8b]), "cpu.pb.gz is not gzip\n{}", out.context());
    pprof::decode_gz(&gz).unwrap_or_else(|e| panic!("cpu.pb.gz {e}\n{}", out.context()))
}

#[test]
fn pprof_has_sample_types_labels_and_functions() {
    let (w, out) = record_fp_ratio(&[]);
    let prof = decode_pprof(&out);
    let st = &prof.string_table;
    let s = |i: i64| -> &str { st.get(i as usize).map(String::as_str).unwrap_or("<out of range>") };
    assert_eq!(st.first().map(String::as_str), Some(""), "string_table[0] must be \"\"");

    let types: Vec<(&str, &str)> = prof.sample_type.iter().map(|t| (s(t.r#type), s(t.unit))).collect();
    assert!(types.contains(&("samples", "count")), "sample types {types:?} lack samples/count");
    assert!(types.contains(&("cpu", "nanoseconds")), "sample types {types:?} lack cpu/nanoseconds");
    let samples_idx = types.iter().position(|t| *t == ("samples", "count")).unwrap();
    let cpu_idx = types.iter().position(|t| *t == ("cpu", "nanoseconds")).unwrap();

    assert!(!prof.sample.is_empty(), "pprof has no samples");
    for sample in &prof.sample {
        assert_eq!(sample.value.len(), types.len(), "sample values do not match sample types: {sample:?}");
        assert!(!sample.location_id.is_empty(), "sample without locations: {sample:?}");
        for key in ["pid", "tid", "thread_name"] {
            assert!(
                sample.label.iter().any(|l| s(l.key) == key),
                "sample lacks label {key:?}: {sample:?} (labels {:?})",
                sample.label.iter().map(|l| s(l.key)).collect::<Vec<_>>()
            );
        }
        let label = |key: &str| sample.label.iter().find(|l| s(l.key) == key).unwrap();
        assert_eq!(label("pid").num, w.pid() as i64, "pid label of {sample:?}");
        assert_eq!(label("tid").num, w.pid() as i64, "tid label (single-threaded workload)");
        assert_eq!(s(label("thread_name").str), "fp_ratio", "thread_name label");
    }

    // Same data as cpu.folded; cpu time ~ samples x 1e9 / frequency.
    let total_samples: i64 = prof.sample.iter().map(|x| x.value[samples_idx]).sum();
    let total_ns: i64 = prof.sample.iter().map(|x| x.value[cpu_idx]).sum();
    let folded_total = out.folded().total();
    assert_eq!(total_samples as u64, folded_total, "pprof and cpu.folded disagree on sample count");
    let ns_per_sample = total_ns as f64 / total_samples as f64;
    let nominal = 1e9 / 99.0;
    assert!(
        (0.5 * nominal..=2.0 * nominal).contains(&ns_per_sample),
        "cpu/nanoseconds per sample is {ns_per_sample:.0}, expected about {nominal:.0} at 99 Hz"
    );

    // Leaf first in pprof: some sample's first location is leaf_alpha.
    let func_name = |id: u64| prof.function.iter().find(|f| f.id == id).map(|f| s(f.name));
    let loc_names = |id: u64| -> Vec<&str> {
        let loc = prof.location.iter().find(|l| l.id == id);
        loc.map(|l| l.line.iter().filter_map(|ln| func_name(ln.function_id)).collect()).unwrap_or_default()
    };
    let leaf_alpha = prof.sample.iter().filter(|x| loc_names(x.location_id[0]).contains(&"leaf_alpha")).count();
    assert!(leaf_alpha > 0, "no pprof sample has leaf_alpha as its first (leaf) location");
    let with_main =
        prof.sample.iter().filter(|x| x.location_id.iter().any(|id| loc_names(*id).contains(&"main"))).count();
    assert!(with_main > 0, "no pprof sample has main in its stack");
}

#[test]
fn svg_flame_graph_names_the_functions() {
    let (_w, out) = record_fp_ratio(&[]);
    let svg = String::from_utf8(out.read("cpu.svg")).expect("cpu.svg is UTF-8");
    assert!(svg.contains("<svg"), "cpu.svg has no <svg> element:\n{:.500}", svg);
    assert!(svg.trim_end().ends_with("</svg>"), "cpu.svg is truncated");
    for name in ["leaf_alpha", "leaf_beta", "middle", "fp_ratio"] {
        assert!(svg.contains(name), "cpu.svg does not mention {name}");
    }
    assert!(!out.stderr.trim().is_empty(), "no summary on stderr\n{}", out.context());
}

#[test]
fn format_list_selects_the_files() {
    let (w, out) = record_fp_ratio(&["--format", "folded"]);
    assert!(out.path("cpu.folded").is_file(), "cpu.folded missing\n{}", out.context());
    for absent in ["cpu.pb.gz", "cpu.svg"] {
        assert!(!out.path(absent).exists(), "{absent} written with --format folded");
    }
    drop((w, out));

    let (_w, out) = record_fp_ratio(&["--format", "pprof,svg"]);
    assert!(out.path("cpu.pb.gz").is_file(), "cpu.pb.gz missing\n{}", out.context());
    assert!(out.path("cpu.svg").is_file(), "cpu.svg missing\n{}", out.context());
    assert!(!out.path("cpu.folded").exists(), "cpu.folded written with --format pprof,svg");
}

#[test]
fn duration_with_unit_and_default_output_dir() {
    require_root();
    let mut w = Workload::c("fp_ratio", FP_RATIO_C, C_FP_FLAGS);
    w.warm_up();
    let cwd = tempfile::Builder::new().prefix("profiler-cwd-").tempdir().unwrap();
    let mut cmd = std::process::Command::new(agent_bin());
    cmd.args(["record", "--pid", &w.pid_arg(), "--duration", "2s", "--format", "folded"]).current_dir(cwd.path());
    let run = run_command(cmd, RECORD_TIMEOUT);
    assert!(run.status.success(), "record failed\n{}", run.context());
    assert!(run.elapsed >= Duration::from_secs(2), "`--duration 2s` returned after {:.2?}", run.elapsed);
    let dirs: Vec<String> =
        std::fs::read_dir(cwd.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(
        dirs.len() == 1 && dirs[0].starts_with("profile-"),
        "want one ./profile-<timestamp> directory, found {dirs:?}\n{}",
        run.context()
    );
    let folded = std::fs::read_to_string(cwd.path().join(&dirs[0]).join("cpu.folded"))
        .unwrap_or_else(|e| panic!("no cpu.folded in {}: {e}", dirs[0]));
    let folded = profiler_integration_tests::parse_folded(&folded);
    assert!(folded.process("fp_ratio").total() > 0, "no fp_ratio samples:\n{}", folded.top(10));
}
