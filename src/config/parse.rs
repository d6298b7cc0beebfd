//! Parsers for the compact syntaxes the HTTP API destination doc uses: durations (`"2s"`),
//! headers (`h1:v1,h2:v2`) and query parameters (`p1=v1&p2=v2`). Strict: header names must be
//! RFC 9110 tokens and values free of CR/LF and other control bytes.

use std::collections::BTreeMap;
use std::time::Duration;

use http::{HeaderName, HeaderValue};
use serde::Deserialize;

/// Headers as the doc's string or as a TOML table.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum HeaderSpec {
    Compact(String),
    Table(BTreeMap<String, String>),
}

/// Query parameters as the doc's string or as a TOML table.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum QuerySpec {
    Compact(String),
    Table(BTreeMap<String, String>),
}

/// Parse `"2s"`, `"500ms"`, `"1m"`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("'{s}' is not a duration like \"2s\" or \"500ms\": {e}"))
}

/// Parse a header spec into validated pairs. `reserved` names headers the gateway sets itself.
pub fn parse_headers(spec: &HeaderSpec, reserved: &[&str]) -> Result<Vec<(HeaderName, HeaderValue)>, String> {
    let pairs: Vec<(String, String)> = match spec {
        HeaderSpec::Table(t) => t.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        HeaderSpec::Compact(s) => {
            let mut out = Vec::new();
            for (i, item) in s.split(',').enumerate() {
                if item.trim().is_empty() {
                    if s.trim().is_empty() {
                        break;
                    }
                    return Err(format!("item {} is empty (expected name:value)", i + 1));
                }
                let (name, value) = item
                    .split_once(':')
                    .ok_or_else(|| format!("'{}' is not name:value", item.trim()))?;
                // Only spaces and tabs are padding: a CR or LF is refused below, not trimmed away.
                let pad: &[char] = &[' ', '\t'];
                out.push((
                    name.trim_matches(pad).to_owned(),
                    value.trim_matches(pad).to_owned(),
                ));
            }
            out
        }
    };
    let mut out = Vec::with_capacity(pairs.len());
    let mut seen = std::collections::HashSet::with_capacity(pairs.len());
    for (name, value) in pairs {
        let header = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("'{name}' is not a valid header name (RFC 9110 token)"))?;
        if !seen.insert(header.clone()) {
            return Err(format!(
                "'{name}' is given twice (ambiguous: which one should be sent?)"
            ));
        }
        if reserved.iter().any(|r| header.as_str().eq_ignore_ascii_case(r)) {
            return Err(format!("'{name}' is set by the gateway and cannot be overridden"));
        }
        if value.bytes().any(|b| b.is_ascii_control() && b != b'\t') {
            return Err(format!(
                "the value of '{name}' contains a control character (CR, LF, NUL…)"
            ));
        }
        let value = HeaderValue::from_str(&value)
            .map_err(|_| format!("the value of '{name}' is not a valid header value"))?;
        out.push((header, value));
    }
    Ok(out)
}

/// Parse a query spec into decoded pairs.
pub fn parse_query(spec: &QuerySpec) -> Result<Vec<(String, String)>, String> {
    let pairs: Vec<(String, String)> = match spec {
        QuerySpec::Table(t) => t.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        QuerySpec::Compact(s) => {
            let s = s.strip_prefix('?').unwrap_or(s);
            if s.is_empty() {
                return Ok(Vec::new());
            }
            for item in s.split('&') {
                if !item.contains('=') {
                    return Err(format!("'{item}' is not name=value"));
                }
            }
            url::form_urlencoded::parse(s.as_bytes()).into_owned().collect()
        }
    };
    for (k, v) in &pairs {
        if k.is_empty() {
            return Err("a query parameter has an empty name".into());
        }
        if k.chars().chain(v.chars()).any(char::is_control) {
            return Err(format!("query parameter '{k}' contains a control character"));
        }
    }
    Ok(pairs)
}

/// Entry point for the header/query syntax fuzz target: the input as a compact header spec,
/// as a table (one `name=value` per line), and as a compact query spec. Whatever is accepted
/// holds no control character, no reserved or repeated header and no nameless parameter, and
/// reads back the same once written out again. Panics on a broken invariant.
pub fn fuzz_entry(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else { return };
    let mut reserved: Vec<&str> = super::RESERVED_HEADERS.to_vec();
    reserved.push("authorization");
    let check_headers = |headers: &[(HeaderName, HeaderValue)]| {
        let mut names = std::collections::HashSet::new();
        for (n, v) in headers {
            assert!(names.insert(n.clone()), "{n} accepted twice");
            assert!(
                !reserved.iter().any(|r| n.as_str().eq_ignore_ascii_case(r)),
                "{n} is reserved"
            );
            assert!(
                !v.as_bytes().iter().any(|b| b.is_ascii_control() && *b != b'\t'),
                "a control byte in {n}"
            );
        }
    };
    if let Ok(headers) = parse_headers(&HeaderSpec::Compact(s.to_owned()), &reserved) {
        check_headers(&headers);
        let written: Vec<String> = headers
            .iter()
            .map(|(n, v)| format!("{n}:{}", String::from_utf8_lossy(v.as_bytes())))
            .collect();
        let again = parse_headers(&HeaderSpec::Compact(written.join(",")), &reserved);
        assert_eq!(again.as_ref().ok(), Some(&headers), "{written:?}: {again:?}");
    }
    let table: BTreeMap<String, String> = s
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    if let Ok(headers) = parse_headers(&HeaderSpec::Table(table), &reserved) {
        check_headers(&headers);
    }
    if let Ok(query) = parse_query(&QuerySpec::Compact(s.to_owned())) {
        for (k, v) in &query {
            assert!(!k.is_empty(), "a nameless parameter");
            assert!(
                !k.chars().chain(v.chars()).any(char::is_control),
                "a control character"
            );
        }
        let written = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(&query)
            .finish();
        let again = parse_query(&QuerySpec::Compact(written.clone()));
        assert_eq!(again.as_ref().ok(), Some(&query), "{written}: {again:?}");
    }
    let _ = parse_duration(s);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compact_headers_parse_and_reject_bad_input() {
        let ok = parse_headers(&HeaderSpec::Compact("x-a:1, X-B : two words".into()), &[]).expect("valid");
        assert_eq!(ok.len(), 2);
        assert_eq!(ok[1].0.as_str(), "x-b");
        assert_eq!(ok[1].1, "two words");
        for (bad, why) in [
            ("x a:1", "valid header name"),
            ("x-a", "name:value"),
            ("x-a:1,,x-b:2", "empty"),
            ("host:evil", "cannot be overridden"),
        ] {
            let err = parse_headers(&HeaderSpec::Compact(bad.into()), &["host"]).expect_err(bad);
            assert!(err.contains(why), "{bad}: {err}");
        }
        let mut t = BTreeMap::new();
        t.insert("x-a".to_string(), "a\r\nInjected: 1".to_string());
        assert!(parse_headers(&HeaderSpec::Table(t), &[])
            .expect_err("crlf")
            .contains("control"));
    }

    #[test]
    fn injection_attempts_are_refused() {
        let reserved = [
            "host",
            "content-length",
            "authorization",
            "idempotency-key",
            "webhook-signature",
        ];
        let cases: &[(&str, &str)] = &[
            ("x-a:1\r\nX-Injected: 1", "control character"),
            ("x-a:1\nX-Injected: 1", "control character"),
            ("x-a:1\r\n", "control character"),
            ("x-a:\u{0}", "control character"),
            ("x-a:1,X-A:2", "given twice"),
            ("Host:evil.example", "cannot be overridden"),
            ("content-length:0", "cannot be overridden"),
            ("authorization:Bearer stolen", "cannot be overridden"),
            ("Idempotency-Key:replayed", "cannot be overridden"),
            ("x a:1", "valid header name"),
            ("x-a\r\n:1", "valid header name"),
            (":1", "valid header name"),
            ("x-é:1", "valid header name"),
        ];
        for (input, why) in cases {
            let err = parse_headers(&HeaderSpec::Compact(input.to_string()), &reserved).expect_err(input);
            assert!(err.contains(why), "{input:?}: {err}");
        }
        for (input, why) in [
            ("a=1%0D%0AX-Injected:%201", "control character"),
            ("a=%00", "control character"),
            ("=v", "empty name"),
        ] {
            let err = parse_query(&QuerySpec::Compact(input.into())).expect_err(input);
            assert!(err.contains(why), "{input}: {err}");
        }
        // Duplicate query parameters are legitimate in URLs and kept in order.
        let q = parse_query(&QuerySpec::Compact("a=1&a=2".into())).expect("valid");
        assert_eq!(q, vec![("a".into(), "1".into()), ("a".into(), "2".into())]);
    }

    #[test]
    fn compact_query_decodes() {
        let q = parse_query(&QuerySpec::Compact("p1=v1&p2=a%20b".into())).expect("valid");
        assert_eq!(q, vec![("p1".into(), "v1".into()), ("p2".into(), "a b".into())]);
        assert!(parse_query(&QuerySpec::Compact("p1".into())).is_err());
        assert!(parse_query(&QuerySpec::Compact("=v".into())).is_err());
    }

    #[test]
    fn fuzz_entry_holds_on_seeds() {
        for seed in [
            "x-a:1, X-B : two words",
            "x-a:1,X-A:2",
            "a=1&b=%ZZ&c=+&d=%C3%A9",
            "?",
            "host:evil\nx-a=1\nx-b=\u{7f}",
            "",
        ] {
            fuzz_entry(seed.as_bytes());
        }
    }
}
