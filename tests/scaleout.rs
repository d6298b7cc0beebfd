//! Several `sallyport serve` processes on one PostgreSQL database, delivering to nginx
//! (`ssl_verify_client on`), which logs every request's idempotency key: the work is shared,
//! every delivery arrives, none twice unless a lease was taken over (then under the same
//! key), and each instance's audit chain verifies — also after `kill -9` of one instance.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::pg::PgSchema;
use support::*;

const TOKEN: &str = "scaleout-admin-token-77a1";

struct Setup {
    pki: RcgenPki,
    schema: PgSchema,
    rx: Peer,
    config: PathBuf,
}

/// nginx requiring our client certificate, logging `idempotency-key` per request.
fn receiver(pki: &RcgenPki) -> Peer {
    let f = &pki.files;
    nginx(
        pki.dir.path(),
        &format!(
            "log_format keys '$http_idempotency_key $status';\n\
             server {{ listen 127.0.0.1:PORT ssl; ssl_certificate {}; ssl_certificate_key {};\n\
             ssl_client_certificate {}; ssl_verify_client on; keepalive_requests 1000000;\n\
             access_log logs/keys.log keys; location / {{ return 200; }} }}",
            f.server_cert.display(),
            f.server_key.display(),
            f.ca_cert.display()
        ),
    )
}

fn setup(lease: &str) -> Setup {
    let pki = RcgenPki::new();
    let schema = PgSchema::new();
    let rx = receiver(&pki);
    let f = &pki.files;
    let config = pki.dir.path().join("shared.toml");
    std::fs::write(
        &config,
        format!(
            "[egress]\nallow = [\"127.0.0.0/8\"]\n[identity]\ncert = \"{}\"\nkey = \"{}\"\n\
             [public]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:ADMIN_PORT\"\ntoken_env = \"SALLYPORT_TEST_ADMIN_TOKEN\"\n\
             [audit]\nkey_env = \"SALLYPORT_TEST_AUDIT_KEY\"\n\
             [store]\nurl = \"{}\"\nschema = \"{}\"\nlease = \"{lease}\"\ninstance = \"INSTANCE\"\n\
             [[segments]]\nid = \"s1\"\nname = \"S\"\n[[dataflows]]\nname = \"rx\"\nendpoint = \"{}\"\nca = \"{}\"\n\
             segments = [\"s1\"]\nattributes = [{{ source = \"n\", target = \"n\" }}]\n",
            f.client_cert.display(),
            f.client_key.display(),
            schema.url,
            schema.name,
            rx.url("/in"),
            f.ca_cert.display()
        ),
    )
    .unwrap();
    Setup {
        pki,
        schema,
        rx,
        config,
    }
}

fn sallyport(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_sallyport"));
    c.args(args)
        .env("SALLYPORT_TEST_AUDIT_KEY", "audit-key-for-tests-0123456789")
        .env("SALLYPORT_TEST_ADMIN_TOKEN", TOKEN);
    c
}

/// Queue `n` deliveries with the offline ingest command.
fn queue(s: &Setup, n: usize) {
    let file = s.pki.dir.path().join("profiles.ndjson");
    let mut text = String::with_capacity(n * 80);
    for i in 0..n {
        text += &format!(
            "{{\"profileId\":\"p{i}\",\"attributes\":{{\"n\":{i}}},\"segments\":[{{\"id\":\"s1\",\"status\":\"realized\"}}]}}\n"
        );
    }
    std::fs::write(&file, text).unwrap();
    let config = s.pki.dir.path().join("ingest.toml");
    std::fs::write(
        &config,
        std::fs::read_to_string(&s.config)
            .unwrap()
            .replace("ADMIN_PORT", "0"),
    )
    .unwrap();
    let out = sallyport(&[
        "ingest",
        "--config",
        config.to_str().unwrap(),
        file.to_str().unwrap(),
    ])
    .output()
    .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(pending(s), n as i64);
}

fn pending(s: &Setup) -> i64 {
    s.schema.query_i64("SELECT COUNT(*) FROM outbox")[0]
}

/// A running instance, killed when dropped (also when a test fails half-way).
struct Instance(Child);

impl Instance {
    fn kill(&mut self) {
        let _ = self.0.kill(); // SIGKILL
        let _ = self.0.wait();
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.kill();
    }
}

/// An instance named `name` (its leases and audit chain carry the name).
fn instance(s: &Setup, name: &str) -> Instance {
    instance_on(s, name, free_port())
}

/// An instance whose admin API listens on `admin_port`.
fn instance_on(s: &Setup, name: &str, admin_port: u16) -> Instance {
    let text = std::fs::read_to_string(&s.config)
        .unwrap()
        .replace("INSTANCE", name)
        .replace("ADMIN_PORT", &admin_port.to_string());
    let config = s.pki.dir.path().join(format!("{name}.toml"));
    std::fs::write(&config, text).unwrap();
    sallyport(&["serve", "--config", config.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map(Instance)
        .unwrap()
}

/// Idempotency key → times received with status 200.
fn received(rx: &Peer) -> HashMap<String, usize> {
    let mut seen = HashMap::new();
    for (key, status) in log_lines(rx) {
        if status == "200" {
            *seen.entry(key).or_insert(0) += 1;
        }
    }
    seen
}

/// Statuses other than 200 in the receiver's log (nginx logs a request cut off by a
/// killed client as 400 or 499).
fn other_statuses(rx: &Peer) -> Vec<String> {
    log_lines(rx)
        .into_iter()
        .map(|(_, s)| s)
        .filter(|s| s != "200")
        .collect()
}

fn log_lines(rx: &Peer) -> Vec<(String, String)> {
    let log = std::fs::read_to_string(rx.dir.join("logs/keys.log")).unwrap_or_default();
    log.lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(k, s)| (k.to_owned(), s.to_owned()))
        .collect()
}

fn wait(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Delivered rows per instance, from the audit chains (chain = instance/pid/start).
fn delivered_by_instance(s: &Setup) -> HashMap<String, i64> {
    let mut out = HashMap::new();
    for inst in ["a", "b"] {
        let n = s.schema.query_i64(&format!(
            "SELECT COUNT(*) FROM audit WHERE chain LIKE '{inst}/%' AND record LIKE '%\"outcome\":\"delivered\"%'"
        ))[0];
        out.insert(inst.to_owned(), n);
    }
    out
}

fn audit_verify(s: &Setup) -> String {
    let config = s.pki.dir.path().join("ingest.toml");
    let out = sallyport(&["audit", "verify", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    text
}

#[test]
fn two_instances_share_100k_deliveries_each_exactly_once() {
    const N: usize = 100_000;
    let s = setup("30s");
    queue(&s, N);
    let mut a = instance(&s, "a");
    let mut b = instance(&s, "b");
    wait("every delivery", Duration::from_secs(600), || pending(&s) == 0);
    std::thread::sleep(Duration::from_millis(500));
    a.kill();
    b.kill();

    let seen = received(&s.rx);
    assert_eq!(
        other_statuses(&s.rx),
        Vec::<String>::new(),
        "every request answered 200"
    );
    assert_eq!(seen.len(), N, "distinct deliveries received");
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "no lease expired, so nothing arrives twice: {:?}",
        &twice[..twice.len().min(5)]
    );
    let by = delivered_by_instance(&s);
    assert_eq!(by["a"] + by["b"], N as i64, "{by:?}");
    assert!(by["a"] > 0 && by["b"] > 0, "both instances took work: {by:?}");
    let out = audit_verify(&s);
    assert!(
        out.contains(&format!("{N} record(s) verified in 2 chain(s)")),
        "{out}"
    );
}

#[test]
fn after_kill_9_the_other_instance_takes_over_the_leases() {
    const N: usize = 20_000;
    // Long enough that a live but CPU-starved instance (a loaded CI machine) keeps its leases:
    // a lease that expires under a live sender is a legitimate repeat this test cannot tell
    // from the ones the kill causes.
    let s = setup("5s");
    queue(&s, N);
    let mut a = instance(&s, "a");
    let mut b = instance(&s, "b");
    // Kill a while it is working: it has recorded deliveries and most of the queue is left.
    wait("both instances delivering", Duration::from_secs(120), || {
        let by = delivered_by_instance(&s);
        by["a"] > 0 && by["b"] > 0 && received(&s.rx).len() > N / 10
    });
    // Freeze a (SIGSTOP) until it is seen holding leases, then SIGKILL it: no shutdown,
    // its leases and in-flight sends abandoned.
    let leased_by_a = || {
        s.schema
            .query_i64("SELECT COUNT(*) FROM outbox WHERE lease_owner LIKE 'a/%'")[0]
    };
    let signal = |sig: &str, pid: u32| {
        let ok = Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    };
    let pid = a.0.id();
    let mut orphaned = 0;
    for _ in 0..50 {
        signal("-STOP", pid);
        orphaned = leased_by_a();
        if orphaned > 0 {
            break;
        }
        signal("-CONT", pid);
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(orphaned > 0, "instance a never held a lease");
    a.kill();
    wait("the survivor to finish", Duration::from_secs(300), || {
        pending(&s) == 0
    });
    std::thread::sleep(Duration::from_millis(500));
    b.kill();

    let seen = received(&s.rx);
    assert_eq!(seen.len(), N, "nothing lost");
    let cut = other_statuses(&s.rx);
    assert!(
        cut.iter().all(|st| st == "400" || st == "499") && cut.len() as i64 <= orphaned,
        "only requests cut off by the kill may fail: {cut:?}"
    );
    // A row a had sent but not yet recorded is sent again by b — under the same key, so the
    // receiver sees one key twice; nothing else repeats.
    let repeated = seen.values().filter(|n| **n > 1).count() as i64;
    assert!(
        repeated <= orphaned,
        "{repeated} keys repeated, {orphaned} rows were orphaned"
    );
    assert_eq!(
        s.schema.query_i64("SELECT COUNT(*) FROM dead_letters")[0],
        0,
        "no delivery failed"
    );
    let out = audit_verify(&s);
    assert!(out.contains("verified in 2 chain(s)"), "{out}");
}

/// A dataflow created through one instance's admin API is picked up by the other (it polls
/// the shared store), which then delivers to it on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dataflow_put_on_one_instance_runs_on_the_other() {
    let s = setup("30s");
    let rx2 = receiver(&s.pki);
    let (pa, pb) = (free_port(), free_port());
    let mut a = instance_on(&s, "a", pa);
    let mut b = instance_on(&s, "b", pb);
    tokio::task::spawn_blocking(move || {
        wait_for_port(pa);
        wait_for_port(pb);
    })
    .await
    .unwrap();
    let body = serde_json::json!({"name": "second", "endpoint": rx2.url("/in"), "ca_pem": std::fs::read_to_string(&s.pki.files.ca_cert).unwrap(),
        "segments": ["s1"], "attributes": [{"source": "n", "target": "n"}]});
    let (status, text) = http(
        "PUT",
        &format!("http://127.0.0.1:{pa}/v1/dataflows/second"),
        Some(TOKEN),
        body.to_string().as_bytes(),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    // Only b is left to deliver; it must learn of `second` from the database.
    a.kill();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let lines: String = (0..10)
        .map(|i| {
            format!("{{\"profileId\":\"q{i}\",\"segments\":[{{\"id\":\"s1\",\"status\":\"realized\"}}]}}\n")
        })
        .collect();
    let (status, text) = http(
        "POST",
        &format!("http://127.0.0.1:{pb}/v1/profiles"),
        Some(TOKEN),
        lines.as_bytes(),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let rx2 = std::sync::Arc::new(rx2);
    let r = rx2.clone();
    tokio::task::spawn_blocking(move || {
        wait(
            "b's deliveries to the new dataflow",
            Duration::from_secs(30),
            || received(&r).len() == 10,
        )
    })
    .await
    .unwrap();
    // The configured dataflow's worker runs on its own: wait for it too, do not race it.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while received(&s.rx).len() < 10 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(received(&s.rx).len(), 10, "the configured dataflow got all ten");
    // Every outcome recorded (nothing left to send again), then each profile arrived exactly
    // once at each receiver: one 200 per idempotency key, and no other request.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while pending(&s) > 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(pending(&s), 0, "every delivery recorded");
    for (what, rx) in [("the configured dataflow", &s.rx), ("the new dataflow", &*rx2)] {
        let seen = received(rx);
        let twice: Vec<_> = seen.iter().filter(|(_, n)| **n != 1).collect();
        assert!(twice.is_empty(), "{what} got each once: {twice:?}");
        assert_eq!(other_statuses(rx), Vec::<String>::new(), "{what}");
    }
    b.kill();
}
