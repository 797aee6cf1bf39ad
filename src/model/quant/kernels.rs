//! Dot products of one quantized weight row with a few f32 activation rows, and dequantization.
//!
//! The weights are dequantized on the fly inside registers and multiplied with f32 activations,
//! so results match "dequantize, then f32 matmul" up to summation order (unlike kernels that
//! quantize activations to 8 bits). Blocks arrive split into f32 scales and packed quants (see
//! `QMatrix`), so a scale is one broadcast load. AVX-512 and AVX2 paths are chosen at run time;
//! the scalar path is the reference and the fallback elsewhere.

use super::QType;

/// Activation rows handled per pass over a weight row.
pub const ROWS_PER_PASS: usize = 4;

/// For each weight row `r` of a run of rows (`scales`, `quants`) and each activation row `i`
/// of `xs` (`[m, cols]`): `out[r * m + i] = dot(dequant(row r), xs[i])`.
pub fn dot_chunk(
    qtype: QType,
    scales: &[f32],
    quants: &[u8],
    xs: &[f32],
    m: usize,
    cols: usize,
    out: &mut [f32],
) {
    let nb = cols / 32;
    let (sn, qn) = (nb * qtype.scales_per_block(), nb * qtype.quant_bytes());
    let rows = out.len() / m;
    assert!(scales.len() == rows * sn && quants.len() == rows * qn && xs.len() == m * cols);
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: the CPU features were checked at run time; the lengths were asserted above.
        if avx512::available() {
            unsafe { avx512::dot_chunk(qtype, scales, quants, xs, m, cols, out) };
            return;
        }
        if avx2::available() {
            unsafe { avx2::dot_chunk(qtype, scales, quants, xs, m, cols, out) };
            return;
        }
    }
    dot_chunk_scalar(qtype, scales, quants, xs, m, cols, out);
}

/// The reference for [`dot_chunk`].
pub fn dot_chunk_scalar(
    qtype: QType,
    scales: &[f32],
    quants: &[u8],
    xs: &[f32],
    m: usize,
    cols: usize,
    out: &mut [f32],
) {
    let nb = cols / 32;
    let (sn, qn) = (nb * qtype.scales_per_block(), nb * qtype.quant_bytes());
    for (r, o) in out.chunks_exact_mut(m).enumerate() {
        let (s, q) = (&scales[r * sn..(r + 1) * sn], &quants[r * qn..(r + 1) * qn]);
        for (p, opass) in o.chunks_mut(ROWS_PER_PASS).enumerate() {
            dot_rows_scalar(qtype, s, q, &xs[p * ROWS_PER_PASS * cols..], cols, opass);
        }
    }
}

pub fn dot_rows_scalar(
    qtype: QType,
    scales: &[f32],
    quants: &[u8],
    xs: &[f32],
    cols: usize,
    out: &mut [f32],
) {
    let mut block = [0f32; 32];
    out.fill(0.0);
    for b in 0..cols / 32 {
        dequantize_block(qtype, scales, quants, b, &mut block);
        for (i, o) in out.iter_mut().enumerate() {
            let x = &xs[i * cols + b * 32..i * cols + b * 32 + 32];
            *o += block.iter().zip(x).map(|(w, x)| w * x).sum::<f32>();
        }
    }
}

/// Dequantizes block `b` exactly as ggml does.
pub fn dequantize_block(
    qtype: QType,
    scales: &[f32],
    quants: &[u8],
    b: usize,
    out: &mut [f32; 32],
) {
    let q = &quants[b * qtype.quant_bytes()..(b + 1) * qtype.quant_bytes()];
    match qtype {
        QType::Q4_0 => {
            let d = scales[b];
            for (j, &v) in q.iter().enumerate() {
                out[j] = ((v & 0x0f) as i32 - 8) as f32 * d;
                out[j + 16] = ((v >> 4) as i32 - 8) as f32 * d;
            }
        }
        QType::Q4_1 => {
            let (d, m) = (scales[2 * b], scales[2 * b + 1]);
            for (j, &v) in q.iter().enumerate() {
                out[j] = (v & 0x0f) as f32 * d + m;
                out[j + 16] = (v >> 4) as f32 * d + m;
            }
        }
        QType::Q8_0 => {
            let d = scales[b];
            for (o, &v) in out.iter_mut().zip(q) {
                *o = (v as i8) as f32 * d;
            }
        }
    }
}

/// Dequantizes whole blocks into `out` (32 values per block).
pub fn dequantize_blocks(qtype: QType, scales: &[f32], quants: &[u8], out: &mut [f32]) {
    let n = quants.len() / qtype.quant_bytes();
    debug_assert_eq!(n * 32, out.len());
    #[cfg(target_arch = "x86_64")]
    {
        if avx512::available() {
            // SAFETY: checked features; `out` holds 32 floats per block.
            unsafe { avx512::dequantize_blocks(qtype, scales, quants, out) };
            return;
        }
    }
    let mut block = [0f32; 32];
    for (b, o) in out.chunks_exact_mut(32).enumerate().take(n) {
        dequantize_block(qtype, scales, quants, b, &mut block);
        o.copy_from_slice(&block);
    }
}

const Q4_0: u8 = 0;
const Q4_1: u8 = 1;
const Q8_0: u8 = 2;

/// The per-ISA entry point: `dot_chunk` walks the weight rows of a chunk and the activation rows
/// in passes of up to `ROWS_PER_PASS`, calling that module's `rows::<M, Q>` kernel. Expanded in
/// each SIMD module so every level is compiled with the module's target features.
macro_rules! row_dispatch {
    ($features:literal) => {
        #[target_feature(enable = $features)]
        pub unsafe fn dot_chunk(
            qtype: QType,
            s: &[f32],
            q: &[u8],
            xs: &[f32],
            m: usize,
            cols: usize,
            out: &mut [f32],
        ) {
            match qtype {
                QType::Q4_0 => chunk::<Q4_0>(s, q, xs, m, cols, out),
                QType::Q4_1 => chunk::<Q4_1>(s, q, xs, m, cols, out),
                QType::Q8_0 => chunk::<Q8_0>(s, q, xs, m, cols, out),
            }
        }

        #[target_feature(enable = $features)]
        #[inline]
        unsafe fn chunk<const Q: u8>(
            s: &[f32],
            q: &[u8],
            xs: &[f32],
            m: usize,
            cols: usize,
            out: &mut [f32],
        ) {
            let nb = cols / 32;
            let sn = nb * if Q == Q4_1 { 2 } else { 1 };
            let qn = nb * if Q == Q8_0 { 32 } else { 16 };
            for (r, o) in out.chunks_exact_mut(m).enumerate() {
                let (s, q) = (&s[r * sn..(r + 1) * sn], &q[r * qn..(r + 1) * qn]);
                for (p, opass) in o.chunks_mut(ROWS_PER_PASS).enumerate() {
                    let x = &xs[p * ROWS_PER_PASS * cols..];
                    match opass.len() {
                        0 => {}
                        1 => rows::<1, Q>(s, q, x, cols, opass),
                        2 => rows::<2, Q>(s, q, x, cols, opass),
                        3 => rows::<3, Q>(s, q, x, cols, opass),
                        _ => rows::<ROWS_PER_PASS, Q>(s, q, x, cols, opass),
                    }
                }
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{QType, Q4_0, Q4_1, Q8_0, ROWS_PER_PASS};
    use std::arch::x86_64::*;
    use std::sync::OnceLock;

    pub fn available() -> bool {
        static OK: OnceLock<bool> = OnceLock::new();
        *OK.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
    }

    row_dispatch!("avx2,fma");

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn u8x8(v: __m128i) -> __m256 {
        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v))
    }

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn i8x8(p: *const u8) -> __m256 {
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p as *const __m128i)))
    }

    /// The 32 weights of block `b`, as four vectors in element order.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn block<const Q: u8>(s: *const f32, q: *const u8, b: usize) -> [__m256; 4] {
        if Q == Q8_0 {
            let d = _mm256_set1_ps(*s.add(b));
            let p = q.add(b * 32);
            return [
                _mm256_mul_ps(i8x8(p), d),
                _mm256_mul_ps(i8x8(p.add(8)), d),
                _mm256_mul_ps(i8x8(p.add(16)), d),
                _mm256_mul_ps(i8x8(p.add(24)), d),
            ];
        }
        let qs = _mm_loadu_si128(q.add(b * 16) as *const __m128i);
        let mask = _mm_set1_epi8(0x0f);
        let lo = _mm_and_si128(qs, mask);
        let hi = _mm_and_si128(_mm_srli_epi16(qs, 4), mask);
        let v = [
            u8x8(lo),
            u8x8(_mm_srli_si128(lo, 8)),
            u8x8(hi),
            u8x8(_mm_srli_si128(hi, 8)),
        ];
        let (d, m) = if Q == Q4_1 {
            (
                _mm256_set1_ps(*s.add(2 * b)),
                _mm256_set1_ps(*s.add(2 * b + 1)),
            )
        } else {
            // (q - 8) * d == q * d - 8d, with the same single rounding.
            (_mm256_set1_ps(*s.add(b)), _mm256_set1_ps(-8.0 * *s.add(b)))
        };
        [
            _mm256_fmadd_ps(v[0], d, m),
            _mm256_fmadd_ps(v[1], d, m),
            _mm256_fmadd_ps(v[2], d, m),
            _mm256_fmadd_ps(v[3], d, m),
        ]
    }

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn rows<const M: usize, const Q: u8>(
        s: &[f32],
        q: &[u8],
        xs: &[f32],
        cols: usize,
        out: &mut [f32],
    ) {
        let mut acc = [[_mm256_setzero_ps(); 2]; M];
        let (sp, qp, xp) = (s.as_ptr(), q.as_ptr(), xs.as_ptr());
        for b in 0..cols / 32 {
            let w = block::<Q>(sp, qp, b);
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

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{QType, Q4_0, Q4_1, Q8_0, ROWS_PER_PASS};
    use std::arch::x86_64::*;
    use std::sync::OnceLock;

    pub fn available() -> bool {
        static OK: OnceLock<bool> = OnceLock::new();
        *OK.get_or_init(|| is_x86_feature_detected!("avx512f"))
    }

    row_dispatch!("avx512f");

    #[target_feature(enable = "avx512f")]
    pub unsafe fn dequantize_blocks(qtype: QType, s: &[f32], q: &[u8], out: &mut [f32]) {
        match qtype {
            QType::Q4_0 => dequant::<Q4_0>(s, q, out),
            QType::Q4_1 => dequant::<Q4_1>(s, q, out),
            QType::Q8_0 => dequant::<Q8_0>(s, q, out),
        }
    }

    /// The 32 weights of block `b`, as two vectors of 16 in element order.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn block<const Q: u8>(s: *const f32, q: *const u8, b: usize) -> [__m512; 2] {
        if Q == Q8_0 {
            let d = _mm512_set1_ps(*s.add(b));
            let p = q.add(b * 32);
            let q0 = _mm_loadu_si128(p as *const __m128i);
            let q1 = _mm_loadu_si128(p.add(16) as *const __m128i);
            return [
                _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q0)), d),
                _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q1)), d),
            ];
        }
        // A 4-bit block has only 16 distinct weights: build them once (`table[v] = v*d + m`)
        // and look every nibble up with one permute, instead of converting and scaling each.
        let (d, m) = if Q == Q4_1 {
            (
                _mm512_set1_ps(*s.add(2 * b)),
                _mm512_set1_ps(*s.add(2 * b + 1)),
            )
        } else {
            // (q - 8) * d == q * d - 8d, with the same single rounding.
            (_mm512_set1_ps(*s.add(b)), _mm512_set1_ps(-8.0 * *s.add(b)))
        };
        let iota = _mm512_setr_ps(
            0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0, 15.0,
        );
        let table = _mm512_fmadd_ps(iota, d, m);
        // Each 32-bit lane holds one byte; the permute reads only its low 4 bits.
        let lo = _mm512_cvtepu8_epi32(_mm_loadu_si128(q.add(b * 16) as *const __m128i));
        let hi = _mm512_srli_epi32(lo, 4);
        [
            _mm512_permutexvar_ps(lo, table),
            _mm512_permutexvar_ps(hi, table),
        ]
    }

    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn dequant<const Q: u8>(s: &[f32], q: &[u8], out: &mut [f32]) {
        let (sp, qp, o) = (s.as_ptr(), q.as_ptr(), out.as_mut_ptr());
        for b in 0..out.len() / 32 {
            let w = block::<Q>(sp, qp, b);
            _mm512_storeu_ps(o.add(b * 32), w[0]);
            _mm512_storeu_ps(o.add(b * 32 + 16), w[1]);
        }
    }

    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn rows<const M: usize, const Q: u8>(
        s: &[f32],
        q: &[u8],
        xs: &[f32],
        cols: usize,
        out: &mut [f32],
    ) {
        let nb = cols / 32;
        // Four accumulators per activation row (two blocks per iteration) keep every FMA chain
        // at one link per iteration.
        let mut acc = [[_mm512_setzero_ps(); 4]; M];
        let (sp, qp, xp) = (s.as_ptr(), q.as_ptr(), xs.as_ptr());
        let mut b = 0;
        while b + 2 <= nb {
            let w0 = block::<Q>(sp, qp, b);
            let w1 = block::<Q>(sp, qp, b + 1);
            for (i, a) in acc.iter_mut().enumerate() {
                let x = xp.add(i * cols + b * 32);
                a[0] = _mm512_fmadd_ps(w0[0], _mm512_loadu_ps(x), a[0]);
                a[1] = _mm512_fmadd_ps(w0[1], _mm512_loadu_ps(x.add(16)), a[1]);
                a[2] = _mm512_fmadd_ps(w1[0], _mm512_loadu_ps(x.add(32)), a[2]);
                a[3] = _mm512_fmadd_ps(w1[1], _mm512_loadu_ps(x.add(48)), a[3]);
            }
            b += 2;
        }
        if b < nb {
            let w0 = block::<Q>(sp, qp, b);
            for (i, a) in acc.iter_mut().enumerate() {
                let x = xp.add(i * cols + b * 32);
                a[0] = _mm512_fmadd_ps(w0[0], _mm512_loadu_ps(x), a[0]);
                a[1] = _mm512_fmadd_ps(w0[1], _mm512_loadu_ps(x.add(16)), a[1]);
            }
        }
        for (o, a) in out.iter_mut().zip(acc) {
            let s = _mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3]));
            *o = _mm512_reduce_add_ps(s);
        }
    }
}
