//! `sallyport pki init|csr|install`: a dev PKI, and a named identity's key, CSR and signed certificate.

use std::path::PathBuf;

use super::Failure;
use crate::config::Config;

pub(super) fn init(
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

pub(super) fn csr(
    config: &std::path::Path,
    identity: &str,
    cn: &str,
    san: &[String],
    out: Option<&std::path::Path>,
) -> Result<(), Failure> {
    let cfg = Config::parse_unvalidated(config).map_err(Failure::usage)?;
    let key_path = pending_key(&cfg, identity)?;
    let dir = key_path.parent().unwrap_or(std::path::Path::new("."));
    if !dir.is_dir() {
        // Made 0700 when we make it; an existing directory (perhaps a shared one the
        // operator chose) keeps its mode: the key file itself is 0600 either way.
        #[cfg(unix)]
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| Failure::failed(format!("{}: {e}", dir.display())))?;
        }
        #[cfg(not(unix))]
        std::fs::create_dir_all(dir).map_err(|e| Failure::failed(format!("{}: {e}", dir.display())))?;
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

pub(super) fn install(
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
    if table.spiffe.is_some() {
        return Err(Failure::usage(format!(
            "identity '{identity}' comes from a SPIFFE Workload API agent (spiffe = …), which renews it: there are no files to install into"
        )));
    }
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

fn pending_key(cfg: &Config, identity: &str) -> Result<PathBuf, Failure> {
    if !cfg.identities.contains_key(identity) {
        return Err(Failure::usage(format!(
            "no [identities.{identity}] in the config: add it with the cert and key paths to install into"
        )));
    }
    Ok(cfg.path(&cfg.pki.key_dir).join(format!("{identity}.pending.key")))
}

/// `pki import`: what to read and where to write it.
pub(super) struct Import {
    pub(super) p12: PathBuf,
    pub(super) password_env: Option<String>,
    /// `--out-cert`, `--out-key`.
    pub(super) out: Option<(PathBuf, PathBuf)>,
    /// `--config`, `--identity`.
    pub(super) config: Option<(PathBuf, String)>,
}

pub(super) fn import(a: Import) -> Result<(), Failure> {
    let password = match &a.password_env {
        Some(var) => std::env::var(var).map_err(|_| {
            Failure::usage(format!(
                "--password-env {var}: the variable is not set (or not UTF-8)"
            ))
        })?,
        None => String::new(),
    };
    let (cert_dst, key_dst) = match (a.out, a.config) {
        (Some(out), _) => out,
        (None, Some((config, identity))) => {
            let cfg = Config::parse_unvalidated(&config).map_err(Failure::usage)?;
            let table = if identity == crate::tls::creds::DEFAULT {
                cfg.identity.as_ref()
            } else {
                cfg.identities.get(&identity)
            };
            let Some(table) = table else {
                return Err(Failure::usage(format!(
                    "no identity '{identity}' in {} ([identity] is `default`, else [identities.{identity}])",
                    config.display()
                )));
            };
            if table.spiffe.is_some() {
                return Err(Failure::usage(format!(
                    "identity '{identity}' comes from a SPIFFE Workload API agent (spiffe = …), which renews it: there are no files to write"
                )));
            }
            if table.p12.is_some() || table.cert.as_os_str().is_empty() {
                return Err(Failure::usage(format!(
                    "identity '{identity}' reads a PKCS#12 file itself (p12 = …): point p12 at the new file instead"
                )));
            }
            (cfg.path(&table.cert), cfg.path(&table.key))
        }
        (None, None) => {
            return Err(Failure::usage(
                "say where to write: --out-cert and --out-key, or --config and --identity",
            ))
        }
    };
    let contents = crate::tls::p12::load(&a.p12, &password).map_err(Failure::failed)?;
    drop(password);
    // Checked as an identity is when loaded: the key matches the leaf, valid now.
    let (chain_pem, key_pem) = (contents.chain_pem(), contents.key_pem());
    let id = crate::tls::Identity::load_p12_parts(&a.p12, contents).map_err(Failure::failed)?;
    // Key first, then certificate, each by rename: a reload between the two sees a mismatch
    // and keeps the old identity until both are in place.
    let tmp_key = key_dst.with_extension("key.importing");
    crate::pki::write_private(&tmp_key, &key_pem).map_err(Failure::failed)?;
    std::fs::rename(&tmp_key, &key_dst)
        .map_err(|e| Failure::failed(format!("{}: {e}", key_dst.display())))?;
    let tmp_cert = cert_dst.with_extension("pem.importing");
    crate::pki::write_public(&tmp_cert, &chain_pem).map_err(Failure::failed)?;
    std::fs::rename(&tmp_cert, &cert_dst)
        .map_err(|e| Failure::failed(format!("{}: {e}", cert_dst.display())))?;
    println!(
        "imported '{}' (issuer {}, expires {}; {} certificate(s)): chain → {}, key (0600) → {}",
        id.facts.display_name(),
        id.facts.issuer,
        id.facts.not_after,
        id.chain.len(),
        cert_dst.display(),
        key_dst.display()
    );
    Ok(())
}
