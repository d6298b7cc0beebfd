//! Identities from the SPIFFE Workload API. No SPIRE can be installed here (it ships from
//! GitHub releases, and no Debian package carries it), so the agent is ours: a minimal Workload
//! API server in Python (`tests/spiffe/workload_api_server.py`) built from the published
//! `workload.proto` with grpcio-tools (PyPI, installed under target/ by
//! `scripts/spiffe-workload-api.sh`), which refuses calls without the `workload.spiffe.io`
//! header as SPIRE does. SVIDs are made with rcgen (a URI SAN `spiffe://…`); rotating one is
//! replacing the server's state file, which it pushes on every open stream.
#![allow(clippy::unwrap_used)]

mod support;

use std::io::BufRead as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use http::StatusCode;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::CertificateDer;
use sallyport::config::Config;
use sallyport::receiver::{ClientAuth, Receiver};
use sallyport::tls::creds::Identities;
use support::*;

const GATEWAY_ID: &str = "spiffe://sallyport.test/gateway";

/// The Workload API server, killed when dropped.
struct Agent {
    child: std::process::Child,
    socket: PathBuf,
    log: PathBuf,
}

impl Agent {
    /// Start the server on `socket`, serving what `state` holds; returns once it listens.
    fn start(python: &Path, socket: &Path, state: &Path) -> Agent {
        let log = socket.with_extension(format!("{}.log", std::process::id()));
        let child = std::process::Command::new(python)
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/spiffe/workload_api_server.py"
            ))
            .arg(socket)
            .arg(state)
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .unwrap();
        let agent = Agent {
            child,
            socket: socket.to_owned(),
            log,
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !agent.calls().iter().any(|l| l == "ready") {
            assert!(
                std::time::Instant::now() < deadline,
                "the Workload API server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        agent
    }

    /// The lines the server logged (`ready`, `call FetchX509SVID header=true`, …).
    fn calls(&self) -> Vec<String> {
        match std::fs::File::open(&self.log) {
            Ok(f) => std::io::BufReader::new(f).lines().map_while(Result::ok).collect(),
            Err(_) => Vec::new(),
        }
    }

    fn uri(&self) -> String {
        format!("unix://{}", self.socket.display())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A Python with grpcio and the Workload API stubs (installed under target/ when missing, by
/// the script `scripts/test.sh` runs).
fn python() -> PathBuf {
    let out = std::process::Command::new("bash")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/scripts/spiffe-workload-api.sh"
        ))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "installing grpcio: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// An X.509-SVID: its chain and PKCS#8 key as DER, and the leaf's fingerprint.
struct Svid {
    id: String,
    cert: Vec<u8>,
    key: Vec<u8>,
    fingerprint: String,
}

/// A trust domain's signing CA (rcgen), issuing X.509-SVIDs as the SPIFFE spec has them: a
/// URI SAN `spiffe://…`, basic constraints CA:false, digitalSignature only.
struct SvidCa {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    cert_pem: String,
}

impl SvidCa {
    fn new(dir: &Path) -> SvidCa {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "sallyport.test SPIFFE CA");
        params.subject_alt_names = vec![rcgen::SanType::URI("spiffe://sallyport.test".try_into().unwrap())];
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let cert = params.self_signed(&key).unwrap();
        std::fs::write(dir.join("td-ca.pem"), cert.pem()).unwrap();
        SvidCa {
            cert_pem: cert.pem(),
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    fn svid(&self, cn: &str, id: &str) -> Svid {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, cn);
        params.subject_alt_names = vec![rcgen::SanType::URI(id.try_into().unwrap())];
        params.is_ca = rcgen::IsCa::ExplicitNoCa;
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(1);
        params.not_after = now + time::Duration::hours(1);
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer).unwrap().der().to_vec();
        let fingerprint = sallyport::tls::CertFacts::from_der(&cert)
            .unwrap()
            .sha256_fingerprint;
        Svid {
            id: id.to_owned(),
            cert,
            key: key.serialize_der(),
            fingerprint,
        }
    }
}

/// Replace the server's state atomically: it pushes the new SVIDs on every open stream.
fn serve_svids(state: &Path, ca: &SvidCa, svids: &[&Svid]) {
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let bundle = CertificateDer::from_pem_slice(ca.cert_pem.as_bytes()).unwrap();
    let doc = serde_json::json!({
        "svids": svids.iter().map(|s| serde_json::json!({
            "spiffe_id": s.id, "x509_svid": b64(&s.cert), "x509_svid_key": b64(&s.key),
            "bundle": b64(&bundle),
        })).collect::<Vec<_>>(),
    });
    let tmp = state.with_extension("tmp");
    std::fs::write(&tmp, doc.to_string()).unwrap();
    std::fs::rename(&tmp, state).unwrap();
}

fn identity_config(dir: &Path, table: &str) -> Result<Config, String> {
    Config::from_toml(
        &format!("[egress]\nallow = [\"127.0.0.0/8\"]\n{table}"),
        Path::new("spiffe.toml"),
        dir,
    )
    .map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_presents_the_svid_and_the_one_the_agent_rotates_to() {
    let python = python();
    let ca = IssuingCa::new("Receivers CA");
    let td = SvidCa::new(ca.dir.path());
    let state = ca.path("svids.json");
    let first = td.svid("svid-1", GATEWAY_ID);
    serve_svids(&state, &td, &[&first]);
    let agent = Agent::start(&python, &ca.path("agent.sock"), &state);
    let rx = Receiver::start(
        &ca.path("rx.pem"),
        &ca.path("rx.key"),
        &ca.path("td-ca.pem"),
        ClientAuth::Required,
        StatusCode::OK,
    )
    .await
    .unwrap();
    let (public, admin) = (free_port(), free_port());
    let cfg = ca.path("serve.toml");
    std::fs::write(
        &cfg,
        format!(
            "[egress]\nallow = [\"127.0.0.0/8\"]\n[identity]\nspiffe = {{ socket = \"{}\" }}\n\
             [public]\nlisten = \"127.0.0.1:{public}\"\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n\
             token_env = \"SPIFFE_TEST_TOKEN\"\n[store]\nurl = \"sqlite://serve.db\"\n\
             [[segments]]\nid = \"s1\"\nname = \"S\"\n[[dataflows]]\nname = \"rx\"\nendpoint = \"{}\"\n\
             ca = \"ca.pem\"\nsegments = [\"s1\"]\n",
            agent.uri(),
            rx.url("/in")
        ),
    )
    .unwrap();
    let _gw = spawn_sallyport(
        &["serve", "--config", cfg.to_str().unwrap()],
        &[("SPIFFE_TEST_TOKEN", "t")],
        admin,
    )
    .await;
    let ingest = format!("http://127.0.0.1:{admin}/v1/profiles");
    let certificate = format!("http://127.0.0.1:{public}/v1/certificate");
    let adobe = format!("http://127.0.0.1:{public}/data/core/mtls/v1/certificate/public-certificate");

    // The receiver requires a client certificate and sees the SVID, URI SAN and all.
    let (s, b) = http("POST", &ingest, Some("t"), &s1_profiles(0, 1)).await;
    assert_eq!(s, 200, "{b}");
    wait_until("the first delivery", Duration::from_secs(20), || {
        !rx.received().is_empty()
    })
    .await;
    let seen = rx.received()[0].client_cert.clone().unwrap();
    assert_eq!(seen.sha256_fingerprint, first.fingerprint);
    assert_eq!(seen.sans.uri, vec![GATEWAY_ID.to_owned()]);
    // Published like any identity.
    let (s, b) = http("GET", &certificate, None, b"").await;
    assert_eq!(s, 200);
    assert!(b.contains(&first.fingerprint), "{b}");
    assert!(b.contains(GATEWAY_ID), "{b}");
    let (_, b) = http("GET", &adobe, None, b"").await;
    assert!(b.contains("svid-1"), "{b}");
    // Every call carried the Workload API's security header (the server refuses others).
    assert!(
        agent
            .calls()
            .iter()
            .any(|l| l == "call FetchX509SVID header=true"),
        "{:?}",
        agent.calls()
    );

    // The agent rotates the SVID: published, then presented on the next connection.
    let second = td.svid("svid-2", GATEWAY_ID);
    serve_svids(&state, &td, &[&second]);
    let mut published = false;
    for _ in 0..250 {
        let (_, b) = http("GET", &certificate, None, b"").await;
        if b.contains(&second.fingerprint) {
            assert!(
                !b.contains(&first.fingerprint),
                "the old SVID is no longer published: {b}"
            );
            published = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    assert!(published, "the rotated SVID was never published");
    let (_, b) = http("GET", &adobe, None, b"").await;
    assert!(b.contains("svid-2"), "{b}");
    let (s, _) = http("POST", &ingest, Some("t"), &s1_profiles(1, 1)).await;
    assert_eq!(s, 200);
    wait_until("the second delivery", Duration::from_secs(20), || {
        rx.received().len() >= 2
    })
    .await;
    let seen = rx.received()[1].client_cert.clone().unwrap();
    assert_eq!(
        seen.sha256_fingerprint, second.fingerprint,
        "the next connection presents the new SVID"
    );
    assert!(
        agent
            .calls()
            .iter()
            .all(|l| !l.starts_with("call ") || l.ends_with("header=true")),
        "{:?}",
        agent.calls()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pushed_rotation_fires_the_hook_and_a_broken_stream_keeps_the_last_svid() {
    let python = python();
    let ca = IssuingCa::new("Receivers CA");
    let td = SvidCa::new(ca.dir.path());
    let state = ca.path("svids.json");
    let socket = ca.path("agent.sock");
    let first = td.svid("svid-1", GATEWAY_ID);
    serve_svids(&state, &td, &[&first]);
    let agent = Agent::start(&python, &socket, &state);
    let cfg = identity_config(
        ca.dir.path(),
        &format!("[identity]\nspiffe = {{ socket = \"{}\" }}\n", agent.uri()),
    )
    .unwrap();
    let ids = Identities::from_config(&cfg).unwrap();
    let store = ids.get(None).unwrap().clone();
    assert_eq!(store.presented().facts.sha256_fingerprint, first.fingerprint);
    let ca_der = CertificateDer::from_pem_slice(td.cert_pem.as_bytes()).unwrap();
    assert_eq!(
        store.spiffe_bundle(),
        vec![ca_der],
        "the trust domain's bundle is kept"
    );
    let rotations = Arc::new(Mutex::new(Vec::<(String, String, String)>::new()));
    let r = rotations.clone();
    ids.on_rotation(Arc::new(
        move |name: &str, rot: &sallyport::tls::creds::Rotation| {
            r.lock().unwrap().push((
                name.to_owned(),
                rot.old_fingerprint.clone(),
                rot.new.sha256_fingerprint.clone(),
            ))
        },
    ));
    let generation = store.generation();

    // A rotation pushed by the agent: in force at once, and the rotation hook hears of it.
    let second = td.svid("svid-2", GATEWAY_ID);
    serve_svids(&state, &td, &[&second]);
    wait_until("the pushed SVID", Duration::from_secs(10), || {
        store.presented().facts.sha256_fingerprint == second.fingerprint
    })
    .await;
    assert!(store.generation() > generation, "pools start afresh");
    wait_until("the rotation hook", Duration::from_secs(5), || {
        !rotations.lock().unwrap().is_empty()
    })
    .await;
    assert_eq!(
        rotations.lock().unwrap()[0],
        (
            "default".to_owned(),
            first.fingerprint.clone(),
            second.fingerprint.clone()
        )
    );

    // The agent goes away: the last SVID stays in use; when it is back (with a new SVID) the
    // feed reconnects and takes it.
    drop(agent);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(store.presented().facts.sha256_fingerprint, second.fingerprint);
    let third = td.svid("svid-3", GATEWAY_ID);
    serve_svids(&state, &td, &[&third]);
    let _agent = Agent::start(&python, &socket, &state);
    wait_until("the SVID after reconnecting", Duration::from_secs(20), || {
        store.presented().facts.sha256_fingerprint == third.fingerprint
    })
    .await;
    wait_until("the second rotation", Duration::from_secs(5), || {
        rotations.lock().unwrap().len() == 2
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spiffe_id_picks_one_of_several_svids() {
    let python = python();
    let ca = IssuingCa::new("Receivers CA");
    let td = SvidCa::new(ca.dir.path());
    let state = ca.path("svids.json");
    let (a, b) = (
        td.svid("svid-a", "spiffe://sallyport.test/a"),
        td.svid("svid-b", "spiffe://sallyport.test/b"),
    );
    serve_svids(&state, &td, &[&a, &b]);
    let agent = Agent::start(&python, &ca.path("agent.sock"), &state);
    let table = |id: &str| {
        format!(
            "[identity]\nspiffe = {{ socket = \"{}\", spiffe_id = \"{id}\" }}\n",
            agent.uri()
        )
    };
    let cfg = identity_config(ca.dir.path(), &table("spiffe://sallyport.test/b")).unwrap();
    let ids = Identities::from_config(&cfg).unwrap();
    assert_eq!(
        ids.get(None).unwrap().presented().facts.sha256_fingerprint,
        b.fingerprint
    );
    // Without spiffe_id: the agent's default (first) SVID.
    let cfg = identity_config(
        ca.dir.path(),
        &format!("[identity]\nspiffe = {{ socket = \"{}\" }}\n", agent.uri()),
    )
    .unwrap();
    let ids = Identities::from_config(&cfg).unwrap();
    assert_eq!(
        ids.get(None).unwrap().presented().facts.sha256_fingerprint,
        a.fingerprint
    );
    // An ID the agent does not serve: start-up says which ones it does.
    let cfg = identity_config(ca.dir.path(), &table("spiffe://sallyport.test/c")).unwrap();
    let e = Identities::from_config(&cfg).unwrap_err();
    assert!(
        e.contains("no X.509-SVID for spiffe://sallyport.test/c")
            && e.contains("spiffe://sallyport.test/a, spiffe://sallyport.test/b"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_agent_fails_start_up_with_the_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let socket = tmp.path().join("no-agent.sock");
    let uri = format!("unix://{}", socket.display());
    let table = format!("[identity]\nspiffe = {{ socket = \"{uri}\" }}\n");

    // In process: the registry is not built, and the error names the socket and the cause.
    let cfg = identity_config(tmp.path(), &table).unwrap();
    let e = Identities::from_config(&cfg).unwrap_err();
    assert!(
        e.contains(&uri) && e.contains("cannot reach the agent") && e.contains("No such file or directory"),
        "{e}"
    );

    // `sallyport serve`: exits at once with that error.
    let cfg = tmp.path().join("serve.toml");
    std::fs::write(
        &cfg,
        format!(
            "[egress]\nallow = [\"127.0.0.0/8\"]\n{table}[public]\nlisten = \"127.0.0.1:{}\"\n\
             [store]\nurl = \"sqlite://serve.db\"\n",
            free_port()
        ),
    )
    .unwrap();
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_sallyport"))
            .args(["serve", "--config", cfg.to_str().unwrap()])
            .output(),
    )
    .await
    .expect("serve exits")
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("SPIFFE Workload API") && stderr.contains(&uri),
        "{stderr}"
    );

    // A TCP endpoint (or a relative path) is refused before anything starts.
    let e = identity_config(
        tmp.path(),
        "[identity]\nspiffe = { socket = \"tcp://127.0.0.1:8081\" }\n",
    )
    .unwrap_err();
    assert!(e.contains("identity.spiffe.socket"), "{e}");
    let e = identity_config(
        tmp.path(),
        "[identity]\nspiffe = { socket = \"unix:///run/a.sock\" }\ncert = \"gw.pem\"\nkey = \"gw.key\"\n",
    )
    .unwrap_err();
    assert!(e.contains("set no cert, key"), "{e}");
}
