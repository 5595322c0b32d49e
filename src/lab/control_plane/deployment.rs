//! The Deployment controller's rollout: `kubectl rollout restart` stamps the template, which makes
//! a new ReplicaSet; RollingUpdate then scales it up and the old one down within maxSurge /
//! maxUnavailable (percentages rounded as Kubernetes does: surge up, unavailable down),
//! counting a pod as available once Ready for minReadySeconds. Terminating pods count for
//! neither side, exactly as in Kubernetes, which is why a rollout "completes" while old pods
//! are still shutting down.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::PodTemplateSpec;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Serialize;

use crate::lab::api::cluster::{ser_ms, ser_opt_ms, Pod};
use crate::lab::control_plane::replicaset::{template_hash, PodFactory};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Strategy {
    RollingUpdate { max_surge: u32, max_unavailable: u32 },
    Recreate,
}

pub struct DeploymentCtl {
    pub name: String,
    pub namespace: String,
    pub replicas: u32,
    pub strategy: Strategy,
    pub min_ready: Duration,
    pub progress_deadline: Duration,
    template: PodTemplateSpec,
    pub hash: String,
    /// Pods this controller deleted whose stop the current rollout has not yet waited for.
    deleted: Vec<String>,
}

/// What one rollout did, times from the run's start.
#[derive(Debug, Clone, Serialize)]
pub struct RolloutStats {
    pub deployment: String,
    #[serde(serialize_with = "ser_ms", rename = "started_ms")]
    pub started: Duration,
    /// When Kubernetes would call it "successfully rolled out".
    #[serde(serialize_with = "ser_ms", rename = "complete_ms")]
    pub complete: Duration,
    /// When the last old pod's container had stopped.
    #[serde(serialize_with = "ser_opt_ms", rename = "old_pods_exited_ms")]
    pub old_pods_exited: Option<Duration>,
    pub new_pods: Vec<String>,
    pub old_pods: Vec<String>,
}

/// `maxSurge` rounds up, `maxUnavailable` down; both zero means one unavailable.
pub fn resolve_fenceposts(
    surge: Option<&IntOrString>,
    unavailable: Option<&IntOrString>,
    replicas: u32,
) -> Result<(u32, u32)> {
    let default = IntOrString::String("25%".into());
    let scaled = |v: &IntOrString, round_up: bool| -> Result<u32> {
        Ok(match v {
            IntOrString::Int(i) => u32::try_from(*i).context("negative value")?,
            IntOrString::String(s) => {
                let pct: f64 = s
                    .strip_suffix('%')
                    .and_then(|p| p.parse().ok())
                    .with_context(|| format!("`{s}` is not a percentage"))?;
                let exact = pct * f64::from(replicas) / 100.0;
                // Guard float noise (e.g. 25% of 4 = 1.0000000002).
                let exact = (exact * 1e9).round() / 1e9;
                (if round_up { exact.ceil() } else { exact.floor() }) as u32
            }
        })
    };
    let s = scaled(surge.unwrap_or(&default), true).context("maxSurge")?;
    let mut u = scaled(unavailable.unwrap_or(&default), false).context("maxUnavailable")?;
    if s == 0 && u == 0 {
        u = 1;
    }
    Ok((s, u))
}

impl DeploymentCtl {
    pub fn from_manifest(d: &Deployment) -> Result<DeploymentCtl> {
        let name = d.metadata.name.clone().context("Deployment without a name")?;
        let id = format!("Deployment/{name}");
        let spec = d.spec.as_ref().with_context(|| format!("{id}: no spec"))?;
        let replicas = u32::try_from(spec.replicas.unwrap_or(1)).with_context(|| format!("{id}: spec.replicas"))?;
        let strategy = match spec.strategy.as_ref().and_then(|s| s.type_.as_deref()) {
            Some("Recreate") => Strategy::Recreate,
            _ => {
                let ru = spec.strategy.as_ref().and_then(|s| s.rolling_update.as_ref());
                let (max_surge, max_unavailable) = resolve_fenceposts(
                    ru.and_then(|r| r.max_surge.as_ref()),
                    ru.and_then(|r| r.max_unavailable.as_ref()),
                    replicas,
                )
                .with_context(|| format!("{id}: spec.strategy.rollingUpdate"))?;
                Strategy::RollingUpdate { max_surge, max_unavailable }
            }
        };
        let template = spec.template.clone();
        Ok(DeploymentCtl {
            hash: template_hash(&template),
            namespace: crate::lab::api::manifest::namespace_of(&d.metadata),
            name,
            replicas,
            strategy,
            min_ready: Duration::from_secs(spec.min_ready_seconds.unwrap_or(0).max(0) as u64),
            progress_deadline: Duration::from_secs(spec.progress_deadline_seconds.unwrap_or(600).max(1) as u64),
            template,
            deleted: Vec::new(),
        })
    }

    fn live_pods(&self, f: &PodFactory) -> Vec<Pod> {
        f.cluster
            .pods()
            .into_iter()
            .filter(|p| p.deployment == self.name && p.namespace == self.namespace && p.deleted.is_none())
            .collect()
    }

    fn create(&mut self, f: &PodFactory) -> Result<()> {
        f.create(&self.name, &self.namespace, &self.template, &self.hash)?;
        Ok(())
    }

    /// Deletion goes through the store, as through the API server; the kubelet does the rest.
    fn delete(&mut self, f: &PodFactory, pod: &str) {
        f.cluster.delete_pod(pod);
        self.deleted.push(pod.to_string());
    }

    /// A pod the kubelet could not start fails the Deployment at once (no retry in the lab).
    fn check_config(&self, pods: &[Pod]) -> Result<()> {
        match pods.iter().find_map(|p| Some((&p.name, p.config_error.as_ref()?))) {
            Some((pod, e)) => bail!("Deployment/{}: pod {pod}: {e}", self.name),
            None => Ok(()),
        }
    }

    /// Creates the first ReplicaSet's pods and waits until all are available.
    pub async fn start(&mut self, f: &PodFactory, limit: Duration) -> Result<()> {
        for _ in 0..self.replicas {
            self.create(f)?;
        }
        let until = tokio::time::Instant::now() + limit.min(self.progress_deadline);
        let mut changes = f.cluster.subscribe();
        loop {
            let now = f.cluster.clock.now();
            let pods = self.live_pods(f);
            self.check_config(&pods)?;
            let available = pods.iter().filter(|p| p.available(now, self.min_ready)).count() as u32;
            if available >= self.replicas {
                return Ok(());
            }
            if tokio::time::Instant::now() >= until {
                bail!(
                    "Deployment/{}: {available} of {} pods available after {:?} (see the pod logs under {})",
                    self.name,
                    self.replicas,
                    limit,
                    f.pods_dir.display()
                );
            }
            wait_change(&mut changes).await;
        }
    }

    /// `kubectl rollout restart`, then the controller's reconcile loop until the rollout is
    /// complete and every old pod has stopped.
    pub async fn rollout_restart(&mut self, f: &PodFactory, limit: Duration) -> Result<RolloutStats> {
        let started = f.cluster.clock.now();
        let md = self.template.metadata.get_or_insert_with(Default::default);
        md.annotations
            .get_or_insert_with(BTreeMap::new)
            .insert("kubectl.kubernetes.io/restartedAt".into(), format!("{:.3}", started.as_secs_f64()));
        self.hash = template_hash(&self.template);
        let new_hash = self.hash.clone();
        let old_pods: Vec<String> = self.live_pods(f).into_iter().map(|p| p.name).collect();
        let until = tokio::time::Instant::now() + limit.min(self.progress_deadline);
        let mut changes = f.cluster.subscribe();
        let complete = loop {
            let now = f.cluster.clock.now();
            let pods = self.live_pods(f);
            self.check_config(&pods)?;
            let (new, old): (Vec<&Pod>, Vec<&Pod>) = pods.iter().partition(|p| p.template_hash == new_hash);
            let new_available = new.iter().filter(|p| p.available(now, self.min_ready)).count() as u32;
            if new.len() as u32 == self.replicas && new_available == self.replicas && old.is_empty() {
                break now;
            }
            if tokio::time::Instant::now() >= until {
                bail!(
                    "Deployment/{}: rollout made no progress within {:?} ({} new pods, {new_available} available, {} old)",
                    self.name,
                    limit.min(self.progress_deadline),
                    new.len(),
                    old.len()
                );
            }
            let terminating = self.terminating(f);
            let (creates, deletes) = self.plan_step(&new, &old, terminating, now);
            for _ in 0..creates {
                self.create(f)?;
            }
            for name in &deletes {
                self.delete(f, name);
            }
            if creates == 0 && deletes.is_empty() {
                wait_change(&mut changes).await;
            }
        };
        let old_pods_exited = self.reap(f, until).await?;
        let new_pods = self.live_pods(f).into_iter().map(|p| p.name).collect();
        Ok(RolloutStats { deployment: self.name.clone(), started, complete, old_pods_exited, new_pods, old_pods })
    }

    /// Deleted pods whose container has not stopped yet.
    fn terminating(&self, f: &PodFactory) -> usize {
        f.cluster
            .pods()
            .iter()
            .filter(|p| {
                p.deployment == self.name && p.namespace == self.namespace && p.deleted.is_some() && p.gone.is_none()
            })
            .count()
    }

    /// One reconcile step: how many new pods to create and which old pods to delete.
    /// `terminating`: deleted pods still running (only Recreate waits for them).
    fn plan_step(&self, new: &[&Pod], old: &[&Pod], terminating: usize, now: Duration) -> (u32, Vec<String>) {
        let replicas = self.replicas;
        let avail = |p: &&&Pod| p.available(now, self.min_ready);
        match self.strategy {
            Strategy::Recreate => {
                if !old.is_empty() {
                    return (0, old.iter().map(|p| p.name.clone()).collect());
                }
                // New pods only once every old container has stopped.
                if terminating > 0 && new.is_empty() {
                    return (0, Vec::new());
                }
                (replicas.saturating_sub(new.len() as u32), Vec::new())
            }
            Strategy::RollingUpdate { max_surge, max_unavailable } => {
                let total = (new.len() + old.len()) as u32;
                // reconcileNewReplicaSet
                let creates = if (new.len() as u32) < replicas {
                    (replicas + max_surge).saturating_sub(total).min(replicas - new.len() as u32)
                } else {
                    0
                };
                // reconcileOldReplicaSets, with the pods just created counted as unavailable
                let all = total + creates;
                let min_available = replicas.saturating_sub(max_unavailable);
                let new_unavailable = (new.len() as u32 + creates) - new.iter().filter(avail).count() as u32;
                let max_scaled_down = all as i64 - min_available as i64 - new_unavailable as i64;
                let mut deletes = Vec::new();
                if max_scaled_down > 0 && !old.is_empty() {
                    // Unhealthy old pods go first: removing them costs no availability.
                    let mut unhealthy: Vec<&&Pod> = old.iter().filter(|p| !avail(p)).collect();
                    unhealthy.sort_by_key(|p| std::cmp::Reverse(p.created));
                    for p in unhealthy.iter().take(max_scaled_down as usize) {
                        deletes.push(p.name.clone());
                    }
                    let total_available = old.iter().chain(new.iter()).filter(avail).count() as i64;
                    let room = (total_available - min_available as i64).min(max_scaled_down - deletes.len() as i64);
                    if room > 0 {
                        // Among ready pods the ReplicaSet deletes the most recently ready first.
                        let mut healthy: Vec<&&Pod> = old.iter().filter(|p| avail(p)).collect();
                        healthy.sort_by_key(|p| std::cmp::Reverse(p.ready_since));
                        for p in healthy.iter().take(room as usize) {
                            deletes.push(p.name.clone());
                        }
                    }
                }
                (creates, deletes)
            }
        }
    }

    /// Waits, in the store, for the pods this rollout deleted to stop; returns when the last one did.
    async fn reap(&mut self, f: &PodFactory, until: tokio::time::Instant) -> Result<Option<Duration>> {
        // Bounded by the pods' own grace periods; `until` is a backstop.
        let deadline = until.max(tokio::time::Instant::now() + Duration::from_secs(40));
        let names = std::mem::take(&mut self.deleted);
        let mut changes = f.cluster.subscribe();
        loop {
            changes.borrow_and_update();
            let pods: Vec<Pod> = names.iter().filter_map(|n| f.cluster.pod(n)).collect();
            let Some(running) = pods.iter().find(|p| p.gone.is_none()) else {
                return Ok(pods.iter().filter_map(|p| p.exited).max());
            };
            if tokio::time::timeout_at(deadline, changes.changed()).await.is_err() {
                bail!("pod {} did not stop in time", running.name);
            }
        }
    }
}

async fn wait_change(changes: &mut tokio::sync::watch::Receiver<u64>) {
    // minReadySeconds turns into availability without any change event: poll too.
    let _ = tokio::time::timeout(Duration::from_millis(50), changes.changed()).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pct(s: &str) -> IntOrString {
        IntOrString::String(s.into())
    }

    #[test]
    fn fenceposts_round_like_kubernetes() {
        assert_eq!(resolve_fenceposts(None, None, 2).unwrap(), (1, 0));
        assert_eq!(resolve_fenceposts(None, None, 4).unwrap(), (1, 1));
        assert_eq!(resolve_fenceposts(None, None, 10).unwrap(), (3, 2));
        assert_eq!(resolve_fenceposts(Some(&IntOrString::Int(0)), Some(&IntOrString::Int(0)), 3).unwrap(), (0, 1));
        assert_eq!(resolve_fenceposts(Some(&pct("50%")), Some(&pct("50%")), 3).unwrap(), (2, 1));
    }

    fn pod(name: &str, hash: &str, ready_for: Option<u64>) -> Pod {
        let net = crate::lab::network::ipam::Net::new(crate::lab::network::ipam::Mode::PerIp).pod(&[]).unwrap();
        Pod {
            running: true,
            started: true,
            ready: ready_for.is_some(),
            ready_since: ready_for.map(|s| Duration::from_secs(100 - s)),
            ..Pod::new(name, "d", hash, net)
        }
    }

    fn ctl(strategy: Strategy) -> DeploymentCtl {
        DeploymentCtl {
            name: "d".into(),
            namespace: "default".into(),
            replicas: 3,
            strategy,
            min_ready: Duration::ZERO,
            progress_deadline: Duration::from_secs(600),
            template: Default::default(),
            hash: "new".into(),
            deleted: Vec::new(),
        }
    }

    #[test]
    fn surge_one_unavailable_zero_waits_for_the_new_pod() {
        let c = ctl(Strategy::RollingUpdate { max_surge: 1, max_unavailable: 0 });
        let now = Duration::from_secs(100);
        let old = [pod("o1", "old", Some(50)), pod("o2", "old", Some(50)), pod("o3", "old", Some(50))];
        let old: Vec<&Pod> = old.iter().collect();
        // Step 1: one new pod, nothing deleted.
        assert_eq!(c.plan_step(&[], &old, 0, now), (1, vec![]));
        let n1 = pod("n1", "new", None);
        assert_eq!(c.plan_step(&[&n1], &old, 0, now), (0, vec![]));
        // The new pod is ready: one old pod goes.
        let n1 = pod("n1", "new", Some(1));
        let (creates, deletes) = c.plan_step(&[&n1], &old, 0, now);
        assert_eq!((creates, deletes.len()), (0, 1));
    }

    #[test]
    fn surge_one_unavailable_one_deletes_at_once() {
        let c = ctl(Strategy::RollingUpdate { max_surge: 1, max_unavailable: 1 });
        let now = Duration::from_secs(100);
        let old = [pod("o1", "old", Some(50)), pod("o2", "old", Some(50)), pod("o3", "old", Some(50))];
        let old: Vec<&Pod> = old.iter().collect();
        let (creates, deletes) = c.plan_step(&[], &old, 0, now);
        assert_eq!((creates, deletes.len()), (1, 1));
    }

    #[test]
    fn recreate_deletes_everything_first() {
        let c = ctl(Strategy::Recreate);
        let now = Duration::from_secs(100);
        let old = [pod("o1", "old", Some(50))];
        let old: Vec<&Pod> = old.iter().collect();
        assert_eq!(c.plan_step(&[], &old, 0, now), (0, vec!["o1".to_string()]));
        assert_eq!(c.plan_step(&[], &[], 1, now).0, 0, "waits for the old pod to stop");
        assert_eq!(c.plan_step(&[], &[], 0, now).0, 3);
    }
}
