//! RX: frames from the tap into the guest's posted buffers.
//!
//! The fast path reads each frame with one `readv` straight into guest
//! buffers. Because the frame length is unknown before the read, the worker
//! holds enough validated chains for the largest possible frame (popped from
//! the avail ring, not yet used), reads into all of them, and uses only as
//! many as the frame needed; the rest stay held for the next frame. When the
//! guest has posted less than a maximum frame, the frame is read into a
//! bounce buffer and copied if it fits. When the guest has posted nothing,
//! the tap is not read at all (backpressure): the frame waits in the tap's
//! queue and the guest's next kick resumes the pass.

use std::collections::VecDeque;
use std::num::Wrapping;

use crate::GuestMemory;
use log::{debug, warn};
use virtio_queue::{Queue, QueueT};

use super::chain::{collect_segments, Access, ChainError, Segment};
use super::used::UsedRing;
use super::vnet_hdr::{
    FLAG_DATA_VALID, FLAG_NEEDS_CSUM, HDR_LEN_V1, MAX_FRAME_LEN, NUM_BUFFERS_OFFSET,
};
use super::{
    busy_offload, copy_from_segments, copy_to_segments, mark_dirty, push_iovecs,
    ring_has_new_buffers, timing_hook, IovecBuf, QueuePair, BATCH, IOV_MAX,
};
use crate::metrics::QueueMetrics;
use crate::offload::wire::MAX_HEADERS;
use crate::offload::RxChecksum;
use crate::port::tap;
use crate::timing::{now_ns, PacketView, RxStamps};
use vhost_user_backend::VringT;

/// A validated chain popped from the avail ring and not yet used.
struct HeldChain {
    head: u16,
    len: u32,
    segments: Vec<Segment>,
    /// How many iovecs of the cache belong to this chain.
    iov_count: usize,
}

/// RX state of one queue pair.
pub struct RxState {
    held: VecDeque<HeldChain>,
    held_bytes: usize,
    spare: Vec<Vec<Segment>>,
    /// Iovecs of the held chains, in order, starting at `iov_start`: built
    /// once per chain, not once per frame.
    iov: IovecBuf,
    iov_start: usize,
    /// Guest-memory generation the iovecs were resolved under.
    iov_mem_generation: u64,
    bounce: Vec<u8>,
    /// Length of a frame waiting in `bounce` (0: none).
    pending: usize,
    /// `host_in` timestamp of the pending frame.
    pending_stamp: u64,
    /// Used-ring publication and notification state.
    pub used: UsedRing,
    /// Used entries of the packet being published (reused).
    entries: Vec<(u16, u32)>,
    /// All buffers of the packet being published, for the hook (reused).
    hook_segments: Vec<Segment>,
    /// Frames from the ACK offload waiting for buffers (reused).
    offload_frames: Vec<Vec<u8>>,
    /// The early ACK being built, or those that waited for the end of the
    /// batch, back to back (reused).
    ack_frame: Vec<u8>,
    /// End offsets of the waiting early ACKs in `ack_frame` (reused).
    ack_ends: Vec<usize>,
}

impl Default for RxState {
    fn default() -> Self {
        Self::new()
    }
}

/// Why an RX pass stopped.
#[derive(Debug, PartialEq, Eq)]
pub enum RxStop {
    /// The tap has no more frames.
    TapEmpty,
    /// The guest has no (or not enough) buffers; its kick resumes us.
    NoBuffers,
    /// The ring is not running, or it is broken.
    NotRunning,
}

impl RxState {
    /// Empty state.
    pub fn new() -> Self {
        RxState {
            held: VecDeque::new(),
            held_bytes: 0,
            spare: Vec::new(),
            iov: IovecBuf::default(),
            iov_start: 0,
            iov_mem_generation: 0,
            bounce: Vec::new(),
            pending: 0,
            pending_stamp: 0,
            used: UsedRing::default(),
            entries: Vec::new(),
            hook_segments: Vec::new(),
            offload_frames: Vec::new(),
            ack_frame: Vec::new(),
            ack_ends: Vec::new(),
        }
    }

    /// Number of chains held (popped but not used).
    pub fn held_chains(&self) -> usize {
        self.held.len()
    }

    /// Drops held chains without touching a ring (the connection is gone).
    pub fn forget_held_chains(&mut self) {
        while let Some(chain) = self.held.pop_front() {
            self.spare.push(chain.segments);
        }
        self.held_bytes = 0;
        self.iov.0.clear();
        self.iov_start = 0;
    }

    /// Re-resolves the held chains' iovecs if guest memory was remapped.
    fn refresh_iovecs(&mut self, mem: &GuestMemory, mem_generation: u64) {
        if self.iov_mem_generation == mem_generation {
            return;
        }
        self.iov.0.clear();
        self.iov_start = 0;
        for chain in self.held.iter_mut() {
            let before = self.iov.0.len();
            push_iovecs(mem, &chain.segments, chain.len as usize, &mut self.iov.0);
            chain.iov_count = self.iov.0.len() - before;
        }
        self.iov_mem_generation = mem_generation;
    }

    /// The iovecs of the first `chains` held chains.
    fn held_iovecs(&self, chains: usize) -> &[libc::iovec] {
        let count: usize = self.held.iter().take(chains).map(|c| c.iov_count).sum();
        &self.iov.0[self.iov_start..self.iov_start + count]
    }

    /// Gives held chains back to the avail ring (the ring is being stopped),
    /// so the next_avail the frontend reads covers only chains we used.
    pub fn return_held_chains(&mut self, queue: &mut Queue) {
        let held = self.held.len() as u16;
        if held > 0 {
            let next = Wrapping(queue.next_avail()) - Wrapping(held);
            queue.set_next_avail(next.0);
            debug!("returned {held} held RX chains to the avail ring");
        }
        self.forget_held_chains();
    }

    /// Copies a whole packet (virtio-net header first) into the held chains
    /// from the front; the caller checked that they can hold it.
    fn copy_into_held(&self, mem: &GuestMemory, packet: &[u8], log: bool) {
        let mut copied = 0;
        for chain in self.held.iter() {
            if copied == packet.len() {
                break;
            }
            copied += copy_to_segments(mem, &chain.segments, 0, &packet[copied..], log);
        }
    }

    /// Marks the `len` bytes a readv put into the first `chains` held
    /// chains dirty in the migration log (the read bypassed vm-memory).
    fn mark_held_dirty(&self, mem: &GuestMemory, chains: usize, mut len: usize) {
        for chain in self.held.iter().take(chains) {
            if len == 0 {
                break;
            }
            let this = len.min(chain.len as usize);
            mark_dirty(mem, &chain.segments, this);
            len -= this;
        }
    }

    fn recycle_front(&mut self) -> Option<HeldChain> {
        let chain = self.held.pop_front()?;
        self.held_bytes -= chain.len as usize;
        self.iov_start += chain.iov_count;
        if self.held.is_empty() {
            self.iov.0.clear();
            self.iov_start = 0;
        } else if self.iov_start >= 256 {
            self.iov.0.drain(..self.iov_start);
            self.iov_start = 0;
        }
        Some(chain)
    }

    /// Pops and validates chains until `want` bytes are held or the avail
    /// ring is empty. Invalid chains are returned with length 0 and counted.
    /// Every held chain can start a packet, so each must hold the whole
    /// virtio-net header (virtio 1.x 5.1.6.3.1); shorter ones are refused.
    fn refill(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemory,
        want: usize,
        hdr_len: usize,
        m: &QueueMetrics,
        log: bool,
    ) {
        while self.held_bytes < want {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                return;
            };
            let head = chain.head_index();
            let mut segments = self.spare.pop().unwrap_or_default();
            let before = self.iov.0.len();
            match collect_segments(
                chain,
                mem,
                Access::DeviceWrites,
                &mut segments,
                &mut self.iov.0,
            ) {
                Ok(len) if len as usize >= hdr_len => {
                    self.held_bytes += len as usize;
                    self.held.push_back(HeldChain {
                        head,
                        len,
                        segments,
                        iov_count: self.iov.0.len() - before,
                    });
                }
                result => {
                    self.iov.0.truncate(before);
                    let counter = match result {
                        Err(ChainError::BadAddress) => &m.rx_drop_bad_address,
                        Err(ChainError::WrongDirection) => &m.rx_drop_readonly_buffer,
                        _ => &m.rx_drop_bad_chain,
                    };
                    QueueMetrics::inc(counter);
                    self.spare.push(segments);
                    if self.used.publish(queue, mem, &[(head, 0)], log).is_err() {
                        QueueMetrics::inc(&m.bad_head_index);
                    }
                }
            }
        }
    }
}

impl QueuePair {
    /// Moves frames from the tap into the RX ring until the tap is empty or
    /// the guest runs out of buffers; publishes and notifies once per batch.
    pub fn process_rx(&mut self, mem: &GuestMemory, mem_generation: u64) -> RxStop {
        let Some((rx_vring, _)) = self.vrings.clone() else {
            return RxStop::NotRunning;
        };
        let mut state = rx_vring.get_mut();
        if !state.get_queue().ready() || !state.is_enabled() {
            return RxStop::NotRunning;
        }
        self.rx.refresh_iovecs(mem, mem_generation);
        let mut published = self.deliver_offload_frames(state.get_queue_mut(), mem);
        let stop = loop {
            if published >= BATCH {
                self.end_rx_batch(&mut state, mem);
                published = 0;
            }
            match self.receive_one(state.get_queue_mut(), mem) {
                Ok(()) => published += 1,
                Err(stop) => break stop,
            }
        };
        if published > 0 {
            self.end_rx_batch(&mut state, mem);
        } else {
            self.flush_early_acks();
        }
        stop
    }

    /// The end of a batch of published frames: the early ACKs that waited
    /// for it, then the guest's interrupt if it wants one.
    fn end_rx_batch<G>(&mut self, state: &mut G, mem: &GuestMemory)
    where
        G: std::ops::DerefMut<
            Target = vhost_user_backend::VringState<vm_memory::GuestMemoryAtomic<GuestMemory>>,
        >,
    {
        self.flush_early_acks();
        QueueMetrics::inc(&self.metrics.rx_batches);
        if notify_guest(&mut self.rx.used, state, mem) {
            QueueMetrics::inc(&self.metrics.rx_notifications);
        }
    }

    /// Sends the early ACKs that waited for the end of the batch (rule 12:
    /// one per flow whose full-sized segments are not yet acknowledged).
    fn flush_early_acks(&mut self) {
        let Some(offload) = self.offload().cloned() else {
            return;
        };
        self.rx.ack_frame.clear();
        self.rx.ack_ends.clear();
        {
            let mut engine = offload.lock();
            if !engine.has_deferred_acks() {
                return;
            }
            engine.flush_acks(&mut self.rx.ack_frame, &mut self.rx.ack_ends);
        }
        let mut start = 0;
        for &end in &self.rx.ack_ends {
            self.send_local_frame(&self.rx.ack_frame[start..end]);
            start = end;
        }
    }

    /// Delivers one frame; `Err` says why no frame was delivered.
    fn receive_one(&mut self, queue: &mut Queue, mem: &GuestMemory) -> Result<(), RxStop> {
        let n = &self.negotiated;
        let hdr_len = n.hdr_len;
        let mergeable = n.mergeable;
        let max_packet = n.max_rx_packet();
        let log_all = n.log_all;
        let m = self.metrics.clone();
        loop {
            let want = if mergeable { max_packet } else { 1 };
            self.rx
                .refill(queue, mem, want, hdr_len, &m, self.negotiated.log_all);
            let capacity = if mergeable {
                self.rx.held_bytes
            } else {
                self.rx.held.front().map_or(0, |c| c.len as usize)
            };
            if self.rx.held.is_empty() {
                QueueMetrics::inc(&m.rx_no_buffer);
                self.offload_no_buffer();
                self.wait_for_buffers(queue, mem)?;
                continue;
            }

            let chains = if mergeable { self.rx.held.len() } else { 1 };
            let iov = self.rx.held_iovecs(chains);
            let (len, host_in) =
                if self.rx.pending == 0 && capacity >= max_packet && iov.len() <= IOV_MAX {
                    // Fast path: read straight into the held guest buffers.
                    match tap::readv(self.tap_fd, iov) {
                        Ok(Some(len)) => {
                            if log_all {
                                self.rx.mark_held_dirty(mem, chains, len);
                            }
                            (len, self.stamp())
                        }
                        Ok(None) => return Err(RxStop::TapEmpty),
                        Err(e) => {
                            QueueMetrics::inc(&m.rx_tap_read_errors);
                            warn!("queue pair {}: tap read failed: {e}", self.index);
                            return Err(RxStop::TapEmpty);
                        }
                    }
                } else {
                    // Slow path: the buffers posted so far might not hold the frame.
                    if self.rx.pending == 0 {
                        if self.rx.bounce.len() < hdr_len + MAX_FRAME_LEN {
                            self.rx.bounce.resize(hdr_len + MAX_FRAME_LEN, 0);
                        }
                        let iov = [libc::iovec {
                            iov_base: self.rx.bounce.as_mut_ptr().cast(),
                            iov_len: self.rx.bounce.len(),
                        }];
                        match tap::readv(self.tap_fd, &iov) {
                            Ok(Some(len)) => {
                                self.rx.pending = len;
                                self.rx.pending_stamp = self.stamp();
                            }
                            Ok(None) => return Err(RxStop::TapEmpty),
                            Err(e) => {
                                QueueMetrics::inc(&m.rx_tap_read_errors);
                                warn!("queue pair {}: tap read failed: {e}", self.index);
                                return Err(RxStop::TapEmpty);
                            }
                        }
                    }
                    let len = self.rx.pending;
                    if len > capacity {
                        let never_fits =
                            !mergeable || self.rx.held.len() >= usize::from(queue.size());
                        if never_fits {
                            QueueMetrics::inc(&m.rx_drop_frame_too_large);
                            self.rx.pending = 0;
                            continue;
                        }
                        QueueMetrics::inc(&m.rx_no_buffer);
                        self.offload_no_buffer();
                        self.wait_for_buffers(queue, mem)?;
                        continue;
                    }
                    self.rx.copy_into_held(mem, &self.rx.bounce[..len], log_all);
                    QueueMetrics::inc(&m.rx_bounced);
                    self.rx.pending = 0;
                    (len, self.rx.pending_stamp)
                };

            if len < hdr_len {
                // The tap always prepends a full header; anything shorter is
                // a kernel/tap error. The held buffers stay held.
                QueueMetrics::inc(&m.rx_tap_read_errors);
                continue;
            }
            self.publish(queue, mem, len, host_in);
            return Ok(());
        }
    }

    /// Timestamp for a hook, or 0 when no hook wants one.
    fn stamp(&self) -> u64 {
        if self.hook().is_some() {
            now_ns()
        } else {
            0
        }
    }

    /// Marks the chains holding a `len`-byte packet used.
    fn publish(&mut self, queue: &mut Queue, mem: &GuestMemory, len: usize, host_in: u64) {
        let m = &self.metrics;
        let hdr_len = self.negotiated.hdr_len;
        let mut remaining = len;
        let mut used = 0u16;
        // Count the chains first: num_buffers must be in the header before
        // the used index that exposes it is published.
        for chain in self.rx.held.iter() {
            used += 1;
            remaining = remaining.saturating_sub(chain.len as usize);
            if remaining == 0 || !self.negotiated.mergeable {
                break;
            }
        }
        // The tap leaves num_buffers alone; virtio 1.x wants it set (1 without
        // MRG_RXBUF) whenever the header has the field.
        if hdr_len > NUM_BUFFERS_OFFSET {
            if let Some(first) = self.rx.held.front() {
                copy_to_segments(
                    mem,
                    &first.segments,
                    NUM_BUFFERS_OFFSET,
                    &used.to_le_bytes(),
                    self.negotiated.log_all,
                );
            }
        }
        // Borrowed field by field (`self.hook()` would borrow all of
        // `self`): cloning the Arcs cost four atomic read-modify-writes per
        // frame.
        let hook = timing_hook(&self.hook);
        let offload = busy_offload(&self.offload);
        let mut remaining = len;
        self.rx.entries.clear();
        self.rx.hook_segments.clear();
        for _ in 0..used {
            let Some(chain) = self.rx.recycle_front() else {
                break;
            };
            let this = remaining.min(chain.len as usize);
            remaining -= this;
            self.rx.entries.push((chain.head, this as u32));
            if hook.is_some() || offload.is_some() {
                self.rx.hook_segments.extend_from_slice(&chain.segments);
            }
            self.rx.spare.push(chain.segments);
        }
        // ACK offload: learn from the frame and keep a custody copy while
        // the buffers are still ours (before the used index exposes them).
        let mut offload_state = None;
        if let Some(offload) = offload.as_ref() {
            let mut headers = [0u8; HDR_LEN_V1 + MAX_HEADERS];
            let want = hdr_len + (len - hdr_len).min(MAX_HEADERS);
            let got = copy_from_segments(mem, &self.rx.hook_segments, 0, &mut headers[..want]);
            let checksum = if headers[0] & FLAG_NEEDS_CSUM != 0 {
                RxChecksum::Partial
            } else if headers[0] & FLAG_DATA_VALID != 0 {
                RxChecksum::Valid
            } else {
                RxChecksum::Unknown
            };
            let segments = &self.rx.hook_segments;
            let mut engine = offload.lock();
            let flow = engine.remote_rx(
                self.index,
                &headers[hdr_len..got.max(hdr_len)],
                len - hdr_len,
                checksum,
                &mut |offset, buf| copy_from_segments(mem, segments, hdr_len + offset, buf),
                now_ns(),
            );
            offload_state = flow.map(|f| (engine, f));
        }
        // All buffers of the packet become visible to the guest at once.
        let published = self
            .rx
            .used
            .publish(queue, mem, &self.rx.entries, self.negotiated.log_all)
            .is_ok();
        if !published {
            QueueMetrics::inc(&m.bad_head_index);
        }
        // Rule 3: the early ACK only once the used index is published (if
        // the guest may not see the whole frame, no ACK: custody and the
        // guest's own ACKs take it from there).
        if let Some((mut engine, flow)) = offload_state.filter(|_| published) {
            self.rx.ack_frame.clear();
            if engine.remote_published(&flow, &mut self.rx.ack_frame) {
                drop(engine);
                self.send_local_frame(&self.rx.ack_frame);
            }
        }
        QueueMetrics::inc(&m.rx_packets);
        QueueMetrics::add(&m.rx_bytes, (len - hdr_len) as u64);
        if let Some(hook) = hook {
            let stamps = RxStamps {
                host_in,
                ring: now_ns(),
            };
            let view = PacketView {
                mem,
                segments: &self.rx.hook_segments,
                len,
                hdr_len,
            };
            hook.rx_published(self.index, &view, stamps);
        }
    }

    /// The guest has no buffers: the offload stops early ACKs (rule 3).
    fn offload_no_buffer(&self) {
        if let Some(offload) = self.offload() {
            offload.lock().no_buffer();
        }
    }

    /// Delivers frames the ACK offload queued for this pair's RX ring
    /// (custody re-delivery, resets). A frame that finds no buffers is
    /// dropped and counted: the offload retries on its own schedule.
    fn deliver_offload_frames(&mut self, queue: &mut Queue, mem: &GuestMemory) -> usize {
        let Some(offload) = self.offload.clone() else {
            return 0;
        };
        if !offload.has_frames() {
            return 0;
        }
        let mut frames = std::mem::take(&mut self.rx.offload_frames);
        {
            let mut engine = offload.lock();
            engine.take_guest_frames(self.index, &mut frames);
            offload.refresh(&engine);
        }
        let hdr_len = self.negotiated.hdr_len;
        let m = self.metrics.clone();
        let mut delivered = 0;
        let mut packet = Vec::new();
        for frame in frames.drain(..) {
            let len = hdr_len + frame.len();
            let want = if self.negotiated.mergeable { len } else { 1 };
            self.rx
                .refill(queue, mem, want, hdr_len, &m, self.negotiated.log_all);
            let capacity = if self.negotiated.mergeable {
                self.rx.held_bytes
            } else {
                self.rx.held.front().map_or(0, |c| c.len as usize)
            };
            if capacity < len {
                offload.lock().guest_frame_dropped();
                continue;
            }
            packet.clear();
            packet.resize(hdr_len, 0);
            packet.extend_from_slice(&frame);
            self.rx
                .copy_into_held(mem, &packet, self.negotiated.log_all);
            self.publish(queue, mem, len, 0);
            QueueMetrics::inc(&m.offload_frames_delivered);
            delivered += 1;
        }
        self.rx.offload_frames = frames;
        delivered
    }

    /// No room for the next frame: ask the guest to kick us when it posts
    /// buffers. `Ok` means it already has (the caller retries).
    fn wait_for_buffers(&mut self, queue: &mut Queue, mem: &GuestMemory) -> Result<(), RxStop> {
        match ring_has_new_buffers(queue, mem, &self.metrics, (self.index, "RX")) {
            Some(true) => Ok(()),
            Some(false) => Err(RxStop::NoBuffers),
            None => Err(RxStop::NotRunning),
        }
    }
}

/// Signals the guest if the ring's notification rules (EVENT_IDX) ask for it.
pub(super) fn notify_guest<G>(used: &mut UsedRing, state: &mut G, mem: &GuestMemory) -> bool
where
    G: std::ops::DerefMut<
        Target = vhost_user_backend::VringState<vm_memory::GuestMemoryAtomic<GuestMemory>>,
    >,
{
    if !used.needs_notification(state.get_queue(), mem) {
        return false;
    }
    if let Err(e) = state.signal_used_queue() {
        warn!("cannot signal the guest: {e}");
    }
    true
}
