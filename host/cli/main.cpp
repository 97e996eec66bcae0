#include "host/cli/cli.h"

int main(int argc, char** argv) {
  return cimsweep::run_cli(argc, argv);
}
