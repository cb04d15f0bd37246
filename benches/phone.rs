//! Time per call of `kabar::phone::normalize`, the first thing every SendOtp, VerifyOtp and
//! SendTemplate does.
//!
//! ```text
//! cargo bench --bench phone              # release build: prints ns per call
//! cargo bench --bench phone -- --json    # one JSON line, as scripts/bench.sh records it
//! cargo test --bench phone               # debug build, a few calls: checks that it runs
//! ```
//!
//! Indonesian mobile numbers go through kabar's own check against libphonenumber's Indonesian
//! mobile pattern; any other country goes through the `phonenumber` crate's full parse and
//! validation. Plain `std::time::Instant` keeps the build light on a small machine.

use std::{
    hint::black_box,
    time::{Duration, Instant},
};

use kabar::phone::normalize;

/// What a billing system typically sends: an Indonesian mobile number written nationally.
const INDONESIAN: &str = "0812-3456-7890";
/// A British mobile number, which takes the `phonenumber` crate's general path.
const OTHER: &str = "+447911123456";

/// Nanoseconds per call: the median of `batches` timed batches, each long enough
/// (about `batch_time`) that the clock's own cost does not count.
fn nanos_per_call(input: &str, batches: usize, batch_time: Duration) -> f64 {
    assert!(
        normalize(input).is_ok(),
        "{input} must be accepted, or the benchmark times the refusal"
    );
    // Calibrate: double the batch until it takes long enough (this also warms caches).
    let mut per_batch: u32 = 1;
    loop {
        let start = Instant::now();
        for _ in 0..per_batch {
            let _ = black_box(normalize(black_box(input)));
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
                let _ = black_box(normalize(black_box(input)));
            }
            start.elapsed().as_nanos() as f64 / f64::from(per_batch)
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // `cargo bench` passes --bench; without it (`cargo test`) only check that it all runs.
    let measuring = args.iter().any(|a| a == "--bench");
    let json = args.iter().any(|a| a == "--json");
    let (batches, batch_time) = if measuring {
        (31, Duration::from_millis(50))
    } else {
        (3, Duration::from_micros(100))
    };
    kabar::phone::warm_up();
    let indonesian = nanos_per_call(INDONESIAN, batches, batch_time);
    let other = nanos_per_call(OTHER, batches, batch_time);
    if json {
        println!(
            "{}",
            serde_json::json!({
                "label": "phone-normalize",
                "indonesian": INDONESIAN,
                "indonesian_ns": indonesian,
                "other": OTHER,
                "other_ns": other,
            })
        );
    } else {
        println!("phone::normalize({INDONESIAN:?}): {indonesian:.0} ns per call");
        println!("phone::normalize({OTHER:?}): {other:.0} ns per call");
    }
}
