// Test driver for tests/test_sgld_isa.py: runs the raw CPU SGLD kernel (csrc/sgld/sgld_cpu_fast.cpp, compiled by the
// test with one instruction-set's flags) on float32 arrays read from a file, and writes the updated weights.
//   sgld_isa_driver IN OUT n has_mask step_size nbeta localization weight_decay noise_scale box seed step tensor_index
// IN holds w, g, w0 (and the mask when has_mask) as n float32 each; box < 0 means no bounding box. Exit status:
// 0, or 16 + the kernel's flags when it flagged entries.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "sgld_kernel.h"

int main(int argc, char** argv) {
  if (argc != 14) {
    std::fprintf(stderr, "usage: %s IN OUT n has_mask eps nbeta loc wd noise box seed step tensor_index\n", argv[0]);
    return 2;
  }
  const long n = std::atol(argv[3]);
  const bool has_mask = std::atoi(argv[4]) != 0;
  const double eps = std::atof(argv[5]), nbeta = std::atof(argv[6]), loc = std::atof(argv[7]);
  const double wd = std::atof(argv[8]), noise = std::atof(argv[9]), box = std::atof(argv[10]);
  pypattern::SgldCoefs c{};
  c.drift_grad = 0.5 * eps * nbeta;
  c.drift_loc = 0.5 * eps * loc;
  c.drift_wd = 0.5 * eps * wd;
  c.noise_std = std::sqrt(eps) * noise;
  c.has_noise = c.noise_std != 0.0;
  c.has_box = box >= 0.0;
  c.box = c.has_box ? box : 0.0;
  c.seed = std::strtoull(argv[11], nullptr, 10);
  c.step = std::strtoull(argv[12], nullptr, 10);
  c.tensor_index = static_cast<uint32_t>(std::atol(argv[13]));
  const int k = has_mask ? 4 : 3;
  std::vector<float> buf(static_cast<size_t>(k) * n);
  std::FILE* f = std::fopen(argv[1], "rb");
  if (!f || std::fread(buf.data(), sizeof(float), buf.size(), f) != buf.size()) return 3;
  std::fclose(f);
  float* w = buf.data();
  const int bad = pypattern::sgld_cpu_range_f32(w, w + n, w + 2 * n, has_mask ? w + 3 * n : nullptr, 0, n, c);
  f = std::fopen(argv[2], "wb");
  if (!f || std::fwrite(w, sizeof(float), n, f) != static_cast<size_t>(n)) return 4;
  std::fclose(f);
  return bad ? 16 + bad : 0;  // 16 + the flags (1: a non-finite gradient, 2: a non-finite update)
}
