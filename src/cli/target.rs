//! The receiver a command targets: a configured dataflow's destination, or an operator's own files.

use super::{Failure, TargetArgs};
use crate::config::Config;

/// With `--config` and `--dataflow`: the config, its delivery core and that dataflow as a
/// destination (trust overridden by `--ca`).
pub(super) fn configured_destination(
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
pub(super) fn operator_core(
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
pub(super) fn allowing_host(url: &url::Url, allow: &[String]) -> Result<crate::egress::Egress, Failure> {
    let mut rules: Vec<&str> = allow.iter().map(String::as_str).collect();
    if let Some(url::Host::Domain(d)) = url.host() {
        rules.push(d);
    }
    crate::egress::Egress::allowing(&rules).map_err(Failure::usage)
}
