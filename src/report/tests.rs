//! The report on hand-made captures with known answers, and on damaged or
//! foreign files.

use etherparse::PacketBuilder;
use hdrhistogram::Histogram;
use rand::{Rng, SeedableRng};

use super::pcapng::{read_records, Event, Paired, Pairer, Record, Vantage, Way, NOT_VSNOOP};
use super::plots::{bin_fractions, cdf_points, log_edges, thin};
use super::*;
use crate::timing::{RxStamps, TxStamps};

const GUEST: [u8; 4] = [10, 77, 0, 2];
const REMOTE: [u8; 4] = [10, 77, 0, 1];
const US: u64 = 1_000;
const MS: u64 = 1_000_000;
/// A plausible wall-clock start (2025-01-01).
const T0: u64 = 1_735_689_600 * 1_000_000_000;

// ---------------------------------------------------------------------------
// pcapng encoding (as src/export/capture.rs writes it)
// ---------------------------------------------------------------------------

struct Writer {
    big: bool,
    out: Vec<u8>,
}

impl Writer {
    fn new(big: bool) -> Writer {
        let mut w = Writer {
            big,
            out: Vec::new(),
        };
        w.shb();
        w
    }

    fn u16(&self, v: u16) -> [u8; 2] {
        if self.big {
            v.to_be_bytes()
        } else {
            v.to_le_bytes()
        }
    }

    fn u32(&self, v: u32) -> [u8; 4] {
        if self.big {
            v.to_be_bytes()
        } else {
            v.to_le_bytes()
        }
    }

    fn block(&mut self, type_: u32, body: &[u8]) {
        let total = (12 + body.len()) as u32;
        let (t, l) = (self.u32(type_), self.u32(total));
        self.out.extend_from_slice(&t);
        self.out.extend_from_slice(&l);
        self.out.extend_from_slice(body);
        self.out.extend_from_slice(&l);
    }

    fn option(&self, body: &mut Vec<u8>, code: u16, value: &[u8]) {
        body.extend_from_slice(&self.u16(code));
        body.extend_from_slice(&self.u16(value.len() as u16));
        body.extend_from_slice(value);
        body.resize(body.len().div_ceil(4) * 4, 0);
    }

    fn end_options(&self, body: &mut Vec<u8>) {
        body.extend_from_slice(&[0; 4]);
    }

    fn shb(&mut self) {
        let mut body = self.u32(0x1a2b_3c4d).to_vec();
        body.extend_from_slice(&self.u16(1));
        body.extend_from_slice(&self.u16(0));
        body.extend_from_slice(&[0xff; 8]); // section length unknown
        self.block(0x0a0d_0d0a, &body);
    }

    fn idb(&mut self, name: &str, tsresol: Option<u8>) {
        let mut body = self.u16(1).to_vec(); // Ethernet
        body.extend_from_slice(&[0, 0]);
        body.extend_from_slice(&self.u32(262_144));
        self.option(&mut body, 2, name.as_bytes());
        if let Some(r) = tsresol {
            self.option(&mut body, 9, &[r]);
        }
        self.end_options(&mut body);
        self.block(1, &body);
    }

    fn vsnoop_interfaces(&mut self) {
        self.idb("host", Some(9));
        self.idb("guest", Some(9));
    }

    #[allow(clippy::too_many_arguments)]
    fn epb(
        &mut self,
        iface: u32,
        ts: u64,
        data: &[u8],
        orig: u32,
        flags: Option<u32>,
        id: Option<u64>,
    ) {
        let mut body = self.u32(iface).to_vec();
        body.extend_from_slice(&self.u32((ts >> 32) as u32));
        body.extend_from_slice(&self.u32(ts as u32));
        body.extend_from_slice(&self.u32(data.len() as u32));
        body.extend_from_slice(&self.u32(orig));
        body.extend_from_slice(data);
        body.resize(body.len().div_ceil(4) * 4, 0);
        if let Some(f) = flags {
            let v = self.u32(f);
            self.option(&mut body, 2, &v);
        }
        if let Some(id) = id {
            let v = if self.big {
                id.to_be_bytes()
            } else {
                id.to_le_bytes()
            };
            self.option(&mut body, 5, &v);
        }
        self.end_options(&mut body);
        self.block(6, &body);
    }

    /// A frame toward the guest: host inbound at `host_in`, guest outbound at `ring`.
    fn rx(&mut self, id: u64, frame: &[u8], host_in: u64, ring: u64) {
        let len = frame.len() as u32;
        self.epb(0, host_in, frame, len, Some(1), Some(id));
        self.epb(1, ring, frame, len, Some(2), Some(id));
    }

    /// A frame from the guest: guest inbound at `pop`, host outbound at `host_out`.
    fn tx(&mut self, id: u64, frame: &[u8], pop: u64, host_out: u64) {
        let len = frame.len() as u32;
        self.epb(1, pop, frame, len, Some(1), Some(id));
        self.epb(0, host_out, frame, len, Some(2), Some(id));
    }
}

fn echo(from_guest: bool, request: bool, id: u16, seq: u16) -> Vec<u8> {
    let (src, dst) = if from_guest {
        (GUEST, REMOTE)
    } else {
        (REMOTE, GUEST)
    };
    let b = PacketBuilder::ethernet2([2; 6], [4; 6]).ipv4(src, dst, 64);
    let b = if request {
        b.icmpv4_echo_request(id, seq)
    } else {
        b.icmpv4_echo_reply(id, seq)
    };
    let mut out = Vec::new();
    b.write(&mut out, &[0x5a; 56]).unwrap();
    out
}

/// Ten pings from the guest (outside RTT 20 ms, backend 50 us out and
/// 30 us back) and ten from the remote end (guest delay 5 ms, backend
/// 30 us + 40 us), one every 100 ms.
fn known_capture(big: bool) -> Vec<u8> {
    let mut w = Writer::new(big);
    w.vsnoop_interfaces();
    let mut id = 0;
    for i in 0..10u16 {
        let t = T0 + u64::from(i) * 100 * MS;
        id += 1;
        w.tx(id, &echo(true, true, 7, i), t, t + 50 * US);
        id += 1;
        w.rx(
            id,
            &echo(false, false, 7, i),
            t + 50 * US + 20 * MS,
            t + 80 * US + 20 * MS,
        );
        let t = t + 50 * MS;
        id += 1;
        w.rx(id, &echo(false, true, 9, i), t, t + 30 * US);
        id += 1;
        w.tx(
            id,
            &echo(true, false, 9, i),
            t + 30 * US + 5 * MS,
            t + 70 * US + 5 * MS,
        );
    }
    w.out
}

/// (id, vantage, time, direction) of a record.
type Seen = (u64, Vantage, u64, Option<Way>);

/// Every record of `bytes` (owned), or the error.
fn records(bytes: &[u8]) -> anyhow::Result<(Vec<Seen>, pcapng::ReadEnd)> {
    let mut out = Vec::new();
    let end = read_records(bytes, &mut |e| {
        if let Event::Record(r) = e {
            out.push((r.id, r.vantage, r.ts_ns, r.way));
        }
    })?;
    Ok((out, end))
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir =
        std::env::temp_dir().join(format!("vsnoop-report-unit-{}-{name}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

fn analyse_bytes(name: &str, bytes: &[u8]) -> anyhow::Result<Analysis> {
    let dir = temp_dir(name);
    let file = dir.join("cap.pcapng");
    fs::write(&file, bytes).unwrap();
    let result = analyse(&file, shape_config(3, 0.75).unwrap(), false);
    let _ = fs::remove_dir_all(&dir);
    result
}

// ---------------------------------------------------------------------------
// Pairing
// ---------------------------------------------------------------------------

fn rec(id: u64, vantage: Vantage, ts_ns: u64, way: Option<Way>) -> Record<'static> {
    Record {
        id,
        vantage,
        ts_ns,
        way,
        original_len: 0,
        data: &[],
    }
}

use Vantage::{Guest, Host};
use Way::{Inbound, Outbound};

#[test]
fn pairs_frames_in_both_directions() {
    let mut p = Pairer::default();
    assert_eq!(p.push(&rec(1, Host, 100, Some(Inbound))), None);
    assert_eq!(
        p.push(&rec(1, Guest, 150, Some(Outbound))),
        Some(Paired::Rx(RxStamps {
            host_in: 100,
            ring: 150
        }))
    );
    assert_eq!(p.push(&rec(2, Guest, 200, Some(Inbound))), None);
    assert_eq!(
        p.push(&rec(2, Host, 270, Some(Outbound))),
        Some(Paired::Tx(TxStamps {
            kick: 200,
            pop: 200,
            host_out: 270
        }))
    );
    p.finish();
    assert_eq!((p.stats.rx, p.stats.tx, p.stats.unpaired), (1, 1, 0));
}

#[test]
fn pairs_interleaved_and_reordered_ids() {
    let mut p = Pairer::default();
    assert_eq!(p.push(&rec(5, Host, 10, Some(Inbound))), None);
    assert_eq!(p.push(&rec(6, Guest, 20, Some(Inbound))), None);
    // Id 6 completes first; its host record is the outbound one.
    assert!(matches!(
        p.push(&rec(6, Host, 30, Some(Outbound))),
        Some(Paired::Tx(TxStamps {
            pop: 20,
            host_out: 30,
            ..
        }))
    ));
    assert!(matches!(
        p.push(&rec(5, Guest, 40, Some(Outbound))),
        Some(Paired::Rx(RxStamps {
            host_in: 10,
            ring: 40
        }))
    ));
    // The flags decide, not the file order: a TX frame written host first.
    p.push(&rec(3, Host, 90, Some(Outbound)));
    assert!(matches!(
        p.push(&rec(3, Guest, 80, Some(Inbound))),
        Some(Paired::Tx(TxStamps {
            pop: 80,
            host_out: 90,
            ..
        }))
    ));
    // Without flags the record written first is the entry point.
    p.push(&rec(4, Guest, 100, None));
    assert!(matches!(
        p.push(&rec(4, Host, 110, None)),
        Some(Paired::Tx(_))
    ));
    p.finish();
    assert_eq!((p.stats.rx, p.stats.tx, p.stats.unpaired), (1, 3, 0));
}

#[test]
fn missing_partners_and_contradictions_are_counted() {
    let mut p = Pairer::default();
    // Partner lost: the id shows up again at the same point.
    p.push(&rec(1, Host, 10, Some(Inbound)));
    assert_eq!(p.push(&rec(1, Host, 20, Some(Inbound))), None);
    assert_eq!(p.stats.unpaired, 1);
    assert!(p.push(&rec(1, Guest, 25, Some(Outbound))).is_some());
    // Both records claim to be where the frame entered.
    p.push(&rec(2, Host, 30, Some(Inbound)));
    assert_eq!(p.push(&rec(2, Guest, 40, Some(Inbound))), None);
    assert_eq!(p.stats.inconsistent, 1);
    // A lone record at the end.
    p.push(&rec(3, Guest, 50, Some(Inbound)));
    p.finish();
    assert_eq!(p.stats.unpaired, 2);
    assert_eq!(p.stats.rx, 1);
}

#[test]
fn records_waiting_too_long_are_given_up() {
    let mut p = Pairer::default();
    p.push(&rec(0, Host, 0, Some(Inbound)));
    for i in 1..=pcapng::PAIR_WINDOW {
        p.push(&rec(i, Host, i, Some(Inbound)));
        p.push(&rec(i, Guest, i, Some(Outbound)));
    }
    assert_eq!(p.stats.unpaired, 1);
    assert_eq!(p.push(&rec(0, Guest, 1, Some(Outbound))), None, "too late");
    assert_eq!(p.stats.rx, pcapng::PAIR_WINDOW);
}

// ---------------------------------------------------------------------------
// Reading
// ---------------------------------------------------------------------------

#[test]
fn reads_little_and_big_endian_captures() {
    for big in [false, true] {
        let (recs, end) = records(&known_capture(big)).unwrap();
        assert_eq!(recs.len(), 80);
        assert_eq!(end.warning, None);
        // A ping leaving the guest: guest record first.
        assert_eq!(recs[0], (1, Guest, T0, Some(Inbound)));
        assert_eq!(recs[1], (1, Host, T0 + 50 * US, Some(Outbound)));
    }
}

#[test]
fn a_truncated_last_block_is_a_warning() {
    let full = known_capture(false);
    let (all, _) = records(&full).unwrap();
    for cut in [1, 7, 40, 100] {
        let (recs, end) = records(&full[..full.len() - cut]).unwrap();
        assert_eq!(recs.len(), all.len() - 1, "cut {cut}");
        let warning = end.warning.expect("warning");
        assert!(warning.contains("incomplete block"), "{warning}");
    }
    // A damaged block stops reading too, with what came before kept.
    let mut damaged = full.clone();
    let n = damaged.len();
    damaged[n - 4] ^= 0xff; // trailer length of the last block
    let (recs, end) = records(&damaged).unwrap();
    assert_eq!(recs.len(), all.len() - 1);
    assert!(end.warning.unwrap().contains("damaged block"));
}

#[test]
fn rejects_files_that_are_not_vsnoop_captures() {
    let expect_err = |bytes: &[u8], needle: &str| {
        let err = records(bytes).expect_err("error");
        let text = format!("{err:#}");
        assert!(text.contains(NOT_VSNOOP), "{text}");
        assert!(text.contains(needle), "{needle:?} not in {text}");
    };
    expect_err(b"", "not a pcapng file");
    expect_err(
        b"hello world, this is not a capture at all",
        "not a pcapng file",
    );
    // A classic pcap file header.
    expect_err(
        &[0xd4, 0xc3, 0xb2, 0xa1, 2, 0, 4, 0, 0, 0, 0, 0],
        "not a pcapng file",
    );
    // A section header and nothing else.
    let bare = Writer::new(false).out;
    expect_err(&bare, "found none");
    expect_err(&bare[..20], "section header");
    // One interface, as tshark writes for one NIC.
    let mut w = Writer::new(false);
    w.idb("eth0", Some(9));
    w.epb(0, T0, &[0; 60], 60, None, None);
    expect_err(&w.out, "found 1: eth0");
    // The right names, microsecond timestamps.
    let mut w = Writer::new(false);
    w.idb("host", None);
    w.idb("guest", None);
    expect_err(&w.out, "nanosecond");
    // Records without packet ids.
    let mut w = Writer::new(false);
    w.vsnoop_interfaces();
    w.epb(0, T0, &[0; 60], 60, Some(1), None);
    expect_err(&w.out, "no packet id");
    // A record on a third interface.
    let mut w = Writer::new(false);
    w.vsnoop_interfaces();
    w.epb(2, T0, &[0; 60], 60, Some(1), Some(1));
    expect_err(&w.out, "interface other than");
    // Simple packet blocks carry no id at all.
    let mut w = Writer::new(false);
    w.vsnoop_interfaces();
    w.block(3, &[60, 0, 0, 0, 1, 2, 3, 4]);
    expect_err(&w.out, "without packet ids");
}

#[test]
fn garbage_never_panics() {
    let valid = known_capture(false);
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for round in 0..3000 {
        let mut bytes = valid.clone();
        let flips = rng.gen_range(1..8);
        for _ in 0..flips {
            let at = rng.gen_range(0..bytes.len());
            bytes[at] = rng.gen();
        }
        if round % 3 == 0 {
            bytes.truncate(rng.gen_range(0..bytes.len()));
        }
        // Any outcome but a panic; the pairs go through the attributor too.
        let _ = analyse_bytes("garbage", &bytes);
    }
    for len in 0..300 {
        let noise: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
        let mut headed = Writer::new(false).out;
        headed.extend_from_slice(&noise);
        let _ = records(&noise);
        let _ = records(&headed);
    }
}

// ---------------------------------------------------------------------------
// Analysis with known answers
// ---------------------------------------------------------------------------

fn close(got: f64, want: f64) -> bool {
    (got - want).abs() <= want * 0.01
}

#[test]
fn known_delays_come_out_of_the_attributor() {
    let a = analyse_bytes("known", &known_capture(false)).unwrap();
    let c = &a.capture;
    assert_eq!((c.records, c.frames, c.unpaired_records), (80, 40, 0));
    assert_eq!((c.frames_to_guest, c.frames_from_guest), (20, 20));
    assert_eq!(c.first_record_ns, T0);
    assert!(
        (c.span_s - (0.9 + 0.05 + 0.005 + 0.00007)).abs() < 1e-9,
        "{}",
        c.span_s
    );
    let d = &a.snapshot.interface;
    assert_eq!(d.outside_rtt_ms.count, 10);
    assert!(
        close(d.outside_rtt_ms.p50, 20.0),
        "{}",
        d.outside_rtt_ms.p50
    );
    assert_eq!(d.guest_delay_ms.count, 10);
    assert!(close(d.guest_delay_ms.p50, 5.0), "{}", d.guest_delay_ms.p50);
    assert_eq!(d.backend_delay_ms.count, 10);
    assert!(
        close(d.backend_delay_ms.max, 0.070),
        "{}",
        d.backend_delay_ms.max
    );
    assert_eq!(d.backend_tx_ms.count, 20);
    assert_eq!(d.backend_rx_ms.count, 20);
    let flows = &a.snapshot.flows;
    assert_eq!(flows.len(), 2);
    let out = flows.iter().find(|f| f.initiator == "guest").unwrap();
    assert_eq!((out.proto.as_str(), out.sport), ("icmp", 7));
    assert_eq!(out.delays.outside_rtt_ms.count, 10);
    // One series point per sample, on the capture clock.
    let series = a.attributor.series();
    assert_eq!(series.len(), 30);
    assert!(series.iter().all(|p| p.t_ns >= T0));
}

#[test]
fn snaplen_cut_frames_keep_their_length() {
    let mut w = Writer::new(false);
    w.vsnoop_interfaces();
    let frame = echo(true, true, 1, 1);
    let cut = &frame[..64];
    w.epb(1, T0, cut, frame.len() as u32, Some(1), Some(1));
    w.epb(0, T0 + US, cut, frame.len() as u32, Some(2), Some(1));
    w.epb(
        0,
        T0 + MS,
        &echo(false, false, 1, 1)[..64],
        frame.len() as u32,
        Some(1),
        Some(2),
    );
    w.epb(
        1,
        T0 + MS + US,
        &echo(false, false, 1, 1)[..64],
        frame.len() as u32,
        Some(2),
        Some(2),
    );
    let a = analyse_bytes("snaplen", &w.out).unwrap();
    let f = &a.snapshot.flows[0];
    assert_eq!(f.bytes_from_guest, frame.len() as u64);
    assert_eq!(f.delays.outside_rtt_ms.count, 1);
    assert_eq!(a.snapshot.packets_other, 0);
}

#[test]
fn closed_flows_stay_in_the_report() {
    let tcp = |to_guest: bool, rst: bool| {
        let (src, dst, sp, dp) = if to_guest {
            (REMOTE, GUEST, 40000, 5201)
        } else {
            (GUEST, REMOTE, 5201, 40000)
        };
        let mut b = PacketBuilder::ethernet2([2; 6], [4; 6])
            .ipv4(src, dst, 64)
            .tcp(sp, dp, 0, 64000)
            .ack(10);
        if rst {
            b = b.rst();
        }
        let mut out = Vec::new();
        b.write(&mut out, if rst { &[] } else { &[1; 10] }).unwrap();
        out
    };
    let mut w = Writer::new(false);
    w.vsnoop_interfaces();
    w.rx(1, &tcp(true, false), T0, T0 + US);
    w.tx(2, &tcp(false, true), T0 + MS, T0 + MS + US);
    // 11 s later: the closed flow is forgotten by the attributor...
    w.rx(
        3,
        &echo(false, true, 1, 1),
        T0 + 11_000 * MS,
        T0 + 11_000 * MS + US,
    );
    let a = analyse_bytes("closed", &w.out).unwrap();
    assert_eq!(a.snapshot.flows_evicted, 1);
    assert_eq!(a.attributor.snapshot().flows.len(), 1);
    // ...but not by the report.
    let protos: Vec<&str> = a.snapshot.flows.iter().map(|f| f.proto.as_str()).collect();
    assert_eq!(protos.len(), 2, "{protos:?}");
    assert!(protos.contains(&"tcp"));
}

// ---------------------------------------------------------------------------
// Outputs
// ---------------------------------------------------------------------------

#[test]
fn cdf_points_from_known_values() {
    let mut h = Histogram::<u64>::new(2).unwrap();
    for v in [10, 20, 30, 30] {
        h.record(v).unwrap();
    }
    assert_eq!(
        cdf_points(&h, 1.0),
        vec![(10.0, 0.25), (20.0, 0.5), (30.0, 1.0)]
    );
    assert_eq!(cdf_points(&h, 10.0)[2], (3.0, 1.0));
    // Large values land in the middle of their 1 % bucket.
    let mut h = Histogram::<u64>::new(2).unwrap();
    h.record(20 * MS).unwrap();
    let p = cdf_points(&h, 1e6);
    assert_eq!(p.len(), 1);
    assert!(close(p[0].0, 20.0) && p[0].1 == 1.0, "{p:?}");
}

#[test]
fn histogram_bins_on_a_log_axis() {
    let edges = log_edges(0.001, 10.0, 10.0);
    assert_eq!(edges.len(), 41);
    assert!(close(edges[10], 0.01) && close(edges[40], 10.0));
    let mut h = Histogram::<u64>::new(2).unwrap();
    for v in [100, 100, 5000, 20_000_000] {
        h.record(v).unwrap();
    }
    let f = bin_fractions(&h, 1e6, &edges);
    assert_eq!(f.len(), 40);
    assert!((f.iter().sum::<f64>() - 1.0).abs() < 1e-12);
    assert_eq!(f[0], 0.5, "below the first edge: first bin");
    assert_eq!(f[39], 0.25, "above the last edge: last bin");
}

#[test]
fn thinned_series_keep_their_spikes() {
    let mut line: Vec<(f64, f64)> = (0..10).map(|i| (f64::from(i), 1.0)).collect();
    line[7].1 = 50.0;
    let (points, stride) = thin(&line, 3);
    assert_eq!(stride, 4);
    assert_eq!(points, vec![(0.0, 1.0), (7.0, 50.0), (8.0, 1.0)]);
    assert_eq!(thin(&line, 100), (line.clone(), 1));
    assert_eq!(thin(&[], 3), (vec![], 1));
}

fn assert_svg(path: &std::path::Path) {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(text.trim_start().starts_with("<svg"), "{}", path.display());
    assert!(text.trim_end().ends_with("</svg>"), "{}", path.display());
}

#[test]
fn writes_every_output() {
    let a = analyse_bytes("outputs", &known_capture(false)).unwrap();
    let dir = temp_dir("outputs-dir").join("report");
    write_report(&dir, &a).unwrap();
    let json: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(dir.join("summary.json")).unwrap()).unwrap();
    assert_eq!(json["capture"]["frames"], 40);
    assert_eq!(json["interface"]["outside_rtt_ms"]["count"], 10);
    assert_eq!(json["flows"].as_array().unwrap().len(), 2);
    let back: Snapshot = serde_json::from_value(json).unwrap();
    assert_eq!(back.flows.len(), 2);
    for plot in ["delay-cdf.svg", "flow-1-series.svg", "flow-2-series.svg"] {
        assert_svg(&dir.join(plot));
    }
    // No TCP: the ACK plots are skipped, and report.md says so.
    let md = fs::read_to_string(dir.join("report.md")).unwrap();
    assert!(!dir.join("ack-interarrival-remote.svg").exists());
    assert!(
        md.contains("`ack-interarrival-remote.svg` not drawn (no remote ACKs"),
        "{md}"
    );
    assert!(md.contains("| outside RTT | 10 | 20.0 |"), "{md}");
    assert!(md.contains("| guest delay | 10 | 5.0"), "{md}");
    assert!(md.contains("icmp 10.77.0.2 -> 10.77.0.1 id 7"), "{md}");
    assert!(md.contains("2025-01-01 00:00:00.000 UTC"), "{md}");
    let _ = fs::remove_dir_all(dir.parent().unwrap());
}

#[test]
fn rejects_bad_compression_parameters() {
    assert!(shape_config(1, 0.75).is_err());
    assert!(shape_config(3, 1.5).is_err());
    assert!(shape_config(3, f64::NAN).is_err());
    let err = run(
        Path::new("/nonexistent/x.pcapng"),
        Path::new("/tmp"),
        3,
        0.75,
    )
    .unwrap_err();
    assert!(format!("{err:#}").contains("cannot open"), "{err:#}");
}

#[test]
fn numbers_and_dates_are_formatted_for_people() {
    use super::markdown::{num, utc};
    assert_eq!(num(20.012), "20.0");
    assert_eq!(num(0.0123456), "0.0123");
    assert_eq!(num(1234.4), "1234");
    assert_eq!(num(0.0), "0");
    assert_eq!(utc(T0 + 1_500 * MS), "2025-01-01 00:00:01.500 UTC");
    assert_eq!(
        utc(951_782_400 * 1_000_000_000),
        "2000-02-29 00:00:00.000 UTC"
    );
}
