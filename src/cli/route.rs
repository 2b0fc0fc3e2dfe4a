//! `wsmtp route`: prints, without sending anything, what wsmtp would do with
//! each recipient of a transaction, and which rule or directory entry
//! decided it. DNS blocklists that rules name are queried like in a live
//! session, and their results printed.

use std::net::IpAddr;

use clap::Args;

use crate::config::Config;
use crate::directory::{Snapshot, load_snapshot, normalise_address};
use crate::policy::address::Address;
use crate::policy::dnsbl::{Blocklists, DnsblResults, Listing, OnError};
use crate::policy::{self, Action, DirectoryView, Route, SessionFacts, classify};
use crate::router::resolve::{
    ConfiguredRoutes, EnvelopeRecipient, MessageFacts, ResolveLimits, resolve_message,
};

#[derive(Args, Debug)]
pub struct RouteArgs {
    /// Client IP address of the simulated session.
    #[arg(long, value_name = "IP")]
    client: IpAddr,
    /// EHLO name the client sends.
    #[arg(long, value_name = "NAME", default_value = "")]
    helo: String,
    /// Account name the client authenticated as.
    #[arg(long, value_name = "ACCOUNT")]
    auth: Option<String>,
    /// The session uses TLS.
    #[arg(long)]
    tls: bool,
    /// Envelope sender; `<>` or an empty value for the null sender.
    #[arg(long = "from", value_name = "ADDRESS")]
    sender: String,
    /// Envelope recipients.
    #[arg(long = "to", value_name = "ADDRESS", required = true, num_args = 1..)]
    recipients: Vec<String>,
}

pub async fn run(config: Config, args: RouteArgs) -> anyhow::Result<()> {
    let snapshot = load_directory(&config).await;
    let view = match &snapshot {
        Some(snapshot) => DirectoryView::Ready(snapshot),
        None => DirectoryView::Absent,
    };
    let sender = args
        .sender
        .trim_start_matches('<')
        .trim_end_matches('>')
        .to_string();
    if let Some(directory) = &config.rules_directory {
        println!(
            "rules: {} rule(s) from {}",
            config.rules.rules().len(),
            directory.display()
        );
    }
    println!(
        "connection limits: class {}",
        config.rate_limits.class_for_client(args.client)
    );
    let dnsbl = check_blocklists(&config, args.client, &sender).await?;
    let session = SessionFacts {
        client: args.client,
        helo: &args.helo,
        auth: args.auth.as_deref(),
        tls: args.tls,
        sender: &sender,
        dnsbl: &dnsbl,
    };
    for text in &args.recipients {
        println!("{text}");
        let address = match Address::parse(text.trim_start_matches('<').trim_end_matches('>')) {
            Ok(address) => address,
            Err(error) => {
                println!("  invalid address: {error}");
                continue;
            }
        };
        let bare_postmaster = text
            .trim_start_matches('<')
            .trim_end_matches('>')
            .eq_ignore_ascii_case("postmaster");
        let decision = policy::decide(
            &config.relay,
            &config.rules,
            view,
            &session,
            &address,
            bare_postmaster,
        );
        println!(
            "  kind:     {}",
            classify(&config.relay, view, &address).as_str()
        );
        match &decision.action {
            Action::Accept(Route::Local) => {
                println!("  decision: accept into the queue for routing")
            }
            Action::Accept(Route::Group(group)) => {
                println!("  decision: pass through to group {group}")
            }
            Action::Reject(reply) => println!("  decision: reject with {}", reply.summary()),
        }
        println!("  rule:     {}", decision.rule);
        if let Action::Accept(_) = decision.action {
            let limits = &config.rate_limits;
            let class = decision
                .rate_limit
                .as_deref()
                .and_then(|name| limits.classes.get(name))
                .unwrap_or_else(|| limits.class_for_client(args.client));
            println!("  limits:   class {class}");
        }
        if let (Action::Accept(Route::Local), Some(snapshot)) = (&decision.action, &snapshot) {
            print_routing(&config, snapshot, &sender, &address);
        }
    }
    Ok(())
}

/// Looks the client and the sender domain up in the zones that rules name,
/// as a live session does, and prints each result.
async fn check_blocklists(
    config: &Config,
    client: IpAddr,
    sender: &str,
) -> anyhow::Result<DnsblResults> {
    let mut results = DnsblResults::new();
    let Some(blocklists) = Blocklists::from_config(config)? else {
        return Ok(results);
    };
    if blocklists.has_ip_zones() {
        let listings = blocklists.check_client(client).await;
        print_listings(config, "dnsbl", &client.to_string(), &listings);
        results.extend(listings);
    }
    if blocklists.has_domain_zones() {
        match sender.rsplit_once('@') {
            Some((_, domain)) => {
                let listings = blocklists.check_domain(domain).await;
                print_listings(config, "rhsbl", domain, &listings);
                results.extend(listings);
            }
            None => println!("rhsbl: not looked up for the null sender"),
        }
    }
    Ok(results)
}

fn print_listings(config: &Config, condition: &str, subject: &str, listings: &[(String, Listing)]) {
    for (zone, listing) in listings {
        let on_error = config
            .dnsbl
            .iter()
            .find(|configured| &configured.zone == zone)
            .map_or(OnError::Ignore, |configured| configured.on_error);
        let outcome = match listing {
            Listing::Listed {
                reason: Some(reason),
            } => format!("listed: {reason}"),
            Listing::Listed { reason: None } => "listed, without a TXT reason".to_string(),
            Listing::NotListed => "not listed".to_string(),
            Listing::Failed(error) => match on_error {
                OnError::Ignore => {
                    format!("lookup failed ({error}); counts as not listed (on_error: ignore)")
                }
                OnError::Tempfail => format!(
                    "lookup failed ({error}); rules naming it tempfail (on_error: tempfail)"
                ),
            },
        };
        println!("{condition}: {subject} in {zone}: {outcome}");
    }
}

/// Loads the directory from the queue database, or explains why not.
async fn load_directory(config: &Config) -> Option<Snapshot> {
    let settings = config.queue.as_ref()?;
    let connected = tokio_postgres::connect(&settings.database.url, tokio_postgres::NoTls).await;
    let (mut client, connection) = match connected {
        Ok(pair) => pair,
        Err(error) => {
            println!(
                "directory: not loaded ({}); decisions use the configuration only",
                crate::queue::describe_database_error(&error)
            );
            return None;
        }
    };
    tokio::spawn(connection);
    match load_snapshot(&mut client).await {
        Ok(snapshot) => {
            println!(
                "directory: {} account(s), {} list(s)",
                snapshot.accounts.len(),
                snapshot.lists.len()
            );
            Some(snapshot)
        }
        Err(error) => {
            println!("directory: not loaded ({error}); decisions use the configuration only");
            None
        }
    }
}

/// Prints what the router would make of a locally routed recipient.
fn print_routing(config: &Config, snapshot: &Snapshot, sender: &str, address: &Address) {
    let delivered_to = std::collections::HashSet::new();
    let facts = MessageFacts {
        sender,
        delivered_to: &delivered_to,
    };
    let recipient = EnvelopeRecipient {
        id: 0,
        address: normalise_address(&address.to_smtp()),
        route_group: None,
        orcpt: None,
        notify: None,
    };
    let routing = resolve_message(
        snapshot,
        &facts,
        &[recipient],
        ResolveLimits {
            max_depth: config.router.max_depth,
        },
        ConfiguredRoutes {
            relay_domains: &config.relay.relay_domains,
            outbound_group: config.relay.outbound_group.as_deref(),
        },
    );
    for delivery in &routing.deliveries {
        let from = if delivery.sender.is_empty() {
            "<>".to_string()
        } else {
            delivery.sender.clone()
        };
        println!(
            "  delivery: {} {} to {} from {} ({})",
            delivery.kind.as_str(),
            delivery.address,
            delivery.destination,
            from,
            delivery.trace
        );
    }
    for planned in &routing.auto_replies {
        println!("  auto-reply: from {}", planned.address);
    }
    for outcome in &routing.outcomes {
        if let Some(failure) = &outcome.failure {
            println!("  routing fails: {failure} (the sender gets a bounce)");
        }
    }
    for event in &routing.events {
        println!("  note: {event}");
    }
}
