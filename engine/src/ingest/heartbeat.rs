//! The running engine's heartbeat in the lake, so that offline tools refuse to rewrite tables an
//! engine is writing.
//!
//! While `fleetlake serve` ingests, it rewrites `<lake>/_fleetlake/engine-<consumer>.json` every
//! [`INTERVAL`] with who it is and when it last wrote (`{"pid", "host", "consumer",
//! "at_ms"}`), and deletes it when it stops cleanly. `fleetlake replay` reads it and refuses while
//! it is fresher than [`STALE_AFTER`]: an engine killed without a clean stop holds the lake for
//! that long at most. Works the same on a local folder and on S3.

use std::time::Duration;

use fleetlake_zones::Lake;
use tokio_util::sync::CancellationToken;

use crate::error::{Context, Error};

/// How often the heartbeat is written.
pub const INTERVAL: Duration = Duration::from_secs(5);

/// A heartbeat older than this is an engine that is gone (killed, or its host lost).
pub const STALE_AFTER: Duration = Duration::from_secs(30);

fn file_name(consumer: &str) -> String {
    format!("engine-{consumer}.json")
}

/// Writes the heartbeat until `stop`, then deletes it. A failed write is logged and tried again
/// at the next beat (storage outages are reported by ingest itself).
pub async fn beat(lake: Lake, consumer: String, stop: CancellationToken) {
    let name = file_name(&consumer);
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    loop {
        let body = serde_json::json!({
            "pid": std::process::id(),
            "host": host,
            "consumer": consumer,
            "at_ms": chrono::Utc::now().timestamp_millis(),
        });
        if let Err(e) = lake
            .put_lake_file(&name, body.to_string().into_bytes())
            .await
        {
            tracing::debug!(error = %e, "writing the engine's heartbeat failed");
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(INTERVAL) => {}
        }
    }
    if let Err(e) = lake.delete_lake_file(&name).await {
        tracing::warn!(error = %e, "deleting the engine's heartbeat failed; replay waits until it is stale");
    }
}

/// Refuses (with who holds it) when an engine with this consumer wrote its heartbeat less than
/// [`STALE_AFTER`] ago; `what` names the refused operation.
pub async fn refuse_if_running(lake: &Lake, consumer: &str, what: &str) -> Result<(), Error> {
    let Some(bytes) = lake
        .get_lake_file(&file_name(consumer))
        .await
        .context("reading the engine's heartbeat")?
    else {
        return Ok(());
    };
    let beat: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
    let at = beat["at_ms"].as_i64().unwrap_or(0);
    let age_ms = chrono::Utc::now().timestamp_millis() - at;
    if age_ms < 0 || age_ms as u128 >= STALE_AFTER.as_millis() {
        return Ok(());
    }
    Err(Error::Invalid(format!(
        "an engine is running on {} (consumer {consumer}, pid {} on host {:?}, heartbeat {:.1} s ago): {what} while it writes the same tables would mix two definitions. \
         Stop it (SIGTERM) and run this again; an engine killed without a clean stop holds the lake for {} s at most",
        lake.root(),
        beat["pid"],
        beat["host"].as_str().unwrap_or_default(),
        age_ms as f64 / 1000.0,
        STALE_AFTER.as_secs(),
    )))
}
