//! The OCI runtime config for the backend container, written by the lab runtime itself
//! (src/lab/node/oci/runtime_config.rs) from the image's configuration and the overlay's pod and
//! container: args, env, securityContext, the ConfigMap mounted read-only, the test's network
//! namespace.

use std::path::{Path, PathBuf};

use graceful::lab::node::oci::{runtime_config, BindMount, ContainerSpec, ImageRunConfig};

use crate::pod::Backend;

/// Downward API fields the manifest takes from the pod; a test pod has these.
const DOWNWARD: &[(&str, &str)] = &[
    ("POD_NAME", "backend-image-test"),
    ("POD_NAMESPACE", "graceful"),
    ("POD_IP", "127.0.0.1"),
    ("NODE_NAME", "image-test"),
];

/// Writes `bundle/config.json` for umoci's `bundle/rootfs`.
pub fn write(bundle: &Path, image: &ImageRunConfig, backend: &Backend, netns: &str, env: &[(&str, Option<&str>)]) {
    // The ConfigMap as the kubelet projects it: files in a host directory, bind-mounted read-only.
    let files = bundle.join("configmap");
    std::fs::create_dir_all(&files).unwrap();
    for (name, text) in &backend.config_files {
        std::fs::write(files.join(name), text).unwrap();
    }
    let mounts = vec![BindMount { source: files, destination: backend.config_mount.clone().into(), read_only: true }];
    let spec = ContainerSpec::from_kubernetes(
        &backend.pod,
        &backend.container,
        environment(backend, env),
        mounts,
        PathBuf::from(netns),
        "backend-image-test",
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    let config = runtime_config::build(image, &bundle.join("rootfs"), &spec, Path::new("rootfs"))
        .unwrap_or_else(|e| panic!("{e:#}"));
    config.save(bundle.join("config.json")).unwrap();
}

/// The manifest's variables (Downward API fields filled in), less those the test removes
/// (`None`), then the test's values.
fn environment(backend: &Backend, overrides: &[(&str, Option<&str>)]) -> Vec<(String, String)> {
    let removed = |k: &str| overrides.iter().any(|(name, v)| *name == k && v.is_none());
    let mut vars: Vec<(String, String)> = Vec::new();
    for e in backend.container.env.iter().flatten().filter(|e| !removed(&e.name)) {
        let downward = DOWNWARD.iter().find(|(name, _)| *name == e.name).map(|(_, v)| *v);
        let value = e.value.as_deref().or(downward);
        let value = value.unwrap_or_else(|| panic!("env {}: no value and no Downward API stand-in", e.name));
        vars.push((e.name.clone(), value.to_string()));
    }
    vars.extend(overrides.iter().filter_map(|(k, v)| v.map(|v| (k.to_string(), v.to_string()))));
    vars
}
