//! The engine's errors, typed by whose fault they are, and the one way ingest stops.
//!
//! - [`Error`]: what failed. [`Error::Unavailable`] is an outside system (object storage, the
//!   lake's log, NATS) that is failing: retried with backoff. [`Error::Invalid`] cannot succeed
//!   by retrying (a definition that does not fit the lake, a `FAIL` expectation, a stream that
//!   is not the lake's): ingest stops and says why. [`Error::Bug`] is fleetlake's own fault.
//! - [`Stopped`]: the proof that ingest is stopping. Only [`Stopped::because`] makes one for a
//!   failure, and it records the cause where `/healthz` and the exit status read it
//!   ([`crate::metrics::Metrics::stop_ingest`]); [`Stopped::cancelled`] is a shutdown that was
//!   asked for. Ingest's steps return `Result<_, Stopped>`, so a stop cannot go unexplained and
//!   no `bool` has to mean "stop".

use std::fmt;

use crate::metrics::Metrics;

/// What failed, by whose fault (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// An outside system is failing: retried with backoff.
    #[error("{0}")]
    Unavailable(String),
    /// Retrying cannot help: ingest stops and `/healthz` says why.
    #[error("{0}")]
    Invalid(String),
    /// A bug in fleetlake.
    #[error("internal error: {0}")]
    Bug(String),
}

impl Error {
    /// Whether trying again later can succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::Unavailable(_))
    }

    /// The same error, its message preceded by what was being done (`reading usable.telemetry`).
    pub fn context(self, doing: impl fmt::Display) -> Self {
        match self {
            Error::Unavailable(m) => Error::Unavailable(format!("{doing}: {m}")),
            Error::Invalid(m) => Error::Invalid(format!("{doing}: {m}")),
            Error::Bug(m) => Error::Bug(format!("{doing}: {m}")),
        }
    }
}

impl From<fleetlake_zones::Error> for Error {
    fn from(e: fleetlake_zones::Error) -> Self {
        if matches!(e, fleetlake_zones::Error::Schema { .. }) {
            // A batch fleetlake built that does not fit its own table.
            Error::Bug(e.to_string())
        } else if e.is_transient() {
            Error::Unavailable(e.to_string())
        } else {
            Error::Invalid(e.to_string())
        }
    }
}

impl From<fleetlake_sql::Error> for Error {
    fn from(e: fleetlake_sql::Error) -> Self {
        match e.kind() {
            fleetlake_sql::ErrorKind::Unavailable => Error::Unavailable(e.to_string()),
            fleetlake_sql::ErrorKind::Internal => Error::Bug(e.to_string()),
            _ => Error::Invalid(e.to_string()),
        }
    }
}

impl From<datafusion::error::DataFusionError> for Error {
    fn from(e: datafusion::error::DataFusionError) -> Self {
        fleetlake_sql::Error::Execution(e).into()
    }
}

impl From<arrow::error::ArrowError> for Error {
    /// An Arrow kernel failing on batches fleetlake built: a bug.
    fn from(e: arrow::error::ArrowError) -> Self {
        Error::Bug(e.to_string())
    }
}

impl<K> From<async_nats::error::Error<K>> for Error
where
    K: Clone + fmt::Debug + fmt::Display + PartialEq,
{
    /// NATS failing: an outside system, retried.
    fn from(e: async_nats::error::Error<K>) -> Self {
        Error::Unavailable(e.to_string())
    }
}

impl From<tokio::task::JoinError> for Error {
    /// A task of fleetlake's that panicked: a bug.
    fn from(e: tokio::task::JoinError) -> Self {
        Error::Bug(e.to_string())
    }
}

impl From<Error> for String {
    /// The message, for the CLI, which prints an error and exits non-zero.
    fn from(e: Error) -> Self {
        e.to_string()
    }
}

/// `result`'s error converted to an [`Error`] and preceded by what was being done.
pub trait Context<T> {
    fn context(self, doing: impl fmt::Display) -> Result<T, Error>;
}

impl<T, E: Into<Error>> Context<T> for Result<T, E> {
    fn context(self, doing: impl fmt::Display) -> Result<T, Error> {
        self.map_err(|e| e.into().context(doing))
    }
}

/// Ingest is stopping (see the module docs); made only by [`Stopped::because`], which records
/// why, or [`Stopped::cancelled`], for a shutdown that was asked for.
#[derive(Debug)]
#[must_use]
pub struct Stopped(());

impl Stopped {
    /// Records `cause` as why ingest stopped (`/healthz` answers 503 with it, `serve` exits
    /// non-zero) and returns the proof.
    pub fn because(metrics: &Metrics, cause: impl fmt::Display) -> Self {
        metrics.stop_ingest(&cause.to_string());
        Stopped(())
    }

    /// Records that a `FAIL` expectation stopped the pipelines (`failure` names the pipeline and
    /// the expectation): `/healthz` reports the pipeline component down with it.
    pub fn pipeline_failed(metrics: &Metrics, failure: impl fmt::Display) -> Self {
        let failure = failure.to_string();
        tracing::error!(%failure, "pipeline failed; ingest stops, nothing of the batch is written");
        metrics.set_last_error("pipeline", &failure);
        metrics
            .pipeline_failed
            .store(1, std::sync::atomic::Ordering::Relaxed);
        Stopped(())
    }

    /// A shutdown was asked for: nothing to record.
    pub fn cancelled() -> Self {
        Stopped(())
    }
}
