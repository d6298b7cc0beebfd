//! `Config::validate`: every problem in a config at once, each under its key path.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::destination::{DestinationConfig, Origin, Written};
use super::parse::parse_duration;
use super::secret::SecretSource;
use super::{Config, Dataflow, IdentityConfig, Issue, SidecarListener};

/// The problems found so far.
pub(super) struct Issues(pub(super) Vec<Issue>);

impl Issues {
    pub(super) fn push(&mut self, key: impl Into<String>, reason: impl Into<String>) {
        self.0.push(Issue {
            key: key.into(),
            reason: reason.into(),
        });
    }
}

/// The largest template accepted (file or inline).
const MAX_TEMPLATE: usize = 256 * 1024;

/// `type/subtype`, each an RFC 9110 token, with any parameters after a `;`.
fn is_media_type(ct: &str) -> bool {
    let essence = ct.split(';').next().unwrap_or("").trim();
    let token = |t: &str| {
        !t.is_empty()
            && t.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
    };
    matches!(essence.split_once('/'), Some((t, s)) if token(t) && token(s))
}

/// An aggregation key's groups make sense only with `include_identity`, and name namespaces.
fn check_aggregation_key(out: &mut Issues, key: &str, k: &crate::config::AggregationKey) {
    if k.include_segment_status && !k.include_segment_id {
        out.push(
            format!("{key}.aggregation.aggregation_key.include_segment_status"),
            "needs include_segment_id = true (statuses are grouped within a segment)",
        );
    }
    if !k.groups.is_empty() && !k.include_identity {
        out.push(
            format!("{key}.aggregation.aggregation_key.groups"),
            "needs include_identity = true",
        );
    }
    if !k.groups.is_empty() && k.one_identity_per_group {
        out.push(
            format!("{key}.aggregation.aggregation_key.groups"),
            "give groups or one_identity_per_group = true, not both",
        );
    }
    if k.groups
        .iter()
        .any(|g| g.is_empty() || g.iter().any(|ns| ns.trim().is_empty()))
    {
        out.push(
            format!("{key}.aggregation.aggregation_key.groups"),
            "each group names at least one identity namespace",
        );
    }
}

impl Config {
    /// Every problem in the config, each with its key path. Empty means valid.
    pub fn validate(&self) -> Vec<Issue> {
        let mut out = Issues(Vec::new());
        if let Some(id) = &self.identity {
            self.validate_identity(&mut out, "identity", id);
        }
        for (name, id) in &self.identities {
            if name == "default" {
                out.push(
                    format!("identities.{name}"),
                    "'default' names the [identity] table; choose another name",
                );
            } else if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                out.push(
                    format!("identities.{name}"),
                    "names are letters, digits, '-' or '_'",
                );
            }
            self.validate_identity(&mut out, &format!("identities.{name}"), id);
        }
        if let (Some(_), Some(_)) = (&self.admin.token_env, &self.admin.token_file) {
            out.push("admin", "set only one of token_env and token_file");
        }
        for (what, list) in [("allow", &self.egress.allow), ("deny", &self.egress.deny)] {
            for (i, rule) in list.iter().enumerate() {
                if let Err(e) = crate::egress::Rule::parse(rule) {
                    out.push(format!("egress.{what}[{i}]"), e);
                }
            }
        }
        match (&self.public.tls_cert, &self.public.tls_key) {
            (Some(c), Some(k)) => {
                self.check_file(&mut out, "public.tls_cert", c);
                self.check_file(&mut out, "public.tls_key", k);
            }
            (None, None) => {}
            _ => out.push("public", "set both tls_cert and tls_key, or neither"),
        }
        let limits = [("public", self.public.limits()), ("admin", self.admin.limits())]
            .into_iter()
            .chain(self.sidecar.as_ref().map(|sc| ("sidecar", sc.limits())));
        for (section, result) in limits {
            for (key, reason) in result.err().unwrap_or_default() {
                out.push(format!("{section}.{key}"), reason);
            }
        }
        if let Some(sc) = &self.sidecar {
            if !(1..=64).contains(&sc.threads) {
                out.push("sidecar.threads", "must be between 1 and 64");
            }
            for (n, (lkey, l)) in sc.all_listeners().into_iter().enumerate() {
                self.validate_sidecar_listener(&mut out, &lkey, n, &l);
            }
        }
        let a = &self.alerts;
        if let Some(Err(issues)) = self.alerts_destination_issues() {
            for i in issues {
                let key = if i.key == "endpoint" {
                    "webhook"
                } else {
                    i.key.as_str()
                };
                out.push(format!("alerts.{key}"), i.reason);
            }
        } else if let (None, Some(ca)) = (&a.webhook, &a.ca) {
            self.check_file(&mut out, "alerts.ca", ca);
        }
        if !(a.failure_ratio > 0.0 && a.failure_ratio <= 1.0) {
            out.push(
                "alerts.failure_ratio",
                format!("{} is outside (0, 1]", a.failure_ratio),
            );
        }
        for (key, v) in [("alerts.window", &a.window), ("alerts.interval", &a.interval)] {
            if let Err(e) = parse_duration(v) {
                out.push(key, e);
            }
        }
        if let Some(e) = &self.events {
            if let Some(Err(issues)) = self.events_destination_issues() {
                for i in issues {
                    let key = if i.key == "endpoint" {
                        "webhook"
                    } else {
                        i.key.as_str()
                    };
                    out.push(format!("events.{key}"), i.reason);
                }
            }
            let signing = e.signing_secret();
            if signing.env.is_none() && signing.file.is_none() && signing.named.is_none() {
                out.push(
                    "events",
                    "set signing_secret_env, signing_secret_file or signing_secret_ref: \
                     events are always signed (Standard Webhooks), so the receiver can tell them from forgeries",
                );
            }
            if !(1..=1_000_000).contains(&e.queue) {
                out.push("events.queue", format!("{} is outside 1..=1000000", e.queue));
            }
            if e.cert_expiry_days.iter().any(|d| !(1..=3650).contains(d)) {
                out.push(
                    "events.cert_expiry_days",
                    "each threshold must be between 1 and 3650 days",
                );
            }
        }
        self.validate_telemetry(&mut out);
        if self.audit.key_env.is_some() || self.audit.key_file.is_some() {
            self.check_secret(
                &mut out,
                "audit",
                "key",
                self.audit.key_env.as_ref(),
                self.audit.key_file.as_ref(),
            );
        }
        if !(self.store.url.starts_with("sqlite://")
            || self.store.url.starts_with("postgres://")
            || self.store.url.starts_with("postgresql://"))
        {
            out.push(
                "store.url",
                format!(
                    "'{}' must start with sqlite:// or postgres://",
                    self.store.redacted_url()
                ),
            );
        }
        let pg = !self.store.url.starts_with("sqlite://");
        if pg && self.store.url_has_password() {
            out.push(
                "store.url",
                "holds a password; use store.password_env or store.password_file instead",
            );
        }
        if self.store.password_env.is_some() || self.store.password_file.is_some() {
            self.check_secret(
                &mut out,
                "store",
                "password",
                self.store.password_env.as_ref(),
                self.store.password_file.as_ref(),
            );
        }
        match parse_duration(&self.store.lease) {
            Ok(d) if d >= Duration::from_secs(1) && d <= Duration::from_secs(3600) => {}
            _ => out.push(
                "store.lease",
                format!("'{}' must be a duration from 1s to 1h", self.store.lease),
            ),
        }
        if pg {
            let sslmode = url::Url::parse(&self.store.url).ok().and_then(|u| {
                u.query_pairs()
                    .find(|(k, _)| k == "sslmode")
                    .map(|(_, v)| v.into_owned())
            });
            match (&self.store.ca, sslmode.as_deref()) {
                (Some(_), Some("disable")) => out.push("store.ca", "set, but the URL says sslmode=disable"),
                (Some(ca), _) => self.check_file(&mut out, "store.ca", ca),
                (None, Some("require" | "verify-ca" | "verify-full")) => out.push(
                    "store.url",
                    "sslmode asks for TLS: set store.ca to the CA bundle that verifies the server",
                ),
                _ => {}
            }
        }
        if !(1..=64).contains(&self.store.pool_size) {
            out.push("store.pool_size", "must be from 1 to 64");
        }
        if !(1..=1024).contains(&self.store.cache_mib) {
            out.push("store.cache_mib", "must be from 1 to 1024 (MiB)");
        }
        let ident_ok = |s: &str| {
            !s.is_empty()
                && s.len() <= 63
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
        };
        if let Some(schema) = &self.store.schema {
            if !(ident_ok(schema) && schema.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')) {
                out.push(
                    "store.schema",
                    format!("'{schema}' must be 1-63 letters, digits or '_'"),
                );
            }
        }
        if let Some(instance) = &self.store.instance {
            if !ident_ok(instance) {
                out.push(
                    "store.instance",
                    format!("'{instance}' must be 1-63 letters, digits, '.', '-' or '_'"),
                );
            }
        }
        let mut names = std::collections::HashSet::new();
        for (i, df) in self.dataflows.iter().enumerate() {
            let key = format!("dataflows[{i}]");
            if df.name.is_empty()
                || !df
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                out.push(
                    format!("{key}.name"),
                    format!("'{}' must be non-empty letters, digits, '-' or '_'", df.name),
                );
            } else if !names.insert(df.name.as_str()) {
                out.push(
                    format!("{key}.name"),
                    format!("'{}' is used by another dataflow", df.name),
                );
            }
            self.validate_dataflow(&mut out, &key, df);
        }
        for (i, s) in self.segments.iter().enumerate() {
            for (field, v) in [("created_at", &s.created_at), ("updated_at", &s.updated_at)] {
                if let Some(v) = v {
                    if time::OffsetDateTime::parse(v, &time::format_description::well_known::Rfc3339).is_err()
                    {
                        out.push(
                            format!("segments[{i}].{field}"),
                            format!("'{v}' is not an RFC 3339 time"),
                        );
                    }
                }
            }
        }
        out.0
    }

    fn validate_identity(&self, out: &mut Issues, key: &str, id: &IdentityConfig) {
        let pem_set = !id.cert.as_os_str().is_empty() || !id.key.as_os_str().is_empty();
        if let Some(spiffe) = &id.spiffe {
            let files = pem_set
                || id.p12.is_some()
                || id.p12_password_env.is_some()
                || id.p12_password_file.is_some()
                || id.next_cert.is_some()
                || id.next_key.is_some()
                || id.switch_at.is_some()
                || id.switch_before_expiry.is_some();
            if files {
                out.push(
                    key,
                    "spiffe takes the identity from the agent, which also renews it: set no cert, key, p12, next_* or switch_*",
                );
            }
            if let Err(e) = crate::tls::spiffe::check_socket(&spiffe.socket) {
                out.push(format!("{key}.spiffe.socket"), e);
            }
            if let Some(wanted) = &spiffe.spiffe_id {
                if let Err(e) = crate::tls::spiffe::check_spiffe_id(wanted) {
                    out.push(format!("{key}.spiffe.spiffe_id"), e);
                }
            }
            return;
        }
        match &id.p12 {
            Some(p12) => {
                self.check_file(out, &format!("{key}.p12"), p12);
                if pem_set {
                    out.push(key, "set p12, or cert and key, not both");
                }
                if id.p12_password_env.is_some() && id.p12_password_file.is_some() {
                    out.push(key, "set only one of p12_password_env and p12_password_file");
                }
            }
            None => {
                if id.p12_password_env.is_some() || id.p12_password_file.is_some() {
                    out.push(key, "p12_password_env/_file need p12");
                }
                if id.cert.as_os_str().is_empty() || id.key.as_os_str().is_empty() {
                    out.push(key, "cert and key are required (or p12)");
                } else {
                    self.check_file(out, &format!("{key}.cert"), &id.cert);
                    self.check_file(out, &format!("{key}.key"), &id.key);
                }
            }
        }
        match (&id.next_cert, &id.next_key) {
            (Some(c), Some(k)) => {
                self.check_file(out, &format!("{key}.next_cert"), c);
                self.check_file(out, &format!("{key}.next_key"), k);
                if id.switch_at.is_none() && id.switch_before_expiry.is_none() {
                    out.push(key, "next_cert needs switch_at or switch_before_expiry");
                }
            }
            (None, None) => {}
            _ => out.push(key, "set both next_cert and next_key, or neither"),
        }
        if let Some(t) = &id.switch_at {
            if time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).is_err() {
                out.push(
                    format!("{key}.switch_at"),
                    format!("'{t}' is not an RFC 3339 time"),
                );
            }
        }
        if let Some(d) = &id.switch_before_expiry {
            if let Err(e) = parse_duration(d) {
                out.push(format!("{key}.switch_before_expiry"), e);
            }
        }
    }

    /// A dataflow defined through the admin API or read from a shared database, checked and
    /// made a destination in one pass: the rules of a configured one (issues keyed
    /// `dataflow.…`), plus those of its origin (secrets only by `[secrets]` name, a CA file
    /// only inside `[admin] dataflow_ca_dir`).
    pub fn stored_dataflow(&self, df: &Dataflow) -> Result<DestinationConfig, Vec<Issue>> {
        let mut out = Issues(Vec::new());
        if df.name.is_empty()
            || df.name.len() > 128
            || !df
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            out.push(
                "dataflow.name",
                format!("'{}' must be 1-128 letters, digits, '-' or '_'", df.name),
            );
        }
        self.validate_mapping(&mut out, "dataflow", df);
        if df.template.is_some() {
            out.push(
                "dataflow.template",
                "an API-defined dataflow gives its template's text as template_inline, not a file",
            );
        }
        match self.destination(&df.name, &Written::dataflow(df, Origin::Stored)) {
            Ok(d) if out.0.is_empty() => Ok(d),
            Ok(_) => Err(out.0),
            Err(issues) => {
                for i in issues {
                    out.push(format!("dataflow.{}", i.key), i.reason);
                }
                Err(out.0)
            }
        }
    }

    fn validate_dataflow(&self, out: &mut Issues, key: &str, df: &Dataflow) {
        self.validate_destination(out, key, &Written::dataflow(df, Origin::ConfigFile));
        self.validate_mapping(out, key, df);
    }

    /// A dataflow's template: its text (from `template_inline`, or the `template` file read
    /// now), named as its errors will name it. `None` without one.
    pub fn dataflow_template(&self, df: &Dataflow) -> Result<Option<(String, String)>, String> {
        match (&df.template, &df.template_inline) {
            (None, None) => Ok(None),
            (Some(_), Some(_)) => Err("give template or template_inline, not both".into()),
            (None, Some(text)) => {
                if text.len() > MAX_TEMPLATE {
                    return Err(format!("template_inline is over {} KiB", MAX_TEMPLATE >> 10));
                }
                Ok(Some((format!("{}.template", df.name), text.clone())))
            }
            (Some(path), None) => {
                let full = self.path(path);
                let meta =
                    std::fs::metadata(&full).map_err(|e| format!("template {}: {e}", full.display()))?;
                if meta.len() > MAX_TEMPLATE as u64 {
                    return Err(format!(
                        "template {}: over {} KiB",
                        full.display(),
                        MAX_TEMPLATE >> 10
                    ));
                }
                let text = std::fs::read_to_string(&full)
                    .map_err(|e| format!("template {}: {e}", full.display()))?;
                Ok(Some((path.display().to_string(), text)))
            }
        }
    }

    /// A dataflow's aggregation, content type and template (compiled and tried on sample
    /// profiles, so a broken template is refused here with its file and line).
    fn validate_shaping(&self, out: &mut Issues, key: &str, df: &Dataflow) {
        use crate::config::Aggregation;
        match &df.aggregation {
            Aggregation::None => {}
            Aggregation::BestEffort {
                max_users_per_request,
                aggregation_key,
                ..
            } => {
                if !(1..=1000).contains(max_users_per_request) {
                    out.push(
                        format!("{key}.aggregation.max_users_per_request"),
                        format!("{max_users_per_request} is outside 1..=1000"),
                    );
                }
                check_aggregation_key(out, key, aggregation_key);
            }
            Aggregation::Configurable {
                max_batch_age,
                max_events_in_batch,
                aggregation_key,
            } => {
                match parse_duration(max_batch_age) {
                    Ok(d)
                        if d >= std::time::Duration::from_secs(1)
                            && d <= std::time::Duration::from_secs(86_400) => {}
                    Ok(_) => out.push(
                        format!("{key}.aggregation.max_batch_age"),
                        format!("'{max_batch_age}' is outside 1s..=24h"),
                    ),
                    Err(e) => out.push(format!("{key}.aggregation.max_batch_age"), e),
                }
                if !(1..=10_000).contains(max_events_in_batch) {
                    out.push(
                        format!("{key}.aggregation.max_events_in_batch"),
                        format!("{max_events_in_batch} is outside 1..=10000"),
                    );
                }
                check_aggregation_key(out, key, aggregation_key);
            }
        }
        if let Some(ct) = &df.content_type {
            if http::HeaderValue::from_str(ct).is_err() || !is_media_type(ct) {
                out.push(
                    format!("{key}.content_type"),
                    format!("'{ct}' is not a media type like application/json"),
                );
            }
        }
        let template = match self.dataflow_template(df) {
            Ok(t) => t,
            Err(e) => {
                out.push(format!("{key}.template"), e);
                return;
            }
        };
        if let Some((name, source)) = template {
            let json =
                crate::config::is_json_content_type(df.content_type.as_deref().unwrap_or("application/json"));
            let names: Vec<(String, String)> =
                df.segments.iter().map(|id| (id.clone(), id.clone())).collect();
            let sample = crate::export::template::sample_context(df, &names, 2);
            if let Err(e) = crate::export::template::Template::compile(&name, source, json, &sample) {
                out.push(format!("{key}.template"), e);
            }
        }
    }

    /// A dataflow's mapped attributes and segments, its pacing and its breaker.
    fn validate_mapping(&self, out: &mut Issues, key: &str, df: &Dataflow) {
        self.validate_shaping(out, key, df);
        if let Err(issues) = df.health_settings() {
            for (k, reason) in issues {
                out.push(format!("{key}.{k}"), reason);
            }
        }
        for (j, a) in df.attributes.iter().enumerate() {
            for (field, path) in [("source", &a.source), ("target", &a.target)] {
                if path.is_empty() || path.split('.').any(str::is_empty) {
                    out.push(
                        format!("{key}.attributes[{j}].{field}"),
                        format!("'{path}' is not a dotted path like person.name.firstName"),
                    );
                }
            }
        }
        for (j, s) in df.segments.iter().enumerate() {
            if !self.segments.iter().any(|c| &c.id == s) {
                out.push(
                    format!("{key}.segments[{j}]"),
                    format!("segment '{s}' is not in the [[segments]] catalog"),
                );
            }
        }
    }

    /// A destination's problems, under `key`.
    fn validate_destination(&self, out: &mut Issues, key: &str, w: &Written<'_>) {
        if let Err(issues) = self.destination(key, w) {
            for i in issues {
                out.push(format!("{key}.{}", i.key), i.reason);
            }
        }
    }

    /// A secret must come from exactly one source, and that source must be readable now.
    /// `[telemetry]`: a collector URL of http or https, a service name, headers that are
    /// valid and not the gateway's own, header secrets that name declared secrets.
    fn validate_telemetry(&self, out: &mut Issues) {
        let t = &self.telemetry;
        if let Some(endpoint) = &t.otlp_endpoint {
            match url::Url::parse(endpoint) {
                Err(e) => out.push("telemetry.otlp_endpoint", format!("is not a URL: {e}")),
                Ok(u) if !matches!(u.scheme(), "http" | "https") => {
                    out.push("telemetry.otlp_endpoint", "must be an http:// or https:// URL")
                }
                Ok(u) if u.host_str().is_none() => out.push("telemetry.otlp_endpoint", "has no host"),
                Ok(u) if !u.username().is_empty() || u.password().is_some() => out.push(
                    "telemetry.otlp_endpoint",
                    "holds credentials; put them in telemetry.header_secrets",
                ),
                Ok(u) if u.query().is_some() || u.fragment().is_some() => {
                    out.push("telemetry.otlp_endpoint", "takes no query or fragment")
                }
                Ok(_) => {}
            }
        } else if !t.headers.is_empty() || !t.header_secrets.is_empty() || t.ca.is_some() {
            out.push(
                "telemetry.otlp_endpoint",
                "is required when other [telemetry] keys are set (traces are off without it)",
            );
        }
        if t.service_name.trim().is_empty() {
            out.push("telemetry.service_name", "must not be empty");
        }
        for (name, value) in &t.headers {
            let key = format!("telemetry.headers.{name}");
            if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                out.push(key, "is not a valid header name");
            } else if http::HeaderValue::from_str(value).is_err() {
                out.push(key, "is not a valid header value");
            } else if t.header_secrets.contains_key(name) {
                out.push(key, "is also set in telemetry.header_secrets");
            }
        }
        for name in t.header_secrets.keys() {
            let key = format!("telemetry.header_secrets.{name}");
            if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                out.push(key, "is not a valid header name");
            } else if let Err(e) = self.telemetry_header_value(name) {
                out.push(key, e);
            }
        }
        for name in t.headers.keys().chain(t.header_secrets.keys()) {
            let lower = name.to_ascii_lowercase();
            if matches!(
                lower.as_str(),
                "host"
                    | "content-length"
                    | "content-type"
                    | "content-encoding"
                    | "transfer-encoding"
                    | "connection"
            ) {
                out.push(
                    format!("telemetry.headers.{name}"),
                    "is set by the exporter itself",
                );
            }
        }
        if let Some(ca) = &t.ca {
            let path = self.path(ca);
            if let Err(e) = crate::tls::client::Trust::from_pem_file(&path) {
                out.push("telemetry.ca", format!("{}: {e}", path.display()));
            }
        }
        match parse_duration(&t.timeout) {
            Err(e) => out.push("telemetry.timeout", e),
            Ok(d) if d < Duration::from_millis(100) || d > Duration::from_secs(60) => {
                out.push("telemetry.timeout", "must be between 100ms and 60s")
            }
            Ok(_) => {}
        }
    }

    /// The value of the `[telemetry]` header `name` from `header_secrets`, read from the
    /// `[secrets]` entry it names.
    pub fn telemetry_header_value(&self, name: &str) -> Result<super::Secret, String> {
        let secret = self
            .telemetry
            .header_secrets
            .get(name)
            .ok_or_else(|| format!("no header secret '{name}'"))?;
        let declared = self
            .secrets
            .get(secret)
            .ok_or_else(|| format!("'{secret}' is not declared in [secrets]"))?;
        let value = self
            .secret_source(declared.env.as_ref(), declared.file.as_ref(), "secret")
            .and_then(|s| s.read())
            .map_err(|e| format!("[secrets.{secret}]: {e}"))?;
        if http::HeaderValue::from_str(value.expose()).is_err() {
            return Err(format!("[secrets.{secret}] is not a valid header value"));
        }
        Ok(value)
    }

    fn check_secret(
        &self,
        out: &mut Issues,
        key: &str,
        what: &str,
        env: Option<&String>,
        file: Option<&PathBuf>,
    ) {
        let file = file.map(|f| self.path(f));
        match SecretSource::from_pair(env, file.as_ref(), what).and_then(|s| s.read()) {
            Ok(_) => {}
            Err(e) => out.push(format!("{key}.{what}"), e),
        }
    }

    /// One sidecar listener: where it listens, and each route as a dataflow would be checked.
    fn validate_sidecar_listener(&self, out: &mut Issues, lkey: &str, n: usize, l: &SidecarListener) {
        match (&l.listen, &l.unix_socket) {
            // The main [sidecar] listener always has an address (default loopback); its
            // unix_socket, when set, is used instead.
            (_, Some(path)) => match self.path(path).parent() {
                Some(dir) if dir.is_dir() => {}
                _ => out.push(
                    format!("{lkey}.unix_socket"),
                    format!("{}: its directory does not exist", path.display()),
                ),
            },
            (Some(addr), None) => {
                if !addr.ip().is_loopback() && !l.allow_non_loopback {
                    out.push(
                        format!("{lkey}.listen"),
                        format!("{addr} is not loopback; set allow_non_loopback = true to expose it"),
                    );
                }
            }
            (None, None) => out.push(lkey, "set listen or unix_socket"),
        }
        if l.routes.is_empty() && l.forward_proxy.is_none() && n > 0 {
            out.push(
                format!("{lkey}.routes"),
                "a listener needs routes or forward_proxy",
            );
        }
        let labelled = l
            .routes
            .iter()
            .enumerate()
            .map(|(i, r)| (format!("{lkey}.routes[{i}]"), r, true))
            .chain(
                l.forward_proxy
                    .iter()
                    .map(|r| (format!("{lkey}.forward_proxy"), r, false)),
            );
        for (key, r, routed) in labelled {
            if r.retries > 5 {
                out.push(format!("{key}.retries"), "at most 5");
            }
            if r.retry_buffer_bytes > 16 * 1024 * 1024 {
                out.push(format!("{key}.retry_buffer_bytes"), "at most 16 MiB");
            }
            if routed && !r.prefix.starts_with('/') {
                out.push(
                    format!("{key}.prefix"),
                    format!("'{}' must start with /", r.prefix),
                );
            }
            if !routed {
                if r.prefix != "/" {
                    out.push(
                        format!("{key}.prefix"),
                        "a forward proxy takes every path: set prefix = \"/\"",
                    );
                }
                // The app names the host of each forward-proxy request: a credential here
                // would go to whichever host the app chose.
                if !matches!(r.auth, crate::config::Auth::None) {
                    out.push(
                        format!("{key}.auth"),
                        "a forward proxy sends to hosts the app names, so it cannot carry a route credential; \
                         put auth on a route with a fixed upstream",
                    );
                }
            }
            self.validate_destination(out, &key, &Written::route(r));
        }
    }

    pub(super) fn check_file(&self, out: &mut Issues, key: &str, p: &Path) {
        let full = self.path(p);
        if !full.is_file() {
            out.push(key, format!("{} does not exist or is not a file", full.display()));
        }
    }

    /// The secret source for a `*_env`/`*_file` pair, with the file resolved.
    pub fn secret_source(
        &self,
        env: Option<&String>,
        file: Option<&PathBuf>,
        what: &str,
    ) -> Result<SecretSource, String> {
        let file = file.map(|f| self.path(f));
        SecretSource::from_pair(env, file.as_ref(), what)
    }
}

/// Parse a delivery URL with a real URL parser and refuse what must never be a destination:
/// userinfo (`user@host` tricks), fragments, no host.
pub fn check_url(s: &str) -> Result<url::Url, String> {
    let url = url::Url::parse(s).map_err(|e| format!("'{s}' is not a URL: {e}"))?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err("must not carry user:password@ (credentials belong in auth)".into());
    }
    if url.host().is_none() {
        return Err(format!("'{s}' has no host"));
    }
    if url.fragment().is_some() {
        return Err("must not have a #fragment".into());
    }
    Ok(url)
}
