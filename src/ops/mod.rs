//! What operators see and use: the figures the daemon keeps, health checks, Prometheus metrics,
//! the HTTP listener and its client, systemd notifications and the log.

pub(crate) mod dashboard;
pub(crate) mod health;
pub mod http;
pub mod logging;
pub mod metrics;
pub(crate) mod status;
pub(crate) mod systemd;
pub(crate) mod telemetry;
