//! OpenTelemetry traces over OTLP/HTTP (protobuf), off unless `[telemetry] otlp_endpoint` is
//! set: a span per ingest request, per delivery attempt and per sidecar request.
//!
//! Every span site asks [`tracer`] first (one atomic load) and builds no attribute when it is
//! `None`. Spans are batched by the SDK's processor thread and posted by [`OtlpClient`], our
//! own hyper client on the gateway's runtime with the gateway's rustls, so no second HTTP or
//! TLS stack comes in.
//!
//! What a span never carries: a header value, a query value, a token, a payload, a profile
//! id. URLs are reduced by [`redacted_url`] before they become `url.full`.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use opentelemetry::trace::{Span as _, SpanKind, Status, Tracer as _, TracerProvider as _};
use opentelemetry::KeyValue;
use opentelemetry_http::{HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{Protocol, WithExportConfig as _, WithHttpConfig as _};
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider, Span};
use opentelemetry_sdk::Resource;

use crate::config::Config;
use crate::delivery::{ErrorKind, PeerInfo};

/// The tracer of this process, set once when `[telemetry]` is configured.
static TRACER: OnceLock<SdkTracer> = OnceLock::new();

/// The tracer when traces are on; `None` (the cheap check every span site makes first)
/// when they are off.
#[inline]
pub fn tracer() -> Option<&'static SdkTracer> {
    TRACER.get()
}

/// The running exporter; [`Telemetry::shutdown`] sends what is still batched.
pub struct Telemetry {
    provider: SdkTracerProvider,
}

impl Telemetry {
    /// Start exporting when `[telemetry] otlp_endpoint` is set (`Ok(None)` when it is not).
    /// Must run on the gateway's Tokio runtime: exports are posted on it.
    pub fn start(cfg: &Config) -> Result<Option<Telemetry>, String> {
        let t = &cfg.telemetry;
        let Some(endpoint) = &t.otlp_endpoint else {
            return Ok(None);
        };
        let url = url::Url::parse(endpoint).map_err(|e| format!("telemetry.otlp_endpoint: {e}"))?;
        let timeout =
            crate::config::parse_duration(&t.timeout).map_err(|e| format!("telemetry.timeout: {e}"))?;
        let tls = match url.scheme() {
            "https" => {
                let trust = crate::tls::client::Trust::from_optional_file(
                    t.ca.as_ref().map(|c| cfg.path(c)).as_deref(),
                )
                .map_err(|e| format!("telemetry.ca: {e}"))?;
                let tls = crate::tls::client::ClientTlsConfig::new(trust, None, &[b"http/1.1"])
                    .map_err(|e| format!("telemetry: {e}"))?;
                Some(tls.for_connection().0)
            }
            _ => None,
        };
        let mut headers: HashMap<String, String> = t.headers.clone().into_iter().collect();
        for name in t.header_secrets.keys() {
            let value = cfg
                .telemetry_header_value(name)
                .map_err(|e| format!("telemetry.header_secrets.{name}: {e}"))?;
            headers.insert(name.clone(), value.expose().to_owned());
        }
        let client = OtlpClient {
            runtime: tokio::runtime::Handle::current(),
            tls,
            timeout,
        };
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(client)
            .with_endpoint(endpoint.clone())
            .with_protocol(Protocol::HttpBinary)
            .with_timeout(timeout)
            .with_headers(headers)
            .build()
            .map_err(|e| format!("telemetry: {e}"))?;
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(
                Resource::builder()
                    .with_service_name(t.service_name.clone())
                    .build(),
            )
            .build();
        if TRACER.set(provider.tracer("sallyport")).is_err() {
            let _ = provider.shutdown();
            return Err("telemetry: traces were already set up in this process".into());
        }
        eprintln!("sallyport: traces to {} (OTLP/HTTP)", redacted_url(&url));
        Ok(Some(Telemetry { provider }))
    }

    /// Export what is batched and stop (at most 5 s). Blocks a thread of its own, not the
    /// runtime whose tasks post the last batch.
    pub async fn shutdown(self) {
        let provider = self.provider;
        let done =
            tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(Duration::from_secs(5))).await;
        match done {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "traces: the last export failed"),
            Err(e) => tracing::warn!(error = %e, "traces: shutting the exporter down failed"),
        }
    }
}

/// The trace id of `span` as 32 lower-case hex digits (the W3C form), as audit records keep it.
fn trace_id_of(span: &Span) -> String {
    span.span_context().trace_id().to_string()
}

/// `url` as a span may carry it: no user info, no fragment, and each query value replaced by
/// `REDACTED` (keys kept; a bare element without `=` becomes `REDACTED`).
pub fn redacted_url(url: &url::Url) -> String {
    let mut u = url.clone();
    let _ = u.set_username("");
    let _ = u.set_password(None);
    u.set_fragment(None);
    if let Some(q) = url.query() {
        let redacted: Vec<String> = q
            .split('&')
            .filter(|part| !part.is_empty())
            .map(|part| match part.split_once('=') {
                Some((k, _)) => format!("{k}=REDACTED"),
                None => "REDACTED".to_owned(),
            })
            .collect();
        u.set_query(Some(&redacted.join("&")));
    }
    u.to_string()
}

/// A span around one outbound HTTP request (a delivery attempt, a sidecar request), with the
/// stable HTTP client semantic conventions.
pub struct HttpSpan {
    span: Span,
    trace_id: String,
}

/// What a finished outbound request came to.
pub struct HttpOutcome<'a> {
    /// Earlier tries of the same request (`attempt - 1`).
    pub resend_count: u32,
    pub status: Option<u16>,
    pub peer: Option<&'a PeerInfo>,
    pub error: Option<ErrorKind>,
}

impl HttpSpan {
    /// Start a client span for `method url` as `client` sends it (its configured query
    /// appended), owned by the dataflow or route `owner` (`owner_key`: `sallyport.dataflow` or
    /// `sallyport.route`). `None`, with nothing built, when traces are off.
    pub fn client(
        owner_key: &'static str,
        owner: &str,
        client: &crate::delivery::DeliveryClient,
        method: &http::Method,
        url: &url::Url,
    ) -> Option<HttpSpan> {
        let tracer = tracer()?;
        let mut sent = url.clone();
        client.append_query(&mut sent);
        let url = &sent;
        let mut attributes = Vec::with_capacity(6);
        attributes.push(KeyValue::new("http.request.method", method.as_str().to_owned()));
        if let Some(host) = url.host_str() {
            attributes.push(KeyValue::new(
                "server.address",
                host.trim_matches(['[', ']']).to_owned(),
            ));
        }
        if let Some(port) = url.port_or_known_default() {
            attributes.push(KeyValue::new("server.port", i64::from(port)));
        }
        attributes.push(KeyValue::new("url.full", redacted_url(url)));
        attributes.push(KeyValue::new(owner_key, owner.to_owned()));
        let span = tracer
            .span_builder(method.as_str().to_owned())
            .with_kind(SpanKind::Client)
            .with_attributes(attributes)
            .start(tracer);
        let trace_id = trace_id_of(&span);
        Some(HttpSpan { span, trace_id })
    }

    /// The span's trace id (32 hex digits), for the audit record.
    pub fn trace_id(&self) -> &str {
        &self.trace_id
    }

    /// Record how the request went and end the span.
    pub fn end(mut self, outcome: HttpOutcome<'_>) {
        let s = &mut self.span;
        s.set_attribute(KeyValue::new(
            "http.request.resend_count",
            i64::from(outcome.resend_count),
        ));
        if let Some(status) = outcome.status {
            s.set_attribute(KeyValue::new("http.response.status_code", i64::from(status)));
        }
        if let Some(p) = outcome.peer {
            for kv in tls_attributes(p) {
                s.set_attribute(kv);
            }
        }
        if let Some(kind) = outcome.error {
            // The conventions' error.type: the status code when the receiver answered with
            // an error status, else our error kind; the kind is always kept beside it.
            let error_type = match (kind, outcome.status) {
                (ErrorKind::HttpStatus, Some(code)) => code.to_string(),
                _ => kind.as_str().to_owned(),
            };
            s.set_attribute(KeyValue::new("error.type", error_type));
            s.set_attribute(KeyValue::new("sallyport.error.kind", kind.as_str()));
            s.set_status(Status::error(kind.as_str()));
        }
        s.end();
    }
}

/// The connection's facts as span attributes: TLS version and cipher suite (IANA name), the
/// receiver certificate's SHA-256 (upper-case hex, no separators), whether the receiver asked
/// for a client certificate and whether we sent one, the peer address and HTTP version.
pub fn tls_attributes(p: &PeerInfo) -> Vec<KeyValue> {
    let mut out = Vec::with_capacity(8);
    out.push(KeyValue::new("tls.protocol.name", "tls"));
    if let Some(v) = tls_version(&p.tls_version) {
        out.push(KeyValue::new("tls.protocol.version", v));
    }
    if !p.cipher_suite.is_empty() {
        out.push(KeyValue::new("tls.cipher", iana_cipher(&p.cipher_suite)));
    }
    if let Some(c) = &p.server_certificate {
        out.push(KeyValue::new(
            "tls.server.hash.sha256",
            c.sha256_fingerprint.replace(':', ""),
        ));
    }
    out.push(KeyValue::new(
        "sallyport.tls.client_certificate_requested",
        p.client_cert_requested,
    ));
    out.push(KeyValue::new(
        "sallyport.tls.client_certificate_presented",
        p.client_cert_presented,
    ));
    out.push(KeyValue::new(
        "network.peer.address",
        p.remote_addr.ip().to_string(),
    ));
    out.push(KeyValue::new(
        "network.protocol.version",
        if p.alpn.as_deref() == Some("h2") {
            "2"
        } else {
            "1.1"
        },
    ));
    out
}

/// `TLSv1_3` (rustls' name) → `1.3`.
fn tls_version(v: &str) -> Option<&'static str> {
    match v {
        "TLSv1_3" => Some("1.3"),
        "TLSv1_2" => Some("1.2"),
        _ => None,
    }
}

/// rustls names TLS 1.3 suites `TLS13_…`; the IANA registry (and the conventions) `TLS_…`.
fn iana_cipher(suite: &str) -> String {
    match suite.strip_prefix("TLS13_") {
        Some(rest) => format!("TLS_{rest}"),
        None => suite.to_owned(),
    }
}

/// The span of one ingest request on the admin listener. Ends when dropped (without a
/// status) or by [`IngestSpan::end`].
pub struct IngestSpan(Span);

impl IngestSpan {
    /// `None` when traces are off.
    pub fn start() -> Option<IngestSpan> {
        let tracer = tracer()?;
        let span = tracer
            .span_builder("POST /v1/profiles")
            .with_kind(SpanKind::Server)
            .with_attributes([
                KeyValue::new("http.request.method", "POST"),
                KeyValue::new("http.route", "/v1/profiles"),
                KeyValue::new("url.path", "/v1/profiles"),
            ])
            .start(tracer);
        Some(IngestSpan(span))
    }

    /// The response status, and the counts of accepted and rejected lines when the batch was
    /// read.
    pub fn end(mut self, status: u16, counts: Option<(usize, usize)>) {
        let s = &mut self.0;
        s.set_attribute(KeyValue::new("http.response.status_code", i64::from(status)));
        if let Some((accepted, rejected)) = counts {
            s.set_attribute(KeyValue::new("sallyport.ingest.accepted", accepted as i64));
            s.set_attribute(KeyValue::new("sallyport.ingest.rejected", rejected as i64));
        }
        if status >= 500 {
            s.set_attribute(KeyValue::new("error.type", status.to_string()));
            s.set_status(Status::error("the batch was not stored"));
        }
        s.end();
    }
}

/// Largest collector response read.
const MAX_RESPONSE: usize = 4 * 1024 * 1024;

/// Posts OTLP exports with hyper over the gateway's runtime (rustls for `https://`): one
/// connection per export, which comes every few seconds at most.
#[derive(Debug)]
struct OtlpClient {
    runtime: tokio::runtime::Handle,
    tls: Option<Arc<rustls::ClientConfig>>,
    timeout: Duration,
}

#[async_trait::async_trait]
impl HttpClient for OtlpClient {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        // The SDK's processor thread drives this future without a Tokio context: the
        // request runs as a task on the runtime, and its handle is awaited here.
        let (tls, timeout) = (self.tls.clone(), self.timeout);
        let task = self
            .runtime
            .spawn(async move { tokio::time::timeout(timeout, post(request, tls)).await });
        match task.await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(format!("no answer within {}", humantime::format_duration(timeout)).into()),
            Err(e) => Err(Box::new(e)),
        }
    }
}

/// A stream hyper can speak HTTP/1.1 over: TCP, or TLS over TCP.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

async fn post(
    request: Request<Bytes>,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> Result<Response<Bytes>, HttpError> {
    let (mut parts, body) = request.into_parts();
    let host = parts
        .uri
        .host()
        .ok_or("the OTLP endpoint has no host")?
        .to_owned();
    let https = parts.uri.scheme_str() == Some("https");
    let port = parts.uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let bare = host.trim_matches(['[', ']']).to_owned();
    let tcp = tokio::net::TcpStream::connect((bare.as_str(), port)).await?;
    let _ = tcp.set_nodelay(true);
    let io: Box<dyn Io> = match (https, tls) {
        (true, Some(cfg)) => {
            let name = rustls_pki_types::ServerName::try_from(bare)?;
            Box::new(tokio_rustls::TlsConnector::from(cfg).connect(name, tcp).await?)
        }
        (true, None) => return Err("an https OTLP endpoint without a TLS config".into()),
        (false, _) => Box::new(tcp),
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    let conn = tokio::spawn(conn);
    let authority = parts
        .uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .ok_or("the OTLP endpoint has no host")?;
    parts
        .headers
        .insert(http::header::HOST, http::HeaderValue::from_str(&authority)?);
    parts.uri = parts.uri.path_and_query().map_or("/", |p| p.as_str()).parse()?;
    let response = sender
        .send_request(http::Request::from_parts(parts, Full::new(body)))
        .await?;
    let (parts, body) = response.into_parts();
    let body = Limited::new(body, MAX_RESPONSE).collect().await?.to_bytes();
    drop(sender);
    let _ = conn.await;
    Ok(Response::from_parts(parts, body))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn query_values_user_info_and_fragments_never_reach_url_full() {
        let u = url::Url::parse("https://user:pw@hooks.example:8443/in?token=s3cret&v=1&bare#frag").unwrap();
        assert_eq!(
            redacted_url(&u),
            "https://hooks.example:8443/in?token=REDACTED&v=REDACTED&REDACTED"
        );
        let plain = url::Url::parse("https://hooks.example/in").unwrap();
        assert_eq!(redacted_url(&plain), "https://hooks.example/in");
    }

    #[test]
    fn tls_names_follow_the_conventions() {
        assert_eq!(tls_version("TLSv1_3"), Some("1.3"));
        assert_eq!(tls_version("TLSv1_2"), Some("1.2"));
        assert_eq!(iana_cipher("TLS13_AES_256_GCM_SHA384"), "TLS_AES_256_GCM_SHA384");
        assert_eq!(
            iana_cipher("TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256"),
            "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256"
        );
    }

    #[test]
    fn without_telemetry_no_span_is_made() {
        // No test in this binary starts a tracer.
        assert!(tracer().is_none());
        assert!(IngestSpan::start().is_none());
    }
}
