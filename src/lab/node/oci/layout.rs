//! An OCI image layout on disk (index.json, blobs/ALG/HEX): the manifest a tag names, the image
//! configuration it points to, and the extraction of an `oci-archive` into such a layout.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use oci_spec::image::{Descriptor, Digest, ImageConfiguration, ImageIndex, ImageManifest, MediaType};

/// The annotation that names an index entry (a tag).
const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// One image in a layout: its manifest (by digest) and configuration.
#[derive(Debug, Clone)]
pub struct LayoutImage {
    /// The tag `umoci` is given to unpack this image.
    pub tag: String,
    pub manifest_digest: Digest,
    pub manifest: ImageManifest,
    pub config: ImageConfiguration,
}

/// Extracts an `oci-archive` (a plain tar of a layout) into `dir`, which must be empty.
pub fn extract_archive(archive: &Path, dir: &Path) -> Result<()> {
    let file = std::fs::File::open(archive).with_context(|| format!("cannot open {}", archive.display()))?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    // `unpack` refuses entries that would land outside `dir` (absolute paths, `..`).
    tar::Archive::new(file).unpack(dir).with_context(|| format!("{} is not a readable tar archive", archive.display()))
}

/// Reads the image `tag` names in the layout at `dir` (the only image when `tag` is None).
pub fn read(dir: &Path, tag: Option<&str>) -> Result<LayoutImage> {
    let index_path = dir.join("index.json");
    if !index_path.is_file() {
        bail!("{} is not an OCI image layout: it has no index.json", dir.display());
    }
    let index = ImageIndex::from_file(&index_path).with_context(|| format!("cannot parse {}", index_path.display()))?;
    let entry = pick(index.manifests(), tag).with_context(|| format!("in {}", index_path.display()))?;
    if *entry.media_type() != MediaType::ImageManifest {
        bail!(
            "{}: the entry for {} is a {} (nested indexes and multi-platform images are not supported)",
            index_path.display(),
            tag_or_only(tag),
            entry.media_type()
        );
    }
    let manifest_path = blob_path(dir, entry.digest());
    let manifest = ImageManifest::from_file(&manifest_path)
        .with_context(|| format!("the manifest of {} ({})", tag_or_only(tag), manifest_path.display()))?;
    let config_path = blob_path(dir, manifest.config().digest());
    let config = ImageConfiguration::from_file(&config_path)
        .with_context(|| format!("the image configuration of {} ({})", tag_or_only(tag), config_path.display()))?;
    let tag = match tag {
        Some(t) => t.to_string(),
        None => ref_name(entry).map(str::to_string).with_context(|| {
            format!("{}: its only image has no {REF_NAME} annotation to unpack it by", index_path.display())
        })?,
    };
    Ok(LayoutImage { tag, manifest_digest: entry.digest().clone(), manifest, config })
}

fn tag_or_only(tag: Option<&str>) -> String {
    tag.map_or_else(|| "the only image".to_string(), |t| format!("tag `{t}`"))
}

fn ref_name(d: &Descriptor) -> Option<&str> {
    d.annotations().as_ref().and_then(|a: &HashMap<String, String>| a.get(REF_NAME)).map(String::as_str)
}

/// The index entry `tag` names, or the only entry.
fn pick<'a>(entries: &'a [Descriptor], tag: Option<&str>) -> Result<&'a Descriptor> {
    let names = || {
        let names: Vec<&str> = entries.iter().filter_map(ref_name).collect();
        if names.is_empty() {
            "none".to_string()
        } else {
            names.join(", ")
        }
    };
    match tag {
        Some(tag) => entries
            .iter()
            .find(|d| ref_name(d) == Some(tag))
            .with_context(|| format!("no image tagged `{tag}` (tags here: {})", names())),
        None => match entries {
            [only] => Ok(only),
            [] => bail!("the index lists no image"),
            _ => bail!("the index lists {} images: name one with :TAG (tags here: {})", entries.len(), names()),
        },
    }
}

/// Where a blob lives: blobs/ALGORITHM/HEX.
pub fn blob_path(dir: &Path, digest: &Digest) -> PathBuf {
    dir.join("blobs").join(digest.algorithm().as_ref()).join(digest.digest())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const SHA_A: &str = "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const SHA_B: &str = "sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

    fn entry(digest: &str, name: Option<&str>) -> serde_json::Value {
        let mut d = json!({"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest, "size": 1});
        if let Some(n) = name {
            d["annotations"] = json!({ REF_NAME: n });
        }
        d
    }

    /// A layout with one manifest per entry, each pointing at one configuration.
    fn layout(entries: &[serde_json::Value]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let index = json!({"schemaVersion": 2, "manifests": entries});
        std::fs::write(dir.path().join("index.json"), index.to_string()).unwrap();
        std::fs::create_dir_all(dir.path().join("blobs/sha256")).unwrap();
        let config_digest = format!("sha256:{}", "c".repeat(64));
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": 1},
            "layers": []
        });
        for e in entries {
            let hex = e["digest"].as_str().unwrap().trim_start_matches("sha256:");
            std::fs::write(dir.path().join("blobs/sha256").join(hex), manifest.to_string()).unwrap();
        }
        let config = json!({"architecture": "amd64", "os": "linux", "config": {"Entrypoint": ["/server"]},
            "rootfs": {"type": "layers", "diff_ids": []}});
        std::fs::write(dir.path().join("blobs/sha256").join("c".repeat(64)), config.to_string()).unwrap();
        dir
    }

    #[test]
    fn a_tag_picks_its_entry_and_a_single_entry_needs_none() {
        let dir = layout(&[entry(SHA_A, Some("graceful:latest")), entry(SHA_B, Some("v2"))]);
        let image = read(dir.path(), Some("v2")).unwrap();
        assert_eq!(image.manifest_digest.to_string(), SHA_B);
        assert_eq!(image.tag, "v2");
        let entrypoint = image.config.config().as_ref().and_then(|c| c.entrypoint().clone());
        assert_eq!(entrypoint, Some(vec!["/server".to_string()]));

        let dir = layout(&[entry(SHA_A, Some("only"))]);
        assert_eq!(read(dir.path(), None).unwrap().tag, "only");
    }

    #[test]
    fn missing_tags_and_ambiguous_layouts_are_named() {
        let dir = layout(&[entry(SHA_A, Some("graceful:latest")), entry(SHA_B, Some("v2"))]);
        let e = format!("{:#}", read(dir.path(), Some("v3")).unwrap_err());
        assert!(e.contains("no image tagged `v3`") && e.contains("graceful:latest, v2"), "{e}");
        let e = format!("{:#}", read(dir.path(), None).unwrap_err());
        assert!(e.contains("lists 2 images: name one with :TAG"), "{e}");

        let empty = tempfile::tempdir().unwrap();
        let e = format!("{:#}", read(empty.path(), None).unwrap_err());
        assert!(e.contains("not an OCI image layout"), "{e}");

        // The index names a manifest whose blob is missing: the error names the blob.
        let dir = layout(&[entry(SHA_A, Some("x"))]);
        std::fs::remove_file(dir.path().join("blobs/sha256").join("a".repeat(64))).unwrap();
        let e = format!("{:#}", read(dir.path(), Some("x")).unwrap_err());
        assert!(e.contains("the manifest of tag `x`") && e.contains(&"a".repeat(64)), "{e}");
    }

    #[test]
    fn an_archive_that_is_not_a_tar_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let bogus = dir.path().join("bogus.tar");
        std::fs::write(&bogus, vec![0x5a; 2048]).unwrap();
        let e = format!("{:#}", extract_archive(&bogus, &dir.path().join("out")).unwrap_err());
        assert!(e.contains("bogus.tar"), "{e}");
    }
}
