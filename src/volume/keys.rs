//! The volume's key service: the key slots opened here, the DEK cache, keys made ahead for
//! new files, the audit log and the rule that new files need every slot. The file layer
//! asks it for a new file's header, or for the key of a header it read, in one call.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use super::*;

/// How long a create waits for a key being made ahead before making its own: a few KMS
/// round trips (a slow or failing store ends the wait sooner: its round of making stops).
const POOL_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// How long a slot whose store did not answer is tried last.
const SLOT_DOWN_FOR: std::time::Duration = std::time::Duration::from_secs(30);

/// One key slot opened in this process.
pub struct KeySlot {
    /// Its number in the volume's key policy (0: the primary).
    pub index: usize,
    /// Its settings, as this host trusts them.
    pub settings: ProviderConfig,
    pub provider: Arc<dyn KeyProvider>,
    /// Until when it is tried last (its store failed to answer).
    down_until: std::sync::Mutex<Option<std::time::Instant>>,
    /// Operations asked of its store, failures, and how long each took (the metrics).
    pub ops: prometheus_client::metrics::counter::Counter,
    pub failures: prometheus_client::metrics::counter::Counter,
    pub seconds: prometheus_client::metrics::histogram::Histogram,
}

impl KeySlot {
    pub(crate) fn new(index: usize, settings: ProviderConfig, provider: Arc<dyn KeyProvider>) -> Self {
        Self {
            index,
            settings,
            provider,
            down_until: std::sync::Mutex::new(None),
            ops: Default::default(),
            failures: Default::default(),
            // 100 µs to about 100 s.
            seconds: prometheus_client::metrics::histogram::Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(1e-4, 4.0, 11),
            ),
        }
    }

    /// Run one operation on this slot's store, timed and counted.
    pub(crate) fn timed<T>(&self, op: impl FnOnce() -> Result<T>) -> Result<T> {
        let start = std::time::Instant::now();
        let r = op();
        self.seconds.observe(start.elapsed().as_secs_f64());
        self.ops.inc();
        if r.is_err() {
            self.failures.inc();
        }
        r
    }

    pub(super) fn is_down(&self) -> bool {
        self.down_until.lock().unwrap().is_some_and(|t| t > std::time::Instant::now())
    }

    pub(super) fn mark(&self, res: &Result<Dek>) {
        let down = match res {
            Ok(_) => None,
            Err(e) if e.errno() == libc::EACCES => return,
            Err(_) => Some(std::time::Instant::now() + SLOT_DOWN_FOR),
        };
        let mut d = self.down_until.lock().unwrap();
        if d.is_some() != down.is_some() {
            match down {
                Some(_) => tracing::warn!(
                    "key slot {} ({}) failed: trying the others first",
                    self.index,
                    self.settings.summary()
                ),
                None => tracing::info!("key slot {} ({}) answers again", self.index, self.settings.summary()),
            }
        }
        *d = down;
    }

    /// Whether `rec` is this slot's, wrapped under its current KEK.
    pub(super) fn current(&self, rec: &KeyRecord) -> bool {
        rec.provider == self.provider.kind()
            && rec.kek_id == self.provider.kek_id()
            && self.provider.current_version().is_ok_and(|v| v == rec.kek_version)
    }
}

/// The key service of one open volume.
pub struct KeyService {
    volume_id: VolumeId,
    geometry: Geometry,
    /// Every slot opened here, in policy order (the primary first; in a recovery open, the
    /// recovery slot alone).
    slots: Vec<KeySlot>,
    /// Slots of the policy not opened here, and why: new files cannot be made without them.
    missing: Vec<(usize, String)>,
    /// Slots the volume's key policy has.
    policy_len: usize,
    pub cache: DekCache,
    audit: Option<AuditLog>,
    /// Calls to the key stores (wraps and unwraps) and how many failed, for `status`.
    pub calls: AtomicU64,
    pub errors: AtomicU64,
    /// The primary's revocation counter when the DEK cache was last known good.
    revocations_seen: AtomicU64,
    /// Per-file KMS in a mount: keys (a record per slot) made ahead for new files.
    pool: Option<KeyPool>,
}

impl KeyService {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        volume_id: VolumeId,
        geometry: Geometry,
        opts: &OpenOptions,
        slots: Vec<KeySlot>,
        missing: Vec<(usize, String)>,
        policy_len: usize,
        audit: Option<AuditLog>,
    ) -> Self {
        assert!(!slots.is_empty(), "a volume opens with at least one key slot");
        let mut keys = Self {
            volume_id,
            geometry,
            slots,
            missing,
            policy_len,
            cache: DekCache::new(opts.cache),
            audit,
            calls: Default::default(),
            errors: Default::default(),
            revocations_seen: Default::default(),
            pool: None,
        };
        keys.pool = keys.make_pool(opts.kms_pool.unwrap_or(0));
        keys
    }

    /// A mount of a volume with a KMS key called per file among its slots keeps keys (a
    /// record per slot) ready, so creates wait on no store.
    fn make_pool(&self, size: usize) -> Option<KeyPool> {
        let per_file_kms =
            self.slots.iter().any(|s| matches!(s.settings, ProviderConfig::AwsKms { intermediate_key: false, .. }));
        if !self.has_every_slot() || size == 0 || !per_file_kms {
            return None;
        }
        let providers: Vec<_> = self.slots.iter().map(|s| s.provider.clone()).collect();
        let volume_id = self.volume_id;
        let make: Box<dyn Fn() -> Result<ReadyKey> + Send + Sync> = match &providers[..] {
            // One slot: KMS draws the DEK (GenerateDataKey), one call.
            [one] => {
                let one = one.clone();
                Box::new(move || {
                    crate::keys::new_file_key(&*one, &volume_id).map(|(id, dek, rec)| (id, dek, vec![rec]))
                })
            }
            _ => Box::new(move || wrap_for_all(&providers, &volume_id)),
        };
        Some(KeyPool::new(size, crate::keys::pool::DEFAULT_CONCURRENCY, make))
    }

    /// The primary slot's store (in a recovery open, the recovery slot's).
    pub fn primary(&self) -> &Arc<dyn KeyProvider> {
        &self.slots[0].provider
    }

    /// Every slot opened here, in policy order.
    pub fn slots(&self) -> &[KeySlot] {
        &self.slots
    }

    /// Slots of the policy not opened here, and why.
    pub fn missing(&self) -> &[(usize, String)] {
        &self.missing
    }

    /// Use another store as the primary from now on (`rekey --to-key`).
    pub(super) fn switch_primary(&mut self, dest: Arc<dyn KeyProvider>, settings: ProviderConfig) {
        self.slots[0].provider = dest;
        self.slots[0].settings = settings;
    }

    /// A slot opened for the policy (`key slot add`), before the config names it.
    pub fn add_slot(&mut self, slot: KeySlot) {
        self.slots.push(slot);
    }

    /// Slot `index` left the policy (`key slot remove`, or an add that failed before the
    /// config named it): the later ones move up.
    pub fn remove_slot(&mut self, index: usize) {
        self.slots.retain(|s| s.index != index);
        for s in &mut self.slots {
            if s.index > index {
                s.index -= 1;
            }
        }
        self.missing.retain(|(i, _)| *i != index);
        for (i, _) in &mut self.missing {
            if *i > index {
                *i -= 1;
            }
        }
    }

    /// The policy's slot count, as the config just written says (only config updates set it).
    pub(super) fn set_policy_len(&mut self, n: usize) {
        self.policy_len = n;
    }

    /// Slot `index` and the primary changed places (`key slot primary`).
    pub fn swap_primary(&mut self, index: usize) {
        for s in &mut self.slots {
            if s.index == 0 {
                s.index = index;
            } else if s.index == index {
                s.index = 0;
            }
        }
        self.slots.sort_by_key(|s| s.index);
    }

    /// Requests sent to remote key services (KMS) so far, by every slot; `None` when no
    /// slot is one.
    pub fn requests_sent(&self) -> Option<u64> {
        self.slots.iter().filter_map(|s| s.provider.requests_sent()).reduce(|a, b| a + b)
    }

    /// The keys made ahead for new files, if this process keeps any.
    pub fn key_pool(&self) -> Option<&KeyPool> {
        self.pool.as_ref()
    }

    /// Write out every audit line recorded so far.
    pub fn flush_audit(&self) {
        if let Some(a) = &self.audit {
            a.flush();
        }
    }

    /// Count one key-store call for `status`.
    pub(crate) fn count<T>(&self, r: Result<T>) -> Result<T> {
        self.calls.fetch_add(1, Relaxed);
        if r.is_err() {
            self.errors.fetch_add(1, Relaxed);
        }
        r
    }

    /// Record a key operation in the audit log, if there is one, as `who`'s (None: this
    /// process's), naming the key slot that did it on a volume with several.
    #[allow(clippy::too_many_arguments)]
    pub fn audit(
        &self,
        op: &'static str,
        file_id: &FileId,
        path: &dyn Fn() -> String,
        rec: &KeyRecord,
        result: Result<(), &Error>,
        who: Option<Requester>,
        slot: Option<usize>,
    ) {
        if let Some(a) = &self.audit {
            a.record(op, &self.volume_id, file_id, Some(path()), rec, result, who, slot);
        }
    }

    /// Whether new data keys can be made here: every key slot must be open, since a file is
    /// never made with fewer records than the policy has slots. The frontend asks before
    /// creating or emptying a file, so the error reaches the caller and not a deferred
    /// write-back.
    pub fn can_make_keys(&self, path: &dyn Fn() -> String) -> Result<()> {
        if self.has_every_slot() {
            return Ok(());
        }
        let (i, why) = self.missing.first().cloned().unwrap_or((0, "not opened (a recovery open)".into()));
        Err(Error::new(
            libc::EIO,
            format!("{}: new files need every key slot, and slot {i} is not open here: {why}", path()),
        ))
    }

    /// `new_header` on behalf of `who` (a FUSE request's process). With several key slots
    /// the DEK carries one record per slot, in policy order: a file is never made with
    /// fewer than the policy names.
    pub fn new_header_for(&self, path: &dyn Fn() -> String, who: Option<Requester>) -> Result<(Vec<u8>, Arc<FileKey>)> {
        self.can_make_keys(path)?;
        let fresh = |k: &ReadyKey| k.2.iter().zip(&self.slots).all(|(r, s)| s.current(r));
        let (file_id, dek, records) = match self.pool.as_ref().and_then(|p| p.take(fresh, POOL_WAIT)) {
            Some(ready) => self.count(Ok(ready))?,
            None => match &self.slots[..] {
                [one] => {
                    let (file_id, dek, record) =
                        self.count(crate::keys::new_file_key(&*one.provider, &self.volume_id))?;
                    (file_id, dek, vec![record])
                }
                _ => {
                    let providers: Vec<_> = self.slots.iter().map(|s| s.provider.clone()).collect();
                    self.count(wrap_for_all(&providers, &self.volume_id))?
                }
            },
        };
        for (i, record) in records.iter().enumerate() {
            self.audit("wrap", &file_id, path, record, Ok(()), who, Some(i).filter(|_| records.len() > 1));
        }
        let key = Arc::new(FileKey::new(file_id, &dek));
        let header = Header { generation: 1, file_id, block_size: self.geometry.block_size as u32, records };
        let slot = header.encode_slot(self.geometry.slot_size(), |b| key.header_tag(b))?;
        let mut region = slot.clone();
        region.extend_from_slice(&slot);
        self.cache.insert(header.generation, key.clone());
        Ok((region, key))
    }

    /// The newest slot that decodes, unwraps and authenticates (a torn or tampered newest
    /// slot falls back to the other one), on behalf of `who` (a FUSE request's process),
    /// preferring a slot whose
    /// key `belongs` to the content: a slot pasted from another file verifies under its own
    /// key, so the next slot that verifies is tried before it is taken. The flag says
    /// whether the slot returned belongs (false: none that verifies does).
    pub fn open_header_for(
        &self,
        region: &[u8],
        path: &dyn Fn() -> String,
        who: Option<Requester>,
        belongs: &dyn Fn(&FileKey) -> Result<bool>,
    ) -> Result<(OpenedHeader, bool)> {
        let revocations = self.primary().keyring().map_or(0, |k| k.revocations());
        if self.revocations_seen.swap(revocations, std::sync::atomic::Ordering::SeqCst) != revocations {
            tracing::info!("a KEK version was retired: dropping every cached data key");
            self.cache.clear();
        }
        let mut first_err: Option<Error> = None;
        let mut foreign: Option<OpenedHeader> = None;
        // A slot whose records could not be unwrapped: the other copy, when it holds the
        // same records, would ask the same key stores the same thing (a KMS that hangs
        // would cost a second timeout).
        let mut failed: Option<crate::format::Header> = None;
        for (idx, slot) in decode_region(region) {
            let view = match slot {
                Ok(v) => v,
                Err(SlotError::Empty) => continue,
                Err(e) => {
                    first_err.get_or_insert(Error::corrupt(format!("header copy {idx}: {e}")));
                    continue;
                }
            };
            let h = &view.header;
            if h.file_id == VOLUME_KEY_FILE_ID {
                first_err.get_or_insert(Error::corrupt(format!("header copy {idx} names the volume key's file id")));
                continue;
            }
            if h.block_size as u64 != self.geometry.block_size {
                first_err.get_or_insert(Error::corrupt(format!(
                    "header copy {idx} says block size {} but the volume uses {}",
                    h.block_size, self.geometry.block_size
                )));
                continue;
            }
            if failed.as_ref().is_some_and(|f| f.file_id == h.file_id && f.records == h.records) {
                continue;
            }
            let loaded = self.cache.get_or_load(h.file_id, h.generation, || {
                self.unwrap_any(h, path, who).map(|dek| FileKey::new(h.file_id, &dek))
            });
            match loaded {
                Ok(key) if key.verify_header_tag(&view.authenticated, &view.tag) => {
                    if belongs(&key)? {
                        return Ok((OpenedHeader { key, header: view.header, slot: idx }, true));
                    }
                    foreign.get_or_insert(OpenedHeader { key, header: view.header, slot: idx });
                }
                Ok(_) => {
                    first_err.get_or_insert(Error::integrity(
                        crate::error::Integrity::Header,
                        format!("header copy {idx} does not authenticate"),
                    ));
                }
                Err(e) => {
                    first_err.get_or_insert(e.context(format!("header copy {idx}")));
                    failed.get_or_insert_with(|| view.header.clone());
                }
            }
        }
        if let Some(h) = foreign {
            return Ok((h, false));
        }
        Err(first_err.unwrap_or_else(|| Error::corrupt("no header copy holds a header")))
    }

    /// The header's DEK from the first key slot that unwraps one of its records: slots in
    /// policy order, those whose store just failed to answer last. An outage of one store
    /// is an error only when no other slot serves (EIO then; EACCES when every slot refused).
    pub fn unwrap_any(&self, h: &Header, path: &dyn Fn() -> String, who: Option<Requester>) -> Result<Dek> {
        let ctx = KeyContext { volume_id: &self.volume_id, file_id: &h.file_id };
        let mut order: Vec<&KeySlot> = self.slots.iter().collect();
        order.sort_by_key(|s| s.is_down());
        let several = self.policy_len > 1;
        let (mut refused, mut failed): (Option<Error>, Option<Error>) = (None, None);
        for slot in order {
            for rec in h.records.iter().filter(|r| slot.settings.claims(r)) {
                let res = self.count(slot.timed(|| slot.provider.unwrap(rec, &ctx)));
                slot.mark(&res);
                let served = Some(slot.index).filter(|_| several);
                self.audit("unwrap", &h.file_id, path, rec, res.as_ref().map(drop), who, served);
                match res {
                    Ok(dek) => return Ok(dek),
                    Err(e) if e.errno() == libc::EACCES => refused = Some(e),
                    // A store that failed to answer (after its own retries) is unreachable
                    // for now, whatever its error said.
                    Err(e) => {
                        let e = match e.class() {
                            None => e.with_class(crate::error::Class::KeyStoreUnreachable),
                            Some(_) => e,
                        };
                        failed.get_or_insert(e.context(format!(
                            "key slot {} ({})",
                            slot.index,
                            slot.settings.summary()
                        )));
                    }
                }
            }
        }
        Err(failed.or(refused).unwrap_or_else(|| {
            let kinds: Vec<&str> = self.slots.iter().map(|s| s.provider.kind().name()).collect();
            Error::access(format!("no key record in the header for the key slots open here ({})", kinds.join(", ")))
        }))
    }

    /// The key records `h` should carry under the volume's key policy now, or None when it
    /// carries them already: one per slot in policy order, each under its slot's current
    /// KEK; records of slots no longer in the policy are dropped. A slot not open here keeps
    /// the record it has. `key` is the header's authenticated key: a DEK unwrapped to wrap
    /// it for a new slot must be that one.
    pub fn records_for_policy<'a>(
        &self,
        policy: impl Iterator<Item = &'a ProviderConfig>,
        h: &Header,
        key: &FileKey,
        path: &dyn Fn() -> String,
        who: Option<Requester>,
    ) -> Result<Option<Vec<KeyRecord>>> {
        let ctx = KeyContext { volume_id: &self.volume_id, file_id: &h.file_id };
        let mut dek: Option<Dek> = None;
        let mut out = Vec::new();
        for (i, settings) in policy.enumerate() {
            let slot = self.slots.iter().find(|s| s.index == i);
            // A slot may claim another slot's record too (multi-Region replicas of one key):
            // its own current record first, or every pass would rewrap it.
            let have = h
                .records
                .iter()
                .find(|r| slot.is_some_and(|s| s.current(r)))
                .or_else(|| h.records.iter().find(|r| settings.claims(r)));
            let rec = match (slot, have) {
                (Some(s), Some(r)) if s.current(r) => r.clone(),
                (Some(s), Some(r)) if s.settings.kind() != crate::format::ProviderKind::Recovery => {
                    let res = self.count(s.timed(|| s.provider.rewrap(r, &ctx)));
                    self.audit("rewrap", &h.file_id, path, r, res.as_ref().map(drop), who, Some(i));
                    res?
                }
                (Some(s), _) => {
                    if dek.is_none() {
                        let d = self.unwrap_any(h, path, who)?;
                        if !FileKey::new(h.file_id, &d).same_key(key) {
                            return Err(Error::corrupt("a key record holds another key than the header's"));
                        }
                        dek = Some(d);
                    }
                    let res = self.count(s.timed(|| s.provider.wrap(dek.as_ref().unwrap(), &ctx)));
                    if let Ok(r) = &res {
                        self.audit("wrap", &h.file_id, path, r, Ok(()), who, Some(i));
                    }
                    res.map_err(|e| e.context(format!("key slot {i}")))?
                }
                (None, Some(r)) => r.clone(),
                (None, None) => {
                    return Err(Error::new(
                        libc::EIO,
                        format!(
                            "key slot {i} ({}) is not open here and the file has no record for it",
                            settings.summary()
                        ),
                    ))
                }
            };
            out.push(rec);
        }
        Ok((out != h.records).then_some(out))
    }

    /// Whether unwrapping a file's key waits on another machine (a KMS call per file, an
    /// HSM): the first slot tried is the one that usually answers.
    pub fn unwraps_remotely(&self) -> bool {
        self.slots.first().is_some_and(|s| s.provider.wraps_remotely())
    }

    /// Whether this process holds every slot of the policy (and so may make new files).
    pub fn has_every_slot(&self) -> bool {
        self.missing.is_empty() && self.slots.len() == self.policy_len
    }
}
