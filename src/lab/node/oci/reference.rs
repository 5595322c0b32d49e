//! `--image NAME=SOURCE` references: which local OCI image stands for an image name a manifest
//! uses. Only local sources exist (no registry is ever contacted):
//! - `oci-archive:PATH[:TAG]`: a tar of an OCI image layout (what `buildah push oci-archive:` writes);
//! - `oci:DIR[:TAG]`: an OCI image layout directory.
//!
//! TAG picks the index entry whose `org.opencontainers.image.ref.name` annotation is TAG (it may
//! itself hold `:`, as buildah's `graceful:latest` does); without it the layout must hold exactly
//! one image. As in containers-transports(5), the path ends at its first `:`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{bail, Result};

/// Where an image's layout is on this machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageSource {
    Archive { path: PathBuf, tag: Option<String> },
    Layout { dir: PathBuf, tag: Option<String> },
}

impl ImageSource {
    pub fn tag(&self) -> Option<&str> {
        match self {
            ImageSource::Archive { tag, .. } | ImageSource::Layout { tag, .. } => tag.as_deref(),
        }
    }
}

impl fmt::Display for ImageSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (transport, path, tag) = match self {
            ImageSource::Archive { path, tag } => ("oci-archive", path, tag),
            ImageSource::Layout { dir, tag } => ("oci", dir, tag),
        };
        write!(f, "{transport}:{}", path.display())?;
        if let Some(tag) = tag {
            write!(f, ":{tag}")?;
        }
        Ok(())
    }
}

/// `NAME=SOURCE`: the image name as manifests write it (`graceful:latest`) and its local source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    pub name: String,
    pub source: ImageSource,
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.name, self.source)
    }
}

impl FromStr for ImageRef {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<ImageRef> {
        let Some((name, source)) = s.split_once('=') else {
            bail!("image reference `{s}`: expected NAME=oci-archive:PATH[:TAG] or NAME=oci:DIR[:TAG]");
        };
        if name.is_empty() || name.chars().any(char::is_whitespace) {
            bail!("image reference `{s}`: the image name before `=` is empty or has spaces");
        }
        let Some((transport, rest)) = source.split_once(':') else {
            bail!("image reference `{s}`: `{source}` has no transport (oci-archive: or oci:)");
        };
        let (path, tag) = match rest.split_once(':') {
            Some((path, tag)) => (path, Some(tag)),
            None => (rest, None),
        };
        if path.is_empty() {
            bail!("image reference `{s}`: the path after `{transport}:` is empty");
        }
        if tag == Some("") {
            bail!("image reference `{s}`: the tag after the path is empty");
        }
        let (path, tag) = (PathBuf::from(path), tag.map(str::to_string));
        let source = match transport {
            "oci-archive" => ImageSource::Archive { path, tag },
            "oci" => ImageSource::Layout { dir: path, tag },
            other => bail!(
                "image reference `{s}`: transport `{other}` is not supported (only local oci-archive: and oci:, \
                 no registry is contacted)"
            ),
        };
        Ok(ImageRef { name: name.to_string(), source })
    }
}

/// An image name as Kubernetes reads it, for matching: `nginx`, `nginx:latest`,
/// `docker.io/library/nginx` and `docker.io/library/nginx:latest` are one image. A digest
/// (`@sha256:…`) is kept as written.
pub fn normalize_name(name: &str) -> String {
    let short = name.strip_prefix("docker.io/").unwrap_or(name);
    let short = short.strip_prefix("library/").filter(|rest| !rest.contains('/')).unwrap_or(short);
    // A tag is a `:` after the last `/` (a registry's `host:port/` is not one).
    let last = short.rsplit('/').next().unwrap_or(short);
    if short.contains('@') || last.contains(':') {
        short.to_string()
    } else {
        format!("{short}:latest")
    }
}

/// The references the node uses: `explicit` ones, plus `graceful:latest` from the CI-built
/// archive when it exists and no explicit reference names that image.
pub fn with_default_graceful(mut explicit: Vec<ImageRef>, ci_archive: &Path) -> Vec<ImageRef> {
    let named = explicit.iter().any(|r| normalize_name(&r.name) == "graceful:latest");
    if !named && ci_archive.is_file() {
        explicit.push(ImageRef {
            name: "graceful:latest".into(),
            source: ImageSource::Archive { path: ci_archive.to_path_buf(), tag: Some("graceful:latest".into()) },
        });
    }
    explicit
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> ImageRef {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e:#}"))
    }

    #[test]
    fn archives_and_layouts_with_and_without_tags() {
        let r = parse("graceful:latest=oci-archive:target/image/graceful.oci.tar");
        assert_eq!(r.name, "graceful:latest");
        assert_eq!(r.source, ImageSource::Archive { path: "target/image/graceful.oci.tar".into(), tag: None });

        let r = parse("web=oci-archive:/tmp/x.tar:graceful:latest");
        assert_eq!(r.source, ImageSource::Archive { path: "/tmp/x.tar".into(), tag: Some("graceful:latest".into()) });

        let r = parse("web=oci:/var/images/web:v2");
        assert_eq!(r.source, ImageSource::Layout { dir: "/var/images/web".into(), tag: Some("v2".into()) });
        assert_eq!(r.to_string(), "web=oci:/var/images/web:v2");
    }

    #[test]
    fn names_match_as_kubernetes_reads_them() {
        for same in ["nginx", "nginx:latest", "docker.io/library/nginx", "docker.io/nginx:latest"] {
            assert_eq!(normalize_name(same), "nginx:latest", "{same}");
        }
        assert_eq!(normalize_name("ghcr.io/x/app"), "ghcr.io/x/app:latest");
        assert_eq!(normalize_name("localhost:5000/app"), "localhost:5000/app:latest");
        assert_eq!(normalize_name("app:1.2"), "app:1.2");
        assert_eq!(normalize_name("app@sha256:abc"), "app@sha256:abc");
    }

    #[test]
    fn the_ci_archive_is_the_default_graceful_image() {
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("graceful.oci.tar");
        assert!(with_default_graceful(vec![], &archive).is_empty(), "absent archive: no default");
        std::fs::write(&archive, b"").unwrap();
        let refs = with_default_graceful(vec![], &archive);
        assert_eq!(refs[0].to_string(), format!("graceful:latest=oci-archive:{}:graceful:latest", archive.display()));
        let mine: ImageRef = "graceful=oci:/srv/layout".parse().unwrap();
        assert_eq!(with_default_graceful(vec![mine.clone()], &archive), [mine], "an explicit one wins");
    }

    #[test]
    fn bad_references_name_what_is_wrong() {
        for (input, expected) in [
            ("graceful", "expected NAME="),
            ("=oci:/x", "image name"),
            ("web=/tmp/x.tar", "no transport"),
            ("web=docker://nginx:1", "transport `docker`"),
            ("web=oci:", "path after `oci:` is empty"),
            ("web=oci:/x:", "tag after the path is empty"),
        ] {
            let e = input.parse::<ImageRef>().unwrap_err().to_string();
            assert!(e.contains(expected), "{input}: {e}");
            assert!(e.contains(input), "{input}: the message quotes the reference: {e}");
        }
    }
}
