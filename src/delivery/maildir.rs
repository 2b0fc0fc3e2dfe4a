//! Delivery of one message into a Maildir mailbox.
//!
//! [`MaildirWriter`] follows the Maildir rules: the message is written to
//! `tmp/` under a unique name, synced to disk, and renamed into `new/`, whose
//! directory entry is synced too. Only then is the delivery reported done. The
//! unique name is `<seconds>.M<microseconds>P<pid>Q<counter>R<random>.<host>`,
//! and the name in `new/` adds `,S=<size>`, the file size in octets, which
//! Dovecot takes as the message size instead of calling stat.
//!
//! The file contains `Return-Path: <sender>`, the header prefix the router
//! planned (such as Delivered-To), and the stored message. Lines keep the CRLF
//! endings they have in the queue. Many IMAP servers accept both CRLF and LF
//! endings, but a tool that expects LF reads a CR at the end of each line.
//!
//! The body is written in the pieces the caller passes, so a large message
//! streams from the queue without being held whole. File I/O runs on tokio's
//! blocking threads, and small pieces are collected into one write.

use std::collections::hash_map::RandomState;
use std::fs::{DirBuilder, File, OpenOptions};
use std::hash::{BuildHasher, Hasher};
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Buffered content is written to the file once it reaches this size.
const WRITE_THRESHOLD: usize = 64 * 1024;

/// Attempts at a fresh unique name when a name is already taken in `tmp/`.
const NAME_ATTEMPTS: usize = 5;

/// Mode of the directories created for a Maildir.
const DIRECTORY_MODE: u32 = 0o700;

/// Mode of message files.
const FILE_MODE: u32 = 0o600;

/// Deliveries started by this process, for the `Q` part of unique names.
static DELIVERY_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Failure of a Maildir delivery.
#[derive(Debug, thiserror::Error)]
pub enum MaildirError {
    /// The configured mailbox path cannot be used as it is written.
    #[error("invalid maildir path {}: {reason}", path.display())]
    InvalidPath { path: PathBuf, reason: &'static str },

    /// The sender cannot be written into a Return-Path header field.
    #[error("cannot deliver to {}: sender {sender:?} contains a line break", path.display())]
    InvalidSender { path: PathBuf, sender: String },

    /// A file system operation failed.
    #[error("{operation} {} failed: {source}", path.display())]
    Io {
        operation: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl MaildirError {
    /// Returns whether retrying cannot help. Invalid paths and senders are
    /// permanent.
    /// Every I/O error is temporary, whether missing permission, a full disk
    /// (ENOSPC), an exceeded quota (EDQUOT) or a device error (EIO), so the
    /// message stays queued until an operator fixes the mailbox or the queue
    /// lifetime ends.
    pub fn is_permanent(&self) -> bool {
        match self {
            MaildirError::InvalidPath { .. } | MaildirError::InvalidSender { .. } => true,
            MaildirError::Io { .. } => false,
        }
    }

    /// Returns the OS error number of an I/O failure.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            MaildirError::Io { source, .. } => source.raw_os_error(),
            MaildirError::InvalidPath { .. } | MaildirError::InvalidSender { .. } => None,
        }
    }

    fn io(operation: &'static str, path: &Path, source: io::Error) -> MaildirError {
        MaildirError::Io {
            operation,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// One message being written into a Maildir. Call [`MaildirWriter::commit`]
/// to deliver it or [`MaildirWriter::abort`] to discard it. Dropping the
/// writer without either removes the file from `tmp/` as well.
pub struct MaildirWriter {
    maildir: PathBuf,
    /// The unique name, without the size.
    unique_name: String,
    tmp_path: PathBuf,
    /// `None` while a blocking write owns the file, and after a failed write.
    file: Option<File>,
    /// Content not yet written to the file.
    buffer: Vec<u8>,
    /// Octets passed in so far, the buffer included.
    size: u64,
    /// Set once the tmp file is renamed or removed, so `Drop` leaves it alone.
    finished: bool,
}

impl MaildirWriter {
    /// Creates the message file in `maildir/tmp/` and buffers the
    /// `Return-Path` line for `sender` ("" for the null reverse-path) and the
    /// `header_prefix`. The maildir and its `tmp`, `new` and `cur`
    /// directories are created (mode 0700) when missing.
    ///
    /// `hostname` ends the unique file name, with `/` written as `\057` and
    /// `:` as `\072`, as the Maildir convention has it.
    ///
    /// # Errors
    ///
    /// [`MaildirError::InvalidPath`] for a relative path or one with a `..`
    /// component, [`MaildirError::InvalidSender`] for a sender with CR or LF,
    /// and [`MaildirError::Io`] when a directory or the file cannot be created.
    pub async fn create(
        maildir: &Path,
        hostname: &str,
        sender: &str,
        header_prefix: &[u8],
    ) -> Result<MaildirWriter, MaildirError> {
        check_path(maildir)?;
        if sender.contains(['\r', '\n']) {
            return Err(MaildirError::InvalidSender {
                path: maildir.to_path_buf(),
                sender: sender.to_string(),
            });
        }

        let host = encode_hostname(hostname);
        let owned_maildir = maildir.to_path_buf();
        let (unique_name, tmp_path, file) = run_blocking(maildir, move || {
            create_directories(&owned_maildir)?;
            create_tmp_file(&owned_maildir, &host)
        })
        .await?;

        let mut buffer = Vec::with_capacity(WRITE_THRESHOLD);
        buffer.extend_from_slice(format!("Return-Path: <{sender}>\r\n").as_bytes());
        buffer.extend_from_slice(header_prefix);
        tracing::debug!(maildir = %maildir.display(), file = %unique_name, "maildir file created");
        Ok(MaildirWriter {
            maildir: maildir.to_path_buf(),
            unique_name,
            tmp_path,
            file: Some(file),
            size: buffer.len() as u64,
            buffer,
            finished: false,
        })
    }

    /// Appends message content.
    ///
    /// # Errors
    ///
    /// [`MaildirError::Io`] when the file cannot be written. The writer is
    /// unusable afterwards: later writes and `commit` fail too.
    pub async fn write(&mut self, data: &[u8]) -> Result<(), MaildirError> {
        self.buffer.extend_from_slice(data);
        self.size += data.len() as u64;
        if self.buffer.len() >= WRITE_THRESHOLD {
            self.write_buffer().await?;
        }
        Ok(())
    }

    /// Octets written so far, the Return-Path line and the prefix included.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Writes the rest of the content, syncs the file, renames it into
    /// `new/` and syncs `new/`. Returns the path of the delivered file.
    ///
    /// # Errors
    ///
    /// [`MaildirError::Io`] when a step fails. The file is then removed from
    /// `tmp/`, and from `new/` if only the final sync of `new/` failed, so a
    /// retry does not deliver the message twice.
    pub async fn commit(mut self) -> Result<PathBuf, MaildirError> {
        self.write_buffer().await?;
        let file = self.take_file()?;
        let tmp_path = self.tmp_path.clone();
        let new_dir = self.maildir.join("new");
        let new_path = new_dir.join(format!("{},S={}", self.unique_name, self.size));

        let target = new_path.clone();
        let result = run_blocking(&self.tmp_path, move || {
            file.sync_all()
                .map_err(|e| MaildirError::io("sync", &tmp_path, e))?;
            drop(file);
            std::fs::rename(&tmp_path, &target)
                .map_err(|e| MaildirError::io("rename into new/", &tmp_path, e))?;
            if let Err(error) = sync_directory(&new_dir) {
                // The file is visible but may not survive a crash. The
                // message stays queued, so this copy must go.
                if let Err(remove_error) = std::fs::remove_file(&target)
                    && remove_error.kind() != io::ErrorKind::NotFound
                {
                    tracing::error!(file = %target.display(), error = %remove_error, "removing the message after the sync of new/ failed did not work; it may be delivered twice");
                }
                return Err(error);
            }
            Ok(())
        })
        .await;

        match result {
            Ok(()) => {
                self.finished = true;
                tracing::debug!(file = %new_path.display(), size = self.size, "maildir delivery committed");
                Ok(new_path)
            }
            // Drop removes the tmp file if the rename did not happen.
            Err(error) => Err(error),
        }
    }

    /// Discards the message and removes its file from `tmp/`.
    pub async fn abort(mut self) {
        self.file = None;
        self.finished = true;
        let path = self.tmp_path.clone();
        let removal = tokio::task::spawn_blocking(move || remove_tmp_file(&path)).await;
        if let Err(error) = removal {
            tracing::warn!(file = %self.tmp_path.display(), error = %error, "removing an aborted maildir file failed");
        }
    }

    fn take_file(&mut self) -> Result<File, MaildirError> {
        self.file.take().ok_or_else(|| {
            MaildirError::io(
                "write",
                &self.tmp_path,
                io::Error::other("an earlier write to this file failed"),
            )
        })
    }

    /// Writes the buffered content to the file on a blocking thread.
    async fn write_buffer(&mut self) -> Result<(), MaildirError> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let mut file = self.take_file()?;
        let mut buffer = std::mem::take(&mut self.buffer);
        let path = self.tmp_path.clone();
        let (file, buffer) = run_blocking(&self.tmp_path, move || {
            file.write_all(&buffer)
                .map_err(|e| MaildirError::io("write", &path, e))?;
            buffer.clear();
            Ok((file, buffer))
        })
        .await?;
        self.file = Some(file);
        // The emptied buffer keeps its capacity for the next pieces.
        self.buffer = buffer;
        Ok(())
    }
}

impl Drop for MaildirWriter {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        self.file = None;
        let path = self.tmp_path.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn_blocking(move || remove_tmp_file(&path));
            }
            Err(_) => remove_tmp_file(&path),
        }
    }
}

/// Removes a file from `tmp/`, logging a failure other than a missing file.
fn remove_tmp_file(path: &Path) {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
        Err(error) => {
            tracing::warn!(file = %path.display(), error = %error, "removing an unfinished maildir file failed");
        }
    }
}

/// Runs file system work on a blocking thread.
async fn run_blocking<T, F>(path: &Path, work: F) -> Result<T, MaildirError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, MaildirError> + Send + 'static,
{
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => result,
        Err(join_error) => Err(MaildirError::io(
            "run file operation on",
            path,
            io::Error::other(join_error.to_string()),
        )),
    }
}

/// Rejects a path that is relative, has a `..` component or contains NUL.
fn check_path(maildir: &Path) -> Result<(), MaildirError> {
    let invalid = |reason| MaildirError::InvalidPath {
        path: maildir.to_path_buf(),
        reason,
    };
    if !maildir.is_absolute() {
        return Err(invalid("the path is not absolute"));
    }
    if maildir.components().any(|c| c == Component::ParentDir) {
        return Err(invalid("the path has a .. component"));
    }
    if maildir.as_os_str().as_bytes().contains(&0) {
        return Err(invalid("the path contains a NUL byte"));
    }
    Ok(())
}

/// Creates the maildir and its `tmp`, `new` and `cur` directories where
/// missing, and syncs the parent of each directory it created.
fn create_directories(maildir: &Path) -> Result<(), MaildirError> {
    let mut builder = DirBuilder::new();
    builder.recursive(true).mode(DIRECTORY_MODE);
    let maildir_exists = maildir.is_dir();
    for sub in ["tmp", "new", "cur"] {
        let path = maildir.join(sub);
        if path.is_dir() {
            continue;
        }
        builder
            .create(&path)
            .map_err(|e| MaildirError::io("create directory", &path, e))?;
        sync_directory(maildir)?;
    }
    if !maildir_exists && let Some(parent) = maildir.parent() {
        sync_directory(parent)?;
    }
    Ok(())
}

/// Creates a file with a new unique name in `tmp/`. Returns the name, the
/// path and the open file.
fn create_tmp_file(maildir: &Path, host: &str) -> Result<(String, PathBuf, File), MaildirError> {
    let mut options = OpenOptions::new();
    options.write(true).create_new(true).mode(FILE_MODE);
    let mut attempt = 0;
    loop {
        attempt += 1;
        let name = unique_name(host);
        let path = maildir.join("tmp").join(&name);
        match options.open(&path) {
            Ok(file) => return Ok((name, path, file)),
            Err(error)
                if error.kind() == io::ErrorKind::AlreadyExists && attempt < NAME_ATTEMPTS =>
            {
                tracing::debug!(file = %path.display(), "maildir file name already taken, trying another");
            }
            Err(error) => return Err(MaildirError::io("create file", &path, error)),
        }
    }
}

/// Builds `<seconds>.M<microseconds>P<pid>Q<counter>R<random>.<host>`.
fn unique_name(host: &str) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let counter = DELIVERY_COUNTER.fetch_add(1, Ordering::Relaxed) + 1;
    format!(
        "{}.M{}P{}Q{}R{:016x}.{}",
        now.as_secs(),
        now.subsec_micros(),
        std::process::id(),
        counter,
        random_u64(),
        host
    )
}

/// Returns a random number from the standard library's randomly keyed
/// SipHash, so no random number crate is needed. Uniqueness rests on the
/// time, process id and counter, and this part guards against a clock that
/// was set back.
fn random_u64() -> u64 {
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u64(DELIVERY_COUNTER.load(Ordering::Relaxed));
    hasher.finish()
}

/// Writes `/` as `\057` and `:` as `\072`, so the host name can be part of a
/// file name and the `:` before Maildir flags stays unambiguous.
fn encode_hostname(hostname: &str) -> String {
    hostname.replace('/', "\\057").replace(':', "\\072")
}

fn sync_directory(path: &Path) -> Result<(), MaildirError> {
    File::open(path)
        .and_then(|directory| directory.sync_all())
        .map_err(|e| MaildirError::io("sync directory", path, e))
}

#[cfg(test)]
mod tests;
