//! Configuration: built-in defaults, then a TOML file, then `FLEETLAKE_*` environment variables,
//! then command-line flags (`--set key=value` and the named flags).
//!
//! Every key is listed in [`KEYS`] with its default and meaning; `fleetlake config` prints them.
//! Unknown keys and unparsable values are errors that name the key and what was expected.

mod keys;
mod maintenance;
pub mod nats;
pub mod partition;
mod query;
mod redact;

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use fleetlake_sql::DedupKey;
use fleetlake_zones::LakeConfig;

pub use keys::{Check, KEYS, Key};
pub use query::{FleetDefaults, Limits};

/// The resolved configuration. `Debug` shows secrets as `<redacted>` ([`redacted`]).
#[derive(Clone)]
pub struct Config {
    values: HashMap<&'static str, String>,
    /// The partition a partition's ingest runs for ([`Config::for_partition`]); `None` for the
    /// instance (and for an instance without partitions).
    partition: Option<partition::Partition>,
    /// The durable consumer's name when it is not `nats.consumer` (a partition's, per lease).
    durable: Option<String>,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut map = f.debug_map();
        for key in KEYS {
            map.entry(&key.name, &redacted(key.name, self.get(key.name)));
        }
        map.finish()
    }
}

/// A configuration mistake: which key, what was wrong, what was expected.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("unknown configuration key {key:?} (from {origin}); {hint}")]
    UnknownKey {
        key: String,
        origin: String,
        /// A did-you-mean, or the keys of the same section.
        hint: String,
    },
    #[error("configuration key {key} = {value:?} (from {origin}): expected {expected}")]
    BadValue {
        key: &'static str,
        value: String,
        origin: String,
        expected: &'static str,
    },
    #[error("reading configuration file {path}: {reason}")]
    File { path: String, reason: String },
}

impl Default for Config {
    fn default() -> Self {
        Self {
            values: KEYS
                .iter()
                .map(|k| (k.name, k.default.to_string()))
                .collect(),
            partition: None,
            durable: None,
        }
    }
}

/// The built-in default of a key (empty for an unknown key).
pub fn default_of(key: &str) -> &'static str {
    KEYS.iter()
        .find(|k| k.name == key)
        .map_or("", |k| k.default)
}

/// What to say about an unknown key: the closest known key when one is near (Jaro-Winkler
/// similarity of at least 0.85, as `strsim` computes it), else the keys of the same section, else
/// where the list is.
fn hint(unknown: &str) -> String {
    let closest = KEYS
        .iter()
        .map(|k| (strsim::jaro_winkler(unknown, k.name), k.name))
        .max_by(|a, b| a.0.total_cmp(&b.0));
    if let Some((score, name)) = closest
        && score >= 0.85
    {
        return format!("did you mean \"{name}\"? (`fleetlake config` lists every key)");
    }
    let section = unknown.split('.').next().unwrap_or_default();
    let same: Vec<&str> = KEYS
        .iter()
        .map(|k| k.name)
        .filter(|n| n.split('.').next() == Some(section))
        .collect();
    if same.is_empty() {
        "`fleetlake config` lists every key".to_string()
    } else {
        format!("the {section} keys are {}", same.join(", "))
    }
}

/// `FLEETLAKE_*` environment variables that are not configuration keys: the configuration
/// file's path, the log filter, the demo's NATS server binary, and the token clients send
/// (`export FLEETLAKE_TOKEN=…`, as the demo prints it).
const NOT_KEYS: [&str; 4] = ["CONFIG", "LOG", "NATS_SERVER", "TOKEN"];

impl Config {
    /// Defaults → `file` (if given) → `FLEETLAKE_*` from `env` → `overrides` (flags).
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        overrides: &[(String, String)],
    ) -> Result<Self, ConfigError> {
        let mut config = Config::default();
        if let Some(path) = file {
            config.apply_toml_file(path)?;
        }
        for (name, value) in env {
            let Some(rest) = name.strip_prefix("FLEETLAKE_") else {
                continue;
            };
            if NOT_KEYS.contains(&rest) {
                continue;
            }
            let key = env_to_key(rest);
            config.set(&key, &value, &format!("environment variable {name}"))?;
        }
        for (key, value) in overrides {
            config.set(key, value, "command line")?;
        }
        config.validate()?;
        Ok(config)
    }

    fn apply_toml_file(&mut self, path: &Path) -> Result<(), ConfigError> {
        let file_error = |reason: String| ConfigError::File {
            path: path.display().to_string(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| file_error(e.to_string()))?;
        // toml's message quotes the offending line, which may hold a secret: only where and
        // what kind of mistake.
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            let line = e
                .span()
                .map(|s| text[..s.start.min(text.len())].lines().count().max(1));
            file_error(match line {
                Some(line) => format!("not valid TOML at line {line}: {}", e.message()),
                None => format!("not valid TOML: {}", e.message()),
            })
        })?;
        let origin = path.display().to_string();
        for (section, body) in &table {
            let toml::Value::Table(body) = body else {
                return Err(ConfigError::UnknownKey {
                    key: section.clone(),
                    origin,
                    hint: hint(section),
                });
            };
            for (name, value) in body {
                let text = match value {
                    toml::Value::String(s) => s.clone(),
                    toml::Value::Array(items) => items
                        .iter()
                        .map(|v| {
                            v.as_str()
                                .map(str::to_string)
                                .unwrap_or_else(|| v.to_string())
                        })
                        .collect::<Vec<_>>()
                        .join(","),
                    other => other.to_string(),
                };
                self.set(&format!("{section}.{name}"), &text, &origin)?;
            }
        }
        Ok(())
    }

    /// Sets one key, refusing unknown keys.
    pub fn set(&mut self, key: &str, value: &str, origin: &str) -> Result<(), ConfigError> {
        let Some(known) = KEYS.iter().find(|k| k.name == key) else {
            return Err(ConfigError::UnknownKey {
                key: key.to_string(),
                origin: origin.to_string(),
                hint: hint(key),
            });
        };
        self.values.insert(known.name, value.to_string());
        // Check the type now so the error names where the value came from.
        self.check(known.name, origin)
    }

    fn check(&self, key: &'static str, origin: &str) -> Result<(), ConfigError> {
        let value = self.get(key);
        let bad = |expected| ConfigError::BadValue {
            key,
            value: redacted(key, value),
            origin: origin.to_string(),
            expected,
        };
        let is_name = |v: &str| {
            v.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        };
        let check = KEYS
            .iter()
            .find(|k| k.name == key)
            .map_or(Check::Any, |k| k.check);
        let ok = match check {
            Check::Any => return Ok(()),
            Check::Positive => matches!(value.parse::<u64>(), Ok(n) if n > 0),
            Check::Whole => value.parse::<u64>().is_ok(),
            Check::Range(lo, hi, _) => {
                matches!(value.parse::<u64>(), Ok(n) if (lo..=hi).contains(&n))
            }
            Check::Bool => value.parse::<bool>().is_ok(),
            Check::OneOf(words, _) => words.contains(&value),
            Check::Name { empty_ok } => (empty_ok || !value.is_empty()) && is_name(value),
            Check::NonEmpty(_) => !value.trim().is_empty(),
            Check::Table => fleetlake_zones::TableId::parse(value).is_ok(),
            Check::Tables => self
                .list(key)
                .iter()
                .all(|t| fleetlake_zones::TableId::parse(t).is_ok()),
            Check::TableDays => self.table_retention().is_some(),
            Check::SocketAddr => value.parse::<std::net::SocketAddr>().is_ok(),
            Check::HttpUrl => {
                value.is_empty()
                    || url::Url::parse(value)
                        .is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.has_host())
            }
            Check::NkeySeed => value.is_empty() || value.starts_with('S'),
            // A certificate and its key come together; checked once every layer is applied.
            Check::TlsPair => {
                let section = key.split('.').next().unwrap_or_default();
                let cert = self.get(&format!("{section}.tls_cert"));
                let tls_key = self.get(&format!("{section}.tls_key"));
                cert.is_empty() == tls_key.is_empty() || origin != "configuration"
            }
            Check::Subjects => !self.subjects().is_empty(),
        };
        if ok {
            return Ok(());
        }
        Err(bad(match check {
            Check::Any => unreachable!("always accepted"),
            Check::Positive => "a positive integer",
            Check::Whole => "a whole number (0 or more)",
            Check::Range(_, _, what) | Check::OneOf(_, what) | Check::NonEmpty(what) => what,
            Check::Bool => "true or false",
            Check::Name { empty_ok: true } => "a name of letters, digits, '_' or '-' (or empty)",
            Check::Name { empty_ok: false } => "a name of letters, digits, '_' or '-'",
            Check::Table => "a table such as usable.cold_chain",
            Check::Tables => "comma-separated tables such as reference.firmware",
            Check::TableDays => "zone.table=days, comma-separated (raw.quarantine=365)",
            Check::SocketAddr => "an address such as 127.0.0.1:8080",
            Check::HttpUrl => "an http(s) URL such as http://127.0.0.1:9093, or empty for none",
            Check::NkeySeed => "an NKey seed, starting with S (SU… for a user)",
            Check::TlsPair if key.starts_with("nats.") => {
                "nats.tls_cert and nats.tls_key both set (mutual TLS) or both empty"
            }
            Check::TlsPair => "http.tls_cert and http.tls_key both set (HTTPS) or both empty",
            Check::Subjects => "one or more comma-separated subjects",
        }))
    }

    fn validate(&self) -> Result<(), ConfigError> {
        for key in KEYS {
            self.check(key.name, "configuration")?;
        }
        Ok(())
    }

    pub fn get(&self, key: &str) -> &str {
        self.values.get(key).map(String::as_str).unwrap_or("")
    }

    fn number(&self, key: &str) -> u64 {
        self.get(key).parse().expect("validated")
    }

    pub fn nats_url(&self) -> &str {
        self.get("nats.url")
    }

    /// How to reach NATS: URL, credentials and TLS.
    pub fn nats(&self) -> nats::NatsConnection {
        let opt = |key: &str| Some(self.get(key).to_string()).filter(|v| !v.is_empty());
        nats::NatsConnection {
            url: self.nats_url().to_string(),
            user: opt("nats.user"),
            password: opt("nats.password"),
            token: opt("nats.token"),
            nkey_seed: opt("nats.nkey_seed"),
            creds_file: opt("nats.creds_file").map(Into::into),
            tls_ca: opt("nats.tls_ca").map(Into::into),
            tls_cert: opt("nats.tls_cert").map(Into::into),
            tls_key: opt("nats.tls_key").map(Into::into),
            tls_required: self.get("nats.tls_required") == "true",
        }
    }
    pub fn stream(&self) -> &str {
        self.get("nats.stream")
    }
    pub fn consumer(&self) -> &str {
        self.get("nats.consumer")
    }
    /// `nats.replicas`: the stream's replicas when fleetlake creates it.
    pub fn replicas(&self) -> usize {
        self.number("nats.replicas") as usize
    }
    /// `cluster.partitions`: 0 without partitions.
    pub fn partitions(&self) -> u32 {
        self.number("cluster.partitions") as u32
    }
    /// The partition this configuration's ingest consumes, when it is one partition's.
    pub fn partition(&self) -> Option<partition::Partition> {
        self.partition
    }
    /// The configuration of partition `index`'s ingest under the lease taken at revision
    /// `lease`: its Delta txn application id (and the kind of its state snapshots) is
    /// `<nats.consumer>-p<index>`, its durable consumer `<nats.consumer>-p<index>-<lease>` (one
    /// per owner: see `ingest::source::Source::open`).
    pub fn for_partition(&self, index: u32, lease: u64) -> Config {
        let mut config = self.clone();
        let app_id = format!("{}-p{index}", self.consumer());
        config.durable = Some(format!("{app_id}-{lease}"));
        config.set_consumer(&app_id);
        config.partition = Some(partition::Partition {
            index,
            count: self.partitions(),
        });
        config
    }
    /// The durable consumer's name: `nats.consumer`, or a partition owner's own.
    pub fn durable_name(&self) -> String {
        self.durable
            .clone()
            .unwrap_or_else(|| self.consumer().to_string())
    }
    /// Another consumer name (and Delta txn application id) for a stage of this instance.
    pub fn set_consumer(&mut self, name: &str) {
        self.values.insert("nats.consumer", name.to_string());
    }
    /// `cluster.instance`, or the host name and process id when it is empty.
    pub fn instance_id(&self) -> String {
        match self.get("cluster.instance") {
            "" => format!(
                "{}-{}",
                std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".into()),
                std::process::id()
            ),
            id => id.to_string(),
        }
    }
    pub fn cluster_lease_bucket(&self) -> &str {
        self.get("cluster.lease_bucket")
    }
    pub fn cluster_lease_ttl(&self) -> Duration {
        Duration::from_secs(self.number("cluster.lease_ttl_s"))
    }
    /// `cluster.fleet_wide = skip`.
    pub fn skip_fleet_wide(&self) -> bool {
        self.get("cluster.fleet_wide") == "skip"
    }
    pub fn subjects(&self) -> Vec<String> {
        self.list("nats.subjects")
    }
    pub fn fetch_batch(&self) -> usize {
        self.number("ingest.fetch_batch") as usize
    }
    pub fn commit_rows(&self) -> usize {
        self.number("ingest.commit_rows") as usize
    }
    pub fn commit_interval(&self) -> Duration {
        Duration::from_millis(self.number("ingest.commit_interval_ms"))
    }
    /// How long a shutdown keeps retrying the commits of in-flight messages.
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.number("ingest.shutdown_grace_s"))
    }
    pub fn ack_wait(&self) -> Duration {
        Duration::from_secs(self.number("ingest.ack_wait_s"))
    }
    pub fn dedup_key(&self) -> DedupKey {
        DedupKey::parse(self.get("dedup.key")).expect("validated")
    }
    pub fn dedup_max_gaps(&self) -> usize {
        self.number("dedup.max_gaps") as usize
    }
    pub fn dedup_window_minutes(&self) -> i64 {
        self.number("dedup.window_minutes") as i64
    }
    pub fn alerts_stream(&self) -> &str {
        self.get("alerts.stream")
    }
    pub fn alerts_duplicate_window(&self) -> Duration {
        Duration::from_secs(self.number("alerts.duplicate_window_s"))
    }
    /// The longest gap between two observations of the stream that silence rules count (µs):
    /// `alerts.silence_max_gap_s`, and at least twice the commit interval (idle ingest observes
    /// once per commit interval).
    pub fn silence_max_gap_us(&self) -> i64 {
        let configured = self
            .number("alerts.silence_max_gap_s")
            .saturating_mul(1_000_000);
        let idle = self
            .number("ingest.commit_interval_ms")
            .saturating_mul(2_000);
        configured.max(idle) as i64
    }
    /// The Alertmanager to push alert transitions to, if any.
    pub fn alertmanager_url(&self) -> Option<&str> {
        Some(self.get("alerts.alertmanager_url").trim_end_matches('/')).filter(|u| !u.is_empty())
    }
    pub fn alertmanager_resend(&self) -> Duration {
        Duration::from_secs(self.number("alerts.alertmanager_resend_s"))
    }
    pub fn dedup_snapshot_interval(&self) -> Duration {
        Duration::from_secs(self.number("dedup.snapshot_interval_s"))
    }
    /// The pipeline folder, and whether it was configured explicitly (a missing default folder
    /// just means no pipelines).
    pub fn pipelines_dir(&self) -> Option<(std::path::PathBuf, bool)> {
        let dir = self.get("pipelines.dir");
        (!dir.is_empty()).then(|| (std::path::PathBuf::from(dir), dir != "pipelines"))
    }
    /// Whether `serve` maintains the tables on a schedule.
    pub fn maintenance_enabled(&self) -> bool {
        self.get("maintenance.enabled").parse().expect("validated")
    }
    pub fn maintenance_interval(&self) -> Duration {
        Duration::from_secs(self.number("maintenance.interval_s"))
    }
    /// A comma-separated key as a list (empty items dropped).
    pub fn list(&self, key: &str) -> Vec<String> {
        self.get(key)
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect()
    }
    pub fn listen(&self) -> std::net::SocketAddr {
        self.get("http.listen").parse().expect("validated")
    }

    /// The lake location and object-store options: `AWS_*` variables from `env`, overridden by
    /// the `lake.*` keys.
    pub fn lake(&self, env: impl IntoIterator<Item = (String, String)>) -> LakeConfig {
        let mut options: HashMap<String, String> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("AWS_"))
            .collect();
        if !self.get("lake.endpoint").is_empty() {
            options.insert("AWS_ENDPOINT_URL".into(), self.get("lake.endpoint").into());
        }
        if !self.get("lake.region").is_empty() {
            options.insert("AWS_REGION".into(), self.get("lake.region").into());
        }
        options
            .entry("AWS_REGION".into())
            .or_insert_with(|| "us-east-1".into());
        if self.get("lake.allow_http") == "true" {
            options.insert("AWS_ALLOW_HTTP".into(), "true".into());
        }
        if options.contains_key("AWS_ENDPOINT_URL") {
            // S3-compatible servers (SeaweedFS, MinIO) address buckets by path.
            options
                .entry("AWS_VIRTUAL_HOSTED_STYLE_REQUEST".into())
                .or_insert_with(|| "false".into());
        }
        LakeConfig {
            location: self.get("lake.location").to_string(),
            storage_options: options,
        }
    }

    /// `fleetlake config`: every key, its value and where the default differs.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        for key in KEYS {
            let value = redacted(key.name, self.get(key.name));
            let env = format!("FLEETLAKE_{}", key.name.to_uppercase().replace('.', "_"));
            out.push_str(&format!(
                "{:<28} = {:<24} # {} (default {:?}; env {})\n",
                key.name,
                format!("{value:?}"),
                key.help,
                key.default,
                env
            ));
        }
        out
    }
}

pub use redact::{SECRET_KEYS, redact_url, redacted};

/// `LAKE_LOCATION` → `lake.location`: the first `_` separates section and name.
fn env_to_key(rest: &str) -> String {
    let lower = rest.to_lowercase();
    match lower.split_once('_') {
        Some((section, name)) => format!("{section}.{name}"),
        None => lower,
    }
}

#[cfg(test)]
mod tests;
