//! Shared test harness: PKIs (rcgen via `sallyport::pki`, and the `openssl` CLI for interop),
//! real peers we did not write (nginx, `openssl s_server`), and small socket helpers.
//! Each test binary includes it with `mod support;` and uses what it needs.
#![allow(dead_code, clippy::unwrap_used, unreachable_pub)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sallyport::pki::{self, DevPki, InitOptions};

pub mod events;
pub mod oauth;
pub mod pg;

/// A dev PKI made by rcgen (sallyport's own generator) in a temporary directory.
pub struct RcgenPki {
    pub dir: tempfile::TempDir,
    pub files: DevPki,
}

impl RcgenPki {
    /// An in-process receiver with this PKI's server certificate, trusting its CA for client
    /// certificates, answering `status`.
    pub async fn receiver(
        &self,
        auth: sallyport::receiver::ClientAuth,
        status: http::StatusCode,
    ) -> sallyport::receiver::Receiver {
        let f = &self.files;
        sallyport::receiver::Receiver::start(&f.server_cert, &f.server_key, &f.ca_cert, auth, status)
            .await
            .unwrap()
    }

    /// A receiver requiring a client certificate from this PKI, each request's answer decided
    /// by `respond` (given the request's number, from 0).
    pub async fn receiver_with(
        &self,
        respond: impl Fn(usize) -> sallyport::receiver::Action + Send + Sync + 'static,
    ) -> sallyport::receiver::Receiver {
        let f = &self.files;
        sallyport::receiver::Receiver::start_with(
            &f.server_cert,
            &f.server_key,
            &f.ca_cert,
            sallyport::receiver::ClientAuth::Required,
            std::sync::Arc::new(respond),
        )
        .await
        .unwrap()
    }

    /// [`RcgenPki::receiver_with`], also noting when each request arrived (its head, before
    /// any answer).
    pub async fn timed_receiver(
        &self,
        respond: impl Fn(usize) -> sallyport::receiver::Action + Send + Sync + 'static,
    ) -> (
        sallyport::receiver::Receiver,
        std::sync::Arc<std::sync::Mutex<Vec<Instant>>>,
    ) {
        let arrivals = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let a = arrivals.clone();
        let rx = self
            .receiver_with(move |n| {
                a.lock().unwrap().push(Instant::now());
                respond(n)
            })
            .await;
        (rx, arrivals)
    }

    /// A receiver that answers with `fault` until the returned flag is set, then 200.
    pub async fn receiver_failing_until_healthy(
        &self,
        fault: sallyport::receiver::Action,
    ) -> (
        sallyport::receiver::Receiver,
        std::sync::Arc<std::sync::atomic::AtomicBool>,
    ) {
        use std::sync::atomic::{AtomicBool, Ordering};
        let healthy = std::sync::Arc::new(AtomicBool::new(false));
        let h = healthy.clone();
        let f = &self.files;
        let rx = sallyport::receiver::Receiver::start_with(
            &f.server_cert,
            &f.server_key,
            &f.ca_cert,
            sallyport::receiver::ClientAuth::Required,
            std::sync::Arc::new(move |_| {
                if h.load(Ordering::SeqCst) {
                    sallyport::receiver::Action::Respond(http::StatusCode::OK, vec![])
                } else {
                    fault.clone()
                }
            }),
        )
        .await
        .unwrap();
        (rx, healthy)
    }

    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let files = pki::init(
            dir.path(),
            &InitOptions {
                client_uris: vec!["spiffe://sallyport.test/gateway".into()],
                ..InitOptions::default()
            },
        )
        .unwrap();
        RcgenPki { dir, files }
    }
}

/// A CA of rcgen's in a temporary directory (`ca.pem`), with a localhost server certificate
/// (`rx.pem`/`rx.key`), for tests that issue client certificates as they go.
pub struct IssuingCa {
    pub dir: tempfile::TempDir,
    pub ca: pki::CertAuthority,
}

impl IssuingCa {
    pub fn new(name: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ca = pki::CertAuthority::new(name, 30).unwrap();
        std::fs::write(dir.path().join("ca.pem"), &ca.cert_pem).unwrap();
        let server = ca.issue(&pki::LeafSpec::localhost_server(30)).unwrap();
        std::fs::write(dir.path().join("rx.pem"), &server.cert).unwrap();
        std::fs::write(dir.path().join("rx.key"), &server.key).unwrap();
        IssuingCa { dir, ca }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Write `name.pem`/`name.key`, a client certificate with CN `cn` (and DNS SAN
    /// `cn.example`) from `ca`, atomically, as cert-manager or a Vault agent renews one.
    pub fn client_from(&self, ca: &pki::CertAuthority, name: &str, cn: &str) {
        let pem = ca
            .issue(&pki::LeafSpec::client(
                cn,
                vec![format!("{cn}.example")],
                vec![],
                20,
            ))
            .unwrap();
        for (ext, text) in [("pem", &pem.cert), ("key", &pem.key)] {
            let tmp = self.path(&format!(".{name}.{ext}.tmp"));
            std::fs::write(&tmp, text).unwrap();
            std::fs::rename(&tmp, self.path(&format!("{name}.{ext}"))).unwrap();
        }
    }

    /// [`IssuingCa::client_from`] this CA.
    pub fn client(&self, name: &str, cn: &str) {
        self.client_from(&self.ca, name, cn);
    }
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A PKI made with the `openssl` CLI (EC P-256), as a receiver's operator would make it.
pub struct OpensslPki {
    pub dir: PathBuf,
    pub ca: PathBuf,
    pub ca_key: PathBuf,
    pub server: PathBuf,
    pub server_key: PathBuf,
    pub client: PathBuf,
    pub client_key: PathBuf,
}

impl OpensslPki {
    /// CA `name`, a server cert for localhost/127.0.0.1 and a client cert, in `dir/name-*`.
    pub fn new(dir: &Path, name: &str) -> Self {
        let p = |f: &str| dir.join(format!("{name}-{f}"));
        let pki = OpensslPki {
            dir: dir.to_owned(),
            ca: p("ca.pem"),
            ca_key: p("ca.key"),
            server: p("server.pem"),
            server_key: p("server.key"),
            client: p("client.pem"),
            client_key: p("client.key"),
        };
        openssl_key(&pki.ca_key);
        run(Command::new("openssl")
            .args(["req", "-x509", "-new", "-key"])
            .arg(&pki.ca_key)
            .args(["-subj", &format!("/CN={name} Test CA"), "-days", "7", "-out"])
            .arg(&pki.ca)
            .args([
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ]));
        pki.issue(
            &pki.server,
            &pki.server_key,
            "localhost",
            "DNS:localhost,IP:127.0.0.1",
            "serverAuth",
            7,
        );
        pki.issue(
            &pki.client,
            &pki.client_key,
            &format!("{name}-client"),
            &format!("DNS:{name}-client.test"),
            "clientAuth",
            7,
        );
        pki
    }

    /// Issue a leaf signed by this CA, valid for `days` (expired certs: see rcgen's LeafSpec).
    pub fn issue(&self, cert: &Path, key: &Path, cn: &str, san: &str, eku: &str, days: i64) {
        openssl_key(key);
        let csr = cert.with_extension("csr");
        let ext = cert.with_extension("ext");
        std::fs::write(&ext, format!("subjectAltName={san}\nextendedKeyUsage={eku}\n")).unwrap();
        run(Command::new("openssl")
            .args(["req", "-new", "-key"])
            .arg(key)
            .args(["-subj", &format!("/CN={cn}"), "-out"])
            .arg(&csr));
        let mut cmd = Command::new("openssl");
        cmd.args(["x509", "-req", "-in"])
            .arg(&csr)
            .arg("-CA")
            .arg(&self.ca)
            .arg("-CAkey")
            .arg(&self.ca_key);
        cmd.args(["-CAcreateserial", "-extfile"])
            .arg(&ext)
            .arg("-out")
            .arg(cert);
        cmd.args(["-days", &days.to_string()]);
        run(&mut cmd);
    }
}

fn openssl_key(path: &Path) {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl ecparam -name prime256v1 -genkey -noout | openssl pkcs8 -topk8 -nocrypt -out '{}'",
            path.display()
        ))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl key: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Wait until something accepts TCP connections on `port`.
pub fn wait_for_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("nothing listens on 127.0.0.1:{port}");
}

/// A child process killed when dropped.
pub struct Peer {
    pub child: Child,
    pub port: u16,
    pub dir: PathBuf,
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Peer {
    pub fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.port)
    }
}

/// nginx in the foreground, single process (`master_process off`, so killing the child
/// leaves no orphaned workers behind), with `server_block` (which must contain `listen 127.0.0.1:{PORT}`
/// literally as `listen 127.0.0.1:PORT`). Logs go to `dir/nginx-PORT/`.
pub fn nginx(dir: &Path, server_block: &str) -> Peer {
    let port = free_port();
    let prefix = dir.join(format!("nginx-{port}"));
    std::fs::create_dir_all(prefix.join("logs")).unwrap();
    let conf = prefix.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "worker_processes 1; daemon off; master_process off; pid {p}/nginx.pid; error_log {p}/logs/error.log info;\n\
             events {{ worker_connections 1024; }}\n\
             http {{ access_log {p}/logs/access.log; client_body_temp_path {p}/body; proxy_temp_path {p}/proxy;\n\
             fastcgi_temp_path {p}/fcgi; uwsgi_temp_path {p}/uwsgi; scgi_temp_path {p}/scgi;\n{}\n}}\n",
            server_block.replace("PORT", &port.to_string()),
            p = prefix.display()
        ),
    )
    .unwrap();
    let child = Command::new("nginx")
        .arg("-c")
        .arg(&conf)
        .arg("-p")
        .arg(&prefix)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nginx is installed (the test command installs it)");
    wait_for_port(port);
    Peer {
        child,
        port,
        dir: prefix,
    }
}

/// nginx requiring client certificates from `client_ca` (`ssl_verify_client on`), answering
/// 200 `received` to every request.
pub fn nginx_mtls(dir: &Path, server_cert: &Path, server_key: &Path, client_ca: &Path) -> Peer {
    nginx(
        dir,
        &format!(
            "server {{ listen 127.0.0.1:PORT ssl; ssl_certificate {}; ssl_certificate_key {};\n\
             ssl_client_certificate {}; ssl_verify_client on;\n\
             location / {{ return 200 \"received $ssl_client_s_dn\"; }} }}",
            server_cert.display(),
            server_key.display(),
            client_ca.display()
        ),
    )
}

/// `openssl s_server -www` with the given client-verification flag. Note: s_server only fails
/// the handshake on a bad client certificate with `-verify_return_error` in `extra`.
/// (`-Verify 1` requires a
/// client certificate, `-verify 1` requests but does not require one, `None` never asks).
pub fn openssl_s_server(
    dir: &Path,
    cert: &Path,
    key: &Path,
    ca: &Path,
    verify: Option<&str>,
    extra: &[&str],
) -> Peer {
    let port = free_port();
    let mut cmd = Command::new("openssl");
    cmd.args([
        "s_server",
        "-quiet",
        "-www",
        "-accept",
        &port.to_string(),
        "-cert",
    ])
    .arg(cert)
    .arg("-key")
    .arg(key)
    .arg("-CAfile")
    .arg(ca);
    if let Some(flag) = verify {
        cmd.args([flag, "1"]);
    }
    cmd.args(extra);
    let child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_port(port);
    Peer {
        child,
        port,
        dir: dir.to_owned(),
    }
}

/// One plain-HTTP/1.1 request to a local listener: (status, body).
pub async fn http(method: &str, url: &str, bearer: Option<&str>, body: &[u8]) -> (u16, String) {
    use http_body_util::BodyExt;
    let uri: http::Uri = url.parse().unwrap();
    let addr = format!("{}:{}", uri.host().unwrap(), uri.port_u16().unwrap());
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut tx, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
    let mut req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost");
    if let Some(t) = bearer {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let req = req
        .body(http_body_util::Full::new(bytes::Bytes::copy_from_slice(body)))
        .unwrap();
    let res = tx.send_request(req).await.unwrap();
    let status = res.status().as_u16();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// GET `/metrics` from the admin listener on `admin` with `token` and `accept`; asserts 200
/// and returns the content type and the body.
pub async fn get_metrics(admin: u16, token: &str, accept: &str) -> (String, bytes::Bytes) {
    use http_body_util::BodyExt;
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", admin))
        .await
        .unwrap();
    let (mut tx, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get("/metrics")
        .header("host", "localhost")
        .header("authorization", format!("Bearer {token}"))
        .header("accept", accept)
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let res = tx.send_request(req).await.unwrap();
    assert_eq!(res.status(), 200);
    let ct = res.headers()["content-type"].to_str().unwrap().to_owned();
    (ct, res.into_body().collect().await.unwrap().to_bytes())
}

/// Start the `sallyport` binary with `args` and `envs` (stdout and stderr discarded, killed
/// when dropped), once something accepts connections on `port`.
pub async fn spawn_sallyport(args: &[&str], envs: &[(&str, &str)], port: u16) -> tokio::process::Child {
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_sallyport"))
        .args(args)
        .envs(envs.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    tokio::task::spawn_blocking(move || wait_for_port(port))
        .await
        .unwrap();
    child
}

/// NDJSON updates for profiles `p{from}`..`p{from+n-1}`, each realized in segment `s1`.
pub fn s1_profiles(from: usize, n: usize) -> Vec<u8> {
    (from..from + n)
        .map(|i| {
            serde_json::json!({"profileId": format!("p{i}"), "segments": [{"id": "s1", "status": "realized"}]})
                .to_string()
                + "\n"
        })
        .collect::<String>()
        .into_bytes()
}

/// Poll `done` every 20 ms until it holds, failing after `limit`.
pub async fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `sallyport serve` as a child process; killed (SIGKILL) when dropped.
pub struct ServeProcess(tokio::process::Child);

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.0.start_kill();
    }
}

/// Start `sallyport serve --config cfg` with the admin token in `SALLYPORT_TEST_ADMIN_TOKEN`,
/// and wait for its admin port.
pub async fn serve_process(cfg: &Path, admin: u16, token: &str) -> ServeProcess {
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_sallyport"))
        .args(["serve", "--config"])
        .arg(cfg)
        .env("SALLYPORT_TEST_ADMIN_TOKEN", token)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    tokio::task::spawn_blocking(move || wait_for_port(admin))
        .await
        .unwrap();
    ServeProcess(child)
}

/// Run the `sallyport` CLI; whether it succeeded, and its stdout then stderr.
pub fn sallyport_cli(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_sallyport"))
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}
