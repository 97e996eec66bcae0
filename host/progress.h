// A one-line progress display (trials done, trials/s, ETA, images of the running trial) on a
// terminal's stderr; silent when stderr is a file or a pipe, so logs stay clean.
#pragma once
#include <chrono>
#include <cstddef>
#include <string>

namespace cimsweep {

class Progress {
 public:
  // enabled: false forces silence (--quiet); otherwise shown only when stderr is a terminal.
  Progress(size_t total_units, bool enabled);
  ~Progress();
  void start_unit(const std::string& what, size_t images);
  void images_done(size_t images);
  void unit_done();
  void finish();
  bool visible() const { return visible_; }

 private:
  void draw(bool force);

  size_t total_, done_ = 0, unit_images_ = 0, images_ = 0;
  std::string what_;
  bool visible_ = false, finished_ = false;
  std::chrono::steady_clock::time_point start_, unit_start_, last_draw_;
  double completed_fraction_seconds_ = 0;  // seconds spent on finished units
};

std::string format_duration(double seconds);

}  // namespace cimsweep
