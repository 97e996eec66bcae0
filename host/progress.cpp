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

Progress::Progress(size_t total_units, size_t images_per_unit, bool enabled, int slots)
    : total_(total_units),
      images_per_unit_(images_per_unit),
      slot_images_(size_t(slots > 0 ? slots : 1), 0),
      visible_(enabled && isatty(STDERR_FILENO)) {
  start_ = last_draw_ = std::chrono::steady_clock::now();
}

Progress::~Progress() {
  finish();
}

void Progress::start_unit(int slot, const std::string& what) {
  std::lock_guard<std::mutex> lock(mutex_);
  what_ = what;
  slot_images_.at(size_t(slot)) = 0;
  draw(true);
}

void Progress::images_done(int slot, size_t images) {
  std::lock_guard<std::mutex> lock(mutex_);
  slot_images_.at(size_t(slot)) = images;
  draw(false);
}

void Progress::unit_done(int slot) {
  std::lock_guard<std::mutex> lock(mutex_);
  ++done_;
  slot_images_.at(size_t(slot)) = 0;
  draw(true);
}

void Progress::draw(bool force) {
  if (!visible_ || finished_) return;
  const auto now = std::chrono::steady_clock::now();
  if (!force && now - last_draw_ < std::chrono::milliseconds(250)) return;
  last_draw_ = now;
  // Units in flight count by the fraction of their images done, so the rate moves within a trial.
  size_t running_images = 0;
  for (size_t images : slot_images_) running_images += images;
  const double units =
      double(done_) + (images_per_unit_ ? double(running_images) / double(images_per_unit_) : 0.0);
  const double elapsed = std::chrono::duration<double>(now - start_).count();
  const double rate = units > 0 && elapsed > 0 ? units / elapsed : 0.0;
  const double eta = rate > 0 ? (double(total_) - units) / rate : -1;
  std::fprintf(stderr, "\r\033[K%zu/%zu trials  %.3g trials/s  ETA %s  | %s", done_, total_, rate,
               format_duration(eta).c_str(), what_.c_str());
  if (slot_images_.size() == 1)
    std::fprintf(stderr, "  %zu/%zu images", slot_images_[0], images_per_unit_);
  else
    std::fprintf(stderr, "  (%zu workers)", slot_images_.size());
  std::fflush(stderr);
}

void Progress::finish() {
  std::lock_guard<std::mutex> lock(mutex_);
  if (visible_ && !finished_) {
    std::fprintf(stderr, "\r\033[K");
    std::fflush(stderr);
  }
  finished_ = true;
}

}  // namespace cimsweep
