//! Matrix products with bf16 inputs and f32 accumulation, for the frozen projections of a
//! training step (`compute_dtype: bf16`).
//!
//! On CPUs with AVX512-BF16 one `vdpbf16ps` does two multiply-adds per f32 lane, so these GEMMs,
//! which take most of a step's time, need about half the instructions of f32 FMA kernels.
//! Both operands are rounded to bf16 (8 significant bits) as they are packed; sums stay f32.
//! Weight panels are packed per call from the (possibly quantized) weights, so no bf16 copy of
//! the model is ever kept. Where the instructions are missing, [`available`] is false and
//! callers stay on their f32 path.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use rayon::prelude::*;
use std::sync::OnceLock;

/// Rows of the output per micro-kernel call.
const MR: usize = 8;
/// 16-lane vectors of output columns per micro-kernel call.
const NV: usize = 3;
/// Output columns per micro-kernel call (one packed weight panel).
const NR: usize = NV * 16;
/// Weight rows per tile of the input-gradient product (kept even: rows are paired).
const GRAD_TILE: usize = 512;

/// Whether this CPU runs the bf16 kernels.
pub fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// Supplies weight rows `r0..r1` as f32 into `out` (`[r1 - r0, cols]`): dequantized or copied.
pub type RowSource<'a> = &'a (dyn Fn(usize, usize, &mut [f32]) + Sync);

/// Left operand of a product: rows of bf16 values stored in pairs (one `u32` per two adjacent
/// columns, the lower half first, as `vdpbf16ps` reads them), padded with zero rows to a
/// multiple of [`MR`] and with a zero column when the width is odd.
pub struct PairedRows {
    data: Vec<u32>,
    rows: usize,
    cols: usize,
}

impl PairedRows {
    /// Columns `col0..col0 + cols` of `rows` rows of `src`, whose rows are `stride` apart.
    pub fn new(src: &[f32], rows: usize, stride: usize, col0: usize, cols: usize) -> Self {
        assert!(available(), "bf16 kernels need AVX512-BF16");
        assert!(rows == 0 || (rows - 1) * stride + col0 + cols <= src.len());
        let pairs = cols.div_ceil(2);
        let mut data = vec![0u32; rows.next_multiple_of(MR) * pairs];
        data.par_chunks_mut(pairs)
            .take(rows)
            .enumerate()
            .for_each(|(i, dst)| {
                let row = &src[i * stride + col0..i * stride + col0 + cols];
                // SAFETY: `available()` was checked above.
                unsafe { pair_row(row, dst) }
            });
        Self { data, rows, cols }
    }

    /// `c[i, c0 + j] = Σₜ self[i, t] · w[j, t]` for the `n` rows of a weight `w` (`[n, k]`, k the
    /// width of `self`), each output row `ldc` apart in `c`.
    pub fn matmul_t(&self, n: usize, w: RowSource<'_>, c: &mut [f32], ldc: usize, c0: usize) {
        let (pairs, m) = (self.pairs(), self.rows);
        let k = pairs * 2;
        assert!(m == 0 || (m - 1) * ldc + c0 + n <= c.len());
        let out = SendPtr(c.as_mut_ptr());
        (0..n.div_ceil(NR)).into_par_iter().for_each_init(
            || Scratch::new(NR * k, pairs * NR),
            |s, panel| {
                let (j0, cols) = (panel * NR, NR.min(n - panel * NR));
                let rows = &mut s.rows[..cols * k];
                fill_rows(w, j0, cols, self.cols, k, rows);
                pack_transposed(rows, cols, k, &mut s.panel);
                let out = &out;
                for i0 in (0..m).step_by(MR) {
                    let a = &self.data[i0 * pairs..(i0 + MR) * pairs];
                    // SAFETY: a holds MR rows of `pairs`, the panel `pairs` × NR values.
                    unsafe { kernel(pairs, a.as_ptr(), pairs, s.panel.as_ptr(), &mut s.tile) };
                    for i in 0..MR.min(m - i0) {
                        // SAFETY: columns c0+j0..c0+j0+cols of row i0+i belong to this panel.
                        let dst = unsafe {
                            std::slice::from_raw_parts_mut(
                                out.0.add((i0 + i) * ldc + c0 + j0),
                                cols,
                            )
                        };
                        dst.copy_from_slice(&s.tile[i * NR..i * NR + cols]);
                    }
                }
            },
        );
    }

    /// Stored `u32`s per row: the width, halved and rounded up.
    fn pairs(&self) -> usize {
        self.cols.div_ceil(2)
    }

    /// `out[i, j] += Σₜ self[i, t] · w[t, j]` for a weight `w` of `self`'s width in rows and
    /// `cols` columns: the input gradient of a frozen `x · wᵀ`.
    pub fn matmul_acc(&self, w: RowSource<'_>, cols: usize, out: &mut [f32]) {
        let (pairs, m) = (self.pairs(), self.rows);
        let n = self.cols;
        assert_eq!(out.len(), m * cols);
        let dst = SendPtr(out.as_mut_ptr());
        let mut tile = vec![0f32; GRAD_TILE * cols];
        for r0 in (0..n).step_by(GRAD_TILE) {
            let tr = GRAD_TILE.min(n - r0);
            let tile = &mut tile[..tr.next_multiple_of(2) * cols];
            tile.fill(0.0);
            w(r0, r0 + tr, &mut tile[..tr * cols]);
            let (p0, tp) = (r0 / 2, tr.div_ceil(2));
            let tile = &*tile;
            (0..cols.div_ceil(NR)).into_par_iter().for_each_init(
                || Scratch::new(0, tp * NR),
                |s, panel| {
                    let (j0, nc) = (panel * NR, NR.min(cols - panel * NR));
                    pack_row_pairs(tile, cols, tp, j0, nc, &mut s.panel[..tp * NR]);
                    let dst = &dst;
                    for i0 in (0..m).step_by(MR) {
                        let a = &self.data[i0 * pairs + p0..];
                        // SAFETY: rows i0..i0+MR of `self` hold pairs p0..p0+tp; the panel
                        // holds tp × NR values.
                        unsafe { kernel(tp, a.as_ptr(), pairs, s.panel.as_ptr(), &mut s.tile) };
                        for i in 0..MR.min(m - i0) {
                            // SAFETY: columns j0..j0+nc of row i0+i belong to this panel.
                            let row = unsafe {
                                std::slice::from_raw_parts_mut(dst.0.add((i0 + i) * cols + j0), nc)
                            };
                            for (o, v) in row.iter_mut().zip(&s.tile[i * NR..i * NR + nc]) {
                                *o += v;
                            }
                        }
                    }
                },
            );
        }
    }
}

struct Scratch {
    rows: Vec<f32>,
    panel: Vec<u32>,
    tile: [f32; MR * NR],
}

impl Scratch {
    fn new(rows: usize, panel: usize) -> Self {
        Self {
            rows: vec![0f32; rows],
            panel: vec![0u32; panel],
            tile: [0f32; MR * NR],
        }
    }
}

struct SendPtr(*mut f32);
// SAFETY: each parallel task writes a disjoint set of output columns through it.
unsafe impl Sync for SendPtr {}
unsafe impl Send for SendPtr {}

/// Fetches weight rows `j0..j0 + n`, each `width` wide, into `rows` laid out `k ≥ width` apart
/// (an odd width gets a zero column).
fn fill_rows(w: RowSource<'_>, j0: usize, n: usize, width: usize, k: usize, rows: &mut [f32]) {
    if width == k {
        w(j0, j0 + n, rows);
        return;
    }
    let mut tmp = vec![0f32; n * width];
    w(j0, j0 + n, &mut tmp);
    for (dst, src) in rows.chunks_exact_mut(k).zip(tmp.chunks_exact(width)) {
        dst[..width].copy_from_slice(src);
        dst[width..].fill(0.0);
    }
}

/// `panel[p, j] = pair(rows[j, 2p], rows[j, 2p + 1])` for `n ≤ NR` rows of width `k` (even);
/// columns `n..NR` of the panel are zero.
fn pack_transposed(rows: &[f32], n: usize, k: usize, panel: &mut [u32]) {
    let pairs = k / 2;
    panel[..pairs * NR].fill(0);
    let mut paired = vec![0u32; pairs];
    for j in 0..n {
        // SAFETY: callers only build panels after `available()` returned true.
        unsafe { pair_row(&rows[j * k..(j + 1) * k], &mut paired) };
        for (p, v) in paired.iter().enumerate() {
            panel[p * NR + j] = *v;
        }
    }
}

/// `panel[p, j] = pair(tile[2p, j0 + j], tile[2p + 1, j0 + j])` for `j < n ≤ NR` (zero beyond).
fn pack_row_pairs(tile: &[f32], cols: usize, pairs: usize, j0: usize, n: usize, panel: &mut [u32]) {
    for p in 0..pairs {
        let (lo, hi) = (
            &tile[2 * p * cols + j0..2 * p * cols + j0 + n],
            &tile[(2 * p + 1) * cols + j0..(2 * p + 1) * cols + j0 + n],
        );
        let dst = &mut panel[p * NR..(p + 1) * NR];
        // SAFETY: callers only build panels after `available()` returned true.
        unsafe { interleave_pairs(lo, hi, dst) };
    }
}

/// bf16 bits of `x`, rounded to nearest even (NaN stays NaN).
fn bf16_bits(x: f32) -> u32 {
    let b = x.to_bits();
    if x.is_nan() {
        (b >> 16) | 0x40
    } else {
        (b + 0x7fff + ((b >> 16) & 1)) >> 16
    }
}

/// `dst[p] = bf16(row[2p]) | bf16(row[2p + 1]) << 16`, a zero upper half past the end.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn pair_row(row: &[f32], dst: &mut [u32]) {
    let full = row.len() / 32;
    for c in 0..full {
        let lo = _mm512_loadu_ps(row.as_ptr().add(c * 32));
        let hi = _mm512_loadu_ps(row.as_ptr().add(c * 32 + 16));
        // Lower 256 bits come from the second operand: row order is kept.
        let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
        _mm512_storeu_si512(dst.as_mut_ptr().add(c * 16) as *mut _, v);
    }
    for (p, d) in dst.iter_mut().enumerate().skip(full * 16) {
        let lo = row.get(2 * p).map_or(0, |&v| bf16_bits(v));
        let hi = row.get(2 * p + 1).map_or(0, |&v| bf16_bits(v));
        *d = lo | (hi << 16);
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn pair_row(_row: &[f32], _dst: &mut [u32]) {
    unreachable!("bf16 kernels are x86-64 only")
}

/// `dst[j] = bf16(lo[j]) | bf16(hi[j]) << 16` for `j < lo.len()`, zero up to `dst.len()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn interleave_pairs(lo: &[f32], hi: &[f32], dst: &mut [u32]) {
    let n = lo.len();
    let full = n / 16;
    for c in 0..full {
        let l: __m256i =
            std::mem::transmute(_mm512_cvtneps_pbh(_mm512_loadu_ps(lo.as_ptr().add(c * 16))));
        let h: __m256i =
            std::mem::transmute(_mm512_cvtneps_pbh(_mm512_loadu_ps(hi.as_ptr().add(c * 16))));
        let v = _mm512_or_si512(
            _mm512_cvtepu16_epi32(l),
            _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)),
        );
        _mm512_storeu_si512(dst.as_mut_ptr().add(c * 16) as *mut _, v);
    }
    for j in full * 16..n {
        dst[j] = bf16_bits(lo[j]) | (bf16_bits(hi[j]) << 16);
    }
    dst[n..].fill(0);
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn interleave_pairs(_lo: &[f32], _hi: &[f32], _dst: &mut [u32]) {
    unreachable!("bf16 kernels are x86-64 only")
}

/// `tile[i, j] = Σₚ a[i, p] · b[p, j]` over `pairs` pairs for [`MR`] rows of `a` (`lda` pairs
/// apart) and one [`NR`]-column panel `b`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn kernel(
    pairs: usize,
    a: *const u32,
    lda: usize,
    b: *const u32,
    tile: &mut [f32; MR * NR],
) {
    let mut acc = [[_mm512_setzero_ps(); NV]; MR];
    for p in 0..pairs {
        let bp = b.add(p * NR);
        let bv: [__m512bh; NV] = std::array::from_fn(|v| {
            std::mem::transmute(_mm512_loadu_si512(bp.add(v * 16) as *const _))
        });
        for (i, row) in acc.iter_mut().enumerate() {
            let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(*a.add(i * lda + p) as i32));
            for (r, b) in row.iter_mut().zip(&bv) {
                *r = _mm512_dpbf16_ps(*r, av, *b);
            }
        }
    }
    for (i, row) in acc.iter().enumerate() {
        for (v, r) in row.iter().enumerate() {
            _mm512_storeu_ps(tile.as_mut_ptr().add(i * NR + v * 16), *r);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn kernel(_p: usize, _a: *const u32, _lda: usize, _b: *const u32, _t: &mut [f32; MR * NR]) {
    unreachable!("bf16 kernels are x86-64 only")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (((i * 7919 + seed * 104_729) % 2001) as f32 / 1000.0) - 1.0)
            .collect()
    }

    fn round(x: f32) -> f64 {
        f32::from_bits(bf16_bits(x) << 16) as f64
    }

    fn assert_close(got: &[f32], want: &[f64]) {
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (*g as f64 - w).abs() <= 1e-4 * (1.0 + w.abs()),
                "element {i}: {g} vs {w}"
            );
        }
    }

    #[test]
    fn rounding_is_to_nearest_even() {
        assert_eq!(bf16_bits(1.0), 0x3f80);
        // 1 + 2⁻⁸ is halfway between two bf16 values: it goes to the even one (1.0).
        assert_eq!(bf16_bits(1.0 + 1.0 / 256.0), 0x3f80);
        assert_eq!(bf16_bits(1.0 + 3.0 / 256.0), 0x3f82);
        assert!(f32::from_bits(bf16_bits(f32::NAN) << 16).is_nan());
    }

    #[test]
    fn product_with_transposed_weights_matches_rounded_f32() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        // Odd sizes everywhere: partial row tiles, partial panels, an odd reduction width, and
        // a column block of a wider input.
        let (m, k, n, stride, col0) = (13, 37, 53, 45, 5);
        let a = values(m * stride, 1);
        let w = values(n * k, 2);
        let ldc = n + 4;
        let mut c = vec![f32::NAN; m * ldc];
        let source =
            |r0: usize, r1: usize, out: &mut [f32]| out.copy_from_slice(&w[r0 * k..r1 * k]);
        PairedRows::new(&a, m, stride, col0, k).matmul_t(n, &source, &mut c, ldc, 2);
        for i in 0..m {
            let want: Vec<f64> = (0..n)
                .map(|j| {
                    (0..k)
                        .map(|t| round(a[i * stride + col0 + t]) * round(w[j * k + t]))
                        .sum()
                })
                .collect();
            assert_close(&c[i * ldc + 2..i * ldc + 2 + n], &want);
            assert!(
                c[i * ldc].is_nan() && c[i * ldc + 1].is_nan(),
                "wrote outside its columns"
            );
        }
    }

    #[test]
    fn input_gradient_product_accumulates_across_weight_tiles() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        // More weight rows than one tile, an odd count, and columns that end mid-panel.
        let (m, rows, cols) = (11, GRAD_TILE * 2 + 7, 70);
        let g = values(m * rows, 3);
        let w = values(rows * cols, 4);
        let mut out = values(m * cols, 5);
        let before = out.clone();
        let source =
            |r0: usize, r1: usize, o: &mut [f32]| o.copy_from_slice(&w[r0 * cols..r1 * cols]);
        PairedRows::new(&g, m, rows, 0, rows).matmul_acc(&source, cols, &mut out);
        for i in 0..m {
            let want: Vec<f64> = (0..cols)
                .map(|j| {
                    before[i * cols + j] as f64
                        + (0..rows)
                            .map(|t| round(g[i * rows + t]) * round(w[t * cols + j]))
                            .sum::<f64>()
                })
                .collect();
            assert_close(&out[i * cols..(i + 1) * cols], &want);
        }
    }
}
