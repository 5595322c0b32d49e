//! A container's securityContext as the runtime applies it: the pod's and the container's fields
//! merged (the container's win), capabilities resolved against the runtime's default set.

use anyhow::{bail, Context, Result};
use k8s_openapi::api::core::v1::{PodSecurityContext, SecurityContext};
use oci_spec::runtime::{Capabilities, Capability};

/// The capabilities a container gets when its securityContext neither adds nor drops any: the
/// set containerd and CRI-O give (Docker's historical default).
pub const DEFAULT_CAPABILITIES: [Capability; 14] = [
    Capability::Chown,
    Capability::DacOverride,
    Capability::Fsetid,
    Capability::Fowner,
    Capability::Mknod,
    Capability::NetRaw,
    Capability::Setgid,
    Capability::Setuid,
    Capability::Setfcap,
    Capability::Setpcap,
    Capability::NetBindService,
    Capability::SysChroot,
    Capability::Kill,
    Capability::AuditWrite,
];

/// `seccompProfile.type`, as far as this runtime implements it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seccomp {
    /// The runtime's own allow-list (see seccomp.rs).
    RuntimeDefault,
    /// No filter: Kubernetes' default when neither the pod nor the container sets a profile.
    Unconfined,
}

/// What the runtime applies for one container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Security {
    /// None: the image's user.
    pub run_as_user: Option<u32>,
    /// None: the image's group (or the user's primary group).
    pub run_as_group: Option<u32>,
    pub run_as_non_root: bool,
    /// Pod-level `supplementalGroups` and `fsGroup`, added to the process's groups.
    pub supplemental_groups: Vec<u32>,
    pub read_only_root: bool,
    /// `allowPrivilegeEscalation: false`.
    pub no_new_privileges: bool,
    /// The final set: bounding, effective, permitted (and nothing inheritable or ambient).
    pub capabilities: Capabilities,
    pub seccomp: Seccomp,
}

impl Default for Security {
    /// What a container with no securityContext at all gets.
    fn default() -> Security {
        Security::from_kubernetes(None, None).expect("the empty securityContext is valid")
    }
}

impl Security {
    /// Merges the pod's and the container's contexts, the container's fields first. Settings this
    /// runtime cannot honour (privileged, Localhost seccomp profiles, unknown capabilities) are
    /// errors naming the field.
    pub fn from_kubernetes(pod: Option<&PodSecurityContext>, c: Option<&SecurityContext>) -> Result<Security> {
        let pod = pod.cloned().unwrap_or_default();
        let c = c.cloned().unwrap_or_default();
        if c.privileged == Some(true) {
            bail!("securityContext.privileged: privileged containers are not supported by the lab's runtime");
        }
        let id = |v: Option<i64>, field: &str| -> Result<Option<u32>> {
            v.map(|v| u32::try_from(v).with_context(|| format!("securityContext.{field}: {v} is not a valid id")))
                .transpose()
        };
        let mut supplemental_groups = Vec::new();
        for g in pod.supplemental_groups.iter().flatten().chain(pod.fs_group.iter()) {
            let g = u32::try_from(*g).with_context(|| format!("pod securityContext: group {g} is not a valid id"))?;
            if !supplemental_groups.contains(&g) {
                supplemental_groups.push(g);
            }
        }
        let seccomp = match c.seccomp_profile.or(pod.seccomp_profile) {
            None => Seccomp::Unconfined,
            Some(p) => match p.type_.as_str() {
                "RuntimeDefault" => Seccomp::RuntimeDefault,
                "Unconfined" => Seccomp::Unconfined,
                other => bail!(
                    "securityContext.seccompProfile.type `{other}` is not supported (RuntimeDefault or Unconfined)"
                ),
            },
        };
        Ok(Security {
            run_as_user: id(c.run_as_user.or(pod.run_as_user), "runAsUser")?,
            run_as_group: id(c.run_as_group.or(pod.run_as_group), "runAsGroup")?,
            run_as_non_root: c.run_as_non_root.or(pod.run_as_non_root).unwrap_or(false),
            supplemental_groups,
            read_only_root: c.read_only_root_filesystem.unwrap_or(false),
            no_new_privileges: c.allow_privilege_escalation == Some(false),
            capabilities: capabilities(c.capabilities.as_ref())?,
            seccomp,
        })
    }
}

/// The default set, less `drop` (`ALL` drops everything), plus `add`.
fn capabilities(caps: Option<&k8s_openapi::api::core::v1::Capabilities>) -> Result<Capabilities> {
    let mut set: Capabilities = DEFAULT_CAPABILITIES.into_iter().collect();
    let Some(caps) = caps else { return Ok(set) };
    for name in caps.drop.iter().flatten() {
        if name.eq_ignore_ascii_case("ALL") {
            set.clear();
        } else {
            set.remove(&parse_capability(name, "drop")?);
        }
    }
    for name in caps.add.iter().flatten() {
        if name.eq_ignore_ascii_case("ALL") {
            bail!("securityContext.capabilities.add: ALL is not supported by the lab's runtime");
        }
        set.insert(parse_capability(name, "add")?);
    }
    Ok(set)
}

/// `NET_ADMIN` or `CAP_NET_ADMIN`.
fn parse_capability(name: &str, list: &str) -> Result<Capability> {
    let bare = name.strip_prefix("CAP_").unwrap_or(name);
    bare.parse::<Capability>()
        .map_err(|_| anyhow::anyhow!("securityContext.capabilities.{list}: unknown capability `{name}`"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Capabilities as KubeCapabilities, SeccompProfile};

    fn seccomp(t: &str) -> Option<SeccompProfile> {
        Some(SeccompProfile { type_: t.into(), ..Default::default() })
    }

    #[test]
    fn the_container_wins_over_the_pod() {
        let pod = PodSecurityContext {
            run_as_user: Some(1000),
            run_as_group: Some(1000),
            run_as_non_root: Some(true),
            seccomp_profile: seccomp("RuntimeDefault"),
            supplemental_groups: Some(vec![5, 6]),
            fs_group: Some(6),
            ..Default::default()
        };
        let c =
            SecurityContext { run_as_user: Some(65532), seccomp_profile: seccomp("Unconfined"), ..Default::default() };
        let s = Security::from_kubernetes(Some(&pod), Some(&c)).unwrap();
        assert_eq!((s.run_as_user, s.run_as_group, s.run_as_non_root), (Some(65532), Some(1000), true));
        assert_eq!(s.seccomp, Seccomp::Unconfined);
        assert_eq!(s.supplemental_groups, [5, 6]);
        assert_eq!(Security::from_kubernetes(Some(&pod), None).unwrap().seccomp, Seccomp::RuntimeDefault);
    }

    #[test]
    fn the_manifests_hardening_maps_to_runtime_settings() {
        let c = SecurityContext {
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            capabilities: Some(KubeCapabilities {
                drop: Some(vec!["ALL".into()]),
                add: Some(vec!["NET_BIND_SERVICE".into()]),
            }),
            ..Default::default()
        };
        let s = Security::from_kubernetes(None, Some(&c)).unwrap();
        assert!(s.read_only_root && s.no_new_privileges);
        assert_eq!(s.capabilities, Capabilities::from([Capability::NetBindService]));
    }

    #[test]
    fn no_context_is_kubernetes_default() {
        let s = Security::default();
        assert_eq!(s.capabilities.len(), DEFAULT_CAPABILITIES.len());
        assert!(!s.read_only_root && !s.no_new_privileges && !s.run_as_non_root);
        assert_eq!((s.run_as_user, s.seccomp), (None, Seccomp::Unconfined));

        let c = SecurityContext {
            capabilities: Some(KubeCapabilities { drop: Some(vec!["CAP_NET_RAW".into()]), add: None }),
            ..Default::default()
        };
        let s = Security::from_kubernetes(None, Some(&c)).unwrap();
        assert!(!s.capabilities.contains(&Capability::NetRaw) && s.capabilities.contains(&Capability::Chown));
    }

    #[test]
    fn unsupported_settings_name_their_field() {
        let cases = [
            (SecurityContext { privileged: Some(true), ..Default::default() }, "privileged"),
            (SecurityContext { seccomp_profile: seccomp("Localhost"), ..Default::default() }, "`Localhost`"),
            (SecurityContext { run_as_user: Some(-1), ..Default::default() }, "runAsUser: -1"),
            (
                SecurityContext {
                    capabilities: Some(KubeCapabilities { add: Some(vec!["FLY".into()]), drop: None }),
                    ..Default::default()
                },
                "capabilities.add: unknown capability `FLY`",
            ),
        ];
        for (c, expected) in cases {
            let e = Security::from_kubernetes(None, Some(&c)).unwrap_err().to_string();
            assert!(e.contains(expected), "{e}");
        }
    }
}
