//! `fleetlake simulate`: a deterministic (seeded) fleet that publishes telemetry to JetStream.
//!
//! The same seed gives the same sequence of payloads (timestamps follow `start_ms`). Shares of
//! duplicate replays, malformed payloads and late readings are exact: message `i` is malformed
//! when `floor((i+1)·share)` steps past `floor(i·share)`, so 20,000 messages at 1% carry exactly
//! 200 malformed ones. The report says exactly what was sent.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::error::Error;

mod messages;
mod publish;

pub use publish::publish;

/// Which kind of telemetry the fleet sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// The default envelope (`<prefix>.<device>`), read by the built-in decoder.
    Envelope,
    /// Refrigerated trailers (`<prefix>.coldchain.<device>`), read by `pipelines/cold_chain.sql`;
    /// firmware 1.x reports `temp_f`, 2.x `temp_c`.
    ColdChain,
    /// Device health (`<prefix>.health.<device>`), read by `pipelines/device_health.sql`;
    /// firmware 1.x reports `mem_kb`, 2.x `mem_mb`.
    Health,
    /// Each device one of the three (by device number).
    Mixed,
}

impl Profile {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "envelope" => Some(Self::Envelope),
            "coldchain" => Some(Self::ColdChain),
            "health" => Some(Self::Health),
            "mixed" => Some(Self::Mixed),
            _ => None,
        }
    }

    fn of_device(self, d: u64) -> Self {
        match (self, d % 3) {
            (Self::Mixed, 0) => Self::Envelope,
            (Self::Mixed, 1) => Self::ColdChain,
            (Self::Mixed, _) => Self::Health,
            (p, _) => p,
        }
    }

    fn subject(self, prefix: &str, id: &str) -> String {
        match self {
            Self::ColdChain => format!("{prefix}.coldchain.{id}"),
            Self::Health => format!("{prefix}.health.{id}"),
            _ => format!("{prefix}.{id}"),
        }
    }
}

/// What to simulate.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub profile: Profile,
    pub seed: u64,
    pub devices: u64,
    /// Messages to send; 0 = until cancelled.
    pub messages: u64,
    /// Messages per second; 0 = as fast as the server acknowledges.
    pub rate: f64,
    pub duplicates: f64,
    pub malformed: f64,
    pub late: f64,
    /// Subjects are `<prefix>.<device_id>`.
    pub subject_prefix: String,
    /// Set `Nats-Msg-Id` to `<device_id>-<seq>`, so JetStream drops replays within its duplicate
    /// window. Otherwise every publish carries its own id (`sim-<seed>-<n>`), so a publish that
    /// is retried after a lost acknowledgement is stored once.
    pub msg_ids: bool,
    /// Device clock at the first message, epoch milliseconds; `None` = now.
    pub start_ms: Option<i64>,
    /// How far a device's clock advances per reading, milliseconds (default 1,000).
    pub reading_interval_ms: i64,
    /// Never stamp a reading later than the wall clock: a fleet started in the past catches up
    /// with the present, then reports at the pace of real time (the demo's history).
    pub not_after_now: bool,
    /// Faults planted in the fleet, with a known answer in the report.
    pub faults: Faults,
}

/// Faults planted in the fleet (`fleetlake simulate --faults …`), each with a known answer
/// ([`Planted`]) so that anomaly queries can be scored.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Faults {
    /// How many devices have a temperature sensor that drifts upward: +3 °C a reading, up to
    /// +20 °C (cold-chain devices outside the noisy model, evenly spread; envelope devices in an
    /// envelope-only fleet).
    pub drift: u64,
    /// A firmware × hardware revision whose health reports crash at 4% a report (the fleet: 0.5%).
    pub crash: Option<(String, String)>,
    /// A model whose temperature readings are noisy (uniform ±15 °C a reading) but right on
    /// average: unusual for the fleet, normal for its cohort.
    pub noisy_model: Option<String>,
    /// How many health devices run the beta firmware `2.2.0-beta`, crashing at 10% a report: a
    /// small cohort with a handful of events, which must not outrank a large failing cohort.
    pub beta: u64,
}

/// The firmware of the beta devices ([`Faults::beta`]).
pub const BETA_FIRMWARE: &str = "2.2.0-beta";

impl Faults {
    /// One of each, as the demo plants: 20 drifting sensors, crashes on firmware 2.0.1 ×
    /// rev-B, a noisy RT-300 model and 3 beta devices.
    pub fn demo() -> Self {
        Self {
            drift: 20,
            crash: Some(("2.0.1".into(), "rev-B".into())),
            noisy_model: Some("RT-300".into()),
            beta: 3,
        }
    }

    /// Parses `demo`, `none` or a comma-separated list of `drift=N`, `crash=FW/HW_REV`,
    /// `noisy=MODEL` and `beta=N`; an error names the part that is wrong and what was expected.
    pub fn parse(spec: &str) -> Result<Self, Error> {
        match spec.trim() {
            "demo" => return Ok(Self::demo()),
            "none" | "" => return Ok(Self::default()),
            _ => {}
        }
        let mut faults = Self::default();
        for part in spec.split(',').map(str::trim) {
            let (key, value) = part.split_once('=').ok_or_else(|| {
                Error::Invalid(format!("--faults: {part:?} is not key=value (expected drift=N, crash=FW/HW_REV, noisy=MODEL, beta=N, or demo)"))
            })?;
            let count = |v: &str| {
                v.parse::<u64>().map_err(|_| {
                    Error::Invalid(format!("--faults: {key}={v}: expected a number of devices"))
                })
            };
            match key {
                "drift" => faults.drift = count(value)?,
                "beta" => faults.beta = count(value)?,
                "noisy" if !value.is_empty() => faults.noisy_model = Some(value.into()),
                "crash" => {
                    let (fw, hw) = value
                        .split_once('/')
                        .filter(|(f, h)| !f.is_empty() && !h.is_empty())
                        .ok_or_else(|| {
                            Error::Invalid(format!("--faults: crash={value}: expected FIRMWARE/HW_REV, e.g. crash=2.0.1/rev-B"))
                        })?;
                    faults.crash = Some((fw.into(), hw.into()));
                }
                _ => {
                    return Err(Error::Invalid(format!(
                        "--faults: unknown fault {part:?} (expected drift=N, crash=FW/HW_REV, noisy=MODEL, beta=N, or demo)"
                    )));
                }
            }
        }
        Ok(faults)
    }

    fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// What the planted faults are, to score answers against.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Planted {
    /// The devices whose temperature drifts.
    pub drifting: Vec<String>,
    /// The crashing firmware × hardware revision, as `{"fw", "hw_rev"}`.
    pub crash_cohort: Option<serde_json::Value>,
    pub noisy_model: Option<String>,
    /// The devices on the beta firmware.
    pub beta_devices: Vec<String>,
}

/// Who a simulated device is: the columns of `reference.devices`, and its firmware.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    pub device_id: String,
    pub tenant: &'static str,
    pub site: String,
    pub model: &'static str,
    pub hw_rev: &'static str,
    pub fw: &'static str,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            profile: Profile::Envelope,
            seed: 42,
            devices: 100,
            messages: 10_000,
            rate: 0.0,
            duplicates: 0.0,
            malformed: 0.0,
            late: 0.0,
            subject_prefix: "telemetry".into(),
            msg_ids: false,
            start_ms: None,
            reading_interval_ms: 1000,
            not_after_now: false,
            faults: Faults::default(),
        }
    }
}

impl SimConfig {
    /// Checks shares and counts, naming the bad option.
    pub fn validate(&self) -> Result<(), Error> {
        for (name, v) in [
            ("duplicates", self.duplicates),
            ("malformed", self.malformed),
            ("late", self.late),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return Err(Error::Invalid(format!(
                    "--{name} is {v}: expected a share between 0 and 1"
                )));
            }
        }
        if self.duplicates + self.malformed > 1.0 {
            return Err(Error::Invalid(
                "--duplicates plus --malformed must not exceed 1".into(),
            ));
        }
        if self.devices == 0 {
            return Err(Error::Invalid("--devices must be at least 1".into()));
        }
        if !(1..=86_400_000).contains(&self.reading_interval_ms) {
            return Err(Error::Invalid(format!(
                "--reading-interval-ms is {}: expected milliseconds between 1 and 86400000 (a day)",
                self.reading_interval_ms
            )));
        }
        if !(self.rate >= 0.0 && self.rate.is_finite()) {
            return Err(Error::Invalid(format!(
                "--rate is {}: expected messages per second >= 0",
                self.rate
            )));
        }
        Ok(())
    }
}

/// What one simulated message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Good,
    Duplicate,
    Malformed,
}

/// One message to publish.
#[derive(Debug, Clone)]
pub struct SimMessage {
    pub subject: String,
    pub payload: Vec<u8>,
    pub msg_id: Option<String>,
    pub kind: Kind,
    pub late: bool,
}

/// What was sent, printed as JSON.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Report {
    pub seed: u64,
    pub devices: u64,
    /// Messages published.
    pub total: u64,
    /// Distinct well-formed readings (one per device and sequence number).
    pub distinct: u64,
    /// Exact replays of earlier well-formed readings.
    pub duplicates: u64,
    pub malformed: u64,
    /// Well-formed readings whose device timestamp lags behind (out of order).
    pub late: u64,
    /// Publishes JetStream itself reported as duplicates (only with message ids).
    pub stream_duplicates: u64,
    pub elapsed_s: f64,
    pub rate: f64,
    /// The planted faults, when there are any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub planted: Option<Planted>,
}

/// SplitMix64: small, fast and good enough for simulation; deterministic across platforms.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

struct Device {
    seq: u64,
    temperature: f64,
    humidity: f64,
    battery: f64,
    lat: f64,
    lon: f64,
    uptime_s: u64,
    /// Planted faults ([`Faults`]).
    drifting: bool,
    beta: bool,
}

/// The deterministic message generator.
///
/// Message `i` is malformed when `floor((i+1)·malformed)` steps past `floor(i·malformed)`;
/// duplicates follow the same rule shifted by half a step.
pub struct Simulator {
    config: SimConfig,
    rng: Rng,
    devices: Vec<Device>,
    recent: VecDeque<SimMessage>,
    index: u64,
    duplicates_sent: u64,
    start_ms: i64,
}

const RECENT: usize = 10_000;
const FIRMWARE: [&str; 4] = ["1.8.2", "1.9.0", "2.0.1", "2.1.0-rc1"];
const HARDWARE: [&str; 3] = ["rev-A", "rev-B", "rev-C"];
const MODELS: [&str; 3] = ["RT-100", "RT-200", "RT-300"];
const TENANTS: [&str; 2] = ["acme", "globex"];

/// True when the `i`-th message (0-based) falls in an exact share.
fn in_share(i: u64, share: f64) -> bool {
    ((i + 1) as f64 * share).floor() > (i as f64 * share).floor()
}

impl Simulator {
    pub fn new(config: SimConfig) -> Self {
        let mut rng = Rng(config.seed);
        let devices = (0..config.devices)
            .map(|_| Device {
                seq: 0,
                temperature: 2.0 + rng.unit() * 6.0,
                humidity: 30.0 + rng.unit() * 40.0,
                battery: 60.0 + rng.unit() * 40.0,
                lat: 45.0 + rng.unit() * 10.0,
                lon: 2.0 + rng.unit() * 15.0,
                uptime_s: rng.below(86_400),
                drifting: false,
                beta: false,
            })
            .collect();
        let start_ms = config
            .start_ms
            .unwrap_or_else(|| chrono::Utc::now().timestamp_millis());
        let mut sim = Self {
            config,
            rng,
            devices,
            recent: VecDeque::with_capacity(RECENT),
            index: 0,
            duplicates_sent: 0,
            start_ms,
        };
        for d in sim.drifting() {
            sim.devices[d as usize].drifting = true;
        }
        for d in sim.beta() {
            sim.devices[d as usize].beta = true;
        }
        sim
    }

    /// The devices whose sensor drifts: evenly spread over the cold-chain devices outside the
    /// noisy model (over the envelope devices in an envelope-only fleet), so that every
    /// drifting device is in one table (`usable.cold_chain`, or `usable.telemetry`).
    fn drifting(&self) -> Vec<u64> {
        let kind = match self.config.profile {
            Profile::Envelope => Profile::Envelope,
            _ => Profile::ColdChain,
        };
        let eligible: Vec<u64> = (0..self.config.devices)
            .filter(|d| {
                self.config.profile.of_device(*d) == kind
                    && Some(Self::model(*d)) != self.config.faults.noisy_model.as_deref()
            })
            .collect();
        let n = (self.config.faults.drift as usize).min(eligible.len());
        (0..n).map(|i| eligible[i * eligible.len() / n]).collect()
    }

    /// The beta devices: the first health devices.
    fn beta(&self) -> Vec<u64> {
        (0..self.config.devices)
            .filter(|d| self.config.profile.of_device(*d) == Profile::Health)
            .take(self.config.faults.beta as usize)
            .collect()
    }

    fn model(d: u64) -> &'static str {
        MODELS[((d / 9) % 3) as usize]
    }

    /// Who device number `d` is. Attributes vary independently of the profile (`d % 3`) and of
    /// the firmware (`d % 4`).
    pub fn device_info(&self, d: u64) -> DeviceInfo {
        let (fw, hw_rev) = self.firmware_and_hardware(d);
        DeviceInfo {
            device_id: Self::device_id(d),
            tenant: TENANTS[((d / 27) % 2) as usize],
            site: format!("site-{:02}", (d / 54) % 10),
            model: Self::model(d),
            hw_rev,
            fw,
        }
    }

    fn firmware_and_hardware(&self, d: u64) -> (&'static str, &'static str) {
        let fw = if self.devices[d as usize].beta {
            BETA_FIRMWARE
        } else {
            FIRMWARE[(d % 4) as usize]
        };
        (fw, HARDWARE[((d / 3) % 3) as usize])
    }

    /// The device registry as CSV, the columns of `reference.devices`
    /// (`device_id,tenant,site,model,hw_rev`), for `PUT /v1/reference/devices`.
    pub fn registry_csv(&self) -> String {
        let mut out = String::from("device_id,tenant,site,model,hw_rev\n");
        for d in 0..self.config.devices {
            let i = self.device_info(d);
            out.push_str(&format!(
                "{},{},{},{},{}\n",
                i.device_id, i.tenant, i.site, i.model, i.hw_rev
            ));
        }
        out
    }

    /// The planted faults (None without faults).
    pub fn planted(&self) -> Option<Planted> {
        let f = &self.config.faults;
        (!f.is_empty()).then(|| Planted {
            drifting: self.drifting().into_iter().map(Self::device_id).collect(),
            crash_cohort: f
                .crash
                .as_ref()
                .map(|(fw, hw)| serde_json::json!({"fw": fw, "hw_rev": hw})),
            noisy_model: f.noisy_model.clone(),
            beta_devices: self.beta().into_iter().map(Self::device_id).collect(),
        })
    }

    fn device_id(d: u64) -> String {
        format!("dev-{d:06}")
    }
}

impl Iterator for Simulator {
    type Item = SimMessage;

    fn next(&mut self) -> Option<SimMessage> {
        if self.config.messages != 0 && self.index >= self.config.messages {
            return None;
        }
        let i = self.index;
        // Duplicates are due half a period out of phase with malformed messages, so the two
        // rarely meet; when they do, the duplicate is owed to the next slot.
        let duplicates_due = ((i + 1) as f64 * self.config.duplicates + 0.5).floor() as u64;
        let message = if in_share(i, self.config.malformed) {
            self.malformed()
        } else if duplicates_due > self.duplicates_sent && !self.recent.is_empty() {
            self.duplicates_sent += 1;
            let pick = self.rng.below(self.recent.len() as u64) as usize;
            let mut replay = self.recent[pick].clone();
            replay.kind = Kind::Duplicate;
            if !self.config.msg_ids {
                replay.msg_id = Some(format!("sim-{}-{i}", self.config.seed));
            }
            replay
        } else {
            let m = self.good();
            if self.recent.len() == RECENT {
                self.recent.pop_front();
            }
            self.recent.push_back(m.clone());
            m
        };
        self.index += 1;
        Some(message)
    }
}

#[cfg(test)]
mod tests;
