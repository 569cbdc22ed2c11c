//! The audit log: one JSON line per key operation (wrap, unwrap, rewrap, re-encrypt), for
//! every provider. CloudTrail covers KMS; this covers local and PKCS#11 too, and says which
//! file and which local user caused it. The schema is in docs/AUDIT.md.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::error::{Error, Result};
use crate::format::{FileId, KeyRecord};
use crate::keys::VolumeId;

/// Who a key operation is for: the process behind the FUSE request (passed explicitly
/// with every call), or for writes the kernel flushes later, the process that opened the
/// file for writing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Requester {
    pub uid: u32,
    pub pid: u32,
}

impl Requester {
    /// This process (offline tools).
    pub fn this_process() -> Self {
        Self { uid: rustix::process::getuid().as_raw(), pid: std::process::id() }
    }
}

#[derive(Serialize)]
struct Event {
    /// RFC 3339 UTC with milliseconds.
    time: String,
    op: &'static str,
    volume: String,
    file_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    path: Option<String>,
    /// With hidden names: the path as the mount shows it (this log is the host's).
    #[serde(skip_serializing_if = "Option::is_none")]
    plain_path: Option<String>,
    provider: &'static str,
    key_id: String,
    key_version: u32,
    /// The key slot that did it, on a volume with several (0: the primary).
    #[serde(skip_serializing_if = "Option::is_none")]
    slot: Option<usize>,
    uid: u32,
    pid: u32,
    result: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// A backing path as the mount shows it (hidden names decrypted), when it can be found.
pub type PlainPath = Box<dyn Fn(&Path) -> Option<String> + Send>;

/// Events waiting for the writer; a key operation waits only when this many are queued.
const QUEUE: usize = 4096;

/// The log, written by a thread of its own: resolving a hidden name's plain path reads
/// directories, which no key operation should wait on. Dropping it writes what is queued.
pub struct AuditLog {
    queue: Option<std::sync::mpsc::SyncSender<Queued>>,
    writer: Option<std::thread::JoinHandle<()>>,
}

impl AuditLog {
    pub fn open(path: &Path, plain_path: Option<PlainPath>) -> Result<Self> {
        let mut out = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .map_err(|e| Error::io(e, format!("opening audit log {}", path.display())))?;
        let (queue, events) = std::sync::mpsc::sync_channel::<Queued>(QUEUE);
        let writer = std::thread::Builder::new()
            .name("audit-log".into())
            .spawn(move || {
                for queued in events {
                    let mut ev = match queued {
                        Queued::Event(ev) => ev,
                        Queued::Flush(done) => {
                            let _ = done.send(());
                            continue;
                        }
                    };
                    if let (Some(resolve), Some(p)) = (&plain_path, &ev.path) {
                        ev.plain_path = resolve(Path::new(p));
                    }
                    let mut line = serde_json::to_vec(&ev).expect("audit event serializes");
                    line.push(b'\n');
                    if let Err(e) = out.write_all(&line) {
                        tracing::error!("writing the audit log failed: {e}");
                    }
                }
            })
            .map_err(|e| Error::io(e, "starting the audit log's writer"))?;
        Ok(Self { queue: Some(queue), writer: Some(writer) })
    }

    #[allow(clippy::too_many_arguments)]
    pub fn record(
        &self,
        op: &'static str,
        volume: &VolumeId,
        file_id: &FileId,
        path: Option<String>,
        rec: &KeyRecord,
        result: std::result::Result<(), &Error>,
        who: Option<Requester>,
        slot: Option<usize>,
    ) {
        let Requester { uid, pid } = who.unwrap_or_else(Requester::this_process);
        let ev = Event {
            time: rfc3339(SystemTime::now()),
            op,
            volume: hex::encode(volume),
            file_id: hex::encode(file_id),
            path,
            plain_path: None,
            provider: rec.provider.name(),
            key_id: rec.kek_id.clone(),
            key_version: rec.kek_version,
            slot,
            uid,
            pid,
            result: if result.is_ok() { "ok" } else { "error" },
            error: result.err().map(|e| e.to_string()),
        };
        if let Some(q) = &self.queue {
            let _ = q.send(Queued::Event(ev));
        }
    }

    /// Wait until every event recorded so far is written (a daemon before it exits).
    pub fn flush(&self) {
        let (done, written) = std::sync::mpsc::sync_channel(1);
        if let Some(q) = &self.queue {
            if q.send(Queued::Flush(done)).is_ok() {
                let _ = written.recv();
            }
        }
    }
}

enum Queued {
    Event(Event),
    Flush(std::sync::mpsc::SyncSender<()>),
}

impl Drop for AuditLog {
    fn drop(&mut self) {
        drop(self.queue.take());
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH + std::time::Duration::from_millis(1_795_393_294_123)),
            "2026-11-23T00:21:34.123Z"
        );
        assert_eq!(rfc3339(UNIX_EPOCH + std::time::Duration::from_secs(951_782_400)), "2000-02-29T00:00:00.000Z");
    }
}
