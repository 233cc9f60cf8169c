//! The API task: list this node's pods, then watch from the list's
//! resourceVersion; on any error relist with backoff.
//!
//! - Every request carries `fieldSelector=spec.nodeName=<node>`.
//! - Every call has a timeout: the list and the opening of a watch take at
//!   most `request_timeout`; a watch asks the server to end it after
//!   [`WATCH_SECONDS`] and is abandoned if silent for longer than that
//!   plus [`WATCH_SLACK`].
//! - When the API is unreachable the agent keeps profiling (processes keep
//!   `container.id`, and pods already known keep their labels), counts each
//!   failure, and retries with exponential backoff up to [`MAX_BACKOFF`].
//!   Readiness does not depend on it.
//! - A lookup miss (a container process whose pod is unknown: a pod newer
//!   than the last event, or a watch that silently lost events) triggers a
//!   relist, at most every [`MIN_RELIST`].

use std::{
    sync::atomic::Ordering::Relaxed,
    time::{Duration, Instant},
};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::{
    api::{ListParams, WatchEvent, WatchParams},
    Api, Client,
};

use super::{pod_info, Enricher};
use crate::config::KubernetesSettings;

/// Server-side length of one watch request.
pub const WATCH_SECONDS: u32 = 290;
/// How much longer than that a silent watch is waited for.
pub const WATCH_SLACK: Duration = Duration::from_secs(30);
/// First retry delay after a failure; doubles up to [`MAX_BACKOFF`].
pub const MIN_BACKOFF: Duration = Duration::from_millis(500);
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Miss-triggered relists are at most this frequent.
pub const MIN_RELIST: Duration = Duration::from_secs(5);

/// Why the client could not be built (bad URL, unreadable CA file).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("kubernetes.api_url = \"{url}\" is not a valid URL: {message}")]
    Url { url: String, message: String },
    #[error("cannot read kubernetes.ca_file {path}: {source}")]
    Ca {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot build the Kubernetes client: {0}")]
    Kube(#[from] kube::Error),
}

/// A client for `settings.api_url` authenticated with the service account
/// token (re-read as it rotates) and trusting `ca_file`. Checks the files
/// now so a misconfiguration is reported at start.
pub fn client(settings: &KubernetesSettings) -> Result<Client, ClientError> {
    let uri: http::Uri = settings.api_url.parse().map_err(|e: http::uri::InvalidUri| ClientError::Url {
        url: settings.api_url.clone(),
        message: e.to_string(),
    })?;
    let mut config = kube::Config::new(uri);
    config.connect_timeout = Some(settings.request_timeout);
    config.write_timeout = Some(settings.request_timeout);
    // We back off ourselves and count every failure.
    config.default_retry = false;
    if settings.api_url.starts_with("https://") {
        let pem = std::fs::read(&settings.ca_file)
            .map_err(|source| ClientError::Ca { path: settings.ca_file.clone(), source })?;
        drop(pem);
        config.root_cert_file = Some(settings.ca_file.clone());
    }
    // Outside a pod (tests, a proxy on loopback) there may be no token.
    if settings.token_file.exists() {
        config.auth_info.token_file = Some(settings.token_file.display().to_string());
    }
    Ok(Client::try_from(config)?)
}

/// The node-scoped field selector sent with every request.
pub fn field_selector(node: &str) -> String {
    format!("spec.nodeName={node}")
}

/// Exponential backoff between failed attempts.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { next: MIN_BACKOFF }
    }
}

impl Backoff {
    /// The delay before the next attempt; doubles each time.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(MAX_BACKOFF);
        d
    }

    pub fn reset(&mut self) {
        self.next = MIN_BACKOFF;
    }
}

enum WatchEnd {
    /// The server closed the watch normally: watch again from the version.
    Expired,
    /// Relist (410 Gone, a miss, an error).
    Relist { failed: bool },
}

/// Runs until the task is dropped.
pub async fn run(client: Client, enricher: Enricher) {
    let api: Api<Pod> = Api::all(client);
    let settings = enricher.settings.clone();
    let metrics = enricher.metrics.clone();
    let fields = field_selector(&settings.node_name);
    let mut backoff = Backoff::default();
    loop {
        let params = ListParams::default().fields(&fields);
        let list = tokio::time::timeout(settings.request_timeout, api.list(&params));
        let mut version = match list.await {
            Ok(Ok(list)) => {
                let pods = list.items.iter().map(pod_info).collect();
                enricher.cache.lock().unwrap_or_else(|e| e.into_inner()).replace_all(pods, Instant::now());
                metrics.lists.fetch_add(1, Relaxed);
                metrics.connected.store(1, Relaxed);
                backoff.reset();
                list.metadata.resource_version.unwrap_or_default()
            }
            outcome => {
                let why = match outcome {
                    Ok(Err(e)) => e.to_string(),
                    _ => format!("no answer within {:?}", settings.request_timeout),
                };
                fail(&enricher, &mut backoff, &format!("listing this node's pods failed: {why}")).await;
                continue;
            }
        };
        let last_list = Instant::now();
        loop {
            match watch_once(&api, &fields, &mut version, &enricher, last_list).await {
                WatchEnd::Expired => continue,
                WatchEnd::Relist { failed: false } => break,
                WatchEnd::Relist { failed: true } => {
                    fail(&enricher, &mut backoff, "watching this node's pods failed").await;
                    break;
                }
            }
        }
    }
}

async fn fail(enricher: &Enricher, backoff: &mut Backoff, what: &str) {
    enricher.metrics.api_errors.fetch_add(1, Relaxed);
    enricher.metrics.connected.store(0, Relaxed);
    let delay = backoff.next_delay();
    log::warn!("{what}; pods keep container.id only until it works; retrying in {delay:?}");
    tokio::time::sleep(delay).await;
}

async fn watch_once(
    api: &Api<Pod>,
    fields: &str,
    version: &mut String,
    enricher: &Enricher,
    last_list: Instant,
) -> WatchEnd {
    let settings = &enricher.settings;
    let params = WatchParams::default().fields(fields).timeout(WATCH_SECONDS);
    let stream = match tokio::time::timeout(settings.request_timeout, api.watch(&params, version)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            log::debug!("opening the pod watch failed: {e}");
            return WatchEnd::Relist { failed: true };
        }
        Err(_) => return WatchEnd::Relist { failed: true },
    };
    let mut stream = std::pin::pin!(stream);
    let idle = Duration::from_secs(WATCH_SECONDS.into()) + WATCH_SLACK;
    loop {
        let next = tokio::select! {
            next = tokio::time::timeout(idle, stream.next()) => next,
            () = enricher.refresh.notified() => {
                if last_list.elapsed() >= MIN_RELIST {
                    log::debug!("a process's pod is unknown: relisting");
                    return WatchEnd::Relist { failed: false };
                }
                continue;
            }
        };
        let event = match next {
            Ok(Some(Ok(event))) => event,
            Ok(Some(Err(e))) => {
                log::debug!("the pod watch broke: {e}");
                return WatchEnd::Relist { failed: true };
            }
            Ok(None) => return WatchEnd::Expired,
            Err(_) => return WatchEnd::Relist { failed: true },
        };
        enricher.metrics.watch_events.fetch_add(1, Relaxed);
        let now = Instant::now();
        let mut cache = enricher.cache.lock().unwrap_or_else(|e| e.into_inner());
        match event {
            WatchEvent::Added(pod) | WatchEvent::Modified(pod) => {
                if let Some(v) = &pod.metadata.resource_version {
                    version.clone_from(v);
                }
                cache.upsert(pod_info(&pod), now);
            }
            WatchEvent::Deleted(pod) => {
                if let Some(v) = &pod.metadata.resource_version {
                    version.clone_from(v);
                }
                cache.delete(pod.metadata.uid.as_deref().unwrap_or(""), now);
            }
            WatchEvent::Bookmark(b) => version.clone_from(&b.metadata.resource_version),
            WatchEvent::Error(status) => {
                // 410 Gone: the version is too old; relisting is the protocol.
                let gone = status.code == 410;
                log::debug!("pod watch error {}: {}", status.code, status.message);
                return WatchEnd::Relist { failed: !gone };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_a_ceiling_and_resets() {
        let mut b = Backoff::default();
        let delays: Vec<Duration> = (0..10).map(|_| b.next_delay()).collect();
        assert_eq!(delays[0], MIN_BACKOFF);
        assert_eq!(delays[1], MIN_BACKOFF * 2);
        assert_eq!(*delays.last().unwrap(), MAX_BACKOFF);
        b.reset();
        assert_eq!(b.next_delay(), MIN_BACKOFF);
        assert_eq!(field_selector("node-1"), "spec.nodeName=node-1");
    }
}
