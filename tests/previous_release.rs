//! The previous release, built from git, for the tests that run its
//! binaries against this tree's (tests/tests/upgrade.rs).
//!
//! Its source is `git archive`d into `target/upgrade/<commit>/src` and
//! built into the same target directory as this tree, so the dependencies
//! both compile alike are built once. Two things of the archive are
//! changed, neither of them code: the workspace version gets a `-g<commit>`
//! suffix, because cargo names the artifacts of a workspace's own crates by
//! their path relative to the workspace root, which both trees share (built
//! as they are, the two would overwrite each other's), and the binary is
//! named `tidemark-<commit>` (not to replace this tree's `tidemark`). The
//! binary is then kept as `target/upgrade/<commit>/tidemark`: a later run
//! reuses it, so the build is paid once per target directory.

use crate::target_dir;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Instant;

/// The commit of the previous release: the branch point of this work.
pub const PREVIOUS_RELEASE: &str = "a8c0b2831a13f2eb2bb9b1c9be814332c4ddc486";

/// The previous release's `tidemark` binary, built on first use; `None`
/// (after saying why) when git or the commit is not at hand, which under
/// CI (`CI` set) is a failure instead: CI clones the whole history.
pub fn previous_release_bin(test: &str) -> Option<PathBuf> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match BIN.get_or_init(build) {
        Ok(bin) => Some(bin.clone()),
        Err(why) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "{test}: the previous release cannot be built under CI: {why}"
            );
            eprintln!("SKIP {test}: the previous release cannot be built: {why}");
            None
        }
    }
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace")
        .to_path_buf()
}

fn short() -> &'static str {
    &PREVIOUS_RELEASE[..7]
}

fn build() -> Result<PathBuf, String> {
    let profile_dir = target_dir();
    let target = profile_dir
        .parent()
        .ok_or("the target directory has no parent")?
        .to_path_buf();
    let cache = target.join("upgrade").join(PREVIOUS_RELEASE);
    let bin = cache.join("tidemark");
    if bin.exists() {
        return Ok(bin);
    }
    let commit = format!("{PREVIOUS_RELEASE}^{{commit}}");
    let known = Command::new("git")
        .arg("-C")
        .arg(workspace())
        .args(["cat-file", "-e", &commit])
        .stderr(Stdio::null())
        .status()
        .map_err(|e| format!("running git: {e}"))?;
    if !known.success() {
        return Err(format!(
            "commit {PREVIOUS_RELEASE} is not in this clone (a shallow one?)"
        ));
    }
    let started = Instant::now();
    let src = cache.join("src");
    if src.exists() {
        fs::remove_dir_all(&src).map_err(|e| format!("{}: {e}", src.display()))?;
    }
    fs::create_dir_all(&src).map_err(|e| format!("{}: {e}", src.display()))?;
    let archive = Command::new("sh")
        .arg("-c")
        .arg(r#"git -C "$1" archive --format=tar "$2" | tar -x -C "$3""#)
        .arg("sh")
        .arg(workspace())
        .arg(PREVIOUS_RELEASE)
        .arg(&src)
        .status()
        .map_err(|e| format!("running git archive: {e}"))?;
    if !archive.success() {
        return Err(format!("git archive {PREVIOUS_RELEASE} failed"));
    }
    let name = format!("tidemark-{}", short());
    mark_version(&src.join("Cargo.toml"))?;
    replace_once(
        &src.join("cli/Cargo.toml"),
        "[[bin]]\nname = \"tidemark\"",
        &format!("[[bin]]\nname = \"{name}\""),
    )?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--quiet", "-p", "tidemark", "--bin", &name])
        .arg("--manifest-path")
        .arg(src.join("Cargo.toml"))
        .env("CARGO_TARGET_DIR", &target);
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    let status = cmd
        .status()
        .map_err(|e| format!("running cargo build: {e}"))?;
    if !status.success() {
        return Err(format!("building {PREVIOUS_RELEASE} failed"));
    }
    let tmp = cache.join("tidemark.tmp");
    fs::copy(profile_dir.join(&name), &tmp).map_err(|e| format!("copying {name}: {e}"))?;
    fs::rename(&tmp, &bin).map_err(|e| format!("{}: {e}", bin.display()))?;
    eprintln!(
        "built the previous release ({}) in {:.0?}: {}",
        short(),
        started.elapsed(),
        bin.display()
    );
    Ok(bin)
}

/// Appends `-g<commit>` to the workspace version (`[workspace.package]`'s
/// `version = "X.Y.Z"`): a pre-release of the same version, so its crates
/// are other packages to cargo than this tree's.
fn mark_version(manifest: &Path) -> Result<(), String> {
    let text = fs::read_to_string(manifest).map_err(|e| format!("{}: {e}", manifest.display()))?;
    let missing = || format!("{}: no [workspace.package] version", manifest.display());
    let table = text.find("[workspace.package]").ok_or_else(missing)?;
    let key = "\nversion = \"";
    let value = table + text[table..].find(key).ok_or_else(missing)? + key.len();
    let end = value + text[value..].find('"').ok_or_else(missing)?;
    let marked = format!("{}-g{}{}", &text[..end], short(), &text[end..]);
    fs::write(manifest, marked).map_err(|e| format!("{}: {e}", manifest.display()))
}

/// Replaces the one occurrence of `from` in `path` with `to`.
fn replace_once(path: &Path, from: &str, to: &str) -> Result<(), String> {
    let text = fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if text.matches(from).count() != 1 {
        return Err(format!("{} does not hold {from:?} once", path.display()));
    }
    fs::write(path, text.replacen(from, to, 1)).map_err(|e| format!("{}: {e}", path.display()))
}
