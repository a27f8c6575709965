//! Codec throughput: encodes and decodes `Records` frames of ~1 MiB (4 KiB
//! writes of mixed data) with and without compression, on one core.
//! `cargo run --release -p tidemark-wire --example codec_throughput`

use rand::rngs::SmallRng;
use rand::{RngCore, SeedableRng};
use std::time::Instant;
use tidemark_changelog::record::Entry;
use tidemark_wire::{Compression, Message, MessageDecoder, RecordBatch};

fn main() {
    let mut rng = SmallRng::seed_from_u64(1);
    let mut block = |i: u64| -> Vec<u8> {
        match i % 4 {
            0 => vec![0; 4096],
            1 => b"tidemark replicates a change log; ".repeat(121)[..4096].to_vec(),
            2 => (0..4096u32).map(|j| (j % 251) as u8).collect(),
            _ => {
                let mut random = vec![0; 4096];
                rng.fill_bytes(&mut random);
                random
            }
        }
    };
    let records: Vec<Vec<u8>> = (0..256u64)
        .map(|i| Entry::write(0, i * 4096, &block(i), 0).encode(i + 1, 1))
        .collect();
    let batch = RecordBatch::from_records(records.iter().map(Vec::as_slice)).unwrap();
    let raw = batch.byte_len() as f64;
    for compression in [Compression::None, Compression::Fast, Compression::Zstd(3)] {
        let rounds = 200;
        let msg = Message::Records(batch.clone());
        let t = Instant::now();
        let mut frame = Vec::new();
        for _ in 0..rounds {
            frame = msg
                .encode(tidemark_wire::PROTOCOL_VERSION, compression)
                .unwrap();
        }
        let enc = t.elapsed().as_secs_f64();
        let t = Instant::now();
        for _ in 0..rounds {
            let mut d = MessageDecoder::new();
            d.feed(&frame);
            assert!(d.next_message().unwrap().is_some());
        }
        let dec = t.elapsed().as_secs_f64();
        println!(
            "{compression:?}: ratio {:.2}, encode {:.0} MB/s, decode+verify {:.0} MB/s",
            raw / frame.len() as f64,
            raw * rounds as f64 / enc / 1e6,
            raw * rounds as f64 / dec / 1e6
        );
    }
}
