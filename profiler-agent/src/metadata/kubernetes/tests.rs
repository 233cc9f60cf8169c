use std::time::Duration;

use super::*;

const APP: &str = "3f6c8a1f0b2d4e5f60718293a4b5c6d7e8f9012345678901234567890abcdef0";
const UID: &str = "0f9a2b3c-4d5e-4f60-8a7b-9c0d1e2f3a4b";

fn recorded() -> Pod {
    serde_json::from_str(include_str!("testdata/pod.json")).expect("a recorded pod")
}

fn settings() -> KubernetesSettings {
    crate::config::Kubernetes {
        enabled: Some(true),
        api_url: Some("http://127.0.0.1:1".into()),
        node_name: Some("node-1".into()),
        pod_labels: vec!["app.kubernetes.io/version".into(), "absent".into()],
        ..Default::default()
    }
    .resolve(|_| None, "host")
    .unwrap()
    .unwrap()
}

#[test]
fn strips_runtime_prefixes() {
    assert_eq!(strip_runtime_prefix("containerd://abc"), "abc");
    assert_eq!(strip_runtime_prefix("cri-o://abc"), "abc");
    assert_eq!(strip_runtime_prefix("docker://abc"), "abc");
    assert_eq!(strip_runtime_prefix("abc"), "abc");
}

#[test]
fn a_recorded_pod_becomes_its_containers() {
    let info = pod_info(&recorded());
    assert_eq!(
        (info.uid.as_str(), info.name.as_str(), info.namespace.as_str()),
        (UID, "checkout-7d9f8b6c5-x2lqz", "shop")
    );
    assert_eq!(info.node, "node-1");
    let names: Vec<(&str, &str)> = info.containers.iter().map(|c| (c.name.as_str(), &c.id[..4])).collect();
    // Init containers count too (their processes may still be sampled);
    // a container not started yet has no id.
    assert_eq!(names, [("app", "3f6c"), ("envoy", "2222"), ("migrate", "1111")]);
}

#[test]
fn service_name_rule_and_copied_labels() {
    let pod = pod_info(&recorded());
    let s = settings();
    let m = pod_meta(&pod, Some(APP), &s);
    assert_eq!(m.container.as_deref(), Some("app"));
    assert_eq!(m.service_name.as_deref(), Some("checkout"), "app.kubernetes.io/name first");
    assert_eq!(m.labels, [("app.kubernetes.io/version".to_owned(), "1.4.2".to_owned())]);
    // Without the label, `app`, then the container name; `executable`
    // leaves it to the exporters.
    let mut bare = pod.clone();
    bare.labels.clear();
    assert_eq!(pod_meta(&bare, Some(APP), &s).service_name.as_deref(), Some("app"));
    bare.labels.insert("app".into(), "legacy".into());
    assert_eq!(pod_meta(&bare, Some(APP), &s).service_name.as_deref(), Some("legacy"));
    bare.labels.clear();
    assert_eq!(pod_meta(&bare, None, &s).service_name, None);
    let custom = KubernetesSettings {
        service_name_from: vec![ServiceNameSource::Executable, ServiceNameSource::Container],
        ..s
    };
    assert_eq!(pod_meta(&pod, Some(APP), &custom).service_name, None, "the rule stops at `executable`");
}

#[test]
fn enricher_labels_known_pods_and_counts_misses() {
    let metrics = SharedMetrics::default();
    let e = Enricher::new(settings(), metrics.clone());
    e.cache.lock().unwrap().upsert(pod_info(&recorded()), Instant::now());
    let mut by_id = ProcessMeta { pid: 1, container_id: Some(APP.into()), ..Default::default() };
    let mut by_uid =
        ProcessMeta { pid: 2, container_id: Some("9".repeat(64)), pod_uid: Some(UID.into()), ..Default::default() };
    let mut unknown = ProcessMeta { pid: 3, container_id: Some("8".repeat(64)), ..Default::default() };
    let mut host = ProcessMeta { pid: 4, ..Default::default() };
    e.apply([&mut by_id, &mut by_uid, &mut unknown, &mut host]);
    assert_eq!(by_id.pod.as_ref().unwrap().container.as_deref(), Some("app"));
    assert_eq!(by_uid.pod.as_ref().unwrap().uid, UID);
    assert_eq!(by_uid.pod.as_ref().unwrap().container, None, "a container the pod's status does not list yet");
    assert!(unknown.pod.is_none() && host.pod.is_none());
    assert_eq!(metrics.lookup_misses.load(Relaxed), 1, "host processes are not misses");
    assert_eq!(metrics.pods.load(Relaxed), 1);
    // The miss asked the API task for a refresh.
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(1), e.refresh.notified()).await.expect("a refresh was requested");
    });
}
