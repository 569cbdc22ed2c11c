//! Block seal/open throughput per block size: aws-lc-rs, as the volume uses it, beside
//! RustCrypto's `aes-gcm` (the independent implementation the unit tests check it against).
//! Run: `cargo bench --bench blocks`.

use aes_gcm::aead::AeadInPlace;
use aes_gcm::KeyInit;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use envelopefs::crypto::{Dek, FileKey};

fn blocks(c: &mut Criterion) {
    let dek = Dek::generate().unwrap();
    for size in [4096usize, 65536, 1 << 20] {
        let mut g = c.benchmark_group(format!("block-{}k", size / 1024));
        g.throughput(Throughput::Bytes(size as u64));
        let plain = vec![0x5au8; size];
        let key = FileKey::new([7; 16], &dek);
        let mut stored = vec![0u8; size + 28];
        g.bench_with_input(BenchmarkId::new("seal", "aws-lc"), &plain, |b, p| {
            b.iter(|| key.seal_block(3, p, &[1; 12], &mut stored))
        });
        key.seal_block(3, &plain, &[1; 12], &mut stored);
        let mut out = vec![0u8; size];
        g.bench_with_input(BenchmarkId::new("open", "aws-lc"), &stored, |b, s| {
            b.iter(|| key.open_block(3, s, &mut out).unwrap())
        });
        let other = aes_gcm::Aes256Gcm::new(dek.expose().into());
        let mut buf = plain.clone();
        g.bench_with_input(BenchmarkId::new("seal", "rustcrypto"), &plain, |b, p| {
            b.iter(|| {
                buf.copy_from_slice(p);
                other.encrypt_in_place_detached((&[1u8; 12]).into(), b"aad", &mut buf).unwrap()
            })
        });
        g.finish();
    }
}

criterion_group!(benches, blocks);
criterion_main!(benches);
