#include "host/progress.h"

#include <unistd.h>

#include <cstdio>

namespace cimsweep {

std::string format_duration(double seconds) {
  if (!(seconds >= 0) || seconds > 1e8) return "?";
  const long s = long(seconds + 0.5);
  char buf[32];
  if (s >= 3600)
    std::snprintf(buf, sizeof buf, "%ldh%02ldm", s / 3600, (s / 60) % 60);
  else if (s >= 60)
    std::snprintf(buf, sizeof buf, "%ldm%02lds", s / 60, s % 60);
  else
    std::snprintf(buf, sizeof buf, "%lds", s);
  return buf;
}

Progress::Progress(size_t total_units, bool enabled)
    : total_(total_units), visible_(enabled && isatty(STDERR_FILENO)) {
  start_ = unit_start_ = last_draw_ = std::chrono::steady_clock::now();
}

Progress::~Progress() {
  finish();
}

void Progress::start_unit(const std::string& what, size_t images) {
  what_ = what;
  unit_images_ = images;
  images_ = 0;
  unit_start_ = std::chrono::steady_clock::now();
  draw(true);
}

void Progress::images_done(size_t images) {
  images_ = images;
  draw(false);
}

void Progress::unit_done() {
  ++done_;
  completed_fraction_seconds_ +=
      std::chrono::duration<double>(std::chrono::steady_clock::now() - unit_start_).count();
  draw(true);
}

void Progress::draw(bool force) {
  if (!visible_ || finished_) return;
  const auto now = std::chrono::steady_clock::now();
  if (!force && now - last_draw_ < std::chrono::milliseconds(250)) return;
  last_draw_ = now;
  const double unit_elapsed = std::chrono::duration<double>(now - unit_start_).count();
  const double unit_fraction = unit_images_ ? double(images_) / double(unit_images_) : 0.0;
  const double units = double(done_) + unit_fraction;
  const double elapsed = completed_fraction_seconds_ + unit_elapsed;
  const double rate = units > 0 && elapsed > 0 ? units / elapsed : 0.0;
  const double eta = rate > 0 ? (double(total_) - units) / rate : -1;
  std::fprintf(stderr, "\r\033[K%zu/%zu trials  %.3g trials/s  ETA %s  | %s  %zu/%zu images", done_,
               total_, rate, format_duration(eta).c_str(), what_.c_str(), images_, unit_images_);
  std::fflush(stderr);
}

void Progress::finish() {
  if (visible_ && !finished_) {
    std::fprintf(stderr, "\r\033[K");
    std::fflush(stderr);
  }
  finished_ = true;
}

}  // namespace cimsweep
