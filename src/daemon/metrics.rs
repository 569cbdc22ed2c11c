//! The OpenMetrics endpoint (`--metrics ADDR`, off by default): `GET /metrics` answers
//! the mount's counters for Prometheus and its kin. Nothing in it names a file.

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::error::{Error, Result};
use crate::file::journal::Journal;
use crate::fs::EncryptedFs;

/// What the endpoint reads at each scrape.
struct Live {
    fs: Arc<EncryptedFs>,
    journal: Option<Arc<Journal>>,
    /// Files the crash recovery at this mount's start settled.
    recovered: u64,
}

impl std::fmt::Debug for Live {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the mount's live counters")
    }
}

fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> std::fmt::Result {
    let c = ConstCounter::new(v);
    c.encode(e.encode_descriptor(name, help, None, c.metric_type())?)
}

fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, v: i64) -> std::fmt::Result {
    let g = ConstGauge::new(v);
    g.encode(e.encode_descriptor(name, help, None, g.metric_type())?)
}

impl Collector for Live {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        use std::sync::atomic::Ordering::Relaxed;
        let v = self.fs.volume();
        let c = ConstCounter::new(0u64);
        let mut requests =
            e.encode_descriptor("envelopefs_fuse_requests", "FUSE requests served", None, c.metric_type())?;
        for (op, n) in self.fs.stats.requests() {
            ConstCounter::new(n).encode(requests.encode_family(&vec![("op", op)])?)?;
        }
        let hist_type = prometheus_client::metrics::MetricType::Histogram;
        let mut latency = e.encode_descriptor(
            "envelopefs_fuse_request_seconds",
            "time to answer a FUSE request, by opcode",
            None,
            hist_type,
        )?;
        for (op, h) in self.fs.stats.latencies() {
            h.encode(latency.encode_family(&vec![("op", op)])?)?;
        }
        counter(
            &mut e,
            "envelopefs_dek_cache_hits",
            "opens that found the data key cached",
            v.keys.cache.stats.hits.load(Relaxed),
        )?;
        counter(
            &mut e,
            "envelopefs_dek_cache_misses",
            "opens that unwrapped the data key",
            v.keys.cache.stats.misses.load(Relaxed),
        )?;
        if let Some(pool) = v.keys.key_pool() {
            let (size, _, fallbacks) = pool.sizing();
            gauge(&mut e, "envelopefs_key_pool_ready", "data keys made ahead, ready for new files", pool.len() as i64)?;
            gauge(
                &mut e,
                "envelopefs_key_pool_size",
                "data keys the pool keeps (grows with the create rate)",
                size as i64,
            )?;
            counter(
                &mut e,
                "envelopefs_key_pool_fallbacks",
                "creates that found no key made ahead and made their own",
                fallbacks,
            )?;
        }
        let (_, ahead) = self.fs.prefetch();
        counter(
            &mut e,
            "envelopefs_prefetch_files",
            "files whose key was asked for ahead of an open (--prefetch-keys)",
            ahead.files.load(Relaxed),
        )?;
        counter(
            &mut e,
            "envelopefs_prefetch_failures",
            "unwraps ahead that failed and paused prefetching",
            ahead.failures.load(Relaxed),
        )?;
        counter(
            &mut e,
            "envelopefs_key_store_operations",
            "wraps and unwraps asked of the key stores",
            v.keys.calls.load(Relaxed),
        )?;
        counter(
            &mut e,
            "envelopefs_key_store_errors",
            "key-store operations that failed",
            v.keys.errors.load(Relaxed),
        )?;
        // By key slot: what the store behind it was asked when files were opened or
        // rewrapped (new files' keys are made ahead, in the pool, and counted in the totals).
        let slot_labels = |s: &crate::volume::KeySlot| {
            vec![("slot", s.index.to_string()), ("kind", s.provider.kind().name().to_owned())]
        };
        let mut ops = e.encode_descriptor(
            "envelopefs_key_slot_operations",
            "operations asked of a key slot's store",
            None,
            c.metric_type(),
        )?;
        for s in v.keys.slots() {
            s.ops.encode(ops.encode_family(&slot_labels(s))?)?;
        }
        let mut failures = e.encode_descriptor(
            "envelopefs_key_slot_failures",
            "a key slot's operations that failed",
            None,
            c.metric_type(),
        )?;
        for s in v.keys.slots() {
            s.failures.encode(failures.encode_family(&slot_labels(s))?)?;
        }
        if let Some(first) = v.keys.slots().first() {
            let mut secs = e.encode_descriptor(
                "envelopefs_key_slot_seconds",
                "time a key slot's store took per operation",
                None,
                first.seconds.metric_type(),
            )?;
            for s in v.keys.slots() {
                s.seconds.encode(secs.encode_family(&slot_labels(s))?)?;
            }
        }
        if let Some(n) = v.keys.requests_sent() {
            counter(
                &mut e,
                "envelopefs_kms_requests",
                "requests sent to KMS, retries and keys made ahead included",
                n,
            )?;
        }
        if let Some(j) = &self.journal {
            counter(&mut e, "envelopefs_journal_records", "records written to the crash journal", j.records())?;
            counter(
                &mut e,
                "envelopefs_journal_flushes",
                "fdatasyncs of the journal (sync mode; one per round of writers)",
                j.flushes(),
            )?;
        }
        counter(
            &mut e,
            "envelopefs_crash_recoveries",
            "files crash recovery settled when this mount started",
            self.recovered,
        )?;
        counter(
            &mut e,
            "envelopefs_fuse_ring_requests",
            "FUSE requests that came over io_uring (--io-uring)",
            self.fs.stats.ring_requests.load(std::sync::atomic::Ordering::Relaxed),
        )?;
        gauge(&mut e, "envelopefs_open_files", "files open through the mount", self.fs.open_files() as i64)?;
        gauge(&mut e, "envelopefs_inodes", "inodes the kernel knows", self.fs.inode_count() as i64)?;
        gauge(&mut e, "envelopefs_inode_fds", "descriptors of known inodes held open", self.fs.inode_fds().0 as i64)?;
        Ok(())
    }
}

/// Serve the metrics of the mount of `fs` on `addr` (host:port) from a thread of its own.
pub fn serve(addr: &str, fs: Arc<EncryptedFs>, journal: Option<Arc<Journal>>, recovered: u64) -> Result<()> {
    let mut registry = Registry::default();
    registry.register("envelopefs_fuse_errors", "errors replied to FUSE requests, by errno", fs.stats.errnos.clone());
    registry.register(
        "envelopefs_integrity_failures",
        "replies that were EIO because something did not authenticate, by what (block, header, name)",
        fs.stats.integrity.clone(),
    );
    registry.register_collector(Box::new(Live { fs, journal, recovered }));
    serve_registry(addr, registry)
}

/// The progress of a `rekey` run, for as long as it runs.
struct RekeyProgress(Arc<crate::tools::rekey::Progress>);

impl std::fmt::Debug for RekeyProgress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("rekey progress")
    }
}

impl Collector for RekeyProgress {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let (done, total) = self.0.counts();
        gauge(&mut e, "envelopefs_rekey_files", "files this rekey run works on", total as i64)?;
        counter(&mut e, "envelopefs_rekey_files_done", "files this rekey run has finished", done)
    }
}

/// Serve `rekey`'s progress on `addr` while it runs.
pub fn serve_rekey(addr: &str, progress: Arc<crate::tools::rekey::Progress>) -> Result<()> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(RekeyProgress(progress)));
    serve_registry(addr, registry)
}

/// Answer `GET /metrics` on `addr` from a thread of its own.
fn serve_registry(addr: &str, registry: Registry) -> Result<()> {
    let server = tiny_http::Server::http(addr).map_err(|e| {
        Error::new(libc::EADDRNOTAVAIL, format!("metrics endpoint {addr}: {e}")).with_class(crate::error::Class::Usage)
    })?;
    tracing::info!("metrics on http://{addr}/metrics");
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for req in server.incoming_requests() {
                let reply = if req.url() == "/metrics" {
                    let mut body = String::new();
                    match prometheus_client::encoding::text::encode(&mut body, &registry) {
                        Ok(()) => tiny_http::Response::from_string(body).with_header(
                            "Content-Type: application/openmetrics-text; version=1.0.0; charset=utf-8"
                                .parse::<tiny_http::Header>()
                                .expect("a valid header"),
                        ),
                        Err(_) => tiny_http::Response::from_string("encoding failed").with_status_code(500),
                    }
                } else {
                    tiny_http::Response::from_string("see /metrics").with_status_code(404)
                };
                let _ = req.respond(reply);
            }
        })
        .map_err(|e| Error::io(e, "starting the metrics thread"))?;
    Ok(())
}
