//! # fleetlake — the engine
//!
//! The `fleetlake` binary and its runtime: configuration, the ingest stage (NATS source,
//! micro-batches, pipelines, windows and rules, idempotent commits), the HTTP API, and the tools
//! around them (simulator, demo, local NATS). The SQL layer is `fleetlake_sql`, the lake
//! `fleetlake_zones`; see `ARCHITECTURE.md` at the repository's root for the whole picture.
//!
//! ```text
//!  NATS JetStream ──► ingest::source (durable pull consumer, recreated at the lake's position;
//!                        │            a message the client drops is read by its sequence)
//!                        ▼
//!                     ingest (micro-batches) ──► raw.telemetry
//!                        │   ├─ ingest::pipelines (declared, by subject) ─► usable.<table> ─┐
//!                        │   │    └─ ingest::derived: windows ─► final.<table>,            │
//!                        │   │                        rules ─► alerts.<rule>.<key> (NATS) │
//!                        │   └─ built-in decode ─► dedup ─► usable.telemetry ──────────────┼─► raw.quarantine
//!                        └── ingest::commit (in the background, one flush at a time) ─► ack after every table is durable
//!  HTTP (axum) ──► api ──► Lakehouse trait ──► fleetlake_sql::QueryEngine ──► zones
//!       └── api::rules ──► RuleChange ──► ingest (between micro-batches)
//!  maintenance (a second writer, under a lease in NATS KV) ──► zones: retention, compaction, checkpoints, vacuum
//!  cluster (cluster.partitions > 0): one ingest per partition this instance holds a NATS KV lease on
//!  serve: wires them, supervises ingest (a panic or a stop is /healthz 503 and a non-zero exit)
//! ```
//!
//! ## Layout
//!
//! | module | owns | may call |
//! |---|---|---|
//! | [`config`] | layered settings (defaults, TOML, environment, flags) | – |
//! | [`metrics`] | counters, gauges and health facts | – |
//! | [`progress`] | the progress bar of long commands | – |
//! | [`ingest`] | the stage from JetStream to the lake: [`ingest::source`], the micro-batch loop, [`ingest::pipelines`], [`ingest::derived`], [`ingest::commit`], [`ingest::replay`] | config, metrics |
//! | [`api`] | the HTTP routes, [`api::format`], [`api::reference`], [`api::rules`] | metrics, the rule-change message of ingest |
//! | [`cluster`] | partitions of the stream, their leases, one ingest per owned partition | ingest, config, metrics |
//! | [`maintenance`] | which tables are maintained, with which policy, under which lease (the steps are `fleetlake_zones::maintain`'s) | config, metrics, ingest::source (to reach NATS) |
//! | [`serve`] | wiring, supervision and ordered shutdown | ingest, cluster, api, maintenance, config, metrics |
//! | [`tools`] | [`tools::simulate`], [`tools::nats_server`], [`tools::demo`] | serve, ingest::source |
//!
//! Start reading at [`ingest`].

pub mod api;
pub mod cluster;
pub mod config;
pub mod ingest;
pub mod maintenance;
pub mod metrics;
pub mod progress;
pub mod serve;
pub mod tools;
