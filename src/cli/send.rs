//! `sallyport send`: one request through the delivery core, curl-like, for operators testing
//! a receiver. Refuses a receiver that is not mTLS-only exactly as dataflows do.

use std::io::Read;
use std::process::ExitCode;

use bytes::Bytes;
use clap::Args;
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use serde_json::json;

use super::target::{allowing_host, configured_destination, operator_core};
use super::{Failure, EXIT_USAGE};
use crate::config::DestinationConfig;
use crate::delivery::{DeliveryClient, DeliveryError, OutboundRequest};

/// Most bytes `--data @file` or `--data -` reads.
const MAX_SEND_BODY: u64 = 64 * 1024 * 1024;

#[derive(Debug, Args)]
pub struct SendArgs {
    /// Receiver URL (https://…).
    pub url: String,
    #[command(flatten)]
    pub target: super::TargetArgs,
    /// HTTP method (default POST with --data, else GET).
    #[arg(short = 'X', long = "request")]
    pub method: Option<String>,
    /// Header 'name: value' (repeatable).
    #[arg(short = 'H', long = "header")]
    pub headers: Vec<String>,
    /// Body: a string, @file, or - for standard input.
    #[arg(short = 'd', long)]
    pub data: Option<String>,
    /// Timeout, e.g. 2s (default: the dataflow's, else 2s).
    #[arg(long)]
    pub timeout: Option<String>,
    /// Deliver even when the receiver does not request a client certificate.
    #[arg(long)]
    pub allow_no_client_auth: bool,
    /// Also allow this destination (host name, *.suffix, IP or CIDR; repeatable). Without
    /// --config, the URL's own host name is allowed; loopback, private and metadata
    /// addresses always need an explicit IP/CIDR here.
    #[arg(long = "allow")]
    pub allow: Vec<String>,
    /// Print status, latency, peer certificate facts and error kind as JSON.
    #[arg(long)]
    pub json: bool,
}

pub(super) async fn run(args: SendArgs) -> ExitCode {
    let json = args.json;
    let (client, request) = match prepare(args) {
        Ok(p) => p,
        Err(f) => {
            if json {
                println!(
                    "{}",
                    json!({"ok": false, "error": {"kind": "usage", "message": f.message}})
                );
            } else {
                eprintln!("sallyport: {}", f.message);
            }
            return ExitCode::from(f.code);
        }
    };
    let outcome = match client.send(request).await {
        Ok(d) => match d.error() {
            Some(error) => Err(FailedSend {
                error,
                delivered: Some(d),
            }),
            None => Ok(d),
        },
        Err(error) => Err(FailedSend {
            error,
            delivered: None,
        }),
    };
    report(outcome, json)
}

struct FailedSend {
    error: DeliveryError,
    delivered: Option<crate::delivery::Delivered>,
}

fn report(outcome: Result<crate::delivery::Delivered, FailedSend>, json: bool) -> ExitCode {
    let delivered = match &outcome {
        Ok(d) => Some(d),
        Err(f) => f.delivered.as_ref(),
    };
    if json {
        let error = outcome.as_ref().err().map(|f| {
            json!({
                "kind": f.error.kind().as_str(),
                "blame": f.error.kind().blame(),
                "retryable": f.error.retryable(),
                "message": f.error.to_string(),
            })
        });
        let doc = json!({
            "ok": outcome.is_ok(),
            "status": delivered.map(|d| d.status.as_u16()),
            "httpVersion": delivered.map(|d| format!("{:?}", d.version)),
            "latencyMs": delivered.map(|d| d.latency.as_secs_f64() * 1000.0),
            "peer": delivered.and_then(|d| d.peer.as_deref()),
            "bodyBytes": delivered.map(|d| d.body.len()),
            "error": error,
        });
        println!("{doc}");
    } else {
        if let Some(d) = delivered {
            use std::io::Write;
            let _ = std::io::stdout().write_all(&d.body);
        }
        if let Err(f) = &outcome {
            eprintln!("sallyport: delivery failed: {}", f.error);
        }
    }
    if outcome.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn prepare(args: SendArgs) -> Result<(DeliveryClient, OutboundRequest), Failure> {
    let url =
        crate::config::check_url(&args.url).map_err(|e| Failure::usage(format!("{}: {e}", args.url)))?;
    if url.scheme() != "https" {
        return Err(Failure::usage(format!("{}: scheme must be https", args.url)));
    }
    if args.target.config.is_some() && !args.allow.is_empty() {
        return Err(Failure::usage(
            "--allow applies without --config; with --config, [egress] decides",
        ));
    }
    let (core, mut destination) = match configured_destination(&args.target)? {
        Some((_, core, d)) => (core, d),
        None => {
            if args.target.client_cert.is_none() && !args.allow_no_client_auth {
                return Err(Failure::usage(
                    "mTLS needs a client identity: pass --client-cert and --client-key, or --config and --dataflow \
                     (or --allow-no-client-auth to send without one)",
                ));
            }
            // The URL the operator typed is explicit intent for its host name (not for the
            // special ranges it may resolve to: those need --allow with an address).
            let core = operator_core(&args.target, allowing_host(&url, &args.allow)?)?;
            let d = DestinationConfig {
                ca: args.target.ca.clone(),
                ..DestinationConfig::new("send", Some(url.clone()))
            };
            (core, d)
        }
    };
    if args.allow_no_client_auth {
        destination.mtls = false;
    }
    if let Some(t) = &args.timeout {
        destination.timeout =
            crate::config::parse_duration(t).map_err(|e| Failure::usage(format!("--timeout: {e}")))?;
    }
    let body = match args.data.as_deref() {
        None => Bytes::new(),
        Some("-") => read_limited(std::io::stdin().lock(), "standard input")?,
        Some(s) if s.starts_with('@') => {
            let path = &s[1..];
            let f = std::fs::File::open(path).map_err(|e| Failure::usage(format!("--data @{path}: {e}")))?;
            read_limited(f, path)?
        }
        Some(s) => Bytes::copy_from_slice(s.as_bytes()),
    };
    let method = match &args.method {
        Some(m) => Method::from_bytes(m.to_ascii_uppercase().as_bytes())
            .map_err(|_| Failure::usage(format!("-X {m}: not an HTTP method")))?,
        None if args.data.is_some() => Method::POST,
        None => Method::GET,
    };
    let mut headers = HeaderMap::new();
    for h in &args.headers {
        let (name, value) = h
            .split_once(':')
            .ok_or_else(|| Failure::usage(format!("-H '{h}': expected 'name: value'")))?;
        let name = HeaderName::from_bytes(name.trim().as_bytes())
            .map_err(|_| Failure::usage(format!("-H '{h}': not a valid header name")))?;
        let value = HeaderValue::from_str(value.trim())
            .map_err(|_| Failure::usage(format!("-H '{h}': not a valid header value")))?;
        headers.append(name, value);
    }
    if args.data.is_some() && !headers.contains_key(http::header::CONTENT_TYPE) {
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
    }
    Ok((
        core.destination(&destination).map_err(Failure::usage)?,
        OutboundRequest {
            method,
            url,
            headers,
            body,
        },
    ))
}

fn read_limited(r: impl Read, what: &str) -> Result<Bytes, Failure> {
    let mut buf = Vec::new();
    r.take(MAX_SEND_BODY + 1)
        .read_to_end(&mut buf)
        .map_err(|e| Failure::usage(format!("--data: reading {what}: {e}")))?;
    if buf.len() as u64 > MAX_SEND_BODY {
        return Err(Failure {
            code: EXIT_USAGE,
            message: format!("--data: {what} is larger than {MAX_SEND_BODY} bytes"),
        });
    }
    Ok(Bytes::from(buf))
}
