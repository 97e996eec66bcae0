// HOST_DEVICE marks functions compiled by both g++ (CPU backend) and nvcc (CUDA backend), and the
// strict-rounding helpers that keep their results bit-identical on both: CUDA contracts a*b+c into
// one fused multiply-add unless told not to, the host build is compiled with -ffp-contract=off.
#pragma once

#if defined(__CUDACC__)
#define HOST_DEVICE __host__ __device__
#else
#define HOST_DEVICE
#endif

namespace cim {

HOST_DEVICE inline double mul_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

HOST_DEVICE inline double add_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}

HOST_DEVICE inline double sub_rn(double a, double b) {
  return add_rn(a, -b);
}

HOST_DEVICE inline double div_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __ddiv_rn(a, b);
#else
  return a / b;
#endif
}

HOST_DEVICE inline float fdiv_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

}  // namespace cim
