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

pub use kernels::{dequantize_block, dot_rows_scalar};

/// Up to this many activation rows use the dot kernels; more use dequantized tiles + GEMM.
const MAX_DOT_ROWS: usize = 8;
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
    pub fn block_bytes(self) -> usize {
        match self {
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q8_0 => 34,
        }
    }
}

/// A row-major `rows × cols` matrix of quantized blocks (32 weights per block).
#[derive(Debug)]
pub struct QMatrix {
    qtype: QType,
    rows: usize,
    cols: usize,
    data: Vec<u8>,
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
    pub fn from_bytes(
        qtype: QType,
        rows: usize,
        cols: usize,
        data: Vec<u8>,
    ) -> Result<Self, QShapeError> {
        let expected = rows * (cols / 32) * qtype.block_bytes();
        if cols % 32 != 0 || data.len() != expected {
            return Err(QShapeError {
                qtype,
                rows,
                cols,
                expected,
                got: data.len(),
            });
        }
        Ok(Self {
            qtype,
            rows,
            cols,
            data,
        })
    }

    /// Quantizes a row-major f32 matrix the way ggml's reference quantizers do.
    pub fn quantize(qtype: QType, rows: usize, cols: usize, values: &[f32]) -> Self {
        assert!(cols % 32 == 0 && values.len() == rows * cols);
        let mut data = Vec::with_capacity(rows * cols / 32 * qtype.block_bytes());
        for block in values.chunks_exact(32) {
            quantize_block(qtype, block, &mut data);
        }
        Self {
            qtype,
            rows,
            cols,
            data,
        }
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

    pub fn bytes(&self) -> &[u8] {
        &self.data
    }

    fn row_bytes(&self) -> usize {
        self.cols / 32 * self.qtype.block_bytes()
    }

    fn row(&self, r: usize) -> &[u8] {
        let n = self.row_bytes();
        &self.data[r * n..(r + 1) * n]
    }

    /// Dequantizes rows `r0..r0 + out.len() / cols` into `out`.
    pub fn dequantize_rows(&self, r0: usize, out: &mut [f32]) {
        let mut block = [0f32; 32];
        let n_rows = out.len() / self.cols;
        let bytes = &self.data[r0 * self.row_bytes()..(r0 + n_rows) * self.row_bytes()];
        for (chunk, o) in bytes
            .chunks_exact(self.qtype.block_bytes())
            .zip(out.chunks_exact_mut(32))
        {
            dequantize_block(self.qtype, chunk, &mut block);
            o.copy_from_slice(&block);
        }
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
        assert_eq!(xs.len(), m * self.cols);
        assert_eq!(out.len(), m * self.rows);
        if m <= MAX_DOT_ROWS {
            self.matmul_dot(xs, m, out)
        } else {
            self.matmul_tiled(xs, m, out)
        }
    }

    fn matmul_dot(&self, xs: &[f32], m: usize, out: &mut [f32]) {
        // Each task owns a run of weight rows; results land transposed ([rows, m]) so the tasks'
        // outputs are disjoint slices.
        let chunk = (self.rows / (rayon::current_num_threads() * 8)).clamp(8, 256);
        let mut out_t = vec![0f32; self.rows * m];
        out_t
            .par_chunks_mut(chunk * m)
            .enumerate()
            .for_each(|(c, o)| {
                for (j, orow) in o.chunks_exact_mut(m).enumerate() {
                    let row = self.row(c * chunk + j);
                    for (p, opass) in orow.chunks_mut(kernels::ROWS_PER_PASS).enumerate() {
                        let x0 = p * kernels::ROWS_PER_PASS * self.cols;
                        kernels::dot_rows(self.qtype, row, &xs[x0..], self.cols, opass);
                    }
                }
            });
        for r in 0..self.rows {
            for i in 0..m {
                out[i * self.rows + r] = out_t[r * m + i];
            }
        }
    }

    fn matmul_tiled(&self, xs: &[f32], m: usize, out: &mut [f32]) {
        let cols = self.cols;
        let rows = self.rows;
        let dst = SendPtr(out.as_mut_ptr());
        (0..rows.div_ceil(TILE_ROWS)).into_par_iter().for_each_init(
            || vec![0f32; TILE_ROWS * cols],
            |buf, t| {
                let r0 = t * TILE_ROWS;
                let n = TILE_ROWS.min(rows - r0);
                let tile = &mut buf[..n * cols];
                self.dequantize_rows(r0, tile);
                let dst = &dst;
                // SAFETY: tile `t` writes only columns r0..r0+n of `out` ([m, rows]), disjoint
                // from every other tile; `xs` and `tile` are valid for the strides given.
                unsafe {
                    gemm::gemm(
                        m,
                        n,
                        cols,
                        dst.0.add(r0),
                        1,
                        rows as isize,
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

/// candle op: `xs[.., cols] · Wᵀ` with the weights of a [`QMatrix`].
pub struct QMatMul(pub Arc<QMatrix>);

impl CustomOp1 for QMatMul {
    fn name(&self) -> &'static str {
        "tuneshop-qmatmul"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let w = &self.0;
        let CpuStorage::F32(xs) = storage else {
            candle_core::bail!("quantized matmul needs f32 activations")
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("quantized matmul needs contiguous activations")
        };
        let mut dims = layout.shape().dims().to_vec();
        let k = dims.last().copied().unwrap_or(0);
        if k != w.cols {
            candle_core::bail!(
                "quantized matmul: activations have {k} columns, weights {}",
                w.cols
            )
        }
        let m = (end - start) / k;
        let mut out = vec![0f32; m * w.rows];
        w.matmul(&xs[start..end], m, &mut out);
        if let Some(last) = dims.last_mut() {
            *last = w.rows;
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
    fn simd_and_scalar_kernels_agree() {
        let cols = 128;
        let w = QMatrix::quantize(QType::Q4_1, 1, cols, &random(cols, 9));
        let xs = random(3 * cols, 10);
        let mut fast = [0f32; 3];
        let mut slow = [0f32; 3];
        kernels::dot_rows(QType::Q4_1, w.row(0), &xs, cols, &mut fast);
        dot_rows_scalar(QType::Q4_1, w.row(0), &xs, cols, &mut slow);
        for (a, b) in fast.iter().zip(slow) {
            assert!((a - b).abs() < 1e-4);
        }
    }
}
