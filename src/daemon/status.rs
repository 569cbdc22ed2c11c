//! What a running mount answers on its status socket, and how `envelopefs status` shows it.

use std::io::{self, Write};
use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

use crate::daemon::control::Status;
use crate::fs::EncryptedFs;

/// The status socket's reply builder for the mount of `fs` from `backing` on `mountpoint`:
/// uptime counts from this call.
pub fn reporter(fs: Arc<EncryptedFs>, backing: &Path, mountpoint: &Path) -> Arc<dyn Fn() -> Status + Send + Sync> {
    let (backing, mountpoint) = (backing.display().to_string(), mountpoint.display().to_string());
    let started = Instant::now();
    Arc::new(move || {
        let v = fs.volume();
        let (hits, misses) = (v.keys.cache.stats.hits.load(Relaxed), v.keys.cache.stats.misses.load(Relaxed));
        let last = fs.stats.last_error.lock().unwrap().clone();
        Status {
            pid: std::process::id(),
            backing: backing.clone(),
            mountpoint: mountpoint.clone(),
            provider: v.keys.primary().describe(),
            uptime_secs: started.elapsed().as_secs(),
            open_files: fs.open_files(),
            dek_cache_entries: v.keys.cache.entry_count(),
            dek_cache_hits: hits,
            dek_cache_misses: misses,
            dek_cache_hit_rate: if hits + misses == 0 { 0.0 } else { hits as f64 / (hits + misses) as f64 },
            provider_calls: v.keys.calls.load(Relaxed),
            provider_errors: v.keys.errors.load(Relaxed),
            errors: fs.stats.errors.load(Relaxed),
            last_error_secs_ago: last.as_ref().and_then(|(t, _)| t.elapsed().ok()).map(|d| d.as_secs()),
            last_error: last.map(|(_, e)| e),
            inodes_known: fs.inode_count() as u64,
            inode_fds: fs.inode_fds().0 as u64,
            inode_fd_limit: fs.inode_fds().1 as u64,
            requests: fs.stats.requests().map(|(o, n)| (o.to_owned(), n)).collect(),
            kms_requests: v.keys.requests_sent(),
            transport: fs.stats.transport.get().copied().unwrap_or("/dev/fuse").to_owned(),
            ring_requests: fs.stats.ring_requests.load(Relaxed),
        }
    })
}

/// The human form of a status reply (`envelopefs status` without --json).
pub fn write_human(st: &Status, out: &mut dyn Write) -> io::Result<()> {
    writeln!(out, "{} on {} (pid {}, up {} s)", st.backing, st.mountpoint, st.pid, st.uptime_secs)?;
    writeln!(out, "  key store      {}", st.provider)?;
    writeln!(out, "  open files     {}", st.open_files)?;
    writeln!(
        out,
        "  DEK cache      {} keys, {} hits, {} misses ({:.0}% hit rate)",
        st.dek_cache_entries,
        st.dek_cache_hits,
        st.dek_cache_misses,
        st.dek_cache_hit_rate * 100.0
    )?;
    writeln!(out, "  key-store operations {} ({} failed)", st.provider_calls, st.provider_errors)?;
    if let Some(n) = st.kms_requests {
        writeln!(out, "  KMS requests   {n}")?;
    }
    writeln!(
        out,
        "  inodes         {} known, {} descriptors open (at most {})",
        st.inodes_known, st.inode_fds, st.inode_fd_limit
    )?;
    if !st.requests.is_empty() {
        let mut by_count: Vec<_> = st.requests.iter().collect();
        by_count.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        let list: Vec<String> = by_count.iter().map(|(o, n)| format!("{o} {n}")).collect();
        writeln!(out, "  FUSE requests  {}", list.join(", "))?;
    }
    if st.transport == "io_uring" {
        writeln!(out, "  transport      io_uring ({} requests over the ring)", st.ring_requests)?;
    } else if !st.transport.is_empty() {
        writeln!(out, "  transport      {}", st.transport)?;
    }
    writeln!(out, "  errors         {}", st.errors)?;
    if let (Some(e), Some(ago)) = (&st.last_error, st.last_error_secs_ago) {
        writeln!(out, "  last error     {ago} s ago: {e}")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::ffi::OsStr;

    use super::*;
    use crate::fs::{Caller, ROOT_INO};
    use crate::volume::testing::{open, volume};

    const ROOT: Caller = Caller { uid: 0, gid: 0, pid: 1 };

    #[test]
    fn the_reply_counts_open_files_and_cache_use() {
        let d = tempfile::tempdir().unwrap();
        let (backing, _) = volume(d.path());
        let fs = Arc::new(EncryptedFs::new(Arc::new(open(d.path()))).unwrap());
        let status = reporter(fs.clone(), &backing, Path::new("/mnt/x"));
        let st = status();
        assert_eq!((st.pid, st.open_files, st.errors), (std::process::id(), 0, 0));
        assert_eq!((st.inodes_known, st.inode_fds), (1, 0), "the root, whose descriptor is not the cache's");
        assert_eq!((st.backing.as_str(), st.mountpoint.as_str()), (backing.to_str().unwrap(), "/mnt/x"));
        assert_eq!(st.dek_cache_hit_rate, 0.0);
        assert!(st.last_error.is_none());
        let (_, fh) = fs.create(ROOT_INO, OsStr::new("f"), 0o644, 0, libc::O_RDWR, ROOT).unwrap();
        let st = status();
        assert_eq!(st.open_files, 1);
        assert_eq!((st.inodes_known, st.inode_fds), (2, 1));
        assert!(st.dek_cache_entries <= 1);
        fs.release(fh);
        assert_eq!(status().open_files, 0);
    }

    #[test]
    fn the_human_form_names_every_counter() {
        let st = Status {
            pid: 7,
            backing: "/srv/a".into(),
            mountpoint: "/mnt/a".into(),
            provider: "local keyring".into(),
            uptime_secs: 3,
            open_files: 2,
            dek_cache_entries: 1,
            dek_cache_hits: 3,
            dek_cache_misses: 1,
            dek_cache_hit_rate: 0.75,
            provider_calls: 4,
            provider_errors: 0,
            errors: 1,
            last_error: Some("boom".into()),
            last_error_secs_ago: Some(9),
            inodes_known: 12,
            inode_fds: 5,
            inode_fd_limit: 512,
            requests: [("lookup".to_owned(), 3), ("getattr".to_owned(), 9)].into(),
            kms_requests: Some(6),
            transport: "io_uring".into(),
            ring_requests: 11,
        };
        let mut out = Vec::new();
        write_human(&st, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        for needle in [
            "/srv/a on /mnt/a (pid 7, up 3 s)",
            "open files     2",
            "DEK cache      1 keys, 3 hits, 1 misses (75% hit rate)",
            "key-store operations 4 (0 failed)",
            "transport      io_uring (11 requests over the ring)",
            "KMS requests   6",
            "last error     9 s ago: boom",
            "inodes         12 known, 5 descriptors open (at most 512)",
            "FUSE requests  getattr 9, lookup 3",
        ] {
            assert!(text.contains(needle), "{needle}: {text}");
        }
    }
}
