//! The `maintenance.*` and `retention.*` sections: the lease maintenance runs under and the
//! policy each table is maintained with.

use std::collections::HashMap;
use std::time::Duration;

use fleetlake_zones::maintain::Policy;

use super::Config;

impl Config {
    pub fn maintenance_lease_bucket(&self) -> &str {
        self.get("maintenance.lease_bucket")
    }
    pub fn maintenance_lease_ttl(&self) -> Duration {
        Duration::from_secs(self.number("maintenance.lease_ttl_s"))
    }
    /// How long unreferenced data files are kept before vacuum deletes them.
    pub fn vacuum_retention(&self) -> Duration {
        Duration::from_secs(self.number("maintenance.vacuum_retention_hours") * 3600)
    }

    /// The maintenance policy of one table: the `maintenance.*` limits, the zone's or the table's
    /// retention, and Z-ordering by `device_id` and `ts` for the usable zone's tables.
    pub fn maintenance_policy(&self, table: &fleetlake_zones::TableId) -> Policy {
        use fleetlake_zones::Zone;
        let zone_days = match table.zone {
            Zone::Raw => self.number("retention.raw_days"),
            Zone::Usable => self.number("retention.usable_days"),
            Zone::Final => self.number("retention.final_days"),
            Zone::Reference => 0,
        };
        let days = self
            .table_retention()
            .expect("validated")
            .get(&table.to_string())
            .copied()
            .unwrap_or(zone_days);
        Policy {
            target_file_size: self.number("maintenance.target_file_mb") * 1024 * 1024,
            min_small_files: self.number("maintenance.min_small_files"),
            quiet_for: Duration::from_secs(self.number("maintenance.quiet_minutes") * 60),
            max_partitions: self.number("maintenance.max_partitions") as usize,
            compact: table.zone != Zone::Reference,
            cluster_by: match table.zone {
                Zone::Usable => vec!["device_id".to_string(), "ts".to_string()],
                _ => Vec::new(),
            },
            checkpoint_interval: self.number("maintenance.checkpoint_interval"),
            log_retention: Duration::from_secs(
                self.number("maintenance.log_retention_hours") * 3600,
            ),
            vacuum_retention: Some(self.vacuum_retention()),
            // serve's runs list every file of a table once a day; `fleetlake maintain` always.
            full_vacuum_every: Some(Duration::from_secs(24 * 3600)),
            retention_days: (days > 0).then(|| u32::try_from(days).unwrap_or(u32::MAX)),
            dry_run: false,
        }
    }

    /// `retention.tables`: table name → days; `None` when an item is not `zone.table=days`
    /// (refused when the value is set, see [`super::Check::TableDays`]).
    pub(super) fn table_retention(&self) -> Option<HashMap<String, u64>> {
        let mut out = HashMap::new();
        for item in self.get("retention.tables").split(',') {
            let item = item.trim();
            if item.is_empty() {
                continue;
            }
            let (table, days) = item.split_once('=')?;
            let table = fleetlake_zones::TableId::parse(table.trim()).ok()?;
            let days: u64 = days.trim().parse().ok()?;
            out.insert(table.to_string(), days);
        }
        Some(out)
    }
}
