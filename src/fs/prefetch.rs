//! Data keys unwrapped ahead of the opens that need them. A program reads a tree one file at
//! a time; with a key store a round trip away (per-file KMS), every cold open would wait for
//! its own unwrap in line. When opens keep missing the DEK cache, the other files of the
//! directory a miss happened in are unwrapped in the background, a bounded window per miss,
//! several at a time, into the cache the opens read. An open of a file whose unwrap is in
//! flight waits for that one (the cache coalesces loads of one key).
//!
//! The unwrap is the open's own (`EnvelopeFile::load`): each DEK is unwrapped by its key
//! store under its own file's context, the header and block 0 authenticate before the key is
//! cached, and the key leaves with the cache's TTL. A failure stops prefetching for a while
//! (a throttled or failing key store is not asked more); an open then unwraps for itself.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::*;

/// How much to unwrap ahead. `files` 0 turns it off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrefetchConfig {
    /// Files of a directory queued per cache miss in it (each may cost a key-store call).
    pub files: usize,
    /// Unwraps in flight at once.
    pub parallel: usize,
}

impl PrefetchConfig {
    pub const OFF: Self = Self { files: 0, parallel: 0 };
    /// For a volume whose unwraps wait on another machine.
    pub const REMOTE: Self = Self { files: 64, parallel: 16 };
}

/// Two misses this close together are a scan, not a lone open: only then is anything
/// unwrapped ahead.
const SCAN_GAP: Duration = Duration::from_secs(2);
/// A directory's listing is kept this long for the windows after the first.
const LISTING_LIFE: Duration = Duration::from_secs(30);
const MAX_LISTINGS: usize = 64;
/// Pause after a failed unwrap, doubled per failure in a row.
const FIRST_PAUSE: Duration = Duration::from_secs(1);
const MAX_PAUSE: Duration = Duration::from_secs(60);

/// Counters for status and metrics.
#[derive(Debug, Default)]
pub struct PrefetchStats {
    /// Files whose header was read and key asked for ahead of an open.
    pub files: AtomicU64,
    /// Of those, unwraps that failed (each paused prefetching).
    pub failures: AtomicU64,
}

enum Task {
    /// List a directory (its O_PATH descriptor) and queue the first window.
    List {
        dir_id: u64,
        dir: Arc<OwnedFd>,
        root: bool,
    },
    Unwrap {
        dir: Arc<File>,
        name: OsString,
    },
}

struct Listing {
    dir: Arc<File>,
    names: Vec<OsString>,
    next: usize,
    at: Instant,
}

#[derive(Default)]
struct State {
    tasks: VecDeque<Task>,
    listings: HashMap<u64, Listing>,
    last_miss: Option<Instant>,
    paused_until: Option<Instant>,
    pause: Duration,
    stop: bool,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    cfg: PrefetchConfig,
    vol: Arc<Volume>,
    stats: PrefetchStats,
}

pub struct Prefetcher {
    shared: Arc<Shared>,
    workers: usize,
}

impl Prefetcher {
    pub fn new(vol: Arc<Volume>, cfg: PrefetchConfig) -> Self {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            cfg,
            vol,
            stats: PrefetchStats::default(),
        });
        let workers = (0..if cfg.files == 0 { 0 } else { cfg.parallel.max(1) })
            .filter(|i| {
                let s = shared.clone();
                std::thread::Builder::new().name(format!("key-prefetch-{i}")).spawn(move || s.work()).is_ok()
            })
            .count();
        Self { shared, workers }
    }

    pub fn config(&self) -> PrefetchConfig {
        self.shared.cfg
    }

    pub fn stats(&self) -> &PrefetchStats {
        &self.shared.stats
    }

    /// An open in directory `dir_id` (O_PATH descriptor `dir`) had to unwrap its key.
    pub(super) fn missed(&self, dir_id: u64, dir: impl FnOnce() -> Result<Arc<OwnedFd>>, root: bool) {
        if self.workers == 0 {
            return;
        }
        let now = Instant::now();
        // Found before the lock is taken (it may make syscalls); unused unless a listing starts.
        let Ok(dir) = dir() else { return };
        let mut guard = self.shared.state.lock().unwrap();
        let st = &mut *guard;
        if st.paused_until.is_some_and(|t| now < t) {
            return;
        }
        let scan = st.last_miss.is_some_and(|t| now.duration_since(t) < SCAN_GAP);
        st.last_miss = Some(now);
        if !scan {
            return;
        }
        st.listings.retain(|_, l| now.duration_since(l.at) < LISTING_LIFE);
        if let Some(l) = st.listings.get_mut(&dir_id) {
            l.at = now;
            let window: Vec<_> = next_window(l, self.shared.cfg.files).collect();
            st.tasks.extend(window);
        } else if st.listings.len() < MAX_LISTINGS && !st.tasks.iter().any(|t| is_listing_of(t, dir_id)) {
            st.tasks.push_back(Task::List { dir_id, dir, root });
        }
        drop(guard);
        self.shared.wake.notify_all();
    }
}

fn is_listing_of(t: &Task, id: u64) -> bool {
    matches!(t, Task::List { dir_id, .. } if *dir_id == id)
}

fn next_window(l: &mut Listing, files: usize) -> impl Iterator<Item = Task> + '_ {
    let end = (l.next + files).min(l.names.len());
    let start = std::mem::replace(&mut l.next, end);
    l.names[start..end].iter().map(|name| Task::Unwrap { dir: l.dir.clone(), name: name.clone() })
}

impl Drop for Prefetcher {
    /// Workers stop at their next task; one inside a key-store call is not waited for (an
    /// unmount must not wait out a KMS timeout), and lets go of the volume when it returns.
    fn drop(&mut self) {
        self.shared.state.lock().unwrap().stop = true;
        self.shared.wake.notify_all();
    }
}

impl Shared {
    fn work(&self) {
        loop {
            let task = {
                let mut st = self.state.lock().unwrap();
                loop {
                    if st.stop {
                        return;
                    }
                    if let Some(t) = st.tasks.pop_front() {
                        break t;
                    }
                    st = self.wake.wait(st).unwrap();
                }
            };
            match task {
                Task::List { dir_id, dir, root } => self.list(dir_id, &dir, root),
                Task::Unwrap { dir, name } => self.unwrap(&dir, &name),
            }
        }
    }

    fn list(&self, dir_id: u64, dir: &OwnedFd, root: bool) {
        let listed = || -> Result<(File, Vec<OsString>)> {
            let dir = sys::reopen(dir, libc::O_RDONLY | libc::O_DIRECTORY)?;
            let mut names = Vec::new();
            let entries = rustix::fs::Dir::read_from(&dir).map_err(|e| Error::io(e.into(), "listing for prefetch"))?;
            for e in entries {
                let e = e.map_err(|e| Error::io(e.into(), "listing for prefetch"))?;
                let name = OsStr::from_bytes(e.file_name().to_bytes());
                let regular =
                    matches!(e.file_type(), rustix::fs::FileType::RegularFile | rustix::fs::FileType::Unknown);
                let side = self.vol.names().is_some() && crate::names::classify(name) == crate::names::EntryKind::Side;
                if regular && !side && !is_reserved(name, root) && name != "." && name != ".." {
                    names.push(name.to_owned());
                }
            }
            Ok((dir, names))
        };
        match listed() {
            Ok((dir, names)) => {
                let mut st = self.state.lock().unwrap();
                let mut l = Listing { dir: Arc::new(dir), names, next: 0, at: Instant::now() };
                let window: Vec<_> = next_window(&mut l, self.cfg.files).collect();
                st.tasks.extend(window);
                st.listings.insert(dir_id, l);
                drop(st);
                self.wake.notify_all();
            }
            Err(e) => tracing::debug!("prefetch: {e}"),
        }
    }

    fn unwrap(&self, dir: &File, name: &OsStr) {
        let Ok(c) = sys::cstr(name) else { return };
        // Whatever was planted under the name (a device, a FIFO) is never opened.
        let Ok(Some((file, _))) = sys::open_regular(dir.as_raw_fd(), &c, libc::O_RDONLY) else { return };
        let describe = || sys::describe_fd(file.as_raw_fd());
        let res = crate::file::backing_len(&file, self.vol.config.shared).and_then(|len| {
            if len == 0 {
                return Ok(());
            }
            self.stats.files.fetch_add(1, Ordering::Relaxed);
            let env = EnvelopeFile { vol: &self.vol, file: &file, describe: &describe, who: None };
            crate::keys::cache::ahead(|| env.load(len).map(drop))
        });
        let mut st = self.state.lock().unwrap();
        match res {
            Ok(()) => st.pause = Duration::ZERO,
            // Not ours to open, damaged, or not an envelope: the open will say so. Only a
            // key store that does not answer is given a rest.
            Err(e) if e.class() != Some(crate::error::Class::KeyStoreUnreachable) => {
                tracing::debug!("prefetch of {}: {e}", describe());
            }
            Err(e) => {
                self.stats.failures.fetch_add(1, Ordering::Relaxed);
                st.pause = (st.pause * 2).clamp(FIRST_PAUSE, MAX_PAUSE);
                st.paused_until = Some(Instant::now() + st.pause);
                st.tasks.clear();
                tracing::warn!("unwrapping keys ahead paused for {:?}: {}: {e}", st.pause, describe());
            }
        }
    }
}
