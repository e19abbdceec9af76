//! The control socket (JSON over a unix socket).

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Result};

use crate::state::Shared;

/// Starts serving the control API on `path`.
pub fn start(_path: &Path, _shared: Arc<Shared>) -> Result<()> {
    bail!("--control is not implemented yet")
}
