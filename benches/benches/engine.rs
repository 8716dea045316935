//! Micro-benchmarks of the engine's hot paths: sha256 and BLAKE3 FastCDC chunking over 64 MiB,
//! and the metadata state machine's apply rate on RocksDB.
//!
//! Run: `cargo bench -p portolan-benches --bench engine`.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use engine::chunker::Chunker;
use engine::digest::{Algorithm, DigestHasher};
use engine::kv::{Batch, KvStore, RocksKv};
use engine::state::{Command, State};
use engine::{AccountId, Digest, RepoName, Tag};

const DATA_BYTES: usize = 64 * 1024 * 1024;

fn data() -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut out = Vec::with_capacity(DATA_BYTES);
    while out.len() < DATA_BYTES {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

fn hashing(c: &mut Criterion) {
    let d = data();
    let mut g = c.benchmark_group("hash_64MiB");
    g.throughput(Throughput::Bytes(DATA_BYTES as u64));
    g.sample_size(10);
    g.bench_function("sha256", |b| {
        b.iter(|| {
            let mut h = DigestHasher::new(Algorithm::Sha256);
            for part in d.chunks(1 << 20) {
                h.update(part);
            }
            h.finish()
        })
    });
    g.bench_function("blake3_fastcdc_chunking", |b| {
        b.iter(|| {
            let mut c = Chunker::new();
            for part in d.chunks(1 << 20) {
                c.update(part);
            }
            c.finish().len()
        })
    });
    g.bench_function("sha256_plus_chunking (an upload's ingest path)", |b| {
        b.iter(|| {
            let mut h = DigestHasher::new(Algorithm::Sha256);
            let mut c = Chunker::new();
            for part in d.chunks(1 << 20) {
                h.update(part);
                c.update(part);
            }
            (h.finish(), c.finish().len())
        })
    });
    g.finish();
}

/// Commands of one image push: two blobs and a tagged manifest.
fn image_commands(i: u64) -> Vec<Command> {
    let repo = RepoName::parse("bench/app").expect("valid name");
    let account = AccountId::DEFAULT;
    let config = format!("{{\"n\":{i}}}");
    let layer = format!("layer-{i}");
    let cd = Digest::sha256_of(config.as_bytes());
    let ld = Digest::sha256_of(layer.as_bytes());
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{cd}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{ld}","size":{}}}]}}"#,
        config.len(),
        layer.len()
    );
    let blob = |digest: Digest, size: usize| Command::BlobCommitted {
        account,
        repo: repo.clone(),
        digest,
        size_bytes: size as u64,
        holders: vec![1],
        now_ms: i,
    };
    vec![
        blob(cd, config.len()),
        blob(ld, layer.len()),
        Command::ManifestPut {
            account,
            repo: repo.clone(),
            digest: Digest::sha256_of(manifest.as_bytes()),
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            bytes: manifest.into_bytes(),
            tag: Some(Tag::parse(&format!("t{i}")).expect("valid tag")),
            now_ms: i,
        },
    ]
}

fn apply(c: &mut Criterion) {
    const IMAGES: u64 = 300;
    let mut g = c.benchmark_group("state_machine_apply");
    g.throughput(Throughput::Elements(IMAGES * 3));
    g.sample_size(10);
    g.bench_function("rocksdb_900_commands_synced_per_batch_of_100", |b| {
        b.iter_batched(
            || {
                let dir = tempfile::tempdir().expect("tempdir");
                let kv = RocksKv::open(dir.path()).expect("open rocksdb");
                let cmds: Vec<Command> = (0..IMAGES).flat_map(image_commands).collect();
                (dir, kv, cmds)
            },
            |(_dir, kv, cmds)| {
                let n = cmds.len();
                for (i, cmd) in cmds.iter().enumerate() {
                    let mut batch = Batch::default();
                    State::new(&kv).apply(cmd, &mut batch).expect("apply");
                    // As the Raft state machine does: one batch per entry, a sync per group.
                    kv.write(batch, i % 100 == 99 || i + 1 == n).expect("write");
                }
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

criterion_group!(benches, hashing, apply);
criterion_main!(benches);
