//! Every configuration key, written once: its name, default, meaning and what its value must
//! be. `fleetlake config` prints this table; the README's configuration table follows it.

/// One configuration key: `section.name`, its default and what it means.
pub struct Key {
    pub name: &'static str,
    pub default: &'static str,
    pub help: &'static str,
    /// What a value must be (checked when it is set, naming where it came from).
    pub check: Check,
}

/// What a key's value must be.
#[derive(Debug, Clone, Copy)]
pub enum Check {
    /// Any text.
    Any,
    /// An integer above 0.
    Positive,
    /// An integer of 0 or more.
    Whole,
    /// An integer in `[lo, hi]`, described as the text says.
    Range(u64, u64, &'static str),
    /// `true` or `false`.
    Bool,
    /// One of the words, described as the text says.
    OneOf(&'static [&'static str], &'static str),
    /// Letters, digits, `_` and `-` (a NATS name); empty only when `empty_ok`.
    Name { empty_ok: bool },
    /// Anything but blank, described as the text says.
    NonEmpty(&'static str),
    /// A `zone.table`.
    Table,
    /// Comma-separated `zone.table`s.
    Tables,
    /// `zone.table=days`, comma-separated.
    TableDays,
    /// An address such as `127.0.0.1:8080`.
    SocketAddr,
    /// An http(s) URL, or empty for none.
    HttpUrl,
    /// An NKey seed (`S…`), or empty.
    NkeySeed,
    /// A TLS certificate or key: its section's `tls_cert` and `tls_key` both set or both empty.
    TlsPair,
    /// One or more comma-separated subjects.
    Subjects,
}

/// Every configuration key.
pub const KEYS: &[Key] = &[
    Key {
        name: "lake.location",
        default: "./lakehouse",
        help: "where the zones live: a folder, file:///abs/path or s3://bucket/prefix",
        check: Check::Any,
    },
    Key {
        name: "lake.endpoint",
        default: "",
        help: "S3 endpoint URL for S3-compatible storage (else AWS_ENDPOINT_URL)",
        check: Check::Any,
    },
    Key {
        name: "lake.region",
        default: "",
        help: "S3 region (else AWS_REGION; us-east-1 when neither is set)",
        check: Check::Any,
    },
    Key {
        name: "lake.allow_http",
        default: "false",
        help: "allow plain-HTTP S3 endpoints (loopback and test setups)",
        check: Check::Bool,
    },
    Key {
        name: "nats.url",
        default: "nats://127.0.0.1:4222",
        help: "NATS server URL; several (a cluster's seed servers) comma-separated",
        check: Check::NonEmpty("a NATS URL such as nats://127.0.0.1:4222"),
    },
    Key {
        name: "nats.user",
        default: "",
        help: "NATS user name (with nats.password)",
        check: Check::Any,
    },
    Key {
        name: "nats.password",
        default: "",
        help: "NATS password (secret: never printed; prefer FLEETLAKE_NATS_PASSWORD)",
        check: Check::Any,
    },
    Key {
        name: "nats.token",
        default: "",
        help: "NATS authentication token (secret: never printed)",
        check: Check::Any,
    },
    Key {
        name: "nats.nkey_seed",
        default: "",
        help: "NATS NKey seed, SU… (secret: never printed)",
        check: Check::NkeySeed,
    },
    Key {
        name: "nats.creds_file",
        default: "",
        help: "NATS credentials file (.creds: a user JWT and its NKey seed)",
        check: Check::Any,
    },
    Key {
        name: "nats.tls_ca",
        default: "",
        help: "PEM file of the certificate authority the NATS server's certificate is checked against (implies TLS)",
        check: Check::Any,
    },
    Key {
        name: "nats.tls_cert",
        default: "",
        help: "PEM client certificate for NATS (mutual TLS, with nats.tls_key)",
        check: Check::TlsPair,
    },
    Key {
        name: "nats.tls_key",
        default: "",
        help: "PEM private key of nats.tls_cert",
        check: Check::TlsPair,
    },
    Key {
        name: "nats.tls_required",
        default: "false",
        help: "refuse to talk to NATS without TLS (also implied by a tls:// URL or nats.tls_ca)",
        check: Check::Bool,
    },
    Key {
        name: "nats.stream",
        default: "TELEMETRY",
        help: "JetStream stream to consume (created if absent)",
        check: Check::Name { empty_ok: false },
    },
    Key {
        name: "nats.subjects",
        default: "telemetry.>",
        help: "comma-separated subjects of the stream when fleetlake creates it",
        check: Check::Subjects,
    },
    Key {
        name: "nats.consumer",
        default: "fleetlake",
        help: "durable pull consumer name; also the Delta txn application id (in a cluster, partition N's are <name>-pN)",
        check: Check::Name { empty_ok: false },
    },
    Key {
        name: "nats.replicas",
        default: "1",
        help: "replicas of the streams (telemetry, alerts) and the cluster's lease bucket when fleetlake creates them (3 on a 3-node NATS cluster)",
        check: Check::Range(1, 5, "1 to 5 (NATS allows at most 5 replicas)"),
    },
    Key {
        name: "cluster.partitions",
        default: "0",
        help: "0 = this instance consumes the whole stream; P > 0 = the stream's subjects are mapped to P partitions (fleetlake sets the mapping when it creates the stream; fixed for the stream's life) and the instances sharing nats.consumer split them",
        check: Check::Range(0, 1024, "0 (no partitions) to 1024"),
    },
    Key {
        name: "cluster.instance",
        default: "",
        help: "this instance's id in the cluster, unique among its members (empty = $HOSTNAME, else localhost, and the process id)",
        check: Check::Name { empty_ok: true },
    },
    Key {
        name: "cluster.lease_bucket",
        default: "fleetlake_cluster",
        help: "NATS key-value bucket of the cluster's members and partition leases",
        check: Check::Name { empty_ok: false },
    },
    Key {
        name: "cluster.lease_ttl_s",
        default: "10",
        help: "a partition whose owner has not renewed its lease for this long (it died) is taken over by another instance",
        check: Check::Positive,
    },
    Key {
        name: "cluster.fleet_wide",
        default: "merge",
        help: "window tables not grouped by device_id and rules over them or grouping cohorts, in a cluster: merge = one elected instance computes them over every partition's committed rows, in stream order; skip = they are not computed (listed in /v1/cluster)",
        check: Check::OneOf(&["merge", "skip"], "merge or skip"),
    },
    Key {
        name: "ingest.fetch_batch",
        default: "1000",
        help: "messages requested per pull",
        check: Check::Positive,
    },
    Key {
        name: "ingest.commit_rows",
        default: "20000",
        help: "commit when this many messages are buffered",
        check: Check::Positive,
    },
    Key {
        name: "ingest.commit_interval_ms",
        default: "250",
        help: "commit at least this often while messages arrive: how long a message waits at most before it is queryable",
        check: Check::Positive,
    },
    Key {
        name: "ingest.shutdown_grace_s",
        default: "30",
        help: "on SIGTERM, how long failing commits of in-flight messages are retried before serve gives up and exits non-zero (they are redelivered at the next start)",
        check: Check::Positive,
    },
    Key {
        name: "ingest.ack_wait_s",
        default: "300",
        help: "JetStream ack wait: longer than any commit, so an in-flight batch is never redelivered",
        check: Check::Positive,
    },
    Key {
        name: "dedup.key",
        default: "device_seq",
        help: "what identifies a replay: device_seq (device_id + seq), msg_id (Nats-Msg-Id header) or none",
        check: Check::Any,
    },
    Key {
        name: "dedup.max_gaps",
        default: "64",
        help: "device_seq: gaps in a device's sequence remembered before its oldest readings are forgotten",
        check: Check::Any,
    },
    Key {
        name: "dedup.window_minutes",
        default: "60",
        help: "msg_id: how long (received time) a message id is remembered",
        check: Check::Any,
    },
    Key {
        name: "dedup.snapshot_interval_s",
        default: "60",
        help: "how often the dedup state is snapshotted beside usable.telemetry (a restart replays the rows since)",
        check: Check::Any,
    },
    Key {
        name: "alerts.stream",
        default: "ALERTS",
        help: "JetStream stream for alert transitions on alerts.<rule>.<key> (created if absent)",
        check: Check::Name { empty_ok: false },
    },
    Key {
        name: "alerts.duplicate_window_s",
        default: "3600",
        help: "how long JetStream remembers alert ids: a transition republished after a crash within this window is dropped",
        check: Check::Positive,
    },
    Key {
        name: "alerts.silence_max_gap_s",
        default: "10",
        help: "silence rules count time only while ingest watches a healthy stream: a longer wall-clock gap between two observations (fleetlake stopped, NATS unreachable, a commit blocked) is not counted as silence; at least twice ingest.commit_interval_ms",
        check: Check::Positive,
    },
    Key {
        name: "alerts.alertmanager_url",
        default: "",
        help: "Prometheus Alertmanager to push each alert transition to (POST <url>/api/v2/alerts), beside the JetStream stream; empty = none",
        check: Check::HttpUrl,
    },
    Key {
        name: "alerts.alertmanager_resend_s",
        default: "60",
        help: "how often alerts still firing are sent to Alertmanager again (it resolves an alert not re-sent within its resolve_timeout)",
        check: Check::Positive,
    },
    Key {
        name: "pipelines.dir",
        default: "pipelines",
        help: "folder of pipeline files (*.sql) to run; serve refuses to start if one does not check; empty = none",
        check: Check::Any,
    },
    Key {
        name: "maintenance.enabled",
        default: "true",
        help: "serve runs table maintenance (retention, compaction, checkpoints, log cleanup, vacuum) on a schedule",
        check: Check::Bool,
    },
    Key {
        name: "maintenance.interval_s",
        default: "300",
        help: "seconds between maintenance runs in serve (the first one this long after the start)",
        check: Check::Positive,
    },
    Key {
        name: "maintenance.target_file_mb",
        default: "128",
        help: "size of the Parquet files compaction writes, MiB; files this large are left alone",
        check: Check::Positive,
    },
    Key {
        name: "maintenance.min_small_files",
        default: "16",
        help: "a partition still being written is compacted once it holds this many files smaller than the target",
        check: Check::Range(2, u64::MAX, "an integer of at least 2"),
    },
    Key {
        name: "maintenance.quiet_minutes",
        default: "15",
        help: "a partition with no file younger than this is quiet: usable tables' quiet partitions are Z-ordered by device_id and ts once",
        check: Check::Whole,
    },
    Key {
        name: "maintenance.max_partitions",
        default: "8",
        help: "at most this many partitions rewritten per table per run (the ones with the most small files first)",
        check: Check::Positive,
    },
    Key {
        name: "maintenance.checkpoint_interval",
        default: "100",
        help: "a Delta checkpoint at least every this many commits (also set as delta.checkpointInterval on new tables)",
        check: Check::Positive,
    },
    Key {
        name: "maintenance.log_retention_hours",
        default: "168",
        help: "Delta log entries older than this (and older than a checkpoint) are deleted; time travel reaches back this far",
        check: Check::Whole,
    },
    Key {
        name: "maintenance.vacuum_retention_hours",
        default: "168",
        help: "data files no longer referenced are deleted once older than this; serve refuses less than 1 (files being written could go)",
        check: Check::Whole,
    },
    Key {
        name: "maintenance.lease_bucket",
        default: "fleetlake_maintenance",
        help: "NATS key-value bucket holding the maintenance lease: one instance on a lake maintains it at a time",
        check: Check::Name { empty_ok: false },
    },
    Key {
        name: "maintenance.lease_ttl_s",
        default: "900",
        help: "a lease not renewed for this long (its holder died) can be taken by another instance",
        check: Check::Positive,
    },
    Key {
        name: "retention.raw_days",
        default: "0",
        help: "days of raw-zone partitions kept (by ingest_date); 0 keeps everything",
        check: Check::Whole,
    },
    Key {
        name: "retention.usable_days",
        default: "0",
        help: "days of usable-zone partitions kept (by event_date or the first DATE partition column); 0 keeps everything",
        check: Check::Whole,
    },
    Key {
        name: "retention.final_days",
        default: "0",
        help: "days of final-zone partitions kept (tables partitioned by a DATE column); 0 keeps everything",
        check: Check::Whole,
    },
    Key {
        name: "retention.tables",
        default: "",
        help: "per-table days overriding the zone's, comma-separated: raw.quarantine=365,usable.cold_chain=90",
        check: Check::TableDays,
    },
    Key {
        name: "http.listen",
        default: "127.0.0.1:8080",
        help: "HTTP API address",
        check: Check::SocketAddr,
    },
    Key {
        name: "http.tls_cert",
        default: "",
        help: "PEM certificate chain for HTTPS on http.listen (with http.tls_key); empty = plain HTTP",
        check: Check::TlsPair,
    },
    Key {
        name: "http.tls_key",
        default: "",
        help: "PEM private key of http.tls_cert",
        check: Check::TlsPair,
    },
    Key {
        name: "auth.enabled",
        default: "true",
        help: "every route but /healthz needs a bearer token; false opens every route to anyone who can reach the port (local experiments only)",
        check: Check::Bool,
    },
    Key {
        name: "auth.tokens_file",
        default: "fleetlake-tokens.toml",
        help: "where tokens are stored (SHA-256 hashes only, mode 0600); written by `fleetlake token` and /v1/tokens, read again when it changes",
        check: Check::NonEmpty("a non-empty value"),
    },
    Key {
        name: "auth.public_metrics",
        default: "false",
        help: "serve /metrics without a token (for a Prometheus without credentials)",
        check: Check::Bool,
    },
    Key {
        name: "auth.tenant_column",
        default: "tenant",
        help: "the column naming a row's tenant: a token bound to tenants sees only its tenants' rows",
        check: Check::NonEmpty("a non-empty value"),
    },
    Key {
        name: "auth.tenant_free_tables",
        default: "",
        help: "tables without a tenant column that tokens bound to tenants may read in full (comma-separated, e.g. reference.firmware)",
        check: Check::Tables,
    },
    Key {
        name: "query.timeout_s",
        default: "30",
        help: "a query running longer is cancelled (408 query_timeout); a token may override it",
        check: Check::Positive,
    },
    Key {
        name: "query.memory_mb",
        default: "1024",
        help: "memory one query's operators may reserve (DataFusion's memory pool); more fails with 422 query_memory_limit",
        check: Check::Positive,
    },
    Key {
        name: "query.total_memory_mb",
        default: "2048",
        help: "memory all queries together may reserve; a query within its own limit that finds it spent fails with 503 queries_memory_busy; the rest of the process (ingest) keeps the remainder",
        check: Check::Positive,
    },
    Key {
        name: "query.max_rows",
        default: "1000000",
        help: "rows one answer may hold; more fails with 422 query_row_limit",
        check: Check::Positive,
    },
    Key {
        name: "query.max_body_kb",
        default: "1024",
        help: "the largest request body POST /v1/query accepts (413 body_too_large)",
        check: Check::Positive,
    },
    Key {
        name: "query.max_concurrent",
        default: "4",
        help: "queries one token may run at once (SQL and fleet endpoints); more get 429 too_many_concurrent_queries",
        check: Check::Positive,
    },
    Key {
        name: "query.rate_per_minute",
        default: "600",
        help: "queries one token may start per minute; more get 429 rate_limited with Retry-After; 0 = unlimited",
        check: Check::Whole,
    },
    Key {
        name: "query.threads",
        default: "0",
        help: "threads running queries, apart from ingest's, so a heavy query cannot starve ingest; 0 = half the cores (at least 1)",
        check: Check::Whole,
    },
    Key {
        name: "fleet.metrics_table",
        default: "usable.cold_chain",
        help: "the table /v1/fleet/outliers reads when the request names none",
        check: Check::Table,
    },
    Key {
        name: "fleet.metric",
        default: "temperature_c",
        help: "the metric /v1/fleet/outliers scores when the request names none",
        check: Check::NonEmpty("a column name"),
    },
    Key {
        name: "fleet.events_table",
        default: "usable.device_health",
        help: "the table /v1/fleet/root-cause reads when the request names none",
        check: Check::Table,
    },
    Key {
        name: "fleet.event",
        default: "crashed",
        help: "the event /v1/fleet/root-cause counts when the request names none: a boolean column, a column that is not NULL, or column:value",
        check: Check::NonEmpty("a column name"),
    },
    Key {
        name: "fleet.cohort",
        default: "model,hw_rev",
        help: "the cohort columns of /v1/fleet/outliers when the request gives no by=",
        check: Check::Any,
    },
    Key {
        name: "fleet.dimensions",
        default: "fw,hw_rev",
        help: "the attributes /v1/fleet/root-cause combines when the request gives no dimensions=",
        check: Check::Any,
    },
    Key {
        name: "fleet.filters",
        default: "tenant,site,model,hw_rev,fw",
        help: "the columns the fleet endpoints filter on as query parameters (site=berlin,paris)",
        check: Check::Any,
    },
    Key {
        name: "fleet.device_column",
        default: "device_id",
        help: "the device column of the fleet endpoints' tables",
        check: Check::NonEmpty("a column name"),
    },
    Key {
        name: "fleet.time_column",
        default: "ts",
        help: "the event-time column of the fleet endpoints' tables",
        check: Check::NonEmpty("a column name"),
    },
];
