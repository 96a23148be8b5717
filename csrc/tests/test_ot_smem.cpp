// Unit test of the CUDA IPOT kernel's shared-memory plan (csrc/include/fastvl/ot_math.h, host side): the static
// __shared__ arrays count against the opt-in limit together with the dynamic part, exactly at the boundary.
#include <cstdio>

#include "fastvl/ot_math.h"

namespace {

int failures = 0;

void expect(bool ok, const char* what) {
  std::printf("%s %s\n", ok ? "ok  " : "FAIL", what);
  failures += ok ? 0 : 1;
}

}  // namespace

int main() {
  using fastvl::ot::ipot_smem_big;
  using fastvl::ot::ipot_smem_plan;
  using fastvl::ot::ipot_smem_small;
  using fastvl::ot::smem_headroom;
  constexpr int kWarps = 8;
  constexpr size_t kStatic = 16;  // the kernel's __shared__ int extent[4]

  expect(smem_headroom(1000, 16, 984) == 0, "headroom: limit - static - dynamic = 0");
  expect(smem_headroom(1000, 16, 985) == -1, "headroom: limit - static - dynamic = -1");
  expect(ipot_smem_small(60, 100, kWarps) == sizeof(float) * (100 + 60 + 8 * 100), "small layout bytes");
  expect(ipot_smem_big(60, 100, kWarps) == ipot_smem_small(60, 100, kWarps) + sizeof(float) * 2 * 60 * 100,
         "big layout bytes");

  // A and Q in shared memory: headroom exactly 0 fits; 1 byte less of limit falls back to the workspace layout.
  const int n = 60, m = 100;
  const size_t big = ipot_smem_big(n, m, kWarps), small = ipot_smem_small(n, m, kWarps);
  auto at = ipot_smem_plan(n, m, kWarps, kStatic, kStatic + big);
  expect(at.in_shared && at.fits && at.dynamic_bytes == big, "big layout at limit - static - dynamic = 0");
  auto over = ipot_smem_plan(n, m, kWarps, kStatic, kStatic + big - 1);
  expect(!over.in_shared && over.fits && over.dynamic_bytes == small,
         "limit - static - dynamic = -1: workspace layout (the old check, which left out static, kept A and Q)");
  // The old check compared the dynamic part alone with the limit: it accepted exactly this case.
  expect(big <= kStatic + big - 1, "(the dynamic part alone is under the limit there)");

  // The workspace layout itself at its boundary.
  auto small_at = ipot_smem_plan(n, m, kWarps, kStatic, kStatic + small);
  expect(!small_at.in_shared && small_at.fits && small_at.dynamic_bytes == small, "small layout at headroom 0");
  auto small_over = ipot_smem_plan(n, m, kWarps, kStatic, kStatic + small - 1);
  expect(!small_over.fits, "small layout at headroom -1 does not fit");

  // Real devices: UNITER's 60 x 100 pairs keep A and Q in shared memory on H100 (227 KB) and A100 (163 KB).
  expect(ipot_smem_plan(60, 100, kWarps, kStatic, 227 * 1024).in_shared, "60x100 in shared memory on sm_90");
  expect(ipot_smem_plan(60, 100, kWarps, kStatic, 163 * 1024).in_shared, "60x100 in shared memory on sm_80");
  expect(!ipot_smem_plan(220, 100, kWarps, kStatic, 163 * 1024).in_shared, "220x100 in the workspace on sm_80");
  if (failures) std::printf("%d check(s) failed\n", failures);
  return failures ? 1 : 0;
}
