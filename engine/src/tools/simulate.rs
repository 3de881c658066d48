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
    pub fn parse(spec: &str) -> Result<Self, String> {
        match spec.trim() {
            "demo" => return Ok(Self::demo()),
            "none" | "" => return Ok(Self::default()),
            _ => {}
        }
        let mut faults = Self::default();
        for part in spec.split(',').map(str::trim) {
            let (key, value) = part.split_once('=').ok_or_else(|| {
                format!("--faults: {part:?} is not key=value (expected drift=N, crash=FW/HW_REV, noisy=MODEL, beta=N, or demo)")
            })?;
            let count = |v: &str| {
                v.parse::<u64>()
                    .map_err(|_| format!("--faults: {key}={v}: expected a number of devices"))
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
                            format!("--faults: crash={value}: expected FIRMWARE/HW_REV, e.g. crash=2.0.1/rev-B")
                        })?;
                    faults.crash = Some((fw.into(), hw.into()));
                }
                _ => {
                    return Err(format!(
                        "--faults: unknown fault {part:?} (expected drift=N, crash=FW/HW_REV, noisy=MODEL, beta=N, or demo)"
                    ));
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
    pub fn validate(&self) -> Result<(), String> {
        for (name, v) in [
            ("duplicates", self.duplicates),
            ("malformed", self.malformed),
            ("late", self.late),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return Err(format!("--{name} is {v}: expected a share between 0 and 1"));
            }
        }
        if self.duplicates + self.malformed > 1.0 {
            return Err("--duplicates plus --malformed must not exceed 1".into());
        }
        if self.devices == 0 {
            return Err("--devices must be at least 1".into());
        }
        if !(1..=86_400_000).contains(&self.reading_interval_ms) {
            return Err(format!(
                "--reading-interval-ms is {}: expected milliseconds between 1 and 86400000 (a day)",
                self.reading_interval_ms
            ));
        }
        if !(self.rate >= 0.0 && self.rate.is_finite()) {
            return Err(format!(
                "--rate is {}: expected messages per second >= 0",
                self.rate
            ));
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

    fn good(&mut self) -> SimMessage {
        let d = self.rng.below(self.config.devices);
        let profile = self.config.profile.of_device(d);
        let late = self.config.late > 0.0 && in_share(self.index, self.config.late);
        let (door, reboot, crash_draw, cpu) = (
            self.rng.unit() < 0.05,
            self.rng.unit() < 0.01,
            self.rng.unit(),
            5.0 + self.rng.unit() * 90.0,
        );
        let drift = (
            self.rng.unit() - 0.5,
            self.rng.unit() - 0.5,
            self.rng.unit(),
        );
        let dev = &mut self.devices[d as usize];
        dev.seq += 1;
        dev.temperature = (dev.temperature + drift.0 * 0.4).clamp(-25.0, 35.0);
        dev.humidity = (dev.humidity + drift.1).clamp(5.0, 95.0);
        dev.battery = (dev.battery - drift.2 * 0.01).max(1.0);
        dev.lat += drift.0 * 0.001;
        dev.lon += drift.1 * 0.001;
        dev.uptime_s = if reboot { 0 } else { dev.uptime_s + 60 };
        let seq = dev.seq;
        // Device clocks advance `reading_interval_ms` (1 s) per reading, never past the wall
        // clock with `not_after_now`; late readings lag 30 s to 10 min behind.
        let mut ts_ms = self.start_ms
            + (seq as i64).saturating_mul(self.config.reading_interval_ms)
            + (d as i64 % 1000);
        if self.config.not_after_now {
            ts_ms = ts_ms.min(chrono::Utc::now().timestamp_millis());
        }
        if late {
            ts_ms -= 30_000 + self.rng.below(570_000) as i64;
        }
        let id = Self::device_id(d);
        let ts = if d.is_multiple_of(2) {
            format!(
                "\"{}\"",
                chrono::DateTime::from_timestamp_millis(ts_ms)
                    .expect("simulated times are in range")
                    .format("%Y-%m-%dT%H:%M:%S%.3fZ")
            )
        } else {
            ts_ms.to_string()
        };
        let (fw, hw) = self.firmware_and_hardware(d);
        let old_firmware = fw.starts_with("1.");
        let faults = &self.config.faults;
        let crash_rate = if self.devices[d as usize].beta {
            0.10
        } else if faults
            .crash
            .as_ref()
            .is_some_and(|(f, h)| f == fw && h == hw)
        {
            0.04
        } else {
            0.005
        };
        let crash = crash_draw < crash_rate;
        let noise = if faults.noisy_model.as_deref() == Some(Self::model(d)) {
            (self.rng.unit() - 0.5) * 30.0
        } else {
            0.0
        };
        let dev = &self.devices[d as usize];
        // What the sensor reports: the true temperature, its drift and its noise.
        let drifted = if dev.drifting {
            (3.0 * seq as f64).min(20.0)
        } else {
            0.0
        };
        let reported = dev.temperature + drifted + noise;
        let payload = match profile {
            Profile::ColdChain => {
                let temperature = if old_firmware {
                    format!(r#""temp_f":{:.2}"#, reported * 9.0 / 5.0 + 32.0)
                } else {
                    format!(r#""temp_c":{:.2}"#, reported)
                };
                format!(
                    r#"{{"device_id":"{id}","seq":{seq},"ts":{ts},{temperature},"door_open":{door},"lat":{:.5},"lon":{:.5},"battery":{:.2},"fw":"{fw}"}}"#,
                    dev.lat, dev.lon, dev.battery
                )
            }
            Profile::Health => {
                let memory = if old_firmware {
                    format!(r#""mem_kb":{}"#, 200_000 + (cpu as u64) * 1000)
                } else {
                    format!(r#""mem_mb":{:.1}"#, 200.0 + cpu)
                };
                let reboot = if reboot {
                    r#","reboot_reason":"watchdog""#
                } else {
                    ""
                };
                let crash = if crash {
                    r#","crash_report":"panic in sensor task""#
                } else {
                    ""
                };
                format!(
                    r#"{{"device_id":"{id}","seq":{seq},"ts":{ts},"cpu_pct":{cpu:.1},{memory},"uptime_s":{}{reboot}{crash},"fw":"{fw}","hw":"{hw}"}}"#,
                    dev.uptime_s
                )
            }
            _ => format!(
                r#"{{"device_id":"{id}","seq":{seq},"ts":{ts},"fw":"{fw}","hw":"{hw}","temperature":{:.2},"humidity":{:.1},"battery":{:.2}}}"#,
                reported, dev.humidity, dev.battery
            ),
        };
        SimMessage {
            subject: profile.subject(&self.config.subject_prefix, &id),
            payload: payload.into_bytes(),
            msg_id: Some(if self.config.msg_ids {
                format!("{id}-{seq}")
            } else {
                format!("sim-{}-{}", self.config.seed, self.index)
            }),
            kind: Kind::Good,
            late,
        }
    }

    fn malformed(&mut self) -> SimMessage {
        let d = self.rng.below(self.config.devices);
        let profile = self.config.profile.of_device(d);
        let id = Self::device_id(d);
        let n = self.index;
        // Pipelines check their own fields: send them only what any decoder refuses.
        let kind = match profile {
            Profile::Envelope => self.rng.below(8),
            _ => [0, 1, 2, 5, 6][self.rng.below(5) as usize],
        };
        let payload: Vec<u8> = match kind {
            0 => format!("garbage-{n}").into_bytes(),
            1 => format!(r#"{{"device_id":"{id}","seq":{n},"ts":"#).into_bytes(),
            2 => format!(r#"{{"seq":{n},"ts":{},"temperature":3.5}}"#, self.start_ms).into_bytes(),
            3 => format!(
                r#"{{"device_id":"{id}","seq":{n},"ts":{},"temperature":"hot"}}"#,
                self.start_ms
            )
            .into_bytes(),
            4 => format!(
                r#"{{"device_id":"{id}","seq":{n},"ts":{},"battery":250}}"#,
                self.start_ms
            )
            .into_bytes(),
            5 => {
                let mut p = vec![0xff, 0xfe];
                p.extend_from_slice(format!(r#"{{"device_id":"{id}","seq":{n}}}"#).as_bytes());
                p
            }
            6 => format!(r#"[{{"device_id":"{id}"}}]"#).into_bytes(),
            _ => format!(
                r#"{{"device_id":"{id}","seq":-{n},"ts":{}}}"#,
                self.start_ms
            )
            .into_bytes(),
        };
        SimMessage {
            subject: profile.subject(&self.config.subject_prefix, &id),
            payload,
            msg_id: Some(format!("sim-{}-{n}", self.config.seed)),
            kind: Kind::Malformed,
            late: false,
        }
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

/// How many publishes may await their acknowledgement at once.
const IN_FLIGHT: usize = 512;

/// How long a publish is retried (NATS restarting, JetStream electing) before giving up.
const PUBLISH_PATIENCE: Duration = Duration::from_secs(120);

type PendingAck = jetstream::context::PublishAckFuture;

async fn send(js: &jetstream::Context, message: &SimMessage) -> Result<PendingAck, String> {
    let payload = bytes::Bytes::from(message.payload.clone());
    let sent = match &message.msg_id {
        Some(id) => {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(async_nats::header::NATS_MESSAGE_ID, id.as_str());
            js.publish_with_headers(message.subject.clone(), headers, payload)
                .await
        }
        None => js.publish(message.subject.clone(), payload).await,
    };
    sent.map_err(|e| e.to_string())
}

/// Waits for a publish to be stored, publishing it again (same message id, so JetStream stores
/// it once) while the server does not acknowledge. Returns whether JetStream saw a duplicate.
async fn confirm(
    js: &jetstream::Context,
    message: &SimMessage,
    first: Result<PendingAck, String>,
    cancel: &CancellationToken,
) -> Result<bool, String> {
    let deadline = Instant::now() + PUBLISH_PATIENCE;
    let mut pending = first;
    // The first retry goes out at once: after an outage every publish in flight has timed out,
    // and pausing for each would stall the whole queue.
    let mut pause = Duration::ZERO;
    loop {
        let error = match pending {
            Ok(ack) => match ack.await {
                Ok(ack) => return Ok(ack.duplicate),
                Err(e) => e.to_string(),
            },
            Err(e) => e,
        };
        if Instant::now() > deadline || cancel.is_cancelled() {
            return Err(format!("publishing to {}: {error}", message.subject));
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).clamp(Duration::from_millis(50), Duration::from_secs(2));
        pending = send(js, message).await;
    }
}

/// Confirms the oldest publish in flight. An acknowledgement's timeout only starts when it is
/// awaited, so after a lost connection every publish in flight is sent again at once (same
/// message ids: JetStream stores each once) rather than timing out one after the other.
async fn confirm_oldest(
    js: &jetstream::Context,
    pending: &mut VecDeque<(SimMessage, Result<PendingAck, String>)>,
    cancel: &CancellationToken,
) -> Result<bool, String> {
    let (message, ack) = pending.pop_front().expect("non-empty");
    let ack = match ack {
        Ok(ack) => ack.await.map_err(|e| e.to_string()),
        Err(e) => Err(e),
    };
    match ack {
        Ok(ack) => Ok(ack.duplicate),
        Err(error) => {
            tracing::debug!(%error, "publish unconfirmed; sending everything in flight again");
            for (m, a) in pending.iter_mut() {
                *a = send(js, m).await;
            }
            confirm(js, &message, Err(error), cancel).await
        }
    }
}

/// Publishes the simulated fleet; `progress` is called about once a second with the report so far.
/// Publishes that fail or go unacknowledged are retried with the same message id.
pub async fn publish(
    js: &jetstream::Context,
    config: SimConfig,
    cancel: CancellationToken,
    mut progress: impl FnMut(&Report),
) -> Result<Report, String> {
    config.validate()?;
    let mut report = Report {
        seed: config.seed,
        devices: config.devices,
        ..Default::default()
    };
    let rate = config.rate;
    let sim = Simulator::new(config);
    report.planted = sim.planted();
    let started = Instant::now();
    let mut last_progress = Instant::now();
    let mut pending: VecDeque<(SimMessage, Result<PendingAck, String>)> = VecDeque::new();
    for message in sim {
        if cancel.is_cancelled() {
            break;
        }
        if rate > 0.0 {
            let due = Duration::from_secs_f64(report.total as f64 / rate);
            let now = started.elapsed();
            if due > now + Duration::from_millis(2) {
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(due - now) => {}
                }
            }
        }
        match message.kind {
            Kind::Good => report.distinct += 1,
            Kind::Duplicate => report.duplicates += 1,
            Kind::Malformed => report.malformed += 1,
        }
        report.late += message.late as u64;
        report.total += 1;
        let ack = send(js, &message).await;
        pending.push_back((message, ack));
        if pending.len() >= IN_FLIGHT {
            report.stream_duplicates += confirm_oldest(js, &mut pending, &cancel).await? as u64;
        }
        if last_progress.elapsed() >= Duration::from_secs(1) {
            last_progress = Instant::now();
            report.elapsed_s = started.elapsed().as_secs_f64();
            progress(&report);
        }
    }
    while !pending.is_empty() {
        report.stream_duplicates += confirm_oldest(js, &mut pending, &cancel).await? as u64;
    }
    report.elapsed_s = started.elapsed().as_secs_f64();
    report.rate = report.total as f64 / report.elapsed_s.max(1e-9);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> SimConfig {
        SimConfig {
            seed: 7,
            devices: 50,
            messages: 20_000,
            duplicates: 0.05,
            malformed: 0.01,
            late: 0.1,
            start_ms: Some(1_763_900_000_000),
            ..Default::default()
        }
    }

    #[test]
    fn same_seed_same_messages_and_exact_shares() {
        let a: Vec<_> = Simulator::new(config()).collect();
        let b: Vec<_> = Simulator::new(config()).collect();
        assert_eq!(a.len(), 20_000);
        assert!(
            a.iter()
                .zip(&b)
                .all(|(x, y)| x.payload == y.payload && x.subject == y.subject)
        );
        let count = |k| a.iter().filter(|m| m.kind == k).count();
        assert_eq!(count(Kind::Malformed), 200);
        assert_eq!(count(Kind::Duplicate), 1000);
        assert_eq!(count(Kind::Good), 18_800);
        let other: Vec<_> = Simulator::new(SimConfig {
            seed: 8,
            ..config()
        })
        .take(10)
        .collect();
        assert!(other.iter().zip(&a).any(|(x, y)| x.payload != y.payload));
    }

    #[test]
    fn every_good_reading_is_a_distinct_device_and_sequence() {
        let mut seen = std::collections::HashSet::new();
        for m in Simulator::new(config()).filter(|m| m.kind == Kind::Good) {
            let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
            assert!(seen.insert((
                v["device_id"].as_str().unwrap().to_string(),
                v["seq"].as_u64().unwrap()
            )));
        }
        assert_eq!(seen.len(), 18_800);
    }

    #[test]
    fn mixed_fleets_send_every_profile_on_its_subject() {
        let messages: Vec<_> = Simulator::new(SimConfig {
            profile: Profile::Mixed,
            ..config()
        })
        .filter(|m| m.kind == Kind::Good)
        .take(3000)
        .collect();
        for (prefix, field) in [
            ("telemetry.coldchain.", "door_open"),
            ("telemetry.health.", "uptime_s"),
        ] {
            let of_kind: Vec<_> = messages
                .iter()
                .filter(|m| m.subject.starts_with(prefix))
                .collect();
            assert!(of_kind.len() > 500, "{prefix}: {}", of_kind.len());
            for m in of_kind {
                let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
                assert!(v.get(field).is_some(), "{v}");
            }
        }
        let cold: Vec<serde_json::Value> = messages
            .iter()
            .filter(|m| m.subject.starts_with("telemetry.coldchain."))
            .map(|m| serde_json::from_slice(&m.payload).unwrap())
            .collect();
        assert!(
            cold.iter().any(|v| v.get("temp_f").is_some())
                && cold.iter().any(|v| v.get("temp_c").is_some())
        );
    }

    #[test]
    fn shares_are_checked() {
        let err = SimConfig {
            malformed: 1.5,
            ..config()
        }
        .validate()
        .unwrap_err();
        assert!(err.contains("--malformed"), "{err}");
    }

    #[test]
    fn faults_parse_and_say_what_is_wrong() {
        assert_eq!(Faults::parse("demo").unwrap(), Faults::demo());
        assert_eq!(Faults::parse("none").unwrap(), Faults::default());
        let f = Faults::parse("drift=5, crash=1.9.0/rev-C, noisy=RT-100, beta=2").unwrap();
        assert_eq!(f.drift, 5);
        assert_eq!(f.crash, Some(("1.9.0".into(), "rev-C".into())));
        assert_eq!(f.noisy_model.as_deref(), Some("RT-100"));
        assert_eq!(f.beta, 2);
        for (spec, says) in [
            ("drift", "not key=value"),
            ("drift=many", "expected a number"),
            ("crash=2.0.1", "FIRMWARE/HW_REV"),
            ("melt=1", "unknown fault"),
        ] {
            let err = Faults::parse(spec).unwrap_err();
            assert!(err.contains(says), "{spec}: {err}");
        }
    }

    #[test]
    fn planted_faults_are_where_the_report_says() {
        let sim = SimConfig {
            profile: Profile::Mixed,
            devices: 900,
            messages: 60_000,
            faults: Faults::demo(),
            start_ms: Some(1_763_900_000_000),
            ..config()
        };
        let planted = Simulator::new(sim.clone()).planted().unwrap();
        assert_eq!(planted.drifting.len(), 20);
        assert_eq!(planted.beta_devices.len(), 3);
        let registry = Simulator::new(sim.clone()).registry_csv();
        assert!(registry.starts_with("device_id,tenant,site,model,hw_rev\n"));
        assert_eq!(registry.lines().count(), 901);
        let model: std::collections::HashMap<&str, &str> = registry
            .lines()
            .skip(1)
            .map(|l| {
                let f: Vec<&str> = l.split(',').collect();
                (f[0], f[3])
            })
            .collect();
        // Drifting devices are outside the noisy model; every model and revision is used.
        assert!(
            planted
                .drifting
                .iter()
                .all(|d| model[d.as_str()] != "RT-300")
        );
        for value in ["RT-100", "RT-300", "rev-A", "rev-C"] {
            assert!(registry.contains(value), "{value}");
        }

        let (mut crashes, mut reports) = (
            std::collections::HashMap::new(),
            std::collections::HashMap::new(),
        );
        let mut hottest_drifting = f64::MIN;
        for m in Simulator::new(sim).filter(|m| m.kind == Kind::Good) {
            let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
            let id = v["device_id"].as_str().unwrap().to_string();
            if m.subject.starts_with("telemetry.health.") {
                let cohort = format!(
                    "{}/{}",
                    v["fw"].as_str().unwrap(),
                    v["hw"].as_str().unwrap()
                );
                *reports.entry(cohort.clone()).or_insert(0u64) += 1;
                *crashes.entry(cohort).or_insert(0u64) += v.get("crash_report").is_some() as u64;
            }
            if planted.drifting.contains(&id)
                && let Some(t) = v
                    .get("temp_c")
                    .or(v.get("temperature"))
                    .and_then(|t| t.as_f64())
            {
                hottest_drifting = hottest_drifting.max(t);
            }
            if planted.beta_devices.contains(&id) {
                assert_eq!(v["fw"], BETA_FIRMWARE);
            }
        }
        let rate = |c: &str| crashes[c] as f64 / reports[c] as f64;
        assert!(rate("2.0.1/rev-B") > 0.025, "{}", rate("2.0.1/rev-B"));
        assert!(rate("2.0.1/rev-A") < 0.015, "{}", rate("2.0.1/rev-A"));
        assert!(hottest_drifting > 20.0, "{hottest_drifting}");
    }
}
