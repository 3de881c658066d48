//! Delivery to a real Prometheus Alertmanager (Debian's `prometheus-alertmanager`, started on a
//! free loopback port with a webhook receiver of the test's own): a silence rule's firing and
//! then resolved alert reach it and its receiver once each, although fleetlake re-sends the
//! firing alert every 2 s; and a silence created in Alertmanager suppresses its notification.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleetlake_tests::{Alertmanager, EngineProcess, Nats, wait_for};
use serde_json::Value;

use crate::alerts::stream_ready;
use crate::silence::{Fleet, devices, setup, wait_alert, wait_reporting};

/// The notifications (webhook bodies) whose alerts have this `key` label: (status, alert).
fn notified(am: &Alertmanager, key: &str) -> Vec<(String, Value)> {
    am.notifications()
        .iter()
        .flat_map(|n| n["alerts"].as_array().cloned().unwrap_or_default())
        .filter(|a| a["labels"]["key"] == key)
        .map(|a| (a["status"].as_str().unwrap_or_default().to_string(), a))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alertmanager_gets_firing_then_resolved_and_its_silences_hold() {
    let nats = Nats::start().await;
    let am = Alertmanager::start().await;
    let dir = fleetlake_tests::TestDir::new();
    let (mut env, js) = setup(dir.path(), &nats).await;
    env.push(("FLEETLAKE_ALERTS_ALERTMANAGER_URL".into(), am.url.clone()));
    env.push(("FLEETLAKE_ALERTS_ALERTMANAGER_RESEND_S".into(), "2".into()));
    let engine = EngineProcess::start(&env, &dir.path().join("engine.log")).await;
    stream_ready(&js).await;
    // d1 is under maintenance: silenced in Alertmanager before it goes quiet.
    am.silence(&[("alertname", "quiet"), ("key", "d1")]).await;
    let fleet = Fleet::start(&js, &devices("d", "s1", 3), Duration::from_millis(500));
    wait_reporting(&engine.api, 3).await;
    fleet.mute(&["d0".to_string(), "d1".to_string()]);
    wait_alert(&js, "alerts.quiet.d0", "firing").await;
    let firing = wait_for(
        "Alertmanager to notify d0 firing",
        Duration::from_secs(60),
        || {
            let n = notified(&am, "d0");
            async move { n.into_iter().find(|(s, _)| s == "firing").map(|(_, a)| a) }
        },
    )
    .await;
    assert_eq!(firing["labels"]["alertname"], "quiet");
    assert_eq!(firing["labels"]["severity"], "warning");
    assert_eq!(firing["labels"]["cohort"], "s1");
    assert!(
        firing["annotations"]["alert_id"]
            .as_str()
            .unwrap()
            .starts_with("quiet-")
    );
    // d1 reached Alertmanager too, and is held by the silence.
    wait_for(
        "d1 suppressed in Alertmanager",
        Duration::from_secs(60),
        || {
            let am = &am;
            async move {
                am.alerts()
                    .await
                    .into_iter()
                    .find(|a| a["labels"]["key"] == "d1" && a["status"]["state"] == "suppressed")
            }
        },
    )
    .await;
    // Re-sent every 2 s while firing: still one alert, one notification.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        notified(&am, "d0").len() == 1,
        "one notification for d0 while it fires: {:?}",
        am.notifications()
    );
    fleet.unmute();
    wait_alert(&js, "alerts.quiet.d0", "resolved").await;
    let resolved = wait_for(
        "Alertmanager to notify d0 resolved",
        Duration::from_secs(60),
        || {
            let n = notified(&am, "d0");
            async move { n.into_iter().find(|(s, _)| s == "resolved").map(|(_, a)| a) }
        },
    )
    .await;
    assert_eq!(
        resolved["startsAt"], firing["startsAt"],
        "the same alert ended"
    );
    // d1 resolved too, and its silence kept every notification of it away.
    wait_alert(&js, "alerts.quiet.d1", "resolved").await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        notified(&am, "d1"),
        vec![],
        "the silence suppresses d1's notifications"
    );
    let statuses: Vec<String> = notified(&am, "d0").into_iter().map(|(s, _)| s).collect();
    assert_eq!(statuses, vec!["firing", "resolved"]);
    drop(fleet);
    engine.terminate().await;
}

const HOT: &str = "
CREATE SOURCE readings (device_id VARCHAR NOT NULL, seq BIGINT NOT NULL, ts TIMESTAMP, temp_c DOUBLE)
WITH (subject = 'telemetry.coldchain.>', event_time = 'ts');

CREATE STREAMING TABLE usable.trailers
AS SELECT device_id, seq, ts, temp_c AS temperature_c FROM readings;

CREATE RULE hot
WITH (severity = 'critical', key = 'device_id')
AS SELECT device_id, ts, temperature_c, temperature_c > 8 AS firing, temperature_c < 6 AS resolved
FROM usable.trailers;
";

/// A proxy in front of the real Alertmanager: while throttling it answers each request itself
/// with the next of its statuses, in turn (a rate limiter, a restarting Alertmanager); otherwise
/// it forwards.
struct Proxy {
    url: String,
    throttle: Arc<Mutex<Vec<u16>>>,
    answered: Arc<AtomicUsize>,
}

impl Proxy {
    async fn start(upstream: &str) -> Self {
        let throttle = Arc::new(Mutex::new(Vec::new()));
        let answered = Arc::new(AtomicUsize::new(0));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (statuses, count, upstream) =
            (throttle.clone(), answered.clone(), upstream.to_string());
        let client = reqwest::Client::new();
        let app = axum::Router::new().route(
            "/api/v2/alerts",
            axum::routing::post(move |body: axum::body::Bytes| {
                let (statuses, count, upstream, client) = (
                    statuses.clone(),
                    count.clone(),
                    upstream.clone(),
                    client.clone(),
                );
                async move {
                    let fail = {
                        let s = statuses.lock().unwrap();
                        (!s.is_empty()).then(|| s[count.load(Ordering::Relaxed) % s.len()])
                    };
                    if let Some(status) = fail {
                        count.fetch_add(1, Ordering::Relaxed);
                        let status = axum::http::StatusCode::from_u16(status).unwrap();
                        return (status, "slow down".to_string());
                    }
                    let r = client
                        .post(format!("{upstream}/api/v2/alerts"))
                        .header("content-type", "application/json")
                        .body(body)
                        .send()
                        .await
                        .unwrap();
                    let status = axum::http::StatusCode::from_u16(r.status().as_u16()).unwrap();
                    (status, r.text().await.unwrap())
                }
            }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self {
            url,
            throttle,
            answered,
        }
    }

    /// Answers every request with these statuses in turn until [`Proxy::release`].
    fn throttle(&self, statuses: &[u16]) {
        *self.throttle.lock().unwrap() = statuses.to_vec();
    }

    fn release(&self) {
        self.throttle.lock().unwrap().clear();
    }

    /// Requests answered by the proxy itself so far.
    fn throttled(&self) -> usize {
        self.answered.load(Ordering::Relaxed)
    }

    /// Waits until at least `n` requests were throttled.
    async fn wait_throttled(&self, n: usize) {
        wait_for(
            &format!("{n} throttled deliveries"),
            Duration::from_secs(60),
            || {
                let got = self.throttled();
                async move { (got >= n).then_some(()) }
            },
        )
        .await
    }
}

/// A reading of trailer `device` at `at`.
async fn reading(
    js: &async_nats::jetstream::Context,
    device: &str,
    seq: i64,
    at: chrono::DateTime<chrono::Utc>,
    temp: f64,
) {
    let payload = serde_json::json!({
        "device_id": device, "seq": seq, "ts": at.to_rfc3339(), "temp_c": temp,
    });
    js.publish(
        format!("telemetry.coldchain.{device}"),
        payload.to_string().into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
}

async fn health(api: &fleetlake_tests::Api) -> (u16, Value) {
    let (status, body) = api.get("/healthz").await;
    (status, serde_json::from_str(&body).unwrap())
}

/// A gateway that sends local time labelled UTC (two hours ahead) still pages, and its resolution
/// ends the alert; 429, 503 and 408 answers (a rate-limiting proxy) are retried until delivered
/// while `/healthz` says deliveries fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clock_ahead_pages_and_throttled_deliveries_are_retried_until_delivered() {
    let nats = Nats::start().await;
    let am = Alertmanager::start().await;
    let proxy = Proxy::start(&am.url).await;
    let dir = fleetlake_tests::TestDir::new();
    let pipelines = dir.path().join("pipelines");
    std::fs::create_dir_all(&pipelines).unwrap();
    std::fs::write(pipelines.join("hot.sql"), HOT).unwrap();
    let mut env = crate::alerts::env(&nats, &dir.path().join("lake"), &pipelines);
    env.push((
        "FLEETLAKE_ALERTS_ALERTMANAGER_URL".into(),
        proxy.url.clone(),
    ));
    env.push(("FLEETLAKE_ALERTS_ALERTMANAGER_RESEND_S".into(), "2".into()));
    let engine = EngineProcess::start(&env, &dir.path().join("engine.log")).await;
    let js = fleetlake::ingest::source::connect(nats.url())
        .await
        .unwrap();
    stream_ready(&js).await;

    // Two hours ahead; deliveries are throttled or fail until released.
    proxy.throttle(&[429, 503, 408]);
    let ahead = chrono::Utc::now() + chrono::Duration::hours(2);
    reading(&js, "t-ahead", 1, ahead, 4.0).await;
    reading(
        &js,
        "t-ahead",
        2,
        ahead + chrono::Duration::seconds(30),
        12.0,
    )
    .await;
    wait_alert(&js, "alerts.hot.t-ahead", "firing").await;
    proxy.wait_throttled(4).await;
    // While the proxy refuses, /healthz names Alertmanager.
    let unhealthy = wait_for(
        "/healthz to report failing deliveries",
        Duration::from_secs(30),
        || {
            let api = engine.api.clone();
            async move {
                let (status, body) = health(&api).await;
                (status == 503 && body["alertmanager"]["up"] == false).then_some(body)
            }
        },
    )
    .await;
    let reason = unhealthy["alertmanager"]["last_error"]["message"].to_string();
    assert!(
        reason.contains("429") || reason.contains("503") || reason.contains("408"),
        "{unhealthy}"
    );
    assert_eq!(notified(&am, "t-ahead"), vec![], "nothing got through yet");
    proxy.release();
    let firing = wait_for(
        "Alertmanager to notify t-ahead firing",
        Duration::from_secs(60),
        || {
            let n = notified(&am, "t-ahead");
            async move { n.into_iter().find(|(s, _)| s == "firing").map(|(_, a)| a) }
        },
    )
    .await;
    let starts =
        chrono::DateTime::parse_from_rfc3339(firing["startsAt"].as_str().unwrap()).unwrap();
    assert!(starts < ahead, "startsAt is clamped to now: {firing}");
    let reported =
        chrono::DateTime::parse_from_rfc3339(firing["annotations"]["event_time"].as_str().unwrap())
            .unwrap();
    assert_eq!(
        reported.timestamp(),
        (ahead + chrono::Duration::seconds(30)).timestamp(),
        "{firing}"
    );
    wait_for("/healthz ok again", Duration::from_secs(30), || {
        let api = engine.api.clone();
        async move {
            let (status, body) = health(&api).await;
            (status == 200 && body["alertmanager"]["up"] == true).then_some(())
        }
    })
    .await;

    // The resolution is throttled too (429 only), and still arrives once released, ending the
    // alert now (not in two hours).
    let before = proxy.throttled();
    proxy.throttle(&[429]);
    reading(
        &js,
        "t-ahead",
        3,
        ahead + chrono::Duration::seconds(60),
        4.0,
    )
    .await;
    wait_alert(&js, "alerts.hot.t-ahead", "resolved").await;
    proxy.wait_throttled(before + 3).await;
    proxy.release();
    let resolved = wait_for(
        "Alertmanager to notify t-ahead resolved",
        Duration::from_secs(60),
        || {
            let n = notified(&am, "t-ahead");
            async move { n.into_iter().find(|(s, _)| s == "resolved").map(|(_, a)| a) }
        },
    )
    .await;
    assert_eq!(
        resolved["startsAt"], firing["startsAt"],
        "the same alert ended"
    );
    let ends = chrono::DateTime::parse_from_rfc3339(resolved["endsAt"].as_str().unwrap()).unwrap();
    assert!(
        ends < ahead,
        "endsAt is when it resolved, not the device's clock: {resolved}"
    );
    let statuses: Vec<String> = notified(&am, "t-ahead")
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert_eq!(statuses, vec!["firing", "resolved"]);
    engine.terminate().await;
}
