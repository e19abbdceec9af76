//! Per-flow state: which matcher applies, the samples so far, and the
//! ACK-compression and burst trackers.

use std::net::IpAddr;

use super::matcher::{serial_lt, Crossing, RequestMatcher, SeqMatcher, TsMatcher};
use super::packet::{flags, PacketMeta, TcpMeta, Transport};
use super::shape::{AckStats, AckTracker, BurstStats, BurstTracker, Dist, ShapeConfig};
use super::snapshot::{DelaySummary, DirectionBurstiness, TrafficShape};

/// Which way a packet crossed the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Read from the tap, published in the guest's RX ring.
    ToGuest,
    /// Taken from the guest's TX ring, written to the tap.
    FromGuest,
}

/// Transport protocol of a flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// ICMPv4 echo.
    Icmp,
    /// ICMPv6 echo.
    Icmpv6,
}

impl Proto {
    /// Name used in exports.
    pub fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Icmp => "icmp",
            Proto::Icmpv6 => "icmpv6",
        }
    }
}

/// A flow, oriented by the guest: (guest end, remote end). ICMP echo flows
/// use the echo identifier as the guest port and 0 as the remote port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowKey {
    /// Protocol.
    pub proto: Proto,
    /// Guest address.
    pub guest: IpAddr,
    /// Guest port.
    pub guest_port: u16,
    /// Remote address.
    pub remote: IpAddr,
    /// Remote port.
    pub remote_port: u16,
}

impl std::hash::Hash for FlowKey {
    // Three words instead of field by field: the flow lookup runs for every
    // frame.
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let bits = |a: IpAddr| match a {
            IpAddr::V4(v4) => u128::from(u32::from(v4)),
            IpAddr::V6(v6) => u128::from(v6) ^ (1 << 127),
        };
        state.write_u128(bits(self.guest));
        state.write_u128(bits(self.remote));
        state.write_u64(
            u64::from(self.guest_port)
                | u64::from(self.remote_port) << 16
                | (self.proto as u64) << 32,
        );
    }
}

/// The delay components, as histograms in nanoseconds.
#[derive(Clone, Debug, Default)]
pub struct Delays {
    /// Outside round trip.
    pub outside: Dist,
    /// vsnoop's share of a round trip through the guest.
    pub backend: Dist,
    /// Guest delay.
    pub guest: Dist,
    /// `host_in` -> `ring` of every packet toward the guest.
    pub backend_rx: Dist,
    /// `pop` -> `host_out` of every packet from the guest.
    pub backend_tx: Dist,
}

impl Delays {
    /// Summary in milliseconds.
    pub fn summary(&self) -> DelaySummary {
        DelaySummary {
            outside_rtt_ms: self.outside.summary(1e6),
            backend_delay_ms: self.backend.summary(1e6),
            guest_delay_ms: self.guest.summary(1e6),
            backend_rx_ms: self.backend_rx.summary(1e6),
            backend_tx_ms: self.backend_tx.summary(1e6),
        }
    }
}

/// ACK-compression and burst accumulators of the whole interface.
#[derive(Clone, Debug, Default)]
pub struct ShapeTotals {
    /// Remote ACKs (`host_in` -> `ring`).
    pub remote_acks: AckStats,
    /// Guest ACKs (`pop` -> `host_out`).
    pub guest_acks: AckStats,
    /// Remote data at `host_in` and at `ring`.
    pub remote_data: [BurstStats; 2],
    /// Guest data at `pop` and at `host_out`.
    pub guest_data: [BurstStats; 2],
}

impl ShapeTotals {
    /// Summary for export; `open` holds the (events, ACKs) of compression
    /// runs still open in live flows, remote ACKs first.
    pub fn summary(&self, open: [(u64, u64); 2]) -> TrafficShape {
        let pair = |b: &[BurstStats; 2]| DirectionBurstiness {
            upstream: b[0].summary(0),
            downstream: b[1].summary(0),
        };
        TrafficShape {
            remote_acks: self.remote_acks.summary_with_open_run(open[0].0, open[0].1),
            guest_acks: self.guest_acks.summary_with_open_run(open[1].0, open[1].1),
            remote_data: pair(&self.remote_data),
            guest_data: pair(&self.guest_data),
        }
    }
}

/// A round-trip sample found by a matcher.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sample {
    /// The guest answered a remote packet: request toward the guest,
    /// response from it.
    ThroughGuest {
        /// The remote packet.
        request: Crossing,
        /// The guest's answer.
        response: Crossing,
    },
    /// The remote end answered a guest packet.
    Outside {
        /// The guest packet.
        request: Crossing,
        /// The remote answer.
        response: Crossing,
    },
}

/// TCP-specific state.
#[derive(Clone, Debug, Default)]
pub struct TcpFlow {
    ts_seen: [bool; 2],
    /// Samples came from timestamps / from seq-ack.
    pub used_ts: bool,
    /// Samples came from seq/ack matching.
    pub used_seq: bool,
    ts: [TsMatcher; 2],
    seq: [SeqMatcher; 2],
    highest_ack: [Option<u32>; 2],
    acks: [AckTracker; 2],
    data: [[BurstTracker; 2]; 2],
    fin: [bool; 2],
    /// An RST was seen, or FINs both ways.
    pub closed: bool,
}

fn index(direction: Direction) -> usize {
    match direction {
        Direction::ToGuest => 0,
        Direction::FromGuest => 1,
    }
}

impl TcpFlow {
    /// Takes one segment; returns the round-trip sample it completes, if any.
    pub fn segment(
        &mut self,
        direction: Direction,
        tcp: &TcpMeta,
        at: Crossing,
        cfg: &ShapeConfig,
        totals: &mut ShapeTotals,
    ) -> Option<Sample> {
        let this = index(direction);
        let other = 1 - this;
        if tcp.timestamps.is_some() {
            self.ts_seen[this] = true;
        }
        let use_ts = self.ts_seen == [true, true] && tcp.timestamps.is_some();
        let mut request = None;
        if tcp.flags & flags::ACK != 0 {
            // Both matchers always advance so either can take over.
            let by_ts = tcp
                .timestamps
                .and_then(|(_, ecr)| self.ts[other].echoed(ecr));
            let by_seq = self.seq[other].acked(tcp.ack);
            request = if use_ts { by_ts } else { by_seq };
            if request.is_some() {
                if use_ts {
                    self.used_ts = true;
                } else {
                    self.used_seq = true;
                }
            }
            let advances = self.highest_ack[this].map_or(true, |h| serial_lt(h, tcp.ack));
            if advances {
                self.highest_ack[this] = Some(tcp.ack);
                let total = match direction {
                    Direction::ToGuest => &mut totals.remote_acks,
                    Direction::FromGuest => &mut totals.guest_acks,
                };
                self.acks[this].observe(at.first, at.second, cfg, total);
            }
        }
        if let Some((tsval, _)) = tcp.timestamps {
            // Toward the guest only what the guest must answer (data, SYN,
            // FIN) opens a sample, so guest delay is the guest's response to
            // data; from the guest every packet does, since a remote sender
            // answers the guest's pure ACKs with new data.
            if direction == Direction::FromGuest || !tcp.is_pure_ack() {
                self.ts[this].sent(tsval, at);
            }
        }
        if tcp.flags & flags::RST == 0 {
            self.seq[this].sent(tcp.seq, tcp.seq_len(), at);
        }
        if tcp.payload_len > 0 {
            let totals = match direction {
                Direction::ToGuest => &mut totals.remote_data,
                Direction::FromGuest => &mut totals.guest_data,
            };
            let [upstream, downstream] = &mut self.data[this];
            let [total_up, total_down] = totals;
            upstream.observe(at.first, cfg, total_up);
            downstream.observe(at.second, cfg, total_down);
        }
        if tcp.flags & flags::FIN != 0 {
            self.fin[this] = true;
        }
        if tcp.flags & flags::RST != 0 || self.fin == [true, true] {
            self.closed = true;
        }
        request.map(|request| match direction {
            Direction::FromGuest => Sample::ThroughGuest {
                request,
                response: at,
            },
            Direction::ToGuest => Sample::Outside {
                request,
                response: at,
            },
        })
    }

    /// "tcp-timestamps" when both sides use timestamps, else "tcp-seq-ack".
    pub fn method(&self) -> &'static str {
        if self.used_ts || (!self.used_seq && self.ts_seen == [true, true]) {
            "tcp-timestamps"
        } else {
            "tcp-seq-ack"
        }
    }

    /// Compression runs still open and long enough to be events: ACKs in
    /// each (remote ACKs, guest ACKs).
    pub fn open_events(&self, cfg: &ShapeConfig) -> [Option<u64>; 2] {
        [self.acks[0].open_event(cfg), self.acks[1].open_event(cfg)]
    }

    /// ACK compression and burstiness of this flow.
    pub fn shape(&self, cfg: &ShapeConfig) -> TrafficShape {
        let pair = |b: &[BurstTracker; 2]| DirectionBurstiness {
            upstream: b[0].summary(),
            downstream: b[1].summary(),
        };
        TrafficShape {
            remote_acks: self.acks[0].summary(cfg),
            guest_acks: self.acks[1].summary(cfg),
            remote_data: pair(&self.data[0]),
            guest_data: pair(&self.data[1]),
        }
    }
}

/// Request/response state of an ICMP echo or UDP flow: requests from the
/// remote end answered by the guest, and the reverse.
#[derive(Clone, Debug, Default)]
pub struct RequestFlow {
    from_remote: RequestMatcher,
    from_guest: RequestMatcher,
}

impl RequestFlow {
    /// A request (`is_request`) or response with `key` crossed in `direction`.
    pub fn packet(
        &mut self,
        direction: Direction,
        is_request: bool,
        key: u16,
        at: Crossing,
    ) -> Option<Sample> {
        match (direction, is_request) {
            (Direction::ToGuest, true) => {
                self.from_remote.request(key, at);
                None
            }
            (Direction::FromGuest, true) => {
                self.from_guest.request(key, at);
                None
            }
            (Direction::FromGuest, false) => {
                self.from_remote
                    .response(key)
                    .map(|request| Sample::ThroughGuest {
                        request,
                        response: at,
                    })
            }
            (Direction::ToGuest, false) => {
                self.from_guest
                    .response(key)
                    .map(|request| Sample::Outside {
                        request,
                        response: at,
                    })
            }
        }
    }
}

/// Protocol state of a flow.
#[derive(Clone, Debug)]
pub enum FlowState {
    /// TCP.
    Tcp(Box<TcpFlow>),
    /// ICMP echo or UDP.
    Request(RequestFlow),
}

impl Flow {
    /// A new flow whose first frame is `meta`, seen at `t` going `direction`.
    pub fn new(id: u64, direction: Direction, meta: &PacketMeta, t: u64) -> Flow {
        let (state, initiator) = match meta.transport {
            Transport::Tcp { tcp, .. } => {
                // A SYN-ACK's sender is the responder.
                let syn_ack = tcp.flags & flags::SYN != 0 && tcp.flags & flags::ACK != 0;
                let initiator = match (direction, syn_ack) {
                    (d, false) => d,
                    (Direction::ToGuest, true) => Direction::FromGuest,
                    (Direction::FromGuest, true) => Direction::ToGuest,
                };
                (FlowState::Tcp(Box::default()), initiator)
            }
            _ => (FlowState::Request(RequestFlow::default()), direction),
        };
        Flow {
            id,
            initiator,
            first_seen: t,
            last_seen: t,
            to_guest: (0, 0),
            from_guest: (0, 0),
            delays: Delays::default(),
            state,
        }
    }
}

/// One tracked flow.
#[derive(Clone, Debug)]
pub struct Flow {
    /// Stable id (series refer to it).
    pub id: u64,
    /// Side that sent the flow's first packet (a SYN-ACK counts for the other side).
    pub initiator: Direction,
    /// First packet (ns).
    pub first_seen: u64,
    /// Last packet (ns).
    pub last_seen: u64,
    /// Frames and frame bytes toward the guest.
    pub to_guest: (u64, u64),
    /// Frames and frame bytes from the guest.
    pub from_guest: (u64, u64),
    /// Delay histograms.
    pub delays: Delays,
    /// Protocol state.
    pub state: FlowState,
}
