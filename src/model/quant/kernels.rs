//! Dot products of one quantized weight row with a few f32 activation rows.
//!
//! The weights are dequantized on the fly inside registers and multiplied with f32 activations,
//! so results match "dequantize, then f32 matmul" up to summation order (unlike kernels that
//! quantize activations to 8 bits). An AVX2+FMA+F16C path is chosen at run time; the scalar path
//! is the reference and the fallback elsewhere.

use super::QType;

/// Activation rows handled per pass over a weight row.
pub const ROWS_PER_PASS: usize = 4;

/// `out[i] = dot(dequant(row), xs[i*cols..(i+1)*cols])` for `i < out.len() <= ROWS_PER_PASS`.
pub fn dot_rows(qtype: QType, row: &[u8], xs: &[f32], cols: usize, out: &mut [f32]) {
    debug_assert!(out.len() <= ROWS_PER_PASS && xs.len() >= out.len() * cols);
    #[cfg(target_arch = "x86_64")]
    {
        if avx2::available() {
            // SAFETY: the CPU features were checked at run time; slice bounds hold by the
            // debug_assert above and the block layout (`row` has cols/32 whole blocks).
            unsafe { avx2::dot_rows(qtype, row, xs, cols, out) };
            return;
        }
    }
    dot_rows_scalar(qtype, row, xs, cols, out);
}

pub fn dot_rows_scalar(qtype: QType, row: &[u8], xs: &[f32], cols: usize, out: &mut [f32]) {
    let mut block = [0f32; 32];
    out.fill(0.0);
    for (b, bytes) in row.chunks_exact(qtype.block_bytes()).enumerate() {
        dequantize_block(qtype, bytes, &mut block);
        for (i, o) in out.iter_mut().enumerate() {
            let x = &xs[i * cols + b * 32..i * cols + b * 32 + 32];
            *o += block.iter().zip(x).map(|(w, x)| w * x).sum::<f32>();
        }
    }
}

fn f16_at(bytes: &[u8], at: usize) -> f32 {
    half::f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

/// Dequantizes one block (32 weights) exactly as ggml does.
pub fn dequantize_block(qtype: QType, bytes: &[u8], out: &mut [f32; 32]) {
    match qtype {
        QType::Q4_0 => {
            let d = f16_at(bytes, 0);
            for (j, &q) in bytes[2..18].iter().enumerate() {
                out[j] = ((q & 0x0f) as i32 - 8) as f32 * d;
                out[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
            }
        }
        QType::Q4_1 => {
            let d = f16_at(bytes, 0);
            let m = f16_at(bytes, 2);
            for (j, &q) in bytes[4..20].iter().enumerate() {
                out[j] = (q & 0x0f) as f32 * d + m;
                out[j + 16] = (q >> 4) as f32 * d + m;
            }
        }
        QType::Q8_0 => {
            let d = f16_at(bytes, 0);
            for (o, &q) in out.iter_mut().zip(&bytes[2..34]) {
                *o = (q as i8) as f32 * d;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{QType, ROWS_PER_PASS};
    use std::arch::x86_64::*;
    use std::sync::OnceLock;

    pub fn available() -> bool {
        static OK: OnceLock<bool> = OnceLock::new();
        *OK.get_or_init(|| {
            is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
        })
    }

    const Q4_0: u8 = 0;
    const Q4_1: u8 = 1;
    const Q8_0: u8 = 2;

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_rows(qtype: QType, row: &[u8], xs: &[f32], cols: usize, out: &mut [f32]) {
        match (qtype, out.len()) {
            (_, 0) => {}
            (QType::Q4_0, 1) => rows::<1, Q4_0>(row, xs, cols, out),
            (QType::Q4_0, 2) => rows::<2, Q4_0>(row, xs, cols, out),
            (QType::Q4_0, 3) => rows::<3, Q4_0>(row, xs, cols, out),
            (QType::Q4_0, _) => rows::<ROWS_PER_PASS, Q4_0>(row, xs, cols, out),
            (QType::Q4_1, 1) => rows::<1, Q4_1>(row, xs, cols, out),
            (QType::Q4_1, 2) => rows::<2, Q4_1>(row, xs, cols, out),
            (QType::Q4_1, 3) => rows::<3, Q4_1>(row, xs, cols, out),
            (QType::Q4_1, _) => rows::<ROWS_PER_PASS, Q4_1>(row, xs, cols, out),
            (QType::Q8_0, 1) => rows::<1, Q8_0>(row, xs, cols, out),
            (QType::Q8_0, 2) => rows::<2, Q8_0>(row, xs, cols, out),
            (QType::Q8_0, 3) => rows::<3, Q8_0>(row, xs, cols, out),
            (QType::Q8_0, _) => rows::<ROWS_PER_PASS, Q8_0>(row, xs, cols, out),
        }
    }

    /// 8 unsigned bytes to 8 floats.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn u8x8(v: __m128i) -> __m256 {
        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v))
    }

    /// 8 signed bytes at `p` to 8 floats.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn i8x8(p: *const u8) -> __m256 {
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p as *const __m128i)))
    }

    /// The 32 weights of the block at `p`, as four vectors in element order.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn block<const Q: u8>(p: *const u8) -> [__m256; 4] {
        // The leading f16 scale (and, for Q4_1, the f16 minimum after it).
        let halves = _mm_cvtph_ps(_mm_cvtsi32_si128((p as *const i32).read_unaligned()));
        let d = _mm256_broadcastss_ps(halves);
        if Q == Q8_0 {
            let q = p.add(2);
            return [
                _mm256_mul_ps(i8x8(q), d),
                _mm256_mul_ps(i8x8(q.add(8)), d),
                _mm256_mul_ps(i8x8(q.add(16)), d),
                _mm256_mul_ps(i8x8(q.add(24)), d),
            ];
        }
        let qs = _mm_loadu_si128(p.add(if Q == Q4_1 { 4 } else { 2 }) as *const __m128i);
        let mask = _mm_set1_epi8(0x0f);
        let lo = _mm_and_si128(qs, mask);
        let hi = _mm_and_si128(_mm_srli_epi16(qs, 4), mask);
        let q = [
            u8x8(lo),
            u8x8(_mm_srli_si128(lo, 8)),
            u8x8(hi),
            u8x8(_mm_srli_si128(hi, 8)),
        ];
        if Q == Q4_1 {
            let m = _mm256_broadcastss_ps(_mm_movehdup_ps(halves));
            [
                _mm256_fmadd_ps(q[0], d, m),
                _mm256_fmadd_ps(q[1], d, m),
                _mm256_fmadd_ps(q[2], d, m),
                _mm256_fmadd_ps(q[3], d, m),
            ]
        } else {
            let off = _mm256_set1_ps(8.0);
            [
                _mm256_mul_ps(_mm256_sub_ps(q[0], off), d),
                _mm256_mul_ps(_mm256_sub_ps(q[1], off), d),
                _mm256_mul_ps(_mm256_sub_ps(q[2], off), d),
                _mm256_mul_ps(_mm256_sub_ps(q[3], off), d),
            ]
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn rows<const M: usize, const Q: u8>(
        row: &[u8],
        xs: &[f32],
        cols: usize,
        out: &mut [f32],
    ) {
        let block_bytes = match Q {
            Q4_0 => 18,
            Q4_1 => 20,
            _ => 34,
        };
        let nb = cols / 32;
        // Two accumulators per activation row keep the FMA chains short.
        let mut acc = [[_mm256_setzero_ps(); 2]; M];
        let wp = row.as_ptr();
        let xp = xs.as_ptr();
        for b in 0..nb {
            let w = block::<Q>(wp.add(b * block_bytes));
            for (i, a) in acc.iter_mut().enumerate() {
                let x = xp.add(i * cols + b * 32);
                a[0] = _mm256_fmadd_ps(w[0], _mm256_loadu_ps(x), a[0]);
                a[1] = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(x.add(8)), a[1]);
                a[0] = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(x.add(16)), a[0]);
                a[1] = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(x.add(24)), a[1]);
            }
        }
        for (o, a) in out.iter_mut().zip(acc) {
            *o = hsum(_mm256_add_ps(a[0], a[1]));
        }
    }
}
