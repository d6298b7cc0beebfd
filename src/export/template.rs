//! Message templates: a dataflow's request body rendered with minijinja from a context named
//! as the Destination SDK names it (`input.profiles[]`, `input.aggregationKey`,
//! `destination.segmentAliases`…), so a partner's Pebble template ports with little change.
//!
//! A template is compiled, and tried on a sample, when the config or an API dataflow is
//! loaded: a syntax error or an unknown variable is refused there with its file and line.
//! Rendering is sandboxed: undefined values are errors (strict), there is no loader (no file
//! access) and no function reaches the environment or the network, the work is bounded by
//! fuel, and the output by size. Pure: no I/O.

use std::collections::BTreeMap;
use std::io::Write;

use minijinja::value::Value as TplValue;
use minijinja::{AutoEscape, Environment, UndefinedBehavior};
use serde_json::{json, Map, Value};

use crate::export::spec::{Catalog, DataflowSpec};
use crate::profile::state::Profile;

/// Instructions one rendering may execute: a template that loops far beyond any real batch
/// stops with an error instead of holding a courier.
const FUEL: u64 = 5_000_000;

/// The largest body a template may render (the receiver's limits are usually far lower).
pub const MAX_OUTPUT: usize = 16 * 1024 * 1024;

/// The names a template may read at its top level; anything else is refused at load.
const GLOBALS: &[&str] = &["input", "destination", "addedSegments", "removedSegments"];

/// A compiled template and the name its errors carry (a file path, or `<dataflow>.template`).
pub struct Template {
    env: Environment<'static>,
    name: String,
    /// Whether the output must parse as JSON (the dataflow's content type is JSON).
    json: bool,
}

impl std::fmt::Debug for Template {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Template").field("name", &self.name).finish()
    }
}

/// Why a rendering failed: the template's own error (with its line) or a body that is not
/// what the content type promises.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct RenderError(pub String);

impl Template {
    /// Compile `source`, named `name` in errors; `json`: the rendered body must parse as JSON.
    /// Checks the variables it reads and renders `sample` once, so what fails on every
    /// request fails here instead.
    pub fn compile(name: &str, source: String, json: bool, sample: &Value) -> Result<Template, String> {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_fuel(Some(FUEL));
        env.set_recursion_limit(64);
        // Bodies are JSON or text, never HTML: values print as they are, the template quotes.
        env.set_auto_escape_callback(|_| AutoEscape::None);
        env.add_function("addedSegments", |ups: TplValue| by_status(ups, "realized"));
        env.add_function("removedSegments", |ups: TplValue| by_status(ups, "exited"));
        env.add_filter("toJson", |v: TplValue| {
            serde_json::to_string(&v)
                .map_err(|e| minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, e.to_string()))
        });
        env.add_template_owned(name.to_owned(), source.clone())
            .map_err(|e| describe(name, &e))?;
        let t = Template {
            name: name.to_owned(),
            json,
            env,
        };
        {
            let tpl = t.env.get_template(&t.name).map_err(|e| describe(name, &e))?;
            let mut unknown: Vec<String> = tpl
                .undeclared_variables(false)
                .into_iter()
                .filter(|v| !GLOBALS.contains(&v.as_str()))
                .collect();
            unknown.sort();
            if let Some(v) = unknown.first() {
                let line = first_line_of(&source, v);
                return Err(format!(
                    "{name}:{line}: unknown variable '{v}' (a template reads {})",
                    GLOBALS.join(", ")
                ));
            }
        }
        t.render(sample)
            .map_err(|e| format!("{} (rendering a sample profile)", e.0))?;
        Ok(t)
    }

    /// Render the body for `context` (see [`context`]).
    pub fn render(&self, context: &Value) -> Result<Vec<u8>, RenderError> {
        let tpl = self
            .env
            .get_template(&self.name)
            .map_err(|e| RenderError(describe(&self.name, &e)))?;
        let mut out = Capped(Vec::new());
        tpl.render_captured_to(TplValue::from(minijinja::value::Serde(context)), &mut out)
            .map_err(|e| RenderError(describe(&self.name, &e)))?;
        let body = out.0;
        if self.json {
            if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(&body) {
                return Err(RenderError(format!(
                    "{}: the rendered body is not JSON ({e}); set content_type for another format",
                    self.name
                )));
            }
        }
        Ok(body)
    }
}

/// A writer that refuses to grow past [`MAX_OUTPUT`].
struct Capped(Vec<u8>);

impl Write for Capped {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.0.len() + buf.len() > MAX_OUTPUT {
            return Err(std::io::Error::other(format!(
                "the rendered body is larger than {} MiB",
                MAX_OUTPUT >> 20
            )));
        }
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `name:line: what`, as an operator can act on it.
fn describe(name: &str, e: &minijinja::Error) -> String {
    let mut msg = match e.line() {
        Some(line) => format!("{name}:{line}: {}", e.kind()),
        None => format!("{name}: {}", e.kind()),
    };
    if let Some(detail) = e.detail() {
        msg.push_str(": ");
        msg.push_str(detail);
    }
    msg
}

/// The first line of `source` that names `var` (1-based; 1 when it cannot be told).
fn first_line_of(source: &str, var: &str) -> usize {
    source
        .lines()
        .position(|l| {
            l.match_indices(var).any(|(i, _)| {
                let before = l[..i].chars().next_back();
                let after = l[i + var.len()..].chars().next();
                let ident = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_');
                !ident(before) && !ident(after)
            })
        })
        .map_or(1, |i| i + 1)
}

/// The `ups` entries whose status is `status`, by segment id.
fn by_status(ups: TplValue, status: &str) -> Result<TplValue, minijinja::Error> {
    let mut out = BTreeMap::new();
    for key in ups.try_iter()? {
        let entry = ups.get_item(&key)?;
        if entry.get_attr("status")?.as_str() == Some(status) {
            out.insert(key.to_string(), entry);
        }
    }
    Ok(TplValue::from(minijinja::value::Serde(&out)))
}

/// One profile as a template sees it, named as the Destination SDK names it: `attributes`
/// (each mapped attribute by its target name, as `{"value": …}`), `identityMap` and
/// `segmentMembership` exactly as the HTTP API destination's payload carries them.
pub fn profile_view(
    df: &DataflowSpec,
    catalog: &Catalog,
    profile: &Profile,
    triggering: &[String],
    identity_map_json: Option<&serde_json::value::RawValue>,
) -> Value {
    let payload: Value = serde_json::from_slice(&crate::export::payload::to_vec_with(
        df,
        catalog,
        profile,
        triggering,
        identity_map_json,
    ))
    .unwrap_or(Value::Null);
    let mut attributes = Map::new();
    for a in &df.attributes {
        if let Some(v) = profile.attribute(&a.source) {
            attributes.insert(a.target.join("."), json!({ "value": v }));
        }
    }
    json!({
        "attributes": Value::Object(attributes),
        "identityMap": payload.get("identityMap").cloned().unwrap_or_else(|| json!({})),
        "segmentMembership": payload.get("segmentMembership").cloned().unwrap_or_else(|| json!({ "ups": {} })),
    })
}

/// A profile view back in the HTTP API destination's payload shape (attributes at their
/// target paths): the body of an aggregated request without a template is an array of these.
pub fn payload_of_view(view: &Value) -> Value {
    let mut root = Map::new();
    if let Some(attrs) = view["attributes"].as_object() {
        for (target, v) in attrs {
            let parts: Vec<&str> = target.split('.').collect();
            set_at(&mut root, &parts, v["value"].clone());
        }
    }
    root.insert("identityMap".into(), view["identityMap"].clone());
    root.insert("segmentMembership".into(), view["segmentMembership"].clone());
    Value::Object(root)
}

/// `n` sample profiles for a dataflow's mapping, as a template sees them (the Destination
/// SDK's sample-profile generation): every mapped attribute with a made-up value, an email
/// identity, and every mapped segment — realized in the first profile, exited in the second.
pub fn sample_views(df: &crate::config::Dataflow, n: usize) -> Vec<Value> {
    (0..n.max(1))
        .map(|i| {
            let attributes: Map<String, Value> = df
                .attributes
                .iter()
                .map(|a| {
                    let leaf = a.target.rsplit('.').next().unwrap_or(&a.target);
                    (a.target.clone(), json!({ "value": format!("{leaf}-{}", i + 1) }))
                })
                .collect();
            let status = if i % 2 == 0 { "realized" } else { "exited" };
            let ups: Map<String, Value> = df
                .segments
                .iter()
                .map(|s| {
                    (
                        s.clone(),
                        json!({ "status": status, "lastQualificationTime": "2026-01-01T00:00:00Z" }),
                    )
                })
                .collect();
            json!({
                "attributes": Value::Object(attributes),
                "identityMap": { "email": [{ "id": format!("user{}@example.com", i + 1) }] },
                "segmentMembership": { "ups": Value::Object(ups) },
            })
        })
        .collect()
}

/// `n` sample profile updates for a dataflow's mapping, as NDJSON lines `ingest` and
/// `template render --profiles` take: every mapped source attribute with a made-up value, an
/// email identity, every mapped segment (realized, or exited for every second profile).
pub fn sample_updates(df: &crate::config::Dataflow, n: usize) -> Vec<String> {
    (0..n.max(1))
        .map(|i| {
            let mut attributes = Map::new();
            for a in &df.attributes {
                let parts: Vec<&str> = a.source.split('.').collect();
                let leaf = parts.last().copied().unwrap_or("value");
                set_at(&mut attributes, &parts, json!(format!("{leaf}-{}", i + 1)));
            }
            let status = if i % 2 == 0 { "realized" } else { "exited" };
            let segments: Vec<Value> = df
                .segments
                .iter()
                .map(|s| json!({ "id": s, "status": status }))
                .collect();
            json!({
                "profileId": format!("sample-{}", i + 1),
                "attributes": Value::Object(attributes),
                "identityMap": { "email": [{ "id": format!("user{}@example.com", i + 1) }] },
                "segments": segments,
            })
            .to_string()
        })
        .collect()
}

/// The context of one request of `n` sample profiles for `df`.
pub fn sample_context(df: &crate::config::Dataflow, names: &[(String, String)], n: usize) -> Value {
    use crate::config::Aggregation;
    // The key holds what the policy groups by, and nothing else: a template that reads a
    // part its dataflow does not group by fails here, at load.
    let policy = match &df.aggregation {
        Aggregation::None => None,
        Aggregation::BestEffort { aggregation_key, .. }
        | Aggregation::Configurable { aggregation_key, .. } => Some(aggregation_key),
    };
    let mut key = Map::new();
    if let Some(k) = policy {
        if k.include_segment_id {
            let s = df.segments.first().cloned().unwrap_or_default();
            key.insert("segmentId".into(), json!(s));
            key.insert("segmentNamespace".into(), json!("ups"));
            key.insert("segmentAlias".into(), json!(s));
            if k.include_segment_status {
                key.insert("segmentStatus".into(), json!("realized"));
            }
        }
        if k.include_identity {
            let ns = k.groups.first().cloned().unwrap_or_else(|| vec!["email".into()]);
            key.insert("identityNamespaces".into(), json!(ns));
        }
    }
    context(sample_views(df, n), Value::Object(key), &df.name, names)
}

/// Place `v` at `path` under `root`, making objects on the way (a leaf in the way is replaced).
fn set_at(root: &mut Map<String, Value>, path: &[&str], v: Value) {
    match path {
        [] => {}
        [last] => {
            root.insert((*last).to_owned(), v);
        }
        [first, rest @ ..] => {
            let slot = root.entry((*first).to_owned()).or_insert_with(|| json!({}));
            if !slot.is_object() {
                *slot = json!({});
            }
            if let Some(next) = slot.as_object_mut() {
                set_at(next, rest, v);
            }
        }
    }
}

/// The whole rendering context of one request: its profiles, its aggregation key, and the
/// destination's segment names and aliases.
pub fn context(
    profiles: Vec<Value>,
    aggregation_key: Value,
    dataflow: &str,
    segments: &[(String, String)],
) -> Value {
    let names: Map<String, Value> = segments
        .iter()
        .map(|(id, name)| (id.clone(), Value::String(name.clone())))
        .collect();
    // The Destination SDK's alias of a mapped segment is the name the destination knows it
    // by; ours is its id (mappings carry no separate alias).
    let aliases: Map<String, Value> = segments
        .iter()
        .map(|(id, _)| (id.clone(), Value::String(id.clone())))
        .collect();
    json!({
        "input": { "profiles": profiles, "aggregationKey": aggregation_key },
        "destination": {
            "name": dataflow,
            "segmentAliases": aliases,
            "segmentNames": names,
            "segmentNamesByAlias": names,
        },
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn sample() -> Value {
        context(
            vec![json!({
                "attributes": {"email": {"value": "a@example.com"}},
                "identityMap": {"email": [{"id": "a@example.com"}]},
                "segmentMembership": {"ups": {
                    "s1": {"status": "realized", "lastQualificationTime": "2026-12-01T00:00:00Z"},
                    "s2": {"status": "exited", "lastQualificationTime": "2026-12-01T00:00:00Z"}
                }}
            })],
            json!({}),
            "acme",
            &[("s1".into(), "One".into()), ("s2".into(), "Two".into())],
        )
    }

    #[test]
    fn renders_json_with_the_segment_helpers() {
        let src = r#"{"users": [{% for p in input.profiles %}{"email": {{ p.attributes.email.value | toJson }},
 "add": [{% for id, s in addedSegments(p.segmentMembership.ups) | items %}"{{ destination.segmentAliases[id] }}"{% if not loop.last %},{% endif %}{% endfor %}],
 "remove": [{% for id, s in removedSegments(p.segmentMembership.ups) | items %}"{{ id }}"{% if not loop.last %},{% endif %}{% endfor %}]}{% if not loop.last %},{% endif %}{% endfor %}]}"#;
        let t = Template::compile("t.j2", src.into(), true, &sample()).unwrap();
        let out: Value = serde_json::from_slice(&t.render(&sample()).unwrap()).unwrap();
        assert_eq!(
            out,
            json!({"users": [{"email": "a@example.com", "add": ["s1"], "remove": ["s2"]}]})
        );
    }

    #[test]
    fn load_errors_name_the_file_and_line() {
        let e = Template::compile(
            "acme.j2",
            "{\n\"a\": {{ input.profiles[0 }\n}".into(),
            true,
            &sample(),
        )
        .unwrap_err();
        assert!(e.starts_with("acme.j2:2: syntax error"), "{e}");
        let e = Template::compile(
            "acme.j2",
            "{\n\n\"a\": \"{{ secrets }}\"}".into(),
            true,
            &sample(),
        )
        .unwrap_err();
        assert!(e.starts_with("acme.j2:3: unknown variable 'secrets'"), "{e}");
        // Strict: a missing attribute is an error, not an empty string.
        let e = Template::compile(
            "acme.j2",
            "{\"a\": \"{{ input.profiles[0].attributes.nope }}\"}".into(),
            true,
            &sample(),
        )
        .unwrap_err();
        assert!(e.contains("acme.j2:1: undefined value"), "{e}");
        let e = Template::compile("acme.j2", "not json".into(), true, &sample()).unwrap_err();
        assert!(e.contains("not JSON"), "{e}");
        assert!(Template::compile("acme.txt", "not json".into(), false, &sample()).is_ok());
    }

    #[test]
    fn work_and_output_are_bounded() {
        let e = Template::compile(
            "loop.j2",
            "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}".into(),
            false,
            &sample(),
        )
        .unwrap_err();
        assert!(e.contains("loop.j2"), "{e}");
    }
}
