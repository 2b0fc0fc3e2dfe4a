//! A log buffer that tests give to a tracing subscriber as its writer, to
//! read the server's log lines back.
#![allow(dead_code)]

use std::io::Write;
use std::sync::{Arc, Mutex};

/// Log output collected in memory; clones share the buffer.
#[derive(Clone, Default)]
pub struct CapturedLog(Arc<Mutex<Vec<u8>>>);

impl Write for CapturedLog {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl CapturedLog {
    /// Returns the lines written so far.
    pub fn lines(&self) -> Vec<String> {
        let bytes = self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        String::from_utf8(bytes)
            .expect("UTF-8 log")
            .lines()
            .map(str::to_string)
            .collect()
    }
}
