//! A second image for runtime tests, built in the test: a static C program as PID 1 that serves
//! `200 ok` on a TCP port and installs NO signal handler, packed `FROM scratch` by buildah into an
//! OCI archive. Include it with `#[path = "common/oci_test_image.rs"] mod oci_test_image;`.
//! Needs gcc with a static libc (libc6-dev) and buildah; `missing_tools` says what is absent.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The reference the archive holds, and the port the server listens on (0.0.0.0).
pub const REF: &str = "plain-server:latest";
pub const PORT: u16 = 8080;

/// Accepts forever, answers each connection once, closes it. No signal() anywhere: as PID 1 of
/// its namespace the kernel gives it no default action for SIGTERM, only SIGKILL ends it.
const SERVER_C: &str = r#"
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

int main(void) {
    int one = 1;
    int s = socket(AF_INET, SOCK_STREAM, 0);
    if (s < 0) return 2;
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_port = htons(PORT);
    a.sin_addr.s_addr = htonl(INADDR_ANY);
    if (bind(s, (struct sockaddr *)&a, sizeof a) != 0) return 3;
    if (listen(s, 64) != 0) return 4;
    static const char reply[] =
        "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\nok\n";
    char buf[4096];
    for (;;) {
        int c = accept(s, 0, 0);
        if (c < 0) continue;
        /* One read takes a small request whole; the reply does not depend on it. */
        if (read(c, buf, sizeof buf) > 0) {
            ssize_t unused = write(c, reply, sizeof reply - 1);
            (void)unused;
        }
        close(c);
    }
}
"#;

/// Why this machine cannot build the image, if it cannot.
pub fn missing_tools() -> Option<String> {
    for (tool, package) in [("gcc", "gcc"), ("buildah", "buildah"), ("unshare", "util-linux")] {
        let found = Command::new("sh").args(["-c", &format!("command -v {tool}")]).output();
        if !found.map(|o| o.status.success()).unwrap_or(false) {
            return Some(format!("`{tool}` is not installed (apt-get install {package})"));
        }
    }
    let libc_a = Command::new("gcc").arg("-print-file-name=libc.a").output().ok()?;
    let path = String::from_utf8_lossy(&libc_a.stdout).trim().to_string();
    if !Path::new(&path).is_absolute() {
        return Some("gcc has no static libc.a (apt-get install libc6-dev)".into());
    }
    None
}

fn run(cmd: &mut Command) {
    let out = cmd.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Builds the server and packs it into `<dir>/plain-server.oci.tar` (ref `REF`); returns the
/// archive's path. buildah's storage lives under `dir` and in a private mount namespace with
/// tmpfs over /var/lib and /var/tmp, so nothing lands in the host's container storage.
pub fn build(dir: &Path) -> PathBuf {
    let context = dir.join("context");
    std::fs::create_dir_all(&context).unwrap();
    std::fs::write(dir.join("server.c"), SERVER_C).unwrap();
    run(Command::new("gcc")
        .args(["-static", "-O2", "-Wall", "-Werror", &format!("-DPORT={PORT}"), "-o"])
        .arg(context.join("server"))
        .arg(dir.join("server.c")));
    std::fs::write(
        context.join("Containerfile"),
        "FROM scratch\nCOPY server /server\nUSER 65532:65532\nENTRYPOINT [\"/server\"]\n",
    )
    .unwrap();
    let archive = dir.join("plain-server.oci.tar");
    let storage = format!("--root {0}/storage --runroot {0}/run --storage-driver vfs", dir.display());
    let script = format!(
        "mount -t tmpfs none /var/lib && mount -t tmpfs none /var/tmp && \
         buildah {storage} bud --quiet --layers=false --isolation chroot -f {ctx}/Containerfile -t {REF} {ctx} >/dev/null && \
         buildah {storage} push --quiet {REF} oci-archive:{out}:{REF}",
        ctx = context.display(),
        out = archive.display(),
    );
    run(Command::new("unshare")
        .args(["--mount", "--propagation", "private", "--", "sh", "-c", &script])
        .env("TMPDIR", dir));
    // buildah's vfs storage holds root-owned copies of the layer: only the archive is kept.
    let _ = std::fs::remove_dir_all(dir.join("storage"));
    let _ = std::fs::remove_dir_all(dir.join("run"));
    archive
}
