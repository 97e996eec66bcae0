// Outputs and results files never replace or delete what they should not: the output writer
// (atomic onto files, through symlinks, straight into pipes and descriptors, probed up front,
// refusing an input by identity, cleaning killed writers' temporaries) and the results file's
// lock (a second writer stops or waits; a failed writer removes only its own empty file).
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "common/errors.h"
#include "host/io/output_file.h"
#include "host/results/results.h"
#include "tests/test_util.h"

namespace cimsweep {
namespace {

using testing::read_text;
using testing::TempDir;
using testing::write_text;
namespace fs = std::filesystem;

using testing::user_error;

std::vector<std::string> entries_of(const std::string& directory) {
  std::vector<std::string> names;
  for (const auto& entry : fs::directory_iterator(directory))
    names.push_back(entry.path().filename().string());
  std::sort(names.begin(), names.end());
  return names;
}

// A pid that ran and is gone: a child that exited and was reaped.
pid_t dead_pid() {
  const pid_t child = fork();
  if (child == 0) _exit(0);
  waitpid(child, nullptr, 0);
  return child;
}

TEST(OutputFile, RegularFileIsReplacedAtomicallyKeepingItsMode) {
  TempDir dir;
  const std::string path = dir.file("table.md");
  write_output_file(path, "first\n", "--output");
  EXPECT_EQ(read_text(path), "first\n");
  ASSERT_EQ(chmod(path.c_str(), 0600), 0);
  write_output_file(path, "second, longer\n", "--output");
  EXPECT_EQ(read_text(path), "second, longer\n");
  struct stat status;
  ASSERT_EQ(stat(path.c_str(), &status), 0);
  EXPECT_EQ(status.st_mode & 0777, 0600u);
  EXPECT_EQ(entries_of(dir.path()), std::vector<std::string>{"table.md"}) << "a temporary is left";
}

// Row 8: a missing or unwritable directory is found when the OutputPath is made, before work.
TEST(OutputFile, UnwritableLocationsAreRefusedUpFront) {
  TempDir dir;
  EXPECT_NE(user_error([&] { OutputPath(dir.file("nodir/t.md"), "--output"); })
                .find("directory '" + dir.file("nodir") + "' does not exist"),
            std::string::npos);
  fs::create_directory(dir.file("sub"));
  EXPECT_NE(user_error([&] { OutputPath(dir.file("sub"), "--output"); }).find("is a directory"),
            std::string::npos);
  if (geteuid() != 0) {  // root writes into read-only directories anyway
    fs::create_directory(dir.file("ro"));
    chmod(dir.file("ro").c_str(), 0555);
    EXPECT_NE(user_error([&] { OutputPath(dir.file("ro/t.md"), "--output"); })
                  .find("cannot create files in"),
              std::string::npos);
    chmod(dir.file("ro").c_str(), 0755);
  }
  EXPECT_EQ(entries_of(dir.path()).size(), geteuid() != 0 ? 2u : 1u) << "the probe stayed";
}

// Row 2: a symlink stays a link; its target gets the new contents (a dangling one is created).
TEST(OutputFile, SymlinkIsFollowedAndStaysALink) {
  TempDir dir;
  write_text(dir.file("target.md"), "old\n");
  fs::create_symlink("target.md", dir.file("out.md"));
  write_output_file(dir.file("out.md"), "new\n", "--output");
  EXPECT_TRUE(fs::is_symlink(dir.file("out.md")));
  EXPECT_EQ(read_text(dir.file("target.md")), "new\n");
  fs::create_symlink("later.md", dir.file("dangling.md"));
  write_output_file(dir.file("dangling.md"), "made\n", "--output");
  EXPECT_TRUE(fs::is_symlink(dir.file("dangling.md")));
  EXPECT_EQ(read_text(dir.file("later.md")), "made\n");
  fs::create_symlink("loop2", dir.file("loop1"));
  fs::create_symlink("loop1", dir.file("loop2"));
  EXPECT_NE(user_error([&] { OutputPath(dir.file("loop1"), "--output"); }).find("loop"),
            std::string::npos);
}

// Row 1 with a FIFO the test makes: written straight (a reader gets the table), still a FIFO.
TEST(OutputFile, FifoIsWrittenStraightNotReplaced) {
  TempDir dir;
  const std::string fifo = dir.file("pipe");
  ASSERT_EQ(mkfifo(fifo.c_str(), 0644), 0);
  std::string received;
  std::thread reader([&] { received = read_text(fifo); });
  const OutputPath output(fifo, "--output");
  EXPECT_FALSE(output.atomic());
  output.write("| table |\n");
  reader.join();
  EXPECT_EQ(received, "| table |\n");
  struct stat status;
  ASSERT_EQ(lstat(fifo.c_str(), &status), 0);
  EXPECT_TRUE(S_ISFIFO(status.st_mode));
  EXPECT_EQ(entries_of(dir.path()), std::vector<std::string>{"pipe"});
}

// Row 1, /dev/stdout's case with a stand-in: /dev/stdout is a link to /proc/self/fd/1; here a
// link in the scratch directory to /proc/self/fd/N of a pipe this test holds. The descriptor is
// appended to, and a device that refuses the write (as /dev/full does) is an error, not a file.
TEST(OutputFile, DescriptorLinkIsAStreamAndAFailedWriteIsAnError) {
  TempDir dir;
  int fds[2];
  ASSERT_EQ(pipe(fds), 0);
  fs::create_symlink("/proc/self/fd/" + std::to_string(fds[1]), dir.file("stdout"));
  const OutputPath output(dir.file("stdout"), "--output");
  EXPECT_FALSE(output.atomic());
  output.write("rows\n");
  char buffer[16] = {};
  EXPECT_EQ(read(fds[0], buffer, sizeof buffer), 5);
  EXPECT_EQ(std::string(buffer), "rows\n");
  EXPECT_TRUE(fs::is_symlink(dir.file("stdout")));
  // The reader gone: the write fails (EPIPE) and says so.
  close(fds[0]);
  signal(SIGPIPE, SIG_IGN);
  EXPECT_NE(user_error([&] { output.write("more\n"); }).find("cannot write --output"),
            std::string::npos);
  signal(SIGPIPE, SIG_DFL);
  close(fds[1]);
}

// Row 3: identity, not spelling: a hard link, "./x", and two new paths that would be one file.
TEST(OutputFile, SameFileIsRefusedByIdentity) {
  TempDir dir;
  write_text(dir.file("r.jsonl"), "{}\n");
  fs::create_hard_link(dir.file("r.jsonl"), dir.file("hard.jsonl"));
  fs::create_symlink("r.jsonl", dir.file("soft.jsonl"));
  for (const std::string& other : {dir.file("hard.jsonl"), dir.file("soft.jsonl"),
                                   dir.path() + "/./r.jsonl"})
    EXPECT_NE(user_error([&] {
                refuse_same_file(dir.file("r.jsonl"), "--output", other, "--results");
              }).find("is the same file as --results"),
              std::string::npos)
        << other;
  EXPECT_NE(user_error([&] {
              refuse_same_file(dir.file("new.md"), "--output", dir.path() + "//new.md", "--results");
            }),
            "");
  EXPECT_EQ(user_error([&] {
              refuse_same_file(dir.file("r.jsonl"), "--output", dir.file("other.md"), "--results");
            }),
            "");
}

// Row 13: a writer killed before its rename leaves a temporary; the next write there removes
// it, but not a live writer's, another host's, or an unrelated file.
TEST(OutputFile, OrphanTemporariesOfKilledWritersAreRemovedOnTheNextWrite) {
  TempDir dir;
  const std::string target = dir.file("t.md");
  const pid_t child = fork();
  if (child == 0) {
    OutputPath output(target, "--output");
    OutputWriter writer(output);
    writer.write("half a tab", 10);
    raise(SIGKILL);
  }
  int status = 0;
  waitpid(child, &status, 0);
  ASSERT_TRUE(WIFSIGNALED(status));
  ASSERT_EQ(entries_of(dir.path()).size(), 1u);
  const std::string orphan = entries_of(dir.path())[0];
  EXPECT_EQ(orphan.rfind("t.md.tmp-", 0), 0u) << orphan;

  const std::string own_prefix = temporary_prefix(target);  // this host, this (live) process
  const std::string host_part = own_prefix.substr(target.size() + 5);  // "<host>-<pid>-"
  const std::string host = host_part.substr(0, host_part.rfind('-', host_part.size() - 2));
  const std::string live = "t.md.tmp-" + host + "-1-abcdef";  // pid 1 runs
  const std::string other_host = "t.md.tmp-otherhost-" + std::to_string(dead_pid()) + "-abcdef";
  const std::string dead_other_name = "x.csv.tmp-" + host + "-" + std::to_string(dead_pid()) + "-qwerty";
  for (const std::string& name : {live, other_host, dead_other_name, std::string("notes.tmp-1")})
    write_text(dir.file(name), "x");

  write_output_file(target, "table\n", "--output");
  std::vector<std::string> expected = {"notes.tmp-1", live, other_host, "t.md"};
  std::sort(expected.begin(), expected.end());
  EXPECT_EQ(entries_of(dir.path()), expected);
  EXPECT_EQ(read_text(target), "table\n");
}

TrialRecord record(int trial) {
  TrialRecord r;
  r.model = "m";
  r.config_hash = "h";
  r.sigma = 0.1;
  r.trial = trial;
  r.images = 10;
  r.correct = 5;
  r.accuracy = 50;
  return r;
}

// Row 5: one writer at a time; the second is told who holds the file.
TEST(ResultsLock, SecondWriterGetsTheHoldersPid) {
  TempDir dir;
  const std::string path = dir.file("r.jsonl");
  ResultsLog first(path, false);
  first.append(record(0));
  const std::string message = user_error([&] { ResultsLog second(path, true); });
  EXPECT_NE(message.find("is being written by another cimsweep (pid " + std::to_string(getpid())),
            std::string::npos)
      << message;
  EXPECT_NE(message.find("--wait-for-lock"), std::string::npos) << message;
}

// Row 4: the clean-up of a writer that created the file and wrote nothing removes it only if it
// is still empty and still the file at the path.
TEST(ResultsLock, FailedWriterRemovesOnlyItsOwnEmptyFile) {
  TempDir dir;
  const std::string path = dir.file("r.jsonl");
  {
    ResultsLog created(path, false);
  }
  EXPECT_FALSE(fs::exists(path)) << "its own empty file stays behind";
  {
    ResultsLog created(path, false);
    write_text(dir.file("other"), "{\"someone\": \"else\"}\n");
    fs::rename(dir.file("other"), path);  // another file now has the name
  }
  EXPECT_EQ(read_text(path), "{\"someone\": \"else\"}\n");
  fs::remove(path);
  {
    ResultsLog created(path, false);
    const int fd = open(path.c_str(), O_WRONLY | O_APPEND);  // bytes not written through it
    ASSERT_EQ(write(fd, "x\n", 2), 2);
    close(fd);
  }
  EXPECT_EQ(read_text(path), "x\n");
}

// A waiting writer continues what the holder left, and when the holder removed its empty file
// meanwhile, the waiter makes a new one rather than writing into the removed one.
TEST(ResultsLock, WaitingWriterResumesAfterTheHolder) {
  TempDir dir;
  const std::string path = dir.file("r.jsonl");
  for (bool holder_appends : {true, false}) {
    fs::remove(path);
    auto holder = std::make_unique<ResultsLog>(path, false);
    size_t resumed = 99;
    std::thread waiter([&] {
      ResultsLog log(path, true, /*wait_for_lock=*/true);
      resumed = log.existing().size();
      log.append(record(1));
    });
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    if (holder_appends) holder->append(record(0));
    holder.reset();
    waiter.join();
    EXPECT_EQ(resumed, holder_appends ? 1u : 0u);
    EXPECT_EQ(read_results_file(path).size(), holder_appends ? 2u : 1u) << "a record was lost";
  }
}

}  // namespace
}  // namespace cimsweep
