//! The OCI runtime config for the backend container, as a kubelet and its runtime would write it:
//! umoci's default config.json, then the image's entrypoint and env, the manifest's args and env,
//! its securityContext, the ConfigMap mounted read-only, the test's network namespace.

use std::path::Path;

use serde_json::{json, Value};

use crate::archive::ImageConfig;
use crate::pod::Backend;

/// Downward API fields the manifest takes from the pod; a test pod has these.
const DOWNWARD: &[(&str, &str)] = &[
    ("POD_NAME", "backend-image-test"),
    ("POD_NAMESPACE", "graceful"),
    ("POD_IP", "127.0.0.1"),
    ("NODE_NAME", "image-test"),
];

pub fn write(bundle: &Path, image: &ImageConfig, backend: &Backend, netns: &str, env: &[(&str, Option<&str>)]) {
    let path = bundle.join("config.json");
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("umoci's config.json")).unwrap();
    let sec = &backend.security;

    let process = &mut config["process"];
    process["terminal"] = json!(false);
    process["user"] = json!({ "uid": sec.uid, "gid": sec.gid });
    // Kubernetes `args` replace the image's Cmd and keep its Entrypoint.
    process["args"] = json!(image.config.entrypoint.iter().chain(&backend.args).collect::<Vec<_>>());
    process["env"] = json!(environment(image, backend, env));
    let caps = json!(sec.capabilities);
    process["capabilities"] =
        json!({ "bounding": caps, "effective": caps, "inheritable": caps, "permitted": caps, "ambient": caps });
    process["noNewPrivileges"] = json!(sec.no_new_privileges);

    config["root"]["readonly"] = json!(sec.read_only_root);
    config["hostname"] = json!("backend-image-test");

    // The ConfigMap as the kubelet projects it: files in a host directory, bind-mounted read-only.
    let files = bundle.join("configmap");
    std::fs::create_dir_all(&files).unwrap();
    for (name, text) in &backend.config_files {
        std::fs::write(files.join(name), text).unwrap();
    }
    config["mounts"].as_array_mut().expect("mounts").push(json!({
        "destination": backend.config_mount,
        "type": "bind",
        "source": files,
        "options": ["rbind", "ro", "nosuid", "nodev", "noexec"],
    }));

    let linux = &mut config["linux"];
    let namespaces = linux["namespaces"].as_array_mut().expect("namespaces");
    namespaces.retain(|n| n["type"] != "network");
    namespaces.push(json!({ "type": "network", "path": netns }));
    assert_eq!(sec.seccomp, "RuntimeDefault", "the manifests ask for the runtime's default seccomp profile");
    // The lab runtime's `RuntimeDefault` profile (src/lab/node/oci/seccomp.rs).
    linux["seccomp"] = serde_json::to_value(graceful::lab::node::oci::seccomp::runtime_default()).unwrap();

    std::fs::write(&path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
}

/// Image env first, then the manifest's (Downward API fields filled in), then the test's
/// overrides (`None` removes a variable).
fn environment(image: &ImageConfig, backend: &Backend, overrides: &[(&str, Option<&str>)]) -> Vec<String> {
    let mut vars: Vec<(String, String)> = Vec::new();
    let mut set = |k: &str, v: Option<&str>| {
        vars.retain(|(name, _)| name != k);
        if let Some(v) = v {
            vars.push((k.to_string(), v.to_string()));
        }
    };
    for kv in &image.config.env {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        set(k, Some(v));
    }
    for (k, v) in &backend.env {
        let downward = DOWNWARD.iter().find(|(name, _)| name == k).map(|(_, v)| *v);
        let value =
            v.as_deref().or(downward).unwrap_or_else(|| panic!("env {k}: no value and no Downward API stand-in"));
        set(k, Some(value));
    }
    for (k, v) in overrides {
        set(k, *v);
    }
    vars.into_iter().map(|(k, v)| format!("{k}={v}")).collect()
}
