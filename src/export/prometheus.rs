//! Prometheus / OpenMetrics text endpoint.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{bail, Result};

use crate::state::Shared;

/// Starts serving `GET /metrics` on `addr`.
pub fn start(_addr: SocketAddr, _shared: Arc<Shared>) -> Result<()> {
    bail!("--metrics is not implemented yet")
}
