//! Prometheus metrics of one wsmtp process.
//!
//! [`Metrics`] owns the one registry of the process and a handle for every
//! series that the code updates. Handles are created when the process starts,
//! for every label value known then: the fixed sets (reply classes,
//! decisions, delivery kinds) and the names that come from the configuration
//! (downstream groups, rule names, blocklist zones, the queue database). An
//! update is then an atomic add on a handle, without a lock or a map lookup
//! under a lock. A name that appears later (a reloaded configuration) falls
//! back to the registry's label map, which takes a read lock.
//!
//! Labels never carry an address, an IP address, a domain or a user name,
//! only values from fixed sets or from the configuration, so the number of
//! series stays bounded.
//!
//! Gauges that describe state outside the process's own counters are
//! refreshed from their source: the connection pool and the directory
//! snapshot just before each scrape ([`Metrics::refresh`]), the queue depth
//! by the periodic collector in [`collector`].

pub mod collector;
pub mod histogram;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};

use crate::config::Config;
use crate::directory::Directory;
use crate::queue::Queue;
pub use histogram::AtomicHistogram;

/// The labels of one series: name and value pairs.
pub type Labels = Vec<(&'static str, String)>;

type CounterFamily = Family<Labels, Counter>;
type GaugeFamily = Family<Labels, Gauge>;
type FloatGauge = Gauge<f64, AtomicU64>;
type FloatGaugeFamily = Family<Labels, FloatGauge>;
type HistogramFamily = Family<Labels, AtomicHistogram, fn() -> AtomicHistogram>;

/// The Content-Type of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Seconds since the Unix epoch.
pub fn unix_time() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

fn labels(pairs: &[(&'static str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(name, value)| (*name, (*value).to_string()))
        .collect()
}

/// Creates the handles of a counter family for every value of one label.
fn counters<const N: usize>(
    family: &CounterFamily,
    name: &'static str,
    values: [&'static str; N],
) -> [Counter; N] {
    values.map(|value| family.get_or_create(&labels(&[(name, value)])).clone())
}

/// Names from the configuration that label values come from.
#[derive(Clone, Debug, Default)]
pub struct Names {
    pub groups: Vec<String>,
    pub rules: Vec<String>,
    pub zones: Vec<String>,
    /// The queue database's name; None without a queue.
    pub database: Option<String>,
}

impl Names {
    pub fn from_config(config: &Config) -> Names {
        Names {
            groups: config.groups.keys().cloned().collect(),
            rules: config
                .rules
                .rules()
                .iter()
                .map(|rule| rule.name.clone())
                .collect(),
            zones: config.dnsbl.iter().map(|zone| zone.zone.clone()).collect(),
            database: config
                .queue
                .as_ref()
                .map(|settings| database_label(&settings.database.url)),
        }
    }
}

/// Returns the database name in a PostgreSQL URL, for the `database` label.
pub fn database_label(url: &str) -> String {
    url.parse::<tokio_postgres::Config>()
        .ok()
        .and_then(|config| config.get_dbname().map(str::to_string))
        .unwrap_or_else(|| "queue".to_string())
}

/// Reply classes, the index of [`SmtpMetrics::replies`].
const REPLY_CLASSES: [&str; 4] = ["2xx", "3xx", "4xx", "5xx"];

/// The result of a finished transaction: where its content went, or how it failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransactionResult {
    Spooled,
    Relayed,
    Rejected,
    Tempfailed,
    /// The client disconnected or timed out during the message content.
    Aborted,
    /// Ended by RSET, EHLO, STARTTLS or QUIT before any content.
    Abandoned,
}

impl TransactionResult {
    const ALL: [&'static str; 6] = [
        "spooled",
        "relayed",
        "rejected",
        "tempfailed",
        "aborted",
        "abandoned",
    ];

    pub fn as_str(self) -> &'static str {
        Self::ALL[self as usize]
    }
}

/// The decision on one recipient: accepted for local routing or for a
/// downstream group, or rejected permanently or for now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecipientDecision {
    Local,
    Relay,
    Reject,
    Tempfail,
}

impl RecipientDecision {
    const ALL: [&'static str; 4] = ["local", "relay", "reject", "tempfail"];

    pub fn as_str(self) -> &'static str {
        Self::ALL[self as usize]
    }
}

/// The kind of TLS handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsMode {
    Starttls,
    Implicit,
}

/// The outcome of a TLS handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsResult {
    Success,
    Failure,
    Timeout,
}

/// The reason a connection was closed before its greeting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectionRejection {
    MaxConnections,
    MaxConnectionsPerIp,
    ProxyHeader,
    /// A connection rate limit of a `rate_limits` class.
    RateLimit,
}

/// The result of an AUTH exchange that reached the credential check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthOutcome {
    Success,
    Failure,
    Blocked,
    Unavailable,
}

/// Metrics of the SMTP listener.
pub struct SmtpMetrics {
    pub connections_open: Gauge,
    pub connections_accepted: Counter,
    connections_rejected: [Counter; 4],
    replies: [Counter; 4],
    pub received_bytes: Counter,
    pub message_size: AtomicHistogram,
    transactions: [Counter; 6],
    recipients: [Counter; 4],
    refused_family: CounterFamily,
    /// By reason: the counters for `reject` and `tempfail`.
    refused: HashMap<String, [Counter; 2]>,
    /// By mode (starttls, implicit), then result (success, failure, timeout).
    tls: [[Counter; 3]; 2],
    /// By mechanism (plain, login), then outcome.
    auth: [[Counter; 4]; 2],
}

/// Reasons of refused recipients that do not name a rule: the downstream
/// refused it, the queue could not take it, or it needs a new transaction.
pub const REFUSAL_REASONS: &[&str] = &["downstream", "queue", "mixed_routes"];

impl SmtpMetrics {
    fn register(registry: &mut Registry, names: &Names) -> SmtpMetrics {
        let connections_open = Gauge::default();
        registry.register(
            "connections_open",
            "SMTP connections open now",
            connections_open.clone(),
        );
        let connections_accepted = Counter::default();
        registry.register(
            "connections_accepted",
            "SMTP connections accepted within the connection limits",
            connections_accepted.clone(),
        );
        let rejected = CounterFamily::default();
        registry.register(
            "connections_rejected",
            "SMTP connections closed before the greeting, by reason",
            rejected.clone(),
        );
        let connections_rejected = counters(
            &rejected,
            "reason",
            [
                "max_connections",
                "max_connections_per_ip",
                "proxy_header",
                "rate_limit",
            ],
        );

        let replies_family = CounterFamily::default();
        registry.register(
            "smtp_replies",
            "SMTP replies sent to clients, by class",
            replies_family.clone(),
        );
        let replies = counters(&replies_family, "class", REPLY_CLASSES);

        let received_bytes = Counter::default();
        registry.register_with_unit(
            "received",
            "Octets read from SMTP clients, commands and content",
            Unit::Bytes,
            received_bytes.clone(),
        );
        let message_size = AtomicHistogram::size();
        registry.register_with_unit(
            "message_size",
            "Size of accepted messages, our Received header included",
            Unit::Bytes,
            message_size.clone(),
        );

        let transactions_family = CounterFamily::default();
        registry.register(
            "transactions",
            "SMTP transactions ended, by result",
            transactions_family.clone(),
        );
        let transactions = counters(&transactions_family, "result", TransactionResult::ALL);

        let recipients_family = CounterFamily::default();
        registry.register(
            "recipients",
            "RCPT commands decided, by decision",
            recipients_family.clone(),
        );
        let recipients = counters(&recipients_family, "decision", RecipientDecision::ALL);

        let refused_family = CounterFamily::default();
        registry.register(
            "recipients_refused",
            "Recipients refused, by decision and reason (the rule that decided, or downstream, queue or mixed_routes)",
            refused_family.clone(),
        );
        let mut refused = HashMap::new();
        let reasons = crate::policy::BUILT_IN_RULES
            .iter()
            .copied()
            .chain(REFUSAL_REASONS.iter().copied())
            .map(str::to_string)
            .chain(names.rules.iter().cloned());
        for reason in reasons {
            let pair = ["reject", "tempfail"].map(|decision| {
                refused_family
                    .get_or_create(&labels(&[("decision", decision), ("reason", &reason)]))
                    .clone()
            });
            refused.insert(reason, pair);
        }

        let tls_family = CounterFamily::default();
        registry.register(
            "tls_handshakes",
            "TLS handshakes with SMTP clients, by mode and result",
            tls_family.clone(),
        );
        let tls = ["starttls", "implicit"].map(|mode| {
            ["success", "failure", "timeout"].map(|result| {
                tls_family
                    .get_or_create(&labels(&[("mode", mode), ("result", result)]))
                    .clone()
            })
        });

        let auth_family = CounterFamily::default();
        registry.register(
            "auth_attempts",
            "SMTP AUTH exchanges that reached the credential check, by mechanism and result",
            auth_family.clone(),
        );
        let auth = ["plain", "login"].map(|mechanism| {
            ["success", "failure", "blocked", "unavailable"].map(|result| {
                auth_family
                    .get_or_create(&labels(&[("mechanism", mechanism), ("result", result)]))
                    .clone()
            })
        });

        SmtpMetrics {
            connections_open,
            connections_accepted,
            connections_rejected,
            replies,
            received_bytes,
            message_size,
            transactions,
            recipients,
            refused_family,
            refused,
            tls,
            auth,
        }
    }

    pub fn connection_rejected(&self, reason: ConnectionRejection) {
        self.connections_rejected[reason as usize].inc();
    }

    /// Counts a reply by its code's class; codes outside 200..=599 are not counted.
    pub fn reply_sent(&self, code: u16) {
        if let Some(counter) = (code / 100)
            .checked_sub(2)
            .and_then(|index| self.replies.get(usize::from(index)))
        {
            counter.inc();
        }
    }

    pub fn transaction_ended(&self, result: TransactionResult) {
        self.transactions[result as usize].inc();
    }

    /// Counts a recipient decision; `reason` is used for refusals only.
    pub fn recipient_decided(&self, decision: RecipientDecision, reason: &str) {
        self.recipients[decision as usize].inc();
        let index = match decision {
            RecipientDecision::Reject => 0,
            RecipientDecision::Tempfail => 1,
            RecipientDecision::Local | RecipientDecision::Relay => return,
        };
        match self.refused.get(reason) {
            Some(pair) => {
                pair[index].inc();
            }
            None => {
                self.refused_family
                    .get_or_create(&labels(&[
                        ("decision", decision.as_str()),
                        ("reason", reason),
                    ]))
                    .inc();
            }
        }
    }

    pub fn tls_handshake(&self, mode: TlsMode, result: TlsResult) {
        self.tls[mode as usize][result as usize].inc();
    }

    pub fn auth_attempt(&self, mechanism: crate::config::Mechanism, outcome: AuthOutcome) {
        let index = match mechanism {
            crate::config::Mechanism::Plain => 0,
            crate::config::Mechanism::Login => 1,
        };
        self.auth[index][outcome as usize].inc();
    }
}

/// A step of a pass-through session, for latency and errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PassthroughStep {
    /// Connecting, the greeting and EHLO, up to the first host that accepts EHLO.
    Connect,
    Mail,
    Rcpt,
    /// From the end of the content to the downstream's final reply.
    Data,
}

impl PassthroughStep {
    const ALL: [&'static str; 4] = ["connect", "mail", "rcpt", "data"];
}

/// Metrics of one downstream group's pass-through sessions.
pub struct GroupMetrics {
    latency: [AtomicHistogram; 4],
    errors: [Counter; 4],
    /// Final replies to relayed messages, by class 2xx, 4xx, 5xx.
    messages: [Counter; 3],
}

impl GroupMetrics {
    pub fn observe(&self, step: PassthroughStep, duration: Duration) {
        self.latency[step as usize].observe_duration(duration);
    }

    pub fn error(&self, step: PassthroughStep) {
        self.errors[step as usize].inc();
    }

    /// Counts a relayed message by the class of the downstream's final reply.
    pub fn message(&self, code: u16) {
        let index = match code {
            200..=399 => 0,
            400..=499 => 1,
            _ => 2,
        };
        self.messages[index].inc();
    }
}

pub struct PassthroughMetrics {
    latency: HistogramFamily,
    errors: CounterFamily,
    messages: CounterFamily,
    groups: HashMap<String, Arc<GroupMetrics>>,
}

impl PassthroughMetrics {
    fn register(registry: &mut Registry, names: &Names) -> PassthroughMetrics {
        let latency = HistogramFamily::new_with_constructor(AtomicHistogram::latency as fn() -> _);
        registry.register_with_unit(
            "passthrough_latency",
            "Time of pass-through steps towards a downstream group, by group and step",
            Unit::Seconds,
            latency.clone(),
        );
        let errors = CounterFamily::default();
        registry.register(
            "passthrough_errors",
            "Pass-through steps that failed for want of an answer from the downstream group (no host answered, or the session broke), by group and step",
            errors.clone(),
        );
        let messages = CounterFamily::default();
        registry.register(
            "passthrough_messages",
            "Messages relayed live to a downstream group, by group and class of its final reply",
            messages.clone(),
        );
        let mut metrics = PassthroughMetrics {
            latency,
            errors,
            messages,
            groups: HashMap::new(),
        };
        for group in &names.groups {
            let handles = Arc::new(metrics.create(group));
            metrics.groups.insert(group.clone(), handles);
        }
        metrics
    }

    fn create(&self, group: &str) -> GroupMetrics {
        let step_labels = |step: &str| labels(&[("group", group), ("step", step)]);
        GroupMetrics {
            latency: PassthroughStep::ALL
                .map(|step| self.latency.get_or_create(&step_labels(step)).clone()),
            errors: PassthroughStep::ALL
                .map(|step| self.errors.get_or_create(&step_labels(step)).clone()),
            messages: ["2xx", "4xx", "5xx"].map(|class| {
                self.messages
                    .get_or_create(&labels(&[("group", group), ("reply_class", class)]))
                    .clone()
            }),
        }
    }

    /// Returns the handles of a group. A group unknown at start gets new
    /// handles, found through the family's lock.
    pub fn group(&self, group: &str) -> Arc<GroupMetrics> {
        match self.groups.get(group) {
            Some(metrics) => Arc::clone(metrics),
            None => Arc::new(self.create(group)),
        }
    }
}

/// The result of one blocklist lookup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LookupResult {
    Listed,
    NotListed,
    Error,
}

pub struct DnsblMetrics {
    family: CounterFamily,
    zones: HashMap<String, [Counter; 3]>,
}

impl DnsblMetrics {
    fn register(registry: &mut Registry, names: &Names) -> DnsblMetrics {
        let family = CounterFamily::default();
        registry.register(
            "dnsbl_lookups",
            "DNS blocklist lookups, by zone and result (listed, not_listed, error)",
            family.clone(),
        );
        let zones = names
            .zones
            .iter()
            .map(|zone| {
                let handles = ["listed", "not_listed", "error"].map(|result| {
                    family
                        .get_or_create(&labels(&[("zone", zone), ("result", result)]))
                        .clone()
                });
                (zone.clone(), handles)
            })
            .collect();
        DnsblMetrics { family, zones }
    }

    pub fn lookup(&self, zone: &str, result: LookupResult) {
        match self.zones.get(zone) {
            Some(handles) => {
                handles[result as usize].inc();
            }
            None => {
                let name = ["listed", "not_listed", "error"][result as usize];
                self.family
                    .get_or_create(&labels(&[("zone", zone), ("result", name)]))
                    .inc();
            }
        }
    }
}

/// The outcome of routing one claimed message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RoutingResult {
    Routed,
    /// Another router took the lease over; nothing was written.
    LeaseLost,
    Failed,
}

pub struct RouterMetrics {
    messages: [Counter; 3],
    pub recipients_routed: Counter,
    pub recipients_failed: Counter,
    pub deliveries_created: Counter,
    pub duration: AtomicHistogram,
}

impl RouterMetrics {
    fn register(registry: &mut Registry) -> RouterMetrics {
        let messages_family = CounterFamily::default();
        registry.register(
            "router_messages",
            "Claimed messages the router finished, by result (routed, lease_lost, failed)",
            messages_family.clone(),
        );
        let messages = counters(
            &messages_family,
            "result",
            ["routed", "lease_lost", "failed"],
        );
        let recipients = CounterFamily::default();
        registry.register(
            "router_recipients",
            "Envelope recipients routed, by result (routed, failed)",
            recipients.clone(),
        );
        let [recipients_routed, recipients_failed] =
            counters(&recipients, "result", ["routed", "failed"]);
        let deliveries_created = Counter::default();
        registry.register(
            "router_deliveries_created",
            "Deliveries the router wrote",
            deliveries_created.clone(),
        );
        let duration = AtomicHistogram::latency();
        registry.register_with_unit(
            "router_message_duration",
            "Time to route one message, from reading it to the commit",
            Unit::Seconds,
            duration.clone(),
        );
        RouterMetrics {
            messages,
            recipients_routed,
            recipients_failed,
            deliveries_created,
            duration,
        }
    }

    pub fn message(&self, result: RoutingResult) {
        self.messages[result as usize].inc();
    }
}

/// The transport of a delivery destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DestinationKind {
    Group,
    Mx,
    Lmtp,
    Maildir,
}

impl DestinationKind {
    const ALL: [&'static str; 4] = ["group", "mx", "lmtp", "maildir"];

    /// Returns the kind of a destination name such as `group:legacy`, or
    /// None for an unknown kind.
    pub fn of(destination: &str) -> Option<DestinationKind> {
        match destination.split_once(':')?.0 {
            "group" => Some(DestinationKind::Group),
            "domain" => Some(DestinationKind::Mx),
            "lmtp" => Some(DestinationKind::Lmtp),
            "maildir" => Some(DestinationKind::Maildir),
            _ => None,
        }
    }
}

/// The recorded outcome of one delivery attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeliveryResult {
    Delivered,
    Deferred,
    /// Failed for good; the sender gets a failure notification if asked.
    Bounced,
    /// Still failing after `delivery.max_lifetime`.
    Expired,
}

/// The kind of a delivery status notification.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotificationKind {
    Failure,
    Delay,
    Success,
}

pub struct DeliveryMetrics {
    /// By destination kind, then result.
    outcomes: [[Counter; 4]; 4],
    retries: [Counter; 4],
    connect_failures: [Counter; 4],
    duration: [AtomicHistogram; 4],
    pub outcomes_lost: Counter,
    notifications: [Counter; 3],
    pub sessions: Gauge,
}

impl DeliveryMetrics {
    fn register(registry: &mut Registry) -> DeliveryMetrics {
        let outcomes_family = CounterFamily::default();
        registry.register(
            "delivery_outcomes",
            "Delivery attempts recorded, by destination kind and result",
            outcomes_family.clone(),
        );
        let outcomes = DestinationKind::ALL.map(|kind| {
            ["delivered", "deferred", "bounced", "expired"].map(|result| {
                outcomes_family
                    .get_or_create(&labels(&[("kind", kind), ("result", result)]))
                    .clone()
            })
        });
        let retries_family = CounterFamily::default();
        registry.register(
            "delivery_retries",
            "Delivery attempts recorded after the first attempt of the same delivery, by destination kind",
            retries_family.clone(),
        );
        let retries = counters(&retries_family, "kind", DestinationKind::ALL);
        let connect_family = CounterFamily::default();
        registry.register(
            "delivery_connect_failures",
            "Delivery sessions that reached no server and backed their destination off, by destination kind",
            connect_family.clone(),
        );
        let connect_failures = counters(&connect_family, "kind", DestinationKind::ALL);
        let duration_family =
            HistogramFamily::new_with_constructor(AtomicHistogram::latency as fn() -> _);
        registry.register_with_unit(
            "delivery_duration",
            "Time to send one message to its recipients at a destination, by destination kind",
            Unit::Seconds,
            duration_family.clone(),
        );
        let duration = DestinationKind::ALL.map(|kind| {
            duration_family
                .get_or_create(&labels(&[("kind", kind)]))
                .clone()
        });
        let outcomes_lost = Counter::default();
        registry.register(
            "delivery_outcomes_lost",
            "Delivery outcomes dropped because another worker had taken the lease over",
            outcomes_lost.clone(),
        );
        let notifications_family = CounterFamily::default();
        registry.register(
            "notifications",
            "Delivery status notifications spooled, by type (failure notifications are bounces)",
            notifications_family.clone(),
        );
        let notifications = counters(
            &notifications_family,
            "type",
            ["failure", "delay", "success"],
        );
        let sessions = Gauge::default();
        registry.register(
            "delivery_sessions",
            "Delivery sessions running now",
            sessions.clone(),
        );
        DeliveryMetrics {
            outcomes,
            retries,
            connect_failures,
            duration,
            outcomes_lost,
            notifications,
            sessions,
        }
    }

    /// Counts `count` recorded outcomes.
    pub fn outcomes(&self, kind: DestinationKind, result: DeliveryResult, count: u64) {
        if count > 0 {
            self.outcomes[kind as usize][result as usize].inc_by(count);
        }
    }

    /// Counts `count` recorded outcomes of deliveries attempted before.
    pub fn retries(&self, kind: DestinationKind, count: u64) {
        if count > 0 {
            self.retries[kind as usize].inc_by(count);
        }
    }

    pub fn connect_failed(&self, kind: DestinationKind) {
        self.connect_failures[kind as usize].inc();
    }

    pub fn observe(&self, kind: DestinationKind, duration: Duration) {
        self.duration[kind as usize].observe_duration(duration);
    }

    pub fn notification(&self, kind: NotificationKind) {
        self.notifications(kind, 1);
    }

    /// Counts `count` notifications of one kind.
    pub fn notifications(&self, kind: NotificationKind, count: u64) {
        if count > 0 {
            self.notifications[kind as usize].inc_by(count);
        }
    }
}

/// The part of the process that met a queue database error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Component {
    Listener,
    Router,
    Delivery,
    Janitor,
    Directory,
    Collector,
}

impl Component {
    const ALL: [&'static str; 6] = [
        "listener",
        "router",
        "delivery",
        "janitor",
        "directory",
        "collector",
    ];
}

/// Gauges of the queue's content, set by the collector.
pub struct QueueGauges {
    /// Messages by state: receiving, ready, held.
    pub messages: [Gauge; 3],
    pub messages_oldest: [FloatGauge; 3],
    pub recipients_unrouted: Gauge,
    pub recipients_unrouted_oldest: FloatGauge,
    /// Pending deliveries by state: due, deferred, leased, held.
    pub deliveries: [Gauge; 4],
    pub deliveries_oldest: [FloatGauge; 4],
    /// Destinations: backed off, held.
    pub destinations: [Gauge; 2],
    pub collect_duration: FloatGauge,
    pub last_collect: FloatGauge,
    pub collect_errors: Counter,
}

/// Metrics of the queue database: pool, errors, janitor and content.
pub struct QueueMetrics {
    /// The database label value.
    pub database: String,
    errors: [Counter; 6],
    pub leases_expired: Counter,
    pub receiving_removed: Counter,
    pub gauges: QueueGauges,
    pool_size: Gauge,
    pool_available: Gauge,
    pool_waiting: Gauge,
    pool_max_size: Gauge,
}

impl QueueMetrics {
    fn register(registry: &mut Registry, database: &str) -> QueueMetrics {
        let db = |pairs: &[(&'static str, &str)]| {
            let mut all = labels(&[("database", database)]);
            all.extend(labels(pairs));
            all
        };
        let gauge_family = |registry: &mut Registry, name: &str, help: &str| {
            let family = GaugeFamily::default();
            registry.register(name, help, family.clone());
            family
        };
        let float_family = |registry: &mut Registry, name: &str, help: &str| {
            let family = FloatGaugeFamily::default();
            registry.register_with_unit(name, help, Unit::Seconds, family.clone());
            family
        };
        let counter_family = |registry: &mut Registry, name: &str, help: &str| {
            let family = CounterFamily::default();
            registry.register(name, help, family.clone());
            family
        };

        let errors_family = counter_family(
            registry,
            "database_errors",
            "Queue database errors met, by database and component",
        );
        let errors = Component::ALL.map(|component| {
            errors_family
                .get_or_create(&db(&[("component", component)]))
                .clone()
        });
        let leases_expired = counter_family(
            registry,
            "queue_leases_expired",
            "Router and delivery leases the janitor found expired and returned",
        )
        .get_or_create(&db(&[]))
        .clone();
        let receiving_removed = counter_family(
            registry,
            "queue_receiving_removed",
            "Unfinished messages (state receiving) the janitor removed after queue.receiving_ttl",
        )
        .get_or_create(&db(&[]))
        .clone();

        let message_states = ["receiving", "ready", "held"];
        let delivery_states = ["due", "deferred", "leased", "held"];
        let messages_family = gauge_family(
            registry,
            "queue_messages",
            "Messages in the queue, by state (receiving, ready, held)",
        );
        let messages_oldest_family = float_family(
            registry,
            "queue_messages_oldest_age",
            "Age of the oldest message in the queue, by state; 0 when there is none",
        );
        let unrouted = gauge_family(
            registry,
            "queue_recipients_unrouted",
            "Envelope recipients waiting for the router",
        );
        let unrouted_oldest = float_family(
            registry,
            "queue_recipients_unrouted_oldest_age",
            "Age of the oldest message with a recipient waiting for the router; 0 when there is none",
        );
        let deliveries_family = gauge_family(
            registry,
            "queue_deliveries",
            "Pending deliveries, by state (due, deferred, leased, held)",
        );
        let deliveries_oldest_family = float_family(
            registry,
            "queue_deliveries_oldest_age",
            "Age of the oldest message with a pending delivery, by state; 0 when there is none",
        );
        let destinations_family = gauge_family(
            registry,
            "queue_destinations",
            "Destinations backed off after failed connections, or held by an operator",
        );
        let collect_duration = float_family(
            registry,
            "queue_collect_duration",
            "Time the last collection of the queue gauges took",
        )
        .get_or_create(&db(&[]))
        .clone();
        let last_collect = FloatGaugeFamily::default();
        registry.register(
            "queue_collect_timestamp_seconds",
            "Unix time of the last successful collection of the queue gauges",
            last_collect.clone(),
        );
        let collect_errors = counter_family(
            registry,
            "queue_collect_errors",
            "Collections of the queue gauges that failed",
        )
        .get_or_create(&db(&[]))
        .clone();

        let gauges = QueueGauges {
            messages: message_states.map(|state| {
                messages_family
                    .get_or_create(&db(&[("state", state)]))
                    .clone()
            }),
            messages_oldest: message_states.map(|state| {
                messages_oldest_family
                    .get_or_create(&db(&[("state", state)]))
                    .clone()
            }),
            recipients_unrouted: unrouted.get_or_create(&db(&[])).clone(),
            recipients_unrouted_oldest: unrouted_oldest.get_or_create(&db(&[])).clone(),
            deliveries: delivery_states.map(|state| {
                deliveries_family
                    .get_or_create(&db(&[("state", state)]))
                    .clone()
            }),
            deliveries_oldest: delivery_states.map(|state| {
                deliveries_oldest_family
                    .get_or_create(&db(&[("state", state)]))
                    .clone()
            }),
            destinations: ["backed_off", "held"].map(|state| {
                destinations_family
                    .get_or_create(&db(&[("state", state)]))
                    .clone()
            }),
            collect_duration,
            last_collect: last_collect.get_or_create(&db(&[])).clone(),
            collect_errors,
        };

        let pool = |registry: &mut Registry, name: &str, help: &str| {
            gauge_family(registry, name, help)
                .get_or_create(&db(&[]))
                .clone()
        };
        QueueMetrics {
            database: database.to_string(),
            errors,
            leases_expired,
            receiving_removed,
            gauges,
            pool_size: pool(
                registry,
                "database_pool_connections",
                "Connections the queue pool holds now, in use or idle",
            ),
            pool_available: pool(
                registry,
                "database_pool_idle_connections",
                "Idle connections in the queue pool",
            ),
            pool_waiting: pool(
                registry,
                "database_pool_waiting_tasks",
                "Tasks waiting for a connection from the queue pool",
            ),
            pool_max_size: pool(
                registry,
                "database_pool_max_connections",
                "Connections the queue pool may open (queue.pool_size)",
            ),
        }
    }

    pub fn error(&self, component: Component) {
        self.errors[component as usize].inc();
    }

    fn refresh_pool(&self, queue: &Queue) {
        let status = queue.pool().status();
        self.pool_size.set(status.size as i64);
        self.pool_available.set(status.available as i64);
        self.pool_waiting.set(status.waiting as i64);
        self.pool_max_size.set(status.max_size as i64);
    }
}

pub struct DirectoryMetrics {
    accounts: Gauge,
    addresses: Gauge,
    lists: Gauge,
    age: FloatGauge,
    check_age: FloatGauge,
    reloads: [Counter; 2],
}

impl DirectoryMetrics {
    fn register(registry: &mut Registry) -> DirectoryMetrics {
        let gauge = |registry: &mut Registry, name: &str, help: &str| {
            let gauge = Gauge::default();
            registry.register(name, help, gauge.clone());
            gauge
        };
        let seconds = |registry: &mut Registry, name: &str, help: &str| {
            let gauge = FloatGauge::default();
            registry.register_with_unit(name, help, Unit::Seconds, gauge.clone());
            gauge
        };
        let reloads_family = CounterFamily::default();
        registry.register(
            "directory_reloads",
            "Loads of the directory snapshot, by result",
            reloads_family.clone(),
        );
        DirectoryMetrics {
            accounts: gauge(
                registry,
                "directory_accounts",
                "Accounts in the directory snapshot in force",
            ),
            addresses: gauge(
                registry,
                "directory_addresses",
                "Addresses (catch-alls included) in the directory snapshot in force",
            ),
            lists: gauge(
                registry,
                "directory_lists",
                "Mailing lists in the directory snapshot in force",
            ),
            age: seconds(
                registry,
                "directory_snapshot_age",
                "Time since the directory snapshot in force was loaded; -1 before the first load",
            ),
            check_age: seconds(
                registry,
                "directory_check_age",
                "Time since the directory version was last compared with the database; -1 before the first check",
            ),
            reloads: counters(&reloads_family, "result", ["success", "failure"]),
        }
    }

    /// Counts a load of the snapshot that succeeded or failed.
    pub fn reloaded(&self, success: bool) {
        self.reloads[usize::from(!success)].inc();
    }

    fn refresh(&self, directory: &Directory) {
        let now = unix_time();
        match directory.snapshot() {
            Some(snapshot) => {
                self.accounts.set(snapshot.accounts.len() as i64);
                self.addresses.set(snapshot.address_count() as i64);
                self.lists.set(snapshot.lists.len() as i64);
            }
            None => {
                self.accounts.set(0);
                self.addresses.set(0);
                self.lists.set(0);
            }
        }
        let age = |time: Option<f64>| time.map_or(-1.0, |time| (now - time).max(0.0));
        self.age.set(age(directory.loaded_at()));
        self.check_age.set(age(directory.checked_at()));
    }
}

/// Configuration reloads and rate limits. The code that reloads the
/// configuration and applies rate limits calls [`Metrics::config_reloaded`]
/// and [`Metrics::rate_limit_hit`].
pub struct ConfigMetrics {
    reloads: [Counter; 2],
    last_reload: FloatGauge,
    rate_limits: CounterFamily,
}

impl ConfigMetrics {
    fn register(registry: &mut Registry) -> ConfigMetrics {
        let reloads_family = CounterFamily::default();
        registry.register(
            "config_reloads",
            "Configuration reloads, by result",
            reloads_family.clone(),
        );
        let last_reload = FloatGauge::default();
        registry.register(
            "config_last_reload_success_timestamp_seconds",
            "Unix time at which the configuration in force was loaded",
            last_reload.clone(),
        );
        last_reload.set(unix_time());
        let rate_limits = CounterFamily::default();
        registry.register(
            "rate_limit_hits",
            "Commands or connections refused by a rate limit, by limit name",
            rate_limits.clone(),
        );
        // Every limit name is fixed, so each series exists from the start
        // and a dashboard shows 0 instead of no data.
        for name in crate::config::RateLimitName::ALL {
            drop(rate_limits.get_or_create(&labels(&[("limit", name.as_str())])));
        }
        ConfigMetrics {
            reloads: counters(&reloads_family, "result", ["success", "failure"]),
            last_reload,
            rate_limits,
        }
    }
}

/// The metrics of one process; see the module documentation.
pub struct Metrics {
    registry: Registry,
    pub smtp: SmtpMetrics,
    pub passthrough: PassthroughMetrics,
    pub dnsbl: DnsblMetrics,
    pub router: RouterMetrics,
    pub delivery: DeliveryMetrics,
    /// None without a queue database.
    pub queue: Option<QueueMetrics>,
    pub directory: DirectoryMetrics,
    pub config: ConfigMetrics,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new(&Names::default())
    }
}

impl Metrics {
    /// Creates the registry and the handles for the given names.
    pub fn new(names: &Names) -> Metrics {
        let mut registry = Registry::with_prefix("wsmtp");
        let build_info = Family::<Labels, Gauge>::default();
        registry.register(
            "build_info",
            "Always 1; the version label names the wsmtp version",
            build_info.clone(),
        );
        build_info
            .get_or_create(&labels(&[("version", env!("CARGO_PKG_VERSION"))]))
            .set(1);
        let start_time = FloatGauge::default();
        registry.register(
            "process_start_time_seconds",
            "Unix time at which the process started its tiers",
            start_time.clone(),
        );
        start_time.set(unix_time());

        let smtp = SmtpMetrics::register(&mut registry, names);
        let passthrough = PassthroughMetrics::register(&mut registry, names);
        let dnsbl = DnsblMetrics::register(&mut registry, names);
        let router = RouterMetrics::register(&mut registry);
        let delivery = DeliveryMetrics::register(&mut registry);
        let queue = names
            .database
            .as_deref()
            .map(|database| QueueMetrics::register(&mut registry, database));
        let directory = DirectoryMetrics::register(&mut registry);
        let config = ConfigMetrics::register(&mut registry);
        Metrics {
            registry,
            smtp,
            passthrough,
            dnsbl,
            router,
            delivery,
            queue,
            directory,
            config,
        }
    }

    /// Creates the metrics for the names in `config`.
    pub fn from_config(config: &Config) -> Metrics {
        Metrics::new(&Names::from_config(config))
    }

    /// Counts a queue database error met by `component`.
    pub fn database_error(&self, component: Component) {
        if let Some(queue) = &self.queue {
            queue.error(component);
        }
    }

    /// Counts a configuration reload. On success the reload time becomes now.
    pub fn config_reloaded(&self, success: bool) {
        self.config.reloads[usize::from(!success)].inc();
        if success {
            self.config.last_reload.set(unix_time());
        }
    }

    /// Counts a connection or command refused by the rate limit `limit`, a
    /// name from the configuration. The series is found under the family's
    /// read lock, which refusals, being rare, can afford.
    pub fn rate_limit_hit(&self, limit: &str) {
        self.config
            .rate_limits
            .get_or_create(&labels(&[("limit", limit)]))
            .inc();
    }

    /// Sets the gauges read from the pool and the directory at scrape time.
    pub fn refresh(&self, queue: Option<&Queue>, directory: Option<&Directory>) {
        if let (Some(metrics), Some(queue)) = (&self.queue, queue) {
            metrics.refresh_pool(queue);
        }
        if let Some(directory) = directory {
            self.directory.refresh(directory);
        }
    }

    /// Encodes every metric in the Prometheus text format, version 0.0.4.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // The encoder fails only when its writer does, and writing into a
        // String does not fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut text, &self.registry);
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reloads_and_rate_limits_are_counted() {
        let metrics = Metrics::default();
        metrics.config_reloaded(true);
        metrics.config_reloaded(false);
        metrics.config_reloaded(false);
        metrics.rate_limit_hit("per-client");
        let text = metrics.encode();
        assert_eq!(
            sample(&text, "wsmtp_config_reloads_total{result=\"success\"}"),
            Some(1.0),
            "{text}"
        );
        assert_eq!(
            sample(&text, "wsmtp_config_reloads_total{result=\"failure\"}"),
            Some(2.0),
            "{text}"
        );
        assert_eq!(
            sample(&text, "wsmtp_rate_limit_hits_total{limit=\"per-client\"}"),
            Some(1.0),
            "{text}"
        );
        // Without a queue there are no queue series.
        assert!(!text.contains("wsmtp_queue_messages{"), "{text}");
    }

    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn counters_are_named_by_convention() {
        let names = Names {
            groups: vec!["legacy".into()],
            rules: vec!["block-bad".into()],
            zones: vec!["bl.example".into()],
            database: Some("wsmtp".into()),
        };
        let metrics = Metrics::new(&names);
        metrics.smtp.reply_sent(250);
        metrics.smtp.reply_sent(550);
        metrics.smtp.reply_sent(550);
        metrics
            .smtp
            .recipient_decided(RecipientDecision::Reject, "block-bad");
        metrics
            .smtp
            .recipient_decided(RecipientDecision::Tempfail, "a-later-rule");
        metrics.smtp.message_size.observe(2000.0);
        metrics
            .passthrough
            .group("legacy")
            .observe(PassthroughStep::Rcpt, Duration::from_millis(3));
        let text = metrics.encode();
        assert_eq!(
            sample(&text, "wsmtp_smtp_replies_total{class=\"2xx\"}"),
            Some(1.0),
            "{text}"
        );
        assert_eq!(
            sample(&text, "wsmtp_smtp_replies_total{class=\"5xx\"}"),
            Some(2.0),
            "{text}"
        );
        assert_eq!(
            sample(
                &text,
                "wsmtp_recipients_refused_total{decision=\"reject\",reason=\"block-bad\"}"
            ),
            Some(1.0),
            "{text}"
        );
        assert_eq!(
            sample(
                &text,
                "wsmtp_recipients_refused_total{decision=\"tempfail\",reason=\"a-later-rule\"}"
            ),
            Some(1.0),
            "{text}"
        );
        assert_eq!(
            sample(&text, "wsmtp_message_size_bytes_count"),
            Some(1.0),
            "{text}"
        );
        assert_eq!(
            sample(&text, "wsmtp_message_size_bytes_bucket{le=\"4096\"}"),
            Some(1.0),
            "{text}"
        );
        assert_eq!(
            sample(
                &text,
                "wsmtp_passthrough_latency_seconds_count{group=\"legacy\",step=\"rcpt\"}"
            ),
            Some(1.0),
            "{text}"
        );
        assert_eq!(
            sample(
                &text,
                "wsmtp_queue_messages{database=\"wsmtp\",state=\"ready\"}"
            ),
            Some(0.0),
            "{text}"
        );
    }
}
