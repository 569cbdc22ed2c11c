//! Data keys made ahead for new files of a volume with several key slots: each is a file
//! id, a DEK and one record per slot, made by background threads so a create waits on no
//! key store. (A single-slot KMS volume uses the provider's own pool instead.)

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::crypto::Dek;
use crate::error::Result;
use crate::format::{FileId, KeyRecord};

pub type ReadyKey = (FileId, Dek, Vec<KeyRecord>);
type Make = dyn Fn() -> Result<ReadyKey> + Send + Sync;

pub struct KeyPool {
    inner: Arc<Inner>,
}

struct Inner {
    ready: Mutex<VecDeque<ReadyKey>>,
    size: usize,
    /// Makers at once while refilling: fast to refill, gentle on request quotas.
    concurrency: usize,
    filling: AtomicBool,
    in_flight: AtomicUsize,
    make: Box<Make>,
}

impl KeyPool {
    /// A pool of `size` keys made by `make`, `concurrency` at a time; filling starts now.
    pub fn new(size: usize, concurrency: usize, make: Box<Make>) -> Self {
        let pool = Self {
            inner: Arc::new(Inner {
                ready: Mutex::new(VecDeque::with_capacity(size)),
                size,
                concurrency: concurrency.max(1),
                filling: AtomicBool::new(false),
                in_flight: AtomicUsize::new(0),
                make,
            }),
        };
        pool.refill();
        pool
    }

    /// A ready key for which `fresh` holds (keys made before a rotation are dropped).
    pub fn take(&self, fresh: impl Fn(&ReadyKey) -> bool) -> Option<ReadyKey> {
        let got = {
            let mut ready = self.inner.ready.lock().unwrap();
            loop {
                match ready.pop_front() {
                    Some(k) if fresh(&k) => break Some(k),
                    Some(_) => continue,
                    None => break None,
                }
            }
        };
        self.refill();
        got
    }

    pub fn len(&self) -> usize {
        self.inner.ready.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Top the pool up in the background if it is below half full. A failure stops this
    /// round (logged); the next take starts another.
    fn refill(&self) {
        let inner = &self.inner;
        if inner.size == 0 || inner.ready.lock().unwrap().len() * 2 >= inner.size {
            return;
        }
        if inner.filling.swap(true, Ordering::AcqRel) {
            return;
        }
        let inner = self.inner.clone();
        let spawned = std::thread::Builder::new().name("key-pool".into()).spawn(move || {
            let failed = AtomicBool::new(false);
            std::thread::scope(|s| {
                for _ in 0..inner.concurrency {
                    s.spawn(|| {
                        while !failed.load(Ordering::Relaxed) {
                            let claimed = inner.in_flight.fetch_add(1, Ordering::AcqRel);
                            if inner.ready.lock().unwrap().len() + claimed >= inner.size {
                                inner.in_flight.fetch_sub(1, Ordering::AcqRel);
                                break;
                            }
                            // A key counts as in flight until it is in the pool: released
                            // before, another maker could see room for one more.
                            match (inner.make)() {
                                Ok(k) => {
                                    inner.ready.lock().unwrap().push_back(k);
                                    inner.in_flight.fetch_sub(1, Ordering::AcqRel);
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
            inner.filling.store(false, Ordering::Release);
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
        let k = pool.take(|k| k.0[0] >= 5).unwrap();
        assert!(k.0[0] >= 5);
        wait_for(&pool, 8);
        assert!(made.load(Ordering::SeqCst) >= 9);
    }

    #[test]
    fn a_failing_maker_leaves_the_pool_empty_but_working() {
        let pool = KeyPool::new(4, 2, Box::new(|| Err(Error::new(libc::EIO, "key store down"))));
        std::thread::sleep(Duration::from_millis(50));
        assert!(pool.take(|_| true).is_none());
        assert!(pool.is_empty());
    }
}
