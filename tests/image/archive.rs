//! The OCI archive .ci/build-image writes, extracted and read by the lab runtime's own layout
//! reader (src/lab/node/oci/layout.rs), its layer unpacked into runtime bundles by umoci.

use std::path::Path;
use std::process::Command;

use graceful::lab::node::oci::layout::{self, LayoutImage};
use graceful::lab::node::oci::ImageRunConfig;
use tempfile::TempDir;

/// The reference .ci/build-image gives the image inside the archive.
pub const REF: &str = "graceful:latest";

/// An archive extracted to an OCI layout in a temporary directory.
pub struct Image {
    layout: TempDir,
    pub archive_bytes: u64,
    /// The manifest and configuration as the image holds them.
    pub found: LayoutImage,
    /// What the runtime takes from the configuration.
    pub run: ImageRunConfig,
}

impl Image {
    pub fn open(archive: &Path) -> Image {
        let layout = tempfile::Builder::new().prefix("graceful-image-").tempdir().expect("a temp dir");
        layout::extract_archive(archive, layout.path()).unwrap_or_else(|e| panic!("{e:#}"));
        let found = layout::read(layout.path(), Some(REF)).unwrap_or_else(|e| panic!("{}: {e:#}", archive.display()));
        let run = ImageRunConfig::from_layout(&found).unwrap_or_else(|e| panic!("{e:#}"));
        let archive_bytes = std::fs::metadata(archive).expect("archive metadata").len();
        Image { layout, archive_bytes, found, run }
    }

    /// Unpacks the image with umoci into `bundle` (rootfs/ and a default config.json).
    pub fn unpack(&self, bundle: &Path) {
        let image = format!("{}:{REF}", self.layout.path().display());
        let out = Command::new("umoci").args(["unpack", "--image", &image]).arg(bundle).output().expect("run umoci");
        assert!(out.status.success(), "umoci unpack {image}: {}", String::from_utf8_lossy(&out.stderr));
    }
}
