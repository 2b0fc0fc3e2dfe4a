//! `wsmtp reload` and the files it shares with `wsmtp serve`.
//!
//! `serve` writes its process id to `pid_file` once it listens. `reload`
//! checks the configuration itself first, so a broken file is reported
//! without touching the server, then sends SIGHUP to that process and
//! waits for the server's own outcome. The server writes the outcome of
//! every reload to a status file beside the pid file (its name with
//! `.reload` appended):
//!
//! ```text
//! pid 4242
//! attempt 3
//! ok rules=12 list_entries=40000 rate_limit_classes=2
//! warning: ...
//! ```
//!
//! or `failed` followed by the error. The server may fail where the check
//! passed, for example when it cannot read a file that the user running
//! `wsmtp reload` can.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::listener::reload::{ReloadError, ReloadReport};

/// How often `reload` looks at the status file while it waits.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// The pid file of a running `serve`, removed when dropped if it still
/// names this process.
pub struct PidFile {
    path: PathBuf,
}

impl PidFile {
    /// Writes this process's id to `path`. Leaves the file alone and logs
    /// a warning when it names another running `wsmtp serve`, because that
    /// process owns it (several tiers may run from one configuration).
    pub fn create(path: &Path) -> Option<PidFile> {
        let own = std::process::id();
        if let Some(pid) = read_pid(path)
            && pid != own
            && is_wsmtp_server(pid)
        {
            tracing::warn!(
                pid_file = %path.display(),
                pid,
                "the pid file names another running wsmtp serve; it is left alone, so wsmtp reload reaches that process only; give each process its own pid_file"
            );
            return None;
        }
        match write_atomically(path, &format!("{own}\n")) {
            Ok(()) => {
                tracing::debug!(pid_file = %path.display(), "pid file written");
                Some(PidFile {
                    path: path.to_path_buf(),
                })
            }
            Err(error) => {
                tracing::warn!(pid_file = %path.display(), error = %error, "cannot write the pid file; wsmtp reload cannot reach this process, but SIGHUP still reloads it");
                None
            }
        }
    }

    /// Returns the path of the status file that reloads report to.
    pub fn status_path(&self) -> PathBuf {
        status_path(&self.path)
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        if read_pid(&self.path) == Some(std::process::id()) {
            let _ = std::fs::remove_file(&self.path);
            let _ = std::fs::remove_file(status_path(&self.path));
        }
    }
}

fn status_path(pid_file: &Path) -> PathBuf {
    let mut name = pid_file.as_os_str().to_owned();
    name.push(".reload");
    PathBuf::from(name)
}

fn read_pid(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Writes through a temporary file and a rename, so a reader never sees
/// half a file.
fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    std::fs::write(&temporary, text)?;
    std::fs::rename(&temporary, path)
}

/// True when `pid` is a running `wsmtp serve`: its program name contains
/// "wsmtp" and an argument is `serve`. Without /proc (not Linux) any live
/// process counts.
fn is_wsmtp_server(pid: u32) -> bool {
    let Ok(pid_t) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 only checks that the process exists and may be
    // signalled; nothing is sent.
    if unsafe { libc::kill(pid_t, 0) } != 0 {
        return false;
    }
    match std::fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(cmdline) => {
            let mut arguments = cmdline
                .split(|byte| *byte == 0)
                .map(String::from_utf8_lossy);
            let program = arguments.next().unwrap_or_default();
            let named = Path::new(program.as_ref())
                .file_name()
                .is_some_and(|name| name.to_string_lossy().contains("wsmtp"));
            named && arguments.any(|argument| argument == "serve")
        }
        Err(_) => !Path::new("/proc/self").exists(),
    }
}

/// Writes the outcome of reload number `attempt` for `wsmtp reload`.
pub fn write_status(path: &Path, attempt: u64, result: &Result<ReloadReport, ReloadError>) {
    let mut text = format!("pid {}\nattempt {attempt}\n", std::process::id());
    match result {
        Ok(report) => {
            text.push_str(&format!(
                "ok rules={} list_entries={} rate_limit_classes={}\n",
                report.rules, report.list_entries, report.rate_limit_classes
            ));
            if !report.needs_restart.is_empty() {
                text.push_str(&format!(
                    "warning: changed settings that need a restart kept their running values: {}\n",
                    report.needs_restart.join(", ")
                ));
            }
            if !report.listener_only.is_empty() {
                text.push_str(&format!(
                    "warning: the router and delivery tiers keep their values until a restart: {}\n",
                    report.listener_only.join(", ")
                ));
            }
        }
        Err(error) => text.push_str(&format!("failed\n{error}\n")),
    }
    if let Err(error) = write_atomically(path, &text) {
        tracing::warn!(path = %path.display(), error = %error, "cannot write the reload status file");
    }
}

/// The reload outcome that the server wrote.
struct Status {
    pid: u32,
    attempt: u64,
    /// Everything after the attempt line.
    outcome: String,
}

fn read_status(path: &Path) -> Option<Status> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut lines = text.splitn(3, '\n');
    let pid = lines.next()?.strip_prefix("pid ")?.parse().ok()?;
    let attempt = lines.next()?.strip_prefix("attempt ")?.parse().ok()?;
    Some(Status {
        pid,
        attempt,
        outcome: lines.next().unwrap_or("").trim_end().to_string(),
    })
}

/// Runs `wsmtp reload`: checks the configuration at `path`, signals the
/// server and prints its outcome. Waits at most `timeout` for it.
pub fn run(path: &Path, timeout: Duration) -> ExitCode {
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("{error}");
            eprintln!("nothing was reloaded: fix the configuration first");
            return ExitCode::FAILURE;
        }
    };
    let Some(pid_file) = config.pid_file.clone() else {
        eprintln!("error: no pid_file is set");
        return ExitCode::FAILURE;
    };
    let pid = match read_pid(&pid_file) {
        Some(pid) => pid,
        None => {
            eprintln!(
                "error: cannot read a process id from {}; is wsmtp serve running with this configuration?",
                pid_file.display()
            );
            return ExitCode::FAILURE;
        }
    };
    if !is_wsmtp_server(pid) {
        eprintln!(
            "error: {} names process {pid}, which is not a running wsmtp serve; remove the stale file",
            pid_file.display()
        );
        return ExitCode::FAILURE;
    }
    let status_file = status_path(&pid_file);
    let before = read_status(&status_file)
        .filter(|status| status.pid == pid)
        .map(|status| status.attempt)
        .unwrap_or(0);

    // SAFETY: kill with a valid signal number has no memory-safety
    // preconditions; the pid was checked to be a wsmtp server just above.
    let sent = unsafe { libc::kill(pid as libc::pid_t, libc::SIGHUP) };
    if sent != 0 {
        let error = std::io::Error::last_os_error();
        eprintln!("error: cannot send SIGHUP to process {pid}: {error}");
        return ExitCode::FAILURE;
    }

    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = read_status(&status_file)
            && status.pid == pid
            && status.attempt > before
        {
            return if status.outcome.starts_with("ok") {
                println!("process {pid}: reloaded {}", path.display());
                println!("{}", status.outcome);
                ExitCode::SUCCESS
            } else {
                eprintln!("process {pid}: reload failed; the running configuration stays in force");
                eprintln!(
                    "{}",
                    status
                        .outcome
                        .strip_prefix("failed\n")
                        .unwrap_or(&status.outcome)
                );
                ExitCode::FAILURE
            };
        }
        if Instant::now() >= deadline {
            eprintln!(
                "error: sent SIGHUP to process {pid}, but it reported no outcome in {} within {} s; see its log",
                status_file.display(),
                timeout.as_secs()
            );
            return ExitCode::FAILURE;
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}
