//! ACK offload (after vSnoop, SC 2010): acknowledge TCP data to the remote
//! sender as soon as it is published in the guest's RX ring, keep custody of
//! acknowledged bytes until the guest confirms them, and re-deliver them if
//! the guest drops them. The rules are `docs: ack-offload.md`; each one is
//! named where it is applied, in [`flow`].
//!
//! The engine is shared by all queue pairs (a flow's two directions may use
//! different queues) behind one mutex. The data path calls it:
//! - [`AckOffload::guest_tx`] for every guest TCP frame before it is written
//!   to the tap (learn, then pass / rewrite / suppress);
//! - [`AckOffload::remote_rx`] for every tap TCP frame before its used entry
//!   is published (learn, keep a custody copy), and
//!   [`AckOffload::remote_published`] right after (the early ACK);
//! - [`AckOffload::tick`] from a periodic timer (re-delivery, ageing).
//!   Frames the engine wants sent wait in per-queue outboxes.

pub mod custody;
pub mod flow;
mod huge;
pub mod wire;

#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use hashbrown::hash_table::{Entry, HashTable};
use serde::Serialize;

use flow::{Flow, FlowLimits, Mode, OfflineReason, PassReason, TxVerdict};
use wire::{flags, IpVersion, TcpSegment};

/// A flow's identity, guest side first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowKey {
    version: IpVersion,
    guest: [u8; 16],
    remote: [u8; 16],
    guest_port: u16,
    remote_port: u16,
}

/// Every field, in three wide writes: the derived hash writes the addresses
/// as length-prefixed byte slices, which costs several times as much on
/// every lookup.
impl std::hash::Hash for FlowKey {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        h.write_u128(u128::from_ne_bytes(self.guest));
        h.write_u128(u128::from_ne_bytes(self.remote));
        h.write_u64(
            u64::from(self.guest_port)
                | u64::from(self.remote_port) << 16
                | u64::from(self.version == IpVersion::V6) << 32,
        );
    }
}

impl FlowKey {
    /// The key of a segment sent by the guest (`from_guest`) or the remote.
    pub fn of(seg: &TcpSegment, from_guest: bool) -> FlowKey {
        if from_guest {
            FlowKey {
                version: seg.version,
                guest: seg.src,
                remote: seg.dst,
                guest_port: seg.sport,
                remote_port: seg.dport,
            }
        } else {
            FlowKey {
                version: seg.version,
                guest: seg.dst,
                remote: seg.src,
                guest_port: seg.dport,
                remote_port: seg.sport,
            }
        }
    }
}

/// The flows by key: a hash table whose hash the caller can keep, so the
/// early ACK that follows a data segment finds its flow without hashing the
/// key again. The hash is keyed per table (ahash), so remote peers choosing
/// addresses and ports cannot aim at one bucket. Large tables live on huge
/// pages ([`huge::HugePages`]).
#[derive(Default)]
struct FlowTable {
    table: HashTable<(FlowKey, Flow), huge::HugePages>,
    hasher: ahash::RandomState,
}

impl FlowTable {
    fn hash(&self, key: &FlowKey) -> u64 {
        self.hasher.hash_one(key)
    }

    fn get(&self, key: &FlowKey) -> Option<&Flow> {
        self.table
            .find(self.hash(key), |(k, _)| k == key)
            .map(|(_, f)| f)
    }

    fn get_mut(&mut self, key: &FlowKey) -> Option<&mut Flow> {
        self.table
            .find_mut(self.hash(key), |(k, _)| k == key)
            .map(|(_, f)| f)
    }

    /// The flow `token` was made for: in its bucket if it is still there
    /// (ids are unique among live flows), else found by key and hash.
    fn get_mut_token(&mut self, token: &RxToken) -> Option<&mut Flow> {
        let here = matches!(self.table.get_bucket(token.bucket), Some((_, f)) if f.id == token.id);
        if here {
            self.table.get_bucket_mut(token.bucket).map(|(_, f)| f)
        } else {
            let key = &token.key;
            self.table
                .find_mut(token.hash, |(k, _)| k == key)
                .map(|(_, f)| f)
        }
    }

    fn entry(&mut self, hash: u64, key: &FlowKey) -> Entry<'_, (FlowKey, Flow), huge::HugePages> {
        let hasher = &self.hasher;
        self.table
            .entry(hash, |(k, _)| k == key, |(k, _)| hasher.hash_one(k))
    }

    fn remove(&mut self, key: &FlowKey) -> Option<Flow> {
        let hash = self.hash(key);
        self.table
            .find_entry(hash, |(k, _)| k == key)
            .ok()
            .map(|e| e.remove().0 .1)
    }

    fn retain(&mut self, mut keep: impl FnMut(&mut Flow) -> bool) {
        self.table.retain(|(_, f)| keep(f));
    }

    fn len(&self) -> usize {
        self.table.len()
    }

    fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    fn clear(&mut self) {
        self.table.clear();
    }
}

/// Where a flow was: what [`AckOffload::remote_rx`] hands to
/// [`AckOffload::remote_published`] (the flow that got new bytes), so the
/// early ACK finds it without a second lookup. The bucket holds that flow
/// as long as the table has not been resized or the flow removed; its
/// [`Flow::id`] tells, and the key and hash find it otherwise.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RxToken {
    key: FlowKey,
    hash: u64,
    bucket: usize,
    id: u32,
    /// The frame was a full-sized segment: its early ACK waits for the end
    /// of the RX batch, or for the flow's segment that acknowledges at once
    /// (rule 12).
    defer: bool,
}

/// Engine settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OffloadConfig {
    /// Emit early ACKs (the run-time switch).
    pub enabled: bool,
    /// Upper bound on the window of our ACKs in bytes (0: none).
    pub window_bound: u32,
    /// Custody memory for all flows together, in bytes.
    pub custody_budget: usize,
    /// Most flows tracked.
    pub max_flows: usize,
    /// Re-deliver when the guest has not advanced its ACK for this long (ns).
    pub redeliver_after_ns: u64,
    /// Give up (RST both ends) after this many failed re-deliveries: the
    /// guest ran after them without catching up, or they were made at the
    /// longest backoff.
    pub max_redeliveries: u32,
    /// Most bytes re-delivered per attempt.
    pub redeliver_burst: usize,
}

impl Default for OffloadConfig {
    fn default() -> Self {
        OffloadConfig {
            enabled: true,
            window_bound: 0,
            custody_budget: 64 << 20,
            max_flows: 65_536,
            redeliver_after_ns: 200_000_000,
            max_redeliveries: 6,
            redeliver_burst: 64 * 1024,
        }
    }
}

/// How the checksum of a frame from the tap stands (virtio-net header flags).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RxChecksum {
    /// Locally generated, checksum to be completed (NEEDS_CSUM): not damaged.
    Partial,
    /// The host validated it (DATA_VALID).
    Valid,
    /// Nobody checked: the offload verifies before it acknowledges (rule 4).
    Unknown,
}

/// Counters, readable without the engine lock; written only by the engine
/// under its lock (see [`inc`]).
#[derive(Debug, Default)]
pub struct OffloadCounters {
    /// Early ACKs sent.
    pub early_acks: AtomicU64,
    /// Bytes those ACKs acknowledged.
    pub early_acked_bytes: AtomicU64,
    /// Early ACKs that carried ECE (rule 11).
    pub ece_acks: AtomicU64,
    /// Segments whose TCP checksum the engine verified itself (rule 4:
    /// neither the host nor the sender's stack vouched for it).
    pub checksums_verified: AtomicU64,
    /// Guest ACKs not sent (the sender no longer needed them).
    pub guest_acks_suppressed: AtomicU64,
    /// Guest packets whose ack/window/TSecr/SACK were rewritten.
    pub guest_acks_rewritten: AtomicU64,
    /// Suppressed guest ACKs below E whose only news was a little more
    /// window: the flow's next early ACK carried it (rule 10).
    pub window_updates_deferred: AtomicU64,
    /// Re-delivery attempts.
    pub redeliveries: AtomicU64,
    /// Bytes re-delivered.
    pub redelivered_bytes: AtomicU64,
    /// Re-delivery frames dropped for lack of guest buffers.
    pub redelivery_dropped: AtomicU64,
    /// Flows reset after repeated failed re-deliveries.
    pub resets: AtomicU64,
    /// Flows that completed a handshake and were offloaded.
    pub flows_offloaded: AtomicU64,
    /// Flows never offloaded.
    pub flows_passthrough: AtomicU64,
    /// Offline flows that came back online.
    pub back_online: AtomicU64,
    /// Migration drains started (VHOST_F_LOG_ALL set).
    pub drains: AtomicU64,
    /// Migration drains that completed: every early-ACKed byte confirmed
    /// by the guest while LOG_ALL was still set.
    pub drains_completed: AtomicU64,
    /// Offline transitions per [`OfflineReason::ALL`].
    pub offline: [AtomicU64; 9],
    /// Pass-through flows per [`PassReason::ALL`].
    pub passthrough: [AtomicU64; 8],
    /// Flows in the table now.
    pub flows_tracked: AtomicU64,
    /// Custody bytes held now.
    pub custody_bytes: AtomicU64,
    /// Bytes acknowledged to senders that the guest has not acknowledged
    /// yet (the sum of `E - Gack` over the flows), as of the last timer tick.
    pub owed_bytes: AtomicU64,
}

/// Counts one. Only the engine writes its counters, always under the engine
/// lock, so a plain load and store suffice: a locked read-modify-write
/// (`fetch_add`) costs tens of cycles per packet for nothing. Readers see
/// each value whole, at most one update late.
fn inc(c: &AtomicU64) {
    add(c, 1);
}

/// Adds `n` (one writer, as [`inc`]).
fn add(c: &AtomicU64, n: u64) {
    c.store(c.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
}

/// A counters snapshot (stats JSON `offload` object).
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct OffloadStats {
    /// Early ACKs emitted (run-time switch).
    pub enabled: bool,
    /// Migration in progress: no new early ACKs until every flow caught up.
    pub draining: bool,
    /// See [`OffloadCounters`].
    pub early_acks: u64,
    /// Bytes acknowledged early.
    pub early_acked_bytes: u64,
    /// Early ACKs with ECE.
    pub ece_acks: u64,
    /// Segments verified by the engine (rule 4).
    pub checksums_verified: u64,
    /// Guest ACKs suppressed.
    pub guest_acks_suppressed: u64,
    /// Guest packets rewritten.
    pub guest_acks_rewritten: u64,
    /// Suppressed window updates (part of `guest_acks_suppressed`).
    #[serde(default)]
    pub window_updates_deferred: u64,
    /// Re-delivery attempts.
    pub redeliveries: u64,
    /// Bytes re-delivered.
    pub redelivered_bytes: u64,
    /// Re-delivery frames dropped (no guest buffers).
    pub redelivery_dropped: u64,
    /// Flows reset.
    pub resets: u64,
    /// Flows offloaded.
    pub flows_offloaded: u64,
    /// Flows passed through.
    pub flows_passthrough: u64,
    /// Offline flows back online.
    pub back_online: u64,
    /// Migration drains started.
    pub drains: u64,
    /// Migration drains completed.
    pub drains_completed: u64,
    /// Flows tracked now.
    pub flows_tracked: u64,
    /// Custody bytes held now.
    pub custody_bytes: u64,
    /// Bytes early-ACKed and not yet acknowledged by the guest (last tick).
    pub owed_bytes: u64,
    /// Offline transitions by reason.
    pub offline: std::collections::BTreeMap<String, u64>,
    /// Pass-through flows by reason.
    pub passthrough: std::collections::BTreeMap<String, u64>,
}

impl OffloadCounters {
    fn offline(&self, reason: OfflineReason) {
        let i = OfflineReason::ALL
            .iter()
            .position(|r| *r == reason)
            .unwrap_or(0);
        inc(&self.offline[i]);
    }

    fn passthrough(&self, reason: PassReason) {
        let i = PassReason::ALL
            .iter()
            .position(|r| *r == reason)
            .unwrap_or(0);
        inc(&self.passthrough[i]);
        inc(&self.flows_passthrough);
    }

    /// A snapshot.
    pub fn snapshot(&self, enabled: bool, draining: bool) -> OffloadStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        OffloadStats {
            enabled,
            draining,
            early_acks: get(&self.early_acks),
            early_acked_bytes: get(&self.early_acked_bytes),
            ece_acks: get(&self.ece_acks),
            checksums_verified: get(&self.checksums_verified),
            guest_acks_suppressed: get(&self.guest_acks_suppressed),
            guest_acks_rewritten: get(&self.guest_acks_rewritten),
            window_updates_deferred: get(&self.window_updates_deferred),
            redeliveries: get(&self.redeliveries),
            redelivered_bytes: get(&self.redelivered_bytes),
            redelivery_dropped: get(&self.redelivery_dropped),
            resets: get(&self.resets),
            flows_offloaded: get(&self.flows_offloaded),
            flows_passthrough: get(&self.flows_passthrough),
            back_online: get(&self.back_online),
            drains: get(&self.drains),
            drains_completed: get(&self.drains_completed),
            flows_tracked: get(&self.flows_tracked),
            custody_bytes: get(&self.custody_bytes),
            owed_bytes: get(&self.owed_bytes),
            offline: OfflineReason::ALL
                .iter()
                .zip(&self.offline)
                .map(|(r, c)| (r.name().to_string(), get(c)))
                .collect(),
            passthrough: PassReason::ALL
                .iter()
                .zip(&self.passthrough)
                .map(|(r, c)| (r.name().to_string(), get(c)))
                .collect(),
        }
    }
}

/// The offload engine: flow table, custody budget, outboxes.
pub struct AckOffload {
    cfg: OffloadConfig,
    draining: bool,
    /// When the current migration drain started, until it completes.
    drain_started: Option<u64>,
    flows: FlowTable,
    /// Every flow with `Gack < E` (pinned; checked by the timer), by key and
    /// [`Flow::id`], plus flows that stopped owing or were forgotten since
    /// the last timer tick: adding a flow is a push and nothing is removed
    /// on the packet path, the timer drops what no longer owes.
    owed: Vec<(FlowKey, u32)>,
    /// Flows whose early ACK waits for the end of the RX batch (rule 12),
    /// in the order their segments arrived.
    deferred: Vec<RxToken>,
    custody_bytes: usize,
    counters: Arc<OffloadCounters>,
    /// Frames for the guest's RX ring, per queue pair.
    to_guest: Vec<VecDeque<Vec<u8>>>,
    /// Frames for the tap (no virtio-net header).
    to_host: VecDeque<Vec<u8>>,
    /// A segment's TCP header and payload, for checking its checksum
    /// (rule 4); its length only grows.
    scratch: Vec<u8>,
    /// Custody buffers of flows the guest caught up with, for the next flow
    /// that keeps custody (at most a quarter of the custody budget, up to
    /// [`SPARE_BYTES`], of capacity in all).
    spare: Vec<Vec<u8>>,
    /// Capacity of the `spare` buffers.
    spare_bytes: usize,
    last_sweep: u64,
}

/// Idle time after which a flow is forgotten (unless it owes bytes).
const IDLE_NS: u64 = 120_000_000_000;
/// Idle time for flows still in their handshake or closing.
const IDLE_SHORT_NS: u64 = 10_000_000_000;
/// How often the whole table is swept for idle flows.
const SWEEP_NS: u64 = 1_000_000_000;
/// Capacity of the custody buffers kept for reuse, in all (at most). A
/// reused buffer keeps its initialized length, so appends neither zero-fill
/// nor fault in fresh pages: with 64 KB GSO segments to 1k flows, a 1 MB
/// pool left most bursts on fresh memory (over 1 us per 1448 B).
const SPARE_BYTES: usize = 16 << 20;
/// Frames waiting for one queue's RX ring before new ones are refused.
const OUTBOX_LIMIT: usize = 1024;
/// The re-delivery timeout doubles per attempt up to `2^6` times its base
/// (200 ms -> 12.8 s).
const MAX_BACKOFF_SHIFT: u32 = 6;

impl AckOffload {
    /// An engine for `queue_pairs` queue pairs.
    pub fn new(cfg: OffloadConfig, queue_pairs: usize, counters: Arc<OffloadCounters>) -> Self {
        AckOffload {
            cfg,
            draining: false,
            drain_started: None,
            flows: FlowTable::default(),
            owed: Vec::new(),
            deferred: Vec::new(),
            custody_bytes: 0,
            counters,
            to_guest: (0..queue_pairs.max(1)).map(|_| VecDeque::new()).collect(),
            to_host: VecDeque::new(),
            scratch: Vec::new(),
            spare: Vec::new(),
            spare_bytes: 0,
            last_sweep: 0,
        }
    }

    /// Early ACKs on or off (rule 16). Off: no new flows, no new early ACKs;
    /// flows that still owe bytes keep being rewritten until they catch up.
    pub fn set_enabled(&mut self, on: bool) {
        self.cfg.enabled = on;
    }

    /// Whether early ACKs are on.
    pub fn enabled(&self) -> bool {
        self.cfg.enabled
    }

    /// Migration started (VHOST_F_LOG_ALL set) or ended (rule 15) at
    /// `now`. The timer notices when the drain completes.
    pub fn set_draining(&mut self, on: bool, now: u64) {
        if on && !self.draining {
            inc(&self.counters.drains);
            self.drain_started = Some(now);
        }
        if !on {
            self.drain_started = None;
        }
        self.draining = on;
    }

    /// Whether a migration drain is in progress.
    pub fn draining(&self) -> bool {
        self.draining
    }

    /// Whether every flow's guest ACK has caught up with what the sender saw.
    pub fn drained(&self) -> bool {
        self.owed.iter().all(|e| self.owing(e).is_none())
    }

    /// Bytes acknowledged to senders that the guest has not acknowledged
    /// yet, over all flows.
    pub fn owed_bytes(&self) -> u64 {
        self.owed
            .iter()
            .filter_map(|e| self.owing(e))
            .map(|f| u64::from(f.owed_bytes()))
            .sum()
    }

    /// The flow of an `owed` entry, if it is still that flow and it owes.
    fn owing(&self, (key, id): &(FlowKey, u32)) -> Option<&Flow> {
        self.flows.get(key).filter(|f| f.id == *id && f.owes())
    }

    /// Puts `flow` on the owed list if it owes (`owes`) and is not on it already.
    #[inline]
    fn note_owing(owed: &mut Vec<(FlowKey, u32)>, key: FlowKey, flow: &mut Flow, owes: bool) {
        if owes && !flow.in_owed {
            flow.in_owed = true;
            owed.push((key, flow.id));
        }
    }

    /// Whether the engine has nothing to do (off and no flows).
    pub fn idle(&self) -> bool {
        !self.cfg.enabled && self.flows.is_empty()
    }

    fn limits(&self) -> FlowLimits {
        FlowLimits {
            window_bound: self.cfg.window_bound,
            early_acks: self.cfg.enabled && !self.draining,
        }
    }

    fn publish_gauges(&self) {
        let c = &self.counters;
        c.flows_tracked
            .store(self.flows.len() as u64, Ordering::Relaxed);
        c.custody_bytes
            .store(self.custody_bytes as u64, Ordering::Relaxed);
    }

    /// The flow of `seg`, learned from it if it is new, with its key and
    /// hash: one hash lookup on the per-packet path. `None` if the flow is
    /// not (and will not be) tracked.
    #[inline(always)]
    fn flow_for<'a>(
        flows: &'a mut FlowTable,
        cfg: &OffloadConfig,
        counters: &OffloadCounters,
        headers: &[u8],
        seg: &TcpSegment,
        from_guest: bool,
        now: u64,
    ) -> Option<(RxToken, &'a mut Flow)> {
        let key = FlowKey::of(seg, from_guest);
        let hash = flows.hash(&key);
        let tracked = flows.len();
        let entry = match flows.entry(hash, &key) {
            Entry::Occupied(o) => o,
            Entry::Vacant(v) => {
                let flow = new_flow(cfg, counters, tracked, headers, seg, from_guest, now)?;
                counters
                    .flows_tracked
                    .store(tracked as u64 + 1, Ordering::Relaxed);
                v.insert((key, flow))
            }
        };
        let bucket = entry.bucket_index();
        let flow = &mut entry.into_mut().1;
        let token = RxToken {
            key,
            hash,
            bucket,
            id: flow.id,
            defer: false,
        };
        Some((token, flow))
    }

    fn forget(&mut self, key: &FlowKey) {
        if let Some(flow) = self.flows.remove(key) {
            // Its owed entry (if any) no longer matches a flow: the timer drops it.
            self.custody_bytes -= flow.custody.held();
            self.publish_gauges();
        }
    }

    fn note_mode(&self, established: Option<Mode>) {
        match established {
            Some(Mode::Active) => inc(&self.counters.flows_offloaded),
            Some(Mode::PassThrough(r)) => self.counters.passthrough(r),
            _ => {}
        }
    }

    fn note_offline(&self, reason: Option<OfflineReason>) {
        if let Some(r) = reason {
            self.counters.offline(r);
        }
    }

    /// A guest frame about to be written to the tap. `headers` is a private
    /// copy of at least the frame's headers (edited in place on `Rewritten`),
    /// `frame_len` the whole frame's length.
    pub fn guest_tx(
        &mut self,
        headers: &mut [u8],
        frame_len: usize,
        needs_csum: bool,
        now: u64,
    ) -> TxVerdict {
        // Borrowed, not moved out of the Option: the move copied all
        // 136 bytes of the segment on every packet.
        let parsed = wire::parse(headers, frame_len);
        let Some(seg) = parsed.as_ref() else {
            return TxVerdict::Pass;
        };
        let limits = self.limits();
        let Some((RxToken { key, .. }, flow)) = Self::flow_for(
            &mut self.flows,
            &self.cfg,
            &self.counters,
            headers,
            seg,
            true,
            now,
        ) else {
            return TxVerdict::Pass;
        };
        if flow.inert() {
            flow.last_seen = now;
            if seg.has(flags::RST) {
                self.forget(&key);
            }
            return TxVerdict::Pass;
        }
        let held_before = flow.custody.held();
        let (verdict, fx) = flow.on_guest(headers, seg, needs_csum, limits, now);
        let held_after = flow.custody.held();
        if let Some(buf) = flow.custody.take_buffer() {
            let cap = buf.capacity();
            let limit = (self.cfg.custody_budget / 4).min(SPARE_BYTES);
            // Whatever its size: a flow whose guest lags by a large window
            // empties its custody each time the guest catches up, and a
            // buffer dropped then regrows from 2 KB, faulting in and
            // zero-filling every page again (with 4 MiB the largest kept,
            // one bulk flow into an 8 MiB custody paid 50-70 ns per 1448 B
            // on top of its copy).
            if self.spare_bytes + cap <= limit {
                self.spare_bytes += cap;
                self.spare.push(buf);
            }
        }
        let owes = flow.owes();
        Self::note_owing(&mut self.owed, key, flow, owes);
        if fx.progress {
            flow.redeliveries = 0;
            flow.failed_redeliveries = 0;
            flow.last_progress = now;
        }
        let missing = fx.missing && flow.dupacks >= 2;
        self.custody_bytes = self
            .custody_bytes
            .saturating_sub(held_before.saturating_sub(held_after))
            + held_after.saturating_sub(held_before);
        self.note_mode(fx.established);
        self.note_offline(fx.offline);
        if fx.online {
            inc(&self.counters.back_online);
        }
        match verdict {
            TxVerdict::Suppress => {
                inc(&self.counters.guest_acks_suppressed);
                if fx.window_deferred {
                    inc(&self.counters.window_updates_deferred);
                }
            }
            TxVerdict::Rewritten => inc(&self.counters.guest_acks_rewritten),
            TxVerdict::Pass => {}
        }
        if fx.closed {
            self.forget(&key);
            return verdict;
        }
        if owes && missing {
            self.redeliver(&key, now);
        }
        self.publish_gauges();
        verdict
    }

    /// A tap frame about to be published in queue pair `queue`'s RX ring.
    /// `copy_payload(offset, buf)` copies frame bytes from `offset` into
    /// `buf` and returns how many it copied. Returns the flow to pass to
    /// [`AckOffload::remote_published`] after the used index is published.
    pub fn remote_rx(
        &mut self,
        queue: usize,
        headers: &[u8],
        frame_len: usize,
        checksum: RxChecksum,
        copy_payload: &mut dyn FnMut(usize, &mut [u8]) -> usize,
        now: u64,
    ) -> Option<RxToken> {
        let parsed = wire::parse(headers, frame_len);
        let seg = parsed.as_ref()?;
        let (mut token, flow) = Self::flow_for(
            &mut self.flows,
            &self.cfg,
            &self.counters,
            headers,
            seg,
            false,
            now,
        )?;
        let key = token.key;
        if flow.inert() {
            flow.last_seen = now;
            if seg.has(flags::RST) {
                self.forget(&key);
            }
            return None;
        }
        if !flow.owes() {
            // The custody timeout runs from the first byte owed, not from
            // the guest's last progress long ago (or the handshake).
            flow.last_progress = now;
        }
        let fx = flow.on_remote(headers, seg, queue, now);
        let established = fx.established;
        let offline = fx.offline;
        if fx.closed {
            self.note_mode(established);
            self.forget(&key);
            return None;
        }
        let mut committed = 0;
        let mut offline_late = None;
        if fx.new_bytes > 0 {
            let start = seg.payload_at + fx.offset as usize;
            let len = fx.new_bytes as usize;
            let budget_ok = self.custody_bytes + len <= self.cfg.custody_budget;
            let keep =
                matches!(flow.mode, Mode::Active | Mode::Offline(_)) && flow.custody.complete();
            if keep && budget_ok && flow.custody.unbuffered() {
                // A reused buffer is initialized and its pages are mapped:
                // a fresh one faults in and zero-fills every page it grows by.
                if let Some(buf) = self.spare.pop() {
                    self.spare_bytes -= buf.capacity();
                    flow.custody.give_buffer(buf);
                }
            }
            if checksum == RxChecksum::Unknown {
                // Rule 4: verify the whole segment before anything is acknowledged.
                let hdr = seg.payload_at - seg.tcp_at;
                let tcp_len = hdr + seg.payload_len as usize;
                // Grown, never shrunk: zero-filling it for every segment
                // before the copy overwrites it showed in profiles.
                if self.scratch.len() < tcp_len {
                    self.scratch.resize(tcp_len, 0);
                }
                let scratch = &mut self.scratch[..tcp_len];
                scratch[..hdr].copy_from_slice(&headers[seg.tcp_at..seg.payload_at]);
                let got = copy_payload(seg.payload_at, &mut scratch[hdr..]);
                let ok = got == seg.payload_len as usize && wire::tcp_checksum_ok(seg, scratch);
                inc(&self.counters.checksums_verified);
                if !ok {
                    // The guest drops it too: D does not move.
                    offline_late = flow.offline(OfflineReason::BadChecksum);
                    self.note_mode(established);
                    self.note_offline(offline.or(offline_late));
                    return None;
                }
                if keep && budget_ok {
                    let from = start - seg.tcp_at;
                    let src = &scratch[from..from + len];
                    flow.custody.append(len, |off, b| {
                        b.copy_from_slice(&src[off..off + b.len()]);
                        b.len()
                    });
                    self.custody_bytes += len;
                }
            } else if keep && budget_ok {
                let got = flow
                    .custody
                    .append(len, |off, b| copy_payload(start + off, b));
                self.custody_bytes += got;
            }
            if keep && !budget_ok {
                flow.custody.invalidate();
                offline_late = flow.offline(OfflineReason::CustodyBudget);
            }
            flow.commit(seg, fx.new_bytes);
            committed = fx.new_bytes;
            token.defer = self.cfg.enabled
                && !self.draining
                && flow.active()
                && flow.defer_ack(seg.payload_len);
        }
        self.note_mode(established);
        self.note_offline(offline.or(offline_late));
        self.publish_gauges();
        (committed > 0 && self.cfg.enabled && !self.draining).then_some(token)
    }

    /// The frame `remote_rx` returned `token` for is published: emit the
    /// early ACK if the rules allow (rule 3). Appends it to `out` (an
    /// Ethernet frame for the tap) and returns whether it did. The ACK of
    /// full-sized segments waits for [`AckOffload::flush_acks`] at the end
    /// of the RX batch, or for the flow's 64 KB of them (rule 12).
    pub fn remote_published(&mut self, token: &RxToken, out: &mut Vec<u8>) -> bool {
        if token.defer {
            self.deferred.push(*token);
            return false;
        }
        self.early_ack(token, out, false)
    }

    /// Whether early ACKs wait for [`AckOffload::flush_acks`].
    pub fn has_deferred_acks(&self) -> bool {
        !self.deferred.is_empty()
    }

    /// The end of an RX batch: the early ACKs that waited (rule 12), for
    /// flows whose later segments did not already acknowledge them. Appends
    /// the frames to `out` back to back and each one's end offset to
    /// `ends`; returns how many.
    pub fn flush_acks(&mut self, out: &mut Vec<u8>, ends: &mut Vec<usize>) -> usize {
        let mut tokens = std::mem::take(&mut self.deferred);
        let mut sent = 0;
        for token in &tokens {
            if self.early_ack(token, out, true) {
                ends.push(out.len());
                sent += 1;
            }
        }
        tokens.clear();
        self.deferred = tokens;
        sent
    }

    /// The early ACK of `token`'s flow, if the rules allow one now (and,
    /// with `waiting_only`, if the flow's ACK still waits for the flush).
    fn early_ack(&mut self, token: &RxToken, out: &mut Vec<u8>, waiting_only: bool) -> bool {
        if !self.cfg.enabled || self.draining {
            return false;
        }
        let limits = self.limits();
        let Some(f) = self.flows.get_mut_token(token) else {
            return false;
        };
        if waiting_only && !f.take_deferred_ack() {
            return false;
        }
        let Some(acked) = f.early_ack(limits, out) else {
            return false;
        };
        inc(&self.counters.early_acks);
        add(&self.counters.early_acked_bytes, u64::from(acked.bytes));
        if acked.ece {
            inc(&self.counters.ece_acks);
        }
        let owes = f.owes();
        Self::note_owing(&mut self.owed, token.key, f, owes);
        true
    }

    /// The guest posted no RX buffers: flows that owe bytes go offline (rule 3).
    pub fn no_buffer(&mut self) {
        for (key, id) in &self.owed {
            if let Some(f) = self.flows.get_mut(key).filter(|f| f.id == *id && f.owes()) {
                if let Some(r) = f.offline(OfflineReason::NoBuffer) {
                    self.counters.offline(r);
                }
            }
        }
    }

    /// Queues custody bytes of `key` for re-delivery (rule 5), or resets the
    /// flow after too many attempts without progress.
    fn redeliver(&mut self, key: &FlowKey, now: u64) {
        let max = self.cfg.max_redeliveries;
        let burst = self.cfg.redeliver_burst;
        let Some(f) = self.flows.get_mut(key) else {
            return;
        };
        // One attempt per interval: a burst causes duplicate ACKs of its own.
        if f.redeliveries > 0
            && now.saturating_sub(f.last_progress) < self.cfg.redeliver_after_ns / 4
        {
            return;
        }
        f.dupacks = 0;
        // The previous attempt failed if the guest ran since (it sent on this
        // flow) without catching up, or if we already wait the longest
        // backoff. A descheduled guest is not failing: it has not looked yet.
        if f.redeliveries > 0
            && (f.last_guest > f.last_progress || f.redeliveries >= MAX_BACKOFF_SHIFT)
        {
            f.failed_redeliveries += 1;
        }
        if f.failed_redeliveries >= max {
            let mut rst = Vec::new();
            let mut to_guest = Vec::new();
            f.resets(&mut rst, &mut to_guest);
            let q = f.queue.min(self.to_guest.len() - 1);
            self.to_host.push_back(rst);
            self.to_guest[q].extend(to_guest);
            inc(&self.counters.resets);
            self.forget(key);
            return;
        }
        if let Some(r) = f.offline(OfflineReason::RedeliveryTimeout) {
            self.counters.offline(r);
        }
        let q = f.queue.min(self.to_guest.len() - 1);
        let mut frames = Vec::new();
        let bytes = f.redelivery(burst, &mut frames);
        f.redeliveries += 1;
        f.last_progress = now;
        if bytes == 0 {
            return;
        }
        inc(&self.counters.redeliveries);
        add(&self.counters.redelivered_bytes, bytes as u64);
        let outbox = &mut self.to_guest[q];
        for frame in frames {
            if outbox.len() >= OUTBOX_LIMIT {
                inc(&self.counters.redelivery_dropped);
            } else {
                outbox.push_back(frame);
            }
        }
    }

    /// Periodic work: re-deliver custody the guest has not acknowledged in
    /// time (backing off), forget idle flows.
    pub fn tick(&mut self, now: u64) {
        let mut due = Vec::new();
        let (flows, cfg) = (&mut self.flows, &self.cfg);
        self.owed.retain(|(key, id)| {
            let Some(f) = flows.get_mut(key).filter(|f| f.id == *id) else {
                return false; // forgotten (a later flow with its key has its own entry)
            };
            if !f.owes() {
                f.in_owed = false;
                return false;
            }
            let wait = cfg.redeliver_after_ns << f.redeliveries.min(MAX_BACKOFF_SHIFT);
            if now.saturating_sub(f.last_progress) >= wait {
                due.push(*key);
            }
            true
        });
        for key in due {
            self.redeliver(&key, now);
        }
        self.counters
            .owed_bytes
            .store(self.owed_bytes(), Ordering::Relaxed);
        if let Some(started) = self.drain_started.filter(|_| self.owed.is_empty()) {
            // Every flow's guest ACK caught up: the source may stop the
            // guest without acknowledged bytes outside guest memory's reach.
            self.drain_started = None;
            inc(&self.counters.drains_completed);
            log::info!(
                "migration drain complete after {} ms: the guest acknowledged every early-ACKed byte",
                now.saturating_sub(started) / 1_000_000
            );
        }
        if now.saturating_sub(self.last_sweep) >= SWEEP_NS {
            self.last_sweep = now;
            let mut freed = 0usize;
            self.flows.retain(|f| {
                let idle = now.saturating_sub(f.last_seen);
                let open = f.active() || matches!(f.mode, Mode::Offline(_));
                let limit = if open && !f.closing() {
                    IDLE_NS
                } else {
                    IDLE_SHORT_NS
                };
                let keep = f.owes() || idle < limit;
                if !keep {
                    freed += f.custody.held();
                }
                keep
            });
            self.custody_bytes -= freed.min(self.custody_bytes);
            self.publish_gauges();
        }
    }

    /// Takes the frames waiting for queue pair `queue`'s RX ring.
    pub fn take_guest_frames(&mut self, queue: usize, out: &mut Vec<Vec<u8>>) {
        if let Some(q) = self.to_guest.get_mut(queue) {
            out.extend(q.drain(..));
        }
    }

    /// Whether frames wait for queue pair `queue`'s RX ring.
    pub fn has_guest_frames(&self, queue: usize) -> bool {
        self.to_guest.get(queue).is_some_and(|q| !q.is_empty())
    }

    /// Forgets every flow and queued frame.
    pub fn clear(&mut self) {
        self.flows.clear();
        self.owed.clear();
        self.deferred.clear();
        self.custody_bytes = 0;
        self.spare = Vec::new();
        self.spare_bytes = 0;
        self.to_host.clear();
        self.to_guest.iter_mut().for_each(VecDeque::clear);
        self.publish_gauges();
    }

    /// Whether any outbox holds frames.
    pub fn has_frames(&self) -> bool {
        !self.to_host.is_empty() || self.to_guest.iter().any(|q| !q.is_empty())
    }

    /// Takes the frames waiting for the tap.
    pub fn take_host_frames(&mut self, out: &mut Vec<Vec<u8>>) {
        out.extend(self.to_host.drain(..));
    }

    /// A frame from the outbox could not be delivered (no guest buffers).
    pub fn guest_frame_dropped(&self) {
        inc(&self.counters.redelivery_dropped);
    }

    /// Flows tracked.
    pub fn flows(&self) -> usize {
        self.flows.len()
    }

    /// Custody bytes held.
    pub fn custody_bytes(&self) -> usize {
        self.custody_bytes
    }

    /// The mode of a flow (tests and diagnostics).
    pub fn mode_of(&self, key: &FlowKey) -> Option<Mode> {
        self.flows.get(key).map(|f| f.mode)
    }

    /// The tracked flows as of `now`, those that owe the most bytes first,
    /// then the most recently seen; at most `limit`.
    pub fn flow_list(&self, now: u64, limit: usize) -> Vec<OffloadFlow> {
        let mut flows: Vec<&Flow> = self.flows.table.iter().map(|(_, f)| f).collect();
        let order = |f: &&Flow| {
            (
                std::cmp::Reverse(f.owed_bytes()),
                std::cmp::Reverse(f.last_seen),
            )
        };
        // The engine lock is held: with a large table, pick the first
        // `limit` in linear time and sort only those.
        if limit < flows.len() {
            flows.select_nth_unstable_by_key(limit, order);
            flows.truncate(limit);
        }
        flows.sort_by_key(order);
        flows
            .into_iter()
            .map(|f| {
                let (guest, guest_port, remote, remote_port) = f.endpoints();
                OffloadFlow {
                    guest: guest.to_string(),
                    guest_port,
                    remote: remote.to_string(),
                    remote_port,
                    mode: f.mode.name().to_string(),
                    reason: f.mode.reason().map(str::to_string),
                    owed_bytes: u64::from(f.owed_bytes()),
                    custody_bytes: f.custody.held() as u64,
                    idle_s: now.saturating_sub(f.last_seen) as f64 / 1e9,
                }
            })
            .collect()
    }
}

/// One flow of the offload's table (control socket `offload_flows`).
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize, PartialEq)]
pub struct OffloadFlow {
    /// The guest's address.
    pub guest: String,
    /// The guest's port.
    pub guest_port: u16,
    /// The remote peer's address.
    pub remote: String,
    /// The remote peer's port.
    pub remote_port: u16,
    /// `handshake`, `active` (early ACKs allowed), `offline` (not until the
    /// guest catches up) or `pass_through` (never offloaded).
    pub mode: String,
    /// Why it is offline or passed through (the counters' reason names).
    pub reason: Option<String>,
    /// Bytes acknowledged to the sender and not yet by the guest (`E - Gack`).
    pub owed_bytes: u64,
    /// Bytes held in custody for it.
    pub custody_bytes: u64,
    /// Seconds since its last packet.
    pub idle_s: f64,
}

/// A flow opened by `seg`, or a pass-through record for one first seen
/// mid-stream (rule 1, counted once); `None` when nothing is to be tracked:
/// the offload is off, the table is full (rule 14), or `seg` is a RST.
fn new_flow(
    cfg: &OffloadConfig,
    counters: &OffloadCounters,
    tracked: usize,
    headers: &[u8],
    seg: &TcpSegment,
    from_guest: bool,
    now: u64,
) -> Option<Flow> {
    if !cfg.enabled {
        return None;
    }
    let syn_only = seg.has(flags::SYN) && !seg.has(flags::ACK);
    if tracked >= cfg.max_flows {
        if syn_only {
            counters.passthrough(PassReason::TableFull);
        }
        return None;
    }
    let mut flow = if syn_only {
        let f = Flow::from_syn(headers, seg, from_guest, now);
        if let Mode::PassThrough(r) = f.mode {
            counters.passthrough(r);
        }
        f
    } else if seg.has(flags::RST) {
        return None;
    } else {
        counters.passthrough(PassReason::MidStream);
        Flow::pass_through(seg, from_guest, PassReason::MidStream, now)
    };
    flow.id = NEXT_FLOW_ID.fetch_add(1, Ordering::Relaxed);
    Some(flow)
}

/// Source of [`Flow::id`]s. It wraps after 2^32 flows, far more than are
/// created between two timer ticks, which is as long as an owed entry of a
/// forgotten flow lives.
static NEXT_FLOW_ID: AtomicU32 = AtomicU32::new(1);

/// The engine as the daemon shares it: one lock, counters outside it, and a
/// lock-free hint the data path checks before parsing anything.
pub struct OffloadPort {
    engine: Mutex<AckOffload>,
    /// Counters (also readable while the data path holds the lock).
    pub counters: Arc<OffloadCounters>,
    busy: AtomicBool,
    /// Frames wait in an outbox.
    frames: AtomicBool,
    enabled: AtomicBool,
    draining: AtomicBool,
}

impl OffloadPort {
    /// A port for `queue_pairs` queue pairs.
    pub fn new(cfg: OffloadConfig, queue_pairs: usize) -> Self {
        let counters = Arc::new(OffloadCounters::default());
        OffloadPort {
            busy: AtomicBool::new(cfg.enabled),
            frames: AtomicBool::new(false),
            enabled: AtomicBool::new(cfg.enabled),
            draining: AtomicBool::new(false),
            engine: Mutex::new(AckOffload::new(cfg, queue_pairs, counters.clone())),
            counters,
        }
    }

    /// Whether the data path must consult the engine at all.
    #[inline]
    pub fn busy(&self) -> bool {
        self.busy.load(Ordering::Relaxed)
    }

    /// Locks the engine. A poisoned lock (a panic elsewhere) is taken over:
    /// the engine's state stays consistent per call.
    pub fn lock(&self) -> MutexGuard<'_, AckOffload> {
        self.engine.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Re-evaluates the `busy` hint after the engine changed.
    pub fn refresh(&self, engine: &AckOffload) {
        self.busy.store(!engine.idle(), Ordering::Relaxed);
        self.frames.store(engine.has_frames(), Ordering::Relaxed);
    }

    /// Whether frames wait in an outbox (lock-free hint).
    #[inline]
    pub fn has_frames(&self) -> bool {
        self.frames.load(Ordering::Relaxed)
    }

    /// The run-time switch.
    pub fn set_enabled(&self, on: bool) {
        let mut e = self.lock();
        e.set_enabled(on);
        self.enabled.store(on, Ordering::Relaxed);
        self.refresh(&e);
    }

    /// Migration drain on/off.
    pub fn set_draining(&self, on: bool) {
        let mut e = self.lock();
        e.set_draining(on, crate::timing::now_ns());
        self.draining.store(on, Ordering::Relaxed);
    }

    /// Whether a migration drain is on.
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Bytes acknowledged to senders and not yet by the guest, now.
    pub fn owed_bytes(&self) -> u64 {
        self.lock().owed_bytes()
    }

    /// How many flows the engine tracks, and at most `limit` of them
    /// ([`AckOffload::flow_list`]).
    pub fn flow_list(&self, limit: usize) -> (u64, Vec<OffloadFlow>) {
        let engine = self.lock();
        let list = engine.flow_list(crate::timing::now_ns(), limit);
        (engine.flows() as u64, list)
    }

    /// Whether early ACKs are on.
    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// Forgets every flow (the frontend and its guest are gone).
    pub fn reset(&self) {
        let mut e = self.lock();
        e.clear();
        self.refresh(&e);
    }

    /// Counters snapshot.
    pub fn stats(&self) -> OffloadStats {
        self.counters.snapshot(
            self.enabled.load(Ordering::Relaxed),
            self.draining.load(Ordering::Relaxed),
        )
    }
}
