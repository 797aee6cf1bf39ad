//! Tracing set-up: human-readable logs on stderr (stdout stays for command output), filtered
//! by `RUST_LOG` (default `info`).

use tracing_subscriber::EnvFilter;

pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Sizes the thread pools once, before any tensor work: rayon's global pool (our kernels) and,
/// through `RAYON_NUM_THREADS`, candle's own pools, so the two never oversubscribe the cores.
pub fn init_threads(threads: Option<usize>) {
    let n = threads
        .or_else(|| std::env::var("RAYON_NUM_THREADS").ok()?.parse().ok())
        .or_else(|| std::thread::available_parallelism().ok().map(|n| n.get()))
        .unwrap_or(1)
        .max(1);
    // Called first thing in `main`, before any other thread exists.
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global();
}
