//! Profile updates as they arrive: one JSON object per NDJSON line, parsed strictly. A bad line
//! is rejected with its line number and reason; the other lines of the batch still count.
//!
//! Bounded: whatever the body, the answer lists at most [`MAX_REPORTED_ERRORS`] rejected lines
//! (the rest are counted), and one update carries at most [`MAX_SEGMENTS`] segment events,
//! [`MAX_IDENTITY_NAMESPACES`] identity namespaces holding [`MAX_IDENTITIES`] ids, and
//! [`MAX_ATTRIBUTE_LEAVES`] attribute writes: the work an accepted line causes later (merging,
//! trigger evaluation, the store's writes, all under the store's writer) grows with these.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Longest accepted NDJSON line.
pub const MAX_LINE_BYTES: usize = 1024 * 1024;
/// Deepest accepted attribute nesting.
pub const MAX_DEPTH: usize = 32;
/// Longest profile or segment id.
pub const MAX_ID_LEN: usize = 256;
/// Rejected lines reported one by one in a batch's answer; later ones are only counted, so a
/// body of bad lines cannot make an answer (or the memory behind it) larger than the body.
pub const MAX_REPORTED_ERRORS: usize = 100;
/// Longest reported reason: a reason quoting the line (an unknown field's name, a time that
/// does not parse) is cut here, so the answer's size does not follow the lines'.
pub const MAX_REASON_BYTES: usize = 300;
/// Most segment events in one update (one line).
pub const MAX_SEGMENTS: usize = 10_000;
/// Most namespaces in one update's identity map.
pub const MAX_IDENTITY_NAMESPACES: usize = 100;
/// Most ids in one update's identity map, all namespaces together.
pub const MAX_IDENTITIES: usize = 1_000;
/// Most attribute values one update writes (leaves of `attributes`, deletions included).
pub const MAX_ATTRIBUTE_LEAVES: usize = 10_000;

/// A segment qualification status, as the HTTP API destination exports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SegmentStatus {
    Realized,
    Exiting,
    Exited,
}

impl SegmentStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            SegmentStatus::Realized => "realized",
            SegmentStatus::Exiting => "exiting",
            SegmentStatus::Exited => "exited",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "realized" => Some(SegmentStatus::Realized),
            "exiting" => Some(SegmentStatus::Exiting),
            "exited" => Some(SegmentStatus::Exited),
            _ => None,
        }
    }

    /// Realized and exiting profiles belong to the segment; exited ones no longer do.
    pub fn is_member(self) -> bool {
        !matches!(self, SegmentStatus::Exited)
    }
}

/// One segment qualification event.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SegmentEvent {
    #[serde(alias = "segmentId")]
    pub id: String,
    pub status: SegmentStatus,
    /// RFC 3339; defaults to the time the update is accepted.
    pub last_qualification_time: Option<String>,
}

/// One validated profile update.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ProfileUpdate {
    pub profile_id: String,
    pub merge_policy_id: Option<String>,
    /// Replaces the stored identity map when present.
    pub identity_map: Option<Map<String, Value>>,
    /// Partial write, deep-merged; `null` deletes.
    pub attributes: Option<Map<String, Value>>,
    #[serde(default)]
    pub segments: Vec<SegmentEvent>,
}

/// A rejected line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LineError {
    pub line: usize,
    pub reason: String,
}

/// The valid updates of a batch, with their line numbers, and the rejected lines.
#[derive(Debug, Default)]
pub struct ParsedBatch {
    pub updates: Vec<(usize, ProfileUpdate)>,
    /// The first [`MAX_REPORTED_ERRORS`] rejected lines.
    pub errors: Vec<LineError>,
    /// Every rejected line, listed in `errors` or not.
    pub rejected: usize,
}

impl ParsedBatch {
    /// Rejected lines not listed in `errors`.
    pub fn errors_omitted(&self) -> usize {
        self.rejected - self.errors.len()
    }
}

/// Parse NDJSON. Blank lines are skipped; line numbers start at 1.
pub fn parse_ndjson(bytes: &[u8]) -> ParsedBatch {
    let mut p = NdjsonParser::default();
    p.feed(bytes);
    p.finish()
}

/// NDJSON parsed as it arrives, chunk by chunk: each line is parsed as soon as its newline is
/// seen, so a request body is never held whole — only the line it is in the middle of, and
/// never more than [`MAX_LINE_BYTES`] of that (a longer line is rejected and skipped to its
/// end without being kept). Feeding a body in any split gives what [`parse_ndjson`] gives.
#[derive(Debug, Default)]
pub struct NdjsonParser {
    out: ParsedBatch,
    /// The current line's bytes so far (a line split across chunks).
    partial: Vec<u8>,
    /// Length of the current line when it outgrew [`MAX_LINE_BYTES`]: its bytes are dropped.
    overlong: Option<usize>,
    /// Lines finished so far.
    lines: usize,
    /// Bytes of the updates parsed since they were last taken.
    ready_bytes: usize,
}

impl NdjsonParser {
    /// Parse every line `chunk` finishes; keep the unfinished rest for the next chunk.
    pub fn feed(&mut self, mut chunk: &[u8]) {
        while let Some(n) = chunk.iter().position(|b| *b == b'\n') {
            let (line, rest) = (&chunk[..n], &chunk[n + 1..]);
            chunk = rest;
            if let Some(len) = self.overlong.take() {
                self.end_line(LineEnd::Overlong(len + line.len()));
            } else if self.partial.is_empty() {
                self.end_line(LineEnd::Bytes(line));
            } else {
                let mut whole = std::mem::take(&mut self.partial);
                whole.extend_from_slice(line);
                self.end_line(LineEnd::Bytes(&whole));
                // Keep the allocation for the next split line.
                whole.clear();
                self.partial = whole;
            }
        }
        self.keep(chunk);
    }

    /// Updates parsed and not taken yet, and the bytes of their lines.
    pub fn ready(&self) -> (usize, usize) {
        (self.out.updates.len(), self.ready_bytes)
    }

    /// The updates parsed so far, with their line numbers, handed over (rejections stay
    /// counted here; line numbers go on from where they were).
    pub fn take_updates(&mut self) -> Vec<(usize, ProfileUpdate)> {
        self.ready_bytes = 0;
        std::mem::take(&mut self.out.updates)
    }

    /// The batch: every line parsed, the last one even without its newline.
    pub fn finish(mut self) -> ParsedBatch {
        if let Some(len) = self.overlong.take() {
            self.end_line(LineEnd::Overlong(len));
        } else if !self.partial.is_empty() {
            let last = std::mem::take(&mut self.partial);
            self.end_line(LineEnd::Bytes(&last));
        }
        self.out
    }

    /// Hold `rest` (the start of a line) until its newline comes, or only count it once the
    /// line is longer than the limit.
    fn keep(&mut self, rest: &[u8]) {
        if rest.is_empty() {
            return;
        }
        if let Some(len) = &mut self.overlong {
            *len += rest.len();
        } else if self.partial.len() + rest.len() > MAX_LINE_BYTES + 1 {
            // One byte of slack: a line's `\r` before its newline is not counted.
            self.overlong = Some(self.partial.len() + rest.len());
            self.partial = Vec::new();
        } else {
            self.partial.extend_from_slice(rest);
        }
    }

    fn end_line(&mut self, end: LineEnd<'_>) {
        self.lines += 1;
        let line = self.lines;
        let result = match end {
            LineEnd::Overlong(len) => Err(format!("line is {len} bytes; the limit is {MAX_LINE_BYTES}")),
            LineEnd::Bytes(raw) => {
                let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
                if raw.iter().all(u8::is_ascii_whitespace) {
                    return;
                }
                self.ready_bytes += raw.len();
                parse_line(raw)
            }
        };
        match result {
            Ok(u) => self.out.updates.push((line, u)),
            Err(reason) => {
                self.out.rejected += 1;
                if self.out.errors.len() < MAX_REPORTED_ERRORS {
                    self.out.errors.push(LineError {
                        line,
                        reason: shorten(reason),
                    });
                }
            }
        }
    }
}

/// How a line ended: its bytes, or only its length when it was too long to keep.
enum LineEnd<'a> {
    Bytes(&'a [u8]),
    Overlong(usize),
}

/// `reason`, cut to at most [`MAX_REASON_BYTES`] (on a character boundary) and marked so.
fn shorten(mut reason: String) -> String {
    if reason.len() > MAX_REASON_BYTES {
        let mut end = MAX_REASON_BYTES - '…'.len_utf8();
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        reason.truncate(end);
        reason.push('…');
    }
    reason
}

/// Parse and validate one update.
pub fn parse_line(raw: &[u8]) -> Result<ProfileUpdate, String> {
    if raw.len() > MAX_LINE_BYTES {
        return Err(format!(
            "line is {} bytes; the limit is {MAX_LINE_BYTES}",
            raw.len()
        ));
    }
    let u: ProfileUpdate = serde_json::from_slice(raw).map_err(|e| format!("invalid update: {e}"))?;
    check_id("profileId", &u.profile_id)?;
    if let Some(m) = &u.merge_policy_id {
        check_id("mergePolicyId", m)?;
    }
    if let Some(map) = &u.identity_map {
        if map.len() > MAX_IDENTITY_NAMESPACES {
            return Err(format!(
                "identityMap has {} namespaces; the limit is {MAX_IDENTITY_NAMESPACES} per update",
                map.len()
            ));
        }
        let ids: usize = map.values().map(|v| v.as_array().map_or(0, Vec::len)).sum();
        if ids > MAX_IDENTITIES {
            return Err(format!(
                "identityMap has {ids} ids; the limit is {MAX_IDENTITIES} per update"
            ));
        }
        for (ns, ids) in map {
            let Value::Array(ids) = ids else {
                return Err(format!(
                    "identityMap.{ns} must be an array of {{\"id\": …}} objects"
                ));
            };
            for (j, id) in ids.iter().enumerate() {
                match id.get("id") {
                    Some(Value::String(s)) if !s.is_empty() => {}
                    _ => return Err(format!("identityMap.{ns}[{j}] needs a non-empty string \"id\"")),
                }
            }
        }
    }
    if let Some(attrs) = &u.attributes {
        if 1 + attrs.values().map(depth).max().unwrap_or(0) > MAX_DEPTH {
            return Err(format!("attributes are nested deeper than {MAX_DEPTH} levels"));
        }
        let mut budget = MAX_ATTRIBUTE_LEAVES;
        if !within_leaves(attrs, &mut budget) {
            return Err(format!(
                "attributes write more than {MAX_ATTRIBUTE_LEAVES} values; the limit is \
                 {MAX_ATTRIBUTE_LEAVES} per update"
            ));
        }
    }
    if u.segments.len() > MAX_SEGMENTS {
        return Err(format!(
            "segments has {} events; the limit is {MAX_SEGMENTS} per update",
            u.segments.len()
        ));
    }
    for (j, s) in u.segments.iter().enumerate() {
        check_id(&format!("segments[{j}].id"), &s.id)?;
        if let Some(t) = &s.last_qualification_time {
            parse_rfc3339(t)
                .map_err(|_| format!("segments[{j}].lastQualificationTime: '{t}' is not RFC 3339"))?;
        }
    }
    Ok(u)
}

fn check_id(what: &str, id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err(format!("{what} must not be empty"));
    }
    if id.len() > MAX_ID_LEN {
        return Err(format!("{what} is longer than {MAX_ID_LEN} bytes"));
    }
    if id.chars().any(char::is_control) {
        return Err(format!("{what} contains a control character"));
    }
    Ok(())
}

/// Take the values `attrs` writes when merged (its leaves: what is not a non-empty object)
/// from `budget`; false once it runs out.
fn within_leaves(attrs: &Map<String, Value>, budget: &mut usize) -> bool {
    for v in attrs.values() {
        match v {
            Value::Object(sub) if !sub.is_empty() => {
                if !within_leaves(sub, budget) {
                    return false;
                }
            }
            _ => match budget.checked_sub(1) {
                Some(b) => *budget = b,
                None => return false,
            },
        }
    }
    true
}

fn depth(v: &Value) -> usize {
    match v {
        Value::Object(m) => 1 + m.values().map(depth).max().unwrap_or(0),
        Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// Parse an RFC 3339 time.
pub fn parse_rfc3339(s: &str) -> Result<time::OffsetDateTime, time::error::Parse> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
}

/// RFC 3339 milliseconds since the UNIX epoch.
pub fn rfc3339_to_unix_ms(s: &str) -> Option<i64> {
    parse_rfc3339(s)
        .ok()
        .map(|t| (t.unix_timestamp_nanos() / 1_000_000) as i64)
}

/// Entry point for the NDJSON fuzz target: any body parses into accepted and rejected lines
/// that add up, with a bounded error list, and the accepted updates plan into a batch as a
/// store would write it (each profile once, each segment and delivery once). Panics on a
/// broken invariant.
pub fn fuzz_entry(data: &[u8]) {
    let batch = parse_ndjson(data);
    let lines = data
        .split(|b| *b == b'\n')
        .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
        .count();
    assert_eq!(
        batch.updates.len() + batch.rejected,
        lines,
        "every line is counted once"
    );
    assert_eq!(batch.errors.len(), batch.rejected.min(MAX_REPORTED_ERRORS));
    assert_eq!(batch.errors_omitted(), batch.rejected - batch.errors.len());
    let mut numbers: Vec<usize> = batch.updates.iter().map(|(l, _)| *l).collect();
    numbers.extend(batch.errors.iter().map(|e| e.line));
    numbers.sort_unstable();
    assert!(numbers.windows(2).all(|w| w[0] < w[1]), "a line reported twice");
    assert!(numbers.iter().all(|l| *l >= 1 && *l <= data.len() + 1));
    for e in &batch.errors {
        assert!(!e.reason.is_empty() && e.reason.len() <= MAX_REASON_BYTES);
    }
    for (_, u) in &batch.updates {
        assert!(u.segments.len() <= MAX_SEGMENTS);
        assert!(!u.profile_id.is_empty() && u.profile_id.len() <= MAX_ID_LEN);
        if let Some(m) = &u.identity_map {
            assert!(m.len() <= MAX_IDENTITY_NAMESPACES);
        }
    }
    let updates: Vec<ProfileUpdate> = batch.updates.into_iter().map(|(_, u)| u).collect();
    let profiles: std::collections::HashSet<String> = updates.iter().map(|u| u.profile_id.clone()).collect();
    let planned = super::batch::plan_batch(updates, &mut |_| None, &mut |p, u| {
        let change = p.apply(u, "2026-01-01T00:00:00Z");
        let t = super::trigger::Trigger {
            reasons: super::trigger::Reasons::SEGMENT,
            segments: change.segments_changed,
        };
        vec![("d".to_owned(), t)]
    });
    assert_eq!(
        planned.profiles.len(),
        profiles.len(),
        "each profile planned once"
    );
    for (p, touched) in &planned.profiles {
        let unique: std::collections::HashSet<&String> = touched.iter().collect();
        assert_eq!(unique.len(), touched.len(), "a segment written twice");
        assert!(touched.iter().all(|s| p.segments.contains_key(s)));
    }
    let keys: std::collections::HashSet<&(String, String)> =
        planned.enqueues.iter().map(|(k, _)| k).collect();
    assert_eq!(keys.len(), planned.enqueues.len(), "a delivery queued twice");
    for (_, t) in &planned.enqueues {
        let unique: std::collections::HashSet<&String> = t.segments.iter().collect();
        assert_eq!(unique.len(), t.segments.len(), "a trigger names a segment twice");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_lines_are_rejected_with_their_number_and_good_ones_kept() {
        let big = format!(
            "{{\"profileId\":\"p\",\"attributes\":{{\"x\":\"{}\"}}}}",
            "a".repeat(MAX_LINE_BYTES)
        );
        let input = format!(
            "{{\"profileId\":\"p1\"}}\n{{broken\n\n{{\"profileId\":\"\"}}\n{{\"segments\":[]}}\n\
             {{\"profileId\":\"p2\",\"segments\":[{{\"id\":\"s\",\"status\":\"qualified\"}}]}}\n{big}\n\
             {{\"profileId\":\"p3\",\"identityMap\":{{\"ecid\":[{{\"id\":\"1\"}}]}}}}\n"
        );
        let b = parse_ndjson(input.as_bytes());
        let ok: Vec<usize> = b.updates.iter().map(|(l, _)| *l).collect();
        assert_eq!(ok, vec![1, 8]);
        let errs: Vec<(usize, &str)> = b.errors.iter().map(|e| (e.line, e.reason.as_str())).collect();
        assert_eq!(errs.len(), 5, "{errs:?}");
        assert!(errs[0].0 == 2 && errs[0].1.contains("invalid update"));
        assert!(errs[1].0 == 4 && errs[1].1.contains("profileId must not be empty"));
        assert!(errs[2].0 == 5 && errs[2].1.contains("missing field `profileId`"));
        assert!(errs[3].0 == 6 && errs[3].1.contains("unknown variant `qualified`"));
        assert!(errs[4].0 == 7 && errs[4].1.contains("the limit is"));
    }

    /// The same body fed whole and in pieces of many sizes: the same updates, rejections and
    /// line numbers, and a line longer than the limit is never held whole.
    #[test]
    fn a_body_fed_in_chunks_parses_as_it_does_whole() {
        let big = format!(
            "{{\"profileId\":\"p\",\"attributes\":{{\"x\":\"{}\"}}}}",
            "a".repeat(MAX_LINE_BYTES + 10)
        );
        let input = format!(
            "{{\"profileId\":\"p1\"}}\r\n{{broken\n\n  \r\n{big}\n{{\"profileId\":\"p2\",\"segments\":\
             [{{\"id\":\"s\",\"status\":\"realized\"}}]}}\n{big}\n{{\"profileId\":\"p3\"}}"
        );
        let whole = parse_ndjson(input.as_bytes());
        let ok: Vec<usize> = whole.updates.iter().map(|(l, _)| *l).collect();
        assert_eq!(ok, vec![1, 6, 8], "the last line counts without its newline");
        assert_eq!(whole.rejected, 3);
        assert!(whole.errors[1]
            .reason
            .contains(&format!("line is {} bytes", big.len())));
        for size in [1, 2, 7, 100, 4096, 65_536, MAX_LINE_BYTES, input.len()] {
            let mut p = NdjsonParser::default();
            for chunk in input.as_bytes().chunks(size) {
                p.feed(chunk);
                assert!(p.partial.len() <= MAX_LINE_BYTES + 1, "chunks of {size}");
            }
            let pieces = p.finish();
            assert_eq!(pieces.updates, whole.updates, "chunks of {size}");
            assert_eq!(pieces.errors, whole.errors, "chunks of {size}");
            assert_eq!(pieces.rejected, whole.rejected);
        }
    }

    #[test]
    fn a_body_of_bad_lines_reports_the_first_errors_and_counts_the_rest() {
        let body = b"x\n".repeat(250_000);
        let b = parse_ndjson(&body);
        assert!(b.updates.is_empty());
        assert_eq!(b.rejected, 250_000);
        assert_eq!(b.errors.len(), MAX_REPORTED_ERRORS);
        assert_eq!(b.errors_omitted(), 250_000 - MAX_REPORTED_ERRORS);
        let lines: Vec<usize> = b.errors.iter().map(|e| e.line).collect();
        assert_eq!(lines, (1..=MAX_REPORTED_ERRORS).collect::<Vec<_>>());
        // Good lines after the cap still count.
        let mut body = b"x\n".repeat(MAX_REPORTED_ERRORS + 5);
        body.extend_from_slice(b"{\"profileId\":\"p\"}\nx\n");
        let b = parse_ndjson(&body);
        assert_eq!(
            (b.updates.len(), b.rejected, b.errors.len()),
            (1, MAX_REPORTED_ERRORS + 6, MAX_REPORTED_ERRORS)
        );
        assert_eq!(b.updates[0].0, MAX_REPORTED_ERRORS + 6);
    }

    #[test]
    fn reasons_quoting_a_line_are_cut_short() {
        let long = "é".repeat(MAX_LINE_BYTES / 4);
        let body = format!(
            "{{\"profileId\":\"p\",\"{long}\":1}}\n\
             {{\"profileId\":\"p\",\"segments\":[{{\"id\":\"s\",\"status\":\"realized\",\"lastQualificationTime\":\"{long}\"}}]}}\n"
        );
        let b = parse_ndjson(body.as_bytes());
        assert_eq!(b.rejected, 2);
        for e in &b.errors {
            assert!(
                e.reason.len() <= MAX_REASON_BYTES && e.reason.ends_with('…'),
                "{}",
                e.reason.len()
            );
        }
        assert!(b.errors[0]
            .reason
            .starts_with("invalid update: unknown field `éé"));
        assert!(b.errors[1]
            .reason
            .starts_with("segments[0].lastQualificationTime: 'éé"));
    }

    fn with_segments(n: usize) -> String {
        let segs: Vec<String> = (0..n)
            .map(|i| format!("{{\"id\":\"s{i}\",\"status\":\"realized\"}}"))
            .collect();
        format!("{{\"profileId\":\"p\",\"segments\":[{}]}}", segs.join(","))
    }

    #[test]
    fn an_update_with_too_many_segment_events_is_rejected_naming_the_limit() {
        assert_eq!(
            parse_line(with_segments(MAX_SEGMENTS).as_bytes()).map(|u| u.segments.len()),
            Ok(MAX_SEGMENTS)
        );
        let err = parse_line(with_segments(MAX_SEGMENTS + 1).as_bytes()).expect_err("over the limit");
        assert_eq!(err, "segments has 10001 events; the limit is 10000 per update");
    }

    #[test]
    fn identity_maps_and_attribute_writes_are_bounded_per_update() {
        let ids = |n: usize| -> String {
            let ids: Vec<String> = (0..n).map(|i| format!("{{\"id\":\"{i}\"}}")).collect();
            format!(
                "{{\"profileId\":\"p\",\"identityMap\":{{\"ecid\":[{}]}}}}",
                ids.join(",")
            )
        };
        assert!(parse_line(ids(MAX_IDENTITIES).as_bytes()).is_ok());
        let err = parse_line(ids(MAX_IDENTITIES + 1).as_bytes()).expect_err("too many ids");
        assert!(
            err.contains("identityMap has 1001 ids; the limit is 1000"),
            "{err}"
        );
        let ns: Vec<String> = (0..=MAX_IDENTITY_NAMESPACES)
            .map(|i| format!("\"n{i}\":[]"))
            .collect();
        let line = format!("{{\"profileId\":\"p\",\"identityMap\":{{{}}}}}", ns.join(","));
        let err = parse_line(line.as_bytes()).expect_err("too many namespaces");
        assert!(
            err.contains("identityMap has 101 namespaces; the limit is 100"),
            "{err}"
        );

        let attrs = |n: usize| -> String {
            let leaves: Vec<String> = (0..n).map(|i| format!("\"a{i}\":{{\"b\":null}}")).collect();
            format!(
                "{{\"profileId\":\"p\",\"attributes\":{{\"o\":{{{}}}}}}}",
                leaves.join(",")
            )
        };
        let ok = parse_line(attrs(MAX_ATTRIBUTE_LEAVES).as_bytes()).expect("at the limit");
        let mut p = super::super::state::Profile::new("p");
        assert_eq!(
            p.apply(ok, "t").written.len(),
            MAX_ATTRIBUTE_LEAVES,
            "the limit counts what merge writes"
        );
        let err = parse_line(attrs(MAX_ATTRIBUTE_LEAVES + 1).as_bytes()).expect_err("too many writes");
        assert!(err.contains("the limit is 10000 per update"), "{err}");
    }

    #[test]
    fn fuzz_entry_holds_on_mixed_input() {
        let mut body = b"x\n\n{\"profileId\":\"p\",\"segments\":[{\"id\":\"s\",\"status\":\"realized\"},\
                         {\"id\":\"s\",\"status\":\"exited\"}]}\r\n"
            .to_vec();
        body.extend_from_slice(&b"{\"profileId\":\"p\"}\n".repeat(3));
        fuzz_entry(&body);
        fuzz_entry(b"");
        fuzz_entry(b"\r");
    }
}
