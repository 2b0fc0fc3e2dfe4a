//! Serde helpers for the JSON output of the queue commands: times in
//! RFC 3339 (UTC), queue ids as the 32 hex digits that `queue list` prints,
//! and digests in lowercase hex.

use std::fmt::Write as _;

use serde::Serializer;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::QueueId;

pub(crate) fn time<S: Serializer>(
    value: &OffsetDateTime,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    let text = value
        .to_offset(time::UtcOffset::UTC)
        .format(&Rfc3339)
        .map_err(serde::ser::Error::custom)?;
    serializer.serialize_str(&text)
}

pub(crate) fn optional_time<S: Serializer>(
    value: &Option<OffsetDateTime>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match value {
        Some(value) => time(value, serializer),
        None => serializer.serialize_none(),
    }
}

pub(crate) fn queue_id<S: Serializer>(value: &QueueId, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_str(&value.simple())
}

pub(crate) fn optional_hex<S: Serializer>(
    value: &Option<Vec<u8>>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match value {
        Some(bytes) => {
            let mut text = String::with_capacity(bytes.len() * 2);
            for byte in bytes {
                let _ = write!(text, "{byte:02x}");
            }
            serializer.serialize_str(&text)
        }
        None => serializer.serialize_none(),
    }
}
