//! A small SMTP client for talking to downstream servers.
//!
//! It sends commands and reads replies (RFC 5321 §4.2: multi-line replies
//! with `code-` continuation lines), with a timeout on every wait and bounds on
//! reply size, so a misbehaving server cannot stall or bloat a session. It
//! has no notion of transactions; the pass-through and delivery modules
//! build those. It runs over TCP or a Unix socket (LMTP), and can switch to
//! TLS after STARTTLS.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// A byte stream the client can run over.
pub trait ClientStream: AsyncRead + AsyncWrite + Unpin + Send {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> ClientStream for T {}

/// Longest reply line accepted from a server.
const MAX_REPLY_LINE: usize = 4096;
/// Maximum number of lines in one reply.
const MAX_REPLY_LINES: usize = 100;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connect to {host} failed: {source}")]
    Connect {
        host: String,
        source: std::io::Error,
    },
    #[error("connect to {host} timed out")]
    ConnectTimeout { host: String },
    #[error("no reply from {host} within {timeout:?}")]
    Timeout { host: String, timeout: Duration },
    #[error("{host} closed the connection")]
    Closed { host: String },
    #[error("I/O error with {host}: {source}")]
    Io {
        host: String,
        source: std::io::Error,
    },
    #[error("malformed reply from {host}: {detail}")]
    Protocol { host: String, detail: String },
    #[error("TLS handshake with {host} failed: {source}")]
    Tls {
        host: String,
        source: std::io::Error,
    },
}

/// A reply read from a server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerReply {
    pub code: u16,
    /// Text of each line, after the code and separator.
    pub lines: Vec<String>,
}

impl ServerReply {
    pub fn class(&self) -> u16 {
        self.code / 100
    }

    pub fn summary(&self) -> String {
        format!(
            "{} {}",
            self.code,
            self.lines.first().map(String::as_str).unwrap_or("")
        )
    }
}

/// Extensions a server announced in its EHLO reply.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Capabilities {
    pub pipelining: bool,
    /// SIZE was announced (with or without a limit).
    pub size: bool,
    pub max_size: Option<u64>,
    pub eight_bit_mime: bool,
    pub smtputf8: bool,
    pub dsn: bool,
    pub chunking: bool,
    pub starttls: bool,
    pub enhanced_status_codes: bool,
}

impl Capabilities {
    /// Reads the keywords from the lines of an EHLO reply after the first.
    pub fn from_ehlo(reply: &ServerReply) -> Capabilities {
        let mut capabilities = Capabilities::default();
        for line in reply.lines.iter().skip(1) {
            let mut words = line.split_ascii_whitespace();
            let keyword = words.next().unwrap_or("").to_ascii_uppercase();
            match keyword.as_str() {
                "PIPELINING" => capabilities.pipelining = true,
                "SIZE" => {
                    capabilities.size = true;
                    capabilities.max_size =
                        words.next().and_then(|n| n.parse().ok()).filter(|n| *n > 0);
                }
                "8BITMIME" => capabilities.eight_bit_mime = true,
                "SMTPUTF8" => capabilities.smtputf8 = true,
                "DSN" => capabilities.dsn = true,
                "CHUNKING" => capabilities.chunking = true,
                "STARTTLS" => capabilities.starttls = true,
                "ENHANCEDSTATUSCODES" => capabilities.enhanced_status_codes = true,
                _ => {}
            }
        }
        capabilities
    }
}

pub struct Client {
    host: String,
    /// None only while STARTTLS replaces the stream.
    stream: Option<Box<dyn ClientStream>>,
    input: BytesMut,
    tls: bool,
}

impl Client {
    /// Connects to `host` (a `host:port` string).
    pub async fn connect(host: &str, timeout: Duration) -> Result<Client, ClientError> {
        let connect = TcpStream::connect(host);
        Client::finish_connect(host, timeout, connect).await
    }

    /// Connects to `address`; `host` names the peer in errors and logs.
    pub async fn connect_addr(
        address: SocketAddr,
        host: &str,
        timeout: Duration,
    ) -> Result<Client, ClientError> {
        Client::finish_connect(host, timeout, TcpStream::connect(address)).await
    }

    /// Connects to a Unix socket, as LMTP servers often listen on one.
    pub async fn connect_unix(path: &Path, timeout: Duration) -> Result<Client, ClientError> {
        let host = path.display().to_string();
        let stream =
            match tokio::time::timeout(timeout, tokio::net::UnixStream::connect(path)).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(source)) => return Err(ClientError::Connect { host, source }),
                Err(_) => return Err(ClientError::ConnectTimeout { host }),
            };
        Ok(Client {
            host,
            stream: Some(Box::new(stream)),
            input: BytesMut::with_capacity(4096),
            tls: false,
        })
    }

    async fn finish_connect(
        host: &str,
        timeout: Duration,
        connect: impl std::future::Future<Output = std::io::Result<TcpStream>>,
    ) -> Result<Client, ClientError> {
        let stream = match tokio::time::timeout(timeout, connect).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(source)) => {
                return Err(ClientError::Connect {
                    host: host.to_string(),
                    source,
                });
            }
            Err(_) => {
                return Err(ClientError::ConnectTimeout {
                    host: host.to_string(),
                });
            }
        };
        let _ = stream.set_nodelay(true);
        Ok(Client {
            host: host.to_string(),
            stream: Some(Box::new(stream)),
            input: BytesMut::with_capacity(4096),
            tls: false,
        })
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    /// Whether the session runs over TLS.
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// Runs the TLS handshake after the server's 220 reply to STARTTLS.
    /// Unread input is discarded, since a server must not send anything
    /// before the handshake (RFC 3207 §4.2).
    pub async fn start_tls(
        &mut self,
        config: Arc<rustls::ClientConfig>,
        server_name: rustls_pki_types::ServerName<'static>,
        timeout: Duration,
    ) -> Result<(), ClientError> {
        self.clear_input();
        let stream = self.stream.take().ok_or_else(|| ClientError::Closed {
            host: self.host.clone(),
        })?;
        let connector = tokio_rustls::TlsConnector::from(config);
        let handshake = connector.connect(server_name, stream);
        let stream = match tokio::time::timeout(timeout, handshake).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(source)) => {
                return Err(ClientError::Tls {
                    host: self.host.clone(),
                    source,
                });
            }
            Err(_) => {
                return Err(ClientError::Timeout {
                    host: self.host.clone(),
                    timeout,
                });
            }
        };
        self.stream = Some(Box::new(stream));
        self.tls = true;
        Ok(())
    }

    fn stream(&mut self) -> Result<&mut Box<dyn ClientStream>, ClientError> {
        match self.stream.as_mut() {
            Some(stream) => Ok(stream),
            None => Err(ClientError::Closed {
                host: self.host.clone(),
            }),
        }
    }

    fn io_error(&self, source: std::io::Error) -> ClientError {
        ClientError::Io {
            host: self.host.clone(),
            source,
        }
    }

    /// Writes bytes as they are.
    pub async fn write_all(&mut self, data: &[u8]) -> Result<(), ClientError> {
        let result = self.stream()?.write_all(data).await;
        result.map_err(|e| self.io_error(e))?;
        // A TLS stream buffers what it encrypts until flushed.
        if self.tls {
            let result = self.stream()?.flush().await;
            result.map_err(|e| self.io_error(e))?;
        }
        Ok(())
    }

    /// Sends one command line; CRLF is added.
    pub async fn send_command(&mut self, command: &str) -> Result<(), ClientError> {
        let mut line = Vec::with_capacity(command.len() + 2);
        line.extend_from_slice(command.as_bytes());
        line.extend_from_slice(b"\r\n");
        self.write_all(&line).await
    }

    /// Sends a command and reads its reply.
    pub async fn command(
        &mut self,
        command: &str,
        timeout: Duration,
    ) -> Result<ServerReply, ClientError> {
        self.send_command(command).await?;
        self.read_reply(timeout).await
    }

    /// Reads one complete reply, waiting at most `timeout` in all.
    pub async fn read_reply(&mut self, timeout: Duration) -> Result<ServerReply, ClientError> {
        let host = self.host.clone();
        match tokio::time::timeout(timeout, self.read_reply_inner()).await {
            Ok(result) => result,
            Err(_) => Err(ClientError::Timeout { host, timeout }),
        }
    }

    async fn read_reply_inner(&mut self) -> Result<ServerReply, ClientError> {
        let mut code = None;
        let mut lines = Vec::new();
        loop {
            let line = self.read_line().await?;
            let protocol_error = |detail: &str| ClientError::Protocol {
                host: self.host.clone(),
                detail: format!("{detail}: {:?}", String::from_utf8_lossy(&line)),
            };
            if line.len() < 3 || !line[..3].iter().all(u8::is_ascii_digit) {
                return Err(protocol_error("reply line without a code"));
            }
            let line_code: u16 = std::str::from_utf8(&line[..3])
                .ok()
                .and_then(|digits| digits.parse().ok())
                .ok_or_else(|| protocol_error("reply line without a code"))?;
            if *code.get_or_insert(line_code) != line_code {
                return Err(protocol_error("reply lines with different codes"));
            }
            let separator = line.get(3).copied();
            let text = if line.len() > 4 { &line[4..] } else { &[][..] };
            lines.push(String::from_utf8_lossy(text).into_owned());
            match separator {
                None | Some(b' ') => {
                    return Ok(ServerReply {
                        code: line_code,
                        lines,
                    });
                }
                Some(b'-') if lines.len() < MAX_REPLY_LINES => continue,
                Some(b'-') => return Err(protocol_error("reply has too many lines")),
                Some(_) => return Err(protocol_error("invalid separator after the code")),
            }
        }
    }

    /// Reads one line without its CRLF (a bare LF is tolerated from servers).
    async fn read_line(&mut self) -> Result<Vec<u8>, ClientError> {
        loop {
            if let Some(end) = memchr::memchr(b'\n', &self.input) {
                let mut line = self.input.split_to(end + 1).to_vec();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Ok(line);
            }
            if self.input.len() > MAX_REPLY_LINE {
                return Err(ClientError::Protocol {
                    host: self.host.clone(),
                    detail: format!("reply line longer than {MAX_REPLY_LINE} octets"),
                });
            }
            self.input.reserve(4096);
            let Some(stream) = self.stream.as_mut() else {
                return Err(ClientError::Closed {
                    host: self.host.clone(),
                });
            };
            let result = stream.read_buf(&mut self.input).await;
            let read = result.map_err(|e| self.io_error(e))?;
            if read == 0 {
                return Err(ClientError::Closed {
                    host: self.host.clone(),
                });
            }
        }
    }

    /// Drops any unread input (used before reusing a connection).
    pub fn clear_input(&mut self) {
        self.input.advance(self.input.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_are_read_from_ehlo() {
        let reply = ServerReply {
            code: 250,
            lines: vec![
                "mx greets you".into(),
                "PIPELINING".into(),
                "SIZE 1000".into(),
                "8bitmime".into(),
                "DSN".into(),
            ],
        };
        let capabilities = Capabilities::from_ehlo(&reply);
        assert!(capabilities.pipelining);
        assert_eq!(capabilities.max_size, Some(1000));
        assert!(capabilities.eight_bit_mime);
        assert!(capabilities.dsn);
        assert!(!capabilities.smtputf8);
    }

    #[tokio::test]
    async fn multiline_replies_are_joined() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("address").to_string();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.expect("accept");
            socket
                .write_all(b"250-first\r\n250-second\r\n250 last\r\n")
                .await
                .expect("write");
        });
        let mut client = Client::connect(&address, Duration::from_secs(5))
            .await
            .expect("connect");
        let reply = client
            .read_reply(Duration::from_secs(5))
            .await
            .expect("reply");
        assert_eq!(reply.code, 250);
        assert_eq!(reply.lines, vec!["first", "second", "last"]);
    }
}
