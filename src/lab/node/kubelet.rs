//! The kubelet's part for one pod: start the container (a child process of this binary), run its
//! startup / readiness / liveness probes, restart it when it dies or fails liveness, and on
//! deletion: preStop, then the stop signal, then SIGKILL when the grace period (counted from the
//! deletion, preStop included) runs out — plus a one-off 2 s if preStop overran, as the kubelet
//! grants.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tokio::process::{Child, Command};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::lab::api::cluster::{Cluster, EventKind};
use crate::lab::node::pod_spec::{ContainerPlan, ProbePlan};
use crate::lab::node::prober::{self, Thresholds};

/// The kubelet's extension when preStop used up the grace period.
const PRESTOP_OVERRUN_EXTENSION: Duration = Duration::from_secs(2);
/// CrashLoopBackOff: first restart at once, then 10 s doubling to 5 min.
const BACKOFF_START: Duration = Duration::from_secs(10);
const BACKOFF_MAX: Duration = Duration::from_secs(300);

pub fn signal_number(name: &str) -> Option<i32> {
    let n = name.trim_start_matches("SIG");
    Some(match n {
        "TERM" => libc::SIGTERM,
        "INT" => libc::SIGINT,
        "QUIT" => libc::SIGQUIT,
        "KILL" => libc::SIGKILL,
        "HUP" => libc::SIGHUP,
        "USR1" => libc::SIGUSR1,
        "USR2" => libc::SIGUSR2,
        "WINCH" => libc::SIGWINCH,
        _ => return None,
    })
}

pub fn signal_name(sig: i32) -> String {
    match sig {
        libc::SIGTERM => "SIGTERM".into(),
        libc::SIGINT => "SIGINT".into(),
        libc::SIGQUIT => "SIGQUIT".into(),
        libc::SIGKILL => "SIGKILL".into(),
        libc::SIGHUP => "SIGHUP".into(),
        other => format!("signal {other}"),
    }
}

#[derive(Debug, Clone)]
pub struct KubeletOptions {
    /// Container exit → pod sandbox (and its address) torn down.
    pub sandbox_teardown: Duration,
}

/// A running pod; deleting it starts the graceful termination.
pub struct PodHandle {
    pub name: String,
    delete: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl PodHandle {
    /// Sets the deletionTimestamp (the API server's part); the kubelet takes it from there.
    pub fn delete(&self, cluster: &Cluster) {
        if self.is_deleted() {
            return;
        }
        let now = cluster.clock.now();
        cluster.update_pod(&self.name, |p| {
            p.deleted.get_or_insert(now);
        });
        cluster.event(&self.name, EventKind::Deleted, "");
        self.delete.send_replace(true);
    }

    pub fn is_deleted(&self) -> bool {
        *self.delete.borrow()
    }

    /// Waits until the pod's container has stopped for good (after `delete`).
    pub async fn wait(&mut self) {
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for PodHandle {
    fn drop(&mut self) {
        // The worker owns the child with kill_on_drop: aborting it kills the process.
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

/// Starts the kubelet's worker for a pod already added to the cluster.
pub fn start(
    cluster: Arc<Cluster>,
    name: String,
    plan: ContainerPlan,
    log: PathBuf,
    opts: KubeletOptions,
) -> PodHandle {
    let (tx, rx) = watch::channel(false);
    let task = tokio::spawn(worker(cluster, name.clone(), Arc::new(plan), log, rx, opts));
    PodHandle { name, delete: tx, task: Some(task) }
}

fn spawn(plan: &ContainerPlan, log: &std::path::Path) -> std::io::Result<Child> {
    let out = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
    let err = out.try_clone()?;
    let mut cmd = Command::new(&plan.program);
    cmd.args(&plan.args)
        .env_clear()
        .envs(plan.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .kill_on_drop(true);
    if let Some(dir) = &plan.cwd {
        cmd.current_dir(dir);
    }
    #[cfg(target_os = "linux")]
    // SAFETY: prctl is async-signal-safe; it only asks the kernel to kill the child if the lab dies,
    // so no pod outlives a crashed lab.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    cmd.spawn()
}

fn send_signal(child: &Child, sig: i32) {
    if let Some(pid) = child.id() {
        // SAFETY: plain kill(2) on our own child, whose pid is still ours (not yet reaped).
        unsafe {
            libc::kill(pid as i32, sig);
        }
    }
}

fn describe_exit(s: &std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (s.code(), s.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(sig)) => format!("killed by {}", signal_name(sig)),
        _ => "exited".into(),
    }
}

/// Tasks that must not outlive the container they watch (nor an aborted worker).
struct Tasks(Vec<JoinHandle<()>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// Why a container's run ended.
enum Ended {
    Deleted,
    /// Liveness or startup probe failed out: kill with this grace and restart.
    ProbeKill(Duration, String),
    Exited(String),
}

async fn worker(
    cluster: Arc<Cluster>,
    name: String,
    plan: Arc<ContainerPlan>,
    log: PathBuf,
    mut deleted: watch::Receiver<bool>,
    opts: KubeletOptions,
) {
    let mut restarts: u32 = 0;
    loop {
        if *deleted.borrow() {
            break;
        }
        let mut child = match spawn(&plan, &log) {
            Ok(c) => c,
            Err(e) => {
                cluster.event(&name, EventKind::Exited, format!("failed to start: {e}"));
                if backoff(&mut deleted, restarts).await {
                    break;
                }
                restarts += 1;
                continue;
            }
        };
        cluster.update_pod(&name, |p| {
            p.running = true;
            p.started = plan.startup.is_none();
            p.ready = false;
            p.ready_since = None;
            p.restarts = restarts;
        });
        cluster.event(&name, EventKind::ContainerStarted, format!("pid {}", child.id().unwrap_or(0)));

        let (kill_tx, mut kill_rx) = mpsc::unbounded_channel::<(Duration, String)>();
        let (started_tx, started_rx) = watch::channel(plan.startup.is_none());
        let mut probe_tasks = Tasks(Vec::new());
        if let Some(p) = plan.startup.clone() {
            probe_tasks.0.push(tokio::spawn(startup_probe(
                cluster.clone(),
                name.clone(),
                p,
                plan.clone(),
                log.clone(),
                started_tx,
                kill_tx.clone(),
            )));
        }
        if let Some(p) = plan.readiness.clone() {
            probe_tasks.0.push(tokio::spawn(readiness_probe(
                cluster.clone(),
                name.clone(),
                p,
                plan.clone(),
                log.clone(),
                started_rx.clone(),
            )));
        } else {
            // No readiness probe: Ready as soon as the container has started.
            probe_tasks.0.push(tokio::spawn(ready_when_started(cluster.clone(), name.clone(), started_rx.clone())));
        }
        let liveness = Tasks(
            plan.liveness
                .clone()
                .map(|p| {
                    tokio::spawn(liveness_probe(p, plan.clone(), log.clone(), started_rx.clone(), kill_tx.clone()))
                })
                .into_iter()
                .collect(),
        );
        drop(kill_tx);

        let ended = tokio::select! {
            s = child.wait() => Ended::Exited(s.map(|s| describe_exit(&s)).unwrap_or_else(|e| e.to_string())),
            _ = deleted.wait_for(|d| *d) => Ended::Deleted,
            Some((grace, why)) = kill_rx.recv() => Ended::ProbeKill(grace, why),
        };
        // Liveness probes stop once the pod is terminating; readiness goes on.
        drop(liveness);
        match ended {
            Ended::Deleted => {
                let at = cluster.pod(&name).and_then(|p| p.deleted).unwrap_or_else(|| cluster.clock.now());
                terminate(&cluster, &name, &plan, &log, &mut child, at, plan.grace).await;
                stop_probes(&cluster, &name, probe_tasks);
                break;
            }
            Ended::ProbeKill(grace, why) => {
                cluster.event(&name, EventKind::ProbeFailed, format!("{why}; container will be restarted"));
                terminate(&cluster, &name, &plan, &log, &mut child, cluster.clock.now(), grace).await;
                stop_probes(&cluster, &name, probe_tasks);
            }
            Ended::Exited(how) => {
                cluster.update_pod(&name, |p| p.exited = Some(cluster.clock.now()));
                cluster.event(&name, EventKind::Exited, how);
                stop_probes(&cluster, &name, probe_tasks);
                if *deleted.borrow() {
                    break;
                }
            }
        }
        if *deleted.borrow() {
            break;
        }
        if backoff(&mut deleted, restarts).await {
            break;
        }
        restarts += 1;
        cluster.event(&name, EventKind::Restarting, format!("restart {restarts}"));
    }
    // The sandbox (and the pod's address) goes away a moment after the last container.
    let gone_at = cluster.clock.now() + opts.sandbox_teardown;
    cluster.update_pod(&name, |p| {
        p.running = false;
        p.ready = false;
        p.gone = Some(gone_at);
        if p.deleted.is_none() {
            p.deleted = Some(cluster.clock.now());
        }
    });
}

/// Sleeps the CrashLoopBackOff for restart number `restarts` (0 = none); true if the pod was
/// deleted meanwhile.
async fn backoff(deleted: &mut watch::Receiver<bool>, restarts: u32) -> bool {
    if restarts == 0 {
        return *deleted.borrow();
    }
    let d = BACKOFF_START.saturating_mul(1 << (restarts - 1).min(16)).min(BACKOFF_MAX);
    let woke = tokio::select! {
        _ = tokio::time::sleep(d) => false,
        _ = deleted.wait_for(|d| *d) => true,
    };
    woke || *deleted.borrow()
}

fn stop_probes(cluster: &Cluster, name: &str, tasks: Tasks) {
    drop(tasks);
    cluster.update_pod(name, |p| {
        p.running = false;
        p.started = false;
        if p.ready {
            p.ready = false;
        }
        p.ready_since = None;
    });
}

/// preStop, stop signal, SIGKILL at the deadline. `since` is when the kill was decided.
async fn terminate(
    cluster: &Cluster,
    name: &str,
    plan: &ContainerPlan,
    log: &std::path::Path,
    child: &mut Child,
    since: Duration,
    grace: Duration,
) {
    let mut deadline = cluster.clock.instant(since + grace);
    if let Some(hook) = &plan.pre_stop {
        cluster.event(name, EventKind::PreStopStarted, "");
        let budget = deadline.saturating_duration_since(tokio::time::Instant::now());
        tokio::select! {
            r = prober::run(hook, budget, &plan.env, log) => match r {
                Ok(()) => cluster.event(name, EventKind::PreStopFinished, ""),
                Err(e) => {
                    let overran = tokio::time::Instant::now() >= deadline;
                    cluster.event(name, EventKind::PreStopFailed, e);
                    if overran {
                        deadline = tokio::time::Instant::now() + PRESTOP_OVERRUN_EXTENSION;
                    }
                }
            },
            s = child.wait() => {
                // The container stopped by itself during preStop: nothing left to signal.
                let how = s.map(|s| describe_exit(&s)).unwrap_or_else(|e| e.to_string());
                cluster.update_pod(name, |p| p.exited = Some(cluster.clock.now()));
                cluster.event(name, EventKind::Exited, format!("{how} (during preStop)"));
                return;
            }
        }
    }
    send_signal(child, plan.stop_signal);
    cluster.update_pod(name, |p| p.sigterm = Some(cluster.clock.now()));
    cluster.event(name, EventKind::Sigterm, signal_name(plan.stop_signal));
    let status = tokio::select! {
        s = child.wait() => s,
        _ = tokio::time::sleep_until(deadline) => {
            cluster.event(name, EventKind::Sigkill, "grace period over");
            let _ = child.start_kill();
            child.wait().await
        }
    };
    let how = status.map(|s| describe_exit(&s)).unwrap_or_else(|e| e.to_string());
    cluster.update_pod(name, |p| {
        p.exited = Some(cluster.clock.now());
        p.running = false;
    });
    cluster.event(name, EventKind::Exited, how);
}

/// The probe worker's clock: the initial delay, then once per period.
async fn ticker(plan: &ProbePlan) -> tokio::time::Interval {
    tokio::time::sleep(plan.initial_delay).await;
    let mut tick = tokio::time::interval(plan.period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick
}

async fn startup_probe(
    cluster: Arc<Cluster>,
    name: String,
    p: ProbePlan,
    plan: Arc<ContainerPlan>,
    log: PathBuf,
    started: watch::Sender<bool>,
    kill: mpsc::UnboundedSender<(Duration, String)>,
) {
    let mut t = Thresholds::new(1, p.failure_threshold, false);
    let mut tick = ticker(&p).await;
    loop {
        tick.tick().await;
        let r = prober::run(&p.handler, p.timeout, &plan.env, &log).await;
        t.record(r.is_ok());
        if t.result() {
            cluster.update_pod(&name, |pod| pod.started = true);
            started.send_replace(true);
            return;
        }
        if t.failed_out() {
            let why = format!("startup probe failed: {}", r.err().unwrap_or_default());
            let _ = kill.send((p.grace.unwrap_or(plan.grace), why));
            return;
        }
    }
}

async fn readiness_probe(
    cluster: Arc<Cluster>,
    name: String,
    p: ProbePlan,
    plan: Arc<ContainerPlan>,
    log: PathBuf,
    mut started: watch::Receiver<bool>,
) {
    if started.wait_for(|s| *s).await.is_err() {
        return;
    }
    let mut t = Thresholds::new(p.success_threshold, p.failure_threshold, false);
    let mut tick = ticker(&p).await;
    loop {
        tick.tick().await;
        let r = prober::run(&p.handler, p.timeout, &plan.env, &log).await;
        if let Some(ready) = t.record(r.is_ok()) {
            let now = cluster.clock.now();
            cluster.update_pod(&name, |pod| {
                pod.ready = ready;
                pod.ready_since = ready.then_some(now);
            });
            let detail = r.err().unwrap_or_default();
            cluster.event(&name, if ready { EventKind::Ready } else { EventKind::NotReady }, detail);
        }
    }
}

async fn ready_when_started(cluster: Arc<Cluster>, name: String, mut started: watch::Receiver<bool>) {
    if started.wait_for(|s| *s).await.is_ok() {
        let now = cluster.clock.now();
        cluster.update_pod(&name, |pod| {
            pod.ready = true;
            pod.ready_since = Some(now);
        });
        cluster.event(&name, EventKind::Ready, "no readiness probe");
    }
}

async fn liveness_probe(
    p: ProbePlan,
    plan: Arc<ContainerPlan>,
    log: PathBuf,
    mut started: watch::Receiver<bool>,
    kill: mpsc::UnboundedSender<(Duration, String)>,
) {
    if started.wait_for(|s| *s).await.is_err() {
        return;
    }
    let mut t = Thresholds::new(p.success_threshold, p.failure_threshold, true);
    let mut tick = ticker(&p).await;
    loop {
        tick.tick().await;
        let r = prober::run(&p.handler, p.timeout, &plan.env, &log).await;
        if t.record(r.is_ok()) == Some(false) {
            let why = format!("liveness probe failed: {}", r.err().unwrap_or_default());
            let _ = kill.send((p.grace.unwrap_or(plan.grace), why));
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::api::cluster::{Clock, Pod};
    use crate::lab::network::ipam::{Mode, Net};
    use crate::lab::node::pod_spec::Handler;

    fn plan(script: &str, grace_ms: u64) -> ContainerPlan {
        ContainerPlan {
            program: "/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
            env: vec![("PATH".into(), std::env::var("PATH").unwrap_or_default())],
            cwd: None,
            startup: None,
            readiness: None,
            liveness: None,
            pre_stop: None,
            stop_signal: libc::SIGTERM,
            grace: Duration::from_millis(grace_ms),
            named_ports: Default::default(),
            container_ports: vec![],
        }
    }

    fn add_pod(cluster: &Cluster, name: &str) {
        let net = Net::in_block(Mode::PerIp, 251).pod(&[]).unwrap();
        cluster.add_pod(Pod {
            name: name.into(),
            namespace: "default".into(),
            deployment: "d".into(),
            template_hash: "h".into(),
            labels: Default::default(),
            ip: net.ip,
            net,
            named_ports: Default::default(),
            created: Duration::ZERO,
            running: false,
            started: false,
            ready: false,
            ready_since: None,
            deleted: None,
            sigterm: None,
            exited: None,
            gone: None,
            restarts: 0,
        });
    }

    fn kinds(cluster: &Cluster) -> Vec<EventKind> {
        cluster.events().iter().map(|e| e.kind).collect()
    }

    fn options() -> KubeletOptions {
        KubeletOptions { sandbox_teardown: Duration::from_millis(100) }
    }

    async fn wait_for(cluster: &Cluster, what: impl Fn(&Pod) -> bool) {
        let until = tokio::time::Instant::now() + Duration::from_secs(10);
        while !cluster.pods().first().is_some_and(&what) {
            assert!(tokio::time::Instant::now() < until, "timed out: {:?}", kinds(cluster));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn deletion_runs_prestop_then_sigterm() {
        let dir = tempfile::tempdir().unwrap();
        let cluster = Arc::new(Cluster::new(Clock::new()));
        add_pod(&cluster, "p");
        let mut p = plan("exec sleep 30", 5000);
        p.pre_stop = Some(Handler::Sleep(Duration::from_millis(300)));
        let mut h = start(cluster.clone(), "p".into(), p, dir.path().join("log"), options());
        wait_for(&cluster, |p| p.ready).await;
        h.delete(&cluster);
        tokio::time::timeout(Duration::from_secs(10), h.wait()).await.unwrap();
        let pod = cluster.pod("p").unwrap();
        let held = pod.sigterm.unwrap() - pod.deleted.unwrap();
        assert!(held >= Duration::from_millis(290), "SIGTERM only after preStop: {held:?}");
        let k = kinds(&cluster);
        let pos = |x: EventKind| k.iter().position(|e| *e == x).unwrap();
        assert!(pos(EventKind::PreStopStarted) < pos(EventKind::PreStopFinished));
        assert!(pos(EventKind::PreStopFinished) < pos(EventKind::Sigterm));
        assert!(pos(EventKind::Sigterm) < pos(EventKind::Exited));
        assert!(!k.contains(&EventKind::Sigkill));
        assert!(pod.gone.is_some());
    }

    #[tokio::test]
    async fn sigkill_when_the_grace_period_runs_out() {
        let dir = tempfile::tempdir().unwrap();
        let cluster = Arc::new(Cluster::new(Clock::new()));
        add_pod(&cluster, "p");
        // Ignores SIGTERM; the grace period (counted from deletion) ends it.
        let mut h = start(
            cluster.clone(),
            "p".into(),
            plan("trap '' TERM; while :; do sleep 0.1; done", 700),
            dir.path().join("log"),
            options(),
        );
        wait_for(&cluster, |p| p.running).await;
        h.delete(&cluster);
        tokio::time::timeout(Duration::from_secs(10), h.wait()).await.unwrap();
        let pod = cluster.pod("p").unwrap();
        let lived = pod.exited.unwrap() - pod.deleted.unwrap();
        assert!(kinds(&cluster).contains(&EventKind::Sigkill));
        assert!(lived >= Duration::from_millis(650) && lived < Duration::from_secs(3), "{lived:?}");
    }

    #[tokio::test]
    async fn liveness_failure_restarts_the_container_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let cluster = Arc::new(Cluster::new(Clock::new()));
        add_pod(&cluster, "p");
        let mut p = plan("exec sleep 30", 1000);
        p.liveness = Some(ProbePlan {
            handler: Handler::Exec { program: "false".into(), args: vec![] },
            initial_delay: Duration::ZERO,
            period: Duration::from_millis(100),
            timeout: Duration::from_secs(1),
            success_threshold: 1,
            failure_threshold: 2,
            grace: Some(Duration::from_millis(500)),
        });
        let h = start(cluster.clone(), "p".into(), p, dir.path().join("log"), options());
        wait_for(&cluster, |p| p.restarts >= 1).await;
        let k = kinds(&cluster);
        assert!(k.contains(&EventKind::ProbeFailed) && k.contains(&EventKind::Restarting), "{k:?}");
        assert!(cluster.pod("p").unwrap().deleted.is_none(), "a restart is not a deletion");
        drop(h);
    }
}
