//! What the attribution reports: plain, serializable summaries.
//!
//! These types are the JSON schema of `vsnoop stats --json` and the control
//! socket (documented in the README, section CONTROL SOCKET). All delays are
//! in milliseconds as `f64`; counts are integers.

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Percentiles of one distribution.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Samples recorded.
    pub count: u64,
    /// Smallest sample.
    pub min: f64,
    /// Mean.
    pub mean: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest sample.
    pub max: f64,
}

impl Summary {
    /// Summarises a histogram of values recorded in `unit`s, dividing each
    /// value by `scale` (1e6 turns nanoseconds into milliseconds).
    pub fn from_histogram(h: &Histogram<u64>, scale: f64) -> Summary {
        if h.is_empty() {
            return Summary::default();
        }
        // The middle of the percentile's bucket: unbiased within the 1 % resolution.
        let q = |q: f64| h.median_equivalent(h.value_at_quantile(q)) as f64 / scale;
        Summary {
            count: h.len(),
            min: h.min() as f64 / scale,
            mean: h.mean() / scale,
            p50: q(0.5),
            p90: q(0.9),
            p99: q(0.99),
            p999: q(0.999),
            max: h.max() as f64 / scale,
        }
    }
}

/// The delay components of one flow or of the whole interface.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DelaySummary {
    /// Outside round trip: a guest packet written to the tap (`host_out`)
    /// until the remote packet that answers it is read from the tap
    /// (`host_in`): network plus remote host.
    pub outside_rtt_ms: Summary,
    /// vsnoop's own share of one round trip through the guest: the request's
    /// `host_in` -> `ring` plus the answer's `pop` -> `host_out`.
    pub backend_delay_ms: Summary,
    /// A remote packet published in the guest's RX ring (`ring`) until the
    /// guest's answer is taken from its TX ring (`pop`): VM scheduling, guest
    /// stack and application, delayed ACK.
    pub guest_delay_ms: Summary,
    /// Every packet toward the guest: `host_in` -> `ring`.
    pub backend_rx_ms: Summary,
    /// Every packet from the guest: `pop` -> `host_out`.
    pub backend_tx_ms: Summary,
}

/// ACK compression of one stream of ACKs between two vantage points
/// (`upstream` seen first, `downstream` second).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AckCompressionSummary {
    /// ACKs that advanced the cumulative acknowledgment.
    pub acks: u64,
    /// Spacing ratios computed (upstream gap at least `delta`).
    pub ratios: u64,
    /// Fraction of ratios below 1 (compressed).
    pub compressed_fraction: f64,
    /// Compression events: maximal runs of at least `k` ratios <= `theta`.
    pub events: u64,
    /// ACKs inside compression events.
    pub acks_in_events: u64,
    /// `acks_in_events / ratios` (0 when no ratio).
    pub fraction_in_events: f64,
    /// Distribution of the spacing ratio (unitless).
    pub spacing_ratio: Summary,
    /// ACK inter-arrival at the upstream vantage point.
    pub gap_upstream_ms: Summary,
    /// ACK inter-arrival at the downstream vantage point.
    pub gap_downstream_ms: Summary,
    /// Kolmogorov-Smirnov distance between the two inter-arrival
    /// distributions (0 = same shape, 1 = disjoint).
    pub ks_distance: f64,
}

/// Send burstiness of data segments at one vantage point.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BurstSummary {
    /// Data segments seen.
    pub segments: u64,
    /// Bursts: maximal runs of segments closer than the burst gap.
    pub bursts: u64,
    /// Segments per burst.
    pub burst_size: Summary,
    /// Coefficient of variation of the inter-departure gaps.
    pub gap_cv: f64,
}

/// Burstiness of one direction's data at both vantage points.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DirectionBurstiness {
    /// At the upstream point (remote data: `host_in`; guest data: `pop`).
    pub upstream: BurstSummary,
    /// At the downstream point (remote data: `ring`; guest data: `host_out`).
    pub downstream: BurstSummary,
}

/// ACK compression and burstiness of one flow or the interface.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TrafficShape {
    /// Remote ACKs (toward the guest): upstream `host_in`, downstream `ring`.
    pub remote_acks: AckCompressionSummary,
    /// Guest ACKs (from the guest): upstream `pop`, downstream `host_out`.
    pub guest_acks: AckCompressionSummary,
    /// Remote data segments toward the guest.
    pub remote_data: DirectionBurstiness,
    /// Guest data segments toward the remote end.
    pub guest_data: DirectionBurstiness,
}

/// One flow.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FlowSummary {
    /// Flow id, stable while the flow is tracked.
    pub id: u64,
    /// "tcp", "udp", "icmp" or "icmpv6".
    pub proto: String,
    /// Address of the side that opened the flow (first packet seen).
    pub src: String,
    /// Address of the other side.
    pub dst: String,
    /// Source port (ICMP: echo identifier).
    pub sport: u16,
    /// Destination port (ICMP: 0).
    pub dport: u16,
    /// Which side opened the flow: "guest" or "remote".
    pub initiator: String,
    /// How samples are matched: "tcp-timestamps", "tcp-seq-ack",
    /// "icmp-echo" or "udp-request-response".
    pub method: String,
    /// TCP: an RST was seen, or FINs both ways.
    pub closed: bool,
    /// Frames toward the guest.
    pub packets_to_guest: u64,
    /// Frames from the guest.
    pub packets_from_guest: u64,
    /// Frame bytes toward the guest.
    pub bytes_to_guest: u64,
    /// Frame bytes from the guest.
    pub bytes_from_guest: u64,
    /// Seconds since the attribution started, first packet.
    pub first_seen_s: f64,
    /// Seconds since the attribution started, last packet.
    pub last_seen_s: f64,
    /// Delay components.
    #[serde(flatten)]
    pub delays: DelaySummary,
    /// ACK compression and burstiness (TCP only; zero otherwise).
    pub shape: TrafficShape,
}

/// Everything the attribution knows, at one moment.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Seconds since the attribution started.
    pub uptime_s: f64,
    /// Frames looked at.
    pub packets: u64,
    /// Frames that were not IPv4/IPv6 TCP, UDP or ICMP echo (not attributed).
    pub packets_other: u64,
    /// Flows tracked now.
    pub flows_tracked: u64,
    /// Flows forgotten after being idle.
    pub flows_evicted: u64,
    /// New flows not tracked because the flow table was full.
    pub flows_untracked: u64,
    /// Delay components over all flows.
    pub interface: DelaySummary,
    /// ACK compression and burstiness over all flows.
    pub interface_shape: TrafficShape,
    /// Per-flow tables, most packets first.
    pub flows: Vec<FlowSummary>,
}
