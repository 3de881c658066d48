//! `/metrics`: every counter, gauge and histogram in the Prometheus text format.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;

use super::*;

impl Metrics {
    /// Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut counter = |name: &str, help: &str, kind: &str, value: String| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        };
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed).to_string();
        counter(
            "fleetlake_messages_pulled_total",
            "Messages received from JetStream.",
            "counter",
            load(&self.messages_pulled),
        );
        counter(
            "fleetlake_messages_acked_total",
            "Messages acknowledged to JetStream after their commits were durable.",
            "counter",
            load(&self.messages_acked),
        );
        counter(
            "fleetlake_quarantined_total",
            "Messages written to raw.quarantine.",
            "counter",
            load(&self.quarantined),
        );
        counter(
            "fleetlake_duplicates_dropped_total",
            "Device replays dropped before usable.telemetry.",
            "counter",
            load(&self.duplicates_dropped),
        );
        counter(
            "fleetlake_late_rows_total",
            "Rows left out of window tables because their window had closed (kept in usable).",
            "counter",
            load(&self.late_rows),
        );
        counter(
            "fleetlake_alerts_published_total",
            "Alert transitions published to JetStream.",
            "counter",
            load(&self.alerts_published),
        );
        counter(
            "fleetlake_alertmanager_sent_total",
            "Alerts sent to Alertmanager (firing alerts are re-sent every alerts.alertmanager_resend_s).",
            "counter",
            load(&self.alertmanager_sent),
        );
        let am_up = self.alertmanager_up.load(Ordering::Relaxed);
        if am_up >= 0 {
            counter(
                "fleetlake_alertmanager_up",
                "1 while alerts reach Alertmanager, 0 while deliveries fail (retried) or are refused.",
                "gauge",
                am_up.to_string(),
            );
        }
        counter(
            "fleetlake_alertmanager_errors_total",
            "Failed requests to Alertmanager (retried with backoff).",
            "counter",
            load(&self.alertmanager_errors),
        );
        counter(
            "fleetlake_dedup_forgotten_total",
            "Dedup intervals forgotten because a device exceeded dedup.max_gaps.",
            "counter",
            load(&self.dedup_forgotten),
        );
        counter(
            "fleetlake_dedup_restarts_total",
            "Devices seen restarting their sequence numbers (a reboot: seq at or below the high-water mark with a newer event time); their readings are kept.",
            "counter",
            load(&self.dedup_restarts),
        );
        counter(
            "fleetlake_dedup_keys",
            "Devices (or message ids) the dedup state remembers.",
            "gauge",
            self.dedup_keys.load(Ordering::Relaxed).to_string(),
        );
        if let Some(memory) = self.query_memory.get() {
            counter(
                "fleetlake_query_memory_reserved_bytes",
                "Memory the running queries hold in their pools, of the budget all queries share.",
                "gauge",
                memory.reserved().to_string(),
            );
            counter(
                "fleetlake_query_memory_limit_bytes",
                "The memory all queries together may hold (query.total_memory_mb).",
                "gauge",
                memory.limit().to_string(),
            );
        }
        counter(
            "fleetlake_consumer_lag",
            "Messages in the stream not yet delivered to fleetlake's consumer.",
            "gauge",
            match self.cluster.lock().expect("metrics lock").is_some() {
                true => self.partition_lags().values().sum::<i64>(),
                false => self.consumer_lag.load(Ordering::Relaxed),
            }
            .to_string(),
        );
        counter(
            "fleetlake_messages_refetched_total",
            "Messages the NATS client did not deliver (a subject or header it cannot parse), read directly by their stream sequence.",
            "counter",
            load(&self.messages_refetched),
        );
        counter(
            "fleetlake_messages_missing_total",
            "Stream sequences no longer in the stream when fleetlake read them (deleted, purged, or removed by the stream's limits).",
            "counter",
            load(&self.messages_missing),
        );
        counter(
            "fleetlake_storage_errors_total",
            "Failed commit attempts (retried with backoff).",
            "counter",
            load(&self.storage_errors),
        );
        counter(
            "fleetlake_source_errors_total",
            "NATS consumer errors (the consumer is reopened).",
            "counter",
            load(&self.source_errors),
        );
        counter(
            "fleetlake_storage_up",
            "1 when the last commit to object storage succeeded.",
            "gauge",
            self.storage_up.load(Ordering::Relaxed).to_string(),
        );
        counter(
            "fleetlake_source_up",
            "1 when the NATS consumer is connected.",
            "gauge",
            self.source_up.load(Ordering::Relaxed).to_string(),
        );
        let _ = writeln!(
            out,
            "# HELP fleetlake_batch_seconds Time from the first message of a micro-batch being taken to its ack.\n# TYPE fleetlake_batch_seconds histogram"
        );
        self.batch_latency
            .render(&mut out, "fleetlake_batch_seconds", "");
        let rules = self.rules();
        let _ = writeln!(
            out,
            "# HELP fleetlake_rule_alerts_total Alert transitions each rule published, by state.\n# TYPE fleetlake_rule_alerts_total counter"
        );
        for (name, r) in &rules {
            for (state, v) in [("firing", r.fired), ("resolved", r.resolved)] {
                let _ = writeln!(
                    out,
                    "fleetlake_rule_alerts_total{{rule=\"{name}\",state=\"{state}\"}} {v}"
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP fleetlake_rule_keys_firing Keys whose alert is firing now, per rule.\n# TYPE fleetlake_rule_keys_firing gauge"
        );
        for (name, r) in &rules {
            let _ = writeln!(
                out,
                "fleetlake_rule_keys_firing{{rule=\"{name}\"}} {}",
                r.firing_keys
            );
        }
        let pipelines = self.pipelines();
        let _ = writeln!(
            out,
            "# HELP fleetlake_pipeline_rows_total Rows through each pipeline, by kind (in, out, quarantined, dropped, warned).\n# TYPE fleetlake_pipeline_rows_total counter"
        );
        for (name, p) in &pipelines {
            for (kind, v) in [
                ("in", p.rows_in),
                ("deduplicated", p.deduplicated),
                ("out", p.rows_out),
                ("quarantined", p.quarantined),
                ("dropped", p.dropped),
                ("warned", p.warned),
            ] {
                let _ = writeln!(
                    out,
                    "fleetlake_pipeline_rows_total{{pipeline=\"{name}\",kind=\"{kind}\"}} {v}"
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP fleetlake_expectation_violations_total Rows that violated each expectation.\n# TYPE fleetlake_expectation_violations_total counter"
        );
        for (name, p) in &pipelines {
            for e in p.expectations.values() {
                let _ = writeln!(
                    out,
                    "fleetlake_expectation_violations_total{{pipeline=\"{name}\",table=\"{}\",expectation=\"{}\",action=\"{}\"}} {}",
                    e.table, e.expectation, e.action, e.violations
                );
            }
        }
        let maintenance = self.maintenance.lock().expect("metrics lock").clone();
        for (name, help, v) in [
            (
                "fleetlake_maintenance_runs_total",
                "Table maintenance runs finished by this instance.",
                maintenance.runs,
            ),
            (
                "fleetlake_maintenance_skipped_total",
                "Scheduled maintenance runs skipped or cut short (another instance held the lease, the lease was lost, or NATS or the lake was unreachable).",
                maintenance.skipped,
            ),
            (
                "fleetlake_maintenance_failures_total",
                "Tables whose maintenance failed (tried again at the next run).",
                maintenance.failures,
            ),
            (
                "fleetlake_maintenance_files_rewritten_total",
                "Small files compaction replaced.",
                maintenance.files_rewritten,
            ),
            (
                "fleetlake_maintenance_files_vacuumed_total",
                "Unreferenced data files vacuum deleted.",
                maintenance.files_vacuumed,
            ),
            (
                "fleetlake_maintenance_log_files_removed_total",
                "Expired Delta log entries deleted.",
                maintenance.log_files_removed,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        }
        for (name, help, get) in [
            (
                "fleetlake_table_files",
                "Live data files per table, as maintenance last saw them.",
                (|t: &TableShape| t.files as i64) as fn(&TableShape) -> i64,
            ),
            (
                "fleetlake_table_bytes",
                "Bytes of live data files per table, as maintenance last saw them.",
                |t: &TableShape| t.bytes as i64,
            ),
            (
                "fleetlake_table_version",
                "Delta version per table, as maintenance last saw it.",
                |t: &TableShape| t.version as i64,
            ),
            (
                "fleetlake_table_maintained_timestamp_seconds",
                "When maintenance last finished with each table (Unix time).",
                |t: &TableShape| t.maintained_at,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
            for (table, shape) in &maintenance.tables {
                let _ = writeln!(out, "{name}{{table=\"{table}\"}} {}", get(shape));
            }
        }
        let tables = self.tables.lock().expect("metrics lock").clone();
        let _ = writeln!(
            out,
            "# HELP fleetlake_rows_committed_total Rows committed per table.\n# TYPE fleetlake_rows_committed_total counter"
        );
        for t in &tables {
            let _ = writeln!(
                out,
                "fleetlake_rows_committed_total{{table=\"{}\"}} {}",
                t.table,
                t.rows.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP fleetlake_commits_total Delta commits per table.\n# TYPE fleetlake_commits_total counter"
        );
        for t in &tables {
            let _ = writeln!(
                out,
                "fleetlake_commits_total{{table=\"{}\"}} {}",
                t.table,
                t.commits.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP fleetlake_commit_seconds Delta commit latency per table.\n# TYPE fleetlake_commit_seconds histogram"
        );
        for t in &tables {
            t.latency.render(
                &mut out,
                "fleetlake_commit_seconds",
                &format!("table=\"{}\"", t.table),
            );
        }
        self.render_cluster(&mut out);
        out
    }

    fn render_cluster(&self, out: &mut String) {
        let Some(c) = self.cluster() else {
            return;
        };
        let lags = self.partition_lags();
        let _ = writeln!(
            out,
            "# HELP fleetlake_partition_owned Partitions of the stream, 1 for those this instance consumes.\n# TYPE fleetlake_partition_owned gauge"
        );
        for p in 0..c.partitions {
            let owned = c.owned.iter().any(|o| o.partition == p);
            let _ = writeln!(
                out,
                "fleetlake_partition_owned{{partition=\"{p}\"}} {}",
                u8::from(owned)
            );
        }
        let _ = writeln!(
            out,
            "# HELP fleetlake_partition_consuming Partitions this instance owns, 1 once its ingest consumes it (0 while a partition just taken opens its tables and rebuilds its state).\n# TYPE fleetlake_partition_consuming gauge"
        );
        for o in &c.owned {
            let _ = writeln!(
                out,
                "fleetlake_partition_consuming{{partition=\"{}\"}} {}",
                o.partition,
                u8::from(self.is_partition_consuming(o.partition))
            );
        }
        let _ = writeln!(
            out,
            "# HELP fleetlake_partition_lag Messages of a partition this instance consumes not yet delivered to it.\n# TYPE fleetlake_partition_lag gauge"
        );
        for o in &c.owned {
            let lag = lags.get(&o.partition).copied().unwrap_or(0);
            let _ = writeln!(
                out,
                "fleetlake_partition_lag{{partition=\"{}\"}} {lag}",
                o.partition
            );
        }
        for (name, help, kind, value) in [
            (
                "fleetlake_cluster_members",
                "Members of the cluster this instance sees (itself included).",
                "gauge",
                c.members.len() as u64,
            ),
            (
                "fleetlake_fleet_wide_position",
                "Stream sequence up to which this instance's fleet-wide windows and rules have committed (0 on the instances that do not compute them).",
                "gauge",
                self.fleet_wide_position.load(Ordering::Relaxed).max(0) as u64,
            ),
            (
                "fleetlake_partition_takeovers_total",
                "Partitions this instance took a lease on and started consuming (at start, after an owner died, on rebalancing).",
                "counter",
                c.takeovers,
            ),
            (
                "fleetlake_partition_released_total",
                "Partitions this instance handed to another member after committing what it took.",
                "counter",
                c.released,
            ),
            (
                "fleetlake_partition_lost_total",
                "Partition leases this instance lost without handing them back (expired and taken by another member).",
                "counter",
                c.lost,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        }
    }
}
