//! Exporter tasks. Each owns a bounded queue of interval profiles; the
//! symbolizing thread never waits for them.

use std::{sync::Arc, time::Instant};

use tokio::{sync::mpsc, task::JoinHandle};

use super::pipeline::IntervalProfiles;
use crate::{export::rolling::RollingDir, telemetry::Telemetry};

/// Intervals an exporter may have queued before new ones are dropped.
const QUEUE: usize = 4;

/// The rolling local-file exporter.
pub fn spawn_files(
    mut rolling: RollingDir,
    telemetry: Arc<Telemetry>,
) -> (mpsc::Sender<Arc<IntervalProfiles>>, JoinHandle<()>) {
    let (tx, mut rx) = mpsc::channel::<Arc<IntervalProfiles>>(QUEUE);
    let metrics = telemetry.exporter("files");
    let task = tokio::spawn(async move {
        while let Some(p) = rx.recv().await {
            let started = Instant::now();
            // File writes block; keep them off the async workers.
            let (r, result) = tokio::task::spawn_blocking(move || {
                let mut result = rolling.write("cpu", &p.cpu).map(|_| ());
                if let (Ok(()), Some(off)) = (&result, &p.off_cpu) {
                    result = rolling.write("off-cpu", off).map(|_| ());
                }
                (rolling, result)
            })
            .await
            .expect("file export task panicked");
            rolling = r;
            if let Err(e) = &result {
                log::warn!("writing the interval's profile files failed: {e}");
            }
            telemetry.record_export(&metrics, result.is_ok(), started.elapsed());
        }
    });
    (tx, task)
}
