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
//! validation. The third figure times that general path on the same Indonesian number: what
//! every number cost before kabar checked Indonesian ones itself. Plain `std::time::Instant`
//! keeps the build light on a small machine.

use std::{
    hint::black_box,
    time::{Duration, Instant},
};

use kabar::phone::normalize;

/// What a billing system typically sends: an Indonesian mobile number written nationally.
const INDONESIAN: &str = "0812-3456-7890";
/// A British mobile number, which takes the `phonenumber` crate's general path.
const OTHER: &str = "+447911123456";

/// The `phonenumber` crate's general path, as kabar once took it for every number: parse,
/// validity, number type and E.164 formatting.
fn general_path(input: &str) -> Option<String> {
    let parsed = phonenumber::parse(None, input).ok()?;
    let mobile = parsed.is_valid()
        && parsed.number_type(&phonenumber::metadata::DATABASE) == phonenumber::Type::Mobile;
    mobile.then(|| parsed.format().mode(phonenumber::Mode::E164).to_string())
}

/// Nanoseconds per call of `f`: the median of `batches` timed batches, each long enough
/// (about `batch_time`) that the clock's own cost does not count.
fn nanos_per_call<T>(
    f: impl Fn(&str) -> T,
    input: &str,
    batches: usize,
    batch_time: Duration,
) -> f64 {
    // Calibrate: double the batch until it takes long enough (this also warms caches).
    let mut per_batch: u32 = 1;
    loop {
        let start = Instant::now();
        for _ in 0..per_batch {
            let _ = black_box(f(black_box(input)));
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
                let _ = black_box(f(black_box(input)));
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
    // Each must accept its number, or the benchmark would time a refusal.
    let e164 = normalize(INDONESIAN)
        .expect("an Indonesian mobile number")
        .to_string();
    assert!(normalize(OTHER).is_ok(), "{OTHER} is a valid mobile number");
    assert_eq!(general_path(&e164).as_deref(), Some(e164.as_str()));
    let indonesian = nanos_per_call(normalize, INDONESIAN, batches, batch_time);
    let other = nanos_per_call(normalize, OTHER, batches, batch_time);
    let general = nanos_per_call(general_path, &e164, batches, batch_time);
    if json {
        println!(
            "{}",
            serde_json::json!({
                "label": "phone-normalize",
                "indonesian": INDONESIAN,
                "indonesian_ns": indonesian,
                "other": OTHER,
                "other_ns": other,
                "general_path_ns": general,
            })
        );
    } else {
        println!("phone::normalize({INDONESIAN:?}): {indonesian:.0} ns per call");
        println!("phone::normalize({OTHER:?}): {other:.0} ns per call");
        println!("phonenumber's general path for {e164:?}: {general:.0} ns per call");
    }
}
