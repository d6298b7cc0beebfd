//! `[store]`: the SQLite or PostgreSQL database that holds deliveries and the audit log.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::config::parse::parse_duration;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// `sqlite://PATH` (default `sqlite://var/sallyport.db`) or `postgres://user@host:port/db`
    /// (several instances may share one PostgreSQL database). Put no password here: use
    /// `password_env` or `password_file`.
    #[serde(default = "default_store_url")]
    pub url: String,
    /// PostgreSQL password from this environment variable. Default: none (trust/peer auth).
    pub password_env: Option<String>,
    /// PostgreSQL password from this file. Default: none.
    pub password_file: Option<PathBuf>,
    /// PostgreSQL schema holding Sallyport's tables (created when missing). Default `public`.
    pub schema: Option<String>,
    /// This instance's name in leases and its audit chain (PostgreSQL). Default: the host name.
    pub instance: Option<String>,
    /// How long a claimed delivery stays leased to the instance that claimed it; after that,
    /// another instance may take it over (an instance that died). Default `"30s"`.
    #[serde(default = "default_lease")]
    pub lease: String,
    /// PostgreSQL connections per instance. Default 4.
    #[serde(default = "default_pool_size")]
    pub pool_size: usize,
    /// SQLite's page cache for its writer connection, MiB (the reader keeps SQLite's default
    /// 2 MiB). A bigger cache keeps more of a large outbox in memory; the process's memory
    /// grows by as much. Default 16; 1..=1024.
    #[serde(default = "default_cache_mib")]
    pub cache_mib: u32,
    /// CA bundle for the PostgreSQL server's certificate. When set, every connection is TLS
    /// (required, verified, host name checked). Default: none — plaintext, for a database on
    /// the same host or a trusted private network.
    pub ca: Option<PathBuf>,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            url: default_store_url(),
            password_env: None,
            password_file: None,
            schema: None,
            instance: None,
            lease: default_lease(),
            pool_size: default_pool_size(),
            cache_mib: default_cache_mib(),
            ca: None,
        }
    }
}

impl StoreConfig {
    /// The validated lease (validation guarantees it parses).
    pub fn lease(&self) -> Duration {
        parse_duration(&self.lease).unwrap_or(Duration::from_secs(30))
    }

    /// Whether the URL carries a password: in its userinfo, as a `password` query parameter,
    /// or anywhere the PostgreSQL driver itself would find one (it also reads URLs, such as
    /// several hosts, that the URL parser refuses).
    pub fn url_has_password(&self) -> bool {
        if let Ok(u) = url::Url::parse(&self.url) {
            if u.password().is_some() || u.query_pairs().any(|(k, _)| is_password_key(&k)) {
                return true;
            }
        }
        self.url
            .parse::<tokio_postgres::Config>()
            .is_ok_and(|c| c.get_password().is_some())
    }

    /// The URL with any password (`user:…@` or a `password` query parameter) replaced, fit
    /// for a log line or an error.
    pub fn redacted_url(&self) -> String {
        match url::Url::parse(&self.url) {
            Ok(mut u) => {
                if u.password().is_some() {
                    let _ = u.set_password(Some("REDACTED"));
                }
                if u.query_pairs().any(|(k, _)| is_password_key(&k)) {
                    let pairs: Vec<(String, String)> = u
                        .query_pairs()
                        .map(|(k, v)| {
                            let v = if is_password_key(&k) {
                                "REDACTED".into()
                            } else {
                                v.into_owned()
                            };
                            (k.into_owned(), v)
                        })
                        .collect();
                    u.query_pairs_mut().clear().extend_pairs(pairs);
                }
                u.to_string()
            }
            Err(_) => "(unparseable URL)".into(),
        }
    }
}

/// A query parameter that carries the database password (`postgres://…?password=…`). The
/// driver reads exactly `password`; other cases and padded spellings are refused as well.
fn is_password_key(k: &str) -> bool {
    k.trim().eq_ignore_ascii_case("password")
}

fn default_lease() -> String {
    "30s".into()
}
fn default_cache_mib() -> u32 {
    16
}

fn default_pool_size() -> usize {
    4
}
fn default_store_url() -> String {
    "sqlite://var/sallyport.db".into()
}
