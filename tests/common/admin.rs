//! A minimal HTTP client for the admin listener and a parser for the
//! Prometheus text format.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends `GET path` and returns the status code and the body.
pub async fn get(address: SocketAddr, path: &str) -> (u16, String) {
    let exchange = async {
        let mut stream = TcpStream::connect(address).await.expect("connect to admin");
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .expect("send request");
        let mut response = Vec::new();
        stream
            .read_to_end(&mut response)
            .await
            .expect("read response");
        response
    };
    let response = tokio::time::timeout(Duration::from_secs(20), exchange)
        .await
        .expect("admin response within 20 s");
    let text = String::from_utf8(response).expect("UTF-8 response");
    let (head, body) = text.split_once("\r\n\r\n").expect("header end");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .expect("status code");
    assert!(
        !head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "the admin listener sends bodies with a length: {head}"
    );
    (status, body.to_string())
}

/// Every sample of a scrape: the series (name and labels as written) and
/// its value.
pub type Samples = BTreeMap<String, f64>;

pub fn parse(text: &str) -> Samples {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').expect("series and value");
            let value = match value {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                other => other.parse().unwrap_or(f64::NAN),
            };
            (series.to_string(), value)
        })
        .collect()
}

/// Scrapes `/metrics`, checking the status and the content type.
pub async fn scrape(address: SocketAddr) -> Samples {
    let (status, body) = get(address, "/metrics").await;
    assert_eq!(status, 200, "{body}");
    parse(&body)
}

/// Returns the names of the metrics that have at least one sample.
pub fn sample_names(samples: &Samples) -> std::collections::BTreeSet<String> {
    samples
        .keys()
        .map(|series| series.split('{').next().unwrap_or(series).to_string())
        .collect()
}

/// Returns the value of one series, and panics when the scrape lacks it.
pub fn value(samples: &Samples, series: &str) -> f64 {
    samples
        .get(series)
        .copied()
        .unwrap_or_else(|| panic!("the scrape has no series {series}"))
}
