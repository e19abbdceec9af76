//! The data path of one queue pair: RX (tap -> guest) and TX (guest -> tap).
//!
//! Each queue pair is served by one worker thread. Its state lives in a
//! [`QueuePair`], locked by the worker for a whole pass and by the vhost-user
//! thread when the frontend stops a ring. Guest memory is reached only
//! through validated segments ([`chain`]), resolved to host addresses for the
//! duration of one system call.

pub mod chain;
pub mod rx;
pub mod tx;
pub mod used;
pub mod vnet_hdr;

use std::num::Wrapping;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;

use log::warn;
use vhost_user_backend::VringRwLock;
use virtio_queue::{Queue, QueueT};
use vm_memory::bitmap::Bitmap;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress,
};

use crate::GuestMemory;

use crate::metrics::QueueMetrics;
use crate::offload::OffloadPort;
use crate::timing::DataPathHook;
use chain::Segment;
use rx::RxState;
use tx::TxState;
use vnet_hdr::Negotiated;

/// The vring type the backend uses.
pub type Vring = VringRwLock<vm_memory::GuestMemoryAtomic<GuestMemory>>;

/// Frames handled between two used-ring publications / guest notifications.
pub const BATCH: usize = 64;

/// Linux's IOV_MAX: the most iovecs one readv/writev takes.
pub const IOV_MAX: usize = 1024;

/// The state of one queue pair (RX ring 2n, TX ring 2n+1, tap queue n).
pub struct QueuePair {
    /// Queue-pair index.
    pub index: usize,
    /// Tap queue fd (non-blocking).
    pub tap_fd: RawFd,
    /// Counters.
    pub metrics: Arc<QueueMetrics>,
    /// What the driver negotiated.
    pub negotiated: Negotiated,
    /// The rings of the current connection (set on the first event).
    pub vrings: Option<(Vring, Vring)>,
    /// The connection `vrings` belong to.
    pub vrings_generation: u64,
    /// RX-side state.
    pub rx: RxState,
    /// TX-side state.
    pub tx: TxState,
    /// Per-packet hook (timestamps, ACK offload), if any; read it through
    /// [`QueuePair::hook`].
    hook: Option<Arc<dyn DataPathHook>>,
    /// The ACK offload engine, shared by all pairs.
    pub offload: Option<Arc<OffloadPort>>,
    /// Whether this pair's tap queue is attached (multi-queue taps).
    pub tap_attached: bool,
}

impl QueuePair {
    /// A queue pair with nothing negotiated yet.
    pub fn new(
        index: usize,
        tap_fd: RawFd,
        metrics: Arc<QueueMetrics>,
        hook: Option<Arc<dyn DataPathHook>>,
    ) -> Self {
        QueuePair {
            index,
            tap_fd,
            metrics,
            negotiated: Negotiated::from_features(0),
            vrings: None,
            vrings_generation: 0,
            rx: RxState::new(),
            tx: TxState::new(),
            hook,
            offload: None,
            tap_attached: index == 0,
        }
    }

    /// The offload engine if it has anything to do (lock-free check).
    #[inline(always)]
    pub fn offload(&self) -> Option<&Arc<OffloadPort>> {
        busy_offload(&self.offload)
    }

    /// Writes a frame the offload generated (early ACK, reset) to the tap
    /// behind an all-zero virtio-net header (no offloads requested).
    pub fn send_local_frame(&self, frame: &[u8]) {
        let zero = [0u8; vnet_hdr::HDR_LEN_V1];
        let iov = [
            libc::iovec {
                iov_base: zero.as_ptr().cast_mut().cast(),
                iov_len: self.negotiated.hdr_len,
            },
            libc::iovec {
                iov_base: frame.as_ptr().cast_mut().cast(),
                iov_len: frame.len(),
            },
        ];
        match crate::port::tap::writev(self.tap_fd, &iov) {
            Ok(Some(_)) => {
                QueueMetrics::inc(&self.metrics.offload_frames_sent);
                if let Some(hook) = self.hook() {
                    hook.local_sent(self.index, frame, crate::timing::now_ns());
                }
            }
            _ => QueueMetrics::inc(&self.metrics.offload_frames_failed),
        }
    }

    /// Periodic offload work (custody re-delivery, ageing), then whatever
    /// frames it produced for the tap. Frames for the guest go out with the
    /// next RX pass; returns whether there are any.
    pub fn offload_tick(&mut self) -> bool {
        let Some(offload) = self.offload.clone() else {
            return false;
        };
        {
            let mut engine = offload.lock();
            engine.tick(crate::timing::now_ns());
            offload.refresh(&engine);
        }
        self.flush_offload_frames()
    }

    /// Sends the offload's frames for the tap; returns whether frames wait
    /// for this pair's RX ring.
    pub fn flush_offload_frames(&mut self) -> bool {
        let Some(offload) = self.offload.clone() else {
            return false;
        };
        if !offload.has_frames() {
            return false;
        }
        let mut frames = Vec::new();
        let for_guest = {
            let mut engine = offload.lock();
            engine.take_host_frames(&mut frames);
            let waiting = engine.has_guest_frames(self.index);
            offload.refresh(&engine);
            waiting
        };
        for frame in &frames {
            self.send_local_frame(frame);
        }
        for_guest
    }

    /// The per-packet hook. Without the `timing` feature this is always
    /// `None`, so the compiler removes every timestamp and hook call.
    #[inline(always)]
    pub fn hook(&self) -> Option<&Arc<dyn DataPathHook>> {
        timing_hook(&self.hook)
    }

    /// Forgets everything tied to a frontend connection.
    pub fn reset_connection(&mut self) {
        self.vrings = None;
        self.rx.forget_held_chains();
        self.rx.used.reset();
        self.tx.used.reset();
    }
}

/// Raw iovecs into guest memory or our own buffers, reused across passes.
///
/// The pointers are only meaningful during the pass that built them (while
/// that pass holds a guest-memory guard); every pass clears the vector first.
#[derive(Default)]
pub struct IovecBuf(pub Vec<libc::iovec>);

// SAFETY: the raw pointers are never dereferenced by Rust code, only handed
// to readv/writev inside the pass that created them on the owning thread;
// between passes the vector is empty in meaning (always cleared before use).
unsafe impl Send for IovecBuf {}

/// Appends iovecs covering the first `len` bytes of `segments`. Returns the
/// bytes covered, which is less than asked only when some bytes are not
/// guest memory. Callers enforce IOV_MAX.
pub fn push_iovecs(
    mem: &GuestMemory,
    segments: &[Segment],
    mut len: usize,
    iov: &mut Vec<libc::iovec>,
) -> usize {
    let mut covered = 0;
    for seg in segments {
        if len == 0 {
            break;
        }
        let want = (seg.len as usize).min(len);
        // Fast path: the buffer lies inside one region (almost always).
        if let Some(ptr) = host_address(mem, seg.addr, want) {
            iov.push(libc::iovec {
                iov_base: ptr.cast(),
                iov_len: want,
            });
            covered += want;
        } else {
            let mut got = 0;
            for slice in GuestMemoryBackend::get_slices(mem, seg.addr, want) {
                let Ok(slice) = slice else {
                    break;
                };
                iov.push(libc::iovec {
                    iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                    iov_len: slice.len(),
                });
                got += slice.len();
            }
            covered += got;
            if got < want {
                return covered;
            }
        }
        len -= want;
    }
    covered
}

/// Like [`push_iovecs`] for the bytes `[offset, offset + len)` of `segments`.
pub fn push_iovecs_from(
    mem: &GuestMemory,
    segments: &[Segment],
    mut offset: usize,
    len: usize,
    iov: &mut Vec<libc::iovec>,
) -> usize {
    for (i, seg) in segments.iter().enumerate() {
        let seg_len = seg.len as usize;
        if offset >= seg_len {
            offset -= seg_len;
            continue;
        }
        let first = Segment {
            addr: seg.addr.unchecked_add(offset as u64),
            len: (seg_len - offset) as u32,
        };
        let covered = push_iovecs(mem, std::slice::from_ref(&first), len, iov);
        if covered == len || covered < first.len as usize {
            return covered;
        }
        return covered + push_iovecs(mem, &segments[i + 1..], len - covered, iov);
    }
    0
}

/// The host address of `[addr, addr + len)` if one region holds all of it.
fn host_address(mem: &GuestMemory, addr: GuestAddress, len: usize) -> Option<*mut u8> {
    let region = mem.find_region(addr)?;
    let offset = addr.0 - region.start_addr().0;
    let end = offset.checked_add(len as u64)?;
    if end > region.len() {
        return None;
    }
    region.get_host_address(MemoryRegionAddress(offset)).ok()
}

/// Marks the first `len` bytes of `segments` dirty in the migration log.
///
/// Only for bytes written behind vm-memory's back (readv into raw iovecs);
/// its own writes log themselves. Callers skip it unless the frontend asked
/// for logging (VHOST_F_LOG_ALL): each call takes the bitmap's lock.
pub fn mark_dirty(mem: &GuestMemory, segments: &[Segment], mut len: usize) {
    for seg in segments {
        if len == 0 {
            break;
        }
        let mut addr = seg.addr;
        let mut left = (seg.len as usize).min(len);
        len -= left;
        // A segment may span regions (push_iovecs allows it).
        while left > 0 {
            let Some(region) = mem.find_region(addr) else {
                break;
            };
            let offset = addr.0 - region.start_addr().0;
            let n = (region.len() - offset).min(left as u64) as usize;
            region.bitmap().mark_dirty(offset as usize, n);
            left -= n;
            addr = addr.unchecked_add(n as u64);
        }
    }
}

/// Re-enables the guest's notifications for `queue` and says whether it
/// has published buffers meanwhile (`Some(true)`: take them instead of
/// waiting for a kick), or `None` if the ring is unusable. An avail index
/// more than a ring ahead of ours is unusable: virtio-queue refuses to hand
/// out chains while "new buffers" stays true, so taking them would spin. It
/// is counted (`bad_avail_index`) and left alone until the guest resets it.
pub fn ring_has_new_buffers(
    queue: &mut Queue,
    mem: &GuestMemory,
    metrics: &QueueMetrics,
    (pair, ring): (usize, &str),
) -> Option<bool> {
    match queue.enable_notification(mem) {
        Ok(false) => Some(false),
        Ok(true) => {
            let ahead = queue
                .avail_idx(mem, Ordering::Acquire)
                .map(|avail| (avail - Wrapping(queue.next_avail())).0);
            match ahead {
                Ok(n) if n <= queue.size() => Some(true),
                _ => {
                    if metrics.bad_avail_index.load(Ordering::Relaxed) == 0 {
                        warn!(
                            "queue pair {pair} {ring}: avail index more than a ring ahead \
                             ({ahead:?} buffers); ring ignored until the guest resets it"
                        );
                    }
                    QueueMetrics::inc(&metrics.bad_avail_index);
                    None
                }
            }
        }
        Err(e) => {
            warn!("queue pair {pair} {ring}: ring unusable: {e}");
            None
        }
    }
}

/// Writes `data` at `addr`; false if the range is not all guest memory.
///
/// When one region holds the range (almost always) this is a memcpy, and the
/// dirty log is marked only if `log` (VHOST_F_LOG_ALL): vm-memory's own
/// writes take the dirty bitmap's read lock and update its `Arc` on every
/// call, log or not, which was 7-10 % of vsnoop's samples on the RX path.
pub fn write_guest(mem: &GuestMemory, addr: GuestAddress, data: &[u8], log: bool) -> bool {
    let Some(dst) = host_address(mem, addr, data.len()) else {
        return mem.write_slice(data, addr).is_ok();
    };
    // SAFETY: host_address checked that `[dst, dst + len)` lies inside one
    // mapped region, which stays mapped while `mem` is borrowed; `data` is
    // our own memory, so the two do not overlap. vm-memory's write is the
    // same copy.
    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst, data.len()) };
    if log {
        mark_range_dirty(mem, addr, data.len());
    }
    true
}

/// [`QueuePair::offload`] on the field alone, for code that also holds
/// other fields of the pair mutably.
#[inline(always)]
pub(crate) fn busy_offload(offload: &Option<Arc<OffloadPort>>) -> Option<&Arc<OffloadPort>> {
    offload.as_ref().filter(|o| o.busy())
}

/// [`QueuePair::hook`] on the field alone (see [`busy_offload`]).
#[inline(always)]
pub(crate) fn timing_hook(hook: &Option<Arc<dyn DataPathHook>>) -> Option<&Arc<dyn DataPathHook>> {
    if cfg!(feature = "timing") {
        hook.as_ref()
    } else {
        None
    }
}

/// Reads `buf.len()` bytes at `addr`; false if the range is not all guest
/// memory. The counterpart of [`write_guest`]: vm-memory's read_slice costs a
/// region iterator and two `Arc` updates of the dirty bitmap per call.
pub fn read_guest(mem: &GuestMemory, addr: GuestAddress, buf: &mut [u8]) -> bool {
    let Some(src) = host_address(mem, addr, buf.len()) else {
        return mem.read_slice(buf, addr).is_ok();
    };
    // SAFETY: host_address checked that `[src, src + len)` lies inside one
    // mapped region, which stays mapped while `mem` is borrowed; `buf` is
    // our own memory, so the two do not overlap. The guest may write the
    // range meanwhile: the bytes are then garbage, which every reader
    // validates, as with vm-memory's own copy (also a memcpy).
    unsafe { std::ptr::copy_nonoverlapping(src.cast_const(), buf.as_mut_ptr(), buf.len()) };
    true
}

/// The `u16` field at `addr` as an atomic, when one region holds it and it
/// is aligned (ring fields are); None sends the caller to vm-memory, which
/// refuses what is unaligned or outside guest memory.
fn guest_u16(mem: &GuestMemory, addr: GuestAddress) -> Option<&AtomicU16> {
    let ptr = host_address(mem, addr, 2)?;
    if ptr as usize % std::mem::align_of::<AtomicU16>() != 0 {
        return None;
    }
    // SAFETY: two bytes of mapped guest memory (host_address), aligned for
    // AtomicU16 (checked), which has the layout of u16; the mapping outlives
    // the borrow of `mem` the reference carries.
    Some(unsafe { AtomicU16::from_ptr(ptr.cast()) })
}

/// Stores a little-endian `u16` at `addr` with release ordering (a used
/// index); false if it is not guest memory. Like [`write_guest`], marks the
/// dirty log by hand, only if `log`.
pub fn store_guest_u16(mem: &GuestMemory, addr: GuestAddress, value: u16, log: bool) -> bool {
    let Some(field) = guest_u16(mem, addr) else {
        return mem.store(value.to_le(), addr, Ordering::Release).is_ok();
    };
    field.store(value.to_le(), Ordering::Release);
    if log {
        mark_range_dirty(mem, addr, 2);
    }
    true
}

/// Loads a little-endian `u16` at `addr` with acquire ordering (the guest's
/// event index or ring flags); None if it is not guest memory.
pub fn load_guest_u16(mem: &GuestMemory, addr: GuestAddress) -> Option<u16> {
    let value = match guest_u16(mem, addr) {
        Some(field) => field.load(Ordering::Acquire),
        None => mem.load::<u16>(addr, Ordering::Acquire).ok()?,
    };
    Some(u16::from_le(value))
}

/// Marks `[addr, addr + len)` dirty in the migration log.
fn mark_range_dirty(mem: &GuestMemory, addr: GuestAddress, len: usize) {
    let seg = Segment {
        addr,
        len: len as u32,
    };
    mark_dirty(mem, std::slice::from_ref(&seg), len);
}

/// Copies `data` into `segments` starting `offset` bytes in; returns bytes
/// copied. `log`: VHOST_F_LOG_ALL is on (see [`write_guest`]).
pub fn copy_to_segments(
    mem: &GuestMemory,
    segments: &[Segment],
    mut offset: usize,
    mut data: &[u8],
    log: bool,
) -> usize {
    let mut copied = 0;
    for seg in segments {
        if data.is_empty() {
            break;
        }
        let seg_len = seg.len as usize;
        if offset >= seg_len {
            offset -= seg_len;
            continue;
        }
        let n = (seg_len - offset).min(data.len());
        // `offset < seg.len` so the address stays inside the validated segment.
        let addr = seg.addr.unchecked_add(offset as u64);
        if !write_guest(mem, addr, &data[..n], log) {
            break;
        }
        copied += n;
        data = &data[n..];
        offset = 0;
    }
    copied
}

/// Copies bytes out of `segments` starting `offset` bytes in; returns bytes copied.
pub fn copy_from_segments(
    mem: &GuestMemory,
    segments: &[Segment],
    mut offset: usize,
    buf: &mut [u8],
) -> usize {
    let mut copied = 0;
    for seg in segments {
        if copied == buf.len() {
            break;
        }
        let seg_len = seg.len as usize;
        if offset >= seg_len {
            offset -= seg_len;
            continue;
        }
        let n = (seg_len - offset).min(buf.len() - copied);
        let addr = seg.addr.unchecked_add(offset as u64);
        if !read_guest(mem, addr, &mut buf[copied..copied + n]) {
            break;
        }
        copied += n;
        offset = 0;
    }
    copied
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod helper_tests {
    use super::*;
    use vm_memory::GuestAddress;

    fn mem() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap()
    }

    /// Two adjacent 4 KiB regions: ranges across 0x1000 need vm-memory's path.
    fn two_regions() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), 0x1000), (GuestAddress(0x1000), 0x1000)])
            .unwrap()
    }

    fn segs() -> Vec<Segment> {
        vec![
            Segment {
                addr: GuestAddress(0x100),
                len: 4,
            },
            Segment {
                addr: GuestAddress(0x800),
                len: 3,
            },
            Segment {
                addr: GuestAddress(0x2000),
                len: 10,
            },
        ]
    }

    #[test]
    fn copies_across_segments_in_both_directions() {
        let m = mem();
        let s = segs();
        assert_eq!(copy_to_segments(&m, &s, 2, b"abcdefgh", false), 8);
        let mut back = [0u8; 8];
        assert_eq!(copy_from_segments(&m, &s, 2, &mut back), 8);
        assert_eq!(&back, b"abcdefgh");
        // "ab" at the end of segment 0, "cde" fill segment 1, rest in segment 2.
        let mut raw = [0u8; 3];
        m.read_slice(&mut raw, GuestAddress(0x800)).unwrap();
        assert_eq!(&raw, b"cde");
    }

    #[test]
    fn copies_stop_at_the_end_of_the_segments() {
        let m = mem();
        let s = segs();
        assert_eq!(copy_to_segments(&m, &s, 10, &[7u8; 100], false), 7);
        let mut buf = [0u8; 100];
        assert_eq!(copy_from_segments(&m, &s, 0, &mut buf), 17);
    }

    #[test]
    fn reads_span_regions_and_stop_outside_guest_memory() {
        let m = two_regions();
        let data: Vec<u8> = (1..=16).collect();
        m.write_slice(&data, GuestAddress(0xff8)).unwrap();
        let s = [
            Segment {
                addr: GuestAddress(0xff8),
                len: 16,
            },
            Segment {
                addr: GuestAddress(0x2000),
                len: 8,
            },
        ];
        let mut buf = [0u8; 24];
        assert_eq!(copy_from_segments(&m, &s, 0, &mut buf), 16);
        assert_eq!(&buf[..16], &data[..]);
        let mut tail = [0u8; 4];
        assert_eq!(copy_from_segments(&m, &s, 6, &mut tail), 4);
        assert_eq!(tail, [7, 8, 9, 10]);
    }

    #[test]
    fn writes_and_u16_accesses_take_the_slow_path_across_regions_and_fail_outside() {
        let m = two_regions();
        let data: Vec<u8> = (1..=16).collect();
        // Across the region boundary (vm-memory's path), then inside one.
        assert!(write_guest(&m, GuestAddress(0xff8), &data, false));
        assert!(write_guest(&m, GuestAddress(0x100), &data, true));
        let mut back = [0u8; 16];
        m.read_slice(&mut back, GuestAddress(0xff8)).unwrap();
        assert_eq!(&back[..], &data[..]);
        m.read_slice(&mut back, GuestAddress(0x100)).unwrap();
        assert_eq!(&back[..], &data[..]);
        assert!(!write_guest(&m, GuestAddress(0x1ff8), &data, false));
        // The u16 fields are atomics: little-endian when aligned, refused
        // (as by vm-memory) when not, or outside guest memory.
        for addr in [0x200, 0xffe, 0x1ffe] {
            assert!(store_guest_u16(&m, GuestAddress(addr), 0xbeef, false));
            assert_eq!(load_guest_u16(&m, GuestAddress(addr)), Some(0xbeef));
            let raw: [u8; 2] = m.read_obj(GuestAddress(addr)).unwrap();
            assert_eq!(raw, 0xbeefu16.to_le_bytes(), "little-endian at {addr:#x}");
        }
        for addr in [0x301, 0xfff, 0x2000] {
            assert!(
                !store_guest_u16(&m, GuestAddress(addr), 1, false),
                "{addr:#x}"
            );
            assert_eq!(load_guest_u16(&m, GuestAddress(addr)), None, "{addr:#x}");
        }
    }

    #[test]
    fn iovecs_from_an_offset_skip_whole_and_partial_segments() {
        let m = mem();
        let s = segs();
        let mut iov = Vec::new();
        assert_eq!(push_iovecs_from(&m, &s, 5, 100, &mut iov), 12);
        assert_eq!(iov.len(), 2);
        assert_eq!(iov[0].iov_len, 2);
        assert_eq!(iov[1].iov_len, 10);
        iov.clear();
        assert_eq!(push_iovecs_from(&m, &s, 1, 2, &mut iov), 2);
        assert_eq!(iov.len(), 1);
        iov.clear();
        assert_eq!(push_iovecs_from(&m, &s, 17, 5, &mut iov), 0);
    }

    #[test]
    fn iovecs_cover_only_what_is_asked() {
        let m = mem();
        let s = segs();
        let mut iov = Vec::new();
        assert_eq!(push_iovecs(&m, &s, 6, &mut iov), 6);
        assert_eq!(iov.len(), 2);
        assert_eq!(iov[1].iov_len, 2);
        iov.clear();
        assert_eq!(push_iovecs(&m, &s, 1000, &mut iov), 17);
        assert_eq!(iov.len(), 3);
    }
}
