//! Moving files to the current KEK. `rewrap` re-wraps each header's DEK (data untouched,
//! safe while mounted); `reencrypt` gives each file a new DEK and rewrites its content
//! (offline). Both are crash-safe and resumable: a rerun finishes what is left.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::content::Content;
use crate::envelope::{decode_region, Header};
use crate::error::{Error, Result};
use crate::keys::KeyContext;
use crate::volume::{Volume, RESERVED};

/// Suffix of the temporary file a re-encryption writes next to its original.
pub const TMP_SUFFIX: &str = ".envelopefs-reencrypt";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Rewrap,
    Reencrypt,
}

#[derive(Debug, Default)]
pub struct Summary {
    pub changed: u64,
    pub unchanged: u64,
    pub failed: Vec<(PathBuf, Error)>,
}

/// Every regular file of the volume (the volume's own files and stale temporaries aside).
pub fn volume_files(root: &Path) -> Result<Vec<PathBuf>> {
    Ok(regular_files(root)?.into_iter().filter(|p| !is_temporary(p)).collect())
}

/// Remove temporaries a killed re-encryption left (their originals are intact).
pub fn remove_stale_temporaries(root: &Path) -> Result<u64> {
    let mut n = 0;
    for p in regular_files(root)?.into_iter().filter(|p| is_temporary(p)) {
        fs::remove_file(&p).map_err(|e| Error::io(e, format!("removing stale temporary {}", p.display())))?;
        n += 1;
    }
    Ok(n)
}

fn is_temporary(p: &Path) -> bool {
    p.file_name().is_some_and(|n| n.as_encoded_bytes().ends_with(TMP_SUFFIX.as_bytes()))
}

/// All regular files below `root`, sorted, except the volume's own files in the root.
fn regular_files(root: &Path) -> Result<Vec<PathBuf>> {
    fn walk(dir: &Path, is_root: bool, out: &mut Vec<PathBuf>) -> Result<()> {
        for e in fs::read_dir(dir).map_err(|e| Error::io(e, format!("listing {}", dir.display())))? {
            let e = e.map_err(|e| Error::io(e, format!("listing {}", dir.display())))?;
            let name = e.file_name();
            if is_root && RESERVED.iter().any(|r| std::ffi::OsStr::new(r) == name) {
                continue;
            }
            let ft = e.file_type().map_err(|e| Error::io(e, "readdir"))?;
            if ft.is_dir() {
                walk(&e.path(), false, out)?;
            } else if ft.is_file() {
                out.push(e.path());
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(root, true, &mut out)?;
    out.sort();
    Ok(out)
}

/// Run `mode` over `files` with `jobs` threads; `progress` is told after each file.
pub fn run(vol: &Volume, mode: Mode, files: Vec<PathBuf>, jobs: usize, progress: &(dyn Fn(&Path) + Sync)) -> Summary {
    let queue = Mutex::new(files.into_iter());
    let summary = Mutex::new(Summary::default());
    std::thread::scope(|s| {
        for _ in 0..jobs.max(1) {
            s.spawn(|| loop {
                let Some(path) = queue.lock().unwrap().next() else { break };
                let res = match mode {
                    Mode::Rewrap => rewrap_file(vol, &path),
                    Mode::Reencrypt => reencrypt_file(vol, &path),
                };
                let mut sum = summary.lock().unwrap();
                match res {
                    Ok(true) => sum.changed += 1,
                    Ok(false) => sum.unchanged += 1,
                    Err(e) => sum.failed.push((path.clone(), e)),
                }
                drop(sum);
                progress(&path);
            });
        }
    });
    let mut s = summary.into_inner().unwrap();
    s.failed.sort_by(|a, b| a.0.cmp(&b.0));
    s
}

fn describe(path: &Path) -> impl Fn() -> String + '_ {
    move || path.display().to_string()
}

/// Re-wrap one header under the current KEK version. Writes the older slot (generation + 1)
/// and fsyncs, then the other (generation + 2) and fsyncs: at every instant one slot that
/// verifies holds the DEK. Returns whether anything changed.
pub fn rewrap_file(vol: &Volume, path: &Path) -> Result<bool> {
    let ctx_err = |e: Error| e.context(path.display());
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| Error::io(e, format!("opening {}", path.display())))?;
    let geo = vol.geometry;
    if f.metadata().map_err(|e| Error::io(e, "fstat"))?.len() == 0 {
        return Ok(false); // no header yet: it will be made under the current KEK
    }
    let mut region = vec![0u8; geo.header_size as usize];
    f.read_exact_at(&mut region, 0).map_err(|e| ctx_err(Error::io(e, "reading header")))?;
    let opened = vol.open_header(&region, &describe(path)).map_err(ctx_err)?;
    let current = vol.provider.current_version().map_err(ctx_err)?;
    let kek_id = vol.provider.kek_id();
    let kind = vol.provider.kind();
    let stale = |r: &crate::envelope::KeyRecord| r.provider == kind && (r.kek_version != current || r.kek_id != kek_id);
    let is_current = |h: &Header| !h.records.iter().any(stale);
    let other = 1 - opened.slot;
    let other_current = match decode_region(&region).into_iter().find(|(i, _)| *i == other) {
        Some((_, Ok(v))) => is_current(&v.header) && opened.key.verify_header_tag(&v.authenticated, &v.tag),
        _ => false,
    };
    if is_current(&opened.header) && other_current {
        return Ok(false);
    }
    let h = &opened.header;
    let ctx = KeyContext { volume_id: &vol.volume_id, file_id: &h.file_id };
    let mut records = Vec::with_capacity(h.records.len());
    for r in &h.records {
        if stale(r) {
            let res = vol.provider.rewrap(r, &ctx);
            vol.audit("rewrap", &h.file_id, &describe(path), r, res.as_ref().map(drop));
            records.push(res.map_err(ctx_err)?);
        } else {
            records.push(r.clone());
        }
    }
    let half = geo.slot_size();
    for (step, slot) in [(1, other), (2, opened.slot)] {
        let newer = Header { generation: h.generation + step, records: records.clone(), ..h.clone() };
        let bytes = newer.encode_slot(half, |b| opened.key.header_tag(b)).map_err(ctx_err)?;
        f.write_all_at(&bytes, (slot * half) as u64)
            .and_then(|_| f.sync_data())
            .map_err(|e| ctx_err(Error::io(e, format!("writing header slot {slot}"))))?;
    }
    Ok(true)
}

/// Give one file a new file id and DEK and rewrite its content: a temporary beside it,
/// fsync, rename over the original, fsync the directory. A crash leaves the old file or
/// the new one, never neither. Hard-linked files are refused (a rename would split them).
pub fn reencrypt_file(vol: &Volume, path: &Path) -> Result<bool> {
    let ctx_err = |e: Error| e.context(path.display());
    let old = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| Error::io(e, format!("opening {}", path.display())))?;
    let meta = old.metadata().map_err(|e| Error::io(e, "fstat"))?;
    if meta.len() == 0 {
        return Ok(false);
    }
    if meta.nlink() > 1 {
        return Err(ctx_err(Error::new(libc::EMLINK, "has hard links; re-encrypting it would split them")));
    }
    let geo = vol.geometry;
    let mut region = vec![0u8; geo.header_size as usize];
    old.read_exact_at(&mut region, 0).map_err(|e| ctx_err(Error::io(e, "reading header")))?;
    let opened = vol.open_header(&region, &describe(path)).map_err(ctx_err)?;
    let src = Content { file: &old, geo, key: Some(&opened.key) };
    let size = src.size().map_err(ctx_err)?;

    let name = path.file_name().ok_or_else(|| Error::new(libc::EINVAL, "no file name"))?;
    let tmp = path.with_file_name(format!(".{}{TMP_SUFFIX}", name.to_string_lossy()));
    let new = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .map_err(|e| ctx_err(Error::io(e, format!("creating {}", tmp.display()))))?;
    let result = (|| -> Result<()> {
        let (new_region, new_key) = vol.new_header(&describe(path))?;
        new.write_all_at(&new_region, 0).map_err(|e| Error::io(e, "writing header"))?;
        let dst = Content { file: &new, geo, key: Some(&new_key) };
        const CHUNK: u64 = 1 << 20;
        let mut off = 0;
        while off < size {
            let data = src.read(off, CHUNK.min(size - off) as usize)?;
            // Write runs of blocks with content; all-zero blocks stay holes.
            let bs = geo.block_size as usize;
            let mut run_start = None;
            for (i, block) in data.chunks(bs).enumerate() {
                let zero = block.iter().all(|&b| b == 0);
                match (zero, run_start) {
                    (false, None) => run_start = Some(i),
                    (true, Some(st)) => {
                        dst.write(off + (st * bs) as u64, &data[st * bs..i * bs])?;
                        run_start = None;
                    }
                    _ => {}
                }
            }
            if let Some(st) = run_start {
                dst.write(off + (st * bs) as u64, &data[st * bs..])?;
            }
            off += CHUNK;
        }
        dst.truncate(size)?;
        copy_metadata(&old, &new, &meta)?;
        new.sync_all().map_err(|e| Error::io(e, "fsync"))?;
        fs::rename(&tmp, path).map_err(|e| Error::io(e, "renaming over the original"))?;
        if let Some(dir) = path.parent() {
            File::open(dir).and_then(|d| d.sync_all()).map_err(|e| Error::io(e, "fsync of the directory"))?;
        }
        let rec = &opened.header.records[0];
        vol.audit("reencrypt", &opened.header.file_id, &describe(path), rec, Ok(()));
        Ok(())
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(ctx_err(e));
    }
    Ok(true)
}

/// Owner, mode, user.* xattrs and times of `from` onto `to`.
fn copy_metadata(from: &File, to: &File, meta: &fs::Metadata) -> Result<()> {
    let (src, dst) = (from.as_raw_fd(), to.as_raw_fd());
    unsafe {
        if libc::fchown(dst, meta.uid(), meta.gid()) != 0 || libc::fchmod(dst, meta.mode() & 0o7777) != 0 {
            return Err(crate::error::last_os("copying owner and mode"));
        }
        let n = libc::flistxattr(src, std::ptr::null_mut(), 0);
        if n > 0 {
            let mut names = vec![0u8; n as usize];
            let n = libc::flistxattr(src, names.as_mut_ptr().cast(), names.len());
            for name in names[..n.max(0) as usize].split(|&b| b == 0).filter(|n| n.starts_with(b"user.")) {
                let c = std::ffi::CString::new(name).unwrap();
                let len = libc::fgetxattr(src, c.as_ptr(), std::ptr::null_mut(), 0);
                if len < 0 {
                    continue;
                }
                let mut v = vec![0u8; len as usize];
                let len = libc::fgetxattr(src, c.as_ptr(), v.as_mut_ptr().cast(), v.len());
                if len >= 0 && libc::fsetxattr(dst, c.as_ptr(), v.as_ptr().cast(), len as usize, 0) != 0 {
                    return Err(crate::error::last_os("copying extended attributes"));
                }
            }
        }
        let times = [
            libc::timespec { tv_sec: meta.atime(), tv_nsec: meta.atime_nsec() },
            libc::timespec { tv_sec: meta.mtime(), tv_nsec: meta.mtime_nsec() },
        ];
        if libc::futimens(dst, times.as_ptr()) != 0 {
            return Err(crate::error::last_os("copying times"));
        }
    }
    Ok(())
}

/// A progress reporter: a bar on a terminal, a log line every few seconds otherwise.
pub struct Progress {
    bar: Option<indicatif::ProgressBar>,
    done: AtomicU64,
    total: u64,
    start: Instant,
    last_line: Mutex<Instant>,
}

impl Progress {
    pub fn new(total: u64, label: &str) -> Self {
        use std::io::IsTerminal;
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = indicatif::ProgressBar::new(total);
            b.set_style(
                indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} files, {per_sec}, ETA {eta}")
                    .unwrap()
                    .progress_chars("=> "),
            );
            b.set_message(label.to_owned());
            b
        });
        Self { bar, done: AtomicU64::new(0), total, start: Instant::now(), last_line: Mutex::new(Instant::now()) }
    }

    pub fn tick(&self, _path: &Path) {
        let done = self.done.fetch_add(1, Ordering::Relaxed) + 1;
        if let Some(b) = &self.bar {
            b.inc(1);
            return;
        }
        let mut last = self.last_line.lock().unwrap();
        if last.elapsed() >= Duration::from_secs(2) || done == self.total {
            *last = Instant::now();
            let rate = done as f64 / self.start.elapsed().as_secs_f64().max(1e-3);
            tracing::info!("{done}/{} files ({rate:.0} files/s)", self.total);
        }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish();
        }
    }
}
