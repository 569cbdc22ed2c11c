//! Data keys made ahead for new files of a volume whose key slots wrap per file on another
//! machine (a KMS call each): each is a file id, a DEK and one record per slot, made by
//! background threads so a create waits on no key store.
//!
//! Sized to the create rate: a take that finds the pool empty doubles how many keys it keeps
//! and how many it makes at once (up to `MAX_SIZE` and `MAX_CONCURRENCY`), and waits for the
//! next key made rather than making its own: a burst of creates is served at the rate of
//! the calls in flight, not one round trip per file on each FUSE thread.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::crypto::Dek;
use crate::error::Result;
use crate::format::{FileId, KeyRecord};

pub type ReadyKey = (FileId, Dek, Vec<KeyRecord>);
type Make = dyn Fn() -> Result<ReadyKey> + Send + Sync;

/// Keys a mount keeps ready at first (`--kms-pool`).
pub const DEFAULT_SIZE: usize = 256;
/// Makers at once at first: fast to refill, gentle on request quotas.
pub const DEFAULT_CONCURRENCY: usize = 16;
const MAX_SIZE: usize = 4096;
const MAX_CONCURRENCY: usize = 64;
/// After a round of making failed, the next waits this long (a failing store is not
/// hammered by every create).
const RETRY_AFTER: Duration = Duration::from_secs(1);

pub struct KeyPool {
    inner: Arc<Inner>,
}

struct Inner {
    ready: Mutex<VecDeque<ReadyKey>>,
    /// Signalled when a key is added or a round of making ends.
    made: Condvar,
    size: AtomicUsize,
    max_size: usize,
    concurrency: AtomicUsize,
    filling: AtomicBool,
    /// The last round of making stopped on an error, at `failed_at`.
    failed: AtomicBool,
    failed_at: Mutex<Instant>,
    in_flight: AtomicUsize,
    make: Box<Make>,
    /// Takes that got no key (the caller made its own).
    fallbacks: AtomicU64,
}

impl KeyPool {
    /// A pool of `size` keys made by `make`, `concurrency` at a time; filling starts now.
    pub fn new(size: usize, concurrency: usize, make: Box<Make>) -> Self {
        let pool = Self {
            inner: Arc::new(Inner {
                ready: Mutex::new(VecDeque::with_capacity(size)),
                made: Condvar::new(),
                size: AtomicUsize::new(size),
                max_size: size.max(MAX_SIZE.min(size * 16)),
                concurrency: AtomicUsize::new(concurrency.max(1)),
                filling: AtomicBool::new(false),
                failed: AtomicBool::new(false),
                failed_at: Mutex::new(Instant::now()),
                in_flight: AtomicUsize::new(0),
                make,
                fallbacks: AtomicU64::new(0),
            }),
        };
        pool.refill();
        pool
    }

    /// A ready key for which `fresh` holds (keys made before a rotation are dropped),
    /// waiting up to `wait` for one being made when none is ready. None: the caller makes
    /// its own (the pool is off, or its key store is failing or slow).
    pub fn take(&self, fresh: impl Fn(&ReadyKey) -> bool, wait: Duration) -> Option<ReadyKey> {
        let inner = &self.inner;
        let deadline = Instant::now() + wait;
        let mut grown = false;
        let mut ready = inner.ready.lock().unwrap();
        loop {
            while let Some(k) = ready.pop_front() {
                if fresh(&k) {
                    drop(ready);
                    self.refill();
                    return Some(k);
                }
            }
            if !grown {
                grown = true;
                self.grow();
            }
            drop(ready);
            self.refill();
            ready = inner.ready.lock().unwrap();
            let now = Instant::now();
            if !ready.is_empty() {
                continue;
            }
            // A failing store is not asked more while a create waits: it makes its own key
            // (and gets the store's error itself).
            if now >= deadline || inner.failed.load(Ordering::Acquire) {
                inner.fallbacks.fetch_add(1, Ordering::Relaxed);
                return None;
            }
            // A round that ended full and was emptied since: the next turn starts another.
            if inner.filling.load(Ordering::Acquire) {
                ready = inner.made.wait_timeout(ready, deadline - now).unwrap().0;
            }
        }
    }

    /// The pool ran dry: keep twice as many, make twice as many at once.
    fn grow(&self) {
        let inner = &self.inner;
        let _ = inner.size.fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| {
            (s > 0 && s < inner.max_size).then(|| (s * 2).min(inner.max_size))
        });
        let _ = inner.concurrency.fetch_update(Ordering::AcqRel, Ordering::Acquire, |c| {
            (c < MAX_CONCURRENCY).then(|| (c * 2).min(MAX_CONCURRENCY))
        });
    }

    pub fn len(&self) -> usize {
        self.inner.ready.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many keys it keeps and makes at once now, and the takes that got none.
    pub fn sizing(&self) -> (usize, usize, u64) {
        let i = &self.inner;
        (i.size.load(Ordering::Relaxed), i.concurrency.load(Ordering::Relaxed), i.fallbacks.load(Ordering::Relaxed))
    }

    /// Top the pool up in the background if it is below half full. A failure stops this
    /// round (logged); a take starts another once `RETRY_AFTER` has passed.
    fn refill(&self) {
        let inner = &self.inner;
        let size = inner.size.load(Ordering::Acquire);
        if size == 0 || inner.ready.lock().unwrap().len() * 2 >= size {
            return;
        }
        if inner.failed.load(Ordering::Acquire) && inner.failed_at.lock().unwrap().elapsed() < RETRY_AFTER {
            return;
        }
        if inner.filling.swap(true, Ordering::AcqRel) {
            return;
        }
        inner.failed.store(false, Ordering::Release);
        let inner = self.inner.clone();
        let spawned = std::thread::Builder::new().name("key-pool".into()).spawn(move || {
            let failed = AtomicBool::new(false);
            std::thread::scope(|s| {
                for _ in 0..inner.concurrency.load(Ordering::Acquire) {
                    s.spawn(|| {
                        while !failed.load(Ordering::Relaxed) {
                            let claimed = inner.in_flight.fetch_add(1, Ordering::AcqRel);
                            if inner.ready.lock().unwrap().len() + claimed >= inner.size.load(Ordering::Acquire) {
                                inner.in_flight.fetch_sub(1, Ordering::AcqRel);
                                break;
                            }
                            // A key counts as in flight until it is in the pool: released
                            // before, another maker could see room for one more.
                            match (inner.make)() {
                                Ok(k) => {
                                    inner.ready.lock().unwrap().push_back(k);
                                    inner.in_flight.fetch_sub(1, Ordering::AcqRel);
                                    inner.made.notify_one();
                                }
                                Err(e) => {
                                    inner.in_flight.fetch_sub(1, Ordering::AcqRel);
                                    tracing::warn!("making data keys ahead for new files: {e}");
                                    failed.store(true, Ordering::Relaxed);
                                }
                            }
                        }
                    });
                }
            });
            if failed.load(Ordering::Relaxed) {
                *inner.failed_at.lock().unwrap() = Instant::now();
            }
            inner.failed.store(failed.load(Ordering::Relaxed), Ordering::Release);
            inner.filling.store(false, Ordering::Release);
            // Waiters see the round is over (a failure: they make their own key).
            let _guard = inner.ready.lock().unwrap();
            inner.made.notify_all();
        });
        if spawned.is_err() {
            self.inner.filling.store(false, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;
    use std::time::{Duration, Instant};

    fn wait_for(pool: &KeyPool, n: usize) {
        let t = Instant::now();
        while pool.len() < n {
            assert!(t.elapsed() < Duration::from_secs(10), "pool stuck at {}", pool.len());
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn fills_to_size_and_drops_stale_keys() {
        let made = Arc::new(AtomicUsize::new(0));
        let m = made.clone();
        let pool = KeyPool::new(
            8,
            3,
            Box::new(move || {
                let n = m.fetch_add(1, Ordering::SeqCst);
                Ok(([n as u8; 16], Dek::generate()?, Vec::new()))
            }),
        );
        wait_for(&pool, 8);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(pool.len(), 8, "never more than its size");
        // Only ids >= 5 are "fresh": the older ones are dropped, not handed out.
        let k = pool.take(|k| k.0[0] >= 5, Duration::ZERO).unwrap();
        assert!(k.0[0] >= 5);
        wait_for(&pool, 8);
        assert!(made.load(Ordering::SeqCst) >= 9);
    }

    #[test]
    fn a_burst_waits_for_keys_being_made_and_the_pool_grows() {
        // Each key takes 10 ms to make, like a KMS round trip.
        let pool = KeyPool::new(
            8,
            2,
            Box::new(|| {
                std::thread::sleep(Duration::from_millis(10));
                Ok(([0; 16], Dek::generate()?, Vec::new()))
            }),
        );
        wait_for(&pool, 8);
        // Four FUSE threads create 50 files each: far more than the pool holds.
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..50 {
                        assert!(pool.take(|_| true, Duration::from_secs(10)).is_some());
                    }
                });
            }
        });
        let (size, concurrency, fallbacks) = pool.sizing();
        assert_eq!(fallbacks, 0, "every create took a key made ahead");
        assert!(size > 8 && concurrency > 2, "grew to the rate: {size} keys, {concurrency} at once");
        assert!(size <= 8 * 16 && concurrency <= MAX_CONCURRENCY);
    }

    #[test]
    fn a_failing_maker_ends_the_wait_and_is_not_asked_again_at_once() {
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        let pool = KeyPool::new(
            4,
            2,
            Box::new(move || {
                c.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(5));
                Err(Error::new(libc::EIO, "key store down"))
            }),
        );
        let t = Instant::now();
        for _ in 0..20 {
            assert!(pool.take(|_| true, Duration::from_secs(5)).is_none(), "a failed round ends the wait");
        }
        assert!(t.elapsed() < Duration::from_secs(4), "20 creates waited {:?}", t.elapsed());
        // The first round's two makers, and at most a few rounds more (one per RETRY_AFTER).
        assert!(calls.load(Ordering::SeqCst) <= 2 * 5, "{} calls to a failing store", calls.load(Ordering::SeqCst));
        assert!(pool.is_empty());
    }
}
