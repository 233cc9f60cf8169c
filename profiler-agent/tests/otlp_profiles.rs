//! OTLP profiles compatibility test against a real receiver.
//!
//! Starts `tests/receivers/otlp_profiles_receiver.py`, which decodes with the
//! official generated classes of PyPI `opentelemetry-proto`, sends it an
//! on-CPU + off-CPU window over gRPC and OTLP/HTTP with [`OtlpProfilesClient`],
//! and checks what it decoded: resources, sample types, stacks resolved
//! through the dictionary, values, attributes, and no dictionary problem.
//! Needs python3 with `tests/receivers/requirements.txt` (no root); missing
//! modules fail the test instead of skipping it, so CI cannot lose the check.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime};

use profiler_agent::export::otlp::{encode, ClientConfig, OtlpProfilesClient, Protocol, Resource};
use profiler_agent::profile::{Frame, FrameKind, Module, ProcessMeta, Profile, ProfileBuilder, Sample, ValueType};

const INSTALL_HINT: &str = "python3 -m pip install -r tests/receivers/requirements.txt";
const PERIOD: u64 = 10_101_010; // 99 Hz
const START_NS: u64 = 1_750_000_000_000_000_000;

/// The receiver process; killed when the test ends, however it ends.
struct Receiver {
    child: Child,
    grpc_port: u16,
    http_port: u16,
    out: PathBuf,
    _dir: tempfile::TempDir,
}

impl Receiver {
    fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/receivers/otlp_profiles_receiver.py");
        let out = dir.path().join("requests.jsonl");
        let stderr_path = dir.path().join("receiver.stderr");
        let stderr = File::create(&stderr_path).expect("stderr file");
        let mut child = Command::new("python3")
            .args([script.as_os_str(), "--out".as_ref(), out.as_os_str()])
            // Every answer reports one rejected profile, so the test also
            // sees the client surface a partial success from a real encoder.
            .args(["--reject-profiles", "1"])
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run python3 ({e}); install Python 3 and run `{INSTALL_HINT}`"));

        // The first line names the ports; EOF (empty) means it died starting.
        let mut line = String::new();
        let _ = BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line);
        let ports: Vec<u16> =
            line.trim().strip_prefix("READY ").unwrap_or("").split(['=', ' ']).filter_map(|w| w.parse().ok()).collect();
        let [grpc_port, http_port] = ports[..] else {
            let _ = (child.kill(), child.wait());
            let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
            panic!(
                "the OTLP profiles receiver did not start (stdout {line:?}).\n\
                 If Python modules are missing, run `{INSTALL_HINT}`.\nreceiver stderr:\n{stderr}"
            );
        };
        Self { child, grpc_port, http_port, out, _dir: dir }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = (self.child.kill(), self.child.wait());
    }
}

fn sample(pid: u32, tid: u32, process: &str, thread: &str, frames: Vec<usize>, value: u64) -> Sample {
    Sample {
        pid,
        tid,
        process_name: process.into(),
        thread_name: thread.into(),
        cpu: Some(0),
        frames,
        value,
        labels: Vec::new(),
    }
}

/// A 5 s window of `shop` (pid 4242, in a container, two threads, an inline
/// chain, unsymbolized libc, kernel frames) and `cron` (pid 777, no exe path).
fn window() -> (Profile, Profile) {
    let start = SystemTime::UNIX_EPOCH + Duration::from_nanos(START_NS);
    let mut cpu =
        Profile::new(ValueType::new("samples", "count"), Some(ValueType::new("cpu", "nanoseconds")), PERIOD, start);
    let mut off = Profile::new(ValueType::new("off_cpu", "nanoseconds"), None, 0, start);
    let meta = |pid, name: &str, exe: Option<&str>, container: Option<&str>| {
        let (exe_path, container_id) = (exe.map(Into::into), container.map(Into::into));
        (pid, ProcessMeta { pid, name: name.into(), exe_path, container_id, ..Default::default() })
    };
    let processes =
        BTreeMap::from([meta(777, "cron", None, None), meta(4242, "shop", Some("/usr/bin/shop"), Some("3f2a9c"))]);
    for p in [&mut cpu, &mut off] {
        p.duration_ns = 5_000_000_000;
        p.processes = processes.clone();
        let mut b = ProfileBuilder::default();
        let kernel = b.module(p, Module { path: "[kernel.kallsyms]".into(), build_id: None });
        let shop = b.module(p, Module { path: "/usr/bin/shop".into(), build_id: Some("aabbccdd".into()) });
        let libc = b.module(p, Module { path: "/usr/lib/libc.so.6".into(), build_id: Some("1122".into()) });
        let cron = b.module(p, Module { path: "/usr/sbin/cron".into(), build_id: None });
        let mut f = |function: &str, kind, module, address, src: Option<(&str, u32)>| {
            let (file, line, unsymbolized) = (src.map(|s| s.0.into()), src.map(|s| s.1), function.contains("+0x"));
            b.frame(
                p,
                Frame { function: function.into(), file, line, module: Some(module), address, kind, unsymbolized },
            )
        };
        let schedule = f("schedule", FrameKind::Kernel, kernel, 0xffff_ffff_8100_0100, None);
        let syscall = f("do_syscall_64", FrameKind::Kernel, kernel, 0xffff_ffff_8100_0010, None);
        let hash = f("hash_key", FrameKind::Inlined, shop, 0x2010, Some(("src/map.rs", 12)));
        let lookup = f("lookup", FrameKind::User, shop, 0x2010, Some(("src/map.rs", 40)));
        let handle = f("handle_request", FrameKind::User, shop, 0x1800, Some(("src/server.rs", 88)));
        let main = f("main", FrameKind::User, shop, 0x1000, Some(("src/main.rs", 3)));
        let read = f("libc.so.6+0x11f0a0", FrameKind::User, libc, 0x11f0a0, None);
        let jobs = f("run_jobs", FrameKind::User, cron, 0x4400, None);
        // The on-CPU profile is the sampled one.
        p.samples = if p.period_type.is_some() {
            vec![
                sample(4242, 4242, "shop", "shop", vec![hash, lookup, handle, main], 7),
                sample(4242, 4250, "shop", "shop-worker", vec![syscall, read, handle, main], 2),
                sample(777, 777, "cron", "cron", vec![jobs], 1),
            ]
        } else {
            vec![
                sample(4242, 4250, "shop", "shop-worker", vec![schedule, syscall, read, handle, main], 3_500_000),
                sample(777, 777, "cron", "cron", vec![schedule, jobs], 60_000_000_000),
            ]
        };
    }
    (cpu, off)
}

fn client(protocol: Protocol, port: u16) -> OtlpProfilesClient {
    OtlpProfilesClient::new(ClientConfig {
        endpoint: format!("http://127.0.0.1:{port}"),
        protocol,
        headers: vec![("x-scope-orgid".into(), "tenant-1".into())],
        connect_timeout: Duration::from_secs(5),
        request_timeout: Duration::from_secs(20),
        tls: Default::default(),
    })
    .expect("client")
}

/// Every sample of a resource as `type thread/tid stack;innermost;first = values`.
fn rows(resource: &json::Value) -> Vec<String> {
    let mut rows = Vec::new();
    for profile in resource["scopes"].at(0)["profiles"].array() {
        for s in profile["samples"].array() {
            let stack: Vec<&str> = s["stack"].array().iter().map(json::Value::str).collect();
            let values: Vec<String> = s["values"].array().iter().map(json::Value::scalar).collect();
            let (thread, tid) = (s["attributes"]["thread.name"].str(), s["attributes"]["thread.id"].int());
            let kind = profile["sample_type"].at(0).str();
            rows.push(format!("{kind} {thread}/{tid} {} = {}", stack.join(";"), values.join(",")));
        }
    }
    rows
}

fn check_request(req: &json::Value, transport: &str) {
    assert_eq!(req["transport"].str(), transport);
    assert!(req["problems"].array().is_empty(), "{transport}: receiver found problems: {:?}", req["problems"]);
    let headers = &req["headers"];
    assert_eq!(headers["otlp-profiles-development-version"].str(), "1");
    assert_eq!(headers["x-scope-orgid"].str(), "tenant-1");
    // grpcio consumes `grpc-encoding` before the servicer sees metadata; the
    // unit tests check gRPC gzip against a tonic server instead.
    if transport == "http" {
        assert_eq!(headers["content-encoding"].str(), "gzip");
        assert_eq!(headers["content-type"].str(), "application/x-protobuf");
    }

    let resources = req["resources"].array();
    assert_eq!(resources.len(), 2, "one resource per process");
    let (cron, shop) = (&resources[0], &resources[1]);
    let attrs = |r: &json::Value| -> String {
        let kv: Vec<String> = r["attributes"].object().iter().map(|(k, v)| format!("{k}={}", v.scalar())).collect();
        kv.join(" ")
    };
    let common = "deployment.environment=ci host.name=test-host";
    let cron_attrs = format!("{common} process.executable.name=cron process.pid=777 service.name=cron");
    assert_eq!(attrs(cron), cron_attrs, "no path, no container: not known");
    let shop_exe = "process.executable.name=shop process.executable.path=/usr/bin/shop";
    let shop_attrs = format!("container.id=3f2a9c {common} {shop_exe} process.pid=4242 service.name=shop");
    assert_eq!(attrs(shop), shop_attrs);
    for r in resources {
        let scope = r["scopes"].at(0);
        assert_eq!((scope["name"].str(), scope["version"].str()), ("profiler-agent", env!("CARGO_PKG_VERSION")));
        let profiles = scope["profiles"].array();
        assert_eq!(profiles.len(), 2, "on-CPU and off-CPU of the same process");
        let pair = |v: &json::Value| format!("{}/{}", v.at(0).str(), v.at(1).str());
        assert_eq!(pair(&profiles[0]["sample_type"]), "samples/count");
        assert_eq!(pair(&profiles[0]["period_type"]), "cpu/nanoseconds");
        assert_eq!(profiles[0]["period"].int(), i128::from(PERIOD));
        assert_eq!(pair(&profiles[1]["sample_type"]), "off_cpu/nanoseconds");
        assert_eq!(profiles[1]["period_type"], json::Value::Null, "exact values have no period");
        let times: Vec<_> = profiles.iter().map(|p| (p["time_unix_nano"].int(), p["duration_nano"].int())).collect();
        assert_eq!(times, [(i128::from(START_NS), 5_000_000_000); 2], "window start and length");
    }

    assert_eq!(rows(cron), ["samples cron/777 run_jobs = 1", "off_cpu cron/777 schedule;run_jobs = 60000000000"]);
    assert_eq!(
        rows(shop),
        [
            "samples shop/4242 hash_key;lookup;handle_request;main = 7",
            "samples shop-worker/4250 do_syscall_64;libc.so.6+0x11f0a0;handle_request;main = 2",
            "off_cpu shop-worker/4250 schedule;do_syscall_64;libc.so.6+0x11f0a0;handle_request;main = 3500000",
        ]
    );

    // Per location: frame type, mapping, build id, address, lines. The inline
    // chain is one location whose lines run innermost first.
    let frame = |f: &json::Value| {
        let lines: Vec<String> =
            f["lines"].array().iter().map(|l| format!("{}:{}", l["function"].str(), l["line"].int())).collect();
        let build_id =
            f["mapping_attributes"].object().get("process.executable.build_id.gnu").map_or("-", json::Value::str);
        let kind = f["attributes"]["profile.frame.type"].str();
        format!("{kind} {} {build_id} {:#x} {}", f["mapping"].str(), f["address"].int(), lines.join(","))
    };
    let samples = &shop["scopes"].at(0)["profiles"].at(0)["samples"];
    let frames: Vec<String> =
        samples.at(0)["frames"].array().iter().chain(&samples.at(1)["frames"].array()[..2]).map(frame).collect();
    assert_eq!(
        frames,
        [
            "native /usr/bin/shop aabbccdd 0x2010 hash_key:12,lookup:40",
            "native /usr/bin/shop aabbccdd 0x1800 handle_request:88",
            "native /usr/bin/shop aabbccdd 0x1000 main:3",
            "kernel [kernel.kallsyms] - 0xffffffff81000010 do_syscall_64:0",
            "native /usr/lib/libc.so.6 1122 0x11f0a0 libc.so.6+0x11f0a0:0",
        ]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn official_receiver_decodes_grpc_and_http_exports() {
    let receiver = Receiver::start();
    let (cpu, off) = window();
    let extra_attributes = vec![("deployment.environment".into(), "ci".into())];
    let resource = Resource { host_name: "test-host".into(), service_name_override: None, extra_attributes };
    let request = encode(&[&cpu, &off], &resource);

    for (protocol, port) in [(Protocol::Grpc, receiver.grpc_port), (Protocol::HttpProtobuf, receiver.http_port)] {
        let outcome =
            client(protocol, port).export(request.clone()).await.unwrap_or_else(|e| panic!("{protocol:?}: {e:#?}"));
        assert_eq!(outcome.rejected_profiles, 1, "{protocol:?}");
        assert_eq!(outcome.message.as_deref(), Some("rejected by test receiver"));
    }

    // The receiver's checks are not vacuous: a broken request is flagged.
    let mut bad = request;
    bad.resource_profiles[0].scope_profiles[0].profiles[0].samples[0].stack_index = 999;
    bad.dictionary.as_mut().expect("dictionary").string_table.push("main".into());
    client(Protocol::HttpProtobuf, receiver.http_port).export(bad).await.expect("export");

    let text = std::fs::read_to_string(&receiver.out).unwrap_or_default();
    let parse = |l: &str| json::parse(l).unwrap_or_else(|e| panic!("bad JSON line ({e}): {l}"));
    let requests: Vec<json::Value> = text.lines().map(parse).collect();
    assert_eq!(requests.len(), 3, "one decoded request per export");
    check_request(&requests[0], "grpc");
    check_request(&requests[1], "http");
    assert_eq!(requests[0]["resources"], requests[1]["resources"], "both transports carry the same data");
    let problems: Vec<&str> = requests[2]["problems"].array().iter().map(json::Value::str).collect();
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(problems[0].starts_with("string_table has duplicate"), "{problems:?}");
    assert!(problems[1].contains("stack_table[999] out of range"), "{problems:?}");
}

/// Just enough JSON to read the receiver's summaries (serde_json is not a
/// dependency). Integers stay exact: addresses exceed i64 and f64. The
/// summaries hold no floats or booleans, so those are refused, not guessed.
mod json {
    use std::collections::BTreeMap;

    #[derive(Clone, Debug, PartialEq)]
    pub enum Value {
        Null,
        Int(i128),
        Str(String),
        Arr(Vec<Value>),
        Obj(BTreeMap<String, Value>),
    }

    static NULL: Value = Value::Null;

    impl std::ops::Index<&str> for Value {
        type Output = Value;
        fn index(&self, key: &str) -> &Value {
            self.object().get(key).unwrap_or(&NULL)
        }
    }

    impl Value {
        pub fn at(&self, i: usize) -> &Value {
            self.array().get(i).unwrap_or(&NULL)
        }
        pub fn str(&self) -> &str {
            let Value::Str(s) = self else { panic!("not a string: {self:?}") };
            s
        }
        pub fn int(&self) -> i128 {
            let Value::Int(i) = self else { panic!("not an integer: {self:?}") };
            *i
        }
        pub fn array(&self) -> &[Value] {
            let Value::Arr(a) = self else { panic!("not an array: {self:?}") };
            a
        }
        pub fn object(&self) -> &BTreeMap<String, Value> {
            let Value::Obj(m) = self else { panic!("not an object: {self:?}") };
            m
        }
        /// A string or an integer as text.
        pub fn scalar(&self) -> String {
            match self {
                Value::Int(i) => i.to_string(),
                _ => self.str().to_owned(),
            }
        }
    }

    pub fn parse(text: &str) -> Result<Value, String> {
        let (v, rest) = value(text)?;
        if rest.trim().is_empty() {
            Ok(v)
        } else {
            Err(format!("trailing data: {rest:.20}"))
        }
    }

    /// The value at the start of `s`, and what follows it.
    fn value(s: &str) -> Result<(Value, &str), String> {
        let s = s.trim_start();
        let (close, mut rest) = match s.chars().next() {
            Some(open @ ('[' | '{')) => (if open == '[' { ']' } else { '}' }, &s[1..]),
            _ => return scalar(s),
        };
        let (mut items, mut map) = (Vec::new(), BTreeMap::new());
        loop {
            rest = rest.trim_start();
            if let Some(r) = rest.strip_prefix(close) {
                return Ok((if close == ']' { Value::Arr(items) } else { Value::Obj(map) }, r));
            }
            if !(items.is_empty() && map.is_empty()) {
                rest = rest.strip_prefix(',').ok_or_else(|| format!("expected ',': {rest:.20}"))?.trim_start();
            }
            if close == ']' {
                let (v, r) = value(rest)?;
                items.push(v);
                rest = r;
            } else {
                let (key, r) = string(rest)?;
                let r = r.trim_start().strip_prefix(':').ok_or_else(|| format!("expected ':': {r:.20}"))?;
                let (v, r) = value(r)?;
                map.insert(key, v);
                rest = r;
            }
        }
    }

    /// A string, integer or `null` at the start of `s`.
    fn scalar(s: &str) -> Result<(Value, &str), String> {
        if let Some(rest) = s.strip_prefix("null") {
            return Ok((Value::Null, rest));
        }
        if s.starts_with('"') {
            return string(s).map(|(text, rest)| (Value::Str(text), rest));
        }
        let end = s.find(|c: char| !(c.is_ascii_digit() || c == '-')).unwrap_or(s.len());
        let int = s[..end].parse().map_err(|_| format!("unsupported value: {s:.20}"))?;
        Ok((Value::Int(int), &s[end..]))
    }

    /// The string literal at the start of `s`, unescaped, and what follows it.
    fn string(s: &str) -> Result<(String, &str), String> {
        let body = s.strip_prefix('"').ok_or_else(|| format!("expected a string: {s:.20}"))?;
        let mut out = String::new();
        let mut chars = body.char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                '"' => return Ok((out, &body[i + 1..])),
                '\\' => match chars.next().map(|(_, c)| c) {
                    Some('u') => {
                        // Surrogate pairs are not joined: the summaries are ASCII.
                        let hex: String = chars.by_ref().take(4).map(|(_, c)| c).collect();
                        out.push(u32::from_str_radix(&hex, 16).ok().and_then(char::from_u32).unwrap_or('\u{fffd}'));
                    }
                    Some(c) => out.push(match c {
                        'n' => '\n',
                        't' => '\t',
                        'r' => '\r',
                        c => c,
                    }),
                    None => break,
                },
                c => out.push(c),
            }
        }
        Err("unterminated string".into())
    }
}
