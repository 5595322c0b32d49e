//! A container's own root filesystem: an overlay of the shared, never-written image tree and a
//! fresh upper layer in the container's bundle, as a node's snapshotter gives each container.
//! Writes (and the mount points runc creates) land in the upper layer; the overlay is
//! unmounted when the container is deleted.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use nix::mount::{mount, umount2, MntFlags, MsFlags};

pub struct ContainerRootfs {
    merged: PathBuf,
    mounted: bool,
}

impl ContainerRootfs {
    /// Mounts the overlay at `bundle/rootfs`, its layer in `bundle/upper` (and `bundle/work`).
    pub fn mount(image_rootfs: &Path, bundle: &Path) -> Result<ContainerRootfs> {
        let (upper, work, merged) = (bundle.join("upper"), bundle.join("work"), bundle.join("rootfs"));
        for dir in [&upper, &work, &merged] {
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let lower = image_rootfs.canonicalize().with_context(|| format!("image rootfs {}", image_rootfs.display()))?;
        let paths = [lower.as_path(), upper.as_path(), work.as_path()];
        // The option string is comma- and colon-separated: such paths cannot be expressed.
        if let Some(p) = paths.iter().find(|p| p.to_string_lossy().contains([',', ':', '\\'])) {
            bail!("overlay path {} contains `,`, `:` or `\\`: choose a run directory without them", p.display());
        }
        let options = format!("lowerdir={},upperdir={},workdir={}", lower.display(), upper.display(), work.display());
        mount(Some("overlay"), &merged, Some("overlay"), MsFlags::empty(), Some(options.as_str()))
            .with_context(|| format!("cannot mount the container's overlay at {} ({options})", merged.display()))?;
        Ok(ContainerRootfs { merged, mounted: true })
    }

    pub fn path(&self) -> &Path {
        &self.merged
    }

    /// Detaches the overlay (lazily: a process still holding it cannot block the deletion).
    pub fn unmount(&mut self) -> Result<()> {
        if std::mem::take(&mut self.mounted) {
            umount2(&self.merged, MntFlags::MNT_DETACH)
                .with_context(|| format!("cannot unmount the overlay at {}", self.merged.display()))?;
        }
        Ok(())
    }
}

impl Drop for ContainerRootfs {
    fn drop(&mut self) {
        let _ = self.unmount();
    }
}
