//! Self-tests for the test sink in `tests/common/sink.rs`, driven by a raw
//! TCP client so that every byte on the wire is under the test's control.

mod common;

use std::time::Duration;

use common::sink::{DropAt, Sink};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(10);

/// Minimal SMTP client that writes raw bytes and reads whole replies.
struct RawClient {
    stream: BufReader<TcpStream>,
}

impl RawClient {
    async fn connect(sink: &Sink) -> RawClient {
        let stream = TcpStream::connect(sink.addr)
            .await
            .expect("connect to sink");
        RawClient {
            stream: BufReader::new(stream),
        }
    }

    /// Connects, reads the greeting and sends EHLO.
    async fn connect_ehlo(sink: &Sink) -> RawClient {
        let mut client = RawClient::connect(sink).await;
        assert_eq!(client.read_reply().await, vec!["220 sink ESMTP"]);
        client.send(b"EHLO client.test\r\n").await;
        let ehlo = client.read_reply().await;
        assert!(ehlo[0].starts_with("250-sink"), "EHLO reply: {ehlo:?}");
        client
    }

    /// Connects to an LMTP sink, reads the greeting and sends LHLO.
    async fn connect_lhlo(sink: &Sink) -> RawClient {
        let mut client = RawClient::connect(sink).await;
        assert_eq!(client.read_reply().await, vec!["220 sink LMTP"]);
        client.send(b"LHLO client.test\r\n").await;
        let lhlo = client.read_reply().await;
        assert!(lhlo[0].starts_with("250-sink"), "LHLO reply: {lhlo:?}");
        client
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.stream
            .get_mut()
            .write_all(bytes)
            .await
            .expect("write to sink");
    }

    /// Reads one possibly multi-line reply, without CRLFs. Panics on EOF.
    async fn read_reply(&mut self) -> Vec<String> {
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            let n = tokio::time::timeout(WAIT, self.stream.read_line(&mut line))
                .await
                .expect("reply timed out")
                .expect("read reply");
            assert!(n > 0, "connection closed; reply so far: {lines:?}");
            assert!(line.ends_with("\r\n"), "reply line without CRLF: {line:?}");
            let line = line.trim_end_matches("\r\n").to_string();
            let done = line.as_bytes().get(3) == Some(&b' ') || line.len() == 3;
            lines.push(line);
            if done {
                return lines;
            }
        }
    }

    /// Reads one single-line reply.
    async fn read_line_reply(&mut self) -> String {
        let mut reply = self.read_reply().await;
        assert_eq!(reply.len(), 1, "expected a single-line reply: {reply:?}");
        reply.remove(0)
    }

    /// Returns true if the sink closed the connection (EOF or reset) with no
    /// further bytes.
    async fn is_closed(&mut self) -> bool {
        let mut rest = Vec::new();
        match tokio::time::timeout(WAIT, self.stream.read_to_end(&mut rest)).await {
            Ok(Ok(_)) => rest.is_empty(),
            Ok(Err(_)) => true,
            Err(_) => false,
        }
    }
}

#[tokio::test]
async fn ehlo_lists_default_capabilities() {
    let sink = Sink::start().await;
    let mut client = RawClient::connect(&sink).await;
    assert_eq!(client.read_line_reply().await, "220 sink ESMTP");

    client.send(b"EHLO client.test\r\n").await;
    let reply = client.read_reply().await;

    assert_eq!(
        reply,
        vec![
            "250-sink greets client.test",
            "250-PIPELINING",
            "250-SIZE 0",
            "250-8BITMIME",
            "250-ENHANCEDSTATUSCODES",
            "250-DSN",
            "250-SMTPUTF8",
            "250 CHUNKING",
        ]
    );
}

#[tokio::test]
async fn pipelined_transaction_is_recorded() {
    let sink = Sink::start().await;
    let mut client = RawClient::connect_ehlo(&sink).await;

    client
        .send(
            b"MAIL FROM:<a@b.test> BODY=8BITMIME RET=HDRS\r\n\
              RCPT TO:<x@y.test> NOTIFY=FAILURE\r\n\
              RCPT TO:<z@y.test>\r\n\
              DATA\r\n",
        )
        .await;
    assert_eq!(client.read_line_reply().await, "250 2.1.0 Ok");
    assert_eq!(client.read_line_reply().await, "250 2.1.5 Ok");
    assert_eq!(client.read_line_reply().await, "250 2.1.5 Ok");
    assert!(client.read_line_reply().await.starts_with("354 "));

    client
        .send(b"Subject: t\r\n\r\nbody\r\n.\r\nQUIT\r\n")
        .await;
    assert!(
        client
            .read_line_reply()
            .await
            .starts_with("250 2.0.0 Ok: queued as ")
    );
    assert_eq!(client.read_line_reply().await, "221 2.0.0 Bye");
    assert!(client.is_closed().await);

    let messages = sink.wait_for_messages(1, WAIT).await;
    assert_eq!(messages.len(), 1);
    let message = &messages[0];
    assert_eq!(message.helo, "client.test");
    assert_eq!(message.mail_from, "<a@b.test> BODY=8BITMIME RET=HDRS");
    assert_eq!(
        message.rcpt_to,
        vec!["<x@y.test> NOTIFY=FAILURE", "<z@y.test>"]
    );
    assert_eq!(message.raw_data, b"Subject: t\r\n\r\nbody\r\n");
    assert!(!message.via_bdat);
    assert_eq!(message.connection, 1);
    assert_eq!(sink.connection_count(), 1);
    assert_eq!(
        sink.commands(),
        vec![
            "EHLO client.test",
            "MAIL FROM:<a@b.test> BODY=8BITMIME RET=HDRS",
            "RCPT TO:<x@y.test> NOTIFY=FAILURE",
            "RCPT TO:<z@y.test>",
            "DATA",
            "QUIT",
        ]
    );
}

#[tokio::test]
async fn dot_stuffed_data_kept_raw() {
    let sink = Sink::start().await;
    let mut client = RawClient::connect_ehlo(&sink).await;

    client
        .send(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<x@y.test>\r\nDATA\r\n")
        .await;
    for _ in 0..3 {
        client.read_reply().await;
    }
    // A bare-LF ".\n" line and "\r\n.." are not terminators; the data is
    // written in two pieces with the terminator split across them.
    client
        .send(b"..leading dot\r\nbare\n.\nline\r\n...\r\nend\r")
        .await;
    client.send(b"\n.\r\n").await;
    assert!(client.read_line_reply().await.starts_with("250 "));

    let messages = sink.wait_for_messages(1, WAIT).await;
    let message = &messages[0];
    assert_eq!(
        message.raw_data,
        b"..leading dot\r\nbare\n.\nline\r\n...\r\nend\r\n"
    );
    assert_eq!(
        message.unstuffed(),
        b".leading dot\r\nbare\n.\nline\r\n..\r\nend\r\n"
    );
}

#[tokio::test]
async fn empty_data_is_recorded() {
    let sink = Sink::start().await;
    let mut client = RawClient::connect_ehlo(&sink).await;

    client
        .send(b"MAIL FROM:<>\r\nRCPT TO:<x@y.test>\r\nDATA\r\n.\r\nRSET\r\n")
        .await;
    assert_eq!(client.read_line_reply().await, "250 2.1.0 Ok");
    assert_eq!(client.read_line_reply().await, "250 2.1.5 Ok");
    assert!(client.read_line_reply().await.starts_with("354 "));
    assert!(
        client
            .read_line_reply()
            .await
            .starts_with("250 2.0.0 Ok: queued")
    );
    assert_eq!(client.read_line_reply().await, "250 2.0.0 Ok");

    let messages = sink.wait_for_messages(1, WAIT).await;
    assert_eq!(messages[0].mail_from, "<>");
    assert!(messages[0].raw_data.is_empty());
}

#[tokio::test]
async fn bdat_chunks_are_concatenated() {
    let sink = Sink::start().await;
    let mut client = RawClient::connect_ehlo(&sink).await;

    // The first chunk contains what would end a DATA transfer; BDAT must ignore it.
    let first = b"Subject: c\r\n\r\n.\r\n";
    let second = b"..tail\r\n";
    let mut request = Vec::new();
    request.extend_from_slice(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<x@y.test>\r\n");
    request.extend_from_slice(format!("BDAT {}\r\n", first.len()).as_bytes());
    request.extend_from_slice(first);
    request.extend_from_slice(format!("BDAT {} LAST\r\n", second.len()).as_bytes());
    request.extend_from_slice(second);
    request.extend_from_slice(b"NOOP\r\n");
    client.send(&request).await;

    assert_eq!(client.read_line_reply().await, "250 2.1.0 Ok");
    assert_eq!(client.read_line_reply().await, "250 2.1.5 Ok");
    assert_eq!(
        client.read_line_reply().await,
        format!("250 2.0.0 {} octets received", first.len())
    );
    assert!(
        client
            .read_line_reply()
            .await
            .starts_with("250 2.0.0 Ok: queued")
    );
    assert_eq!(client.read_line_reply().await, "250 2.0.0 Ok");

    let messages = sink.wait_for_messages(1, WAIT).await;
    let message = &messages[0];
    assert!(message.via_bdat);
    assert_eq!(message.raw_data, b"Subject: c\r\n\r\n.\r\n..tail\r\n");
    assert_eq!(message.unstuffed(), message.raw_data);
    assert_eq!(
        sink.commands(),
        [
            "EHLO client.test",
            "MAIL FROM:<a@b.test>",
            "RCPT TO:<x@y.test>",
            format!("BDAT {}", first.len()).as_str(),
            format!("BDAT {} LAST", second.len()).as_str(),
            "NOOP",
        ]
    );
}

#[tokio::test]
async fn bdat_rejected_without_chunking() {
    let sink = Sink::start().await;
    sink.set_capabilities(&["PIPELINING", "8BITMIME"]);
    let mut client = RawClient::connect(&sink).await;
    client.read_reply().await;

    client.send(b"EHLO client.test\r\n").await;
    assert_eq!(
        client.read_reply().await,
        vec![
            "250-sink greets client.test",
            "250-PIPELINING",
            "250 8BITMIME"
        ]
    );
    client.send(b"BDAT 3 LAST\r\n").await;
    assert_eq!(
        client.read_line_reply().await,
        "500 5.5.2 Command not recognized"
    );
}

#[tokio::test]
async fn rcpt_override_rejects_address() {
    let sink = Sink::start().await;
    sink.set_rcpt_reply("Bad@Y.test", "550 5.1.1 No such user");
    let mut client = RawClient::connect_ehlo(&sink).await;

    client
        .send(
            b"MAIL FROM:<a@b.test>\r\n\
              RCPT TO:<bad@y.TEST>\r\n\
              RCPT TO:<good@y.test>\r\n\
              DATA\r\n",
        )
        .await;
    assert_eq!(client.read_line_reply().await, "250 2.1.0 Ok");
    assert_eq!(client.read_line_reply().await, "550 5.1.1 No such user");
    assert_eq!(client.read_line_reply().await, "250 2.1.5 Ok");
    assert!(client.read_line_reply().await.starts_with("354 "));
    client.send(b"hi\r\n.\r\n").await;
    assert!(client.read_line_reply().await.starts_with("250 "));

    let messages = sink.wait_for_messages(1, WAIT).await;
    assert_eq!(messages[0].rcpt_to, vec!["<good@y.test>"]);
}

#[tokio::test]
async fn final_reply_override_records_nothing() {
    let sink = Sink::start().await;
    sink.set_final_reply("451 4.3.0 Try again later");
    let mut client = RawClient::connect_ehlo(&sink).await;

    client
        .send(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<x@y.test>\r\nDATA\r\n")
        .await;
    for _ in 0..3 {
        client.read_reply().await;
    }
    client.send(b"hi\r\n.\r\n").await;
    assert_eq!(client.read_line_reply().await, "451 4.3.0 Try again later");
    assert!(sink.messages().is_empty());

    sink.clear_overrides();
    client
        .send(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<x@y.test>\r\nDATA\r\n")
        .await;
    for _ in 0..3 {
        client.read_reply().await;
    }
    client.send(b"again\r\n.\r\n").await;
    assert!(client.read_line_reply().await.starts_with("250 "));
    let messages = sink.wait_for_messages(1, WAIT).await;
    assert_eq!(messages[0].raw_data, b"again\r\n");
}

#[tokio::test]
async fn drop_at_rcpt_closes_socket() {
    let sink = Sink::start().await;
    sink.set_drop(DropAt::Rcpt);
    let mut client = RawClient::connect_ehlo(&sink).await;

    client
        .send(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<x@y.test>\r\n")
        .await;
    assert_eq!(client.read_line_reply().await, "250 2.1.0 Ok");
    assert!(client.is_closed().await);
    assert!(sink.messages().is_empty());
    assert_eq!(
        sink.commands().last().map(String::as_str),
        Some("RCPT TO:<x@y.test>")
    );
}

#[tokio::test]
async fn drop_once_affects_one_connection() {
    let sink = Sink::start().await;
    sink.set_drop_once(DropAt::Connect);

    let mut first = RawClient::connect(&sink).await;
    assert!(first.is_closed().await);
    let mut second = RawClient::connect(&sink).await;
    assert_eq!(second.read_line_reply().await, "220 sink ESMTP");
    assert_eq!(sink.connection_count(), 2);
}

#[tokio::test]
async fn drop_during_data_records_nothing() {
    let sink = Sink::start().await;
    sink.set_drop(DropAt::DuringData);
    let mut client = RawClient::connect_ehlo(&sink).await;

    client
        .send(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<x@y.test>\r\nDATA\r\n")
        .await;
    client.read_reply().await;
    client.read_reply().await;
    assert!(client.read_line_reply().await.starts_with("354 "));
    client.send(b"partial").await;
    assert!(client.is_closed().await);
    assert!(sink.messages().is_empty());
}

#[tokio::test]
async fn stop_refuses_connects() {
    let sink = Sink::start().await;
    let mut client = RawClient::connect(&sink).await;
    assert_eq!(client.read_line_reply().await, "220 sink ESMTP");

    sink.stop();
    let error = TcpStream::connect(sink.addr)
        .await
        .expect_err("connect after stop should fail");
    assert_eq!(error.kind(), std::io::ErrorKind::ConnectionRefused);

    // The connection accepted before stop keeps working.
    client.send(b"NOOP\r\n").await;
    assert_eq!(client.read_line_reply().await, "250 2.0.0 Ok");

    // A new sink can take over the port.
    let restarted = Sink::start_on(sink.addr).await;
    let mut client = RawClient::connect(&restarted).await;
    assert_eq!(client.read_line_reply().await, "220 sink ESMTP");
}

#[tokio::test]
async fn concurrent_connections_all_recorded() {
    let sink = Sink::start().await;
    let mut tasks = Vec::new();
    for i in 0..20 {
        let sink = sink.clone();
        tasks.push(tokio::spawn(async move {
            let mut client = RawClient::connect_ehlo(&sink).await;
            let request = format!("MAIL FROM:<s{i}@b.test>\r\nRCPT TO:<x@y.test>\r\nDATA\r\n");
            client.send(request.as_bytes()).await;
            for _ in 0..3 {
                client.read_reply().await;
            }
            client
                .send(format!("n{i}\r\n.\r\nQUIT\r\n").as_bytes())
                .await;
            assert!(client.read_line_reply().await.starts_with("250 "));
        }));
    }
    for task in tasks {
        task.await.expect("client task");
    }

    let messages = sink.wait_for_messages(20, WAIT).await;
    assert_eq!(messages.len(), 20);
    assert_eq!(sink.connection_count(), 20);
    let mut senders: Vec<_> = messages.iter().map(|m| m.mail_from.clone()).collect();
    senders.sort();
    senders.dedup();
    assert_eq!(senders.len(), 20);
}

#[tokio::test]
async fn large_message_arrives_intact() {
    let sink = Sink::start().await;
    let mut client = RawClient::connect_ehlo(&sink).await;

    // 16 MiB of 1000-byte lines, each starting with ".." so that every line
    // is dot-stuffed.
    let line = {
        let mut line = b"..".to_vec();
        line.extend(std::iter::repeat_n(b'x', 996));
        line.extend_from_slice(b"\r\n");
        line
    };
    let mut body = Vec::with_capacity(16 * 1024 * 1024 + 1024);
    while body.len() < 16 * 1024 * 1024 {
        body.extend_from_slice(&line);
    }

    client
        .send(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<x@y.test>\r\nDATA\r\n")
        .await;
    for _ in 0..3 {
        client.read_reply().await;
    }
    client.send(&body).await;
    client.send(b".\r\n").await;
    assert!(client.read_line_reply().await.starts_with("250 "));

    let messages = sink.wait_for_messages(1, WAIT).await;
    assert_eq!(messages[0].raw_data.len(), body.len());
    assert!(
        messages[0].raw_data == body,
        "raw data differs from what was sent"
    );
    assert_eq!(
        messages[0].unstuffed().len(),
        body.len() - body.len() / 1000
    );
}

#[tokio::test]
async fn wait_for_messages_panics_on_timeout() {
    let sink = Sink::start().await;
    let waiter = sink.clone();
    let result =
        tokio::spawn(async move { waiter.wait_for_messages(1, Duration::from_millis(50)).await })
            .await;
    let error = result.expect_err("wait should panic");
    assert!(error.is_panic());
}

#[tokio::test]
async fn large_bdat_chunks_arrive_intact() {
    let sink = Sink::start().await;
    let mut client = RawClient::connect_ehlo(&sink).await;

    // Three 3 MiB chunks of varying bytes, larger than one socket read.
    let chunks: Vec<Vec<u8>> = (0..3u8)
        .map(|n| (0..3 * 1024 * 1024).map(|i| (i % 251) as u8 ^ n).collect())
        .collect();
    client
        .send(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<x@y.test>\r\n")
        .await;
    for (i, chunk) in chunks.iter().enumerate() {
        let last = if i == chunks.len() - 1 { " LAST" } else { "" };
        client
            .send(format!("BDAT {}{last}\r\n", chunk.len()).as_bytes())
            .await;
        client.send(chunk).await;
    }
    client.read_reply().await;
    client.read_reply().await;
    for _ in 0..2 {
        assert!(client.read_line_reply().await.ends_with(" octets received"));
    }
    assert!(
        client
            .read_line_reply()
            .await
            .starts_with("250 2.0.0 Ok: queued")
    );

    let messages = sink.wait_for_messages(1, WAIT).await;
    assert!(
        messages[0].raw_data == chunks.concat(),
        "BDAT data differs from what was sent"
    );
}

#[tokio::test]
async fn smtp_sink_rejects_lhlo() {
    let sink = Sink::start().await;
    let mut client = RawClient::connect(&sink).await;
    assert_eq!(client.read_line_reply().await, "220 sink ESMTP");
    client.send(b"LHLO client.test\r\n").await;
    assert_eq!(
        client.read_line_reply().await,
        "500 5.5.2 Command not recognized"
    );
}

#[tokio::test]
async fn lmtp_greets_lhlo_and_rejects_ehlo_and_helo() {
    let sink = Sink::start_lmtp().await;
    let mut client = RawClient::connect(&sink).await;
    assert_eq!(client.read_line_reply().await, "220 sink LMTP");

    client.send(b"EHLO client.test\r\n").await;
    assert!(client.read_line_reply().await.starts_with("500 5.5.1 "));
    client.send(b"HELO client.test\r\n").await;
    assert!(client.read_line_reply().await.starts_with("500 5.5.1 "));
    client.send(b"MAIL FROM:<a@b.test>\r\n").await;
    assert!(
        client.read_line_reply().await.starts_with("503 "),
        "no transaction before LHLO"
    );

    client.send(b"LHLO client.test\r\n").await;
    let reply = client.read_reply().await;
    assert_eq!(reply[0], "250-sink greets client.test");
    assert_eq!(reply.last().map(String::as_str), Some("250 CHUNKING"));
}

#[tokio::test]
async fn lmtp_replies_per_recipient_in_rcpt_order() {
    let sink = Sink::start_lmtp().await;
    sink.set_lmtp_data_reply("b@y.test", "452 4.2.2 Mailbox full");
    sink.set_lmtp_data_reply("C@Y.test", "550 5.1.1 No such user");
    sink.set_rcpt_reply("refused@y.test", "550 5.1.1 Unknown");
    let mut client = RawClient::connect_lhlo(&sink).await;

    client
        .send(
            b"MAIL FROM:<s@b.test>\r\n\
              RCPT TO:<a@y.test>\r\n\
              RCPT TO:<b@y.test>\r\n\
              RCPT TO:<refused@y.test>\r\n\
              RCPT TO:<c@y.test> NOTIFY=NEVER\r\n\
              RCPT TO:<d@y.test>\r\n\
              DATA\r\n",
        )
        .await;
    assert_eq!(client.read_line_reply().await, "250 2.1.0 Ok");
    assert_eq!(client.read_line_reply().await, "250 2.1.5 Ok");
    assert_eq!(client.read_line_reply().await, "250 2.1.5 Ok");
    assert_eq!(client.read_line_reply().await, "550 5.1.1 Unknown");
    assert_eq!(client.read_line_reply().await, "250 2.1.5 Ok");
    assert_eq!(client.read_line_reply().await, "250 2.1.5 Ok");
    assert!(client.read_line_reply().await.starts_with("354 "));

    client.send(b"Subject: t\r\n\r\nbody\r\n.\r\n").await;
    let first = client.read_line_reply().await;
    assert!(
        first.starts_with("250 2.0.0 <a@y.test> Ok: queued as "),
        "{first}"
    );
    assert_eq!(client.read_line_reply().await, "452 4.2.2 Mailbox full");
    assert_eq!(client.read_line_reply().await, "550 5.1.1 No such user");
    let last = client.read_line_reply().await;
    assert!(
        last.starts_with("250 2.0.0 <d@y.test> Ok: queued as "),
        "{last}"
    );

    let messages = sink.wait_for_messages(1, WAIT).await;
    assert_eq!(messages[0].helo, "client.test");
    assert_eq!(messages[0].mail_from, "<s@b.test>");
    assert_eq!(messages[0].rcpt_to, vec!["<a@y.test>", "<d@y.test>"]);
    assert_eq!(messages[0].unstuffed(), b"Subject: t\r\n\r\nbody\r\n");
}

#[tokio::test]
async fn lmtp_all_recipients_failing_records_nothing() {
    let sink = Sink::start_lmtp().await;
    sink.set_final_reply("451 4.3.0 Temporary failure");
    let mut client = RawClient::connect_lhlo(&sink).await;

    client
        .send(b"MAIL FROM:<s@b.test>\r\nRCPT TO:<a@y.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n")
        .await;
    for _ in 0..3 {
        assert!(client.read_line_reply().await.starts_with("250 "));
    }
    assert!(client.read_line_reply().await.starts_with("354 "));
    client.send(b"Subject: t\r\n\r\nbody\r\n.\r\n").await;
    assert_eq!(
        client.read_line_reply().await,
        "451 4.3.0 Temporary failure"
    );
    assert_eq!(
        client.read_line_reply().await,
        "451 4.3.0 Temporary failure"
    );

    // The next transaction on the connection starts clean.
    sink.clear_overrides();
    client
        .send(b"MAIL FROM:<s@b.test>\r\nRCPT TO:<c@y.test>\r\nDATA\r\n")
        .await;
    assert_eq!(client.read_line_reply().await, "250 2.1.0 Ok");
    assert_eq!(client.read_line_reply().await, "250 2.1.5 Ok");
    assert!(client.read_line_reply().await.starts_with("354 "));
    client
        .send(b"Subject: u\r\n\r\nbody\r\n.\r\nQUIT\r\n")
        .await;
    assert!(
        client
            .read_line_reply()
            .await
            .starts_with("250 2.0.0 <c@y.test> Ok: queued as ")
    );
    assert_eq!(client.read_line_reply().await, "221 2.0.0 Bye");

    let messages = sink.wait_for_messages(1, WAIT).await;
    assert_eq!(messages.len(), 1, "the failed transaction is not recorded");
    assert_eq!(messages[0].rcpt_to, vec!["<c@y.test>"]);
}

#[tokio::test]
async fn lmtp_data_without_recipients_gets_503() {
    let sink = Sink::start_lmtp().await;
    sink.set_rcpt_reply("x@y.test", "550 5.1.1 Unknown");
    let mut client = RawClient::connect_lhlo(&sink).await;
    client
        .send(b"MAIL FROM:<s@b.test>\r\nRCPT TO:<x@y.test>\r\nDATA\r\n")
        .await;
    assert_eq!(client.read_line_reply().await, "250 2.1.0 Ok");
    assert_eq!(client.read_line_reply().await, "550 5.1.1 Unknown");
    assert_eq!(
        client.read_line_reply().await,
        "503 5.5.1 No valid recipients"
    );
}

#[tokio::test]
async fn lmtp_bdat_last_gets_one_reply_per_recipient() {
    let sink = Sink::start_lmtp().await;
    sink.set_lmtp_data_reply("b@y.test", "452 4.2.2 Mailbox full");
    let mut client = RawClient::connect_lhlo(&sink).await;
    let content = b"Subject: chunked\r\n\r\nbody\r\n";

    client
        .send(b"MAIL FROM:<s@b.test>\r\nRCPT TO:<a@y.test>\r\nRCPT TO:<b@y.test>\r\n")
        .await;
    client
        .send(format!("BDAT {} LAST\r\n", content.len()).as_bytes())
        .await;
    client.send(content).await;
    assert_eq!(client.read_line_reply().await, "250 2.1.0 Ok");
    assert_eq!(client.read_line_reply().await, "250 2.1.5 Ok");
    assert_eq!(client.read_line_reply().await, "250 2.1.5 Ok");
    assert!(
        client
            .read_line_reply()
            .await
            .starts_with("250 2.0.0 <a@y.test> Ok: queued as ")
    );
    assert_eq!(client.read_line_reply().await, "452 4.2.2 Mailbox full");

    let messages = sink.wait_for_messages(1, WAIT).await;
    assert!(messages[0].via_bdat);
    assert_eq!(messages[0].raw_data, content);
    assert_eq!(messages[0].rcpt_to, vec!["<a@y.test>"]);
}

#[tokio::test]
async fn lmtp_drop_after_data_sends_no_replies() {
    let sink = Sink::start_lmtp().await;
    sink.set_drop(DropAt::AfterData);
    let mut client = RawClient::connect_lhlo(&sink).await;
    client
        .send(b"MAIL FROM:<s@b.test>\r\nRCPT TO:<a@y.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n")
        .await;
    for _ in 0..3 {
        assert!(client.read_line_reply().await.starts_with("250 "));
    }
    assert!(client.read_line_reply().await.starts_with("354 "));
    client.send(b"Subject: t\r\n\r\nbody\r\n.\r\n").await;
    assert!(client.is_closed().await, "closed without a reply");
    assert!(sink.messages().is_empty());
}
