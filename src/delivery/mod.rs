//! The delivery tier: workers that claim routed deliveries and send them
//! over SMTP, LMTP or into a Maildir, with retries, backoff and delivery
//! status notifications.

pub mod dsn;
pub mod mx;
pub mod notify;
