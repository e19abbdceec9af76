//! The attributor on the live data path.

use std::sync::Mutex;

use super::packet::PREFIX_LEN;
use super::{AttributionConfig, Attributor, Snapshot};
use crate::timing::{DataPathHook, PacketView, RxStamps, TxStamps};

/// Feeds every frame's headers and timestamps to one [`Attributor`].
///
/// The data path copies the first [`PREFIX_LEN`] bytes of the frame and takes
/// a mutex that only the queue workers and readers of the snapshot contend
/// for; the matching itself is a few hash-map and deque operations.
pub struct AttributionHook {
    attributor: Mutex<Attributor>,
}

impl AttributionHook {
    /// A hook with an empty attributor.
    pub fn new(config: AttributionConfig) -> Self {
        AttributionHook {
            attributor: Mutex::new(Attributor::new(config)),
        }
    }

    /// Runs `f` on the attributor (for snapshots and metrics).
    pub fn with<R>(&self, f: impl FnOnce(&Attributor) -> R) -> R {
        f(&self.attributor.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Snapshot {
        self.with(Attributor::snapshot)
    }

    fn feed(&self, packet: &PacketView<'_>, f: impl FnOnce(&mut Attributor, &[u8], usize)) {
        let mut prefix = [0u8; PREFIX_LEN];
        let n = packet.copy_frame_prefix(&mut prefix);
        let frame_len = packet.len.saturating_sub(packet.hdr_len);
        let mut attributor = self.attributor.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut attributor, &prefix[..n], frame_len);
    }
}

impl DataPathHook for AttributionHook {
    fn rx_published(&self, _queue_pair: usize, packet: &PacketView<'_>, stamps: RxStamps) {
        if stamps.host_in == 0 {
            // Our own re-delivery of bytes already seen from the host: not a
            // host arrival, it would only disturb the matching.
            return;
        }
        self.feed(packet, |a, frame, len| a.on_rx(frame, len, stamps));
    }

    fn tx_sent(&self, _queue_pair: usize, packet: &PacketView<'_>, stamps: TxStamps) {
        self.feed(packet, |a, frame, len| a.on_tx(frame, len, stamps));
    }
}
