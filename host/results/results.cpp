#include "host/results/results.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <sstream>
#include <unordered_map>

#include "common/errors.h"
#include "host/io/output_file.h"

namespace cimsweep {
namespace {

using nlohmann::json;

// Model labels come from file names, which on Linux need not be valid UTF-8; nlohmann's default
// dump would throw on them. Replacing bad bytes keeps lines writable, and since unit keys are made
// with the same dump, a record read back still has the key it was written with.
std::string dump_line(const json& value) {
  return value.dump(-1, ' ', false, json::error_handler_t::replace);
}

std::string errno_text() {
  return std::strerror(errno);
}

// What is wrong with a record, without advice: the callers know the context and what to say.
struct RecordProblem {
  std::string what;
};

const json& require_field(const json& object, const char* name) {
  auto it = object.find(name);
  if (it == object.end()) throw RecordProblem{std::string("field '") + name + "' is missing"};
  return *it;
}

[[noreturn]] void ill_typed(const char* name, const char* expected) {
  throw RecordProblem{std::string("field '") + name + "' is not " + expected};
}

std::string string_field(const json& object, const char* name) {
  const json& value = require_field(object, name);
  if (!value.is_string()) ill_typed(name, "a string");
  return value.get<std::string>();
}

// A measured quantity: NaN is written as null by nlohmann, so null reads back as NaN.
double measurement(const json& value, const char* name) {
  if (value.is_null()) return NAN;
  if (!value.is_number()) ill_typed(name, "a number or null");
  return value.get<double>();
}

uint64_t count_field(const json& object, const char* name) {
  const json& value = require_field(object, name);
  if (!value.is_number_unsigned()) ill_typed(name, "a non-negative integer");
  return value.get<uint64_t>();
}

TrialRecord record_from_json(const json& object) {
  if (!object.is_object()) throw RecordProblem{"it is not a JSON object"};
  TrialRecord record;
  record.model = string_field(object, "model");
  record.config_hash = string_field(object, "config_hash");

  const json& sigma = require_field(object, "sigma");
  if (!sigma.is_number()) ill_typed("sigma", "a number");
  record.sigma = sigma.get<double>();
  if (!std::isfinite(record.sigma) || record.sigma < 0) ill_typed("sigma", "finite and >= 0");

  const json& trial = require_field(object, "trial");
  if (!trial.is_number_integer()) ill_typed("trial", "an integer");
  const int64_t trial_value = trial.is_number_unsigned()
                                  ? int64_t(std::min<uint64_t>(trial.get<uint64_t>(), INT64_MAX))
                                  : trial.get<int64_t>();
  if (trial_value < -1 || trial_value > INT_MAX) ill_typed("trial", "an integer >= -1");
  record.trial = int(trial_value);

  record.images = count_field(object, "images");
  record.correct = count_field(object, "correct");
  if (record.correct > record.images) ill_typed("correct", "at most 'images'");
  record.accuracy = measurement(require_field(object, "accuracy"), "accuracy");
  record.seconds = measurement(require_field(object, "seconds"), "seconds");

  auto exits = object.find("exit_accuracy");
  if (exits != object.end() && !exits->is_null()) {
    if (!exits->is_array()) ill_typed("exit_accuracy", "an array");
    for (const json& value : *exits) {
      record.exit_accuracy.push_back(measurement(value, "exit_accuracy"));
    }
  }
  auto extra = object.find("extra");
  if (extra != object.end()) record.extra = *extra;
  return record;
}

bool is_blank(const std::string& line) {
  return std::all_of(line.begin(), line.end(),
                     [](char c) { return std::isspace((unsigned char)c); });
}

// The records of a results file and how many leading bytes of it hold complete lines.
struct ParsedResults {
  std::vector<TrialRecord> records;  // deduplicated by unit key, first kept
  size_t complete_bytes = 0;         // the file is truncated to this length on resume
  size_t dropped_lines = 0;          // torn last line (0 or 1)
};

// Applies the torn-line rules: records are appended as whole lines, so after a crash only the
// last line can be incomplete (no newline) or, after a power loss, hold garbage. Anything wrong
// earlier in the file was not made by a crash and is reported rather than silently dropped.
ParsedResults parse_results_text(const std::string& text, const std::string& path) {
  ParsedResults parsed;
  std::unordered_set<std::string> keys;
  size_t position = 0, line_number = 0;
  while (position < text.size()) {
    const size_t newline = text.find('\n', position);
    if (newline == std::string::npos) {
      parsed.dropped_lines = 1;  // no trailing newline: the write of this line did not finish
      break;
    }
    ++line_number;
    const std::string line = text.substr(position, newline - position);
    const size_t next = newline + 1;
    if (is_blank(line)) {
      parsed.complete_bytes = position = next;
      continue;
    }
    // Records are nearly flat; copying or writing a value nested thousands deep recurses that
    // deep and overflows the stack, so parsing stops at a depth no record comes near.
    constexpr int kMaxNesting = 64;
    const json::parser_callback_t limit_nesting = [&](int depth, json::parse_event_t event, json&) {
      if (depth >= kMaxNesting && (event == json::parse_event_t::object_start ||
                                   event == json::parse_event_t::array_start)) {
        throw UserError("results file '" + path + "' line " + std::to_string(line_number) +
                        " nests JSON deeper than " + std::to_string(kMaxNesting) +
                        " levels, which no trial record does: repair or delete that line, or "
                        "choose another --results path");
      }
      return true;
    };
    json object = json::parse(line, limit_nesting, /*allow_exceptions=*/false);
    if (object.is_discarded()) {
      if (next == text.size()) {
        parsed.dropped_lines = 1;
        break;
      }
      throw UserError("results file '" + path + "' line " + std::to_string(line_number) +
                      " is not valid JSON: repair or delete that line, or choose another "
                      "--results path");
    }
    try {
      TrialRecord record = record_from_json(object);
      if (keys.insert(unit_key(record)).second) parsed.records.push_back(std::move(record));
    } catch (const RecordProblem& problem) {
      throw UserError("results file '" + path + "' line " + std::to_string(line_number) +
                      " is not a trial record (" + problem.what +
                      "): repair or delete that line, or choose another --results path");
    }
    parsed.complete_bytes = position = next;
  }
  return parsed;
}

std::string read_fd(int fd, const std::string& path) {
  std::string text;
  char buffer[1 << 16];
  off_t offset = 0;
  for (;;) {
    const ssize_t got = pread(fd, buffer, sizeof buffer, offset);
    if (got < 0 && errno == EINTR) continue;
    if (got < 0) {
      throw UserError("cannot read results file '" + path + "': " + errno_text() +
                      ": check its permissions or choose another --results path");
    }
    if (got == 0) return text;
    text.append(buffer, size_t(got));
    offset += got;
  }
}

// The process holding a flock on the file open as fd, from /proc/locks ("1: FLOCK ADVISORY
// WRITE 1234 08:01:5678 0 EOF", device numbers in hex); 0 when it cannot be told.
long lock_holder(int fd) {
  struct stat status;
  if (fstat(fd, &status) != 0) return 0;
  std::ifstream locks("/proc/locks");
  char device[32];
  std::snprintf(device, sizeof device, "%02x:%02x:", major(status.st_dev), minor(status.st_dev));
  const std::string exact = device + std::to_string(status.st_ino);
  const std::string inode_only = ":" + std::to_string(status.st_ino);
  long by_inode = 0;
  for (std::string line; std::getline(locks, line);) {
    if (line.find("->") != std::string::npos || line.find("FLOCK") == std::string::npos) continue;
    std::istringstream fields(line);
    std::string number, kind, mode, access, id;
    long pid = 0;
    if (!(fields >> number >> kind >> mode >> access >> pid >> id)) continue;
    if (id == exact) return pid;
    // Some file systems (overlayfs) report another device number than stat.
    if (id.size() > inode_only.size() &&
        id.compare(id.size() - inode_only.size(), inode_only.size(), inode_only) == 0)
      by_inode = pid;
  }
  return by_inode;
}

std::string holder_text(int fd) {
  const long pid = lock_holder(fd);
  return pid > 0 ? "pid " + std::to_string(pid) : "another process";
}

// Takes the writer's lock on a results file. Two writers of one file would compute and append
// every missing trial twice, and one's clean-up could remove the other's file; so a second one
// stops with the holder's pid, or waits. Returns false where the file system has no locks.
bool lock_results_file(int fd, const std::string& path, bool wait) {
  if (flock(fd, LOCK_EX | LOCK_NB) == 0) return true;
  if (errno == EWOULDBLOCK) {
    if (!wait)
      throw UserError("results file '" + path + "' is being written by another cimsweep (" +
                      holder_text(fd) +
                      "): let it finish, pass --wait-for-lock to wait for it, or choose another "
                      "--results path");
    std::fprintf(stderr, "cimsweep: note: waiting for %s, which is writing '%s' (--wait-for-lock)\n",
                 holder_text(fd).c_str(), path.c_str());
    while (flock(fd, LOCK_EX) != 0)
      if (errno != EINTR)
        throw UserError("cannot lock results file '" + path + "': " + errno_text() +
                        ": choose another --results path");
    return true;
  }
  std::fprintf(stderr,
               "cimsweep: note: results file '%s' cannot be locked (%s): make sure no other run "
               "writes it at the same time\n",
               path.c_str(), errno_text().c_str());
  return false;
}

bool same_inode(const struct stat& a, const struct stat& b) {
  return a.st_dev == b.st_dev && a.st_ino == b.st_ino;
}

}  // namespace

json to_json(const TrialRecord& record) {
  json object = {{"model", record.model},       {"config_hash", record.config_hash},
                 {"sigma", record.sigma},       {"trial", record.trial},
                 {"images", record.images},     {"correct", record.correct},
                 {"accuracy", record.accuracy}, {"exit_accuracy", record.exit_accuracy},
                 {"seconds", record.seconds}};
  if (!record.extra.is_null()) object["extra"] = record.extra;
  return object;
}

TrialRecord trial_from_json(const json& json_record) {
  try {
    return record_from_json(json_record);
  } catch (const RecordProblem& problem) {
    throw UserError("invalid trial record: " + problem.what +
                    ": records must be as cimsweep writes them to its results file");
  }
}

std::string unit_key(const TrialRecord& record) {
  // A JSON array escapes the strings, so no model label or hash can make two keys collide, and
  // nlohmann writes sigma as its shortest round-trip decimal.
  return dump_line(json::array({record.model, record.config_hash, record.sigma, record.trial}));
}

ResultsLog::ResultsLog(const std::string& path, bool resume, bool wait_for_lock)
    : path_(path) {
  // Through a symlink (dangling too) to its target: the link stays a link.
  target_ = resolve_symlinks(path, "results file");
  const std::string shown = "'" + path + "'" + (target_ != path ? " (→ '" + target_ + "')" : "");
  // Open, lock, then check that the name still leads to the locked file: a writer that held the
  // lock may have removed it (its run failed before the first trial), and appending to a file
  // no name leads to would lose every trial.
  for (int attempt = 0;; ++attempt) {
    created_ = false;
    // O_EXCL tells whether this object creates the file, which decides the clean-up in the
    // destructor; an existing file is opened read-write so that a torn tail can be truncated.
    fd_ = ::open(target_.c_str(), O_RDWR | O_APPEND | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd_ >= 0) {
      created_ = true;
    } else if (errno == EEXIST) {
      fd_ = ::open(target_.c_str(), O_RDWR | O_APPEND | O_CLOEXEC);
      if (fd_ < 0 && errno == ENOENT && attempt < 100) continue;  // removed meanwhile
    }
    if (fd_ < 0) {
      const std::string directory = std::filesystem::path(target_).parent_path().string();
      if (errno == ENOENT && !directory.empty() && !std::filesystem::exists(directory))
        throw UserError("cannot create results file " + shown + ": directory '" + directory +
                        "' does not exist: create it or choose another --results path");
      throw UserError("cannot open results file " + shown + ": " + errno_text() +
                      ": check its permissions or choose another --results path");
    }
    try {
      struct stat opened;
      if (fstat(fd_, &opened) != 0 || !S_ISREG(opened.st_mode))
        throw UserError("results file " + shown +
                        " is not a regular file: choose another --results path");
      locked_ = lock_results_file(fd_, path, wait_for_lock);
      struct stat named;
      if (locked_ && (::stat(target_.c_str(), &named) != 0 || !same_inode(named, opened)) &&
          attempt < 100) {
        ::close(fd_);
        fd_ = -1;
        continue;
      }
    } catch (...) {
      ::close(fd_);
      fd_ = -1;
      throw;
    }
    break;
  }
  if (created_) sync_directory_of(target_);
  try {
    struct stat status;
    if (fstat(fd_, &status) != 0)
      throw UserError("cannot read results file " + shown + ": " + errno_text());
    if (status.st_size == 0) return;
    // Created here but not empty: another writer opened the new file and took the lock before
    // this one did, ran, and appended (seen under ASan with two concurrent --wait-for-lock runs).
    // Its trials are not ours to remove, and they are resumed like any file's.
    created_ = false;
    const std::string text = read_fd(fd_, path);
    if (!resume) {
      std::string holds;
      try {
        holds =
            "holds " + std::to_string(parse_results_text(text, path).records.size()) + " trials";
      } catch (const UserError&) {
        holds = "is not empty";
      }
      throw UserError("results file '" + path + "' already " + holds +
                      ": pass --resume to continue it or choose another --results path");
    }
    ParsedResults parsed = parse_results_text(text, path);
    if (parsed.complete_bytes < text.size()) {
      // Drop the torn line now: appending after it would turn it into a corrupt middle line.
      if (ftruncate(fd_, off_t(parsed.complete_bytes)) != 0 || fdatasync(fd_) != 0) {
        throw UserError("cannot truncate the torn last line of results file '" + path + "': " +
                        errno_text() + ": check its permissions or choose another --results path");
      }
    }
    existing_ = std::move(parsed.records);
    for (const TrialRecord& record : existing_) keys_.insert(unit_key(record));
  } catch (...) {
    ::close(fd_);
    fd_ = -1;
    throw;
  }
}

ResultsLog::~ResultsLog() {
  if (fd_ < 0) return;
  // Remove the file only if this object made it, still holds the lock (so nobody else can have
  // appended), nothing was written to it, and the name still leads to it: a run that fails
  // before its first trial leaves no empty file that would need --resume, and never takes
  // another process's trials with it.
  struct stat opened, named;
  if (created_ && locked_ && !appended_ && fstat(fd_, &opened) == 0 && opened.st_size == 0 &&
      ::stat(target_.c_str(), &named) == 0 && same_inode(opened, named))
    ::unlink(target_.c_str());
  ::close(fd_);  // releases the lock
}

bool ResultsLog::has(const TrialRecord& unit) const {
  const std::string key = unit_key(unit);
  std::lock_guard<std::mutex> lock(mutex_);
  return keys_.count(key) > 0;
}

void ResultsLog::append(const TrialRecord& record) {
  const std::string line = dump_line(to_json(record)) + '\n';
  std::string key = unit_key(record);
  std::lock_guard<std::mutex> lock(mutex_);
  struct stat status;
  const bool have_size = fstat(fd_, &status) == 0;
  if (!write_all(fd_, line.data(), line.size())) {
    const std::string reason = errno_text();
    // Remove a partial line (disk full) so the file stays valid for --resume even without it.
    if (have_size) (void)ftruncate(fd_, status.st_size);
    throw UserError("cannot append to results file '" + path_ + "': " + reason +
                    ": free disk space or fix permissions, then rerun with --resume");
  }
  // Durable before the caller moves on, so that a power loss costs at most the trial in flight.
  if (fdatasync(fd_) != 0) {
    throw UserError("cannot sync results file '" + path_ + "': " + errno_text() +
                    ": check the disk, then rerun with --resume");
  }
  appended_ = true;
  keys_.insert(std::move(key));
}

std::vector<TrialRecord> read_results_file(const std::string& path, size_t* torn_lines) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    throw UserError("cannot open results file '" + path + "': " + errno_text() +
                    ": check the path given with --results");
  }
  std::string text;
  try {
    text = read_fd(fd, path);
  } catch (...) {
    ::close(fd);
    throw;
  }
  ::close(fd);
  ParsedResults parsed = parse_results_text(text, path);
  if (torn_lines) *torn_lines = parsed.dropped_lines;
  return std::move(parsed.records);
}

ResultsFileLock::ResultsFileLock(const std::string& path, bool wait_for_lock) {
  fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd_ < 0) return;  // nothing to protect yet
  try {
    lock_results_file(fd_, path, wait_for_lock);
  } catch (...) {
    ::close(fd_);
    fd_ = -1;
    throw;
  }
}

ResultsFileLock::~ResultsFileLock() {
  if (fd_ >= 0) ::close(fd_);
}

namespace {

// "cim.adc-bits: 10 vs 6": the first setting in which two records' extra["settings"] differ.
std::string first_difference(const json& a, const json& b, const std::string& where = "") {
  if (a.is_object() && b.is_object()) {
    for (const auto& [key, value] : a.items()) {
      const std::string name = where.empty() ? key : where + "." + key;
      if (!b.contains(key)) return name + ": " + dump_line(value) + " vs (none)";
      const std::string inner = first_difference(value, b[key], name);
      if (!inner.empty()) return inner;
    }
    for (const auto& [key, value] : b.items())
      if (!a.contains(key))
        return (where.empty() ? key : where + "." + key) + ": (none) vs " + dump_line(value);
    return "";
  }
  return a == b ? "" : where + ": " + dump_line(a) + " vs " + dump_line(b);
}

}  // namespace

std::vector<TrialRecord> merge_results(const std::vector<std::string>& paths,
                                       bool allow_mixed_settings) {
  if (paths.empty()) throw UserError("nothing to merge: name the shard results files");
  std::vector<TrialRecord> merged;
  std::unordered_map<std::string, size_t> by_unit;                    // unit key → index
  std::unordered_map<std::string, std::pair<std::string, std::string>> config_of;  // model → hash, file
  std::unordered_map<std::string, size_t> model_order;
  // The data and CIM settings of the first model (records of older versions carry none).
  std::string settings_model;
  json settings;
  for (const std::string& path : paths) {
    size_t torn = 0;
    for (TrialRecord& record : read_results_file(path, &torn)) {
      auto [config, new_model] = config_of.emplace(record.model, std::make_pair(record.config_hash, path));
      if (!new_model && config->second.first != record.config_hash)
        throw UserError("model '" + record.model + "' has results of two configurations (in '" +
                        config->second.second +
                        (config->second.second == path ? "" : "' and '" + path) +
                        "'; a changed σ list, model file, data or CIM option): merge only the "
                        "shards of one sweep");
      // extra["data"] and extra["cim"] describe the run (host/sweep/evaluate.cpp).
      if (record.extra.is_object() && record.extra.contains("data") &&
          record.extra.contains("cim")) {
        const json mine = {{"data", record.extra["data"]}, {"cim", record.extra["cim"]}};
        if (settings_model.empty()) {
          settings_model = record.model;
          settings = mine;
        } else if (record.model != settings_model && !allow_mixed_settings) {
          const std::string difference = first_difference(settings, mine);
          if (!difference.empty())
            throw UserError("models '" + settings_model + "' and '" + record.model +
                            "' were run on different data or CIM settings (" + difference +
                            "), so one table would compare them unfairly: merge them separately, "
                            "or pass --force to merge them anyway");
        }
      }
      model_order.emplace(record.model, model_order.size());
      const std::string key = unit_key(record);
      auto [it, is_new] = by_unit.emplace(key, merged.size());
      if (is_new) {
        merged.push_back(std::move(record));
        continue;
      }
      const TrialRecord& kept = merged[it->second];
      if (kept.images != record.images || kept.correct != record.correct)
        throw UserError("'" + path + "' and an earlier file disagree on " + record.model +
                        " σ=" + json(record.sigma).dump() + " trial " +
                        std::to_string(record.trial) + " (" + std::to_string(kept.correct) +
                        " vs " + std::to_string(record.correct) +
                        " correct): they come from different builds or data; rerun that shard");
    }
    if (torn > 0)
      std::fprintf(stderr,
                   "cimsweep: note: '%s' ends in a torn line (a run killed while writing it), "
                   "dropped: that trial is missing; rerun its shard with --resume\n",
                   path.c_str());
  }
  if (merged.empty())
    throw UserError("the files hold no trial records, so there is no table to make: check that "
                    "they are the shards' --results files and that the shards ran");
  std::stable_sort(merged.begin(), merged.end(), [&](const TrialRecord& a, const TrialRecord& b) {
    const size_t ma = model_order.at(a.model), mb = model_order.at(b.model);
    if (ma != mb) return ma < mb;
    const bool ca = a.trial < 0, cb = b.trial < 0;
    if (ca != cb) return ca;
    if (a.sigma != b.sigma) return a.sigma < b.sigma;
    return a.trial < b.trial;
  });
  return merged;
}

void write_results_file(const OutputPath& output, const std::vector<TrialRecord>& records) {
  std::string text;
  for (const TrialRecord& record : records) text += dump_line(to_json(record)) + '\n';
  output.write(text);
}

// ---------------------------------------------------------------------------------------------
// Aggregation and tables.

namespace {

// Adds a record's exit-policy summary (extra["exit_policy"], see host/policies/exit_policy.h) to a group;
// records without one, or with one this version cannot read, add nothing.
void add_exit_policy(const TrialRecord& record, std::string& policy,
                     std::vector<double>& macs_per_image, std::vector<double>& exit_counts) {
  if (!record.extra.is_object() || !record.extra.contains("exit_policy")) return;
  const json& p = record.extra["exit_policy"];
  if (!p.is_object() || !p.contains("policy") || !p["policy"].is_string() ||
      !p.contains("macs_per_image") || !p["macs_per_image"].is_number() ||
      !p.contains("exit_counts") || !p["exit_counts"].is_array())
    return;
  policy = p["policy"].get<std::string>();
  macs_per_image.push_back(p["macs_per_image"].get<double>());
  const json& counts = p["exit_counts"];
  if (exit_counts.size() < counts.size()) exit_counts.resize(counts.size(), 0.0);
  for (size_t e = 0; e < counts.size(); ++e)
    if (counts[e].is_number()) exit_counts[e] += counts[e].get<double>();
}

// Adds a record's BlockDrop keep statistics (extra["blockdrop"], see host/policies/blockdrop_eval.h):
// per-trial mean, mean of squares (from mean and std) and pattern count.
void add_blockdrop(const TrialRecord& record, std::vector<double>& kept_mean,
                   std::vector<double>& kept_square, std::vector<double>& patterns,
                   std::vector<double>& macs) {
  if (!record.extra.is_object() || !record.extra.contains("blockdrop")) return;
  const json& b = record.extra["blockdrop"];
  if (!b.is_object() || !b.contains("mean_blocks_kept") || !b["mean_blocks_kept"].is_number() ||
      !b.contains("std_blocks_kept") || !b["std_blocks_kept"].is_number() ||
      !b.contains("patterns") || !b["patterns"].is_number())
    return;
  const double mean = b["mean_blocks_kept"].get<double>(), std = b["std_blocks_kept"].get<double>();
  kept_mean.push_back(mean);
  kept_square.push_back(std * std + mean * mean);
  patterns.push_back(b["patterns"].get<double>());
  if (b.contains("macs_per_image") && b["macs_per_image"].is_number())
    macs.push_back(b["macs_per_image"].get<double>());
}

double mean_of(const std::vector<double>& values) {
  double sum = 0;
  for (double v : values) sum += v;
  return values.empty() ? NAN : sum / double(values.size());
}

}  // namespace

Summary accuracy_summary(const std::vector<double>& accuracies) {
  Summary s = summarize(accuracies);
  if (s.n < kMinIntervalTrials) {
    s.ci_low = s.ci_high = NAN;
  } else {
    s.ci_low = std::max(0.0, s.ci_low);
    s.ci_high = std::min(100.0, s.ci_high);
  }
  return s;
}

double interval_half_width(const Summary& s) {
  if (s.n < kMinIntervalTrials) return NAN;
  return student_t_quantile(0.975, int(s.n - 1)) * s.std / std::sqrt(double(s.n));
}

void mark_stopping_rule(std::vector<TableRow>& rows, double ci_width, int max_trials) {
  for (TableRow& row : rows) {
    row.target_half_width = ci_width;
    const double half_width = interval_half_width(row.accuracy);
    row.hit_trial_cap = row.accuracy.n >= size_t(max_trials) &&
                        !(half_width <= ci_width);  // NaN (too few chips) counts as too wide
  }
}

namespace {

// At σ = 0 nothing varies, so every chip is the same chip and a sweep runs one (sweep.cpp): the
// cell's interval is that chip's accuracy, of zero width, since there is no chip-to-chip
// variation to estimate (also for older files that hold several, necessarily equal, σ = 0 chips).
void no_chip_variation(double sigma, Summary& s) {
  if (sigma != 0 || s.n == 0 || s.min != s.max) return;
  s.mean = s.median = s.p05 = s.p95 = s.min;
  s.std = 0.0;
  s.ci_low = s.ci_high = s.min;
}

bool without_chip_variation(const TableRow& row) {
  return row.sigma == 0 && row.accuracy.n > 0 && row.accuracy.std == 0.0 &&
         row.accuracy.ci_low == row.accuracy.ci_high;
}

}  // namespace

std::vector<TableRow> aggregate(const std::vector<TrialRecord>& records) {
  struct Group {
    size_t model_index;
    double sigma;
    std::vector<double> accuracy;
    std::vector<std::vector<double>> exit_accuracy;
    std::string exit_policy;
    std::vector<double> macs_per_image;
    std::vector<double> exit_counts;
    std::vector<double> kept_mean, kept_square, patterns, blockdrop_macs;  // BlockDrop, per trial
  };
  std::vector<std::string> models;  // first-appearance order
  std::unordered_map<std::string, size_t> model_index;
  std::unordered_map<std::string, double> clean_accuracy;
  std::vector<Group> groups;
  std::unordered_set<std::string> seen_units;

  for (const TrialRecord& record : records) {
    // The same unit twice (a log written by two runs) would weigh one chip double.
    if (!seen_units.insert(unit_key(record)).second) continue;
    auto [model_it, is_new] = model_index.emplace(record.model, models.size());
    if (is_new) models.push_back(record.model);
    if (record.trial == -1) {
      clean_accuracy.emplace(record.model, record.accuracy);  // the first clean run counts
      continue;
    }
    if (record.trial < 0) continue;
    // A copy, not the structured binding: lambdas may capture those only from C++20 (clang 14).
    const size_t model = model_it->second;
    auto group = std::find_if(groups.begin(), groups.end(), [&](const Group& g) {
      return g.model_index == model && g.sigma == record.sigma;
    });
    if (group == groups.end()) {
      groups.push_back(Group{model, record.sigma, {}, {}, {}, {}, {}, {}, {}, {}, {}});
      group = groups.end() - 1;
    }
    // A NaN accuracy (a trial that saw no images) carries no information about the chip.
    if (!std::isnan(record.accuracy)) group->accuracy.push_back(record.accuracy);
    if (group->exit_accuracy.size() < record.exit_accuracy.size()) {
      group->exit_accuracy.resize(record.exit_accuracy.size());
    }
    for (size_t e = 0; e < record.exit_accuracy.size(); ++e) {
      if (!std::isnan(record.exit_accuracy[e])) {
        group->exit_accuracy[e].push_back(record.exit_accuracy[e]);
      }
    }
    add_exit_policy(record, group->exit_policy, group->macs_per_image, group->exit_counts);
    add_blockdrop(record, group->kept_mean, group->kept_square, group->patterns,
                  group->blockdrop_macs);
  }

  std::stable_sort(groups.begin(), groups.end(), [](const Group& a, const Group& b) {
    if (a.model_index != b.model_index) return a.model_index < b.model_index;
    return a.sigma < b.sigma;
  });
  std::vector<TableRow> rows;
  for (const Group& group : groups) {
    TableRow row;
    row.model = models[group.model_index];
    row.sigma = group.sigma;
    row.accuracy = accuracy_summary(group.accuracy);
    no_chip_variation(row.sigma, row.accuracy);
    for (const std::vector<double>& values : group.exit_accuracy) {
      row.exit_accuracy.push_back(accuracy_summary(values));
      no_chip_variation(row.sigma, row.exit_accuracy.back());
    }
    auto clean = clean_accuracy.find(row.model);
    if (clean != clean_accuracy.end()) row.clean_accuracy = clean->second;
    row.exit_policy = group.exit_policy;
    if (!group.macs_per_image.empty()) row.macs_per_image = summarize(group.macs_per_image).mean;
    double counted = 0;
    for (double c : group.exit_counts) counted += c;
    for (double c : group.exit_counts) row.exit_shares.push_back(c / counted);
    if (!group.kept_mean.empty()) {
      // Every trial sees the same images, so the pooled moments are the trials' means.
      row.blocks_kept = mean_of(group.kept_mean);
      row.blocks_kept_std =
          std::sqrt(std::max(0.0, mean_of(group.kept_square) - row.blocks_kept * row.blocks_kept));
      row.keep_patterns = mean_of(group.patterns);
      row.blockdrop_macs = mean_of(group.blockdrop_macs);
    }
    rows.push_back(std::move(row));
  }
  return rows;
}

namespace {

bool any_blockdrop(const std::vector<TableRow>& rows) {
  return std::any_of(rows.begin(), rows.end(),
                     [](const TableRow& row) { return !std::isnan(row.blocks_kept); });
}

bool any_stopping_rule(const std::vector<TableRow>& rows) {
  return std::any_of(rows.begin(), rows.end(),
                     [](const TableRow& row) { return !std::isnan(row.target_half_width); });
}

bool any_exit_policy(const std::vector<TableRow>& rows) {
  return std::any_of(rows.begin(), rows.end(),
                     [](const TableRow& row) { return !row.exit_policy.empty(); });
}

size_t max_exits(const std::vector<TableRow>& rows) {
  size_t exits = 0;
  for (const TableRow& row : rows) exits = std::max(exits, row.exit_accuracy.size());
  return exits;
}

// Shortest decimal that reads back as the same double: the way sigma is written in the log.
std::string round_trip(double value) {
  return json(value).dump();
}

std::string two_decimals(double value) {
  if (std::isnan(value)) return "–";
  char buffer[64];
  std::snprintf(buffer, sizeof buffer, "%.2f", value);
  return buffer;
}

std::string markdown_cell(const std::string& text) {
  std::string escaped;
  for (char c : text) {
    if (c == '|') escaped += '\\';
    escaped += c == '\n' ? ' ' : c;
  }
  return escaped;
}

std::string format_markdown(const std::vector<TableRow>& rows) {
  const size_t exits = max_exits(rows);
  std::ostringstream out;
  out << "| model | σ | trials | mean % | std | 95 % CI | min | max | clean % |";
  for (size_t e = 0; e < exits; ++e) out << " exit " << e + 1 << " mean % |";
  const bool policy = any_exit_policy(rows);
  if (policy) out << " policy | MACs/image | exits taken |";
  const bool blockdrop = any_blockdrop(rows);
  if (blockdrop) out << " blocks kept | std | patterns | MACs/image |";
  out << "\n|:--|--:|--:|--:|--:|:-:|--:|--:|--:|";
  for (size_t e = 0; e < exits; ++e) out << "--:|";
  if (policy) out << ":--|--:|:-:|";
  if (blockdrop) out << "--:|--:|--:|--:|";
  out << "\n";
  for (const TableRow& row : rows) {
    const Summary& s = row.accuracy;
    const std::string interval =
        !std::isnan(s.ci_low) ? two_decimals(s.ci_low) + " – " + two_decimals(s.ci_high)
        : s.n > 0             ? "needs ≥ " + std::to_string(kMinIntervalTrials) + " chips"
                              : "–";
    const std::string trials = std::to_string(s.n) + (row.hit_trial_cap ? " (cap)" : "");
    out << "| " << markdown_cell(row.model) << " | " << round_trip(row.sigma) << " | " << trials
        << " | " << two_decimals(s.mean) << " | " << two_decimals(s.std) << " | " << interval
        << " | " << two_decimals(s.min) << " | " << two_decimals(s.max) << " | "
        << two_decimals(row.clean_accuracy) << " |";
    for (size_t e = 0; e < exits; ++e) {
      out << " " << (e < row.exit_accuracy.size() ? two_decimals(row.exit_accuracy[e].mean) : "–")
          << " |";
    }
    if (policy) {
      std::string shares;
      for (double share : row.exit_shares)
        shares += (shares.empty() ? "" : " / ") + two_decimals(share);
      out << " " << (row.exit_policy.empty() ? "–" : markdown_cell(row.exit_policy)) << " | "
          << (std::isnan(row.macs_per_image) ? "–"
                                             : std::to_string(std::llround(row.macs_per_image)))
          << " | " << (shares.empty() ? "–" : shares) << " |";
    }
    if (blockdrop) {
      char patterns[32] = "–";
      if (!std::isnan(row.keep_patterns))
        std::snprintf(patterns, sizeof patterns, "%.1f", row.keep_patterns);
      out << " " << two_decimals(row.blocks_kept) << " | " << two_decimals(row.blocks_kept_std)
          << " | " << patterns << " | "
          << (std::isnan(row.blockdrop_macs) ? "–"
                                             : std::to_string(std::llround(row.blockdrop_macs)))
          << " |";
    }
    out << "\n";
  }
  if (std::any_of(rows.begin(), rows.end(), without_chip_variation))
    out << "\nσ = 0: nothing varies, so every chip is the same chip: one is run, and its 95 % "
           "interval has zero width.\n";
  return out.str();
}

const char* const kSummaryFields[] = {"n",   "mean", "std",    "ci_low", "ci_high",
                                      "min", "p05",  "median", "p95",    "max"};

std::vector<double> summary_values(const Summary& s) {
  return {double(s.n), s.mean, s.std, s.ci_low, s.ci_high, s.min, s.p05, s.median, s.p95, s.max};
}

std::string csv_number(double value) {
  return std::isnan(value) ? "" : round_trip(value);
}

std::string csv_field(const std::string& text) {
  if (text.find_first_of(",\"\r\n") == std::string::npos) return text;
  std::string quoted = "\"";
  for (char c : text) quoted += c == '"' ? std::string("\"\"") : std::string(1, c);
  return quoted + "\"";
}

std::string format_csv(const std::vector<TableRow>& rows) {
  const size_t exits = max_exits(rows);
  std::ostringstream out;
  out << "model,sigma,trials,mean,std,ci_low,ci_high,min,p05,median,p95,max,clean";
  for (size_t e = 0; e < exits; ++e) {
    for (const char* field : kSummaryFields) out << ",exit" << e + 1 << "_" << field;
  }
  const bool policy = any_exit_policy(rows);
  if (policy) {
    out << ",exit_policy,macs_per_image";
    for (size_t e = 0; e < exits; ++e) out << ",exit" << e + 1 << "_share";
  }
  const bool blockdrop = any_blockdrop(rows);
  if (blockdrop) out << ",blocks_kept,blocks_kept_std,keep_patterns,blockdrop_macs_per_image";
  const bool stopping = any_stopping_rule(rows);
  if (stopping) out << ",ci_target,hit_cap";
  out << "\n";
  for (const TableRow& row : rows) {
    out << csv_field(row.model) << "," << round_trip(row.sigma) << "," << row.accuracy.n;
    const std::vector<double> values = summary_values(row.accuracy);
    for (size_t i = 1; i < values.size(); ++i) out << "," << csv_number(values[i]);
    out << "," << csv_number(row.clean_accuracy);
    for (size_t e = 0; e < exits; ++e) {
      if (e < row.exit_accuracy.size()) {
        const std::vector<double> exit_values = summary_values(row.exit_accuracy[e]);
        out << "," << row.exit_accuracy[e].n;
        for (size_t i = 1; i < exit_values.size(); ++i) out << "," << csv_number(exit_values[i]);
      } else {
        out << std::string(std::size(kSummaryFields), ',');
      }
    }
    if (policy) {
      out << "," << csv_field(row.exit_policy) << "," << csv_number(row.macs_per_image);
      for (size_t e = 0; e < exits; ++e)
        out << "," << (e < row.exit_shares.size() ? csv_number(row.exit_shares[e]) : "");
    }
    if (blockdrop)
      out << "," << csv_number(row.blocks_kept) << "," << csv_number(row.blocks_kept_std) << ","
          << csv_number(row.keep_patterns) << "," << csv_number(row.blockdrop_macs);
    if (stopping)
      out << "," << csv_number(row.target_half_width) << "," << (row.hit_trial_cap ? "true" : "false");
    out << "\n";
  }
  return out.str();
}

// Adds every Summary field to `object`, NaN as null.
void add_summary_fields(const Summary& s, nlohmann::ordered_json& object) {
  const std::vector<double> values = summary_values(s);
  object["n"] = s.n;
  for (size_t i = 1; i < values.size(); ++i) {
    object[kSummaryFields[i]] =
        std::isnan(values[i]) ? nlohmann::ordered_json(nullptr) : nlohmann::ordered_json(values[i]);
  }
}

// One flat object per row (the accuracy summary's fields at the top level, so that scripts read
// row["mean"]), with the per-exit summaries as an array of objects of the same fields.
std::string format_json(const std::vector<TableRow>& rows) {
  nlohmann::ordered_json array = nlohmann::ordered_json::array();
  for (const TableRow& row : rows) {
    nlohmann::ordered_json object;
    object["model"] = row.model;
    object["sigma"] = row.sigma;
    object["trials"] = row.accuracy.n;
    add_summary_fields(row.accuracy, object);
    object["clean_accuracy"] = std::isnan(row.clean_accuracy)
                                   ? nlohmann::ordered_json(nullptr)
                                   : nlohmann::ordered_json(row.clean_accuracy);
    object["exit_accuracy"] = nlohmann::ordered_json::array();
    for (const Summary& exit : row.exit_accuracy) {
      nlohmann::ordered_json exit_object;
      add_summary_fields(exit, exit_object);
      object["exit_accuracy"].push_back(std::move(exit_object));
    }
    if (!row.exit_policy.empty()) {
      object["exit_policy"] = row.exit_policy;
      object["macs_per_image"] = std::isnan(row.macs_per_image)
                                     ? nlohmann::ordered_json(nullptr)
                                     : nlohmann::ordered_json(row.macs_per_image);
      object["exit_shares"] = row.exit_shares;
    }
    if (!std::isnan(row.blocks_kept)) {
      object["blocks_kept"] = row.blocks_kept;
      object["blocks_kept_std"] = row.blocks_kept_std;
      object["keep_patterns"] = row.keep_patterns;
      object["blockdrop_macs_per_image"] = std::isnan(row.blockdrop_macs)
                                               ? nlohmann::ordered_json(nullptr)
                                               : nlohmann::ordered_json(row.blockdrop_macs);
    }
    if (!std::isnan(row.target_half_width)) {
      object["ci_target"] = row.target_half_width;
      object["hit_cap"] = row.hit_trial_cap;
    }
    array.push_back(std::move(object));
  }
  return array.dump(2, ' ', false, json::error_handler_t::replace) + "\n";
}

}  // namespace

std::string format_table(const std::vector<TableRow>& rows, const std::string& format) {
  if (format == "md") return format_markdown(rows);
  if (format == "csv") return format_csv(rows);
  if (format == "json") return format_json(rows);
  throw UserError("unknown --format '" + format + "': use md, csv or json");
}

}  // namespace cimsweep
