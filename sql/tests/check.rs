//! The pipeline checker, specified by example: every file in `tests/pipelines/bad/` starts with
//! `-- expect: LINE:COLUMN text` and must fail with exactly that position and a message that
//! contains the text; the pipelines that ship in `pipelines/` must check cleanly.

use std::path::PathBuf;

use fleetlake_sql::pipeline::{check_files, pipeline_files};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[tokio::test]
async fn each_bad_pipeline_fails_where_and_how_its_header_says() {
    let dir = root().join("tests/pipelines/bad");
    let files = pipeline_files(&[dir]).unwrap();
    assert!(files.len() >= 10, "{files:?}");
    // Checked one by one, with the shipped reference declarations beside them.
    let reference = root().join("../pipelines/reference.sql");
    let mut failures = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let header = text.lines().next().unwrap();
        let expect = header
            .strip_prefix("-- expect: ")
            .unwrap_or_else(|| panic!("{}: no '-- expect:' header", file.display()));
        let (position, needle) = expect.split_once(' ').unwrap();
        let reports = check_files(&[reference.clone(), file.clone()]).await;
        let report = reports.iter().find(|r| r.path == file).unwrap();
        let lines = report.error_lines();
        let expected_prefix = format!("{}:{position}: ", file.display());
        let ok =
            lines.len() == 1 && lines[0].starts_with(&expected_prefix) && lines[0].contains(needle);
        if !ok {
            failures.push(format!(
                "expected {expected_prefix}…{needle}…\n  got {lines:?}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test]
async fn the_shipped_pipelines_check() {
    let files = pipeline_files(&[root().join("../pipelines")]).unwrap();
    let reports = check_files(&files).await;
    let errors: Vec<String> = reports.iter().flat_map(|r| r.error_lines()).collect();
    assert!(errors.is_empty(), "{errors:#?}");
    let warnings: Vec<String> = reports.iter().flat_map(|r| r.warning_lines()).collect();
    assert!(warnings.is_empty(), "{warnings:#?}");
    let names: Vec<String> = reports
        .iter()
        .filter_map(|r| r.pipeline.as_ref().map(|p| p.name.clone()))
        .collect();
    assert_eq!(names, vec!["cold_chain", "device_health"]);
    let cold = reports
        .iter()
        .find_map(|r| r.pipeline.as_ref().filter(|p| p.name == "cold_chain"))
        .unwrap();
    let (table, schema) = &cold.tables[0];
    assert_eq!(table.table.to_string(), "usable.cold_chain");
    assert_eq!(table.expectations.len(), 5);
    assert!(schema.field_with_name("temperature_c").is_ok());
    assert!(schema.field_with_name("tenant").is_ok());
    assert_eq!(cold.source.subject, "telemetry.coldchain.>");
}

#[tokio::test]
async fn window_functions_in_per_batch_queries_are_warned_about() {
    let rule = "CREATE RULE odd_one_out WITH (severity = 'warning', key = 'device_id', event_time = 'ts')\n\
                AS SELECT device_id, ts, cohort_outlier(temperature_c, 5) OVER () AS firing,\n\
                robust_zscore(temperature_c) OVER () AS z FROM usable.cold_chain;\n";
    let mut texts: Vec<(PathBuf, Result<String, String>)> =
        pipeline_files(&[root().join("../pipelines")])
            .unwrap()
            .into_iter()
            .map(|f| {
                let text = std::fs::read_to_string(&f).unwrap();
                (f, Ok(text))
            })
            .collect();
    texts.push((PathBuf::from("odd_one_out.sql"), Ok(rule.to_string())));
    let reports = fleetlake_sql::pipeline::check_texts(texts).await;
    let errors: Vec<String> = reports.iter().flat_map(|r| r.error_lines()).collect();
    assert!(errors.is_empty(), "it checks: {errors:#?}");
    let warnings: Vec<String> = reports.iter().flat_map(|r| r.warning_lines()).collect();
    assert_eq!(warnings.len(), 1, "{warnings:#?}");
    assert!(
        warnings[0].starts_with("odd_one_out.sql:1:"),
        "{}",
        warnings[0]
    );
    assert!(
        warnings[0]
            .contains("rule odd_one_out uses the window functions cohort_outlier, robust_zscore")
            && warnings[0].contains("one micro-batch"),
        "{}",
        warnings[0]
    );
}
