//! Delivery of alert transitions to a Prometheus Alertmanager, beside the JetStream stream, so
//! that silences, inhibition, grouping and routing come from the tool on-call teams already run.
//!
//! ```text
//!  ingest: transitions published on JetStream ─► channel ─► this task: firing set ─► POST /api/v2/alerts
//!                                                             ▲  re-sent every alerts.alertmanager_resend_s
//!                                 final.alerts (at start) ────┘  retried with backoff while it fails
//! ```
//!
//! Alertmanager identifies an alert by its labels: `alertname` (the rule), `key`, `severity`, and
//! `cohort` for a grouped rule's alerts. Sending the same alert again is idempotent, so a firing
//! alert is re-sent every `alerts.alertmanager_resend_s` (Alertmanager resolves an alert that is not
//! re-sent within its `resolve_timeout`, 5 minutes by default), and a resolved one is sent with
//! `endsAt`. The task keeps the set of firing alerts; at start it is loaded from `final.alerts`
//! (the latest transition of each rule and key), so a restart re-sends what is still firing.
//! Delivery never holds ingest back: transitions are handed over on a channel, and a failing
//! Alertmanager only delays them (`/healthz` names the error, `fleetlake_alertmanager_errors_total`
//! counts it).
//!
//! Times are what Alertmanager accepts, not what devices claim: it refuses a firing alert whose
//! `startsAt` lies after now + its `resolve_timeout` ("start time must be before end time",
//! prometheus/alertmanager #1191), and keeps an alert with a future `endsAt` active until then.
//! So `startsAt` is the event time clamped to the moment fleetlake first saw the transition,
//! `endsAt` is the moment the resolution was seen, and the event time as the device reported it
//! is kept in the `event_time` annotation. Answers are classified by status: 2xx delivered;
//! 400, 413 and 422 refuse the alerts as they are (logged, counted, dropped: JetStream and
//! `final.alerts` keep them); every other answer (408, 429, 5xx, 401/403 from a proxy whose
//! credentials are being fixed) and every connection error is retried with backoff until
//! delivered.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use arrow::array::AsArray;
use fleetlake_sql::QueryEngine;
use fleetlake_sql::rules::Transition;
use fleetlake_zones::Lake;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::error::{Context, Error};
use crate::ingest::commit::Backoff;
use crate::metrics::Metrics;

/// Members named in an alert's `members` annotation, at most (the count is always there).
const MEMBERS_SHOWN: usize = 50;

/// The sending side: hand transitions over with [`Alertmanager::send`]; the delivery task ends
/// (after one last attempt) when this is dropped.
pub struct Alertmanager {
    tx: mpsc::UnboundedSender<Vec<Transition>>,
}

impl Alertmanager {
    /// Starts delivering to the Alertmanager at `url` (e.g. `http://127.0.0.1:9093`).
    pub fn start(url: &str, resend: Duration, lake: Lake, metrics: Arc<Metrics>) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let endpoint = format!("{}/api/v2/alerts", url.trim_end_matches('/'));
        metrics.alertmanager_up.store(1, Ordering::Relaxed);
        tokio::spawn(deliver(endpoint, resend, lake, metrics, rx));
        Self { tx }
    }

    /// Queues transitions (as published on JetStream) for Alertmanager.
    pub fn send(&self, transitions: &[Transition]) {
        if !transitions.is_empty() {
            let _ = self.tx.send(transitions.to_vec());
        }
    }
}

/// The labels that identify an alert in Alertmanager: `alertname`, `key`, `severity` and, for a
/// grouped rule, `cohort`.
fn labels(rule: &str, key: &str, severity: &str, cohort: Option<&str>) -> BTreeMap<String, String> {
    let mut l = BTreeMap::from([
        ("alertname".to_string(), rule.to_string()),
        ("key".to_string(), key.to_string()),
        ("severity".to_string(), severity.to_string()),
    ]);
    if let Some(c) = cohort {
        l.insert("cohort".into(), c.to_string());
    }
    l
}

fn rfc3339(us: i64) -> String {
    chrono::DateTime::from_timestamp_micros(us)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// True when Alertmanager (or a proxy before it) refused the alerts as they are: retrying the
/// same request cannot succeed. Every other answer is transient (see the module docs).
fn refused(status: reqwest::StatusCode) -> bool {
    matches!(status.as_u16(), 400 | 413 | 422)
}

/// A firing transition and when Alertmanager is told it started (µs).
#[derive(Debug, Clone)]
struct Firing {
    transition: Transition,
    starts_at: i64,
}

impl Firing {
    /// `startsAt` is the event time, but never later than `now` (a device clock running ahead).
    fn new(transition: Transition, now: i64) -> Self {
        let starts_at = transition.event_time.min(now);
        Self {
            transition,
            starts_at,
        }
    }
}

/// One alert in Alertmanager's API (`postableAlert`): labels, annotations (with the event time
/// as reported), `startsAt` (µs), and `endsAt` (µs) once resolved.
fn alert(f: &Firing, ends_at: Option<i64>) -> Value {
    let t = &f.transition;
    let mut annotations = serde_json::Map::new();
    annotations.insert(
        "summary".into(),
        json!(format!("{} {} for {}", t.rule, t.state, t.key)),
    );
    annotations.insert("alert_id".into(), json!(t.alert_id));
    annotations.insert("event_time".into(), json!(rfc3339(t.event_time)));
    annotations.insert(
        "values".into(),
        json!(Value::Object(t.values.clone()).to_string()),
    );
    if !t.members.is_empty() {
        let mut shown = t.members[..t.members.len().min(MEMBERS_SHOWN)].join(", ");
        if t.members.len() > MEMBERS_SHOWN {
            shown.push_str(&format!(", … ({} in all)", t.members.len()));
        }
        annotations.insert("members".into(), json!(shown));
        annotations.insert("count".into(), json!(t.members.len().to_string()));
    }
    let mut a = json!({
        "labels": labels(&t.rule, &t.key, &t.severity, t.cohort.as_deref()),
        "annotations": annotations,
        "startsAt": rfc3339(f.starts_at),
    });
    if let Some(end) = ends_at {
        a["endsAt"] = json!(rfc3339(end));
    }
    a
}

/// The latest transition of each rule and key in `final.alerts` that is firing, less the keys a
/// firing cohort alert stands for: what was firing when fleetlake stopped.
async fn firing_at_start(lake: &Lake) -> Result<Vec<Transition>, Error> {
    let table = crate::ingest::alert_table::alerts_table();
    if !crate::ingest::alert_table::table_exists(lake, &table).await? {
        return Ok(Vec::new());
    }
    let sql = format!(
        "SELECT rule, key, severity, \"values\", CAST(event_time AS BIGINT) AS t, alert_id FROM (\
           SELECT *, row_number() OVER (PARTITION BY rule, key ORDER BY stream_seq DESC, state DESC) AS latest FROM {table}\
         ) WHERE latest = 1 AND state = 'firing'"
    );
    let rows = QueryEngine::new(lake.clone())
        .query(&sql)
        .await
        .context(format!("reading {table} for the alerts still firing"))?;
    let mut firing = Vec::new();
    for b in &rows.batches {
        let text = |i: usize| {
            arrow::compute::cast(b.column(i), &arrow::datatypes::DataType::Utf8)
                .expect("castable to text")
                .as_string::<i32>()
                .clone()
        };
        let (rule, key, severity, values, ids) = (text(0), text(1), text(2), text(3), text(5));
        let times = arrow::compute::cast(b.column(4), &arrow::datatypes::DataType::Int64)?;
        let times = times.as_primitive::<arrow::datatypes::Int64Type>();
        for i in 0..b.num_rows() {
            let mut values: serde_json::Map<String, Value> =
                serde_json::from_str(values.value(i)).unwrap_or_default();
            let members: Vec<String> = match values.remove("members") {
                Some(Value::Array(m)) => m
                    .iter()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect(),
                _ => Vec::new(),
            };
            let cohort = match values.remove("cohort") {
                Some(Value::String(c)) => Some(c),
                _ => None,
            };
            firing.push(Transition {
                alert_id: ids.value(i).to_string(),
                rule: rule.value(i).to_string(),
                rule_version: String::new(),
                severity: severity.value(i).to_string(),
                key: key.value(i).to_string(),
                state: "firing".into(),
                window_start: None,
                window_end: None,
                values,
                event_time: times.value(i),
                stream_seq: 0,
                cohort,
                members,
                emitted_us: 0,
                tenant: None,
            });
        }
    }
    let represented: BTreeSet<(String, String)> = firing
        .iter()
        .flat_map(|t| t.members.iter().map(|m| (t.rule.clone(), m.clone())))
        .collect();
    firing.retain(|t| {
        !t.members.is_empty() || !represented.contains(&(t.rule.clone(), t.key.clone()))
    });
    Ok(firing)
}

/// The delivery task (see the module docs).
async fn deliver(
    endpoint: String,
    resend: Duration,
    lake: Lake,
    metrics: Arc<Metrics>,
    mut rx: mpsc::UnboundedReceiver<Vec<Transition>>,
) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("an HTTP client");
    // Firing alerts by their labels, and what is to be sent now.
    let mut firing: BTreeMap<BTreeMap<String, String>, Firing> = BTreeMap::new();
    let mut pending: BTreeMap<BTreeMap<String, String>, Value> = BTreeMap::new();
    let identity = |t: &Transition| labels(&t.rule, &t.key, &t.severity, t.cohort.as_deref());
    match firing_at_start(&lake).await {
        Ok(restored) => {
            let now = chrono::Utc::now().timestamp_micros();
            for t in restored {
                let f = Firing::new(t, now);
                pending.insert(identity(&f.transition), alert(&f, None));
                firing.insert(identity(&f.transition), f);
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "Alertmanager: the alerts firing before the start are not re-sent")
        }
    }
    let mut backoff = Backoff::new();
    let mut next_resend = tokio::time::Instant::now() + resend;
    let mut open = true;
    loop {
        if pending.is_empty() {
            if !open {
                return;
            }
            tokio::select! {
                got = rx.recv() => match got {
                    Some(ts) => merge(&mut firing, &mut pending, ts, identity),
                    None => open = false,
                },
                _ = tokio::time::sleep_until(next_resend) => {
                    for (l, f) in &firing {
                        pending.insert(l.clone(), alert(f, None));
                    }
                    next_resend = tokio::time::Instant::now() + resend;
                }
            }
            continue;
        }
        // Whatever else arrived meanwhile goes in the same request.
        while let Ok(ts) = rx.try_recv() {
            merge(&mut firing, &mut pending, ts, identity);
        }
        let body: Vec<&Value> = pending.values().collect();
        let sent = client.post(&endpoint).json(&body).send().await;
        let failure = match sent {
            Ok(r) if r.status().is_success() => None,
            Ok(r) if refused(r.status()) => {
                // Retrying cannot help: Alertmanager refuses these alerts as they are.
                let status = r.status();
                let text = r.text().await.unwrap_or_default();
                let reason = format!(
                    "Alertmanager refused {} alerts ({status}): {}; they are dropped (JetStream and final.alerts have them)",
                    pending.len(),
                    text.trim()
                );
                tracing::error!(%reason, endpoint = %crate::config::redact_url(&endpoint), "Alertmanager delivery");
                metrics.alertmanager_errors.fetch_add(1, Ordering::Relaxed);
                metrics.set_last_error("alertmanager", &reason);
                metrics.alertmanager_up.store(0, Ordering::Relaxed);
                pending.clear();
                continue;
            }
            Ok(r) => {
                let status = r.status();
                let text = r.text().await.unwrap_or_default();
                Some(format!("Alertmanager answered {status}: {}", text.trim()))
            }
            // Without the URL, which may hold a password (http://user:secret@host).
            Err(e) => Some(format!(
                "sending alerts to Alertmanager at {}: {}",
                crate::config::redact_url(&endpoint),
                e.without_url()
            )),
        };
        match failure {
            None => {
                metrics
                    .alertmanager_sent
                    .fetch_add(pending.len() as u64, Ordering::Relaxed);
                metrics.alertmanager_up.store(1, Ordering::Relaxed);
                pending.clear();
                backoff = Backoff::new();
            }
            Some(reason) => {
                tracing::warn!(%reason, endpoint = %crate::config::redact_url(&endpoint), "Alertmanager delivery failed; retrying");
                metrics.alertmanager_errors.fetch_add(1, Ordering::Relaxed);
                metrics.set_last_error(
                    "alertmanager",
                    &format!("{reason} ({} alerts waiting, retried)", pending.len()),
                );
                metrics.alertmanager_up.store(0, Ordering::Relaxed);
                if !open {
                    // Stopping: one attempt was made; Alertmanager gets them at the next start.
                    return;
                }
                let delay = backoff.next_delay();
                tokio::select! {
                    got = rx.recv() => match got {
                        Some(ts) => merge(&mut firing, &mut pending, ts, identity),
                        None => open = false,
                    },
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// Folds transitions into the firing set and the alerts to send: a firing one is sent and kept
/// (to re-send), a resolved one is sent with `endsAt` and forgotten.
fn merge(
    firing: &mut BTreeMap<BTreeMap<String, String>, Firing>,
    pending: &mut BTreeMap<BTreeMap<String, String>, Value>,
    transitions: Vec<Transition>,
    identity: impl Fn(&Transition) -> BTreeMap<String, String>,
) {
    let now = chrono::Utc::now().timestamp_micros();
    for t in transitions {
        let id = identity(&t);
        if t.state == "firing" {
            let f = Firing::new(t, now);
            pending.insert(id.clone(), alert(&f, None));
            firing.insert(id, f);
        } else {
            // startsAt stays the firing's, so Alertmanager sees one alert that ended; endsAt is
            // now (never before startsAt, which is at most now): a future endsAt would keep the
            // alert active in Alertmanager until then.
            let from = firing
                .remove(&id)
                .unwrap_or_else(|| Firing::new(t.clone(), now));
            let mut a = alert(&from, Some(now.max(from.starts_at)));
            a["annotations"]["summary"] = json!(format!("{} resolved for {}", t.rule, t.key));
            a["annotations"]["event_time"] = json!(rfc3339(t.event_time));
            pending.insert(id, a);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transition(state: &str, key: &str) -> Transition {
        Transition {
            alert_id: format!("quiet-{state}-{key}"),
            rule: "quiet".into(),
            rule_version: "v".into(),
            severity: "warning".into(),
            key: key.into(),
            state: state.into(),
            window_start: None,
            window_end: None,
            values: serde_json::Map::new(),
            event_time: 1_700_000_000_000_000,
            stream_seq: 1,
            cohort: None,
            members: Vec::new(),
            emitted_us: 0,
            tenant: None,
        }
    }

    #[test]
    fn a_resolved_alert_keeps_its_labels_and_start_and_gets_an_end() {
        let (mut firing, mut pending) = (BTreeMap::new(), BTreeMap::new());
        let id = |t: &Transition| labels(&t.rule, &t.key, &t.severity, t.cohort.as_deref());
        merge(
            &mut firing,
            &mut pending,
            vec![transition("firing", "d1")],
            id,
        );
        assert_eq!(firing.len(), 1);
        let sent = pending.values().next().unwrap().clone();
        assert!(sent.get("endsAt").is_none());
        assert_eq!(sent["labels"]["alertname"], "quiet");
        assert_eq!(sent["labels"]["key"], "d1");
        pending.clear();
        let mut resolved = transition("resolved", "d1");
        resolved.event_time += 60_000_000;
        merge(&mut firing, &mut pending, vec![resolved], id);
        assert!(firing.is_empty());
        let sent = pending.values().next().unwrap();
        assert_eq!(
            sent["labels"],
            json!({"alertname": "quiet", "key": "d1", "severity": "warning"})
        );
        assert_eq!(sent["startsAt"], "2023-11-14T22:13:20.000Z");
        assert!(sent["endsAt"].as_str().unwrap() > "2023-11-14T22:14:20");
    }

    #[test]
    fn a_device_clock_ahead_is_clamped_to_now_and_kept_in_an_annotation() {
        let (mut firing, mut pending) = (BTreeMap::new(), BTreeMap::new());
        let id = |t: &Transition| labels(&t.rule, &t.key, &t.severity, t.cohort.as_deref());
        let ahead = chrono::Utc::now().timestamp_micros() + 2 * 3_600_000_000;
        let mut t = transition("firing", "d1");
        t.event_time = ahead;
        let before = rfc3339(chrono::Utc::now().timestamp_micros());
        merge(&mut firing, &mut pending, vec![t.clone()], id);
        let sent = pending.values().next().unwrap().clone();
        let starts = sent["startsAt"].as_str().unwrap();
        assert!(
            starts >= before.as_str() && starts < rfc3339(ahead).as_str(),
            "{sent}"
        );
        assert_eq!(sent["annotations"]["event_time"], rfc3339(ahead));
        pending.clear();
        t.state = "resolved".into();
        t.event_time = ahead + 60_000_000;
        merge(&mut firing, &mut pending, vec![t], id);
        let sent = pending.values().next().unwrap();
        assert_eq!(sent["startsAt"], starts, "the same alert ended");
        let ends = sent["endsAt"].as_str().unwrap();
        assert!(ends >= starts && ends < rfc3339(ahead).as_str(), "{sent}");
    }

    #[test]
    fn only_answers_that_refuse_the_alerts_are_permanent() {
        use reqwest::StatusCode as S;
        for s in [
            S::BAD_REQUEST,
            S::PAYLOAD_TOO_LARGE,
            S::UNPROCESSABLE_ENTITY,
        ] {
            assert!(refused(s), "{s}");
        }
        for s in [
            S::REQUEST_TIMEOUT,
            S::TOO_MANY_REQUESTS,
            S::UNAUTHORIZED,
            S::FORBIDDEN,
            S::NOT_FOUND,
            S::INTERNAL_SERVER_ERROR,
            S::BAD_GATEWAY,
            S::SERVICE_UNAVAILABLE,
            S::GATEWAY_TIMEOUT,
        ] {
            assert!(!refused(s), "{s}");
        }
    }
}
