//! The delivery tier. [`dsn`] builds delivery status notifications and
//! [`notify`] spools them.

pub mod dsn;
pub mod notify;
