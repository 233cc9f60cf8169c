//! `profiler-agent run --pyroscope-url`: what the daemon pushes is decoded by
//! a stand-in for Pyroscope's ingest built on the upstream push.proto and
//! pprof's profile.proto (tests/receivers/pyroscope_receiver.py).

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use profiler_integration_tests::{
    agent_bin, require_root,
    workload::{BUSY_C, C_FP_FLAGS},
    workspace_dir, Workload,
};

struct Receiver {
    child: Child,
    lines: mpsc::Receiver<String>,
    port: u16,
}

impl Receiver {
    fn start() -> Receiver {
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
        let port = first.strip_prefix("LISTENING ").and_then(|p| p.trim().parse().ok()).unwrap_or_else(|| {
            panic!(
                "the Pyroscope receiver did not start ({first:?}); \
                 run `python3 -m pip install -r tests/receivers/requirements.txt`"
            )
        });
        Receiver { child, lines, port }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn daemon_pushes_labelled_pprof_to_pyroscope() {
    require_root();
    let receiver = Receiver::start();
    let mut w = Workload::c("pyro_busy", BUSY_C, C_FP_FLAGS);
    w.warm_up();
    let mut daemon = Command::new(agent_bin())
        .args(["run", "--pid", &w.pid_arg(), "-F", "99", "--off-cpu", "--export-interval", "2s"])
        .args(["--http-listen", "127.0.0.1:0", "--pyroscope-url", &format!("http://127.0.0.1:{}", receiver.port)])
        .stdin(Stdio::null())
        .spawn()
        .expect("start profiler-agent run");
    // Intervals start once the programs are loaded and attached, which takes
    // seconds (the verifier): count from the first push, not from the spawn.
    let first = receiver.lines.recv_timeout(Duration::from_secs(60)).expect("a first push within 60 s");
    std::thread::sleep(Duration::from_secs(5));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = daemon.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "the daemon did not exit within 20 s of SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");

    let requests: Vec<serde_json::Value> = std::iter::once(first)
        .chain(receiver.lines.try_iter())
        .map(|l| serde_json::from_str(&l).expect("JSON line"))
        .collect();
    assert!(requests.len() >= 3, "{} pushes in the 5 s after the first at a 2 s interval", requests.len());
    let mut busy_loop_samples = 0;
    let mut names = std::collections::BTreeSet::new();
    for r in &requests {
        assert!(r.get("error").is_none(), "the receiver rejected a push: {r}");
        for s in r["series"].as_array().into_iter().flatten() {
            let labels: std::collections::BTreeMap<String, String> = s["labels"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|l| (l[0].as_str().unwrap().to_owned(), l[1].as_str().unwrap().to_owned()))
                .collect();
            assert_eq!(labels.get("service_name").map(String::as_str), Some("pyro_busy"), "{labels:?}");
            assert_eq!(labels.get("pid").map(String::as_str), Some(w.pid_arg().as_str()), "{labels:?}");
            let name = labels.get("__name__").cloned().unwrap_or_default();
            for p in s["profiles"].as_array().into_iter().flatten() {
                let types: Vec<String> = p["sample_type"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|t| format!("{}/{}", t[0].as_str().unwrap(), t[1].as_str().unwrap()))
                    .collect();
                match name.as_str() {
                    "process_cpu" => {
                        assert_eq!(types, ["samples/count", "cpu/nanoseconds"], "{p}");
                        for leaf in p["leaf_functions"].as_array().into_iter().flatten() {
                            if leaf[0] == "busy_loop" {
                                busy_loop_samples += 1;
                            }
                        }
                    }
                    "off_cpu" => assert_eq!(types, ["off_cpu/nanoseconds"], "{p}"),
                    other => panic!("unexpected __name__ {other:?}"),
                }
            }
            names.insert(name);
        }
    }
    assert!(names.contains("process_cpu"), "{names:?}");
    assert!(busy_loop_samples > 0, "no sample has busy_loop as its leaf");
}
