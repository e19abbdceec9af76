//! The client subcommands: talk to a running daemon's control socket, or
//! analyse a capture offline.

use anyhow::{bail, Result};

use crate::cli::Command;

/// Runs one subcommand.
pub fn run(command: Command) -> Result<()> {
    match command {
        Command::Report { .. } => bail!("vsnoop report is not implemented yet"),
        _ => bail!("the control client is not implemented yet"),
    }
}
