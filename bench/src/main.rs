//! `rowsync-bench`: measures rowsync side by side with a raw COPY pipe and native logical
//! replication, on two throwaway durable PostgreSQL servers.
//!
//! ```sh
//! cargo build --release --workspace && target/release/rowsync-bench --rows 1000000 [--seconds 15] [--json bench.json]
//! ```
//!
//! In one run, in this order: the initial copy three ways; source write throughput with no
//! capture, rowsync and native replication (pgbench, interleaved rounds); catch-up of a backlog
//! written while the consumer was stopped; end-to-end lag under a steady 1,000 changes/s with the
//! daemon's RSS; the duration of an empty sweep; and verify and repair with 0.1% of the rows
//! made to differ, against reading both tables. It prints a table (stdout; progress goes to
//! stderr) with PASS/MISS against rowsync's targets and writes every figure as JSON. A MISS is a
//! result, not a failure: the exit status is 0 unless something went wrong.
//!
//! It runs the `rowsync` binary that sits next to its own executable, as a real operator would.
//! Every server, child process, subscription and replication slot is removed on every path,
//! errors and Ctrl-C included.

mod catchup;
mod copy;
mod cpu;
mod db;
mod error;
mod fixture;
mod huge;
mod idle;
mod lag;
mod machine;
mod native;
mod pgbench;
mod report;
mod stats;
mod subprocess;
mod sweep;
mod throughput;
mod verify;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use futures_util::FutureExt;
use tokio::signal::unix::{SignalKind, signal};

use crate::error::{Context, Error, Result};
use crate::fixture::{Fixture, Log, SERVER_SETTINGS, Servers, TARGET_ONLY_SETTINGS};
use crate::report::{Parameters, Report, Rss};

/// Measures rowsync against a raw COPY pipe and native logical replication on two throwaway
/// PostgreSQL servers: initial copy, source write throughput, catch-up, end-to-end lag, RSS and
/// empty-sweep time.
#[derive(Parser)]
#[command(name = "rowsync-bench", version)]
struct Cli {
    /// Rows in each source table.
    #[arg(long, value_parser = clap::value_parser!(u64).range(100..))]
    rows: u64,
    /// Length of each write-load run, in seconds (the lag measurement runs at least 5 s).
    #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u64).range(1..))]
    seconds: u64,
    /// Where to write every figure as JSON.
    #[arg(long, default_value = "target/bench.json")]
    json: PathBuf,
    /// A setting for every rowsync the benchmark runs, on top of its own (repeatable), e.g.
    /// `--rowsync-env YIELD_ACTIVE_SESSIONS=0` to measure rowsync without yielding.
    #[arg(long = "rowsync-env", value_name = "NAME=VALUE", value_parser = setting)]
    rowsync_env: Vec<(String, String)>,
}

fn setting(text: &str) -> std::result::Result<(String, String), String> {
    match text.split_once('=') {
        Some((name, value)) if !name.is_empty() => Ok((name.to_string(), value.to_string())),
        _ => Err(format!("expected NAME=VALUE, got {text:?}")),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match try_main(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) if err.is_interrupted() => {
            eprintln!("interrupted; servers, child processes and subscriptions are gone");
            ExitCode::from(130)
        }
        Err(err) => {
            eprintln!("{}", rowsync::error::report(&err));
            ExitCode::FAILURE
        }
    }
}

fn try_main(cli: &Cli) -> Result<()> {
    let rowsync = rowsync_binary()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let report = runtime.block_on(bench(cli, rowsync))?;
    print!("{}", report::table(&report));
    write_json(&cli.json, &report)?;
    eprintln!("figures written to {}", cli.json.display());
    Ok(())
}

/// The `rowsync` binary next to this one.
fn rowsync_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating rowsync-bench's own executable")?;
    let path = exe
        .parent()
        .map(|dir| dir.join("rowsync"))
        .ok_or_else(|| Error::msg("rowsync-bench's executable has no directory"))?;
    if !path.is_file() {
        return Err(Error::msg(format!(
            "{} not found: rowsync-bench runs the rowsync binary next to itself; \
             build both with `cargo build --release --workspace`",
            path.display()
        )));
    }
    Ok(path)
}

/// Starts the servers, measures, and cleans up whatever happened (error, SIGINT, SIGTERM).
async fn bench(cli: &Cli, rowsync: PathBuf) -> Result<Report> {
    // Installed before anything starts, so a Ctrl-C is ours to handle from here on.
    let mut interrupt = signal(SignalKind::interrupt()).context("handling SIGINT")?;
    let mut terminate = signal(SignalKind::terminate()).context("handling SIGTERM")?;
    let log = Log::new();
    let load = machine::load_average();
    if load > 0.5 {
        log.say(&format!(
            "warning: the load average is {load:.2} before anything started: other work on this \
             machine will make the figures noisy"
        ));
    }
    log.say("starting the source and target PostgreSQL servers (durable)");
    // On this thread, the one running main's future: see rowsync_sandbox.
    let servers = Servers::start()?;
    if matches!(interrupt.recv().now_or_never(), Some(Some(())))
        || matches!(terminate.recv().now_or_never(), Some(Some(())))
    {
        return Err(Error::interrupted());
    }
    let outcome = tokio::select! {
        biased;
        // recv is cancel-safe; the measurement future is dropped, and with it every child process
        // it owns (each is stopped and reaped as it drops).
        _ = interrupt.recv() => Err(Error::interrupted()),
        _ = terminate.recv() => Err(Error::interrupted()),
        result = measure(&servers, log, cli, rowsync, load) => result,
    };
    if outcome.is_err() {
        log.say("stopping: removing the subscription and any replication slot");
    }
    match tokio::time::timeout(Duration::from_secs(60), clean_up(&servers)).await {
        Ok(Ok(())) => {}
        Ok(Err(err)) if outcome.is_ok() => return Err(err),
        Ok(Err(err)) => log.say(&format!(
            "clean-up: {} (the servers are deleted anyway)",
            rowsync::error::chain(&err)
        )),
        Err(_) => log.say("clean-up timed out (the servers are deleted anyway)"),
    }
    log.say("stopping and deleting both servers");
    drop(servers);
    outcome
}

/// Removes the subscription and every slot, so nothing retains WAL; on the normal path there is
/// nothing left to remove and this only checks.
async fn clean_up(servers: &Servers) -> Result<()> {
    let source = db::connect(&servers.source_url(), "source").await?;
    let target = db::connect(&servers.target_url(), "target").await?;
    native::clean_up(&source, &target).await
}

async fn measure(
    servers: &Servers,
    log: Log,
    cli: &Cli,
    rowsync: PathBuf,
    load_average_at_start: f64,
) -> Result<Report> {
    let mut fx = Fixture::new(servers, log, cli.rows, cli.seconds, rowsync.clone()).await?;
    fx.rowsync_env.clone_from(&cli.rowsync_env);
    let machine = machine::describe(&fx.source, load_average_at_start).await?;
    log.say(&format!(
        "machine: {} CPUs, {:.1} GiB, {}; {}",
        machine.cpus, machine.memory_total_gib, machine.cpu_model, machine.postgresql
    ));
    fx.create_tables().await?;

    let initial_copy = copy::measure(&mut fx).await?;
    let throughput = throughput::measure(&mut fx).await?;
    let catch_up = catchup::measure(&mut fx).await?;
    let huge_transaction = huge::measure(&mut fx).await?;
    let (lag, streaming) = lag::measure(&mut fx).await?;
    let empty_sweep = sweep::measure(&mut fx).await?;
    fx.stop_daemon().await?;
    let verify = verify::measure(&mut fx).await?;
    let idle_tables = idle::measure(&mut fx).await?;
    let slots = native::slot_count(&fx.source).await?;
    if slots != 0 {
        return Err(Error::msg(format!(
            "{slots} replication slots are left on the source"
        )));
    }

    let rss = Rss {
        copy_peak_mib: initial_copy.rowsync_setup_peak_rss_mib,
        streaming,
    };
    let mut report = Report {
        machine,
        parameters: Parameters {
            rowsync_binary: rowsync.display().to_string(),
            rowsync_version: version(&rowsync),
            rows: cli.rows,
            seconds: cli.seconds,
            copy_repetitions: initial_copy.repetitions,
            throughput_rounds: throughput::ROUNDS,
            pgbench_clients: pgbench::CLIENTS,
            pgbench_threads: pgbench::THREADS,
            lag_seconds: lag.seconds,
            lag_rate_per_s: lag::RATE,
            sweep_samples: sweep::SAMPLES,
            sync_interval_minutes: 1,
            durable: true,
            server_settings: SERVER_SETTINGS
                .iter()
                .map(|(name, value)| (name.to_string(), value.to_string()))
                .collect(),
            target_only_settings: TARGET_ONLY_SETTINGS
                .iter()
                .map(|(name, value)| (name.to_string(), value.to_string()))
                .collect(),
            rowsync_env: cli.rowsync_env.iter().cloned().collect(),
        },
        all_pass: false,
        targets: Vec::new(),
        initial_copy,
        throughput,
        catch_up,
        huge_transaction,
        lag,
        rss,
        empty_sweep,
        verify,
        idle_tables,
        rowsync_log: std::mem::take(&mut fx.rowsync_log),
        wall_time_s: log.elapsed().as_secs_f64(),
    };
    report.targets = report::targets(&report);
    report.all_pass = report.targets.iter().all(|t| t.pass);
    Ok(report)
}

/// `rowsync --version`, for the record.
fn version(rowsync: &Path) -> String {
    std::process::Command::new(rowsync)
        .arg("--version")
        .output()
        .map(|output| String::from_utf8_lossy(&output.stdout).trim().to_string())
        .unwrap_or_else(|err| format!("unknown ({err})"))
}

fn write_json(path: &Path, report: &Report) -> Result<()> {
    if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let json = serde_json::to_string_pretty(report).context("rendering the JSON report")?;
    std::fs::write(path, json + "\n").with_context(|| format!("writing {}", path.display()))
}
