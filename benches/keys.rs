//! Time per call of the API key check: the SHA-256 of the presented key and a lookup among the
//! callers of the key file. Every kabar call makes it once when `KABAR_API_KEYS_FILE` is set.
//!
//! ```text
//! cargo bench --bench keys       # release build: prints ns per check
//! cargo test --bench keys        # debug build, a few checks: checks that it runs
//! ```

use std::{
    hint::black_box,
    time::{Duration, Instant},
};

use kabar::domain::auth::{KeyRing, key_hash, new_key};

/// Nanoseconds per call: the median of `batches` timed batches of about `batch_time` each.
fn nanos_per_call(f: impl Fn() -> bool, batches: usize, batch_time: Duration) -> f64 {
    let mut per_batch: u32 = 1;
    loop {
        let start = Instant::now();
        for _ in 0..per_batch {
            black_box(f());
        }
        if start.elapsed() >= batch_time || per_batch >= 1 << 24 {
            break;
        }
        per_batch *= 2;
    }
    let mut samples: Vec<f64> = (0..batches)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..per_batch {
                black_box(f());
            }
            start.elapsed().as_nanos() as f64 / f64::from(per_batch)
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

fn main() {
    let measuring = std::env::args().any(|a| a == "--bench");
    let (batches, batch_time) = if measuring {
        (31, Duration::from_millis(50))
    } else {
        (3, Duration::from_micros(100))
    };
    // A key file of 1,000 callers, far more than an ISP has.
    let keys: Vec<String> = (0..1000).map(|_| new_key()).collect();
    let file: String = keys
        .iter()
        .enumerate()
        .map(|(i, k)| {
            format!(
                "[[key]]\nname = \"caller-{i}\"\nhash = \"{}\"\nscopes = [\"otp\", \"status\"]\n",
                key_hash(k)
            )
        })
        .collect();
    let ring = KeyRing::parse(&file).expect("a valid key file");
    let known = keys[500].clone();
    let unknown = new_key();
    assert!(ring.caller(&known).is_some() && ring.caller(&unknown).is_none());
    let hit = nanos_per_call(
        || ring.caller(black_box(&known)).is_some(),
        batches,
        batch_time,
    );
    let miss = nanos_per_call(
        || ring.caller(black_box(&unknown)).is_some(),
        batches,
        batch_time,
    );
    println!("API key check, known key among 1,000: {hit:.0} ns per call");
    println!("API key check, unknown key: {miss:.0} ns per call");
}
