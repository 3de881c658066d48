//! The NATS connection with credentials and TLS, against nats-server configured so: ingest works
//! with the right settings, fails without them, and no secret shows in errors or `config`.

use std::path::Path;

use fleetlake_tests::{Nats, TestDir, start_engine, test_config};

/// Publishes 50 envelope readings and waits until the engine has committed them.
async fn ingest_works(config: &fleetlake::config::Config) {
    let (engine, api, js) = start_engine(config).await;
    for seq in 1..=50u64 {
        let body = format!(
            r#"{{"device_id":"d1","seq":{seq},"ts":{},"temperature":4.0}}"#,
            1_763_900_000_000u64 + seq
        );
        js.publish("telemetry.d1", body.into())
            .await
            .expect("publish")
            .await
            .expect("stored");
    }
    api.wait_scalar(
        "SELECT count(*) FROM usable.telemetry",
        50,
        std::time::Duration::from_secs(60),
    )
    .await;
    engine.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn user_and_password() {
    let nats = Nats::start_with(&[
        "--user".into(),
        "fleet".into(),
        "--pass".into(),
        "pa55-word".into(),
    ])
    .await;
    let dir = TestDir::new();
    let lake = dir.path().join("lake").display().to_string();

    // Without credentials, and with a wrong password: refused, and the error names no secret.
    let refused = fleetlake::ingest::source::connect(nats.url())
        .await
        .expect_err("no credentials");
    assert!(refused.to_string().contains("connecting"), "{refused}");
    let wrong = test_config(
        nats.url(),
        &lake,
        &[("nats.user", "fleet"), ("nats.password", "not-the-pa55")],
    );
    let err = fleetlake::ingest::source::connect_with(&wrong.nats())
        .await
        .expect_err("wrong password");
    assert!(!err.to_string().contains("not-the-pa55"), "{err}");

    let config = test_config(
        nats.url(),
        &lake,
        &[("nats.user", "fleet"), ("nats.password", "pa55-word")],
    );
    let described = config.describe();
    assert!(!described.contains("pa55-word"), "{described}");
    assert!(described.contains("<redacted>"), "{described}");
    assert!(!format!("{:?}", config.nats()).contains("pa55-word"));
    ingest_works(&config).await;

    // The password in the URL instead: redacted wherever the URL is shown.
    let port = nats.server.port;
    let in_url = test_config(
        &format!("nats://fleet:pa55-word@127.0.0.1:{port}"),
        &lake,
        &[],
    );
    assert!(!in_url.describe().contains("pa55-word"));
    fleetlake::ingest::source::connect_with(&in_url.nats())
        .await
        .expect("credentials in the URL");
    let bad_url = test_config(
        &format!("nats://fleet:wrong-pa55@127.0.0.1:{port}"),
        &lake,
        &[],
    );
    let err = fleetlake::ingest::source::connect_with(&bad_url.nats())
        .await
        .expect_err("wrong password in the URL");
    assert!(!err.to_string().contains("wrong-pa55"), "{err}");
}

/// A certificate authority, a server certificate for 127.0.0.1 and a client certificate, all
/// written as PEM files into `dir`.
pub(crate) fn certificates(dir: &Path) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "fleetlake test CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let write = |name: &str, text: String| std::fs::write(dir.join(name), text).unwrap();
    write("ca.pem", ca_cert.pem());

    let server_key = KeyPair::generate().unwrap();
    let mut server = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    server
        .subject_alt_names
        .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
    let server_cert = server.signed_by(&server_key, &issuer).unwrap();
    write("server.pem", server_cert.pem());
    write("server-key.pem", server_key.serialize_pem());

    let client_key = KeyPair::generate().unwrap();
    let mut client = CertificateParams::new(Vec::<String>::new()).unwrap();
    client
        .distinguished_name
        .push(rcgen::DnType::CommonName, "fleetlake");
    client
        .extended_key_usages
        .push(rcgen::ExtendedKeyUsagePurpose::ClientAuth);
    let client_cert = client.signed_by(&client_key, &issuer).unwrap();
    write("client.pem", client_cert.pem());
    write("client-key.pem", client_key.serialize_pem());
}

#[tokio::test]
async fn mutual_tls() {
    let certs = TestDir::new();
    certificates(certs.path());
    let file = |name: &str| certs.path().join(name).display().to_string();
    let nats = Nats::start_with(&[
        "--tls".into(),
        "--tlscert".into(),
        file("server.pem"),
        "--tlskey".into(),
        file("server-key.pem"),
        "--tlsverify".into(),
        "--tlscacert".into(),
        file("ca.pem"),
    ])
    .await;
    let dir = TestDir::new();
    let lake = dir.path().join("lake").display().to_string();

    // Neither the CA nor a client certificate: the server's certificate is not trusted.
    assert!(
        fleetlake::ingest::source::connect(nats.url())
            .await
            .is_err()
    );
    // The CA but no client certificate: the server refuses the client.
    let no_client = test_config(nats.url(), &lake, &[("nats.tls_ca", &file("ca.pem"))]);
    assert!(
        fleetlake::ingest::source::connect_with(&no_client.nats())
            .await
            .is_err()
    );

    let config = test_config(
        nats.url(),
        &lake,
        &[
            ("nats.tls_ca", &file("ca.pem")),
            ("nats.tls_cert", &file("client.pem")),
            ("nats.tls_key", &file("client-key.pem")),
        ],
    );
    ingest_works(&config).await;
}
