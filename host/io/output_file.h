// Every file cimsweep writes (tables, merged results, Slurm scripts, model files) goes through
// here, so that no output path ever replaces what it should not: a regular file or a new path is
// written to a temporary in its directory, fsync'ed and renamed over it; a symlink is followed and
// its target written that way; a character device or a pipe (/dev/null, /dev/stdout, a FIFO) is
// written straight. The destination is resolved and probed when the OutputPath is made, i.e.
// before any work, and can be compared by identity (device + inode) with the inputs of a run.
#pragma once
#include <sys/types.h>

#include <string>

namespace cimsweep {

// What a path refers to, through symlinks: (device, inode) of an existing file, or of its
// directory plus its name for a path yet to be created, so that two spellings of one path (or
// two hard links) compare equal even before the file exists.
struct FileIdentity {
  dev_t device = 0;
  ino_t inode = 0;
  std::string new_name;  // non-empty: the file does not exist; device/inode are its directory's
  bool known = false;    // false: the directory does not exist either
  bool operator==(const FileIdentity& other) const {
    return known && other.known && device == other.device && inode == other.inode &&
           new_name == other.new_name;
  }
};
FileIdentity file_identity(const std::string& path);

// UserError (one line) when the output `path` is the file `other` (an input, the results file
// …), by identity, so that a different spelling, a symlink or a hard link does not slip through.
// Either path empty: nothing to compare.
void refuse_same_file(const std::string& path, const std::string& what, const std::string& other,
                      const std::string& other_what);

// The path a chain of symlinks ends at (the path itself when it is no symlink); the end need
// not exist. UserError on a loop. `what` names the path in messages ("--output", …).
std::string resolve_symlinks(const std::string& path, const std::string& what);

class OutputPath {
 public:
  // Resolves and checks the destination: refuses a directory or a block device, and proves the
  // location writable (a probe file created and removed in the directory; for a device or pipe,
  // write permission). `what` names it in messages, e.g. "--output" or "model file". UserError.
  OutputPath(const std::string& path, const std::string& what);
  OutputPath() = default;

  bool empty() const { return path_.empty(); }
  const std::string& path() const { return path_; }      // as given
  const std::string& target() const { return target_; }  // symlinks resolved
  bool atomic() const { return atomic_; }                // false: a device or pipe, written straight
  FileIdentity identity() const { return file_identity(target_); }

  // Writes all of text (atomically where atomic()). UserError on failure; a failed atomic write
  // leaves the old file as it was.
  void write(const std::string& text) const;

 private:
  friend class OutputWriter;
  std::string path_, target_, what_;
  bool atomic_ = true;
  bool append_ = false;  // a stream (/dev/stdout, /proc/self/fd/N): append to what is there
};

// Streams an output: the temporary (or the device) is opened on construction, commit() makes it
// the file. Destroyed without commit(), the temporary is removed and the old file stays.
class OutputWriter {
 public:
  explicit OutputWriter(const OutputPath& output);
  ~OutputWriter();
  OutputWriter(const OutputWriter&) = delete;
  OutputWriter& operator=(const OutputWriter&) = delete;
  void write(const void* data, size_t size);
  void commit();

 private:
  [[noreturn]] void fail(const std::string& step, int error);
  const OutputPath& output_;
  std::string temp_;  // empty when written straight
  int fd_ = -1;
  bool committed_ = false;
};

// OutputPath(path, what).write(text): for outputs that need no check before the work.
void write_output_file(const std::string& path, const std::string& text, const std::string& what);

// Removes the temporaries that writers of this program left in `directory` when they were killed:
// names "<file>.tmp-<host>-<pid>-XXXXXX" of this host whose process no longer runs, owned by this
// user. A temporary of a live writer (here or on another node of a shared file system) is kept.
// Returns how many were removed. Called by every atomic write, before its own temporary.
int remove_orphan_temporaries(const std::string& directory);

// Writes all of data, retrying interrupted and short writes. Returns false with errno set.
bool write_all(int fd, const void* data, size_t size);
// Makes a new or renamed directory entry of `path` durable (best effort: a failure only weakens
// crash safety).
void sync_directory_of(const std::string& path);

// The temporary-name prefix of this process for `target`: "<target>.tmp-<host>-<pid>-".
std::string temporary_prefix(const std::string& target);

}  // namespace cimsweep
