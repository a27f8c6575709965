//! What the end-to-end tests share: finding the project's binaries (built
//! once per test process with the same profile as the tests) and skipping
//! loudly when a foreign tool is missing.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

/// The target directory the running test binary was built into.
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> → target/<profile>
    exe.parent()
        .and_then(|deps| deps.parent())
        .expect("test executable lives in target/<profile>/deps")
        .to_path_buf()
}

/// Path of the `tidemark` binary, built (once per test process) if needed.
pub fn tidemark_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let dir = target_dir();
        let profile_release = dir.file_name().is_some_and(|n| n == "release");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut build = Command::new(cargo);
        build.args(["build", "--quiet", "-p", "tidemark", "--bin", "tidemark"]);
        if profile_release {
            build.arg("--release");
        }
        let status = build.status().expect("running cargo build");
        assert!(status.success(), "building the tidemark binary failed");
        let bin = dir.join("tidemark");
        assert!(bin.exists(), "{} missing after the build", bin.display());
        bin
    })
    .clone()
}

/// A `Command` for the `tidemark` binary.
pub fn tidemark() -> Command {
    Command::new(tidemark_bin())
}

/// Whether `tool` is on the PATH. When it is not, prints why the calling
/// test is skipped; under CI (`CI` set) a missing tool is a failure instead,
/// because CI installs every tool the tests need.
pub fn require_tool(tool: &str, test: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "{test}: `{tool}` is missing under CI; the test command must install it"
        );
        eprintln!("SKIP {test}: `{tool}` is not installed (the README's test command installs it)");
    }
    found
}
