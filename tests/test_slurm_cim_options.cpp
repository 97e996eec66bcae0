// `cimsweep slurm` takes every CIM option eval and sweep take (host/cli/run_options.h registers
// them once for all three), checks them on the login node, and passes them to every array task's
// sweep and to the resubmission command. No Slurm needed.
#include <gtest/gtest.h>

#include <filesystem>
#include <string>

#include "common/cim_config.h"
#include "host/sweep/slurm.h"
#include "tests/test_util.h"

namespace {

namespace fs = std::filesystem;
using cimsweep::testing::read_text;
using cimsweep::testing::run_cimsweep;
using cimsweep::testing::TempDir;
using cimsweep::testing::user_error;
using cimsweep::testing::write_text;

const std::string kModel = std::string(CIMSWEEP_SOURCE_DIR) +
                           "/tests/data/golden_resnet8_k5_w3_11x13_shortcutB_exits.safetensors";

class SlurmCimOptions : public ::testing::Test {
 protected:
  void SetUp() override {
    fs::create_directories(dir.file("data"));
    write_text(dir.file("sweep.toml"),
               "name = \"cim\"\ndata = \"data\"\nsigmas = [0.0, 0.1]\n[[models]]\npath = \"" +
                   kModel + "\"\n");
    options.spec_path = dir.file("sweep.toml");
    options.shards = 2;
    options.results_dir = dir.file("results");
    options.binary = "/opt/cimsweep";
  }
  TempDir dir;
  cimsweep::SlurmOptions options;
};

TEST_F(SlurmCimOptions, EveryTaskAndTheResubmissionGetThemAsGivenFlagsByName) {
  options.cim = {{"adc", "fixed"},
                 {"adc-bits", "6"},
                 {"clamp-at-zero", "true"},
                 {"digital-layers", "conv1,fc"},
                 {"onoff", "inf"}};
  const cimsweep::SlurmJob job = cimsweep::plan_slurm_job(options);
  const std::string cim = "--adc fixed --adc-bits 6 --clamp-at-zero --digital-layers conv1,fc "
                          "--onoff inf";
  const std::string script = cimsweep::array_script(job);
  EXPECT_NE(script.find("  --resume --quiet " + cim + "\n"), std::string::npos) << script;
  const std::string resubmit = cimsweep::resubmit_command(job, "1");
  EXPECT_NE(resubmit.find(" " + cim + " --only-tasks 1 --submit"), std::string::npos)
      << resubmit;
}

TEST_F(SlurmCimOptions, ABadValueOrAnImpossibleModelStopsBeforeAnyScript) {
  options.cim = {{"adc", "sometimes"}};
  const std::string bad_value = user_error([&] { cimsweep::plan_slurm_job(options); });
  EXPECT_NE(bad_value.find("--adc"), std::string::npos) << bad_value;
  EXPECT_EQ(bad_value.find('\n'), std::string::npos) << bad_value;
  // Each value parses, the model does not exist: cell bits must divide the weight bits.
  options.cim = {{"weight-bits", "8"}, {"cell-bits", "3"}};
  const std::string impossible = user_error([&] { cimsweep::plan_slurm_job(options); });
  EXPECT_FALSE(impossible.empty());
  EXPECT_EQ(impossible.find('\n'), std::string::npos) << impossible;
  EXPECT_FALSE(fs::exists(dir.file("results"))) << "nothing may be written before the checks";
}

TEST_F(SlurmCimOptions, TheCommandLineTakesEveryCimOptionEvalTakes) {
  const auto eval_help = run_cimsweep("eval --help");
  const auto slurm_help = run_cimsweep("slurm --help");
  ASSERT_EQ(eval_help.exit_code, 0) << eval_help.err;
  ASSERT_EQ(slurm_help.exit_code, 0) << slurm_help.err;
  for (const cimsweep::CimOption& option : cimsweep::cim_options()) {
    const std::string name = std::string("--") + option.name;
    EXPECT_NE(eval_help.out.find(name), std::string::npos) << name;
    EXPECT_NE(slurm_help.out.find(name), std::string::npos) << name;
  }
  const auto written = run_cimsweep("slurm " + dir.file("sweep.toml") + " --shards 2 --results-dir " +
                                    dir.file("results") + " --adc calibrated --adc-bits 6 "
                                    "--reference-variation");
  ASSERT_EQ(written.exit_code, 0) << written.err;
  // In cim_options() order, the order CLI11 runs the options' callbacks in.
  const std::string script = read_text(dir.file("results") + "/cimsweep-cim.sbatch");
  EXPECT_NE(script.find(" --reference-variation --adc-bits 6 --adc calibrated\n"),
            std::string::npos)
      << script;
}

}  // namespace
