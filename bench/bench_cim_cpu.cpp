// bench_cim_cpu: how fast is the CPU CIM backend, against the GEMM rate of the same machine and
// library measured in the same run?
//
//  1. Baseline: OpenBLAS cblas_sgemm. (a) Every OpenMP thread runs its own sgemm of each shape the
//     backend issues for this network (M = cells·out + reference row, K = sub-array rows, N = 512
//     output positions per chunk), as the backend does inside its own parallel region; once with
//     OpenBLAS single-threaded (how the backend runs it) and once at OpenBLAS's default thread
//     count (nested). (b) One square 1024³ sgemm with OpenBLAS on all threads.
//  2. CIM inference of a ResNet with random weights (He-normal, randomised batch norm, input ranges
//     4.0 except conv1 = 1.0, saved with save_model and read back with load_model) on random
//     8-bit images, under the default CIM model (CimConfig{}), at σ = 0.1 (device variation) with
//     ADC dynamic (the default), fixed, ideal, and the digital path. Every CIM mode runs twice, with
//     the table-lookup reads (the backend's default) and with the GEMM reads (the path before them,
//     CpuReads::kGemm), one after the other in the same run: "speedup" is the ratio of their
//     median images/s. program_chip and the forward pass are timed separately; the effective rate
//     is 2·ab·nc·ΣMACs·images / seconds, the work of the bit-serial, bit-sliced GEMMs, and its
//     ratio to the baselines is printed.
//  3. --memory: peak resident memory (getrusage ru_maxrss) after ResNet-56 over 10,000 images.
//
// Figures and machine details go to stdout and, with --json, to a file (bench/results/README.md).
#include <cblas.h>
#include <omp.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "common/cim_backend.h"
#include "common/cim_config.h"
#include "host/cpu/cim_cpu.h"
#include "common/errors.h"
#include "host/io/model_file.h"
#include "host/io/output_file.h"
#include "host/results/results.h"
#include "networks/resnet.h"
#include "bench/random_resnet.h"

#ifndef CIMSWEEP_SOURCE_DIR
#define CIMSWEEP_SOURCE_DIR "."
#endif

using namespace cimsweep;
using Clock = std::chrono::steady_clock;
using nlohmann::json;
using cimsweep::bench::make_random_resnet;
using cimsweep::bench::RandomModel;

namespace {

// The backend's fixed chunk of output positions per GEMM (kChunk in host/cpu/cim_cpu.cpp).
constexpr int kBackendChunk = 512;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// ---------------------------------------------------------------------------------------------
// Machine description

std::string trim(std::string s) {
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.back()))) s.pop_back();
  size_t first = 0;
  while (first < s.size() && std::isspace(static_cast<unsigned char>(s[first]))) ++first;
  return s.substr(first);
}

std::string cpu_model() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("model name", 0) == 0 && line.find(':') != std::string::npos)
      return trim(line.substr(line.find(':') + 1));
  return "unknown";
}

std::string load_average() {
  std::ifstream in("/proc/loadavg");
  std::string a, b, c;
  in >> a >> b >> c;
  return in ? a + " " + b + " " + c : "unknown";
}

// stdout of a shell command, "" when it fails.
std::string command_output(const std::string& command) {
  FILE* pipe = popen(command.c_str(), "r");
  if (!pipe) return "";
  std::string out;
  char buffer[256];
  while (size_t got = fread(buffer, 1, sizeof buffer, pipe)) out.append(buffer, got);
  return pclose(pipe) == 0 ? trim(out) : "";
}

// User + system CPU seconds of the whole process so far (all threads, spin-waiting included).
double cpu_seconds() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return double(usage.ru_utime.tv_sec + usage.ru_stime.tv_sec) +
         1e-6 * double(usage.ru_utime.tv_usec + usage.ru_stime.tv_usec);
}

long max_rss_kib() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return usage.ru_maxrss;  // KiB on Linux
}

std::string utc_now() {
  const std::time_t t = std::time(nullptr);
  char buffer[32];
  std::strftime(buffer, sizeof buffer, "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&t));
  return buffer;
}

// ---------------------------------------------------------------------------------------------
// GEMM baselines

struct GemmShape {
  int m = 0, k = 0, n = 0;
  bool operator<(const GemmShape& o) const {
    return std::tie(m, k, n) < std::tie(o.m, o.k, o.n);
  }
  std::string label() const {
    return std::to_string(m) + "×" + std::to_string(k) + "×" + std::to_string(n);
  }
};

struct Timing {
  double gflops = 0;   // best repetition
  double seconds = 0;  // of the best repetition
  long calls = 0;      // sgemm calls per repetition (all threads)
};

// Repeats `run(iterations)` (which returns its wall seconds) with enough iterations to last about
// `min_seconds`, three times, and keeps the fastest: other jobs on the machine only slow it down.
template <class Run>
std::pair<double, long> best_time(Run run, double min_seconds) {
  run(1);  // warm-up: buffers touched, OpenBLAS threads started
  long iterations = 1;
  double t = run(iterations);
  while (t < min_seconds / 3 && iterations < (1L << 30)) {
    iterations *= 2;
    t = run(iterations);
  }
  double best = t;
  for (int rep = 0; rep < 3; ++rep) best = std::min(best, run(iterations));
  return {best, iterations};
}

// Every OpenMP thread runs its own sgemm C = A·B (row-major, A: M×K, B: K×N), as the backend does.
Timing per_thread_sgemm(const GemmShape& s, int threads, double min_seconds) {
  std::vector<std::vector<float>> a(threads), b(threads), c(threads);
  for (int t = 0; t < threads; ++t) {
    a[t].resize(size_t(s.m) * s.k);
    b[t].resize(size_t(s.k) * s.n);
    c[t].assign(size_t(s.m) * s.n, 0.0f);
    for (size_t i = 0; i < a[t].size(); ++i) a[t][i] = float((i * 7 + t) % 16);  // cell levels
    for (size_t i = 0; i < b[t].size(); ++i) b[t][i] = float((i * 13 + t) % 3 == 0);  // input bits
  }
  auto run = [&](long iterations) {
    const auto start = Clock::now();
#pragma omp parallel num_threads(threads)
    {
      const int t = omp_get_thread_num();
      for (long i = 0; i < iterations; ++i)
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, s.m, s.n, s.k, 1.0f, a[t].data(), s.k,
                    b[t].data(), s.n, 0.0f, c[t].data(), s.n);
    }
    return seconds_since(start);
  };
  const auto [seconds, iterations] = best_time(run, min_seconds);
  Timing timing;
  timing.seconds = seconds;
  timing.calls = iterations * threads;
  timing.gflops = 2.0 * s.m * s.k * s.n * double(timing.calls) / seconds * 1e-9;
  return timing;
}

// One sgemm at a time from this thread, OpenBLAS threading it itself.
Timing square_sgemm(int size, double min_seconds) {
  const size_t count = size_t(size) * size;
  std::vector<float> a(count), b(count), c(count, 0.0f);
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  for (size_t i = 0; i < count; ++i) a[i] = u(rng), b[i] = u(rng);
  auto run = [&](long iterations) {
    const auto start = Clock::now();
    for (long i = 0; i < iterations; ++i)
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, size, size, size, 1.0f, a.data(), size,
                  b.data(), size, 0.0f, c.data(), size);
    return seconds_since(start);
  };
  const auto [seconds, iterations] = best_time(run, min_seconds);
  Timing timing;
  timing.seconds = seconds;
  timing.calls = iterations;
  timing.gflops = 2.0 * double(size) * size * size * double(iterations) / seconds * 1e-9;
  return timing;
}

// ---------------------------------------------------------------------------------------------
// The network: a ResNet with random weights, written and read back as a model file.


// "layer2.0.conv1" → "layer2"; "conv1" → "conv1"; "fc" → "fc".
std::string layer_group(const std::string& name) { return name.substr(0, name.find('.')); }

std::vector<std::string> layer_groups(const ResNet& net) {
  std::vector<std::string> groups;
  for (const CimLayerSpec& spec : net.cim_layers()) {
    const std::string g = layer_group(spec.name);
    if (std::find(groups.begin(), groups.end(), g) == groups.end()) groups.push_back(g);
  }
  return groups;
}

// The sgemm calls the backend makes for one image of one layer, as (shape, flops) per sub-array.
struct LayerGemms {
  std::vector<std::pair<GemmShape, double>> calls;
  double flops = 0;
  double partial_sums = 0;  // GEMM outputs = ADC conversions (incl. the reference row)
};

std::vector<LayerGemms> backend_gemms(const ResNet& net, const CpuCimBackend& backend,
                                      const CimConfig& config, double sigma) {
  const std::vector<int64_t> macs = net.layer_macs();
  std::vector<LayerGemms> out;
  const int operand_extra = config.chip(sigma, 0, 0).reference_rows();
  for (const QuantisedLayer& layer : backend.layers()) {
    LayerGemms g;
    const CimLayerSpec& spec = layer.spec;
    const double positions = double(macs[layer.index]) / (double(spec.out_channels) * spec.rows());
    const int m = config.cells_per_weight() * spec.out_channels + operand_extra;
    for (int s = 0; s < layer.subarrays(); ++s) {
      const int width = layer.subarray_begin[s + 1] - layer.subarray_begin[s];
      const double flops = 2.0 * m * width * positions * config.input_bits;
      g.calls.push_back({GemmShape{m, width, kBackendChunk}, flops});
      g.flops += flops;
      g.partial_sums += double(m) * positions * config.input_bits;
    }
    out.push_back(g);
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Inference

// Forwards every call to the CPU backend and times each layer.
class TimedBackend : public CimBackend {
 public:
  TimedBackend(CpuCimBackend& inner, size_t layers) : inner_(inner), seconds_(layers, 0.0) {}
  std::string name() const override { return inner_.name(); }
  void program_chip(uint32_t trial, double sigma) override { inner_.program_chip(trial, sigma); }
  void set_calibrating(bool on) override { inner_.set_calibrating(on); }
  void set_all_digital(bool on) override { inner_.set_all_digital(on); }
  void begin_batch(uint32_t batch_index) override { inner_.begin_batch(batch_index); }
  void run_layer(int index, const float* x, int n, int h, int w, float* y) override {
    const auto start = Clock::now();
    inner_.run_layer(index, x, n, h, w, y);
    seconds_[size_t(index)] += seconds_since(start);
  }
  void reset() { std::fill(seconds_.begin(), seconds_.end(), 0.0); }
  const std::vector<double>& seconds() const { return seconds_; }

 private:
  CpuCimBackend& inner_;
  std::vector<double> seconds_;
};

struct TrialTiming {
  int trial = 0;
  double program_s = 0, forward_s = 0;
  double forward_cpu_s = 0;     // process CPU time of the forward: wall × threads when unloaded
  std::vector<double> layer_s;  // per CIM layer
  double logit_checksum = 0;    // Σ final logits: the same on every rerun and thread count
};

struct ModeRun {
  std::string mode;        // dynamic, fixed, calibrated, ideal, digital
  std::string reads;       // lookup, gemm (CIM modes); "-" for digital
  double table_bytes = 0;  // look-up tables of the last chip
  double sigma = 0;
  int images = 0;
  double work_flops_per_image = 0;  // CIM: 2·ab·nc·ΣMACs; digital: 2·ΣMACs (double GEMM)
  double calibration_s = 0;
  std::vector<TrialTiming> trials;
};

bool is_cim_mode(const std::string& mode) { return mode != "digital"; }

ModeRun run_mode(const RandomModel& model, const std::vector<uint8_t>& pixels, int images,
                 const std::string& mode, CpuReads reads, double sigma, int trials,
                 bool progress) {
  const ResNet& net = *model.loaded.network;
  const ResNetArch& arch = net.arch();
  CimConfig config;  // the documented defaults
  const bool digital = !is_cim_mode(mode);
  if (!digital) config.adc = parse_adc_mode(mode);
  CpuCimBackend backend(net.cim_layers(), config);
  backend.set_reads(reads);
  TimedBackend timed(backend, net.cim_layers().size());
  const size_t per_image = size_t(arch.in_channels) * arch.input_height * arch.input_width;
  std::vector<float> batch;
  auto load_batch = [&](int first, int count) {
    batch.resize(size_t(count) * per_image);
    const uint8_t* src = pixels.data() + size_t(first) * per_image;
    for (size_t i = 0; i < batch.size(); ++i) batch[i] = src[i] * (1.0f / 255.0f);
  };

  ModeRun run;
  run.mode = mode;
  run.reads = digital ? "-" : (reads == CpuReads::kLookup ? "lookup" : "gemm");
  run.sigma = digital ? 0.0 : sigma;
  run.images = images;
  run.work_flops_per_image = 2.0 * double(model.total_macs) *
                             (digital ? 1.0 : double(config.input_bits) * config.cells_per_weight());
  if (config.adc == AdcMode::kCalibrated && !digital) {
    // As TrialRunner does: the clean chip's largest partial sums over the first batch.
    const auto start = Clock::now();
    const int count = std::min(images, config.batch_size);
    load_batch(0, count);
    calibrate_adc(backend, net, batch.data(), count);
    run.calibration_s = seconds_since(start);
  }
  for (int trial = 0; trial < trials; ++trial) {
    TrialTiming t;
    t.trial = digital ? -1 : trial;
    backend.set_all_digital(digital);
    auto start = Clock::now();
    backend.program_chip(digital ? 0u : uint32_t(trial), run.sigma);
    t.program_s = seconds_since(start);
    timed.reset();
    start = Clock::now();
    const double cpu_start = cpu_seconds();
    const int batches = (images + config.batch_size - 1) / config.batch_size;
    for (int b = 0; b < batches; ++b) {
      const int first = b * config.batch_size, count = std::min(config.batch_size, images - first);
      load_batch(first, count);
      timed.begin_batch(uint32_t(b));
      const auto logits = net.forward(batch.data(), count, timed);
      for (float v : logits.back()) t.logit_checksum += v;
      if (progress)
        std::fprintf(stderr, "\r  %s: batch %d/%d, %.0f s, max RSS %.0f MiB   ", mode.c_str(), b + 1,
                     batches, seconds_since(start), max_rss_kib() / 1024.0);
    }
    if (progress) std::fprintf(stderr, "\n");
    t.forward_s = seconds_since(start);
    t.forward_cpu_s = cpu_seconds() - cpu_start;
    t.layer_s = timed.seconds();
    run.table_bytes = double(backend.lookup_table_bytes());
    run.trials.push_back(t);
  }
  return run;
}

double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t h = v.size() / 2;
  return v.size() % 2 ? v[h] : 0.5 * (v[h - 1] + v[h]);
}

// ---------------------------------------------------------------------------------------------

struct Options {
  int images = 500;
  int threads = 0;
  std::vector<int> depths{20};
  bool memory = false;
  bool memory_only = false;
  int memory_images = 10000;
  int memory_depth = 56;
  int trials = 2;
  double sigma = 0.1;
  std::vector<std::string> modes{"dynamic", "fixed", "ideal", "digital"};
  double gemm_seconds = 0.4;
  uint64_t seed = 20240601;
  std::string json_path;
};

json timing_json(const Timing& t) {
  return {{"gflops", t.gflops}, {"best_seconds", t.seconds}, {"sgemm_calls", t.calls}};
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  CLI::App app{"bench_cim_cpu: CPU CIM inference speed against the sgemm rate of this machine"};
  app.add_option("--images", o.images, "images per timed forward run (batches of 500)")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--threads", o.threads, "OpenMP threads (default: omp_get_max_threads())");
  app.add_option("--depth", o.depths, "ResNet depths to time, e.g. --depth 20 56")
      ->capture_default_str();
  app.add_option("--trials", o.trials, "chips (σ > 0) per mode; each reprograms and reruns")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--sigma", o.sigma, "conductance variation σ (device mode)")->capture_default_str();
  app.add_option("--modes", o.modes, "dynamic, fixed, calibrated, ideal, digital")
      ->delimiter(',')
      ->capture_default_str();
  app.add_flag("--memory", o.memory,
               "also: peak RSS after ResNet-56 over 10,000 images (hours on a small machine)");
  app.add_flag("--memory-only", o.memory_only, "only the memory run (implies --memory)");
  app.add_option("--memory-images", o.memory_images, "images of the memory run")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--memory-depth", o.memory_depth, "ResNet depth of the memory run")
      ->capture_default_str();
  app.add_option("--gemm-seconds", o.gemm_seconds, "target seconds per baseline repetition")
      ->capture_default_str();
  app.add_option("--seed", o.seed, "seed of the random weights and images")->capture_default_str();
  app.add_option("--json", o.json_path, "write every raw number and the machine details here");
  CLI11_PARSE(app, argc, argv);
  if (o.memory_only) o.memory = true;
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // the table and the progress on stderr stay in order

  try {
    if (o.threads > 0) omp_set_num_threads(o.threads);
    const int threads = omp_get_max_threads();
    const int blas_default_threads = openblas_get_num_threads();
    for (const std::string& m : o.modes)
      if (is_cim_mode(m)) parse_adc_mode(m);  // UserError on a typo, before any work

    std::string command;
    for (int i = 0; i < argc; ++i) command += (i ? " " : "") + std::string(argv[i]);
    const std::string git = std::string("git -C '") + CIMSWEEP_SOURCE_DIR + "' ";
    std::string commit = command_output(git + "rev-parse HEAD 2>/dev/null");
    if (commit.empty()) commit = "unknown (no git commit)";
    const bool dirty = !command_output(git + "status --porcelain 2>/dev/null").empty();

    json report;
    report["benchmark"] = "bench_cim_cpu";
    report["cimsweep_version"] = CIMSWEEP_VERSION;
    report["date_utc"] = utc_now();
    report["command"] = command;
    report["commit"] = commit;
    report["worktree_dirty"] = dirty;
    report["machine"] = {{"cpu_model", cpu_model()},
                         {"hardware_threads", std::thread::hardware_concurrency()},
                         {"omp_threads", threads},
                         {"openblas_default_threads", blas_default_threads},
                         {"openblas_config", openblas_get_config()},
                         {"openblas_core", openblas_get_corename()},
                         {"load_average_at_start", load_average()},
                         {"compiler", __VERSION__}};
    report["options"] = {{"images", o.images},         {"threads", threads},
                         {"depths", o.depths},         {"trials", o.trials},
                         {"sigma", o.sigma},           {"modes", o.modes},
                         {"memory", o.memory},         {"memory_images", o.memory_images},
                         {"memory_depth", o.memory_depth}, {"seed", o.seed}};
    report["cim_config"] = CimConfig{}.to_json();

    std::printf("bench_cim_cpu — cimsweep %s, commit %s%s\n", CIMSWEEP_VERSION, commit.c_str(),
                dirty ? " (+ uncommitted changes)" : "");
    std::printf("CPU: %s, %u hardware threads; OpenMP threads %d; OpenBLAS %s (default %d threads)\n",
                cpu_model().c_str(), std::thread::hardware_concurrency(), threads,
                trim(openblas_get_config()).c_str(), blas_default_threads);
    std::printf("load average at start: %s; seed %llu\n\n", load_average().c_str(),
                (unsigned long long)o.seed);

    // The networks first: the baseline measures the shapes they issue.
    std::vector<RandomModel> models;
    if (!o.memory_only)
      for (int depth : o.depths) models.push_back(make_random_resnet(depth, o.seed, "bench_cim_cpu"));

    // ---- 1. Baseline ----
    const CimConfig defaults;
    std::map<GemmShape, Timing> per_thread_1, per_thread_default;
    Timing square;
    if (!o.memory_only) {
      std::set<GemmShape> shapes;
      for (const RandomModel& m : models) {
        CpuCimBackend probe(m.loaded.network->cim_layers(), defaults);
        for (const LayerGemms& g : backend_gemms(*m.loaded.network, probe, defaults, o.sigma))
          for (const auto& call : g.calls) shapes.insert(call.first);
      }
      std::printf("== 1. Baseline: OpenBLAS cblas_sgemm (row-major, no transpose), best of 3 ==\n");
      std::printf("Each of the %d OpenMP threads runs its own sgemm of the backend's shapes "
                  "(M = %d·out + 1, K = sub-array rows, N = %d):\n",
                  threads, defaults.cells_per_weight(), kBackendChunk);
      std::printf("  %-14s %22s %26s\n", "M×K×N", "OpenBLAS 1 thread", "OpenBLAS default threads");
      for (const GemmShape& s : shapes) {
        openblas_set_num_threads(1);
        per_thread_1[s] = per_thread_sgemm(s, threads, o.gemm_seconds);
        openblas_set_num_threads(blas_default_threads);
        per_thread_default[s] = per_thread_sgemm(s, threads, o.gemm_seconds);
        std::printf("  %-14s %15.1f GFLOP/s %19.1f GFLOP/s\n", s.label().c_str(),
                    per_thread_1[s].gflops, per_thread_default[s].gflops);
      }
      openblas_set_num_threads(threads);
      square = square_sgemm(1024, o.gemm_seconds);
      openblas_set_num_threads(blas_default_threads);
      std::printf("One 1024×1024×1024 sgemm, OpenBLAS on %d threads: %.1f GFLOP/s\n\n", threads,
                  square.gflops);
      json shapes_json = json::array();
      for (const GemmShape& s : shapes)
        shapes_json.push_back({{"m", s.m},
                               {"k", s.k},
                               {"n", s.n},
                               {"per_thread_openblas_1_thread", timing_json(per_thread_1[s])},
                               {"per_thread_openblas_default", timing_json(per_thread_default[s])}});
      report["baseline"] = {{"threads", threads},
                            {"backend_shapes", shapes_json},
                            {"square_1024", timing_json(square)},
                            {"square_1024_openblas_threads", threads}};
    }

    // ---- 2. Inference ----
    const int blas_threads_for_cim = openblas_get_num_threads();
    report["openblas_threads_during_cim"] = blas_threads_for_cim;
    std::vector<uint8_t> pixels;
    {
      const int most = std::max(o.images, o.memory ? o.memory_images : 0);
      std::mt19937_64 rng(o.seed);
      std::uniform_int_distribution<int> byte(0, 255);
      pixels.resize(size_t(most) * 3 * 32 * 32);
      for (uint8_t& p : pixels) p = uint8_t(byte(rng));
    }
    json networks_json = json::array();
    for (const RandomModel& model : models) {
      const ResNet& net = *model.loaded.network;
      CpuCimBackend probe(net.cim_layers(), defaults);
      const std::vector<LayerGemms> gemms = backend_gemms(net, probe, defaults, o.sigma);
      const std::vector<std::string> groups = layer_groups(net);
      // GEMM-bound estimates per image: the backend's sgemm flops at the measured per-thread rates.
      std::vector<double> bound_1(gemms.size(), 0), bound_default(gemms.size(), 0);
      double gemm_flops = 0, partial_sums = 0;
      for (size_t l = 0; l < gemms.size(); ++l) {
        gemm_flops += gemms[l].flops;
        partial_sums += gemms[l].partial_sums;
        for (const auto& [shape, flops] : gemms[l].calls) {
          bound_1[l] += flops / (per_thread_1.at(shape).gflops * 1e9);
          bound_default[l] += flops / (per_thread_default.at(shape).gflops * 1e9);
        }
      }
      double bound_1_total = 0, bound_default_total = 0;
      for (size_t l = 0; l < gemms.size(); ++l)
        bound_1_total += bound_1[l], bound_default_total += bound_default[l];
      const double mix_1 = gemm_flops / bound_1_total * 1e-9;
      const double mix_default = gemm_flops / bound_default_total * 1e-9;
      const double cim_work = 2.0 * defaults.input_bits * defaults.cells_per_weight() * model.total_macs;

      std::printf("== 2. %s, random weights (seed %llu) ==\n", net.arch().describe().c_str(),
                  (unsigned long long)o.seed);
      std::printf("%zu CIM layers, %.2f MMAC/image; CIM work 2·%d·%d·MACs = %.3f GFLOP/image "
                  "(backend sgemm incl. reference row: %.3f)\n",
                  net.cim_layers().size(), model.total_macs * 1e-6, defaults.input_bits,
                  defaults.cells_per_weight(), cim_work * 1e-9, gemm_flops * 1e-9);
      std::printf("%.1f M partial sums (ADC conversions) per image: %.1f flops of sgemm each\n",
                  partial_sums * 1e-6, gemm_flops / partial_sums);
      std::printf("GEMM baseline for this network's shape mix: %.1f GFLOP/s (OpenBLAS 1 thread per "
                  "OpenMP thread), %.1f GFLOP/s (OpenBLAS default threads); 1024³: %.1f GFLOP/s\n",
                  mix_1, mix_default, square.gflops);
      std::printf("CIM config: defaults (wb 8 on 2 cells, ab 8, R 128, ADC 10 bits, batch %d), "
                  "σ = %g device; %d images; OpenBLAS %d thread(s) during the CIM runs\n",
                  defaults.batch_size, o.sigma, o.images, blas_threads_for_cim);
      std::printf("  %-15s %5s %5s %9s %9s %9s %9s %11s %8s %8s %9s\n", "mode/reads", "σ", "trial",
                  "program", "forward", "CPU time", "images/s", "eff GFLOP/s", "÷mix", "÷1024³",
                  "GEMM-bound");
      json runs_json = json::array();
      json speedup = json::object();
      std::map<std::string, double> gemm_images_per_s;
      for (const std::string& mode : o.modes)
        for (CpuReads reads : {CpuReads::kGemm, CpuReads::kLookup}) {
          if (!is_cim_mode(mode) && reads == CpuReads::kLookup) continue;  // digital: no reads
          const ModeRun run = run_mode(model, pixels, o.images, mode, reads, o.sigma,
                                       is_cim_mode(mode) ? o.trials : 1, false);
          const std::string label = is_cim_mode(mode) ? mode + "/" + run.reads : mode;
          json trials_json = json::array();
          std::vector<double> rates;
          for (const TrialTiming& t : run.trials) {
            const double rate = run.work_flops_per_image * run.images / t.forward_s * 1e-9;
            rates.push_back(rate);
            const bool cim = is_cim_mode(mode);
            char ratio_mix[16] = "-", ratio_square[16] = "-", bound[16] = "-";
            if (cim) {
              std::snprintf(ratio_mix, sizeof ratio_mix, "%.3f", rate / mix_1);
              std::snprintf(ratio_square, sizeof ratio_square, "%.3f", rate / square.gflops);
              std::snprintf(bound, sizeof bound, "%.0f %%",
                            100.0 * bound_1_total * run.images / t.forward_s);
            }
            std::printf("  %-15s %5.2g %5d %8.2fs %8.2fs %8.2fs %9.1f %11.1f %8s %8s %9s\n",
                        label.c_str(), run.sigma, t.trial, t.program_s, t.forward_s,
                        t.forward_cpu_s, run.images / t.forward_s, rate, ratio_mix, ratio_square,
                        bound);
            trials_json.push_back(
                {{"trial", t.trial},
                 {"program_chip_s", t.program_s},
                 {"forward_s", t.forward_s},
                 {"forward_cpu_s", t.forward_cpu_s},
                 {"images_per_s", run.images / t.forward_s},
                 {"effective_gflops", rate},
                 {"ratio_to_shape_mix", cim ? json(rate / mix_1) : json(nullptr)},
                 {"ratio_to_square_1024", cim ? json(rate / square.gflops) : json(nullptr)},
                 {"layer_seconds", t.layer_s},
                 {"logit_checksum", t.logit_checksum}});
          }
          // Where the time goes, last trial: per layer group, against the GEMM-bound estimate.
          const TrialTiming& last = run.trials.back();
          double in_layers = 0;
          std::string line = "             layers, s (GEMM-bound est.):";
          for (const std::string& g : groups) {
            double s = 0, b = 0;
            for (size_t l = 0; l < last.layer_s.size(); ++l)
              if (layer_group(net.cim_layers()[l].name) == g)
                s += last.layer_s[l], b += bound_1[l] * run.images;
            in_layers += s;
            char part[96];
            if (is_cim_mode(mode))
              std::snprintf(part, sizeof part, " %s %.2f (%.2f)", g.c_str(), s, b);
            else
              std::snprintf(part, sizeof part, " %s %.2f", g.c_str(), s);
            line += part;
          }
          char rest[128];
          std::snprintf(rest, sizeof rest,
                        " | outside CIM layers %.2f | per partial sum: %.1f ns wall, %.1f ns CPU",
                        last.forward_s - in_layers,
                        last.forward_s / (partial_sums * run.images) * 1e9,
                        last.forward_cpu_s / (partial_sums * run.images) * 1e9);
          std::printf("%s%s\n", line.c_str(), rest);
          const double images_per_s = median(rates) / run.work_flops_per_image * 1e9;
          if (run.trials.size() > 1)
            std::printf("             median over %zu trials: %.1f images/s, %.1f GFLOP/s\n",
                        run.trials.size(), images_per_s, median(rates));
          if (reads == CpuReads::kGemm) {
            gemm_images_per_s[mode] = images_per_s;
          } else {
            speedup[mode] = images_per_s / gemm_images_per_s.at(mode);
            std::printf(
                "             look-up reads: %.2f× the GEMM reads' images/s; tables %.1f MB\n",
                double(speedup[mode]), run.table_bytes * 1e-6);
          }
          runs_json.push_back({{"mode", mode},
                               {"reads", run.reads},
                               {"images_per_s_median", images_per_s},
                               {"lookup_table_bytes", run.table_bytes},
                               {"sigma", run.sigma},
                               {"images", run.images},
                               {"work_flops_per_image", run.work_flops_per_image},
                               {"calibration_s", run.calibration_s},
                               {"trials", trials_json},
                               {"max_rss_kib_after", max_rss_kib()}});
        }
      json layers_json = json::array();
      for (size_t l = 0; l < net.cim_layers().size(); ++l) {
        json calls = json::array();
        for (const auto& [shape, flops] : gemms[l].calls) calls.push_back({shape.m, shape.k, shape.n});
        layers_json.push_back({{"name", net.cim_layers()[l].name},
                               {"macs", model.macs[l]},
                               {"sgemm_shapes_mkn", calls},
                               {"gemm_bound_s_per_image", bound_1[l]}});
      }
      networks_json.push_back({{"arch", net.arch().to_json()},
                               {"description", net.arch().describe()},
                               {"macs_per_image", model.total_macs},
                               {"cim_work_flops_per_image", cim_work},
                               {"backend_sgemm_flops_per_image", gemm_flops},
                               {"partial_sums_per_image", partial_sums},
                               {"shape_mix_gflops_openblas_1_thread", mix_1},
                               {"shape_mix_gflops_openblas_default", mix_default},
                               {"gemm_bound_s_per_image", bound_1_total},
                               {"layers", layers_json},
                               {"speedup", speedup},
                               {"runs", runs_json}});
      std::printf("  (eff GFLOP/s: CIM work / forward time; digital: 2·MACs in double. ÷mix: against "
                  "the shape-mix rate with OpenBLAS 1 thread per OpenMP thread; GEMM-bound: the time "
                  "those sgemms alone would take, as a share of the forward time)\n\n");
    }
    report["networks"] = networks_json;

    // ---- 3. Memory ----
    if (o.memory) {
      const long before = max_rss_kib();
      std::printf("== 3. Memory: ResNet-%d, ADC dynamic, σ = %g, %d images ==\n", o.memory_depth,
                  o.sigma, o.memory_images);
      const RandomModel model = make_random_resnet(o.memory_depth, o.seed, "bench_cim_cpu");
      const ModeRun run = run_mode(model, pixels, o.memory_images, "dynamic", CpuReads::kLookup,
                                   o.sigma, 1, true);
      const long after = max_rss_kib();
      std::printf("  forward %.1f s (%.1f images/s); peak RSS (ru_maxrss) before %.0f MiB, after "
                  "%.0f MiB = %.2f GB (target ≤ 2 GB)\n\n",
                  run.trials[0].forward_s, o.memory_images / run.trials[0].forward_s, before / 1024.0,
                  after / 1024.0, after * 1024.0 * 1e-9);
      report["memory"] = {{"depth", o.memory_depth},
                          {"images", o.memory_images},
                          {"mode", "dynamic"},
                          {"sigma", o.sigma},
                          {"forward_s", run.trials[0].forward_s},
                          {"max_rss_kib_before", before},
                          {"max_rss_kib_after", after},
                          {"logit_checksum", run.trials[0].logit_checksum}};
    }
    report["load_average_at_end"] = load_average();
    report["max_rss_kib_at_end"] = max_rss_kib();
    std::printf("load average at end: %s\n", load_average().c_str());

    if (!o.json_path.empty()) {
      write_output_file(o.json_path, report.dump(2) + "\n", "benchmark report");
      std::printf("raw numbers written to %s\n", o.json_path.c_str());
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_cim_cpu: %s\n", e.what());
    return 1;
  }
  return 0;
}
