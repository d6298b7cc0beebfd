//! `sallyport template render|sample`: what a dataflow would send, rendered from profile updates
//! or from sample profiles made for its mapping — the Destination SDK's template testing and
//! sample-profile jobs, offline (nothing is stored or sent).

use std::io::Read;
use std::path::PathBuf;

use clap::Subcommand;

use super::Failure;
use crate::config::Config;

#[derive(Debug, Subcommand)]
pub enum TemplateCommand {
    /// Print the requests a dataflow would send (its aggregation and template applied).
    Render {
        #[arg(long, short, default_value = "config/sallyport.toml")]
        config: PathBuf,
        #[arg(long)]
        dataflow: String,
        /// NDJSON profile updates (as ingest takes them), or - for standard input. Default:
        /// sample profiles made for the dataflow's mapping.
        #[arg(long)]
        profiles: Option<PathBuf>,
        /// One JSON object per request (aggregation key, profile count, body).
        #[arg(long)]
        json: bool,
    },
    /// Print sample profile updates for a dataflow's mapping (NDJSON, as ingest takes them).
    Sample {
        #[arg(long, short, default_value = "config/sallyport.toml")]
        config: PathBuf,
        #[arg(long)]
        dataflow: String,
        /// How many profiles.
        #[arg(long, default_value_t = 2)]
        count: usize,
    },
}

pub(super) fn run(cmd: TemplateCommand) -> Result<(), Failure> {
    match cmd {
        TemplateCommand::Render {
            config,
            dataflow,
            profiles,
            json,
        } => {
            let cfg = Config::load(&config).map_err(Failure::usage)?;
            let df = find(&cfg, &dataflow)?;
            let input = match profiles {
                None => None,
                Some(p) if p.as_os_str() == "-" => {
                    let mut buf = Vec::new();
                    std::io::stdin().read_to_end(&mut buf).map_err(Failure::failed)?;
                    Some(buf)
                }
                Some(p) => {
                    Some(std::fs::read(&p).map_err(|e| Failure::usage(format!("{}: {e}", p.display())))?)
                }
            };
            let requests =
                crate::export::engine::preview(&cfg, df, input.as_deref()).map_err(Failure::usage)?;
            let mut failed = 0;
            for (i, r) in requests.iter().enumerate() {
                failed += usize::from(r.error.is_some());
                if json {
                    println!("{}", serde_json::to_string(r).map_err(Failure::failed)?);
                    continue;
                }
                println!(
                    "# request {} of {}: {} profile(s), aggregation key {}, {}",
                    i + 1,
                    requests.len(),
                    r.profiles,
                    r.aggregation_key,
                    r.content_type
                );
                match (&r.body, &r.error) {
                    (Some(body), _) => println!("{body}"),
                    (None, Some(e)) => println!("(not sent: {e})"),
                    (None, None) => {}
                }
            }
            if failed > 0 {
                return Err(Failure::failed(format!("{failed} request(s) failed to render")));
            }
            Ok(())
        }
        TemplateCommand::Sample {
            config,
            dataflow,
            count,
        } => {
            let cfg = Config::load(&config).map_err(Failure::usage)?;
            let df = find(&cfg, &dataflow)?;
            for line in crate::export::template::sample_updates(df, count.clamp(1, 10_000)) {
                println!("{line}");
            }
            Ok(())
        }
    }
}

fn find<'a>(cfg: &'a Config, name: &str) -> Result<&'a crate::config::Dataflow, Failure> {
    cfg.dataflow(name).ok_or_else(|| {
        let known: Vec<&str> = cfg.dataflows.iter().map(|d| d.name.as_str()).collect();
        Failure::usage(format!(
            "no dataflow named '{name}' in the config (known: {})",
            known.join(", ")
        ))
    })
}
