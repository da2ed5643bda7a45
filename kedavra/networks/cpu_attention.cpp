// Exact attention for CPUs with AVX-512 BF16 (and no AMX): softmax(Q K^T * scale) V per head, bf16 in and out,
// float32 accumulation, never holding the score matrix. Built at first use by kedavra/networks/cpu_attention.py,
// which documents when it runs, how it is checked and what it measures.
//
// The blocking is FlashAttention's (Dao et al. 2022, "FlashAttention: Fast and Memory-Efficient Exact Attention
// with IO-Awareness", Algorithm 1): a block of BQ queries walks the keys BK at a time, keeping each row's running
// maximum m, running sum l and unnormalised output; the online softmax rescales them by exp(m_old - m_new) when
// the maximum grows (Milakov & Gimelshein 2018, "Online normalizer calculation for softmax", Alg. 3). Both
// products run on vdpbf16ps (bf16 pairs, float32 sums), the probabilities are rounded to bf16 before P V (as
// PyTorch's CPU flash kernel does), and exp is 2^x through a degree-5 polynomial and vscalefps.
//
// Layouts (bf16):
//   q    (B, H, S, D) with any strides but a contiguous last dimension; D even
//   kp   (B*H, Lp/16, D/2, 16, 2): per block of 16 keys, for each pair of dimensions, the 16 keys' pairs, so one
//        512-bit load holds one dimension pair of 16 keys (Lp = keys padded to a multiple of BK, zeros)
//   vp   (B*H, Lp/2, Dv, 2): per pair of keys, each dimension's two values (Dv = D padded to a multiple of 16)
//   out  (B, S, H, D) contiguous, so merging the heads afterwards is a view
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace {

constexpr int BQ = 32;   // queries per task
constexpr int BK = 256;  // keys per block of the online softmax

// 2^t for t <= 0, |relative error| < 2e-7 on [0, 1) before rounding to bf16: t = n + f, 2^f by a degree-5
// polynomial (Horner), times 2^n by vscalefps. Inputs below -126 give about 2^-126 (0 once rounded to bf16).
inline __m512 exp2_ps(__m512 t) {
  t = _mm512_max_ps(t, _mm512_set1_ps(-126.f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.8775767e-3f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(8.9893397e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5826318e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4015361e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9315308e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.9999994e-1f));
  return _mm512_scalef_ps(p, n);
}

// The bf16 pair at p in all 16 lanes.
inline __m512bh broadcast_pair(const at::BFloat16* p) {
  int32_t bits;
  std::memcpy(&bits, p, sizeof(bits));
  return (__m512bh)_mm512_set1_epi32(bits);
}

// s[4 rows][64 keys] = (q rows . keys) * c, rows r0..r0+3 (q_rows[x] points at row x's D values).
inline void scores_tile(const at::BFloat16* const q_rows[4], const at::BFloat16* k, int64_t pairs, float c,
                        float* s) {
  __m512 acc[4][4];
  for (int x = 0; x < 4; ++x)
    for (int y = 0; y < 4; ++y) acc[x][y] = _mm512_setzero_ps();
  for (int64_t d2 = 0; d2 < pairs; ++d2) {
    __m512bh keys[4];
    for (int y = 0; y < 4; ++y) keys[y] = (__m512bh)_mm512_loadu_si512(k + (y * pairs + d2) * 32);
    for (int x = 0; x < 4; ++x) {
      const __m512bh query = broadcast_pair(q_rows[x] + 2 * d2);
      for (int y = 0; y < 4; ++y) acc[x][y] = _mm512_dpbf16_ps(acc[x][y], query, keys[y]);
    }
  }
  const __m512 scale = _mm512_set1_ps(c);
  for (int x = 0; x < 4; ++x)
    for (int y = 0; y < 4; ++y) _mm512_storeu_ps(s + x * BK + 16 * y, _mm512_mul_ps(acc[x][y], scale));
}

// o[4 rows][NV*16] += p[4 rows][BK] . v[BK][NV*16], v in key pairs: element (k2, d) at v[(k2 * Dv + d) * 2].
template <int NV>
inline void output_tile(float* o, int64_t o_stride, const at::BFloat16* p, const at::BFloat16* v, int64_t Dv) {
  __m512 acc[4][NV];
  for (int x = 0; x < 4; ++x)
    for (int y = 0; y < NV; ++y) acc[x][y] = _mm512_loadu_ps(o + x * o_stride + y * 16);
  for (int64_t k2 = 0; k2 < BK / 2; ++k2) {
    __m512bh values[NV];
    for (int y = 0; y < NV; ++y) values[y] = (__m512bh)_mm512_loadu_si512(v + (k2 * Dv + y * 16) * 2);
    for (int x = 0; x < 4; ++x) {
      const __m512bh probs = broadcast_pair(p + x * BK + 2 * k2);
      for (int y = 0; y < NV; ++y) acc[x][y] = _mm512_dpbf16_ps(acc[x][y], probs, values[y]);
    }
  }
  for (int x = 0; x < 4; ++x)
    for (int y = 0; y < NV; ++y) _mm512_storeu_ps(o + x * o_stride + y * 16, acc[x][y]);
}

}  // namespace

// out (B, S, H, D) = softmax(q k^T * scale) v over the first `keys` keys of kp / vp (see the layouts above).
void attention(const torch::Tensor& q, const torch::Tensor& kp, const torch::Tensor& vp, torch::Tensor& out,
               int64_t keys, double scale) {
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && kp.scalar_type() == at::kBFloat16 &&
                  vp.scalar_type() == at::kBFloat16 && out.scalar_type() == at::kBFloat16,
              "cpu_attention: bf16 tensors expected");
  TORCH_CHECK(q.dim() == 4 && q.stride(3) == 1 && q.size(3) % 2 == 0, "cpu_attention: q (B, H, S, D), D even");
  TORCH_CHECK(kp.is_contiguous() && vp.is_contiguous() && out.is_contiguous(), "cpu_attention: packed layouts");
  const int64_t B = q.size(0), H = q.size(1), S = q.size(2), D = q.size(3), pairs = D / 2;
  const int64_t Lp = kp.size(1) * 16, Dv = vp.size(2), DV = Dv / 16;
  TORCH_CHECK(kp.size(0) == B * H && kp.size(2) == pairs && Lp % BK == 0 && keys > 0 && keys <= Lp,
              "cpu_attention: kp does not match q");
  TORCH_CHECK(vp.size(0) == B * H && vp.size(1) * 2 == Lp && Dv % 16 == 0 && Dv >= D,
              "cpu_attention: vp does not match kp");
  const int64_t sb = q.stride(0), sh = q.stride(1), ss = q.stride(2);
  const at::BFloat16* Q = q.data_ptr<at::BFloat16>();
  const at::BFloat16* K = kp.data_ptr<at::BFloat16>();
  const at::BFloat16* V = vp.data_ptr<at::BFloat16>();
  at::BFloat16* O = out.data_ptr<at::BFloat16>();
  const int64_t blocks = (S + BQ - 1) / BQ;
  const float c = static_cast<float>(scale) * 1.4426950408889634f;  // scores in base 2: e^x = 2^(x log2 e)

  at::parallel_for(0, B * H * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> s(BQ * BK), o(BQ * Dv);
    std::vector<at::BFloat16> p(BQ * BK);
    float m[BQ], l[BQ];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / blocks, b = bh / H, h = bh % H, q0 = (task % blocks) * BQ;
      const int rows = static_cast<int>(std::min<int64_t>(BQ, S - q0));
      const at::BFloat16* k_head = K + bh * Lp * D;
      const at::BFloat16* v_head = V + bh * Lp * Dv;
      const at::BFloat16* q_row[BQ];
      for (int r = 0; r < BQ; ++r) q_row[r] = Q + b * sb + h * sh + (q0 + std::min(r, rows - 1)) * ss;
      std::fill(m, m + BQ, -INFINITY);
      std::fill(l, l + BQ, 0.f);
      std::fill(o.begin(), o.end(), 0.f);
      for (int64_t k0 = 0; k0 < keys; k0 += BK) {
        const int64_t valid = std::min<int64_t>(BK, keys - k0);
        for (int r = 0; r < rows; r += 4)  // rows past `rows` repeat the last one and are never written out
          for (int64_t j = 0; j < BK; j += 64) scores_tile(q_row + r, k_head + (k0 + j) * D, pairs, c, &s[r * BK + j]);
        for (int r = 0; r < rows; ++r) {
          float* row = &s[r * BK];
          std::fill(row + valid, row + BK, -INFINITY);  // padding keys
          __m512 peak = _mm512_set1_ps(-INFINITY);
          for (int j = 0; j < BK; j += 16) peak = _mm512_max_ps(peak, _mm512_loadu_ps(row + j));
          const float m_new = std::max(m[r], _mm512_reduce_max_ps(peak));
          const float alpha = std::exp2(m[r] - m_new);  // rescales what the earlier blocks summed
          m[r] = m_new;
          const __m512 shift = _mm512_set1_ps(m_new);
          __m512 sum = _mm512_setzero_ps();
          for (int j = 0; j < BK; j += 16) {
            const __m256bh e = _mm512_cvtneps_pbh(exp2_ps(_mm512_sub_ps(_mm512_loadu_ps(row + j), shift)));
            sum = _mm512_add_ps(sum, _mm512_cvtpbh_ps(e));  // l sums the probabilities P V multiplies
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(&p[r * BK + j]), (__m256i)e);
          }
          l[r] = l[r] * alpha + _mm512_reduce_add_ps(sum);
          if (alpha != 1.f) {
            const __m512 a = _mm512_set1_ps(alpha);
            for (int64_t d = 0; d < Dv; d += 16)
              _mm512_storeu_ps(&o[r * Dv + d], _mm512_mul_ps(a, _mm512_loadu_ps(&o[r * Dv + d])));
          }
        }
        const at::BFloat16* v_block = v_head + k0 * Dv;  // (k0 / 2) key pairs of Dv * 2 values
        for (int r = 0; r < rows; r += 4) {
          float* o_rows = &o[r * Dv];
          const at::BFloat16* p_rows = &p[r * BK];
          int64_t d = 0;
          if (DV % 4 == 0)
            for (; d < DV; d += 4) output_tile<4>(o_rows + d * 16, Dv, p_rows, v_block + d * 32, Dv);
          for (; d + 3 <= DV; d += 3) output_tile<3>(o_rows + d * 16, Dv, p_rows, v_block + d * 32, Dv);
          if (DV - d == 2) output_tile<2>(o_rows + d * 16, Dv, p_rows, v_block + d * 32, Dv);
          if (DV - d == 1) output_tile<1>(o_rows + d * 16, Dv, p_rows, v_block + d * 32, Dv);
        }
      }
      for (int r = 0; r < rows; ++r) {
        const float inv = 1.f / l[r];
        at::BFloat16* out_row = O + ((b * S + q0 + r) * H + h) * D;
        for (int64_t d = 0; d < D; ++d) out_row[d] = at::BFloat16(o[r * Dv + d] * inv);
      }
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("attention", &attention, "softmax(q k^T * scale) v, bf16, AVX-512 BF16 (kedavra/networks/cpu_attention.py)");
}
