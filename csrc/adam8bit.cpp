// The 8-bit Adam step on the CPU in one pass over memory (docs/DESIGN.md §4 and §6).
//
// Each 256-element block of a moment row is dequantized, updated, used for the direction and quantized
// back to the nearest code of the dynamic map while it sits in L1; plain AdamW groups update an fp32
// weight in the same pass. The arithmetic is the reference's, operation for operation, so that codes and
// absmax are identical to galore_kernels.quant and the fp32 results bit-equal to torch on this CPU:
// torch's add(alpha) and addcmul are fused multiply-adds (Vectorized::fmadd), written here as std::fma;
// the library is built with -ffp-contract=off so that the compiler adds no other fusion.
//
// A plain C ABI, loaded with ctypes: no Python or torch headers, so `pip install` builds it without
// pulling torch into an isolated build environment.

#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

constexpr int kMapSize = 256;
constexpr int64_t kMaxBlock = 1024;  // the Python side refuses larger blocks
constexpr int kTableSize = 1 << 16;

// The code of x: how many of the 255 ascending midpoints lie strictly below x (the nearest map entry,
// ties to the lower code). table[bits of x >> 16] is that count for the smallest float sharing x's top
// 16 bits, a lower bound; the midpoints between it and x are at most one or two (the map's entries are
// at least 2^-7 apart relative to their magnitude), so the scan that finishes the count is short.
inline uint8_t code_of(float x, const float* mid, const uint8_t* table) {
    uint32_t bits;
    std::memcpy(&bits, &x, sizeof bits);
    int code = table[bits >> 16];
    while (code < kMapSize - 1 && mid[code] < x) {
        ++code;
    }
    return static_cast<uint8_t>(code);
}

}  // namespace

extern "C" {

int gk_abi_version() { return 1; }

// table[p] = number of midpoints below the smallest float whose top 16 bits are p (for a negative
// prefix that is the one with all low bits set: the largest magnitude).
void gk_code_table(const float* mid, uint8_t* table) {
    for (uint32_t prefix = 0; prefix < kTableSize; ++prefix) {
        uint32_t bits = (prefix << 16) | ((prefix & 0x8000u) ? 0xFFFFu : 0u);
        float smallest;
        std::memcpy(&smallest, &bits, sizeof smallest);
        int count = 0;
        if (!std::isnan(smallest)) {
            while (count < kMapSize - 1 && mid[count] < smallest) {
                ++count;
            }
        }
        table[prefix] = static_cast<uint8_t>(count);
    }
}

// One Adam step of 8-bit moments stored as (rows, k) codes with (rows, ceil(k / block)) absmax.
//   grad        (rows, k) fp32: the gradient, or the projected gradient S of a GaLore weight
//   direction   (rows, k) fp32 or null: receives N = scale * m / (sqrt(v) + eps)
//   weight      (rows, k) fp32 or null: W <- fma(N, neg_step_size, W * decay) instead (plain AdamW)
// beta1, one_minus_beta1, ... are the fp32 values torch uses for the Python floats of AdamHyper.
void gk_adam8bit_step(const float* grad, uint8_t* m_codes, float* m_absmax, uint8_t* v_codes, float* v_absmax,
                      const float* signed_map, const float* signed_mid, const uint8_t* signed_table,
                      const float* unsigned_map, const float* unsigned_mid, const uint8_t* unsigned_table,
                      int64_t rows, int64_t k, int64_t block, float beta1, float one_minus_beta1, float beta2,
                      float one_minus_beta2, float eps, float scale, float* direction, float* weight, float decay,
                      float neg_step_size) {
    const int64_t blocks_per_row = (k + block - 1) / block;
    const int64_t blocks = rows * blocks_per_row;
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
            const float m_scale = m_absmax[b];
            const float v_scale = v_absmax[b];
            float m_max = 0.0f;
            float v_max = 0.0f;
            for (int64_t i = 0; i < length; ++i) {
                const float s = grad[offset + i];
                const float m_new = std::fma(s, one_minus_beta1, signed_map[m_codes[offset + i]] * m_scale * beta1);
                const float v_new =
                    std::fma(one_minus_beta2 * s, s, unsigned_map[v_codes[offset + i]] * v_scale * beta2);
                m[i] = m_new;
                v[i] = v_new;
                m_max = std::fmax(m_max, std::fabs(m_new));
                v_max = std::fmax(v_max, v_new);
            }
            for (int64_t i = 0; i < length; ++i) {
                float n = m[i] / (std::sqrt(v[i]) + eps);
                if (scale != 1.0f) {
                    n *= scale;
                }
                if (weight != nullptr) {
                    const float w = weight[offset + i];
                    weight[offset + i] = std::fma(n, neg_step_size, decay != 1.0f ? w * decay : w);
                } else {
                    direction[offset + i] = n;
                }
            }
            // An all-zero block scales by 1 (its values are zero either way), as quant.quantize_blockwise.
            const float m_inv = m_max > 0.0f ? 1.0f / m_max : 1.0f;
            const float v_inv = v_max > 0.0f ? 1.0f / v_max : 1.0f;
            for (int64_t i = 0; i < length; ++i) {
                m_codes[offset + i] = code_of(m[i] * m_inv, signed_mid, signed_table);
                v_codes[offset + i] = code_of(v[i] * v_inv, unsigned_mid, unsigned_table);
            }
            m_absmax[b] = m_max;
            v_absmax[b] = v_max;
        }
    }
}

}  // extern "C"
