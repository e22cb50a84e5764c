//! The subcommands, one file each. Each takes resolved settings and returns what it did; printing
//! and exit codes are the binary's business.

pub mod demo;
pub mod errors;
pub mod repair;
pub mod run;
pub mod setup;
pub mod status;
pub mod sync_now;
pub mod verify;
