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

use std::os::fd::RawFd;
use std::sync::Arc;

use vhost_user_backend::VringRwLock;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    MemoryRegionAddress,
};

use crate::metrics::QueueMetrics;
use crate::timing::DataPathHook;
use chain::Segment;
use rx::RxState;
use tx::TxState;
use vnet_hdr::Negotiated;

/// The vring type the backend uses.
pub type Vring = VringRwLock;

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
            tap_attached: index == 0,
        }
    }

    /// The per-packet hook. Without the `timing` feature this is always
    /// `None`, so the compiler removes every timestamp and hook call.
    #[inline(always)]
    pub fn hook(&self) -> Option<&Arc<dyn DataPathHook>> {
        if cfg!(feature = "timing") {
            self.hook.as_ref()
        } else {
            None
        }
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
    mem: &GuestMemoryMmap,
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

/// The host address of `[addr, addr + len)` if one region holds all of it.
fn host_address(mem: &GuestMemoryMmap, addr: GuestAddress, len: usize) -> Option<*mut u8> {
    let region = mem.find_region(addr)?;
    let offset = addr.0 - region.start_addr().0;
    let end = offset.checked_add(len as u64)?;
    if end > region.len() {
        return None;
    }
    region.get_host_address(MemoryRegionAddress(offset)).ok()
}

/// Copies `data` into `segments` starting `offset` bytes in; returns bytes copied.
pub fn copy_to_segments(
    mem: &GuestMemoryMmap,
    segments: &[Segment],
    mut offset: usize,
    mut data: &[u8],
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
        if mem.write_slice(&data[..n], addr).is_err() {
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
    mem: &GuestMemoryMmap,
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
        if mem.read_slice(&mut buf[copied..copied + n], addr).is_err() {
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

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap()
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
        assert_eq!(copy_to_segments(&m, &s, 2, b"abcdefgh"), 8);
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
        assert_eq!(copy_to_segments(&m, &s, 10, &[7u8; 100]), 7);
        let mut buf = [0u8; 100];
        assert_eq!(copy_from_segments(&m, &s, 0, &mut buf), 17);
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
