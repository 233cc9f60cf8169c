//! Kubernetes metadata end to end. No cluster exists here, so:
//! - a loopback HTTP server speaks the API's pod list and watch protocol
//!   (a `PodList`, then a held-open chunked watch stream with ADDED and
//!   DELETED events) and records every request;
//! - a real cgroup is created with a pod's path
//!   (`kubepods.slice/.../kubepods-burstable-pod<uid>.slice/cri-containerd-<id>.scope`)
//!   and a workload runs in it;
//! - the daemon's real kube client talks to the server, and the real OTLP
//!   and Pyroscope receivers (tests/receivers/) decode what it exports.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{mpsc, Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use profiler_integration_tests::{
    agent_bin,
    cgroup::{fresh_ids, v2_root, TestCgroup},
    require_root,
    workload::{BUSY_C, C_FP_FLAGS},
    workspace_dir, Workload,
};
use serde_json::{json, Value};

const NODE: &str = "node-1";
const GRACE_SECS: u64 = 4;

// ---- the fake API server ----

#[derive(Default)]
struct ApiState {
    pods: Vec<Value>,
    version: u64,
    watchers: Vec<TcpStream>,
    /// Request targets (`/api/v1/pods?...`), percent-decoded.
    requests: Vec<String>,
}

struct FakeApi {
    port: u16,
    state: Arc<Mutex<ApiState>>,
}

impl FakeApi {
    fn start(pods: Vec<Value>) -> FakeApi {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(Mutex::new(ApiState { pods, version: 100, ..Default::default() }));
        let shared = state.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().map_while(Result::ok) {
                let state = shared.clone();
                std::thread::spawn(move || serve(conn, &state));
            }
        });
        FakeApi { port, state }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Deletes the pod: gone from later lists, DELETED on open watches.
    fn delete(&self, uid: &str) {
        let mut s = self.state.lock().unwrap();
        s.version += 1;
        let version = s.version.to_string();
        let Some(i) = s.pods.iter().position(|p| p["metadata"]["uid"] == uid) else { return };
        let mut pod = s.pods.remove(i);
        pod["metadata"]["resourceVersion"] = json!(version);
        let event = json!({"type": "DELETED", "object": pod}).to_string() + "\n";
        s.watchers.retain_mut(|w| write_chunk(w, event.as_bytes()).is_ok());
    }

    fn requests(&self) -> Vec<String> {
        self.state.lock().unwrap().requests.clone()
    }
}

fn write_chunk(w: &mut TcpStream, body: &[u8]) -> std::io::Result<()> {
    write!(w, "{:x}\r\n", body.len())?;
    w.write_all(body)?;
    w.write_all(b"\r\n")?;
    w.flush()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() + 1 {
            if let Some(v) =
                std::str::from_utf8(&b[i + 1..(i + 3).min(b.len())]).ok().and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// HTTP/1.1 with keep-alive: lists answer with a Content-Length body; a
/// watch gets chunked headers and the connection is kept for events.
fn serve(conn: TcpStream, state: &Mutex<ApiState>) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut conn = conn;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        // Headers, until the blank line.
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                break;
            }
        }
        let target = line.split_whitespace().nth(1).unwrap_or("").to_owned();
        let decoded = percent_decode(&target);
        let mut s = state.lock().unwrap();
        s.requests.push(decoded.clone());
        if decoded.contains("watch=true") {
            let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
            if conn.write_all(head.as_bytes()).is_ok() {
                s.watchers.push(conn.try_clone().unwrap());
            }
            drop(s);
            // Hold the connection open until the client closes it.
            let mut sink = [0u8; 256];
            while matches!(reader.read(&mut sink), Ok(n) if n > 0) {}
            return;
        }
        let body = json!({
            "kind": "PodList",
            "apiVersion": "v1",
            "metadata": {"resourceVersion": s.version.to_string()},
            "items": s.pods,
        })
        .to_string();
        drop(s);
        let head =
            format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n", body.len());
        if conn.write_all(head.as_bytes()).and_then(|()| conn.write_all(body.as_bytes())).is_err() {
            return;
        }
    }
}

/// A pod as the API server returns it, with one running container.
fn recorded_pod(uid: &str, container_id: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "checkout-7d9f8b6c5-x2lqz",
            "namespace": "shop",
            "uid": uid,
            "resourceVersion": "99",
            "labels": {"app.kubernetes.io/name": "checkout", "app.kubernetes.io/version": "1.4.2", "pod-template-hash": "7d9f8b6c5"}
        },
        "spec": {"nodeName": NODE, "containers": [{"name": "app", "image": "registry.example/checkout:1.4.2"}]},
        "status": {
            "phase": "Running",
            "qosClass": "Burstable",
            "containerStatuses": [{
                "name": "app", "ready": true, "restartCount": 0, "image": "registry.example/checkout:1.4.2",
                "imageID": "registry.example/checkout@sha256:bb",
                "containerID": format!("containerd://{container_id}"),
                "state": {"running": {"startedAt": "2026-11-30T08:13:02Z"}}
            }]
        }
    })
}

/// The cgroup a kubelet with the systemd driver and containerd creates.
fn pod_cgroup(uid: &str, id: &str) -> TestCgroup {
    let uid_ = uid.replace('-', "_");
    let path = format!(
        "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid_}.slice/cri-containerd-{id}.scope"
    );
    TestCgroup::create(&v2_root(), &path)
}

// ---- receivers ----

struct OtlpReceiver {
    child: Child,
    out: PathBuf,
    grpc: u16,
}

impl OtlpReceiver {
    fn start(dir: &Path) -> OtlpReceiver {
        let out = dir.join("otlp.jsonl");
        let mut child = Command::new("python3")
            .arg(workspace_dir().join("tests/receivers/otlp_profiles_receiver.py"))
            .arg("--out")
            .arg(&out)
            .args(["--grpc-port", "0"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3 runs");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let ports: Vec<u16> =
            line.trim().strip_prefix("READY ").unwrap_or("").split(['=', ' ']).filter_map(|w| w.parse().ok()).collect();
        assert_eq!(ports.len(), 2, "the OTLP receiver did not start ({line:?})");
        OtlpReceiver { child, out, grpc: ports[0] }
    }

    fn requests(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("JSON lines"))
            .collect()
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct PyroscopeReceiver {
    child: Child,
    lines: mpsc::Receiver<String>,
    port: u16,
}

impl PyroscopeReceiver {
    fn start() -> PyroscopeReceiver {
        let mut child = Command::new("python3")
            .arg(workspace_dir().join("tests/receivers/pyroscope_receiver.py"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3 runs");
        let (tx, lines) = mpsc::channel();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        std::thread::spawn(move || stdout.lines().map_while(Result::ok).try_for_each(|l| tx.send(l)));
        let first = lines.recv_timeout(Duration::from_secs(60)).unwrap_or_default();
        let port = first.strip_prefix("LISTENING ").and_then(|p| p.trim().parse().ok()).expect("Pyroscope receiver");
        PyroscopeReceiver { child, lines, port }
    }
}

impl Drop for PyroscopeReceiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---- the daemon ----

struct Daemon {
    child: Child,
    http: u16,
}

impl Daemon {
    fn start(config: &Path, args: &[&str]) -> Daemon {
        let http = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new(agent_bin())
            .arg("run")
            .arg("--config")
            .arg(config)
            .args(args)
            .args(["--export-interval", "2s", "--http-listen", &format!("127.0.0.1:{http}")])
            .env("PROFILER_LOG", "warn")
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env_remove("NODE_NAME")
            .env_remove("OTEL_SERVICE_NAME")
            .stdin(Stdio::null())
            .spawn()
            .expect("start profiler-agent run");
        Daemon { child, http }
    }

    fn get(&self, path: &str) -> Option<(u16, String)> {
        let mut s = TcpStream::connect(("127.0.0.1", self.http)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        let status = out.split_whitespace().nth(1)?.parse().ok()?;
        Some((status, out.split_once("\r\n\r\n")?.1.to_owned()))
    }

    /// Waits until `/readyz` answers 200: the programs are attached and
    /// the signal handlers installed.
    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(90);
        while Instant::now() < deadline {
            if let Some((200, _)) = self.get("/readyz") {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("/readyz never answered 200");
    }

    fn stop(mut self) -> std::process::ExitStatus {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < deadline, "the daemon did not exit within 20 s of SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn write_config(dir: &Path, api_url: &str, extra: &str) -> PathBuf {
    let path = dir.join("config.toml");
    std::fs::write(
        &path,
        format!(
            "[kubernetes]\nenabled = true\napi_url = \"{api_url}\"\nnode_name = \"{NODE}\"\n\
             token_file = \"/nonexistent/token\"\npod_labels = [\"app.kubernetes.io/version\"]\n\
             deleted_grace = \"{GRACE_SECS}s\"\n{extra}"
        ),
    )
    .unwrap();
    path
}

/// (profile start, resource attributes) of every OTLP resource of `pid`.
fn resources(requests: &[Value], pid: u32) -> Vec<(u64, Value)> {
    let mut out = Vec::new();
    for r in requests {
        for res in r["resources"].as_array().into_iter().flatten() {
            if res["attributes"]["process.pid"].as_i64() != Some(i64::from(pid)) {
                continue;
            }
            let start = res["scopes"][0]["profiles"][0]["time_unix_nano"].as_u64().unwrap_or(0);
            out.push((start, res["attributes"].clone()));
        }
    }
    out
}

fn pyroscope_labels(lines: &mpsc::Receiver<String>, pid: u32) -> Vec<BTreeMap<String, String>> {
    let mut out = Vec::new();
    for line in lines.try_iter() {
        let r: Value = serde_json::from_str(&line).expect("JSON line");
        assert!(r.get("error").is_none(), "the receiver rejected a push: {r}");
        for s in r["series"].as_array().into_iter().flatten() {
            let labels: BTreeMap<String, String> = s["labels"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|l| (l[0].as_str().unwrap().to_owned(), l[1].as_str().unwrap().to_owned()))
                .collect();
            if labels.get("pid") == Some(&pid.to_string()) {
                out.push(labels);
            }
        }
    }
    out
}

fn nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64
}

#[test]
fn pod_metadata_labels_otlp_and_pyroscope_until_the_grace_period_after_delete() {
    require_root();
    let (id, uid) = fresh_ids("k8s-meta");
    // A second pod whose container the API does not list yet (just
    // started): joined by the pod uid in its cgroup path alone. It runs in
    // a v1 controller hierarchy with cri-o's cgroupfs layout, as on a
    // hybrid host.
    let (id1, uid1) = fresh_ids("k8s-meta-v1");
    let mut starting = recorded_pod(&uid1, &id1);
    starting["metadata"]["name"] = json!("batch-0");
    starting["status"]["containerStatuses"] = json!([]);
    let api = FakeApi::start(vec![recorded_pod(&uid, &id), starting]);
    let cgroup = pod_cgroup(&uid, &id);
    let v1 =
        TestCgroup::create(Path::new("/sys/fs/cgroup/pids"), &format!("/kubepods/besteffort/pod{uid1}/crio-{id1}"));
    let mut w = Workload::c("k8s_checkout", BUSY_C, C_FP_FLAGS);
    cgroup.add(w.pid());
    let mut w1 = Workload::c("k8s_batch", BUSY_C, C_FP_FLAGS);
    v1.add(w1.pid());
    w.warm_up();
    w1.assert_running();
    let cgroup_file = std::fs::read_to_string(format!("/proc/{}/cgroup", w.pid())).unwrap();
    assert!(cgroup_file.contains(&cgroup.path), "the workload runs in the pod's cgroup: {cgroup_file}");

    let dir = tempfile::tempdir().unwrap();
    let otlp = OtlpReceiver::start(dir.path());
    let pyroscope = PyroscopeReceiver::start();
    let config = write_config(dir.path(), &api.url(), "");
    let daemon = Daemon::start(
        &config,
        &[
            "--pid",
            &w.pid_arg(),
            "--pid",
            &w1.pid_arg(),
            "-F",
            "99",
            "--otlp-endpoint",
            &format!("http://127.0.0.1:{}", otlp.grpc),
            "--pyroscope-url",
            &format!("http://127.0.0.1:{}", pyroscope.port),
        ],
    );
    daemon.wait_ready();
    std::thread::sleep(Duration::from_secs(7));
    let deleted_at = SystemTime::now();
    api.delete(&uid);
    std::thread::sleep(Duration::from_secs(GRACE_SECS + 6));
    let metrics = daemon.get("/metrics").map(|(_, b)| b).unwrap_or_default();
    assert!(daemon.stop().success());

    // What the daemon asked the API: this node's pods only, every time.
    let requests = api.requests();
    assert!(requests.iter().any(|r| !r.contains("watch=true")), "a list: {requests:?}");
    assert!(requests.iter().any(|r| r.contains("watch=true")), "a watch: {requests:?}");
    for r in &requests {
        assert!(r.starts_with("/api/v1/pods?"), "cluster-wide pods of this node, nothing else: {r}");
        assert!(r.contains(&format!("fieldSelector=spec.nodeName={NODE}")), "no field selector: {r}");
    }

    let res = resources(&otlp.requests(), w.pid());
    let ctx = format!("{} resources; deleted at {}\n{metrics}", res.len(), nanos(deleted_at));
    let labelled: Vec<&(u64, Value)> = res.iter().filter(|(_, a)| a["k8s.pod.name"].is_string()).collect();
    assert!(!labelled.is_empty(), "no resource has pod attributes\n{ctx}");
    for (_, a) in &labelled {
        for (key, want) in [
            ("k8s.pod.name", "checkout-7d9f8b6c5-x2lqz"),
            ("k8s.pod.uid", uid.as_str()),
            ("k8s.namespace.name", "shop"),
            ("k8s.container.name", "app"),
            ("k8s.node.name", NODE),
            ("container.id", id.as_str()),
            ("k8s.pod.label.app.kubernetes.io/version", "1.4.2"),
            ("service.name", "checkout"),
        ] {
            assert_eq!(a[key].as_str(), Some(want), "{key} in {a}");
        }
        assert!(a.get("k8s.pod.label.pod-template-hash").is_none(), "only configured labels are copied: {a}");
    }
    // The grace period: intervals that started after the DELETED event are
    // still labelled; those symbolized after it ran out are not, and keep
    // container.id.
    let deleted = nanos(deleted_at);
    assert!(labelled.iter().any(|(start, _)| *start >= deleted), "nothing labelled after the delete\n{ctx}");
    let expired = deleted + (GRACE_SECS + 1) * 1_000_000_000;
    let after: Vec<&(u64, Value)> = res.iter().filter(|(start, _)| *start >= expired).collect();
    assert!(!after.is_empty(), "no interval after the grace period\n{ctx}");
    for (_, a) in after {
        assert!(a["k8s.pod.name"].is_null(), "still labelled after the grace period: {a}\n{ctx}");
        assert_eq!(a["container.id"].as_str(), Some(id.as_str()), "{a}");
    }

    // The v1 cgroupfs process: container id and pod uid from the pids
    // hierarchy's line, the pod found by uid, no container name yet.
    let batch = resources(&otlp.requests(), w1.pid());
    let joined: Vec<_> = batch.iter().filter(|(_, a)| a["k8s.pod.uid"].is_string()).collect();
    assert!(!joined.is_empty(), "the v1 pod process was not joined: {batch:?}");
    for (_, a) in joined {
        assert_eq!(a["k8s.pod.uid"].as_str(), Some(uid1.as_str()), "{a}");
        assert_eq!(a["k8s.pod.name"].as_str(), Some("batch-0"), "{a}");
        assert_eq!(a["container.id"].as_str(), Some(id1.as_str()), "{a}");
        assert!(a["k8s.container.name"].is_null(), "{a}");
    }

    let series = pyroscope_labels(&pyroscope.lines, w.pid());
    let with_pod: Vec<_> = series.iter().filter(|l| l.contains_key("pod")).collect();
    assert!(!with_pod.is_empty(), "no Pyroscope series has pod labels: {series:?}");
    for l in with_pod {
        for (key, want) in [
            ("namespace", "shop"),
            ("pod", "checkout-7d9f8b6c5-x2lqz"),
            ("container", "app"),
            ("node", NODE),
            ("service_name", "checkout"),
            ("container_id", id.as_str()),
        ] {
            assert_eq!(l.get(key).map(String::as_str), Some(want), "{key} in {l:?}");
        }
    }
    drop((w, w1));
    drop((cgroup, v1));
}

/// An API server that accepts connections and never answers: every call
/// times out, the daemon keeps profiling with container.id, counts the
/// errors, retries, and stays ready.
#[test]
fn unreachable_api_keeps_container_id_counts_errors_and_stays_ready() {
    require_root();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(Mutex::new(0u32));
    let count = accepted.clone();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in listener.incoming().map_while(Result::ok) {
            *count.lock().unwrap() += 1;
            held.push(c);
        }
    });
    let (id, uid) = fresh_ids("k8s-down");
    let cgroup = pod_cgroup(&uid, &id);
    let mut w = Workload::c("k8s_orphan", BUSY_C, C_FP_FLAGS);
    cgroup.add(w.pid());
    w.warm_up();
    let dir = tempfile::tempdir().unwrap();
    // Pyroscope rather than OTLP: /readyz also reflects the exporters, and
    // the OTLP profiles receiver refuses metrics.
    let pyroscope = PyroscopeReceiver::start();
    let config = write_config(dir.path(), &format!("http://127.0.0.1:{port}"), "request_timeout = \"1s\"\n");
    let daemon = Daemon::start(
        &config,
        &["--pid", &w.pid_arg(), "-F", "99", "--pyroscope-url", &format!("http://127.0.0.1:{}", pyroscope.port)],
    );
    daemon.wait_ready();
    std::thread::sleep(Duration::from_secs(8));
    let ready = daemon.get("/readyz");
    let metrics = daemon.get("/metrics").map(|(_, b)| b).unwrap_or_default();
    assert!(daemon.stop().success());
    assert_eq!(ready.map(|r| r.0), Some(200), "/readyz stays ready without the API\n{metrics}");
    let errors: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("profiler_kubernetes_api_errors_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    // 8 s with a 1 s timeout and backoff from 0.5 s: several attempts.
    assert!(errors >= 2, "api errors counted: {errors}\n{metrics}");
    assert!(*accepted.lock().unwrap() >= 2, "it retried");
    assert!(metrics.contains("profiler_kubernetes_connected 0"), "{metrics}");
    let series = pyroscope_labels(&pyroscope.lines, w.pid());
    assert!(series.len() >= 2, "profiling went on: {} series", series.len());
    for l in &series {
        assert_eq!(l.get("container_id").map(String::as_str), Some(id.as_str()), "{l:?}");
        assert!(!l.contains_key("pod") && !l.contains_key("namespace"), "{l:?}");
    }
    drop(w);
    drop(cgroup);
}
