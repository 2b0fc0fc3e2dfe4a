//! wsmtp: an SMTP front proxy with account-aware relay routing.
//!
//! The listener decides for each recipient whether to reject it, pass it
//! through to a downstream MTA group in real time, or spool it in a
//! PostgreSQL queue. See docs/architecture.md for the tiers and invariants.

pub mod admin;
pub mod auth;
pub mod cli;
pub mod config;
pub mod delivery;
pub mod directory;
pub mod listener;
pub mod logging;
pub mod metrics;
pub mod passthrough;
pub mod policy;
pub mod queue;
pub mod ratelimit;
pub mod router;
pub mod smtp;
