//! Unwrapped data keys, cached in memory on moka. Entries are `Arc<FileKey>`: eviction drops
//! the cache's reference and the key is wiped when the last holder (an open file) lets go,
//! so "evicted" never means "still readable somewhere by accident".

use std::cell::Cell;
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use moka::sync::Cache;

use crate::crypto::FileKey;
use crate::error::Result;
use crate::format::FileId;

#[derive(Clone, Copy, Debug)]
pub struct CacheConfig {
    /// An entry is dropped this long after it was loaded, used or not. This bounds how long
    /// a disabled KEK keeps serving files already open.
    pub ttl: Duration,
    /// And this long after its last use.
    pub tti: Duration,
    pub max_entries: u64,
}

/// A cached key's life (seconds) and the most cached at once, when not told otherwise.
pub const DEFAULT_TTL_SECS: u64 = 300;
pub const DEFAULT_TTI_SECS: u64 = 60;
pub const DEFAULT_MAX_ENTRIES: u64 = 4096;

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(DEFAULT_TTL_SECS),
            tti: Duration::from_secs(DEFAULT_TTI_SECS),
            max_entries: DEFAULT_MAX_ENTRIES,
        }
    }
}

/// Counters for status and tests.
#[derive(Debug, Default)]
pub struct CacheStats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
}

thread_local! {
    static LOADS: Cell<u64> = const { Cell::new(0) };
    static AHEAD: Cell<bool> = const { Cell::new(false) };
}

/// Run `f` as work done ahead of need (`fs::prefetch`): a key it fails to load is not a
/// verdict for the opens that waited on it, which then load it themselves.
pub fn ahead<R>(f: impl FnOnce() -> R) -> R {
    AHEAD.with(|a| a.set(true));
    let r = f();
    AHEAD.with(|a| a.set(false));
    r
}

/// Keys this thread has loaded so far (asked a key store for, not found in a cache): tells a
/// caller whether the call it just made waited for an unwrap.
pub fn loads_on_this_thread() -> u64 {
    LOADS.with(Cell::get)
}

pub struct DekCache {
    inner: Cache<(FileId, u64), Arc<FileKey>>,
    pub stats: CacheStats,
    /// Keys whose last load was done ahead of need and failed.
    failed_ahead: Mutex<HashSet<(FileId, u64)>>,
}

impl DekCache {
    pub fn new(cfg: CacheConfig) -> Self {
        let inner = Cache::builder().max_capacity(cfg.max_entries).time_to_live(cfg.ttl).time_to_idle(cfg.tti).build();
        Self { inner, stats: CacheStats::default(), failed_ahead: Mutex::default() }
    }

    /// The key for (file, header generation), loading it once even when many threads ask
    /// at the same time (moka coalesces concurrent loads of one entry). Callers that waited
    /// on a load done ahead of need (`ahead`) which failed load once more themselves: a
    /// throttled unwrap ahead must not fail an open. Any other failure is every waiter's.
    pub fn get_or_load(
        &self,
        file_id: FileId,
        generation: u64,
        load: impl FnOnce() -> Result<FileKey>,
    ) -> Result<Arc<FileKey>> {
        let key = (file_id, generation);
        let mut load = Some(load);
        let mut loaded = false;
        let res = loop {
            let res = self
                .inner
                .try_get_with(key, || {
                    loaded = true;
                    LOADS.with(|n| n.set(n.get() + 1));
                    let ahead = AHEAD.with(Cell::get);
                    if !ahead {
                        self.failed_ahead.lock().unwrap().remove(&key);
                    }
                    let load = load.take().expect("one load per caller");
                    let res = load().map(Arc::new);
                    if ahead && res.is_err() {
                        let mut failed = self.failed_ahead.lock().unwrap();
                        if failed.len() > 4096 {
                            failed.clear();
                        }
                        failed.insert(key);
                    }
                    res
                })
                .map_err(|e: Arc<crate::error::Error>| (*e).clone());
            // Once at most: the retry's load is this caller's own, which clears the mark.
            if res.is_err() && load.is_some() && self.failed_ahead.lock().unwrap().contains(&key) {
                continue;
            }
            break res;
        };
        if loaded {
            self.stats.misses.fetch_add(1, Ordering::Relaxed);
        } else {
            self.stats.hits.fetch_add(1, Ordering::Relaxed);
        }
        res
    }

    pub fn insert(&self, generation: u64, key: Arc<FileKey>) {
        self.inner.insert((key.file_id, generation), key);
    }

    /// Forget every key (a KEK was taken out of service).
    pub fn clear(&self) {
        self.inner.invalidate_all();
    }

    pub fn entry_count(&self) -> u64 {
        self.inner.run_pending_tasks();
        self.inner.entry_count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::Dek;

    fn key(id: u8) -> FileKey {
        FileKey::new([id; 16], &Dek::generate().unwrap())
    }

    #[test]
    fn loads_once_then_hits_and_expires() {
        let c = DekCache::new(CacheConfig {
            ttl: Duration::from_millis(200),
            tti: Duration::from_secs(60),
            max_entries: 10,
        });
        let loads = AtomicU64::new(0);
        for _ in 0..3 {
            c.get_or_load([1; 16], 1, || {
                loads.fetch_add(1, Ordering::SeqCst);
                Ok(key(1))
            })
            .unwrap();
        }
        assert_eq!(loads.load(Ordering::SeqCst), 1);
        assert_eq!(c.stats.hits.load(Ordering::SeqCst), 2);
        std::thread::sleep(Duration::from_millis(300));
        c.get_or_load([1; 16], 1, || {
            loads.fetch_add(1, Ordering::SeqCst);
            Ok(key(1))
        })
        .unwrap();
        assert_eq!(loads.load(Ordering::SeqCst), 2, "expired entries are loaded again");
    }

    #[test]
    fn failed_loads_are_not_cached_and_keep_errno() {
        let c = DekCache::new(CacheConfig::default());
        let e = c.get_or_load([2; 16], 1, || Err(crate::error::Error::access("KEK disabled"))).unwrap_err();
        assert_eq!(e.errno(), libc::EACCES);
        assert!(c.get_or_load([2; 16], 1, || Ok(key(2))).is_ok());
    }

    #[test]
    fn concurrent_loads_of_one_entry_share_one_load() {
        let c = Arc::new(DekCache::new(CacheConfig::default()));
        let loads = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (c, loads) = (c.clone(), loads.clone());
                std::thread::spawn(move || {
                    c.get_or_load([3; 16], 1, || {
                        loads.fetch_add(1, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_millis(100));
                        Ok(key(3))
                    })
                    .unwrap()
                })
            })
            .collect();
        let keys: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        assert_eq!(loads.load(Ordering::SeqCst), 1);
        assert!(keys.windows(2).all(|w| Arc::ptr_eq(&w[0], &w[1])));
    }

    /// One caller's failing load, with a second caller waiting on it: a load done ahead of
    /// need leaves the waiter to load for itself; an open's own failure is the waiter's too.
    fn waiter_after_failed_load(first_ahead: bool) -> (Result<Arc<FileKey>>, u64) {
        let c = Arc::new(DekCache::new(CacheConfig::default()));
        let (release, wait) = std::sync::mpsc::channel::<()>();
        let (started, has_started) = std::sync::mpsc::channel::<()>();
        let first = {
            let c = c.clone();
            std::thread::spawn(move || {
                let load = || {
                    c.get_or_load([4; 16], 1, || {
                        started.send(()).unwrap();
                        wait.recv().unwrap();
                        Err(crate::error::Error::new(libc::EIO, "throttled"))
                    })
                };
                if first_ahead {
                    ahead(load)
                } else {
                    load()
                }
            })
        };
        has_started.recv().unwrap();
        let own_loads = Arc::new(AtomicU64::new(0));
        let second = {
            let (c, n) = (c.clone(), own_loads.clone());
            std::thread::spawn(move || {
                c.get_or_load([4; 16], 1, || {
                    n.fetch_add(1, Ordering::SeqCst);
                    Ok(key(4))
                })
            })
        };
        // Time for the second caller to join the first's load (moka shows no waiters).
        std::thread::sleep(Duration::from_millis(200));
        release.send(()).unwrap();
        assert_eq!(first.join().unwrap().unwrap_err().errno(), libc::EIO);
        (second.join().unwrap(), own_loads.load(Ordering::SeqCst))
    }

    #[test]
    fn a_waiter_on_a_failed_load_ahead_loads_itself_and_on_an_opens_shares_its_error() {
        let (res, own) = waiter_after_failed_load(true);
        assert!(res.is_ok() && own == 1, "the waiter loads for itself");
        let (res, own) = waiter_after_failed_load(false);
        assert_eq!((res.unwrap_err().errno(), own), (libc::EIO, 0), "one failure for both, one wait");
    }

    #[test]
    fn capacity_bounds_entries() {
        let c =
            DekCache::new(CacheConfig { ttl: Duration::from_secs(60), tti: Duration::from_secs(60), max_entries: 4 });
        for i in 0..50u8 {
            c.get_or_load([i; 16], 1, || Ok(key(i))).unwrap();
        }
        assert!(c.entry_count() <= 4, "{}", c.entry_count());
    }
}
