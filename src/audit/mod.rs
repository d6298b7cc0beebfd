//! The tamper-evident audit log: one record per delivery attempt, appended in the same store
//! transaction as the attempt's outcome, each carrying the SHA-256 of the record before it
//! (and, when an audit key is configured, an HMAC of its own hash). Editing, deleting or
//! reordering any record breaks the chain at that record, and `sallyport audit verify` names
//! it. With a key, a writer who can change the database but does not hold the key cannot
//! rewrite the chain consistently.
//!
//! Must never: hold a secret, a token or a payload body — only the payload's SHA-256.

pub mod file;
pub mod writer;

use std::borrow::Cow;

use ring::{digest, hmac};
use serde::{Deserialize, Serialize};

use crate::delivery::ErrorKind;

/// The hash that starts the chain.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// How one attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// An export delivered (2xx).
    Delivered,
    /// An export failed and is queued to be tried again.
    Retry,
    /// An export failed its last attempt and became a dead letter.
    DeadLetter,
    /// A dead letter replayed and delivered.
    ReplayDelivered,
    /// A dead letter replayed and failed again (it stays a dead letter).
    ReplayFailed,
    /// A sidecar request carried to its upstream (any HTTP answer).
    Proxied,
    /// A sidecar request that got no answer from its upstream.
    Failed,
}

impl Outcome {
    /// The name audit records and metrics use.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Delivered => "delivered",
            Outcome::Retry => "retry",
            Outcome::DeadLetter => "dead_letter",
            Outcome::ReplayDelivered => "replay_delivered",
            Outcome::ReplayFailed => "replay_failed",
            Outcome::Proxied => "proxied",
            Outcome::Failed => "failed",
        }
    }
}

/// What happened in one attempt: an export's delivery, a dead letter's replay, or a sidecar
/// request. Text fields borrow where the writer holds the facts already (the sidecar's queue)
/// and own them otherwise; either way the record serialises to the same canonical JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditRecord<'a> {
    /// UNIX ms.
    pub at: i64,
    /// The dataflow, or the sidecar route (`sidecar:/prefix`).
    pub dataflow: Cow<'a, str>,
    /// `host:port` of the endpoint.
    pub destination: Cow<'a, str>,
    pub resolved_ip: Option<Cow<'a, str>>,
    pub source_ip: Option<Cow<'a, str>>,
    /// Empty for sidecar requests.
    pub profile_id: Cow<'a, str>,
    /// Empty for sidecar requests (their bodies stream through unread).
    pub payload_sha256: Cow<'a, str>,
    pub idempotency_key: Cow<'a, str>,
    pub attempt: u32,
    pub outcome: Outcome,
    pub error_kind: Option<ErrorKind>,
    pub http_status: Option<u16>,
    pub latency_ms: f64,
    pub peer_cert_sha256: Option<Cow<'a, str>>,
    /// The auth kind used (`none`, `bearer`, …), never the credential.
    pub auth: Cow<'a, str>,
    /// What started an attempt made outside the delivery loop ([`ReplayTrigger`]: an
    /// operator's replay from the CLI or the admin API). Absent from every other record, and
    /// from records written before it existed: their canonical JSON, and so the chain, is
    /// unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trigger: Option<Cow<'a, str>>,
    /// The W3C trace id (32 hex digits) of the attempt's span, when traces are exported
    /// (`[telemetry] otlp_endpoint`), so an auditor can go from a record to its trace. Absent
    /// otherwise, and from older records: their canonical JSON, and so the chain, is
    /// unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<Cow<'a, str>>,
}

/// Who asked for a dead letter's replay, as its audit record names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayTrigger {
    /// `sallyport dlq replay`.
    Cli,
    /// The admin API (`POST /v1/dead-letters/…/replay`).
    Api,
}

impl ReplayTrigger {
    /// The name in audit records' `trigger`.
    pub fn as_str(self) -> &'static str {
        match self {
            ReplayTrigger::Cli => "replay:cli",
            ReplayTrigger::Api => "replay:api",
        }
    }
}

/// A record as stored: its place in the chain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChainedRecord {
    pub seq: i64,
    /// The record's canonical JSON, exactly as hashed.
    pub record: String,
    pub prev: String,
    pub hash: String,
    pub mac: Option<String>,
}

/// Hash and optional MAC for chain links.
pub struct Chain {
    key: Option<hmac::Key>,
}

impl std::fmt::Debug for Chain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chain")
            .field("keyed", &self.key.is_some())
            .finish()
    }
}

/// Lower-case hex. Written out rather than `format!` per byte: every delivery hashes its
/// payload and links an audit record, and the formatter's allocations showed in profiles.
pub fn hex(b: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(b.len() * 2);
    for x in b {
        out.push(char::from(DIGITS[usize::from(x >> 4)]));
        out.push(char::from(DIGITS[usize::from(x & 0x0f)]));
    }
    out
}

impl Chain {
    /// `key` is the audit HMAC key, when configured.
    pub fn new(key: Option<&[u8]>) -> Self {
        Chain {
            key: key.map(|k| hmac::Key::new(hmac::HMAC_SHA256, k)),
        }
    }

    /// The hash of a record that follows `prev`: SHA-256(seq, prev, record).
    pub fn hash(seq: i64, prev: &str, record: &str) -> String {
        Self::hash_bytes(seq, prev, record.as_bytes())
    }

    /// [`Chain::hash`] of a record's text as bytes.
    pub fn hash_bytes(seq: i64, prev: &str, record: &[u8]) -> String {
        let mut ctx = digest::Context::new(&digest::SHA256);
        ctx.update(&seq.to_be_bytes());
        ctx.update(prev.as_bytes());
        ctx.update(b"\n");
        ctx.update(record);
        hex(ctx.finish().as_ref())
    }

    /// The MAC of a hash, when keyed.
    pub fn mac(&self, hash: &str) -> Option<String> {
        self.key
            .as_ref()
            .map(|k| hex(hmac::sign(k, hash.as_bytes()).as_ref()))
    }

    /// The hash and MAC of the record text `record` at `seq`, after `prev`: what every
    /// writer of a chain (store or file) stores beside the record.
    pub fn seal(&self, seq: i64, prev: &str, record: &[u8]) -> (String, Option<String>) {
        let hash = Self::hash_bytes(seq, prev, record);
        let mac = self.mac(&hash);
        (hash, mac)
    }

    /// Link `record` after (`prev_seq`, `prev_hash`).
    pub fn link(&self, prev_seq: i64, prev_hash: &str, record: &AuditRecord<'_>) -> ChainedRecord {
        let seq = prev_seq + 1;
        let record = serde_json::to_string(record).unwrap_or_default();
        let (hash, mac) = self.seal(seq, prev_hash, record.as_bytes());
        ChainedRecord {
            seq,
            mac,
            record,
            prev: prev_hash.to_owned(),
            hash,
        }
    }
}

/// Where and why a chain breaks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Broken {
    /// The first record that does not verify (or the sequence number that is missing).
    pub seq: i64,
    pub reason: String,
}

/// Verify records in order from the start of the log. Returns how many verified.
pub fn verify<'a>(
    records: impl IntoIterator<Item = &'a ChainedRecord>,
    chain: &Chain,
) -> Result<u64, Broken> {
    let mut v = Verifier::new(chain);
    for r in records {
        v.push(r)?;
    }
    Ok(v.verified())
}

/// Verifies a chain one record at a time, from its genesis: for logs read as a stream (an
/// audit file), so memory stays bounded however long the chain is.
pub struct Verifier<'c> {
    chain: &'c Chain,
    prev_seq: i64,
    prev_hash: String,
    verified: u64,
}

impl<'c> Verifier<'c> {
    pub fn new(chain: &'c Chain) -> Self {
        Self::resume(chain, 0, GENESIS)
    }

    /// Verify from the record after (`prev_seq`, `prev_hash`): for a chain whose earlier
    /// records were archived (rotated audit-file segments), taking the first kept record's
    /// link on trust.
    pub fn resume(chain: &'c Chain, prev_seq: i64, prev_hash: &str) -> Self {
        Verifier {
            chain,
            prev_seq,
            prev_hash: prev_hash.to_owned(),
            verified: 0,
        }
    }

    /// How many records verified so far.
    pub fn verified(&self) -> u64 {
        self.verified
    }

    /// Check the next record of the chain.
    pub fn push(&mut self, r: &ChainedRecord) -> Result<(), Broken> {
        let expected = self.prev_seq + 1;
        if r.seq != expected {
            return Err(Broken {
                seq: expected,
                reason: format!("record {expected} is missing (next stored record is {})", r.seq),
            });
        }
        if r.prev != self.prev_hash {
            return Err(Broken {
                seq: r.seq,
                reason: "its link to the previous record does not match (records removed or reordered)"
                    .into(),
            });
        }
        if Chain::hash(r.seq, &r.prev, &r.record) != r.hash {
            return Err(Broken {
                seq: r.seq,
                reason: "its content does not match its hash (record edited)".into(),
            });
        }
        if self.chain.key.is_some() && self.chain.mac(&r.hash) != r.mac {
            return Err(Broken {
                seq: r.seq,
                reason: "its HMAC does not verify with the audit key (chain rewritten without the key)"
                    .into(),
            });
        }
        if serde_json::from_str::<AuditRecord>(&r.record).is_err() {
            return Err(Broken {
                seq: r.seq,
                reason: "its content is not an audit record".into(),
            });
        }
        self.prev_seq = r.seq;
        self.prev_hash.clone_from(&r.hash);
        self.verified += 1;
        Ok(())
    }
}

/// SHA-256 of a payload, hex.
pub fn payload_sha256(body: &[u8]) -> String {
    hex(digest::digest(&digest::SHA256, body).as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_hash_is_the_standard_sha256_in_lower_hex() {
        // FIPS 180-2 test vector.
        assert_eq!(
            payload_sha256(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(hex(&[0x00, 0x0f, 0xf0, 0xff]), "000ff0ff");
    }

    fn rec(i: u32) -> AuditRecord<'static> {
        AuditRecord {
            at: 1,
            dataflow: "d".into(),
            destination: "rx:443".into(),
            resolved_ip: None,
            source_ip: None,
            profile_id: format!("p{i}").into(),
            payload_sha256: payload_sha256(b"x").into(),
            idempotency_key: "k".into(),
            attempt: i,
            outcome: Outcome::Delivered,
            error_kind: None,
            http_status: Some(200),
            latency_ms: 1.0,
            peer_cert_sha256: None,
            auth: "none".into(),
            trigger: None,
            trace_id: None,
        }
    }

    fn chain(c: &Chain, n: u32) -> Vec<ChainedRecord> {
        let mut out: Vec<ChainedRecord> = Vec::new();
        for i in 1..=n {
            let (s, h) = out
                .last()
                .map_or((0, GENESIS.to_owned()), |r| (r.seq, r.hash.clone()));
            out.push(c.link(s, &h, &rec(i)));
        }
        out
    }

    #[test]
    fn edits_deletions_and_reorders_are_found_at_the_right_record() {
        let c = Chain::new(None);
        let good = chain(&c, 5);
        assert_eq!(verify(&good, &c), Ok(5));
        let mut edited = good.clone();
        edited[2].record = edited[2].record.replace("p3", "p9");
        assert_eq!(verify(&edited, &c).map_err(|b| b.seq), Err(3));
        let mut deleted = good.clone();
        deleted.remove(1);
        assert_eq!(verify(&deleted, &c).map_err(|b| b.seq), Err(2));
        let mut reordered = good.clone();
        reordered.swap(3, 4);
        assert_eq!(verify(&reordered, &c).map_err(|b| b.seq), Err(4));
    }

    #[test]
    fn a_borrowed_record_writes_the_same_json_as_an_owned_one_and_the_names_stay() {
        let owned = AuditRecord {
            resolved_ip: Some("127.0.0.1".into()),
            error_kind: Some(ErrorKind::ClientCertRejected),
            outcome: Outcome::DeadLetter,
            peer_cert_sha256: Some("AB:CD".into()),
            ..rec(7)
        };
        let borrowed = AuditRecord {
            dataflow: Cow::Borrowed(&owned.dataflow),
            destination: Cow::Borrowed(&owned.destination),
            resolved_ip: owned.resolved_ip.as_deref().map(Cow::Borrowed),
            profile_id: Cow::Borrowed(&owned.profile_id),
            ..owned.clone()
        };
        let text = serde_json::to_string(&borrowed).expect("json");
        assert_eq!(text, serde_json::to_string(&owned).expect("json"));
        // Records already in chains name outcomes and kinds this way: the names must not move.
        assert!(text.contains(r#""outcome":"dead_letter""#), "{text}");
        assert!(text.contains(r#""errorKind":"client_cert_rejected""#), "{text}");
        let back: AuditRecord<'_> = serde_json::from_str(&text).expect("parses");
        assert_eq!(back, owned);
    }

    #[test]
    fn a_trigger_is_written_only_when_set_so_chains_from_before_it_still_verify() {
        let c = Chain::new(Some(b"audit-key-0123456789abcdef"));
        let mut records = chain(&c, 2);
        assert!(
            records.iter().all(|r| !r.record.contains("trigger")),
            "absent when None"
        );
        let replay = AuditRecord {
            outcome: Outcome::ReplayDelivered,
            trigger: Some(ReplayTrigger::Api.as_str().into()),
            ..rec(3)
        };
        let last = records[1].clone();
        records.push(c.link(last.seq, &last.hash, &replay));
        assert!(
            records[2].record.contains(r#""trigger":"replay:api""#),
            "{}",
            records[2].record
        );
        assert_eq!(verify(&records, &c), Ok(3));
        let back: AuditRecord<'_> = serde_json::from_str(&records[2].record).expect("parses");
        assert_eq!(back, replay);
    }

    #[test]
    fn a_trace_id_is_written_only_when_set_so_chains_from_before_it_still_verify() {
        let c = Chain::new(None);
        let mut records = chain(&c, 2);
        assert!(
            records.iter().all(|r| !r.record.contains("traceId")),
            "absent when None"
        );
        let traced = AuditRecord {
            trace_id: Some("4bf92f3577b34da6a3ce929d0e0e4736".into()),
            ..rec(3)
        };
        let last = records[1].clone();
        records.push(c.link(last.seq, &last.hash, &traced));
        assert!(records[2]
            .record
            .contains(r#""traceId":"4bf92f3577b34da6a3ce929d0e0e4736""#));
        assert_eq!(verify(&records, &c), Ok(3));
        let back: AuditRecord<'_> = serde_json::from_str(&records[2].record).expect("parses");
        assert_eq!(back, traced);
    }

    #[test]
    fn a_keyed_chain_rewritten_without_the_key_fails() {
        let keyed = Chain::new(Some(b"audit-key-0123456789abcdef"));
        let good = chain(&keyed, 3);
        assert_eq!(verify(&good, &keyed), Ok(3));
        // Recomputed consistently, but without the key.
        let forged = chain(&Chain::new(None), 3);
        assert_eq!(verify(&forged, &keyed).map_err(|b| b.seq), Err(1));
    }
}
