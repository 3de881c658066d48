//! Latency at a fixed offered load: publish→alert and publish→queryable, and the highest load
//! the engine sustains with its lag not growing.
//!
//! Each run starts its own nats-server and a `fleetlake serve` with its defaults and one pipeline
//! ([`PIPELINE`]: every reading carries its send time, `sent_us`, into `usable.latency` and into
//! the values of the rule `hot`, `temp_c > 100`, no `for`, no cool-down). A publisher sends
//! `rate` readings a second (core NATS, in 5 ms ticks) from the fleet's devices; one reading in
//! 100 of each device is hot and the next cool again, so each hot reading raises a `firing`
//! alert and the next a `resolved` one.
//!
//! - **publish→alert**: a subscriber on `alerts.>` takes the difference between its clock and
//!   the alert's `sent_us` when the alert arrives.
//! - **publish→queryable**: every 100 ms a probe device sends a reading with the next sequence
//!   number; a client asks `/v1/query` for the probe's highest sequence in `usable.latency`
//!   every 50 ms, and each probe reading first seen in an answer counts the time from its
//!   sending to that answer's arrival (an upper bound, by up to 50 ms and one query's duration,
//!   reported too).
//! - **lag**: messages published but not yet acknowledged by the engine (it acks only what every
//!   table has committed), sampled every 500 ms.
//!
//! The first 2 seconds are warm-up and not counted.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use fleetlake_tests::{Api, Nats, TestDir, tail};
use futures::StreamExt;
use serde::Serialize;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use crate::{progress, round, rss_mib, start_engine};

/// The pipeline of every latency run.
pub(crate) const PIPELINE: &str = include_str!("latency.sql");

/// How often the probe query is asked (one at a time): often enough to see a reading within
/// this of its commit, seldom enough not to take a core from ingest.
const PROBE_QUERY_EVERY: Duration = Duration::from_millis(50);

/// Warm-up not counted, microseconds.
const WARM_UP_US: i64 = 2_000_000;

/// Latency percentiles, milliseconds: the value at rank round((n − 1)·p) of the sorted values.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct Percentiles {
    pub count: usize,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Percentiles {
    fn of(mut values: Vec<f64>) -> Self {
        values.sort_by(f64::total_cmp);
        let at = |p: f64| {
            if values.is_empty() {
                f64::NAN
            } else {
                round(
                    values[((values.len() as f64 - 1.0) * p).round() as usize],
                    1,
                )
            }
        };
        Self {
            count: values.len(),
            p50: at(0.5),
            p90: at(0.9),
            p99: at(0.99),
            max: at(1.0),
        }
    }
}

/// One run at a fixed offered load.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct LoadRun {
    /// Messages a second asked of the publisher.
    pub offered: u64,
    /// Messages a second it sent.
    pub achieved: f64,
    pub seconds: u64,
    pub messages: u64,
    pub alert: Percentiles,
    pub queryable: Percentiles,
    /// Median duration of one probe query, milliseconds.
    pub probe_query_ms: f64,
    /// Mean lag (messages published, not yet acknowledged) in the run's second quarter.
    pub lag_second_quarter: f64,
    /// Mean lag in its last quarter.
    pub lag_last_quarter: f64,
    /// Seconds from the last publish until every message was acknowledged (`None`: not within
    /// 60 s).
    pub catch_up_seconds: Option<f64>,
    /// The publisher reached 95% of the offered load, the lag did not grow by more than one
    /// second of traffic from the second quarter to the last, and the engine caught up.
    pub sustained: bool,
    /// Why not, when not sustained.
    pub why_not: Option<String>,
    /// Share of the machine's CPU time stolen while publishing (see [`crate::Steal`]).
    pub steal: f64,
    pub peak_rss_mib: f64,
}

/// The sustained-load search.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Sustained {
    /// The highest offered load sustained (`None`: not even the first).
    pub highest: Option<u64>,
    /// A higher load was tried and not sustained: `highest` is the limit to within 5,000
    /// msg/s or the last bisection step. Otherwise it is only a lower bound.
    pub bounded: bool,
    pub seconds: u64,
    pub trials: Vec<LoadRun>,
}

fn now_us() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

/// One run: `rate` messages a second for `seconds` from `devices` devices.
pub(crate) async fn run(rate: u64, seconds: u64, devices: u64) -> LoadRun {
    progress!("latency: {rate} msg/s for {seconds} s…");
    let nats = Nats::start().await;
    let dir = TestDir::new();
    let pipelines = dir.path().join("pipelines");
    std::fs::create_dir_all(&pipelines).expect("pipelines folder");
    std::fs::write(pipelines.join("latency.sql"), PIPELINE).expect("pipeline file");
    let log = dir.path().join("engine.log");
    let engine = start_engine(nats.url(), dir.path(), &pipelines, None, &[]).await;

    let client = async_nats::connect(nats.url()).await.expect("NATS");
    let js = async_nats::jetstream::new(client.clone());
    while js.get_stream("TELEMETRY").await.is_err() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let counted_from = now_us() + WARM_UP_US;
    let stop = CancellationToken::new();

    // publish→alert
    let mut alerts = client.subscribe("alerts.>").await.expect("subscribe");
    let alert_ms: Arc<Mutex<Vec<f64>>> = Arc::default();
    let collector = {
        let alert_ms = alert_ms.clone();
        tokio::spawn(async move {
            while let Some(m) = alerts.next().await {
                let now = now_us();
                let Ok(v) = serde_json::from_slice::<serde_json::Value>(&m.payload) else {
                    continue;
                };
                if let Some(sent) = v["values"]["sent_us"].as_f64().map(|s| s as i64)
                    && sent >= counted_from
                {
                    alert_ms.lock().await.push((now - sent) as f64 / 1000.0);
                }
            }
        })
    };

    // publish→queryable
    let probes: Arc<Mutex<Vec<i64>>> = Arc::default();
    let prober = {
        let (api, probes, stop) = (engine.api.clone(), probes.clone(), stop.clone());
        tokio::spawn(async move {
            let sql = "SELECT max(seq) FROM usable.latency WHERE device_id = 'probe'";
            let (mut seen, mut visible_ms, mut query_ms) = (0i64, Vec::new(), Vec::new());
            let mut pace = tokio::time::interval(PROBE_QUERY_EVERY);
            pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while !stop.is_cancelled() {
                pace.tick().await;
                let asked = Instant::now();
                let (status, body) = api.query(sql).await;
                let now = now_us();
                query_ms.push(asked.elapsed().as_secs_f64() * 1000.0);
                let newest = body["rows"][0][0].as_i64().unwrap_or(0);
                if status != 200 || newest <= seen {
                    continue;
                }
                let sent = probes.lock().await;
                for k in seen + 1..=newest {
                    if let Some(&s) = sent.get(k as usize - 1)
                        && s >= counted_from
                    {
                        visible_ms.push((now - s) as f64 / 1000.0);
                    }
                }
                seen = newest;
            }
            query_ms.sort_by(f64::total_cmp);
            (visible_ms, query_ms.get(query_ms.len() / 2).copied())
        })
    };

    // lag
    let sent = Arc::new(AtomicU64::new(0));
    let lag_sampler = {
        let (api, sent, stop) = (engine.api.clone(), sent.clone(), stop.clone());
        tokio::spawn(async move {
            let mut samples = Vec::new();
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            while !stop.is_cancelled() {
                tick.tick().await;
                let published = sent.load(Ordering::Relaxed);
                // A failed scrape is no sample (not a lag of everything published).
                if let Some(acked) = acked(&api).await {
                    samples.push(published.saturating_sub(acked) as f64);
                }
            }
            samples
        })
    };

    // The publisher.
    let steal = crate::Steal::start();
    let total = rate * seconds;
    let tick = Duration::from_millis(5);
    let per_tick = (rate as f64 * tick.as_secs_f64()).max(1.0) as u64;
    let started = Instant::now();
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut seqs = vec![0i64; devices as usize];
    let (mut n, mut next_probe) = (0u64, Instant::now());
    let deadline = started + Duration::from_secs(seconds);
    while n < total && Instant::now() < deadline + Duration::from_secs(1) {
        interval.tick().await;
        for _ in 0..per_tick.min(total - n) {
            let device = (n % devices) as usize;
            seqs[device] += 1;
            let seq = seqs[device];
            let hot = (seq as u64 + device as u64).is_multiple_of(100);
            let id = format!("dev-{device:05}");
            publish(&client, &id, seq, if hot { 150.0 } else { 20.0 }).await;
            n += 1;
        }
        if Instant::now() >= next_probe {
            next_probe += Duration::from_millis(100);
            let mut p = probes.lock().await;
            p.push(now_us());
            let k = p.len() as i64;
            drop(p);
            publish(&client, "probe", k, 20.0).await;
            n += 1;
        }
        sent.store(n, Ordering::Relaxed);
    }
    client.flush().await.expect("flush");
    let publish_seconds = started.elapsed().as_secs_f64();
    let steal = steal.share();
    sent.store(n, Ordering::Relaxed);

    // Catching up.
    let ended = Instant::now();
    let mut catch_up = None;
    while ended.elapsed() < Duration::from_secs(60) {
        if acked(&engine.api).await.is_some_and(|a| a >= n) {
            catch_up = Some(round(ended.elapsed().as_secs_f64(), 2));
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The last alerts and probes.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.cancel();
    let (visible_ms, query_ms) = prober.await.expect("prober");
    let lag = lag_sampler.await.expect("lag sampler");
    collector.abort();
    let alert = Percentiles::of(alert_ms.lock().await.clone());
    if alert.count == 0 {
        progress!(
            "latency: no alert arrived; the engine's log:\n{}",
            tail(&log)
        );
    }
    let (peak, _) = rss_mib(engine.pid());
    let status = engine.terminate().await;
    assert!(
        status.success(),
        "latency run: exit {status}:\n{}",
        tail(&log)
    );

    // Lag in the second and last quarter of the publishing time (samples every 500 ms).
    let published_samples = ((publish_seconds * 2.0) as usize).min(lag.len()).max(4);
    let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len().max(1) as f64;
    let q = published_samples / 4;
    let (second, last) = (
        mean(&lag[q.min(lag.len())..(2 * q).min(lag.len())]),
        mean(&lag[(3 * q).min(lag.len())..published_samples.min(lag.len())]),
    );
    let achieved = n as f64 / publish_seconds;
    let why_not = if achieved < 0.95 * rate as f64 {
        Some(format!(
            "the publisher sent only {achieved:.0} msg/s (it shares the cores)"
        ))
    } else if last > second + rate as f64 {
        Some("the lag grew".to_string())
    } else if catch_up.is_none() {
        Some("not caught up 60 s after publishing ended".to_string())
    } else {
        None
    };
    let sustained = why_not.is_none();
    let run = LoadRun {
        offered: rate,
        achieved: achieved.round(),
        seconds,
        messages: n,
        alert,
        queryable: Percentiles::of(visible_ms),
        probe_query_ms: round(query_ms.unwrap_or(f64::NAN), 1),
        lag_second_quarter: second.round(),
        lag_last_quarter: last.round(),
        catch_up_seconds: catch_up,
        sustained,
        why_not,
        steal,
        peak_rss_mib: peak,
    };
    progress!(
        "latency: {rate} msg/s: alert p99 {} ms, queryable p99 {} ms, lag {} → {}, {}",
        run.alert.p99,
        run.queryable.p99,
        run.lag_second_quarter,
        run.lag_last_quarter,
        if sustained {
            "sustained"
        } else {
            "not sustained"
        }
    );
    run
}

/// Messages the engine has acknowledged (`fleetlake_messages_acked_total`); `None` when
/// `/metrics` did not answer.
async fn acked(api: &Api) -> Option<u64> {
    let r = api
        .http(reqwest::Method::GET, format!("{}/metrics", api.base))
        .send()
        .await
        .ok()?;
    if !r.status().is_success() {
        return None;
    }
    r.text()
        .await
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("fleetlake_messages_acked_total "))
        .and_then(|v| v.trim().parse().ok())
}

/// Publishes one reading of the latency pipeline's shape, stamped with the time now.
async fn publish(client: &async_nats::Client, device: &str, seq: i64, temp_c: f64) {
    let now = chrono::Utc::now();
    let payload = serde_json::json!({
        "device_id": device,
        "seq": seq,
        "ts": now.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        "temp_c": temp_c,
        "sent_us": now.timestamp_micros(),
    });
    client
        .publish(
            format!("telemetry.bench.{device}"),
            payload.to_string().into(),
        )
        .await
        .expect("publish");
}

/// The highest offered load sustained for `seconds`: from 20,000 msg/s, doubling while
/// sustained, then bisecting between the highest sustained and the lowest not, to 5,000 msg/s,
/// in at most `trials` runs.
pub(crate) async fn highest_sustained(seconds: u64, trials: u32, devices: u64) -> Sustained {
    let (mut ok, mut failed): (Option<u64>, Option<u64>) = (None, None);
    let mut rate = 20_000;
    let mut runs = Vec::new();
    for _ in 0..trials {
        let r = run(rate, seconds, devices).await;
        if r.sustained {
            ok = Some(rate);
        } else {
            failed = Some(rate);
        }
        runs.push(r);
        rate = match (ok, failed) {
            (Some(lo), None) => lo * 2,
            (lo, Some(hi)) => (lo.unwrap_or(0) + hi) / 2 / 1000 * 1000,
            (None, None) => unreachable!("one was set"),
        };
        if let (lo, Some(hi)) = (ok, failed)
            && hi - lo.unwrap_or(0) <= 5_000
        {
            break;
        }
    }
    progress!("sustained: {ok:?} msg/s for {seconds} s");
    Sustained {
        highest: ok,
        bounded: failed.is_some(),
        seconds,
        trials: runs,
    }
}
