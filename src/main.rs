//! The `rowsync` binary: parse the command line, load and validate configuration, set up logging,
//! run the subcommand, map the result to an exit status (0 ok, 1 failure or inconsistency, 2 bad
//! configuration or usage).

use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};

use rowsync::commands::demo::{DemoOptions, DemoOutcome};
use rowsync::commands::{demo, errors, repair, run, setup, status, sync_now, verify};
use rowsync::config::{Env, LogSettings, Settings};
use rowsync::error::{Error, report};

/// Which sync_errors rows an action is for.
#[derive(clap::Args)]
struct ErrorRows {
    /// sync_errors ids.
    #[arg(required_unless_present = "all")]
    ids: Vec<i64>,
    /// Every unresolved error (of --table, if given).
    #[arg(long, conflicts_with = "ids")]
    all: bool,
    #[arg(long, requires = "all")]
    table: Option<String>,
}

impl From<ErrorRows> for errors::Named {
    fn from(rows: ErrorRows) -> Self {
        Self {
            ids: rows.ids,
            all: rows.all,
            table: rows.table,
        }
    }
}

#[derive(Subcommand)]
enum ErrorsAction {
    /// Make the next sweep retry these errors' rows now (instead of after their backoff).
    Retry {
        #[command(flatten)]
        rows: ErrorRows,
    },
    /// Mark these errors resolved by hand; the note is recorded in their metadata.
    Resolve {
        #[command(flatten)]
        rows: ErrorRows,
        /// Why they are resolved (recorded in metadata.resolution).
        #[arg(long, required = true)]
        note: String,
    },
}

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
    /// Compare source and target and name the rows that differ; exit 0 when consistent, 1 when
    /// not.
    Verify {
        /// Check each differing row this many times in all, a second apart, before reporting it
        /// (writes in flight).
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
        attempts: u32,
        /// List this many differing keys per table.
        #[arg(long, default_value_t = 20)]
        keys: usize,
        /// Print one JSON document with every differing key instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Find the rows that differ, as verify does, and fix exactly those through the normal apply
    /// path (safe while the daemon runs); exit 0 once the tables match.
    Repair {
        /// Tables of SYNC_TABLES, as `table` or `schema.table` (all of them when none is named).
        tables: Vec<String>,
        /// Change nothing: list the differing keys and exit 1 when any differ, 0 when none do.
        #[arg(long)]
        dry_run: bool,
        /// Check each differing row this many times in all, a second apart (writes in flight).
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
        attempts: u32,
        /// List this many differing keys per table.
        #[arg(long, default_value_t = 20)]
        keys: usize,
    },
    /// Summarise what rowsync is doing: from the running daemon's /status (HEALTH_ADDR), or from
    /// the databases when no daemon answers.
    Status,
    /// Ask the running daemon for a sweep now (POST /sync on HEALTH_ADDR).
    SyncNow,
    /// List the unresolved rows of sync_errors; `retry` and `resolve` act on them.
    #[command(args_conflicts_with_subcommands = true)]
    Errors {
        #[command(subcommand)]
        action: Option<ErrorsAction>,
        /// Only errors of this table (`public.users`, or `users`).
        #[arg(long)]
        table: Option<String>,
        /// Only errors of this type (CONSTRAINT_VIOLATION, SCHEMA_MISMATCH, …).
        #[arg(long = "type")]
        error_type: Option<String>,
        /// Print a JSON array instead of the table.
        #[arg(long)]
        json: bool,
        /// List at most this many (newest first).
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(i64).range(1..))]
        limit: i64,
    },
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
            (
                Command::Verify {
                    attempts,
                    keys,
                    json,
                },
                Some(settings),
            ) => {
                let options = verify::VerifyOptions {
                    attempts,
                    keys,
                    all_keys: json,
                };
                let mut verdicts = verify::verify(&settings, options).await?;
                if json {
                    verify::report_json(&mut verdicts, &mut std::io::stdout().lock())?;
                } else {
                    print!("{}", verify::report(&verdicts));
                }
                Ok(if verdicts.iter().all(verify::TableVerdict::consistent) {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                })
            }
            (
                Command::Repair {
                    tables,
                    dry_run,
                    attempts,
                    keys,
                },
                Some(settings),
            ) => {
                let options = repair::RepairOptions {
                    dry_run,
                    attempts,
                    keys,
                };
                let done = repair::repair(&settings, &tables, options).await?;
                print!("{}", repair::report(&done, dry_run));
                Ok(if done.iter().all(|r| r.consistent(dry_run)) {
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
            (
                Command::Errors {
                    action,
                    table,
                    error_type,
                    json,
                    limit,
                },
                Some(settings),
            ) => {
                let acted = match action {
                    None => {
                        let options = errors::ListOptions {
                            table,
                            error_type,
                            limit,
                            json,
                        };
                        print!("{}", errors::list(&settings, &options).await?);
                        return Ok(ExitCode::SUCCESS);
                    }
                    Some(ErrorsAction::Retry { rows }) => {
                        let acted = errors::retry(&settings, rows.into()).await?;
                        print!("{}", acted.report("will retry"));
                        acted
                    }
                    Some(ErrorsAction::Resolve { rows, note }) => {
                        let acted = errors::resolve(&settings, rows.into(), &note).await?;
                        print!("{}", acted.report("resolved"));
                        acted
                    }
                };
                Ok(if acted.missing.is_empty() {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                })
            }
            (Command::SyncNow, Some(settings)) => {
                println!("{}", sync_now::sync_now(&settings).await?);
                Ok(ExitCode::SUCCESS)
            }
            (_, None) => unreachable!("settings are loaded for every command but demo"),
        }
    })
}
