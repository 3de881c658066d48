//! Counters and gauges of the running engine, rendered in Prometheus text format.
//!
//! Plain atomics: the ingest loop updates them once per micro-batch, so there is nothing to gain
//! from a metrics framework here.

use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

mod render;

/// What one pipeline did with one batch, counted once the batch is committed.
#[derive(Debug, Clone, Default)]
pub struct PipelineCounts {
    pub name: String,
    pub rows_in: u64,
    pub deduplicated: u64,
    /// Devices seen restarting their sequence numbers (readings kept).
    pub restarts: u64,
    pub rows_out: u64,
    pub quarantined: u64,
    pub dropped: u64,
    pub warned: u64,
    pub expectations: Vec<fleetlake_sql::pipeline::run::ExpectationCount>,
}

/// A latency histogram with fixed buckets (seconds).
#[derive(Debug)]
pub struct Histogram {
    buckets: &'static [f64],
    counts: Vec<AtomicU64>,
    sum_micros: AtomicU64,
    count: AtomicU64,
}

const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

impl Histogram {
    fn new() -> Self {
        Self {
            buckets: LATENCY_BUCKETS,
            counts: LATENCY_BUCKETS.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        for (bound, count) in self.buckets.iter().zip(&self.counts) {
            if secs <= *bound {
                count.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.sum_micros
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (bound, count) in self.buckets.iter().zip(&self.counts) {
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {}",
                count.load(Ordering::Relaxed)
            );
        }
        let total = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {total}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {sum}");
        let _ = writeln!(out, "{name}_count{braces} {total}");
    }
}

/// Per-table commit statistics.
#[derive(Debug)]
pub struct TableMetrics {
    pub table: String,
    pub rows: AtomicU64,
    pub commits: AtomicU64,
    pub latency: Histogram,
}

/// Rows through one pipeline and violations of its expectations.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct PipelineCounters {
    pub rows_in: u64,
    pub deduplicated: u64,
    /// Devices seen restarting their sequence numbers (a reboot); their readings are kept.
    pub restarts: u64,
    pub rows_out: u64,
    pub quarantined: u64,
    pub dropped: u64,
    pub warned: u64,
    /// `(table, expectation, action)` → violations.
    pub expectations: std::collections::BTreeMap<String, ExpectationCounter>,
}

/// Violations of one expectation.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ExpectationCounter {
    pub table: String,
    pub expectation: String,
    pub action: String,
    pub violations: u64,
}

/// What one rule did since the start, and how many keys fire now.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RuleCounters {
    /// Keys whose alert is firing now.
    pub firing_keys: u64,
    /// Transitions published, by state.
    pub fired: u64,
    pub resolved: u64,
}

/// A table's shape after maintenance last looked at it.
#[derive(Debug, Clone, Copy, Default)]
pub struct TableShape {
    pub files: u64,
    pub bytes: u64,
    pub version: u64,
    /// When maintenance finished with it, seconds since the epoch.
    pub maintained_at: i64,
}

/// What table maintenance did since the start.
#[derive(Debug, Clone, Default)]
struct MaintenanceCounters {
    runs: u64,
    skipped: u64,
    failures: u64,
    files_rewritten: u64,
    files_vacuumed: u64,
    log_files_removed: u64,
    tables: std::collections::BTreeMap<String, TableShape>,
}

/// Everything `/metrics` reports.
#[derive(Debug)]
pub struct Metrics {
    pub messages_pulled: AtomicU64,
    pub messages_acked: AtomicU64,
    pub quarantined: AtomicU64,
    /// Device replays dropped before the usable zone.
    pub duplicates_dropped: AtomicU64,
    /// Rows left out of window tables because their window had closed.
    pub late_rows: AtomicU64,
    /// Alert transitions published to JetStream (a republish after a restart counts again).
    pub alerts_published: AtomicU64,
    /// Alerts sent to Alertmanager (`alerts.alertmanager_url`), re-sends of firing ones included.
    pub alertmanager_sent: AtomicU64,
    /// -1 without an Alertmanager; 1 while deliveries succeed; 0 while they fail (alerts waiting
    /// or refused).
    pub alertmanager_up: AtomicI64,
    /// Failed requests to Alertmanager (each is retried).
    pub alertmanager_errors: AtomicU64,
    /// Old intervals of dedup state forgotten (a replay of those readings would pass).
    pub dedup_forgotten: AtomicU64,
    /// Devices seen restarting their sequence numbers, in every dedup state (readings kept).
    pub dedup_restarts: AtomicU64,
    /// Devices (or message ids) the dedup state remembers.
    pub dedup_keys: AtomicI64,
    pub batch_latency: Histogram,
    pub consumer_lag: AtomicI64,
    /// Messages the NATS client did not deliver, read directly by their stream sequence.
    pub messages_refetched: AtomicU64,
    /// Stream sequences skipped because the stream no longer held them when read.
    pub messages_missing: AtomicU64,
    pub storage_errors: AtomicU64,
    pub source_errors: AtomicU64,
    /// 1 while the last commit attempt succeeded.
    pub storage_up: AtomicI64,
    /// 1 while the NATS consumer is connected.
    pub source_up: AtomicI64,
    tables: Mutex<Vec<std::sync::Arc<TableMetrics>>>,
    /// 1 once a `FAIL` expectation stopped the pipelines.
    pub pipeline_failed: AtomicI64,
    /// 1 once a permanent error (one retrying cannot fix) stopped ingest.
    pub ingest_stopped: AtomicI64,
    pipelines: Mutex<std::collections::BTreeMap<String, PipelineCounters>>,
    rules: Mutex<std::collections::BTreeMap<String, RuleCounters>>,
    maintenance: Mutex<MaintenanceCounters>,
    /// The cluster this instance is a member of (`cluster.partitions` > 0), as last seen.
    cluster: Mutex<Option<ClusterStatus>>,
    /// The memory all queries share (`query.total_memory_mb`), when the API serves queries.
    pub query_memory: std::sync::OnceLock<std::sync::Arc<fleetlake_sql::memory::EngineMemory>>,
    /// The stream sequence up to which this instance's fleet-wide windows and rules have
    /// committed (`crate::ingest::fleet`); 0 when it does not compute them.
    pub fleet_wide_position: AtomicI64,
    /// The owned partitions whose ingest has opened its tables, rebuilt its state and started
    /// its consumer (a partition just taken over is not, for a while).
    partitions_consuming: Mutex<std::collections::BTreeSet<u32>>,
    /// Messages not yet delivered, per partition this instance consumes.
    partition_lags: Mutex<std::collections::BTreeMap<u32, std::sync::Arc<AtomicI64>>>,
    /// The last error of each component ("storage", "source"), for `/healthz`.
    last_errors: Mutex<Vec<(&'static str, String, chrono::DateTime<chrono::Utc>)>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            messages_pulled: AtomicU64::new(0),
            messages_acked: AtomicU64::new(0),
            quarantined: AtomicU64::new(0),
            duplicates_dropped: AtomicU64::new(0),
            late_rows: AtomicU64::new(0),
            alerts_published: AtomicU64::new(0),
            alertmanager_sent: AtomicU64::new(0),
            alertmanager_up: AtomicI64::new(-1),
            alertmanager_errors: AtomicU64::new(0),
            dedup_forgotten: AtomicU64::new(0),
            dedup_restarts: AtomicU64::new(0),
            dedup_keys: AtomicI64::new(0),
            batch_latency: Histogram::new(),
            consumer_lag: AtomicI64::new(0),
            messages_refetched: AtomicU64::new(0),
            messages_missing: AtomicU64::new(0),
            storage_errors: AtomicU64::new(0),
            source_errors: AtomicU64::new(0),
            storage_up: AtomicI64::new(1),
            source_up: AtomicI64::new(0),
            tables: Mutex::new(Vec::new()),
            last_errors: Mutex::new(Vec::new()),
            cluster: Mutex::new(None),
            query_memory: std::sync::OnceLock::new(),
            partition_lags: Mutex::new(std::collections::BTreeMap::new()),
            partitions_consuming: Mutex::new(std::collections::BTreeSet::new()),
            fleet_wide_position: AtomicI64::new(0),
            pipeline_failed: AtomicI64::new(0),
            ingest_stopped: AtomicI64::new(0),
            pipelines: Mutex::new(std::collections::BTreeMap::new()),
            rules: Mutex::new(std::collections::BTreeMap::new()),
            maintenance: Mutex::new(MaintenanceCounters::default()),
        }
    }
}

impl Metrics {
    /// Records the cluster as this instance last saw it; lags of partitions it no longer owns
    /// are dropped.
    pub fn set_cluster(&self, status: ClusterStatus) {
        let owned = |p: &u32| status.owned.iter().any(|o| o.partition == *p);
        self.partitions_consuming
            .lock()
            .expect("metrics lock")
            .retain(owned);
        self.partition_lags
            .lock()
            .expect("metrics lock")
            .retain(|p, _| owned(p));
        *self.cluster.lock().expect("metrics lock") = Some(status);
    }

    /// The cluster as last seen (`None` without partitions).
    pub fn cluster(&self) -> Option<ClusterStatus> {
        self.cluster.lock().expect("metrics lock").clone()
    }

    /// The gauge of partition `index`'s lag (messages not yet delivered), for its ingest to
    /// set with each message (no lock); `fleetlake_consumer_lag` is then the sum over the
    /// partitions this instance consumes.
    pub fn partition_lag(&self, index: u32) -> std::sync::Arc<AtomicI64> {
        self.partition_lags
            .lock()
            .expect("metrics lock")
            .entry(index)
            .or_default()
            .clone()
    }

    /// Partition `index`'s ingest has started its consumer.
    pub fn partition_consuming(&self, index: u32) {
        self.partitions_consuming
            .lock()
            .expect("metrics lock")
            .insert(index);
    }

    /// Whether partition `index`'s ingest has started its consumer.
    pub fn is_partition_consuming(&self, index: u32) -> bool {
        self.partitions_consuming
            .lock()
            .expect("metrics lock")
            .contains(&index)
    }

    /// Each consumed partition's lag.
    pub fn partition_lags(&self) -> std::collections::BTreeMap<u32, i64> {
        self.partition_lags
            .lock()
            .expect("metrics lock")
            .iter()
            .map(|(p, lag)| (*p, lag.load(Ordering::Relaxed)))
            .collect()
    }

    /// Records what maintenance did to one table: its shape after, the files it rewrote
    /// (removed by compaction), vacuumed and the log entries it deleted.
    pub fn table_maintained(
        &self,
        table: &str,
        shape: TableShape,
        files_rewritten: u64,
        files_vacuumed: u64,
        log_files_removed: u64,
    ) {
        let mut m = self.maintenance.lock().expect("metrics lock");
        m.files_rewritten += files_rewritten;
        m.files_vacuumed += files_vacuumed;
        m.log_files_removed += log_files_removed;
        m.tables.insert(table.to_string(), shape);
    }

    /// A table whose maintenance failed (it is tried again at the next run).
    pub fn maintenance_failed(&self) {
        self.maintenance.lock().expect("metrics lock").failures += 1;
    }

    /// A maintenance run that finished (possibly with failed tables).
    pub fn maintenance_done(&self) {
        self.maintenance.lock().expect("metrics lock").runs += 1;
    }

    /// A scheduled run that did not happen: another instance held the lease, or NATS or the
    /// lake could not be reached.
    pub fn maintenance_skipped(&self) {
        self.maintenance.lock().expect("metrics lock").skipped += 1;
    }

    /// The statistics of one table, created on first use.
    pub fn table(&self, table: &str) -> std::sync::Arc<TableMetrics> {
        let mut tables = self.tables.lock().expect("metrics lock");
        if let Some(t) = tables.iter().find(|t| t.table == table) {
            return t.clone();
        }
        let t = std::sync::Arc::new(TableMetrics {
            table: table.to_string(),
            rows: AtomicU64::new(0),
            commits: AtomicU64::new(0),
            latency: Histogram::new(),
        });
        tables.push(t.clone());
        t
    }

    /// Remembers the last error of a component.
    pub fn set_last_error(&self, component: &'static str, reason: &str) {
        let mut errors = self.last_errors.lock().expect("metrics lock");
        errors.retain(|(c, _, _)| *c != component);
        errors.push((component, reason.to_string(), chrono::Utc::now()));
    }

    /// Records that ingest has stopped for `reason` (a panic, an error retrying cannot fix, or
    /// in-flight messages that could not be committed before shutdown): `/healthz` answers 503
    /// naming it, and `fleetlake serve` exits non-zero.
    pub(crate) fn stop_ingest(&self, reason: &str) {
        tracing::error!(%reason, "ingest stopped");
        self.set_last_error("ingest", reason);
        self.ingest_stopped.store(1, Ordering::Relaxed);
    }

    /// Why ingest is not running, when it stopped on its own (see [`Metrics::stop_ingest`]) or a
    /// `FAIL` expectation stopped the pipelines.
    pub fn stopped_reason(&self) -> Option<String> {
        for (flag, component) in [
            (&self.ingest_stopped, "ingest"),
            (&self.pipeline_failed, "pipeline"),
        ] {
            if flag.load(Ordering::Relaxed) != 0 {
                let reason = self
                    .last_error(component)
                    .map(|(r, _)| r)
                    .unwrap_or_else(|| format!("{component} stopped"));
                return Some(reason);
            }
        }
        None
    }

    /// The last error of a component and when it happened.
    pub fn last_error(&self, component: &str) -> Option<(String, chrono::DateTime<chrono::Utc>)> {
        let errors = self.last_errors.lock().expect("metrics lock");
        errors
            .iter()
            .find(|(c, _, _)| *c == component)
            .map(|(_, r, t)| (r.clone(), *t))
    }

    /// Adds one batch's counts for a pipeline (after its commits).
    pub fn record_pipeline(&self, counts: &PipelineCounts) {
        let mut pipelines = self.pipelines.lock().expect("metrics lock");
        let p = pipelines.entry(counts.name.clone()).or_default();
        p.rows_in += counts.rows_in;
        p.deduplicated += counts.deduplicated;
        p.restarts += counts.restarts;
        self.dedup_restarts
            .fetch_add(counts.restarts, Ordering::Relaxed);
        p.rows_out += counts.rows_out;
        p.quarantined += counts.quarantined;
        p.dropped += counts.dropped;
        p.warned += counts.warned;
        for c in &counts.expectations {
            let key = format!("{}/{}", c.table, c.expectation);
            let e = p
                .expectations
                .entry(key)
                .or_insert_with(|| ExpectationCounter {
                    table: c.table.to_string(),
                    expectation: c.expectation.clone(),
                    action: format!("{:?}", c.action).to_lowercase(),
                    violations: 0,
                });
            e.violations += c.violations;
        }
    }

    /// Counts published transitions per rule and state, and sets the keys firing now of the
    /// rules that run (`firing`: rule → keys); rules that no longer run fire nothing.
    pub fn record_rules(
        &self,
        transitions: &[fleetlake_sql::rules::Transition],
        firing: &[(String, usize)],
    ) {
        let mut rules = self.rules.lock().expect("metrics lock");
        for r in rules.values_mut() {
            r.firing_keys = 0;
        }
        for (rule, keys) in firing {
            rules.entry(rule.clone()).or_default().firing_keys = *keys as u64;
        }
        for t in transitions {
            let r = rules.entry(t.rule.clone()).or_default();
            match t.state.as_str() {
                fleetlake_sql::rules::FIRING => r.fired += 1,
                _ => r.resolved += 1,
            }
        }
    }

    /// Counters of every rule that has run.
    pub fn rules(&self) -> std::collections::BTreeMap<String, RuleCounters> {
        self.rules.lock().expect("metrics lock").clone()
    }

    /// Counters of every pipeline that has run.
    pub fn pipelines(&self) -> std::collections::BTreeMap<String, PipelineCounters> {
        self.pipelines.lock().expect("metrics lock").clone()
    }

    /// Rows committed so far to every table of a zone (`"usable"`).
    pub fn rows_committed_in_zone(&self, zone: &str) -> u64 {
        let prefix = format!("{zone}.");
        self.tables
            .lock()
            .expect("metrics lock")
            .iter()
            .filter(|t| t.table.starts_with(&prefix))
            .map(|t| t.rows.load(Ordering::Relaxed))
            .sum()
    }

    /// Rows committed to a table so far by this process.
    pub fn rows_committed(&self, table: &str) -> u64 {
        self.table(table).rows.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        m.messages_pulled.fetch_add(5, Ordering::Relaxed);
        let t = m.table("raw.telemetry");
        t.rows.fetch_add(5, Ordering::Relaxed);
        t.latency.observe(Duration::from_millis(30));
        let text = m.render();
        assert!(
            text.contains("fleetlake_messages_pulled_total 5\n"),
            "{text}"
        );
        assert!(
            text.contains("fleetlake_rows_committed_total{table=\"raw.telemetry\"} 5\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "fleetlake_commit_seconds_bucket{table=\"raw.telemetry\",le=\"0.05\"} 1\n"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "fleetlake_commit_seconds_bucket{table=\"raw.telemetry\",le=\"0.025\"} 0\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("fleetlake_commit_seconds_count{table=\"raw.telemetry\"} 1\n"),
            "{text}"
        );
    }
}

/// What `GET /v1/cluster` and `/healthz` show of this instance's group.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ClusterStatus {
    pub instance: String,
    pub partitions: u32,
    /// The partitions this instance consumes, with when it took each (RFC 3339).
    pub owned: Vec<OwnedPartition>,
    /// Every partition's holder as the lease bucket last said (`None`: nobody holds it).
    pub holders: std::collections::BTreeMap<u32, Option<String>>,
    /// The members seen in the lease bucket, this one included.
    pub members: Vec<String>,
    /// The fleet-wide window tables and rules: computed by one elected instance
    /// (`cluster.fleet_wide = merge`) or not at all (`skip`).
    pub fleet_wide: Vec<String>,
    /// Who computes them (the holder of the lease `fleet`); `None` with `skip`, or while
    /// nobody does.
    pub fleet_wide_by: Option<String>,
    /// The fleet-wide window tables and rules not computed (`cluster.fleet_wide = skip`).
    pub not_computed: Vec<String>,
    /// Partitions this instance took a lease on (at start, after an owner died, on rebalancing).
    pub takeovers: u64,
    /// Partitions it handed back to balance the group.
    pub released: u64,
    /// Partitions whose lease it lost without handing them back (it expired and another
    /// instance took it): its ingest of them stopped at once.
    pub lost: u64,
}

/// One owned partition.
#[derive(Debug, Clone, serde::Serialize)]
pub struct OwnedPartition {
    pub partition: u32,
    pub since: String,
}

/// The text of a panic's payload (`&str` or `String`, as `panic!` makes them).
pub(crate) fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}
