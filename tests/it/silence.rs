//! Silence rules and cohort grouping end to end, on a real NATS server: a device that stops
//! reporting fires once after its declared time and resolves when it reports again; nobody is
//! declared silent while NATS is down or while fleetlake is killed and restarted over a backlog;
//! a site whose 200 devices go dark together is one cohort alert naming the 200.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use fleetlake_tests::{EngineProcess, Nats, wait_for};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::alerts::{alerts, env, stream_ready};

/// How long a device may stay silent in these tests (seconds).
const SILENT_AFTER_S: i64 = 6;

fn pipeline() -> String {
    format!(
        "
CREATE SOURCE pings (device_id VARCHAR NOT NULL, seq BIGINT NOT NULL, ts TIMESTAMP, site VARCHAR)
WITH (subject = 'telemetry.pings.>', event_time = 'ts');

CREATE STREAMING TABLE usable.pings
AS SELECT device_id, seq, ts, site FROM pings;

CREATE RULE quiet
WITH (severity = 'warning', key = 'device_id', group_by = 'site', group_min = 50, group_wait = '3s')
AS SELECT device_id, site, ts, {SILENT_AFTER_S} AS silent_after_s FROM usable.pings;
"
    )
}

/// Devices that report every `period` until muted, like a fleet: (device, site).
pub(crate) struct Fleet {
    devices: Vec<(String, String)>,
    muted: Mutex<BTreeSet<String>>,
    /// Wall clock (µs) at which each device's last message was handed to NATS.
    last_sent: Mutex<BTreeMap<String, i64>>,
    stop: CancellationToken,
}

impl Fleet {
    pub(crate) fn start(
        js: &jetstream::Context,
        devices: &[(String, String)],
        period: Duration,
    ) -> Arc<Self> {
        let fleet = Arc::new(Self {
            devices: devices.to_vec(),
            muted: Mutex::new(BTreeSet::new()),
            last_sent: Mutex::new(BTreeMap::new()),
            stop: CancellationToken::new(),
        });
        let (f, js) = (fleet.clone(), js.clone());
        tokio::spawn(async move {
            let mut seq = 0i64;
            // Spread over the period, as a real fleet is: not all in one micro-batch.
            let step = period / f.devices.len().max(1) as u32;
            while !f.stop.is_cancelled() {
                seq += 1;
                let mut acks = Vec::new();
                for (device, site) in &f.devices {
                    tokio::select! {
                        _ = f.stop.cancelled() => return,
                        _ = tokio::time::sleep(step) => {}
                    }
                    if f.muted.lock().unwrap().contains(device) {
                        continue;
                    }
                    let now = chrono::Utc::now();
                    let payload = json!({"device_id": device, "seq": seq, "ts": now.to_rfc3339(), "site": site});
                    // While NATS is down a publish fails or is never acknowledged: the reading
                    // is lost, as a device's would be.
                    if let Ok(ack) = js
                        .publish(
                            format!("telemetry.pings.{device}"),
                            payload.to_string().into(),
                        )
                        .await
                    {
                        f.last_sent
                            .lock()
                            .unwrap()
                            .insert(device.clone(), now.timestamp_micros());
                        acks.push(ack);
                    }
                }
                let _ = tokio::time::timeout(
                    Duration::from_secs(2),
                    futures::future::join_all(acks.into_iter().map(|a| a.into_future())),
                )
                .await;
            }
        });
        fleet
    }

    pub(crate) fn mute(&self, devices: &[String]) {
        self.muted.lock().unwrap().extend(devices.iter().cloned());
    }

    pub(crate) fn unmute(&self) {
        self.muted.lock().unwrap().clear();
    }

    fn last_sent(&self, device: &str) -> i64 {
        self.last_sent.lock().unwrap()[device]
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

pub(crate) fn devices(prefix: &str, site: &str, n: usize) -> Vec<(String, String)> {
    (0..n)
        .map(|i| (format!("{prefix}{i}"), site.to_string()))
        .collect()
}

/// Waits until `n` devices have readings in usable.pings.
pub(crate) async fn wait_reporting(api: &fleetlake_tests::Api, n: i64) {
    api.wait_scalar(
        "SELECT count(DISTINCT device_id) FROM usable.pings",
        n,
        Duration::from_secs(60),
    )
    .await;
}

/// (subject, state) of every alert on the stream.
async fn seen(js: &jetstream::Context) -> Vec<(String, String)> {
    alerts(js)
        .await
        .into_iter()
        .map(|(subject, state, _, _)| (subject, state))
        .collect()
}

/// Waits for an alert with this subject and state; returns its message.
pub(crate) async fn wait_alert(js: &jetstream::Context, subject: &str, state: &str) -> Value {
    wait_for(
        &format!("{state} on {subject}"),
        Duration::from_secs(60),
        || {
            let js = js.clone();
            async move {
                alerts(&js)
                    .await
                    .into_iter()
                    .find(|(s, st, _, _)| s == subject && st == state)
                    .map(|a| a.3)
            }
        },
    )
    .await
}

pub(crate) async fn setup(
    dir: &std::path::Path,
    nats: &Nats,
) -> (Vec<(String, String)>, jetstream::Context) {
    let p = dir.join("pipelines");
    std::fs::create_dir_all(&p).unwrap();
    std::fs::write(p.join("pings.sql"), pipeline()).unwrap();
    let mut env = env(nats, &dir.join("lake"), &p);
    env.push(("FLEETLAKE_ALERTS_SILENCE_MAX_GAP_S".into(), "2".into()));
    let js = fleetlake::ingest::source::connect(nats.url())
        .await
        .unwrap();
    (env, js)
}

fn rfc3339_us(v: &Value) -> i64 {
    chrono::DateTime::parse_from_rfc3339(v.as_str().unwrap())
        .unwrap()
        .timestamp_micros()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_device_fires_once_after_its_time_and_resolves_when_it_reports_again() {
    let nats = Nats::start().await;
    let dir = fleetlake_tests::TestDir::new();
    let (env, js) = setup(dir.path(), &nats).await;
    let log = dir.path().join("engine.log");
    let mut engine = EngineProcess::start(&env, &log).await;
    stream_ready(&js).await;
    let fleet = Fleet::start(&js, &devices("d", "s1", 2), Duration::from_millis(500));
    wait_reporting(&engine.api, 2).await;
    fleet.mute(&["d0".to_string()]);
    let fired = wait_alert(&js, "alerts.quiet.d0", "firing").await;
    let silent_for = rfc3339_us(&fired["emit_time"]) - fleet.last_sent("d0");
    assert!(
        silent_for >= SILENT_AFTER_S * 1_000_000,
        "fired {silent_for} µs after the last reading, before its {SILENT_AFTER_S} s: {fired}"
    );
    assert_eq!(fired["key"], "d0");
    assert_eq!(fired["values"]["site"], "s1");
    assert!(fired["values"]["silent_for_s"].as_f64().unwrap() >= SILENT_AFTER_S as f64);
    // Recorded in final.alerts with the next commit; then the engine is killed before the
    // rule's next snapshot: the restarted rule knows d0 is firing (from final.alerts) and does
    // not fire it again, though d0 stays silent for longer than its time once more.
    let count_d0 = "SELECT count(*) FROM final.alerts WHERE rule = 'quiet' AND key = 'd0'";
    engine
        .api
        .wait_scalar(count_d0, 1, Duration::from_secs(30))
        .await;
    engine.kill().await;
    engine = EngineProcess::start(&env, &log).await;
    tokio::time::sleep(Duration::from_secs(SILENT_AFTER_S as u64 + 4)).await;
    assert_eq!(engine.api.scalar(count_d0).await, 1, "recorded once");
    assert_eq!(
        seen(&js).await,
        vec![("alerts.quiet.d0".to_string(), "firing".to_string())],
        "fires once"
    );
    fleet.unmute();
    wait_alert(&js, "alerts.quiet.d0", "resolved").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        seen(&js).await,
        vec![
            ("alerts.quiet.d0".to_string(), "firing".to_string()),
            ("alerts.quiet.d0".to_string(), "resolved".to_string()),
        ]
    );
    // Both recorded in final.alerts (with the commits of the readings that follow them).
    engine
        .api
        .wait_scalar(
            "SELECT count(*) FROM final.alerts WHERE rule = 'quiet' AND key = 'd0'",
            2,
            Duration::from_secs(30),
        )
        .await;
    drop(fleet);
    engine.terminate().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nobody_is_declared_silent_while_nats_is_down_or_fleetlake_is_stopped_over_a_backlog() {
    let mut nats = Nats::start().await;
    let dir = fleetlake_tests::TestDir::new();
    let log = dir.path().join("engine.log");
    let (env, js) = setup(dir.path(), &nats).await;
    let engine = EngineProcess::start(&env, &log).await;
    stream_ready(&js).await;
    let fleet = Fleet::start(&js, &devices("d", "s1", 10), Duration::from_millis(500));
    let api = engine.api.clone();
    wait_reporting(&api, 10).await;
    // NATS down for twice the silence time: devices cannot report (their readings are lost:
    // they send none), and that is not their silence. When it is back they report again, each
    // at its own time in the period.
    let ids: Vec<String> = (0..10).map(|i| format!("d{i}")).collect();
    fleet.mute(&ids);
    nats.stop().await;
    tokio::time::sleep(Duration::from_secs(2 * SILENT_AFTER_S as u64)).await;
    nats.start_again().await;
    fleet.unmute();
    let rows = api.scalar("SELECT count(*) FROM usable.pings").await;
    wait_for("ingest after NATS is back", Duration::from_secs(60), || {
        let api = api.clone();
        async move { (api.scalar("SELECT count(*) FROM usable.pings").await > rows + 30).then_some(()) }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(SILENT_AFTER_S as u64)).await;
    assert_eq!(seen(&js).await, vec![], "alerts after the NATS outage");

    // fleetlake killed for twice the silence time while the devices go on reporting: the
    // restarted engine drains the backlog and declares nobody silent.
    engine.kill().await;
    tokio::time::sleep(Duration::from_secs(2 * SILENT_AFTER_S as u64)).await;
    let backlog = js
        .get_stream("TELEMETRY")
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .last_sequence;
    let engine = EngineProcess::start(&env, &log).await;
    wait_for("the backlog to be drained", Duration::from_secs(60), || {
        let js = js.clone();
        async move {
            let stream = js.get_stream("TELEMETRY").await.ok()?;
            let mut consumer: jetstream::consumer::PullConsumer =
                stream.get_consumer("fleetlake").await.ok()?;
            let info = consumer.info().await.ok()?;
            (info.ack_floor.stream_sequence >= backlog).then_some(())
        }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(SILENT_AFTER_S as u64)).await;
    assert_eq!(
        seen(&js).await,
        vec![],
        "alerts after the restart over a backlog"
    );

    // The rule is watching all along: a device that does stop is declared silent.
    fleet.mute(&["d2".to_string()]);
    wait_alert(&js, "alerts.quiet.d2", "firing").await;
    assert_eq!(
        seen(&js).await,
        vec![("alerts.quiet.d2".to_string(), "firing".to_string())]
    );
    drop(fleet);
    engine.terminate().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_that_goes_dark_is_one_alert_naming_its_200_devices() {
    let nats = Nats::start().await;
    let dir = fleetlake_tests::TestDir::new();
    let (env, js) = setup(dir.path(), &nats).await;
    let engine = EngineProcess::start(&env, &dir.path().join("engine.log")).await;
    stream_ready(&js).await;
    let dark = devices("dark-", "rotterdam", 200);
    let mut all = dark.clone();
    all.extend(devices("lit-", "hamburg", 20));
    let fleet = Fleet::start(&js, &all, Duration::from_secs(1));
    let api = engine.api.clone();
    wait_reporting(&api, 220).await;
    let ids: Vec<String> = dark.iter().map(|(d, _)| d.clone()).collect();
    fleet.mute(&ids);
    let cohort = wait_alert(&js, "alerts.quiet.rotterdam", "firing").await;
    assert_eq!(cohort["key"], "rotterdam");
    assert_eq!(cohort["values"]["count"], 200);
    assert_eq!(cohort["values"]["site"], "rotterdam");
    let members: BTreeSet<String> = cohort["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap().to_string())
        .collect();
    assert_eq!(members, ids.iter().cloned().collect::<BTreeSet<_>>());
    // The cohort alert is recorded in final.alerts too, with the emit time it was published with.
    api.wait_scalar(
        "SELECT count(*) FROM final.alerts WHERE rule = 'quiet' AND key = 'rotterdam' AND state = 'firing'",
        1,
        Duration::from_secs(30),
    )
    .await;
    let (_, recorded) = api
        .query(&format!(
            "SELECT CAST(emit_time AS VARCHAR) FROM final.alerts WHERE alert_id = '{}'",
            cohort["alert_id"].as_str().unwrap()
        ))
        .await;
    let recorded = recorded["rows"][0][0].as_str().unwrap().to_string();
    assert_eq!(
        chrono::DateTime::parse_from_rfc3339(&format!("{}Z", recorded.trim_end_matches('Z')))
            .map(|t| t.timestamp_micros())
            .unwrap_or_else(|_| panic!("emit_time {recorded}")),
        rfc3339_us(&cohort["emit_time"]),
        "final.alerts says when the cohort alert was published"
    );
    // Each device's own firing is recorded, not published.
    api.wait_scalar(
        "SELECT count(*) FROM final.alerts WHERE rule = 'quiet' AND state = 'firing' AND key LIKE 'dark-%'",
        200,
        Duration::from_secs(30),
    )
    .await;
    fleet.unmute();
    let resolved = wait_alert(&js, "alerts.quiet.rotterdam", "resolved").await;
    assert_eq!(resolved["values"]["count"], 200);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        seen(&js).await,
        vec![
            ("alerts.quiet.rotterdam".to_string(), "firing".to_string()),
            ("alerts.quiet.rotterdam".to_string(), "resolved".to_string()),
        ],
        "one alert for the site, none per device, none for the site that kept reporting"
    );
    drop(fleet);
    engine.terminate().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_a_whole_fleet_stops_every_firing_is_recorded_at_once_and_only_once() {
    let nats = Nats::start().await;
    let dir = fleetlake_tests::TestDir::new();
    let (env, js) = setup(dir.path(), &nats).await;
    let log = dir.path().join("engine.log");
    let mut engine = EngineProcess::start(&env, &log).await;
    stream_ready(&js).await;
    let fleet = Fleet::start(&js, &devices("w", "s9", 5), Duration::from_millis(500));
    wait_reporting(&engine.api, 5).await;
    // Every device stops: no message follows the firings, yet each is in final.alerts.
    let all: Vec<String> = (0..5).map(|i| format!("w{i}")).collect();
    fleet.mute(&all);
    for d in &all {
        wait_alert(&js, &format!("alerts.quiet.{d}"), "firing").await;
    }
    let recorded = "SELECT count(*) FROM final.alerts WHERE rule = 'quiet' AND state = 'firing'";
    engine
        .api
        .wait_scalar(recorded, 5, Duration::from_secs(30))
        .await;
    // Killed and started again while still silent: nothing fires or is recorded twice.
    engine.kill().await;
    engine = EngineProcess::start(&env, &log).await;
    tokio::time::sleep(Duration::from_secs(SILENT_AFTER_S as u64 + 4)).await;
    assert_eq!(engine.api.scalar(recorded).await, 5, "recorded once");
    let fired = seen(&js).await;
    assert_eq!(fired.len(), 5, "each fires once: {fired:?}");
    drop(fleet);
    engine.terminate().await;
}
