//! `wsmtp migrate` and `wsmtp queue …`: thin wrappers that parse the
//! arguments, call the queue library and print the results as text or JSON.

use std::io::Read as _;
use std::time::Duration;

use anyhow::Context as _;
use clap::{ArgGroup, Args, Subcommand};
use time::OffsetDateTime;

use crate::config::Config;
use crate::delivery::notify::NotificationSettings;
use crate::queue::{
    AGE_BUCKET_MINUTES, DestinationState, ListFilter, ListState, MessageDetail, MessageSummary,
    Queue, QueueId, QueueStats, Target,
};

#[derive(Subcommand, Debug)]
pub enum QueueCommand {
    /// List queued messages, oldest first.
    List(ListArgs),
    /// Show one message: envelope, hold, recipients, deliveries with their
    /// attempts and leases, and the state of their destinations.
    Show {
        /// Queue id, as printed by `queue list` or in the 250 reply.
        id: String,
        /// Also print the stored message content.
        #[arg(long, conflicts_with = "json")]
        body: bool,
        /// Print the message as a JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Make deferred deliveries due now and wake the delivery workers.
    /// Deliveries that a worker is delivering are left alone.
    Retry(TargetArgs),
    /// Hold messages or a destination: no new delivery starts until `queue
    /// release`. Deliveries in progress finish their attempt.
    Hold(TargetArgs),
    /// Release held messages or destinations and make their deliveries due
    /// now.
    Release(TargetArgs),
    /// Delete messages: silently, or with --bounce after telling the
    /// sender that the recipients not yet delivered were not.
    Delete {
        /// Queue ids; `-` reads whitespace-separated ids from standard input.
        #[arg(required = true, value_name = "ID")]
        ids: Vec<String>,
        /// Send a failure notification (from <>) for every recipient not yet
        /// delivered before deleting.
        #[arg(long)]
        bounce: bool,
    },
    /// Count messages and deliveries and show the destinations with the most
    /// pending deliveries, their backoff and the age of their mail.
    Stats {
        /// Number of destinations shown; 0 shows all.
        #[arg(long, default_value_t = 20, value_name = "N")]
        top: i64,
        /// Print the statistics as a JSON object.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Debug)]
pub struct ListArgs {
    /// Only messages in this state: receiving (body still arriving), ready
    /// (received and not held), held, or deferred (a pending delivery was
    /// attempted before).
    #[arg(long, value_parser = ["receiving", "ready", "held", "deferred"])]
    state: Option<String>,
    /// Only messages with a pending delivery to this destination: a full
    /// name such as domain:example.org or group:legacy, or a bare domain or
    /// group name.
    #[arg(long, value_name = "DESTINATION")]
    destination: Option<String>,
    /// Only messages received longer ago than this, e.g. 30s, 5m, 2h or 5d.
    #[arg(long, value_name = "DURATION", value_parser = parse_age)]
    older_than: Option<Duration>,
    /// Only messages from this sender (case-insensitive); @example.org
    /// matches a domain, <> or an empty value the null sender.
    #[arg(long, value_name = "ADDRESS")]
    sender: Option<String>,
    /// Only messages with this envelope recipient or delivery address
    /// (case-insensitive); @example.org matches a domain.
    #[arg(long, value_name = "ADDRESS")]
    recipient: Option<String>,
    /// Maximum number of messages shown; 0 shows all.
    #[arg(long, default_value_t = 100, value_name = "N")]
    limit: i64,
    /// Print the messages as a JSON array.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
#[command(group(ArgGroup::new("target").required(true).args(["ids", "destination", "all"])))]
pub struct TargetArgs {
    /// Queue ids; `-` reads whitespace-separated ids from standard input.
    #[arg(value_name = "ID")]
    ids: Vec<String>,
    /// A destination instead of messages: a full name such as
    /// domain:example.org or group:legacy, or a bare domain or group name.
    #[arg(long, value_name = "DESTINATION")]
    destination: Option<String>,
    /// Every message (and for retry and release every destination).
    #[arg(long)]
    all: bool,
}

fn parse_age(text: &str) -> Result<Duration, String> {
    crate::config::parse_duration(text)
        .ok_or_else(|| format!("invalid duration {text:?}; expected a number with s, m, h or d"))
}

pub(super) fn open_queue(config: &Config) -> anyhow::Result<Queue> {
    let settings = config.queue.as_ref().context(
        "no queue configured: add a queue section to the configuration or set DATABASE_URL",
    )?;
    Ok(Queue::new(&settings.database)?)
}

pub async fn migrate(config: Config) -> anyhow::Result<()> {
    let queue = open_queue(&config)?;
    queue.migrate().await?;
    super::serve::seed_domains(&queue, &config).await?;
    println!("queue database is up to date");
    Ok(())
}

pub async fn run(config: Config, command: QueueCommand) -> anyhow::Result<()> {
    let queue = open_queue(&config)?;
    match command {
        QueueCommand::List(args) => list(&queue, args).await,
        QueueCommand::Show { id, body, json } => show(&queue, &id, body, json).await,
        QueueCommand::Retry(args) => retry(&queue, args).await,
        QueueCommand::Hold(args) => hold(&queue, args).await,
        QueueCommand::Release(args) => release(&queue, args).await,
        QueueCommand::Delete { ids, bounce: false } => delete(&queue, &ids).await,
        QueueCommand::Delete { ids, bounce: true } => {
            bounce_and_delete(&queue, &config, &ids).await
        }
        QueueCommand::Stats { top, json } => stats(&queue, top, json).await,
    }
}

async fn list(queue: &Queue, args: ListArgs) -> anyhow::Result<()> {
    let filter = ListFilter {
        state: args
            .state
            .as_deref()
            .map(str::parse::<ListState>)
            .transpose()?,
        destination: args.destination,
        older_than: args.older_than,
        sender: args.sender,
        recipient: args.recipient,
        limit: args.limit,
    };
    let messages = queue.list(&filter).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&messages)?);
        return Ok(());
    }
    println!(
        "{:<32}  {:<9}  {:<8}  {:>10}  {:>5}  {:>7}  {:>8}  {:<20}  sender",
        "queue id", "state", "hold", "size", "rcpts", "pending", "deferred", "received"
    );
    for message in &messages {
        println!(
            "{:<32}  {:<9}  {:<8}  {:>10}  {:>5}  {:>7}  {:>8}  {:<20}  <{}>",
            message.id.simple(),
            message.state,
            hold_column(message),
            message
                .size
                .map(|s| s.to_string())
                .unwrap_or_else(|| "-".to_string()),
            message.recipient_count,
            message.pending_deliveries,
            message.deferred_deliveries,
            format_list_time(message.received_at),
            message.sender
        );
    }
    println!("{} message(s)", messages.len());
    Ok(())
}

/// `message` when the message is held, `dest` when a pending delivery's
/// destination is held, `msg+dest` for both.
fn hold_column(message: &MessageSummary) -> &'static str {
    match (message.held, message.held_destination_deliveries > 0) {
        (true, true) => "msg+dest",
        (true, false) => "message",
        (false, true) => "dest",
        (false, false) => "-",
    }
}

async fn show(queue: &Queue, id: &str, body: bool, json: bool) -> anyhow::Result<()> {
    let id = parse_id(id)?;
    let Some(message) = queue.show(id).await? else {
        anyhow::bail!("message {} not found in the queue", id.simple());
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&message)?);
        return Ok(());
    }
    print_message(&message);
    if body {
        let content = queue.read_body(id).await?;
        println!("content ({} octets):", content.len());
        println!("{}", String::from_utf8_lossy(&content));
    }
    Ok(())
}

fn print_message(message: &MessageDetail) {
    println!("queue id:    {}", message.id.simple());
    println!("state:       {}", message.state);
    println!(
        "held:        {}",
        if message.held {
            "yes (release with `wsmtp queue release`)"
        } else {
            "no"
        }
    );

    println!("received:    {}", format_time(message.received_at));
    println!("client:      [{}] helo={}", message.client_ip, message.helo);
    println!("sender:      <{}>", message.sender);
    println!(
        "size:        {}",
        message
            .size
            .map(|s| s.to_string())
            .unwrap_or_else(|| "-".to_string())
    );
    println!(
        "chunks:      {}",
        message
            .chunk_count
            .map(|c| c.to_string())
            .unwrap_or_else(|| "-".to_string())
    );
    println!(
        "parameters:  smtputf8={} body={} ret={} envid={}",
        message.smtputf8,
        message.body_type.as_deref().unwrap_or("-"),
        message.dsn_ret.as_deref().unwrap_or("-"),
        message.dsn_envid.as_deref().unwrap_or("-")
    );

    println!("recipients:");
    for recipient in &message.recipients {
        let route = match &recipient.route_group {
            Some(group) => format!("group {group}"),
            None => "local".to_string(),
        };
        println!(
            "  <{}>  route={}  state={}  attempts={}  notify={}  orcpt={}  last_reply={}",
            recipient.address,
            route,
            recipient.state,
            recipient.attempts,
            recipient.notify.as_deref().unwrap_or("-"),
            recipient.orcpt.as_deref().unwrap_or("-"),
            recipient.last_reply.as_deref().unwrap_or("-")
        );
    }
    for recipient in &message.recipients {
        if let Some(resolution) = &recipient.resolution {
            println!("  <{}> resolved to: {resolution}", recipient.address);
        }
    }
    print_deliveries(message);
}

fn print_deliveries(message: &MessageDetail) {
    if message.deliveries.is_empty() {
        return;
    }
    println!("deliveries:");
    let mut batch = None;
    for delivery in &message.deliveries {
        if batch != Some(delivery.batch_id) {
            batch = Some(delivery.batch_id);
            println!(
                "  batch {}  {}  sender=<{}>",
                delivery.batch_id, delivery.destination, delivery.sender
            );
        }
        let next = if delivery.state == "pending" {
            format!("  next={}", format_time(delivery.next_attempt_at))
        } else {
            String::new()
        };
        println!(
            "    <{}>  {}  state={}  attempts={}{}  via {}",
            delivery.address,
            delivery.kind,
            delivery.state,
            delivery.attempts,
            next,
            delivery.trace
        );
        if let Some(reply) = &delivery.last_reply {
            let at = delivery
                .last_attempt_at
                .map(format_time)
                .unwrap_or_else(|| "-".to_string());
            let from = delivery.remote_mta.as_deref().unwrap_or("-");
            println!("      last reply at {at} from {from}: {reply}");
        }
        if let Some(lease) = &delivery.lease {
            println!(
                "      in progress: leased by {} until {}",
                lease.owner,
                format_time(lease.until)
            );
        }
    }
    if !message.destinations.is_empty() {
        println!("destinations:");
        for destination in &message.destinations {
            println!("  {}", describe_destination(destination));
        }
    }
}

/// Formats a destination's hold and backoff as one line.
fn describe_destination(destination: &DestinationState) -> String {
    let mut line = format!(
        "{}  held={}  failures={}  next attempt {}",
        destination.name,
        if destination.held { "yes" } else { "no" },
        destination.failures,
        format_time(destination.next_attempt_at)
    );
    if let Some(error) = &destination.last_error {
        line.push_str(&format!("  last error: {error}"));
    }
    line
}

async fn retry(queue: &Queue, args: TargetArgs) -> anyhow::Result<()> {
    let outcome = queue.retry(&target(args)?).await?;
    warn_missing(&outcome.missing);
    println!("made {} delivery(ies) due now", outcome.deliveries);
    if !outcome.destinations.is_empty() {
        println!(
            "reset the next attempt time of destination(s): {}",
            outcome.destinations.join(", ")
        );
    }
    if outcome.leased > 0 {
        println!(
            "note: {} delivery(ies) in progress were left alone",
            outcome.leased
        );
    }
    if outcome.held_messages > 0 {
        println!(
            "note: {} message(s) stay held; `wsmtp queue release` delivers them",
            outcome.held_messages
        );
    }
    print_blocked_destinations(&outcome.blocked_destinations);
    Ok(())
}

async fn hold(queue: &Queue, args: TargetArgs) -> anyhow::Result<()> {
    let by_id = !args.ids.is_empty();
    let outcome = queue.hold(&target(args)?).await?;
    warn_missing(&outcome.missing);
    if by_id || outcome.destinations.is_empty() {
        print!("held {} message(s)", outcome.messages);
        if outcome.already_held > 0 {
            print!(" ({} held already)", outcome.already_held);
        }
        println!();
    }
    for name in &outcome.destinations {
        println!("held destination {name}");
    }
    if outcome.in_flight > 0 {
        println!(
            "note: {} delivery(ies) in progress finish their current attempt",
            outcome.in_flight
        );
    }
    Ok(())
}

async fn release(queue: &Queue, args: TargetArgs) -> anyhow::Result<()> {
    let by_destination = args.destination.clone();
    let outcome = queue.release(&target(args)?).await?;
    warn_missing(&outcome.missing);
    match &by_destination {
        Some(name) if outcome.destinations.is_empty() => {
            println!("no held destination matches {name}");
        }
        Some(_) => {}
        None => println!("released {} message(s)", outcome.messages),
    }
    for name in &outcome.destinations {
        println!("released destination {name}");
    }
    println!("made {} delivery(ies) due now", outcome.deliveries);
    print_blocked_destinations(&outcome.blocked_destinations);
    Ok(())
}

/// Notes destinations that keep deliveries waiting after a retry or
/// release.
fn print_blocked_destinations(destinations: &[crate::queue::DestinationState]) {
    for destination in destinations {
        if destination.held {
            println!(
                "note: destination {} is held; `wsmtp queue release --destination {}` delivers to it",
                destination.name, destination.name
            );
        } else {
            println!(
                "note: destination {} waits until {} after {} failure(s); `wsmtp queue retry --destination {}` resets it",
                destination.name,
                format_time(destination.next_attempt_at),
                destination.failures,
                destination.name
            );
        }
    }
}

async fn delete(queue: &Queue, ids: &[String]) -> anyhow::Result<()> {
    let ids = parse_ids(ids)?;
    let outcome = queue.delete(&ids).await?;
    warn_missing(&outcome.missing);
    println!("deleted {} message(s)", outcome.deleted.len());
    if outcome.in_flight > 0 {
        println!(
            "note: {} delivery(ies) were in progress and may still complete",
            outcome.in_flight
        );
    }
    Ok(())
}

async fn bounce_and_delete(queue: &Queue, config: &Config, ids: &[String]) -> anyhow::Result<()> {
    let ids = parse_ids(ids)?;
    let mut settings = NotificationSettings::new(config.hostname.clone());
    settings.return_limit = config.delivery.bounce_return_limit;
    if let Some(queue_settings) = &config.queue {
        settings.chunk_size = queue_settings.database.chunk_size;
    }
    let outcome = crate::delivery::store::bounce_and_delete(queue, &settings, &ids).await?;
    warn_missing(&outcome.missing);
    println!(
        "deleted {} message(s); {} notification(s) spooled for {} recipient(s)",
        outcome.deleted.len(),
        outcome.notifications,
        outcome.bounced
    );
    Ok(())
}

async fn stats(queue: &Queue, top: i64, json: bool) -> anyhow::Result<()> {
    let stats = queue.stats(top).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&stats)?);
        return Ok(());
    }
    print_stats(&stats);
    Ok(())
}

fn print_stats(stats: &QueueStats) {
    let oldest = match stats.oldest_received_at {
        Some(at) => format!(
            "oldest received {} ({} ago)",
            format_list_time(at),
            format_age(stats.now - at)
        ),
        None => "queue empty".to_string(),
    };
    println!(
        "messages:      receiving {}  ready {}  held {}  ({oldest})",
        stats.messages_receiving, stats.messages_ready, stats.messages_held
    );
    println!(
        "recipients:    {} awaiting routing",
        stats.recipients_awaiting_routing
    );
    let d = &stats.deliveries;
    println!(
        "deliveries:    pending {}  due {}  deferred {}  in flight {}  held {}",
        d.pending, d.due, d.deferred, d.leased, d.held
    );
    println!(
        "destinations:  {} known  {} backed off  {} held",
        stats.destinations, stats.destinations_backed_off, stats.destinations_held
    );
    if stats.top_destinations.is_empty() {
        return;
    }

    let width = stats
        .top_destinations
        .iter()
        .map(|s| s.name.len())
        .max()
        .unwrap_or(0)
        .max("destination".len());
    println!();
    println!(
        "{:<width$}  {:>7}  {:>5}  {:>8}  {:>9}  {:>5}  {:>8}  {:<20}  last error",
        "destination",
        "pending",
        "due",
        "deferred",
        "in flight",
        "held",
        "failures",
        "next attempt"
    );
    for destination in &stats.top_destinations {
        let counts = &destination.deliveries;
        // A held destination shows `held` as its next attempt; one without
        // a row yet is due.
        let (failures, next, error) = match &destination.state {
            Some(state) => (
                state.failures.to_string(),
                if state.held {
                    "held".to_string()
                } else if state.next_attempt_at > stats.now {
                    format_list_time(state.next_attempt_at)
                } else {
                    "now".to_string()
                },
                state.last_error.as_deref().unwrap_or("-"),
            ),
            None => ("0".to_string(), "now".to_string(), "-"),
        };
        println!(
            "{:<width$}  {:>7}  {:>5}  {:>8}  {:>9}  {:>5}  {:>8}  {:<20}  {}",
            destination.name,
            counts.pending,
            counts.due,
            counts.deferred,
            counts.leased,
            counts.held,
            failures,
            next,
            error
        );
    }

    // The age table of qshape: pending deliveries by message age in minutes.
    println!();
    let mut header = format!("{:<width$}  {:>6}", "age in minutes", "total");
    for minutes in AGE_BUCKET_MINUTES {
        header.push_str(&format!("  {:>5}", format!("<{minutes}")));
    }
    header.push_str(&format!(
        "  {:>6}",
        format!("{}+", AGE_BUCKET_MINUTES[AGE_BUCKET_MINUTES.len() - 1])
    ));
    println!("{header}");
    for destination in &stats.top_destinations {
        let mut line = format!(
            "{:<width$}  {:>6}",
            destination.name, destination.deliveries.pending
        );
        let (last, rest) = destination
            .age_buckets
            .split_last()
            .expect("one bucket more than the bounds");
        for count in rest {
            line.push_str(&format!("  {count:>5}"));
        }
        line.push_str(&format!("  {last:>6}"));
        println!("{line}");
    }
}

/// Builds the target of retry, hold and release from its exclusive options.
fn target(args: TargetArgs) -> anyhow::Result<Target> {
    if args.all {
        Ok(Target::All)
    } else if let Some(destination) = args.destination {
        Ok(Target::Destination(destination))
    } else {
        Ok(Target::Messages(parse_ids(&args.ids)?))
    }
}

/// Parses queue ids; `-` stands for the ids on standard input.
fn parse_ids(args: &[String]) -> anyhow::Result<Vec<QueueId>> {
    let mut ids = Vec::new();
    for arg in args {
        if arg == "-" {
            let mut input = String::new();
            std::io::stdin()
                .read_to_string(&mut input)
                .context("cannot read queue ids from standard input")?;
            for word in input.split_whitespace() {
                ids.push(parse_id(word)?);
            }
        } else {
            ids.push(parse_id(arg)?);
        }
    }
    if ids.is_empty() {
        anyhow::bail!("no queue ids given");
    }
    Ok(ids)
}

fn parse_id(text: &str) -> anyhow::Result<QueueId> {
    uuid::Uuid::parse_str(text).with_context(|| {
        format!("invalid queue id {text:?}; expected the 32 hex digits that `queue list` prints")
    })
}

fn warn_missing(missing: &[QueueId]) {
    for id in missing {
        eprintln!("warning: message {} not found in the queue", id.simple());
    }
}

/// `2026-12-04T21:42:13Z`: seconds are enough in a listing.
fn format_list_time(time: OffsetDateTime) -> String {
    let format =
        time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]Z");
    time.to_offset(time::UtcOffset::UTC)
        .format(&format)
        .unwrap_or_else(|_| time.to_string())
}

fn format_time(time: OffsetDateTime) -> String {
    time.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| time.to_string())
}

/// `3d4h`, `2h5m`, `7m12s` or `40s`: the two largest units.
fn format_age(age: time::Duration) -> String {
    let seconds = age.whole_seconds().max(0);
    let (days, hours, minutes) = (seconds / 86_400, seconds / 3600 % 24, seconds / 60 % 60);
    if days > 0 {
        format!("{days}d{hours}h")
    } else if hours > 0 {
        format!("{hours}h{minutes}m")
    } else if minutes > 0 {
        format!("{minutes}m{}s", seconds % 60)
    } else {
        format!("{seconds}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_show_two_units() {
        assert_eq!(format_age(time::Duration::seconds(40)), "40s");
        assert_eq!(format_age(time::Duration::seconds(7 * 60 + 12)), "7m12s");
        assert_eq!(
            format_age(time::Duration::seconds(2 * 3600 + 5 * 60)),
            "2h5m"
        );
        assert_eq!(
            format_age(time::Duration::seconds(3 * 86_400 + 4 * 3600)),
            "3d4h"
        );
        assert_eq!(format_age(time::Duration::seconds(-5)), "0s");
    }
}
