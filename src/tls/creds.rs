//! The gateway's client identities over time: the `current` certificate, an optional `next`
//! one published ahead of use, the switch between them (at a configured time, or when
//! `current` is within N days of expiry), and hot reload of the files. A new certificate is
//! validated first, then swapped in atomically; connections take the identity in force when
//! they start, and a bad file is refused with a log line while the old material stays.
//! An identity may instead come from a SPIFFE Workload API agent ([`super::spiffe`]): each
//! X.509-SVID the agent pushes is checked and swapped in the same way.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::sign::CertifiedKey;
use time::OffsetDateTime;

use super::{Identity, TlsError};
use crate::config::Config;

/// The name of the gateway's own `[identity]` among named identities.
pub const DEFAULT: &str = "default";

/// Which role a published certificate plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Current,
    Next,
}

#[derive(Clone)]
struct Active {
    current: Identity,
    next: Option<Identity>,
}

/// Where the files are and when to switch.
#[derive(Debug, Clone)]
struct Paths {
    cert: PathBuf,
    key: PathBuf,
    /// A PKCS#12 file instead of `cert` and `key`, and where its password comes from (none:
    /// no password).
    p12: Option<(PathBuf, Option<crate::config::SecretSource>)>,
    next: Option<(PathBuf, PathBuf)>,
    switch_at: Option<OffsetDateTime>,
    switch_before_expiry: Option<Duration>,
    /// A SPIFFE Workload API agent instead of files.
    spiffe: Option<super::spiffe::Source>,
}

/// The identities of one gateway, shared by every connection and the public endpoints.
pub struct IdentityStore {
    paths: Paths,
    active: RwLock<Arc<Active>>,
    /// SHA-256 of the files last loaded (cert, key, next cert, next key): content, not
    /// modification time, which the kernel keeps at a coarse tick (two writes within one
    /// tick would look unchanged).
    stamps: RwLock<Vec<Option<Vec<u8>>>>,
    /// Successful reloads so far.
    reloads: std::sync::atomic::AtomicU64,
    /// The fingerprint of the certificate last presented, as rotation hooks were last told.
    announced: std::sync::Mutex<String>,
    /// Called when the presented certificate changes (see [`IdentityStore::on_rotation`]).
    hooks: RwLock<Vec<RotationHook>>,
    /// The SPIFFE feed of an agent-sourced identity (stops when the store is dropped).
    feed: std::sync::OnceLock<super::spiffe::Feed>,
    /// The X.509 authorities of the SVID's trust domain, as the agent last sent them.
    spiffe_bundle: RwLock<Vec<rustls_pki_types::CertificateDer<'static>>>,
}

/// The presented certificate of an identity changed: renewed files were loaded, or the switch
/// to the `next` certificate came.
#[derive(Debug, Clone)]
pub struct Rotation {
    /// SHA-256 of the certificate presented before (colon-separated upper-case hex).
    pub old_fingerprint: String,
    /// The certificate presented from now on.
    pub new: super::CertFacts,
}

/// A rotation hook: quick and non-blocking (it runs on the reloading task).
pub type RotationHook = Arc<dyn Fn(&Rotation) + Send + Sync>;

/// A rotation hook for every identity of a registry, told the identity's name.
pub type NamedRotationHook = Arc<dyn Fn(&str, &Rotation) + Send + Sync>;

impl std::fmt::Debug for IdentityStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityStore")
            .field("paths", &self.paths)
            .finish()
    }
}

impl IdentityStore {
    /// Load `[identity]` (and its `next` certificate); `None` when not configured.
    pub fn from_config(cfg: &Config) -> Result<Option<Arc<Self>>, String> {
        cfg.identity
            .as_ref()
            .map(|id| Self::from_identity(cfg, id))
            .transpose()
    }

    /// Every identity of the config: `default` for `[identity]`, and each `[identities.NAME]`.
    pub fn all_from_config(cfg: &Config) -> Result<std::collections::BTreeMap<String, Arc<Self>>, String> {
        let mut out = std::collections::BTreeMap::new();
        if let Some(id) = &cfg.identity {
            out.insert(DEFAULT.to_owned(), Self::from_identity(cfg, id)?);
        }
        for (name, id) in &cfg.identities {
            out.insert(
                name.clone(),
                Self::from_identity(cfg, id).map_err(|e| format!("identities.{name}: {e}"))?,
            );
        }
        Ok(out)
    }

    /// A plain certificate and key pair (no `next`): `send` and `verify` with `--client-cert`.
    pub fn from_files(cert: &std::path::Path, key: &std::path::Path) -> Result<Arc<Self>, String> {
        Self::from_paths(Paths {
            cert: cert.to_owned(),
            key: key.to_owned(),
            p12: None,
            next: None,
            switch_at: None,
            switch_before_expiry: None,
            spiffe: None,
        })
    }

    /// Load one identity table.
    pub fn from_identity(cfg: &Config, id: &crate::config::IdentityConfig) -> Result<Arc<Self>, String> {
        let p12 = match &id.p12 {
            Some(p) => {
                let password = match (&id.p12_password_env, &id.p12_password_file) {
                    (None, None) => None,
                    (env, file) => Some(crate::config::SecretSource::from_pair(
                        env.as_ref(),
                        file.as_ref().map(|f| cfg.path(f)).as_ref(),
                        "p12_password",
                    )?),
                };
                Some((cfg.path(p), password))
            }
            None => None,
        };
        Self::from_paths(Paths {
            cert: cfg.path(&id.cert),
            key: cfg.path(&id.key),
            p12,
            next: match (&id.next_cert, &id.next_key) {
                (Some(c), Some(k)) => Some((cfg.path(c), cfg.path(k))),
                _ => None,
            },
            switch_at: id
                .switch_at
                .as_deref()
                .and_then(|s| crate::profile::update::parse_rfc3339(s).ok()),
            switch_before_expiry: id
                .switch_before_expiry
                .as_deref()
                .and_then(|s| crate::config::parse_duration(s).ok()),
            spiffe: id.spiffe.as_ref().map(|s| super::spiffe::Source {
                socket: s.socket.clone(),
                spiffe_id: s.spiffe_id.clone(),
            }),
        })
    }

    fn from_paths(paths: Paths) -> Result<Arc<Self>, String> {
        let (active, bundle, pending) = match &paths.spiffe {
            Some(source) => {
                let (first, pending) = super::spiffe::start(source, super::spiffe::FIRST_SVID_TIMEOUT)
                    .map_err(|e| format!("identity: {e}"))?;
                tracing::info!(spiffe_id = %first.spiffe_id, socket = %source.socket,
                    "X.509-SVID received from the SPIFFE Workload API");
                let active = Active {
                    current: first.identity,
                    next: None,
                };
                (active, first.bundle, Some(pending))
            }
            None => (
                Self::load(&paths).map_err(|e| format!("identity: {e}"))?,
                Vec::new(),
                None,
            ),
        };
        let store = Arc::new(IdentityStore {
            stamps: RwLock::new(stamps(&paths)),
            paths,
            active: RwLock::new(Arc::new(active)),
            reloads: std::sync::atomic::AtomicU64::new(0),
            announced: std::sync::Mutex::new(String::new()),
            hooks: RwLock::new(Vec::new()),
            feed: std::sync::OnceLock::new(),
            spiffe_bundle: RwLock::new(bundle),
        });
        let presented = store.presented().facts.sha256_fingerprint;
        *store.announced.lock().unwrap_or_else(|p| p.into_inner()) = presented;
        if let Some(pending) = pending {
            let weak = Arc::downgrade(&store);
            let feed = pending.attach(Box::new(move |svid| match weak.upgrade() {
                Some(store) => {
                    store.apply_svid(svid);
                    true
                }
                None => false,
            }));
            let _ = store.feed.set(feed);
        }
        Ok(store)
    }

    /// Swap in an X.509-SVID the agent pushed (already checked), and tell the rotation hooks
    /// when the presented certificate changed.
    fn apply_svid(&self, svid: super::spiffe::Svid) {
        let old = self.active().current.facts.sha256_fingerprint.clone();
        let changed = old != svid.identity.facts.sha256_fingerprint;
        if let Ok(mut b) = self.spiffe_bundle.write() {
            *b = svid.bundle;
        }
        if changed {
            if let Ok(mut w) = self.active.write() {
                *w = Arc::new(Active {
                    current: svid.identity,
                    next: None,
                });
            }
            self.reloads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        tracing::info!(spiffe_id = %svid.spiffe_id, changed, "X.509-SVID received from the SPIFFE Workload API");
        self.announce();
    }

    /// The SPIFFE Workload API agent this identity comes from, if it does.
    pub fn spiffe_source(&self) -> Option<&super::spiffe::Source> {
        self.paths.spiffe.as_ref()
    }

    /// For an agent-sourced identity, the X.509 authorities of its trust domain as the agent
    /// last sent them (empty for file identities).
    pub fn spiffe_bundle(&self) -> Vec<rustls_pki_types::CertificateDer<'static>> {
        self.spiffe_bundle
            .read()
            .map(|b| b.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    fn load(p: &Paths) -> Result<Active, TlsError> {
        let current = match &p.p12 {
            Some((file, password)) => {
                let password = match password {
                    Some(source) => source.read().map_err(|reason| TlsError::P12 {
                        path: file.clone(),
                        reason: format!("password: {reason}"),
                    })?,
                    None => crate::config::Secret::new(""),
                };
                Identity::load_p12(file, password.expose())?
            }
            None => Identity::load(&p.cert, &p.key)?,
        };
        let next = match &p.next {
            Some((c, k)) => Some(Identity::load(c, k)?),
            None => None,
        };
        Ok(Active { current, next })
    }

    fn active(&self) -> Arc<Active> {
        self.active
            .read()
            .map(|a| a.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    fn switched(&self, a: &Active, now: OffsetDateTime) -> bool {
        a.next.is_some()
            && (self.paths.switch_at.is_some_and(|t| now >= t)
                || self.paths.switch_before_expiry.is_some_and(|d| {
                    a.current.facts.not_after - now
                        <= time::Duration::try_from(d).unwrap_or(time::Duration::ZERO)
                }))
    }

    /// The identity to present on a connection starting now.
    pub fn presented(&self) -> Identity {
        let a = self.active();
        match &a.next {
            Some(next) if self.switched(&a, OffsetDateTime::now_utc()) => next.clone(),
            _ => a.current.clone(),
        }
    }

    /// Changes whenever the identity in force may have changed (a reload, or the switch to
    /// `next`): connection pools start afresh when it does.
    pub fn generation(&self) -> u64 {
        let switched = self.switched(&self.active(), OffsetDateTime::now_utc());
        self.reloads.load(std::sync::atomic::Ordering::Relaxed) * 2 + u64::from(switched)
    }

    /// The key rustls presents on a connection starting now.
    pub fn certified_key(&self) -> Arc<CertifiedKey> {
        self.presented().certified_key()
    }

    /// What receivers should trust now: the one in use and, until the switch, the next one.
    /// After the switch the old certificate is no longer published.
    pub fn published(&self) -> Vec<(Role, Identity)> {
        let a = self.active();
        match &a.next {
            Some(next) if self.switched(&a, OffsetDateTime::now_utc()) => vec![(Role::Current, next.clone())],
            Some(next) => vec![(Role::Current, a.current.clone()), (Role::Next, next.clone())],
            None => vec![(Role::Current, a.current.clone())],
        }
    }

    /// Call `hook` whenever the presented certificate changes from now on: after a reload
    /// that changed it, or at the first reload check after the switch to `next`.
    pub fn on_rotation(&self, hook: RotationHook) {
        self.hooks.write().unwrap_or_else(|p| p.into_inner()).push(hook);
    }

    /// Tell the rotation hooks if the presented certificate is not the one last announced.
    fn announce(&self) {
        let presented = self.presented();
        let old = {
            let mut announced = self.announced.lock().unwrap_or_else(|p| p.into_inner());
            if *announced == presented.facts.sha256_fingerprint {
                return;
            }
            std::mem::replace(&mut *announced, presented.facts.sha256_fingerprint.clone())
        };
        let rotation = Rotation {
            old_fingerprint: old,
            new: presented.facts,
        };
        let hooks = self.hooks.read().unwrap_or_else(|p| p.into_inner()).clone();
        for hook in hooks {
            hook(&rotation);
        }
    }

    /// Reload the files if they changed (or when `force`). A valid set is swapped in; an
    /// invalid one is refused and the old material stays. Returns whether it changed.
    /// Rotation hooks hear of a change in the presented certificate (a time-based switch to
    /// `next` included, at the first call after it).
    pub fn reload(&self, force: bool) -> Result<bool, String> {
        let result = self.reload_files(force);
        self.announce();
        result
    }

    fn reload_files(&self, force: bool) -> Result<bool, String> {
        if self.paths.spiffe.is_some() {
            // The agent pushes renewals; there are no files to poll.
            return Ok(false);
        }
        let now = stamps(&self.paths);
        let unchanged = self.stamps.read().map(|s| *s == now).unwrap_or(false);
        if unchanged && !force {
            return Ok(false);
        }
        match Self::load(&self.paths) {
            Ok(a) => {
                let old = self.active().current.facts.sha256_fingerprint.clone();
                if let Ok(mut w) = self.active.write() {
                    *w = Arc::new(a);
                }
                if let Ok(mut s) = self.stamps.write() {
                    *s = now;
                }
                let new = self.active().current.facts.sha256_fingerprint.clone();
                self.reloads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::info!(changed = old != new, "client identity reloaded");
                Ok(true)
            }
            Err(e) => {
                // Remember the stamps so a bad file is reported once, not every poll.
                if let Ok(mut s) = self.stamps.write() {
                    *s = now;
                }
                tracing::error!(error = %e, "refused the new identity files; the previous identity stays in use");
                Err(e.to_string())
            }
        }
    }

    /// Seconds until the presented certificate expires.
    pub fn expiry_seconds(&self) -> i64 {
        (self.presented().facts.not_after - OffsetDateTime::now_utc()).whole_seconds()
    }

    /// Poll the files every `every` and reload on SIGHUP, until aborted (one store alone;
    /// a gateway watches all of them through [`Identities::watch`]).
    pub async fn watch(self: Arc<Self>, every: Duration) {
        Identities::one(self).watch(every).await
    }
}

/// Every client identity of one gateway by name (`default` for `[identity]`, and each
/// `[identities.NAME]`), built once from the config and shared by everything that connects:
/// export couriers, sidecar routes, OAuth token requests, the alert webhook, `verify`. One
/// watcher reloads them all, so a certificate renewed on disk reaches every one of them.
#[derive(Debug, Default)]
pub struct Identities {
    by_name: std::collections::BTreeMap<String, Arc<IdentityStore>>,
}

impl Identities {
    /// Every identity of the config, loaded and checked now.
    pub fn from_config(cfg: &Config) -> Result<Self, String> {
        Ok(Identities {
            by_name: IdentityStore::all_from_config(cfg)?,
        })
    }

    /// Only `store`, as the default identity.
    pub fn one(store: Arc<IdentityStore>) -> Self {
        Identities {
            by_name: std::iter::once((DEFAULT.to_owned(), store)).collect(),
        }
    }

    /// No identity at all (a destination that never presents a certificate).
    pub fn none() -> Self {
        Identities::default()
    }

    /// The identity a destination presents: the named one, else the default. `None` when
    /// it is not configured.
    pub fn get(&self, name: Option<&str>) -> Option<&Arc<IdentityStore>> {
        self.by_name.get(name.unwrap_or(DEFAULT))
    }

    /// Every identity, by name.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Arc<IdentityStore>)> {
        self.by_name.iter()
    }

    /// Call `hook` with the identity's name whenever one's presented certificate changes
    /// (see [`IdentityStore::on_rotation`]).
    pub fn on_rotation(&self, hook: NamedRotationHook) {
        for (name, store) in &self.by_name {
            let (name, hook) = (name.clone(), hook.clone());
            store.on_rotation(Arc::new(move |r| hook(&name, r)));
        }
    }

    /// Poll every identity's files each `every` and reload them all on SIGHUP, until aborted.
    ///
    /// Installing the SIGHUP handler also replaces the signal's default action (ending the
    /// process), so a gateway with no identity at all still survives `kill -HUP`.
    pub async fn watch(&self, every: Duration) {
        watch_files(every, |forced| self.reload_all(forced)).await
    }

    /// Reload every identity whose files changed (all of them when `force`).
    pub fn reload_all(&self, force: bool) {
        for store in self.by_name.values() {
            let _ = store.reload(force);
        }
    }
}

/// Call `reload(false)` every `every` and `reload(true)` on SIGHUP, until aborted: the one
/// loop that keeps identities and watched CA bundles current.
///
/// Installing the SIGHUP handler also replaces the signal's default action (ending the
/// process), so a gateway with nothing to reload still survives `kill -HUP`.
pub async fn watch_files(every: Duration, mut reload: impl FnMut(bool)) {
    #[cfg(unix)]
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let mut tick = tokio::time::interval(every);
    loop {
        #[cfg(unix)]
        let forced = match hup.as_mut() {
            Some(h) => tokio::select! {
                _ = tick.tick() => false,
                _ = h.recv() => true,
            },
            None => {
                tick.tick().await;
                false
            }
        };
        #[cfg(not(unix))]
        let forced = {
            tick.tick().await;
            false
        };
        if forced {
            tracing::info!("SIGHUP: reloading every client identity and CA bundle");
        }
        reload(forced);
    }
}

fn stamps(p: &Paths) -> Vec<Option<Vec<u8>>> {
    if p.spiffe.is_some() {
        return Vec::new();
    }
    let m = |f: &PathBuf| {
        std::fs::read(f)
            .ok()
            .map(|b| ring::digest::digest(&ring::digest::SHA256, &b).as_ref().to_vec())
    };
    let mut v = match &p.p12 {
        Some((file, _)) => vec![m(file)],
        None => vec![m(&p.cert), m(&p.key)],
    };
    if let Some((c, k)) = &p.next {
        v.push(m(c));
        v.push(m(k));
    }
    v
}
