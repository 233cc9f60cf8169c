//! Delivery with retries for network exporters: a buffer bounded by bytes
//! and age, oldest dropped first (and counted), delivered in order once the
//! backend is back, with exponential backoff and jitter between attempts.

use std::{
    collections::VecDeque,
    future::Future,
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use tokio::sync::mpsc;

use crate::telemetry::{ExporterMetrics, Telemetry};

/// Buffer bounds and backoff of one exporter.
#[derive(Clone, Copy, Debug)]
pub struct RetryPolicy {
    pub max_bytes: u64,
    pub max_age: Duration,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

/// What a send attempt said.
#[derive(Debug, PartialEq, Eq)]
pub enum Attempt {
    Delivered,
    /// Worth trying again later (timeouts, connection refused, 5xx, 429).
    Retry(String),
    /// Will never succeed (the backend rejected the data): dropped.
    Reject(String),
}

struct Item<T> {
    payload: Arc<T>,
    bytes: u64,
    queued: Instant,
}

/// The bounded buffer.
pub struct Buffer<T> {
    items: VecDeque<Item<T>>,
    bytes: u64,
    policy: RetryPolicy,
}

impl<T> Buffer<T> {
    pub fn new(policy: RetryPolicy) -> Self {
        Self { items: VecDeque::new(), bytes: 0, policy }
    }

    /// Adds a payload, dropping the oldest ones beyond the byte bound;
    /// returns how many were dropped.
    pub fn push(&mut self, payload: T, bytes: u64, now: Instant) -> u64 {
        self.items.push_back(Item { payload: Arc::new(payload), bytes, queued: now });
        self.bytes += bytes;
        let mut dropped = 0;
        while self.bytes > self.policy.max_bytes && self.items.len() > 1 {
            self.pop_front();
            dropped += 1;
        }
        dropped
    }

    /// Drops payloads older than the age bound; returns how many.
    pub fn expire(&mut self, now: Instant) -> u64 {
        let mut dropped = 0;
        while self.items.front().is_some_and(|i| now.duration_since(i.queued) > self.policy.max_age) {
            self.pop_front();
            dropped += 1;
        }
        dropped
    }

    pub fn front(&self) -> Option<Arc<T>> {
        self.items.front().map(|i| i.payload.clone())
    }

    pub fn pop_front(&mut self) {
        if let Some(i) = self.items.pop_front() {
            self.bytes -= i.bytes;
        }
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

/// Exponential backoff with +-25 % jitter, so many agents that lost the
/// same backend do not come back in lock-step.
pub fn backoff(policy: &RetryPolicy, failures: u32) -> Duration {
    let base = policy.initial_backoff.saturating_mul(1u32 << failures.min(16)).min(policy.max_backoff);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    let jitter = 0.75 + (nanos % 1000) as f64 / 2000.0;
    base.mul_f64(jitter)
}

/// Runs one exporter: payloads arrive on `rx`, `send` delivers one. Returns
/// when `rx` closes and the buffer is empty (or, for a backend that is still
/// down, when the caller's shutdown deadline cancels this future).
pub async fn deliver<T, F, Fut>(
    mut rx: mpsc::Receiver<(T, u64)>,
    policy: RetryPolicy,
    metrics: Arc<ExporterMetrics>,
    telemetry: Arc<Telemetry>,
    send: F,
) where
    F: Fn(Arc<T>) -> Fut,
    Fut: Future<Output = Attempt>,
{
    let mut buffer = Buffer::new(policy);
    let mut failures = 0u32;
    let mut next_attempt = Instant::now();
    let mut open = true;
    let mut dropped_at_success = 0;
    loop {
        let dropped = buffer.expire(Instant::now());
        metrics.dropped.fetch_add(dropped, Ordering::Relaxed);
        metrics.buffered_bytes.store(buffer.bytes(), Ordering::Relaxed);
        if buffer.is_empty() {
            if !open {
                return;
            }
            match rx.recv().await {
                Some((p, bytes)) => {
                    let d = buffer.push(p, bytes, Instant::now());
                    metrics.dropped.fetch_add(d, Ordering::Relaxed);
                }
                None => open = false,
            }
            continue;
        }
        let wait = next_attempt.saturating_duration_since(Instant::now());
        if !wait.is_zero() && open {
            tokio::select! {
                msg = rx.recv() => match msg {
                    Some((p, bytes)) => {
                        let d = buffer.push(p, bytes, Instant::now());
                        metrics.dropped.fetch_add(d, Ordering::Relaxed);
                    }
                    None => open = false,
                },
                _ = tokio::time::sleep(wait) => {}
            }
            continue;
        } else if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        let Some(payload) = buffer.front() else { continue };
        let started = Instant::now();
        let outcome = send(payload).await;
        let ok = outcome == Attempt::Delivered;
        telemetry.record_export(&metrics, ok, started.elapsed());
        if ok {
            dropped_at_success = metrics.dropped.load(Ordering::Relaxed);
        } else {
            // Ready means "delivering, or failing within the retry budget":
            // unhealthy only once data has been lost since the last success.
            let lost = metrics.dropped.load(Ordering::Relaxed) > dropped_at_success;
            metrics.healthy.store(!lost, Ordering::Relaxed);
        }
        match outcome {
            Attempt::Delivered => {
                buffer.pop_front();
                failures = 0;
                next_attempt = Instant::now();
            }
            Attempt::Reject(why) => {
                log::warn!("the backend rejected an export, dropping it: {why}");
                buffer.pop_front();
                metrics.dropped.fetch_add(1, Ordering::Relaxed);
                metrics.healthy.store(false, Ordering::Relaxed);
            }
            Attempt::Retry(why) => {
                let delay = backoff(&policy, failures);
                failures = failures.saturating_add(1);
                log::warn!("export failed ({why}); {} buffered, retrying in {delay:.1?}", buffer.len());
                next_attempt = Instant::now() + delay;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_bytes: 100,
            max_age: Duration::from_secs(60),
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(40),
        }
    }

    #[test]
    fn buffer_drops_oldest_beyond_bytes_and_age() {
        let mut b = Buffer::new(policy());
        let t0 = Instant::now();
        assert_eq!(b.push(1, 60, t0), 0);
        assert_eq!(b.push(2, 60, t0), 1, "the oldest goes when bytes overflow");
        assert_eq!(*b.front().unwrap(), 2);
        assert_eq!(b.bytes(), 60);
        assert_eq!(b.expire(t0 + Duration::from_secs(61)), 1);
        assert!(b.is_empty());
        // A single payload larger than the bound is still kept (sent alone).
        assert_eq!(b.push(3, 500, t0), 0);
        assert_eq!(b.len(), 1);
    }

    #[test]
    fn backoff_grows_with_jitter_and_is_capped() {
        let p = policy();
        for n in 0..10 {
            let d = backoff(&p, n);
            let base = (p.initial_backoff * (1 << n.min(16))).min(p.max_backoff);
            assert!(d >= base.mul_f64(0.75) && d <= base.mul_f64(1.25), "{n}: {d:?}");
        }
    }

    #[tokio::test]
    async fn delivers_in_order_after_the_backend_returns() {
        let (tx, rx) = mpsc::channel(8);
        let telemetry = Arc::new(Telemetry::default());
        let metrics = telemetry.exporter("test");
        let delivered = Arc::new(Mutex::new(Vec::new()));
        let attempts = Arc::new(Mutex::new(0));
        let (d, a) = (delivered.clone(), attempts.clone());
        let task = tokio::spawn(deliver(rx, policy(), metrics.clone(), telemetry, move |p: Arc<u32>| {
            let (d, a) = (d.clone(), a.clone());
            async move {
                let mut n = a.lock().unwrap();
                *n += 1;
                // Down for the first three attempts.
                if *n <= 3 {
                    return Attempt::Retry("connection refused".into());
                }
                d.lock().unwrap().push(*p);
                Attempt::Delivered
            }
        }));
        for i in 0..3 {
            tx.send((i, 10)).await.unwrap();
        }
        drop(tx);
        tokio::time::timeout(Duration::from_secs(5), task).await.unwrap().unwrap();
        assert_eq!(*delivered.lock().unwrap(), [0, 1, 2]);
        assert_eq!(metrics.dropped.load(Ordering::Relaxed), 0);
        assert_eq!(metrics.failures.load(Ordering::Relaxed), 3);
    }

    #[tokio::test]
    async fn rejected_payloads_are_dropped_and_counted() {
        let (tx, rx) = mpsc::channel(8);
        let telemetry = Arc::new(Telemetry::default());
        let metrics = telemetry.exporter("test");
        let task = tokio::spawn(deliver(rx, policy(), metrics.clone(), telemetry, |_p: Arc<u32>| async {
            Attempt::Reject("400 bad request".into())
        }));
        tx.send((1, 10)).await.unwrap();
        drop(tx);
        tokio::time::timeout(Duration::from_secs(5), task).await.unwrap().unwrap();
        assert_eq!(metrics.dropped.load(Ordering::Relaxed), 1);
    }
}
