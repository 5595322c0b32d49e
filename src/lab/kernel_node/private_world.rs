//! A private world: a child process started in fresh network and mount namespaces (and a user
//! namespace when not root), with a private tmpfs on /run/netns so that the named network
//! namespaces it creates exist only inside it. Nothing survives the world: namespaces die with
//! their last process, and the child gets SIGKILL when the thread that started it ends
//! (PR_SET_PDEATHSIG), so a SIGKILLed parent takes the world with it.

use std::ffi::CString;
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

/// Turns `cmd` into a command that starts inside a new private world.
pub fn command_in_new_world(mut cmd: Command) -> Command {
    let isolation = Isolation::for_this_process();
    // Everything the child writes is prepared before fork: between fork and exec only
    // async-signal-safe calls are allowed (no allocation).
    // SAFETY: getuid/getgid have no preconditions.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let maps = IdMaps::new(uid, gid);
    let run_netns_exists = Path::new("/run/netns").is_dir();
    // SAFETY: the closure only makes system calls with data prepared above.
    unsafe {
        cmd.pre_exec(move || enter(isolation, &maps, run_netns_exists));
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

/// The contents of /proc/self/{setgroups,uid_map,gid_map} for a user namespace.
struct IdMaps {
    uid_map: CString,
    gid_map: CString,
}

impl IdMaps {
    fn new(uid: u32, gid: u32) -> IdMaps {
        IdMaps {
            uid_map: CString::new(format!("0 {uid} 1")).expect("no NUL"),
            gid_map: CString::new(format!("0 {gid} 1")).expect("no NUL"),
        }
    }
}

/// Runs in the child between fork and exec.
fn enter(isolation: Isolation, maps: &IdMaps, run_netns_exists: bool) -> io::Result<()> {
    // SAFETY: prctl with PR_SET_PDEATHSIG and a signal number.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if isolation == Isolation::UserNamespace {
        unshare(CloneFlags::CLONE_NEWUSER).map_err(io::Error::from)?;
        write_proc(c"/proc/self/setgroups", c"deny")?;
        write_proc(c"/proc/self/uid_map", &maps.uid_map)?;
        write_proc(c"/proc/self/gid_map", &maps.gid_map)?;
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

fn write_proc(path: &std::ffi::CStr, data: &std::ffi::CStr) -> io::Result<()> {
    // SAFETY: open/write/close on valid C strings; no allocation.
    unsafe {
        let fd = libc::open(path.as_ptr(), libc::O_WRONLY);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let bytes = data.to_bytes();
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
    fn id_maps_map_the_caller_to_root() {
        let m = IdMaps::new(1000, 100);
        assert_eq!(m.uid_map.to_str().unwrap(), "0 1000 1");
        assert_eq!(m.gid_map.to_str().unwrap(), "0 100 1");
    }
}
