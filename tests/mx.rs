//! MX resolution against the loopback DNS server in `tests/common/dns.rs`.

mod common;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use common::dns::{TestDns, Zone};
use hickory_server::proto::rr::RecordType;
use wsmtp::delivery::mx::{MAX_MX_HOSTS, MxError, MxHost, MxResolver, ResolverSettings};

const MX1_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 11);
const MX2_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 12);
const MX3_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 13);

fn resolver_for(dns: &TestDns) -> MxResolver {
    resolver_with_timeout(dns, Duration::from_secs(5), 2)
}

fn resolver_with_timeout(dns: &TestDns, timeout: Duration, attempts: usize) -> MxResolver {
    let settings = ResolverSettings {
        nameservers: vec![dns.address()],
        timeout,
        attempts,
    };
    MxResolver::new(&settings).expect("build resolver for the test DNS server")
}

fn names(hosts: &[MxHost]) -> Vec<&str> {
    hosts.iter().map(|host| host.name.as_str()).collect()
}

#[tokio::test]
async fn mx_hosts_sorted_by_preference() {
    let zone = Zone::new()
        .mx("example.test", 20, "mx2.example.test")
        .mx("example.test", 30, "mx3.example.test")
        .mx("example.test", 10, "mx1.example.test")
        .a("mx1.example.test", MX1_IP)
        .aaaa("mx1.example.test", Ipv6Addr::LOCALHOST)
        .a("mx2.example.test", MX2_IP)
        .a("mx3.example.test", MX3_IP);
    let dns = TestDns::start(zone).await;
    let resolver = resolver_for(&dns);

    let hosts = resolver.route("example.test").await.expect("route");

    assert_eq!(
        hosts,
        vec![
            MxHost {
                name: "mx1.example.test".to_owned(),
                preference: 10,
                addresses: vec![IpAddr::V4(MX1_IP), IpAddr::V6(Ipv6Addr::LOCALHOST)],
            },
            MxHost {
                name: "mx2.example.test".to_owned(),
                preference: 20,
                addresses: vec![IpAddr::V4(MX2_IP)],
            },
            MxHost {
                name: "mx3.example.test".to_owned(),
                preference: 30,
                addresses: vec![IpAddr::V4(MX3_IP)],
            },
        ]
    );
}

#[tokio::test]
async fn equal_preferences_in_both_orders() {
    let zone = Zone::new()
        .mx("example.test", 10, "mx1.example.test")
        .mx("example.test", 10, "mx2.example.test")
        .mx("example.test", 5, "mx0.example.test")
        .a("mx0.example.test", MX3_IP)
        .a("mx1.example.test", MX1_IP)
        .a("mx2.example.test", MX2_IP);
    let dns = TestDns::start(zone).await;
    let resolver = resolver_for(&dns);

    // With a fair shuffle, one order is missing from 64 lookups with
    // probability 2 * 2^-64.
    let mut mx1_first = 0;
    let mut mx2_first = 0;
    for _ in 0..64 {
        let hosts = resolver.route("example.test").await.expect("route");
        match names(&hosts)[..] {
            ["mx0.example.test", "mx1.example.test", "mx2.example.test"] => mx1_first += 1,
            ["mx0.example.test", "mx2.example.test", "mx1.example.test"] => mx2_first += 1,
            ref other => panic!("unexpected order {other:?}"),
        }
    }

    assert!(mx1_first > 0, "mx1 never came first");
    assert!(mx2_first > 0, "mx2 never came first");
}

#[tokio::test]
async fn implicit_mx_from_address_records() {
    let zone = Zone::new()
        .a("plain.test", MX1_IP)
        .aaaa("plain.test", Ipv6Addr::LOCALHOST);
    let dns = TestDns::start(zone).await;
    let resolver = resolver_for(&dns);

    let hosts = resolver.route("plain.test").await.expect("route");

    assert_eq!(
        hosts,
        vec![MxHost {
            name: "plain.test".to_owned(),
            preference: 0,
            addresses: vec![IpAddr::V4(MX1_IP), IpAddr::V6(Ipv6Addr::LOCALHOST)],
        }]
    );
}

#[tokio::test]
async fn null_mx_is_permanent() {
    let zone = Zone::new()
        .null_mx("nomail.test")
        // An address must not turn the null MX into an implicit MX.
        .a("nomail.test", MX1_IP);
    let dns = TestDns::start(zone).await;
    let resolver = resolver_for(&dns);

    let error = resolver.route("nomail.test").await.unwrap_err();

    assert_eq!(
        error,
        MxError::NullMx {
            domain: "nomail.test".to_owned()
        }
    );
    assert!(error.is_permanent());
    assert_eq!(error.status(), "5.1.10");
    assert!(error.to_string().contains("nomail.test"), "{error}");
}

#[tokio::test]
async fn null_mx_among_others_ignored() {
    let zone = Zone::new()
        .null_mx("example.test")
        .mx("example.test", 10, "mx1.example.test")
        .a("mx1.example.test", MX1_IP);
    let dns = TestDns::start(zone).await;
    let resolver = resolver_for(&dns);

    let hosts = resolver.route("example.test").await.expect("route");

    assert_eq!(names(&hosts), vec!["mx1.example.test"]);
}

#[tokio::test]
async fn nxdomain_is_no_such_domain() {
    let zone = Zone::new().a("other.test", MX1_IP);
    let dns = TestDns::start(zone).await;
    let resolver = resolver_for(&dns);

    let error = resolver.route("missing.test").await.unwrap_err();

    assert_eq!(
        error,
        MxError::NoSuchDomain {
            domain: "missing.test".to_owned()
        }
    );
    assert!(error.is_permanent());
    assert_eq!(error.status(), "5.1.2");
}

#[tokio::test]
async fn host_without_address_skipped() {
    let zone = Zone::new()
        .mx("example.test", 10, "noaddr.example.test")
        .mx("example.test", 20, "mx2.example.test")
        .a("mx2.example.test", MX2_IP);
    let dns = TestDns::start(zone).await;
    let resolver = resolver_for(&dns);

    let hosts = resolver.route("example.test").await.expect("route");

    assert_eq!(names(&hosts), vec!["mx2.example.test"]);
    assert_eq!(hosts[0].preference, 20);
}

#[tokio::test]
async fn no_host_with_address_is_temporary() {
    // noaddr1 does not exist (NXDOMAIN). noaddr2 exists but has only an MX
    // record, so its A and AAAA queries get NODATA.
    let zone = Zone::new()
        .mx("example.test", 10, "noaddr1.example.test")
        .mx("example.test", 20, "noaddr2.example.test")
        .mx("noaddr2.example.test", 10, "mx1.example.test");
    let dns = TestDns::start(zone).await;
    let resolver = resolver_for(&dns);

    let error = resolver.route("example.test").await.unwrap_err();

    assert_eq!(
        error,
        MxError::NoAddresses {
            domain: "example.test".to_owned()
        }
    );
    assert!(!error.is_permanent());
    assert_eq!(error.status(), "4.4.3");
}

#[tokio::test]
async fn servfail_is_temporary() {
    let zone = Zone::new()
        .mx("example.test", 10, "mx1.example.test")
        .a("mx1.example.test", MX1_IP)
        .servfail("example.test");
    let dns = TestDns::start(zone).await;
    let resolver = resolver_for(&dns);

    let error = resolver.route("example.test").await.unwrap_err();

    assert!(
        matches!(&error, MxError::Temporary { domain, .. } if domain == "example.test"),
        "{error:?}"
    );
    assert!(!error.is_permanent());
    assert_eq!(error.status(), "4.4.3");
}

#[tokio::test]
async fn servfail_on_only_host_is_temporary() {
    let zone = Zone::new()
        .mx("example.test", 10, "mx1.example.test")
        .a("mx1.example.test", MX1_IP)
        .servfail("mx1.example.test");
    let dns = TestDns::start(zone).await;
    let resolver = resolver_for(&dns);

    let error = resolver.route("example.test").await.unwrap_err();

    let MxError::Temporary { reason, .. } = &error else {
        panic!("expected a temporary error, got {error:?}");
    };
    assert!(reason.contains("mx1.example.test"), "{reason}");
}

#[tokio::test]
async fn servfail_host_skipped_when_another_answers() {
    let zone = Zone::new()
        .mx("example.test", 10, "mx1.example.test")
        .mx("example.test", 20, "mx2.example.test")
        .a("mx1.example.test", MX1_IP)
        .a("mx2.example.test", MX2_IP)
        .servfail("mx1.example.test");
    let dns = TestDns::start(zone).await;
    let resolver = resolver_for(&dns);

    let hosts = resolver.route("example.test").await.expect("route");

    assert_eq!(names(&hosts), vec!["mx2.example.test"]);
}

#[tokio::test]
async fn unanswered_query_times_out() {
    let zone = Zone::new()
        .mx("example.test", 10, "mx1.example.test")
        .a("mx1.example.test", MX1_IP)
        .unanswered("example.test");
    let dns = TestDns::start(zone).await;
    let resolver = resolver_with_timeout(&dns, Duration::from_millis(300), 2);

    let started = Instant::now();
    let error = resolver.route("example.test").await.unwrap_err();
    let elapsed = started.elapsed();

    assert!(
        matches!(&error, MxError::Temporary { domain, .. } if domain == "example.test"),
        "{error:?}"
    );
    assert_eq!(error.status(), "4.4.3");
    assert!(elapsed < Duration::from_secs(5), "took {elapsed:?}");
    let mx_queries = dns
        .queries()
        .into_iter()
        .filter(|query| query.name == "example.test" && query.record_type == RecordType::MX)
        .count();
    assert!(mx_queries >= 2, "the query was sent {mx_queries} times");
}

#[tokio::test]
async fn idn_domain_queried_as_a_label() {
    let zone = Zone::new()
        .mx("xn--bcher-kva.test", 10, "mx1.xn--bcher-kva.test")
        .a("mx1.xn--bcher-kva.test", MX1_IP);
    let dns = TestDns::start(zone).await;
    let resolver = resolver_for(&dns);

    let hosts = resolver.route("Bücher.test").await.expect("route");

    assert_eq!(names(&hosts), vec!["mx1.xn--bcher-kva.test"]);
    let queries = dns.queries();
    assert!(
        queries
            .iter()
            .any(|query| query.name == "xn--bcher-kva.test" && query.record_type == RecordType::MX),
        "{queries:?}"
    );
}

#[tokio::test]
async fn address_literal_and_bad_name_rejected() {
    let dns = TestDns::start(Zone::new()).await;
    let resolver = resolver_for(&dns);

    for domain in ["[127.0.0.1]", "[IPv6:::1]", "bad_name.test", "a..test", ""] {
        let error = resolver.route(domain).await.unwrap_err();
        assert!(
            matches!(error, MxError::InvalidDomain { .. }),
            "{domain:?} gave {error:?}"
        );
        assert!(error.is_permanent(), "{domain:?}");
    }
    assert_eq!(dns.queries(), vec![], "invalid domains must not be queried");
}

#[tokio::test]
async fn mx_hosts_capped() {
    let mut zone = Zone::new();
    for index in 0..(MAX_MX_HOSTS + 5) {
        let host = format!("mx{index:02}.example.test");
        let preference = u16::try_from(index).unwrap() * 10;
        zone = zone
            .mx("example.test", preference, &host)
            .a(&host, Ipv4Addr::new(127, 0, 1, index as u8));
    }
    let dns = TestDns::start(zone).await;
    let resolver = resolver_for(&dns);

    let hosts = resolver.route("example.test").await.expect("route");

    let expected: Vec<String> = (0..MAX_MX_HOSTS)
        .map(|index| format!("mx{index:02}.example.test"))
        .collect();
    assert_eq!(names(&hosts), expected);
}

#[tokio::test]
async fn truncated_answer_retried_over_tcp() {
    // 60 MX records with long exchange names make an answer of about 3 KB,
    // more than the 1232-byte EDNS payload size that hickory-resolver 0.26
    // offers over UDP.
    let mut zone = Zone::new();
    for index in 0..60 {
        let host = format!("a-rather-long-mail-exchanger-name-{index:02}.example.test");
        zone = zone.mx("example.test", 10 + index, &host);
    }
    let zone = zone.a("a-rather-long-mail-exchanger-name-00.example.test", MX1_IP);
    let dns = TestDns::start(zone).await;
    let resolver = resolver_for(&dns);

    let hosts = resolver.route("example.test").await.expect("route");

    assert_eq!(
        names(&hosts),
        vec!["a-rather-long-mail-exchanger-name-00.example.test"]
    );
    let queries = dns.queries();
    assert!(
        queries.iter().any(|query| query.name == "example.test"
            && query.record_type == RecordType::MX
            && !query.over_tcp),
        "no MX query over UDP: {queries:?}"
    );
    assert!(
        queries.iter().any(|query| query.name == "example.test"
            && query.record_type == RecordType::MX
            && query.over_tcp),
        "no MX query over TCP: {queries:?}"
    );
}
