//! # fleetlake-sql — the SQL layer
//!
//! Two halves that meet in Arrow record batches:
//!
//! ```text
//!  write path:  raw batch (payload bytes + origin) ──► decode::decode_envelope ──► Decoded
//!                                                        │ vectorized (arrow-json)   ├─ usable rows
//!                                                        │                           └─ quarantine rows + reason
//!  query path:  SQL text ──► QueryEngine::query ──► parse ─► resolve <zone>.<table> ─► plan
//!                              (read-only: DDL, DML, COPY, SET refused) ─► Arrow batches
//! ```
//!
//! Layout:
//! - [`decode`]: the built-in pipeline that decodes the default telemetry envelope (no I/O);
//! - [`dedup`]: removal of device replays by key, with state that snapshots to bytes (no I/O);
//! - [`pipeline`]: the pipeline language (parsing and checking pipeline files);
//! - [`rules`]: continuous rules (for / hysteresis / cool-down) that turn rows into alert transitions;
//! - [`window`]: event-time windows (tumbling, hopping, session) on DataFusion's aggregates;
//! - [`prepared`]: plans made once and run per micro-batch (pipelines, windows, rules);
//! - [`query`]: [`QueryEngine`], a DataFusion session over the lake's zones, read-only;
//! - [`anomaly`]: anomaly functions for SQL (z-scores, robust z, IQR, EWMA, spikes, level shifts,
//!   cohort outliers) and the `mad` aggregate;
//! - [`fleet`]: the SQL behind the fleet endpoints (cohort outliers, root cause);
//! - [`session`]: the one place sessions are made, so every session has the same functions;
//! - [`hash`]: stable hashes for what outlives the process (alert ids, versions, snapshots);
//! - [`error`]: the crate's error type, split into the user's fault and storage's.
//!
//! Start reading at [`decode::decode_envelope`] for ingest and [`QueryEngine::query`] for queries.

pub mod access;
pub mod anomaly;
pub mod decode;
pub mod dedup;
pub mod device_state;
pub mod error;
pub mod fleet;
pub mod hash;
pub mod memory;
pub mod pipeline;
pub mod prepared;
pub mod query;
pub mod restore;
pub mod rules;
pub mod session;
pub mod window;

pub use decode::{Decoded, JsonRows, decode_envelope, decode_json};
pub use dedup::{DedupKey, DedupState, DedupStats};
pub use error::{Error, ErrorKind, Result};
pub use query::{QueryEngine, QueryResult};
