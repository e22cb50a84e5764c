//! What the benchmark ran on: CPUs, memory, CPU model, PostgreSQL version.

use serde::Serialize;
use tokio_postgres::Client;

use crate::error::{Context, Result};

#[derive(Debug, Clone, Serialize)]
pub(crate) struct Machine {
    pub cpus: usize,
    pub memory_total_gib: f64,
    pub cpu_model: String,
    pub postgresql: String,
    /// 1-minute load average when the benchmark started: well above 0 means something else was
    /// running on the machine, and every figure is noisier for it.
    pub load_average_at_start: f64,
}

/// The 1-minute load average (/proc/loadavg).
pub(crate) fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

/// Describes the machine; `load_average_at_start` is taken by the caller before anything starts.
pub(crate) async fn describe(source: &Client, load_average_at_start: f64) -> Result<Machine> {
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let memory_kib: u64 = meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find_map(|line| {
            let (key, value) = line.split_once(':')?;
            (key.trim() == "model name").then(|| value.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let postgresql: String = source
        .query_one("SELECT version()", &[])
        .await
        .context("reading the PostgreSQL version")?
        .get(0);
    Ok(Machine {
        cpus,
        memory_total_gib: memory_kib as f64 / 1024.0 / 1024.0,
        cpu_model,
        postgresql,
        load_average_at_start,
    })
}
