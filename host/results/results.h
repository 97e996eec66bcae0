// Trial records of a sweep, the crash-safe results log they are appended to, and the accuracy
// tables aggregated from them.
#pragma once
#include <cmath>
#include <cstdint>
#include <mutex>
#include <string>
#include <unordered_set>
#include <vector>

#include <nlohmann/json.hpp>

#include "host/io/output_file.h"
#include "host/results/stats.h"

namespace cimsweep {

// One Monte-Carlo trial (one simulated noisy chip) of one model at one noise level.
struct TrialRecord {
  std::string model;        // model label
  std::string config_hash;  // hex string identifying everything but sigma and trial
  double sigma = 0;
  int trial = 0;  // trial index >= 0; -1 marks the clean reference run (sigma 0, ADC ideal)
  uint64_t images = 0, correct = 0;
  double accuracy = 0;                // percent
  std::vector<double> exit_accuracy;  // percent per exit, empty for single-exit models
  double seconds = 0;
  nlohmann::json extra;  // free-form (backend, policy...), written if not null
  // `eval --predictions`: one JSON line per image (TrialRunner::set_keep_predictions); never part
  // of the results file, so a resumed record has none.
  std::string prediction_lines;
};

// One JSON object per record. NaN accuracies or seconds are written as null and read back as NaN.
nlohmann::json to_json(const TrialRecord& record);
// Throws UserError on a missing or ill-typed field; exit_accuracy and extra are optional.
TrialRecord trial_from_json(const nlohmann::json& json);
// Identity of a work unit: (model, config_hash, sigma, trial). sigma is compared exactly as
// written, i.e. by its shortest round-trip decimal, so a record read back has the same key.
std::string unit_key(const TrialRecord& record);

// Append-only JSON Lines file of trial records that survives kill -9 at any moment: every record
// goes out as one write() of a full line with O_APPEND followed by fdatasync, so a crash can only
// leave a torn last line, which the next resume drops.
class ResultsLog {
 public:
  // The file is locked (flock) for this object's lifetime: another writer gets a UserError naming
  // the holder's pid, or with wait_for_lock waits for it. A symlink is followed to its target.
  // resume == false: the file must not exist or be empty, else UserError.
  // resume == true: reads the existing records; a torn last line (no trailing newline, or not
  // parseable JSON as the last line) is dropped and the file truncated to the last complete line;
  // a corrupt line that is not last is a UserError naming file and line number. Of records with
  // the same unit key the first is kept.
  ResultsLog(const std::string& path, bool resume, bool wait_for_lock = false);
  // If this object created the file, holds its lock, appended nothing, and the file is still
  // empty and still the one at the path, removes it, so that a run that fails before its first
  // trial leaves no empty file that would need --resume (and never removes another's trials).
  ~ResultsLog();
  ResultsLog(const ResultsLog&) = delete;
  ResultsLog& operator=(const ResultsLog&) = delete;

  // The records that were in the file when it was opened (deduplicated, file order).
  const std::vector<TrialRecord>& existing() const { return existing_; }
  // Whether the unit is among the existing records or was appended through this object.
  bool has(const TrialRecord& unit) const;
  // Appends one record durably; thread-safe. Throws UserError when the write fails (disk full...).
  void append(const TrialRecord& record);
  const std::string& path() const { return path_; }

 private:
  std::string path_, target_;  // as given; symlinks resolved
  int fd_ = -1;
  bool created_ = false;   // this object created the file
  bool locked_ = false;    // this object holds the file's lock
  bool appended_ = false;  // at least one record was appended
  std::vector<TrialRecord> existing_;
  std::unordered_set<std::string> keys_;  // unit keys of existing and appended records
  mutable std::mutex mutex_;              // guards fd_ writes, appended_ and keys_
};

// Reads a results file with the same torn-line rules as ResultsLog, without modifying it;
// torn_lines, if given, receives how many torn last lines were dropped (0 or 1).
std::vector<TrialRecord> read_results_file(const std::string& path, size_t* torn_lines = nullptr);

// The writer's lock of an existing results file (see ResultsLog), for a writer that replaces the
// file whole (`merge --results`); nothing when the file does not exist yet.
class ResultsFileLock {
 public:
  ResultsFileLock(const std::string& path, bool wait_for_lock);
  ~ResultsFileLock();
  ResultsFileLock(const ResultsFileLock&) = delete;
  ResultsFileLock& operator=(const ResultsFileLock&) = delete;

 private:
  int fd_ = -1;
};

// Merges results files of one sweep (its shards, earlier merges of them): every work unit once,
// models in first-appearance order, then per model the clean reference, σ ascending, trial
// ascending — so merging again, or a shard that ran twice, changes nothing. Throws UserError when
// two files disagree on a unit's result or one model label carries two configurations, when
// nothing is left to merge, and (unless allow_mixed_settings) when two models were run on
// different data or CIM settings (extra["data"], extra["cim"]). A dropped torn last line gets a note.
std::vector<TrialRecord> merge_results(const std::vector<std::string>& paths,
                                       bool allow_mixed_settings = false);

// Writes records as a results file (JSON Lines), atomically where the path is a file.
void write_results_file(const OutputPath& output, const std::vector<TrialRecord>& records);

// One line of the accuracy table: all trials of one model at one sigma.
struct TableRow {
  std::string model;
  double sigma = 0;
  // Over trials >= 0 of (model, sigma), as accuracy_summary gives it: the interval inside
  // [0, 100], none with fewer than kMinIntervalTrials chips.
  Summary accuracy;
  std::vector<Summary> exit_accuracy;  // per exit, if any, likewise
  double clean_accuracy = NAN;         // from the trial == -1 record of that model, if present
  // Exit policy (records with extra["exit_policy"]): its name, the mean of the trials' MACs per
  // image, and the share of images each exit answered over all trials.
  std::string exit_policy;
  double macs_per_image = NAN;
  std::vector<double> exit_shares;
  // BlockDrop models (records with extra["blockdrop"]): blocks kept per image, mean and standard
  // deviation over every image of every trial, the distinct keep patterns per chip (mean over
  // the trials), and the CIM MACs per image.
  double blocks_kept = NAN, blocks_kept_std = NAN, keep_patterns = NAN;
  double blockdrop_macs = NAN;  // mean CIM MACs per image over the trials
  // --ci-width sweeps (mark_stopping_rule): the target half-width in points, and whether the cell
  // stopped at --max-trials with its interval still wider than that.
  double target_half_width = NAN;
  bool hit_trial_cap = false;
};

// Fewer chips than this give no interval: with 2 the t factor is 12.7 and the "interval" says only
// that nothing is known yet.
constexpr size_t kMinIntervalTrials = 3;

// summarize() for accuracies in percent: the Student-t interval of the mean is clipped to
// [0, 100], where every accuracy and so the mean lies, and left NaN below kMinIntervalTrials.
Summary accuracy_summary(const std::vector<double>& accuracies);

// Half-width of the unclipped 95 % Student-t interval of the mean (points): what --ci-width
// compares with its target. NaN below kMinIntervalTrials.
double interval_half_width(const Summary& summary);

// Sets target_half_width and hit_trial_cap of every row of a --ci-width sweep: a row hit the cap
// when it has max_trials chips (or more) and its half-width is still above ci_width.
void mark_stopping_rule(std::vector<TableRow>& rows, double ci_width, int max_trials);

// Groups records by (model, sigma) in first-appearance order of models, then ascending sigma.
// Clean reference records (trial -1) only provide clean_accuracy; they make no row themselves.
std::vector<TableRow> aggregate(const std::vector<TrialRecord>& records);

// format "md": Markdown table for people (2 decimals, "–" for NaN); "csv": header line, full
// precision, empty fields for NaN; "json": array of flat objects {model, sigma, trials, every
// Summary field of the accuracy, clean_accuracy, exit_accuracy: [{Summary fields}...]}, NaN null.
// Where a row has an exit policy, every format adds the policy, MACs/image and exit shares.
// Throws UserError on any other format.
std::string format_table(const std::vector<TableRow>& rows, const std::string& format);

}  // namespace cimsweep
