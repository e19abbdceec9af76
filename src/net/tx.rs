//! TX: guest frames from the TX ring to the tap.
//!
//! Each chain is validated, its virtio-net header checked against what was
//! negotiated, and written to the tap with one `writev` straight from guest
//! memory (the tap uses the same header layout, so it passes through). Every
//! chain is returned to the guest, sent or dropped, with length 0.

use crate::GuestMemory;
use log::warn;
use vhost_user_backend::VringT;
use virtio_queue::{QueueOwnedT, QueueT};

use super::chain::{collect_segments, Access, ChainError, Segment};
use super::rx::notify_guest;
use super::used::UsedRing;
use super::vnet_hdr::{VnetHdr, FLAG_NEEDS_CSUM, HDR_LEN_V1, MAX_FRAME_LEN};
use super::{
    busy_offload, copy_from_segments, push_iovecs_from, ring_has_new_buffers, timing_hook,
    IovecBuf, QueuePair, BATCH, IOV_MAX,
};
use crate::metrics::QueueMetrics;
use crate::offload::flow::TxVerdict;
use crate::offload::wire::MAX_HEADERS;
use crate::port::tap;
use crate::timing::{now_ns, PacketView, TxStamps};

/// TX state of one queue pair.
#[derive(Default)]
pub struct TxState {
    /// Used-ring publication and notification state.
    pub used: UsedRing,
    entries: Vec<(u16, u32)>,
    segments: Vec<Segment>,
    iov: IovecBuf,
    linear: Vec<u8>,
    /// Private copy of a frame's headers for the ACK offload to edit.
    headers: Vec<u8>,
}

impl TxState {
    /// Empty state.
    pub fn new() -> Self {
        Self::default()
    }
}

impl QueuePair {
    /// Sends every available TX chain to the tap, returns them to the guest,
    /// and notifies once per batch.
    pub fn process_tx(&mut self, mem: &GuestMemory) {
        let Some((_, tx_vring)) = self.vrings.clone() else {
            return;
        };
        let mut state = tx_vring.get_mut();
        if !state.get_queue().ready() || !state.is_enabled() {
            return;
        }
        let kick = if self.hook().is_some() { now_ns() } else { 0 };
        let mut heads = [0u16; BATCH];
        loop {
            // Suppress kicks while we are draining the ring anyway.
            let _ = state.get_queue_mut().disable_notification(mem);
            loop {
                // One avail-index read per batch, then one used entry per chain.
                let mut taken = 0;
                if let Ok(mut chains) = state.get_queue_mut().iter(mem) {
                    while taken < BATCH {
                        let Some(chain) = chains.next() else {
                            break;
                        };
                        heads[taken] = chain.head_index();
                        taken += 1;
                        let pop = if self.hook().is_some() { now_ns() } else { 0 };
                        self.tx.iov.0.clear();
                        let collected = collect_segments(
                            chain,
                            mem,
                            Access::DeviceReads,
                            &mut self.tx.segments,
                            &mut self.tx.iov.0,
                        );
                        let stamps = TxStamps {
                            kick,
                            pop,
                            host_out: 0,
                        };
                        self.transmit(mem, collected, stamps);
                    }
                }
                if taken == 0 {
                    break;
                }
                let size = state.get_queue().size();
                let entries = &mut self.tx.entries;
                entries.clear();
                for &head in &heads[..taken] {
                    if head < size {
                        entries.push((head, 0));
                    } else {
                        // Cannot be returned: the guest named no real descriptor.
                        QueueMetrics::inc(&self.metrics.bad_head_index);
                    }
                }
                let log = self.negotiated.log_all;
                if let Err(e) = self
                    .tx
                    .used
                    .publish(state.get_queue_mut(), mem, entries, log)
                {
                    warn!("queue pair {}: cannot return TX buffers: {e}", self.index);
                }
                if notify_guest(&mut self.tx.used, &mut state, mem) {
                    QueueMetrics::inc(&self.metrics.tx_notifications);
                }
            }
            let ring = (self.index, "TX");
            if ring_has_new_buffers(state.get_queue_mut(), mem, &self.metrics, ring) != Some(true) {
                break;
            }
        }
    }

    /// Validates one collected chain and writes it to the tap.
    fn transmit(
        &mut self,
        mem: &GuestMemory,
        collected: Result<u32, ChainError>,
        mut stamps: TxStamps,
    ) {
        let m = &self.metrics;
        let hdr_len = self.negotiated.hdr_len;
        let total = match collected {
            Ok(total) => total as usize,
            Err(e) => {
                let counter = match e {
                    ChainError::BadAddress => &m.tx_drop_bad_address,
                    ChainError::WrongDirection => &m.tx_drop_writable_buffer,
                    ChainError::Malformed | ChainError::TooLong => &m.tx_drop_bad_chain,
                };
                QueueMetrics::inc(counter);
                return;
            }
        };
        if total < hdr_len {
            QueueMetrics::inc(&m.tx_drop_short_header);
            return;
        }
        if total - hdr_len > MAX_FRAME_LEN {
            QueueMetrics::inc(&m.tx_drop_too_large);
            return;
        }
        let mut raw = [0u8; HDR_LEN_V1];
        read_prefix(&self.tx.iov.0, &mut raw[..hdr_len]);
        if let Err(e) = self
            .negotiated
            .check_tx_header(&VnetHdr::from_bytes(&raw[..hdr_len]))
        {
            log::debug!("queue pair {}: dropping TX frame: {e}", self.index);
            QueueMetrics::inc(&m.tx_drop_bad_gso);
            return;
        }
        let linearize = self.tx.iov.0.len() > IOV_MAX;
        if linearize {
            // More pieces than one writev takes: linearize.
            self.tx.linear.resize(total, 0);
            let n = copy_from_segments(mem, &self.tx.segments, 0, &mut self.tx.linear);
            self.tx.iov.0.clear();
            self.tx.iov.0.push(libc::iovec {
                iov_base: self.tx.linear.as_mut_ptr().cast(),
                iov_len: n,
            });
        }
        if let Some(offload) = busy_offload(&self.offload) {
            // ACK offload (rule 10): learn from the guest's packet, then send
            // it as is, send an edited copy of its headers, or drop it.
            let edited = hdr_len + (total - hdr_len).min(MAX_HEADERS);
            self.tx.headers.resize(edited, 0);
            read_prefix(&self.tx.iov.0, &mut self.tx.headers);
            let needs_csum = self.tx.headers[0] & FLAG_NEEDS_CSUM != 0;
            let verdict = {
                let mut engine = offload.lock();
                let v = engine.guest_tx(
                    &mut self.tx.headers[hdr_len..],
                    total - hdr_len,
                    needs_csum,
                    now_ns(),
                );
                offload.refresh(&engine);
                v
            };
            match verdict {
                TxVerdict::Pass => {}
                TxVerdict::Suppress => {
                    if let Some(hook) = timing_hook(&self.hook) {
                        let view = PacketView {
                            mem,
                            segments: &self.tx.segments,
                            len: total,
                            hdr_len,
                        };
                        hook.tx_suppressed(self.index, &view, stamps.pop);
                    }
                    return;
                }
                TxVerdict::Rewritten if linearize => {
                    self.tx.linear[..edited].copy_from_slice(&self.tx.headers);
                }
                TxVerdict::Rewritten => {
                    self.tx.iov.0.clear();
                    self.tx.iov.0.push(libc::iovec {
                        iov_base: self.tx.headers.as_mut_ptr().cast(),
                        iov_len: edited,
                    });
                    push_iovecs_from(
                        mem,
                        &self.tx.segments,
                        edited,
                        total - edited,
                        &mut self.tx.iov.0,
                    );
                    if self.tx.iov.0.len() > IOV_MAX {
                        // The edited header took one iovec too many.
                        self.tx.linear.resize(total, 0);
                        self.tx.linear[..edited].copy_from_slice(&self.tx.headers);
                        let n = copy_from_segments(
                            mem,
                            &self.tx.segments,
                            edited,
                            &mut self.tx.linear[edited..],
                        );
                        self.tx.iov.0.clear();
                        self.tx.iov.0.push(libc::iovec {
                            iov_base: self.tx.linear.as_mut_ptr().cast(),
                            iov_len: edited + n,
                        });
                    }
                }
            }
        }
        match tap::writev(self.tap_fd, &self.tx.iov.0) {
            Ok(Some(_)) => {
                QueueMetrics::inc(&m.tx_packets);
                QueueMetrics::add(&m.tx_bytes, (total - hdr_len) as u64);
                if let Some(hook) = timing_hook(&self.hook) {
                    stamps.host_out = now_ns();
                    let view = PacketView {
                        mem,
                        segments: &self.tx.segments,
                        len: total,
                        hdr_len,
                    };
                    hook.tx_sent(self.index, &view, stamps);
                }
            }
            Ok(None) => QueueMetrics::inc(&m.tx_drop_tap_write),
            Err(e) => {
                log::debug!("queue pair {}: tap write failed: {e}", self.index);
                QueueMetrics::inc(&m.tx_drop_tap_write);
            }
        }
    }
}

/// Copies the first bytes covered by `iov` into `out` (volatile reads: the
/// guest may be writing the same memory).
fn read_prefix(iov: &[libc::iovec], out: &mut [u8]) {
    let mut filled = 0;
    for v in iov {
        let base = v.iov_base.cast::<u8>().cast_const();
        let mut i = 0;
        while i < v.iov_len && filled < out.len() {
            // SAFETY: `base..base + iov_len` is mapped guest memory resolved
            // by push_iovecs under the memory guard the caller holds.
            out[filled] = unsafe { std::ptr::read_volatile(base.add(i)) };
            i += 1;
            filled += 1;
        }
        if filled == out.len() {
            return;
        }
    }
}
