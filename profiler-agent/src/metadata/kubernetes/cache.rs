//! This node's pods, by uid and by container id.
//!
//! Bounded: at most `capacity` pods. A deleted pod stays for a grace
//! period, so the samples it took in its last interval are still labelled
//! when that interval is exported; when the cache is full, deleted pods go
//! first (oldest deletion first), then the least recently updated live pod.
//! Every eviction is counted.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

/// A container of a pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerInfo {
    /// The runtime's id without its `containerd://` style prefix.
    pub id: String,
    pub name: String,
}

/// What the agent keeps of a pod.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodInfo {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub node: String,
    pub labels: std::collections::BTreeMap<String, String>,
    pub containers: Vec<ContainerInfo>,
}

impl PodInfo {
    /// The name of the container with this id.
    pub fn container_name(&self, id: &str) -> Option<&str> {
        self.containers.iter().find(|c| c.id == id).map(|c| c.name.as_str())
    }
}

struct Entry {
    pod: Arc<PodInfo>,
    updated: Instant,
    deleted: Option<Instant>,
}

/// The bounded pod cache.
pub struct PodCache {
    pods: HashMap<String, Entry>,
    by_container: HashMap<String, String>,
    capacity: usize,
    grace: Duration,
    evicted: u64,
}

impl PodCache {
    pub fn new(capacity: usize, grace: Duration) -> Self {
        Self { pods: HashMap::new(), by_container: HashMap::new(), capacity: capacity.max(1), grace, evicted: 0 }
    }

    /// Pods held, live or in their grace period.
    pub fn len(&self) -> usize {
        self.pods.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pods.is_empty()
    }

    /// Pods evicted so far because the cache was full.
    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    /// Adds or replaces a pod (ADDED, MODIFIED, or a list item); a pod that
    /// comes back is live again.
    pub fn upsert(&mut self, pod: PodInfo, now: Instant) {
        if pod.uid.is_empty() {
            return;
        }
        if !self.pods.contains_key(&pod.uid) && self.pods.len() >= self.capacity {
            self.evict_one();
        }
        if let Some(old) = self.pods.get(&pod.uid) {
            for c in &old.pod.containers {
                self.by_container.remove(&c.id);
            }
        }
        for c in pod.containers.iter().filter(|c| !c.id.is_empty()) {
            self.by_container.insert(c.id.clone(), pod.uid.clone());
        }
        self.pods.insert(pod.uid.clone(), Entry { pod: Arc::new(pod), updated: now, deleted: None });
    }

    /// DELETED: kept for the grace period.
    pub fn delete(&mut self, uid: &str, now: Instant) {
        if let Some(e) = self.pods.get_mut(uid) {
            e.deleted.get_or_insert(now);
        }
    }

    /// A full list replaces what a watch may have missed: pods not in it
    /// are deleted (with grace).
    pub fn replace_all(&mut self, pods: Vec<PodInfo>, now: Instant) {
        let listed: std::collections::HashSet<String> = pods.iter().map(|p| p.uid.clone()).collect();
        let gone: Vec<String> = self.pods.keys().filter(|uid| !listed.contains(*uid)).cloned().collect();
        for uid in gone {
            self.delete(&uid, now);
        }
        for pod in pods {
            self.upsert(pod, now);
        }
    }

    /// Drops deleted pods whose grace period is over.
    pub fn expire(&mut self, now: Instant) {
        let grace = self.grace;
        let expired: Vec<String> = self
            .pods
            .iter()
            .filter(|(_, e)| e.deleted.is_some_and(|d| now.saturating_duration_since(d) >= grace))
            .map(|(uid, _)| uid.clone())
            .collect();
        for uid in expired {
            self.remove(&uid);
        }
    }

    /// The pod of a process, by container id first, else by pod uid.
    pub fn lookup(&self, container_id: Option<&str>, pod_uid: Option<&str>) -> Option<Arc<PodInfo>> {
        let by_container = container_id.and_then(|id| self.by_container.get(id));
        let uid = by_container.map(String::as_str).or(pod_uid)?;
        self.pods.get(uid).map(|e| e.pod.clone())
    }

    /// Every live pod (not deleted).
    pub fn live(&self) -> impl Iterator<Item = &Arc<PodInfo>> {
        self.pods.values().filter(|e| e.deleted.is_none()).map(|e| &e.pod)
    }

    fn evict_one(&mut self) {
        let victim = self
            .pods
            .iter()
            .min_by_key(|(_, e)| (e.deleted.is_none(), e.deleted.unwrap_or(e.updated)))
            .map(|(uid, _)| uid.clone());
        if let Some(uid) = victim {
            self.remove(&uid);
            self.evicted += 1;
        }
    }

    fn remove(&mut self, uid: &str) {
        if let Some(e) = self.pods.remove(uid) {
            for c in &e.pod.containers {
                if self.by_container.get(&c.id).is_some_and(|u| u == uid) {
                    self.by_container.remove(&c.id);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(uid: &str, containers: &[(&str, &str)]) -> PodInfo {
        PodInfo {
            uid: uid.into(),
            name: format!("pod-{uid}"),
            namespace: "ns".into(),
            containers: containers
                .iter()
                .map(|(id, n)| ContainerInfo { id: (*id).into(), name: (*n).into() })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn joins_by_container_id_then_pod_uid() {
        let now = Instant::now();
        let mut c = PodCache::new(8, Duration::from_secs(30));
        c.upsert(pod("u1", &[("c1", "app"), ("c2", "sidecar")]), now);
        let p = c.lookup(Some("c2"), None).unwrap();
        assert_eq!((p.uid.as_str(), p.container_name("c2")), ("u1", Some("sidecar")));
        // A container not (yet) in the pod's status still finds its pod by uid.
        assert_eq!(c.lookup(Some("c9"), Some("u1")).unwrap().uid, "u1");
        assert!(c.lookup(Some("c9"), Some("u9")).is_none());
        assert!(c.lookup(None, None).is_none());
    }

    #[test]
    fn deleted_pods_stay_for_the_grace_period() {
        let t0 = Instant::now();
        let mut c = PodCache::new(8, Duration::from_secs(30));
        c.upsert(pod("u1", &[("c1", "app")]), t0);
        c.delete("u1", t0);
        c.expire(t0 + Duration::from_secs(29));
        assert!(c.lookup(Some("c1"), None).is_some(), "still labelled within the grace period");
        assert_eq!(c.live().count(), 0);
        c.expire(t0 + Duration::from_secs(30));
        assert!(c.lookup(Some("c1"), Some("u1")).is_none());
        assert!(c.is_empty());
    }

    #[test]
    fn a_relist_deletes_what_it_no_longer_lists_and_updates_containers() {
        let t0 = Instant::now();
        let mut c = PodCache::new(8, Duration::from_secs(30));
        c.upsert(pod("u1", &[("c1", "app")]), t0);
        c.upsert(pod("u2", &[("c2", "app")]), t0);
        c.replace_all(vec![pod("u2", &[("c3", "app")])], t0);
        assert_eq!(c.live().map(|p| p.uid.clone()).collect::<Vec<_>>(), ["u2"]);
        assert!(c.lookup(Some("c2"), None).is_none(), "the restarted container's old id is gone");
        assert_eq!(c.lookup(Some("c3"), None).unwrap().uid, "u2");
        assert!(c.lookup(Some("c1"), None).is_some(), "u1 is in its grace period");
    }

    #[test]
    fn bounded_deleted_first_and_counted() {
        let t0 = Instant::now();
        let mut c = PodCache::new(2, Duration::from_secs(30));
        c.upsert(pod("u1", &[("c1", "a")]), t0);
        c.upsert(pod("u2", &[("c2", "a")]), t0 + Duration::from_secs(1));
        c.delete("u2", t0 + Duration::from_secs(2));
        c.upsert(pod("u3", &[("c3", "a")]), t0 + Duration::from_secs(3));
        assert_eq!(c.len(), 2);
        assert!(c.lookup(Some("c2"), None).is_none(), "the deleted pod went first");
        c.upsert(pod("u4", &[("c4", "a")]), t0 + Duration::from_secs(4));
        assert!(c.lookup(Some("c1"), None).is_none(), "then the least recently updated");
        assert_eq!(c.evicted(), 2);
    }
}
