//! The `admin` section: the HTTP listener for metrics and health checks.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use super::{Checker, Text};

/// The admin HTTP listener; absent from the configuration means none.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdminConfig {
    /// The address of `/metrics`, `/healthz` and `/readyz`.
    pub address: SocketAddr,
    /// How often the queue gauges are counted in the database.
    pub queue_interval: Duration,
    /// Bound on the readiness check's database query and on each statement
    /// of the queue count.
    pub check_timeout: Duration,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdmin {
    address: Text,
    queue_interval: Option<Text>,
    check_timeout: Option<Text>,
}

pub(super) fn convert_admin(raw: Option<&RawAdmin>, checker: &mut Checker) -> Option<AdminConfig> {
    let raw = raw?;
    let address = match raw.address.value.parse::<SocketAddr>() {
        Ok(address) => address,
        Err(_) => {
            checker.problem(
                "admin.address",
                raw.address.referenced.line(),
                format!(
                    "invalid socket address {:?}; write IP:port, e.g. 127.0.0.1:9025",
                    raw.address.value
                ),
            );
            return None;
        }
    };
    let queue_interval = checker.duration(
        "admin.queue_interval",
        &raw.queue_interval,
        Duration::from_secs(15),
        Duration::from_secs(1),
        Duration::from_secs(3600),
    );
    let check_timeout = checker.duration(
        "admin.check_timeout",
        &raw.check_timeout,
        Duration::from_secs(2),
        Duration::from_millis(100),
        Duration::from_secs(60),
    );
    Some(AdminConfig {
        address,
        queue_interval,
        check_timeout,
    })
}
