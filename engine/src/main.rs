//! The `fleetlake` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use fleetlake::api::format::{self, Format};
use fleetlake::config::Config;
use fleetlake::serve::{Engine, shutdown_signal};
use fleetlake::tools::demo::{self, DemoOptions};
use fleetlake::tools::simulate::{self, Profile, SimConfig};
use fleetlake_sql::QueryEngine;
use fleetlake_zones::Lake;
use tokio_util::sync::CancellationToken;

/// mimalloc instead of the system allocator: ingest allocates and frees many small Arrow
/// buffers and strings per micro-batch, and glibc's malloc took about a quarter of the engine's
/// CPU in a profile of a drain (README, Performance).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// fleetlake: IoT fleet telemetry from NATS JetStream into a zoned Delta lakehouse, queried with SQL.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// TOML configuration file (also FLEETLAKE_CONFIG).
    #[arg(long, global = true, env = "FLEETLAKE_CONFIG")]
    config: Option<PathBuf>,
    /// Set a configuration key, e.g. --set ingest.commit_rows=50000 (repeatable; see `fleetlake config`).
    #[arg(long = "set", global = true, value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Lake location: a folder, file:///path or s3://bucket/prefix (key lake.location).
    #[arg(long, global = true)]
    lake: Option<String>,
    /// NATS server URL (key nats.url).
    #[arg(long, global = true)]
    nats: Option<String>,
    /// HTTP listen address (key http.listen).
    #[arg(long, global = true)]
    listen: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Consume JetStream into the lake and serve the HTTP API until Ctrl-C or SIGTERM.
    Serve,
    /// Publish simulated fleet telemetry and print what was sent as JSON.
    Simulate(SimArgs),
    /// Run everything at once: NATS (if none answers), engine, simulator and HTTP API.
    Demo {
        #[command(flatten)]
        sim: SimArgs,
        /// Exit once the simulated messages are all committed (needs --messages > 0).
        #[arg(long)]
        exit_when_done: bool,
    },
    /// Run a read-only SQL query over the lake and print the answer.
    Query {
        /// The SQL, e.g. "SELECT count(*) FROM usable.telemetry".
        sql: String,
        /// Output format.
        #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
        format: OutputFormat,
    },
    /// Parse and plan pipeline files without running them; errors are reported as file:line:column.
    Check {
        /// Pipeline files or folders (searched for *.sql).
        #[arg(default_value = "pipelines")]
        paths: Vec<PathBuf>,
    },
    /// Rebuild a pipeline's usable tables from the raw zone with its current definition.
    Replay {
        /// The pipeline (its file name without .sql).
        pipeline: String,
        /// Replay messages received from this time (2025-11-23 or RFC 3339); default: the start.
        #[arg(long)]
        from: Option<String>,
        /// ... until before this time; default: now.
        #[arg(long)]
        to: Option<String>,
    },
    /// Maintain the lake's tables now: retention, compaction, checkpoints, log cleanup, vacuum.
    /// Prints what it did (or, with --dry-run, would do) as JSON.
    Maintain {
        /// Plan and report without changing anything.
        #[arg(long)]
        dry_run: bool,
        /// Only these tables (zone.table; repeatable). Default: every table of the lake.
        #[arg(long = "table", value_name = "ZONE.TABLE")]
        tables: Vec<String>,
        /// Do not take the maintenance lease in NATS: only when no engine runs on this lake.
        #[arg(long)]
        without_lease: bool,
    },
    /// Show every configuration key with its value and default.
    Config,
    /// Create, list or revoke API tokens (in auth.tokens_file; a running server sees changes
    /// within a second).
    #[command(subcommand)]
    Token(TokenCommand),
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Create a token and print it (once: only its SHA-256 is stored).
    Create {
        /// A name for the token, shown in lists and the audit (letters, digits, - _ . @).
        #[arg(long)]
        name: String,
        /// analyst (usable and final zones), engineer (also raw, reference, rules) or admin.
        #[arg(long)]
        role: String,
        /// Bind the token to a tenant: it sees only that tenant's rows (repeatable).
        #[arg(long = "tenant")]
        tenants: Vec<String>,
        /// Override query.timeout_s for this token.
        #[arg(long)]
        timeout_s: Option<u64>,
        /// Override query.memory_mb for this token.
        #[arg(long)]
        memory_mb: Option<u64>,
        /// Override query.max_rows for this token.
        #[arg(long)]
        max_rows: Option<u64>,
        /// Override query.max_concurrent for this token.
        #[arg(long)]
        max_concurrent: Option<u64>,
        /// Override query.rate_per_minute for this token.
        #[arg(long)]
        rate_per_minute: Option<u64>,
    },
    /// List the tokens (without their hashes) as JSON.
    List,
    /// Revoke a token by id or name.
    Revoke {
        /// The token's id (8 hex digits) or name.
        id: String,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum OutputFormat {
    Table,
    Json,
    Csv,
    Ndjson,
}

#[derive(Args, Clone)]
struct SimArgs {
    /// What the fleet sends: envelope (usable.telemetry), coldchain, health, or mixed.
    #[arg(long)]
    profile: Option<String>,
    /// Random seed: the same seed sends the same messages.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Number of devices in the fleet (default: 100; the demo's: 1,000).
    #[arg(long)]
    devices: Option<u64>,
    /// Messages to send (0 = until Ctrl-C).
    #[arg(long)]
    messages: Option<u64>,
    /// Messages per second (0 = as fast as JetStream acknowledges).
    #[arg(long)]
    rate: Option<f64>,
    /// Share of exact replays of earlier readings (0..1).
    #[arg(long)]
    duplicates: Option<f64>,
    /// Share of malformed payloads (0..1).
    #[arg(long)]
    malformed: Option<f64>,
    /// Share of late, out-of-order readings (0..1).
    #[arg(long)]
    late: Option<f64>,
    /// Subject prefix: messages go to <prefix>.<device_id>.
    #[arg(long, default_value = "telemetry")]
    subject_prefix: String,
    /// Set Nats-Msg-Id to <device_id>-<seq> on every message.
    #[arg(long)]
    msg_ids: bool,
    /// Device clock of the first reading, epoch milliseconds (default: now; the demo's: 15
    /// minutes ago, or just after the newest reading already in the lake).
    #[arg(long)]
    start_ms: Option<i64>,
    /// How far each device's clock advances per reading, in milliseconds (default: 1000; the
    /// demo's: 5000, so its windows close and its rules fire within its first minute).
    #[arg(long)]
    reading_interval_ms: Option<i64>,
    /// Faults to plant, with a known answer in the report: `demo` (one of each), `none`, or
    /// a comma-separated list of drift=N (drifting temperature sensors), crash=FW/HW_REV
    /// (a crashing firmware × hardware revision), noisy=MODEL (a noisy but healthy model),
    /// beta=N (a small beta-firmware cohort that crashes). Default: none; the demo's: demo.
    #[arg(long)]
    faults: Option<String>,
    /// Also write the fleet's device registry (device_id,tenant,site,model,hw_rev) as CSV to
    /// this file, for `PUT /v1/reference/devices`.
    #[arg(long, value_name = "FILE")]
    registry: Option<PathBuf>,
}

impl SimArgs {
    /// Defaults differ: `simulate` sends 10,000 clean messages, the demo a steady mixed stream.
    fn to_config(&self, demo: bool) -> Result<SimConfig, String> {
        let (messages, rate, duplicates, malformed, late) = if demo {
            (0, 2000.0, 0.02, 0.01, 0.05)
        } else {
            (10_000, 0.0, 0.0, 0.0, 0.0)
        };
        let profile = self
            .profile
            .as_deref()
            .unwrap_or(if demo { "mixed" } else { "envelope" });
        let profile = Profile::parse(profile).ok_or_else(|| {
            format!("--profile {profile:?}: expected envelope, coldchain, health or mixed")
        })?;
        Ok(SimConfig {
            profile,
            seed: self.seed,
            devices: self.devices.unwrap_or(if demo { 1000 } else { 100 }),
            messages: self.messages.unwrap_or(messages),
            rate: self.rate.unwrap_or(rate),
            duplicates: self.duplicates.unwrap_or(duplicates),
            malformed: self.malformed.unwrap_or(malformed),
            late: self.late.unwrap_or(late),
            subject_prefix: self.subject_prefix.clone(),
            msg_ids: self.msg_ids,
            start_ms: self.start_ms,
            reading_interval_ms: self
                .reading_interval_ms
                .unwrap_or(if demo { 5000 } else { 1000 }),
            // The demo's fleet starts in the past and catches up with the present.
            not_after_now: demo,
            faults: simulate::Faults::parse(self.faults.as_deref().unwrap_or(if demo {
                "demo"
            } else {
                "none"
            }))?,
        })
    }
}

async fn check(paths: &[PathBuf]) -> Result<(), String> {
    use fleetlake_sql::pipeline::{check_files, pipeline_files};
    let files = pipeline_files(paths).map_err(|e| format!("reading {paths:?}: {e}"))?;
    if files.is_empty() {
        return Err(format!("no .sql files in {paths:?}"));
    }
    let reports = check_files(&files).await;
    let mut failed = 0;
    for report in &reports {
        if report.errors.is_empty() {
            let mut parts = Vec::new();
            if let Some(p) = &report.pipeline {
                let tables: Vec<String> = p
                    .tables
                    .iter()
                    .map(|(t, _)| format!("{} ({} expectations)", t.table, t.expectations.len()))
                    .collect();
                parts.push(format!(
                    "pipeline {}: source {} on {} → {}",
                    p.name,
                    p.source.name,
                    p.source.subject,
                    tables.join(", ")
                ));
            }
            let mut declared: Vec<String> =
                report.references.iter().map(|r| r.to_string()).collect();
            declared.extend(
                report
                    .windows
                    .iter()
                    .map(|w| format!("{} (window over {})", w.def.table, w.input)),
            );
            declared.extend(
                report
                    .rules
                    .iter()
                    .map(|r| format!("rule {} (over {})", r.def.name, r.input)),
            );
            if !declared.is_empty() {
                parts.push(format!("declares {}", declared.join(", ")));
            }
            let what = parts.join("; ");
            println!("ok    {}: {what}", report.path.display());
            for line in report.warning_lines() {
                eprintln!("warning {line}");
            }
        } else {
            failed += 1;
            for line in report.error_lines() {
                eprintln!("error {line}");
            }
        }
    }
    if failed > 0 {
        Err(format!("{failed} of {} files do not check", reports.len()))
    } else {
        Ok(())
    }
}

/// Who runs this command, for the audit: `$USER`, else `$LOGNAME`, else the user id's name in
/// `/etc/passwd`, else `uid:<n>` (containers and services often set neither variable).
fn os_user() -> String {
    for var in ["USER", "LOGNAME"] {
        if let Ok(v) = std::env::var(var)
            && !v.trim().is_empty()
        {
            return v.trim().to_string();
        }
    }
    let uid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|v| v.split_whitespace().next().map(str::to_string))
        })
        .unwrap_or_else(|| "?".into());
    std::fs::read_to_string("/etc/passwd")
        .ok()
        .and_then(|p| {
            p.lines().find_map(|l| {
                let mut f = l.split(':');
                let name = f.next()?;
                (f.nth(1)? == uid).then(|| name.to_string())
            })
        })
        .unwrap_or_else(|| format!("uid:{uid}"))
}

/// `fleetlake token …`: works on the tokens file directly; creations and revocations are
/// recorded in final.audit like those made over HTTP (actor `cli:<user>`).
async fn token(
    config: &Config,
    env: Vec<(String, String)>,
    command: &TokenCommand,
) -> Result<(), String> {
    use fleetlake::api::auth::{Principal, Role, TokenLimits, Tokens};
    let tokens = Tokens::open(std::path::Path::new(config.get("auth.tokens_file")))?;
    let by = format!("cli:{}", os_user());
    let actor = Principal {
        id: "-".into(),
        name: by.clone(),
        role: Role::Admin,
        tenants: None,
        limits: config.query_limits(),
    };
    let audit = |action: &'static str, target: String, detail: String| {
        let (actor, lake) = (actor.clone(), config.lake(env.clone()));
        let app_id = config.consumer().to_string();
        async move {
            let lake = Lake::open(&lake).map_err(fleetlake::error::Error::from)?;
            fleetlake::api::audit::Audit::new(lake, &app_id)
                .record(fleetlake::api::audit::Event {
                    principal: &actor,
                    address: None,
                    action,
                    target: &target,
                    detail: &detail,
                })
                .await
        }
    };
    match command {
        TokenCommand::Create {
            name,
            role,
            tenants,
            timeout_s,
            memory_mb,
            max_rows,
            max_concurrent,
            rate_per_minute,
        } => {
            let limits = TokenLimits {
                timeout_s: *timeout_s,
                memory_mb: *memory_mb,
                max_rows: *max_rows,
                max_concurrent: *max_concurrent,
                rate_per_minute: *rate_per_minute,
            };
            let (record, secret) =
                tokens.create(name, Role::parse(role)?, tenants.clone(), &by, limits)?;
            let detail = format!("role {} tenants {:?}", record.role.as_str(), record.tenants);
            if let Err(e) = audit("token.create", record.id.clone(), detail).await {
                let _ = tokens.revoke(&record.id);
                return Err(format!(
                    "recording the new token in final.audit failed, so it was not kept: {e}"
                ));
            }
            eprintln!(
                "created token {} ({}, role {}) in {}; it is shown only now:",
                record.id,
                record.name,
                record.role.as_str(),
                tokens.path().display()
            );
            println!("{secret}");
            Ok(())
        }
        TokenCommand::List => {
            use std::io::Write;
            let list: Vec<_> = tokens.list().iter().map(|r| r.public_json()).collect();
            let text =
                serde_json::to_string_pretty(&serde_json::json!({ "tokens": list })).expect("JSON");
            // A closed pipe (`| head`) is not an error.
            let _ = writeln!(std::io::stdout(), "{text}");
            Ok(())
        }
        TokenCommand::Revoke { id } => {
            let list = tokens.list();
            let Some(found) = list
                .iter()
                .find(|r| &r.id == id)
                .or_else(|| list.iter().find(|r| &r.name == id))
                .cloned()
            else {
                return Err(format!(
                    "no token has the id or name {id:?} in {}",
                    tokens.path().display()
                ));
            };
            // Recorded before it is made, as over HTTP.
            audit("token.revoke", found.id.clone(), found.name.clone())
                .await
                .map_err(|e| {
                    format!("recording the revocation in final.audit failed: {e}; the token is still valid")
                })?;
            match tokens.revoke(&found.id)? {
                Some(r) => {
                    eprintln!("revoked token {} ({})", r.id, r.name);
                    Ok(())
                }
                None => Err(format!("token {id:?} was revoked meanwhile")),
            }
        }
    }
}

fn load_config(cli: &Cli) -> Result<Config, String> {
    let mut overrides = Vec::new();
    for item in &cli.set {
        let (k, v) = item.split_once('=').ok_or_else(|| {
            format!("--set {item:?}: expected KEY=VALUE, e.g. --set nats.stream=TELEMETRY")
        })?;
        overrides.push((k.trim().to_string(), v.trim().to_string()));
    }
    for (flag, key) in [
        (&cli.lake, "lake.location"),
        (&cli.nats, "nats.url"),
        (&cli.listen, "http.listen"),
    ] {
        if let Some(v) = flag {
            overrides.push((key.to_string(), v.clone()));
        }
    }
    Config::load(cli.config.as_deref(), std::env::vars(), &overrides).map_err(|e| e.to_string())
}

/// Stack of each runtime thread. DataFusion plans and evaluates expressions recursively; queries
/// are also bounded before planning (`fleetlake_sql::query::check_size`), and this leaves room
/// for what stays under those bounds in a debug build.
const THREAD_STACK_BYTES: usize = 16 * 1024 * 1024;

fn main() -> ExitCode {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_stack_size(THREAD_STACK_BYTES)
        .build()
        .expect("starting the async runtime");
    runtime.block_on(async_main())
}

async fn async_main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FLEETLAKE_LOG").unwrap_or_else(|_| {
                // delta-rs warns on every commit that it keeps no statistics for binary
                // columns (the raw payload): expected, so not shown by default.
                tracing_subscriber::EnvFilter::new(
                    "warn,fleetlake=info,deltalake_core::writer::stats=error",
                )
            }),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<(), String> {
    let config = load_config(&cli)?;
    let env: Vec<(String, String)> = std::env::vars().collect();
    match &cli.command {
        Command::Config => {
            print!("{}", config.describe());
            Ok(())
        }
        Command::Token(command) => token(&config, env, command).await,
        Command::Check { paths } => check(paths).await,
        Command::Replay { pipeline, from, to } => {
            let from = from
                .as_deref()
                .map(fleetlake::ingest::replay::parse_time)
                .transpose()
                .map_err(|e| e.to_string())?;
            let to = to
                .as_deref()
                .map(fleetlake::ingest::replay::parse_time)
                .transpose()
                .map_err(|e| e.to_string())?;
            let lake = Lake::open(&config.lake(env)).map_err(|e| e.to_string())?;
            // No maintenance may rewrite the tables while they are replaced (delta-rs would let
            // a compaction and the replacement both commit, keeping rows twice).
            let lease = match fleetlake::ingest::source::connect_with(&config.nats()).await {
                Ok(js) => Some(
                    fleetlake::maintenance::Lease::acquire(
                        &js,
                        config.maintenance_lease_bucket(),
                        config.maintenance_lease_ttl(),
                    )
                    .await
                    .map_err(|e| format!("cannot replay while maintenance runs: {e}"))?
                    .keep_alive(),
                ),
                Err(e) => {
                    eprintln!(
                        "warning: NATS unreachable ({e}): replaying without the maintenance lease"
                    );
                    None
                }
            };
            let report =
                fleetlake::ingest::replay::run(&config, lake, pipeline, from, to, true).await;
            if let Some(lease) = lease {
                lease.release().await;
            }
            let report = report.map_err(|e| e.to_string())?;
            println!(
                "{}",
                serde_json::to_string(&report).expect("report serializes")
            );
            Ok(())
        }
        Command::Maintain {
            dry_run,
            tables,
            without_lease,
        } => maintain(&config, env, *dry_run, tables, *without_lease).await,
        Command::Serve => {
            let engine = Engine::start(config, env, true)
                .await
                .map_err(|e| e.to_string())?;
            let failed = tokio::select! {
                _ = shutdown_signal() => None,
                reason = engine.ingest_failed() => Some(reason),
            };
            match failed {
                None => {
                    eprintln!("stopping: committing what is in flight…");
                    engine
                        .shutdown()
                        .await
                        .map_err(|reason| format!("stopped with work unfinished: {reason}"))
                }
                Some(reason) => {
                    // Exiting non-zero lets a supervisor restart the engine; what was not
                    // acknowledged is redelivered then.
                    let _ = engine.shutdown().await;
                    let reason = reason.strip_prefix("ingest stopped: ").unwrap_or(&reason);
                    Err(format!("ingest stopped: {reason}"))
                }
            }
        }
        Command::Simulate(args) => {
            let sim = args.to_config(false)?;
            sim.validate()?;
            if let Some(path) = &args.registry {
                let csv = simulate::Simulator::new(sim.clone()).registry_csv();
                std::fs::write(path, csv)
                    .map_err(|e| format!("writing the registry to {}: {e}", path.display()))?;
                eprintln!("· device registry written to {}", path.display());
            }
            let js = fleetlake::ingest::source::connect_with(&config.nats())
                .await
                .map_err(|e| e.to_string())?;
            fleetlake::ingest::source::ensure_stream(&js, &config)
                .await
                .map_err(|e| e.to_string())?;
            let cancel = CancellationToken::new();
            let on_signal = cancel.clone();
            tokio::spawn(async move {
                shutdown_signal().await;
                on_signal.cancel();
            });
            let report = simulate::publish(&js, sim, cancel, |r| {
                eprintln!(
                    "  sent {} ({:.0}/s)",
                    r.total,
                    r.total as f64 / r.elapsed_s.max(1e-9)
                );
            })
            .await?;
            println!(
                "{}",
                serde_json::to_string(&report).expect("report serializes")
            );
            Ok(())
        }
        Command::Demo {
            sim,
            exit_when_done,
        } => {
            let sim = sim.to_config(true)?;
            sim.validate()?;
            if *exit_when_done && sim.messages == 0 {
                return Err("--exit-when-done needs --messages N".into());
            }
            demo::run(
                config,
                env,
                DemoOptions {
                    sim,
                    exit_when_done: *exit_when_done,
                },
            )
            .await
            .map_err(String::from)
        }
        Command::Query { sql, format } => {
            let lake = Lake::open(&config.lake(env)).map_err(|e| e.to_string())?;
            let result = QueryEngine::new(lake)
                .query(sql)
                .await
                .map_err(|e| format!("{} ({})", e, e.code()))?;
            let out = match format {
                OutputFormat::Table => format::to_table(&result).map_err(|e| e.to_string())?,
                OutputFormat::Json => {
                    String::from_utf8(Format::Json.encode(&result).map_err(|e| e.to_string())?)
                        .expect("JSON is UTF-8")
                }
                OutputFormat::Csv => String::from_utf8_lossy(
                    &Format::Csv.encode(&result).map_err(|e| e.to_string())?,
                )
                .into_owned(),
                OutputFormat::Ndjson => String::from_utf8_lossy(
                    &Format::NdJson.encode(&result).map_err(|e| e.to_string())?,
                )
                .into_owned(),
            };
            println!("{}", out.trim_end());
            Ok(())
        }
    }
}

/// `fleetlake maintain`: every table (or the ones named) once, with a progress bar, under the
/// lease unless told otherwise; the JSON summary on stdout. Fails when a table failed.
async fn maintain(
    config: &Config,
    env: Vec<(String, String)>,
    dry_run: bool,
    tables: &[String],
    without_lease: bool,
) -> Result<(), String> {
    use fleetlake::maintenance;
    let lake = Lake::open(&config.lake(env)).map_err(|e| e.to_string())?;
    let ids = if tables.is_empty() {
        lake.all_tables().await.map_err(|e| e.to_string())?
    } else {
        let mut ids = Vec::new();
        for t in tables {
            let id = fleetlake_zones::TableId::parse(t).map_err(|e| e.to_string())?;
            if lake.load(&id).await.map_err(|e| e.to_string())?.is_none() {
                return Err(format!(
                    "--table {t}: no such table in the lake at {}",
                    lake.root()
                ));
            }
            ids.push(id);
        }
        ids
    };
    if !without_lease
        && !dry_run
        && config.vacuum_retention() < std::time::Duration::from_secs(3600)
    {
        return Err(format!(
            "maintenance.vacuum_retention_hours is {}: with an engine running on the lake, vacuum could delete the files of a commit still being written; use at least 1, or --without-lease when no engine runs",
            config.vacuum_retention().as_secs() / 3600
        ));
    }
    let mut lease = if without_lease || dry_run {
        None
    } else {
        let js = fleetlake::ingest::source::connect_with(&config.nats())
            .await
            .map_err(|e| {
                format!("{e}: the maintenance lease lives in NATS (use --without-lease only when no engine runs on this lake)")
            })?;
        Some(
            maintenance::Lease::acquire(
                &js,
                config.maintenance_lease_bucket(),
                config.maintenance_lease_ttl(),
            )
            .await
            .map_err(|e| e.to_string())?,
        )
    };
    let n = ids.len();
    let summary = maintenance::run(
        &lake,
        config,
        &ids,
        maintenance::RunOptions {
            dry_run,
            full_vacuum: true,
            grace: std::time::Duration::ZERO,
        },
        None,
        lease.as_mut(),
        |i, id| {
            fleetlake::progress::bar(i as f64 / n.max(1) as f64, &format!("{id} ({}/{n})", i + 1))
        },
        &CancellationToken::new(),
    )
    .await;
    fleetlake::progress::bar(1.0, &format!("{n} tables"));
    eprintln!();
    if let Some(lease) = lease {
        lease.release().await;
    }
    println!(
        "{}",
        serde_json::to_string_pretty(&summary).expect("summary serializes")
    );
    if let Some(reason) = &summary.interrupted {
        return Err(format!(
            "maintenance stopped before the last table: {reason}"
        ));
    }
    match summary.failed {
        0 => Ok(()),
        n => Err(format!(
            "maintenance failed for {n} table(s); see \"error\" above"
        )),
    }
}
