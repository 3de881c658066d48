use super::*;

#[test]
fn secrets_are_never_shown() {
    let flags: Vec<(String, String)> = [
        ("nats.password", "hunter2-pw"),
        ("nats.token", "tok-secret"),
        ("nats.nkey_seed", "SUSECRETSEED"),
        (
            "nats.url",
            "nats://u:url-secret@127.0.0.1:4222,nats://tok-in-url@127.0.0.2:4222",
        ),
        (
            "alerts.alertmanager_url",
            "http://am:am-secret@127.0.0.1:9093",
        ),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let config = Config::load(None, Vec::new(), &flags).unwrap();
    let lake = config.lake(vec![
        (
            "AWS_SECRET_ACCESS_KEY".to_string(),
            "aws-secret".to_string(),
        ),
        ("AWS_SESSION_TOKEN".to_string(), "aws-session".to_string()),
    ]);
    let shown = format!(
        "{}\n{config:?}\n{lake:?}\n{:?}",
        config.describe(),
        config.nats(),
    );
    for secret in [
        "hunter2-pw",
        "tok-secret",
        "SUSECRETSEED",
        "url-secret",
        "tok-in-url",
        "am-secret",
        "aws-secret",
        "aws-session",
    ] {
        assert!(!shown.contains(secret), "{secret} shown:\n{shown}");
    }
    assert!(shown.contains("127.0.0.2"), "{shown}");
    // A bad value of a secret key is not echoed either.
    let err = Config::load(
        None,
        Vec::new(),
        &[("nats.nkey_seed".to_string(), "not-a-seed-xyz".to_string())],
    )
    .unwrap_err()
    .to_string();
    assert!(!err.contains("not-a-seed-xyz"), "{err}");
    // Nor a malformed URL's password, nor a broken file's line.
    let malformed = Config::load(
        None,
        Vec::new(),
        &[(
            "nats.url".to_string(),
            "nats://bob:hunter3@[::1".to_string(),
        )],
    )
    .unwrap();
    let shown = format!("{}{:?}", malformed.describe(), malformed.nats());
    assert!(!shown.contains("hunter3"), "{shown}");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("broken.toml");
    std::fs::write(&file, "[nats]\npassword = \"hunter4\n").unwrap();
    let err = Config::load(Some(&file), Vec::new(), &[])
        .unwrap_err()
        .to_string();
    assert!(!err.contains("hunter4"), "{err}");
    assert!(err.contains("line 2"), "{err}");
}

#[test]
fn layers_apply_in_order_and_unknown_keys_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("fleetlake.toml");
    std::fs::write(
        &file,
        "[nats]\nstream = \"FROM_FILE\"\nsubjects = [\"a.>\", \"b.>\"]\n[ingest]\ncommit_rows = 5\n",
    )
    .unwrap();
    let env = vec![
        ("FLEETLAKE_NATS_STREAM".to_string(), "FROM_ENV".to_string()),
        ("FLEETLAKE_INGEST_FETCH_BATCH".to_string(), "7".to_string()),
        ("HOME".to_string(), "/root".to_string()),
    ];
    let flags = vec![("ingest.fetch_batch".to_string(), "9".to_string())];
    let c = Config::load(Some(&file), env, &flags).unwrap();
    assert_eq!(c.stream(), "FROM_ENV");
    assert_eq!(c.subjects(), vec!["a.>", "b.>"]);
    assert_eq!(c.commit_rows(), 5);
    assert_eq!(c.fetch_batch(), 9);
    assert_eq!(c.consumer(), "fleetlake");

    std::fs::write(&file, "[nats]\nstraem = \"x\"\n").unwrap();
    let err = Config::load(Some(&file), vec![], &[])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("unknown configuration key \"nats.straem\""),
        "{err}"
    );
    assert!(err.contains("did you mean \"nats.stream\""), "{err}");
    assert!(
        !err.contains("query.timeout_s"),
        "no list of every key: {err}"
    );
    // A client's token in the environment is not a key (the demo prints the export).
    let env = vec![("FLEETLAKE_TOKEN".to_string(), "flk_x".to_string())];
    assert!(Config::load(None, env, &[]).is_ok());
    let err = Config::load(None, vec![], &[("ingest.zzz".into(), "1".into())])
        .unwrap_err()
        .to_string();
    assert!(err.contains("the ingest keys are"), "{err}");
    assert!(err.contains("ingest.commit_rows"), "{err}");

    let env = vec![(
        "FLEETLAKE_INGEST_COMMIT_ROWS".to_string(),
        "many".to_string(),
    )];
    let err = Config::load(None, env, &[]).unwrap_err().to_string();
    assert!(err.contains("ingest.commit_rows"), "{err}");
    assert!(err.contains("FLEETLAKE_INGEST_COMMIT_ROWS"), "{err}");
    assert!(err.contains("positive integer"), "{err}");
}

#[test]
fn lake_options_come_from_aws_variables_and_keys() {
    let env = vec![
        ("AWS_ACCESS_KEY_ID".to_string(), "k".to_string()),
        ("PATH".to_string(), "/bin".to_string()),
    ];
    let flags = vec![
        ("lake.location".to_string(), "s3://b/p".to_string()),
        (
            "lake.endpoint".to_string(),
            "http://127.0.0.1:9000".to_string(),
        ),
        ("lake.allow_http".to_string(), "true".to_string()),
    ];
    let c = Config::load(None, vec![], &flags).unwrap();
    let lake = c.lake(env);
    assert_eq!(lake.location, "s3://b/p");
    assert_eq!(lake.storage_options["AWS_ACCESS_KEY_ID"], "k");
    assert_eq!(
        lake.storage_options["AWS_ENDPOINT_URL"],
        "http://127.0.0.1:9000"
    );
    assert_eq!(lake.storage_options["AWS_ALLOW_HTTP"], "true");
    assert_eq!(lake.storage_options["AWS_REGION"], "us-east-1");
    assert!(!lake.storage_options.contains_key("PATH"));
}

#[test]
fn each_key_is_checked_as_its_table_entry_says() {
    let set = |key: &str, value: &str| {
        Config::load(None, vec![], &[(key.to_string(), value.to_string())]).map(|_| ())
    };
    // A good and a bad value of each kind of check, and what the refusal says was expected.
    let cases = [
        ("ingest.commit_rows", "5", "0", "a positive integer"),
        ("query.threads", "0", "-1", "a whole number (0 or more)"),
        ("nats.replicas", "3", "6", "1 to 5"),
        ("maintenance.min_small_files", "2", "1", "at least 2"),
        ("cluster.fleet_wide", "skip", "sometimes", "merge or skip"),
        ("cluster.instance", "", "a b", "(or empty)"),
        ("nats.consumer", "c-1", "", "a name of letters"),
        ("auth.enabled", "false", "maybe", "true or false"),
        ("fleet.metrics_table", "usable.x", "x", "a table such as"),
        (
            "auth.tenant_free_tables",
            "reference.a,final.b",
            "a",
            "comma-separated tables",
        ),
        (
            "retention.tables",
            "raw.quarantine=365",
            "raw=1",
            "zone.table=days",
        ),
        (
            "http.listen",
            "127.0.0.1:1",
            "localhost",
            "an address such as",
        ),
        (
            "alerts.alertmanager_url",
            "http://127.0.0.1:9093",
            "ftp://x",
            "an http(s) URL",
        ),
        ("nats.nkey_seed", "SUABC", "UABC", "an NKey seed"),
        ("fleet.metric", "temp", " ", "a column name"),
    ];
    for (key, good, bad, expected) in cases {
        assert!(set(key, good).is_ok(), "{key} = {good:?}");
        let refused = set(key, bad).expect_err(key).to_string();
        assert!(refused.contains(expected), "{key} = {bad:?}: {refused}");
    }
    // Every key has a default its own check accepts.
    for key in KEYS {
        assert!(set(key.name, key.default).is_ok(), "{}", key.name);
    }
}
