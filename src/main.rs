//! `vsnoop` entry point: parse, validate, run; one error line on failure.

use clap::Parser;
use vsnoop::cli::Cli;
use vsnoop::config::Config;

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    let result = match cli.command {
        Some(command) => vsnoop::client::run(command),
        None => Config::try_from(cli.daemon)
            .map_err(anyhow::Error::from)
            .and_then(vsnoop::daemon::run),
    };
    if let Err(e) = result {
        eprintln!("vsnoop: error: {e:#}");
        std::process::exit(1);
    }
}
