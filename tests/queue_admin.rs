//! Operator commands of the queue library (list filters, show, retry, hold,
//! release, delete, stats) against a real database, with messages spooled
//! and routed by the real spool writer and router.

mod common;

use std::time::Duration;

use common::routed::{RoutedQueue, back_off, defer, delivery_row, destination_row, lease};
use futures_util::StreamExt as _;
use wsmtp::queue::{Envelope, ListFilter, ListState, QueueError, QueueId, Target, new_queue_id};

async fn listed(queue: &wsmtp::queue::Queue, filter: ListFilter) -> Vec<QueueId> {
    queue
        .list(&filter)
        .await
        .expect("list")
        .iter()
        .map(|m| m.id)
        .collect()
}

fn by_sender(sender: &str) -> ListFilter {
    ListFilter {
        sender: Some(sender.to_owned()),
        ..ListFilter::default()
    }
}

fn by_recipient(recipient: &str) -> ListFilter {
    ListFilter {
        recipient: Some(recipient.to_owned()),
        ..ListFilter::default()
    }
}

fn by_destination(destination: &str) -> ListFilter {
    ListFilter {
        destination: Some(destination.to_owned()),
        ..ListFilter::default()
    }
}

fn by_state(state: ListState) -> ListFilter {
    ListFilter {
        state: Some(state),
        ..ListFilter::default()
    }
}

#[tokio::test]
async fn list_filters_select_messages() {
    let fixture = RoutedQueue::create().await;
    let queue = &fixture.queue;
    let bob = fixture
        .spool("Bob@Example.NET", &["remote1@example.org"])
        .await;
    let null = fixture.spool("", &["alice@example.com"]).await;
    let carol = fixture
        .spool(
            "carol@other.example",
            &["x@example.net", "alice@example.com"],
        )
        .await;
    let forwarded = fixture
        .spool("bob@example.net.invalid", &["dora@example.com"])
        .await;
    fixture.route().await;
    let client = fixture.connect().await;

    // Sender: exact without regard to case, with or without brackets, by
    // domain, and the null sender.
    assert_eq!(listed(queue, by_sender("bob@example.net")).await, vec![bob]);
    assert_eq!(
        listed(queue, by_sender("<BOB@example.net>")).await,
        vec![bob]
    );
    assert_eq!(listed(queue, by_sender("@EXAMPLE.net")).await, vec![bob]);
    assert_eq!(listed(queue, by_sender("<>")).await, vec![null]);
    assert_eq!(listed(queue, by_sender("")).await, vec![null]);
    assert!(listed(queue, by_sender("@net")).await.is_empty());

    // Recipient: envelope recipients and delivery addresses (dora's
    // forward exists only as a delivery).
    assert_eq!(
        listed(queue, by_recipient("REMOTE1@example.org")).await,
        vec![bob]
    );
    assert_eq!(
        listed(queue, by_recipient("@example.com")).await,
        vec![null, carol, forwarded]
    );
    assert_eq!(
        listed(queue, by_recipient("dora@example.org")).await,
        vec![forwarded]
    );
    assert_eq!(
        listed(queue, by_recipient("@example.org")).await,
        vec![bob, forwarded]
    );
    let error = queue
        .list(&by_recipient("<>"))
        .await
        .expect_err("empty recipient");
    assert!(matches!(error, QueueError::InvalidArgument(_)), "{error}");

    // Destination: full name, bare domain, and another kind.
    assert_eq!(
        listed(queue, by_destination("domain:example.org")).await,
        vec![bob, forwarded]
    );
    assert_eq!(
        listed(queue, by_destination("EXAMPLE.org")).await,
        vec![bob, forwarded]
    );
    assert_eq!(
        listed(queue, by_destination("maildir:/var/mail/alice")).await,
        vec![null, carol]
    );
    assert!(
        listed(queue, by_destination("group:example.org"))
            .await
            .is_empty()
    );

    // Age.
    client
        .execute(
            "UPDATE messages SET received_at = now() - interval '2 hours' WHERE id = $1",
            &[&carol],
        )
        .await
        .expect("age message");
    let older = ListFilter {
        older_than: Some(Duration::from_secs(3600)),
        ..ListFilter::default()
    };
    assert_eq!(listed(queue, older).await, vec![carol]);

    // Deferred: a pending delivery attempted before.
    defer(&client, carol, "x@example.net", "1 hour").await;
    assert_eq!(
        listed(queue, by_state(ListState::Deferred)).await,
        vec![carol]
    );
    let summary = queue
        .list(&by_sender("carol@other.example"))
        .await
        .expect("list")
        .remove(0);
    assert_eq!(summary.pending_deliveries, 2);
    assert_eq!(summary.deferred_deliveries, 1);
    assert!(!summary.held);

    // Held messages leave `ready` and appear under `held`.
    queue
        .hold(&Target::Messages(vec![null]))
        .await
        .expect("hold");
    assert_eq!(listed(queue, by_state(ListState::Held)).await, vec![null]);
    assert_eq!(
        listed(queue, by_state(ListState::Ready)).await,
        vec![carol, bob, forwarded]
    );

    // A message still being received.
    let mut writer = queue.begin(Envelope {
        id: new_queue_id(),
        sender: "slow@example.org".into(),
        client_ip: "127.0.0.2".parse().expect("ip"),
        helo: "client.example".into(),
        smtputf8: false,
        body_type: None,
        dsn_ret: None,
        dsn_envid: None,
    });
    writer.write(&[b'a'; 70_000]).await.expect("write");
    let receiving = listed(queue, by_state(ListState::Receiving)).await;
    assert_eq!(receiving.len(), 1);
    assert_ne!(receiving[0], bob);

    // Conditions combine, and the limit applies last.
    let combined = ListFilter {
        sender: Some("@example.net".into()),
        destination: Some("example.org".into()),
        ..ListFilter::default()
    };
    assert_eq!(listed(queue, combined).await, vec![bob]);
    let limited = ListFilter {
        limit: 2,
        ..ListFilter::default()
    };
    assert_eq!(listed(queue, limited).await, vec![carol, bob]);
    drop(writer);
}

#[tokio::test]
async fn show_reports_attempts_and_live_leases() {
    let fixture = RoutedQueue::create().await;
    let id = fixture
        .spool(
            "bob@example.net",
            &["a@example.org", "b@example.org", "c@example.org"],
        )
        .await;
    fixture.route().await;
    let client = fixture.connect().await;
    defer(&client, id, "a@example.org", "1 hour").await;
    lease(&client, id, "b@example.org", "worker-7", "10 minutes").await;
    // An expired lease is no longer shown.
    lease(&client, id, "c@example.org", "worker-gone", "-1 minute").await;
    back_off(&client, "domain:example.org", 2, "5 minutes").await;

    let detail = fixture
        .queue
        .show(id)
        .await
        .expect("show")
        .expect("message exists");
    assert!(!detail.held);
    let delivery = |address: &str| {
        detail
            .deliveries
            .iter()
            .find(|d| d.address == address)
            .expect("delivery")
            .clone()
    };
    let deferred = delivery("a@example.org");
    assert_eq!(deferred.state, "pending");
    assert_eq!(deferred.attempts, 1);
    assert_eq!(
        deferred.last_reply.as_deref(),
        Some("451 4.3.0 try again later")
    );
    assert_eq!(deferred.remote_mta.as_deref(), Some("mx.example.org"));
    assert!(deferred.last_attempt_at.is_some());
    assert!(deferred.next_attempt_at > time::OffsetDateTime::now_utc());
    assert!(deferred.lease.is_none());

    let leased = delivery("b@example.org").lease.expect("live lease");
    assert_eq!(leased.owner, "worker-7");
    assert!(leased.until > time::OffsetDateTime::now_utc());
    assert!(delivery("c@example.org").lease.is_none(), "expired lease");

    assert_eq!(detail.destinations.len(), 1);
    let destination = &detail.destinations[0];
    assert_eq!(destination.name, "domain:example.org");
    assert_eq!(destination.failures, 2);
    assert_eq!(
        destination.last_error.as_deref(),
        Some("connection refused")
    );
    assert!(!destination.held);

    let json = serde_json::to_value(&detail).expect("json");
    assert_eq!(json["id"], id.simple().to_string());
    assert_eq!(json["held"], false);
    let deliveries = json["deliveries"].as_array().expect("deliveries");
    let leased = deliveries
        .iter()
        .find(|d| d["address"] == "b@example.org")
        .expect("leased delivery");
    assert_eq!(leased["lease"]["owner"], "worker-7");
    assert!(
        leased["lease"]["until"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')),
        "{leased}"
    );
}

/// Receives the notifications of one channel on a dedicated connection.
/// The client must stay alive while notifications are expected.
async fn listen(
    url: &str,
    channel: &str,
) -> (
    tokio_postgres::Client,
    tokio::sync::mpsc::UnboundedReceiver<String>,
) {
    let (client, mut connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = messages.next().await {
            if let tokio_postgres::AsyncMessage::Notification(notification) = message
                && sender.send(notification.channel().to_owned()).is_err()
            {
                break;
            }
        }
    });
    client
        .batch_execute(&format!("LISTEN {channel}"))
        .await
        .expect("listen");
    (client, receiver)
}

async fn next_wakeup(wakeups: &mut tokio::sync::mpsc::UnboundedReceiver<String>) -> String {
    tokio::time::timeout(Duration::from_secs(10), wakeups.recv())
        .await
        .expect("wake-up within 10 s")
        .expect("listening connection open")
}

#[tokio::test]
async fn retry_leaves_live_lease_alone() {
    let fixture = RoutedQueue::create().await;
    let queue = &fixture.queue;
    let first = fixture
        .spool("bob@example.net", &["a@example.org", "b@example.org"])
        .await;
    let second = fixture.spool("bob@example.net", &["x@example.net"]).await;
    fixture.route().await;
    let client = fixture.connect().await;
    defer(&client, first, "a@example.org", "1 hour").await;
    defer(&client, first, "b@example.org", "1 hour").await;
    lease(&client, first, "b@example.org", "worker-1", "10 minutes").await;
    defer(&client, second, "x@example.net", "1 hour").await;
    back_off(&client, "domain:example.org", 3, "1 hour").await;
    let leased_before = delivery_row(&client, first, "b@example.org").await;
    let (_listener, mut wakeups) = listen(&fixture.db.url, "wsmtp_delivery").await;

    // By message: the unleased delivery is due, the leased one untouched,
    // and the destination's backoff stays and is reported.
    let missing = new_queue_id();
    let outcome = queue
        .retry(&Target::Messages(vec![first, missing, first]))
        .await
        .expect("retry");
    assert_eq!(outcome.deliveries, 1);
    assert_eq!(outcome.leased, 1);
    assert_eq!(outcome.missing, vec![missing]);
    assert!(outcome.destinations.is_empty());
    let blocked: Vec<&str> = outcome
        .blocked_destinations
        .iter()
        .map(|d| d.name.as_str())
        .collect();
    assert_eq!(blocked, vec!["domain:example.org"]);
    assert!(delivery_row(&client, first, "a@example.org").await.due);
    assert_eq!(
        delivery_row(&client, first, "b@example.org").await,
        leased_before
    );
    assert!(!delivery_row(&client, second, "x@example.net").await.due);
    assert_eq!(
        destination_row(&client, "domain:example.org").await,
        Some((false, 3, false))
    );
    assert_eq!(next_wakeup(&mut wakeups).await, "wsmtp_delivery");

    // By destination: its row is due again with the failure count kept.
    let outcome = queue
        .retry(&Target::Destination("example.org".into()))
        .await
        .expect("retry destination");
    assert_eq!(outcome.destinations, vec!["domain:example.org"]);
    assert_eq!(
        outcome.deliveries, 0,
        "the unleased delivery was due already"
    );
    assert_eq!(outcome.leased, 1);
    assert!(outcome.blocked_destinations.is_empty());
    assert_eq!(
        destination_row(&client, "domain:example.org").await,
        Some((true, 3, false))
    );
    assert_eq!(
        delivery_row(&client, first, "b@example.org").await,
        leased_before
    );
    assert_eq!(next_wakeup(&mut wakeups).await, "wsmtp_delivery");

    // Everything: the remaining deferred delivery.
    let outcome = queue.retry(&Target::All).await.expect("retry all");
    assert_eq!(outcome.deliveries, 1);
    assert!(delivery_row(&client, second, "x@example.net").await.due);
    assert_eq!(
        delivery_row(&client, first, "b@example.org").await,
        leased_before
    );
    assert_eq!(
        delivery_row(&client, second, "x@example.net")
            .await
            .attempts,
        1,
        "attempts are kept"
    );

    let error = queue
        .retry(&Target::Messages(Vec::new()))
        .await
        .expect_err("no ids");
    assert!(matches!(error, QueueError::InvalidArgument(_)), "{error}");
}

#[tokio::test]
async fn retry_batches_cover_the_whole_queue() {
    let fixture = RoutedQueue::create().await;
    let id = fixture.spool("bob@example.net", &["a@example.org"]).await;
    fixture.route().await;
    let client = fixture.connect().await;
    // More deliveries than one batch, copied from the routed one.
    let copies = wsmtp::queue::ADMIN_BATCH_SIZE * 2 + 5;
    client
        .execute(
            "INSERT INTO deliveries (message_id, batch_id, recipient_id, address, kind,
                                     destination, trace, attempts, next_attempt_at)
             SELECT message_id, batch_id, recipient_id, 'copy' || n || '@example.org', kind,
                    destination, trace, 1, now() + interval '1 hour'
               FROM deliveries, generate_series(1, $2::bigint) AS n
              WHERE message_id = $1",
            &[&id, &copies],
        )
        .await
        .expect("copy deliveries");
    lease(&client, id, "copy7@example.org", "worker-1", "10 minutes").await;

    let outcome = fixture.queue.retry(&Target::All).await.expect("retry all");
    assert_eq!(outcome.deliveries, copies as u64 - 1);
    assert_eq!(outcome.leased, 1);
    let waiting: i64 = client
        .query_one(
            "SELECT count(*) FROM deliveries WHERE next_attempt_at > now()",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(waiting, 1, "only the leased delivery waits");
}

#[tokio::test]
async fn hold_and_release_messages_and_destinations() {
    let fixture = RoutedQueue::create().await;
    let queue = &fixture.queue;
    let first = fixture
        .spool("bob@example.net", &["a@example.org", "alice@example.com"])
        .await;
    let second = fixture.spool("bob@example.net", &["b@example.org"]).await;
    let third = fixture.spool("bob@example.net", &["x@example.net"]).await;
    fixture.route().await;
    let client = fixture.connect().await;
    lease(&client, first, "a@example.org", "worker-1", "10 minutes").await;

    // A message hold shows in list and show; a delivery in progress is
    // counted, not stopped.
    let outcome = queue
        .hold(&Target::Messages(vec![first]))
        .await
        .expect("hold message");
    assert_eq!(outcome.messages, 1);
    assert_eq!(outcome.in_flight, 1);
    let again = queue
        .hold(&Target::Messages(vec![first]))
        .await
        .expect("hold again");
    assert_eq!((again.messages, again.already_held), (0, 1));
    assert!(queue.show(first).await.expect("show").expect("exists").held);
    let summary = queue
        .list(&by_state(ListState::Held))
        .await
        .expect("list held");
    assert_eq!(summary.len(), 1);
    assert_eq!(summary[0].id, first);
    assert!(summary[0].held);
    assert_eq!(
        delivery_row(&client, first, "a@example.org")
            .await
            .lease_owner
            .as_deref(),
        Some("worker-1")
    );

    // A destination hold, by bare name, shows in list and show of the
    // messages that go there.
    let outcome = queue
        .hold(&Target::Destination("example.org".into()))
        .await
        .expect("hold destination");
    assert_eq!(outcome.destinations, vec!["domain:example.org"]);
    assert_eq!(outcome.in_flight, 1);
    assert_eq!(
        destination_row(&client, "domain:example.org").await,
        Some((true, 0, true))
    );
    let second_summary = queue
        .list(&by_sender("bob@example.net"))
        .await
        .expect("list")
        .into_iter()
        .find(|m| m.id == second)
        .expect("second listed");
    assert!(!second_summary.held);
    assert_eq!(second_summary.held_destination_deliveries, 1);
    let second_detail = queue.show(second).await.expect("show").expect("exists");
    assert!(second_detail.destinations[0].held);
    let third_summary = queue
        .list(&by_recipient("x@example.net"))
        .await
        .expect("list")
        .remove(0);
    assert_eq!(third_summary.held_destination_deliveries, 0);

    // A bare name without mail is rejected; a full name is held ahead.
    let error = queue
        .hold(&Target::Destination("nowhere.example".into()))
        .await
        .expect_err("unknown bare destination");
    assert!(matches!(error, QueueError::InvalidArgument(_)), "{error}");
    let ahead = queue
        .hold(&Target::Destination("domain:Later.example".into()))
        .await
        .expect("hold ahead");
    assert_eq!(ahead.destinations, vec!["domain:later.example"]);

    // Release makes the released deliveries due now.
    defer(&client, second, "b@example.org", "1 hour").await;
    let outcome = queue
        .release(&Target::Destination("domain:example.org".into()))
        .await
        .expect("release destination");
    assert_eq!(outcome.destinations, vec!["domain:example.org"]);
    assert_eq!(outcome.deliveries, 1);
    assert!(delivery_row(&client, second, "b@example.org").await.due);
    assert_eq!(
        destination_row(&client, "domain:example.org").await,
        Some((true, 0, false))
    );
    let none = queue
        .release(&Target::Destination("example.org".into()))
        .await
        .expect("release again");
    assert!(none.destinations.is_empty());

    defer(&client, first, "alice@example.com", "1 hour").await;
    let outcome = queue
        .release(&Target::Messages(vec![first, third]))
        .await
        .expect("release messages");
    assert_eq!(outcome.messages, 1, "only the first was held");
    assert_eq!(outcome.deliveries, 1, "the leased delivery is left alone");
    assert!(delivery_row(&client, first, "alice@example.com").await.due);
    assert!(!queue.show(first).await.expect("show").expect("exists").held);

    // Everything at once.
    let outcome = queue.hold(&Target::All).await.expect("hold all");
    assert_eq!(outcome.messages, 3);
    assert_eq!(
        queue
            .list(&by_state(ListState::Held))
            .await
            .expect("list")
            .len(),
        3
    );
    let outcome = queue.release(&Target::All).await.expect("release all");
    assert_eq!(outcome.messages, 3);
    assert_eq!(outcome.destinations, vec!["domain:later.example"]);
    assert!(
        queue
            .list(&by_state(ListState::Held))
            .await
            .expect("list")
            .is_empty()
    );
}

#[tokio::test]
async fn hold_all_covers_every_batch() {
    let fixture = RoutedQueue::create().await;
    let client = fixture.connect().await;
    // Messages still being received need no body, so SQL can add many.
    let count = wsmtp::queue::ADMIN_BATCH_SIZE * 2 + 3;
    client
        .execute(
            "INSERT INTO messages (id, sender, client_ip, helo)
             SELECT gen_random_uuid(), 'bulk@example.net', '127.0.0.2', 'client.example'
               FROM generate_series(1, $1::bigint)",
            &[&count],
        )
        .await
        .expect("insert messages");
    let held_before = fixture.spool("bob@example.net", &["a@example.org"]).await;
    fixture
        .queue
        .hold(&Target::Messages(vec![held_before]))
        .await
        .expect("hold one");

    let outcome = fixture.queue.hold(&Target::All).await.expect("hold all");
    assert_eq!(outcome.messages, count as u64);
    let not_held: i64 = client
        .query_one("SELECT count(*) FROM messages WHERE NOT held", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(not_held, 0);

    let outcome = fixture
        .queue
        .release(&Target::All)
        .await
        .expect("release all");
    assert_eq!(outcome.messages, count as u64 + 1);
    let held: i64 = client
        .query_one("SELECT count(*) FROM messages WHERE held", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(held, 0);
}

#[tokio::test]
async fn delete_removes_messages_with_their_rows() {
    let fixture = RoutedQueue::create().await;
    let queue = &fixture.queue;
    let doomed = fixture
        .spool("bob@example.net", &["a@example.org", "alice@example.com"])
        .await;
    let kept = fixture.spool("bob@example.net", &["b@example.org"]).await;
    fixture.route().await;
    let client = fixture.connect().await;
    lease(&client, doomed, "a@example.org", "worker-1", "10 minutes").await;

    let missing = new_queue_id();
    let outcome = queue.delete(&[doomed, missing]).await.expect("delete");
    assert_eq!(outcome.deleted, vec![doomed]);
    assert_eq!(outcome.missing, vec![missing]);
    assert_eq!(outcome.in_flight, 1);

    for table in [
        "message_chunks",
        "recipients",
        "delivery_batches",
        "deliveries",
    ] {
        let left: i64 = client
            .query_one(
                &format!("SELECT count(*) FROM {table} WHERE message_id = $1"),
                &[&doomed],
            )
            .await
            .expect("count")
            .get(0);
        assert_eq!(left, 0, "{table} rows of the deleted message");
    }
    assert!(queue.show(doomed).await.expect("show").is_none());
    assert!(queue.show(kept).await.expect("show").is_some());

    // The worker's later update matches no row.
    let changed = client
        .execute(
            "UPDATE deliveries SET state = 'delivered'
              WHERE message_id = $1 AND lease_owner = 'worker-1'",
            &[&doomed],
        )
        .await
        .expect("stale update");
    assert_eq!(changed, 0);
}

#[tokio::test]
async fn stats_count_queue_and_destinations() {
    let fixture = RoutedQueue::create().await;
    let queue = &fixture.queue;
    let client = fixture.connect().await;
    // Two deliveries to example.org: one leased, one deferred; the message
    // is 30 minutes old.
    let remote = fixture
        .spool("bob@example.net", &["a@example.org", "b@example.org"])
        .await;
    // Held, with a delivery to example.net.
    let held = fixture.spool("bob@example.net", &["x@example.net"]).await;
    // Due now, to alice's Maildir.
    fixture
        .spool("bob@example.net", &["alice@example.com"])
        .await;
    fixture.route().await;
    // Not routed yet.
    fixture
        .spool("bob@example.net", &["alice@example.com", "y@example.net"])
        .await;
    client
        .execute(
            "UPDATE messages SET received_at = now() - interval '30 minutes' WHERE id = $1",
            &[&remote],
        )
        .await
        .expect("age");
    lease(&client, remote, "a@example.org", "worker-1", "10 minutes").await;
    defer(&client, remote, "b@example.org", "1 hour").await;
    back_off(&client, "domain:example.org", 2, "20 minutes").await;
    queue
        .hold(&Target::Messages(vec![held]))
        .await
        .expect("hold");
    queue
        .hold(&Target::Destination("group:legacy".into()))
        .await
        .expect("hold empty destination");

    let stats = queue.stats(0).await.expect("stats");
    assert_eq!(stats.messages_receiving, 0);
    assert_eq!(stats.messages_ready, 3);
    assert_eq!(stats.messages_held, 1);
    assert_eq!(stats.recipients_awaiting_routing, 2);
    let oldest = stats.oldest_received_at.expect("oldest");
    assert!(stats.now - oldest >= time::Duration::minutes(30));
    assert_eq!(stats.deliveries.pending, 4);
    assert_eq!(stats.deliveries.leased, 1);
    assert_eq!(stats.deliveries.deferred, 1);
    assert_eq!(stats.deliveries.held, 1);
    assert_eq!(stats.deliveries.due, 1);
    // domain:example.org, domain:example.net, maildir:…, group:legacy.
    assert_eq!(stats.destinations, 4);
    assert_eq!(stats.destinations_backed_off, 1);
    assert_eq!(stats.destinations_held, 1);

    let names: Vec<&str> = stats
        .top_destinations
        .iter()
        .map(|d| d.name.as_str())
        .collect();
    assert_eq!(
        names,
        vec![
            "domain:example.org",
            "domain:example.net",
            "maildir:/var/mail/alice",
            "group:legacy"
        ]
    );
    let top = &stats.top_destinations[0];
    assert_eq!(top.deliveries.pending, 2);
    // 30 minutes falls into the bucket from 20 to 40 minutes.
    assert_eq!(top.age_buckets, vec![0, 0, 0, 2, 0, 0, 0, 0, 0, 0]);
    let state = top.state.as_ref().expect("destination row");
    assert_eq!(state.failures, 2);
    assert_eq!(state.last_error.as_deref(), Some("connection refused"));
    assert!(state.next_attempt_at > stats.now);
    assert!(stats.top_destinations[3].state.as_ref().expect("row").held);

    let limited = queue.stats(1).await.expect("stats");
    assert_eq!(limited.top_destinations.len(), 1);
    assert_eq!(limited.deliveries, stats.deliveries, "totals cover all");

    let json = serde_json::to_value(&limited).expect("json");
    assert_eq!(json["deliveries"]["leased"], 1);
    assert_eq!(json["top_destinations"][0]["name"], "domain:example.org");
}
