// binding.h: what the module's two entries share. binding.cpp defines kda_fwd and registers it as
// a torch op; python_entry.cpp calls it from Python past torch's dispatcher. Host code only.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>

#include <optional>

namespace flash_kda {

// The device type this module's kernels run on (the op is registered for its dispatch key).
#if defined(FLASH_KDA_BACKEND_CUDA)
inline constexpr c10::DeviceType kModuleDeviceType = c10::DeviceType::CUDA;
#elif defined(FLASH_KDA_BACKEND_MUSA)
inline constexpr c10::DeviceType kModuleDeviceType = c10::DeviceType::PrivateUse1;
#elif defined(FLASH_KDA_BACKEND_CPU)
inline constexpr c10::DeviceType kModuleDeviceType = c10::DeviceType::CPU;
#else
#error "define one of FLASH_KDA_BACKEND_{CPU,CUDA,MUSA}"
#endif

// The op: checks every argument (a c10::ValueError prefixed "flash_kda: invalid arguments: ", before
// anything is allocated, launched or written), then launches the kernels on the current stream.
// With state_in_place, final_state holds the initial state and initial_state is None.
void kda_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& g,
             const at::Tensor& beta, const std::optional<at::Tensor>& A_log,
             const std::optional<at::Tensor>& dt_bias,
             const std::optional<at::Tensor>& initial_state,
             const std::optional<at::Tensor>& final_state, const at::Tensor& out,
             const std::optional<at::Tensor>& cu_seqlens, double scale, double lower_bound,
             bool use_qk_l2norm, bool state_in_place, const std::optional<at::Tensor>& workspace);

}  // namespace flash_kda
