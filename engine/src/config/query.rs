//! The `query.*` and `fleet.*` sections: every token's query limits unless it overrides them,
//! and what the fleet endpoints read when a request does not say.

use std::time::Duration;

use super::Config;

impl Config {
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
