//! The container runtime's part: start a pod's container, signal it, run commands inside it and
//! tell how it ended. Two runtimes: a child process of this binary (`--runtime process`), or a
//! container of the manifest's image under runc in the pod's network namespace (`--runtime oci`).

use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::PodTemplateSpec;
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tokio::process::{Child, Command};

use crate::lab::api::manifest::Manifest;
use crate::lab::api::signal;
use crate::lab::node::oci::{self, ContainerSpec, ImageStore};
use crate::lab::node::pod_spec::ContainerPlan;

/// Longer than any run: `wait` on a container is bounded by the lab's own limits.
const WAIT_FOREVER: Duration = Duration::from_secs(24 * 3600);
/// An aborted probe task lets go of the container within a scheduler tick or two.
const RELEASE_BOUND: Duration = Duration::from_secs(2);

/// The node's OCI side: one image store and one runc runtime for the whole lab.
pub struct OciNode {
    pub images: ImageStore,
    pub runtime: oci::Runtime,
    /// The images the manifests name, as unpacked before the first run.
    pub unpacked: Vec<Arc<oci::Image>>,
}

impl OciNode {
    /// The store of `refs` (plus graceful:latest from the CI-built archive beside `exe`, when
    /// present) and a runc runtime, both under `out`; every image the `manifests` name is
    /// unpacked now, and every securityContext and resources block checked, so that a missing
    /// image or a setting the runtime cannot honour fails before any pod starts.
    pub async fn start(
        refs: Vec<oci::ImageRef>,
        exe: &std::path::Path,
        out: &std::path::Path,
        manifests: &[&Manifest],
    ) -> Result<OciNode> {
        let refs = match ci_archive(exe) {
            Some(archive) => oci::with_default_graceful(refs, &archive),
            None => refs,
        };
        let images = ImageStore::new(out.join("images"), refs)?;
        let mut unpacked: Vec<Arc<oci::Image>> = Vec::new();
        for m in manifests {
            for d in &m.deployments {
                let pod = d.spec.as_ref().and_then(|s| s.template.spec.as_ref());
                for c in pod.map(|p| p.containers.as_slice()).unwrap_or_default() {
                    let name = d.metadata.name.as_deref().unwrap_or("?");
                    let image = c.image.as_deref().with_context(|| {
                        format!("{}: Deployment {name}: container `{}` names no image", m.source, c.name)
                    })?;
                    let at = || format!("{}: Deployment {name}", m.source);
                    let image = images.image(image).await.with_context(at)?;
                    if !unpacked.iter().any(|u| Arc::ptr_eq(u, &image)) {
                        unpacked.push(image);
                    }
                    // What the runtime would refuse at container start, refused now.
                    let pod_security = pod.and_then(|p| p.security_context.as_ref());
                    oci::Security::from_kubernetes(pod_security, c.security_context.as_ref()).with_context(at)?;
                    oci::Resources::from_kubernetes(c.resources.as_ref()).with_context(at)?;
                }
            }
        }
        let runtime = oci::Runtime::new(&out.join("oci")).await.context("--runtime oci")?;
        Ok(OciNode { images, runtime, unpacked })
    }

    /// For the report's first line: each image, its source and how long unpacking it took.
    pub fn describe(&self) -> String {
        let images: Vec<String> = self
            .unpacked
            .iter()
            .map(|i| format!("{} from {} (unpacked in {} ms)", i.name, i.source, i.unpack_time.as_millis()))
            .collect();
        format!("pods as OCI containers under runc: {}", images.join(", "))
    }
}

/// The image CI builds, `target/image/graceful.oci.tar`, when this binary is `target/{debug,release}/graceful`.
fn ci_archive(exe: &std::path::Path) -> Option<std::path::PathBuf> {
    let profile_dir = exe.parent()?;
    let profile = profile_dir.file_name()?.to_str()?;
    (profile == "debug" || profile == "release")
        .then(|| profile_dir.parent())?
        .map(|t| t.join("image/graceful.oci.tar"))
}

/// What runs the pods' containers on this node.
#[derive(Clone)]
pub enum ContainerRuntime {
    Process,
    Oci(Arc<OciNode>),
}

impl ContainerRuntime {
    pub fn is_oci(&self) -> bool {
        matches!(self, ContainerRuntime::Oci(_))
    }

    /// Starts pod `pod`'s container as `plan` says, its output appended to `log`.
    pub async fn start(
        &self,
        pod: &str,
        template: &PodTemplateSpec,
        plan: &ContainerPlan,
        log: &std::path::Path,
    ) -> Result<Running> {
        match self {
            ContainerRuntime::Process => Ok(Running::Process(spawn(plan, log)?)),
            ContainerRuntime::Oci(node) => start_container(node, pod, template, plan, log).await,
        }
    }
}

/// Container ids are unique for the whole lab: a restarted pod's new container is a new one.
static CONTAINERS: AtomicU64 = AtomicU64::new(0);

async fn start_container(
    node: &OciNode,
    pod: &str,
    template: &PodTemplateSpec,
    plan: &ContainerPlan,
    log: &std::path::Path,
) -> Result<Running> {
    let spec = template.spec.as_ref().context("pod template has no spec")?;
    let c = spec.containers.first().context("pod template has no container")?;
    let image_name = plan.image.as_deref().context("the container names no image")?;
    let image = node.images.image(image_name).await?;
    let netns = plan.netns.as_ref().context("--runtime oci needs the pod's network namespace")?;
    let cspec = ContainerSpec::from_kubernetes(spec, c, plan.env.clone(), plan.mounts.clone(), netns.path(), pod)?;
    // The manifest's stopSignal wins; else the image's STOPSIGNAL, as the kubelet does.
    let manifest_sets_one = c.lifecycle.as_ref().and_then(|l| l.stop_signal.as_ref()).is_some();
    let stop_signal = if manifest_sets_one { plan.stop_signal } else { image.config.stop_signal()? };
    let id = format!("{pod}-{}", CONTAINERS.fetch_add(1, Ordering::Relaxed));
    let container = node.runtime.run(&id, &image, &cspec, log).await?;
    Ok(Running::Container { container: Arc::new(container), stop_signal })
}

/// A started container.
pub enum Running {
    Process(Child),
    /// Shared with the pod's exec probes; the kubelet deletes it once they have stopped.
    Container {
        container: Arc<oci::Container>,
        stop_signal: Signal,
    },
}

impl Running {
    /// For the pod's events: its pid as the node sees it, and how it was started.
    pub fn describe(&self) -> String {
        match self {
            Running::Process(child) => format!("pid {}", child.id().unwrap_or(0)),
            Running::Container { container, .. } => format!(
                "pid {}, container {} (runc run {} ms)",
                container.pid(),
                container.id(),
                container.started_in().as_millis()
            ),
        }
    }

    /// The signal that asks it to stop: the plan's, or the image's STOPSIGNAL.
    pub fn stop_signal(&self, plan: &ContainerPlan) -> Signal {
        match self {
            Running::Process(_) => plan.stop_signal,
            Running::Container { stop_signal, .. } => *stop_signal,
        }
    }

    /// Where its exec probes and hooks run.
    pub fn exec_in(&self, plan: &ContainerPlan) -> ExecIn {
        match self {
            Running::Process(_) => ExecIn::Host { netns: plan.netns.clone() },
            Running::Container { container, .. } => ExecIn::Container(container.clone()),
        }
    }

    /// Waits for it to end; "exit code N" or "killed by SIGX".
    pub async fn wait(&mut self) -> String {
        match self {
            Running::Process(child) => match child.wait().await {
                Ok(s) => describe_exit(&s),
                Err(e) => e.to_string(),
            },
            Running::Container { container, .. } => match container.wait(WAIT_FOREVER).await {
                Ok(s) => describe_container_exit(&s),
                Err(e) => format!("{e:#}"),
            },
        }
    }

    /// Sends `sig` (through the runtime for a container).
    pub async fn signal(&self, sig: Signal) {
        match self {
            Running::Process(child) => send_signal(child, sig),
            Running::Container { container, .. } => {
                let _ = container.signal(sig).await;
            }
        }
    }

    /// SIGKILL.
    pub async fn kill(&mut self) {
        match self {
            Running::Process(child) => {
                let _ = child.start_kill();
            }
            Running::Container { container, .. } => {
                let _ = container.signal(Signal::SIGKILL).await;
            }
        }
    }

    /// Removes what is left of it once it has ended and its probes have stopped (a container's
    /// bundle, overlay and cgroup). A process needs nothing.
    pub async fn remove(self) {
        let Running::Container { mut container, .. } = self else { return };
        let deadline = tokio::time::Instant::now() + RELEASE_BOUND;
        loop {
            match Arc::try_unwrap(container) {
                Ok(c) => {
                    let _ = c.delete().await;
                    return;
                }
                // The last holder's drop removes it (blocking) if a probe task still holds it.
                Err(_) if tokio::time::Instant::now() >= deadline => return,
                Err(shared) => container = shared,
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// Where an exec handler runs: on the host (in the pod's network namespace, when it has one)
/// or inside the pod's container.
#[derive(Clone)]
pub enum ExecIn {
    Host { netns: Option<crate::lab::kernel_node::netns::Netns> },
    Container(Arc<oci::Container>),
}

/// Starts the container: this binary with the plan's arguments and environment, output to its log.
pub fn spawn(plan: &ContainerPlan, log: &std::path::Path) -> std::io::Result<Child> {
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
    if let Some(ns) = &plan.netns {
        ns.enter_on_exec(cmd.as_std_mut()).map_err(std::io::Error::other)?;
    }
    super::run_group::join(&mut cmd);
    #[cfg(target_os = "linux")]
    // SAFETY: prctl is async-signal-safe; it only asks the kernel to kill the child if the lab dies,
    // so no pod outlives a crashed lab.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
            Ok(())
        });
    }
    cmd.spawn()
}

/// Sends `sig` to the container while it is still ours.
pub fn send_signal(child: &Child, sig: Signal) {
    // `id()` is None once reaped, so the pid is still our own child's.
    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
        let _ = nix::sys::signal::kill(Pid::from_raw(pid), sig);
    }
}

/// "exit code N" or "killed by SIGX", for the pod's events.
pub fn describe_exit(s: &ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (s.code(), s.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(sig)) => format!("killed by {}", signal::describe(sig)),
        _ => "exited".into(),
    }
}

/// As [`describe_exit`] for a container's init, whose status `runc run` reports as a shell
/// does: 128 + N when signal N ended it, the same number as an exit with that code. The init is
/// PID 1 of its namespace, which no signal with a default action ends except SIGKILL from
/// outside and a fault it caused itself; any other 128 + N is an exit code (the problem
/// overlay's backend exits 143 on SIGTERM), as the process runtime reports it.
pub fn describe_container_exit(s: &ExitStatus) -> String {
    const KILLS_PID_1: [Signal; 6] =
        [Signal::SIGKILL, Signal::SIGSEGV, Signal::SIGBUS, Signal::SIGILL, Signal::SIGFPE, Signal::SIGSYS];
    match s.code().and_then(|c| Signal::try_from(c - 128).ok()) {
        Some(sig) if KILLS_PID_1.contains(&sig) => format!("killed by {}", sig.as_str()),
        _ => describe_exit(s),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    #[test]
    fn a_containers_128_plus_n_is_a_signal_only_where_pid_1_can_die_of_it() {
        assert_eq!(describe_container_exit(&ExitStatus::from_raw(137 << 8)), "killed by SIGKILL");
        assert_eq!(describe_container_exit(&ExitStatus::from_raw(139 << 8)), "killed by SIGSEGV");
        assert_eq!(describe_container_exit(&ExitStatus::from_raw(143 << 8)), "exit code 143");
        assert_eq!(describe_container_exit(&ExitStatus::from_raw(3 << 8)), "exit code 3");
        assert_eq!(describe_exit(&ExitStatus::from_raw(9)), "killed by SIGKILL");
    }
}
