//! One test (at least) per contract rule, with frames built by etherparse:
//! a remote sender at 10.0.0.1:80 and the guest at 10.0.0.2:5000.

use super::flow::{Mode, OfflineReason, TxVerdict};
use super::wire::{self, flags, TcpSegment};
use super::*;
use etherparse::{PacketBuilder, TcpOptionElement};

// Above 2^31, so every comparison must be sequence-space arithmetic.
const REMOTE_ISN: u32 = 0x8000_1000;
const GUEST_ISN: u32 = 0xc000_0000;
const GUEST_WS: u8 = 2;

/// Options of a test connection.
#[derive(Clone, Copy)]
struct Conn {
    timestamps: bool,
    wscale: bool,
    ecn: bool,
    ipv6: bool,
}

impl Default for Conn {
    fn default() -> Self {
        Conn {
            timestamps: true,
            wscale: true,
            ecn: false,
            ipv6: false,
        }
    }
}

/// One TCP segment to build.
#[derive(Clone, Default)]
struct Seg {
    seq: u32,
    ack: u32,
    flags: u8,
    window: u16,
    ts: Option<(u32, u32)>,
    sack: Vec<(u32, u32)>,
    payload: Vec<u8>,
    ce: bool,
    extra: Vec<TcpOptionElement>,
}

fn build(conn: &Conn, from_guest: bool, s: &Seg) -> Vec<u8> {
    let (smac, dmac) = if from_guest {
        ([2; 6], [1; 6])
    } else {
        ([1; 6], [2; 6])
    };
    let (sport, dport) = if from_guest { (5000, 80) } else { (80, 5000) };
    let b = PacketBuilder::ethernet2(smac, dmac);
    let b = if conn.ipv6 {
        let (a, z) = ([0xfd; 16], [0xfe; 16]);
        let (src, dst) = if from_guest { (z, a) } else { (a, z) };
        b.ipv6(src, dst, 64)
    } else {
        let (src, dst) = if from_guest {
            ([10, 0, 0, 2], [10, 0, 0, 1])
        } else {
            ([10, 0, 0, 1], [10, 0, 0, 2])
        };
        b.ipv4(src, dst, 64)
    };
    let mut t = b.tcp(sport, dport, s.seq, s.window);
    if s.flags & flags::ACK != 0 {
        t = t.ack(s.ack);
    }
    if s.flags & flags::SYN != 0 {
        t = t.syn();
    }
    if s.flags & flags::FIN != 0 {
        t = t.fin();
    }
    if s.flags & flags::RST != 0 {
        t = t.rst();
    }
    if s.flags & flags::PSH != 0 {
        t = t.psh();
    }
    if s.flags & flags::URG != 0 {
        t = t.urg(0);
    }
    if s.flags & flags::ECE != 0 {
        t = t.ece();
    }
    if s.flags & flags::CWR != 0 {
        t = t.cwr();
    }
    let mut opts = s.extra.clone();
    if let Some((a, b)) = s.ts {
        opts.push(TcpOptionElement::Timestamp(a, b));
    }
    if !s.sack.is_empty() {
        let mut rest = [None, None, None];
        for (i, b) in s.sack.iter().skip(1).enumerate() {
            rest[i] = Some(*b);
        }
        opts.push(TcpOptionElement::SelectiveAcknowledgement(s.sack[0], rest));
    }
    let t = t.options(&opts).unwrap();
    let mut out = Vec::new();
    t.write(&mut out, &s.payload).unwrap();
    if s.ce {
        // ECN CE in the IPv4 TOS byte (fix the header checksum).
        out[15] |= 3;
        wire::set_ipv4_checksum(&mut out[14..34]);
    }
    out
}

fn parse(frame: &[u8]) -> TcpSegment {
    wire::parse(frame, frame.len()).expect("a TCP frame")
}

/// The engine and a clock; the data path's calls in the data path's order.
struct Harness {
    eng: AckOffload,
    counters: Arc<OffloadCounters>,
    conn: Conn,
    now: u64,
    /// Largest TSval the remote used.
    remote_ts: u32,
    guest_ts: u32,
    /// Remote's next sequence number.
    rseq: u32,
}

impl Harness {
    fn new(conn: Conn) -> Harness {
        Harness::with(conn, OffloadConfig::default())
    }

    fn with(conn: Conn, cfg: OffloadConfig) -> Harness {
        let counters = Arc::new(OffloadCounters::default());
        Harness {
            eng: AckOffload::new(cfg, 1, counters.clone()),
            counters,
            conn,
            now: 1_000_000,
            remote_ts: 7_000,
            guest_ts: 90_000,
            rseq: REMOTE_ISN + 1,
        }
    }

    /// Default connection, custody budget of `bytes`.
    fn with_budget(bytes: usize) -> Harness {
        Harness::with(
            Conn::default(),
            OffloadConfig {
                custody_budget: bytes,
                ..OffloadConfig::default()
            },
        )
    }

    fn stats(&self) -> OffloadStats {
        self.counters
            .snapshot(self.eng.enabled(), self.eng.draining())
    }

    /// A remote frame through RX, not yet published: the token for
    /// `remote_published`, if it brought new bytes.
    fn rx_unpublished(&mut self, frame: &[u8], checksum: RxChecksum) -> Option<RxToken> {
        self.now += 1_000;
        let mut copy = |off: usize, buf: &mut [u8]| {
            let n = buf.len().min(frame.len().saturating_sub(off));
            buf[..n].copy_from_slice(&frame[off..off + n]);
            n
        };
        self.eng
            .remote_rx(0, frame, frame.len(), checksum, &mut copy, self.now)
    }

    /// A remote frame through RX, as its own RX batch: returns the early
    /// ACK, if any (sent at once, or at the end of the batch: rule 12).
    fn rx_frame(&mut self, frame: &[u8], checksum: RxChecksum) -> Option<Vec<u8>> {
        let token = self.rx_unpublished(frame, checksum)?;
        let mut out = Vec::new();
        if self.eng.remote_published(&token, &mut out) {
            return Some(out);
        }
        (self.eng.flush_acks(&mut out, &mut Vec::new()) > 0).then_some(out)
    }

    /// A remote frame through RX inside a batch (no flush): the early ACK
    /// sent at once, if any.
    fn rx_in_batch(&mut self, s: Seg) -> Option<Vec<u8>> {
        let f = build(&self.conn, false, &s);
        let token = self.rx_unpublished(&f, RxChecksum::Partial)?;
        let mut out = Vec::new();
        self.eng.remote_published(&token, &mut out).then_some(out)
    }

    /// The end of an RX batch: the early ACKs that waited.
    fn flush(&mut self) -> Vec<Vec<u8>> {
        let (mut out, mut ends) = (Vec::new(), Vec::new());
        let n = self.eng.flush_acks(&mut out, &mut ends);
        assert_eq!(n, ends.len());
        let mut start = 0;
        ends.iter()
            .map(|&end| {
                let f = out[start..end].to_vec();
                start = end;
                f
            })
            .collect()
    }

    /// The next `len` bytes from the remote, in order, as a segment.
    fn next_seg(&mut self, len: usize) -> Seg {
        let ts = self.ts_r();
        let seq = self.rseq;
        self.rseq = self.rseq.wrapping_add(len as u32);
        Seg {
            seq,
            ack: GUEST_ISN + 1,
            flags: flags::ACK | flags::PSH,
            window: 502,
            ts,
            payload: (0..len).map(|i| (seq as usize + i) as u8).collect(),
            ..Seg::default()
        }
    }

    fn rx(&mut self, s: Seg) -> Option<Vec<u8>> {
        let f = build(&self.conn, false, &s);
        self.rx_frame(&f, RxChecksum::Partial)
    }

    /// A guest frame through TX: the verdict and the frame as sent.
    fn tx_frame(&mut self, frame: &[u8], needs_csum: bool) -> (TxVerdict, Vec<u8>) {
        self.now += 1_000;
        let mut f = frame.to_vec();
        let v = self.eng.guest_tx(&mut f, frame.len(), needs_csum, self.now);
        (v, f)
    }

    fn tx(&mut self, s: Seg) -> (TxVerdict, Vec<u8>) {
        let f = build(&self.conn, true, &s);
        self.tx_frame(&f, false)
    }

    fn ts_r(&mut self) -> Option<(u32, u32)> {
        self.remote_ts += 1;
        self.conn
            .timestamps
            .then_some((self.remote_ts, self.guest_ts))
    }

    fn ts_g(&mut self) -> Option<(u32, u32)> {
        self.guest_ts += 1;
        self.conn
            .timestamps
            .then_some((self.guest_ts, self.remote_ts))
    }

    /// Remote-initiated handshake; the flow is Active afterwards.
    fn handshake(&mut self) {
        let offloaded = self.stats().flows_offloaded;
        let mut syn_opts = vec![TcpOptionElement::MaximumSegmentSize(1460)];
        if self.conn.wscale {
            syn_opts.push(TcpOptionElement::WindowScale(7));
        }
        let ts = self.ts_r();
        let ecn = if self.conn.ecn {
            flags::ECE | flags::CWR
        } else {
            0
        };
        assert!(self
            .rx(Seg {
                seq: REMOTE_ISN,
                flags: flags::SYN | ecn,
                window: 64_240,
                ts,
                extra: syn_opts,
                ..Seg::default()
            })
            .is_none());
        let mut opts = vec![TcpOptionElement::MaximumSegmentSize(1460)];
        if self.conn.wscale {
            opts.push(TcpOptionElement::WindowScale(GUEST_WS));
        }
        let ts = self.ts_g();
        let ecn = if self.conn.ecn { flags::ECE } else { 0 };
        // The SYN-ACK's window is never scaled: the same edge as the
        // scaled 1000 of the guest's next ACK.
        let syn_window = if self.conn.wscale {
            1000 << GUEST_WS
        } else {
            1000
        };
        let (v, _) = self.tx(Seg {
            seq: GUEST_ISN,
            ack: REMOTE_ISN + 1,
            flags: flags::SYN | flags::ACK | ecn,
            window: syn_window,
            ts,
            extra: opts,
            ..Seg::default()
        });
        assert_eq!(v, TxVerdict::Pass);
        let ts = self.ts_r();
        assert!(self
            .rx(Seg {
                seq: REMOTE_ISN + 1,
                ack: GUEST_ISN + 1,
                flags: flags::ACK,
                window: 502,
                ts,
                ..Seg::default()
            })
            .is_none());
        // The guest's first window update after the handshake (scaled).
        let ts = self.ts_g();
        self.guest_ack(REMOTE_ISN + 1, 1000, ts);
        assert_eq!(self.stats().flows_offloaded, offloaded + 1);
    }

    /// A remote SYN without options (for handshakes built step by step).
    fn plain_remote_syn(&mut self) {
        let ts = self.ts_r();
        self.rx(Seg {
            seq: REMOTE_ISN,
            flags: flags::SYN,
            window: 64_240,
            ts,
            ..Seg::default()
        });
    }

    /// The remote's handshake ACK (`ack` acknowledging the guest) with the
    /// first 50 bytes of data; the early ACK, if any.
    fn first_remote_data(&mut self, ack: u32) -> Option<Vec<u8>> {
        let ts = self.ts_r();
        self.rx(Seg {
            seq: REMOTE_ISN + 1,
            ack,
            flags: flags::ACK,
            window: 502,
            ts,
            payload: vec![7; 50],
            ..Seg::default()
        })
    }

    fn guest_ack(&mut self, ack: u32, window: u16, ts: Option<(u32, u32)>) -> (TxVerdict, Vec<u8>) {
        self.tx(Seg {
            seq: GUEST_ISN + 1,
            ack,
            flags: flags::ACK,
            window,
            ts,
            ..Seg::default()
        })
    }

    /// A guest ACK (window 1000) with one SACK block.
    fn guest_sack(&mut self, ack: u32, block: (u32, u32)) -> (TxVerdict, Vec<u8>) {
        let ts = self.ts_g();
        self.tx(Seg {
            seq: GUEST_ISN + 1,
            ack,
            flags: flags::ACK,
            window: 1000,
            ts,
            sack: vec![block],
            ..Seg::default()
        })
    }

    /// The next `len` bytes from the remote, in order, as their own RX batch.
    fn data(&mut self, len: usize) -> Option<Vec<u8>> {
        let s = self.next_seg(len);
        self.rx(s)
    }

    fn key(&self) -> FlowKey {
        let f = build(&self.conn, true, &Seg::default());
        FlowKey::of(&parse(&f), true)
    }

    fn mode(&self) -> Mode {
        self.eng.mode_of(&self.key()).expect("flow tracked")
    }
}

fn right_edge(ack: &TcpSegment) -> u64 {
    u64::from(ack.ack) + (u64::from(ack.window) << GUEST_WS)
}

fn tcp_ok(frame: &[u8]) -> bool {
    let s = parse(frame);
    wire::tcp_checksum_ok(&s, &frame[s.tcp_at..])
}

#[test]
fn early_ack_follows_published_data_with_every_field_per_the_rules() {
    let mut h = Harness::new(Conn::default());
    h.handshake();
    let ack = parse(&h.data(1000).expect("early ACK"));
    assert_eq!(ack.ack, REMOTE_ISN + 1 + 1000);
    // Rule 7: our sequence number is the guest's snd_nxt.
    assert_eq!(ack.seq, GUEST_ISN + 1);
    // Rule 6: the window never reaches past Gedge (guest ack + 1000 << 2).
    let gedge = u64::from(REMOTE_ISN + 1) + (1000 << GUEST_WS);
    assert!(right_edge(&ack) <= gedge);
    assert!(gedge - right_edge(&ack) < 1 << GUEST_WS);
    // Rule 8: TSval is the guest's largest; rule 9: TSecr echoes the segment.
    assert_eq!(ack.options.timestamps, Some((h.guest_ts, h.remote_ts)));
    assert!(ack.is_pure_ack() && ack.ecn == 0 && !ack.has(flags::ECE));
    assert!(tcp_ok(&h.data(10).unwrap()));
    let s = h.stats();
    assert_eq!((s.early_acks, s.early_acked_bytes), (2, 1010));
}

#[test]
fn rule_1_mid_stream_flows_are_never_offloaded() {
    let mut h = Harness::new(Conn::default());
    assert!(h.data(100).is_none());
    assert!(h.data(100).is_none());
    assert_eq!(h.stats().passthrough["mid_stream"], 1);
    assert_eq!(h.stats().flows_offloaded, 0);
    // The guest's ACKs pass untouched.
    let (v, _) = h.guest_ack(REMOTE_ISN + 1, 100, None);
    assert_eq!(v, TxVerdict::Pass);
}

#[test]
fn rule_1_md5_ao_mptcp_fastopen_accecn_and_urg_stay_pass_through() {
    let cases: Vec<(Vec<TcpOptionElement>, u8, Vec<u8>, &str)> = vec![
        (
            vec![TcpOptionElement::Noop; 0],
            flags::URG,
            vec![],
            "urgent",
        ),
        (vec![], 0, b"tfo".to_vec(), "syn_data"),
        (vec![], flags::FIN, vec![], "syn_data"),
    ];
    for (extra, extra_flags, payload, reason) in cases {
        let mut h = Harness::new(Conn::default());
        h.rx(Seg {
            seq: REMOTE_ISN,
            flags: flags::SYN | extra_flags,
            window: 1000,
            extra,
            payload,
            ..Seg::default()
        });
        assert_eq!(h.stats().passthrough[reason], 1, "{reason}");
    }
    // Option kinds etherparse cannot build: patch a NOP block.
    for (kind, reason) in [
        (wire::option::MD5, "md5"),
        (wire::option::AO, "tcp_ao"),
        (wire::option::MPTCP, "mptcp"),
        (wire::option::FASTOPEN, "syn_data"),
    ] {
        let mut h = Harness::new(Conn::default());
        let mut f = build(
            &h.conn,
            false,
            &Seg {
                seq: REMOTE_ISN,
                flags: flags::SYN,
                window: 1000,
                extra: vec![TcpOptionElement::Noop; 4],
                ..Seg::default()
            },
        );
        let opt = 14 + 20 + 20;
        f[opt] = kind;
        f[opt + 1] = 4;
        let s = parse(&f);
        let t = s.tcp_at;
        wire::set_tcp_checksum(s.version, &s.src, &s.dst, &mut f[t..]);
        h.rx_frame(&f, RxChecksum::Valid);
        assert_eq!(h.stats().passthrough[reason], 1, "{reason}");
    }
    // AccECN: the SYN sets AE (bit 0 of byte 12) with ECE and CWR.
    let mut h = Harness::new(Conn::default());
    let mut f = build(
        &h.conn,
        false,
        &Seg {
            seq: REMOTE_ISN,
            flags: flags::SYN | flags::ECE | flags::CWR,
            window: 1000,
            ..Seg::default()
        },
    );
    f[14 + 20 + 12] |= 1;
    h.rx_frame(&f, RxChecksum::Valid);
    assert_eq!(h.stats().passthrough["accecn"], 1);
}

#[test]
fn rule_1_and_13_a_guest_syn_ack_carrying_fin_keeps_the_flow_out() {
    // Found by the fuzz target: the FIN on the guest's SYN-ACK was ignored,
    // the flow went active and remote data was acknowledged early although
    // the guest had sent its FIN (rule 13: offline after the guest's FIN).
    let mut h = Harness::new(Conn::default());
    h.plain_remote_syn();
    let ts = h.ts_g();
    h.tx(Seg {
        seq: GUEST_ISN,
        ack: REMOTE_ISN + 1,
        flags: flags::SYN | flags::ACK | flags::FIN,
        window: 65_535,
        ts,
        ..Seg::default()
    });
    let early = h.first_remote_data(GUEST_ISN + 2);
    assert!(early.is_none(), "no early ACK for a guest that sent FIN");
    assert_eq!(h.stats().passthrough["syn_data"], 1);
    assert_eq!(h.stats().flows_offloaded, 0);
}

#[test]
fn rule_13_a_guest_fin_during_the_handshake_keeps_the_flow_offline() {
    let mut h = Harness::new(Conn::default());
    h.plain_remote_syn();
    // A FIN before the guest's SYN-ACK (no Linux guest does this).
    let ts = h.ts_g();
    h.tx(Seg {
        seq: GUEST_ISN + 1,
        ack: REMOTE_ISN + 1,
        flags: flags::FIN,
        window: 1000,
        ts,
        ..Seg::default()
    });
    let ts = h.ts_g();
    h.tx(Seg {
        seq: GUEST_ISN,
        ack: REMOTE_ISN + 1,
        flags: flags::SYN | flags::ACK,
        window: 65_535,
        ts,
        ..Seg::default()
    });
    let early = h.first_remote_data(GUEST_ISN + 1);
    assert!(early.is_none(), "no early ACK after the guest's FIN");
    assert_eq!(h.mode(), Mode::Offline(OfflineReason::GuestFin));
    assert_eq!(h.stats().offline["guest_fin"], 1);
    assert_eq!(h.stats().flows_offloaded, 1);
}

#[test]
fn rule_13_a_fin_on_a_guest_syn_in_an_established_flow_takes_it_offline() {
    // Found by the fuzz target: the SYN branch returned before the FIN was
    // looked at, and early ACKs went on.
    let mut h = Harness::new(Conn::default());
    h.handshake();
    h.data(1000).unwrap();
    let ts = h.ts_g();
    h.tx(Seg {
        seq: GUEST_ISN + 1,
        ack: h.rseq,
        flags: flags::SYN | flags::FIN | flags::ACK,
        window: 1000,
        ts,
        ..Seg::default()
    });
    assert_eq!(h.mode(), Mode::Offline(OfflineReason::GuestFin));
    assert!(h.data(100).is_none(), "no early ACK after the guest's FIN");
}

#[test]
fn rule_6_a_window_the_guest_gave_during_the_handshake_bounds_the_first_early_ack() {
    // Found by the fuzz target: in a simultaneous open the guest ACKed
    // with a small window before the remote's SYN arrived, and the flow
    // was established with the SYN's larger window.
    let mut h = Harness::new(Conn::default());
    let ts = h.ts_g();
    h.tx(Seg {
        seq: GUEST_ISN,
        flags: flags::SYN,
        window: 65_535,
        ts,
        extra: vec![TcpOptionElement::WindowScale(GUEST_WS)],
        ..Seg::default()
    });
    let ts = h.ts_g();
    h.guest_ack(REMOTE_ISN + 1, 1000, ts);
    let ts = h.ts_r();
    h.rx(Seg {
        seq: REMOTE_ISN,
        flags: flags::SYN,
        window: 64_240,
        ts,
        extra: vec![TcpOptionElement::WindowScale(7)],
        ..Seg::default()
    });
    let ts = h.ts_r();
    let f = h
        .rx(Seg {
            seq: REMOTE_ISN + 1,
            ack: GUEST_ISN + 1,
            flags: flags::ACK,
            window: 502,
            ts,
            payload: vec![1; 8000],
            ..Seg::default()
        })
        .expect("early ACK");
    let a = parse(&f);
    let edge = REMOTE_ISN + 1 + (1000 << GUEST_WS);
    assert_eq!(a.ack, edge, "up to the guest's edge, not past it");
    assert_eq!(a.window, 0);
}

#[test]
fn rule_1_an_accecn_responder_keeps_the_flow_out() {
    let mut h = Harness::new(Conn {
        ecn: true,
        ..Conn::default()
    });
    h.rx(Seg {
        seq: REMOTE_ISN,
        flags: flags::SYN | flags::ECE | flags::CWR,
        window: 1000,
        ..Seg::default()
    });
    // An AccECN responder answers with CWR set (RFC 9768 table 2).
    h.tx(Seg {
        seq: GUEST_ISN,
        ack: REMOTE_ISN + 1,
        flags: flags::SYN | flags::ACK | flags::CWR,
        window: 1000,
        ..Seg::default()
    });
    h.rx(Seg {
        seq: REMOTE_ISN + 1,
        ack: GUEST_ISN + 1,
        flags: flags::ACK,
        window: 1000,
        ..Seg::default()
    });
    assert_eq!(h.stats().passthrough["accecn"], 1);
    assert!(h.data(100).is_none());
}

#[test]
fn rule_2_a_hole_stops_early_acks_until_the_guest_catches_up() {
    let mut h = Harness::new(Conn::default());
    h.handshake();
    assert!(h.data(100).is_some());
    // Skip 100 bytes: out of order.
    h.rseq += 100;
    assert!(h.data(100).is_none());
    assert_eq!(h.mode(), Mode::Offline(OfflineReason::Hole));
    assert_eq!(h.stats().offline["hole"], 1);
    // The retransmission fills the hole: still no early ACK (offline).
    let ts = h.ts_r();
    let hole = REMOTE_ISN + 1 + 100;
    assert!(h
        .rx(Seg {
            seq: hole,
            ack: GUEST_ISN + 1,
            flags: flags::ACK,
            window: 502,
            ts,
            payload: vec![0; 100],
            ..Seg::default()
        })
        .is_none());
    // The guest acknowledges everything (it held the rest out of order).
    let ts = h.ts_g();
    let (v, _) = h.guest_ack(h.rseq, 1000, ts);
    assert_eq!(v, TxVerdict::Pass);
    assert_eq!(h.mode(), Mode::Active);
    assert_eq!(h.stats().back_online, 1);
    let ack = parse(&h.data(50).expect("online again"));
    assert_eq!(ack.ack, h.rseq);
}

#[test]
fn rule_4_unverified_data_is_acknowledged_only_with_a_good_checksum() {
    let mut h = Harness::new(Conn::default());
    h.handshake();
    let ts = h.ts_r();
    let seg = Seg {
        seq: h.rseq,
        ack: GUEST_ISN + 1,
        flags: flags::ACK,
        window: 502,
        ts,
        payload: vec![9; 300],
        ..Seg::default()
    };
    let mut bad = build(&h.conn, false, &seg);
    let last = bad.len() - 1;
    bad[last] ^= 1;
    assert!(h.rx_frame(&bad, RxChecksum::Unknown).is_none());
    assert_eq!(h.stats().offline["bad_checksum"], 1);
    // The same segment intact (the sender's retransmission) is fine, once
    // the flow is back online.
    let ts = h.ts_g();
    h.guest_ack(h.rseq, 1000, ts);
    let good = build(&h.conn, false, &seg);
    assert!(h.rx_frame(&good, RxChecksum::Unknown).is_some());
    assert_eq!(h.stats().checksums_verified, 2);
    // What the host validated is not checked again.
    h.rseq += 300;
    h.data(100).unwrap();
    assert_eq!(h.stats().checksums_verified, 2);
}

#[test]
fn rule_5_custody_redelivers_what_the_guest_dropped_and_suppresses_its_dupacks() {
    let mut h = Harness::new(Conn::default());
    h.handshake();
    let start = h.rseq;
    for _ in 0..3 {
        assert!(h.data(500).is_some());
    }
    assert_eq!(h.eng.custody_bytes(), 1500);
    // The guest dropped everything: duplicate ACKs at the old point.
    let ts = h.ts_g();
    assert_eq!(h.guest_ack(start, 1000, ts).0, TxVerdict::Suppress);
    let ts = h.ts_g();
    assert_eq!(h.guest_ack(start, 1000, ts).0, TxVerdict::Suppress);
    let mut frames = Vec::new();
    h.eng.take_guest_frames(0, &mut frames);
    assert!(!frames.is_empty());
    let mut got = Vec::new();
    for f in &frames {
        let s = parse(f);
        assert!(tcp_ok(f));
        assert_eq!(s.seq, start + got.len() as u32);
        // Re-delivered segments carry the remote's newest TSval (PAWS-safe).
        assert_eq!(s.options.timestamps.unwrap().0, h.remote_ts);
        got.extend_from_slice(&f[s.payload_at..]);
    }
    let want: Vec<u8> = (0..1500).map(|i| (start as usize + i) as u8).collect();
    assert_eq!(got, want);
    let s = h.stats();
    assert_eq!((s.redeliveries, s.redelivered_bytes), (1, 1500));
    // The guest confirms: custody empties.
    let ts = h.ts_g();
    assert_eq!(h.guest_ack(h.rseq, 1000, ts).0, TxVerdict::Pass);
    assert_eq!(h.eng.custody_bytes(), 0);
}

#[test]
fn rule_5_a_silent_guest_gets_redeliveries_then_both_ends_are_reset() {
    let mut h = Harness::new(Conn::default());
    h.handshake();
    assert!(h.data(800).is_some());
    let mut frames = Vec::new();
    let mut t = h.now;
    // Backoff 0.2 s .. 12.8 s; a silent guest only fails the attempts made at
    // the longest backoff: six of them, then the reset (about 90 s in all).
    let mut reset_at = None;
    for _ in 0..100 {
        t += 1_500_000_000;
        h.eng.tick(t);
        if reset_at.is_none() && h.stats().resets > 0 {
            reset_at = Some(t - h.now);
        }
    }
    let s = h.stats();
    assert!(s.redeliveries >= 10, "{s:?}");
    assert_eq!(s.resets, 1);
    let reset_at = reset_at.unwrap();
    assert!(
        (60_000_000_000..120_000_000_000).contains(&reset_at),
        "{reset_at}"
    );
    assert_eq!(h.eng.flows(), 0);
    assert_eq!(h.eng.custody_bytes(), 0);
    let mut host = Vec::new();
    h.eng.take_host_frames(&mut host);
    assert_eq!(host.len(), 1);
    let rst = parse(&host[0]);
    assert!(rst.has(flags::RST) && tcp_ok(&host[0]));
    assert_eq!((rst.sport, rst.seq), (5000, GUEST_ISN + 1));
    h.eng.take_guest_frames(0, &mut frames);
    let to_guest: Vec<_> = frames.iter().map(|f| parse(f)).collect();
    assert!(to_guest
        .iter()
        .any(|s| s.has(flags::RST) && s.dport == 5000));
}

#[test]
fn rule_5_a_descheduled_guest_that_catches_up_is_never_reset() {
    let mut h = Harness::new(Conn::default());
    h.handshake();
    assert!(h.data(800).is_some());
    // Descheduled for 30 s: re-deliveries with backoff, none counted as failed.
    let mut t = h.now;
    for _ in 0..300 {
        t += 100_000_000;
        h.eng.tick(t);
    }
    let s = h.stats();
    assert!(s.redeliveries >= 3, "{s:?}");
    assert_eq!(s.resets, 0);
    // It runs again and acknowledges everything, duplicates D-SACKed.
    h.now = t;
    let ts = h.ts_g();
    assert_eq!(h.guest_ack(h.rseq, 1000, ts).0, TxVerdict::Pass);
    assert_eq!(h.eng.custody_bytes(), 0);
    assert_eq!(h.mode(), Mode::Active);
    assert!(h.data(800).is_some());
}

/// A flow reset while it owed bytes and reopened with the same addresses
/// and ports before the timer ran: the new flow owes, times out and is
/// re-delivered like any other; once it caught up the engine is drained.
#[test]
fn rule_5_a_flow_reopened_with_the_same_key_keeps_its_custody_timer() {
    let mut h = Harness::new(Conn::default());
    h.handshake();
    h.data(800).unwrap();
    h.rx(Seg {
        seq: h.rseq,
        flags: flags::RST,
        ..Seg::default()
    });
    assert_eq!(h.eng.flows(), 0);
    assert!(h.eng.drained(), "a forgotten flow owes nothing");
    h.rseq = REMOTE_ISN + 1;
    h.handshake();
    h.data(800).unwrap();
    assert!(!h.eng.drained());
    h.eng.tick(h.now + 250_000_000);
    assert_eq!(h.stats().redeliveries, 1);
    let ts = h.ts_g();
    assert_eq!(h.guest_ack(h.rseq, 1000, ts).0, TxVerdict::Pass);
    assert!(h.eng.drained());
    h.eng.tick(h.now + 60_000_000_000);
    assert_eq!(
        h.stats().redeliveries,
        1,
        "nothing owed, nothing re-delivered"
    );
}

#[test]
fn rule_5_the_custody_timeout_runs_from_the_first_byte_owed() {
    let mut h = Harness::new(Conn::default());
    h.handshake();
    // The connection idles for a second after the handshake.
    h.now += 1_000_000_000;
    h.eng.tick(h.now);
    assert!(h.data(800).is_some());
    // 100 ms later the guest has not answered yet: not a timeout.
    h.eng.tick(h.now + 100_000_000);
    assert_eq!(h.stats().redeliveries, 0);
    h.eng.tick(h.now + 250_000_000);
    assert_eq!(h.stats().redeliveries, 1);
}

#[test]
fn rule_5_a_dsack_of_our_redelivery_does_not_trigger_another() {
    let mut h = Harness::new(Conn::default());
    h.handshake();
    let start = h.rseq;
    assert!(h.data(1000).is_some());
    assert!(h.data(1000).is_some());
    // Timeout: the custody is re-delivered while the guest still held it.
    h.eng.tick(h.now + 300_000_000);
    let mut frames = Vec::new();
    h.eng.take_guest_frames(0, &mut frames);
    assert!(!frames.is_empty());
    assert_eq!(h.stats().redeliveries, 1);
    // The guest acknowledged the first 1000 bytes, then D-SACKs the
    // duplicates it got, twice, without moving its ACK further yet.
    let ts = h.ts_g();
    h.guest_ack(start + 1000, 1000, ts);
    for _ in 0..3 {
        let (v, _) = h.guest_sack(start + 1000, (start, start + 1000));
        assert_eq!(v, TxVerdict::Suppress);
    }
    h.eng.take_guest_frames(0, &mut frames);
    assert_eq!(h.stats().redeliveries, 1, "a D-SACK is not a hole");
}

#[test]
fn rule_5_no_custody_budget_means_no_offload() {
    let mut h = Harness::with_budget(1000);
    h.handshake();
    assert!(h.data(800).is_some());
    // This one does not fit: not acknowledged early.
    assert!(h.data(800).is_none());
    assert_eq!(h.stats().offline["custody_budget"], 1);
    assert!(h.eng.custody_bytes() <= 1000);
}

#[test]
fn rule_6_window_bound_zero_window_and_retracted_edge() {
    let mut h = Harness::with(
        Conn::default(),
        OffloadConfig {
            window_bound: 1024,
            ..OffloadConfig::default()
        },
    );
    h.handshake();
    let ack = parse(&h.data(100).unwrap());
    assert!(u32::from(ack.window) << GUEST_WS <= 1024);
    // Zero window: offline, and no early ACK however much arrives.
    let ts = h.ts_g();
    h.guest_ack(h.rseq, 0, ts);
    assert_eq!(h.mode(), Mode::Offline(OfflineReason::ZeroWindow));
    assert!(
        h.data(1).is_none(),
        "zero-window probe goes to the guest, unacknowledged"
    );
    // A retracted edge also takes the flow offline.
    let mut h = Harness::new(Conn::default());
    h.handshake();
    h.data(100).unwrap();
    let ts = h.ts_g();
    h.guest_ack(REMOTE_ISN + 1 + 100, 10, ts);
    assert_eq!(h.mode(), Mode::Offline(OfflineReason::WindowRetracted));
}

#[test]
fn rule_6_the_ack_never_passes_the_guest_edge() {
    let mut h = Harness::new(Conn::default());
    h.handshake();
    // Gedge = Gack + 1000 << 2 = 4000 bytes: send 6000.
    let mut last = None;
    for _ in 0..6 {
        if let Some(a) = h.data(1000) {
            last = Some(parse(&a));
        }
    }
    let a = last.unwrap();
    assert_eq!(a.ack, REMOTE_ISN + 1 + 4000);
    assert_eq!(a.window, 0);
}

#[test]
fn rule_8_and_9_timestamps_never_run_ahead_or_backwards() {
    let mut h = Harness::new(Conn::default());
    h.handshake();
    let a1 = parse(&h.data(100).unwrap()).options.timestamps.unwrap();
    // An older remote TSval on the next in-order segment (reordered clocks).
    let seq = h.rseq;
    h.rseq += 100;
    let a2 = h
        .rx(Seg {
            seq,
            ack: GUEST_ISN + 1,
            flags: flags::ACK,
            window: 502,
            ts: Some((h.remote_ts - 5, h.guest_ts)),
            payload: vec![1; 100],
            ..Seg::default()
        })
        .map(|f| parse(&f).options.timestamps.unwrap())
        .unwrap();
    assert_eq!(a1.0, h.guest_ts);
    assert_eq!(a2.0, h.guest_ts);
    assert!(a2.1 >= a1.1, "TSecr went back: {a1:?} -> {a2:?}");
    // A guest packet echoing an older TSval is rewritten up.
    let (v, f) = h.tx(Seg {
        seq: GUEST_ISN + 1,
        ack: REMOTE_ISN + 1,
        flags: flags::ACK | flags::PSH,
        window: 1000,
        ts: Some((h.guest_ts + 1, a1.1 - 3)),
        payload: b"reply".to_vec(),
        ..Seg::default()
    });
    assert_eq!(v, TxVerdict::Rewritten);
    let s = parse(&f);
    assert_eq!(s.options.timestamps.unwrap().1, a2.1);
    assert!(tcp_ok(&f));
}

#[test]
fn rule_10_stale_guest_acks_are_suppressed_and_others_rewritten() {
    let mut h = Harness::new(Conn::default());
    h.handshake();
    let start = h.rseq;
    h.data(1000).unwrap();
    h.data(1000).unwrap();
    let e = h.rseq;
    // A pure ACK below E with nothing new (its edge is where the sender
    // already was told): suppressed.
    let ts = h.ts_g();
    assert_eq!(h.guest_ack(start + 1000, 750, ts).0, TxVerdict::Suppress);
    // The guest sends data with a stale ACK: rewritten to E, checksum fixed
    // incrementally (the payload stays as it was).
    let ts = h.ts_g();
    let (v, f) = h.tx(Seg {
        seq: GUEST_ISN + 1,
        ack: start + 1000,
        flags: flags::ACK | flags::PSH,
        window: 1000,
        ts,
        payload: b"hello".to_vec(),
        ..Seg::default()
    });
    assert_eq!(v, TxVerdict::Rewritten);
    let s = parse(&f);
    assert_eq!(s.ack, e);
    assert!(
        u64::from(s.ack) + (u64::from(s.window) << GUEST_WS)
            <= u64::from(start + 1000) + (1000 << GUEST_WS)
    );
    assert!(tcp_ok(&f));
    assert_eq!(&f[s.payload_at..], b"hello");
    // The first guest ACK that reaches E passes (it carries the fresh window).
    let ts = h.ts_g();
    assert_eq!(h.guest_ack(e, 1000, ts).0, TxVerdict::Pass);
    // An ACK beyond E passes and moves E.
    h.data(10).unwrap();
    let ts = h.ts_g();
    let (v, f) = h.guest_ack(h.rseq, 1000, ts);
    assert_ne!(v, TxVerdict::Suppress);
    assert_eq!(parse(&f).ack, h.rseq);
    let s = h.stats();
    assert_eq!((s.guest_acks_suppressed, s.guest_acks_rewritten), (1, 1));
}

/// An offloaded flow whose guest opened its window to 20000 bytes (that
/// ACK, at E, passes), then got 2000 bytes, early-ACKed. Returns the
/// harness and the sequence number the data started at.
fn window_of_20000_with_2000_bytes_acked_early() -> (Harness, u32) {
    let mut h = Harness::new(Conn::default());
    h.handshake();
    let start = h.rseq;
    let ts = h.ts_g();
    assert_ne!(h.guest_ack(start, 5000, ts).0, TxVerdict::Suppress);
    h.data(1000).unwrap();
    h.data(1000).unwrap();
    (h, start)
}

#[test]
fn rule_10_a_small_window_update_below_e_waits_for_the_next_early_ack() {
    let (mut h, start) = window_of_20000_with_2000_bytes_acked_early();
    // E = start + 2000; the sender knows the edge start + 20000 (18000
    // bytes beyond E). A lagging ACK that moves the edge by 1000 bytes:
    // not worth an ACK of its own.
    let ts = h.ts_g();
    let (v, _) = h.guest_ack(start + 1000, 5000, ts);
    assert_eq!(v, TxVerdict::Suppress);
    let s = h.stats();
    assert_eq!((s.guest_acks_suppressed, s.window_updates_deferred), (1, 1));
    // The next early ACK carries that edge.
    let a = parse(&h.data(1000).unwrap());
    assert_eq!(a.ack, start + 3000);
    assert_eq!(right_edge(&a), u64::from(start + 1000 + 20_000));
    // An update that doubles the window beyond E goes out at once, rewritten to E.
    let ts = h.ts_g();
    let (v, f) = h.guest_ack(start + 1500, 12_000, ts);
    assert_eq!(v, TxVerdict::Rewritten);
    let r = parse(&f);
    assert_eq!(r.ack, start + 3000);
    assert_eq!(right_edge(&r), u64::from(start + 1500 + 48_000));
    assert!(tcp_ok(&f));
    // A super-segment fills the window to 1500 bytes beyond E: the sender
    // may be stopped by it, so even a small update goes out.
    let a = parse(&h.data(45_000).unwrap());
    assert_eq!(a.ack, start + 48_000);
    let ts = h.ts_g();
    let (v, f) = h.guest_ack(start + 2000, 12_001, ts);
    assert_eq!(v, TxVerdict::Rewritten);
    assert_eq!(right_edge(&parse(&f)), u64::from(start + 2000 + 48_004));
    // The guest catches up (its ACK at E passes) and reopens wide.
    let ts = h.ts_g();
    assert_ne!(
        h.guest_ack(start + 48_000, 12_001, ts).0,
        TxVerdict::Suppress
    );
    // While a migration drains the offload no early ACK follows: a small
    // update below E is rewritten, not held back.
    h.data(1000).unwrap();
    h.data(1000).unwrap();
    h.eng.set_draining(true, h.now);
    let ts = h.ts_g();
    let (v, _) = h.guest_ack(start + 49_000, 12_001, ts);
    assert_eq!(v, TxVerdict::Rewritten);
    assert_eq!(h.stats().window_updates_deferred, 1);
}

#[test]
fn rule_10_an_offline_flow_sends_small_window_updates_at_once() {
    let (mut h, start) = window_of_20000_with_2000_bytes_acked_early();
    // A hole takes the flow offline: no early ACK will carry the window.
    h.rseq += 100;
    assert!(h.data(100).is_none());
    assert_eq!(h.mode(), Mode::Offline(OfflineReason::Hole));
    // The same small update that waits while the flow is active
    // (rule_10_a_small_window_update_below_e_waits_for_the_next_early_ack)
    // goes out now, rewritten to E.
    let ts = h.ts_g();
    let (v, f) = h.guest_ack(start + 1000, 5000, ts);
    assert_eq!(v, TxVerdict::Rewritten);
    assert_eq!(parse(&f).ack, start + 2000);
    assert_eq!(right_edge(&parse(&f)), u64::from(start + 1000 + 20_000));
    assert_eq!(h.stats().window_updates_deferred, 0);
}

#[test]
fn rule_10_needs_csum_packets_keep_their_seed_and_sack_below_e_is_removed() {
    let mut h = Harness::new(Conn::default());
    h.handshake();
    let start = h.rseq;
    h.data(1000).unwrap();
    h.data(1000).unwrap();
    let e = h.rseq;
    let ts = h.ts_g();
    let seg = Seg {
        seq: GUEST_ISN + 1,
        ack: start,
        flags: flags::ACK,
        window: 1000,
        ts,
        sack: vec![(start + 1000, start + 2000), (e + 100, e + 200)],
        ..Seg::default()
    };
    let f = build(&h.conn, true, &seg);
    let seed = parse(&f).checksum;
    let (v, out) = h.tx_frame(&f, true);
    assert_eq!(v, TxVerdict::Rewritten);
    let s = parse(&out);
    assert_eq!(
        s.checksum, seed,
        "NEEDS_CSUM: the checksum field is left alone"
    );
    assert_eq!(s.ack, e);
    let blocks: Vec<_> = wire::sack_blocks(&out, &s).collect();
    assert_eq!(blocks, vec![(e + 100, e + 200)]);
}

#[test]
fn rule_11_ce_marks_are_echoed_until_cwr() {
    let mut h = Harness::new(Conn {
        ecn: true,
        ..Conn::default()
    });
    h.handshake();
    let ts = h.ts_r();
    let seq = h.rseq;
    h.rseq += 100;
    let a = h
        .rx(Seg {
            seq,
            ack: GUEST_ISN + 1,
            flags: flags::ACK,
            window: 502,
            ts,
            payload: vec![0; 100],
            ce: true,
            ..Seg::default()
        })
        .unwrap();
    let a = parse(&a);
    assert!(a.has(flags::ECE));
    assert_eq!(a.ecn, 0, "our ACKs are Not-ECT");
    assert!(parse(&h.data(10).unwrap()).has(flags::ECE));
    // The sender reduced its window.
    let ts = h.ts_r();
    let seq = h.rseq;
    h.rseq += 10;
    let a = h
        .rx(Seg {
            seq,
            ack: GUEST_ISN + 1,
            flags: flags::ACK | flags::CWR,
            window: 502,
            ts,
            payload: vec![0; 10],
            ..Seg::default()
        })
        .unwrap();
    assert!(!parse(&a).has(flags::ECE));
    assert_eq!(h.stats().ece_acks, 2, "the two early ACKs with ECE");
    assert_eq!(h.stats().early_acks, 3);
}

#[test]
fn rule_12_every_published_segment_is_acknowledged() {
    let mut h = Harness::new(Conn::default());
    h.handshake();
    for _ in 0..2 {
        assert!(h.data(1448).is_some());
    }
    // A GRO/GSO super-segment: one ACK for it, up to the guest's edge
    // (Gedge = Gack + 1000 << 2).
    let big = h.data(3000).map(|f| parse(&f).ack);
    assert_eq!(big, Some(REMOTE_ISN + 1 + 4000));
}

#[test]
fn rule_13_fin_and_rst_sequence_space_is_never_acknowledged() {
    let mut h = Harness::new(Conn::default());
    h.handshake();
    h.data(100).unwrap();
    let ts = h.ts_r();
    let seq = h.rseq;
    assert!(h
        .rx(Seg {
            seq,
            ack: GUEST_ISN + 1,
            flags: flags::ACK | flags::FIN,
            window: 502,
            ts,
            payload: vec![1; 50],
            ..Seg::default()
        })
        .is_none());
    assert_eq!(h.mode(), Mode::Offline(OfflineReason::RemoteFin));
    // The guest FIN also ends the offload; RST frees the flow.
    let mut h = Harness::new(Conn::default());
    h.handshake();
    let ts = h.ts_g();
    h.tx(Seg {
        seq: GUEST_ISN + 1,
        ack: h.rseq,
        flags: flags::ACK | flags::FIN,
        window: 1000,
        ts,
        ..Seg::default()
    });
    assert_eq!(h.mode(), Mode::Offline(OfflineReason::GuestFin));
    assert!(h.data(10).is_none());
    h.rx(Seg {
        seq: h.rseq,
        flags: flags::RST,
        ..Seg::default()
    });
    assert_eq!(h.eng.flows(), 0);
}

#[test]
fn rule_14_a_full_table_passes_new_flows_and_owed_flows_never_age_out() {
    let mut h = Harness::with(
        Conn::default(),
        OffloadConfig {
            max_flows: 1,
            redeliver_after_ns: u64::MAX / 256,
            ..OffloadConfig::default()
        },
    );
    h.handshake();
    h.data(100).unwrap();
    // A second flow (other port) finds the table full.
    let mut f = build(
        &h.conn,
        false,
        &Seg {
            seq: 5,
            flags: flags::SYN,
            window: 100,
            ..Seg::default()
        },
    );
    f[14 + 20 + 1] = 81; // source port 81
    let s = parse(&f);
    let t = s.tcp_at;
    wire::set_tcp_checksum(s.version, &s.src, &s.dst, &mut f[t..]);
    h.rx_frame(&f, RxChecksum::Valid);
    assert_eq!(h.stats().passthrough["table_full"], 1);
    // Ten idle minutes later the owed flow is still there.
    h.eng.tick(h.now + 600_000_000_000);
    assert_eq!(h.eng.flows(), 1);
    // Once the guest caught up it ages out.
    let ts = h.ts_g();
    h.guest_ack(h.rseq, 1000, ts);
    h.eng.tick(h.now + 1_200_000_000_000);
    assert_eq!(h.eng.flows(), 0);
}

#[test]
fn rule_15_draining_stops_early_acks_but_keeps_rewriting() {
    let mut h = Harness::new(Conn::default());
    h.handshake();
    let start = h.rseq;
    h.data(1000).unwrap();
    h.eng.set_draining(true, h.now);
    assert!(h.data(1000).is_none());
    assert!(!h.eng.drained());
    h.eng.tick(h.now);
    assert_eq!(h.stats().owed_bytes, 1000, "early-ACKed, not yet confirmed");
    assert_eq!(h.stats().drains_completed, 0);
    let ts = h.ts_g();
    assert_eq!(h.guest_ack(start, 1000, ts).0, TxVerdict::Suppress);
    let ts = h.ts_g();
    h.guest_ack(h.rseq, 1000, ts);
    assert!(h.eng.drained());
    h.eng.tick(h.now);
    assert_eq!(h.stats().owed_bytes, 0);
    assert_eq!(h.stats().drains_completed, 1);
    h.eng.tick(h.now);
    assert_eq!(h.stats().drains_completed, 1, "one drain completes once");
    h.eng.set_draining(false, h.now);
    assert!(h.data(10).is_some());
    assert_eq!(h.stats().drains, 1);
}

#[test]
fn a_drain_that_starts_with_nothing_owed_completes_at_the_next_tick() {
    let mut h = Harness::new(Conn::default());
    h.handshake();
    h.eng.set_draining(true, h.now);
    h.eng.tick(h.now);
    assert_eq!(h.stats().drains_completed, 1);
    // Cancelled before completing: not counted as completed.
    h.eng.set_draining(false, h.now);
    h.data(100).unwrap();
    h.eng.set_draining(true, h.now);
    h.eng.set_draining(false, h.now);
    h.eng.tick(h.now);
    assert_eq!(h.stats().drains, 2);
    assert_eq!(h.stats().drains_completed, 1);
}

#[test]
fn rule_16_switching_off_stops_early_acks_and_new_flows() {
    let mut h = Harness::new(Conn::default());
    h.handshake();
    h.data(100).unwrap();
    h.eng.set_enabled(false);
    assert!(h.data(100).is_none());
    assert!(!h.eng.idle(), "the owing flow is still tracked");
    let ts = h.ts_g();
    h.guest_ack(h.rseq, 1000, ts);
    h.eng.tick(h.now + 200_000_000_000);
    assert!(h.eng.idle());
}

#[test]
fn timestamps_off_wscale_off_and_ipv6_work() {
    for conn in [
        Conn {
            timestamps: false,
            ..Conn::default()
        },
        Conn {
            wscale: false,
            ..Conn::default()
        },
        Conn {
            ipv6: true,
            ..Conn::default()
        },
    ] {
        let mut h = Harness::new(conn);
        h.handshake();
        let f = h.data(100).expect("early ACK");
        let a = parse(&f);
        assert!(tcp_ok(&f));
        assert_eq!(a.options.timestamps.is_some(), conn.timestamps);
        assert_eq!(a.version == wire::IpVersion::V6, conn.ipv6);
    }
}

#[test]
fn an_ack_that_raises_e_is_never_suppressed_even_with_a_dsack() {
    let mut h = Harness::new(Conn::default());
    h.handshake();
    h.eng.set_draining(true, h.now);
    let start = h.rseq;
    assert!(h.data(1448).is_none());
    // The guest acknowledges the data (E was not moved by us while
    // draining), with a D-SACK of a duplicate it received.
    let (v, f) = h.guest_sack(start + 1448, (start, start + 1448));
    assert_ne!(v, TxVerdict::Suppress);
    assert_eq!(parse(&f).ack, start + 1448);
}

#[test]
fn a_flow_over_its_custody_budget_comes_back_once_the_guest_caught_up() {
    let mut h = Harness::with_budget(1000);
    h.handshake();
    assert!(h.data(1448).is_none());
    assert_eq!(h.mode(), Mode::Offline(OfflineReason::CustodyBudget));
    let ts = h.ts_g();
    h.guest_ack(h.rseq, 1000, ts);
    assert_eq!(h.mode(), Mode::Active);
    assert!(h.data(100).is_some());
}

#[test]
fn the_early_ack_finds_its_flow_after_the_table_grew_and_never_acks_another() {
    let mut h = Harness::new(Conn::default());
    h.handshake();
    // A data segment through RX; its frame is published only after 200
    // new flows (other remote ports) made the table grow several times.
    let ts = h.ts_r();
    let seq = h.rseq;
    h.rseq = seq.wrapping_add(100);
    let data = |ts| Seg {
        seq,
        ack: GUEST_ISN + 1,
        flags: flags::ACK | flags::PSH,
        window: 502,
        ts,
        payload: vec![7; 100],
        ..Seg::default()
    };
    let f = build(&h.conn, false, &data(ts));
    let token = h
        .rx_unpublished(&f, RxChecksum::Partial)
        .expect("new bytes");
    let syn = build(
        &h.conn,
        false,
        &Seg {
            seq: 5,
            flags: flags::SYN,
            window: 100,
            ..Seg::default()
        },
    );
    // Each doubling of the table moves a flow with even odds (the hash is
    // seeded at random): grow it until this one moved, 200 flows at a time.
    let moved = |h: &Harness| !matches!(h.eng.flows.table.get_bucket(token.bucket), Some((_, f)) if f.id == token.id);
    let mut port = 1000u16;
    while !moved(&h) && port < 9000 {
        for p in port..port + 200 {
            let mut s = syn.clone();
            s[34..36].copy_from_slice(&p.to_be_bytes());
            h.rx_frame(&s, RxChecksum::Partial);
        }
        port += 200;
        assert_eq!(h.eng.flows(), 1 + usize::from(port - 1000));
    }
    let moved = moved(&h);
    assert!(
        moved,
        "the flow left its bucket (the lookup by key is tested)"
    );
    let mut out = Vec::new();
    assert!(h.eng.remote_published(&token, &mut out));
    let ack = parse(&out);
    assert_eq!(
        (ack.sport, ack.dport, ack.ack),
        (5000, 80, seq.wrapping_add(100))
    );

    // A token of a flow that was reset and reopened with the same key (a
    // new flow, in its handshake) acknowledges nothing.
    let ts = h.ts_r();
    let seq = h.rseq;
    let f = build(&h.conn, false, &Seg { seq, ..data(ts) });
    let token = h
        .rx_unpublished(&f, RxChecksum::Partial)
        .expect("new bytes");
    h.rx(Seg {
        seq: seq.wrapping_add(100),
        flags: flags::RST,
        ..Seg::default()
    });
    h.rx(Seg {
        seq: 9,
        flags: flags::SYN,
        window: 100,
        ..Seg::default()
    });
    let mut out = Vec::new();
    assert!(!h.eng.remote_published(&token, &mut out));
    assert!(out.is_empty());
}

#[test]
fn flow_list_shows_endpoints_mode_reason_and_owed_bytes() {
    for ipv6 in [false, true] {
        let mut h = Harness::new(Conn {
            ipv6,
            ..Conn::default()
        });
        h.handshake();
        h.data(1000).unwrap();
        let list = h.eng.flow_list(h.now + 500_000_000, 10);
        assert_eq!(list.len(), 1);
        let f = &list[0];
        let (guest, remote) = if ipv6 {
            (
                "fefe:fefe:fefe:fefe:fefe:fefe:fefe:fefe",
                "fdfd:fdfd:fdfd:fdfd:fdfd:fdfd:fdfd:fdfd",
            )
        } else {
            ("10.0.0.2", "10.0.0.1")
        };
        assert_eq!(
            (
                f.guest.as_str(),
                f.guest_port,
                f.remote.as_str(),
                f.remote_port
            ),
            (guest, 5000, remote, 80)
        );
        assert_eq!((f.mode.as_str(), f.reason.as_deref()), ("active", None));
        assert_eq!((f.owed_bytes, f.custody_bytes), (1000, 1000));
        assert!((f.idle_s - 0.5).abs() < 1e-9, "{}", f.idle_s);
        // The guest closes its window: offline, with the reason; it caught up.
        let ts = h.ts_g();
        h.guest_ack(h.rseq, 0, ts);
        let f = &h.eng.flow_list(h.now, 10)[0];
        assert_eq!(
            (f.mode.as_str(), f.reason.as_deref()),
            ("offline", Some("zero_window"))
        );
        assert_eq!((f.owed_bytes, f.custody_bytes), (0, 0));
        assert!(h.eng.flow_list(h.now, 0).is_empty());
    }
}

/// A full-sized segment in the rule 12 tests (the harness's guest window
/// is 4000 bytes; the guest's MSS 1460).
const FULL: usize = 600;

/// An established flow whose first full-sized segment of an RX batch waits
/// for its early ACK; and where that segment started.
fn one_segment_waiting() -> (Harness, u32) {
    let mut h = Harness::new(Conn::default());
    h.handshake();
    let start = h.rseq;
    let a = h.next_seg(FULL);
    assert!(
        h.rx_in_batch(a).is_none(),
        "the first full-sized segment waits"
    );
    (h, start)
}

/// Rule 12: a flow's full-sized segments in one RX batch share one early
/// ACK, sent when the batch ends (the guest takes them in as one GRO
/// super-segment and would acknowledge them once).
#[test]
fn rule12_full_sized_segments_of_a_batch_share_one_early_ack() {
    let (mut h, start) = one_segment_waiting();
    let b = h.next_seg(FULL);
    assert!(h.rx_in_batch(b).is_none(), "the second waits too");
    let flushed = h.flush();
    assert_eq!(flushed.len(), 1, "one ACK at the end of the batch");
    assert_eq!(
        parse(&flushed[0]).ack,
        start.wrapping_add(2 * FULL as u32),
        "it covers both"
    );
    assert!(h.flush().is_empty(), "a flush sends each waiting ACK once");
    let c = h.next_seg(FULL);
    assert!(h.rx_in_batch(c).is_none(), "the next batch waits again");
    let flushed = h.flush();
    assert_eq!(flushed.len(), 1);
    assert_eq!(parse(&flushed[0]).ack, start.wrapping_add(3 * FULL as u32));
    let s = h.stats();
    assert_eq!((s.early_acks, s.early_acked_bytes), (2, 3 * FULL as u64));
}

/// Rule 12: "at least once per GRO super-segment": a batch's full-sized
/// segments of one flow get their early ACK at once when they reach 64 KB,
/// and the count starts again after it.
#[test]
fn rule12_a_batch_acknowledges_every_64_kb_at_once() {
    let mut h = Harness::new(Conn::default());
    h.handshake();
    let ts = h.ts_g();
    h.guest_ack(REMOTE_ISN + 1, 60_000, ts); // edge 240 000 bytes away
    let start = h.rseq;
    let per_ack = 65_536usize.div_ceil(FULL);
    let mut at_once = Vec::new();
    for i in 0..2 * per_ack {
        let seg = h.next_seg(FULL);
        if let Some(ack) = h.rx_in_batch(seg) {
            at_once.push((i, parse(&ack).ack));
        }
    }
    let want: Vec<(usize, u32)> = [per_ack - 1, 2 * per_ack - 1]
        .iter()
        .map(|&i| (i, start.wrapping_add(((i + 1) * FULL) as u32)))
        .collect();
    assert_eq!(
        at_once, want,
        "one ACK at once per 64 KB, covering all before it"
    );
    assert!(h.flush().is_empty(), "nothing left waiting");
}

/// Rule 12: a short segment or a GRO super-segment is acknowledged at
/// once, together with a full-sized one that waited.
#[test]
fn rule12_short_segments_and_super_segments_are_acknowledged_at_once() {
    let (mut h, start) = one_segment_waiting();
    let b = h.next_seg(100);
    let ack = h.rx_in_batch(b).expect("a short segment: at once");
    assert_eq!(
        parse(&ack).ack,
        start.wrapping_add(FULL as u32 + 100),
        "covers the one that waited"
    );
    let c = h.next_seg(100);
    assert!(h.rx_in_batch(c).is_some(), "short segments never wait");
    let d = h.next_seg(2000);
    assert!(h.rx_in_batch(d).is_some(), "a super-segment: at once");
    assert!(h.flush().is_empty());
    // Segments below 536 bytes never count as full-sized, even when they
    // are the largest the flow has seen.
    let mut h = Harness::new(Conn::default());
    h.handshake();
    for _ in 0..3 {
        let s = h.next_seg(400);
        assert!(h.rx_in_batch(s).is_some());
    }
}

/// Rule 12 never overrides the others: an ACK that waited is not sent
/// once the flow went offline, nor while the offload is off.
#[test]
fn rule12_a_waiting_ack_follows_the_flows_mode() {
    let (mut h, _) = one_segment_waiting();
    let ts = h.ts_g();
    h.guest_ack(REMOTE_ISN + 1, 0, ts); // zero window: offline
    assert!(matches!(h.mode(), Mode::Offline(_)));
    assert!(h.flush().is_empty(), "no early ACK for an offline flow");

    let (mut h, _) = one_segment_waiting();
    h.eng.set_enabled(false);
    assert!(h.flush().is_empty(), "no early ACK with the offload off");
    assert!(!h.eng.has_deferred_acks());
}

#[test]
fn custody_reuses_a_spare_buffer_whether_or_not_the_checksum_is_verified() {
    for checksum in [RxChecksum::Partial, RxChecksum::Unknown] {
        let mut h = Harness::new(Conn::default());
        h.handshake();
        let s = h.next_seg(1000);
        h.rx_frame(&build(&h.conn, false, &s), checksum).unwrap();
        let ts = h.ts_g();
        h.guest_ack(h.rseq, 1000, ts);
        assert_eq!(
            h.eng.spare.len(),
            1,
            "{checksum:?}: the emptied buffer is kept"
        );
        let s = h.next_seg(1000);
        h.rx_frame(&build(&h.conn, false, &s), checksum).unwrap();
        assert!(
            h.eng.spare.is_empty(),
            "{checksum:?}: the next segment's custody took the spare buffer (no fresh pages)"
        );
        assert_eq!(h.stats().custody_bytes, 1000);
    }
}

/// A custody that grew past a fast flow's window (here 5 MB, an 8 MiB ring)
/// is kept for reuse too when the guest catches up: dropped, the next burst
/// regrows it from 2 KB on fresh pages.
#[test]
fn custody_reuses_a_large_buffer() {
    let mut h = Harness::new(Conn::default());
    h.handshake();
    const SEG: usize = 65_000;
    for _ in 0..80 {
        let s = h.next_seg(SEG);
        // Past the guest's edge, so no early ACK: custody all the same.
        h.rx_frame(&build(&h.conn, false, &s), RxChecksum::Partial);
    }
    assert_eq!(h.stats().custody_bytes, 80 * SEG as u64);
    let ts = h.ts_g();
    h.guest_ack(h.rseq, 1000, ts);
    assert_eq!(h.stats().custody_bytes, 0);
    let kept: Vec<usize> = h.eng.spare.iter().map(Vec::capacity).collect();
    assert!(
        matches!(kept[..], [cap] if cap >= 80 * SEG),
        "the emptied 8 MiB ring is kept: {kept:?}"
    );
    let s = h.next_seg(SEG);
    h.rx_frame(&build(&h.conn, false, &s), RxChecksum::Partial);
    assert!(h.eng.spare.is_empty(), "the next burst took it");
}
