//! Alert transitions as NATS messages: the subject (`alerts.<rule>.<key>`), the JSON body, and
//! publishing them with their id as `Nats-Msg-Id` (JetStream drops a repeat).

use async_nats::jetstream;
use fleetlake_sql::rules::Transition;

use crate::error::{Context, Error};

/// The alert as published on NATS (JSON).
pub fn alert_json(t: &Transition, emitted_us: i64) -> serde_json::Value {
    let time = |us: i64| {
        chrono::DateTime::from_timestamp_micros(us)
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
    };
    serde_json::json!({
        "alert_id": t.alert_id,
        "rule": t.rule,
        "rule_version": t.rule_version,
        "severity": t.severity,
        "key": t.key,
        "state": t.state,
        "window": t.window_start.map(|s| serde_json::json!({"start": time(s), "end": t.window_end.and_then(time)})),
        "values": t.values,
        "event_time": time(t.event_time),
        "emit_time": time(if t.emitted_us > 0 { t.emitted_us } else { emitted_us }),
        "stream_seq": t.stream_seq,
        "members": (!t.members.is_empty()).then_some(&t.members),
        "tenant": t.tenant,
    })
}

/// The longest subject token fleetlake makes from a rule name or a key, in bytes. nats-server
/// closes the connection of a client whose protocol line passes 4 KB (`maximum control line
/// exceeded`), so a subject built from a device's key must be bounded.
pub const MAX_SUBJECT_TOKEN: usize = 128;

/// A NATS subject token for a rule name or key: separators, wildcards, whitespace and control
/// characters become `_`; a token longer than [`MAX_SUBJECT_TOKEN`] bytes is cut (at a character
/// boundary) and ends in `~` and 16 hex digits of a hash of the whole key, so distinct keys keep
/// distinct subjects. The full key is in the alert's body.
pub fn subject_token(key: &str) -> String {
    let t: String = key
        .chars()
        .map(|c| match c {
            '.' | '*' | '>' => '_',
            c if c.is_whitespace() || c.is_control() => '_',
            c => c,
        })
        .collect();
    if t.is_empty() {
        return "_".into();
    }
    if t.len() <= MAX_SUBJECT_TOKEN {
        return t;
    }
    let hash = fleetlake_sql::hash::stable_hash(&[key]);
    let room = MAX_SUBJECT_TOKEN - 17;
    let mut prefix = String::with_capacity(MAX_SUBJECT_TOKEN);
    for c in t.chars() {
        if prefix.len() + c.len_utf8() > room {
            break;
        }
        prefix.push(c);
    }
    format!("{prefix}~{hash:016x}")
}

/// The subject an alert transition is published on: `alerts.<rule>.<key>`, each token bounded
/// (see [`subject_token`]).
pub fn alert_subject(rule: &str, key: &str) -> String {
    format!("alerts.{}.{}", subject_token(rule), subject_token(key))
}

/// Publishes each transition and waits until JetStream has stored them all.
pub(crate) async fn send(js: &jetstream::Context, transitions: &[Transition]) -> Result<(), Error> {
    let now = chrono::Utc::now().timestamp_micros();
    let max_payload = js.client().server_info().max_payload;
    let mut acks = Vec::new();
    for t in transitions {
        let subject = alert_subject(&t.rule, &t.key);
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, t.alert_id.as_str());
        let mut alert = alert_json(t, now);
        let mut payload = serde_json::to_vec(&alert).expect("serializable");
        if max_payload > 0 && payload.len() + 256 > max_payload {
            // Retrying cannot make it fit: the values are left out (they are in final.alerts),
            // and the key is cut if it alone is too long.
            alert["values"] = serde_json::json!({"omitted": "the alert was larger than the NATS server's max_payload; see final.alerts"});
            alert["values_omitted"] = serde_json::Value::Bool(true);
            if !t.members.is_empty() {
                // A cohort of thousands: its count stays, its members are in final.alerts.
                alert["members"] = serde_json::Value::Null;
                alert["count"] = serde_json::json!(t.members.len());
                alert["members_omitted"] = serde_json::Value::Bool(true);
            }
            payload = serde_json::to_vec(&alert).expect("serializable");
            if payload.len() + 256 > max_payload {
                // The key alone is too long (JSON escaping can make it longer still): its
                // bounded token stands in for it.
                alert["key"] = serde_json::Value::String(subject_token(&t.key));
                alert["key_shortened"] = serde_json::Value::Bool(true);
                payload = serde_json::to_vec(&alert).expect("serializable");
            }
            tracing::warn!(rule = %t.rule, alert_id = %t.alert_id, max_payload, "alert too large for NATS: published without its values");
        }
        let ack = js
            .publish_with_headers(subject, headers, payload.into())
            .await
            .context("publishing an alert")?;
        acks.push(ack);
    }
    for ack in acks {
        ack.await.context("storing an alert in JetStream")?;
    }
    Ok(())
}
