//! The daemon's control socket: `envelopefs status MNT` asks a running mount how it is doing.
//! One Unix socket per mount under /run/envelopefs (directory 0700, socket 0600: root, or
//! the user who mounted, only). The protocol is one request line, one JSON reply line.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// What `status --json` prints.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct Status {
    pub pid: u32,
    pub backing: String,
    pub mountpoint: String,
    pub provider: String,
    pub uptime_secs: u64,
    pub open_files: u64,
    pub dek_cache_entries: u64,
    pub dek_cache_hits: u64,
    pub dek_cache_misses: u64,
    pub dek_cache_hit_rate: f64,
    pub provider_calls: u64,
    pub provider_errors: u64,
    pub errors: u64,
    pub last_error: Option<String>,
    pub last_error_secs_ago: Option<u64>,
    /// Inodes the kernel knows, and how many of them have a descriptor open.
    #[serde(default)]
    pub inodes_known: u64,
    #[serde(default)]
    pub inode_fds: u64,
    #[serde(default)]
    pub inode_fd_limit: u64,
    /// FUSE requests served since the mount, by opcode.
    #[serde(default)]
    pub requests: std::collections::BTreeMap<String, u64>,
    /// Requests sent to KMS (retries and keys made ahead included), when a slot is KMS;
    /// `provider_calls` counts the key operations asked of the key stores.
    #[serde(default)]
    pub kms_requests: Option<u64>,
    /// What serves the FUSE requests: "/dev/fuse" or "io_uring" (`--io-uring`).
    #[serde(default)]
    pub transport: String,
    /// Requests that came over io_uring.
    #[serde(default)]
    pub ring_requests: u64,
}

/// Where the socket of the mount at `mountpoint` lives.
pub fn socket_path(mountpoint: &Path) -> PathBuf {
    let canon = std::fs::canonicalize(mountpoint).unwrap_or_else(|_| mountpoint.to_owned());
    let name: String = canon
        .to_string_lossy()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '.' { c } else { '_' })
        .collect();
    let dir = std::env::var_os("ENVELOPEFS_RUNTIME_DIR").map(PathBuf::from).unwrap_or_else(|| "/run/envelopefs".into());
    // The checksum keeps /mnt/a_b and /mnt/a/b apart.
    let crc = crc32fast::hash(canon.as_os_str().as_encoded_bytes());
    dir.join(format!("{}-{crc:08x}.sock", name.trim_start_matches('_')))
}

/// The socket a mount serves on. Dropping it removes the socket file, if that path still
/// names the socket this process bound (a later daemon's is left alone).
pub struct Socket {
    path: PathBuf,
    dev_ino: (u64, u64),
}

impl Socket {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Socket {
    fn drop(&mut self) {
        use std::os::unix::fs::MetadataExt;
        if std::fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.dev_ino) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Serve status requests from a background thread until the process exits; the socket
/// is removed when the returned `Socket` is dropped (at unmount).
pub fn serve(mountpoint: &Path, status: Arc<dyn Fn() -> Status + Send + Sync>) -> Result<Socket> {
    let path = socket_path(mountpoint);
    let dir = path.parent().unwrap();
    // Made 0700 if we make it; an existing directory keeps its mode (never chmod /tmp).
    std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
        .create(dir)
        .map_err(|e| Error::io(e, format!("creating {}", dir.display())))?;
    let _ = std::fs::remove_file(&path); // a socket left by a killed daemon
    let listener = UnixListener::bind(&path).map_err(|e| Error::io(e, format!("binding {}", path.display())))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| Error::io(e, "restricting the control socket"))?;
    let meta = std::fs::symlink_metadata(&path).map_err(|e| Error::io(e, "stat of the control socket"))?;
    let socket = Socket {
        path,
        dev_ino: (std::os::unix::fs::MetadataExt::dev(&meta), std::os::unix::fs::MetadataExt::ino(&meta)),
    };
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for conn in listener.incoming().flatten() {
                let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
                let mut line = String::new();
                let mut r = BufReader::new(&conn);
                if r.read_line(&mut line).is_err() {
                    continue;
                }
                let reply = match line.trim() {
                    "status" => serde_json::to_string(&status()).unwrap(),
                    other => format!("{{\"error\":\"unknown request {other:?}\"}}"),
                };
                let _ = (&conn).write_all(format!("{reply}\n").as_bytes());
            }
        })
        .map_err(|e| Error::io(e, "starting the control thread"))?;
    Ok(socket)
}

/// Ask the daemon serving `mountpoint` for its status.
pub fn query(mountpoint: &Path) -> Result<Status> {
    let path = socket_path(mountpoint);
    let mut s = UnixStream::connect(&path).map_err(|e| {
        // A daemon killed (-9, OOM, a panic) leaves its socket file and a connection nobody
        // serves: say that, not only the socket's errno.
        // statfs always asks the daemon; a stat may be answered from the kernel's cache.
        if rustix::fs::statvfs(mountpoint).is_err_and(crate::sys::is_dead_fuse) {
            return Error::new(
                libc::ENOTCONN,
                format!(
                    "the envelopefs daemon of {0} is gone (killed or crashed): its FUSE connection is dead \
                     (ENOTCONN); the next `envelopefs mount` of the volume there (or the unit's restart) clears \
                     it, or `umount -l {0}` does",
                    mountpoint.display()
                ),
            )
            .with_class(crate::error::Class::Mountpoint);
        }
        Error::io(e, format!("no envelopefs daemon answers for {} (socket {})", mountpoint.display(), path.display()))
    })?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
    s.write_all(b"status\n").map_err(|e| Error::io(e, "asking for status"))?;
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).map_err(|e| Error::io(e, "reading status"))?;
    serde_json::from_str(&line).map_err(|e| Error::new(libc::EPROTO, format!("bad status reply: {e}")))
}
