//! The token-protected admin listener: `POST /v1/profiles` (NDJSON ingest), dataflows,
//! dead letters and `/metrics`. Deny by default: without a configured token every request is
//! refused; a wrong or missing token is a 401 that never says which.

use std::sync::Arc;

use http::{Method, Request, StatusCode};
use hyper::body::Incoming;
use serde_json::json;

use super::{error_reply, json_reply, read_body, Handler, Reply};
use crate::audit::ReplayTrigger;
use crate::config::{Config, Secret};
use crate::export::engine::{EngineError, PartlyStored};
use crate::export::Engine;
use crate::store::DeadLetterFilter;

/// Largest ingest body accepted in one request.
pub const MAX_INGEST_BODY: usize = 64 * 1024 * 1024;

/// An ingest request that failed part way: its status, why, and how many accepted updates
/// were stored before it did (their groups are durable; the client may resend the whole body,
/// as updates merge).
struct IngestFailure {
    status: StatusCode,
    message: String,
    stored: usize,
}

/// Parse an NDJSON body as its frames arrive and store its updates group by group
/// ([`crate::export::engine::IngestSession`]).
async fn ingest(
    body: Incoming,
    engine: &Engine,
) -> Result<crate::export::engine::IngestReport, IngestFailure> {
    use http_body_util::BodyExt;
    let Some(mut body) = super::limited(body, MAX_INGEST_BODY) else {
        let (status, message) = super::too_large_failure(MAX_INGEST_BODY);
        return Err(IngestFailure {
            status,
            message,
            stored: 0,
        });
    };
    let store_failed = |p: PartlyStored| {
        tracing::error!(error = %p.error, stored = p.stored, "ingest failed");
        let message = if p.stored == 0 {
            "the store could not accept the batch; nothing was stored".to_owned()
        } else {
            format!(
                "the store could not accept the batch; the first {} accepted updates were stored",
                p.stored
            )
        };
        IngestFailure {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message,
            stored: p.stored,
        }
    };
    let mut session = engine.ingest_session();
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => {
                if let Ok(data) = f.into_data() {
                    session.feed(&data).await.map_err(store_failed)?;
                }
            }
            Err(e) => {
                let stored = session.settle().await.map_err(store_failed)?;
                let (status, mut message) = super::body_failure(e, MAX_INGEST_BODY);
                if stored > 0 {
                    message += &format!("; the first {stored} accepted updates were stored");
                }
                return Err(IngestFailure {
                    status,
                    message,
                    stored,
                });
            }
        }
    }
    session.finish().await.map_err(store_failed)
}

/// Checks bearer tokens in constant time: the configured token's HMAC under a per-process
/// random key is compared with `ring::hmac::verify`.
pub struct TokenCheck {
    key: ring::hmac::Key,
    tag: Option<ring::hmac::Tag>,
}

impl TokenCheck {
    pub fn new(token: Option<&Secret>) -> Result<Self, String> {
        let rng = ring::rand::SystemRandom::new();
        let key =
            ring::hmac::Key::generate(ring::hmac::HMAC_SHA256, &rng).map_err(|_| "no system randomness")?;
        let tag = token.map(|t| ring::hmac::sign(&key, t.expose().as_bytes()));
        Ok(TokenCheck { key, tag })
    }

    /// Whether a token is configured at all.
    pub fn configured(&self) -> bool {
        self.tag.is_some()
    }

    /// Whether `presented` is the configured token (compared in constant time).
    pub fn accepts(&self, presented: &str) -> bool {
        self.tag
            .as_ref()
            .is_some_and(|tag| ring::hmac::verify(&self.key, presented.as_bytes(), tag.as_ref()).is_ok())
    }

    /// The refusal for `req`, or `None` when its token is valid.
    fn denial(&self, req: &Request<Incoming>) -> Option<Reply> {
        let Some(tag) = &self.tag else {
            return Some(error_reply(
                StatusCode::FORBIDDEN,
                "the admin API is disabled: no admin token is configured",
            ));
        };
        let presented = req
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        ring::hmac::verify(&self.key, presented.as_bytes(), tag.as_ref())
            .err()
            .map(|_| error_reply(StatusCode::UNAUTHORIZED, "a valid bearer token is required"))
    }
}

/// The admin API's handler.
pub fn handler(engine: Engine, cfg: Arc<Config>, tokens: Arc<TokenCheck>) -> Handler {
    let ui = super::ui::state();
    Arc::new(move |req| {
        let (engine, cfg, tokens, ui) = (engine.clone(), cfg.clone(), tokens.clone(), ui.clone());
        Box::pin(async move {
            // The status page logs in with the token once and then holds a login session
            // cookie: it checks its own requests.
            let path = req.uri().path();
            if path == "/ui" || path.starts_with("/ui/") {
                return super::ui::route(req, &ui, &tokens, &engine, &cfg).await;
            }
            if let Some(denied) = tokens.denial(&req) {
                return denied;
            }
            if req.method() == Method::GET && path == "/v1/overview" {
                return match crate::status::overview(&engine, &cfg, &ui.rates).await {
                    Ok(o) => json_reply(StatusCode::OK, &json!(o)),
                    Err(e) => error_reply(StatusCode::SERVICE_UNAVAILABLE, e),
                };
            }
            route(req, &engine, &cfg).await
        })
    })
}

async fn route(req: Request<Incoming>, engine: &Engine, cfg: &Config) -> Reply {
    let path = req.uri().path().to_owned();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (req.method().clone(), segments.as_slice()) {
        (Method::POST, ["v1", "profiles"]) => {
            // The request's span when traces are on: its status and counts, never its lines.
            let span = crate::telemetry::IngestSpan::start();
            let (status, body) = match ingest(req.into_body(), engine).await {
                Ok(r) => {
                    let status = if r.accepted == 0 && r.rejected > 0 {
                        StatusCode::BAD_REQUEST
                    } else {
                        StatusCode::OK
                    };
                    if let Some(s) = span {
                        s.end(status.as_u16(), Some((r.accepted, r.rejected)));
                    }
                    (
                        status,
                        json!({"accepted": r.accepted, "rejected": r.rejected, "errors": r.errors,
                            "errorsOmitted": r.errors_omitted}),
                    )
                }
                Err(f) => {
                    if let Some(s) = span {
                        s.end(f.status.as_u16(), None);
                    }
                    let mut body = super::error_value(f.status, None, &f.message);
                    body["error"]["stored"] = json!(f.stored);
                    (f.status, body)
                }
            };
            json_reply(status, &body)
        }
        (Method::GET, ["v1", "dataflows"]) => {
            let all: Vec<serde_json::Value> = all_dataflows(engine, cfg)
                .await
                .iter()
                .map(|(d, src)| dataflow_doc(d, src))
                .collect();
            json_reply(StatusCode::OK, &json!({ "dataflows": all }))
        }
        (Method::GET, ["v1", "dataflows", name]) => {
            match all_dataflows(engine, cfg)
                .await
                .into_iter()
                .find(|(d, _)| d.name == *name)
            {
                Some((df, src)) => json_reply(StatusCode::OK, &dataflow_doc(&df, src)),
                None => error_reply(StatusCode::NOT_FOUND, format!("no dataflow named '{name}'")),
            }
        }
        (Method::PUT, ["v1", "dataflows", name]) => {
            let name = name.to_string();
            let body = match read_body(req.into_body(), 1024 * 1024).await {
                Ok(b) => b,
                Err(reply) => return reply,
            };
            let df: crate::config::Dataflow = match serde_json::from_slice(&body) {
                Ok(d) => d,
                Err(e) => {
                    return error_reply(StatusCode::UNPROCESSABLE_ENTITY, format!("not a dataflow: {e}"))
                }
            };
            if df.name != name {
                return error_reply(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "the body's name differs from the URL's",
                );
            }
            match engine.put_dataflow(df.clone()).await {
                Ok(()) => json_reply(StatusCode::OK, &dataflow_doc(&df, "api")),
                Err(e @ crate::export::engine::DataflowChange::Conflict(_)) => {
                    error_reply(StatusCode::CONFLICT, e)
                }
                Err(crate::export::engine::DataflowChange::Invalid(issues)) => {
                    let mut body =
                        super::error_value(StatusCode::UNPROCESSABLE_ENTITY, None, "invalid dataflow");
                    body["error"]["issues"] = json!(issues);
                    json_reply(StatusCode::UNPROCESSABLE_ENTITY, &body)
                }
                Err(e) => error_reply(StatusCode::SERVICE_UNAVAILABLE, e),
            }
        }
        (Method::DELETE, ["v1", "dataflows", name]) => match engine.delete_dataflow(name).await {
            Ok(true) => json_reply(StatusCode::OK, &json!({ "deleted": name })),
            Ok(false) => error_reply(
                StatusCode::NOT_FOUND,
                format!("no API-managed dataflow named '{name}'"),
            ),
            Err(e @ crate::export::engine::DataflowChange::Conflict(_)) => {
                error_reply(StatusCode::CONFLICT, e)
            }
            Err(e) => error_reply(StatusCode::SERVICE_UNAVAILABLE, e),
        },
        (Method::GET, ["v1", "status"]) => match engine.dataflow_statuses().await {
            Ok(all) => json_reply(StatusCode::OK, &json!({ "dataflows": all })),
            Err(e) => error_reply(StatusCode::SERVICE_UNAVAILABLE, e),
        },
        (Method::GET, ["v1", "dataflows", name, "status"]) => match engine.dataflow_statuses().await {
            Ok(all) => match all.into_iter().find(|s| s.dataflow == *name) {
                Some(s) => json_reply(StatusCode::OK, &json!(s)),
                None => error_reply(StatusCode::NOT_FOUND, format!("no dataflow named '{name}'")),
            },
            Err(e) => error_reply(StatusCode::SERVICE_UNAVAILABLE, e),
        },
        (Method::POST, ["v1", "dataflows", name, "render"]) => {
            let name = name.to_string();
            let body = match read_body(req.into_body(), MAX_INGEST_BODY).await {
                Ok(b) => b,
                Err(reply) => return reply,
            };
            let Some(df) = all_dataflows(engine, cfg)
                .await
                .into_iter()
                .find(|(d, _)| d.name == name)
            else {
                return error_reply(StatusCode::NOT_FOUND, format!("no dataflow named '{name}'"));
            };
            let profiles = (!body.is_empty()).then_some(&body[..]);
            match crate::export::engine::preview(cfg, &df.0, profiles) {
                Ok(requests) => json_reply(StatusCode::OK, &json!({ "requests": requests })),
                Err(e) => error_reply(StatusCode::UNPROCESSABLE_ENTITY, e),
            }
        }
        (Method::POST, ["v1", "dataflows", name, action @ ("pause" | "resume")]) => {
            let name = name.to_string();
            let pause = *action == "pause";
            let body = match read_body(req.into_body(), 16 * 1024).await {
                Ok(b) => b,
                Err(reply) => return reply,
            };
            let message = if body.is_empty() {
                None
            } else {
                #[derive(serde::Deserialize)]
                #[serde(deny_unknown_fields)]
                struct PauseBody {
                    message: Option<String>,
                }
                match serde_json::from_slice::<PauseBody>(&body) {
                    Ok(b) => b.message,
                    Err(e) => {
                        return error_reply(
                            StatusCode::UNPROCESSABLE_ENTITY,
                            format!("expected {{\"message\": \"…\"}} or no body: {e}"),
                        )
                    }
                }
            };
            let done = if pause {
                engine
                    .pause_dataflow(&name, message)
                    .await
                    .map(|p| json!({ "paused": p }))
            } else {
                engine
                    .resume_dataflow(&name)
                    .await
                    .map(|was| json!({ "dataflow": name, "resumed": was }))
            };
            match done {
                Ok(v) => json_reply(StatusCode::OK, &v),
                Err(e @ EngineError::UnknownDataflow(_)) => error_reply(StatusCode::NOT_FOUND, e),
                Err(e) => error_reply(StatusCode::SERVICE_UNAVAILABLE, e),
            }
        }
        (Method::GET, ["v1", "dead-letters"]) => {
            let filter = match FilterParams::from_query(req.uri().query()).and_then(|p| p.filter()) {
                Ok((filter, _)) => filter,
                Err(e) => return error_reply(StatusCode::BAD_REQUEST, e),
            };
            let store = engine.store();
            match tokio::task::spawn_blocking(move || store.dead_letters_where(&filter)).await {
                Ok(Ok(list)) => json_reply(StatusCode::OK, &json!({"deadLetters": list})),
                Ok(Err(e)) => error_reply(StatusCode::SERVICE_UNAVAILABLE, e),
                Err(e) => error_reply(StatusCode::INTERNAL_SERVER_ERROR, e),
            }
        }
        (Method::POST, ["v1", "dead-letters", "replay"]) => {
            let query = req.uri().query().map(str::to_owned);
            let body = match read_body(req.into_body(), 64 * 1024).await {
                Ok(b) => b,
                Err(reply) => return reply,
            };
            let params = match (query.as_deref().filter(|q| !q.is_empty()), body.is_empty()) {
                (Some(_), false) => {
                    return error_reply(
                        StatusCode::BAD_REQUEST,
                        "give the filters in the query or in the body, not both",
                    )
                }
                (q, true) => FilterParams::from_query(q),
                (None, false) => serde_json::from_slice::<FilterParams>(&body)
                    .map_err(|e| format!("the body is not a dead-letter filter: {e}")),
            };
            let (filter, all) = match params.and_then(|p| p.filter()) {
                Ok(f) => f,
                Err(e) => return error_reply(StatusCode::BAD_REQUEST, e),
            };
            if !all && !filter.selects() {
                return error_reply(
                    StatusCode::BAD_REQUEST,
                    "give filters (dataflow, class, since, until), or all=true to replay every dead letter",
                );
            }
            match engine
                .replay_dead_letters(&filter, ReplayTrigger::Api, |_, _| {})
                .await
            {
                Ok(summary) => json_reply(StatusCode::OK, &json!(summary)),
                Err(e) => error_reply(StatusCode::SERVICE_UNAVAILABLE, e),
            }
        }
        (Method::GET, ["v1", "dead-letters", id]) => {
            match id.parse::<i64>().map(|id| engine.store().dead_letter(id)) {
                Ok(Ok(Some(d))) => json_reply(StatusCode::OK, &json!(d)),
                Ok(Ok(None)) => error_reply(StatusCode::NOT_FOUND, "no such dead letter"),
                Ok(Err(e)) => error_reply(StatusCode::SERVICE_UNAVAILABLE, e),
                Err(_) => error_reply(StatusCode::BAD_REQUEST, "a dead letter id is a number"),
            }
        }
        (Method::DELETE, ["v1", "dead-letters", id]) => {
            match id.parse::<i64>().map(|id| engine.store().remove_dead_letter(id)) {
                Ok(Ok(true)) => json_reply(StatusCode::OK, &json!({"purged": true})),
                Ok(Ok(false)) => error_reply(StatusCode::NOT_FOUND, "no such dead letter"),
                Ok(Err(e)) => error_reply(StatusCode::SERVICE_UNAVAILABLE, e),
                Err(_) => error_reply(StatusCode::BAD_REQUEST, "a dead letter id is a number"),
            }
        }
        (Method::POST, ["v1", "dead-letters", id, "replay"]) => {
            let Ok(id) = id.parse::<i64>() else {
                return error_reply(StatusCode::BAD_REQUEST, "a dead letter id is a number");
            };
            match engine.replay_dead_letter(id, ReplayTrigger::Api).await {
                Ok(Ok(())) => json_reply(StatusCode::OK, &json!({"id": id, "delivered": true})),
                Ok(Err(e)) => json_reply(
                    StatusCode::BAD_GATEWAY,
                    &json!({"id": id, "delivered": false, "error": e}),
                ),
                Err(e @ (EngineError::NoDeadLetter(_) | EngineError::NoDataflow { .. })) => {
                    error_reply(StatusCode::NOT_FOUND, e)
                }
                Err(e) => error_reply(StatusCode::SERVICE_UNAVAILABLE, e),
            }
        }
        (Method::GET, ["metrics"]) => {
            let format = crate::metrics::Format::from_accept(
                req.headers()
                    .get(http::header::ACCEPT)
                    .and_then(|v| v.to_str().ok()),
            );
            let mut r = http::Response::new(http_body_util::Full::new(bytes::Bytes::from(
                engine.metrics_text_as(format).await,
            )));
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static(format.content_type()),
            );
            r
        }
        _ => error_reply(StatusCode::NOT_FOUND, "no such resource"),
    }
}

/// Dead letters listed or replayed at once, when the request does not say.
const DEFAULT_DEAD_LETTER_LIMIT: usize = 1000;
/// The most a request may ask for.
const MAX_DEAD_LETTER_LIMIT: usize = 10_000;

/// Dead-letter filters as a request gives them: in the query string
/// (`?class=unavailable&since=2h&dataflow=crm`) or, for a bulk replay, as a JSON body.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FilterParams {
    dataflow: Option<String>,
    class: Option<String>,
    /// RFC 3339, or a duration back from now (`10m`, `2h`).
    since: Option<String>,
    until: Option<String>,
    limit: Option<usize>,
    /// Ids above this one only (paging).
    after: Option<i64>,
    /// Replay every dead letter (a bulk replay with no filter must say so).
    all: Option<bool>,
}

impl FilterParams {
    fn from_query(query: Option<&str>) -> Result<FilterParams, String> {
        let mut p = FilterParams::default();
        for (name, value) in url::form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
            let value = value.into_owned();
            let taken = match name.as_ref() {
                "dataflow" => p.dataflow.replace(value).is_some(),
                "class" => p.class.replace(value).is_some(),
                "since" => p.since.replace(value).is_some(),
                "until" => p.until.replace(value).is_some(),
                "limit" => {
                    let n = value
                        .parse()
                        .map_err(|_| format!("limit: '{value}' is not a count"))?;
                    p.limit.replace(n).is_some()
                }
                "after" => {
                    let n = value
                        .parse()
                        .map_err(|_| format!("after: '{value}' is not a dead letter id"))?;
                    p.after.replace(n).is_some()
                }
                "all" => {
                    let b = value
                        .parse()
                        .map_err(|_| format!("all: '{value}' is not true or false"))?;
                    p.all.replace(b).is_some()
                }
                other => {
                    return Err(format!(
                        "unknown query parameter '{other}' (expected dataflow, class, since, until, limit, after or all)"
                    ))
                }
            };
            if taken {
                return Err(format!("query parameter '{name}' is given twice"));
            }
        }
        Ok(p)
    }

    /// The store filter, and whether every dead letter was asked for.
    fn filter(self) -> Result<(DeadLetterFilter, bool), String> {
        let now = crate::store::now_ms();
        let time = |name: &str, v: Option<String>| {
            v.map(|s| crate::store::parse_time_or_ago(&s, now).map_err(|e| format!("{name}: {e}")))
                .transpose()
        };
        let limit = self.limit.unwrap_or(DEFAULT_DEAD_LETTER_LIMIT);
        if limit == 0 || limit > MAX_DEAD_LETTER_LIMIT {
            return Err(format!(
                "limit: {limit} is not between 1 and {MAX_DEAD_LETTER_LIMIT}"
            ));
        }
        let filter = DeadLetterFilter {
            dataflow: self.dataflow,
            class: self
                .class
                .map(|c| c.parse().map_err(|e| format!("class: {e}")))
                .transpose()?,
            since_ms: time("since", self.since)?,
            until_ms: time("until", self.until)?,
            after_id: self.after,
            limit,
        };
        Ok((filter, self.all.unwrap_or(false)))
    }
}

/// A dataflow as the API shows it: settings, never secrets.
/// Configured and API-managed dataflows, with where each comes from.
async fn all_dataflows(engine: &Engine, cfg: &Config) -> Vec<(crate::config::Dataflow, &'static str)> {
    let mut out: Vec<_> = cfg.dataflows.iter().map(|d| (d.clone(), "config")).collect();
    for (_, json) in engine.api_dataflows().await.unwrap_or_default() {
        if let Ok(d) = serde_json::from_str::<crate::config::Dataflow>(&json) {
            out.push((d, "api"));
        }
    }
    out
}

/// A dataflow as the API shows it: settings, never secrets (only where they are read from).
fn dataflow_doc(df: &crate::config::Dataflow, source: &str) -> serde_json::Value {
    json!({
        "source": source,
        "name": df.name, "endpoint": df.endpoint, "mtls": df.mtls, "timeout": df.timeout,
        "auth": df.auth.kind(), "includeSegmentNames": df.include_segment_names,
        "includeSegmentTimestamps": df.include_segment_timestamps,
        "attributes": df.attributes.iter().map(|a| json!({"source": a.source, "target": a.target})).collect::<Vec<_>>(),
        "segments": df.segments, "maxAttempts": df.max_attempts,
        "signed": df.signing_secret_env.is_some() || df.signing_secret_file.is_some() || df.signing_secret_ref.is_some(),
    })
}
