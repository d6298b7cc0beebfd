//! Mapping an app's request path onto a route's upstream, without ever leaving the upstream's
//! base path. A prefix matches whole path segments only (`/acme` is not `/acmeadmin`), and the
//! rest of the path is refused when it could walk upward at the upstream or anywhere on the
//! way: a dot segment (`.`, `..`), one spelled with percent escapes (`%2e%2e`, also escaped
//! twice), an escaped slash or backslash, or a backslash. URL parsers resolve `..` and `%2e%2e`
//! when a path is set (WHATWG URL), and servers differ on the rest, so such a path is a 400,
//! never a guess.

/// Why a path cannot go to its route's upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    /// A `.` or `..` segment, written plainly or percent-escaped.
    DotSegment,
    /// `%2f` or `%5c` (an escaped `/` or `\`), which some servers decode into a separator.
    EncodedSeparator,
    /// A `\`, which some servers take for `/`.
    Backslash,
    /// A control character, plain or escaped: URL parsers drop tabs and newlines, which can
    /// join what is left into a dot segment (`\n..` becomes `..`).
    ControlCharacter,
}

impl PathError {
    /// The error's kind in the sidecar's JSON answer.
    pub fn kind(self) -> &'static str {
        "invalid_path"
    }

    pub fn message(self) -> &'static str {
        match self {
            PathError::DotSegment => "the path holds a dot segment ('.' or '..', plain or percent-escaped)",
            PathError::EncodedSeparator => "the path holds an escaped '/' or '\\' (%2f, %5c)",
            PathError::Backslash => "the path holds a backslash",
            PathError::ControlCharacter => "the path holds a control character (plain or percent-escaped)",
        }
    }
}

/// The rest of `path` after `prefix`, when `prefix` matches whole segments of it: `""` or a
/// string starting with `/`. A prefix ending in `/` (or `/` itself) matches what is below it.
pub fn strip_prefix<'a>(path: &'a str, prefix: &str) -> Option<&'a str> {
    let p = prefix.trim_end_matches('/');
    let rest = path.strip_prefix(p)?;
    if rest.is_empty() || rest.starts_with('/') {
        Some(rest)
    } else {
        None
    }
}

/// `rest` (what follows a route's prefix) joined under `base` (the upstream's path without its
/// trailing `/`), or why it may not be.
pub fn join(base: &str, rest: &str) -> Result<String, PathError> {
    for segment in rest.split('/') {
        check_segment(segment)?;
    }
    let rest = rest.trim_start_matches('/');
    let mut joined = String::with_capacity(base.len() + 1 + rest.len());
    joined.push_str(base);
    joined.push('/');
    joined.push_str(rest);
    Ok(joined)
}

fn check_segment(segment: &str) -> Result<(), PathError> {
    if segment.contains('\\') {
        return Err(PathError::Backslash);
    }
    if segment.chars().any(|c| c.is_ascii_control()) {
        return Err(PathError::ControlCharacter);
    }
    if !segment.contains('%') {
        return match segment {
            "." | ".." => Err(PathError::DotSegment),
            _ => Ok(()),
        };
    }
    // Decoded up to three times: a server or proxy on the way may decode once more than we
    // think (`%252e` → `%2e` → `.`).
    let mut text = segment.to_owned();
    for _ in 0..3 {
        let decoded = percent_decode(&text);
        if decoded.contains('/') || decoded.contains('\\') {
            return Err(PathError::EncodedSeparator);
        }
        if decoded.chars().any(|c| c.is_ascii_control()) {
            return Err(PathError::ControlCharacter);
        }
        if decoded == "." || decoded == ".." {
            return Err(PathError::DotSegment);
        }
        if decoded == text {
            break;
        }
        text = decoded;
    }
    Ok(())
}

/// `%XX` escapes decoded (bytes that do not make UTF-8 kept as the replacement character);
/// a `%` not followed by two hex digits stays as it is.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| char::from(b).to_digit(16);
        match (
            bytes[i],
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(hi), Some(lo)) => {
                out.push((hi * 16 + lo) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Entry point for the path-mapping fuzz target: whatever the input, a mapped path stays
/// under the base path and holds no dot segment, plain or escaped.
pub fn fuzz_entry(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (prefix, path) = text.split_once('\n').unwrap_or(("/r", text));
    let prefix = if prefix.starts_with('/') { prefix } else { "/r" };
    let base = "/api/v1/tenant";
    if let Some(rest) = strip_prefix(path, prefix) {
        if let Ok(joined) = join(base, rest) {
            assert!(joined.starts_with("/api/v1/tenant/"), "{joined}");
            for segment in joined.split('/') {
                assert!(check_segment(segment).is_ok(), "{joined}");
            }
            // What a URL parser makes of it stays under the base too.
            if let Ok(mut url) = url::Url::parse("https://rx.example/") {
                url.set_path(&joined);
                assert!(
                    url.path().starts_with("/api/v1/tenant/"),
                    "{joined} → {}",
                    url.path()
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_matches_whole_segments_only() {
        assert_eq!(strip_prefix("/acme", "/acme"), Some(""));
        assert_eq!(strip_prefix("/acme/x/y", "/acme"), Some("/x/y"));
        assert_eq!(strip_prefix("/acme/x", "/acme/"), Some("/x"));
        assert_eq!(strip_prefix("/acmeadmin/x", "/acme"), None);
        assert_eq!(strip_prefix("/anything", "/"), Some("/anything"));
        assert_eq!(strip_prefix("/other", "/acme"), None);
    }

    #[test]
    fn every_way_up_is_refused_and_ordinary_paths_join_under_the_base() {
        let base = "/api/v1/tenantA";
        for (rest, err) in [
            ("/../../tenantB/x", PathError::DotSegment),
            ("/./x", PathError::DotSegment),
            ("/%2e%2e/%2e%2e/tenantB/x", PathError::DotSegment),
            ("/%2E./x", PathError::DotSegment),
            ("/.%2e/x", PathError::DotSegment),
            ("/%252e%252e/x", PathError::DotSegment),
            ("/..%2f..%2ftenantB/x", PathError::EncodedSeparator),
            ("/x%2F..", PathError::EncodedSeparator),
            ("/x%5c..", PathError::EncodedSeparator),
            ("/x\\..\\y", PathError::Backslash),
            ("/..", PathError::DotSegment),
            ("/\n..", PathError::ControlCharacter),
            ("/.\t./x", PathError::ControlCharacter),
            ("/%0a../x", PathError::ControlCharacter),
        ] {
            assert_eq!(join(base, rest), Err(err), "{rest}");
        }
        assert_eq!(join(base, "/ok/x"), Ok("/api/v1/tenantA/ok/x".to_owned()));
        assert_eq!(join(base, ""), Ok("/api/v1/tenantA/".to_owned()));
        assert_eq!(
            join(base, "/a..b/.hidden/%41"),
            Ok("/api/v1/tenantA/a..b/.hidden/%41".to_owned())
        );
    }
}
