//! What the request decoding rule costs: decodes a full `ingest.logs` batch
//! (10,000 lines, ~900 KiB of text) with the lenient decoder and with
//! [`Encoding::decode_request`], in both encodings, and prints the time per batch.
//!
//! `cargo run --release -p tanjiren-shared --example decode_cost`

use chrono::Utc;
use std::time::Instant;
use tanjiren_shared::codec::{Encoding, TextPolicy};
use tanjiren_shared::ids::StepId;
use tanjiren_shared::protocol::{LogBatch, LogLine, LogStream};

fn main() {
    let batch = LogBatch {
        step_id: StepId::new(),
        lease_generation: 1,
        worker_id: "bench-worker-0".into(),
        lines: (1..=10_000)
            .map(|seq| LogLine {
                seq,
                stream: if seq % 7 == 0 {
                    LogStream::Stderr
                } else {
                    LogStream::Stdout
                },
                text: format!(
                    "INFO request {seq} handled in 35.2 ms ✓ {}",
                    "x".repeat(seq as usize % 20)
                ),
                at: Utc::now(),
            })
            .collect(),
    };
    let rounds = 50;
    for enc in [Encoding::MsgPack, Encoding::Json] {
        let bytes = enc.encode(&batch).expect("the sample encodes");
        let time = |f: &dyn Fn() -> LogBatch| {
            let _ = f(); // warm up
            let start = Instant::now();
            for _ in 0..rounds {
                assert_eq!(f().lines.len(), 10_000);
            }
            start.elapsed() / rounds
        };
        let lenient = time(&|| enc.decode::<LogBatch>(&bytes).expect("the sample decodes"));
        let strict = time(&|| {
            enc.decode_request::<LogBatch>(&bytes, TextPolicy::ReplaceNul)
                .expect("the sample decodes")
        });
        let refuse = time(&|| {
            enc.decode_request::<LogBatch>(&bytes, TextPolicy::Refuse)
                .expect("the sample decodes")
        });
        println!(
            "{enc:?}: {} KiB batch: lenient {lenient:?}, strict (replace NUL) {strict:?}, strict (refuse NUL) {refuse:?}, overhead {:+.1}%",
            bytes.len() / 1024,
            (strict.as_secs_f64() / lenient.as_secs_f64() - 1.0) * 100.0
        );
    }
}
