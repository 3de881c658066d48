//! The benchmark suite: in one run on one machine, how close fleetlake is to the fastest anything
//! could read the stream, and to what a data engineer would write instead.
//!
//! ```text
//! cargo build --release -p fleetlake-benches --bins -p fleetlake --bin fleetlake
//! PATH=$PWD/.venv/bin:$PATH target/release/suite --readme README.md   # 15–25 minutes on 2 cores
//! ```
//!
//! Every figure is measured beside the others in this one run, so their ratios are comparable
//! even on a shared, noisy machine; absolute rates from different runs are not. Its own
//! nats-server (and SeaweedFS) on free loopback ports; the engine is the `fleetlake` binary of
//! the same build, run as `fleetlake serve` with its defaults, as a user would.
//!
//! 1. **Fill**: for each input (the envelope fleet, then the mixed fleet: envelope, cold-chain and
//!    health devices), one JetStream stream gets `--messages` simulated messages (5% replays, 1%
//!    malformed, 5% late) from `--devices` devices, published with per-message acknowledgements,
//!    pipelined; the publish rate is reported.
//! 2. **Bare ceiling** ([`ceiling`]): a minimal async-nats pull consumer on the same stream that
//!    fetches and acks and does nothing else, with `AckPolicy::All` (one ack per 1,000 messages)
//!    and with an explicit ack per message.
//! 3. **fleetlake** drains the same stream from its start (a fresh lake and consumer each time):
//!    with only the pipelines (raw, quarantine, usable), then with the shipped `pipelines/` whole
//!    (the final zone's window tables and the rules too), on a local folder and (mixed fleet)
//!    on SeaweedFS. The time runs from starting the process until it has acknowledged every
//!    message, which it does only once every table holding it has committed.
//! 4. **Do-it-yourself** (`benches/python/diy_consumer.py`, envelope stream): nats-py, JSON
//!    decoding, a set for replays, appends with the `deltalake` package every 50,000 rows.
//! 5. **Latency** ([`latency`]): at each `--loads` rate for `--latency-seconds`, publish→alert at
//!    a NATS subscriber and publish→queryable (a probe reading visible to `/v1/query`)
//!    percentiles; then the highest rate sustained for `--sustain-seconds` with the lag not
//!    growing, found by doubling and bisection.
//! 6. **Memory**: peak resident memory of each engine run (`VmHWM`), an engine draining a fleet
//!    of `--fleet-devices` devices, and the dedup state alone per device (`dedup_memory`).
//! 7. **Report** ([`report`]): a Markdown table on stdout and in `--out`/suite.md, every figure in
//!    `--out`/suite.json, each rate also as a ratio to the `AckPolicy::All` ceiling; with
//!    `--readme`, the Markdown replaces the part of that file between `<!-- suite:begin -->` and
//!    `<!-- suite:end -->`.

mod ceiling;
mod latency;
mod report;
#[path = "../rss.rs"]
#[allow(dead_code)]
mod rss;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fleetlake::config::Config;
use fleetlake::tools::simulate::{self, Profile, SimConfig};
use fleetlake_tests::{EngineProcess, Nats, Seaweed, TestDir, metric, python, tail};
pub(crate) use rss::cpu_seconds;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

/// One run of every benchmark, side by side, with a Markdown and JSON report.
#[derive(clap::Parser)]
#[command(
    name = "suite",
    about = "One run of every benchmark side by side: bare-consumer ceilings, fleetlake's drains, a Python baseline, latency at fixed loads, the highest sustained load and memory with many devices"
)]
pub(crate) struct Args {
    /// Messages in each pre-filled stream.
    #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(1..))]
    messages: u64,
    /// Devices sending them.
    #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(3..))]
    devices: u64,
    /// Offered loads for the latency percentiles, messages per second, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "5000,20000,50000", value_parser = clap::value_parser!(u64).range(1..))]
    loads: Vec<u64>,
    /// Seconds of publishing at each offered load.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(5..))]
    latency_seconds: u64,
    /// Seconds each trial of the sustained-load search publishes (0 = no search).
    #[arg(long, default_value_t = 60)]
    sustain_seconds: u64,
    /// Trials of the sustained-load search.
    #[arg(long, default_value_t = 5)]
    sustain_trials: u32,
    /// Devices of the large-fleet memory run (0 = no such run).
    #[arg(long, default_value_t = 1_000_000)]
    fleet_devices: u64,
    /// Leave out the drain on SeaweedFS S3.
    #[arg(long)]
    no_s3: bool,
    /// Leave out the Python do-it-yourself baseline.
    #[arg(long)]
    no_diy: bool,
    /// Folder for suite.md and suite.json (the default holds the README's run: give another
    /// for a trial).
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/results"))]
    out: PathBuf,
    /// A Markdown file whose `<!-- suite:begin -->` … `<!-- suite:end -->` part is replaced by
    /// the report (e.g. README.md).
    #[arg(long)]
    readme: Option<PathBuf>,
}

/// How long after a drain the engine's resident memory is read: the device state and dedup
/// settle (snapshots, compaction) meanwhile.
const SETTLE: Duration = Duration::from_secs(2);

/// When the suite started, for the progress lines.
static STARTED: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

/// A progress line on stderr, with the time since the suite started.
macro_rules! progress {
    ($($arg:tt)*) => {
        eprintln!(
            "[{:>6.1} s] {}",
            crate::STARTED.get().map(|s| s.elapsed().as_secs_f64()).unwrap_or(0.0),
            format!($($arg)*)
        )
    };
}
pub(crate) use progress;

/// One drain of a pre-filled stream: by fleetlake, a bare consumer or the Python baseline.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Drain {
    /// What drained, e.g. "fleetlake: pipelines + final zone + rules".
    pub what: String,
    /// "envelope" or "mixed".
    pub input: &'static str,
    /// "local folder", "SeaweedFS S3", or "—" (nothing written).
    pub lake: &'static str,
    pub messages: u64,
    pub seconds: f64,
    pub messages_per_second: f64,
    /// This rate over the `AckPolicy::All` ceiling measured on the same stream.
    pub ratio_to_ceiling: f64,
    /// Peak resident memory of the engine process, MiB (fleetlake runs only).
    pub peak_rss_mib: Option<f64>,
    /// CPU the consumer (engine, bare consumer or Python process) used: CPU seconds per
    /// second of the drain.
    pub consumer_cores: f64,
    /// CPU nats-server used meanwhile, the same way.
    pub nats_cores: Option<f64>,
    /// Share of the drain the engine spent committing (the sum of `fleetlake_commit_seconds`
    /// over its tables, which one task commits one after another, over the drain's time): near
    /// 1, the commits are what limits it; well below, ingest's own loop is.
    pub commit_busy: Option<f64>,
    /// Share of the machine's CPU time the hypervisor took meanwhile (see [`Steal`]).
    pub steal: f64,
}

/// Wall-clock and CPU time of a drain: the consumer's and nats-server's.
pub(crate) struct Meter {
    started: Instant,
    nats_pid: Option<u32>,
    nats_cpu: f64,
    own_cpu: f64,
    steal: Steal,
}

/// The machine's CPU time so far, from the first line of `/proc/stat`: (all, stolen) ticks.
/// Steal is time the hypervisor gave this virtual machine's CPUs to someone else: on a shared
/// machine it makes every rate lower, and the report says how much there was.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Steal(f64, f64);

impl Steal {
    pub(crate) fn start() -> Self {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let ticks: Vec<f64> = stat
            .lines()
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .skip(1)
            .take(8)
            .filter_map(|v| v.parse().ok())
            .collect();
        Self(ticks.iter().sum(), ticks.get(7).copied().unwrap_or(0.0))
    }

    /// The share of the CPU time since `self` that was stolen, 0 to 1.
    pub(crate) fn share(&self) -> f64 {
        let now = Self::start();
        let all = now.0 - self.0;
        if all <= 0.0 {
            0.0
        } else {
            round((now.1 - self.1) / all, 3)
        }
    }
}

impl Meter {
    pub(crate) fn start(nats: &Nats) -> Self {
        let nats_pid = nats.server.pid();
        Self {
            started: Instant::now(),
            nats_pid,
            nats_cpu: nats_pid.map_or(0.0, cpu_seconds),
            own_cpu: cpu_seconds(std::process::id()),
            steal: Steal::start(),
        }
    }

    /// The share of the machine's CPU time stolen since the start (see [`Steal`]).
    pub(crate) fn steal(&self) -> f64 {
        self.steal.share()
    }

    /// Wall seconds since the start; the cores `consumer` used (a process started after the
    /// meter; `None`: this process) and nats-server used.
    pub(crate) fn stop(&self, consumer: Option<u32>) -> (f64, f64, Option<f64>) {
        let seconds = self.started.elapsed().as_secs_f64();
        let used = match consumer {
            Some(pid) => cpu_seconds(pid),
            None => cpu_seconds(std::process::id()) - self.own_cpu,
        };
        let nats = self
            .nats_pid
            .map(|p| round((cpu_seconds(p) - self.nats_cpu) / seconds, 2));
        (seconds, round(used / seconds, 2), nats)
    }
}

/// What one pre-filled stream was and how fast it was filled.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Fill {
    pub input: &'static str,
    pub messages: u64,
    pub devices: u64,
    pub distinct: u64,
    pub replays: u64,
    pub malformed: u64,
    pub publish_rate: f64,
}

/// The engine draining a fleet of many devices.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Fleet {
    pub devices: u64,
    pub messages: u64,
    /// With the pipelines only, then with the final zone and rules too.
    pub runs: Vec<FleetRun>,
    /// `dedup_memory --devices N --readings 5`: the dedup state alone, bytes per device.
    pub dedup_state_bytes_per_device: Option<f64>,
}

/// One engine run of [`Fleet`].
#[derive(Debug, Clone, Serialize)]
pub(crate) struct FleetRun {
    /// Which pipelines: as [`Drain::what`].
    pub what: String,
    pub messages_per_second: f64,
    pub peak_rss_mib: f64,
    pub rss_after_mib: f64,
    /// Resident memory after the drain minus that after the 1,000-device mixed drain of the
    /// same pipelines and messages, per device, bytes.
    pub rss_per_device_bytes: Option<f64>,
}

#[tokio::main]
async fn main() {
    let args = <Args as clap::Parser>::parse();
    STARTED.get_or_init(Instant::now);
    let steal = Steal::start();
    if cfg!(debug_assertions) {
        progress!("warning: a debug build; publish figures from a release build (--release)");
    }
    let mut report = report::Report::new(args.devices);

    for (input, profile) in [("envelope", Profile::Envelope), ("mixed", Profile::Mixed)] {
        let nats = Nats::start().await;
        let fill = fill(nats.url(), input, profile, args.messages, args.devices).await;
        report.fills.push(fill);
        let all = ceiling::drain(&nats, args.messages, ceiling::Ack::All).await;
        let explicit = ceiling::drain(&nats, args.messages, ceiling::Ack::Explicit).await;
        let base = all.messages_per_second;
        report.drains.push(Drain::ceiling(
            "bare consumer, AckPolicy::All",
            input,
            &all,
            base,
        ));
        report.drains.push(Drain::ceiling(
            "bare consumer, explicit ack per message",
            input,
            &explicit,
            base,
        ));
        let mut runs = vec![
            (Pipelines::WithoutFinal, false),
            (Pipelines::Shipped, false),
        ];
        if input == "mixed" && !args.no_s3 {
            runs.push((Pipelines::Shipped, true));
        }
        for (pipelines, s3) in runs {
            let run = engine_drain(&nats, input, args.messages, pipelines, s3, base).await;
            if input == "mixed" && !s3 {
                report.mixed_rss_after_mib.push((pipelines, run.1));
            }
            report.drains.push(run.0);
        }
        if input == "envelope" && !args.no_diy {
            let distinct = report.fills.last().map_or(0, |f| f.distinct);
            report
                .drains
                .push(diy(&nats, args.messages, distinct, base).await);
        }
    }

    for &rate in &args.loads {
        report
            .loads
            .push(latency::run(rate, args.latency_seconds, args.devices).await);
    }
    if args.sustain_seconds > 0 {
        report.sustained = Some(
            latency::highest_sustained(args.sustain_seconds, args.sustain_trials, args.devices)
                .await,
        );
    }
    if args.fleet_devices > 0 {
        report.fleet = Some(fleet(&args, &report.mixed_rss_after_mib).await);
    }

    report.steal = steal.share();
    report.write(&args);
}

impl Drain {
    fn ceiling(what: &str, input: &'static str, run: &ceiling::Run, base: f64) -> Self {
        Self {
            what: what.to_string(),
            input,
            lake: "—",
            messages: run.messages,
            seconds: round(run.seconds, 3),
            messages_per_second: run.messages_per_second.round(),
            ratio_to_ceiling: round(run.messages_per_second / base, 3),
            peak_rss_mib: None,
            consumer_cores: run.consumer_cores,
            nats_cores: run.nats_cores,
            commit_busy: None,
            steal: run.steal,
        }
    }
}

pub(crate) fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

/// The configuration the suite's engines and publishers share: the default stream and
/// subjects on `nats_url`.
fn config(nats_url: &str) -> Config {
    let flags = vec![("nats.url".to_string(), nats_url.to_string())];
    Config::load(None, Vec::new(), &flags).expect("configuration")
}

/// Fills the default stream on `nats_url` with `messages` simulated messages of `profile`.
async fn fill(
    nats_url: &str,
    input: &'static str,
    profile: Profile,
    messages: u64,
    devices: u64,
) -> Fill {
    progress!("{input}: filling the stream with {messages} messages from {devices} devices…");
    let config = config(nats_url);
    let js = fleetlake::ingest::source::connect(nats_url)
        .await
        .expect("NATS");
    fleetlake::ingest::source::ensure_stream(&js, &config)
        .await
        .expect("stream");
    let report = simulate::publish(
        &js,
        SimConfig {
            profile,
            seed: 1,
            devices,
            messages,
            duplicates: 0.05,
            malformed: 0.01,
            late: 0.05,
            ..Default::default()
        },
        CancellationToken::new(),
        |r| {
            if (r.elapsed_s as u64).is_multiple_of(5) {
                progress!("{input}: {} / {messages} published", r.total);
            }
        },
    )
    .await
    .expect("publishing");
    progress!("{input}: published at {:.0} msg/s", report.rate);
    Fill {
        input,
        messages: report.total,
        devices,
        distinct: report.distinct,
        replays: report.duplicates,
        malformed: report.malformed,
        publish_rate: report.rate.round(),
    }
}

/// Which pipelines an engine run loads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pipelines {
    /// The shipped `pipelines/` without `final.sql` and `rules/`: raw, quarantine, usable.
    WithoutFinal,
    /// The shipped `pipelines/` whole: also the final zone's window tables and the rules.
    Shipped,
}

impl Pipelines {
    /// How the report names an engine run with these pipelines.
    fn label(self) -> &'static str {
        match self {
            Self::WithoutFinal => "fleetlake: pipelines (raw, quarantine, usable)",
            Self::Shipped => "fleetlake: pipelines + final zone + rules",
        }
    }
}

/// The shipped pipelines folder, or a copy of it in `dir` without the final zone and rules.
fn pipelines_dir(which: Pipelines, dir: &Path) -> PathBuf {
    let shipped = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../pipelines"));
    match which {
        Pipelines::Shipped => shipped,
        Pipelines::WithoutFinal => {
            let only = dir.join("pipelines");
            std::fs::create_dir_all(&only).expect("pipelines folder");
            for f in ["cold_chain.sql", "device_health.sql", "reference.sql"] {
                std::fs::copy(shipped.join(f), only.join(f)).expect("copying a pipeline");
            }
            only
        }
    }
}

/// Resident memory of process `pid` from `/proc/<pid>/status`: (peak, now), MiB.
pub(crate) fn rss_mib(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map(|kb| round(kb / 1024.0, 1))
            .unwrap_or(f64::NAN)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// An engine process on `nats_url` with a fresh lake (a folder in `dir`, or a bucket on a
/// SeaweedFS of its own) and `pipelines`; `extra` are more `FLEETLAKE_*` settings.
pub(crate) async fn start_engine(
    nats_url: &str,
    dir: &Path,
    pipelines: &Path,
    s3: Option<&Seaweed>,
    extra: &[(&str, &str)],
) -> EngineProcess {
    let mut env: Vec<(String, String)> = vec![
        ("FLEETLAKE_NATS_URL".into(), nats_url.into()),
        (
            "FLEETLAKE_PIPELINES_DIR".into(),
            pipelines.display().to_string(),
        ),
        (
            "FLEETLAKE_LAKE_LOCATION".into(),
            match s3 {
                Some(s3) => format!("s3://{}/suite", s3.bucket),
                None => dir.join("lake").display().to_string(),
            },
        ),
    ];
    if let Some(s3) = s3 {
        env.extend(s3.env());
    }
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    EngineProcess::start(&env, &dir.join("engine.log")).await
}

/// Waits until `engine` has acknowledged `messages`, with progress; panics with its log after
/// 30 minutes.
pub(crate) async fn wait_acked(engine: &EngineProcess, messages: u64, what: &str, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(1800);
    let mut shown = Instant::now();
    loop {
        let acked = metric(&engine.api, "fleetlake_messages_acked_total").await;
        if acked >= messages {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {acked} of {messages} acked after 30 minutes:\n{}",
            tail(log)
        );
        if shown.elapsed() >= Duration::from_secs(5) {
            shown = Instant::now();
            progress!("{what}: {acked} / {messages} acknowledged");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Seconds the engine has spent committing, over all its tables (`fleetlake_commit_seconds_sum`).
async fn commit_seconds(engine: &EngineProcess) -> f64 {
    let (_, metrics) = engine.api.get("/metrics").await;
    metrics
        .lines()
        .filter(|l| l.starts_with("fleetlake_commit_seconds_sum{"))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum()
}

/// fleetlake draining the pre-filled stream on `nats_url` from its start; the drain and the
/// engine's resident memory after it (MiB).
async fn engine_drain(
    nats: &Nats,
    input: &'static str,
    messages: u64,
    which: Pipelines,
    s3: bool,
    base: f64,
) -> (Drain, f64) {
    let what = which.label();
    let lake = if s3 { "SeaweedFS S3" } else { "local folder" };
    progress!("{input}: {what}, {lake}…");
    let dir = TestDir::new();
    let mut seaweed = if s3 {
        Some(Seaweed::start().await)
    } else {
        None
    };
    let pipelines = pipelines_dir(which, dir.path());
    let log = dir.path().join("engine.log");
    let meter = Meter::start(nats);
    let engine = start_engine(nats.url(), dir.path(), &pipelines, seaweed.as_ref(), &[]).await;
    wait_acked(&engine, messages, &format!("{input}: {what}"), &log).await;
    let (seconds, consumer_cores, nats_cores) = meter.stop(Some(engine.pid()));
    let steal = meter.steal();
    // Memory after the same settling as the many-device runs it is compared with.
    tokio::time::sleep(SETTLE).await;
    let (peak, now) = rss_mib(engine.pid());
    let commit_busy = round(commit_seconds(&engine).await / seconds, 2);
    let status = engine.terminate().await;
    assert!(status.success(), "{what}: exit {status}:\n{}", tail(&log));
    if let Some(s) = seaweed.as_mut() {
        s.stop().await;
    }
    let rate = messages as f64 / seconds;
    progress!(
        "{input}: {what}, {lake}: {rate:.0} msg/s ({:.2} of the ceiling), steal {steal}, peak {peak} MiB, \
         engine {consumer_cores} cores (committing {commit_busy} of the time), nats-server {} cores",
        rate / base,
        nats_cores.map_or("?".into(), |c| c.to_string())
    );
    (
        Drain {
            what: what.to_string(),
            input,
            lake,
            messages,
            seconds: round(seconds, 3),
            messages_per_second: rate.round(),
            ratio_to_ceiling: round(rate / base, 3),
            peak_rss_mib: Some(peak),
            consumer_cores,
            nats_cores,
            commit_busy: Some(commit_busy),
            steal,
        },
        now,
    )
}

/// The Python do-it-yourself consumer draining the envelope stream on `nats_url`.
async fn diy(nats: &Nats, messages: u64, distinct: u64, base: f64) -> Drain {
    progress!("envelope: the do-it-yourself Python consumer (nats-py + deltalake)…");
    let dir = TestDir::new();
    let meter = Meter::start(nats);
    let out = tokio::process::Command::new(python())
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/python/diy_consumer.py"
        ))
        .args([nats.url(), "TELEMETRY"])
        .arg(dir.path().join("readings"))
        .arg(messages.to_string())
        .output()
        .await
        .expect("running python");
    assert!(
        out.status.success(),
        "diy_consumer.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("JSON from diy_consumer.py");
    // Timed like fleetlake: from starting the process (the interpreter and its imports too).
    let (seconds, _, nats_cores) = meter.stop(None);
    let steal = meter.steal();
    let cpu = v["cpu_seconds"].as_f64().expect("cpu_seconds");
    let rate = messages as f64 / seconds;
    let rows = v["rows"].as_u64().unwrap_or(0);
    progress!("envelope: do-it-yourself: {rate:.0} msg/s ({rows} rows)");
    if rows.abs_diff(distinct) > distinct / 100 {
        progress!(
            "warning: the do-it-yourself consumer wrote {rows} rows, not about the {distinct} distinct readings sent: it did not do the same work"
        );
    }
    Drain {
        what: "do-it-yourself: Python, nats-py + deltalake".to_string(),
        input: "envelope",
        lake: "local folder",
        messages,
        seconds: round(seconds, 3),
        messages_per_second: rate.round(),
        ratio_to_ceiling: round(rate / base, 3),
        peak_rss_mib: None,
        consumer_cores: round(cpu / seconds, 2),
        nats_cores,
        commit_busy: None,
        steal,
    }
}

/// The engine (local folder) draining a mixed fleet of `--fleet-devices` devices, with the
/// pipelines only and with the shipped pipelines whole; and the dedup state alone at that size.
/// `small` is the resident memory after the 1,000-device mixed drains, per pipelines.
async fn fleet(args: &Args, small: &[(Pipelines, f64)]) -> Fleet {
    let devices = args.fleet_devices;
    let messages = args.messages.max(devices);
    let nats = Nats::start().await;
    fill(nats.url(), "mixed", Profile::Mixed, messages, devices).await;
    let mut runs = Vec::new();
    for (n, which) in [Pipelines::WithoutFinal, Pipelines::Shipped]
        .into_iter()
        .enumerate()
    {
        let what = which.label();
        let dir = TestDir::new();
        let pipelines = pipelines_dir(which, dir.path());
        let log = dir.path().join("engine.log");
        progress!("{devices} devices: {what}…");
        let started = Instant::now();
        let consumer = format!("fleet-{n}");
        let extra = [("FLEETLAKE_NATS_CONSUMER", consumer.as_str())];
        let engine = start_engine(nats.url(), dir.path(), &pipelines, None, &extra).await;
        wait_acked(&engine, messages, &format!("{devices} devices"), &log).await;
        let seconds = started.elapsed().as_secs_f64();
        tokio::time::sleep(SETTLE).await;
        let (peak, now) = rss_mib(engine.pid());
        let status = engine.terminate().await;
        assert!(
            status.success(),
            "{devices} devices: exit {status}:\n{}",
            tail(&log)
        );
        let per_device = small
            .iter()
            .find(|(p, _)| *p == which)
            .filter(|_| messages == args.messages)
            .map(|(_, small)| round((now - small) * 1024.0 * 1024.0 / devices as f64, 0));
        let rate = messages as f64 / seconds;
        progress!(
            "{devices} devices: {what}: {rate:.0} msg/s, peak {peak} MiB, {now} MiB after the drain"
        );
        runs.push(FleetRun {
            what: what.to_string(),
            messages_per_second: rate.round(),
            peak_rss_mib: peak,
            rss_after_mib: now,
            rss_per_device_bytes: per_device,
        });
    }
    Fleet {
        devices,
        messages,
        runs,
        dedup_state_bytes_per_device: dedup_memory(devices).await,
    }
}

/// Runs the `dedup_memory` benchmark beside this one for `devices`: resident bytes per device.
async fn dedup_memory(devices: u64) -> Option<f64> {
    let exe = std::env::current_exe().ok()?.with_file_name("dedup_memory");
    let out = tokio::process::Command::new(&exe)
        .args(["--devices", &devices.to_string(), "--readings", "5"])
        .output()
        .await
        .map_err(|e| progress!("dedup_memory ({}): {e}", exe.display()))
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    v["resident_bytes_per_device"].as_f64()
}
