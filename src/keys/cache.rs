//! Unwrapped data keys, cached in memory on moka. Entries are `Arc<FileKey>`: eviction drops
//! the cache's reference and the key is wiped when the last holder (an open file) lets go,
//! so "evicted" never means "still readable somewhere by accident".

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
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
}

/// Keys this thread has loaded so far (asked a key store for, not found in a cache): tells a
/// caller whether the call it just made waited for an unwrap.
pub fn loads_on_this_thread() -> u64 {
    LOADS.with(Cell::get)
}

pub struct DekCache {
    inner: Cache<(FileId, u64), Arc<FileKey>>,
    pub stats: CacheStats,
}

impl DekCache {
    pub fn new(cfg: CacheConfig) -> Self {
        let inner = Cache::builder().max_capacity(cfg.max_entries).time_to_live(cfg.ttl).time_to_idle(cfg.tti).build();
        Self { inner, stats: CacheStats::default() }
    }

    /// The key for (file, header generation), loading it once even when many threads ask
    /// at the same time (moka coalesces concurrent loads of one entry). A caller that waited
    /// on another's load which failed for a reason that may pass (EIO, not an integrity
    /// failure) loads once itself: a throttled unwrap ahead must not fail an open.
    pub fn get_or_load(
        &self,
        file_id: FileId,
        generation: u64,
        load: impl FnOnce() -> Result<FileKey>,
    ) -> Result<Arc<FileKey>> {
        let mut load = Some(load);
        let mut loaded = false;
        let mut res = Err(crate::error::Error::new(libc::EIO, "no load"));
        // At most twice: a second time only if this caller's own load has not run yet.
        while load.is_some() {
            res = self
                .inner
                .try_get_with((file_id, generation), || {
                    loaded = true;
                    LOADS.with(|n| n.set(n.get() + 1));
                    let load = load.take().expect("one load per caller");
                    load().map(Arc::new)
                })
                .map_err(|e: Arc<crate::error::Error>| crate::error::Error::shared(&e));
            if !res.as_ref().is_err_and(|e| e.errno() == libc::EIO && e.integrity_kind().is_none()) {
                break;
            }
        }
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
    use crate::crypto::{Backend, Dek};

    fn key(id: u8) -> FileKey {
        FileKey::new(Backend::AwsLc, [id; 16], &Dek::generate().unwrap())
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

    #[test]
    fn a_waiter_whose_shared_load_failed_for_a_passing_reason_loads_itself() {
        let c = Arc::new(DekCache::new(CacheConfig::default()));
        let (release, wait) = std::sync::mpsc::channel::<()>();
        let (started, has_started) = std::sync::mpsc::channel::<()>();
        let first = {
            let c = c.clone();
            std::thread::spawn(move || {
                c.get_or_load([4; 16], 1, || {
                    started.send(()).unwrap();
                    wait.recv().unwrap();
                    Err(crate::error::Error::new(libc::EIO, "throttled (unwrapping ahead)"))
                })
            })
        };
        has_started.recv().unwrap();
        let second = {
            let c = c.clone();
            std::thread::spawn(move || c.get_or_load([4; 16], 1, || Ok(key(4))))
        };
        // Time for the second caller to join the first's load (moka shows no waiters).
        std::thread::sleep(Duration::from_millis(200));
        release.send(()).unwrap();
        assert_eq!(first.join().unwrap().unwrap_err().errno(), libc::EIO);
        assert!(second.join().unwrap().is_ok(), "the second caller loads for itself");
        // An integrity failure is the file's verdict, not a passing one: shared as it is.
        let e = c
            .get_or_load([5; 16], 1, || Err(crate::error::Error::integrity(crate::error::Integrity::Header, "bad")))
            .unwrap_err();
        assert_eq!(e.integrity_kind(), Some(crate::error::Integrity::Header));
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
