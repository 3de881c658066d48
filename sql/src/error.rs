//! The SQL layer's error type.

use datafusion::error::DataFusionError;

/// Errors of the SQL layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The statement is not valid SQL.
    #[error("SQL syntax error: {0}")]
    Parse(String),
    /// The statement parses but cannot be planned (unknown table or column, bad types, …).
    #[error("{0}")]
    Plan(String),
    /// The statement would change something; the query endpoint only reads.
    #[error("only read-only queries are allowed (SELECT, WITH, EXPLAIN, SHOW, DESCRIBE): {0}")]
    ReadOnly(String),
    /// The statement is too large or too deep to plan safely (see [`crate::query::check_size`]).
    #[error("query too large: {0}")]
    TooLarge(String),
    /// Executing the plan failed.
    #[error("query failed: {0}")]
    Execution(#[source] DataFusionError),
    /// The lake could not be read.
    #[error(transparent)]
    Lake(#[from] fleetlake_zones::Error),
    /// An Arrow kernel failed on a batch we built (our bug).
    #[error("internal error: {0}")]
    Internal(String),
    /// The caller may not read what the statement names (its token's role or tenants).
    #[error("{0}")]
    Forbidden(String),
    /// The query needed more memory than the caller's limit (DataFusion's memory pool).
    #[error("{0}")]
    MemoryLimit(String),
    /// The query stayed within its own limit, but all running queries together hold the memory
    /// every query may use (`query.total_memory_mb`): retry shortly (HTTP 503).
    #[error("{0}")]
    MemoryBusy(String),
    /// The answer holds more rows than the caller's limit.
    #[error("{0}")]
    RowLimit(String),
    /// What was asked for is not ready yet (state being restored after a start): retry soon.
    #[error("{0}")]
    NotReady(String),
}

/// Whose fault an error is: decides the HTTP status and whether to retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Bad input: fix the request (HTTP 400).
    User,
    /// An outside system is failing: retry later (HTTP 503).
    Unavailable,
    /// A bug in fleetlake (HTTP 500).
    Internal,
    /// The caller may not do this (HTTP 403).
    Forbidden,
    /// The request exceeds one of the caller's limits (HTTP 422).
    Limit,
}

impl Error {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Parse(_) | Error::Plan(_) | Error::ReadOnly(_) | Error::TooLarge(_) => {
                ErrorKind::User
            }
            Error::Execution(e) => classify(e),
            Error::Lake(e) if e.is_transient() => ErrorKind::Unavailable,
            Error::Lake(_) => ErrorKind::User,
            Error::Internal(_) => ErrorKind::Internal,
            Error::NotReady(_) | Error::MemoryBusy(_) => ErrorKind::Unavailable,
            Error::Forbidden(_) => ErrorKind::Forbidden,
            Error::MemoryLimit(_) | Error::RowLimit(_) => ErrorKind::Limit,
        }
    }

    /// True for an error that running the same plan over the same rows raises again, caused by
    /// the data (a cast or computation that fails for some value): the rows' fault, to be
    /// isolated and quarantined, never retried and never called a storage failure.
    pub fn is_data_error(&self) -> bool {
        matches!(self, Error::Execution(e) if caused_by_values(e))
    }

    /// A stable machine-readable code for API answers.
    pub fn code(&self) -> &'static str {
        match self {
            Error::Parse(_) => "sql_syntax",
            Error::Plan(_) => "sql_plan",
            Error::ReadOnly(_) => "read_only",
            Error::TooLarge(_) => "query_too_large",
            Error::Execution(_) if self.kind() == ErrorKind::Unavailable => "storage_unavailable",
            Error::Execution(_) => "execution",
            Error::Lake(_) if self.kind() == ErrorKind::Unavailable => "storage_unavailable",
            Error::Lake(_) => "lake",
            Error::Internal(_) => "internal",
            Error::NotReady(_) => "not_ready",
            Error::Forbidden(_) => "forbidden",
            Error::MemoryLimit(_) => "query_memory_limit",
            Error::MemoryBusy(_) => "queries_memory_busy",
            Error::RowLimit(_) => "query_row_limit",
        }
    }
}

/// Whether `e` is DataFusion's memory pool refusing a reservation.
pub(crate) fn is_resources_exhausted(e: &DataFusionError) -> bool {
    match e {
        DataFusionError::ResourcesExhausted(_) => true,
        DataFusionError::Context(_, inner) | DataFusionError::Diagnostic(_, inner) => {
            is_resources_exhausted(inner)
        }
        DataFusionError::Shared(inner) => is_resources_exhausted(inner),
        _ => false,
    }
}

fn classify(e: &DataFusionError) -> ErrorKind {
    match e {
        DataFusionError::ObjectStore(_) | DataFusionError::IoError(_) => ErrorKind::Unavailable,
        DataFusionError::Internal(_) => ErrorKind::Internal,
        DataFusionError::Context(_, inner) => classify(inner),
        DataFusionError::Diagnostic(_, inner) => classify(inner),
        // Repartitioning shares its input's error between its outputs.
        DataFusionError::Shared(inner) => classify(inner),
        // Errors raised inside table providers (Delta log, object store) are outside systems.
        DataFusionError::External(_) => ErrorKind::Unavailable,
        // A Parquet or Arrow read that failed below the format (object storage, I/O).
        DataFusionError::ParquetError(p)
            if matches!(
                p.as_ref(),
                datafusion::parquet::errors::ParquetError::External(_)
            ) =>
        {
            ErrorKind::Unavailable
        }
        DataFusionError::ArrowError(a, _)
            if matches!(
                a.as_ref(),
                arrow::error::ArrowError::ExternalError(_) | arrow::error::ArrowError::IoError(..)
            ) =>
        {
            ErrorKind::Unavailable
        }
        // A task of the plan panicked.
        DataFusionError::ExecutionJoin(_) => ErrorKind::Internal,
        _ => ErrorKind::User,
    }
}

/// Whether an execution error comes from the values computed on (a cast, an overflow, a
/// division by zero, a value a function refuses), as opposed to the plan, the schema, resources
/// or a bug: Arrow's compute errors, and DataFusion's own execution errors (which its functions
/// raise for bad arguments).
fn caused_by_values(e: &DataFusionError) -> bool {
    use arrow::error::ArrowError;
    match e {
        DataFusionError::ArrowError(a, _) => matches!(
            a.as_ref(),
            ArrowError::CastError(_)
                | ArrowError::ComputeError(_)
                | ArrowError::ArithmeticOverflow(_)
                | ArrowError::DivideByZero
                | ArrowError::ParseError(_)
                | ArrowError::InvalidArgumentError(_)
        ),
        DataFusionError::Execution(_) => true,
        DataFusionError::Context(_, inner) | DataFusionError::Diagnostic(_, inner) => {
            caused_by_values(inner)
        }
        DataFusionError::Shared(inner) => caused_by_values(inner),
        _ => false,
    }
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn storage_failures_inside_shared_parquet_and_arrow_errors_are_unavailable() {
        let shared = DataFusionError::Shared(Arc::new(DataFusionError::IoError(reset())));
        assert_eq!(classify(&shared), ErrorKind::Unavailable);
        let parquet = DataFusionError::ParquetError(Box::new(
            datafusion::parquet::errors::ParquetError::External(Box::new(reset())),
        ));
        assert_eq!(classify(&parquet), ErrorKind::Unavailable);
        let arrow = DataFusionError::ArrowError(
            Box::new(arrow::error::ArrowError::ExternalError(Box::new(reset()))),
            None,
        );
        assert_eq!(classify(&arrow), ErrorKind::Unavailable);
        // A value that does not fit stays the caller's.
        let cast = DataFusionError::ArrowError(
            Box::new(arrow::error::ArrowError::CastError("x".into())),
            None,
        );
        assert_eq!(classify(&cast), ErrorKind::User);
    }

    fn reset() -> std::io::Error {
        std::io::Error::other("connection reset by the object store")
    }
}
