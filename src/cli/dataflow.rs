//! `sallyport dataflow pause|resume|status`: an operator's hold on a dataflow. The pause is
//! written to the store, so running instances (this machine's `serve`, or every instance on a
//! shared PostgreSQL store) take it within a second, and it outlives restarts.

use std::path::PathBuf;

use clap::Subcommand;

use super::Failure;
use crate::config::Config;
use crate::events::EventType;
use crate::store::{self, now_ms, Pause, PauseReason, Store};

#[derive(Debug, Subcommand)]
pub enum DataflowCommand {
    /// Stop delivering to a dataflow (ingest keeps queueing; nothing becomes a dead letter).
    Pause {
        #[arg(long, short, default_value = "config/sallyport.toml")]
        config: PathBuf,
        name: String,
        /// Why, for whoever reads the status.
        #[arg(long)]
        message: Option<String>,
    },
    /// Resume a paused dataflow (paused by an operator or by its breaker).
    Resume {
        #[arg(long, short, default_value = "config/sallyport.toml")]
        config: PathBuf,
        name: String,
    },
    /// Each dataflow's state: running or paused (why, since when, next probe), and its queue.
    Status {
        #[arg(long, short, default_value = "config/sallyport.toml")]
        config: PathBuf,
        /// Only this dataflow.
        name: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

pub(super) async fn run(cmd: DataflowCommand) -> Result<(), Failure> {
    match cmd {
        DataflowCommand::Pause {
            config,
            name,
            message,
        } => {
            let (cfg, _, store) = open(&config, Some(&name))?;
            let pause = Pause::manual(&name, message, now_ms());
            store.pause(&pause).map_err(Failure::failed)?;
            println!("{name}: paused; running instances stop delivering to it within a second, ingest keeps queueing");
            announce(
                &cfg,
                EventType::DataflowPaused,
                crate::export::engine::pause_data(&pause),
            )
            .await
        }
        DataflowCommand::Resume { config, name } => {
            let (cfg, _, store) = open(&config, Some(&name))?;
            if !store.resume(&name, false).map_err(Failure::failed)? {
                println!("{name}: was not paused");
                return Ok(());
            }
            println!("{name}: resumed; queued deliveries go out within a second");
            let data = crate::export::engine::resumed_data(&name, "operator");
            announce(&cfg, EventType::DataflowResumed, data).await
        }
        DataflowCommand::Status { config, name, json } => {
            let (_, names, store) = open(&config, name.as_deref())?;
            let pauses = store.pauses().map_err(Failure::failed)?;
            let mut rows = Vec::new();
            for n in names
                .iter()
                .filter(|n| name.as_ref().is_none_or(|only| only == *n))
            {
                let pause = pauses.iter().find(|p| &p.dataflow == n).cloned();
                let pending = store.pending(Some(n)).map_err(Failure::failed)?;
                rows.push(serde_json::json!({
                    "dataflow": n,
                    "state": if pause.is_some() { "paused" } else { "running" },
                    "pause": pause,
                    "pending": pending,
                }));
            }
            if json {
                println!("{}", serde_json::Value::Array(rows));
                return Ok(());
            }
            println!("{:<24} {:<8} {:>9}  why", "dataflow", "state", "queued");
            for r in &rows {
                let n = r["dataflow"].as_str().unwrap_or_default();
                let why = match pauses.iter().find(|p| p.dataflow == n) {
                    None => String::new(),
                    Some(p) => describe(p),
                };
                println!(
                    "{:<24} {:<8} {:>9}  {why}",
                    n,
                    r["state"].as_str().unwrap_or_default(),
                    r["pending"]
                );
            }
            Ok(())
        }
    }
}

/// One line on a pause: who, why, since when, and the next probe.
fn describe(p: &Pause) -> String {
    let at = |ms: i64| {
        time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
            .ok()
            .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
            .unwrap_or_else(|| ms.to_string())
    };
    match p.reason {
        PauseReason::Manual => format!("by an operator since {}: {}", at(p.since), p.message),
        PauseReason::Breaker => format!(
            "by the breaker ({}) since {}, next probe {}: {}",
            p.class.as_deref().unwrap_or("?"),
            at(p.since),
            at(p.probe_at),
            p.message
        ),
    }
}

/// The config's and the store's dataflow names, and the store; `name`, when given, must be
/// one of them.
fn open(config: &std::path::Path, name: Option<&str>) -> Result<Opened, Failure> {
    let cfg = Config::load(config).map_err(Failure::usage)?;
    let store = store::open(&cfg).map_err(Failure::failed)?;
    let mut names: Vec<String> = cfg.dataflows.iter().map(|d| d.name.clone()).collect();
    for (n, _) in store.api_dataflows().map_err(Failure::failed)? {
        if !names.contains(&n) {
            names.push(n);
        }
    }
    if let Some(n) = name {
        if !names.iter().any(|k| k == n) {
            return Err(Failure::usage(format!(
                "no dataflow named '{n}' (known: {})",
                names.join(", ")
            )));
        }
    }
    Ok((cfg, names, store))
}

type Opened = (Config, Vec<String>, std::sync::Arc<dyn Store>);

/// Tell the `[events]` webhook (when configured) what the operator did, and wait for it to be
/// sent: this process ends next.
async fn announce(cfg: &Config, kind: EventType, data: serde_json::Value) -> Result<(), Failure> {
    let core = crate::delivery::Core::from_config(cfg).map_err(Failure::failed)?;
    let (events, task) = crate::events::Events::from_config(cfg, &core).map_err(Failure::failed)?;
    events.emit(kind, data);
    drop(events);
    if let Some(task) = task {
        if tokio::time::timeout(std::time::Duration::from_secs(30), task)
            .await
            .is_err()
        {
            return Err(Failure::failed(format!(
                "the {} event could not be sent within 30 s (the change itself is stored)",
                kind.as_str()
            )));
        }
    }
    Ok(())
}
