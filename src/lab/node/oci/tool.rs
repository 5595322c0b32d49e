//! Runs the runtime's tools (`runc`, `umoci`) to completion from async code: bounded, killed at
//! the bound, errors that name the command line and quote its stderr.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::process::Command;

/// What a finished tool printed.
#[derive(Debug)]
pub struct Output {
    pub stdout: String,
    pub stderr: String,
}

/// Runs `cmd` (no stdin) until it ends or `bound` passes; a non-zero exit is an error naming the
/// command and carrying its stderr.
pub async fn run(mut cmd: Command, bound: Duration) -> Result<Output> {
    let shown = describe(&cmd);
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
    let child = cmd.spawn().with_context(|| format!("cannot start `{shown}`"))?;
    let out = match tokio::time::timeout(bound, child.wait_with_output()).await {
        Ok(out) => out.with_context(|| format!("waiting for `{shown}`"))?,
        // Dropping the future drops the child, which kill_on_drop kills.
        Err(_) => bail!("`{shown}` did not finish within {bound:?}"),
    };
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        bail!("`{shown}` failed ({}): {}", out.status, stderr.trim());
    }
    Ok(Output { stdout: String::from_utf8_lossy(&out.stdout).into_owned(), stderr })
}

/// The command line as a person would type it.
pub fn describe(cmd: &Command) -> String {
    let std = cmd.as_std();
    let mut parts = vec![std.get_program().to_string_lossy().into_owned()];
    parts.extend(std.get_args().map(|a| a.to_string_lossy().into_owned()));
    parts.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn failures_and_hangs_name_the_command() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo broken >&2; exit 3"]);
        let e = run(cmd, Duration::from_secs(10)).await.unwrap_err().to_string();
        assert!(e.contains("sh -c echo broken >&2; exit 3") && e.contains("broken"), "{e}");

        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        let t = std::time::Instant::now();
        let e = run(cmd, Duration::from_millis(200)).await.unwrap_err().to_string();
        assert!(e.contains("`sleep 30` did not finish within 200ms"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(5));

        let e = run(Command::new("no-such-tool-here"), Duration::from_secs(1)).await.unwrap_err().to_string();
        assert!(e.contains("no-such-tool-here"), "{e}");
    }
}
