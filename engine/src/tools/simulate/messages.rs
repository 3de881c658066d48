//! The messages a simulated device sends: its readings in each profile's shape (with the faults
//! planted in them), and the malformed ones.

use super::*;

impl Simulator {
    pub(super) fn good(&mut self) -> SimMessage {
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

    pub(super) fn malformed(&mut self) -> SimMessage {
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
