//! Write load with pgbench: 16 clients each updating one random row by key, as fast as they can.

use std::time::Duration;

use serde::Serialize;

use crate::error::{Context, Error, Result};
use crate::fixture::{DATABASE, Fixture};

pub(crate) const CLIENTS: u32 = 16;
pub(crate) const THREADS: u32 = 2;

/// What one pgbench run reported.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct Run {
    /// Transactions per second, without the initial connection time.
    pub tps: f64,
    /// Transactions processed (= single-row updates).
    pub transactions: u64,
    pub failed: u64,
    pub latency_avg_ms: Option<f64>,
}

/// The script: flip a random row's status and touch `updated_at`.
fn script(table: &str, rows: u64) -> String {
    format!(
        "\\set k random(1, {rows})\n\
         UPDATE {} SET status = CASE WHEN status = 'active' THEN 'away' ELSE 'active' END, \
         updated_at = now() WHERE id = md5(:k::text)::uuid;\n",
        rowsync::catalog::ident::quote(table)
    )
}

/// Runs pgbench on `table` for `seconds` and parses its report.
pub(crate) async fn run(fx: &mut Fixture<'_>, table: &str, seconds: u64) -> Result<Run> {
    let script_path = fx.work_dir().join(format!("update-{table}.sql"));
    std::fs::write(&script_path, script(table, fx.rows))
        .with_context(|| format!("writing {}", script_path.display()))?;
    let mut command = std::process::Command::new(fx.pg_program("pgbench"));
    command
        .args(["-h", "127.0.0.1", "-U", "postgres", "-n"])
        .arg("-p")
        .arg(fx.servers.source.port().to_string())
        .arg("-c")
        .arg(CLIENTS.to_string())
        .arg("-j")
        .arg(THREADS.to_string())
        .arg("-T")
        .arg(seconds.to_string())
        .arg("-f")
        .arg(&script_path)
        .arg(DATABASE);
    let mut proc = fx.spawn(&format!("pgbench-{table}"), command)?;
    proc.wait_success(Duration::from_secs(seconds + 120))
        .await?;
    parse(&proc.stdout())
        .ok_or_else(|| Error::msg(format!("no tps in pgbench's output:\n{}", proc.stdout())))
}

fn parse(output: &str) -> Option<Run> {
    let mut tps = None;
    let mut transactions = None;
    let mut failed = 0;
    let mut latency_avg_ms = None;
    for line in output.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("tps = ") {
            if line.contains("without initial connection time") {
                tps = first_number(rest);
            }
        } else if let Some(rest) = line.strip_prefix("number of transactions actually processed:") {
            transactions = first_number(rest).map(|n| n as u64);
        } else if let Some(rest) = line.strip_prefix("number of failed transactions:") {
            failed = first_number(rest).map_or(0, |n| n as u64);
        } else if let Some(rest) = line.strip_prefix("latency average =") {
            latency_avg_ms = first_number(rest);
        }
    }
    Some(Run {
        tps: tps?,
        transactions: transactions?,
        failed,
        latency_avg_ms,
    })
}

fn first_number(text: &str) -> Option<f64> {
    text.split(|c: char| c.is_whitespace() || c == '/')
        .find(|word| !word.is_empty())?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pgbench_15_output() {
        let output = "\
transaction type: update.sql
scaling factor: 1
query mode: simple
number of clients: 16
number of threads: 2
maximum number of tries: 1
duration: 15 s
number of transactions actually processed: 91234
number of failed transactions: 0 (0.000%)
latency average = 2.630 ms
initial connection time = 12.345 ms
tps = 6082.262871 (without initial connection time)
";
        let run = parse(output).expect("parsed");
        assert_eq!(run.transactions, 91234);
        assert_eq!(run.failed, 0);
        assert!((run.tps - 6082.262871).abs() < 1e-6);
        assert_eq!(run.latency_avg_ms, Some(2.630));
    }
}
