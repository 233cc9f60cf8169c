//! The Kubernetes attributes every exporter puts on a process, so OTLP
//! profiles, OTLP metrics and Pyroscope label a pod the same way.

use crate::profile::ProcessMeta;

/// OpenTelemetry resource attributes of the process's pod (semantic
/// conventions `k8s.*`), then the configured pod labels as
/// `k8s.pod.label.<key>`. Empty for a process outside any known pod.
pub fn k8s_attributes(meta: &ProcessMeta) -> Vec<(String, String)> {
    let Some(pod) = &meta.pod else { return Vec::new() };
    let mut out: Vec<(String, String)> = [
        ("k8s.pod.name", pod.name.as_str()),
        ("k8s.pod.uid", pod.uid.as_str()),
        ("k8s.namespace.name", pod.namespace.as_str()),
        ("k8s.container.name", pod.container.as_deref().unwrap_or("")),
        ("k8s.node.name", pod.node.as_str()),
    ]
    .into_iter()
    .filter(|(_, v)| !v.is_empty())
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    out.extend(pod.labels.iter().map(|(k, v)| (format!("k8s.pod.label.{k}"), v.clone())));
    out
}

/// Pyroscope's own label names for the pod: `namespace`, `pod`,
/// `container`, `node` (what its Kubernetes discovery sets).
pub fn pyroscope_labels(meta: &ProcessMeta) -> Vec<(&'static str, String)> {
    let Some(pod) = &meta.pod else { return Vec::new() };
    [
        ("namespace", pod.namespace.clone()),
        ("pod", pod.name.clone()),
        ("container", pod.container.clone().unwrap_or_default()),
        ("node", pod.node.clone()),
    ]
    .into_iter()
    .filter(|(_, v)| !v.is_empty())
    .collect()
}

/// `service.name` from the pod by the configured rule, when it gave one.
pub fn pod_service_name(meta: &ProcessMeta) -> Option<&str> {
    meta.pod.as_ref()?.service_name.as_deref().filter(|s| !s.is_empty())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::profile::PodMeta;

    #[test]
    fn pod_attributes_and_labels() {
        let mut meta = ProcessMeta { pid: 1, ..Default::default() };
        assert!(k8s_attributes(&meta).is_empty() && pyroscope_labels(&meta).is_empty());
        meta.pod = Some(Arc::new(PodMeta {
            name: "web-0".into(),
            uid: "u".into(),
            namespace: "shop".into(),
            node: "n1".into(),
            container: Some("app".into()),
            labels: vec![("app.kubernetes.io/name".into(), "web".into())],
            service_name: Some("web".into()),
        }));
        let attrs = k8s_attributes(&meta);
        let get = |k: &str| attrs.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("k8s.pod.name"), Some("web-0"));
        assert_eq!(get("k8s.container.name"), Some("app"));
        assert_eq!(get("k8s.pod.label.app.kubernetes.io/name"), Some("web"));
        assert_eq!(pyroscope_labels(&meta)[0], ("namespace", "shop".to_owned()));
        assert_eq!(pod_service_name(&meta), Some("web"));
    }
}
