//! Durable state behind one trait: merged profiles, segment memberships, dataflow segment
//! mappings and the outbox. SQLite (embedded, WAL) is the default; a PostgreSQL backend
//! implements the same trait for scale-out.
//!
//! The outbox holds one row per (dataflow, profile): a second change before delivery bumps
//! the row's version instead of adding a row (coalescing: the latest state is sent once), and
//! per-profile order holds because a profile has at most one delivery in flight per dataflow.
//! A delivery acknowledges only the version it sent; a newer version stays queued.
//!
//! Must never: acknowledge an update before it is committed, or lose an outbox row on crash.

pub mod postgres;
pub mod sqlite;

use std::collections::HashMap;

use crate::audit::{AuditRecord, Chain, ChainedRecord};
use crate::delivery::FailureClass;
use crate::profile::state::Profile;
use crate::profile::trigger::Reasons;
use crate::profile::update::ProfileUpdate;
use crate::profile::MappedSegment;

pub use postgres::PgStore;
pub use sqlite::SqliteStore;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The server's own message (tokio-postgres' Display says only "db error"), and its
    /// SQLSTATE when it sent one.
    #[error("store: PostgreSQL: {message}")]
    Postgres {
        message: String,
        code: Option<tokio_postgres::error::SqlState>,
    },
    #[error("store: {path}: {reason}")]
    Open { path: String, reason: String },
    #[error("store: stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("store: unsupported URL '{0}' (expected sqlite://PATH or postgres://…)")]
    Url(String),
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        let message = match e.as_db_error() {
            Some(db) => match db.detail() {
                Some(d) => format!("{}: {} ({d})", db.severity(), db.message()),
                None => format!("{}: {}", db.severity(), db.message()),
            },
            None => match std::error::Error::source(&e) {
                Some(cause) => format!("{e}: {cause}"),
                None => e.to_string(),
            },
        };
        StoreError::Postgres {
            message,
            code: e.code().cloned(),
        }
    }
}

/// One queued delivery, claimed for sending.
#[derive(Debug, Clone)]
pub struct OutboxItem {
    pub id: i64,
    pub version: i64,
    pub profile: Profile,
    /// The profile's identity map as the store keeps it, when that is the canonical JSON the
    /// payload carries (sorted keys, as `serde_json` writes a map). The claim then does not
    /// parse it and `profile.identity_map` is left empty: the payload embeds these bytes.
    pub identity_map_json: Option<Box<serde_json::value::RawValue>>,
    /// Mapped segments whose status changes triggered this delivery (coalesced).
    pub segments: Vec<String>,
    pub reasons: Reasons,
    pub attempts: u32,
    /// UNIX ms when first enqueued.
    pub enqueued_at: i64,
}

/// One failed attempt, as kept with a queued delivery and its dead letter.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AttemptError {
    /// UNIX ms.
    pub at: i64,
    pub attempt: u32,
    /// The delivery error kind (`timeout`, `http_status`, …).
    pub kind: String,
    pub status: Option<u16>,
    pub message: String,
}

/// An attempt error as shown (`dlq show`, the admin API): with its failure class.
#[derive(serde::Serialize)]
struct ShownAttemptError<'a> {
    #[serde(flatten)]
    error: &'a AttemptError,
    class: FailureClass,
}

/// Attempt errors serialised with their class (stored histories keep the plain form).
fn errors_with_class<S: serde::Serializer>(errors: &[AttemptError], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(errors.iter().map(|error| ShownAttemptError {
        error,
        class: error.class(),
    }))
}

impl AttemptError {
    /// The failure class of this attempt, from its kind and status.
    pub fn class(&self) -> crate::delivery::FailureClass {
        let kind = serde_json::from_value(serde_json::Value::String(self.kind.clone()))
            .unwrap_or(crate::delivery::ErrorKind::Internal);
        crate::delivery::FailureClass::of(kind, self.status)
    }
}

/// Why a dataflow is paused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PauseReason {
    /// An operator paused it; only an operator resumes it.
    Manual,
    /// The circuit breaker tripped; a successful probe resumes it.
    Breaker,
}

impl PauseReason {
    pub fn as_str(self) -> &'static str {
        match self {
            PauseReason::Manual => "manual",
            PauseReason::Breaker => "breaker",
        }
    }

    fn parse(s: &str) -> Result<Self, StoreError> {
        match s {
            "manual" => Ok(PauseReason::Manual),
            "breaker" => Ok(PauseReason::Breaker),
            other => Err(StoreError::Corrupt(format!("pause reason '{other}'"))),
        }
    }
}

/// A paused dataflow, as stored: it survives a restart and is shared by every instance on
/// the same store. A running dataflow has no row.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Pause {
    pub dataflow: String,
    pub reason: PauseReason,
    /// The failure class that tripped the breaker (`None` for a manual pause).
    pub class: Option<String>,
    /// Why, in a sentence (the error that tripped the breaker, or the operator's note).
    pub message: String,
    /// UNIX ms when paused.
    pub since: i64,
    /// UNIX ms of the next probe delivery (breaker pauses only).
    pub probe_at: i64,
    /// The wait before the probe after next, ms (it grows up to a cap).
    pub probe_interval_ms: i64,
}

impl Pause {
    /// An operator's pause of `dataflow` from `now` (UNIX ms), with their note (control
    /// characters dropped, at most 500 characters) or a default one.
    pub fn manual(dataflow: &str, message: Option<String>, now: i64) -> Pause {
        Pause {
            dataflow: dataflow.to_owned(),
            reason: PauseReason::Manual,
            class: None,
            message: message
                .map(|m| m.chars().filter(|c| !c.is_control()).take(500).collect())
                .unwrap_or_else(|| "paused by an operator".into()),
            since: now,
            probe_at: 0,
            probe_interval_ms: 0,
        }
    }
}

/// What happened to a claimed item.
#[derive(Debug, Clone)]
pub enum Completion {
    /// Delivered: remove the row if its version is still `version`.
    Delivered { id: i64, version: i64 },
    /// Failed: try again at `retry_at` (UNIX ms).
    Failed {
        id: i64,
        retry_at: i64,
        error: AttemptError,
    },
    /// Not sent, or failed while the dataflow is paused: back in line at `retry_at` without
    /// counting an attempt (a pause never makes a dead letter).
    Requeue { id: i64, retry_at: i64 },
    /// One member of a request that became a dead letter of its own ([`Completion::DeadBatch`]):
    /// remove the row if its version is still `version` (the letter holds what was sent).
    Parked { id: i64, version: i64 },
    /// A request of several profiles failed for the last time: park its body as one dead
    /// letter under its key. Its rows end with [`Completion::Parked`].
    DeadBatch {
        dataflow: String,
        /// Who was in it: the profile ids, or their count and hash when many.
        members: String,
        idempotency_key: String,
        payload: Vec<u8>,
        attempts: u32,
        error: AttemptError,
    },
    /// Failed for the last time: park `payload` as a dead letter under `idempotency_key`.
    /// If the row changed while in flight, the newer state stays queued for a fresh try.
    Dead {
        id: i64,
        version: i64,
        idempotency_key: String,
        payload: Vec<u8>,
        error: AttemptError,
    },
}

impl Completion {
    /// The outbox row it completes (none for a batch's dead letter).
    pub fn id(&self) -> Option<i64> {
        match self {
            Completion::Delivered { id, .. }
            | Completion::Failed { id, .. }
            | Completion::Requeue { id, .. }
            | Completion::Parked { id, .. }
            | Completion::Dead { id, .. } => Some(*id),
            Completion::DeadBatch { .. } => None,
        }
    }
}

/// A delivery that failed every attempt, kept for replay.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetter {
    pub id: i64,
    pub dataflow: String,
    pub profile_id: String,
    pub idempotency_key: String,
    #[serde(skip)]
    pub payload: Vec<u8>,
    pub payload_bytes: usize,
    pub attempts: u32,
    /// The class of its last attempt's failure.
    pub class: FailureClass,
    #[serde(serialize_with = "errors_with_class")]
    pub errors: Vec<AttemptError>,
    /// UNIX ms.
    pub created_at: i64,
}

impl DeadLetter {
    /// The class a stored row carries, or, when it has none (written before classes were
    /// stored), that of its last error.
    fn stored_class(class: Option<&str>, errors: &[AttemptError]) -> Result<FailureClass, StoreError> {
        match class {
            Some(c) => c
                .parse()
                .map_err(|_| StoreError::Corrupt(format!("dead letter class '{c}'"))),
            None => Ok(errors.last().map_or(FailureClass::Internal, AttemptError::class)),
        }
    }
}

/// Which dead letters to list (and so replay or purge): every given condition holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterFilter {
    pub dataflow: Option<String>,
    pub class: Option<FailureClass>,
    /// Created at or after (UNIX ms).
    pub since_ms: Option<i64>,
    /// Created before (UNIX ms).
    pub until_ms: Option<i64>,
    /// Ids above this one only (to page through a list).
    pub after_id: Option<i64>,
    /// At most this many, oldest first (100 by default).
    pub limit: usize,
}

impl Default for DeadLetterFilter {
    fn default() -> Self {
        DeadLetterFilter {
            dataflow: None,
            class: None,
            since_ms: None,
            until_ms: None,
            after_id: None,
            limit: 100,
        }
    }
}

impl DeadLetterFilter {
    /// Whether any condition other than the limit is set.
    pub fn selects(&self) -> bool {
        self.dataflow.is_some()
            || self.class.is_some()
            || self.since_ms.is_some()
            || self.until_ms.is_some()
            || self.after_id.is_some()
    }

    /// The limit as SQL takes it.
    fn sql_limit(&self) -> i64 {
        i64::try_from(self.limit).unwrap_or(i64::MAX)
    }

    /// The conditions as SQL (`WHERE …`, or nothing) with placeholders `{mark}1`, `{mark}2`, …
    /// (`?` for SQLite, `$` for PostgreSQL), and the values they stand for, in order. Only the
    /// conditions given are written, so the database can use an index for each.
    fn sql_where(&self, mark: char) -> (String, Vec<SqlValue>) {
        let mut conditions: Vec<String> = Vec::new();
        let mut values = Vec::new();
        let mut add = |condition: &str, value: SqlValue| {
            values.push(value);
            conditions.push(format!("{condition} {mark}{}", values.len()));
        };
        if let Some(d) = &self.dataflow {
            add("dataflow =", SqlValue::Text(d.clone()));
        }
        if let Some(c) = self.class {
            add("class =", SqlValue::Text(c.as_str().to_owned()));
        }
        if let Some(t) = self.since_ms {
            add("created_at >=", SqlValue::Int(t));
        }
        if let Some(t) = self.until_ms {
            add("created_at <", SqlValue::Int(t));
        }
        if let Some(id) = self.after_id {
            add("id >", SqlValue::Int(id));
        }
        let clause = if conditions.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", conditions.join(" AND "))
        };
        (clause, values)
    }
}

/// A value bound to a filter's placeholder.
enum SqlValue {
    Text(String),
    Int(i64),
}

/// A point in time given as RFC 3339 (`2026-12-04T10:00:00Z`) or as a duration back from
/// `now_ms` (`10m`, `2h`, `1d`): UNIX ms.
pub fn parse_time_or_ago(s: &str, now_ms: i64) -> Result<i64, String> {
    if let Some(t) = crate::profile::update::rfc3339_to_unix_ms(s.trim()) {
        return Ok(t);
    }
    match crate::config::parse_duration(s) {
        Ok(d) => Ok(now_ms.saturating_sub(i64::try_from(d.as_millis()).unwrap_or(i64::MAX))),
        Err(_) => Err(format!(
            "'{s}' is neither an RFC 3339 time (2026-12-04T10:00:00Z) nor a duration back from now (10m, 2h)"
        )),
    }
}

/// The decision for one update: which dataflows to enqueue the profile for, and why.
pub use crate::profile::batch::Enqueues;

/// Persistent state of the export engine. Methods block; call them from `spawn_blocking`.
pub trait Store: Send + Sync + 'static {
    /// Apply a batch in one transaction. `apply` merges each update into the stored profile
    /// (a fresh one if new) and returns the dataflows to enqueue it for. Returns when the
    /// transaction is durable.
    fn apply_updates(
        &self,
        updates: Vec<ProfileUpdate>,
        apply: &mut dyn FnMut(&mut Profile, ProfileUpdate) -> Enqueues,
    ) -> Result<(), StoreError>;

    /// Record the dataflow's mapped segments. Returns each mapping's times and the segments
    /// that were not mapped before (to backfill).
    fn sync_mappings(
        &self,
        dataflow: &str,
        segments: &[String],
        now_ms: i64,
    ) -> Result<(HashMap<String, MappedSegment>, Vec<String>), StoreError>;

    /// Enqueue every profile that belongs to `segment` for `dataflow`. Returns how many.
    fn backfill(&self, dataflow: &str, segment: &str, now_ms: i64) -> Result<u64, StoreError>;

    /// Lease up to `limit` due rows of `dataflow`, oldest first.
    fn claim(
        &self,
        dataflow: &str,
        limit: usize,
        now_ms: i64,
        lease_ms: i64,
    ) -> Result<Vec<OutboxItem>, StoreError>;

    /// Record the outcome of claimed rows and their audit records, in one transaction.
    fn complete(&self, results: &[Completion], audit: &[AuditRecord]) -> Result<(), StoreError>;

    /// Append audit records (attempts made outside the outbox, such as replays).
    fn append_audit(&self, audit: &[AuditRecord]) -> Result<(), StoreError>;

    /// The audit chain this process appends to.
    fn chain_id(&self) -> String;

    /// Every audit chain in the store (one per gateway process on a shared store).
    fn audit_chains(&self) -> Result<Vec<String>, StoreError>;

    /// Records of one audit chain after `after_seq`, in order, at most `limit`.
    fn audit_chain_records(
        &self,
        chain: &str,
        after_seq: i64,
        limit: usize,
    ) -> Result<Vec<ChainedRecord>, StoreError>;

    /// Records of this process's audit chain after `after_seq`, in order, at most `limit`.
    fn audit_records(&self, after_seq: i64, limit: usize) -> Result<Vec<ChainedRecord>, StoreError> {
        self.audit_chain_records(&self.chain_id(), after_seq, limit)
    }

    /// Whether other gateway instances may change this store (dataflows managed through
    /// another instance's admin API must then be picked up by polling).
    fn shared(&self) -> bool {
        false
    }

    /// The head of a dataflow's queue: how many rows are due now (counting up to `cap`), and
    /// when the oldest due one was first enqueued (UNIX ms).
    fn queue_head(&self, dataflow: &str, now_ms: i64, cap: usize)
        -> Result<(usize, Option<i64>), StoreError>;

    /// Rows waiting (all dataflows when `None`).
    fn pending(&self, dataflow: Option<&str>) -> Result<u64, StoreError>;

    /// Load one profile.
    fn profile(&self, id: &str) -> Result<Option<Profile>, StoreError>;

    /// Dead letters, oldest first (one dataflow's when given).
    fn dead_letters(&self, dataflow: Option<&str>, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
        self.dead_letters_where(&DeadLetterFilter {
            dataflow: dataflow.map(str::to_owned),
            limit,
            ..DeadLetterFilter::default()
        })
    }

    /// Dead letters that match `filter`, oldest first (selected by the database).
    fn dead_letters_where(&self, filter: &DeadLetterFilter) -> Result<Vec<DeadLetter>, StoreError>;

    /// One dead letter.
    fn dead_letter(&self, id: i64) -> Result<Option<DeadLetter>, StoreError>;

    /// Remove a dead letter (replayed or purged). Returns whether it existed.
    fn remove_dead_letter(&self, id: i64) -> Result<bool, StoreError>;

    /// Record a failed replay attempt on a dead letter (its class becomes that attempt's).
    fn dead_letter_failed(&self, id: i64, error: &AttemptError) -> Result<(), StoreError>;

    /// Every paused dataflow.
    fn pauses(&self) -> Result<Vec<Pause>, StoreError>;

    /// Pause a dataflow, or update its pause. A breaker pause never replaces a manual one
    /// (the operator's word stands); a manual pause replaces a breaker one. Returns whether
    /// the stored pause is now `pause`.
    fn pause(&self, pause: &Pause) -> Result<bool, StoreError>;

    /// Resume a dataflow: remove its pause (only a breaker pause when `breaker_only`).
    /// Returns whether it was paused (and is now resumed).
    fn resume(&self, dataflow: &str, breaker_only: bool) -> Result<bool, StoreError>;

    /// Dataflows managed through the admin API: (name, JSON).
    fn api_dataflows(&self) -> Result<Vec<(String, String)>, StoreError>;

    /// Create or replace an API-managed dataflow.
    fn save_api_dataflow(&self, name: &str, json: &str) -> Result<(), StoreError>;

    /// Remove an API-managed dataflow with its queued deliveries and segment mappings.
    /// Returns whether it existed.
    fn delete_api_dataflow(&self, name: &str) -> Result<bool, StoreError>;
}

/// Open the store a config names.
pub fn open(cfg: &crate::config::Config) -> Result<std::sync::Arc<dyn Store>, StoreError> {
    let url = &cfg.store.url;
    if let Some(path) = url.strip_prefix("sqlite://") {
        return Ok(std::sync::Arc::new(SqliteStore::open_with_cache(
            &cfg.path(std::path::Path::new(path)),
            audit_chain(cfg)?,
            cfg.store.cache_mib,
        )?));
    }
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(StoreError::Url(cfg.store.redacted_url()));
    }
    let password = if cfg.store.password_env.is_some() || cfg.store.password_file.is_some() {
        let secret = cfg
            .secret_source(
                cfg.store.password_env.as_ref(),
                cfg.store.password_file.as_ref(),
                "password",
            )
            .and_then(|s| s.read())
            .map_err(|reason| StoreError::Open {
                path: "store.password".into(),
                reason,
            })?;
        Some(secret.expose().to_owned())
    } else {
        None
    };
    let instance = cfg.store.instance.clone().unwrap_or_else(host_name);
    Ok(std::sync::Arc::new(PgStore::open(
        url,
        password.as_deref(),
        cfg.store.schema.as_deref(),
        &instance,
        cfg.store.pool_size,
        cfg.store.ca.as_ref().map(|c| cfg.path(c)).as_deref(),
        audit_chain(cfg)?,
    )?))
}

/// This machine's host name, for naming the instance (`gateway` when it cannot be read).
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "gateway".into())
}

/// The audit chain with the configured key, if any.
pub fn audit_chain(cfg: &crate::config::Config) -> Result<Chain, StoreError> {
    if cfg.audit.key_env.is_none() && cfg.audit.key_file.is_none() {
        return Ok(Chain::new(None));
    }
    let key = cfg
        .secret_source(cfg.audit.key_env.as_ref(), cfg.audit.key_file.as_ref(), "key")
        .and_then(|s| s.read())
        .map_err(|reason| StoreError::Open {
            path: "audit.key".into(),
            reason,
        })?;
    Ok(Chain::new(Some(key.expose().as_bytes())))
}

/// Milliseconds since the UNIX epoch, now.
pub fn now_ms() -> i64 {
    // A clock set before 1970 reads as the epoch.
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
