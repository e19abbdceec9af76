//! Data-path tests that drive a [`QueuePair`] through real split rings in
//! test memory, with a SOCK_SEQPACKET socket pair standing in for the tap
//! (it keeps frame boundaries like a tap does; the real tap is exercised by
//! the integration tests).

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

use crate::GuestMemory;
use vhost_user_backend::VringT;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{VIRTIO_NET_F_CSUM, VIRTIO_NET_F_MRG_RXBUF};
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryAtomic};

use super::rx::RxStop;
use super::vnet_hdr::Negotiated;
use super::QueuePair;
use crate::metrics::QueueMetrics;

const MEM_SIZE: u64 = 0x40_0000;
const QSIZE: u16 = 64;
const WRITE: u16 = VRING_DESC_F_WRITE as u16;
const NEXT: u16 = VRING_DESC_F_NEXT as u16;
const INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;

/// A minimal split-ring driver (the guest side).
struct Driver {
    mem: GuestMemory,
    desc: u64,
    avail: u64,
    used: u64,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

impl Driver {
    fn new(mem: &GuestMemory, base: u64) -> Self {
        Driver {
            mem: mem.clone(),
            desc: base,
            avail: base + 16 * u64::from(QSIZE),
            used: base + 0x1000,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
        }
    }

    fn write_desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = GuestAddress(self.desc + 16 * u64::from(index));
        self.mem.write_obj(addr, at).unwrap();
        self.mem.write_obj(len, at.unchecked_add(8)).unwrap();
        self.mem.write_obj(flags, at.unchecked_add(12)).unwrap();
        self.mem.write_obj(next, at.unchecked_add(14)).unwrap();
    }

    /// Posts a chain of (addr, len, flags); NEXT links are added. Returns the head.
    fn post(&mut self, bufs: &[(u64, u32, u16)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, flags)) in bufs.iter().enumerate() {
            let index = (head + i as u16) % QSIZE;
            let last = i + 1 == bufs.len();
            let flags = if last { flags } else { flags | NEXT };
            self.write_desc(index, addr, len, flags, (index + 1) % QSIZE);
        }
        self.next_desc = (head + bufs.len() as u16) % QSIZE;
        self.post_head(head);
        head
    }

    /// Puts a raw head index in the avail ring.
    fn post_head(&mut self, head: u16) {
        let slot = GuestAddress(self.avail + 4 + 2 * u64::from(self.avail_idx % QSIZE));
        self.mem.write_obj(head, slot).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx, GuestAddress(self.avail + 2))
            .unwrap();
    }

    /// New used entries (id, len).
    fn take_used(&mut self) -> Vec<(u32, u32)> {
        let idx: u16 = self.mem.read_obj(GuestAddress(self.used + 2)).unwrap();
        let mut out = Vec::new();
        while self.used_seen != idx {
            let at = GuestAddress(self.used + 4 + 8 * u64::from(self.used_seen % QSIZE));
            let id: u32 = self.mem.read_obj(at).unwrap();
            let len: u32 = self.mem.read_obj(at.unchecked_add(4)).unwrap();
            out.push((id, len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }

    fn vring(&self, atomic: &GuestMemoryAtomic<GuestMemory>) -> super::Vring {
        let vring = <super::Vring as VringT<_>>::new(atomic.clone(), QSIZE).unwrap();
        vring.set_queue_size(QSIZE);
        vring
            .set_queue_info(self.desc, self.avail, self.used)
            .unwrap();
        vring.set_queue_ready(true);
        vring.set_enabled(true);
        vring
    }
}

struct Harness {
    mem: GuestMemory,
    rx: Driver,
    tx: Driver,
    pair: QueuePair,
    /// The "network" end of the fake tap.
    peer: OwnedFd,
    _tap: OwnedFd,
    metrics: Arc<QueueMetrics>,
}

fn seqpacket_pair() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two new descriptors into `fds`, owned below.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(r, 0);
    use std::os::fd::FromRawFd;
    // SAFETY: both descriptors were just created and are owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

impl Harness {
    fn new(features: u64) -> Self {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
        let atomic = GuestMemoryAtomic::new(mem.clone());
        let rx = Driver::new(&mem, 0x0);
        let tx = Driver::new(&mem, 0x4000);
        let (tap, peer) = seqpacket_pair();
        let metrics = Arc::new(QueueMetrics::default());
        let mut pair = QueuePair::new(0, tap.as_raw_fd(), metrics.clone(), None);
        pair.negotiated = Negotiated::from_features(features);
        pair.vrings = Some((rx.vring(&atomic), tx.vring(&atomic)));
        Harness {
            mem,
            rx,
            tx,
            pair,
            peer,
            _tap: tap,
            metrics,
        }
    }

    fn send_from_network(&self, packet: &[u8]) {
        // SAFETY: writes from a live slice to a socket we own.
        let n = unsafe { libc::write(self.peer.as_raw_fd(), packet.as_ptr().cast(), packet.len()) };
        assert_eq!(n, packet.len() as isize);
    }

    fn recv_on_network(&self) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 70_000];
        // SAFETY: reads into a live buffer of the given size.
        let n = unsafe { libc::read(self.peer.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return None;
        }
        buf.truncate(n as usize);
        Some(buf)
    }

    fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }

    fn write(&self, addr: u64, data: &[u8]) {
        self.mem.write_slice(data, GuestAddress(addr)).unwrap();
    }

    fn process_rx(&mut self) -> RxStop {
        self.pair.process_rx(&self.mem, 1)
    }

    fn process_tx(&mut self) {
        self.pair.process_tx(&self.mem)
    }

    fn counter(&self, name: &str) -> u64 {
        self.metrics
            .snapshot()
            .into_iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v)
            .unwrap()
    }
}

const V1: u64 = 1 << VIRTIO_F_VERSION_1;
const MRG: u64 = 1 << VIRTIO_NET_F_MRG_RXBUF;

fn packet(frame_len: usize, seed: u8) -> Vec<u8> {
    let mut p = vec![0u8; 12];
    p.extend((0..frame_len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)));
    p
}

#[test]
fn tx_frame_reaches_the_tap_byte_for_byte_and_chain_is_returned() {
    let mut h = Harness::new(V1 | MRG);
    let p = packet(1000, 7);
    h.write(0x10_0000, &p[..12]);
    h.write(0x20_0000, &p[12..]);
    let head = h.tx.post(&[(0x10_0000, 12, 0), (0x20_0000, 1000, 0)]);
    h.process_tx();
    assert_eq!(h.recv_on_network().unwrap(), p);
    assert_eq!(h.tx.take_used(), vec![(u32::from(head), 0)]);
    assert_eq!(h.counter("tx_packets"), 1);
    assert_eq!(h.counter("tx_bytes"), 1000);
}

#[test]
fn tx_hostile_chains_are_counted_dropped_and_returned() {
    let mut h = Harness::new(V1 | MRG);
    h.write(0x10_0000, &packet(100, 1));
    // Writable buffer on TX.
    h.tx.post(&[(0x10_0000, 112, WRITE)]);
    // Short header.
    h.tx.post(&[(0x10_0000, 8, 0)]);
    // Outside guest memory, and an overflowing address.
    h.tx.post(&[(MEM_SIZE - 16, 112, 0)]);
    h.tx.post(&[(u64::MAX - 10, 112, 0)]);
    // Larger than 64 KiB + header: two big descriptors.
    h.tx.post(&[(0x10_0000, 40_000, 0), (0x20_0000, 40_000, 0)]);
    // GSO without HOST_TSO negotiated.
    h.write(0x30_0000, &[1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    h.tx.post(&[(0x30_0000, 112, 0)]);
    // A head index outside the queue.
    h.tx.post_head(QSIZE + 5);
    h.process_tx();
    assert!(h.recv_on_network().is_none(), "nothing may reach the tap");
    assert_eq!(h.tx.take_used().len(), 6);
    assert_eq!(h.counter("tx_drop_writable_buffer"), 1);
    assert_eq!(h.counter("tx_drop_short_header"), 1);
    assert_eq!(h.counter("tx_drop_bad_address"), 2);
    assert_eq!(h.counter("tx_drop_too_large"), 1);
    assert_eq!(h.counter("tx_drop_bad_gso"), 1);
    assert_eq!(
        h.counter("tx_drop_bad_chain") + h.counter("bad_head_index"),
        2
    );
    // The ring still works.
    let p = packet(60, 3);
    h.write(0x10_0000, &p);
    h.tx.post(&[(0x10_0000, p.len() as u32, 0)]);
    h.process_tx();
    assert_eq!(h.recv_on_network().unwrap(), p);
}

#[test]
fn tx_descriptor_loop_is_refused() {
    let mut h = Harness::new(V1 | MRG);
    h.write(0x10_0000, &packet(100, 1));
    h.tx.write_desc(0, 0x10_0000, 50, NEXT, 1);
    h.tx.write_desc(1, 0x10_0000, 50, NEXT, 0);
    h.tx.post_head(0);
    h.process_tx();
    assert!(h.recv_on_network().is_none());
    assert_eq!(h.counter("tx_drop_bad_chain"), 1);
    assert_eq!(h.tx.take_used(), vec![(0, 0)]);
}

#[test]
fn tx_checksum_offload_needs_negotiation() {
    let mut h = Harness::new(V1 | MRG | (1 << VIRTIO_NET_F_CSUM));
    let mut p = packet(100, 9);
    p[0] = 1; // NEEDS_CSUM
    h.write(0x10_0000, &p);
    h.tx.post(&[(0x10_0000, p.len() as u32, 0)]);
    h.process_tx();
    assert_eq!(h.recv_on_network().unwrap(), p);
}

#[test]
fn rx_mergeable_frame_spans_buffers_with_num_buffers() {
    let mut h = Harness::new(V1 | MRG);
    // Forty 2 KiB buffers: room for a maximum (64 KiB) frame, so the frame
    // is read straight into guest memory.
    let heads: Vec<u16> = (0..40)
        .map(|i| h.rx.post(&[(0x10_0000 + i * 0x1000, 2048, WRITE)]))
        .collect();
    let mut p = packet(5000, 5);
    p[10] = 0xee; // num_buffers must be overwritten
    h.send_from_network(&p);
    assert_eq!(h.process_rx(), RxStop::TapEmpty);
    let used = h.rx.take_used();
    assert_eq!(
        used,
        vec![
            (u32::from(heads[0]), 2048),
            (u32::from(heads[1]), 2048),
            (u32::from(heads[2]), 5012 - 4096)
        ]
    );
    let mut got = Vec::new();
    for (i, &(_, len)) in used.iter().enumerate() {
        got.extend(h.read(0x10_0000 + i as u64 * 0x1000, len as usize));
    }
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 3);
    got[10] = p[10];
    got[11] = p[11];
    assert_eq!(got, p);
    assert_eq!(h.counter("rx_packets"), 1);
    assert_eq!(h.counter("rx_bytes"), 5000);
    assert_eq!(h.counter("rx_bounced"), 0);
    // Remaining held buffers serve the next frame, in ring order.
    let q = packet(100, 8);
    h.send_from_network(&q);
    h.process_rx();
    assert_eq!(h.rx.take_used(), vec![(u32::from(heads[3]), 112)]);
    assert_eq!(&h.read(0x10_3000 + 12, 100), &q[12..]);
}

#[test]
fn rx_without_buffers_applies_backpressure_then_delivers() {
    let mut h = Harness::new(V1 | MRG);
    let p = packet(200, 2);
    h.send_from_network(&p);
    assert_eq!(h.process_rx(), RxStop::NoBuffers);
    assert_eq!(h.counter("rx_no_buffer"), 1);
    for i in 0..8 {
        h.rx.post(&[(0x10_0000 + i * 0x1000, 2048, WRITE)]);
    }
    assert_eq!(h.process_rx(), RxStop::TapEmpty);
    assert_eq!(h.rx.take_used().len(), 1);
    assert_eq!(&h.read(0x10_0000 + 12, 200), &p[12..]);
    assert_eq!(h.counter("rx_drop_frame_too_large"), 0);
}

#[test]
fn rx_small_posting_goes_through_the_bounce_buffer() {
    let mut h = Harness::new(V1 | MRG);
    // 1 KiB posted, less than a maximum frame: small frames still flow.
    h.rx.post(&[(0x10_0000, 1024, WRITE)]);
    let p = packet(300, 4);
    h.send_from_network(&p);
    h.process_rx();
    assert_eq!(h.rx.take_used().len(), 1);
    assert_eq!(h.read(0x10_0000 + 12, 300), &p[12..]);
    assert_eq!(h.counter("rx_bounced"), 1);
    // A frame larger than what is posted waits for more buffers.
    let big = packet(3000, 6);
    h.send_from_network(&big);
    h.rx.post(&[(0x11_0000, 1024, WRITE)]);
    assert_eq!(h.process_rx(), RxStop::NoBuffers);
    assert!(h.rx.take_used().is_empty());
    h.rx.post(&[(0x12_0000, 1024, WRITE)]);
    h.rx.post(&[(0x13_0000, 1024, WRITE)]);
    h.process_rx();
    assert_eq!(h.rx.take_used().len(), 3);
    assert_eq!(h.read(0x11_0000 + 12, 1012), &big[12..1024]);
    assert_eq!(h.read(0x13_0000, 3012 - 2048), &big[2048..]);
}

#[test]
fn rx_non_mergeable_drops_frames_larger_than_one_buffer() {
    let mut h = Harness::new(V1);
    h.rx.post(&[(0x10_0000, 1000, WRITE)]);
    h.rx.post(&[(0x11_0000, 1000, WRITE)]);
    h.send_from_network(&packet(2000, 1));
    let p = packet(500, 2);
    h.send_from_network(&p);
    h.process_rx();
    assert_eq!(h.counter("rx_drop_frame_too_large"), 1);
    let used = h.rx.take_used();
    assert_eq!(used.len(), 1);
    let got = h.read(0x10_0000, 512);
    // num_buffers is 1 without MRG_RXBUF (virtio 1.x).
    assert_eq!(&got[10..12], &[1, 0]);
    assert_eq!(&got[12..], &p[12..]);
}

#[test]
fn rx_buffers_shorter_than_the_header_are_refused() {
    for features in [V1, V1 | MRG] {
        let mut h = Harness::new(features);
        h.rx.post(&[(0x10_0000, 6, WRITE)]);
        for i in 0..8 {
            h.rx.post(&[(0x20_0000 + i * 0x1000, 2048, WRITE)]);
        }
        let p = packet(100, 3);
        h.send_from_network(&p);
        h.process_rx();
        let used = h.rx.take_used();
        assert_eq!(used[0], (0, 0));
        assert_eq!(used.len(), 2);
        assert_eq!(h.counter("rx_drop_bad_chain"), 1);
        assert_eq!(&h.read(0x20_0000 + 12, 100), &p[12..]);
    }
}

#[test]
fn rx_hostile_buffers_are_counted_and_returned() {
    let mut h = Harness::new(V1 | MRG);
    h.rx.post(&[(0x10_0000, 2048, 0)]); // read-only
    h.rx.post(&[(MEM_SIZE - 100, 2048, WRITE)]); // outside memory
    h.rx.post(&[(MEM_SIZE + 0x1000, 0x100, INDIRECT)]); // indirect table outside memory
    for i in 0..8 {
        h.rx.post(&[(0x20_0000 + i * 0x1000, 2048, WRITE)]);
    }
    let p = packet(100, 1);
    h.send_from_network(&p);
    h.process_rx();
    let used = h.rx.take_used();
    assert_eq!(
        used[..3].iter().map(|u| u.1).collect::<Vec<_>>(),
        vec![0, 0, 0]
    );
    assert_eq!(used.len(), 4);
    assert_eq!(h.counter("rx_drop_readonly_buffer"), 1);
    assert_eq!(h.counter("rx_drop_bad_address"), 1);
    assert_eq!(h.counter("rx_drop_bad_chain"), 1);
    assert_eq!(h.read(0x20_0000 + 12, 100), &p[12..]);
}

#[test]
fn stopping_the_ring_hands_held_buffers_back() {
    let mut h = Harness::new(V1 | MRG);
    for i in 0..8 {
        h.rx.post(&[(0x10_0000 + i * 0x1000, 2048, WRITE)]);
    }
    h.send_from_network(&packet(100, 1));
    h.process_rx();
    assert_eq!(h.rx.take_used().len(), 1);
    let (rx, _) = h.pair.vrings.clone().unwrap();
    // It holds enough buffers for a maximum frame (9000-byte MTU here).
    assert!(rx.queue_next_avail() > 1);
    assert_eq!(
        usize::from(rx.queue_next_avail()) - 1,
        h.pair.rx.held_chains()
    );
    h.pair.rx.return_held_chains(rx.get_mut().get_queue_mut());
    // Only the one used chain counts as consumed.
    assert_eq!(rx.queue_next_avail(), 1);
}

#[test]
fn random_descriptors_never_escape_guest_memory() {
    // A tiny deterministic generator; no panics and every valid head returned.
    let mut state = 0x1234_5678_9abc_def0u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for round in 0..200 {
        let mut h = Harness::new(if round % 2 == 0 { V1 | MRG } else { V1 });
        for i in 0..QSIZE {
            let r = next();
            let addr = match r % 4 {
                0 => r >> 8,
                1 => MEM_SIZE - (r >> 40) % 4096,
                _ => 0x10_0000 + (r >> 20) % 0x20_0000,
            };
            let flags = (next() % 8) as u16;
            h.rx.write_desc(
                i,
                addr,
                (next() % 70_000) as u32,
                flags,
                (next() % 80) as u16,
            );
            h.tx.write_desc(
                i,
                addr,
                (next() % 70_000) as u32,
                flags & !WRITE,
                (next() % 80) as u16,
            );
        }
        for _ in 0..QSIZE {
            h.rx.post_head((next() % 70) as u16);
            h.tx.post_head((next() % 70) as u16);
        }
        h.send_from_network(&packet(64, 1));
        h.process_rx();
        h.process_tx();
        while h.recv_on_network().is_some() {}
    }
}

#[test]
fn rx_batches_and_notifications_are_counted() {
    let mut h = Harness::new(V1 | MRG);
    // Forty 2 KiB buffers: room for a maximum frame, so frames go straight in.
    for i in 0..40 {
        h.rx.post(&[(0x10_0000 + i * 0x1000, 2048, WRITE)]);
    }
    // Three frames in one pass: one batch, one interrupt (no EVENT_IDX and
    // the ring flags ask for interrupts).
    for seed in 0..3 {
        h.send_from_network(&packet(100, seed));
    }
    assert_eq!(h.process_rx(), RxStop::TapEmpty);
    assert_eq!(h.counter("rx_packets"), 3);
    assert_eq!(h.counter("rx_batches"), 1);
    assert_eq!(h.counter("rx_notifications"), 1);
    // VRING_AVAIL_F_NO_INTERRUPT: the next batch is counted, its interrupt
    // is not sent.
    h.write(h.rx.avail, &1u16.to_le_bytes());
    h.send_from_network(&packet(100, 9));
    h.process_rx();
    assert_eq!(h.counter("rx_batches"), 2);
    assert_eq!(h.counter("rx_notifications"), 1);
    // A pass that finds the tap empty publishes nothing: no batch.
    h.process_rx();
    assert_eq!(h.counter("rx_batches"), 2);
}

#[test]
fn an_avail_index_more_than_a_ring_ahead_is_counted_not_spun_on() {
    // A driver that publishes more buffers than the ring holds: virtio-queue
    // refuses to iterate, while "new buffers" stays true. Both directions
    // must give up on the ring (they spun before), and say so.
    let mut h = Harness::new(V1 | MRG);
    for i in 0..70 {
        h.rx.post(&[(0x10_0000 + (i % 64) * 0x1000, 2048, WRITE)]);
        h.tx.post(&[(0x20_0000 + (i % 64) * 0x100, 0x100, 0)]);
    }
    h.send_from_network(&packet(100, 1));
    // On its own thread, so that a spin fails the test instead of hanging it.
    let (done, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let stop = h.process_rx();
        h.process_tx();
        done.send((stop, h)).unwrap();
    });
    let (stop, h) = rx
        .recv_timeout(std::time::Duration::from_secs(10))
        .expect("the data path spins on a broken avail index");
    assert_eq!(stop, RxStop::NotRunning);
    assert_eq!(h.counter("bad_avail_index"), 2);
    assert_eq!(h.counter("rx_packets"), 0);
    assert_eq!(h.counter("tx_packets"), 0);
}
