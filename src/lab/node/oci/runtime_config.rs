//! From a pod's container to the OCI runtime config (config.json) runc runs: the command line as
//! Kubernetes builds it from the image, the environment, the user, the securityContext, the
//! volume mounts, the pod's network namespace and the pod's name as hostname.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use oci_spec::runtime::{
    Capabilities, LinuxBuilder, LinuxCapabilitiesBuilder, LinuxDeviceCgroupBuilder, LinuxNamespace,
    LinuxNamespaceBuilder, LinuxNamespaceType, Mount, MountBuilder, PosixRlimitBuilder, PosixRlimitType,
    ProcessBuilder, RootBuilder, Spec, SpecBuilder, UserBuilder,
};

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, PodSpec};

use super::image_store::ImageRunConfig;
use super::resources::Resources;
use super::security::{Seccomp, Security};
use super::user;
use crate::lab::node::pod_spec::expand;

/// The PATH a container gets when its image sets none (as containerd does).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Open files per process: the lab's own hard limit, soft and hard (pods under containerd
/// inherit its limit the same way). runc applies it after dropping capabilities, so a higher
/// value would be refused.
fn nofile() -> u64 {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).map_or(1024, |(_, hard)| hard)
}

/// A host directory mounted into the container (a ConfigMap's files, an emptyDir).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindMount {
    pub source: PathBuf,
    pub destination: PathBuf,
    pub read_only: bool,
}

/// What the kubelet decides about one container, resolved (Downward API values filled in).
#[derive(Debug, Clone)]
pub struct ContainerSpec {
    /// `command`: replaces the image's Entrypoint (and drops its Cmd).
    pub command: Option<Vec<String>>,
    /// `args`: replace the image's Cmd.
    pub args: Option<Vec<String>>,
    /// After the image's own variables, overriding them by name.
    pub env: Vec<(String, String)>,
    /// `workingDir`; the image's when None.
    pub working_dir: Option<String>,
    pub security: Security,
    pub mounts: Vec<BindMount>,
    /// The pod's network namespace, e.g. /run/netns/pod-3.
    pub netns: PathBuf,
    /// The pod's name.
    pub hostname: String,
    /// Memory and CPU limits, CPU request (cgroups).
    pub resources: Resources,
}

impl ContainerSpec {
    /// The spec of container `c` of `pod`: its securityContext merged with the pod's, `command`
    /// and `args` with `$(VAR)` expanded from `env` (the container's variables, already resolved
    /// by the kubelet: Downward API values filled in), its workingDir; the kubelet's `mounts`
    /// (ConfigMap files, emptyDirs, /etc/hosts), the pod's `netns` and the pod name as hostname.
    pub fn from_kubernetes(
        pod: &PodSpec,
        c: &Container,
        env: Vec<(String, String)>,
        mounts: Vec<BindMount>,
        netns: PathBuf,
        hostname: &str,
    ) -> Result<ContainerSpec> {
        let security = Security::from_kubernetes(pod.security_context.as_ref(), c.security_context.as_ref())
            .with_context(|| format!("container `{}`", c.name))?;
        let vars: BTreeMap<&str, &str> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let expand_all = |v: &Option<Vec<String>>| v.as_ref().map(|v| v.iter().map(|a| expand(a, &vars)).collect());
        let resources =
            Resources::from_kubernetes(c.resources.as_ref()).with_context(|| format!("container `{}`", c.name))?;
        Ok(ContainerSpec {
            resources,
            command: expand_all(&c.command),
            args: expand_all(&c.args),
            working_dir: c.working_dir.clone(),
            env,
            security,
            mounts,
            netns,
            hostname: hostname.to_string(),
        })
    }
}

/// The command line Kubernetes runs: `command` + `args`, else Entrypoint + `args`, else
/// Entrypoint + Cmd.
pub fn argv(image: &ImageRunConfig, command: Option<&[String]>, args: Option<&[String]>) -> Result<Vec<String>> {
    let argv: Vec<String> = match (command, args) {
        (Some(command), args) => command.iter().chain(args.into_iter().flatten()).cloned().collect(),
        (None, Some(args)) => image.entrypoint.iter().chain(args).cloned().collect(),
        (None, None) => image.entrypoint.iter().chain(&image.cmd).cloned().collect(),
    };
    if argv.is_empty() {
        bail!("nothing to run: the image has no Entrypoint or Cmd and the container gives no command");
    }
    Ok(argv)
}

/// The image's variables, a default PATH and HOSTNAME when missing, then the container's, each
/// name once (the last value wins, in its first position).
pub fn environment(image: &ImageRunConfig, hostname: &str, env: &[(String, String)]) -> Vec<String> {
    let mut vars: Vec<(String, String)> = Vec::new();
    let mut set = |k: &str, v: &str| match vars.iter_mut().find(|(name, _)| name == k) {
        Some(slot) => slot.1 = v.to_string(),
        None => vars.push((k.to_string(), v.to_string())),
    };
    set("PATH", DEFAULT_PATH);
    set("HOSTNAME", hostname);
    for kv in &image.env {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        set(k, v);
    }
    for (k, v) in env {
        set(k, v);
    }
    vars.into_iter().map(|(k, v)| format!("{k}={v}")).collect()
}

/// The runtime config for `spec` running `image` (whose unpacked tree is `image_rootfs`) with its
/// root filesystem at `rootfs`.
pub fn build(image: &ImageRunConfig, image_rootfs: &Path, spec: &ContainerSpec, rootfs: &Path) -> Result<Spec> {
    let sec = &spec.security;
    let argv = argv(image, spec.command.as_deref(), spec.args.as_deref())?;
    let who = user::resolve(image_rootfs, image.user.as_deref(), sec.run_as_user, sec.run_as_group)?;
    if sec.run_as_non_root && who.uid == 0 {
        bail!("securityContext.runAsNonRoot: the container would run as root (uid 0; set runAsUser)");
    }
    let cwd = spec.working_dir.clone().or_else(|| image.working_dir.clone()).unwrap_or_else(|| "/".into());
    if !cwd.starts_with('/') {
        bail!("workingDir `{cwd}` is not an absolute path");
    }
    let caps = sec.capabilities.clone();
    let process = ProcessBuilder::default()
        .terminal(false)
        .user(
            UserBuilder::default()
                .uid(who.uid)
                .gid(who.gid)
                .additional_gids(sec.supplemental_groups.clone())
                .build()?,
        )
        .args(argv)
        .env(environment(image, &spec.hostname, &spec.env))
        .cwd(cwd)
        .capabilities(
            LinuxCapabilitiesBuilder::default()
                .bounding(caps.clone())
                .effective(caps.clone())
                .permitted(caps)
                .inheritable(Capabilities::new())
                .ambient(Capabilities::new())
                .build()?,
        )
        .rlimits(vec![PosixRlimitBuilder::default()
            .typ(PosixRlimitType::RlimitNofile)
            .hard(nofile())
            .soft(nofile())
            .build()?])
        .no_new_privileges(sec.no_new_privileges)
        .build()?;

    let mut mounts: Vec<Mount> = oci_spec::runtime::get_default_mounts();
    for m in &spec.mounts {
        if !m.destination.is_absolute() {
            bail!("volume mount path `{}` is not absolute", m.destination.display());
        }
        let source = m.source.canonicalize().with_context(|| format!("volume source {}", m.source.display()))?;
        let access = if m.read_only { "ro" } else { "rw" };
        mounts.push(
            MountBuilder::default()
                .destination(&m.destination)
                .typ("bind")
                .source(source)
                .options(["rbind", "rprivate", access, "nosuid", "nodev"].map(String::from).to_vec())
                .build()?,
        );
    }

    let mut namespaces: Vec<LinuxNamespace> = oci_spec::runtime::get_default_namespaces();
    namespaces.retain(|n| n.typ() != LinuxNamespaceType::Network);
    namespaces.push(LinuxNamespaceBuilder::default().typ(LinuxNamespaceType::Network).path(&spec.netns).build()?);
    let mut linux = LinuxBuilder::default()
        .namespaces(namespaces)
        .masked_paths(oci_spec::runtime::get_default_maskedpaths())
        .readonly_paths(oci_spec::runtime::get_default_readonly_paths())
        // Device nodes: none beyond the standard ones runc always creates.
        .resources(
            spec.resources.to_linux(vec![LinuxDeviceCgroupBuilder::default().allow(false).access("rwm").build()?])?,
        );
    if sec.seccomp == Seccomp::RuntimeDefault {
        linux = linux.seccomp(super::seccomp::runtime_default());
    }

    Ok(SpecBuilder::default()
        .version("1.0.2")
        .process(process)
        .root(RootBuilder::default().path(rootfs).readonly(sec.read_only_root).build()?)
        .hostname(spec.hostname.clone())
        .mounts(mounts)
        .linux(linux.build()?)
        .build()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::runtime::Capability;

    fn image() -> ImageRunConfig {
        ImageRunConfig {
            entrypoint: vec!["/usr/local/bin/graceful".into()],
            cmd: vec!["--help".into()],
            env: vec!["PATH=/usr/local/bin".into(), "MODE=image".into()],
            user: Some("65532:65532".into()),
            working_dir: None,
            stop_signal: None,
        }
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn command_and_args_override_entrypoint_and_cmd_as_kubernetes_does() {
        let i = image();
        assert_eq!(argv(&i, None, None).unwrap(), strings(&["/usr/local/bin/graceful", "--help"]));
        let args = strings(&["backend"]);
        assert_eq!(argv(&i, None, Some(&args)).unwrap(), strings(&["/usr/local/bin/graceful", "backend"]));
        let command = strings(&["/bin/server"]);
        assert_eq!(argv(&i, Some(&command), None).unwrap(), strings(&["/bin/server"]), "Cmd is dropped");
        assert_eq!(argv(&i, Some(&command), Some(&args)).unwrap(), strings(&["/bin/server", "backend"]));
        let e = argv(&ImageRunConfig::default(), None, None).unwrap_err().to_string();
        assert!(e.contains("no Entrypoint or Cmd"), "{e}");
    }

    #[test]
    fn from_kubernetes_merges_security_and_expands_variables() {
        let pod: PodSpec =
            serde_yaml::from_str("containers: []\nsecurityContext: {runAsUser: 1000, runAsNonRoot: true}\n").unwrap();
        let c: Container = serde_yaml::from_str(
            "name: web\ncommand: [/server, --name, $(POD_NAME)]\nargs: [--port, $(PORT), $$(PORT)]\n\
             workingDir: /srv\nsecurityContext: {runAsUser: 65532, readOnlyRootFilesystem: true}\n",
        )
        .unwrap();
        let env = vec![("POD_NAME".to_string(), "web-0".to_string()), ("PORT".to_string(), "8080".to_string())];
        let spec = ContainerSpec::from_kubernetes(&pod, &c, env, vec![], "/run/netns/pod-1".into(), "web-0").unwrap();
        assert_eq!(spec.command.unwrap(), strings(&["/server", "--name", "web-0"]));
        assert_eq!(spec.args.unwrap(), strings(&["--port", "8080", "$(PORT)"]));
        assert_eq!(spec.working_dir.as_deref(), Some("/srv"));
        let s = spec.security;
        assert_eq!((s.run_as_user, s.run_as_non_root, s.read_only_root), (Some(65532), true, true));

        let bad: Container = serde_yaml::from_str("name: web\nsecurityContext: {privileged: true}\n").unwrap();
        let e =
            format!("{:#}", ContainerSpec::from_kubernetes(&pod, &bad, vec![], vec![], "/x".into(), "p").unwrap_err());
        assert!(e.contains("container `web`") && e.contains("privileged"), "{e}");
    }

    #[test]
    fn the_container_env_overrides_the_image_env() {
        let env = environment(&image(), "pod-a", &[("MODE".into(), "pod".into()), ("EXTRA".into(), "1".into())]);
        assert_eq!(env, strings(&["PATH=/usr/local/bin", "HOSTNAME=pod-a", "MODE=pod", "EXTRA=1"]));
        let env = environment(&ImageRunConfig::default(), "p", &[]);
        assert_eq!(env, [format!("PATH={DEFAULT_PATH}"), "HOSTNAME=p".into()]);
    }

    fn spec(security: Security, mounts: Vec<BindMount>) -> ContainerSpec {
        ContainerSpec {
            command: None,
            args: Some(strings(&["backend"])),
            env: vec![],
            working_dir: None,
            security,
            mounts,
            netns: "/run/netns/pod-1".into(),
            hostname: "backend-0".into(),
            resources: Resources::default(),
        }
    }

    #[test]
    fn the_hardened_context_reaches_the_config() {
        let dir = tempfile::tempdir().unwrap();
        let sc = k8s_openapi::api::core::v1::SecurityContext {
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            capabilities: Some(k8s_openapi::api::core::v1::Capabilities { drop: Some(vec!["ALL".into()]), add: None }),
            seccomp_profile: Some(k8s_openapi::api::core::v1::SeccompProfile {
                type_: "RuntimeDefault".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let security = Security::from_kubernetes(None, Some(&sc)).unwrap();
        let mount = BindMount { source: dir.path().into(), destination: "/etc/graceful".into(), read_only: true };
        let config = build(&image(), dir.path(), &spec(security, vec![mount]), Path::new("/x/rootfs")).unwrap();

        let p = config.process().as_ref().unwrap();
        assert_eq!((p.user().uid(), p.user().gid()), (65532, 65532), "the image's user");
        assert_eq!(p.no_new_privileges(), Some(true));
        let caps = p.capabilities().as_ref().unwrap();
        assert!(caps.bounding().as_ref().unwrap().is_empty() && caps.effective().as_ref().unwrap().is_empty());
        let root = config.root().as_ref().unwrap();
        assert_eq!((root.path().as_path(), root.readonly()), (Path::new("/x/rootfs"), Some(true)));
        assert_eq!(config.hostname().as_deref(), Some("backend-0"));

        let linux = config.linux().as_ref().unwrap();
        assert!(linux.seccomp().is_some());
        let net = linux.namespaces().iter().flatten().find(|n| n.typ() == LinuxNamespaceType::Network).unwrap();
        assert_eq!(net.path().as_deref(), Some(Path::new("/run/netns/pod-1")));
        let m = config.mounts().iter().flatten().find(|m| m.destination() == Path::new("/etc/graceful")).unwrap();
        assert!(m.options().iter().flatten().any(|o| o == "ro"), "{m:?}");

        // What runc reads: camelCase JSON with the path of the namespace.
        let json = serde_json::to_value(&config).unwrap();
        assert_eq!(json["process"]["noNewPrivileges"], true);
        assert_eq!(json["root"]["readonly"], true);
    }

    #[test]
    fn defaults_keep_kubernetes_capabilities_and_no_seccomp() {
        let dir = tempfile::tempdir().unwrap();
        let config = build(&image(), dir.path(), &spec(Security::default(), vec![]), dir.path()).unwrap();
        let caps = config.process().as_ref().unwrap().capabilities().as_ref().unwrap();
        assert!(caps.effective().as_ref().unwrap().contains(&Capability::NetBindService));
        assert!(config.linux().as_ref().unwrap().seccomp().is_none());
        assert_eq!(config.root().as_ref().unwrap().readonly(), Some(false));
    }

    #[test]
    fn run_as_non_root_refuses_uid_zero_and_bad_paths_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let security = Security { run_as_non_root: true, ..Security::default() };
        let root_image = ImageRunConfig { user: None, ..image() };
        let e = build(&root_image, dir.path(), &spec(security, vec![]), dir.path()).unwrap_err().to_string();
        assert!(e.contains("runAsNonRoot"), "{e}");

        let mut s = spec(Security::default(), vec![]);
        s.working_dir = Some("srv".into());
        let e = build(&image(), dir.path(), &s, dir.path()).unwrap_err().to_string();
        assert!(e.contains("workingDir `srv`"), "{e}");

        let missing = BindMount { source: "/nonexistent/cm".into(), destination: "/etc/x".into(), read_only: true };
        let e = format!(
            "{:#}",
            build(&image(), dir.path(), &spec(Security::default(), vec![missing]), dir.path()).unwrap_err()
        );
        assert!(e.contains("volume source /nonexistent/cm"), "{e}");
    }
}
