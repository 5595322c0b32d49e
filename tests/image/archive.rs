//! The OCI archive .ci/build-image writes: extracted with tar, its index, manifest and config read
//! as typed JSON, its layer unpacked into runtime bundles by umoci.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;
use tempfile::TempDir;

/// The reference .ci/build-image gives the image inside the archive.
pub const REF: &str = "graceful:latest";

#[derive(Deserialize)]
struct Index {
    manifests: Vec<Descriptor>,
}

#[derive(Deserialize, Clone, Debug)]
pub struct Descriptor {
    #[serde(rename = "mediaType")]
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Deserialize)]
pub struct Manifest {
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

#[derive(Deserialize)]
pub struct ImageConfig {
    pub architecture: String,
    pub os: String,
    pub config: RunConfig,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
pub struct RunConfig {
    #[serde(default)]
    pub user: String,
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub entrypoint: Vec<String>,
    #[serde(default)]
    pub cmd: Vec<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// An archive extracted to an OCI layout in a temporary directory.
pub struct Image {
    layout: TempDir,
    pub archive_bytes: u64,
    pub manifest: Manifest,
    pub config: ImageConfig,
}

impl Image {
    pub fn open(archive: &Path) -> Image {
        let layout = tempfile::Builder::new().prefix("graceful-image-").tempdir().expect("a temp dir");
        let out = Command::new("tar").arg("-xf").arg(archive).arg("-C").arg(layout.path()).output().expect("run tar");
        assert!(out.status.success(), "tar -xf {}: {}", archive.display(), String::from_utf8_lossy(&out.stderr));
        let index: Index = read_json(&layout.path().join("index.json"));
        let entry = index
            .manifests
            .iter()
            .find(|d| d.annotations.get("org.opencontainers.image.ref.name").map(String::as_str) == Some(REF))
            .unwrap_or_else(|| panic!("{}: no manifest named {REF}", archive.display()));
        let manifest: Manifest = read_json(&blob(layout.path(), &entry.digest));
        let config: ImageConfig = read_json(&blob(layout.path(), &manifest.config.digest));
        let archive_bytes = std::fs::metadata(archive).expect("archive metadata").len();
        Image { layout, archive_bytes, manifest, config }
    }

    /// Unpacks the image with umoci into `bundle` (rootfs/ and a default config.json).
    pub fn unpack(&self, bundle: &Path) {
        let image = format!("{}:{REF}", self.layout.path().display());
        let out = Command::new("umoci").args(["unpack", "--image", &image]).arg(bundle).output().expect("run umoci");
        assert!(out.status.success(), "umoci unpack {image}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

fn blob(layout: &Path, digest: &str) -> PathBuf {
    let (algorithm, hex) = digest.split_once(':').unwrap_or_else(|| panic!("digest without algorithm: {digest}"));
    layout.join("blobs").join(algorithm).join(hex)
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> T {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parse {}: {e}", path.display()))
}
