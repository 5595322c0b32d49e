//! Running `graceful lab` from a test and reading its `--json` report.

use std::path::Path;
use std::process::{Command, Stdio};

/// The binary with piped output and no input (a test adds `lab` and its flags).
pub fn graceful() -> Command {
    let mut c = Command::new(super::BIN);
    c.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    c
}

/// A `--json` report.
pub fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// One run of a report, by its name.
pub fn run_named<'a>(doc: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    doc["runs"].as_array().unwrap().iter().find(|r| r["name"] == name).unwrap_or_else(|| panic!("no run {name}"))
}
