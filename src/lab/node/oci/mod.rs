//! The lab's OCI container runtime (`--runtime oci`): pods run as containers of the images their
//! manifests name, unpacked from local OCI archives or layouts, under runc, in the pod network
//! namespaces the kernel node creates.
//!
//! - [`ImageStore`]: `--image NAME=oci-archive:PATH[:TAG]` / `NAME=oci:DIR[:TAG]` → an unpacked,
//!   shared rootfs and the image's run configuration (entrypoint, cmd, env, user, workdir, stop signal).
//! - [`ContainerSpec`] + [`Security`]: what the kubelet resolved for one container; turned into the
//!   runtime config by [`runtime_config::build`].
//! - [`Runtime`] / [`Container`]: run, signal, exec, wait and delete through runc, state under the run dir.
//!
//! Needs root, runc and umoci; nothing is pulled from a registry.

pub mod container;
pub mod guard;
pub mod image_store;
pub mod layout;
pub mod reference;
pub mod rootfs;
pub mod runtime_config;
pub mod seccomp;
pub mod security;
pub mod tool;
pub mod user;

pub use container::{Container, ExecOutput, Runtime};
pub use image_store::{Image, ImageRunConfig, ImageStore};
pub use reference::{normalize_name, with_default_graceful, ImageRef, ImageSource};
pub use runtime_config::{BindMount, ContainerSpec};
pub use security::{Seccomp, Security};
