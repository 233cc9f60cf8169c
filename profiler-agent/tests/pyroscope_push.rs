//! The Pyroscope exporter against a real receiver: `tests/receivers/pyroscope_receiver.py`
//! decodes what we push with Pyroscope's published push.proto/types.proto and google/pprof's
//! profile.proto, and validates labels as Pyroscope's distributor does. Needs `python3` with
//! the packages in `tests/receivers/requirements.txt`; no root.

use std::collections::BTreeSet;
use std::io::{BufRead as _, BufReader, Read as _};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, SystemTime};

use profiler_agent::export::pyroscope::{
    self, LabelPair, PushLabels, PushRequest, PyroscopeClient, PyroscopeConfig, PyroscopeError, RawProfileSeries,
    RawSample,
};
use profiler_agent::profile::{Frame, FrameKind, Module, ProcessMeta, Profile, ProfileBuilder, Sample, ValueType};

const INSTALL_HINT: &str = "python3 -m pip install -r tests/receivers/requirements.txt";

/// The receiver process; killed on drop so a failing test leaves nothing running.
struct PyroscopeReceiver {
    child: Child,
    lines: Receiver<String>,
    stderr: Arc<Mutex<String>>,
    port: u16,
}

impl PyroscopeReceiver {
    fn start() -> Self {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/receivers/pyroscope_receiver.py");
        let mut child = Command::new("python3")
            .arg(&script)
            .args(["--port", "0"])
            // Held open: the receiver exits when it closes, even if we are killed.
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run python3 for {}: {e}; install Python 3", script.display()));
        let (tx, lines) = mpsc::channel();
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        thread::spawn(move || stdout.lines().map_while(Result::ok).try_for_each(|l| tx.send(l)));
        let stderr = Arc::new(Mutex::new(String::new()));
        let (mut pipe, sink) = (child.stderr.take().expect("stderr"), Arc::clone(&stderr));
        thread::spawn(move || {
            let mut buf = String::new();
            let _ = pipe.read_to_string(&mut buf);
            sink.lock().expect("stderr lock").push_str(&buf);
        });

        let mut receiver = Self { child, lines, stderr, port: 0 };
        // protoc runs first; allow for a slow CI machine.
        let first = receiver.lines.recv_timeout(Duration::from_secs(60));
        match first.as_deref().ok().and_then(|l| l.strip_prefix("LISTENING ")) {
            Some(port) => receiver.port = port.parse().expect("port"),
            None => {
                let status = receiver.child.wait().ok();
                let err = receiver.stderr.lock().expect("stderr lock").clone();
                if err.contains("missing Python module") {
                    panic!("the Pyroscope receiver lacks Python packages; run `{INSTALL_HINT}`\n{err}");
                }
                panic!("the Pyroscope receiver did not start ({status:?}, first line {first:?}):\n{err}");
            }
        }
        receiver
    }

    fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The JSON line the receiver wrote for the next request.
    fn next_request(&self) -> Json {
        let line = self.lines.recv_timeout(Duration::from_secs(10)).unwrap_or_else(|e| {
            panic!("no record from the receiver ({e}); stderr:\n{}", self.stderr.lock().expect("lock"))
        });
        Json::parse(&line).unwrap_or_else(|| panic!("receiver wrote invalid JSON: {line}"))
    }
}

impl Drop for PyroscopeReceiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Just enough JSON to read the receiver's records (this crate has no JSON dependency).
#[derive(Clone, Debug, PartialEq)]
enum Json {
    Null,
    Bool(bool),
    Num(f64),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

impl Json {
    fn parse(text: &str) -> Option<Json> {
        let mut chars = text.chars().peekable();
        let value = Self::value(&mut chars)?;
        Self::ws(&mut chars);
        chars.next().is_none().then_some(value)
    }

    fn ws(c: &mut std::iter::Peekable<std::str::Chars>) {
        while c.next_if(char::is_ascii_whitespace).is_some() {}
    }

    fn value(c: &mut std::iter::Peekable<std::str::Chars>) -> Option<Json> {
        Self::ws(c);
        match *c.peek()? {
            '{' => Self::items(c, '}').map(Json::Obj),
            '[' => Self::items(c, ']').map(|v| Json::Arr(v.into_iter().map(|(_, j)| j).collect())),
            '"' => {
                c.next();
                let mut s = String::new();
                loop {
                    match c.next()? {
                        '"' => return Some(Json::Str(s)),
                        // The receiver's json.dumps escapes non-ASCII as \uXXXX; our names are ASCII.
                        '\\' => match c.next()? {
                            'n' => s.push('\n'),
                            't' => s.push('\t'),
                            'r' => s.push('\r'),
                            'u' => {
                                s.push(char::from_u32(u32::from_str_radix(&c.take(4).collect::<String>(), 16).ok()?)?)
                            }
                            e => s.push(e),
                        },
                        ch => s.push(ch),
                    }
                }
            }
            _ => {
                let mut word = String::new();
                while let Some(ch) = c.next_if(|ch| ch.is_ascii_alphanumeric() || "+-.".contains(*ch)) {
                    word.push(ch);
                }
                match word.as_str() {
                    "null" => Some(Json::Null),
                    "true" => Some(Json::Bool(true)),
                    "false" => Some(Json::Bool(false)),
                    n => n.parse().ok().map(Json::Num),
                }
            }
        }
    }

    /// The members of an object (`close` = `}`) or the items of an array (`]`, empty keys).
    fn items(c: &mut std::iter::Peekable<std::str::Chars>, close: char) -> Option<Vec<(String, Json)>> {
        c.next();
        let mut out = Vec::new();
        Self::ws(c);
        if c.next_if_eq(&close).is_some() {
            return Some(out);
        }
        loop {
            let key = if close == '}' {
                let Json::Str(k) = Self::value(c)? else { return None };
                Self::ws(c);
                (c.next()? == ':').then_some(())?;
                k
            } else {
                String::new()
            };
            out.push((key, Self::value(c)?));
            Self::ws(c);
            match c.next()? {
                ',' => continue,
                d if d == close => return Some(out),
                _ => return None,
            }
        }
    }

    fn get(&self, key: &str) -> &Json {
        match self {
            Json::Obj(members) => members.iter().find(|(k, _)| k == key).map_or(&Json::Null, |(_, v)| v),
            _ => &Json::Null,
        }
    }

    fn arr(&self) -> &[Json] {
        match self {
            Json::Arr(items) => items,
            other => panic!("not an array: {other:?}"),
        }
    }

    fn str(&self) -> &str {
        match self {
            Json::Str(s) => s,
            other => panic!("not a string: {other:?}"),
        }
    }

    fn num(&self) -> f64 {
        match self {
            Json::Num(n) => *n,
            other => panic!("not a number: {other:?}"),
        }
    }

    /// `["a","b"]` as a string pair.
    fn pair(&self) -> (String, String) {
        (self.arr()[0].str().to_owned(), self.arr()[1].str().to_owned())
    }

    /// `[["a","b"], ...]` as string pairs.
    fn pairs(&self) -> Vec<(String, String)> {
        self.arr().iter().map(Json::pair).collect()
    }
}

/// A profile of two processes: `web` (pid 1001, on the host) and `postgres` (pid 2002, in
/// a container), each with a leaf function of its own in its own binary.
fn profile(value_type: ValueType, period_type: Option<ValueType>, leaves: [&str; 2]) -> Profile {
    let start = SystemTime::now();
    let mut p = Profile::new(value_type, period_type, 10_101_010, start);
    p.duration_ns = 5_000_000_000;
    let mut b = ProfileBuilder::default();
    let mut frames = Vec::new();
    for (pid, exe, leaf) in
        [(1001, "/usr/bin/web-server", leaves[0]), (2002, "/usr/lib/postgresql/bin/postgres", leaves[1])]
    {
        let module = b.module(&mut p, Module { path: exe.into(), build_id: None });
        let frame = |function: &str, address| Frame {
            function: function.into(),
            file: None,
            line: None,
            module: Some(module),
            address,
            kind: FrameKind::User,
            unsymbolized: false,
        };
        let main = b.frame(&mut p, frame("main", 0x1000));
        let leaf = b.frame(&mut p, frame(leaf, 0x2000));
        frames.push((pid, vec![leaf, main]));
        let container_id = (pid == 2002).then(|| "4f1c".repeat(16));
        let name = if pid == 1001 { "web" } else { "postgres" };
        p.processes.insert(
            pid,
            ProcessMeta { pid, name: name.into(), exe_path: Some(exe.into()), container_id, ..Default::default() },
        );
    }
    for (i, (pid, stack)) in frames.into_iter().enumerate() {
        let name = p.processes[&pid].name.clone();
        for (tid, value) in [(pid, 3 + i as u64), (pid + 1, 1)] {
            let (process_name, thread_name) = (name.clone(), format!("{name}-{tid}"));
            p.samples.push(Sample {
                pid,
                tid,
                process_name,
                thread_name,
                cpu: None,
                frames: stack.clone(),
                value,
                labels: Vec::new(),
            });
        }
    }
    p
}

#[tokio::test]
async fn cpu_and_off_cpu_profiles_reach_pyroscope() {
    let receiver = PyroscopeReceiver::start();
    let cpu =
        profile(ValueType::new("samples", "count"), Some(ValueType::new("cpu", "nanoseconds")), ["spin", "seqscan"]);
    let off = profile(ValueType::new("off_cpu", "nanoseconds"), None, ["epoll_wait", "fsync"]);
    let labels = PushLabels {
        host_name: "node-7".into(),
        service_name_override: None,
        extra: vec![("deployment.environment".into(), "test".into())],
    };
    let request = pyroscope::encode(&[&cpu, &off], &labels).expect("encode");
    let config =
        PyroscopeConfig { base_url: receiver.base_url(), tenant_id: Some("tenant-1".into()), ..Default::default() };
    PyroscopeClient::new(&config).expect("client").push(&request).await.expect("push accepted");

    let record = receiver.next_request();
    assert_eq!(record.get("path").str(), "/push.v1.PusherService/Push");
    assert_eq!(record.get("content_type").str(), "application/proto");
    assert_eq!(record.get("connect_protocol_version").str(), "1");
    assert_eq!(record.get("tenant").str(), "tenant-1");
    let series = record.get("series").arr();
    assert_eq!(series.len(), 4, "one series per process and kind: {record:?}");

    let expected = [
        ("process_cpu", "1001", "web-server", "spin"),
        ("process_cpu", "2002", "postgres", "seqscan"),
        ("off_cpu", "1001", "web-server", "epoll_wait"),
        ("off_cpu", "2002", "postgres", "fsync"),
    ];
    for (s, (name, pid, service, leaf)) in series.iter().zip(expected) {
        let labels = s.get("labels").pairs();
        let names: Vec<&str> = labels.iter().map(|(n, _)| n.as_str()).collect();
        assert!(names.windows(2).all(|w| w[0] < w[1]), "labels sorted: {names:?}");
        let label = |n: &str| labels.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str());
        assert_eq!(label("__name__"), Some(name));
        assert_eq!(label("service_name"), Some(service));
        assert_eq!(label("pid"), Some(pid));
        assert_eq!(label("host_name"), Some("node-7"));
        assert_eq!(label("deployment_environment"), Some("test"));
        assert_eq!(label("container_id").is_some(), pid == "2002", "{labels:?}");

        let profiles = s.get("profiles").arr();
        assert_eq!(profiles.len(), 1);
        let pprof = &profiles[0];
        assert_eq!(pprof.get("gzipped"), &Json::Bool(true));
        let sample_types = pprof.get("sample_type").pairs();
        let want_types: &[(&str, &str)] = match name {
            "process_cpu" => &[("samples", "count"), ("cpu", "nanoseconds")],
            _ => &[("off_cpu", "nanoseconds")],
        };
        let got: Vec<(&str, &str)> = sample_types.iter().map(|(t, u)| (t.as_str(), u.as_str())).collect();
        assert_eq!(got, want_types, "{name}");
        if name == "process_cpu" {
            assert_eq!(pprof.get("period_type").pair(), ("cpu".to_owned(), "nanoseconds".to_owned()));
            assert_eq!(pprof.get("period").num(), 10_101_010.0);
        }
        assert_eq!(pprof.get("samples").num(), 2.0, "two threads");
        for leaves in pprof.get("leaf_functions").arr() {
            assert_eq!(leaves.arr().iter().map(Json::str).collect::<Vec<_>>(), [leaf]);
        }
        let pids: BTreeSet<String> = pprof.get("sample_pids").arr().iter().map(|p| p.num().to_string()).collect();
        assert_eq!(pids, BTreeSet::from([pid.to_owned()]), "only this process's samples");
        assert_eq!(pprof.get("mapping_files").arr().len(), 1, "only this process's binary");
    }
}

#[tokio::test]
async fn rejected_pushes_surface_the_connect_error() {
    let receiver = PyroscopeReceiver::start();
    let client =
        PyroscopeClient::new(&PyroscopeConfig { base_url: receiver.base_url(), ..Default::default() }).expect("client");
    let series = |labels: Vec<LabelPair>, raw_profile: Vec<u8>| PushRequest {
        series: vec![RawProfileSeries { labels, samples: vec![RawSample { raw_profile, id: String::new() }] }],
    };
    let cpu = profile(ValueType::new("samples", "count"), Some(ValueType::new("cpu", "nanoseconds")), ["a", "b"]);
    let good =
        pyroscope::encode(&[&cpu], &PushLabels::default()).expect("encode").series[0].samples[0].raw_profile.clone();

    let cases = [
        (series(vec![LabelPair::new("__name__", "process_cpu")], good), "service_name is not provided"),
        (
            series(
                vec![LabelPair::new("__name__", "process_cpu"), LabelPair::new("service_name", "x")],
                b"\x1f\x8bnot gzip".to_vec(),
            ),
            "failed to parse pprof",
        ),
    ];
    for (request, why) in cases {
        let err = client.push(&request).await.expect_err(why);
        let PyroscopeError::Status { status, code, message, .. } = &err else { panic!("{err:?}") };
        assert_eq!((*status, code.as_str()), (400, "invalid_argument"), "{err}");
        assert!(message.contains(why), "{message}");
        assert!(!err.retryable(), "a refused request fails the same way again");
        assert_eq!(receiver.next_request().get("error").get("code").str(), "invalid_argument");
    }
}
