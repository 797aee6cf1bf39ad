use std::time::Instant;
use tuneshop::model::quant::{QMatrix, QType};
fn main() {
    std::env::set_var("RAYON_NUM_THREADS", "1");
    for qt in [QType::Q4_1, QType::Q8_0] {
        let (rows, cols) = (1536, 576);
        let vals: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0)
            .collect();
        let w = QMatrix::quantize(qt, rows, cols, &vals);
        for m in [1usize, 4] {
            let xs: Vec<f32> = (0..m * cols).map(|i| (i % 13) as f32 / 13.0).collect();
            let mut out = vec![0f32; m * rows];
            let mut dt = f64::MAX;
            for _ in 0..30 {
                let t = Instant::now();
                for _ in 0..200 {
                    w.matmul(&xs, m, &mut out);
                }
                dt = dt.min(t.elapsed().as_secs_f64() / 200.0);
            }
            let blocks = (rows * cols / 32) as f64;
            println!(
                "{qt:?} m={m}: {:.1} us, {:.2} ns/block",
                dt * 1e6,
                dt * 1e9 / blocks
            );
        }
    }
}
