//! The ACK offload engine (`vsnoop::offload`) driven by a sequence of
//! operations, as the data path drives it: remote frames through
//! `remote_rx` + `remote_published`, guest frames through `guest_tx` (the
//! headers buffer sometimes shorter than the frame), `tick` with time
//! moving on, `set_draining` / `set_enabled`, `no_buffer`, `clear`, and the
//! outboxes taken.
//!
//! Most frames are built from fuzzed fields for a handful of fixed flows
//! (IPv4 or IPv6, each with fixed ISNs and window scales, so handshakes
//! complete and the state machine gets deep); some are raw bytes, some are
//! built frames with a few bytes flipped.
//!
//! After every step, beside "no panic":
//! - every frame the engine emits (early ACK, re-delivery, RST) parses with
//!   `wire::parse` and has a correct TCP checksum and IPv4 header checksum;
//! - an early ACK (and any ACK number the sender sees from a rewritten guest
//!   packet or a reset) never acknowledges past the highest in-order byte the
//!   remote sent on that flow (counting from its ISN + 1 or from any point
//!   the guest itself acknowledged), never carries SYN/FIN/RST, and its
//!   window never reaches past the guest's last advertised right edge;
//! - no early ACK follows a FIN from the guest (rule 13);
//! - a suppressed guest ACK acknowledged nothing and SACKed nothing the
//!   sender had not already been told, and advertised no edge it had not
//!   been told unless it was a small window update left to the next early
//!   ACK (rule 10: counted, the flow active, the offload on and not
//!   draining, the window the sender knows at least two minimal segments,
//!   and not doubled by the update);
//! - a rewritten guest packet keeps a correct checksum (or stays corrupt,
//!   or keeps its NEEDS_CSUM seed untouched) and never moves its ack back;
//! - re-delivered bytes are the bytes the remote sent at those sequence
//!   numbers (the fuzzer's payload bytes are a function of the sequence);
//! - `custody_bytes()` never exceeds the configured budget.
//!
//! The model keeps its own books in offsets from each flow's ISNs; a flow
//! that was fed a value far outside that range (or a flipped byte) is
//! "tainted" and only the frame-level checks apply to it.
//!
//! Environment: `OFFLOAD_FUZZ_TRACE=1` prints every operation, the engine's
//! verdicts and frames and each flow's mode (to read a crash:
//! `OFFLOAD_FUZZ_TRACE=1 fuzz/target/x86_64-unknown-linux-gnu/release/offload
//! <artifact>`).
#![no_main]

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use vsnoop::offload::flow::{Mode, TxVerdict};
use vsnoop::offload::wire::{self, flags, option, IpVersion, TcpSegment, MAX_HEADERS};
use vsnoop::offload::{AckOffload, OffloadConfig, OffloadCounters, RxChecksum, RxToken};

const SLOTS: usize = 4;
const MAX_OPS: usize = 384;
const MSS: i64 = 1448;
const GUEST_MAC: [u8; 6] = [2, 0, 0, 0x55, 0, 2];
const HOST_MAC: [u8; 6] = [2, 0, 0, 0x55, 0, 1];
const REMOTE_PORTS: [u16; SLOTS] = [80, 443, 5201, 80];

/// The byte the remote sends at sequence number `seq` of slot `slot`.
fn payload_byte(slot: usize, seq: u32) -> u8 {
    (seq.wrapping_mul(0x9e37_79b1) >> 24) as u8 ^ slot as u8
}

/// What the model knows of one flow, in offsets from its ISNs.
#[derive(Default)]
struct Model {
    /// A value far from the ISNs, or a mutated frame: semantic checks off.
    tainted: bool,
    /// Remote payload seen (merged, disjoint, not adjacent), `[s, e)`
    /// in offsets from the remote ISN.
    sent: Vec<(i64, i64)>,
    /// Where in-order data may start: ISN + 1 and every guest ACK.
    bases: BTreeSet<i64>,
    /// One past the highest remote byte sent.
    r_next: i64,
    /// One past the highest guest sequence used.
    g_next: i64,
    /// The guest's latest right edge from a non-SYN ACK, and from a SYN
    /// (unscaled window from ISN + 1).
    g_edge: Option<i64>,
    g_syn_edge: Option<i64>,
    /// A guest SYN came after the last non-SYN ACK (the engine may have
    /// started over from its window).
    syn_pending: bool,
    /// The guest's latest ACK.
    g_ack: Option<i64>,
    /// Largest guest TSval (offset from the guest's TS base).
    g_tsval: Option<i64>,
    /// Guest and remote TS clocks (offsets).
    g_ts: i64,
    r_ts: i64,
    /// Largest ACK and right edge the sender has been shown.
    sender_ack: i64,
    sender_edge: Option<i64>,
    /// The engine's key of this flow (for the trace).
    key: Option<vsnoop::offload::FlowKey>,
    /// The guest sent a FIN (since the last SYN): no early ACK may follow
    /// (rule 13). Checked on tainted slots too: it is read off the frames.
    guest_fin: bool,
}

impl Model {
    fn add_sent(&mut self, s: i64, e: i64) {
        if e <= s {
            return;
        }
        self.sent.push((s, e));
        self.sent.sort_unstable();
        let mut merged: Vec<(i64, i64)> = Vec::with_capacity(self.sent.len());
        for &(s, e) in &self.sent {
            match merged.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => merged.push((s, e)),
            }
        }
        self.sent = merged;
        self.r_next = self.r_next.max(e);
    }

    /// Whether acknowledging up to `a` covers only bytes the remote sent in
    /// order from a base (or the guest confirmed).
    fn ack_ok(&self, a: i64) -> bool {
        if self.bases.contains(&a) {
            return true;
        }
        self.sent
            .iter()
            .find(|&&(s, e)| s < a && a <= e)
            .is_some_and(|&(s, _)| self.bases.range(s..a).next().is_some())
    }

    /// The end of in-order data from `from` on.
    fn reach(&self, from: i64) -> i64 {
        self.sent
            .iter()
            .find(|&&(s, e)| s <= from && from <= e)
            .map_or(from, |&(_, e)| e)
    }

    fn shown(&mut self, ack: i64, edge: i64) {
        self.sender_ack = self.sender_ack.max(ack);
        self.sender_edge = Some(self.sender_edge.map_or(edge, |x| x.max(edge)));
    }
}

/// One of the fixed flows.
struct Slot {
    v6: bool,
    remote_host: u8,
    guest_port: u16,
    remote_port: u16,
    remote_isn: u32,
    guest_isn: u32,
    /// Window scale each side puts in its SYN (None: no option).
    guest_ws: Option<u8>,
    remote_ws: Option<u8>,
    guest_ts0: u32,
    remote_ts0: u32,
    m: Model,
}

impl Slot {
    fn new(u: &mut Unstructured, i: usize) -> Result<Slot> {
        let isn = |u: &mut Unstructured| -> Result<u32> {
            Ok(match u.int_in_range(0..=5)? {
                0 => 1_000,
                1 => 0x7fff_f000,
                2 => 0x9000_0000,
                3 => 0xffff_f000,
                _ => u.arbitrary()?,
            })
        };
        let ws = |u: &mut Unstructured| -> Result<Option<u8>> {
            Ok(match u.int_in_range(0..=5)? {
                0 => None,
                1 => Some(0),
                2 => Some(2),
                3 => Some(7),
                4 => Some(14),
                _ => Some(u.int_in_range(0..=20)?),
            })
        };
        let remote_isn = isn(u)?;
        let mut m = Model::default();
        m.bases.insert(1);
        m.r_next = 1;
        m.g_next = 1;
        m.sender_ack = 1;
        Ok(Slot {
            v6: u.arbitrary()?,
            remote_host: 10 + i as u8,
            guest_port: 40_000 + i as u16,
            remote_port: REMOTE_PORTS[i],
            remote_isn,
            guest_isn: isn(u)?,
            guest_ws: ws(u)?,
            remote_ws: ws(u)?,
            guest_ts0: u.arbitrary()?,
            remote_ts0: u.arbitrary()?,
            m,
        })
    }

    fn guest_addr(&self) -> [u8; 16] {
        addr(self.v6, 2)
    }

    fn remote_addr(&self) -> [u8; 16] {
        addr(self.v6, self.remote_host)
    }

    /// Offset of a sequence number in the remote's space (guest ACKs).
    fn rr(&self, x: u32) -> i64 {
        i64::from(x.wrapping_sub(self.remote_isn) as i32)
    }

    /// Offset in the guest's sequence space.
    fn gr(&self, x: u32) -> i64 {
        i64::from(x.wrapping_sub(self.guest_isn) as i32)
    }

    fn rseq(&self, off: i64) -> u32 {
        self.remote_isn.wrapping_add(off as u32)
    }

    fn gseq(&self, off: i64) -> u32 {
        self.guest_isn.wrapping_add(off as u32)
    }

    /// `(seq, ack)`, or now and then arbitrary ones (the model then stops
    /// predicting: tainted).
    fn maybe_wild(&mut self, u: &mut Unstructured, seq: u32, ack: u32) -> Result<(u32, u32)> {
        if u.ratio(1, 64)? {
            self.m.tainted = true;
            return Ok((u.arbitrary()?, u.arbitrary()?));
        }
        Ok((seq, ack))
    }

    /// The shift the engine applies to the guest's window.
    fn ws(&self) -> u32 {
        match (self.guest_ws, self.remote_ws) {
            (Some(g), Some(_)) => u32::from(g.min(14)),
            _ => 0,
        }
    }

    /// A SYN the model did not build (arbitrary flags, flipped bytes) may
    /// announce another window scale than the slot's: the engine then
    /// scales differently and the model stops predicting. A SYN also
    /// starts a connection over: an earlier guest FIN no longer counts.
    fn note_syn(&mut self, seg: &TcpSegment, from_guest: bool) {
        if !seg.has(flags::SYN) || seg.has(flags::RST) {
            return;
        }
        let announced = if from_guest {
            self.guest_ws
        } else {
            self.remote_ws
        };
        if seg.options.wscale != announced {
            self.m.tainted = true;
        }
        self.m.guest_fin = false;
    }

    /// Whether `seg` belongs to this flow, sent by the guest if `from_guest`.
    fn owns(&self, seg: &TcpSegment, from_guest: bool) -> bool {
        let v = if self.v6 {
            IpVersion::V6
        } else {
            IpVersion::V4
        };
        let (g, r) = (self.guest_addr(), self.remote_addr());
        let (src, dst, sport, dport) = if from_guest {
            (g, r, self.guest_port, self.remote_port)
        } else {
            (r, g, self.remote_port, self.guest_port)
        };
        seg.version == v
            && seg.src == src
            && seg.dst == dst
            && seg.sport == sport
            && seg.dport == dport
    }
}

fn addr(v6: bool, host: u8) -> [u8; 16] {
    let mut a = [0u8; 16];
    if v6 {
        a[0] = 0xfd;
        a[15] = host;
    } else {
        a[..4].copy_from_slice(&[10, 0, 0, host]);
    }
    a
}

// ---- checksums (our own, independent of `wire`) ----

fn sum16(mut sum: u64, data: &[u8]) -> u64 {
    let mut chunks = data.chunks_exact(2);
    for w in &mut chunks {
        sum += u64::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u64::from(*last) << 8;
    }
    sum
}

fn fold(mut sum: u64) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

fn pseudo(v6: bool, src: &[u8; 16], dst: &[u8; 16], len: usize) -> u64 {
    let n = if v6 { 16 } else { 4 };
    sum16(sum16(0, &src[..n]), &dst[..n]) + 6 + len as u64
}

/// TCP checksum of a whole frame correct (our arithmetic)?
fn tcp_sum_ok(frame: &[u8], seg: &TcpSegment) -> Option<bool> {
    let end = seg.payload_at + seg.payload_len as usize;
    let tcp = frame.get(seg.tcp_at..end)?;
    let v6 = seg.version == IpVersion::V6;
    Some(fold(sum16(pseudo(v6, &seg.src, &seg.dst, tcp.len()), tcp)) == 0xffff)
}

// ---- frame building ----

/// How the TCP checksum field is filled.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Csum {
    Good,
    Bad,
    /// NEEDS_CSUM: the pseudo-header seed only.
    Seed,
}

struct Spec {
    v6: bool,
    from_guest: bool,
    slot: usize,
    src: [u8; 16],
    dst: [u8; 16],
    sport: u16,
    dport: u16,
    seq: u32,
    ack: u32,
    flags: u8,
    ae: bool,
    window: u16,
    urgent: u16,
    opts: Vec<u8>,
    payload_len: usize,
    /// Sequence number of the first payload byte (decides the bytes).
    payload_seq: u32,
    ecn: u8,
    ip_options: bool,
    ttl: u8,
    dscp: u8,
    flow_label: u32,
    df: bool,
    csum: Csum,
}

fn build(s: &Spec) -> Vec<u8> {
    let mut opts = s.opts.clone();
    opts.truncate(40);
    while opts.len() & 3 != 0 {
        opts.push(option::NOP);
    }
    let tcp_len = 20 + opts.len() + s.payload_len;
    let mut out = Vec::with_capacity(14 + 60 + tcp_len);
    let (dmac, smac) = if s.from_guest {
        (HOST_MAC, GUEST_MAC)
    } else {
        (GUEST_MAC, HOST_MAC)
    };
    out.extend_from_slice(&dmac);
    out.extend_from_slice(&smac);
    if s.v6 {
        out.extend_from_slice(&0x86ddu16.to_be_bytes());
        let tclass = u32::from((s.dscp << 2) | (s.ecn & 3));
        let word = (6u32 << 28) | (tclass << 20) | (s.flow_label & 0xf_ffff);
        out.extend_from_slice(&word.to_be_bytes());
        out.extend_from_slice(&(tcp_len as u16).to_be_bytes());
        out.extend_from_slice(&[6, s.ttl]);
        out.extend_from_slice(&s.src);
        out.extend_from_slice(&s.dst);
    } else {
        out.extend_from_slice(&0x0800u16.to_be_bytes());
        let ihl = if s.ip_options { 6 } else { 5 };
        let total = (ihl * 4 + tcp_len) as u16;
        let ip_at = out.len();
        out.extend_from_slice(&[0x40 | ihl as u8, (s.dscp << 2) | (s.ecn & 3)]);
        out.extend_from_slice(&total.to_be_bytes());
        out.extend_from_slice(&[0x12, 0x34]);
        out.extend_from_slice(&(if s.df { 0x4000u16 } else { 0 }).to_be_bytes());
        out.extend_from_slice(&[s.ttl, 6, 0, 0]);
        out.extend_from_slice(&s.src[..4]);
        out.extend_from_slice(&s.dst[..4]);
        if s.ip_options {
            out.extend_from_slice(&[1, 1, 1, 0]);
        }
        let c = !fold(sum16(0, &out[ip_at..]));
        out[ip_at + 10..ip_at + 12].copy_from_slice(&c.to_be_bytes());
    }
    let tcp_at = out.len();
    out.extend_from_slice(&s.sport.to_be_bytes());
    out.extend_from_slice(&s.dport.to_be_bytes());
    out.extend_from_slice(&s.seq.to_be_bytes());
    out.extend_from_slice(&s.ack.to_be_bytes());
    out.push(((((20 + opts.len()) / 4) as u8) << 4) | u8::from(s.ae));
    out.push(s.flags);
    out.extend_from_slice(&s.window.to_be_bytes());
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&s.urgent.to_be_bytes());
    out.extend_from_slice(&opts);
    for i in 0..s.payload_len {
        out.push(payload_byte(s.slot, s.payload_seq.wrapping_add(i as u32)));
    }
    let p = pseudo(s.v6, &s.src, &s.dst, tcp_len);
    let c = match s.csum {
        Csum::Good => !fold(sum16(p, &out[tcp_at..])),
        Csum::Bad => !fold(sum16(p, &out[tcp_at..])) ^ 0x0100,
        Csum::Seed => fold(p),
    };
    out[tcp_at + 16..tcp_at + 18].copy_from_slice(&c.to_be_bytes());
    out
}

/// Option bytes for a segment: timestamps, SACK blocks, the SYN options,
/// and now and then something unusual.
fn options(
    u: &mut Unstructured,
    syn: bool,
    ws: Option<u8>,
    ts: Option<(u32, u32)>,
    sack: &[(u32, u32)],
) -> Result<Vec<u8>> {
    let mut o = Vec::new();
    if syn {
        if u.ratio(7, 8)? {
            o.extend_from_slice(&[option::MSS, 4]);
            let mss: u16 = if u.ratio(3, 4)? { 1460 } else { u.arbitrary()? };
            o.extend_from_slice(&mss.to_be_bytes());
        }
        if let Some(ws) = ws {
            o.extend_from_slice(&[option::NOP, option::WSCALE, 3, ws]);
        }
        if u.ratio(3, 4)? {
            o.extend_from_slice(&[option::SACK_PERM, 2]);
        }
    }
    if let Some((tsval, tsecr)) = ts {
        o.extend_from_slice(&[option::NOP, option::NOP, option::TIMESTAMPS, 10]);
        o.extend_from_slice(&tsval.to_be_bytes());
        o.extend_from_slice(&tsecr.to_be_bytes());
    }
    if !sack.is_empty() {
        o.extend_from_slice(&[option::NOP, option::NOP, option::SACK]);
        o.push((2 + 8 * sack.len()) as u8);
        for (l, r) in sack {
            o.extend_from_slice(&l.to_be_bytes());
            o.extend_from_slice(&r.to_be_bytes());
        }
    }
    if u.ratio(1, 24)? {
        let kind = match u.int_in_range(0..=5)? {
            0 => option::MD5,
            1 => option::AO,
            2 => option::MPTCP,
            3 => option::FASTOPEN,
            4 => option::END,
            _ => u.arbitrary()?,
        };
        let len = if u.ratio(7, 8)? {
            4
        } else {
            u.int_in_range(0..=12)?
        };
        o.extend_from_slice(&[kind, len]);
        o.extend(std::iter::repeat_n(0u8, usize::from(len.saturating_sub(2))));
    }
    Ok(o)
}

/// A sequence offset: mostly `near`, sometimes around it.
fn around(u: &mut Unstructured, near: i64) -> Result<i64> {
    Ok(match u.int_in_range(0..=9)? {
        0..=5 => near,
        6 => near - MSS * i64::from(u.int_in_range(1u8..=8)?),
        7 => near + MSS * i64::from(u.int_in_range(1u8..=8)?),
        8 => near - i64::from(u.int_in_range(1u16..=1500)?),
        _ => near + i64::from(u.int_in_range(-70_000i32..=70_000)?),
    })
}

fn payload_len(u: &mut Unstructured) -> Result<usize> {
    Ok(match u.int_in_range(0..=9)? {
        0..=4 => MSS as usize,
        5 => u.int_in_range(1..=64)?,
        6 => MSS as usize * usize::from(u.int_in_range(2u8..=44)?),
        7 => u.int_in_range(0..=65_400)?,
        _ => 0,
    })
}

/// A window field: mostly open, sometimes small or closed.
fn window(u: &mut Unstructured) -> Result<u16> {
    Ok(match u.int_in_range(0..=7)? {
        0..=3 => 65_535,
        4 => 1_000,
        5 => u.int_in_range(1..=16)?,
        6 => 0,
        _ => u.arbitrary()?,
    })
}

/// A frame from the remote of slot `i`; returns it with its claimed length.
fn remote_frame(u: &mut Unstructured, slots: &mut [Slot], i: usize) -> Result<(Vec<u8>, usize)> {
    let s = &mut slots[i];
    let kind = u.int_in_range(0..=15)?;
    let mut fl = flags::ACK;
    let seq_off;
    let mut len = 0;
    let mut syn = false;
    match kind {
        0 | 1 => {
            syn = true;
            fl = flags::SYN;
            if kind == 1 {
                fl |= flags::ACK;
            }
            seq_off = 0;
            if u.ratio(1, 4)? {
                fl |= flags::ECE | if kind == 0 { flags::CWR } else { 0 };
            }
            if u.ratio(1, 16)? {
                len = u.int_in_range(1..=32)?;
            }
        }
        2..=9 => {
            seq_off = around(u, s.m.r_next)?;
            len = payload_len(u)?;
            if u.ratio(1, 2)? {
                fl |= flags::PSH;
            }
        }
        10 => {
            seq_off = s.m.r_next;
        }
        11 => {
            seq_off = around(u, s.m.r_next)?;
            fl |= flags::FIN;
            if u.ratio(1, 2)? {
                len = payload_len(u)?;
            }
        }
        12 => {
            seq_off = around(u, s.m.r_next)?;
            fl = if u.arbitrary()? {
                flags::RST
            } else {
                flags::RST | flags::ACK
            };
        }
        _ => {
            seq_off = around(u, s.m.r_next)?;
            fl = u.arbitrary()?;
            len = payload_len(u)?;
        }
    }
    if !syn && u.ratio(1, 12)? {
        fl |= flags::CWR;
    }
    if u.ratio(1, 64)? {
        fl |= flags::URG;
    }
    let ack_off = if u.ratio(7, 8)? {
        s.m.g_next
    } else {
        around(u, s.m.g_next)?
    };
    let (seq, ack) = s.maybe_wild(u, s.rseq(seq_off), s.gseq(ack_off))?;
    let ts = if u.ratio(4, 5)? {
        s.m.r_ts += i64::from(u.int_in_range(0u8..=2)?);
        let tsecr = s.guest_ts0.wrapping_add(s.m.g_tsval.unwrap_or(0) as u32);
        Some((s.remote_ts0.wrapping_add(s.m.r_ts as u32), tsecr))
    } else {
        None
    };
    let opts = options(u, syn, if syn { s.remote_ws } else { None }, ts, &[])?;
    let payload_seq = if syn { seq.wrapping_add(1) } else { seq };
    let spec = Spec {
        v6: s.v6,
        from_guest: false,
        slot: i,
        src: s.remote_addr(),
        dst: s.guest_addr(),
        sport: s.remote_port,
        dport: s.guest_port,
        seq,
        ack,
        flags: fl,
        ae: syn && u.ratio(1, 16)?,
        window: window(u)?,
        urgent: 0,
        opts,
        payload_len: len,
        payload_seq,
        ecn: match u.int_in_range(0..=7)? {
            0 => 3,
            1 => 2,
            _ => 0,
        },
        ip_options: u.ratio(1, 16)?,
        ttl: 64,
        dscp: 0,
        flow_label: 0x12345,
        df: true,
        csum: if u.ratio(1, 16)? {
            Csum::Bad
        } else {
            Csum::Good
        },
    };
    let frame = build(&spec);
    finish_frame(u, s, frame)
}

/// Now and then a short copy (the frame claims more than is there) or a
/// few flipped header bytes (which taints the flow's model).
fn finish_frame(
    u: &mut Unstructured,
    s: &mut Slot,
    mut frame: Vec<u8>,
) -> Result<(Vec<u8>, usize)> {
    let frame_len = frame.len();
    if u.ratio(1, 32)? {
        let keep = u.int_in_range(0..=frame.len())?;
        frame.truncate(keep);
    }
    if u.ratio(1, 32)? {
        s.m.tainted = true;
        for _ in 0..u.int_in_range(1..=3)? {
            let at = u.int_in_range(0..=frame.len().min(MAX_HEADERS).saturating_sub(1))?;
            if let Some(b) = frame.get_mut(at) {
                *b ^= u.int_in_range(1..=255)?;
            }
        }
    }
    Ok((frame, frame_len))
}

/// A frame from the guest of slot `i`, and whether it carries NEEDS_CSUM.
fn guest_frame(
    u: &mut Unstructured,
    slots: &mut [Slot],
    i: usize,
) -> Result<(Vec<u8>, usize, bool)> {
    let s = &mut slots[i];
    let kind = u.int_in_range(0..=15)?;
    let mut fl = flags::ACK;
    let mut len = 0;
    let mut syn = false;
    let mut seq_off = s.m.g_next;
    let prev_ack = s.m.g_ack.unwrap_or(1);
    // What the guest could acknowledge: everything in order from its ACK.
    let inorder = s.m.reach(prev_ack.max(1));
    let mut ack_off = match u.int_in_range(0..=9)? {
        0..=4 => inorder,
        5 => prev_ack,
        6 => prev_ack + (inorder - prev_ack) / 2,
        7 => around(u, inorder)?,
        8 => s.m.r_next,
        _ => around(u, prev_ack)?,
    };
    match kind {
        0 | 1 => {
            syn = true;
            fl = flags::SYN;
            seq_off = 0;
            ack_off = 1;
            if kind == 1 {
                fl |= flags::ACK;
            }
            if u.ratio(1, 4)? {
                fl |= flags::ECE | if kind == 0 { flags::CWR } else { 0 };
            }
        }
        2..=8 => {}
        9 | 10 => {
            len = if u.ratio(3, 4)? {
                u.int_in_range(1..=200)?
            } else {
                payload_len(u)?
            };
            fl |= flags::PSH;
        }
        11 => {
            fl |= flags::FIN;
        }
        12 => {
            fl = if u.arbitrary()? {
                flags::RST
            } else {
                flags::RST | flags::ACK
            };
        }
        _ => {
            fl = u.arbitrary()?;
            if u.ratio(1, 2)? {
                len = u.int_in_range(0..=100)?;
            }
        }
    }
    if !syn && u.ratio(1, 10)? {
        fl |= flags::ECE;
    }
    if u.ratio(1, 64)? {
        fl |= flags::URG;
    }
    let (seq, ack) = s.maybe_wild(u, s.gseq(seq_off), s.rseq(ack_off))?;
    let ts = if u.ratio(4, 5)? {
        s.m.g_ts += i64::from(u.int_in_range(0u8..=2)?);
        let tsecr = if u.ratio(7, 8)? {
            s.m.r_ts
        } else {
            s.m.r_ts - i64::from(u.int_in_range(1u8..=5)?)
        };
        Some((
            s.guest_ts0.wrapping_add(s.m.g_ts as u32),
            s.remote_ts0.wrapping_add(tsecr as u32),
        ))
    } else {
        None
    };
    let mut sack = Vec::new();
    if !syn && u.ratio(1, 5)? {
        for _ in 0..u.int_in_range(1..=if ts.is_some() { 3 } else { 4 })? {
            let (l, r) = match s.m.sent.get(u.int_in_range(0..=s.m.sent.len())?) {
                Some(&(l, r)) if u.ratio(2, 3)? => (l, r),
                _ => {
                    let l = around(u, ack_off)?;
                    (l, l + i64::from(u.int_in_range(1u16..=10_000)?))
                }
            };
            sack.push((s.rseq(l), s.rseq(r)));
        }
    }
    let opts = options(u, syn, if syn { s.guest_ws } else { None }, ts, &sack)?;
    let needs_csum = u.ratio(1, 3)?;
    let spec = Spec {
        v6: s.v6,
        from_guest: true,
        slot: i,
        src: s.guest_addr(),
        dst: s.remote_addr(),
        sport: s.guest_port,
        dport: s.remote_port,
        seq,
        ack,
        flags: fl,
        ae: syn && u.ratio(1, 16)?,
        window: window(u)?,
        urgent: 0,
        opts,
        payload_len: len,
        payload_seq: seq,
        ecn: 0,
        ip_options: u.ratio(1, 16)?,
        ttl: 63,
        dscp: 10,
        flow_label: 0xabcde,
        df: true,
        csum: if needs_csum {
            Csum::Seed
        } else if u.ratio(1, 16)? {
            Csum::Bad
        } else {
            Csum::Good
        },
    };
    let frame = build(&spec);
    let (frame, frame_len) = finish_frame(u, s, frame)?;
    Ok((frame, frame_len, needs_csum))
}

/// Random bytes, with a claimed length at or above their length.
fn raw_frame(u: &mut Unstructured) -> Result<(Vec<u8>, usize)> {
    let len = u.int_in_range(0..=160usize)?.min(u.len());
    let mut frame = u.bytes(len)?.to_vec();
    // Mostly IPv4 or IPv6 TCP so the parser's deeper paths run.
    if frame.len() >= 14 && u.ratio(3, 4)? {
        if u.arbitrary()? {
            frame[12..14].copy_from_slice(&[0x08, 0x00]);
            if frame.len() > 23 {
                frame[14] = 0x45;
                frame[23] = 6;
            }
        } else {
            frame[12..14].copy_from_slice(&[0x86, 0xdd]);
            if frame.len() > 20 {
                frame[14] = 0x60;
                frame[20] = 6;
            }
        }
    }
    let frame_len = if u.ratio(1, 4)? {
        frame.len() + usize::from(u.arbitrary::<u16>()?)
    } else {
        frame.len()
    };
    Ok((frame, frame_len))
}

/// The length of the headers buffer handed to the engine.
fn cut(u: &mut Unstructured, len: usize) -> Result<usize> {
    Ok(match u.int_in_range(0..=7)? {
        0..=4 => len.min(MAX_HEADERS),
        5 => len,
        _ => u.int_in_range(0..=len)?,
    })
}

// ---- the run ----

/// How an ACK's right edge is held against the guest's.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Edge {
    Unchecked,
    /// Never past the guest's last right edge.
    Strict,
    /// Never past it, or window 0 at an ACK already sent.
    AtLeastAck,
}

struct Run {
    eng: AckOffload,
    counters: Arc<OffloadCounters>,
    cfg: OffloadConfig,
    queues: usize,
    slots: Vec<Slot>,
    now: u64,
    token: Option<RxToken>,
}

/// `OFFLOAD_FUZZ_TRACE=1`: print every operation (to read a crash).
fn tracing() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("OFFLOAD_FUZZ_TRACE").is_some())
}

/// One line about a frame, for the trace.
fn describe(slots: &[Slot], headers: &[u8], frame_len: usize, from_guest: bool) -> String {
    let Some(seg) = wire::parse(headers, frame_len) else {
        return format!("unparsed {} of {frame_len} bytes", headers.len());
    };
    let (slot, isn) = match slot_of(slots, &seg, from_guest) {
        Some(i) => (
            i.to_string(),
            (slots[i].remote_isn, slots[i].guest_isn, slots[i].m.tainted),
        ),
        None => ("?".into(), (0, 0, true)),
    };
    let (r, g) = if from_guest {
        (isn.0, isn.1)
    } else {
        (isn.1, isn.0)
    };
    format!(
        "slot {slot}{} flags {:#04x} seq {:#x} (+{}) ack {:#x} (+{}) win {} len {} ts {:?} sack {:?}",
        if isn.2 { " (tainted)" } else { "" },
        seg.flags,
        seg.seq,
        seg.seq.wrapping_sub(g) as i32,
        seg.ack,
        seg.ack.wrapping_sub(r) as i32,
        seg.window,
        seg.payload_len,
        seg.options.timestamps,
        wire::sack_blocks(headers, &seg).collect::<Vec<_>>(),
    )
}

fn slot_of(slots: &[Slot], seg: &TcpSegment, from_guest: bool) -> Option<usize> {
    slots.iter().position(|s| s.owns(seg, from_guest))
}

/// A frame the engine generated: parses, checksums right. Returns the parse.
fn check_generated(frame: &[u8], what: &str) -> TcpSegment {
    let seg = wire::parse(frame, frame.len())
        .unwrap_or_else(|| panic!("{what}: does not parse: {frame:02x?}"));
    let end = seg.payload_at + seg.payload_len as usize;
    assert_eq!(end, frame.len(), "{what}: length fields disagree");
    assert!(
        wire::tcp_checksum_ok(&seg, &frame[seg.tcp_at..end]),
        "{what}: bad TCP checksum: {frame:02x?}"
    );
    assert_eq!(
        tcp_sum_ok(frame, &seg),
        Some(true),
        "{what}: bad TCP checksum"
    );
    if seg.version == IpVersion::V4 {
        let ihl = usize::from(frame[14] & 0x0f) * 4;
        assert_eq!(
            fold(sum16(0, &frame[14..14 + ihl])),
            0xffff,
            "{what}: bad IPv4 header checksum: {frame:02x?}"
        );
    }
    seg
}

impl Run {
    fn ws(&self, i: usize) -> u32 {
        self.slots[i].ws()
    }

    /// An ACK number (and window) the sender gets from us on slot `i`'s
    /// behalf: within what the remote sent in order, inside the guest's edge.
    fn check_ack_shown(&mut self, i: usize, seg: &TcpSegment, what: &str, check_edge: Edge) {
        let ws = self.ws(i);
        let s = &mut self.slots[i];
        if s.m.tainted {
            return;
        }
        let a = s.rr(seg.ack);
        assert!(
            s.m.ack_ok(a),
            "{what} acknowledges {a} (ack {}), past the remote's in-order data {:?} from bases {:?}",
            seg.ack,
            s.m.sent,
            s.m.bases
        );
        let edge = a + (i64::from(seg.window) << ws);
        if check_edge != Edge::Unchecked {
            let mut gedge = match (s.m.g_edge, s.m.g_syn_edge) {
                (Some(e), Some(syn)) if s.m.syn_pending => e.max(syn),
                (Some(e), _) => e,
                (None, Some(syn)) => syn,
                (None, None) => panic!("{what} before the guest advertised any window"),
            };
            if check_edge == Edge::AtLeastAck {
                // A guest that retracts its edge below an ACK already sent
                // gets window 0 at that ACK: the best that can be said.
                gedge = gedge.max(a);
            }
            assert!(
                edge <= gedge,
                "{what}: right edge {edge} (ack {a}, window {} << {ws}) past the guest's {gedge}",
                seg.window
            );
        }
        s.m.shown(a, edge);
    }

    fn remote(
        &mut self,
        frame: &[u8],
        frame_len: usize,
        checksum: RxChecksum,
        cut: usize,
        queue: usize,
    ) {
        let headers = &frame[..cut.min(frame.len())];
        if tracing() {
            eprintln!(
                "t={} remote q{queue} {checksum:?} cut {cut}: {}",
                self.now,
                describe(&self.slots, headers, frame_len, false)
            );
        }
        if let Some(seg) = wire::parse(headers, frame_len) {
            if let Some(i) = slot_of(&self.slots, &seg, false) {
                let s = &mut self.slots[i];
                s.m.key = Some(vsnoop::offload::FlowKey::of(&seg, false));
                s.note_syn(&seg, false);
                let data = !seg.has(flags::SYN) && !seg.has(flags::RST) && seg.payload_len > 0;
                // The guest gets it (and may acknowledge it) unless the
                // backend verifies and finds it damaged.
                let good = checksum != RxChecksum::Unknown || tcp_sum_ok(frame, &seg) == Some(true);
                if data && good {
                    let start = s.rr(seg.seq);
                    s.m.add_sent(start, start + i64::from(seg.payload_len));
                }
            }
        }
        let mut copy = |off: usize, buf: &mut [u8]| {
            if off >= frame.len() {
                return 0;
            }
            let n = buf.len().min(frame.len() - off);
            buf[..n].copy_from_slice(&frame[off..off + n]);
            n
        };
        let token = self
            .eng
            .remote_rx(queue, headers, frame_len, checksum, &mut copy, self.now);
        if let Some(t) = token {
            self.publish(t);
        }
    }

    fn publish(&mut self, token: RxToken) {
        let mut out = vec![];
        let sent = self.eng.remote_published(&token, &mut out);
        assert_eq!(
            sent,
            !out.is_empty(),
            "remote_published's answer and its frame disagree"
        );
        self.token = Some(token);
        if sent {
            self.check_early_ack(&out);
        }
    }

    /// The end of an RX batch: the early ACKs that waited (rule 12).
    fn flush(&mut self) {
        let (mut out, mut ends) = (vec![], vec![]);
        let n = self.eng.flush_acks(&mut out, &mut ends);
        assert_eq!(n, ends.len(), "flush_acks' count and its frames disagree");
        assert_eq!(ends.last().copied().unwrap_or(0), out.len());
        assert!(
            !self.eng.has_deferred_acks(),
            "early ACKs still wait after a flush"
        );
        let mut start = 0;
        for end in ends {
            self.check_early_ack(&out[start..end]);
            start = end;
        }
    }

    fn check_early_ack(&mut self, out: &[u8]) {
        let seg = check_generated(out, "early ACK");
        if tracing() {
            eprintln!(
                "  early ACK: {}",
                describe(&self.slots, out, out.len(), true)
            );
        }
        assert!(
            seg.has(flags::ACK) && seg.flags & !(flags::ACK | flags::ECE) == 0,
            "early ACK with flags {:#04x}",
            seg.flags
        );
        assert_eq!(seg.payload_len, 0, "early ACK with payload");
        assert_eq!(seg.ecn, 0, "early ACK not Not-ECT");
        let Some(i) = slot_of(&self.slots, &seg, true) else {
            return;
        };
        assert!(
            !self.slots[i].m.guest_fin,
            "early ACK after the guest's FIN (rule 13)"
        );
        if !self.slots[i].m.tainted {
            let s = &self.slots[i];
            if let Some((tsval, _)) = seg.options.timestamps {
                let t = i64::from(tsval.wrapping_sub(s.guest_ts0) as i32);
                let max = s.m.g_tsval.expect("early ACK TSval without a guest TSval");
                assert!(
                    t <= max,
                    "early ACK TSval {t} above the guest's largest {max}"
                );
            }
            let sq = s.gr(seg.seq);
            assert!(
                sq <= s.m.g_next,
                "early ACK seq {sq} past the guest's snd_nxt {}",
                s.m.g_next
            );
        }
        self.check_ack_shown(i, &seg, "early ACK", Edge::Strict);
    }

    fn guest(&mut self, frame: &[u8], frame_len: usize, needs_csum: bool, cut: usize) {
        let cut = cut.min(frame.len());
        let mut headers = frame[..cut].to_vec();
        let before = wire::parse(&headers, frame_len);
        let slot = before.and_then(|seg| slot_of(&self.slots, &seg, true));
        if let (Some(seg), Some(i)) = (before, slot) {
            // What the guest says, whatever the engine does with it.
            let s = &mut self.slots[i];
            s.m.key = Some(vsnoop::offload::FlowKey::of(&seg, true));
            s.note_syn(&seg, true);
            if seg.has(flags::FIN) && !seg.has(flags::RST) {
                s.m.guest_fin = true;
            }
            if seg.has(flags::SYN) && !seg.has(flags::RST) {
                s.m.g_syn_edge = Some(1 + i64::from(seg.window));
                s.m.syn_pending = true;
            }
            if seg.has(flags::ACK) && !seg.has(flags::RST) {
                let a = s.rr(seg.ack);
                s.m.bases.insert(a);
                if !seg.has(flags::SYN) {
                    s.m.g_ack = Some(a);
                    s.m.g_edge = Some(a + (i64::from(seg.window) << s.ws()));
                    s.m.syn_pending = false;
                }
            }
            if let Some((tsval, _)) = seg.options.timestamps {
                let t = i64::from(tsval.wrapping_sub(s.guest_ts0) as i32);
                s.m.g_tsval = Some(s.m.g_tsval.map_or(t, |m| m.max(t)));
            }
            let end = s.gr(seg.seq) + i64::from(seg.seq_len());
            s.m.g_next = s.m.g_next.max(end);
        }
        let deferred_before = self
            .counters
            .window_updates_deferred
            .load(Ordering::Relaxed);
        let verdict = self
            .eng
            .guest_tx(&mut headers, frame_len, needs_csum, self.now);
        if tracing() {
            eprintln!(
                "t={} guest csum {needs_csum} cut {cut}: {}\n  -> {verdict:?}{}",
                self.now,
                describe(&self.slots, &frame[..cut], frame_len, true),
                if verdict == TxVerdict::Rewritten {
                    format!(": {}", describe(&self.slots, &headers, frame_len, true))
                } else {
                    String::new()
                }
            );
        }
        if verdict == TxVerdict::Pass {
            // (A suppressed frame's copy may have been edited: never sent.)
            assert_eq!(
                headers,
                frame[..cut],
                "headers edited for a frame passed as is"
            );
        }
        let Some(seg) = before else {
            assert_eq!(
                verdict,
                TxVerdict::Pass,
                "a frame that does not parse was not passed"
            );
            return;
        };
        match verdict {
            TxVerdict::Pass => {
                if let (Some(i), false) = (slot, seg.has(flags::RST)) {
                    let s = &mut self.slots[i];
                    let a = s.rr(seg.ack);
                    if seg.has(flags::SYN) {
                        // The SYN's window counts from ISN + 1, unscaled.
                        let edge = 1 + i64::from(seg.window);
                        s.m.sender_edge = Some(s.m.sender_edge.map_or(edge, |x| x.max(edge)));
                    } else if seg.has(flags::ACK) {
                        s.m.shown(a, a + (i64::from(seg.window) << s.ws()));
                    }
                    if seg.has(flags::SYN) && seg.has(flags::ACK) {
                        s.m.sender_ack = s.m.sender_ack.max(a);
                    }
                }
            }
            TxVerdict::Suppress => {
                assert!(
                    seg.is_pure_ack() && !seg.has(flags::ECE),
                    "suppressed a guest packet that is not a plain pure ACK: flags {:#04x}, {} bytes",
                    seg.flags,
                    seg.payload_len
                );
                let Some(i) = slot else {
                    panic!("suppressed a guest ACK of an unknown flow");
                };
                let ws = self.ws(i);
                let s = &self.slots[i];
                if !s.m.tainted {
                    let a = s.rr(seg.ack);
                    assert!(
                        a <= s.m.sender_ack,
                        "suppressed a guest ACK of {a} (ack {}) the sender never saw (it saw {})",
                        seg.ack,
                        s.m.sender_ack
                    );
                    let edge = a + (i64::from(seg.window) << ws);
                    let shown = s.m.sender_edge.unwrap_or(i64::MIN);
                    if edge > shown {
                        // Rule 10: only a small update, while an early ACK
                        // (which carries the guest's edge) can follow, and
                        // never while the sender knows under two segments
                        // (of at least 64 bytes) beyond its ACK. The flow
                        // was active when its verdict was made; the same
                        // call may take it offline right after (re-delivery
                        // after the guest's duplicate ACKs) or reset it.
                        let counted = self
                            .counters
                            .window_updates_deferred
                            .load(Ordering::Relaxed)
                            > deferred_before;
                        let mode = s.m.key.and_then(|k| self.eng.mode_of(&k));
                        let early_acks = self.eng.enabled() && !self.eng.draining();
                        let known = shown - s.m.sender_ack;
                        let mut fresh = edge - s.m.sender_ack;
                        if self.cfg.window_bound > 0 {
                            fresh = fresh.min(i64::from(self.cfg.window_bound));
                        }
                        assert!(
                            counted
                                && early_acks
                                && !matches!(mode, Some(Mode::PassThrough(_) | Mode::Handshake))
                                && known >= 128
                                && fresh < 2 * known + (1 << ws),
                            "suppressed a guest window update to {edge} past the edge shown {shown} \
                             (ack shown {}, counted {counted}, early ACKs {early_acks}, mode {mode:?}, \
                             known {known}, fresh {fresh})",
                            s.m.sender_ack
                        );
                    }
                    for (_, r) in wire::sack_blocks(&frame[..cut], &seg) {
                        let r = s.rr(r);
                        assert!(
                            r <= s.m.sender_ack,
                            "suppressed a SACK up to {r} above the ACK shown {}",
                            s.m.sender_ack
                        );
                    }
                }
            }
            TxVerdict::Rewritten => {
                let after = wire::parse(&headers, frame_len).expect("a rewritten frame parses");
                assert_eq!(
                    (
                        after.version,
                        after.src,
                        after.dst,
                        after.sport,
                        after.dport
                    ),
                    (seg.version, seg.src, seg.dst, seg.sport, seg.dport),
                    "rewrite changed the addresses"
                );
                assert_eq!(
                    (
                        after.seq,
                        after.payload_at,
                        after.payload_len,
                        after.flags & !flags::ECE
                    ),
                    (
                        seg.seq,
                        seg.payload_at,
                        seg.payload_len,
                        seg.flags & !flags::ECE
                    ),
                    "rewrite changed the sequence, length or flags"
                );
                assert!(
                    wire::seq_le(seg.ack, after.ack),
                    "rewrite moved the ack back from {} to {}",
                    seg.ack,
                    after.ack
                );
                assert_eq!(
                    headers[after.payload_at.min(cut)..],
                    frame[after.payload_at.min(cut)..cut],
                    "rewrite touched payload bytes"
                );
                let mut sent = headers.clone();
                sent.extend_from_slice(&frame[cut..]);
                if needs_csum {
                    let t = seg.tcp_at + 16;
                    assert_eq!(sent[t..t + 2], frame[t..t + 2], "NEEDS_CSUM seed changed");
                } else if let (Some(was), Some(now)) =
                    (tcp_sum_ok(frame, &seg), tcp_sum_ok(&sent, &after))
                {
                    assert_eq!(was, now, "rewrite changed whether the checksum is right");
                }
                if let Some(i) = slot {
                    // The guest's own edge is an upper bound for the rewrite.
                    let edge = if seg.has(flags::SYN) {
                        Edge::Unchecked
                    } else {
                        Edge::AtLeastAck
                    };
                    self.check_ack_shown(i, &after, "rewritten guest ACK", edge);
                }
            }
        }
    }

    /// Takes and checks what waits in the outboxes.
    fn take(&mut self, queue: usize) {
        let mut frames = Vec::new();
        self.eng.take_guest_frames(queue, &mut frames);
        for f in &frames {
            let seg = check_generated(f, "frame for the guest");
            if tracing() {
                eprintln!(
                    "  to guest q{queue}: {}",
                    describe(&self.slots, f, f.len(), false)
                );
            }
            let Some(i) = slot_of(&self.slots, &seg, false) else {
                continue;
            };
            let s = &self.slots[i];
            if s.m.tainted || seg.has(flags::RST) {
                continue;
            }
            let start = s.rr(seg.seq);
            for (k, b) in f[seg.payload_at..].iter().enumerate() {
                let at = seg.seq.wrapping_add(k as u32);
                assert_eq!(
                    *b,
                    payload_byte(i, at),
                    "re-delivered byte at offset {} differs from what the remote sent",
                    start + k as i64
                );
            }
            let end = start + i64::from(seg.payload_len);
            assert!(
                s.m.sent.iter().any(|&(a, b)| a <= start && end <= b),
                "re-delivered [{start}, {end}) that the remote never sent: {:?}",
                s.m.sent
            );
        }
        let mut frames = Vec::new();
        self.eng.take_host_frames(&mut frames);
        for f in &frames {
            let seg = check_generated(f, "frame for the tap");
            if tracing() {
                eprintln!("  to tap: {}", describe(&self.slots, f, f.len(), true));
            }
            if let Some(i) = slot_of(&self.slots, &seg, true) {
                if seg.has(flags::ACK) {
                    self.check_ack_shown(i, &seg, "RST to the remote", Edge::Unchecked);
                }
            }
        }
    }

    fn check(&self) {
        if tracing() {
            let modes: Vec<_> = self
                .slots
                .iter()
                .map(|s| s.m.key.and_then(|k| self.eng.mode_of(&k)))
                .collect();
            eprintln!("  modes {modes:?}, custody {}", self.eng.custody_bytes());
        }
        let held = self.eng.custody_bytes();
        assert!(
            held <= self.cfg.custody_budget,
            "custody {held} over the budget {}",
            self.cfg.custody_budget
        );
        assert_eq!(
            self.counters.custody_bytes.load(Ordering::Relaxed),
            held as u64,
            "custody gauge out of date"
        );
        assert!(
            self.eng.flows() <= self.cfg.max_flows,
            "flow table over its bound"
        );
    }

    fn step(&mut self, u: &mut Unstructured) -> Result<()> {
        self.now += u64::from(u.int_in_range(1u16..=2_000)?);
        match u.int_in_range(0..=31)? {
            0..=11 => {
                let i = u.int_in_range(0..=SLOTS - 1)?;
                let (frame, frame_len) = remote_frame(u, &mut self.slots, i)?;
                let checksum = match u.int_in_range(0..=5)? {
                    0..=2 => RxChecksum::Partial,
                    3 | 4 => RxChecksum::Valid,
                    _ => RxChecksum::Unknown,
                };
                let c = cut(u, frame.len())?;
                let q = u.int_in_range(0..=self.queues)?;
                self.remote(&frame, frame_len, checksum, c, q);
                if u.ratio(1, 2)? {
                    self.flush();
                }
            }
            12..=21 => {
                let i = u.int_in_range(0..=SLOTS - 1)?;
                let (frame, frame_len, needs_csum) = guest_frame(u, &mut self.slots, i)?;
                let c = cut(u, frame.len())?;
                self.guest(&frame, frame_len, needs_csum, c);
            }
            22 => {
                let (frame, frame_len) = raw_frame(u)?;
                let c = cut(u, frame.len())?;
                if u.arbitrary()? {
                    let q = u.int_in_range(0..=self.queues)?;
                    self.remote(&frame, frame_len, RxChecksum::Unknown, c, q);
                } else {
                    self.guest(&frame, frame_len, u.arbitrary()?, c);
                }
            }
            23 => {
                // A handshake and a burst of in-order data, to get deep fast.
                let i = u.int_in_range(0..=SLOTS - 1)?;
                self.handshake(u, i)?;
            }
            24 | 25 => {
                self.now += match u.int_in_range(0..=3)? {
                    0 => u64::from(u.arbitrary::<u16>()?) * 1_000,
                    1 => u64::from(u.arbitrary::<u16>()?) * 10_000,
                    2 => u64::from(u.int_in_range(1u8..=200)?) * 1_000_000_000,
                    _ => 0,
                };
                if tracing() {
                    eprintln!("t={} tick", self.now);
                }
                self.eng.tick(self.now);
                if u.ratio(3, 4)? {
                    let q = u.int_in_range(0..=self.queues)?;
                    self.take(q);
                }
            }
            26 => {
                let on = u.arbitrary()?;
                if tracing() {
                    eprintln!("set_draining({on})");
                }
                self.eng.set_draining(on, self.now);
            }
            27 => {
                let on = u.ratio(2, 3)?;
                if tracing() {
                    eprintln!("set_enabled({on})");
                }
                self.eng.set_enabled(on);
            }
            28 => {
                if tracing() {
                    eprintln!("no_buffer");
                }
                self.eng.no_buffer();
            }
            29 => {
                let q = u.int_in_range(0..=self.queues)?;
                self.take(q);
            }
            30 => {
                if let Some(t) = self.token {
                    self.publish(t);
                }
                let _ = (self.eng.drained(), self.eng.idle(), self.eng.has_frames());
                let _ = self.eng.has_guest_frames(u.int_in_range(0..=self.queues)?);
            }
            _ => {
                if u.ratio(1, 4)? {
                    if tracing() {
                        eprintln!("clear");
                    }
                    self.eng.clear();
                    assert_eq!(self.eng.custody_bytes(), 0);
                    assert_eq!(self.eng.flows(), 0);
                } else {
                    self.eng.guest_frame_dropped();
                }
            }
        }
        self.check();
        Ok(())
    }

    /// SYN, SYN-ACK, ACK (either side first), the guest's window, then a
    /// few in-order segments and a guest ACK, through the checked paths.
    fn handshake(&mut self, u: &mut Unstructured, i: usize) -> Result<()> {
        let remote_first = u.arbitrary()?;
        let s = &self.slots[i];
        let ts = u.ratio(3, 4)?;
        let (g_ts, r_ts) = (
            s.guest_ts0.wrapping_add(s.m.g_ts as u32),
            s.remote_ts0.wrapping_add(s.m.r_ts as u32),
        );
        let mk =
            |from_guest: bool, fl: u8, seq: u32, ack: u32, win: u16, opts: Vec<u8>, len: usize| {
                Spec {
                    v6: s.v6,
                    from_guest,
                    slot: i,
                    src: if from_guest {
                        s.guest_addr()
                    } else {
                        s.remote_addr()
                    },
                    dst: if from_guest {
                        s.remote_addr()
                    } else {
                        s.guest_addr()
                    },
                    sport: if from_guest {
                        s.guest_port
                    } else {
                        s.remote_port
                    },
                    dport: if from_guest {
                        s.remote_port
                    } else {
                        s.guest_port
                    },
                    seq,
                    ack,
                    flags: fl,
                    ae: false,
                    window: win,
                    urgent: 0,
                    opts,
                    payload_len: len,
                    payload_seq: seq,
                    ecn: 0,
                    ip_options: false,
                    ttl: 64,
                    dscp: 0,
                    flow_label: 7,
                    df: true,
                    csum: Csum::Good,
                }
            };
        let tsopt = |v: u32, e: u32| if ts { Some((v, e)) } else { None };
        let g_syn_opts = options(u, true, s.guest_ws, tsopt(g_ts, r_ts), &[])?;
        let r_syn_opts = options(u, true, s.remote_ws, tsopt(r_ts, g_ts), &[])?;
        let (g_isn, r_isn) = (s.guest_isn, s.remote_isn);
        let syn_flags = if u.ratio(1, 4)? {
            flags::ECE | flags::CWR
        } else {
            0
        };
        let ack_ecn = if syn_flags != 0 && u.ratio(3, 4)? {
            flags::ECE
        } else {
            0
        };
        let mut frames: Vec<(bool, Vec<u8>)> = Vec::new();
        if remote_first {
            frames.push((
                false,
                build(&mk(
                    false,
                    flags::SYN | syn_flags,
                    r_isn,
                    0,
                    64_240,
                    r_syn_opts,
                    0,
                )),
            ));
            frames.push((
                true,
                build(&mk(
                    true,
                    flags::SYN | flags::ACK | ack_ecn,
                    g_isn,
                    r_isn.wrapping_add(1),
                    65_160,
                    g_syn_opts,
                    0,
                )),
            ));
            frames.push((
                false,
                build(&mk(
                    false,
                    flags::ACK,
                    r_isn.wrapping_add(1),
                    g_isn.wrapping_add(1),
                    502,
                    tsopt(r_ts, g_ts).map_or(vec![], options_ts),
                    0,
                )),
            ));
        } else {
            frames.push((
                true,
                build(&mk(
                    true,
                    flags::SYN | syn_flags,
                    g_isn,
                    0,
                    64_240,
                    g_syn_opts,
                    0,
                )),
            ));
            frames.push((
                false,
                build(&mk(
                    false,
                    flags::SYN | flags::ACK | ack_ecn,
                    r_isn,
                    g_isn.wrapping_add(1),
                    65_160,
                    r_syn_opts,
                    0,
                )),
            ));
            frames.push((
                true,
                build(&mk(
                    true,
                    flags::ACK,
                    g_isn.wrapping_add(1),
                    r_isn.wrapping_add(1),
                    502,
                    tsopt(g_ts, r_ts).map_or(vec![], options_ts),
                    0,
                )),
            ));
        }
        let gwin = window(u)?;
        frames.push((
            true,
            build(&mk(
                true,
                flags::ACK,
                g_isn.wrapping_add(1),
                r_isn.wrapping_add(1),
                gwin,
                tsopt(g_ts, r_ts).map_or(vec![], options_ts),
                0,
            )),
        ));
        let n = u.int_in_range(0..=8)?;
        let start = self.slots[i].m.r_next.max(1);
        for k in 0..n {
            let seq = r_isn.wrapping_add((start + k * MSS) as u32);
            frames.push((
                false,
                build(&mk(
                    false,
                    flags::ACK | flags::PSH,
                    seq,
                    g_isn.wrapping_add(1),
                    502,
                    tsopt(r_ts, g_ts).map_or(vec![], options_ts),
                    MSS as usize,
                )),
            ));
        }
        for (from_guest, f) in frames {
            self.now += 1_000;
            if from_guest {
                let needs_csum = u.arbitrary()?;
                let mut f = f;
                if needs_csum {
                    reseed(&mut f);
                }
                let c = f.len().min(MAX_HEADERS);
                self.guest(&f, f.len(), needs_csum, c);
            } else {
                let c = f.len().min(MAX_HEADERS);
                self.remote(&f, f.len(), RxChecksum::Partial, c, 0);
            }
            self.check();
        }
        // The burst was one RX batch.
        self.flush();
        self.check();
        Ok(())
    }
}

fn options_ts((v, e): (u32, u32)) -> Vec<u8> {
    let mut o = vec![option::NOP, option::NOP, option::TIMESTAMPS, 10];
    o.extend_from_slice(&v.to_be_bytes());
    o.extend_from_slice(&e.to_be_bytes());
    o
}

/// Turns a complete frame's TCP checksum into the NEEDS_CSUM seed.
fn reseed(f: &mut [u8]) {
    if let Some(seg) = wire::parse(f, f.len()) {
        let tcp_len = f.len() - seg.tcp_at;
        let v6 = seg.version == IpVersion::V6;
        let seed = fold(pseudo(v6, &seg.src, &seg.dst, tcp_len));
        f[seg.tcp_at + 16..seg.tcp_at + 18].copy_from_slice(&seed.to_be_bytes());
    }
}

fn config(u: &mut Unstructured) -> Result<(OffloadConfig, usize)> {
    let cfg = OffloadConfig {
        enabled: u.ratio(7, 8)?,
        window_bound: match u.int_in_range(0..=3)? {
            0 | 1 => 0,
            2 => 4_096,
            _ => u.arbitrary()?,
        },
        custody_budget: match u.int_in_range(0..=5)? {
            0 => 0,
            1 => 3_000,
            2 => 64 << 10,
            3 => 64 << 20,
            _ => u.int_in_range(0..=1 << 21)?,
        },
        max_flows: match u.int_in_range(0..=3)? {
            0 => 1,
            1 => 2,
            _ => 64,
        },
        redeliver_after_ns: match u.int_in_range(0..=4)? {
            0 => 0,
            1 => 1_000_000,
            2 => 200_000_000,
            _ => u.int_in_range(0..=1_000_000_000)?,
        },
        max_redeliveries: u.int_in_range(0..=8)?,
        redeliver_burst: match u.int_in_range(0..=4)? {
            0 => 0,
            1 => 1,
            2 => 1448,
            3 => 64 << 10,
            _ => u.int_in_range(0..=1 << 18)?,
        },
    };
    Ok((cfg, u.int_in_range(1..=4)?))
}

fn run(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok((cfg, queues)) = config(&mut u) else {
        return;
    };
    let mut slots = Vec::new();
    for i in 0..SLOTS {
        match Slot::new(&mut u, i) {
            Ok(s) => slots.push(s),
            Err(_) => return,
        }
    }
    let counters = Arc::new(OffloadCounters::default());
    let mut r = Run {
        eng: AckOffload::new(cfg, queues, counters.clone()),
        counters,
        cfg,
        queues,
        slots,
        now: 1_000_000_000,
        token: None,
    };
    if tracing() {
        eprintln!("config {cfg:?}, {queues} queue pairs");
        for s in &r.slots {
            eprintln!(
                "slot v6 {} isn remote {:#x} guest {:#x} ws guest {:?} remote {:?}",
                s.v6, s.remote_isn, s.guest_isn, s.guest_ws, s.remote_ws
            );
        }
    }
    for _ in 0..MAX_OPS {
        if u.is_empty() || r.step(&mut u).is_err() {
            break;
        }
    }
    // Whatever is left in the outboxes must be sound too.
    r.eng.tick(r.now + 1_000_000_000);
    for q in 0..=queues {
        r.take(q);
    }
    r.check();
    let stats = r.counters.snapshot(r.eng.enabled(), r.eng.draining());
    assert_eq!(stats.custody_bytes, r.eng.custody_bytes() as u64);
    if tracing() {
        eprintln!(
            "stats: {}",
            serde_json::to_string(&stats).unwrap_or_default()
        );
    }
}

fuzz_target!(|data: &[u8]| {
    run(data);
});
