//! Connecting to NATS as the `nats.*` settings say (credentials, TLS), and watching the
//! connection so `/healthz` sees a lost server at once.

use super::*;

/// The client options `nats` asks for: credentials (from the settings or the URL) and TLS.
async fn options(nats: &NatsConnection) -> Result<async_nats::ConnectOptions, SourceError> {
    // More than one rustls crypto provider is compiled in (object_store's and async-nats'):
    // name one, or rustls cannot choose and panics at the first TLS connection.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut options = match &nats.creds_file {
        Some(path) => async_nats::ConnectOptions::with_credentials_file(path.clone())
            .await
            .map_err(|e| SourceError {
                action: "reading the credentials file",
                reason: format!("{}: {e}", path.display()),
            })?,
        None => async_nats::ConnectOptions::new(),
    };
    // async-nats ignores a URL's user part: nats://user:password@host and nats://token@host
    // are applied here, unless nats.user or nats.token says otherwise.
    let (url_user, url_password) = nats.url_credentials();
    match (&nats.user, url_user, url_password) {
        (Some(user), _, _) => {
            options =
                options.user_and_password(user.clone(), nats.password.clone().unwrap_or_default());
        }
        (None, Some(user), Some(password)) => {
            options = options.user_and_password(user, password);
        }
        (None, Some(token), None) if nats.token.is_none() => {
            options = options.token(token);
        }
        _ => {}
    }
    if let Some(token) = &nats.token {
        options = options.token(token.clone());
    }
    if let Some(seed) = &nats.nkey_seed {
        options = options.nkey(seed.clone());
    }
    if let Some(ca) = &nats.tls_ca {
        options = options.add_root_certificates(ca.clone()).require_tls(true);
    }
    if let (Some(cert), Some(key)) = (&nats.tls_cert, &nats.tls_key) {
        options = options.add_client_certificate(cert.clone(), key.clone());
    }
    if nats.tls_required {
        options = options.require_tls(true);
    }
    Ok(options)
}

/// Connects to a NATS server at `url` without credentials; see [`connect_with`].
pub async fn connect(url: &str) -> Result<jetstream::Context, SourceError> {
    connect_with(&NatsConnection::plain(url)).await
}

/// Connects to NATS with `nats`' credentials and TLS settings and returns a JetStream context.
/// Errors name the server with any password in its URL redacted.
pub async fn connect_with(nats: &NatsConnection) -> Result<jetstream::Context, SourceError> {
    connect_watched(nats, None).await
}

/// Like [`connect_with`], and with `metrics` told of the connection's state as the client sees
/// it: `source_up` 0 (and the source's last error) the moment the connection is lost, 1 when it
/// is made again. `/healthz` then tells of a NATS outage at once, not when the next pull
/// request times out (about 10 s later).
pub async fn connect_watched(
    nats: &NatsConnection,
    metrics: Option<std::sync::Arc<crate::metrics::Metrics>>,
) -> Result<jetstream::Context, SourceError> {
    let mut options = options(nats).await?;
    if let Some(metrics) = metrics {
        let url = crate::config::redact_url(&nats.url);
        options = options.event_callback(move |event| {
            let (metrics, url) = (metrics.clone(), url.clone());
            async move {
                use std::sync::atomic::Ordering;
                match event {
                    async_nats::Event::Disconnected | async_nats::Event::Closed => {
                        metrics.source_up.store(0, Ordering::Relaxed);
                        metrics.set_last_error(
                            "source",
                            &format!(
                                "the connection to NATS at {url} was lost ({event}); reconnecting"
                            ),
                        );
                    }
                    async_nats::Event::Connected => metrics.source_up.store(1, Ordering::Relaxed),
                    _ => {}
                }
            }
        });
    }
    let client = options
        .connection_timeout(Duration::from_secs(5))
        // Reconnect quickly after a server restart (the default backs off to several seconds).
        .reconnect_delay_callback(|attempts| {
            Duration::from_millis((100 * attempts as u64).min(1_000))
        })
        // A cluster's seed servers, comma-separated (async-nats takes one URL per item).
        .connect(
            nats.url
                .split(',')
                .map(str::trim)
                .filter(|u| !u.is_empty())
                .collect::<Vec<_>>(),
        )
        .await
        .map_err(|e| SourceError {
            action: "connecting",
            reason: format!("to {}: {e}", crate::config::redact_url(&nats.url)),
        })?;
    Ok(jetstream::new(client))
}
