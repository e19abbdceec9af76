//! A small vhost-user *frontend* (the VMM side) for the integration tests.
//!
//! * Guest memory is a memfd mapped shared into this process and handed to the
//!   backend with SET_MEM_TABLE ([`GuestMem`]).
//! * [`Vq`] is a split-virtqueue *driver* over that memory: descriptor table,
//!   avail ring and used ring, with EVENT_IDX and indirect descriptors, plus
//!   low-level access to write arbitrary (hostile) descriptors.
//! * [`TestFrontend`] negotiates with the backend through the `vhost` crate's
//!   [`Frontend`], in the order the spec suggests or in the order QEMU 7.2 uses
//!   (SET_VRING_ENABLE before SET_FEATURES, sent as raw messages because the
//!   crate refuses to send it before PROTOCOL_FEATURES is acked), and moves
//!   virtio-net frames (12-byte `virtio_net_hdr_v1`, mergeable RX buffers).
//! * [`PacketPort`] is an AF_PACKET socket bound to an interface inside a
//!   network namespace (the host side of the TAP).
#![allow(dead_code)]

use std::collections::HashMap;
use std::ffi::CString;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{fence, AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use vhost::vhost_user::message::VhostUserHeaderFlag;
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

// ---------------------------------------------------------------------------
// Constants
// ---------------------------------------------------------------------------

pub const F_CSUM: u64 = 1 << 0;
pub const F_GUEST_CSUM: u64 = 1 << 1;
pub const F_MAC: u64 = 1 << 5;
pub const F_GUEST_TSO4: u64 = 1 << 7;
pub const F_GUEST_TSO6: u64 = 1 << 8;
pub const F_HOST_TSO4: u64 = 1 << 11;
pub const F_HOST_TSO6: u64 = 1 << 12;
pub const F_MRG_RXBUF: u64 = 1 << 15;
pub const F_STATUS: u64 = 1 << 16;
pub const F_CTRL_VQ: u64 = 1 << 17;
pub const F_MQ: u64 = 1 << 22;
pub const F_INDIRECT_DESC: u64 = 1 << 28;
pub const F_EVENT_IDX: u64 = 1 << 29;
pub const F_PROTOCOL_FEATURES: u64 = 1 << 30;
pub const F_VERSION_1: u64 = 1 << 32;

pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;
pub const DESC_F_INDIRECT: u16 = 4;

/// `sizeof(struct virtio_net_hdr_v1)`.
pub const NET_HDR_LEN: usize = 12;

const VHOST_USER_SET_VRING_ENABLE: u32 = 18;
const VHOST_USER_VERSION: u32 = 0x1;
const VHOST_USER_REPLY: u32 = 0x4;
const VHOST_USER_NEED_REPLY: u32 = 0x8;

/// Poison written into RX buffers before they are posted.
pub const RX_POISON: u8 = 0xa5;

// ---------------------------------------------------------------------------
// Guest memory
// ---------------------------------------------------------------------------

struct Allocator {
    /// Free ranges (start, len), sorted by start and coalesced.
    free: Vec<(u64, u64)>,
    used: HashMap<u64, u64>,
}

impl Allocator {
    fn alloc(&mut self, len: u64, align: u64) -> Option<u64> {
        let len = len.max(1);
        for i in 0..self.free.len() {
            let (s, l) = self.free[i];
            let a = (s + align - 1) & !(align - 1);
            if a + len <= s + l {
                let mut repl = Vec::new();
                if a > s {
                    repl.push((s, a - s));
                }
                if a + len < s + l {
                    repl.push((a + len, s + l - a - len));
                }
                self.free.splice(i..=i, repl);
                self.used.insert(a, len);
                return Some(a);
            }
        }
        None
    }

    fn free(&mut self, addr: u64) {
        let len = self
            .used
            .remove(&addr)
            .unwrap_or_else(|| panic!("double free of guest buffer {addr:#x}"));
        let pos = self.free.partition_point(|&(s, _)| s < addr);
        self.free.insert(pos, (addr, len));
        // Merge with the next range, then with the previous one.
        if pos + 1 < self.free.len() && self.free[pos].0 + self.free[pos].1 == self.free[pos + 1].0
        {
            self.free[pos].1 += self.free[pos + 1].1;
            self.free.remove(pos + 1);
        }
        if pos > 0 && self.free[pos - 1].0 + self.free[pos - 1].1 == self.free[pos].0 {
            self.free[pos - 1].1 += self.free[pos].1;
            self.free.remove(pos);
        }
    }
}

/// Guest RAM: one memfd, mapped shared, at guest-physical `gpa_base`.
pub struct GuestMem {
    fd: OwnedFd,
    ptr: *mut u8,
    size: usize,
    pub gpa_base: u64,
    alloc: Mutex<Allocator>,
}

// SAFETY: the mapping lives as long as the struct; all accesses go through
// bounds-checked methods and the memory is shared with another process anyway.
unsafe impl Send for GuestMem {}
// SAFETY: see above.
unsafe impl Sync for GuestMem {}

impl GuestMem {
    pub fn new(size: usize, gpa_base: u64) -> Result<Arc<GuestMem>> {
        let name = CString::new("vsnoop-test-guest").unwrap();
        // SAFETY: valid C string; the returned fd is checked.
        let raw = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        if raw < 0 {
            bail!("memfd_create: {}", std::io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh fd we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: plain syscall on our fd.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), size as libc::off_t) } != 0 {
            bail!("ftruncate: {}", std::io::Error::last_os_error());
        }
        // SAFETY: new shared mapping of our memfd; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            bail!("mmap: {}", std::io::Error::last_os_error());
        }
        Ok(Arc::new(GuestMem {
            fd,
            ptr: ptr as *mut u8,
            size,
            gpa_base,
            alloc: Mutex::new(Allocator {
                free: vec![(gpa_base, size as u64)],
                used: HashMap::new(),
            }),
        }))
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// First guest-physical address past the end of guest memory.
    pub fn end(&self) -> u64 {
        self.gpa_base + self.size as u64
    }

    fn off(&self, gpa: u64, len: usize) -> usize {
        assert!(
            gpa >= self.gpa_base && gpa - self.gpa_base + len as u64 <= self.size as u64,
            "guest access {gpa:#x}+{len} outside guest memory"
        );
        (gpa - self.gpa_base) as usize
    }

    /// This process's virtual address of `gpa` (what SET_VRING_ADDR carries).
    pub fn uva(&self, gpa: u64) -> u64 {
        self.ptr as u64 + self.off(gpa, 0) as u64
    }

    pub fn write(&self, gpa: u64, data: &[u8]) {
        let off = self.off(gpa, data.len());
        // SAFETY: bounds checked above; the mapping is valid for `size` bytes.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(off), data.len()) }
    }

    pub fn fill(&self, gpa: u64, len: usize, byte: u8) {
        let off = self.off(gpa, len);
        // SAFETY: bounds checked above.
        unsafe { std::ptr::write_bytes(self.ptr.add(off), byte, len) }
    }

    pub fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        let off = self.off(gpa, len);
        let mut v = vec![0u8; len];
        // SAFETY: bounds checked above.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(off), v.as_mut_ptr(), len) }
        v
    }

    pub fn write_u16(&self, gpa: u64, v: u16) {
        self.write(gpa, &v.to_le_bytes())
    }

    pub fn write_u32(&self, gpa: u64, v: u32) {
        self.write(gpa, &v.to_le_bytes())
    }

    pub fn write_u64(&self, gpa: u64, v: u64) {
        self.write(gpa, &v.to_le_bytes())
    }

    pub fn read_u16(&self, gpa: u64) -> u16 {
        u16::from_le_bytes(self.read(gpa, 2).try_into().unwrap())
    }

    pub fn read_u32(&self, gpa: u64) -> u32 {
        u32::from_le_bytes(self.read(gpa, 4).try_into().unwrap())
    }

    fn atomic_u16(&self, gpa: u64) -> &AtomicU16 {
        assert_eq!(gpa % 2, 0);
        let off = self.off(gpa, 2);
        // SAFETY: in bounds, 2-aligned (the mapping is page aligned), and the
        // mapping outlives the returned reference.
        unsafe { &*(self.ptr.add(off) as *const AtomicU16) }
    }

    pub fn alloc(&self, len: usize, align: u64) -> Result<u64> {
        self.alloc
            .lock()
            .unwrap()
            .alloc(len as u64, align)
            .ok_or_else(|| anyhow!("guest memory exhausted allocating {len} bytes"))
    }

    pub fn free(&self, gpa: u64) {
        self.alloc.lock().unwrap().free(gpa)
    }

    pub fn region(&self) -> VhostUserMemoryRegionInfo {
        VhostUserMemoryRegionInfo {
            guest_phys_addr: self.gpa_base,
            memory_size: self.size as u64,
            userspace_addr: self.ptr as u64,
            mmap_offset: 0,
            mmap_handle: self.fd.as_raw_fd(),
        }
    }
}

impl Drop for GuestMem {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping once.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.size) };
    }
}

// ---------------------------------------------------------------------------
// Split virtqueue driver
// ---------------------------------------------------------------------------

/// A buffer chain the driver made available and has not yet seen used.
#[derive(Debug, Default)]
pub struct Chain {
    /// Descriptor-table entries the chain occupies.
    pub descs: Vec<u16>,
    /// Guest allocations to free when the chain comes back.
    pub allocs: Vec<u64>,
    /// Device-writable segments in order (RX data lands here).
    pub writable: Vec<(u64, u32)>,
    /// Deliberately malformed: the device may or may not return it.
    pub hostile: bool,
}

/// One segment of a chain built by [`Vq::add_chain`].
#[derive(Clone, Debug)]
pub enum Seg {
    /// Device-readable data.
    Out(Vec<u8>),
    /// Device-writable buffer of this many bytes.
    In(u32),
}

pub struct Vq {
    mem: Arc<GuestMem>,
    pub index: usize,
    pub size: u16,
    pub desc_gpa: u64,
    pub avail_gpa: u64,
    pub used_gpa: u64,
    free: Vec<u16>,
    next_avail: u16,
    notified_avail: u16,
    last_used: u16,
    pub event_idx: bool,
    pub kick: EventFd,
    pub call: EventFd,
    /// Notifications sent / suppressed.
    pub kicks: u64,
    pub suppressed_kicks: u64,
    pub inflight: HashMap<u16, Chain>,
    /// Descriptors of hostile chains the device never returned (never reused).
    pub quarantined: Vec<u16>,
    /// RX refill layout: segment sizes and whether to use an indirect table.
    pub rx_layout: Option<(Vec<u32>, bool)>,
}

/// `vring_need_event()` from the virtio spec.
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

impl Vq {
    pub fn new(mem: &Arc<GuestMem>, index: usize, size: u16, event_idx: bool) -> Result<Vq> {
        assert!(size.is_power_of_two());
        let n = size as usize;
        let desc_gpa = mem.alloc(16 * n, 4096)?;
        let avail_gpa = mem.alloc(6 + 2 * n, 4096)?;
        let used_gpa = mem.alloc(6 + 8 * n, 4096)?;
        mem.fill(desc_gpa, 16 * n, 0);
        mem.fill(avail_gpa, 6 + 2 * n, 0);
        mem.fill(used_gpa, 6 + 8 * n, 0);
        Ok(Vq {
            mem: mem.clone(),
            index,
            size,
            desc_gpa,
            avail_gpa,
            used_gpa,
            free: (0..size).rev().collect(),
            next_avail: 0,
            notified_avail: 0,
            last_used: 0,
            event_idx,
            kick: EventFd::new(EFD_NONBLOCK)?,
            call: EventFd::new(EFD_NONBLOCK)?,
            kicks: 0,
            suppressed_kicks: 0,
            inflight: HashMap::new(),
            quarantined: Vec::new(),
            rx_layout: None,
        })
    }

    pub fn mem(&self) -> &Arc<GuestMem> {
        &self.mem
    }

    pub fn config(&self) -> VringConfigData {
        VringConfigData {
            queue_max_size: self.size,
            queue_size: self.size,
            flags: 0,
            desc_table_addr: self.mem.uva(self.desc_gpa),
            used_ring_addr: self.mem.uva(self.used_gpa),
            avail_ring_addr: self.mem.uva(self.avail_gpa),
            log_addr: None,
        }
    }

    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    pub fn avail_idx(&self) -> u16 {
        self.next_avail
    }

    pub fn last_used(&self) -> u16 {
        self.last_used
    }

    pub fn alloc_descs(&mut self, n: usize) -> Option<Vec<u16>> {
        if self.free.len() < n {
            return None;
        }
        let at = self.free.len() - n;
        Some(self.free.split_off(at).into_iter().rev().collect())
    }

    /// Writes descriptor-table entry `id` verbatim.
    pub fn write_desc(&self, id: u16, addr: u64, len: u32, flags: u16, next: u16) {
        write_desc_at(
            &self.mem,
            self.desc_gpa + 16 * id as u64,
            addr,
            len,
            flags,
            next,
        )
    }

    /// Makes `head` available (without notifying) and records its chain.
    pub fn publish(&mut self, head: u16, chain: Chain) {
        let slot = self.avail_gpa + 4 + 2 * (self.next_avail % self.size) as u64;
        self.mem.write_u16(slot, head);
        self.next_avail = self.next_avail.wrapping_add(1);
        self.mem
            .atomic_u16(self.avail_gpa + 2)
            .store(self.next_avail, Ordering::Release);
        let old = self.inflight.insert(head, chain);
        assert!(old.is_none(), "descriptor {head} published twice");
    }

    /// Notifies the device if the ring's suppression state asks for it.
    pub fn notify(&mut self) {
        fence(Ordering::SeqCst);
        let new = self.next_avail;
        let old = self.notified_avail;
        if new == old {
            return;
        }
        self.notified_avail = new;
        let kick = if self.event_idx {
            let ev = self
                .mem
                .atomic_u16(self.used_gpa + 4 + 8 * self.size as u64)
                .load(Ordering::Acquire);
            need_event(ev, new, old)
        } else {
            let flags = self.mem.atomic_u16(self.used_gpa).load(Ordering::Acquire);
            flags & 1 == 0
        };
        if kick {
            self.kick_now();
        } else {
            self.suppressed_kicks += 1;
        }
    }

    /// Unconditional notification.
    pub fn kick_now(&mut self) {
        self.kicks += 1;
        self.kick.write(1).expect("write kick eventfd");
    }

    pub fn used_idx(&self) -> u16 {
        self.mem
            .atomic_u16(self.used_gpa + 2)
            .load(Ordering::Acquire)
    }

    /// Pops one used element (id, len), if any.
    pub fn poll_used(&mut self) -> Option<(u32, u32)> {
        if self.used_idx() == self.last_used {
            return None;
        }
        fence(Ordering::Acquire);
        let e = self.used_gpa + 4 + 8 * (self.last_used % self.size) as u64;
        let id = self.mem.read_u32(e);
        let len = self.mem.read_u32(e + 4);
        self.last_used = self.last_used.wrapping_add(1);
        if self.event_idx {
            self.mem
                .atomic_u16(self.avail_gpa + 4 + 2 * self.size as u64)
                .store(self.last_used, Ordering::Release);
        }
        Some((id, len))
    }

    /// Waits for one used element, sleeping on the call eventfd. A used entry
    /// that shows up without a notification is an error (a guest would hang).
    pub fn wait_used(&mut self, timeout: Duration) -> Result<(u32, u32)> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(e) = self.poll_used() {
                return Ok(e);
            }
            if self.event_idx {
                self.mem
                    .atomic_u16(self.avail_gpa + 4 + 2 * self.size as u64)
                    .store(self.last_used, Ordering::Release);
            }
            fence(Ordering::SeqCst);
            if let Some(e) = self.poll_used() {
                return Ok(e);
            }
            let now = Instant::now();
            if now >= deadline {
                bail!(
                    "queue {}: no used buffer within {timeout:?} (avail {} used {} inflight {})",
                    self.index,
                    self.next_avail,
                    self.used_idx(),
                    self.inflight.len()
                );
            }
            if !poll_readable(self.call.as_raw_fd(), deadline - now) {
                if self.used_idx() != self.last_used {
                    bail!(
                        "queue {}: device added used buffers (used idx {} > {}) but never \
                         signalled the call eventfd",
                        self.index,
                        self.used_idx(),
                        self.last_used
                    );
                }
                continue;
            }
            let _ = self.call.read();
        }
    }

    /// Takes a used chain back: frees its descriptors and returns it (its
    /// allocations are still valid until [`Vq::release`]).
    pub fn take(&mut self, id: u32) -> Result<Chain> {
        let head = u16::try_from(id)
            .ok()
            .filter(|h| *h < self.size)
            .ok_or_else(|| anyhow!("queue {}: device returned bogus id {id}", self.index))?;
        let chain = self.inflight.remove(&head).ok_or_else(|| {
            anyhow!(
                "queue {}: device returned id {id} that is not in flight",
                self.index
            )
        })?;
        self.free.extend_from_slice(&chain.descs);
        Ok(chain)
    }

    pub fn release(&self, chain: Chain) {
        for a in chain.allocs {
            self.mem.free(a);
        }
    }

    /// Gives up on a hostile chain the device dropped without returning it:
    /// its descriptors are never reused, its memory is freed.
    pub fn forget(&mut self, head: u16) {
        if let Some(chain) = self.inflight.remove(&head) {
            self.quarantined.extend_from_slice(&chain.descs);
            for a in chain.allocs {
                self.mem.free(a);
            }
        }
    }

    /// Builds and publishes a well-formed chain (not notified).
    pub fn add_chain(&mut self, segs: &[Seg], indirect: bool) -> Result<u16> {
        let mut chain = Chain::default();
        let mut bufs = Vec::new();
        for s in segs {
            match s {
                Seg::Out(data) => {
                    let a = self.mem.alloc(data.len(), 8)?;
                    self.mem.write(a, data);
                    chain.allocs.push(a);
                    bufs.push((a, data.len() as u32, 0));
                }
                Seg::In(len) => {
                    let a = self.mem.alloc(*len as usize, 8)?;
                    self.mem.fill(a, *len as usize, RX_POISON);
                    chain.allocs.push(a);
                    chain.writable.push((a, *len));
                    bufs.push((a, *len, DESC_F_WRITE));
                }
            }
        }
        let n = bufs.len();
        if indirect {
            let table = self.mem.alloc(16 * n, 16)?;
            chain.allocs.push(table);
            for (i, &(a, l, f)) in bufs.iter().enumerate() {
                let (flags, next) = if i + 1 < n {
                    (f | DESC_F_NEXT, i as u16 + 1)
                } else {
                    (f, 0)
                };
                write_desc_at(&self.mem, table + 16 * i as u64, a, l, flags, next);
            }
            let Some(d) = self.alloc_descs(1) else {
                self.release(chain);
                bail!("queue {}: no free descriptor", self.index);
            };
            self.write_desc(d[0], table, 16 * n as u32, DESC_F_INDIRECT, 0);
            chain.descs = d;
        } else {
            let Some(d) = self.alloc_descs(n) else {
                self.release(chain);
                bail!("queue {}: {n} descriptors needed", self.index);
            };
            for (i, &(a, l, f)) in bufs.iter().enumerate() {
                let (flags, next) = if i + 1 < n {
                    (f | DESC_F_NEXT, d[i + 1])
                } else {
                    (f, 0)
                };
                self.write_desc(d[i], a, l, flags, next);
            }
            chain.descs = d;
        }
        let head = chain.descs[0];
        self.publish(head, chain);
        Ok(head)
    }

    /// Reads the first `len` bytes the device wrote into a chain's writable segments.
    pub fn read_written(&self, chain: &Chain, len: u32) -> Result<Vec<u8>> {
        let total: u64 = chain.writable.iter().map(|&(_, l)| l as u64).sum();
        if len as u64 > total {
            bail!(
                "queue {}: used len {len} exceeds the {total} writable bytes posted",
                self.index
            );
        }
        let mut out = Vec::with_capacity(len as usize);
        let mut left = len as usize;
        for &(a, l) in &chain.writable {
            if left == 0 {
                break;
            }
            let n = left.min(l as usize);
            out.extend_from_slice(&self.mem.read(a, n));
            left -= n;
        }
        Ok(out)
    }
}

pub fn write_desc_at(mem: &GuestMem, at: u64, addr: u64, len: u32, flags: u16, next: u16) {
    let mut d = [0u8; 16];
    d[0..8].copy_from_slice(&addr.to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[12..14].copy_from_slice(&flags.to_le_bytes());
    d[14..16].copy_from_slice(&next.to_le_bytes());
    mem.write(at, &d);
}

fn poll_readable(fd: RawFd, timeout: Duration) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().clamp(1, i32::MAX as u128) as i32;
    // SAFETY: one valid pollfd.
    let r = unsafe { libc::poll(&mut p, 1, ms) };
    r > 0 && p.revents & libc::POLLIN != 0
}

// ---------------------------------------------------------------------------
// vhost-user frontend
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Order {
    /// SET_OWNER, GET/SET_FEATURES, GET/SET_PROTOCOL_FEATURES, SET_MEM_TABLE,
    /// vring setup, SET_VRING_ENABLE.
    Spec,
    /// QEMU 7.2: protocol features and SET_VRING_ENABLE before SET_FEATURES.
    Qemu72,
}

#[derive(Clone, Debug)]
pub struct Options {
    /// Virtio features the test requires (VERSION_1 and PROTOCOL_FEATURES are
    /// always added); connecting fails if the backend does not offer them.
    pub features: u64,
    pub queue_pairs: usize,
    pub queue_size: u16,
    pub order: Order,
    pub mem_size: usize,
    pub gpa_base: u64,
    /// Ack REPLY_ACK (if offered) and ask for replies to SET_* requests.
    pub reply_ack: bool,
    /// Ack LOG_SHMFD (if offered): dirty logging for migration.
    pub log_shmfd: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            features: 0,
            queue_pairs: 1,
            queue_size: 256,
            order: Order::Spec,
            mem_size: 64 << 20,
            gpa_base: 0x4000_0000,
            reply_ack: true,
            log_shmfd: false,
        }
    }
}

/// A received virtio-net packet.
#[derive(Debug)]
pub struct RxPacket {
    pub hdr: Vec<u8>,
    pub frame: Vec<u8>,
    /// Buffers the packet actually used.
    pub buffers: usize,
}

impl RxPacket {
    pub fn num_buffers(&self) -> u16 {
        u16::from_le_bytes([self.hdr[10], self.hdr[11]])
    }
}

pub struct TestFrontend {
    pub fe: Frontend,
    raw: UnixStream,
    pub mem: Arc<GuestMem>,
    pub opts: Options,
    pub offered: u64,
    pub acked: u64,
    pub protocol_offered: u64,
    pub protocol_acked: u64,
    pub backend_queues: u64,
    pub vqs: Vec<Vq>,
    err_fds: Vec<EventFd>,
    /// Hostile RX/TX chains the device returned through the used ring.
    pub hostile_returned: u64,
    /// Log of the requests sent, in order (for diagnostics).
    pub sent: Vec<String>,
}

impl TestFrontend {
    /// Connects to a listening backend at `path` and negotiates.
    pub fn connect(path: &Path, opts: Options) -> Result<TestFrontend> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    thread::sleep(Duration::from_millis(50));
                }
                Err(e) => return Err(e).context(format!("connect {}", path.display())),
            }
        };
        Self::from_stream(stream, opts)
    }

    /// Negotiates over an already-connected stream (e.g. accepted from a
    /// backend started with `--client`).
    pub fn from_stream(stream: UnixStream, opts: Options) -> Result<TestFrontend> {
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.set_write_timeout(Some(Duration::from_secs(10)))?;
        let raw = stream.try_clone()?;
        let nq = 2 * opts.queue_pairs;
        let fe = Frontend::from_stream(stream, nq as u64);
        let mem = GuestMem::new(opts.mem_size, opts.gpa_base)?;
        let event_idx = opts.features & F_EVENT_IDX != 0;
        let mut vqs = Vec::new();
        for i in 0..nq {
            vqs.push(Vq::new(&mem, i, opts.queue_size, event_idx)?);
        }
        let mut t = TestFrontend {
            fe,
            raw,
            mem,
            opts,
            offered: 0,
            acked: 0,
            protocol_offered: 0,
            protocol_acked: 0,
            backend_queues: nq as u64,
            vqs,
            err_fds: Vec::new(),
            hostile_returned: 0,
            sent: Vec::new(),
        };
        match t.opts.order {
            Order::Spec => t.negotiate_spec()?,
            Order::Qemu72 => t.negotiate_qemu72()?,
        }
        Ok(t)
    }

    fn wanted_features(&self) -> Result<u64> {
        let want = self.opts.features | F_VERSION_1 | F_PROTOCOL_FEATURES;
        let missing = want & !self.offered;
        if missing != 0 {
            bail!(
                "backend does not offer required features {missing:#x} (offered {:#x})",
                self.offered
            );
        }
        Ok(want)
    }

    fn wanted_protocol(&self) -> VhostUserProtocolFeatures {
        let mut want = VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::CONFIG;
        if self.opts.reply_ack {
            want |= VhostUserProtocolFeatures::REPLY_ACK;
        }
        if self.opts.log_shmfd {
            want |= VhostUserProtocolFeatures::LOG_SHMFD;
        }
        VhostUserProtocolFeatures::from_bits_truncate(want.bits() & self.protocol_offered)
    }

    fn replies(&self) -> bool {
        self.protocol_acked & VhostUserProtocolFeatures::REPLY_ACK.bits() != 0
    }

    /// Sets NEED_REPLY on the following requests if REPLY_ACK was acked.
    fn ask_replies(&self, on: bool) {
        if on && self.replies() {
            self.fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        } else {
            self.fe.set_hdr_flags(VhostUserHeaderFlag::empty());
        }
    }

    fn log(&mut self, what: impl Into<String>) {
        self.sent.push(what.into());
    }

    fn protocol_phase(&mut self) -> Result<()> {
        self.log("GET_PROTOCOL_FEATURES");
        self.protocol_offered = self
            .fe
            .get_protocol_features()
            .context("GET_PROTOCOL_FEATURES")?
            .bits();
        let want = self.wanted_protocol();
        self.log(format!("SET_PROTOCOL_FEATURES {:#x}", want.bits()));
        self.fe
            .set_protocol_features(want)
            .context("SET_PROTOCOL_FEATURES")?;
        self.protocol_acked = want.bits();
        if want.contains(VhostUserProtocolFeatures::MQ) {
            self.log("GET_QUEUE_NUM");
            self.backend_queues = self.fe.get_queue_num().context("GET_QUEUE_NUM")?;
            if self.backend_queues < self.vqs.len() as u64 {
                bail!(
                    "backend supports {} queues, test needs {}",
                    self.backend_queues,
                    self.vqs.len()
                );
            }
        } else if self.vqs.len() > 2 {
            bail!("multiqueue test but the backend does not offer the MQ protocol feature");
        }
        Ok(())
    }

    fn get_features(&mut self) -> Result<()> {
        self.log("GET_FEATURES");
        self.offered = self.fe.get_features().context("GET_FEATURES")?;
        Ok(())
    }

    fn set_features(&mut self) -> Result<()> {
        let want = self.wanted_features()?;
        self.log(format!("SET_FEATURES {want:#x}"));
        self.fe.set_features(want).context("SET_FEATURES")?;
        self.acked = want;
        Ok(())
    }

    fn set_mem_table(&mut self) -> Result<()> {
        self.log("SET_MEM_TABLE");
        self.ask_replies(true);
        let r = self.fe.set_mem_table(&[self.mem.region()]);
        self.ask_replies(false);
        r.context("SET_MEM_TABLE")?;
        Ok(())
    }

    fn setup_vring(&mut self, i: usize, qemu: bool) -> Result<()> {
        self.ask_replies(true);
        let r = (|| -> Result<()> {
            let vq = &self.vqs[i];
            self.fe.set_vring_num(i, vq.size).context("SET_VRING_NUM")?;
            if qemu {
                self.fe.set_vring_base(i, 0).context("SET_VRING_BASE")?;
                self.fe
                    .set_vring_addr(i, &vq.config())
                    .context("SET_VRING_ADDR")?;
                self.fe
                    .set_vring_kick(i, &vq.kick)
                    .context("SET_VRING_KICK")?;
                self.fe
                    .set_vring_call(i, &vq.call)
                    .context("SET_VRING_CALL")?;
            } else {
                self.fe
                    .set_vring_addr(i, &vq.config())
                    .context("SET_VRING_ADDR")?;
                self.fe.set_vring_base(i, 0).context("SET_VRING_BASE")?;
                self.fe
                    .set_vring_call(i, &vq.call)
                    .context("SET_VRING_CALL")?;
                self.fe
                    .set_vring_kick(i, &vq.kick)
                    .context("SET_VRING_KICK")?;
            }
            Ok(())
        })();
        self.ask_replies(false);
        self.log(format!("vring {i} setup"));
        r.with_context(|| format!("vring {i}"))
    }

    fn negotiate_spec(&mut self) -> Result<()> {
        self.log("SET_OWNER");
        self.fe.set_owner().context("SET_OWNER")?;
        self.get_features()?;
        self.set_features()?;
        self.protocol_phase()?;
        self.set_mem_table()?;
        for i in 0..self.vqs.len() {
            self.setup_vring(i, false)?;
        }
        for i in 0..self.vqs.len() {
            self.log(format!("SET_VRING_ENABLE {i} 1"));
            self.fe
                .set_vring_enable(i, true)
                .with_context(|| format!("SET_VRING_ENABLE {i}"))?;
        }
        Ok(())
    }

    fn negotiate_qemu72(&mut self) -> Result<()> {
        self.get_features()?;
        if self.offered & F_PROTOCOL_FEATURES == 0 {
            bail!("backend does not offer VHOST_USER_F_PROTOCOL_FEATURES");
        }
        self.protocol_phase()?;
        self.log("SET_OWNER");
        self.fe.set_owner().context("SET_OWNER")?;
        // Early SET_VRING_CALL/ERR with placeholder eventfds (QEMU's masked
        // notifiers); the real call fds follow at start.
        for i in 0..self.vqs.len() {
            let placeholder = EventFd::new(EFD_NONBLOCK)?;
            let err = EventFd::new(EFD_NONBLOCK)?;
            self.log(format!("SET_VRING_CALL {i} (placeholder)"));
            self.fe
                .set_vring_call(i, &placeholder)
                .context("early SET_VRING_CALL")?;
            self.log(format!("SET_VRING_ERR {i}"));
            self.fe.set_vring_err(i, &err).context("SET_VRING_ERR")?;
            self.err_fds.push(placeholder);
            self.err_fds.push(err);
        }
        // SET_VRING_ENABLE before SET_FEATURES, several times, ending enabled.
        for _ in 0..2 {
            for enable in [false, true] {
                for i in 0..self.vqs.len() {
                    self.raw_set_vring_enable(i as u32, enable, false)?;
                }
            }
        }
        self.set_features()?;
        self.set_mem_table()?;
        for i in 0..self.vqs.len() {
            self.setup_vring(i, true)?;
        }
        Ok(())
    }

    /// Sends a raw vhost-user request (header + body + fds) on the socket,
    /// bypassing the crate's state checks; with `need_reply` reads the u64 ack.
    pub fn raw_request(
        &mut self,
        request: u32,
        body: &[u8],
        fds: &[RawFd],
        need_reply: bool,
    ) -> Result<Option<u64>> {
        let mut flags = VHOST_USER_VERSION;
        if need_reply {
            flags |= VHOST_USER_NEED_REPLY;
        }
        let mut msg = Vec::with_capacity(12 + body.len());
        msg.extend_from_slice(&request.to_le_bytes());
        msg.extend_from_slice(&flags.to_le_bytes());
        msg.extend_from_slice(&(body.len() as u32).to_le_bytes());
        msg.extend_from_slice(body);
        let n = self
            .raw
            .send_with_fds(&[&msg[..]], fds)
            .with_context(|| format!("send raw request {request}"))?;
        if n != msg.len() {
            bail!("short write of raw request {request}: {n} of {}", msg.len());
        }
        if !need_reply {
            return Ok(None);
        }
        let mut reply = [0u8; 20];
        self.raw
            .read_exact(&mut reply)
            .with_context(|| format!("reply to raw request {request}"))?;
        let code = u32::from_le_bytes(reply[0..4].try_into().unwrap());
        let rflags = u32::from_le_bytes(reply[4..8].try_into().unwrap());
        let size = u32::from_le_bytes(reply[8..12].try_into().unwrap());
        if code != request || rflags & VHOST_USER_REPLY == 0 || size != 8 {
            bail!("bad reply to raw request {request}: code {code} flags {rflags:#x} size {size}");
        }
        Ok(Some(u64::from_le_bytes(reply[12..20].try_into().unwrap())))
    }

    /// SET_VRING_ENABLE as a raw message (allowed before SET_FEATURES).
    pub fn raw_set_vring_enable(
        &mut self,
        ring: u32,
        enable: bool,
        need_reply: bool,
    ) -> Result<()> {
        self.log(format!("SET_VRING_ENABLE {ring} {} (raw)", enable as u32));
        let mut body = Vec::new();
        body.extend_from_slice(&ring.to_le_bytes());
        body.extend_from_slice(&(enable as u32).to_le_bytes());
        let need_reply = need_reply && self.replies();
        if let Some(v) = self.raw_request(VHOST_USER_SET_VRING_ENABLE, &body, &[], need_reply)? {
            if v != 0 {
                bail!("SET_VRING_ENABLE {ring} {enable} nacked with {v}");
            }
        }
        Ok(())
    }

    /// GET_VRING_BASE (stops the ring in the backend); returns the next avail index.
    pub fn get_vring_base(&mut self, ring: usize) -> Result<u32> {
        self.ask_replies(false);
        self.log(format!("GET_VRING_BASE {ring}"));
        Ok(self.fe.get_vring_base(ring)?)
    }

    pub fn mrg(&self) -> bool {
        self.acked & F_MRG_RXBUF != 0
    }

    pub fn rxq(&mut self, pair: usize) -> &mut Vq {
        &mut self.vqs[2 * pair]
    }

    pub fn txq(&mut self, pair: usize) -> &mut Vq {
        &mut self.vqs[2 * pair + 1]
    }

    /// Posts RX buffers with `layout` (segment sizes) until `count` are posted
    /// or the ring is full; remembers the layout for refills. Notifies.
    pub fn post_rx(
        &mut self,
        pair: usize,
        layout: &[u32],
        indirect: bool,
        count: usize,
    ) -> Result<usize> {
        let vq = self.rxq(pair);
        vq.rx_layout = Some((layout.to_vec(), indirect));
        let need = if indirect { 1 } else { layout.len() };
        let segs: Vec<Seg> = layout.iter().map(|&l| Seg::In(l)).collect();
        let mut n = 0;
        while n < count && vq.num_free() >= need {
            vq.add_chain(&segs, indirect)?;
            n += 1;
        }
        vq.notify();
        Ok(n)
    }

    pub fn fill_rx(&mut self, pair: usize, layout: &[u32], indirect: bool) -> Result<usize> {
        self.post_rx(pair, layout, indirect, usize::MAX)
    }

    fn refill_rx(&mut self, pair: usize) -> Result<()> {
        let vq = self.rxq(pair);
        if let Some((layout, indirect)) = vq.rx_layout.clone() {
            let need = if indirect { 1 } else { layout.len() };
            let segs: Vec<Seg> = layout.iter().map(|&l| Seg::In(l)).collect();
            while vq.num_free() >= need {
                vq.add_chain(&segs, indirect)?;
            }
            vq.notify();
        }
        Ok(())
    }

    /// Next used RX buffer that is not a returned hostile chain: (chain, data).
    fn next_rx_buffer(&mut self, pair: usize, timeout: Duration) -> Result<(u32, Vec<u8>)> {
        loop {
            let vq = &mut self.vqs[2 * pair];
            let (id, len) = vq.wait_used(timeout)?;
            let chain = vq.take(id)?;
            if chain.hostile {
                eprintln!(
                    "frontend: RX ring {} returned hostile chain {id} with used len {len}",
                    vq.index
                );
                vq.release(chain);
                self.hostile_returned += 1;
                continue;
            }
            let data = vq.read_written(&chain, len);
            vq.release(chain);
            return Ok((len, data?));
        }
    }

    /// Receives one packet from RX queue `pair`, merging buffers when
    /// MRG_RXBUF was negotiated; refills the ring with the last layout.
    pub fn recv(&mut self, pair: usize, timeout: Duration) -> Result<RxPacket> {
        let (len, mut data) = self.next_rx_buffer(pair, timeout)?;
        if (len as usize) < NET_HDR_LEN {
            bail!("RX used length {len} is shorter than the virtio-net header");
        }
        let mut buffers = 1;
        if self.mrg() {
            let num = u16::from_le_bytes([data[10], data[11]]);
            if num == 0 {
                bail!("RX num_buffers is 0");
            }
            while buffers < num as usize {
                let (_, more) = self.next_rx_buffer(pair, timeout).with_context(|| {
                    format!("buffer {} of {num} of a merged packet", buffers + 1)
                })?;
                data.extend_from_slice(&more);
                buffers += 1;
            }
        }
        self.refill_rx(pair)?;
        let frame = data.split_off(NET_HDR_LEN);
        Ok(RxPacket {
            hdr: data,
            frame,
            buffers,
        })
    }

    /// Takes back completed TX chains; returns how many.
    pub fn reap_tx(&mut self, pair: usize) -> Result<usize> {
        let mut n = 0;
        loop {
            let vq = &mut self.vqs[2 * pair + 1];
            let Some((id, len)) = vq.poll_used() else {
                break;
            };
            let _ = len;
            let chain = vq.take(id)?;
            if chain.hostile {
                self.hostile_returned += 1;
            }
            vq.release(chain);
            n += 1;
        }
        Ok(n)
    }

    /// Queues `hdr ++ frame` on TX queue `pair`, split into segments of the
    /// sizes in `split` (the rest goes into a last segment), and notifies.
    pub fn send(
        &mut self,
        pair: usize,
        hdr: &[u8],
        frame: &[u8],
        split: &[usize],
        indirect: bool,
        timeout: Duration,
    ) -> Result<u16> {
        let mut all = Vec::with_capacity(hdr.len() + frame.len());
        all.extend_from_slice(hdr);
        all.extend_from_slice(frame);
        let mut segs = Vec::new();
        let mut rest = &all[..];
        for &s in split {
            if s == 0 || s >= rest.len() {
                continue;
            }
            let (a, b) = rest.split_at(s);
            segs.push(Seg::Out(a.to_vec()));
            rest = b;
        }
        segs.push(Seg::Out(rest.to_vec()));
        let need = if indirect { 1 } else { segs.len() };
        self.reap_tx(pair)?;
        let deadline = Instant::now() + timeout;
        while self.txq(pair).num_free() < need {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("TX ring {pair} stayed full for {timeout:?}");
            }
            let vq = self.txq(pair);
            let (id, _) = vq.wait_used(left).context("waiting for TX completions")?;
            let chain = vq.take(id)?;
            let hostile = chain.hostile;
            vq.release(chain);
            if hostile {
                self.hostile_returned += 1;
            }
        }
        let vq = self.txq(pair);
        let head = vq.add_chain(&segs, indirect)?;
        vq.notify();
        Ok(head)
    }

    /// Sends a plain frame with an all-zero header in one segment.
    pub fn send_frame(&mut self, pair: usize, frame: &[u8]) -> Result<u16> {
        self.send(
            pair,
            &[0u8; NET_HDR_LEN],
            frame,
            &[],
            false,
            Duration::from_secs(10),
        )
    }

    /// Waits until every well-formed TX chain came back.
    pub fn flush_tx(&mut self, pair: usize, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            self.reap_tx(pair)?;
            let pending = self
                .txq(pair)
                .inflight
                .values()
                .filter(|c| !c.hostile)
                .count();
            if pending == 0 {
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("{pending} TX chains never completed on pair {pair}");
            }
            let vq = self.txq(pair);
            let (id, _) = vq.wait_used(left).context("flush_tx")?;
            let chain = vq.take(id)?;
            let hostile = chain.hostile;
            vq.release(chain);
            if hostile {
                self.hostile_returned += 1;
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Host side: AF_PACKET socket inside a namespace
// ---------------------------------------------------------------------------

/// A raw packet socket bound to one interface of a network namespace.
pub struct PacketPort {
    fd: OwnedFd,
    pub ifname: String,
}

const ETH_P_ALL: u16 = 0x0003;
const PACKET_OUTGOING: u8 = 4;

impl PacketPort {
    /// Opens the socket from a helper thread that joins namespace `ns`
    /// (`ip netns` name); the socket stays in that namespace.
    pub fn open(ns: &str, ifname: &str) -> Result<PacketPort> {
        let ns_path = format!("/var/run/netns/{ns}");
        let name = ifname.to_string();
        let fd = thread::spawn(move || -> Result<OwnedFd> {
            let nsf = File::open(&ns_path).with_context(|| format!("open {ns_path}"))?;
            // SAFETY: setns on this (short-lived) thread only.
            if unsafe { libc::setns(nsf.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                bail!("setns {ns_path}: {}", std::io::Error::last_os_error());
            }
            let cname = CString::new(name.clone())?;
            // SAFETY: valid C string.
            let idx = unsafe { libc::if_nametoindex(cname.as_ptr()) };
            if idx == 0 {
                bail!("no interface {name} in {ns_path}");
            }
            // SAFETY: plain socket creation; result checked.
            let raw = unsafe {
                libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                    ETH_P_ALL.to_be() as i32,
                )
            };
            if raw < 0 {
                bail!("socket(AF_PACKET): {}", std::io::Error::last_os_error());
            }
            // SAFETY: fresh fd we own.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            for opt in [libc::SO_RCVBUFFORCE, libc::SO_SNDBUFFORCE] {
                let v: libc::c_int = 16 << 20;
                // SAFETY: valid option value pointer and length.
                unsafe {
                    libc::setsockopt(
                        fd.as_raw_fd(),
                        libc::SOL_SOCKET,
                        opt,
                        &v as *const _ as *const libc::c_void,
                        std::mem::size_of::<libc::c_int>() as u32,
                    )
                };
            }
            // SAFETY: zeroed sockaddr_ll is valid.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = ETH_P_ALL.to_be();
            sll.sll_ifindex = idx as i32;
            // SAFETY: valid sockaddr_ll.
            let r = unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    &sll as *const _ as *const libc::sockaddr,
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            if r != 0 {
                bail!(
                    "bind AF_PACKET to {name}: {}",
                    std::io::Error::last_os_error()
                );
            }
            Ok(fd)
        })
        .join()
        .map_err(|_| anyhow!("packet socket thread panicked"))??;
        let port = PacketPort {
            fd,
            ifname: ifname.to_string(),
        };
        while port.recv(Duration::from_millis(1)).is_some() {}
        Ok(port)
    }

    /// Injects a frame: it leaves the interface, i.e. the backend reads it from the TAP.
    pub fn send(&self, frame: &[u8]) -> Result<()> {
        // SAFETY: valid buffer.
        let n = unsafe {
            libc::send(
                self.fd.as_raw_fd(),
                frame.as_ptr() as *const libc::c_void,
                frame.len(),
                0,
            )
        };
        if n < 0 {
            bail!("AF_PACKET send: {}", std::io::Error::last_os_error());
        }
        if n as usize != frame.len() {
            bail!("AF_PACKET short send {n} of {}", frame.len());
        }
        Ok(())
    }

    /// Next frame *received* by the interface (written to the TAP by the
    /// backend); frames the interface transmits are skipped.
    pub fn recv(&self, timeout: Duration) -> Option<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if !poll_readable(self.fd.as_raw_fd(), left) {
                return None;
            }
            // SAFETY: zeroed sockaddr_ll is valid.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut slen = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            // SAFETY: valid buffers and lengths.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len(),
                    libc::MSG_DONTWAIT,
                    &mut sll as *mut _ as *mut libc::sockaddr,
                    &mut slen,
                )
            };
            if n < 0 {
                continue;
            }
            if sll.sll_pkttype == PACKET_OUTGOING {
                continue;
            }
            return Some(buf[..n as usize].to_vec());
        }
    }
}
