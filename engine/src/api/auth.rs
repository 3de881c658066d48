//! Bearer tokens with roles and tenants, the route → role table, and per-token query limits.
//!
//! A token is `flk_<id>_<secret>`: `id` (8 hex digits) names it in lists and the audit, the rest
//! is 32 random bytes. Only its SHA-256 is stored, in the tokens file (`auth.tokens_file`,
//! TOML, written with mode 0600); the token itself is shown once, when it is created by
//! `fleetlake token create` or `POST /v1/tokens`. A presented token is hashed and compared with
//! the stored hash in constant time ([`subtle`]). The file is read again when it changes, so a
//! token created or revoked by the CLI applies to a running server within a second.
//!
//! Roles (each includes the one before): `analyst` reads the usable and final zones; `engineer`
//! also reads raw and reference and changes reference tables and rules; `admin` also manages
//! tokens and reads `final.audit`. A token may be bound to tenants: it then sees only rows whose
//! tenant column is one of them ([`fleetlake_sql::access`]) and may change nothing shared.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::Method;

#[cfg(test)]
use crate::api::tokens::RELOAD_EVERY;

pub use crate::api::tokens::{Role, TokenLimits, TokenRecord, Tokens};
use crate::error::Error;

/// What a route requires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Requirement {
    /// No token needed.
    Public,
    /// A token of at least this role.
    Role(Role),
    /// A token of at least this role, not bound to tenants (the change is shared by all).
    Unbound(Role),
}

/// Every route and what it requires: the middleware's table, also printed in the README.
pub const ROUTES: &[(&str, &str, Requirement)] = &[
    ("GET", "/healthz", Requirement::Public),
    ("GET", "/metrics", Requirement::Unbound(Role::Engineer)),
    ("POST", "/v1/query", Requirement::Role(Role::Analyst)),
    ("GET", "/v1/tables", Requirement::Role(Role::Analyst)),
    ("GET", "/v1/devices", Requirement::Role(Role::Analyst)),
    ("GET", "/v1/devices/{id}", Requirement::Role(Role::Analyst)),
    (
        "GET",
        "/v1/fleet/outliers",
        Requirement::Role(Role::Analyst),
    ),
    (
        "GET",
        "/v1/fleet/root-cause",
        Requirement::Role(Role::Analyst),
    ),
    // Fleet-wide counters and rule texts: not for a token bound to tenants.
    ("GET", "/v1/pipelines", Requirement::Unbound(Role::Engineer)),
    ("GET", "/v1/cluster", Requirement::Unbound(Role::Engineer)),
    ("GET", "/v1/rules", Requirement::Unbound(Role::Engineer)),
    (
        "GET",
        "/v1/rules/{name}",
        Requirement::Unbound(Role::Engineer),
    ),
    (
        "PUT",
        "/v1/rules/{name}",
        Requirement::Unbound(Role::Engineer),
    ),
    (
        "DELETE",
        "/v1/rules/{name}",
        Requirement::Unbound(Role::Engineer),
    ),
    (
        "PUT",
        "/v1/reference/{table}",
        Requirement::Unbound(Role::Engineer),
    ),
    ("GET", "/v1/tokens", Requirement::Unbound(Role::Admin)),
    ("POST", "/v1/tokens", Requirement::Unbound(Role::Admin)),
    (
        "DELETE",
        "/v1/tokens/{id}",
        Requirement::Unbound(Role::Admin),
    ),
];

/// What a request for `method` `path` requires; a path that is no route needs a token of any
/// role (so that probing for routes needs one too).
pub fn requirement(method: &Method, path: &str, public_metrics: bool) -> Requirement {
    if path == "/metrics" && public_metrics {
        return Requirement::Public;
    }
    for (m, pattern, req) in ROUTES {
        if *m == method.as_str() && matches(pattern, path) {
            return *req;
        }
    }
    // HEAD is GET without a body.
    if method == Method::HEAD {
        return requirement(&Method::GET, path, public_metrics);
    }
    Requirement::Role(Role::Analyst)
}

/// `/v1/rules/{name}` matches `/v1/rules/x` (one segment per placeholder).
fn matches(pattern: &str, path: &str) -> bool {
    let (p, q): (Vec<&str>, Vec<&str>) = (pattern.split('/').collect(), path.split('/').collect());
    p.len() == q.len()
        && p.iter()
            .zip(&q)
            .all(|(a, b)| (a.starts_with('{') && !b.is_empty()) || a == b)
}

/// The caller of a request: its token's identity, role, tenants and resolved limits.
#[derive(Debug, Clone)]
pub struct Principal {
    pub id: String,
    pub name: String,
    pub role: Role,
    /// `None`: every tenant.
    pub tenants: Option<Vec<String>>,
    pub limits: Limits,
}

impl Principal {
    /// How the principal is named in errors and the audit: `token grafana (analyst)`.
    pub fn describe(&self) -> String {
        format!("token {} ({})", self.name, self.role.as_str())
    }
}

/// The caller of a request as the handlers see it: its principal and its address.
#[derive(Debug, Clone)]
pub struct Caller {
    pub principal: Principal,
    /// The peer's address (`None` when the server was built without connection info).
    pub address: Option<std::net::SocketAddr>,
}

pub use crate::config::Limits;

/// `final.audit`, the admins' record of who did what ([`crate::api::audit`]).
pub fn audit_table() -> fleetlake_zones::TableId {
    fleetlake_zones::TableId::new(fleetlake_zones::Zone::Final, "audit")
}

impl TokenLimits {
    /// The configured defaults with this token's overrides.
    pub fn resolve(&self, defaults: &Limits) -> Limits {
        let token = self;
        Limits {
            timeout: token
                .timeout_s
                .map(Duration::from_secs)
                .unwrap_or(defaults.timeout),
            memory_bytes: token
                .memory_mb
                .map(|m| (m as usize).saturating_mul(1024 * 1024))
                .unwrap_or(defaults.memory_bytes),
            max_rows: token
                .max_rows
                .map(|r| r as usize)
                .unwrap_or(defaults.max_rows),
            max_concurrent: token
                .max_concurrent
                .map(|c| c as usize)
                .unwrap_or(defaults.max_concurrent),
            rate_per_minute: token.rate_per_minute.unwrap_or(defaults.rate_per_minute),
        }
    }
}

/// Authentication and the per-token admission state of the SQL routes.
pub struct Auth {
    /// `None`: authentication is off (`auth.enabled = false`) and every caller is an admin.
    pub tokens: Option<Tokens>,
    pub public_metrics: bool,
    pub defaults: Limits,
    /// The column naming a row's tenant, and the tables that hold no tenant's rows.
    pub tenant_column: String,
    pub tenant_free: Vec<fleetlake_zones::TableId>,
    running: Mutex<HashMap<String, Arc<tokio::sync::Semaphore>>>,
    rates: Mutex<HashMap<String, Arc<governor::DefaultDirectRateLimiter>>>,
}

/// Why a request was not admitted: HTTP status, code and message.
#[derive(Debug)]
pub struct Denied {
    pub status: axum::http::StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Seconds to wait, for a 429.
    pub retry_after: Option<u64>,
}

impl Auth {
    pub fn from_config(config: &crate::config::Config) -> Result<Self, Error> {
        let tokens = if config.get("auth.enabled") == "true" {
            Some(Tokens::open(Path::new(config.get("auth.tokens_file")))?)
        } else {
            None
        };
        Ok(Self::new(
            tokens,
            config.get("auth.public_metrics") == "true",
            config.query_limits(),
            config.get("auth.tenant_column").to_string(),
            config.tenant_free_tables(),
        ))
    }

    pub fn new(
        tokens: Option<Tokens>,
        public_metrics: bool,
        defaults: Limits,
        tenant_column: String,
        tenant_free: Vec<fleetlake_zones::TableId>,
    ) -> Self {
        Self {
            tokens,
            public_metrics,
            defaults,
            tenant_column,
            tenant_free,
            running: Mutex::new(HashMap::new()),
            rates: Mutex::new(HashMap::new()),
        }
    }

    /// Who presents `authorization` (the header's value), if anyone may pass.
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<Principal, Denied> {
        let Some(tokens) = &self.tokens else {
            return Ok(Principal {
                id: "-".into(),
                name: "anonymous".into(),
                role: Role::Admin,
                tenants: None,
                limits: self.defaults.clone(),
            });
        };
        let unauthorized = |message: String| Denied {
            status: axum::http::StatusCode::UNAUTHORIZED,
            code: "unauthorized",
            message,
            retry_after: None,
        };
        let Some(value) = authorization else {
            let hint = if tokens.is_empty() {
                format!(
                    "no token has been created yet: run `fleetlake token create --name NAME --role admin --set auth.tokens_file={}` (the file this server reads)",
                    tokens.path().display()
                )
            } else {
                "create one with `fleetlake token create` or POST /v1/tokens".to_string()
            };
            return Err(unauthorized(format!(
                "this route needs a token: send Authorization: Bearer <token>; {hint}"
            )));
        };
        let presented = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .map(str::trim)
            .ok_or_else(|| unauthorized("expected Authorization: Bearer <token>".to_string()))?;
        let record = tokens.authenticate(presented).ok_or_else(|| {
            if let Some(reason) = tokens.broken() {
                return Denied {
                    status: axum::http::StatusCode::SERVICE_UNAVAILABLE,
                    code: "tokens_file_unreadable",
                    message: format!(
                        "every token is refused until the tokens file reads again: {reason}"
                    ),
                    retry_after: None,
                };
            }
            unauthorized("the token is not valid (unknown or revoked)".into())
        })?;
        Ok(Principal {
            limits: record.limits.resolve(&self.defaults),
            id: record.id,
            name: record.name,
            role: record.role,
            tenants: (!record.tenants.is_empty()).then_some(record.tenants),
        })
    }

    /// Whether `principal` meets `requirement`.
    pub fn authorize(principal: &Principal, requirement: Requirement) -> Result<(), Denied> {
        let forbidden = |message: String| Denied {
            status: axum::http::StatusCode::FORBIDDEN,
            code: "forbidden",
            message,
            retry_after: None,
        };
        match requirement {
            Requirement::Public => Ok(()),
            Requirement::Role(role) | Requirement::Unbound(role) if principal.role < role => {
                Err(forbidden(format!(
                    "{} may not use this route: it needs the {} role",
                    principal.describe(),
                    role.as_str()
                )))
            }
            Requirement::Unbound(_) if principal.tenants.is_some() => Err(forbidden(format!(
                "{} is bound to tenants, and this route serves or changes what all tenants share",
                principal.describe()
            ))),
            _ => Ok(()),
        }
    }

    /// Admits one query of `principal`: its request rate and concurrent queries are within
    /// its limits. The permit is held until the query is answered.
    pub fn admit(
        &self,
        principal: &Principal,
    ) -> Result<tokio::sync::OwnedSemaphorePermit, Denied> {
        let limits = &principal.limits;
        if let Some(per_minute) = std::num::NonZeroU32::new(limits.rate_per_minute as u32) {
            let limiter = self
                .rates
                .lock()
                .expect("rates lock")
                .entry(principal.id.clone())
                .or_insert_with(|| {
                    Arc::new(governor::RateLimiter::direct(governor::Quota::per_minute(
                        per_minute,
                    )))
                })
                .clone();
            if let Err(not_until) = limiter.check() {
                let wait = not_until
                    .wait_time_from(governor::clock::Clock::now(
                        &governor::clock::DefaultClock::default(),
                    ))
                    .as_secs()
                    + 1;
                return Err(Denied {
                    status: axum::http::StatusCode::TOO_MANY_REQUESTS,
                    code: "rate_limited",
                    message: format!(
                        "{} sent more than {per_minute} queries a minute (query.rate_per_minute): retry in {wait} s",
                        principal.describe()
                    ),
                    retry_after: Some(wait),
                });
            }
        }
        let semaphore = self
            .running
            .lock()
            .expect("running lock")
            .entry(principal.id.clone())
            .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(limits.max_concurrent.max(1))))
            .clone();
        semaphore.try_acquire_owned().map_err(|_| Denied {
            status: axum::http::StatusCode::TOO_MANY_REQUESTS,
            code: "too_many_concurrent_queries",
            message: format!(
                "{} already runs {} quer{}, the most it may run at once (query.max_concurrent): retry when one has answered",
                principal.describe(),
                limits.max_concurrent,
                if limits.max_concurrent == 1 { "y" } else { "ies" }
            ),
            retry_after: Some(1),
        })
    }

    /// What `principal` may read with SQL.
    pub fn access(&self, principal: &Principal) -> fleetlake_sql::access::Access {
        use fleetlake_zones::Zone;
        let zones = match principal.role {
            Role::Analyst => vec![Zone::Usable, Zone::Final],
            Role::Engineer | Role::Admin => Zone::ALL.to_vec(),
        };
        // The audit is the admins'; the rules' audit (rule texts and authors) the engineers'.
        let hidden = match principal.role {
            Role::Admin => Vec::new(),
            Role::Engineer => vec![audit_table()],
            Role::Analyst => vec![audit_table(), crate::api::rules::audit_table()],
        };
        fleetlake_sql::access::Access {
            who: principal.describe(),
            zones,
            hidden,
            tenants: principal.tenants.clone(),
            tenant_column: self.tenant_column.clone(),
            tenant_free: self.tenant_free.clone(),
            memory_limit: Some(principal.limits.memory_bytes),
            max_rows: Some(principal.limits.max_rows),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_need_their_role() {
        let get = Method::GET;
        assert_eq!(requirement(&get, "/healthz", false), Requirement::Public);
        assert_eq!(
            requirement(&get, "/metrics", false),
            Requirement::Unbound(Role::Engineer)
        );
        assert_eq!(requirement(&get, "/metrics", true), Requirement::Public);
        assert_eq!(
            requirement(&Method::PUT, "/v1/rules/hot", false),
            Requirement::Unbound(Role::Engineer)
        );
        assert_eq!(
            requirement(&get, "/v1/rules/hot", false),
            Requirement::Unbound(Role::Engineer)
        );
        assert_eq!(
            requirement(&Method::DELETE, "/v1/tokens/ab12cd34", false),
            Requirement::Unbound(Role::Admin)
        );
        // Not a route: still needs a token.
        assert_eq!(
            requirement(&get, "/v1/nothing", false),
            Requirement::Role(Role::Analyst)
        );
        assert_eq!(
            requirement(&get, "/v1/rules/", false),
            Requirement::Role(Role::Analyst)
        );
    }

    #[test]
    fn tokens_are_stored_hashed_checked_and_revoked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.toml");
        let tokens = Tokens::open(&path).unwrap();
        assert!(tokens.is_empty());
        let (record, secret) = tokens
            .create(
                "grafana",
                Role::Analyst,
                vec!["acme".into()],
                "test",
                TokenLimits::default(),
            )
            .unwrap();
        assert!(secret.starts_with(&format!("flk_{}_", record.id)));
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains(&secret), "{text}");
        assert!(text.contains(&record.sha256));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "{mode:o}");
        }
        assert_eq!(tokens.authenticate(&secret).unwrap().name, "grafana");
        assert!(tokens.authenticate(&format!("{secret}x")).is_none());
        assert!(tokens.authenticate("").is_none());
        assert!(
            tokens
                .create("grafana", Role::Admin, vec![], "t", TokenLimits::default())
                .unwrap_err()
                .to_string()
                .contains("exists already")
        );
        assert!(
            tokens
                .create("bad name", Role::Admin, vec![], "t", TokenLimits::default())
                .is_err()
        );
        // Tokens that could never do anything are refused.
        assert!(
            tokens
                .create(
                    "a",
                    Role::Admin,
                    vec!["acme".into()],
                    "t",
                    TokenLimits::default()
                )
                .is_err()
        );
        let zero = TokenLimits {
            max_rows: Some(0),
            ..Default::default()
        };
        assert!(
            tokens
                .create("z", Role::Analyst, vec![], "t", zero)
                .is_err()
        );
        // A name shaped like an id would make revoking by id ambiguous.
        assert!(
            tokens
                .create("ab12cd34", Role::Admin, vec![], "t", TokenLimits::default())
                .unwrap_err()
                .to_string()
                .contains("looks like a token id")
        );
        // Another process (the CLI) sees the same file.
        let again = Tokens::open(&path).unwrap();
        assert!(again.authenticate(&secret).is_some());
        assert_eq!(again.revoke(&record.id).unwrap().unwrap().name, "grafana");
        assert!(again.authenticate(&secret).is_none());
        // The first handle notices the change within a second.
        std::thread::sleep(RELOAD_EVERY + Duration::from_millis(50));
        assert!(tokens.authenticate(&secret).is_none());
        // A token made by another process works at once, without waiting for a reload.
        let (_, fresh) = again
            .create("fresh", Role::Engineer, vec![], "t", TokenLimits::default())
            .unwrap();
        assert_eq!(tokens.authenticate(&fresh).unwrap().name, "fresh");
    }

    #[test]
    fn a_malformed_tokens_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.toml");
        std::fs::write(&path, "[[token]]\nname = 3\n").unwrap();
        let err = Tokens::open(&path).err().unwrap().to_string();
        assert!(err.contains("tokens.toml"), "{err}");
    }

    #[test]
    fn concurrency_and_rate_are_limited_per_token() {
        let defaults = Limits {
            timeout: Duration::from_secs(5),
            memory_bytes: 1 << 20,
            max_rows: 10,
            max_concurrent: 1,
            rate_per_minute: 3,
        };
        let auth = Auth::new(None, false, defaults.clone(), "tenant".into(), vec![]);
        let p = Principal {
            id: "a".into(),
            name: "a".into(),
            role: Role::Analyst,
            tenants: None,
            limits: defaults,
        };
        let permit = auth.admit(&p).unwrap();
        let busy = auth.admit(&p).unwrap_err();
        assert_eq!(busy.code, "too_many_concurrent_queries");
        drop(permit);
        // The rate: 3 a minute, two used above.
        let _permit = auth.admit(&p).unwrap();
        let limited = auth.admit(&p).unwrap_err();
        assert_eq!(limited.code, "rate_limited");
        assert_eq!(limited.status.as_u16(), 429);
        // Another token is not affected.
        let q = Principal {
            id: "b".into(),
            ..p.clone()
        };
        let _other = auth.admit(&q).unwrap();
    }
}
