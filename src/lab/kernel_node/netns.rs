//! Named network namespaces (as `ip netns` keeps them under /run/netns): enter one for a child
//! process, for a closure on its own thread, or to write a per-namespace sysctl.

use std::fs::File;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{anyhow, Context, Result};
use nix::sched::{setns, CloneFlags};

/// A named network namespace, by name only: it is opened when entered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: impl Into<String>) -> Netns {
        Netns { name: name.into() }
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    fn open(&self) -> Result<File> {
        File::open(self.path())
            .with_context(|| format!("network namespace `{}` ({})", self.name, self.path().display()))
    }

    /// `cmd`, started inside this namespace, killed when the thread that spawns it ends (so a
    /// lab killed outright takes its pods along). The namespace file is held open by the
    /// command until it is spawned (then dropped with it).
    pub fn command(&self, mut cmd: Command) -> Result<Command> {
        // SAFETY: prctl is a plain system call, no allocation.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        self.enter_on_exec(&mut cmd)?;
        Ok(cmd)
    }

    /// Makes `cmd` start inside this namespace (a container's process, or a command "exec"ed
    /// into the pod). The namespace file is opened now and held by the command until it runs.
    pub fn enter_on_exec(&self, cmd: &mut Command) -> Result<()> {
        let file = self.open()?;
        // SAFETY: setns on an fd opened before fork: a system call, no allocation.
        unsafe {
            cmd.pre_exec(move || {
                let fd = BorrowedFd::borrow_raw(file.as_raw_fd());
                setns(fd, CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)
            });
        }
        Ok(())
    }

    /// Moves the calling thread into this namespace; threads it starts afterwards are born
    /// there (the lab's runtime, on the kernel node).
    pub fn enter_this_thread(&self) -> Result<()> {
        let file = self.open()?;
        setns(&file, CloneFlags::CLONE_NEWNET).with_context(|| format!("entering network namespace `{}`", self.name))
    }

    /// A tokio runtime whose threads all live in this namespace: sockets its tasks open belong
    /// to it (the load generator in the client namespace). Build it outside any runtime.
    pub fn runtime(&self, threads: usize) -> Result<tokio::runtime::Runtime> {
        runtime_in(self.open()?, &format!("netns-{}", self.name), threads)
    }

    /// Runs `f` on a fresh thread that has entered this namespace: sockets it creates belong
    /// to the namespace for their whole life, whichever thread uses them later.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        let file = self.open()?;
        let name = self.name.clone();
        std::thread::spawn(move || -> Result<T> {
            setns(&file, CloneFlags::CLONE_NEWNET).with_context(|| format!("entering network namespace `{name}`"))?;
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow!("a thread in network namespace `{}` panicked", self.name))?
    }

    /// Writes a per-namespace sysctl such as `net/ipv4/ip_forward` (files under /proc/sys/net
    /// show the namespace of the thread that opens them).
    pub fn set_sysctl(&self, key: &'static str, value: &'static str) -> Result<()> {
        let ns = self.name.clone();
        self.run(move || std::fs::write(format!("/proc/sys/{key}"), value))?
            .with_context(|| format!("setting {key}={value} in network namespace `{ns}`"))
    }
}

/// A tokio runtime whose threads all enter the network namespace `file` refers to (checked).
/// Build it outside any runtime.
pub fn runtime_in(file: File, label: &str, threads: usize) -> Result<tokio::runtime::Runtime> {
    use std::os::unix::fs::MetadataExt;
    let file = std::sync::Arc::new(file);
    let inode = file.metadata()?.ino();
    let entered = file.clone();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .max_blocking_threads(threads)
        .enable_all()
        .thread_name(label)
        .on_thread_start(move || {
            // Checked below: a thread that could not enter is seen on the first task.
            let _ = setns(&*entered, CloneFlags::CLONE_NEWNET);
        })
        .build()
        .with_context(|| format!("starting runtime {label}"))?;
    let seen = rt
        .block_on(rt.spawn(async { std::fs::metadata("/proc/thread-self/ns/net").map(|m| m.ino()) }))
        .map_err(|e| anyhow!("{e}"))??;
    if seen != inode {
        anyhow::bail!("runtime {label}: its threads could not enter their network namespace");
    }
    Ok(rt)
}
