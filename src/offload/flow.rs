//! The state of one offloaded TCP flow and the contract's rules applied to
//! its packets (`docs: ack-offload.md`). Pure logic: no guest memory, no
//! clocks, no I/O; the engine in `mod.rs` feeds packets and times in.

use super::custody::Custody;
use super::wire::{
    self, flags, seq_le, seq_lt, seq_max, AckTemplate, FrameSpec, IpVersion, TcpSegment,
};

/// Why a flow stopped emitting early ACKs for now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OfflineReason {
    /// Out-of-order data or a hole (rule 2).
    Hole,
    /// The guest posted no RX buffers (rule 3).
    NoBuffer,
    /// The guest advertised a zero window (rule 6).
    ZeroWindow,
    /// The guest moved its right window edge back (rule 6).
    WindowRetracted,
    /// The remote sent FIN (rule 13).
    RemoteFin,
    /// The guest sent FIN (rule 13).
    GuestFin,
    /// A segment failed checksum verification (rule 4).
    BadChecksum,
    /// No custody budget for the data (rule 5).
    CustodyBudget,
    /// The guest did not acknowledge custody data in time (rule 5).
    RedeliveryTimeout,
}

impl OfflineReason {
    /// Every reason, in counter order.
    pub const ALL: [OfflineReason; 9] = [
        OfflineReason::Hole,
        OfflineReason::NoBuffer,
        OfflineReason::ZeroWindow,
        OfflineReason::WindowRetracted,
        OfflineReason::RemoteFin,
        OfflineReason::GuestFin,
        OfflineReason::BadChecksum,
        OfflineReason::CustodyBudget,
        OfflineReason::RedeliveryTimeout,
    ];

    /// Name used in counters and JSON.
    pub fn name(self) -> &'static str {
        match self {
            OfflineReason::Hole => "hole",
            OfflineReason::NoBuffer => "no_buffer",
            OfflineReason::ZeroWindow => "zero_window",
            OfflineReason::WindowRetracted => "window_retracted",
            OfflineReason::RemoteFin => "remote_fin",
            OfflineReason::GuestFin => "guest_fin",
            OfflineReason::BadChecksum => "bad_checksum",
            OfflineReason::CustodyBudget => "custody_budget",
            OfflineReason::RedeliveryTimeout => "redelivery_timeout",
        }
    }

    /// Whether the flow may come back online (FIN is for good).
    fn recoverable(self) -> bool {
        !matches!(self, OfflineReason::RemoteFin | OfflineReason::GuestFin)
    }
}

/// Why a flow is never offloaded (rule 1, rule 14).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PassReason {
    /// First seen mid-stream (backend restart, migration destination).
    MidStream,
    /// TCP-MD5 signature option.
    Md5,
    /// TCP-AO.
    TcpAo,
    /// Multipath TCP.
    Mptcp,
    /// AccECN negotiated.
    AccEcn,
    /// The URG flag was used.
    Urgent,
    /// Data on the SYN (TCP Fast Open).
    SynData,
    /// The flow table was full.
    TableFull,
}

impl PassReason {
    /// Every reason, in counter order.
    pub const ALL: [PassReason; 8] = [
        PassReason::MidStream,
        PassReason::Md5,
        PassReason::TcpAo,
        PassReason::Mptcp,
        PassReason::AccEcn,
        PassReason::Urgent,
        PassReason::SynData,
        PassReason::TableFull,
    ];

    /// Name used in counters and JSON.
    pub fn name(self) -> &'static str {
        match self {
            PassReason::MidStream => "mid_stream",
            PassReason::Md5 => "md5",
            PassReason::TcpAo => "tcp_ao",
            PassReason::Mptcp => "mptcp",
            PassReason::AccEcn => "accecn",
            PassReason::Urgent => "urgent",
            PassReason::SynData => "syn_data",
            PassReason::TableFull => "table_full",
        }
    }
}

/// What the flow does with the data it sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Handshake in progress: nothing offloaded yet.
    Handshake,
    /// Early ACKs allowed.
    Active,
    /// No early ACKs until the guest catches up.
    Offline(OfflineReason),
    /// Never offloaded.
    PassThrough(PassReason),
}

impl Mode {
    /// `handshake`, `active`, `offline` or `pass_through`.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Handshake => "handshake",
            Mode::Active => "active",
            Mode::Offline(_) => "offline",
            Mode::PassThrough(_) => "pass_through",
        }
    }

    /// Why the flow is offline or passed through.
    pub fn reason(self) -> Option<&'static str> {
        match self {
            Mode::Offline(r) => Some(r.name()),
            Mode::PassThrough(r) => Some(r.name()),
            _ => None,
        }
    }
}

/// What one side said in its SYN.
#[derive(Clone, Copy, Debug, Default)]
struct SynFacts {
    seen: bool,
    isn: u32,
    /// Window field of the SYN (never scaled).
    window: u16,
    wscale: Option<u8>,
    timestamps: bool,
    mss: Option<u16>,
    /// ECE / CWR / AE flags of the SYN.
    ece: bool,
    cwr: bool,
    ae: bool,
}

impl SynFacts {
    fn from(seg: &TcpSegment) -> Self {
        SynFacts {
            seen: true,
            isn: seg.seq,
            window: seg.window,
            wscale: seg.options.wscale,
            timestamps: seg.options.timestamps.is_some(),
            mss: seg.options.mss,
            ece: seg.has(flags::ECE),
            cwr: seg.has(flags::CWR),
            ae: seg.ae,
        }
    }
}

/// Link-layer and IP fields to copy into frames we generate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Template {
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    ttl: u8,
    dscp: u8,
    dont_fragment: bool,
    flow_label: u32,
}

impl Template {
    fn from(headers: &[u8], seg: &TcpSegment) -> Self {
        let mut t = Template {
            ttl: seg.ttl,
            dscp: seg.dscp,
            dont_fragment: seg.dont_fragment,
            flow_label: seg.flow_label,
            ..Template::default()
        };
        t.dst_mac.copy_from_slice(&headers[0..6]);
        t.src_mac.copy_from_slice(&headers[6..12]);
        t
    }
}

/// An early ACK [`Flow::early_ack`] emitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EarlyAck {
    /// Bytes it newly acknowledged.
    pub bytes: u32,
    /// It carried ECE (rule 11: a CE-marked segment was early-ACKed and
    /// the sender's CWR has not arrived yet).
    pub ece: bool,
}

/// Tunables the rules need.
#[derive(Clone, Copy, Debug)]
pub struct FlowLimits {
    /// Upper bound on the window of our ACKs, in bytes (0: none; vSnoop's buf_size).
    pub window_bound: u32,
    /// Early ACKs may be sent (the offload is on and no migration drains
    /// it): a guest window update can wait for the next one.
    pub early_acks: bool,
}

/// What to do with a guest packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxVerdict {
    /// Send it unchanged.
    Pass,
    /// Its headers were edited in the caller's copy: send that copy.
    Rewritten,
    /// Do not send it (the sender no longer needs it).
    Suppress,
}

/// What a guest packet did to the flow, for the engine's bookkeeping.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TxEffects {
    /// The guest acknowledged new data.
    pub progress: bool,
    /// A duplicate ACK or SACK below E: the guest misses custody data.
    pub missing: bool,
    /// The flow went offline for this reason.
    pub offline: Option<OfflineReason>,
    /// The flow came back online.
    pub online: bool,
    /// The handshake completed with this mode.
    pub established: Option<Mode>,
    /// RST: forget the flow.
    pub closed: bool,
    /// A guest ACK below E whose only news was a little more window was
    /// suppressed: the flow's next early ACK carries it (rule 10).
    pub window_deferred: bool,
}

/// What a remote segment means for the flow, before its payload is kept.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RxEffects {
    /// New in-order payload bytes: `[offset, offset + len)` of the payload.
    pub new_bytes: u32,
    /// Where the new bytes start in the payload.
    pub offset: u32,
    /// The flow went offline for this reason.
    pub offline: Option<OfflineReason>,
    /// The handshake completed with this mode.
    pub established: Option<Mode>,
    /// RST: forget the flow.
    pub closed: bool,
}

/// One TCP flow between the guest and a remote peer.
#[derive(Debug)]
pub struct Flow {
    /// Current mode.
    pub mode: Mode,
    /// Queue pair the remote's data last arrived on (re-delivery goes there).
    pub queue: usize,
    version: IpVersion,
    guest_addr: [u8; 16],
    remote_addr: [u8; 16],
    guest_port: u16,
    remote_port: u16,
    guest_initiated: bool,
    guest_syn: SynFacts,
    remote_syn: SynFacts,
    /// Shift applied to the guest's window field.
    ws_guest: u8,
    timestamps: bool,
    ecn: bool,
    /// Largest payload the guest accepts per segment.
    guest_mss: u16,
    /// Largest payload of a single remote segment so far (not a GSO
    /// super-segment): what "full-sized" means for rule 12.
    rcv_mss: u32,
    /// The early ACK of the full-sized segments committed since the last
    /// one waits for the end of the RX batch (rule 12).
    ack_deferred: bool,
    /// Payload bytes of those segments.
    deferred_bytes: u32,
    /// Guest's latest cumulative ACK (`Gack`).
    pub gack: u32,
    /// Guest's latest raw window field (`Gwin`).
    pub gwin: u16,
    /// Guest's right window edge (`Gedge`).
    pub gedge: u32,
    /// Highest ACK the sender has seen from us or the guest (`E`).
    pub e: u32,
    /// End of in-order data published in the used ring (`D`).
    pub d: u32,
    /// Highest right edge the sender has been told.
    edge_sent: u32,
    /// Guest's snd_nxt.
    snd_nxt: u32,
    /// Largest TSval the guest sent.
    guest_tsval: Option<u32>,
    /// TSval of the remote segment that last advanced D.
    tsval_at_d: Option<u32>,
    /// Largest TSecr the sender has seen from this side.
    tsecr_sent: Option<u32>,
    /// Remote's latest ACK, window and timestamps, for frames toward the guest.
    remote_ack: u32,
    remote_window: u16,
    remote_ts: Option<(u32, u32)>,
    /// CE seen on early-ACKed data: ECE until the sender's CWR (rule 11).
    ece_pending: bool,
    /// A guest ACK at E has been let through since E last moved (rule 10).
    reached_e: bool,
    /// A FIN was seen: never online again.
    closing: bool,
    guest_template: Template,
    remote_template: Template,
    /// The early ACK's frame prepared from `guest_template` (`None` until
    /// the first early ACK and whenever that template changes).
    ack_template: Option<AckTemplate>,
    /// Copy of the bytes `[gack, d)` delivered to the guest.
    pub custody: Custody,
    /// Duplicate ACKs below E since the last re-delivery.
    pub dupacks: u32,
    /// Re-deliveries since the guest last made progress (the timer's backoff).
    pub redeliveries: u32,
    /// Re-deliveries since the last progress that count toward the reset:
    /// those after which the guest was seen running, or made at the longest
    /// backoff. A guest that is merely descheduled is not failing.
    pub failed_redeliveries: u32,
    /// Time of the last progress or re-delivery, or of the first byte owed
    /// since the guest last caught up with E (ns).
    pub last_progress: u64,
    /// Last packet from the guest on this flow (ns): it is running.
    pub last_guest: u64,
    /// Last packet in either direction (ns), for ageing.
    pub last_seen: u64,
    /// The guest's latest non-SYN ACK (ack, raw window) while the
    /// handshake was still incomplete: its window counts at establishment.
    handshake_ack: Option<(u32, u16)>,
    /// In the engine's list of flows that may owe bytes (the engine adds a
    /// flow when it starts owing and drops it lazily, on its timer).
    pub(super) in_owed: bool,
    /// Number from a process-wide counter, so a list entry of a forgotten
    /// flow never matches a later flow with the same key.
    pub(super) id: u32,
}

/// Smallest payload that counts as a full-sized segment for rule 12 (RFC
/// 1122's default MSS): shorter segments are acknowledged at once.
const MIN_FULL_SEGMENT: u32 = 536;

/// The most payload full-sized segments of one flow may carry in one RX
/// batch before their early ACK goes out: a GRO super-segment's worth
/// (Linux's default `gro_max_size`), the most a guest's own stack would
/// take in before acknowledging (rule 12).
const BATCH_ACK_BYTES: u32 = 65_536;

/// RFC 2883: the first SACK block is a D-SACK if it lies below the
/// cumulative ACK or inside the second block.
fn is_dsack(headers: &[u8], seg: &TcpSegment) -> bool {
    let mut blocks = wire::sack_blocks(headers, seg);
    let Some((left, right)) = blocks.next() else {
        return false;
    };
    seq_lt(left, seg.ack)
        || blocks
            .next()
            .is_some_and(|(l2, r2)| seq_le(l2, left) && seq_le(right, r2))
}

/// Bytes covered by a window field under shift `ws`.
fn window_bytes(field: u16, ws: u8) -> u32 {
    u32::from(field) << ws
}

impl Flow {
    fn blank(seg: &TcpSegment, from_guest: bool, now: u64) -> Flow {
        let (guest_addr, remote_addr, guest_port, remote_port) = if from_guest {
            (seg.src, seg.dst, seg.sport, seg.dport)
        } else {
            (seg.dst, seg.src, seg.dport, seg.sport)
        };
        Flow {
            mode: Mode::Handshake,
            queue: 0,
            version: seg.version,
            guest_addr,
            remote_addr,
            guest_port,
            remote_port,
            guest_initiated: from_guest,
            guest_syn: SynFacts::default(),
            remote_syn: SynFacts::default(),
            ws_guest: 0,
            timestamps: false,
            ecn: false,
            guest_mss: 536,
            rcv_mss: 0,
            ack_deferred: false,
            deferred_bytes: 0,
            gack: 0,
            gwin: 0,
            gedge: 0,
            e: 0,
            d: 0,
            edge_sent: 0,
            snd_nxt: 0,
            guest_tsval: None,
            tsval_at_d: None,
            tsecr_sent: None,
            remote_ack: 0,
            remote_window: 0,
            remote_ts: None,
            ece_pending: false,
            reached_e: false,
            closing: false,
            guest_template: Template::default(),
            remote_template: Template::default(),
            ack_template: None,
            custody: Custody::default(),
            dupacks: 0,
            redeliveries: 0,
            failed_redeliveries: 0,
            last_progress: now,
            last_guest: now,
            last_seen: now,
            handshake_ack: None,
            in_owed: false,
            id: 0,
        }
    }

    /// A flow learned from a SYN (sent by the guest if `from_guest`).
    pub fn from_syn(headers: &[u8], seg: &TcpSegment, from_guest: bool, now: u64) -> Flow {
        let mut flow = Flow::blank(seg, from_guest, now);
        if let Some(reason) = pass_reason(seg) {
            flow.mode = Mode::PassThrough(reason);
        }
        if from_guest {
            flow.guest_syn = SynFacts::from(seg);
            flow.learn_guest(headers, seg);
        } else {
            flow.remote_syn = SynFacts::from(seg);
            flow.learn_remote(headers, seg);
        }
        flow
    }

    /// A record for a flow that is never offloaded.
    pub fn pass_through(seg: &TcpSegment, from_guest: bool, reason: PassReason, now: u64) -> Flow {
        let mut flow = Flow::blank(seg, from_guest, now);
        flow.mode = Mode::PassThrough(reason);
        flow
    }

    /// Whether the sender was told of bytes the guest has not acknowledged.
    pub fn owes(&self) -> bool {
        seq_lt(self.gack, self.e)
    }

    /// The flow's addresses and ports, guest side first.
    pub fn endpoints(&self) -> (std::net::IpAddr, u16, std::net::IpAddr, u16) {
        let ip = |a: [u8; 16]| match self.version {
            IpVersion::V4 => std::net::IpAddr::from([a[0], a[1], a[2], a[3]]),
            IpVersion::V6 => std::net::IpAddr::from(a),
        };
        (
            ip(self.guest_addr),
            self.guest_port,
            ip(self.remote_addr),
            self.remote_port,
        )
    }

    /// Bytes acknowledged to the sender that the guest has not acknowledged
    /// yet (`E - Gack`, 0 if it owes nothing).
    pub fn owed_bytes(&self) -> u32 {
        if self.owes() {
            self.e.wrapping_sub(self.gack)
        } else {
            0
        }
    }

    /// Whether early ACKs are allowed now.
    pub fn active(&self) -> bool {
        self.mode == Mode::Active
    }

    /// Whether a FIN was seen in either direction.
    pub fn closing(&self) -> bool {
        self.closing
    }

    /// Whether the flow only passes packets (and owes nothing).
    pub fn inert(&self) -> bool {
        matches!(self.mode, Mode::PassThrough(_)) && !self.owes()
    }

    #[inline]
    fn learn_guest(&mut self, headers: &[u8], seg: &TcpSegment) {
        let template = Template::from(headers, seg);
        if template != self.guest_template {
            self.guest_template = template;
            self.ack_template = None;
        }
        let end = seg.seq.wrapping_add(seg.seq_len());
        self.snd_nxt = if self.guest_syn.seen && !seg.has(flags::SYN) {
            seq_max(self.snd_nxt, end)
        } else {
            end
        };
        if let Some((tsval, _)) = seg.options.timestamps {
            self.guest_tsval = Some(self.guest_tsval.map_or(tsval, |t| seq_max(t, tsval)));
        }
    }

    #[inline]
    fn learn_remote(&mut self, headers: &[u8], seg: &TcpSegment) {
        self.remote_template = Template::from(headers, seg);
        if seg.has(flags::ACK) {
            self.remote_ack = seg.ack;
        }
        self.remote_window = seg.window;
        if let Some((tsval, tsecr)) = seg.options.timestamps {
            let newest = self.remote_ts.map_or(tsval, |(t, _)| seq_max(t, tsval));
            self.remote_ts = Some((newest, tsecr));
        }
    }

    fn go_offline(&mut self, reason: OfflineReason) -> Option<OfflineReason> {
        match self.mode {
            Mode::Active => {
                self.mode = Mode::Offline(reason);
                Some(reason)
            }
            Mode::Offline(r) if r.recoverable() && !reason.recoverable() => {
                self.mode = Mode::Offline(reason);
                Some(reason)
            }
            _ => None,
        }
    }

    /// Back online once the guest has caught up with everything the sender
    /// was told (rule 2), its window is open and the custody copy is whole.
    fn try_online(&mut self) -> bool {
        let Mode::Offline(reason) = self.mode else {
            return false;
        };
        if !reason.recoverable() || self.closing || self.owes() || self.gwin == 0 {
            return false;
        }
        if !self.custody.complete() || self.custody.end() != self.d {
            return false;
        }
        self.mode = Mode::Active;
        true
    }

    /// What takes a flow offline as it is established: a guest FIN during
    /// the handshake (rule 13) or a guest that closed its window then.
    fn offline_from_the_start(&mut self) -> Option<OfflineReason> {
        if self.closing {
            self.go_offline(OfflineReason::GuestFin)
        } else if self.gwin == 0 {
            self.go_offline(OfflineReason::ZeroWindow)
        } else {
            None
        }
    }

    /// Both SYNs are known: fix what was negotiated and pick the mode.
    fn establish(&mut self) -> Mode {
        let (g, r) = (self.guest_syn, self.remote_syn);
        if let (Some(ws), Some(_)) = (g.wscale, r.wscale) {
            self.ws_guest = ws;
        }
        self.timestamps = g.timestamps && r.timestamps;
        let (init, resp) = if self.guest_initiated { (g, r) } else { (r, g) };
        // RFC 3168: initiator ECE+CWR, responder ECE alone. Anything with AE,
        // or a responder echoing CWR, is AccECN (RFC 9768): not ours.
        let accecn = init.ae || (init.ece && init.cwr && (resp.cwr || resp.ae));
        self.ecn = init.ece && init.cwr && resp.ece && !accecn;
        self.guest_mss = g.mss.unwrap_or(536).clamp(64, 9000);
        // Sequence state starts at the remote's ISN + 1, which the guest's
        // SYN(-ACK) acknowledged, with the guest's unscaled SYN window.
        self.d = r.isn.wrapping_add(1);
        self.e = self.d;
        self.gack = self.d;
        self.gwin = g.window;
        self.gedge = self.d.wrapping_add(u32::from(g.window));
        if let Some((ack, window)) = self.handshake_ack {
            // The guest spoke again before the handshake completed: never
            // advertise past the edge it gave last (rule 6).
            let edge = ack.wrapping_add(window_bytes(window, self.ws_guest));
            if seq_lt(edge, self.gedge) {
                self.gwin = window;
                self.gedge = if seq_lt(edge, self.d) { self.d } else { edge };
            }
        }
        self.edge_sent = self.gedge;
        self.custody.reset(self.d);
        if !matches!(self.mode, Mode::PassThrough(_)) {
            self.mode = if accecn {
                Mode::PassThrough(PassReason::AccEcn)
            } else {
                Mode::Active
            };
        }
        self.mode
    }

    /// A guest packet of this flow. `headers` is the caller's private copy
    /// of the frame headers, edited in place when the verdict is
    /// `Rewritten`; `needs_csum` says the TCP checksum is only a seed.
    #[inline]
    pub fn on_guest(
        &mut self,
        headers: &mut [u8],
        seg: &TcpSegment,
        needs_csum: bool,
        limits: FlowLimits,
        now: u64,
    ) -> (TxVerdict, TxEffects) {
        let mut fx = TxEffects::default();
        self.last_seen = now;
        self.last_guest = now;
        if seg.has(flags::RST) {
            fx.closed = true;
            return (TxVerdict::Pass, fx);
        }
        if seg.has(flags::FIN) {
            // Rule 13, whatever else the segment is: also a FIN on a SYN or
            // before the handshake completed (the flow then starts offline).
            self.closing = true;
            fx.offline = self.go_offline(OfflineReason::GuestFin);
        }
        if seg.has(flags::SYN) {
            if self.mode == Mode::Handshake {
                self.guest_syn = SynFacts::from(seg);
                self.handshake_ack = None;
                if let Some(reason) = pass_reason(seg) {
                    // Decided by this SYN: counted like an establishment.
                    self.mode = Mode::PassThrough(reason);
                    fx.established = Some(self.mode);
                }
            }
            self.learn_guest(headers, seg);
            return (TxVerdict::Pass, fx);
        }
        self.learn_guest(headers, seg);
        if self.mode == Mode::Handshake {
            if seg.has(flags::ACK) && self.guest_syn.seen {
                self.handshake_ack = Some((seg.ack, seg.window));
            }
            if !(self.guest_syn.seen && self.remote_syn.seen) {
                return (TxVerdict::Pass, fx);
            }
            fx.established = Some(self.establish());
            fx.offline = self.offline_from_the_start();
        }
        if seg.has(flags::URG) && !matches!(self.mode, Mode::PassThrough(_)) {
            self.mode = Mode::PassThrough(PassReason::Urgent);
        }
        if !seg.has(flags::ACK) {
            return (TxVerdict::Pass, fx);
        }

        // What the guest now says about its receive side.
        let ack = seg.ack;
        let edge = ack.wrapping_add(window_bytes(seg.window, self.ws_guest));
        let prev_gack = self.gack;
        if seq_lt(self.gack, ack) {
            self.gack = ack;
            self.custody.trim(ack);
            if seq_le(self.d, ack) {
                // The guest holds everything we delivered (and possibly data
                // it had out of order): nothing is owed to custody any more,
                // and a copy that had a gap is whole again (empty).
                self.d = ack;
                self.custody.reset(ack);
            }
            fx.progress = true;
        }
        if seg.window == 0 {
            fx.offline = fx.offline.or(self.go_offline(OfflineReason::ZeroWindow));
        } else if seq_lt(edge.wrapping_add(1 << self.ws_guest), self.gedge) {
            // Scaling rounds the window down by up to 2^ws - 1 bytes (the
            // unscaled SYN-ACK window, for one): only more than that is a
            // retracted edge.
            fx.offline = fx
                .offline
                .or(self.go_offline(OfflineReason::WindowRetracted));
        }
        self.gwin = seg.window;
        self.gedge = edge;

        let owed_before = seq_lt(prev_gack, self.e);
        // A D-SACK (RFC 2883) reports a duplicate, typically our own
        // re-delivery: nothing is missing, and counting it would re-deliver
        // again, which makes another D-SACK. A SACK block above the
        // cumulative ACK reports a hole below it.
        let dup = seg.is_pure_ack() && ack == prev_gack && owed_before && !is_dsack(headers, seg);
        let hole_reported =
            owed_before && wire::sack_blocks(headers, seg).any(|(left, _)| seq_lt(ack, left));
        if dup || hole_reported {
            self.dupacks += 1;
            fx.missing = true;
        }
        if fx.progress {
            self.dupacks = 0;
        }
        if fx.offline.is_none() && self.try_online() {
            fx.online = true;
        }

        let verdict = self.guest_verdict(headers, seg, needs_csum, limits, &mut fx);
        (verdict, fx)
    }

    /// Rule 10: suppress, rewrite or pass a guest packet that carries ACK.
    fn guest_verdict(
        &mut self,
        headers: &mut [u8],
        seg: &TcpSegment,
        needs_csum: bool,
        limits: FlowLimits,
        fx: &mut TxEffects,
    ) -> TxVerdict {
        let t = seg.tcp_at;
        let ack = seg.ack;
        let below_e = seq_lt(ack, self.e);
        let raises_e = seq_lt(self.e, ack);
        if raises_e {
            // The guest acknowledges beyond anything we said: it sets E.
            self.e = ack;
            self.reached_e = true;
        }
        // SACK blocks at or below E (and D-SACKs of our re-deliveries) mean
        // nothing to a sender that already holds an ACK for E.
        let mut sack_trimmed = None;
        let mut sack_kept = seg.options.sack_at != 0;
        if seg.options.sack_at != 0 && seq_le(ack, self.e) {
            let trimmed = trim_sack(headers, seg, self.e);
            sack_kept = trimmed.kept > 0;
            sack_trimmed = trimmed.area;
        }
        let sack_removed = sack_trimmed.is_some();
        let ece_new = seg.has(flags::ECE);
        let grows = seq_lt(self.edge_sent, self.gedge);
        let window_news = grows && (!below_e || self.window_update_due(limits));
        let nothing_new = seg.is_pure_ack() && !sack_kept && !ece_new && !window_news;
        // An ACK that raises E is news to the sender, whatever SACK it carried.
        let stale_dup = !raises_e && ack == self.e && self.reached_e && sack_removed;
        if nothing_new && (below_e || stale_dup) {
            fx.window_deferred = grows;
            return TxVerdict::Suppress;
        }
        if ack == self.e && seg.is_pure_ack() {
            self.reached_e = true;
        }
        let mut edit = wire::TcpHeaderEdit::new(headers, t, seg.payload_at);
        if let Some(area) = &sack_trimmed {
            let at = seg.options.sack_at;
            edit.set(at, &area[..usize::from(seg.options.sack_len)]);
        }
        let win_out = if below_e {
            edit.set_u32(t + 8, self.e);
            let win = self.window_field(self.e, limits);
            edit.set_u16(t + 14, win);
            win
        } else {
            seg.window
        };
        let ack_out = if below_e { self.e } else { ack };
        self.edge_sent = seq_max(
            self.edge_sent,
            ack_out.wrapping_add(window_bytes(win_out, self.ws_guest)),
        );
        if let (Some((_, tsecr)), true) = (seg.options.timestamps, self.timestamps) {
            let out = self.tsecr_sent.map_or(tsecr, |s| seq_max(s, tsecr));
            if out != tsecr {
                edit.set_u32(seg.options.timestamps_at + 4, out);
            }
            self.tsecr_sent = Some(out);
        }
        if self.ece_pending && !seg.has(flags::ECE) {
            edit.set(t + 13, &[seg.flags | flags::ECE]);
        }
        if edit.finish(!needs_csum) {
            TxVerdict::Rewritten
        } else {
            TxVerdict::Pass
        }
    }

    /// Whether the guest's grown window must reach the sender now, in a
    /// rewritten copy of a guest ACK below E (rule 10), or can wait for the
    /// flow's next early ACK, which carries the guest's latest edge anyway.
    /// While the application reads, nearly every guest ACK in a bulk
    /// transfer moves the edge a little: sending each one beside the early
    /// ACKs doubled the ACKs the sender's stack handles. It waits, as a
    /// Linux receiver's own window updates do (`tcp_cleanup_rbuf` sends one
    /// when the window at least doubles), unless the window the sender knows
    /// beyond E is under two segments (it may be stopped by it), the update
    /// doubles it, or no early ACK can follow (flow offline, offload off or
    /// draining). The guest's ACK that reaches E always passes.
    fn window_update_due(&self, limits: FlowLimits) -> bool {
        if !(limits.early_acks && self.active()) {
            return true;
        }
        let known = if seq_lt(self.e, self.edge_sent) {
            self.edge_sent.wrapping_sub(self.e)
        } else {
            0
        };
        let fresh = u32::from(self.window_field(self.e, limits)) << self.ws_guest;
        known < 2 * u32::from(self.guest_mss) || fresh >= known.saturating_mul(2)
    }

    /// Window field for an ACK of `ack` (rule 6): never past Gedge, clamped
    /// to the field, optionally bounded.
    fn window_field(&self, ack: u32, limits: FlowLimits) -> u16 {
        if !seq_lt(ack, self.gedge) {
            return 0;
        }
        let mut bytes = self.gedge.wrapping_sub(ack);
        if limits.window_bound > 0 {
            bytes = bytes.min(limits.window_bound);
        }
        (bytes >> self.ws_guest).min(u32::from(u16::MAX)) as u16
    }

    /// A remote segment of this flow, before it is delivered. Says which of
    /// its payload bytes are new in-order data; the caller keeps a copy of
    /// those and then calls [`Flow::commit`] after they are published.
    #[inline]
    pub fn on_remote(
        &mut self,
        headers: &[u8],
        seg: &TcpSegment,
        queue: usize,
        now: u64,
    ) -> RxEffects {
        let mut fx = RxEffects::default();
        self.last_seen = now;
        self.queue = queue;
        if seg.has(flags::RST) {
            fx.closed = true;
            return fx;
        }
        self.learn_remote(headers, seg);
        if seg.has(flags::SYN) {
            if self.mode == Mode::Handshake || matches!(self.mode, Mode::PassThrough(_)) {
                self.remote_syn = SynFacts::from(seg);
                if let Some(reason) = pass_reason(seg) {
                    if self.mode == Mode::Handshake {
                        // Decided by this SYN: counted like an establishment.
                        fx.established = Some(Mode::PassThrough(reason));
                    }
                    self.mode = Mode::PassThrough(reason);
                }
            }
            return fx;
        }
        if self.mode == Mode::Handshake {
            if !(self.guest_syn.seen && self.remote_syn.seen) {
                return fx;
            }
            fx.established = Some(self.establish());
            fx.offline = self.offline_from_the_start();
        }
        if matches!(self.mode, Mode::PassThrough(_)) {
            return fx;
        }
        if seg.has(flags::URG) {
            self.mode = Mode::PassThrough(PassReason::Urgent);
            return fx;
        }
        if seg.has(flags::CWR) {
            self.ece_pending = false;
        }
        if seg.has(flags::FIN) {
            self.closing = true;
            fx.offline = self.go_offline(OfflineReason::RemoteFin);
        }
        let len = seg.payload_len;
        if len == 0 {
            return fx;
        }
        let end = seg.seq.wrapping_add(len);
        if seq_le(seg.seq, self.d) && seq_lt(self.d, end) {
            fx.offset = self.d.wrapping_sub(seg.seq);
            fx.new_bytes = end.wrapping_sub(self.d);
        } else if seq_lt(self.d, seg.seq) {
            fx.offline = fx.offline.or(self.go_offline(OfflineReason::Hole));
        }
        fx
    }

    /// `len` new in-order bytes of `seg` are in guest memory and published.
    pub fn commit(&mut self, seg: &TcpSegment, len: u32) {
        self.d = self.d.wrapping_add(len);
        if let Some((tsval, _)) = seg.options.timestamps {
            self.tsval_at_d = Some(self.tsval_at_d.map_or(tsval, |t| seq_max(t, tsval)));
        }
        if seg.ecn == 3 && self.ecn && self.active() {
            self.ece_pending = true;
        }
    }

    /// Rule 12 ("ACK at least every second full-sized segment and at least
    /// once per GRO super-segment"): whether the early ACK for a segment of
    /// `len` payload bytes, just committed, may wait for the end of the RX
    /// batch. The guest is notified once per batch and its stack takes the
    /// batch's segments of a flow in as GRO super-segments, acknowledging
    /// each once; the early ACK does the same. Full-sized segments wait
    /// until the flow's waiting bytes reach [`BATCH_ACK_BYTES`]; a short
    /// segment or a super-segment from the tap is acknowledged at once,
    /// together with the ones that waited.
    pub fn defer_ack(&mut self, len: u32) -> bool {
        let single = len <= u32::from(self.guest_mss);
        if single {
            self.rcv_mss = self.rcv_mss.max(len);
        }
        let full = single && len >= self.rcv_mss.max(MIN_FULL_SEGMENT);
        self.deferred_bytes = if full {
            self.deferred_bytes.saturating_add(len)
        } else {
            BATCH_ACK_BYTES
        };
        self.ack_deferred = self.deferred_bytes < BATCH_ACK_BYTES;
        if !self.ack_deferred {
            self.deferred_bytes = 0;
        }
        self.ack_deferred
    }

    /// Whether an early ACK waits for the end of the batch; clears it (the
    /// flush sends it, or the flow's mode no longer allows it).
    pub fn take_deferred_ack(&mut self) -> bool {
        self.deferred_bytes = 0;
        std::mem::take(&mut self.ack_deferred)
    }

    /// Takes the flow offline (engine-detected reasons: buffers, budget, timeouts).
    pub fn offline(&mut self, reason: OfflineReason) -> Option<OfflineReason> {
        self.go_offline(reason)
    }

    /// The early ACK for data published up to D, if the rules allow one
    /// now (rules 2, 6-9, 11). Appends the frame to `out`.
    #[inline]
    pub fn early_ack(&mut self, limits: FlowLimits, out: &mut Vec<u8>) -> Option<EarlyAck> {
        if !self.active() {
            return None;
        }
        let limit = if seq_lt(self.gedge, self.d) {
            self.gedge
        } else {
            self.d
        };
        let limit = if seq_lt(self.custody.end(), limit) {
            self.custody.end()
        } else {
            limit
        };
        if !seq_lt(self.e, limit) {
            return None;
        }
        let ack = limit;
        let window = self.window_field(ack, limits);
        let timestamps = match (self.timestamps, self.guest_tsval) {
            (true, Some(tsval)) => {
                let echo = match (self.tsecr_sent, self.tsval_at_d) {
                    (Some(s), Some(t)) => seq_max(s, t),
                    (s, t) => s.or(t).unwrap_or(0),
                };
                self.tsecr_sent = Some(echo);
                Some((tsval, echo))
            }
            _ => None,
        };
        let mut flag_bits = flags::ACK;
        if self.ece_pending {
            flag_bits |= flags::ECE;
        }
        if self
            .ack_template
            .as_ref()
            .is_some_and(|t| t.timestamps() != timestamps.is_some())
        {
            self.ack_template = None;
        }
        let tpl = self.ack_template.get_or_insert_with(|| {
            let t = &self.guest_template;
            AckTemplate::new(&FrameSpec {
                dst_mac: t.dst_mac,
                src_mac: t.src_mac,
                version: Some(self.version),
                src: self.guest_addr,
                dst: self.remote_addr,
                ttl: t.ttl,
                dscp: t.dscp,
                dont_fragment: t.dont_fragment,
                flow_label: t.flow_label,
                sport: self.guest_port,
                dport: self.remote_port,
                timestamps,
                ..FrameSpec::default()
            })
        });
        tpl.emit(self.snd_nxt, ack, flag_bits, window, timestamps, out);
        let acked = EarlyAck {
            bytes: ack.wrapping_sub(self.e),
            ece: self.ece_pending,
        };
        self.e = ack;
        self.reached_e = false;
        self.edge_sent = seq_max(
            self.edge_sent,
            ack.wrapping_add(window_bytes(window, self.ws_guest)),
        );
        Some(acked)
    }

    /// Frames re-delivering custody bytes from Gack on (at most `max_bytes`),
    /// built as the remote would have sent them. Returns the bytes covered.
    pub fn redelivery(&mut self, max_bytes: usize, out: &mut Vec<Vec<u8>>) -> usize {
        let want = (self.e.wrapping_sub(self.gack) as usize).min(max_bytes);
        let mut data = Vec::with_capacity(want);
        self.custody.copy_from(self.gack, want, &mut data);
        let mss = usize::from(self.guest_mss) - if self.timestamps { 12 } else { 0 };
        let t = &self.remote_template;
        let mut seq = self.gack;
        for chunk in data.chunks(mss.max(1)) {
            let mut frame = Vec::with_capacity(chunk.len() + 80);
            wire::build_frame(
                &FrameSpec {
                    dst_mac: t.dst_mac,
                    src_mac: t.src_mac,
                    version: Some(self.version),
                    src: self.remote_addr,
                    dst: self.guest_addr,
                    ttl: t.ttl,
                    dscp: t.dscp,
                    dont_fragment: t.dont_fragment,
                    flow_label: t.flow_label,
                    sport: self.remote_port,
                    dport: self.guest_port,
                    seq,
                    ack: self.remote_ack,
                    flags: flags::ACK | flags::PSH,
                    window: self.remote_window,
                    timestamps: self.remote_ts.filter(|_| self.timestamps),
                    payload: chunk,
                },
                &mut frame,
            );
            out.push(frame);
            seq = seq.wrapping_add(chunk.len() as u32);
        }
        data.len()
    }

    /// RST frames for both ends (rule 5: give up rather than hang): one to
    /// the remote, and toward the guest one at Gack (and one at D if the
    /// guest may have received further).
    pub fn resets(&self, to_remote: &mut Vec<u8>, to_guest: &mut Vec<Vec<u8>>) {
        let g = &self.guest_template;
        let base = FrameSpec {
            version: Some(self.version),
            flags: flags::RST | flags::ACK,
            ..FrameSpec::default()
        };
        wire::build_frame(
            &FrameSpec {
                dst_mac: g.dst_mac,
                src_mac: g.src_mac,
                src: self.guest_addr,
                dst: self.remote_addr,
                ttl: g.ttl,
                sport: self.guest_port,
                dport: self.remote_port,
                seq: self.snd_nxt,
                ack: self.e,
                ..base
            },
            to_remote,
        );
        let r = &self.remote_template;
        let mut seqs = vec![self.gack];
        if self.d != self.gack {
            seqs.push(self.d);
        }
        for seq in seqs {
            let mut frame = Vec::new();
            wire::build_frame(
                &FrameSpec {
                    dst_mac: r.dst_mac,
                    src_mac: r.src_mac,
                    src: self.remote_addr,
                    dst: self.guest_addr,
                    ttl: r.ttl,
                    sport: self.remote_port,
                    dport: self.guest_port,
                    seq,
                    ack: self.remote_ack,
                    ..base
                },
                &mut frame,
            );
            to_guest.push(frame);
        }
    }
}

/// Options and flags that keep a flow out of the offload for life (rule 1).
fn pass_reason(seg: &TcpSegment) -> Option<PassReason> {
    let o = &seg.options;
    if o.md5 {
        Some(PassReason::Md5)
    } else if o.ao {
        Some(PassReason::TcpAo)
    } else if o.mptcp {
        Some(PassReason::Mptcp)
    } else if seg.has(flags::URG) {
        Some(PassReason::Urgent)
    } else if seg.has(flags::SYN) && (o.fastopen || seg.payload_len > 0 || seg.has(flags::FIN)) {
        // Data or a FIN on the SYN (RFC 9293 allows both; Linux sends a FIN
        // there never): the handshake is not one whose state rule 13 follows.
        Some(PassReason::SynData)
    } else if seg.has(flags::SYN) && seg.ae {
        Some(PassReason::AccEcn)
    } else {
        None
    }
}

/// The SACK option of a guest ACK after [`trim_sack`].
struct TrimmedSack {
    /// Blocks kept.
    kept: usize,
    /// The option's new bytes (its length unchanged), if any block changed.
    area: Option<[u8; 40]>,
}

/// Drops SACK blocks that end at or below `e` and moves left edges below `e`
/// up to it; the freed option bytes become NOPs. Returns the option's new
/// bytes (to be written by the caller) when anything changed.
fn trim_sack(headers: &[u8], seg: &TcpSegment, e: u32) -> TrimmedSack {
    let len = usize::from(seg.options.sack_len);
    let mut kept = 0usize;
    let mut out = [0u8; 32];
    let mut changed = false;
    for (left, right) in wire::sack_blocks(headers, seg) {
        if seq_le(right, e) {
            changed = true;
            continue;
        }
        let left = if seq_lt(left, e) {
            changed = true;
            e
        } else {
            left
        };
        if kept < 4 {
            out[kept * 8..kept * 8 + 4].copy_from_slice(&left.to_be_bytes());
            out[kept * 8 + 4..kept * 8 + 8].copy_from_slice(&right.to_be_bytes());
            kept += 1;
        }
    }
    if !changed {
        return TrimmedSack { kept, area: None };
    }
    let mut area = [wire::option::NOP; 40];
    if kept > 0 {
        area[0] = wire::option::SACK;
        area[1] = (2 + kept * 8) as u8;
        area[2..2 + kept * 8].copy_from_slice(&out[..kept * 8]);
    }
    debug_assert!(len <= area.len());
    TrimmedSack {
        kept,
        area: Some(area),
    }
}
