//! Run-time state shared by the data path, the signal thread and the export
//! endpoints (control socket, metrics): counters, the delay attribution, the
//! capture and the switches a user can flip while the daemon runs.

use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;
use std::time::Instant;

use crate::attribution::hook::AttributionHook;
use crate::export::capture::CaptureSlot;
use crate::metrics::QueueMetrics;
use crate::offload::OffloadPort;

/// Everything the endpoints read or switch.
pub struct Shared {
    /// When the daemon started.
    pub started: Instant,
    /// The TAP interface name.
    pub tap: String,
    /// Counters per queue pair.
    pub queues: Vec<Arc<QueueMetrics>>,
    /// The delay attribution (`None` when built without the `timing` feature).
    pub attribution: Option<Arc<AttributionHook>>,
    /// The capture (may be idle).
    pub capture: Arc<CaptureSlot>,
    /// The ACK offload (its switch, drain state and counters).
    pub offload: Arc<OffloadPort>,
    /// Frontend connections served so far.
    pub connections: AtomicU64,
    /// A frontend is connected now.
    pub connected: AtomicBool,
}

impl Shared {
    /// ACK offload state.
    pub fn ack_offload(&self) -> bool {
        self.offload.enabled()
    }

    /// Switches the ACK offload.
    pub fn set_ack_offload(&self, on: bool) {
        self.offload.set_enabled(on);
    }
}
