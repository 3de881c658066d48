//! Secrets never shown: a secret key's value, and the password in a URL, as `fleetlake config`,
//! errors and logs print them.

/// Keys whose whole value is a secret.
pub const SECRET_KEYS: &[&str] = &["nats.password", "nats.token", "nats.nkey_seed"];

/// `value` as it may be shown (in `fleetlake config`, errors and logs): a secret key's value is
/// `<redacted>` when set, and a URL's password (`nats://user:secret@host`) is replaced likewise.
pub fn redacted(key: &str, value: &str) -> String {
    if value.is_empty() {
        return String::new();
    }
    if SECRET_KEYS.contains(&key) {
        return "<redacted>".into();
    }
    redact_url(value)
}

/// A URL (or comma-separated URLs) with any password in its user part replaced by `<redacted>`;
/// other text is returned as it is. A URL that does not parse loses everything between `://`
/// and its last `@`.
pub fn redact_url(text: &str) -> String {
    text.split(',')
        .map(|part| match url::Url::parse(part.trim()) {
            Err(_) if part.contains("://") && part.contains('@') => {
                let (scheme, rest) = part.split_once("://").expect("checked");
                let host = rest.rsplit_once('@').map(|(_, h)| h).unwrap_or(rest);
                format!("{scheme}://<redacted>@{host}")
            }
            Ok(mut u) if u.password().is_some() => {
                let _ = u.set_password(Some("<redacted>"));
                u.to_string().trim_end_matches('/').to_string()
            }
            Ok(u) if !u.username().is_empty() && u.has_host() && part.contains('@') => {
                // nats://TOKEN@host: the user part alone is a token.
                let mut u = u.clone();
                let _ = u.set_username("<redacted>");
                u.to_string().trim_end_matches('/').to_string()
            }
            _ => part.to_string(),
        })
        .collect::<Vec<_>>()
        .join(",")
}
