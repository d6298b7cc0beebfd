//! The `sallyport` command line. Each subcommand parses its flags here (declared in `args.rs`,
//! implemented in a file of its own) and calls into the library; errors become one readable
//! message and an exit code (0 ok, 1 failure, 2 usage or config error), never a panic or a
//! backtrace.

mod args;
mod audit;
mod cert;
mod cert_fetch;
mod config_check;
mod dataflow;
mod dlq;
mod ingest;
mod pki;
mod send;
mod status;
mod target;
mod template;
mod verify;

use std::process::ExitCode;

use crate::config::Config;

pub use args::{
    AuditCommand, CertCommand, CertFetchArgs, Cli, Command, ConfigArg, ConfigCommand, DemoArgs, DlqCommand,
    DlqFilterArgs, DlqSelection, IngestArgs, PkiCommand, TargetArgs, VerifyArgs,
};

/// Exit code for usage and configuration errors.
pub const EXIT_USAGE: u8 = 2;

/// Run a parsed command line on the runtime its command needs: `sidecar` on as many threads
/// as `[sidecar] threads` says (one by default: a current-thread runtime), everything else
/// on tokio's default multi-thread runtime.
pub fn main(cli: Cli) -> ExitCode {
    let code = match cli.command {
        Command::Sidecar(a) => match Config::load(&a.config) {
            Ok(cfg) => {
                let threads = cfg.sidecar.as_ref().map_or(1, |s| s.threads);
                on_runtime(threads, async move {
                    exit(crate::sidecar::run(cfg).await.map_err(Failure::failed))
                })
            }
            Err(e) => exit(Err(Failure::usage(e))),
        },
        command => on_runtime(0, run(Cli { command })),
    };
    // The runtime is gone, and with it every sender of a sidecar's audit queue (`sidecar`, or
    // `serve` with a `[sidecar]`): let the writers write what is left before the process ends.
    crate::audit::writer::finish(std::time::Duration::from_secs(10));
    code
}

/// Threads for blocking work (store calls, file reads) per process.
const BLOCKING_THREADS: usize = 16;

/// Run `work` to completion on a runtime with `threads` workers: 1 is a current-thread
/// runtime, 0 tokio's default (one worker per core).
fn on_runtime(threads: usize, work: impl std::future::Future<Output = ExitCode>) -> ExitCode {
    let mut b = match threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    // Store calls run on blocking threads; each thread's allocator heap keeps memory it freed
    // for reuse, so a pool of hundreds of short-lived threads held far more memory than the
    // work needs (bench/RESULTS.md, "Memory"). The store serialises writes anyway.
    b.max_blocking_threads(BLOCKING_THREADS);
    if threads > 1 {
        b.worker_threads(threads);
    }
    match b.enable_all().build() {
        Ok(rt) => rt.block_on(work),
        Err(e) => exit(Err(Failure::failed(format!("could not start the runtime: {e}")))),
    }
}

/// Run a parsed command line (`sidecar` included, on the caller's runtime).
pub async fn run(cli: Cli) -> ExitCode {
    let result = match cli.command {
        Command::Serve(a) => match Config::load(&a.config) {
            Ok(cfg) => crate::serve::run(cfg).await.map_err(Failure::failed),
            Err(e) => Err(Failure::usage(e)),
        },
        Command::Sidecar(a) => match Config::load(&a.config) {
            Ok(cfg) => crate::sidecar::run(cfg).await.map_err(Failure::failed),
            Err(e) => Err(Failure::usage(e)),
        },
        Command::Cert(CertCommand::Fetch(args)) => cert_fetch::run(args).await,
        Command::Cert(CertCommand::Show { file, json }) => cert::show(&file, json),
        Command::Verify(args) => return verify::run(args).await,
        Command::Audit(cmd) => audit::run(cmd),
        Command::Dlq(cmd) => dlq::run(cmd).await,
        Command::Dataflow(cmd) => dataflow::run(cmd).await,
        Command::Template(cmd) => template::run(cmd),
        Command::Ingest(args) => ingest::run(args).await,
        Command::Status(args) => status::run(args).await,
        Command::Send(args) => return send::run(args).await,
        Command::Config(ConfigCommand::Check(a)) => config_check::run(&a.config),
        Command::Pki(PkiCommand::Init {
            dir,
            cn,
            dns,
            uri,
            days,
            force,
        }) => pki::init(dir, cn, dns, uri, days, force),
        Command::Pki(PkiCommand::Csr {
            config,
            identity,
            cn,
            san,
            out,
        }) => pki::csr(&config, &identity, &cn, &san, out.as_deref()),
        Command::Pki(PkiCommand::Install {
            config,
            identity,
            signed,
            as_next,
        }) => pki::install(&config, &identity, &signed, as_next),
        Command::Pki(PkiCommand::Import {
            p12,
            password_env,
            out_cert,
            out_key,
            config,
            identity,
        }) => pki::import(pki::Import {
            p12,
            password_env,
            out: out_cert.zip(out_key),
            config: config.zip(identity),
        }),
        Command::Demo(args) => return crate::demo::run(args.profiles).await,
    };
    exit(result)
}

/// The exit code of a command's result; a failure is said on stderr first.
fn exit(result: Result<(), Failure>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure { code, message }) => {
            eprintln!("sallyport: {message}");
            ExitCode::from(code)
        }
    }
}

/// A command's failure: what to print and the exit code.
#[derive(Debug)]
pub struct Failure {
    pub code: u8,
    pub message: String,
}

impl Failure {
    pub fn usage(message: impl std::fmt::Display) -> Self {
        Failure {
            code: EXIT_USAGE,
            message: message.to_string(),
        }
    }
    pub fn failed(message: impl std::fmt::Display) -> Self {
        Failure {
            code: 1,
            message: message.to_string(),
        }
    }
}

impl From<String> for Failure {
    fn from(message: String) -> Self {
        Failure::failed(message)
    }
}
