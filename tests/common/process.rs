//! The real `graceful` binary as a child process, one harness for the black-box tests
//! (tests/common) and the benchmark (benches/graceful includes this file by path): spawn with
//! piped output, keep its log lines, wait for its `serving` line (awaited, bounded), signal it,
//! stop it within a bound. Each caller sets the environment it needs on the `Command`.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Log lines kept per process; later ones are still read (so the pipe never blocks the child)
/// and counted.
const MAX_LINES: usize = 20_000;

#[derive(Default)]
pub struct Log {
    pub lines: Vec<String>,
    pub dropped: usize,
}

/// Both listeners, as the `serving` line names them.
#[derive(Debug, Clone, Copy)]
pub struct Listeners {
    pub listen: SocketAddr,
    pub admin: SocketAddr,
}

/// A spawned binary; killed (and reaped) on drop.
pub struct Process {
    pub child: Child,
    pub pid: i32,
    pub log: Arc<Mutex<Log>>,
    serving: Receiver<String>,
    exit: Option<(ExitStatus, SystemTime)>,
    /// The output readers: after an exit their last lines are awaited (bounded).
    pumps: Vec<std::thread::JoinHandle<()>>,
}

impl Process {
    /// Spawns `cmd` with stdin closed and stdout/stderr read into the log.
    pub fn spawn(mut cmd: Command) -> std::io::Result<Process> {
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn()?;
        let log = Arc::new(Mutex::new(Log::default()));
        let (tx, serving) = mpsc::channel();
        let mut pumps = Vec::new();
        if let Some(out) = child.stdout.take() {
            pumps.push(pump(out, "", log.clone(), Some(tx)));
        }
        if let Some(err) = child.stderr.take() {
            pumps.push(pump(err, "stderr: ", log.clone(), None));
        }
        let pid = child.id() as i32;
        Ok(Process { child, pid, log, serving, exit: None, pumps })
    }

    /// Waits for the `serving` line (woken by the log reader, not polled). Errors when the
    /// process closes its output first (it exited) or `bound` passes, with the log's tail.
    pub fn wait_serving(&mut self, bound: Duration) -> Result<Listeners, String> {
        let line = match self.serving.recv_timeout(bound) {
            Ok(line) => line,
            Err(RecvTimeoutError::Disconnected) => {
                let status = self.wait_exit(Duration::from_secs(2)).map(|(s, _)| s.to_string()).unwrap_or_default();
                return Err(format!("exited before serving ({status}):\n{}", self.log_tail(20)));
            }
            Err(RecvTimeoutError::Timeout) => {
                return Err(format!("not serving within {bound:?}:\n{}", self.log_tail(20)));
            }
        };
        let v: serde_json::Value = serde_json::from_str(&line).map_err(|e| format!("serving line: {e}: {line}"))?;
        let addr = |k: &str| -> Result<SocketAddr, String> {
            v[k].as_str().and_then(|s| s.parse().ok()).ok_or_else(|| format!("no `{k}` in the serving line: {line}"))
        };
        Ok(Listeners { listen: addr("listen")?, admin: addr("admin")? })
    }

    /// Sends `sig` unless the process has already been reaped (its pid could be reused).
    pub fn signal(&self, sig: Signal) {
        if self.exit.is_none() {
            let _ = kill(Pid::from_raw(self.pid), sig);
        }
    }

    /// Waits for the process to end, at most `bound`; the time is taken when the kernel reports
    /// it. Polled every 100 µs: std has no timed wait, and the benchmark times exits with it.
    pub fn wait_exit(&mut self, bound: Duration) -> Option<(ExitStatus, SystemTime)> {
        if self.exit.is_some() {
            return self.exit;
        }
        let deadline = Instant::now() + bound;
        loop {
            match self.child.try_wait() {
                Ok(Some(st)) => {
                    self.exit = Some((st, SystemTime::now()));
                    self.await_last_lines();
                    return self.exit;
                }
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_micros(100)),
                _ => return None,
            }
        }
    }

    /// The process has exited, but its last lines may still sit in the pipes: wait (at most
    /// 2 s: a child it left behind may hold them open) until the readers reach the end. Seen in
    /// CI: an exit observed before its `drained` line had been read.
    fn await_last_lines(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(2);
        while self.pumps.iter().any(|p| !p.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Ends it now (SIGKILL) if it still runs.
    pub fn kill(&mut self) {
        if self.exit.is_none() {
            let _ = self.child.kill();
            if let Ok(st) = self.child.wait() {
                self.exit = Some((st, SystemTime::now()));
            }
        }
    }

    /// The last `n` log lines, and how many were not kept.
    pub fn log_tail(&self, n: usize) -> String {
        let log = self.log.lock().unwrap();
        let from = log.lines.len().saturating_sub(n);
        let mut out = log.lines[from..].join("\n");
        if log.dropped > 0 {
            out.push_str(&format!("\n({} more lines not kept)", log.dropped));
        }
        out
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().lines.join("\n")
    }

    /// Every JSON log line so far.
    pub fn events(&self) -> Vec<serde_json::Value> {
        let log = self.log.lock().unwrap();
        log.lines.iter().filter_map(|l| serde_json::from_str(l).ok()).collect()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Reads lines into the log; the first `serving` line that names the listeners also goes to
/// `serving` (dropping the sender when the output ends tells the waiter the process is gone).
fn pump<R: Read + Send + 'static>(
    r: R,
    prefix: &'static str,
    log: Arc<Mutex<Log>>,
    serving: Option<Sender<String>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut serving = serving;
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { break };
            if line.contains("\"message\":\"serving\"") && line.contains("\"listen\"") {
                if let Some(tx) = serving.take() {
                    let _ = tx.send(line.clone());
                }
            }
            let mut log = log.lock().unwrap();
            if log.lines.len() < MAX_LINES {
                log.lines.push(format!("{prefix}{line}"));
            } else {
                log.dropped += 1;
            }
        }
    })
}
