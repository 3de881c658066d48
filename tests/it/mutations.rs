//! Property test of the promise, through real NATS: seeded mutations of message bodies, subjects
//! and headers, published with the NATS protocol as a device's own client might send them. After
//! the engine has acknowledged the stream, every stored message is in raw exactly once, as
//! received, and in exactly one of the usable tables or the quarantine.

use std::collections::HashMap;
use std::time::Duration;

use arrow::array::{Array, AsArray};
use arrow::datatypes::DataType;
use fleetlake_sql::QueryEngine;
use fleetlake_tests::{
    Nats, TestDir, publish_raw, shipped_pipelines, start_engine, test_config, wait_stream_acked,
};

const T: i64 = 1_777_593_600_000;
const MESSAGES: usize = 300;

/// A small seeded generator (the tests must replay a failure exactly).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// One message: subject, headers, body.
type Message = (String, Vec<(String, String)>, Vec<u8>);

fn message(i: usize, rng: &mut Rng) -> Message {
    let device = format!("fz{i}");
    let seq = i as i64 + 1;
    let ts = T + i as i64 * 1000;
    let (subject, body) = if rng.below(2) == 0 {
        (
            format!("telemetry.t1.{device}"),
            format!(
                r#"{{"device_id":"{device}","seq":{seq},"ts":{ts},"temperature":21.5,"fw":"1.2"}}"#
            ),
        )
    } else {
        (
            format!("telemetry.coldchain.{device}"),
            format!(
                r#"{{"device_id":"{device}","seq":{seq},"ts":{ts},"temp_c":4.5,"door_open":false}}"#
            ),
        )
    };
    let mut body = body.into_bytes();
    match rng.below(14) {
        0..=3 => {} // untouched
        4 => {
            let at = rng.below(body.len());
            body[at] ^= 1 << rng.below(8);
        }
        5 => body.truncate(rng.below(body.len())),
        6 => {
            let at = rng.below(body.len());
            body.splice(at..at, b"\xff\xfe{[\"".iter().copied());
        }
        7 => {
            body = replace(
                &body,
                &format!("\"seq\":{seq}"),
                &format!("\"seq\":{seq}.5"),
            )
        }
        8 => {
            body = replace(
                &body,
                &format!("\"seq\":{seq}"),
                &format!("\"seq\":{}", i64::MAX - i as i64),
            )
        }
        9 => body = replace(&body, &format!("\"ts\":{ts}"), "\"ts\":8640000000000000"),
        10 => {
            body = replace(
                &body,
                &format!("\"device_id\":\"{device}\""),
                &format!("\"device_id\":{seq}"),
            )
        }
        11 => body = replace(&body, "4.5", "1e400"),
        12 => {
            let deep = format!("{}1{}", "[".repeat(2000), "]".repeat(2000));
            body = replace(
                &body,
                &format!("\"ts\":{ts}"),
                &format!("\"ts\":{ts},\"x\":{deep}"),
            );
        }
        _ => body = Vec::new(),
    }
    let subject = match rng.below(6) {
        0 => format!("{subject}\u{a0}x"),
        1 => format!("{subject}.ü\u{7f}"),
        2 => format!("{subject}.{}", "s".repeat(2000)),
        _ => subject,
    };
    let headers = match rng.below(4) {
        0 => vec![("Nats-Msg-Id".to_string(), format!("fz-{i}-ü\u{a0}"))],
        1 => vec![
            ("Nats-Msg-Id".to_string(), format!("fz-{i}")),
            ("X-Odd".to_string(), "\u{feff}".repeat(100)),
        ],
        _ => Vec::new(),
    };
    (subject, headers, body)
}

fn replace(body: &[u8], from: &str, to: &str) -> Vec<u8> {
    String::from_utf8_lossy(body).replace(from, to).into_bytes()
}

/// Stream sequences and how often each appears in `sql`'s single column.
async fn seqs(query: &QueryEngine, sql: &str) -> HashMap<i64, usize> {
    let result = query
        .query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    let mut out = HashMap::new();
    for b in &result.batches {
        for v in b
            .column(0)
            .as_primitive::<arrow::datatypes::Int64Type>()
            .iter()
        {
            *out.entry(v.expect("stream_seq")).or_insert(0) += 1;
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutated_messages_land_in_raw_once_and_in_usable_or_quarantine_once() {
    let nats = Nats::start().await;
    let dir = TestDir::new();
    let pipelines = shipped_pipelines(dir.path());
    let lake = dir.path().join("lake").display().to_string();
    let config = test_config(
        nats.url(),
        &lake,
        &[("pipelines.dir", pipelines.to_str().unwrap())],
    );
    let (engine, _api, js) = start_engine(&config).await;
    crate::alerts::stream_ready(&js).await;
    let mut rng = Rng(0xF1EE7);
    let sent: Vec<Message> = (0..MESSAGES).map(|i| message(i, &mut rng)).collect();
    for (subject, headers, body) in &sent {
        let headers: Vec<(&str, &str)> = headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        publish_raw(nats.url(), subject, &headers, body).await;
    }
    let stored = js
        .get_stream("TELEMETRY")
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .messages;
    assert_eq!(
        stored, MESSAGES as u64,
        "every publish is stored once (ids are unique)"
    );
    wait_stream_acked(nats.url(), Duration::from_secs(120)).await;

    let query = QueryEngine::new(engine.lake.clone());
    // Raw: each message exactly once, as received.
    let raw = query
        .query("SELECT stream_seq, subject, payload, msg_id FROM raw.telemetry ORDER BY stream_seq")
        .await
        .unwrap();
    let mut n = 0;
    for b in &raw.batches {
        let text = |i: usize| arrow::compute::cast(b.column(i), &DataType::Utf8).unwrap();
        let seq = b.column(0).as_primitive::<arrow::datatypes::Int64Type>();
        let (subject, msg_id) = (text(1), text(3));
        let (subject, msg_id) = (subject.as_string::<i32>(), msg_id.as_string::<i32>());
        let payload = arrow::compute::cast(b.column(2), &DataType::Binary).unwrap();
        let payload = payload.as_binary::<i32>();
        for r in 0..b.num_rows() {
            let (s, h, p) = &sent[n];
            assert_eq!(seq.value(r), n as i64 + 1);
            assert_eq!(subject.value(r), s, "stream sequence {}", n + 1);
            assert_eq!(payload.value(r), p.as_slice(), "stream sequence {}", n + 1);
            // The header value as the NATS client parses it: surrounding (Unicode) whitespace
            // removed, as async-nats does.
            let id = h
                .iter()
                .find(|(k, _)| k == "Nats-Msg-Id")
                .map(|(_, v)| v.trim());
            assert_eq!(
                msg_id.is_valid(r).then(|| msg_id.value(r)),
                id,
                "stream sequence {}",
                n + 1
            );
            n += 1;
        }
    }
    assert_eq!(n, MESSAGES);
    // Usable or quarantine: exactly one of them.
    let mut landed: HashMap<i64, usize> = HashMap::new();
    for sql in [
        "SELECT stream_seq FROM usable.telemetry",
        "SELECT stream_seq FROM usable.cold_chain",
        "SELECT stream_seq FROM raw.quarantine",
    ] {
        for (seq, count) in seqs(&query, sql).await {
            *landed.entry(seq).or_insert(0) += count;
        }
    }
    let wrong: Vec<(i64, usize)> = (1..=MESSAGES as i64)
        .map(|s| (s, landed.get(&s).copied().unwrap_or(0)))
        .filter(|(_, c)| *c != 1)
        .collect();
    assert!(
        wrong.is_empty(),
        "(stream sequence, times landed) not exactly once: {wrong:?}"
    );
    engine.shutdown().await.expect("a clean shutdown");
}
