//! This node's pods from the Kubernetes API, and joining them to processes.
//!
//! The agent lists and watches only the pods scheduled on its own node
//! (`fieldSelector=spec.nodeName=<node>` on every request): agents that
//! watch every pod of a cluster from every node have overloaded control
//! planes. See [`watch`] for the protocol and the failure handling, and
//! [`cache`] for the bounds.

pub mod cache;
pub mod selector;
pub mod watch;

use std::{
    sync::{atomic::Ordering::Relaxed, Arc, Mutex},
    time::Instant,
};

use k8s_openapi::api::core::v1::Pod;

pub use cache::{ContainerInfo, PodCache, PodInfo};

use super::SharedMetrics;
use crate::{
    config::{KubernetesSettings, ServiceNameSource},
    profile::{PodMeta, ProcessMeta},
};

/// The runtime's container id without its `containerd://`, `cri-o://` or
/// `docker://` prefix, as the cgroup path names it.
pub fn strip_runtime_prefix(id: &str) -> &str {
    id.split_once("://").map_or(id, |(_, rest)| rest)
}

/// What the agent keeps of an API pod.
pub fn pod_info(pod: &Pod) -> PodInfo {
    let meta = &pod.metadata;
    let status = pod.status.as_ref();
    let statuses = status
        .into_iter()
        .flat_map(|s| {
            [&s.container_statuses, &s.init_container_statuses, &s.ephemeral_container_statuses]
                .into_iter()
                .flatten()
                .flatten()
        })
        .filter_map(|c| {
            let id = strip_runtime_prefix(c.container_id.as_deref()?);
            (!id.is_empty()).then(|| ContainerInfo { id: id.to_owned(), name: c.name.clone() })
        });
    PodInfo {
        uid: meta.uid.clone().unwrap_or_default(),
        name: meta.name.clone().unwrap_or_default(),
        namespace: meta.namespace.clone().unwrap_or_default(),
        node: pod.spec.as_ref().and_then(|s| s.node_name.clone()).unwrap_or_default(),
        labels: meta.labels.clone().unwrap_or_default(),
        containers: statuses.collect(),
    }
}

/// The exporters' view of `pod` for the process in container `container_id`.
pub fn pod_meta(pod: &PodInfo, container_id: Option<&str>, settings: &KubernetesSettings) -> PodMeta {
    let container = container_id.and_then(|id| pod.container_name(id)).map(str::to_owned);
    let labels =
        settings.pod_labels.iter().filter_map(|key| pod.labels.get(key).map(|v| (key.clone(), v.clone()))).collect();
    let service_name = settings
        .service_name_from
        .iter()
        .map_while(|step| match step {
            ServiceNameSource::Label(key) => Some(pod.labels.get(key).cloned()),
            ServiceNameSource::Container => Some(container.clone()),
            // The executable's name is the exporters' fallback: stop here.
            ServiceNameSource::Executable => None,
        })
        .flatten()
        .find(|s| !s.is_empty());
    PodMeta {
        name: pod.name.clone(),
        uid: pod.uid.clone(),
        namespace: pod.namespace.clone(),
        node: if pod.node.is_empty() { settings.node_name.clone() } else { pod.node.clone() },
        container,
        labels,
        service_name,
    }
}

/// Adds pod metadata to processes; shared by the symbolizing thread (which
/// labels every interval) and the API task (which fills the cache).
#[derive(Clone)]
pub struct Enricher {
    pub cache: Arc<Mutex<PodCache>>,
    pub settings: Arc<KubernetesSettings>,
    /// Woken on a miss: the API task relists (rate-limited).
    pub refresh: Arc<tokio::sync::Notify>,
    pub metrics: SharedMetrics,
}

impl Enricher {
    pub fn new(settings: KubernetesSettings, metrics: SharedMetrics) -> Self {
        let cache = PodCache::new(settings.max_pods, settings.deleted_grace);
        Self {
            cache: Arc::new(Mutex::new(cache)),
            settings: Arc::new(settings),
            refresh: Arc::new(tokio::sync::Notify::new()),
            metrics,
        }
    }

    /// Labels every process of `metas` with its pod, when known. A process
    /// in a container whose pod is unknown is counted and asks for a
    /// refresh; it keeps its `container.id`.
    pub fn apply<'a>(&self, metas: impl IntoIterator<Item = &'a mut ProcessMeta>) {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.expire(Instant::now());
        self.metrics.pods.store(cache.len() as u64, Relaxed);
        self.metrics.evicted.store(cache.evicted(), Relaxed);
        let mut missed = false;
        for meta in metas {
            if meta.container_id.is_none() && meta.pod_uid.is_none() {
                continue;
            }
            match cache.lookup(meta.container_id.as_deref(), meta.pod_uid.as_deref()) {
                Some(pod) => meta.pod = Some(Arc::new(pod_meta(&pod, meta.container_id.as_deref(), &self.settings))),
                None => {
                    self.metrics.lookup_misses.fetch_add(1, Relaxed);
                    missed = true;
                }
            }
        }
        if missed {
            self.refresh.notify_one();
        }
    }
}

#[cfg(test)]
mod tests;
