//! The node's images: each `--image NAME=SOURCE` reference resolved on first use to an unpacked
//! root filesystem and the image's run configuration, cached under the store's directory (one
//! per lab run) so that every pod of an image shares one unpacked copy.
//!
//! Layers are unpacked by `umoci raw unpack` (it verifies blob digests and applies whiteouts);
//! archives are extracted and layouts read in-process. No registry is ever contacted.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::Signal;
use oci_spec::image::{Arch, Digest, Os};
use tokio::sync::Mutex;

use super::layout::{self, LayoutImage};
use super::reference::{normalize_name, ImageRef, ImageSource};
use super::tool;

/// Unpacking the 6 MB graceful image takes ≈ 0.2 s; this bound only stops a hang on a huge image.
const UNPACK_BOUND: Duration = Duration::from_secs(120);
/// Written next to a finished rootfs: a directory without it is a crashed unpack, redone.
const COMPLETE_MARK: &str = "unpacked";

/// What an image asks of the runtime (its `config` section), with empty fields absent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageRunConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    /// `KEY=VALUE` entries, in the image's order.
    pub env: Vec<String>,
    /// `uid`, `uid:gid`, `name` or `name:group`, resolved against the rootfs at container creation.
    pub user: Option<String>,
    pub working_dir: Option<String>,
    /// e.g. `SIGQUIT`; the runtime's stop signal when the pod does not choose one.
    pub stop_signal: Option<String>,
}

impl ImageRunConfig {
    /// The image configuration's run fields; an image for another OS or architecture is refused.
    pub fn from_layout(image: &LayoutImage) -> Result<ImageRunConfig> {
        let c = &image.config;
        if *c.os() != Os::Linux || *c.architecture() != Arch::Amd64 {
            bail!("the image is for {}/{}, this node runs linux/amd64", c.os(), c.architecture());
        }
        let Some(run) = c.config() else { return Ok(ImageRunConfig::default()) };
        let non_empty = |s: &Option<String>| s.clone().filter(|s| !s.is_empty());
        Ok(ImageRunConfig {
            entrypoint: run.entrypoint().clone().unwrap_or_default(),
            cmd: run.cmd().clone().unwrap_or_default(),
            env: run.env().clone().unwrap_or_default(),
            user: non_empty(run.user()),
            working_dir: non_empty(run.working_dir()),
            stop_signal: non_empty(run.stop_signal()),
        })
    }

    /// The image's `StopSignal` (`SIGQUIT`, `QUIT` or `3`); SIGTERM when it sets none.
    pub fn stop_signal(&self) -> Result<Signal> {
        let Some(text) = self.stop_signal.as_deref() else { return Ok(Signal::SIGTERM) };
        let parsed = match text.parse::<i32>() {
            Ok(n) => Signal::try_from(n).ok(),
            Err(_) => {
                let name = text.to_ascii_uppercase();
                let name = if name.starts_with("SIG") { name } else { format!("SIG{name}") };
                name.parse::<Signal>().ok()
            }
        };
        parsed.with_context(|| format!("the image's StopSignal `{text}` is not a signal"))
    }
}

/// An unpacked image, shared read-only by every container made from it.
#[derive(Debug)]
pub struct Image {
    /// The name manifests use for it (`graceful:latest`).
    pub name: String,
    pub source: ImageSource,
    pub manifest_digest: Digest,
    /// Never written: containers get their own writable (or read-only) layer over it.
    pub rootfs: PathBuf,
    pub config: ImageRunConfig,
    /// How long resolving and unpacking took (zero when it was already unpacked).
    pub unpack_time: Duration,
}

pub struct ImageStore {
    dir: PathBuf,
    refs: Vec<ImageRef>,
    /// Images already resolved, by name; the lock also keeps two pods from unpacking one image twice.
    resolved: Mutex<HashMap<String, Arc<Image>>>,
}

impl ImageStore {
    /// A store keeping its layouts and root filesystems under `dir`. Two references with one
    /// name are an error naming it.
    pub fn new(dir: impl Into<PathBuf>, refs: Vec<ImageRef>) -> Result<ImageStore> {
        for (i, r) in refs.iter().enumerate() {
            if refs[..i].iter().any(|earlier| normalize_name(&earlier.name) == normalize_name(&r.name)) {
                bail!("--image {r}: image `{}` is given twice", r.name);
            }
        }
        Ok(ImageStore { dir: dir.into(), refs, resolved: Mutex::new(HashMap::new()) })
    }

    /// The image names this store can run.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.refs.iter().map(|r| r.name.as_str())
    }

    /// The image a manifest names (`nginx` and `nginx:latest` alike), unpacked on first use.
    pub async fn image(&self, name: &str) -> Result<Arc<Image>> {
        let key = normalize_name(name);
        let mut resolved = self.resolved.lock().await;
        if let Some(image) = resolved.get(&key) {
            return Ok(image.clone());
        }
        let Some(reference) = self.refs.iter().find(|r| normalize_name(&r.name) == key) else {
            let known: Vec<&str> = self.names().collect();
            bail!(
                "image `{name}` has no local source (known: {}); give one with --image {name}=oci-archive:PATH",
                if known.is_empty() { "none".to_string() } else { known.join(", ") }
            );
        };
        let image = Arc::new(self.unpack(reference).await.with_context(|| format!("image {reference}"))?);
        resolved.insert(key, image.clone());
        Ok(image)
    }

    async fn unpack(&self, reference: &ImageRef) -> Result<Image> {
        let t = Instant::now();
        let (layout_dir, tag) = match &reference.source {
            ImageSource::Layout { dir, tag } => (dir.clone(), tag.clone()),
            ImageSource::Archive { path, tag } => {
                let dir = self.dir.join("layouts").join(safe_name(&reference.name));
                let archive = path.clone();
                let target = dir.clone();
                tokio::task::spawn_blocking(move || {
                    // A layout left by an earlier, interrupted call is replaced, not trusted.
                    let _ = std::fs::remove_dir_all(&target);
                    layout::extract_archive(&archive, &target)
                })
                .await??;
                (dir, tag.clone())
            }
        };
        let found = {
            let dir = layout_dir.clone();
            tokio::task::spawn_blocking(move || layout::read(&dir, tag.as_deref())).await??
        };
        let config = ImageRunConfig::from_layout(&found)?;
        let unpacked = self.dir.join("rootfs").join(found.manifest_digest.digest());
        let rootfs = unpacked.join("rootfs");
        if !unpacked.join(COMPLETE_MARK).exists() {
            let _ = tokio::fs::remove_dir_all(&unpacked).await;
            tokio::fs::create_dir_all(&unpacked)
                .await
                .with_context(|| format!("cannot create {}", unpacked.display()))?;
            let image_arg = format!("{}:{}", layout_dir.display(), found.tag);
            let mut umoci = tokio::process::Command::new("umoci");
            umoci.args(["raw", "unpack", "--image", &image_arg]).arg(&rootfs);
            tool::run(umoci, UNPACK_BOUND).await?;
            tokio::fs::write(unpacked.join(COMPLETE_MARK), found.manifest_digest.to_string()).await?;
        }
        Ok(Image {
            name: reference.name.clone(),
            source: reference.source.clone(),
            manifest_digest: found.manifest_digest,
            rootfs,
            config,
            unpack_time: t.elapsed(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// An image name as a directory name: `ghcr.io/x/app:1.0` → `ghcr.io_x_app_1.0`.
fn safe_name(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '.' || c == '-' { c } else { '_' }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_unknown_image_lists_the_known_ones() {
        let dir = tempfile::tempdir().unwrap();
        let refs = vec!["graceful:latest=oci-archive:/nonexistent/graceful.oci.tar".parse().unwrap()];
        let store = ImageStore::new(dir.path(), refs).unwrap();
        let e = format!("{:#}", store.image("nginx:1.27").await.unwrap_err());
        assert!(e.contains("`nginx:1.27` has no local source (known: graceful:latest)"), "{e}");
    }

    #[tokio::test]
    async fn a_missing_archive_is_named_with_its_reference() {
        let dir = tempfile::tempdir().unwrap();
        let refs = vec!["graceful:latest=oci-archive:/nonexistent/graceful.oci.tar".parse().unwrap()];
        let store = ImageStore::new(dir.path(), refs).unwrap();
        let e = format!("{:#}", store.image("graceful:latest").await.unwrap_err());
        assert!(e.contains("image graceful:latest=oci-archive:/nonexistent/graceful.oci.tar"), "{e}");
        assert!(e.contains("cannot open /nonexistent/graceful.oci.tar"), "{e}");
    }

    #[test]
    fn a_name_given_twice_is_refused() {
        let refs = vec!["a=oci:/x".parse().unwrap(), "a:latest=oci:/y".parse().unwrap()];
        let e = ImageStore::new("/tmp/unused", refs).err().unwrap().to_string();
        assert!(e.contains("--image a:latest=oci:/y: image `a:latest` is given twice"), "{e}");
    }

    #[test]
    fn stop_signals_by_name_or_number() {
        let with = |s: Option<&str>| ImageRunConfig { stop_signal: s.map(str::to_string), ..Default::default() };
        assert_eq!(with(None).stop_signal().unwrap(), Signal::SIGTERM);
        assert_eq!(with(Some("SIGQUIT")).stop_signal().unwrap(), Signal::SIGQUIT);
        assert_eq!(with(Some("int")).stop_signal().unwrap(), Signal::SIGINT);
        assert_eq!(with(Some("9")).stop_signal().unwrap(), Signal::SIGKILL);
        let e = with(Some("SIGNOPE")).stop_signal().unwrap_err().to_string();
        assert!(e.contains("StopSignal `SIGNOPE`"), "{e}");
    }

    #[test]
    fn names_become_plain_directory_names() {
        assert_eq!(safe_name("ghcr.io/x/app:1.0"), "ghcr.io_x_app_1.0");
    }
}
