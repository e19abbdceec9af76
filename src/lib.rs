//! vsnoop: a vhost-user virtio-net backend with a TAP port.
//!
//! Module map:
//! - [`cli`], [`config`]: arguments and their validation
//! - [`daemon`]: listen / connect, serve, reconnect, shutdown
//! - [`vhost_user`]: the `VhostUserBackend` impl and the message relay that
//!   copes with QEMU 7.2's ring-enable ordering
//! - [`net`]: the per-queue-pair data path (RX, TX, descriptor validation,
//!   virtio-net header)
//! - [`port`]: the host side (TAP)
//! - [`timing`]: the clock and the per-packet hook points
//! - [`metrics`]: counters for every packet and drop path
//! - [`export`]: pcapng capture at both vantage points
//! - [`report`]: `vsnoop report`, offline analysis of a capture (summary,
//!   report.md, SVG plots)

#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

pub mod attribution;
pub mod cli;
pub mod client;
pub mod config;
pub mod daemon;
pub mod export;
pub mod metrics;
pub mod net;
pub mod offload;
pub mod port;
pub mod report;
pub mod state;
pub mod timing;
pub mod vhost_user;

/// Guest memory as every part of vsnoop sees it: mmap'ed regions with a
/// dirty-page bitmap the frontend can switch on for live migration
/// (VHOST_USER_SET_LOG_BASE). Writes through `vm-memory` are logged by the
/// bitmap; writes that bypass it (readv into raw iovecs) must call
/// [`net::mark_dirty`].
pub type GuestMemory = vm_memory::GuestMemoryMmap<vhost_user_backend::bitmap::BitmapMmapRegion>;
