//! The `rowsync` binary: parse the command line, load and validate configuration, set up logging,
//! run the subcommand, map the result to an exit status (0 ok, 1 failure or inconsistency, 2 bad
//! configuration or usage).

use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};

use rowsync::commands::demo::{DemoOptions, DemoOutcome};
use rowsync::commands::{demo, run, setup, status, sync_now, verify};
use rowsync::config::{Env, LogSettings, Settings};
use rowsync::error::{Error, report};

/// Keeps tables in one PostgreSQL database in sync with another: capture triggers on the source,
/// an initial copy, then real-time LISTEN/NOTIFY plus periodic sweeps. Configured through
/// environment variables (and a .env file); see the README.
#[derive(Parser)]
#[command(name = "rowsync", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install capture on the source and migrations on the target, then copy existing rows.
    /// Idempotent.
    Setup,
    /// Run the sync daemon until SIGTERM or SIGINT (SIGHUP re-reads the configuration).
    Run,
    /// Copy the named tables again (merging into the target, as setup does) while the daemon, if
    /// running, keeps streaming; changes made during the copy are not lost.
    Resync {
        /// Tables of SYNC_TABLES, as `table` or `schema.table`.
        #[arg(required = true)]
        tables: Vec<String>,
    },
    /// Remove capture (triggers, function, journal) from the named source tables.
    Teardown {
        /// Source tables, as `table` or `schema.table`.
        #[arg(required = true)]
        tables: Vec<String>,
    },
    /// Compare source and target; exit 0 when consistent, 1 when not.
    Verify {
        /// Re-check an inconsistent table this many times, a second apart (writes in flight).
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
        attempts: u32,
    },
    /// Summarise what rowsync is doing: from the running daemon's /status (HEALTH_ADDR), or from
    /// the databases when no daemon answers.
    Status,
    /// Ask the running daemon for a sweep now (POST /sync on HEALTH_ADDR).
    SyncNow,
    /// Try rowsync on two throwaway local PostgreSQL servers; needs no database of your own.
    Demo {
        /// How long the stream of writes runs, in seconds.
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        /// Writes per second to the backend.
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=10000))]
        rate: u32,
        /// Users in the backend before setup.
        #[arg(long, default_value_t = 1000)]
        rows: u32,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match try_main(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("{}", report(&err));
            match err {
                Error::Config(_) => ExitCode::from(2),
                _ => ExitCode::FAILURE,
            }
        }
    }
}

fn try_main(cli: Cli) -> Result<ExitCode, Error> {
    let env = Env::from_process()?;
    rowsync::failpoint::configure(env.get("FAILPOINTS")?)?;
    let mut log = LogSettings::from_env(&env)?;
    let settings = match cli.command {
        Command::Demo { .. } => {
            // The demo's own output is the show; its logs only matter when something is wrong.
            if !env.is_set("LOG_LEVEL") {
                log.level = "warn".into();
            }
            None
        }
        _ => Some(Arc::new(Settings::from_env(&env)?)),
    };
    rowsync::ops::logging::init(&log);
    for warning in settings.iter().flat_map(|s| &s.warnings) {
        tracing::warn!("{warning}");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|source| Error::Io {
            action: "starting the async runtime".into(),
            source,
        })?;
    runtime.block_on(async move {
        match (cli.command, settings) {
            (Command::Setup, Some(settings)) => {
                let tables = setup::setup(&settings).await?;
                print!("{}", setup::summary(&tables));
                Ok(ExitCode::SUCCESS)
            }
            (Command::Resync { tables }, Some(settings)) => {
                let done = setup::resync(&settings, &tables).await?;
                print!("{}", setup::summary(&done));
                Ok(ExitCode::SUCCESS)
            }
            (Command::Teardown { tables }, Some(settings)) => {
                for line in setup::teardown(&settings, &tables).await? {
                    println!("{line}");
                }
                Ok(ExitCode::SUCCESS)
            }
            (Command::Run, Some(settings)) => {
                run::run(settings).await?;
                Ok(ExitCode::SUCCESS)
            }
            (Command::Verify { attempts }, Some(settings)) => {
                let verdicts = verify::verify(&settings, attempts).await?;
                print!("{}", verify::report(&verdicts));
                Ok(if verdicts.iter().all(verify::TableVerdict::consistent) {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                })
            }
            (
                Command::Demo {
                    seconds,
                    rate,
                    rows,
                },
                _,
            ) => {
                let outcome = demo::demo(DemoOptions {
                    seconds,
                    rate,
                    initial_rows: rows,
                })
                .await?;
                Ok(match outcome {
                    DemoOutcome::Consistent => ExitCode::SUCCESS,
                    DemoOutcome::Inconsistent => ExitCode::FAILURE,
                    DemoOutcome::Interrupted => ExitCode::from(130),
                })
            }
            (Command::Status, Some(settings)) => {
                print!("{}", status::status(&settings).await?);
                Ok(ExitCode::SUCCESS)
            }
            (Command::SyncNow, Some(settings)) => {
                println!("{}", sync_now::sync_now(&settings).await?);
                Ok(ExitCode::SUCCESS)
            }
            (_, None) => unreachable!("settings are loaded for every command but demo"),
        }
    })
}
