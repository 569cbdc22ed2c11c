//! Process plumbing for the mount daemon: memory hygiene, readiness, signals.

use std::io::Write;
use std::os::unix::net::UnixDatagram;

use tracing::warn;

/// Keep secrets out of swap and core dumps: no core dumps or ptrace by other users
/// (PR_SET_DUMPABLE=0), and every page locked in RAM as it is touched (MCL_ONFAULT keeps
/// the cost to what is used).
pub fn harden_memory(lock: bool) {
    unsafe {
        if libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) != 0 {
            warn!("PR_SET_DUMPABLE failed: {}", std::io::Error::last_os_error());
        }
        if lock && libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE | libc::MCL_ONFAULT) != 0 {
            warn!(
                "mlockall failed ({}): data keys may reach swap; run as root or raise RLIMIT_MEMLOCK",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// Every inode the kernel knows costs one descriptor: take the hard limit.
pub fn raise_fd_limit() {
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

/// Tell systemd (Type=notify) something, if it is listening.
pub fn sd_notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return };
    let sock = match UnixDatagram::unbound() {
        Ok(s) => s,
        Err(e) => return warn!("sd_notify: {e}"),
    };
    let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
    let res = if let Some(abstract_name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(abstract_name).and_then(|a| sock.send_to_addr(state.as_bytes(), &a))
    } else {
        sock.send_to(state.as_bytes(), &path)
    };
    if let Err(e) = res {
        warn!("sd_notify({state}): {e}");
    }
}

/// The parent of a daemonized mount waits on our stdout for this line.
pub const READY_LINE: &str = "envelopefs-ready";

/// Say the mount is ready: to systemd, and to a waiting parent (then let go of its pipe).
pub fn announce_ready(to_parent: bool) {
    sd_notify("READY=1");
    if to_parent {
        let mut out = std::io::stdout();
        let _ = writeln!(out, "{READY_LINE}");
        let _ = out.flush();
        unsafe {
            let null = libc::open(c"/dev/null".as_ptr(), libc::O_WRONLY);
            if null >= 0 {
                libc::dup2(null, 1);
                libc::close(null);
            }
        }
    }
}

/// Is `path` the root of a mount (its device differs from its parent's, or it is listed in
/// mountinfo)? Used to refuse mounting over a busy mount point.
pub fn is_mount_point(path: &std::path::Path) -> bool {
    let Ok(canon) = std::fs::canonicalize(path) else { return false };
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else { return false };
    let want = canon.to_string_lossy().replace(' ', "\\040");
    info.lines().any(|l| l.split(' ').nth(4) == Some(want.as_str()))
}
