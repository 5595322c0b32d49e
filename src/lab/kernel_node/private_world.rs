//! A private world: a child process started in fresh network and mount namespaces (and a user
//! namespace when not root), with a private tmpfs on /run/netns so that the named network
//! namespaces it creates exist only inside it. Nothing survives the world: namespaces die with
//! their last process, and the child gets SIGKILL when the thread that started it ends
//! (PR_SET_PDEATHSIG), so a SIGKILLed parent takes the world with it.

use std::io;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};
use nix::mount::{mount, MsFlags};
use nix::sched::{unshare, CloneFlags};

/// How the world is isolated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isolation {
    /// Running as root: new network + mount namespaces.
    Root,
    /// Not root: a user namespace maps the caller to root inside it first.
    UserNamespace,
}

impl Isolation {
    /// The isolation this process would get.
    pub fn for_this_process() -> Isolation {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            Isolation::Root
        } else {
            Isolation::UserNamespace
        }
    }
}

/// Turns `cmd` into a command that starts inside a new private world. Whether a user namespace
/// is needed is decided in the child, after any `Command::uid` has taken effect.
pub fn command_in_new_world(mut cmd: Command) -> Command {
    let run_netns_exists = Path::new("/run/netns").is_dir();
    // SAFETY: the closure only makes system calls, on data prepared before fork or on the
    // stack: between fork and exec only async-signal-safe calls are allowed (no allocation).
    unsafe {
        cmd.pre_exec(move || enter(run_netns_exists));
    }
    cmd
}

/// Checks in a throw-away child that this kernel and these privileges allow a private world
/// and that `ip` runs there. The error is one line, fit for "falling back to process".
pub fn probe() -> Result<Isolation> {
    let mut cmd = Command::new("ip");
    cmd.arg("-V");
    crate::lab::kernel_node::tool::run(command_in_new_world(cmd), None)
        .context("network namespaces are not available here (unshare of net+mount namespaces, then `ip -V`)")?;
    Ok(Isolation::for_this_process())
}

/// Whether this machine can run the kernel node: the tools it drives, the bridge netfilter
/// module, and a private world. The error is one line naming what is missing.
pub fn check_host() -> Result<Isolation> {
    for (tool, package) in [("ip", "iproute2"), ("nft", "nftables"), ("conntrack", "conntrack")] {
        let found = Command::new(tool)
            .arg(if tool == "conntrack" { "--version" } else { "-V" })
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok();
        if !found {
            anyhow::bail!("`{tool}` is missing (apt-get install {package})");
        }
    }
    // Loading a module changes the host: the lab only uses it when it is there.
    if !Path::new("/proc/sys/net/bridge").exists() {
        anyhow::bail!("the br_netfilter module is not loaded (modprobe br_netfilter)");
    }
    probe()
}

/// One line of /proc/self/uid_map or gid_map, "0 <id> 1" (the caller is root inside),
/// formatted on the stack.
struct IdMapLine {
    buf: [u8; 24],
    len: usize,
}

impl IdMapLine {
    fn new(id: u32) -> IdMapLine {
        let mut digits = [0u8; 10];
        let mut n = id;
        let mut count = 0;
        loop {
            digits[count] = b'0' + (n % 10) as u8;
            count += 1;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        let mut buf = [0u8; 24];
        buf[..2].copy_from_slice(b"0 ");
        for i in 0..count {
            buf[2 + i] = digits[count - 1 - i];
        }
        buf[2 + count..4 + count].copy_from_slice(b" 1");
        IdMapLine { buf, len: 4 + count }
    }

    fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// Runs in the child between fork and exec.
fn enter(run_netns_exists: bool) -> io::Result<()> {
    // SAFETY: prctl with PR_SET_PDEATHSIG and a signal number.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if Isolation::for_this_process() == Isolation::UserNamespace {
        // SAFETY: getuid/getgid have no preconditions.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        // A uid change just before (Command::uid) leaves the process undumpable, which makes
        // its /proc/self files root's: writing the maps would be refused.
        // SAFETY: prctl with PR_SET_DUMPABLE and a flag.
        if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 1) } != 0 {
            return Err(io::Error::last_os_error());
        }
        unshare(CloneFlags::CLONE_NEWUSER).map_err(io::Error::from)?;
        write_proc(c"/proc/self/setgroups", b"deny")?;
        write_proc(c"/proc/self/uid_map", IdMapLine::new(uid).as_bytes())?;
        write_proc(c"/proc/self/gid_map", IdMapLine::new(gid).as_bytes())?;
    }
    unshare(CloneFlags::CLONE_NEWNET | CloneFlags::CLONE_NEWNS).map_err(io::Error::from)?;
    // Mount events must not travel back to the host's namespace.
    mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None::<&str>)
        .map_err(io::Error::from)?;
    if run_netns_exists {
        mount(Some("tmpfs"), "/run/netns", Some("tmpfs"), MsFlags::empty(), Some("mode=755"))
            .map_err(io::Error::from)?;
    } else {
        // Creating /run/netns would change the host's filesystem: shadow /run instead.
        mount(Some("tmpfs"), "/run", Some("tmpfs"), MsFlags::empty(), Some("mode=755")).map_err(io::Error::from)?;
        // SAFETY: a static path.
        if unsafe { libc::mkdir(c"/run/netns".as_ptr(), 0o755) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

fn write_proc(path: &std::ffi::CStr, bytes: &[u8]) -> io::Result<()> {
    // SAFETY: open/write/close on valid C strings; no allocation.
    unsafe {
        let fd = libc::open(path.as_ptr(), libc::O_WRONLY);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = libc::write(fd, bytes.as_ptr().cast(), bytes.len());
        let err = io::Error::last_os_error();
        libc::close(fd);
        if n != bytes.len() as isize {
            return Err(err);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_map_lines_map_the_caller_to_root() {
        for id in [0, 7, 1000, 65534, u32::MAX] {
            assert_eq!(IdMapLine::new(id).as_bytes(), format!("0 {id} 1").as_bytes());
        }
    }
}
