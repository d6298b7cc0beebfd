//! The clap definitions of every `sallyport` subcommand, its flags and their help text.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use super::send;
use crate::delivery::FailureClass;
use crate::store::DeadLetterFilter;

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
    /// Pause, resume and show the delivery state of dataflows.
    #[command(subcommand)]
    Dataflow(super::dataflow::DataflowCommand),
    /// The gateway at a glance (asks the running `serve`'s admin API): dataflows, dead
    /// letters, identities, egress addresses, latest audit records.
    Status(super::status::StatusArgs),
    /// Render what a dataflow would send (its aggregation and template), or make sample profiles.
    #[command(subcommand)]
    Template(super::template::TemplateCommand),
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

/// Conditions on dead letters (each one given must hold).
#[derive(Debug, Args)]
pub struct DlqFilterArgs {
    /// Only this dataflow's.
    #[arg(long)]
    pub dataflow: Option<String>,
    /// Only this failure class's (of the last attempt): refused, unavailable, certificate,
    /// policy or internal.
    #[arg(long, value_parser = parse_class)]
    pub class: Option<FailureClass>,
    /// Only those dead-lettered at or after this time: RFC 3339 (2026-12-04T10:00:00Z) or a
    /// duration back from now (10m, 2h, 1d).
    #[arg(long, value_parser = parse_time)]
    pub since: Option<i64>,
    /// Only those dead-lettered before this time (as --since).
    #[arg(long, value_parser = parse_time)]
    pub until: Option<i64>,
}

impl DlqFilterArgs {
    /// Whether any condition is given.
    pub fn any(&self) -> bool {
        self.dataflow.is_some() || self.class.is_some() || self.since.is_some() || self.until.is_some()
    }

    /// The store filter for these conditions, at most `limit` letters.
    pub fn filter(self, limit: usize) -> DeadLetterFilter {
        DeadLetterFilter {
            dataflow: self.dataflow,
            class: self.class,
            since_ms: self.since,
            until_ms: self.until,
            after_id: None,
            limit,
        }
    }
}

fn parse_class(s: &str) -> Result<FailureClass, String> {
    s.parse()
}

fn parse_time(s: &str) -> Result<i64, String> {
    crate::store::parse_time_or_ago(s, crate::store::now_ms())
}

/// Which dead letters a command acts on: ids, or every one the filters (or --all) select.
#[derive(Debug, Args)]
pub struct DlqSelection {
    /// Dead letter ids; none with --all or filters.
    pub ids: Vec<i64>,
    /// Every dead letter (that the filters select, when given).
    #[arg(long)]
    pub all: bool,
    #[command(flatten)]
    pub filter: DlqFilterArgs,
}

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// List dead letters (oldest first), with the failure class of each one's last attempt.
    List {
        #[arg(long, short, default_value = "config/sallyport.toml")]
        config: PathBuf,
        #[command(flatten)]
        filter: DlqFilterArgs,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// Show one dead letter with every attempt's error and class (never the payload).
    Show {
        #[arg(long, short, default_value = "config/sallyport.toml")]
        config: PathBuf,
        id: i64,
    },
    /// Re-send dead letters with their original idempotency keys (audited as replay:cli).
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
    /// Budget for connect, handshake and answer. Default: the dataflow's timeout with
    /// --config, else 2s.
    #[arg(long)]
    pub timeout: Option<String>,
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
    Fetch(CertFetchArgs),
}

#[derive(Debug, Args)]
pub struct CertFetchArgs {
    /// Gateway base URL (its public listener), e.g. https://gateway:8443.
    pub url: String,
    /// Write the certificates as a PEM bundle for the receiver's trust store (over http://
    /// only with --insecure-http).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// JSON output.
    #[arg(long)]
    pub json: bool,
    /// CA bundle for an https:// public listener.
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// Connect as this config's gateway does: from its `egress.source_ips`, never to an
    /// `egress.deny` destination.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Write a trust bundle fetched over plain http:// (anyone on the path could have
    /// swapped the certificates; compare the fingerprints out of band).
    #[arg(long)]
    pub insecure_http: bool,
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
    /// Write the certificate chain and private key (0600) of a PKCS#12 file as PEM: to
    /// --out-cert/--out-key, or where --config's identity (--identity NAME, `default` for
    /// [identity]) expects them. Checked first: the key matches, the certificate is valid now.
    Import {
        /// The PKCS#12 file (.p12/.pfx), e.g. from `openssl pkcs12 -export`.
        #[arg(long)]
        p12: PathBuf,
        /// Environment variable holding its password (default: no password).
        #[arg(long)]
        password_env: Option<String>,
        /// Where to write the chain (PEM, leaf first).
        #[arg(long, requires = "out_key")]
        out_cert: Option<PathBuf>,
        /// Where to write the key (PEM PKCS#8, mode 0600).
        #[arg(long, requires = "out_cert")]
        out_key: Option<PathBuf>,
        /// Write where this config's identity expects them.
        #[arg(long, short, conflicts_with_all = ["out_cert", "out_key"], requires = "identity")]
        config: Option<PathBuf>,
        /// The identity in --config (`default` for [identity]).
        #[arg(long, requires = "config")]
        identity: Option<String>,
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
