//! Certificate compression (RFC 8879): our client hellos offer brotli and zlib
//! decompression, so a receiver that supports it sends its chain compressed.
//!
//! The installed OpenSSL (3.0) has no certificate compression (`s_server -cert_comp` came in
//! 3.2) and nginx builds on it, so the peer here is a rustls server whose compressor counts
//! what it compresses: it is only asked when the client offered the algorithm.
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use rustls::compress::{CertCompressor, CompressionFailed, CompressionLevel};
use rustls::CertificateCompressionAlgorithm;
use sallyport::tls::{ClientTlsConfig, Trust};
use support::*;

#[derive(Debug)]
struct Counting {
    inner: &'static dyn CertCompressor,
    used: AtomicUsize,
}

impl CertCompressor for Counting {
    fn compress(&self, input: Vec<u8>, level: CompressionLevel) -> Result<Vec<u8>, CompressionFailed> {
        self.used.fetch_add(1, Ordering::SeqCst);
        self.inner.compress(input, level)
    }
    fn algorithm(&self) -> CertificateCompressionAlgorithm {
        self.inner.algorithm()
    }
}

#[test]
fn our_client_configs_offer_brotli_and_zlib_decompression() {
    let pki = RcgenPki::new();
    let tls = ClientTlsConfig::new(
        Trust::from_pem_file(&pki.files.ca_cert).unwrap(),
        None,
        sallyport::tls::client::ALPN_H2_H1,
    )
    .unwrap();
    let (cfg, _) = tls.for_connection();
    let offered: Vec<_> = cfg.cert_decompressors.iter().map(|d| d.algorithm()).collect();
    assert!(
        offered.contains(&CertificateCompressionAlgorithm::Brotli),
        "{offered:?}"
    );
    assert!(
        offered.contains(&CertificateCompressionAlgorithm::Zlib),
        "{offered:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_compresses_its_chain_is_verified_through_it() {
    for inner in [
        rustls::compress::BROTLI_COMPRESSOR,
        rustls::compress::ZLIB_COMPRESSOR,
    ] {
        let pki = RcgenPki::new();
        let f = &pki.files;
        let compressor: &'static Counting = Box::leak(Box::new(Counting {
            inner,
            used: AtomicUsize::new(0),
        }));
        let chain = sallyport::tls::pem::load_certs(&f.server_cert).unwrap();
        let key = sallyport::tls::pem::load_key(&f.server_key).unwrap();
        let mut server = rustls::ServerConfig::builder_with_provider(sallyport::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        server.cert_compressors = vec![compressor];
        server.cert_compression_cache = Arc::new(rustls::compress::CompressionCache::Disabled);
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accept = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            acceptor.accept(tcp).await.map(|_| ())
        });

        let tls = ClientTlsConfig::new(
            Trust::from_pem_file(&f.ca_cert).unwrap(),
            None,
            sallyport::tls::client::ALPN_H2_H1,
        )
        .unwrap();
        let (cfg, _) = tls.for_connection();
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let stream = tokio_rustls::TlsConnector::from(cfg)
            .connect(name, tcp)
            .await
            .unwrap();
        let (_, conn) = stream.get_ref();
        assert!(conn.peer_certificates().is_some_and(|c| !c.is_empty()));
        accept.await.unwrap().unwrap();
        assert_eq!(
            compressor.used.load(Ordering::SeqCst),
            1,
            "{:?} was not offered",
            inner.algorithm()
        );
    }
}
