//! One clock for the whole data path, and the per-packet hook points.
//!
//! The ACK offload and the delay attribution plug in through
//! [`DataPathHook`]: one call per packet after it is published in the guest's
//! used ring (RX) and after it is written to the host port (TX), each with
//! the CLOCK_MONOTONIC nanosecond timestamps of the design
//! (`docs: delay-attribution.md`). When no hook is installed the data path
//! takes no timestamps at all.

use crate::GuestMemory;

use crate::net::chain::Segment;
use crate::net::copy_from_segments;

/// CLOCK_MONOTONIC in nanoseconds.
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the live local `ts`.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .wrapping_mul(1_000_000_000)
        .wrapping_add(ts.tv_nsec as u64)
}

/// The wall clock minus CLOCK_MONOTONIC, in ns: what turns [`now_ns`]
/// stamps into times since the epoch. The two clocks are read back to back,
/// three times, and the tightest bracket wins: a thread preempted between
/// two reads (a loaded 2-core host: 25 ms seen) would otherwise shift every
/// converted timestamp by that long.
pub fn wall_minus_monotonic_ns() -> u64 {
    let mut best = (u64::MAX, 0);
    for _ in 0..3 {
        let before = now_ns();
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64;
        let width = now_ns().wrapping_sub(before);
        if width < best.0 {
            best = (width, wall.wrapping_sub(before.wrapping_add(width / 2)));
        }
    }
    best.1
}

/// A packet as it sits in guest memory (virtio-net header first).
pub struct PacketView<'a> {
    /// Guest memory.
    pub mem: &'a GuestMemory,
    /// The buffers holding the packet, in order (may extend past `len`).
    pub segments: &'a [Segment],
    /// Packet length including the virtio-net header.
    pub len: usize,
    /// Virtio-net header length.
    pub hdr_len: usize,
}

impl PacketView<'_> {
    /// Copies the first bytes of the frame (after the virtio-net header) into
    /// `buf`, e.g. to parse its headers; returns the bytes copied.
    pub fn copy_frame_prefix(&self, buf: &mut [u8]) -> usize {
        let frame_len = self.len.saturating_sub(self.hdr_len);
        let n = buf.len().min(frame_len);
        copy_from_segments(self.mem, self.segments, self.hdr_len, &mut buf[..n])
    }
}

/// RX timestamps of one packet.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RxStamps {
    /// Read from the host port; 0 for a frame vsnoop made itself (ACK
    /// offload re-delivery or reset), which never crossed the host port.
    pub host_in: u64,
    /// Written to guest buffers and the used index published.
    pub ring: u64,
}

/// TX timestamps of one packet.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TxStamps {
    /// The worker woke up for the guest's kick (start of the pass).
    pub kick: u64,
    /// The chain was taken from the avail ring.
    pub pop: u64,
    /// Written to the host port.
    pub host_out: u64,
}

/// Per-packet plug-in point between the host port and the guest's rings.
pub trait DataPathHook: Send + Sync {
    /// A packet is in guest memory and published in the used ring.
    fn rx_published(&self, queue_pair: usize, packet: &PacketView<'_>, stamps: RxStamps);
    /// A guest packet was written to the host port.
    fn tx_sent(&self, queue_pair: usize, packet: &PacketView<'_>, stamps: TxStamps);
    /// vsnoop wrote a frame of its own to the host port at `at` (ACK
    /// offload: early ACKs and resets); `frame` starts at the Ethernet header.
    fn local_sent(&self, _queue_pair: usize, _frame: &[u8], _at: u64) {}
    /// A guest packet taken from the TX ring at `pop` that vsnoop did not
    /// write to the host port (the ACK offload suppressed it).
    fn tx_suppressed(&self, _queue_pair: usize, _packet: &PacketView<'_>, _pop: u64) {}
}

/// Several hooks called in order for every packet.
pub struct HookChain(pub Vec<std::sync::Arc<dyn DataPathHook>>);

impl DataPathHook for HookChain {
    fn rx_published(&self, queue_pair: usize, packet: &PacketView<'_>, stamps: RxStamps) {
        for hook in &self.0 {
            hook.rx_published(queue_pair, packet, stamps);
        }
    }

    fn tx_sent(&self, queue_pair: usize, packet: &PacketView<'_>, stamps: TxStamps) {
        for hook in &self.0 {
            hook.tx_sent(queue_pair, packet, stamps);
        }
    }

    fn local_sent(&self, queue_pair: usize, frame: &[u8], at: u64) {
        for hook in &self.0 {
            hook.local_sent(queue_pair, frame, at);
        }
    }

    fn tx_suppressed(&self, queue_pair: usize, packet: &PacketView<'_>, pop: u64) {
        for hook in &self.0 {
            hook.tx_suppressed(queue_pair, packet, pop);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_is_monotonic_and_in_nanoseconds() {
        let a = now_ns();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = now_ns();
        assert!(b > a);
        assert!(b - a >= 2_000_000, "{}", b - a);
    }

    #[test]
    fn monotonic_stamps_convert_to_the_wall_clock() {
        let offset = wall_minus_monotonic_ns();
        // Best of three: this test's own two reads may be preempted apart.
        let diff = (0..3)
            .map(|_| {
                let converted = now_ns().wrapping_add(offset);
                let wall = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64;
                wall.abs_diff(converted)
            })
            .min()
            .unwrap();
        assert!(
            diff < 1_000_000,
            "a converted stamp is {diff} ns off the wall clock"
        );
    }
}
