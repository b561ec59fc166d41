// Argument codes of the fused norm kernel (cpu_norm.cpp), the one definition for C++ and Python.
// tta_norm/kernels/__init__.py parses the `ESTIMATOR_<name> = <code>` lines below into ESTIMATOR_CODES,
// RULE_CODES, INSTANCE_CODES and ARG_* (names are NormSpec's estimator / mixing / instance values).
#pragma once

enum Estimator : int {
  ESTIMATOR_mean_var = 0,
  ESTIMATOR_median_msd = 1,
  ESTIMATOR_median_mad = 2,
  ESTIMATOR_median_mad_normal = 3,
};

enum Rule : int {
  RULE_test = 0,
  RULE_linear = 1,
  RULE_mixture = 2,
  RULE_ema = 3,
  RULE_source = 4,
};

enum Instance : int {
  INSTANCE_none = 0,
  INSTANCE_iabn = 1,
  INSTANCE_example = 2,
};

// slots of the `extents` argument: the element count of each optional float32 tensor as Python declares it
// (0 = not passed, -1 = not a contiguous float32 CPU tensor); the kernel refuses any other count than C (2 C
// for stats_out)
enum Arg : int {
  ARG_alpha = 0,
  ARG_ref_mean = 1,
  ARG_ref_var = 2,
  ARG_weight = 3,
  ARG_bias = 4,
  ARG_stats_out = 5,
  ARG_count = 6,
};

// return codes of tta_fused_norm
enum Status : int {
  STATUS_ok = 0,
  STATUS_bad_shape = 1,
  STATUS_bad_code = 2,
  STATUS_bad_extent = 3,
  STATUS_missing_tensor = 4,
};
