// Dynamic per-tensor quantisation of activations to uint8 for kedavra's int8 layers (kedavra/networks/int8.py).
//
//   scale = (max(x_max, 0) - min(x_min, 0)) / 255,   zero_point = round(-min(x_min, 0) / scale)
//   q     = clamp(round(x / scale) + zero_point, 0, 255)            (round half to even, as nearbyint)
//
// so that x ≈ scale · (q - zero_point) with 0 exactly representable (asymmetric affine quantisation, Jacob et al.
// 2018, eq. 1). One pass finds the range, a second writes q; both read x (bf16 or fp32) in its own memory order,
// which is why x must be non-overlapping and dense and q must have x's strides (torch.empty_like keeps them): the
// i-th element in memory of x becomes the i-th element in memory of q, whatever the layout (channels-last included).
// Both passes run 8 floats at a time with AVX2 where the compiler targets it (scalar C++ elsewhere, and for the
// tail); OpenMP splits them over torch's threads in blocks of 4096 elements.

#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace {

constexpr int64_t BLOCK = 4096;  // elements per OpenMP work item

inline float bf16_to_float(uint16_t bits) {
    uint32_t wide = static_cast<uint32_t>(bits) << 16;  // bf16 is the top half of a float32
    float value;
    std::memcpy(&value, &wide, sizeof value);
    return value;
}

inline uint8_t level(float value, float inverse, float zero) {
    return static_cast<uint8_t>(std::min(255.0f, std::max(0.0f, std::nearbyint(value * inverse) + zero)));
}

#ifdef __AVX2__
inline __m256 load8(const uint16_t* bits) {  // 8 bf16 -> 8 float32
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bits)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
inline __m256 load8(const float* values) { return _mm256_loadu_ps(values); }

inline __m256i levels8(__m256 value, __m256 inverse, __m256 zero) {  // round(x / scale) + zp, clamped, as int32
    const __m256 rounded = _mm256_round_ps(_mm256_mul_ps(value, inverse), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 clamped = _mm256_min_ps(_mm256_set1_ps(255.0f), _mm256_max_ps(_mm256_setzero_ps(),
                                                                                  _mm256_add_ps(rounded, zero)));
    return _mm256_cvtps_epi32(clamped);
}
#endif

template <typename T>
inline float load(const T* x, int64_t i) {
    if constexpr (std::is_same_v<T, uint16_t>) return bf16_to_float(x[i]);
    else return x[i];
}

template <typename T>
std::tuple<double, int64_t> quantise(const T* x, int64_t n, uint8_t* q) {
    float low = 0.0f, high = 0.0f;  // the range always holds 0
    const int64_t blocks = (n + BLOCK - 1) / BLOCK;
#pragma omp parallel for num_threads(at::get_num_threads()) reduction(min : low) reduction(max : high)
    for (int64_t block = 0; block < blocks; ++block) {
        int64_t i = block * BLOCK;
        const int64_t end = std::min(n, i + BLOCK);
#ifdef __AVX2__
        __m256 lows = _mm256_setzero_ps(), highs = _mm256_setzero_ps();
        for (; i + 8 <= end; i += 8) {
            const __m256 value = load8(x + i);
            lows = _mm256_min_ps(lows, value);
            highs = _mm256_max_ps(highs, value);
        }
        alignas(32) float lane_low[8], lane_high[8];
        _mm256_store_ps(lane_low, lows);
        _mm256_store_ps(lane_high, highs);
        for (int j = 0; j < 8; ++j) {
            low = std::min(low, lane_low[j]);
            high = std::max(high, lane_high[j]);
        }
#endif
        for (; i < end; ++i) {
            low = std::min(low, load(x, i));
            high = std::max(high, load(x, i));
        }
    }
    const double scale = std::max((static_cast<double>(high) - low) / 255.0, 1e-12);
    const int64_t zero_point = std::clamp<int64_t>(std::llround(-low / scale), 0, 255);
    const float inverse = static_cast<float>(1.0 / scale), zero = static_cast<float>(zero_point);
#pragma omp parallel for num_threads(at::get_num_threads())
    for (int64_t block = 0; block < blocks; ++block) {
        int64_t i = block * BLOCK;
        const int64_t end = std::min(n, i + BLOCK);
#ifdef __AVX2__
        const __m256 inverses = _mm256_set1_ps(inverse), zeros = _mm256_set1_ps(zero);
        const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        for (; i + 16 <= end; i += 16) {
            const __m256i a = levels8(load8(x + i), inverses, zeros), b = levels8(load8(x + i + 8), inverses, zeros);
            // int32 -> uint16 -> uint8 packs work per 128-bit lane: the permutation puts the 16 bytes back in order
            const __m256i bytes = _mm256_packus_epi16(_mm256_packus_epi32(a, b), _mm256_setzero_si256());
            const __m256i ordered = _mm256_permutevar8x32_epi32(bytes, order);
            _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i), _mm256_castsi256_si128(ordered));
        }
#endif
        for (; i < end; ++i) q[i] = level(load(x, i), inverse, zero);
    }
    return {scale, zero_point};
}

}  // namespace

// x: bf16 or fp32, non-overlapping and dense; q: uint8, x's shape and strides. Returns (scale, zero_point).
std::tuple<double, int64_t> quantise_u8(const torch::Tensor& x, torch::Tensor& q) {
    TORCH_CHECK(x.device().is_cpu() && q.device().is_cpu(), "quantise_u8: CPU tensors only");
    TORCH_CHECK(x.is_non_overlapping_and_dense(), "quantise_u8: x must be non-overlapping and dense");
    TORCH_CHECK(q.scalar_type() == torch::kUInt8 && q.sizes() == x.sizes() && q.strides() == x.strides(),
                "quantise_u8: q must be uint8 with x's shape and strides");
    const int64_t n = x.numel();
    uint8_t* out = q.data_ptr<uint8_t>();
    if (x.scalar_type() == torch::kBFloat16) {
        return quantise(reinterpret_cast<const uint16_t*>(x.data_ptr()), n, out);
    }
    TORCH_CHECK(x.scalar_type() == torch::kFloat, "quantise_u8: x must be bf16 or fp32");
    return quantise(x.data_ptr<float>(), n, out);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("quantise_u8", &quantise_u8, "dynamic per-tensor uint8 quantisation of x into q (kedavra int8.cpp)");
}
