use std::time::Instant;
use tuneshop::model::quant::{QMatrix, QType};
fn main() {
    let threads: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse().unwrap())
        .unwrap_or(1);
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .unwrap();
    // Memory bandwidth reference: sum a 256 MB array.
    let big = vec![1u64; 32 << 20];
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        let s: u64 = big.iter().sum();
        std::hint::black_box(s);
        best = best.min(t.elapsed().as_secs_f64());
    }
    println!(
        "single-thread read bandwidth: {:.1} GB/s",
        256e6 / 1.048576 / best / 1e9 * 1.048576
    );
    for (qt, rows, cols, copies) in [
        (QType::Q4_1, 1536, 576, 64),
        (QType::Q4_1, 576, 1536, 64),
        (QType::Q8_0, 49152, 576, 2),
    ] {
        let vals: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0)
            .collect();
        let ws: Vec<QMatrix> = (0..copies)
            .map(|_| QMatrix::quantize(qt, rows, cols, &vals))
            .collect();
        for m in [1usize, 2, 4, 8, 16, 32, 128] {
            let xs: Vec<f32> = (0..m * cols).map(|i| (i % 13) as f32 / 13.0).collect();
            let mut out = vec![0f32; m * rows];
            let mut dt = f64::MAX;
            for _ in 0..5 {
                let t = Instant::now();
                for w in &ws {
                    w.matmul(&xs, m, &mut out);
                }
                dt = dt.min(t.elapsed().as_secs_f64() / copies as f64);
            }
            let gflops = 2.0 * (rows * cols * m) as f64 / dt / 1e9;
            let gbs = ws[0].size_in_bytes() as f64 / dt / 1e9;
            println!(
                "{qt:?} {rows}x{cols} m={m}: {:.1} us, {gflops:.1} GFLOP/s, weights {gbs:.1} GB/s",
                dt * 1e6
            );
        }
    }
}
