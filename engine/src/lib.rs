//! # fleetlake — the engine
//!
//! The `fleetlake` binary and its runtime: configuration, the NATS source, micro-batching and
//! idempotent commits, the HTTP API, the simulator and the demo.
//!
//! ```text
//!  NATS JetStream ──► source (durable pull consumer, recreated at the lake's position)
//!                        │
//!                        ▼
//!                     ingest (micro-batches) ──► raw.telemetry
//!                        │   ├─ pipelines (declared, by subject) ─► usable.<table> ─┐
//!                        │   │    └─ derived: windows ─► final.<table>, rules ─► alerts.<rule>.<key> (NATS), final.alerts
//!                        │   └─ built-in decode ─► dedup ─► usable.telemetry ───────┼─► raw.quarantine
//!                        └── commit (in the background, one flush at a time) ─► ack after every table is durable
//!  HTTP (axum) ──► http ──► Lakehouse trait ──► fleetlake_sql::QueryEngine ──► zones
//! ```
//!
//! Layout: [`config`] (layered settings), [`source`] (JetStream), [`ingest`] (the micro-batch
//! loop), [`commit`] (the tables' writers, committing a flush while ingest goes on),
//! [`pipelines`] (the declared pipelines' stage), [`derived`] (windows, rules and alerts),
//! [`rules`] (changing rules at runtime over `/v1/rules`), [`replay`] (rebuilding a
//! pipeline's tables from the raw zone), [`http`], [`format`](mod@format) and [`reference`](mod@reference) (the API),
//! [`metrics`], [`serve`] (wiring and shutdown), [`simulate`] (the seeded fleet),
//! [`nats_server`] and [`demo`] (everything in one command). Start reading at [`ingest`].

pub mod commit;
pub mod config;
pub mod demo;
pub mod derived;
pub mod format;
pub mod http;
pub mod ingest;
pub mod metrics;
pub mod nats_server;
pub mod pipelines;
pub mod reference;
pub mod replay;
pub mod rules;
pub mod serve;
pub mod simulate;
pub mod source;
