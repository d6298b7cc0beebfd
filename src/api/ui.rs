//! The status page, `/ui` on the admin listener only: every dataflow's state and numbers,
//! dead letters with a replay button, pause and resume, client identities, egress addresses,
//! sidecar routes and the latest audit records' metadata.
//!
//! Login: the admin token, posted once to `/ui/login`, is exchanged for a random login
//! session id in an `HttpOnly; SameSite=Strict; Path=/ui` cookie (sessions in memory, 12 h).
//! Every action is a POST carrying the login session's CSRF token in a hidden field, and is
//! refused when `Origin` or `Sec-Fetch-Site` says it comes from another site.
//!
//! Must never: render a payload, a credential or a token; accept a GET that changes
//! anything; answer on the public listener.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use maud::{html, Markup, PreEscaped, DOCTYPE};

use super::admin::TokenCheck;
use super::{read_body, Reply};
use crate::audit::ReplayTrigger;
use crate::config::Config;
use crate::export::Engine;
use crate::status::{Overview, RateMeter};

/// The login session cookie's name.
pub const COOKIE: &str = "sallyport_ui";
/// How long a login session lasts.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// Login sessions held at once; the oldest goes when a new one would pass this.
const MAX_SESSIONS: usize = 1024;

struct LoginSession {
    csrf: String,
    expires: Instant,
}

/// The status page's state: login sessions (keyed by the SHA-256 of their id, so a lookup
/// compares digests, not the secret) and the delivered-rate meter.
pub struct Ui {
    sessions: Mutex<HashMap<Vec<u8>, LoginSession>>,
    pub rates: RateMeter,
    rng: ring::rand::SystemRandom,
}

impl Default for Ui {
    fn default() -> Self {
        Ui {
            sessions: Mutex::new(HashMap::new()),
            rates: RateMeter::default(),
            rng: ring::rand::SystemRandom::new(),
        }
    }
}

fn digest(id: &str) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, id.as_bytes())
        .as_ref()
        .to_vec()
}

impl Ui {
    fn random(&self) -> Option<String> {
        use base64::Engine as _;
        use ring::rand::SecureRandom;
        let mut b = [0u8; 32];
        self.rng.fill(&mut b).ok()?;
        Some(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b))
    }

    /// A new login session: (id, CSRF token).
    fn open(&self) -> Option<(String, String)> {
        let (id, csrf) = (self.random()?, self.random()?);
        let mut s = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        s.retain(|_, v| v.expires > now);
        if s.len() >= MAX_SESSIONS {
            if let Some(oldest) = s.iter().min_by_key(|(_, v)| v.expires).map(|(k, _)| k.clone()) {
                s.remove(&oldest);
            }
        }
        s.insert(
            digest(&id),
            LoginSession {
                csrf: csrf.clone(),
                expires: now + SESSION_TTL,
            },
        );
        Some((id, csrf))
    }

    /// The CSRF token of the live login session named by `req`'s cookie.
    fn session(&self, req: &Request<Incoming>) -> Option<(Vec<u8>, String)> {
        let id = cookie(req, COOKIE)?;
        let key = digest(&id);
        let s = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        s.get(&key)
            .filter(|v| v.expires > Instant::now())
            .map(|v| (key, v.csrf.clone()))
    }

    fn close(&self, key: &[u8]) {
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
    }
}

fn cookie(req: &Request<Incoming>, name: &str) -> Option<String> {
    req.headers()
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}

/// Equal in constant time (for the CSRF token).
fn same(a: &str, b: &str) -> bool {
    let (a, b) = (digest(a), digest(b));
    a.iter().zip(&b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether the request may come from another site: `Sec-Fetch-Site` other than
/// `same-origin`/`none`, or an `Origin` whose host is not the `Host` we were reached at.
fn cross_site(req: &Request<Incoming>) -> bool {
    let h = |n: &str| req.headers().get(n).and_then(|v| v.to_str().ok());
    if let Some(site) = h("sec-fetch-site") {
        if site != "same-origin" && site != "none" {
            return true;
        }
    }
    if let Some(origin) = h("origin") {
        let host = h("host").unwrap_or("");
        let origin_host = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"));
        return origin_host != Some(host);
    }
    false
}

fn page(status: StatusCode, body: Markup) -> Reply {
    let mut r = http::Response::new(Full::new(Bytes::from(body.into_string())));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY, // `no-referrer` would make browsers send `Origin: null` on our own forms.
        HeaderValue::from_static("same-origin"),
    );
    h.insert("x-content-type-options", HeaderValue::from_static("nosniff"));
    r
}

fn see_other(to: &'static str) -> Reply {
    let mut r = page(StatusCode::SEE_OTHER, html! {});
    r.headers_mut()
        .insert(header::LOCATION, HeaderValue::from_static(to));
    r
}

fn refused(status: StatusCode, why: &str) -> Reply {
    page(status, layout("Refused", html! { p.err { (why) } }))
}

/// Answer a request under `/ui`.
pub async fn route(
    req: Request<Incoming>,
    ui: &Ui,
    tokens: &TokenCheck,
    engine: &Engine,
    cfg: &Config,
) -> Reply {
    let path = req.uri().path().to_owned();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let method = req.method().clone();
    if method == Method::POST && cross_site(&req) {
        return refused(StatusCode::FORBIDDEN, "cross-site request refused");
    }
    match (method, segments.as_slice()) {
        (Method::GET, ["ui", "login"]) => page(StatusCode::OK, login_form(None)),
        (Method::POST, ["ui", "login"]) => {
            if !tokens.configured() {
                return refused(
                    StatusCode::FORBIDDEN,
                    "the admin API is disabled: no admin token is configured",
                );
            }
            let Ok(body) = read_body(req.into_body(), 16 * 1024).await else {
                return refused(StatusCode::PAYLOAD_TOO_LARGE, "the form is too large");
            };
            let token = form_field(&body, "token").unwrap_or_default();
            if !tokens.accepts(&token) {
                return page(
                    StatusCode::UNAUTHORIZED,
                    login_form(Some("That token is not valid.")),
                );
            }
            let Some((id, _)) = ui.open() else {
                return refused(StatusCode::SERVICE_UNAVAILABLE, "no system randomness");
            };
            let mut r = see_other("/ui");
            if let Ok(v) = HeaderValue::from_str(&format!(
                "{COOKIE}={id}; HttpOnly; SameSite=Strict; Path=/ui; Max-Age={}",
                SESSION_TTL.as_secs()
            )) {
                r.headers_mut().insert(header::SET_COOKIE, v);
            }
            r
        }
        (Method::GET, ["ui"]) => {
            let Some((_, csrf)) = ui.session(&req) else {
                return see_other("/ui/login");
            };
            let notice = req.uri().query().and_then(notice);
            match crate::status::overview(engine, cfg, &ui.rates).await {
                Ok(o) => page(StatusCode::OK, status_page(&o, &csrf, notice)),
                Err(e) => {
                    tracing::error!(error = %e, "the status page could not be gathered");
                    refused(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "the store did not answer; try again",
                    )
                }
            }
        }
        (Method::POST, rest) => {
            let Some((key, csrf)) = ui.session(&req) else {
                return refused(StatusCode::UNAUTHORIZED, "log in first");
            };
            let rest: Vec<String> = rest.iter().map(|s| (*s).to_owned()).collect();
            let Ok(body) = read_body(req.into_body(), 16 * 1024).await else {
                return refused(StatusCode::PAYLOAD_TOO_LARGE, "the form is too large");
            };
            if !form_field(&body, "csrf").is_some_and(|t| same(&t, &csrf)) {
                return refused(StatusCode::FORBIDDEN, "the form's CSRF token is missing or wrong");
            }
            let rest: Vec<&str> = rest.iter().map(String::as_str).collect();
            act(&rest, ui, &key, engine).await
        }
        _ => refused(StatusCode::NOT_FOUND, "no such page"),
    }
}

/// A checked action; answers with a redirect to the page and a fixed notice.
async fn act(path: &[&str], ui: &Ui, key: &[u8], engine: &Engine) -> Reply {
    match path {
        ["ui", "logout"] => {
            ui.close(key);
            let mut r = see_other("/ui/login");
            r.headers_mut().insert(
                header::SET_COOKIE,
                HeaderValue::from_static("sallyport_ui=; HttpOnly; SameSite=Strict; Path=/ui; Max-Age=0"),
            );
            r
        }
        ["ui", "dead-letters", id, "replay"] => {
            let Ok(id) = id.parse::<i64>() else {
                return refused(StatusCode::BAD_REQUEST, "a dead letter id is a number");
            };
            match engine.replay_dead_letter(id, ReplayTrigger::Api).await {
                Ok(Ok(())) => see_other("/ui?n=replayed"),
                Ok(Err(_)) => see_other("/ui?n=replay-failed"),
                Err(crate::export::engine::EngineError::NoDeadLetter(_)) => see_other("/ui?n=gone"),
                Err(e) => {
                    tracing::error!(error = %e, "replay from the status page failed");
                    see_other("/ui?n=error")
                }
            }
        }
        ["ui", "dataflows", name, action @ ("pause" | "resume")] => {
            let done = if *action == "pause" {
                engine
                    .pause_dataflow(name, Some("paused from the status page".into()))
                    .await
                    .map(|_| ())
            } else {
                engine.resume_dataflow(name).await.map(|_| ())
            };
            match done {
                Ok(()) if *action == "pause" => see_other("/ui?n=paused"),
                Ok(()) => see_other("/ui?n=resumed"),
                Err(crate::export::engine::EngineError::UnknownDataflow(_)) => {
                    refused(StatusCode::NOT_FOUND, "no such dataflow")
                }
                Err(e) => {
                    tracing::error!(error = %e, "pause or resume from the status page failed");
                    see_other("/ui?n=error")
                }
            }
        }
        _ => refused(StatusCode::NOT_FOUND, "no such action"),
    }
}

/// The notice named in the query (fixed texts only: nothing from the request is echoed).
fn notice(query: &str) -> Option<&'static str> {
    url::form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "n")
        .and_then(|(_, v)| match v.as_ref() {
            "replayed" => Some("Dead letter replayed and delivered."),
            "replay-failed" => Some("Replay failed; the dead letter stays with this attempt added."),
            "gone" => Some("That dead letter is gone (replayed or purged meanwhile)."),
            "paused" => Some("Dataflow paused."),
            "resumed" => Some("Dataflow resumed."),
            "error" => Some("The action failed; see the gateway's log."),
            _ => None,
        })
}

fn form_field(body: &[u8], name: &str) -> Option<String> {
    url::form_urlencoded::parse(body)
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

const STYLE: &str = "body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}\
table{border-collapse:collapse;margin:.5em 0 1.5em}th,td{border:1px solid #ccc;padding:.25em .5em;text-align:left;vertical-align:top}\
th{background:#f3f3f3}.running{color:#176b1a}.held{color:#8a6d00}.paused{color:#b00020}.err{color:#b00020}\
.notice{background:#eef6ff;padding:.5em}form.inline{display:inline}code{font-size:12px}";

fn layout(title: &str, body: Markup) -> Markup {
    layout_with(title, false, body)
}

fn layout_with(title: &str, refresh: bool, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                // A plain refresh every 5 s: no script on these pages.
                @if refresh { meta http-equiv="refresh" content="5;url=/ui"; }
                title { (title) " · Sallyport" }
                style { (PreEscaped(STYLE)) }
            }
            body { (body) }
        }
    }
}

fn login_form(error: Option<&str>) -> Markup {
    layout(
        "Log in",
        html! {
            h1 { "Sallyport status" }
            @if let Some(e) = error { p.err { (e) } }
            form method="post" action="/ui/login" {
                label { "Admin token " input type="password" name="token" autocomplete="off" required; }
                " "
                button type="submit" { "Log in" }
            }
        },
    )
}

fn when(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| ms.to_string())
}

fn secs(s: Option<f64>) -> String {
    match s {
        None => "–".into(),
        Some(v) if v.is_infinite() => "> 5 s".into(),
        Some(v) => format!("≤ {} ms", v * 1000.0),
    }
}

fn counts(m: &std::collections::BTreeMap<String, u64>) -> String {
    if m.is_empty() {
        return "–".into();
    }
    m.iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn status_page(o: &Overview, csrf: &str, notice: Option<&str>) -> Markup {
    let csrf_field = html! { input type="hidden" name="csrf" value=(csrf); };
    layout_with(
        "Status",
        true,
        html! {
            h1 { "Sallyport status" }
            p {
                "As of " (when(o.generated_at)) ". Ingest → delivered: p50 "
                (format!("{:.1}", o.ingest_to_delivered_p50_ms)) " ms, p99 "
                (format!("{:.1}", o.ingest_to_delivered_p99_ms)) " ms. "
                form.inline method="post" action="/ui/logout" { (csrf_field) button type="submit" { "Log out" } }
            }
            @if let Some(n) = notice { p.notice id="notice" { (n) } }
            h2 { "Dataflows" }
            table id="dataflows" {
                tr { th { "Dataflow" } th { "State" } th { "Delivered" } th { "Per second" } th { "Attempt p50 / p99" }
                     th { "Retried" } th { "Dead" } th { "Failures by class" } th { "By kind" } th { "Outbox" } th { "" } }
                @for f in &o.dataflows {
                    tr data-dataflow=(f.name) {
                        td { (f.name) }
                        td {
                            span class=(f.state) { (f.state) }
                            @if let Some(w) = &f.why { br; small { (w) } }
                            @if let Some(r) = &f.pause_reason { br; small { "by " (r) @if let Some(c) = &f.pause_class { " (" (c) ")" } } }
                            @if let Some(t) = f.paused_since { br; small { "since " (when(t)) } }
                            @if let Some(t) = f.next_probe_at { br; small { "next probe " (when(t)) } }
                            @if let Some(t) = f.held_until { br; small { "held until " (when(t)) } }
                        }
                        td.delivered { (f.delivered) }
                        td { (f.delivered_per_sec.map_or("–".to_owned(), |r| format!("{r:.1}"))) }
                        td { (secs(f.attempt_p50_s)) " / " (secs(f.attempt_p99_s)) }
                        td { (f.retried) }
                        td { (f.dead) }
                        td { (counts(&f.failures_by_class)) }
                        td { (counts(&f.failures_by_kind)) }
                        td { (f.pending) }
                        td {
                            @let action = if f.state == "paused" { "resume" } else { "pause" };
                            form.inline method="post" action=(format!("/ui/dataflows/{}/{action}", f.name)) {
                                (csrf_field)
                                button type="submit" { @if action == "pause" { "Pause" } @else { "Resume" } }
                            }
                        }
                    }
                }
            }
            h2 { "Dead letters" }
            @if o.dead_letters.is_empty() { p { "None." } } @else {
                table id="dead-letters" {
                    tr { th { "Id" } th { "Dataflow" } th { "Profile" } th { "Class" } th { "Attempts" } th { "Last error" } th { "Since" } th { "" } }
                    @for d in &o.dead_letters {
                        tr {
                            td { (d.id) } td { (d.dataflow) } td { (d.profile_id) } td { (d.class) } td { (d.attempts) }
                            td { (d.last_error.as_deref().unwrap_or("–")) } td { (when(d.created_at)) }
                            td {
                                form.inline method="post" action=(format!("/ui/dead-letters/{}/replay", d.id)) {
                                    (csrf_field)
                                    button type="submit" id=(format!("replay-{}", d.id)) { "Replay" }
                                }
                            }
                        }
                    }
                }
            }
            h2 { "Client identities" }
            table id="identities" {
                tr { th { "Identity" } th { "Role" } th { "CN" } th { "SANs" } th { "Expires" } th { "Takes over" } th { "SHA-256" } }
                @for i in &o.identities {
                    tr {
                        td { (i.name) } td { (i.role) } td { (i.cn.as_deref().unwrap_or("–")) } td { (i.sans.join(", ")) }
                        td { (i.not_after) } td { (i.takes_over.as_deref().unwrap_or("–")) } td { code { (i.fingerprint) } }
                    }
                }
            }
            h2 { "Egress addresses" }
            p id="egress" { @if o.egress_ips.is_empty() { "Not pinned (the system chooses)." } @else { (o.egress_ips.join(", ")) } }
            @if !o.sidecar_routes.is_empty() {
                h2 { "Sidecar routes" }
                table id="sidecar" {
                    tr { th { "Listener" } th { "Prefix" } th { "Upstream" } th { "mTLS" } th { "Attempts" } th { "Failed" } }
                    @for r in &o.sidecar_routes { tr { td { (r.listen) } td { (r.prefix) } td { (r.upstream) } td { (r.mtls) } td { (r.attempts) } td { (r.failed) } } }
                }
            }
            h2 { "Latest audit records" }
            table id="audit" {
                tr { th { "Seq" } th { "At" } th { "Dataflow" } th { "Destination" } th { "Attempt" } th { "Outcome" } th { "HTTP" }
                     th { "Error" } th { "Latency" } th { "Trigger" } th { "Trace" } }
                @for a in o.audit.iter().rev() {
                    tr {
                        td { (a.seq) } td { (when(a.at)) } td { (a.dataflow) } td { (a.destination) } td { (a.attempt) }
                        td { (a.outcome) } td { (a.http_status.map_or("–".to_owned(), |s| s.to_string())) }
                        td { (a.error_kind.as_deref().unwrap_or("–")) } td { (format!("{:.1} ms", a.latency_ms)) }
                        td { (a.trigger.as_deref().unwrap_or("–")) } td { code { (a.trace_id.as_deref().unwrap_or("–")) } }
                    }
                }
            }
        },
    )
}

/// The admin handler's `/ui` state.
pub fn state() -> Arc<Ui> {
    Arc::new(Ui::default())
}
