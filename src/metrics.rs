//! Per-queue-pair counters: packets, bytes and every drop path.
//!
//! Counters are plain relaxed atomics bumped by the worker that owns the
//! queue pair; readers (SIGUSR1, exit, later the export endpoints) take a
//! snapshot. Every drop path has its own counter (Firecracker style) so that a
//! user can tell a hostile guest from a full tap queue.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! queue_counters {
    ($($(#[doc = $doc:literal])+ $name:ident,)+) => {
        /// Counters of one queue pair (RX ring, TX ring and its tap queue).
        #[derive(Debug, Default)]
        pub struct QueueMetrics {
            $($(#[doc = $doc])+ pub $name: AtomicU64,)+
        }

        impl QueueMetrics {
            /// Names and current values, in declaration order.
            pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($name), self.$name.load(Ordering::Relaxed)),)+]
            }
        }
    };
}

queue_counters! {
    /// Frames delivered to the guest (tap -> RX ring).
    rx_packets,
    /// Bytes delivered to the guest, virtio-net header excluded.
    rx_bytes,
    /// Frames sent by the guest and written to the tap (TX ring -> tap).
    tx_packets,
    /// Bytes written to the tap, virtio-net header excluded.
    tx_bytes,
    /// Times the tap had frames but the guest had posted no RX buffer
    /// (backpressure: the tap is not read until the guest posts more; not a drop).
    rx_no_buffer,
    /// Frames that went through the bounce buffer because the posted buffers
    /// could not hold a maximum-size frame (not a drop).
    rx_bounced,
    /// RX chains returned unused: descriptor loop, chain longer than the queue,
    /// bad index, bad indirect table, or too short for the virtio-net header.
    rx_drop_bad_chain,
    /// RX chains returned unused: a buffer outside guest memory or a length overflow.
    rx_drop_bad_address,
    /// RX chains returned unused: a device-readable buffer where a writable one is needed.
    rx_drop_readonly_buffer,
    /// Frames from the tap dropped because they can never fit the guest's buffers.
    rx_drop_frame_too_large,
    /// Errors reading the tap (other than "no frame ready").
    rx_tap_read_errors,
    /// TX chains dropped: descriptor loop, chain longer than the queue, bad index
    /// or bad indirect table.
    tx_drop_bad_chain,
    /// TX chains dropped: a buffer outside guest memory or a length overflow.
    tx_drop_bad_address,
    /// TX chains dropped: a device-writable buffer in a driver-to-device chain.
    tx_drop_writable_buffer,
    /// TX chains dropped: shorter than the virtio-net header.
    tx_drop_short_header,
    /// TX chains dropped: frame longer than 64 KiB plus Ethernet header.
    tx_drop_too_large,
    /// TX frames dropped: GSO or checksum offload the guest did not negotiate.
    tx_drop_bad_gso,
    /// TX frames dropped because the tap refused them (down, bad header, ...).
    tx_drop_tap_write,
    /// Avail-ring heads that named a descriptor outside the queue (cannot be returned).
    bad_head_index,
    /// Times a ring was found with its avail index more than a ring ahead
    /// of the buffers the device took (broken or hostile driver): the ring
    /// is left alone until the guest resets the device.
    bad_avail_index,
    /// Frames the ACK offload generated and wrote to the tap (early ACKs, resets).
    offload_frames_sent,
    /// Frames the ACK offload generated that the tap refused.
    offload_frames_failed,
    /// Frames the ACK offload delivered into the RX ring (custody re-delivery, resets).
    offload_frames_delivered,
    /// RX batches: runs of frames published between two notification
    /// decisions (`rx_packets / rx_batches` is the mean batch).
    rx_batches,
    /// Interrupts sent to the guest for its RX ring (EVENT_IDX or the ring
    /// flags said it wanted one).
    rx_notifications,
    /// Interrupts sent to the guest for its TX ring.
    tx_notifications,
}

impl QueueMetrics {
    /// Adds `n` to a counter.
    #[inline]
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Bumps a counter by one.
    #[inline]
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// One `vsnoop-stats queue=N key=value ...` line (a stable, greppable format).
    pub fn format_line(&self, queue_pair: usize) -> String {
        let mut line = format!("vsnoop-stats queue={queue_pair}");
        for (name, value) in self.snapshot() {
            let _ = write!(line, " {name}={value}");
        }
        line
    }
}

/// Formats the counters of all queue pairs, framed by begin/end markers so a
/// reader can tell a complete block.
pub fn format_report(queues: &[std::sync::Arc<QueueMetrics>]) -> String {
    let mut out = String::from("vsnoop-stats-begin\n");
    for (index, metrics) in queues.iter().enumerate() {
        out.push_str(&metrics.format_line(index));
        out.push('\n');
    }
    out.push_str("vsnoop-stats-end\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn report_lists_every_counter_per_queue() {
        let a = Arc::new(QueueMetrics::default());
        let b = Arc::new(QueueMetrics::default());
        QueueMetrics::add(&a.rx_packets, 3);
        QueueMetrics::inc(&b.tx_drop_short_header);
        let report = format_report(&[a, b]);
        let lines: Vec<&str> = report.lines().collect();
        assert_eq!(lines.first(), Some(&"vsnoop-stats-begin"));
        assert_eq!(lines.last(), Some(&"vsnoop-stats-end"));
        assert!(lines[1].starts_with("vsnoop-stats queue=0 rx_packets=3 "));
        assert!(lines[2].contains(" tx_drop_short_header=1"));
        assert!(lines[2].contains(" rx_packets=0"));
    }
}
