//! Block seal/open throughput per crypto backend and block size: the measurement behind
//! the default backend. Run: `cargo bench --bench blocks`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use envelopefs::crypto::{Backend, Dek, FileKey};

fn blocks(c: &mut Criterion) {
    let dek = Dek::generate().unwrap();
    for size in [4096usize, 65536, 1 << 20] {
        let mut g = c.benchmark_group(format!("block-{}k", size / 1024));
        g.throughput(Throughput::Bytes(size as u64));
        let plain = vec![0x5au8; size];
        for backend in Backend::ALL {
            let key = FileKey::new(backend, [7; 16], &dek);
            let mut stored = vec![0u8; size + 28];
            g.bench_with_input(BenchmarkId::new("seal", backend.name()), &plain, |b, p| {
                b.iter(|| key.seal_block(3, p, &[1; 12], &mut stored))
            });
            key.seal_block(3, &plain, &[1; 12], &mut stored);
            let mut out = vec![0u8; size];
            g.bench_with_input(BenchmarkId::new("open", backend.name()), &stored, |b, s| {
                b.iter(|| key.open_block(3, s, &mut out).unwrap())
            });
        }
        g.finish();
    }
}

criterion_group!(benches, blocks);
criterion_main!(benches);
