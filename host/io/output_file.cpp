#include "host/io/output_file.h"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cstring>
#include <filesystem>
#include <regex>

#include "common/errors.h"

namespace cimsweep {
namespace fs = std::filesystem;

namespace {

std::string in_quotes(const std::string& text) {
  return "'" + text + "'";
}

std::string directory_of(const std::string& path) {
  const std::string parent = fs::path(path).parent_path().string();
  return parent.empty() ? "." : parent;
}

std::string name_of(const std::string& path) {
  return fs::path(path).filename().string();
}

// /proc/self/fd/N and /proc/PID/fd/N (where /dev/stdout and /dev/fd/N lead) name an open file
// of a process: its link text ("pipe:[…]", or the path of what the shell redirected to) is not
// a path to write atomically, the descriptor is a stream to append to.
bool is_descriptor_link(const std::string& path) {
  static const std::regex fd_directory(R"(/proc/(self|\d+)/fd)");
  char resolved[PATH_MAX];
  if (!::realpath(directory_of(path).c_str(), resolved)) return false;
  std::string directory = resolved;
  // realpath turns /proc/self into /proc/PID.
  return std::regex_match(directory, fd_directory);
}

std::string resolve(const std::string& path, const std::string& what, bool& descriptor) {
  descriptor = false;
  std::string current = path;
  for (int hops = 0; hops < 40; ++hops) {
    struct stat status;
    if (::lstat(current.c_str(), &status) != 0 || !S_ISLNK(status.st_mode)) return current;
    if (is_descriptor_link(current)) {
      descriptor = true;
      return current;
    }
    std::string link(PATH_MAX, '\0');
    const ssize_t length = ::readlink(current.c_str(), link.data(), link.size());
    if (length < 0) return current;
    link.resize(size_t(length));
    current = fs::path(link).is_absolute() ? link
                                           : (fs::path(directory_of(current)) / link).string();
  }
  throw UserError(what + " " + in_quotes(path) +
                  " is a loop of symbolic links: point it at a file or choose another path");
}

std::string host_name() {
  char name[256] = {};
  if (::gethostname(name, sizeof name - 1) != 0 || name[0] == '\0') return "host";
  std::string host = name;
  for (char& c : host)
    if (c == '/') c = '_';
  return host;
}

}  // namespace

bool write_all(int fd, const void* data, size_t size) {
  const char* bytes = static_cast<const char*>(data);
  while (size > 0) {
    const ssize_t wrote = ::write(fd, bytes, size);
    if (wrote < 0 && errno == EINTR) continue;
    if (wrote <= 0) {
      if (wrote == 0) errno = EIO;
      return false;
    }
    bytes += wrote;
    size -= size_t(wrote);
  }
  return true;
}

void sync_directory_of(const std::string& path) {
  const int fd = ::open(directory_of(path).c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return;
  (void)::fsync(fd);
  ::close(fd);
}

std::string resolve_symlinks(const std::string& path, const std::string& what) {
  bool descriptor = false;
  return resolve(path, what, descriptor);
}

FileIdentity file_identity(const std::string& path) {
  FileIdentity identity;
  std::string target;
  try {
    target = resolve_symlinks(path, "path");
  } catch (const UserError&) {
    return identity;
  }
  struct stat status;
  if (::stat(target.c_str(), &status) == 0) {
    identity.device = status.st_dev;
    identity.inode = status.st_ino;
    identity.known = true;
  } else if (::stat(directory_of(target).c_str(), &status) == 0) {
    identity.device = status.st_dev;
    identity.inode = status.st_ino;
    identity.new_name = name_of(target);
    identity.known = !identity.new_name.empty();
  }
  return identity;
}

std::string temporary_prefix(const std::string& target) {
  return target + ".tmp-" + host_name() + "-" + std::to_string(::getpid()) + "-";
}

int remove_orphan_temporaries(const std::string& directory) {
  DIR* listing = ::opendir(directory.c_str());
  if (!listing) return 0;
  const std::string host = host_name();
  const std::string marker = ".tmp-" + host + "-";
  int removed = 0;
  while (const dirent* entry = ::readdir(listing)) {
    const std::string name = entry->d_name;
    // <file>.tmp-<host>-<pid>-XXXXXX, XXXXXX as mkstemp makes it.
    const size_t at = name.rfind(marker);
    if (at == std::string::npos || at == 0) continue;
    const std::string rest = name.substr(at + marker.size());
    const size_t dash = rest.find('-');
    if (dash == std::string::npos || dash == 0 || dash > 9 || rest.size() != dash + 7 ||
        rest.find_first_not_of("0123456789") != dash)
      continue;
    const pid_t pid = pid_t(std::stol(rest.substr(0, dash)));
    if (pid <= 0 || pid == ::getpid() || ::kill(pid, 0) == 0 || errno != ESRCH) continue;
    const std::string path = directory + "/" + name;
    struct stat status;
    if (::lstat(path.c_str(), &status) != 0 || !S_ISREG(status.st_mode) ||
        status.st_uid != ::geteuid())
      continue;
    if (::unlink(path.c_str()) == 0) ++removed;
  }
  ::closedir(listing);
  return removed;
}

OutputPath::OutputPath(const std::string& path, const std::string& what)
    : path_(path), what_(what) {
  if (path.empty()) throw UserError(what + " is empty: give a file path");
  bool descriptor = false;
  target_ = resolve(path, what, descriptor);
  const std::string shown = what + " " + in_quotes(path) +
                            (target_ != path && !descriptor ? " (→ " + in_quotes(target_) + ")" : "");
  if (descriptor) {  // /dev/stdout and the like: the shell decided where it goes
    atomic_ = false;
    append_ = true;
    return;
  }
  struct stat status;
  if (::stat(target_.c_str(), &status) == 0) {
    if (S_ISDIR(status.st_mode))
      throw UserError(shown + " is a directory: give the path of a file in it");
    if (S_ISCHR(status.st_mode) || S_ISFIFO(status.st_mode)) {
      atomic_ = false;
      if (::access(target_.c_str(), W_OK) != 0)
        throw UserError("cannot write " + shown + ": " + std::strerror(errno) +
                        ": check its permissions or choose another path");
      return;
    }
    if (!S_ISREG(status.st_mode))
      throw UserError(shown +
                      " is neither a regular file, a character device nor a pipe: refusing to "
                      "write it; choose another path");
  }
  // A regular file or a new one: the temporary goes into the target's directory. Making one
  // (and removing it) is the only sure test that the rename will work later: permissions,
  // read-only mounts, ACLs and quotas all show up here, before any trial runs.
  const std::string directory = directory_of(target_);
  std::string probe = temporary_prefix(target_) + "XXXXXX";
  const int fd = ::mkstemp(probe.data());
  if (fd < 0) {
    const int error = errno;
    struct stat dir_status;
    if (::stat(directory.c_str(), &dir_status) != 0)
      throw UserError("cannot write " + shown + ": directory " + in_quotes(directory) +
                      " does not exist: create it or choose another path");
    throw UserError("cannot write " + shown + ": cannot create files in " + in_quotes(directory) +
                    " (" + std::strerror(error) + "): check its permissions or choose another path");
  }
  ::close(fd);
  ::unlink(probe.c_str());
}

void refuse_same_file(const std::string& path, const std::string& what, const std::string& other,
                      const std::string& other_what) {
  if (other.empty() || path.empty()) return;
  if (file_identity(path) == file_identity(other))
    throw UserError(what + " " + in_quotes(path) + " is the same file as " + other_what + " " +
                    in_quotes(other) + ": writing it would destroy that; choose another " + what +
                    " path");
}

void OutputPath::write(const std::string& text) const {
  OutputWriter writer(*this);
  writer.write(text.data(), text.size());
  writer.commit();
}

OutputWriter::OutputWriter(const OutputPath& output) : output_(output) {
  if (!output.atomic_) {
    fd_ = ::open(output.target_.c_str(),
                 O_WRONLY | O_CLOEXEC | (output.append_ ? O_APPEND : 0));
    if (fd_ < 0) fail("cannot open it", errno);
    return;
  }
  remove_orphan_temporaries(directory_of(output.target_));
  // Mode of the file it replaces, so that a rewrite keeps the permissions the user gave it.
  mode_t mode = 0644;
  struct stat status;
  if (::stat(output.target_.c_str(), &status) == 0) mode = status.st_mode & 07777;
  temp_ = temporary_prefix(output.target_) + "XXXXXX";
  fd_ = ::mkstemp(temp_.data());
  if (fd_ < 0) {
    const int error = errno;
    temp_.clear();
    fail("cannot create a temporary file beside it", error);
  }
  if (::fchmod(fd_, mode) != 0) fail("cannot set the temporary file's permissions", errno);
}

OutputWriter::~OutputWriter() {
  if (fd_ >= 0) ::close(fd_);
  if (!committed_ && !temp_.empty()) ::unlink(temp_.c_str());
}

void OutputWriter::write(const void* data, size_t size) {
  if (!write_all(fd_, data, size)) fail("cannot write it", errno);
}

void OutputWriter::commit() {
  // fsync before rename: otherwise a crash can leave the new name pointing at an empty file.
  if (!temp_.empty() && ::fsync(fd_) != 0) fail("cannot flush it to disk", errno);
  const int fd = fd_;
  fd_ = -1;
  if (::close(fd) != 0) fail("cannot close it", errno);
  if (temp_.empty()) {
    committed_ = true;
    return;
  }
  if (::rename(temp_.c_str(), output_.target_.c_str()) != 0)
    fail("cannot rename the temporary file onto it", errno);
  committed_ = true;
  sync_directory_of(output_.target_);
}

void OutputWriter::fail(const std::string& step, int error) {
  throw UserError("cannot write " + output_.what_ + " " + in_quotes(output_.path_) + ": " + step +
                  ": " + std::strerror(error) +
                  ": check the path, free disk space and permissions");
}

void write_output_file(const std::string& path, const std::string& text, const std::string& what) {
  OutputPath(path, what).write(text);
}

}  // namespace cimsweep
