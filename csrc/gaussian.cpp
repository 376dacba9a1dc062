// Counter-based Gaussian numbers on the CPU: galore_kernels.rng.randn (Triton's tl.randn: Philox4x32-10,
// then Box-Muller on the first two words) for a run of consecutive offsets, so the sketch Ω of the
// randomized refresh is drawn in C++ instead of by int64 tensor arithmetic (docs/DESIGN.md §3).
//
// The Philox words and the uniforms are bit-equal to the reference; log, sqrt and cos are the C
// library's, which round differently from torch's in the last place now and then (the Python side
// states the measured figure).

#include <cmath>
#include <cstdint>

namespace {

constexpr uint32_t kRoundA = 0xD2511F53u;
constexpr uint32_t kRoundB = 0xCD9E8D57u;
constexpr uint32_t kKeyA = 0x9E3779B9u;
constexpr uint32_t kKeyB = 0xBB67AE85u;
constexpr float kUniformScale = 4.6566127342e-10f;  // tl.randn's uint32 -> [0, 1) scale
constexpr float kTwoPi = 6.283185307179586f;

inline float to_uniform(uint32_t word) {
    const int32_t signed_word = static_cast<int32_t>(word);
    const int32_t folded = signed_word < 0 ? ~signed_word : signed_word;  // -x - 1, without overflow at INT32_MIN
    return static_cast<float>(folded) * kUniformScale;
}

inline float gaussian(uint64_t seed, uint64_t offset) {
    uint32_t c0 = static_cast<uint32_t>(offset), c1 = static_cast<uint32_t>(offset >> 32), c2 = 0, c3 = 0;
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int round = 0; round < 10; ++round) {
        const uint64_t product_b = static_cast<uint64_t>(kRoundB) * c2;
        const uint64_t product_a = static_cast<uint64_t>(kRoundA) * c0;
        const uint32_t next0 = static_cast<uint32_t>(product_b >> 32) ^ c1 ^ k0;
        const uint32_t next2 = static_cast<uint32_t>(product_a >> 32) ^ c3 ^ k1;
        c1 = static_cast<uint32_t>(product_b);
        c3 = static_cast<uint32_t>(product_a);
        c0 = next0;
        c2 = next2;
        k0 += kKeyA;
        k1 += kKeyB;
    }
    const float u1 = std::fmax(to_uniform(c0), 1.0e-7f);
    const float u2 = to_uniform(c1);
    return std::sqrt(-2.0f * std::log(u1)) * std::cos(kTwoPi * u2);
}

}  // namespace

extern "C" {

// out[i] = randn(seed, first_offset + i) for i < count.
void gk_gaussian(uint64_t seed, int64_t first_offset, int64_t count, float* out) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < count; ++i) {
        out[i] = gaussian(seed, static_cast<uint64_t>(first_offset + i));
    }
}

}  // extern "C"
