//! What the image and container tests need from this machine: the archive `.ci/build-image`
//! wrote, and the tools they drive.

use std::path::PathBuf;
use std::process::Command;

/// `GRACEFUL_IMAGE_ARCHIVE`, else `<target>/image/graceful.oci.tar` beside the running test
/// (`<target>/debug/deps/<test>`).
pub fn archive_path() -> PathBuf {
    if let Some(p) = std::env::var_os("GRACEFUL_IMAGE_ARCHIVE") {
        return p.into();
    }
    let exe = std::env::current_exe().expect("the test's path");
    exe.ancestors().nth(3).expect("a target dir").join("image/graceful.oci.tar")
}

/// The first of `tools` not on PATH, as a reason to skip.
pub fn tool_missing(tools: &[&str]) -> Option<String> {
    tools.iter().find_map(|tool| {
        let found = Command::new("sh").args(["-c", &format!("command -v {tool}")]).output();
        (!found.map(|o| o.status.success()).unwrap_or(false)).then(|| format!("`{tool}` is not installed"))
    })
}
