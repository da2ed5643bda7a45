// Activation quantisation for kedavra's int8 layers (kedavra/networks/int8.py), and the per-row epilogue.
//
// Levels: `bits` of them, 8 where the CPU sums u8 x s8 products exactly (VNNI, AMX-INT8), 7 where oneDNN's kernel adds
// pairs of products into a saturating int16 first (AVX2's vpmaddubsw: 2 x 127 x 127 fits in it, 2 x 255 x 127 does
// not); int8.py's activation_bits chooses. The largest level is top = 2^bits - 1 (255 or 127).
//
// quantise_u8: dynamic per-tensor uint8 quantisation (the 3x3 convolutions' inputs)
//
//   scale = (max(x_max, 0) - min(x_min, 0)) / top,   zero_point = round(-min(x_min, 0) / scale)
//   q     = clamp(round(x / scale) + zero_point, 0, top)            (round half to even, as nearbyint)
//
// so that x ≈ scale · (q - zero_point) with 0 exactly representable (asymmetric affine quantisation, Jacob et al.
// 2018, eq. 1). One pass finds the range (and, when asked, each channel's mean: x is then read as rows of C
// channels, channels-last), a second writes q; both read x (bf16 or fp32) in its own memory order, which is why x must
// be non-overlapping and dense and q must have x's strides (torch.empty_like keeps them): the i-th element in memory
// of x becomes the i-th element in memory of q, whatever the layout (channels-last included).
//
// quantise_rows_u8: dynamic per-row (per-token) symmetric quantisation (the inputs of linear layers and 1x1
// convolutions, rows of C contiguous values), optionally of the rows minus an estimate μ of each column's mean (over
// 256-511 evenly spaced rows: column_means); with h = 2^(bits-1) - 1 (127 or 63) and zero point h + 1 (128 or 64)
//
//   s[r] = max_c |x[r, c] - μ[c]| / h,   q[r, c] = clamp(round((x[r, c] - μ[c]) / s[r]), -h, h) + h + 1
//
// stored as uint8 with that fixed zero point: oneDNN's fast u8 x s8 kernels take it as a per-tensor zero point,
// and Σ (q - h - 1) q_w is the signed sum (its signed-int8 source runs a reference loop, measured 3,000x slower).
//
// scale_rows: the epilogue of a per-row product, out[r, o] = acc[r, o] · s[r] + b[o] (acc fp32 or bf16; out bf16,
// rounded once, or fp32).
//
// matvec_f32: W μ in float32 for a bf16 W (the centred rows' shift; torch's bf16 product would round it to bf16,
// the same rounding for every row of the output).
//
// Everything runs 8 floats at a time with AVX2 where the compiler targets it (scalar C++ elsewhere, and for the
// tails); OpenMP splits it over torch's threads.

#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace {

constexpr int64_t BLOCK = 4096;  // elements per OpenMP work item
constexpr int64_t SUM_BLOCK = 65536;  // elements per float32 partial sum of the channel means
constexpr int64_t MEAN_ROWS = 256;  // rows sampled, at least, for the per-row quantiser's column means

inline float bf16_to_float(uint16_t bits) {
    uint32_t wide = static_cast<uint32_t>(bits) << 16;  // bf16 is the top half of a float32
    float value;
    std::memcpy(&value, &wide, sizeof value);
    return value;
}

inline uint8_t level(float value, float inverse, float zero, float top) {
    return static_cast<uint8_t>(std::min(top, std::max(0.0f, std::nearbyint(value * inverse) + zero)));
}

#ifdef __AVX2__
inline __m256 load8(const uint16_t* bits) {  // 8 bf16 -> 8 float32
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bits)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
inline __m256 load8(const float* values) { return _mm256_loadu_ps(values); }

inline __m256i levels8(__m256 value, __m256 inverse, __m256 zero, __m256 top) {  // round(x / s) + zp in [0, top]
    const __m256 rounded = _mm256_round_ps(_mm256_mul_ps(value, inverse), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 clamped = _mm256_min_ps(top, _mm256_max_ps(_mm256_setzero_ps(), _mm256_add_ps(rounded, zero)));
    return _mm256_cvtps_epi32(clamped);
}
#endif

template <typename T>
inline float load(const T* x, int64_t i) {
    if constexpr (std::is_same_v<T, uint16_t>) return bf16_to_float(x[i]);
    else return x[i];
}

#ifdef __AVX2__
inline void store16(uint8_t* q, __m256i a, __m256i b) {  // 2 x 8 int32 levels in [0, 255] -> 16 bytes in order
    // int32 -> uint16 -> uint8 packs work per 128-bit lane: the permutation puts the 16 bytes back in order
    const __m256i bytes = _mm256_packus_epi16(_mm256_packus_epi32(a, b), _mm256_setzero_si256());
    const __m256i ordered = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm256_castsi256_si128(ordered));
}

inline float horizontal(__m256 v, bool maximum) {  // the max (or min) of 8 lanes
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, v);
    float out = lanes[0];
    for (int j = 1; j < 8; ++j) out = maximum ? std::max(out, lanes[j]) : std::min(out, lanes[j]);
    return out;
}

struct Range8 {  // a running min and max, 8 lanes at a time, folded into (low, high) at the end
    __m256 lows = _mm256_setzero_ps(), highs = _mm256_setzero_ps();
    void add(__m256 value) {
        lows = _mm256_min_ps(lows, value);
        highs = _mm256_max_ps(highs, value);
    }
    void fold(float& low, float& high) const {
        low = std::min(low, horizontal(lows, false));
        high = std::max(high, horizontal(highs, true));
    }
};
#endif

inline void widen(float& low, float& high, float value) {
    low = std::min(low, value);
    high = std::max(high, value);
}

template <typename T>
void write_levels(const T* x, int64_t begin, int64_t end, uint8_t* q, float inverse, float zero, float top) {
    int64_t i = begin;
#ifdef __AVX2__
    const __m256 inverses = _mm256_set1_ps(inverse), zeros = _mm256_set1_ps(zero), tops = _mm256_set1_ps(top);
    for (; i + 16 <= end; i += 16) {
        store16(q + i, levels8(load8(x + i), inverses, zeros, tops), levels8(load8(x + i + 8), inverses, zeros, tops));
    }
#endif
    for (; i < end; ++i) q[i] = level(load(x, i), inverse, zero, top);
}

// The range of x (always holding 0), flat, in blocks of BLOCK elements.
template <typename T>
void range(const T* x, int64_t n, float& low, float& high) {
    const int64_t blocks = (n + BLOCK - 1) / BLOCK;
#pragma omp parallel for num_threads(at::get_num_threads()) reduction(min : low) reduction(max : high)
    for (int64_t block = 0; block < blocks; ++block) {
        int64_t i = block * BLOCK;
        const int64_t end = std::min(n, i + BLOCK);
#ifdef __AVX2__
        Range8 lanes;
        for (; i + 8 <= end; i += 8) lanes.add(load8(x + i));
        lanes.fold(low, high);
#endif
        for (; i < end; ++i) widen(low, high, load(x, i));
    }
}

// The same range, reading x as rows of C channels (row r at x + r * stride), and each channel's sum over the rows
// into sums (C doubles).
template <typename T>
void range_and_sums(const T* x, int64_t rows, int64_t C, int64_t stride, float& low, float& high, double* sums) {
    // float32 sums over blocks of SUM_BLOCK values (a few hundred rows), then float64 across blocks
    const int64_t per_block = std::max<int64_t>(1, SUM_BLOCK / C), blocks = (rows + per_block - 1) / per_block;
#pragma omp parallel num_threads(at::get_num_threads()) reduction(min : low) reduction(max : high)
    {
        std::vector<float> block_sums(C);
        float* mine = block_sums.data();
        std::vector<double> total(C, 0.0);
#pragma omp for
        for (int64_t block = 0; block < blocks; ++block) {
            std::fill(mine, mine + C, 0.0f);
            const int64_t end = std::min(rows, (block + 1) * per_block);
            for (int64_t r = block * per_block; r < end; ++r) {
                const T* row = x + r * stride;
                int64_t c = 0;
#ifdef __AVX2__
                Range8 lanes;
                for (; c + 8 <= C; c += 8) {
                    const __m256 value = load8(row + c);
                    lanes.add(value);
                    _mm256_storeu_ps(mine + c, _mm256_add_ps(_mm256_loadu_ps(mine + c), value));
                }
                lanes.fold(low, high);
#endif
                for (; c < C; ++c) {
                    widen(low, high, load(row, c));
                    mine[c] += load(row, c);
                }
            }
            for (int64_t c = 0; c < C; ++c) total[c] += mine[c];
        }
#pragma omp critical
        for (int64_t c = 0; c < C; ++c) sums[c] += total[c];
    }
}

// The range of the rows r = 0, step, 2 step, ... of x (rows of C) and each column's mean over them.
template <typename T>
void range_and_means(const T* x, int64_t rows, int64_t C, int64_t step, float& low, float& high, float* means) {
    const int64_t sampled = (rows + step - 1) / step;
    std::vector<double> sums(C, 0.0);
    range_and_sums(x, sampled, C, step * C, low, high, sums.data());
    for (int64_t c = 0; c < C; ++c) means[c] = static_cast<float>(sums[c] / static_cast<double>(sampled));
}

// Each column's mean over the rows r = 0, k, 2k, ... with k = max(1, rows / MEAN_ROWS): 256 to 511 of them (all of
// them below 512), an estimate that reads a fraction of a large x (the rows are centred on it, so it need not be
// exact).
template <typename T>
void column_means(const T* x, int64_t rows, int64_t C, float* means) {
    float low = 0.0f, high = 0.0f;
    range_and_means(x, rows, C, std::max<int64_t>(1, rows / MEAN_ROWS), low, high, means);
}

template <typename T>
std::tuple<double, int64_t> quantise(const T* x, int64_t n, uint8_t* q, int64_t C, float* means, int64_t top) {
    float low = 0.0f, high = 0.0f;  // the range always holds 0
    if (C > 0) range_and_means(x, n / C, C, 1, low, high, means);
    else range(x, n, low, high);
    const double scale = std::max((static_cast<double>(high) - low) / static_cast<double>(top), 1e-12);
    const int64_t zero_point = std::clamp<int64_t>(std::llround(-low / scale), 0, top);
    const float inverse = static_cast<float>(1.0 / scale), zero = static_cast<float>(zero_point);
    const int64_t blocks = (n + BLOCK - 1) / BLOCK;
#pragma omp parallel for num_threads(at::get_num_threads())
    for (int64_t block = 0; block < blocks; ++block) {
        write_levels(x, block * BLOCK, std::min(n, (block + 1) * BLOCK), q, inverse, zero, static_cast<float>(top));
    }
    return {scale, zero_point};
}

template <typename T>
void quantise_rows(const T* x, int64_t rows, int64_t C, uint8_t* q, float* scales, const float* means, int64_t half) {
    const float h = static_cast<float>(half), zero = h + 1.0f, top = 2.0f * h + 1.0f;
    const int64_t per_block = std::max<int64_t>(1, BLOCK / C), blocks = (rows + per_block - 1) / per_block;
#pragma omp parallel num_threads(at::get_num_threads())
    {
        std::vector<float> centred(C);  // the row minus the means, when there are means
#pragma omp for
        for (int64_t block = 0; block < blocks; ++block) {
            const int64_t end = std::min(rows, (block + 1) * per_block);
            for (int64_t r = block * per_block; r < end; ++r) {
                const T* row = x + r * C;
                float amax = 0.0f;
                int64_t c = 0;
#ifdef __AVX2__
                const __m256 sign = _mm256_set1_ps(-0.0f);
                __m256 highs = _mm256_setzero_ps();
                for (; c + 8 <= C; c += 8) {
                    __m256 value = load8(row + c);
                    if (means) {
                        value = _mm256_sub_ps(value, _mm256_loadu_ps(means + c));
                        _mm256_storeu_ps(centred.data() + c, value);
                    }
                    highs = _mm256_max_ps(highs, _mm256_andnot_ps(sign, value));
                }
                amax = horizontal(highs, true);
#endif
                for (; c < C; ++c) {
                    float value = load(row, c);
                    if (means) centred[c] = value = value - means[c];
                    amax = std::max(amax, std::fabs(value));
                }
                const float scale = std::max(amax / h, 1e-12f);
                scales[r] = scale;
                if (means) write_levels(centred.data(), 0, C, q + r * C, 1.0f / scale, zero, top);
                else write_levels(row, 0, C, q + r * C, 1.0f / scale, zero, top);
            }
        }
    }
}

inline uint16_t float_to_bf16(float value) {  // round to nearest even; NaN stays a quiet NaN
    uint32_t bits;
    std::memcpy(&bits, &value, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);
    return static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

#ifdef __AVX2__
inline __m128i bf16x8(__m256 value) {  // 8 float32 -> 8 bf16, round to nearest even, NaN kept a quiet NaN
    const __m256i bits = _mm256_castps_si256(value);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff))), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(value, value, _CMP_UNORD_Q));
    const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(0x40));
    rounded = _mm256_blendv_epi8(rounded, quiet, nan);
    const __m256i packed = _mm256_packus_epi32(rounded, _mm256_setzero_si256());  // per lane: 4 uint16, 4 zeros
    return _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0b1000));
}
#endif

#ifdef __AVX2__
inline void store8(uint16_t* out, __m256 value) { _mm_storeu_si128(reinterpret_cast<__m128i*>(out), bf16x8(value)); }
inline void store8(float* out, __m256 value) { _mm256_storeu_ps(out, value); }
#endif
inline void store1(uint16_t* out, float value) { *out = float_to_bf16(value); }
inline void store1(float* out, float value) { *out = value; }

template <typename T, typename U>
void scale_rows(const T* acc, int64_t rows, int64_t O, const float* scales, const float* bias, U* out) {
    const int64_t per_block = std::max<int64_t>(1, BLOCK / O), blocks = (rows + per_block - 1) / per_block;
#pragma omp parallel for num_threads(at::get_num_threads())
    for (int64_t block = 0; block < blocks; ++block) {
        const int64_t end = std::min(rows, (block + 1) * per_block);
        for (int64_t r = block * per_block; r < end; ++r) {
            const T* in = acc + r * O;
            U* row = out + r * O;
            const float s = scales[r];
            int64_t o = 0;
#ifdef __AVX2__
            const __m256 ss = _mm256_set1_ps(s);
            for (; o + 8 <= O; o += 8) {
                const __m256 b = bias ? _mm256_loadu_ps(bias + o) : _mm256_setzero_ps();
                store8(row + o, _mm256_fmadd_ps(load8(in + o), ss, b));
            }
#endif
            for (; o < O; ++o) store1(row + o, std::fma(load(in, o), s, bias ? bias[o] : 0.0f));
        }
    }
}

template <typename T>
void matrix_vector(const T* w, int64_t O, int64_t C, const float* v, float* out) {  // out = W v, float32 sums
#pragma omp parallel for num_threads(at::get_num_threads())
    for (int64_t o = 0; o < O; ++o) {
        const T* row = w + o * C;
        float sum = 0.0f;
        int64_t c = 0;
#ifdef __AVX2__
        __m256 sums = _mm256_setzero_ps();
        for (; c + 8 <= C; c += 8) sums = _mm256_fmadd_ps(load8(row + c), _mm256_loadu_ps(v + c), sums);
        alignas(32) float lanes[8];
        _mm256_store_ps(lanes, sums);
        for (int j = 0; j < 8; ++j) sum += lanes[j];
#endif
        for (; c < C; ++c) sum += load(row, c) * v[c];
        out[o] = sum;
    }
}

void check_dense(const torch::Tensor& x, const char* name) {
    TORCH_CHECK(x.device().is_cpu(), name, ": CPU tensors only");
    TORCH_CHECK(x.is_non_overlapping_and_dense(), name, ": x must be non-overlapping and dense");
    TORCH_CHECK(x.scalar_type() == torch::kBFloat16 || x.scalar_type() == torch::kFloat, name,
                ": x must be bf16 or fp32");
}

// f(elements) with t's elements as bf16 bits (const uint16_t*) or fp32 (const float*), whichever t holds.
template <typename F>
auto with_elements(const torch::Tensor& t, F&& f) {
    if (t.scalar_type() == torch::kBFloat16) return f(reinterpret_cast<const uint16_t*>(t.data_ptr()));
    return f(static_cast<const float*>(t.data_ptr<float>()));
}

}  // namespace

// x: bf16 or fp32, non-overlapping and dense; q: uint8, x's shape and strides; means: float32 of C values (x read as
// rows of C, channels-last) or empty; bits: of the levels, 2 to 8. Returns (scale, zero_point); fills means when it
// has values.
std::tuple<double, int64_t> quantise_u8(const torch::Tensor& x, torch::Tensor& q, torch::Tensor& means, int64_t bits) {
    check_dense(x, "quantise_u8");
    TORCH_CHECK(bits >= 2 && bits <= 8, "quantise_u8: bits must be 2 to 8, got ", bits);
    const int64_t top = (int64_t{1} << bits) - 1;
    TORCH_CHECK(q.scalar_type() == torch::kUInt8 && q.sizes() == x.sizes() && q.strides() == x.strides(),
                "quantise_u8: q must be uint8 with x's shape and strides");
    const int64_t n = x.numel(), C = means.numel();
    TORCH_CHECK(means.scalar_type() == torch::kFloat && means.is_contiguous() && (C == 0 || n % C == 0),
                "quantise_u8: means must be float32 with a number of values dividing x's");
    uint8_t* out = q.data_ptr<uint8_t>();
    float* m = C > 0 ? means.data_ptr<float>() : nullptr;
    return with_elements(x, [&](const auto* elements) { return quantise(elements, n, out, C, m, top); });
}

// x: (N, C) bf16 or fp32, contiguous; q: (N, C) uint8; scales: (N,) float32; means: empty, or (C,) float32 to be
// filled with each column's mean over evenly spaced rows (column_means), which is then taken from every row before
// it is quantised; bits: of the levels, 2 to 8 (levels -h..h, h = 2^(bits-1) - 1, stored with zero point h + 1).
void quantise_rows_u8(const torch::Tensor& x, torch::Tensor& q, torch::Tensor& scales, torch::Tensor& means,
                      int64_t bits) {
    check_dense(x, "quantise_rows_u8");
    TORCH_CHECK(bits >= 2 && bits <= 8, "quantise_rows_u8: bits must be 2 to 8, got ", bits);
    const int64_t half = (int64_t{1} << (bits - 1)) - 1;
    TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "quantise_rows_u8: x must be (N, C) and contiguous");
    TORCH_CHECK(q.scalar_type() == torch::kUInt8 && q.sizes() == x.sizes() && q.is_contiguous(),
                "quantise_rows_u8: q must be contiguous uint8 of x's shape");
    TORCH_CHECK(scales.scalar_type() == torch::kFloat && scales.is_contiguous() && scales.numel() == x.size(0),
                "quantise_rows_u8: scales must be float32 with one value per row");
    const int64_t rows = x.size(0), C = x.size(1);
    TORCH_CHECK(means.scalar_type() == torch::kFloat && means.is_contiguous() && (means.numel() == 0 ||
                                                                                   means.numel() == C),
                "quantise_rows_u8: means must be empty or float32 with one value per column");
    if (rows == 0 || C == 0) return;
    const bool centre = means.numel() > 0;
    float* m = centre ? means.data_ptr<float>() : nullptr;
    with_elements(x, [&](const auto* elements) {
        if (centre) column_means(elements, rows, C, m);
        quantise_rows(elements, rows, C, q.data_ptr<uint8_t>(), scales.data_ptr<float>(), m, half);
    });
}

// acc: (N, O) fp32 or bf16, contiguous; scales: (N,) float32; bias: (O,) float32 or empty; out: (N, O) bf16 or fp32,
// contiguous (it may be acc itself when they share a dtype).
void scale_rows_into(const torch::Tensor& acc, const torch::Tensor& scales, const torch::Tensor& bias,
                     torch::Tensor& out) {
    check_dense(acc, "scale_rows");
    TORCH_CHECK(acc.dim() == 2 && acc.is_contiguous(), "scale_rows: acc must be (N, O) and contiguous");
    TORCH_CHECK((out.scalar_type() == torch::kBFloat16 || out.scalar_type() == torch::kFloat) &&
                    out.sizes() == acc.sizes() && out.is_contiguous(),
                "scale_rows: out must be contiguous bf16 or fp32 of acc's shape");
    TORCH_CHECK(scales.scalar_type() == torch::kFloat && scales.is_contiguous() && scales.numel() == acc.size(0),
                "scale_rows: scales must be float32 with one value per row");
    TORCH_CHECK(bias.numel() == 0 || (bias.scalar_type() == torch::kFloat && bias.is_contiguous() &&
                                      bias.numel() == acc.size(1)),
                "scale_rows: bias must be empty or float32 with one value per column");
    const int64_t rows = acc.size(0), O = acc.size(1);
    if (rows == 0 || O == 0) return;
    const float* b = bias.numel() ? bias.data_ptr<float>() : nullptr;
    const float* s = scales.data_ptr<float>();
    with_elements(acc, [&](const auto* elements) {
        if (out.scalar_type() == torch::kFloat) scale_rows(elements, rows, O, s, b, out.data_ptr<float>());
        else scale_rows(elements, rows, O, s, b, reinterpret_cast<uint16_t*>(out.data_ptr()));
    });
}

// w: (O, C) bf16 or fp32, contiguous; v: (C,) float32. Returns W v in float32 (O,), summed in float32.
torch::Tensor matvec_f32(const torch::Tensor& w, const torch::Tensor& v) {
    check_dense(w, "matvec_f32");
    TORCH_CHECK(w.dim() == 2 && w.is_contiguous(), "matvec_f32: w must be (O, C) and contiguous");
    TORCH_CHECK(v.scalar_type() == torch::kFloat && v.is_contiguous() && v.numel() == w.size(1),
                "matvec_f32: v must be float32 with one value per column of w");
    auto out = torch::empty({w.size(0)}, torch::kFloat);
    with_elements(w, [&](const auto* elements) {
        matrix_vector(elements, w.size(0), w.size(1), v.data_ptr<float>(), out.data_ptr<float>());
    });
    return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("quantise_u8", &quantise_u8, "dynamic per-tensor uint8 quantisation of x into q, levels 0..2^bits - 1");
    m.def("quantise_rows_u8", &quantise_rows_u8, "dynamic per-row symmetric quantisation, levels -h..h + h + 1");
    m.def("scale_rows", &scale_rows_into, "out = acc * scales[:, None] + bias, out bf16 (rounded once) or fp32");
    m.def("matvec_f32", &matvec_f32, "W v in float32 for a bf16 or fp32 W");
}
