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

/// How long (spin iterations) an idle worker of candle's barrier pool spins before it sleeps.
/// candle's default (25 000) keeps it burning a core for about a millisecond after every
/// elementwise op, which the GEMM threads of a training step then share; decode steps follow each
/// other faster than this limit, so they still find the workers awake.
const BARRIER_SPIN_LIMIT: &str = "1000";

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
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", BARRIER_SPIN_LIMIT);
    }
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global();
}

/// mimalloc's `mi_option_purge_delay` (its index in `mi_option_t` of the v3 sources that
/// libmimalloc-sys 0.1.49 builds; the crate does not export it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Tells mimalloc (the binaries' allocator) to keep freed memory for reuse instead of returning
/// it to the kernel: every training step frees and reallocates the same activation sizes, and
/// pages handed back come back zeroed at fault time (measured: a quarter of a training step).
/// Memory then stays at its peak. Harmless where another allocator is in use.
pub fn keep_freed_memory() {
    // SAFETY: sets a process-wide option; called first thing in `main`.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}
