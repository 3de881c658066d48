//! How to reach NATS (`nats.*`): the server, credentials and TLS, as settings. Connecting is
//! `ingest::source`'s.

/// How to reach NATS: the server URL, credentials and TLS (`nats.*` configuration keys).
///
/// Credentials are optional and combine as NATS allows: user and password, a token, an NKey seed,
/// or a credentials file (user JWT + seed). TLS is used when the URL is `tls://`, a CA is given,
/// or `tls_required` is set; a client certificate and key give mutual TLS. `Debug` never shows a
/// secret.
#[derive(Clone, Default)]
pub struct NatsConnection {
    pub url: String,
    pub user: Option<String>,
    pub password: Option<String>,
    pub token: Option<String>,
    pub nkey_seed: Option<String>,
    pub creds_file: Option<std::path::PathBuf>,
    /// PEM file of the certificate authority the server's certificate is checked against.
    pub tls_ca: Option<std::path::PathBuf>,
    /// PEM client certificate and key, for mutual TLS.
    pub tls_cert: Option<std::path::PathBuf>,
    pub tls_key: Option<std::path::PathBuf>,
    pub tls_required: bool,
}

impl std::fmt::Debug for NatsConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secret = |s: &Option<String>| s.as_ref().map(|_| "<redacted>");
        f.debug_struct("NatsConnection")
            .field("url", &super::redact_url(&self.url))
            .field("user", &self.user)
            .field("password", &secret(&self.password))
            .field("token", &secret(&self.token))
            .field("nkey_seed", &secret(&self.nkey_seed))
            .field("creds_file", &self.creds_file)
            .field("tls_ca", &self.tls_ca)
            .field("tls_cert", &self.tls_cert)
            .field("tls_key", &self.tls_key)
            .field("tls_required", &self.tls_required)
            .finish()
    }
}

impl NatsConnection {
    /// A server at `url` with neither credentials nor TLS settings beyond the URL's own.
    pub fn plain(url: &str) -> Self {
        Self {
            url: url.to_string(),
            ..Default::default()
        }
    }

    /// The user and password (or token, as the user alone) of the first URL that has any,
    /// percent-decoded.
    pub fn url_credentials(&self) -> (Option<String>, Option<String>) {
        let decode = |s: &str| {
            // Percent-decoding: a '+' stays a '+' (form decoding would make it a space).
            url::form_urlencoded::parse(format!("x={}", s.replace('+', "%2B")).as_bytes())
                .next()
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default()
        };
        for part in self.url.split(',') {
            if let Ok(u) = url::Url::parse(part.trim())
                && !u.username().is_empty()
            {
                return (Some(decode(u.username())), u.password().map(decode));
            }
        }
        (None, None)
    }
}
