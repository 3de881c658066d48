//! Delivery to a real Prometheus Alertmanager (Debian's `prometheus-alertmanager`, started on a
//! free loopback port with a webhook receiver of the test's own): a silence rule's firing and
//! then resolved alert reach it and its receiver once each, although fleetlake re-sends the
//! firing alert every 2 s; and a silence created in Alertmanager suppresses its notification.

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
