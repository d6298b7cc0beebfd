//! `sallyport dlq`: dead letters — deliveries that failed every attempt — listed (by dataflow,
//! failure class and time when asked), shown with each attempt's error, replayed with their
//! original idempotency keys, or purged.

use std::path::Path;

use super::{DlqCommand, DlqSelection, Failure};
use crate::audit::ReplayTrigger;
use crate::config::Config;
use crate::export::engine::{ReplaySummary, Replayed};
use crate::store::{self, DeadLetterFilter, Store};

/// Dead letters read from the store at once while collecting ids.
const PAGE: usize = 500;

pub(super) async fn run(cmd: DlqCommand) -> Result<(), Failure> {
    match cmd {
        DlqCommand::List {
            config,
            filter,
            limit,
            json,
        } => {
            let store = open(&config)?;
            let list = store
                .dead_letters_where(&filter.filter(limit))
                .map_err(Failure::failed)?;
            if json {
                println!("{}", serde_json::to_string(&list).map_err(Failure::failed)?);
            } else if list.is_empty() {
                println!("no dead letters");
            } else {
                println!(
                    "{:>6}  {:<16} {:<12} {:<24} {:>8}  last error",
                    "id", "dataflow", "class", "profile", "attempts"
                );
                for d in &list {
                    println!(
                        "{:>6}  {:<16} {:<12} {:<24} {:>8}  {}",
                        d.id,
                        d.dataflow,
                        d.class.as_str(),
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
            let pick = Pick::of(pick)?;
            let engine = crate::export::Engine::open(&cfg).await.map_err(Failure::failed)?;
            let summary = match pick {
                Pick::Ids(ids) => {
                    let mut summary = ReplaySummary::default();
                    for id in ids {
                        let r = match engine
                            .replay_dead_letter(id, ReplayTrigger::Cli)
                            .await
                            .map_err(Failure::failed)?
                        {
                            Ok(()) => {
                                summary.delivered += 1;
                                Replayed::Delivered
                            }
                            Err(e) => {
                                summary.failed += 1;
                                Replayed::Failed(e)
                            }
                        };
                        summary.replayed += 1;
                        say_replayed(id, &r);
                    }
                    summary
                }
                Pick::Filter(filter) => engine
                    .replay_dead_letters(&filter, ReplayTrigger::Cli, say_replayed)
                    .await
                    .map_err(Failure::failed)?,
            };
            let mut line = format!(
                "replayed {} dead letter(s): {} delivered, {} failed",
                summary.replayed, summary.delivered, summary.failed
            );
            if summary.skipped > 0 {
                line += &format!(", {} skipped", summary.skipped);
            }
            println!("{line}");
            if summary.failed > 0 {
                return Err(Failure::failed(format!(
                    "{} of {} replay(s) failed",
                    summary.failed, summary.replayed
                )));
            }
            Ok(())
        }
        DlqCommand::Purge { config, pick } => {
            let store = open(&config)?;
            let ids = match Pick::of(pick)? {
                Pick::Ids(ids) => ids,
                Pick::Filter(filter) => matching_ids(&*store, filter)?,
            };
            let mut purged = 0;
            for id in &ids {
                if store.remove_dead_letter(*id).map_err(Failure::failed)? {
                    purged += 1;
                }
            }
            println!("purged {purged} dead letter(s)");
            Ok(())
        }
    }
}

/// One line per replayed dead letter.
fn say_replayed(id: i64, r: &Replayed) {
    match r {
        Replayed::Delivered => println!("{id}: delivered"),
        Replayed::Failed(e) => println!("{id}: failed again: {} ({}, {})", e.message, e.kind, e.class()),
        Replayed::Gone => println!("{id}: skipped (no longer a dead letter)"),
        Replayed::NoDataflow(d) => println!("{id}: skipped (dataflow '{d}' is not configured)"),
    }
}

fn open(config: &Path) -> Result<std::sync::Arc<dyn Store>, Failure> {
    let cfg = Config::load(config).map_err(Failure::usage)?;
    store::open(&cfg).map_err(Failure::failed)
}

/// What `replay` and `purge` act on.
enum Pick {
    Ids(Vec<i64>),
    /// Every dead letter the filter selects (all of them with `--all` alone).
    Filter(DeadLetterFilter),
}

impl Pick {
    fn of(pick: DlqSelection) -> Result<Pick, Failure> {
        let DlqSelection { ids, all, filter } = pick;
        match (ids.is_empty(), all, filter.any()) {
            (false, true, _) => Err(Failure::usage("give dead letter ids or --all, not both")),
            (false, false, true) => Err(Failure::usage(
                "give dead letter ids or filters (--dataflow, --class, --since, --until), not both",
            )),
            (false, false, false) => Ok(Pick::Ids(ids)),
            (true, false, false) => Err(Failure::usage(
                "give dead letter ids, filters (--dataflow, --class, --since, --until), or --all",
            )),
            (true, _, _) => Ok(Pick::Filter(filter.filter(usize::MAX))),
        }
    }
}

/// The ids of every dead letter `filter` selects, read a page at a time.
fn matching_ids(store: &dyn Store, mut filter: DeadLetterFilter) -> Result<Vec<i64>, Failure> {
    let mut ids = Vec::new();
    loop {
        filter.limit = PAGE;
        let page = store.dead_letters_where(&filter).map_err(Failure::failed)?;
        let Some(last) = page.last() else { break };
        filter.after_id = Some(last.id);
        ids.extend(page.iter().map(|d| d.id));
    }
    Ok(ids)
}
