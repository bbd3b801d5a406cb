//! The relay's Prometheus metrics on its `--metrics-addr`: nodes and their
//! state, flows merged, joined and out of order, what nodes lost, and its
//! own subscribers. Everything but the stream counters is read at scrape
//! time from the peer table and [`RelayStats`], so no stage calls in.
//!
//! | metric | labels |
//! |---|---|
//! | `flowaudit_relay_peers` | |
//! | `flowaudit_relay_peer_state` | `node`, `state` (1 for the current one) |
//! | `flowaudit_relay_peer_flows_total` | `node` |
//! | `flowaudit_relay_peer_lost_events_total` | `node` (what the node's agent said it lost) |
//! | `flowaudit_relay_peer_connects_total` | `node` |
//! | `flowaudit_relay_flows_merged_total` | |
//! | `flowaudit_relay_flows_joined_total` | `halves` (`both`, `one`) |
//! | `flowaudit_relay_flows_out_of_order_total` | |
//! | `flowaudit_relay_flows_malformed_total` | |
//! | `flowaudit_stream_subscribers`, `flowaudit_stream_dropped_total` | as on agents |
//! | `flowaudit_build_info` | `version` |

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::Registry;

use super::peers::{NodeState, Peers, RelayStats, state_name};
use crate::export::hub::StreamObserver;

/// The relay's subscribers, counted by its hubs.
#[derive(Debug, Default)]
pub struct StreamCounters {
    subscribers: Gauge,
    dropped: Counter,
}

impl StreamObserver for StreamCounters {
    fn subscriber_added(&self) {
        self.subscribers.inc();
    }

    fn subscriber_removed(&self) {
        self.subscribers.dec();
    }

    fn stream_dropped(&self, n: u64) {
        self.dropped.inc_by(n);
    }
}

pub struct RelayMetrics {
    registry: Registry,
}

impl std::fmt::Debug for RelayMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayMetrics").finish_non_exhaustive()
    }
}

struct RelayCollector {
    peers: Arc<Peers>,
    stats: Arc<RelayStats>,
}

impl std::fmt::Debug for RelayCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayCollector").finish_non_exhaustive()
    }
}

const STATES: [NodeState; 5] = [
    NodeState::Connecting,
    NodeState::Connected,
    NodeState::Unavailable,
    NodeState::Back,
    NodeState::Gone,
];

fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: &AtomicU64,
) -> std::fmt::Result {
    let c = ConstCounter::new(v.load(Ordering::Relaxed));
    c.encode(encoder.encode_descriptor(name, help, None, c.metric_type())?)
}

impl Collector for RelayCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let peers = self.peers.snapshot();
        let n = ConstGauge::new(peers.len() as i64);
        n.encode(encoder.encode_descriptor(
            "flowaudit_relay_peers",
            "Nodes (agents) the relay knows, in any state.",
            None,
            n.metric_type(),
        )?)?;
        let mut state = encoder.encode_descriptor(
            "flowaudit_relay_peer_state",
            "The relay's connection to each node: 1 for its current state (connecting, connected, unavailable, back, gone).",
            None,
            MetricType::Gauge,
        )?;
        for p in &peers {
            for s in STATES {
                let v = ConstGauge::new(i64::from(p.state == s));
                v.encode(
                    state.encode_family(&[("node", p.name.as_str()), ("state", state_name(s))])?,
                )?;
            }
        }
        for (name, help, value) in [
            (
                "flowaudit_relay_peer_flows",
                "Flows received from each node.",
                (|p: &super::peers::PeerInfo| p.flows) as fn(&super::peers::PeerInfo) -> u64,
            ),
            (
                "flowaudit_relay_peer_lost_events",
                "What each node's agent told the relay it lost (kernel losses, and flows its queue for the relay dropped).",
                |p| p.lost,
            ),
            (
                "flowaudit_relay_peer_connects",
                "Connections made to each node (1 + reconnections).",
                |p| p.connects,
            ),
        ] {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for p in &peers {
                ConstCounter::new(value(p))
                    .encode(family.encode_family(&[("node", p.name.as_str())])?)?;
            }
        }
        counter(
            &mut encoder,
            "flowaudit_relay_flows_merged",
            "Flows from every node that went through the sort window.",
            &self.stats.merged,
        )?;
        let mut joined = encoder.encode_descriptor(
            "flowaudit_relay_flows_joined",
            "Flows of the joined stream that stand for a connection: with both halves, or with one (the other did not come within the join window).",
            None,
            MetricType::Counter,
        )?;
        for (halves, v) in [("both", &self.stats.joined), ("one", &self.stats.alone)] {
            ConstCounter::new(v.load(Ordering::Relaxed))
                .encode(joined.encode_family(&[("halves", halves)])?)?;
        }
        counter(
            &mut encoder,
            "flowaudit_relay_flows_out_of_order",
            "Flows that arrived after a newer flow had already gone out (the node was later than the sort window).",
            &self.stats.out_of_order,
        )?;
        counter(
            &mut encoder,
            "flowaudit_relay_flows_malformed",
            "Flows a node sent that could not be read (skipped).",
            &self.stats.malformed,
        )?;
        Ok(())
    }
}

impl RelayMetrics {
    pub fn new(
        version: &'static str,
        stream: Arc<StreamCounters>,
        peers: Arc<Peers>,
        stats: Arc<RelayStats>,
    ) -> Self {
        let mut registry = Registry::default();
        let info: Family<[(&'static str, &'static str); 1], Gauge> = Family::default();
        info.get_or_create(&[("version", version)]).set(1);
        registry.register("flowaudit_build_info", "The relay's version.", info);
        registry.register(
            "flowaudit_stream_subscribers",
            "Clients following the relay's stream.",
            stream.subscribers.clone(),
        );
        registry.register(
            "flowaudit_stream_dropped",
            "Flows not delivered to a slow client of the relay (each was told by LostEvents).",
            stream.dropped.clone(),
        );
        registry.register_collector(Box::new(RelayCollector { peers, stats }));
        Self { registry }
    }

    pub fn openmetrics(&self) -> String {
        let mut out = String::with_capacity(4096);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
