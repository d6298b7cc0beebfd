//! Every listener holds connections within its limits (`max_connections`,
//! `header_read_timeout`, `idle_timeout`, `tls_handshake_timeout`): the public and admin
//! listeners of `sallyport serve` as a process, the sidecar's TCP and Unix-socket listeners.
//! Connections that send nothing, half a request head or half a TLS handshake are closed by
//! the server; a flood above the cap does not stop the public listener answering; an accept
//! loop out of file descriptors waits instead of spinning. Bounds like "closed within 5 s"
//! are for 1 s limits: they check that a limit applies, not how fast anything is.
#![allow(clippy::unwrap_used)]

mod support;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use http::StatusCode;
use sallyport::receiver::ClientAuth;
use support::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

/// A half-sent request head: the request line and one header, never the blank line.
const HALF_HEAD: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n";

/// `sallyport serve` with `public`/`admin` keys added to those sections; public and admin ports.
fn serve_config(pki: &RcgenPki, public: &str, admin: &str) -> (PathBuf, u16, u16) {
    let (public_port, admin_port) = (free_port(), free_port());
    let f = &pki.files;
    let cfg = pki.dir.path().join("serve.toml");
    std::fs::write(
        &cfg,
        format!(
            "[identity]\ncert = \"{}\"\nkey = \"{}\"\n[public]\nlisten = \"127.0.0.1:{public_port}\"\n{public}\n\
             [admin]\nlisten = \"127.0.0.1:{admin_port}\"\n{admin}\n[store]\nurl = \"sqlite://serve.db\"\n",
            f.client_cert.display(),
            f.client_key.display(),
        ),
    )
    .unwrap();
    (cfg, public_port, admin_port)
}

/// Start `sallyport serve` (under `sh -c 'ulimit -n N; exec …'` when `nofile` is given), its
/// stderr to `log`; return once the admin port accepts.
async fn start_serve(cfg: &Path, admin: u16, nofile: Option<u32>, log: &Path) -> Child {
    let bin = env!("CARGO_BIN_EXE_sallyport");
    let mut cmd = match nofile {
        Some(n) => {
            let mut c = Command::new("sh");
            c.arg("-c")
                .arg(format!("ulimit -n {n} && exec \"$0\" serve --config \"$1\""))
                .arg(bin)
                .arg(cfg);
            c
        }
        None => {
            let mut c = Command::new(bin);
            c.args(["serve", "--config", cfg.to_str().unwrap()]);
            c
        }
    };
    let child = cmd
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    tokio::task::spawn_blocking(move || wait_for_port(admin))
        .await
        .unwrap();
    child
}

/// `n` connections to `port`, each having sent `first` (maybe nothing).
async fn open(port: u16, n: usize, first: &[u8]) -> Vec<TcpStream> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        if !first.is_empty() {
            s.write_all(first).await.unwrap();
        }
        out.push(s);
    }
    out
}

/// Whether the server closes `s` (end of stream or reset) before `deadline`, reading and
/// dropping whatever it sends until then.
async fn closed_by(mut s: impl AsyncRead + Unpin, deadline: tokio::time::Instant) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

/// How many of `streams` the server closes within `limit`, and when the last of those closed
/// (after `since`).
async fn count_closed<S: AsyncRead + Unpin + Send + 'static>(
    streams: Vec<S>,
    limit: Duration,
    since: Instant,
) -> (usize, Duration) {
    let deadline = tokio::time::Instant::now() + limit;
    let mut set = tokio::task::JoinSet::new();
    for s in streams {
        set.spawn(async move { closed_by(s, deadline).await.then(Instant::now) });
    }
    let (mut closed, mut last) = (0, Duration::ZERO);
    while let Some(r) = set.join_next().await {
        if let Some(at) = r.unwrap() {
            closed += 1;
            last = last.max(at - since);
        }
    }
    (closed, last)
}

/// One complete HTTP/1.1 exchange on `s` (kept alive): the response's status.
async fn exchange<S: AsyncRead + tokio::io::AsyncWrite + Unpin>(s: &mut S, path: &str) -> u16 {
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed mid-response: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got).to_string();
        if let Some(end) = text.find("\r\n\r\n") {
            let len: usize = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap())
                })
                .unwrap();
            if got.len() >= end + 4 + len {
                return text[9..12].parse().unwrap();
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_half_sent_connections_to_public_and_admin_are_closed_after_the_header_timeout() {
    let pki = RcgenPki::new();
    let (cfg, public, admin) = serve_config(
        &pki,
        "header_read_timeout = \"1s\"",
        "header_read_timeout = \"1s\"",
    );
    let _gw = start_serve(&cfg, admin, None, &pki.dir.path().join("serve.log")).await;
    let t0 = Instant::now();
    let mut conns = open(public, 200, b"").await;
    conns.extend(open(public, 50, HALF_HEAD).await);
    conns.extend(open(admin, 20, b"").await);
    conns.extend(open(admin, 10, HALF_HEAD).await);
    let opened = t0.elapsed();
    let (closed, last) = count_closed(conns, Duration::from_secs(6), t0).await;
    eprintln!("280 connections opened in {opened:?}; {closed} closed by the server, the last {last:?} after the first opened");
    assert_eq!(closed, 280, "every idle or half-sent connection is closed");
    // The listeners still answer.
    let (status, _) = http("GET", &format!("http://127.0.0.1:{public}/healthz"), None, b"").await;
    assert_eq!(status, 200);
    let (status, _) = http("GET", &format!("http://127.0.0.1:{admin}/metrics"), None, b"").await;
    assert_eq!(
        status, 403,
        "the admin listener answers (and, with no token configured, refuses)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_its_cap_the_public_listener_closes_the_longest_idle_and_keeps_answering_a_flood_of_1000() {
    let pki = RcgenPki::new();
    // The default header timeout (10 s): what closes the flood here is the cap.
    let (cfg, public, admin) = serve_config(&pki, "max_connections = 64", "");
    let log = pki.dir.path().join("serve.log");
    let _gw = start_serve(&cfg, admin, None, &log).await;
    let t0 = Instant::now();
    let mut flood = open(public, 500, b"").await;
    flood.extend(open(public, 500, HALF_HEAD).await);
    eprintln!("1000 connections opened in {:?}", t0.elapsed());
    // While the flood's connections are held (by the client, at least), the public documents
    // are served: each new connection takes the place of the longest-idle one.
    for path in ["/healthz", "/v1/certificate"] {
        let (status, body) = http("GET", &format!("http://127.0.0.1:{public}{path}"), None, b"").await;
        assert_eq!(status, 200, "{path}: {body}");
    }
    let (status, _) = http(
        "GET",
        &format!("http://127.0.0.1:{public}/v1/certificate"),
        None,
        b"",
    )
    .await;
    assert_eq!(status, 200);
    // The server holds at most its cap: the others were closed (well before the 10 s header
    // timeout could have closed them).
    let (closed, _) = count_closed(flood, Duration::from_secs(2), t0).await;
    eprintln!(
        "of 1000 flood connections, {closed} closed by the server within {:?}",
        t0.elapsed()
    );
    assert!(closed >= 1000 - 64, "only {closed} of 1000 closed: the cap is 64");
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "closed by the cap, not the header timeout"
    );
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(
        log.contains("at its cap of 64 connections; closing the longest-idle ones"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_connections_wait_idle_timeout_for_a_request_and_header_timeout_for_its_head() {
    let pki = RcgenPki::new();
    let (cfg, public, admin) = serve_config(&pki, "header_read_timeout = \"1s\"\nidle_timeout = \"5s\"", "");
    let _gw = start_serve(&cfg, admin, None, &pki.dir.path().join("serve.log")).await;

    // Idle after an exchange: still open after the header timeout, closed after the idle one.
    let mut idle = TcpStream::connect(("127.0.0.1", public)).await.unwrap();
    assert_eq!(exchange(&mut idle, "/healthz").await, 200);
    let ended = Instant::now();
    // A second connection begins its next request head and stops halfway.
    let mut half = TcpStream::connect(("127.0.0.1", public)).await.unwrap();
    assert_eq!(exchange(&mut half, "/healthz").await, 200);
    tokio::time::sleep(Duration::from_millis(200)).await;
    half.write_all(HALF_HEAD).await.unwrap();
    let began = Instant::now();
    let (closed, after) = count_closed(vec![half], Duration::from_secs(3), began).await;
    assert_eq!(
        closed, 1,
        "a begun head is held to the header timeout (1 s), not the idle one (5 s)"
    );
    eprintln!("half-sent second head closed {after:?} after it began");

    let still_open = !closed_by(
        &mut idle,
        tokio::time::Instant::from_std(ended + Duration::from_secs(2)),
    )
    .await;
    assert!(
        still_open,
        "an idle keep-alive connection outlives the header timeout"
    );
    assert_eq!(
        exchange(&mut idle, "/healthz").await,
        200,
        "and can be used again"
    );
    let ended = Instant::now();
    let (closed, after) = count_closed(vec![idle], Duration::from_secs(9), ended).await;
    assert_eq!(
        closed, 1,
        "an idle keep-alive connection is closed after idle_timeout"
    );
    eprintln!("idle HTTP/1.1 keep-alive connection closed {after:?} after its last exchange");

    // HTTP/2 (prior knowledge): a connection that sends only the preface is held to the
    // header timeout; one that has had a stream is closed after idle_timeout.
    let mut preface = TcpStream::connect(("127.0.0.1", public)).await.unwrap();
    preface
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    let t = Instant::now();
    let (closed, _) = count_closed(vec![preface], Duration::from_secs(4), t).await;
    assert_eq!(closed, 1, "an HTTP/2 connection with no stream is closed");
    let tcp = TcpStream::connect(("127.0.0.1", public)).await.unwrap();
    let (mut tx, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    let driver = tokio::spawn(conn);
    let req = http::Request::get("/healthz")
        .header("host", "localhost")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let res = tx.send_request(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.version(), http::Version::HTTP_2);
    drop(res);
    let ended = Instant::now();
    tokio::time::timeout(Duration::from_secs(9), driver)
        .await
        .expect("the server closes an idle HTTP/2 connection")
        .unwrap()
        .ok();
    eprintln!(
        "idle HTTP/2 connection closed {:?} after its stream",
        ended.elapsed()
    );
    assert!(
        ended.elapsed() > Duration::from_secs(2),
        "not by the header timeout"
    );
}

/// A TLS client trusting `pki`'s CA.
fn tls_client(pki: &RcgenPki) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for c in sallyport::tls::pem::load_certs(&pki.files.ca_cert).unwrap() {
        roots.add(c).unwrap();
    }
    let cfg = rustls::ClientConfig::builder_with_provider(sallyport::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_silent_and_half_handshakes_are_closed_and_requests_still_served() {
    let pki = RcgenPki::new();
    let f = &pki.files;
    let public_keys = format!(
        "tls_cert = \"{}\"\ntls_key = \"{}\"\ntls_handshake_timeout = \"1s\"\nheader_read_timeout = \"1s\"",
        f.server_cert.display(),
        f.server_key.display()
    );
    let (cfg, public, admin) = serve_config(&pki, &public_keys, "");
    let _gw = start_serve(&cfg, admin, None, &pki.dir.path().join("serve.log")).await;
    let t0 = Instant::now();
    let mut conns = open(public, 50, b"").await;
    // A TLS record header promising a ClientHello that never comes.
    conns.extend(open(public, 50, &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]).await);
    let connector = tls_client(&pki);
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    // A handshake completed, then nothing: the header timeout.
    let tcp = TcpStream::connect(("127.0.0.1", public)).await.unwrap();
    let quiet = connector.connect(name.clone(), tcp).await.unwrap();
    let (closed, last) = count_closed(conns, Duration::from_secs(6), t0).await;
    eprintln!("{closed} of 100 silent or half TLS handshakes closed, the last after {last:?}");
    assert_eq!(closed, 100);
    let (closed, _) = count_closed(vec![quiet], Duration::from_secs(4), t0).await;
    assert_eq!(closed, 1, "a TLS connection that sends no request is closed");

    let tcp = TcpStream::connect(("127.0.0.1", public)).await.unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();
    assert_eq!(exchange(&mut tls, "/healthz").await, 200);
    assert_eq!(exchange(&mut tls, "/v1/certificate").await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sidecar_closes_idle_app_connections_on_tcp_and_unix_sockets_and_still_proxies() {
    let pki = RcgenPki::new();
    let rx = pki.receiver(ClientAuth::Required, StatusCode::OK).await;
    let f = &pki.files;
    let d = pki.dir.path();
    let port = free_port();
    let sock = d.join("app.sock");
    let text = format!(
        "[identity]\ncert = \"{}\"\nkey = \"{}\"\n[egress]\nallow = [\"127.0.0.0/8\"]\n\
         [store]\nurl = \"sqlite://sc.db\"\n\
         [sidecar]\nlisten = \"127.0.0.1:{port}\"\nheader_read_timeout = \"1s\"\nidle_timeout = \"2s\"\n\
         [[sidecar.routes]]\nprefix = \"/rx\"\nupstream = \"{}\"\nca = \"{}\"\n\
         [[sidecar.listeners]]\nunix_socket = \"app.sock\"\n\
         [[sidecar.listeners.routes]]\nprefix = \"/rx\"\nupstream = \"{}\"\nca = \"{}\"\n",
        f.client_cert.display(),
        f.client_key.display(),
        rx.url(""),
        f.ca_cert.display(),
        rx.url(""),
        f.ca_cert.display(),
    );
    let cfg = sallyport::config::Config::from_toml(&text, Path::new("sc.toml"), d).unwrap();
    let core = sallyport::delivery::Core::from_config(&cfg).unwrap();
    let tasks = sallyport::sidecar::start(&cfg, &core).await.unwrap();
    tokio::task::spawn_blocking(move || wait_for_port(port))
        .await
        .unwrap();

    let t0 = Instant::now();
    let mut tcp = open(port, 50, b"").await;
    tcp.extend(open(port, 20, HALF_HEAD).await);
    let mut unix = Vec::new();
    for i in 0..30 {
        let mut s = tokio::net::UnixStream::connect(&sock).await.unwrap();
        if i % 2 == 1 {
            s.write_all(HALF_HEAD).await.unwrap();
        }
        unix.push(s);
    }
    // Requests go through as before, on both listeners, while those connections wait.
    let mut app = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    assert_eq!(exchange(&mut app, "/rx/in").await, 200);
    let mut unix_app = tokio::net::UnixStream::connect(&sock).await.unwrap();
    assert_eq!(exchange(&mut unix_app, "/rx/in").await, 200);
    assert_eq!(rx.received().len(), 2);

    let ((tcp_closed, tcp_last), (unix_closed, unix_last)) = tokio::join!(
        count_closed(tcp, Duration::from_secs(6), t0),
        count_closed(unix, Duration::from_secs(6), t0)
    );
    eprintln!(
        "sidecar: {tcp_closed}/70 TCP closed (last {tcp_last:?}), {unix_closed}/30 Unix (last {unix_last:?})"
    );
    assert_eq!((tcp_closed, unix_closed), (70, 30));
    // The app connections, idle since their exchange, go after idle_timeout (2 s).
    let ended = Instant::now();
    let ((a, _), (b, _)) = tokio::join!(
        count_closed(vec![app], Duration::from_secs(6), ended),
        count_closed(vec![unix_app], Duration::from_secs(6), ended)
    );
    assert_eq!(
        (a, b),
        (1, 1),
        "idle app connections are closed after idle_timeout"
    );
    for t in tasks {
        t.abort();
    }
}

/// CPU time (user + system, in clock ticks) `pid` has used.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    // After the command name: state is field 3, utime 14, stime 15.
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_file_descriptors_the_accept_loop_waits_instead_of_spinning_and_recovers() {
    let pki = RcgenPki::new();
    // The flood's connections would be held 30 s: what frees descriptors here is the back-off.
    let (cfg, public, admin) = serve_config(&pki, "header_read_timeout = \"30s\"", "");
    let log = pki.dir.path().join("serve.log");
    let mut gw = start_serve(&cfg, admin, Some(64), &log).await;
    let pid = gw.id().unwrap();
    // A keep-alive connection to the admin listener from before the flood. (One to the
    // public listener would be its longest-idle connection, which each back-off closes to
    // free a descriptor.)
    let mut before = TcpStream::connect(("127.0.0.1", admin)).await.unwrap();
    assert_eq!(exchange(&mut before, "/metrics").await, 403);
    // More connections than the process has descriptors: the kernel queues them, accept
    // fails with EMFILE.
    let flood = open(public, 150, b"").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (t1, c1) = (Instant::now(), cpu_ticks(pid));
    // Meanwhile the process serves the connection from before.
    for _ in 0..6 {
        assert_eq!(exchange(&mut before, "/metrics").await, 403);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (wall, used) = (t1.elapsed(), cpu_ticks(pid) - c1);
    let ticks = 100.0; // USER_HZ on Linux
    let share = used as f64 / ticks / wall.as_secs_f64();
    eprintln!(
        "out of descriptors: {used} ticks of CPU in {wall:?} ({:.1}% of a core)",
        share * 100.0
    );
    assert!(
        share < 0.25,
        "the accept loop spins: {:.0}% of a core",
        share * 100.0
    );
    let text = std::fs::read_to_string(&log).unwrap();
    let warnings = text.matches("accepting a connection failed").count();
    assert!(
        (1..=2).contains(&warnings),
        "one warning per burst (per 10 s), not one per error:\n{text}"
    );
    assert!(text.contains("Too many open files"), "{text}");
    // When the flood ends, new connections are served again.
    drop(flood);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let attempt = tokio::time::timeout(Duration::from_secs(2), async {
            let mut s = TcpStream::connect(("127.0.0.1", public)).await.ok()?;
            Some(exchange(&mut s, "/healthz").await)
        })
        .await;
        if let Ok(Some(200)) = attempt {
            break;
        }
        assert!(Instant::now() < deadline, "the listener did not recover");
    }
    let _ = gw.start_kill();
}

#[test]
fn limits_are_checked_with_their_key_paths_and_the_documented_ones_parse() {
    let tmp = tempfile::tempdir().unwrap();
    let text =
        "[public]\nmax_connections = 0\nheader_read_timeout = \"50ms\"\ntls_handshake_timeout = \"soon\"\n\
                [admin]\nidle_timeout = \"2h\"\n\
                [sidecar]\nmax_connections = 2000000\nheader_read_timeout = \"6m\"\n\
                [[sidecar.routes]]\nprefix = \"/\"\nupstream = \"https://127.0.0.1/\"\nmtls = false\n\
                [egress]\nallow = [\"127.0.0.0/8\"]\n";
    let err = sallyport::config::Config::from_toml(text, Path::new("bad.toml"), tmp.path())
        .unwrap_err()
        .to_string();
    for (key, reason) in [
        ("public.max_connections", "must be from 1 to 1000000"),
        ("public.header_read_timeout", "from 100ms to 5m"),
        ("public.tls_handshake_timeout", "not a duration"),
        ("admin.idle_timeout", "from 100ms to 1h"),
        ("sidecar.max_connections", "must be from 1 to 1000000"),
        ("sidecar.header_read_timeout", "from 100ms to 5m"),
    ] {
        assert!(
            err.contains(&format!("{key}: ")) && err.contains(reason),
            "{key}: {reason} in\n{err}"
        );
    }

    // The documented files set every key, to its default.
    std::fs::create_dir_all(tmp.path().join("config")).unwrap();
    sallyport::pki::init(&tmp.path().join("certs"), &Default::default()).unwrap();
    for file in ["config/sallyport.toml", "config/sidecar.toml"] {
        let text = std::fs::read_to_string(file).unwrap();
        let cfg =
            sallyport::config::Config::from_toml(&text, Path::new(file), &tmp.path().join("config")).unwrap();
        let defaults = [cfg.public.limits().unwrap(), cfg.admin.limits().unwrap()];
        assert_eq!(
            (defaults[0].max_connections, defaults[1].max_connections),
            (1024, 256)
        );
        for l in defaults {
            assert_eq!(l.header_read_timeout, Duration::from_secs(10));
            assert_eq!(l.idle_timeout, Duration::from_secs(60));
            assert_eq!(l.tls_handshake_timeout, Duration::from_secs(10));
        }
        if let Some(sc) = &cfg.sidecar {
            assert_eq!(
                sc.limits().unwrap(),
                sallyport::config::SidecarConfig::default_limits()
            );
            assert_eq!(sc.limits().unwrap().max_connections, 4096);
        }
    }
}
