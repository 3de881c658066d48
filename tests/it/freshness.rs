//! Commits keep their cadence while a backlog is caught up: started on a backlog of the mixed
//! fleet, through the shipped pipelines, the engine commits raw.telemetry at least every
//! `ingest.commit_interval_ms` plus what a flush's commits and one micro-batch take (both as the
//! engine measured them), instead of one commit per `ingest.commit_rows` messages.

use std::time::{Duration, Instant};

use fleetlake::serve::Engine;
use fleetlake::tools::simulate::{Profile, SimConfig};
use fleetlake_tests::{Api, Nats};

const INTERVAL_MS: u64 = 500;
const MESSAGES: u64 = 30_000;

/// Commit times (ms since the epoch) of a Delta table's versions, in version order, read from
/// its log's `commitInfo`.
fn commit_times(table_dir: &std::path::Path) -> Vec<(u64, i64)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(table_dir.join("_delta_log")).unwrap() {
        let path = entry.unwrap().path();
        let Some(version) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".json"))
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        let text = std::fs::read_to_string(&path).unwrap();
        let time = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find_map(|v| v["commitInfo"]["timestamp"].as_i64())
            .expect("commitInfo with a timestamp");
        out.push((version, time));
    }
    out.sort();
    out
}

/// The smallest histogram bucket bound (seconds) holding every observation of `name` whose
/// labels contain `labels`; per matching series, summed over the series.
fn bound(metrics: &str, name: &str) -> f64 {
    let mut series: std::collections::BTreeMap<String, (f64, u64)> = Default::default();
    let mut counts: std::collections::BTreeMap<String, u64> = Default::default();
    for line in metrics.lines() {
        if let Some(rest) = line.strip_prefix(&format!("{name}_count")) {
            let (labels, v) = rest.rsplit_once(' ').unwrap();
            counts.insert(labels.to_string(), v.parse().unwrap());
        }
    }
    for line in metrics.lines() {
        let Some(rest) = line.strip_prefix(&format!("{name}_bucket{{")) else {
            continue;
        };
        let (labels, v) = rest.rsplit_once(' ').unwrap();
        let (labels, le) = labels.rsplit_once("le=\"").unwrap();
        let le = le.trim_end_matches("\"}");
        let key = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{}}}", labels.trim_end_matches(','))
        };
        let count: u64 = v.parse().unwrap();
        let le: f64 = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse().unwrap()
        };
        let total = counts.get(&key).copied().unwrap_or(u64::MAX);
        let entry = series.entry(key).or_insert((f64::INFINITY, 0));
        if count >= total && le < entry.0 {
            *entry = (le, count);
        }
    }
    series.values().map(|(le, _)| *le).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_commits_every_interval_while_a_backlog_is_caught_up() {
    let nats = Nats::start().await;
    let dir = fleetlake_tests::TestDir::new();
    let lake = dir.path().join("lake");
    let pipelines = fleetlake_tests::shipped_pipelines(dir.path());
    let interval = INTERVAL_MS.to_string();
    let config = fleetlake_tests::test_config(
        nats.url(),
        lake.to_str().unwrap(),
        &[
            ("ingest.commit_interval_ms", interval.as_str()),
            ("pipelines.dir", pipelines.to_str().unwrap()),
        ],
    );
    let js = fleetlake::ingest::source::connect(nats.url())
        .await
        .unwrap();
    fleetlake::ingest::source::ensure_stream(&js, &config)
        .await
        .unwrap();
    // The backlog, published before the engine starts.
    fleetlake_tests::simulate(
        &js,
        SimConfig {
            profile: Profile::Mixed,
            seed: 5,
            devices: 300,
            messages: MESSAGES,
            ..Default::default()
        },
    )
    .await;

    let started = Instant::now();
    let engine = Engine::start(config, Vec::new(), true).await.unwrap();
    let api = Api::new(engine.addr);
    fleetlake_tests::wait_stream_acked(nats.url(), Duration::from_secs(600)).await;
    let drained = started.elapsed();
    assert_eq!(
        api.scalar("SELECT count(*) FROM raw.telemetry").await,
        MESSAGES as i64
    );
    let (_, metrics) = api.get("/metrics").await;
    engine.shutdown().await.expect("a clean shutdown");

    // Every commit of raw.telemetry after the first (version 0 creates the table).
    let commits: Vec<i64> = commit_times(&lake.join("raw/telemetry"))
        .into_iter()
        .filter(|(v, _)| *v > 0)
        .map(|(_, t)| t)
        .collect();
    let gaps: Vec<i64> = commits.windows(2).map(|w| w[1] - w[0]).collect();
    let largest = gaps.iter().copied().max().unwrap_or(0);
    // What one flush's commits take (every table's slowest commit, as measured by the engine),
    // and one micro-batch beyond the interval (the budget holds it to half the interval).
    let commit_s = bound(&metrics, "fleetlake_commit_seconds");
    let allowed_ms = (INTERVAL_MS as f64 * 2.0 + commit_s * 1000.0) as i64;
    println!(
        "catch-up of {MESSAGES} messages in {drained:?} ({:.0} msg/s): {} raw commits, gaps {gaps:?} ms, largest {largest} ms, allowed {allowed_ms} ms (interval {INTERVAL_MS} ms + a flush's commits {commit_s:.2} s + one micro-batch)",
        MESSAGES as f64 / drained.as_secs_f64(),
        commits.len()
    );
    assert!(
        commits.len() as u64 >= 2,
        "a backlog of {MESSAGES} is committed in more than one step: {commits:?}"
    );
    assert!(
        largest <= allowed_ms,
        "raw.telemetry went {largest} ms without a commit during the catch-up (allowed {allowed_ms} ms): gaps {gaps:?}"
    );
}
