//! The unauthenticated listener: health and readiness (the certificate and egress-IP
//! documents join it with the identity and egress work). Answers GET only.

use std::sync::Arc;

use http::{Method, StatusCode};
use serde_json::json;

use super::{error_reply, json_reply, Handler};
use crate::export::Engine;

/// The public API's handler.
pub fn handler(engine: Engine, egress_ips: Vec<std::net::IpAddr>) -> Handler {
    let egress_doc = Arc::new(crate::egress::egress_ips_document(&egress_ips));
    Arc::new(move |req| {
        let engine = engine.clone();
        let egress_doc = egress_doc.clone();
        Box::pin(async move {
            if req.method() != Method::GET {
                return error_reply(StatusCode::METHOD_NOT_ALLOWED, "only GET is served here");
            }
            match req.uri().path() {
                "/healthz" => json_reply(StatusCode::OK, &json!({"status": "ok"})),
                "/v1/egress-ips" => json_reply(StatusCode::OK, &egress_doc),
                "/readyz" => match engine.pending().await {
                    Ok(pending) => json_reply(
                        StatusCode::OK,
                        &json!({"status": "ready", "pendingDeliveries": pending}),
                    ),
                    Err(e) => error_reply(StatusCode::SERVICE_UNAVAILABLE, format!("store not ready: {e}")),
                },
                _ => error_reply(StatusCode::NOT_FOUND, "no such resource"),
            }
        })
    })
}
