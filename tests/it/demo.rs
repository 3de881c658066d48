//! The demo as a new user meets it: `fleetlake demo --messages 100000` (the README's settings),
//! in a folder of its own, against a real NATS server; the commands it prints are run in order in
//! a fresh shell with the printed exports, and each succeeds; final rows and an alert appear while
//! it runs; and run again in the same folder, its fleet (whose devices count from 1 again, as
//! after a reboot) still lands in the usable zone.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use fleetlake_tests::{Api, Nats, fleetlake_bin, free_port, tail, wait_for};
use tokio::process::{Child, Command};

struct Demo {
    child: Child,
    log: std::path::PathBuf,
    api: Api,
}

impl Demo {
    async fn start(dir: &Path, nats: &Nats, run: usize) -> Self {
        let port = free_port();
        let log = dir.join(format!("demo-{run}.log"));
        let out = std::fs::File::create(&log).unwrap();
        // The README's unattended size (its defaults otherwise), without --exit-when-done: the
        // printed commands are run while it serves.
        let child = Command::new(fleetlake_bin())
            .args(["demo", "--messages", "100000"])
            .current_dir(dir)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", std::env::var("HOME").unwrap_or_default())
            .env("FLEETLAKE_NATS_URL", nats.url())
            .env("FLEETLAKE_HTTP_LISTEN", format!("127.0.0.1:{port}"))
            .env("FLEETLAKE_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(out)
            .kill_on_drop(true)
            .spawn()
            .expect("starting fleetlake demo");
        let addr = format!("127.0.0.1:{port}").parse().unwrap();
        let mut demo = Self {
            child,
            log,
            api: Api::new(addr),
        };
        let log = demo.log.clone();
        wait_for(
            "the demo to print its commands",
            Duration::from_secs(120),
            || {
                let exited = demo.child.try_wait().ok().flatten();
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                let log = log.clone();
                async move {
                    if let Some(status) = exited {
                        panic!("the demo exited ({status}):\n{}", tail(&log));
                    }
                    text.contains("Press Ctrl-C to stop.").then_some(())
                }
            },
        )
        .await;
        let token = demo.exports()["FLEETLAKE_TOKEN"].clone();
        demo.api = demo.api.with_token(Some(&token));
        demo
    }

    fn printed(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap()
    }

    /// The lines printed under "Try, in another terminal", up to "Press Ctrl-C".
    fn commands(&self) -> Vec<String> {
        let text = self.printed();
        let start = text.find("Try, in another terminal").expect("the commands");
        text[start..]
            .lines()
            .skip(1)
            .take_while(|l| !l.starts_with("Press Ctrl-C"))
            .filter_map(|l| l.strip_prefix("  "))
            .map(str::to_string)
            .collect()
    }

    fn exports(&self) -> std::collections::BTreeMap<String, String> {
        self.commands()
            .iter()
            .filter_map(|c| c.strip_prefix("export "))
            .filter_map(|c| c.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    async fn stop(mut self) {
        let pid = self.child.id().unwrap();
        let _ = std::process::Command::new("kill")
            .args(["-INT", &pid.to_string()])
            .status();
        let status = tokio::time::timeout(Duration::from_secs(120), self.child.wait())
            .await
            .expect("the demo stops on Ctrl-C")
            .unwrap();
        assert!(status.success(), "{status}:\n{}", tail(&self.log));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_s_printed_commands_work_and_it_shows_windows_and_alerts_twice_in_one_folder() {
    let nats = Nats::start().await;
    let dir = fleetlake_tests::TestDir::new();
    fleetlake_tests::shipped_pipelines(dir.path());

    let demo = Demo::start(dir.path(), &nats, 1).await;
    // What the demo promises: windows and an alert in its first minute (waited for generously:
    // these machines are shared).
    demo.api
        .wait_scalar(
            "SELECT least(count(*), 1) FROM final.device_minute",
            1,
            Duration::from_secs(180),
        )
        .await;
    demo.api
        .wait_scalar(
            "SELECT least(count(*), 1) FROM final.alerts WHERE rule = 'trailer_too_warm'",
            1,
            Duration::from_secs(180),
        )
        .await;
    // The printed commands, in order, in one fresh shell (aliases on, as in a terminal).
    let commands = demo.commands();
    assert!(
        commands.iter().any(|c| c.contains(" query ")),
        "{commands:?}"
    );
    for (i, command) in commands.iter().enumerate() {
        let script = format!(
            "shopt -s expand_aliases\nset -e\n{}\n",
            commands[..=i].join("\n")
        );
        let out = std::process::Command::new("bash")
            .arg("-c")
            .arg(&script)
            .current_dir(std::env::temp_dir())
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let setting = command.starts_with("export ") || command.starts_with("alias ");
        assert!(
            out.status.success()
                && (setting || (!stdout.trim().is_empty() && !stdout.contains("\"error\""))),
            "{command}: {}\nstdout: {stdout}\nstderr: {stderr}",
            out.status
        );
    }
    let usable = demo
        .api
        .scalar("SELECT count(*) FROM usable.cold_chain")
        .await;
    demo.stop().await;
    // Nothing of the demo's is left beside the lake but its own folder.
    let mut left: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with("demo-"))
        .collect();
    left.sort();
    assert_eq!(left, vec![".fleetlake-demo", "lakehouse", "pipelines"]);

    // Again in the same folder: the devices count from 1 again (after what the first run left
    // in the stream is drained), are seen restarting, and their readings land.
    let demo = Demo::start(dir.path(), &nats, 2).await;
    let restarted = |metrics: &str| {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix("fleetlake_dedup_restarts_total "))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    wait_for(
        "the second run's devices to be seen restarting",
        Duration::from_secs(400),
        || {
            let api = demo.api.clone();
            async move {
                let (_, metrics) = api.get("/metrics").await;
                (restarted(&metrics) > 0).then_some(())
            }
        },
    )
    .await;
    demo.api
        .wait_scalar(
            &format!(
                "SELECT least(count(*), {}) FROM usable.cold_chain",
                usable + 100
            ),
            usable + 100,
            Duration::from_secs(60),
        )
        .await;
    demo.stop().await;
}
