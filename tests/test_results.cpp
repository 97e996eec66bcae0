// Tests of the statistics, the crash-safe results log and the accuracy tables.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "common/errors.h"
#include "host/results/results.h"
#include "host/results/stats.h"
#include "tests/test_util.h"

namespace cimsweep {
namespace {

using testing::read_text;
using testing::TempDir;
using testing::write_text;

// Runs `action` and returns the UserError message it throws ("" and a test failure if none).
template <typename Action>
std::string user_error_of(Action&& action) {
  try {
    action();
  } catch (const UserError& error) {
    return error.what();
  }
  ADD_FAILURE() << "expected a UserError";
  return "";
}

std::vector<std::string> split(const std::string& text, char separator) {
  std::vector<std::string> parts;
  std::string part;
  std::istringstream in(text);
  while (std::getline(in, part, separator)) parts.push_back(part);
  if (!text.empty() && text.back() == separator) parts.push_back("");
  return parts;
}

// ---------------------------------------------------------------------------------------------
// summarize

TEST(Summarize, HandComputedEightValues) {
  // Sorted: 2 4 4 4 5 5 7 9. Sum 40 -> mean 5. Squared deviations 9+1+1+1+0+0+4+16 = 32, so the
  // sample variance is 32/7 and std = sqrt(32/7) = 2.1380899352993951.
  // CI half-width = t(0.975, 7) * std / sqrt(8) = 2.3646242515927853 * 0.75592894601845445
  //               = 1.7874879182362109.
  // Percentiles at position q * 7: p05 -> 0.35: 2 + 0.35 * (4 - 2) = 2.7; median -> 3.5:
  // (4 + 5) / 2 = 4.5; p95 -> 6.65: 7 + 0.65 * (9 - 7) = 8.3.
  const Summary s = summarize({9, 2, 5, 4, 4, 7, 4, 5});
  EXPECT_EQ(s.n, 8u);
  EXPECT_DOUBLE_EQ(s.mean, 5.0);
  EXPECT_NEAR(s.std, 2.1380899352993951, 1e-14);
  EXPECT_NEAR(s.ci_low, 5.0 - 1.7874879182362109, 1e-12);
  EXPECT_NEAR(s.ci_high, 5.0 + 1.7874879182362109, 1e-12);
  EXPECT_EQ(s.min, 2.0);
  EXPECT_NEAR(s.p05, 2.7, 1e-14);
  EXPECT_NEAR(s.median, 4.5, 1e-14);
  EXPECT_NEAR(s.p95, 8.3, 1e-14);
  EXPECT_EQ(s.max, 9.0);
}

TEST(Summarize, HandComputedFourValues) {
  // 1 2 3 4: mean 2.5, squared deviations 2.25+0.25+0.25+2.25 = 5, std = sqrt(5/3) =
  // 1.2909944487358056; half-width = t(0.975, 3) * std / 2 = 3.1824463052837096 * 0.6454972...
  // = 2.0542602567605220. Positions q * 3: p05 0.15 -> 1.15, median 1.5 -> 2.5, p95 2.85 -> 3.85.
  const Summary s = summarize({4, 3, 2, 1});
  EXPECT_DOUBLE_EQ(s.mean, 2.5);
  EXPECT_NEAR(s.std, 1.2909944487358056, 1e-14);
  EXPECT_NEAR(s.ci_low, 2.5 - 2.0542602567605220, 1e-12);
  EXPECT_NEAR(s.ci_high, 2.5 + 2.0542602567605220, 1e-12);
  EXPECT_NEAR(s.p05, 1.15, 1e-14);
  EXPECT_NEAR(s.median, 2.5, 1e-14);
  EXPECT_NEAR(s.p95, 3.85, 1e-14);
}

TEST(Summarize, TwoValuesAndConstantValues) {
  // 1 3: positions q * 1: p05 = 1.1, median 2, p95 2.9; std = sqrt(2) and t(0.975, 1) = 12.706...
  const Summary two = summarize({3, 1});
  EXPECT_NEAR(two.p05, 1.1, 1e-14);
  EXPECT_NEAR(two.median, 2.0, 1e-14);
  EXPECT_NEAR(two.p95, 2.9, 1e-14);
  EXPECT_NEAR(two.std, std::sqrt(2.0), 1e-14);
  EXPECT_NEAR(two.ci_high - two.mean, 12.706204736174705 * std::sqrt(2.0) / std::sqrt(2.0), 1e-9);
  // Identical values: no spread, so the interval collapses onto the mean.
  const Summary same = summarize({91.25, 91.25, 91.25});
  EXPECT_EQ(same.std, 0.0);
  EXPECT_EQ(same.ci_low, 91.25);
  EXPECT_EQ(same.ci_high, 91.25);
}

TEST(Summarize, OneValueHasNoSpread) {
  const Summary s = summarize({97.5});
  EXPECT_EQ(s.n, 1u);
  EXPECT_EQ(s.mean, 97.5);
  EXPECT_TRUE(std::isnan(s.std));
  EXPECT_TRUE(std::isnan(s.ci_low));
  EXPECT_TRUE(std::isnan(s.ci_high));
  for (double order_statistic : {s.min, s.p05, s.median, s.p95, s.max}) {
    EXPECT_EQ(order_statistic, 97.5);
  }
}

TEST(Summarize, NoValuesIsAllNan) {
  const Summary s = summarize({});
  EXPECT_EQ(s.n, 0u);
  for (double value : {s.mean, s.std, s.ci_low, s.ci_high, s.min, s.p05, s.median, s.p95, s.max}) {
    EXPECT_TRUE(std::isnan(value));
  }
}

TEST(Summarize, RejectsNan) {
  EXPECT_THROW(summarize({1.0, NAN}), std::invalid_argument);
}

// ---------------------------------------------------------------------------------------------
// Student t quantiles

TEST(StudentT, KnownTableValues) {
  // Values from the brief (8-9 significant digits).
  EXPECT_NEAR(student_t_quantile(0.975, 1), 12.7062047, 1e-7);
  EXPECT_NEAR(student_t_quantile(0.975, 2), 4.30265273, 1e-8);
  EXPECT_NEAR(student_t_quantile(0.975, 4), 2.77644511, 1e-8);
  EXPECT_NEAR(student_t_quantile(0.975, 9), 2.26215716, 1e-8);
  EXPECT_NEAR(student_t_quantile(0.975, 29), 2.04522964, 1e-8);
  EXPECT_NEAR(student_t_quantile(0.975, 99), 1.98421695, 1e-8);
  EXPECT_NEAR(student_t_quantile(0.975, 2000000000), 1.95996398, 1e-8);
}

TEST(StudentT, MatchesHighPrecisionReference) {
  // References from mpmath (50 digits) solving 0.5 * I_{nu/(nu+t^2)}(nu/2, 1/2) = 1 - p; the
  // dof values straddle the switch to the large-dof expansion at 1e4.
  struct Case {
    double p;
    int dof;
    double t;
  };
  const Case cases[] = {
      {0.975, 3, 3.1824463052837096},     {0.975, 5, 2.5705818356363155},
      {0.975, 7, 2.3646242515927853},     {0.975, 30, 2.0422724563012383},
      {0.975, 200, 1.9718962236339094},   {0.975, 5000, 1.9604385517065079},
      {0.975, 10000, 1.9602012398906263}, {0.975, 20000, 1.9600826051581352},
      {0.6, 3, 0.27667066233268991},      {0.6, 30, 0.25560536495191277},
      {0.6, 20000, 0.25335047326406268},  {0.995, 3, 5.8409093097333573},
      {0.995, 30, 2.7499956535672253},    {0.995, 5000, 2.5768129665562811},
      {0.995, 20000, 2.576075153017255},
  };
  for (const Case& c : cases) {
    EXPECT_NEAR(student_t_quantile(c.p, c.dof), c.t, 1e-10 * c.t)
        << "p " << c.p << " dof " << c.dof;
  }
}

TEST(StudentT, ClosedFormsForOneAndTwoDof) {
  // dof 1 is the Cauchy distribution: t = tan(pi (p - 1/2)); dof 2: t = (2p - 1) / sqrt(2p(1-p)).
  for (double p : {0.51, 0.6, 0.9, 0.975, 0.995, 0.9999}) {
    const double cauchy = std::tan(M_PI * (p - 0.5));
    EXPECT_NEAR(student_t_quantile(p, 1), cauchy, 1e-10 * cauchy) << p;
    const double two = (2 * p - 1) / std::sqrt(2 * p * (1 - p));
    EXPECT_NEAR(student_t_quantile(p, 2), two, 1e-10 * two) << p;
  }
}

TEST(StudentT, SymmetricAndDecreasingInDof) {
  EXPECT_EQ(student_t_quantile(0.5, 7), 0.0);
  for (int dof : {1, 3, 30, 1000, 50000}) {
    EXPECT_DOUBLE_EQ(student_t_quantile(0.025, dof), -student_t_quantile(0.975, dof)) << dof;
  }
  double previous = HUGE_VAL;
  for (int dof : {1, 2, 5, 50, 9999, 10000, 10001, 100000, 2000000000}) {
    const double t = student_t_quantile(0.975, dof);
    EXPECT_LT(t, previous) << dof;
    previous = t;
  }
  EXPECT_GT(previous, 1.959963984540054);  // the normal quantile is the limit from above
}

TEST(StudentT, RejectsInvalidArguments) {
  EXPECT_THROW(student_t_quantile(0.0, 3), std::invalid_argument);
  EXPECT_THROW(student_t_quantile(1.0, 3), std::invalid_argument);
  EXPECT_THROW(student_t_quantile(NAN, 3), std::invalid_argument);
  EXPECT_THROW(student_t_quantile(0.975, 0), std::invalid_argument);
}

// ---------------------------------------------------------------------------------------------
// Trial records

TrialRecord make_record(const std::string& model, double sigma, int trial, double accuracy,
                        std::vector<double> exits = {}) {
  TrialRecord record;
  record.model = model;
  record.config_hash = "9f2c4e01ab";
  record.sigma = sigma;
  record.trial = trial;
  record.images = 10000;
  record.correct = uint64_t(std::llround(accuracy * 100));
  record.accuracy = accuracy;
  record.exit_accuracy = std::move(exits);
  record.seconds = 1.25 + trial * 0.001;
  return record;
}

TEST(TrialRecord, JsonRoundTrip) {
  TrialRecord record = make_record("resnet20", 0.1, 3, 91.37, {70.5, 88.25, 91.37});
  record.extra = {{"backend", "cpu"}, {"policy", "clip"}};
  const TrialRecord back = trial_from_json(nlohmann::json::parse(to_json(record).dump()));
  EXPECT_EQ(to_json(back), to_json(record));
  EXPECT_EQ(unit_key(back), unit_key(record));
  EXPECT_FALSE(to_json(make_record("m", 0, 0, 1)).contains("extra"));  // null extra not written

  // NaN (no images) is written as null and read back as NaN.
  TrialRecord empty = make_record("m", 0, 1, NAN);
  empty.correct = 0;
  EXPECT_TRUE(std::isnan(trial_from_json(nlohmann::json::parse(to_json(empty).dump())).accuracy));
}

TEST(TrialRecord, RejectsMissingAndIllTypedFields) {
  const nlohmann::json good = to_json(make_record("m", 0.1, 0, 90));
  auto without = [&](const char* field) {
    nlohmann::json copy = good;
    copy.erase(field);
    return copy;
  };
  auto with = [&](const char* field, nlohmann::json value) {
    nlohmann::json copy = good;
    copy[field] = std::move(value);
    return copy;
  };
  EXPECT_NE(user_error_of([&] { trial_from_json(without("model")); }).find("'model'"),
            std::string::npos);
  EXPECT_NE(user_error_of([&] { trial_from_json(without("sigma")); }).find("'sigma'"),
            std::string::npos);
  EXPECT_THROW(trial_from_json(without("seconds")), UserError);
  EXPECT_THROW(trial_from_json(with("sigma", "0.1")), UserError);
  EXPECT_THROW(trial_from_json(with("sigma", -0.5)), UserError);
  EXPECT_THROW(trial_from_json(with("trial", 1.5)), UserError);
  EXPECT_THROW(trial_from_json(with("trial", -2)), UserError);
  EXPECT_THROW(trial_from_json(with("images", -1)), UserError);
  EXPECT_THROW(trial_from_json(with("correct", 10001)), UserError);  // more than images
  EXPECT_THROW(trial_from_json(with("exit_accuracy", "x")), UserError);
  EXPECT_THROW(trial_from_json(nlohmann::json::array()), UserError);
  EXPECT_NO_THROW(trial_from_json(without("exit_accuracy")));
  EXPECT_NO_THROW(trial_from_json(with("trial", -1)));
}

TEST(TrialRecord, UnitKeyComparesSigmaExactly) {
  const TrialRecord a = make_record("m", 0.1, 2, 90);
  TrialRecord b = a;
  b.accuracy = 10;  // not part of the identity
  b.seconds = 99;
  EXPECT_EQ(unit_key(a), unit_key(b));
  b.sigma = 0.30000000000000004 - 0.2;  // 0.10000000000000003: a different noise level
  EXPECT_NE(unit_key(a), unit_key(b));
  for (auto change :
       {+[](TrialRecord& r) { r.model += "x"; }, +[](TrialRecord& r) { r.config_hash += "0"; },
        +[](TrialRecord& r) { r.trial = -1; }}) {
    TrialRecord c = a;
    change(c);
    EXPECT_NE(unit_key(a), unit_key(c));
  }
  // Separators inside labels cannot make two different units collide.
  TrialRecord left = a, right = a;
  left.model = "a\",\"b";
  left.config_hash = "c";
  right.model = "a";
  right.config_hash = "b\",\"c";
  EXPECT_NE(unit_key(left), unit_key(right));
}

// ---------------------------------------------------------------------------------------------
// ResultsLog

std::vector<TrialRecord> sample_records() {
  return {make_record("resnet20", 0.05, 0, 91.5, {70, 85, 91.5}),
          make_record("resnet20", 0.05, 1, 90.75, {69.5, 84, 90.75}),
          make_record("resnet20", 0.1, 0, 88.125, {60, 80, 88.125}),
          make_record("resnet20", 0, -1, 92.0, {72, 86, 92})};
}

void expect_same_records(const std::vector<TrialRecord>& actual,
                         const std::vector<TrialRecord>& expected) {
  ASSERT_EQ(actual.size(), expected.size());
  for (size_t i = 0; i < actual.size(); ++i) EXPECT_EQ(to_json(actual[i]), to_json(expected[i]));
}

// Every line of the file is a complete, valid record and the file ends with a newline.
void expect_valid_file(const std::string& path) {
  const std::string text = read_text(path);
  ASSERT_FALSE(text.empty());
  EXPECT_EQ(text.back(), '\n');
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) EXPECT_NO_THROW(trial_from_json(nlohmann::json::parse(line)));
}

TEST(ResultsLog, AppendThenResumeReadsIdenticalRecords) {
  TempDir dir;
  const std::string path = dir.file("results.jsonl");
  std::vector<TrialRecord> records = sample_records();
  records[0].extra = {{"backend", "cpu"}};
  {
    ResultsLog log(path, /*resume=*/false);
    EXPECT_TRUE(log.existing().empty());
    for (const TrialRecord& record : records) log.append(record);
    EXPECT_TRUE(log.has(records[2]));
    EXPECT_FALSE(log.has(make_record("resnet20", 0.1, 1, 0)));
    EXPECT_EQ(log.path(), path);
  }
  expect_valid_file(path);
  ResultsLog resumed(path, /*resume=*/true);
  expect_same_records(resumed.existing(), records);
  for (const TrialRecord& record : records) EXPECT_TRUE(resumed.has(record));
  expect_same_records(read_results_file(path), records);
}

TEST(ResultsLog, RefusesNonEmptyFileWithoutResume) {
  TempDir dir;
  const std::string path = dir.file("results.jsonl");
  {
    ResultsLog log(path, false);
    for (const TrialRecord& record : sample_records()) log.append(record);
  }
  const std::string before = read_text(path);
  const std::string message = user_error_of([&] { ResultsLog log(path, false); });
  EXPECT_EQ(message, "results file '" + path +
                         "' already holds 4 trials: pass --resume to continue it or choose "
                         "another --results path");
  EXPECT_EQ(read_text(path), before);  // untouched, and not removed by the failed constructor

  // A file that is not a results file at all is refused too, not parsed into an error about it.
  const std::string other = dir.file("notes.txt");
  write_text(other, "hello\nworld\n");
  EXPECT_NE(user_error_of([&] { ResultsLog log(other, false); }).find("--resume"),
            std::string::npos);
}

TEST(ResultsLog, EmptyExistingFileIsAcceptedAndKept) {
  TempDir dir;
  const std::string path = dir.file("results.jsonl");
  write_text(path, "");
  { ResultsLog log(path, false); }
  EXPECT_TRUE(std::filesystem::exists(path));  // not created by the log, so not removed
}

TEST(ResultsLog, AbandonedNewFileIsRemoved) {
  TempDir dir;
  for (bool resume : {false, true}) {
    const std::string path = dir.file(resume ? "resumed.jsonl" : "fresh.jsonl");
    {
      ResultsLog log(path, resume);
      EXPECT_TRUE(std::filesystem::exists(path));
    }
    EXPECT_FALSE(std::filesystem::exists(path)) << "resume " << resume;
  }
  const std::string kept = dir.file("kept.jsonl");
  {
    ResultsLog log(kept, false);
    log.append(sample_records()[0]);
  }
  EXPECT_TRUE(std::filesystem::exists(kept));
}

TEST(ResultsLog, MissingDirectoryIsUserError) {
  TempDir dir;
  const std::string message =
      user_error_of([&] { ResultsLog log(dir.file("no/such.jsonl"), false); });
  EXPECT_NE(message.find("--results"), std::string::npos);
  EXPECT_THROW(read_results_file(dir.file("absent.jsonl")), UserError);
}

// A crash can leave the last line in three states; each is dropped, and resume truncates the file
// so that the next append starts on a fresh line.
TEST(ResultsLog, TornLastLineIsDroppedAndTruncated) {
  const std::vector<TrialRecord> records = sample_records();
  const std::string complete_json = to_json(make_record("resnet20", 0.2, 0, 50)).dump();
  const std::vector<std::pair<std::string, std::string>> tails = {
      {"partial JSON, no newline", complete_json.substr(0, complete_json.size() / 2)},
      // Decision: a line without its newline is ALWAYS torn, even when it parses, because the
      // writer emits the newline in the same write() and so the line is not known to be whole.
      {"complete JSON, no newline", complete_json},
      {"garbage with newline (power loss)", std::string(7, '\0') + "\n"},
      {"partial JSON with newline", complete_json.substr(0, 20) + "\n"},
  };
  for (const auto& [name, tail] : tails) {
    SCOPED_TRACE(name);
    TempDir dir;
    const std::string path = dir.file("results.jsonl");
    {
      ResultsLog log(path, false);
      for (const TrialRecord& record : records) log.append(record);
    }
    const std::string intact = read_text(path);
    write_text(path, intact + tail);

    // Reading alone drops the tail but leaves the file as it is.
    expect_same_records(read_results_file(path), records);
    EXPECT_EQ(read_text(path), intact + tail);

    const TrialRecord next = make_record("resnet20", 0.2, 1, 49);
    {
      ResultsLog log(path, true);
      expect_same_records(log.existing(), records);
      EXPECT_EQ(read_text(path), intact);  // truncated to the last complete line
      log.append(next);
    }
    expect_valid_file(path);
    std::vector<TrialRecord> expected = records;
    expected.push_back(next);
    expect_same_records(read_results_file(path), expected);
  }
}

TEST(ResultsLog, CorruptLineBeforeTheLastIsUserErrorWithLineNumber) {
  TempDir dir;
  const std::string path = dir.file("results.jsonl");
  const std::vector<TrialRecord> records = sample_records();
  const std::string line1 = to_json(records[0]).dump() + "\n";
  const std::string line3 = to_json(records[1]).dump() + "\n";

  write_text(path, line1 + "{\"model\": oops\n" + line3);
  std::string message = user_error_of([&] { ResultsLog log(path, true); });
  EXPECT_NE(message.find("'" + path + "' line 2"), std::string::npos) << message;
  EXPECT_EQ(message.find('\n'), std::string::npos);
  EXPECT_NE(user_error_of([&] { read_results_file(path); }).find("line 2"), std::string::npos);
  EXPECT_EQ(read_text(path), line1 + "{\"model\": oops\n" + line3);  // nothing truncated

  // Valid JSON that is not a record is corrupt wherever it is, last line included: a crash cannot
  // produce it.
  nlohmann::json no_sigma = to_json(records[2]);
  no_sigma.erase("sigma");
  write_text(path, line1 + line3 + no_sigma.dump() + "\n");
  message = user_error_of([&] { ResultsLog log(path, true); });
  EXPECT_NE(message.find("line 3"), std::string::npos) << message;
  EXPECT_NE(message.find("'sigma'"), std::string::npos) << message;
}

// Regression (found by fuzz/fuzz_results with a crafted input): an "extra" nested 200,000 deep was
// copied recursively and overflowed the stack.
TEST(ResultsLog, DeeplyNestedLineIsUserErrorNotStackOverflow) {
  TempDir dir;
  const std::string path = dir.file("results.jsonl");
  nlohmann::json record = to_json(sample_records()[0]);
  record.erase("extra");
  std::string line = record.dump();
  const size_t depth = 200000;
  line.insert(line.size() - 1, ",\"extra\":" + std::string(depth, '[') + std::string(depth, ']'));
  write_text(path, to_json(sample_records()[1]).dump() + "\n" + line + "\n");
  const std::string message = user_error_of([&] { read_results_file(path); });
  EXPECT_NE(message.find("line 2 nests JSON deeper than 64 levels"), std::string::npos) << message;
  EXPECT_NE(user_error_of([&] { ResultsLog log(path, true); }).find("line 2"), std::string::npos);
}

TEST(ResultsLog, DuplicateUnitsAreKeptOnce) {
  TempDir dir;
  const std::string path = dir.file("results.jsonl");
  const TrialRecord first = make_record("resnet20", 0.1, 0, 88);
  const TrialRecord again = make_record("resnet20", 0.1, 0, 77);  // same unit, other result
  const TrialRecord other = make_record("resnet20", 0.1, 1, 87);
  {
    ResultsLog log(path, false);
    log.append(first);
    log.append(again);
    log.append(other);
  }
  ResultsLog log(path, true);
  expect_same_records(log.existing(), {first, other});
  const std::vector<TableRow> rows = aggregate({first, again, other});
  ASSERT_EQ(rows.size(), 1u);
  EXPECT_EQ(rows[0].accuracy.n, 2u);
  EXPECT_DOUBLE_EQ(rows[0].accuracy.mean, 87.5);
}

TEST(ResultsLog, ConcurrentAppendsStayWholeLines) {
  TempDir dir;
  const std::string path = dir.file("results.jsonl");
  constexpr int kThreads = 4, kPerThread = 40;
  {
    ResultsLog log(path, false);
    std::vector<std::thread> threads;
    for (int t = 0; t < kThreads; ++t) {
      threads.emplace_back([&log, t] {
        for (int i = 0; i < kPerThread; ++i) {
          log.append(make_record("model" + std::to_string(t), 0.1, i, 50 + i * 0.25));
        }
      });
    }
    for (std::thread& thread : threads) thread.join();
    for (int t = 0; t < kThreads; ++t)
      EXPECT_TRUE(log.has(make_record("model" + std::to_string(t), 0.1, 0, 0)));
  }
  expect_valid_file(path);
  const std::vector<TrialRecord> back = read_results_file(path);
  ASSERT_EQ(back.size(), size_t(kThreads * kPerThread));
  std::set<std::string> keys;
  for (const TrialRecord& record : back) keys.insert(unit_key(record));
  EXPECT_EQ(keys.size(), back.size());
}

// The record a child writes as trial `trial`, so that the parent can check every field.
TrialRecord killed_child_record(int trial) {
  TrialRecord record = make_record("resnet56", 0.075, trial, 80 + (trial % 97) * 0.125,
                                   {60 + (trial % 13) * 0.5, 80 + (trial % 97) * 0.125});
  // A long field makes each line span more bytes, so kills land inside writes more often.
  record.extra = {{"padding", std::string(600 + trial % 300, 'p')}, {"trial_twice", 2 * trial}};
  return record;
}

TEST(ResultsLog, SurvivesSigkillAtRandomMoments) {
  const uint32_t seed = testing::test_seed(20240611);
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> delay_us(500, 25000);
  TempDir dir;
  const std::string path = dir.file("killed.jsonl");
  size_t previous = 0;
  constexpr int kRounds = 8;
  for (int round = 0; round < kRounds; ++round) {
    const int delay = delay_us(rng);
    const pid_t child = fork();
    ASSERT_GE(child, 0) << "fork failed";
    if (child == 0) {
      // No gtest assertions here; the exit code tells the parent. Each run resumes the log and
      // continues the numbering, so the records must always be exactly trials 0, 1, 2, ...
      int code = 0;
      try {
        ResultsLog log(path, true);
        for (int trial = int(log.existing().size()); trial < 1000000; ++trial) {
          log.append(killed_child_record(trial));
        }
      } catch (...) {
        code = 3;
      }
      _exit(code);
    }
    usleep(useconds_t(delay));
    kill(child, SIGKILL);
    int status = 0;
    ASSERT_EQ(waitpid(child, &status, 0), child);
    ASSERT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL)
        << "round " << round << ": the child failed before it was killed (status " << status << ")";

    const std::vector<TrialRecord> records = read_results_file(path);
    ASSERT_GE(records.size(), previous) << "round " << round << ": complete records were lost";
    std::set<std::string> keys;
    for (size_t i = 0; i < records.size(); ++i) {
      ASSERT_EQ(to_json(records[i]), to_json(killed_child_record(int(i))))
          << "round " << round << " record " << i;
      keys.insert(unit_key(records[i]));
    }
    EXPECT_EQ(keys.size(), records.size());
    std::cout << "[ round    ] " << round << ": killed after " << delay << " us, "
              << records.size() - previous << " new records" << std::endl;
    previous = records.size();
  }
  EXPECT_GT(previous, 0u) << "no child ever appended a record: the kills came too early";
  // Resume once more: any torn tail goes, and the file ends whole.
  {
    ResultsLog log(path, true);
    EXPECT_EQ(log.existing().size(), previous);
    log.append(killed_child_record(int(previous)));
  }
  expect_valid_file(path);
  EXPECT_EQ(read_results_file(path).size(), previous + 1);
}

// ---------------------------------------------------------------------------------------------
// aggregate and format_table

// Records in a deliberately mixed order: resnet20 appears first (so comes first), its sigmas are
// out of order, and it has a clean run and three exits; mlp has one trial and no exits.
std::vector<TrialRecord> table_records() {
  return {
      make_record("resnet20", 0.2, 0, 60, {40, 50, 60}),
      make_record("mlp", 0.1, 0, 50),
      make_record("resnet20", 0.1, 0, 90, {70, 80, 90}),
      make_record("resnet20", 0.1, 1, 92, {72, 84, 92}),
      make_record("resnet20", 0, -1, 91.5, {75, 88, 91.5}),
      make_record("resnet20", 0.1, 2, 91, {71, 82, 91}),
      make_record("resnet20", 0.1, 3, 93, {73, 86, 93}),
      make_record("resnet20", 0.1, 3, 10, {10, 10, 10}),  // duplicate unit: ignored
      make_record("resnet20", 0.05, 0, 95, {80, 90, 95}),
  };
}

TEST(Aggregate, GroupsByModelThenAscendingSigma) {
  const std::vector<TableRow> rows = aggregate(table_records());
  ASSERT_EQ(rows.size(), 4u);
  EXPECT_EQ(rows[0].model, "resnet20");
  EXPECT_EQ(rows[0].sigma, 0.05);
  EXPECT_EQ(rows[1].sigma, 0.1);
  EXPECT_EQ(rows[2].sigma, 0.2);
  EXPECT_EQ(rows[3].model, "mlp");
  for (int i = 0; i < 3; ++i) EXPECT_EQ(rows[i].clean_accuracy, 91.5);
  EXPECT_TRUE(std::isnan(rows[3].clean_accuracy));

  // resnet20 at 0.1: 90 91 92 93, the same numbers as 1 2 3 4 shifted by 89 (see
  // Summarize.HandComputedFourValues): mean 91.5, std 1.2909944487358056, half-width
  // 2.0542602567605220, p05 90.15, median 91.5, p95 92.85.
  const TableRow& row = rows[1];
  EXPECT_EQ(row.accuracy.n, 4u);
  EXPECT_DOUBLE_EQ(row.accuracy.mean, 91.5);
  EXPECT_NEAR(row.accuracy.std, 1.2909944487358056, 1e-13);
  EXPECT_NEAR(row.accuracy.ci_low, 91.5 - 2.0542602567605220, 1e-12);
  EXPECT_NEAR(row.accuracy.p05, 90.15, 1e-12);
  EXPECT_NEAR(row.accuracy.p95, 92.85, 1e-12);
  ASSERT_EQ(row.exit_accuracy.size(), 3u);
  EXPECT_DOUBLE_EQ(row.exit_accuracy[0].mean, 71.5);  // 70 71 72 73
  // Exit 2: 80 82 84 86 = 2 * (1 2 3 4) + 78: mean 83, std 2.5819888974716112, p95 85.7.
  EXPECT_DOUBLE_EQ(row.exit_accuracy[1].mean, 83);
  EXPECT_NEAR(row.exit_accuracy[1].std, 2.5819888974716112, 1e-13);
  EXPECT_NEAR(row.exit_accuracy[1].p95, 85.7, 1e-12);
  EXPECT_TRUE(rows[3].exit_accuracy.empty());
  EXPECT_TRUE(std::isnan(rows[3].accuracy.std));
}

TEST(FormatTable, Markdown) {
  const std::string md = format_table(aggregate(table_records()), "md");
  const std::vector<std::string> lines = split(md, '\n');
  ASSERT_EQ(lines.size(), 7u);  // header, rule, 4 rows, "" after the final newline
  EXPECT_EQ(lines[0],
            "| model | σ | trials | mean % | std | 95 % CI | min | max | clean % | exit 1 mean % "
            "| exit 2 mean % | exit 3 mean % |");
  EXPECT_EQ(lines[3],
            "| resnet20 | 0.1 | 4 | 91.50 | 1.29 | 89.45 – 93.55 | 90.00 | 93.00 | 91.50 | 71.50 "
            "| 83.00 | 91.50 |");
  EXPECT_EQ(lines[5],
            "| mlp | 0.1 | 1 | 50.00 | – | needs ≥ 3 chips | 50.00 | 50.00 | – | – | – | – |");
  EXPECT_EQ(lines[6], "");
}

// σ = 0: every chip is the same, so the sweep runs one; its row says so, with an interval of zero
// width (no chip variation), in every format, and an older file's several equal chips read alike.
// A σ = 0 cell whose chips differ (impossible from cimsweep) keeps the ordinary statistics.
TEST(Aggregate, SigmaZeroCellHasNoChipVariation) {
  for (int chips : {1, 4}) {
    std::vector<TrialRecord> records = {make_record("resnet20", 0.1, 0, 60, {40, 50, 60})};
    for (int t = 0; t < chips; ++t) records.push_back(make_record("resnet20", 0, t, 91, {70, 80, 91}));
    const std::vector<TableRow> rows = aggregate(records);
    ASSERT_EQ(rows.size(), 2u);
    const Summary& s = rows[0].accuracy;
    EXPECT_EQ(rows[0].sigma, 0.0);
    EXPECT_EQ(s.n, size_t(chips));
    EXPECT_EQ(s.mean, 91);
    EXPECT_EQ(s.std, 0.0);
    EXPECT_EQ(s.ci_low, 91);
    EXPECT_EQ(s.ci_high, 91);
    ASSERT_EQ(rows[0].exit_accuracy.size(), 3u);
    EXPECT_EQ(rows[0].exit_accuracy[1].ci_low, 80);
    EXPECT_EQ(rows[0].exit_accuracy[1].ci_high, 80);
    EXPECT_TRUE(std::isnan(rows[1].accuracy.ci_low)) << "σ > 0, one chip: no interval";
    const std::vector<std::string> md = split(format_table(rows, "md"), '\n');
    ASSERT_GE(md.size(), 6u);
    EXPECT_EQ(md[2], "| resnet20 | 0.0 | " + std::to_string(chips) +
                         " | 91.00 | 0.00 | 91.00 – 91.00 | 91.00 | 91.00 | – | 70.00 | 80.00 | 91.00 |");
    EXPECT_EQ(md[5], "σ = 0: nothing varies, so every chip is the same chip: one is run, and its 95 % "
                     "interval has zero width.");
    const auto json = nlohmann::json::parse(format_table(rows, "json"));
    EXPECT_EQ(json[0].at("ci_low").get<double>(), 91);
    EXPECT_EQ(json[0].at("ci_high").get<double>(), 91);
  }
  const std::vector<TableRow> differ = aggregate(
      {make_record("m", 0, 0, 90), make_record("m", 0, 1, 91), make_record("m", 0, 2, 92)});
  EXPECT_GT(differ[0].accuracy.std, 0.0);
  EXPECT_LT(differ[0].accuracy.ci_low, differ[0].accuracy.ci_high);
  EXPECT_EQ(format_table(differ, "md").find("nothing varies"), std::string::npos);
}

// The README's main job printed "95 % CI −13.78 – 121.34" for 3 chips: an accuracy interval now
// stays inside [0, 100], and below 3 chips there is none.
TEST(AccuracySummary, IntervalInsideZeroToHundredAndNoneBelowThreeChips) {
  // 23.33, 62.33 and 75.67: mean 53.78, std 27.20, t(0.975, 2) = 4.3027: ±67.6 unclipped.
  const Summary wide = accuracy_summary({23.333333, 62.333333, 75.666667});
  EXPECT_EQ(wide.ci_low, 0.0);
  EXPECT_NEAR(wide.ci_high, 100.0, 0);
  EXPECT_NEAR(interval_half_width(wide), 4.302652729749464 * wide.std / std::sqrt(3.0), 1e-9);
  EXPECT_GT(interval_half_width(wide), 53.78);  // the raw interval would have left [0, 100]
  const Summary narrow = accuracy_summary({90, 91, 92, 93});
  EXPECT_NEAR(narrow.ci_low, 91.5 - 2.0542602567605220, 1e-12);  // inside: unchanged
  EXPECT_NEAR(narrow.ci_high, 91.5 + 2.0542602567605220, 1e-12);
  for (const std::vector<double>& few : {std::vector<double>{40, 60}, std::vector<double>{40}}) {
    const Summary s = accuracy_summary(few);
    EXPECT_TRUE(std::isnan(s.ci_low) && std::isnan(s.ci_high)) << few.size();
    EXPECT_TRUE(std::isnan(interval_half_width(s)));
    EXPECT_EQ(s.mean, few.size() == 2 ? 50 : 40);
  }
}

TEST(FormatTable, StoppingRuleMarksTheCellsThatHitTheCap) {
  std::vector<TrialRecord> records;
  for (int t = 0; t < 4; ++t) {
    records.push_back(make_record("m", 0.0, t, 90.0));             // settled: std 0
    records.push_back(make_record("m", 0.1, t, 50.0 + 10.0 * t));  // ±20.5: still wide
  }
  std::vector<TableRow> rows = aggregate(records);
  mark_stopping_rule(rows, 1.0, 4);
  EXPECT_FALSE(rows[0].hit_trial_cap);
  EXPECT_TRUE(rows[1].hit_trial_cap);
  const std::vector<std::string> md = split(format_table(rows, "md"), '\n');
  EXPECT_EQ(md[2].rfind("| m | 0.0 | 4 | 90.00 |", 0), 0u) << md[2];
  EXPECT_EQ(md[3].rfind("| m | 0.1 | 4 (cap) | 65.00 |", 0), 0u) << md[3];
  const std::vector<std::string> csv = split(format_table(rows, "csv"), '\n');
  EXPECT_NE(csv[0].find(",ci_target,hit_cap"), std::string::npos) << csv[0];
  EXPECT_NE(csv[2].find(",1.0,true"), std::string::npos) << csv[2];
  const nlohmann::json json = nlohmann::json::parse(format_table(rows, "json"));
  EXPECT_EQ(json[0]["hit_cap"], false);
  EXPECT_EQ(json[1]["hit_cap"], true);
  EXPECT_EQ(json[1]["ci_target"], 1.0);
  // A table without the rule has no such columns.
  EXPECT_EQ(format_table(aggregate(records), "csv").find("hit_cap"), std::string::npos);
}

TEST(FormatTable, Csv) {
  const std::vector<TableRow> rows = aggregate(table_records());
  const std::vector<std::string> lines = split(format_table(rows, "csv"), '\n');
  ASSERT_EQ(lines.size(), 6u);
  const std::vector<std::string> header = split(lines[0], ',');
  ASSERT_EQ(header.size(), 13u + 3 * 10);
  EXPECT_EQ(header[0], "model");
  EXPECT_EQ(header[3], "mean");
  EXPECT_EQ(header[12], "clean");
  EXPECT_EQ(header[13], "exit1_n");
  for (size_t i = 1; i + 1 < lines.size(); ++i)
    EXPECT_EQ(split(lines[i], ',').size(), header.size());

  const std::vector<std::string> row = split(lines[2], ',');
  EXPECT_EQ(row[0], "resnet20");
  EXPECT_EQ(row[1], "0.1");
  EXPECT_EQ(row[2], "4");
  EXPECT_EQ(std::stod(row[4]), rows[1].accuracy.std);  // full precision: reads back exactly
  EXPECT_EQ(std::stod(row[5]), rows[1].accuracy.ci_low);
  EXPECT_EQ(std::stod(row[12]), 91.5);
  const std::vector<std::string> mlp = split(lines[4], ',');
  EXPECT_EQ(mlp[4], "");   // std NaN
  EXPECT_EQ(mlp[12], "");  // no clean run
  EXPECT_EQ(mlp[13], "");  // no exits

  // Labels with commas or quotes are quoted per RFC 4180.
  const std::string quoted = format_table(aggregate({make_record("a,\"b\"", 0.1, 0, 1)}), "csv");
  EXPECT_NE(quoted.find("\n\"a,\"\"b\"\"\",0.1,1,"), std::string::npos) << quoted;
}

TEST(FormatTable, JsonParsesBackWithAllFields) {
  const nlohmann::json table =
      nlohmann::json::parse(format_table(aggregate(table_records()), "json"));
  ASSERT_TRUE(table.is_array());
  ASSERT_EQ(table.size(), 4u);
  const nlohmann::json& row = table[1];
  EXPECT_EQ(row["model"], "resnet20");
  EXPECT_EQ(row["sigma"].get<double>(), 0.1);
  EXPECT_EQ(row["trials"], 4);
  // The accuracy summary's fields sit at the top level of the row.
  for (const char* field :
       {"n", "mean", "std", "ci_low", "ci_high", "min", "p05", "median", "p95", "max"}) {
    EXPECT_TRUE(row.contains(field)) << field;
  }
  EXPECT_EQ(row["n"], 4);
  EXPECT_EQ(row["mean"].get<double>(), 91.5);
  EXPECT_NEAR(row["std"].get<double>(), 1.2909944487358056, 1e-13);
  EXPECT_NEAR(row["ci_high"].get<double>(), 91.5 + 2.0542602567605220, 1e-12);
  EXPECT_NEAR(row["p05"].get<double>(), 90.15, 1e-12);
  EXPECT_EQ(row["median"].get<double>(), 91.5);
  EXPECT_NEAR(row["p95"].get<double>(), 92.85, 1e-12);
  EXPECT_EQ(row["min"].get<double>(), 90);
  EXPECT_EQ(row["max"].get<double>(), 93);
  EXPECT_EQ(row["clean_accuracy"].get<double>(), 91.5);
  ASSERT_EQ(row["exit_accuracy"].size(), 3u);
  EXPECT_EQ(row["exit_accuracy"][1]["n"], 4);
  EXPECT_EQ(row["exit_accuracy"][1]["mean"].get<double>(), 83);
  EXPECT_NEAR(row["exit_accuracy"][1]["p95"].get<double>(), 85.7, 1e-12);

  const nlohmann::json& mlp = table[3];
  EXPECT_TRUE(mlp["std"].is_null());
  EXPECT_TRUE(mlp["ci_low"].is_null());
  EXPECT_TRUE(mlp["clean_accuracy"].is_null());
  EXPECT_TRUE(mlp["exit_accuracy"].empty());
}

TEST(FormatTable, UnknownFormatAndEmptyTable) {
  EXPECT_EQ(user_error_of([] { format_table({}, "xml"); }),
            "unknown --format 'xml': use md, csv or json");
  EXPECT_EQ(nlohmann::json::parse(format_table({}, "json")), nlohmann::json::array());
  EXPECT_EQ(split(format_table({}, "csv"), '\n').size(), 2u);  // header only
}

}  // namespace
}  // namespace cimsweep
