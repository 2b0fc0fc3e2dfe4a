//! The delivery tier: workers that claim routed deliveries and send them
//! over SMTP, LMTP or into a Maildir, with retries, backoff and delivery
//! status notifications.

pub mod body;
pub mod dsn;
pub mod maildir;
pub mod mx;
pub mod notify;
pub mod store;
pub mod tls;
pub mod transport;
pub mod worker;
