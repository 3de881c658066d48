//! Two writers committing to one table at once (say the stream and a compaction) do not corrupt
//! it: every commit is a create-if-absent put of the next log entry (`If-None-Match: *` on S3),
//! so a loser retries on top of the winner instead of overwriting it.

use fleetlake_tests::Seaweed;
use fleetlake_zones::schema::{RAW_TELEMETRY, RawMessage, raw_batch};
use fleetlake_zones::{CommitOutcome, Lake, LakeConfig, TableId};

const COMMITS: i64 = 12;
const ROWS: i64 = 50;

async fn two_writers(config: LakeConfig) {
    let lake = Lake::open(&config).unwrap();
    let id = TableId::raw_telemetry();
    lake.ensure_table(&id, &RAW_TELEMETRY, &["ingest_date"])
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for writer in 0..2i64 {
        let lake = lake.clone();
        let id = id.clone();
        tasks.push(tokio::spawn(async move {
            let mut w = lake
                .writer(id, RAW_TELEMETRY.clone(), vec!["ingest_date".into()], format!("writer-{writer}"))
                .await
                .unwrap();
            for commit in 1..=COMMITS {
                let messages: Vec<RawMessage> = (0..ROWS)
                    .map(|i| RawMessage {
                        payload: b"{}".to_vec(),
                        subject: format!("telemetry.w{writer}"),
                        stream_seq: commit * 1000 + i,
                        msg_id: None,
                        received_at_us: 1_763_900_000_000_000,
                    })
                    .collect();
                let outcome = w.commit(&raw_batch(&messages), "stream_seq", commit * 1000 + ROWS).await.unwrap();
                assert!(matches!(outcome, CommitOutcome::Committed { rows, .. } if rows == ROWS as usize));
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let info = lake.describe(&id).await.unwrap().unwrap();
    assert_eq!(info.rows, (2 * COMMITS * ROWS) as u64);
    assert_eq!(
        info.version,
        (2 * COMMITS) as u64,
        "one version per commit after the create"
    );
    // Each writer's progress is its own.
    for writer in 0..2 {
        let w = lake
            .writer(
                id.clone(),
                RAW_TELEMETRY.clone(),
                vec!["ingest_date".into()],
                format!("writer-{writer}"),
            )
            .await
            .unwrap();
        assert_eq!(w.committed(), Some(COMMITS * 1000 + ROWS));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_on_s3_lose_no_commit() {
    let mut s3 = Seaweed::start().await;
    two_writers(LakeConfig {
        location: format!("s3://{}/concurrent", s3.bucket),
        storage_options: s3.env().into_iter().collect(),
    })
    .await;
    s3.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_on_a_local_folder_lose_no_commit() {
    let dir = fleetlake_tests::TestDir::new();
    two_writers(LakeConfig {
        location: dir.path().display().to_string(),
        ..Default::default()
    })
    .await;
}
