//! The shared store: PostgreSQL, for several gateway instances on one database.
//!
//! Work sharing: outbox rows are claimed in batches with `FOR UPDATE SKIP LOCKED` and leased
//! to the claiming instance (`lease_owner`, `lease_until`). An instance that dies leaves its
//! leases to expire; then any instance claims those rows again and sends them under the same
//! idempotency key (it is made of the row id and version, both stored here). Per-profile
//! order holds across instances for the same reason it holds in one: a (dataflow, profile)
//! has one outbox row, and a row has one lease at a time.
//!
//! Audit: each running instance appends to its own hash chain (`audit.chain` = instance name,
//! process id and start time), so writers never wait for each other's chain head and a chain
//! never forks. `sallyport audit verify` verifies every chain from its genesis.
//!
//! Ingest: profiles touched by a batch are locked (`FOR UPDATE`, new ones by their insert)
//! for the read-merge-write, so two instances ingesting the same profile serialise on it. A
//! deadlock or serialisation failure rolls back and the transaction is retried.
//!
//! The driver is tokio-postgres, pooled by deadpool-postgres. The connections' I/O tasks run
//! on a small runtime owned by the store, so the blocking `Store` methods can be called from
//! any thread (including one inside another runtime) and simply wait for their answer.
//!
//! Must never: acknowledge an update before it is committed, lose an outbox row, or put the
//! database password in a log line or an error.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use deadpool_postgres::{
    Connect, Hook, HookError, Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod, Transaction,
};
use tokio_postgres::error::SqlState;
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};
use tokio_postgres::types::ToSql;
use tokio_postgres::{NoTls, Row, Socket};

use super::{
    AttemptError, Completion, DeadLetter, DeadLetterFilter, Enqueues, OutboxItem, Pause, PauseReason,
    SqlValue, Store, StoreError,
};
use crate::audit::{AuditRecord, Chain, ChainedRecord, GENESIS};
use crate::profile::state::{Membership, Profile};
use crate::profile::trigger::Reasons;
use crate::profile::update::{ProfileUpdate, SegmentStatus};
use crate::profile::MappedSegment;

/// Schema migrations, applied in order on start under an advisory lock; each version is
/// recorded in `schema_migrations`.
const MIGRATIONS: &[(i64, &str)] = &[
    (
        1,
        "
CREATE TABLE profiles (
  id TEXT PRIMARY KEY,
  merge_policy TEXT NOT NULL,
  identity_map TEXT NOT NULL,
  attributes TEXT NOT NULL,
  updated_at BIGINT NOT NULL
);
CREATE TABLE memberships (
  profile_id TEXT NOT NULL,
  segment_id TEXT NOT NULL,
  status TEXT NOT NULL,
  last_qualification_time TEXT NOT NULL,
  PRIMARY KEY (profile_id, segment_id)
);
CREATE INDEX memberships_by_segment ON memberships (segment_id, status);
CREATE TABLE mappings (
  dataflow TEXT NOT NULL,
  segment_id TEXT NOT NULL,
  created_at BIGINT NOT NULL,
  updated_at BIGINT NOT NULL,
  PRIMARY KEY (dataflow, segment_id)
);
CREATE TABLE outbox (
  id BIGSERIAL PRIMARY KEY,
  dataflow TEXT NOT NULL,
  profile_id TEXT NOT NULL,
  version BIGINT NOT NULL DEFAULT 1,
  segments TEXT NOT NULL,
  reasons INTEGER NOT NULL,
  enqueued_at BIGINT NOT NULL,
  attempts INTEGER NOT NULL DEFAULT 0,
  next_attempt_at BIGINT NOT NULL,
  errors TEXT NOT NULL DEFAULT '[]',
  lease_owner TEXT,
  lease_until BIGINT NOT NULL DEFAULT 0,
  UNIQUE (dataflow, profile_id)
);
CREATE INDEX outbox_claim ON outbox (dataflow, id);
CREATE TABLE dead_letters (
  id BIGSERIAL PRIMARY KEY,
  dataflow TEXT NOT NULL,
  profile_id TEXT NOT NULL,
  idempotency_key TEXT NOT NULL,
  payload BYTEA NOT NULL,
  attempts INTEGER NOT NULL,
  errors TEXT NOT NULL,
  created_at BIGINT NOT NULL
);
CREATE INDEX dead_letters_by_dataflow ON dead_letters (dataflow, id);
CREATE TABLE api_dataflows (name TEXT PRIMARY KEY, json TEXT NOT NULL);
CREATE TABLE audit (
  chain TEXT NOT NULL,
  seq BIGINT NOT NULL,
  record TEXT NOT NULL,
  prev TEXT NOT NULL,
  hash TEXT NOT NULL,
  mac TEXT,
  PRIMARY KEY (chain, seq)
);
",
    ),
    (
        2,
        "
CREATE TABLE dataflow_pauses (
  dataflow TEXT PRIMARY KEY,
  reason TEXT NOT NULL,
  class TEXT,
  message TEXT NOT NULL,
  since BIGINT NOT NULL,
  probe_at BIGINT NOT NULL,
  probe_interval_ms BIGINT NOT NULL
);
",
    ),
    // Dead letters carry the failure class of their last attempt; rows already stored get
    // theirs from their last error right after (`fill_dead_letter_classes`).
    (
        3,
        "
ALTER TABLE dead_letters ADD COLUMN class TEXT;
CREATE INDEX dead_letters_by_class ON dead_letters (dataflow, class, created_at);
CREATE INDEX dead_letters_by_class_any_dataflow ON dead_letters (class, created_at);
",
    ),
];

/// The columns a dead letter is read from, in [`dead_letter`]'s order.
const DEAD_LETTER_COLUMNS: &str =
    "id, dataflow, profile_id, idempotency_key, payload, attempts, errors, created_at, class";

/// Advisory lock key that serialises migrations across instances starting together.
const MIGRATION_LOCK: i64 = 0x5a11_9027;

/// Transactions retried after a deadlock or serialisation failure, at most.
const TX_RETRIES: u32 = 8;

/// The PostgreSQL store.
pub struct PgStore {
    /// Runs the connections' I/O tasks. Shut down without blocking on drop.
    rt: Option<tokio::runtime::Runtime>,
    /// Up to `store.pool_size` connections, opened on demand (their I/O tasks on `rt`), each
    /// with its search_path set and its own prepared-statement cache.
    pool: Pool,
    /// This process's audit chain and lease owner name.
    chain_id: String,
    chain: Chain,
    /// This chain's head (last seq, hash). Held for the whole of any transaction that
    /// appends to the chain, so appends from this process never race.
    head: Mutex<(i64, String)>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore").field("chain", &self.chain_id).finish()
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which panics inside another runtime; this does not.
        // The pool goes after it: a pooled client's drop only aborts its (gone) I/O task.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// Run a connection's I/O until it closes.
async fn drive<F: std::future::Future<Output = Result<(), tokio_postgres::Error>>>(connection: F) {
    if let Err(e) = connection.await {
        tracing::warn!(error = %StoreError::from(e), "PostgreSQL connection closed");
    }
}

/// A connection being opened: its client and the task that drives it.
type Opening<'a> = std::pin::Pin<
    Box<
        dyn std::future::Future<
                Output = Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>), tokio_postgres::Error>,
            > + Send
            + 'a,
    >,
>;

/// Opens the pool's connections, each driven by [`drive`] on the runtime it is opened in (the
/// store's: see [`PgStore::lend`]), so a closed connection is logged with the server's message.
struct Connector<T>(T);

impl<T> Connect for Connector<T>
where
    T: MakeTlsConnect<Socket> + Clone + Sync + Send + 'static,
    T::Stream: Sync + Send,
    T::TlsConnect: Sync + Send,
    <T::TlsConnect as TlsConnect<Socket>>::Future: Send,
{
    fn connect(&self, config: &tokio_postgres::Config) -> Opening<'_> {
        let (config, tls) = (config.clone(), self.0.clone());
        Box::pin(async move {
            let (client, connection) = config.connect(tls).await?;
            Ok((client, tokio::spawn(drive(connection))))
        })
    }
}

/// Wait for a driver future on this thread. The driver's futures only talk to their
/// connection's task through channels and need no runtime here, so this works on any thread:
/// a `spawn_blocking` thread, a plain one, and a CLI command's thread that is itself inside a
/// runtime (where `Handle::block_on` would panic).
fn wait<F: std::future::Future>(f: F) -> F::Output {
    futures_executor::block_on(f)
}

/// A pool error as a store error, with the server's SQLSTATE when the server refused.
fn pool_error(e: PoolError) -> StoreError {
    match e {
        PoolError::Backend(e) | PoolError::PostCreateHook(HookError::Backend(e)) => e.into(),
        other => StoreError::Postgres {
            message: other.to_string(),
            code: None,
        },
    }
}

fn retryable(e: &StoreError) -> bool {
    match e {
        StoreError::Postgres { code, .. } => matches!(
            code,
            Some(SqlState::T_R_DEADLOCK_DETECTED) | Some(SqlState::T_R_SERIALIZATION_FAILURE)
        ),
        _ => false,
    }
}

/// One transaction on a pooled connection (whose statement cache it prepares through).
struct Tx<'a, 'b> {
    tx: &'a Transaction<'b>,
}

impl Tx<'_, '_> {
    fn query(&mut self, sql: &'static str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>, StoreError> {
        let s = wait(self.tx.prepare_cached(sql))?;
        Ok(wait(self.tx.query(&s, params))?)
    }

    fn execute(&mut self, sql: &'static str, params: &[&(dyn ToSql + Sync)]) -> Result<u64, StoreError> {
        let s = wait(self.tx.prepare_cached(sql))?;
        Ok(wait(self.tx.execute(&s, params))?)
    }
}

impl PgStore {
    /// Connect, apply migrations, and start this process's audit chain. With `ca`, every
    /// connection is TLS, and the server's certificate must chain to `ca` and name the URL's
    /// host; without it, connections are plaintext.
    pub fn open(
        url: &str,
        password: Option<&str>,
        schema: Option<&str>,
        instance: &str,
        pool_size: usize,
        ca: Option<&std::path::Path>,
        chain: Chain,
    ) -> Result<Self, StoreError> {
        let mut config: tokio_postgres::Config =
            url.parse().map_err(|e: tokio_postgres::Error| StoreError::Open {
                path: "store.url".into(),
                reason: format!("not a PostgreSQL URL: {e}"),
            })?;
        let tls = match ca {
            Some(path) => {
                let open_err = |reason: String| StoreError::Open {
                    path: "store.ca".into(),
                    reason,
                };
                let trust =
                    crate::tls::client::Trust::from_pem_file(path).map_err(|e| open_err(e.to_string()))?;
                let tls = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
                    .with_safe_default_protocol_versions()
                    .map_err(|e| open_err(e.to_string()))?
                    .with_root_certificates(trust.root_store())
                    .with_no_client_auth();
                config.ssl_mode(tokio_postgres::config::SslMode::Require);
                Some(tokio_postgres_rustls::MakeRustlsConnect::new(tls))
            }
            None => None,
        };
        if let Some(p) = password {
            config.password(p);
        }
        config.application_name("sallyport");
        config.connect_timeout(Duration::from_secs(5));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("sallyport-pg")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Open {
                path: "store".into(),
                reason: format!("cannot start the PostgreSQL driver: {e}"),
            })?;
        // A connection that closed is dropped when next lent, and another opened in its place.
        let recycling = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let manager = match tls {
            Some(tls) => Manager::from_connect(config, Connector(tls), recycling),
            None => Manager::from_connect(config, Connector(NoTls), recycling),
        };
        let mut pool = Pool::builder(manager).max_size(pool_size.max(1));
        if let Some(schema) = schema {
            // Validated as letters, digits and '_' by the config; quoted all the same.
            // Under the migration lock: two instances creating the schema at once would
            // otherwise race (CREATE SCHEMA IF NOT EXISTS is not atomic against itself).
            let setup: std::sync::Arc<str> = format!(
                "BEGIN; SELECT pg_advisory_xact_lock({MIGRATION_LOCK}); CREATE SCHEMA IF NOT EXISTS \"{schema}\"; COMMIT;
                 SET search_path TO \"{schema}\""
            )
            .into();
            pool = pool.post_create(Hook::async_fn(move |client, _| {
                let setup = setup.clone();
                Box::pin(async move { client.batch_execute(&setup).await.map_err(HookError::Backend) })
            }));
        }
        let pool = pool.build().map_err(|e| StoreError::Open {
            path: "store".into(),
            reason: format!("cannot set up the PostgreSQL pool: {e}"),
        })?;
        let chain_id = format!("{instance}/{}/{}", std::process::id(), super::now_ms());
        let store = PgStore {
            rt: Some(rt),
            pool,
            chain_id,
            chain,
            head: Mutex::new((0, GENESIS.to_owned())),
        };
        store.migrate()?;
        Ok(store)
    }

    /// Borrow a connection, opening one when none is idle and the pool has room (else wait
    /// for one to come back).
    /// The `version` sent from row `id` is parked as a dead letter: remove the row, or, when
    /// it changed while in flight, reset it so the newer state is sent next, afresh. Only
    /// while this instance still leases it.
    fn parked(&self, tx: &mut Tx<'_, '_>, id: i64, version: i64) -> Result<(), StoreError> {
        let n = tx.execute(
            "DELETE FROM outbox WHERE id = $1 AND version = $2 AND lease_owner = $3",
            &[&id, &version, &self.chain_id],
        )?;
        if n == 0 {
            tx.execute(
                "UPDATE outbox SET attempts = 0, errors = '[]', lease_owner = NULL, lease_until = 0
                 WHERE id = $1 AND lease_owner = $2",
                &[&id, &self.chain_id],
            )?;
        }
        Ok(())
    }

    fn lend(&self) -> Result<Object, StoreError> {
        let Some(rt) = &self.rt else {
            return Err(StoreError::Corrupt("store is shut down".into()));
        };
        // A connection opened here spawns its I/O task: onto the store's runtime.
        let _on_store_runtime = rt.handle().enter();
        wait(self.pool.get()).map_err(pool_error)
    }

    /// Run `f` in a transaction, retrying it after a deadlock or serialisation failure.
    fn transaction<T>(
        &self,
        mut f: impl FnMut(&mut Tx<'_, '_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut conn = self.lend()?;
        let mut attempt = 0;
        loop {
            let tx = wait(conn.transaction())?;
            let r = f(&mut Tx { tx: &tx }).and_then(|v| {
                wait(tx.commit())?;
                Ok(v)
            });
            match r {
                Err(e) if retryable(&e) && attempt < TX_RETRIES => {
                    attempt += 1;
                    std::thread::sleep(Duration::from_millis(2 << attempt.min(6)));
                }
                other => return other,
            }
        }
    }

    fn migrate(&self) -> Result<(), StoreError> {
        self.transaction(|tx| {
            tx.tx_batch(&format!(
                "SELECT pg_advisory_xact_lock({MIGRATION_LOCK});
                 CREATE TABLE IF NOT EXISTS schema_migrations (
                   version BIGINT PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
            ))?;
            let rows = tx.query("SELECT COALESCE(MAX(version), 0) FROM schema_migrations", &[])?;
            let current: i64 = rows.first().map(|r| r.get(0)).unwrap_or(0);
            let newest = MIGRATIONS.last().map(|m| m.0).unwrap_or(0);
            if current > newest {
                return Err(StoreError::Open {
                    path: "store".into(),
                    reason: format!(
                        "database schema version {current} is newer than this build's ({newest}); upgrade sallyport"
                    ),
                });
            }
            for (version, sql) in MIGRATIONS.iter().filter(|m| m.0 > current) {
                tx.tx_batch(sql)?;
                if *version == 3 {
                    fill_dead_letter_classes(tx)?;
                }
                tx.execute("INSERT INTO schema_migrations (version) VALUES ($1)", &[version])?;
            }
            Ok(())
        })
    }

    /// Link `audit` after this chain's head inside `tx`; returns the new head.
    fn append_chain(
        &self,
        tx: &mut Tx<'_, '_>,
        head: &(i64, String),
        audit: &[AuditRecord],
    ) -> Result<(i64, String), StoreError> {
        let (mut seq, mut hash) = head.clone();
        if audit.is_empty() {
            return Ok((seq, hash));
        }
        let mut seqs = Vec::with_capacity(audit.len());
        let (mut records, mut prevs, mut hashes, mut macs) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for rec in audit {
            let c = self.chain.link(seq, &hash, rec);
            seq = c.seq;
            hash = c.hash.clone();
            seqs.push(c.seq);
            records.push(c.record);
            prevs.push(c.prev);
            hashes.push(c.hash);
            macs.push(c.mac);
        }
        tx.execute(
            "INSERT INTO audit (chain, seq, record, prev, hash, mac)
             SELECT $1, * FROM unnest($2::int8[], $3::text[], $4::text[], $5::text[], $6::text[])",
            &[&self.chain_id, &seqs, &records, &prevs, &hashes, &macs],
        )?;
        Ok((seq, hash))
    }

    fn head(&self) -> MutexGuard<'_, (i64, String)> {
        self.head.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Tx<'_, '_> {
    fn tx_batch(&mut self, sql: &str) -> Result<(), StoreError> {
        Ok(wait(self.tx.batch_execute(sql))?)
    }
}

fn parse_object(s: &str) -> Result<serde_json::Map<String, serde_json::Value>, StoreError> {
    match serde_json::from_str(s) {
        Ok(serde_json::Value::Object(m)) => Ok(m),
        _ => Err(StoreError::Corrupt("a stored JSON object does not parse".into())),
    }
}

fn to_json<T: serde::Serialize>(v: &T) -> Result<String, StoreError> {
    serde_json::to_string(v).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// Load profiles (with memberships) by id.
fn load_profiles(
    tx: &mut Tx<'_, '_>,
    ids: &[String],
    lock: bool,
) -> Result<HashMap<String, Profile>, StoreError> {
    let rows = if lock {
        tx.query(
            "SELECT id, merge_policy, identity_map, attributes FROM profiles WHERE id = ANY($1) ORDER BY id FOR UPDATE",
            &[&ids],
        )?
    } else {
        tx.query(
            "SELECT id, merge_policy, identity_map, attributes FROM profiles WHERE id = ANY($1)",
            &[&ids],
        )?
    };
    let mut out = HashMap::with_capacity(rows.len());
    for r in rows {
        let id: String = r.get(0);
        out.insert(
            id.clone(),
            Profile {
                id,
                merge_policy: r.get(1),
                identity_map: parse_object(r.get(2))?,
                attributes: parse_object(r.get(3))?,
                segments: Default::default(),
            },
        );
    }
    let rows = tx.query(
        "SELECT profile_id, segment_id, status, last_qualification_time FROM memberships WHERE profile_id = ANY($1)",
        &[&ids],
    )?;
    for r in rows {
        let (pid, seg, status, t): (String, String, String, String) =
            (r.get(0), r.get(1), r.get(2), r.get(3));
        let status =
            SegmentStatus::parse(&status).ok_or_else(|| StoreError::Corrupt(format!("status '{status}'")))?;
        if let Some(p) = out.get_mut(&pid) {
            p.segments.insert(
                seg,
                Membership {
                    status,
                    last_qualification_time: t,
                },
            );
        }
    }
    Ok(out)
}

fn dead_letter(r: &Row) -> Result<DeadLetter, StoreError> {
    let payload: Vec<u8> = r.get(4);
    let errors: String = r.get(6);
    let attempts: i32 = r.get(5);
    let class: Option<String> = r.get(8);
    let errors: Vec<AttemptError> =
        serde_json::from_str(&errors).map_err(|e| StoreError::Corrupt(format!("dead letter errors: {e}")))?;
    Ok(DeadLetter {
        id: r.get(0),
        dataflow: r.get(1),
        profile_id: r.get(2),
        idempotency_key: r.get(3),
        payload_bytes: payload.len(),
        payload,
        attempts: attempts.max(0) as u32,
        class: DeadLetter::stored_class(class.as_deref(), &errors)?,
        errors,
        created_at: r.get(7),
    })
}

/// Give every dead letter stored without a class the class of its last error (the mapping of
/// kind and status to class lives in Rust, [`AttemptError::class`], not in SQL).
fn fill_dead_letter_classes(tx: &mut Tx<'_, '_>) -> Result<(), StoreError> {
    let rows = tx.query("SELECT id, errors FROM dead_letters WHERE class IS NULL", &[])?;
    let (mut ids, mut classes) = (Vec::with_capacity(rows.len()), Vec::with_capacity(rows.len()));
    for r in rows {
        let errors: Vec<AttemptError> = serde_json::from_str(r.get::<_, &str>(1)).unwrap_or_default();
        ids.push(r.get::<_, i64>(0));
        classes.push(DeadLetter::stored_class(None, &errors)?.as_str());
    }
    tx.execute(
        "UPDATE dead_letters d SET class = c.class FROM unnest($1::int8[], $2::text[]) AS c(id, class)
         WHERE d.id = c.id",
        &[&ids, &classes],
    )?;
    Ok(())
}

impl Store for PgStore {
    fn apply_updates(
        &self,
        updates: Vec<ProfileUpdate>,
        apply: &mut dyn FnMut(&mut Profile, ProfileUpdate) -> Enqueues,
    ) -> Result<(), StoreError> {
        let now = super::now_ms();
        let mut ids: Vec<String> = updates.iter().map(|u| u.profile_id.clone()).collect();
        ids.sort();
        ids.dedup();
        self.transaction(|tx| {
            // New profiles are locked by their insert; existing ones by FOR UPDATE. Both in
            // id order, so two ingesting instances take row locks in the same order.
            let inserted: HashSet<String> = tx
                .query(
                    "INSERT INTO profiles (id, merge_policy, identity_map, attributes, updated_at)
                     SELECT id, 'default', '{}', '{}', $2 FROM unnest($1::text[]) AS t(id) ORDER BY id
                     ON CONFLICT (id) DO NOTHING RETURNING id",
                    &[&ids, &now],
                )?
                .iter()
                .map(|r| r.get(0))
                .collect();
            let existing: Vec<String> = ids.iter().filter(|i| !inserted.contains(*i)).cloned().collect();
            let mut loaded = load_profiles(tx, &existing, true)?;
            // A serialization failure runs this again: each attempt applies its own copy.
            let batch = crate::profile::batch::plan_batch(updates.clone(), &mut |id| loaded.remove(id), apply);
            let (mut pid, mut mp, mut im, mut at) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            let (mut m_pid, mut m_seg, mut m_status, mut m_time) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for (p, touched) in &batch.profiles {
                pid.push(p.id.clone());
                mp.push(p.merge_policy.clone());
                im.push(to_json(&p.identity_map)?);
                at.push(to_json(&p.attributes)?);
                for seg in touched.iter() {
                    if let Some(m) = p.segments.get(seg) {
                        m_pid.push(p.id.clone());
                        m_seg.push(seg.clone());
                        m_status.push(m.status.as_str().to_owned());
                        m_time.push(m.last_qualification_time.clone());
                    }
                }
            }
            tx.execute(
                "UPDATE profiles SET merge_policy = t.mp, identity_map = t.im, attributes = t.at, updated_at = $5
                 FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]) AS t(id, mp, im, at)
                 WHERE profiles.id = t.id",
                &[&pid, &mp, &im, &at, &now],
            )?;
            if !m_pid.is_empty() {
                tx.execute(
                    "INSERT INTO memberships (profile_id, segment_id, status, last_qualification_time)
                     SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[])
                     ON CONFLICT (profile_id, segment_id) DO UPDATE SET status = excluded.status,
                       last_qualification_time = excluded.last_qualification_time",
                    &[&m_pid, &m_seg, &m_status, &m_time],
                )?;
            }
            if !batch.enqueues.is_empty() {
                let (mut q_df, mut q_pid, mut q_segs, mut q_reasons) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
                for ((df, profile_id), t) in &batch.enqueues {
                    q_df.push(df.clone());
                    q_pid.push(profile_id.clone());
                    q_segs.push(to_json(&t.segments)?);
                    q_reasons.push(i32::from(t.reasons.0));
                }
                // A queued row keeps its place in line and any retry backoff; its version is
                // bumped so an in-flight send of the older state does not acknowledge this one.
                tx.execute(
                    "INSERT INTO outbox (dataflow, profile_id, segments, reasons, enqueued_at, next_attempt_at)
                     SELECT df, pid, segs, reasons, $5, $5
                     FROM unnest($1::text[], $2::text[], $3::text[], $4::int4[]) AS t(df, pid, segs, reasons)
                     ON CONFLICT (dataflow, profile_id) DO UPDATE SET version = outbox.version + 1,
                       reasons = outbox.reasons | excluded.reasons,
                       segments = (SELECT COALESCE(jsonb_agg(v ORDER BY n), '[]'::jsonb)::text FROM
                         (SELECT v, MIN(n) AS n FROM jsonb_array_elements(outbox.segments::jsonb || excluded.segments::jsonb)
                            WITH ORDINALITY AS e(v, n) GROUP BY v) d)",
                    &[&q_df, &q_pid, &q_segs, &q_reasons, &now],
                )?;
            }
            Ok(())
        })
    }

    fn sync_mappings(
        &self,
        dataflow: &str,
        segments: &[String],
        now_ms: i64,
    ) -> Result<(HashMap<String, MappedSegment>, Vec<String>), StoreError> {
        self.transaction(|tx| {
            // Insert first: of two instances starting together, one sees each segment as new.
            let fresh: Vec<String> = tx
                .query(
                    "INSERT INTO mappings (dataflow, segment_id, created_at, updated_at)
                     SELECT $1, s, $3, $3 FROM unnest($2::text[]) AS t(s)
                     ON CONFLICT (dataflow, segment_id) DO NOTHING RETURNING segment_id",
                    &[&dataflow, &segments, &now_ms],
                )?
                .iter()
                .map(|r| r.get(0))
                .collect();
            // Unmapped since last time: forget, so mapping again backfills again.
            tx.execute(
                "DELETE FROM mappings WHERE dataflow = $1 AND NOT (segment_id = ANY($2))",
                &[&dataflow, &segments],
            )?;
            let mut out = HashMap::new();
            for r in tx.query(
                "SELECT segment_id, created_at, updated_at FROM mappings WHERE dataflow = $1",
                &[&dataflow],
            )? {
                out.insert(
                    r.get::<_, String>(0),
                    MappedSegment {
                        mapping_created_at: r.get(1),
                        mapping_updated_at: r.get(2),
                    },
                );
            }
            Ok((out, fresh.clone()))
        })
    }

    fn backfill(&self, dataflow: &str, segment: &str, now_ms: i64) -> Result<u64, StoreError> {
        let seg = to_json(&[segment])?;
        let reasons = i32::from((Reasons::BACKFILL | Reasons::SEGMENT).0);
        self.transaction(|tx| {
            tx.execute(
                "INSERT INTO outbox (dataflow, profile_id, segments, reasons, enqueued_at, next_attempt_at)
                 SELECT $1, profile_id, $2, $3, $4, $4 FROM memberships
                 WHERE segment_id = $5 AND status IN ('realized', 'exiting')
                 ORDER BY profile_id
                 ON CONFLICT (dataflow, profile_id) DO UPDATE SET version = outbox.version + 1,
                   reasons = outbox.reasons | excluded.reasons",
                &[&dataflow, &seg, &reasons, &now_ms, &segment],
            )
        })
    }

    fn claim(
        &self,
        dataflow: &str,
        limit: usize,
        now_ms: i64,
        lease_ms: i64,
    ) -> Result<Vec<OutboxItem>, StoreError> {
        let limit = limit as i64;
        let until = now_ms + lease_ms;
        self.transaction(|tx| {
            // A lease lost to a database crash only makes its row due again.
            tx.tx_batch("SET LOCAL synchronous_commit = off")?;
            let rows = tx.query(
                "UPDATE outbox o SET lease_owner = $4, lease_until = $5
                 FROM (SELECT id FROM outbox
                       WHERE dataflow = $1 AND next_attempt_at <= $2 AND lease_until <= $2
                       ORDER BY id LIMIT $3 FOR UPDATE SKIP LOCKED) c
                 WHERE o.id = c.id
                 RETURNING o.id, o.profile_id, o.version, o.segments, o.reasons, o.attempts, o.enqueued_at",
                &[&dataflow, &now_ms, &limit, &self.chain_id, &until],
            )?;
            let ids: Vec<String> = rows.iter().map(|r| r.get(1)).collect();
            let mut profiles = load_profiles(tx, &ids, false)?;
            let mut out = Vec::with_capacity(rows.len());
            for r in rows {
                let (id, profile_id): (i64, String) = (r.get(0), r.get(1));
                let profile = profiles
                    .remove(&profile_id)
                    .ok_or_else(|| StoreError::Corrupt(format!("outbox row {id} names a missing profile")))?;
                let (reasons, attempts): (i32, i32) = (r.get(4), r.get(5));
                out.push(OutboxItem {
                    id,
                    version: r.get(2),
                    profile,
                    // jsonb comes back re-spaced, not as the payload writes it: parsed above.
                    identity_map_json: None,
                    segments: serde_json::from_str(r.get(3)).unwrap_or_default(),
                    reasons: Reasons(u8::try_from(reasons).unwrap_or(0)),
                    attempts: attempts.max(0) as u32,
                    enqueued_at: r.get(6),
                });
            }
            out.sort_by_key(|i| i.id);
            Ok(out)
        })
    }

    fn complete(&self, results: &[Completion], audit: &[AuditRecord]) -> Result<(), StoreError> {
        let mut head = self.head();
        // Failures and releases apply only to rows this process still leases: once a lease has
        // expired and another instance took the row over, that instance decides its fate. A
        // delivered version is removed whoever holds the row (it has arrived).
        let new_head = self.transaction(|tx| {
            // As the SQLite store's outcomes: durable across our crash at once, across a
            // database crash after the WAL writer's next flush (≤ 3 × wal_writer_delay). An
            // outcome lost that way only means an idempotent re-send.
            tx.tx_batch("SET LOCAL synchronous_commit = off")?;
            let new_head = self.append_chain(tx, &head, audit)?;
            let (mut ids, mut versions) = (Vec::new(), Vec::new());
            for r in results {
                match r {
                    Completion::Delivered { id, version } => {
                        ids.push(*id);
                        versions.push(*version);
                    }
                    Completion::Failed { id, retry_at, error } => {
                        tx.execute(
                            "UPDATE outbox SET attempts = attempts + 1, next_attempt_at = $2,
                               errors = (errors::jsonb || jsonb_build_array($3::text::jsonb))::text,
                               lease_owner = NULL, lease_until = 0
                             WHERE id = $1 AND lease_owner = $4",
                            &[id, retry_at, &to_json(error)?, &self.chain_id],
                        )?;
                    }
                    Completion::Requeue { id, retry_at } => {
                        tx.execute(
                            "UPDATE outbox SET next_attempt_at = $2, lease_owner = NULL, lease_until = 0
                             WHERE id = $1 AND lease_owner = $3",
                            &[id, retry_at, &self.chain_id],
                        )?;
                    }
                    Completion::Parked { id, version } => {
                        self.parked(tx, *id, *version)?;
                    }
                    Completion::DeadBatch {
                        dataflow,
                        members,
                        idempotency_key,
                        payload,
                        attempts,
                        error,
                    } => {
                        let attempts = i32::try_from(*attempts).unwrap_or(i32::MAX);
                        tx.execute(
                            "INSERT INTO dead_letters (dataflow, profile_id, idempotency_key, payload, attempts, errors, created_at, class)
                             VALUES ($1, $2, $3, $4, $5, jsonb_build_array($6::text::jsonb)::text, $7, $8)",
                            &[
                                dataflow,
                                members,
                                idempotency_key,
                                payload,
                                &attempts,
                                &to_json(error)?,
                                &error.at,
                                &error.class().as_str(),
                            ],
                        )?;
                    }
                    Completion::Dead {
                        id,
                        version,
                        idempotency_key,
                        payload,
                        error,
                    } => {
                        tx.execute(
                            "INSERT INTO dead_letters (dataflow, profile_id, idempotency_key, payload, attempts, errors, created_at, class)
                             SELECT dataflow, profile_id, $2, $3, attempts + 1,
                               (errors::jsonb || jsonb_build_array($4::text::jsonb))::text, $5, $7
                             FROM outbox WHERE id = $1 AND lease_owner = $6",
                            &[
                                id,
                                idempotency_key,
                                payload,
                                &to_json(error)?,
                                &error.at,
                                &self.chain_id,
                                &error.class().as_str(),
                            ],
                        )?;
                        self.parked(tx, *id, *version)?;
                    }
                }
            }
            if !ids.is_empty() {
                let deleted: HashSet<i64> = tx
                    .query(
                        "DELETE FROM outbox o USING unnest($1::int8[], $2::int8[]) AS d(id, version)
                         WHERE o.id = d.id AND o.version = d.version RETURNING o.id",
                        &[&ids, &versions],
                    )?
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
                // Changed while in flight: send the newer state next, afresh.
                let changed: Vec<i64> = ids.into_iter().filter(|i| !deleted.contains(i)).collect();
                if !changed.is_empty() {
                    tx.execute(
                        "UPDATE outbox SET attempts = 0, lease_owner = NULL, lease_until = 0
                         WHERE id = ANY($1) AND lease_owner = $2",
                        &[&changed, &self.chain_id],
                    )?;
                }
            }
            Ok(new_head)
        })?;
        *head = new_head;
        Ok(())
    }

    fn append_audit(&self, audit: &[AuditRecord]) -> Result<(), StoreError> {
        let mut head = self.head();
        let new_head = self.transaction(|tx| {
            tx.tx_batch("SET LOCAL synchronous_commit = off")?; // as outcomes
            self.append_chain(tx, &head, audit)
        })?;
        *head = new_head;
        Ok(())
    }

    fn chain_id(&self) -> String {
        self.chain_id.clone()
    }

    fn audit_chains(&self) -> Result<Vec<String>, StoreError> {
        self.transaction(|tx| {
            Ok(tx
                .query("SELECT DISTINCT chain FROM audit ORDER BY chain", &[])?
                .iter()
                .map(|r| r.get(0))
                .collect())
        })
    }

    fn audit_chain_records(
        &self,
        chain: &str,
        after_seq: i64,
        limit: usize,
    ) -> Result<Vec<ChainedRecord>, StoreError> {
        let limit = limit as i64;
        self.transaction(|tx| {
            Ok(tx
                .query(
                    "SELECT seq, record, prev, hash, mac FROM audit WHERE chain = $1 AND seq > $2 ORDER BY seq LIMIT $3",
                    &[&chain, &after_seq, &limit],
                )?
                .iter()
                .map(|r| ChainedRecord {
                    seq: r.get(0),
                    record: r.get(1),
                    prev: r.get(2),
                    hash: r.get(3),
                    mac: r.get(4),
                })
                .collect())
        })
    }

    fn pending(&self, dataflow: Option<&str>) -> Result<u64, StoreError> {
        self.transaction(|tx| {
            let rows = tx.query(
                "SELECT COUNT(*) FROM outbox WHERE $1::text IS NULL OR dataflow = $1",
                &[&dataflow],
            )?;
            Ok(rows.first().map(|r| r.get::<_, i64>(0)).unwrap_or(0).max(0) as u64)
        })
    }

    fn profile(&self, id: &str) -> Result<Option<Profile>, StoreError> {
        let ids = [id.to_owned()];
        self.transaction(|tx| Ok(load_profiles(tx, &ids, false)?.remove(id)))
    }

    fn dead_letters_where(&self, filter: &DeadLetterFilter) -> Result<Vec<DeadLetter>, StoreError> {
        let (clause, values) = filter.sql_where('$');
        let sql = format!(
            "SELECT {DEAD_LETTER_COLUMNS} FROM dead_letters {clause} ORDER BY id LIMIT ${}",
            values.len() + 1
        );
        let limit = filter.sql_limit();
        let mut params: Vec<&(dyn ToSql + Sync)> = values
            .iter()
            .map(|v| match v {
                SqlValue::Text(t) => t as &(dyn ToSql + Sync),
                SqlValue::Int(i) => i as &(dyn ToSql + Sync),
            })
            .collect();
        params.push(&limit);
        self.transaction(|tx| {
            // Prepared afresh: the statement depends on which conditions are given.
            wait(tx.tx.query(sql.as_str(), &params))?
                .iter()
                .map(dead_letter)
                .collect()
        })
    }

    fn dead_letter(&self, id: i64) -> Result<Option<DeadLetter>, StoreError> {
        self.transaction(|tx| {
            tx.query(
                "SELECT id, dataflow, profile_id, idempotency_key, payload, attempts, errors, created_at, class
                 FROM dead_letters WHERE id = $1",
                &[&id],
            )?
            .first()
            .map(dead_letter)
            .transpose()
        })
    }

    fn remove_dead_letter(&self, id: i64) -> Result<bool, StoreError> {
        self.transaction(|tx| Ok(tx.execute("DELETE FROM dead_letters WHERE id = $1", &[&id])? > 0))
    }

    fn dead_letter_failed(&self, id: i64, error: &AttemptError) -> Result<(), StoreError> {
        let class = error.class().as_str();
        let error = to_json(error)?;
        self.transaction(|tx| {
            tx.execute(
                "UPDATE dead_letters SET attempts = attempts + 1,
                   errors = (errors::jsonb || jsonb_build_array($2::text::jsonb))::text, class = $3
                 WHERE id = $1",
                &[&id, &error, &class],
            )?;
            Ok(())
        })
    }

    fn queue_head(
        &self,
        dataflow: &str,
        now_ms: i64,
        cap: usize,
    ) -> Result<(usize, Option<i64>), StoreError> {
        let cap = i64::try_from(cap).unwrap_or(i64::MAX);
        self.transaction(|tx| {
            let rows = tx.query(
                "SELECT COUNT(*), MIN(enqueued_at) FROM (SELECT enqueued_at FROM outbox
                 WHERE dataflow = $1 AND next_attempt_at <= $2 AND (lease_owner IS NULL OR lease_until < $2)
                 ORDER BY id LIMIT $3) AS head",
                &[&dataflow, &now_ms, &cap],
            )?;
            let (n, oldest): (i64, Option<i64>) = rows.first().map_or((0, None), |r| (r.get(0), r.get(1)));
            Ok((usize::try_from(n).unwrap_or(0), oldest))
        })
    }

    fn pauses(&self) -> Result<Vec<Pause>, StoreError> {
        self.transaction(|tx| {
            tx.query(
                "SELECT dataflow, reason, class, message, since, probe_at, probe_interval_ms
                 FROM dataflow_pauses ORDER BY dataflow",
                &[],
            )?
            .iter()
            .map(|r| {
                Ok(Pause {
                    dataflow: r.get(0),
                    reason: PauseReason::parse(r.get(1))?,
                    class: r.get(2),
                    message: r.get(3),
                    since: r.get(4),
                    probe_at: r.get(5),
                    probe_interval_ms: r.get(6),
                })
            })
            .collect()
        })
    }

    fn pause(&self, p: &Pause) -> Result<bool, StoreError> {
        self.transaction(|tx| {
            let n = tx.execute(
                "INSERT INTO dataflow_pauses (dataflow, reason, class, message, since, probe_at, probe_interval_ms)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)
                 ON CONFLICT (dataflow) DO UPDATE SET reason = excluded.reason, class = excluded.class,
                   message = excluded.message, probe_at = excluded.probe_at,
                   probe_interval_ms = excluded.probe_interval_ms,
                   since = CASE WHEN dataflow_pauses.reason = excluded.reason
                           THEN dataflow_pauses.since ELSE excluded.since END
                 WHERE dataflow_pauses.reason = 'breaker' OR excluded.reason = 'manual'",
                &[
                    &p.dataflow,
                    &p.reason.as_str(),
                    &p.class,
                    &p.message,
                    &p.since,
                    &p.probe_at,
                    &p.probe_interval_ms,
                ],
            )?;
            Ok(n > 0)
        })
    }

    fn resume(&self, dataflow: &str, breaker_only: bool) -> Result<bool, StoreError> {
        self.transaction(|tx| {
            let n = tx.execute(
                "DELETE FROM dataflow_pauses WHERE dataflow = $1 AND (NOT $2 OR reason = 'breaker')",
                &[&dataflow, &breaker_only],
            )?;
            Ok(n > 0)
        })
    }

    fn api_dataflows(&self) -> Result<Vec<(String, String)>, StoreError> {
        self.transaction(|tx| {
            Ok(tx
                .query("SELECT name, json FROM api_dataflows ORDER BY name", &[])?
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect())
        })
    }

    fn save_api_dataflow(&self, name: &str, json: &str) -> Result<(), StoreError> {
        self.transaction(|tx| {
            tx.execute(
                "INSERT INTO api_dataflows (name, json) VALUES ($1, $2)
                 ON CONFLICT (name) DO UPDATE SET json = excluded.json",
                &[&name, &json],
            )?;
            Ok(())
        })
    }

    fn delete_api_dataflow(&self, name: &str) -> Result<bool, StoreError> {
        self.transaction(|tx| {
            let n = tx.execute("DELETE FROM api_dataflows WHERE name = $1", &[&name])?;
            tx.execute("DELETE FROM outbox WHERE dataflow = $1", &[&name])?;
            tx.execute("DELETE FROM mappings WHERE dataflow = $1", &[&name])?;
            tx.execute("DELETE FROM dataflow_pauses WHERE dataflow = $1", &[&name])?;
            Ok(n > 0)
        })
    }

    fn shared(&self) -> bool {
        true
    }
}
