//! The user and group a container's process runs as: `runAsUser`/`runAsGroup` first, then the
//! image's `User` (`uid`, `uid:gid`, `name`, `name:group`, names looked up in the image's own
//! /etc/passwd and /etc/group), then root; a user's primary group when no group is given.

use std::path::Path;

use anyhow::{bail, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessUser {
    pub uid: u32,
    pub gid: u32,
}

/// A line of passwd or group: `name:x:id:...`, its name, id and (passwd) primary group.
struct Entry {
    name: String,
    id: u32,
    group: Option<u32>,
}

/// Reads `etc/<file>` inside `rootfs`, only if it really is inside (a symlink out of the image is ignored).
fn entries(rootfs: &Path, file: &str) -> Vec<Entry> {
    let path = rootfs.join("etc").join(file);
    let inside = match (path.canonicalize(), rootfs.canonicalize()) {
        (Ok(p), Ok(root)) => p.starts_with(root),
        _ => false,
    };
    let text = if inside { std::fs::read_to_string(&path).unwrap_or_default() } else { String::new() };
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            let id = fields.get(2)?.parse().ok()?;
            Some(Entry { name: fields[0].to_string(), id, group: fields.get(3).and_then(|g| g.parse().ok()) })
        })
        .collect()
}

/// The process user for a container of the image whose root filesystem is `rootfs`.
pub fn resolve(
    rootfs: &Path,
    image_user: Option<&str>,
    run_as_user: Option<u32>,
    run_as_group: Option<u32>,
) -> Result<ProcessUser> {
    let (image_uid, image_gid) = match image_user {
        Some(u) => u.split_once(':').map_or((u, None), |(u, g)| (u, Some(g))),
        None => ("", None),
    };
    let passwd = entries(rootfs, "passwd");
    let uid = match (run_as_user, image_uid) {
        (Some(uid), _) => uid,
        (None, "") => 0,
        (None, u) => match u.parse() {
            Ok(uid) => uid,
            Err(_) => match passwd.iter().find(|e| e.name == u) {
                Some(e) => e.id,
                None => bail!("image user `{u}` is not in the image's /etc/passwd (and is not a number)"),
            },
        },
    };
    let gid = match (run_as_group, image_gid) {
        (Some(gid), _) => gid,
        // With runAsUser set, the image's group still applies (as containerd does).
        (None, Some(g)) => match g.parse() {
            Ok(gid) => gid,
            Err(_) => match entries(rootfs, "group").iter().find(|e| e.name == g) {
                Some(e) => e.id,
                None => bail!("image group `{g}` is not in the image's /etc/group (and is not a number)"),
            },
        },
        (None, None) => passwd.iter().find(|e| e.id == uid).and_then(|e| e.group).unwrap_or(0),
    };
    Ok(ProcessUser { uid, gid })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rootfs() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("etc")).unwrap();
        std::fs::write(dir.path().join("etc/passwd"), "root:x:0:0::/root:/bin/sh\nweb:x:101:102::/srv:/sbin/nologin\n")
            .unwrap();
        std::fs::write(dir.path().join("etc/group"), "root:x:0:\nstaff:x:50:web\n").unwrap();
        dir
    }

    #[test]
    fn numbers_names_and_overrides() {
        let r = rootfs();
        let user = |image: Option<&str>, u: Option<u32>, g: Option<u32>| {
            let p = resolve(r.path(), image, u, g).unwrap();
            (p.uid, p.gid)
        };
        assert_eq!(user(None, None, None), (0, 0));
        assert_eq!(user(Some("65532:65532"), None, None), (65532, 65532));
        assert_eq!(user(Some("web"), None, None), (101, 102), "primary group from passwd");
        assert_eq!(user(Some("web:staff"), None, None), (101, 50));
        assert_eq!(user(Some("web"), Some(7), None), (7, 0), "uid 7 has no passwd entry");
        assert_eq!(user(Some("65532:65532"), Some(1000), Some(2000)), (1000, 2000));
    }

    #[test]
    fn unknown_names_are_errors_and_escaping_links_are_not_followed() {
        let r = rootfs();
        let e = resolve(r.path(), Some("nobody"), None, None).unwrap_err().to_string();
        assert!(e.contains("image user `nobody` is not in the image's /etc/passwd"), "{e}");
        let e = resolve(r.path(), Some("web:wheel"), None, None).unwrap_err().to_string();
        assert!(e.contains("image group `wheel`"), "{e}");

        // /etc/passwd pointing out of the image (at the host's) is not read.
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("passwd"), "intruder:x:5:5::/:/bin/sh\n").unwrap();
        std::fs::remove_file(r.path().join("etc/passwd")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("passwd"), r.path().join("etc/passwd")).unwrap();
        assert!(resolve(r.path(), Some("intruder"), None, None).is_err());
    }
}
