//! The benchmark's result: every figure, the targets with PASS/MISS, the printed table and the JSON.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::catchup::CatchUpFigures;
use crate::copy::CopyFigures;
use crate::huge::HugeFigures;
use crate::idle::IdleFigures;
use crate::lag::{LagFigures, StreamingRss};
use crate::machine::Machine;
use crate::stats;
use crate::sweep::SweepFigures;
use crate::throughput::{Measured, ThroughputFigures};
use crate::verify::VerifyFigures;

#[derive(Debug, Clone, Serialize)]
pub(crate) struct Parameters {
    /// The rowsync binary measured, and what `rowsync --version` says.
    pub rowsync_binary: String,
    pub rowsync_version: String,
    pub rows: u64,
    pub seconds: u64,
    pub copy_repetitions: usize,
    pub throughput_rounds: usize,
    pub pgbench_clients: u32,
    pub pgbench_threads: u32,
    pub lag_seconds: u64,
    pub lag_rate_per_s: u64,
    pub sweep_samples: usize,
    pub sync_interval_minutes: u32,
    pub durable: bool,
    pub server_settings: BTreeMap<String, String>,
    pub target_only_settings: BTreeMap<String, String>,
    /// Settings given with `--rowsync-env`, on top of the benchmark's own.
    pub rowsync_env: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct Rss {
    /// Peak RSS of `rowsync setup` (the copy).
    pub copy_peak_mib: f64,
    pub streaming: StreamingRss,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct Target {
    pub name: &'static str,
    pub figure: f64,
    pub limit: f64,
    /// How the figure compares to the limit, in words.
    pub rule: &'static str,
    pub pass: bool,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct Report {
    pub machine: Machine,
    pub parameters: Parameters,
    pub initial_copy: CopyFigures,
    pub throughput: ThroughputFigures,
    pub catch_up: CatchUpFigures,
    pub huge_transaction: HugeFigures,
    pub lag: LagFigures,
    pub rss: Rss,
    pub empty_sweep: SweepFigures,
    pub verify: VerifyFigures,
    pub idle_tables: IdleFigures,
    pub targets: Vec<Target>,
    pub all_pass: bool,
    /// What rowsync wrote to stderr (LOG_LEVEL=warn: warnings and errors only).
    pub rowsync_log: Vec<String>,
    pub wall_time_s: f64,
}

/// The targets, each judged on its figure of `report` (whose own targets are not read).
pub(crate) fn targets(report: &Report) -> Vec<Target> {
    let Report {
        initial_copy: copy,
        throughput,
        catch_up,
        huge_transaction: huge,
        lag,
        rss,
        empty_sweep: sweep,
        verify,
        idle_tables: idle,
        ..
    } = report;
    let at_most = |name, figure: f64, limit: f64, rule| Target {
        name,
        figure,
        limit,
        rule,
        pass: figure <= limit,
    };
    let streaming = rss.streaming.sampled_peak_mib.max(rss.streaming.hwm_mib);
    let ahead = throughput.rowsync_ratio_to_none - throughput.native_ratio_to_none;
    vec![
        at_most(
            "initial_copy_ratio_to_raw",
            copy.rowsync_ratio_to_raw,
            1.1,
            "rowsync setup <= 1.1 x raw COPY pipe",
        ),
        Target {
            name: "source_tps_ratio_to_none",
            figure: throughput.rowsync_ratio_to_none,
            limit: 0.8,
            rule: "source TPS with rowsync >= 0.8 x without capture",
            pass: throughput.rowsync_ratio_to_none >= 0.8,
        },
        Target {
            name: "source_tps_ahead_of_native",
            figure: ahead,
            limit: 0.1,
            rule: "source TPS ratio with rowsync >= native's + 0.1 (median of the rounds' ratios)",
            pass: ahead >= 0.1,
        },
        at_most(
            "catch_up_s",
            catch_up.rowsync_s,
            catch_up.native_s,
            "rowsync catch-up <= native logical replication's",
        ),
        at_most(
            "huge_transaction_ratio_to_source",
            huge.rowsync_ratio_to_source,
            1.5,
            "one huge transaction reaches the target within 1.5 x the source's own time",
        ),
        at_most("lag_p50_ms", lag.p50_ms, 20.0, "lag p50 <= 20 ms"),
        at_most("lag_p99_ms", lag.p99_ms, 100.0, "lag p99 <= 100 ms"),
        at_most(
            "rss_streaming_mib",
            streaming,
            64.0,
            "daemon RSS while streaming <= 64 MiB",
        ),
        at_most(
            "rss_copy_mib",
            rss.copy_peak_mib,
            200.0,
            "rowsync setup RSS during the copy <= 200 MiB",
        ),
        at_most(
            "empty_sweep_ms",
            sweep.empty_median_ms,
            50.0,
            "median empty sweep <= 50 ms",
        ),
        at_most(
            "verify_ratio_to_read",
            verify.verify_ratio_to_read,
            1.5,
            "rowsync verify (0.1% of rows differ) <= 1.5 x reading both tables",
        ),
        at_most(
            "repair_ratio_to_read",
            verify.repair_ratio_to_read,
            2.0,
            "rowsync repair (0.1% of rows differ) <= 2 x reading both tables",
        ),
        at_most(
            "rss_verify_mib",
            verify.verify_peak_rss_mib.max(verify.repair_peak_rss_mib),
            64.0,
            "rowsync verify and repair RSS <= 64 MiB",
        ),
        at_most(
            "idle_tables_cpu_share",
            idle.rowsync_cpu_share,
            0.02,
            "200 idle tables: daemon CPU < 2% of one core",
        ),
        at_most(
            "idle_tables_rss_mib",
            idle.rowsync_rss_mib,
            64.0,
            "200 idle tables: daemon RSS < 64 MiB",
        ),
        at_most(
            "idle_tables_empty_sweep_ms",
            idle.empty_sweep_median_ms,
            200.0,
            "200 idle tables: an empty sweep of all < 200 ms",
        ),
        at_most(
            "idle_tables_change_ms",
            idle.change_ms.iter().copied().fold(0.0, f64::max),
            100.0,
            "200 idle tables: one change arrives within 100 ms (the lag p99 target)",
        ),
    ]
}

/// The table printed on stdout.
pub(crate) fn table(report: &Report) -> String {
    let r = report;
    let p = &r.parameters;
    let c = &r.initial_copy;
    let t = &r.throughput;
    let u = &r.catch_up;
    let h = &r.huge_transaction;
    let l = &r.lag;
    let s = &r.empty_sweep;
    let v = &r.verify;
    let i = &r.idle_tables;
    let verdict = |name: &str| r.targets.iter().find(|t| t.name == name).map(|t| t.pass);
    let list = |values: &[f64], decimals: usize| {
        values
            .iter()
            .map(|v| format!("{v:.decimals$}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let tps = |runs: &[Measured]| {
        runs.iter()
            .map(|run| format!("{:.0}", run.pgbench.tps))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let ratio = |median: f64, rounds: &[f64], of_medians: f64| {
        format!(
            "{median:.2}   [{}]; ratio of the medians {of_medians:.2}",
            list(rounds, 2)
        )
    };
    let cpu = |runs: &[Measured]| {
        format!(
            "consumer {:.2} cores, machine {:.0}% busy",
            stats::median(
                &runs
                    .iter()
                    .map(|r| r.consumer_cpu_cores)
                    .collect::<Vec<_>>()
            ),
            100.0
                * stats::median(
                    &runs
                        .iter()
                        .map(|r| r.machine_busy_share)
                        .collect::<Vec<_>>()
                )
        )
    };
    let copies = if c.repetitions > 1 {
        format!(" (median of {})", c.repetitions)
    } else {
        String::new()
    };
    let streaming = r
        .rss
        .streaming
        .sampled_peak_mib
        .max(r.rss.streaming.hwm_mib);
    let rows: Vec<(String, String, String, Option<bool>)> = vec![
        (
            format!("initial copy{copies}: raw COPY pipe"),
            format!(
                "{:.2} s   [{}]",
                c.raw_pipe_median_s,
                list(&c.raw_pipe_s, 2)
            ),
            String::new(),
            None,
        ),
        (
            "initial copy: rowsync setup".into(),
            format!(
                "{:.2} s = {:.2} x raw   [{}]",
                c.rowsync_setup_median_s,
                c.rowsync_ratio_to_raw,
                list(&c.rowsync_setup_s, 2)
            ),
            "<= 1.10 x raw".into(),
            verdict("initial_copy_ratio_to_raw"),
        ),
        (
            "  of which the copy (setup's report)".into(),
            format!("[{}] s", list(&c.rowsync_reported_copy_s, 2)),
            String::new(),
            None,
        ),
        (
            "initial copy: native logical replication".into(),
            format!(
                "{:.2} s = {:.2} x raw   [{}]",
                c.native_median_s,
                c.native_ratio_to_raw,
                list(&c.native_s, 2)
            ),
            String::new(),
            None,
        ),
        (
            format!("source TPS, no capture (median of {})", t.none.len()),
            format!("{:.0}   [{}]", t.none_median_tps, tps(&t.none)),
            String::new(),
            None,
        ),
        (
            "  CPU during the no-capture runs (median)".into(),
            cpu(&t.none),
            String::new(),
            None,
        ),
        (
            format!("source TPS, rowsync (median of {})", t.rowsync.len()),
            format!("{:.0}   [{}]", t.rowsync_median_tps, tps(&t.rowsync)),
            String::new(),
            None,
        ),
        (
            "  x none (median of the rounds' ratios)".into(),
            ratio(
                t.rowsync_ratio_to_none,
                &t.rowsync_round_ratios,
                t.rowsync_ratio_of_medians,
            ),
            ">= 0.80 x none".into(),
            verdict("source_tps_ratio_to_none"),
        ),
        (
            "  CPU during the rowsync runs (median)".into(),
            cpu(&t.rowsync),
            String::new(),
            None,
        ),
        (
            "  journal emptied after each rowsync run".into(),
            format!("[{}] s", list(&t.rowsync_drain_after_run_s, 2)),
            String::new(),
            None,
        ),
        (
            format!(
                "source TPS, native logical replication (median of {})",
                t.native.len()
            ),
            format!("{:.0}   [{}]", t.native_median_tps, tps(&t.native)),
            String::new(),
            None,
        ),
        (
            "  x none (median of the rounds' ratios)".into(),
            ratio(
                t.native_ratio_to_none,
                &t.native_round_ratios,
                t.native_ratio_of_medians,
            ),
            String::new(),
            None,
        ),
        (
            "  rowsync ahead of native by".into(),
            format!("{:.2}", t.rowsync_ratio_to_none - t.native_ratio_to_none),
            ">= 0.10".into(),
            verdict("source_tps_ahead_of_native"),
        ),
        (
            "  CPU during the native runs (median)".into(),
            cpu(&t.native),
            String::new(),
            None,
        ),
        (
            format!("catch-up of {} s of writes: rowsync", p.seconds),
            format!(
                "{:.2} s   ({} updates, {} journal rows)",
                u.rowsync_s, u.rowsync_backlog_changes, u.rowsync_journal_rows
            ),
            "<= native".into(),
            verdict("catch_up_s"),
        ),
        (
            "  its first sweep (sync_runs)".into(),
            match &u.rowsync_first_sweep {
                Some(run) => format!(
                    "{:.2} s: {} updated, {} created, {} deleted, {} re-read unchanged",
                    run.duration_s, run.updated, run.created, run.deleted, run.unchanged
                ),
                None => "not recorded".into(),
            },
            String::new(),
            None,
        ),
        (
            format!("one UPDATE of {} rows: rowsync, after the commit", h.rows),
            format!(
                "{:.2} s = {:.2} x the source's {:.2} s   (peak RSS {:.1} MiB)",
                h.rowsync_apply_s,
                h.rowsync_ratio_to_source,
                h.rowsync_source_s,
                h.rowsync_peak_rss_mib
            ),
            "<= 1.5 x".into(),
            verdict("huge_transaction_ratio_to_source"),
        ),
        (
            "  the same UPDATE: native, after the commit".into(),
            format!(
                "{:.2} s = {:.2} x the source's {:.2} s",
                h.native_apply_s, h.native_ratio_to_source, h.native_source_s
            ),
            String::new(),
            None,
        ),
        (
            "catch-up: native (confirmed_flush_lsn)".into(),
            format!(
                "{:.2} s   ({} updates, {:.1} MiB WAL)",
                u.native_s,
                u.native_backlog_changes,
                u.native_backlog_wal_bytes as f64 / 1048576.0
            ),
            String::new(),
            None,
        ),
        (
            "source TPS while the consumer is stopped".into(),
            format!(
                "rowsync capture {:.0} = {:.2} x none; native slot {:.0} = {:.2} x none",
                u.rowsync_backlog_tps,
                u.rowsync_backlog_tps / t.none_median_tps,
                u.native_backlog_tps,
                u.native_backlog_tps / t.none_median_tps
            ),
            String::new(),
            None,
        ),
        (
            "catch-up: native (last change visible in target)".into(),
            format!(
                "{:.2} s   (apply worker up after {:.2} s)",
                u.native_applied_s, u.native_worker_started_s
            ),
            String::new(),
            None,
        ),
        (
            format!(
                "lag p50 at {:.0} changes/s for {} s",
                l.achieved_rate_per_s, l.seconds
            ),
            format!("{:.1} ms", l.p50_ms),
            "<= 20 ms".into(),
            verdict("lag_p50_ms"),
        ),
        (
            "lag p99".into(),
            format!("{:.1} ms", l.p99_ms),
            "<= 100 ms".into(),
            verdict("lag_p99_ms"),
        ),
        (
            "lag max / mean".into(),
            format!(
                "{:.1} ms / {:.1} ms   ({} samples, {} superseded)",
                l.max_ms, l.mean_ms, l.samples, l.superseded
            ),
            String::new(),
            None,
        ),
        (
            "daemon RSS while streaming (peak)".into(),
            format!(
                "{streaming:.1} MiB   (sampled {:.1}, VmHWM {:.1}; catch-up VmHWM {:.1})",
                r.rss.streaming.sampled_peak_mib,
                r.rss.streaming.hwm_mib,
                r.rss.streaming.catch_up_hwm_mib
            ),
            "<= 64 MiB".into(),
            verdict("rss_streaming_mib"),
        ),
        (
            "rowsync setup RSS during the copy (peak)".into(),
            format!("{:.1} MiB", r.rss.copy_peak_mib),
            "<= 200 MiB".into(),
            verdict("rss_copy_mib"),
        ),
        (
            format!(
                "empty sweep on {} rows (median of {})",
                p.rows,
                s.empty_ms.len()
            ),
            format!(
                "{:.0} ms   (max {:.0}; [{}])",
                s.empty_median_ms,
                s.empty_max_ms,
                list(&s.empty_ms, 0)
            ),
            "<= 50 ms".into(),
            verdict("empty_sweep_ms"),
        ),
        (
            "first sweep after start (with look-back)".into(),
            format!("{:.0} ms", s.first_after_start_ms),
            String::new(),
            None,
        ),
        (
            format!(
                "reading both tables (COPY TO STDOUT, median of {})",
                v.read_s.len()
            ),
            format!("{:.2} s   [{}]", v.read_median_s, list(&v.read_s, 2)),
            String::new(),
            None,
        ),
        (
            format!(
                "verify, {} changed + {} deleted + {} added",
                v.changed, v.deleted, v.added
            ),
            format!(
                "{:.2} s = {:.2} x read   [{}]; consistent tables {:.2} s",
                v.verify_median_s,
                v.verify_ratio_to_read,
                list(&v.verify_s, 2),
                v.verify_consistent_s
            ),
            "<= 1.50 x read".into(),
            verdict("verify_ratio_to_read"),
        ),
        (
            "repair of those rows".into(),
            format!(
                "{:.2} s = {:.2} x read   [{}]; {}",
                v.repair_median_s,
                v.repair_ratio_to_read,
                list(&v.repair_s, 2),
                if v.exact {
                    "every row found and fixed"
                } else {
                    "NOT every row found and fixed: see target/bench.json"
                }
            ),
            "<= 2.00 x read".into(),
            verdict("repair_ratio_to_read"),
        ),
        (
            "verify / repair RSS (peak)".into(),
            format!(
                "{:.1} MiB / {:.1} MiB",
                v.verify_peak_rss_mib, v.repair_peak_rss_mib
            ),
            "<= 64 MiB".into(),
            verdict("rss_verify_mib"),
        ),
        (
            format!(
                "{} idle tables of {} rows: daemon CPU",
                i.tables, i.rows_per_table
            ),
            format!(
                "{:.2}% of a core   (native replication: {:.2}%; setup {:.1} s)",
                i.rowsync_cpu_share * 100.0,
                i.native_cpu_share * 100.0,
                i.setup_s
            ),
            "< 2%".into(),
            verdict("idle_tables_cpu_share"),
        ),
        (
            "  daemon RSS".into(),
            format!("{:.1} MiB", i.rowsync_rss_mib),
            "< 64 MiB".into(),
            verdict("idle_tables_rss_mib"),
        ),
        (
            "  empty sweep of all of them (median)".into(),
            format!(
                "{:.0} ms   [{}]",
                i.empty_sweep_median_ms,
                list(&i.empty_sweep_ms, 0)
            ),
            "< 200 ms".into(),
            verdict("idle_tables_empty_sweep_ms"),
        ),
        (
            "  one change to one of them arrives".into(),
            format!(
                "{:.1} ms median   [{}]",
                i.change_median_ms,
                list(&i.change_ms, 1)
            ),
            "<= 100 ms".into(),
            verdict("idle_tables_change_ms"),
        ),
    ];

    let mut out = String::new();
    let _ = writeln!(
        out,
        "rowsync-bench: {} rows, {} s per write figure, pgbench {} clients / {} threads, \
         lag at {}/s for {} s",
        p.rows, p.seconds, p.pgbench_clients, p.pgbench_threads, p.lag_rate_per_s, p.lag_seconds
    );
    let _ = writeln!(
        out,
        "machine: {} CPUs, {:.1} GiB RAM, {}; load average {:.2} at start",
        r.machine.cpus,
        r.machine.memory_total_gib,
        r.machine.cpu_model,
        r.machine.load_average_at_start
    );
    let _ = writeln!(out, "server:  {}", r.machine.postgresql);
    let _ = writeln!(out, "rowsync: {} ({})", p.rowsync_version, p.rowsync_binary);
    let _ = writeln!(
        out,
        "         durable (fsync, synchronous_commit on); {}",
        settings(&p.server_settings)
    );
    let _ = writeln!(
        out,
        "         target only: {}",
        settings(&p.target_only_settings)
    );
    if !p.rowsync_env.is_empty() {
        let _ = writeln!(
            out,
            "rowsync settings (--rowsync-env): {}",
            settings(&p.rowsync_env)
        );
    }
    let _ = writeln!(out);
    let w0 = rows.iter().map(|r| r.0.chars().count()).max().unwrap_or(0);
    let w1 = rows.iter().map(|r| r.1.chars().count()).max().unwrap_or(0);
    let w2 = rows
        .iter()
        .map(|r| r.2.chars().count())
        .max()
        .unwrap_or(0)
        .max(6);
    let _ = writeln!(
        out,
        "{:w0$}  {:w1$}  {:w2$}  result",
        "figure", "measured", "target"
    );
    let _ = writeln!(
        out,
        "{}  {}  {}  ------",
        "-".repeat(w0),
        "-".repeat(w1),
        "-".repeat(w2)
    );
    for (label, measured, target, pass) in &rows {
        let result = match pass {
            Some(true) => "PASS",
            Some(false) => "MISS",
            None => "",
        };
        let line = format!("{label:w0$}  {measured:w1$}  {target:w2$}  {result}");
        let _ = writeln!(out, "{}", line.trim_end());
    }
    let passed = r.targets.iter().filter(|t| t.pass).count();
    let _ = writeln!(
        out,
        "\n{passed} of {} targets met; wall time {:.0} s",
        r.targets.len(),
        r.wall_time_s
    );
    out
}

/// `name=value, …`
fn settings(values: &BTreeMap<String, String>) -> String {
    values
        .iter()
        .map(|(name, value)| format!("{name}={value}"))
        .collect::<Vec<_>>()
        .join(", ")
}
