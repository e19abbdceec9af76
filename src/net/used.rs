//! Returning buffers to the guest: used-ring elements and notifications.
//!
//! virtio-queue publishes the used index after every element, which lets a
//! driver see the first buffers of a multi-buffer (MRG_RXBUF) packet before
//! the rest: Linux then drops the packet ("rx error: N buffers out of M
//! missing"), DPDK mis-assembles it. Here all elements of a packet (or of a
//! TX batch) are written first and published with one release store of the
//! used index. The notification decision (EVENT_IDX or the avail flags) is
//! made here too, counting every element published since the last decision.

use std::num::Wrapping;
use std::sync::atomic::{fence, Ordering};

use super::{load_guest_u16, store_guest_u16, write_guest};
use crate::GuestMemory;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;

/// VRING_AVAIL_F_NO_INTERRUPT.
const AVAIL_F_NO_INTERRUPT: u16 = 1;

/// Why used elements could not be published.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum UsedError {
    /// A head index outside the queue (never returned to the guest).
    #[error("descriptor index {0} outside the queue")]
    BadIndex(u16),
    /// The used ring is not in guest memory.
    #[error("used ring outside guest memory")]
    RingUnmapped,
}

/// Notification state of one ring.
#[derive(Debug, Default)]
pub struct UsedRing {
    /// Used index at the last notification decision (None: notify next time).
    signalled: Option<Wrapping<u16>>,
}

impl UsedRing {
    /// Forgets the notification history (ring restarted or reconnected).
    pub fn reset(&mut self) {
        self.signalled = None;
    }

    /// Writes one used element per `(head, len)` and then publishes them all
    /// with one used-index store. Entries with a head outside the queue are
    /// skipped and reported (the first one) after the rest are published.
    /// `log`: VHOST_F_LOG_ALL is on (the writes bypass vm-memory's dirty
    /// bitmap and mark the log themselves).
    pub fn publish(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemory,
        entries: &[(u16, u32)],
        log: bool,
    ) -> Result<(), UsedError> {
        let size = queue.size();
        if size == 0 {
            return Err(UsedError::RingUnmapped);
        }
        let ring = GuestAddress(queue.used_ring());
        let mut next = Wrapping(queue.next_used());
        let mut bad = None;
        // Elements are staged and written in runs up to the ring's end: one
        // guest-memory write per run instead of one per element.
        let mut staged = [0u8; 8 * 64];
        let mut count = 0usize;
        let mut run_start = next.0 % size;
        for &(head, len) in entries {
            if head >= size {
                bad.get_or_insert(UsedError::BadIndex(head));
                continue;
            }
            let slot = next.0 % size;
            if count == 64 || (count > 0 && slot == 0) {
                write_run(mem, ring, run_start, &staged[..8 * count], log)?;
                count = 0;
            }
            if count == 0 {
                run_start = slot;
            }
            staged[8 * count..8 * count + 4].copy_from_slice(&u32::from(head).to_le_bytes());
            staged[8 * count + 4..8 * count + 8].copy_from_slice(&len.to_le_bytes());
            count += 1;
            next += Wrapping(1);
        }
        if count > 0 {
            write_run(mem, ring, run_start, &staged[..8 * count], log)?;
        }
        queue.set_next_used(next.0);
        let idx_addr = ring.0.checked_add(2).ok_or(UsedError::RingUnmapped)?;
        // Release: the elements above are visible before the index is.
        if !store_guest_u16(mem, GuestAddress(idx_addr), next.0, log) {
            return Err(UsedError::RingUnmapped);
        }
        bad.map_or(Ok(()), Err)
    }

    /// Whether the guest wants an interrupt for what was published since the
    /// last call (virtio 1.x 2.7.10 with EVENT_IDX, else the avail flags).
    pub fn needs_notification(&mut self, queue: &Queue, mem: &GuestMemory) -> bool {
        let new = Wrapping(queue.next_used());
        // The used-index store must be visible before we read the guest's
        // wishes, or an interrupt could be lost.
        fence(Ordering::SeqCst);
        let avail = queue.avail_ring();
        if queue.event_idx_enabled() {
            let event_addr = avail + 4 + 2 * u64::from(queue.size());
            let Some(used_event) = load_guest_u16(mem, GuestAddress(event_addr)) else {
                return true;
            };
            let used_event = Wrapping(used_event);
            let old = self.signalled.replace(new);
            match old {
                None => true,
                // vring_need_event(): the guest's event index lies in (old, new].
                Some(old) => new - used_event - Wrapping(1) < new - old,
            }
        } else {
            self.signalled = Some(new);
            match load_guest_u16(mem, GuestAddress(avail)) {
                Some(flags) => flags & AVAIL_F_NO_INTERRUPT == 0,
                None => true,
            }
        }
    }
}

/// Writes consecutive used elements starting at ring slot `slot`.
fn write_run(
    mem: &GuestMemory,
    ring: GuestAddress,
    slot: u16,
    elems: &[u8],
    log: bool,
) -> Result<(), UsedError> {
    let addr = ring
        .0
        .checked_add(4 + 8 * u64::from(slot))
        .ok_or(UsedError::RingUnmapped)?;
    if write_guest(mem, GuestAddress(addr), elems, log) {
        Ok(())
    } else {
        Err(UsedError::RingUnmapped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    fn setup(event_idx: bool) -> (GuestMemory, Queue) {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let mut q = Queue::new(16).unwrap();
        q.set_size(16);
        q.set_desc_table_address(Some(0x0), Some(0));
        q.set_avail_ring_address(Some(0x1000), Some(0));
        q.set_used_ring_address(Some(0x2000), Some(0));
        q.set_event_idx(event_idx);
        q.set_ready(true);
        (mem, q)
    }

    fn used_idx(mem: &GuestMemory) -> u16 {
        mem.read_obj(GuestAddress(0x2002)).unwrap()
    }

    #[test]
    fn publishes_all_elements_with_one_index_update() {
        let (mem, mut q) = setup(false);
        let mut used = UsedRing::default();
        used.publish(&mut q, &mem, &[(3, 100), (7, 200), (1, 50)], false)
            .unwrap();
        assert_eq!(used_idx(&mem), 3);
        assert_eq!(q.next_used(), 3);
        let id: u32 = mem.read_obj(GuestAddress(0x2004 + 8)).unwrap();
        let len: u32 = mem.read_obj(GuestAddress(0x2008 + 8)).unwrap();
        assert_eq!((id, len), (7, 200));
    }

    #[test]
    fn bad_heads_are_skipped_and_reported() {
        let (mem, mut q) = setup(false);
        let mut used = UsedRing::default();
        let r = used.publish(&mut q, &mem, &[(3, 1), (99, 1), (4, 1)], false);
        assert_eq!(r, Err(UsedError::BadIndex(99)));
        assert_eq!(used_idx(&mem), 2);
    }

    #[test]
    fn wraps_around_the_ring() {
        let (mem, mut q) = setup(false);
        q.set_next_used(15);
        let mut used = UsedRing::default();
        used.publish(&mut q, &mem, &[(1, 1), (2, 2)], false)
            .unwrap();
        assert_eq!(used_idx(&mem), 17);
        let slot0: u32 = mem.read_obj(GuestAddress(0x2004)).unwrap();
        assert_eq!(slot0, 2);
    }

    #[test]
    fn long_publications_wrap_and_keep_order() {
        let (mem, mut q) = setup(false);
        q.set_next_used(10);
        let entries: Vec<(u16, u32)> = (0..100u32).map(|i| ((i % 16) as u16, i)).collect();
        UsedRing::default()
            .publish(&mut q, &mem, &entries, false)
            .unwrap();
        assert_eq!(used_idx(&mem), 110);
        // The last element (i = 99) sits in slot 109 % 16 = 13.
        let id: u32 = mem.read_obj(GuestAddress(0x2004 + 8 * 13)).unwrap();
        let len: u32 = mem.read_obj(GuestAddress(0x2008 + 8 * 13)).unwrap();
        assert_eq!((id, len), (99 % 16, 99));
    }

    #[test]
    fn event_idx_notifies_only_when_crossing_used_event() {
        let (mem, mut q) = setup(true);
        let mut used = UsedRing::default();
        let used_event = GuestAddress(0x1000 + 4 + 2 * 16);
        mem.write_obj(5u16, used_event).unwrap();
        used.publish(&mut q, &mem, &[(0, 1), (1, 1)], false)
            .unwrap();
        assert!(
            used.needs_notification(&q, &mem),
            "first decision always notifies"
        );
        used.publish(&mut q, &mem, &[(2, 1), (3, 1)], false)
            .unwrap(); // idx 2 -> 4
        assert!(!used.needs_notification(&q, &mem));
        used.publish(&mut q, &mem, &[(4, 1), (5, 1), (6, 1)], false)
            .unwrap(); // 4 -> 7 crosses 5
        assert!(used.needs_notification(&q, &mem));
        used.publish(&mut q, &mem, &[(7, 1)], false).unwrap();
        assert!(!used.needs_notification(&q, &mem));
    }

    #[test]
    fn without_event_idx_the_avail_flag_decides() {
        let (mem, mut q) = setup(false);
        let mut used = UsedRing::default();
        used.publish(&mut q, &mem, &[(0, 1)], false).unwrap();
        assert!(used.needs_notification(&q, &mem));
        mem.write_obj(AVAIL_F_NO_INTERRUPT, GuestAddress(0x1000))
            .unwrap();
        assert!(!used.needs_notification(&q, &mem));
    }
}
