//! The `sallyport` command line. Each subcommand parses its flags here and calls into the
//! library; errors become one readable message and an exit code (0 ok, 1 failure, 2 usage or
//! config error), never a panic or a backtrace.

mod certfetch;
mod dlq;
mod send;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::config::Config;

/// Exit code for usage and configuration errors.
pub const EXIT_USAGE: u8 = 2;

#[derive(Debug, Parser)]
#[command(
    name = "sallyport",
    version,
    about = "Secure delivery gateway: profile data out over mutual TLS, from known IPs, audited.",
    propagate_version = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the export engine and the public/admin listeners.
    Serve(ConfigArg),
    /// Run the localhost sidecar proxy (plain HTTP in, mTLS out).
    Sidecar(ConfigArg),
    /// The gateway's certificate: show a PEM file's facts, or fetch a gateway's.
    #[command(subcommand)]
    Cert(CertCommand),
    /// Check whether a receiving endpoint is ready for mTLS delivery.
    Verify(VerifyArgs),
    /// Development PKI: CA, receiver and gateway certificates.
    #[command(subcommand)]
    Pki(PkiCommand),
    /// Verify and export the tamper-evident audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// List, show, replay and purge dead letters.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Ingest an NDJSON file of profile updates into the store (offline; `serve` delivers).
    Ingest(IngestArgs),
    /// Send one request through the delivery core (curl-like, mTLS-only by default).
    Send(send::SendArgs),
    /// Validate a config file and print every problem with its key.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Generate a dev PKI, start a local mTLS receiver and deliver sample profiles to it.
    Demo(DemoArgs),
}

#[derive(Debug, Args)]
pub struct ConfigArg {
    /// Config file.
    #[arg(long, short, default_value = "config/sallyport.toml")]
    pub config: PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Walk the hash chain (and HMACs, with an audit key) and name the first broken record.
    Verify {
        #[arg(long, short, default_value = "config/sallyport.toml")]
        config: PathBuf,
    },
    /// Write audit records as JSON lines (for a SIEM).
    Export {
        #[arg(long, short, default_value = "config/sallyport.toml")]
        config: PathBuf,
        /// Only records at or after this RFC 3339 time.
        #[arg(long)]
        since: Option<String>,
    },
}

/// Which dead letters a command acts on.
#[derive(Debug, Args)]
pub struct DlqSelection {
    /// Dead letter ids; none with --all.
    pub ids: Vec<i64>,
    /// Every dead letter (of --dataflow when given).
    #[arg(long)]
    pub all: bool,
    #[arg(long)]
    pub dataflow: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// List dead letters (oldest first).
    List {
        #[arg(long, short, default_value = "config/sallyport.toml")]
        config: PathBuf,
        /// Only this dataflow's.
        #[arg(long)]
        dataflow: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// Show one dead letter with every attempt's error (never the payload).
    Show {
        #[arg(long, short, default_value = "config/sallyport.toml")]
        config: PathBuf,
        id: i64,
    },
    /// Re-send dead letters with their original idempotency keys.
    Replay {
        #[arg(long, short, default_value = "config/sallyport.toml")]
        config: PathBuf,
        #[command(flatten)]
        pick: DlqSelection,
    },
    /// Delete dead letters without sending them.
    Purge {
        #[arg(long, short, default_value = "config/sallyport.toml")]
        config: PathBuf,
        #[command(flatten)]
        pick: DlqSelection,
    },
}

#[derive(Debug, Args)]
pub struct IngestArgs {
    /// Config file.
    #[arg(long, short, default_value = "config/sallyport.toml")]
    pub config: PathBuf,
    /// NDJSON file of profile updates (one JSON object per line), or - for standard input.
    pub file: PathBuf,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Who we are and whom we trust toward one receiver: a configured dataflow, or files.
#[derive(Debug, Args)]
pub struct TargetArgs {
    /// Take identity, trust, egress policy (and headers, query, timeout) from this config's
    /// dataflow.
    #[arg(long, requires = "dataflow", conflicts_with_all = ["client_cert", "client_key"])]
    pub config: Option<PathBuf>,
    /// Dataflow name in --config.
    #[arg(long, requires = "config")]
    pub dataflow: Option<String>,
    /// Client certificate chain to present (PEM, leaf first).
    #[arg(long, requires = "client_key")]
    pub client_cert: Option<PathBuf>,
    /// Client private key (PEM).
    #[arg(long, requires = "client_cert")]
    pub client_key: Option<PathBuf>,
    /// CA bundle to verify the receiver with (default: the dataflow's, else webpki roots).
    #[arg(long)]
    pub ca: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The receiver URL (https://…).
    pub url: String,
    #[command(flatten)]
    pub target: TargetArgs,
    /// Budget for connect, handshake and answer.
    #[arg(long, default_value = "2s")]
    pub timeout: String,
    /// Also send one test request (`{}`) through the delivery core.
    #[arg(long)]
    pub send_test: bool,
    /// Without --config: destinations --send-test may reach (IP/CIDR for private ranges).
    #[arg(long = "allow")]
    pub allow: Vec<String>,
    /// JSON output: {"url","checks":[{"name","status","detail"}],"ok"}.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum CertCommand {
    /// Print the facts of a PEM certificate file (CN, SANs, issuer, validity, fingerprint).
    Show {
        /// PEM file with one or more certificates.
        file: PathBuf,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Fetch a gateway's published client certificates (as a receiver would, to trust them).
    Fetch {
        /// Gateway base URL (its public listener), e.g. http://gateway:8443.
        url: String,
        /// Write the certificates as a PEM bundle for the receiver's trust store.
        #[arg(long)]
        out: Option<PathBuf>,
        /// JSON output.
        #[arg(long)]
        json: bool,
        /// CA bundle for an https:// public listener.
        #[arg(long)]
        ca: Option<PathBuf>,
        /// Connect as this config's gateway does: from its `egress.source_ips`, never to an
        /// `egress.deny` destination.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum PkiCommand {
    /// Write a dev PKI: ca.pem, receiver.pem (localhost, 127.0.0.1), gateway.pem; keys 0600.
    Init {
        /// Directory to write into.
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        /// Common name of the gateway's client certificate.
        #[arg(long, default_value = "sallyport-gateway")]
        cn: String,
        /// DNS SAN of the client certificate (repeatable).
        #[arg(long = "dns", default_value = "gateway.sallyport.test")]
        dns: Vec<String>,
        /// URI SAN of the client certificate (repeatable), e.g. spiffe://acme/gateway.
        #[arg(long = "uri")]
        uri: Vec<String>,
        /// Validity in days.
        #[arg(long, default_value_t = 90)]
        days: i64,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
    },
    /// Make a key pair for a named identity (kept 0600 in [pki] key_dir; it never leaves the
    /// gateway) and a PKCS#10 CSR for the receiver's CA to sign.
    Csr {
        #[arg(long, short, default_value = "config/sallyport.toml")]
        config: PathBuf,
        /// The identity name in [identities].
        #[arg(long)]
        identity: String,
        /// Subject common name.
        #[arg(long)]
        cn: String,
        /// Subject alternative names: dns:NAME, uri:URI, ip:ADDR, email:ADDR (comma-separated or repeated).
        #[arg(long, value_delimiter = ',')]
        san: Vec<String>,
        /// Write the CSR here instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Check a signed certificate against the pending key, its chain and validity, then make
    /// it the identity's certificate (a running gateway picks it up for new connections).
    Install {
        #[arg(long, short, default_value = "config/sallyport.toml")]
        config: PathBuf,
        #[arg(long)]
        identity: String,
        /// The signed certificate (chain, leaf first) from the receiver's CA.
        signed: PathBuf,
        /// Install as the identity's `next` certificate (published first, switched to later).
        #[arg(long)]
        as_next: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate a config file (exit 0 when valid, 2 with every problem otherwise).
    Check(ConfigArg),
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// How many sample profiles to deliver.
    #[arg(long, default_value_t = 3)]
    pub profiles: usize,
}

/// Run a parsed command line on the runtime its command needs: `sidecar` on as many threads
/// as `[sidecar] threads` says (one by default: a current-thread runtime), everything else
/// on tokio's default multi-thread runtime.
pub fn main(cli: Cli) -> ExitCode {
    let code = match cli.command {
        Command::Sidecar(a) => match Config::load(&a.config) {
            Ok(cfg) => {
                let threads = cfg.sidecar.as_ref().map_or(1, |s| s.threads);
                on_runtime(threads, async move {
                    exit(crate::sidecar::run(cfg).await.map_err(Failure::failed))
                })
            }
            Err(e) => exit(Err(Failure::usage(e))),
        },
        command => on_runtime(0, run(Cli { command })),
    };
    // The runtime is gone, and with it every sender of a sidecar's audit queue (`sidecar`, or
    // `serve` with a `[sidecar]`): let the writers write what is left before the process ends.
    crate::audit::writer::finish(std::time::Duration::from_secs(10));
    code
}

/// Run `work` to completion on a runtime with `threads` workers: 1 is a current-thread
/// runtime, 0 tokio's default (one worker per core).
fn on_runtime(threads: usize, work: impl std::future::Future<Output = ExitCode>) -> ExitCode {
    let mut b = match threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    if threads > 1 {
        b.worker_threads(threads);
    }
    match b.enable_all().build() {
        Ok(rt) => rt.block_on(work),
        Err(e) => exit(Err(Failure::failed(format!("could not start the runtime: {e}")))),
    }
}

/// Run a parsed command line (`sidecar` included, on the caller's runtime).
pub async fn run(cli: Cli) -> ExitCode {
    let result = match cli.command {
        Command::Serve(a) => match Config::load(&a.config) {
            Ok(cfg) => crate::serve::run(cfg).await.map_err(Failure::failed),
            Err(e) => Err(Failure::usage(e)),
        },
        Command::Sidecar(a) => match Config::load(&a.config) {
            Ok(cfg) => crate::sidecar::run(cfg).await.map_err(Failure::failed),
            Err(e) => Err(Failure::usage(e)),
        },
        Command::Cert(CertCommand::Fetch {
            url,
            out,
            json,
            ca,
            config,
        }) => certfetch::run(&url, out, json, ca, config).await,
        Command::Cert(CertCommand::Show { file, json }) => cert_show(&file, json),
        Command::Verify(args) => return verify(args).await,
        Command::Audit(cmd) => audit(cmd),
        Command::Dlq(cmd) => dlq::run(cmd).await,
        Command::Ingest(args) => ingest(args).await,
        Command::Send(args) => return send::run(args).await,
        Command::Config(ConfigCommand::Check(a)) => config_check(&a.config),
        Command::Pki(PkiCommand::Init {
            dir,
            cn,
            dns,
            uri,
            days,
            force,
        }) => pki_init(dir, cn, dns, uri, days, force),
        Command::Pki(PkiCommand::Csr {
            config,
            identity,
            cn,
            san,
            out,
        }) => pki_csr(&config, &identity, &cn, &san, out.as_deref()),
        Command::Pki(PkiCommand::Install {
            config,
            identity,
            signed,
            as_next,
        }) => pki_install(&config, &identity, &signed, as_next),
        Command::Demo(args) => return crate::demo::run(args.profiles).await,
    };
    exit(result)
}

/// The exit code of a command's result; a failure is said on stderr first.
fn exit(result: Result<(), Failure>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure { code, message }) => {
            eprintln!("sallyport: {message}");
            ExitCode::from(code)
        }
    }
}

/// A command's failure: what to print and the exit code.
#[derive(Debug)]
pub struct Failure {
    pub code: u8,
    pub message: String,
}

impl Failure {
    pub fn usage(message: impl std::fmt::Display) -> Self {
        Failure {
            code: EXIT_USAGE,
            message: message.to_string(),
        }
    }
    pub fn failed(message: impl std::fmt::Display) -> Self {
        Failure {
            code: 1,
            message: message.to_string(),
        }
    }
}

async fn verify(args: VerifyArgs) -> ExitCode {
    let json = args.json;
    let opts = match verify_options(args) {
        Ok(o) => o,
        Err(f) => {
            eprintln!("sallyport: {}", f.message);
            return ExitCode::from(f.code);
        }
    };
    let report = crate::verify::run(opts).await;
    if json {
        println!("{}", serde_json::to_string(&report).unwrap_or_default());
    } else {
        print!("{}", crate::verify::table(&report));
    }
    if report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn verify_options(args: VerifyArgs) -> Result<crate::verify::Options, Failure> {
    use std::sync::Arc;
    let url =
        crate::config::check_url(&args.url).map_err(|e| Failure::usage(format!("{}: {e}", args.url)))?;
    if url.scheme() != "https" {
        return Err(Failure::usage(format!("{}: scheme must be https", args.url)));
    }
    let timeout = crate::config::parse_duration(&args.timeout)
        .map_err(|e| Failure::usage(format!("--timeout: {e}")))?;
    match configured_destination(&args.target)? {
        Some((_, core, d)) => {
            // The dataflow's own identity, as its deliveries present it.
            let identity = core
                .identities()
                .get(d.identity.as_deref())
                .map(|s| s.presented());
            let trust = crate::tls::Trust::from_optional_file(d.ca.as_deref()).map_err(Failure::usage)?;
            let send_test = if args.send_test {
                Some(core.destination(&d).map_err(Failure::usage)?)
            } else {
                None
            };
            Ok(crate::verify::Options {
                url,
                identity,
                trust,
                timeout,
                egress: core.egress().clone(),
                policy: true,
                send_test,
            })
        }
        None => {
            let identity = match (&args.target.client_cert, &args.target.client_key) {
                (Some(c), Some(k)) => Some(crate::tls::Identity::load(c, k).map_err(Failure::usage)?),
                _ => None,
            };
            let trust =
                crate::tls::Trust::from_optional_file(args.target.ca.as_deref()).map_err(Failure::usage)?;
            let send_test = if args.send_test {
                let core = operator_core(&args.target, allowing_host(&url, &args.allow)?)?;
                let d = crate::config::DestinationConfig {
                    ca: args.target.ca.clone(),
                    timeout,
                    ..crate::config::DestinationConfig::new("verify", Some(url.clone()))
                };
                Some(core.destination(&d).map_err(Failure::usage)?)
            } else {
                None
            };
            // Without a config there is no policy to judge by: the probes go where the
            // operator pointed, through the same connector, from no pinned address.
            let anywhere = crate::egress::Egress::allowing(&["0.0.0.0/0", "::/0"]).map_err(Failure::usage)?;
            Ok(crate::verify::Options {
                url,
                identity,
                trust,
                timeout,
                egress: Arc::new(anywhere),
                policy: false,
                send_test,
            })
        }
    }
}

/// With `--config` and `--dataflow`: the config, its delivery core and that dataflow as a
/// destination (trust overridden by `--ca`).
fn configured_destination(
    target: &TargetArgs,
) -> Result<Option<(Config, crate::delivery::Core, crate::config::DestinationConfig)>, Failure> {
    let (Some(path), Some(name)) = (&target.config, &target.dataflow) else {
        return Ok(None);
    };
    let cfg = Config::load(path).map_err(Failure::usage)?;
    let df = cfg
        .dataflow(name)
        .ok_or_else(|| Failure::usage(format!("{}: no dataflow named '{name}'", path.display())))?;
    let mut d = cfg.dataflow_destination(df).map_err(Failure::usage)?;
    if let Some(ca) = &target.ca {
        d.ca = Some(ca.clone());
    }
    let core = crate::delivery::Core::from_config(&cfg).map_err(Failure::usage)?;
    Ok(Some((cfg, core, d)))
}

/// Without `--config`: a delivery core presenting `--client-cert` (when given) under `egress`.
fn operator_core(
    target: &TargetArgs,
    egress: crate::egress::Egress,
) -> Result<crate::delivery::Core, Failure> {
    use crate::tls::creds::{Identities, IdentityStore};
    let identities = match (&target.client_cert, &target.client_key) {
        (Some(c), Some(k)) => Identities::one(IdentityStore::from_files(c, k).map_err(Failure::usage)?),
        _ => Identities::none(),
    };
    Ok(crate::delivery::Core::new(
        std::sync::Arc::new(identities),
        std::sync::Arc::new(egress),
    ))
}

/// An egress policy allowing the URL's own host name (what the operator typed) and the
/// `--allow` rules; the special ranges a name resolves to still need an address rule.
fn allowing_host(url: &url::Url, allow: &[String]) -> Result<crate::egress::Egress, Failure> {
    let mut rules: Vec<&str> = allow.iter().map(String::as_str).collect();
    if let Some(url::Host::Domain(d)) = url.host() {
        rules.push(d);
    }
    crate::egress::Egress::allowing(&rules).map_err(Failure::usage)
}

fn audit(cmd: AuditCommand) -> Result<(), Failure> {
    let (config, since) = match &cmd {
        AuditCommand::Verify { config } => (config, None),
        AuditCommand::Export { config, since } => (config, since.as_deref()),
    };
    let since_ms = match since {
        Some(s) => Some(
            crate::export::update::rfc3339_to_unix_ms(s)
                .ok_or_else(|| Failure::usage(format!("--since: '{s}' is not an RFC 3339 time")))?,
        ),
        None => None,
    };
    let cfg = Config::load(config).map_err(Failure::usage)?;
    let store = crate::store::open(&cfg).map_err(Failure::failed)?;
    let chain = crate::store::audit_chain(&cfg).map_err(Failure::failed)?;
    let keyed = cfg.audit.key_env.is_some() || cfg.audit.key_file.is_some();
    let export = matches!(cmd, AuditCommand::Export { .. });
    let mut out = std::io::stdout().lock();
    let mut total = 0;
    let chains = store.audit_chains().map_err(Failure::failed)?;
    for name in &chains {
        // One chain at a time, page by page: memory stays bounded by a page.
        let mut pass = AuditPass::new(name, &chain, export, since_ms);
        let mut after = 0;
        loop {
            let page = store
                .audit_chain_records(name, after, 10_000)
                .map_err(Failure::failed)?;
            let Some(last) = page.last() else { break };
            after = last.seq;
            for r in page {
                pass.record(r, &mut out)?;
            }
        }
        total += pass.verifier.verified();
    }
    // The sidecar's audit file, when it has one, is one more chain.
    let file = cfg
        .sidecar
        .as_ref()
        .and_then(|s| s.audit_file.as_ref())
        .map(|p| cfg.path(p));
    if let Some(path) = &file {
        let name = format!("file:{}", path.display());
        let mut pass = AuditPass::new(&name, &chain, export, since_ms);
        let mut first = true;
        crate::audit::file::read_chain(path, |r| {
            if std::mem::take(&mut first) && r.seq > 1 {
                // Earlier segments were archived: the chain is checked from the first one kept.
                if !export {
                    println!(
                        "chain '{name}' starts at record {} here (earlier segments archived or removed)",
                        r.seq
                    );
                }
                pass.verifier = crate::audit::Verifier::resume(&chain, r.seq - 1, &r.prev);
            }
            pass.record(r, &mut out)
        })?;
        total += pass.verifier.verified();
    }
    if !export {
        println!(
            "audit log intact: {total} record(s) verified in {} chain(s){}",
            chains.len() + usize::from(file.is_some()),
            if keyed {
                " (hash chain and HMAC)"
            } else {
                " (hash chain)"
            }
        );
    }
    Ok(())
}

/// One chain's walk for `audit verify` (each record checked in order) or `audit export` (each
/// record printed as a JSON line, from `since` on).
struct AuditPass<'a> {
    name: &'a str,
    verifier: crate::audit::Verifier<'a>,
    /// `Some(since)` when exporting.
    export: Option<Option<i64>>,
}

impl<'a> AuditPass<'a> {
    fn new(name: &'a str, chain: &'a crate::audit::Chain, export: bool, since_ms: Option<i64>) -> Self {
        AuditPass {
            name,
            verifier: crate::audit::Verifier::new(chain),
            export: export.then_some(since_ms),
        }
    }

    fn record(
        &mut self,
        r: crate::audit::ChainedRecord,
        out: &mut impl std::io::Write,
    ) -> Result<(), Failure> {
        let Some(since_ms) = self.export else {
            return self.verifier.push(&r).map_err(|b| {
                Failure::failed(format!(
                    "audit log broken at record {} of chain '{}': {}",
                    b.seq, self.name, b.reason
                ))
            });
        };
        let rec: serde_json::Value = serde_json::from_str(&r.record).map_err(Failure::failed)?;
        if since_ms.is_some_and(|s| rec["at"].as_i64().unwrap_or(0) < s) {
            return Ok(());
        }
        let line = serde_json::json!({"chain": self.name, "seq": r.seq, "hash": r.hash, "prev": r.prev, "record": rec});
        writeln!(out, "{line}").map_err(Failure::failed)
    }
}

impl From<String> for Failure {
    fn from(message: String) -> Self {
        Failure::failed(message)
    }
}

async fn ingest(args: IngestArgs) -> Result<(), Failure> {
    let cfg = Config::load(&args.config).map_err(Failure::usage)?;
    let bytes = if args.file.as_os_str() == "-" {
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin().lock(), &mut buf).map_err(Failure::usage)?;
        buf
    } else {
        std::fs::read(&args.file).map_err(|e| Failure::usage(format!("{}: {e}", args.file.display())))?
    };
    let engine = crate::export::Engine::open(&cfg).await.map_err(Failure::failed)?;
    let report = engine.ingest(&bytes).await.map_err(Failure::failed)?;
    let pending = engine.pending().await.map_err(Failure::failed)?;
    if args.json {
        println!(
            "{}",
            serde_json::json!({"accepted": report.accepted, "rejected": report.rejected,
            "errors": report.errors, "pendingDeliveries": pending})
        );
    } else {
        println!(
            "accepted {} update(s), rejected {}; {pending} deliveries pending",
            report.accepted, report.rejected
        );
        for e in &report.errors {
            eprintln!("{}:{}: {}", args.file.display(), e.line, e.reason);
        }
    }
    if report.rejected > 0 {
        return Err(Failure::failed(format!("{} line(s) rejected", report.rejected)));
    }
    Ok(())
}

fn config_check(path: &std::path::Path) -> Result<(), Failure> {
    let cfg = Config::load(path).map_err(Failure::usage)?;
    println!(
        "{}: ok ({} dataflow(s), {} segment(s))",
        path.display(),
        cfg.dataflows.len(),
        cfg.segments.len()
    );
    Ok(())
}

fn cert_show(file: &std::path::Path, json: bool) -> Result<(), Failure> {
    let certs = crate::tls::pem::load_certs(file).map_err(Failure::usage)?;
    let facts = certs
        .iter()
        .map(|c| crate::tls::CertFacts::from_der(c))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Failure::usage(format!("{}: {e}", file.display())))?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&facts).map_err(Failure::failed)?
        );
        return Ok(());
    }
    let now = time::OffsetDateTime::now_utc();
    for (i, f) in facts.iter().enumerate() {
        println!("certificate #{i}");
        println!("  subject      {}", f.subject);
        println!("  issuer       {}", f.issuer);
        println!("  serial       {}", f.serial);
        println!("  not before   {}", f.not_before);
        println!(
            "  not after    {} ({} days left)",
            f.not_after,
            f.days_to_expiry(now)
        );
        for (kind, list) in [
            ("dns", &f.sans.dns),
            ("ip", &f.sans.ip),
            ("uri", &f.sans.uri),
            ("email", &f.sans.email),
        ] {
            if !list.is_empty() {
                println!("  san {kind:<8} {}", list.join(", "));
            }
        }
        println!("  sha256       {}", f.sha256_fingerprint);
    }
    Ok(())
}

fn pending_key(cfg: &Config, identity: &str) -> Result<PathBuf, Failure> {
    if !cfg.identities.contains_key(identity) {
        return Err(Failure::usage(format!(
            "no [identities.{identity}] in the config: add it with the cert and key paths to install into"
        )));
    }
    Ok(cfg.path(&cfg.pki.key_dir).join(format!("{identity}.pending.key")))
}

fn pki_csr(
    config: &std::path::Path,
    identity: &str,
    cn: &str,
    san: &[String],
    out: Option<&std::path::Path>,
) -> Result<(), Failure> {
    let cfg = Config::parse_unvalidated(config).map_err(Failure::usage)?;
    let key_path = pending_key(&cfg, identity)?;
    let dir = key_path.parent().unwrap_or(std::path::Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Failure::failed(format!("{}: {e}", dir.display())))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
    }
    let (csr, key) = crate::pki::make_csr(cn, san).map_err(Failure::usage)?;
    crate::pki::write_private(&key_path, &key).map_err(Failure::failed)?;
    match out {
        Some(p) => {
            crate::pki::write_public(p, &csr).map_err(Failure::failed)?;
            eprintln!(
                "CSR for identity '{identity}' written to {}; key kept at {} (0600)",
                p.display(),
                key_path.display()
            );
        }
        None => print!("{csr}"),
    }
    Ok(())
}

fn pki_install(
    config: &std::path::Path,
    identity: &str,
    signed: &std::path::Path,
    as_next: bool,
) -> Result<(), Failure> {
    let cfg = Config::parse_unvalidated(config).map_err(Failure::usage)?;
    let key_path = pending_key(&cfg, identity)?;
    if !key_path.exists() {
        return Err(Failure::usage(format!(
            "no pending key for '{identity}' at {}: run `sallyport pki csr --identity {identity}` first",
            key_path.display()
        )));
    }
    let id =
        crate::pki::check_signed(signed, &key_path).map_err(|e| Failure::failed(format!("refused: {e}")))?;
    let Some(table) = cfg.identities.get(identity) else {
        return Err(Failure::usage(format!("no [identities.{identity}]")));
    };
    let (cert_dst, key_dst) = if as_next {
        match (&table.next_cert, &table.next_key) {
            (Some(c), Some(k)) => (cfg.path(c), cfg.path(k)),
            _ => {
                return Err(Failure::usage(format!(
                    "--as-next needs next_cert and next_key in [identities.{identity}]"
                )))
            }
        }
    } else {
        (cfg.path(&table.cert), cfg.path(&table.key))
    };
    let chain =
        std::fs::read_to_string(signed).map_err(|e| Failure::failed(format!("{}: {e}", signed.display())))?;
    let key = std::fs::read_to_string(&key_path)
        .map_err(|e| Failure::failed(format!("{}: {e}", key_path.display())))?;
    // Key first, then certificate, each by rename: a reload between the two sees a mismatch
    // and keeps the old identity until both are in place.
    let tmp_key = key_dst.with_extension("key.installing");
    crate::pki::write_private(&tmp_key, &key).map_err(Failure::failed)?;
    std::fs::rename(&tmp_key, &key_dst)
        .map_err(|e| Failure::failed(format!("{}: {e}", key_dst.display())))?;
    let tmp_cert = cert_dst.with_extension("pem.installing");
    crate::pki::write_public(&tmp_cert, &chain).map_err(Failure::failed)?;
    std::fs::rename(&tmp_cert, &cert_dst)
        .map_err(|e| Failure::failed(format!("{}: {e}", cert_dst.display())))?;
    let _ = std::fs::remove_file(&key_path);
    println!(
        "installed '{}' (issuer {}, expires {}) as identity '{identity}'{}",
        id.facts.display_name(),
        id.facts.issuer,
        id.facts.not_after,
        if as_next { " (next)" } else { "" }
    );
    Ok(())
}

fn pki_init(
    dir: PathBuf,
    cn: String,
    dns: Vec<String>,
    uri: Vec<String>,
    days: i64,
    force: bool,
) -> Result<(), Failure> {
    let opts = crate::pki::InitOptions {
        client_cn: cn,
        client_dns: dns,
        client_uris: uri,
        days,
        force,
    };
    let files = crate::pki::init(&dir, &opts).map_err(Failure::usage)?;
    println!("dev PKI written to {}", files.dir.display());
    for (what, p) in [
        ("CA certificate      ", &files.ca_cert),
        ("CA key (0600)       ", &files.ca_key),
        ("receiver certificate", &files.server_cert),
        ("receiver key (0600) ", &files.server_key),
        ("gateway certificate ", &files.client_cert),
        ("gateway key (0600)  ", &files.client_key),
    ] {
        println!("  {what}  {}", p.display());
    }
    Ok(())
}
