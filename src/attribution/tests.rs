//! Attribution driven through hand-made timelines with known answers.

use etherparse::{PacketBuilder, TcpOptionElement};

use super::*;

const GUEST: [u8; 4] = [10, 77, 0, 2];
const REMOTE: [u8; 4] = [10, 77, 0, 1];
const MS: u64 = 1_000_000;

struct Seg {
    seq: u32,
    ack: u32,
    syn: bool,
    len: usize,
    ts: Option<(u32, u32)>,
}

fn seg(seq: u32, ack: u32, len: usize) -> Seg {
    Seg {
        seq,
        ack,
        syn: false,
        len,
        ts: None,
    }
}

/// A TCP frame between the remote end (port 40000) and the guest (port 5201).
fn tcp(to_guest: bool, s: Seg) -> Vec<u8> {
    let (src, dst, sport, dport) = if to_guest {
        (REMOTE, GUEST, 40000, 5201)
    } else {
        (GUEST, REMOTE, 5201, 40000)
    };
    let mut b = PacketBuilder::ethernet2([2; 6], [4; 6])
        .ipv4(src, dst, 64)
        .tcp(sport, dport, s.seq, 64000);
    if s.syn {
        b = b.syn();
    }
    if !s.syn || s.ack != 0 {
        b = b.ack(s.ack);
    }
    if let Some((val, ecr)) = s.ts {
        b = b
            .options(&[
                TcpOptionElement::Noop,
                TcpOptionElement::Noop,
                TcpOptionElement::Timestamp(val, ecr),
            ])
            .unwrap();
    }
    let mut out = Vec::new();
    b.write(&mut out, &vec![0x5a; s.len]).unwrap();
    out
}

struct Timeline {
    a: Attributor,
}

impl Timeline {
    fn new() -> Self {
        Timeline {
            a: Attributor::new(AttributionConfig {
                record_series: true,
                ..Default::default()
            }),
        }
    }

    /// A frame toward the guest, read from the tap at `t` and published `backend` later.
    fn rx(&mut self, frame: &[u8], t: u64, backend: u64) {
        self.a.on_rx(
            frame,
            frame.len(),
            RxStamps {
                host_in: t,
                ring: t + backend,
            },
        );
    }

    /// A frame from the guest, popped at `t` and written `backend` later.
    fn tx(&mut self, frame: &[u8], t: u64, backend: u64) {
        self.a.on_tx(
            frame,
            frame.len(),
            TxStamps {
                kick: t,
                pop: t,
                host_out: t + backend,
            },
        );
    }

    fn flow(&self) -> FlowSummary {
        let s = self.a.snapshot();
        assert_eq!(s.flows.len(), 1, "{:?}", s.flows);
        s.flows[0].clone()
    }
}

/// Request/response over TCP with timestamps: the remote end sends a request
/// at 0 which spends 20 ms outside, vsnoop takes 1 ms each way and the guest
/// answers 7 ms after the request is in its ring; then the remote end sends
/// the next request as soon as the answer arrives (after 20 ms outside).
#[test]
fn tcp_timestamps_split_a_round_trip() {
    let mut t = Timeline::new();
    let ts = |val, ecr| Some((val, ecr));
    let mut remote_ts = 1000u32;
    let mut guest_ts = 5000u32;
    // Handshake from the remote end.
    t.rx(
        &tcp(
            true,
            Seg {
                syn: true,
                ts: ts(remote_ts, 0),
                ..seg(99, 0, 0)
            },
        ),
        0,
        MS,
    );
    let mut syn_ack = seg(499, 100, 0);
    syn_ack.syn = true;
    syn_ack.ts = ts(guest_ts, remote_ts);
    t.tx(&tcp(false, syn_ack), 3 * MS, MS);
    let mut now = 20 * MS;
    let (mut rseq, mut gseq) = (100u32, 500u32);
    for _ in 0..10 {
        remote_ts += 1;
        t.rx(
            &tcp(
                true,
                Seg {
                    ts: ts(remote_ts, guest_ts),
                    ..seg(rseq, gseq, 100)
                },
            ),
            now,
            MS,
        );
        rseq += 100;
        guest_ts += 1;
        // In the ring at now + 1 ms; the guest answers 7 ms later.
        t.tx(
            &tcp(
                false,
                Seg {
                    ts: ts(guest_ts, remote_ts),
                    ..seg(gseq, rseq, 200)
                },
            ),
            now + 8 * MS,
            MS,
        );
        gseq += 200;
        // Out at now + 9 ms; the next request is read from the tap 20 ms later.
        now += 29 * MS;
    }
    let f = t.flow();
    assert_eq!(f.proto, "tcp");
    assert_eq!(f.method, "tcp-timestamps");
    assert_eq!(f.initiator, "remote");
    assert_eq!(
        (f.src.as_str(), f.sport, f.dst.as_str(), f.dport),
        ("10.77.0.1", 40000, "10.77.0.2", 5201)
    );
    let d = &f.delays;
    assert_eq!(d.guest_delay_ms.count, 11, "handshake and 10 requests");
    assert!(
        (d.guest_delay_ms.p50 - 7.0).abs() < 0.1,
        "{:?}",
        d.guest_delay_ms
    );
    assert!(
        (d.backend_delay_ms.p50 - 2.0).abs() < 0.05,
        "{:?}",
        d.backend_delay_ms
    );
    assert_eq!(d.outside_rtt_ms.count, 10);
    assert!(
        (d.outside_rtt_ms.p50 - 20.0).abs() < 0.2,
        "{:?}",
        d.outside_rtt_ms
    );
    assert!(
        (d.outside_rtt_ms.max - 20.0).abs() < 0.2,
        "{:?}",
        d.outside_rtt_ms
    );
    // What the remote end sees per request: 20 outside + 1 + 7 + 1.
    let total = d.outside_rtt_ms.p50 + d.backend_delay_ms.p50 + d.guest_delay_ms.p50;
    assert!((total - 29.0).abs() < 0.3, "{total}");
    assert_eq!(d.backend_rx_ms.count, 11);
    let series = t.a.series();
    assert_eq!(
        series
            .iter()
            .filter(|p| p.component == Component::Guest)
            .count(),
        11
    );
}

#[test]
fn pure_acks_toward_the_guest_open_no_guest_delay_sample() {
    let mut t = Timeline::new();
    // Guest sends data; the remote end's pure ACKs carry new TSvals that the
    // guest echoes only with its next data, whenever that is.
    t.tx(
        &tcp(
            false,
            Seg {
                ts: Some((1, 0)),
                ..seg(0, 0, 100)
            },
        ),
        0,
        MS,
    );
    t.rx(
        &tcp(
            true,
            Seg {
                ts: Some((50, 1)),
                ..seg(0, 100, 0)
            },
        ),
        10 * MS,
        MS,
    );
    t.tx(
        &tcp(
            false,
            Seg {
                ts: Some((2, 50)),
                ..seg(100, 0, 100)
            },
        ),
        500 * MS,
        MS,
    );
    let d = t.flow().delays;
    assert_eq!(d.guest_delay_ms.count, 0);
    assert_eq!(d.outside_rtt_ms.count, 1);
    assert!((d.outside_rtt_ms.p50 - 9.0).abs() < 0.1, "{:?}", d);
}

#[test]
fn seq_ack_without_timestamps_obeys_karn() {
    let mut t = Timeline::new();
    // Remote data 0..1000 in two segments, the first one retransmitted.
    t.rx(&tcp(true, seg(0, 0, 500)), 0, MS);
    t.rx(&tcp(true, seg(500, 0, 500)), MS, MS);
    t.rx(&tcp(true, seg(0, 0, 500)), 2 * MS, MS);
    // Guest ACKs 500 (ambiguous: no sample), then 1000 at 10 ms.
    t.tx(&tcp(false, seg(0, 500, 0)), 5 * MS, MS);
    t.tx(&tcp(false, seg(0, 1000, 0)), 10 * MS, MS);
    // Guest data 0..64000 as one GSO frame, ACKed in two steps.
    t.tx(&tcp(false, seg(0, 1000, 64000)), 20 * MS, MS);
    t.rx(&tcp(true, seg(1000, 32000, 0)), 30 * MS, MS);
    t.rx(&tcp(true, seg(1000, 64000, 0)), 31 * MS, MS);
    let f = t.flow();
    assert_eq!(f.method, "tcp-seq-ack");
    let d = f.delays;
    assert_eq!(d.guest_delay_ms.count, 1);
    assert!(
        (d.guest_delay_ms.p50 - 8.0).abs() < 0.1,
        "ring at 2 ms, ACK popped at 10 ms"
    );
    assert_eq!(d.outside_rtt_ms.count, 2, "both ACKs land in the GSO range");
    assert!((d.outside_rtt_ms.min - 9.0).abs() < 0.1);
    assert!((d.outside_rtt_ms.max - 10.0).abs() < 0.1);
}

#[test]
fn icmp_echo_both_ways() {
    let mut t = Timeline::new();
    let echo = |request: bool, to_guest: bool, seq: u16| {
        let (src, dst) = if to_guest {
            (REMOTE, GUEST)
        } else {
            (GUEST, REMOTE)
        };
        let b = PacketBuilder::ethernet2([2; 6], [4; 6]).ipv4(src, dst, 64);
        let b = if request {
            b.icmpv4_echo_request(77, seq)
        } else {
            b.icmpv4_echo_reply(77, seq)
        };
        let mut out = Vec::new();
        b.write(&mut out, &[0; 56]).unwrap();
        out
    };
    // Remote pings the guest: in the ring at 1 ms, the reply popped at 4 ms.
    t.rx(&echo(true, true, 1), 0, MS);
    t.tx(&echo(false, false, 1), 4 * MS, MS / 2);
    // Lost request 2, then request 3.
    t.rx(&echo(true, true, 2), 10 * MS, MS);
    t.rx(&echo(true, true, 3), 20 * MS, MS);
    t.tx(&echo(false, false, 3), 30 * MS, MS);
    let f = t.flow();
    assert_eq!((f.sport, f.dport, f.initiator.as_str()), (77, 0, "remote"));
    let d = f.delays;
    assert_eq!(d.guest_delay_ms.count, 2);
    assert!((d.guest_delay_ms.min - 3.0).abs() < 0.05, "{:?}", d);
    assert!((d.guest_delay_ms.max - 9.0).abs() < 0.1);
    assert!((d.backend_delay_ms.min - 1.5).abs() < 0.05);
    // The guest pings out: 20 ms outside.
    let mut t = Timeline::new();
    t.tx(&echo(true, false, 9), 0, MS);
    t.rx(&echo(false, true, 9), 21 * MS, MS);
    let f = t.flow();
    assert_eq!(
        (f.proto.as_str(), f.initiator.as_str(), f.method.as_str()),
        ("icmp", "guest", "icmp-echo")
    );
    assert_eq!((f.sport, f.dport), (77, 0));
    assert!((f.delays.outside_rtt_ms.p50 - 20.0).abs() < 0.2);
    assert_eq!(f.delays.guest_delay_ms.count, 0);
}

#[test]
fn udp_responses_match_requests_in_order() {
    let mut t = Timeline::new();
    let udp = |to_guest: bool| {
        let (src, dst, sp, dp) = if to_guest {
            (REMOTE, GUEST, 999, 53)
        } else {
            (GUEST, REMOTE, 53, 999)
        };
        let mut out = Vec::new();
        PacketBuilder::ethernet2([2; 6], [4; 6])
            .ipv4(src, dst, 64)
            .udp(sp, dp)
            .write(&mut out, &[1; 20])
            .unwrap();
        out
    };
    t.rx(&udp(true), 0, MS);
    t.rx(&udp(true), MS, MS);
    t.tx(&udp(false), 3 * MS, MS);
    t.tx(&udp(false), 7 * MS, MS);
    let f = t.flow();
    assert_eq!(
        (f.sport, f.dport, f.method.as_str()),
        (999, 53, "udp-request-response")
    );
    assert_eq!(f.delays.guest_delay_ms.count, 2);
    assert!(
        (f.delays.guest_delay_ms.min - 2.0).abs() < 0.05,
        "{:?}",
        f.delays
    );
    assert!((f.delays.guest_delay_ms.max - 5.0).abs() < 0.1);
}

#[test]
fn remote_acks_released_together_count_as_compression() {
    let mut t = Timeline::new();
    // Guest data, then 8 remote ACKs read 1 ms apart but published in the
    // guest ring in one batch at 20 ms (the guest's worker was busy).
    t.tx(&tcp(false, seg(0, 0, 8000)), 0, 10_000);
    for i in 0..8u32 {
        let host_in = (10 + u64::from(i)) * MS;
        let ring = 20 * MS + u64::from(i) * 1000;
        t.a.on_rx(
            &tcp(true, seg(0, (i + 1) * 1000, 0)),
            60,
            RxStamps { host_in, ring },
        );
    }
    let shape = t.flow().shape;
    assert_eq!(shape.remote_acks.acks, 8);
    assert_eq!(shape.remote_acks.events, 1);
    assert_eq!(shape.remote_acks.acks_in_events, 7);
    assert!(shape.remote_acks.spacing_ratio.p50 < 0.01);
    let iface = t.a.snapshot().interface_shape;
    assert_eq!(iface.remote_acks.events, 1);
}

#[test]
fn flow_table_is_bounded_and_unknown_frames_are_counted() {
    let mut a = Attributor::new(AttributionConfig {
        max_flows: 4,
        ..Default::default()
    });
    for port in 0..10u16 {
        let mut out = Vec::new();
        PacketBuilder::ethernet2([2; 6], [4; 6])
            .ipv4(REMOTE, GUEST, 64)
            .udp(port, 7)
            .write(&mut out, &[0; 4])
            .unwrap();
        a.on_rx(
            &out,
            out.len(),
            RxStamps {
                host_in: 1,
                ring: 2,
            },
        );
    }
    a.on_rx(
        &[0xff; 60],
        60,
        RxStamps {
            host_in: 3,
            ring: 4,
        },
    );
    let s = a.snapshot();
    assert_eq!(s.flows_tracked, 4);
    assert_eq!(s.flows_untracked, 6);
    assert_eq!(s.packets, 11);
    assert_eq!(s.packets_other, 1);
    assert_eq!(s.interface.backend_rx_ms.count, 11);
}

#[test]
fn idle_and_closed_flows_are_forgotten() {
    let mut t = Timeline::new();
    t.rx(&tcp(true, seg(0, 0, 10)), 0, MS);
    let mut rst = tcp(false, seg(0, 10, 0));
    rst[14 + 20 + 13] |= 0x04; // RST flag
    t.tx(&rst, MS, MS);
    assert!(t.flow().closed);
    // 11 s later another flow's packet triggers the sweep.
    let mut out = Vec::new();
    PacketBuilder::ethernet2([2; 6], [4; 6])
        .ipv4(REMOTE, GUEST, 64)
        .udp(1, 2)
        .write(&mut out, &[])
        .unwrap();
    t.rx(&out, 11_000 * MS, MS);
    let s = t.a.snapshot();
    assert_eq!(s.flows_evicted, 1);
    assert_eq!(s.flows.len(), 1);
    assert_eq!(s.flows[0].proto, "udp");
}

#[test]
fn snapshot_json_has_the_documented_fields() {
    let mut t = Timeline::new();
    t.rx(&tcp(true, seg(0, 0, 10)), 0, MS);
    let json = serde_json::to_value(t.a.snapshot()).unwrap();
    let flow = &json["flows"][0];
    for key in ["proto", "src", "dst", "sport", "dport"] {
        assert!(!flow[key].is_null(), "{key}");
    }
    for key in ["outside_rtt_ms", "backend_delay_ms", "guest_delay_ms"] {
        for field in ["count", "p50", "p90", "p99", "max"] {
            assert!(flow[key][field].is_number(), "{key}.{field}");
        }
    }
}
