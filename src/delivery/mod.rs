//! The delivery tier: hands routed deliveries to mailboxes and downstream servers.

pub mod maildir;
