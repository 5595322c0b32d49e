//! A network namespace the test owns: held open by a bounded `sleep` started with
//! `unshare --net`, loopback up, never the host's. Calls into it run on a thread that joined it.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct Netns {
    holder: Child,
}

impl Netns {
    pub fn new() -> Netns {
        // The holder outlives any test (bounded at 5 minutes) and is killed on drop; the namespace
        // goes with its last process.
        let holder = Command::new("unshare")
            .args(["--net", "--", "sleep", "300"])
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn unshare --net");
        let netns = Netns { holder };
        // The namespace exists once the holder has exec'd sleep: wait (bounded) until /proc says so.
        let exe = format!("/proc/{}/exe", netns.holder.id());
        let ready = crate::common::eventually(Duration::from_secs(5), || {
            std::fs::read_link(&exe).map(|p| p.ends_with("sleep")).unwrap_or(false)
        });
        assert!(ready, "unshare --net did not start sleep within 5 s");
        let out = Command::new("nsenter")
            .arg(format!("--net={}", netns.path()))
            .args(["ip", "link", "set", "lo", "up"])
            .output()
            .expect("run nsenter ip");
        assert!(out.status.success(), "lo up: {}", String::from_utf8_lossy(&out.stderr));
        netns
    }

    pub fn path(&self) -> String {
        format!("/proc/{}/ns/net", self.holder.id())
    }

    /// Runs `f` on a new thread inside the namespace (setns is per thread), returning its result.
    pub fn spawn<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> std::thread::JoinHandle<T> {
        let ns = File::open(self.path()).expect("open the netns");
        std::thread::spawn(move || {
            // SAFETY: setns on this thread only, with a namespace fd we hold open.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
    }

    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.spawn(f).join().expect("the netns thread")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}
