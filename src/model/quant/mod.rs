//! Quantized weight matrices (ggml Q4_0, Q4_1, Q8_0 blocks) and their matmul with f32 activations.
//!
//! The weights stay quantized in memory (the QLoRA memory story). A matmul with a few activation
//! rows (decode) runs our SIMD dot kernels; with many rows (prefill, training) tiles of the matrix
//! are dequantized into a small buffer and multiplied by the f32 GEMM. Activations are never
//! quantized. The byte layout of a block is exactly ggml's, so GGUF tensors load without copying
//! into another format.

mod kernels;

use candle_core::{CpuStorage, CustomOp1, Layout, Shape};
use rayon::prelude::*;
use std::sync::Arc;

pub use kernels::{dequantize_block, dot_chunk_scalar};

/// Up to this many activation rows use the dot kernels; more use dequantized tiles + GEMM.
/// Measured on the default model: a decode batch of 16 ran 1.4x faster on the dot kernels than
/// on tiles (dequantizing every weight per step costs more than re-decoding blocks per 4 rows).
const MAX_DOT_ROWS: usize = 32;
/// Weight rows dequantized at once on the GEMM path (a tile of 64×4096 f32 is 1 MiB).
const TILE_ROWS: usize = 64;

/// The block formats with native kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QType {
    Q4_0,
    Q4_1,
    Q8_0,
}

impl QType {
    /// Bytes of one block in a GGUF file.
    pub fn ggml_block_bytes(self) -> usize {
        match self {
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q8_0 => 34,
        }
    }

    /// f32 scales per block in memory: `d`, and for Q4_1 also the minimum `m`.
    pub fn scales_per_block(self) -> usize {
        match self {
            Self::Q4_1 => 2,
            Self::Q4_0 | Self::Q8_0 => 1,
        }
    }

    /// Packed quant bytes per block.
    pub fn quant_bytes(self) -> usize {
        match self {
            Self::Q4_0 | Self::Q4_1 => 16,
            Self::Q8_0 => 32,
        }
    }
}

/// A row-major `rows × cols` matrix of quantized blocks (32 weights per block).
///
/// In memory each block is split: its f16 scales are widened to f32 in `scales` and its packed
/// quants go to `quants`, so the kernels broadcast a scale with one load instead of converting
/// it for every block (a few bytes more per block than GGUF, same values).
#[derive(Debug)]
pub struct QMatrix {
    qtype: QType,
    rows: usize,
    cols: usize,
    scales: Vec<f32>,
    quants: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
#[error("a {qtype:?} matrix of {rows}×{cols} needs cols divisible by 32 and {expected} bytes, got {got}")]
pub struct QShapeError {
    qtype: QType,
    rows: usize,
    cols: usize,
    expected: usize,
    got: usize,
}

impl QMatrix {
    /// Takes GGUF block bytes (ggml layout).
    pub fn from_ggml_bytes(
        qtype: QType,
        rows: usize,
        cols: usize,
        data: &[u8],
    ) -> Result<Self, QShapeError> {
        let expected = rows * (cols / 32) * qtype.ggml_block_bytes();
        if !cols.is_multiple_of(32) || data.len() != expected {
            return Err(QShapeError {
                qtype,
                rows,
                cols,
                expected,
                got: data.len(),
            });
        }
        let n_blocks = rows * cols / 32;
        let mut scales = Vec::with_capacity(n_blocks * qtype.scales_per_block());
        let mut quants = Vec::with_capacity(n_blocks * qtype.quant_bytes());
        let n_scales = qtype.scales_per_block();
        for block in data.chunks_exact(qtype.ggml_block_bytes()) {
            for k in 0..n_scales {
                scales.push(half::f16::from_le_bytes([block[2 * k], block[2 * k + 1]]).to_f32());
            }
            quants.extend_from_slice(&block[2 * n_scales..]);
        }
        Ok(Self {
            qtype,
            rows,
            cols,
            scales,
            quants,
        })
    }

    /// The GGUF block bytes (ggml layout) of this matrix.
    pub fn to_ggml_bytes(&self) -> Vec<u8> {
        let n_scales = self.qtype.scales_per_block();
        let qb = self.qtype.quant_bytes();
        let mut out =
            Vec::with_capacity(self.scales.len() / n_scales * self.qtype.ggml_block_bytes());
        for (s, q) in self
            .scales
            .chunks_exact(n_scales)
            .zip(self.quants.chunks_exact(qb))
        {
            for &v in s {
                out.extend_from_slice(&half::f16::from_f32(v).to_le_bytes());
            }
            out.extend_from_slice(q);
        }
        out
    }

    /// Quantizes a row-major f32 matrix the way ggml's reference quantizers do.
    pub fn quantize(qtype: QType, rows: usize, cols: usize, values: &[f32]) -> Self {
        assert!(cols.is_multiple_of(32) && values.len() == rows * cols);
        let mut data = Vec::with_capacity(rows * cols / 32 * qtype.ggml_block_bytes());
        for block in values.chunks_exact(32) {
            quantize_block(qtype, block, &mut data);
        }
        Self::from_ggml_bytes(qtype, rows, cols, &data).expect("quantize produces whole blocks")
    }

    pub fn qtype(&self) -> QType {
        self.qtype
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes held in memory.
    pub fn size_in_bytes(&self) -> usize {
        self.scales.len() * 4 + self.quants.len()
    }

    /// Scales and quants of rows `r0..r1`.
    fn rows_data(&self, r0: usize, r1: usize) -> (&[f32], &[u8]) {
        let nb = self.cols / 32;
        let s = self.qtype.scales_per_block() * nb;
        let q = self.qtype.quant_bytes() * nb;
        (&self.scales[r0 * s..r1 * s], &self.quants[r0 * q..r1 * q])
    }

    /// Dequantizes rows `r0..r0 + out.len() / cols` into `out`.
    pub fn dequantize_rows(&self, r0: usize, out: &mut [f32]) {
        let (s, q) = self.rows_data(r0, r0 + out.len() / self.cols);
        kernels::dequantize_blocks(self.qtype, s, q, out);
    }

    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        out.par_chunks_mut(self.cols * TILE_ROWS)
            .enumerate()
            .for_each(|(t, o)| self.dequantize_rows(t * TILE_ROWS, o));
        out
    }

    /// `out[m, rows] = xs[m, cols] · selfᵀ`.
    pub fn matmul(&self, xs: &[f32], m: usize, out: &mut [f32]) {
        matmul_group(&[self], xs, m, out)
    }

    /// The input gradient of a frozen matmul: `out[m, cols] += grad[:, c0..c0+rows] · self`,
    /// where `grad` is `[m, stride]`. Tiles of the matrix are dequantized one at a time, so the
    /// f32 weights never exist whole.
    pub fn backward_into(&self, grad: &[f32], stride: usize, c0: usize, m: usize, out: &mut [f32]) {
        const BACK_TILE: usize = 256;
        assert!(grad.len() >= m * stride && c0 + self.rows <= stride);
        assert_eq!(out.len(), m * self.cols);
        let mut tile = vec![0f32; BACK_TILE.min(self.rows) * self.cols];
        for r0 in (0..self.rows).step_by(BACK_TILE) {
            let n = BACK_TILE.min(self.rows - r0);
            let tile = &mut tile[..n * self.cols];
            self.dequantize_rows(r0, tile);
            // SAFETY: `grad` holds m rows of `stride` columns and columns c0+r0..c0+r0+n exist;
            // `tile` is [n, cols] and `out` is [m, cols].
            unsafe {
                gemm::gemm(
                    m,
                    self.cols,
                    n,
                    out.as_mut_ptr(),
                    1,
                    self.cols as isize,
                    true,
                    grad.as_ptr().add(c0 + r0),
                    1,
                    stride as isize,
                    tile.as_ptr(),
                    1,
                    self.cols as isize,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::Rayon(rayon::current_num_threads()),
                )
            }
        }
    }
}

/// `out[m, Σrows] = xs[m, cols] · [W₀; W₁; …]ᵀ`: several matrices that share their input (q, k
/// and v; gate and up) in one pass, so decode pays one thread hand-off instead of several.
pub fn matmul_group(ws: &[&QMatrix], xs: &[f32], m: usize, out: &mut [f32]) {
    let cols = ws[0].cols;
    assert!(
        ws.iter().all(|w| w.cols == cols),
        "grouped matrices must share their input"
    );
    let total: usize = ws.iter().map(|w| w.rows).sum();
    assert_eq!(xs.len(), m * cols);
    assert_eq!(out.len(), m * total);
    // (matrix, first row, end row, column of the output)
    let mut runs = Vec::new();
    let mut col = 0;
    let run = if m <= MAX_DOT_ROWS {
        DOT_CHUNK
    } else {
        TILE_ROWS
    };
    for (i, w) in ws.iter().enumerate() {
        for r0 in (0..w.rows).step_by(run) {
            runs.push((i, r0, (r0 + run).min(w.rows), col + r0));
        }
        col += w.rows;
    }
    if m <= MAX_DOT_ROWS {
        group_dot(ws, &runs, xs, m, total, out)
    } else {
        group_tiled(ws, &runs, xs, m, total, out)
    }
}

/// Weight rows per work item of the dot path.
const DOT_CHUNK: usize = 16;

type Run = (usize, usize, usize, usize);

fn group_dot(ws: &[&QMatrix], runs: &[Run], xs: &[f32], m: usize, total: usize, out: &mut [f32]) {
    // Results land transposed ([total, m]) so work items write disjoint ranges. Decode issues
    // ~120 of these per token, each tens of microseconds long: candle's spinning barrier pool
    // starts them far faster than waking sleeping rayon workers.
    let cols = ws[0].cols;
    let mut out_t = vec![0f32; total * m];
    let dst = SendPtr(out_t.as_mut_ptr());
    candle_core::utils::barrier_pool().execute_chunked(runs.len(), |items| {
        let dst = &dst;
        for &(i, r0, r1, c0) in &runs[items] {
            // SAFETY: this run owns rows c0..c0+(r1-r0) of `out_t`, which no other run touches.
            let o = unsafe { std::slice::from_raw_parts_mut(dst.0.add(c0 * m), (r1 - r0) * m) };
            let (s, q) = ws[i].rows_data(r0, r1);
            kernels::dot_chunk(ws[i].qtype, s, q, xs, m, cols, o);
        }
    });
    if m == 1 {
        out.copy_from_slice(&out_t);
        return;
    }
    for r in 0..total {
        for i in 0..m {
            out[i * total + r] = out_t[r * m + i];
        }
    }
}

fn group_tiled(ws: &[&QMatrix], runs: &[Run], xs: &[f32], m: usize, total: usize, out: &mut [f32]) {
    let cols = ws[0].cols;
    let dst = SendPtr(out.as_mut_ptr());
    runs.par_iter().for_each_init(
        || vec![0f32; TILE_ROWS * cols],
        |buf, &(i, r0, r1, c0)| {
            let n = r1 - r0;
            let tile = &mut buf[..n * cols];
            ws[i].dequantize_rows(r0, tile);
            let dst = &dst;
            // SAFETY: this tile writes only columns c0..c0+n of `out` ([m, total]), disjoint
            // from every other tile; `xs` and `tile` are valid for the strides given.
            unsafe {
                gemm::gemm(
                    m,
                    n,
                    cols,
                    dst.0.add(c0),
                    1,
                    total as isize,
                    false,
                    xs.as_ptr(),
                    1,
                    cols as isize,
                    tile.as_ptr(),
                    cols as isize,
                    1,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                )
            }
        },
    );
}

struct SendPtr(*mut f32);
// SAFETY: used only to hand disjoint output columns to rayon tasks (see `matmul_tiled`).
unsafe impl Sync for SendPtr {}
unsafe impl Send for SendPtr {}

fn quantize_block(qtype: QType, x: &[f32], out: &mut Vec<u8>) {
    let f16 = |v: f32| half::f16::from_f32(v).to_le_bytes();
    match qtype {
        QType::Q8_0 => {
            let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            out.extend_from_slice(&f16(d));
            out.extend(x.iter().map(|v| (v * id).round() as i8 as u8));
        }
        QType::Q4_0 => {
            // The value of largest magnitude maps to -8, keeping its sign.
            let max = x
                .iter()
                .fold(0f32, |a, &v| if v.abs() > a.abs() { v } else { a });
            let d = max / -8.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            out.extend_from_slice(&f16(d));
            let q = |v: f32| ((v * id + 8.5) as i32).clamp(0, 15) as u8;
            out.extend((0..16).map(|j| q(x[j]) | (q(x[j + 16]) << 4)));
        }
        QType::Q4_1 => {
            let min = x.iter().copied().fold(f32::INFINITY, f32::min);
            let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let d = (max - min) / 15.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            out.extend_from_slice(&f16(d));
            out.extend_from_slice(&f16(min));
            let q = |v: f32| (((v - min) * id + 0.5) as i32).clamp(0, 15) as u8;
            out.extend((0..16).map(|j| q(x[j]) | (q(x[j + 16]) << 4)));
        }
    }
}

/// candle op: `xs[.., cols] · [W₀; W₁; …]ᵀ` with the weights of one or more [`QMatrix`]es that
/// share their input; the outputs are concatenated along the last dimension.
pub struct QMatMul(pub Vec<Arc<QMatrix>>);

impl CustomOp1 for QMatMul {
    fn name(&self) -> &'static str {
        "tuneshop-qmatmul"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(xs) = storage else {
            candle_core::bail!("quantized matmul needs f32 activations")
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("quantized matmul needs contiguous activations")
        };
        let ws: Vec<&QMatrix> = self.0.iter().map(|w| w.as_ref()).collect();
        let Some(first) = ws.first() else {
            candle_core::bail!("quantized matmul needs at least one matrix")
        };
        let mut dims = layout.shape().dims().to_vec();
        let k = dims.last().copied().unwrap_or(0);
        if ws.iter().any(|w| w.cols != k) {
            candle_core::bail!(
                "quantized matmul: activations have {k} columns, weights {}",
                first.cols
            )
        }
        let total: usize = ws.iter().map(|w| w.rows).sum();
        let m = (end - start) / k;
        let mut out = vec![0f32; m * total];
        matmul_group(&ws, &xs[start..end], m, &mut out);
        if let Some(last) = dims.last_mut() {
            *last = total;
        }
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    fn reference(w: &QMatrix, xs: &[f32], m: usize) -> Vec<f32> {
        let dense = w.dequantize();
        let mut out = vec![0f32; m * w.rows];
        for i in 0..m {
            for r in 0..w.rows {
                out[i * w.rows + r] = (0..w.cols)
                    .map(|c| dense[r * w.cols + c] as f64 * xs[i * w.cols + c] as f64)
                    .sum::<f64>() as f32;
            }
        }
        out
    }

    #[test]
    fn quantization_error_is_small() {
        let values = random(8 * 64, 1);
        for (qtype, tol) in [
            (QType::Q8_0, 0.01),
            (QType::Q4_0, 0.15),
            (QType::Q4_1, 0.07),
        ] {
            let q = QMatrix::quantize(qtype, 8, 64, &values);
            let back = q.dequantize();
            // The split in-memory layout round-trips to the same GGUF bytes.
            let again = QMatrix::from_ggml_bytes(qtype, 8, 64, &q.to_ggml_bytes()).unwrap();
            assert_eq!(again.dequantize(), back);
            let err = values
                .iter()
                .zip(&back)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(err < tol, "{qtype:?} max error {err}");
        }
    }

    #[test]
    fn matmul_matches_dequantized_reference_for_every_path() {
        let (rows, cols) = (70, 96);
        let w_values = random(rows * cols, 2);
        for qtype in [QType::Q4_0, QType::Q4_1, QType::Q8_0] {
            let w = QMatrix::quantize(qtype, rows, cols, &w_values);
            for m in [1, 2, 3, 4, 5, 8, 9, 33] {
                let xs = random(m * cols, 3 + m as u64);
                let mut out = vec![0f32; m * rows];
                w.matmul(&xs, m, &mut out);
                let want = reference(&w, &xs, m);
                for (a, b) in out.iter().zip(&want) {
                    assert!((a - b).abs() < 1e-4, "{qtype:?} m={m}: {a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn grouped_matmul_equals_separate_matmuls() {
        let cols = 64;
        let a = QMatrix::quantize(QType::Q4_1, 48, cols, &random(48 * cols, 20));
        let b = QMatrix::quantize(QType::Q4_1, 17, cols, &random(17 * cols, 21));
        for m in [1, 3, 12] {
            let xs = random(m * cols, 22);
            let mut both = vec![0f32; m * 65];
            matmul_group(&[&a, &b], &xs, m, &mut both);
            let (mut oa, mut ob) = (vec![0f32; m * 48], vec![0f32; m * 17]);
            a.matmul(&xs, m, &mut oa);
            b.matmul(&xs, m, &mut ob);
            for i in 0..m {
                assert_eq!(&both[i * 65..i * 65 + 48], &oa[i * 48..(i + 1) * 48]);
                assert_eq!(&both[i * 65 + 48..(i + 1) * 65], &ob[i * 17..(i + 1) * 17]);
            }
        }
    }

    #[test]
    fn backward_is_the_transposed_product() {
        let (rows, cols, m) = (300, 64, 5);
        let w = QMatrix::quantize(QType::Q4_1, rows, cols, &random(rows * cols, 30));
        let dense = w.dequantize();
        let stride = rows + 7;
        let grad = random(m * stride, 31);
        let mut out = vec![0.5f32; m * cols];
        w.backward_into(&grad, stride, 3, m, &mut out);
        for i in 0..m {
            for c in 0..cols {
                let want = 0.5
                    + (0..rows)
                        .map(|r| grad[i * stride + 3 + r] as f64 * dense[r * cols + c] as f64)
                        .sum::<f64>() as f32;
                assert!((out[i * cols + c] - want).abs() < 1e-4);
            }
        }
    }

    #[test]
    fn simd_and_scalar_kernels_agree() {
        let cols = 128;
        for qtype in [QType::Q4_0, QType::Q4_1, QType::Q8_0] {
            let w = QMatrix::quantize(qtype, 3, cols, &random(3 * cols, 9));
            let (s, q) = w.rows_data(0, 3);
            for m in 1..=6 {
                let xs = random(m * cols, 10);
                let mut fast = vec![0f32; 3 * m];
                let mut slow = vec![0f32; 3 * m];
                kernels::dot_chunk(qtype, s, q, &xs, m, cols, &mut fast);
                dot_chunk_scalar(qtype, s, q, &xs, m, cols, &mut slow);
                for (a, b) in fast.iter().zip(slow) {
                    assert!((a - b).abs() < 1e-4, "{qtype:?} m={m}: {a} vs {b}");
                }
            }
        }
    }
}
