//! `tidemark generate-docs` (hidden): writes the man pages and the shell
//! completions from the real clap definitions, so what the packages ship can
//! never drift from what the binary accepts.
//!
//! Layout of `--out DIR`:
//!
//! ```text
//! DIR/man/tidemark.1                    the command and its subcommand list
//! DIR/man/tidemark-tracker.1            one page per subcommand, at every
//! DIR/man/tidemark-tracker-serve.1      level ("tidemark tracker serve")
//! DIR/completions/tidemark.bash         bash
//! DIR/completions/_tidemark             zsh
//! DIR/completions/tidemark.fish         fish
//! ```

use anyhow::{Context, Result};
use clap::Args;
use clap_complete::Shell;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Debug, Args)]
pub(crate) struct GenerateDocsArgs {
    /// Directory to write `man/` and `completions/` into (created).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
}

/// Writes the pages and completions of `cli` (the top-level command).
pub(crate) fn run(a: GenerateDocsArgs, cli: clap::Command) -> Result<ExitCode> {
    let man_dir = a.out.join("man");
    let completions_dir = a.out.join("completions");
    for dir in [&man_dir, &completions_dir] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }

    let visible = without_hidden_subcommands(&cli);

    // `build` fills in what clap derives lazily: bin names
    // ("tidemark tracker serve") for the SYNOPSIS, display names
    // ("tidemark-tracker-serve") for the page titles, the version everywhere.
    // clap's generated `help` subcommand gets no page (`--help` covers it)
    // and is not listed on the pages either.
    let mut for_pages = without_help_subcommand(visible.clone());
    for_pages.build();
    let mut pages = 0;
    write_pages(&for_pages, &man_dir, &mut pages)?;

    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        let mut cmd = visible.clone();
        clap_complete::generate_to(shell, &mut cmd, "tidemark", &completions_dir)
            .with_context(|| format!("writing the {shell} completion"))?;
    }
    println!(
        "wrote {pages} man pages to {} and bash, zsh and fish completions to {}",
        man_dir.display(),
        completions_dir.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// `cli` without its hidden subcommands (such as this one), which neither
/// the pages nor the completions should offer. clap cannot remove a
/// subcommand, so this rebuilds the top level around the visible ones.
fn without_hidden_subcommands(cli: &clap::Command) -> clap::Command {
    let mut cmd = clap::Command::new("tidemark")
        .version(env!("CARGO_PKG_VERSION"))
        .about(cli.get_about().cloned().unwrap_or_default());
    if let Some(long_about) = cli.get_long_about() {
        cmd = cmd.long_about(long_about.clone());
    }
    cmd.propagate_version(cli.is_propagate_version_set())
        .subcommand_required(cli.is_subcommand_required_set())
        .args(cli.get_arguments().cloned())
        .subcommands(cli.get_subcommands().filter(|s| !s.is_hide_set()).cloned())
}

/// `cmd` with clap's `help` subcommand disabled at every level.
fn without_help_subcommand(cmd: clap::Command) -> clap::Command {
    let names: Vec<String> = cmd
        .get_subcommands()
        .map(|s| s.get_name().to_string())
        .collect();
    names
        .iter()
        .fold(cmd.disable_help_subcommand(true), |cmd, name| {
            cmd.mut_subcommand(name, without_help_subcommand)
        })
}

/// One page for `cmd`, then one for each of its subcommands, recursively.
fn write_pages(cmd: &clap::Command, dir: &Path, pages: &mut usize) -> Result<()> {
    let name = cmd
        .get_display_name()
        .unwrap_or_else(|| cmd.get_name())
        .to_string();
    let path = dir.join(format!("{name}.1"));
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd.clone())
        .title(name.to_uppercase())
        .section("1")
        .manual("Tidemark Manual")
        .source(format!("tidemark {}", env!("CARGO_PKG_VERSION")))
        .render(&mut page)
        .with_context(|| format!("rendering {name}"))?;
    std::fs::write(&path, page).with_context(|| format!("writing {}", path.display()))?;
    *pages += 1;
    for sub in cmd.get_subcommands() {
        write_pages(sub, dir, pages)?;
    }
    Ok(())
}
