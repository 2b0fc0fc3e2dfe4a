use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::*;

fn name(value: &str) -> Domain {
    Domain::Name(value.to_owned())
}

fn v4(a: u8, b: u8, c: u8, d: u8) -> Domain {
    Domain::Literal(IpAddr::V4(Ipv4Addr::new(a, b, c, d)))
}

fn v6(text: &str) -> Domain {
    let ip: Ipv6Addr = text.parse().expect("test IPv6 address is valid");
    Domain::Literal(IpAddr::V6(ip))
}

/// Each relay trick as the command parser hands it over, with the local part,
/// domain and routing flag that the relay decision must see.
#[test]
fn relay_tricks_normalise() {
    let cases: Vec<(&str, &str, Domain, bool)> = vec![
        // Source route, already removed by the command parser.
        ("user@foreign.org", "user", name("foreign.org"), false),
        // '%' hack.
        (
            "user%foreign.org@example.com",
            "user%foreign.org",
            name("example.com"),
            true,
        ),
        // '!' path.
        (
            "foreign.org!user@example.com",
            "foreign.org!user",
            name("example.com"),
            true,
        ),
        // Quoted local parts arrive unquoted: "user@foreign.org"@example.com.
        (
            "user@foreign.org@example.com",
            "user@foreign.org",
            name("example.com"),
            true,
        ),
        ("a%b@example.com", "a%b", name("example.com"), true),
        ("a b@example.com", "a b", name("example.com"), false),
        // IP literals.
        ("user@[192.0.2.1]", "user", v4(192, 0, 2, 1), false),
        ("user@[IPv6:2001:db8::1]", "user", v6("2001:db8::1"), false),
        (
            "user@[ipv6:2001:DB8:0:0:0:0:0:1]",
            "user",
            v6("2001:db8::1"),
            false,
        ),
        (
            "user@[IPV6:::ffff:192.0.2.1]",
            "user",
            v4(192, 0, 2, 1),
            false,
        ),
        // Trailing dot and letter case.
        ("user@example.com.", "user", name("example.com"), false),
        ("USER@EXAMPLE.COM", "USER", name("example.com"), false),
        (
            "PostMaster@Example.Com",
            "PostMaster",
            name("example.com"),
            false,
        ),
        // IDNA forms of one domain.
        (
            "user@exämple.com",
            "user",
            name("xn--exmple-cua.com"),
            false,
        ),
        (
            "user@xn--exmple-cua.com",
            "user",
            name("xn--exmple-cua.com"),
            false,
        ),
        (
            "user@XN--EXMPLE-CUA.COM",
            "user",
            name("xn--exmple-cua.com"),
            false,
        ),
        (
            "user@EXÄMPLE.COM",
            "user",
            name("xn--exmple-cua.com"),
            false,
        ),
        (
            "user@exa\u{308}mple.com",
            "user",
            name("xn--exmple-cua.com"),
            false,
        ),
        // Full-width, ideographic and half-width ideographic full stops.
        (
            "user@example\u{ff0e}com",
            "user",
            name("example.com"),
            false,
        ),
        (
            "user@example\u{3002}com",
            "user",
            name("example.com"),
            false,
        ),
        (
            "user@example\u{ff61}com",
            "user",
            name("example.com"),
            false,
        ),
        (
            "user@example.com\u{3002}",
            "user",
            name("example.com"),
            false,
        ),
        // Full-width letters map to ASCII.
        (
            "user@\u{ff45}xample.com",
            "user",
            name("example.com"),
            false,
        ),
        // SMTPUTF8 local part.
        ("jöran@example.com", "jöran", name("example.com"), false),
    ];

    for (raw, local_part, domain, routing) in cases {
        let address = Address::parse(raw).unwrap_or_else(|e| panic!("{raw:?} rejected: {e}"));
        assert_eq!(address.local_part(), local_part, "local part of {raw:?}");
        assert_eq!(address.domain(), &domain, "domain of {raw:?}");
        assert_eq!(
            address.has_routing_characters(),
            routing,
            "routing flag of {raw:?}"
        );
    }
}

#[test]
fn address_rejects_invalid_input() {
    let long_local = format!("{}@example.com", "a".repeat(65));
    let long_address = format!("{}@{}.com", "a".repeat(60), "b".repeat(200));

    let cases: Vec<(&str, AddressError)> = vec![
        ("", AddressError::Empty),
        (
            "user",
            AddressError::MissingDomain {
                address: "user".into(),
            },
        ),
        (
            "@example.com",
            AddressError::EmptyLocalPart {
                address: "@example.com".into(),
            },
        ),
        (
            &long_local,
            AddressError::LocalPartTooLong {
                local_part: "a".repeat(65),
                length: 65,
            },
        ),
        (
            &long_address,
            AddressError::TooLong {
                address: long_address.clone(),
                length: long_address.len(),
            },
        ),
        (
            "user@[192.0.2.1",
            AddressError::InvalidLiteral {
                literal: "[192.0.2.1".into(),
            },
        ),
        (
            "user@[::1]",
            AddressError::InvalidLiteral {
                literal: "[::1]".into(),
            },
        ),
        (
            "user@[IPv6:192.0.2.1]",
            AddressError::InvalidLiteral {
                literal: "[IPv6:192.0.2.1]".into(),
            },
        ),
        (
            "user@[192.0.2.01]",
            AddressError::InvalidLiteral {
                literal: "[192.0.2.01]".into(),
            },
        ),
        (
            "user@[0x7f.0.0.1]",
            AddressError::InvalidLiteral {
                literal: "[0x7f.0.0.1]".into(),
            },
        ),
        (
            "user@[127.1]",
            AddressError::InvalidLiteral {
                literal: "[127.1]".into(),
            },
        ),
        (
            "user@[IPv6:fe80::1%eth0]",
            AddressError::InvalidLiteral {
                literal: "[IPv6:fe80::1%eth0]".into(),
            },
        ),
        (
            "user@[ 192.0.2.1]",
            AddressError::InvalidLiteral {
                literal: "[ 192.0.2.1]".into(),
            },
        ),
        (
            "user@[x-tag:abc]",
            AddressError::InvalidLiteral {
                literal: "[x-tag:abc]".into(),
            },
        ),
        (
            "user@[IPv6ä]",
            AddressError::InvalidLiteral {
                literal: "[IPv6ä]".into(),
            },
        ),
        (
            "user@[]",
            AddressError::InvalidLiteral {
                literal: "[]".into(),
            },
        ),
        (
            "user@[192.0.2.1].",
            AddressError::InvalidLiteral {
                literal: "[192.0.2.1].".into(),
            },
        ),
        (
            "us\ner@example.com",
            AddressError::ControlCharacter {
                value: "us\ner@example.com".into(),
            },
        ),
        (
            "user@exa\tmple.com",
            AddressError::ControlCharacter {
                value: "user@exa\tmple.com".into(),
            },
        ),
        (
            "user\u{7f}@example.com",
            AddressError::ControlCharacter {
                value: "user\u{7f}@example.com".into(),
            },
        ),
        (
            "user\0@example.com",
            AddressError::ControlCharacter {
                value: "user\0@example.com".into(),
            },
        ),
    ];

    for (raw, expected) in cases {
        assert_eq!(Address::parse(raw), Err(expected), "parse {raw:?}");
    }
}

/// Domain spellings that must be rejected, whether from an address or from
/// configuration.
#[test]
fn domain_rejects_invalid_names() {
    let long_label = format!("{}.com", "a".repeat(64));
    let long_name = format!("{}.com", vec!["a".repeat(63); 4].join("."));

    let cases: Vec<&str> = vec![
        "",
        ".",
        "example.com..",
        "example..com",
        ".example.com",
        "192.0.2.1",
        "192.0.2.1.",
        "3221225985",
        "127.1",
        "example.123",
        "-example.com",
        "example-.com",
        "exa_mple.com",
        "exa mple.com",
        " example.com",
        "example.com%foreign.org",
        "foreign.org!example.com",
        "example.com:25",
        "example.com/x",
        "xn--zz-.com",
        "xn--a.com",
        &long_label,
        &long_name,
    ];

    for raw in cases {
        let result = Domain::parse(raw);
        assert!(
            matches!(result, Err(AddressError::InvalidDomain { ref domain, .. }) if domain == raw),
            "Domain::parse({raw:?}) returned {result:?}, expected InvalidDomain",
        );
    }
}

#[test]
fn domain_accepts_boundary_lengths() {
    let label_63 = format!("{}.com", "a".repeat(63));
    assert_eq!(Domain::parse(&label_63), Ok(name(&label_63)));

    // 3 * 64 + 61 = 253 octets.
    let name_253 = format!("{}.{}", vec!["a".repeat(63); 3].join("."), "b".repeat(61));
    assert_eq!(name_253.len(), 253);
    assert_eq!(Domain::parse(&name_253), Ok(name(&name_253)));

    let name_254 = format!("{}.{}", vec!["a".repeat(63); 3].join("."), "b".repeat(62));
    assert!(Domain::parse(&name_254).is_err(), "254-octet name accepted");

    // A trailing dot does not count towards the limit.
    assert_eq!(Domain::parse(&format!("{name_253}.")), Ok(name(&name_253)));
}

#[test]
fn domain_accepts_config_forms() {
    let cases: Vec<(&str, Domain)> = vec![
        ("localhost", name("localhost")),
        ("Example.COM.", name("example.com")),
        ("mail-1.example.com", name("mail-1.example.com")),
        ("1.example.com", name("1.example.com")),
        ("123.example.com", name("123.example.com")),
        ("exämple.com", name("xn--exmple-cua.com")),
        ("straße.de", name("xn--strae-oqa.de")),
        ("[192.0.2.1]", v4(192, 0, 2, 1)),
        ("[IPv6:::1]", v6("::1")),
    ];

    for (raw, expected) in cases {
        assert_eq!(Domain::parse(raw), Ok(expected), "Domain::parse({raw:?})");
    }
}

#[test]
fn domain_rejects_control_characters() {
    assert_eq!(
        Domain::parse("example.com\r\n"),
        Err(AddressError::ControlCharacter {
            value: "example.com\r\n".into()
        })
    );
}

#[test]
fn domain_as_name_and_display() {
    assert_eq!(name("example.com").as_name(), Some("example.com"));
    assert_eq!(v4(192, 0, 2, 1).as_name(), None);

    assert_eq!(name("example.com").to_string(), "example.com");
    assert_eq!(v4(192, 0, 2, 1).to_string(), "[192.0.2.1]");
    assert_eq!(v6("2001:db8::1").to_string(), "[IPv6:2001:db8::1]");
}

#[test]
fn equal_domains_compare_equal() {
    let spellings = [
        "user@example.com",
        "user@EXAMPLE.COM",
        "user@example.com.",
        "user@example\u{3002}com",
    ];
    let first = Address::parse(spellings[0]).expect("plain address is valid");
    for raw in &spellings[1..] {
        let other = Address::parse(raw).unwrap_or_else(|e| panic!("{raw:?} rejected: {e}"));
        assert_eq!(other, first, "{raw:?}");
    }
}

#[test]
fn postmaster_matches_any_case() {
    for raw in [
        "postmaster@example.com",
        "POSTMASTER@example.com",
        "PostMaster@[192.0.2.1]",
    ] {
        let address = Address::parse(raw).expect("postmaster address is valid");
        assert!(address.is_postmaster(), "{raw:?}");
    }
    for raw in [
        "postmaster2@example.com",
        "post.master@example.com",
        "postmaster@x@example.com",
    ] {
        let address = Address::parse(raw).expect("address is valid");
        assert!(!address.is_postmaster(), "{raw:?}");
    }
}

/// `to_smtp` output for local parts as the command parser hands them over.
#[test]
fn to_smtp_quotes_when_needed() {
    let cases = [
        ("a.b@x.org", "a.b@x.org"),
        ("a b@x.org", "\"a b\"@x.org"),
        ("a..b@x.org", "\"a..b\"@x.org"),
        (".a@x.org", "\".a\"@x.org"),
        ("a.@x.org", "\"a.\"@x.org"),
        ("a\"b@x.org", "\"a\\\"b\"@x.org"),
        ("a\\b@x.org", "\"a\\\\b\"@x.org"),
        ("a@b@x.org", "\"a@b\"@x.org"),
        ("a(b)@x.org", "\"a(b)\"@x.org"),
        ("user+tag@x.org", "user+tag@x.org"),
        ("!#$%&'*+-/=?^_`{|}~@x.org", "!#$%&'*+-/=?^_`{|}~@x.org"),
        ("jöran@x.org", "jöran@x.org"),
        ("USER@EXÄMPLE.COM", "USER@xn--exmple-cua.com"),
        ("user@[192.0.2.1]", "user@[192.0.2.1]"),
        ("user@[ipv6:2001:DB8::1]", "user@[IPv6:2001:db8::1]"),
    ];

    for (raw, expected) in cases {
        let address = Address::parse(raw).unwrap_or_else(|e| panic!("{raw:?} rejected: {e}"));
        assert_eq!(address.to_smtp(), expected, "to_smtp of {raw:?}");
        assert_eq!(address.to_string(), expected, "Display of {raw:?}");
    }
}

/// Removing the quoting of `to_smtp` output, as the command parser does, gives
/// back the same address.
#[test]
fn to_smtp_round_trips() {
    for raw in [
        "a.b@x.org",
        "a b@x.org",
        "a..b@x.org",
        "a\"b@x.org",
        "a\\b@x.org",
        "a@b@x.org",
    ] {
        let address = Address::parse(raw).expect("address is valid");
        let written = address.to_smtp();
        let reparsed = Address::parse(&unquote(&written)).expect("unquoted output is valid");
        assert_eq!(reparsed, address, "{raw:?} written as {written:?}");
    }
}

/// Removes the quotes and backslash escapes of a quoted local part.
fn unquote(written: &str) -> String {
    let Some(rest) = written.strip_prefix('"') else {
        return written.to_owned();
    };
    let mut out = String::new();
    let mut chars = rest.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.extend(chars.next()),
            '"' => break,
            _ => out.push(c),
        }
    }
    out.extend(chars);
    out
}

#[test]
fn error_messages_name_the_value() {
    let error = Address::parse("user@exa_mple.com").expect_err("underscore is invalid");
    let message = error.to_string();
    assert!(message.contains("\"exa_mple.com\""), "{message}");
    assert!(message.contains("'_'"), "{message}");

    let error = Address::parse("us\ner@x.org").expect_err("newline is invalid");
    assert!(error.to_string().contains("us\\ner@x.org"), "{error}");

    let error = Address::parse("user@[1.2.3]").expect_err("three octets are invalid");
    assert!(error.to_string().contains("[1.2.3]"), "{error}");
}

/// An IP address written without brackets must not reach the relay decision
/// as a domain name.
#[test]
fn bare_ip_domain_rejected() {
    for raw in [
        "user@192.0.2.1",
        "user@192.0.2.1.",
        "user@192\u{3002}0.2.1",
        "user@3221225985",
    ] {
        let result = Address::parse(raw);
        assert!(
            matches!(result, Err(AddressError::InvalidDomain { .. })),
            "Address::parse({raw:?}) returned {result:?}, expected InvalidDomain",
        );
    }
}
