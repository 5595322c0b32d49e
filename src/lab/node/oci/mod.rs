//! The lab's OCI container runtime (`--runtime oci`): pods run as containers of the images their
//! manifests name, unpacked from local OCI archives or layouts, under runc, in the pod network
//! namespaces the kernel node creates.
//!
//! - [`ImageStore`]: `--image NAME=oci-archive:PATH[:TAG]` / `NAME=oci:DIR[:TAG]` → an unpacked,
//!   shared rootfs and the image's run configuration (entrypoint, cmd, env, user, workdir, stop signal).
//! - [`ContainerSpec`] + [`Security`]: what the kubelet resolved for one container; turned into the
//!   runtime config by [`runtime_config::build`].
//! - [`Runtime`] / [`Container`]: run, signal, exec, wait and delete through runc, state under the
//!   run dir; a guard deletes whatever is left when the runtime is dropped or the lab dies.
//!
//! How the kubelet drives it (one `ImageStore` and one `Runtime` per lab run; root, runc, umoci):
//!
//! ```text
//! let refs = with_default_graceful(cli_refs, &target_dir.join("image/graceful.oci.tar"));
//! let images = ImageStore::new(run_dir.join("images"), refs)?;
//! let runtime = Runtime::new(&run_dir.join("oci")).await?;
//! // per pod:
//! let image = images.image(container.image.as_deref().unwrap_or_default()).await?;
//! let spec = ContainerSpec::from_kubernetes(&pod_spec, &container, env, mounts, netns_path, &pod_name)?;
//! let c = runtime.run(&pod_name, &image, &spec, &log_path).await?;
//! // exec probes and preStop exec hooks:   c.exec(&argv, &[], probe_timeout).await?  (status None = timed out)
//! // stop: c.signal(image.config.stop_signal()?).await?; then c.wait(grace).await, else
//! //       c.signal(Signal::SIGKILL).await? and c.wait(bound).await?
//! // end:  c.delete().await?
//! ```

pub mod container;
pub mod guard;
pub mod image_store;
pub mod layout;
pub mod reference;
pub mod resources;
pub mod rootfs;
pub mod runtime_config;
pub mod seccomp;
pub mod security;
pub mod tool;
pub mod user;

pub use container::{Container, ExecOutput, Runtime};
pub use image_store::{Image, ImageRunConfig, ImageStore};
pub use reference::{normalize_name, with_default_graceful, ImageRef, ImageSource};
pub use resources::Resources;
pub use runtime_config::{BindMount, ContainerSpec};
pub use security::{Seccomp, Security};
