//! Authoritative DNS server on loopback for integration tests.
//!
//! `TestDns` serves one zone, `test.`, from hickory-server's in-memory zone
//! handler over UDP and TCP on the same 127.0.0.1 port. Tests describe the
//! records with the `Zone` builder:
//!
//! ```ignore
//! let zone = Zone::new()
//!     .mx("example.test", 10, "mx1.example.test")
//!     .a("mx1.example.test", Ipv4Addr::new(127, 0, 0, 1))
//!     .txt("2.0.0.127.bl.test", &["Listed for testing"]);
//! let dns = TestDns::start(zone).await;
//! ```
//!
//! Answers follow the usual rules of an authoritative server: a name under
//! `test.` without records gets NXDOMAIN, a name with records but not of the
//! requested type gets NOERROR with an empty answer (NODATA), and a name
//! outside `test.` gets REFUSED. Two switches override this for one name:
//! `servfail` answers every query for it with SERVFAIL, and `unanswered`
//! drops every query for it, so that the client times out.
//!
//! Interface: `Zone` and its builder methods, `TestDns::start`, `address` and
//! `queries`. The server stops when the `TestDns` is dropped.
//!
//! Errors: setup failures (bind, invalid names) panic.

// Each test binary that includes this module uses a different subset of it.
#![allow(dead_code)]

use std::collections::HashSet;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use hickory_server::Server;
use hickory_server::net::runtime::{Time, TokioRuntimeProvider};
use hickory_server::net::xfer::Protocol;
use hickory_server::proto::op::{Header, HeaderCounts, Metadata, ResponseCode};
use hickory_server::proto::rr::rdata::{A, AAAA, MX, SOA, TXT};
use hickory_server::proto::rr::{LowerName, Name, RData, Record, RecordType};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::store::in_memory::InMemoryZoneHandler;
use hickory_server::zone_handler::{AxfrPolicy, Catalog, MessageResponseBuilder, ZoneType};
use tokio::net::{TcpListener, UdpSocket};

/// Origin of the test zone. Every record name must be under it.
pub const ZONE_ORIGIN: &str = "test.";

/// TTL of every record, in seconds.
const RECORD_TTL: u32 = 300;

/// Idle time after which the server closes a TCP connection.
const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Bind attempts before giving up on finding a port free for UDP and TCP.
const BIND_ATTEMPTS: usize = 20;

/// Records of the test zone and the names with special behaviour.
#[derive(Clone, Debug, Default)]
pub struct Zone {
    records: Vec<Record>,
    servfail: HashSet<LowerName>,
    unanswered: HashSet<LowerName>,
}

impl Zone {
    /// Creates an empty zone that serves only the SOA record of `test.`.
    pub fn new() -> Zone {
        Zone::default()
    }

    /// Adds an MX record. `exchange` "." makes a null MX (RFC 7505).
    pub fn mx(mut self, domain: &str, preference: u16, exchange: &str) -> Zone {
        let exchange = if exchange == "." {
            Name::root()
        } else {
            absolute_name(exchange)
        };
        self.records.push(Record::from_rdata(
            zone_name(domain),
            RECORD_TTL,
            RData::MX(MX::new(preference, exchange)),
        ));
        self
    }

    /// Adds the null MX record of RFC 7505: preference 0, exchange ".".
    pub fn null_mx(self, domain: &str) -> Zone {
        self.mx(domain, 0, ".")
    }

    /// Adds an A record.
    pub fn a(mut self, name: &str, address: Ipv4Addr) -> Zone {
        self.records.push(Record::from_rdata(
            zone_name(name),
            RECORD_TTL,
            RData::A(A(address)),
        ));
        self
    }

    /// Adds an AAAA record.
    pub fn aaaa(mut self, name: &str, address: Ipv6Addr) -> Zone {
        self.records.push(Record::from_rdata(
            zone_name(name),
            RECORD_TTL,
            RData::AAAA(AAAA(address)),
        ));
        self
    }

    /// Adds a TXT record of one character string per element of `strings`,
    /// each at most 255 octets.
    pub fn txt(mut self, name: &str, strings: &[&str]) -> Zone {
        let strings = strings.iter().map(|text| text.to_string()).collect();
        self.records.push(Record::from_rdata(
            zone_name(name),
            RECORD_TTL,
            RData::TXT(TXT::new(strings)),
        ));
        self
    }

    /// Makes every query for `name`, of any type, get SERVFAIL.
    pub fn servfail(mut self, name: &str) -> Zone {
        self.servfail.insert(LowerName::new(&zone_name(name)));
        self
    }

    /// Makes the server drop every query for `name` without a response.
    pub fn unanswered(mut self, name: &str) -> Zone {
        self.unanswered.insert(LowerName::new(&zone_name(name)));
        self
    }
}

/// One query as the server received it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReceivedQuery {
    /// Query name in lowercase A-labels without the trailing dot.
    pub name: String,
    pub record_type: RecordType,
    /// True if the query came over TCP, false for UDP.
    pub over_tcp: bool,
}

/// A running DNS server for the test zone.
pub struct TestDns {
    address: SocketAddr,
    queries: Arc<Mutex<Vec<ReceivedQuery>>>,
    // Dropping the server aborts its tasks and closes the sockets.
    _server: Server<TestHandler>,
}

impl TestDns {
    /// Starts the server on 127.0.0.1 with a free port, UDP and TCP both.
    pub async fn start(zone: Zone) -> TestDns {
        let origin = absolute_name(ZONE_ORIGIN);
        let mut zone_handler = InMemoryZoneHandler::<TokioRuntimeProvider>::empty(
            origin.clone(),
            ZoneType::Primary,
            AxfrPolicy::Deny,
        );

        let serial = 1;
        let soa = SOA::new(
            absolute_name("ns.test."),
            absolute_name("hostmaster.test."),
            serial,
            3600,
            600,
            86400,
            // Minimum TTL: also the TTL of negative answers.
            60,
        );
        let soa_record = Record::from_rdata(origin.clone(), RECORD_TTL, RData::SOA(soa));
        assert!(zone_handler.upsert_mut(soa_record, serial));
        for record in zone.records {
            let description = format!("{record:?}");
            assert!(
                zone_handler.upsert_mut(record, serial),
                "the test zone rejected {description}"
            );
        }

        let mut catalog = Catalog::new();
        catalog.upsert(LowerName::new(&origin), vec![Arc::new(zone_handler)]);

        let queries = Arc::new(Mutex::new(Vec::new()));
        let handler = TestHandler {
            catalog,
            servfail: zone.servfail,
            unanswered: zone.unanswered,
            queries: queries.clone(),
        };

        let (udp, tcp) = bind_udp_and_tcp().await;
        let address = udp.local_addr().expect("UDP socket has a local address");

        let mut server = Server::new(handler);
        server.register_socket(udp);
        server.register_listener(tcp, TCP_IDLE_TIMEOUT, 64 * 1024);

        TestDns {
            address,
            queries,
            _server: server,
        }
    }

    /// Address of the server, the same for UDP and TCP.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Returns every query received so far, in arrival order.
    pub fn queries(&self) -> Vec<ReceivedQuery> {
        self.queries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// Request handler that applies the SERVFAIL and drop switches, logs each
/// query and passes the rest to the catalog.
struct TestHandler {
    catalog: Catalog,
    servfail: HashSet<LowerName>,
    unanswered: HashSet<LowerName>,
    queries: Arc<Mutex<Vec<ReceivedQuery>>>,
}

#[async_trait::async_trait]
impl RequestHandler for TestHandler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let Ok(info) = request.request_info() else {
            return self
                .catalog
                .handle_request::<R, T>(request, response_handle)
                .await;
        };
        let name = info.query.name().clone();

        // to_ascii keeps A-labels as sent, while Display would decode them to
        // U-labels.
        let text = name.to_ascii();
        self.queries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(ReceivedQuery {
                name: text.strip_suffix('.').unwrap_or(&text).to_owned(),
                record_type: info.query.query_type(),
                over_tcp: info.protocol == Protocol::Tcp,
            });

        if self.unanswered.contains(&name) {
            // Nothing is sent. The returned value only feeds the server's
            // own logging.
            let mut metadata = Metadata::response_from_request(&request.metadata);
            metadata.response_code = ResponseCode::ServFail;
            return ResponseInfo::from(Header {
                metadata,
                counts: HeaderCounts::default(),
            });
        }

        if self.servfail.contains(&name) {
            let response = MessageResponseBuilder::from_message_request(request)
                .error_msg(&request.metadata, ResponseCode::ServFail);
            return response_handle
                .send_response(response)
                .await
                .expect("the test DNS server failed to send a SERVFAIL response");
        }

        self.catalog
            .handle_request::<R, T>(request, response_handle)
            .await
    }
}

/// Parses a name and makes it absolute.
fn absolute_name(text: &str) -> Name {
    let mut name =
        Name::from_ascii(text).unwrap_or_else(|error| panic!("invalid DNS name {text:?}: {error}"));
    name.set_fqdn(true);
    name
}

/// Parses a record name and checks that it lies in the test zone.
fn zone_name(text: &str) -> Name {
    let name = absolute_name(text);
    assert!(
        absolute_name(ZONE_ORIGIN).zone_of(&name),
        "{text:?} is outside the test zone {ZONE_ORIGIN}"
    );
    name
}

/// Binds a UDP socket on 127.0.0.1 with a free port and a TCP listener on the
/// same port, trying again if another process uses that TCP port.
async fn bind_udp_and_tcp() -> (UdpSocket, TcpListener) {
    for _ in 0..BIND_ATTEMPTS {
        let udp = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind UDP socket on 127.0.0.1");
        let address = udp.local_addr().expect("UDP socket has a local address");
        if let Ok(tcp) = TcpListener::bind(address).await {
            return (udp, tcp);
        }
    }
    panic!("no port on 127.0.0.1 was free for both UDP and TCP after {BIND_ATTEMPTS} tries");
}
