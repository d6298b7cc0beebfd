//! Two bare forward proxies for the sidecar job (plain HTTP/1.1 in, mTLS with a client
//! certificate out), on one thread, with nothing in them but the proxying: no routes, policy,
//! auth, timeouts, retries or audit. They measure what the job costs on this stack, so that
//! Sallyport's own cost can be told from the stack's, and a target from a floor.
//!
//! - `hyper`: hyper's HTTP/1 server, and per app connection one upstream connection driven by
//!   hyper's HTTP/1 client (Sallyport's lane design without Sallyport).
//! - `raw`: httparse over tokio-rustls, one buffer each way, each request and each response
//!   forwarded in one write. GET and POST with Content-Length bodies up to 1 MiB only (what
//!   the benchmark sends); a chunked body closes the connection, and HEAD or bodiless 1xx/204/
//!   304 answers are not special-cased. Not a proxy anyone should deploy: a floor.
//!
//! Usage: sidecar-floor hyper|raw LISTEN UPSTREAM(host:port) SNI CA CERT KEY

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls::{self, pki_types};
use tokio_rustls::TlsConnector;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The raw floor holds a whole body in memory: larger ones are refused.
const MAX_BODY: usize = 1 << 20;

const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authorization",
    "host",
];

struct Upstream {
    addr: SocketAddr,
    host: String,
    sni: pki_types::ServerName<'static>,
    tls: TlsConnector,
}

impl Upstream {
    async fn connect(&self) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(self.addr).await?;
        tcp.set_nodelay(true)?;
        self.tls.connect(self.sni.clone(), tcp).await
    }
}

fn fail(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn load(args: &[String]) -> Result<(String, Upstream), String> {
    use pki_types::pem::PemObject;
    let [_, _, listen, upstream, sni, ca, cert, key] = args else {
        return Err("usage: sidecar-floor hyper|raw LISTEN UPSTREAM SNI CA CERT KEY".into());
    };
    let mut roots = rustls::RootCertStore::empty();
    for c in pki_types::CertificateDer::pem_file_iter(ca).map_err(|e| format!("{ca}: {e}"))? {
        roots
            .add(c.map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    }
    let chain = pki_types::CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("{cert}: {e}"))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    let key = pki_types::PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{key}: {e}"))?;
    let config =
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| e.to_string())?;
    let addr = std::net::ToSocketAddrs::to_socket_addrs(upstream.as_str())
        .map_err(|e| format!("{upstream}: {e}"))?
        .next()
        .ok_or(format!("{upstream}: no address"))?;
    let up = Upstream {
        addr,
        host: format!("{sni}:{}", addr.port()),
        sni: pki_types::ServerName::try_from(sni.clone()).map_err(|e| e.to_string())?,
        tls: TlsConnector::from(Arc::new(config)),
    };
    Ok((listen.clone(), up))
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (listen, up) = match load(&args) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("sidecar-floor: {e}");
            std::process::exit(2);
        }
    };
    let raw = args[1] == "raw";
    let up = Arc::new(up);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    rt.block_on(async move {
        let listener = TcpListener::bind(&listen).await.expect("the listen address");
        loop {
            let Ok((app, _)) = listener.accept().await else {
                continue;
            };
            let _ = app.set_nodelay(true);
            let up = up.clone();
            if raw {
                tokio::spawn(async move {
                    let _ = raw_conn(app, &up).await;
                });
            } else {
                tokio::spawn(hyper_conn(app, up));
            }
        }
    });
}

/// A message's Content-Length (0 when it has none); a Transfer-Encoding is refused.
fn content_length(headers: &[httparse::Header<'_>]) -> io::Result<usize> {
    let mut len = 0;
    for h in headers {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(fail("chunked bodies are not handled by the raw floor"));
        }
        if h.name.eq_ignore_ascii_case("content-length") {
            len = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .filter(|n| *n <= MAX_BODY)
                .ok_or_else(|| fail("bad or too large content-length"))?;
        }
    }
    Ok(len)
}

fn put_headers(out: &mut Vec<u8>, headers: &[httparse::Header<'_>]) {
    for h in headers {
        if HOP_BY_HOP.iter().any(|n| h.name.eq_ignore_ascii_case(n)) {
            continue;
        }
        out.extend_from_slice(h.name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(h.value);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// Read from `from` into `buf` until it holds `want` bytes.
async fn fill<R: AsyncReadExt + Unpin>(from: &mut R, buf: &mut Vec<u8>, want: usize) -> io::Result<()> {
    while buf.len() < want {
        if from.read_buf(buf).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(())
}

async fn raw_conn(mut app: TcpStream, up: &Upstream) -> io::Result<()> {
    let mut upstream = None;
    let (mut inb, mut rb, mut out) = (
        Vec::with_capacity(16384),
        Vec::with_capacity(16384),
        Vec::with_capacity(16384),
    );
    loop {
        // The app's request head.
        let (head, body) = loop {
            let mut hs = [httparse::EMPTY_HEADER; 64];
            let mut req = httparse::Request::new(&mut hs);
            if let httparse::Status::Complete(n) = req.parse(&inb).map_err(|e| fail(e.to_string()))? {
                out.clear();
                out.extend_from_slice(req.method.unwrap_or("GET").as_bytes());
                out.push(b' ');
                out.extend_from_slice(req.path.unwrap_or("/").as_bytes());
                out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
                out.extend_from_slice(up.host.as_bytes());
                out.extend_from_slice(b"\r\n");
                put_headers(&mut out, req.headers);
                break (n, content_length(req.headers)?);
            }
            if inb.len() > 64 * 1024 {
                return Err(fail("request head too large"));
            }
            if app.read_buf(&mut inb).await? == 0 {
                return Ok(());
            }
        };
        fill(&mut app, &mut inb, head + body).await?;
        out.extend_from_slice(&inb[head..head + body]);
        inb.drain(..head + body);
        let tls = match &mut upstream {
            Some(t) => t,
            None => upstream.insert(up.connect().await?),
        };
        tls.write_all(&out).await?;
        tls.flush().await?;
        // The receiver's response.
        rb.clear();
        let (head, body) = loop {
            let mut hs = [httparse::EMPTY_HEADER; 64];
            let mut res = httparse::Response::new(&mut hs);
            if let httparse::Status::Complete(n) = res.parse(&rb).map_err(|e| fail(e.to_string()))? {
                out.clear();
                out.extend_from_slice(
                    format!(
                        "HTTP/1.1 {} {}\r\n",
                        res.code.unwrap_or(502),
                        res.reason.unwrap_or("")
                    )
                    .as_bytes(),
                );
                put_headers(&mut out, res.headers);
                break (n, content_length(res.headers)?);
            }
            if tls.read_buf(&mut rb).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        };
        fill(tls, &mut rb, head + body).await?;
        out.extend_from_slice(&rb[head..head + body]);
        app.write_all(&out).await?;
    }
}

async fn hyper_conn(app: TcpStream, up: Arc<Upstream>) {
    use hyper::client::conn::http1 as client;
    use hyper_util::rt::TokioIo;
    type Lane = Arc<tokio::sync::Mutex<Option<client::SendRequest<hyper::body::Incoming>>>>;
    let lane: Lane = Arc::default();
    let svc = hyper::service::service_fn(move |mut req: http::Request<hyper::body::Incoming>| {
        let (lane, up) = (lane.clone(), up.clone());
        async move {
            let headers = req.headers_mut();
            for name in HOP_BY_HOP {
                headers.remove(*name);
            }
            headers.insert(
                http::header::HOST,
                http::HeaderValue::from_str(&up.host).map_err(io_err)?,
            );
            let mut lane = lane.lock().await;
            if lane.as_ref().is_none_or(|s| s.is_closed()) {
                let tls = up.connect().await?;
                let (sender, conn) = client::handshake(TokioIo::new(tls)).await.map_err(io_err)?;
                tokio::spawn(conn);
                *lane = Some(sender);
            }
            let sender = lane.as_mut().ok_or_else(|| fail("no lane"))?;
            let mut res = sender.send_request(req).await.map_err(io_err)?;
            for name in HOP_BY_HOP {
                res.headers_mut().remove(*name);
            }
            Ok::<_, io::Error>(res)
        }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(app), svc)
        .await;
}

fn io_err(e: impl std::error::Error + Send + Sync + 'static) -> io::Error {
    io::Error::other(e)
}
