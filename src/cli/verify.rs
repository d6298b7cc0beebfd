//! `sallyport verify`: check whether a receiving endpoint is ready for mTLS delivery.

use std::process::ExitCode;

use super::target::{allowing_host, configured_destination, operator_core};
use super::{Failure, VerifyArgs};

pub(super) async fn run(args: VerifyArgs) -> ExitCode {
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
    let timeout = match &args.timeout {
        Some(t) => {
            Some(crate::config::parse_duration(t).map_err(|e| Failure::usage(format!("--timeout: {e}")))?)
        }
        None => None,
    };
    if args.target.config.is_some() && !args.allow.is_empty() {
        return Err(Failure::usage(
            "--allow applies without --config; with --config, [egress] decides",
        ));
    }
    match configured_destination(&args.target)? {
        Some((_, core, mut d)) => {
            if let Some(t) = timeout {
                d.timeout = t;
            }
            let timeout = d.timeout;
            // The dataflow's own identity, as its deliveries present it.
            let identity = core
                .identities()
                .get(d.identity.as_deref())
                .map(|s| s.presented());
            let trust = d.trust().map_err(Failure::usage)?;
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
            let timeout = timeout.unwrap_or(crate::delivery::DEFAULT_TIMEOUT);
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
