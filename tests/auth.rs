//! Authentication against a real OAuth2 server we did not write (oauth2-mock-server from npm,
//! over HTTPS): client credentials in the body and in HTTP Basic, password grant with refresh
//! and its fallback, 401 → new token → success, and one token request for 1,000 concurrent
//! deliveries.
#![allow(clippy::unwrap_used)]

mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, Method, StatusCode};
use sallyport::config::Config;
use sallyport::delivery::{Core, DeliveryClient, OutboundRequest};
use sallyport::receiver::{Action, ClientAuth, Receiver};
use support::oauth::OAuthServer;
use support::*;

fn client(pki: &RcgenPki, rx: &Receiver, auth: &str) -> DeliveryClient {
    let f = &pki.files;
    let dir = pki.dir.path();
    std::fs::write(dir.join("client.secret"), "s3cr3t-client\n").unwrap();
    std::fs::write(dir.join("password"), "pa55-word\n").unwrap();
    std::fs::write(dir.join("bearer"), "static-bearer-token\n").unwrap();
    let text = format!(
        "[egress]\nallow = [\"127.0.0.0/8\"]\n[identity]\ncert = \"{}\"\nkey = \"{}\"\n[[dataflows]]\nname = \"rx\"\nendpoint = \"{}\"\nca = \"{}\"\nauth = {auth}\n",
        f.client_cert.display(),
        f.client_key.display(),
        rx.url("/in"),
        f.ca_cert.display()
    );
    let cfg = Config::from_toml(&text, Path::new("auth.toml"), dir).unwrap();
    let d = cfg.dataflow_destination(&cfg.dataflows[0]).unwrap();
    Core::from_config(&cfg).unwrap().destination(&d).unwrap()
}

async fn receiver(pki: &RcgenPki, responder: sallyport::receiver::Responder) -> Receiver {
    let f = &pki.files;
    Receiver::start_with(
        &f.server_cert,
        &f.server_key,
        &f.ca_cert,
        ClientAuth::Required,
        responder,
    )
    .await
    .unwrap()
}

fn ok() -> sallyport::receiver::Responder {
    Arc::new(|_| Action::Respond(StatusCode::OK, vec![]))
}

fn req(rx: &Receiver) -> OutboundRequest {
    OutboundRequest {
        method: Method::POST,
        url: url::Url::parse(&rx.url("/in")).unwrap(),
        headers: HeaderMap::new(),
        body: "{}".into(),
    }
}

fn bearer_seen(rx: &Receiver, i: usize) -> String {
    let r = &rx.received()[i];
    r.headers
        .iter()
        .find(|(k, _)| k == "authorization")
        .map(|(_, v)| v.clone())
        .unwrap_or_default()
}

fn cc(port: u16, credentials_in: &str) -> String {
    format!(
        "{{ kind = \"oauth2_client_credentials\", token_url = \"https://localhost:{port}/token\", client_id = \"gw\", \
         client_secret_file = \"client.secret\", scope = \"profiles\", credentials_in = \"{credentials_in}\" }}"
    )
}

fn password(port: u16) -> String {
    format!(
        "{{ kind = \"oauth2_password\", token_url = \"https://localhost:{port}/token\", client_id = \"gw\", \
         client_secret_file = \"client.secret\", username = \"svc-user\", password_file = \"password\" }}"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_credentials_in_the_form_body() {
    let pki = RcgenPki::new();
    let oauth = OAuthServer::start(&pki, 3600, false);
    let rx = receiver(&pki, ok()).await;
    let c = client(&pki, &rx, &cc(oauth.port, "body"));
    assert_eq!(c.send(req(&rx)).await.unwrap().status, 200);
    let r = &oauth.requests()[0];
    assert_eq!(
        (
            r["grant"].as_str(),
            r["clientId"].as_str(),
            r["clientSecret"].as_str()
        ),
        (Some("client_credentials"), Some("gw"), Some("s3cr3t-client"))
    );
    assert!(r["basic"].is_null());
    assert_eq!(r["scope"], "profiles");
    assert!(
        bearer_seen(&rx, 0).starts_with("Bearer ey"),
        "a JWT from the server"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_said_never_to_expire_is_used_not_a_crash() {
    let pki = RcgenPki::new();
    // `expires_in` near i64::MAX, a common way to say "never": it must not overflow a clock.
    let oauth = OAuthServer::start(&pki, i64::MAX as u64, false);
    let rx = receiver(&pki, ok()).await;
    let c = client(&pki, &rx, &cc(oauth.port, "body"));
    for _ in 0..3 {
        assert_eq!(c.send(req(&rx)).await.unwrap().status, 200);
    }
    assert_eq!(oauth.grants(), ["client_credentials"], "the token is reused");
    assert!(bearer_seen(&rx, 2).starts_with("Bearer ey"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_credentials_in_http_basic() {
    let pki = RcgenPki::new();
    let oauth = OAuthServer::start(&pki, 3600, false);
    let rx = receiver(&pki, ok()).await;
    let c = client(&pki, &rx, &cc(oauth.port, "basic"));
    assert_eq!(c.send(req(&rx)).await.unwrap().status, 200);
    let r = &oauth.requests()[0];
    assert_eq!(r["basic"], "gw:s3cr3t-client");
    assert!(
        r["clientSecret"].is_null(),
        "the secret must not also travel in the body"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_grant_refreshes_ahead_of_expiry() {
    let pki = RcgenPki::new();
    // 6 s tokens: renewed 5 s before expiry, i.e. after 1 s.
    let oauth = OAuthServer::start(&pki, 6, false);
    let rx = receiver(&pki, ok()).await;
    let c = client(&pki, &rx, &password(oauth.port));
    c.send(req(&rx)).await.unwrap();
    c.send(req(&rx)).await.unwrap();
    assert_eq!(oauth.grants(), ["password"], "cached while fresh");
    tokio::time::sleep(Duration::from_millis(1300)).await;
    c.send(req(&rx)).await.unwrap();
    assert_eq!(oauth.grants(), ["password", "refresh_token"]);
    let first = &oauth.requests()[0];
    assert_eq!(
        (first["username"].as_str(), first["password"].as_str()),
        (Some("svc-user"), Some("pa55-word"))
    );
    assert_ne!(
        bearer_seen(&rx, 0),
        bearer_seen(&rx, 2),
        "the refreshed token is used"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_refresh_falls_back_to_a_new_password_grant() {
    let pki = RcgenPki::new();
    let oauth = OAuthServer::start(&pki, 6, true);
    let rx = receiver(&pki, ok()).await;
    let c = client(&pki, &rx, &password(oauth.port));
    c.send(req(&rx)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert_eq!(c.send(req(&rx)).await.unwrap().status, 200);
    assert_eq!(oauth.grants(), ["password", "refresh_token", "password"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_401_gets_a_new_token_and_one_retry() {
    let pki = RcgenPki::new();
    let oauth = OAuthServer::start(&pki, 3600, false);
    let rx = receiver(
        &pki,
        Arc::new(|n| {
            if n == 0 {
                Action::Respond(StatusCode::UNAUTHORIZED, vec![])
            } else {
                Action::Respond(StatusCode::OK, vec![])
            }
        }),
    )
    .await;
    let c = client(&pki, &rx, &cc(oauth.port, "body"));
    assert_eq!(c.send(req(&rx)).await.unwrap().status, 200);
    assert_eq!(oauth.grants().len(), 2, "a new token after the 401");
    assert_eq!(rx.received().len(), 2);
    // (The server may issue a byte-identical JWT within the same second: same claims,
    // deterministic RS256. The second grant is the evidence of the fresh token.)
    assert!(bearer_seen(&rx, 1).starts_with("Bearer ey"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_token_request_for_a_thousand_concurrent_deliveries() {
    let pki = RcgenPki::new();
    let oauth = OAuthServer::start(&pki, 3600, false);
    let rx = receiver(&pki, ok()).await;
    let c = Arc::new(client(&pki, &rx, &cc(oauth.port, "basic")));
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..1000 {
        let (c, r) = (c.clone(), req(&rx));
        set.spawn(async move { c.send(r).await.map(|d| d.status) });
    }
    while let Some(r) = set.join_next().await {
        assert_eq!(r.unwrap().unwrap(), 200);
    }
    assert_eq!(oauth.grants().len(), 1);
    assert_eq!(rx.received().len(), 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_static_bearer_token_and_an_unreachable_token_endpoint() {
    let pki = RcgenPki::new();
    let rx = receiver(&pki, ok()).await;
    let c = client(&pki, &rx, "{ kind = \"bearer\", token_file = \"bearer\" }");
    c.send(req(&rx)).await.unwrap();
    assert_eq!(bearer_seen(&rx, 0), "Bearer static-bearer-token");

    let c = client(&pki, &rx, &cc(free_port(), "body"));
    let err = c.send(req(&rx)).await.unwrap_err();
    assert_eq!(err.kind().as_str(), "auth");
    assert!(!err.to_string().contains("s3cr3t"), "{err}");
    assert_eq!(rx.received().len(), 1, "nothing sent without a token");
}
