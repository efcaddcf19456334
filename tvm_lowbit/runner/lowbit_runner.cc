// lowbit_runner: run a tvm_lowbit model library (Relax VM executable exported as model.so) on a board,
// without Python. Cross-compiled for the board by `tvm-lowbit export --bundle`.
//
//   lowbit_runner MODEL.so INPUT.bin 1x1x28x28 OUTPUT.bin [--runs N] [--expect EXPECTED.bin --atol A]
//
// INPUT/OUTPUT/EXPECTED are raw little-endian float32. `main` is called N times (default 1) and each
// call's wall time is printed; the output of the last call is written. With --expect, the largest
// absolute difference to EXPECTED is printed and the exit status is 3 if it exceeds A.
//
// Only the tvm-ffi C++ API is used: the wheel's TVM runtime headers are incomplete (tvm/runtime/tensor.h
// includes tvm/support/io.h, which the wheel lacks).
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace ffi = tvm::ffi;

namespace {

struct AlignedAlloc {  // the allocator ffi::Tensor::FromNDAlloc calls back into
  void AllocData(DLTensor* t) { t->data = std::aligned_alloc(64, (ffi::GetDataSize(*t) + 63) / 64 * 64); }
  void FreeData(DLTensor* t) { std::free(t->data); }
};

double now_ms() {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

std::vector<int64_t> parse_shape(const std::string& text) {
  std::vector<int64_t> shape;
  std::stringstream ss(text);
  std::string dim;
  while (std::getline(ss, dim, 'x')) {
    char* end = nullptr;
    long long v = std::strtoll(dim.c_str(), &end, 10);
    if (dim.empty() || *end != '\0' || v <= 0) throw std::runtime_error("bad shape '" + text + "' (expected e.g. 1x1x28x28)");
    shape.push_back(v);
  }
  if (shape.empty()) throw std::runtime_error("empty shape");
  return shape;
}

std::vector<float> read_floats(const std::string& path, size_t count) {
  std::ifstream f(path, std::ios::binary | std::ios::ate);
  if (!f) throw std::runtime_error("cannot open " + path);
  size_t bytes = static_cast<size_t>(f.tellg());
  if (bytes != count * sizeof(float)) {
    throw std::runtime_error(path + " holds " + std::to_string(bytes) + " bytes, expected " +
                             std::to_string(count * sizeof(float)) + " (" + std::to_string(count) + " float32)");
  }
  std::vector<float> v(count);
  f.seekg(0);
  f.read(reinterpret_cast<char*>(v.data()), static_cast<std::streamsize>(bytes));
  return v;
}

int usage(const char* argv0) {
  std::fprintf(stderr, "usage: %s MODEL.so INPUT.bin SHAPE OUTPUT.bin [--runs N] [--expect EXPECTED.bin --atol A]\n",
               argv0);
  return 2;
}

int run(int argc, char** argv) {
  if (argc < 5) return usage(argv[0]);
  int runs = 1;
  std::string expect_path;
  double atol = 0.0;
  for (int i = 5; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--runs" && i + 1 < argc) {
      runs = std::max(1, std::atoi(argv[++i]));
    } else if (a == "--expect" && i + 1 < argc) {
      expect_path = argv[++i];
    } else if (a == "--atol" && i + 1 < argc) {
      atol = std::atof(argv[++i]);
    } else {
      return usage(argv[0]);
    }
  }
  std::vector<int64_t> shape = parse_shape(argv[3]);
  size_t numel = 1;
  for (int64_t d : shape) numel *= static_cast<size_t>(d);
  std::vector<float> input = read_floats(argv[2], numel);

  // dlopen() searches the library path for a name without '/', so hand it an absolute path
  char model_path[PATH_MAX];
  if (realpath(argv[1], model_path) == nullptr) throw std::runtime_error(std::string("cannot find ") + argv[1]);
  double t0 = now_ms();
  ffi::Module lib = ffi::Module::LoadFromFile(model_path);
  auto load_exec = lib->GetFunction("vm_load_executable");
  if (!load_exec) throw std::runtime_error(std::string(argv[1]) + " is not a Relax VM executable (no vm_load_executable)");
  ffi::Module vm = (*load_exec)().cast<ffi::Module>();
  // device type, device id, allocator (2 = pooled, what relax.VirtualMachine uses)
  (*vm->GetFunction("vm_initialization"))(static_cast<int>(kDLCPU), 0, 2);
  ffi::Function fmain = vm->GetFunction("main").value();
  std::printf("load_ms %.3f\n", now_ms() - t0);

  DLDevice cpu{kDLCPU, 0};
  ffi::Tensor x = ffi::Tensor::FromNDAlloc(AlignedAlloc(), ffi::Shape(shape), DLDataType{kDLFloat, 32, 1}, cpu);
  std::memcpy(x.data_ptr(), input.data(), numel * sizeof(float));
  ffi::Any out;
  std::vector<double> times;
  for (int i = 0; i < runs; ++i) {
    double a = now_ms();
    out = fmain(x);
    times.push_back(now_ms() - a);
    std::printf("run %d ms %.3f\n", i, times.back());
  }
  std::sort(times.begin(), times.end());
  std::printf("median_ms %.3f\n", times[times.size() / 2]);

  ffi::Tensor y;
  if (auto t = out.try_cast<ffi::Tensor>()) {
    y = *t;
  } else {
    y = out.cast<ffi::Array<ffi::Any>>()[0].cast<ffi::Tensor>();
  }
  if (y.dtype().code != kDLFloat || y.dtype().bits != 32) throw std::runtime_error("the model output is not float32");
  size_t n = 1;
  for (int i = 0; i < y.ndim(); ++i) n *= static_cast<size_t>(y.size(i));
  const float* yp = static_cast<const float*>(y.data_ptr());  // CPU tensor, compact
  std::ofstream(argv[4], std::ios::binary).write(reinterpret_cast<const char*>(yp), static_cast<std::streamsize>(n * sizeof(float)));
  std::printf("output_elems %zu\n", n);
  if (expect_path.empty()) return 0;
  std::vector<float> expected = read_floats(expect_path, n);
  double worst = 0.0;
  bool nan = false;
  for (size_t i = 0; i < n; ++i) {
    double d = std::fabs(static_cast<double>(yp[i]) - expected[i]);
    nan = nan || std::isnan(d);
    worst = std::max(worst, d);
  }
  if (nan) worst = NAN;
  bool ok = !nan && worst <= atol;
  std::printf("max_abs_diff %.9g atol %.9g %s\n", worst, atol, ok ? "OK" : "MISMATCH");
  return ok ? 0 : 3;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "lowbit_runner: error: %s\n", e.what());
    return 1;
  }
}
