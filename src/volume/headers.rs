//! File headers through the key policy: a new file's header with a record per slot, and
//! a header's key from the first slot that unwraps it (failover), with the audit line.

use super::*;

/// How long a create waits for a key being made ahead before making its own: a few KMS
/// round trips (a slow or failing store ends the wait sooner: its round of making stops).
const POOL_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

impl Volume {
    /// Record a key operation in the audit log, if there is one, as `who`'s (None: this
    /// process's), naming the key slot that did it on a volume with several.
    #[allow(clippy::too_many_arguments)]
    pub fn audit(
        &self,
        op: &str,
        file_id: &FileId,
        path: &dyn Fn() -> String,
        rec: &KeyRecord,
        result: Result<(), &Error>,
        who: Option<Requester>,
        slot: Option<usize>,
    ) {
        if let Some(a) = &self.audit {
            let path = path();
            let plain = self.names().and_then(|c| c.plain_path(&self.root, Path::new(&path)).ok());
            let plain = plain.as_ref().map(|p| p.to_string_lossy());
            a.record(op, &self.volume_id, file_id, Some(&path), plain.as_deref(), rec, result, who, slot);
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
        let key = Arc::new(FileKey::new(self.backend, file_id, &dek));
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
        let revocations = self.provider.keyring().map_or(0, |k| k.revocations());
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
                self.unwrap_any(h, path, who).map(|dek| FileKey::new(self.backend, h.file_id, &dek))
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
        let several = self.config.policy().count() > 1;
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
    pub fn records_for_policy(
        &self,
        h: &Header,
        key: &FileKey,
        path: &dyn Fn() -> String,
        who: Option<Requester>,
    ) -> Result<Option<Vec<KeyRecord>>> {
        let ctx = KeyContext { volume_id: &self.volume_id, file_id: &h.file_id };
        let mut dek: Option<Dek> = None;
        let mut out = Vec::new();
        for (i, settings) in self.config.policy().enumerate() {
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
                        if !FileKey::new(self.backend, h.file_id, &d).same_key(key) {
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
        self.missing.is_empty() && self.slots.len() == self.config.policy().count()
    }
}
