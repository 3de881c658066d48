//! Table maintenance for the whole lake: which tables, with which policy, by which instance.
//!
//! The steps on one table (retention, compaction, checkpoints, log cleanup, vacuum) are
//! [`fleetlake_zones::maintain`]'s; this module runs them over every table of the lake, one table
//! at a time (so that ingest keeps its cores), under a lease in a NATS key-value bucket so that
//! only one fleetlake instance on a lake maintains it at a time, from `serve` on a schedule
//! ([`schedule`]) and from `fleetlake maintain` ([`run`]).

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use fleetlake_zones::maintain::{self, Report};
use fleetlake_zones::{Lake, TableId};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::metrics::{Metrics, TableShape};

/// The key of the lease in the bucket.
const LEASE_KEY: &str = "lease";

/// The maintenance lease: held by one instance at a time, renewed every third of its time to
/// live while the holder works, gone when its holder stops renewing it for the bucket's
/// `max_age` (`maintenance.lease_ttl_s`).
pub struct Lease {
    store: jetstream::kv::Store,
    revision: u64,
    holder: String,
    ttl: Duration,
}

/// A lease renewed in the background ([`Lease::keep_alive`]).
pub struct HeldLease {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Lease>,
}

impl HeldLease {
    /// Stops renewing and gives the lease up.
    pub async fn release(self) {
        let _ = self.stop.send(());
        if let Ok(lease) = self.task.await {
            lease.release().await;
        }
    }
}

/// Why the lease could not be used.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("another instance holds the maintenance lease ({0})")]
    Held(String),
    #[error("the maintenance lease in bucket {bucket}: {reason}")]
    Nats { bucket: String, reason: String },
}

impl Lease {
    /// Takes the lease in `bucket` (created with `max_age = ttl` if absent).
    pub async fn acquire(
        js: &jetstream::Context,
        bucket: &str,
        ttl: Duration,
    ) -> Result<Self, LeaseError> {
        let nats = |reason: String| LeaseError::Nats {
            bucket: bucket.to_string(),
            reason,
        };
        let store = match js.get_key_value(bucket).await {
            Ok(store) => store,
            Err(_) => js
                .create_key_value(jetstream::kv::Config {
                    bucket: bucket.to_string(),
                    description: "fleetlake: which instance maintains the lake".into(),
                    history: 1,
                    max_age: ttl,
                    ..Default::default()
                })
                .await
                .map_err(|e| nats(e.to_string()))?,
        };
        // The bucket's max age decides when a dead holder's lease expires; it was fixed when the
        // bucket was created, possibly with another `maintenance.lease_ttl_s`. Renewals follow
        // the shorter of the two.
        let ttl = match store.status().await.map(|s| s.info.config.max_age) {
            Ok(max_age) if !max_age.is_zero() => max_age.min(ttl),
            _ => ttl,
        };
        let holder = format!(
            "{}:{} since {}",
            std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".into()),
            std::process::id(),
            chrono::Utc::now().to_rfc3339()
        );
        match store.create(LEASE_KEY, holder.clone().into()).await {
            Ok(revision) => Ok(Self {
                store,
                revision,
                holder,
                ttl,
            }),
            Err(e) if e.kind() == jetstream::kv::CreateErrorKind::AlreadyExists => {
                let current = store
                    .get(LEASE_KEY)
                    .await
                    .ok()
                    .flatten()
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
                    .unwrap_or_else(|| "unknown holder".into());
                Err(LeaseError::Held(current))
            }
            Err(e) => Err(nats(e.to_string())),
        }
    }

    /// Renews the lease; an error means it was lost (it expired and another instance took it).
    pub async fn renew(&mut self) -> Result<(), LeaseError> {
        match self
            .store
            .update(LEASE_KEY, self.holder.clone().into(), self.revision)
            .await
        {
            Ok(revision) => {
                self.revision = revision;
                Ok(())
            }
            Err(e) => Err(LeaseError::Nats {
                bucket: self.store.name.clone(),
                reason: format!("lost: {e}"),
            }),
        }
    }

    /// Keeps the lease renewed in the background (every third of its time to live) until
    /// [`HeldLease::release`]: for work that cannot renew it itself, such as a replay.
    pub fn keep_alive(mut self) -> HeldLease {
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = &mut stopped => return self,
                    _ = tokio::time::sleep(self.ttl / 3) => {
                        if let Err(e) = self.renew().await {
                            tracing::warn!(error = %e, "the maintenance lease could not be renewed");
                        }
                    }
                }
            }
        });
        HeldLease { stop, task }
    }

    /// Gives the lease up so that another instance need not wait for it to expire.
    pub async fn release(self) {
        if let Err(e) = self
            .store
            .delete_expect_revision(LEASE_KEY, Some(self.revision))
            .await
        {
            tracing::warn!(error = %e, "releasing the maintenance lease failed; it expires on its own");
        }
    }
}

/// One table's outcome in a run.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum Outcome {
    Done(Box<Report>),
    Failed { table: String, error: String },
}

/// How a run differs from `serve`'s scheduled one.
#[derive(Debug, Clone, Copy)]
pub struct RunOptions {
    /// Plan and report, change nothing.
    pub dry_run: bool,
    /// Vacuum in full mode (list every file, also finding the files of commits that never
    /// completed) whatever the last full vacuum's time; `serve` does so once a day.
    pub full_vacuum: bool,
    /// After `cancel`, how long the table in hand may take before its work is dropped.
    pub grace: Duration,
}

/// What `fleetlake maintain` prints.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    pub dry_run: bool,
    pub tables: Vec<Outcome>,
    pub files_before: u64,
    pub files_after: u64,
    pub files_vacuumed: u64,
    pub log_files_removed: u64,
    pub partitions_rewritten: u64,
    pub partitions_expired: u64,
    pub failed: u64,
    /// Why the run stopped before the last table (the lease was lost, shutdown), if it did.
    pub interrupted: Option<String>,
}

/// Maintains `ids` one after the other with each table's policy from `config`; `progress` is
/// called before each table with its index. A table that fails is reported (and counted in
/// `metrics`) and the others are still maintained. With a lease, it is renewed every third of
/// its time to live and after each table; if it is lost, the work on the table in hand is
/// dropped before its next commit and the run stops (`Summary::interrupted`). When `cancel` is
/// cancelled, the table in hand gets `options.grace` to finish.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    lake: &Lake,
    config: &Config,
    ids: &[TableId],
    options: RunOptions,
    metrics: Option<&Metrics>,
    mut lease: Option<&mut Lease>,
    mut progress: impl FnMut(usize, &TableId),
    cancel: &CancellationToken,
) -> Summary {
    let mut summary = Summary {
        dry_run: options.dry_run,
        ..Summary::default()
    };
    for (i, id) in ids.iter().enumerate() {
        if cancel.is_cancelled() {
            summary.interrupted = Some("shutting down".into());
            break;
        }
        progress(i, id);
        let mut policy = config.maintenance_policy(id);
        policy.dry_run = options.dry_run;
        if options.full_vacuum {
            policy.full_vacuum_every = None;
        }
        let work = maintain::maintain(lake, id, &policy);
        tokio::pin!(work);
        // The lease is renewed while the table is worked on. If it is lost, the work on the
        // table is dropped at once, before its next commit: another instance may hold the lease
        // now, and two compactions of the same files would both commit (delta-rs does not see
        // removes with `dataChange = false` as conflicting), leaving rows twice. On shutdown the
        // table in hand gets `grace` to finish.
        let renew_every = lease
            .as_deref()
            .map_or(Duration::from_secs(3600), |l| l.ttl / 3);
        let mut tick =
            tokio::time::interval_at(tokio::time::Instant::now() + renew_every, renew_every);
        let stopping = async {
            cancel.cancelled().await;
            tokio::time::sleep(options.grace).await;
        };
        tokio::pin!(stopping);
        let result = loop {
            tokio::select! {
                result = &mut work => break Some(result),
                _ = &mut stopping => {
                    summary.interrupted = Some("shutting down".into());
                    break None;
                }
                _ = tick.tick(), if lease.is_some() => {
                    if let Some(lease) = lease.as_deref_mut()
                        && let Err(e) = lease.renew().await
                    {
                        summary.interrupted = Some(e.to_string());
                        break None;
                    }
                }
            }
        };
        let Some(result) = result else {
            tracing::warn!(table = %id, reason = summary.interrupted.as_deref().unwrap_or(""), "maintenance of this table abandoned before its next commit");
            break;
        };
        match result {
            Ok(report) => {
                if let Some(m) = metrics {
                    let shape = TableShape {
                        files: report.files_after,
                        bytes: report.bytes_after,
                        version: report.version_after,
                        maintained_at: chrono::Utc::now().timestamp(),
                    };
                    let rewritten = report.rewrites.iter().map(|r| r.files_removed).sum();
                    m.table_maintained(
                        &report.table,
                        shape,
                        rewritten,
                        report.files_vacuumed,
                        report.log_files_removed,
                    );
                }
                summary.files_before += report.files_before;
                summary.files_after += report.files_after;
                summary.files_vacuumed += report.files_vacuumed;
                summary.log_files_removed += report.log_files_removed;
                summary.partitions_rewritten += report.rewrites.len() as u64;
                summary.partitions_expired += report.expired_partitions.len() as u64;
                summary.tables.push(Outcome::Done(Box::new(report)));
            }
            // A table that disappeared between listing and maintaining is not a failure.
            Err(fleetlake_zones::Error::UnknownTable(_)) => {}
            Err(e) => {
                tracing::warn!(table = %id, error = %e, "maintenance failed");
                if let Some(m) = metrics {
                    m.maintenance_failed();
                }
                summary.failed += 1;
                summary.tables.push(Outcome::Failed {
                    table: id.to_string(),
                    error: e.to_string(),
                });
            }
        }
        if summary.interrupted.is_none()
            && let Some(lease) = lease.as_deref_mut()
            && let Err(e) = lease.renew().await
        {
            summary.interrupted = Some(e.to_string());
        }
        if let Some(reason) = &summary.interrupted {
            tracing::warn!(%reason, "maintenance stopped before the other tables");
            break;
        }
    }
    summary
}

/// `serve`'s maintenance loop: every `maintenance.interval_s`, takes the lease, maintains every
/// table and records the outcome in `metrics`; a run is skipped when another instance holds the
/// lease or NATS cannot be reached. Ends when `cancel` is cancelled, after the table in hand.
pub async fn schedule(
    lake: Lake,
    config: Config,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) {
    let interval = config.maintenance_interval();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        let js = match crate::ingest::source::connect_with(&config.nats()).await {
            Ok(js) => js,
            Err(e) => {
                tracing::warn!(error = %e, "maintenance skipped: NATS unreachable for its lease");
                metrics.maintenance_skipped();
                continue;
            }
        };
        let mut lease = match Lease::acquire(
            &js,
            config.maintenance_lease_bucket(),
            config.maintenance_lease_ttl(),
        )
        .await
        {
            Ok(lease) => lease,
            Err(e) => {
                tracing::info!(reason = %e, "maintenance skipped");
                metrics.maintenance_skipped();
                continue;
            }
        };
        let ids = match lake.all_tables().await {
            Ok(ids) => ids,
            Err(e) => {
                tracing::warn!(error = %e, "maintenance skipped: listing the tables failed");
                metrics.maintenance_skipped();
                lease.release().await;
                continue;
            }
        };
        // On shutdown the table in hand is finished (stopping in the middle of a step would be
        // safe for the lake, but delta-rs's blocking tasks panic when the runtime goes away
        // under them); the run stops before the next one.
        let summary = run(
            &lake,
            &config,
            &ids,
            RunOptions {
                dry_run: false,
                full_vacuum: false,
                grace: config.shutdown_grace(),
            },
            Some(&metrics),
            Some(&mut lease),
            |_, _| {},
            &cancel,
        )
        .await;
        lease.release().await;
        if let Some(reason) = &summary.interrupted {
            tracing::info!(%reason, "maintenance run interrupted");
            metrics.maintenance_skipped();
            continue;
        }
        tracing::info!(
            files_before = summary.files_before,
            files_after = summary.files_after,
            vacuumed = summary.files_vacuumed,
            failed = summary.failed,
            "maintenance run done"
        );
        metrics.maintenance_done();
    }
}
