//! `tidemark config …`: validate configuration files.

use anyhow::Result;
use clap::{Args, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

/// Validate configuration files.
#[derive(Debug, Subcommand)]
pub(crate) enum ConfigCommand {
    /// Parse and validate FILE; exit 0 if valid, else print where and why.
    Check(CheckArgs),
}

#[derive(Debug, Args)]
pub(crate) struct CheckArgs {
    /// The TOML file (with `[tracker]`, `[shipper]` and/or `[receiver]`).
    file: PathBuf,
}

pub(crate) fn run(cmd: ConfigCommand) -> Result<ExitCode> {
    match cmd {
        ConfigCommand::Check(a) => match tidemark_config::load(&a.file) {
            Ok(loaded) => {
                let daemons: Vec<String> = loaded.daemons().iter().map(|d| d.to_string()).collect();
                println!("{}: valid ({})", a.file.display(), daemons.join(", "));
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                let mut message = e.to_string();
                let mut source = std::error::Error::source(&e);
                while let Some(cause) = source {
                    message.push_str(&format!(": {cause}"));
                    source = cause.source();
                }
                eprintln!("{message}");
                Ok(ExitCode::FAILURE)
            }
        },
    }
}
