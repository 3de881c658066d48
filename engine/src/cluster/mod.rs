//! Scale-out: several instances share one stream and one lake, each partition consumed by one
//! instance at a time.
//!
//! ```text
//!  publish telemetry.coldchain.d1 ─► stream (subject transform  > → fleetlake.{{partition(P)}}.>)
//!                                      stored as fleetlake.<p>.telemetry.coldchain.d1
//!  instance A ── lease partition.0, partition.3 ─► ingest of p0 (consumer <c>-p0-<lease>, filter fleetlake.0.>)
//!  instance B ── lease partition.1, partition.4 ─► ingest of p1 …   (txn app id <c>-p1, state <c>-p1)
//!  instance C ── lease partition.2, partition.5 ─► …
//!             └── lease fleet ─► ingest::fleet: fleet-wide windows and rules over the committed
//!                                usable rows of every partition (txn app id <c>-fleet)
//!                 ▲ NATS key-value bucket (cluster.lease_bucket): member.<id>, partition.<p>, fleet
//! ```
//!
//! - **Partitions**: when fleetlake creates the stream with `cluster.partitions = P`, it maps
//!   every subject to one of P partitions with NATS's own subject mapping (FNV-1a of the whole
//!   subject, [`fleetlake_sql::hash::nats_partition`]): a device's messages on its subject stay
//!   in order in one partition, and so do its dedup, window and rule state.
//! - **Ownership** without a coordinator of fleetlake's own: a partition is consumed by the
//!   instance holding its lease, a key in a NATS key-value bucket created with compare-and-set
//!   and renewed by revision; the bucket's `max_age` (`cluster.lease_ttl_s`) expires the leases of
//!   an instance that died, and survivors take them. Members announce themselves in the same
//!   bucket; each takes its share (P / members, the first P mod members one more, by id), and
//!   one holding more than its share hands the extra back after committing what it took.
//! - **Exactly once per partition**: a partition's ingest is the single-instance ingest
//!   ([`crate::ingest::run`]) with its own Delta `txn` application id (`<nats.consumer>-p<p>`)
//!   and a durable consumer per owner (`<nats.consumer>-p<p>-<lease revision>`, deleting its
//!   predecessors': [`Config::for_partition`]); its state snapshots carry the same id
//!   and its rebuilds read only the partition's rows ([`Partition::scope`]). A takeover resumes
//!   where the partition's last commit ended, with the partition's state as of it. A previous
//!   owner that lost its lease without noticing (paused, cut off from NATS) is fenced by Delta:
//!   a commit carrying a `txn` of an application id another commit advanced since it read the
//!   table conflicts, and is retried only for the rows above the new position.
//! - **Fleet-wide results**: window tables not grouped by `device_id`, and rules over them (or
//!   grouping cohorts), sum up rows of many partitions; a partition cannot compute them alone.
//!   One instance, the holder of the lease `fleet`, computes them over every partition's
//!   committed rows in stream order ([`crate::ingest::fleet`]); `cluster.fleet_wide = skip`
//!   leaves them out (listed in `GET /v1/cluster`). See the README, "Running several instances".

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::kv;
use fleetlake_zones::Lake;
use futures::StreamExt;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::error::{Error, Stopped};
use crate::ingest::pipelines::Declared;
use crate::metrics::Metrics;

pub use crate::config::partition::{PREFIX, Partition, subject_transform};

pub use crate::metrics::{ClusterStatus, OwnedPartition};

/// Why the cluster's bucket could not be used.
fn nats_error(action: &str, e: impl std::fmt::Display) -> String {
    format!("the cluster's lease bucket: {action}: {e}")
}

/// A partition this instance consumes.
struct Owned {
    revision: u64,
    renewed: Instant,
    since: chrono::DateTime<chrono::Utc>,
    stop: CancellationToken,
    task: JoinHandle<()>,
    /// Whether this loop asked it to stop (handing it back, shutting down); ingest cancels
    /// its own token when it fails, which is not a hand-back.
    asked: bool,
}

impl Owned {
    /// A lease just taken at `revision`, and the task working under it.
    fn new(revision: u64, stop: CancellationToken, task: JoinHandle<()>) -> Self {
        Self {
            revision,
            renewed: Instant::now(),
            since: chrono::Utc::now(),
            stop,
            task,
            asked: false,
        }
    }
}

/// The share of `partitions` that the member at `rank` (0-based, members sorted by id) of
/// `members` takes: an even split, the first `partitions % members` taking one more.
pub fn share(partitions: u32, members: usize, rank: usize) -> usize {
    let (p, n) = (partitions as usize, members.max(1));
    p / n + usize::from(rank < p % n)
}

/// The lease key of the fleet-wide windows and rules ([`crate::ingest::fleet`]).
const FLEET_KEY: &str = "fleet";

/// The lease key of the fleet-wide stage (its map of one is keyed 0).
fn fleet_key(_: u32) -> String {
    FLEET_KEY.into()
}

/// The lease key of partition `p`.
fn lease_key(p: u32) -> String {
    format!("partition.{p}")
}

/// The member key of instance `id`.
fn member_key(id: &str) -> String {
    format!("member.{id}")
}

/// Joins the group and consumes the partitions this instance holds leases for until `cancel`
/// fires; then stops their ingest (committing and acknowledging what was taken) and hands the
/// leases back so survivors take them at once. A partition's ingest that stops on its own (an
/// error retrying cannot fix, a panic) stops the instance: it is recorded (`/healthz`) and
/// every other partition is stopped the same way.
pub async fn run(
    config: Config,
    lake: Lake,
    declared: Declared,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) {
    let id = config.instance_id();
    let partitions = config.partitions();
    let ttl = config.cluster_lease_ttl();
    let (declared, fleet_declared, fleet_wide) = crate::ingest::fleet::split_fleet_wide(&declared);
    let merge = !fleet_wide.is_empty() && !config.skip_fleet_wide();
    let not_computed = if merge {
        Vec::new()
    } else {
        fleet_wide.clone()
    };
    for what in &not_computed {
        tracing::warn!("cluster.fleet_wide = skip: not computed in a cluster: {what}");
    }
    metrics.set_cluster(ClusterStatus {
        instance: id.clone(),
        partitions,
        fleet_wide: fleet_wide.clone(),
        not_computed: not_computed.clone(),
        ..Default::default()
    });
    let mut backoff = crate::ingest::commit::Backoff::new();
    // The stream is created (with its mapping) before any partition is claimed, so a
    // misconfigured one stops the instance before it takes leases others could use.
    let (store, ttl) = loop {
        match open_bucket(&config, ttl).await {
            Ok(s) => break s,
            Err(Join::Refused(e)) => {
                metrics.set_last_error("source", &e);
                let _stopped = Stopped::because(&metrics, format!("ingest stopped: {e}"));
                return;
            }
            Err(Join::Failed(e)) => {
                tracing::warn!(error = %e, "joining the cluster failed; retrying");
                metrics.set_last_error("source", &e);
                metrics
                    .source_up
                    .store(0, std::sync::atomic::Ordering::Relaxed);
                if backoff.wait(&cancel).await.is_err() {
                    return;
                }
            }
        }
    };
    // Two members with one id would both take its leases for theirs: a previous incarnation's
    // announcement (a crash) is waited out; one renewed meanwhile is a live instance.
    if let Ok(Some(seen)) = store.entry(member_key(&id)).await
        && seen.operation == kv::Operation::Put
    {
        tracing::warn!(instance = %id, "a member with this id was seen within the lease TTL: waiting for it to expire before joining");
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(ttl + ttl / 2) => {}
        }
        if let Ok(Some(again)) = store.entry(member_key(&id)).await
            && again.operation == kv::Operation::Put
            && again.revision != seen.revision
        {
            let e = format!(
                "another instance is running with cluster.instance = {id}: each member of a cluster needs its own id"
            );
            metrics.set_last_error("source", &e);
            let _stopped = Stopped::because(&metrics, format!("ingest stopped: {e}"));
            return;
        }
    }
    tracing::info!(instance = %id, partitions, ttl_s = ttl.as_secs_f64(), "joined the cluster");
    let mut owned: BTreeMap<u32, Owned> = BTreeMap::new();
    // The fleet-wide stage, when this instance holds the lease "fleet".
    let mut fleet: BTreeMap<u32, Owned> = BTreeMap::new();
    // Ingest of partitions whose lease was lost, still stopping: not taken again until done.
    let mut draining: BTreeMap<u32, JoinHandle<()>> = BTreeMap::new();
    let mut tick = tokio::time::interval((ttl / 3).max(Duration::from_millis(200)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut counts = Counts::default();
    let mut first = true;
    let member =
        serde_json::json!({"instance": id, "since": chrono::Utc::now().to_rfc3339()}).to_string();
    loop {
        let stopping = tokio::select! {
            _ = cancel.cancelled() => true,
            _ = tick.tick() => false,
        };
        if stopping {
            break;
        }
        // A partition's (or the fleet-wide) ingest that ended unasked stops the instance.
        let ended = |m: &BTreeMap<u32, Owned>| {
            m.iter()
                .find(|(_, o)| o.task.is_finished() && !o.asked)
                .map(|(p, _)| *p)
        };
        let ended = ended(&owned)
            .map(|p| (p, format!("partition {p}"), &mut owned))
            .or_else(|| {
                ended(&fleet).map(|p| (p, "fleet-wide windows and rules".into(), &mut fleet))
            });
        if let Some((p, what, map)) = ended {
            let o = map.remove(&p).expect("found");
            let reason = match o.task.await {
                Err(e) if e.is_panic() => format!(
                    "ingest of {what} panicked: {}",
                    crate::metrics::panic_message(&e.into_panic())
                ),
                _ => format!("ingest of {what} ended without being asked to stop"),
            };
            if metrics.stopped_reason().is_none() {
                let _stopped = Stopped::because(&metrics, &reason);
            }
            break;
        }
        let heartbeat = store.put(member_key(&id), member.clone().into()).await;
        if let Err(e) = &heartbeat {
            let e = nats_error("announcing this member", e);
            tracing::warn!(error = %e, "cluster heartbeat failed");
            metrics.set_last_error("source", &e);
        } else if owned.is_empty() {
            // Nothing consumed: the member being seen is this instance's source being up.
            metrics
                .source_up
                .store(1, std::sync::atomic::Ordering::Relaxed);
        }
        draining.retain(|_, task| !task.is_finished());
        for (p, task) in renew(&store, &id, &mut owned, lease_key, ttl, &mut counts).await {
            draining.insert(p, task);
        }
        // The fleet-wide stage resumes from the lake: a second one beside it is only wasted work.
        renew(&store, &id, &mut fleet, fleet_key, ttl, &mut counts).await;
        let Ok(view) = read_group(&store).await else {
            continue;
        };
        // The fleet-wide stage: whoever takes its free lease first runs it.
        if merge
            && fleet.is_empty()
            && view.fleet.is_none()
            && !first
            && let Ok(revision) = store.create(FLEET_KEY, id.clone().into()).await
        {
            tracing::info!("took the lease of the fleet-wide windows and rules; computing them");
            let stop = cancel.child_token();
            let task = tokio::spawn(crate::ingest::fleet::run(
                config.clone(),
                lake.clone(),
                fleet_declared.clone(),
                metrics.clone(),
                stop.clone(),
            ));
            fleet.insert(0, Owned::new(revision, stop, task));
        }
        let mut members = view.members.clone();
        if !members.contains(&id) {
            members.push(id.clone());
            members.sort();
        }
        let rank = members.iter().position(|m| *m == id).unwrap_or(0);
        let quota = share(partitions, members.len(), rank);
        let active = |owned: &BTreeMap<u32, Owned>| owned.values().filter(|o| !o.asked).count();
        // More than the share (a member joined): hand the highest back. Its ingest commits
        // what it took while the lease is still renewed; the lease goes once it has stopped.
        while active(&owned) > quota {
            let (&p, o) = owned
                .iter_mut()
                .rev()
                .find(|(_, o)| !o.asked)
                .expect("more than zero");
            tracing::info!(
                partition = p,
                members = members.len(),
                "handing a partition to another member"
            );
            o.asked = true;
            o.stop.cancel();
        }
        // Less than the share: take free partitions, starting at this member's place so that
        // members do not all race for the same one. Not at the first tick: members starting
        // together see each other first.
        if active(&owned) < quota && !first {
            let start = (rank as u32 * partitions) / members.len().max(1) as u32;
            for k in 0..partitions {
                if active(&owned) >= quota {
                    break;
                }
                let p = (start + k) % partitions;
                // Not one whose ingest here is still stopping after its lease was lost.
                if owned.contains_key(&p)
                    || draining.contains_key(&p)
                    || view.holders.get(&p).is_some_and(Option::is_some)
                {
                    continue;
                }
                let Ok(revision) = store.create(lease_key(p), id.clone().into()).await else {
                    continue;
                };
                tracing::info!(partition = p, "took the lease of a partition; consuming it");
                let stop = cancel.child_token();
                let task = tokio::spawn(run_partition(
                    config.for_partition(p, revision),
                    lake.clone(),
                    declared.clone(),
                    metrics.clone(),
                    stop.clone(),
                ));
                owned.insert(p, Owned::new(revision, stop, task));
                counts.takeovers += 1;
            }
        }
        first = false;
        let mut holders = view.holders;
        for p in owned.keys() {
            holders.insert(*p, Some(id.clone()));
        }
        metrics.set_cluster(ClusterStatus {
            instance: id.clone(),
            partitions,
            owned: owned
                .iter()
                .filter(|(_, o)| !o.stop.is_cancelled())
                .map(|(p, o)| OwnedPartition {
                    partition: *p,
                    since: o.since.to_rfc3339(),
                })
                .collect(),
            holders,
            members,
            fleet_wide: fleet_wide.clone(),
            fleet_wide_by: if fleet.is_empty() {
                view.fleet.clone()
            } else {
                Some(id.clone())
            },
            not_computed: not_computed.clone(),
            takeovers: counts.takeovers,
            released: counts.released,
            lost: counts.lost,
        });
    }
    // Stopping: every partition commits and acknowledges what it took (its lease still
    // renewed), then the lease is handed back so that survivors need not wait for it to expire.
    for o in owned.values_mut().chain(fleet.values_mut()) {
        o.asked = true;
        o.stop.cancel();
    }
    while !owned.is_empty() || !fleet.is_empty() {
        renew(&store, &id, &mut owned, lease_key, ttl, &mut counts).await;
        renew(&store, &id, &mut fleet, fleet_key, ttl, &mut counts).await;
        if !owned.is_empty() || !fleet.is_empty() {
            tick.tick().await;
        }
    }
    let _ = store.delete(member_key(&id)).await;
}

#[derive(Default)]
struct Counts {
    takeovers: u64,
    released: u64,
    lost: u64,
}

/// Renews the leases of `owned`. A partition whose ingest was asked to stop and has stopped
/// is handed back (its lease deleted). A lease another instance holds now was lost: its ingest
/// is stopped at once (and left to finish on its own; Delta fences what it still commits).
async fn renew(
    store: &kv::Store,
    id: &str,
    owned: &mut BTreeMap<u32, Owned>,
    key: impl Fn(u32) -> String,
    ttl: Duration,
    counts: &mut Counts,
) -> Vec<(u32, JoinHandle<()>)> {
    let mut lost = Vec::new();
    let mut done = Vec::new();
    for (&p, o) in owned.iter_mut() {
        if o.asked && o.task.is_finished() {
            done.push(p);
            continue;
        }
        match store
            .update(key(p), id.to_string().into(), o.revision)
            .await
        {
            Ok(revision) => {
                o.revision = revision;
                o.renewed = Instant::now();
            }
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                // The last renewal may have landed with its answer lost: still ours if the
                // entry says so.
                match store.entry(key(p)).await {
                    Ok(Some(entry))
                        if entry.operation == kv::Operation::Put
                            && entry.value.as_ref() == id.as_bytes() =>
                    {
                        o.revision = entry.revision;
                        o.renewed = Instant::now();
                    }
                    _ => lost.push(p),
                }
            }
            Err(e) => {
                tracing::warn!(partition = p, error = %e, "renewing a partition lease failed");
                // Unconfirmed for a whole TTL: another instance may hold it now.
                if o.renewed.elapsed() >= ttl {
                    lost.push(p);
                }
            }
        }
    }
    for p in done {
        let o = owned.remove(&p).expect("owned");
        tracing::info!(lease = %key(p), "handed back, after committing what it took");
        if let Err(e) = store.delete_expect_revision(key(p), Some(o.revision)).await {
            tracing::warn!(partition = p, error = %e, "handing back the lease failed; it expires on its own");
        }
        counts.released += 1;
    }
    let mut stopping = Vec::new();
    for p in lost {
        let mut o = owned.remove(&p).expect("owned");
        tracing::error!(
            partition = p,
            "lost the lease of a partition (it expired and another instance took it); its ingest stops now"
        );
        o.asked = true;
        o.stop.cancel();
        counts.lost += 1;
        stopping.push((p, o.task));
    }
    stopping
}

/// One partition's ingest: the single-instance ingest with the partition's configuration, its
/// own device state, and no rule changes over HTTP (see `crate::api::rules`).
async fn run_partition(
    config: Config,
    lake: Lake,
    declared: Declared,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let (_changes, rule_changes) = tokio::sync::mpsc::channel(1);
    // Why it stopped is recorded where it stopped.
    let _ = crate::ingest::run(
        config,
        lake,
        declared,
        rule_changes,
        metrics,
        stop,
        Default::default(),
    )
    .await;
}

/// The stream (created with its partition mapping when absent; checked when present) and the
/// lease bucket (created when absent, `max_age` = `ttl`). Returns the bucket and the TTL leases
/// really have: the bucket's `max_age`, fixed when it was created.
async fn open_bucket(config: &Config, ttl: Duration) -> Result<(kv::Store, Duration), Join> {
    let js = crate::ingest::source::connect_with(&config.nats())
        .await
        .map_err(|e| Join::Failed(e.to_string()))?;
    let mut stream = crate::ingest::source::ensure_stream(&js, config)
        .await
        .map_err(|e| Join::Failed(e.to_string()))?;
    let info = stream
        .info()
        .await
        .map_err(|e| Join::Failed(format!("reading the stream's configuration: {e}")))?;
    crate::ingest::source::check_mapping(info, config).map_err(|e| Join::Refused(e.to_string()))?;
    let bucket = config.cluster_lease_bucket();
    let store = match js.get_key_value(bucket).await {
        Ok(store) => store,
        Err(_) => js
            .create_key_value(kv::Config {
                bucket: bucket.to_string(),
                description: "fleetlake: the members of a cluster and who consumes each partition"
                    .into(),
                history: 1,
                max_age: ttl,
                num_replicas: config.replicas(),
                ..Default::default()
            })
            .await
            .map_err(|e| Join::Failed(nats_error("creating it", e)))?,
    };
    let ttl = match store.status().await.map(|s| s.info.config.max_age) {
        Ok(max_age) if !max_age.is_zero() => max_age,
        _ => ttl,
    };
    Ok((store, ttl))
}

/// Why joining the cluster failed.
enum Join {
    /// NATS is unreachable or failing: retried with backoff.
    Failed(String),
    /// The stream is not mapped to the partitions the configuration says: retrying cannot help.
    Refused(String),
}

/// The group as the bucket says: the members (sorted) and each partition's holder.
struct Group {
    members: Vec<String>,
    holders: BTreeMap<u32, Option<String>>,
    /// Who computes the fleet-wide windows and rules.
    fleet: Option<String>,
}

async fn read_group(store: &kv::Store) -> Result<Group, Error> {
    let mut keys = store
        .keys()
        .await
        .map_err(|e| Error::Unavailable(nats_error("listing keys", e)))?;
    let mut members = Vec::new();
    let mut holders = BTreeMap::new();
    let mut fleet = None;
    while let Some(key) = keys.next().await {
        let key = key.map_err(|e| Error::Unavailable(nats_error("listing keys", e)))?;
        if key == FLEET_KEY {
            fleet = store
                .get(&key)
                .await
                .ok()
                .flatten()
                .map(|b| String::from_utf8_lossy(&b).into_owned());
        } else if let Some(id) = key.strip_prefix("member.") {
            members.push(id.to_string());
        } else if let Some(p) = key.strip_prefix("partition.").and_then(|p| p.parse().ok()) {
            let holder = store
                .get(&key)
                .await
                .ok()
                .flatten()
                .map(|b| String::from_utf8_lossy(&b).into_owned());
            holders.insert(p, holder);
        }
    }
    members.sort();
    Ok(Group {
        members,
        holders,
        fleet,
    })
}

#[cfg(test)]
mod tests;
