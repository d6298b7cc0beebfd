//! `sallyport dlq`: dead letters — deliveries that failed every attempt — listed, shown with
//! each attempt's error, replayed with their original idempotency keys, or purged.

use std::path::Path;

use super::{DlqCommand, Failure};
use crate::config::Config;
use crate::store::{self, DeadLetter, Store};

pub(super) async fn run(cmd: DlqCommand) -> Result<(), Failure> {
    match cmd {
        DlqCommand::List {
            config,
            dataflow,
            limit,
            json,
        } => {
            let store = open(&config)?;
            let list = store
                .dead_letters(dataflow.as_deref(), limit)
                .map_err(Failure::failed)?;
            if json {
                println!("{}", serde_json::to_string(&list).map_err(Failure::failed)?);
            } else if list.is_empty() {
                println!("no dead letters");
            } else {
                println!(
                    "{:>6}  {:<16} {:<24} {:>8}  last error",
                    "id", "dataflow", "profile", "attempts"
                );
                for d in &list {
                    println!(
                        "{:>6}  {:<16} {:<24} {:>8}  {}",
                        d.id,
                        d.dataflow,
                        d.profile_id,
                        d.attempts,
                        d.errors.last().map_or("", |e| e.kind.as_str())
                    );
                }
            }
            Ok(())
        }
        DlqCommand::Show { config, id } => {
            let store = open(&config)?;
            let d = store
                .dead_letter(id)
                .map_err(Failure::failed)?
                .ok_or_else(|| Failure::failed(format!("no dead letter {id}")))?;
            println!("{}", serde_json::to_string_pretty(&d).map_err(Failure::failed)?);
            Ok(())
        }
        DlqCommand::Replay { config, pick } => {
            let cfg = Config::load(&config).map_err(Failure::usage)?;
            let ids = select(&*store::open(&cfg).map_err(Failure::failed)?, pick)?;
            let engine = crate::export::Engine::open(&cfg).await.map_err(Failure::failed)?;
            let mut failed = 0;
            for id in &ids {
                match engine.replay_dead_letter(*id).await.map_err(Failure::failed)? {
                    Ok(()) => println!("{id}: delivered"),
                    Err(e) => {
                        failed += 1;
                        println!("{id}: failed again: {} ({})", e.message, e.kind);
                    }
                }
            }
            if failed > 0 {
                return Err(Failure::failed(format!(
                    "{failed} of {} replay(s) failed",
                    ids.len()
                )));
            }
            Ok(())
        }
        DlqCommand::Purge { config, pick } => {
            let store = open(&config)?;
            let ids = select(&*store, pick)?;
            for id in &ids {
                store.remove_dead_letter(*id).map_err(Failure::failed)?;
            }
            println!("purged {} dead letter(s)", ids.len());
            Ok(())
        }
    }
}

fn open(config: &Path) -> Result<std::sync::Arc<dyn Store>, Failure> {
    let cfg = Config::load(config).map_err(Failure::usage)?;
    store::open(&cfg).map_err(Failure::failed)
}

fn select(store: &dyn Store, pick: super::DlqSelection) -> Result<Vec<i64>, Failure> {
    let super::DlqSelection { ids, all, dataflow } = pick;
    let dataflow = dataflow.as_deref();
    match (ids.is_empty(), all) {
        (false, false) => Ok(ids),
        (true, true) => Ok(store
            .dead_letters(dataflow, usize::MAX >> 1)
            .map_err(Failure::failed)?
            .iter()
            .map(|d: &DeadLetter| d.id)
            .collect()),
        (false, true) => Err(Failure::usage("give dead letter ids or --all, not both")),
        (true, false) => Err(Failure::usage("give dead letter ids, or --all")),
    }
}
