//! The embedded store: SQLite (bundled) in WAL mode. Ingest commits with `synchronous = FULL`,
//! so an accepted batch survives `kill -9` and power loss. Delivery outcomes commit with
//! `synchronous = NORMAL` (durable across a process crash; a power loss may forget an
//! acknowledgement, which only means an idempotent re-send).
//!
//! One writer connection and one reader connection (WAL lets a reader run beside the
//! writer), so claiming deliveries does not wait for an ingest batch: a claim uses the writer
//! when it is free (its page cache holds the rows it just queued; the reader's cache is
//! dropped whenever the database changes) and the reader otherwise. This backend serves
//! one gateway instance, so leases live in memory: a restart makes every row due again.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension, Transaction};
use serde_json::{Map, Value};

use super::{
    AttemptError, Completion, DeadLetter, DeadLetterFilter, Enqueues, OutboxItem, Pause, PauseReason,
    SqlValue, Store, StoreError,
};
use crate::audit::{AuditRecord, Chain, ChainedRecord, GENESIS};
use crate::profile::state::{Membership, Profile};
use crate::profile::trigger::{Reasons, Trigger};
use crate::profile::update::{ProfileUpdate, SegmentStatus};
use crate::profile::MappedSegment;

/// Changes after the first schema (version 1, [`SCHEMA`]), applied in order on open; the
/// version reached is kept in `meta.schema_version`.
const MIGRATIONS: &[(i64, &str)] = &[
    (
        2,
        "CREATE TABLE IF NOT EXISTS dataflow_pauses (
       dataflow TEXT PRIMARY KEY,
       reason TEXT NOT NULL,
       class TEXT,
       message TEXT NOT NULL,
       since INTEGER NOT NULL,
       probe_at INTEGER NOT NULL,
       probe_interval_ms INTEGER NOT NULL
     );",
    ),
    // Dead letters carry the failure class of their last attempt; rows already stored get
    // theirs from their last error right after (`fill_dead_letter_classes`).
    (
        3,
        "ALTER TABLE dead_letters ADD COLUMN class TEXT;
     CREATE INDEX IF NOT EXISTS dead_letters_by_class ON dead_letters (dataflow, class, created_at);
     CREATE INDEX IF NOT EXISTS dead_letters_by_class_any_dataflow ON dead_letters (class, created_at);",
    ),
];

/// The columns a dead letter is read from, in [`dead_letter_row`]'s order.
const DEAD_LETTER_COLUMNS: &str =
    "id, dataflow, profile_id, idempotency_key, payload, attempts, errors, created_at, class";

/// The one audit chain of the embedded store (one gateway process writes it).
const CHAIN: &str = "local";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS profiles (
  id TEXT PRIMARY KEY,
  merge_policy TEXT NOT NULL,
  identity_map TEXT NOT NULL,
  attributes TEXT NOT NULL,
  updated_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS memberships (
  profile_id TEXT NOT NULL,
  segment_id TEXT NOT NULL,
  status TEXT NOT NULL,
  last_qualification_time TEXT NOT NULL,
  PRIMARY KEY (profile_id, segment_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS memberships_by_segment ON memberships (segment_id, status);
CREATE TABLE IF NOT EXISTS mappings (
  dataflow TEXT NOT NULL,
  segment_id TEXT NOT NULL,
  created_at INTEGER NOT NULL,
  updated_at INTEGER NOT NULL,
  PRIMARY KEY (dataflow, segment_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS outbox (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  dataflow TEXT NOT NULL,
  profile_id TEXT NOT NULL,
  version INTEGER NOT NULL DEFAULT 1,
  segments TEXT NOT NULL,
  reasons INTEGER NOT NULL,
  enqueued_at INTEGER NOT NULL,
  attempts INTEGER NOT NULL DEFAULT 0,
  next_attempt_at INTEGER NOT NULL,
    errors TEXT NOT NULL DEFAULT '[]',
  UNIQUE (dataflow, profile_id)
);
CREATE TABLE IF NOT EXISTS dead_letters (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  dataflow TEXT NOT NULL,
  profile_id TEXT NOT NULL,
  idempotency_key TEXT NOT NULL,
  payload BLOB NOT NULL,
  attempts INTEGER NOT NULL,
  errors TEXT NOT NULL,
  created_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS dead_letters_by_dataflow ON dead_letters (dataflow, id);
CREATE TABLE IF NOT EXISTS api_dataflows (name TEXT PRIMARY KEY, json TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS audit (
  seq INTEGER PRIMARY KEY,
  record TEXT NOT NULL,
  prev TEXT NOT NULL,
  hash TEXT NOT NULL,
  mac TEXT
);
-- Claims walk a dataflow's rows in id order and stop at the limit; an index led by
-- next_attempt_at made SQLite sort every due row on each claim (1M rows: seconds per claim).
DROP INDEX IF EXISTS outbox_due;
CREATE INDEX IF NOT EXISTS outbox_claim ON outbox (dataflow, id);
";

/// The SQLite store.
pub struct SqliteStore {
    writer: Mutex<Connection>,
    reader: Mutex<Connection>,
    /// Outbox row id → lease expiry (UNIX ms).
    leases: Mutex<HashMap<i64, i64>>,
    chain: Chain,
    /// The audit chain's head: last sequence number and hash. Guarded by the writer lock's
    /// order of use: read and replaced only while `writer` is held.
    head: Mutex<(i64, String)>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SqliteStore")
    }
}

impl SqliteStore {
    /// Open (creating if needed) the database at `path` and apply the schema.
    pub fn open(path: &Path, chain: Chain) -> Result<Self, StoreError> {
        Self::open_with_cache(path, chain, 16)
    }

    /// [`SqliteStore::open`] with the writer's page cache at `cache_mib` MiB.
    pub fn open_with_cache(path: &Path, chain: Chain, cache_mib: u32) -> Result<Self, StoreError> {
        let err = |reason: String| StoreError::Open {
            path: path.display().to_string(),
            reason,
        };
        if let Some(dir) = path.parent() {
            if !dir.as_os_str().is_empty() {
                std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
            }
        }
        let mut conn = Connection::open(path).map_err(|e| err(e.to_string()))?;
        conn.execute_batch(&format!(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA busy_timeout = 5000;
             PRAGMA cache_size = -{};",
            u64::from(cache_mib.clamp(1, 1024)) * 1024
        ))?;
        conn.execute_batch(SCHEMA)?;
        let version: Option<String> = conn
            .query_row("SELECT value FROM meta WHERE key = 'schema_version'", [], |r| {
                r.get(0)
            })
            .optional()?;
        let newest = MIGRATIONS.last().map_or(1, |m| m.0);
        let current = match version.as_deref().map(str::parse::<i64>) {
            None => 1,
            Some(Ok(v)) if (1..=newest).contains(&v) => v,
            Some(other) => {
                return Err(err(format!(
                    "schema version {other:?} is newer than this build's ({newest}); upgrade sallyport"
                )))
            }
        };
        {
            let tx = conn.transaction()?;
            for (v, sql) in MIGRATIONS.iter().filter(|m| m.0 > current) {
                tx.execute_batch(sql)?;
                if *v == 3 {
                    fill_dead_letter_classes(&tx)?;
                }
                tracing::debug!(version = v, "store schema migrated");
            }
            tx.execute(
                "INSERT INTO meta (key, value) VALUES ('schema_version', ?1)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                [newest.to_string()],
            )?;
            tx.commit()?;
        }
        let head: (i64, String) = conn
            .query_row("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()?
            .unwrap_or((0, GENESIS.to_owned()));
        let reader = Connection::open(path).map_err(|e| err(e.to_string()))?;
        reader.execute_batch("PRAGMA busy_timeout = 5000; PRAGMA query_only = ON;")?;
        Ok(SqliteStore {
            writer: Mutex::new(conn),
            reader: Mutex::new(reader),
            leases: Mutex::new(HashMap::new()),
            chain,
            head: Mutex::new(head),
        })
    }

    // A panic while holding a lock leaves SQLite consistent (transactions roll back), so a
    // poisoned mutex is still usable.
    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.writer.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Link `audit` after the current head inside `tx`; returns the head to publish once
    /// `tx` commits. Call only while holding the writer lock.
    fn append_chain(&self, tx: &Transaction<'_>, audit: &[AuditRecord]) -> Result<(i64, String), StoreError> {
        let (mut seq, mut hash) = self.head.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut stmt = tx
            .prepare_cached("INSERT INTO audit (seq, record, prev, hash, mac) VALUES (?1, ?2, ?3, ?4, ?5)")?;
        for rec in audit {
            let c = self.chain.link(seq, &hash, rec);
            stmt.execute(params![c.seq, c.record, c.prev, c.hash, c.mac])?;
            seq = c.seq;
            hash = c.hash;
        }
        Ok((seq, hash))
    }

    /// Record outcomes and their audit records inside `tx`; returns the chain head to publish
    /// once `tx` commits.
    fn complete_in(
        &self,
        tx: &Transaction<'_>,
        results: &[Completion],
        audit: &[AuditRecord],
    ) -> Result<(i64, String), StoreError> {
        let new_head = self.append_chain(tx, audit)?;
        for r in results {
            match r {
                Completion::Delivered { id, version } => {
                    sent_version_done(tx, *id, *version, "UPDATE outbox SET attempts = 0 WHERE id = ?1")?;
                }
                Completion::Failed { id, retry_at, error } => {
                    let errors = with_error(tx, *id, error)?;
                    tx.prepare_cached(
                        "UPDATE outbox SET attempts = attempts + 1, next_attempt_at = ?2, errors = ?3 WHERE id = ?1",
                    )?
                    .execute(params![id, retry_at, errors])?;
                }
                Completion::Requeue { id, retry_at } => {
                    tx.prepare_cached("UPDATE outbox SET next_attempt_at = ?2 WHERE id = ?1")?
                        .execute(params![id, retry_at])?;
                }
                Completion::Parked { id, version } => {
                    sent_version_done(
                        tx,
                        *id,
                        *version,
                        "UPDATE outbox SET attempts = 0, errors = '[]' WHERE id = ?1",
                    )?;
                }
                Completion::DeadBatch {
                    dataflow,
                    members,
                    idempotency_key,
                    payload,
                    attempts,
                    error,
                } => {
                    let errors =
                        serde_json::to_string(&[error]).map_err(|e| StoreError::Corrupt(e.to_string()))?;
                    tx.prepare_cached(
                        "INSERT INTO dead_letters (dataflow, profile_id, idempotency_key, payload, attempts, errors, created_at, class)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                    )?
                    .execute(params![
                        dataflow,
                        members,
                        idempotency_key,
                        payload,
                        attempts,
                        errors,
                        error.at,
                        error.class().as_str()
                    ])?;
                }
                Completion::Dead {
                    id,
                    version,
                    idempotency_key,
                    payload,
                    error,
                } => {
                    let errors = with_error(tx, *id, error)?;
                    tx.prepare_cached(
                        "INSERT INTO dead_letters (dataflow, profile_id, idempotency_key, payload, attempts, errors, created_at, class)
                         SELECT dataflow, profile_id, ?2, ?3, attempts + 1, ?4, ?5, ?6 FROM outbox WHERE id = ?1",
                    )?
                    .execute(params![
                        id,
                        idempotency_key,
                        payload,
                        errors,
                        error.at,
                        error.class().as_str()
                    ])?;
                    // The history went with the dead letter.
                    sent_version_done(
                        tx,
                        *id,
                        *version,
                        "UPDATE outbox SET attempts = 0, errors = '[]' WHERE id = ?1",
                    )?;
                }
            }
        }
        Ok(new_head)
    }

    fn leases(&self) -> std::sync::MutexGuard<'_, HashMap<i64, i64>> {
        self.leases.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Give every dead letter stored without a class the class of its last error (the mapping of
/// kind and status to class lives in Rust, [`AttemptError::class`], not in SQL).
fn fill_dead_letter_classes(tx: &Transaction<'_>) -> Result<(), StoreError> {
    let rows: Vec<(i64, String)> = {
        let mut stmt = tx.prepare("SELECT id, errors FROM dead_letters WHERE class IS NULL")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        rows.collect::<Result<_, _>>()?
    };
    let mut update = tx.prepare("UPDATE dead_letters SET class = ?2 WHERE id = ?1")?;
    for (id, errors) in rows {
        let errors: Vec<AttemptError> = serde_json::from_str(&errors).unwrap_or_default();
        let class = DeadLetter::stored_class(None, &errors)?;
        update.execute(params![id, class.as_str()])?;
    }
    Ok(())
}

/// The `version` sent from row `id` is finished: remove the row, or, when it changed while in
/// flight, run `reset` on it (`?1` = id) so the newer state is sent next, afresh.
fn sent_version_done(tx: &Transaction<'_>, id: i64, version: i64, reset: &str) -> Result<(), StoreError> {
    let n = tx
        .prepare_cached("DELETE FROM outbox WHERE id = ?1 AND version = ?2")?
        .execute(params![id, version])?;
    if n == 0 {
        tx.prepare_cached(reset)?.execute([id])?;
    }
    Ok(())
}

/// Run `f` in a transaction committed with `synchronous = NORMAL` (durable across a process
/// crash; a power loss may forget it), then put the connection back to `FULL`, which every
/// other write (ingest above all) relies on.
fn relaxed_tx<T>(
    conn: &mut Connection,
    f: impl FnOnce(&Transaction<'_>) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    conn.execute_batch("PRAGMA synchronous = NORMAL")?;
    let result = (|| {
        let tx = conn.transaction()?;
        let v = f(&tx)?;
        tx.commit()?;
        Ok(v)
    })();
    if let Err(e) = conn.execute_batch("PRAGMA synchronous = FULL") {
        // apply_updates sets FULL again itself before every ingest commit.
        tracing::warn!(error = %e, "could not restore synchronous = FULL");
    }
    result
}

/// Load many profiles in two statements (rows, then memberships), by id.
fn load_profiles(conn: &Connection, ids: &[&str]) -> Result<HashMap<String, ParsedProfile>, StoreError> {
    StoredProfiles::read(conn, ids)?.parse(false)
}

/// Profiles as stored: their JSON not parsed yet, so a caller can let go of the connection
/// (and its lock) first.
struct StoredProfiles {
    /// id, merge policy, identity map JSON, attributes JSON.
    profiles: Vec<(String, String, String, String)>,
    /// profile id, segment id, status, last qualification time.
    memberships: Vec<(String, String, String, String)>,
}

impl StoredProfiles {
    /// Every stored profile of `ids`, in two statements.
    fn read(conn: &Connection, ids: &[&str]) -> Result<Self, StoreError> {
        let list = serde_json::to_string(ids).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        // Four text columns of every row whose first column is one of `ids`.
        let rows = |sql: &str| -> Result<Vec<(String, String, String, String)>, StoreError> {
            let mut stmt = conn.prepare_cached(sql)?;
            let rows = stmt.query_map([&list], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        };
        let profiles = rows(
            "SELECT id, merge_policy, identity_map, attributes FROM profiles
             WHERE id IN (SELECT value FROM json_each(?1))",
        )?;
        let memberships = rows(
            "SELECT profile_id, segment_id, status, last_qualification_time FROM memberships
             WHERE profile_id IN (SELECT value FROM json_each(?1))",
        )?;
        Ok(StoredProfiles {
            profiles,
            memberships,
        })
    }

    /// With `raw_identities`, each identity map stays the JSON text it is stored as (written
    /// by `serde_json` from a map: sorted keys, as the payload writes it), checked to be an
    /// object but not built into a map; `Profile::identity_map` is left empty.
    fn parse(self, raw_identities: bool) -> Result<HashMap<String, ParsedProfile>, StoreError> {
        let mut out = HashMap::with_capacity(self.profiles.len());
        for (id, merge_policy, identity_map, attributes) in self.profiles {
            let (identities, raw) = if raw_identities {
                (Map::new(), Some(raw_object(identity_map)?))
            } else {
                (parse_object(&identity_map)?, None)
            };
            let profile = Profile {
                id: id.clone(),
                merge_policy,
                identity_map: identities,
                attributes: parse_object(&attributes)?,
                segments: Default::default(),
            };
            out.insert(id, (profile, raw));
        }
        for (pid, segment, status, last_qualification_time) in self.memberships {
            let status = SegmentStatus::parse(&status)
                .ok_or_else(|| StoreError::Corrupt(format!("status '{status}'")))?;
            if let Some((p, _)) = out.get_mut(&pid) {
                p.segments.insert(
                    segment,
                    Membership {
                        status,
                        last_qualification_time,
                    },
                );
            }
        }
        Ok(out)
    }
}

/// A claimed profile: parsed, and its identity map's stored JSON when kept raw.
type ParsedProfile = (Profile, Option<Box<serde_json::value::RawValue>>);

/// Stored JSON that must be an object, kept as text (validated, not built into a map).
fn raw_object(s: String) -> Result<Box<serde_json::value::RawValue>, StoreError> {
    let corrupt = || StoreError::Corrupt("a stored JSON object does not parse".into());
    if !s.trim_start().starts_with('{') {
        return Err(corrupt());
    }
    serde_json::value::RawValue::from_string(s).map_err(|_| corrupt())
}

fn parse_object(s: &str) -> Result<Map<String, Value>, StoreError> {
    match serde_json::from_str(s) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(StoreError::Corrupt("a stored JSON object does not parse".into())),
    }
}

fn save_profile(
    tx: &Transaction<'_>,
    p: &Profile,
    touched_segments: &[&String],
    now_ms: i64,
) -> Result<(), StoreError> {
    tx.prepare_cached(
        "INSERT INTO profiles (id, merge_policy, identity_map, attributes, updated_at) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (id) DO UPDATE SET merge_policy = excluded.merge_policy, identity_map = excluded.identity_map,
           attributes = excluded.attributes, updated_at = excluded.updated_at",
    )?
    .execute(params![
        p.id,
        p.merge_policy,
        serde_json::to_string(&p.identity_map).map_err(|e| StoreError::Corrupt(e.to_string()))?,
        serde_json::to_string(&p.attributes).map_err(|e| StoreError::Corrupt(e.to_string()))?,
        now_ms
    ])?;
    let mut stmt = tx.prepare_cached(
        "INSERT INTO memberships (profile_id, segment_id, status, last_qualification_time) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (profile_id, segment_id) DO UPDATE SET status = excluded.status,
           last_qualification_time = excluded.last_qualification_time",
    )?;
    for seg in touched_segments {
        if let Some(m) = p.segments.get(*seg) {
            stmt.execute(params![p.id, seg, m.status.as_str(), m.last_qualification_time])?;
        }
    }
    Ok(())
}

fn enqueue(
    tx: &Transaction<'_>,
    dataflow: &str,
    profile_id: &str,
    t: &Trigger,
    now_ms: i64,
) -> Result<(), StoreError> {
    // Most profiles have no row waiting (new, or their last export was delivered): one
    // statement inserts it. Only when one waits is it read and merged.
    let inserted = tx
        .prepare_cached(
            "INSERT INTO outbox (dataflow, profile_id, segments, reasons, enqueued_at, next_attempt_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?5) ON CONFLICT (dataflow, profile_id) DO NOTHING",
        )?
        .execute(params![
            dataflow,
            profile_id,
            segments_json(&t.segments),
            t.reasons.0,
            now_ms
        ])?;
    if inserted == 1 {
        return Ok(());
    }
    let (segs, reasons): (String, u8) = tx
        .prepare_cached("SELECT segments, reasons FROM outbox WHERE dataflow = ?1 AND profile_id = ?2")?
        .query_row([dataflow, profile_id], |r| Ok((r.get(0)?, r.get(1)?)))?;
    let mut merged = Trigger {
        reasons: Reasons(reasons),
        segments: serde_json::from_str(&segs).unwrap_or_default(),
    };
    merged.absorb(t);
    // Keep the row's place in line and any retry backoff; bump the version so an in-flight
    // send of the older state does not acknowledge this one.
    tx.prepare_cached(
        "UPDATE outbox SET version = version + 1, segments = ?3, reasons = ?4
         WHERE dataflow = ?1 AND profile_id = ?2",
    )?
    .execute(params![
        dataflow,
        profile_id,
        segments_json(&merged.segments),
        merged.reasons.0
    ])?;
    Ok(())
}

/// The row's attempt history with `error` appended, as JSON.
fn with_error(tx: &Transaction<'_>, id: i64, error: &AttemptError) -> Result<String, StoreError> {
    let existing: Option<String> = tx
        .prepare_cached("SELECT errors FROM outbox WHERE id = ?1")?
        .query_row([id], |r| r.get(0))
        .optional()?;
    let mut errors: Vec<AttemptError> = existing
        .and_then(|e| serde_json::from_str(&e).ok())
        .unwrap_or_default();
    errors.push(error.clone());
    serde_json::to_string(&errors).map_err(|e| StoreError::Corrupt(e.to_string()))
}

type DeadLetterRow = Result<DeadLetter, StoreError>;

fn dead_letter_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<DeadLetterRow> {
    let payload: Vec<u8> = r.get(4)?;
    let errors: String = r.get(6)?;
    let class: Option<String> = r.get(8)?;
    let errors: Vec<AttemptError> = match serde_json::from_str(&errors) {
        Ok(e) => e,
        Err(e) => return Ok(Err(StoreError::Corrupt(format!("dead letter errors: {e}")))),
    };
    let class = match DeadLetter::stored_class(class.as_deref(), &errors) {
        Ok(c) => c,
        Err(e) => return Ok(Err(e)),
    };
    Ok(Ok(DeadLetter {
        id: r.get(0)?,
        dataflow: r.get(1)?,
        profile_id: r.get(2)?,
        idempotency_key: r.get(3)?,
        payload_bytes: payload.len(),
        payload,
        attempts: r.get(5)?,
        class,
        errors,
        created_at: r.get(7)?,
    }))
}

fn segments_json(s: &[String]) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "[]".into())
}

impl Store for SqliteStore {
    fn apply_updates(
        &self,
        updates: Vec<ProfileUpdate>,
        apply: &mut dyn FnMut(&mut Profile, ProfileUpdate) -> Enqueues,
    ) -> Result<(), StoreError> {
        let now = super::now_ms();
        let mut conn = self.lock();
        // An accepted update must survive power loss, whatever an earlier write left set.
        conn.execute_batch("PRAGMA synchronous = FULL")?;
        let tx = conn.transaction()?;
        // Profiles touched by this batch, applied in order in memory, written once.
        // Every stored profile the batch names, in two statements.
        let mut loaded = {
            let mut ids: Vec<&str> = updates.iter().map(|u| u.profile_id.as_str()).collect();
            ids.sort_unstable();
            ids.dedup();
            load_profiles(&tx, &ids)?
        };
        let batch =
            crate::profile::batch::plan_batch(updates, &mut |id| loaded.remove(id).map(|(p, _)| p), apply);
        for (p, touched) in &batch.profiles {
            let touched: Vec<&String> = touched.iter().collect();
            save_profile(&tx, p, &touched, now)?;
        }
        for ((df, profile_id), t) in &batch.enqueues {
            enqueue(&tx, df, profile_id, t, now)?;
        }
        tx.commit()?;
        // Let go of the writer before the batch's profiles are freed (thousands of maps).
        drop(conn);
        drop(batch);
        Ok(())
    }

    fn sync_mappings(
        &self,
        dataflow: &str,
        segments: &[String],
        now_ms: i64,
    ) -> Result<(HashMap<String, MappedSegment>, Vec<String>), StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        let mut existing: HashMap<String, MappedSegment> = HashMap::new();
        {
            let mut stmt =
                tx.prepare("SELECT segment_id, created_at, updated_at FROM mappings WHERE dataflow = ?1")?;
            for row in stmt.query_map([dataflow], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    MappedSegment {
                        mapping_created_at: r.get(1)?,
                        mapping_updated_at: r.get(2)?,
                    },
                ))
            })? {
                let (s, m) = row?;
                existing.insert(s, m);
            }
        }
        let mut fresh = Vec::new();
        let mut out = HashMap::new();
        for s in segments {
            match existing.remove(s) {
                Some(m) => {
                    out.insert(s.clone(), m);
                }
                None => {
                    tx.execute(
                        "INSERT INTO mappings (dataflow, segment_id, created_at, updated_at) VALUES (?1, ?2, ?3, ?3)",
                        params![dataflow, s, now_ms],
                    )?;
                    out.insert(
                        s.clone(),
                        MappedSegment {
                            mapping_created_at: now_ms,
                            mapping_updated_at: now_ms,
                        },
                    );
                    fresh.push(s.clone());
                }
            }
        }
        // Unmapped since last time: forget, so mapping again backfills again.
        for s in existing.keys() {
            tx.execute(
                "DELETE FROM mappings WHERE dataflow = ?1 AND segment_id = ?2",
                params![dataflow, s],
            )?;
        }
        tx.commit()?;
        Ok((out, fresh))
    }

    fn backfill(&self, dataflow: &str, segment: &str, now_ms: i64) -> Result<u64, StoreError> {
        let conn = self.lock();
        let seg = segments_json(&[segment.to_owned()]);
        // One statement: every member of the segment, coalesced into existing rows.
        let n = conn.execute(
            "INSERT INTO outbox (dataflow, profile_id, segments, reasons, enqueued_at, next_attempt_at)
             SELECT ?1, profile_id, ?2, ?3, ?4, ?4 FROM memberships
             WHERE segment_id = ?5 AND status IN ('realized', 'exiting')
             ORDER BY profile_id
             ON CONFLICT (dataflow, profile_id) DO UPDATE SET version = version + 1,
               reasons = reasons | excluded.reasons",
            params![
                dataflow,
                seg,
                (Reasons::BACKFILL | Reasons::SEGMENT).0,
                now_ms,
                segment
            ],
        )?;
        Ok(n as u64)
    }

    fn claim(
        &self,
        dataflow: &str,
        limit: usize,
        now_ms: i64,
        lease_ms: i64,
    ) -> Result<Vec<OutboxItem>, StoreError> {
        // Rows leased now are skipped, so look that many rows further.
        let leased: std::collections::HashSet<i64> = {
            let mut l = self.leases();
            l.retain(|_, until| *until > now_ms);
            l.keys().copied().collect()
        };
        let (rows, stored) = {
            // The writer's page cache holds the rows it queued; the reader's is dropped
            // whenever the database changed. Use the writer when no ingest holds it.
            let mut conn = match self.writer.try_lock() {
                Ok(w) => w,
                Err(_) => self.reader.lock().unwrap_or_else(|p| p.into_inner()),
            };
            let tx = conn.transaction()?;
            let mut rows: Vec<(i64, String, i64, String, u8, u32, i64)> = Vec::new();
            {
                let mut stmt = tx.prepare_cached(
                    "SELECT id, profile_id, version, segments, reasons, attempts, enqueued_at FROM outbox
                     WHERE dataflow = ?1 AND next_attempt_at <= ?2 ORDER BY id LIMIT ?3",
                )?;
                let mut it = stmt.query(params![dataflow, now_ms, (limit + leased.len()) as i64])?;
                while let Some(r) = it.next()? {
                    // Leased rows (in flight, or their outcome not yet written) are stepped
                    // over by id alone, without reading the rest of the row.
                    let id: i64 = r.get(0)?;
                    if leased.contains(&id) {
                        continue;
                    }
                    rows.push((
                        id,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                        r.get(6)?,
                    ));
                    if rows.len() == limit {
                        break;
                    }
                }
            }
            let ids: Vec<&str> = rows.iter().map(|r| r.1.as_str()).collect();
            let stored = StoredProfiles::read(&tx, &ids)?;
            tx.commit()?;
            // Leased before the connection is let go. A row whose profile then fails to parse
            // stays leased until its lease runs out, and is claimed again after.
            let mut l = self.leases();
            for r in &rows {
                l.insert(r.0, now_ms + lease_ms);
            }
            (rows, stored)
        };
        // Parsed after the lock is released: ingest and outcomes need the writer meanwhile.
        let mut profiles = stored.parse(true)?;
        let mut out = Vec::with_capacity(rows.len());
        for (id, profile_id, version, segments, reasons, attempts, enqueued_at) in rows {
            let (profile, identity_map_json) = profiles
                .remove(&profile_id)
                .ok_or_else(|| StoreError::Corrupt(format!("outbox row {id} names missing profile")))?;
            out.push(OutboxItem {
                id,
                version,
                profile,
                identity_map_json,
                segments: serde_json::from_str(&segments).unwrap_or_default(),
                reasons: Reasons(reasons),
                attempts,
                enqueued_at,
            });
        }
        Ok(out)
    }

    fn complete(&self, results: &[Completion], audit: &[AuditRecord]) -> Result<(), StoreError> {
        let mut conn = self.lock();
        let new_head = relaxed_tx(&mut conn, |tx| self.complete_in(tx, results, audit))?;
        *self.head.lock().unwrap_or_else(|p| p.into_inner()) = new_head;
        drop(conn);
        let mut l = self.leases();
        for r in results {
            if let Some(id) = r.id() {
                l.remove(&id);
            }
        }
        Ok(())
    }

    fn pending(&self, dataflow: Option<&str>) -> Result<u64, StoreError> {
        // A count walks the whole queue (a million rows after an outage): on the reader, so
        // status pages and `/readyz` never hold up ingest or outcomes for it.
        let conn = self.reader.lock().unwrap_or_else(|p| p.into_inner());
        let n: i64 = match dataflow {
            Some(d) => conn.query_row("SELECT COUNT(*) FROM outbox WHERE dataflow = ?1", [d], |r| {
                r.get(0)
            })?,
            None => conn.query_row("SELECT COUNT(*) FROM outbox", [], |r| r.get(0))?,
        };
        Ok(n as u64)
    }

    fn profile(&self, id: &str) -> Result<Option<Profile>, StoreError> {
        Ok(load_profiles(&self.lock(), &[id])?.remove(id).map(|(p, _)| p))
    }

    fn append_audit(&self, audit: &[AuditRecord]) -> Result<(), StoreError> {
        let mut conn = self.lock();
        // As outcomes: durable across a process crash at once; a power loss may forget the
        // last records (an fsync per sidecar batch cost more than the proxying itself).
        let new_head = relaxed_tx(&mut conn, |tx| self.append_chain(tx, audit))?;
        *self.head.lock().unwrap_or_else(|p| p.into_inner()) = new_head;
        Ok(())
    }

    fn chain_id(&self) -> String {
        CHAIN.into()
    }

    fn audit_chains(&self) -> Result<Vec<String>, StoreError> {
        Ok(vec![CHAIN.into()])
    }

    fn audit_chain_records(
        &self,
        chain: &str,
        after_seq: i64,
        limit: usize,
    ) -> Result<Vec<ChainedRecord>, StoreError> {
        if chain != CHAIN {
            return Ok(Vec::new());
        }
        let conn = self.reader.lock().unwrap_or_else(|p| p.into_inner());
        let mut stmt = conn.prepare_cached(
            "SELECT seq, record, prev, hash, mac FROM audit WHERE seq > ?1 ORDER BY seq LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![after_seq, limit as i64], |r| {
            Ok(ChainedRecord {
                seq: r.get(0)?,
                record: r.get(1)?,
                prev: r.get(2)?,
                hash: r.get(3)?,
                mac: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    fn dead_letters_where(&self, filter: &DeadLetterFilter) -> Result<Vec<DeadLetter>, StoreError> {
        let (clause, values) = filter.sql_where('?');
        let sql = format!(
            "SELECT {DEAD_LETTER_COLUMNS} FROM dead_letters {clause} ORDER BY id LIMIT ?{}",
            values.len() + 1
        );
        let mut bound: Vec<rusqlite::types::Value> = values
            .into_iter()
            .map(|v| match v {
                SqlValue::Text(t) => rusqlite::types::Value::Text(t),
                SqlValue::Int(i) => rusqlite::types::Value::Integer(i),
            })
            .collect();
        bound.push(rusqlite::types::Value::Integer(filter.sql_limit()));
        let conn = self.lock();
        let mut stmt = conn.prepare_cached(&sql)?;
        let rows = stmt.query_map(rusqlite::params_from_iter(bound), dead_letter_row)?;
        rows.map(|r| r?).collect()
    }

    fn dead_letter(&self, id: i64) -> Result<Option<DeadLetter>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {DEAD_LETTER_COLUMNS} FROM dead_letters WHERE id = ?1"
        ))?;
        let row = stmt.query_row([id], dead_letter_row).optional()?;
        row.transpose()
    }

    fn remove_dead_letter(&self, id: i64) -> Result<bool, StoreError> {
        Ok(self
            .lock()
            .execute("DELETE FROM dead_letters WHERE id = ?1", [id])?
            > 0)
    }

    fn queue_head(
        &self,
        dataflow: &str,
        now_ms: i64,
        cap: usize,
    ) -> Result<(usize, Option<i64>), StoreError> {
        let conn = self.reader.lock().unwrap_or_else(|p| p.into_inner());
        let (n, oldest): (i64, Option<i64>) = conn
            .prepare_cached(
                "SELECT COUNT(*), MIN(enqueued_at) FROM (SELECT enqueued_at FROM outbox
                 WHERE dataflow = ?1 AND next_attempt_at <= ?2 ORDER BY id LIMIT ?3)",
            )?
            .query_row(params![dataflow, now_ms, cap as i64], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })?;
        Ok((usize::try_from(n).unwrap_or(0), oldest))
    }

    fn pauses(&self) -> Result<Vec<Pause>, StoreError> {
        // Read every second by each engine: the reader, so an ingest holding the writer does
        // not delay it.
        let conn = self.reader.lock().unwrap_or_else(|p| p.into_inner());
        let mut stmt = conn.prepare_cached(
            "SELECT dataflow, reason, class, message, since, probe_at, probe_interval_ms
             FROM dataflow_pauses ORDER BY dataflow",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
                r.get(6)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (dataflow, reason, class, message, since, probe_at, probe_interval_ms) = row?;
            out.push(Pause {
                dataflow,
                reason: PauseReason::parse(&reason)?,
                class,
                message,
                since,
                probe_at,
                probe_interval_ms,
            });
        }
        Ok(out)
    }

    fn pause(&self, p: &Pause) -> Result<bool, StoreError> {
        let n = self.lock().execute(
            "INSERT INTO dataflow_pauses (dataflow, reason, class, message, since, probe_at, probe_interval_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
             ON CONFLICT (dataflow) DO UPDATE SET reason = excluded.reason, class = excluded.class,
               message = excluded.message, probe_at = excluded.probe_at,
               probe_interval_ms = excluded.probe_interval_ms,
               since = CASE WHEN dataflow_pauses.reason = excluded.reason THEN dataflow_pauses.since ELSE excluded.since END
             WHERE dataflow_pauses.reason = 'breaker' OR excluded.reason = 'manual'",
            params![
                p.dataflow,
                p.reason.as_str(),
                p.class,
                p.message,
                p.since,
                p.probe_at,
                p.probe_interval_ms
            ],
        )?;
        Ok(n > 0)
    }

    fn resume(&self, dataflow: &str, breaker_only: bool) -> Result<bool, StoreError> {
        let n = self.lock().execute(
            "DELETE FROM dataflow_pauses WHERE dataflow = ?1 AND (NOT ?2 OR reason = 'breaker')",
            params![dataflow, breaker_only],
        )?;
        Ok(n > 0)
    }

    fn api_dataflows(&self) -> Result<Vec<(String, String)>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn.prepare("SELECT name, json FROM api_dataflows ORDER BY name")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    fn save_api_dataflow(&self, name: &str, json: &str) -> Result<(), StoreError> {
        self.lock().execute(
            "INSERT INTO api_dataflows (name, json) VALUES (?1, ?2) ON CONFLICT (name) DO UPDATE SET json = excluded.json",
            params![name, json],
        )?;
        Ok(())
    }

    fn delete_api_dataflow(&self, name: &str) -> Result<bool, StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        let n = tx.execute("DELETE FROM api_dataflows WHERE name = ?1", [name])?;
        tx.execute("DELETE FROM outbox WHERE dataflow = ?1", [name])?;
        tx.execute("DELETE FROM mappings WHERE dataflow = ?1", [name])?;
        tx.execute("DELETE FROM dataflow_pauses WHERE dataflow = ?1", [name])?;
        tx.commit()?;
        Ok(n > 0)
    }

    fn dead_letter_failed(&self, id: i64, error: &AttemptError) -> Result<(), StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        let existing: String = tx.query_row("SELECT errors FROM dead_letters WHERE id = ?1", [id], |r| {
            r.get(0)
        })?;
        let mut errors: Vec<AttemptError> = serde_json::from_str(&existing).unwrap_or_default();
        errors.push(error.clone());
        tx.execute(
            "UPDATE dead_letters SET attempts = attempts + 1, errors = ?2, class = ?3 WHERE id = ?1",
            params![
                id,
                serde_json::to_string(&errors).map_err(|e| StoreError::Corrupt(e.to_string()))?,
                error.class().as_str()
            ],
        )?;
        tx.commit()?;
        Ok(())
    }
}
