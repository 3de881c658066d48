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
//! No module imports one that (directly or not) imports it back: `python3
//! scripts/module-cycles.py` checks it (and `scripts/test.sh` runs it). Each room may call what
//! its row says and nothing else:
//!
//! | module | owns | may call |
//! |---|---|---|
//! | [`config`] | layered settings (defaults, TOML, environment, flags) and their typed sections: [`config::nats`] (how to reach NATS), [`config::partition`] (the stream's partitions), query limits, the fleet endpoints' defaults | – |
//! | [`metrics`] | counters, gauges, health facts and the cluster's status as `/healthz` shows it | – |
//! | [`error`] | the engine's errors by whose fault, and [`error::Stopped`], the one way ingest stops | metrics |
//! | [`progress`] | the progress bar of long commands | – |
//! | [`ingest`] | the stage from JetStream to the lake: [`ingest::source`], the micro-batch loop, [`ingest::pipelines`], [`ingest::derived`] (with [`ingest::alert_table`] and [`ingest::alertmanager`]), [`ingest::commit`], [`ingest::fleet`], [`ingest::replay`] | config, metrics |
//! | [`cluster`] | leases on the partitions, one ingest per owned partition, the fleet-wide stage's election | ingest, config, metrics |
//! | [`maintenance`] | which tables are maintained, with which policy, under which lease (the steps are `fleetlake_zones::maintain`'s) | config, metrics, ingest::source (to reach NATS) |
//! | [`api`] | the HTTP routes: [`api::state`] (what handlers share), [`api::respond`] (error answers), [`api::query`] (admission and execution), [`api::auth`] and [`api::audit`], one file per resource | config, metrics, the rule-change message of ingest |
//! | [`serve`] | wiring, supervision and ordered shutdown | every room above |
//! | [`tools`] | [`tools::simulate`], [`tools::nats_server`], [`tools::demo`] | serve, ingest::source |
//!
//! Start reading at [`ingest`].

pub mod api;
pub mod cluster;
pub mod config;
pub mod error;
pub mod ingest;
pub mod maintenance;
pub mod metrics;
pub mod progress;
pub mod serve;
pub mod tools;
