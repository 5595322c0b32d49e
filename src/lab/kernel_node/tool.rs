//! Runs the datapath's tools (`ip`, `nft`) as child processes: optional stdin, bounded wait,
//! errors that name the command line and quote its stderr.

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// No tool call here takes more than a fraction of a second; this bound only stops a hang.
pub const TOOL_BOUND: Duration = Duration::from_secs(10);

/// What a finished tool printed.
#[derive(Debug)]
pub struct Output {
    pub stdout: String,
    pub stderr: String,
}

/// Runs `cmd` to completion (killed after `TOOL_BOUND`), feeding `stdin` if given. A non-zero
/// exit is an error naming the command and carrying its stderr.
pub fn run(mut cmd: Command, stdin: Option<&str>) -> Result<Output> {
    let shown = describe(&cmd);
    cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("cannot start `{shown}`"))?;
    // A tool that stops reading (it failed early) is reported by its exit status and stderr,
    // which say more than the broken pipe.
    let fed = match (stdin, child.stdin.take()) {
        (Some(text), Some(mut pipe)) => pipe.write_all(text.as_bytes()),
        _ => Ok(()),
    };
    // Read both pipes on threads so a chatty tool never blocks on a full pipe.
    let out = child.stdout.take().map(read_on_thread);
    let err = child.stderr.take().map(read_on_thread);
    let deadline = Instant::now() + TOOL_BOUND;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("`{shown}` did not finish within {TOOL_BOUND:?}");
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    let stdout = out.map(|h| h.join().unwrap_or_default()).unwrap_or_default();
    let stderr = err.map(|h| h.join().unwrap_or_default()).unwrap_or_default();
    if !status.success() {
        bail!("`{shown}` failed ({status}): {}", stderr.trim());
    }
    fed.with_context(|| format!("writing to `{shown}`"))?;
    Ok(Output { stdout, stderr })
}

fn read_on_thread(mut pipe: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = pipe.read_to_string(&mut s);
        s
    })
}

/// The command line as a person would type it.
pub fn describe(cmd: &Command) -> String {
    let mut parts = vec![cmd.get_program().to_string_lossy().into_owned()];
    parts.extend(cmd.get_args().map(|a| a.to_string_lossy().into_owned()));
    parts.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_names_the_command_and_its_stderr() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo broken >&2; exit 3"]);
        let e = run(cmd, None).unwrap_err().to_string();
        assert!(e.contains("sh -c echo broken >&2; exit 3"), "{e}");
        assert!(e.contains("broken"), "{e}");
    }

    #[test]
    fn stdin_reaches_the_tool() {
        let out = run(Command::new("cat"), Some("hello")).unwrap();
        assert_eq!(out.stdout, "hello");
    }

    #[test]
    fn a_tool_that_stops_reading_is_reported_by_its_stderr() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo refused >&2; exit 1"]);
        let e = run(cmd, Some(&"x".repeat(1 << 20))).unwrap_err().to_string();
        assert!(e.contains("refused"), "{e}");
    }

    #[test]
    fn a_missing_tool_is_named() {
        let e = run(Command::new("no-such-tool-here"), None).unwrap_err().to_string();
        assert!(e.contains("no-such-tool-here"), "{e}");
    }
}
