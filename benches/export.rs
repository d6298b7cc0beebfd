//! End-to-end export benchmark: ingest → trigger → payload → durable outbox (SQLite, WAL,
//! synchronous=FULL) → mTLS delivery to a receiver that requires the client certificate.
//! Run through `bench/run-export.sh`, which starts the nginx receiver and the peer.
//!
//! Usage: cargo bench --bench export -- URL CA CLIENT_CERT CLIENT_KEY [N] [BACKFILL_N]
//! Prints one JSON object per phase on stdout.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use sallyport::config::Config;
use sallyport::export::Engine;
use serde_json::json;

// The same allocator as the `sallyport` binary (src/main.rs), so the bench measures what ships.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const SEG: &str = "5b998cb9-9488-4ec3-8d95-fa8338ced490";
const SEG2: &str = "7d5c5f4b-1111-4ec3-8d95-fa8338ced491";

fn config(
    dir: &std::path::Path,
    url: &str,
    ca: &str,
    cert: &str,
    key: &str,
    segs: &[&str],
    db: &str,
) -> Config {
    let text = format!(
        r#"
[egress]
allow = ["127.0.0.0/8"]
[identity]
cert = "{cert}"
key = "{key}"
[store]
url = "sqlite://{db}"
[[segments]]
id = "{SEG}"
name = "First name equals John"
[[segments]]
id = "{SEG2}"
name = "Backfilled"
[[dataflows]]
name = "bench"
endpoint = "{url}"
ca = "{ca}"
include_segment_names = true
timeout = "{timeout}"
attributes = [{{ source = "person.name.firstName", target = "firstName" }},
              {{ source = "personalEmail.address", target = "person.email" }}]
segments = {segs}
"#,
        segs = serde_json::to_string(segs).unwrap(),
        // Raised only to count instructions under valgrind, where everything is ~50x slower.
        timeout = std::env::var("EXPORT_BENCH_TIMEOUT").unwrap_or_else(|_| "2s".into())
    );
    Config::from_toml(&text, std::path::Path::new("bench.toml"), dir).unwrap()
}

fn batch(from: usize, n: usize, seg: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(n * 300);
    for i in from..from + n {
        let line = json!({
            "profileId": format!("p{i}"),
            "identityMap": {"ecid": [{"id": format!("{i:038}")}], "email_lc_sha256": [{"id": format!("{i:064x}")}]},
            "attributes": {"person": {"name": {"firstName": format!("First{i}"), "lastName": "Unmapped"}},
                           "personalEmail": {"address": format!("user{i}@example.com")}},
            "segments": [{"id": seg, "status": "realized", "lastQualificationTime": "2026-11-25T10:00:00Z"}]
        });
        serde_json::to_writer(&mut out, &line).unwrap();
        out.push(b'\n');
    }
    out
}

/// CPU time this process has used (user + system), seconds; 0 where /proc is missing.
fn cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime is the 12th, stime the 13th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<f64> = rest.split_whitespace().filter_map(|x| x.parse().ok()).collect();
    // Clock ticks: 100 per second on Linux.
    f.get(10).zip(f.get(11)).map_or(0.0, |(u, s)| (u + s) / 100.0)
}

async fn drain(engine: &Engine, want: u64, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while engine.stats().delivered < want || engine.pending().await.unwrap() > 0 {
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    true
}

#[tokio::main]
async fn main() {
    // As the `sallyport` binary does (src/main.rs).
    sallyport::disable_transparent_huge_pages();
    let a: Vec<String> = std::env::args().filter(|a| a != "--bench").collect();
    if a.len() < 5 {
        eprintln!("usage: export URL CA CLIENT_CERT CLIENT_KEY [N] [BACKFILL_N]");
        return;
    }
    let (url, ca, cert, key) = (&a[1], &a[2], &a[3], &a[4]);
    let n: usize = a.get(5).and_then(|s| s.parse().ok()).unwrap_or(200_000);
    let backfill_n: usize = a.get(6).and_then(|s| s.parse().ok()).unwrap_or(1_000_000);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();

    // EXPORT_BENCH_PHASES=throughput,latency,backfill (the default) picks phases to run;
    // EXPORT_BENCH_TIMEOUT (default 2s) is the dataflow's request timeout.
    let phases =
        std::env::var("EXPORT_BENCH_PHASES").unwrap_or_else(|_| "throughput,latency,backfill".into());
    if phases.contains("throughput") {
        // 1. Throughput: ingest as fast as possible while delivering.
        let engine = Engine::open(&config(dir, url, ca, cert, key, &[SEG], "t.db"))
            .await
            .unwrap();
        // The NDJSON arrives as bytes (as over HTTP): made before the clock starts.
        let batches: Vec<Vec<u8>> = (0..n)
            .step_by(5000)
            .map(|from| batch(from, 5000.min(n - from), SEG))
            .collect();
        let workers = engine.spawn_workers();
        let started = Instant::now();
        let cpu0 = cpu_secs();
        let mut ingest_time = Duration::ZERO;
        for b in &batches {
            let t = Instant::now();
            engine.ingest(b).await.unwrap();
            ingest_time += t.elapsed();
        }
        let ok = drain(&engine, n as u64, Duration::from_secs(600)).await;
        let secs = started.elapsed().as_secs_f64();
        let cpu_ms_per_k = (cpu_secs() - cpu0) * 1000.0 / (n as f64 / 1000.0);
        let s = engine.stats();
        println!(
            "{}",
            json!({"phase": "throughput", "profiles": n, "seconds": secs, "profilesPerSec": n as f64 / secs,
                   "ingestOnlyPerSec": n as f64 / ingest_time.as_secs_f64(), "complete": ok,
                   "cpuMsPerThousand": cpu_ms_per_k,
                   "delivered": s.delivered, "failed": s.failed, "p50Ms": s.p50_ms, "p99Ms": s.p99_ms})
        );
        workers.iter().for_each(|w| w.abort());
        drop(engine);
    }
    if phases.contains("latency") {
        // 2. Latency at a steady 10k profiles/s (100 every 10 ms): one second of warm-up, in
        // which the delivery pool opens its connections (a full mTLS handshake each), then
        // 10 s measured.
        let engine = Engine::open(&config(dir, url, ca, cert, key, &[SEG], "l.db"))
            .await
            .unwrap();
        let workers = engine.spawn_workers();
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        let mut sent = 0;
        let start = Instant::now();
        let warm_until = start + Duration::from_secs(1);
        let until = warm_until + Duration::from_secs(10);
        let mut warm = None;
        while Instant::now() < until {
            tick.tick().await;
            if warm.is_none() && Instant::now() >= warm_until {
                warm = Some(engine.stats());
                engine.reset_stats();
            }
            engine.ingest(&batch(sent, 100, SEG)).await.unwrap();
            sent += 100;
        }
        let ok = drain(&engine, sent as u64, Duration::from_secs(120)).await;
        let s = engine.stats();
        let w = warm.unwrap_or_default();
        println!(
            "{}",
            json!({"phase": "latency-10k", "profiles": sent, "complete": ok, "p50Ms": s.p50_ms, "p99Ms": s.p99_ms,
                   "maxMs": s.max_ms, "failed": s.failed,
                   "warmupP50Ms": w.p50_ms, "warmupP99Ms": w.p99_ms, "warmupMaxMs": w.max_ms})
        );
        workers.iter().for_each(|w| w.abort());
        drop(engine);
    }
    // 3. Backfill: profiles already in SEG2 when SEG2 becomes mapped.
    if backfill_n > 0 && phases.contains("backfill") {
        let engine = Engine::open(&config(dir, url, ca, cert, key, &[SEG], "b.db"))
            .await
            .unwrap();
        let t = Instant::now();
        for from in (0..backfill_n).step_by(10_000) {
            engine
                .ingest(&batch(from, 10_000.min(backfill_n - from), SEG2))
                .await
                .unwrap();
        }
        let load_secs = t.elapsed().as_secs_f64();
        drop(engine);
        let t = Instant::now();
        let engine = Engine::open(&config(dir, url, ca, cert, key, &[SEG, SEG2], "b.db"))
            .await
            .unwrap();
        let enqueue_secs = t.elapsed().as_secs_f64();
        let queued = engine.pending().await.unwrap();
        let workers = engine.spawn_workers();
        let ok = drain(&engine, backfill_n as u64, Duration::from_secs(900)).await;
        let total = t.elapsed().as_secs_f64();
        println!(
            "{}",
            json!({"phase": "backfill", "profiles": backfill_n, "queued": queued, "loadSeconds": load_secs,
                   "enqueueSeconds": enqueue_secs, "deliveredSeconds": total, "complete": ok,
                   "profilesPerSec": backfill_n as f64 / total, "failed": engine.stats().failed})
        );
        workers.iter().for_each(|w| w.abort());
    }
}
