//! `sallyport status`: what the status page shows, as terminal tables or `--json`. It asks the
//! running gateway's admin API (`GET /v1/overview`): the delivery counters, rates and latency
//! live in that process, not in the store. The address is `[admin] listen` from `--config`
//! (or `--admin URL`), the token the admin token the config names (`token_env`/`token_file`).
//!
//! Never prints the token.

use std::path::PathBuf;

use clap::Args;
use http_body_util::BodyExt;

use super::Failure;
use crate::config::Config;
use crate::status::Overview;

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Config file (the admin listener's address and token).
    #[arg(long, short, default_value = "config/sallyport.toml")]
    pub config: PathBuf,
    /// The admin listener to ask, e.g. `http://127.0.0.1:8444`. Default: `[admin] listen`.
    #[arg(long)]
    pub admin: Option<String>,
    /// Print the overview as JSON.
    #[arg(long)]
    pub json: bool,
}

pub(super) async fn run(args: StatusArgs) -> Result<(), Failure> {
    let cfg = Config::load(&args.config).map_err(Failure::usage)?;
    let token = cfg
        .secret_source(
            cfg.admin.token_env.as_ref(),
            cfg.admin.token_file.as_ref(),
            "token",
        )
        .and_then(|s| s.read())
        .map_err(|e| Failure::usage(format!("admin.token: {e}")))?;
    let base = args.admin.unwrap_or_else(|| {
        let mut a = cfg.admin.listen;
        if a.ip().is_unspecified() {
            a.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        format!("http://{a}")
    });
    let uri: http::Uri = format!("{}/v1/overview", base.trim_end_matches('/'))
        .parse()
        .map_err(|e| Failure::usage(format!("--admin: {e}")))?;
    let (Some(host), Some(port)) = (uri.host().map(str::to_owned), uri.port_u16()) else {
        return Err(Failure::usage("--admin: give http://host:port"));
    };
    let failed =
        |e: &dyn std::fmt::Display| Failure::failed(format!("the gateway at {base} did not answer: {e}"));
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| failed(&e))?;
    let (mut tx, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .map_err(|e| failed(&e))?;
    tokio::spawn(conn);
    let req = http::Request::get(uri.path())
        .header(http::header::HOST, format!("{host}:{port}"))
        .header(http::header::AUTHORIZATION, format!("Bearer {}", token.expose()))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .map_err(|e| failed(&e))?;
    let res = tx.send_request(req).await.map_err(|e| failed(&e))?;
    let status = res.status();
    let body = res
        .into_body()
        .collect()
        .await
        .map_err(|e| failed(&e))?
        .to_bytes();
    if !status.is_success() {
        return Err(Failure::failed(format!(
            "the gateway at {base} answered {status}: {}",
            String::from_utf8_lossy(&body)
        )));
    }
    let o: Overview = serde_json::from_slice(&body).map_err(|e| failed(&e))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&o).map_err(|e| failed(&e))?);
    } else {
        print!("{}", table(&o));
    }
    Ok(())
}

fn opt_ms(s: Option<f64>) -> String {
    match s {
        None => "-".into(),
        Some(v) if v.is_infinite() => ">5s".into(),
        Some(v) => format!("{}ms", v * 1000.0),
    }
}

fn counts(m: &std::collections::BTreeMap<String, u64>) -> String {
    if m.is_empty() {
        return "-".into();
    }
    m.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Rows under a header, each column as wide as its widest cell.
fn grid(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<String>| {
        let mut s: String = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ");
        s.truncate(s.trim_end().len());
        s + "\n"
    };
    let mut out = line(header.iter().map(|h| (*h).to_owned()).collect());
    for r in rows {
        out += &line(r.clone());
    }
    out
}

/// The overview as terminal tables.
pub(super) fn table(o: &Overview) -> String {
    let mut out = String::new();
    let rows: Vec<Vec<String>> = o
        .dataflows
        .iter()
        .map(|f| {
            vec![
                f.name.clone(),
                f.state.clone(),
                f.delivered.to_string(),
                f.delivered_per_sec.map_or("-".into(), |r| format!("{r:.1}")),
                format!("{}/{}", opt_ms(f.attempt_p50_s), opt_ms(f.attempt_p99_s)),
                f.retried.to_string(),
                f.dead.to_string(),
                counts(&f.failures_by_class),
                f.pending.to_string(),
                f.why.clone().unwrap_or_default(),
            ]
        })
        .collect();
    out += &grid(
        &[
            "DATAFLOW",
            "STATE",
            "DELIVERED",
            "PER_S",
            "ATTEMPT_P50/P99",
            "RETRIED",
            "DEAD",
            "FAILURES",
            "OUTBOX",
            "WHY",
        ],
        &rows,
    );
    out += &format!(
        "\ningest->delivered: p50 {:.1} ms, p99 {:.1} ms\n",
        o.ingest_to_delivered_p50_ms, o.ingest_to_delivered_p99_ms
    );
    if !o.dead_letters.is_empty() {
        out += "\n";
        let rows: Vec<Vec<String>> = o
            .dead_letters
            .iter()
            .map(|d| {
                vec![
                    d.id.to_string(),
                    d.dataflow.clone(),
                    d.profile_id.clone(),
                    d.class.clone(),
                    d.attempts.to_string(),
                ]
            })
            .collect();
        out += &grid(
            &["DEAD_LETTER", "DATAFLOW", "PROFILE", "CLASS", "ATTEMPTS"],
            &rows,
        );
    }
    out += "\n";
    let rows: Vec<Vec<String>> = o
        .identities
        .iter()
        .map(|i| {
            vec![
                i.name.clone(),
                i.role.clone(),
                i.cn.clone().unwrap_or_default(),
                i.sans.join(","),
                i.not_after.clone(),
                i.takes_over.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    out += &grid(
        &["IDENTITY", "ROLE", "CN", "SANS", "EXPIRES", "TAKES_OVER"],
        &rows,
    );
    out += &format!(
        "\negress: {}\n",
        if o.egress_ips.is_empty() {
            "not pinned".to_owned()
        } else {
            o.egress_ips.join(", ")
        }
    );
    if !o.sidecar_routes.is_empty() {
        out += "\n";
        let rows: Vec<Vec<String>> = o
            .sidecar_routes
            .iter()
            .map(|r| {
                vec![
                    r.listen.clone(),
                    r.prefix.clone(),
                    r.upstream.clone(),
                    r.mtls.to_string(),
                    r.attempts.to_string(),
                    r.failed.to_string(),
                ]
            })
            .collect();
        out += &grid(
            &["SIDECAR", "PREFIX", "UPSTREAM", "MTLS", "ATTEMPTS", "FAILED"],
            &rows,
        );
    }
    if !o.audit.is_empty() {
        out += "\n";
        let rows: Vec<Vec<String>> = o
            .audit
            .iter()
            .map(|a| {
                vec![
                    a.seq.to_string(),
                    a.dataflow.clone(),
                    a.outcome.clone(),
                    a.http_status.map_or("-".into(), |s| s.to_string()),
                    a.error_kind.clone().unwrap_or_else(|| "-".into()),
                    format!("{:.1}ms", a.latency_ms),
                    a.trace_id.clone().unwrap_or_else(|| "-".into()),
                ]
            })
            .collect();
        out += &grid(
            &[
                "AUDIT_SEQ",
                "DATAFLOW",
                "OUTCOME",
                "HTTP",
                "ERROR",
                "LATENCY",
                "TRACE",
            ],
            &rows,
        );
    }
    out
}
