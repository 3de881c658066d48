//! The tokens file (`auth.tokens_file`): tokens with their role, tenants and limits, stored as
//! SHA-256 hashes, created, listed and revoked, and read again when another process changes it.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::Error;

/// What a token may do; each role includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads the usable and final zones.
    Analyst,
    /// Also reads raw and reference, changes reference tables and rules, sees pipelines.
    Engineer,
    /// Also manages tokens and reads the audit table.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Analyst => "analyst",
            Role::Engineer => "engineer",
            Role::Admin => "admin",
        }
    }

    pub fn parse(text: &str) -> Result<Self, Error> {
        match text {
            "analyst" => Ok(Role::Analyst),
            "engineer" => Ok(Role::Engineer),
            "admin" => Ok(Role::Admin),
            other => Err(Error::Invalid(format!(
                "role {other:?}: expected analyst, engineer or admin"
            ))),
        }
    }
}

/// Per-token overrides of the `query.*` limits; `None` takes the configured default.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenLimits {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_rows: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_per_minute: Option<u64>,
}

/// One stored token: everything but the token itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenRecord {
    pub id: String,
    pub name: String,
    pub role: Role,
    /// Empty: every tenant.
    #[serde(default)]
    pub tenants: Vec<String>,
    /// SHA-256 of the whole token, lowercase hex.
    pub sha256: String,
    pub created_at: String,
    pub created_by: String,
    #[serde(default, flatten)]
    pub limits: TokenLimits,
}

impl TokenRecord {
    /// As listed over HTTP: no hash.
    pub fn public_json(&self) -> serde_json::Value {
        serde_json::json!({
            "id": self.id, "name": self.name, "role": self.role.as_str(),
            "tenants": self.tenants, "created_at": self.created_at,
            "created_by": self.created_by, "limits": self.limits,
        })
    }
}

#[derive(Default, Serialize, Deserialize)]
struct TokensFile {
    #[serde(default)]
    token: Vec<TokenRecord>,
}

struct Loaded {
    records: Vec<TokenRecord>,
    /// Why the file does not read now (every token is refused meanwhile).
    broken: Option<String>,
    /// Modification time and length of the file as last read.
    modified: Option<(SystemTime, u64)>,
    checked: Instant,
}

/// The tokens file, cached and read again when it changes (checked at most once a second).
pub struct Tokens {
    path: PathBuf,
    loaded: RwLock<Loaded>,
    /// Serializes writers of the file within this process.
    write: Mutex<()>,
}

/// How often the tokens file's modification time is looked at.
pub(crate) const RELOAD_EVERY: Duration = Duration::from_secs(1);

fn sha256_hex(text: &str) -> String {
    Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn random_hex(bytes: usize) -> Result<String, Error> {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf)
        .map_err(|e| Error::Invalid(format!("the system's random source failed: {e}")))?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

impl Tokens {
    /// Opens the tokens file at `path`; a missing file is an empty set of tokens.
    ///
    /// Errors: the file cannot be read, or is not a list of `[[token]]` tables with the fields
    /// of [`TokenRecord`].
    pub fn open(path: &Path) -> Result<Self, Error> {
        let (records, modified) = read_file(path)?;
        Ok(Self {
            path: path.to_path_buf(),
            loaded: RwLock::new(Loaded {
                records,
                broken: None,
                modified,
                checked: Instant::now(),
            }),
            write: Mutex::new(()),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the file again if it changed since it was last read. A file that became unreadable
    /// keeps the tokens last read (and logs why).
    fn refresh(&self) {
        {
            let loaded = self.loaded.read().expect("tokens lock");
            if loaded.checked.elapsed() < RELOAD_EVERY {
                return;
            }
        }
        self.reload_if_changed();
    }

    /// Reads the file again now if its modification time or length changed.
    fn reload_if_changed(&self) {
        let modified = stamp(&self.path);
        if self.loaded.read().expect("tokens lock").modified == modified {
            return;
        }
        let mut loaded = self.loaded.write().expect("tokens lock");
        loaded.checked = Instant::now();
        if modified == loaded.modified {
            return;
        }
        match read_file(&self.path) {
            Ok((records, modified)) => {
                loaded.records = records;
                loaded.modified = modified;
                loaded.broken = None;
            }
            Err(e) => {
                loaded.broken = Some(e.to_string());
                // Fail closed: a revocation typed into a broken file must not leave the token
                // working. Every token is refused until the file reads again.
                tracing::error!("refusing every token until the tokens file reads again: {e}");
                loaded.records.clear();
                loaded.modified = modified;
            }
        }
    }

    /// The record of `presented`, if it is a valid token. Every stored hash is compared, in
    /// constant time, so the time taken says nothing about which or how much matched.
    ///
    /// A token not found in the cache is looked for again after checking the file, so a token
    /// just created by another process (the CLI, another instance) works at once.
    pub fn authenticate(&self, presented: &str) -> Option<TokenRecord> {
        self.refresh();
        let hash = sha256_hex(presented);
        let find = || {
            let loaded = self.loaded.read().expect("tokens lock");
            let mut found = None;
            for record in &loaded.records {
                if bool::from(record.sha256.as_bytes().ct_eq(hash.as_bytes())) {
                    found = Some(record.clone());
                }
            }
            found
        };
        find().or_else(|| {
            self.reload_if_changed();
            find()
        })
    }

    /// Why the tokens file does not read, if it does not (every token is refused meanwhile).
    pub fn broken(&self) -> Option<String> {
        self.loaded.read().expect("tokens lock").broken.clone()
    }

    pub fn list(&self) -> Vec<TokenRecord> {
        self.refresh();
        self.loaded.read().expect("tokens lock").records.clone()
    }

    pub fn is_empty(&self) -> bool {
        self.refresh();
        self.loaded.read().expect("tokens lock").records.is_empty()
    }

    /// Creates a token and stores its hash; returns the record and the token, which is not
    /// kept anywhere. Errors: an empty or over-long name, a name already in use, or the file
    /// cannot be written.
    pub fn create(
        &self,
        name: &str,
        role: Role,
        tenants: Vec<String>,
        created_by: &str,
        limits: TokenLimits,
    ) -> Result<(TokenRecord, String), Error> {
        let name = name.trim();
        if name.is_empty()
            || name.len() > 100
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c))
        {
            return Err(Error::Invalid(format!(
                "token name {name:?}: expected 1 to 100 letters, digits, '-', '_', '.' or '@'"
            )));
        }
        if name.len() == 8 && name.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(Error::Invalid(format!(
                "token name {name:?} looks like a token id (8 hex digits): choose another, so that revoking by id is never ambiguous"
            )));
        }
        if role == Role::Admin && !tenants.is_empty() {
            return Err(Error::Invalid(
                "an admin token cannot be bound to tenants (the admin routes serve what all tenants share): make an analyst or engineer token for a tenant".into(),
            ));
        }
        for (what, value) in [
            ("timeout_s", limits.timeout_s),
            ("memory_mb", limits.memory_mb),
            ("max_rows", limits.max_rows),
            ("max_concurrent", limits.max_concurrent),
        ] {
            if value == Some(0) {
                return Err(Error::Invalid(format!(
                    "limit {what} = 0 would refuse every query: expected 1 or more (leave it out for the default)"
                )));
            }
        }
        if limits.timeout_s.is_some_and(|t| t > 86_400) {
            return Err(Error::Invalid(
                "limit timeout_s: expected at most 86400 (a day)".into(),
            ));
        }
        if let Some(t) = tenants.iter().find(|t| t.trim().is_empty()) {
            return Err(Error::Invalid(format!(
                "tenant {t:?}: expected a tenant name"
            )));
        }
        let _guard = self.write.lock().expect("tokens write lock");
        let _file_lock = self.lock_file()?;
        let (mut records, _) = read_file(&self.path)?;
        if records.iter().any(|r| r.name == name) {
            return Err(Error::Invalid(format!(
                "a token named {name:?} exists already: revoke it first, or choose another name"
            )));
        }
        let mut id = random_hex(4)?;
        while records.iter().any(|r| r.id == id) {
            id = random_hex(4)?;
        }
        let secret = format!("flk_{id}_{}", random_hex(32)?);
        let record = TokenRecord {
            id,
            name: name.to_string(),
            role,
            tenants,
            sha256: sha256_hex(&secret),
            created_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            created_by: created_by.to_string(),
            limits,
        };
        records.push(record.clone());
        self.store(records)?;
        Ok((record, secret))
    }

    /// Removes the token with this id (or name); `None` if there is none.
    /// An id is matched before a name.
    pub fn revoke(&self, id_or_name: &str) -> Result<Option<TokenRecord>, Error> {
        let _guard = self.write.lock().expect("tokens write lock");
        let _file_lock = self.lock_file()?;
        let (mut records, _) = read_file(&self.path)?;
        let Some(at) = records
            .iter()
            .position(|r| r.id == id_or_name)
            .or_else(|| records.iter().position(|r| r.name == id_or_name))
        else {
            return Ok(None);
        };
        let removed = records.remove(at);
        self.store(records)?;
        Ok(Some(removed))
    }

    /// An exclusive lock on `<file>.lock`, held while the file is read, changed and written, so
    /// that two processes (the CLI and a server) never lose each other's changes.
    fn lock_file(&self) -> Result<std::fs::File, Error> {
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::Invalid(format!("creating {}: {e}", dir.display())))?;
        }
        let path = self.path.with_extension("toml.lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| Error::Invalid(format!("opening {}: {e}", path.display())))?;
        file.lock()
            .map_err(|e| Error::Invalid(format!("locking {}: {e}", path.display())))?;
        Ok(file)
    }

    /// Writes the file (a temporary file renamed over it, mode 0600) and the cache.
    fn store(&self, records: Vec<TokenRecord>) -> Result<(), Error> {
        let text = toml::to_string(&TokensFile {
            token: records.clone(),
        })
        .map_err(|e| Error::Invalid(format!("encoding the tokens: {e}")))?;
        let text = format!(
            "# fleetlake tokens: SHA-256 hashes only. Managed by `fleetlake token` and /v1/tokens.\n{text}"
        );
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::Invalid(format!("creating {}: {e}", dir.display())))?;
        }
        let tmp = self
            .path
            .with_extension(format!("toml.{}.tmp", std::process::id()));
        {
            use std::io::Write;
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create(true).truncate(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            let mut file = options
                .open(&tmp)
                .map_err(|e| Error::Invalid(format!("writing {}: {e}", tmp.display())))?;
            file.write_all(text.as_bytes())
                .and_then(|_| file.sync_all())
                .map_err(|e| Error::Invalid(format!("writing {}: {e}", tmp.display())))?;
        }
        std::fs::rename(&tmp, &self.path)
            .map_err(|e| Error::Invalid(format!("replacing {}: {e}", self.path.display())))?;
        let mut loaded = self.loaded.write().expect("tokens lock");
        loaded.records = records;
        loaded.modified = stamp(&self.path);
        loaded.checked = Instant::now();
        Ok(())
    }
}

/// The file's modification time and length (`None` if it does not exist).
fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

type FileContents = (Vec<TokenRecord>, Option<(SystemTime, u64)>);

fn read_file(path: &Path) -> Result<FileContents, Error> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), None)),
        Err(e) => {
            return Err(Error::Invalid(format!(
                "reading the tokens file {}: {e}",
                path.display()
            )));
        }
    };
    let modified = stamp(path);
    let file: TokensFile = toml::from_str(&text).map_err(|e| {
        Error::Invalid(format!(
            "the tokens file {} is not a list of [[token]] tables (id, name, role, tenants, sha256, created_at, created_by): {e}",
            path.display()
        ))
    })?;
    Ok((file.token, modified))
}
