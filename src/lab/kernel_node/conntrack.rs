//! The kernel's own record of where each connection went: conntrack's event stream in the node
//! namespace (`conntrack -E`), read as the lab's user-space proxy keeps its records. Each
//! connection shows its original tuple (the client's socket → the Service address) and its reply
//! tuple (the pod that answers, after kube-proxy's DNAT), with the kernel's timestamps.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_util::task::AbortOnDropHandle;

use super::netns::Netns;

/// The event kinds conntrack prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    New,
    Update,
    Destroy,
}

/// One line of `conntrack -E -p tcp -o timestamp,id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Wall-clock time, nanoseconds since the Unix epoch.
    pub unix_nanos: u128,
    pub kind: EventKind,
    pub id: u64,
    /// TCP state (`SYN_SENT`, `ESTABLISHED`, `FIN_WAIT`, `CLOSE`…).
    pub state: String,
    /// The client's socket and the address it connected to (a ClusterIP or a NodePort).
    pub original: (SocketAddrV4, SocketAddrV4),
    /// Who answers: the pod's socket (DNAT undone on the way back).
    pub reply_source: SocketAddrV4,
    /// The peer has answered at least once and the connection is seen both ways.
    pub assured: bool,
}

/// Parses one event line; None for lines that are not TCP events (banners, warnings).
pub fn parse(line: &str) -> Option<Event> {
    let rest = line.trim().strip_prefix('[')?;
    let (stamp, rest) = rest.split_once(']')?;
    let (secs, micros) = stamp.split_once('.')?;
    let unix_nanos = secs.parse::<u128>().ok()? * 1_000_000_000 + format!("{micros:0<9}").parse::<u128>().ok()?;
    let rest = rest.trim_start();
    let (kind, rest) = rest.split_once(']')?;
    let kind = match kind.trim_start_matches('[').trim() {
        "NEW" => EventKind::New,
        "UPDATE" => EventKind::Update,
        "DESTROY" => EventKind::Destroy,
        _ => return None,
    };
    let words: Vec<&str> = rest.split_whitespace().collect();
    if words.first() != Some(&"tcp") {
        return None;
    }
    // tcp 6 <timeout> STATE src= dst= sport= dport= [UNREPLIED] src= dst= sport= dport= [ASSURED] id=
    let state = words.get(3)?.to_string();
    let mut srcs = Vec::new();
    let mut dsts = Vec::new();
    let mut sports = Vec::new();
    let mut dports = Vec::new();
    let mut id = None;
    let mut assured = false;
    for w in &words[4..] {
        if let Some(v) = w.strip_prefix("src=") {
            srcs.push(v.parse::<Ipv4Addr>().ok()?);
        } else if let Some(v) = w.strip_prefix("dst=") {
            dsts.push(v.parse::<Ipv4Addr>().ok()?);
        } else if let Some(v) = w.strip_prefix("sport=") {
            sports.push(v.parse::<u16>().ok()?);
        } else if let Some(v) = w.strip_prefix("dport=") {
            dports.push(v.parse::<u16>().ok()?);
        } else if let Some(v) = w.strip_prefix("id=") {
            id = v.parse::<u64>().ok();
        } else if *w == "[ASSURED]" {
            assured = true;
        }
    }
    if srcs.len() < 2 || dsts.is_empty() || sports.len() < 2 || dports.is_empty() {
        return None;
    }
    Some(Event {
        unix_nanos,
        kind,
        id: id?,
        state,
        original: (SocketAddrV4::new(srcs[0], sports[0]), SocketAddrV4::new(dsts[0], dports[0])),
        reply_source: SocketAddrV4::new(srcs[1], sports[1]),
        assured,
    })
}

/// What became of one connection, from its events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connection {
    pub client: SocketAddrV4,
    pub service: SocketAddrV4,
    pub pod: SocketAddrV4,
    /// When its first packet passed (NEW), ns since the epoch.
    pub opened_unix_nanos: u128,
    /// The pod answered the handshake.
    pub assured: bool,
    /// DESTROY seen: when.
    pub destroyed_unix_nanos: Option<u128>,
    /// The first FIN or RST seen on it (state FIN_WAIT, CLOSE_WAIT, CLOSE…): when.
    pub closing_unix_nanos: Option<u128>,
}

impl Connection {
    /// Never answered, and torn down within `quick` of its SYN: the pod's kernel answered with
    /// a reset (nothing listening), which is "connection refused".
    pub fn refused(&self, quick: Duration) -> bool {
        !self.assured
            && self.destroyed_unix_nanos.is_some_and(|d| d.saturating_sub(self.opened_unix_nanos) < quick.as_nanos())
    }
}

/// Folds events into connections, keyed by conntrack's id.
#[derive(Debug, Default)]
pub struct Table {
    by_id: HashMap<u64, usize>,
    pub connections: Vec<Connection>,
}

impl Table {
    pub fn apply(&mut self, e: &Event) {
        let index = match (e.kind, self.by_id.get(&e.id)) {
            (EventKind::New, _) | (_, None) => {
                self.connections.push(Connection {
                    client: e.original.0,
                    service: e.original.1,
                    pod: e.reply_source,
                    opened_unix_nanos: e.unix_nanos,
                    assured: false,
                    destroyed_unix_nanos: None,
                    closing_unix_nanos: None,
                });
                let i = self.connections.len() - 1;
                self.by_id.insert(e.id, i);
                i
            }
            (_, Some(i)) => *i,
        };
        let c = &mut self.connections[index];
        c.assured |= e.assured;
        if matches!(e.state.as_str(), "FIN_WAIT" | "CLOSE_WAIT" | "LAST_ACK" | "TIME_WAIT" | "CLOSE") {
            c.closing_unix_nanos.get_or_insert(e.unix_nanos);
        }
        if e.kind == EventKind::Destroy {
            c.destroyed_unix_nanos = Some(e.unix_nanos);
            // Its id may be reused by a later connection.
            self.by_id.remove(&e.id);
        }
    }
}

/// A running `conntrack -E` in a namespace, folding its events as they come.
pub struct Log {
    table: Arc<Mutex<Table>>,
    /// conntrack's warnings (an overrun netlink buffer loses events).
    warnings: Arc<Mutex<Vec<String>>>,
    _reader: AbortOnDropHandle<()>,
}

impl Log {
    /// Starts listening; returns once conntrack runs. Connections opened before are not seen.
    pub async fn start(ns: &Netns) -> Result<Log> {
        let mut cmd = std::process::Command::new("conntrack");
        // A larger socket buffer than the default: bursts of connections during a rollout.
        cmd.args(["-E", "-p", "tcp", "-o", "timestamp,id", "--buffer-size", "8388608"]);
        let mut cmd = ns.command(cmd)?;
        // The recorder must keep up with the traffic it stamps: ahead of the pods where the
        // lab may raise priority (root); as is otherwise.
        // SAFETY: setpriority is a plain system call; its failure is ignored.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                libc::setpriority(libc::PRIO_PROCESS, 0, -5);
                Ok(())
            });
        }
        let mut cmd = tokio::process::Command::from(cmd);
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
        let mut child = cmd.spawn().context("starting `conntrack -E` (apt-get install conntrack)")?;
        let stdout = child.stdout.take().context("conntrack's stdout")?;
        let stderr = child.stderr.take().context("conntrack's stderr")?;
        let table = Arc::new(Mutex::new(Table::default()));
        let warnings = Arc::new(Mutex::new(Vec::new()));
        let (t, w) = (table.clone(), warnings.clone());
        let reader = tokio::spawn(async move {
            let mut out = BufReader::new(stdout).lines();
            let mut err = BufReader::new(stderr).lines();
            let mut err_open = true;
            loop {
                tokio::select! {
                    line = out.next_line() => match line {
                        Ok(Some(l)) => {
                            if let Some(e) = parse(&l) {
                                t.lock().unwrap_or_else(|e| e.into_inner()).apply(&e);
                            }
                        }
                        _ => break,
                    },
                    line = err.next_line(), if err_open => match line {
                        Ok(Some(l)) => w.lock().unwrap_or_else(|e| e.into_inner()).push(l),
                        _ => err_open = false,
                    },
                }
            }
            let _ = child.kill().await;
        });
        // conntrack subscribes right after it starts; give it that moment before traffic.
        tokio::time::sleep(Duration::from_millis(100)).await;
        if reader.is_finished() {
            let w = warnings.lock().unwrap_or_else(|e| e.into_inner()).join("; ");
            anyhow::bail!("`conntrack -E` in namespace `{}` ended at once: {w}", ns.name);
        }
        Ok(Log { table, warnings, _reader: AbortOnDropHandle::new(reader) })
    }

    pub fn connections(&self) -> Vec<Connection> {
        self.table.lock().unwrap_or_else(|e| e.into_inner()).connections.clone()
    }

    /// Forgets what was seen (a new run begins).
    pub fn clear(&self) {
        *self.table.lock().unwrap_or_else(|e| e.into_inner()) = Table::default();
        self.warnings.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    pub fn warnings(&self) -> Vec<String> {
        self.warnings.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Lines as conntrack 1.4.7 printed them here: one served connection, then one refused.
    const SERVED: [&str; 4] = [
        "[1796524270.850651]\t    [NEW] tcp      6 120 SYN_SENT src=10.9.0.1 dst=10.96.0.1 sport=43782 dport=80 [UNREPLIED] src=10.9.0.2 dst=10.9.0.1 sport=5000 dport=43782 id=1203869648",
        "[1796524270.850783]\t [UPDATE] tcp      6 432000 ESTABLISHED src=10.9.0.1 dst=10.96.0.1 sport=43782 dport=80 src=10.9.0.2 dst=10.9.0.1 sport=5000 dport=43782 [ASSURED] id=1203869648",
        "[1796524270.854642]\t [UPDATE] tcp      6 120 FIN_WAIT src=10.9.0.1 dst=10.96.0.1 sport=43782 dport=80 src=10.9.0.2 dst=10.9.0.1 sport=5000 dport=43782 [ASSURED] id=1203869648",
        "[1796524270.954875]\t [UPDATE] tcp      6 120 TIME_WAIT src=10.9.0.1 dst=10.96.0.1 sport=43782 dport=80 src=10.9.0.2 dst=10.9.0.1 sport=5000 dport=43782 [ASSURED] id=1203869648",
    ];
    const REFUSED: [&str; 2] = [
        "[1796524271.155198]\t    [NEW] tcp      6 120 SYN_SENT src=10.9.0.1 dst=10.96.0.1 sport=43798 dport=80 [UNREPLIED] src=10.9.0.2 dst=10.9.0.1 sport=5000 dport=43798 id=2432888140",
        "[1796524271.155231]\t[DESTROY] tcp      6 120 CLOSE src=10.9.0.1 dst=10.96.0.1 sport=43798 dport=80 [UNREPLIED] src=10.9.0.2 dst=10.9.0.1 sport=5000 dport=43798 delta-time=0 id=2432888140",
    ];

    #[test]
    fn an_event_line_gives_both_tuples_and_the_time() {
        let e = parse(SERVED[0]).unwrap();
        assert_eq!(e.kind, EventKind::New);
        assert_eq!(e.unix_nanos, 1_796_524_270_850_651_000);
        assert_eq!(e.original, ("10.9.0.1:43782".parse().unwrap(), "10.96.0.1:80".parse().unwrap()));
        assert_eq!(e.reply_source, "10.9.0.2:5000".parse().unwrap());
        assert_eq!((e.state.as_str(), e.assured, e.id), ("SYN_SENT", false, 1203869648));
        assert!(parse("conntrack v1.4.7 (conntrack-tools): 3 flow events have been shown.").is_none());
    }

    #[test]
    fn events_fold_into_served_and_refused_connections() {
        let mut t = Table::default();
        for l in SERVED.iter().chain(REFUSED.iter()) {
            t.apply(&parse(l).unwrap());
        }
        let [served, refused] = &t.connections[..] else { panic!("{:?}", t.connections) };
        assert!(served.assured && !served.refused(Duration::from_secs(1)));
        assert_eq!(served.closing_unix_nanos, Some(1_796_524_270_854_642_000));
        assert_eq!(refused.client, "10.9.0.1:43798".parse().unwrap());
        assert!(refused.refused(Duration::from_secs(1)));
    }
}
