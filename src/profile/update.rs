//! Profile updates as they arrive: one JSON object per NDJSON line, parsed strictly. A bad line
//! is rejected with its line number and reason; the other lines of the batch still count.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Longest accepted NDJSON line.
pub const MAX_LINE_BYTES: usize = 1024 * 1024;
/// Deepest accepted attribute nesting.
pub const MAX_DEPTH: usize = 32;
/// Longest profile or segment id.
pub const MAX_ID_LEN: usize = 256;

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
    pub errors: Vec<LineError>,
}

/// Parse NDJSON. Blank lines are skipped; line numbers start at 1.
pub fn parse_ndjson(bytes: &[u8]) -> ParsedBatch {
    let mut out = ParsedBatch::default();
    for (i, raw) in bytes.split(|b| *b == b'\n').enumerate() {
        let line = i + 1;
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        if raw.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match parse_line(raw) {
            Ok(u) => out.updates.push((line, u)),
            Err(reason) => out.errors.push(LineError { line, reason }),
        }
    }
    out
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
}
