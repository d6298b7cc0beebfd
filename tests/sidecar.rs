//! The sidecar as an app sees it: plain HTTP on loopback in, mTLS out to nginx requiring a
//! client certificate (certificates made by the `openssl` CLI), bodies streamed both ways,
//! route auth injected, typed errors, keep-alive upstream, every request audited.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::{BodyExt, Full};
use sallyport::config::Config;
use sallyport::delivery::Core;
use sallyport::receiver::ClientAuth;
use support::*;

struct Rig {
    _tmp: tempfile::TempDir,
    nginx: Peer,
    rx: sallyport::receiver::Receiver,
    _plain: sallyport::receiver::Receiver,
    port: u16,
    store_cfg: Config,
}

async fn rig() -> Rig {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let up = OpensslPki::new(d, "up");
    let sink = free_port();
    let nginx = nginx(
        d,
        &format!(
            "log_format sp '$connection $request_length $status $request';\n\
             server {{ listen 127.0.0.1:PORT ssl; ssl_certificate {}; ssl_certificate_key {};\n\
             ssl_client_certificate {}; ssl_verify_client on; client_max_body_size 10m; access_log {}/sp.log sp;\n\
                          gzip on; gzip_min_length 1; gzip_types text/plain;\n\
             location /upload {{ proxy_pass http://127.0.0.1:{sink}/; }}\n\
             location /short {{ keepalive_timeout 1s; return 200 \"short\"; }}\n\
             location / {{ return 200 \"received $ssl_client_s_dn\"; }} }}\n\
             server {{ listen 127.0.0.1:{sink}; access_log off; client_max_body_size 10m; location / {{ return 200 \"stored\"; }} }}",
            up.server.display(),
            up.server_key.display(),
            up.ca.display(),
            d.display()
        ),
    );
    // Our recording receiver and a plain-TLS one, with rcgen certificates.
    let pki = RcgenPki::new();
    let rx = pki.receiver(ClientAuth::Required, StatusCode::OK).await;
    let plain = pki.receiver(ClientAuth::NotRequested, StatusCode::OK).await;
    std::fs::write(d.join("route.token"), "route-token-77\n").unwrap();
    let port = free_port();
    // The gateway presents the openssl-made client certificate to nginx, and the rcgen one
    // (via a named identity) to the rcgen receivers.
    let text = format!(
        "[identity]\ncert = \"{}\"\nkey = \"{}\"\n[identities.rc]\ncert = \"{}\"\nkey = \"{}\"\n\
         [egress]\nallow = [\"127.0.0.0/8\"]\n[store]\nurl = \"sqlite://sc.db\"\n\
         [sidecar]\nlisten = \"127.0.0.1:{port}\"\nmax_body_bytes = 8388608\n\
         [[sidecar.routes]]\nprefix = \"/nginx\"\nupstream = \"{}\"\nca = \"{}\"\n\
         [[sidecar.routes]]\nprefix = \"/rx\"\nupstream = \"{}\"\nca = \"{}\"\nidentity = \"rc\"\n\
         auth = {{ kind = \"bearer\", token_file = \"route.token\" }}\n\
         [[sidecar.routes]]\nprefix = \"/plain\"\nupstream = \"{}\"\nca = \"{}\"\nidentity = \"rc\"\n\
         [[sidecar.routes]]\nprefix = \"/denied\"\nupstream = \"https://10.0.0.5/\"\nca = \"{}\"\n",
        up.client.display(),
        up.client_key.display(),
        pki.files.client_cert.display(),
        pki.files.client_key.display(),
        nginx.url(""),
        up.ca.display(),
        rx.url(""),
        pki.files.ca_cert.display(),
        plain.url(""),
        pki.files.ca_cert.display(),
        up.ca.display(),
    );
    let cfg = Config::from_toml(&text, std::path::Path::new("sc.toml"), d).unwrap();
    let (sidecar, listen) = sallyport::sidecar::build(&cfg, &Core::from_config(&cfg).unwrap())
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind(listen).await.unwrap();
    tokio::spawn(sallyport::sidecar::serve(sidecar, listener));
    std::mem::forget(pki);
    Rig {
        _tmp: tmp,
        nginx,
        rx,
        _plain: plain,
        port,
        store_cfg: cfg,
    }
}

/// One keep-alive HTTP/1.1 connection to the sidecar, as an app would hold it.
async fn app(port: u16) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (tx, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    tx
}

async fn call(
    tx: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> (u16, http::HeaderMap, Bytes) {
    let mut req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    tx.ready().await.unwrap();
    let res = tx.send_request(req.body(Full::new(body)).unwrap()).await.unwrap();
    let (parts, body) = res.into_parts();
    (
        parts.status.as_u16(),
        parts.headers,
        body.collect().await.unwrap().to_bytes(),
    )
}

/// Once a sidecar listens on `port`: an app connection that has POSTed `{}` to `path` `n`
/// times, each answered 200.
async fn posted(port: u16, path: &str, n: usize) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    tokio::task::spawn_blocking(move || wait_for_port(port))
        .await
        .unwrap();
    let mut tx = app(port).await;
    for _ in 0..n {
        assert_eq!(
            call(&mut tx, "POST", path, &[], Bytes::from_static(b"{}"))
                .await
                .0,
            200
        );
    }
    tx
}

fn nginx_log(r: &Rig) -> Vec<Vec<String>> {
    std::fs::read_to_string(r.nginx.dir.parent().unwrap().join("sp.log"))
        .unwrap_or_default()
        .lines()
        .map(|l| l.split(' ').map(str::to_owned).collect())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_post_5mb_chunked_and_keep_alive_through_to_nginx() {
    let r = rig().await;
    let mut tx = app(r.port).await;
    let (s, _, body) = call(&mut tx, "GET", "/nginx/hello", &[], Bytes::new()).await;
    assert_eq!(s, 200);
    assert!(
        String::from_utf8_lossy(&body).contains("CN=up-client"),
        "nginx saw our client certificate"
    );

    let big = Bytes::from(vec![b'x'; 5 * 1024 * 1024]);
    // nginx answers `return 200` without reading the upload, so that app connection cannot be
    // reused afterwards (HTTP semantics); keep-alive is checked on the upstream side below.
    let mut upload = app(r.port).await;
    let (s, _, _) = call(
        &mut upload,
        "POST",
        "/nginx/upload",
        &[("content-type", "application/octet-stream")],
        big,
    )
    .await;
    assert_eq!(s, 200);
    // nginx answers `return 200` without reading the upload, so the app's connection cannot be
    // reused after it (HTTP semantics); the upstream side is what keep-alive is about here.
    let mut tx = app(r.port).await;

    let (s, headers, body) = call(
        &mut tx,
        "GET",
        "/nginx/chunked",
        &[("accept-encoding", "gzip")],
        Bytes::new(),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(headers.get("content-encoding").unwrap(), "gzip");
    assert!(
        headers.get("content-length").is_none(),
        "a chunked answer streams through: {headers:?}"
    );
    assert!(!body.is_empty());

    for _ in 0..10 {
        assert_eq!(
            call(&mut tx, "GET", "/nginx/again", &[], Bytes::new()).await.0,
            200
        );
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let log = nginx_log(&r);
    let upload = log
        .iter()
        .find(|l| l.get(4).is_some_and(|p| p == "/upload"))
        .unwrap();
    assert!(
        upload[1].parse::<usize>().unwrap() >= 5 * 1024 * 1024,
        "{upload:?}"
    );
    let connections: std::collections::BTreeSet<&String> = log.iter().map(|l| &l[0]).collect();
    assert!(
        connections.len() < log.len(),
        "{} connections for {} requests",
        connections.len(),
        log.len()
    );
}

/// Upstream connections are not tied to the app's: an app that opens a connection per
/// request still has its requests carried over kept mTLS connections. And a kept connection
/// the receiver closed while idle is replaced, not answered with a 502.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_outlive_app_connections_and_the_receivers_idle_close() {
    let r = rig().await;
    for _ in 0..6 {
        let mut tx = app(r.port).await;
        assert_eq!(
            call(&mut tx, "GET", "/nginx/fresh", &[], Bytes::new()).await.0,
            200
        );
        drop(tx);
        // The sidecar sees the app hang up before the next app connects.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // POST: not retried by the route, so the first attempt must find a working connection.
    let mut tx = app(r.port).await;
    let (s, _, body) = call(&mut tx, "POST", "/nginx/short", &[], Bytes::new()).await;
    assert_eq!((s, &body[..]), (200, &b"short"[..]));
    // nginx closes that connection after 1 s idle; the app's connection stays open.
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let (s, _, body) = call(&mut tx, "POST", "/nginx/short", &[], Bytes::new()).await;
    assert_eq!(
        (s, &body[..]),
        (200, &b"short"[..]),
        "the closed connection was replaced"
    );

    tokio::time::sleep(Duration::from_millis(200)).await;
    let log = nginx_log(&r);
    let on = |path: &str| -> Vec<String> {
        log.iter()
            .filter(|l| l.get(4).is_some_and(|p| p == path))
            .map(|l| l[0].clone())
            .collect()
    };
    let fresh = on("/fresh");
    assert_eq!(fresh.len(), 6);
    let distinct: std::collections::BTreeSet<_> = fresh.iter().collect();
    assert!(
        distinct.len() <= 2,
        "six app connections, one request each, took {} upstream connections",
        distinct.len()
    );
    let short = on("/short");
    assert_eq!(short.len(), 2);
    assert_ne!(
        short[0], short[1],
        "the second request went over a new connection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_auth_replaces_the_apps_authorization_and_hop_by_hop_headers_stop() {
    let r = rig().await;
    let mut tx = app(r.port).await;
    let (s, _, _) = call(
        &mut tx,
        "POST",
        "/rx/in?x=1",
        &[
            ("authorization", "Bearer app-secret"),
            ("x-app", "1"),
            ("connection", "keep-alive, x-drop-me"),
            ("x-drop-me", "1"),
        ],
        Bytes::from_static(b"{}"),
    )
    .await;
    assert_eq!(s, 200);
    let got = &r.rx.received()[0];
    assert_eq!(got.path_and_query, "/in?x=1");
    let h = |n: &str| got.headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    assert_eq!(h("authorization").as_deref(), Some("Bearer route-token-77"));
    assert_eq!(h("x-app").as_deref(), Some("1"));
    assert!(
        h("x-drop-me").is_none(),
        "a header named by Connection is hop-by-hop"
    );
    assert_eq!(
        got.client_cert.as_ref().unwrap().subject_cn.as_deref(),
        Some("sallyport-gateway")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_errors_and_audit_records() {
    let r = rig().await;
    let mut tx = app(r.port).await;
    let (s, _, body) = call(&mut tx, "POST", "/plain/in", &[], Bytes::from_static(b"{}")).await;
    assert_eq!(s, 502);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"]["kind"], "mtls_not_requested", "{v}");
    assert_eq!(r._plain.received().len(), 0);
    let (s, _, body) = call(&mut tx, "GET", "/denied/x", &[], Bytes::new()).await;
    assert_eq!(s, 502);
    assert!(String::from_utf8_lossy(&body).contains("destination denied by egress policy"));
    let (s, _, _) = call(&mut tx, "GET", "/nowhere", &[], Bytes::new()).await;
    assert_eq!(s, 404);
    assert_eq!(call(&mut tx, "GET", "/nginx/ok", &[], Bytes::new()).await.0, 200);
    let store = sallyport::store::open(&r.store_cfg).unwrap();
    let mut records = Vec::new();
    for _ in 0..100 {
        records = store.audit_records(0, 100).unwrap();
        if records.len() >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let text: Vec<&str> = records.iter().map(|r| r.record.as_str()).collect();
    assert!(
        text.iter()
            .any(|r| r.contains("\"errorKind\":\"mtls_not_requested\"")),
        "{text:?}"
    );
    assert!(
        text.iter().any(|r| r.contains("\"errorKind\":\"egress_denied\"")),
        "{text:?}"
    );
    assert!(
        text.iter()
            .any(|r| r.contains("\"outcome\":\"proxied\"") && r.contains("\"httpStatus\":200")),
        "{text:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_proxy_mode_sends_absolute_form_requests_over_mtls_and_refuses_denied_hosts() {
    let pki = RcgenPki::new();
    let rx = pki.receiver(ClientAuth::Required, StatusCode::OK).await;
    let port = free_port();
    let text = format!(
        "[identity]\ncert = \"gateway.pem\"\nkey = \"gateway.key\"\n[egress]\nallow = [\"127.0.0.0/8\"]\n\
         [store]\nurl = \"sqlite://fwd.db\"\n[sidecar]\nlisten = \"127.0.0.1:{port}\"\n\
         [sidecar.forward_proxy]\nprefix = \"/\"\nupstream = \"https://forward.invalid/\"\nca = \"ca.pem\"\n"
    );
    let cfg = Config::from_toml(&text, std::path::Path::new("fwd.toml"), pki.dir.path()).unwrap();
    let (sidecar, listen) = sallyport::sidecar::build(&cfg, &Core::from_config(&cfg).unwrap())
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind(listen).await.unwrap();
    tokio::spawn(sallyport::sidecar::serve(sidecar, listener));
    let mut tx = app(port).await;
    let target = format!("http://localhost:{}/hook?a=1", rx.addr.port());
    let (s, _, _) = call(&mut tx, "POST", &target, &[], Bytes::from_static(b"{}")).await;
    assert_eq!(s, 200);
    let got = &rx.received()[0];
    assert_eq!(got.path_and_query, "/hook?a=1");
    assert_eq!(
        got.client_cert.as_ref().unwrap().subject_cn.as_deref(),
        Some("sallyport-gateway")
    );
    let (s, _, body) = call(
        &mut tx,
        "POST",
        "http://10.0.0.5/hook",
        &[],
        Bytes::from_static(b"{}"),
    )
    .await;
    assert_eq!(s, 403);
    assert!(String::from_utf8_lossy(&body).contains("destination denied by egress policy"));
}

/// An upstream that answers by script (request index → action), then 200.
async fn scripted(pki: &RcgenPki, script: Vec<sallyport::receiver::Action>) -> sallyport::receiver::Receiver {
    let f = &pki.files;
    sallyport::receiver::Receiver::start_with(
        &f.server_cert,
        &f.server_key,
        &f.ca_cert,
        ClientAuth::Required,
        std::sync::Arc::new(move |n| {
            script
                .get(n)
                .cloned()
                .unwrap_or(sallyport::receiver::Action::Respond(StatusCode::OK, vec![]))
        }),
    )
    .await
    .unwrap()
}

/// A sidecar config with routes to `upstream` (rcgen PKI) and `extra` TOML in [sidecar].
fn sidecar_config(pki: &RcgenPki, upstream: &str, sidecar_extra: &str, routes: &str) -> Config {
    let f = &pki.files;
    let text = format!(
        "[identity]\ncert = \"{}\"\nkey = \"{}\"\n[egress]\nallow = [\"127.0.0.0/8\"]\n[store]\nurl = \"sqlite://sc.db\"\n\
         [sidecar]\n{sidecar_extra}\n{}",
        f.client_cert.display(),
        f.client_key.display(),
        routes
            .replace("UPSTREAM", upstream)
            .replace("CA", &f.ca_cert.display().to_string()),
    );
    Config::from_toml(&text, std::path::Path::new("sc.toml"), pki.dir.path()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_requests_are_retried_others_only_when_the_route_says_so() {
    use sallyport::receiver::Action;
    let pki = RcgenPki::new();
    let busy = || Action::Respond(StatusCode::SERVICE_UNAVAILABLE, vec![]);
    let rx = scripted(
        &pki,
        vec![
            busy(),                                  // GET, attempt 1
            Action::Drop,                            // GET, attempt 2: connection closed without an answer
            Action::Respond(StatusCode::OK, vec![]), // GET, attempt 3
            busy(),                                  // POST: not retried
            busy(),                                  // POST on the route that retries everything, attempt 1
            Action::Respond(StatusCode::OK, vec![]), // … attempt 2
            busy(), // PUT with a body larger than the retry buffer: streamed once
        ],
    )
    .await;
    let port = free_port();
    let cfg = sidecar_config(
        &pki,
        &rx.url(""),
        &format!("listen = \"127.0.0.1:{port}\""),
        "[[sidecar.routes]]\nprefix = \"/up\"\nupstream = \"UPSTREAM\"\nca = \"CA\"\nretry_buffer_bytes = 1024\n\
         [[sidecar.routes]]\nprefix = \"/all\"\nupstream = \"UPSTREAM\"\nca = \"CA\"\nretry_non_idempotent = true\n",
    );
    let tasks = sallyport::sidecar::start(&cfg, &Core::from_config(&cfg).unwrap())
        .await
        .unwrap();
    wait_for_port(port);
    let mut tx = app(port).await;

    let (s, _, _) = call(&mut tx, "GET", "/up/a", &[], Bytes::new()).await;
    assert_eq!(
        (s, rx.received().len()),
        (200, 3),
        "GET: two retries, then the answer"
    );
    let (s, _, _) = call(&mut tx, "POST", "/up/b", &[], Bytes::from_static(b"{\"n\":1}")).await;
    assert_eq!(
        (s, rx.received().len()),
        (503, 4),
        "POST: the upstream's answer, once"
    );
    let (s, _, _) = call(&mut tx, "POST", "/all/c", &[], Bytes::from_static(b"{\"n\":2}")).await;
    assert_eq!(
        (s, rx.received().len()),
        (200, 6),
        "POST retried when the route says so"
    );
    let got = rx.received();
    assert_eq!(got[4].body, got[5].body, "the retry sent the same body");
    assert_eq!(&got[5].body[..], b"{\"n\":2}");
    let big = Bytes::from(vec![b'x'; 4096]);
    let (s, _, _) = call(&mut tx, "PUT", "/up/d", &[], big.clone()).await;
    assert_eq!(
        (s, rx.received().len()),
        (503, 7),
        "a body over the retry buffer is sent once"
    );
    assert_eq!(rx.received()[6].body, big);

    // One audit record per attempt.
    let store = sallyport::store::open(&cfg).unwrap();
    let mut attempts = Vec::new();
    for _ in 0..100 {
        attempts = store
            .audit_records(0, 100)
            .unwrap()
            .iter()
            .map(|r| {
                serde_json::from_str::<serde_json::Value>(&r.record).unwrap()["attempt"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        if attempts.len() >= 7 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(attempts, [1, 2, 3, 1, 1, 2, 1]);
    tasks.iter().for_each(|t| t.abort());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unix_socket_listener_owner_only_and_oauth2_route_auth() {
    use std::os::unix::fs::PermissionsExt;
    let pki = RcgenPki::new();
    let rx = pki.receiver(ClientAuth::Required, StatusCode::OK).await;
    let oauth = support::oauth::OAuthServer::start(&pki, 3600, false);
    std::fs::write(pki.dir.path().join("client.secret"), "s3cr3t-client\n").unwrap();
    let sock = pki.dir.path().join("sidecar.sock");
    let cfg = sidecar_config(
        &pki,
        &rx.url(""),
        &format!("unix_socket = \"{}\"", sock.display()),
        &format!(
            "[[sidecar.routes]]\nprefix = \"/rx\"\nupstream = \"UPSTREAM\"\nca = \"CA\"\n\
             auth = {{ kind = \"oauth2_client_credentials\", token_url = \"https://localhost:{}/token\", \
             client_id = \"gw\", client_secret_file = \"client.secret\" }}\n",
            oauth.port
        ),
    );
    let tasks = sallyport::sidecar::start(&cfg, &Core::from_config(&cfg).unwrap())
        .await
        .unwrap();
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "only the owner may use the socket");

    let stream = tokio::net::UnixStream::connect(&sock).await.unwrap();
    let (mut tx, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    for _ in 0..3 {
        let (s, _, _) = call(
            &mut tx,
            "POST",
            "/rx/in",
            &[("authorization", "Bearer app-secret")],
            Bytes::from_static(b"{}"),
        )
        .await;
        assert_eq!(s, 200);
    }
    let seen: Vec<String> = rx
        .received()
        .iter()
        .map(|r| {
            r.headers
                .iter()
                .find(|(k, _)| k == "authorization")
                .map(|(_, v)| v.clone())
                .unwrap()
        })
        .collect();
    assert_eq!(seen.len(), 3);
    assert!(
        seen.iter().all(|a| a.starts_with("Bearer ey") && *a == seen[0]),
        "{seen:?}"
    );
    assert_eq!(
        oauth.grants(),
        ["client_credentials"],
        "one token for three requests"
    );
    tasks.iter().for_each(|t| t.abort());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_listener_has_its_own_routes() {
    let pki = RcgenPki::new();
    let rx1 = pki.receiver(ClientAuth::Required, StatusCode::OK).await;
    let rx2 = pki.receiver(ClientAuth::Required, StatusCode::OK).await;
    let (p1, p2) = (free_port(), free_port());
    let cfg = sidecar_config(
        &pki,
        &rx1.url(""),
        &format!("listen = \"127.0.0.1:{p1}\""),
        &format!(
            "[[sidecar.routes]]\nprefix = \"/x\"\nupstream = \"UPSTREAM\"\nca = \"CA\"\n\
             [[sidecar.listeners]]\nlisten = \"127.0.0.1:{p2}\"\n\
             [[sidecar.listeners.routes]]\nprefix = \"/x\"\nupstream = \"{}\"\nca = \"CA\"\n",
            rx2.url("")
        ),
    );
    let tasks = sallyport::sidecar::start(&cfg, &Core::from_config(&cfg).unwrap())
        .await
        .unwrap();
    for (port, path) in [(p1, "/x/one"), (p2, "/x/two"), (p2, "/x/three")] {
        wait_for_port(port);
        let mut tx = app(port).await;
        assert_eq!(call(&mut tx, "GET", path, &[], Bytes::new()).await.0, 200);
    }
    let paths = |rx: &sallyport::receiver::Receiver| -> Vec<String> {
        rx.received().iter().map(|r| r.path_and_query.clone()).collect()
    };
    assert_eq!(paths(&rx1), ["/one"]);
    assert_eq!(paths(&rx2), ["/two", "/three"]);
    tasks.iter().for_each(|t| t.abort());

    // A listener needs an address and routes; a non-loopback one needs the explicit flag.
    let bad = format!(
        "[sidecar]\n[[sidecar.listeners]]\n[[sidecar.listeners]]\nlisten = \"0.0.0.0:{p2}\"\n\
         [[sidecar.listeners.routes]]\nprefix = \"/x\"\nupstream = \"https://localhost/\"\n"
    );
    let err = Config::from_toml(&bad, std::path::Path::new("sc.toml"), pki.dir.path())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("sidecar.listeners[0]: set listen or unix_socket"),
        "{err}"
    );
    assert!(
        err.contains("sidecar.listeners[0].routes: a listener needs routes"),
        "{err}"
    );
    assert!(err.contains("sidecar.listeners[1].listen: 0.0.0.0"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sidecar_command_runs_on_one_thread_or_as_many_as_configured() {
    let pki = RcgenPki::new();
    let rx = pki.receiver(ClientAuth::Required, StatusCode::OK).await;
    let f = &pki.files;
    let config = |threads: &str, port: u16| {
        let path = pki.dir.path().join(format!("sc-{port}.toml"));
        std::fs::write(
            &path,
            format!(
                "[identity]\ncert = \"{}\"\nkey = \"{}\"\n[egress]\nallow = [\"127.0.0.0/8\"]\n\
                 [store]\nurl = \"sqlite://sc-{port}.db\"\n[sidecar]\nlisten = \"127.0.0.1:{port}\"\n{threads}\n\
                 [[sidecar.routes]]\nprefix = \"/\"\nupstream = \"{}\"\nca = \"{}\"\n",
                f.client_cert.display(),
                f.client_key.display(),
                rx.url(""),
                f.ca_cert.display()
            ),
        )
        .unwrap();
        path
    };
    // The default (one thread) and a multi-thread runtime both carry requests out. Threads
    // are counted by name from /proc/PID/task: ours are `sallyport` (main), `sallyport-audit`
    // and `sallyport-fsync`; tokio names both its runtime workers and its blocking-pool
    // threads `tokio-rt-worker`. A current-thread runtime has no workers (it runs on the main
    // thread), so in the default case every `tokio-rt-worker` is a blocking-pool thread: at
    // most one, since the blocking work here (opening the audit sink at start, then one
    // address lookup at a time) is sequential and an idle pool thread is reused. The same work
    // in the multi-thread case needs the same pool threads, so the workers are the difference.
    let mut tokio_threads = Vec::new();
    for (threads, path) in [("", "/one"), ("threads = 3", "/three")] {
        let port = free_port();
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_sallyport"))
            .args(["sidecar", "--config"])
            .arg(config(threads, port))
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let _tx = posted(port, path, 3).await;
        let pid = child.id().unwrap();
        let tasks: Vec<(String, String)> = std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .map(|t| {
                let t = t.unwrap().path();
                let comm = std::fs::read_to_string(t.join("comm")).unwrap().trim().to_owned();
                (comm, std::fs::read_to_string(t.join("stat")).unwrap())
            })
            .collect();
        let names: Vec<String> = tasks.iter().map(|(n, _)| n.clone()).collect();
        assert!(
            names
                .iter()
                .all(|n| n.starts_with("sallyport") || n == "tokio-rt-worker"),
            "a thread nobody accounted for: {names:?}"
        );
        tokio_threads.push((
            threads,
            names.iter().filter(|n| *n == "tokio-rt-worker").count(),
            names.clone(),
        ));
        // The audit log is appended by a thread of its own at nice 10, below the proxying.
        let audit: Vec<&String> = tasks
            .iter()
            .filter(|(n, _)| n == "sallyport-audit")
            .map(|(_, stat)| stat)
            .collect();
        assert_eq!(audit.len(), 1, "one audit writer thread: {names:?}");
        // The nice value is field 19 of /proc/PID/task/TID/stat: the 17th after the name.
        let after_name = audit[0].rsplit_once(')').unwrap().1;
        assert_eq!(after_name.split_whitespace().nth(16), Some("10"), "{after_name}");
        child.kill().await.unwrap();
    }
    let (one, three) = (tokio_threads[0].1, tokio_threads[1].1);
    assert!(
        one <= 1,
        "the default runs on the main thread, no runtime workers: {tokio_threads:?}"
    );
    assert_eq!(
        three,
        one + 3,
        "threads = 3 runs three runtime workers: {tokio_threads:?}"
    );
    let paths: Vec<String> = rx.received().iter().map(|r| r.path_and_query.clone()).collect();
    assert_eq!(paths, ["/one", "/one", "/one", "/three", "/three", "/three"]);

    // Out of range: refused before anything starts, with the key named.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_sallyport"))
        .args(["sidecar", "--config"])
        .arg(config("threads = 0", free_port()))
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("sidecar.threads: must be between 1 and 64"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_audit_file_holds_the_chain_audit_verify_checks_it_and_one_writer_at_a_time() {
    let pki = RcgenPki::new();
    let rx = pki.receiver(ClientAuth::Required, StatusCode::OK).await;
    let f = &pki.files;
    let dir = pki.dir.path();
    let config = |port: u16| {
        let path = dir.join(format!("sc-{port}.toml"));
        std::fs::write(
            &path,
            format!(
                "[identity]\ncert = \"{}\"\nkey = \"{}\"\n[egress]\nallow = [\"127.0.0.0/8\"]\n\
                 [store]\nurl = \"sqlite://sc.db\"\n[audit]\nkey_env = \"SP_TEST_AUDIT_KEY\"\n\
                 [sidecar]\nlisten = \"127.0.0.1:{port}\"\naudit_file = \"logs/sidecar-audit.jsonl\"\n\
                 audit_file_rotate_bytes = 1500\n\
                 [[sidecar.routes]]\nprefix = \"/rx\"\nupstream = \"{}\"\nca = \"{}\"\n\
                 [[sidecar.routes]]\nprefix = \"/denied\"\nupstream = \"https://10.0.0.5/\"\nca = \"{}\"\n",
                f.client_cert.display(),
                f.client_key.display(),
                rx.url(""),
                f.ca_cert.display(),
                f.ca_cert.display()
            ),
        )
        .unwrap();
        path
    };
    let key = "audit-key-for-the-sidecar-test-0123456789";
    let sallyport = |args: &[&str], cfg: &std::path::Path| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_sallyport"));
        c.args(args)
            .arg("--config")
            .arg(cfg)
            .env("SP_TEST_AUDIT_KEY", key);
        c
    };
    let port = free_port();
    let cfg = config(port);
    let mut child = sallyport(&["sidecar"], &cfg)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Each record written before the next request, so that batches (and so rotations) fall
    // the same way however busy the machine is.
    let path = dir.join("logs/sidecar-audit.jsonl");
    let on_disk = || {
        let mut n = 0;
        let _ = sallyport::audit::file::read_chain::<String>(&path, |_| {
            n += 1;
            Ok(())
        });
        n
    };
    let mut tx = posted(port, "/rx/in", 0).await;
    for i in 1..=5 {
        assert_eq!(
            call(&mut tx, "POST", "/rx/in", &[], Bytes::from_static(b"{}"))
                .await
                .0,
            200
        );
        for _ in 0..500 {
            if on_disk() == i {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(on_disk(), i);
    }
    assert_eq!(call(&mut tx, "GET", "/denied/x", &[], Bytes::new()).await.0, 502);

    // A second sidecar on the same file is refused while the first one writes it.
    let second = sallyport(&["sidecar"], &config(free_port())).output().unwrap();
    assert_ne!(second.status.code(), Some(0));
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(err.contains("another process is writing it"), "{err}");

    // A clean stop writes every record still queued before the process ends.
    drop(tx);
    let term = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    assert!(child.wait().unwrap().success());
    // Rotated about every three records: segments beside the file, one chain through them.
    let segments = sallyport::audit::file::segments(&path).unwrap();
    assert!(!segments.is_empty(), "rotated at least once");
    let mut lines: Vec<serde_json::Value> = Vec::new();
    for file in segments.iter().chain([&path]) {
        let text = std::fs::read_to_string(file).unwrap();
        lines.extend(
            text.lines()
                .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()),
        );
    }
    assert_eq!(lines.len(), 6, "{lines:?}");
    let seqs: Vec<i64> = lines.iter().map(|l| l["seq"].as_i64().unwrap()).collect();
    assert_eq!(seqs, [1, 2, 3, 4, 5, 6]);
    assert_eq!(lines[0]["record"]["dataflow"], "sidecar:/rx");
    assert_eq!(lines[0]["record"]["httpStatus"], 200);
    assert_eq!(lines[5]["record"]["errorKind"], "egress_denied");
    assert!(lines[0]["mac"].is_string(), "keyed: each line carries its HMAC");

    let verify = sallyport(&["audit", "verify"], &cfg).output().unwrap();
    let said = String::from_utf8_lossy(&verify.stdout);
    assert!(
        verify.status.success(),
        "{said} {}",
        String::from_utf8_lossy(&verify.stderr)
    );
    assert!(
        said.contains("6 record(s) verified in 2 chain(s) (hash chain and HMAC)"),
        "{said}"
    );
    let export = sallyport(&["audit", "export"], &cfg).output().unwrap();
    let exported: Vec<serde_json::Value> = String::from_utf8_lossy(&export.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(exported.len(), 6);
    assert!(
        exported[0]["chain"]
            .as_str()
            .unwrap()
            .ends_with("logs/sidecar-audit.jsonl"),
        "{}",
        exported[0]
    );
    assert_eq!(exported[3]["hash"], lines[3]["hash"]);

    // The oldest segment archived away: the rest still verifies, and verify says where the
    // chain now starts.
    let first_kept = std::fs::read_to_string(&segments[0]).unwrap().lines().count() + 1;
    std::fs::remove_file(&segments[0]).unwrap();
    let verify = sallyport(&["audit", "verify"], &cfg).output().unwrap();
    let said = String::from_utf8_lossy(&verify.stdout);
    assert!(verify.status.success(), "{said}");
    assert!(
        said.contains(&format!("starts at record {first_kept} here")),
        "{said}"
    );

    // The newest record edited in place (in the live file, or the newest segment when the
    // last write rotated it): verify fails and names it.
    let newest = [path.clone()]
        .into_iter()
        .chain(sallyport::audit::file::segments(&path).unwrap().into_iter().rev())
        .find(|f| std::fs::metadata(f).unwrap().len() > 0)
        .unwrap();
    let text = std::fs::read_to_string(&newest).unwrap();
    let last = text.lines().last().unwrap();
    let edited = text.replace(last, &last.replace("\"attempt\":1", "\"attempt\":2"));
    assert_ne!(edited, text);
    std::fs::write(&newest, edited).unwrap();
    let verify = sallyport(&["audit", "verify"], &cfg).output().unwrap();
    assert_eq!(verify.status.code(), Some(1));
    let err = String::from_utf8_lossy(&verify.stderr);
    assert!(
        err.contains("audit log broken at record 6 of chain 'file:"),
        "{err}"
    );
    assert!(err.contains("record edited"), "{err}");
}

/// One app connection's requests share one timer (see `Lanes::within`): a request never
/// waits past its route's timeout (504), and the timer left from an earlier request, sooner
/// or later than its own deadline, neither cuts it off early nor lets it run late.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_is_a_504_and_each_request_gets_its_own_full_timeout() {
    use sallyport::receiver::Action;
    let pki = RcgenPki::new();
    let ok = || Action::Respond(StatusCode::OK, vec![]);
    let slow = |ms| Action::Delay(Duration::from_millis(ms), StatusCode::OK);
    let rx = scripted(&pki, vec![ok(), slow(1200), slow(1500), slow(4000), ok()]).await;
    let port = free_port();
    let cfg = sidecar_config(
        &pki,
        &rx.url(""),
        &format!("listen = \"127.0.0.1:{port}\""),
        "[[sidecar.routes]]\nprefix = \"/t\"\nupstream = \"UPSTREAM\"\nca = \"CA\"\ntimeout = \"2s\"\nretries = 0\n\
         [[sidecar.routes]]\nprefix = \"/long\"\nupstream = \"UPSTREAM\"\nca = \"CA\"\ntimeout = \"10s\"\nretries = 0\n",
    );
    let tasks = sallyport::sidecar::start(&cfg, &Core::from_config(&cfg).unwrap())
        .await
        .unwrap();
    wait_for_port(port);
    let mut tx = app(port).await;
    let mut get = async |path: &str| {
        let started = std::time::Instant::now();
        let (s, _, body) = call(&mut tx, "GET", path, &[], Bytes::new()).await;
        (s, body, started.elapsed())
    };

    assert_eq!(get("/t/a").await.0, 200);
    // B starts 1.2 s after A and takes 1.2 s: A's deadline passes while B is under way, 1.2 s
    // before B's own.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(get("/t/b").await.0, 200, "B was cut off at A's deadline");
    // L (10 s allowed) is under way when B's deadline passes: the timer moves to L's.
    assert_eq!(get("/long/l").await.0, 200);
    // C (2 s allowed) starts with the timer at L's deadline, 10 s on.
    let (s, body, waited) = get("/t/c").await;
    assert_eq!(s, 504, "C ran past its timeout");
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"]["kind"], "timeout", "{v}");
    assert!(waited >= Duration::from_secs(2), "C was cut off after {waited:?}");
    // The app connection goes on (on a new upstream connection: C's is still busy).
    assert_eq!(get("/t/d").await.0, 200);
    assert_eq!(rx.received().len(), 5);
    tasks.iter().for_each(|t| t.abort());
}
