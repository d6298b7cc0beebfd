//! Egress on real sockets: deliveries leave only from pinned source addresses, only to
//! destinations the policy allows, to exactly the address that was checked; tricky URL
//! spellings and DNS names that resolve into private ranges are refused before any connect.
#![allow(clippy::unwrap_used)]

mod support;

use std::net::{IpAddr, TcpListener};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, Method, StatusCode};
use sallyport::config::DestinationConfig;
use sallyport::config::{Config, EgressConfig};
use sallyport::delivery::{Core, DeliveryClient, ErrorKind, OutboundRequest};
use sallyport::egress::{check_source_ips, Egress};
use sallyport::export::Engine;
use sallyport::receiver::{ClientAuth, Receiver};
use sallyport::tls::creds::{Identities, IdentityStore};
use support::*;

fn client(pki: &RcgenPki, egress: Egress) -> DeliveryClient {
    client_shared(pki, Arc::new(egress))
}

fn client_shared(pki: &RcgenPki, egress: Arc<Egress>) -> DeliveryClient {
    let f = &pki.files;
    let id = IdentityStore::from_files(&f.client_cert, &f.client_key).unwrap();
    let core = Core::new(Arc::new(Identities::one(id)), egress);
    core.destination(&DestinationConfig {
        ca: Some(f.ca_cert.clone()),
        ..DestinationConfig::new("egress-test", None)
    })
    .unwrap()
}

fn post(url: &str) -> OutboundRequest {
    OutboundRequest {
        method: Method::POST,
        url: url::Url::parse(url).unwrap(),
        headers: HeaderMap::new(),
        body: "{}".into(),
    }
}

/// A plain TCP listener that counts connection attempts (it never completes TLS).
fn counting_listener(addr: &str) -> (u16, Arc<AtomicUsize>) {
    let l = TcpListener::bind(addr).unwrap();
    let port = l.local_addr().unwrap().port();
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            if s.is_ok() {
                n2.fetch_add(1, Ordering::SeqCst);
            }
        }
    });
    (port, n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_leave_only_from_the_pinned_source_addresses() {
    let pki = RcgenPki::new();
    let rx = pki.receiver(ClientAuth::Required, StatusCode::OK).await;
    let egress = Egress::from_config(&EgressConfig {
        source_ips: vec!["127.0.0.2".parse().unwrap(), "127.0.0.3".parse().unwrap()],
        allow: vec!["127.0.0.1".into()],
        deny: vec![],
    })
    .unwrap();
    // Each client has its own pool, so each request is a new connection: they alternate
    // between the two pins.
    let egress = Arc::new(egress);
    for _ in 0..4 {
        let c = client_shared(&pki, egress.clone());
        let d = c
            .send(post(&format!("https://127.0.0.1:{}/in", rx.addr.port())))
            .await
            .unwrap();
        assert_eq!(d.status, 200);
    }
    let sources: std::collections::BTreeSet<IpAddr> = rx.peers().iter().map(|p| p.ip()).collect();
    assert!(sources.len() == 2 && rx.peers().len() >= 2, "{:?}", rx.peers());
    let want: std::collections::BTreeSet<IpAddr> = ["127.0.0.2", "127.0.0.3"]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
    assert_eq!(sources, want, "no connection from any other address");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ipv6_destination_with_only_ipv4_pins_is_refused_not_routed() {
    let pki = RcgenPki::new();
    let (port, attempts) = counting_listener("[::1]:0");
    let egress = Egress::from_config(&EgressConfig {
        source_ips: vec!["127.0.0.2".parse().unwrap()],
        allow: vec!["::1".into()],
        deny: vec![],
    })
    .unwrap();
    let err = client(&pki, egress)
        .send(post(&format!("https://[::1]:{port}/in")))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NoSourceAddress, "{err}");
    assert!(
        err.to_string()
            .contains("no pinned source address of the IPv6 family"),
        "{err}"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(attempts.load(Ordering::SeqCst), 0);
}

#[test]
fn a_pinned_address_not_on_any_interface_stops_start_up() {
    assert!(check_source_ips(&["127.0.0.1".parse().unwrap()]).is_ok());
    let err = check_source_ips(&["127.0.0.1".parse().unwrap(), "192.0.2.1".parse().unwrap()]).unwrap_err();
    assert!(
        err.contains("egress.source_ips[1]: 192.0.2.1 is not assigned to a local interface"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_destinations_are_refused_before_any_connection() {
    let pki = RcgenPki::new();
    let (port, attempts) = counting_listener("127.0.0.1:0");
    // Only a public name is allowed: every spelling of loopback must be refused.
    let urls = [
        format!("https://127.0.0.1:{port}/"),
        format!("https://2130706433:{port}/"),
        format!("https://0x7f.1:{port}/"),
        format!("https://017700000001:{port}/"),
        format!("https://127.1:{port}/"),
        format!("https://[::ffff:127.0.0.1]:{port}/"),
        format!("https://user@127.0.0.1:{port}/"),
        format!("https://api.partner.example@127.0.0.1:{port}/"),
        // A name that is allowed but resolves into loopback (the DNS-rebinding shape):
        format!("https://localhost:{port}/"),
        "https://169.254.169.254/latest/meta-data/".to_owned(),
        "https://10.0.0.5/".to_owned(),
        "https://[fd00::1]/".to_owned(),
        "https://[64:ff9b::a9fe:a9fe]/".to_owned(),
    ];
    let c = client(
        &pki,
        Egress::allowing(&["api.partner.example", "localhost"]).unwrap(),
    );
    for u in &urls {
        let err = c.send(post(u)).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::EgressDenied, "{u}: {err}");
        assert!(
            err.to_string().contains("destination denied by egress policy"),
            "{u}: {err}"
        );
        assert!(!err.retryable());
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        attempts.load(Ordering::SeqCst),
        0,
        "a denied destination saw a TCP connection"
    );
    // An explicit CIDR allows loopback; deny wins over allow.
    let c = client(
        &pki,
        Egress::from_config(&EgressConfig {
            allow: vec!["127.0.0.0/8".into()],
            deny: vec!["127.0.0.1".into()],
            ..Default::default()
        })
        .unwrap(),
    );
    let err = c
        .send(post(&format!("https://127.0.0.1:{port}/")))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("matches egress.deny[0]"), "{err}");
}

#[test]
fn policy_decisions() {
    let e = Egress::from_config(&EgressConfig {
        allow: vec![
            "api.partner.example".into(),
            "*.hooks.example.com".into(),
            "203.0.113.0/24".into(),
        ],
        deny: vec!["bad.hooks.example.com".into()],
        ..Default::default()
    })
    .unwrap();
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    assert!(e.check("api.partner.example", ip("93.184.216.34")).is_ok());
    assert!(e.check("x.hooks.example.com", ip("93.184.216.34")).is_ok());
    assert!(
        e.check("hooks.example.com", ip("93.184.216.34")).is_err(),
        "the wildcard does not cover the apex"
    );
    assert!(e.check("evilhooks.example.com", ip("93.184.216.34")).is_err());
    assert!(e
        .check("bad.hooks.example.com", ip("93.184.216.34"))
        .unwrap_err()
        .reason
        .contains("egress.deny[0]"));
    // Documentation range, explicitly allowed by CIDR: allowed.
    assert!(e.check("anything", ip("203.0.113.7")).is_ok());
    // An allowed name resolving to a private address: refused.
    assert!(e
        .check("api.partner.example", ip("10.1.2.3"))
        .unwrap_err()
        .reason
        .contains("private"));
    assert!(e
        .check("x.hooks.example.com", ip("100.64.0.1"))
        .unwrap_err()
        .reason
        .contains("carrier-grade NAT"));
    assert!(e
        .check("x.hooks.example.com", ip("2002:a9fe:a9fe::1"))
        .unwrap_err()
        .reason
        .contains("link-local"));
    assert!(
        e.check("x.hooks.example.com", ip("2001:0:4136:e378:8000:63bf:f5fe:fefe"))
            .is_err(),
        "Teredo-embedded 10.1.1.1"
    );
    // Special IPv6 and IPv4 blocks an allowed name must not reach without a CIDR allow.
    for (addr, why) in [
        ("64:ff9b:1::a9fe:a9fe", "local-use NAT64"),
        ("64:ff9b:1:5db8:d8:2200::", "local-use NAT64"),
        ("100::1", "discard-only"),
        ("192.88.99.1", "6to4 relay anycast"),
        ("2002:c058:6301::1", "6to4 relay anycast"),
        ("::ffff:0:a9fe:a9fe", "IPv4-translated"),
        ("::ffff:0:5db8:d822", "IPv4-translated"),
        ("3fff::1", "documentation"),
    ] {
        let err = e.check("x.hooks.example.com", ip(addr)).expect_err(addr);
        assert!(err.reason.contains(why), "{addr}: {}", err.reason);
    }
    // Translated forms carry their IPv4 address to deny rules, whichever allow lets the
    // block itself through.
    let t = Egress::from_config(&EgressConfig {
        allow: vec!["::ffff:0:0:0/96".into(), "64:ff9b:1::/48".into()],
        deny: vec!["169.254.0.0/16".into(), "10.0.0.0/8".into()],
        ..Default::default()
    })
    .unwrap();
    assert!(t.check("a", ip("::ffff:0:5db8:d822")).is_ok());
    assert!(t.check("a", ip("64:ff9b:1::5db8:d822")).is_ok());
    for addr in [
        "::ffff:0:a9fe:a9fe",
        "64:ff9b:1::a9fe:a9fe",  // /96
        "64:ff9b:1:a00:5::",     // RFC 6052 /48: 10.0.5.0
        "64:ff9b:1:a:0:500::",   // /56: 10.0.5.0
        "64:ff9b:1:0:a:0:500:0", // /64: 10.0.0.5
    ] {
        let err = t.check("a", ip(addr)).expect_err(addr);
        assert!(err.reason.contains("egress.deny"), "{addr}: {}", err.reason);
    }
    // An IPv4 CIDR allow covers a translated address (its IPv4 address sits where SIIT puts
    // it) but not a local-use NAT64 one (where it sits is the operator's choice).
    let v4 = Egress::allowing(&["10.0.0.0/8"]).unwrap();
    assert!(v4.check("a", ip("::ffff:0:a00:1")).is_ok());
    assert!(v4
        .check("a", ip("64:ff9b:1::a00:1"))
        .unwrap_err()
        .reason
        .contains("local-use NAT64"));
    // Not allowed at all.
    assert!(e
        .check("other.example", ip("93.184.216.34"))
        .unwrap_err()
        .reason
        .contains("not in egress.allow"));
    assert!(Egress::deny_all()
        .check("api.partner.example", ip("93.184.216.34"))
        .is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_delivery_pauses_the_dataflow_at_once_and_is_audited() {
    let pki = RcgenPki::new();
    let rx = pki.receiver(ClientAuth::Required, StatusCode::OK).await;
    // "localhost" is allowed by name, but it resolves to loopback, which has no CIDR allow.
    let text = format!(
        "[egress]\nallow = [\"localhost\"]\n[identity]\ncert = \"gateway.pem\"\nkey = \"gateway.key\"\n\
         [store]\nurl = \"sqlite://e.db\"\n[[segments]]\nid = \"s1\"\nname = \"S\"\n\
         [[dataflows]]\nname = \"rx\"\nendpoint = \"{}\"\nca = \"ca.pem\"\nsegments = [\"s1\"]\n",
        rx.url("/in")
    );
    let cfg = Config::from_toml(&text, std::path::Path::new("e.toml"), pki.dir.path()).unwrap();
    let engine = Engine::open(&cfg).await.unwrap();
    let workers = engine.spawn_workers();
    engine
        .ingest(b"{\"profileId\":\"p\",\"segments\":[{\"id\":\"s1\",\"status\":\"realized\"}]}\n")
        .await
        .unwrap();
    let store = engine.store();
    // No retry or next profile can pass the policy: the dataflow pauses at once, the profile
    // stays queued (not a dead letter) until the config is fixed.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        let s = serde_json::to_value(&engine.dataflow_statuses().await.unwrap()[0]).unwrap();
        if s["state"] == "paused" {
            break s;
        }
        assert!(std::time::Instant::now() < deadline, "never paused: {s}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    workers.iter().for_each(|w| w.abort());
    assert_eq!(status["pause"]["class"], "policy", "{status}");
    assert!(status["pause"]["message"]
        .as_str()
        .unwrap()
        .contains("destination denied by egress policy"));
    assert!(store.dead_letters(None, 5).unwrap().is_empty());
    assert_eq!(store.pending(None).unwrap(), 1);
    assert_eq!(rx.connections(), 0);
    let audit = store.audit_records(0, 10).unwrap();
    assert_eq!(audit.len(), 1);
    assert!(audit[0].record.contains("\"errorKind\":\"egress_denied\""));
    assert!(engine.metrics_text().await.contains("kind=\"egress_denied\"} 1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_publishes_its_egress_ips_and_refuses_an_unassigned_one() {
    let pki = RcgenPki::new();
    let write = |ips: &str| {
        let (public, admin) = (free_port(), free_port());
        let p = pki.dir.path().join(format!("serve-{public}.toml"));
        std::fs::write(
            &p,
            format!(
                "[egress]\nsource_ips = {ips}\nallow = [\"127.0.0.0/8\"]\n[public]\nlisten = \"127.0.0.1:{public}\"\n\
                 [admin]\nlisten = \"127.0.0.1:{admin}\"\n[store]\nurl = \"sqlite://s-{public}.db\"\n"
            ),
        )
        .unwrap();
        (p, public)
    };
    let (bad, _) = write("[\"127.0.0.1\", \"192.0.2.1\"]");
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_sallyport"))
        .args(["serve", "--config", bad.to_str().unwrap()])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("egress.source_ips[1]: 192.0.2.1 is not assigned to a local interface"),
        "{err}"
    );

    let (good, public) = write("[\"127.0.0.1\", \"::1\"]");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_sallyport"))
        .args(["serve", "--config", good.to_str().unwrap()])
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    tokio::task::spawn_blocking(move || wait_for_port(public))
        .await
        .unwrap();
    let (s, b) = http(
        "GET",
        &format!("http://127.0.0.1:{public}/v1/egress-ips"),
        None,
        b"",
    )
    .await;
    assert_eq!(s, 200);
    let v: serde_json::Value = serde_json::from_str(&b).unwrap();
    assert_eq!(v["egressIps"], serde_json::json!(["127.0.0.1", "::1"]));
    child.kill().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_one_pin_every_connection_comes_from_it() {
    let pki = RcgenPki::new();
    let rx = pki.receiver(ClientAuth::Required, StatusCode::OK).await;
    let egress = Egress::from_config(&EgressConfig {
        source_ips: vec!["127.0.0.7".parse().unwrap()],
        allow: vec!["127.0.0.1".into()],
        deny: vec![],
    })
    .unwrap();
    let c = Arc::new(client(&pki, egress));
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..6 {
        let (c, r) = (
            c.clone(),
            post(&format!("https://127.0.0.1:{}/in", rx.addr.port())),
        );
        set.spawn(async move { c.send(r).await.map(|d| d.status) });
    }
    while let Some(r) = set.join_next().await {
        assert_eq!(r.unwrap().unwrap(), 200);
    }
    assert!(!rx.peers().is_empty());
    assert!(
        rx.peers()
            .iter()
            .all(|p| p.ip() == "127.0.0.7".parse::<IpAddr>().unwrap()),
        "{:?}",
        rx.peers()
    );
}

/// Answers the allowed address first and a denied one on every later query: the shape of a
/// DNS-rebinding attack, which real DNS cannot be made to produce on demand in a test.
struct Rebinding {
    allowed: std::net::SocketAddr,
    denied: std::net::SocketAddr,
    calls: AtomicUsize,
}

impl sallyport::egress::Resolve for Rebinding {
    fn resolve<'a>(
        &'a self,
        _host: &'a str,
        _port: u16,
    ) -> sallyport::egress::BoxFuture<'a, std::io::Result<Vec<std::net::SocketAddr>>> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move { Ok(vec![if n == 0 { self.allowed } else { self.denied }]) })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebinding_resolver_never_gets_us_to_the_denied_address() {
    let pki = RcgenPki::new();
    let rx = pki.receiver(ClientAuth::Required, StatusCode::OK).await;
    let (denied_port, denied_attempts) = counting_listener("127.0.0.2:0");
    let resolver = Arc::new(Rebinding {
        allowed: rx.addr,
        denied: format!("127.0.0.2:{denied_port}").parse().unwrap(),
        calls: AtomicUsize::new(0),
    });
    // The allow list covers the receiver's address only; "localhost" is what the URL names.
    let egress = Egress::allowing(&["127.0.0.1/32"])
        .unwrap()
        .with_resolver(resolver.clone());
    let c = client(&pki, egress);
    let url = rx.url("/in");
    assert_eq!(
        c.send(post(&url)).await.unwrap().status,
        200,
        "first answer: allowed and used"
    );
    // A new connection resolves again and gets the rebinding answer: refused, not connected.
    let c2 = client(
        &pki,
        Egress::allowing(&["127.0.0.1/32"])
            .unwrap()
            .with_resolver(resolver.clone()),
    );
    let err = c2.send(post(&url)).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::EgressDenied, "{err}");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(denied_attempts.load(Ordering::SeqCst), 0);
    assert_eq!(
        resolver.calls.load(Ordering::SeqCst),
        2,
        "one resolution per connection, never a second for the same one"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_is_a_failure_and_is_not_followed() {
    let pki = RcgenPki::new();
    let f = &pki.files;
    let rx = Receiver::start_with(
        &f.server_cert,
        &f.server_key,
        &f.ca_cert,
        ClientAuth::Required,
        Arc::new(|_| {
            sallyport::receiver::Action::Respond(
                StatusCode::FOUND,
                vec![("location", "https://169.254.169.254/".into())],
            )
        }),
    )
    .await
    .unwrap();
    let c = client(&pki, Egress::allowing(&["127.0.0.0/8"]).unwrap());
    let d = c.send(post(&rx.url("/in"))).await.unwrap();
    assert_eq!(d.status, StatusCode::FOUND);
    let err = d.error().expect("a 302 is a failed delivery");
    assert_eq!(err.kind(), ErrorKind::HttpStatus);
    assert_eq!(rx.received().len(), 1, "the redirect was not followed");
}
