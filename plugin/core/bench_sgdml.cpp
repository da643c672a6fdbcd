/* Microbenchmark of gpff::SGDMLModel::compute (single thread).
 *
 *   bench_sgdml model.gpff [n_calls]
 *
 * Evaluates energy, forces and virial of a jittered geometry built from a regular grid of the
 * model's atoms (any geometry works for timing) and prints ns per call and GFLOP/s of the kernel
 * sum (flop count from SGDMLModel::flops_per_call()). Built only with -DGPFF_CORE_BENCH=ON.
 */

#include "sgdml.h"

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

int main(int argc, char **argv)
{
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s model.gpff [n_calls]\n", argv[0]);
    return 1;
  }
  try {
    gpff::SGDMLModel model(argv[1]);
    const int n_calls = argc > 2 ? std::atoi(argv[2]) : 2000;
    const int n = model.n_atoms();
    std::vector<double> x(3 * n), f(3 * n), w(6), vatom(6 * n);
    for (int i = 0; i < n; ++i) {
      x[3 * i] = 1.3 * (i % 3) + 0.05 * std::sin(i);
      x[3 * i + 1] = 1.3 * ((i / 3) % 3) + 0.05 * std::cos(i);
      x[3 * i + 2] = 1.3 * (i / 9) + 0.03 * i;
    }
    double e = 0.0;
    for (int k = 0; k < 20; ++k) e += model.compute(x.data(), f.data(), w.data(), vatom.data());
    const auto t0 = std::chrono::steady_clock::now();
    for (int k = 0; k < n_calls; ++k) {
      x[0] += 1e-9;    // defeat any caching
      e += model.compute(x.data(), f.data(), w.data(), vatom.data());
    }
    const auto t1 = std::chrono::steady_clock::now();
    const double ns = std::chrono::duration<double, std::nano>(t1 - t0).count() / n_calls;
    std::printf("[%s] %s N=%d D=%d M=%d S=%d: %.0f ns/call, %.2f GFLOP/s (checksum %.6g)\n",
                gpff::SGDMLModel::kernel_isa(), model.descriptor().c_str(), n, model.n_desc(),
                model.n_train(), model.n_perms(), ns,
                model.flops_per_call() / ns, e);
  } catch (const gpff::Error &err) {
    std::fprintf(stderr, "error: %s\n", err.what());
    return 1;
  }
  return 0;
}
