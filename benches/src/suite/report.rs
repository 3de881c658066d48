//! The suite's report: Markdown (stdout, `suite.md`, optionally spliced into the README) and
//! JSON (`suite.json`), with each target and whether this run met it.

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use crate::latency::{LoadRun, Sustained};
use crate::{Args, Drain, Fill, Fleet, Pipelines, progress, round};

/// Where the README's generated part begins and ends.
const BEGIN: &str = "<!-- suite:begin -->";
const END: &str = "<!-- suite:end -->";

/// Every figure of one run.
#[derive(Debug, Serialize)]
pub(crate) struct Report {
    pub command: String,
    /// `FLEETLAKE_*` settings in the suite's environment, which every engine it starts takes.
    pub settings: Vec<String>,
    pub date: String,
    pub commit: String,
    pub build: &'static str,
    pub cores: usize,
    pub memory_gib: f64,
    /// Devices of the drains and latency runs (`--devices`).
    pub devices: u64,
    pub fills: Vec<Fill>,
    pub drains: Vec<Drain>,
    pub loads: Vec<LoadRun>,
    pub sustained: Option<Sustained>,
    pub fleet: Option<Fleet>,
    pub targets: Vec<Target>,
    /// Share of the machine's CPU time the hypervisor took over the whole run.
    pub steal: f64,
    /// Resident memory after the `--devices` mixed drains (local folder), MiB.
    #[serde(skip)]
    pub mixed_rss_after_mib: Vec<(Pipelines, f64)>,
}

/// One target of the suite, and what this run measured.
#[derive(Debug, Serialize)]
pub(crate) struct Target {
    pub target: String,
    pub measured: String,
    /// `None`: not measured in this run.
    pub met: Option<bool>,
}

fn git(args: &[&str]) -> String {
    std::process::Command::new("git")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

impl Report {
    pub(crate) fn new(devices: u64) -> Self {
        let argv: Vec<String> = std::env::args().collect();
        let exe = Path::new(&argv[0])
            .file_name()
            .map(|f| f.to_string_lossy().to_string())
            .unwrap_or_default();
        let profile = if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        };
        let command = std::iter::once(format!("target/{profile}/{exe}"))
            .chain(argv[1..].iter().cloned())
            .collect::<Vec<_>>()
            .join(" ");
        let dirty = !git(&["status", "--porcelain", "--untracked-files=no"]).is_empty();
        let memory_kb: f64 = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find_map(|l| l.strip_prefix("MemTotal:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            })
            .unwrap_or(0.0);
        let settings = std::env::vars()
            .filter(|(k, _)| {
                k.starts_with("FLEETLAKE_")
                    && !["TOKEN", "PASSWORD", "SECRET", "KEY", "SEED", "CREDS"]
                        .iter()
                        .any(|s| k.contains(s))
            })
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        Self {
            command,
            settings,
            date: chrono::Utc::now().format("%Y-%m-%d").to_string(),
            commit: format!(
                "{}{}",
                git(&["rev-parse", "--short", "HEAD"]),
                if dirty {
                    " (with uncommitted changes)"
                } else {
                    ""
                }
            ),
            build: profile,
            cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
            memory_gib: round(memory_kb / 1024.0 / 1024.0, 1),
            devices,
            fills: Vec::new(),
            drains: Vec::new(),
            loads: Vec::new(),
            sustained: None,
            fleet: None,
            targets: Vec::new(),
            steal: 0.0,
            mixed_rss_after_mib: Vec::new(),
        }
    }

    fn drain(&self, input: &str, what: &str, lake: &str) -> Option<&Drain> {
        self.drains
            .iter()
            .find(|d| d.input == input && d.what.starts_with(what) && d.lake == lake)
    }

    fn load(&self, rate: u64) -> Option<&LoadRun> {
        self.loads.iter().find(|l| l.offered == rate)
    }

    /// Each target of issue 12 against this run's figures.
    fn evaluate(&mut self) {
        let shipped = "fleetlake: pipelines + final zone + rules";
        let mut targets = Vec::new();
        for input in ["envelope", "mixed"] {
            let d = self.drain(input, shipped, "local folder");
            targets.push(Target {
                target: format!(
                    "{input} fleet, shipped pipelines + final zone + rules: drain ≥ 60% of the AckPolicy::All ceiling"
                ),
                measured: d.map_or("—".into(), |d| {
                    format!("{:.0}% ({} msg/s)", d.ratio_to_ceiling * 100.0, thousands(d.messages_per_second))
                }),
                met: d.map(|d| d.ratio_to_ceiling >= 0.6),
            });
        }
        let ours = self.drain("envelope", shipped, "local folder");
        let diy = self.drain("envelope", "do-it-yourself", "local folder");
        let times = ours
            .zip(diy)
            .map(|(o, d)| o.messages_per_second / d.messages_per_second);
        targets.push(Target {
            target: "≥ 5× the do-it-yourself Python consumer (envelope)".into(),
            measured: times.map_or("—".into(), |t| format!("{t:.1}×")),
            met: times.map(|t| t >= 5.0),
        });
        for (rate, what, limit, pick) in [
            (20_000, "publish→alert p99 < 10 ms", 10.0, 0),
            (20_000, "publish→queryable p99 < 500 ms", 500.0, 1),
        ] {
            let l = self.load(rate);
            let p99 = l.map(|l| {
                if pick == 0 {
                    l.alert.p99
                } else {
                    l.queryable.p99
                }
            });
            targets.push(Target {
                target: format!("{what} at {} msg/s", thousands(rate as f64)),
                measured: match p99 {
                    None => "—".into(),
                    Some(p) if p.is_nan() => "nothing arrived".into(),
                    Some(p) => format!("{p} ms"),
                },
                met: p99.map(|p| p < limit),
            });
        }
        let run = self
            .fleet
            .as_ref()
            .and_then(|f| f.runs.iter().find(|r| r.what == shipped).map(|r| (f, r)));
        targets.push(Target {
            target: "engine peak RSS ≤ 512 MiB with 1,000,000 devices (shipped pipelines)".into(),
            measured: run.map_or("—".into(), |(f, r)| {
                format!(
                    "{} MiB with {} devices",
                    r.peak_rss_mib,
                    thousands(f.devices as f64)
                )
            }),
            met: run
                .filter(|(f, _)| f.devices >= 1_000_000)
                .map(|(_, r)| r.peak_rss_mib <= 512.0),
        });
        self.targets = targets;
    }

    /// The report as Markdown.
    fn markdown(&self) -> String {
        let mut m = String::new();
        let w = &mut m;
        let _ = writeln!(
            w,
            "Generated by `{}` on {}, commit {}, {} build, {} cores, {} GiB. nats-server, SeaweedFS, \
             the engine and the load all ran on this one machine; only ratios between the figures \
             of one run are comparable, not absolute rates from different runs. Engines run \
             with {}. The hypervisor took {:.0}% of the machine's CPU time over the run (steal; \
             per drain in the table).\n",
            self.command,
            self.date,
            self.commit,
            self.build,
            self.cores,
            self.memory_gib,
            if self.settings.is_empty() {
                "fleetlake's defaults".to_string()
            } else {
                format!("fleetlake's defaults and `{}`", self.settings.join(" "))
            },
            self.steal * 100.0
        );
        let _ = writeln!(w, "| target | measured | met |\n|---|---|---|");
        for t in &self.targets {
            let met = match t.met {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "not measured",
            };
            let _ = writeln!(w, "| {} | {} | {met} |", t.target, t.measured);
        }
        if let Some(f) = self.fills.first() {
            let _ = writeln!(
                w,
                "\n**Drain** of a pre-filled stream: {} messages from {} devices ({} replays, {} \
                 malformed, 5% late), read from the stream's start until every message is \
                 acknowledged (fleetlake acks only what every table holding it has committed). \
                 fleetlake runs as `fleetlake serve` with its defaults; the time includes its start.\n",
                thousands(f.messages as f64),
                thousands(f.devices as f64),
                thousands(f.replays as f64),
                thousands(f.malformed as f64),
            );
        }
        let _ = writeln!(
            w,
            "| input | consumer | lake | msg/s | × ceiling | CPU cores: consumer / nats-server | share of time committing | engine peak RSS | steal |\n|---|---|---|---|---|---|---|---|---|"
        );
        for d in &self.drains {
            let _ = writeln!(
                w,
                "| {} | {} | {} | {} | {:.2} | {:.2} / {} | {} | {} | {:.0}% |",
                d.input,
                d.what,
                d.lake,
                thousands(d.messages_per_second),
                d.ratio_to_ceiling,
                d.consumer_cores,
                d.nats_cores.map_or("—".into(), |c| format!("{c:.2}")),
                d.commit_busy.map_or("—".into(), |c| format!("{c:.2}")),
                d.peak_rss_mib.map_or("—".into(), |r| format!("{r} MiB")),
                d.steal * 100.0,
            );
        }
        let fills: Vec<String> = self
            .fills
            .iter()
            .map(|f| format!("{} {} msg/s", f.input, thousands(f.publish_rate)))
            .collect();
        if !fills.is_empty() {
            let _ = writeln!(
                w,
                "\nFilling the streams (one publisher, per-message acknowledgements, pipelined): {}.",
                fills.join(", ")
            );
        }
        if !self.loads.is_empty() {
            let _ = writeln!(
                w,
                "\n**Latency** at fixed offered loads ({} devices; `benches/src/suite/latency.sql`: \
                 one source, one usable table, one rule; the engine's settings as above). \
                 Alert: publish → the alert at a NATS subscriber. Queryable: publish → the reading \
                 in a `/v1/query` answer (a probe reading every 100 ms, asked for every 50 ms: an \
                 upper bound by up to 50 ms and one query); n: how many alerts and probe readings \
                 were measured. Lag: messages published and not yet acknowledged, the mean over \
                 the run's second quarter → the mean over its last quarter. Sustained: the \
                 publisher reached 95% of the load, the lag grew by less than one second of \
                 traffic between those two quarters, and the engine caught up within 60 s.\n",
                thousands(self.devices as f64)
            );
            let _ = writeln!(
                w,
                "| offered msg/s | sent msg/s | alert p50 / p99 / max ms (n) | queryable p50 / p99 / max ms (n) | probe query ms | lag | sustained | steal |\n|---|---|---|---|---|---|---|---|"
            );
            let all = self.loads.iter().map(|l| (l, "")).chain(
                self.sustained
                    .iter()
                    .flat_map(|s| s.trials.iter().map(|l| (l, " (search)"))),
            );
            for (l, tag) in all {
                let _ = writeln!(
                    w,
                    "| {}{tag} | {} | {} / {} / {} ({}) | {} / {} / {} ({}) | {} | {} → {} | {} | {:.0}% |",
                    thousands(l.offered as f64),
                    thousands(l.achieved),
                    l.alert.p50,
                    l.alert.p99,
                    l.alert.max,
                    l.alert.count,
                    l.queryable.p50,
                    l.queryable.p99,
                    l.queryable.max,
                    l.queryable.count,
                    l.probe_query_ms,
                    thousands(l.lag_second_quarter),
                    thousands(l.lag_last_quarter),
                    match &l.why_not {
                        None => "yes".to_string(),
                        Some(why) => format!("no: {why}"),
                    },
                    l.steal * 100.0,
                );
            }
        }
        if let Some(s) = &self.sustained {
            let _ = writeln!(
                w,
                "\n**Highest load sustained** for {} s (the publisher reached 95% of it, the lag grew \
                 by less than one second of traffic from the second quarter to the last, and the \
                 engine caught up within 60 s): {}.",
                s.seconds,
                s.highest
                    .map_or("none of the loads tried".into(), |h| format!(
                        "{}{} msg/s",
                        if s.bounded { "" } else { "at least " },
                        thousands(h as f64)
                    ))
            );
        }
        if let Some(f) = &self.fleet {
            let _ = writeln!(
                w,
                "\n**Memory with {} devices** (mixed fleet, {} messages, local folder; per device: \
                 resident memory after the drain minus that after the {}-device drain of the \
                 same pipelines and messages above):\n\n| engine | msg/s | peak RSS | RSS after | per device |\n|---|---|---|---|---|",
                thousands(f.devices as f64),
                thousands(f.messages as f64),
                thousands(self.devices as f64),
            );
            for r in &f.runs {
                let _ = writeln!(
                    w,
                    "| {} | {} | {} MiB | {} MiB | {} |",
                    r.what,
                    thousands(r.messages_per_second),
                    r.peak_rss_mib,
                    r.rss_after_mib,
                    r.rss_per_device_bytes
                        .map_or("—".into(), |b| format!("{} bytes", thousands(b))),
                );
            }
            if let Some(b) = f.dedup_state_bytes_per_device {
                let _ = writeln!(
                    w,
                    "\nThe dedup state alone (`dedup_memory --devices {} --readings 5`): {} bytes per device.",
                    f.devices,
                    thousands(b)
                );
            }
        }
        m
    }

    /// Prints the Markdown, writes `suite.md` and `suite.json` into `--out`, and splices the
    /// Markdown into `--readme`.
    pub(crate) fn write(&mut self, args: &Args) {
        self.evaluate();
        let markdown = self.markdown();
        println!("{markdown}");
        std::fs::create_dir_all(&args.out).expect("the --out folder");
        std::fs::write(args.out.join("suite.md"), &markdown).expect("writing suite.md");
        std::fs::write(
            args.out.join("suite.json"),
            serde_json::to_string_pretty(self).expect("JSON"),
        )
        .expect("writing suite.json");
        progress!("wrote {}", args.out.join("suite.{md,json}").display());
        if let Some(readme) = &args.readme {
            match splice(
                &std::fs::read_to_string(readme).unwrap_or_default(),
                &markdown,
            ) {
                Some(text) => {
                    std::fs::write(readme, text).expect("writing the README");
                    progress!("replaced the suite's part of {}", readme.display());
                }
                None => progress!(
                    "{} has no {BEGIN} … {END} part: left unchanged",
                    readme.display()
                ),
            }
        }
    }
}

/// `text` with its part between [`BEGIN`] and [`END`] replaced by `markdown`.
fn splice(text: &str, markdown: &str) -> Option<String> {
    let start = text.find(BEGIN)? + BEGIN.len();
    let end = start + text[start..].find(END)?;
    Some(format!(
        "{}\n{}\n{}",
        &text[..start],
        markdown.trim_end(),
        &text[end..]
    ))
}

/// `1234567.0` → "1,234,567".
fn thousands(x: f64) -> String {
    if !x.is_finite() {
        return "—".into();
    }
    let digits = format!("{:.0}", x.abs());
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if x < 0.0 { format!("-{out}") } else { out }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splices_between_the_markers_only() {
        let text = "intro\n<!-- suite:begin -->\nold\n<!-- suite:end -->\noutro\n";
        let out = splice(text, "new\n").expect("markers");
        assert_eq!(
            out,
            "intro\n<!-- suite:begin -->\nnew\n<!-- suite:end -->\noutro\n"
        );
        assert!(splice("no markers", "x").is_none());
    }

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(1_234_567.4), "1,234,567");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(thousands(-1000.0), "-1,000");
    }
}
