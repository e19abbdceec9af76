//! Passive delay attribution at the guest boundary.
//!
//! Every frame crosses two vantage points with one clock: toward the guest
//! `host_in` (read from the tap) then `ring` (published in the RX used ring);
//! from the guest `pop` (taken from the TX avail ring) then `host_out`
//! (written to the tap). The [`Attributor`] matches packets with the packets
//! that answer them and splits each round trip into
//!
//! - **outside**: guest packet `host_out` -> remote answer `host_in`
//!   (network and remote host);
//! - **backend**: `host_in` -> `ring` of the remote packet plus `pop` ->
//!   `host_out` of the guest's answer (vsnoop itself);
//! - **guest**: `ring` -> `pop` of the guest's answer (VM scheduling, guest
//!   stack, application, delayed ACK),
//!
//! so outside + backend + guest is the round trip the remote end sees.
//! Matching (docs: delay-attribution.md): TCP timestamps where both sides use
//! them, else seq/ack with Karn's rule and byte ranges for GSO frames; ICMP
//! echo by identifier and sequence; UDP by 5-tuple, responses in order.
//! It also measures ACK compression and send burstiness ([`shape`]).
//!
//! The attributor is a plain state machine fed with parsed frames and
//! timestamps: the daemon feeds it live ([`hook::AttributionHook`]) and
//! `vsnoop report` feeds it from a capture file.

pub mod flow;
pub mod hook;
pub mod matcher;
pub mod packet;
pub mod shape;
pub mod snapshot;

use std::collections::hash_map::Entry;

use ahash::AHashMap;

use flow::{Delays, Direction, Flow, FlowKey, FlowState, Proto, Sample, ShapeTotals};
use matcher::Crossing;
use packet::{PacketMeta, Transport};
pub use shape::ShapeConfig;
pub use snapshot::{FlowSummary, Snapshot, Summary};

use crate::timing::{RxStamps, TxStamps};

/// Limits and parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttributionConfig {
    /// Flows tracked at most; new flows beyond it are counted, not tracked.
    pub max_flows: usize,
    /// Flows idle this long (ns) are forgotten (closed TCP flows after 10 s).
    pub idle_timeout_ns: u64,
    /// ACK-compression and burst parameters.
    pub shape: ShapeConfig,
    /// Keep every sample with its time (for `vsnoop report` time series).
    pub record_series: bool,
    /// Keep the summary of every flow forgotten (for `vsnoop report`, which
    /// lists every flow of a capture: closed TCP flows are forgotten 10 s
    /// after they close whatever `idle_timeout_ns` says).
    pub keep_forgotten: bool,
}

impl Default for AttributionConfig {
    fn default() -> Self {
        AttributionConfig {
            max_flows: 16_384,
            idle_timeout_ns: 300 * NS_PER_S,
            shape: ShapeConfig::default(),
            record_series: false,
            keep_forgotten: false,
        }
    }
}

const NS_PER_S: u64 = 1_000_000_000;
const CLOSED_TIMEOUT_NS: u64 = 10 * NS_PER_S;

/// A delay component.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Component {
    /// Outside round trip.
    Outside,
    /// Backend share of a round trip through the guest.
    Backend,
    /// Guest delay.
    Guest,
}

impl Component {
    /// Name used in exports ("outside_rtt", "backend_delay", "guest_delay").
    pub fn name(self) -> &'static str {
        match self {
            Component::Outside => "outside_rtt",
            Component::Backend => "backend_delay",
            Component::Guest => "guest_delay",
        }
    }
}

/// One sample with its time, kept when `record_series` is set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SeriesPoint {
    /// When the answer crossed its first vantage point (ns, capture clock).
    pub t_ns: u64,
    /// Flow id ([`FlowSummary::id`]).
    pub flow: u64,
    /// Component.
    pub component: Component,
    /// Value (ns).
    pub value_ns: u64,
}

/// The attributor's counters (see [`Snapshot`] for their meaning).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Frames looked at.
    pub packets: u64,
    /// Frames not attributed.
    pub packets_other: u64,
    /// Flows tracked now.
    pub flows_tracked: u64,
    /// Flows forgotten after being idle.
    pub flows_evicted: u64,
    /// New flows not tracked because the table was full.
    pub flows_untracked: u64,
}

/// The attribution state machine.
#[derive(Debug)]
pub struct Attributor {
    config: AttributionConfig,
    start: Option<u64>,
    now: u64,
    last_sweep: u64,
    table: FlowTable,
    packets: u64,
    packets_other: u64,
    delays: Delays,
    shape: ShapeTotals,
    series: Vec<SeriesPoint>,
    forgotten: Vec<FlowSummary>,
}

/// The bounded flow table.
#[derive(Debug)]
struct FlowTable {
    // aHash: fast, and keyed per process so peers cannot aim collisions.
    flows: AHashMap<FlowKey, Flow>,
    max_flows: usize,
    next_id: u64,
    evicted: u64,
    untracked: u64,
}

impl Attributor {
    /// An empty attributor.
    pub fn new(config: AttributionConfig) -> Self {
        Attributor {
            config,
            start: None,
            now: 0,
            last_sweep: 0,
            table: FlowTable {
                flows: AHashMap::new(),
                max_flows: config.max_flows,
                next_id: 1,
                evicted: 0,
                untracked: 0,
            },
            packets: 0,
            packets_other: 0,
            delays: Delays::default(),
            shape: ShapeTotals::default(),
            series: Vec::new(),
            forgotten: Vec::new(),
        }
    }

    /// A frame toward the guest: `frame` is (a prefix of) the Ethernet frame,
    /// `frame_len` its full length.
    pub fn on_rx(&mut self, frame: &[u8], frame_len: usize, stamps: RxStamps) {
        let at = Crossing {
            first: stamps.host_in,
            second: stamps.ring,
        };
        self.on_frame(Direction::ToGuest, frame, frame_len, at);
    }

    /// A frame from the guest.
    pub fn on_tx(&mut self, frame: &[u8], frame_len: usize, stamps: TxStamps) {
        let at = Crossing {
            first: stamps.pop,
            second: stamps.host_out,
        };
        self.on_frame(Direction::FromGuest, frame, frame_len, at);
    }

    fn on_frame(&mut self, direction: Direction, frame: &[u8], frame_len: usize, at: Crossing) {
        self.packets += 1;
        self.start.get_or_insert(at.first);
        self.now = self.now.max(at.second);
        let backend = at.second.saturating_sub(at.first);
        match direction {
            Direction::ToGuest => self.delays.backend_rx.record(backend),
            Direction::FromGuest => self.delays.backend_tx.record(backend),
        }
        let Some(meta) = packet::parse(frame) else {
            self.packets_other += 1;
            return;
        };
        if self.now.saturating_sub(self.last_sweep) >= NS_PER_S {
            self.sweep();
        }
        let key = flow_key(direction, &meta);
        if self.table.flows.len() >= self.config.max_flows && !self.table.flows.contains_key(&key) {
            self.sweep();
        }
        let Some(flow) = self.table.get_or_create(key, direction, &meta, at.first) else {
            return;
        };
        let config = self.config;
        flow.last_seen = at.second;
        let counters = match direction {
            Direction::ToGuest => &mut flow.to_guest,
            Direction::FromGuest => &mut flow.from_guest,
        };
        counters.0 += 1;
        counters.1 += frame_len as u64;
        match direction {
            Direction::ToGuest => flow.delays.backend_rx.record(backend),
            Direction::FromGuest => flow.delays.backend_tx.record(backend),
        }
        let sample = match (&mut flow.state, meta.transport) {
            (FlowState::Tcp(tcp), Transport::Tcp { tcp: segment, .. }) => {
                tcp.segment(direction, &segment, at, &config.shape, &mut self.shape)
            }
            (FlowState::Request(r), Transport::Echo { request, seq, .. }) => {
                r.packet(direction, request, seq, at)
            }
            (FlowState::Request(r), Transport::Udp { .. }) => {
                r.packet(direction, direction == flow.initiator, 0, at)
            }
            _ => None,
        };
        let Some(sample) = sample else { return };
        let id = flow.id;
        let mut record = |component: Component, t: u64, value: u64| {
            let (flow_dist, total) = match component {
                Component::Outside => (&mut flow.delays.outside, &mut self.delays.outside),
                Component::Backend => (&mut flow.delays.backend, &mut self.delays.backend),
                Component::Guest => (&mut flow.delays.guest, &mut self.delays.guest),
            };
            flow_dist.record(value);
            total.record(value);
            if config.record_series {
                self.series.push(SeriesPoint {
                    t_ns: t,
                    flow: id,
                    component,
                    value_ns: value,
                });
            }
        };
        match sample {
            Sample::ThroughGuest { request, response } => {
                let guest = response.first.saturating_sub(request.second);
                let backend = request
                    .second
                    .saturating_sub(request.first)
                    .saturating_add(response.second.saturating_sub(response.first));
                record(Component::Guest, response.first, guest);
                record(Component::Backend, response.first, backend);
            }
            Sample::Outside { request, response } => {
                let outside = response.first.saturating_sub(request.second);
                record(Component::Outside, response.first, outside);
            }
        }
    }

    /// Forgets idle flows (their samples stay in the interface totals).
    fn sweep(&mut self) {
        self.last_sweep = self.now;
        let now = self.now;
        let idle = self.config.idle_timeout_ns;
        let keep = |f: &Flow| {
            let age = now.saturating_sub(f.last_seen);
            let closed = matches!(&f.state, FlowState::Tcp(t) if t.closed);
            age < idle && !(closed && age >= CLOSED_TIMEOUT_NS)
        };
        let before = self.table.flows.len();
        if self.config.keep_forgotten {
            self.summarise_forgotten(keep);
        }
        self.table.flows.retain(|_, f| keep(f));
        self.table.evicted += (before - self.table.flows.len()) as u64;
    }

    /// Copies the summaries of the flows `keep` rejects into `forgotten`
    /// (the caller then removes the flows).
    fn summarise_forgotten(&mut self, keep: impl Fn(&Flow) -> bool) {
        let start = self.start.unwrap_or(self.now);
        let secs = |t: u64| t.saturating_sub(start) as f64 / 1e9;
        let gone: Vec<FlowKey> = self
            .table
            .flows
            .iter()
            .filter(|(_, f)| !keep(f))
            .map(|(k, _)| *k)
            .collect();
        for key in gone {
            if let Some(flow) = self.table.flows.get(&key) {
                let summary = self.flow_summary(&key, flow, &secs);
                self.forgotten.push(summary);
            }
        }
    }

    /// Everything known now; flows with the most packets first.
    pub fn snapshot(&self) -> Snapshot {
        let start = self.start.unwrap_or(self.now);
        let secs = |t: u64| t.saturating_sub(start) as f64 / 1e9;
        let mut flows: Vec<FlowSummary> = self
            .table
            .flows
            .iter()
            .map(|(key, flow)| self.flow_summary(key, flow, &secs))
            .collect();
        flows.sort_by(|a, b| {
            (b.packets_to_guest + b.packets_from_guest)
                .cmp(&(a.packets_to_guest + a.packets_from_guest))
                .then(a.id.cmp(&b.id))
        });
        Snapshot {
            uptime_s: secs(self.now),
            packets: self.packets,
            packets_other: self.packets_other,
            flows_tracked: self.table.flows.len() as u64,
            flows_evicted: self.table.evicted,
            flows_untracked: self.table.untracked,
            interface: self.delays.summary(),
            interface_shape: self.shape.summary(self.open_events()),
            flows,
        }
    }

    fn flow_summary(&self, key: &FlowKey, flow: &Flow, secs: &dyn Fn(u64) -> f64) -> FlowSummary {
        let guest_first = flow.initiator == Direction::FromGuest;
        let (src, mut sport, dst, mut dport) = if guest_first {
            (key.guest, key.guest_port, key.remote, key.remote_port)
        } else {
            (key.remote, key.remote_port, key.guest, key.guest_port)
        };
        if matches!(key.proto, Proto::Icmp | Proto::Icmpv6) {
            // The echo identifier, whichever side sent the requests.
            (sport, dport) = (key.guest_port, 0);
        }
        let (method, shape, closed) = match (&flow.state, key.proto) {
            (FlowState::Tcp(t), _) => (t.method(), t.shape(&self.config.shape), t.closed),
            (_, Proto::Udp) => ("udp-request-response", Default::default(), false),
            _ => ("icmp-echo", Default::default(), false),
        };
        FlowSummary {
            id: flow.id,
            proto: key.proto.name().into(),
            src: src.to_string(),
            dst: dst.to_string(),
            sport,
            dport,
            initiator: if guest_first { "guest" } else { "remote" }.into(),
            method: method.into(),
            closed,
            packets_to_guest: flow.to_guest.0,
            packets_from_guest: flow.from_guest.0,
            bytes_to_guest: flow.to_guest.1,
            bytes_from_guest: flow.from_guest.1,
            first_seen_s: secs(flow.first_seen),
            last_seen_s: secs(flow.last_seen),
            delays: flow.delays.summary(),
            shape,
        }
    }

    /// The counters alone, without summarising any flow (cheap).
    pub fn counters(&self) -> Counters {
        Counters {
            packets: self.packets,
            packets_other: self.packets_other,
            flows_tracked: self.table.flows.len() as u64,
            flows_evicted: self.table.evicted,
            flows_untracked: self.table.untracked,
        }
    }

    /// (events, ACKs) of compression runs still open, remote and guest ACKs.
    fn open_events(&self) -> [(u64, u64); 2] {
        let mut open = [(0, 0); 2];
        for flow in self.table.flows.values() {
            if let FlowState::Tcp(tcp) = &flow.state {
                for (total, run) in open.iter_mut().zip(tcp.open_events(&self.config.shape)) {
                    if let Some(acks) = run {
                        total.0 += 1;
                        total.1 += acks;
                    }
                }
            }
        }
        open
    }

    /// Interface-wide delay histograms (ns), for plots and metrics.
    pub fn delays(&self) -> &Delays {
        &self.delays
    }

    /// Interface-wide ACK-compression and burst accumulators.
    pub fn shape(&self) -> &ShapeTotals {
        &self.shape
    }

    /// Samples with their times (empty unless `record_series`).
    pub fn series(&self) -> &[SeriesPoint] {
        &self.series
    }

    /// Summaries of the flows forgotten so far, as they were when forgotten
    /// (empty unless `keep_forgotten`).
    pub fn forgotten(&self) -> &[FlowSummary] {
        &self.forgotten
    }

    /// The configuration in use.
    pub fn config(&self) -> &AttributionConfig {
        &self.config
    }
}

impl FlowTable {
    /// The flow for `key`, created if there is room.
    fn get_or_create(
        &mut self,
        key: FlowKey,
        direction: Direction,
        meta: &PacketMeta,
        t: u64,
    ) -> Option<&mut Flow> {
        let full = self.flows.len() >= self.max_flows;
        match self.flows.entry(key) {
            Entry::Occupied(e) => Some(e.into_mut()),
            Entry::Vacant(_) if full => {
                self.untracked += 1;
                None
            }
            Entry::Vacant(e) => {
                let id = self.next_id;
                self.next_id += 1;
                Some(e.insert(Flow::new(id, direction, meta, t)))
            }
        }
    }
}

fn flow_key(direction: Direction, meta: &PacketMeta) -> FlowKey {
    let (guest, remote) = match direction {
        Direction::ToGuest => (meta.dst, meta.src),
        Direction::FromGuest => (meta.src, meta.dst),
    };
    let (proto, guest_port, remote_port) = match meta.transport {
        Transport::Tcp { sport, dport, .. } | Transport::Udp { sport, dport } => {
            let proto = if matches!(meta.transport, Transport::Tcp { .. }) {
                Proto::Tcp
            } else {
                Proto::Udp
            };
            match direction {
                Direction::ToGuest => (proto, dport, sport),
                Direction::FromGuest => (proto, sport, dport),
            }
        }
        Transport::Echo { v6, id, .. } => (if v6 { Proto::Icmpv6 } else { Proto::Icmp }, id, 0),
    };
    FlowKey {
        proto,
        guest,
        guest_port,
        remote,
        remote_port,
    }
}

#[cfg(test)]
mod tests;
