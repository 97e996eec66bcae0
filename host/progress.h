// A one-line progress display (trials done, trials/s, ETA, images of the running trial) on a
// terminal's stderr; silent when stderr is a file or a pipe, so logs stay clean. Thread-safe:
// several workers (one per device) may report their trials at once, each in its own slot.
#pragma once
#include <chrono>
#include <cstddef>
#include <mutex>
#include <string>
#include <vector>

namespace cimsweep {

class Progress {
 public:
  // enabled: false forces silence (--quiet); otherwise shown only when stderr is a terminal.
  // Every unit classifies `images_per_unit` images; `slots` workers run units concurrently.
  Progress(size_t total_units, size_t images_per_unit, bool enabled, int slots = 1);
  ~Progress();
  void start_unit(int slot, const std::string& what);
  void images_done(int slot, size_t images);
  void unit_done(int slot);
  void finish();
  bool visible() const { return visible_; }

 private:
  void draw(bool force);  // with mutex_ held

  size_t total_, done_ = 0, images_per_unit_;
  std::vector<size_t> slot_images_;  // images done by each slot's running unit
  std::string what_;                 // the unit started last
  bool visible_ = false, finished_ = false;
  std::chrono::steady_clock::time_point start_, last_draw_;
  std::mutex mutex_;
};

std::string format_duration(double seconds);

}  // namespace cimsweep
