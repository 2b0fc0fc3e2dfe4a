//! Downstream SMTP server for integration tests.
//!
//! `Sink` listens on a loopback port and plays the server that wsmtp relays
//! mail to. It records every command line and, for each transaction that got
//! a 2xx final reply, the envelope and the message bytes exactly as they came
//! off the socket, so tests can compare what wsmtp forwarded byte for byte.
//! Tests can override single replies (MAIL, RCPT per address, DATA, the final
//! reply) and make the sink close the connection at a chosen step.
//!
//! `Sink::start_lmtp` starts it as an LMTP server (RFC 2033) instead. It
//! greets LHLO and rejects EHLO and HELO with 500. After the message it sends
//! one reply per accepted recipient, in RCPT order, and
//! `set_lmtp_data_reply` sets the reply for one recipient.
//!
//! Interface: `Sink::start`, `Sink::start_lmtp`, the `set_*` methods,
//! `messages`, `commands`, `wait_for_messages` and `stop`. `Sink` is a cheap
//! clone of a shared handle.
//!
//! Trust: the peer is code under test, so the sink parses by hand, keeps raw
//! bytes, and replies to protocol errors with the RFC 5321 reply code instead
//! of panicking. Message data is kept in memory without a size limit.
//!
//! Errors: I/O errors end the connection and go to stderr, which the test
//! harness shows only for failing tests. Setup failures (bind) panic.
//!
//! Known gaps: no STARTTLS, AUTH, VRFY or EXPN, and no SIZE enforcement.
//! `stop` leaves open connections running; `close_connections` ends them.

// Each test binary that includes this module uses a different subset of it.
#![allow(dead_code)]

use std::collections::HashMap;
use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::Poll;
use std::time::Duration;

use bytes::BytesMut;
use memchr::memmem;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::{AbortHandle, JoinHandle};

/// Size of each socket read.
const READ_CHUNK: usize = 64 * 1024;

/// Maximum command line length. RFC 5321 §4.5.3.1.4 sets 512 octets, but the
/// sink accepts longer lines so that tests can record them. Past this limit
/// it closes the connection.
const MAX_COMMAND_LINE: usize = 64 * 1024;

const DEFAULT_CAPABILITIES: &[&str] = &[
    "PIPELINING",
    "SIZE 0",
    "8BITMIME",
    "ENHANCEDSTATUSCODES",
    "DSN",
    "SMTPUTF8",
    "CHUNKING",
];

const DEFAULT_DATA_REPLY: &str = "354 End data with <CR><LF>.<CR><LF>";

/// Step at which the sink closes the connection without replying.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropAt {
    /// Right after accept, before the 220 greeting.
    Connect,
    /// On receiving a MAIL command.
    Mail,
    /// On receiving a RCPT command.
    Rcpt,
    /// On receiving DATA, or the first BDAT of a transaction.
    Data,
    /// After the 354 (or a BDAT command line), once at least one byte of
    /// message data has arrived.
    DuringData,
    /// After the complete message (final dot or last BDAT chunk), before the
    /// final reply.
    AfterData,
}

/// One transaction that the sink accepted with a 2xx final reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SinkMessage {
    /// Argument of the last EHLO or HELO on the connection.
    pub helo: String,
    /// Everything after "MAIL FROM:" on the command line, e.g.
    /// `<a@b> BODY=8BITMIME RET=HDRS`, untrimmed.
    pub mail_from: String,
    /// Everything after "RCPT TO:" for each accepted recipient, in order.
    /// In LMTP mode, only the recipients whose reply after the message was
    /// 2xx.
    pub rcpt_to: Vec<String>,
    /// For DATA, the bytes after the 354 up to but excluding the terminating
    /// ".\r\n", so dot-stuffing is still present and the data ends with the
    /// CRLF of its last line (or is empty). For BDAT, the chunks concatenated.
    pub raw_data: Vec<u8>,
    /// Whether the message came in BDAT chunks (RFC 3030) instead of DATA.
    pub via_bdat: bool,
    /// Connection number, 1-based in accept order.
    pub connection: usize,
}

/// The protocol a sink speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Protocol {
    Smtp,
    /// RFC 2033: LHLO instead of EHLO, and one reply per recipient after
    /// the message.
    Lmtp,
}

impl SinkMessage {
    /// Returns the message with dot-stuffing removed: a leading "." is deleted
    /// from every line that starts with one (RFC 5321 §4.5.2). BDAT data is
    /// sent without dot-stuffing (RFC 3030), so it is returned unchanged.
    pub fn unstuffed(&self) -> Vec<u8> {
        if self.via_bdat {
            return self.raw_data.clone();
        }

        let raw = &self.raw_data;
        let mut out = Vec::with_capacity(raw.len());
        let mut line_start = 0;
        for crlf in memmem::find_iter(raw, b"\r\n") {
            let line = &raw[line_start..crlf + 2];
            out.extend_from_slice(line.strip_prefix(b".").unwrap_or(line));
            line_start = crlf + 2;
        }
        let tail = &raw[line_start..];
        out.extend_from_slice(tail.strip_prefix(b".").unwrap_or(tail));
        out
    }
}

/// Handle to a running sink server. Clones share the same server.
#[derive(Clone)]
pub struct Sink {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
}

struct Shared {
    protocol: Protocol,
    config: Mutex<Config>,
    messages: Mutex<Vec<SinkMessage>>,
    commands: Mutex<Vec<String>>,
    message_added: Notify,
    connections: AtomicUsize,
    queue_ids: AtomicU64,
    /// `None` after `stop`. The accept loop locks it only inside a poll, so
    /// `stop` can close the socket synchronously.
    listener: Mutex<Option<TcpListener>>,
    accept_task: Mutex<Option<JoinHandle<()>>>,
    connection_tasks: Mutex<Vec<AbortHandle>>,
}

#[derive(Default)]
struct Config {
    capabilities: Vec<String>,
    /// Keyed by lowercased address without angle brackets.
    rcpt_replies: HashMap<String, String>,
    mail_reply: Option<String>,
    data_reply: Option<String>,
    final_reply: Option<String>,
    /// LMTP replies after the message, keyed like `rcpt_replies`.
    lmtp_data_replies: HashMap<String, String>,
    drop_at: Option<DropRule>,
}

struct DropRule {
    at: DropAt,
    /// `None` drops every time; `Some(n)` drops the next n times.
    remaining: Option<usize>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking test thread must not hide the recorded state from others.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn default_capabilities() -> Vec<String> {
    DEFAULT_CAPABILITIES.iter().map(|c| c.to_string()).collect()
}

impl Sink {
    /// Starts a sink on 127.0.0.1 with a port chosen by the OS.
    pub async fn start() -> Sink {
        Sink::start_on(SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    /// Starts a sink on `addr`, e.g. to restart on the port of a stopped sink.
    /// Panics if the address cannot be bound.
    pub async fn start_on(addr: SocketAddr) -> Sink {
        Sink::start_with(addr, Protocol::Smtp).await
    }

    /// Starts an LMTP sink on 127.0.0.1 with a port chosen by the OS.
    pub async fn start_lmtp() -> Sink {
        Sink::start_lmtp_on(SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    /// Starts an LMTP sink on `addr`. Panics if the address cannot be bound.
    pub async fn start_lmtp_on(addr: SocketAddr) -> Sink {
        Sink::start_with(addr, Protocol::Lmtp).await
    }

    async fn start_with(addr: SocketAddr, protocol: Protocol) -> Sink {
        let listener = TcpListener::bind(addr)
            .await
            .unwrap_or_else(|e| panic!("sink: bind {addr} failed: {e}"));
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("sink: local_addr of {addr} failed: {e}"));

        let shared = Arc::new(Shared {
            protocol,
            config: Mutex::new(Config {
                capabilities: default_capabilities(),
                ..Config::default()
            }),
            messages: Mutex::new(Vec::new()),
            commands: Mutex::new(Vec::new()),
            message_added: Notify::new(),
            connections: AtomicUsize::new(0),
            queue_ids: AtomicU64::new(0),
            listener: Mutex::new(Some(listener)),
            accept_task: Mutex::new(None),
            connection_tasks: Mutex::new(Vec::new()),
        });
        let task = tokio::spawn(accept_loop(Arc::clone(&shared)));
        *lock(&shared.accept_task) = Some(task);

        Sink { addr, shared }
    }

    /// Replaces the EHLO keywords sent after the greeting line. BDAT is
    /// accepted only while "CHUNKING" is among them.
    pub fn set_capabilities(&self, caps: &[&str]) {
        lock(&self.shared.config).capabilities = caps.iter().map(|c| c.to_string()).collect();
    }

    /// Sets the reply to RCPT for `address`, compared case-insensitively and
    /// without angle brackets. A non-2xx reply leaves the recipient out of
    /// the transaction. `reply` is one or more lines separated by "\n", each
    /// already formatted (e.g. "550 5.1.1 No such user").
    pub fn set_rcpt_reply(&self, address: &str, reply: &str) {
        let key = normalize_address(address);
        lock(&self.shared.config)
            .rcpt_replies
            .insert(key, reply.to_string());
    }

    /// Sets the reply to MAIL. A non-2xx reply starts no transaction.
    pub fn set_mail_reply(&self, reply: &str) {
        lock(&self.shared.config).mail_reply = Some(reply.to_string());
    }

    /// Sets the reply to the DATA command itself. Only a 3xx reply makes the
    /// sink read message data. BDAT chunks are not affected.
    pub fn set_data_reply(&self, reply: &str) {
        lock(&self.shared.config).data_reply = Some(reply.to_string());
    }

    /// Sets the reply after the final dot or the last BDAT chunk. Only a 2xx
    /// reply records the message. In LMTP mode it is the reply for every
    /// recipient without its own `set_lmtp_data_reply`.
    pub fn set_final_reply(&self, reply: &str) {
        lock(&self.shared.config).final_reply = Some(reply.to_string());
    }

    /// In LMTP mode, sets the reply for `address` after the final dot or the
    /// last BDAT chunk, e.g. "452 4.2.2 Mailbox full". The address is
    /// compared like in `set_rcpt_reply`. The message is recorded when at
    /// least one recipient gets a 2xx reply. The SMTP mode ignores it.
    pub fn set_lmtp_data_reply(&self, address: &str, reply: &str) {
        let key = normalize_address(address);
        lock(&self.shared.config)
            .lmtp_data_replies
            .insert(key, reply.to_string());
    }

    /// Makes every connection that reaches `at` close without replying,
    /// until `clear_overrides`.
    pub fn set_drop(&self, at: DropAt) {
        lock(&self.shared.config).drop_at = Some(DropRule {
            at,
            remaining: None,
        });
    }

    /// Like `set_drop`, but only for the next time a connection reaches `at`,
    /// so a retry on a new connection succeeds.
    pub fn set_drop_once(&self, at: DropAt) {
        lock(&self.shared.config).drop_at = Some(DropRule {
            at,
            remaining: Some(1),
        });
    }

    /// Restores the default replies, capabilities and no drops. Recorded
    /// messages and commands stay.
    pub fn clear_overrides(&self) {
        *lock(&self.shared.config) = Config {
            capabilities: default_capabilities(),
            ..Config::default()
        };
    }

    /// Returns the transactions completed with a 2xx final reply, in order.
    pub fn messages(&self) -> Vec<SinkMessage> {
        lock(&self.shared.messages).clone()
    }

    /// Returns how many connections were accepted, including dropped ones.
    pub fn connection_count(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Returns every command line received, without its CRLF, in arrival
    /// order across all connections. Message data is not included.
    pub fn commands(&self) -> Vec<String> {
        lock(&self.shared.commands).clone()
    }

    /// Waits until at least `n` messages are recorded and returns all of them.
    /// Panics after `timeout` with the messages and commands seen so far.
    pub async fn wait_for_messages(&self, n: usize, timeout: Duration) -> Vec<SinkMessage> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // Register interest before checking, so a message recorded in
            // between still wakes this task.
            let notified = self.shared.message_added.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();

            let messages = self.messages();
            if messages.len() >= n {
                return messages;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                let messages = self.messages();
                if messages.len() >= n {
                    return messages;
                }
                panic!(
                    "sink {}: expected {n} message(s) within {timeout:?}, got {}\n\
                     connections: {}\ncommands: {:#?}\nmessages: {:#?}",
                    self.addr,
                    messages.len(),
                    self.connection_count(),
                    self.commands(),
                    messages,
                );
            }
        }
    }

    /// Closes the listening socket, so later connects are refused.
    /// Connections already accepted keep running.
    pub fn stop(&self) {
        // Dropping the listener closes its file descriptor right here, which
        // a spawned task could only do later.
        drop(lock(&self.shared.listener).take());
        if let Some(task) = lock(&self.shared.accept_task).take() {
            task.abort();
        }
    }

    /// Closes every open connection without replying.
    pub fn close_connections(&self) {
        for task in lock(&self.shared.connection_tasks).drain(..) {
            task.abort();
        }
    }
}

async fn accept_loop(shared: Arc<Shared>) {
    loop {
        let accepted = poll_fn(|cx| match lock(&shared.listener).as_ref() {
            Some(listener) => listener.poll_accept(cx).map(Some),
            None => Poll::Ready(None),
        })
        .await;

        match accepted {
            None => return,
            Some(Ok((stream, _peer))) => {
                let id = shared.connections.fetch_add(1, Ordering::SeqCst) + 1;
                let connection = Connection::new(stream, Arc::clone(&shared), id);
                let task = tokio::spawn(connection.run());
                let mut tasks = lock(&shared.connection_tasks);
                tasks.retain(|t| !t.is_finished());
                tasks.push(task.abort_handle());
            }
            Some(Err(e)) => {
                // Accept errors such as EMFILE are transient; back off briefly.
                eprintln!("sink: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// Lowercases an address and strips the angle brackets and any parameters.
fn normalize_address(argument: &str) -> String {
    let argument = argument.trim();
    let address = match (argument.find('<'), argument.find('>')) {
        (Some(open), Some(close)) if open < close => &argument[open + 1..close],
        _ => argument.split_whitespace().next().unwrap_or(""),
    };
    address.to_lowercase()
}

fn is_positive_completion(reply: &str) -> bool {
    reply.starts_with('2')
}

/// Returns the argument after a case-insensitive `prefix`, such as "MAIL FROM:".
fn strip_prefix_ignore_case<'a>(line: &'a str, prefix: &str) -> Option<&'a str> {
    let head = line.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &line[prefix.len()..])
}

#[derive(Default)]
struct Session {
    helo: Option<String>,
    /// Whether the client used EHLO (or LHLO in LMTP mode). BDAT is an SMTP
    /// extension, which only such a session may use.
    esmtp: bool,
    mail_from: Option<String>,
    rcpt_to: Vec<String>,
    /// Chunks received so far in a BDAT transaction.
    bdat_data: Option<Vec<u8>>,
}

impl Session {
    fn reset_transaction(&mut self) {
        self.mail_from = None;
        self.rcpt_to.clear();
        self.bdat_data = None;
    }
}

enum Flow {
    Continue,
    Close,
}

struct Connection {
    stream: TcpStream,
    /// Bytes read from the socket but not yet processed.
    input: BytesMut,
    /// Replies not yet written. They are flushed only before the sink waits
    /// for input, so a pipelined group (RFC 2920) gets its replies in one write.
    output: Vec<u8>,
    shared: Arc<Shared>,
    id: usize,
    session: Session,
}

impl Connection {
    fn new(stream: TcpStream, shared: Arc<Shared>, id: usize) -> Connection {
        Connection {
            stream,
            input: BytesMut::with_capacity(READ_CHUNK),
            output: Vec::new(),
            shared,
            id,
            session: Session::default(),
        }
    }

    async fn run(mut self) {
        if let Err(e) = self.serve().await {
            eprintln!("sink: connection {} ended with an error: {e}", self.id);
        }
    }

    async fn serve(&mut self) -> io::Result<()> {
        if self.should_drop(DropAt::Connect) {
            return Ok(());
        }
        match self.shared.protocol {
            Protocol::Smtp => self.reply("220 sink ESMTP"),
            Protocol::Lmtp => self.reply("220 sink LMTP"),
        }

        loop {
            let Some(line) = self.read_line().await? else {
                return Ok(());
            };
            match self.handle_command(&line).await? {
                Flow::Continue => {}
                Flow::Close => {
                    self.flush().await?;
                    // Send FIN and let the client read what was flushed.
                    let _ = self.stream.shutdown().await;
                    return Ok(());
                }
            }
        }
    }

    /// Reads one line ending in LF. Returns `None` at end of stream.
    async fn read_line(&mut self) -> io::Result<Option<Vec<u8>>> {
        loop {
            if let Some(lf) = memchr::memchr(b'\n', &self.input) {
                return Ok(Some(self.input.split_to(lf + 1).to_vec()));
            }
            if self.input.len() > MAX_COMMAND_LINE {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("command line longer than {MAX_COMMAND_LINE} bytes"),
                ));
            }
            if !self.fill_input().await? {
                return Ok(None);
            }
        }
    }

    /// Flushes pending replies, then reads more input. Returns false at end
    /// of stream.
    async fn fill_input(&mut self) -> io::Result<bool> {
        self.flush().await?;
        self.input.reserve(READ_CHUNK);
        let n = self.stream.read_buf(&mut self.input).await?;
        Ok(n > 0)
    }

    async fn flush(&mut self) -> io::Result<()> {
        if !self.output.is_empty() {
            self.stream.write_all(&self.output).await?;
            self.output.clear();
        }
        Ok(())
    }

    /// Queues a reply. `text` may contain several lines separated by "\n".
    fn reply(&mut self, text: &str) {
        for line in text.split('\n') {
            self.output
                .extend_from_slice(line.trim_end_matches('\r').as_bytes());
            self.output.extend_from_slice(b"\r\n");
        }
    }

    /// Returns whether a drop rule matches `at`, consuming a one-time rule.
    fn should_drop(&self, at: DropAt) -> bool {
        let mut config = lock(&self.shared.config);
        let Some(rule) = config.drop_at.as_mut() else {
            return false;
        };
        if rule.at != at {
            return false;
        }
        if let Some(remaining) = rule.remaining.as_mut() {
            *remaining -= 1;
            if *remaining == 0 {
                config.drop_at = None;
            }
        }
        true
    }

    /// Flushes earlier replies and closes the socket without a reply to the
    /// current command.
    async fn drop_connection(&mut self) -> io::Result<Flow> {
        self.flush().await?;
        let _ = self.stream.shutdown().await;
        Ok(Flow::Close)
    }

    fn config_reply(&self, select: impl FnOnce(&Config) -> Option<&String>) -> Option<String> {
        select(&lock(&self.shared.config)).cloned()
    }

    async fn handle_command(&mut self, raw_line: &[u8]) -> io::Result<Flow> {
        let (text, crlf) = match raw_line.strip_suffix(b"\r\n") {
            Some(text) => (text, true),
            None => (raw_line.strip_suffix(b"\n").unwrap_or(raw_line), false),
        };
        let line = String::from_utf8_lossy(text).into_owned();
        lock(&self.shared.commands).push(line.clone());

        // RFC 5321 §2.3.8: lines end in CRLF, and a bare LF is a client bug
        // that the tests should see.
        if !crlf {
            self.reply("500 5.5.2 Command line must end with CRLF");
            return Ok(Flow::Continue);
        }

        let (verb, argument) = match line.split_once(' ') {
            Some((verb, argument)) => (verb.to_ascii_uppercase(), argument),
            None => (line.to_ascii_uppercase(), ""),
        };

        let lmtp = self.shared.protocol == Protocol::Lmtp;
        match verb.as_str() {
            // RFC 2033 §4.1: an LMTP server must not accept EHLO or HELO.
            "EHLO" | "HELO" if lmtp => self.reply("500 5.5.1 This is an LMTP server, use LHLO"),
            "LHLO" if lmtp => self.handle_ehlo(argument),
            "EHLO" => self.handle_ehlo(argument),
            "HELO" => {
                self.session.reset_transaction();
                self.session.helo = Some(argument.to_string());
                self.session.esmtp = false;
                self.reply("250 sink");
            }
            "MAIL" => return self.handle_mail(&line).await,
            "RCPT" => return self.handle_rcpt(&line).await,
            "DATA" => return self.handle_data().await,
            "BDAT" if self.chunking_enabled() => return self.handle_bdat(argument).await,
            "RSET" => {
                self.session.reset_transaction();
                self.reply("250 2.0.0 Ok");
            }
            "NOOP" => self.reply("250 2.0.0 Ok"),
            "QUIT" => {
                self.reply("221 2.0.0 Bye");
                return Ok(Flow::Close);
            }
            _ => self.reply("500 5.5.2 Command not recognized"),
        }
        Ok(Flow::Continue)
    }

    fn chunking_enabled(&self) -> bool {
        self.session.esmtp
            && lock(&self.shared.config)
                .capabilities
                .iter()
                .any(|c| c.eq_ignore_ascii_case("CHUNKING"))
    }

    fn handle_ehlo(&mut self, argument: &str) {
        self.session.reset_transaction();
        self.session.helo = Some(argument.to_string());
        self.session.esmtp = true;

        let capabilities = lock(&self.shared.config).capabilities.clone();
        let greeting = format!("sink greets {argument}");
        let mut lines = vec![greeting];
        lines.extend(capabilities);
        let last = lines.len() - 1;
        for (i, line) in lines.iter().enumerate() {
            let separator = if i == last { ' ' } else { '-' };
            self.output
                .extend_from_slice(format!("250{separator}{line}\r\n").as_bytes());
        }
    }

    async fn handle_mail(&mut self, line: &str) -> io::Result<Flow> {
        if self.should_drop(DropAt::Mail) {
            return self.drop_connection().await;
        }
        let Some(argument) = strip_prefix_ignore_case(line, "MAIL FROM:") else {
            self.reply("501 5.5.4 Syntax: MAIL FROM:<address>");
            return Ok(Flow::Continue);
        };
        if self.session.helo.is_none() {
            match self.shared.protocol {
                Protocol::Smtp => self.reply("503 5.5.1 Send EHLO or HELO first"),
                Protocol::Lmtp => self.reply("503 5.5.1 Send LHLO first"),
            }
            return Ok(Flow::Continue);
        }
        if self.session.mail_from.is_some() {
            self.reply("503 5.5.1 Nested MAIL command");
            return Ok(Flow::Continue);
        }

        let reply = self
            .config_reply(|c| c.mail_reply.as_ref())
            .unwrap_or_else(|| "250 2.1.0 Ok".to_string());
        if is_positive_completion(&reply) {
            self.session.mail_from = Some(argument.to_string());
        }
        self.reply(&reply);
        Ok(Flow::Continue)
    }

    async fn handle_rcpt(&mut self, line: &str) -> io::Result<Flow> {
        if self.should_drop(DropAt::Rcpt) {
            return self.drop_connection().await;
        }
        let Some(argument) = strip_prefix_ignore_case(line, "RCPT TO:") else {
            self.reply("501 5.5.4 Syntax: RCPT TO:<address>");
            return Ok(Flow::Continue);
        };
        if self.session.mail_from.is_none() {
            self.reply("503 5.5.1 Need MAIL before RCPT");
            return Ok(Flow::Continue);
        }

        let address = normalize_address(argument);
        let reply = self
            .config_reply(|c| c.rcpt_replies.get(&address))
            .unwrap_or_else(|| "250 2.1.5 Ok".to_string());
        if is_positive_completion(&reply) {
            self.session.rcpt_to.push(argument.to_string());
        }
        self.reply(&reply);
        Ok(Flow::Continue)
    }

    async fn handle_data(&mut self) -> io::Result<Flow> {
        if self.should_drop(DropAt::Data) {
            return self.drop_connection().await;
        }
        if self.session.mail_from.is_none() || self.session.bdat_data.is_some() {
            self.reply("503 5.5.1 Bad sequence of commands");
            return Ok(Flow::Continue);
        }
        // RFC 5321 §3.3: DATA with no accepted recipient gets 503 or 554;
        // RFC 2033 §4.2 requires 503 from an LMTP server.
        if self.session.rcpt_to.is_empty() {
            match self.shared.protocol {
                Protocol::Smtp => self.reply("554 5.5.1 No valid recipients"),
                Protocol::Lmtp => self.reply("503 5.5.1 No valid recipients"),
            }
            return Ok(Flow::Continue);
        }

        let reply = self
            .config_reply(|c| c.data_reply.as_ref())
            .unwrap_or_else(|| DEFAULT_DATA_REPLY.to_string());
        let proceed = reply.starts_with('3');
        self.reply(&reply);
        if !proceed {
            return Ok(Flow::Continue);
        }

        if self.should_drop(DropAt::DuringData) {
            return self.drop_after_first_data_byte().await;
        }
        let Some(raw_data) = self.read_dot_terminated().await? else {
            return Ok(Flow::Close);
        };
        if self.should_drop(DropAt::AfterData) {
            return self.drop_connection().await;
        }
        self.finish_transaction(raw_data, false);
        Ok(Flow::Continue)
    }

    /// Waits until some message data is in the input buffer, then closes.
    async fn drop_after_first_data_byte(&mut self) -> io::Result<Flow> {
        if self.input.is_empty() {
            self.fill_input().await?;
        }
        self.drop_connection().await
    }

    /// Reads message data up to the line ".\r\n" (RFC 5321 §4.1.1.4). Returns
    /// the data before that line, or `None` if the stream ends first. Bytes
    /// after the terminator go back to the input buffer as commands.
    async fn read_dot_terminated(&mut self) -> io::Result<Option<Vec<u8>>> {
        let terminator = memmem::Finder::new(b"\r\n.\r\n");
        let mut data = self.input.split().to_vec();
        let mut scan_from = 0;
        loop {
            // The data begins at the start of a line, so the terminator may
            // also be the very first line (an empty message).
            if data.starts_with(b".\r\n") {
                self.input.extend_from_slice(&data[3..]);
                return Ok(Some(Vec::new()));
            }
            if let Some(offset) = terminator.find(&data[scan_from..]) {
                let crlf = scan_from + offset;
                self.input.extend_from_slice(&data[crlf + 5..]);
                data.truncate(crlf + 2);
                return Ok(Some(data));
            }
            // Rescan the last 4 bytes, since the terminator may straddle reads.
            scan_from = data.len().saturating_sub(4);

            self.flush().await?;
            data.reserve(READ_CHUNK);
            if self.stream.read_buf(&mut data).await? == 0 {
                return Ok(None);
            }
        }
    }

    /// Handles "BDAT <size> [LAST]" (RFC 3030).
    async fn handle_bdat(&mut self, argument: &str) -> io::Result<Flow> {
        let mut words = argument.split_ascii_whitespace();
        let size = words.next().and_then(|s| s.parse::<u64>().ok());
        let last = match words.next() {
            None => false,
            Some(word) if word.eq_ignore_ascii_case("LAST") => true,
            Some(_) => {
                self.reply("501 5.5.4 Syntax: BDAT <size> [LAST]");
                return Ok(Flow::Continue);
            }
        };
        let Some(size) = size.filter(|_| words.next().is_none()) else {
            // Without a valid size the chunk boundary is unknown, so the
            // stream cannot be resynchronized.
            self.reply("501 5.5.4 Syntax: BDAT <size> [LAST]");
            return Ok(Flow::Close);
        };

        let first_chunk = self.session.bdat_data.is_none();
        if first_chunk && self.should_drop(DropAt::Data) {
            return self.drop_connection().await;
        }
        if first_chunk && self.should_drop(DropAt::DuringData) {
            return self.drop_after_first_data_byte().await;
        }

        // The chunk follows the command whatever the reply, so it is read even
        // when the command fails, to keep the next command line in sync.
        let in_transaction = self.session.mail_from.is_some() && !self.session.rcpt_to.is_empty();
        let mut chunk_target = if in_transaction {
            self.session.bdat_data.take().unwrap_or_default()
        } else {
            Vec::new()
        };
        if !self.read_exact_into(size, &mut chunk_target).await? {
            return Ok(Flow::Close);
        }

        if !in_transaction {
            self.session.reset_transaction();
            self.reply("503 5.5.1 Bad sequence of commands");
            return Ok(Flow::Continue);
        }
        if !last {
            self.session.bdat_data = Some(chunk_target);
            self.reply(&format!("250 2.0.0 {size} octets received"));
            return Ok(Flow::Continue);
        }

        if self.should_drop(DropAt::AfterData) {
            return self.drop_connection().await;
        }
        self.finish_transaction(chunk_target, true);
        Ok(Flow::Continue)
    }

    /// Appends exactly `size` bytes of input to `target`. Returns false if the
    /// stream ends first.
    async fn read_exact_into(&mut self, size: u64, target: &mut Vec<u8>) -> io::Result<bool> {
        let buffered = self
            .input
            .len()
            .min(usize::try_from(size).unwrap_or(usize::MAX));
        target.extend_from_slice(&self.input.split_to(buffered));
        let mut remaining = size - buffered as u64;

        while remaining > 0 {
            self.flush().await?;
            let want = usize::try_from(remaining)
                .unwrap_or(usize::MAX)
                .min(READ_CHUNK);
            target.reserve(want);
            let n = (&mut self.stream).take(remaining).read_buf(target).await?;
            if n == 0 {
                return Ok(false);
            }
            remaining -= n as u64;
        }
        Ok(true)
    }

    /// Sends the final reply and records the message when it is 2xx.
    fn finish_transaction(&mut self, raw_data: Vec<u8>, via_bdat: bool) {
        if self.shared.protocol == Protocol::Lmtp {
            self.finish_lmtp_transaction(raw_data, via_bdat);
            return;
        }
        let reply = self
            .config_reply(|c| c.final_reply.as_ref())
            .unwrap_or_else(|| {
                let queue_id = self.shared.queue_ids.fetch_add(1, Ordering::SeqCst) + 1;
                format!("250 2.0.0 Ok: queued as {queue_id}")
            });

        if is_positive_completion(&reply) {
            let message = SinkMessage {
                helo: self.session.helo.clone().unwrap_or_default(),
                mail_from: self.session.mail_from.clone().unwrap_or_default(),
                rcpt_to: std::mem::take(&mut self.session.rcpt_to),
                raw_data,
                via_bdat,
                connection: self.id,
            };
            lock(&self.shared.messages).push(message);
            self.shared.message_added.notify_waiters();
        }
        self.session.reset_transaction();
        self.reply(&reply);
    }

    /// Sends one reply per accepted recipient, in RCPT order (RFC 2033 §4.2),
    /// and records the message with the recipients that got 2xx.
    fn finish_lmtp_transaction(&mut self, raw_data: Vec<u8>, via_bdat: bool) {
        let recipients = std::mem::take(&mut self.session.rcpt_to);
        let mut queue_id = None;
        let mut delivered = Vec::new();
        for recipient in recipients {
            let address = normalize_address(&recipient);
            let configured =
                self.config_reply(|c| c.lmtp_data_replies.get(&address).or(c.final_reply.as_ref()));
            let reply = configured.unwrap_or_else(|| {
                let id = *queue_id.get_or_insert_with(|| {
                    self.shared.queue_ids.fetch_add(1, Ordering::SeqCst) + 1
                });
                format!("250 2.0.0 <{address}> Ok: queued as {id}")
            });
            if is_positive_completion(&reply) {
                delivered.push(recipient);
            }
            self.reply(&reply);
        }

        if !delivered.is_empty() {
            let message = SinkMessage {
                helo: self.session.helo.clone().unwrap_or_default(),
                mail_from: self.session.mail_from.clone().unwrap_or_default(),
                rcpt_to: delivered,
                raw_data,
                via_bdat,
                connection: self.id,
            };
            lock(&self.shared.messages).push(message);
            self.shared.message_added.notify_waiters();
        }
        self.session.reset_transaction();
    }
}
