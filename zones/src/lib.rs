//! # fleetlake-zones — the lakehouse layer
//!
//! This crate owns the Delta tables of fleetlake's zoned lakehouse and the only way rows get into
//! them: an idempotent commit that records the writer's progress inside the table itself.
//!
//! ```text
//!   RecordBatch ──► Lake::commit(table, batch, progress) ──► Delta log (txn action: app id + version)
//!                        │ skips rows a table already holds        │
//!                        ▼                                          ▼
//!              <lake>/<zone>/<table>  (file:// or s3://)   Lake::committed_version(table)
//! ```
//!
//! Layout:
//! - [`schema`]: the zones, the table identifiers and the Arrow schemas of the built-in tables;
//! - [`lake`]: [`Lake`], opening the object store, creating, describing and replacing tables, and
//!   [`lake::TableWriter`], the idempotent commit and the side files (dedup snapshots) kept beside
//!   a table;
//! - [`maintain`]: keeping tables fast while the stream writes them — retention, compaction,
//!   checkpoints, log cleanup and vacuum;
//! - [`error`]: the crate's one error type, which says whose fault a failure is.
//!
//! Start reading at [`lake::TableWriter::commit`].

pub mod error;
pub mod lake;
pub mod maintain;
pub mod schema;

pub use error::{Error, Result};
pub use lake::{CommitOutcome, Lake, LakeConfig, TableInfo};
pub use schema::{TableId, Zone};
