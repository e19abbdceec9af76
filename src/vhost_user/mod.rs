//! The vhost-user device: features, queue-to-thread mapping, event dispatch.
//!
//! This is the only place that knows about `vhost-user-backend`. The data
//! path itself lives in [`crate::net`]; this module only routes events to it.

pub mod shim;

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use crate::GuestMemory;
use log::{debug, error, info, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_backend::{VhostUserBackend, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_MQ, VIRTIO_NET_F_MRG_RXBUF,
};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::metrics::QueueMetrics;
use crate::net::vnet_hdr::Negotiated;
use crate::net::{QueuePair, Vring};
use crate::offload::OffloadPort;
use crate::port::Tap;
use crate::timing::DataPathHook;

/// Event ids inside one worker thread: its RX ring, its TX ring (ids given by
/// vhost-user-backend), then the tap queue (ours, above the reserved range).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceEvent {
    /// The guest kicked the RX ring (posted buffers) or it was just enabled.
    RxRing,
    /// The guest kicked the TX ring or it was just enabled.
    TxRing,
    /// The tap queue has frames.
    Tap,
    /// The worker's periodic timer (ACK offload custody and ageing).
    Timer,
}

impl DeviceEvent {
    /// Maps a worker-local event id to an event.
    pub fn from_id(id: u16, num_queues: usize) -> Option<Self> {
        match usize::from(id) {
            0 => Some(DeviceEvent::RxRing),
            1 => Some(DeviceEvent::TxRing),
            x if x == tap_event_id(num_queues) as usize => Some(DeviceEvent::Tap),
            x if x == timer_event_id(num_queues) as usize => Some(DeviceEvent::Timer),
            _ => None,
        }
    }
}

/// The epoll id the tap queue is registered with (ids up to `num_queues` are
/// reserved by vhost-user-backend).
pub fn tap_event_id(num_queues: usize) -> u64 {
    num_queues as u64 + 1
}

/// The epoll id of the worker's periodic timer.
pub fn timer_event_id(num_queues: usize) -> u64 {
    num_queues as u64 + 2
}

/// How often each worker runs the offload's periodic work.
pub const TIMER_PERIOD: std::time::Duration = std::time::Duration::from_millis(20);

/// `VHOST_F_LOG_ALL`: the frontend asks for dirty logging (migration started).
pub const VHOST_F_LOG_ALL: u64 = 1 << 26;

/// Virtio-net features vsnoop offers.
pub fn device_features(queue_pairs: usize) -> u64 {
    let mut features = (1u64 << VIRTIO_F_VERSION_1)
        | (1 << VIRTIO_NET_F_MRG_RXBUF)
        | (1 << VIRTIO_NET_F_CSUM)
        | (1 << VIRTIO_NET_F_GUEST_CSUM)
        | (1 << VIRTIO_NET_F_HOST_TSO4)
        | (1 << VIRTIO_NET_F_HOST_TSO6)
        | (1 << VIRTIO_NET_F_GUEST_TSO4)
        | (1 << VIRTIO_NET_F_GUEST_TSO6)
        | (1 << VIRTIO_NET_F_HOST_ECN)
        | (1 << VIRTIO_NET_F_GUEST_ECN)
        | (1 << VIRTIO_RING_F_EVENT_IDX)
        | (1 << VIRTIO_RING_F_INDIRECT_DESC)
        // Migration: dirty logging (with the LOG_SHMFD protocol feature),
        // and the ACK offload drains while it is on (rule 15).
        | VHOST_F_LOG_ALL
        | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
    if queue_pairs > 1 {
        features |= 1 << VIRTIO_NET_F_MQ;
    }
    features
}

/// Device-wide state shared by the worker threads and the vhost-user thread.
struct Shared {
    tap: Tap,
    queue_size: usize,
    pairs: Vec<Mutex<QueuePair>>,
    metrics: Vec<Arc<QueueMetrics>>,
    acked_features: AtomicU64,
    generation: AtomicU64,
    /// Bumped whenever the frontend changes the memory table.
    mem_generation: AtomicU64,
    mem: RwLock<Option<GuestMemoryAtomic<GuestMemory>>>,
    /// The ACK offload engine.
    offload: Arc<OffloadPort>,
    /// One periodic timer per worker.
    timers: Vec<Mutex<vmm_sys_util::timerfd::TimerFd>>,
}

/// The vsnoop net device (cheap to clone: all clones share one device).
#[derive(Clone)]
pub struct NetBackend {
    shared: Arc<Shared>,
    /// The connection this handle serves (0: none); workers of an older
    /// connection that are still winding down see a mismatch and do nothing.
    generation: u64,
}

impl NetBackend {
    /// A device over `tap` (one tap queue per queue pair).
    pub fn new(
        tap: Tap,
        queue_size: usize,
        hook: Option<Arc<dyn DataPathHook>>,
        offload: Arc<OffloadPort>,
    ) -> io::Result<Self> {
        let metrics: Vec<_> = (0..tap.num_queues())
            .map(|_| Arc::new(QueueMetrics::default()))
            .collect();
        let pairs = (0..tap.num_queues())
            .map(|i| {
                let mut pair = QueuePair::new(i, tap.queue_fd(i), metrics[i].clone(), hook.clone());
                pair.offload = Some(offload.clone());
                Mutex::new(pair)
            })
            .collect();
        let timers = (0..tap.num_queues())
            .map(|_| {
                let mut t = vmm_sys_util::timerfd::TimerFd::new()?;
                t.reset(TIMER_PERIOD, Some(TIMER_PERIOD))?;
                Ok(Mutex::new(t))
            })
            .collect::<io::Result<Vec<_>>>()?;
        // Only queue pair 0 is in use until the guest enables more.
        for i in 1..tap.num_queues() {
            if let Err(e) = tap.set_queue_enabled(i, false) {
                warn!("{e}");
            }
        }
        Ok(NetBackend {
            shared: Arc::new(Shared {
                tap,
                queue_size,
                pairs,
                metrics,
                acked_features: AtomicU64::new(0),
                generation: AtomicU64::new(0),
                mem_generation: AtomicU64::new(1),
                mem: RwLock::new(None),
                offload,
                timers,
            }),
            generation: 0,
        })
    }

    /// The worker timer fd of queue pair `index`.
    pub fn timer_fd(&self, index: usize) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.shared.timers[index]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_raw_fd()
    }

    /// Counters of every queue pair.
    pub fn metrics(&self) -> &[Arc<QueueMetrics>] {
        &self.shared.metrics
    }

    /// The tap.
    pub fn tap(&self) -> &Tap {
        &self.shared.tap
    }

    /// Number of queue pairs.
    pub fn queue_pairs(&self) -> usize {
        self.shared.pairs.len()
    }

    /// A handle for connection `generation`, whose guest memory is `mem`.
    pub fn for_connection(&self, generation: u64, mem: GuestMemoryAtomic<GuestMemory>) -> Self {
        *self.shared.mem.write().unwrap_or_else(|e| e.into_inner()) = Some(mem);
        self.shared.mem_generation.fetch_add(1, Ordering::AcqRel);
        self.shared.generation.store(generation, Ordering::Release);
        NetBackend {
            shared: self.shared.clone(),
            generation,
        }
    }

    fn pair(&self, index: usize) -> MutexGuard<'_, QueuePair> {
        // A worker that panicked leaves consistent-enough state (counters and
        // held chains); keep serving rather than poisoning the device.
        self.shared.pairs[index]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Forgets per-connection state after the frontend went away.
    pub fn reset_connection(&self) {
        for i in 0..self.queue_pairs() {
            let mut pair = self.pair(i);
            pair.reset_connection();
            self.set_tap_queue(&mut pair, false);
        }
        self.shared.acked_features.store(0, Ordering::Relaxed);
        // The guest's connections and buffers are gone with the frontend.
        self.shared.offload.reset();
    }

    /// Attaches or detaches a pair's tap queue; queue 0 always stays attached
    /// so the interface keeps a queue.
    fn set_tap_queue(&self, pair: &mut QueuePair, attached: bool) {
        if pair.index == 0 || pair.tap_attached == attached {
            return;
        }
        match self.shared.tap.set_queue_enabled(pair.index, attached) {
            Ok(()) => pair.tap_attached = attached,
            Err(e) => warn!("{e}"),
        }
    }

    fn memory(&self) -> Option<vm_memory::GuestMemoryLoadGuard<GuestMemory>> {
        self.shared
            .mem
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|m| m.memory())
    }
}

impl VhostUserBackend for NetBackend {
    // Dirty-page log for live migration (VHOST_USER_SET_LOG_BASE).
    type Bitmap = BitmapMmapRegion;
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        2 * self.queue_pairs()
    }

    fn max_queue_size(&self) -> usize {
        self.shared.queue_size
    }

    fn features(&self) -> u64 {
        device_features(self.queue_pairs())
    }

    fn acked_features(&self, features: u64) {
        self.shared
            .acked_features
            .store(features, Ordering::Relaxed);
        let negotiated = Negotiated::from_features(features);
        let tap = &self.shared.tap;
        if let Err(e) = tap.set_vnet_hdr_len(negotiated.hdr_len) {
            error!("{e}");
        }
        if let Err(e) = tap.set_offloads(negotiated.tap_offloads) {
            error!("{e}");
        }
        for i in 0..self.queue_pairs() {
            let mut pair = self.pair(i);
            pair.negotiated = negotiated;
        }
        let migrating = features & VHOST_F_LOG_ALL != 0;
        if migrating != self.shared.offload.draining() {
            info!(
                "VHOST_F_LOG_ALL {}: ACK offload {}",
                if migrating { "set" } else { "cleared" },
                if migrating {
                    "draining (no new early ACKs)"
                } else {
                    "resumed"
                }
            );
            self.shared.offload.set_draining(migrating);
        }
        info!(
            "features acked {features:#x}: header {} bytes, mergeable {}, tap offloads {:#x}",
            negotiated.hdr_len, negotiated.mergeable, negotiated.tap_offloads
        );
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::LOG_SHMFD
    }

    fn set_event_idx(&self, enabled: bool) {
        debug!("EVENT_IDX {}", if enabled { "on" } else { "off" });
    }

    fn update_memory(&self, _mem: GuestMemoryAtomic<GuestMemory>) -> io::Result<()> {
        // The handler updates the GuestMemoryAtomic we share with it; held
        // RX chains re-resolve their host addresses on the next pass.
        self.shared.mem_generation.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.queue_pairs())
            .map(|i| 0b11u64 << (2 * i))
            .collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC)
            .map_err(|e| error!("cannot create exit event: {e}"))
            .ok()
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        let pair_index = queue_index as usize / 2;
        if pair_index >= self.queue_pairs() {
            return Ok(());
        }
        let mut pair = self.pair(pair_index);
        if queue_index % 2 == 1 {
            pair.tx.used.reset();
        } else {
            pair.rx.used.reset();
            if queue_index == 0 && self.shared.offload.draining() {
                // The frontend stops the rings at a migration's switchover,
                // with the guest already stopped: what it still owes stays
                // owed (in guest memory, which migrates with it).
                match self.shared.offload.owed_bytes() {
                    0 => info!("rings stopped while draining: the guest acknowledged every early-ACKed byte"),
                    owed => warn!(
                        "rings stopped while draining: {owed} early-ACKed bytes not yet acknowledged by the guest; \
                         they are in guest memory, but no backend can re-deliver them if the guest drops them"
                    ),
                }
            }
            if let Some((rx, _)) = pair.vrings.clone() {
                pair.rx.return_held_chains(rx.get_mut().get_queue_mut());
            }
            self.set_tap_queue(&mut pair, false);
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        let Some(event) = DeviceEvent::from_id(device_event, self.num_queues()) else {
            warn!("unexpected event {device_event} on worker {thread_id}");
            return Ok(());
        };
        if self.generation != self.shared.generation.load(Ordering::Acquire) {
            return Ok(());
        }
        let Some(mem) = self.memory() else {
            return Ok(());
        };
        let mut pair = self.pair(thread_id);
        if event == DeviceEvent::Timer {
            // The timer ticks for every worker, also for queue pairs the
            // driver never started: it must not adopt rings or attach the
            // pair's tap queue (frames steered to an unread queue are lost).
            if let Err(e) = self.shared.timers[thread_id]
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .wait()
            {
                debug!("worker timer: {e}");
            }
            let running = pair.vrings.is_some() && pair.vrings_generation == self.generation;
            if running && pair.offload_tick() {
                let mem_generation = self.shared.mem_generation.load(Ordering::Acquire);
                pair.process_rx(&mem, mem_generation);
            }
            return Ok(());
        }
        if pair.vrings.is_none() || pair.vrings_generation != self.generation {
            let [rx, tx] = vrings else {
                return Ok(());
            };
            pair.vrings = Some((rx.clone(), tx.clone()));
            pair.vrings_generation = self.generation;
            pair.rx.used.reset();
            pair.tx.used.reset();
        }
        if !pair.tap_attached {
            self.set_tap_queue(&mut pair, true);
        }
        let mem_generation = self.shared.mem_generation.load(Ordering::Acquire);
        match event {
            DeviceEvent::TxRing => {
                pair.process_tx(&mem);
                // Guest ACKs may have asked for custody re-delivery.
                if pair.flush_offload_frames() {
                    pair.process_rx(&mem, mem_generation);
                }
            }
            DeviceEvent::RxRing | DeviceEvent::Tap => {
                pair.process_rx(&mem, mem_generation);
            }
            DeviceEvent::Timer => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_ids_map_to_rings_and_tap() {
        assert_eq!(DeviceEvent::from_id(0, 4), Some(DeviceEvent::RxRing));
        assert_eq!(DeviceEvent::from_id(1, 4), Some(DeviceEvent::TxRing));
        assert_eq!(DeviceEvent::from_id(5, 4), Some(DeviceEvent::Tap));
        assert_eq!(DeviceEvent::from_id(4, 4), None);
        assert_eq!(DeviceEvent::from_id(2, 4), None);
    }

    #[test]
    fn features_offer_mq_only_with_several_pairs() {
        let one = device_features(1);
        let two = device_features(2);
        assert_eq!(one & (1 << VIRTIO_NET_F_MQ), 0);
        assert_ne!(two & (1 << VIRTIO_NET_F_MQ), 0);
        assert_ne!(one & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(), 0);
        assert_ne!(one & (1 << VIRTIO_RING_F_EVENT_IDX), 0);
    }
}
