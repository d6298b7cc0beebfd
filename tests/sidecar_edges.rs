//! The sidecar's edges, tried as an app on the same host would try them: paths that try to
//! leave their route, HTTP/2 requests, and forward-proxy settings that would leak a credential.
#![allow(clippy::unwrap_used)]

mod support;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::{BodyExt, Full};
use sallyport::config::Config;
use sallyport::delivery::Core;
use sallyport::receiver::ClientAuth;
use support::*;

/// One raw HTTP/1.1 request, the target sent exactly as written (as `curl --path-as-is`
/// does): the status code the sidecar answers.
async fn raw_status(port: u16, target: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    tcp.write_all(
        format!("GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut answer = Vec::new();
    tcp.read_to_end(&mut answer).await.unwrap();
    let text = String::from_utf8_lossy(&answer);
    text.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_path_never_leaves_its_route_nor_matches_a_longer_prefix() {
    let pki = RcgenPki::new();
    let rx = pki.receiver(ClientAuth::Required, StatusCode::OK).await;
    let port = free_port();
    let cfg = pki.dir.path().join("edges.toml");
    std::fs::write(
        &cfg,
        format!(
            "[identity]\ncert = \"gateway.pem\"\nkey = \"gateway.key\"\n[egress]\nallow = [\"127.0.0.0/8\"]\n\
             [store]\nurl = \"sqlite://edges.db\"\n[sidecar]\nlisten = \"127.0.0.1:{port}\"\n\
             [[sidecar.routes]]\nprefix = \"/acme\"\nupstream = \"{}\"\nca = \"ca.pem\"\n",
            rx.url("/api/v1/tenantA/")
        ),
    )
    .unwrap();
    let _sidecar = spawn_sallyport(&["sidecar", "--config", cfg.to_str().unwrap()], &[], port).await;
    for target in [
        "/acme/../../tenantB/x",
        "/acme/%2e%2e/%2e%2e/tenantB/x",
        "/acme/%2E%2E/x",
        "/acme/..%2f..%2ftenantB/x",
        "/acme/.%2e/x",
        "/acme/%252e%252e/x",
        "/acme/x%5c..%5cy",
        "/acme/./x",
    ] {
        assert_eq!(raw_status(port, target).await, 400, "{target}");
    }
    assert_eq!(raw_status(port, "/acmeadmin/x").await, 404);
    assert!(rx.received().is_empty(), "{:?}", rx.received());
    assert_eq!(raw_status(port, "/acme/ok/x?q=1").await, 200);
    let seen: Vec<String> = rx.received().iter().map(|r| r.path_and_query.clone()).collect();
    assert_eq!(seen, ["/api/v1/tenantA/ok/x?q=1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_requests_from_the_app_go_by_route_not_to_forward_mode() {
    let pki = RcgenPki::new();
    let rx = pki.receiver(ClientAuth::Required, StatusCode::OK).await;
    let port = free_port();
    let text = format!(
        "[identity]\ncert = \"gateway.pem\"\nkey = \"gateway.key\"\n[egress]\nallow = [\"127.0.0.0/8\"]\n\
         [store]\nurl = \"sqlite://h2.db\"\n[sidecar]\nlisten = \"127.0.0.1:{port}\"\n\
         [[sidecar.routes]]\nprefix = \"/rx\"\nupstream = \"{}\"\nca = \"ca.pem\"\n",
        rx.url("/")
    );
    let cfg = Config::from_toml(&text, std::path::Path::new("h2.toml"), pki.dir.path()).unwrap();
    let tasks = sallyport::sidecar::start(&cfg, &Core::from_config(&cfg).unwrap())
        .await
        .unwrap();
    // HTTP/2 with prior knowledge (h2c), as gRPC-style clients speak to a local proxy.
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (mut tx, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let req = http::Request::post(format!("http://127.0.0.1:{port}/rx/in"))
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    let res = tx.send_request(req).await.unwrap();
    let status = res.status();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(rx.received().len(), 1);
    assert_eq!(rx.received()[0].path_and_query, "/in");
    tasks.iter().for_each(|t| t.abort());
}

#[test]
fn a_forward_proxy_cannot_carry_a_route_credential() {
    let pki = RcgenPki::new();
    std::fs::write(pki.dir.path().join("t"), "secret-token\n").unwrap();
    let text = "[identity]\ncert = \"gateway.pem\"\nkey = \"gateway.key\"\n[egress]\nallow = [\"127.0.0.0/8\"]\n\
                [sidecar]\n[sidecar.forward_proxy]\nprefix = \"/\"\nupstream = \"https://forward.invalid/\"\nca = \"ca.pem\"\n\
                auth = { kind = \"bearer\", token_file = \"t\" }\n";
    let err = Config::from_toml(text, std::path::Path::new("fwd.toml"), pki.dir.path())
        .unwrap_err()
        .to_string();
    assert!(err.contains("sidecar.forward_proxy.auth"), "{err}");
    assert!(err.contains("hosts the app names"), "{err}");
}
