//! Configuration: built-in defaults, then a TOML file, then `FLEETLAKE_*` environment variables,
//! then command-line flags (`--set key=value` and the named flags).
//!
//! Every key is listed in [`KEYS`] with its default and meaning; `fleetlake config` prints them.
//! Unknown keys and unparsable values are errors that name the key and what was expected.

pub mod nats;
pub mod partition;

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use fleetlake_sql::DedupKey;
use fleetlake_zones::LakeConfig;
use fleetlake_zones::maintain::Policy;

/// One configuration key: `section.name`, its default and what it means.
pub struct Key {
    pub name: &'static str,
    pub default: &'static str,
    pub help: &'static str,
}

/// Every configuration key.
pub const KEYS: &[Key] = &[
    Key {
        name: "lake.location",
        default: "./lakehouse",
        help: "where the zones live: a folder, file:///abs/path or s3://bucket/prefix",
    },
    Key {
        name: "lake.endpoint",
        default: "",
        help: "S3 endpoint URL for S3-compatible storage (else AWS_ENDPOINT_URL)",
    },
    Key {
        name: "lake.region",
        default: "",
        help: "S3 region (else AWS_REGION; us-east-1 when neither is set)",
    },
    Key {
        name: "lake.allow_http",
        default: "false",
        help: "allow plain-HTTP S3 endpoints (loopback and test setups)",
    },
    Key {
        name: "nats.url",
        default: "nats://127.0.0.1:4222",
        help: "NATS server URL; several (a cluster's seed servers) comma-separated",
    },
    Key {
        name: "nats.user",
        default: "",
        help: "NATS user name (with nats.password)",
    },
    Key {
        name: "nats.password",
        default: "",
        help: "NATS password (secret: never printed; prefer FLEETLAKE_NATS_PASSWORD)",
    },
    Key {
        name: "nats.token",
        default: "",
        help: "NATS authentication token (secret: never printed)",
    },
    Key {
        name: "nats.nkey_seed",
        default: "",
        help: "NATS NKey seed, SU… (secret: never printed)",
    },
    Key {
        name: "nats.creds_file",
        default: "",
        help: "NATS credentials file (.creds: a user JWT and its NKey seed)",
    },
    Key {
        name: "nats.tls_ca",
        default: "",
        help: "PEM file of the certificate authority the NATS server's certificate is checked against (implies TLS)",
    },
    Key {
        name: "nats.tls_cert",
        default: "",
        help: "PEM client certificate for NATS (mutual TLS, with nats.tls_key)",
    },
    Key {
        name: "nats.tls_key",
        default: "",
        help: "PEM private key of nats.tls_cert",
    },
    Key {
        name: "nats.tls_required",
        default: "false",
        help: "refuse to talk to NATS without TLS (also implied by a tls:// URL or nats.tls_ca)",
    },
    Key {
        name: "nats.stream",
        default: "TELEMETRY",
        help: "JetStream stream to consume (created if absent)",
    },
    Key {
        name: "nats.subjects",
        default: "telemetry.>",
        help: "comma-separated subjects of the stream when fleetlake creates it",
    },
    Key {
        name: "nats.consumer",
        default: "fleetlake",
        help: "durable pull consumer name; also the Delta txn application id (in a cluster, partition N's are <name>-pN)",
    },
    Key {
        name: "nats.replicas",
        default: "1",
        help: "replicas of the streams (telemetry, alerts) and the cluster's lease bucket when fleetlake creates them (3 on a 3-node NATS cluster)",
    },
    Key {
        name: "cluster.partitions",
        default: "0",
        help: "0 = this instance consumes the whole stream; P > 0 = the stream's subjects are mapped to P partitions (fleetlake sets the mapping when it creates the stream; fixed for the stream's life) and the instances sharing nats.consumer split them",
    },
    Key {
        name: "cluster.instance",
        default: "",
        help: "this instance's id in the cluster, unique among its members (empty = $HOSTNAME, else localhost, and the process id)",
    },
    Key {
        name: "cluster.lease_bucket",
        default: "fleetlake_cluster",
        help: "NATS key-value bucket of the cluster's members and partition leases",
    },
    Key {
        name: "cluster.lease_ttl_s",
        default: "10",
        help: "a partition whose owner has not renewed its lease for this long (it died) is taken over by another instance",
    },
    Key {
        name: "cluster.fleet_wide",
        default: "merge",
        help: "window tables not grouped by device_id and rules over them or grouping cohorts, in a cluster: merge = one elected instance computes them over every partition's committed rows, in stream order; skip = they are not computed (listed in /v1/cluster)",
    },
    Key {
        name: "ingest.fetch_batch",
        default: "1000",
        help: "messages requested per pull",
    },
    Key {
        name: "ingest.commit_rows",
        default: "20000",
        help: "commit when this many messages are buffered",
    },
    Key {
        name: "ingest.commit_interval_ms",
        default: "250",
        help: "commit at least this often while messages arrive: how long a message waits at most before it is queryable",
    },
    Key {
        name: "ingest.shutdown_grace_s",
        default: "30",
        help: "on SIGTERM, how long failing commits of in-flight messages are retried before serve gives up and exits non-zero (they are redelivered at the next start)",
    },
    Key {
        name: "ingest.ack_wait_s",
        default: "300",
        help: "JetStream ack wait: longer than any commit, so an in-flight batch is never redelivered",
    },
    Key {
        name: "dedup.key",
        default: "device_seq",
        help: "what identifies a replay: device_seq (device_id + seq), msg_id (Nats-Msg-Id header) or none",
    },
    Key {
        name: "dedup.max_gaps",
        default: "64",
        help: "device_seq: gaps in a device's sequence remembered before its oldest readings are forgotten",
    },
    Key {
        name: "dedup.window_minutes",
        default: "60",
        help: "msg_id: how long (received time) a message id is remembered",
    },
    Key {
        name: "dedup.snapshot_interval_s",
        default: "60",
        help: "how often the dedup state is snapshotted beside usable.telemetry (a restart replays the rows since)",
    },
    Key {
        name: "alerts.stream",
        default: "ALERTS",
        help: "JetStream stream for alert transitions on alerts.<rule>.<key> (created if absent)",
    },
    Key {
        name: "alerts.duplicate_window_s",
        default: "3600",
        help: "how long JetStream remembers alert ids: a transition republished after a crash within this window is dropped",
    },
    Key {
        name: "alerts.silence_max_gap_s",
        default: "10",
        help: "silence rules count time only while ingest watches a healthy stream: a longer wall-clock gap between two observations (fleetlake stopped, NATS unreachable, a commit blocked) is not counted as silence; at least twice ingest.commit_interval_ms",
    },
    Key {
        name: "alerts.alertmanager_url",
        default: "",
        help: "Prometheus Alertmanager to push each alert transition to (POST <url>/api/v2/alerts), beside the JetStream stream; empty = none",
    },
    Key {
        name: "alerts.alertmanager_resend_s",
        default: "60",
        help: "how often alerts still firing are sent to Alertmanager again (it resolves an alert not re-sent within its resolve_timeout)",
    },
    Key {
        name: "pipelines.dir",
        default: "pipelines",
        help: "folder of pipeline files (*.sql) to run; serve refuses to start if one does not check; empty = none",
    },
    Key {
        name: "maintenance.enabled",
        default: "true",
        help: "serve runs table maintenance (retention, compaction, checkpoints, log cleanup, vacuum) on a schedule",
    },
    Key {
        name: "maintenance.interval_s",
        default: "300",
        help: "seconds between maintenance runs in serve (the first one this long after the start)",
    },
    Key {
        name: "maintenance.target_file_mb",
        default: "128",
        help: "size of the Parquet files compaction writes, MiB; files this large are left alone",
    },
    Key {
        name: "maintenance.min_small_files",
        default: "16",
        help: "a partition still being written is compacted once it holds this many files smaller than the target",
    },
    Key {
        name: "maintenance.quiet_minutes",
        default: "15",
        help: "a partition with no file younger than this is quiet: usable tables' quiet partitions are Z-ordered by device_id and ts once",
    },
    Key {
        name: "maintenance.max_partitions",
        default: "8",
        help: "at most this many partitions rewritten per table per run (the ones with the most small files first)",
    },
    Key {
        name: "maintenance.checkpoint_interval",
        default: "100",
        help: "a Delta checkpoint at least every this many commits (also set as delta.checkpointInterval on new tables)",
    },
    Key {
        name: "maintenance.log_retention_hours",
        default: "168",
        help: "Delta log entries older than this (and older than a checkpoint) are deleted; time travel reaches back this far",
    },
    Key {
        name: "maintenance.vacuum_retention_hours",
        default: "168",
        help: "data files no longer referenced are deleted once older than this; serve refuses less than 1 (files being written could go)",
    },
    Key {
        name: "maintenance.lease_bucket",
        default: "fleetlake_maintenance",
        help: "NATS key-value bucket holding the maintenance lease: one instance on a lake maintains it at a time",
    },
    Key {
        name: "maintenance.lease_ttl_s",
        default: "900",
        help: "a lease not renewed for this long (its holder died) can be taken by another instance",
    },
    Key {
        name: "retention.raw_days",
        default: "0",
        help: "days of raw-zone partitions kept (by ingest_date); 0 keeps everything",
    },
    Key {
        name: "retention.usable_days",
        default: "0",
        help: "days of usable-zone partitions kept (by event_date or the first DATE partition column); 0 keeps everything",
    },
    Key {
        name: "retention.final_days",
        default: "0",
        help: "days of final-zone partitions kept (tables partitioned by a DATE column); 0 keeps everything",
    },
    Key {
        name: "retention.tables",
        default: "",
        help: "per-table days overriding the zone's, comma-separated: raw.quarantine=365,usable.cold_chain=90",
    },
    Key {
        name: "http.listen",
        default: "127.0.0.1:8080",
        help: "HTTP API address",
    },
    Key {
        name: "http.tls_cert",
        default: "",
        help: "PEM certificate chain for HTTPS on http.listen (with http.tls_key); empty = plain HTTP",
    },
    Key {
        name: "http.tls_key",
        default: "",
        help: "PEM private key of http.tls_cert",
    },
    Key {
        name: "auth.enabled",
        default: "true",
        help: "every route but /healthz needs a bearer token; false opens every route to anyone who can reach the port (local experiments only)",
    },
    Key {
        name: "auth.tokens_file",
        default: "fleetlake-tokens.toml",
        help: "where tokens are stored (SHA-256 hashes only, mode 0600); written by `fleetlake token` and /v1/tokens, read again when it changes",
    },
    Key {
        name: "auth.public_metrics",
        default: "false",
        help: "serve /metrics without a token (for a Prometheus without credentials)",
    },
    Key {
        name: "auth.tenant_column",
        default: "tenant",
        help: "the column naming a row's tenant: a token bound to tenants sees only its tenants' rows",
    },
    Key {
        name: "auth.tenant_free_tables",
        default: "",
        help: "tables without a tenant column that tokens bound to tenants may read in full (comma-separated, e.g. reference.firmware)",
    },
    Key {
        name: "query.timeout_s",
        default: "30",
        help: "a query running longer is cancelled (408 query_timeout); a token may override it",
    },
    Key {
        name: "query.memory_mb",
        default: "1024",
        help: "memory one query's operators may reserve (DataFusion's memory pool); more fails with 422 query_memory_limit",
    },
    Key {
        name: "query.total_memory_mb",
        default: "2048",
        help: "memory all queries together may reserve; a query within its own limit that finds it spent fails with 503 queries_memory_busy; the rest of the process (ingest) keeps the remainder",
    },
    Key {
        name: "query.max_rows",
        default: "1000000",
        help: "rows one answer may hold; more fails with 422 query_row_limit",
    },
    Key {
        name: "query.max_body_kb",
        default: "1024",
        help: "the largest request body POST /v1/query accepts (413 body_too_large)",
    },
    Key {
        name: "query.max_concurrent",
        default: "4",
        help: "queries one token may run at once (SQL and fleet endpoints); more get 429 too_many_concurrent_queries",
    },
    Key {
        name: "query.rate_per_minute",
        default: "600",
        help: "queries one token may start per minute; more get 429 rate_limited with Retry-After; 0 = unlimited",
    },
    Key {
        name: "query.threads",
        default: "0",
        help: "threads running queries, apart from ingest's, so a heavy query cannot starve ingest; 0 = half the cores (at least 1)",
    },
    Key {
        name: "fleet.metrics_table",
        default: "usable.cold_chain",
        help: "the table /v1/fleet/outliers reads when the request names none",
    },
    Key {
        name: "fleet.metric",
        default: "temperature_c",
        help: "the metric /v1/fleet/outliers scores when the request names none",
    },
    Key {
        name: "fleet.events_table",
        default: "usable.device_health",
        help: "the table /v1/fleet/root-cause reads when the request names none",
    },
    Key {
        name: "fleet.event",
        default: "crashed",
        help: "the event /v1/fleet/root-cause counts when the request names none: a boolean column, a column that is not NULL, or column:value",
    },
    Key {
        name: "fleet.cohort",
        default: "model,hw_rev",
        help: "the cohort columns of /v1/fleet/outliers when the request gives no by=",
    },
    Key {
        name: "fleet.dimensions",
        default: "fw,hw_rev",
        help: "the attributes /v1/fleet/root-cause combines when the request gives no dimensions=",
    },
    Key {
        name: "fleet.filters",
        default: "tenant,site,model,hw_rev,fw",
        help: "the columns the fleet endpoints filter on as query parameters (site=berlin,paris)",
    },
    Key {
        name: "fleet.device_column",
        default: "device_id",
        help: "the device column of the fleet endpoints' tables",
    },
    Key {
        name: "fleet.time_column",
        default: "ts",
        help: "the event-time column of the fleet endpoints' tables",
    },
];

/// The resolved configuration. `Debug` shows secrets as `<redacted>` ([`redacted`]).
#[derive(Clone)]
pub struct Config {
    values: HashMap<&'static str, String>,
    /// The partition a partition's ingest runs for ([`Config::for_partition`]); `None` for the
    /// instance (and for an instance without partitions).
    partition: Option<partition::Partition>,
    /// The durable consumer's name when it is not `nats.consumer` (a partition's, per lease).
    durable: Option<String>,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut map = f.debug_map();
        for key in KEYS {
            map.entry(&key.name, &redacted(key.name, self.get(key.name)));
        }
        map.finish()
    }
}

/// A configuration mistake: which key, what was wrong, what was expected.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("unknown configuration key {key:?} (from {origin}); {hint}")]
    UnknownKey {
        key: String,
        origin: String,
        /// A did-you-mean, or the keys of the same section.
        hint: String,
    },
    #[error("configuration key {key} = {value:?} (from {origin}): expected {expected}")]
    BadValue {
        key: &'static str,
        value: String,
        origin: String,
        expected: &'static str,
    },
    #[error("reading configuration file {path}: {reason}")]
    File { path: String, reason: String },
}

impl Default for Config {
    fn default() -> Self {
        Self {
            values: KEYS
                .iter()
                .map(|k| (k.name, k.default.to_string()))
                .collect(),
            partition: None,
            durable: None,
        }
    }
}

/// The built-in default of a key (empty for an unknown key).
pub fn default_of(key: &str) -> &'static str {
    KEYS.iter()
        .find(|k| k.name == key)
        .map_or("", |k| k.default)
}

/// What to say about an unknown key: the closest known key when one is near (Jaro-Winkler
/// similarity of at least 0.85, as `strsim` computes it), else the keys of the same section, else
/// where the list is.
fn hint(unknown: &str) -> String {
    let closest = KEYS
        .iter()
        .map(|k| (strsim::jaro_winkler(unknown, k.name), k.name))
        .max_by(|a, b| a.0.total_cmp(&b.0));
    if let Some((score, name)) = closest
        && score >= 0.85
    {
        return format!("did you mean \"{name}\"? (`fleetlake config` lists every key)");
    }
    let section = unknown.split('.').next().unwrap_or_default();
    let same: Vec<&str> = KEYS
        .iter()
        .map(|k| k.name)
        .filter(|n| n.split('.').next() == Some(section))
        .collect();
    if same.is_empty() {
        "`fleetlake config` lists every key".to_string()
    } else {
        format!("the {section} keys are {}", same.join(", "))
    }
}

/// `FLEETLAKE_*` environment variables that are not configuration keys: the configuration
/// file's path, the log filter, the demo's NATS server binary, and the token clients send
/// (`export FLEETLAKE_TOKEN=…`, as the demo prints it).
const NOT_KEYS: [&str; 4] = ["CONFIG", "LOG", "NATS_SERVER", "TOKEN"];

impl Config {
    /// Defaults → `file` (if given) → `FLEETLAKE_*` from `env` → `overrides` (flags).
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        overrides: &[(String, String)],
    ) -> Result<Self, ConfigError> {
        let mut config = Config::default();
        if let Some(path) = file {
            config.apply_toml_file(path)?;
        }
        for (name, value) in env {
            let Some(rest) = name.strip_prefix("FLEETLAKE_") else {
                continue;
            };
            if NOT_KEYS.contains(&rest) {
                continue;
            }
            let key = env_to_key(rest);
            config.set(&key, &value, &format!("environment variable {name}"))?;
        }
        for (key, value) in overrides {
            config.set(key, value, "command line")?;
        }
        config.validate()?;
        Ok(config)
    }

    fn apply_toml_file(&mut self, path: &Path) -> Result<(), ConfigError> {
        let file_error = |reason: String| ConfigError::File {
            path: path.display().to_string(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| file_error(e.to_string()))?;
        // toml's message quotes the offending line, which may hold a secret: only where and
        // what kind of mistake.
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            let line = e
                .span()
                .map(|s| text[..s.start.min(text.len())].lines().count().max(1));
            file_error(match line {
                Some(line) => format!("not valid TOML at line {line}: {}", e.message()),
                None => format!("not valid TOML: {}", e.message()),
            })
        })?;
        let origin = path.display().to_string();
        for (section, body) in &table {
            let toml::Value::Table(body) = body else {
                return Err(ConfigError::UnknownKey {
                    key: section.clone(),
                    origin,
                    hint: hint(section),
                });
            };
            for (name, value) in body {
                let text = match value {
                    toml::Value::String(s) => s.clone(),
                    toml::Value::Array(items) => items
                        .iter()
                        .map(|v| {
                            v.as_str()
                                .map(str::to_string)
                                .unwrap_or_else(|| v.to_string())
                        })
                        .collect::<Vec<_>>()
                        .join(","),
                    other => other.to_string(),
                };
                self.set(&format!("{section}.{name}"), &text, &origin)?;
            }
        }
        Ok(())
    }

    /// Sets one key, refusing unknown keys.
    pub fn set(&mut self, key: &str, value: &str, origin: &str) -> Result<(), ConfigError> {
        let Some(known) = KEYS.iter().find(|k| k.name == key) else {
            return Err(ConfigError::UnknownKey {
                key: key.to_string(),
                origin: origin.to_string(),
                hint: hint(key),
            });
        };
        self.values.insert(known.name, value.to_string());
        // Check the type now so the error names where the value came from.
        self.check(known.name, origin)
    }

    fn check(&self, key: &'static str, origin: &str) -> Result<(), ConfigError> {
        let value = self.get(key);
        let bad = |expected| ConfigError::BadValue {
            key,
            value: redacted(key, value),
            origin: origin.to_string(),
            expected,
        };
        match key {
            "ingest.fetch_batch"
            | "ingest.commit_rows"
            | "ingest.commit_interval_ms"
            | "ingest.ack_wait_s"
            | "ingest.shutdown_grace_s"
            | "alerts.duplicate_window_s"
            | "alerts.silence_max_gap_s"
            | "alerts.alertmanager_resend_s"
            | "maintenance.interval_s"
            | "maintenance.target_file_mb"
            | "maintenance.max_partitions"
            | "maintenance.checkpoint_interval"
            | "maintenance.lease_ttl_s"
            | "cluster.lease_ttl_s"
            | "query.timeout_s"
            | "query.memory_mb"
            | "query.total_memory_mb"
            | "query.max_rows"
            | "query.max_body_kb"
            | "query.max_concurrent" => match value.parse::<u64>() {
                Ok(n) if n > 0 => Ok(()),
                _ => Err(bad("a positive integer")),
            },
            "nats.replicas" => match value.parse::<u64>() {
                Ok(1..=5) => Ok(()),
                _ => Err(bad("1 to 5 (NATS allows at most 5 replicas)")),
            },
            "cluster.partitions" => match value.parse::<u64>() {
                Ok(0..=1024) => Ok(()),
                _ => Err(bad("0 (no partitions) to 1024")),
            },
            "cluster.fleet_wide" => match value {
                "merge" | "skip" => Ok(()),
                _ => Err(bad("merge or skip")),
            },
            "cluster.instance" => {
                let ok = value
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
                if ok {
                    Ok(())
                } else {
                    Err(bad("a name of letters, digits, '_' or '-' (or empty)"))
                }
            }
            "maintenance.min_small_files" => match value.parse::<u64>() {
                Ok(n) if n >= 2 => Ok(()),
                _ => Err(bad("an integer of at least 2")),
            },
            "maintenance.quiet_minutes"
            | "maintenance.log_retention_hours"
            | "maintenance.vacuum_retention_hours"
            | "retention.raw_days"
            | "retention.usable_days"
            | "retention.final_days"
            | "query.rate_per_minute"
            | "query.threads" => value
                .parse::<u64>()
                .map(|_| ())
                .map_err(|_| bad("a whole number (0 or more)")),
            "retention.tables" => self
                .table_retention()
                .map(|_| ())
                .map_err(|_| bad("zone.table=days, comma-separated (raw.quarantine=365)")),
            "lake.allow_http"
            | "maintenance.enabled"
            | "nats.tls_required"
            | "auth.enabled"
            | "auth.public_metrics" => value
                .parse::<bool>()
                .map(|_| ())
                .map_err(|_| bad("true or false")),
            "http.listen" => value
                .parse::<std::net::SocketAddr>()
                .map(|_| ())
                .map_err(|_| bad("an address such as 127.0.0.1:8080")),
            "nats.url" => {
                if !value.trim().is_empty() {
                    Ok(())
                } else {
                    Err(bad("a NATS URL such as nats://127.0.0.1:4222"))
                }
            }
            // A certificate and its key come together; checked once every layer is applied.
            "nats.tls_cert" | "nats.tls_key" | "http.tls_cert" | "http.tls_key" => {
                let section = key.split('.').next().unwrap_or_default();
                let cert = self.get(&format!("{section}.tls_cert"));
                let tls_key = self.get(&format!("{section}.tls_key"));
                if cert.is_empty() == tls_key.is_empty() || origin != "configuration" {
                    Ok(())
                } else if section == "nats" {
                    Err(bad(
                        "nats.tls_cert and nats.tls_key both set (mutual TLS) or both empty",
                    ))
                } else {
                    Err(bad(
                        "http.tls_cert and http.tls_key both set (HTTPS) or both empty",
                    ))
                }
            }
            "auth.tenant_free_tables" => {
                if self
                    .list(key)
                    .iter()
                    .all(|t| fleetlake_zones::TableId::parse(t).is_ok())
                {
                    Ok(())
                } else {
                    Err(bad("comma-separated tables such as reference.firmware"))
                }
            }
            "auth.tokens_file" | "auth.tenant_column" => {
                if value.trim().is_empty() {
                    Err(bad("a non-empty value"))
                } else {
                    Ok(())
                }
            }
            "nats.nkey_seed" => {
                if value.is_empty() || value.starts_with('S') {
                    Ok(())
                } else {
                    Err(bad("an NKey seed, starting with S (SU… for a user)"))
                }
            }
            "alerts.alertmanager_url" => {
                if value.is_empty()
                    || url::Url::parse(value)
                        .is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.has_host())
                {
                    Ok(())
                } else {
                    Err(bad(
                        "an http(s) URL such as http://127.0.0.1:9093, or empty for none",
                    ))
                }
            }
            "nats.stream"
            | "nats.consumer"
            | "alerts.stream"
            | "maintenance.lease_bucket"
            | "cluster.lease_bucket" => {
                let ok = !value.is_empty()
                    && value
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
                if ok {
                    Ok(())
                } else {
                    Err(bad("a name of letters, digits, '_' or '-'"))
                }
            }
            "fleet.metrics_table" | "fleet.events_table" => fleetlake_zones::TableId::parse(value)
                .map(|_| ())
                .map_err(|_| bad("a table such as usable.cold_chain")),
            "fleet.metric" | "fleet.event" | "fleet.device_column" | "fleet.time_column" => {
                if value.trim().is_empty() {
                    Err(bad("a column name"))
                } else {
                    Ok(())
                }
            }
            "nats.subjects" => {
                if self.subjects().is_empty() {
                    Err(bad("one or more comma-separated subjects"))
                } else {
                    Ok(())
                }
            }
            _ => Ok(()),
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        for key in KEYS {
            self.check(key.name, "configuration")?;
        }
        Ok(())
    }

    pub fn get(&self, key: &str) -> &str {
        self.values.get(key).map(String::as_str).unwrap_or("")
    }

    fn number(&self, key: &str) -> u64 {
        self.get(key).parse().expect("validated")
    }

    pub fn nats_url(&self) -> &str {
        self.get("nats.url")
    }

    /// The `query.*` limits every token has unless it overrides them.
    pub fn query_limits(&self) -> Limits {
        Limits {
            timeout: Duration::from_secs(self.number("query.timeout_s")),
            memory_bytes: (self.number("query.memory_mb") as usize).saturating_mul(1024 * 1024),
            max_rows: self.number("query.max_rows") as usize,
            max_concurrent: self.number("query.max_concurrent") as usize,
            rate_per_minute: self.number("query.rate_per_minute"),
        }
    }

    /// The memory all queries together may reserve (`query.total_memory_mb`), in bytes.
    pub fn query_total_memory(&self) -> usize {
        (self.number("query.total_memory_mb") as usize).saturating_mul(1024 * 1024)
    }

    /// `auth.tenant_free_tables`, parsed (validated at load).
    pub fn tenant_free_tables(&self) -> Vec<fleetlake_zones::TableId> {
        self.list("auth.tenant_free_tables")
            .iter()
            .filter_map(|t| fleetlake_zones::TableId::parse(t).ok())
            .collect()
    }

    /// Threads of the query runtime (`query.threads`; 0 = half the cores, at least 1).
    pub fn query_threads(&self) -> usize {
        match self.number("query.threads") as usize {
            0 => std::thread::available_parallelism()
                .map(|n| n.get() / 2)
                .unwrap_or(1)
                .max(1),
            n => n,
        }
    }

    /// The largest `POST /v1/query` body, in bytes.
    pub fn query_max_body(&self) -> usize {
        (self.number("query.max_body_kb") as usize).saturating_mul(1024)
    }

    /// How to reach NATS: URL, credentials and TLS.
    pub fn nats(&self) -> nats::NatsConnection {
        let opt = |key: &str| Some(self.get(key).to_string()).filter(|v| !v.is_empty());
        nats::NatsConnection {
            url: self.nats_url().to_string(),
            user: opt("nats.user"),
            password: opt("nats.password"),
            token: opt("nats.token"),
            nkey_seed: opt("nats.nkey_seed"),
            creds_file: opt("nats.creds_file").map(Into::into),
            tls_ca: opt("nats.tls_ca").map(Into::into),
            tls_cert: opt("nats.tls_cert").map(Into::into),
            tls_key: opt("nats.tls_key").map(Into::into),
            tls_required: self.get("nats.tls_required") == "true",
        }
    }
    pub fn stream(&self) -> &str {
        self.get("nats.stream")
    }
    pub fn consumer(&self) -> &str {
        self.get("nats.consumer")
    }
    /// `nats.replicas`: the stream's replicas when fleetlake creates it.
    pub fn replicas(&self) -> usize {
        self.number("nats.replicas") as usize
    }
    /// `cluster.partitions`: 0 without partitions.
    pub fn partitions(&self) -> u32 {
        self.number("cluster.partitions") as u32
    }
    /// The partition this configuration's ingest consumes, when it is one partition's.
    pub fn partition(&self) -> Option<partition::Partition> {
        self.partition
    }
    /// The configuration of partition `index`'s ingest under the lease taken at revision
    /// `lease`: its Delta txn application id (and the kind of its state snapshots) is
    /// `<nats.consumer>-p<index>`, its durable consumer `<nats.consumer>-p<index>-<lease>` (one
    /// per owner: see `ingest::source::Source::open`).
    pub fn for_partition(&self, index: u32, lease: u64) -> Config {
        let mut config = self.clone();
        let app_id = format!("{}-p{index}", self.consumer());
        config.durable = Some(format!("{app_id}-{lease}"));
        config.set_consumer(&app_id);
        config.partition = Some(partition::Partition {
            index,
            count: self.partitions(),
        });
        config
    }
    /// The durable consumer's name: `nats.consumer`, or a partition owner's own.
    pub fn durable_name(&self) -> String {
        self.durable
            .clone()
            .unwrap_or_else(|| self.consumer().to_string())
    }
    /// Another consumer name (and Delta txn application id) for a stage of this instance.
    pub fn set_consumer(&mut self, name: &str) {
        self.values.insert("nats.consumer", name.to_string());
    }
    /// `cluster.instance`, or the host name and process id when it is empty.
    pub fn instance_id(&self) -> String {
        match self.get("cluster.instance") {
            "" => format!(
                "{}-{}",
                std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".into()),
                std::process::id()
            ),
            id => id.to_string(),
        }
    }
    pub fn cluster_lease_bucket(&self) -> &str {
        self.get("cluster.lease_bucket")
    }
    pub fn cluster_lease_ttl(&self) -> Duration {
        Duration::from_secs(self.number("cluster.lease_ttl_s"))
    }
    /// `cluster.fleet_wide = skip`.
    pub fn skip_fleet_wide(&self) -> bool {
        self.get("cluster.fleet_wide") == "skip"
    }
    pub fn subjects(&self) -> Vec<String> {
        self.list("nats.subjects")
    }
    pub fn fetch_batch(&self) -> usize {
        self.number("ingest.fetch_batch") as usize
    }
    pub fn commit_rows(&self) -> usize {
        self.number("ingest.commit_rows") as usize
    }
    pub fn commit_interval(&self) -> Duration {
        Duration::from_millis(self.number("ingest.commit_interval_ms"))
    }
    /// How long a shutdown keeps retrying the commits of in-flight messages.
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.number("ingest.shutdown_grace_s"))
    }
    pub fn ack_wait(&self) -> Duration {
        Duration::from_secs(self.number("ingest.ack_wait_s"))
    }
    pub fn dedup_key(&self) -> DedupKey {
        DedupKey::parse(self.get("dedup.key")).expect("validated")
    }
    pub fn dedup_max_gaps(&self) -> usize {
        self.number("dedup.max_gaps") as usize
    }
    pub fn dedup_window_minutes(&self) -> i64 {
        self.number("dedup.window_minutes") as i64
    }
    pub fn alerts_stream(&self) -> &str {
        self.get("alerts.stream")
    }
    pub fn alerts_duplicate_window(&self) -> Duration {
        Duration::from_secs(self.number("alerts.duplicate_window_s"))
    }
    /// The longest gap between two observations of the stream that silence rules count (µs):
    /// `alerts.silence_max_gap_s`, and at least twice the commit interval (idle ingest observes
    /// once per commit interval).
    pub fn silence_max_gap_us(&self) -> i64 {
        let configured = self
            .number("alerts.silence_max_gap_s")
            .saturating_mul(1_000_000);
        let idle = self
            .number("ingest.commit_interval_ms")
            .saturating_mul(2_000);
        configured.max(idle) as i64
    }
    /// The Alertmanager to push alert transitions to, if any.
    pub fn alertmanager_url(&self) -> Option<&str> {
        Some(self.get("alerts.alertmanager_url").trim_end_matches('/')).filter(|u| !u.is_empty())
    }
    pub fn alertmanager_resend(&self) -> Duration {
        Duration::from_secs(self.number("alerts.alertmanager_resend_s"))
    }
    pub fn dedup_snapshot_interval(&self) -> Duration {
        Duration::from_secs(self.number("dedup.snapshot_interval_s"))
    }
    /// The pipeline folder, and whether it was configured explicitly (a missing default folder
    /// just means no pipelines).
    pub fn pipelines_dir(&self) -> Option<(std::path::PathBuf, bool)> {
        let dir = self.get("pipelines.dir");
        (!dir.is_empty()).then(|| (std::path::PathBuf::from(dir), dir != "pipelines"))
    }
    /// Whether `serve` maintains the tables on a schedule.
    pub fn maintenance_enabled(&self) -> bool {
        self.get("maintenance.enabled").parse().expect("validated")
    }
    pub fn maintenance_interval(&self) -> Duration {
        Duration::from_secs(self.number("maintenance.interval_s"))
    }
    /// A comma-separated key as a list (empty items dropped).
    pub fn list(&self, key: &str) -> Vec<String> {
        self.get(key)
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect()
    }
    pub fn maintenance_lease_bucket(&self) -> &str {
        self.get("maintenance.lease_bucket")
    }
    pub fn maintenance_lease_ttl(&self) -> Duration {
        Duration::from_secs(self.number("maintenance.lease_ttl_s"))
    }
    /// How long unreferenced data files are kept before vacuum deletes them.
    pub fn vacuum_retention(&self) -> Duration {
        Duration::from_secs(self.number("maintenance.vacuum_retention_hours") * 3600)
    }

    /// The maintenance policy of one table: the `maintenance.*` limits, the zone's or the table's
    /// retention, and Z-ordering by `device_id` and `ts` for the usable zone's tables.
    pub fn maintenance_policy(&self, table: &fleetlake_zones::TableId) -> Policy {
        use fleetlake_zones::Zone;
        let zone_days = match table.zone {
            Zone::Raw => self.number("retention.raw_days"),
            Zone::Usable => self.number("retention.usable_days"),
            Zone::Final => self.number("retention.final_days"),
            Zone::Reference => 0,
        };
        let days = self
            .table_retention()
            .expect("validated")
            .get(&table.to_string())
            .copied()
            .unwrap_or(zone_days);
        Policy {
            target_file_size: self.number("maintenance.target_file_mb") * 1024 * 1024,
            min_small_files: self.number("maintenance.min_small_files"),
            quiet_for: Duration::from_secs(self.number("maintenance.quiet_minutes") * 60),
            max_partitions: self.number("maintenance.max_partitions") as usize,
            compact: table.zone != Zone::Reference,
            cluster_by: match table.zone {
                Zone::Usable => vec!["device_id".to_string(), "ts".to_string()],
                _ => Vec::new(),
            },
            checkpoint_interval: self.number("maintenance.checkpoint_interval"),
            log_retention: Duration::from_secs(
                self.number("maintenance.log_retention_hours") * 3600,
            ),
            vacuum_retention: Some(self.vacuum_retention()),
            // serve's runs list every file of a table once a day; `fleetlake maintain` always.
            full_vacuum_every: Some(Duration::from_secs(24 * 3600)),
            retention_days: (days > 0).then(|| u32::try_from(days).unwrap_or(u32::MAX)),
            dry_run: false,
        }
    }

    /// `retention.tables`: table name → days.
    fn table_retention(&self) -> Result<HashMap<String, u64>, String> {
        let mut out = HashMap::new();
        for item in self.get("retention.tables").split(',') {
            let item = item.trim();
            if item.is_empty() {
                continue;
            }
            let (table, days) = item.split_once('=').ok_or_else(|| item.to_string())?;
            let table = fleetlake_zones::TableId::parse(table.trim()).map_err(|e| e.to_string())?;
            let days: u64 = days.trim().parse().map_err(|_| item.to_string())?;
            out.insert(table.to_string(), days);
        }
        Ok(out)
    }

    pub fn listen(&self) -> std::net::SocketAddr {
        self.get("http.listen").parse().expect("validated")
    }

    /// The lake location and object-store options: `AWS_*` variables from `env`, overridden by
    /// the `lake.*` keys.
    pub fn lake(&self, env: impl IntoIterator<Item = (String, String)>) -> LakeConfig {
        let mut options: HashMap<String, String> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("AWS_"))
            .collect();
        if !self.get("lake.endpoint").is_empty() {
            options.insert("AWS_ENDPOINT_URL".into(), self.get("lake.endpoint").into());
        }
        if !self.get("lake.region").is_empty() {
            options.insert("AWS_REGION".into(), self.get("lake.region").into());
        }
        options
            .entry("AWS_REGION".into())
            .or_insert_with(|| "us-east-1".into());
        if self.get("lake.allow_http") == "true" {
            options.insert("AWS_ALLOW_HTTP".into(), "true".into());
        }
        if options.contains_key("AWS_ENDPOINT_URL") {
            // S3-compatible servers (SeaweedFS, MinIO) address buckets by path.
            options
                .entry("AWS_VIRTUAL_HOSTED_STYLE_REQUEST".into())
                .or_insert_with(|| "false".into());
        }
        LakeConfig {
            location: self.get("lake.location").to_string(),
            storage_options: options,
        }
    }

    /// `fleetlake config`: every key, its value and where the default differs.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        for key in KEYS {
            let value = redacted(key.name, self.get(key.name));
            let env = format!("FLEETLAKE_{}", key.name.to_uppercase().replace('.', "_"));
            out.push_str(&format!(
                "{:<28} = {:<24} # {} (default {:?}; env {})\n",
                key.name,
                format!("{value:?}"),
                key.help,
                key.default,
                env
            ));
        }
        out
    }
}

/// Keys whose whole value is a secret.
pub const SECRET_KEYS: &[&str] = &["nats.password", "nats.token", "nats.nkey_seed"];

/// `value` as it may be shown (in `fleetlake config`, errors and logs): a secret key's value is
/// `<redacted>` when set, and a URL's password (`nats://user:secret@host`) is replaced likewise.
pub fn redacted(key: &str, value: &str) -> String {
    if value.is_empty() {
        return String::new();
    }
    if SECRET_KEYS.contains(&key) {
        return "<redacted>".into();
    }
    redact_url(value)
}

/// A URL (or comma-separated URLs) with any password in its user part replaced by `<redacted>`;
/// other text is returned as it is. A URL that does not parse loses everything between `://`
/// and its last `@`.
pub fn redact_url(text: &str) -> String {
    text.split(',')
        .map(|part| match url::Url::parse(part.trim()) {
            Err(_) if part.contains("://") && part.contains('@') => {
                let (scheme, rest) = part.split_once("://").expect("checked");
                let host = rest.rsplit_once('@').map(|(_, h)| h).unwrap_or(rest);
                format!("{scheme}://<redacted>@{host}")
            }
            Ok(mut u) if u.password().is_some() => {
                let _ = u.set_password(Some("<redacted>"));
                u.to_string().trim_end_matches('/').to_string()
            }
            Ok(u) if !u.username().is_empty() && u.has_host() && part.contains('@') => {
                // nats://TOKEN@host: the user part alone is a token.
                let mut u = u.clone();
                let _ = u.set_username("<redacted>");
                u.to_string().trim_end_matches('/').to_string()
            }
            _ => part.to_string(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// `LAKE_LOCATION` → `lake.location`: the first `_` separates section and name.
fn env_to_key(rest: &str) -> String {
    let lower = rest.to_lowercase();
    match lower.split_once('_') {
        Some((section, name)) => format!("{section}.{name}"),
        None => lower,
    }
}

/// What the fleet endpoints read when a request does not say (the `fleet.*` configuration keys).
#[derive(Debug, Clone)]
pub struct FleetDefaults {
    pub metrics_table: String,
    pub metric: String,
    pub events_table: String,
    pub event: String,
    pub cohort: Vec<String>,
    pub dimensions: Vec<String>,
    /// Columns a request may filter on.
    pub filters: Vec<String>,
    pub device_column: String,
    pub time_column: String,
}

impl FleetDefaults {
    pub fn from_config(config: &Config) -> Self {
        Self {
            metrics_table: config.get("fleet.metrics_table").to_string(),
            metric: config.get("fleet.metric").to_string(),
            events_table: config.get("fleet.events_table").to_string(),
            event: config.get("fleet.event").to_string(),
            cohort: config.list("fleet.cohort"),
            dimensions: config.list("fleet.dimensions"),
            filters: config.list("fleet.filters"),
            device_column: config.get("fleet.device_column").to_string(),
            time_column: config.get("fleet.time_column").to_string(),
        }
    }
}

/// Resolved query limits of one caller.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    pub timeout: Duration,
    pub memory_bytes: usize,
    pub max_rows: usize,
    pub max_concurrent: usize,
    /// Requests per minute to the SQL routes; 0 = unlimited.
    pub rate_per_minute: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_never_shown() {
        let flags: Vec<(String, String)> = [
            ("nats.password", "hunter2-pw"),
            ("nats.token", "tok-secret"),
            ("nats.nkey_seed", "SUSECRETSEED"),
            (
                "nats.url",
                "nats://u:url-secret@127.0.0.1:4222,nats://tok-in-url@127.0.0.2:4222",
            ),
            (
                "alerts.alertmanager_url",
                "http://am:am-secret@127.0.0.1:9093",
            ),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let config = Config::load(None, Vec::new(), &flags).unwrap();
        let lake = config.lake(vec![
            (
                "AWS_SECRET_ACCESS_KEY".to_string(),
                "aws-secret".to_string(),
            ),
            ("AWS_SESSION_TOKEN".to_string(), "aws-session".to_string()),
        ]);
        let shown = format!(
            "{}\n{config:?}\n{lake:?}\n{:?}",
            config.describe(),
            config.nats(),
        );
        for secret in [
            "hunter2-pw",
            "tok-secret",
            "SUSECRETSEED",
            "url-secret",
            "tok-in-url",
            "am-secret",
            "aws-secret",
            "aws-session",
        ] {
            assert!(!shown.contains(secret), "{secret} shown:\n{shown}");
        }
        assert!(shown.contains("127.0.0.2"), "{shown}");
        // A bad value of a secret key is not echoed either.
        let err = Config::load(
            None,
            Vec::new(),
            &[("nats.nkey_seed".to_string(), "not-a-seed-xyz".to_string())],
        )
        .unwrap_err()
        .to_string();
        assert!(!err.contains("not-a-seed-xyz"), "{err}");
        // Nor a malformed URL's password, nor a broken file's line.
        let malformed = Config::load(
            None,
            Vec::new(),
            &[(
                "nats.url".to_string(),
                "nats://bob:hunter3@[::1".to_string(),
            )],
        )
        .unwrap();
        let shown = format!("{}{:?}", malformed.describe(), malformed.nats());
        assert!(!shown.contains("hunter3"), "{shown}");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("broken.toml");
        std::fs::write(&file, "[nats]\npassword = \"hunter4\n").unwrap();
        let err = Config::load(Some(&file), Vec::new(), &[])
            .unwrap_err()
            .to_string();
        assert!(!err.contains("hunter4"), "{err}");
        assert!(err.contains("line 2"), "{err}");
    }

    #[test]
    fn layers_apply_in_order_and_unknown_keys_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("fleetlake.toml");
        std::fs::write(
            &file,
            "[nats]\nstream = \"FROM_FILE\"\nsubjects = [\"a.>\", \"b.>\"]\n[ingest]\ncommit_rows = 5\n",
        )
        .unwrap();
        let env = vec![
            ("FLEETLAKE_NATS_STREAM".to_string(), "FROM_ENV".to_string()),
            ("FLEETLAKE_INGEST_FETCH_BATCH".to_string(), "7".to_string()),
            ("HOME".to_string(), "/root".to_string()),
        ];
        let flags = vec![("ingest.fetch_batch".to_string(), "9".to_string())];
        let c = Config::load(Some(&file), env, &flags).unwrap();
        assert_eq!(c.stream(), "FROM_ENV");
        assert_eq!(c.subjects(), vec!["a.>", "b.>"]);
        assert_eq!(c.commit_rows(), 5);
        assert_eq!(c.fetch_batch(), 9);
        assert_eq!(c.consumer(), "fleetlake");

        std::fs::write(&file, "[nats]\nstraem = \"x\"\n").unwrap();
        let err = Config::load(Some(&file), vec![], &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("unknown configuration key \"nats.straem\""),
            "{err}"
        );
        assert!(err.contains("did you mean \"nats.stream\""), "{err}");
        assert!(
            !err.contains("query.timeout_s"),
            "no list of every key: {err}"
        );
        // A client's token in the environment is not a key (the demo prints the export).
        let env = vec![("FLEETLAKE_TOKEN".to_string(), "flk_x".to_string())];
        assert!(Config::load(None, env, &[]).is_ok());
        let err = Config::load(None, vec![], &[("ingest.zzz".into(), "1".into())])
            .unwrap_err()
            .to_string();
        assert!(err.contains("the ingest keys are"), "{err}");
        assert!(err.contains("ingest.commit_rows"), "{err}");

        let env = vec![(
            "FLEETLAKE_INGEST_COMMIT_ROWS".to_string(),
            "many".to_string(),
        )];
        let err = Config::load(None, env, &[]).unwrap_err().to_string();
        assert!(err.contains("ingest.commit_rows"), "{err}");
        assert!(err.contains("FLEETLAKE_INGEST_COMMIT_ROWS"), "{err}");
        assert!(err.contains("positive integer"), "{err}");
    }

    #[test]
    fn lake_options_come_from_aws_variables_and_keys() {
        let env = vec![
            ("AWS_ACCESS_KEY_ID".to_string(), "k".to_string()),
            ("PATH".to_string(), "/bin".to_string()),
        ];
        let flags = vec![
            ("lake.location".to_string(), "s3://b/p".to_string()),
            (
                "lake.endpoint".to_string(),
                "http://127.0.0.1:9000".to_string(),
            ),
            ("lake.allow_http".to_string(), "true".to_string()),
        ];
        let c = Config::load(None, vec![], &flags).unwrap();
        let lake = c.lake(env);
        assert_eq!(lake.location, "s3://b/p");
        assert_eq!(lake.storage_options["AWS_ACCESS_KEY_ID"], "k");
        assert_eq!(
            lake.storage_options["AWS_ENDPOINT_URL"],
            "http://127.0.0.1:9000"
        );
        assert_eq!(lake.storage_options["AWS_ALLOW_HTTP"], "true");
        assert_eq!(lake.storage_options["AWS_REGION"], "us-east-1");
        assert!(!lake.storage_options.contains_key("PATH"));
    }
}
