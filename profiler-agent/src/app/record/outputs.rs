//! Which profiles a recording produces and the files they become.

use std::path::{Path, PathBuf};

use crate::{
    cli::Format,
    export::{files::write_atomic, folded, pprof, svg, ExportError},
    profile::{Frame, Profile, ProfileBuilder, ValueType},
};

/// One profile and the file stem it is written under.
pub struct Output<'a> {
    /// `cpu`, `off-cpu` or `wall`.
    pub stem: &'static str,
    pub profile: &'a Profile,
    /// Title of the flame graph.
    pub title: &'static str,
    /// What the flame graph counts (`samples`, `ns`).
    pub unit: &'static str,
    /// Whether a pprof file is written for it.
    pub pprof: bool,
}

/// Writes every output in every requested format; returns the paths.
pub fn write_all(outputs: &[Output<'_>], dir: &Path, formats: &[Format]) -> Result<Vec<PathBuf>, ExportError> {
    let mut written = Vec::new();
    for out in outputs {
        let folded_text = folded::encode(out.profile);
        for format in formats {
            let (name, bytes) = match format {
                Format::Folded => (format!("{}.folded", out.stem), folded_text.clone().into_bytes()),
                Format::Pprof if out.pprof => (format!("{}.pb.gz", out.stem), pprof::to_gzip(out.profile)?),
                Format::Pprof => continue,
                Format::Svg => (format!("{}.svg", out.stem), svg::render(&folded_text, out.title, out.unit)?),
            };
            let path = dir.join(name);
            write_atomic(&path, &bytes)?;
            written.push(path);
        }
    }
    Ok(written)
}

/// The per-thread wall-clock view: on-CPU samples weighted by the sampling
/// period plus exactly measured off-CPU time, both in nanoseconds, with the
/// thread as the outermost frame under its process.
pub fn wall_profile(on_cpu: &Profile, off_cpu: &Profile) -> Profile {
    let mut wall = Profile::new(ValueType::new("wall", "nanoseconds"), None, 0, on_cpu.start);
    wall.duration_ns = on_cpu.duration_ns.max(off_cpu.duration_ns);
    let mut b = ProfileBuilder::default();
    for (source, weight) in [(on_cpu, on_cpu.period.max(1)), (off_cpu, 1)] {
        for s in &source.samples {
            let mut frames = Vec::with_capacity(s.frames.len() + 1);
            for &f in &s.frames {
                let mut frame = source.frames[f].clone();
                frame.module = frame.module.map(|m| b.module(&mut wall, source.modules[m].clone()));
                frames.push(b.frame(&mut wall, frame));
            }
            let thread = Frame::named(format!("{} [{}]", s.thread_name, s.tid), false);
            frames.push(b.frame(&mut wall, thread));
            let mut sample = s.clone();
            sample.frames = frames;
            sample.value = s.value.saturating_mul(weight);
            wall.samples.push(sample);
        }
    }
    wall
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::{FrameKind, Module, Sample};
    use std::time::SystemTime;

    fn profile(value_type: ValueType, period: u64, frames: &[&str], value: u64) -> Profile {
        let mut p = Profile::new(value_type, None, period, SystemTime::UNIX_EPOCH);
        let mut b = ProfileBuilder::default();
        let m = b.module(&mut p, Module { path: "/bin/app".into(), build_id: None });
        let ids = frames
            .iter()
            .map(|f| {
                let frame = Frame {
                    function: (*f).into(),
                    file: None,
                    line: None,
                    module: Some(m),
                    address: 1,
                    kind: FrameKind::User,
                    unsymbolized: false,
                };
                b.frame(&mut p, frame)
            })
            .collect();
        p.samples.push(Sample {
            pid: 1,
            tid: 2,
            process_name: "app".into(),
            thread_name: "worker".into(),
            cpu: None,
            frames: ids,
            value,
            labels: Vec::new(),
        });
        p
    }

    #[test]
    fn wall_weights_on_cpu_by_period_and_adds_off_cpu_exactly() {
        let on = profile(ValueType::new("samples", "count"), 10_101_010, &["spin", "main"], 3);
        let off = profile(ValueType::new("off_cpu", "nanoseconds"), 0, &["read", "main"], 5_000_000);
        let wall = wall_profile(&on, &off);
        let text = folded::encode(&wall);
        assert!(text.contains("app;worker [2];main;spin 30303030\n"), "{text}");
        assert!(text.contains("app;worker [2];main;read 5000000\n"), "{text}");
        assert_eq!(wall.modules.len(), 1, "modules are merged");
    }

    #[test]
    fn writes_requested_formats_and_skips_pprof_where_not_wanted() {
        let dir = tempfile::tempdir().unwrap();
        let on = profile(ValueType::new("samples", "count"), 1, &["spin"], 3);
        let outs = [
            Output { stem: "cpu", profile: &on, title: "t", unit: "samples", pprof: true },
            Output { stem: "wall", profile: &on, title: "t", unit: "ns", pprof: false },
        ];
        let files = write_all(&outs, dir.path(), &[Format::Folded, Format::Pprof]).unwrap();
        let names: Vec<String> = files.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
        assert_eq!(names, ["cpu.folded", "cpu.pb.gz", "wall.folded"]);
    }
}
