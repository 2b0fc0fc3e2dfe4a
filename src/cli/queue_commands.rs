//! `wsmtp migrate` and `wsmtp queue list|show`.

use anyhow::Context as _;

use super::QueueCommand;
use crate::config::Config;
use crate::queue::{ListFilter, Queue};

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
        QueueCommand::List { state, limit } => {
            let filter = ListFilter { state, limit };
            let messages = queue.list(&filter).await?;
            println!(
                "{:<32}  {:<9}  {:>10}  {:>5}  {:<20}  sender",
                "queue id", "state", "size", "rcpts", "received"
            );
            for message in &messages {
                println!(
                    "{:<32}  {:<9}  {:>10}  {:>5}  {:<20}  <{}>",
                    message.id.simple(),
                    message.state,
                    message
                        .size
                        .map(|s| s.to_string())
                        .unwrap_or_else(|| "-".to_string()),
                    message.recipient_count,
                    format_list_time(message.received_at),
                    message.sender
                );
            }
            println!("{} message(s)", messages.len());
        }
        QueueCommand::Show { id, body } => {
            let id = uuid::Uuid::parse_str(&id).with_context(|| {
                format!(
                    "invalid queue id {id:?}; expected the 32 hex digits that `queue list` prints"
                )
            })?;
            let Some(message) = queue.show(id).await? else {
                anyhow::bail!("message {} not found in the queue", id.simple());
            };
            println!("queue id:    {}", message.id.simple());
            println!("state:       {}", message.state);
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
            if !message.deliveries.is_empty() {
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
                    println!(
                        "    <{}>  {}  state={}  via {}",
                        delivery.address, delivery.kind, delivery.state, delivery.trace
                    );
                }
            }
            if body {
                let content = queue.read_body(id).await?;
                println!("content ({} octets):", content.len());
                println!("{}", String::from_utf8_lossy(&content));
            }
        }
    }
    Ok(())
}

/// `2026-12-04T21:42:13Z`: seconds are enough in a listing.
fn format_list_time(time: time::OffsetDateTime) -> String {
    let format =
        time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]Z");
    time.to_offset(time::UtcOffset::UTC)
        .format(&format)
        .unwrap_or_else(|_| time.to_string())
}

fn format_time(time: time::OffsetDateTime) -> String {
    time.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| time.to_string())
}
