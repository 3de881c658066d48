//! The crate's error type. Every variant says whose fault it is (see [`Error::is_transient`]).

/// Errors of the lakehouse layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The lake location in the configuration is not usable (user's fault).
    #[error(
        "invalid lake location {location:?}: {reason} (expected file:///path, a relative folder, or s3://bucket/prefix)"
    )]
    InvalidLocation { location: String, reason: String },
    /// A table name that fleetlake does not know (user's fault).
    #[error(
        "unknown table {0:?}: expected <zone>.<table> with zone one of raw, usable, final, reference"
    )]
    UnknownTable(String),
    /// Delta or object storage failed (outside system: retried with backoff).
    #[error("{action} {table}: {source}")]
    Delta {
        action: &'static str,
        table: String,
        #[source]
        source: Box<deltalake::DeltaTableError>,
    },
    /// A batch does not fit its table (our bug).
    #[error("batch for {table} does not match its schema: {source}")]
    Schema {
        table: String,
        #[source]
        source: arrow::error::ArrowError,
    },
    /// Local file-system trouble while preparing a `file://` lake.
    #[error("preparing {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// True when retrying the same operation later may succeed (storage unreachable, commit
    /// conflicts, timeouts); false for mistakes in configuration or input.
    pub fn is_transient(&self) -> bool {
        use deltalake::DeltaTableError as D;
        match self {
            Error::Delta { source, .. } => !matches!(
                **source,
                D::SchemaMismatch { .. }
                    | D::Arrow { .. }
                    | D::PartitionError { .. }
                    | D::InvalidPartitionFilter { .. }
                    | D::NoSchema
                    | D::MissingFeature { .. }
                    | D::VersionDowngrade { .. }
            ),
            Error::Io { .. } => true,
            _ => false,
        }
    }
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
