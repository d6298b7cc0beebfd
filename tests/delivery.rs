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

    let wrong = client(&good.ca, &other.client, &other.client_key, true);
    let err = wrong.send(get(&srv.url("/"))).await.unwrap_err();
    assert!(
        matches!(
            err.kind(),
            ErrorKind::ClientCertRejected | ErrorKind::TlsHandshake
        ),
        "a cert from another CA must fail the handshake: {err}"
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
