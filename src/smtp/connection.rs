//! The server side of one SMTP connection: buffered input split into bounded
//! command lines, raw access to the buffer for message data, and buffered
//! replies that are flushed when the client's pipelined input runs out
//! (RFC 2920 §3.2: the server may group replies).
//!
//! Running out of buffered bytes is a normal state, not an error: callers ask
//! for more with [`Connection::fill`], which applies the read timeout.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

use super::reply::Reply;

/// Read size for one system call.
const READ_SIZE: usize = 64 * 1024;

/// The transport under a session; STARTTLS swaps the plain stream for TLS.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(stream) => Pin::new(stream).poll_read(cx, buf),
            Stream::Tls(stream) => Pin::new(stream.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(stream) => Pin::new(stream).poll_write(cx, buf),
            Stream::Tls(stream) => Pin::new(stream.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(stream) => Pin::new(stream).poll_flush(cx),
            Stream::Tls(stream) => Pin::new(stream.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(stream) => Pin::new(stream).poll_shutdown(cx),
            Stream::Tls(stream) => Pin::new(stream.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Reason no more input can be read.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("client closed the connection")]
    Closed,
    #[error("client timed out")]
    Timeout,
    #[error("read failed: {0}")]
    Io(#[from] io::Error),
}

/// One command line taken from the input.
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    /// A line ended by CRLF, CRLF included.
    Command(Vec<u8>),
    /// Longer than the limit; the rest of it up to its LF was discarded.
    TooLong,
    /// Contained a bare CR, a bare LF (ending the line) or a NUL byte.
    Malformed,
}

pub struct Connection {
    stream: Option<Stream>,
    input: BytesMut,
    output: Vec<u8>,
    /// Set while the rest of an over-long line is being skipped.
    skipping_line: bool,
    /// Octets read since the last [`Connection::take_bytes_read`].
    bytes_read: u64,
}

impl Connection {
    pub fn new(stream: Stream) -> Connection {
        Connection {
            stream: Some(stream),
            input: BytesMut::with_capacity(READ_SIZE),
            output: Vec::with_capacity(4096),
            skipping_line: false,
            bytes_read: 0,
        }
    }

    fn stream(&mut self) -> io::Result<&mut Stream> {
        self.stream
            .as_mut()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "stream taken for TLS"))
    }

    pub fn is_tls(&self) -> bool {
        matches!(self.stream, Some(Stream::Tls(_)))
    }

    /// True when unread client input is buffered (a pipelined command).
    pub fn has_buffered_input(&self) -> bool {
        !self.input.is_empty()
    }

    /// Drops buffered input. After STARTTLS, anything the client sent before
    /// the handshake must be discarded (RFC 3207 §4.2).
    pub fn discard_buffered_input(&mut self) -> usize {
        let discarded = self.input.len();
        self.input.clear();
        discarded
    }

    /// Reads more input, waiting at most `timeout`.
    pub async fn fill(&mut self, timeout: Duration) -> Result<usize, InputError> {
        self.input.reserve(READ_SIZE);
        let Some(stream) = self.stream.as_mut() else {
            return Err(InputError::Closed);
        };
        let read = tokio::time::timeout(timeout, stream.read_buf(&mut self.input))
            .await
            .map_err(|_| InputError::Timeout)??;
        if read == 0 {
            return Err(InputError::Closed);
        }
        self.bytes_read += read as u64;
        Ok(read)
    }

    /// Returns the octets read since the last call and starts counting anew.
    pub fn take_bytes_read(&mut self) -> u64 {
        std::mem::take(&mut self.bytes_read)
    }

    /// The unread input, for the message-data readers.
    pub fn buffered(&self) -> &[u8] {
        &self.input
    }

    pub fn consume(&mut self, count: usize) {
        self.input.advance(count);
    }

    /// Takes the next command line from the buffer, or `None` when more
    /// input is needed. Bytes beyond `max_length` are never buffered.
    pub fn take_line(&mut self, max_length: usize) -> Option<Line> {
        loop {
            let newline = memchr::memchr(b'\n', &self.input);
            if self.skipping_line {
                match newline {
                    Some(end) => {
                        self.input.advance(end + 1);
                        self.skipping_line = false;
                        return Some(Line::TooLong);
                    }
                    None => {
                        self.input.clear();
                        return None;
                    }
                }
            }
            let Some(end) = newline else {
                if self.input.len() > max_length {
                    self.skipping_line = true;
                    continue;
                }
                return None;
            };
            if end + 1 > max_length {
                self.input.advance(end + 1);
                return Some(Line::TooLong);
            }
            let line = self.input.split_to(end + 1);
            let body = &line[..end];
            let well_formed = body.last() == Some(&b'\r')
                && memchr::memchr2(b'\r', 0, &body[..body.len() - 1]).is_none();
            return Some(if well_formed {
                Line::Command(line.to_vec())
            } else {
                Line::Malformed
            });
        }
    }

    /// Queues a reply; it is sent with the next flush.
    pub fn queue_reply(&mut self, reply: &Reply) {
        self.output.extend_from_slice(reply.to_wire().as_bytes());
    }

    pub async fn flush(&mut self) -> io::Result<()> {
        if self.output.is_empty() {
            return Ok(());
        }
        let output = std::mem::take(&mut self.output);
        let stream = self.stream()?;
        stream.write_all(&output).await?;
        stream.flush().await?;
        self.output = output;
        self.output.clear();
        Ok(())
    }

    /// Queues a reply and flushes at once.
    pub async fn send(&mut self, reply: &Reply) -> io::Result<()> {
        self.queue_reply(reply);
        self.flush().await
    }

    /// Takes the plain stream out for a TLS handshake.
    pub fn take_plain_stream(&mut self) -> Option<TcpStream> {
        match self.stream.take() {
            Some(Stream::Plain(stream)) => Some(stream),
            other => {
                self.stream = other;
                None
            }
        }
    }

    pub fn set_stream(&mut self, stream: Stream) {
        self.stream = Some(stream);
    }

    pub async fn shutdown(&mut self) {
        if let Some(stream) = self.stream.as_mut() {
            let _ = stream.shutdown().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn connection_with(input: &[u8]) -> Connection {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let client = TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        drop(client);
        let mut connection = Connection::new(Stream::Plain(server));
        connection.input.extend_from_slice(input);
        connection
    }

    #[tokio::test]
    async fn lines_are_split_and_checked() {
        let mut connection = connection_with(b"NOOP\r\nBAD\nNO\rOP\r\nA\0B\r\nPART").await;
        assert_eq!(
            connection.take_line(512),
            Some(Line::Command(b"NOOP\r\n".to_vec()))
        );
        assert_eq!(connection.take_line(512), Some(Line::Malformed));
        assert_eq!(connection.take_line(512), Some(Line::Malformed));
        assert_eq!(connection.take_line(512), Some(Line::Malformed));
        assert_eq!(connection.take_line(512), None);
        assert_eq!(connection.buffered(), b"PART");
    }

    #[tokio::test]
    async fn long_lines_are_skipped_to_their_end() {
        let mut input = vec![b'x'; 100];
        input.extend_from_slice(b"\r\nNOOP\r\n");
        let mut connection = connection_with(&input).await;
        assert_eq!(connection.take_line(50), Some(Line::TooLong));
        assert_eq!(
            connection.take_line(50),
            Some(Line::Command(b"NOOP\r\n".to_vec()))
        );
    }

    #[tokio::test]
    async fn long_line_without_end_is_not_buffered() {
        let mut connection = connection_with(&[b'x'; 100]).await;
        assert_eq!(connection.take_line(50), None);
        assert!(connection.buffered().is_empty());
        connection.input.extend_from_slice(b"yyy\r\nQUIT\r\n");
        assert_eq!(connection.take_line(50), Some(Line::TooLong));
        assert_eq!(
            connection.take_line(50),
            Some(Line::Command(b"QUIT\r\n".to_vec()))
        );
    }
}
