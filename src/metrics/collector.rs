//! The periodic collector of the queue gauges: every interval it counts the
//! queue's content by state in the database and sets the gauges.
//!
//! Every process with a queue and an admin listener runs one. Processes that
//! share a database therefore report the same values, so aggregate them with
//! `max`, not `sum`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use prometheus_client::metrics::gauge::Gauge;

use super::{Component, FloatGauge, Metrics, unix_time};
use crate::queue::{CountAndAge, Queue, QueueDepth};

/// Runs until `shutdown`, collecting every `interval`; each collection's
/// statements end after `timeout`.
pub async fn run(
    queue: Queue,
    metrics: Arc<Metrics>,
    interval: Duration,
    timeout: Duration,
    shutdown: CancellationToken,
) {
    let Some(queue_metrics) = &metrics.queue else {
        return;
    };
    loop {
        let started = Instant::now();
        match queue.depth(timeout).await {
            Ok(depth) => {
                set_gauges(&metrics, &depth);
                let gauges = &queue_metrics.gauges;
                gauges.collect_duration.set(started.elapsed().as_secs_f64());
                gauges.last_collect.set(unix_time());
            }
            Err(error) => {
                queue_metrics.gauges.collect_errors.inc();
                metrics.database_error(Component::Collector);
                crate::log_limited!(error.to_string(), suppressed => tracing::warn!(
                    error = %error,
                    suppressed,
                    "counting the queue for metrics failed; the queue gauges keep their last values"
                ));
            }
        }
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

fn set_gauges(metrics: &Metrics, depth: &QueueDepth) {
    let Some(queue) = &metrics.queue else {
        return;
    };
    let gauges = &queue.gauges;
    let messages = [depth.receiving, depth.ready, depth.held];
    set_all(&gauges.messages, &gauges.messages_oldest, &messages);
    let deliveries = [depth.due, depth.deferred, depth.leased, depth.delivery_held];
    set_all(&gauges.deliveries, &gauges.deliveries_oldest, &deliveries);
    gauges.recipients_unrouted.set(depth.unrouted.count);
    gauges
        .recipients_unrouted_oldest
        .set(depth.unrouted.oldest_seconds);
    gauges.destinations[0].set(depth.destinations_backed_off);
    gauges.destinations[1].set(depth.destinations_held);
}

fn set_all(counts: &[Gauge], ages: &[FloatGauge], values: &[CountAndAge]) {
    for ((count, age), value) in counts.iter().zip(ages).zip(values) {
        count.set(value.count);
        age.set(value.oldest_seconds);
    }
}
