//! One set of store tests, run against both backends: the embedded SQLite store and the
//! PostgreSQL store (the machine's server at 127.0.0.1:5432, or `SALLYPORT_TEST_PG`; each
//! test gets its own schema, dropped afterwards).
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::HashSet;
use std::sync::Arc;

use sallyport::audit::{AuditRecord, Chain, Outcome};
use sallyport::profile::trigger::{Reasons, Trigger};
use sallyport::profile::update::{parse_line, SegmentStatus};
use sallyport::store::{AttemptError, Completion, Pause, PauseReason, PgStore, SqliteStore, Store};
use serde_json::json;
use support::pg::PgSchema;

const DF: &str = "df";
const NOW: i64 = 1_800_000_000_000;
const LEASE: i64 = 30_000;

/// A backend under test, and what keeps it alive (temp dir or schema).
struct Backend {
    store: Arc<dyn Store>,
    reopen: Box<dyn Fn() -> Arc<dyn Store>>,
    _keep: Box<dyn std::any::Any>,
}

fn sqlite() -> Backend {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.db");
    let open =
        move || -> Arc<dyn Store> { Arc::new(SqliteStore::open(&path, Chain::new(Some(b"k"))).unwrap()) };
    Backend {
        store: open(),
        reopen: Box::new(open),
        _keep: Box::new(dir),
    }
}

fn postgres() -> Backend {
    let schema = PgSchema::new();
    let (url, name) = (schema.url.clone(), schema.name.clone());
    let open = move || -> Arc<dyn Store> {
        Arc::new(PgStore::open(&url, None, Some(&name), "test", 4, None, Chain::new(Some(b"k"))).unwrap())
    };
    Backend {
        store: open(),
        reopen: Box::new(open),
        _keep: Box::new(schema),
    }
}

/// A PostgreSQL store in `schema` as gateway instance `instance`, plain connection, no audit key.
fn pg_store(schema: &PgSchema, instance: &str, pool: usize) -> Result<PgStore, sallyport::store::StoreError> {
    PgStore::open(
        &schema.url,
        None,
        Some(&schema.name),
        instance,
        pool,
        None,
        Chain::new(None),
    )
}

/// Each conformance test, once per backend.
macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod on_sqlite { $( #[test] fn $name() { super::$name(super::sqlite()) } )* }
        mod on_postgres { $( #[test] fn $name() { super::$name(super::postgres()) } )* }
    };
}

conformance!(
    updates_merge_into_stored_profiles,
    a_second_change_coalesces_into_the_queued_row,
    claims_lease_rows_until_completed_or_expired,
    a_row_changed_in_flight_is_sent_again,
    failures_back_off_then_become_dead_letters,
    audit_records_chain_and_verify,
    newly_mapped_segments_are_backfilled_once,
    api_dataflows_are_stored_and_deleting_drops_their_queue,
    state_survives_reopening,
    a_claimed_identity_map_is_sent_as_its_canonical_json,
    dead_letters_carry_their_class_and_filters_select_in_the_store,
    pauses_are_stored_and_an_operators_pause_stands_over_the_breakers,
    a_requeued_row_keeps_its_attempts_and_is_due_again,
);

/// Apply NDJSON lines; every update with a segment event or attributes enqueues for `DF`.
fn ingest(store: &dyn Store, lines: &[serde_json::Value]) {
    ingest_for(store, DF, lines)
}

/// As [`ingest`], enqueuing for `dataflow`.
fn ingest_for(store: &dyn Store, dataflow: &str, lines: &[serde_json::Value]) {
    let updates: Vec<_> = lines
        .iter()
        .map(|l| parse_line(l.to_string().as_bytes()).unwrap())
        .collect();
    store
        .apply_updates(updates, &mut |p, u| {
            let mut t = Trigger::default();
            for s in &u.segments {
                t.reasons = t.reasons | Reasons::SEGMENT;
                t.segments.push(s.id.clone());
            }
            if u.attributes.is_some() {
                t.reasons = t.reasons | Reasons::ATTRIBUTE;
            }
            p.apply(u, "2026-11-25T00:00:00Z");
            if t.reasons.is_empty() {
                vec![]
            } else {
                vec![(dataflow.to_owned(), t)]
            }
        })
        .unwrap();
}

/// Record one delivered row.
fn delivered(s: &dyn Store, id: i64, version: i64) {
    s.complete(&[Completion::Delivered { id, version }], &[]).unwrap();
}

fn realized(id: &str, seg: &str) -> serde_json::Value {
    json!({"profileId": id, "segments": [{"id": seg, "status": "realized"}]})
}

fn error(attempt: u32) -> AttemptError {
    AttemptError {
        at: NOW,
        attempt,
        kind: "http_status".into(),
        status: Some(503),
        message: "503 Service Unavailable".into(),
    }
}

fn record(profile: &str, outcome: Outcome) -> AuditRecord<'static> {
    AuditRecord {
        at: NOW,
        dataflow: DF.into(),
        destination: "rx.example:443".into(),
        resolved_ip: Some("192.0.2.1".into()),
        source_ip: None,
        profile_id: profile.to_owned().into(),
        payload_sha256: sallyport::audit::payload_sha256(b"{}").into(),
        idempotency_key: format!("k-{profile}").into(),
        attempt: 1,
        outcome,
        error_kind: None,
        http_status: Some(200),
        latency_ms: 1.5,
        peer_cert_sha256: None,
        auth: "none".into(),
        trigger: None,
        trace_id: None,
    }
}

fn updates_merge_into_stored_profiles(b: Backend) {
    let s = &*b.store;
    ingest(
        s,
        &[
            json!({"profileId": "p1", "identityMap": {"email": [{"id": "a@example.com"}]},
                   "attributes": {"person": {"name": {"firstName": "Ada"}}}}),
            json!({"profileId": "p1", "attributes": {"person": {"name": {"lastName": "L"}}},
                   "segments": [{"id": "s1", "status": "realized", "lastQualificationTime": "2026-11-01T00:00:00Z"}]}),
        ],
    );
    ingest(
        s,
        &[json!({"profileId": "p1", "segments": [{"id": "s1", "status": "exiting"}]})],
    );
    let p = s.profile("p1").unwrap().unwrap();
    assert_eq!(
        serde_json::Value::Object(p.attributes),
        json!({"person": {"name": {"firstName": "Ada", "lastName": "L"}}})
    );
    assert_eq!(p.identity_map["email"][0]["id"], "a@example.com");
    assert_eq!(p.segments["s1"].status, SegmentStatus::Exiting);
    assert!(s.profile("nobody").unwrap().is_none());
}

/// The identity map a delivery sends is the map's JSON with sorted keys, whether the store
/// hands it over as stored text (SQLite) or as a parsed map (PostgreSQL).
fn a_claimed_identity_map_is_sent_as_its_canonical_json(b: Backend) {
    let s = &*b.store;
    ingest(
        s,
        &[
            json!({"profileId": "p1", "identityMap": {"zz": [{"id": "1", "primary": true}], "ecid": [{"id": "é\"2"}]},
                 "segments": [{"id": "s1", "status": "realized"}]}),
        ],
    );
    let item = s.claim(DF, 10, NOW + 1_000_000, LEASE).unwrap().remove(0);
    let sent = match &item.identity_map_json {
        Some(raw) => {
            assert!(
                item.profile.identity_map.is_empty(),
                "one source of the identity map, not two"
            );
            raw.get().to_owned()
        }
        None => serde_json::to_string(&item.profile.identity_map).unwrap(),
    };
    assert_eq!(
        sent,
        r#"{"ecid":[{"id":"é\"2"}],"zz":[{"id":"1","primary":true}]}"#
    );
}

fn a_second_change_coalesces_into_the_queued_row(b: Backend) {
    let s = &*b.store;
    ingest(s, &[realized("p1", "s1")]);
    ingest(
        s,
        &[
            realized("p1", "s2"),
            json!({"profileId": "p1", "attributes": {"a": 1}}),
        ],
    );
    assert_eq!(s.pending(Some(DF)).unwrap(), 1, "one row per (dataflow, profile)");
    assert_eq!(s.pending(Some("other")).unwrap(), 0);
    let items = s.claim(DF, 10, NOW + 1_000_000, LEASE).unwrap();
    assert_eq!(items.len(), 1);
    let it = &items[0];
    assert_eq!(it.version, 2, "the second batch bumped the version");
    assert_eq!(it.segments, vec!["s1".to_owned(), "s2".to_owned()]);
    assert!(it.reasons.contains(Reasons::SEGMENT) && it.reasons.contains(Reasons::ATTRIBUTE));
    assert_eq!(it.profile.segments.len(), 2);
}

fn claims_lease_rows_until_completed_or_expired(b: Backend) {
    let s = &*b.store;
    ingest(
        s,
        &[realized("p1", "s1"), realized("p2", "s1"), realized("p3", "s1")],
    );
    let now = sallyport::store::now_ms();
    let first = s.claim(DF, 2, now, LEASE).unwrap();
    let ids: Vec<&str> = first.iter().map(|i| i.profile.id.as_str()).collect();
    assert_eq!(ids, ["p1", "p2"], "oldest first");
    let second = s.claim(DF, 10, now, LEASE).unwrap();
    assert_eq!(second.len(), 1, "leased rows are skipped");
    assert_eq!(second[0].profile.id, "p3");
    assert!(s.claim(DF, 10, now, LEASE).unwrap().is_empty());
    // A completed row is gone; a lease that expired makes the rest claimable again.
    delivered(s, first[0].id, first[0].version);
    let again = s.claim(DF, 10, now + LEASE + 1, LEASE).unwrap();
    let ids: HashSet<String> = again.iter().map(|i| i.profile.id.clone()).collect();
    assert_eq!(ids, HashSet::from(["p2".to_owned(), "p3".to_owned()]));
    assert_eq!(s.pending(None).unwrap(), 2);
}

fn a_row_changed_in_flight_is_sent_again(b: Backend) {
    let s = &*b.store;
    ingest(s, &[realized("p1", "s1")]);
    let now = sallyport::store::now_ms();
    let sent = s.claim(DF, 10, now, LEASE).unwrap().remove(0);
    ingest(s, &[json!({"profileId": "p1", "attributes": {"a": 2}})]);
    delivered(s, sent.id, sent.version);
    assert_eq!(s.pending(None).unwrap(), 1, "the newer state is still queued");
    let next = s.claim(DF, 10, now, LEASE).unwrap();
    assert_eq!(next.len(), 1, "and claimable at once (the lease was released)");
    assert_eq!(
        (next[0].id, next[0].version, next[0].attempts),
        (sent.id, sent.version + 1, 0)
    );
    assert_eq!(next[0].profile.attributes["a"], 2);
    delivered(s, next[0].id, next[0].version);
    assert_eq!(s.pending(None).unwrap(), 0);
}

fn failures_back_off_then_become_dead_letters(b: Backend) {
    let s = &*b.store;
    ingest(s, &[realized("p1", "s1")]);
    let now = sallyport::store::now_ms();
    let item = s.claim(DF, 10, now, LEASE).unwrap().remove(0);
    s.complete(
        &[Completion::Failed {
            id: item.id,
            retry_at: now + 5_000,
            error: error(1),
        }],
        &[],
    )
    .unwrap();
    assert!(
        s.claim(DF, 10, now, LEASE).unwrap().is_empty(),
        "not before retry_at"
    );
    let item = s.claim(DF, 10, now + 5_000, LEASE).unwrap().remove(0);
    assert_eq!(item.attempts, 1);
    s.complete(
        &[Completion::Dead {
            id: item.id,
            version: item.version,
            idempotency_key: "key-1".into(),
            payload: b"{\"x\":1}".to_vec(),
            error: error(2),
        }],
        &[],
    )
    .unwrap();
    assert_eq!(s.pending(None).unwrap(), 0);
    let dead = s.dead_letters(Some(DF), 10).unwrap();
    assert_eq!(dead.len(), 1);
    let d = &dead[0];
    assert_eq!(
        (d.attempts, d.errors.len(), d.idempotency_key.as_str()),
        (2, 2, "key-1")
    );
    assert_eq!(d.errors, vec![error(1), error(2)]);
    assert!(s.dead_letters(Some("other"), 10).unwrap().is_empty());
    let one = s.dead_letter(d.id).unwrap().unwrap();
    assert_eq!(
        (one.payload.as_slice(), one.profile_id.as_str()),
        (&b"{\"x\":1}"[..], "p1")
    );
    s.dead_letter_failed(d.id, &error(3)).unwrap();
    let one = s.dead_letter(d.id).unwrap().unwrap();
    assert_eq!((one.attempts, one.errors.len()), (3, 3));
    assert!(s.remove_dead_letter(d.id).unwrap());
    assert!(!s.remove_dead_letter(d.id).unwrap());
    assert!(s.dead_letter(d.id).unwrap().is_none());
}

fn failure(kind: &str, status: Option<u16>, at: i64) -> AttemptError {
    AttemptError {
        at,
        attempt: 1,
        kind: kind.into(),
        status,
        message: format!("{kind} {status:?}"),
    }
}

/// Claim `dataflow`'s one due row and make it a dead letter whose attempts failed with
/// `errors` (the last one at its `at`, which is when it is dead-lettered). Returns its id.
fn dead_letter(s: &dyn Store, dataflow: &str, errors: &[AttemptError]) -> i64 {
    let now = sallyport::store::now_ms();
    let (last, earlier) = errors.split_last().unwrap();
    for (i, e) in earlier.iter().enumerate() {
        let item = s
            .claim(dataflow, 1, now + i as i64 * 10_000, LEASE)
            .unwrap()
            .remove(0);
        s.complete(
            &[Completion::Failed {
                id: item.id,
                retry_at: now + (i as i64 + 1) * 10_000,
                error: e.clone(),
            }],
            &[],
        )
        .unwrap();
    }
    let item = s.claim(dataflow, 1, now + 1_000_000, LEASE).unwrap().remove(0);
    s.complete(
        &[Completion::Dead {
            id: item.id,
            version: item.version,
            idempotency_key: format!("key-{}", item.profile.id),
            payload: b"{}".to_vec(),
            error: last.clone(),
        }],
        &[],
    )
    .unwrap();
    s.dead_letters(Some(dataflow), 100).unwrap().last().unwrap().id
}

/// A dead letter carries the class of its last attempt (and of a failed replay after); the
/// store selects by dataflow, class, time and id.
fn dead_letters_carry_their_class_and_filters_select_in_the_store(b: Backend) {
    use sallyport::delivery::FailureClass::{self, *};
    use sallyport::store::DeadLetterFilter;
    let s = &*b.store;
    let mut ids = Vec::new();
    for (i, (df, errors)) in [
        (
            DF,
            vec![
                failure("http_status", Some(404), NOW - 1),
                failure("http_status", Some(503), NOW),
            ],
        ),
        (
            DF,
            vec![
                failure("http_status", Some(503), NOW),
                failure("http_status", Some(404), NOW + 1_000),
            ],
        ),
        (DF, vec![failure("timeout", None, NOW + 2_000)]),
        (DF, vec![failure("server_certificate", None, NOW + 3_000)]),
        ("other", vec![failure("http_status", Some(429), NOW + 4_000)]),
    ]
    .into_iter()
    .enumerate()
    {
        ingest_for(s, df, &[realized(&format!("p{i}"), "s1")]);
        ids.push(dead_letter(s, df, &errors));
    }
    let select = |f: DeadLetterFilter| -> Vec<i64> {
        s.dead_letters_where(&f).unwrap().iter().map(|d| d.id).collect()
    };
    let pick = |is: &[usize]| -> Vec<i64> { is.iter().map(|&i| ids[i]).collect() };
    let all = s.dead_letters_where(&DeadLetterFilter::default()).unwrap();
    let classes: Vec<FailureClass> = all.iter().map(|d| d.class).collect();
    assert_eq!(
        classes,
        [Unavailable, Refused, Unavailable, Certificate, Unavailable]
    );
    let class = |c| DeadLetterFilter {
        class: Some(c),
        ..DeadLetterFilter::default()
    };
    assert_eq!(select(class(Unavailable)), pick(&[0, 2, 4]));
    assert_eq!(
        select(DeadLetterFilter {
            dataflow: Some(DF.into()),
            ..class(Unavailable)
        }),
        pick(&[0, 2])
    );
    assert_eq!(
        select(DeadLetterFilter {
            since_ms: Some(NOW + 1_000),
            ..class(Unavailable)
        }),
        pick(&[2, 4])
    );
    assert_eq!(
        select(DeadLetterFilter {
            since_ms: Some(NOW + 1_000),
            until_ms: Some(NOW + 3_000),
            ..DeadLetterFilter::default()
        }),
        pick(&[1, 2])
    );
    assert_eq!(
        select(DeadLetterFilter {
            after_id: Some(ids[1]),
            limit: 2,
            ..DeadLetterFilter::default()
        }),
        pick(&[2, 3])
    );
    assert!(select(class(Policy)).is_empty());
    // Shown with the class, on the letter and on each attempt's error.
    let shown = serde_json::to_value(s.dead_letter(ids[1]).unwrap().unwrap()).unwrap();
    assert_eq!(shown["class"], "refused");
    assert_eq!(
        (&shown["errors"][0]["class"], &shown["errors"][1]["class"]),
        (&json!("unavailable"), &json!("refused"))
    );
    // A replay that fails differently moves the letter to that class.
    s.dead_letter_failed(ids[3], &failure("connect", None, NOW + 5_000))
        .unwrap();
    assert!(select(class(Certificate)).is_empty());
    drop(b.store);
    let s = (b.reopen)();
    assert_eq!(s.dead_letter(ids[3]).unwrap().unwrap().class, Unavailable);
    assert_eq!(s.dead_letters_where(&class(Unavailable)).unwrap().len(), 4);
}

/// A database whose dead letters were stored before classes were (schema version 2) gets
/// each one's class from its last error when it is opened by this build.
#[test]
fn sqlite_dead_letters_stored_before_classes_get_theirs_on_upgrade() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.db");
    let open = || SqliteStore::open(&path, Chain::new(None)).unwrap();
    let s = open();
    ingest(&s, &[realized("p1", "s1"), realized("p2", "s1")]);
    let ids = [
        dead_letter(&s, DF, &[failure("http_status", Some(400), NOW)]),
        dead_letter(&s, DF, &[failure("client_cert_rejected", None, NOW)]),
    ];
    drop(s);
    // Back to version 2: no class column, no class indexes.
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute_batch(
        "DROP INDEX dead_letters_by_class; DROP INDEX dead_letters_by_class_any_dataflow;
         ALTER TABLE dead_letters DROP COLUMN class;
         UPDATE meta SET value = '2' WHERE key = 'schema_version';",
    )
    .unwrap();
    drop(conn);
    let s = open();
    let classes: Vec<_> = ids
        .iter()
        .map(|id| s.dead_letter(*id).unwrap().unwrap().class.as_str())
        .collect();
    assert_eq!(classes, ["refused", "certificate"]);
    let refused = sallyport::store::DeadLetterFilter {
        class: Some(sallyport::delivery::FailureClass::Refused),
        ..Default::default()
    };
    assert_eq!(s.dead_letters_where(&refused).unwrap()[0].id, ids[0]);
}

/// As the SQLite upgrade above, on PostgreSQL (migration 3).
#[test]
fn postgres_dead_letters_stored_before_classes_get_theirs_on_upgrade() {
    let schema = PgSchema::new();
    let s = pg_store(&schema, "u", 2).unwrap();
    ingest(&s, &[realized("p1", "s1"), realized("p2", "s1")]);
    let ids = [
        dead_letter(&s, DF, &[failure("http_status", Some(400), NOW)]),
        dead_letter(&s, DF, &[failure("client_cert_rejected", None, NOW)]),
    ];
    drop(s);
    schema.execute(
        "ALTER TABLE dead_letters DROP COLUMN class; DELETE FROM schema_migrations WHERE version = 3",
    );
    let s = pg_store(&schema, "u", 2).unwrap();
    let classes: Vec<_> = ids
        .iter()
        .map(|id| s.dead_letter(*id).unwrap().unwrap().class.as_str())
        .collect();
    assert_eq!(classes, ["refused", "certificate"]);
    let refused = sallyport::store::DeadLetterFilter {
        class: Some(sallyport::delivery::FailureClass::Refused),
        ..Default::default()
    };
    assert_eq!(s.dead_letters_where(&refused).unwrap()[0].id, ids[0]);
}

fn audit_records_chain_and_verify(b: Backend) {
    let s = &*b.store;
    s.complete(
        &[],
        &[record("p1", Outcome::Retry), record("p1", Outcome::Delivered)],
    )
    .unwrap();
    s.append_audit(&[record("p2", Outcome::Delivered)]).unwrap();
    let recs = s.audit_records(0, 100).unwrap();
    assert_eq!(recs.iter().map(|r| r.seq).collect::<Vec<_>>(), [1, 2, 3]);
    assert_eq!(sallyport::audit::verify(&recs, &Chain::new(Some(b"k"))), Ok(3));
    assert!(
        sallyport::audit::verify(&recs, &Chain::new(Some(b"other key"))).is_err(),
        "the HMAC binds the chain to the key"
    );
    assert_eq!(s.audit_chains().unwrap(), vec![s.chain_id()]);
    assert_eq!(s.audit_chain_records(&s.chain_id(), 2, 10).unwrap().len(), 1);
    assert!(s.audit_chain_records("no such chain", 0, 10).unwrap().is_empty());
}

fn newly_mapped_segments_are_backfilled_once(b: Backend) {
    let s = &*b.store;
    let members: Vec<_> = (0..50).map(|i| realized(&format!("p{i:02}"), "s1")).collect();
    s.apply_updates(
        members
            .iter()
            .map(|l| parse_line(l.to_string().as_bytes()).unwrap())
            .collect::<Vec<_>>(),
        &mut |p, u| {
            p.apply(u, "2026-11-25T00:00:00Z");
            vec![]
        },
    )
    .unwrap();
    ingest(
        s,
        &[json!({"profileId": "p00", "segments": [{"id": "s1", "status": "exited"}]})],
    );
    let (times, fresh) = s.sync_mappings(DF, &["s1".into()], NOW).unwrap();
    assert_eq!(fresh, ["s1"]);
    assert_eq!(times["s1"].mapping_created_at, NOW);
    let (_, fresh) = s.sync_mappings(DF, &["s1".into()], NOW + 1).unwrap();
    assert!(fresh.is_empty(), "an existing mapping is not new");
    assert_eq!(
        s.backfill(DF, "s1", NOW).unwrap(),
        49,
        "members only (p00 exited)"
    );
    assert_eq!(
        s.pending(Some(DF)).unwrap(),
        50,
        "p00's own row plus 49 backfilled"
    );
    // Unmapped, then mapped again: backfilled again.
    s.sync_mappings(DF, &[], NOW + 2).unwrap();
    let (_, fresh) = s.sync_mappings(DF, &["s1".into()], NOW + 3).unwrap();
    assert_eq!(fresh, ["s1"]);
}

fn api_dataflows_are_stored_and_deleting_drops_their_queue(b: Backend) {
    let s = &*b.store;
    s.save_api_dataflow("b", "{\"v\":1}").unwrap();
    s.save_api_dataflow(DF, "{\"v\":1}").unwrap();
    s.save_api_dataflow(DF, "{\"v\":2}").unwrap();
    assert_eq!(
        s.api_dataflows().unwrap(),
        vec![("b".into(), "{\"v\":1}".into()), (DF.into(), "{\"v\":2}".into())]
    );
    ingest(s, &[realized("p1", "s1")]);
    assert_eq!(s.pending(Some(DF)).unwrap(), 1);
    assert!(s.delete_api_dataflow(DF).unwrap());
    assert!(!s.delete_api_dataflow(DF).unwrap());
    assert_eq!(s.pending(Some(DF)).unwrap(), 0);
    assert_eq!(s.api_dataflows().unwrap().len(), 1);
}

fn state_survives_reopening(b: Backend) {
    ingest(&*b.store, &[realized("p1", "s1"), realized("p2", "s1")]);
    b.store
        .complete(&[], &[record("p1", Outcome::Delivered)])
        .unwrap();
    drop(b.store);
    let s = (b.reopen)();
    assert_eq!(s.pending(None).unwrap(), 2);
    assert!(s.profile("p2").unwrap().is_some());
    let total: usize = s
        .audit_chains()
        .unwrap()
        .iter()
        .map(|c| s.audit_chain_records(c, 0, 100).unwrap().len())
        .sum();
    assert_eq!(total, 1);
}

fn pause(reason: PauseReason, since: i64) -> Pause {
    Pause {
        dataflow: DF.into(),
        reason,
        class: (reason == PauseReason::Breaker).then(|| "unavailable".into()),
        message: "m".into(),
        since,
        probe_at: since + 1000,
        probe_interval_ms: 1000,
    }
}

fn pauses_are_stored_and_an_operators_pause_stands_over_the_breakers(b: Backend) {
    let s = &*b.store;
    assert!(s.pauses().unwrap().is_empty());
    // The breaker pauses; a later probe moves its next probe but keeps when it began.
    assert!(s.pause(&pause(PauseReason::Breaker, 10)).unwrap());
    let mut later = pause(PauseReason::Breaker, 99);
    later.probe_at = 5000;
    assert!(s.pause(&later).unwrap());
    let stored = s.pauses().unwrap();
    assert_eq!((stored[0].since, stored[0].probe_at), (10, 5000));
    // An operator's pause replaces it; the breaker can then neither replace nor end it.
    assert!(s.pause(&pause(PauseReason::Manual, 20)).unwrap());
    assert!(!s.pause(&pause(PauseReason::Breaker, 30)).unwrap());
    assert!(
        !s.resume(DF, true).unwrap(),
        "a probe does not end an operator's pause"
    );
    let stored = s.pauses().unwrap();
    assert_eq!((stored[0].reason, stored[0].since), (PauseReason::Manual, 20));
    // It outlives the process; the operator ends it.
    drop(b.store);
    let s = (b.reopen)();
    assert_eq!(s.pauses().unwrap().len(), 1);
    assert!(s.resume(DF, false).unwrap());
    assert!(!s.resume(DF, false).unwrap());
    assert!(s.pauses().unwrap().is_empty());
}

fn a_requeued_row_keeps_its_attempts_and_is_due_again(b: Backend) {
    let s = &*b.store;
    ingest(s, &[realized("p1", "s1")]);
    let now = sallyport::store::now_ms();
    let item = s.claim(DF, 1, now, LEASE).unwrap().remove(0);
    s.complete(
        &[Completion::Failed {
            id: item.id,
            retry_at: now,
            error: error(1),
        }],
        &[],
    )
    .unwrap();
    let item = s.claim(DF, 1, now, LEASE).unwrap().remove(0);
    assert_eq!(item.attempts, 1);
    // Handed back while paused: not an attempt, and due at the time given.
    s.complete(
        &[Completion::Requeue {
            id: item.id,
            retry_at: now + 500,
        }],
        &[],
    )
    .unwrap();
    assert!(s.claim(DF, 1, now, LEASE).unwrap().is_empty(), "not due yet");
    let again = s.claim(DF, 1, now + 500, LEASE).unwrap();
    assert_eq!((again.len(), again[0].attempts), (1, 1));
}

/// Two PostgreSQL stores on one schema (two gateway instances): concurrent claims never hand
/// the same row to both, and together they take every row.
#[test]
fn postgres_instances_never_claim_the_same_row() {
    let schema = PgSchema::new();
    let open = |name: &str| Arc::new(pg_store(&schema, name, 2).unwrap());
    let (a, b) = (open("a"), open("b"));
    let lines: Vec<_> = (0..2000).map(|i| realized(&format!("p{i}"), "s1")).collect();
    ingest(&*a, &lines);
    let now = sallyport::store::now_ms();
    let take = |s: Arc<PgStore>| {
        std::thread::spawn(move || {
            let mut got = Vec::new();
            loop {
                let batch = s.claim(DF, 37, now, LEASE).unwrap();
                if batch.is_empty() {
                    return got;
                }
                got.extend(batch.into_iter().map(|i| i.id));
            }
        })
    };
    let (ta, tb) = (take(a.clone()), take(b.clone()));
    let (ga, gb) = (ta.join().unwrap(), tb.join().unwrap());
    let (sa, sb): (HashSet<i64>, HashSet<i64>) = (ga.iter().copied().collect(), gb.iter().copied().collect());
    assert!(sa.is_disjoint(&sb), "a row was claimed by both instances");
    assert_eq!(sa.len() + sb.len(), 2000);
    assert!(!sa.is_empty() && !sb.is_empty(), "both instances took work");
    // Each instance appends its own chain; both verify.
    a.append_audit(&[record("p1", Outcome::Delivered)]).unwrap();
    b.append_audit(&[record("p2", Outcome::Delivered)]).unwrap();
    let chains = a.audit_chains().unwrap();
    assert_eq!(chains.len(), 2);
    for c in chains {
        assert_eq!(
            sallyport::audit::verify(&a.audit_chain_records(&c, 0, 10).unwrap(), &Chain::new(None)),
            Ok(1)
        );
    }
}

/// Two instances ingesting the same profiles at once: no update is lost (each profile is
/// locked for its read-merge-write).
#[test]
fn postgres_concurrent_ingest_loses_no_update() {
    let schema = PgSchema::new();
    let open = || Arc::new(pg_store(&schema, "i", 2).unwrap());
    let stores = [open(), open()];
    let handles: Vec<_> = stores
        .iter()
        .enumerate()
        .map(|(n, s)| {
            let s = s.clone();
            std::thread::spawn(move || {
                for round in 0..20 {
                    // Same profiles, each writer its own attribute: both must survive.
                    let lines: Vec<_> = (0..20)
                        .rev()
                        .map(|i| json!({"profileId": format!("p{i}"), "attributes": {format!("w{n}"): {format!("r{round}"): true}}}))
                        .collect();
                    ingest(&*s, &lines);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    for i in 0..20 {
        let p = stores[0].profile(&format!("p{i}")).unwrap().unwrap();
        for w in ["w0", "w1"] {
            assert_eq!(
                p.attributes[w].as_object().unwrap().len(),
                20,
                "p{i}.{w}: {:?}",
                p.attributes
            );
        }
    }
}

#[test]
fn postgres_migrations_are_recorded_and_a_newer_schema_is_refused() {
    let schema = PgSchema::new();
    let open = || pg_store(&schema, "m", 1);
    drop(open().unwrap());
    drop(open().unwrap()); // a second start applies nothing
    let versions = schema.query_i64("SELECT version FROM schema_migrations ORDER BY version");
    assert_eq!(versions, vec![1, 2, 3]);
    schema.execute("INSERT INTO schema_migrations (version) VALUES (999)");
    let err = open().unwrap_err().to_string();
    assert!(err.contains("newer than this build"), "{err}");
}

/// After a lease expired and another instance took the row over, the first instance's late
/// outcome does not touch the row: the new owner decides (no second delivery in flight).
#[test]
fn postgres_a_late_outcome_after_takeover_leaves_the_row_to_its_new_owner() {
    let schema = PgSchema::new();
    let open = |name: &str| pg_store(&schema, name, 1).unwrap();
    let (a, b) = (open("a"), open("b"));
    ingest(&a, &[realized("p1", "s1")]);
    let now = sallyport::store::now_ms();
    let late = a.claim(DF, 10, now, LEASE).unwrap().remove(0);
    let taken = b.claim(DF, 10, now + LEASE + 1, LEASE).unwrap();
    assert_eq!(taken.len(), 1, "the expired lease was taken over");
    let fail = |s: &PgStore, id| {
        s.complete(
            &[Completion::Failed {
                id,
                retry_at: now,
                error: error(1),
            }],
            &[],
        )
        .unwrap()
    };
    fail(&a, late.id);
    assert!(
        a.claim(DF, 10, now + LEASE + 2, LEASE).unwrap().is_empty(),
        "a's late failure did not release b's lease"
    );
    delivered(&b, taken[0].id, taken[0].version);
    assert_eq!(b.pending(None).unwrap(), 0);
}

/// With `store.ca`, the store speaks TLS to PostgreSQL and verifies the server: the machine's
/// server (ssl = on, Debian's own certificate) is trusted through exactly its certificate and
/// reached by the name in it; a CA that did not sign it, or a name it does not carry, is
/// refused before any query.
#[test]
fn postgres_over_tls_verifies_the_server_certificate() {
    let schema = PgSchema::new();
    assert_eq!(
        schema.query_text("SHOW ssl"),
        "on",
        "the test PostgreSQL must serve TLS"
    );
    let cert = std::path::PathBuf::from(schema.query_text("SHOW ssl_cert_file"));
    let der = sallyport::tls::pem::load_certs(&cert).unwrap().remove(0);
    let facts = sallyport::tls::facts::CertFacts::from_der(&der).unwrap();
    let name = facts
        .sans
        .dns
        .first()
        .cloned()
        .unwrap_or_else(|| facts.subject_cn.clone().unwrap());
    let server = url::Url::parse(&schema.url).unwrap();
    let at = |host: &str| {
        format!(
            "postgres://{}@{host}:{}{}?hostaddr=127.0.0.1",
            server.username(),
            server.port().unwrap_or(5432),
            server.path()
        )
    };
    let open = |url: &str, ca: &std::path::Path| {
        PgStore::open(
            url,
            None,
            Some(&schema.name),
            "tls",
            1,
            Some(ca),
            Chain::new(None),
        )
    };

    let store = open(&at(&name), &cert).unwrap();
    ingest(&store, &[realized("p1", "s1")]);
    assert_eq!(store.pending(None).unwrap(), 1);
    let encrypted = schema.query_i64(
        "SELECT COUNT(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
         WHERE a.application_name = 'sallyport' AND s.ssl",
    )[0];
    assert!(encrypted >= 1, "the store's connection is TLS");

    let other = support::RcgenPki::new();
    let err = open(&at(&name), &other.files.ca_cert).unwrap_err().to_string();
    assert!(err.to_lowercase().contains("certificate"), "{err}");
    let err = open(&at("wrong-name.invalid"), &cert).unwrap_err().to_string();
    assert!(err.to_lowercase().contains("certificate"), "{err}");
}
