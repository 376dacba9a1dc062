// The 8-bit Adam step on the CPU in one pass over memory (docs/DESIGN.md §6).
//
// Each 256-element block of a moment row is dequantized, updated, used for the direction and quantized
// back to the nearest code of the dynamic map while it sits in L1; plain AdamW groups update an fp32
// weight in the same pass. The arithmetic is the reference's, operation for operation, so that codes and
// absmax are identical to galore_kernels.quant: torch's add(alpha) and addcmul are fused multiply-adds
// (Vectorized::fmadd), written here as fma; the library is built with -ffp-contract=off so that the
// compiler adds no other fusion.
//
// Two versions of the block: AVX2+FMA intrinsics, picked at run time where the CPU has them (the library
// is built without -march flags, so it loads on any x86-64), and portable scalar code.
//
// A plain C ABI, loaded with ctypes: no Python or torch headers, so `pip install` builds it without
// pulling torch into an isolated build environment.

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace {

constexpr int kCodes = 256;
constexpr int64_t kMaxBlock = 1024;  // the Python side passes 256
constexpr uint32_t kTableSize = 1u << 16;

// What one call needs to know, shared by both versions of the block.
struct Step {
    const float* grad;
    uint8_t* m_codes;
    float* m_absmax;
    uint8_t* v_codes;
    float* v_absmax;
    const float* signed_map;
    const float* signed_mid;  // 256 entries: the 255 midpoints, then +inf
    const int32_t* signed_table;
    const float* unsigned_map;
    const float* unsigned_mid;
    const int32_t* unsigned_table;
    float beta1, one_minus_beta1, beta2, one_minus_beta2, eps, scale;
    float* direction;
    float* weight;
    float decay, neg_step_size;
};

// The code of x: how many midpoints lie strictly below x (the nearest map entry, ties to the lower code).
// table[bits of x >> 16] counts them for the smallest float sharing x's top 16 bits; at most one more
// midpoint lies between that float and x (checked for every prefix of |x| <= 1 when the tables were
// designed: the map's entries are further apart than 2^-7 of their magnitude), so one comparison
// finishes the count. mid[255] = +inf ends the count at 255.
inline int code_of(float x, const float* mid, const int32_t* table) {
    uint32_t bits;
    std::memcpy(&bits, &x, sizeof bits);
    const int code = table[bits >> 16];
    return code + (mid[code] < x ? 1 : 0);
}

// One element's steps in scalar code, shared by the portable block and the tail of the AVX2 one.
inline void update_moments(const Step& st, int64_t at, float m_scale, float v_scale, float& m, float& v) {
    const float s = st.grad[at];
    m = std::fma(s, st.one_minus_beta1, st.signed_map[st.m_codes[at]] * m_scale * st.beta1);
    v = std::fma(st.one_minus_beta2 * s, s, st.unsigned_map[st.v_codes[at]] * v_scale * st.beta2);
}

inline void apply_direction(const Step& st, int64_t at, float m, float v) {
    float n = m / (std::sqrt(v) + st.eps);
    if (st.scale != 1.0f) {
        n *= st.scale;
    }
    if (st.weight != nullptr) {
        const float w = st.weight[at];
        st.weight[at] = std::fma(n, st.neg_step_size, st.decay != 1.0f ? w * st.decay : w);
    } else {
        st.direction[at] = n;
    }
}

// How a block's values are scaled into [-1, 1] before the lookup, as quant.quantize_blockwise does: by
// the reciprocal of absmax (bitsandbytes' rounding), by 1 for an all-zero block, and for a block below
// 2^-100 (whose reciprocal could overflow: an 8-bit moment decaying for ~740 steps gets there) after an
// exact scaling of values and absmax by 2^64.
struct Scale {
    float pre, inverse;
    explicit Scale(float absmax)
        : pre(absmax < 0x1p-100f ? 0x1p64f : 1.0f),
          inverse(absmax > 0.0f ? 1.0f / (absmax * pre) : 1.0f) {}
    bool prescaled() const { return pre != 1.0f; }
    float operator()(float x) const { return (x * pre) * inverse; }
};

inline void store_codes(const Step& st, int64_t at, float m, float v, const Scale& m_scale, const Scale& v_scale) {
    st.m_codes[at] = static_cast<uint8_t>(code_of(m_scale(m), st.signed_mid, st.signed_table));
    st.v_codes[at] = static_cast<uint8_t>(code_of(v_scale(v), st.unsigned_mid, st.unsigned_table));
}

void block_scalar(const Step& st, int64_t offset, int64_t length, int64_t b, float* m, float* v) {
    float m_max = 0.0f;
    float v_max = 0.0f;
    for (int64_t i = 0; i < length; ++i) {
        update_moments(st, offset + i, st.m_absmax[b], st.v_absmax[b], m[i], v[i]);
        m_max = std::fmax(m_max, std::fabs(m[i]));
        v_max = std::fmax(v_max, v[i]);
    }
    for (int64_t i = 0; i < length; ++i) {
        apply_direction(st, offset + i, m[i], v[i]);
    }
    const Scale m_scale(m_max), v_scale(v_max);
    for (int64_t i = 0; i < length; ++i) {
        store_codes(st, offset + i, m[i], v[i], m_scale, v_scale);
    }
    st.m_absmax[b] = m_max;
    st.v_absmax[b] = v_max;
}

#if defined(__x86_64__)

__attribute__((target("avx2,fma"))) inline float horizontal_max(__m256 x) {
    __m128 y = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    y = _mm_max_ps(y, _mm_movehl_ps(y, y));
    y = _mm_max_ss(y, _mm_shuffle_ps(y, y, 1));
    return _mm_cvtss_f32(y);
}

__attribute__((target("avx2,fma"))) inline __m256i codes_of(__m256 x, const float* mid, const int32_t* table) {
    const __m256i prefix = _mm256_srli_epi32(_mm256_castps_si256(x), 16);
    const __m256i code = _mm256_i32gather_epi32(table, prefix, 4);
    const __m256 below = _mm256_cmp_ps(_mm256_i32gather_ps(mid, code, 4), x, _CMP_LT_OQ);
    return _mm256_sub_epi32(code, _mm256_castps_si256(below));  // a true comparison is -1
}

// The low byte of each of 8 int32 lanes, as 8 consecutive bytes.
__attribute__((target("avx2,fma"))) inline void store_bytes(uint8_t* out, __m256i codes) {
    const __m256i low_bytes = _mm256_shuffle_epi8(
        codes, _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 0, 4, 8, 12, -1, -1, -1,
                                -1, -1, -1, -1, -1, -1, -1, -1, -1));
    const __m256i packed = _mm256_permutevar8x32_epi32(low_bytes, _mm256_setr_epi32(0, 4, 1, 1, 1, 1, 1, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(out), _mm256_castsi256_si128(packed));
}

__attribute__((target("avx2,fma"))) void block_avx2(const Step& st, int64_t offset, int64_t length, int64_t b, float* m,
                                                      float* v) {
    const int64_t vector_length = length & ~int64_t{7};
    if (vector_length == 0) {
        block_scalar(st, offset, length, b, m, v);
        return;
    }
    const __m256 m_scale = _mm256_set1_ps(st.m_absmax[b]);
    const __m256 v_scale = _mm256_set1_ps(st.v_absmax[b]);
    const __m256 beta1 = _mm256_set1_ps(st.beta1), one_minus_beta1 = _mm256_set1_ps(st.one_minus_beta1);
    const __m256 beta2 = _mm256_set1_ps(st.beta2), one_minus_beta2 = _mm256_set1_ps(st.one_minus_beta2);
    const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    __m256 m_max = _mm256_setzero_ps();
    __m256 v_max = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i < vector_length; i += 8) {
        const __m256 s = _mm256_loadu_ps(st.grad + offset + i);
        const __m256i mc = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(st.m_codes + offset + i)));
        const __m256i vc = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(st.v_codes + offset + i)));
        const __m256 m_old = _mm256_mul_ps(_mm256_mul_ps(_mm256_i32gather_ps(st.signed_map, mc, 4), m_scale), beta1);
        const __m256 v_old = _mm256_mul_ps(_mm256_mul_ps(_mm256_i32gather_ps(st.unsigned_map, vc, 4), v_scale), beta2);
        const __m256 m_new = _mm256_fmadd_ps(s, one_minus_beta1, m_old);
        const __m256 v_new = _mm256_fmadd_ps(_mm256_mul_ps(one_minus_beta2, s), s, v_old);
        _mm256_storeu_ps(m + i, m_new);
        _mm256_storeu_ps(v + i, v_new);
        m_max = _mm256_max_ps(m_max, _mm256_and_ps(m_new, magnitude));
        v_max = _mm256_max_ps(v_max, v_new);
    }
    float m_top = horizontal_max(m_max);
    float v_top = horizontal_max(v_max);
    for (; i < length; ++i) {  // the tail of a short last block
        update_moments(st, offset + i, st.m_absmax[b], st.v_absmax[b], m[i], v[i]);
        m_top = std::fmax(m_top, std::fabs(m[i]));
        v_top = std::fmax(v_top, v[i]);
    }

    const __m256 eps = _mm256_set1_ps(st.eps), scale = _mm256_set1_ps(st.scale);
    const __m256 decay = _mm256_set1_ps(st.decay), neg_step_size = _mm256_set1_ps(st.neg_step_size);
    for (i = 0; i < vector_length; i += 8) {
        __m256 n = _mm256_div_ps(_mm256_loadu_ps(m + i), _mm256_add_ps(_mm256_sqrt_ps(_mm256_loadu_ps(v + i)), eps));
        if (st.scale != 1.0f) {
            n = _mm256_mul_ps(n, scale);
        }
        if (st.weight != nullptr) {
            __m256 w = _mm256_loadu_ps(st.weight + offset + i);
            if (st.decay != 1.0f) {
                w = _mm256_mul_ps(w, decay);
            }
            _mm256_storeu_ps(st.weight + offset + i, _mm256_fmadd_ps(n, neg_step_size, w));
        } else {
            _mm256_storeu_ps(st.direction + offset + i, n);
        }
    }
    for (; i < length; ++i) {
        apply_direction(st, offset + i, m[i], v[i]);
    }

    const Scale m_scale_top(m_top), v_scale_top(v_top);
    i = 0;
    if (m_scale_top.prescaled() || v_scale_top.prescaled()) {
        i = length;  // a block of tiny moments: the scalar loop scales it
        for (int64_t j = 0; j < length; ++j) {
            store_codes(st, offset + j, m[j], v[j], m_scale_top, v_scale_top);
        }
    }
    const __m256 m_inv8 = _mm256_set1_ps(m_scale_top.inverse), v_inv8 = _mm256_set1_ps(v_scale_top.inverse);
    for (; i < vector_length; i += 8) {
        store_bytes(st.m_codes + offset + i, codes_of(_mm256_mul_ps(_mm256_loadu_ps(m + i), m_inv8), st.signed_mid,
                                                      st.signed_table));
        store_bytes(st.v_codes + offset + i, codes_of(_mm256_mul_ps(_mm256_loadu_ps(v + i), v_inv8),
                                                      st.unsigned_mid, st.unsigned_table));
    }
    for (; i < length; ++i) {
        store_codes(st, offset + i, m[i], v[i], m_scale_top, v_scale_top);
    }
    st.m_absmax[b] = m_top;
    st.v_absmax[b] = v_top;
}

bool has_avx2_fma() {
    static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    return has;
}

std::atomic<bool> allow_avx2{true};  // gk_allow_avx2(0) makes the tests run the portable block

#endif

}  // namespace

extern "C" {

int gk_abi_version() { return 3; }

// Whether the AVX2 version of the block runs on this CPU (1) or the scalar one (0).
int gk_uses_avx2() {
#if defined(__x86_64__)
    return has_avx2_fma() && allow_avx2 ? 1 : 0;
#else
    return 0;
#endif
}

// Let the AVX2 block run where the CPU has it (1, the default) or always run the portable one (0).
void gk_allow_avx2(int allow) {
#if defined(__x86_64__)
    allow_avx2 = allow != 0;
#else
    (void)allow;
#endif
}

// table[p] = number of midpoints (mid: 255 ascending values) below the smallest float whose top 16 bits
// are p (for a negative prefix, the one with all low bits set: the largest magnitude).
void gk_code_table(const float* mid, int32_t* table) {
    for (uint32_t prefix = 0; prefix < kTableSize; ++prefix) {
        const uint32_t bits = (prefix << 16) | ((prefix & 0x8000u) ? 0xFFFFu : 0u);
        float smallest;
        std::memcpy(&smallest, &bits, sizeof smallest);
        int count = 0;
        if (!std::isnan(smallest)) {
            while (count < kCodes - 1 && mid[count] < smallest) {
                ++count;
            }
        }
        table[prefix] = count;
    }
}

// One Adam step of 8-bit moments stored as (rows, k) codes with (rows, ceil(k / block)) absmax; returns
// 0, or 1 (doing nothing) for a block length outside 1 … kMaxBlock or negative sizes.
//   grad        (rows, k) fp32: the gradient, or the projected gradient S of a GaLore weight
//   *_mid       256 floats: the map's 255 midpoints, then +inf; *_table: gk_code_table of them
//   direction   (rows, k) fp32 or null: receives N = scale * m / (sqrt(v) + eps)
//   weight      (rows, k) fp32 or null: W <- fma(N, neg_step_size, W * decay) instead (plain AdamW)
// beta1, one_minus_beta1, ... are the fp32 values torch uses for the Python floats of AdamHyper.
int gk_adam8bit_step(const float* grad, uint8_t* m_codes, float* m_absmax, uint8_t* v_codes, float* v_absmax,
                      const float* signed_map, const float* signed_mid, const int32_t* signed_table,
                      const float* unsigned_map, const float* unsigned_mid, const int32_t* unsigned_table,
                      int64_t rows, int64_t k, int64_t block, float beta1, float one_minus_beta1, float beta2,
                      float one_minus_beta2, float eps, float scale, float* direction, float* weight, float decay,
                      float neg_step_size) {
    const Step st{grad,         m_codes,        m_absmax, v_codes,         v_absmax, signed_map,
                  signed_mid,   signed_table,   unsigned_map, unsigned_mid, unsigned_table, beta1,
                  one_minus_beta1, beta2,       one_minus_beta2, eps,      scale,    direction,
                  weight,       decay,          neg_step_size};
    if (block < 1 || block > kMaxBlock || rows < 0 || k < 0) {
        return 1;
    }
    const int64_t blocks_per_row = (k + block - 1) / block;
    const int64_t blocks = rows * blocks_per_row;
#if defined(__x86_64__)
    const bool avx2 = has_avx2_fma() && allow_avx2;
#endif
#pragma omp parallel
    {
        float m[kMaxBlock];
        float v[kMaxBlock];
#pragma omp for schedule(static)
        for (int64_t b = 0; b < blocks; ++b) {
            const int64_t row = b / blocks_per_row;
            const int64_t start = (b % blocks_per_row) * block;
            const int64_t length = (start + block <= k) ? block : k - start;
            const int64_t offset = row * k + start;
#if defined(__x86_64__)
            if (avx2) {
                block_avx2(st, offset, length, b, m, v);
                continue;
            }
#endif
            block_scalar(st, offset, length, b, m, v);
        }
    }
    return 0;
}

}  // extern "C"
