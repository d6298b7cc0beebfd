//! The delivery client against real receivers: our rustls receiver, `openssl s_server`, nginx.
#![allow(clippy::unwrap_used)]

mod support;

use http::{HeaderMap, Method, StatusCode};
use sallyport::config::DestinationConfig;
use sallyport::delivery::{Core, DeliveryClient, ErrorKind, OutboundRequest};
use sallyport::receiver::{ClientAuth, Receiver};
use sallyport::tls::creds::{Identities, IdentityStore};
use std::path::Path;
use support::*;

fn client(ca: &Path, cert: &Path, key: &Path, mtls: bool) -> DeliveryClient {
    let core = Core::new(
        std::sync::Arc::new(Identities::one(IdentityStore::from_files(cert, key).unwrap())),
        std::sync::Arc::new(sallyport::egress::Egress::allowing(&["127.0.0.0/8"]).unwrap()),
    );
    core.destination(&DestinationConfig {
        mtls,
        ca: Some(ca.to_owned()),
        ..DestinationConfig::new("test", None)
    })
    .unwrap()
}

fn get(url: &str) -> OutboundRequest {
    OutboundRequest {
        method: Method::GET,
        ..post(url, "")
    }
}

fn post(url: &str, body: &str) -> OutboundRequest {
    OutboundRequest {
        method: Method::POST,
        url: url::Url::parse(url).unwrap(),
        headers: HeaderMap::new(),
        body: body.to_owned().into(),
    }
}

#[tokio::test]
async fn delivers_to_an_mtls_receiver_which_sees_our_cn_and_sans() {
    let pki = RcgenPki::new();
    let f = &pki.files;
    let rx = pki.receiver(ClientAuth::Required, StatusCode::OK).await;
    let c = client(&f.ca_cert, &f.client_cert, &f.client_key, true);
    let d = c.send(post(&rx.url("/in"), r#"{"a":1}"#)).await.unwrap();
    assert_eq!(d.status, StatusCode::OK);
    let peer = d.peer.unwrap();
    assert!(peer.client_cert_requested && peer.client_cert_presented);
    assert_eq!(
        peer.server_certificate.as_ref().unwrap().subject_cn.as_deref(),
        Some("localhost")
    );
    let got = rx.received();
    assert_eq!(got.len(), 1);
    assert_eq!(&got[0].body[..], br#"{"a":1}"#);
    let cert = got[0]
        .client_cert
        .as_ref()
        .expect("receiver saw a client certificate");
    assert_eq!(cert.subject_cn.as_deref(), Some("sallyport-gateway"));
    assert_eq!(cert.sans.dns, vec!["gateway.sallyport.test"]);
    assert_eq!(cert.sans.uri, vec!["spiffe://sallyport.test/gateway"]);
}

#[tokio::test]
async fn refuses_a_receiver_that_does_not_request_a_client_certificate() {
    let pki = RcgenPki::new();
    let f = &pki.files;
    let rx = pki.receiver(ClientAuth::NotRequested, StatusCode::OK).await;
    let c = client(&f.ca_cert, &f.client_cert, &f.client_key, true);
    let err = c.send(post(&rx.url("/in"), "secret profile")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::MtlsNotRequested);
    assert!(
        err.to_string().contains("did not request a client certificate"),
        "{err}"
    );
    assert!(!err.retryable());
    // The handshake happened, but not one request reached the receiver.
    assert_eq!(rx.connections(), 1);
    assert!(rx.received().is_empty());
}

#[tokio::test]
async fn a_receiver_that_does_not_request_a_client_certificate_is_refused_every_time() {
    let pki = RcgenPki::new();
    let f = &pki.files;
    // This client and this receiver speak HTTP/2 (both offer h2 first in ALPN): a
    // connection between them would be one multiplexed connection, reused by every request.
    let mtls_rx = pki.receiver(ClientAuth::Required, StatusCode::OK).await;
    let c = client(&f.ca_cert, &f.client_cert, &f.client_key, true);
    let d = c.send(post(&mtls_rx.url("/in"), "{}")).await.unwrap();
    assert_eq!(d.peer.unwrap().alpn.as_deref(), Some("h2"));
    assert_eq!(mtls_rx.received()[0].http_version, "HTTP/2.0");

    let rx = pki.receiver(ClientAuth::NotRequested, StatusCode::OK).await;
    // A second request on the same client: no refused connection is kept to be used again.
    let c = client(&f.ca_cert, &f.client_cert, &f.client_key, true);
    for attempt in 1..=2 {
        let err = c.send(post(&rx.url("/in"), "secret profile")).await.unwrap_err();
        assert_eq!(
            err.kind(),
            ErrorKind::MtlsNotRequested,
            "request {attempt}: {err}"
        );
    }
    assert_eq!(
        rx.connections(),
        2,
        "each request was refused at its own handshake"
    );
    // Requests at once, which HTTP/2 would carry over the one connection being set up.
    let c = client(&f.ca_cert, &f.client_cert, &f.client_key, true);
    let sends = (0..4).map(|i| c.send(post(&rx.url("/in"), &format!("secret {i}"))));
    for (i, r) in join_all(sends).await.into_iter().enumerate() {
        let err = r.unwrap_err();
        assert_eq!(
            err.kind(),
            ErrorKind::MtlsNotRequested,
            "concurrent request {i}: {err}"
        );
    }
    assert!(
        rx.received().is_empty(),
        "nothing reached the receiver: {:?}",
        rx.received()
    );
}

/// Run `futures` concurrently, results in order (tokio's tasks, no futures crate).
async fn join_all<F: std::future::Future>(futures: impl Iterator<Item = F>) -> Vec<F::Output> {
    let mut set = Vec::new();
    for f in futures {
        set.push(Box::pin(f));
    }
    let mut out = Vec::with_capacity(set.len());
    let mut pending: Vec<Option<_>> = set.into_iter().map(Some).collect();
    let mut results: Vec<Option<F::Output>> = (0..pending.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut all = true;
        for (i, slot) in pending.iter_mut().enumerate() {
            if let Some(f) = slot {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => {
                        results[i] = Some(v);
                        *slot = None;
                    }
                    std::task::Poll::Pending => all = false,
                }
            }
        }
        if all {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    out.extend(results.into_iter().map(Option::unwrap));
    out
}

#[tokio::test]
async fn keep_alive_reuses_one_connection() {
    let pki = RcgenPki::new();
    let f = &pki.files;
    let rx = pki.receiver(ClientAuth::Required, StatusCode::OK).await;
    let c = client(&f.ca_cert, &f.client_cert, &f.client_key, true);
    for i in 0..5 {
        c.send(post(&rx.url("/in"), &format!("{i}"))).await.unwrap();
    }
    assert_eq!(rx.received().len(), 5);
    assert_eq!(rx.connections(), 1);
}

#[tokio::test]
async fn interop_with_openssl_s_server_requiring_a_certificate() {
    let tmp = tempfile::tempdir().unwrap();
    let good = OpensslPki::new(tmp.path(), "good");
    let other = OpensslPki::new(tmp.path(), "other");
    // Without -verify_return_error, s_server logs a failed client-cert verification and carries on.
    let srv = openssl_s_server(
        tmp.path(),
        &good.server,
        &good.server_key,
        &good.ca,
        Some("-Verify"),
        &["-verify_return_error"],
    );
    let ok = client(&good.ca, &good.client, &good.client_key, true);
    // s_server -www answers `GET /` only.
    let d = ok.send(get(&srv.url("/"))).await.unwrap();
    assert_eq!(d.status, StatusCode::OK, "{}", String::from_utf8_lossy(&d.body));
    // s_server -www echoes session details; our client cert's subject appears in it.
    assert!(
        String::from_utf8_lossy(&d.body).contains("good-client"),
        "{}",
        String::from_utf8_lossy(&d.body)
    );

    // In TLS 1.3 the client finishes its handshake before the server has checked the client
    // certificate, so the server's alert can come after it; the delivery core remembers
    // alerts per destination and names the failure for what it is, whichever side of the
    // handshake the alert lands on.
    let wrong = client(&good.ca, &other.client, &other.client_key, true);
    let err = wrong.send(get(&srv.url("/"))).await.unwrap_err();
    assert_eq!(
        err.kind(),
        ErrorKind::ClientCertRejected,
        "a cert from another CA must be refused, and said so: {err}"
    );
}

#[tokio::test]
async fn interop_with_nginx_ssl_verify_client_on() {
    let tmp = tempfile::tempdir().unwrap();
    let good = OpensslPki::new(tmp.path(), "good");
    let other = OpensslPki::new(tmp.path(), "other");
    let nginx = nginx_mtls(tmp.path(), &good.server, &good.server_key, &good.ca);
    let ok = client(&good.ca, &good.client, &good.client_key, true);
    let d = ok.send(post(&nginx.url("/profiles"), "{}")).await.unwrap();
    assert_eq!(d.status, StatusCode::OK);
    assert!(String::from_utf8_lossy(&d.body).contains("CN=good-client"));

    // nginx completes the handshake and answers 400; the delivery fails and says why.
    let wrong = client(&good.ca, &other.client, &other.client_key, true);
    let d = wrong.send(post(&nginx.url("/profiles"), "{}")).await;
    let err = match d {
        Ok(d) => d.error().expect("a 400 is a failed delivery"),
        Err(e) => e,
    };
    assert!(
        err.to_string().contains("rejected our client certificate")
            || err.kind() == ErrorKind::ClientCertRejected,
        "{err}"
    );
}

#[tokio::test]
async fn untrusted_server_chain_is_a_clear_error() {
    let pki = RcgenPki::new();
    let f = &pki.files;
    let rx = pki.receiver(ClientAuth::Required, StatusCode::OK).await;
    // Untrusted chain: verify against another CA.
    let other = RcgenPki::new();
    let c = client(&other.files.ca_cert, &f.client_cert, &f.client_key, true);
    let err = c.send(post(&rx.url("/"), "{}")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ServerCertificate, "{err}");
    assert!(
        err.to_string().contains("receiver's certificate was rejected"),
        "{err}"
    );
    assert!(rx.received().is_empty());
}

#[tokio::test]
async fn wrong_server_name_and_expired_server_certificate() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = sallyport::pki::CertAuthority::new("Test CA", 7).unwrap();
    let write = |name: &str, pem: &sallyport::pki::Pem| {
        let c = tmp.path().join(format!("{name}.pem"));
        let k = tmp.path().join(format!("{name}.key"));
        std::fs::write(&c, &pem.cert).unwrap();
        std::fs::write(&k, &pem.key).unwrap();
        (c, k)
    };
    std::fs::write(tmp.path().join("ca.pem"), &ca.cert_pem).unwrap();
    let ca_path = tmp.path().join("ca.pem");
    let (cc, ck) = write(
        "client",
        &ca.issue(&sallyport::pki::LeafSpec::client("gw", vec![], vec![], 7))
            .unwrap(),
    );

    let mut spec = sallyport::pki::LeafSpec::localhost_server(7);
    spec.dns = vec!["not-localhost.example".into()];
    spec.ips = vec![];
    let (sc, sk) = write("misnamed", &ca.issue(&spec).unwrap());
    let rx = Receiver::start(&sc, &sk, &ca_path, ClientAuth::Required, StatusCode::OK)
        .await
        .unwrap();
    let err = client(&ca_path, &cc, &ck, true)
        .send(post(&rx.url("/"), "{}"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ServerCertificate);
    assert!(err.to_string().contains("NotValidForName"), "{err}");

    let mut spec = sallyport::pki::LeafSpec::localhost_server(7);
    spec.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(30);
    spec.not_after = time::OffsetDateTime::now_utc() - time::Duration::days(1);
    let (sc, sk) = write("expired", &ca.issue(&spec).unwrap());
    let rx = Receiver::start(&sc, &sk, &ca_path, ClientAuth::Required, StatusCode::OK)
        .await
        .unwrap();
    let err = client(&ca_path, &cc, &ck, true)
        .send(post(&rx.url("/"), "{}"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ServerCertificate);
    assert!(err.to_string().contains("Expired"), "{err}");
}
