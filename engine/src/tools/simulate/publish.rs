//! Publishing the fleet to JetStream with a bounded number of unconfirmed messages.

use super::*;

use crate::error::Error;

/// How many publishes may await their acknowledgement at once.
pub(super) const IN_FLIGHT: usize = 512;

/// How long a publish is retried (NATS restarting, JetStream electing) before giving up.
pub(super) const PUBLISH_PATIENCE: Duration = Duration::from_secs(120);

type PendingAck = jetstream::context::PublishAckFuture;

pub(super) async fn send(
    js: &jetstream::Context,
    message: &SimMessage,
) -> Result<PendingAck, Error> {
    let payload = bytes::Bytes::from(message.payload.clone());
    let sent = match &message.msg_id {
        Some(id) => {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(async_nats::header::NATS_MESSAGE_ID, id.as_str());
            js.publish_with_headers(message.subject.clone(), headers, payload)
                .await
        }
        None => js.publish(message.subject.clone(), payload).await,
    };
    sent.map_err(|e| Error::Invalid(e.to_string()))
}

/// Waits for a publish to be stored, publishing it again (same message id, so JetStream stores
/// it once) while the server does not acknowledge. Returns whether JetStream saw a duplicate.
pub(super) async fn confirm(
    js: &jetstream::Context,
    message: &SimMessage,
    first: Result<PendingAck, Error>,
    cancel: &CancellationToken,
) -> Result<bool, Error> {
    let deadline = Instant::now() + PUBLISH_PATIENCE;
    let mut pending = first;
    // The first retry goes out at once: after an outage every publish in flight has timed out,
    // and pausing for each would stall the whole queue.
    let mut pause = Duration::ZERO;
    loop {
        let error = match pending {
            Ok(ack) => match ack.await {
                Ok(ack) => return Ok(ack.duplicate),
                Err(e) => e.to_string(),
            },
            Err(e) => e.to_string(),
        };
        if Instant::now() > deadline || cancel.is_cancelled() {
            return Err(Error::Unavailable(format!(
                "publishing to {}: {error}",
                message.subject
            )));
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).clamp(Duration::from_millis(50), Duration::from_secs(2));
        pending = send(js, message).await;
    }
}

/// Confirms the oldest publish in flight. An acknowledgement's timeout only starts when it is
/// awaited, so after a lost connection every publish in flight is sent again at once (same
/// message ids: JetStream stores each once) rather than timing out one after the other.
pub(super) async fn confirm_oldest(
    js: &jetstream::Context,
    pending: &mut VecDeque<(SimMessage, Result<PendingAck, Error>)>,
    cancel: &CancellationToken,
) -> Result<bool, Error> {
    let (message, ack) = pending.pop_front().expect("non-empty");
    let ack = match ack {
        Ok(ack) => ack.await.map_err(|e| Error::Invalid(e.to_string())),
        Err(e) => Err(e),
    };
    match ack {
        Ok(ack) => Ok(ack.duplicate),
        Err(error) => {
            tracing::debug!(%error, "publish unconfirmed; sending everything in flight again");
            for (m, a) in pending.iter_mut() {
                *a = send(js, m).await;
            }
            confirm(js, &message, Err(error), cancel).await
        }
    }
}

/// Publishes the simulated fleet; `progress` is called about once a second with the report so far.
/// Publishes that fail or go unacknowledged are retried with the same message id.
pub async fn publish(
    js: &jetstream::Context,
    config: SimConfig,
    cancel: CancellationToken,
    mut progress: impl FnMut(&Report),
) -> Result<Report, Error> {
    config.validate()?;
    let mut report = Report {
        seed: config.seed,
        devices: config.devices,
        ..Default::default()
    };
    let rate = config.rate;
    let sim = Simulator::new(config);
    report.planted = sim.planted();
    let started = Instant::now();
    let mut last_progress = Instant::now();
    let mut pending: VecDeque<(SimMessage, Result<PendingAck, Error>)> = VecDeque::new();
    for message in sim {
        if cancel.is_cancelled() {
            break;
        }
        if rate > 0.0 {
            let due = Duration::from_secs_f64(report.total as f64 / rate);
            let now = started.elapsed();
            if due > now + Duration::from_millis(2) {
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(due - now) => {}
                }
            }
        }
        match message.kind {
            Kind::Good => report.distinct += 1,
            Kind::Duplicate => report.duplicates += 1,
            Kind::Malformed => report.malformed += 1,
        }
        report.late += message.late as u64;
        report.total += 1;
        let ack = send(js, &message).await;
        pending.push_back((message, ack));
        if pending.len() >= IN_FLIGHT {
            report.stream_duplicates += confirm_oldest(js, &mut pending, &cancel).await? as u64;
        }
        if last_progress.elapsed() >= Duration::from_secs(1) {
            last_progress = Instant::now();
            report.elapsed_s = started.elapsed().as_secs_f64();
            progress(&report);
        }
    }
    while !pending.is_empty() {
        report.stream_duplicates += confirm_oldest(js, &mut pending, &cancel).await? as u64;
    }
    report.elapsed_s = started.elapsed().as_secs_f64();
    report.rate = report.total as f64 / report.elapsed_s.max(1e-9);
    Ok(report)
}
