//! The `[kubernetes]` and `[targets]` sections.
//!
//! `[kubernetes]` keys whose default depends on the environment (`enabled`,
//! `api_url`, `node_name`) are `Option`s here and resolved by
//! [`Kubernetes::resolve`], so a file that leaves them out keeps following
//! the pod's environment.

use std::path::PathBuf;

use serde::Deserialize;

use super::HumanDuration;

/// Where the service account's credentials are mounted in a pod.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// Pod metadata from the API server, for this node's pods only.
#[cfg_attr(test, derive(serde::Serialize, schemars::JsonSchema))]
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Kubernetes {
    /// Default: true when `KUBERNETES_SERVICE_HOST` is set (in a pod).
    pub enabled: Option<bool>,
    /// Default: `https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT`.
    pub api_url: Option<String>,
    /// Bearer token, re-read when it changes (projected tokens rotate).
    pub token_file: PathBuf,
    /// CA bundle of the API server (PEM).
    pub ca_file: PathBuf,
    /// Default: `$NODE_NAME` (downward API `spec.nodeName`), else the host name.
    pub node_name: Option<String>,
    /// Pod labels copied onto profiles as `k8s.pod.label.<key>`.
    pub pod_labels: Vec<String>,
    /// Where `service.name` comes from: the first of these that has a value.
    /// `label:<key>` (a pod label), `container` (the container's name),
    /// `executable` (the executable's file name). `OTEL_SERVICE_NAME`
    /// overrides the rule.
    pub service_name_from: Vec<String>,
    /// How long a deleted pod's metadata still labels samples (its last
    /// interval is exported after it is gone).
    pub deleted_grace: HumanDuration,
    /// Pods kept at most (a node runs ~110); deleted ones are evicted first.
    pub max_pods: usize,
    /// Timeout of each API call (a list, or opening a watch).
    pub request_timeout: HumanDuration,
}

impl Default for Kubernetes {
    fn default() -> Self {
        Self {
            enabled: None,
            api_url: None,
            token_file: PathBuf::from(SERVICE_ACCOUNT_DIR).join("token"),
            ca_file: PathBuf::from(SERVICE_ACCOUNT_DIR).join("ca.crt"),
            node_name: None,
            pod_labels: Vec::new(),
            service_name_from: ["label:app.kubernetes.io/name", "label:app", "container", "executable"]
                .map(String::from)
                .to_vec(),
            deleted_grace: HumanDuration(std::time::Duration::from_secs(60)),
            max_pods: 1024,
            request_timeout: HumanDuration(std::time::Duration::from_secs(10)),
        }
    }
}

/// One step of the `service.name` rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServiceNameSource {
    Label(String),
    Container,
    Executable,
}

impl std::str::FromStr for ServiceNameSource {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "container" => Ok(Self::Container),
            "executable" => Ok(Self::Executable),
            _ => match s.strip_prefix("label:") {
                Some(key) if !key.is_empty() => Ok(Self::Label(key.to_owned())),
                _ => Err(format!(
                    "kubernetes.service_name_from: `{s}` is not `label:<key>`, `container` or `executable`"
                )),
            },
        }
    }
}

/// `[kubernetes]` with every default filled in from the environment.
#[derive(Clone, Debug, PartialEq)]
pub struct KubernetesSettings {
    pub api_url: String,
    pub token_file: PathBuf,
    pub ca_file: PathBuf,
    pub node_name: String,
    pub pod_labels: Vec<String>,
    pub service_name_from: Vec<ServiceNameSource>,
    pub deleted_grace: std::time::Duration,
    pub max_pods: usize,
    pub request_timeout: std::time::Duration,
}

impl Kubernetes {
    /// The effective settings, or `None` when disabled. `env` is normally
    /// `std::env::var`; `host_name` is the fallback node name.
    pub fn resolve(
        &self,
        env: impl Fn(&str) -> Option<String>,
        host_name: &str,
    ) -> Result<Option<KubernetesSettings>, String> {
        let non_empty = |k: &str| env(k).map(|v| v.trim().to_owned()).filter(|v| !v.is_empty());
        let service_host = non_empty("KUBERNETES_SERVICE_HOST");
        if !self.enabled.unwrap_or(service_host.is_some()) {
            return Ok(None);
        }
        let api_url = match (&self.api_url, &service_host) {
            (Some(url), _) => url.trim_end_matches('/').to_owned(),
            (None, Some(host)) => {
                let port = non_empty("KUBERNETES_SERVICE_PORT").unwrap_or_else(|| "443".into());
                // An IPv6 service host needs brackets in a URL.
                if host.contains(':') {
                    format!("https://[{host}]:{port}")
                } else {
                    format!("https://{host}:{port}")
                }
            }
            (None, None) => {
                return Err("kubernetes.enabled = true but no kubernetes.api_url is set and \
                            KUBERNETES_SERVICE_HOST is not in the environment"
                    .into())
            }
        };
        if !(api_url.starts_with("http://") || api_url.starts_with("https://")) {
            return Err(format!("kubernetes.api_url = \"{api_url}\": expected an http:// or https:// URL"));
        }
        let node_name = self
            .node_name
            .clone()
            .filter(|n| !n.is_empty())
            .or_else(|| non_empty("NODE_NAME"))
            .unwrap_or_else(|| host_name.to_owned());
        if node_name.is_empty() {
            return Err("kubernetes: no node name (set kubernetes.node_name or NODE_NAME)".into());
        }
        let service_name_from = self.service_name_from.iter().map(|s| s.parse()).collect::<Result<_, _>>()?;
        if self.max_pods == 0 {
            return Err("kubernetes.max_pods must be at least 1".into());
        }
        Ok(Some(KubernetesSettings {
            api_url,
            token_file: self.token_file.clone(),
            ca_file: self.ca_file.clone(),
            node_name,
            pod_labels: self.pod_labels.clone(),
            service_name_from,
            deleted_grace: self.deleted_grace.0,
            max_pods: self.max_pods,
            request_timeout: self.request_timeout.0.max(std::time::Duration::from_millis(100)),
        }))
    }
}

/// Which processes are profiled; empty everywhere means all. A process is
/// profiled when any selector matches it (they add up, as repeated `--pid`s
/// do).
#[cfg_attr(test, derive(serde::Serialize, schemars::JsonSchema))]
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Targets {
    /// cgroup v2 paths relative to the v2 root (`/system.slice/foo.service`);
    /// each selects its whole subtree.
    pub cgroups: Vec<String>,
    /// Container ids (64 hex digits, or a unique prefix of at least 12, as
    /// `docker ps` shows them; a `containerd://` style prefix is accepted).
    pub container_ids: Vec<String>,
    /// Regular expressions matched against the process name (comm) and the
    /// executable's file name, at start and at exec.
    pub process_names: Vec<String>,
    /// Kubernetes namespaces whose pods are profiled.
    pub namespaces: Vec<String>,
    /// A Kubernetes label selector (`app=web,tier in (a,b),!canary`); pods
    /// matching it are profiled.
    pub pod_selector: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| (*v).to_owned())
    }

    #[test]
    fn defaults_follow_the_pod_environment() {
        let k = Kubernetes::default();
        assert_eq!(k.resolve(env(&[]), "host").unwrap(), None, "off outside a pod");
        let s = k
            .resolve(
                env(&[
                    ("KUBERNETES_SERVICE_HOST", "10.96.0.1"),
                    ("KUBERNETES_SERVICE_PORT", "6443"),
                    ("NODE_NAME", "n1"),
                ]),
                "host",
            )
            .unwrap()
            .unwrap();
        assert_eq!(s.api_url, "https://10.96.0.1:6443");
        assert_eq!(s.node_name, "n1");
        assert_eq!(s.token_file, PathBuf::from("/var/run/secrets/kubernetes.io/serviceaccount/token"));
        assert_eq!(s.ca_file, PathBuf::from("/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"));
        assert_eq!(
            s.service_name_from,
            [
                ServiceNameSource::Label("app.kubernetes.io/name".into()),
                ServiceNameSource::Label("app".into()),
                ServiceNameSource::Container,
                ServiceNameSource::Executable
            ]
        );
        let s = k.resolve(env(&[("KUBERNETES_SERVICE_HOST", "fd00::1")]), "host").unwrap().unwrap();
        assert_eq!(s.api_url, "https://[fd00::1]:443");
        assert_eq!(s.node_name, "host", "the host name without NODE_NAME");
    }

    #[test]
    fn explicit_keys_win_and_bad_ones_are_named() {
        let k = Kubernetes {
            enabled: Some(true),
            api_url: Some("http://127.0.0.1:8080/".into()),
            node_name: Some("node-1".into()),
            ..Default::default()
        };
        let s = k.resolve(env(&[("NODE_NAME", "other")]), "host").unwrap().unwrap();
        assert_eq!((s.api_url.as_str(), s.node_name.as_str()), ("http://127.0.0.1:8080", "node-1"));
        let off = Kubernetes { enabled: Some(false), ..Default::default() };
        assert_eq!(off.resolve(env(&[("KUBERNETES_SERVICE_HOST", "h")]), "host").unwrap(), None);
        let e = Kubernetes { enabled: Some(true), ..Default::default() }.resolve(env(&[]), "h").unwrap_err();
        assert!(e.contains("api_url"), "{e}");
        let bad = Kubernetes { service_name_from: vec!["labels:x".into()], ..k.clone() };
        let e = bad.resolve(env(&[]), "h").unwrap_err();
        assert!(e.contains("labels:x"), "{e}");
        let bad = Kubernetes { api_url: Some("ftp://x".into()), ..k };
        assert!(bad.resolve(env(&[]), "h").unwrap_err().contains("ftp://x"));
    }
}
